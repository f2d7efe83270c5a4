//! The checks [`build_guest_dt`](super::build_guest_dt) makes before writing anything.

use alloc::vec;

use super::{GuestDtConfig, GuestDtError, GuestIts, GuestPci, GuestSmmu, GUEST_ITS_SIZE};
use crate::pci::PciSpace;
use crate::platform::MemRange;

/// SMMUv3 register pages 0 and 1 (IHI 0070 chapter 6: two 64 KiB pages); the driver maps
/// both.
const SMMU_REGS_MIN: u64 = 0x2_0000;
/// A virtio-mmio frame: registers to 0x0fc, the device's configuration space from 0x100.
use crate::devices::virtio::mmio::FRAME_SIZE as VIRTIO_MMIO_REGS_MIN;
/// MPIDR_EL1 Aff3 (39:32) and Aff2..Aff0 (23:0); everything else is not part of a CPU's id.
const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

fn validate_pci(pci: &GuestPci) -> Result<(), GuestDtError> {
    let r = pci.ecam;
    if r.size == 0 || r.base.checked_add(r.size).is_none() {
        return Err(GuestDtError::BadRange {
            what: "pci ecam",
            base: r.base,
            size: r.size,
        });
    }
    let (start, end) = pci.bus_range;
    if start > end {
        return Err(GuestDtError::BadBusRange { start, end });
    }
    let buses = u32::from(end - start) + 1;
    if r.size < u64::from(buses) << 20 {
        return Err(GuestDtError::EcamTooSmall {
            size: r.size,
            buses,
        });
    }
    for w in pci.ranges {
        let wraps =
            w.pci_base.checked_add(w.size).is_none() || w.cpu_base.checked_add(w.size).is_none();
        let above_4g = matches!(w.space, PciSpace::Io | PciSpace::Mem32) && w.pci_end() > 1 << 32;
        if w.space == PciSpace::Config || w.size == 0 || wraps || above_4g {
            return Err(GuestDtError::BadPciWindow {
                space: w.space,
                pci_base: w.pci_base,
                size: w.size,
            });
        }
    }
    for (i, &(_, _, intid, (root, pin))) in pci.intx.iter().enumerate() {
        if !(32..1020).contains(&intid) {
            return Err(GuestDtError::BadIntid {
                what: "pci intx",
                intid,
                expected: "SPI",
            });
        }
        // The map's key (see `host_bridge::PCI_INTX_MASK`): the root-bus slot the pin enters
        // the host bridge at and the pin there, whichever function behind it raised it.
        let clash = pci.intx[..i]
            .iter()
            .find(|&&(_, _, other, (r, p))| r.dev == root.dev && p == pin && other != intid);
        if let Some(&(_, _, first, _)) = clash {
            return Err(GuestDtError::ConflictingIntx {
                slot: root.dev,
                pin,
                first,
                second: intid,
            });
        }
    }
    Ok(())
}

/// Rejects configurations that would produce a DT the guest misreads, so that the writer
/// code can compute interrupt numbers and ends without overflow checks.
pub(super) fn validate(cfg: &GuestDtConfig) -> Result<(), GuestDtError> {
    if cfg.vcpu_mpidrs.is_empty() {
        return Err(GuestDtError::NoVcpus);
    }
    for (i, &mpidr) in cfg.vcpu_mpidrs.iter().enumerate() {
        if mpidr & !MPIDR_AFFINITY_MASK != 0 {
            return Err(GuestDtError::BadMpidr(mpidr));
        }
        if cfg.vcpu_mpidrs[..i].contains(&mpidr) {
            return Err(GuestDtError::DuplicateMpidr(mpidr));
        }
    }
    let mut ranges = vec![
        ("ram", cfg.ram),
        ("gicd", cfg.gicd),
        ("gicr", cfg.gicr),
        ("uart", cfg.uart),
    ];
    if let Some(initrd) = cfg.initrd {
        ranges.push(("initrd", initrd));
    }
    for (what, r) in ranges {
        if r.size == 0 || r.base.checked_add(r.size).is_none() {
            return Err(GuestDtError::BadRange {
                what,
                base: r.base,
                size: r.size,
            });
        }
    }
    if let Some(initrd) = cfg.initrd {
        if initrd.base < cfg.ram.base || initrd.end() > cfg.ram.end() {
            return Err(GuestDtError::InitrdOutsideRam {
                base: initrd.base,
                size: initrd.size,
            });
        }
    }
    let ppi = |what, intid: u32| {
        if (16..32).contains(&intid) {
            Ok(())
        } else {
            Err(GuestDtError::BadIntid {
                what,
                intid,
                expected: "PPI",
            })
        }
    };
    ppi("maintenance", cfg.maintenance_ppi)?;
    for intid in cfg.timer.intids {
        ppi("timer", intid)?;
    }
    if !(32..1020).contains(&cfg.uart_intid) {
        return Err(GuestDtError::BadIntid {
            what: "uart",
            intid: cfg.uart_intid,
            expected: "SPI",
        });
    }
    for (i, pci) in cfg.pci.iter().enumerate() {
        validate_pci(pci)?;
        // Two bridges with one domain would collide in Linux (`pci_bus_find_domain_nr`); with
        // one ECAM window, one node name.
        if let Some(o) = cfg.pci[..i]
            .iter()
            .find(|o| o.domain == pci.domain || overlaps(o.ecam, pci.ecam))
        {
            return Err(GuestDtError::BridgesClash {
                first: o.ecam.base,
                second: pci.ecam.base,
            });
        }
    }
    // A shared line would be requested twice by Linux without IRQF_SHARED and fail the
    // probe; with the level-triggered UART or INTx lines it would also mix trigger types.
    let mut used = vec![("uart", cfg.uart_intid)];
    for pci in cfg.pci {
        used.extend(pci.intx.iter().map(|&(_, _, intid, _)| ("pci intx", intid)));
    }
    for (i, smmu) in cfg.smmus.iter().enumerate() {
        validate_smmu(smmu, &mut used)?;
        // Two nodes at one address would have one name, and one vSMMU's registers would
        // shadow the other's.
        if let Some(other) = cfg.smmus[..i].iter().find(|o| overlaps(o.regs, smmu.regs)) {
            return Err(GuestDtError::SmmusOverlap {
                first: other.regs.base,
                second: smmu.regs.base,
            });
        }
    }
    for pci in cfg.pci {
        validate_msi_map(pci, cfg.its.is_some())?;
    }
    if let Some(its) = cfg.its {
        validate_its(cfg, &its)?;
    }
    if cfg.smmus.len() > 1 && cfg.pci.iter().any(|p| p.iommu_map.is_empty()) {
        // Without the host's entries nothing says which RIDs each vSMMU translates.
        return Err(GuestDtError::NoIommuMap(cfg.smmus.len()));
    }
    Ok(())
}

/// A host bridge's `msi-map` names the ITS, so it is written exactly when there is one (with
/// one and no entries, the identity map is written).
fn validate_msi_map(pci: &GuestPci, its: bool) -> Result<(), GuestDtError> {
    if !its && (!pci.msi_map.is_empty() || pci.msi_map_mask.is_some()) {
        return Err(GuestDtError::MsiMapWithoutIts(pci.ecam.base));
    }
    for e in pci.msi_map {
        // The RID space is 16 bits; Linux's `of_map_id` adds the offset to the DeviceID base.
        let rid_end = u64::from(e.rid_base) + u64::from(e.len);
        if e.len == 0 || rid_end > 1 << 16 || e.devid_base.checked_add(e.len).is_none() {
            return Err(GuestDtError::BadMsiMap {
                rid_base: e.rid_base,
                devid_base: e.devid_base,
                len: e.len,
            });
        }
    }
    Ok(())
}

/// The ITS's two 64 KiB frames, 64 KiB aligned (IHI 0069: the ITS register map is in 64 KiB
/// frames), over nothing else the guest's address map holds: another device's registers
/// there would be shadowed by the vITS's trap, or RAM would be.
fn validate_its(cfg: &GuestDtConfig, its: &GuestIts) -> Result<(), GuestDtError> {
    let r = MemRange {
        base: its.base,
        size: its.size,
    };
    if r.size < GUEST_ITS_SIZE
        || !r.base.is_multiple_of(0x1_0000)
        || r.base.checked_add(r.size).is_none()
    {
        return Err(GuestDtError::BadRange {
            what: "its",
            base: r.base,
            size: r.size,
        });
    }
    let mut others = vec![
        ("ram", cfg.ram),
        ("gicd", cfg.gicd),
        ("gicr", cfg.gicr),
        ("uart", cfg.uart),
    ];
    others.extend(cfg.smmus.iter().map(|s| ("smmu", s.regs)));
    for pci in cfg.pci {
        others.push(("pci ecam", pci.ecam));
        others.extend(pci.ranges.iter().map(|w| {
            (
                "pci window",
                MemRange {
                    base: w.cpu_base,
                    size: w.size,
                },
            )
        }));
    }
    match others.into_iter().find(|&(_, o)| overlaps(o, r)) {
        Some((what, o)) => Err(GuestDtError::ItsOverlaps {
            its: r.base,
            what,
            base: o.base,
        }),
        None => Ok(()),
    }
}

fn overlaps(a: crate::platform::MemRange, b: crate::platform::MemRange) -> bool {
    a.base < b.base.saturating_add(b.size) && b.base < a.base.saturating_add(a.size)
}

fn validate_smmu(
    smmu: &GuestSmmu,
    used: &mut alloc::vec::Vec<(&'static str, u32)>,
) -> Result<(), GuestDtError> {
    let r = smmu.regs;
    // A virtio-iommu is a virtio-mmio register frame (0x100 of registers, then its config
    // space) with one interrupt; a vSMMU two register pages and two interrupts.
    let virtio = smmu.kind == crate::config::IommuKind::VirtioIommu;
    let (what, min) = if virtio {
        ("virtio-iommu regs", VIRTIO_MMIO_REGS_MIN)
    } else {
        ("smmu regs", SMMU_REGS_MIN)
    };
    if r.size < min || r.base.checked_add(r.size).is_none() {
        return Err(GuestDtError::BadRange {
            what,
            base: r.base,
            size: r.size,
        });
    }
    let both = [
        ("smmu eventq", smmu.eventq_intid),
        ("smmu gerror", smmu.gerror_intid),
    ];
    let one = [("virtio-iommu", smmu.eventq_intid)];
    let irqs: &[(&'static str, u32)] = if virtio { &one } else { &both };
    for &(what, intid) in irqs {
        if !(32..1020).contains(&intid) {
            return Err(GuestDtError::BadIntid {
                what,
                intid,
                expected: "SPI",
            });
        }
    }
    for &(second, intid) in irqs {
        if let Some(&(first, _)) = used.iter().find(|&&(_, other)| other == intid) {
            return Err(GuestDtError::SharedIntid {
                intid,
                first,
                second,
            });
        }
        used.push((second, intid));
    }
    Ok(())
}

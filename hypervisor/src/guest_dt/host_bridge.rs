//! The node of the VM's virtual PCI host bridge: `ranges`, `iommu-map`, `msi-map` and the INTx
//! `interrupt-map`.

use alloc::format;
use alloc::vec::Vec;

use vm_fdt::FdtWriter;

use super::{smmu_phandle, GuestDtError, GuestPci, GuestSmmu, GIC_PHANDLE, GIC_SPI, LEVEL_HIGH};
use crate::pci::{IntxPin, PciSpace};

/// `interrupt-map-mask`: the device number (phys.hi bits 15:11) and the pin. QEMU's `virt`
/// masks only bits 12:11 because its routing repeats every four slots; the guest's map lists
/// exactly the root-bus slots its functions' pins enter the host bridge at, so it keys on the
/// whole device number and stays right whatever the physical routing is. Linux's
/// `of_irq_parse_pci` swizzles a pin at each bridge without a DT node (the guest DT has none
/// below the host bridge) and looks the map up with the root-bus ancestor's bus/devfn and the
/// swizzled pin: the key of each entry is that pair (`GuestPci::intx`), not the function's own
/// slot and pin. The bus number is masked out: every key is on the root bus.
pub(super) const PCI_INTX_MASK: [u32; 4] = [0xf800, 0, 0, 7];

/// The generic PCI bus binding's phys.hi (IEEE 1275 PCI binding 2.2.1.1): `npt000ss`, with
/// `ss` the space code in bits 25:24 and `p` (prefetchable) bit 30.
fn phys_hi(space: PciSpace, prefetchable: bool) -> u32 {
    let ss = match space {
        PciSpace::Config => 0,
        PciSpace::Io => 1,
        PciSpace::Mem32 => 2,
        PciSpace::Mem64 => 3,
    };
    ss << 24 | u32::from(prefetchable) << 30
}

/// The host bridge node Linux's `pci-host-generic` (`pci_host_common_probe`) binds to; `its`
/// is the phandle of the VM's virtual ITS, if it has one.
pub(super) fn pci_node(
    w: &mut FdtWriter,
    pci: &GuestPci,
    smmus: &[GuestSmmu],
    its: Option<u32>,
) -> Result<(), GuestDtError> {
    let node = w.begin_node(&format!("pcie@{:x}", pci.ecam.base))?;
    w.property_string("compatible", "pci-host-ecam-generic")?;
    w.property_string("device_type", "pci")?;
    w.property_u32("#address-cells", 3)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("#interrupt-cells", 1)?;
    w.property_array_u32(
        "bus-range",
        &[u32::from(pci.bus_range.0), u32::from(pci.bus_range.1)],
    )?;
    w.property_array_u64("reg", &[pci.ecam.base, pci.ecam.size])?;
    // Each entry: PCI address (3 cells), CPU address (the root's 2), size (2).
    let mut ranges = Vec::with_capacity(pci.ranges.len() * 7);
    for r in pci.ranges {
        let split = |v: u64| [(v >> 32) as u32, v as u32];
        ranges.push(phys_hi(r.space, r.prefetchable));
        ranges.extend(split(r.pci_base));
        ranges.extend(split(r.cpu_base));
        ranges.extend(split(r.size));
    }
    w.property_array_u32("ranges", &ranges)?;
    // The host's domain, fixed, so that the guest's addresses of its functions (BDFs equal to
    // the host's) read the same in both logs.
    w.property_u32("linux,pci-domain", u32::from(pci.domain))?;
    w.property_null("dma-coherent")?;
    if !smmus.is_empty() {
        // Linux `pci-iommu.yaml`: <rid-base iommu iommu-base length>. The host's entries for
        // the physical SMMUs under the vSMMUs, each onto the vSMMU over its SMMU: a vSMMU then
        // sees the same StreamIDs as its physical SMMU, so no translation table is needed
        // between them. Without any, StreamID = RID for the whole 16-bit RID space, as on
        // QEMU `virt`. A RID no entry covers (a function behind an SMMU that gave the VM no
        // vSMMU) is, for Linux's `of_map_id`, a device with no IOMMU: stage 2 alone.
        let map: Vec<u32> = if pci.iommu_map.is_empty() {
            alloc::vec![0, smmu_phandle(0), 0, 1 << 16]
        } else {
            pci.iommu_map
                .iter()
                .filter_map(|e| {
                    let i = smmus.iter().position(|s| s.host_phandle == Some(e.iommu))?;
                    Some([e.rid_base, smmu_phandle(i), e.sid_base, e.length])
                })
                .flatten()
                .collect()
        };
        w.property_array_u32("iommu-map", &map)?;
        if let Some(mask) = pci.iommu_map_mask {
            w.property_u32("iommu-map-mask", mask)?;
        }
    }
    if let Some(its) = its {
        // Linux `pci-msi.txt`: <rid-base msi-controller msi-base length>. The host's entries,
        // each onto the vITS (a guest has one, whichever physical ITS the host's entry names):
        // a function's DeviceID is the same on both sides, so the vITS passes a guest's
        // DeviceID through. Without any, DeviceID = RID, as on QEMU `virt`.
        let map: Vec<u32> = if pci.msi_map.is_empty() {
            alloc::vec![0, its, 0, 1 << 16]
        } else {
            pci.msi_map
                .iter()
                .flat_map(|e| [e.rid_base, its, e.devid_base, e.len])
                .collect()
        };
        w.property_array_u32("msi-map", &map)?;
        if let Some(mask) = pci.msi_map_mask {
            w.property_u32("msi-map-mask", mask)?;
        }
    }
    // The GIC's #address-cells: 2 with an ITS child, else 0.
    let parent_addr: &[u32] = if its.is_some() { &[0, 0] } else { &[] };
    w.property_array_u32("interrupt-map-mask", &PCI_INTX_MASK)?;
    let mut map: Vec<u32> = Vec::with_capacity(pci.intx.len() * 10);
    let mut seen: Vec<(u8, IntxPin)> = Vec::new();
    for &(_, _, intid, (root, pin)) in pci.intx {
        // `validate` made sure duplicates agree; one entry per (slot, pin) is enough (two
        // functions behind one root port whose pins swizzle to the same one share it).
        if seen.contains(&(root.dev, pin)) {
            continue;
        }
        seen.push((root.dev, pin));
        // Child unit address: bus/device/function in phys.hi 23:8; then the pin, the GIC,
        // its unit address (as many zero cells as its #address-cells) and a GIC specifier.
        // INTx is level triggered (PCIe Base spec 2.2.8.1: Assert_INTx/Deassert_INTx
        // messages model a level).
        map.extend_from_slice(&[u32::from(root.rid()) << 8, 0, 0, pin.number(), GIC_PHANDLE]);
        map.extend_from_slice(parent_addr);
        map.extend_from_slice(&[GIC_SPI, intid - 32, LEVEL_HIGH]);
    }
    w.property_array_u32("interrupt-map", &map)?;
    w.end_node(node)?;
    Ok(())
}

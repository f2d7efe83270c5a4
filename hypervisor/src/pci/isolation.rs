//! The device pages a VM's stage 2 may map, checked against the whole enumerated topology.
//!
//! A VM reaches its functions' memory BARs through its stage 2, a page at a time, so a page it
//! maps must hold registers of its own functions only. [`super::assign_resources`] places every
//! memory BAR in a slot of whole pages of its own, which makes that true by construction; this
//! check makes it true by verification too, before the VM starts, against every BAR of every
//! function (bridges and unassigned functions included), whoever placed them. I/O BARs are
//! never mapped: a VM's accesses to its I/O window trap and are forwarded only inside its own
//! functions' ranges (`VirtualEcam::resolve`).

use alloc::string::String;
use alloc::vec::Vec;

use thiserror::Error;

use super::enumerate::{BarKind, Topology};
use super::host::{HostBridge, PciSpace};
use super::resources::DEVICE_PAGE;
use super::Bdf;

/// The pages one memory BAR of a VM's function occupies, as its stage 2 maps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSlot {
    /// The function.
    pub bdf: Bdf,
    /// Its BAR (the index of the low dword).
    pub bar: u8,
    /// Where the BAR physically is (CPU address), as the hypervisor placed it.
    pub phys: u64,
    /// The BAR's size.
    pub bar_size: u64,
    /// First page of the slot (CPU address).
    pub page: u64,
    /// Bytes of whole pages the slot spans.
    pub len: u64,
}

/// Why a VM's device pages cannot be given to it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum IsolationError {
    /// A page the VM would map holds registers of a function it does not own.
    #[error(
        "VM {vm}: page {page:#x} holds BAR {bar} of its {bdf} and BAR {other_bar} of {other}, \
         which VM {vm} does not own: the page cannot be mapped into VM {vm}"
    )]
    SharedPage {
        /// The VM.
        vm: String,
        /// Its function.
        bdf: Bdf,
        /// That function's BAR.
        bar: u8,
        /// The page (CPU address).
        page: u64,
        /// The other function with registers in the page.
        other: Bdf,
        /// The other function's BAR.
        other_bar: u8,
    },
    /// A BAR is not inside any of the host bridge's memory windows as the CPU sees them.
    #[error("VM {vm}: {bdf} BAR {bar} at {phys:#x}+{size:#x} is outside the host bridge's memory windows")]
    OutsideWindows {
        /// The VM.
        vm: String,
        /// Its function.
        bdf: Bdf,
        /// That function's BAR.
        bar: u8,
        /// Where the BAR is.
        phys: u64,
        /// Its size.
        size: u64,
    },
    /// A BAR lies beyond the IPA space a VM's stage 2 covers.
    #[error("VM {vm}: {bdf} BAR {bar} at {phys:#x}+{size:#x} is beyond the VM's {ipa_bits}-bit IPA space")]
    BeyondIpa {
        /// The VM.
        vm: String,
        /// Its function.
        bdf: Bdf,
        /// That function's BAR.
        bar: u8,
        /// Where the BAR is.
        phys: u64,
        /// Its size.
        size: u64,
        /// The IPA size.
        ipa_bits: u32,
    },
}

/// `[start, end)` of a CPU range, `None` if it wraps.
fn span(base: u64, size: u64) -> Option<(u64, u64)> {
    Some((base, base.checked_add(size)?))
}

/// The page-aligned `[start, end)` covering `[base, base + size)`, `None` if it wraps.
fn pages(base: u64, size: u64) -> Option<(u64, u64)> {
    let (start, end) = span(base, size)?;
    let end = end.checked_next_multiple_of(DEVICE_PAGE)?;
    Some((start & !(DEVICE_PAGE - 1), end))
}

/// The slots of the memory BARs of `owned` functions that `vm`'s stage 2 maps, after checking
/// each page against every BAR of every function of `topo` that `vm` does not own, and against
/// the host bridge's memory windows and the IPA space (`ipa_bits`). BARs that were not placed
/// (no window for them) are not mapped.
pub fn device_slots(
    vm: &str,
    topo: &Topology,
    host: &HostBridge,
    owned: &[Bdf],
    ipa_bits: u32,
) -> Result<Vec<DeviceSlot>, IsolationError> {
    let mut slots = Vec::new();
    for dev in topo.devices.iter().filter(|d| owned.contains(&d.bdf)) {
        for bar in dev.bars.iter().filter(|b| b.kind != BarKind::Io) {
            let Some(addr) = bar.addr else { continue };
            let outside = || IsolationError::OutsideWindows {
                vm: vm.into(),
                bdf: dev.bdf,
                bar: bar.index,
                phys: addr.cpu,
                size: bar.size,
            };
            let (page, end) = pages(addr.cpu, bar.size).ok_or_else(outside)?;
            let in_window = host.windows.iter().any(|w| {
                matches!(w.space, PciSpace::Mem32 | PciSpace::Mem64)
                    && span(w.cpu_base, w.size).is_some_and(|(ws, we)| ws <= page && end <= we)
            });
            if !in_window {
                return Err(outside());
            }
            if end > 1u64 << ipa_bits {
                return Err(IsolationError::BeyondIpa {
                    vm: vm.into(),
                    bdf: dev.bdf,
                    bar: bar.index,
                    phys: addr.cpu,
                    size: bar.size,
                    ipa_bits,
                });
            }
            let foreign = topo
                .devices
                .iter()
                .filter(|o| !owned.contains(&o.bdf))
                .flat_map(|o| o.bars.iter().map(move |b| (o.bdf, b)))
                .find(|(_, b)| match b.addr {
                    None => false,
                    // A BAR whose end would wrap covers everything from its base up.
                    Some(a) => span(a.cpu, b.size).is_none_or(|(s, e)| s < end && page < e),
                });
            if let Some((other, b)) = foreign {
                // Name the first page the two share.
                let start = b.addr.map_or(page, |a| a.cpu.max(page)) & !(DEVICE_PAGE - 1);
                return Err(IsolationError::SharedPage {
                    vm: vm.into(),
                    bdf: dev.bdf,
                    bar: bar.index,
                    page: start,
                    other,
                    other_bar: b.index,
                });
            }
            slots.push(DeviceSlot {
                bdf: dev.bdf,
                bar: bar.index,
                phys: addr.cpu,
                bar_size: bar.size,
                page,
                len: end - page,
            });
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::enumerate::{enumerate, BarAddr, PortType};
    use crate::pci::fake::{qemu_host_bridge, FakeConfigSpace, FakeFn};
    use crate::pci::{assign_resources, ConfigSpace};

    const B: fn(u8, u8, u8) -> Bdf = Bdf::new;

    /// QEMU `virt`'s root bus as a user plugs devices with their default options: two e1000e
    /// (8086:10d3: 128 KiB memory, 128 KiB flash, a 32-byte I/O BAR, a 16 KiB MSI-X BAR), a
    /// transitional virtio-blk (1af4:1001, 0x80-byte legacy I/O BAR, 4 KiB MSI-X, 16 KiB
    /// modern), and the sub-page BARs of an rtl8139 (256 bytes I/O and memory), an ivshmem
    /// (256-byte registers), an sdhci-pci (256 bytes) and an lsi53c895a (256 bytes I/O, 1 KiB
    /// registers, 8 KiB RAM).
    pub(crate) fn user_plugged() -> FakeConfigSpace {
        let mut f = FakeConfigSpace::new();
        f.add(
            None,
            0,
            0,
            FakeFn::endpoint(0x1b36, 0x0008).class(0x06_00_00),
        );
        let e1000e = || {
            FakeFn::endpoint(0x8086, 0x10d3)
                .pcie(PortType::RcIntegratedEndpoint)
                .bar32(0, 0x2_0000, false)
                .bar32(1, 0x2_0000, false)
                .bar_io(2, 0x20)
                .bar32(3, 0x4000, false)
                .pin(1)
        };
        f.add(None, 1, 0, e1000e());
        f.add(None, 2, 0, e1000e());
        f.add(
            None,
            3,
            0,
            FakeFn::endpoint(0x1af4, 0x1001)
                .pcie(PortType::RcIntegratedEndpoint)
                .bar_io(0, 0x80)
                .bar32(1, 0x1000, false)
                .bar64(4, 0x4000, true)
                .virtio_modern(1 << 32)
                .pin(1),
        );
        f.add(
            None,
            4,
            0,
            FakeFn::endpoint(0x10ec, 0x8139)
                .bar_io(0, 0x100)
                .bar32(1, 0x100, false)
                .pin(1),
        );
        f.add(
            None,
            5,
            0,
            FakeFn::endpoint(0x1af4, 0x1110)
                .bar32(0, 0x100, false)
                .bar64(2, 0x40_0000, true)
                .pin(1),
        );
        f.add(
            None,
            6,
            0,
            FakeFn::endpoint(0x1b36, 0x0007)
                .bar32(0, 0x100, false)
                .pin(1),
        );
        f.add(
            None,
            7,
            0,
            FakeFn::endpoint(0x1000, 0x0012)
                .bar_io(0, 0x100)
                .bar32(1, 0x400, false)
                .bar32(2, 0x2000, false)
                .pin(1),
        );
        f
    }

    fn placed(mut f: FakeConfigSpace) -> (FakeConfigSpace, Topology, HostBridge) {
        // As the hypervisor takes it: only the windows a 39-bit IPA space reaches.
        let mut host = qemu_host_bridge();
        host.windows.retain(|w| w.cpu_base + w.size <= 1 << 39);
        let mut t = enumerate(&mut f, 0, 0xff).unwrap();
        assign_resources(&mut f, &mut t, &host).unwrap();
        (f, t, host)
    }

    #[test]
    fn every_memory_bar_has_pages_of_its_own() {
        let (_, t, host) = placed(user_plugged());
        // Page-aligned, page-sized slots: no two functions' memory BARs share a page.
        let mut seen: Vec<(u64, Bdf)> = Vec::new();
        for d in &t.devices {
            for b in d.bars.iter().filter(|b| b.kind != BarKind::Io) {
                let a = b.addr.unwrap();
                assert_eq!(a.cpu % DEVICE_PAGE, 0, "{} BAR {}", d.bdf, b.index);
                let (s, e) = pages(a.cpu, b.size).unwrap();
                for p in (s..e).step_by(DEVICE_PAGE as usize) {
                    assert!(
                        !seen.iter().any(|&(q, o)| q == p && o != d.bdf),
                        "page {p:#x} of {} is shared",
                        d.bdf
                    );
                    seen.push((p, d.bdf));
                }
            }
        }
        // Every split of the functions between two VMs and nobody passes the check.
        let fns: Vec<Bdf> = (1..=7).map(|s| B(0, s, 0)).collect();
        for mask in 0u32..(1 << fns.len()) {
            let vm0: Vec<Bdf> = fns
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & 1 << i != 0)
                .map(|(_, &b)| b)
                .collect();
            let slots = device_slots("vm0", &t, &host, &vm0, 39).unwrap();
            // Only the VM's memory BARs, each a whole number of pages at its own address.
            for s in &slots {
                assert!(vm0.contains(&s.bdf));
                assert_eq!((s.page, s.len % DEVICE_PAGE), (s.phys, 0));
                assert!(s.len >= s.bar_size);
            }
        }
        // The I/O BARs stay packed (they are never mapped): the two e1000e's 32-byte BARs and
        // the virtio one share the I/O window's first page.
        let io: Vec<u64> = [1, 2, 3]
            .iter()
            .map(|&s| {
                let d = t.device(B(0, s, 0)).unwrap();
                d.bars
                    .iter()
                    .find(|b| b.kind == BarKind::Io)
                    .unwrap()
                    .addr
                    .unwrap()
                    .cpu
            })
            .collect();
        assert!(io.iter().all(|a| a & !0xfff == io[0] & !0xfff));
    }

    #[test]
    fn a_shared_page_is_refused_naming_both_functions() {
        let (mut f, mut t, host) = placed(user_plugged());
        // As firmware that packs BARs would leave them: rtl8139's registers in the page of
        // ivshmem's.
        let ivshmem = t.device(B(0, 5, 0)).unwrap().bars[0].addr.unwrap();
        let rtl = t.devices.iter_mut().find(|d| d.bdf == B(0, 4, 0)).unwrap();
        let bar = rtl.bars.iter_mut().find(|b| b.index == 1).unwrap();
        bar.addr = Some(BarAddr {
            pci: ivshmem.pci + 0x100,
            cpu: ivshmem.cpu + 0x100,
        });
        f.write32(B(0, 4, 0), 0x14, (ivshmem.pci + 0x100) as u32);
        let err = device_slots("vm1", &t, &host, &[B(0, 5, 0)], 39).unwrap_err();
        assert_eq!(
            err,
            IsolationError::SharedPage {
                vm: "vm1".into(),
                bdf: B(0, 5, 0),
                bar: 0,
                page: ivshmem.cpu,
                other: B(0, 4, 0),
                other_bar: 1,
            }
        );
        assert_eq!(
            err.to_string(),
            alloc::format!(
                "VM vm1: page {:#x} holds BAR 0 of its 00:05.0 and BAR 1 of 00:04.0, which VM vm1 \
                 does not own: the page cannot be mapped into VM vm1",
                ivshmem.cpu
            )
        );
        // Owning both is fine: the page holds the VM's own registers only.
        assert_eq!(
            device_slots("vm1", &t, &host, &[B(0, 4, 0), B(0, 5, 0)], 39).map(|s| s.len()),
            Ok(3)
        );
    }

    #[test]
    fn bars_outside_windows_or_the_ipa_space_are_refused() {
        let (_, mut t, host) = placed(user_plugged());
        let d = t.devices.iter_mut().find(|d| d.bdf == B(0, 6, 0)).unwrap();
        d.bars[0].addr = Some(BarAddr {
            pci: 0x4000_0000,
            cpu: 0x4000_0000,
        });
        assert!(matches!(
            device_slots("vm0", &t, &host, &[B(0, 6, 0)], 39),
            Err(IsolationError::OutsideWindows { .. })
        ));
        // In the 64-bit window at 512 GiB, which a 39-bit IPA space does not reach.
        let mut host = qemu_host_bridge();
        d_bar(&mut t, B(0, 6, 0), 0x80_0000_0000);
        assert!(matches!(
            device_slots("vm0", &t, &host, &[B(0, 6, 0)], 39),
            Err(IsolationError::BeyondIpa { .. })
        ));
        // A BAR at the very top of the address space does not wrap the check.
        host.windows[2].cpu_base = u64::MAX - 0xfff;
        host.windows[2].size = 0x1000;
        d_bar(&mut t, B(0, 6, 0), u64::MAX - 0xff);
        assert!(device_slots("vm0", &t, &host, &[B(0, 6, 0)], 39).is_err());
    }

    fn d_bar(t: &mut Topology, bdf: Bdf, cpu: u64) {
        let d = t.devices.iter_mut().find(|d| d.bdf == bdf).unwrap();
        d.bars[0].addr = Some(BarAddr { pci: cpu, cpu });
    }
}

//! Where a VM's memory BARs are mapped in its stage 2, and where a guest's BAR move may put them.
//!
//! A BAR's slot (its pages, checked at VM start to hold registers of its own function only,
//! `pci::isolation`) is the only physical range any IPA of that BAR may ever map. A guest may
//! place its BARs where it likes (Linux does on a bus rescan); [`BarMaps::plan_move`] decides
//! whether the slot can be mapped at the new place a page at a time: inside one of the VM's PCI
//! memory windows, at the same offset in its page as the BAR has in its slot, over none of the
//! VM's other mapped BARs, with no arithmetic wrapping on the guest's address. Otherwise the BAR
//! stays unmapped and its accesses trap (and are forwarded inside it, `VirtualEcam::resolve`).

use alloc::vec::Vec;

use crate::devices::vecam::BarMove;
use crate::pci::{Bdf, DeviceSlot, PciSpace, PciWindow, DEVICE_PAGE};

/// One memory BAR of a VM's function and where its slot is mapped now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMap {
    /// The BAR's pages.
    pub slot: DeviceSlot,
    /// The IPA of the slot's first page, `None` while the guest has the BAR somewhere that
    /// cannot be mapped a page at a time.
    pub ipa: Option<u64>,
}

/// What a BAR move does to the VM's stage 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovePlan {
    /// The IPA range to unmap first, if the BAR was mapped: `(base, len)`.
    pub unmap: Option<(u64, u64)>,
    /// The IPA range to map the slot at, `(base, len)`, or `None`: left unmapped.
    pub map: Option<(u64, u64)>,
}

/// The memory BARs of one VM.
#[derive(Debug, Clone, Default)]
pub struct BarMaps {
    maps: Vec<BarMap>,
}

impl BarMaps {
    /// Every slot mapped where the hypervisor placed it (IPA = PA).
    pub fn new(slots: &[DeviceSlot]) -> Self {
        Self {
            maps: slots
                .iter()
                .map(|&slot| BarMap {
                    slot,
                    ipa: Some(slot.page),
                })
                .collect(),
        }
    }

    /// The BARs.
    pub fn maps(&self) -> &[BarMap] {
        &self.maps
    }

    fn find(&self, bdf: Bdf, bar: u8) -> Option<usize> {
        self.maps
            .iter()
            .position(|b| b.slot.bdf == bdf && b.slot.bar == bar)
    }

    /// Whether `[base, base + len)` overlaps a mapped BAR other than `k`.
    fn overlaps_other(&self, k: usize, base: u64, len: u64) -> bool {
        let end = base.saturating_add(len);
        self.maps.iter().enumerate().any(|(j, o)| {
            j != k
                && o.ipa
                    .is_some_and(|ob| ob < end && base < ob.saturating_add(o.slot.len))
        })
    }

    /// Decides and records what the guest's move `m` (its bus address `m.pci`) does, given the
    /// VM's PCI `windows` as its DT states them. `None` if `m` names no BAR of the VM.
    pub fn plan_move(&mut self, m: &BarMove, windows: &[PciWindow]) -> Option<MovePlan> {
        let k = self.find(m.bdf, m.index)?;
        let len = self.maps[k].slot.len;
        let unmap = self.maps[k].ipa.take().map(|old| (old, len));
        let window = windows
            .iter()
            .filter(|w| matches!(w.space, PciSpace::Mem32 | PciSpace::Mem64))
            .find(|w| {
                m.pci >= w.pci_base && m.pci.checked_add(m.size).is_some_and(|e| e <= w.pci_end())
            });
        let slot = self.maps[k].slot;
        let offset = slot.phys - slot.page;
        let map = window
            .and_then(|w| {
                let ipa = (m.pci - w.pci_base).checked_add(w.cpu_base)?;
                let base = ipa.checked_sub(offset)?;
                // The whole pages, not only the BAR's bytes, inside the window.
                let end = base.checked_add(len)?;
                (base >= w.cpu_base && w.cpu_base.checked_add(w.size).is_some_and(|we| end <= we))
                    .then_some(base)
            })
            .filter(|base| base.is_multiple_of(DEVICE_PAGE))
            .filter(|&base| !self.overlaps_other(k, base, len))
            .map(|base| (base, len));
        Some(MovePlan { unmap, map })
    }

    /// Records that the slot of (`bdf`, `bar`) is now mapped at `ipa`.
    pub fn set_mapped(&mut self, bdf: Bdf, bar: u8, ipa: u64) {
        if let Some(k) = self.find(bdf, bar) {
            self.maps[k].ipa = Some(ipa);
        }
    }

    /// For a VM boot: the BARs the guest moved (the IPA ranges to unmap) and the slots to map
    /// back where the hypervisor placed them; records them as back home.
    pub fn reset(&mut self) -> (Vec<(u64, u64)>, Vec<DeviceSlot>) {
        let mut unmap = Vec::new();
        let mut home = Vec::new();
        for b in &mut self.maps {
            if b.ipa != Some(b.slot.page) {
                if let Some(ipa) = b.ipa {
                    unmap.push((ipa, b.slot.len));
                }
                home.push(b.slot);
                b.ipa = Some(b.slot.page);
            }
        }
        (unmap, home)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::qemu_host_bridge;

    fn slot(dev: u8, bar: u8, page: u64, size: u64) -> DeviceSlot {
        DeviceSlot {
            bdf: Bdf::new(0, dev, 0),
            bar,
            phys: page,
            bar_size: size,
            page,
            len: size.next_multiple_of(DEVICE_PAGE),
        }
    }

    fn mv(dev: u8, bar: u8, size: u64, pci: u64) -> BarMove {
        BarMove {
            bdf: Bdf::new(0, dev, 0),
            index: bar,
            size,
            phys: 0,
            pci,
        }
    }

    #[test]
    fn a_move_maps_only_the_bars_own_slot() {
        let windows = qemu_host_bridge().windows;
        let mut m = BarMaps::new(&[
            slot(1, 0, 0x1000_0000, 0x100),
            slot(2, 0, 0x1000_1000, 0x4000),
        ]);
        // A 256-byte BAR moved to a page of its own: its one page, nothing of its neighbour's.
        let p = m
            .plan_move(&mv(1, 0, 0x100, 0x2000_0000), &windows)
            .unwrap();
        assert_eq!(p.unmap, Some((0x1000_0000, 0x1000)));
        assert_eq!(p.map, Some((0x2000_0000, 0x1000)));
        m.set_mapped(Bdf::new(0, 1, 0), 0, 0x2000_0000);
        // Linux packs small BARs: the same BAR at 0x2000_0100 is off its page offset, and over
        // the other BAR it would alias: both stay unmapped (their accesses are forwarded).
        let p = m
            .plan_move(&mv(1, 0, 0x100, 0x2000_0100), &windows)
            .unwrap();
        assert_eq!(
            p,
            MovePlan {
                unmap: Some((0x2000_0000, 0x1000)),
                map: None
            }
        );
        let p = m
            .plan_move(&mv(1, 0, 0x100, 0x1000_2000), &windows)
            .unwrap();
        assert_eq!(p.map, None, "over 00:02.0's pages");
        assert_eq!(m.maps()[0].ipa, None);
    }

    #[test]
    fn guest_addresses_never_wrap_and_stay_in_the_windows() {
        let windows = qemu_host_bridge().windows;
        let mut m = BarMaps::new(&[slot(1, 4, 0x1000_4000, 0x4000)]);
        for pci in [
            u64::MAX - 0xfff,
            u64::MAX,
            0x3eff_0000,
            0,
            0x8000_0000_0000_0000,
        ] {
            let p = m.plan_move(&mv(1, 4, 0x4000, pci), &windows).unwrap();
            assert_eq!(p.map, None, "{pci:#x}");
        }
        // Not a BAR of the VM's: nothing.
        assert_eq!(m.plan_move(&mv(9, 0, 0x1000, 0x2000_0000), &windows), None);
        // The 64-bit window, when the VM has it, is a window like the others.
        let p = m
            .plan_move(&mv(1, 4, 0x4000, 0x80_0000_0000), &windows)
            .unwrap();
        assert_eq!(p.map, Some((0x80_0000_0000, 0x4000)));
    }

    #[test]
    fn a_boot_puts_every_bar_back() {
        let windows = qemu_host_bridge().windows;
        let mut m = BarMaps::new(&[
            slot(1, 0, 0x1000_0000, 0x1000),
            slot(2, 0, 0x1000_1000, 0x1000),
        ]);
        assert_eq!(m.reset(), (Vec::new(), Vec::new()), "nothing moved");
        m.plan_move(&mv(1, 0, 0x1000, 0x2000_0000), &windows)
            .unwrap();
        m.set_mapped(Bdf::new(0, 1, 0), 0, 0x2000_0000);
        m.plan_move(&mv(2, 0, 0x1000, 0x2100_0100), &windows)
            .unwrap();
        let (unmap, home) = m.reset();
        assert_eq!(unmap, [(0x2000_0000, 0x1000)]);
        assert_eq!(home.len(), 2);
        assert!(m.maps().iter().all(|b| b.ipa == Some(b.slot.page)));
    }
}

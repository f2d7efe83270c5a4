//! The guest's BAR moves against `vm::bars` (where a VM's memory BARs are mapped in its stage 2):
//! a hostile guest places its BARs anywhere, and a model of the VM's stage 2 carries out every
//! plan as `vm/bars.rs` does (unmap the old range, map the new one onto the BAR's slot).
//!
//! Invariants, checked after every step (the letter starts each panic message):
//!
//! - (a) every mapped IPA page maps a page of its own BAR's slot, at the offset the BAR has in
//!   the guest's placement: nothing outside a slot that the VM-start check verified;
//! - (b) no IPA page is mapped for two BARs;
//! - (c) every mapped page lies inside one of the VM's PCI memory windows as its DT states them;
//! - (d) `BarMaps` and the stage 2 agree: a BAR is recorded mapped exactly where its pages are;
//! - (e) a placement that can be mapped a page at a time (in a window, at its slot's page offset,
//!   over no other mapped BAR) is mapped: the guest is never left to the slow path needlessly;
//! - (f) a VM boot (`reset`) puts every BAR back where the hypervisor placed it;
//! - no panic and no arithmetic overflow for any guest address.
//!
//! The input: byte 0 picks 1-6 slots (sizes 256 bytes to 1 MiB, placed in page slots from the
//! 32-bit window's base as `pci::resources` does); then operations, an opcode byte (mod 4) each:
//! 0-2 a move of a BAR (its index, then a bus address: mostly page-aligned in the window, near
//! another BAR, at the window's edges, unaligned, or any 64-bit value), 3 a VM boot.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::{Input, MAX_OPS};
use crate::devices::vecam::BarMove;
use crate::pci::fake::qemu_host_bridge;
use crate::pci::{Bdf, DeviceSlot, PciSpace, PciWindow, DEVICE_PAGE};
use crate::vm::bars::BarMaps;

/// What one run did, for the fixed-seed test's depth check.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Moves planned.
    pub moves: u64,
    /// Moves that mapped the BAR at its new place.
    pub mapped: u64,
    /// Moves left unmapped (their accesses forwarded).
    pub unmapped: u64,
    /// Boots.
    pub resets: u64,
}

struct Harness {
    windows: Vec<PciWindow>,
    maps: BarMaps,
    /// The model of the VM's stage 2: IPA page -> (BAR, PA page).
    s2: BTreeMap<u64, (usize, u64)>,
    tally: Tally,
}

fn in_window(windows: &[PciWindow], base: u64, len: u64) -> bool {
    windows.iter().any(|w| {
        matches!(w.space, PciSpace::Mem32 | PciSpace::Mem64)
            && base >= w.cpu_base
            && base
                .checked_add(len)
                .zip(w.cpu_base.checked_add(w.size))
                .is_some_and(|(e, we)| e <= we)
    })
}

impl Harness {
    fn new(input: &mut Input) -> Self {
        // As the hypervisor takes QEMU's host bridge: the windows a 39-bit IPA space reaches.
        let mut host = qemu_host_bridge();
        host.windows.retain(|w| w.cpu_base + w.size <= 1 << 39);
        let n = input.below(6) + 1;
        let mut at = 0x1000_0000u64;
        let mut slots = Vec::new();
        for i in 0..n {
            let size = 0x100u64 << (input.u8() % 13);
            let len = size.max(DEVICE_PAGE);
            at = at.next_multiple_of(len);
            slots.push(DeviceSlot {
                bdf: Bdf::new(0, i as u8 + 1, 0),
                bar: 0,
                phys: at,
                bar_size: size,
                page: at,
                len,
            });
            at += len;
        }
        let maps = BarMaps::new(&slots);
        let mut h = Self {
            windows: host.windows,
            maps,
            s2: BTreeMap::new(),
            tally: Tally::default(),
        };
        for (k, s) in slots.iter().enumerate() {
            h.map(k, s.page, s.len);
        }
        h.check();
        h
    }

    fn map(&mut self, k: usize, base: u64, len: u64) {
        let page = self.maps.maps()[k].slot.page;
        for off in (0..len).step_by(DEVICE_PAGE as usize) {
            let prev = self.s2.insert(base + off, (k, page + off));
            assert!(
                prev.is_none(),
                "(b) IPA page {:#x} mapped twice",
                base + off
            );
        }
    }

    fn unmap(&mut self, base: u64, len: u64) {
        for off in (0..len).step_by(DEVICE_PAGE as usize) {
            self.s2.remove(&(base + off));
        }
    }

    /// The guest moves BAR `k` to bus address `pci`.
    fn mv(&mut self, k: usize, pci: u64) {
        let slot = self.maps.maps()[k].slot;
        let m = BarMove {
            bdf: slot.bdf,
            index: slot.bar,
            size: slot.bar_size,
            phys: slot.phys,
            pci,
        };
        // What a valid placement is, from the rules, before the plan (with the BAR itself out).
        let others: Vec<(u64, u64)> = self
            .maps
            .maps()
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != k)
            .filter_map(|(_, b)| b.ipa.map(|i| (i, b.slot.len)))
            .collect();
        let ipa = self
            .windows
            .iter()
            .filter(|w| matches!(w.space, PciSpace::Mem32 | PciSpace::Mem64))
            .find(|w| {
                pci >= w.pci_base && pci.checked_add(m.size).is_some_and(|e| e <= w.pci_end())
            })
            .and_then(|w| (pci - w.pci_base).checked_add(w.cpu_base));
        let expected = ipa.and_then(|ipa| {
            let base = ipa.checked_sub(slot.phys - slot.page)?;
            let end = base.checked_add(slot.len)?;
            (base.is_multiple_of(DEVICE_PAGE)
                && in_window(&self.windows, base, slot.len)
                && !others.iter().any(|&(o, l)| o < end && base < o + l))
            .then_some((base, slot.len))
        });
        let plan = self
            .maps
            .plan_move(&m, &self.windows)
            .expect("the move names one of the VM's BARs");
        self.tally.moves += 1;
        if let Some((old, len)) = plan.unmap {
            self.unmap(old, len);
        }
        match plan.map {
            Some((base, len)) => {
                assert_eq!(
                    len, slot.len,
                    "(a) BAR {k} mapped with {len:#x}, its slot is {:#x}",
                    slot.len
                );
                self.map(k, base, len);
                self.maps.set_mapped(slot.bdf, slot.bar, base);
                self.tally.mapped += 1;
            }
            None => self.tally.unmapped += 1,
        }
        assert_eq!(
            plan.map, expected,
            "(e) BAR {k} moved to bus {pci:#x}: planned {:?}, a page-granular mapping is possible at {expected:?}",
            plan.map
        );
    }

    fn reset(&mut self) {
        let (unmap, home) = self.maps.reset();
        for (ipa, len) in unmap {
            self.unmap(ipa, len);
        }
        for s in home {
            let k = self
                .maps
                .maps()
                .iter()
                .position(|b| b.slot == s)
                .expect("a slot of the VM's");
            self.map(k, s.page, s.len);
        }
        self.tally.resets += 1;
        for b in self.maps.maps() {
            assert_eq!(b.ipa, Some(b.slot.page), "(f) after a boot, {:?}", b.slot);
        }
    }

    fn check(&self) {
        for (&ipa, &(k, pa)) in &self.s2 {
            let b = self.maps.maps()[k];
            let slot = b.slot;
            assert!(
                pa >= slot.page && pa < slot.page + slot.len,
                "(a) IPA page {ipa:#x} maps PA {pa:#x}, outside BAR {k}'s slot {slot:?}"
            );
            let base = b
                .ipa
                .unwrap_or_else(|| panic!("(d) BAR {k} unmapped, yet IPA {ipa:#x} maps it"));
            assert_eq!(
                ipa - base,
                pa - slot.page,
                "(a) IPA page {ipa:#x} at the wrong offset of its slot"
            );
            assert!(
                in_window(&self.windows, ipa, DEVICE_PAGE),
                "(c) IPA page {ipa:#x} outside the windows"
            );
        }
        for (k, b) in self.maps.maps().iter().enumerate() {
            if let Some(base) = b.ipa {
                for off in (0..b.slot.len).step_by(DEVICE_PAGE as usize) {
                    assert_eq!(
                        self.s2.get(&(base + off)).map(|&(j, _)| j),
                        Some(k),
                        "(d) BAR {k} recorded at {base:#x}, its page {:#x} is not mapped for it",
                        base + off
                    );
                }
            }
        }
    }
}

/// A bus address the guest might write: mostly plausible, sometimes anything.
fn address(input: &mut Input, h: &Harness) -> u64 {
    let w = h
        .windows
        .iter()
        .find(|w| w.space == PciSpace::Mem32)
        .copied();
    let (lo, size) = w.map_or((0x1000_0000, 0x2eff_0000), |w| (w.pci_base, w.size));
    match input.u8() % 8 {
        0..=2 => lo + (u64::from(input.u32()) % size) / DEVICE_PAGE * DEVICE_PAGE,
        3 => {
            let k = input.below(h.maps.maps().len());
            let near = h.maps.maps()[k].slot.phys;
            near.wrapping_add(u64::from(input.u16()) % 0x4000)
                .wrapping_sub(0x2000)
        }
        4 => lo + size - DEVICE_PAGE * u64::from(input.u8() % 4),
        5 => lo + u64::from(input.u32()) % size,
        _ => input.u64(),
    }
}

/// Runs one input; the tally says what it did.
pub fn run_with(data: &[u8]) -> Tally {
    let mut input = Input::new(data);
    let mut h = Harness::new(&mut input);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 4 {
            0..=2 => {
                let k = input.below(h.maps.maps().len());
                let pci = address(&mut input, &h);
                h.mv(k, pci);
            }
            _ => h.reset(),
        }
        h.check();
    }
    h.tally
}

/// The fuzz target's entry point (`hypervisor/fuzz/fuzz_targets/bars.rs`).
pub fn run(data: &[u8]) {
    run_with(data);
}

#[cfg(test)]
mod tests {
    use super::super::Rng;
    use super::*;

    #[test]
    fn random_inputs_keep_the_invariants() {
        let mut rng = Rng(0x1319_8a2e_0370_7344);
        let mut t = Tally::default();
        for _ in 0..2000 {
            let a = run_with(&rng.input(300));
            t.moves += a.moves;
            t.mapped += a.mapped;
            t.unmapped += a.unmapped;
            t.resets += a.resets;
        }
        assert!(
            t.mapped > 5000 && t.unmapped > 5000 && t.resets > 1000,
            "shallow: {t:?}"
        );
    }

    #[test]
    #[should_panic(expected = "(b) IPA page")]
    fn a_double_mapping_is_caught() {
        let mut h = Harness::new(&mut Input::new(&[1, 0, 0]));
        let s = h.maps.maps()[0].slot;
        h.map(1, s.page, s.len);
    }
}

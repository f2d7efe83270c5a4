//! Hostile-guest driver of the virtual ITS model ([`Vits`], issue 15) over fake guest RAM and
//! the recording physical ITS (`devices::vits::fake::RecordingIts`).
//!
//! [`run`] builds a vITS for a VM owning DeviceIDs 0x08 and 0x10 (0x18 is another VM's) with
//! 1-4 vCPUs and a small cap on translations, and plays the input as register accesses,
//! commands written into its queue (mostly well formed, with fields biased to the edges the
//! model checks), raw bytes over the queue, VM resets and physical failures. Invariants, each a
//! panic naming it:
//!
//! - **(a) no panic**, and bounded work: a register write reads at most one queue's worth of
//!   commands (2^8 pages of 128);
//! - **(b) owned DeviceIDs only** reach the physical ITS (the fake panics on any other, and on a
//!   device used before it is mapped or unmapped with events left);
//! - **(c) physical LPIs**: every pLPI the model holds was handed out by the fake and is live
//!   there for the same (DeviceID, EventID), and vice versa; none is given back twice or used
//!   after it was (the fake panics);
//! - **(d) the queue**: GITS_CREADR.Offset never passes GITS_CWRITER: after every write, an
//!   enabled ITS with a valid queue has either caught up (CREADR = CWRITER) or stalled; CREADR
//!   stays 32-byte aligned inside the queue;
//! - **(e) bounded state**: translations at most the cap, devices only owned ones, and
//!   `virtual_of` only ever names an LPI of the VM and one of its vCPUs;
//! - **(f) registers**: GITS_TYPER, GITS_IIDR, GITS_PIDR2 constant; GITS_CTLR.Quiescent is
//!   exactly "not Enabled"; GITS_BASER0/1's Type and Entry_Size never change, BASER2-7 read 0.

use alloc::vec::Vec;

use super::{Input, MAX_OPS};
use crate::devices::vits::fake::RecordingIts;
use crate::devices::vits::regs::*;
use crate::devices::vits::{Command, Vits, VitsConfig, CMD_SIZE};
use crate::hw::fake::FakeRam;
use crate::hw::{GuestRam, Ipa};
use crate::mmio::AccessWidth::{self, Double, Word};

/// Guest RAM: 256 KiB at 1 GiB.
pub const RAM: u64 = 0x4000_0000;
const RAM_SIZE: usize = 0x4_0000;
/// The VM's DeviceIDs, and another VM's.
pub const OWNED: [u32; 2] = [0x08, 0x10];
const FOREIGN: u32 = 0x18;

/// What one input reached, for the fixed-seed test's depth check.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Commands processed.
    pub commands: u64,
    /// Commands ignored as errors.
    pub errors: u64,
    /// Translations made (physical LPIs handed out).
    pub mapped: u64,
    /// Stalls.
    pub stalls: u64,
    /// Resets.
    pub resets: u64,
}

struct Harness {
    ram: FakeRam,
    its: Vits,
    phys: RecordingIts,
    vcpus: usize,
    cap: usize,
    tally: Tally,
}

const NAMED: [u64; 9] = [
    GITS_CTLR,
    GITS_IIDR,
    GITS_TYPER,
    GITS_CBASER,
    GITS_CWRITER,
    GITS_CREADR,
    GITS_BASER,
    GITS_BASER + 8,
    GITS_PIDR2,
];

impl Harness {
    fn new(input: &mut Input) -> Self {
        let b = input.u8();
        let vcpus = 1 + usize::from(b & 3);
        let cap = [2, 8, 32, 64][usize::from(b >> 2 & 3)];
        Self {
            ram: FakeRam::new(RAM, RAM_SIZE),
            its: Vits::new(&VitsConfig {
                devices: OWNED.to_vec(),
                vcpus,
                max_events: cap,
            }),
            phys: RecordingIts::new(&OWNED),
            vcpus,
            cap,
            tally: Tally::default(),
        }
    }

    fn read(&self, off: u64, w: AccessWidth) -> u64 {
        self.its.read(off, w)
    }

    fn write(&mut self, off: u64, w: AccessWidth, v: u64) {
        let before = self.its.stats().commands;
        self.its.write(off, w, v, &self.ram, &mut self.phys);
        let done = self.its.stats().commands - before;
        let queue = ((self.read(GITS_CBASER, Double) & 0xFF) + 1) * 4096;
        assert!(
            done <= queue / CMD_SIZE as u64,
            "(a) bounded work: {done} commands in one write"
        );
        self.check_queue();
    }

    fn offset(&mut self, input: &mut Input) -> u64 {
        match input.u8() & 3 {
            0 => u64::from(input.u16()),
            1 => NAMED[input.below(NAMED.len())] + 4,
            _ => NAMED[input.below(NAMED.len())],
        }
    }

    /// Enables the ITS again now and then, as a guest would after poking at it.
    fn reenable(&mut self, input: &mut Input) {
        if input.u8() & 3 != 0 {
            self.write(GITS_CTLR, Word, u64::from(CTLR_ENABLED));
        }
    }

    fn device(input: &mut Input) -> u32 {
        match input.u8() & 15 {
            0 => FOREIGN,
            1 => input.u32(),
            2 => 0x1_0000 | OWNED[0],
            n => OWNED[usize::from(n & 1)],
        }
    }

    /// Mostly below `edge`, sometimes at it, just under it, or anything.
    fn small(input: &mut Input, edge: u32) -> u32 {
        match input.u8() & 15 {
            0 => input.u32(),
            1 => edge,
            2 => edge.wrapping_sub(1),
            _ => u32::from(input.u8()) % edge.max(1),
        }
    }

    fn command(&mut self, input: &mut Input) -> Command {
        let device = Self::device(input);
        let event = Self::small(input, 32);
        let icid = Self::small(input, 256) as u16;
        let rdbase = u64::from(Self::small(input, self.vcpus as u32));
        let valid = input.u8() & 7 != 0;
        match input.u8() % 14 {
            0 | 1 => Command::Mapd {
                device,
                size: (Self::small(input, 16) & 0x1F) as u8,
                itt: match input.u8() & 3 {
                    0 => input.u64(),
                    1 => RAM + RAM_SIZE as u64 - 0x100 * u64::from(input.u8()),
                    _ => RAM + 0x100 * u64::from(input.u16() & 0x3FF),
                },
                valid,
            },
            2 => Command::Mapc {
                icid,
                rdbase,
                valid,
            },
            3 | 4 => Command::Mapti {
                device,
                event,
                intid: match input.u8() & 3 {
                    0 => input.u32(),
                    1 => [8191, 65536, 65535][input.below(3)],
                    _ => 8192 + u32::from(input.u8()),
                },
                icid,
            },
            5 => Command::Mapi {
                device,
                // Mostly LPIs; wrapping keeps the harness itself from overflowing.
                event: event.wrapping_add(8192),
                icid,
            },
            6 => Command::Movi {
                device,
                event,
                icid,
            },
            7 => Command::Int { device, event },
            8 => Command::Clear { device, event },
            9 => Command::Inv { device, event },
            10 => Command::Discard { device, event },
            11 => Command::Invall { icid },
            12 => match input.u8() & 3 {
                0 => Command::Movall {
                    rdbase1: rdbase,
                    rdbase2: u64::from(Self::small(input, self.vcpus as u32)),
                },
                1 => Command::Unknown(input.u8()),
                _ => Command::Sync { rdbase },
            },
            _ => Command::Int { device, event },
        }
    }

    /// What Linux sends first: MAPC (and INVALL) per vCPU, MAPD of each owned device.
    fn linux_setup(&mut self) {
        let mut cmds = Vec::new();
        for v in 0..self.vcpus {
            cmds.push(Command::Mapc {
                icid: v as u16,
                rdbase: v as u64,
                valid: true,
            });
            cmds.push(Command::Invall { icid: v as u16 });
        }
        for (i, &device) in OWNED.iter().enumerate() {
            cmds.push(Command::Mapd {
                device,
                size: 4,
                itt: RAM + 0x2_0000 + 0x1000 * i as u64,
                valid: true,
            });
        }
        self.put(&cmds, 0);
    }

    /// Writes `cmds` at GITS_CWRITER's slots and moves GITS_CWRITER past them (`retry`: with
    /// GITS_CWRITER.Retry).
    fn put(&mut self, cmds: &[Command], retry: u64) {
        let cbaser = self.read(GITS_CBASER, Double);
        let base = cbaser & CBASER_PA;
        let size = ((cbaser & 0xFF) + 1) * 4096;
        let mut w = self.read(GITS_CWRITER, Double) % size;
        for c in cmds {
            // Outside RAM the write fails, as a guest's would fault: the model then sees
            // whatever is there (or stalls).
            let _ = GuestRam::write(&self.ram, Ipa(base.wrapping_add(w)), &c.encode());
            w = (w + CMD_SIZE as u64) % size;
        }
        self.write(GITS_CWRITER, Double, w | retry);
    }

    /// Writes 1-8 commands at GITS_CWRITER's slots and moves GITS_CWRITER past them.
    fn send(&mut self, input: &mut Input) {
        let cmds: Vec<Command> = (0..1 + input.below(8))
            .map(|_| self.command(input))
            .collect();
        let retry = u64::from(input.u8() & 7 == 0);
        self.put(&cmds, retry);
    }

    fn plausible(&mut self, input: &mut Input) {
        match input.u8() & 7 {
            0 | 1 => {
                let base = match input.u8() & 7 {
                    0 => input.u64() & CBASER_PA,
                    1 => RAM + RAM_SIZE as u64 - 0x1000,
                    _ => RAM + 0x1000 * u64::from(input.u8() & 0x1F),
                };
                let size = u64::from(input.u8() & 3);
                let valid = if input.u8() & 7 != 0 { CBASER_VALID } else { 0 };
                self.write(GITS_CTLR, Word, 0);
                self.write(GITS_CBASER, Double, valid | base | size);
                self.write(GITS_CWRITER, Double, 0);
                self.write(GITS_CTLR, Word, u64::from(CTLR_ENABLED));
            }
            2 => {
                let v = u64::from(input.u8() & 3 != 0);
                self.write(GITS_CTLR, Word, v);
            }
            3 => {
                let n = u64::from(input.u8() & 7);
                self.write(GITS_BASER + 8 * n, Double, input.u64());
            }
            _ => {
                // CWRITER a few slots on, or anywhere.
                let r = self.read(GITS_CREADR, Double) & QUEUE_OFFSET;
                let v = if input.bool() {
                    r + 32 * u64::from(input.u8() & 15)
                } else {
                    input.u64()
                };
                self.write(GITS_CWRITER, Double, v);
            }
        }
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % 14 {
            0 | 1 => {
                let off = self.offset(input);
                let w = input.width();
                let _ = self.read(off, w);
            }
            2 | 3 => {
                let off = self.offset(input);
                let w = input.width();
                let v = input.u64();
                self.write(off, w, v);
                self.reenable(input);
            }
            4 | 5 => self.plausible(input),
            6..=9 => self.send(input),
            10 => {
                let cbaser = self.read(GITS_CBASER, Double);
                let at = (cbaser & CBASER_PA) + (self.read(GITS_CWRITER, Double) & 0xFFF);
                let n = 1 + input.below(64);
                let bytes: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                let _ = GuestRam::write(&self.ram, Ipa(at), &bytes);
            }
            11 if input.u8() & 3 != 0 => self.linux_setup(),
            11 => {
                self.its.reset(&mut self.phys);
                self.tally.resets += 1;
                assert_eq!(self.its.mapped_events(), 0, "reset left translations");
                assert!(self.phys.live.is_empty(), "reset left physical LPIs");
                assert!(self.phys.devices.is_empty(), "reset left physical devices");
            }
            // Physical failures, now and then; mostly more commands.
            12 => match input.u8() & 15 {
                0 => self.phys.fail = !self.phys.fail,
                1 => self.phys.lpi_limit = Some(input.below(4)),
                2 | 3 => {
                    self.phys.lpi_limit = None;
                    self.phys.fail = false;
                }
                _ => self.send(input),
            },
            _ => {
                // Physical LPIs as a guest's device would raise them: held ones, and others.
                let plpi = match input.u8() & 3 {
                    0 => input.u32(),
                    _ => self
                        .its
                        .physical_lpis()
                        .nth(input.below(self.cap))
                        .map_or(0, |e| e.plpi),
                };
                self.check_virtual(plpi);
            }
        }
        self.check_state();
    }

    /// (d)
    fn check_queue(&self) {
        let cbaser = self.read(GITS_CBASER, Double);
        let creadr = self.read(GITS_CREADR, Double);
        let cwriter = self.read(GITS_CWRITER, Double);
        let enabled = self.read(GITS_CTLR, Word) as u32 & CTLR_ENABLED != 0;
        let offset = creadr & QUEUE_OFFSET;
        assert_eq!(
            creadr & !(QUEUE_OFFSET | CREADR_STALLED),
            0,
            "(d) CREADR bits"
        );
        if cbaser & CBASER_VALID != 0 {
            let size = ((cbaser & 0xFF) + 1) * 4096;
            assert!(offset < size, "(d) CREADR {creadr:#x} outside the queue");
            if enabled && creadr & CREADR_STALLED == 0 {
                assert_eq!(
                    offset,
                    cwriter & QUEUE_OFFSET,
                    "(d) an enabled, unstalled ITS left commands unprocessed"
                );
            }
        }
    }

    fn check_virtual(&self, plpi: u32) {
        if let Some((vintid, vcpu)) = self.its.virtual_of(plpi) {
            assert!(
                (FIRST_LPI..1 << INTID_BITS).contains(&vintid),
                "(e) pLPI {plpi:#x} stands for vINTID {vintid}, not an LPI"
            );
            assert!(vcpu < self.vcpus, "(e) vCPU {vcpu} of {}", self.vcpus);
            assert!(self.phys.live.contains_key(&plpi), "(c) {plpi:#x} not live");
        }
    }

    /// (c), (e), (f)
    fn check_state(&mut self) {
        let held: Vec<_> = self.its.physical_lpis().collect();
        assert_eq!(
            held.len(),
            self.phys.live.len(),
            "(c) the model holds {} pLPIs, the physical ITS has {} live",
            held.len(),
            self.phys.live.len()
        );
        for e in &held {
            assert!(
                self.phys.handed.contains(&e.plpi),
                "(c) {e:?} never handed out"
            );
            let live = self.phys.live.get(&e.plpi).map(|l| (l.0, l.1));
            assert_eq!(
                live,
                Some((e.device, e.event)),
                "(c) {e:?} not live as such"
            );
            self.check_virtual(e.plpi);
        }
        assert!(self.its.mapped_events() <= self.cap, "(e) over the cap");
        assert!(self.its.mapped_devices() <= OWNED.len(), "(e) devices");
        for d in self.phys.devices.keys() {
            assert!(OWNED.contains(d), "(b) physical device {d:#x}");
            assert!(
                self.its.device_mapping(*d).is_some(),
                "(c) device {d:#x} leaked"
            );
        }
        assert_eq!(self.read(GITS_TYPER, Double), ITS_TYPER, "(f) GITS_TYPER");
        assert_eq!(self.read(GITS_IIDR, Word), u64::from(ITS_IIDR), "(f) IIDR");
        assert_eq!(
            self.read(GITS_PIDR2, Word),
            u64::from(ITS_PIDR2),
            "(f) PIDR2"
        );
        let ctlr = self.read(GITS_CTLR, Word) as u32;
        assert_eq!(
            ctlr & CTLR_QUIESCENT != 0,
            ctlr & CTLR_ENABLED == 0,
            "(f) Quiescent is not Enabled"
        );
        for (n, reset) in BASER_RESET.iter().enumerate() {
            let v = self.read(GITS_BASER + 8 * n as u64, Double);
            assert_eq!(v & BASER_RO, *reset, "(f) BASER{n} Type/Entry_Size");
        }
        for n in 2..GITS_BASER_COUNT {
            assert_eq!(self.read(GITS_BASER + 8 * n, Double), 0, "(f) BASER{n}");
        }
        let s = self.its.stats();
        self.tally.commands = s.commands;
        self.tally.errors = s.total_errors();
        self.tally.stalls = s.stalls;
    }
}

/// Runs one input and returns what it reached.
pub fn run_with(data: &[u8]) -> Tally {
    let mut input = Input::new(data);
    let mut h = Harness::new(&mut input);
    // Most inputs start from Linux's probe: a 4 KiB queue at RAM + 64 KiB, enabled.
    // and then its MAPCs and MAPDs.
    let start = input.u8();
    if start & 3 != 0 {
        h.write(GITS_CBASER, Double, CBASER_VALID | (RAM + 0x1_0000));
        h.write(GITS_CTLR, Word, u64::from(CTLR_ENABLED));
        if start & 12 != 12 {
            h.linux_setup();
        }
    }
    let mut total = Tally::default();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let resets = h.tally.resets;
        h.step(&mut input);
        // Stats restart at a reset: keep the running totals.
        if h.tally.resets != resets {
            total.commands += h.tally.commands;
            total.errors += h.tally.errors;
            total.stalls += h.tally.stalls;
            h.tally.commands = 0;
            h.tally.errors = 0;
            h.tally.stalls = 0;
        }
    }
    Tally {
        commands: total.commands + h.tally.commands,
        errors: total.errors + h.tally.errors,
        mapped: h.phys.handed.len() as u64,
        stalls: total.stalls + h.tally.stalls,
        resets: h.tally.resets,
    }
}

/// The fuzz target's entry point.
pub fn run(data: &[u8]) {
    run_with(data);
}

#[cfg(test)]
mod tests {
    use super::super::Rng;
    use super::*;
    use crate::devices::vits::PhysicalIts;

    #[test]
    fn random_inputs_keep_the_invariants() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut t = Tally::default();
        for _ in 0..2000 {
            let a = run_with(&rng.input(1000));
            t.commands += a.commands;
            t.errors += a.errors;
            t.mapped += a.mapped;
            t.stalls += a.stalls;
            t.resets += a.resets;
        }
        assert!(
            t.commands > 20_000
                && t.mapped > 800
                && t.errors > 5000
                && t.stalls > 100
                && t.resets > 500,
            "shallow: {t:?}"
        );
    }

    /// The first cargo-fuzz run's crash (an overflow in the harness's own MAPI EventID, not in
    /// the model): kept as an input.
    #[test]
    fn the_first_campaigns_crash_runs_clean() {
        run(&[
            0x3d, 0xfa, 0x4e, 0x1e, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x30, 0xff, 0xff, 0xbd,
            0xbd, 0xbd, 0xbd, 0xff, 0x21, 0x41, 0xff,
        ]);
    }

    #[test]
    #[should_panic(expected = "(b) owned DeviceIDs only")]
    fn a_foreign_device_is_caught() {
        let mut h = Harness::new(&mut Input::new(&[0]));
        let _ = h.phys.map_device(FOREIGN, 32);
    }

    #[test]
    #[should_panic(expected = "(c) pLPIs")]
    fn a_double_release_is_caught() {
        let mut h = Harness::new(&mut Input::new(&[0]));
        h.phys.map_device(OWNED[0], 32).unwrap();
        let plpi = h.phys.map_event(OWNED[0], 1, 0, 8192).unwrap();
        let ev = crate::devices::vits::PhysEvent {
            device: OWNED[0],
            event: 1,
            plpi,
        };
        h.phys.unmap_event(ev);
        h.phys.unmap_event(ev);
    }

    #[test]
    #[should_panic(expected = "(c) the model holds")]
    fn a_leaked_lpi_is_caught() {
        let mut h = Harness::new(&mut Input::new(&[0]));
        h.phys.map_device(OWNED[0], 32).unwrap();
        h.phys.map_event(OWNED[0], 1, 0, 8192).unwrap();
        h.check_state();
    }
}

//! A self-checking driver of the vSMMU for fuzzing (`smmu/fuzz/`, `cargo fuzz run -s none vsmmu`)
//! and for a deterministic randomised unit test. See `docs/fuzzing.md`.
//!
//! [`run`] plays a hostile guest: it interprets its input as a sequence of operations (register
//! reads and writes, writes into guest RAM, well-formed commands in the guest's command queue,
//! physical events, resets) and performs them on a [`Vsmmu`] wired to a [`FakeRam`] and a
//! [`CheckingSmmu`]. Every security invariant of the model is checked after every step; a
//! violation is a panic whose message names the invariant:
//!
//! - **(a)** no panic, and each call does bounded work: guest memory accesses, physical STE
//!   writes and physical commands per call are below [`Bounds`] (an unbounded loop would also
//!   be a libFuzzer timeout);
//! - **(b)** `write_ste`/`make_ste` only for the VM's physical StreamIDs (also checked for
//!   [`Vsmmu::reset`], and against [`CheckingSmmu::written`], every psid ever written);
//! - **(c)** every physical STE is abort, invalid, stage-2 only or nested, never bypass or
//!   stage-1 only; with stage 2 enabled its stage-2 fields are exactly the VM's; a nested STE
//!   has S1CDMax 0;
//! - **(d)** physical commands are only TLBI_NH_ALL/ASID/VA/VAA with the VM's VMID (ranges only
//!   when the physical SMMU has RIL), CFGI_CD/CFGI_CD_ALL/CFGI_STE with an owned psid, and
//!   CMD_SYNC without an MSI write (a forwarded MSI would be a guest-chosen physical write);
//! - **(e)** guest memory is reached only through [`GuestMemory`]; [`FakeRam`] bounds-checks
//!   every access and fails those outside RAM, which the model must survive;
//! - **(f)** an event offered to the guest carries the guest StreamID of the physical stream
//!   it came from, which must be the VM's, and no stall (Stall = 0, STAG = 0: the guest's SMMU
//!   has none); an event its budget suppressed is never offered;
//! - **(g)** break-before-make: [`PhysicalSmmu::make_ste`] only for a stream
//!   [`PhysicalSmmu::write_ste`] broke, and only after a CMD_SYNC queued after the break's
//!   CMD_CFGI_STE was waited for successfully;
//! - **(h)** the VM's share of the physical queue: at most [`CheckingSmmu::window_bound`]
//!   commands in one submission, a merge window (the per-trap budget: `tlbi_per_trap` TLBIs, a
//!   TLBI_NH_ALL, a CMD_CFGI_STE and a CMD_CFGI_CD per stream, and the full invalidation after
//!   an error), never more than the outstanding budget plus one window queued and not known
//!   complete, and per call at most one physical STE write per stream (per 32-bit half of a
//!   64-bit write);
//! - **(i)** a guest CMD_SYNC is made visible (CONS past it, its MSI) only once a physical
//!   CMD_SYNC covering it was waited for successfully: never after a failed wait, whose guest
//!   CMD_SYNC gets CERROR_ABT instead.
//!
//! Besides these, the model's record of the physical STEs ([`Vsmmu::physical_stes`]) must match
//! what was really written, and a reset must leave every stream at stage 2 only (GBPA's reset
//! value) with the VM's stage-1 TLB entries invalidated.

use super::{
    Budget, Cover, EventFate, Forward, GuestMemError, GuestMemory, Irqs, Outstanding, PhysicalSmmu,
    StreamMap, Vsmmu, VsmmuConfig, CMDQS, EVENTQS, MAX_ROUNDS,
};
use crate::bits;
use crate::cmd::{Command, Sync, SyncCs, TlbiAddr};
use crate::driver::{DriverError, SteBreak, SteWrite, SyncTicket};
use crate::event::{Event, EventClass, EventKind};
use crate::regs;
use crate::ste::{S2Config, Ste, StreamConfig};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

/// Guest RAM: [`RAM_SIZE`] bytes at this IPA.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Size of the fake guest RAM (256 KiB).
pub const RAM_SIZE: usize = 256 << 10;
/// The VM's VMID.
pub const VMID: u16 = 5;
/// Operations interpreted from one input at most.
pub const MAX_OPS: usize = 1024;

/// The VM's stage 2, as every physical STE with stage 2 enabled must carry it.
pub fn s2_config() -> S2Config {
    S2Config {
        vmid: VMID,
        root_pa: 0x8_1234_5000,
        t0sz: 24,
        sl0: 1,
        ps: 4,
        affd: false,
    }
}

/// The VM's StreamIDs: two with vsid == psid, one with vsid != psid whose vsid (2) is *not*
/// an owned psid, so a model that forwards a guest StreamID untranslated is caught by (b)/(d).
pub const STREAMS: [StreamMap; 3] = [
    StreamMap { vsid: 1, psid: 1 },
    StreamMap { vsid: 8, psid: 8 },
    StreamMap {
        vsid: 2,
        psid: 0x20,
    },
];

/// Budgets small enough that the fuzzer runs into every one of them.
pub fn tight_budget() -> Budget {
    Budget {
        tlbi_per_trap: 3,
        outstanding: 12,
        ste_burst: 2,
        ste_period_ns: 1_000,
        sync_burst: 2,
        sync_period_ns: 1_000,
    }
}

/// The configuration selected by the first input byte: bit 0 physical RIL, bits [2:1] SIDSIZE
/// (6, 8, 16 or 5), bits [4:3] OAS (40, 44, 48 or 32 bits), bit 5 two streams instead of three,
/// bit 6 [`tight_budget`] instead of the default one (bit 7 is the clock, [`CheckingSmmu`]).
pub fn config(sel: u8) -> VsmmuConfig {
    let n = if sel & 0x20 != 0 { 2 } else { 3 };
    VsmmuConfig {
        name: String::from("fuzz-vm"),
        streams: STREAMS[..n].to_vec(),
        s2: s2_config(),
        sid_bits: [6, 8, 16, 5][usize::from(sel >> 1 & 3)],
        oas_bits: [40, 44, 48, 32][usize::from(sel >> 3 & 3)],
        phys_idr5: 0x70 | 5,
        phys_ril: sel & 1 != 0,
        budget: if sel & 0x40 != 0 {
            tight_budget()
        } else {
            Budget::default()
        },
    }
}

/// Bounds-checked guest RAM that counts the accesses made to it.
#[derive(Debug)]
pub struct FakeRam {
    bytes: Vec<u8>,
    /// Accesses (reads and writes, failed or not) since the counter was last cleared.
    pub accesses: Cell<u64>,
}

impl Default for FakeRam {
    fn default() -> Self {
        Self {
            bytes: vec![0; RAM_SIZE],
            accesses: Cell::new(0),
        }
    }
}

impl FakeRam {
    fn range(ipa: u64, len: usize) -> Result<core::ops::Range<usize>, GuestMemError> {
        let err = GuestMemError {
            ipa,
            len: len as u64,
        };
        let off = ipa.checked_sub(RAM_BASE).ok_or(err)?;
        let end = off.checked_add(len as u64).ok_or(err)?;
        if end > RAM_SIZE as u64 {
            return Err(err);
        }
        Ok(off as usize..end as usize)
    }

    /// Writes as the guest's CPU does (not counted); the part outside RAM is dropped.
    pub fn poke(&mut self, ipa: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Ok(r) = Self::range(ipa.wrapping_add(i as u64), 1) {
                self.bytes[r.start] = *b;
            }
        }
    }

    /// Reads a doubleword as the guest's CPU does (not counted); 0 outside RAM.
    pub fn peek_u64(&self, ipa: u64) -> u64 {
        Self::range(ipa, 8).map_or(0, |r| {
            let mut a = [0; 8];
            a.copy_from_slice(&self.bytes[r]);
            u64::from_le_bytes(a)
        })
    }
}

impl GuestMemory for FakeRam {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        self.accesses.set(self.accesses.get() + 1);
        buf.copy_from_slice(&self.bytes[Self::range(ipa, buf.len())?]);
        Ok(())
    }

    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        self.accesses.set(self.accesses.get() + 1);
        let r = Self::range(ipa, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}

/// A physical SMMU that checks invariants (b), (c), (d), (g) and (h) on every call and keeps
/// the reference shadow of the physical stream table. Its stream table follows the driver's
/// update rules ([`crate::driver::Smmu::write_ste`]); its clock moves only when the model
/// waits for it or the input says so.
#[derive(Debug)]
pub struct CheckingSmmu {
    owned: Vec<u32>,
    s2: S2Config,
    ril: bool,
    budget: Budget,
    /// What the stream table holds (an aborting word 0 between break and make).
    table: BTreeMap<u32, Ste>,
    /// Streams broken and not made yet: the sequence number of the first CMD_SYNC queued after
    /// their CMD_CFGI_STE, once queued.
    breaks: BTreeMap<u32, Option<u64>>,
    /// The highest CMD_SYNC waited for successfully.
    ok_seq: Cell<u64>,
    /// Waits that failed.
    pub failed_waits: Cell<u64>,
    /// The highest CMD_SYNC whose wait failed: what it covered no longer counts as
    /// outstanding (the model gives up on it too), nor as complete.
    given_up: Cell<u64>,
    /// Commands of the last submission.
    window: u64,
    /// Entries (commands and CMD_SYNCs) queued in all, and as of each CMD_SYNC.
    entries: u64,
    at_sync: BTreeMap<u64, u64>,
    /// The clock, `None` for a physical SMMU without one.
    clock: Cell<Option<u64>>,
    /// The outstanding check (h) is off (a reset settles what earlier traps left).
    pub relaxed: bool,
    /// The last STE written for each StreamID (the reference shadow).
    pub stes: BTreeMap<u32, Ste>,
    /// Every StreamID ever written.
    pub written: BTreeSet<u32>,
    /// Every command submitted, in order, since the last [`CheckingSmmu::take_commands`].
    pub commands: Vec<Command>,
    /// Physical CMD_SYNCs (submit_sync calls) since the counter was last cleared.
    pub syncs: u64,
    /// STE writes since the counter was last cleared.
    pub ste_calls: u64,
    /// When set, every call fails (after taking effect, like a CMD_SYNC timeout).
    pub fail: bool,
    /// STEs written, by Config (index 0-7) when valid, index 8 when invalid.
    pub ste_configs: [u64; 9],
    /// Commands submitted in all.
    pub total_commands: u64,
    /// Physical CMD_SYNCs in all (the tickets' sequence numbers).
    pub total_syncs: u64,
}

impl CheckingSmmu {
    /// A physical SMMU for the VM `cfg`.
    pub fn new(cfg: &VsmmuConfig) -> Self {
        Self {
            owned: cfg.streams.iter().map(|s| s.psid).collect(),
            s2: cfg.s2,
            ril: cfg.phys_ril,
            budget: cfg.budget,
            table: BTreeMap::new(),
            breaks: BTreeMap::new(),
            ok_seq: Cell::new(0),
            failed_waits: Cell::new(0),
            given_up: Cell::new(0),
            window: 0,
            entries: 0,
            at_sync: BTreeMap::new(),
            clock: Cell::new(Some(1_000_000)),
            relaxed: false,
            stes: BTreeMap::new(),
            written: BTreeSet::new(),
            commands: Vec::new(),
            syncs: 0,
            ste_calls: 0,
            fail: false,
            ste_configs: [0; 9],
            total_commands: 0,
            total_syncs: 0,
        }
    }

    /// Commands one window may hold at most (invariant (h)).
    pub fn window_bound(&self) -> u64 {
        let n = self.owned.len() as u64;
        u64::from(self.budget.tlbi_per_trap) + 1 + 3 * n + 1
    }

    /// Takes the clock away (budgets by time off) or gives it back.
    pub fn set_clock(&self, on: bool) {
        self.clock
            .set(on.then(|| self.clock.get().unwrap_or(1_000_000)));
    }

    /// Lets `ns` pass.
    pub fn advance_clock(&self, ns: u64) {
        if let Some(t) = self.clock.get() {
            self.clock.set(Some(t.saturating_add(ns)));
        }
    }

    /// The highest CMD_SYNC waited for successfully (invariant (i)).
    pub fn ok_seq(&self) -> u64 {
        self.ok_seq.get()
    }

    /// Entries queued and not covered by a CMD_SYNC waited for successfully.
    fn outstanding(&self) -> u64 {
        let done = self
            .at_sync
            .range(..=self.ok_seq.get().max(self.given_up.get()))
            .next_back()
            .map_or(0, |(_, &e)| e);
        self.entries.saturating_sub(done)
    }

    /// Invariant (h) for `cmds` queued now.
    fn check_queue(&mut self, cmds: &[Command], sync: bool) {
        for c in cmds {
            if let Command::CfgiSte { sid, .. } = c {
                if let Some(b) = self.breaks.get_mut(sid) {
                    // The first CMD_SYNC from now on orders the break.
                    b.get_or_insert(self.total_syncs + 1);
                }
            }
        }
        // One submission is one merge window (what accumulates over several without a
        // CMD_SYNC is bounded by the outstanding check below).
        self.window = cmds.len() as u64;
        let bound = self.window_bound();
        if self.window > bound {
            panic!(
                "invariant (h) violated: {} physical commands in one submission (bound {bound}); \
                 these: {cmds:?}",
                self.window
            );
        }
        self.entries += cmds.len() as u64 + u64::from(sync);
        let cap = u64::from(self.budget.outstanding) + bound + self.owned.len() as u64 + 2;
        if !self.relaxed && self.outstanding() > cap {
            panic!(
                "invariant (h) violated: {} physical entries of the VM outstanding (budget {}, \
                 bound with one window {cap})",
                self.outstanding(),
                self.budget.outstanding
            );
        }
    }

    fn owns(&self, psid: u32) -> bool {
        self.owned.contains(&psid)
    }

    fn result(&self) -> Result<(), DriverError> {
        if self.fail {
            Err(DriverError::Timeout("injected by the fuzz harness"))
        } else {
            Ok(())
        }
    }

    /// Invariant (c) for `ste` written at `sid`.
    pub fn check_ste(&self, sid: u32, ste: &Ste) {
        if !ste.v() {
            return;
        }
        let raw = bits::get(ste.0[0], 3, 1);
        let ok = match raw {
            0b000 => true,
            0b110 | 0b111 => {
                let want = Ste::stage2(self.s2);
                // S2PTW (dword 2 bit 54) is what nested adds to the stage-2 fields.
                let dw2 = ste.0[2] & !(1 << 54);
                if dw2 != want.0[2] || ste.0[3] != want.0[3] || ste.s2_config() != self.s2 {
                    panic!(
                        "invariant (c) violated: physical STE of StreamID {sid:#x} has stage 2 \
                         enabled with stage-2 fields {:#018x} {:#018x} ({:?}), not the VM's \
                         {:#018x} {:#018x} ({:?}) (dword 2 without S2PTW); STE {:#018x?}",
                        dw2,
                        ste.0[3],
                        ste.s2_config(),
                        want.0[2],
                        want.0[3],
                        self.s2,
                        ste.0
                    );
                }
                if raw == 0b111 && ste.s1cdmax() != 0 {
                    panic!(
                        "invariant (c) violated: nested physical STE of StreamID {sid:#x} has \
                         S1CDMax {} (must be 0); STE {:#018x?}",
                        ste.s1cdmax(),
                        ste.0
                    );
                }
                true
            }
            _ => false,
        };
        if !ok {
            let what = match StreamConfig::from_bits(raw as u8) {
                StreamConfig::Bypass => "bypass",
                StreamConfig::S1Translate => "stage-1 only (stage 2 bypassed)",
                _ => "a reserved Config",
            };
            panic!(
                "invariant (c) violated: physical STE of StreamID {sid:#x} is valid with Config \
                 {raw:#05b} ({what}); STE {:#018x?}",
                ste.0
            );
        }
    }

    /// Invariant (d) for one physical command.
    pub fn check_command(&self, c: &Command) {
        let vmid = self.s2.vmid;
        let bad_vmid = |v: u16| {
            if v != vmid {
                panic!(
                    "invariant (d) violated: physical {c:?} carries VMID {v}, not the VM's {vmid}"
                );
            }
        };
        let bad_sid = |s: u32| {
            if !self.owns(s) {
                panic!(
                    "invariant (d) violated: physical {c:?} names StreamID {s:#x}, not one of \
                     the VM's psids {:#x?}",
                    self.owned
                );
            }
        };
        let range = |a: &TlbiAddr| {
            // TG and TTL are RES0 without RIL too, but a non-range TLBI carrying them is
            // still a single-address invalidation; only NUM/SCALE make it a range.
            if !self.ril && (a.num != 0 || a.scale != 0) {
                panic!(
                    "invariant (d) violated: range invalidation {c:?} sent to a physical SMMU \
                     without RIL"
                );
            }
        };
        match c {
            Command::TlbiNhAll { vmid } | Command::TlbiNhAsid { vmid, .. } => bad_vmid(*vmid),
            Command::TlbiNhVa { vmid, addr, .. } | Command::TlbiNhVaa { vmid, addr } => {
                bad_vmid(*vmid);
                range(addr);
            }
            Command::CfgiCd { sid, .. }
            | Command::CfgiCdAll { sid }
            | Command::CfgiSte { sid, .. } => bad_sid(*sid),
            Command::Sync(s) => {
                if s.cs == SyncCs::Irq {
                    panic!(
                        "invariant (d) violated: physical CMD_SYNC with an MSI write of {:#x} to \
                         {:#x} (a guest-chosen physical write)",
                        s.msidata, s.msiaddr
                    );
                }
            }
            _ => panic!(
                "invariant (d) violated: physical command {c:?} (opcode {:#04x}) is not one a \
                 guest may cause",
                c.opcode()
            ),
        }
    }

    /// Returns and forgets the commands submitted so far.
    pub fn take_commands(&mut self) -> Vec<Command> {
        core::mem::take(&mut self.commands)
    }
}

impl CheckingSmmu {
    fn owned_or_panic(&self, sid: u32, what: &str, ste: &Ste) {
        if !self.owns(sid) {
            panic!(
                "invariant (b) violated: {what} for StreamID {sid:#x}, not one of the VM's \
                 psids {:#x?}; STE {:#018x?}",
                self.owned, ste.0
            );
        }
    }
}

impl PhysicalSmmu for CheckingSmmu {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        self.owned_or_panic(sid, "write_ste", &ste);
        self.check_ste(sid, &ste);
        // A write over a break supersedes its make: the table aborts, from which the driver
        // writes without a break. The model must then not make it any more.
        self.breaks.remove(&sid);
        self.stes.insert(sid, ste);
        self.written.insert(sid);
        let cur = self.table.get(&sid).copied().unwrap_or(Ste::abort());
        if cur == ste {
            return Ok(SteWrite::Unchanged);
        }
        self.ste_calls += 1;
        self.ste_configs[if ste.v() {
            bits::get(ste.0[0], 3, 1) as usize
        } else {
            8
        }] += 1;
        let cfgi = Command::CfgiSte { sid, leaf: true };
        let differ = (0..8).filter(|&i| cur.0[i] != ste.0[i]).count();
        let live = cur.v() && cur.config().bits() != 0;
        if live && differ > 1 && !(ste.v() && ste.config().bits() == 0) {
            self.table.insert(sid, Ste::abort());
            self.breaks.insert(sid, None);
            return Ok(SteWrite::Broken(SteBreak { sid, ste, cfgi }));
        }
        self.table.insert(sid, ste);
        Ok(SteWrite::Written(cfgi))
    }

    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        self.owned_or_panic(b.sid, "make_ste", &b.ste);
        self.check_ste(b.sid, &b.ste);
        match self.breaks.remove(&b.sid) {
            None => panic!(
                "invariant (g) violated: make_ste for StreamID {:#x}, which is not broken",
                b.sid
            ),
            Some(at) if at.is_none_or(|s| s > self.ok_seq.get()) => panic!(
                "invariant (g) violated: make_ste for StreamID {:#x} before a CMD_SYNC after its \
                 break's CMD_CFGI_STE was waited for (that CMD_SYNC: {at:?}, waited up to {})",
                b.sid,
                self.ok_seq.get()
            ),
            Some(_) => {}
        }
        self.stes.insert(b.sid, b.ste);
        self.table.insert(b.sid, b.ste);
        Ok(b.cfgi)
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        for c in cmds {
            self.check_command(c);
        }
        self.check_queue(cmds, false);
        self.commands.extend_from_slice(cmds);
        self.total_commands += cmds.len() as u64;
        self.result()
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        for c in cmds {
            self.check_command(c);
        }
        self.check_queue(cmds, true);
        self.commands.extend_from_slice(cmds);
        self.total_commands += cmds.len() as u64;
        self.syncs += 1;
        self.total_syncs += 1;
        self.at_sync.insert(self.total_syncs, self.entries);
        if self.fail {
            // No ticket to wait for: given up on, as the model does.
            self.given_up.set(self.total_syncs);
        }
        self.result().map(|()| SyncTicket::at(self.total_syncs))
    }

    fn publish(&self) {}

    fn wait(&self, t: SyncTicket) -> Result<(), DriverError> {
        if self.fail {
            self.failed_waits.set(self.failed_waits.get() + 1);
            self.given_up.set(self.given_up.get().max(t.seq()));
            return Err(DriverError::Timeout("injected by the fuzz harness"));
        }
        self.ok_seq.set(self.ok_seq.get().max(t.seq()));
        Ok(())
    }

    fn now(&self) -> Option<u64> {
        self.clock.get()
    }

    fn wait_until(&self, deadline: u64) {
        if let Some(t) = self.clock.get() {
            self.clock.set(Some(t.max(deadline)));
        }
    }
}

/// Work one call may do at most (invariants (a) and (h)). A command queue holds at most
/// 2^[`CMDQS`] commands; each is read once (twice when the trap paused before it), a CMD_SYNC
/// may reshadow every stream (an L1 descriptor and an STE read) and writes an MSI; errors add
/// an MSI write. Each guest command forwards at most one physical command; each reshadow of a
/// stream the guest named, one CMD_CFGI_STE; a failed physical CMD_SYNC, a full invalidation
/// (TLBI_NH_ALL and a CMD_CFGI_STE per stream). Physical STE writes: one per stream per call,
/// however many invalidations (the guest's STEs do not move during a call). A 64-bit write to
/// a pair of 32-bit registers is two writes.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Guest memory accesses.
    pub mem: u64,
    /// Physical STE writes.
    pub stes: u64,
    /// Physical commands.
    pub cmds: u64,
}

impl Bounds {
    /// The bounds of one register write for a VM of `streams` StreamIDs.
    pub fn write(streams: usize) -> Self {
        let q = 1u64 << CMDQS;
        let n = streams as u64;
        Self {
            mem: 2 * ((q + 2) * (2 * n + 2) + 4),
            stes: 2 * n,
            cmds: 2 * (2 * q + 4 * n + 8),
        }
    }
}

/// The input, read front to back; past its end every read is 0.
#[derive(Debug)]
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// Mostly zero (3 in 4), else any value.
    fn rare_u8(&mut self) -> u8 {
        if self.u8() & 3 == 0 {
            self.u8()
        } else {
            0
        }
    }
}

/// Register offsets the guest may touch: every named register, the high halves of the 64-bit
/// ones, and a few aliases and reserved words.
const OFFSETS: &[u64] = &[
    regs::SMMU_IDR0,
    regs::SMMU_IDR1,
    regs::SMMU_IDR2,
    regs::SMMU_IDR3,
    regs::SMMU_IDR4,
    regs::SMMU_IDR5,
    regs::SMMU_IIDR,
    regs::SMMU_AIDR,
    regs::SMMU_CR0,
    regs::SMMU_CR0ACK,
    regs::SMMU_CR1,
    regs::SMMU_CR2,
    regs::SMMU_STATUSR,
    regs::SMMU_GBPA,
    regs::SMMU_AGBPA,
    regs::SMMU_IRQ_CTRL,
    regs::SMMU_IRQ_CTRLACK,
    regs::SMMU_GERROR,
    regs::SMMU_GERRORN,
    regs::SMMU_GERROR_IRQ_CFG0,
    regs::SMMU_GERROR_IRQ_CFG0 + 4,
    regs::SMMU_GERROR_IRQ_CFG1,
    regs::SMMU_GERROR_IRQ_CFG2,
    regs::SMMU_STRTAB_BASE,
    regs::SMMU_STRTAB_BASE + 4,
    regs::SMMU_STRTAB_BASE_CFG,
    regs::SMMU_CMDQ_BASE,
    regs::SMMU_CMDQ_BASE + 4,
    regs::SMMU_CMDQ_PROD,
    regs::SMMU_CMDQ_CONS,
    regs::SMMU_EVENTQ_BASE,
    regs::SMMU_EVENTQ_BASE + 4,
    regs::SMMU_EVENTQ_PROD,
    regs::SMMU_EVENTQ_CONS,
    regs::SMMU_EVENTQ_PROD - regs::PAGE1,
    regs::SMMU_EVENTQ_CONS - regs::PAGE1,
    regs::SMMU_EVENTQ_IRQ_CFG0,
    regs::SMMU_EVENTQ_IRQ_CFG0 + 4,
    regs::SMMU_EVENTQ_IRQ_CFG1,
    regs::SMMU_EVENTQ_IRQ_CFG2,
    regs::SMMU_PRIQ_BASE,
    regs::SMMU_PRIQ_PROD,
    regs::SMMU_PRIQ_CONS,
    regs::SMMU_PRIQ_IRQ_CFG0,
    regs::SMMU_PRIQ_IRQ_CFG1,
    regs::SMMU_PRIQ_IRQ_CFG2,
    regs::SMMU_CMDQ_PROD + regs::PAGE1,
    0xfc,
    0x1_00fc,
];

/// Event types a physical SMMU reports.
const EVENT_KINDS: &[EventKind] = &[
    EventKind::FUut,
    EventKind::CBadStreamid,
    EventKind::FSteFetch,
    EventKind::CBadSte,
    EventKind::FBadAtsTreq,
    EventKind::FStreamDisabled,
    EventKind::FTranslForbidden,
    EventKind::CBadSubstreamid,
    EventKind::FCdFetch,
    EventKind::CBadCd,
    EventKind::FWalkEabt,
    EventKind::FTranslation,
    EventKind::FAddrSize,
    EventKind::FAccess,
    EventKind::FPermission,
    EventKind::FTlbConflict,
    EventKind::FCfgConflict,
    EventKind::EPageRequest,
    EventKind::FVmsFetch,
];

/// The vSMMU, its guest RAM and physical SMMU, and the checks.
#[derive(Debug)]
pub struct Harness {
    /// The model under test.
    pub v: Vsmmu,
    /// Guest RAM.
    pub ram: FakeRam,
    /// The checking physical SMMU.
    pub phys: CheckingSmmu,
    /// What the run reached.
    pub tally: Tally,
    bounds: Bounds,
    /// Writes started and left waiting for their physical CMD_SYNC, as other vCPUs' traps are
    /// while this one runs.
    parked: Vec<Outstanding>,
    /// The next CMDQ_PROD write is started and parked rather than carried out.
    park_next: bool,
}

/// Writes left waiting at once at most.
const MAX_PARKED: usize = 4;

/// What a run reached (to check that inputs get deep into the model).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    /// Guest commands consumed.
    pub commands: u64,
    /// Guest commands refused (CMDQ_ERR).
    pub command_errors: u64,
    /// Guest CMD_SYNCs completed.
    pub syncs: u64,
    /// Events written into the guest's event queue.
    pub guest_events: u64,
    /// Events offered to the guest but dropped.
    pub dropped_events: u64,
    /// Events kept by the hypervisor.
    pub hypervisor_events: u64,
    /// Resets.
    pub resets: u64,
    /// Writes left waiting (parked) while holding back what the guest sees.
    pub held_back: u64,
    /// Most guest memory accesses, STE writes and physical commands one call made.
    pub max_per_call: (u64, u64, u64),
    /// Events its budget suppressed.
    pub suppressed_events: u64,
    /// Rounds of wait and complete.
    pub rounds: u64,
    /// Guest CMD_SYNCs made visible after a physical one.
    pub visible_syncs: u64,
    /// Pauses on a budget, on the order of invalidations, and CERROR_ABT for a failed
    /// physical CMD_SYNC (the model's counters).
    pub budget_waits: u64,
    /// See `budget_waits`.
    pub order_waits: u64,
    /// See `budget_waits`.
    pub phys_sync_errors: u64,
    /// Break-before-make STE updates.
    pub ste_breaks: u64,
    /// Guest TLBIs and CMD_SYNCs merged away.
    pub merged: u64,
}

impl Tally {
    fn add_stats(&mut self, v: &Vsmmu) {
        let s = v.stats();
        self.commands += s.commands;
        self.command_errors += s.command_errors;
        self.syncs += s.syncs;
        self.budget_waits += s.budget_waits;
        self.order_waits += s.order_waits;
        self.phys_sync_errors += s.phys_sync_errors;
        self.ste_breaks += s.ste_breaks;
        self.merged += s.tlbi_merged + s.syncs_merged;
    }

    /// Adds another run's tally.
    pub fn add(&mut self, a: &Tally) {
        self.commands += a.commands;
        self.command_errors += a.command_errors;
        self.syncs += a.syncs;
        self.guest_events += a.guest_events;
        self.dropped_events += a.dropped_events;
        self.hypervisor_events += a.hypervisor_events;
        self.resets += a.resets;
        self.held_back += a.held_back;
        let (m, n) = (&mut self.max_per_call, a.max_per_call);
        *m = (m.0.max(n.0), m.1.max(n.1), m.2.max(n.2));
        self.suppressed_events += a.suppressed_events;
        self.rounds += a.rounds;
        self.visible_syncs += a.visible_syncs;
        self.budget_waits += a.budget_waits;
        self.order_waits += a.order_waits;
        self.phys_sync_errors += a.phys_sync_errors;
        self.ste_breaks += a.ste_breaks;
        self.merged += a.merged;
    }
}

impl Harness {
    /// A harness for the VM `cfg`, reset as the hypervisor does before the guest runs.
    pub fn new(cfg: VsmmuConfig) -> Self {
        let mut h = Self {
            phys: CheckingSmmu::new(&cfg),
            bounds: Bounds::write(cfg.streams.len()),
            v: Vsmmu::new(cfg),
            ram: FakeRam::default(),
            tally: Tally::default(),
            parked: Vec::new(),
            park_next: false,
        };
        h.reset();
        h
    }

    fn cfg(&self) -> &VsmmuConfig {
        self.v.config()
    }

    fn clear_counters(&mut self) {
        self.ram.accesses.set(0);
        self.phys.ste_calls = 0;
        self.phys.syncs = 0;
        self.phys.commands.clear();
    }

    /// Invariant (a) for the call just made, and the reference shadow.
    fn check_call(&mut self, what: core::fmt::Arguments<'_>, b: Bounds) {
        let (mem, stes, cmds) = (
            self.ram.accesses.get(),
            self.phys.ste_calls,
            self.phys.commands.len() as u64,
        );
        if mem > b.mem || stes > b.stes || cmds > b.cmds {
            panic!(
                "invariant (a) violated: {what} did unbounded work: {mem} guest memory accesses \
                 (bound {}), {stes} STE writes (bound {}), {cmds} physical commands (bound {})",
                b.mem, b.stes, b.cmds
            );
        }
        let m = &mut self.tally.max_per_call;
        *m = (m.0.max(mem), m.1.max(stes), m.2.max(cmds));
        self.check_shadow(what);
        // (i): every guest CMD_SYNC made visible was covered by a physical one waited for.
        for c in core::mem::take(&mut self.v.visible_syncs) {
            if let Cover::Seq(s) = c {
                if s > self.phys.ok_seq() {
                    panic!(
                        "invariant (i) violated: after {what}: a guest CMD_SYNC completed on \
                         physical CMD_SYNC {s}, but waits succeeded only up to {} ({} failed)",
                        self.phys.ok_seq(),
                        self.phys.failed_waits.get()
                    );
                }
                self.tally.visible_syncs += 1;
            }
        }
    }

    /// The model's record of the physical STEs matches what was written, and nothing outside
    /// the VM was ever written.
    fn check_shadow(&self, what: core::fmt::Arguments<'_>) {
        for (psid, ste) in self.v.physical_stes() {
            let Some(ste) = ste else { continue };
            if self.phys.breaks.contains_key(&psid) {
                // Between break and make the model already names the STE it will make.
                continue;
            }
            if self.phys.stes.get(&psid) != Some(&ste) {
                panic!(
                    "after {what}: the model believes physical STE {psid:#x} is {:#018x?}, but \
                     {:#018x?} was written",
                    ste.0,
                    self.phys.stes.get(&psid).map(|s| s.0)
                );
            }
        }
        if let Some(s) = self.phys.written.iter().find(|s| !self.phys.owns(**s)) {
            panic!("invariant (b) violated: StreamID {s:#x} was written at some point");
        }
    }

    /// [`Vsmmu::reset`], checked: the VM's streams are stage 2 only and the VM's stage-1 TLB
    /// entries invalidated, with a sync.
    pub fn reset(&mut self) {
        self.clear_counters();
        self.tally.add_stats(&self.v);
        self.tally.resets += 1;
        // It settles what earlier writes left queued, whatever the outstanding budget says.
        self.phys.relaxed = true;
        self.v.reset(&mut self.phys);
        self.phys.relaxed = false;
        let n = self.cfg().streams.len() as u64;
        let window = self.phys.window_bound();
        self.check_call(
            format_args!("reset"),
            Bounds {
                mem: 0,
                stes: n,
                cmds: window + 2 * n + 2,
            },
        );
        let want = Ste::stage2(self.cfg().s2);
        for s in &self.cfg().streams {
            if self.phys.stes.get(&s.psid) != Some(&want) {
                panic!(
                    "reset: physical STE {:#x} is {:#018x?}, not stage 2 only (GBPA's reset value)",
                    s.psid,
                    self.phys.stes.get(&s.psid).map(|s| s.0)
                );
            }
        }
        let cmds = self.phys.take_commands();
        if !cmds.contains(&Command::TlbiNhAll { vmid: VMID }) || self.phys.syncs == 0 {
            panic!("reset: the VM's stage-1 TLB entries were not invalidated and synced: {cmds:?}");
        }
    }

    /// Waits for and completes `o` round after round, as a vCPU does; it must be done within
    /// [`MAX_ROUNDS`] (invariant (a)).
    fn finish(&mut self, mut o: Outstanding, what: core::fmt::Arguments<'_>) -> Irqs {
        let mut irqs = o.irqs;
        for _ in 0..MAX_ROUNDS {
            if !o.pending() {
                o.publish(&self.phys);
                return irqs;
            }
            self.tally.rounds += 1;
            let waited = o.wait(&self.phys);
            o = self.v.complete(o, waited, &mut self.ram, &mut self.phys);
            irqs |= o.irqs;
        }
        if o.pending() {
            panic!("invariant (a) violated: {what} still pending after {MAX_ROUNDS} rounds: {o:?}");
        }
        irqs
    }

    /// A checked [`Vsmmu::write`].
    pub fn write(&mut self, off: u64, size: u8, value: u64) -> Irqs {
        self.clear_counters();
        let park = self.park_next && off == regs::SMMU_CMDQ_PROD && self.parked.len() < MAX_PARKED;
        let o = self
            .v
            .write_start(off, size, value, &mut self.ram, &mut self.phys);
        let irqs = if park {
            self.park_next = false;
            self.parked.push(o);
            self.tally.held_back += u64::from(o.upto.is_some());
            o.irqs
        } else {
            self.finish(o, format_args!("write of {value:#x} to {off:#x}"))
        };
        let b = self.bounds;
        self.check_call(
            format_args!("write of {value:#x} to {off:#x} ({size} bytes)"),
            b,
        );
        irqs
    }

    /// Finishes parked write `i` (modulo their number): waits and [`Vsmmu::complete`]s it,
    /// which also makes visible what parked writes before it in the queue left waiting.
    pub fn finish_parked(&mut self, i: usize) {
        if self.parked.is_empty() {
            return;
        }
        let o = self.parked.remove(i % self.parked.len());
        self.clear_counters();
        self.finish(o, format_args!("a parked write"));
        // It may go on with what it paused at: a write's work, and the completions of the
        // parked writes before it.
        let b = Bounds {
            mem: self.bounds.mem * (self.parked.len() as u64 + 2),
            ..self.bounds
        };
        self.check_call(format_args!("the completion of a parked write"), b);
    }

    /// A [`Vsmmu::read`] (it reaches neither guest memory nor the physical SMMU).
    pub fn read(&mut self, off: u64, size: u8) -> u64 {
        self.v.read(off, size)
    }

    /// A checked [`Vsmmu::forward_event`].
    pub fn forward(&mut self, e: &Event, fate: EventFate) -> (Forward, Irqs) {
        self.clear_counters();
        let (f, irqs) = self.v.forward_event(e, fate, &mut self.ram);
        self.check_call(
            format_args!("forward_event of {e:?}"),
            Bounds {
                mem: 3,
                stes: 0,
                cmds: 0,
            },
        );
        let owner = self
            .cfg()
            .streams
            .iter()
            .find(|s| s.psid == e.stream_id)
            .map(|s| s.vsid);
        match f {
            Forward::Guest(_) => self.tally.guest_events += 1,
            Forward::Dropped(_) => self.tally.dropped_events += 1,
            Forward::Hypervisor => self.tally.hypervisor_events += 1,
            Forward::Suppressed => self.tally.suppressed_events += 1,
        }
        if fate == EventFate::Suppressed && !matches!(f, Forward::Suppressed | Forward::Hypervisor)
        {
            panic!("invariant (f) violated: an event its budget suppressed was offered: {f:?}");
        }
        if let Forward::Guest(g) | Forward::Dropped(g) = f {
            if g.stall || g.stag != 0 {
                panic!(
                    "invariant (f) violated: an event offered to the guest is stalled (Stall \
                     {}, STAG {:#x}); the guest's SMMU has no stalls: {g:?}",
                    g.stall, g.stag
                );
            }
        }
        match (f, owner) {
            (Forward::Hypervisor | Forward::Suppressed, _) => {}
            (Forward::Guest(g) | Forward::Dropped(g), Some(vsid)) if g.stream_id == vsid => {}
            (Forward::Guest(g) | Forward::Dropped(g), _) => panic!(
                "invariant (f) violated: physical event of StreamID {:#x} offered to the guest \
                 with StreamID {:#x} (the VM's: {:?}); event {e:?}, forwarded {g:?}",
                e.stream_id,
                g.stream_id,
                self.cfg().streams
            ),
        }
        (f, irqs)
    }

    fn r64(&mut self, off: u64) -> u64 {
        self.read(off, 8)
    }

    fn r32(&mut self, off: u64) -> u32 {
        self.read(off, 4) as u32
    }

    /// A StreamID the guest names: mostly its own, sometimes a psid, sometimes anything.
    fn sid(&self, inp: &mut Input) -> u32 {
        let s = &self.cfg().streams;
        let i = usize::from(inp.u8());
        match inp.u8() % 8 {
            0..=3 => s[i % s.len()].vsid,
            4 => s[i % s.len()].psid,
            5 | 6 => (i % 64) as u32,
            _ => inp.u32(),
        }
    }

    /// An address for guest structures: mostly in RAM (aligned to `align`), sometimes at its
    /// edge, sometimes anywhere.
    fn addr(&self, inp: &mut Input, align: u64) -> u64 {
        match inp.u8() {
            0..=199 => RAM_BASE + ((u64::from(inp.u32()) % RAM_SIZE as u64) & !(align - 1)),
            200..=229 => (RAM_BASE + RAM_SIZE as u64 - u64::from(inp.u8()) * align) & !(align - 1),
            230..=239 => RAM_BASE - align * u64::from(inp.u8() % 4 + 1),
            _ => inp.u64() & !(align - 1),
        }
    }

    /// Where the guest's STE for `vsid` is, by the stream table registers and RAM.
    fn ste_addr(&mut self, vsid: u32) -> u64 {
        let base = self.r64(regs::SMMU_STRTAB_BASE) & bits::mask(51, 6);
        let cfg = u64::from(self.r32(regs::SMMU_STRTAB_BASE_CFG));
        let split = bits::get(cfg, 10, 6) as u32;
        if bits::get(cfg, 17, 16) == 1 && matches!(split, 6 | 8 | 10) {
            let l1 = self
                .ram
                .peek_u64(base.wrapping_add(u64::from(vsid >> split) * 8));
            (l1 & bits::mask(51, 6)).wrapping_add(u64::from(vsid & ((1 << split) - 1)) * 64)
        } else {
            base.wrapping_add(u64::from(vsid) * 64)
        }
    }

    /// The L1 descriptor slot of `vsid` and SPLIT (8 when the registers do not say).
    fn l1_addr(&mut self, vsid: u32) -> (u64, u32) {
        let base = self.r64(regs::SMMU_STRTAB_BASE) & bits::mask(51, 6);
        let cfg = u64::from(self.r32(regs::SMMU_STRTAB_BASE_CFG));
        let split = match bits::get(cfg, 10, 6) as u32 {
            s @ (6 | 8 | 10) => s,
            _ => 8,
        };
        (base.wrapping_add(u64::from(vsid >> split) * 8), split)
    }

    /// (base, LOG2SIZE, PROD) of the guest's command queue.
    fn cmdq(&mut self) -> (u64, u8, u32) {
        let b = self.r64(regs::SMMU_CMDQ_BASE);
        let log2 = ((b & 0x1f) as u8).min(CMDQS);
        (b & bits::mask(51, 5), log2, self.r32(regs::SMMU_CMDQ_PROD))
    }

    /// (base, LOG2SIZE, PROD) of the guest's event queue.
    fn eventq(&mut self) -> (u64, u8, u32) {
        let b = self.r64(regs::SMMU_EVENTQ_BASE);
        let log2 = ((b & 0x1f) as u8).min(EVENTQS);
        (
            b & bits::mask(51, 5),
            log2,
            self.r32(regs::SMMU_EVENTQ_PROD),
        )
    }

    /// A guest STE: mostly valid, Config biased to stage-1 translate, bypass and abort, its
    /// stage-2 and other fields whatever the guest likes.
    fn guest_ste(&self, inp: &mut Input) -> Ste {
        let mut s = Ste::default();
        let v = inp.u8() < 224;
        let config = [5u64, 5, 5, 5, 4, 4, 0, 6, 7, 1, 2, 3][usize::from(inp.u8() % 12)];
        let ptr = self.addr(inp, 64) & bits::mask(51, 6);
        s.0[0] = u64::from(v)
            | config << 1
            | u64::from(inp.rare_u8() & 3) << 4
            | ptr
            | u64::from(inp.rare_u8()) << 59;
        s.0[1] = if inp.bool() {
            u64::from(inp.u8())
        } else {
            inp.u64()
        };
        if inp.u8() < 192 {
            s.0[1] &= !(3 << 30);
        }
        for dw in 2..8 {
            if inp.u8() & 3 == 0 {
                s.0[dw] = inp.u64();
            }
        }
        s
    }

    /// A command with random fields, its StreamIDs mostly the guest's own.
    fn command(&self, inp: &mut Input) -> [u8; 16] {
        let sel = inp.u8() % 28;
        let sid = self.sid(inp);
        let ssid = if inp.u8() & 3 == 0 {
            Some(inp.u32() & 0xf_ffff)
        } else {
            None
        };
        let vmid = if inp.bool() { VMID } else { inp.u16() };
        let asid = inp.u16();
        let addr = TlbiAddr {
            addr: inp.u64(),
            leaf: inp.bool(),
            ttl: inp.u8() & 3,
            tg: inp.rare_u8() & 3,
            num: inp.rare_u8() & 31,
            scale: inp.rare_u8() & 31,
        };
        let leaf = inp.bool();
        let cmd = match sel {
            0 => Command::PrefetchConfig { sid, ssid },
            1 => Command::PrefetchAddr {
                sid,
                ssid,
                addr: addr.addr,
                size: inp.u8(),
            },
            2 | 3 => Command::CfgiSte { sid, leaf },
            4 => Command::CfgiSteRange {
                sid,
                range: inp.u8() % 32,
            },
            5 => Command::CfgiAll,
            6 => Command::CfgiCd {
                sid,
                ssid: ssid.unwrap_or(0),
                leaf,
            },
            7 => Command::CfgiCdAll { sid },
            8 => Command::TlbiNhAll { vmid },
            9 => Command::TlbiNhAsid { vmid, asid },
            10 => Command::TlbiNhVa { vmid, asid, addr },
            11 => Command::TlbiNhVaa { vmid, addr },
            12 => Command::TlbiEl3All,
            13 => Command::TlbiEl3Va { addr },
            14 => Command::TlbiEl2All,
            15 => Command::TlbiEl2Asid { asid },
            16 => Command::TlbiEl2Va { asid, addr },
            17 => Command::TlbiEl2Vaa { addr },
            18 => Command::TlbiS12Vmall { vmid },
            19 => Command::TlbiS2Ipa { vmid, addr },
            20 => Command::TlbiNsnhAll,
            21 => Command::AtcInv {
                sid,
                ssid,
                global: leaf,
                addr: addr.addr,
                size: inp.u8(),
            },
            22 => Command::PriResp {
                sid,
                ssid,
                prgi: inp.u16(),
                resp: inp.u8() & 3,
            },
            23 => Command::Resume {
                sid,
                stag: inp.u16(),
                resp: inp.u8() & 3,
            },
            24 => Command::StallTerm { sid },
            25 | 26 => Command::Sync(Sync {
                cs: [SyncCs::None, SyncCs::Irq, SyncCs::Irq, SyncCs::Sev]
                    [usize::from(inp.u8() & 3)],
                msh: inp.u8() & 3,
                msiattr: inp.u8() & 15,
                msidata: inp.u32(),
                msiaddr: if inp.u8() < 16 { 0 } else { self.addr(inp, 4) },
            }),
            // Any 16 bytes: unknown opcodes and reserved encodings.
            _ => {
                let mut b = [0; 16];
                b[..8].copy_from_slice(&inp.u64().to_le_bytes());
                b[8..].copy_from_slice(&inp.u64().to_le_bytes());
                return b;
            }
        };
        cmd.to_bytes()
    }

    /// A physical event of mostly the VM's streams.
    fn event(&self, inp: &mut Input) -> Event {
        let k = inp.u8();
        let kind = if k < 240 {
            EVENT_KINDS[usize::from(k) % EVENT_KINDS.len()]
        } else {
            EventKind::from_id(inp.u8())
        };
        let s = &self.cfg().streams;
        let i = usize::from(inp.u8());
        let stream_id = match inp.u8() % 8 {
            0..=4 => s[i % s.len()].psid,
            5 => s[i % s.len()].vsid,
            6 => (i % 64) as u32,
            _ => inp.u32(),
        };
        let f = inp.u8();
        let mut e = Event::new(kind, stream_id);
        e.substream = if f & 1 != 0 { Some(inp.u32()) } else { None };
        e.stall = f & 2 != 0;
        e.pnu = f & 4 != 0;
        e.ind = f & 8 != 0;
        e.rnw = f & 16 != 0;
        e.nsipa = f & 32 != 0;
        e.s2 = f & 64 != 0;
        e.class = [
            EventClass::Cd,
            EventClass::Tt,
            EventClass::In,
            EventClass::Reserved,
        ][usize::from(inp.u8() & 3)];
        e.stag = inp.u16();
        e.input_addr = inp.u64();
        e.addr2 = inp.u64();
        e
    }

    /// A plausible value for a writable register (what a driver, buggy or not, would write).
    fn smart_write(&mut self, inp: &mut Input) {
        let sid_bits = self.cfg().sid_bits;
        match inp.u8() % 18 {
            0 | 1 => {
                let v = u64::from(inp.u8() & 0xd) | u64::from(inp.rare_u8()) << 8;
                self.write(regs::SMMU_CR0, 4, v);
            }
            2 => {
                let v = u64::from(inp.u16());
                self.write(regs::SMMU_CR1 + u64::from(inp.u8() & 1) * 4, 4, v);
            }
            3 => {
                let v = 1 << 31 | u64::from(inp.u8() & 1) << 20 | u64::from(inp.u32() & 0x3f3f1f);
                self.write(regs::SMMU_GBPA, 4, v);
            }
            4 => {
                let v = u64::from(inp.u8() & 7);
                self.write(regs::SMMU_IRQ_CTRL, 4, v);
            }
            5 | 6 => {
                // Acknowledge the active global errors (what a driver's GERROR handler does).
                let g = self.r32(regs::SMMU_GERROR);
                let v = if inp.u8() < 224 { g } else { inp.u32() };
                self.write(regs::SMMU_GERRORN, 4, v.into());
            }
            7 => {
                let off = [regs::SMMU_GERROR_IRQ_CFG0, regs::SMMU_EVENTQ_IRQ_CFG0]
                    [usize::from(inp.u8() & 1)];
                let a = if inp.u8() < 32 { 0 } else { self.addr(inp, 4) };
                self.write(off, 8, a);
            }
            8 => {
                let a = self.addr(inp, 64) | u64::from(inp.u8() & 1) << 62;
                self.write(regs::SMMU_STRTAB_BASE, 8, a);
            }
            9 => {
                let fmt = [0, 1, 1, 2, 3][usize::from(inp.u8() % 5)];
                let split = [6, 8, 10, 6, 8, 10, 0, 7, 31][usize::from(inp.u8() % 9)];
                let log2 = inp.u8() % (sid_bits + 4);
                let v = fmt << 16 | split << 6 | u64::from(log2);
                self.write(regs::SMMU_STRTAB_BASE_CFG, 4, v);
            }
            10 | 11 => {
                let (off, max) = if inp.bool() {
                    (regs::SMMU_CMDQ_BASE, CMDQS)
                } else {
                    (regs::SMMU_EVENTQ_BASE, EVENTQS)
                };
                let log2 = if inp.u8() < 224 {
                    inp.u8() % (max + 1)
                } else {
                    inp.u8() & 31
                };
                let a = self.addr(inp, 32) & bits::mask(51, 5) | u64::from(log2);
                self.write(off, 8, a | u64::from(inp.u8() & 1) << 62);
            }
            12 | 13 => {
                // Move CMDQ_PROD by a few entries (wrap included), or set it to anything.
                let (_, log2, prod) = self.cmdq();
                let mask = (2u32 << log2) - 1;
                let v = if inp.u8() < 224 {
                    (prod & mask).wrapping_add(u32::from(inp.u8() % 8)) & mask
                } else {
                    inp.u32()
                };
                self.write(regs::SMMU_CMDQ_PROD, 4, v.into());
            }
            14 => {
                let v = u64::from(inp.u32() & 0x7f0f_ffff);
                self.write(regs::SMMU_CMDQ_CONS, 4, v);
            }
            15 | 16 => {
                // Consume the event queue (CONS = PROD, overflow acknowledged) or set anything.
                let p = self.r32(regs::SMMU_EVENTQ_PROD);
                let v = if inp.u8() < 192 { p } else { inp.u32() };
                self.write(regs::SMMU_EVENTQ_CONS, 4, v.into());
            }
            _ => {
                let v = inp.u32();
                self.write(regs::SMMU_EVENTQ_PROD, 4, v.into());
            }
        }
    }

    /// Writes bytes into guest RAM, mostly where the guest's registers point.
    fn ram_write(&mut self, inp: &mut Input) {
        let len = usize::from(inp.u8() % 64) + 1;
        let at = match inp.u8() % 8 {
            0 | 1 => {
                let vsid = self.sid(inp);
                self.ste_addr(vsid) + u64::from(inp.u8() % 64)
            }
            2 => {
                let vsid = self.sid(inp);
                self.l1_addr(vsid).0 + u64::from(inp.u8() % 8)
            }
            3 | 4 => {
                let (base, log2, prod) = self.cmdq();
                let idx = u64::from(prod.wrapping_add(u32::from(inp.u8() % 4))) & ((1 << log2) - 1);
                base + idx * 16 + u64::from(inp.u8() % 16)
            }
            5 => {
                let (base, log2, prod) = self.eventq();
                base + u64::from(prod & ((1 << log2) - 1)) * 32 + u64::from(inp.u8() % 32)
            }
            _ => self.addr(inp, 1),
        };
        let data: Vec<u8> = (0..len).map(|_| inp.u8()).collect();
        self.ram.poke(at, &data);
    }

    /// Puts a guest STE for a StreamID (mostly the VM's) where the stream table says.
    fn ste_write(&mut self, inp: &mut Input) {
        let vsid = self.sid(inp);
        let ste = self.guest_ste(inp);
        let at = self.ste_addr(vsid);
        self.ram.poke(at, &ste.to_bytes());
    }

    /// Puts an L1 stream table descriptor for a StreamID (mostly the VM's).
    fn l1_write(&mut self, inp: &mut Input) {
        let vsid = self.sid(inp);
        let (at, split) = self.l1_addr(vsid);
        let span = if inp.u8() < 200 {
            u64::from(split) + 1
        } else {
            u64::from(inp.u8() & 31)
        };
        let l2 = self.addr(inp, 64) & bits::mask(51, 6);
        self.ram.poke(at, &(l2 | span).to_le_bytes());
    }

    /// Writes 1-4 commands at the guest's CMDQ_PROD slot and moves CMDQ_PROD past them; or
    /// (1 in 8) up to a whole queue's worth, 1-8 commands repeated, so that one PROD write
    /// makes the model do the most work a trap can.
    fn commands(&mut self, inp: &mut Input) {
        let (base, log2, mut prod) = self.cmdq();
        let n = inp.u8();
        let (distinct, count) = if n < 224 {
            (n % 4 + 1, u32::from(n % 4 + 1))
        } else {
            let entries = 1u32 << log2;
            (
                n % 8 + 1,
                entries - u32::from(inp.u8()).min(entries - 1) / 16,
            )
        };
        let cmds: Vec<[u8; 16]> = (0..distinct).map(|_| self.command(inp)).collect();
        // One in four batches is another vCPU's: its trap is left waiting.
        self.park_next |= n & 0x30 == 0x30;
        let mask = (2u32 << log2) - 1;
        for c in cmds.iter().cycle().take(count as usize) {
            let idx = u64::from(prod & ((1 << log2) - 1));
            self.ram.poke(base.wrapping_add(idx * 16), c);
            prod = (prod & mask).wrapping_add(1) & mask;
        }
        self.write(regs::SMMU_CMDQ_PROD, 4, prod.into());
    }

    /// What a driver's probe does: tables and queues in RAM, STEs for the VM's streams, the
    /// queues and then translation enabled, and a CFGI_ALL + CMD_SYNC.
    fn bring_up(&mut self, inp: &mut Input) {
        let sid_bits = self.cfg().sid_bits;
        let two_level = inp.bool();
        let split: u64 = [6, 8, 10][usize::from(inp.u8() % 3)];
        let log2 = if inp.u8() < 192 {
            sid_bits.min(if two_level { 16 } else { 6 })
        } else {
            inp.u8() % (sid_bits + 1)
        };
        let strtab = self.addr(inp, 64);
        let cmdq_log2 = inp.u8() % (CMDQS + 1);
        let cmdq = self.addr(inp, 32);
        let evtq_log2 = inp.u8() % (EVENTQS + 1);
        let evtq = self.addr(inp, 32);
        self.write(regs::SMMU_CR0, 4, 0);
        self.write(regs::SMMU_CR1, 4, regs::cr1::COHERENT.into());
        self.write(regs::SMMU_STRTAB_BASE, 8, regs::strtab_base(strtab, true));
        let fmt = u64::from(two_level) << 16;
        self.write(
            regs::SMMU_STRTAB_BASE_CFG,
            4,
            fmt | split << 6 | u64::from(log2),
        );
        self.write(
            regs::SMMU_CMDQ_BASE,
            8,
            regs::queue_base(cmdq, cmdq_log2, true),
        );
        self.write(regs::SMMU_CMDQ_PROD, 4, 0);
        self.write(regs::SMMU_CMDQ_CONS, 4, 0);
        self.write(
            regs::SMMU_EVENTQ_BASE,
            8,
            regs::queue_base(evtq, evtq_log2, true),
        );
        self.write(regs::SMMU_EVENTQ_PROD, 4, 0);
        self.write(regs::SMMU_EVENTQ_CONS, 4, 0);
        let irq = u64::from(inp.u8() & 3);
        self.write(regs::SMMU_IRQ_CTRL, 4, irq);
        self.write(regs::SMMU_CR0, 4, 0xc);
        let vsids: Vec<u32> = self.cfg().streams.iter().map(|s| s.vsid).collect();
        for vsid in vsids {
            if two_level {
                let (at, split) = self.l1_addr(vsid);
                let l2 = self.addr(inp, 64) & bits::mask(51, 6);
                self.ram
                    .poke(at, &(l2 | u64::from(split + 1)).to_le_bytes());
            }
            let ste = self.guest_ste(inp);
            let at = self.ste_addr(vsid);
            self.ram.poke(at, &ste.to_bytes());
        }
        self.write(regs::SMMU_CR0, 4, 0xd);
        let (base, log2, prod) = self.cmdq();
        let mask = (2u32 << log2) - 1;
        let mut p = prod;
        for c in [Command::CfgiAll, Command::Sync(Sync::none())] {
            let idx = u64::from(p & ((1 << log2) - 1));
            self.ram.poke(base.wrapping_add(idx * 16), &c.to_bytes());
            p = (p & mask).wrapping_add(1) & mask;
        }
        self.write(regs::SMMU_CMDQ_PROD, 4, p.into());
    }

    /// Performs one operation from the input.
    fn step(&mut self, inp: &mut Input) {
        match inp.u8() % 16 {
            0 | 1 => {
                let off = self.offset(inp);
                let size = Self::size(inp);
                self.read(off, size);
            }
            2..=4 => {
                let off = self.offset(inp);
                let size = Self::size(inp);
                let v = inp.u64();
                self.write(off, size, v);
            }
            5 | 6 => self.smart_write(inp),
            7 | 8 => self.ram_write(inp),
            9 => self.ste_write(inp),
            10 => self.l1_write(inp),
            11 | 12 => self.commands(inp),
            13 => {
                let e = self.event(inp);
                let fate = match inp.u8() {
                    0..=223 => EventFate::Deliver,
                    224..=239 => EventFate::Quarantined,
                    _ => EventFate::Suppressed,
                };
                self.forward(&e, fate);
            }
            14 => self.bring_up(inp),
            _ => match inp.u8() % 10 {
                0 => self.reset(),
                1 => self.phys.fail = !self.phys.fail,
                2 => {
                    let _ = self.v.stats().traps();
                }
                3 => self.phys.advance_clock(u64::from(inp.u16()) * 100),
                4 | 5 => self.park_next = true,
                6 => {
                    let on = self.phys.now().is_none();
                    self.phys.set_clock(on);
                }
                _ => self.finish_parked(usize::from(inp.u8())),
            },
        }
    }

    /// An access size: mostly 4 or 8 bytes, sometimes 1 or 2 (a guest's LDRB/LDRH reach the
    /// model too).
    fn size(inp: &mut Input) -> u8 {
        [4, 4, 4, 8, 8, 8, 1, 2][usize::from(inp.u8() & 7)]
    }

    /// A register offset: mostly a named register, sometimes any offset in the MMIO window.
    fn offset(&self, inp: &mut Input) -> u64 {
        let b = inp.u8();
        if b < 232 {
            OFFSETS[usize::from(b) % OFFSETS.len()]
        } else {
            u64::from(inp.u32()) % regs::MMIO_SIZE
        }
    }
}

/// Interprets `data` as a hostile guest's operations on a fresh vSMMU and checks the
/// invariants after each (see the module documentation). Panics on a violation.
///
/// Encoding: byte 0 selects the configuration ([`config`]); then each operation is an opcode
/// byte (mod 16) and its operands, read little-endian, zero past the end of the input:
///
/// | opcode | operation |
/// | --- | --- |
/// | 0-1 | register read (offset mostly a named register, else anywhere in the MMIO window; size 4 or 8, rarely 1 or 2) |
/// | 2-4 | register write of any value (offset and size as for reads) |
/// | 5-6 | register write of a plausible value (CR0 enables, GBPA with UPDATE, bases in RAM, PROD a few entries on, GERRORN = GERROR, ...) |
/// | 7-8 | 1-64 bytes into guest RAM, mostly at an STE, an L1 descriptor, a CMDQ or EVENTQ slot the registers point at |
/// | 9 | a guest STE (mostly valid, any Config, guest-chosen S2 fields) where the stream table says |
/// | 10 | an L1 stream table descriptor |
/// | 11-12 | 1-4 commands (1 in 8: up to a full queue) at CMDQ_PROD, then the PROD write (1 in 4 left waiting, as opcode 15 can ask) |
/// | 13 | a physical event fed to [`Vsmmu::forward_event`] |
/// | 14 | a driver's probe: tables, queues, STEs, SMMUEN, CFGI_ALL + CMD_SYNC |
/// | 15 | reset, physical failure injection on/off, a stats read, the next CMDQ_PROD write started and left waiting (another vCPU's trap; at most 4), or one of those finished |
pub fn run(data: &[u8]) {
    run_harness(data);
}

/// [`run`], returning the harness at the end (its [`Harness::tally`] and physical SMMU).
pub fn run_harness(data: &[u8]) -> Harness {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let mut h = Harness::new(config(sel));
    h.phys.set_clock(sel & 0x80 == 0);
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        h.step(&mut inp);
    }
    while !h.parked.is_empty() {
        h.finish_parked(0);
    }
    // Every trap finished: nothing the guest was promised is still held back.
    if let Some(c) = h.v.inflight.front() {
        panic!("every write finished, yet a completion was never made visible: {c:?}");
    }
    h.check_shadow(format_args!("the last operation"));
    h.tally.add_stats(&h.v);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a small deterministic generator for test inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_inputs_keep_the_invariants() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = Tally::default();
        let mut stes = [0u64; 9];
        let mut cmds = 0;
        // Under Miri (hundreds of times slower) a handful of inputs checks the harness's code
        // for UB; the depth below needs the native run's thousands.
        let inputs = if cfg!(miri) { 6 } else { 3000 };
        for _ in 0..inputs {
            let len = (rng.next() % 1024) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let h = run_harness(&data);
            let (a, b) = (h.tally, h.phys.ste_configs);
            t.add(&a);
            for (x, y) in stes.iter_mut().zip(b) {
                *x += y;
            }
            cmds += h.phys.total_commands;
        }
        // The inputs get deep: every kind of physical STE, forwarded commands, guest events,
        // every budget, break-before-make, the ordering waits, failed physical CMD_SYNCs.
        let deep = stes[0] > 0
            && stes[6] > 0
            && stes[7] > 100
            && stes[8] > 0
            && cmds > 1000
            && t.syncs > 100
            && t.command_errors > 0
            && t.guest_events > 100
            && t.dropped_events > 0
            && t.suppressed_events > 0
            && t.held_back > 10
            && t.budget_waits > 10
            && t.order_waits > 0
            && t.ste_breaks > 10
            && t.phys_sync_errors > 10
            && t.visible_syncs > 100
            && t.merged > 100;
        assert!(
            deep || cfg!(miri),
            "shallow: {t:?}, STEs by Config {stes:?}, {cmds} physical commands"
        );
    }

    /// Fuzzer finding: a reset whose wait for a break's CMD_SYNC failed took that CMD_SYNC as
    /// complete and made the break (invariant (g)).
    /// Fuzzer finding (of the check, not the model): traps without a guest CMD_SYNC hand their
    /// windows over without a physical one, each within the window bound; what accumulates is
    /// the outstanding budget's to bound (invariant (h) checks each submission).
    #[test]
    fn windows_without_a_sync_stay_within_the_outstanding_budget() {
        run(&[
            126, 255, 157, 0, 254, 206, 47, 206, 197, 0, 0, 0, 187, 49, 49, 49, 49, 49, 51, 21, 20,
            49, 20, 20, 20, 39, 39, 34, 216, 216, 216, 216, 216, 216, 62, 0, 235, 31, 31, 31, 31,
            31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 235,
            235, 235, 235, 235, 235, 46, 235, 235, 235, 235, 235, 235, 235, 235, 181, 235, 235,
            235, 235, 235, 235, 235, 235, 235, 235, 235, 235, 235, 235, 235, 235, 235, 235, 235,
            235, 235, 235, 235, 235, 235, 235, 235, 255, 253, 255, 253, 255, 235, 235, 235, 235, 0,
            6, 118, 235, 235, 223, 253, 255, 17, 15, 0, 0, 64, 0, 0, 0, 0, 232, 0, 0, 0, 0, 16, 0,
            0, 5, 0, 0, 0, 88, 53, 76, 4, 0, 80, 52, 18, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 51, 51, 51, 51, 51, 51, 51,
            51, 51, 51, 51, 51, 51, 51, 51, 51, 51, 51, 51, 51, 102, 102, 102, 102, 102, 102, 102,
            102, 102, 102, 102, 102, 102, 102, 102, 102, 102, 102, 102, 102, 102, 102, 102, 102,
            102, 102, 102, 102, 102, 102, 51, 51, 51, 51, 51, 51, 62, 62, 62, 62, 62, 62, 62, 62,
            62, 62, 62, 62, 62, 62, 62, 62, 62, 62, 62, 62, 206, 206, 206, 206,
        ]);
    }

    #[test]
    fn a_reset_never_makes_a_break_whose_sync_failed() {
        run(&[
            40, 255, 255, 255, 11, 213, 253, 63, 85, 255, 255, 255, 1, 149, 149, 0, 0, 0, 30, 255,
            255, 255, 11, 213, 149, 149, 255, 0, 85, 1, 149, 2, 237, 0, 0, 11, 85, 37, 191, 191,
            255,
        ]);
    }

    #[test]
    fn empty_and_tiny_inputs() {
        run(&[]);
        // Under Miri every 17th first byte (0, 17, .., 255: every selector bit both ways).
        let step = if cfg!(miri) { 17 } else { 1 };
        for b in (0..=255u8).step_by(step) {
            run(&[b]);
            run(&[b, 14]);
            run(&[b, 14, 0, 0, 0, 11]);
        }
    }

    /// What was the most work one trap could cause: a full 256-entry queue of CFGI_STE +
    /// CMD_SYNC pairs, consumed by one CMDQ_PROD write. It now costs each stream one reshadow
    /// (its STE read once, the CFGI_STEs merged), one physical CMD_SYNC for all 128 guest ones,
    /// and every MSI written.
    #[test]
    fn a_full_command_queue_is_bounded_work() {
        let mut h = Harness::new(config(0));
        let (strtab, cmdq, evtq, cd) = (
            RAM_BASE,
            RAM_BASE + 0x1_0000,
            RAM_BASE + 0x2_0000,
            RAM_BASE + 0x3_0000,
        );
        h.write(regs::SMMU_CR1, 4, regs::cr1::COHERENT.into());
        h.write(regs::SMMU_STRTAB_BASE, 8, regs::strtab_base(strtab, true));
        let cfg = regs::strtab_base_cfg(regs::StrtabFmt::Linear, 6, 0);
        h.write(regs::SMMU_STRTAB_BASE_CFG, 4, cfg.into());
        h.write(regs::SMMU_CMDQ_BASE, 8, regs::queue_base(cmdq, CMDQS, true));
        h.write(
            regs::SMMU_EVENTQ_BASE,
            8,
            regs::queue_base(evtq, EVENTQS, true),
        );
        let vsids: Vec<u32> = STREAMS.iter().map(|s| s.vsid).collect();
        for &vsid in &vsids {
            let mut ste = Ste::default();
            ste.set_v(true).set_config(StreamConfig::S1Translate);
            ste.set_s1_context_ptr(cd);
            h.ram.poke(strtab + u64::from(vsid) * 64, &ste.to_bytes());
        }
        h.write(regs::SMMU_CR0, 4, 0xd);
        let entries = 1u32 << CMDQS;
        for i in 0..entries {
            let at = cmdq + u64::from(i) * 16;
            let c = if i % 2 == 0 {
                Command::CfgiSte {
                    sid: vsids[(i as usize / 2) % vsids.len()],
                    leaf: true,
                }
            } else {
                Command::Sync(Sync {
                    cs: SyncCs::Irq,
                    msh: 3,
                    msiattr: 0xf,
                    msidata: 0,
                    msiaddr: at,
                })
            };
            h.ram.poke(at, &c.to_bytes());
        }
        // PROD one full lap ahead of CONS: the queue is full.
        h.write(regs::SMMU_CMDQ_PROD, 4, entries.into());
        assert_eq!(h.v.stats().commands, u64::from(entries));
        assert_eq!(h.read(regs::SMMU_CMDQ_CONS, 4), u64::from(entries));
        // The STEs did not change: no STE write, one CFGI_STE per stream, one CMD_SYNC, every
        // MSI written.
        let n = STREAMS.len() as u64;
        assert_eq!(h.phys.ste_calls, 0);
        assert_eq!(h.phys.commands.len() as u64, n, "{:?}", h.phys.commands);
        assert!(
            h.ram.accesses.get() >= u64::from(entries),
            "every command read"
        );
        assert_eq!(h.phys.syncs, 1);
        assert_eq!(h.v.stats().syncs_merged, u64::from(entries) / 2 - 1);
        for i in (1..entries).step_by(2) {
            let at = cmdq + u64::from(i) * 16;
            assert_eq!(h.ram.peek_u64(at) as u32, 0, "MSI of the CMD_SYNC at {i}");
        }
        for (_, ste) in h.v.physical_stes() {
            assert_eq!(ste.map(|s| s.config()), Some(StreamConfig::Nested));
        }
    }

    /// The checks themselves catch what they are meant to.
    #[test]
    #[should_panic(expected = "invariant (c)")]
    fn bypass_ste_is_caught() {
        let mut p = CheckingSmmu::new(&config(0));
        let _ = p.write_ste(1, Ste::bypass());
    }

    #[test]
    #[should_panic(expected = "invariant (b)")]
    fn foreign_stream_is_caught() {
        let mut p = CheckingSmmu::new(&config(0));
        let _ = p.write_ste(2, Ste::abort());
    }

    #[test]
    #[should_panic(expected = "invariant (c)")]
    fn foreign_stage2_is_caught() {
        let mut p = CheckingSmmu::new(&config(0));
        let mut s2 = s2_config();
        s2.root_pa += 0x1000;
        let _ = p.write_ste(8, Ste::stage2(s2));
    }

    #[test]
    #[should_panic(expected = "invariant (d)")]
    fn foreign_vmid_is_caught() {
        let mut p = CheckingSmmu::new(&config(0));
        let _ = p.submit(&[Command::TlbiNhAll { vmid: VMID + 1 }]);
    }

    #[test]
    #[should_panic(expected = "invariant (d)")]
    fn global_command_is_caught() {
        let mut p = CheckingSmmu::new(&config(0));
        let _ = p.submit(&[Command::CfgiAll]);
    }

    #[test]
    #[should_panic(expected = "invariant (g)")]
    fn a_make_before_its_break_completed_is_caught() {
        let mut p = CheckingSmmu::new(&config(0));
        let s2 = s2_config();
        let _ = p.write_ste(8, Ste::stage2(s2));
        let nested = Ste::nested(crate::ste::S1Fields::default(), s2);
        let SteWrite::Broken(b) = p.write_ste(8, nested).unwrap() else {
            panic!("stage 2 to nested breaks");
        };
        // Its CMD_CFGI_STE and a CMD_SYNC queued, but not waited for.
        p.submit_sync(&[b.cfgi]).unwrap();
        let _ = p.make_ste(b);
    }

    #[test]
    #[should_panic(expected = "invariant (h)")]
    fn a_window_beyond_the_budget_is_caught() {
        let mut p = CheckingSmmu::new(&config(0x40));
        let many: Vec<Command> = (0..64)
            .map(|i| Command::TlbiNhVa {
                vmid: VMID,
                asid: 1,
                addr: TlbiAddr::single(i << 12, true),
            })
            .collect();
        let _ = p.submit_sync(&many);
    }

    #[test]
    fn allowed_physical_operations_pass() {
        let mut p = CheckingSmmu::new(&config(1));
        let s2 = s2_config();
        for ste in [
            Ste::default(),
            Ste::abort(),
            Ste::stage2(s2),
            Ste::nested(crate::ste::S1Fields::default(), s2),
        ] {
            // Each from the last: abort to stage 2 is written at once, stage 2 to nested
            // breaks first; a make after a CMD_SYNC waited for is allowed.
            if let SteWrite::Broken(b) = p.write_ste(0x20, ste).unwrap() {
                let t = p.submit_sync(&[b.cfgi]).unwrap();
                p.wait(t).unwrap();
                p.make_ste(b).unwrap();
            }
        }
        p.submit_sync(&[
            Command::TlbiNhAll { vmid: VMID },
            Command::CfgiSte { sid: 8, leaf: true },
            Command::CfgiCdAll { sid: 0x20 },
            Command::Sync(Sync::none()),
        ])
        .unwrap();
    }
}

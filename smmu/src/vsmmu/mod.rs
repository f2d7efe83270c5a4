//! The guest-facing SMMUv3: a register-level model of the SMMUv3 programming interface
//! (Arm IHI 0070) that advertises **stage 1 only**, and the glue that turns what a guest
//! programs into physical operations scoped to its VM.
//!
//! The guest owns a complete stage-1 SMMU: its stream table, context descriptors, page tables
//! and queues live in its own RAM. The hypervisor owns stage 2, the physical stream table and
//! the physical queues. Three paths connect them:
//!
//! - **Stream table shadowing** ([`shadow`], `streams`): on CMD_CFGI_STE(_RANGE)/CFGI_ALL, on
//!   SMMUEN and GBPA changes, the guest's STE for each StreamID the VM owns is read from guest
//!   memory and turned into a physical STE: stage-1 translate becomes nested (guest S1 over the
//!   VM's S2), bypass becomes stage-2 only, abort stays abort, and anything invalid or illegal
//!   becomes an invalid physical STE whose C_BAD_STE events are reported to the guest as the
//!   event its own SMMU would have recorded. StreamIDs the VM does not own are never touched.
//! - **Command queue emulation** ([`Vsmmu::write`] of CMDQ_PROD): the guest's commands are
//!   consumed inside the trap; TLB and CD invalidations are forwarded with the VM's VMID and the
//!   physical StreamID, merged within the trap, and the trap's CMD_SYNCs are completed (physical
//!   sync first) by the MSI writes the guest asked for, so a guest map/unmap batch costs one trap.
//! - **Event forwarding** ([`Vsmmu::forward_event`]): physical events of the VM's streams that
//!   its stage 1 caused go into the guest's event queue; stage-2 faults stay the hypervisor's.
//!
//! # What a VM may take of the shared SMMU
//!
//! The physical command queue and stream table are shared by every VM (docs/design.md section 10),
//! so each VM's use of them is bounded ([`Budget`]), and a VM that floods waits, in its own
//! traps and holding no lock another VM needs, for its own earlier work:
//!
//! - **STE work**: a stream's physical STE is rewritten at most once per trap however often
//!   the guest invalidates it (the guest sees its CMD_SYNCs complete only once the trap is
//!   done, so reading its STE once, last, is what a real SMMU refetching it could do), never
//!   when the physical STE it gives is the one in force (GBPA, CR0 and reset paths included),
//!   and within a per-VM budget by time. A GBPA update that needs STE work reads UPDATE = 1
//!   until the budget let it happen, and a CR0 change CR0ACK the old value (IHI 0070 6.3.14,
//!   6.3.9: software polls both). The waits of a break-before-make update go through the
//!   lock-free queue with the VM's model lock released ([`Outstanding`]).
//! - **Commands**: within a trap, duplicate invalidations are dropped, a TLBI_NH_ALL of the
//!   VM's VMID subsumes its other TLBIs, more than [`Budget::tlbi_per_trap`] distinct TLBIs
//!   collapse into one TLBI_NH_ALL (as Linux does past its threshold), and one physical
//!   CMD_SYNC completes all of the trap's guest CMD_SYNCs. A VM with more than
//!   [`Budget::outstanding`] physical entries queued and not known complete waits for its own
//!   earlier CMD_SYNC before queueing more, and its physical CMD_SYNCs have a budget by time.
//!   So another VM's unmap (TLBI + CMD_SYNC) waits behind at most `outstanding` entries (plus
//!   one trap's worth) of each other VM, and the hypervisor's own.
//! - **Errors**: a physical CMD_SYNC that fails is reported to the guest as CERROR_ABT at the
//!   first guest CMD_SYNC it was to complete (GERROR.CMDQ_ERR, no MSI), never as a completed
//!   sync; the guest's driver acknowledges and the queue retries it (IHI 0070 7.1; Linux's
//!   `arm_smmu_cmdq_skip_err` retries on CERROR_ABT).
//!
//! Ordering, where commands are merged or moved: an invalidation may reach the physical SMMU
//! later than the guest asked, never before an STE or CD change that the guest put before it
//! with a CMD_SYNC between them (the trap then waits for that change to be complete before it
//! queues the invalidation), and always before the physical CMD_SYNC that completes the
//! guest's CMD_SYNC after it. Physical commands are merged only with others not yet handed to
//! the SMMU, so a merged invalidation never takes effect earlier than the guest asked.
//!
//! Guest memory is reached only through [`GuestMemory`] (bounds-checked IPA accesses), the
//! physical SMMU only through [`PhysicalSmmu`].

mod cmdq;
mod completion;
mod evtq;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
mod progress;
mod regfile;
mod shadow;
mod stats;
mod streams;
#[cfg(test)]
mod tests;

use crate::budget::TokenBucket;
use crate::cmd::Command;
use crate::driver::{DmaMemory, DriverError, Smmu, SmmuRegs, SteBreak, SteWrite, SyncTicket};
use crate::event::Event;
use crate::ste::{S2Config, Ste};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use bitflags::bitflags;
use completion::{Cover, Inflight};
use regfile::{RegState, GBPA_RESET};
use streams::Stream;

pub use crate::driver::EventFate;
pub use regfile::{CMDQS, EVENTQS};
pub use shadow::{shadow_ste, GuestSte, StreamTableCfg};
pub use stats::{reg_index, reg_name, Stats, REG_SLOTS};

/// A guest-physical access outside the VM's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest IPA range {ipa:#x}+{len:#x} is not guest RAM")]
pub struct GuestMemError {
    /// Start of the access.
    pub ipa: u64,
    /// Its length.
    pub len: u64,
}

/// The VM's RAM as the vSMMU reads its tables and queues and writes its events and MSIs.
pub trait GuestMemory {
    /// Reads `buf.len()` bytes at `ipa`; fails without side effects outside guest RAM.
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError>;
    /// Writes `data` at `ipa`; fails without side effects outside guest RAM.
    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError>;
}

/// The physical SMMU as one VM's vSMMU uses it. The vSMMU only ever passes StreamIDs the VM owns
/// and commands carrying the VM's VMID.
///
/// Commands are queued inside the trap (under the VM's vSMMU lock, so they keep the guest's
/// order) and published and waited for after it (without), so that neither the physical
/// command queue nor one vCPU's wait holds up the VM's other vCPUs or other VMs. Nothing here
/// waits but [`PhysicalSmmu::wait`] and [`PhysicalSmmu::wait_until`], which the vSMMU calls
/// only from [`Outstanding::wait`] (no lock held) and [`Vsmmu::reset`].
pub trait PhysicalSmmu {
    /// Writes the physical STE of `sid` as far as it goes without waiting ([`Smmu::write_ste`]).
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError>;
    /// The make of a break-before-make STE update ([`Smmu::make_ste`]), once the break's
    /// CMD_CFGI_STE and a CMD_SYNC after it are known to have completed.
    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError>;
    /// Queues commands; they reach the SMMU at the next [`PhysicalSmmu::publish`] or
    /// [`PhysicalSmmu::wait`] at the latest.
    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError>;
    /// Queues `cmds` and a CMD_SYNC, and returns the ticket to wait for.
    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError>;
    /// Hands every queued command to the SMMU.
    fn publish(&self);
    /// Publishes, then waits until the ticket's CMD_SYNC (and so every command queued before it)
    /// has completed.
    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError>;
    /// A monotonic clock in nanoseconds for the budgets by time ([`Budget`]). `None` (the
    /// default): there is no clock and those budgets are off; the others still hold.
    fn now(&self) -> Option<u64> {
        None
    }
    /// Returns once [`PhysicalSmmu::now`] has reached `deadline` (a vCPU over its budget waits
    /// in its own trap, holding no lock). Bounded by the deadline itself.
    fn wait_until(&self, deadline: u64) {
        let _ = deadline;
    }
}

impl<R: SmmuRegs + Clone, M: DmaMemory> PhysicalSmmu for Smmu<R, M> {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        Smmu::write_ste(self, sid, ste)
    }

    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        Smmu::make_ste(self, b)
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.cmdq().queue(cmds)
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.cmdq().queue_sync(cmds)
    }

    fn publish(&self) {
        self.cmdq().publish()
    }

    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        self.cmdq().wait(ticket)
    }
}

/// One StreamID of the VM: what the guest calls it and what it is on the physical SMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMap {
    /// StreamID in the guest's view (its `iommu-map`).
    pub vsid: u32,
    /// StreamID on the physical SMMU.
    pub psid: u32,
}

/// What a VM's vSMMU is made of.
#[derive(Debug, Clone)]
pub struct VsmmuConfig {
    /// VM name, for log lines.
    pub name: alloc::string::String,
    /// The VM's StreamIDs.
    pub streams: Vec<StreamMap>,
    /// The VM's stage 2 (VMID, root, sizes), as every physical STE of the VM carries it.
    pub s2: S2Config,
    /// SMMU_IDR1.SIDSIZE the guest sees; every `vsid` must fit.
    pub sid_bits: u8,
    /// Output address size of the guest's stage 1 (an IPA): one of 32, 36, 40, 42, 44, 48.
    pub oas_bits: u8,
    /// The physical SMMU's IDR5 (granules the guest may use).
    pub phys_idr5: u32,
    /// The physical SMMU supports range invalidation (IDR3.RIL): guest range TLBIs are forwarded.
    pub phys_ril: bool,
    /// What the VM may take of the shared physical SMMU.
    pub budget: Budget,
}

/// A VM's share of the physical SMMU ([module docs](self)). The bound another VM's unmap sees:
/// at most `outstanding` physical entries (plus one trap's worth, `tlbi_per_trap` + a few) of
/// each other VM ahead of its own TLBI and CMD_SYNC. The budgets by time need a clock
/// ([`PhysicalSmmu::now`]); a VM without a token waits in its own trap until the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Distinct TLBIs one trap forwards before the rest collapse with them into one
    /// TLBI_NH_ALL of the VM's VMID.
    pub tlbi_per_trap: u16,
    /// Physical entries (commands and CMD_SYNCs) the VM may have queued and not known complete;
    /// beyond, its trap waits for its own earlier CMD_SYNC first. A VM with nothing outstanding
    /// may always queue one trap's worth.
    pub outstanding: u16,
    /// Physical STE operations (rewrites, and CFGI_STEs forwarded for a nested stream) at once.
    pub ste_burst: u32,
    /// One more STE operation per this many nanoseconds.
    pub ste_period_ns: u64,
    /// Physical CMD_SYNCs at once.
    pub sync_burst: u32,
    /// One more physical CMD_SYNC per this many nanoseconds.
    pub sync_period_ns: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            tlbi_per_trap: 16,
            outstanding: 64,
            // A driver's probe or a device's attach and detach use a handful; 10000 per second
            // in steady state leave the physical SMMU (an STE fetch and a CMD_SYNC each, a few
            // microseconds) mostly to the others whatever a guest does.
            ste_burst: 64,
            ste_period_ns: 100_000,
            // 200000 physical CMD_SYNCs per second: more than a guest's strict-mode unmaps on
            // QEMU or a fast disk need, a fraction of what one SMMU completes.
            sync_burst: 64,
            sync_period_ns: 5_000,
        }
    }
}

/// Rounds of [`Outstanding::wait`] and [`Vsmmu::complete`] one write needs at most: each
/// consumes a guest command, completes a break-before-make, or waits out a budget that then
/// lets it go on. Past it a caller gives up (a model bug), leaving the rest to the next trap.
pub const MAX_ROUNDS: usize = 4 * (1 << CMDQS) + 64;

bitflags! {
    /// Wired interrupts of the vSMMU the caller must raise in the guest (edge-triggered SPIs).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Irqs: u8 {
        /// The event queue interrupt.
        const EVENTQ = 1 << 0;
        /// The global error interrupt.
        const GERROR = 1 << 1;
    }
}

/// Who a physical event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Written into the guest's event queue as this record (virtual StreamID).
    Guest(Event),
    /// Offered to the guest, but its event queue was disabled or full (overflow flagged).
    Dropped(Event),
    /// The hypervisor's: a stage-2 fault or a fault the guest's SMMU cannot have.
    Hypervisor,
    /// Dropped by its stream's event budget (counted, never forwarded).
    Suppressed,
}

/// One VM's emulated SMMUv3.
#[derive(Debug)]
pub struct Vsmmu {
    cfg: VsmmuConfig,
    r: RegState,
    streams: Vec<Stream>,
    /// Physical commands forwarded and not handed to the SMMU yet: the merge window.
    batch: cmdq::Batch,
    /// Physical commands were submitted since the last physical CMD_SYNC.
    unsynced: bool,
    /// The guest's CMDQ_CONS as far as commands were consumed (its index and wrap bit); the
    /// guest's CMDQ_CONS register shows them once the physical CMD_SYNCs they wait for completed.
    fetched: u32,
    /// Guest commands consumed in all (a whole-life count: what a write waits to see consumed).
    consumed: u64,
    /// Consumption stopped on a command error or a failed physical CMD_SYNC.
    stopped: bool,
    /// What the guest sees once physical CMD_SYNCs complete, in queue order.
    inflight: Inflight,
    /// Id of the next [`Completion`](completion::Completion): they are numbered in order, so the one at index `i` of
    /// `inflight` has id `next_id - inflight.len() + i`.
    next_id: u64,
    /// How many completions at the back wait for a physical CMD_SYNC not queued yet
    /// ([`Cover::Pending`]; once one does, every later one does too).
    pending_tail: usize,
    /// Some stream may be marked for reshadowing or be between break and make.
    stream_work: bool,
    /// The VM's physical CMD_SYNCs queued and not known complete, in order, each with
    /// `queued` as it was right after it.
    syncs: VecDeque<(SyncTicket, u64)>,
    /// The highest physical CMD_SYNC sequence number known complete (they complete in order).
    done_seq: u64,
    /// Physical entries (commands and CMD_SYNCs) the VM queued in all...
    queued: u64,
    /// ...and as of the last CMD_SYNC known complete: the difference is outstanding.
    done_queued: u64,
    /// A trap queued physical commands that are not published yet.
    unpublished: bool,
    /// Why the processing is stopped until something completes or time passes.
    pause: Option<progress::Pause>,
    /// The physical CMD_SYNC after the latest STE change or forwarded CFGI_STE/CFGI_CD: an
    /// invalidation the guest ordered after them (with a CMD_SYNC between) waits for it.
    config_cover: Cover,
    /// A guest CMD_SYNC was consumed after an STE or CD invalidation: the next TLBI or CFGI_CD
    /// waits until those have taken effect ([module docs](self), ordering).
    barrier: bool,
    /// GBPA updates not complete yet (UPDATE reads 1 meanwhile).
    gbpa_updates: u32,
    /// A failed physical CMD_SYNC left the outcome of earlier commands unknown: the next
    /// physical CMD_SYNC for the guest comes with TLBI_NH_ALL and CFGI_STE of every nested
    /// stream, so the retried guest CMD_SYNC completes a superset of what was lost.
    recover_full: bool,
    ste_budget: TokenBucket,
    sync_budget: TokenBucket,
    /// Interrupts raised while moving along, for the caller.
    raised: Irqs,
    stats: Stats,
    /// What covered each guest CMD_SYNC made visible, for the fuzz harness's invariant (i).
    #[cfg(any(test, feature = "fuzzing"))]
    visible_syncs: Vec<Cover>,
}

/// A trapped register write whose effect on the guest waits for the physical SMMU: what the
/// trap queued is published, and the physical CMD_SYNC (or the budget) waited for, outside the
/// VM's vSMMU lock ([`Outstanding::wait`]); then [`Vsmmu::complete`] goes on with the write
/// and makes what is complete visible, and says whether there is more to wait for. At most
/// [`MAX_ROUNDS`] rounds.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Outstanding {
    /// Interrupts to raise now.
    pub irqs: Irqs,
    /// The last [`Completion`](completion::Completion) this write added, until it is visible.
    upto: Option<u64>,
    /// Guest commands this write asked to have consumed: until [`Vsmmu`]'s count reaches it.
    target: Option<u64>,
    /// The physical CMD_SYNC to wait for first.
    ticket: Option<SyncTicket>,
    /// Or the clock reading to wait for (a budget's next token).
    until: Option<u64>,
    /// Physical commands were queued.
    publish: bool,
}

impl Outstanding {
    /// Something is left to do: [`Outstanding::wait`], then [`Vsmmu::complete`]. Once it is
    /// not, [`Outstanding::publish`].
    pub fn pending(&self) -> bool {
        self.upto.is_some() || self.target.is_some()
    }

    /// Publishes what the write queued and waits for what it needs first: its physical CMD_SYNC
    /// or its budget's next token. Call without the VM's vSMMU lock.
    pub fn wait(&self, phys: &impl PhysicalSmmu) -> Result<(), DriverError> {
        self.publish(phys);
        if let Some(t) = self.until {
            phys.wait_until(t);
        }
        match self.ticket {
            Some(t) => phys.wait(t),
            None => Ok(()),
        }
    }

    /// Hands to the SMMU what the write queued, if anything (the last round of a write that is
    /// no longer [`Outstanding::pending`]; [`Outstanding::wait`] does it for the others). Call
    /// without the VM's vSMMU lock.
    pub fn publish(&self, phys: &impl PhysicalSmmu) {
        if self.publish {
            phys.publish();
        }
    }
}
impl Vsmmu {
    /// A vSMMU at its reset state. Call [`Vsmmu::reset`] before the guest runs, to put the
    /// physical STEs in the matching state.
    pub fn new(cfg: VsmmuConfig) -> Self {
        let streams = cfg
            .streams
            .iter()
            .map(|&map| Stream {
                map,
                phys: None,
                bad: None,
                dirty: None,
                named: false,
                bad_logged: false,
                making: None,
            })
            .collect();
        let b = cfg.budget;
        // The merge window holds at most the TLBIs one trap keeps, a TLBI_NH_ALL, a CFGI_CD and
        // a CFGI_STE per stream, and the full invalidation after an error.
        let window = usize::from(b.tlbi_per_trap) + 2 * cfg.streams.len() + 4;
        Self {
            r: RegState {
                gbpa: GBPA_RESET,
                ..RegState::default()
            },
            streams,
            batch: cmdq::Batch::with_capacity(window),
            unsynced: false,
            fetched: 0,
            consumed: 0,
            stopped: false,
            inflight: Inflight::with_capacity(16),
            next_id: 0,
            pending_tail: 0,
            stream_work: false,
            syncs: VecDeque::with_capacity(16),
            done_seq: 0,
            queued: 0,
            done_queued: 0,
            unpublished: false,
            pause: None,
            config_cover: Cover::Now,
            barrier: false,
            gbpa_updates: 0,
            recover_full: false,
            ste_budget: TokenBucket::new(b.ste_burst, b.ste_period_ns),
            sync_budget: TokenBucket::new(b.sync_burst, b.sync_period_ns),
            raised: Irqs::empty(),
            stats: Stats::default(),
            #[cfg(any(test, feature = "fuzzing"))]
            visible_syncs: Vec::new(),
            cfg,
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &VsmmuConfig {
        &self.cfg
    }

    /// Counters since the last reset.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The physical STE last written for each StreamID: (psid, STE).
    pub fn physical_stes(&self) -> impl Iterator<Item = (u32, Option<Ste>)> + '_ {
        self.streams.iter().map(|s| (s.map.psid, s.phys))
    }

    /// Architectural reset (a VM boot or reboot): registers to their reset values, every stream
    /// to what GBPA's reset value gives (stage 2 only; no STE work where it already is), and
    /// the VM's stage-1 TLB entries dropped so that nothing the previous guest cached survives.
    /// Touches only the VM's StreamIDs and VMID. The hypervisor's control path: it waits for
    /// the physical SMMU holding the model (the VM's own lock, no other).
    pub fn reset(&mut self, phys: &mut impl PhysicalSmmu) {
        // What earlier traps queued completes first: nothing of it may land after the reset.
        self.settle(phys);
        let b = self.cfg.budget;
        self.r = RegState {
            gbpa: GBPA_RESET,
            ..RegState::default()
        };
        self.batch.clear();
        self.unsynced = false;
        self.fetched = 0;
        self.stopped = false;
        self.inflight.clear();
        self.pending_tail = 0;
        self.pause = None;
        self.config_cover = Cover::Now;
        self.barrier = false;
        self.gbpa_updates = 0;
        self.recover_full = false;
        self.ste_budget = TokenBucket::new(b.ste_burst, b.ste_period_ns);
        self.sync_budget = TokenBucket::new(b.sync_burst, b.sync_period_ns);
        self.stats = Stats::default();
        for s in &mut self.streams {
            // Not known: the driver compares with what its table holds.
            s.phys = None;
            s.named = false;
        }
        self.invalidate(None, false, false);
        self.reshadow_now(&NoMemory, phys);
        self.batch
            .push_tlbi(Command::TlbiNhAll { vmid: self.vmid() }, usize::MAX);
        self.settle(phys);
    }

    /// Aborts every stream of the VM (a VM stopped, or about to be reloaded): each physical
    /// STE aborts, and the VMID's TLB entries and the CFGI_STEs complete under one CMD_SYNC
    /// before this returns, so none of its devices' DMA reaches memory afterwards whatever its
    /// guest's tables said. The next [`Vsmmu::reset`] sets them up again.
    pub fn abort_streams(&mut self, phys: &mut impl PhysicalSmmu) {
        self.settle(phys);
        for i in 0..self.streams.len() {
            self.write_now(i, Ste::abort(), phys);
        }
        self.batch
            .push_tlbi(Command::TlbiNhAll { vmid: self.vmid() }, usize::MAX);
        self.settle(phys);
    }

    fn vmid(&self) -> u16 {
        self.cfg.s2.vmid
    }

    /// A guest write of `value` to register `off` (`size` 4 or 8 bytes), carried out to the
    /// end: [`Vsmmu::write_start`], then [`Outstanding::wait`] and [`Vsmmu::complete`] while
    /// [`Outstanding::pending`] (the waits with the model held: for tests and the hypervisor's
    /// own use). Returns the wired interrupts to raise.
    pub fn write(
        &mut self,
        off: u64,
        size: u8,
        value: u64,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Irqs {
        let mut o = self.write_start(off, size, value, mem, phys);
        let mut irqs = o.irqs;
        for _ in 0..MAX_ROUNDS {
            if !o.pending() {
                break;
            }
            let waited = o.wait(phys);
            o = self.complete(o, waited, mem, phys);
            irqs |= o.irqs;
        }
        o.publish(phys);
        irqs
    }

    /// A guest write of `value` to register `off` (`size` 4 or 8 bytes), up to what waits for
    /// the physical SMMU. While [`Outstanding::pending`], finish it with
    /// [`Outstanding::wait`] (without the model's lock) and [`Vsmmu::complete`].
    pub fn write_start(
        &mut self,
        off: u64,
        size: u8,
        value: u64,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Outstanding {
        let first = self.next_id;
        let mut target = None;
        self.write_regs(off, size, value, &mut target);
        let irqs = self.advance(mem, phys);
        let upto = (self.next_id != first).then(|| self.next_id - 1);
        self.outstanding(irqs, upto, target)
    }

    /// Goes on with the write `o` after [`Outstanding::wait`] returned `waited`: records what
    /// completed (or reports a failed physical CMD_SYNC to the guest as CERROR_ABT), resumes
    /// what was paused, makes visible what is complete (the guest's CONS moves, the MSIs of its
    /// completed CMD_SYNCs are written, errors are raised; other vCPUs' completions queued
    /// before are made visible too, the physical queue completes in order), and returns what
    /// is left, with the interrupts to raise now.
    pub fn complete(
        &mut self,
        o: Outstanding,
        waited: Result<(), DriverError>,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Outstanding {
        let mut irqs = Irqs::empty();
        if let Some(t) = o.ticket {
            match waited {
                Ok(()) => self.synced(t.seq()),
                Err(e) => irqs |= self.sync_failed(t, e, mem),
            }
        }
        let first = self.next_id;
        irqs |= self.advance(mem, phys);
        let upto = if self.next_id != first {
            Some(self.next_id - 1)
        } else {
            o.upto
        };
        self.outstanding(irqs, upto, o.target)
    }
}

/// Guest memory for paths that must not read any (reset: GBPA, not the stream table, applies).
struct NoMemory;

impl GuestMemory for NoMemory {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        Err(GuestMemError {
            ipa,
            len: buf.len() as u64,
        })
    }

    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        Err(GuestMemError {
            ipa,
            len: data.len() as u64,
        })
    }
}

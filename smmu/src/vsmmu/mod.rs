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
//! The physical command queue and stream table are shared by every VM (DESIGN.md section 5),
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
mod evtq;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
mod progress;
mod shadow;
mod stats;
mod streams;
#[cfg(test)]
mod tests;

use crate::bits;
use crate::budget::TokenBucket;
use crate::cmd::Command;
use crate::driver::{DmaMemory, DriverError, Smmu, SmmuRegs, SteBreak, SteWrite, SyncTicket};
use crate::event::{Event, EventKind};
use crate::queue::{Queue, OVERFLOW_FLAG};
use crate::regs::{self, Cr0, Gbpa, Gerror, IrqCtrl};
use crate::ste::{S2Config, Ste};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use bitflags::bitflags;

pub use crate::driver::EventFate;
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

/// Largest command queue a guest may have (IDR1.CMDQS): Linux needs more than 64 entries.
pub const CMDQS: u8 = 8;
/// Largest event queue a guest may have (IDR1.EVENTQS).
pub const EVENTQS: u8 = 7;
/// CMDQ_CONS.ERR [30:24].
const CONS_ERR: u32 = 0x7f00_0000;

/// State of one guest StreamID.
#[derive(Debug, Clone, Copy)]
struct Stream {
    map: StreamMap,
    /// The physical STE last written (asked for); `None`: not known, as after a reset.
    phys: Option<Ste>,
    /// When the guest's configuration for the stream is invalid, the event its SMMU would record
    /// for each transaction (the physical STE is then invalid and reports C_BAD_STE).
    bad: Option<EventKind>,
    /// Marked for reshadowing; `Some(true)` when a targeted CFGI_STE(_RANGE) asked for it,
    /// `Some(false)` for SMMUEN, GBPA and CFGI_ALL.
    dirty: Option<bool>,
    /// A guest CMD_CFGI_STE(_RANGE)/CFGI_ALL named the stream: a nested one gets a physical
    /// CMD_CFGI_STE even when its STE is unchanged (the SMMU may cache the guest's CD with it).
    named: bool,
    /// The current `bad` configuration was logged.
    bad_logged: bool,
    /// A break-before-make in progress: the make, and the physical CMD_SYNC after the break.
    making: Option<(SteBreak, u64)>,
}

/// Writable register state, at its architectural reset values by [`Default`] except GBPA.
#[derive(Debug, Clone, Copy, Default)]
struct RegState {
    cr0: u32,
    /// CR0ACK: follows CR0 once what the change started is complete.
    cr0ack: u32,
    cr1: u32,
    cr2: u32,
    gbpa: u32,
    irq_ctrl: u32,
    gerror: u32,
    gerrorn: u32,
    gerror_irq_cfg0: u64,
    gerror_irq_cfg1: u32,
    gerror_irq_cfg2: u32,
    strtab_base: u64,
    strtab_base_cfg: u32,
    cmdq_base: u64,
    cmdq_prod: u32,
    cmdq_cons: u32,
    eventq_base: u64,
    eventq_prod: u32,
    eventq_cons: u32,
    eventq_irq_cfg0: u64,
    eventq_irq_cfg1: u32,
    eventq_irq_cfg2: u32,
}

/// SMMU_GBPA at reset: SHCFG = 0b01 (use incoming), not aborting (IHI 0070 6.3.14): a guest
/// whose driver never ran, or that removed it, has its streams translated by stage 2 only.
const GBPA_RESET: u32 = 0x1000;
/// GBPA's writable fields: MemAttr, MTCFG, ALLOCCFG, SHCFG, PRIVCFG, INSTCFG, ABORT.
const GBPA_FIELDS: u32 = 0x001f_3f1f;
/// CR0 enables a stage-1-only SMMU without PRI, ATS or VMW has.
const CR0_FIELDS: u32 = Cr0::SMMUEN.bits() | Cr0::EVTQEN.bits() | Cr0::CMDQEN.bits();
/// CR2 without E2H (RES0 without IDR0.HYP).
const CR2_FIELDS: u32 = 0b110;
/// GERROR bits this SMMU can raise.
const GERROR_FIELDS: u32 = Gerror::CMDQ_ERR.bits()
    | Gerror::EVENTQ_ABT_ERR.bits()
    | Gerror::MSI_CMDQ_ABT_ERR.bits()
    | Gerror::MSI_EVENTQ_ABT_ERR.bits()
    | Gerror::MSI_GERROR_ABT_ERR.bits();
/// IRQ_CTRL without PRIQ_IRQEN.
const IRQ_FIELDS: u32 = IrqCtrl::GERROR_IRQEN.bits() | IrqCtrl::EVENTQ_IRQEN.bits();
/// IRQ_CFG0.ADDR [51:2].
const MSI_ADDR: u64 = bits::mask(51, 2);
/// Queue BASE registers: RA/WA [62], ADDR [51:5], LOG2SIZE [4:0].
const Q_BASE_FIELDS: u64 = 1 << 62 | bits::mask(51, 0);
/// STRTAB_BASE: RA [62], ADDR [51:6].
const STRTAB_BASE_FIELDS: u64 = 1 << 62 | bits::mask(51, 6);
/// STRTAB_BASE_CFG: FMT [17:16], SPLIT [10:6], LOG2SIZE [5:0].
const STRTAB_CFG_FIELDS: u32 = 0x3_07ff;

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
    /// Id of the next [`Completion`]: they are numbered in order, so the one at index `i` of
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

/// When a [`Completion`] may be made visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// Right away (after the completions before it).
    Now,
    /// Once this physical CMD_SYNC (a sequence number) has completed.
    Seq(u64),
    /// Once the physical CMD_SYNC that will cover it, not queued yet, has completed.
    Pending,
}

/// The completions in flight, in queue order: a vector taken from the front (a trap's
/// completions are usually all made visible by its own `complete`, leaving it empty, so it
/// costs less than a ring that wraps).
#[derive(Debug)]
struct Inflight {
    buf: Vec<Completion>,
    /// The first one still in flight.
    head: usize,
}

impl Inflight {
    fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
            head: 0,
        }
    }

    fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    fn is_empty(&self) -> bool {
        self.head == self.buf.len()
    }

    fn front(&self) -> Option<&Completion> {
        self.buf.get(self.head)
    }

    fn back(&self) -> Option<&Completion> {
        self.buf.last().filter(|_| !self.is_empty())
    }

    fn push_back(&mut self, c: Completion) {
        if self.head > 0 && self.head >= self.buf.len() / 2 {
            // Keep it compact when some stay in flight for long.
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.push(c);
    }

    fn pop_front(&mut self) -> Option<Completion> {
        let c = *self.buf.get(self.head)?;
        self.head += 1;
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        }
        Some(c)
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.head = 0;
    }

    /// The first `n`.
    fn first(&self, n: usize) -> &[Completion] {
        &self.buf[self.head..self.head + n.min(self.len())]
    }

    /// The last `n`.
    fn last_mut(&mut self, n: usize) -> &mut [Completion] {
        let from = self.buf.len() - n.min(self.len());
        &mut self.buf[from..]
    }
}

/// A change of the guest-visible state that waits for the physical SMMU.
#[derive(Debug, Clone, Copy)]
struct Completion {
    cover: Cover,
    what: Effect,
}

#[derive(Debug, Clone, Copy)]
enum Effect {
    /// The guest's CMDQ_CONS moves to `cons`; for a CMD_SYNC (`sync`), its completion MSI
    /// (address, data) if it asked for one.
    Cons {
        cons: u32,
        sync: bool,
        msi: Option<(u64, u32)>,
    },
    /// Consumption stopped on a refused command: CMDQ_CONS (with ERR) and GERROR.CMDQ_ERR.
    Error { cons: u32 },
    /// A GBPA update completed (UPDATE reads 0 once none is left).
    Gbpa,
    /// CR0ACK takes this value.
    Cr0Ack(u32),
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
    /// The last [`Completion`] this write added, until it is visible.
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

    fn vmid(&self) -> u16 {
        self.cfg.s2.vmid
    }

    fn cr0(&self) -> Cr0 {
        Cr0::from_bits_retain(self.r.cr0)
    }

    /// CR0 and CR0ACK together: a queue or table is in use while either says so.
    fn cr0_either(&self) -> Cr0 {
        Cr0::from_bits_retain(self.r.cr0 | self.r.cr0ack)
    }

    fn idr0(&self) -> u32 {
        // S1P, TTF = AArch64, COHACC, ASID16, MSI, TTENDIAN = little-endian, STALL_MODEL = no
        // stalls, TERM_MODEL = abort, ST_LEVEL = 2-level (IHI 0070 6.3.1). No S2P, HYP, ATS, PRI,
        // SEV, VMW, BTM, HTTU: a guest must not ask for what the VM cannot own.
        1 << 1 | 2 << 2 | 1 << 4 | 1 << 12 | 1 << 13 | 2 << 21 | 1 << 24 | 1 << 26 | 1 << 27
    }

    fn idr1(&self) -> u32 {
        // SIDSIZE [5:0], SSIDSIZE [10:6] = 0, PRIQS [15:11] = 0, EVENTQS [20:16], CMDQS [25:21].
        u32::from(self.cfg.sid_bits.min(32)) | u32::from(EVENTQS) << 16 | u32::from(CMDQS) << 21
    }

    fn idr3(&self) -> u32 {
        u32::from(self.cfg.phys_ril) << 10
    }

    fn idr5(&self) -> u32 {
        let oas = regs::bits_to_oas(self.cfg.oas_bits).unwrap_or(2);
        // Granules [6:4] as the physical SMMU has them; VAX [11:10] = 0 (no 52-bit VA: QEMU
        // refuses T0SZ < 16); STALL_MAX = 0.
        (self.cfg.phys_idr5 & 0x70) | u32::from(oas)
    }

    fn cmdq(&self) -> (u64, Queue) {
        let log2 = ((self.r.cmdq_base & 0x1f) as u8).min(CMDQS);
        let mut q = Queue::new(log2);
        q.set_prod(self.r.cmdq_prod);
        q.set_cons(self.fetched);
        (self.r.cmdq_base & bits::mask(51, 5), q)
    }

    fn eventq(&self) -> (u64, Queue) {
        let log2 = ((self.r.eventq_base & 0x1f) as u8).min(EVENTQS);
        let mut q = Queue::new(log2);
        q.set_prod(self.r.eventq_prod);
        q.set_cons(self.r.eventq_cons);
        (self.r.eventq_base & bits::mask(51, 5), q)
    }

    /// A guest read of register `off` (from the vSMMU base; `size` 4 or 8 bytes).
    pub fn read(&mut self, off: u64, size: u8) -> u64 {
        self.stats.reads[reg_index(off)] += 1;
        if off >= regs::MMIO_SIZE {
            return 0;
        }
        if size == 8 {
            if !off.is_multiple_of(8) {
                return 0;
            }
            return u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32;
        }
        u64::from(self.read32(off & !3))
    }

    fn read32(&self, off: u64) -> u32 {
        let r = &self.r;
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match off {
            regs::SMMU_IDR0 => self.idr0(),
            regs::SMMU_IDR1 => self.idr1(),
            regs::SMMU_IDR3 => self.idr3(),
            regs::SMMU_IDR5 => self.idr5(),
            // SMMUv3.2: RIL is a v3.2 feature.
            regs::SMMU_AIDR => 2,
            regs::SMMU_CR0 => r.cr0,
            regs::SMMU_CR0ACK => r.cr0ack,
            regs::SMMU_CR1 => r.cr1,
            regs::SMMU_CR2 => r.cr2,
            // UPDATE reads 1 while an update the guest asked for is not complete.
            regs::SMMU_GBPA => {
                r.gbpa
                    | if self.gbpa_updates > 0 {
                        Gbpa::UPDATE.bits()
                    } else {
                        0
                    }
            }
            regs::SMMU_IRQ_CTRL | regs::SMMU_IRQ_CTRLACK => r.irq_ctrl,
            regs::SMMU_GERROR => r.gerror,
            regs::SMMU_GERRORN => r.gerrorn,
            regs::SMMU_GERROR_IRQ_CFG0 => lo(r.gerror_irq_cfg0),
            0x6c => hi(r.gerror_irq_cfg0),
            regs::SMMU_GERROR_IRQ_CFG1 => r.gerror_irq_cfg1,
            regs::SMMU_GERROR_IRQ_CFG2 => r.gerror_irq_cfg2,
            regs::SMMU_STRTAB_BASE => lo(r.strtab_base),
            0x84 => hi(r.strtab_base),
            regs::SMMU_STRTAB_BASE_CFG => r.strtab_base_cfg,
            regs::SMMU_CMDQ_BASE => lo(r.cmdq_base),
            0x94 => hi(r.cmdq_base),
            regs::SMMU_CMDQ_PROD => r.cmdq_prod,
            regs::SMMU_CMDQ_CONS => r.cmdq_cons,
            regs::SMMU_EVENTQ_BASE => lo(r.eventq_base),
            0xa4 => hi(r.eventq_base),
            regs::SMMU_EVENTQ_IRQ_CFG0 => lo(r.eventq_irq_cfg0),
            0xb4 => hi(r.eventq_irq_cfg0),
            regs::SMMU_EVENTQ_IRQ_CFG1 => r.eventq_irq_cfg1,
            regs::SMMU_EVENTQ_IRQ_CFG2 => r.eventq_irq_cfg2,
            regs::SMMU_EVENTQ_PROD => r.eventq_prod,
            regs::SMMU_EVENTQ_CONS => r.eventq_cons,
            // IDR2/IDR4/IIDR, STATUSR, AGBPA, the PRI queue, reserved space: RAZ.
            _ => 0,
        }
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

    /// The register side of a write: what it changes, and what it sets off (completions,
    /// streams to reshadow, commands to consume up to `target`) for [`Vsmmu::advance`].
    fn write_regs(&mut self, off: u64, size: u8, value: u64, target: &mut Option<u64>) {
        self.stats.writes[reg_index(off)] += 1;
        if off >= regs::MMIO_SIZE {
            return;
        }
        if size == 8 {
            if !off.is_multiple_of(8) {
                return;
            }
            // A 64-bit access to a 64-bit register is one update; to a pair of 32-bit
            // registers it is two, low address first.
            if let Some(r) = self.reg64(off) {
                *r = value;
                self.mask_reg64(off);
                return;
            }
            self.write32(off, value as u32, target);
            self.write32(off + 4, (value >> 32) as u32, target);
            return;
        }
        let off = off & !3;
        let base = off & !7;
        if let Some(r) = self.reg64(base) {
            let shift = (off - base) * 8;
            *r = (*r & !(0xffff_ffff << shift)) | u64::from(value as u32) << shift;
            self.mask_reg64(base);
            return;
        }
        self.write32(off, value as u32, target);
    }

    /// The 64-bit register at `off`, if it is one and writable now (queue and table bases are
    /// read-only while their enable is set in CR0 or CR0ACK; IRQ_CFG registers while their
    /// interrupt is enabled; IHI 0070 6.3).
    fn reg64(&mut self, off: u64) -> Option<&mut u64> {
        let cr0 = self.cr0_either();
        let irq = IrqCtrl::from_bits_retain(self.r.irq_ctrl);
        let r = &mut self.r;
        match off {
            regs::SMMU_STRTAB_BASE if !cr0.contains(Cr0::SMMUEN) => Some(&mut r.strtab_base),
            regs::SMMU_CMDQ_BASE if !cr0.contains(Cr0::CMDQEN) => Some(&mut r.cmdq_base),
            regs::SMMU_EVENTQ_BASE if !cr0.contains(Cr0::EVTQEN) => Some(&mut r.eventq_base),
            regs::SMMU_GERROR_IRQ_CFG0 if !irq.contains(IrqCtrl::GERROR_IRQEN) => {
                Some(&mut r.gerror_irq_cfg0)
            }
            regs::SMMU_EVENTQ_IRQ_CFG0 if !irq.contains(IrqCtrl::EVENTQ_IRQEN) => {
                Some(&mut r.eventq_irq_cfg0)
            }
            _ => None,
        }
    }

    /// Clears the RES0 bits of a 64-bit register just written.
    fn mask_reg64(&mut self, off: u64) {
        let r = &mut self.r;
        match off {
            regs::SMMU_STRTAB_BASE => r.strtab_base &= STRTAB_BASE_FIELDS,
            regs::SMMU_CMDQ_BASE => r.cmdq_base &= Q_BASE_FIELDS,
            regs::SMMU_EVENTQ_BASE => r.eventq_base &= Q_BASE_FIELDS,
            regs::SMMU_GERROR_IRQ_CFG0 => r.gerror_irq_cfg0 &= MSI_ADDR,
            regs::SMMU_EVENTQ_IRQ_CFG0 => r.eventq_irq_cfg0 &= MSI_ADDR,
            _ => {}
        }
    }

    fn write32(&mut self, off: u64, v: u32, target: &mut Option<u64>) {
        let cr0 = self.cr0_either();
        let irq = IrqCtrl::from_bits_retain(self.r.irq_ctrl);
        match off {
            regs::SMMU_CR0 => self.write_cr0(v & CR0_FIELDS, target),
            // Table and queue attributes: fixed while anything that uses them is enabled.
            regs::SMMU_CR1 if cr0.bits() & CR0_FIELDS == 0 => self.r.cr1 = v & 0xfff,
            regs::SMMU_CR2 if !cr0.contains(Cr0::SMMUEN) => self.r.cr2 = v & CR2_FIELDS,
            // Only a write with UPDATE set takes effect (IHI 0070 6.3.14).
            regs::SMMU_GBPA if v & Gbpa::UPDATE.bits() != 0 => self.write_gbpa(v & GBPA_FIELDS),
            regs::SMMU_IRQ_CTRL => self.r.irq_ctrl = v & IRQ_FIELDS,
            regs::SMMU_GERRORN => {
                self.r.gerrorn = v & GERROR_FIELDS;
                // Acknowledging CMDQ_ERR restarts the queue at CONS (IHI 0070 7.1).
                if !self.cmdq_error_active() && self.r.cmdq_cons & CONS_ERR != 0 {
                    self.r.cmdq_cons &= !CONS_ERR;
                    self.stopped = false;
                    self.request_consumption(target);
                }
            }
            regs::SMMU_GERROR_IRQ_CFG1 if !irq.contains(IrqCtrl::GERROR_IRQEN) => {
                self.r.gerror_irq_cfg1 = v;
            }
            regs::SMMU_GERROR_IRQ_CFG2 if !irq.contains(IrqCtrl::GERROR_IRQEN) => {
                self.r.gerror_irq_cfg2 = v & 0x3f;
            }
            regs::SMMU_EVENTQ_IRQ_CFG1 if !irq.contains(IrqCtrl::EVENTQ_IRQEN) => {
                self.r.eventq_irq_cfg1 = v;
            }
            regs::SMMU_EVENTQ_IRQ_CFG2 if !irq.contains(IrqCtrl::EVENTQ_IRQEN) => {
                self.r.eventq_irq_cfg2 = v & 0x3f;
            }
            regs::SMMU_STRTAB_BASE_CFG if !cr0.contains(Cr0::SMMUEN) => {
                self.r.strtab_base_cfg = v & STRTAB_CFG_FIELDS;
            }
            regs::SMMU_CMDQ_PROD => {
                self.r.cmdq_prod = v & 0x000f_ffff;
                self.request_consumption(target);
            }
            regs::SMMU_CMDQ_CONS if !cr0.contains(Cr0::CMDQEN) => {
                self.r.cmdq_cons = v & 0x000f_ffff;
                self.fetched = self.r.cmdq_cons;
                self.stopped = false;
            }
            regs::SMMU_EVENTQ_PROD if !cr0.contains(Cr0::EVTQEN) => {
                self.r.eventq_prod = v & (OVERFLOW_FLAG | 0x000f_ffff);
            }
            regs::SMMU_EVENTQ_CONS => {
                self.r.eventq_cons = v & (OVERFLOW_FLAG | 0x000f_ffff);
            }
            // Read-only, RES0 or guarded: ignored, as the spec lets hardware do.
            _ => {}
        }
    }

    /// This write wants the guest's queue consumed up to its PROD: `target` is the count
    /// [`Vsmmu::consumed`] reaches then (at most one queue's worth on).
    fn request_consumption(&self, target: &mut Option<u64>) {
        if !self.can_consume() {
            return;
        }
        let (_, q) = self.cmdq();
        let ahead = u64::from(q.prod().wrapping_sub(q.cons()) & ((2 << q.log2size()) - 1))
            .min(u64::from(q.entries()));
        if ahead > 0 {
            let t = self.consumed + ahead;
            *target = Some(target.map_or(t, |x| x.max(t)));
        }
    }

    /// Whether guest commands can be consumed now (CMDQEN, no error standing).
    fn can_consume(&self) -> bool {
        self.cr0().contains(Cr0::CMDQEN) && !self.cmdq_error_active() && !self.stopped
    }

    /// CR0 (IHI 0070 6.3.9): SMMUEN puts the guest's stream table (or GBPA) in force, CMDQEN
    /// starts or stops consumption. CR0ACK follows once what the change set off is complete:
    /// the physical STEs it changed in force, and, when CMDQEN goes off, every command
    /// consumed so far complete ("the queue reads as stopped").
    fn write_cr0(&mut self, v: u32, target: &mut Option<u64>) {
        let old = self.cr0();
        self.r.cr0 = v;
        let new = self.cr0();
        if old.contains(Cr0::SMMUEN) != new.contains(Cr0::SMMUEN) {
            self.invalidate(None, false, false);
            // Invalidations consumed after it follow its STE changes.
            self.barrier = true;
        }
        if new.contains(Cr0::CMDQEN) && !old.contains(Cr0::CMDQEN) {
            self.request_consumption(target);
        }
        self.completion(Cover::Pending, Effect::Cr0Ack(v));
    }

    /// GBPA with UPDATE (IHI 0070 6.3.14). While SMMUEN is off a change of ABORT changes every
    /// stream's physical STE; that STE work is budgeted, and UPDATE reads 1 until it is done
    /// (software must poll it). A write while an update is still in progress takes its value
    /// last, and the update completes once, for that value. A change with no physical effect
    /// completes at once.
    fn write_gbpa(&mut self, v: u32) {
        let old = self.r.gbpa;
        self.r.gbpa = v;
        let abort = Gbpa::ABORT.bits();
        if self.cr0_either().contains(Cr0::SMMUEN) || (old ^ v) & abort == 0 {
            return;
        }
        self.invalidate(None, false, false);
        self.barrier = true;
        self.gbpa_updates += 1;
        self.completion(Cover::Pending, Effect::Gbpa);
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

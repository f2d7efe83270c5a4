//! The guest-facing SMMUv3: a register-level model of the SMMUv3 programming interface
//! (Arm IHI 0070) that advertises **stage 1 only**, and the glue that turns what a guest
//! programs into physical operations scoped to its VM.
//!
//! The guest owns a complete stage-1 SMMU: its stream table, context descriptors, page tables
//! and queues live in its own RAM. The hypervisor owns stage 2, the physical stream table and
//! the physical queues. Three paths connect them:
//!
//! - **Stream table shadowing** ([`shadow`]): on CMD_CFGI_STE(_RANGE)/CFGI_ALL, on SMMUEN and
//!   GBPA changes, the guest's STE for each StreamID the VM owns is read from guest memory and
//!   turned into a physical STE: stage-1 translate becomes nested (guest S1 over the VM's S2),
//!   bypass becomes stage-2 only, abort stays abort, and anything invalid or illegal becomes an
//!   invalid physical STE whose C_BAD_STE events are reported to the guest as the event its own
//!   SMMU would have recorded. StreamIDs the VM does not own are never touched.
//! - **Command queue emulation** ([`Vsmmu::write`] of CMDQ_PROD): the guest's commands are
//!   consumed inside the trap; TLB and CD invalidations are forwarded with the VM's VMID and the
//!   physical StreamID, a CMD_SYNC is completed (physical sync first) by the MSI write the guest
//!   asked for, so a guest map/unmap batch costs one trap.
//! - **Event forwarding** ([`Vsmmu::forward_event`]): physical events of the VM's streams that
//!   its stage 1 caused go into the guest's event queue; stage-2 faults stay the hypervisor's.
//!
//! Guest memory is reached only through [`GuestMemory`] (bounds-checked IPA accesses), the
//! physical SMMU only through [`PhysicalSmmu`].

mod cmdq;
mod evtq;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
mod shadow;
mod stats;
#[cfg(test)]
mod tests;

use crate::bits;
use crate::cmd::Command;
use crate::driver::{DmaMemory, DriverError, Smmu, SmmuRegs, SyncTicket};
use crate::event::{Event, EventKind};
use crate::queue::{Queue, OVERFLOW_FLAG};
use crate::regs::{self, Cr0, Gbpa, Gerror, IrqCtrl};
use crate::ste::{S2Config, Ste};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use bitflags::bitflags;

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
/// command queue nor one vCPU's wait holds up the VM's other vCPUs or other VMs.
pub trait PhysicalSmmu {
    /// Writes the physical STE of `sid` and makes the SMMU use it (CFGI_STE + CMD_SYNC, waited
    /// for: STE changes are the control path).
    fn set_ste(&mut self, sid: u32, ste: Ste) -> Result<(), DriverError>;
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
}

impl<R: SmmuRegs + Clone, M: DmaMemory> PhysicalSmmu for Smmu<R, M> {
    fn set_ste(&mut self, sid: u32, ste: Ste) -> Result<(), DriverError> {
        Smmu::set_ste(self, sid, ste)
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
}

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
}

/// Largest command queue a guest may have (IDR1.CMDQS): Linux needs more than 64 entries.
pub const CMDQS: u8 = 8;
/// Largest event queue a guest may have (IDR1.EVENTQS).
pub const EVENTQS: u8 = 7;
/// Physical commands gathered before they are submitted without a sync.
const BATCH: usize = 32;
/// Completions a VM has in flight in steady state (its vCPUs each wait for about one).
const INFLIGHT: usize = 16;
/// CMDQ_CONS.ERR [30:24].
const CONS_ERR: u32 = 0x7f00_0000;

/// State of one guest StreamID.
#[derive(Debug, Clone, Copy)]
struct Stream {
    map: StreamMap,
    /// The physical STE last written.
    phys: Option<Ste>,
    /// When the guest's configuration for the stream is invalid, the event its SMMU would record
    /// for each transaction (the physical STE is then invalid and reports C_BAD_STE).
    bad: Option<EventKind>,
    /// Marked for reshadowing; `Some(true)` when a targeted CFGI_STE(_RANGE) asked for it.
    dirty: Option<bool>,
    /// The current `bad` configuration was logged.
    bad_logged: bool,
}

/// Writable register state, at its architectural reset values by [`Default`] except GBPA.
#[derive(Debug, Clone, Copy, Default)]
struct RegState {
    cr0: u32,
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
    /// Forwarded physical commands not yet submitted.
    batch: Vec<Command>,
    /// Physical commands were submitted since the last physical CMD_SYNC.
    unsynced: bool,
    /// The guest's CMDQ_CONS as far as commands were consumed (its index and wrap bit); the
    /// guest's CMDQ_CONS register shows them once the physical CMD_SYNCs they wait for completed.
    fetched: u32,
    /// Consumption stopped on a command error that is not visible yet.
    stopped: bool,
    /// What the guest sees once physical CMD_SYNCs complete, in queue order.
    inflight: VecDeque<Completion>,
    /// Id of the next [`Completion`].
    next_id: u64,
    /// The latest physical CMD_SYNC queued, until it is known complete: a guest CMD_SYNC that
    /// forwards nothing new still waits for it.
    last_sync: Option<SyncTicket>,
    /// A trap queued physical commands that are not published yet.
    unpublished: bool,
    stats: Stats,
}

/// A change of the guest's command queue state that waits for a physical CMD_SYNC.
#[derive(Debug, Clone, Copy)]
struct Completion {
    id: u64,
    /// The guest's CMDQ_CONS from then on (with CMDQ_CONS.ERR when `error`).
    cons: u32,
    /// The completion MSI of a guest CMD_SYNC: address, data.
    msi: Option<(u64, u32)>,
    /// The queue stopped on a command error: GERROR.CMDQ_ERR.
    error: bool,
}

/// A trapped register write whose effect on the guest waits for the physical SMMU: what the
/// trap queued is published, and the physical CMD_SYNC waited for, outside the VM's vSMMU lock
/// ([`Outstanding::wait`]); then [`Vsmmu::complete`] makes it visible to the guest.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Outstanding {
    /// Interrupts to raise now.
    pub irqs: Irqs,
    /// The last [`Completion`] this write added.
    upto: Option<u64>,
    /// The physical CMD_SYNC it waits for.
    ticket: Option<SyncTicket>,
    /// Physical commands were queued.
    publish: bool,
}

impl Outstanding {
    /// Something is left to do: [`Outstanding::wait`], then [`Vsmmu::complete`].
    pub fn pending(&self) -> bool {
        self.upto.is_some() || self.publish
    }

    /// Publishes what the write queued and waits for its physical CMD_SYNC. Call without the
    /// VM's vSMMU lock.
    pub fn wait(&self, phys: &impl PhysicalSmmu) -> Result<(), DriverError> {
        match self.ticket {
            Some(t) => phys.wait(t),
            None => {
                if self.publish {
                    phys.publish();
                }
                Ok(())
            }
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
                bad_logged: false,
            })
            .collect();
        Self {
            cfg,
            r: RegState {
                gbpa: GBPA_RESET,
                ..RegState::default()
            },
            streams,
            batch: Vec::with_capacity(BATCH),
            unsynced: false,
            fetched: 0,
            stopped: false,
            inflight: VecDeque::with_capacity(INFLIGHT),
            next_id: 0,
            last_sync: None,
            unpublished: false,
            stats: Stats::default(),
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
    /// to what GBPA's reset value gives (stage 2 only), and the VM's stage-1 TLB entries dropped
    /// so that nothing the previous guest cached survives. Touches only the VM's StreamIDs and
    /// VMID.
    pub fn reset(&mut self, phys: &mut impl PhysicalSmmu) {
        self.r = RegState {
            gbpa: GBPA_RESET,
            ..RegState::default()
        };
        self.batch.clear();
        self.unsynced = false;
        self.fetched = 0;
        self.stopped = false;
        self.inflight.clear();
        self.stats = Stats::default();
        for s in &mut self.streams {
            s.phys = None;
        }
        self.reshadow(None, &NoMemory, phys);
        self.push(Command::TlbiNhAll { vmid: self.vmid() }, phys);
        self.flush_sync(phys);
        self.wait_all(phys);
    }

    fn vmid(&self) -> u16 {
        self.cfg.s2.vmid
    }

    fn cr0(&self) -> Cr0 {
        Cr0::from_bits_retain(self.r.cr0)
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
            regs::SMMU_CR0 | regs::SMMU_CR0ACK => r.cr0,
            regs::SMMU_CR1 => r.cr1,
            regs::SMMU_CR2 => r.cr2,
            regs::SMMU_GBPA => r.gbpa,
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
    /// end: [`Vsmmu::write_start`], [`Outstanding::wait`] and [`Vsmmu::complete`] in a row.
    /// Returns the wired interrupts to raise.
    pub fn write(
        &mut self,
        off: u64,
        size: u8,
        value: u64,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Irqs {
        let o = self.write_start(off, size, value, mem, phys);
        if !o.pending() {
            return o.irqs;
        }
        let waited = o.wait(phys);
        self.complete(o, waited, mem)
    }

    /// A guest write of `value` to register `off` (`size` 4 or 8 bytes), up to what waits for
    /// the physical SMMU. Finish it with [`Outstanding::wait`] and [`Vsmmu::complete`] when
    /// [`Outstanding::pending`].
    pub fn write_start(
        &mut self,
        off: u64,
        size: u8,
        value: u64,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Outstanding {
        let first = self.next_id;
        let irqs = self.write_regs(off, size, value, mem, phys);
        let upto = (self.next_id != first).then(|| self.next_id - 1);
        let publish = core::mem::take(&mut self.unpublished);
        let mut o = Outstanding {
            irqs,
            upto,
            ticket: self.last_sync,
            publish,
        };
        if o.upto.is_some() && o.ticket.is_none() {
            // Nothing physical to wait for: visible at once.
            o.irqs |= self.apply(o.upto, mem);
            o.upto = None;
        }
        o
    }

    /// Makes what `o`'s write waited for visible to the guest: its CONS moves, the MSIs of its
    /// completed CMD_SYNCs are written, a command error is raised. `waited` is what
    /// [`Outstanding::wait`] returned. Completions of other vCPUs' writes queued before it are
    /// made visible too (the physical queue completes in order). Returns the interrupts to
    /// raise.
    pub fn complete(
        &mut self,
        o: Outstanding,
        waited: Result<(), DriverError>,
        mem: &mut impl GuestMemory,
    ) -> Irqs {
        if let Err(e) = waited {
            log::error!("vsmmu: {}: physical CMD_SYNC: {e}", self.cfg.name);
        }
        if let (Some(t), Some(last)) = (o.ticket, self.last_sync) {
            if last.seq() <= t.seq() {
                self.last_sync = None;
            }
        }
        o.irqs | self.apply(o.upto, mem)
    }

    /// Applies the completions up to id `upto`, in order.
    fn apply(&mut self, upto: Option<u64>, mem: &mut impl GuestMemory) -> Irqs {
        let Some(upto) = upto else {
            return Irqs::empty();
        };
        let mut irqs = Irqs::empty();
        while let Some(c) = self.inflight.front().copied() {
            if c.id > upto {
                break;
            }
            self.inflight.pop_front();
            self.r.cmdq_cons = c.cons;
            if let Some((addr, data)) = c.msi {
                // The MSI is a 32-bit write of MSIData to MSIAddr (IHI 0070 4.7.3). Linux
                // points it at the CMD_SYNC's own slot and polls that word in RAM.
                if mem.write(addr, &data.to_le_bytes()).is_err() {
                    irqs |= self.raise_gerror(Gerror::MSI_CMDQ_ABT_ERR, mem);
                }
            }
            if c.error {
                irqs |= self.raise_gerror(Gerror::CMDQ_ERR, mem);
            }
        }
        irqs
    }

    /// Waits (holding the model) for the last physical CMD_SYNC and applies every completion:
    /// for the control path (the guest disables its queue, a reset).
    fn wait_all(&mut self, phys: &mut impl PhysicalSmmu) {
        if let Some(t) = self.last_sync.take() {
            if let Err(e) = phys.wait(t) {
                log::error!("vsmmu: {}: physical CMD_SYNC: {e}", self.cfg.name);
            }
        } else if core::mem::take(&mut self.unpublished) {
            phys.publish();
        }
    }

    fn write_regs(
        &mut self,
        off: u64,
        size: u8,
        value: u64,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Irqs {
        self.stats.writes[reg_index(off)] += 1;
        if off >= regs::MMIO_SIZE {
            return Irqs::empty();
        }
        if size == 8 {
            if !off.is_multiple_of(8) {
                return Irqs::empty();
            }
            // A 64-bit access to a 64-bit register is one update; to a pair of 32-bit
            // registers it is two, low address first.
            if let Some(r) = self.reg64(off) {
                *r = value;
                self.mask_reg64(off);
                return Irqs::empty();
            }
            let a = self.write32(off, value as u32, mem, phys);
            return a | self.write32(off + 4, (value >> 32) as u32, mem, phys);
        }
        let off = off & !3;
        let base = off & !7;
        if let Some(r) = self.reg64(base) {
            let shift = (off - base) * 8;
            *r = (*r & !(0xffff_ffff << shift)) | u64::from(value as u32) << shift;
            self.mask_reg64(base);
            return Irqs::empty();
        }
        self.write32(off, value as u32, mem, phys)
    }

    /// The 64-bit register at `off`, if it is one and writable now (queue and table bases are
    /// read-only while their enable is set; IRQ_CFG registers while their interrupt is enabled;
    /// IHI 0070 6.3).
    fn reg64(&mut self, off: u64) -> Option<&mut u64> {
        let cr0 = self.cr0();
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

    fn write32(
        &mut self,
        off: u64,
        v: u32,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Irqs {
        let cr0 = self.cr0();
        let irq = IrqCtrl::from_bits_retain(self.r.irq_ctrl);
        match off {
            regs::SMMU_CR0 => return self.write_cr0(v & CR0_FIELDS, mem, phys),
            // Table and queue attributes: fixed while anything that uses them is enabled.
            regs::SMMU_CR1 if cr0.bits() & CR0_FIELDS == 0 => self.r.cr1 = v & 0xfff,
            regs::SMMU_CR2 if !cr0.contains(Cr0::SMMUEN) => self.r.cr2 = v & CR2_FIELDS,
            // Only a write with UPDATE set takes effect; the update completes at once, so
            // UPDATE always reads 0 (IHI 0070 6.3.14).
            regs::SMMU_GBPA if v & Gbpa::UPDATE.bits() != 0 => {
                let old = self.r.gbpa;
                self.r.gbpa = v & GBPA_FIELDS;
                if !cr0.contains(Cr0::SMMUEN) && old != self.r.gbpa {
                    self.reshadow(None, mem, phys);
                }
            }
            regs::SMMU_IRQ_CTRL => self.r.irq_ctrl = v & IRQ_FIELDS,
            regs::SMMU_GERRORN => {
                self.r.gerrorn = v & GERROR_FIELDS;
                // Acknowledging CMDQ_ERR restarts the queue at CONS (IHI 0070 7.1).
                if !self.cmdq_error_active() && self.r.cmdq_cons & CONS_ERR != 0 {
                    self.r.cmdq_cons &= !CONS_ERR;
                    self.stopped = false;
                }
                return self.process_cmdq(mem, phys);
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
                return self.process_cmdq(mem, phys);
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
        Irqs::empty()
    }

    fn write_cr0(
        &mut self,
        v: u32,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Irqs {
        let old = self.cr0();
        self.r.cr0 = v;
        let new = self.cr0();
        if old.contains(Cr0::SMMUEN) != new.contains(Cr0::SMMUEN) {
            // Enabling puts the guest's stream table in force; disabling puts GBPA in force.
            self.reshadow(None, mem, phys);
        }
        if new.contains(Cr0::CMDQEN) && !old.contains(Cr0::CMDQEN) {
            return self.process_cmdq(mem, phys);
        }
        if old.contains(Cr0::CMDQEN) && !new.contains(Cr0::CMDQEN) {
            // Everything consumed so far completes before the queue reads as stopped.
            self.wait_all(phys);
            return self.apply(Some(u64::MAX), mem);
        }
        Irqs::empty()
    }

    /// Marks the VM's streams whose guest StreamID is in `[start, start + n)` (all of them for
    /// `None`) for reshadowing. `targeted`: the guest invalidated them one by one, so it means
    /// them to be usable (at SMMUEN or CFGI_ALL a driver has not set up every stream yet).
    fn invalidate(&mut self, range: Option<(u32, u64)>, targeted: bool) {
        for s in &mut self.streams {
            if let Some((start, n)) = range {
                let v = u64::from(s.map.vsid);
                if v < u64::from(start) || v >= u64::from(start) + n {
                    continue;
                }
            }
            s.dirty = Some(targeted || s.dirty == Some(true));
        }
    }

    /// Recomputes and writes the physical STE of every stream marked by [`Vsmmu::invalidate`].
    /// Deferring the work to the next CMD_SYNC (or the end of the trap) is what the spec allows
    /// (a CMD_CFGI_* has completed only once a later CMD_SYNC has) and bounds what a guest
    /// flooding its queue with invalidations costs: one STE write per stream per sync.
    fn reshadow_dirty(&mut self, mem: &impl GuestMemory, phys: &mut impl PhysicalSmmu) {
        if self.streams.iter().all(|s| s.dirty.is_none()) {
            // Every CMD_SYNC and trap comes here: keep the common case out of the loop below.
            return;
        }
        let enabled = self.cr0().contains(Cr0::SMMUEN);
        let table = StreamTableCfg {
            base: self.r.strtab_base,
            cfg: self.r.strtab_base_cfg,
            sid_bits: self.cfg.sid_bits,
        };
        for i in 0..self.streams.len() {
            let s = self.streams[i];
            let Some(targeted) = s.dirty else { continue };
            let (ste, bad) = if enabled {
                match table.fetch(s.map.vsid, mem) {
                    Ok(g) => shadow_ste(&g, &self.cfg),
                    Err(kind) => (Ste::default(), Some(kind)),
                }
            } else if self.r.gbpa & Gbpa::ABORT.bits() != 0 {
                (Ste::abort(), None)
            } else {
                (Ste::stage2(self.cfg.s2), None)
            };
            // Logged once per bad configuration, when the guest invalidates the stream by name
            // (at SMMUEN or CFGI_ALL a driver has not set up every stream yet).
            let logged = if s.bad == bad { s.bad_logged } else { false };
            let log_now = targeted && !logged;
            if let (Some(kind), true) = (bad, log_now) {
                log::warn!(
                    "vsmmu: {}: StreamID {}: guest configuration is invalid ({}): its transactions abort",
                    self.cfg.name,
                    s.map.vsid,
                    kind.name()
                );
            }
            self.streams[i].bad_logged = logged || (log_now && bad.is_some());
            if s.phys == Some(ste) {
                // Unchanged: only the invalidation the guest asked for (the physical SMMU may
                // cache the CD along with the STE), completed by the guest's next CMD_SYNC.
                self.push(
                    Command::CfgiSte {
                        sid: s.map.psid,
                        leaf: true,
                    },
                    phys,
                );
            } else {
                self.stats.ste_writes += 1;
                if let Err(e) = phys.set_ste(s.map.psid, ste) {
                    log::error!("vsmmu: {}: physical STE {}: {e}", self.cfg.name, s.map.psid);
                }
            }
            let st = &mut self.streams[i];
            st.phys = Some(ste);
            st.bad = bad;
            st.dirty = None;
        }
    }

    /// Reshadows the streams in the range now (SMMUEN, GBPA and reset changes).
    fn reshadow(
        &mut self,
        range: Option<(u32, u64)>,
        mem: &impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) {
        self.invalidate(range, false);
        self.reshadow_dirty(mem, phys);
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

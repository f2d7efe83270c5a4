//! The physical SMMUv3 driver: probe and reset, the stream table, the command queue and the event
//! queue. It owns the physical SMMU; guests only ever reach it through the vSMMU, and only with
//! operations scoped to their own StreamIDs and VMID (docs/design.md section 5).
//!
//! Hardware is reached through [`SmmuRegs`] (MMIO) and [`DmaMemory`] (memory the SMMU reads and
//! writes: tables and queues), so all of it runs on the host against a fake.
//!
//! A CMD_SYNC completes by an MSI write into the hypervisor's memory where SMMU_IDR0.MSI says the
//! SMMU can (CS = SIG_IRQ; [`Cmdq::with_msi_completion`]), otherwise by polling SMMU_CMDQ_CONS
//! (CS = SIG_NONE), as on QEMU's `virt` SMMU, which has neither MSI nor SEV (QEMU 10.0
//! `hw/arm/smmuv3.c`: SMMU_IDR0.MSI and SEV are 0). SEV (a WFE between polls) is not used: a
//! WFE is only bounded with the generic timer's event stream on, which would also wake every
//! guest's WFE. Every wait is bounded by [`SmmuConfig::poll_limit`].

use crate::budget::TokenBucket;
use crate::cmd::Command;
use crate::event::Event;
use crate::queue::{overflow_pending, Queue, OVERFLOW_FLAG};
use crate::regs::{
    self, Cerror, Cr0, Cr2, Gbpa, Gerror, Idr0, Idr1, Idr5, IrqCtrl, StLevel, StallModel, StrtabFmt,
};
use crate::ste::Ste;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

mod cmdq;
#[cfg(test)]
pub(crate) mod fake;

pub use cmdq::{Cmdq, QueueMemory, SyncTicket};

/// 32- and 64-bit access to the SMMU's register pages; `off` is from the SMMU base (page 1
/// registers are at [`regs::PAGE1`] + offset).
///
/// A hardware implementation must order accesses like Linux's `writel`/`readl`: every write is
/// preceded by a barrier that makes earlier normal-memory writes (queue entries, STEs) visible to
/// the SMMU (`dsb st`, or `dmb oshst` for a coherent SMMU), and every read is followed by a barrier
/// before later normal-memory reads (`dmb oshld`), so an event record is read only after the PROD
/// that covers it. Accesses are single-copy atomic of the given width.
pub trait SmmuRegs {
    /// Reads a 32-bit register.
    fn read32(&self, off: u64) -> u32;
    /// Writes a 32-bit register.
    fn write32(&self, off: u64, v: u32);
    /// Reads a 64-bit register.
    fn read64(&self, off: u64) -> u64;
    /// Writes a 64-bit register.
    fn write64(&self, off: u64, v: u64);
}

/// Physical memory the SMMU accesses: the stream table and the queues. The driver requires
/// SMMU_IDR0.COHACC and programs cacheable, inner-shareable accesses, so normal write-back memory
/// needs no cache maintenance.
pub trait DmaMemory {
    /// Allocates `size` zeroed bytes aligned to `align` (a power of two) and returns their PA.
    fn alloc_zeroed(&mut self, size: usize, align: usize) -> Result<u64, DriverError>;
    /// Writes `data` at `pa`, in ascending address order, each aligned doubleword single-copy
    /// atomically.
    fn write(&mut self, pa: u64, data: &[u8]);
    /// Reads `buf.len()` bytes at `pa`.
    fn read(&self, pa: u64, buf: &mut [u8]);
    /// Orders the writes before it before the writes after it as the SMMU observes them
    /// (`dmb ishst` on hardware; nothing on the host). Used between STE words and before
    /// publishing a new L2 table.
    fn write_barrier(&mut self) {}

    /// The command queue's memory as several CPUs write it at once.
    type Queue: QueueMemory;
    /// A handle on the `size` bytes at `pa` (an allocation of this memory) through which they
    /// are written from any CPU without `&mut` access to the allocator.
    fn queue_memory(&self, pa: u64, size: usize) -> Self::Queue;
}

/// Driver failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The SMMU lacks a feature the hypervisor depends on; the text names the ID register field.
    #[error("SMMU lacks a required feature: {0}")]
    MissingFeature(&'static str),
    /// A bounded poll gave up; the text says what was awaited.
    #[error("SMMU timed out waiting for {0}")]
    Timeout(&'static str),
    /// [`DmaMemory::alloc_zeroed`] could not satisfy a request.
    #[error("out of memory for SMMU structures")]
    OutOfMemory,
    /// The command queue stopped on a command (GERROR.CMDQ_ERR). The driver replaced it with a
    /// CMD_SYNC and acknowledged the error, so the queue runs again.
    #[error("SMMU command error {cerror:?} at command queue index {index}: {command:#x?}")]
    CommandError {
        /// SMMU_CMDQ_CONS.ERR.
        cerror: Cerror,
        /// The queue slot of the failed command.
        index: u32,
        /// The failed command's two doublewords as the SMMU saw them.
        command: [u64; 2],
    },
    /// A StreamID beyond what the stream table covers.
    #[error("StreamID {sid:#x} beyond the stream table ({sid_bits} bits)")]
    StreamIdOutOfRange {
        /// The StreamID.
        sid: u32,
        /// StreamID bits the table covers.
        sid_bits: u8,
    },
}

/// Tunables of [`Smmu::probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuConfig {
    /// Use a linear stream table when SMMU_IDR1.SIDSIZE is at most this (Linux uses 8).
    pub linear_max_sid_bits: u8,
    /// StreamID bits the stream table covers at most (16 covers all PCI RIDs of one segment).
    pub max_sid_bits: u8,
    /// log2 of the command queue entries at most (min with SMMU_IDR1.CMDQS).
    pub cmdq_max_log2: u8,
    /// log2 of the event queue entries at most (min with SMMU_IDR1.EVENTQS).
    pub evtq_max_log2: u8,
    /// Register reads before a poll gives up with [`DriverError::Timeout`].
    pub poll_limit: u32,
    /// What each stream may put in the shared event queue ([`Smmu::poll_events`]).
    pub events: EventBudget,
}

/// log2 of the physical event queue's entries by default: 2^14 records (512 KiB). The queue
/// is shared: the more a flood of one stream needs to fill it between two drains, the longer a
/// drain can be late (a CPU busy in a trap, the event interrupt behind others) before any record,
/// of any VM, is lost; the per-stream budget below then stops the flood.
pub const EVTQ_LOG2: u8 = 14;

/// Quarantines in a row (each beginning within its predecessor's cool-down of its end) after
/// which the cool-down stops doubling: 2^7 = 128 times the base, 1.28 s by default.
const MAX_STRIKES: u8 = 7;

impl Default for SmmuConfig {
    fn default() -> Self {
        Self {
            linear_max_sid_bits: 8,
            max_sid_bits: 16,
            cmdq_max_log2: 8,
            // 32 KiB: room for a burst of one stream's faults before its budget stops them, with
            // the other streams' records still fitting.
            evtq_max_log2: EVTQ_LOG2,
            poll_limit: 1_000_000,
            events: EventBudget::default(),
        }
    }
}

/// The share of the physical event queue each StreamID gets (docs/design.md section 10): a token
/// bucket of records per stream. A stream that runs out is **quarantined**: its STE is made to
/// abort, which records no events (STE.Config = 0b0xx, IHI 0070 5.2), for `cooldown_ns`, then
/// the STE it had (or was given meanwhile) is restored. A device that faults without end so
/// puts at most `burst` records per cool-down into the queue, however fast it faults, and
/// every other stream's records keep their room. Each quarantine that follows the previous
/// one's end within a cool-down doubles the next cool-down, up to 8 times.
///
/// STE.MEV (merge events) would be gentler, but whether and how an SMMU merges is
/// IMPLEMENTATION DEFINED (QEMU does not), so the budget cannot rest on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBudget {
    /// Records a stream may have delivered at once.
    pub burst: u32,
    /// One more record per this many nanoseconds.
    pub period_ns: u64,
    /// How long an exhausted stream aborts before its STE is restored.
    pub cooldown_ns: u64,
}

impl Default for EventBudget {
    fn default() -> Self {
        Self {
            // A drain charges the records it finds at once: the burst absorbs what one stream
            // records between two drains (the hypervisor drains on the event interrupt, and
            // every few timer ticks), and leaves most of the 2^14-entry queue to the others.
            burst: 64,
            // 4000 records per second per stream in steady state: a driver logging faults
            // keeps them all, a device faulting in a loop gets quarantined.
            period_ns: 250_000,
            cooldown_ns: 10_000_000,
        }
    }
}

/// What became of one physical event record ([`Smmu::poll_events`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFate {
    /// Within its stream's budget: route it.
    Deliver,
    /// This record exhausted its stream's budget: the stream now aborts (no more records) for
    /// the cool-down. Route it still; it stands for the records the cool-down suppresses.
    Quarantined,
    /// Its stream is over budget or quarantined (recorded before the abort took effect):
    /// dropped, only to be counted.
    Suppressed,
}

/// Streams tracked for the event budget at most (a StreamID past them gets no budget of its
/// own and is suppressed once they are all in use: the map stays bounded).
const TRACKED_STREAMS: usize = 4096;

/// One stream's share of the event queue.
#[derive(Debug, Clone, Copy)]
struct StreamEvents {
    bucket: TokenBucket,
    /// While quarantined: the STE to restore and when.
    quarantine: Option<Quarantine>,
    /// Consecutive quarantines (the cool-down doubles with each, up to 2^[`MAX_STRIKES`] x).
    strikes: u8,
    /// When the last quarantine ended.
    released: u64,
}

#[derive(Debug, Clone, Copy)]
struct Quarantine {
    /// The STE the stream gets back (the last one asked for while it was quarantined).
    saved: Ste,
    until: u64,
}

/// Counters of the physical driver since probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DriverStats {
    /// Event records dropped by the per-stream budget.
    pub events_suppressed: u64,
    /// Streams quarantined for faulting beyond their budget.
    pub quarantines: u64,
    /// Quarantined streams restored.
    pub restores: u64,
    /// Stalled transactions terminated (CMD_RESUME, Action = abort).
    pub stalls_terminated: u64,
}

/// What [`Smmu::write_ste`] did and what is left to make the SMMU use the new STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum SteWrite {
    /// The table already holds this STE: nothing written, nothing to invalidate.
    Unchanged,
    /// Written; in force once this CMD_CFGI_STE and a CMD_SYNC after it have completed.
    Written(Command),
    /// A valid STE changing in more than one doubleword: its word 0 now aborts (break). Queue
    /// [`SteBreak::cfgi`], wait for a CMD_SYNC after it, then [`Smmu::make_ste`].
    Broken(SteBreak),
}

/// The second half of a break-before-make STE update ([`SteWrite::Broken`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct SteBreak {
    /// StreamID.
    pub sid: u32,
    /// The STE to make.
    pub ste: Ste,
    /// The CMD_CFGI_STE that makes the break (and then the make) known to the SMMU.
    pub cfgi: Command,
}

/// CMD_RESUME Action = abort (IHI 0070 4.7.2; Linux `CMDQ_RESUME_0_RESP_ABORT`): the stalled
/// transaction is aborted.
pub const RESUME_ABORT: u8 = 2;

/// SPLIT of a 2-level stream table: each L2 table holds 2^8 STEs (one PCI bus), 16 KiB.
pub const STRTAB_SPLIT: u8 = 8;
const L2_STES: usize = 1 << STRTAB_SPLIT;
const L2_BYTES: usize = L2_STES * Ste::SIZE;

/// Where the STEs live.
#[derive(Debug)]
enum StreamTable {
    Linear {
        base: u64,
    },
    TwoLevel {
        l1_base: u64,
        /// PA of each L1 descriptor's L2 table, once allocated.
        l2: Vec<Option<u64>>,
    },
}

/// What probe found, for the rest of the hypervisor (and the vSMMU's ID registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// SMMU_IDR0 as read.
    pub idr0: Idr0,
    /// SMMU_IDR1 as read.
    pub idr1: Idr1,
    /// SMMU_IDR5 as read.
    pub idr5: Idr5,
    /// StreamID bits the stream table covers.
    pub sid_bits: u8,
    /// VMID bits (16 with SMMU_IDR0.VMID16, else 8).
    pub vmid_bits: u8,
    /// Output address bits (SMMU_IDR5.OAS).
    pub oas_bits: u8,
    /// Stage 1 and stage 2 both present: nested STEs (and so vSMMU assignment) work.
    pub nesting: bool,
    /// The stream table is 2-level (SPLIT = [`STRTAB_SPLIT`]) rather than linear.
    pub two_level: bool,
    /// SMMU_IDR0.STALL_MODEL, which every STE written honours ([`Smmu::write_ste`]).
    pub stall_model: StallModel,
}

/// Result of [`Smmu::poll_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventPoll {
    /// Records consumed (whatever their [`EventFate`]).
    pub events: usize,
    /// The SMMU dropped records since the last poll (EVENTQ_PROD.OVFLG toggled); acknowledged.
    pub overflowed: bool,
    /// Stalled transactions terminated with CMD_RESUME (Action = abort).
    pub stalls_terminated: usize,
}

/// The physical SMMU.
#[derive(Debug)]
pub struct Smmu<R, M: DmaMemory> {
    regs: R,
    mem: M,
    cfg: SmmuConfig,
    features: Features,
    strtab: StreamTable,
    cmdq: Arc<Cmdq<R, M::Queue>>,
    evtq: Queue,
    evtq_base: u64,
    evtq_ovack: u32,
    /// Quarantines [`Smmu::poll_events`] started and nobody has reported yet: (StreamID,
    /// cool-down in nanoseconds).
    new_quarantines: Vec<(u32, u64)>,
    /// The event budget of each stream that had a record.
    events: BTreeMap<u32, StreamEvents>,
    /// The earliest end of a quarantine.
    next_restore: Option<u64>,
    stats: DriverStats,
}

impl<R: SmmuRegs + Clone, M: DmaMemory> Smmu<R, M> {
    /// Probes and resets the SMMU, leaving it enabled with every StreamID aborting (IHI 0070
    /// ch. 3 describes the initialization steps; the order follows Linux's `arm_smmu_device_reset`):
    /// ID register checks; GBPA = abort (so nothing bypasses while SMMUEN = 0); CR0 = 0; stream
    /// table, queues, CR1, CR2; CMDQEN; CFGI_ALL + TLBI_NSNH_ALL (+ TLBI_EL2_ALL when
    /// SMMU_IDR0.HYP) + CMD_SYNC; EVTQEN; SMMUEN.
    pub fn probe(regs: R, mut mem: M, cfg: SmmuConfig) -> Result<Self, DriverError> {
        let idr0 = Idr0(regs.read32(regs::SMMU_IDR0));
        let idr1 = Idr1(regs.read32(regs::SMMU_IDR1));
        let idr5 = Idr5(regs.read32(regs::SMMU_IDR5));
        let features = check_features(idr0, idr1, idr5, &cfg)?;

        let cmdq_log2 = idr1.cmdqs().min(cfg.cmdq_max_log2);
        // A queue is aligned to its size, at least 32 bytes (IHI 0070 6.3, CMDQ_BASE.ADDR).
        let cbytes = (1usize << cmdq_log2) * Command::SIZE;
        // With SMMU_IDR0.MSI, CMD_SYNCs complete by writing a word just after the queue (one
        // entry's room, so the queue's memory view covers it): waiters poll memory, not
        // SMMU_CMDQ_CONS (COHACC, required above, makes the cacheable write visible).
        let msi = idr0.msi();
        let room = if msi { cbytes + Command::SIZE } else { cbytes };
        let cmdq_base = mem.alloc_zeroed(room, cbytes.max(32))?;
        let mut cmdq = Cmdq::new(
            regs.clone(),
            mem.queue_memory(cmdq_base, room),
            cmdq_base,
            cmdq_log2,
            cfg.poll_limit,
        );
        if msi {
            cmdq = cmdq.with_msi_completion(cmdq_base + cbytes as u64);
        }
        let evtq = Queue::new(idr1.eventqs().min(cfg.evtq_max_log2));
        let mut smmu = Self {
            regs,
            mem,
            cfg,
            features,
            strtab: StreamTable::Linear { base: 0 },
            cmdq: Arc::new(cmdq),
            evtq,
            evtq_base: 0,
            evtq_ovack: 0,
            new_quarantines: Vec::new(),
            events: BTreeMap::new(),
            next_restore: None,
            stats: DriverStats::default(),
        };

        smmu.set_gbpa_abort()?;
        smmu.write_cr0(Cr0::empty())?;
        smmu.regs.write32(regs::SMMU_IRQ_CTRL, 0);
        smmu.poll("SMMU_IRQ_CTRLACK", |r| {
            r.read32(regs::SMMU_IRQ_CTRLACK) == 0
        })?;

        // Table and queue walks: write-back cacheable, inner shareable (COHACC checked above).
        smmu.regs.write32(regs::SMMU_CR1, regs::cr1::COHERENT);
        // Record invalid StreamIDs; ignore broadcast TLB maintenance: every stage-2 change is
        // followed by explicit SMMU invalidation (docs/design.md section 3). E2H = 0.
        smmu.regs
            .write32(regs::SMMU_CR2, (Cr2::RECINVSID | Cr2::PTM).bits());

        smmu.init_stream_table()?;
        smmu.init_queues()?;

        smmu.write_cr0(Cr0::CMDQEN)?;
        let mut init = vec![Command::CfgiAll, Command::TlbiNsnhAll];
        if idr0.hyp() {
            // TLBI_EL2_* need SMMU_IDR0.HYP; Linux issues it on the same condition.
            init.push(Command::TlbiEl2All);
        }
        smmu.submit_sync(&init)?;

        smmu.write_cr0(Cr0::CMDQEN | Cr0::EVTQEN)?;
        smmu.write_cr0(Cr0::CMDQEN | Cr0::EVTQEN | Cr0::SMMUEN)?;
        log::info!(
            "smmu: enabled, {} StreamID bits ({}), cmdq 2^{}, evtq 2^{}, VMID{} OAS {}{}",
            features.sid_bits,
            if features.two_level {
                "2-level"
            } else {
                "linear"
            },
            smmu.cmdq.log2size(),
            smmu.evtq.log2size(),
            features.vmid_bits,
            features.oas_bits,
            if features.nesting { ", nesting" } else { "" },
        );
        Ok(smmu)
    }

    /// What probe found.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The register interface (for the hypervisor's interrupt handlers and tests).
    pub fn regs(&self) -> &R {
        &self.regs
    }

    /// The DMA memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Counters since probe.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// The command queue, for submitting from any CPU without exclusive access to the driver
    /// (the stream table still needs that).
    pub fn cmdq(&self) -> &Arc<Cmdq<R, M::Queue>> {
        &self.cmdq
    }

    fn poll(
        &self,
        what: &'static str,
        mut done: impl FnMut(&R) -> bool,
    ) -> Result<(), DriverError> {
        for _ in 0..self.cfg.poll_limit {
            if done(&self.regs) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        log::error!("smmu: timeout waiting for {what}");
        Err(DriverError::Timeout(what))
    }

    /// GBPA.ABORT with the UPDATE handshake (IHI 0070 6.3): wait for UPDATE = 0, write the new
    /// value with UPDATE = 1, wait for the SMMU to clear UPDATE.
    fn set_gbpa_abort(&mut self) -> Result<(), DriverError> {
        let upd = Gbpa::UPDATE.bits();
        self.poll("SMMU_GBPA.UPDATE", |r| r.read32(regs::SMMU_GBPA) & upd == 0)?;
        let gbpa = Gbpa::from_bits_retain(self.regs.read32(regs::SMMU_GBPA));
        self.regs
            .write32(regs::SMMU_GBPA, (gbpa | Gbpa::ABORT | Gbpa::UPDATE).bits());
        self.poll("SMMU_GBPA.UPDATE", |r| r.read32(regs::SMMU_GBPA) & upd == 0)
    }

    fn write_cr0(&mut self, v: Cr0) -> Result<(), DriverError> {
        self.regs.write32(regs::SMMU_CR0, v.bits());
        self.poll("SMMU_CR0ACK", |r| r.read32(regs::SMMU_CR0ACK) == v.bits())
    }

    fn init_stream_table(&mut self) -> Result<(), DriverError> {
        let sid_bits = self.features.sid_bits;
        if !self.features.two_level {
            let n = 1usize << sid_bits;
            let bytes = n * Ste::SIZE;
            // The table is aligned to its size (IHI 0070 6.3, STRTAB_BASE.ADDR).
            let base = self.mem.alloc_zeroed(bytes, bytes.max(64))?;
            let abort = Ste::abort().to_bytes();
            let mut buf = vec![0u8; bytes];
            for chunk in buf.chunks_exact_mut(Ste::SIZE) {
                chunk.copy_from_slice(&abort);
            }
            self.mem.write(base, &buf);
            self.mem.write_barrier();
            self.regs
                .write64(regs::SMMU_STRTAB_BASE, regs::strtab_base(base, true));
            self.regs.write32(
                regs::SMMU_STRTAB_BASE_CFG,
                regs::strtab_base_cfg(StrtabFmt::Linear, sid_bits, 0),
            );
            self.strtab = StreamTable::Linear { base };
        } else {
            // L1 descriptors of zero (Span = 0) are invalid: traffic gets C_BAD_STREAMID until an
            // L2 table is installed by set_ste (IHI 0070 5.1).
            let l1_entries = 1usize << (sid_bits - STRTAB_SPLIT);
            let bytes = l1_entries * 8;
            let l1_base = self.mem.alloc_zeroed(bytes, bytes.max(64))?;
            self.regs
                .write64(regs::SMMU_STRTAB_BASE, regs::strtab_base(l1_base, true));
            self.regs.write32(
                regs::SMMU_STRTAB_BASE_CFG,
                regs::strtab_base_cfg(StrtabFmt::TwoLevel, sid_bits, STRTAB_SPLIT),
            );
            self.strtab = StreamTable::TwoLevel {
                l1_base,
                l2: vec![None; l1_entries],
            };
        }
        Ok(())
    }

    fn init_queues(&mut self) -> Result<(), DriverError> {
        self.regs.write64(
            regs::SMMU_CMDQ_BASE,
            regs::queue_base(self.cmdq.base(), self.cmdq.log2size(), true),
        );
        self.regs.write32(regs::SMMU_CMDQ_PROD, 0);
        self.regs.write32(regs::SMMU_CMDQ_CONS, 0);

        let ebytes = self.evtq.entries() as usize * Event::SIZE;
        self.evtq_base = self.mem.alloc_zeroed(ebytes, ebytes.max(32))?;
        self.regs.write64(
            regs::SMMU_EVENTQ_BASE,
            regs::queue_base(self.evtq_base, self.evtq.log2size(), true),
        );
        self.regs.write32(regs::SMMU_EVENTQ_PROD, 0);
        self.regs.write32(regs::SMMU_EVENTQ_CONS, 0);
        Ok(())
    }

    /// Writes `cmds` into the command queue and publishes them, waiting for space when the queue
    /// is full. Does not wait for completion: see [`Smmu::sync`] and [`Smmu::submit_sync`].
    pub fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.cmdq.submit(cmds)
    }

    /// Issues CMD_SYNC (CS = SIG_NONE) and waits until SMMU_CMDQ_CONS has moved past it, i.e. all
    /// earlier commands have completed (IHI 0070 ch. 4, CMD_SYNC). A command error on the way is returned
    /// as [`DriverError::CommandError`].
    pub fn sync(&mut self) -> Result<(), DriverError> {
        self.submit_sync(&[])
    }

    /// Submits `cmds` followed by a CMD_SYNC in one batch (one PROD write when they fit), and
    /// waits for the SYNC as [`Smmu::sync`] does.
    pub fn submit_sync(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.cmdq.submit_sync(cmds)
    }

    fn check_sid(&self, sid: u32) -> Result<(), DriverError> {
        let sid_bits = self.features.sid_bits;
        if u64::from(sid) >> sid_bits != 0 {
            return Err(DriverError::StreamIdOutOfRange { sid, sid_bits });
        }
        Ok(())
    }

    /// The PA of `sid`'s STE, if its table exists.
    fn ste_pa(&self, sid: u32) -> Option<u64> {
        match &self.strtab {
            StreamTable::Linear { base } => Some(base + u64::from(sid) * Ste::SIZE as u64),
            StreamTable::TwoLevel { l2, .. } => {
                let l2pa = (*l2.get((sid >> STRTAB_SPLIT) as usize)?)?;
                Some(l2pa + (sid as usize % L2_STES * Ste::SIZE) as u64)
            }
        }
    }

    /// The STE currently in the table for `sid` (an abort STE where no L2 table exists yet).
    pub fn ste(&self, sid: u32) -> Result<Ste, DriverError> {
        self.check_sid(sid)?;
        Ok(match self.ste_pa(sid) {
            Some(pa) => self.read_ste(pa),
            None => Ste::abort(),
        })
    }

    fn read_ste(&self, pa: u64) -> Ste {
        let mut b = [0u8; 64];
        self.mem.read(pa, &mut b);
        Ste::from_bytes(&b)
    }

    /// Installs an L2 table (all STEs abort) for `sid`'s L1 descriptor if it has none. Returns
    /// true when it did.
    fn ensure_l2(&mut self, sid: u32) -> Result<bool, DriverError> {
        let StreamTable::TwoLevel { l1_base, l2 } = &self.strtab else {
            return Ok(false);
        };
        let l1i = (sid >> STRTAB_SPLIT) as usize;
        if l2.get(l1i).copied().flatten().is_some() {
            return Ok(false);
        }
        let l1_pa = l1_base + l1i as u64 * 8;
        // An L2 table is aligned to its size (IHI 0070 5.1, L1STD.L2Ptr).
        let l2pa = self.mem.alloc_zeroed(L2_BYTES, L2_BYTES)?;
        let abort = Ste::abort().to_bytes();
        let mut buf = vec![0u8; L2_BYTES];
        for chunk in buf.chunks_exact_mut(Ste::SIZE) {
            chunk.copy_from_slice(&abort);
        }
        self.mem.write(l2pa, &buf);
        self.mem.write_barrier();
        // L1STD: L2Ptr [51:6], Span [4:0] = SPLIT + 1 (2^(Span-1) STEs) (IHI 0070 5.1).
        let desc = (l2pa & crate::bits::mask(51, 6)) | u64::from(STRTAB_SPLIT + 1);
        self.mem.write(l1_pa, &desc.to_le_bytes());
        self.mem.write_barrier();
        if let StreamTable::TwoLevel { l2, .. } = &mut self.strtab {
            l2[l1i] = Some(l2pa);
        }
        Ok(true)
    }

    /// Writes `ste` for StreamID `sid` and makes the SMMU use it, waiting for each CMD_SYNC:
    /// [`Smmu::write_ste`], then CMD_CFGI_STE + CMD_SYNC (twice for a break-before-make). For the
    /// hypervisor's own control path; whoever holds the driver meanwhile holds it across the
    /// waits, so the vSMMUs use [`Smmu::write_ste`] and [`Smmu::make_ste`] with the waits
    /// between them outside the driver's lock.
    pub fn set_ste(&mut self, sid: u32, ste: Ste) -> Result<(), DriverError> {
        match self.write_ste(sid, ste)? {
            SteWrite::Unchanged => Ok(()),
            SteWrite::Written(cfgi) => self.submit_sync(&[cfgi]),
            SteWrite::Broken(b) => {
                self.submit_sync(&[b.cfgi])?;
                let cfgi = self.make_ste(b)?;
                self.submit_sync(&[cfgi])
            }
        }
    }

    /// `ste` as this SMMU must have it (SMMU_IDR0.STALL_MODEL, IHI 0070 5.2): with stalls
    /// supported but optional, stage 1 never stalls (S1STALLD = 1) and stage 2 neither (S2S = 0),
    /// since no guest is told of stalls (a vSMMU's IDR0 says STALL_MODEL = 0b01) and the
    /// hypervisor resumes none; with stalls forced, S1STALLD is RES0 and S2S must be 1 (else
    /// the STE is ILLEGAL), and the hypervisor terminates every stall ([`Smmu::poll_events`]).
    fn honour_stall_model(&self, mut ste: Ste) -> Ste {
        if !ste.v() {
            return ste;
        }
        let c = ste.config();
        match self.features.stall_model {
            StallModel::Terminate => {}
            StallModel::Stall => {
                ste.set_s1stalld(c.s1_enabled()).set_s2s(false);
            }
            StallModel::Forced => {
                ste.set_s1stalld(false).set_s2s(c.s2_enabled());
            }
        }
        ste
    }

    /// Writes `ste` for StreamID `sid` into the stream table as far as it can go without
    /// waiting for the SMMU, and says what is left ([`SteWrite`]). Nothing here waits: the
    /// caller issues the CMD_CFGI_STE and CMD_SYNCs through the lock-free [`Cmdq`], so no lock
    /// held across this call is held across a CMD_SYNC wait.
    ///
    /// Update rules (IHI 0070 3.21.3, configuration structure update procedures): the SMMU may
    /// fetch an STE at any time, 64 bits at a time, and must never see a mix of two valid
    /// configurations. So:
    /// - a change of at most one doubleword is one single-copy atomic write (every fetch sees
    ///   the old or the new STE);
    /// - an aborting or invalid current STE gets words 1-7, a barrier, then word 0 (V, Config)
    ///   last;
    /// - a valid STE becoming abort gets only word 0 (any fetch then sees the old STE or one
    ///   that aborts, whatever words 1-7 hold; they keep their stale values, which an aborting
    ///   STE ignores);
    /// - any other change of a valid STE is a break-before-make: word 0 is made to abort now
    ///   ([`SteWrite::Broken`]); once its CMD_CFGI_STE and a CMD_SYNC have completed,
    ///   [`Smmu::make_ste`] writes words 1-7 and then word 0.
    ///
    /// STE.S1STALLD and S2S are set as SMMU_IDR0.STALL_MODEL requires. A stream in event
    /// quarantine keeps aborting: `ste` is kept for its restoration.
    pub fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        self.check_sid(sid)?;
        let ste = self.honour_stall_model(ste);
        if let Some(q) = self
            .events
            .get_mut(&sid)
            .and_then(|s| s.quarantine.as_mut())
        {
            q.saved = ste;
            return Ok(SteWrite::Unchanged);
        }
        let new_l2 = self.ensure_l2(sid)?;
        let pa = self
            .ste_pa(sid)
            .expect("stream table covers every checked StreamID");
        let cfgi = Command::CfgiSte { sid, leaf: !new_l2 };
        let cur = self.read_ste(pa);
        let differ = (0..8).filter(|&i| cur.0[i] != ste.0[i]).count();
        if differ == 0 {
            // A new L2 table still needs its L1 descriptor invalidated (Leaf = 0).
            return Ok(if new_l2 {
                SteWrite::Written(cfgi)
            } else {
                SteWrite::Unchanged
            });
        }
        let live = cur.v() && cur.config().bits() != 0;
        if differ == 1 {
            let i = (0..8).find(|&i| cur.0[i] != ste.0[i]).unwrap_or(0);
            self.mem.write(pa + 8 * i as u64, &ste.0[i].to_le_bytes());
        } else if live && ste.v() && ste.config().bits() == 0 {
            self.mem.write(pa, &ste.0[0].to_le_bytes());
        } else if live {
            self.mem.write(pa, &Ste::abort().0[0].to_le_bytes());
            return Ok(SteWrite::Broken(SteBreak { sid, ste, cfgi }));
        } else {
            self.write_ste_words(pa, &ste);
        }
        Ok(SteWrite::Written(cfgi))
    }

    /// Words 1-7, a barrier, then word 0: the order for an STE that is not live.
    fn write_ste_words(&mut self, pa: u64, ste: &Ste) {
        let bytes = ste.to_bytes();
        self.mem.write(pa + 8, &bytes[8..]);
        self.mem.write_barrier();
        self.mem.write(pa, &bytes[..8]);
    }

    /// The make of a break-before-make update: writes words 1-7 and then word 0 of `b.ste` and
    /// returns the CMD_CFGI_STE that puts it in force (with a CMD_SYNC after it). Call only
    /// once the break's CMD_CFGI_STE and a CMD_SYNC after it have completed: until then the
    /// SMMU may still use the old STE, which the new words would tear.
    pub fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        self.check_sid(b.sid)?;
        let ste = self.honour_stall_model(b.ste);
        if let Some(q) = self
            .events
            .get_mut(&b.sid)
            .and_then(|s| s.quarantine.as_mut())
        {
            q.saved = ste;
            return Ok(b.cfgi);
        }
        let pa = self
            .ste_pa(b.sid)
            .expect("write_ste installed the StreamID's L2 table");
        self.write_ste_words(pa, &ste);
        Ok(b.cfgi)
    }

    /// Consumes the event queue, calling `f` for each record in order with what its stream's
    /// budget made of it ([`EventBudget`], [`EventFate`]), then publishes CONS and acknowledges
    /// an overflow (EVENTQ_CONS.OVACKFLG := EVENTQ_PROD.OVFLG, IHI 0070 7.4).
    ///
    /// `now` is a monotonic clock in nanoseconds; without one (`None`) every record is
    /// delivered. Streams whose quarantine is over are restored first.
    ///
    /// Every record with Stall = 1 is answered with CMD_RESUME, Action = abort (IHI 0070 4.7.2;
    /// Linux's `CMDQ_RESUME_0_RESP_ABORT`): no guest is told of stalls and the hypervisor
    /// retries none, so no stalled transaction is left behind, whoever's stream it is.
    pub fn poll_events(
        &mut self,
        now: Option<u64>,
        mut f: impl FnMut(Event, EventFate),
    ) -> EventPoll {
        if let Some(now) = now {
            self.restore_quarantined(now);
        }
        let prod_raw = self.regs.read32(regs::SMMU_EVENTQ_PROD);
        self.evtq.set_prod(prod_raw);
        let mut out = EventPoll {
            events: 0,
            overflowed: overflow_pending(prod_raw, self.evtq_ovack),
            stalls_terminated: 0,
        };
        let mut resumes = Vec::new();
        while !self.evtq.is_empty() {
            let pa = self.evtq_base + u64::from(self.evtq.cons_index()) * Event::SIZE as u64;
            let mut b = [0u8; 32];
            self.mem.read(pa, &mut b);
            let e = Event::from_bytes(&b);
            if e.stall {
                resumes.push(Command::Resume {
                    sid: e.stream_id,
                    stag: e.stag,
                    resp: RESUME_ABORT,
                });
            }
            let fate = self.budget_event(&e, now);
            f(e, fate);
            self.evtq.inc_cons();
            out.events += 1;
        }
        if out.overflowed {
            // Reported by the caller, who knows whose records filled it.
            self.evtq_ovack = prod_raw & OVERFLOW_FLAG;
        }
        if out.events > 0 || out.overflowed {
            self.regs
                .write32(regs::SMMU_EVENTQ_CONS, self.evtq.cons() | self.evtq_ovack);
        }
        if !resumes.is_empty() {
            out.stalls_terminated = resumes.len();
            self.stats.stalls_terminated += resumes.len() as u64;
            // Published, not waited for: a CMD_RESUME takes effect when consumed.
            if let Err(e) = self.cmdq.submit(&resumes) {
                log::error!(
                    "smmu: CMD_RESUME of {} stalled transactions: {e}",
                    resumes.len()
                );
            }
        }
        out
    }

    /// Charges `e` to its stream's budget.
    fn budget_event(&mut self, e: &Event, now: Option<u64>) -> EventFate {
        let Some(now) = now else {
            return EventFate::Deliver;
        };
        let sid = e.stream_id;
        if self.check_sid(sid).is_err() {
            // No STE to quarantine (C_BAD_STREAMID of a StreamID beyond the table).
            return EventFate::Deliver;
        }
        let budget = self.cfg.events;
        if !self.events.contains_key(&sid) {
            if self.events.len() >= TRACKED_STREAMS {
                self.stats.events_suppressed += 1;
                return EventFate::Suppressed;
            }
            self.events.insert(
                sid,
                StreamEvents {
                    bucket: TokenBucket::new(budget.burst, budget.period_ns),
                    quarantine: None,
                    strikes: 0,
                    released: 0,
                },
            );
        }
        let st = self.events.get_mut(&sid).expect("inserted above");
        if st.quarantine.is_some() {
            self.stats.events_suppressed += 1;
            return EventFate::Suppressed;
        }
        if st.bucket.take(1, Some(now)).is_ok() {
            return EventFate::Deliver;
        }
        // Out of budget: abort the stream's transactions, which records nothing, for the
        // cool-down. A quarantine soon after the last one doubles it.
        let cooldown = |strikes: u8| budget.cooldown_ns.saturating_mul(1 << strikes);
        let soon = now.saturating_sub(st.released) < cooldown(st.strikes);
        st.strikes = if soon {
            (st.strikes + 1).min(MAX_STRIKES)
        } else {
            0
        };
        let strikes = st.strikes;
        let until = now.saturating_add(cooldown(strikes));
        let Some(pa) = self.ste_pa(sid) else {
            self.stats.events_suppressed += 1;
            return EventFate::Suppressed;
        };
        let saved = self.read_ste(pa);
        // Word 0 alone: any fetch sees the old STE or one that aborts ([`Smmu::write_ste`]).
        self.mem.write(pa, &Ste::abort().0[0].to_le_bytes());
        if let Some(st) = self.events.get_mut(&sid) {
            st.quarantine = Some(Quarantine { saved, until });
        }
        self.next_restore = Some(self.next_restore.map_or(until, |t| t.min(until)));
        self.stats.quarantines += 1;
        if self.new_quarantines.len() < TRACKED_STREAMS {
            self.new_quarantines.push((sid, cooldown(strikes)));
        }
        // Published now, waited for by nobody: the abort takes effect when it is consumed, and
        // what the stream recorded meanwhile is suppressed as it is drained.
        if let Err(err) = self.cmdq.submit(&[
            Command::CfgiSte { sid, leaf: true },
            Command::Sync(crate::cmd::Sync::none()),
        ]) {
            log::error!("smmu: StreamID {sid}: CMD_CFGI_STE of its quarantine: {err}");
        }
        EventFate::Quarantined
    }

    /// Gives every stream whose cool-down ended at `now` its STE back (the last one asked for
    /// while it was quarantined). The quarantine STE aborts, so words 1-7 and then word 0
    /// need no break ([`Smmu::write_ste`]).
    pub fn restore_quarantined(&mut self, now: u64) {
        if self.next_restore.is_none_or(|t| t > now) {
            return;
        }
        let mut next = None;
        let mut restored = Vec::new();
        for (&sid, st) in self.events.iter_mut() {
            let Some(q) = st.quarantine else { continue };
            if q.until > now {
                next = Some(next.map_or(q.until, |t: u64| t.min(q.until)));
                continue;
            }
            st.quarantine = None;
            st.released = now;
            st.bucket.fill();
            restored.push((sid, q.saved));
        }
        self.next_restore = next;
        for (sid, ste) in restored {
            if let Some(pa) = self.ste_pa(sid) {
                self.write_ste_words(pa, &ste);
                self.stats.restores += 1;
                if let Err(e) = self.cmdq.submit(&[
                    Command::CfgiSte { sid, leaf: true },
                    Command::Sync(crate::cmd::Sync::none()),
                ]) {
                    log::error!("smmu: StreamID {sid}: CMD_CFGI_STE of its restoration: {e}");
                }
            }
        }
    }

    /// Whether StreamID `sid` is in event quarantine (its STE aborts).
    pub fn quarantined(&self, sid: u32) -> bool {
        self.events
            .get(&sid)
            .is_some_and(|s| s.quarantine.is_some())
    }

    /// The quarantines started since the last call, for the caller to report with the VM that
    /// owns each stream: (StreamID, cool-down in nanoseconds).
    pub fn take_quarantines(&mut self) -> Vec<(u32, u64)> {
        core::mem::take(&mut self.new_quarantines)
    }

    /// Acknowledges the active global errors the hypervisor handles by reporting them
    /// (EVENTQ_ABT_ERR: records lost to a full or unwritable event queue; the MSI abort errors),
    /// toggling their GERRORN bits (IHI 0070 7.5), and returns them. CMDQ_ERR is left to the
    /// command queue's recovery, which acknowledges it after it has skipped the command.
    pub fn acknowledge_gerror(&mut self) -> Gerror {
        let handled = Gerror::EVENTQ_ABT_ERR
            | Gerror::PRIQ_ABT_ERR
            | Gerror::MSI_CMDQ_ABT_ERR
            | Gerror::MSI_EVENTQ_ABT_ERR
            | Gerror::MSI_PRIQ_ABT_ERR
            | Gerror::MSI_GERROR_ABT_ERR;
        let ack = self.active_gerror() & handled;
        if !ack.is_empty() {
            let gerrorn = self.regs.read32(regs::SMMU_GERRORN);
            self.regs.write32(regs::SMMU_GERRORN, gerrorn ^ ack.bits());
        }
        ack
    }

    /// Global errors currently active (GERROR ^ GERRORN).
    pub fn active_gerror(&self) -> Gerror {
        Gerror::from_bits_retain(
            self.regs.read32(regs::SMMU_GERROR) ^ self.regs.read32(regs::SMMU_GERRORN),
        )
    }

    /// Enables the given interrupts (SMMU_IRQ_CTRL with the IRQ_CTRLACK handshake). Probe leaves
    /// them all off; the IRQ_CFG registers are left at reset (wired interrupts).
    pub fn set_irqs(&mut self, irqs: IrqCtrl) -> Result<(), DriverError> {
        self.regs.write32(regs::SMMU_IRQ_CTRL, irqs.bits());
        self.poll("SMMU_IRQ_CTRLACK", |r| {
            r.read32(regs::SMMU_IRQ_CTRLACK) == irqs.bits()
        })
    }
}

fn check_features(
    idr0: Idr0,
    idr1: Idr1,
    idr5: Idr5,
    cfg: &SmmuConfig,
) -> Result<Features, DriverError> {
    if !idr0.s2p() {
        return Err(DriverError::MissingFeature(
            "SMMU_IDR0.S2P (stage-2 translation)",
        ));
    }
    if !idr0.ttf().aarch64() {
        return Err(DriverError::MissingFeature(
            "SMMU_IDR0.TTF (AArch64 translation tables)",
        ));
    }
    if !idr0.cohacc() {
        return Err(DriverError::MissingFeature(
            "SMMU_IDR0.COHACC (coherent table and queue access)",
        ));
    }
    if !idr5.gran4k() {
        return Err(DriverError::MissingFeature(
            "SMMU_IDR5.GRAN4K (4 KiB translation granule)",
        ));
    }
    if idr1.tables_preset() || idr1.queues_preset() {
        return Err(DriverError::MissingFeature(
            "programmable table and queue bases (SMMU_IDR1.TABLES_PRESET/QUEUES_PRESET set)",
        ));
    }
    let oas_bits = idr5
        .oas_bits()
        .ok_or(DriverError::MissingFeature("a defined SMMU_IDR5.OAS"))?;
    let sid_bits = idr1.sidsize().min(cfg.max_sid_bits);
    // A 2-level table needs at least one full L2 table's worth of StreamID bits.
    let two_level = sid_bits > cfg.linear_max_sid_bits
        && sid_bits >= STRTAB_SPLIT
        && idr0.st_level() == StLevel::TwoLevel;
    if !two_level && sid_bits > cfg.linear_max_sid_bits.max(STRTAB_SPLIT) + 4 {
        // Linear only, and huge: refuse rather than allocate megabytes (Linux does likewise).
        return Err(DriverError::MissingFeature(
            "SMMU_IDR0.ST_LEVEL (2-level stream table)",
        ));
    }
    if !idr0.vmid16() {
        log::warn!("smmu: no VMID16, VMIDs limited to 8 bits");
    }
    Ok(Features {
        idr0,
        idr1,
        idr5,
        sid_bits,
        vmid_bits: if idr0.vmid16() { 16 } else { 8 },
        oas_bits,
        nesting: idr0.s1p() && idr0.s2p(),
        two_level,
        stall_model: idr0.stalls(),
    })
}

#[cfg(test)]
mod tests;

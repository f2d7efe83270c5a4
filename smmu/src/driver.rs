//! The physical SMMUv3 driver: probe and reset, the stream table, the command queue and the event
//! queue. It owns the physical SMMU; guests only ever reach it through the vSMMU, and only with
//! operations scoped to their own StreamIDs and VMID (DESIGN.md section 5).
//!
//! Hardware is reached through [`SmmuRegs`] (MMIO) and [`DmaMemory`] (memory the SMMU reads and
//! writes: tables and queues), so all of it runs on the host against a fake.
//!
//! Completion is by polling SMMU_CMDQ_CONS (CMD_SYNC with CS = SIG_NONE): QEMU's `virt` SMMU has
//! neither MSI nor SEV (DESIGN.md section 3). Every wait is bounded by [`SmmuConfig::poll_limit`].

use crate::cmd::Command;
use crate::event::Event;
use crate::queue::{overflow_pending, Queue, OVERFLOW_FLAG};
use crate::regs::{
    self, Cerror, Cr0, Cr2, Gbpa, Gerror, Idr0, Idr1, Idr5, IrqCtrl, StLevel, StrtabFmt,
};
use crate::ste::Ste;
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
}

impl Default for SmmuConfig {
    fn default() -> Self {
        Self {
            linear_max_sid_bits: 8,
            max_sid_bits: 16,
            cmdq_max_log2: 8,
            evtq_max_log2: 8,
            poll_limit: 1_000_000,
        }
    }
}

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
}

/// Result of [`Smmu::poll_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventPoll {
    /// Records delivered.
    pub events: usize,
    /// The SMMU dropped records since the last poll (EVENTQ_PROD.OVFLG toggled); acknowledged.
    pub overflowed: bool,
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
        let cmdq_base = mem.alloc_zeroed(cbytes, cbytes.max(32))?;
        let cmdq = Cmdq::new(
            regs.clone(),
            mem.queue_memory(cmdq_base, cbytes),
            cmdq_base,
            cmdq_log2,
            cfg.poll_limit,
        );
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
        // followed by explicit SMMU invalidation (DESIGN.md section 5). E2H = 0.
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

    /// Writes `ste` for StreamID `sid` and makes the SMMU use it (CMD_CFGI_STE + CMD_SYNC).
    ///
    /// Update rules (IHI 0070 ch. 3, structure update procedures): the SMMU may fetch an STE at any time, 64 bits at a time.
    /// When the current entry is valid and not an abort entry, it is first made to abort (word 0
    /// only) and invalidated, so no mix of old and new words is ever used. Then words 1-7 are
    /// written, and word 0 (with V and Config) last.
    pub fn set_ste(&mut self, sid: u32, ste: Ste) -> Result<(), DriverError> {
        self.check_sid(sid)?;
        let new_l2 = self.ensure_l2(sid)?;
        let pa = self
            .ste_pa(sid)
            .expect("stream table covers every checked StreamID");
        let cfgi = Command::CfgiSte { sid, leaf: !new_l2 };
        let cur = self.read_ste(pa);
        if cur.v() && cur.config().bits() != 0 && cur != ste {
            self.mem.write(pa, &Ste::abort().0[0].to_le_bytes());
            self.submit_sync(&[cfgi])?;
        }
        let bytes = ste.to_bytes();
        self.mem.write(pa + 8, &bytes[8..]);
        self.mem.write_barrier();
        self.mem.write(pa, &bytes[..8]);
        self.submit_sync(&[cfgi])
    }

    /// Consumes the event queue, calling `f` for each record in order, then publishes CONS and
    /// acknowledges an overflow (EVENTQ_CONS.OVACKFLG := EVENTQ_PROD.OVFLG, IHI 0070 7.4).
    pub fn poll_events(&mut self, mut f: impl FnMut(Event)) -> EventPoll {
        let prod_raw = self.regs.read32(regs::SMMU_EVENTQ_PROD);
        self.evtq.set_prod(prod_raw);
        let mut out = EventPoll {
            events: 0,
            overflowed: overflow_pending(prod_raw, self.evtq_ovack),
        };
        while !self.evtq.is_empty() {
            let pa = self.evtq_base + u64::from(self.evtq.cons_index()) * Event::SIZE as u64;
            let mut b = [0u8; 32];
            self.mem.read(pa, &mut b);
            f(Event::from_bytes(&b));
            self.evtq.inc_cons();
            out.events += 1;
        }
        if out.overflowed {
            log::warn!("smmu: event queue overflowed, events were lost");
            self.evtq_ovack = prod_raw & OVERFLOW_FLAG;
        }
        if out.events > 0 || out.overflowed {
            self.regs
                .write32(regs::SMMU_EVENTQ_CONS, self.evtq.cons() | self.evtq_ovack);
        }
        out
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
    })
}

#[cfg(test)]
mod tests;

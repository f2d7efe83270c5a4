//! The physical command queue, shared by every CPU without a lock (IHI 0070 3.5 and ch. 4). The
//! vSMMUs of all VMs forward into it from their vCPUs' traps, so a lock here would be one that
//! every VM's DMA map/unmap path shares. The scheme is Linux's `arm_smmu_cmdq_issue_cmdlist`, with
//! whole-life sequence numbers where Linux needs a shared/exclusive lock for wrap safety:
//!
//! 1. a producer reserves slots with a compare-and-swap on the count of entries ever reserved,
//!    allowed while that stays within one queue of the last SMMU_CMDQ_CONS anyone saw;
//! 2. it writes its commands into its slots and marks each slot with the entry's sequence number;
//! 3. whoever holds the publisher flag moves SMMU_CMDQ_PROD over every contiguous marked slot. A
//!    producer that finds the flag taken just leaves: the holder looks for new marks after it lets
//!    go, so nothing is left unpublished and nobody spins on another CPU's MMIO write;
//! 4. a CMD_SYNC's submitter polls SMMU_CMDQ_CONS until it is past its slot. CONS is extended to a
//!    whole-life count, which is unambiguous because at most one queue's worth of entries is ever
//!    outstanding (step 1), so waits never confuse laps however long a CPU is away. Where the SMMU
//!    can signal completion by MSI (SMMU_IDR0.MSI; [`Cmdq::with_msi_completion`]), every CMD_SYNC
//!    instead writes its own sequence number (+ 1, low 32 bits) into one word of normal memory,
//!    which the SMMU does in queue order, so the submitter polls that word and reads CONS only
//!    every [`MSI_CONS_EVERY`] polls, to see a command error that stopped the queue.
//!
//! A command error stops the queue (GERROR.CMDQ_ERR); whichever waiter sees it first replaces the
//! command with a CMD_SYNC, acknowledges it and records it, and the waiter whose batch held it gets
//! the [`DriverError::CommandError`] (IHI 0070 7.1).

use super::{DriverError, SmmuRegs};
use crate::cmd::{Command, Sync, SyncCs};
use crate::regs::{self, Cerror, Gerror};
use crate::sync::{self, fence, AtomicBool, AtomicU64, Mutex, Ordering};
use alloc::vec::Vec;

/// Memory of the command queue: written by several CPUs at once, each in its own entries.
pub trait QueueMemory {
    /// Writes one 16-byte entry at `pa`, each doubleword single-copy atomically.
    fn write_entry(&self, pa: u64, words: [u64; 2]);
    /// Reads the entry at `pa`.
    fn read_entry(&self, pa: u64) -> [u64; 2];
    /// Orders this CPU's entry writes before its later writes as the SMMU and other CPUs observe
    /// them (`dmb oshst`, Linux's `dma_wmb`): an entry is complete before its slot is marked.
    fn entry_barrier(&self);
}

/// A queued CMD_SYNC, to wait for with [`Cmdq::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTicket {
    /// Sequence number of the batch's first entry (it names the batch).
    first: u64,
    /// Sequence number of the CMD_SYNC.
    sync: u64,
    /// [`Cmdq`]'s error count when the batch was queued.
    errors: u64,
}

impl SyncTicket {
    /// Whole-life sequence number of the CMD_SYNC: a later ticket's completion implies this one's.
    pub fn seq(&self) -> u64 {
        self.sync
    }

    /// A ticket for CMD_SYNC number `seq` of a [`crate::vsmmu::PhysicalSmmu`] that is not this
    /// queue (recording fakes in tests and benchmarks).
    pub fn at(seq: u64) -> Self {
        Self {
            first: seq,
            sync: seq,
            errors: 0,
        }
    }
}

/// The MSIData of the CMD_SYNC at `seq`: one more than its low 32 bits, so the zeroed word
/// completes no sync.
fn msi_data(seq: u64) -> u32 {
    (seq as u32).wrapping_add(1)
}

/// Command errors remembered for their submitters.
const ERROR_LOG: usize = 16;
/// Retries of the CONS read when other CPUs keep moving the extended count meanwhile.
const CONS_RETRIES: u32 = 64;
/// Marks no entry has (sequence numbers never get there).
const UNWRITTEN: u64 = u64::MAX;
/// With MSI completion, polls of the completion word per SMMU_CMDQ_CONS read.
pub const MSI_CONS_EVERY: u32 = 64;
/// CMD_SYNC MSI shareability: Inner Shareable (IHI 0070 4.7.3, MSH; Linux's ARM_SMMU_SH_ISH).
const MSI_SH_ISH: u8 = 3;
/// CMD_SYNC MSI attributes: Inner and Outer Write-Back cacheable (Linux's ARM_SMMU_MEMATTR_OIWB),
/// so that with SMMU_IDR0.COHACC the CPU's cached read of the word sees the write.
const MSI_ATTR_OIWB: u8 = 0xf;

/// The physical command queue ([module docs](self)).
#[derive(Debug)]
pub struct Cmdq<R, Q> {
    regs: R,
    mem: Q,
    base: u64,
    log2size: u8,
    poll_limit: u32,
    /// Entries ever reserved: the next free slot's sequence number.
    reserved: AtomicU64,
    /// Entries the SMMU is known to have consumed (extended SMMU_CMDQ_CONS; a lower bound).
    cons: AtomicU64,
    /// Entries made visible to the SMMU (extended SMMU_CMDQ_PROD).
    published: AtomicU64,
    /// Per slot, the sequence number of the entry last written in it.
    written: Vec<AtomicU64>,
    /// Per slot, the batch (sequence number of its first entry) the entry belongs to: a batch
    /// bigger than the queue is queued in parts, with other CPUs' entries in between.
    batch: Vec<AtomicU64>,
    /// Held by the CPU writing SMMU_CMDQ_PROD.
    publisher: AtomicBool,
    /// Held by the CPU recovering from a command error.
    recovering: AtomicBool,
    /// Command errors recovered since boot.
    error_count: AtomicU64,
    /// The last few: (the failed command's batch, the error).
    errors: Mutex<Vec<(u64, DriverError)>>,
    /// With MSI completion, the PA of the word every CMD_SYNC writes (inside `mem`).
    msi: Option<u64>,
}

impl<R: SmmuRegs, Q: QueueMemory> Cmdq<R, Q> {
    /// A queue of 2^`log2size` entries at `base` in `mem`, its registers at PROD = CONS = 0
    /// (the driver programs SMMU_CMDQ_BASE/PROD/CONS before enabling it).
    pub fn new(regs: R, mem: Q, base: u64, log2size: u8, poll_limit: u32) -> Self {
        Self {
            regs,
            mem,
            base,
            log2size,
            poll_limit,
            reserved: AtomicU64::new(0),
            cons: AtomicU64::new(0),
            published: AtomicU64::new(0),
            written: (0..1u64 << log2size)
                .map(|_| AtomicU64::new(UNWRITTEN))
                .collect(),
            batch: (0..1u64 << log2size).map(|_| AtomicU64::new(0)).collect(),
            publisher: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            error_count: AtomicU64::new(0),
            errors: Mutex::new(Vec::with_capacity(ERROR_LOG)),
            msi: None,
        }
    }

    /// CMD_SYNCs complete by an MSI write of their sequence number to the 32-bit word at `pa`,
    /// which `mem` covers (zeroed, 4-byte aligned, written by nothing else), instead of by
    /// polling SMMU_CMDQ_CONS: for an SMMU with SMMU_IDR0.MSI and COHACC.
    pub fn with_msi_completion(mut self, pa: u64) -> Self {
        self.msi = Some(pa);
        self
    }

    /// Whether CMD_SYNCs complete by MSI ([`Cmdq::with_msi_completion`]).
    pub fn msi_completion(&self) -> bool {
        self.msi.is_some()
    }

    /// The CMD_SYNC to put at sequence number `seq`.
    fn sync_command(&self, seq: u64) -> Command {
        Command::Sync(match self.msi {
            None => Sync::none(),
            Some(pa) => Sync {
                cs: SyncCs::Irq,
                msh: MSI_SH_ISH,
                msiattr: MSI_ATTR_OIWB,
                msidata: msi_data(seq),
                msiaddr: pa,
            },
        })
    }

    /// With MSI completion: whether the CMD_SYNC at `seq` has written its word (so it, and
    /// every command before it, has completed).
    fn msi_reached(&self, seq: u64) -> bool {
        let Some(pa) = self.msi else { return false };
        let e = self.mem.read_entry(pa & !15);
        let word = (e[((pa >> 3) & 1) as usize] >> ((pa & 4) * 8)) as u32;
        // The SMMU writes in queue order and at most one queue's worth of syncs is ever
        // outstanding, so the word is within 2^31 of any waiter's value.
        let reached = word.wrapping_sub(msi_data(seq)) as i32 >= 0;
        if reached {
            // The SMMU's work for the batch happens before the caller goes on.
            fence(Ordering::Acquire);
        }
        reached
    }

    /// Entries in the queue.
    pub fn entries(&self) -> u64 {
        1 << self.log2size
    }

    /// log2 of the entries.
    pub fn log2size(&self) -> u8 {
        self.log2size
    }

    /// PA of the queue.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The PROD/CONS register value (index and wrap bit) of sequence number `seq`.
    fn reg_value(&self, seq: u64) -> u32 {
        (seq & ((2 << self.log2size) - 1)) as u32
    }

    fn slot(&self, seq: u64) -> usize {
        (seq & (self.entries() - 1)) as usize
    }

    fn slot_pa(&self, seq: u64) -> u64 {
        self.base + self.slot(seq) as u64 * Command::SIZE as u64
    }

    /// Reads SMMU_CMDQ_CONS and folds it into the extended count. Returns the count and the raw
    /// register (for its ERR field).
    fn refresh_cons(&self) -> (u64, u32) {
        let n = self.entries();
        let mut raw = 0;
        for _ in 0..CONS_RETRIES {
            // Acquire: the register read below happens after the read `before` was folded from
            // (the fetch_max that wrote it released it), so it shows a CONS no older: the SMMU's
            // count is at least `before`.
            let before = self.cons.load(Ordering::Acquire);
            raw = self.regs.read32(regs::SMMU_CMDQ_CONS);
            // Register reads are ordered before later loads (SmmuRegs), so this is a later look.
            if self.cons.load(Ordering::Relaxed) != before {
                sync::spin_loop();
                continue;
            }
            // While the count stayed at `before`, nothing beyond `before + n` could be reserved,
            // so the SMMU's CONS lay in [before, before + n]: the register's index and wrap bit
            // (modulo 2n) name exactly one count there.
            let ahead =
                u64::from(raw.wrapping_sub(self.reg_value(before)) & ((2 << self.log2size) - 1));
            if ahead > n {
                // Not a CONS this queue can have: leave the count alone.
                return (before, raw);
            }
            let now = before + ahead;
            if now == before {
                // Nothing new: no write, so idle pollers share the line (and, in the loom
                // models, stay independent of each other).
                return (before, raw);
            }
            // Release: the SMMU's consumption we saw (its reads of the entries, the commands'
            // effects) happens before a reserver overwrites those slots and before a waiter
            // that reads the count returns. Acquire: the same from whoever folded a larger one.
            return (self.cons.fetch_max(now, Ordering::AcqRel).max(now), raw);
        }
        (self.cons.load(Ordering::Acquire), raw)
    }

    /// Reserves `k` (at most one queue's worth) consecutive slots; returns the first one's
    /// sequence number. Waits (bounded) while the queue is full.
    fn reserve(&self, k: u64) -> Result<u64, DriverError> {
        for _ in 0..self.poll_limit {
            // Relaxed: the count only hands out slot numbers, which the compare-and-swap's
            // atomicity makes unique; nothing is published through it.
            let p = self.reserved.load(Ordering::Relaxed);
            // Acquire (pairs with refresh_cons's fetch_max): the SMMU has read the entries that
            // lapped slots held before this CPU writes over them.
            let c = self.cons.load(Ordering::Acquire);
            if p + k <= c + self.entries() {
                if self
                    .reserved
                    .compare_exchange_weak(p, p + k, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(p);
                }
                continue;
            }
            // Full: what is queued must reach the SMMU before it can make room.
            self.publish();
            let (_, raw) = self.refresh_cons();
            if Cerror::from_cons(raw) != Cerror::None {
                self.recover();
            }
            sync::spin_loop();
        }
        log::error!("smmu: timeout waiting for command queue space");
        Err(DriverError::Timeout("command queue space"))
    }

    /// Writes `cmds` into the queue and marks them ready, without publishing them
    /// ([`Cmdq::publish`]). The SMMU consumes commands in the order of the calls that queued
    /// them, so a caller serialising its own calls keeps its order.
    pub fn queue(&self, cmds: &[Command]) -> Result<(), DriverError> {
        self.enqueue(cmds.iter().copied(), cmds.len() as u64)
            .map(|_| ())
    }

    /// [`Cmdq::queue`] with a CMD_SYNC after `cmds`; returns its ticket.
    pub fn queue_sync(&self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        // Any value will do that is older than the increment for an error of this batch, which
        // happens after the batch is queued: coherence gives that to a Relaxed load already.
        let errors = self.error_count.load(Ordering::Relaxed);
        let sync = core::iter::once(Command::Sync(Sync::none()));
        let (first, last) =
            self.enqueue(cmds.iter().copied().chain(sync), cmds.len() as u64 + 1)?;
        Ok(SyncTicket {
            first,
            sync: last,
            errors,
        })
    }

    /// Queues the `total` commands of `cmds`, one reservation per queue's worth. Returns the
    /// sequence numbers of the first and last.
    fn enqueue(
        &self,
        mut cmds: impl Iterator<Item = Command>,
        total: u64,
    ) -> Result<(u64, u64), DriverError> {
        let mut left = total;
        let mut first = None;
        let mut last = 0;
        while left > 0 {
            let k = left.min(self.entries());
            let p = match self.reserve(k) {
                Ok(p) => p,
                Err(e) => {
                    // Entries of earlier chunks are marked: they are not lost, only unsynced.
                    self.publish();
                    return Err(e);
                }
            };
            let batch = *first.get_or_insert(p);
            for (seq, c) in (p..p + k).zip(&mut cmds) {
                // A CMD_SYNC signals the way this queue waits (its MSI names its slot).
                let c = match c {
                    Command::Sync(_) => self.sync_command(seq),
                    c => c,
                };
                self.mem.write_entry(self.slot_pa(seq), c.encode());
                // Relaxed: published with the entry by the mark below.
                self.batch[self.slot(seq)].store(batch, Ordering::Relaxed);
            }
            self.mem.entry_barrier();
            for seq in p..p + k {
                // Release (pairs with publish's Acquire scan): the entry and its batch happen
                // before the SMMU_CMDQ_PROD write that hands the slot to the SMMU, and so before
                // the SMMU reads them and before a recoverer reads the batch of a failed one.
                // entry_barrier alone orders them on the machine (a Relaxed mark is no bug in
                // the loom models, docs/assurance.md); this keeps it so for any QueueMemory.
                self.written[self.slot(seq)].store(seq, Ordering::Release);
            }
            if left > k {
                // A batch bigger than the queue: the SMMU must consume this part first.
                self.publish();
            }
            left -= k;
            last = p + k - 1;
        }
        Ok((first.unwrap_or(last), last))
    }

    /// Moves SMMU_CMDQ_PROD over every entry marked ready, unless another CPU is doing so (it
    /// then takes ours too).
    ///
    /// Nothing is left unpublished: a producer marks its slots, then comes here. Either its
    /// compare-and-swap finds the flag free and it publishes itself, or it reads the `true` of a
    /// holder that has not let go yet; then the producer's fence (F1) precedes that holder's
    /// fence after letting go (F2) in the single order of SeqCst fences (else the swap would
    /// have read the holder's `false` or later), so the holder's re-check after F2 sees the
    /// mark and it goes round again (C++ \[atomics.fences\], the store-buffering pattern).
    /// SeqCst loads and stores alone would do the same, but loom checks only fences.
    pub fn publish(&self) {
        // F1: orders this CPU's marks before its look at the flag.
        fence(Ordering::SeqCst);
        loop {
            // Acquire (pairs with the Release below): the previous holder's `published` and
            // SMMU_CMDQ_PROD write happen before this holder reads and moves them.
            if self
                .publisher
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return;
            }
            // Relaxed: only flag holders touch it, ordered by the flag.
            let start = self.published.load(Ordering::Relaxed);
            let mut end = start;
            // Acquire (pairs with enqueue's Release mark): the entry is complete before the
            // SMMU_CMDQ_PROD write below hands it over.
            while end < start + self.entries()
                && self.written[self.slot(end)].load(Ordering::Acquire) == end
            {
                end += 1;
            }
            if end != start {
                // SmmuRegs writes are ordered after the memory accesses before them (the
                // entries, through the marks' acquire, included).
                self.regs.write32(regs::SMMU_CMDQ_PROD, self.reg_value(end));
                self.published.store(end, Ordering::Relaxed);
            }
            self.publisher.store(false, Ordering::Release);
            // F2: orders letting go before the re-check, against a producer's F1.
            fence(Ordering::SeqCst);
            // Relaxed: a mark seen here is taken with the Acquire scan of the next round.
            if self.written[self.slot(end)].load(Ordering::Relaxed) != end {
                return;
            }
        }
    }

    /// Whether the ticket's CMD_SYNC is known to have completed (no register access).
    pub fn completed(&self, t: SyncTicket) -> bool {
        // Acquire (pairs with refresh_cons's fetch_max): the SMMU's execution of the batch
        // happens before the caller goes on.
        self.cons.load(Ordering::Acquire) > t.sync
    }

    /// Publishes, then polls SMMU_CMDQ_CONS (bounded) until the ticket's CMD_SYNC has completed,
    /// i.e. every command queued before it has (IHI 0070 4.7.3); with MSI completion, its word
    /// instead, and CONS only every [`MSI_CONS_EVERY`] polls. Fails with the command error of
    /// a command of this batch, if one had one (it was skipped).
    pub fn wait(&self, t: SyncTicket) -> Result<(), DriverError> {
        self.publish();
        let mut done = self.completed(t);
        for i in 0..self.poll_limit {
            if done {
                break;
            }
            if self.msi.is_some() {
                if self.msi_reached(t.sync) {
                    // Release: as refresh_cons's fold, for reservers and other waiters.
                    self.cons.fetch_max(t.sync + 1, Ordering::AcqRel);
                    done = true;
                    break;
                }
                if i % MSI_CONS_EVERY != MSI_CONS_EVERY - 1 {
                    sync::spin_loop();
                    continue;
                }
            }
            let (c, raw) = self.refresh_cons();
            done = c > t.sync;
            if !done {
                if Cerror::from_cons(raw) != Cerror::None {
                    self.recover();
                }
                sync::spin_loop();
            }
        }
        if !done {
            log::error!("smmu: timeout waiting for CMD_SYNC completion");
            return Err(DriverError::Timeout("CMD_SYNC completion"));
        }
        // The recovery of a failed command of this batch (its log entry and this increment)
        // happens before the SMMU resumes and so before the CONS that completed the wait: this
        // load sees the increment, and the lock the entry.
        if self.error_count.load(Ordering::Acquire) != t.errors {
            let log = self.errors.lock();
            if let Some(&(_, e)) = log.iter().find(|&&(b, _)| b == t.first) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Queues `cmds` and publishes them.
    pub fn submit(&self, cmds: &[Command]) -> Result<(), DriverError> {
        let r = self.queue(cmds);
        self.publish();
        r
    }

    /// Queues `cmds` and a CMD_SYNC and waits for it.
    pub fn submit_sync(&self, cmds: &[Command]) -> Result<(), DriverError> {
        let t = self.queue_sync(cmds)?;
        self.wait(t)
    }

    /// Command errors recovered since boot.
    pub fn error_count(&self) -> u64 {
        self.error_count.load(Ordering::Acquire)
    }

    /// If GERROR.CMDQ_ERR is active and no other CPU is on it: reports the failed command,
    /// replaces it with a CMD_SYNC (as Linux's `__arm_smmu_cmdq_skip_err` does) and acknowledges
    /// through GERRORN, so the queue resumes.
    fn recover(&self) {
        // Acquire/Release: one recoverer at a time, each after the previous one's GERRORN write.
        if self
            .recovering
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let gerror = self.regs.read32(regs::SMMU_GERROR);
        let gerrorn = self.regs.read32(regs::SMMU_GERRORN);
        if (gerror ^ gerrorn) & Gerror::CMDQ_ERR.bits() != 0 {
            // The queue is stopped: CONS sits on the failed command and stays there.
            let cons = self.regs.read32(regs::SMMU_CMDQ_CONS);
            let cerror = Cerror::from_cons(cons);
            let index = cons & (self.entries() as u32 - 1);
            let pa = self.base + u64::from(index) * Command::SIZE as u64;
            let command = self.mem.read_entry(pa);
            // Ordered after the batch's store by the entry's mark, which publication observed.
            let batch = self.batch[index as usize].load(Ordering::Relaxed);
            log::error!("smmu: command error {cerror:?} at cmdq[{index}]: {command:#x?}");
            if cerror != Cerror::AtcInvSync {
                // CERROR_ATC_INV_SYNC is reported on the CMD_SYNC itself, which can be retried.
                self.mem
                    .write_entry(pa, Command::Sync(Sync::none()).encode());
                self.mem.entry_barrier();
            }
            {
                let mut log = self.errors.lock();
                if log.len() == ERROR_LOG {
                    log.remove(0);
                }
                log.push((
                    batch,
                    DriverError::CommandError {
                        cerror,
                        index,
                        command,
                    },
                ));
            }
            // Release: the log entry before the count that makes a waiter look at the log.
            self.error_count.fetch_add(1, Ordering::Release);
            self.regs
                .write32(regs::SMMU_GERRORN, gerrorn ^ Gerror::CMDQ_ERR.bits());
        }
        self.recovering.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests;

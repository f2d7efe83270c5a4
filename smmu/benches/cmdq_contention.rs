//! Host benchmark of the physical command queue ([`smmu::driver::Cmdq`]) under contention: what
//! the lock-free queue buys when several CPUs submit at once, against the previous scheme where
//! one global lock was held around queueing and publishing (the wait for CMD_SYNC was already
//! outside it). Each of T threads (divan's `threads`: 1, 2, 4) forwards unmaps as a guest's vSMMU
//! does: one TLBI_NH_VA and a CMD_SYNC, then waits for the sync; one iteration is one such
//! submit+wait. A "hardware" thread, started by the benchmark beside divan's threads, consumes
//! the queue like an SMMU, with a fixed cost per command.
//!
//! Run: `cargo bench -p smmu-hv-smmuv3 --bench cmdq_contention` (divan's options follow `--`,
//! e.g. `-- --sample-count 20`); `CMD_COST_NS` sets the fake SMMU's time per command (default
//! 200). Figures only, apart from checking that the SMMU consumed every command submitted and
//! that none failed. Divan times each thread's samples: its figures are the time of one
//! submit+wait as one of T threads sees it (and `item/s` is one thread's submits per second; all
//! T threads together do T times that). With more threads than cores (the SMMU thread included)
//! the figures are mostly the host's scheduler: a spinning waiter can hold the SMMU thread off a
//! core.
//!
//! What the example this replaces did and divan does not: it alternated the variants run by run
//! and printed each lock's time as a ratio to the lock-free one's (median, min-max over the
//! runs), which cancels slow changes in the host's load. Divan measures each (variant, T) in one
//! stretch and compares nothing, so a change of load between two of them shows as a difference
//! between variants: read the figures from a quiet host, or repeat one variant at a time
//! (`-- lock_free`, `-- std_mutex`) and compare the medians.

use divan::counter::ItemsCount;
use divan::Bencher;
use smmu::cmd::{Command, TlbiAddr};
use smmu::driver::{Cmdq, QueueMemory, SmmuRegs, SyncTicket};
use smmu::regs;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

/// PA of the queue in the fake's memory.
const BASE: u64 = 0x4000_0000;
/// log2 of the queue's entries.
const LOG2: u8 = 8;
/// Default time the fake SMMU spends on each command (spinning), to model its work;
/// `CMD_COST_NS` overrides it.
const CMD_COST_NS: u64 = 200;

/// The fake SMMU's time per command.
fn cmd_cost() -> Duration {
    Duration::from_nanos(std::env::var("CMD_COST_NS").map_or(CMD_COST_NS, |a| {
        a.parse()
            .expect("CMD_COST_NS is the SMMU's time per command in ns")
    }))
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "Physical cmdq under contention: T threads each loop on (TLBI_NH_VA + CMD_SYNC, wait);"
    );
    println!(
        "  lock_free: queue_sync + wait; std_mutex/spin_mutex: a global Mutex around queue_sync +"
    );
    println!(
        "  publish (the old scheme; wait outside the lock). Fake SMMU thread: {} ns per command;",
        cmd_cost().as_nanos()
    );
    println!(
        "  queue 2^{LOG2} entries; this host has {cores} cores (T submitters + 1 SMMU thread)."
    );
    divan::main();
}

/// Submissions so far, one counter per submitting thread (each on its own cache line, so that
/// counting adds no sharing between the threads measured).
static SUBMITS: [Padded; SLOTS] = [const { Padded(AtomicU64::new(0)) }; SLOTS];
/// Submitting threads seen (divan keeps its threads from one benchmark to the next).
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
const SLOTS: usize = 16;

#[repr(align(128))]
struct Padded(AtomicU64);

thread_local! {
    /// This thread's index in [`SUBMITS`].
    static SLOT: usize = {
        let n = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SLOTS, "more than {SLOTS} submitting threads");
        n
    };
}

/// Submissions of all threads so far.
fn submitted() -> u64 {
    SUBMITS.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
}

/// What the queue and the "hardware" thread share.
struct Shared {
    /// The queue's memory: two doublewords per 16-byte entry.
    mem: Vec<AtomicU64>,
    prod: AtomicU32,
    cons: AtomicU32,
    gerror: AtomicU32,
    gerrorn: AtomicU32,
}

/// A fake SMMU usable from several threads: its registers and the queue's memory.
#[derive(Clone)]
struct Fake(Arc<Shared>);

impl Fake {
    fn new() -> Self {
        Self(Arc::new(Shared {
            mem: (0..2u64 << LOG2).map(|_| AtomicU64::new(0)).collect(),
            prod: AtomicU32::new(0),
            cons: AtomicU32::new(0),
            gerror: AtomicU32::new(0),
            gerrorn: AtomicU32::new(0),
        }))
    }

    fn word(&self, pa: u64) -> usize {
        ((pa - BASE) / 8) as usize
    }

    /// The SMMU: consumes entries between CONS and PROD until `stop` (and the queue is empty).
    /// Returns the commands consumed.
    fn consume(&self, stop: &AtomicBool, cost: Duration) -> u64 {
        let s = &self.0;
        let mask = (2u32 << LOG2) - 1;
        let mut count = 0;
        loop {
            let prod = s.prod.load(Ordering::Acquire);
            let mut cons = s.cons.load(Ordering::Relaxed);
            if cons == prod {
                if stop.load(Ordering::Acquire) {
                    return count;
                }
                std::hint::spin_loop();
                continue;
            }
            while cons != prod {
                let slot = u64::from(cons & ((1 << LOG2) - 1));
                let words = self.read_entry(BASE + slot * Command::SIZE as u64);
                Command::decode(words).expect("a valid command");
                if !cost.is_zero() {
                    let t = Instant::now();
                    while t.elapsed() < cost {
                        std::hint::spin_loop();
                    }
                }
                count += 1;
                cons = (cons + 1) & mask;
                s.cons.store(cons, Ordering::Release);
            }
        }
    }
}

impl SmmuRegs for Fake {
    fn read32(&self, off: u64) -> u32 {
        let s = &self.0;
        match off {
            regs::SMMU_CMDQ_PROD => s.prod.load(Ordering::Acquire),
            regs::SMMU_CMDQ_CONS => s.cons.load(Ordering::Acquire),
            regs::SMMU_GERROR => s.gerror.load(Ordering::Acquire),
            regs::SMMU_GERRORN => s.gerrorn.load(Ordering::Acquire),
            _ => 0,
        }
    }
    fn write32(&self, off: u64, v: u32) {
        let s = &self.0;
        match off {
            regs::SMMU_CMDQ_PROD => s.prod.store(v, Ordering::Release),
            regs::SMMU_CMDQ_CONS => s.cons.store(v, Ordering::Release),
            regs::SMMU_GERRORN => s.gerrorn.store(v, Ordering::Release),
            _ => {}
        }
    }
    fn read64(&self, _: u64) -> u64 {
        0
    }
    fn write64(&self, _: u64, _: u64) {}
}

impl QueueMemory for Fake {
    fn write_entry(&self, pa: u64, words: [u64; 2]) {
        let i = self.word(pa);
        self.0.mem[i].store(words[0], Ordering::Release);
        self.0.mem[i + 1].store(words[1], Ordering::Release);
    }
    fn read_entry(&self, pa: u64) -> [u64; 2] {
        let i = self.word(pa);
        [
            self.0.mem[i].load(Ordering::Acquire),
            self.0.mem[i + 1].load(Ordering::Acquire),
        ]
    }
    fn entry_barrier(&self) {
        fence(Ordering::Release);
    }
}

#[derive(Clone, Copy)]
enum Variant {
    /// `queue_sync` then `wait`, no lock.
    LockFree,
    /// A global `std::sync::Mutex` around `queue_sync` + `publish`.
    StdMutex,
    /// A global `spin::Mutex` around `queue_sync` + `publish`.
    SpinMutex,
}

// One benchmark per variant (not one with the variant as `args`): divan filters by benchmark
// name, so `-- lock_free` runs one variant.
//
// Samples of 1000 submit+wait each: one takes microseconds, far above the timer's precision, so
// divan would otherwise take one per sample, and a sample would then be one wait on the host's
// scheduler. 20 samples per thread (divan's `--sample-count` overrides it) are the old example's
// 20 000 submissions per thread.

/// `queue_sync` then `wait`, no lock.
#[divan::bench(threads = [1, 2, 4], sample_size = 1000, sample_count = 20)]
fn lock_free(bencher: Bencher) {
    unmap(bencher, Variant::LockFree);
}

/// A global `std::sync::Mutex` around `queue_sync` + `publish`.
#[divan::bench(threads = [1, 2, 4], sample_size = 1000, sample_count = 20)]
fn std_mutex(bencher: Bencher) {
    unmap(bencher, Variant::StdMutex);
}

/// A global `spin::Mutex` around `queue_sync` + `publish`.
#[divan::bench(threads = [1, 2, 4], sample_size = 1000, sample_count = 20)]
fn spin_mutex(bencher: Bencher) {
    unmap(bencher, Variant::SpinMutex);
}

/// Sets the flag when dropped: the SMMU thread stops even if a submitter panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One variant under divan's T threads, against a fresh queue and fake SMMU.
fn unmap(bencher: Bencher, variant: Variant) {
    let fake = Fake::new();
    let cmdq = Cmdq::new(fake.clone(), fake.clone(), BASE, LOG2, u32::MAX);
    let std_lock = Mutex::new(());
    let spin_lock = spin::Mutex::new(());
    let stop = AtomicBool::new(false);
    let cost = cmd_cost();
    let before = submitted();

    let consumed = std::thread::scope(|s| {
        let hw = s.spawn(|| fake.consume(&stop, cost));
        let stopper = StopOnDrop(&stop);
        bencher.counter(ItemsCount::new(1u32)).bench(|| {
            // This thread's slot (its ASID, as the old example's thread index) and its
            // submissions so far (the page it invalidates).
            let (slot, n) = SLOT.with(|&slot| {
                let c = &SUBMITS[slot].0;
                let n = c.load(Ordering::Relaxed);
                c.store(n + 1, Ordering::Relaxed);
                (slot, n)
            });
            let tlbi = Command::TlbiNhVa {
                vmid: 1,
                asid: slot as u16,
                addr: TlbiAddr::single((n & 0xf_ffff) << 12, true),
            };
            let queue = || -> SyncTicket {
                let t = cmdq.queue_sync(&[tlbi]).expect("queued");
                cmdq.publish();
                t
            };
            let t = match variant {
                Variant::LockFree => cmdq.queue_sync(&[tlbi]).expect("queued"),
                Variant::StdMutex => {
                    let _g = std_lock.lock().unwrap();
                    queue()
                }
                Variant::SpinMutex => {
                    let _g = spin_lock.lock();
                    queue()
                }
            };
            cmdq.wait(t).expect("CMD_SYNC completed");
        });
        drop(stopper);
        hw.join().unwrap()
    });

    let submits = submitted() - before;
    assert_eq!(consumed, submits * 2, "the SMMU consumed every command");
    assert_eq!(cmdq.error_count(), 0, "no command errors");
}

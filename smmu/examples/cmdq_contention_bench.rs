//! Host benchmark of the physical command queue ([`smmu::driver::Cmdq`]) under contention: what
//! the lock-free queue buys when several CPUs submit at once, against the previous scheme where
//! one global lock was held around queueing and publishing (the wait for CMD_SYNC was already
//! outside it). Each of T threads forwards unmaps as a guest's vSMMU does: one TLBI_NH_VA and a
//! CMD_SYNC, then waits for the sync. A "hardware" thread consumes the queue like an SMMU, with an
//! optional fixed cost per command.
//!
//! Run: `cargo run --release -p smmu-hv-smmuv3 --example cmdq_contention_bench [-- COST_NS]`
//! (COST_NS: the fake SMMU's time per command, default 200)
//! Figures only; not a pass/fail test, apart from checking every command was consumed. With more
//! threads than cores (the SMMU thread included) the figures are mostly the host's scheduler.

use smmu::cmd::{Command, TlbiAddr};
use smmu::driver::{Cmdq, QueueMemory, SmmuRegs, SyncTicket};
use smmu::regs;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// PA of the queue in the fake's memory.
const BASE: u64 = 0x4000_0000;
/// log2 of the queue's entries.
const LOG2: u8 = 8;
/// Submissions (TLBI + CMD_SYNC, then wait) per thread per run.
const K: u64 = 20_000;
/// Runs of every (threads, variant).
const REPEATS: usize = 5;
/// Submitting threads per scenario.
const THREADS: [usize; 3] = [1, 2, 4];
/// Default time the fake SMMU spends on each command (spinning), to model its work; the first
/// argument overrides it (in ns).
const CMD_COST_NS: u64 = 200;

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// `queue_sync` then `wait`, no lock.
    LockFree,
    /// A global `std::sync::Mutex` around `queue_sync` + `publish`.
    StdMutex,
    /// A global `spin::Mutex` around `queue_sync` + `publish`.
    SpinMutex,
}

const VARIANTS: [Variant; 3] = [Variant::LockFree, Variant::StdMutex, Variant::SpinMutex];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::LockFree => "A lock-free",
            Variant::StdMutex => "B std Mutex",
            Variant::SpinMutex => "C spin Mutex",
        }
    }
}

/// One run's figures.
#[derive(Clone, Copy)]
struct Sample {
    /// Mean over the threads of their time per submit+wait.
    ns_per_op: f64,
    /// Submissions of all threads per second of wall time.
    ops_per_s: f64,
}

/// Runs `threads` submitters of `K` unmaps each against a fresh queue and fake SMMU.
fn run(threads: usize, variant: Variant, cost: Duration) -> Sample {
    let fake = Fake::new();
    let cmdq = Cmdq::new(fake.clone(), fake.clone(), BASE, LOG2, u32::MAX);
    let std_lock = Mutex::new(());
    let spin_lock = spin::Mutex::new(());
    let stop = AtomicBool::new(false);

    let (consumed, spans) = std::thread::scope(|s| {
        let hw = s.spawn(|| fake.consume(&stop, cost));
        let workers: Vec<_> = (0..threads)
            .map(|n| {
                let (cmdq, std_lock, spin_lock) = (&cmdq, &std_lock, &spin_lock);
                s.spawn(move || {
                    let start = Instant::now();
                    for i in 0..K {
                        let tlbi = Command::TlbiNhVa {
                            vmid: 1,
                            asid: n as u16,
                            addr: TlbiAddr::single(i << 12, true),
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
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> =
            workers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Release);
        (hw.join().unwrap(), spans)
    });

    let expected = threads as u64 * K * 2;
    assert_eq!(consumed, expected, "the SMMU consumed every command");
    assert_eq!(cmdq.error_count(), 0, "no command errors");
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    let per_thread: f64 = spans
        .iter()
        .map(|(a, b)| (*b - *a).as_secs_f64())
        .sum::<f64>()
        / threads as f64;
    Sample {
        ns_per_op: per_thread / K as f64 * 1e9,
        ops_per_s: (threads as u64 * K) as f64 / (last - first).as_secs_f64(),
    }
}

/// Median, min and max.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let cost = Duration::from_nanos(std::env::args().nth(1).map_or(CMD_COST_NS, |a| {
        a.parse()
            .expect("the argument is the SMMU's time per command in ns")
    }));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "Physical cmdq under contention: T threads each do {K} x (TLBI_NH_VA + CMD_SYNC, wait),"
    );
    println!(
        "  A: lock-free queue_sync + wait; B/C: a global std/spin Mutex around queue_sync + publish"
    );
    println!(
        "  (the old scheme; wait outside the lock). Fake SMMU thread: {} ns per command.",
        cost.as_nanos()
    );
    println!(
        "  Queue 2^{LOG2} entries; {REPEATS} repeats, variants alternated; this host has {cores} cores"
    );
    println!(
        "  (T submitters + 1 SMMU thread: above {cores} threads they share cores, and the figures"
    );
    println!(
        "  are mostly the scheduler's: a spinning waiter can hold the SMMU thread off a core)."
    );
    println!();
    println!(
        "{:>2} {:<13} {:>28} {:>34}",
        "T", "variant", "ns/submit+wait med [min-max]", "total submits/s med [min-max]"
    );
    let start = Instant::now();
    for threads in THREADS {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); VARIANTS.len()];
        for _ in 0..REPEATS {
            for (i, v) in VARIANTS.iter().enumerate() {
                samples[i].push(run(threads, *v, cost));
            }
        }
        for (i, v) in VARIANTS.iter().enumerate() {
            let ns: Vec<f64> = samples[i].iter().map(|s| s.ns_per_op).collect();
            let ops: Vec<f64> = samples[i].iter().map(|s| s.ops_per_s).collect();
            let (nm, nl, nh) = stats(&ns);
            let (om, ol, oh) = stats(&ops);
            println!(
                "{threads:>2} {:<13} {nm:>9.0} [{nl:>7.0}-{nh:>7.0}] {:>10.3}M [{:>6.3}M-{:>6.3}M]",
                v.name(),
                om / 1e6,
                ol / 1e6,
                oh / 1e6,
            );
        }
        for (i, v) in VARIANTS.iter().enumerate().skip(1) {
            let r: Vec<f64> = samples[i]
                .iter()
                .zip(&samples[0])
                .map(|(x, a)| x.ns_per_op / a.ns_per_op)
                .collect();
            let (m, l, h) = stats(&r);
            println!(
                "{threads:>2}   time ratio {}/A: {m:.2} [{l:.2}-{h:.2}]",
                &v.name()[..1]
            );
        }
        println!();
    }
    println!(
        "all runs: every command consumed ({} s total)",
        start.elapsed().as_secs()
    );
}

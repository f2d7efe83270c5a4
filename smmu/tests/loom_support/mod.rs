//! The physical SMMU's command queue consumer as the loom models see it: registers and queue
//! memory in loom atomics, and a consumer that fetches from CONS to PROD, completes what it
//! fetched at the next CMD_SYNC, and stops on an illegal command until GERRORN acknowledges it
//! (IHI 0070 3.5, 4.7.3, 7.1). It steps when a CPU polls SMMU_CMDQ_CONS ([`FakeSmmu::step`]),
//! and on a thread of its own for a few steps where a model asks ([`FakeSmmu::start`]).
//! Ordering of the hardware accesses is what [`smmu::driver::SmmuRegs`] promises: a register
//! write is a release, a register read an acquire; queue entries are plain (relaxed) doublewords,
//! so a consumer that fetched an entry nothing ordered before its PROD would see a stale one.
#![allow(dead_code)]

use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use smmu::cmd::Command;
use smmu::driver::{Cmdq, QueueMemory, SmmuRegs};
use smmu::regs::{self, Gerror};

/// PA of the queue.
pub const BASE: u64 = 0x1000;

/// Every interleaving of `f` within a preemption bound: `LOOM_MAX_PREEMPTIONS` if set (3 in
/// the full run, docs/assurance.md), else 2 (the test command's), and at most `max_bound`.
pub fn model(max_bound: usize, f: impl Fn() + Sync + Send + 'static) {
    // The test harness names the thread after the test.
    let name = std::thread::current().name().unwrap_or("?").to_string();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(b.preemption_bound.unwrap_or(2).min(max_bound));
    b.max_branches = 20_000;
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    let start = std::time::Instant::now();
    b.check(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    eprintln!(
        "[loom] {name}: {} interleavings, preemption bound {:?}, {:.1} s",
        runs.load(std::sync::atomic::Ordering::Relaxed),
        b.preemption_bound,
        start.elapsed().as_secs_f64()
    );
}

/// The command that stands for an illegal one: the consumer stops on it with CERROR_ILL.
pub const ILLEGAL: Command = Command::TlbiS12Vmall { vmid: 0xdead };

/// Producer `t`'s `n`th command (a CMD_CFGI_STE whose StreamID names them).
pub fn tagged(t: u32, n: u32) -> Command {
    Command::CfgiSte {
        sid: t << 16 | n,
        leaf: true,
    }
}

#[derive(Debug)]
pub struct Hw {
    log2: u8,
    mem: Vec<AtomicU64>,
    prod: AtomicU32,
    cons: AtomicU32,
    gerror: AtomicU32,
    gerrorn: AtomicU32,
    /// Per producer, its tagged commands completed (checked to come once and in order).
    pub ran: Vec<AtomicU64>,
    /// Every command completed, in order (CMD_SYNCs included).
    pub log: Mutex<Vec<Command>>,
    /// Consumed and not complete yet; its lock is the SMMU's: one step at a time.
    consumed: Mutex<Vec<Command>>,
}

/// The SMMU: registers, queue memory and the consumer's state.
#[derive(Debug, Clone)]
pub struct FakeSmmu(pub Arc<Hw>);

impl FakeSmmu {
    pub fn new(log2: u8, producers: usize) -> Self {
        Self(Arc::new(Hw {
            log2,
            mem: (0..2 << log2).map(|_| AtomicU64::new(0)).collect(),
            prod: AtomicU32::new(0),
            cons: AtomicU32::new(0),
            gerror: AtomicU32::new(0),
            gerrorn: AtomicU32::new(0),
            ran: (0..producers).map(|_| AtomicU64::new(0)).collect(),
            log: Mutex::new(Vec::new()),
            consumed: Mutex::new(Vec::new()),
        }))
    }

    /// The driver's queue over this SMMU, polls bounded by `poll_limit` rounds.
    pub fn cmdq(&self, poll_limit: u32) -> Cmdq<FakeSmmu, FakeSmmu> {
        Cmdq::new(self.clone(), self.clone(), BASE, self.0.log2, poll_limit)
    }

    /// An SMMU thread beside the CPUs' polls: `steps` steps, each followed by a yield, so it may
    /// move between any two CPU operations; bounded, so loom never runs it against a starved CPU.
    pub fn start(&self, steps: usize) -> loom::thread::JoinHandle<()> {
        let me = self.clone();
        loom::thread::spawn(move || {
            for _ in 0..steps {
                me.step();
                loom::thread::yield_now();
            }
        })
    }

    /// The SMMU runs what is left once every CPU is done (what was published without a wait).
    pub fn drain(&self) {
        for _ in 0..2 << self.0.log2 {
            self.step();
        }
        // And completes them, CMD_SYNC or not.
        self.complete(&mut self.0.consumed.lock().unwrap());
    }

    /// Tagged commands of producer `t` run so far.
    pub fn ran(&self, t: u32) -> u64 {
        self.0.ran[t as usize].load(Ordering::Acquire)
    }

    /// The SMMU's progress, made when a CPU reads SMMU_CMDQ_CONS: it runs the next published
    /// entry, if any and the queue is not stopped. An SMMU on a thread of its own would make
    /// the model explore schedules that never run it (loom's scheduling is not fair across
    /// yields), which on hardware cannot happen; here every poll lets it move one entry, so a
    /// poll that runs out means nothing published the entry it waits for.
    fn step(&self) {
        let hw = &self.0;
        let wrap_mask = (2u32 << hw.log2) - 1;
        // Idle: no write, so that CPUs polling an idle SMMU stay independent of each other and
        // the model does not explore their polls' orders (a poll that waits on another CPU
        // would otherwise be run round after round while that CPU starves: loom's scheduling
        // is not fair across yields).
        if hw.prod.load(Ordering::Acquire) & wrap_mask
            == hw.cons.load(Ordering::Acquire) & wrap_mask
        {
            return;
        }
        // One SMMU: its steps come one at a time, whichever CPU's poll makes them.
        let mut consumed = hw.consumed.lock().unwrap();
        let prod = hw.prod.load(Ordering::Acquire) & wrap_mask;
        let cons = hw.cons.load(Ordering::Acquire);
        let stopped = hw.gerror.load(Ordering::Acquire) ^ hw.gerrorn.load(Ordering::Acquire) != 0;
        if prod == cons & wrap_mask || stopped {
            return;
        }
        let cons = cons & wrap_mask;
        let pa = BASE + u64::from(cons & ((1 << hw.log2) - 1)) * 16;
        let c = Command::decode(self.read_entry(pa)).expect("an entry the driver wrote");
        if c == ILLEGAL {
            // CERROR_ILL; CONS stays on the command (IHI 0070 7.1).
            hw.cons.store(cons | 1 << 24, Ordering::Release);
            hw.gerror
                .fetch_xor(Gerror::CMDQ_ERR.bits(), Ordering::AcqRel);
            return;
        }
        consumed.push(c);
        if let Command::Sync(_) = c {
            // Consumed is not complete: a command takes effect by the CMD_SYNC after it at the
            // latest (IHI 0070 4.7.3), and that is when the model lets it.
            self.complete(&mut consumed);
        }
        hw.cons.store((cons + 1) & wrap_mask, Ordering::Release);
    }

    /// Completes the commands consumed so far, in order.
    fn complete(&self, consumed: &mut Vec<Command>) {
        let hw = &self.0;
        for c in consumed.drain(..) {
            if let Command::CfgiSte { sid, .. } = c {
                let (t, n) = ((sid >> 16) as usize, u64::from(sid & 0xffff));
                let done = hw.ran[t].load(Ordering::Relaxed);
                assert_eq!(n, done, "producer {t}: command {n} run after {done} others");
                hw.ran[t].store(done + 1, Ordering::Release);
            }
            hw.log.lock().unwrap().push(c);
        }
    }
}

impl SmmuRegs for FakeSmmu {
    fn read32(&self, off: u64) -> u32 {
        match off {
            regs::SMMU_CMDQ_CONS => {
                self.step();
                self.0.cons.load(Ordering::Acquire)
            }
            regs::SMMU_CMDQ_PROD => self.0.prod.load(Ordering::Acquire),
            regs::SMMU_GERROR => self.0.gerror.load(Ordering::Acquire),
            regs::SMMU_GERRORN => self.0.gerrorn.load(Ordering::Acquire),
            _ => 0,
        }
    }

    fn write32(&self, off: u64, v: u32) {
        match off {
            regs::SMMU_CMDQ_PROD => {
                // PROD only moves forward, by at most a queue's worth (IHI 0070 3.5.1).
                let wrap_mask = (2u32 << self.0.log2) - 1;
                let old = self.0.prod.load(Ordering::Relaxed);
                let ahead = v.wrapping_sub(old) & wrap_mask;
                assert!(ahead <= 1 << self.0.log2, "PROD {old:#x} -> {v:#x}");
                self.0.prod.store(v, Ordering::Release)
            }
            regs::SMMU_GERRORN => self.0.gerrorn.store(v, Ordering::Release),
            _ => panic!("unexpected register write {off:#x}"),
        }
    }

    fn read64(&self, _: u64) -> u64 {
        0
    }

    fn write64(&self, off: u64, _: u64) {
        panic!("unexpected register write {off:#x}")
    }
}

impl QueueMemory for FakeSmmu {
    fn write_entry(&self, pa: u64, words: [u64; 2]) {
        let i = ((pa - BASE) / 8) as usize;
        self.0.mem[i].store(words[0], Ordering::Relaxed);
        self.0.mem[i + 1].store(words[1], Ordering::Relaxed);
    }

    fn read_entry(&self, pa: u64) -> [u64; 2] {
        let i = ((pa - BASE) / 8) as usize;
        [
            self.0.mem[i].load(Ordering::Relaxed),
            self.0.mem[i + 1].load(Ordering::Relaxed),
        ]
    }

    fn entry_barrier(&self) {
        loom::sync::atomic::fence(Ordering::Release);
    }
}

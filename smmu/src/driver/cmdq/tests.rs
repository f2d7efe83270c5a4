//! The queue under real concurrency: producer threads against an SMMU that consumes on its own
//! thread, with wraps, full-queue waits, batches bigger than the queue and command errors.

extern crate std;

use super::*;
use crate::cmd::Command;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::thread;
use std::vec;

const BASE: u64 = 0x1000;
/// Producers, and what each does.
const THREADS: u32 = 4;
/// Under Miri (its data-race checker is the point there) fewer: still several wraps, full-queue
/// waits, oversized batches and command errors per thread.
const BATCHES: u32 = if cfg!(miri) { 200 } else { 800 };

/// An SMMU command queue consumer with its own thread, reached through atomics.
struct Hw {
    log2: u8,
    mem: Vec<AtomicU64>,
    prod: AtomicU32,
    cons: AtomicU32,
    gerror: AtomicU32,
    gerrorn: AtomicU32,
    stop: AtomicBool,
    /// Every command consumed, in order.
    consumed: Mutex<Vec<Command>>,
    /// Commands of each producer consumed so far (by the StreamID's high bits).
    per_thread: Vec<AtomicU64>,
}

#[derive(Clone)]
struct Fake(Arc<Hw>);

impl SmmuRegs for Fake {
    fn read32(&self, off: u64) -> u32 {
        match off {
            regs::SMMU_CMDQ_CONS => self.0.cons.load(Ordering::Acquire),
            regs::SMMU_CMDQ_PROD => self.0.prod.load(Ordering::Acquire),
            regs::SMMU_GERROR => self.0.gerror.load(Ordering::Acquire),
            regs::SMMU_GERRORN => self.0.gerrorn.load(Ordering::Acquire),
            _ => 0,
        }
    }

    fn write32(&self, off: u64, v: u32) {
        match off {
            regs::SMMU_CMDQ_PROD => self.0.prod.store(v, Ordering::Release),
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

impl QueueMemory for Fake {
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
        core::sync::atomic::fence(Ordering::Release);
    }
}

impl Fake {
    fn new(log2: u8) -> Self {
        Self(Arc::new(Hw {
            log2,
            mem: (0..2 << log2).map(|_| AtomicU64::new(0)).collect(),
            prod: AtomicU32::new(0),
            cons: AtomicU32::new(0),
            gerror: AtomicU32::new(0),
            gerrorn: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            consumed: Mutex::new(Vec::new()),
            per_thread: (0..THREADS).map(|_| AtomicU64::new(0)).collect(),
        }))
    }

    /// The SMMU: consumes from CONS to PROD; an illegal command (TLBI_S12_VMALL stands for one)
    /// stops the queue with CERROR_ILL until GERRORN acknowledges it.
    fn run(&self) {
        let hw = &self.0;
        let wrap_mask = (2u32 << hw.log2) - 1;
        loop {
            let prod = hw.prod.load(Ordering::Acquire) & wrap_mask;
            let mut cons = hw.cons.load(Ordering::Relaxed) & wrap_mask;
            if prod == cons && hw.stop.load(Ordering::Acquire) {
                return;
            }
            let stopped =
                (hw.gerror.load(Ordering::Acquire) ^ hw.gerrorn.load(Ordering::Acquire)) != 0;
            while !stopped && cons != prod {
                let pa = BASE + u64::from(cons & ((1 << hw.log2) - 1)) * 16;
                let c = Command::decode(self.read_entry(pa)).expect("a command the driver wrote");
                if let Command::TlbiS12Vmall { .. } = c {
                    hw.cons.store(cons | 1 << 24, Ordering::Release);
                    hw.gerror
                        .fetch_xor(Gerror::CMDQ_ERR.bits(), Ordering::AcqRel);
                    break;
                }
                if let Command::CfgiSte { sid, .. } = c {
                    hw.per_thread[(sid >> 20) as usize].fetch_add(1, Ordering::AcqRel);
                }
                hw.consumed.lock().unwrap().push(c);
                cons = (cons + 1) & wrap_mask;
                hw.cons.store(cons, Ordering::Release);
            }
            thread::yield_now();
        }
    }
}

/// Producer `t`'s `n`th command.
fn tagged(t: u32, n: u32) -> Command {
    Command::CfgiSte {
        sid: t << 20 | n,
        leaf: true,
    }
}

#[test]
fn producers_on_many_threads_keep_their_order_and_their_syncs_cover_their_commands() {
    let fake = Fake::new(3);
    let q = Arc::new(Cmdq::new(fake.clone(), fake.clone(), BASE, 3, u32::MAX));
    let hw = {
        let f = fake.clone();
        thread::spawn(move || f.run())
    };
    let producers: Vec<_> = (0..THREADS)
        .map(|t| {
            let q = q.clone();
            let fake = fake.clone();
            thread::spawn(move || {
                let mut sent = 0u32;
                let mut errors = 0;
                for b in 0..BATCHES {
                    // 0-6 commands, now and then more than the queue holds.
                    let k = if b % 97 == 0 { 19 } else { (b * 7 + t) % 7 };
                    let mut cmds: Vec<Command> = (sent..sent + k).map(|n| tagged(t, n)).collect();
                    sent += k;
                    let bad = t == 1 && b % 50 == 25;
                    if bad {
                        cmds.insert(0, Command::TlbiS12Vmall { vmid: 1 });
                    }
                    if b % 3 == 2 && !bad {
                        q.submit(&cmds).unwrap();
                        continue;
                    }
                    let ticket = q.queue_sync(&cmds).unwrap();
                    match q.wait(ticket) {
                        Ok(()) => assert!(!bad, "thread {t} batch {b}: error not reported"),
                        Err(DriverError::CommandError { command, .. }) => {
                            assert!(bad, "thread {t} batch {b}: someone else's error");
                            assert_eq!(command, Command::TlbiS12Vmall { vmid: 1 }.encode());
                            errors += 1;
                        }
                        Err(e) => panic!("thread {t} batch {b}: {e}"),
                    }
                    // The CMD_SYNC completed: every command this thread queued before it has.
                    let done = fake.0.per_thread[t as usize].load(Ordering::Acquire);
                    assert!(
                        done >= u64::from(sent),
                        "thread {t} batch {b}: sync completed with {done} of {sent} consumed"
                    );
                }
                // What was submitted without a sync still gets consumed.
                q.submit_sync(&[]).unwrap();
                (sent, errors)
            })
        })
        .collect();
    let results: Vec<(u32, u32)> = producers.into_iter().map(|p| p.join().unwrap()).collect();
    fake.0.stop.store(true, Ordering::Release);
    hw.join().unwrap();

    let consumed = fake.0.consumed.lock().unwrap();
    let mut next = vec![0u32; THREADS as usize];
    for c in consumed.iter() {
        if let Command::CfgiSte { sid, .. } = *c {
            let t = (sid >> 20) as usize;
            assert_eq!(
                sid & 0xf_ffff,
                next[t],
                "thread {t}: out of order or duplicated"
            );
            next[t] += 1;
        }
    }
    for (t, &(sent, errors)) in results.iter().enumerate() {
        assert_eq!(next[t], sent, "thread {t}: commands lost");
        assert_eq!(errors, if t == 1 { BATCHES.div_ceil(50) } else { 0 });
    }
    assert_eq!(q.error_count(), u64::from(BATCHES.div_ceil(50)));
    assert_eq!(
        q.reserved.load(Ordering::Acquire),
        q.published.load(Ordering::Acquire)
    );
}

#[test]
fn extended_cons_is_exact_across_laps_and_ignores_impossible_values() {
    let fake = Fake::new(2);
    let q = Cmdq::new(fake.clone(), fake.clone(), BASE, 2, 10);
    // 4 entries: CONS register values name 8 positions; the count goes on past them.
    for lap in 0..10u64 {
        for i in 0..4u64 {
            let seq = lap * 4 + i;
            q.reserved.store(seq + 1, Ordering::Release);
            fake.0.cons.store(q.reg_value(seq + 1), Ordering::Release);
            assert_eq!(q.refresh_cons().0, seq + 1);
        }
    }
    // More than a queue's worth ahead of the known count cannot be: ignored.
    fake.0.cons.store(q.reg_value(40 + 5), Ordering::Release);
    assert_eq!(q.refresh_cons().0, 40);
    // Behind it (a stale read): the count never goes back.
    fake.0.cons.store(q.reg_value(39), Ordering::Release);
    assert_eq!(q.refresh_cons().0, 40);
}

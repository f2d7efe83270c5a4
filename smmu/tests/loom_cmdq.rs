//! Every interleaving (within loom's preemption bound) of producers on the physical command
//! queue ([`smmu::driver::Cmdq`]) and the SMMU consuming it, for queues of 2 and 4 entries.
//! Asserted in each: a producer's commands are run once and in its order (the consumer checks),
//! a completed CMD_SYNC covers all that its producer queued before it, a command error reaches
//! only the batch that held the failed command, and no poll runs out (nothing waits forever).
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p smmu-hv-smmuv3 --test loom_cmdq --release` (qemu/loom.sh;
//! docs/assurance.md has the full runs and the mutations these tests catch).
#![cfg(loom)]

mod loom_support;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use loom_support::{model, tagged, FakeSmmu, ILLEGAL};
use smmu::cmd::Command;
use smmu::driver::DriverError;

/// Rounds of every bounded poll: far more than a schedule needs, since each round yields.
const POLLS: u32 = 32;

/// Producer `t` queues commands `from..from + k` of its own with a CMD_SYNC and waits for it;
/// the sync's completion must cover them and everything `t` queued before.
fn sync_batch(
    q: &smmu::driver::Cmdq<FakeSmmu, FakeSmmu>,
    hw: &FakeSmmu,
    t: u32,
    from: u32,
    k: u32,
) {
    let cmds: Vec<Command> = (from..from + k).map(|n| tagged(t, n)).collect();
    q.submit_sync(&cmds)
        .unwrap_or_else(|e| panic!("producer {t}: {e}"));
    let ran = hw.ran(t);
    assert!(
        ran >= u64::from(from + k),
        "producer {t}: its CMD_SYNC completed with {ran} of {} commands run",
        from + k
    );
}

#[test]
fn two_producers_with_syncs_in_a_queue_of_two() {
    model(usize::MAX, || {
        let hw = FakeSmmu::new(1, 2);
        let q = Arc::new(hw.cmdq(POLLS));
        let p1 = {
            let (q, hw) = (q.clone(), hw.clone());
            thread::spawn(move || sync_batch(&q, &hw, 1, 0, 1))
        };
        sync_batch(&q, &hw, 0, 0, 1);
        p1.join().unwrap();
        hw.drain();
        assert_eq!((hw.ran(0), hw.ran(1)), (1, 1));
    });
}

/// The SMMU also on a thread of its own, so that it may move between any two CPU operations,
/// not only inside polls; for a bounded number of steps (loom's scheduling is not fair across
/// yields: an SMMU thread that ran until told to stop made the model run polls against a
/// starved CPU until they ran out).
#[test]
fn two_producers_with_the_smmu_also_on_a_thread_of_its_own() {
    model(usize::MAX, || {
        let hw = FakeSmmu::new(1, 2);
        let q = Arc::new(hw.cmdq(POLLS));
        let smmu = hw.start(4);
        let p1 = {
            let (q, hw) = (q.clone(), hw.clone());
            thread::spawn(move || sync_batch(&q, &hw, 1, 0, 1))
        };
        sync_batch(&q, &hw, 0, 0, 1);
        p1.join().unwrap();
        smmu.join().unwrap();
        hw.drain();
        assert_eq!((hw.ran(0), hw.ran(1)), (1, 1));
    });
}

#[test]
fn a_batch_bigger_than_the_queue_beside_one_without_a_sync() {
    model(usize::MAX, || {
        let hw = FakeSmmu::new(1, 2);
        let q = Arc::new(hw.cmdq(POLLS));
        let p1 = {
            let q = q.clone();
            // No CMD_SYNC and no wait: publication alone must get it run.
            thread::spawn(move || q.submit(&[tagged(1, 0)]).unwrap())
        };
        // Three commands and a CMD_SYNC through a queue of two: queued in parts.
        sync_batch(&q, &hw, 0, 0, 3);
        p1.join().unwrap();
        hw.drain();
        assert_eq!((hw.ran(0), hw.ran(1)), (3, 1), "a command was lost");
    });
}

#[test]
fn three_producers_one_without_a_sync_in_a_queue_of_four() {
    model(
        // 889 k interleavings in a minute at 2; 3 had not finished after 26 min.
        2,
        || {
            let hw = FakeSmmu::new(2, 3);
            let q = Arc::new(hw.cmdq(POLLS));
            let submitted = Arc::new(AtomicBool::new(false));
            let p1 = {
                let (q, submitted) = (q.clone(), submitted.clone());
                thread::spawn(move || {
                    q.submit(&[tagged(1, 0)]).unwrap();
                    submitted.store(true, Ordering::Release);
                })
            };
            let p2 = {
                let (q, hw, submitted) = (q.clone(), hw.clone(), submitted.clone());
                // A CMD_SYNC alone, queued after producer 1's command or not: it covers whatever
                // is ahead of it in the queue, other producers' commands too.
                thread::spawn(move || {
                    let after = submitted.load(Ordering::Acquire);
                    q.submit_sync(&[]).unwrap();
                    if after {
                        assert_eq!(
                            hw.ran(1),
                            1,
                            "a CMD_SYNC completed before a command ahead of it"
                        );
                    }
                })
            };
            sync_batch(&q, &hw, 0, 0, 1);
            p1.join().unwrap();
            p2.join().unwrap();
            hw.drain();
            assert_eq!((hw.ran(0), hw.ran(1)), (1, 1), "a command was lost");
        },
    );
}

#[test]
fn a_command_error_reaches_only_the_batch_that_held_it() {
    model(usize::MAX, || {
        let hw = FakeSmmu::new(2, 2);
        let q = Arc::new(hw.cmdq(POLLS));
        let p1 = {
            let (q, hw) = (q.clone(), hw.clone());
            thread::spawn(move || sync_batch(&q, &hw, 1, 0, 1))
        };
        match q.submit_sync(&[ILLEGAL, tagged(0, 0)]) {
            Err(DriverError::CommandError { command, .. }) => {
                assert_eq!(command, ILLEGAL.encode(), "another command's error")
            }
            other => panic!("producer 0: its illegal command gave {other:?}"),
        }
        // The queue went on past the skipped command.
        assert_eq!(hw.ran(0), 1);
        p1.join().unwrap();
        hw.drain();
        assert_eq!(q.error_count(), 1);
    });
}

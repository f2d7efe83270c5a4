//! Rate limits on the hypervisor's log lines that a guest can cause.
//!
//! The console is shared by every VM and the hypervisor: a guest that faults in a loop (an
//! unmapped access, a bad STE, a flood of SMMU events) must not be able to fill it with the
//! hypervisor's reports, or slow every CPU down on the console lock. Each (VM, call site) pair
//! has a token bucket: [`BURST`] lines at once, then [`REFILL_MS`] per line. What is dropped is
//! counted per VM and reported at most every [`REPORT_MS`] ([`LogLimiter::report`]), and the
//! first line a call site prints after dropping says how many of its own were dropped.
//!
//! The table is fixed-size (no allocation in the logger) and split per VM, so one guest's lines
//! never take another's buckets; a VM's pairs beyond its share of the table share one bucket,
//! so a guest that reaches many call sites is still bounded.

/// Lines a call site may print at once, per VM.
pub const BURST: u32 = 10;
/// Milliseconds for one more line of a call site, per VM.
pub const REFILL_MS: u64 = 1000;
/// Shortest interval between two reports of dropped lines.
pub const REPORT_MS: u64 = 5000;
/// VMs the limiter keeps apart; higher VM indices share the last.
pub const MAX_VMS: usize = 16;
/// Call sites with a bucket of their own, per VM.
const SLOTS: usize = 24;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// (VM + 1) << 48 | call site; 0: free.
    key: u64,
    tokens: u32,
    /// When `tokens` was last topped up.
    at_ms: u64,
    /// Lines of this pair dropped since it last printed.
    dropped: u32,
}

const EMPTY: Bucket = Bucket {
    key: 0,
    tokens: BURST,
    at_ms: 0,
    dropped: 0,
};

/// What to do with one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Print it; `dropped` lines of the same call site and VM were dropped before it.
    Print {
        /// Lines dropped since the call site last printed.
        dropped: u32,
    },
    /// Drop it (it is counted).
    Drop,
}

/// The limiter's state.
#[derive(Debug)]
pub struct LogLimiter {
    buckets: [[Bucket; SLOTS]; MAX_VMS],
    /// The shared bucket of each VM for pairs that found no slot.
    overflow: [Bucket; MAX_VMS],
    /// Lines dropped per VM since the last report.
    unreported: [u64; MAX_VMS],
    last_report_ms: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// A call site's key from its file and line (FNV-1a, 48 bits; 0 is never produced).
pub fn site_key(file: &str, line: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in file.bytes().chain(line.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h & 0xffff_ffff_ffff) | 1
}

impl Bucket {
    fn take(&mut self, now_ms: u64) -> Verdict {
        let earned = now_ms.saturating_sub(self.at_ms) / REFILL_MS;
        if earned > 0 {
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(BURST)) as u32;
            self.at_ms = self.at_ms.saturating_add(earned * REFILL_MS);
        }
        if self.tokens == 0 {
            self.dropped = self.dropped.saturating_add(1);
            return Verdict::Drop;
        }
        self.tokens -= 1;
        Verdict::Print {
            dropped: core::mem::take(&mut self.dropped),
        }
    }
}

impl LogLimiter {
    /// Every bucket full.
    pub const fn new() -> Self {
        Self {
            buckets: [[EMPTY; SLOTS]; MAX_VMS],
            overflow: [EMPTY; MAX_VMS],
            unreported: [0; MAX_VMS],
            last_report_ms: 0,
        }
    }

    /// The verdict on a line that VM `vm` caused at call site `site` ([`site_key`]) at `now_ms`.
    pub fn check(&mut self, vm: usize, site: u64, now_ms: u64) -> Verdict {
        let vm = vm.min(MAX_VMS - 1);
        let key = ((vm as u64 + 1) << 48) | (site & 0xffff_ffff_ffff);
        let start = (key as usize).wrapping_mul(0x9e37_79b9) % SLOTS;
        let mut verdict = None;
        for i in 0..SLOTS {
            let b = &mut self.buckets[vm][(start + i) % SLOTS];
            if b.key == key || b.key == 0 {
                if b.key == 0 {
                    *b = Bucket {
                        key,
                        at_ms: now_ms,
                        ..EMPTY
                    };
                }
                verdict = Some(b.take(now_ms));
                break;
            }
        }
        let verdict = verdict.unwrap_or_else(|| {
            let b = &mut self.overflow[vm];
            if b.key == 0 {
                *b = Bucket {
                    key,
                    at_ms: now_ms,
                    ..EMPTY
                };
            }
            b.take(now_ms)
        });
        if verdict == Verdict::Drop {
            self.unreported[vm] = self.unreported[vm].saturating_add(1);
        }
        verdict
    }

    /// The VMs with lines dropped since the last report and how many, if a report is due
    /// (at most every [`REPORT_MS`]); calling it resets those counts.
    pub fn report(&mut self, now_ms: u64) -> Option<[u64; MAX_VMS]> {
        if self.unreported.iter().all(|&n| n == 0)
            || now_ms.saturating_sub(self.last_report_ms) < REPORT_MS
        {
            return None;
        }
        self.last_report_ms = now_ms;
        Some(core::mem::take(&mut self.unreported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_a_second_and_the_dropped_count() {
        let mut l = LogLimiter::new();
        let site = site_key("hypervisor/src/arch/vcpu.rs", 512);
        for i in 0..BURST {
            assert_eq!(
                l.check(1, site, 0),
                Verdict::Print { dropped: 0 },
                "line {i}"
            );
        }
        for _ in 0..1000 {
            assert_eq!(l.check(1, site, 10), Verdict::Drop);
        }
        assert_eq!(l.check(1, site, 999), Verdict::Drop);
        assert_eq!(l.check(1, site, 1000), Verdict::Print { dropped: 1001 });
        assert_eq!(l.check(1, site, 1001), Verdict::Drop);
        // Ten quiet seconds refill the burst, no more.
        for _ in 0..BURST {
            assert!(matches!(l.check(1, site, 20_000), Verdict::Print { .. }));
        }
        assert_eq!(l.check(1, site, 20_000), Verdict::Drop);
    }

    #[test]
    fn vms_and_sites_are_apart() {
        let mut l = LogLimiter::new();
        let (a, b) = (site_key("a.rs", 1), site_key("a.rs", 2));
        for _ in 0..100 {
            l.check(0, a, 0);
        }
        // vm0 flooding site a costs neither vm1 at site a nor vm0 at site b anything.
        assert_eq!(l.check(1, a, 0), Verdict::Print { dropped: 0 });
        assert_eq!(l.check(0, b, 0), Verdict::Print { dropped: 0 });
    }

    #[test]
    fn many_sites_are_still_bounded() {
        let mut l = LogLimiter::new();
        let mut printed = 0;
        for site in 0..10_000u64 {
            if matches!(l.check(3, site * 7 + 1, 0), Verdict::Print { .. }) {
                printed += 1;
            }
        }
        // Every slot's burst, then the VM's shared overflow bucket's.
        assert!(printed <= (SLOTS as u32 + 1) * BURST, "{printed}");
        // Another VM is not touched by vm3's spread: its own part of the table is free.
        for site in 0..SLOTS as u64 {
            assert_eq!(l.check(4, site * 7 + 1, 0), Verdict::Print { dropped: 0 });
        }
    }

    #[test]
    fn reports_are_periodic_and_per_vm() {
        let mut l = LogLimiter::new();
        let s = site_key("x.rs", 9);
        assert_eq!(l.report(10_000), None, "nothing dropped");
        for _ in 0..BURST + 5 {
            l.check(2, s, 6000);
        }
        let r = l.report(6000).unwrap();
        assert_eq!((r[2], r[0]), (5, 0));
        l.check(2, s, 6001);
        assert_eq!(l.report(7000), None, "not before REPORT_MS");
        assert_eq!(l.report(11_000).unwrap()[2], 1);
        // A VM index past the table shares the last row.
        l.check(MAX_VMS + 3, s, 0);
        assert_eq!(site_key("a", 1) & 1, 1);
    }
}

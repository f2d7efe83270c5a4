//! Budgets by time for what VMs share (docs/design.md section 10, "Shared paths and their budgets"): a token
//! bucket on a nanosecond clock. The physical driver budgets each stream's event records with it,
//! the vSMMU each VM's physical STE work and CMD_SYNCs.
//!
//! A bucket holds at most `burst` tokens and gains one every `period_ns`; a caller without a token
//! is told when the next one comes. Without a clock (`now == None`) every take succeeds: the
//! budgets by time are off, the structural ones (per trap, per VM outstanding) still hold.

/// A token bucket: `burst` tokens at most, one more every `period_ns` nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    tokens: u32,
    burst: u32,
    period_ns: u64,
    /// The clock reading up to which tokens were counted.
    stamp: u64,
}

impl TokenBucket {
    /// A full bucket. `period_ns == 0` never runs dry; `burst == 0` is taken as 1.
    pub const fn new(burst: u32, period_ns: u64) -> Self {
        let burst = if burst == 0 { 1 } else { burst };
        Self {
            tokens: burst,
            burst,
            period_ns,
            stamp: 0,
        }
    }

    /// Tokens left as of the last refill.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// Fills it up again (a restored stream, a reset VM).
    pub fn fill(&mut self) {
        self.tokens = self.burst;
    }

    /// Adds the tokens that time brought up to `now`. The clock is monotonic; an earlier reading
    /// (another CPU's, a moment older) adds nothing.
    fn refill(&mut self, now: u64) {
        if self.period_ns == 0 {
            self.tokens = self.burst;
            self.stamp = now;
            return;
        }
        if self.tokens >= self.burst {
            // Full: time spent full earns nothing.
            self.stamp = self.stamp.max(now);
            return;
        }
        let elapsed = now.saturating_sub(self.stamp);
        let earned = elapsed / self.period_ns;
        if earned == 0 {
            return;
        }
        let room = u64::from(self.burst - self.tokens);
        if earned >= room {
            self.tokens = self.burst;
            self.stamp = now;
        } else {
            // Keep the remainder of the period towards the next token.
            self.tokens += earned as u32;
            self.stamp += earned * self.period_ns;
        }
    }

    /// Takes `n` tokens at time `now`, or none: `Err(t)` names the earliest clock reading at which
    /// they will all be there (`n` above the burst is taken as the burst). Always succeeds
    /// without a clock.
    pub fn take(&mut self, n: u32, now: Option<u64>) -> Result<(), u64> {
        let Some(now) = now else {
            return Ok(());
        };
        let n = n.min(self.burst);
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        let missing = u64::from(n - self.tokens);
        Err(self
            .stamp
            .saturating_add(missing.saturating_mul(self.period_ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_runs_dry_and_refills_at_its_rate() {
        let mut b = TokenBucket::new(3, 100);
        let t0 = 1_000_000;
        for _ in 0..3 {
            assert_eq!(b.take(1, Some(t0)), Ok(()));
        }
        // Dry: the next token is one period after the last count.
        assert_eq!(b.take(1, Some(t0 + 10)), Err(t0 + 100));
        assert_eq!(b.take(1, Some(t0 + 99)), Err(t0 + 100));
        assert_eq!(b.take(1, Some(t0 + 100)), Ok(()));
        // 250 ns later: two tokens earned, the half period kept towards the third.
        assert_eq!(b.take(2, Some(t0 + 350)), Ok(()));
        assert_eq!(b.take(1, Some(t0 + 350)), Err(t0 + 400));
        // Idle for long: full, never more than the burst.
        assert_eq!(b.take(3, Some(t0 + 1_000_000)), Ok(()));
        assert_eq!(b.take(1, Some(t0 + 1_000_000)), Err(t0 + 1_000_100));
        // More than the burst is taken as the burst; an older reading adds nothing.
        assert_eq!(b.take(9, Some(t0 + 1_000_300)), Ok(()));
        assert_eq!(b.take(1, Some(t0)), Err(t0 + 1_000_400));
    }

    #[test]
    fn without_a_clock_or_a_period_nothing_is_refused() {
        let mut b = TokenBucket::new(1, 1_000);
        for _ in 0..10 {
            assert_eq!(b.take(1, None), Ok(()));
        }
        let mut free = TokenBucket::new(0, 0);
        for t in 0..10 {
            assert_eq!(free.take(1, Some(t)), Ok(()));
        }
        // Near the end of the clock's range nothing overflows.
        let mut b = TokenBucket::new(1, u64::MAX);
        assert_eq!(b.take(1, Some(u64::MAX - 1)), Ok(()));
        assert_eq!(b.take(1, Some(u64::MAX)), Err(u64::MAX));
    }
}

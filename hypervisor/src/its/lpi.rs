//! The physical LPI allocator: a bitmap over the LPIs the property table covers.

use alloc::vec;
use alloc::vec::Vec;

/// Free and used LPIs, by index from [`super::FIRST_LPI`].
#[derive(Debug)]
pub(super) struct Lpis {
    used: Vec<u64>,
    count: u32,
    /// Where the next search starts: next-fit, so that an LPI just freed (whose last interrupt
    /// may still be on its way through the redistributor) is the last one handed out again.
    cursor: u32,
}

impl Lpis {
    pub(super) fn new(count: u32) -> Self {
        Self {
            used: vec![0; count.div_ceil(64) as usize],
            count,
            cursor: 0,
        }
    }

    /// A free index, now used; `None` when all `count` are. At most `count` probes.
    pub(super) fn alloc(&mut self) -> Option<u32> {
        for step in 0..self.count {
            let i = (self.cursor + step) % self.count;
            let (w, b) = ((i / 64) as usize, i % 64);
            if self.used[w] & (1 << b) == 0 {
                self.used[w] |= 1 << b;
                self.cursor = (i + 1) % self.count;
                return Some(i);
            }
        }
        None
    }

    /// Gives index `i` back; false if it was not in use.
    pub(super) fn free(&mut self, i: u32) -> bool {
        if i >= self.count {
            return false;
        }
        let (w, b) = ((i / 64) as usize, i % 64);
        let was = self.used[w] & (1 << b) != 0;
        self.used[w] &= !(1 << b);
        was
    }

    pub(super) fn in_use(&self) -> u32 {
        self.used.iter().map(|w| w.count_ones()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_an_index_twice_and_reuses_freed_ones_last() {
        let mut l = Lpis::new(70);
        let got: Vec<u32> = (0..70).map(|_| l.alloc().unwrap()).collect();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 70);
        assert!(got.iter().all(|&i| i < 70));
        assert_eq!(l.alloc(), None);
        assert!(l.free(5));
        assert!(!l.free(5));
        assert!(!l.free(70));
        assert_eq!(l.alloc(), Some(5));
        assert_eq!(l.in_use(), 70);
        assert!(l.free(1));
        assert!(l.free(2));
        // Next-fit: after 5 the search goes on from 6, wraps, and finds 1 before 2.
        assert_eq!(l.alloc(), Some(1));
        assert_eq!(l.alloc(), Some(2));
    }
}

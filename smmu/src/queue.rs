//! Circular queue index arithmetic shared by the command, event and PRI queues (IHI 0070 ch. 3, circular queues).
//!
//! A queue of 2^LOG2SIZE entries is described by PROD and CONS registers that each hold an index
//! (bits [LOG2SIZE-1:0]) and a wrap bit (bit LOG2SIZE) that toggles every time the index wraps.
//! Equal index and wrap: empty; equal index, different wrap: full. Bit 31 of an output queue's PROD
//! is OVFLG (toggled by the SMMU when it had to drop entries), acknowledged by copying it into
//! CONS.OVACKFLG. Other high bits (CMDQ_CONS.ERR) are not part of the index.

/// Largest LOG2SIZE a queue can have: CMDQS/EVENTQS/PRIQS are 5-bit fields, capped at 19 by the
/// architecture (IHI 0070 6.3).
pub const MAX_LOG2SIZE: u8 = 19;

/// The overflow flag bit (PROD.OVFLG / CONS.OVACKFLG, bit 31).
pub const OVERFLOW_FLAG: u32 = 1 << 31;

/// A queue's PROD and CONS, each kept as index plus wrap bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    log2size: u8,
    prod: u32,
    cons: u32,
}

impl Queue {
    /// An empty queue of 2^`log2size` entries (`log2size` is clamped to [`MAX_LOG2SIZE`]).
    pub fn new(log2size: u8) -> Self {
        Self {
            log2size: log2size.min(MAX_LOG2SIZE),
            prod: 0,
            cons: 0,
        }
    }

    /// LOG2SIZE.
    pub fn log2size(&self) -> u8 {
        self.log2size
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        1 << self.log2size
    }

    fn index_mask(&self) -> u32 {
        self.entries() - 1
    }

    fn wrap_bit(&self) -> u32 {
        self.entries()
    }

    /// Mask of the index and wrap bits.
    fn wrap_index_mask(&self) -> u32 {
        (self.entries() << 1) - 1
    }

    /// PROD (index and wrap).
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// CONS (index and wrap).
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// Sets PROD from a register value; bits above the wrap bit are ignored.
    pub fn set_prod(&mut self, raw: u32) {
        self.prod = raw & self.wrap_index_mask();
    }

    /// Sets CONS from a register value; bits above the wrap bit (ERR, OVACKFLG) are ignored.
    pub fn set_cons(&mut self, raw: u32) {
        self.cons = raw & self.wrap_index_mask();
    }

    /// The entry index of a PROD/CONS value.
    pub fn index(&self, p: u32) -> u32 {
        p & self.index_mask()
    }

    /// The wrap bit of a PROD/CONS value.
    pub fn wrap(&self, p: u32) -> bool {
        p & self.wrap_bit() != 0
    }

    /// The slot PROD points at (where the next entry goes).
    pub fn prod_index(&self) -> u32 {
        self.index(self.prod)
    }

    /// The slot CONS points at (the next entry to consume).
    pub fn cons_index(&self) -> u32 {
        self.index(self.cons)
    }

    /// `p` advanced by one entry, toggling the wrap bit when the index wraps.
    pub fn inc(&self, p: u32) -> u32 {
        (p & self.wrap_index_mask()).wrapping_add(1) & self.wrap_index_mask()
    }

    /// Advances PROD by one.
    pub fn inc_prod(&mut self) {
        self.prod = self.inc(self.prod);
    }

    /// Advances CONS by one.
    pub fn inc_cons(&mut self) {
        self.cons = self.inc(self.cons);
    }

    /// No entries between CONS and PROD.
    pub fn is_empty(&self) -> bool {
        self.prod == self.cons
    }

    /// Every slot holds an entry not yet consumed.
    pub fn is_full(&self) -> bool {
        self.index(self.prod) == self.index(self.cons) && self.prod != self.cons
    }
}

/// OVFLG / OVACKFLG of a raw PROD or CONS register value.
pub fn overflow_flag(raw: u32) -> bool {
    raw & OVERFLOW_FLAG != 0
}

/// True when an output queue overflowed since software last acknowledged: PROD.OVFLG differs
/// from CONS.OVACKFLG (IHI 0070 7.4).
pub fn overflow_pending(prod_raw: u32, cons_raw: u32) -> bool {
    (prod_raw ^ cons_raw) & OVERFLOW_FLAG != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_full_and_wrap() {
        let mut q = Queue::new(2);
        assert_eq!(q.entries(), 4);
        assert!(q.is_empty() && !q.is_full());
        for i in 0..4 {
            assert!(!q.is_full());
            assert_eq!(q.prod(), i);
            q.inc_prod();
        }
        assert!(q.is_full() && !q.is_empty());
        assert_eq!(q.prod(), 0b100, "index 0, wrap 1");
        assert!(q.wrap(q.prod()) && !q.wrap(q.cons()));
        q.inc_cons();
        assert!(!q.is_full());
        q.inc_prod();
        assert!(q.is_full());
        for _ in 0..4 {
            q.inc_cons();
        }
        assert!(q.is_empty());
        assert_eq!(q.cons(), 0b101);
        assert_eq!(q.cons_index(), 1);
        // A full cycle of 2 * entries returns to the start.
        let mut p = 0;
        for _ in 0..8 {
            p = q.inc(p);
        }
        assert_eq!(p, 0);
    }

    #[test]
    fn high_bits_are_not_index() {
        let mut q = Queue::new(3);
        q.set_cons(OVERFLOW_FLAG | 1 << 24 | 0b1_010);
        assert_eq!(q.cons(), 0b1_010);
        q.set_prod(0b1_010);
        assert!(q.is_empty());
        assert!(overflow_pending(OVERFLOW_FLAG, 0));
        assert!(!overflow_pending(OVERFLOW_FLAG | 3, OVERFLOW_FLAG));
        assert!(overflow_flag(OVERFLOW_FLAG));
        assert_eq!(Queue::new(31).log2size(), MAX_LOG2SIZE);
        // log2size 0: a single-entry queue still works.
        let mut one = Queue::new(0);
        one.inc_prod();
        assert!(one.is_full());
        one.inc_cons();
        assert!(one.is_empty());
    }
}

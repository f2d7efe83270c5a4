//! What the guest sees once physical CMD_SYNCs complete: each such change ([`Completion`]:
//! CMDQ_CONS moving on, a CMD_SYNC's MSI, a command error, a GBPA update, CR0ACK), the
//! physical CMD_SYNC that covers it ([`Cover`]), and those in flight, in queue order
//! ([`Inflight`]).

use alloc::vec::Vec;

/// When a [`Completion`] may be made visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cover {
    /// Right away (after the completions before it).
    Now,
    /// Once this physical CMD_SYNC (a sequence number) has completed.
    Seq(u64),
    /// Once the physical CMD_SYNC that will cover it, not queued yet, has completed.
    Pending,
}

/// The completions in flight, in queue order: a vector taken from the front (a trap's
/// completions are usually all made visible by its own `complete`, leaving it empty, so it
/// costs less than a ring that wraps).
#[derive(Debug)]
pub(super) struct Inflight {
    buf: Vec<Completion>,
    /// The first one still in flight.
    head: usize,
}

impl Inflight {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
            head: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    pub(super) fn is_empty(&self) -> bool {
        self.head == self.buf.len()
    }

    pub(super) fn front(&self) -> Option<&Completion> {
        self.buf.get(self.head)
    }

    pub(super) fn back(&self) -> Option<&Completion> {
        self.buf.last().filter(|_| !self.is_empty())
    }

    pub(super) fn push_back(&mut self, c: Completion) {
        if self.head > 0 && self.head >= self.buf.len() / 2 {
            // Keep it compact when some stay in flight for long.
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.push(c);
    }

    pub(super) fn pop_front(&mut self) -> Option<Completion> {
        let c = *self.buf.get(self.head)?;
        self.head += 1;
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        }
        Some(c)
    }

    pub(super) fn clear(&mut self) {
        self.buf.clear();
        self.head = 0;
    }

    /// The first `n`.
    pub(super) fn first(&self, n: usize) -> &[Completion] {
        &self.buf[self.head..self.head + n.min(self.len())]
    }

    /// The last `n`.
    pub(super) fn last_mut(&mut self, n: usize) -> &mut [Completion] {
        let from = self.buf.len() - n.min(self.len());
        &mut self.buf[from..]
    }
}

/// A change of the guest-visible state that waits for the physical SMMU.
#[derive(Debug, Clone, Copy)]
pub(super) struct Completion {
    pub(super) cover: Cover,
    pub(super) what: Effect,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Effect {
    /// The guest's CMDQ_CONS moves to `cons`; for a CMD_SYNC (`sync`), its completion MSI
    /// (address, data) if it asked for one.
    Cons {
        cons: u32,
        sync: bool,
        msi: Option<(u64, u32)>,
    },
    /// Consumption stopped on a refused command: CMDQ_CONS (with ERR) and GERROR.CMDQ_ERR.
    Error { cons: u32 },
    /// A GBPA update completed (UPDATE reads 0 once none is left).
    Gbpa,
    /// CR0ACK takes this value.
    Cr0Ack(u32),
}

//! The atomics, fence, lock and spin hint of the lock-free code ([`crate::driver::Cmdq`]):
//! `core`'s and `spin`'s in every build, loom's under `cfg(loom)`, so that the model tests
//! (`smmu/tests/loom_*.rs`, docs/assurance.md) explore every interleaving of the very code the
//! hypervisor runs. loom models acquire/release and SeqCst *fences* exactly, but treats SeqCst
//! loads and stores as acquire/release: an ordering the proof needs beyond acquire/release is
//! written as a `fence(SeqCst)` so that the model checks it.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

/// Inside a bounded poll: a CPU relax, or under loom a yield, so the model runs the other threads
/// instead of exploring the poll's iterations.
pub(crate) fn spin_loop() {
    #[cfg(not(loom))]
    core::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// A lock held for a few instructions (no waiting inside).
pub(crate) struct Mutex<T> {
    #[cfg(not(loom))]
    inner: spin::Mutex<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            #[cfg(not(loom))]
            inner: spin::Mutex::new(value),
            #[cfg(loom)]
            inner: loom::sync::Mutex::new(value),
        }
    }

    pub(crate) fn lock(&self) -> impl core::ops::DerefMut<Target = T> + '_ {
        #[cfg(not(loom))]
        return self.inner.lock();
        #[cfg(loom)]
        // Poisoned only by a panic in the model, which fails the test anyway.
        return self.inner.lock().unwrap();
    }
}

impl<T> core::fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Mutex")
    }
}

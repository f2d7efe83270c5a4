//! Which 2 MiB blocks of a VM's RAM are zeroed in this boot, as plain logic over atomics: the
//! rule that nothing of a VM — its vCPUs through stage 2, its devices through the SMMU, the
//! hypervisor's own accesses on its behalf — ever sees a byte of its RAM that this boot did not
//! write or zero (docs/design.md, section 3, "Zeroed before first use").
//!
//! A block is [`Stale`](State::Stale) (whatever it held before this boot), `Zeroing` (one CPU
//! claimed it and is zeroing it, with no lock held) or `Zeroed`. Only a claimant writes
//! zeroes; everyone else who needs the block waits for the claim to end (a claim never waits
//! for anything, so the wait is bounded by one block's zeroing). A new boot
//! ([`Scrub::restart`]) closes the table, waits until no claim is in flight, and makes every
//! block stale again; while it is closed nothing can be claimed, so the loader alone decides
//! what is zeroed before the guest's first instruction ([`Scrub::mark_zeroed`]), then
//! [`Scrub::open`]s it.
//!
//! What maps a block (stage 2, `vm::Vm`) checks [`Scrub::is_zeroed`] under the stage-2 lock,
//! and [`Scrub::restart`] runs under that lock too: a block is only ever mapped zeroed in the
//! current boot.

use super::{Ipa, OutOfRam, ZeroTime};
use crate::platform::MemRange;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// The unit of zeroing and of lazy mapping: one stage-2 level-2 block.
pub const BLOCK: u64 = 2 << 20;

const STALE: u8 = 0;
const ZEROING: u8 = 1;
const ZEROED: u8 = 2;

/// Who zeroed a block: the counters of [`ScrubStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    /// The loader, around the images it wrote (only what they do not overwrite).
    Loader,
    /// A vCPU's first access to the block (a stage-2 fault).
    Fault,
    /// The hypervisor's own access to guest RAM (a queue, a table, a ring).
    Access,
    /// A CPU of the VM with nothing else to do: a vCPU in WFI, or one not yet powered on.
    Idle,
    /// The DMA gate: a function's Bus Master Enable, which waits for every block.
    Gate,
}

const BY_KINDS: usize = 5;

impl By {
    const fn index(self) -> usize {
        match self {
            By::Loader => 0,
            By::Fault => 1,
            By::Access => 2,
            By::Idle => 3,
            By::Gate => 4,
        }
    }
}

/// What a boot's zeroing has cost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubStats {
    /// Bytes zeroed, by [`By`] (Loader, Fault, Access, Idle, Gate).
    pub bytes: [u64; BY_KINDS],
    /// Counter ticks spent writing zeroes, all CPUs together.
    pub zero_ticks: u64,
    /// Counter ticks spent cleaning them to the point of coherency.
    pub clean_ticks: u64,
    /// Blocks not zeroed yet.
    pub left: usize,
}

impl ScrubStats {
    /// Bytes zeroed by `by`.
    pub fn by(&self, by: By) -> u64 {
        self.bytes[by.index()]
    }
}

/// The table is closed: a new boot is being loaded (nothing but the loader may zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest RAM is being reloaded")]
pub struct Closed;

/// The zeroing state of one VM's RAM.
#[derive(Debug)]
pub struct Scrub {
    ram: MemRange,
    blocks: Box<[AtomicU8]>,
    open: AtomicBool,
    inflight: AtomicU32,
    left: AtomicUsize,
    /// Where helpers with nothing else to do look for a stale block next.
    cursor: AtomicUsize,
    bytes: [AtomicU64; BY_KINDS],
    zero_ticks: AtomicU64,
    clean_ticks: AtomicU64,
    /// Whether the line saying it is all zeroed was logged this boot.
    reported: AtomicBool,
}

impl Scrub {
    /// The table of `ram`: every block zeroed (`zeroed`, memory known to hold only zeroes) and
    /// open, or stale and closed until a first boot's loader opens it.
    pub fn new(ram: MemRange, zeroed: bool) -> Self {
        let n = ram.size.div_ceil(BLOCK) as usize;
        let state = if zeroed { ZEROED } else { STALE };
        let blocks: Vec<AtomicU8> = (0..n).map(|_| AtomicU8::new(state)).collect();
        Self {
            ram,
            blocks: blocks.into_boxed_slice(),
            open: AtomicBool::new(zeroed),
            inflight: AtomicU32::new(0),
            left: AtomicUsize::new(if zeroed { 0 } else { n }),
            cursor: AtomicUsize::new(0),
            bytes: [const { AtomicU64::new(0) }; BY_KINDS],
            zero_ticks: AtomicU64::new(0),
            clean_ticks: AtomicU64::new(0),
            reported: AtomicBool::new(zeroed),
        }
    }

    /// The RAM it covers.
    pub fn ram(&self) -> MemRange {
        self.ram
    }

    /// Its number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether it covers no RAM.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The block holding `ipa`, if it is in the RAM.
    pub fn block_of(&self, ipa: Ipa) -> Option<usize> {
        let off = ipa.offset_from(Ipa(self.ram.base))?;
        (off < self.ram.size).then_some((off / BLOCK) as usize)
    }

    /// Block `i`'s IPA range (the last one may be short).
    pub fn range(&self, i: usize) -> MemRange {
        let base = self.ram.base + i as u64 * BLOCK;
        MemRange {
            base,
            size: BLOCK.min(self.ram.end() - base),
        }
    }

    /// The blocks `[ipa, ipa + len)` touches, or the error of an access outside the RAM.
    pub fn blocks_of(&self, ipa: Ipa, len: u64) -> Result<core::ops::Range<usize>, OutOfRam> {
        let err = OutOfRam { ipa, len };
        let end = ipa.checked_add(len).ok_or(err)?;
        let first = self.block_of(ipa).ok_or(err)?;
        if end.get() > self.ram.end() {
            return Err(err);
        }
        if len == 0 {
            return Ok(first..first);
        }
        let last = self.block_of(Ipa(end.get() - 1)).ok_or(err)?;
        Ok(first..last + 1)
    }

    /// Whether block `i` is zeroed in this boot.
    pub fn is_zeroed(&self, i: usize) -> bool {
        self.blocks
            .get(i)
            .is_some_and(|b| b.load(Ordering::Acquire) == ZEROED)
    }

    /// Whether every block is zeroed.
    pub fn all_zeroed(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }

    /// A new boot: closes the table, waits for every claim in flight (each ends within one
    /// block's zeroing: a claimant never waits), makes every block stale and the counters
    /// zero. It stays closed until [`Scrub::open`].
    pub fn restart(&self) {
        self.open.store(false, Ordering::SeqCst);
        while self.inflight.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
        for b in self.blocks.iter() {
            b.store(STALE, Ordering::Release);
        }
        self.left.store(self.blocks.len(), Ordering::Release);
        self.cursor.store(0, Ordering::Relaxed);
        for b in &self.bytes {
            b.store(0, Ordering::Relaxed);
        }
        self.zero_ticks.store(0, Ordering::Relaxed);
        self.clean_ticks.store(0, Ordering::Relaxed);
        self.reported.store(false, Ordering::Release);
    }

    /// Lets blocks be claimed again (the loader is done).
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// The loader (the table closed, so nobody else claims) zeroed what of block `i` its images
    /// do not overwrite, `bytes` bytes taking `time`: the block counts as zeroed.
    pub fn mark_zeroed(&self, i: usize, bytes: u64, time: ZeroTime) {
        if let Some(b) = self.blocks.get(i) {
            if b.swap(ZEROED, Ordering::AcqRel) != ZEROED {
                self.left.fetch_sub(1, Ordering::AcqRel);
            }
            self.account(By::Loader, bytes, time);
        }
    }

    fn account(&self, by: By, bytes: u64, time: ZeroTime) {
        self.bytes[by.index()].fetch_add(bytes, Ordering::Relaxed);
        self.zero_ticks.fetch_add(time.zero, Ordering::Relaxed);
        self.clean_ticks.fetch_add(time.clean, Ordering::Relaxed);
    }

    /// Claims block `i` if it is stale: `Ok(true)` claimed (the caller zeroes it and calls
    /// [`Scrub::finish`]), `Ok(false)` not stale.
    fn claim(&self, i: usize) -> Result<bool, Closed> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if !self.open.load(Ordering::SeqCst) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return Err(Closed);
        }
        let won = self.blocks[i]
            .compare_exchange(STALE, ZEROING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !won {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(won)
    }

    /// Ends the claim of block `i`, zeroed by `by` in `time`.
    fn finish(&self, i: usize, by: By, time: ZeroTime) {
        self.account(by, self.range(i).size, time);
        self.blocks[i].store(ZEROED, Ordering::Release);
        self.left.fetch_sub(1, Ordering::AcqRel);
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Makes block `i` zeroed: at once if it is; zeroed here through `zero` (its IPA range) if
    /// it is stale; after the claimant's zeroing if another CPU claimed it. `Ok(true)` if this
    /// call zeroed it. `Err(Closed)` while a new boot is loaded and the block is not zeroed.
    pub fn ensure(
        &self,
        i: usize,
        by: By,
        zero: &mut dyn FnMut(MemRange) -> ZeroTime,
    ) -> Result<bool, Closed> {
        loop {
            match self.blocks[i].load(Ordering::Acquire) {
                ZEROED => return Ok(false),
                ZEROING => core::hint::spin_loop(),
                _ => {
                    if self.claim(i)? {
                        let t = zero(self.range(i));
                        self.finish(i, by, t);
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// [`Scrub::ensure`] of every block `[ipa, ipa + len)` touches; an access outside the RAM
    /// is refused.
    pub fn ensure_range(
        &self,
        ipa: Ipa,
        len: u64,
        by: By,
        zero: &mut dyn FnMut(MemRange) -> ZeroTime,
    ) -> Result<(), OutOfRam> {
        for i in self.blocks_of(ipa, len)? {
            self.ensure(i, by, zero)
                .map_err(|_| OutOfRam { ipa, len })?;
        }
        Ok(())
    }

    /// Zeroes one stale block, if there is one nobody has claimed, for a CPU with nothing else
    /// to do (by `by`). Returns the block zeroed.
    pub fn zero_one(&self, by: By, zero: &mut dyn FnMut(MemRange) -> ZeroTime) -> Option<usize> {
        let n = self.blocks.len();
        if self.all_zeroed() || !self.open.load(Ordering::Acquire) {
            return None;
        }
        let start = self.cursor.load(Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            if self.blocks[i].load(Ordering::Acquire) != STALE {
                continue;
            }
            match self.claim(i) {
                Ok(true) => {
                    self.cursor.store((i + 1) % n, Ordering::Relaxed);
                    let t = zero(self.range(i));
                    self.finish(i, by, t);
                    return Some(i);
                }
                Ok(false) => {}
                Err(Closed) => return None,
            }
        }
        None
    }

    /// What this boot's zeroing cost so far.
    pub fn stats(&self) -> ScrubStats {
        let mut bytes = [0; BY_KINDS];
        for (b, a) in bytes.iter_mut().zip(&self.bytes) {
            *b = a.load(Ordering::Relaxed);
        }
        ScrubStats {
            bytes,
            zero_ticks: self.zero_ticks.load(Ordering::Relaxed),
            clean_ticks: self.clean_ticks.load(Ordering::Relaxed),
            left: self.left.load(Ordering::Acquire),
        }
    }

    /// `true` once per boot, for the first caller after every block is zeroed: it logs that.
    pub fn take_done(&self) -> bool {
        self.all_zeroed() && !self.reported.swap(true, Ordering::AcqRel)
    }
}

/// The ranges of `block` that none of `written` (what the loader writes) covers: what the
/// loader must zero there itself.
pub fn gaps(block: MemRange, written: &[MemRange]) -> Vec<MemRange> {
    let mut cover: Vec<(u64, u64)> = written
        .iter()
        .filter(|w| w.size > 0)
        .map(|w| (w.base.max(block.base), w.end().min(block.end())))
        .filter(|(s, e)| s < e)
        .collect();
    cover.sort_unstable();
    let mut out = Vec::new();
    let mut at = block.base;
    for (s, e) in cover {
        if s > at {
            out.push(MemRange {
                base: at,
                size: s - at,
            });
        }
        at = at.max(e);
    }
    if at < block.end() {
        out.push(MemRange {
            base: at,
            size: block.end() - at,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const RAM: MemRange = MemRange {
        base: 0x4000_0000,
        size: 8 * BLOCK + 0x1000,
    };

    fn zeroes(log: &std::sync::Mutex<Vec<MemRange>>) -> impl FnMut(MemRange) -> ZeroTime + '_ {
        move |r| {
            log.lock().unwrap().push(r);
            ZeroTime {
                zero: 3,
                clean: 1,
                zva_block: Some(64),
            }
        }
    }

    #[test]
    fn blocks_cover_the_ram_and_the_last_may_be_short() {
        let s = Scrub::new(RAM, false);
        assert_eq!(s.len(), 9);
        assert_eq!(s.block_of(Ipa(RAM.base)), Some(0));
        assert_eq!(s.block_of(Ipa(RAM.base + BLOCK)), Some(1));
        assert_eq!(s.block_of(Ipa(RAM.end())), None);
        assert_eq!(s.block_of(Ipa(RAM.base - 1)), None);
        assert_eq!(s.range(8).size, 0x1000);
        assert_eq!(s.blocks_of(Ipa(RAM.base + BLOCK - 1), 2), Ok(0..2));
        assert!(s.blocks_of(Ipa(RAM.end() - 1), 2).is_err());
        assert!(s.blocks_of(Ipa(u64::MAX), 2).is_err());
    }

    #[test]
    fn a_block_is_zeroed_once_by_whoever_needs_it_first() {
        let s = Scrub::new(RAM, false);
        s.open();
        let log = std::sync::Mutex::new(Vec::new());
        assert_eq!(s.ensure(3, By::Fault, &mut zeroes(&log)), Ok(true));
        assert_eq!(s.ensure(3, By::Access, &mut zeroes(&log)), Ok(false));
        assert_eq!(*log.lock().unwrap(), vec![s.range(3)]);
        assert!(s.is_zeroed(3) && !s.is_zeroed(2));
        s.ensure_range(Ipa(RAM.base + BLOCK - 4), 8, By::Access, &mut zeroes(&log))
            .unwrap();
        assert!(s.is_zeroed(0) && s.is_zeroed(1));
        let st = s.stats();
        assert_eq!(st.by(By::Fault), BLOCK);
        assert_eq!(st.by(By::Access), 2 * BLOCK);
        assert_eq!((st.zero_ticks, st.clean_ticks, st.left), (9, 3, 6));
    }

    #[test]
    fn helpers_take_stale_blocks_until_none_is_left_and_it_is_reported_once() {
        let s = Scrub::new(RAM, false);
        s.open();
        let log = std::sync::Mutex::new(Vec::new());
        s.ensure(0, By::Fault, &mut zeroes(&log)).unwrap();
        let mut got = Vec::new();
        while let Some(i) = s.zero_one(By::Idle, &mut zeroes(&log)) {
            got.push(i);
            if !s.all_zeroed() {
                assert!(!s.take_done(), "not before the last block");
            }
        }
        assert_eq!(got, (1..9).collect::<Vec<_>>());
        assert!(s.all_zeroed());
        assert!(s.take_done(), "reported once");
        assert!(!s.take_done());
        assert_eq!(s.stats().by(By::Idle), 7 * BLOCK + 0x1000);
    }

    #[test]
    fn a_new_boot_makes_every_block_stale_and_only_the_loader_zeroes_until_it_opens() {
        let s = Scrub::new(RAM, true);
        assert!(s.all_zeroed());
        s.restart();
        assert!(!s.all_zeroed() && !s.is_zeroed(0));
        let log = std::sync::Mutex::new(Vec::new());
        assert_eq!(s.ensure(0, By::Access, &mut zeroes(&log)), Err(Closed));
        assert_eq!(s.zero_one(By::Idle, &mut zeroes(&log)), None);
        assert!(s
            .ensure_range(Ipa(RAM.base), 4, By::Access, &mut zeroes(&log))
            .is_err());
        s.mark_zeroed(0, 0x1000, ZeroTime::default());
        assert_eq!(
            s.ensure(0, By::Access, &mut zeroes(&log)),
            Ok(false),
            "what the loader zeroed is usable while closed"
        );
        assert!(log.lock().unwrap().is_empty());
        s.open();
        assert_eq!(s.ensure(1, By::Fault, &mut zeroes(&log)), Ok(true));
        assert_eq!(s.stats().by(By::Loader), 0x1000);
        assert_eq!(s.stats().left, 7);
    }

    #[test]
    fn racing_cpus_zero_each_block_exactly_once_and_a_restart_waits_for_claims() {
        let s = Arc::new(Scrub::new(RAM, false));
        s.open();
        let zeroed: Arc<Vec<AtomicU32>> =
            Arc::new((0..s.len()).map(|_| AtomicU32::new(0)).collect());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (s, zeroed) = (s.clone(), zeroed.clone());
                std::thread::spawn(move || {
                    let mut zero = |r: MemRange| {
                        let i = ((r.base - RAM.base) / BLOCK) as usize;
                        zeroed[i].fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        ZeroTime::default()
                    };
                    for k in 0..s.len() {
                        let i = (k * (t + 1)) % s.len();
                        s.ensure(i, By::Fault, &mut zero).unwrap();
                        assert!(s.is_zeroed(i), "usable once ensure returns");
                        s.zero_one(By::Idle, &mut zero);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(zeroed.iter().all(|z| z.load(Ordering::SeqCst) == 1));
        assert!(s.all_zeroed());

        // A restart racing a helper: the helper's claim ends before the blocks go stale, and
        // no claim is made while it is closed.
        s.restart();
        s.open();
        let helper = {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while s.zero_one(By::Idle, &mut |_| ZeroTime::default()).is_some() {
                    n += 1;
                }
                n
            })
        };
        s.restart();
        assert_eq!(s.inflight.load(Ordering::SeqCst), 0);
        assert!(
            (0..s.len()).all(|i| !s.is_zeroed(i)),
            "all stale after the restart"
        );
        helper.join().unwrap();
        assert!(
            (0..s.len()).all(|i| !s.is_zeroed(i)),
            "nothing claimed while closed"
        );
    }

    #[test]
    fn the_loader_zeroes_only_what_its_images_do_not_cover() {
        let b = MemRange {
            base: 0x4000_0000,
            size: BLOCK,
        };
        let w = |base: u64, size: u64| MemRange { base, size };
        assert_eq!(gaps(b, &[]), vec![b]);
        assert_eq!(
            gaps(b, &[w(0x3000_0000, 0x2000_0000)]),
            vec![],
            "covered whole"
        );
        assert_eq!(
            gaps(
                b,
                &[
                    w(0x4010_0000, 0x1000),
                    w(0x3fff_f000, 0x2000),
                    w(0x4010_0800, 0x1000)
                ]
            ),
            vec![w(0x4000_1000, 0xf_f000), w(0x4010_1800, BLOCK - 0x10_1800)]
        );
        assert_eq!(
            gaps(b, &[w(0x4000_0000, 0)]),
            vec![b],
            "an empty image covers nothing"
        );
    }
}

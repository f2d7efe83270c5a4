//! The VM's LPIs (IHI 0069H 5.1): their cached configuration and per-vCPU pending state.
//!
//! The model keeps one configuration byte per LPI for the whole VM (the guest's property table
//! is read only when the vITS glue says it may have changed: INV, MAPTI, INVALL) and one pending
//! bit per LPI and vCPU. The guest's pending tables (PENDBASER) are never read or written: LPIs
//! pending at a VM reset are dropped with the rest of the model, and nothing else needs them.
//! Every array is sized by the configured bound at construction, so nothing grows with what
//! the guest does.

use super::regs::*;
use super::{VGic, LPI_BASE, MAX_LPIS};
use crate::hw::{GuestRam, Ipa};
use alloc::vec;
use alloc::vec::Vec;

/// Property table entry: bit 0 enables the LPI (IHI 0069H 5.1, "LPI Configuration tables").
const LPI_CFG_ENABLE: u8 = 1 << 0;
/// Property table entry: Priority [7:2]; with DS=1 it is used unshifted, the two low bits 0
/// (as QEMU's `cfg & 0xFC`).
const LPI_CFG_PRIORITY: u8 = 0xFC;

/// Cached configuration and pending state of LPIs `LPI_BASE..LPI_BASE + count`.
#[derive(Clone, Debug)]
pub(super) struct LpiStore {
    count: u32,
    /// Property table byte of each LPI as last read (index = INTID - 8192); 0 = disabled.
    config: Vec<u8>,
    /// Enable bit of `config`, as a bitmap, so delivery ANDs words instead of testing bytes.
    enabled: Vec<u64>,
    /// Pending bitmap of each vCPU.
    pending: Vec<Vec<u64>>,
    /// Per vCPU, bit `w` set iff `pending[vcpu][w]` is not zero: an exit that finds no LPI
    /// pending (most do) looks at one word instead of scanning the whole bitmap.
    summary: Vec<Vec<u64>>,
}

impl LpiStore {
    /// `count` LPIs (capped at [`MAX_LPIS`]) for `vcpus` vCPUs, all disabled and idle.
    pub(super) fn new(count: u32, vcpus: usize) -> Self {
        let count = count.min(MAX_LPIS);
        let words = count.div_ceil(64) as usize;
        Self {
            count,
            config: vec![0; count as usize],
            enabled: vec![0; words],
            pending: vec![vec![0; words]; vcpus],
            summary: vec![vec![0; words.div_ceil(64)]; vcpus],
        }
    }

    /// Number of LPIs modelled.
    pub(super) fn count(&self) -> u32 {
        self.count
    }

    /// Index of `intid` in the store, if it is an LPI within the bound.
    fn index(&self, intid: u32) -> Option<usize> {
        intid
            .checked_sub(LPI_BASE)
            .filter(|&i| i < self.count)
            .map(|i| i as usize)
    }

    fn set_config(&mut self, idx: usize, cfg: u8) {
        if let Some(c) = self.config.get_mut(idx) {
            *c = cfg;
        }
        if let Some(w) = self.enabled.get_mut(idx / 64) {
            let m = 1u64 << (idx % 64);
            if cfg & LPI_CFG_ENABLE != 0 {
                *w |= m;
            } else {
                *w &= !m;
            }
        }
    }

    fn config_of(&self, intid: u32) -> Option<u8> {
        self.index(intid).and_then(|i| self.config.get(i).copied())
    }

    pub(super) fn enabled(&self, intid: u32) -> bool {
        self.config_of(intid)
            .is_some_and(|c| c & LPI_CFG_ENABLE != 0)
    }

    pub(super) fn priority(&self, intid: u32) -> u8 {
        self.config_of(intid).map_or(0, |c| c & LPI_CFG_PRIORITY)
    }

    pub(super) fn pending(&self, vcpu: usize, intid: u32) -> bool {
        match (self.index(intid), self.pending.get(vcpu)) {
            (Some(i), Some(p)) => p.get(i / 64).is_some_and(|w| (w >> (i % 64)) & 1 != 0),
            _ => false,
        }
    }

    pub(super) fn set_pending(&mut self, vcpu: usize, intid: u32, value: bool) {
        let Some(i) = self.index(intid) else { return };
        if let Some(w) = self.pending.get_mut(vcpu).and_then(|p| p.get_mut(i / 64)) {
            let m = 1u64 << (i % 64);
            if value {
                *w |= m;
            } else {
                *w &= !m;
            }
            let nonzero = *w != 0;
            self.note_word(vcpu, i / 64, nonzero);
        }
    }

    fn note_word(&mut self, vcpu: usize, w: usize, nonzero: bool) {
        if let Some(s) = self.summary.get_mut(vcpu).and_then(|s| s.get_mut(w / 64)) {
            if nonzero {
                *s |= 1 << (w % 64);
            } else {
                *s &= !(1 << (w % 64));
            }
        }
    }

    /// MOVALL: every LPI pending at `from` becomes pending at `to` instead.
    pub(super) fn move_all(&mut self, from: usize, to: usize) {
        if from == to || from >= self.pending.len() || to >= self.pending.len() {
            return;
        }
        for w in 0..self.enabled.len() {
            let moved = self.pending[from].get_mut(w).map_or(0, core::mem::take);
            if let Some(d) = self.pending[to].get_mut(w) {
                *d |= moved;
            }
        }
        let moved = core::mem::take(&mut self.summary[from]);
        for (d, m) in self.summary[to].iter_mut().zip(&moved) {
            *d |= m;
        }
        self.summary[from] = vec![0; moved.len()];
    }

    /// Recomputes `enabled` from `config` after a bulk change of the latter.
    fn rebuild_enabled(&mut self) {
        self.enabled.fill(0);
        for (i, &cfg) in self.config.iter().enumerate() {
            if cfg & LPI_CFG_ENABLE != 0 {
                if let Some(w) = self.enabled.get_mut(i / 64) {
                    *w |= 1 << (i % 64);
                }
            }
        }
    }

    /// Best (priority, INTID) among `vcpu`'s pending and enabled LPIs not in `exclude`.
    pub(super) fn best(&self, vcpu: usize, exclude: &[crate::hw::IntId]) -> Option<(u8, u32)> {
        let pending = self.pending.get(vcpu)?;
        let mut best: Option<(u8, u32)> = None;
        let summary = self.summary.get(vcpu)?;
        let words = summary.iter().enumerate().flat_map(|(sw, &s)| {
            let mut left = s;
            core::iter::from_fn(move || {
                (left != 0).then(|| {
                    let b = left.trailing_zeros() as usize;
                    left &= left - 1;
                    sw * 64 + b
                })
            })
        });
        for w in words {
            let (Some(&p), Some(&e)) = (pending.get(w), self.enabled.get(w)) else {
                continue;
            };
            let mut bits = p & e;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let idx = w * 64 + b;
                let intid = LPI_BASE + idx as u32;
                if exclude.contains(&crate::hw::IntId(intid)) {
                    continue;
                }
                let prio = self.config.get(idx).copied().unwrap_or(0) & LPI_CFG_PRIORITY;
                let cand = (prio, intid);
                if best.is_none_or(|b| cand < b) {
                    best = Some(cand);
                }
            }
        }
        best
    }
}

/// LPIs a PROPBASER value covers: INTIDs below 2^(IDbits+1), with IDbits capped at what
/// GICD_TYPER advertises (IHI 0069H, GICR_PROPBASER: a larger IDbits behaves as
/// GICD_TYPER.IDbits; one below 13 leaves no LPI in range).
fn lpis_in_table(propbaser: u64) -> u32 {
    let id_bits = ((propbaser & GICR_PROPBASER_IDBITS_MASK) as u32).min(GICD_TYPER_IDBITS_LPIS);
    (1u32 << (id_bits + 1)).saturating_sub(LPI_BASE)
}

impl VGic {
    /// The vCPU's PROPBASER if it has LPIs enabled (GICR_CTLR.EnableLPIs), else `None`: the
    /// property table may be read only then (IHI 0069H 12.11.2).
    fn live_propbaser(&self, vcpu: usize) -> Option<u64> {
        self.redists
            .get(vcpu)
            .filter(|r| r.enable_lpis)
            .map(|r| r.propbaser)
    }

    /// INV or MAPTI for `intid` targeting `vcpu`: re-reads its property table entry (at
    /// `vcpu`'s GICR_PROPBASER.PA + INTID - 8192). A read outside guest RAM or an INTID past
    /// PROPBASER.IDbits leaves it disabled. Nothing happens before that vCPU set EnableLPIs,
    /// or for an INTID past the bound.
    pub fn lpi_config_refresh(&mut self, ram: &dyn GuestRam, vcpu: usize, intid: u32) {
        let Some(propbaser) = self.live_propbaser(vcpu) else {
            return;
        };
        let Some(idx) = self.lpis.index(intid) else {
            return;
        };
        let cfg = if (idx as u32) < lpis_in_table(propbaser) {
            let pa = propbaser & GICR_PROPBASER_PA_MASK;
            let mut byte = [0u8];
            Ipa(pa)
                .checked_add(idx as u64)
                .and_then(|ipa| ram.read(ipa, &mut byte).ok())
                .map_or(0, |()| byte[0])
        } else {
            0
        };
        self.lpis.set_config(idx, cfg);
    }

    /// INVALL for a collection on `vcpu`: re-reads the whole property table at `vcpu`'s
    /// PROPBASER in one read of at most min(bound, 2^(IDbits+1) - 8192) bytes. If that read
    /// fails every LPI is left disabled (the guest pointed PROPBASER outside its RAM). Nothing
    /// happens before that vCPU set EnableLPIs.
    pub fn lpi_config_refresh_all(&mut self, ram: &dyn GuestRam, vcpu: usize) {
        let Some(propbaser) = self.live_propbaser(vcpu) else {
            return;
        };
        let n = (lpis_in_table(propbaser).min(self.lpis.count())) as usize;
        let pa = propbaser & GICR_PROPBASER_PA_MASK;
        // Read straight into the cache: no allocation, and the size is bounded by `count`.
        let store = &mut self.lpis;
        if ram.read(Ipa(pa), &mut store.config[..n]).is_err() {
            store.config[..n].fill(0);
        }
        store.config[n..].fill(0);
        store.rebuild_enabled();
    }

    /// The vITS (INT, or a physical LPI taken for the VM) makes `intid` pending at `vcpu`.
    /// Ignored for INTIDs past the bound and while that vCPU's EnableLPIs is 0 (its
    /// redistributor takes no LPIs then, IHI 0069H 12.11.2).
    pub fn set_lpi_pending(&mut self, vcpu: usize, intid: u32) {
        if self.redists.get(vcpu).is_some_and(|r| r.enable_lpis) {
            self.lpis.set_pending(vcpu, intid, true);
        }
    }

    /// CLEAR or DISCARD: `intid` is no longer pending at `vcpu`.
    pub fn clear_lpi_pending(&mut self, vcpu: usize, intid: u32) {
        self.lpis.set_pending(vcpu, intid, false);
    }

    /// Whether `intid` is pending at `vcpu` (false for INTIDs past the bound).
    pub fn is_lpi_pending(&self, vcpu: usize, intid: u32) -> bool {
        self.lpis.pending(vcpu, intid)
    }

    /// MOVALL: the LPIs pending at vCPU `from` become pending at `to` (ignored if either is not
    /// a vCPU). LPIs already in `from`'s list registers stay there.
    pub fn move_lpis(&mut self, from: usize, to: usize) {
        if from < self.redists.len() && to < self.redists.len() {
            self.lpis.move_all(from, to);
        }
    }

    /// The configuration byte (priority, enable) of LPI `intid` as last read from the guest's
    /// property table (0, disabled, for one never read or past the bound): what GICv4 direct
    /// injection copies into the VM's vLPI property table.
    pub fn lpi_config(&self, intid: u32) -> u8 {
        self.lpis
            .index(intid)
            .and_then(|i| self.lpis.config.get(i).copied())
            .unwrap_or(0)
    }

    /// Number of LPIs the store holds (0 without LPI support).
    pub fn num_lpis(&self) -> u32 {
        self.lpis.count()
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    #[test]
    fn the_pending_summary_follows_every_word_so_best_finds_lpis_anywhere_and_only_those() {
        let mut s = LpiStore::new(MAX_LPIS, 2);
        let far = LPI_BASE + MAX_LPIS - 1; // last word of the last summary word
        let near = LPI_BASE + 70; // word 1
        for (intid, prio) in [(far, 0x20), (near, 0x40)] {
            s.set_config((intid - LPI_BASE) as usize, prio | LPI_CFG_ENABLE);
        }
        assert_eq!(s.best(0, &[]), None);
        s.set_pending(0, near, true);
        s.set_pending(0, far, true);
        assert_eq!(s.best(0, &[]), Some((0x20, far)));
        assert_eq!(s.best(0, &[crate::hw::IntId(far)]), Some((0x40, near)));
        assert_eq!(s.best(1, &[]), None);
        // Clearing one of two bits of a word keeps the word in the summary.
        s.set_pending(0, near + 1, true);
        s.set_pending(0, near, false);
        s.set_pending(0, far, false);
        assert_eq!(s.best(0, &[]), None); // near + 1 is pending but disabled
        s.set_config((near + 1 - LPI_BASE) as usize, 0x10 | LPI_CFG_ENABLE);
        assert_eq!(s.best(0, &[]), Some((0x10, near + 1)));
        s.set_pending(0, far, true);
        s.move_all(0, 1);
        assert_eq!(s.best(0, &[]), None);
        assert_eq!(s.best(1, &[]), Some((0x10, near + 1)));
        s.set_pending(1, near + 1, false);
        assert_eq!(s.best(1, &[]), Some((0x20, far)));
        s.set_pending(1, far, false);
        assert_eq!(s.best(1, &[]), None);
        assert!(s.summary.iter().flatten().all(|&w| w == 0));
    }
}

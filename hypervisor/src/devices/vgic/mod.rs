//! Virtual GICv3 distributor and redistributor register model.
//!
//! This is the source of truth for interrupt *configuration* (enable, priority, group, trigger,
//! routing) and for a "pending latch" of software-injected interrupts. The guest's CPU interface
//! is virtualized by the hardware list registers, which the glue code manages; it pulls work out
//! of this model with [`VGic::pop_deliverable`].
//!
//! The guest sees what KVM's vgic-mmio-v3 exposes: a GICv3 with a single security state
//! (GICD_CTLR.DS=1), affinity routing always on (ARE RAO/WI), no ITS in this model (the vITS is
//! `devices::vits`), and no extended SPI/PPI ranges. Active state is not modelled here (the
//! list registers hold it), so the IS/ICACTIVER registers are RAZ/WI.
//!
//! # LPIs
//!
//! Off unless [`VGicConfig::lpis`] (the VM has a virtual ITS); then GICD_TYPER has LPIS=1,
//! IDbits=15 and num_LPIs matching the bound, GICR_TYPER has PLPIS=1 (VLPIS, DirectLPI and
//! CommonLPIAff 0), GICR_CTLR.EnableLPIs can be set once per vCPU and stays set until reset,
//! and GICR_PROPBASER/PENDBASER read back what was written before EnableLPIs (writes after it
//! are ignored; PENDBASER.PTZ reads 0). What is kept, for INTIDs 8192..8192 +
//! [`VGicConfig::max_lpis`] only (others are ignored everywhere), in arrays sized once at
//! construction:
//! - one configuration byte per LPI for the whole VM (enable bit 0, priority [7:2], used
//!   unshifted as with DS=1), a copy of the guest's property table entry. The table is read
//!   from guest RAM only when the vITS glue says an entry may have changed:
//!   [`VGic::lpi_config_refresh`] (INV, MAPTI: one byte at PROPBASER.PA + INTID - 8192) and
//!   [`VGic::lpi_config_refresh_all`] (INVALL: one read of the table, capped at the bound and
//!   at PROPBASER.IDbits), through the PROPBASER of the vCPU the command targets, and only
//!   once that vCPU has set EnableLPIs. A read outside guest RAM leaves the LPI(s) disabled.
//!   Between refreshes the guest's writes to its table have no effect, as on a GIC that
//!   caches configuration (IHI 0069H 5.1: software must INV after changing an entry);
//! - one pending bit per LPI and vCPU, set by [`VGic::set_lpi_pending`] (ignored while that
//!   vCPU's EnableLPIs is 0), cleared by [`VGic::clear_lpi_pending`], moved by
//!   [`VGic::move_lpis`] (MOVALL), and cleared when [`VGic::pop_deliverable`] hands the LPI
//!   to a list register. An LPI has no active state, so from then on it is the list
//!   register's alone (software entry, HW=0, no EOI maintenance). The guest's pending tables
//!   (PENDBASER) are never read or written.
//!
//! LPIs are Group 1, edge-like, and delivered to their vCPU only while its EnableLPIs and
//! GICD_CTLR.EnableGrp1 are set; they compete with SGIs, PPIs and SPIs by priority (ties go to
//! the lower INTID, so to the non-LPI). A VM reset ([`VGic::reset`] or a new [`VGic`]) clears
//! EnableLPIs, PROPBASER, PENDBASER and the whole store.
//!
//! Accesses follow IHI 0069H 12.1.3: every register takes 32-bit accesses; IPRIORITYR also takes
//! byte accesses; 64-bit registers (GICD_IROUTER, GICR_TYPER, GICR_PROPBASER/PENDBASER) take
//! 64-bit accesses or 32-bit accesses to either half. Anything else (halfwords, misaligned or
//! out-of-frame offsets, unknown vCPUs) is RAZ/WI and never panics.

mod dist;
mod lpi;
pub mod lr;
mod redist;
pub mod regs;

use crate::hw::IntId;
use alloc::vec;
use alloc::vec::Vec;

pub use regs::{GICD_FRAME_SIZE, GICR_FRAME_SIZE};

/// Number of SGIs (INTIDs 0-15).
const NUM_SGIS: u32 = 16;
/// Number of private interrupts (SGIs + PPIs, INTIDs 0-31).
const NUM_PRIVATE: u32 = 32;
/// Largest SPI count: ITLinesNumber=29 gives INTIDs up to 991; a 32nd block would overlap the
/// special INTIDs 1020-1023 (IHI 0069H 2.2.1).
pub const MAX_SPIS: u32 = 960;
/// The first LPI (IHI 0069H 2.2.1).
pub const LPI_BASE: u32 = 8192;
/// LPIs that 16-bit INTIDs (GICD_TYPER.IDbits = 15) leave room for: 8192..65535.
pub const MAX_LPIS: u32 = (1 << 16) - LPI_BASE;
/// Default bound on LPIs per VM: what Linux asks of a 64 KiB property table is far more than
/// a VM's few functions use (one per MSI-X vector), and 8192 keeps the store at 8 KiB of
/// configuration plus 1 KiB of pending bits per vCPU.
pub const DEFAULT_MAX_LPIS: u32 = 8192;

/// Whether `intid` is an LPI (INTID 8192 and up).
pub const fn is_lpi(intid: IntId) -> bool {
    intid.0 >= LPI_BASE
}

/// Static shape of the virtual GIC.
#[derive(Clone, Debug)]
pub struct VGicConfig {
    /// Number of SPIs (INTIDs 32..32+num_spis). Rounded down to a multiple of 32 and capped at
    /// [`MAX_SPIS`].
    pub num_spis: u32,
    /// MPIDR_EL1 affinity of each vCPU, index = vCPU id.
    pub vcpu_mpidr: Vec<u64>,
    /// LPI support (GICD_TYPER.LPIS, GICR_TYPER.PLPIS, EnableLPIs, PROPBASER/PENDBASER): on
    /// when the VM has a virtual ITS. Off, the GIC is exactly the LPI-less one.
    pub lpis: bool,
    /// LPIs modelled when `lpis`: INTIDs 8192..8192+max_lpis (capped at [`MAX_LPIS`]); LPIs
    /// past it are ignored.
    pub max_lpis: u32,
}

impl Default for VGicConfig {
    fn default() -> Self {
        Self {
            num_spis: 0,
            vcpu_mpidr: Vec::new(),
            lpis: false,
            max_lpis: DEFAULT_MAX_LPIS,
        }
    }
}

/// Which per-INTID bit array a register operates on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BitReg {
    /// IGROUPR: 1 = Group 1.
    Group,
    /// IS/ICENABLER.
    Enable,
    /// IS/ICPENDR: the software pending latch.
    Pending,
    /// ICFGR bit[2F+1]: 1 = edge-triggered.
    Edge,
}

/// How a write to a bit-per-INTID register combines with the current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BitWrite {
    /// IGROUPR: plain read/write.
    Replace,
    /// IS*R: write 1 to set.
    Set,
    /// IC*R: write 1 to clear.
    Clear,
}

/// Per-INTID state of a contiguous block of interrupts (the 32 private ones of a vCPU, or all
/// SPIs), stored as 32-bit words in register layout.
#[derive(Clone, Debug)]
struct IrqBank {
    group: Vec<u32>,
    enable: Vec<u32>,
    pending: Vec<u32>,
    edge: Vec<u32>,
    priority: Vec<u8>,
}

impl IrqBank {
    fn new(words: usize) -> Self {
        Self {
            group: vec![0; words],
            enable: vec![0; words],
            pending: vec![0; words],
            edge: vec![0; words],
            priority: vec![0; words * 32],
        }
    }

    fn words(&self, reg: BitReg) -> &[u32] {
        match reg {
            BitReg::Group => &self.group,
            BitReg::Enable => &self.enable,
            BitReg::Pending => &self.pending,
            BitReg::Edge => &self.edge,
        }
    }

    fn words_mut(&mut self, reg: BitReg) -> &mut [u32] {
        match reg {
            BitReg::Group => &mut self.group,
            BitReg::Enable => &mut self.enable,
            BitReg::Pending => &mut self.pending,
            BitReg::Edge => &mut self.edge,
        }
    }

    fn bit(&self, reg: BitReg, idx: usize) -> bool {
        self.words(reg)
            .get(idx / 32)
            .is_some_and(|w| (w >> (idx % 32)) & 1 != 0)
    }

    fn set_bit(&mut self, reg: BitReg, idx: usize, value: bool) {
        if let Some(w) = self.words_mut(reg).get_mut(idx / 32) {
            let m = 1u32 << (idx % 32);
            if value {
                *w |= m;
            } else {
                *w &= !m;
            }
        }
    }

    /// 32-bit read of word `word` of a bit-per-INTID register; RAZ past the end.
    fn read_word(&self, reg: BitReg, word: usize) -> u32 {
        self.words(reg).get(word).copied().unwrap_or(0)
    }

    /// 32-bit write of word `word` of a bit-per-INTID register, only touching `writable` bits;
    /// WI past the end.
    fn write_word(&mut self, reg: BitReg, word: usize, op: BitWrite, value: u32, writable: u32) {
        if let Some(w) = self.words_mut(reg).get_mut(word) {
            let value = value & writable;
            *w = match op {
                BitWrite::Replace => (*w & !writable) | value,
                BitWrite::Set => *w | value,
                BitWrite::Clear => *w & !value,
            };
        }
    }

    /// ICFGR view of 16 INTIDs starting at bank index `first`: bit[2F+1] = edge, bit[2F] RES0.
    fn read_icfgr(&self, first: usize) -> u32 {
        (0..16)
            .filter(|i| self.bit(BitReg::Edge, first + i))
            .fold(0, |acc, i| acc | (2 << (2 * i)))
    }

    /// ICFGR write of 16 INTIDs starting at bank index `first`; only bit[2F+1] is writable
    /// (bit[2F] is RES0 in GICv3, IHI 0069H 12.9.9).
    fn write_icfgr(&mut self, first: usize, value: u32) {
        for i in 0..16 {
            self.set_bit(BitReg::Edge, first + i, (value >> (2 * i + 1)) & 1 != 0);
        }
    }

    /// Interrupts that are pending and enabled in word `w` and whose group is enabled in
    /// GICD_CTLR (`ctlr`).
    fn deliverable_word(&self, w: usize, ctlr: u32) -> u32 {
        let group = self.read_word(BitReg::Group, w);
        let mut group_ok = 0;
        if ctlr & regs::GICD_CTLR_ENABLE_GRP0 != 0 {
            group_ok |= !group;
        }
        if ctlr & regs::GICD_CTLR_ENABLE_GRP1 != 0 {
            group_ok |= group;
        }
        self.read_word(BitReg::Pending, w) & self.read_word(BitReg::Enable, w) & group_ok
    }
}

/// One vCPU's redistributor.
#[derive(Clone, Debug)]
struct Redist {
    mpidr: u64,
    /// INTIDs 0-31.
    irqs: IrqBank,
    /// GICR_WAKER.ProcessorSleep; ChildrenAsleep mirrors it (no real wake-up latency).
    processor_sleep: bool,
    /// GICR_CTLR.EnableLPIs: set once, then RES1 until reset.
    enable_lpis: bool,
    /// GICR_PROPBASER (writable fields only).
    propbaser: u64,
    /// GICR_PENDBASER (writable fields only; PTZ is never kept).
    pendbaser: u64,
}

/// The virtual GICv3 distributor plus one redistributor per vCPU.
#[derive(Debug)]
pub struct VGic {
    num_spis: u32,
    /// GICD_CTLR EnableGrp0/EnableGrp1; ARE and DS are constant 1.
    ctlr: u32,
    redists: Vec<Redist>,
    /// INTIDs 32..32+num_spis, bank index = INTID - 32.
    spis: IrqBank,
    /// GICD_IROUTER of each SPI (writable bits only).
    irouter: Vec<u64>,
    /// Cached routing decision of each SPI, recomputed on IROUTER writes.
    spi_target: Vec<usize>,
    /// VGicConfig::lpis.
    lpi_support: bool,
    /// The LPIs (empty without LPI support).
    lpis: lpi::LpiStore,
    /// The shape it was built with, for [`VGic::reset`].
    cfg: VGicConfig,
}

impl VGic {
    /// Builds the GIC in its reset state: everything disabled, group 0, priority 0, SPIs
    /// level-triggered and routed to affinity 0, every redistributor asleep.
    pub fn new(cfg: VGicConfig) -> Self {
        let nlpis = if cfg.lpis { cfg.max_lpis } else { 0 };
        let num_spis = (cfg.num_spis & !31).min(MAX_SPIS);
        let redists = cfg
            .vcpu_mpidr
            .iter()
            .map(|&mpidr| {
                let mut irqs = IrqBank::new(1);
                // SGIs are always edge-triggered (IHI 0069H 12.11.7, GICR_ICFGR0).
                irqs.edge[0] = (1 << NUM_SGIS) - 1;
                Redist {
                    mpidr,
                    irqs,
                    processor_sleep: true,
                    enable_lpis: false,
                    propbaser: 0,
                    pendbaser: 0,
                }
            })
            .collect();
        let mut gic = Self {
            num_spis,
            ctlr: 0,
            redists,
            spis: IrqBank::new((num_spis / 32) as usize),
            irouter: vec![0; num_spis as usize],
            spi_target: vec![0; num_spis as usize],
            lpi_support: cfg.lpis,
            lpis: lpi::LpiStore::new(nlpis, cfg.vcpu_mpidr.len()),
            cfg,
        };
        for idx in 0..num_spis as usize {
            gic.spi_target[idx] = gic.route(gic.irouter[idx]);
        }
        gic
    }

    /// Back to the reset state of [`VGic::new`] with the same shape (VM reboot): among the
    /// rest, every EnableLPIs, PROPBASER and PENDBASER is 0 and no LPI is configured or pending.
    pub fn reset(&mut self) {
        *self = Self::new(self.cfg.clone());
    }

    /// Number of vCPUs (= redistributors).
    pub fn num_vcpus(&self) -> usize {
        self.redists.len()
    }

    /// Number of SPIs actually modelled (after rounding/capping the configured value).
    pub fn num_spis(&self) -> u32 {
        self.num_spis
    }

    /// The bank holding `intid` as seen by `vcpu`, and its index in that bank.
    fn locate(&self, vcpu: usize, intid: u32) -> Option<(&IrqBank, usize)> {
        if intid < NUM_PRIVATE {
            self.redists.get(vcpu).map(|r| (&r.irqs, intid as usize))
        } else if intid - NUM_PRIVATE < self.num_spis {
            Some((&self.spis, (intid - NUM_PRIVATE) as usize))
        } else {
            None
        }
    }

    fn locate_mut(&mut self, vcpu: usize, intid: u32) -> Option<(&mut IrqBank, usize)> {
        if intid < NUM_PRIVATE {
            self.redists
                .get_mut(vcpu)
                .map(|r| (&mut r.irqs, intid as usize))
        } else if intid - NUM_PRIVATE < self.num_spis {
            Some((&mut self.spis, (intid - NUM_PRIVATE) as usize))
        } else {
            None
        }
    }

    fn bit(&self, vcpu: usize, intid: u32, reg: BitReg) -> bool {
        self.locate(vcpu, intid)
            .is_some_and(|(bank, idx)| bank.bit(reg, idx))
    }

    /// Enabled at its (re)distributor AND its group enabled in GICD_CTLR. An LPI: enabled in
    /// its cached configuration, with EnableLPIs set at `vcpu` and Group 1 enabled (LPIs are
    /// always Group 1, IHI 0069H 5.1).
    pub fn is_enabled(&self, vcpu: usize, intid: IntId) -> bool {
        if is_lpi(intid) {
            return self.lpi_delivery_on(vcpu) && self.lpis.enabled(intid.0);
        }
        let group_enable = if self.group1(vcpu, intid) {
            regs::GICD_CTLR_ENABLE_GRP1
        } else {
            regs::GICD_CTLR_ENABLE_GRP0
        };
        self.enable_bit(vcpu, intid) && self.ctlr & group_enable != 0
    }

    /// Raw enable bit only (ISENABLER, or an LPI's cached enable), regardless of GICD_CTLR;
    /// used to mirror enables of hardware-mapped interrupts.
    pub fn enable_bit(&self, vcpu: usize, intid: IntId) -> bool {
        if is_lpi(intid) {
            return self.lpis.enabled(intid.0);
        }
        self.bit(vcpu, intid.0, BitReg::Enable)
    }

    /// Whether `vcpu` takes LPIs now: its EnableLPIs and GICD_CTLR.EnableGrp1.
    fn lpi_delivery_on(&self, vcpu: usize) -> bool {
        self.ctlr & regs::GICD_CTLR_ENABLE_GRP1 != 0
            && self.redists.get(vcpu).is_some_and(|r| r.enable_lpis)
    }

    /// Priority byte (all 8 bits as written by the guest; an LPI's cached Priority [7:2] with
    /// bits [1:0] 0; 0 for unknown interrupts).
    pub fn priority(&self, vcpu: usize, intid: IntId) -> u8 {
        if is_lpi(intid) {
            return self.lpis.priority(intid.0);
        }
        self.locate(vcpu, intid.0)
            .and_then(|(bank, idx)| bank.priority.get(idx).copied())
            .unwrap_or(0)
    }

    /// IGROUPR bit: true = Group 1 (always for a modelled LPI).
    pub fn group1(&self, vcpu: usize, intid: IntId) -> bool {
        if is_lpi(intid) {
            return self.lpi_modelled(intid);
        }
        self.bit(vcpu, intid.0, BitReg::Group)
    }

    /// Whether `intid` is an LPI within the store's bound.
    fn lpi_modelled(&self, intid: IntId) -> bool {
        intid
            .0
            .checked_sub(LPI_BASE)
            .is_some_and(|i| i < self.lpis.count())
    }

    /// ICFGR: true = edge-triggered (always for SGIs and modelled LPIs), false =
    /// level-sensitive (and for unknown INTIDs).
    pub fn is_edge(&self, vcpu: usize, intid: IntId) -> bool {
        if is_lpi(intid) {
            return self.lpi_modelled(intid);
        }
        self.bit(vcpu, intid.0, BitReg::Edge)
    }

    /// vCPU an SPI is routed to (GICD_IROUTER: match Aff3.Aff2.Aff1.Aff0 against vcpu_mpidr;
    /// IRM=1, no match, or not an SPI -> 0).
    pub fn spi_target(&self, intid: IntId) -> usize {
        intid
            .0
            .checked_sub(NUM_PRIVATE)
            .and_then(|idx| self.spi_target.get(idx as usize))
            .copied()
            .unwrap_or(0)
    }

    /// Routing decision for an IROUTER value.
    fn route(&self, irouter: u64) -> usize {
        if irouter & regs::GICD_IROUTER_IRM != 0 {
            // 1-of-N: any participating PE may take it; we always pick vCPU 0.
            return 0;
        }
        let aff = irouter & regs::AFFINITY_MASK;
        self.redists
            .iter()
            .position(|r| r.mpidr & regs::AFFINITY_MASK == aff)
            .unwrap_or(0)
    }

    /// Latch an interrupt pending (SGI/PPI/LPI: for that vcpu; SPI: vcpu ignored). An LPI
    /// goes through [`VGic::set_lpi_pending`].
    pub fn set_pending(&mut self, vcpu: usize, intid: IntId) {
        if is_lpi(intid) {
            return self.set_lpi_pending(vcpu, intid.0);
        }
        if let Some((bank, idx)) = self.locate_mut(vcpu, intid.0) {
            bank.set_bit(BitReg::Pending, idx, true);
        }
    }

    /// Clear an interrupt's pending latch (SGI/PPI/LPI: for that vcpu; SPI: vcpu ignored).
    pub fn clear_pending(&mut self, vcpu: usize, intid: IntId) {
        if is_lpi(intid) {
            return self.clear_lpi_pending(vcpu, intid.0);
        }
        if let Some((bank, idx)) = self.locate_mut(vcpu, intid.0) {
            bank.set_bit(BitReg::Pending, idx, false);
        }
    }

    /// Whether the pending latch is set (SGI/PPI/LPI: for that vcpu; SPI: vcpu ignored).
    pub fn is_pending(&self, vcpu: usize, intid: IntId) -> bool {
        if is_lpi(intid) {
            return self.is_lpi_pending(vcpu, intid.0);
        }
        self.bit(vcpu, intid.0, BitReg::Pending)
    }

    /// Highest-priority (lowest value; ties -> lowest INTID) latched-pending interrupt that
    /// is_enabled for `vcpu` (SGIs/PPIs of that vcpu, SPIs whose spi_target is vcpu, LPIs
    /// pending at vcpu), whose INTID is not in `exclude`; clears its latch and returns
    /// (intid, priority). An LPI has no active state, so once popped it is the list
    /// register's alone.
    pub fn pop_deliverable(&mut self, vcpu: usize, exclude: &[IntId]) -> Option<(IntId, u8)> {
        let redist = self.redists.get(vcpu)?;
        // Best candidate so far as (priority, intid): tuple order gives the tie-break.
        let mut best: Option<(u8, u32)> = None;
        let mut consider = |bank: &IrqBank, w: usize, base: u32, filter: &dyn Fn(usize) -> bool| {
            let mut bits = bank.deliverable_word(w, self.ctlr);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let idx = w * 32 + b;
                let intid = base + idx as u32;
                if !filter(idx) || exclude.contains(&IntId(intid)) {
                    continue;
                }
                let cand = (bank.priority.get(idx).copied().unwrap_or(0), intid);
                if best.is_none_or(|b| cand < b) {
                    best = Some(cand);
                }
            }
        };
        consider(&redist.irqs, 0, 0, &|_| true);
        for w in 0..self.spis.pending.len() {
            consider(&self.spis, w, NUM_PRIVATE, &|idx| {
                self.spi_target.get(idx) == Some(&vcpu)
            });
        }
        if self.lpi_delivery_on(vcpu) {
            if let Some(cand) = self.lpis.best(vcpu, exclude) {
                if best.is_none_or(|b| cand < b) {
                    best = Some(cand);
                }
            }
        }
        let (prio, intid) = best?;
        let intid = IntId(intid);
        self.clear_pending(vcpu, intid);
        Some((intid, prio))
    }

    /// Decode an ICC_SGI1R_EL1 value written by `sender` (IHI 0069H 12.2.22: TargetList[15:0],
    /// Aff1[23:16], INTID[27:24], Aff2[39:32], IRM[40], RS[47:44], Aff3[55:48]).
    /// Returns (intid, bitmap of target vCPU ids). IRM=1 -> every vCPU except sender.
    /// vCPUs with id >= 64 cannot be represented in the bitmap and are never targeted.
    pub fn sgi_targets(&self, sgi1r: u64, sender: usize) -> (IntId, u64) {
        let intid = IntId(((sgi1r >> 24) & 0xF) as u32);
        let field = |shift: u32| (sgi1r >> shift) & 0xFF;
        let irm = (sgi1r >> 40) & 1 != 0;
        let target_list = sgi1r & 0xFFFF;
        let rs = (sgi1r >> 44) & 0xF;
        // Compare Aff3.Aff2.Aff1 in MPIDR_EL1 layout (Aff3 [39:32], Aff2 [23:16], Aff1 [15:8]).
        let upper = (field(48) << 32) | (field(32) << 16) | (field(16) << 8);
        let mut map = 0u64;
        for (id, r) in self.redists.iter().enumerate().take(64) {
            let hit = if irm {
                id != sender
            } else {
                let aff0 = r.mpidr & 0xFF;
                r.mpidr & regs::AFFINITY_MASK & !0xFF == upper
                    && aff0 >> 4 == rs
                    && (target_list >> (aff0 & 0xF)) & 1 != 0
            };
            if hit {
                map |= 1 << id;
            }
        }
        (intid, map)
    }
}

/// Whether an access of `width` at `offset` is naturally aligned and inside a frame of `size`.
fn in_frame(offset: u64, width: crate::mmio::AccessWidth, size: u64) -> bool {
    let bytes = width.bytes();
    offset.is_multiple_of(bytes) && offset < size && size - offset >= bytes
}

/// Whether `offset` lies in `[base, base + size)`.
fn in_range(offset: u64, base: u64, size: u64) -> bool {
    offset >= base && offset - base < size
}

#[cfg(test)]
mod tests;

//! The register file (IHI 0070 6.3): the state of the registers a guest programs and their
//! reset values, the ID registers it sees, and its register reads and writes, with what a
//! write sets off (CR0 and CR0ACK, GBPA's UPDATE, IRQ_CTRL, GERRORN acknowledging a command
//! error, the queue pointers).

use super::completion::{Cover, Effect};
use super::{reg_index, Vsmmu};
use crate::bits;
use crate::queue::OVERFLOW_FLAG;
use crate::regs::{self, Cr0, Gbpa, Gerror, IrqCtrl};

/// Largest command queue a guest may have (IDR1.CMDQS): Linux needs more than 64 entries.
pub const CMDQS: u8 = 8;
/// Largest event queue a guest may have (IDR1.EVENTQS).
pub const EVENTQS: u8 = 7;
/// CMDQ_CONS.ERR [30:24].
pub(super) const CONS_ERR: u32 = 0x7f00_0000;

/// Writable register state, at its architectural reset values by [`Default`] except GBPA.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RegState {
    pub(super) cr0: u32,
    /// CR0ACK: follows CR0 once what the change started is complete.
    pub(super) cr0ack: u32,
    pub(super) cr1: u32,
    pub(super) cr2: u32,
    pub(super) gbpa: u32,
    pub(super) irq_ctrl: u32,
    pub(super) gerror: u32,
    pub(super) gerrorn: u32,
    pub(super) gerror_irq_cfg0: u64,
    pub(super) gerror_irq_cfg1: u32,
    pub(super) gerror_irq_cfg2: u32,
    pub(super) strtab_base: u64,
    pub(super) strtab_base_cfg: u32,
    pub(super) cmdq_base: u64,
    pub(super) cmdq_prod: u32,
    pub(super) cmdq_cons: u32,
    pub(super) eventq_base: u64,
    pub(super) eventq_prod: u32,
    pub(super) eventq_cons: u32,
    pub(super) eventq_irq_cfg0: u64,
    pub(super) eventq_irq_cfg1: u32,
    pub(super) eventq_irq_cfg2: u32,
}

/// SMMU_GBPA at reset: SHCFG = 0b01 (use incoming), not aborting (IHI 0070 6.3.14): a guest
/// whose driver never ran, or that removed it, has its streams translated by stage 2 only.
pub(super) const GBPA_RESET: u32 = 0x1000;
/// GBPA's writable fields: MemAttr, MTCFG, ALLOCCFG, SHCFG, PRIVCFG, INSTCFG, ABORT.
const GBPA_FIELDS: u32 = 0x001f_3f1f;
/// CR0 enables a stage-1-only SMMU without PRI, ATS or VMW has.
const CR0_FIELDS: u32 = Cr0::SMMUEN.bits() | Cr0::EVTQEN.bits() | Cr0::CMDQEN.bits();
/// CR2 without E2H (RES0 without IDR0.HYP).
const CR2_FIELDS: u32 = 0b110;
/// GERROR bits this SMMU can raise.
const GERROR_FIELDS: u32 = Gerror::CMDQ_ERR.bits()
    | Gerror::EVENTQ_ABT_ERR.bits()
    | Gerror::MSI_CMDQ_ABT_ERR.bits()
    | Gerror::MSI_EVENTQ_ABT_ERR.bits()
    | Gerror::MSI_GERROR_ABT_ERR.bits();
/// IRQ_CTRL without PRIQ_IRQEN.
const IRQ_FIELDS: u32 = IrqCtrl::GERROR_IRQEN.bits() | IrqCtrl::EVENTQ_IRQEN.bits();
/// IRQ_CFG0.ADDR [51:2].
pub(super) const MSI_ADDR: u64 = bits::mask(51, 2);
/// Queue BASE registers: RA/WA [62], ADDR [51:5], LOG2SIZE [4:0].
const Q_BASE_FIELDS: u64 = 1 << 62 | bits::mask(51, 0);
/// STRTAB_BASE: RA [62], ADDR [51:6].
const STRTAB_BASE_FIELDS: u64 = 1 << 62 | bits::mask(51, 6);
/// STRTAB_BASE_CFG: FMT [17:16], SPLIT [10:6], LOG2SIZE [5:0].
const STRTAB_CFG_FIELDS: u32 = 0x3_07ff;

impl Vsmmu {
    pub(super) fn cr0(&self) -> Cr0 {
        Cr0::from_bits_retain(self.r.cr0)
    }

    /// CR0 and CR0ACK together: a queue or table is in use while either says so.
    pub(super) fn cr0_either(&self) -> Cr0 {
        Cr0::from_bits_retain(self.r.cr0 | self.r.cr0ack)
    }

    fn idr0(&self) -> u32 {
        // S1P, TTF = AArch64, COHACC, ASID16, MSI, TTENDIAN = little-endian, STALL_MODEL = no
        // stalls, TERM_MODEL = abort, ST_LEVEL = 2-level (IHI 0070 6.3.1). No S2P, HYP, ATS, PRI,
        // SEV, VMW, BTM, HTTU: a guest must not ask for what the VM cannot own.
        1 << 1 | 2 << 2 | 1 << 4 | 1 << 12 | 1 << 13 | 2 << 21 | 1 << 24 | 1 << 26 | 1 << 27
    }

    fn idr1(&self) -> u32 {
        // SIDSIZE [5:0], SSIDSIZE [10:6] = 0, PRIQS [15:11] = 0, EVENTQS [20:16], CMDQS [25:21].
        u32::from(self.cfg.sid_bits.min(32)) | u32::from(EVENTQS) << 16 | u32::from(CMDQS) << 21
    }

    fn idr3(&self) -> u32 {
        u32::from(self.cfg.phys_ril) << 10
    }

    fn idr5(&self) -> u32 {
        let oas = regs::bits_to_oas(self.cfg.oas_bits).unwrap_or(2);
        // Granules [6:4] as the physical SMMU has them; VAX [11:10] = 0 (no 52-bit VA: QEMU
        // refuses T0SZ < 16); STALL_MAX = 0.
        (self.cfg.phys_idr5 & 0x70) | u32::from(oas)
    }

    /// A guest read of register `off` (from the vSMMU base; `size` 4 or 8 bytes).
    pub fn read(&mut self, off: u64, size: u8) -> u64 {
        self.stats.reads[reg_index(off)] += 1;
        if off >= regs::MMIO_SIZE {
            return 0;
        }
        if size == 8 {
            if !off.is_multiple_of(8) {
                return 0;
            }
            return u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32;
        }
        u64::from(self.read32(off & !3))
    }

    fn read32(&self, off: u64) -> u32 {
        let r = &self.r;
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match off {
            regs::SMMU_IDR0 => self.idr0(),
            regs::SMMU_IDR1 => self.idr1(),
            regs::SMMU_IDR3 => self.idr3(),
            regs::SMMU_IDR5 => self.idr5(),
            // SMMUv3.2: RIL is a v3.2 feature.
            regs::SMMU_AIDR => 2,
            regs::SMMU_CR0 => r.cr0,
            regs::SMMU_CR0ACK => r.cr0ack,
            regs::SMMU_CR1 => r.cr1,
            regs::SMMU_CR2 => r.cr2,
            // UPDATE reads 1 while an update the guest asked for is not complete.
            regs::SMMU_GBPA => {
                r.gbpa
                    | if self.gbpa_updates > 0 {
                        Gbpa::UPDATE.bits()
                    } else {
                        0
                    }
            }
            regs::SMMU_IRQ_CTRL | regs::SMMU_IRQ_CTRLACK => r.irq_ctrl,
            regs::SMMU_GERROR => r.gerror,
            regs::SMMU_GERRORN => r.gerrorn,
            regs::SMMU_GERROR_IRQ_CFG0 => lo(r.gerror_irq_cfg0),
            0x6c => hi(r.gerror_irq_cfg0),
            regs::SMMU_GERROR_IRQ_CFG1 => r.gerror_irq_cfg1,
            regs::SMMU_GERROR_IRQ_CFG2 => r.gerror_irq_cfg2,
            regs::SMMU_STRTAB_BASE => lo(r.strtab_base),
            0x84 => hi(r.strtab_base),
            regs::SMMU_STRTAB_BASE_CFG => r.strtab_base_cfg,
            regs::SMMU_CMDQ_BASE => lo(r.cmdq_base),
            0x94 => hi(r.cmdq_base),
            regs::SMMU_CMDQ_PROD => r.cmdq_prod,
            regs::SMMU_CMDQ_CONS => r.cmdq_cons,
            regs::SMMU_EVENTQ_BASE => lo(r.eventq_base),
            0xa4 => hi(r.eventq_base),
            regs::SMMU_EVENTQ_IRQ_CFG0 => lo(r.eventq_irq_cfg0),
            0xb4 => hi(r.eventq_irq_cfg0),
            regs::SMMU_EVENTQ_IRQ_CFG1 => r.eventq_irq_cfg1,
            regs::SMMU_EVENTQ_IRQ_CFG2 => r.eventq_irq_cfg2,
            regs::SMMU_EVENTQ_PROD => r.eventq_prod,
            regs::SMMU_EVENTQ_CONS => r.eventq_cons,
            // IDR2/IDR4/IIDR, STATUSR, AGBPA, the PRI queue, reserved space: RAZ.
            _ => 0,
        }
    }

    /// The register side of a write: what it changes, and what it sets off (completions,
    /// streams to reshadow, commands to consume up to `target`) for [`Vsmmu::advance`].
    pub(super) fn write_regs(&mut self, off: u64, size: u8, value: u64, target: &mut Option<u64>) {
        self.stats.writes[reg_index(off)] += 1;
        if off >= regs::MMIO_SIZE {
            return;
        }
        if size == 8 {
            if !off.is_multiple_of(8) {
                return;
            }
            // A 64-bit access to a 64-bit register is one update; to a pair of 32-bit
            // registers it is two, low address first.
            if let Some(r) = self.reg64(off) {
                *r = value;
                self.mask_reg64(off);
                return;
            }
            self.write32(off, value as u32, target);
            self.write32(off + 4, (value >> 32) as u32, target);
            return;
        }
        let off = off & !3;
        let base = off & !7;
        if let Some(r) = self.reg64(base) {
            let shift = (off - base) * 8;
            *r = (*r & !(0xffff_ffff << shift)) | u64::from(value as u32) << shift;
            self.mask_reg64(base);
            return;
        }
        self.write32(off, value as u32, target);
    }

    /// The 64-bit register at `off`, if it is one and writable now (queue and table bases are
    /// read-only while their enable is set in CR0 or CR0ACK; IRQ_CFG registers while their
    /// interrupt is enabled; IHI 0070 6.3).
    fn reg64(&mut self, off: u64) -> Option<&mut u64> {
        let cr0 = self.cr0_either();
        let irq = IrqCtrl::from_bits_retain(self.r.irq_ctrl);
        let r = &mut self.r;
        match off {
            regs::SMMU_STRTAB_BASE if !cr0.contains(Cr0::SMMUEN) => Some(&mut r.strtab_base),
            regs::SMMU_CMDQ_BASE if !cr0.contains(Cr0::CMDQEN) => Some(&mut r.cmdq_base),
            regs::SMMU_EVENTQ_BASE if !cr0.contains(Cr0::EVTQEN) => Some(&mut r.eventq_base),
            regs::SMMU_GERROR_IRQ_CFG0 if !irq.contains(IrqCtrl::GERROR_IRQEN) => {
                Some(&mut r.gerror_irq_cfg0)
            }
            regs::SMMU_EVENTQ_IRQ_CFG0 if !irq.contains(IrqCtrl::EVENTQ_IRQEN) => {
                Some(&mut r.eventq_irq_cfg0)
            }
            _ => None,
        }
    }

    /// Clears the RES0 bits of a 64-bit register just written.
    fn mask_reg64(&mut self, off: u64) {
        let r = &mut self.r;
        match off {
            regs::SMMU_STRTAB_BASE => r.strtab_base &= STRTAB_BASE_FIELDS,
            regs::SMMU_CMDQ_BASE => r.cmdq_base &= Q_BASE_FIELDS,
            regs::SMMU_EVENTQ_BASE => r.eventq_base &= Q_BASE_FIELDS,
            regs::SMMU_GERROR_IRQ_CFG0 => r.gerror_irq_cfg0 &= MSI_ADDR,
            regs::SMMU_EVENTQ_IRQ_CFG0 => r.eventq_irq_cfg0 &= MSI_ADDR,
            _ => {}
        }
    }

    fn write32(&mut self, off: u64, v: u32, target: &mut Option<u64>) {
        let cr0 = self.cr0_either();
        let irq = IrqCtrl::from_bits_retain(self.r.irq_ctrl);
        match off {
            regs::SMMU_CR0 => self.write_cr0(v & CR0_FIELDS, target),
            // Table and queue attributes: fixed while anything that uses them is enabled.
            regs::SMMU_CR1 if cr0.bits() & CR0_FIELDS == 0 => self.r.cr1 = v & 0xfff,
            regs::SMMU_CR2 if !cr0.contains(Cr0::SMMUEN) => self.r.cr2 = v & CR2_FIELDS,
            // Only a write with UPDATE set takes effect (IHI 0070 6.3.14).
            regs::SMMU_GBPA if v & Gbpa::UPDATE.bits() != 0 => self.write_gbpa(v & GBPA_FIELDS),
            regs::SMMU_IRQ_CTRL => self.r.irq_ctrl = v & IRQ_FIELDS,
            regs::SMMU_GERRORN => {
                self.r.gerrorn = v & GERROR_FIELDS;
                // Acknowledging CMDQ_ERR restarts the queue at CONS (IHI 0070 7.1).
                if !self.cmdq_error_active() && self.r.cmdq_cons & CONS_ERR != 0 {
                    self.r.cmdq_cons &= !CONS_ERR;
                    self.stopped = false;
                    self.request_consumption(target);
                }
            }
            regs::SMMU_GERROR_IRQ_CFG1 if !irq.contains(IrqCtrl::GERROR_IRQEN) => {
                self.r.gerror_irq_cfg1 = v;
            }
            regs::SMMU_GERROR_IRQ_CFG2 if !irq.contains(IrqCtrl::GERROR_IRQEN) => {
                self.r.gerror_irq_cfg2 = v & 0x3f;
            }
            regs::SMMU_EVENTQ_IRQ_CFG1 if !irq.contains(IrqCtrl::EVENTQ_IRQEN) => {
                self.r.eventq_irq_cfg1 = v;
            }
            regs::SMMU_EVENTQ_IRQ_CFG2 if !irq.contains(IrqCtrl::EVENTQ_IRQEN) => {
                self.r.eventq_irq_cfg2 = v & 0x3f;
            }
            regs::SMMU_STRTAB_BASE_CFG if !cr0.contains(Cr0::SMMUEN) => {
                self.r.strtab_base_cfg = v & STRTAB_CFG_FIELDS;
            }
            regs::SMMU_CMDQ_PROD => {
                self.r.cmdq_prod = v & 0x000f_ffff;
                self.request_consumption(target);
            }
            regs::SMMU_CMDQ_CONS if !cr0.contains(Cr0::CMDQEN) => {
                self.r.cmdq_cons = v & 0x000f_ffff;
                self.fetched = self.r.cmdq_cons;
                self.stopped = false;
            }
            regs::SMMU_EVENTQ_PROD if !cr0.contains(Cr0::EVTQEN) => {
                self.r.eventq_prod = v & (OVERFLOW_FLAG | 0x000f_ffff);
            }
            regs::SMMU_EVENTQ_CONS => {
                self.r.eventq_cons = v & (OVERFLOW_FLAG | 0x000f_ffff);
            }
            // Read-only, RES0 or guarded: ignored, as the spec lets hardware do.
            _ => {}
        }
    }

    /// CR0 (IHI 0070 6.3.9): SMMUEN puts the guest's stream table (or GBPA) in force, CMDQEN
    /// starts or stops consumption. CR0ACK follows once what the change set off is complete:
    /// the physical STEs it changed in force, and, when CMDQEN goes off, every command
    /// consumed so far complete ("the queue reads as stopped").
    fn write_cr0(&mut self, v: u32, target: &mut Option<u64>) {
        let old = self.cr0();
        self.r.cr0 = v;
        let new = self.cr0();
        if old.contains(Cr0::SMMUEN) != new.contains(Cr0::SMMUEN) {
            self.invalidate(None, false, false);
            // Invalidations consumed after it follow its STE changes.
            self.barrier = true;
        }
        if new.contains(Cr0::CMDQEN) && !old.contains(Cr0::CMDQEN) {
            self.request_consumption(target);
        }
        self.completion(Cover::Pending, Effect::Cr0Ack(v));
    }

    /// GBPA with UPDATE (IHI 0070 6.3.14). While SMMUEN is off a change of ABORT changes every
    /// stream's physical STE; that STE work is budgeted, and UPDATE reads 1 until it is done
    /// (software must poll it). A write while an update is still in progress takes its value
    /// last, and the update completes once, for that value. A change with no physical effect
    /// completes at once.
    fn write_gbpa(&mut self, v: u32) {
        let old = self.r.gbpa;
        self.r.gbpa = v;
        let abort = Gbpa::ABORT.bits();
        if self.cr0_either().contains(Cr0::SMMUEN) || (old ^ v) & abort == 0 {
            return;
        }
        self.invalidate(None, false, false);
        self.barrier = true;
        self.gbpa_updates += 1;
        self.completion(Cover::Pending, Effect::Gbpa);
    }
}

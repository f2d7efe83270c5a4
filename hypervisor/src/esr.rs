//! ESR_EL2 decoding (Arm ARM D24.2.40, "ESR_EL2, Exception Syndrome Register (EL2)").

use crate::mmio::AccessWidth;

/// ESR_EL2.EC values the hypervisor handles by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionClass {
    /// 0x00: unknown reason (e.g. an UNDEFINED instruction trapped to EL2).
    Unknown,
    /// 0x01: WFI or WFE trapped by HCR_EL2.TWI/TWE.
    WfiWfe,
    /// 0x07: FP/SIMD access trapped by CPTR_EL2.
    FpSimd,
    /// 0x16: HVC from AArch64.
    Hvc64,
    /// 0x17: SMC from AArch64 trapped by HCR_EL2.TSC.
    Smc64,
    /// 0x18: MSR, MRS or system instruction trapped.
    SysReg,
    /// 0x19: SVE access trapped by CPTR_EL2.TZ.
    Sve,
    /// 0x1d: SME access trapped by CPTR_EL2.TSM.
    Sme,
    /// 0x20: instruction abort from a lower EL (stage-2 fault on fetch).
    InstAbortLower,
    /// 0x24: data abort from a lower EL (stage-2 fault: emulated MMIO or a bad access).
    DataAbortLower,
    /// 0x25: data abort taken at EL2 itself.
    DataAbortCurrent,
    /// Anything else, with the raw EC.
    Other(u8),
}

impl ExceptionClass {
    /// Decodes ESR_EL2.EC (bits [31:26]).
    pub fn from_esr(esr: u64) -> Self {
        match ((esr >> 26) & 0x3f) as u8 {
            0x00 => Self::Unknown,
            0x01 => Self::WfiWfe,
            0x07 => Self::FpSimd,
            0x16 => Self::Hvc64,
            0x17 => Self::Smc64,
            0x18 => Self::SysReg,
            0x19 => Self::Sve,
            0x1d => Self::Sme,
            0x20 => Self::InstAbortLower,
            0x24 => Self::DataAbortLower,
            0x25 => Self::DataAbortCurrent,
            ec => Self::Other(ec),
        }
    }
}

/// ESR_EL2.IL: whether the trapped instruction was 32-bit (all AArch64 instructions are).
pub fn instruction_length(esr: u64) -> u64 {
    if esr & (1 << 25) != 0 {
        4
    } else {
        2
    }
}

/// The ISS of a data abort (Arm ARM D24.2.40.9, "ISS encoding for an exception from a Data Abort").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAbort {
    /// ISV: the fields below SAS..AR are valid. Without it the access cannot be emulated.
    pub isv: bool,
    /// Access width (SAS).
    pub width: AccessWidth,
    /// SSE: a load sign-extends its result.
    pub sign_extend: bool,
    /// SRT: the transfer register (31 means XZR/WZR).
    pub srt: usize,
    /// SF: the register is 64-bit.
    pub sf: bool,
    /// WnR: a write.
    pub write: bool,
    /// S1PTW: the fault happened on a stage-1 table walk.
    pub s1ptw: bool,
    /// DFSC: the fault status code.
    pub dfsc: u8,
}

impl DataAbort {
    /// Decodes the ISS field of ESR_EL2.
    pub fn from_esr(esr: u64) -> Self {
        Self {
            isv: esr & (1 << 24) != 0,
            width: AccessWidth::from_sas((esr >> 22) & 3),
            sign_extend: esr & (1 << 21) != 0,
            srt: ((esr >> 16) & 0x1f) as usize,
            sf: esr & (1 << 15) != 0,
            write: esr & (1 << 6) != 0,
            s1ptw: esr & (1 << 7) != 0,
            dfsc: (esr & 0x3f) as u8,
        }
    }

    /// Whether the abort is a stage-2 translation, access flag or permission fault (DFSC
    /// 0b0001LL, 0b0010LL, 0b0011LL, or 0b101011 at level -1): an access to an IPA the VM's
    /// stage 2 does not map the way the access needs, which the hypervisor may emulate. Anything
    /// else (an external abort routed here by HCR_EL2.TEA, a parity error, an alignment or TLB
    /// conflict fault) is the guest's own to take.
    pub fn is_stage2_fault(&self) -> bool {
        is_stage2_fault_code(self.dfsc)
    }

    /// Turns the raw bytes a load returned into the register value, applying SSE and SF.
    pub fn load_value(&self, raw: u64) -> u64 {
        let raw = raw & self.width.mask();
        let v = if self.sign_extend && self.width != AccessWidth::Double {
            let shift = 64 - self.width.bytes() * 8;
            (((raw << shift) as i64) >> shift) as u64
        } else {
            raw
        };
        if self.sf {
            v
        } else {
            v & 0xffff_ffff
        }
    }
}

/// Whether a DFSC/IFSC is a translation, access flag or permission fault (see
/// [`DataAbort::is_stage2_fault`]).
pub const fn is_stage2_fault_code(fsc: u8) -> bool {
    matches!(fsc, 0x04..=0x0f | 0x2b)
}

/// Whether a DFSC/IFSC is a translation fault, at any level (0b0001LL, and level -1 with
/// FEAT_LPA2: 0b101011): what an access to a RAM block not mapped yet in stage 2 raises.
pub const fn is_translation_fault_code(fsc: u8) -> bool {
    matches!(fsc, 0x04..=0x07 | 0x2b)
}

/// A trapped MSR/MRS (Arm ARM D24.2.40.8, "ISS encoding for an exception from MSR, MRS, or
/// System instruction execution in AArch64 state").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysRegAccess {
    /// The register, as its (op0, op1, CRn, CRm, op2) encoding.
    pub reg: SysRegId,
    /// Rt: the general-purpose register (31 means XZR).
    pub rt: usize,
    /// Direction: true for MRS (a read).
    pub read: bool,
}

/// A system register encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysRegId {
    /// op0.
    pub op0: u8,
    /// op1.
    pub op1: u8,
    /// CRn.
    pub crn: u8,
    /// CRm.
    pub crm: u8,
    /// op2.
    pub op2: u8,
}

impl SysRegId {
    /// Builds an encoding from its five fields, as written in the Arm ARM (`S3_0_C12_C11_5`).
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Self {
        Self {
            op0,
            op1,
            crn,
            crm,
            op2,
        }
    }

    /// ICC_SGI1R_EL1: generates a Group 1 SGI.
    pub const ICC_SGI1R_EL1: Self = Self::new(3, 0, 12, 11, 5);
    /// ICC_ASGI1R_EL1: generates a Group 1 SGI for the other security state.
    pub const ICC_ASGI1R_EL1: Self = Self::new(3, 0, 12, 11, 6);
    /// ICC_SGI0R_EL1: generates a Group 0 SGI.
    pub const ICC_SGI0R_EL1: Self = Self::new(3, 0, 12, 11, 7);

    /// ACTLR_EL1, trapped by HCR_EL2.TACR.
    pub const ACTLR_EL1: Self = Self::new(3, 0, 1, 0, 1);

    /// The RAS error record registers (ERRIDR_EL1, ERRSELR_EL1, ERX*_EL1: op0 3, op1 0, CRn 5,
    /// CRm 3-5), trapped by HCR_EL2.TERR.
    pub fn is_ras_error_record(&self) -> bool {
        self.op0 == 3 && self.op1 == 0 && self.crn == 5 && (3..=5).contains(&self.crm)
    }

    /// Debug registers (op0 = 2) and the OS lock, trapped by MDCR_EL2.TDA/TDOSA.
    pub fn is_debug(&self) -> bool {
        self.op0 == 2 || (self.op0 == 3 && self.op1 == 3 && self.crn == 4 && self.crm == 5)
    }

    /// PMU registers (CRn = 9 or the PMEVCNTR/PMEVTYPER block at CRn = 14), trapped by
    /// MDCR_EL2.TPM.
    pub fn is_pmu(&self) -> bool {
        self.op0 == 3 && (self.crn == 9 || (self.crn == 14 && self.op1 == 3 && self.crm >= 8))
    }

    /// The EL1 physical timer (CNTP_*_EL0), trapped by CNTHCTL_EL2.EL1PCEN = 0.
    pub fn is_phys_timer(&self) -> bool {
        self.op0 == 3 && self.op1 == 3 && self.crn == 14 && self.crm == 2
    }
}

impl SysRegAccess {
    /// Decodes the ISS field of ESR_EL2.
    pub fn from_esr(esr: u64) -> Self {
        Self {
            reg: SysRegId {
                op0: ((esr >> 20) & 3) as u8,
                op2: ((esr >> 17) & 7) as u8,
                op1: ((esr >> 14) & 7) as u8,
                crn: ((esr >> 10) & 0xf) as u8,
                crm: ((esr >> 1) & 0xf) as u8,
            },
            rt: ((esr >> 5) & 0x1f) as usize,
            read: esr & 1 != 0,
        }
    }
}

/// Fault IPA of a stage-2 abort: HPFAR_EL2.FIPA gives bits [51:12], FAR_EL2 the page offset.
pub fn fault_ipa(hpfar: u64, far: u64) -> crate::hw::Ipa {
    crate::hw::Ipa(((hpfar >> 4) & 0xff_ffff_ffff) << 12 | (far & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage2_faults_and_external_aborts() {
        // A 32-bit store, translation fault level 3 (0x07): emulate.
        assert!(DataAbort::from_esr(0x9300_0047).is_stage2_fault());
        // Permission fault level 3, access flag level 1, level -1 translation.
        for fsc in [0x0f, 0x09, 0x2b] {
            assert!(is_stage2_fault_code(fsc), "{fsc:#x}");
        }
        // Synchronous external abort (0x10), on a walk (0x15), parity (0x18), alignment (0x21),
        // TLB conflict (0x30): the guest's.
        for fsc in [0x10, 0x15, 0x18, 0x21, 0x30] {
            assert!(!is_stage2_fault_code(fsc), "{fsc:#x}");
        }
    }

    #[test]
    fn decodes_a_32bit_store_from_w1() {
        // str w1, [x0] faulting at stage 2: EC=0x24, IL, ISV, SAS=2, SRT=1, WnR, DFSC=translation L3.
        let esr = (0x24 << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (1 << 16) | (1 << 6) | 0x07;
        assert_eq!(
            ExceptionClass::from_esr(esr),
            ExceptionClass::DataAbortLower
        );
        let d = DataAbort::from_esr(esr);
        assert!(d.isv && d.write && !d.sf && !d.sign_extend && !d.s1ptw);
        assert_eq!(d.width, AccessWidth::Word);
        assert_eq!(d.srt, 1);
        assert_eq!(d.dfsc, 7);
        assert_eq!(instruction_length(esr), 4);
    }

    #[test]
    fn load_value_sign_extends_and_truncates() {
        // ldrsb x3: SAS=0, SSE, SF.
        let esr = (0x24 << 26) | (1 << 24) | (1 << 21) | (3 << 16) | (1 << 15);
        let d = DataAbort::from_esr(esr);
        assert_eq!(d.load_value(0x80), 0xffff_ffff_ffff_ff80);
        // ldrsh w3: SSE without SF keeps 32 bits.
        let esr = (0x24 << 26) | (1 << 24) | (1 << 22) | (1 << 21) | (3 << 16);
        let d = DataAbort::from_esr(esr);
        assert_eq!(d.load_value(0x8001), 0xffff_8001);
        // ldr w3 of a wide raw value keeps the access width only.
        let esr = (0x24 << 26) | (1 << 24) | (2 << 22) | (3 << 16);
        assert_eq!(
            DataAbort::from_esr(esr).load_value(0x1_2345_6789),
            0x2345_6789
        );
    }

    #[test]
    fn no_isv_is_reported() {
        let esr = (0x24 << 26) | (1 << 25) | 0x07;
        assert!(!DataAbort::from_esr(esr).isv);
    }

    #[test]
    fn decodes_msr_icc_sgi1r() {
        // msr ICC_SGI1R_EL1, x2: op0=3 op2=5 op1=0 CRn=12 Rt=2 CRm=11, write.
        let esr =
            (0x18u64 << 26) | (1 << 25) | (3 << 20) | (5 << 17) | (12 << 10) | (2 << 5) | (11 << 1);
        assert_eq!(ExceptionClass::from_esr(esr), ExceptionClass::SysReg);
        let a = SysRegAccess::from_esr(esr);
        assert_eq!(a.reg, SysRegId::ICC_SGI1R_EL1);
        assert_eq!(a.rt, 2);
        assert!(!a.read);
    }

    #[test]
    fn classifies_trapped_register_groups() {
        assert!(SysRegId::new(2, 0, 0, 2, 2).is_debug()); // MDSCR_EL1
        assert!(SysRegId::new(3, 3, 9, 12, 0).is_pmu()); // PMCR_EL0
        assert!(SysRegId::new(3, 3, 14, 2, 1).is_phys_timer()); // CNTP_CTL_EL0
        assert!(!SysRegId::new(3, 3, 14, 3, 1).is_phys_timer()); // CNTV_CTL_EL0
        assert!(!SysRegId::ICC_SGI1R_EL1.is_pmu());
    }

    #[test]
    fn other_classes() {
        assert_eq!(ExceptionClass::from_esr(0x16 << 26), ExceptionClass::Hvc64);
        assert_eq!(ExceptionClass::from_esr(0x17 << 26), ExceptionClass::Smc64);
        assert_eq!(ExceptionClass::from_esr(0x01 << 26), ExceptionClass::WfiWfe);
        assert_eq!(
            ExceptionClass::from_esr(0x3c << 26),
            ExceptionClass::Other(0x3c)
        );
    }

    #[test]
    fn fault_ipa_combines_hpfar_and_far() {
        assert_eq!(
            fault_ipa(0x09000 << 4, 0xffff_0000_0900_0018).get(),
            0x0900_0018
        );
        assert_eq!(fault_ipa(0x80a0 << 4, 0x1234).get(), 0x080a_0234);
    }
}

//! The ID registers a guest sees (HCR_EL2.TID3 traps its reads of ID group 3: op0 = 3, op1 = 0,
//! CRn = 0, CRm = 1-7; Arm ARM D19.2): the physical values with every feature hidden that the
//! hypervisor does not give a guest. A feature is hidden when its state is trapped or not
//! switched (SVE, SME, AMU, MPAM, the PMU, SPE, trace, BRBE, MTE), when it is an EL2 feature
//! (the guest has no EL2: EL2, VH, NV, FWB, FGT, HCX, TWED, VMID size, EVT, S2PIE/S2POE), or
//! when it needs an EL2 enable the hypervisor does not set (HCRX_EL2 beyond MSCEn and TCR2En:
//! LS64, SCTLR2, GCS, NMI, D128, FPMR; the fine-grained-trap registers are cleared, whose
//! "n"-polarity bits then trap the registers of S1PIE, S1POE, AIE, THE and SME). PARange says
//! no more than the VM's 39-bit IPA space needs (40 bits). Encodings the table does not know
//! read as zero, so a feature of a newer architecture is hidden until someone looks at it.
//!
//! Field positions are from the Arm ARM's register descriptions (D23.2, "AArch64 identification
//! registers"); each hidden field is an unsigned field whose 0 means "not implemented".

use crate::esr::SysRegId;

/// One 4-bit ID field: its lowest bit.
type Field = u8;

/// What the guest sees of one ID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    /// The physical value.
    Physical,
    /// Zero: nothing of it.
    Zero,
    /// The physical value with these fields zeroed.
    Hide(&'static [Field]),
    /// Only these fields of the physical value.
    Only(&'static [Field]),
}

/// The guest's view of each ID register, by (CRm, op2).
fn view(crm: u8, op2: u8) -> View {
    match (crm, op2) {
        // AArch32 ID registers (AArch32 EL0 state is the guest's own): as they are, but
        // ID_DFR0_EL1.PerfMon [27:24] (the PMU is trapped) and ID_DFR1_EL1 (MTPMU, HPMN0).
        (1, 2) => View::Hide(&[24]),
        (3, 5) => View::Zero,
        (1, _) | (2, _) | (3, 0..=2) | (3, 4) | (3, 6) => View::Physical,
        // ID_AA64PFR0_EL1: EL2 [11:8], SVE [35:32], MPAM [43:40], AMU [47:44], RME [55:52].
        (4, 0) => View::Hide(&[8, 32, 40, 44, 52]),
        // ID_AA64PFR1_EL1: MTE [11:8], MPAM_frac [19:16], SME [27:24], RNDR_trap [31:28],
        // NMI [39:36], MTE_frac [43:40], GCS [47:44], THE [51:48], MTEX [55:52], PFAR [63:60].
        (4, 1) => View::Hide(&[8, 16, 24, 28, 36, 40, 44, 48, 52, 60]),
        // ID_AA64PFR2_EL1 (MTE store-only, FPMR, ...), ZFR0 (SVE), SMFR0 (SME), FPFR0 (FP8).
        (4, 2) | (4, 4) | (4, 5) | (4, 7) => View::Zero,
        // ID_AA64DFR0_EL1: only DebugVer [3:0], BRPs [15:12], WRPs [23:20], CTX_CMPs [31:28]
        // and DoubleLock [39:36] (0 there means implemented); debug registers are trapped and
        // read as zero. PMUVer, PMSVer (SPE), TraceVer, TraceFilt, TraceBuffer, BRBE, MTPMU...
        // are hidden.
        (5, 0) => View::Only(&[0, 12, 20, 28, 36]),
        // ID_AA64DFR1_EL1, DFR2, AFR0, AFR1.
        (5, 1) | (5, 2) | (5, 4) | (5, 5) => View::Zero,
        // ID_AA64ISAR0_EL1: TME [27:24].
        (6, 0) => View::Hide(&[24]),
        // ID_AA64ISAR1_EL1: LS64 [63:60] (HCRX_EL2.EnALS/EnAS0 are not set).
        (6, 1) => View::Hide(&[60]),
        // ID_AA64ISAR2_EL1: SYSREG_128 [35:32], SYSINSTR_128 [39:36] (FEAT_D128). MOPS stays:
        // the hypervisor sets HCRX_EL2.MSCEn when the CPU has it.
        (6, 2) => View::Hide(&[32, 36]),
        // ID_AA64ISAR3_EL1.
        (6, 3) => View::Zero,
        // ID_AA64MMFR0_EL1: FGT [59:56] (PARange [3:0] and ECV [63:60] are capped below).
        (7, 0) => View::Hide(&[56]),
        // ID_AA64MMFR1_EL1: VMIDBits [7:4], VH [11:8], LO [19:16] (trapped by HCR_EL2.TLOR),
        // TWED [35:32], HCX [43:40].
        (7, 1) => View::Hide(&[4, 8, 16, 32, 40]),
        // ID_AA64MMFR2_EL1: NV [27:24], FWB [43:40], EVT [59:56].
        (7, 2) => View::Hide(&[24, 40, 56]),
        // ID_AA64MMFR3_EL1: only TCRX [3:0] (HCRX_EL2.TCR2En is set when the CPU has it).
        (7, 3) => View::Only(&[0]),
        // ID_AA64MMFR4_EL1.
        (7, 4) => View::Zero,
        _ => View::Zero,
    }
}

/// ID_AA64MMFR0_EL1.PARange for 40 bits: the smallest encoding that covers the VM's 39-bit IPA
/// space (addresses above it fault at stage 2).
const PARANGE_40_BITS: u64 = 2;

const fn nibble(field: Field) -> u64 {
    0xf << field
}

/// Whether `r` is an ID group 3 register (what HCR_EL2.TID3 traps).
pub fn is_id_reg(r: SysRegId) -> bool {
    r.op0 == 3 && r.op1 == 0 && r.crn == 0 && (1..=7).contains(&r.crm)
}

/// What the guest reads for ID register (CRm, op2) whose physical value is `phys`.
pub fn guest_value(crm: u8, op2: u8, phys: u64) -> u64 {
    let mut v = match view(crm, op2) {
        View::Physical => phys,
        View::Zero => 0,
        View::Hide(fields) => fields.iter().fold(phys, |v, &f| v & !nibble(f)),
        View::Only(fields) => phys & fields.iter().fold(0, |m, &f| m | nibble(f)),
    };
    if (crm, op2) == (7, 0) {
        let parange = (v & 0xf).min(PARANGE_40_BITS);
        // ECV [63:60]: 1 (the self-synchronised counter views) is an EL0/EL1 feature; 2 adds
        // CNTPOFF_EL2, the hypervisor's.
        let ecv = ((v >> 60) & 0xf).min(1);
        v = (v & !0xf & !nibble(60)) | parange | ecv << 60;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Register values built field by field as the Arm ARM lays them out.
    #[test]
    fn state_the_hypervisor_does_not_switch_is_hidden() {
        // ID_AA64PFR0_EL1 with EL0-EL3 AArch64, FP, AdvSIMD, GICv3, RAS, SVE, EL2, AMU, MPAM.
        let pfr0 = 0x1201_1011_1111_2222u64;
        let g = guest_value(4, 0, pfr0);
        assert_eq!((g >> 32) & 0xf, 0, "SVE");
        assert_eq!((g >> 44) & 0xf, 0, "AMU");
        assert_eq!((g >> 40) & 0xf, 0, "MPAM");
        assert_eq!((g >> 8) & 0xf, 0, "EL2");
        assert_eq!(g & 0xf, 2, "EL0 stays");
        assert_eq!((g >> 24) & 0xf, 1, "the GIC CPU interface stays");
        assert_eq!(
            (g >> 28) & 0xf,
            1,
            "RAS stays (its error records are trapped)"
        );
        // PFR1: MTE and SME and GCS gone, BT and SSBS stay.
        let pfr1 = 0x0000_1000_0100_0221u64 | 0x2 << 8 | 0x1 << 24;
        let g = guest_value(4, 1, pfr1);
        assert_eq!((g >> 8) & 0xf, 0, "MTE");
        assert_eq!((g >> 24) & 0xf, 0, "SME");
        assert_eq!((g >> 44) & 0xf, 0, "GCS");
        assert_eq!(g & 0xff, 0x21, "BT and SSBS stay");
        // SVE's and SME's own ID registers read as zero.
        assert_eq!(guest_value(4, 4, u64::MAX), 0);
        assert_eq!(guest_value(4, 5, u64::MAX), 0);
    }

    #[test]
    fn debug_and_pmu_features() {
        // DebugVer 9 (v8.4), PMUVer 8.4, 6 BRPs, 4 WRPs, 2 CTX_CMPs, PMSVer 3, TraceBuffer 1.
        let dfr0 = 0x0000_1003_1000_5519u64 | 0x1 << 44;
        let g = guest_value(5, 0, dfr0);
        assert_eq!(g & 0xf, 9);
        assert_eq!((g >> 8) & 0xf, 0, "PMUVer");
        assert_eq!((g >> 32) & 0xf, 0, "PMSVer (SPE)");
        assert_eq!((g >> 44) & 0xf, 0, "TraceBuffer");
        assert_eq!((g >> 12) & 0xf, 5, "BRPs");
        assert_eq!((g >> 28) & 0xf, 1, "CTX_CMPs");
    }

    #[test]
    fn memory_model_features() {
        // PARange 48 bits (5), ASIDBits 16, FGT 1, ECV 2.
        let mmfr0 = 0x2100_0000_0000_0025u64;
        let g = guest_value(7, 0, mmfr0);
        assert_eq!(g & 0xf, PARANGE_40_BITS);
        assert_eq!((g >> 4) & 0xf, 2, "ASIDBits stay");
        assert_eq!((g >> 56) & 0xf, 0, "FGT");
        assert_eq!((g >> 60) & 0xf, 1, "ECV without CNTPOFF");
        // A 36-bit part keeps its smaller PARange.
        assert_eq!(guest_value(7, 0, 1) & 0xf, 1);
        // MMFR1: VH, HCX, LO gone; PAN stays.
        let mmfr1 = 0x0000_0110_0013_0122u64;
        let g = guest_value(7, 1, mmfr1);
        assert_eq!((g >> 8) & 0xf, 0, "VH");
        assert_eq!((g >> 40) & 0xf, 0, "HCX");
        assert_eq!((g >> 16) & 0xf, 0, "LO");
        assert_eq!((g >> 20) & 0xf, 1, "PAN stays");
        // MMFR2: NV gone. MMFR3: only TCRX.
        assert_eq!((guest_value(7, 2, 0x0100_0000) >> 24) & 0xf, 0);
        assert_eq!(guest_value(7, 3, 0x1111_1111), 0x1);
    }

    #[test]
    fn unknown_encodings_read_zero_and_aarch32_ids_stay() {
        assert_eq!(guest_value(4, 3, 0x1234), 0);
        assert_eq!(guest_value(7, 7, 0x1234), 0);
        assert_eq!(guest_value(2, 1, 0x1234), 0x1234);
        // ID_DFR0_EL1.PerfMon hidden.
        assert_eq!(guest_value(1, 2, 0x0f00_0006), 0x0000_0006);
        let id = |crm| SysRegId::new(3, 0, 0, crm, 0);
        assert!(is_id_reg(id(1)) && is_id_reg(id(7)));
        assert!(!is_id_reg(id(0)), "MIDR/MPIDR are not group 3");
        assert!(!is_id_reg(SysRegId::new(3, 1, 0, 0, 0)), "CCSIDR_EL1");
    }
}

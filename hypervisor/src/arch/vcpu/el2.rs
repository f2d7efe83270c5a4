//! The EL2 controls a vCPU runs under (HCR_EL2, MDCR_EL2, CPTR_EL2, CNTHCTL_EL2, VTCR_EL2,
//! the FEAT_FGT and FEAT_HCX trap registers) and the EL1 and virtual CPU interface state a
//! booting kernel expects.

use super::lrs_here;
use crate::arch::hw::Machine;
use crate::arch::sysreg;
use crate::vm::lr::ICH_HCR_EN;
use crate::vm::Vm;
use aarch64_cpu::registers::{
    Readable, Writeable, CNTHCTL_EL2, CNTVOFF_EL2, CNTV_CTL_EL0, CPTR_EL2, HCR_EL2, HDFGRTR_EL2,
    HDFGWTR_EL2, HFGITR_EL2, HFGRTR_EL2, HFGWTR_EL2, ICH_AP0R0_EL2, ICH_AP1R0_EL2, ICH_VMCR_EL2,
    ID_AA64MMFR0_EL1, ID_AA64MMFR1_EL1, ID_AA64PFR0_EL1, MDCR_EL2, MIDR_EL1, SCTLR_EL1, VMPIDR_EL2,
    VTCR_EL2, VTTBR_EL2,
};
use tock_registers::fields::FieldValue;

/// HCR_EL2 for a guest (Arm ARM D24.2.48), as KVM sets it for an untrusted one: stage-2 on (VM),
/// set/way invalidation upgraded (SWIO), stage-1 walks into stage-2 Device memory fault (PTW),
/// physical IRQ/FIQ/SError to EL2 (IMO/FMO/AMO), broadcast TLB/cache maintenance (FB),
/// inner-shareable barriers (BSU), trap WFI (TWI), ID group 3 reads (TID3, answered by
/// [`crate::idregs`]), implementation-defined registers (TIDCP), SMC (TSC), ACTLR_EL1 (TACR),
/// set/way ops (TSW) and LORegions (TLOR); EL1 is AArch64 (RW); pointer authentication not
/// trapped (APK/API). With FEAT_RAS also TERR (RAS error record registers, read as zero: no
/// records) and TEA (synchronous external aborts to EL2, handed back to the guest as the abort
/// it would have taken); both are RES0 without it.
fn hcr_guest(ras: bool) -> FieldValue<u64, HCR_EL2::Register> {
    let base = HCR_EL2::VM::Enable
        + HCR_EL2::SWIO::SET
        + HCR_EL2::PTW::SET
        + HCR_EL2::FMO::EnableVirtualFIQ
        + HCR_EL2::IMO::EnableVirtualIRQ
        + HCR_EL2::AMO::SET
        + HCR_EL2::FB::SET
        + HCR_EL2::BSU::InnerShareable
        + HCR_EL2::TWI::SET
        + HCR_EL2::TID3::SET
        + HCR_EL2::TSC::EnableTrapEl1SmcToEl2
        + HCR_EL2::TIDCP::SET
        + HCR_EL2::TACR::SET
        + HCR_EL2::TSW::SET
        + HCR_EL2::RW::EL1IsAarch64
        + HCR_EL2::TLOR::SET
        + HCR_EL2::APK::DisableTrapPointerAuthKeyRegsToEl2
        + HCR_EL2::API::DisableTrapPointerAuthInstToEl2;
    if ras {
        base + HCR_EL2::TERR::SET + HCR_EL2::TEA::EnableTrapSyncExtAbortsToEl2
    } else {
        base
    }
}

/// CPTR_EL2 (non-VHE, Arm ARM D24.2.35): RES1 bits (0-7, 9, 12-13), FP/SIMD not trapped
/// (TFP, bit 10, clear), SVE (TZ, bit 8) and SME (TSM, bit 12) trapped. The guest's V registers,
/// FPCR and FPSR are never saved or switched: they stay in the CPU across traps, since its vCPU
/// is the only one this physical CPU ever runs and no EL2 code touches them (the softfloat target,
/// checked by qemu/check-no-fp.sh). That guarantee has to be static: in non-VHE TFP also traps
/// EL2's own FP/SIMD use, so EL2 cannot be trapped while the guest is not. A fresh entry zeroes
/// them (`boot::enter`), but not the wider SVE Z and P registers or SME's ZA, hence those stay
/// trapped. aarch64-cpu names only TAM in this register, hence the raw value.
const CPTR_GUEST: u64 = 0x33ff;

/// SCTLR_EL1 for a vCPU at power-on: MMU and caches off, RES1 bits only (Arm ARM D24.2.158;
/// aarch64-cpu does not name the RES1 bits 11, 20, 22, 23, 28 and 29).
const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

/// Programs the EL2 controls for running `vm` on this CPU.
pub(super) fn configure_el2(vm: &Vm, vcpu: usize) {
    let pmcr_n = {
        let v: u64;
        // SAFETY: reading PMCR_EL0 at EL2 has no side effect.
        unsafe { core::arch::asm!("mrs {}, pmcr_el0", out(reg) v) };
        (v >> 11) & 0x1f
    };
    // MDCR_EL2: HPMN = all counters, trap PMU (TPM, TPMCR) and debug (TDA, TDOSA, TDRA)
    // accesses, which read as zero for the guest; no counting at EL2 (HPMD).
    MDCR_EL2.write(
        MDCR_EL2::HPMN.val(pmcr_n)
            + MDCR_EL2::TPMCR::SET
            + MDCR_EL2::TPM::SET
            + MDCR_EL2::TDA::SET
            + MDCR_EL2::TDOSA::SET
            + MDCR_EL2::TDRA::SET
            + MDCR_EL2::HPMD::SET,
    );
    let pfr0 = sysreg::id_reg(4, 0);
    let amu = ID_AA64PFR0_EL1.read(ID_AA64PFR0_EL1::AMU) != 0;
    // ID_AA64PFR0_EL1.RAS (bits 31:28), which aarch64-cpu does not name.
    let ras = (pfr0 >> 28) & 0xf != 0;
    // CPTR_EL2.TAM: activity monitor accesses trapped (with FEAT_AMUv1; RES0 without).
    CPTR_EL2.set(CPTR_GUEST | if amu { CPTR_EL2::TAM::SET.value } else { 0 });
    // The counter readable (EL1PCTEN), the EL1 physical timer trapped (EL1PCEN clear): the
    // guest uses the virtual timer, the physical one is the host's.
    CNTHCTL_EL2.write(CNTHCTL_EL2::EL1PCTEN::SET + CNTHCTL_EL2::EL1PCEN::CLEAR);
    CNTVOFF_EL2.set(0);
    let pa_range = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange);
    // ID_AA64MMFR1_EL1.VMIDBits (bits 7:4, 0b0010 = 16 bits), not named by aarch64-cpu.
    let vmid16 = (ID_AA64MMFR1_EL1.get() >> 4) & 0xf == 2;
    VTCR_EL2.set(crate::stage2::Stage2::vtcr(pa_range, vmid16));
    VTTBR_EL2.set(vm.vttbr);
    let midr = MIDR_EL1.get();
    // SAFETY: VPIDR_EL2 only sets what the guest reads as MIDR_EL1.
    unsafe { core::arch::asm!("msr vpidr_el2, {}", in(reg) midr) };
    VMPIDR_EL2.set((1 << 31) | vm.vcpus[vcpu].mpidr);
    HCR_EL2.write(hcr_guest(ras));
    // FEAT_FGT (ID_AA64MMFR0_EL1.FGT, bits 59:56): the fine-grained trap registers reset to
    // UNKNOWN values. Cleared, nothing is trapped but the registers of features the guest's ID
    // registers hide ("n" bits).
    if (ID_AA64MMFR0_EL1.get() >> 56) & 0xf != 0 {
        HFGRTR_EL2.set(0);
        HFGWTR_EL2.set(0);
        HFGITR_EL2.set(0);
        HDFGRTR_EL2.set(0);
        HDFGWTR_EL2.set(0);
    }
    // FEAT_HCX (ID_AA64MMFR1_EL1.HCX): HCRX_EL2 resets to an UNKNOWN value and gates
    // features the guest's ID registers advertise; enable those (as KVM does), no traps.
    if (ID_AA64MMFR1_EL1.get() >> 40) & 0xf != 0 {
        let mops = (sysreg::id_aa64isar2() >> 16) & 0xf != 0;
        let tcr2 = sysreg::id_aa64mmfr3() & 0xf != 0;
        // MSCEn (bit 11): CPY*/SET* allowed at EL1/EL0; TCR2En (bit 14): TCR2_EL1 usable.
        let hcrx = if mops { 1 << 11 } else { 0 } | if tcr2 { 1 << 14 } else { 0 };
        sysreg::set_hcrx_el2(hcrx);
    }
    sysreg::isb();
    sysreg::tlbi_vmalls12e1is();
}

/// Resets the EL1 state a booting kernel relies on and the virtual CPU interface.
pub(super) fn reset_el1_and_vgic_cpu() {
    SCTLR_EL1.set(SCTLR_EL1_RESET);
    CNTV_CTL_EL0.set(0);
    let lrs = lrs_here();
    lrs.clear_all(&Machine);
    ICH_AP0R0_EL2.set(0);
    ICH_AP1R0_EL2.set(0);
    ICH_VMCR_EL2.set(0);
    lrs.set_hcr(&Machine, ICH_HCR_EN);
    sysreg::isb();
}

//! Running a vCPU on its pinned physical CPU: EL2 controls for a protected guest, entry, trap
//! dispatch (ESR_EL2 by name), exception injection, and the run loop. What a trap means for the
//! VM is decided in `crate::vm` (PSCI, lifecycle, the MMIO bus, list registers) and by the
//! devices in `crate::devices`; this file decodes the trap and carries the decision out.

use super::gic::{Gic, SPURIOUS};
use super::hw::Machine;
use super::{hv, iommu, sysreg, this_cpu, uart};
use crate::esr::{
    fault_ipa, instruction_length, DataAbort, ExceptionClass, SysRegAccess, SysRegId,
};
use crate::hw::IntId;
use crate::idregs;
use crate::mmio::AccessWidth;
use crate::vm::bus::{self, Target};
use crate::vm::irq::{self, VmIrqs, KICK_SGI, VTIMER_PPI};
use crate::vm::lifecycle::{all_stopped_for_good, Power, RESET_WAIT_MS};
use crate::vm::lr::{self, HwPending, Lrs, ICH_HCR_EN};
use crate::vm::psci::{Call, Outcome};
use crate::vm::Vm;
use aarch64_cpu::registers::{
    Readable, Writeable, CNTHCTL_EL2, CNTVOFF_EL2, CNTV_CTL_EL0, CPTR_EL2, ELR_EL1, ESR_EL1,
    ESR_EL2, FAR_EL1, FAR_EL2, HCR_EL2, HPFAR_EL2, MDCR_EL2, MIDR_EL1, SCTLR_EL1, SPSR_EL1,
    VBAR_EL1, VMPIDR_EL2, VTCR_EL2, VTTBR_EL2,
};
use boot::{ExceptionKind, TrapFrame};
use core::sync::atomic::Ordering;

/// HCR_EL2 for a guest (Arm ARM D24.2.48), as KVM sets it for an untrusted one: stage-2 on (VM),
/// set/way invalidation upgraded (SWIO), stage-1 walks into stage-2 Device memory fault (PTW),
/// physical IRQ/FIQ/SError to EL2 (IMO/FMO/AMO), broadcast TLB/cache maintenance (FB),
/// inner-shareable barriers (BSU=1), trap WFI (TWI), ID group 3 reads (TID3, answered by
/// [`crate::idregs`]), implementation-defined registers (TIDCP), SMC (TSC), ACTLR_EL1 (TACR),
/// set/way ops (TSW) and LORegions (TLOR); EL1 is AArch64 (RW); pointer authentication not
/// trapped (APK/API). With FEAT_RAS also [`HCR_RAS`].
const HCR_GUEST: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 9)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 19)
    | (1 << 20)
    | (1 << 21)
    | (1 << 22)
    | (1 << 31)
    | (1 << 35)
    | (1 << 40)
    | (1 << 41);
/// HCR_EL2.TERR (36, RAS error record registers, read as zero: no records) and TEA (37,
/// synchronous external aborts to EL2, handed back to the guest as the abort it would have
/// taken): RES0 without FEAT_RAS.
const HCR_RAS: u64 = (1 << 36) | (1 << 37);
/// CPTR_EL2 (non-VHE): RES1 bits, FP/SIMD not trapped (TFP=0), SVE (TZ) and SME (TSM) trapped:
/// the hypervisor saves only the V registers, so a guest may not use the wider Z registers.
const CPTR_GUEST: u64 = 0x33ff;
/// CPTR_EL2.TAM: activity monitor accesses trapped (with FEAT_AMUv1; RES0 without).
const CPTR_TAM: u64 = 1 << 30;
/// SCTLR_EL1 for a vCPU at power-on: MMU and caches off, RES1 bits only.
const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

/// Per-physical-CPU facts needed on every trap.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    /// VM index.
    pub vm: usize,
    /// vCPU index in that VM.
    pub vcpu: usize,
}

fn vm_and_vcpu() -> Option<(&'static Vm, usize)> {
    let b = hv().cpus[this_cpu()].binding?;
    Some((&hv().vms[b.vm], b.vcpu))
}

/// Programs the EL2 controls for running `vm` on this CPU.
fn configure_el2(vm: &Vm, vcpu: usize) {
    let pmcr_n = {
        let v: u64;
        // SAFETY: reading PMCR_EL0 at EL2 has no side effect.
        unsafe { core::arch::asm!("mrs {}, pmcr_el0", out(reg) v) };
        (v >> 11) & 0x1f
    };
    // MDCR_EL2: HPMN = all counters, trap PMU (TPM, TPMCR) and debug (TDA, TDOSA, TDRA)
    // accesses, which read as zero for the guest; no counting at EL2 (HPMD).
    MDCR_EL2.set(pmcr_n | (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 17));
    let pfr0 = sysreg::id_reg(4, 0);
    let amu = (pfr0 >> 44) & 0xf != 0;
    let ras = (pfr0 >> 28) & 0xf != 0;
    CPTR_EL2.set(CPTR_GUEST | if amu { CPTR_TAM } else { 0 });
    // CNTHCTL_EL2: counter readable (EL1PCTEN), EL1 physical timer trapped (EL1PCEN=0):
    // the guest uses the virtual timer, the physical one is the host's.
    CNTHCTL_EL2.set(1);
    CNTVOFF_EL2.set(0);
    let pa_range = aarch64_cpu::registers::ID_AA64MMFR0_EL1.get() & 0xf;
    let vmid16 = (aarch64_cpu::registers::ID_AA64MMFR1_EL1.get() >> 4) & 0xf == 2;
    VTCR_EL2.set(crate::stage2::Stage2::vtcr(pa_range, vmid16));
    VTTBR_EL2.set(vm.vttbr);
    let midr = MIDR_EL1.get();
    // SAFETY: VPIDR_EL2 only sets what the guest reads as MIDR_EL1.
    unsafe { core::arch::asm!("msr vpidr_el2, {}", in(reg) midr) };
    VMPIDR_EL2.set((1 << 31) | vm.vcpus[vcpu].mpidr);
    HCR_EL2.set(HCR_GUEST | if ras { HCR_RAS } else { 0 });
    // FEAT_FGT: the fine-grained trap registers reset to UNKNOWN values. Cleared, nothing is
    // trapped but the registers of features the guest's ID registers hide ("n" bits).
    if (aarch64_cpu::registers::ID_AA64MMFR0_EL1.get() >> 56) & 0xf != 0 {
        sysreg::set_hfgrtr_el2(0);
        sysreg::set_hfgwtr_el2(0);
        sysreg::set_hfgitr_el2(0);
        sysreg::set_hdfgrtr_el2(0);
        sysreg::set_hdfgwtr_el2(0);
    }
    // FEAT_HCX (ID_AA64MMFR1_EL1.HCX): HCRX_EL2 resets to an UNKNOWN value and gates
    // features the guest's ID registers advertise; enable those (as KVM does), no traps.
    if (aarch64_cpu::registers::ID_AA64MMFR1_EL1.get() >> 40) & 0xf != 0 {
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
fn reset_el1_and_vgic_cpu() {
    SCTLR_EL1.set(SCTLR_EL1_RESET);
    CNTV_CTL_EL0.set(0);
    let lrs = lrs_here();
    lrs.clear_all(&Machine);
    sysreg::set_ich_ap0r0(0);
    sysreg::set_ich_ap1r0(0);
    sysreg::set_ich_vmcr(0);
    lrs.set_hcr(&Machine, ICH_HCR_EN);
    sysreg::isb();
}

/// Each physical CPU's list registers as last written (`vm::lr`), only touched by that CPU.
static LRS: [Lrs; boot::MAX_CPUS] = [const { Lrs::new() }; boot::MAX_CPUS];

fn lrs_here() -> &'static Lrs {
    &LRS[this_cpu()]
}

/// Waits until this CPU's vCPU is powered on, then enters it. Never returns.
pub fn run_bound_vcpu() -> ! {
    let cpu = this_cpu();
    let Some((vm, vcpu)) = vm_and_vcpu() else {
        idle_forever();
    };
    loop {
        if vm.life.runs() {
            let power = &vm.vcpus[vcpu].power;
            if power.get() == Power::Boot {
                boot_vm(vm);
                continue;
            }
            // Only a CPU_ON (or boot) of the VM's current generation: never the entry point of
            // the image it had before a reload.
            if let Some((entry, context)) = power.take_entry(&vm.life) {
                configure_el2(vm, vcpu);
                reset_el1_and_vgic_cpu();
                IRQ_STATE[cpu].lock().hw_pending = HwPending::default();
                hv().gic
                    .set_private_enabled(hv().cpus[cpu].redist(), VTIMER_PPI.0, false);
                let frame = TrapFrame::new_el1_entry(entry, context);
                // SAFETY: `cpu` is this CPU and nothing borrows its stack across this call.
                unsafe { boot::enter(cpu, &frame) };
            }
        }
        // Woken by any interrupt (a kick from CPU_ON, a VM boot or reset, console input or
        // an SMMU event routed here): serve the hypervisor's own before looking again.
        uart::set_log_vm(None);
        sysreg::wfi();
        handle_irqs(None);
    }
}

/// A physical CPU with no vCPU: it only sleeps.
pub fn idle_forever() -> ! {
    loop {
        sysreg::wfi();
        handle_irqs(None);
    }
}

/// Per-CPU interrupt bookkeeping for the vCPU it runs.
#[derive(Debug, Default)]
pub struct IrqState {
    /// Hardware interrupts taken at EL2 for the vCPU, not yet in a list register.
    hw_pending: HwPending,
    /// Where the last exception injected into the guest was sent, to spot a vector that
    /// itself faults.
    last_injected_vector: u64,
    /// Guest timer interrupts taken on this CPU.
    timer_exits: u64,
}

/// One per physical CPU, only touched by that CPU.
pub static IRQ_STATE: [spin::Mutex<IrqState>; boot::MAX_CPUS] = [const {
    spin::Mutex::new(IrqState {
        hw_pending: HwPending::new(),
        last_injected_vector: u64::MAX,
        timer_exits: 0,
    })
}; boot::MAX_CPUS];

/// Entry from the vector table for exceptions from the guest.
#[no_mangle]
extern "C" fn hv_lower_exception(frame: &mut TrapFrame, kind: u64) {
    let Some((vm, vcpu)) = vm_and_vcpu() else {
        panic!("guest exception on a CPU without a vCPU");
    };
    // What the hypervisor logs while it handles this exit is the guest's doing: rate-limited.
    uart::set_log_vm(Some(vm.id));
    match ExceptionKind::from_raw(kind) {
        ExceptionKind::Sync => handle_sync(vm, vcpu, frame),
        ExceptionKind::Irq | ExceptionKind::Fiq => handle_irqs(Some((vm, vcpu))),
        ExceptionKind::SError => {
            stop_vm(vm, "SError from the guest");
        }
    }
    if vm.is_stopped() {
        park_stopped_vcpu(vm, vcpu);
    }
    sync_list_registers(vm, vcpu);
}

/// Entry from the vector table for exceptions taken at EL2: a hypervisor bug.
#[no_mangle]
extern "C" fn hv_current_exception(frame: &mut TrapFrame, kind: u64) {
    if ExceptionKind::from_raw(kind) == ExceptionKind::Irq {
        // EL2 runs with interrupts masked; an IRQ here means a bug, but it is harmless.
        return;
    }
    panic!(
        "{:?} exception at EL2: ESR_EL2={:#x} FAR_EL2={:#x} ELR_EL2={:#x}",
        ExceptionKind::from_raw(kind),
        ESR_EL2.get(),
        FAR_EL2.get(),
        frame.elr
    );
}

fn handle_sync(vm: &Vm, vcpu: usize, frame: &mut TrapFrame) {
    let esr = ESR_EL2.get();
    match ExceptionClass::from_esr(esr) {
        ExceptionClass::DataAbortLower => handle_data_abort(vm, vcpu, frame, esr),
        ExceptionClass::Hvc64 => handle_smccc(vm, vcpu, frame),
        ExceptionClass::Smc64 => {
            // A trapped SMC leaves ELR at the SMC itself (Arm ARM D1.11.4).
            frame.elr = frame.elr.wrapping_add(4);
            handle_smccc(vm, vcpu, frame);
        }
        ExceptionClass::WfiWfe => {
            frame.elr = frame.elr.wrapping_add(instruction_length(esr));
            uart::flush_if_focused(vm.id);
            if !has_pending_virtual(vm, vcpu) {
                sysreg::wfi();
            }
        }
        ExceptionClass::SysReg => handle_sysreg(vm, vcpu, frame, esr),
        ExceptionClass::Sve | ExceptionClass::Sme | ExceptionClass::Unknown => {
            inject_undef(vm, frame, esr);
        }
        ExceptionClass::InstAbortLower if !crate::esr::is_stage2_fault_code(esr as u8 & 0x3f) => {
            log::warn!(
                "{}: vcpu{vcpu} instruction fetch abort (IFSC {:#x}) at {:#x}: handed to the guest",
                vm.config.name,
                esr & 0x3f,
                frame.elr
            );
            inject_abort(vm, frame, esr, false);
        }
        ExceptionClass::InstAbortLower => {
            let ipa = fault_ipa(HPFAR_EL2.get(), FAR_EL2.get());
            log::warn!(
                "{}: vcpu{vcpu} instruction fetch from unmapped IPA {ipa:#x} (ELR {:#x}, SPSR {:#x}, ESR {esr:#x})",
                vm.config.name,
                frame.elr,
                frame.spsr
            );
            inject_abort(vm, frame, esr, false);
        }
        ec => {
            log::error!(
                "{}: vcpu{vcpu} unhandled trap {ec:?} ESR_EL2={esr:#x} at {:#x}",
                vm.config.name,
                frame.elr
            );
            stop_vm(vm, "unhandled trap");
        }
    }
}

fn reg_read(frame: &TrapFrame, r: usize) -> u64 {
    if r == 31 {
        0
    } else {
        frame.x[r]
    }
}

fn reg_write(frame: &mut TrapFrame, r: usize, v: u64) {
    if r != 31 {
        frame.x[r] = v;
    }
}

fn handle_data_abort(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, esr: u64) {
    let da = DataAbort::from_esr(esr);
    if !da.is_stage2_fault() {
        // An external abort (HCR_EL2.TEA), parity error or the like on the guest's own access:
        // it gets the abort it would have taken without the hypervisor.
        log::warn!(
            "{}: vcpu{vcpu} {} abort (DFSC {:#x}) at {:#x}, FAR {:#x}: handed to the guest",
            vm.config.name,
            if da.write { "write" } else { "read" },
            da.dfsc,
            frame.elr,
            FAR_EL2.get()
        );
        inject_abort(vm, frame, esr, true);
        return;
    }
    let ipa = fault_ipa(HPFAR_EL2.get(), FAR_EL2.get());
    if !da.isv {
        log::warn!(
            "{}: vcpu{vcpu} access to {ipa:#x} at {:#x} without instruction syndrome: injecting an external abort",
            vm.config.name,
            frame.elr
        );
        inject_abort(vm, frame, esr, true);
        return;
    }
    let value = reg_read(frame, da.srt) & da.width.mask();
    let result = mmio_access(vm, vcpu, ipa, da.width, da.write.then_some(value));
    match result {
        Some(read) => {
            if !da.write {
                reg_write(frame, da.srt, da.load_value(read));
            }
            frame.elr = frame.elr.wrapping_add(instruction_length(esr));
        }
        None => {
            log::warn!(
                "{}: vcpu{vcpu} {} of unmapped IPA {ipa:#x} at {:#x}: injecting an external abort",
                vm.config.name,
                if da.write { "write" } else { "read" },
                frame.elr
            );
            inject_abort(vm, frame, esr, true);
        }
    }
}

/// Emulates one access to the VM's devices (`vm::bus` says which). `None` if nothing lives at
/// `ipa`.
fn mmio_access(
    vm: &Vm,
    vcpu: usize,
    ipa: u64,
    width: AccessWidth,
    write: Option<u64>,
) -> Option<u64> {
    let ecam = || hv().iommu.host.as_ref().map(iommu::Ecam::new);
    Some(match bus::route(vm, ipa)? {
        Target::Gicd(off) => match write {
            Some(v) => {
                vm.vgic.lock().dist_write(off, width, v);
                irq::follow_spi_enables(vm, &Machine);
                0
            }
            None => vm.vgic.lock().dist_read(off, width),
        },
        Target::Gicr { vcpu: target, off } => match write {
            Some(v) => {
                vm.vgic.lock().redist_write(target, off, width, v);
                irq::follow_timer_enable(vm, target, &Machine);
                0
            }
            None => vm.vgic.lock().redist_read(target, off, width),
        },
        Target::Ecam(off) => {
            let (Some(pci), Some(mut ecam)) = (vm.pci.as_ref(), ecam()) else {
                return Some(u64::MAX);
            };
            let mut vecam = pci.vecam.lock();
            match write {
                Some(v) => {
                    vecam.write(&mut ecam, off, width, v);
                    let moves = vecam.take_bar_moves();
                    drop(vecam);
                    if !moves.is_empty() && vm.apply_bar_moves(&moves) {
                        vm.invalidate_tlbs(&Machine);
                    }
                    0
                }
                None => vecam.read(&ecam, off, width),
            }
        }
        Target::Vsmmu(off) => {
            let s = vm.vsmmu.as_ref()?;
            let size = width.bytes() as u8;
            match write {
                None => s.read(off, size),
                Some(v) => {
                    let irqs = VmIrqs {
                        vm,
                        hw: &Machine,
                        here: Some(vcpu),
                    };
                    if !s.write(off, size, v, vm.ram(), &mut iommu::PhysSmmu, &irqs) {
                        log::error!(
                            "vsmmu: {}: a register write still waits after {} rounds",
                            vm.config.name,
                            smmu::vsmmu::MAX_ROUNDS
                        );
                    }
                    0
                }
            }
        }
        Target::Uart(off) => match write {
            Some(v) => {
                let mut out = [0u8; 1];
                let mut n = 0;
                vm.vuart.lock().write(off, width, v as u32, &mut |b| {
                    out[0] = b;
                    n = 1;
                });
                if n == 1 {
                    uart::print_guest(vm.id, &out);
                }
                0
            }
            None => {
                let v = vm.vuart.lock().read(off, width) as u64;
                vm.refill_console();
                v
            }
        },
        Target::Pci => {
            let phys = vm.resolve_pci(&ecam()?, ipa, width)?;
            iommu::forward_access(phys, width, write)
        }
    })
}

fn handle_sysreg(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, esr: u64) {
    let acc = SysRegAccess::from_esr(esr);
    frame.elr = frame.elr.wrapping_add(instruction_length(esr));
    match acc.reg {
        SysRegId::ICC_SGI1R_EL1 | SysRegId::ICC_ASGI1R_EL1 if !acc.read => {
            let value = reg_read(frame, acc.rt);
            irq::send_sgi(vm, vcpu, value, &Machine);
        }
        SysRegId::ICC_SGI0R_EL1 => {} // Group 0 SGIs: the guest has no Group 0.
        r if idregs::is_id_reg(r) && acc.read => {
            let v = idregs::guest_value(r.crm, r.op2, sysreg::id_reg(r.crm, r.op2));
            reg_write(frame, acc.rt, v);
        }
        // ACTLR_EL1 (HCR_EL2.TACR): the CPU's value, read only.
        SysRegId::ACTLR_EL1 => {
            if acc.read {
                reg_write(frame, acc.rt, sysreg::actlr_el1());
            }
        }
        // RAS error records (HCR_EL2.TERR): ERRIDR_EL1 reads 0, so there are none to select.
        r if r.is_ras_error_record() => {
            if acc.read {
                reg_write(frame, acc.rt, 0);
            }
        }
        r if r.is_debug() || r.is_pmu() || r.is_phys_timer() || r.op0 == 1 => {
            // Debug, PMU and physical-timer registers read as zero and ignore writes; op0 = 1 is
            // a set/way cache operation, which the hypervisor's coherent memory makes a no-op.
            if acc.read {
                reg_write(frame, acc.rt, 0);
            }
        }
        r => {
            log::warn!(
                "{}: vcpu{vcpu} trapped {} of S{}_{}_C{}_C{}_{}: UNDEFINED",
                vm.config.name,
                if acc.read { "MRS" } else { "MSR" },
                r.op0,
                r.op1,
                r.crn,
                r.crm,
                r.op2
            );
            frame.elr = frame.elr.wrapping_sub(instruction_length(esr));
            inject_undef(vm, frame, esr);
        }
    }
}

fn handle_smccc(vm: &Vm, vcpu: usize, frame: &mut TrapFrame) {
    let call = Call::decode([frame.x[0], frame.x[1], frame.x[2], frame.x[3]]);
    frame.x[0] = match crate::vm::psci::handle(call, &vm.psci_view(), vcpu, &Machine) {
        Outcome::Return(v) => v,
        Outcome::Suspend => {
            uart::flush_if_focused(vm.id);
            if !has_pending_virtual(vm, vcpu) {
                sysreg::wfi();
            }
            0
        }
        Outcome::CpuOff => run_bound_vcpu(),
        Outcome::SystemOff => {
            stop_vm(vm, "PSCI SYSTEM_OFF");
            0
        }
        Outcome::SystemReset => reset_vm(vm, vcpu, "PSCI SYSTEM_RESET"),
    };
}

/// Stops `vm`: logs once, makes its other vCPUs park, and powers the machine off when no VM
/// is left running.
pub fn stop_vm(vm: &Vm, reason: &str) {
    if vm.stop() {
        log::info!("{}: stopped: {reason}", vm.config.name);
        vm.log_vsmmu_stats();
        // A VM stopped for good: its functions stop mastering DMA and raising their lines.
        quiesce_devices(vm);
        vm.kick_all(&Machine);
        power_off_if_all_stopped();
    }
}

/// Powers the machine off once every VM is stopped for good (none running, none resetting).
fn power_off_if_all_stopped() {
    if all_stopped_for_good(hv().vms.iter().map(|v| &v.life)) {
        log::info!("all VMs stopped: powering off");
        super::system_off();
    }
}

/// Quiesces this CPU's vCPU: its virtual timer, list registers and any forwarded physical
/// interrupt it still held, so nothing of it survives into the next boot or another guest.
fn quiesce_local_vcpu(vm: &Vm, vcpu: usize) {
    CNTV_CTL_EL0.set(0);
    let lrs = lrs_here();
    lrs.clear_all(&Machine);
    lrs.set_hcr(&Machine, 0);
    let mut held = core::mem::take(&mut IRQ_STATE[this_cpu()].lock().hw_pending);
    for intid in held.take_all().filter(|i| i.is_spi()) {
        // A device line the guest never got to handle: the next boot starts clean.
        Gic::deactivate(intid.0);
    }
    let rd = hv().cpus[this_cpu()].redist();
    hv().gic.set_private_enabled(rd, VTIMER_PPI.0, false);
    hv().gic.clear_private_active(rd, VTIMER_PPI.0);
    HCR_EL2.set(0);
    sysreg::isb();
    vm.vcpus[vcpu].power.set(Power::Off);
}

fn park_stopped_vcpu(vm: &Vm, vcpu: usize) -> ! {
    quiesce_local_vcpu(vm, vcpu);
    run_bound_vcpu();
}

/// Stops the VM's PCI functions from mastering DMA or raising their lines.
fn quiesce_devices(vm: &Vm) {
    let mut ecam = hv().iommu.host.as_ref().map(iommu::Ecam::new);
    vm.quiesce_devices(ecam.as_mut(), &Machine);
}

/// Reboots `vm` alone: stops its vCPUs, reloads its kernel, initramfs and DT from the pristine
/// boot modules into zeroed RAM, resets its virtual devices, and powers on vCPU 0 again.
fn reset_vm(vm: &Vm, vcpu: usize, reason: &str) -> ! {
    if !vm.life.begin_reset() {
        // Someone else is already stopping or resetting this VM.
        park_stopped_vcpu(vm, vcpu);
    }
    log::info!("{}: resetting: {reason}", vm.config.name);
    for t in 0..vm.vcpus.len() {
        if t != vcpu {
            irq::kick(vm, t, &Machine);
        }
    }
    sysreg::sev();
    quiesce_local_vcpu(vm, vcpu);
    if let Err(t) = vm.wait_stopped_for_reset(&Machine, RESET_WAIT_MS) {
        log::error!(
            "{}: stopped: vcpu{t} did not stop within {RESET_WAIT_MS} ms for the reset",
            vm.config.name
        );
        // Its devices stop mastering and raising their lines all the same.
        quiesce_devices(vm);
        vm.life.abandon_reset();
        power_off_if_all_stopped();
        run_bound_vcpu();
    }
    quiesce_devices(vm);
    log::info!("{}: reset done, reloading", vm.config.name);
    vm.life.finish_reset();
    vm.request_boot(&Machine);
    run_bound_vcpu();
}

/// Whether a virtual interrupt is waiting for the vCPU (in a list register or deliverable).
fn has_pending_virtual(vm: &Vm, vcpu: usize) -> bool {
    let held = IRQ_STATE[this_cpu()].lock().hw_pending;
    lr::has_pending(&Machine, lrs_here(), &held, &mut vm.vgic.lock(), vcpu)
}

/// Most physical interrupts handled per exit: an interrupt whose condition the hypervisor failed
/// to clear must not keep a CPU in EL2 forever; the rest are taken on the next exit.
const MAX_IRQS_PER_EXIT: usize = 32;

/// Physical interrupts taken while the guest runs (`running` is its VM and vCPU) or while this
/// CPU has no running vCPU (`None`: its VM is stopped or not started): the hypervisor's own
/// (console input, SMMU events) are served either way; a guest's are dropped when it is not
/// running.
fn handle_irqs(running: Option<(&Vm, usize)>) {
    for _ in 0..MAX_IRQS_PER_EXIT {
        let intid = Gic::ack();
        if intid >= SPURIOUS {
            break;
        }
        if intid == VTIMER_PPI.0 && running.is_some() {
            // Priority drop only: the guest's EOI of the HW list register deactivates it.
            Gic::eoi(intid);
            let ticks = {
                let mut st = IRQ_STATE[this_cpu()].lock();
                st.hw_pending.push(VTIMER_PPI);
                st.timer_exits += 1;
                st.timer_exits
            };
            // The SMMU's event interrupt is an edge routed to CPU 0; the queue is also drained
            // every few guest timer ticks on every CPU, so events are reported promptly even
            // if an edge is missed or CPU 0 is busy.
            if ticks % EVENT_POLL_TICKS == 0 {
                service_smmu_events();
                uart::report_dropped();
            }
        } else if intid == hv().platform.gic.maintenance_ppi {
            // Level-sensitive: its condition must go before it is deactivated, or it is taken
            // again at once.
            service_maintenance();
            Gic::eoi_and_deactivate(intid);
        } else if intid == KICK_SGI.0 {
            Gic::eoi_and_deactivate(intid);
        } else if intid == hv().platform.uart.intid {
            Gic::eoi_and_deactivate(intid);
            console_input();
        } else if Some(intid) == hv().platform.smmu.and_then(|s| s.eventq_intid)
            || Some(intid) == hv().platform.smmu.and_then(|s| s.gerror_intid)
        {
            Gic::eoi_and_deactivate(intid);
            service_smmu_events();
        } else if running.is_some_and(|(vm, _)| vm.owns_spi(intid)) {
            // An assigned device's INTx: forwarded with the HW bit, like the timer.
            Gic::eoi(intid);
            if !IRQ_STATE[this_cpu()].lock().hw_pending.push(IntId(intid)) {
                Gic::deactivate(intid);
            }
        } else if intid == VTIMER_PPI.0 {
            // A stopped vCPU's timer: masked until its next boot enables it again.
            Gic::eoi_and_deactivate(intid);
            hv().gic
                .set_private_enabled(hv().cpus[this_cpu()].redist(), VTIMER_PPI.0, false);
        } else {
            Gic::eoi_and_deactivate(intid);
            match running {
                Some((vm, vcpu)) => log::warn!(
                    "{}: vcpu{vcpu} unexpected physical interrupt {intid}: disabled",
                    vm.config.name
                ),
                None => log::warn!(
                    "CPU {}: physical interrupt {intid} with no vCPU running: disabled",
                    this_cpu()
                ),
            }
            if intid >= 32 {
                hv().gic.disable_spi(intid);
            }
        }
    }
}

/// Guest timer exits between two polls of the SMMU event queue.
const EVENT_POLL_TICKS: u64 = 32;

fn service_smmu_events() {
    let here = vm_and_vcpu().map(|(v, c)| (v.id, c));
    crate::vm::events::route(&hv().vms, &iommu::drain_events(), here, &Machine);
}

/// Clears the conditions of the GIC maintenance interrupt (`vm::lr::service_maintenance`).
fn service_maintenance() {
    lr::service_maintenance(&Machine, lrs_here());
    sysreg::isb();
}

/// Moves console input into the VMs it is routed to and wakes the vCPUs their UART
/// interrupts target.
fn console_input() {
    let input = uart::take_input();
    let vms = &hv().vms;
    if input.stats {
        // The console's Ctrl-\ s: every VM's vSMMU counters and the physical stream table.
        for vm in vms {
            vm.log_vsmmu_stats();
        }
        iommu::dump_stream_table(&hv().iommu.groups);
    }
    let mut touched = 0u64;
    for (vm, byte) in input.bytes {
        if let Some(v) = vms.get(vm).filter(|v| !v.is_stopped()) {
            v.console_input(byte);
            touched |= 1 << vm.min(63);
        }
    }
    let here = vm_and_vcpu().map(|(v, c)| (v.id, c));
    for (i, vm) in vms
        .iter()
        .enumerate()
        .filter(|&(i, _)| touched & (1 << i.min(63)) != 0)
    {
        let target = irq::uart_target(vm);
        if here != Some((i, target)) {
            irq::kick(vm, target, &Machine);
        }
    }
}

/// Fills this CPU's free list registers for the vCPU before it runs again (`vm::lr::fill`).
fn sync_list_registers(vm: &Vm, vcpu: usize) {
    // The UART's level is sampled before the vGIC is locked (the lock order is vGIC alone).
    let uart = vm.vuart.lock().irq_level().then_some(IntId(vm.uart_intid));
    let mut irqs = IRQ_STATE[this_cpu()].lock();
    lr::fill(
        &Machine,
        lrs_here(),
        &mut irqs.hw_pending,
        &mut vm.vgic.lock(),
        vcpu,
        uart,
    );
}

/// Injects a synchronous exception into the guest's EL1 (Arm ARM D1.10.2): ESR_EL1/FAR_EL1
/// describe it, ELR_EL1/SPSR_EL1 keep the interrupted context, and the vCPU resumes at the
/// right VBAR_EL1 offset with DAIF masked.
fn inject_sync(vm: &Vm, frame: &mut TrapFrame, esr_el1: u64, far: Option<u64>) {
    let spsr = frame.spsr;
    let from_el0 = (spsr >> 2) & 3 == 0;
    let offset = if from_el0 {
        0x400
    } else if spsr & 1 == 1 {
        0x200 // EL1h: current EL with SP_ELx
    } else {
        0x000
    };
    let vector = VBAR_EL1.get().wrapping_add(offset);
    // With its MMU off the guest's VBAR_EL1 is an IPA we can check; with it on, a vector that
    // faults shows up as the next exit happening at the vector itself.
    let mmu_on = SCTLR_EL1.get() & 1 != 0;
    let unusable = if mmu_on {
        frame.elr == IRQ_STATE[this_cpu()].lock().last_injected_vector
    } else {
        vector < vm.ram_ipa.base || vector >= vm.ram_ipa.end()
    };
    if unusable {
        // The fault would repeat forever: a fault the hypervisor cannot hand to the guest
        // stops the VM.
        log::error!(
            "{}: exception (ESR_EL1 {esr_el1:#x}) at {:#x} cannot be delivered: VBAR_EL1 {:#x} unusable",
            vm.config.name,
            frame.elr,
            VBAR_EL1.get()
        );
        stop_vm(vm, "guest fault with no exception vector to take it");
        return;
    }
    IRQ_STATE[this_cpu()].lock().last_injected_vector = vector;
    ESR_EL1.set(esr_el1);
    if let Some(far) = far {
        FAR_EL1.set(far);
    }
    ELR_EL1.set(frame.elr);
    SPSR_EL1.set(spsr);
    frame.elr = vector;
    frame.spsr = boot::SPSR_EL1H_DAIF_MASKED;
}

/// Synchronous external abort for a data or instruction access the hypervisor cannot emulate.
fn inject_abort(vm: &Vm, frame: &mut TrapFrame, esr: u64, data: bool) {
    let from_el0 = (frame.spsr >> 2) & 3 == 0;
    let ec: u64 = match (data, from_el0) {
        (true, true) => 0x24,
        (true, false) => 0x25,
        (false, true) => 0x20,
        (false, false) => 0x21,
    };
    // IL, and DFSC/IFSC = 0b010000: synchronous external abort, not on a table walk.
    let wnr = esr & (1 << 6);
    let esr_el1 = (ec << 26) | (1 << 25) | wnr | 0x10;
    inject_sync(vm, frame, esr_el1, Some(FAR_EL2.get()));
}

/// UNDEFINED instruction (EC = 0) for an access the guest may not make.
fn inject_undef(vm: &Vm, frame: &mut TrapFrame, _esr: u64) {
    inject_sync(vm, frame, 1 << 25, None);
}

/// Loads `vm`'s images on this CPU (its vCPU 0's) and makes vCPU 0 ready to enter the kernel;
/// a VM whose images cannot be loaded is stopped.
fn boot_vm(vm: &Vm) {
    let t0 = super::timestamp_ms();
    // A reload is the guest's doing (its reset): what it logs counts against the VM's limits,
    // whichever CPU loads it (a guest that resets in a loop must not fill the console).
    uart::set_log_vm(Some(vm.id));
    match vm.load(&Machine, &mut iommu::PhysSmmu) {
        Ok((entry, dtb)) => {
            log::info!(
                "{}: boot {}: {} vCPUs on pCPUs {:?}, RAM IPA {:#x}+{:#x} at PA {:#x}, kernel at {entry:#x}, DTB at {dtb:#x}, loaded in {} ms, starting",
                vm.config.name,
                vm.boots.load(Ordering::Acquire),
                vm.vcpus.len(),
                vm.config.pcpus,
                vm.ram_ipa.base,
                vm.ram_ipa.size,
                vm.ram_pa,
                super::timestamp_ms() - t0
            );
            vm.vcpus[0].power.set(Power::OnPending {
                entry,
                context: dtb,
                generation: vm.life.generation(),
            });
        }
        Err(e) => {
            vm.vcpus[0].power.set(Power::Off);
            log::error!("{}: not started: {e}", vm.config.name);
            stop_vm(vm, "its images could not be loaded");
        }
    }
}

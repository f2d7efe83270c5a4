//! Running a vCPU on its pinned physical CPU: EL2 controls for a protected guest, entry, trap
//! dispatch (ESR_EL2 by name), emulated MMIO, PSCI, SGIs, physical interrupts and list registers.

use super::gic::{Gic, SPURIOUS};
use super::vm::{Power, Vm};
use super::{hv, sysreg, this_cpu, uart};
use crate::esr::{
    fault_ipa, instruction_length, DataAbort, ExceptionClass, SysRegAccess, SysRegId,
};
use crate::idregs;
use crate::lr::{ListRegister, LrState};
use crate::mmio::AccessWidth;
use crate::psci::{self, Call};
use crate::vm::lifecycle::{all_stopped_for_good, CpuOnError};
use aarch64_cpu::registers::{
    Readable, Writeable, CNTHCTL_EL2, CNTVOFF_EL2, CNTV_CTL_EL0, CPTR_EL2, ELR_EL1, ESR_EL1,
    ESR_EL2, FAR_EL1, FAR_EL2, HCR_EL2, HPFAR_EL2, MDCR_EL2, MIDR_EL1, SCTLR_EL1, SPSR_EL1,
    VBAR_EL1, VMPIDR_EL2, VTCR_EL2, VTTBR_EL2,
};
use boot::{ExceptionKind, TrapFrame};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// SGI the hypervisor sends between physical CPUs to make a vCPU re-evaluate its interrupts
/// (or notice that its VM stopped).
pub const KICK_SGI: u32 = 0;
/// PPI of the EL1 virtual timer, forwarded to the guest as a hardware interrupt.
pub const VTIMER_PPI: u32 = 27;

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
/// ICH_HCR_EL2.En and .UIE (maintenance interrupt when at most one list register is valid).
const ICH_HCR_EN: u64 = 1;
const ICH_HCR_UIE: u64 = 1 << 1;

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
    let lrs = Lrs::here();
    lrs.clear_all();
    sysreg::set_ich_ap0r0(0);
    sysreg::set_ich_ap1r0(0);
    sysreg::set_ich_vmcr(0);
    lrs.set_hcr(ICH_HCR_EN);
    sysreg::isb();
}

/// What this CPU's list registers and ICH_HCR_EL2 hold, as last written, so that an exit reads
/// only the list registers that can be in use and writes ICH_HCR_EL2 only when it changes. On
/// hardware that saves a few system register accesses per exit; under QEMU's TCG every
/// ICH_* access takes its global lock (ARM_CP_IO), which all vCPUs of all VMs share.
#[derive(Debug)]
struct Lrs {
    /// Implemented list registers (ICH_VTR_EL2.ListRegs + 1), 0 until read.
    n: AtomicUsize,
    /// List registers that may hold a non-zero value (the others hold 0).
    used: AtomicU32,
    /// ICH_HCR_EL2 as last written; `u64::MAX` when unknown.
    hcr: AtomicU64,
}

/// One per physical CPU, only touched by that CPU (so Relaxed suffices).
static LRS: [Lrs; boot::MAX_CPUS] = [const {
    Lrs {
        n: AtomicUsize::new(0),
        used: AtomicU32::new(u32::MAX),
        hcr: AtomicU64::new(u64::MAX),
    }
}; boot::MAX_CPUS];

impl Lrs {
    fn here() -> &'static Self {
        &LRS[this_cpu()]
    }

    fn count(&self) -> usize {
        match self.n.load(Ordering::Relaxed) {
            0 => {
                let n = ((sysreg::ich_vtr() & 0x1f) + 1) as usize;
                self.n.store(n, Ordering::Relaxed);
                n
            }
            n => n,
        }
    }

    /// List register `i`'s value: 0 without reading it when it is known to be.
    fn read(&self, i: usize) -> u64 {
        if self.used.load(Ordering::Relaxed) & (1 << i) == 0 {
            0
        } else {
            sysreg::ich_lr(i)
        }
    }

    fn write(&self, i: usize, v: u64) {
        sysreg::set_ich_lr(i, v);
        if v == 0 {
            self.used.fetch_and(!(1 << i), Ordering::Relaxed);
        } else {
            self.used.fetch_or(1 << i, Ordering::Relaxed);
        }
    }

    fn clear_all(&self) {
        for i in 0..self.count() {
            sysreg::set_ich_lr(i, 0);
        }
        self.used.store(0, Ordering::Relaxed);
    }

    /// Writes ICH_HCR_EL2 unless it already holds `v` (the hardware changes only its
    /// EOIcount, which nothing here enables a maintenance interrupt for).
    fn set_hcr(&self, v: u64) {
        if self.hcr.swap(v, Ordering::Relaxed) != v {
            sysreg::set_ich_hcr(v);
        }
    }

    fn hcr(&self) -> u64 {
        match self.hcr.load(Ordering::Relaxed) {
            u64::MAX => sysreg::ich_hcr(),
            v => v,
        }
    }
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
                let mut irqs = IRQ_STATE[cpu].lock();
                irqs.hw_pending = [None; MAX_HW_PENDING];
                drop(irqs);
                let gic = &hv().gic;
                gic.set_private_enabled(hv().cpus[cpu].redist(), VTIMER_PPI, false);
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
    /// Hardware interrupts (the virtual timer, assigned devices' INTx) taken at EL2, priority
    /// dropped but still active, not yet in a list register.
    hw_pending: [Option<u32>; MAX_HW_PENDING],
    /// Where the last exception injected into the guest was sent, to spot a vector that
    /// itself faults.
    last_injected_vector: u64,
    /// Guest timer interrupts taken on this CPU.
    timer_exits: u64,
}

/// Forwarded interrupts one CPU can hold at once: each stays active until its guest
/// deactivates it, so one per forwarded source (timer + a few devices' lines) suffices.
const MAX_HW_PENDING: usize = 8;

impl IrqState {
    fn push_hw(&mut self, intid: u32) -> bool {
        if self.hw_pending.contains(&Some(intid)) {
            return true;
        }
        match self.hw_pending.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(intid);
                true
            }
            None => false,
        }
    }
}

/// One per physical CPU, only touched by that CPU.
pub static IRQ_STATE: [spin::Mutex<IrqState>; boot::MAX_CPUS] = [const {
    spin::Mutex::new(IrqState {
        hw_pending: [None; MAX_HW_PENDING],
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

/// Emulates one access to the VM's devices. `None` if nothing lives at `ipa`.
fn mmio_access(
    vm: &Vm,
    vcpu: usize,
    ipa: u64,
    width: AccessWidth,
    write: Option<u64>,
) -> Option<u64> {
    if ipa >= vm.gicd.base && ipa < vm.gicd.end() {
        let off = ipa - vm.gicd.base;
        let mut vgic = vm.vgic.lock();
        return Some(match write {
            Some(v) => {
                vgic.dist_write(off, width, v);
                // Assigned devices' lines are forwarded in hardware: their physical enables
                // follow the guest's, routed to the CPU of the VM's vCPU 0.
                for &(_, _, intid) in &vm.config.devices.intx {
                    if vgic.enable_bit(0, intid) {
                        let pcpu = vm.vcpus[0].pcpu;
                        hv().gic.enable_spi(intid, hv().cpus[pcpu].mpidr);
                    } else {
                        hv().gic.disable_spi(intid);
                    }
                }
                0
            }
            None => vgic.dist_read(off, width),
        });
    }
    if ipa >= vm.gicr.base && ipa < vm.gicr.end() {
        let target = ((ipa - vm.gicr.base) / crate::vgic::GICR_FRAME_SIZE) as usize;
        let off = (ipa - vm.gicr.base) % crate::vgic::GICR_FRAME_SIZE;
        let mut vgic = vm.vgic.lock();
        return Some(match write {
            Some(v) => {
                vgic.redist_write(target, off, width, v);
                // The virtual timer is forwarded in hardware: its physical enable follows the
                // guest's.
                let enabled = vgic.enable_bit(target, VTIMER_PPI);
                drop(vgic);
                let pcpu = vm.vcpus[target].pcpu;
                hv().gic
                    .set_private_enabled(hv().cpus[pcpu].redist(), VTIMER_PPI, enabled);
                0
            }
            None => vgic.redist_read(target, off, width),
        });
    }
    if let Some(pci) = vm
        .pci
        .as_ref()
        .filter(|p| ipa >= p.ecam.base && ipa < p.ecam.end())
    {
        let off = ipa - pci.ecam.base;
        let Some(host) = hv().iommu.host.as_ref() else {
            return Some(u64::MAX);
        };
        let mut ecam = super::iommu::Ecam::new(host);
        let mut vecam = pci.vecam.lock();
        return Some(match write {
            Some(v) => {
                vecam.write(&mut ecam, off, width, v);
                let moves = vecam.take_bar_moves();
                drop(vecam);
                if !moves.is_empty() && vm.apply_bar_moves(&moves) {
                    vm.invalidate_tlbs();
                }
                0
            }
            None => vecam.read(&ecam, off, width),
        });
    }
    if let Some(s) = vm
        .vsmmu
        .as_ref()
        .filter(|s| ipa >= s.regs.base && ipa < s.regs.end())
    {
        let size = width.bytes() as u8;
        return Some(super::vsmmu::access(
            vm,
            s,
            vcpu,
            ipa - s.regs.base,
            size,
            write,
        ));
    }
    if ipa >= vm.uart.base && ipa < vm.uart.end() {
        let off = ipa - vm.uart.base;
        let mut uart = vm.vuart.lock();
        let v = match write {
            Some(v) => {
                let mut out = [0u8; 1];
                let mut n = 0;
                uart.write(off, width, v as u32, &mut |b| {
                    out[0] = b;
                    n = 1;
                });
                drop(uart);
                if n == 1 {
                    uart::print_guest(vm.id, &out);
                }
                0
            }
            None => {
                let v = uart.read(off, width) as u64;
                drop(uart);
                vm.refill_console();
                v
            }
        };
        let _ = vcpu;
        return Some(v);
    }
    // Last: the VM's PCI windows where its stage 2 maps nothing (its I/O BARs, and memory BARs
    // it placed where they cannot be mapped): forwarded inside its own functions' BARs only.
    vm.forward_pci(ipa, width, write)
}

fn handle_sysreg(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, esr: u64) {
    let acc = SysRegAccess::from_esr(esr);
    frame.elr = frame.elr.wrapping_add(instruction_length(esr));
    match acc.reg {
        SysRegId::ICC_SGI1R_EL1 | SysRegId::ICC_ASGI1R_EL1 if !acc.read => {
            let value = reg_read(frame, acc.rt);
            send_virtual_sgi(vm, vcpu, value);
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

fn send_virtual_sgi(vm: &Vm, sender: usize, value: u64) {
    let (intid, targets) = vm.vgic.lock().sgi_targets(value, sender);
    for t in 0..vm.vcpus.len() {
        if targets & (1 << t) != 0 {
            vm.vgic.lock().set_pending(t, intid);
            if t != sender {
                kick(vm, t);
            }
        }
    }
}

/// Makes vCPU `t` of `vm` re-evaluate its interrupts soon.
pub(super) fn kick(vm: &Vm, t: usize) {
    let pcpu = vm.vcpus[t].pcpu;
    Gic::send_sgi(KICK_SGI, hv().cpus[pcpu].mpidr);
}

fn handle_smccc(vm: &Vm, vcpu: usize, frame: &mut TrapFrame) {
    let call = Call::decode([frame.x[0], frame.x[1], frame.x[2], frame.x[3]]);
    let ret = match call {
        Call::Version => psci::VERSION_1_1,
        Call::SmcccVersion => psci::SMCCC_VERSION_1_1,
        Call::Features(fid) => {
            if Call::is_implemented(fid) {
                0
            } else {
                psci::status(psci::NOT_SUPPORTED)
            }
        }
        Call::SmcccArchFeatures(_) => psci::status(psci::NOT_SUPPORTED),
        Call::MigrateInfoType => psci::MIGRATE_NOT_REQUIRED,
        Call::CpuSuspend => {
            uart::flush_if_focused(vm.id);
            if !has_pending_virtual(vm, vcpu) {
                sysreg::wfi();
            }
            0
        }
        Call::CpuOn {
            target,
            entry,
            context,
        } => cpu_on(vm, target, entry, context),
        Call::AffinityInfo { target, level } => {
            if level != 0 {
                psci::status(psci::INVALID_PARAMETERS)
            } else {
                match vm.vcpu_by_mpidr(target) {
                    None => psci::status(psci::INVALID_PARAMETERS),
                    Some(t) => match vm.vcpus[t].power.get() {
                        Power::On => psci::AFFINITY_ON,
                        Power::Off => psci::AFFINITY_OFF,
                        Power::OnPending { .. } | Power::Boot => psci::AFFINITY_ON_PENDING,
                    },
                }
            }
        }
        Call::CpuOff => {
            log::info!("{}: vcpu{vcpu} CPU_OFF", vm.config.name);
            vm.vcpus[vcpu].power.set(Power::Off);
            run_bound_vcpu();
        }
        Call::SystemOff => {
            log::info!("{}: PSCI SYSTEM_OFF from vcpu{vcpu}", vm.config.name);
            stop_vm(vm, "PSCI SYSTEM_OFF");
            0
        }
        Call::SystemReset => {
            log::info!("{}: PSCI SYSTEM_RESET from vcpu{vcpu}", vm.config.name);
            reset_vm(vm, vcpu, "PSCI SYSTEM_RESET");
        }
        Call::Unknown(fid) => {
            log::debug!("{}: unknown SMCCC function {fid:#x}", vm.config.name);
            psci::status(psci::NOT_SUPPORTED)
        }
    };
    frame.x[0] = ret;
}

fn cpu_on(vm: &Vm, target: u64, entry: u64, context: u64) -> u64 {
    let Some(t) = vm.vcpu_by_mpidr(target) else {
        return psci::status(psci::INVALID_PARAMETERS);
    };
    if entry < vm.ram_ipa.base || entry >= vm.ram_ipa.end() {
        return psci::status(psci::INVALID_ADDRESS);
    }
    match vm.vcpus[t].power.cpu_on(&vm.life, entry, context) {
        Ok(()) => {
            // Its CPU waits in WFI: an SGI wakes it.
            kick(vm, t);
            0
        }
        Err(CpuOnError::AlreadyOn) => psci::status(psci::ALREADY_ON),
        Err(CpuOnError::OnPending) => psci::status(psci::ON_PENDING),
        // The VM is resetting (this vCPU has not parked yet) or stopping.
        Err(CpuOnError::Denied) => psci::status(psci::DENIED),
    }
}

/// Stops `vm`: logs once, makes its other vCPUs park, and powers the machine off when no VM
/// is left running.
pub fn stop_vm(vm: &Vm, reason: &str) {
    if vm.stop() {
        log::info!("{}: stopped: {reason}", vm.config.name);
        super::vsmmu::log_stats(vm);
        // A VM stopped for good: its functions stop mastering DMA and raising their lines.
        quiesce_devices(vm);
        for t in 0..vm.vcpus.len() {
            kick(vm, t);
        }
        sysreg::sev();
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
    let lrs = Lrs::here();
    lrs.clear_all();
    lrs.set_hcr(0);
    let held = core::mem::replace(
        &mut IRQ_STATE[this_cpu()].lock().hw_pending,
        [None; MAX_HW_PENDING],
    );
    for intid in held.into_iter().flatten().filter(|&i| i >= 32) {
        // A device line the guest never got to handle: the next boot starts clean.
        Gic::deactivate(intid);
    }
    let rd = hv().cpus[this_cpu()].redist();
    hv().gic.set_private_enabled(rd, VTIMER_PPI, false);
    hv().gic.clear_private_active(rd, VTIMER_PPI);
    HCR_EL2.set(0);
    sysreg::isb();
    vm.vcpus[vcpu].power.set(Power::Off);
}

fn park_stopped_vcpu(vm: &Vm, vcpu: usize) -> ! {
    quiesce_local_vcpu(vm, vcpu);
    run_bound_vcpu();
}

/// Stops the VM's PCI functions from mastering DMA or raising their lines until its next
/// boot's drivers set them up again (PCI Local Bus 3.0, 6.2.2: Command register).
fn quiesce_devices(vm: &Vm) {
    let Some(host) = hv().iommu.host.as_ref() else {
        return;
    };
    let mut ecam = super::iommu::Ecam::new(host);
    for f in &vm.config.devices.functions {
        use crate::pci::ConfigSpace;
        let cmd = ecam.read32(f.bdf, 0x04) & 0xffff;
        // Bus Master Enable off, INTx Disable on; the status half is write-1-to-clear: 0s.
        ecam.write32(f.bdf, 0x04, (cmd & !0x4) | 0x400);
    }
    for &(_, _, intid) in &vm.config.devices.intx {
        hv().gic.disable_spi(intid);
    }
}

/// Upper bound on the wait for a VM's other vCPUs to park during a reset (counter ticks are
/// converted from this many milliseconds).
const RESET_WAIT_MS: u64 = 1000;

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
            kick(vm, t);
        }
    }
    sysreg::sev();
    quiesce_local_vcpu(vm, vcpu);
    let freq = aarch64_cpu::registers::CNTFRQ_EL0.get();
    let deadline = aarch64_cpu::registers::CNTPCT_EL0.get() + freq * RESET_WAIT_MS / 1000;
    for t in 0..vm.vcpus.len() {
        // A CPU_ON accepted but never entered is cancelled; a running vCPU must park.
        while !vm.vcpus[t].power.stopped_for_reset() {
            if aarch64_cpu::registers::CNTPCT_EL0.get() > deadline {
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
            core::hint::spin_loop();
        }
    }
    quiesce_devices(vm);
    log::info!("{}: reset done, reloading", vm.config.name);
    vm.life.finish_reset();
    request_boot(vm);
    run_bound_vcpu();
}

/// Whether a virtual interrupt is waiting for the vCPU (in a list register or deliverable).
fn has_pending_virtual(vm: &Vm, vcpu: usize) -> bool {
    let lrs = Lrs::here();
    for i in 0..lrs.count() {
        let lr = ListRegister(lrs.read(i));
        if matches!(lr.state(), LrState::Pending | LrState::PendingActive) {
            return true;
        }
    }
    if IRQ_STATE[this_cpu()]
        .lock()
        .hw_pending
        .iter()
        .any(Option::is_some)
    {
        return true;
    }
    let mut vgic = vm.vgic.lock();
    if let Some((intid, _)) = vgic.pop_deliverable(vcpu, &[]) {
        vgic.set_pending(vcpu, intid);
        return true;
    }
    false
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
        if intid == VTIMER_PPI && running.is_some() {
            // Priority drop only: the guest's EOI of the HW list register deactivates it.
            Gic::eoi(intid);
            let ticks = {
                let mut st = IRQ_STATE[this_cpu()].lock();
                st.push_hw(intid);
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
        } else if intid == KICK_SGI {
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
            if !IRQ_STATE[this_cpu()].lock().push_hw(intid) {
                Gic::deactivate(intid);
            }
        } else if intid == VTIMER_PPI {
            // A stopped vCPU's timer: masked until its next boot enables it again.
            Gic::eoi_and_deactivate(intid);
            hv().gic
                .set_private_enabled(hv().cpus[this_cpu()].redist(), VTIMER_PPI, false);
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
    super::vsmmu::service_events(&hv().vms, here);
}

/// Clears the conditions of the GIC maintenance interrupt (IHI 0069, 12.5.9 ICH_MISR_EL2):
/// completed entries that asked for EOI maintenance, and the underflow request. The list
/// registers are refilled by `sync_list_registers` before the guest runs again.
fn service_maintenance() {
    let lrs = Lrs::here();
    for i in 0..lrs.count() {
        let lr = ListRegister(lrs.read(i));
        if lr.state() == LrState::Invalid && lr.0 != 0 {
            lrs.write(i, 0);
        }
    }
    lrs.set_hcr(lrs.hcr() & !ICH_HCR_UIE);
    sysreg::isb();
}

/// Moves console input into the VMs it is routed to and wakes the vCPUs their UART
/// interrupts target.
fn console_input() {
    let input = uart::take_input();
    let vms = &hv().vms;
    if input.stats {
        super::vsmmu::print_stats(vms, &hv().iommu.groups);
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
        let target = vm.vgic.lock().spi_target(vm.uart_intid);
        if here != Some((i, target)) {
            kick(vm, target);
        }
    }
}

/// Fills free list registers from what is pending for the vCPU: first a forwarded hardware
/// interrupt, then the level of the emulated UART, then the vGIC's latched interrupts by
/// priority. Asks for an underflow maintenance interrupt when some remain.
fn sync_list_registers(vm: &Vm, vcpu: usize) {
    let lrs = Lrs::here();
    let n = lrs.count();
    let mut in_flight = [u32::MAX; 16];
    let mut free = [false; 16];
    for (i, slot) in in_flight.iter_mut().enumerate().take(n) {
        let lr = ListRegister(lrs.read(i));
        if lr.state() == LrState::Invalid {
            free[i] = true;
            if lr.0 != 0 {
                // A completed entry that asked for an EOI maintenance interrupt keeps
                // ICH_EISR_EL2 (and so the maintenance interrupt) asserted until it is cleared.
                lrs.write(i, 0);
            }
        } else {
            *slot = lr.vintid();
        }
    }
    let mut next_free = (0..n)
        .filter(|&i| free[i])
        .collect::<heapless_iter::FreeList>();
    let mut vgic = vm.vgic.lock();

    let mut irqs = IRQ_STATE[this_cpu()].lock();
    for slot in irqs.hw_pending.iter_mut() {
        let Some(pintid) = *slot else { continue };
        // SPIs of assigned devices are delivered to the vCPU on this CPU whatever the guest's
        // routing says (the physical SPI is routed here).
        if vgic.is_enabled(vcpu, pintid) {
            if let Some(i) = next_free.take() {
                let lr = ListRegister::hardware(
                    pintid,
                    pintid,
                    vgic.priority(vcpu, pintid),
                    vgic.group1(vcpu, pintid),
                );
                lrs.write(i, lr.0);
                in_flight[i] = pintid;
                *slot = None;
            }
        } else {
            // The guest disabled it meanwhile: give the physical interrupt back.
            Gic::deactivate(pintid);
            *slot = None;
        }
    }
    drop(irqs);

    if vgic.spi_target(vm.uart_intid) == vcpu
        && vm.vuart.lock().irq_level()
        && !in_flight.contains(&vm.uart_intid)
    {
        vgic.set_pending(vcpu, vm.uart_intid);
    }

    let mut more = false;
    while let Some((intid, prio)) = vgic.pop_deliverable(vcpu, &in_flight[..n]) {
        let Some(i) = next_free.take() else {
            vgic.set_pending(vcpu, intid);
            more = true;
            break;
        };
        let level = !vgic.is_edge(vcpu, intid);
        let lr = ListRegister::software(intid, prio, vgic.group1(vcpu, intid), level);
        lrs.write(i, lr.0);
        in_flight[i] = intid;
    }
    lrs.set_hcr(if more {
        ICH_HCR_EN | ICH_HCR_UIE
    } else {
        ICH_HCR_EN
    });
}

mod heapless_iter {
    /// The free list register indices, taken one at a time.
    #[derive(Debug, Default)]
    pub struct FreeList {
        slots: [usize; 16],
        len: usize,
        next: usize,
    }

    impl FreeList {
        pub fn take(&mut self) -> Option<usize> {
            (self.next < self.len).then(|| {
                self.next += 1;
                self.slots[self.next - 1]
            })
        }
    }

    impl FromIterator<usize> for FreeList {
        fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
            let mut f = Self::default();
            for i in iter.into_iter().take(16) {
                f.slots[f.len] = i;
                f.len += 1;
            }
            f
        }
    }
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

/// Asks the CPU of `vm`'s vCPU 0 to load the VM's images and start it.
pub fn request_boot(vm: &Vm) {
    vm.vcpus[0].power.set(Power::Boot);
    if vm.vcpus[0].pcpu != this_cpu() {
        kick(vm, 0);
    }
}

/// Loads `vm`'s images on this CPU (its vCPU 0's) and makes vCPU 0 ready to enter the kernel;
/// a VM whose images cannot be loaded is stopped.
fn boot_vm(vm: &Vm) {
    let t0 = super::timestamp_ms();
    // A reload is the guest's doing (its reset): what it logs counts against the VM's limits,
    // whichever CPU loads it (a guest that resets in a loop must not fill the console).
    uart::set_log_vm(Some(vm.id));
    match vm.load() {
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

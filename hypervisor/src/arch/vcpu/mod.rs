//! Running a vCPU on its pinned physical CPU: the run loop, the entries from the vector table
//! and trap dispatch by ESR_EL2.EC, here; one submodule per kind of trap and for the EL2 set-up,
//! the lifecycle on this CPU and exception injection. What a trap means for the VM is decided
//! in `crate::vm` (PSCI, lifecycle, the MMIO bus, list registers) and by the devices in
//! `crate::devices`; this module decodes the trap and carries the decision out.

mod abort;
mod el2;
mod inject;
mod irqs;
mod lifecycle;
mod monitor;
mod smccc;
mod sysreg_trap;
mod vits;

use crate::arch::hw::Machine;
use crate::arch::{hv, sysreg, this_cpu, uart};
use crate::esr::{fault_ipa, instruction_length, ExceptionClass};
use crate::profile::{Kind, Laps, Stage, Stopwatch};
use crate::vm::irq::VTIMER_PPI;
use crate::vm::lifecycle::Power;
use crate::vm::lr::{FillState, HwPending, Lrs};
use crate::vm::Vm;
use aarch64_cpu::registers::{Readable, CNTPCT_EL0, ESR_EL2, FAR_EL2, HPFAR_EL2};
use abort::handle_data_abort;
use boot::{ExceptionKind, TrapFrame};
use el2::{configure_el2, reset_el1_and_vgic_cpu};
use inject::{inject_abort, inject_undef};
use irqs::{handle_irqs, has_pending_virtual, sync_list_registers};
use lifecycle::{boot_vm, park_stopped_vcpu, reset_vm, stop_vm};
pub use monitor::row as monitor_row;
use smccc::handle_smccc;
use sysreg_trap::handle_sysreg;

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
        if vm.life.take_reset_request() {
            // The operator's reset, with this vCPU off (the guest turned it off, or it was
            // never started): it runs the reset as any of the VM's vCPUs would.
            reset_vm(vm, vcpu, "reset by the operator");
        }
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
                {
                    let mut st = IRQ_STATE[cpu].lock();
                    st.hw_pending = HwPending::default();
                    // The list registers were just cleared: the first exit fills them.
                    st.filled = FillState::new();
                }
                hv().gic
                    .set_private_enabled(hv().cpus[cpu].redist(), VTIMER_PPI.0, false);
                if vm.its.as_ref().is_some_and(|i| i.is_direct()) {
                    crate::arch::its::vpe_enter(
                        &hv().its,
                        &hv().gic,
                        vm.id,
                        vcpu,
                        hv().cpus[cpu].redist(),
                    );
                }
                let frame = TrapFrame::new_el1_entry(entry.get(), context);
                // SAFETY: `cpu` is this CPU and nothing borrows its stack across this call.
                unsafe { boot::enter(cpu, &frame) };
            }
        }
        // Woken by any interrupt (a kick from CPU_ON, a VM boot or reset, console input or
        // an SMMU event routed here): serve the hypervisor's own before looking again.
        uart::set_log_vm(None);
        // Until its vCPU is powered on, the CPU zeroes its VM's RAM ahead of need (one with PCI
        // functions), looking at its power between blocks.
        let power = &vm.vcpus[vcpu].power;
        let idle = || vm.life.runs() && power.get() == Power::Off;
        if !(idle() && vm.zero_idle(&Machine, &mut || sysreg::irq_pending() || !idle()) > 0) {
            sysreg::wfi();
        }
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
    /// What the last list-register fill saw (`sync_list_registers` skips one that would
    /// find nothing new).
    filled: FillState,
}

/// One per physical CPU, only touched by that CPU.
pub static IRQ_STATE: [spin::Mutex<IrqState>; boot::MAX_CPUS] = [const {
    spin::Mutex::new(IrqState {
        hw_pending: HwPending::new(),
        last_injected_vector: u64::MAX,
        timer_exits: 0,
        filled: FillState::new(),
    })
}; boot::MAX_CPUS];

/// Entry from the vector table for exceptions from the guest.
#[no_mangle]
extern "C" fn hv_lower_exception(frame: &mut TrapFrame, kind: u64) {
    let Some((vm, vcpu)) = vm_and_vcpu() else {
        panic!("guest exception on a CPU without a vCPU");
    };
    let laps = Stopwatch::start(counter as fn() -> u64, frame.entry_ts);
    laps.enter(Stage::Decode);
    let cpu = this_cpu();
    if let Some((kind, end)) = LAST_EXIT[cpu].lock().take() {
        vm.vcpus[vcpu]
            .profile
            .lock()
            .add_exit(kind, end, frame.eret_ts);
    }
    // What the hypervisor logs while it handles this exit is the guest's doing: rate-limited.
    uart::set_log_vm(Some(vm.id));
    match ExceptionKind::from_raw(kind) {
        ExceptionKind::Sync => handle_sync(vm, vcpu, frame, &laps),
        ExceptionKind::Irq | ExceptionKind::Fiq => {
            if let Some(k) = handle_irqs(Some((vm, vcpu))) {
                laps.kind(k);
            }
        }
        ExceptionKind::SError => {
            stop_vm(vm, "SError from the guest");
        }
    }
    if vm.is_stopped() {
        park_stopped_vcpu(vm, vcpu);
    }
    if vm.life.take_reset_request() {
        reset_vm(vm, vcpu, "reset by the operator");
    }
    laps.enter(Stage::LrSync);
    sync_list_registers(
        vm,
        vcpu,
        ExceptionKind::from_raw(kind) == ExceptionKind::Sync,
    );
    let (kind, ticks, end) = laps.finish();
    if let Some(kind) = kind {
        vm.vcpus[vcpu].profile.lock().add(kind, &ticks);
        *LAST_EXIT[cpu].lock() = Some((kind, end));
    }
}

/// The generic counter, for the trap profile.
fn counter() -> u64 {
    CNTPCT_EL0.get()
}

/// Per physical CPU: the kind of its last profiled exit and when its handler ended, until the
/// next exit reads when its ERET ran (`TrapFrame::eret_ts`) and charges the difference.
static LAST_EXIT: [spin::Mutex<Option<(Kind, u64)>>; boot::MAX_CPUS] =
    [const { spin::Mutex::new(None) }; boot::MAX_CPUS];

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

fn handle_sync(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, laps: &impl Laps) {
    let esr = ESR_EL2.get();
    match ExceptionClass::from_esr(esr) {
        ExceptionClass::DataAbortLower => handle_data_abort(vm, vcpu, frame, esr, laps),
        ExceptionClass::Hvc64 => handle_smccc(vm, vcpu, frame),
        ExceptionClass::Smc64 => {
            // A trapped SMC leaves ELR at the SMC itself (Arm ARM D1.11.4).
            frame.elr = frame.elr.wrapping_add(4);
            handle_smccc(vm, vcpu, frame);
        }
        ExceptionClass::WfiWfe => {
            frame.elr = frame.elr.wrapping_add(instruction_length(esr));
            uart::flush_if_focused(vm.id);
            // An idle vCPU zeroes its VM's RAM ahead of need (one with PCI functions) until
            // something is pending for it, and only waits when there is nothing left. A
            // directly injected vLPI pends nowhere EL2 can see: then one block per WFI.
            let direct = vm.its.as_ref().is_some_and(|i| i.is_direct());
            let mut blocks = 0;
            if !has_pending_virtual(vm, vcpu)
                && vm.zero_idle(&Machine, &mut || {
                    blocks += 1;
                    (direct && blocks > 1) || sysreg::irq_pending() || has_pending_virtual(vm, vcpu)
                }) == 0
            {
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
            if !abort::ram_fault(vm, ipa, esr as u8 & 0x3f) {
                return;
            }
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

//! HVC and SMC (SMCCC): PSCI as `vm::psci` decides it, carried out on this CPU.

use super::irqs::has_pending_virtual;
use super::lifecycle::{reset_vm, stop_vm};
use super::run_bound_vcpu;
use crate::arch::hw::Machine;
use crate::arch::{sysreg, uart};
use crate::vm::psci::{Call, Outcome};
use crate::vm::Vm;
use boot::TrapFrame;

pub(super) fn handle_smccc(vm: &Vm, vcpu: usize, frame: &mut TrapFrame) {
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

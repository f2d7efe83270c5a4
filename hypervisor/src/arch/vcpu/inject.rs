//! Exceptions injected into the guest's EL1 (Arm ARM D1.10.2).

use super::lifecycle::stop_vm;
use super::IRQ_STATE;
use crate::arch::this_cpu;
use crate::vm::Vm;
use aarch64_cpu::registers::{
    Readable, Writeable, ELR_EL1, ESR_EL1, FAR_EL1, FAR_EL2, SCTLR_EL1, SPSR_EL1, VBAR_EL1,
};
use boot::TrapFrame;

/// Injects a synchronous exception into the guest's EL1 (Arm ARM D1.10.2): ESR_EL1/FAR_EL1
/// describe it, ELR_EL1/SPSR_EL1 keep the interrupted context, and the vCPU resumes at the
/// right VBAR_EL1 offset with DAIF masked.
pub(super) fn inject_sync(vm: &Vm, frame: &mut TrapFrame, esr_el1: u64, far: Option<u64>) {
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
pub(super) fn inject_abort(vm: &Vm, frame: &mut TrapFrame, esr: u64, data: bool) {
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
pub(super) fn inject_undef(vm: &Vm, frame: &mut TrapFrame, _esr: u64) {
    inject_sync(vm, frame, 1 << 25, None);
}

//! Interrupt delivery inside a VM: a device's line made pending in the vGIC and the vCPU it
//! targets woken, virtual SGIs between vCPUs, and the physical interrupts forwarded in hardware
//! (the virtual timer, assigned functions' INTx) following the guest's enables.

use super::Vm;
use crate::devices::IrqPort;
use crate::hw::{Hw, IntId};

/// SGI the hypervisor sends between physical CPUs to make a vCPU re-evaluate its interrupts
/// (or notice that its VM stopped).
pub const KICK_SGI: IntId = IntId(0);
/// PPI of the EL1 virtual timer, forwarded to the guest as a hardware interrupt.
pub const VTIMER_PPI: IntId = IntId(27);

/// Makes vCPU `t` of `vm` re-evaluate its interrupts soon.
pub fn kick(vm: &Vm, t: usize, hw: &impl Hw) {
    if let Some(slot) = vm.vcpus.get(t) {
        hw.kick(slot.pcpu);
    }
}

/// A VM's interrupt port as its devices see it. `here`: the vCPU running on the calling CPU,
/// which needs no kick (it looks at its interrupts before it re-enters the guest).
#[derive(Debug)]
pub struct VmIrqs<'a, H: Hw> {
    /// The VM.
    pub vm: &'a Vm,
    /// The machine.
    pub hw: &'a H,
    /// The vCPU on this CPU, if it is one of the VM's.
    pub here: Option<usize>,
}

impl<H: Hw> IrqPort for VmIrqs<'_, H> {
    fn raise(&self, intid: IntId) {
        let target = {
            let mut vgic = self.vm.vgic.lock();
            let t = vgic.spi_target(intid);
            vgic.set_pending(t, intid);
            t
        };
        if self.here != Some(target) {
            kick(self.vm, target, self.hw);
        }
    }
}

/// A guest's ICC_SGI1R_EL1 (or ICC_ASGI1R_EL1) write from vCPU `sender`: the SGI pending in
/// each target, the others woken.
pub fn send_sgi(vm: &Vm, sender: usize, sgi1r: u64, hw: &impl Hw) {
    let (intid, targets) = vm.vgic.lock().sgi_targets(sgi1r, sender);
    for t in 0..vm.vcpus.len() {
        if targets & (1 << t) != 0 {
            vm.vgic.lock().set_pending(t, intid);
            if t != sender {
                kick(vm, t, hw);
            }
        }
    }
}

/// After a guest distributor write: assigned functions' INTx lines are forwarded in hardware,
/// so their physical enables follow the guest's, routed to the CPU of the VM's vCPU 0.
pub fn follow_spi_enables(vm: &Vm, hw: &impl Hw) {
    let vgic = vm.vgic.lock();
    let Some(pcpu) = vm.vcpus.first().map(|v| v.pcpu) else {
        return;
    };
    for &(_, _, intid, _) in &vm.config.devices.intx {
        if vgic.enable_bit(0, IntId(intid)) {
            hw.enable_spi(IntId(intid), pcpu);
        } else {
            hw.disable_spi(IntId(intid));
        }
    }
}

/// After a guest write to vCPU `target`'s redistributor: the virtual timer is forwarded in
/// hardware, so its physical enable on that vCPU's CPU follows the guest's.
pub fn follow_timer_enable(vm: &Vm, target: usize, hw: &impl Hw) {
    let enabled = vm.vgic.lock().enable_bit(target, VTIMER_PPI);
    if let Some(slot) = vm.vcpus.get(target) {
        hw.set_ppi_enabled(slot.pcpu, VTIMER_PPI, enabled);
    }
}

/// The vCPU that takes the VM's UART interrupt (to wake it after console input).
pub fn uart_target(vm: &Vm) -> usize {
    vm.vgic.lock().spi_target(IntId(vm.uart_intid))
}

//! Physical interrupts at EL2: the guest's (timer, forwarded SPIs, kicks), the hypervisor's
//! (console input, SMMU events, the GIC maintenance interrupt), and the list registers filled
//! before the vCPU runs again.

use super::{lrs_here, vm_and_vcpu, IRQ_STATE};
use crate::arch::gic::{Gic, SPURIOUS};
use crate::arch::hw::Machine;
use crate::arch::{hv, iommu, its, sysreg, this_cpu, uart};
use crate::hw::IntId;
use crate::profile::Kind;
use crate::vm::irq::{self, KICK_SGI, VTIMER_PPI};
use crate::vm::lr;
use crate::vm::Vm;

/// Whether a virtual interrupt is waiting for the vCPU (in a list register or deliverable).
pub(super) fn has_pending_virtual(vm: &Vm, vcpu: usize) -> bool {
    let held = IRQ_STATE[this_cpu()].lock().hw_pending;
    lr::has_pending(&Machine, lrs_here(), &held, &mut vm.vgic.lock_own(), vcpu)
}

/// Most physical interrupts handled per exit: an interrupt whose condition the hypervisor failed
/// to clear must not keep a CPU in EL2 forever; the rest are taken on the next exit.
pub(super) const MAX_IRQS_PER_EXIT: usize = 32;

/// Physical interrupts taken while the guest runs (`running` is its VM and vCPU) or while this
/// CPU has no running vCPU (`None`: its VM is stopped or not started): the hypervisor's own
/// (console input, SMMU events) are served either way; a guest's are dropped when it is not
/// running. Returns what kind of exit that was for the trap profile: `None` if console input
/// was served (the operator's monitor may have run in it).
pub(super) fn handle_irqs(running: Option<(&Vm, usize)>) -> Option<Kind> {
    let (mut lpis, mut timer, mut other, mut console) = (false, false, false, false);
    for _ in 0..MAX_IRQS_PER_EXIT {
        let intid = Gic::ack();
        // 1020-1023 are the special INTIDs (IHI 0069H 2.2.1; 1023: nothing pending); an LPI
        // (8192 and up) is an interrupt like any other and must be EOId.
        if (SPURIOUS..=SPECIAL_LAST).contains(&intid) {
            break;
        }
        if intid >= crate::its::FIRST_LPI {
            // Priority drop only: an LPI has no active state, so there is nothing to
            // deactivate (ICC_DIR).
            Gic::eoi(intid);
            lpi(intid, running);
            lpis = true;
        } else if intid == VTIMER_PPI.0 && running.is_some() {
            // Priority drop only: the guest's EOI of the HW list register deactivates it.
            Gic::eoi(intid);
            timer = true;
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
        } else if Some(intid) == hv().platform.uart.intid {
            Gic::eoi_and_deactivate(intid);
            console_input();
            console = true;
        } else if iommu::is_smmu_irq(intid) {
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
            // SPIs only: an extended-range or reserved INTID has no GICD enable bit here.
            if (32..SPURIOUS).contains(&intid) {
                hv().gic.disable_spi(intid);
            }
        }
        if !(intid >= crate::its::FIRST_LPI || intid == VTIMER_PPI.0) {
            other = true;
        }
    }
    match (console, other, timer, lpis) {
        (true, ..) => None,
        (false, false, true, _) => Some(Kind::Timer),
        (false, false, false, true) => Some(Kind::Lpi),
        _ => Some(Kind::Irq),
    }
}

/// The last special INTID (1023, "no pending interrupt").
const SPECIAL_LAST: u32 = 1023;

/// A physical LPI taken at EL2 (already EOId): the owner VM's guest LPI made pending in the
/// vCPU its translation targets (`vits::deliver`), through a list register at that vCPU's next
/// entry. One the guest's vITS does not translate now (its ITS disabled, its collection
/// unmapped) is dropped, as an ITS drops one. An LPI no VM owns (a race with an unmap) is
/// reported against the running VM's log budget and otherwise ignored: nothing maps it any
/// more, so it cannot recur.
pub(super) fn lpi(intid: u32, running: Option<(&Vm, usize)>) {
    let hv = hv();
    match its::owner(&hv.its, intid) {
        Some((vm, _, _)) => {
            super::vits::deliver(vm, intid, running);
        }
        None => {
            let old = uart::set_log_vm(running.map(|(vm, _)| vm.id));
            match running {
                Some((vm, vcpu)) => log::warn!(
                    "{}: vcpu{vcpu}: LPI {intid} that no device owns",
                    vm.config.name
                ),
                None => log::warn!("CPU {}: LPI {intid} that no device owns", this_cpu()),
            }
            uart::set_log_vm(old);
        }
    }
}

/// Guest timer exits between two polls of the SMMU event queue.
pub(super) const EVENT_POLL_TICKS: u64 = 32;

pub(super) fn service_smmu_events() {
    let here = vm_and_vcpu().map(|(v, c)| (v.id, c));
    for drained in iommu::drain_events() {
        crate::vm::events::route(&hv().vms, &drained, here, &Machine);
    }
}

/// Clears the conditions of the GIC maintenance interrupt (`vm::lr::service_maintenance`).
pub(super) fn service_maintenance() {
    lr::service_maintenance(&Machine, lrs_here());
    sysreg::isb();
}

/// Moves console input into the VMs it is routed to and wakes the vCPUs their UART
/// interrupts target.
pub(super) fn console_input() {
    let input = uart::take_input();
    let vms = &hv().vms;
    if input.stats {
        super::monitor::stats(None, false);
    }
    for line in &input.commands {
        super::monitor::run(line);
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
/// `sync_exit`: the exit was synchronous (a trap, not an interrupt), so the fill may be skipped
/// when nothing changed since the last one (`lr::FillState`): most traps change no interrupt
/// state.
pub(super) fn sync_list_registers(vm: &Vm, vcpu: usize, sync_exit: bool) {
    // The UART's level is sampled before the vGIC is locked (the lock order is vGIC alone).
    let uart = vm.vuart.lock().irq_level().then_some(IntId(vm.uart_intid));
    let generation = vm.vgic.generation();
    let mut irqs = IRQ_STATE[this_cpu()].lock();
    let st = &mut *irqs;
    if sync_exit && !st.filled.needed(generation, &st.hw_pending, uart) {
        return;
    }
    let left = lr::fill(
        &Machine,
        lrs_here(),
        &mut st.hw_pending,
        &mut vm.vgic.lock_own(),
        vcpu,
        uart,
    );
    st.filled.filled(generation, uart, left);
}

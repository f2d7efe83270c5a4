//! Carrying out a VM's lifecycle on this CPU (the states and rules are `vm::lifecycle`'s):
//! boot, stop, reset with its deadline, and parking a stopped vCPU.

use super::{lrs_here, run_bound_vcpu, IRQ_STATE};
use crate::arch::gic::Gic;
use crate::arch::hw::Machine;
use crate::arch::{hv, iommu, its, sysreg, this_cpu, uart};
use crate::vm::irq::VTIMER_PPI;
use crate::vm::lifecycle::{all_stopped_for_good, Power, RESET_WAIT_MS};
use crate::vm::Vm;
use aarch64_cpu::registers::{Writeable, CNTV_CTL_EL0, HCR_EL2};
use core::sync::atomic::{AtomicBool, Ordering};

/// Stops `vm`: logs once, makes its other vCPUs park, and powers the machine off when no VM
/// is left running.
pub fn stop_vm(vm: &Vm, reason: &str) {
    if vm.stop() {
        log::info!("{}: stopped: {reason}", vm.config.name);
        vm.log_vsmmu_stats();
        // A stopped VM: its functions stop mastering DMA and raising their lines, and their
        // streams abort, so nothing its guest left in its tables reaches memory while it is
        // stopped. (A reset leaves them to the reload: the reset of its vSMMUs puts them on
        // stage 2 only.)
        quiesce_devices(vm);
        vm.abort_streams(iommu::PhysSmmu);
        vm.kick_all(None, &Machine);
        power_off_if_all_stopped();
    }
}

/// Set once the operator stopped a VM from the monitor: the machine then stays on when no VM
/// is left running, for the operator's next `start` (or `poweroff`).
pub(super) static OPERATOR_HOLD: AtomicBool = AtomicBool::new(false);

/// Powers the machine off once every VM is stopped (none running, none resetting), unless the
/// operator holds it on ([`OPERATOR_HOLD`]).
pub(super) fn power_off_if_all_stopped() {
    if all_stopped_for_good(hv().vms.iter().map(|v| &v.life)) {
        if OPERATOR_HOLD.load(Ordering::Acquire) {
            log::info!("all VMs stopped: the machine stays on for the monitor (Ctrl-\\ : then `start VM` or `poweroff`)");
            return;
        }
        log::info!("all VMs stopped: powering off");
        crate::arch::system_off();
    }
}

/// Quiesces this CPU's vCPU: its virtual timer, list registers and any forwarded physical
/// interrupt it still held, so nothing of it survives into the next boot or another guest.
pub(super) fn quiesce_local_vcpu(vm: &Vm, vcpu: usize) {
    CNTV_CTL_EL0.set(0);
    let lrs = lrs_here();
    lrs.clear_all(&Machine);
    lrs.set_hcr(&Machine, 0);
    let mut held = {
        let mut st = IRQ_STATE[this_cpu()].lock();
        st.filled = crate::vm::lr::FillState::new();
        core::mem::take(&mut st.hw_pending)
    };
    for intid in held.take_all().filter(|i| i.is_spi()) {
        // A device line the guest never got to handle: the next boot starts clean.
        Gic::deactivate(intid.0);
    }
    let rd = hv().cpus[this_cpu()].redist();
    // Its vPE (GICv4.0) leaves the redistributor before its vPT may be zeroed and reused.
    if vm.its.as_ref().is_some_and(|i| i.is_direct()) {
        its::vpe_leave(&hv().its, &hv().gic, rd);
    }
    hv().gic.set_private_enabled(rd, VTIMER_PPI.0, false);
    hv().gic.clear_private_active(rd, VTIMER_PPI.0);
    HCR_EL2.set(0);
    sysreg::isb();
    vm.vcpus[vcpu].power.set(Power::Off);
}

pub(super) fn park_stopped_vcpu(vm: &Vm, vcpu: usize) -> ! {
    quiesce_local_vcpu(vm, vcpu);
    run_bound_vcpu();
}

/// Stops the VM's PCI functions from mastering DMA or raising their lines, unmaps every
/// event its guest mapped in the physical ITS (its MSIs then raise nothing), then its vPEs
/// (GICv4.0: VMAPP V=0, their tables zeroed). On a reset every vCPU has left its vPE by then;
/// on a stop for good others may still be leaving, but nothing reuses a stopped VM's vPTs.
pub(super) fn quiesce_devices(vm: &Vm) {
    vm.quiesce_devices(|segment| hv().iommu.ecam(segment), &Machine);
    super::vits::reset(vm);
    its::unmap_vpes(&hv().its, vm.id, &vm.config.name);
}

/// Reboots `vm` alone: stops its vCPUs, reloads its kernel, initramfs and DT from the pristine
/// boot modules into zeroed RAM, resets its virtual devices, and powers on vCPU 0 again.
pub(super) fn reset_vm(vm: &Vm, vcpu: usize, reason: &str) -> ! {
    if !vm.life.begin_reset() {
        // Someone else is already stopping or resetting this VM.
        park_stopped_vcpu(vm, vcpu);
    }
    log::info!("{}: resetting: {reason}", vm.config.name);
    vm.kick_all(Some(vcpu), &Machine);
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

/// Loads `vm`'s images on this CPU (its vCPU 0's) and makes vCPU 0 ready to enter the kernel;
/// a VM whose images cannot be loaded is stopped.
pub(super) fn boot_vm(vm: &Vm) {
    let t0 = crate::arch::timestamp_ms();
    // A reload is the guest's doing (its reset): what it logs counts against the VM's limits,
    // whichever CPU loads it (a guest that resets in a loop must not fill the console).
    uart::set_log_vm(Some(vm.id));
    match vm.load(&Machine, iommu::PhysSmmu) {
        Ok((entry, dtb)) => {
            vm.booted_at_ms.store(t0, Ordering::Release);
            log::info!(
                "{}: boot {}: {} vCPUs on pCPUs {:?}, RAM IPA {:#x}+{:#x} at PA {:#x}, kernel at {entry:#x}, DTB at {dtb:#x}, loaded in {} ms, starting",
                vm.config.name,
                vm.boots.load(Ordering::Acquire),
                vm.vcpus.len(),
                vm.config.pcpus,
                vm.ram_ipa.base,
                vm.ram_ipa.size,
                vm.ram_pa,
                crate::arch::timestamp_ms() - t0
            );
            its::map_vpes(&hv().its, vm.id, &vm.config.name);
            vm.vcpus[0].power.set(Power::OnPending {
                entry,
                context: dtb.get(),
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

//! Data aborts from the guest (ESR_EL2.EC = 0x24): a stage-2 fault on an emulated device is
//! one MMIO access, routed by `vm::bus` to the device that owns the IPA; anything else is the
//! abort the guest would have taken.

use super::inject::inject_abort;
use super::{reg_read, reg_write};
use crate::arch::hw::Machine;
use crate::arch::{hv, iommu, uart};
use crate::esr::{fault_ipa, instruction_length, DataAbort};
use crate::hw::Ipa;
use crate::mmio::AccessWidth;
use crate::profile::{Kind, Laps, Stage, Timed};
use crate::vm::bus::{self, Target};
use crate::vm::irq::{self, VmIrqs};
use crate::vm::ram::RamFault;
use crate::vm::Vm;
use aarch64_cpu::registers::{Readable, FAR_EL2, HPFAR_EL2};
use boot::TrapFrame;

pub(super) fn handle_data_abort(
    vm: &Vm,
    vcpu: usize,
    frame: &mut TrapFrame,
    esr: u64,
    laps: &impl Laps,
) {
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
    // A block of its RAM not mapped yet in this boot (any instruction, any width, a stage-1
    // table walk): zeroed, mapped, retried.
    if !ram_fault(vm, ipa, da.dfsc) {
        return;
    }
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
    let result = mmio_access(vm, vcpu, ipa, da.width, da.write.then_some(value), laps);
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

/// A stage-2 fault (fault status code `fsc`) at `ipa`: `true` if it is not the VM's RAM's
/// (the caller goes on); otherwise its block is zeroed and mapped (`vm::ram`), and the access
/// is retried, or the VM is stopped if that failed.
pub(super) fn ram_fault(vm: &Vm, ipa: Ipa, fsc: u8) -> bool {
    match vm.ram_fault(ipa, crate::esr::is_translation_fault_code(fsc), &Machine) {
        RamFault::NotRam => true,
        RamFault::Retry => false,
        RamFault::Failed(e) => {
            log::error!(
                "{}: RAM at {ipa:#x} could not be zeroed and mapped: {e}",
                vm.config.name
            );
            super::stop_vm(vm, "its RAM could not be mapped");
            false
        }
    }
}

/// Emulates one access to the VM's devices (`vm::bus` says which). `None` if nothing lives at
/// `ipa`.
pub(super) fn mmio_access(
    vm: &Vm,
    vcpu: usize,
    ipa: Ipa,
    width: AccessWidth,
    write: Option<u64>,
    laps: &impl Laps,
) -> Option<u64> {
    let ecam = |segment: usize| hv().iommu.ecam(segment);
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
        Target::Ecam(bridge, off) => {
            let Some(pci) = vm.pci.get(bridge) else {
                return Some(u64::MAX);
            };
            let Some(mut ecam) = ecam(pci.segment) else {
                return Some(u64::MAX);
            };
            let mut vecam = pci.vecam.lock();
            match write {
                Some(v) => {
                    vecam.write(&mut ecam, off, width, v);
                    let moves = vecam.take_bar_moves();
                    let dma = vecam.take_dma_request();
                    drop(vecam);
                    if !moves.is_empty() && vm.apply_bar_moves(bridge, &moves) {
                        vm.invalidate_tlbs(&Machine);
                    }
                    if dma {
                        // Bus Master Enable, held: the VM's RAM all zeroed and mapped first.
                        // `Ok(false)`: a reset or stop began; this vCPU parks on its way out.
                        if let Err(e) = vm.open_dma(&Machine, |s| hv().iommu.ecam(s)) {
                            log::error!(
                                "{}: bus mastering refused: its RAM could not be zeroed and mapped: {e}",
                                vm.config.name
                            );
                            super::stop_vm(vm, "its RAM could not be mapped for DMA");
                        }
                    }
                    0
                }
                None => vecam.read(&ecam, off, width),
            }
        }
        Target::Vsmmu(index, off) => {
            let s = vm.vsmmus.get(index)?;
            let size = width.bytes() as u8;
            match write {
                None => {
                    laps.kind(Kind::RegRead);
                    laps.enter(Stage::Model);
                    let v = s.read(off, size);
                    laps.enter(Stage::Complete);
                    v
                }
                Some(v) => {
                    if off == smmu::regs::SMMU_CMDQ_PROD {
                        laps.kind(Kind::CmdqProd);
                    }
                    let irqs = VmIrqs {
                        vm,
                        hw: &Machine,
                        here: Some(vcpu),
                    };
                    let mut phys = Timed {
                        inner: iommu::PhysSmmu(s.unit),
                        laps,
                    };
                    if !s.write(off, size, v, vm.ram(), &mut phys, &irqs) {
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
        Target::Viommu(index, off) => {
            let v = vm.viommus.get(index)?;
            let size = width.bytes() as u8;
            match write {
                None => v.read(off, size),
                Some(val) => {
                    let irqs = VmIrqs {
                        vm,
                        hw: &Machine,
                        here: Some(vcpu),
                    };
                    let mut phys = iommu::PhysSmmu(v.unit);
                    v.write(off, size, val, &mut vm.ram(), &mut phys, &irqs);
                    0
                }
            }
        }
        Target::Vits(off) => super::vits::access(vm, off, width, write)?,
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
            let phys = vm.resolve_pci(ecam, ipa, width)?;
            iommu::forward_access(phys, width, write)
        }
    })
}

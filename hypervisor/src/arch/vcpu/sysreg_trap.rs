//! Trapped MSR/MRS (ESR_EL2.EC = 0x18): SGIs, ID registers, ACTLR_EL1, RAS records, and the
//! debug, PMU and physical-timer registers a guest sees as absent.

use super::inject::inject_undef;
use super::{reg_read, reg_write};
use crate::arch::hw::Machine;
use crate::arch::sysreg;
use crate::esr::{instruction_length, SysRegAccess, SysRegId};
use crate::idregs;
use crate::vm::irq;
use crate::vm::Vm;
use aarch64_cpu::registers::{Readable, ACTLR_EL1};
use boot::TrapFrame;

pub(super) fn handle_sysreg(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, esr: u64) {
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
                reg_write(frame, acc.rt, ACTLR_EL1.get());
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

//! The hardware port ([`crate::hw::Hw`]) on the machine: the GICv3 CPU interface and
//! redistributors, the virtual CPU interface's list registers, TLB maintenance, the physical
//! SMMU's command queue and the system counter.

use super::gic::Gic;
use super::{hv, sysreg, this_cpu};
use crate::hw::{Hw, IntId};
use aarch64_cpu::registers::{
    Readable, Writeable, CNTFRQ_EL0, CNTPCT_EL0, ICH_HCR_EL2, ICH_VTR_EL2,
};

/// The machine itself.
#[derive(Debug, Clone, Copy)]
pub struct Machine;

impl Hw for Machine {
    fn this_cpu(&self) -> usize {
        this_cpu()
    }

    fn enable_spi(&self, intid: IntId, pcpu: usize) {
        hv().gic.enable_spi(intid.0, hv().cpus[pcpu].mpidr);
    }

    fn disable_spi(&self, intid: IntId) {
        hv().gic.disable_spi(intid.0);
    }

    fn set_ppi_enabled(&self, pcpu: usize, intid: IntId, enabled: bool) {
        hv().gic
            .set_private_enabled(hv().cpus[pcpu].redist(), intid.0, enabled);
    }

    fn clear_ppi_active(&self, pcpu: usize, intid: IntId) {
        hv().gic
            .clear_private_active(hv().cpus[pcpu].redist(), intid.0);
    }

    fn deactivate(&self, intid: IntId) {
        Gic::deactivate(intid.0);
    }

    fn kick(&self, pcpu: usize) {
        Gic::send_sgi(crate::vm::irq::KICK_SGI.0, hv().cpus[pcpu].mpidr);
    }

    fn wake_all(&self) {
        sysreg::sev();
    }

    fn lr_count(&self) -> usize {
        ICH_VTR_EL2.read(ICH_VTR_EL2::ListRegs) as usize + 1
    }

    fn read_lr(&self, i: usize) -> u64 {
        sysreg::ich_lr(i)
    }

    fn write_lr(&self, i: usize, value: u64) {
        sysreg::set_ich_lr(i, value);
    }

    fn read_ich_hcr(&self) -> u64 {
        ICH_HCR_EL2.get()
    }

    fn write_ich_hcr(&self, value: u64) {
        ICH_HCR_EL2.set(value);
    }

    fn tlbi_vm(&self, vttbr: u64) {
        sysreg::tlbi_vmid(vttbr);
    }

    fn smmu_tlbi_vmid(&self, vmid: u16) {
        super::iommu::invalidate_vm_tlbs(vmid);
    }

    fn stage2_published(&self) {
        super::sysreg::dsb_ishst();
    }

    fn log_context(&self, vm: Option<usize>) -> Option<usize> {
        super::uart::set_log_vm(vm)
    }

    fn counter(&self) -> u64 {
        CNTPCT_EL0.get()
    }

    fn counter_freq(&self) -> u64 {
        CNTFRQ_EL0.get()
    }
}

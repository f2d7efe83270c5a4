//! The virtual devices a VM's guest sees, each a state machine behind `read(offset)` /
//! `write(offset, value)` (rust-vmm vm-superio's shape): the vGICv3, the vPL011 and its console
//! input backlog, the virtual ECAM, the virtual ITS model, the glue to the emulated SMMUv3
//! (`smmu::vsmmu`), a generic virtio-mmio transport with its split virtqueues ([`virtio`]) and
//! the virtio-iommu on it ([`viommu`]). A device is
//! given what it needs — guest RAM, an [`IrqPort`] to raise its interrupt lines — never the
//! whole VM, so it builds and is tested on the host and knows nothing of vCPUs or CPUs.

pub mod console;
pub mod vecam;
pub mod vgic;
pub mod viommu;
pub mod virtio;
pub mod vits;
pub mod vpl011;
pub mod vsmmu;

use crate::hw::IntId;

/// Where a device raises its interrupt lines: the VM's vGIC, which makes the line pending for
/// the vCPU it targets and wakes that vCPU (`vm::irq::VmIrqs` on the machine).
pub trait IrqPort {
    /// Makes edge-triggered SPI `intid` pending.
    fn raise(&self, intid: IntId);
}

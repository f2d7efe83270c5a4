//! The MMIO bus of a VM's IPA space: which emulated device a trapped access at an IPA belongs
//! to, and at what offset. Nothing here is mapped in stage 2; everything that is (RAM, assigned
//! BAR pages) never traps.

use super::Vm;
use crate::devices::vgic::GICR_FRAME_SIZE;
use crate::hw::Ipa;
use crate::pci::{PciSpace, PciWindow};

/// The device a trapped access goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The vGIC distributor, at this offset.
    Gicd(u64),
    /// vCPU `vcpu`'s vGIC redistributor frame, at this offset in it.
    Gicr {
        /// The vCPU whose frame it is.
        vcpu: usize,
        /// Offset in the frame.
        off: u64,
    },
    /// The virtual ECAM of the VM's host bridge with this index in `Vm::pci`, at this offset
    /// (bus/device/function/register).
    Ecam(usize, u64),
    /// The register pages of the VM's vSMMU with this index in `Vm::vsmmus`, at this offset.
    Vsmmu(usize, u64),
    /// The register frame of the VM's virtio-iommu with this index in `Vm::viommus`, at this
    /// offset.
    Viommu(usize, u64),
    /// The control frame of the VM's vITS, at this offset.
    Vits(u64),
    /// The vPL011, at this offset.
    Uart(u64),
    /// The VM's PCI windows where its stage 2 maps nothing (its I/O BARs, memory BARs it
    /// placed where they cannot be mapped): forwarded inside its own functions' BARs only.
    Pci,
}

fn within(base: u64, size: u64, ipa: Ipa) -> Option<u64> {
    ipa.offset_from(Ipa(base)).filter(|&off| off < size)
}

/// Which device `ipa` belongs to, in the order the devices are tried (distributor, then
/// redistributors, ECAM, vSMMU, virtio-iommu, vITS, UART, PCI windows): `None` when nothing lives there.
pub fn route(vm: &Vm, ipa: Ipa) -> Option<Target> {
    if let Some(off) = within(vm.gicd.base, vm.gicd.size, ipa) {
        return Some(Target::Gicd(off));
    }
    if let Some(off) = within(vm.gicr.base, vm.gicr.size, ipa) {
        return Some(Target::Gicr {
            vcpu: (off / GICR_FRAME_SIZE) as usize,
            off: off % GICR_FRAME_SIZE,
        });
    }
    if let Some((i, off)) = vm
        .pci
        .iter()
        .enumerate()
        .find_map(|(i, p)| within(p.ecam.base, p.ecam.size, ipa).map(|off| (i, off)))
    {
        return Some(Target::Ecam(i, off));
    }
    if let Some((i, off)) = vm
        .vsmmus
        .iter()
        .enumerate()
        .find_map(|(i, s)| within(s.regs.base, s.regs.size, ipa).map(|off| (i, off)))
    {
        return Some(Target::Vsmmu(i, off));
    }
    if let Some((i, off)) = vm
        .viommus
        .iter()
        .enumerate()
        .find_map(|(i, v)| within(v.regs.base, v.regs.size, ipa).map(|off| (i, off)))
    {
        return Some(Target::Viommu(i, off));
    }
    if let Some(off) = vm.its.as_ref().and_then(|i| i.control_offset(ipa)) {
        return Some(Target::Vits(off));
    }
    if let Some(off) = within(vm.uart.base, vm.uart.size, ipa) {
        return Some(Target::Uart(off));
    }
    vm.pci
        .iter()
        .find_map(|p| pci_window(&p.windows, ipa))
        .map(|_| Target::Pci)
}

/// The PCI I/O or memory window holding `ipa`: (whether it is I/O space, the bus address).
pub fn pci_window(windows: &[PciWindow], ipa: Ipa) -> Option<(bool, u64)> {
    let (w, off) = windows
        .iter()
        .filter(|w| w.space != PciSpace::Config)
        .find_map(|w| within(w.cpu_base, w.size, ipa).map(|off| (w, off)))?;
    let bus = off.checked_add(w.pci_base)?;
    Some((w.space == PciSpace::Io, bus))
}

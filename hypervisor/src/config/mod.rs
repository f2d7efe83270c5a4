//! Static partitioning: which VMs to run, read from `/chosen` of the host DT.
//!
//! The binding follows Xen's dom0less one (domain nodes under `/chosen` with `cpus`, `memory`
//! in KiB, and `multiboot,kernel` / `multiboot,ramdisk` module children), with our own
//! `smmu-hv,*` properties for naming, CPU pinning and static memory:
//!
//! ```text
//! chosen {
//!     vm0 {
//!         compatible = "smmu-hv,vm";
//!         #address-cells = <2>; #size-cells = <2>;   /* default 2/2 */
//!         smmu-hv,name = "vm0";                      /* optional, else the node name */
//!         cpus = <2>;                                /* vCPU count */
//!         smmu-hv,cpus = <0x0 0x1>;                  /* optional MPIDR per vCPU */
//!         memory = <0x0 0x100000>;                   /* KiB, 64-bit */
//!         smmu-hv,static-mem = <0x1 0x0 0x0 0x40000000>; /* optional base/size */
//!         module@4a000000 { compatible = "multiboot,kernel", "multiboot,module";
//!                           reg = <...>; bootargs = "..."; };
//!         module@50000000 { compatible = "multiboot,ramdisk", "multiboot,module"; reg = <...>; };
//!     };
//! };
//! ```
//!
//! Reading happens in two steps: [`parse_vm_specs`] turns each node into a [`VmSpec`] (only
//! what the node itself says), then [`plan_vms`] checks every spec against the machine and the
//! VMs accepted before it and decides where each VM's CPUs and RAM are. A bad VM is refused on
//! its own, with a [`ConfigError`] naming it and the offending property, so one typo in one
//! node does not keep the other VMs from booting.
//!
//! Xen's own `compatible = "xen,domain"` nodes are VMs too, when `/chosen` says
//! `smmu-hv,xen-dom0less;` (see `xen.rs` for what each Xen property becomes), and `/chosen`
//! carries the hypervisor's own command line ([`parse_hv_bootargs`]).

use alloc::string::String;
use alloc::vec::Vec;

use crate::platform::MemRange;

mod error;
mod parse;
mod plan;
#[cfg(test)]
mod tests;
mod xen;
#[cfg(test)]
mod xen_tests;

/// The command line is read with the platform (it picks the console); re-exported for the
/// config's readers.
pub use crate::platform::{hv_options, parse_hv_bootargs, HvOptions};
pub use error::ConfigError;
pub use parse::{parse_vm_specs, parse_vm_specs_noted};
pub use plan::plan_vms;

/// What [`parse_vm_specs_noted`] reads: one result per VM node, and the lines to log.
pub type NotedSpecs = (Vec<Result<VmSpec, ConfigError>>, Vec<(log::Level, String)>);

/// A boot module (an image the boot loader placed in memory) as a VM node names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Where the image is in physical memory.
    pub range: MemRange,
    /// The module's `bootargs` (the kernel command line, for a kernel).
    pub bootargs: Option<String>,
}

/// What one VM node says, before any machine-level checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// `smmu-hv,name`, or the node name.
    pub name: String,
    /// `cpus`: number of vCPUs (0 if the node says 0; [`plan_vms`] refuses that).
    pub vcpus: u32,
    /// `smmu-hv,cpus`: the MPIDR of the physical CPU each vCPU is pinned to, in vCPU order.
    pub pcpus: Option<Vec<u64>>,
    /// `memory`, converted from KiB to bytes.
    pub mem_size: u64,
    /// `smmu-hv,static-mem`: where the VM's RAM must be.
    pub static_mem: Option<MemRange>,
    /// The `multiboot,kernel` module child.
    pub kernel: Option<ModuleSpec>,
    /// The `multiboot,ramdisk` module child.
    pub ramdisk: Option<MemRange>,
    /// `smmu-hv,pci-devices`: the physical PCI functions the VM owns (domain 0 where the
    /// string names none).
    pub pci_devices: Vec<crate::pci::PciAddr>,
    /// `smmu-hv,intx-only`: its functions keep INTx and never see MSI or MSI-X, even where
    /// the machine has an ITS (no virtual ITS for the VM).
    pub intx_only: bool,
    /// `smmu-hv,iommu`: the IOMMU its guest sees over its PCI functions.
    pub iommu: IommuKind,
    /// Xen's `domain-cpupool`: the CPUs its vCPUs are taken from when `smmu-hv,cpus` does not
    /// pin them.
    pub cpupool: Option<CpuPool>,
}

/// A Xen boot-time cpupool (`xen,cpupool`, Xen's `docs/misc/arm/device-tree/cpupools.txt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuPool {
    /// Its node's path, for messages.
    pub path: String,
    /// The MPIDR (`reg`) of each CPU node its `cpupool-cpus` names, in that order.
    pub mpidrs: Vec<u64>,
}

/// The IOMMU a VM's guest drives for its PCI functions (`smmu-hv,iommu`). Either way the
/// physical SMMU nests the guest's translation over the VM's stage 2, so a function reaches only
/// its VM's memory; what differs is the interface and who writes the stage-1 tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuKind {
    /// `"smmuv3"` (the default): an emulated stage-1 SMMUv3 per physical SMMU, its tables in
    /// the guest's RAM, driven by Linux's `arm-smmu-v3`.
    #[default]
    Smmuv3,
    /// `"virtio-iommu"`: a paravirtual virtio-iommu over virtio-mmio per physical SMMU, whose
    /// stage-1 tables the hypervisor writes from the guest's MAP/UNMAP requests (Linux's
    /// `virtio_iommu`).
    VirtioIommu,
}

impl IommuKind {
    /// The property value naming it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Smmuv3 => "smmuv3",
            Self::VirtioIommu => "virtio-iommu",
        }
    }

    /// The kind a property value names.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Smmuv3, Self::VirtioIommu]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// The host resources VMs are carved from.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// MPIDR of each CPU, indexed by logical CPU number.
    pub cpus: &'a [u64],
    /// Usable RAM.
    pub ram: &'a [MemRange],
    /// Memory nothing may overlap: the hypervisor image, the DTB, reserved memory. Must not
    /// include the boot modules themselves (they are checked against this list).
    pub busy: &'a [MemRange],
    /// The hypervisor image (checked separately so errors can say so).
    pub hypervisor: MemRange,
}

/// An accepted VM: everything it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    /// The VM's name, unique among accepted VMs.
    pub name: String,
    /// Logical index of the physical CPU each vCPU runs on, in vCPU order.
    pub pcpus: Vec<usize>,
    /// Physical base of the VM's RAM.
    pub ram_pa: u64,
    /// Size of the VM's RAM in bytes.
    pub ram_size: u64,
    /// The kernel image.
    pub kernel: ModuleSpec,
    /// The initramfs image, if any.
    pub ramdisk: Option<MemRange>,
    /// The physical PCI functions it owns (checked against IOMMU groups by the caller, who
    /// knows the PCI topology).
    pub pci_devices: Vec<crate::pci::PciAddr>,
    /// `smmu-hv,intx-only`.
    pub intx_only: bool,
    /// `smmu-hv,iommu`.
    pub iommu: IommuKind,
}

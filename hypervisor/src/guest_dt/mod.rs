//! The device tree a guest boots with, describing the virtual machine rather than the host.
//!
//! The layout follows QEMU's `virt` board (root compatible `linux,dummy-virt`, `intc`,
//! `pl011`, `apb-pclk` node names) so a stock arm64 kernel needs nothing special, but every
//! address and interrupt comes from [`GuestDtConfig`].

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use vm_fdt::FdtWriter;

use crate::pci::{Bdf, IntxPin, PciSpace, PciWindow};
use crate::platform::{MemRange, TimerInfo};

mod host_bridge;
#[cfg(test)]
mod tests;
mod validate;
mod vsmmu;

use host_bridge::pci_node;
use validate::validate;
use vsmmu::smmu_node;

/// Everything that varies between guests' device trees.
#[derive(Clone, Copy, Debug)]
pub struct GuestDtConfig<'a> {
    /// Name of the VM: `/chosen/hypervisor,vm-name` and the root `model`.
    pub vm_name: &'a str,
    /// MPIDR of each vCPU, in the order the vCPUs are numbered.
    pub vcpu_mpidrs: &'a [u64],
    /// Guest RAM (IPA range).
    pub ram: MemRange,
    /// Virtual GIC distributor frame.
    pub gicd: MemRange,
    /// Virtual GIC redistributor region (one frame pair per vCPU).
    pub gicr: MemRange,
    /// INTID of the GIC maintenance interrupt as seen by the guest (a PPI).
    pub maintenance_ppi: u32,
    /// Timer PPIs (INTIDs) and their trigger flags.
    pub timer: TimerInfo,
    /// Virtual PL011 frame.
    pub uart: MemRange,
    /// INTID of the virtual PL011 (an SPI).
    pub uart_intid: u32,
    /// PSCI conduit the guest must use: `hvc` if true, else `smc` (both trap to EL2).
    pub psci_method_hvc: bool,
    /// Kernel command line.
    pub bootargs: &'a str,
    /// Where the initrd was loaded in guest RAM, if there is one.
    pub initrd: Option<MemRange>,
    /// How many times the VM has booted before this boot (0 on the first):
    /// `/chosen/hypervisor,boot-count`, so a guest can tell a reboot from a first boot.
    pub boot_count: u32,
    /// The VM's virtual PCI host bridges (one per physical bridge its functions sit behind;
    /// empty without assigned PCI functions).
    pub pci: &'a [GuestPci<'a>],
    /// The VM's emulated SMMUv3s, one per physical SMMU its functions sit behind (empty if
    /// none). With [`Self::pci`] too, the host bridge's `iommu-map` sends each RID to the
    /// vSMMU over the physical SMMU the host's map sends it to, with the host's StreamID.
    pub smmus: &'a [GuestSmmu],
    /// The VM's virtual ITS, if it has one: an `arm,gic-v3-its` child of the GIC node, and an
    /// `msi-map` onto it on every host bridge ([`GuestPci::msi_map`]). Without one, no MSI
    /// controller is described and the guest's functions use INTx.
    pub its: Option<GuestIts>,
}

/// The VM's virtual GICv3 ITS (`devices::vits`), described as QEMU `virt` describes its ITS
/// (`fdt_add_its_gic_node`): a child `its@<base>` of the GIC node with compatible
/// "arm,gic-v3-its", `msi-controller` and `#msi-cells = <1>` (the DeviceID; Linux
/// `Documentation/devicetree/bindings/interrupt-controller/arm,gic-v3.yaml`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestIts {
    /// Guest IPA of the ITS control frame (GITS_CTLR...); the translation frame holding
    /// GITS_TRANSLATER follows it at +0x1_0000.
    pub base: u64,
    /// Bytes of the two frames: [`GUEST_ITS_SIZE`] at least.
    pub size: u64,
}

/// The control and translation frames of a GICv3 ITS, 64 KiB each (IHI 0069: ITS register
/// map); QEMU `virt` gives its ITS this size.
pub const GUEST_ITS_SIZE: u64 = 0x2_0000;

/// The VM's emulated SMMUv3 (the vSMMU), described by an `arm,smmu-v3` node (Linux
/// `Documentation/devicetree/bindings/iommu/arm,smmu-v3.yaml`) shaped like QEMU `virt`'s.
///
/// Only the two interrupts Linux's `arm-smmu-v3` driver needs from a vSMMU without PRI and
/// with CMD_SYNC completion by polling are listed: `priq` and `cmdq-sync` are optional in the
/// binding and the driver never requests `cmdq-sync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSmmu {
    /// Register frame (pages 0 and 1: 0x20000 bytes at least), guest IPA.
    pub regs: MemRange,
    /// SPI INTID of the event queue interrupt (`eventq`).
    pub eventq_intid: u32,
    /// SPI INTID of the global error interrupt (`gerror`).
    pub gerror_intid: u32,
    /// The phandle of the physical SMMU it sits on, as the host bridge's `iommu-map` entries
    /// name it: the guest's entries naming this vSMMU are those.
    pub host_phandle: Option<u32>,
    /// What the guest sees there: an `arm,smmu-v3` node, or (`IommuKind::VirtioIommu`) a
    /// `virtio,mmio` node of the VM's virtio-iommu (`regs` its 0x200-byte register frame and
    /// `eventq_intid` its one interrupt; `gerror_intid` unused), which the host bridges'
    /// `iommu-map` names the same way.
    pub kind: crate::config::IommuKind,
}

/// The VM's virtual ECAM host bridge (see [`crate::devices::vecam::VirtualEcam`]), described by a
/// `pci-host-ecam-generic` node (Linux `Documentation/devicetree/bindings/pci/
/// host-generic-pci.yaml`).
#[derive(Clone, Copy, Debug)]
pub struct GuestPci<'a> {
    /// Its PCI domain (`linux,pci-domain`): the physical bridge's, so that the guest's
    /// addresses of its functions read as the host's.
    pub domain: u16,
    /// Guest IPA range of the VM's ECAM window: 1 MiB per bus of `bus_range`.
    pub ecam: MemRange,
    /// First and last bus number; offset 0 of the window is the first bus.
    pub bus_range: (u8, u8),
    /// The address windows, as the host bridge has them (`HostBridge::windows`), with CPU
    /// addresses as the guest sees them (IPA).
    pub ranges: &'a [PciWindow],
    /// One entry per assigned function that has an interrupt pin: the function, its pin, the
    /// GIC INTID (an SPI) that the pin raises in the VM, and where the pin reaches the host
    /// bridge (the function on the root bus it goes through and the pin there, swizzled at
    /// each bridge: `pci::VmDevices::intx`), which the `interrupt-map` is keyed on.
    pub intx: &'a [(Bdf, IntxPin, u32, (Bdf, IntxPin))],
    /// The host bridge's `iommu-map` entries onto the SMMUs the VM's vSMMUs sit on: the
    /// guest's map repeats them, each onto the vSMMU over the SMMU it names, so a function's
    /// StreamID is the same on both sides. Empty means StreamID = RID over the whole RID space
    /// (a VM with one vSMMU only).
    pub iommu_map: &'a [crate::pci::IommuMapEntry],
    /// The host bridge's `iommu-map-mask`, repeated for the same reason.
    pub iommu_map_mask: Option<u32>,
    /// The host bridge's `msi-map` entries (`HostBridge::msi_map`), repeated onto the VM's
    /// virtual ITS when it has one ([`GuestDtConfig::its`]): the guest's DeviceID of a
    /// function is then the host's, so the vITS can take a guest MAPD's DeviceID as the
    /// physical one (`devices::vits`). Empty means DeviceID = RID over the whole RID space, as
    /// on QEMU `virt`. Must be empty without an ITS.
    pub msi_map: &'a [crate::pci::MsiMapEntry],
    /// The host bridge's `msi-map-mask`, repeated for the same reason (only with an ITS).
    pub msi_map_mask: Option<u32>,
}

/// Why a guest DT could not be built.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestDtError {
    /// The configuration lists no vCPUs.
    #[error("guest has no vCPUs")]
    NoVcpus,
    /// A vCPU MPIDR has bits outside Aff3..Aff0, which Linux rejects as a CPU `reg`.
    #[error("vCPU MPIDR {0:#x} has bits outside the affinity fields")]
    BadMpidr(u64),
    /// Two vCPUs share an MPIDR, which would give two nodes the same name.
    #[error("vCPU MPIDR {0:#x} is used twice")]
    DuplicateMpidr(u64),
    /// A memory range is empty or wraps past the top of the address space.
    #[error("{what}: range {base:#x}+{size:#x} is empty or wraps")]
    BadRange {
        /// Which range.
        what: &'static str,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The initrd does not lie inside guest RAM.
    #[error("initrd {base:#x}+{size:#x} is not inside guest RAM")]
    InitrdOutsideRam {
        /// Initrd base.
        base: u64,
        /// Initrd size.
        size: u64,
    },
    /// An INTID is not of the kind its device needs (SPI for the UART, PCI INTx and the
    /// vSMMU, PPI otherwise).
    #[error("{what}: INTID {intid} is not a {expected}")]
    BadIntid {
        /// Which interrupt.
        what: &'static str,
        /// The offending INTID.
        intid: u32,
        /// "SPI" or "PPI".
        expected: &'static str,
    },
    /// The PCI `bus-range` is empty (start after end).
    #[error("PCI bus range {start:#04x}-{end:#04x} is empty")]
    BadBusRange {
        /// First bus.
        start: u8,
        /// Last bus.
        end: u8,
    },
    /// The PCI ECAM window does not hold 1 MiB per bus of the bus range.
    #[error("PCI ECAM window of {size:#x} bytes is too small for {buses} buses")]
    EcamTooSmall {
        /// Size of the window.
        size: u64,
        /// Number of buses in the bus range.
        buses: u32,
    },
    /// A PCI window is configuration space, empty, wraps, or is an I/O or 32-bit window
    /// above 4 GiB on the bus, none of which a `ranges` entry can describe.
    #[error("PCI window {pci_base:#x}+{size:#x} ({space:?}) cannot be described")]
    BadPciWindow {
        /// Its address space.
        space: PciSpace,
        /// First PCI address.
        pci_base: u64,
        /// Size in bytes.
        size: u64,
    },
    /// Two functions of one slot route the same pin to different SPIs, which an
    /// `interrupt-map` keyed on (slot, pin) cannot say.
    #[error("PCI slot {slot:#04x} pin {pin:?} routed to both INTID {first} and {second}")]
    ConflictingIntx {
        /// Device (slot) number.
        slot: u8,
        /// The pin.
        pin: IntxPin,
        /// The INTID of the first entry.
        first: u32,
        /// The INTID of the conflicting entry.
        second: u32,
    },
    /// Two interrupts that must be separate lines were given the same INTID.
    #[error("INTID {intid} is used for both {first} and {second}")]
    SharedIntid {
        /// The INTID.
        intid: u32,
        /// The first user.
        first: &'static str,
        /// The second user.
        second: &'static str,
    },
    /// Two virtual host bridges share a domain or overlap.
    #[error(
        "the virtual host bridges at {first:#x} and {second:#x} share a domain or an ECAM range"
    )]
    BridgesClash {
        /// The first one's ECAM base.
        first: u64,
        /// The second one's.
        second: u64,
    },
    /// Two vSMMUs' register frames overlap.
    #[error("the vSMMUs at {first:#x} and {second:#x} overlap")]
    SmmusOverlap {
        /// The first one's base.
        first: u64,
        /// The second one's base.
        second: u64,
    },
    /// The ITS frames overlap another range of the guest's address map.
    #[error("the ITS at {its:#x} overlaps the {what} at {base:#x}")]
    ItsOverlaps {
        /// The ITS base.
        its: u64,
        /// What it overlaps.
        what: &'static str,
        /// That range's base.
        base: u64,
    },
    /// A host bridge has `msi-map` entries but the VM has no ITS for them to name.
    #[error("the virtual host bridge at {0:#x} has msi-map entries and the VM has no ITS")]
    MsiMapWithoutIts(u64),
    /// An `msi-map` entry is empty or reaches past the RID or DeviceID space.
    #[error("msi-map entry {rid_base:#x}+{len:#x} (DeviceID {devid_base:#x}) is empty or wraps")]
    BadMsiMap {
        /// Its first RID.
        rid_base: u32,
        /// Its first DeviceID.
        devid_base: u32,
        /// Its length.
        len: u32,
    },
    /// Several vSMMUs and a host bridge with no `iommu-map` to say which RIDs go to which.
    #[error("{0} vSMMUs, and the host bridge has no iommu-map to divide the RIDs between them")]
    NoIommuMap(usize),
    /// The FDT writer rejected something (e.g. a NUL inside `vm_name` or `bootargs`).
    #[error("FDT writer: {0}")]
    Writer(vm_fdt::Error),
}

// Manual because `vm_fdt::Error` only implements `Error` with its `std` feature, and
// thiserror's `#[from]` would also make it the `source()`.
impl From<vm_fdt::Error> for GuestDtError {
    fn from(e: vm_fdt::Error) -> Self {
        Self::Writer(e)
    }
}

const GIC_PHANDLE: u32 = 1;
const CLK_PHANDLE: u32 = 2;
/// The first vSMMU's phandle; the others follow.
const SMMU_PHANDLE: u32 = 3;

/// The phandle of the VM's vSMMU with index `i` (guest phandles are the hypervisor's to pick).
const fn smmu_phandle(i: usize) -> u32 {
    SMMU_PHANDLE + i as u32
}

/// The ITS's phandle: the first after the vSMMUs', so it collides with none of them however
/// many there are.
const fn its_phandle(smmus: usize) -> u32 {
    smmu_phandle(smmus)
}
/// Interrupt type cells of the GIC binding.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// `IRQ_TYPE_EDGE_RISING`.
const EDGE_RISING: u32 = 1;
/// `IRQ_TYPE_LEVEL_HIGH`.
const LEVEL_HIGH: u32 = 4;
/// The PL011 reference clock QEMU's `virt` advertises; our vPL011 ignores baud rates anyway.
const APB_PCLK_HZ: u32 = 24_000_000;

/// Builds the guest's DTB.
pub fn build_guest_dt(cfg: &GuestDtConfig) -> Result<Vec<u8>, GuestDtError> {
    validate(cfg)?;
    let mut w = FdtWriter::new()?;
    let root = w.begin_node("")?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_string("model", cfg.vm_name)?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let uart_path = format!("/pl011@{:x}", cfg.uart.base);
    let chosen = w.begin_node("chosen")?;
    w.property_string("bootargs", cfg.bootargs)?;
    w.property_string("stdout-path", &uart_path)?;
    w.property_string("hypervisor,vm-name", cfg.vm_name)?;
    w.property_u32("hypervisor,boot-count", cfg.boot_count)?;
    if let Some(s) = cfg.smmus.first() {
        // Which IOMMU driver the guest's init loads ("smmuv3" or "virtio-iommu"); a VM has
        // one kind (`smmu-hv,iommu`).
        w.property_string("hypervisor,iommu", s.kind.as_str())?;
    }
    if let Some(initrd) = cfg.initrd {
        w.property_u64("linux,initrd-start", initrd.base)?;
        w.property_u64("linux,initrd-end", initrd.end())?;
    }
    if !cfg.pci.is_empty() {
        // Linux (`of_pci_check_probe_only`) then keeps the BARs as found instead of
        // reassigning them: the hypervisor placed them and mapped them into stage-2, and the
        // virtual ECAM refuses moves anyway.
        w.property_u32("linux,pci-probe-only", 1)?;
    }
    w.end_node(chosen)?;

    // Without an alias Linux would still call the UART ttyAMA0, but only by luck of probe order.
    let aliases = w.begin_node("aliases")?;
    w.property_string("serial0", &uart_path)?;
    w.end_node(aliases)?;

    let memory = w.begin_node(&format!("memory@{:x}", cfg.ram.base))?;
    w.property_string("device_type", "memory")?;
    w.property_array_u64("reg", &[cfg.ram.base, cfg.ram.size])?;
    w.end_node(memory)?;

    cpus(&mut w, cfg.vcpu_mpidrs)?;

    let psci = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    w.property_string("method", if cfg.psci_method_hvc { "hvc" } else { "smc" })?;
    w.end_node(psci)?;

    let gic = w.begin_node(&format!("intc@{:x}", cfg.gicd.base))?;
    w.property_string("compatible", "arm,gic-v3")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_null("interrupt-controller")?;
    if cfg.its.is_some() {
        // The ITS child's `reg` is in the root's address space: 2 cells each and an identity
        // `ranges`, as on QEMU `virt`. Every `interrupt-map` entry naming the GIC then
        // carries 2 parent unit-address cells (Linux `of_irq_parse_raw` reads the parent's
        // #address-cells).
        w.property_u32("#address-cells", 2)?;
        w.property_u32("#size-cells", 2)?;
        w.property_null("ranges")?;
    } else {
        // No children; the explicit 0 is what an `interrupt-map` parent lookup (and dtc's
        // interrupt_provider check) expects of an interrupt controller.
        w.property_u32("#address-cells", 0)?;
    }
    w.property_u32("#redistributor-regions", 1)?;
    w.property_array_u64(
        "reg",
        &[cfg.gicd.base, cfg.gicd.size, cfg.gicr.base, cfg.gicr.size],
    )?;
    w.property_array_u32(
        "interrupts",
        &[GIC_PPI, cfg.maintenance_ppi - 16, LEVEL_HIGH],
    )?;
    w.property_phandle(GIC_PHANDLE)?;
    if let Some(its) = cfg.its {
        let node = w.begin_node(&format!("its@{:x}", its.base))?;
        w.property_string("compatible", "arm,gic-v3-its")?;
        w.property_null("msi-controller")?;
        // One cell: the DeviceID.
        w.property_u32("#msi-cells", 1)?;
        w.property_array_u64("reg", &[its.base, its.size])?;
        w.property_phandle(its_phandle(cfg.smmus.len()))?;
        w.end_node(node)?;
    }
    w.end_node(gic)?;

    let timer = w.begin_node("timer")?;
    w.property_string("compatible", "arm,armv8-timer")?;
    w.property_null("always-on")?;
    let mut irqs = Vec::with_capacity(12);
    for (intid, flags) in cfg.timer.intids.iter().zip(cfg.timer.flags) {
        irqs.extend_from_slice(&[GIC_PPI, intid - 16, flags]);
    }
    w.property_array_u32("interrupts", &irqs)?;
    w.end_node(timer)?;

    let clk = w.begin_node("apb-pclk")?;
    w.property_string("compatible", "fixed-clock")?;
    w.property_u32("#clock-cells", 0)?;
    w.property_u32("clock-frequency", APB_PCLK_HZ)?;
    w.property_string("clock-output-names", "clk24mhz")?;
    w.property_phandle(CLK_PHANDLE)?;
    w.end_node(clk)?;

    // The node name must match `uart_path` above.
    let uart = w.begin_node(&uart_path[1..])?;
    w.property_string_list(
        "compatible",
        vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    w.property_array_u64("reg", &[cfg.uart.base, cfg.uart.size])?;
    w.property_array_u32("interrupts", &[GIC_SPI, cfg.uart_intid - 32, LEVEL_HIGH])?;
    w.property_array_u32("clocks", &[CLK_PHANDLE, CLK_PHANDLE])?;
    w.property_string_list(
        "clock-names",
        vec![String::from("uartclk"), String::from("apb_pclk")],
    )?;
    w.end_node(uart)?;

    for (i, smmu) in cfg.smmus.iter().enumerate() {
        smmu_node(&mut w, smmu, smmu_phandle(i))?;
    }

    let its = cfg.its.map(|_| its_phandle(cfg.smmus.len()));
    for pci in cfg.pci {
        pci_node(&mut w, pci, cfg.smmus, its)?;
    }

    w.end_node(root)?;
    Ok(w.finish()?)
}

fn cpus(w: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), GuestDtError> {
    // One address cell is enough unless some vCPU uses Aff3.
    let wide = mpidrs.iter().any(|&m| m > u64::from(u32::MAX));
    let cpus = w.begin_node("cpus")?;
    w.property_u32("#address-cells", if wide { 2 } else { 1 })?;
    w.property_u32("#size-cells", 0)?;
    for &mpidr in mpidrs {
        let cpu = w.begin_node(&format!("cpu@{mpidr:x}"))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,armv8")?;
        if wide {
            w.property_u64("reg", mpidr)?;
        } else {
            // Checked just above: every MPIDR fits in 32 bits here.
            w.property_u32("reg", mpidr as u32)?;
        }
        w.property_string("enable-method", "psci")?;
        w.end_node(cpu)?;
    }
    w.end_node(cpus)?;
    Ok(())
}

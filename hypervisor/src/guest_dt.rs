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
    /// The VM's virtual PCI host bridge, if it has assigned PCI functions.
    pub pci: Option<GuestPci<'a>>,
    /// The VM's emulated SMMUv3, if it has one. With [`Self::pci`] too, the host bridge is
    /// placed behind it with StreamID = RequesterID.
    pub smmu: Option<GuestSmmu>,
}

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
}

/// The VM's virtual ECAM host bridge (see [`crate::devices::vecam::VirtualEcam`]), described by a
/// `pci-host-ecam-generic` node (Linux `Documentation/devicetree/bindings/pci/
/// host-generic-pci.yaml`).
#[derive(Clone, Copy, Debug)]
pub struct GuestPci<'a> {
    /// Guest IPA range of the VM's ECAM window: 1 MiB per bus of `bus_range`.
    pub ecam: MemRange,
    /// First and last bus number; offset 0 of the window is the first bus.
    pub bus_range: (u8, u8),
    /// The address windows, as the host bridge has them (`HostBridge::windows`), with CPU
    /// addresses as the guest sees them (IPA).
    pub ranges: &'a [PciWindow],
    /// One entry per assigned function that has an interrupt pin: the function, its pin, and
    /// the GIC INTID (an SPI) that the pin raises in the VM.
    pub intx: &'a [(Bdf, IntxPin, u32)],
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
const SMMU_PHANDLE: u32 = 3;
/// Interrupt type cells of the GIC binding.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// `IRQ_TYPE_EDGE_RISING`.
const EDGE_RISING: u32 = 1;
/// `IRQ_TYPE_LEVEL_HIGH`.
const LEVEL_HIGH: u32 = 4;
/// SMMUv3 register pages 0 and 1 (IHI 0070 chapter 6: two 64 KiB pages); the driver maps
/// both.
const SMMU_REGS_MIN: u64 = 0x2_0000;
/// MPIDR_EL1 Aff3 (39:32) and Aff2..Aff0 (23:0); everything else is not part of a CPU's id.
const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;
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
    if let Some(initrd) = cfg.initrd {
        w.property_u64("linux,initrd-start", initrd.base)?;
        w.property_u64("linux,initrd-end", initrd.end())?;
    }
    if cfg.pci.is_some() {
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
    // No children; the explicit 0 is what an `interrupt-map` parent lookup (and dtc's
    // interrupt_provider check) expects of an interrupt controller.
    w.property_u32("#address-cells", 0)?;
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

    if let Some(smmu) = &cfg.smmu {
        smmu_node(&mut w, smmu)?;
    }

    if let Some(pci) = &cfg.pci {
        pci_node(&mut w, pci, cfg.smmu.is_some())?;
    }

    w.end_node(root)?;
    Ok(w.finish()?)
}

/// `interrupt-map-mask`: the device number (phys.hi bits 15:11) and the pin. QEMU's `virt`
/// masks only bits 12:11 because its routing repeats every four slots; the guest's map lists
/// exactly the slots it owns, so it keys on the whole device number and stays right whatever
/// the physical routing is.
const PCI_INTX_MASK: [u32; 4] = [0xf800, 0, 0, 7];

/// The generic PCI bus binding's phys.hi (IEEE 1275 PCI binding 2.2.1.1): `npt000ss`, with
/// `ss` the space code in bits 25:24 and `p` (prefetchable) bit 30.
fn phys_hi(space: PciSpace, prefetchable: bool) -> u32 {
    let ss = match space {
        PciSpace::Config => 0,
        PciSpace::Io => 1,
        PciSpace::Mem32 => 2,
        PciSpace::Mem64 => 3,
    };
    ss << 24 | u32::from(prefetchable) << 30
}

/// The vSMMU node, as QEMU `virt` writes its SMMUv3 (`create_smmu` in `hw/arm/virt.c`).
fn smmu_node(w: &mut FdtWriter, smmu: &GuestSmmu) -> Result<(), GuestDtError> {
    let node = w.begin_node(&format!("smmuv3@{:x}", smmu.regs.base))?;
    w.property_string("compatible", "arm,smmu-v3")?;
    w.property_array_u64("reg", &[smmu.regs.base, smmu.regs.size])?;
    // Edge rising, as in the binding's example and on QEMU `virt`. The binding fixes the
    // name order ("eventq" before "gerror"); the driver looks lines up by name
    // (`platform_get_irq_byname_optional`).
    w.property_array_u32(
        "interrupts",
        &[
            GIC_SPI,
            smmu.eventq_intid - 32,
            EDGE_RISING,
            GIC_SPI,
            smmu.gerror_intid - 32,
            EDGE_RISING,
        ],
    )?;
    w.property_string_list(
        "interrupt-names",
        vec![String::from("eventq"), String::from("gerror")],
    )?;
    // The vSMMU reads the guest's tables and queues through the CPU's coherent view of RAM,
    // so the driver need not clean caches for them: it takes ARM_SMMU_FEAT_COHERENCY from
    // this property (IDR0.COHACC disagreeing only earns a warning).
    w.property_null("dma-coherent")?;
    // One cell: the StreamID, the only specifier the binding allows.
    w.property_u32("#iommu-cells", 1)?;
    w.property_phandle(SMMU_PHANDLE)?;
    w.end_node(node)?;
    Ok(())
}

/// The host bridge node Linux's `pci-host-generic` (`pci_host_common_probe`) binds to.
fn pci_node(w: &mut FdtWriter, pci: &GuestPci, behind_smmu: bool) -> Result<(), GuestDtError> {
    let node = w.begin_node(&format!("pcie@{:x}", pci.ecam.base))?;
    w.property_string("compatible", "pci-host-ecam-generic")?;
    w.property_string("device_type", "pci")?;
    w.property_u32("#address-cells", 3)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("#interrupt-cells", 1)?;
    w.property_array_u32(
        "bus-range",
        &[u32::from(pci.bus_range.0), u32::from(pci.bus_range.1)],
    )?;
    w.property_array_u64("reg", &[pci.ecam.base, pci.ecam.size])?;
    // Each entry: PCI address (3 cells), CPU address (the root's 2), size (2).
    let mut ranges = Vec::with_capacity(pci.ranges.len() * 7);
    for r in pci.ranges {
        let split = |v: u64| [(v >> 32) as u32, v as u32];
        ranges.push(phys_hi(r.space, r.prefetchable));
        ranges.extend(split(r.pci_base));
        ranges.extend(split(r.cpu_base));
        ranges.extend(split(r.size));
    }
    w.property_array_u32("ranges", &ranges)?;
    // A fixed domain so that the guest's BDFs (equal to the host's) read the same in logs.
    w.property_u32("linux,pci-domain", 0)?;
    w.property_null("dma-coherent")?;
    if behind_smmu {
        // Linux `pci-iommu.yaml`: <rid-base iommu iommu-base length>. StreamID = RID for the
        // whole 16-bit RID space, as on QEMU `virt`: the vSMMU then sees the same StreamIDs
        // as the physical SMMU, so no translation table is needed between them.
        w.property_array_u32("iommu-map", &[0, SMMU_PHANDLE, 0, 1 << 16])?;
    }
    w.property_array_u32("interrupt-map-mask", &PCI_INTX_MASK)?;
    let mut map: Vec<u32> = Vec::with_capacity(pci.intx.len() * 8);
    let mut seen: Vec<(u8, IntxPin)> = Vec::new();
    for &(bdf, pin, intid) in pci.intx {
        // `validate` made sure duplicates agree; one entry per (slot, pin) is enough.
        if seen.contains(&(bdf.dev, pin)) {
            continue;
        }
        seen.push((bdf.dev, pin));
        // Child unit address: bus/device/function in phys.hi 23:8; then the pin, the GIC,
        // and a GIC specifier (the GIC node has #address-cells 0). INTx is level triggered
        // (PCIe Base spec 2.2.8.1: Assert_INTx/Deassert_INTx messages model a level).
        map.extend_from_slice(&[
            u32::from(bdf.rid()) << 8,
            0,
            0,
            pin.number(),
            GIC_PHANDLE,
            GIC_SPI,
            intid - 32,
            LEVEL_HIGH,
        ]);
    }
    w.property_array_u32("interrupt-map", &map)?;
    w.end_node(node)?;
    Ok(())
}

fn validate_pci(pci: &GuestPci) -> Result<(), GuestDtError> {
    let r = pci.ecam;
    if r.size == 0 || r.base.checked_add(r.size).is_none() {
        return Err(GuestDtError::BadRange {
            what: "pci ecam",
            base: r.base,
            size: r.size,
        });
    }
    let (start, end) = pci.bus_range;
    if start > end {
        return Err(GuestDtError::BadBusRange { start, end });
    }
    let buses = u32::from(end - start) + 1;
    if r.size < u64::from(buses) << 20 {
        return Err(GuestDtError::EcamTooSmall {
            size: r.size,
            buses,
        });
    }
    for w in pci.ranges {
        let wraps =
            w.pci_base.checked_add(w.size).is_none() || w.cpu_base.checked_add(w.size).is_none();
        let above_4g = matches!(w.space, PciSpace::Io | PciSpace::Mem32) && w.pci_end() > 1 << 32;
        if w.space == PciSpace::Config || w.size == 0 || wraps || above_4g {
            return Err(GuestDtError::BadPciWindow {
                space: w.space,
                pci_base: w.pci_base,
                size: w.size,
            });
        }
    }
    for (i, &(bdf, pin, intid)) in pci.intx.iter().enumerate() {
        if !(32..1020).contains(&intid) {
            return Err(GuestDtError::BadIntid {
                what: "pci intx",
                intid,
                expected: "SPI",
            });
        }
        let clash = pci.intx[..i]
            .iter()
            .find(|&&(b, p, other)| b.dev == bdf.dev && p == pin && other != intid);
        if let Some(&(_, _, first)) = clash {
            return Err(GuestDtError::ConflictingIntx {
                slot: bdf.dev,
                pin,
                first,
                second: intid,
            });
        }
    }
    Ok(())
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

/// Rejects configurations that would produce a DT the guest misreads, so that the writer
/// code above can compute interrupt numbers and ends without overflow checks.
fn validate(cfg: &GuestDtConfig) -> Result<(), GuestDtError> {
    if cfg.vcpu_mpidrs.is_empty() {
        return Err(GuestDtError::NoVcpus);
    }
    for (i, &mpidr) in cfg.vcpu_mpidrs.iter().enumerate() {
        if mpidr & !MPIDR_AFFINITY_MASK != 0 {
            return Err(GuestDtError::BadMpidr(mpidr));
        }
        if cfg.vcpu_mpidrs[..i].contains(&mpidr) {
            return Err(GuestDtError::DuplicateMpidr(mpidr));
        }
    }
    let mut ranges = vec![
        ("ram", cfg.ram),
        ("gicd", cfg.gicd),
        ("gicr", cfg.gicr),
        ("uart", cfg.uart),
    ];
    if let Some(initrd) = cfg.initrd {
        ranges.push(("initrd", initrd));
    }
    for (what, r) in ranges {
        if r.size == 0 || r.base.checked_add(r.size).is_none() {
            return Err(GuestDtError::BadRange {
                what,
                base: r.base,
                size: r.size,
            });
        }
    }
    if let Some(initrd) = cfg.initrd {
        if initrd.base < cfg.ram.base || initrd.end() > cfg.ram.end() {
            return Err(GuestDtError::InitrdOutsideRam {
                base: initrd.base,
                size: initrd.size,
            });
        }
    }
    let ppi = |what, intid: u32| {
        if (16..32).contains(&intid) {
            Ok(())
        } else {
            Err(GuestDtError::BadIntid {
                what,
                intid,
                expected: "PPI",
            })
        }
    };
    ppi("maintenance", cfg.maintenance_ppi)?;
    for intid in cfg.timer.intids {
        ppi("timer", intid)?;
    }
    if !(32..1020).contains(&cfg.uart_intid) {
        return Err(GuestDtError::BadIntid {
            what: "uart",
            intid: cfg.uart_intid,
            expected: "SPI",
        });
    }
    if let Some(pci) = &cfg.pci {
        validate_pci(pci)?;
    }
    if let Some(smmu) = &cfg.smmu {
        validate_smmu(cfg, smmu)?;
    }
    Ok(())
}

fn validate_smmu(cfg: &GuestDtConfig, smmu: &GuestSmmu) -> Result<(), GuestDtError> {
    let r = smmu.regs;
    if r.size < SMMU_REGS_MIN || r.base.checked_add(r.size).is_none() {
        return Err(GuestDtError::BadRange {
            what: "smmu regs",
            base: r.base,
            size: r.size,
        });
    }
    let irqs = [
        ("smmu eventq", smmu.eventq_intid),
        ("smmu gerror", smmu.gerror_intid),
    ];
    for (what, intid) in irqs {
        if !(32..1020).contains(&intid) {
            return Err(GuestDtError::BadIntid {
                what,
                intid,
                expected: "SPI",
            });
        }
    }
    // A shared line would be requested twice by Linux without IRQF_SHARED and fail the
    // probe; with the level-triggered UART or INTx lines it would also mix trigger types.
    let mut used = vec![("uart", cfg.uart_intid)];
    if let Some(pci) = &cfg.pci {
        used.extend(pci.intx.iter().map(|&(_, _, intid)| ("pci intx", intid)));
    }
    for (second, intid) in irqs {
        if let Some(&(first, _)) = used.iter().find(|&&(_, other)| other == intid) {
            return Err(GuestDtError::SharedIntid {
                intid,
                first,
                second,
            });
        }
        used.push((second, intid));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::{Platform, PsciConduit};

    fn config<'a>(mpidrs: &'a [u64]) -> GuestDtConfig<'a> {
        GuestDtConfig {
            vm_name: "linux-guest",
            vcpu_mpidrs: mpidrs,
            ram: MemRange {
                base: 0x4000_0000,
                size: 0x2000_0000,
            },
            gicd: MemRange {
                base: 0x800_0000,
                size: 0x1_0000,
            },
            gicr: MemRange {
                base: 0x80a_0000,
                size: 0x2_0000 * mpidrs.len() as u64,
            },
            maintenance_ppi: 25,
            timer: TimerInfo {
                intids: [29, 30, 27, 26],
                flags: [4, 4, 4, 8],
            },
            uart: MemRange {
                base: 0x900_0000,
                size: 0x1000,
            },
            uart_intid: 33,
            psci_method_hvc: true,
            bootargs: "console=ttyAMA0 earlycon",
            initrd: Some(MemRange {
                base: 0x4800_0000,
                size: 0x12_3456,
            }),
            boot_count: 3,
            pci: None,
            smmu: None,
        }
    }

    #[test]
    fn round_trip_through_platform_parse() {
        let mpidrs = [0, 1, 0x100, 0x101];
        let cfg = config(&mpidrs);
        let dtb = build_guest_dt(&cfg).unwrap();
        let p = Platform::parse(&dtb).unwrap();
        assert_eq!(p.cpus, mpidrs);
        assert_eq!(p.memory, vec![cfg.ram]);
        assert!(p.reserved.is_empty());
        assert_eq!(p.gic.gicd, cfg.gicd);
        assert_eq!(p.gic.gicr, cfg.gicr);
        assert_eq!(p.gic.maintenance_ppi, 25);
        assert_eq!(p.timer, cfg.timer);
        assert_eq!(p.uart.base, cfg.uart);
        assert_eq!(p.uart.intid, 33);
        assert_eq!(p.uart.compatible, "arm,pl011");
        assert_eq!(p.psci, Some(PsciConduit::Hvc));
        assert_eq!(p.bootargs.as_deref(), Some(cfg.bootargs));
        assert!(p.modules.is_empty());

        let smc = build_guest_dt(&GuestDtConfig {
            psci_method_hvc: false,
            ..cfg
        })
        .unwrap();
        assert_eq!(Platform::parse(&smc).unwrap().psci, Some(PsciConduit::Smc));
    }

    #[test]
    fn round_trip_through_fdt_crate() {
        let mpidrs = [0, 1];
        let cfg = config(&mpidrs);
        let dtb = build_guest_dt(&cfg).unwrap();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let root = fdt.root();
        assert_eq!(root.compatible().first(), "linux,dummy-virt");
        assert_eq!(root.model(), "linux-guest");
        let chosen = fdt.find_node("/chosen").unwrap();
        let u64_prop = |name| {
            let v = chosen.property(name).unwrap().value;
            u64::from_be_bytes(v.try_into().unwrap())
        };
        assert_eq!(u64_prop("linux,initrd-start"), 0x4800_0000);
        assert_eq!(u64_prop("linux,initrd-end"), 0x4812_3456);
        assert_eq!(
            chosen.property("hypervisor,boot-count").unwrap().as_usize(),
            Some(3)
        );
        assert_eq!(
            chosen.property("hypervisor,vm-name").unwrap().as_str(),
            Some("linux-guest")
        );
        assert_eq!(fdt.chosen().stdout().unwrap().name, "pl011@9000000");
        assert_eq!(fdt.chosen().bootargs(), Some("console=ttyAMA0 earlycon"));

        let ids: Vec<usize> = fdt.cpus().map(|c| c.ids().first()).collect();
        assert_eq!(ids, [0, 1]);
        for cpu in fdt.cpus() {
            assert_eq!(
                cpu.property("enable-method").unwrap().as_str(),
                Some("psci")
            );
            assert_eq!(
                cpu.property("compatible").unwrap().as_str(),
                Some("arm,armv8")
            );
        }

        let gic = fdt.find_compatible(&["arm,gic-v3"]).unwrap();
        let gic_phandle = gic.property("phandle").unwrap().as_usize().unwrap();
        assert_eq!(
            root.property("interrupt-parent").unwrap().as_usize(),
            Some(gic_phandle)
        );
        assert!(gic.property("interrupt-controller").is_some());
        assert_eq!(gic.interrupt_cells(), Some(3));

        let uart = fdt.find_compatible(&["arm,pl011"]).unwrap();
        let clocks = uart.property("clocks").unwrap().value;
        let clk = fdt
            .find_phandle(u32::from_be_bytes(clocks[..4].try_into().unwrap()))
            .unwrap();
        assert_eq!(clk.name, "apb-pclk");
        assert_eq!(
            clk.property("clock-frequency").unwrap().as_usize(),
            Some(24_000_000)
        );
        assert_eq!(clk.property("#clock-cells").unwrap().as_usize(), Some(0));
        assert_eq!(&clocks[4..], &clocks[..4]);
        assert_eq!(
            uart.property("clock-names").unwrap().value,
            b"uartclk\0apb_pclk\0"
        );
        assert!(fdt
            .find_node("/timer")
            .unwrap()
            .property("always-on")
            .is_some());
    }

    #[test]
    fn wide_mpidrs_and_no_initrd() {
        let mpidrs = [0x1_0000_0000, 0x1_0000_0001];
        let cfg = GuestDtConfig {
            initrd: None,
            ..config(&mpidrs)
        };
        let dtb = build_guest_dt(&cfg).unwrap();
        assert_eq!(Platform::parse(&dtb).unwrap().cpus, mpidrs);
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        assert!(fdt
            .find_node("/chosen")
            .unwrap()
            .property("linux,initrd-start")
            .is_none());
    }

    #[test]
    fn rejects_bad_configs() {
        let mpidrs = [0, 1];
        let ok = config(&mpidrs);
        let err = |cfg: GuestDtConfig| build_guest_dt(&cfg).unwrap_err();
        assert_eq!(
            err(GuestDtConfig {
                vcpu_mpidrs: &[],
                ..ok
            }),
            GuestDtError::NoVcpus
        );
        assert_eq!(
            err(GuestDtConfig {
                vcpu_mpidrs: &[1, 1],
                ..ok
            }),
            GuestDtError::DuplicateMpidr(1)
        );
        assert_eq!(
            err(GuestDtConfig {
                vcpu_mpidrs: &[1 << 31],
                ..ok
            }),
            GuestDtError::BadMpidr(1 << 31)
        );
        assert!(matches!(
            err(GuestDtConfig {
                uart_intid: 27,
                ..ok
            }),
            GuestDtError::BadIntid { what: "uart", .. }
        ));
        assert!(matches!(
            err(GuestDtConfig {
                maintenance_ppi: 40,
                ..ok
            }),
            GuestDtError::BadIntid {
                what: "maintenance",
                ..
            }
        ));
        assert!(matches!(
            err(GuestDtConfig {
                ram: MemRange {
                    base: u64::MAX,
                    size: 2
                },
                ..ok
            }),
            GuestDtError::BadRange { what: "ram", .. }
        ));
        assert!(matches!(
            err(GuestDtConfig {
                initrd: Some(MemRange {
                    base: 0x1000,
                    size: 0x1000
                }),
                ..ok
            }),
            GuestDtError::InitrdOutsideRam { .. }
        ));
        assert_eq!(
            err(GuestDtConfig {
                bootargs: "a\0b",
                ..ok
            }),
            GuestDtError::Writer(vm_fdt::Error::InvalidString)
        );
    }

    const WINDOWS: [PciWindow; 3] = [
        PciWindow {
            space: PciSpace::Io,
            prefetchable: false,
            pci_base: 0,
            cpu_base: 0x3eff_0000,
            size: 0x1_0000,
        },
        PciWindow {
            space: PciSpace::Mem32,
            prefetchable: false,
            pci_base: 0x1000_0000,
            cpu_base: 0x1000_0000,
            size: 0x2eff_0000,
        },
        PciWindow {
            space: PciSpace::Mem64,
            prefetchable: true,
            pci_base: 0x80_0000_0000,
            cpu_base: 0x80_0000_0000,
            size: 0x80_0000_0000,
        },
    ];

    const INTX: [(Bdf, IntxPin, u32); 4] = [
        (Bdf::new(0, 2, 0), IntxPin::A, 37),
        (Bdf::new(0, 3, 0), IntxPin::A, 38),
        // Slot 6 shares slot 2's lines on QEMU (SPI 3 + slot % 4) but is its own key here.
        (Bdf::new(0, 6, 0), IntxPin::B, 40),
        // A second function of slot 3 on the same pin and line: one map entry.
        (Bdf::new(0, 3, 1), IntxPin::A, 38),
    ];

    fn pci() -> GuestPci<'static> {
        GuestPci {
            ecam: MemRange {
                base: 0x40_1000_0000,
                size: 0x100_0000,
            },
            bus_range: (0, 0xf),
            ranges: &WINDOWS,
            intx: &INTX,
        }
    }

    #[test]
    fn pci_node_parses_back_as_the_same_host_bridge() {
        let mpidrs = [0];
        let cfg = GuestDtConfig {
            pci: Some(pci()),
            ..config(&mpidrs)
        };
        let dtb = build_guest_dt(&cfg).unwrap();
        let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
        assert_eq!(hb.ecam, pci().ecam);
        assert_eq!((hb.bus_start, hb.bus_end), (0, 0xf));
        assert_eq!(hb.windows, WINDOWS);
        assert!(hb.dma_coherent);
        // No vSMMU: the guest's devices must not wait for an IOMMU that never probes.
        assert!(hb.iommu_map.is_empty());
        assert!(fdt::Fdt::new(&dtb)
            .unwrap()
            .find_compatible(&["arm,smmu-v3"])
            .is_none());
        assert_eq!(hb.interrupt_map.mask, PCI_INTX_MASK);
        assert_eq!(hb.interrupt_map.entries.len(), 3);
        for (bdf, pin, intid) in INTX {
            let route = hb.interrupt_map.lookup(bdf, pin).unwrap();
            assert_eq!((route.intid, route.flags, route.parent), (intid, 4, 1));
        }
        assert_eq!(hb.interrupt_map.lookup(Bdf::new(0, 2, 0), IntxPin::B), None);
        assert_eq!(hb.interrupt_map.lookup(Bdf::new(0, 4, 0), IntxPin::A), None);

        // What the fdt crate (and so Linux's generic binding code) sees.
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let chosen = fdt.find_node("/chosen").unwrap();
        assert_eq!(
            chosen.property("linux,pci-probe-only").unwrap().as_usize(),
            Some(1)
        );
        let node = fdt.find_node("/pcie@4010000000").unwrap();
        assert_eq!(node.compatible().unwrap().first(), "pci-host-ecam-generic");
        assert_eq!(node.property("device_type").unwrap().as_str(), Some("pci"));
        assert_eq!(
            node.property("linux,pci-domain").unwrap().as_usize(),
            Some(0)
        );
        assert_eq!(node.interrupt_cells(), Some(1));
        let reg = node.reg().unwrap().next().unwrap();
        assert_eq!(reg.starting_address as u64, 0x40_1000_0000);
        assert_eq!(reg.size, Some(0x100_0000));
        let ranges = node.property("ranges").unwrap().value;
        // 64-bit prefetchable memory: ss = 11, p = 1.
        assert_eq!(&ranges[2 * 28..2 * 28 + 4], &0x4300_0000u32.to_be_bytes());

        // Without PCI, neither the node nor probe-only.
        let dtb = build_guest_dt(&config(&mpidrs)).unwrap();
        assert_eq!(crate::pci::HostBridge::from_dtb(&dtb).unwrap(), None);
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        assert!(fdt
            .find_node("/chosen")
            .unwrap()
            .property("linux,pci-probe-only")
            .is_none());
    }

    #[test]
    fn rejects_bad_pci_configs() {
        let mpidrs = [0];
        let err = |pci: GuestPci| {
            build_guest_dt(&GuestDtConfig {
                pci: Some(pci),
                ..config(&mpidrs)
            })
            .unwrap_err()
        };
        assert_eq!(
            err(GuestPci {
                bus_range: (2, 1),
                ..pci()
            }),
            GuestDtError::BadBusRange { start: 2, end: 1 }
        );
        assert_eq!(
            err(GuestPci {
                bus_range: (0, 0x10),
                ..pci()
            }),
            GuestDtError::EcamTooSmall {
                size: 0x100_0000,
                buses: 17
            }
        );
        assert!(matches!(
            err(GuestPci {
                ecam: MemRange {
                    base: u64::MAX,
                    size: 1 << 20
                },
                ..pci()
            }),
            GuestDtError::BadRange {
                what: "pci ecam",
                ..
            }
        ));
        let high_io = [PciWindow {
            pci_base: 0xffff_f000,
            ..WINDOWS[0]
        }];
        assert!(matches!(
            err(GuestPci {
                ranges: &high_io,
                ..pci()
            }),
            GuestDtError::BadPciWindow { .. }
        ));
        let clash = [
            (Bdf::new(0, 2, 0), IntxPin::A, 37),
            (Bdf::new(0, 2, 1), IntxPin::A, 38),
        ];
        assert_eq!(
            err(GuestPci {
                intx: &clash,
                ..pci()
            }),
            GuestDtError::ConflictingIntx {
                slot: 2,
                pin: IntxPin::A,
                first: 37,
                second: 38
            }
        );
        let ppi = [(Bdf::new(0, 2, 0), IntxPin::A, 27)];
        assert!(matches!(
            err(GuestPci {
                intx: &ppi,
                ..pci()
            }),
            GuestDtError::BadIntid {
                what: "pci intx",
                ..
            }
        ));
    }

    /// Shaped like QEMU `virt`'s SMMUv3 (SPIs 74 and 77), but INTIDs of the guest's choosing.
    const SMMU: GuestSmmu = GuestSmmu {
        regs: MemRange {
            base: 0x905_0000,
            size: 0x2_0000,
        },
        eventq_intid: 32 + 74,
        gerror_intid: 32 + 77,
    };

    fn be32(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn smmu_node_and_iommu_map() {
        let mpidrs = [0, 1];
        let cfg = GuestDtConfig {
            pci: Some(pci()),
            smmu: Some(SMMU),
            ..config(&mpidrs)
        };
        let dtb = build_guest_dt(&cfg).unwrap();

        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let smmu = fdt.find_node("/smmuv3@9050000").unwrap();
        assert_eq!(smmu.compatible().unwrap().first(), "arm,smmu-v3");
        let reg = smmu.reg().unwrap().next().unwrap();
        assert_eq!(reg.starting_address as u64, 0x905_0000);
        assert_eq!(reg.size, Some(0x2_0000));
        // <GIC_SPI n IRQ_TYPE_EDGE_RISING> twice, eventq first.
        assert_eq!(
            be32(smmu.property("interrupts").unwrap().value),
            [0, 74, 1, 0, 77, 1]
        );
        assert_eq!(
            smmu.property("interrupt-names").unwrap().value,
            b"eventq\0gerror\0"
        );
        assert!(smmu.property("dma-coherent").unwrap().value.is_empty());
        assert_eq!(smmu.property("#iommu-cells").unwrap().as_usize(), Some(1));
        assert!(smmu.property("msi-parent").is_none());
        let phandle = smmu.property("phandle").unwrap().as_usize().unwrap() as u32;
        assert_eq!(fdt.find_phandle(phandle).unwrap().name, "smmuv3@9050000");
        // The GIC's interrupt-parent still resolves: the phandles did not collide.
        assert_eq!(
            fdt.find_phandle(GIC_PHANDLE)
                .unwrap()
                .compatible()
                .unwrap()
                .first(),
            "arm,gic-v3"
        );

        let pcie = fdt.find_node("/pcie@4010000000").unwrap();
        assert_eq!(
            be32(pcie.property("iommu-map").unwrap().value),
            [0, phandle, 0, 0x1_0000]
        );

        // The hypervisor's own readers, as used on the host DT, agree.
        let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
        assert_eq!(
            hb.iommu_map,
            [crate::pci::IommuMapEntry {
                rid_base: 0,
                iommu: phandle,
                sid_base: 0,
                length: 0x1_0000,
            }]
        );
        assert_eq!(hb.iommu_map_mask, None);
        for rid in [0, 0x10, 0x1801, 0xffff] {
            assert_eq!(hb.stream_id(rid), Some(u32::from(rid)));
        }
        let p = Platform::parse(&dtb).unwrap();
        assert_eq!(
            p.smmu,
            Some(crate::platform::SmmuInfo {
                regs: SMMU.regs,
                eventq_intid: Some(SMMU.eventq_intid),
                gerror_intid: Some(SMMU.gerror_intid),
            })
        );
    }

    #[test]
    fn smmu_without_pci() {
        let mpidrs = [0];
        let cfg = GuestDtConfig {
            smmu: Some(SMMU),
            ..config(&mpidrs)
        };
        let dtb = build_guest_dt(&cfg).unwrap();
        assert_eq!(crate::pci::HostBridge::from_dtb(&dtb).unwrap(), None);
        let p = Platform::parse(&dtb).unwrap();
        assert_eq!(p.smmu.unwrap().regs, SMMU.regs);
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        assert!(fdt.find_node("/smmuv3@9050000").is_some());
    }

    #[test]
    fn rejects_bad_smmu_configs() {
        let mpidrs = [0];
        let err = |smmu: GuestSmmu| {
            build_guest_dt(&GuestDtConfig {
                pci: Some(pci()),
                smmu: Some(smmu),
                ..config(&mpidrs)
            })
            .unwrap_err()
        };
        // Page 1 (the event queue's PROD/CONS) would be missing.
        assert_eq!(
            err(GuestSmmu {
                regs: MemRange {
                    base: 0x905_0000,
                    size: 0x1_0000
                },
                ..SMMU
            }),
            GuestDtError::BadRange {
                what: "smmu regs",
                base: 0x905_0000,
                size: 0x1_0000
            }
        );
        assert!(matches!(
            err(GuestSmmu {
                regs: MemRange {
                    base: u64::MAX - 0xffff,
                    size: 0x2_0000
                },
                ..SMMU
            }),
            GuestDtError::BadRange {
                what: "smmu regs",
                ..
            }
        ));
        assert_eq!(
            err(GuestSmmu {
                eventq_intid: 27,
                ..SMMU
            }),
            GuestDtError::BadIntid {
                what: "smmu eventq",
                intid: 27,
                expected: "SPI"
            }
        );
        assert_eq!(
            err(GuestSmmu {
                gerror_intid: 1020,
                ..SMMU
            }),
            GuestDtError::BadIntid {
                what: "smmu gerror",
                intid: 1020,
                expected: "SPI"
            }
        );
        assert_eq!(
            err(GuestSmmu {
                gerror_intid: SMMU.eventq_intid,
                ..SMMU
            }),
            GuestDtError::SharedIntid {
                intid: SMMU.eventq_intid,
                first: "smmu eventq",
                second: "smmu gerror"
            }
        );
        assert_eq!(
            err(GuestSmmu {
                eventq_intid: 33,
                ..SMMU
            }),
            GuestDtError::SharedIntid {
                intid: 33,
                first: "uart",
                second: "smmu eventq"
            }
        );
        assert_eq!(
            err(GuestSmmu {
                gerror_intid: 38,
                ..SMMU
            }),
            GuestDtError::SharedIntid {
                intid: 38,
                first: "pci intx",
                second: "smmu gerror"
            }
        );
    }
}

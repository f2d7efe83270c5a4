//! The host machine as described by the device tree blob firmware hands over in x0.
//!
//! Nothing about the board is hard-coded: RAM, CPUs, the GIC, the timer PPIs, the console UART
//! and the guest images loaded by the boot loader all come from the DT. The blob is untrusted
//! input as far as robustness goes (a malformed one must be reported, not crash EL2), and the
//! `fdt` crate panics on several kinds of malformed input, so [`Platform::parse`] first walks
//! the whole blob itself and only hands it to `fdt` once every structural assumption `fdt`
//! makes is known to hold.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::Fdt;

mod blob;
#[cfg(test)]
mod board_tests;
mod boot_modules;
mod cmdline;
#[cfg(test)]
mod corpus_tests;
mod devices;
mod irqs;
mod props;
mod ram;
#[cfg(test)]
mod tests;
pub(crate) mod tree;

use blob::{check_blob, malformed};
use boot_modules::modules;
pub use cmdline::{
    hv_options, hv_options_of, parse_hv_bootargs, xen_opt_in, HvOptions, RamZeroing, HV_BOOTARGS,
    XEN_BOOTARGS, XEN_OPT_IN,
};
pub use devices::redistributor_frames;
use devices::{cpus, gic, psci, smmus, timer, uart};
use ram::{memory, reserved};

pub(crate) use props::{bad, be, cells, compatibles, missing, prop_str, prop_u32, reg};

/// A physical (or, for guests, IPA) address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRange {
    /// First byte of the range.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl MemRange {
    /// One past the last byte. Saturates rather than wraps: `parse` never produces a wrapping
    /// range, and a saturated end still compares correctly against any real address.
    pub const fn end(self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// How PSCI calls reach the firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciConduit {
    /// `SMC #0`, to EL3 firmware.
    Smc,
    /// `HVC #0` (only meaningful if something runs above us, which at EL2 means nothing does).
    Hvc,
}

/// The GICv3 as described by its `arm,gic-v3` node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GicInfo {
    /// Distributor frame.
    pub gicd: MemRange,
    /// Every redistributor region (`#redistributor-regions` of them, one on small machines),
    /// in DT order.
    pub gicr: Vec<MemRange>,
    /// `redistributor-stride`, when the DT overrides the architected frame spacing.
    pub redist_stride: Option<u64>,
    /// INTID of the virtual-interface maintenance interrupt (a PPI, so 16 + the DT number).
    pub maintenance_ppi: u32,
    /// Every enabled `arm,gic-v3-its` node, in DT order, usable or not (see
    /// [`ItsInfo::refused`]).
    pub its: Vec<ItsInfo>,
}

/// A GICv3 ITS (`arm,gic-v3-its`, normally a child of the GIC node, `reg` translated through
/// the GIC node's `ranges`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItsInfo {
    /// Its node's path, which names it in messages.
    pub path: String,
    /// Its phandle, by which host bridges' `msi-map` entries name it.
    pub phandle: Option<u32>,
    /// Its two 64 KiB frames: control (GITS_*), then translation (GITS_TRANSLATER at +0x40).
    pub regs: MemRange,
    /// Why the hypervisor will not drive it, if it will not (a warning at boot; the functions
    /// whose MSIs go to it then get none).
    pub refused: Option<String>,
}

impl ItsInfo {
    /// Bytes of the two frames (IHI 0069H 12.19: ITS_base and ITS_base + 0x10000).
    pub const FRAMES_SIZE: u64 = 0x2_0000;

    /// The physical address of GITS_TRANSLATER, the MSI doorbell.
    pub const fn translater(&self) -> u64 {
        self.regs.base + 0x1_0040
    }
}

/// The architected timer's interrupts, in binding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerInfo {
    /// Secure physical, non-secure physical, virtual and hypervisor physical timer, as INTIDs.
    pub intids: [u32; 4],
    /// The DT trigger-type cell of each of those interrupts, passed through to guests.
    pub flags: [u32; 4],
}

/// The register layout of a console UART the hypervisor can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartKind {
    /// Arm PrimeCell UART (PL011), `arm,pl011`.
    Pl011,
    /// The SBSA Generic UART (`arm,sbsa-uart`, Arm SBSA appendix B): the PL011's data, flag and
    /// interrupt registers, without UARTCR (firmware enables it).
    SbsaUart,
    /// An 8250/16550-compatible UART (`ns16550a`, `snps,dw-apb-uart`): register `n` at byte
    /// offset `n << reg_shift`, accessed `reg_io_width` bytes wide (1 or 4).
    Ns16550 {
        /// `reg-shift` (default 0).
        reg_shift: u8,
        /// `reg-io-width` (default 1).
        reg_io_width: u8,
    },
}

/// The console UART.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UartInfo {
    /// MMIO frame.
    pub base: MemRange,
    /// INTID of its interrupt, if it is wired to the GIC (without it there is no input).
    pub intid: Option<u32>,
    /// How to drive it.
    pub kind: UartKind,
    /// First `compatible` string.
    pub compatible: String,
    /// Its node's path.
    pub path: String,
    /// Why it is not the UART `stdout-path` names, if it is not.
    pub note: Option<String>,
}

/// What a boot module is, from its `multiboot,*` compatible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `multiboot,kernel`.
    Kernel,
    /// `multiboot,ramdisk`.
    Ramdisk,
    /// Any other `multiboot,module`.
    Other,
}

/// An image the boot loader placed in memory for us (Xen dom0less `/chosen/module@` binding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootModule {
    /// What the image is.
    pub kind: ModuleKind,
    /// Where it was loaded.
    pub range: MemRange,
    /// The module's own command line, if it has one.
    pub bootargs: Option<String>,
}

/// Everything the hypervisor needs to know about the host machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// Every enabled `/memory` node's `reg` entries, sorted by base.
    pub memory: Vec<MemRange>,
    /// `/memreserve/` entries plus enabled `/reserved-memory` children with a `reg`, sorted.
    pub reserved: Vec<MemRange>,
    /// MPIDR affinity of each `/cpus/cpu@` node, in DT order.
    pub cpus: Vec<u64>,
    /// PSCI conduit, if the DT has a PSCI 0.2+ node.
    pub psci: Option<PsciConduit>,
    /// The GICv3.
    pub gic: GicInfo,
    /// The architected timer.
    pub timer: TimerInfo,
    /// The console UART.
    pub uart: UartInfo,
    /// Boot modules under `/chosen`, in DT order.
    pub modules: Vec<BootModule>,
    /// `/chosen/bootargs`.
    pub bootargs: Option<String>,
    /// Every enabled SMMUv3, in DT order, driven or not (see [`SmmuInfo::refused`]).
    pub smmus: Vec<SmmuInfo>,
}

/// Why the DT could not be turned into a [`Platform`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// The blob is not a well-formed flattened device tree (bad header, truncated or
    /// inconsistent structure block); `offset` is relative to the start of the blob.
    #[error("malformed DTB at offset {offset:#x}: {reason}")]
    Malformed {
        /// Byte offset of the problem.
        offset: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// No enabled `/memory` node with a non-empty `reg`.
    #[error("DT describes no memory (no enabled /memory node with a non-empty reg)")]
    NoMemory,
    /// No `/cpus/cpu@` node with `device_type = "cpu"`.
    #[error("DT describes no CPUs (no /cpus/cpu node with device_type \"cpu\")")]
    NoCpus,
    /// No node compatible with `arm,gic-v3`.
    #[error("DT has no GICv3 (no node compatible with \"arm,gic-v3\")")]
    NoGic,
    /// No node compatible with `arm,armv8-timer`.
    #[error("DT has no architected timer (no node compatible with \"arm,armv8-timer\")")]
    NoTimer,
    /// Neither `/chosen/stdout-path` nor any enabled UART node names a console the driver
    /// knows.
    #[error(
        "DT has no console UART (no stdout-path, and no enabled arm,pl011, arm,sbsa-uart, ns16550a or snps,dw-apb-uart node)"
    )]
    NoUart,
    /// `stdout-path` names a UART of a kind the console driver does not know, and there is no
    /// other one it does.
    #[error("console {node}: compatible {compatible:?} is not a UART the hypervisor can drive (arm,pl011, arm,sbsa-uart, ns16550a, snps,dw-apb-uart)")]
    UnsupportedUart {
        /// Path of the UART node.
        node: String,
        /// Its first compatible.
        compatible: String,
    },
    /// A node the hypervisor needs interrupts from has them wired to a controller other than
    /// the GICv3.
    #[error("node {node}: its interrupts go to {controller}, not to the GICv3")]
    NotThroughGic {
        /// Path of the node.
        node: String,
        /// Path of the controller.
        controller: String,
    },
    /// A node lacks a property the hypervisor cannot do without.
    #[error("node {node}: missing property {property}")]
    MissingProperty {
        /// Name of the node.
        node: String,
        /// Name of the missing property.
        property: &'static str,
    },
    /// A property is present but its value cannot be used.
    #[error("node {node}: bad property {property}: {reason}")]
    BadProperty {
        /// Name of the node.
        node: String,
        /// Name of the property.
        property: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `/psci` names a conduit other than `smc` or `hvc`.
    #[error("PSCI node: unknown method {0:?} (expected \"smc\" or \"hvc\")")]
    UnknownPsciMethod(String),
}

type Result<T> = core::result::Result<T, PlatformError>;

/// A physical SMMUv3 (`arm,smmu-v3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmmuInfo {
    /// Its node's path, which names it in messages.
    pub path: String,
    /// Its phandle, by which host bridges' `iommu-map` entries name it.
    pub phandle: Option<u32>,
    /// Register pages 0 and 1.
    pub regs: MemRange,
    /// INTID of the event queue interrupt, if wired to the GIC.
    pub eventq_intid: Option<u32>,
    /// INTID of the global error interrupt, if wired to the GIC.
    pub gerror_intid: Option<u32>,
    /// `dma-coherent`: its table walks and queue accesses snoop the CPU caches.
    pub coherent: bool,
    /// Why its event queue is polled rather than interrupt-driven, if it is.
    pub polled: Option<String>,
    /// Why the hypervisor will not drive it, if it will not: the functions behind it are then
    /// never assigned.
    pub refused: Option<String>,
}

impl Platform {
    /// Parses the host DT.
    pub fn parse(dtb: &[u8]) -> Result<Platform> {
        let checked = check_blob(dtb)?;
        // A blob containing NOP tokens is rewritten without them, because `fdt` only skips NOPs
        // in some positions and panics on the others.
        let blob: &[u8] = checked
            .compacted
            .as_deref()
            .unwrap_or(&dtb[..checked.total]);
        let fdt = Fdt::new(blob).map_err(|_| malformed(0, "rejected by the fdt parser"))?;
        let root = fdt
            .find_node("/")
            .ok_or_else(|| malformed(0, "no root node"))?;

        let chosen = fdt.find_node("/chosen");
        let tree = tree::Tree::new(&fdt).ok_or_else(|| malformed(0, "no root node"))?;
        // The GICv3 every interrupt the hypervisor takes goes to; other controllers' interrupts
        // are reported by the node that uses them.
        let gic_index = *tree
            .compatible("arm,gic-v3")
            .first()
            .ok_or(PlatformError::NoGic)?;

        Ok(Platform {
            memory: memory(root)?,
            reserved: reserved(root, &checked.memreserve)?,
            cpus: cpus(&fdt)?,
            psci: psci(&fdt)?,
            gic: gic(&tree, gic_index)?,
            timer: timer(&tree, gic_index)?,
            uart: uart(&tree, &fdt, chosen, gic_index)?,
            modules: match chosen {
                Some(chosen) => modules(root, chosen)?,
                None => Vec::new(),
            },
            bootargs: chosen
                .and_then(|c| prop_str(c, "bootargs"))
                .map(ToString::to_string),
            smmus: smmus(&tree, gic_index)?,
        })
    }
}

/// The console UART, found with as little of the DT as possible (the blob's structure,
/// `/chosen/stdout-path` or the command line's `dtuart=`, and that node's `compatible` and
/// `reg`), so that a DT [`Platform::parse`] rejects can still be reported on the board's
/// console.
pub fn early_console(dtb: &[u8]) -> Option<(u64, UartKind)> {
    with_fdt(dtb, |fdt| {
        let tree = tree::Tree::new(fdt)?;
        let chosen = fdt.find_node("/chosen")?;
        let dtuart = cmdline::hv_options_of(chosen).0.dtuart;
        let index = match dtuart.and_then(|d| devices::dtuart_node(&tree, fdt, &d)) {
            Some(i) => i,
            None => devices::stdout_node(&tree, fdt, prop_str(chosen, "stdout-path")?)?,
        };
        let kind = devices::uart_kind(tree.nodes[index].node).ok()??;
        let base = tree.cpu_reg(index).ok()?.first()?.base;
        Some((base, kind))
    })
    .ok()
    .flatten()
}

/// Validates `dtb` exactly as [`Platform::parse`] does and hands it to `f` as an [`Fdt`], so
/// other readers of the host DT (the VM configuration) get the same protection from `fdt`'s
/// panics on malformed input.
pub(crate) fn with_fdt<R>(dtb: &[u8], f: impl FnOnce(&Fdt<'_>) -> R) -> Result<R> {
    let checked = check_blob(dtb)?;
    let blob: &[u8] = checked
        .compacted
        .as_deref()
        .unwrap_or(&dtb[..checked.total]);
    let fdt = Fdt::new(blob).map_err(|_| malformed(0, "rejected by the fdt parser"))?;
    Ok(f(&fdt))
}

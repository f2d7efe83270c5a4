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

use fdt::node::FdtNode;
use fdt::Fdt;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicInfo {
    /// Distributor frame.
    pub gicd: MemRange,
    /// First redistributor region (the only one on small machines).
    pub gicr: MemRange,
    /// INTID of the virtual-interface maintenance interrupt (a PPI, so 16 + the DT number).
    pub maintenance_ppi: u32,
}

/// The architected timer's interrupts, in binding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerInfo {
    /// Secure physical, non-secure physical, virtual and hypervisor physical timer, as INTIDs.
    pub intids: [u32; 4],
    /// The DT trigger-type cell of each of those interrupts, passed through to guests.
    pub flags: [u32; 4],
}

/// The console UART.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UartInfo {
    /// MMIO frame.
    pub base: MemRange,
    /// INTID of its interrupt.
    pub intid: u32,
    /// First `compatible` string, so the caller can tell a PL011 from anything else.
    pub compatible: String,
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
    /// The physical SMMUv3, if the machine has one.
    pub smmu: Option<SmmuInfo>,
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
    /// Neither `/chosen/stdout-path` nor any enabled `arm,pl011` node names a console UART.
    #[error("DT has no console UART (no usable stdout-path and no enabled \"arm,pl011\" node)")]
    NoUart,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuInfo {
    /// Register pages 0 and 1.
    pub regs: MemRange,
    /// INTID of the event queue interrupt, if wired.
    pub eventq_intid: Option<u32>,
    /// INTID of the global error interrupt, if wired.
    pub gerror_intid: Option<u32>,
}

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
const HEADER_LEN: usize = 40;
/// `fdt` tracks parents in a fixed 64-entry array indexed from 1, so deeper trees would panic.
const MAX_DEPTH: usize = 63;

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
        let gic_node = fdt
            .find_compatible(&["arm,gic-v3"])
            .ok_or(PlatformError::NoGic)?;
        // Every interrupt we care about (timer PPIs, UART SPI, maintenance PPI) is wired to the
        // GIC, so its specifier width applies to all of them.
        let icells = prop_u32(gic_node, "#interrupt-cells")
            .ok_or_else(|| missing(gic_node, "#interrupt-cells"))?;

        Ok(Platform {
            memory: memory(root)?,
            reserved: reserved(root, &checked.memreserve)?,
            cpus: cpus(&fdt)?,
            psci: psci(&fdt)?,
            gic: gic(gic_node, icells)?,
            timer: timer(&fdt, icells)?,
            uart: uart(&fdt, chosen, icells)?,
            modules: match chosen {
                Some(chosen) => modules(root, chosen)?,
                None => Vec::new(),
            },
            bootargs: chosen
                .and_then(|c| prop_str(c, "bootargs"))
                .map(ToString::to_string),
            smmu: smmu(&fdt, icells)?,
        })
    }
}

/// The first enabled `arm,smmu-v3` node: its registers and its wired interrupts by name
/// (Linux's binding: "eventq", "priq", "cmdq-sync", "gerror"; a combined "combined" line is
/// reported as both eventq and gerror).
fn smmu(fdt: &Fdt<'_>, icells: u32) -> Result<Option<SmmuInfo>> {
    let Some(node) = fdt
        .all_nodes()
        .find(|n| is_enabled(*n) && compatibles(*n).any(|c| c == "arm,smmu-v3"))
    else {
        return Ok(None);
    };
    let regs = reg(node)?
        .first()
        .copied()
        .ok_or_else(|| missing(node, "reg"))?;
    let irqs = interrupts(node, icells)?;
    let names: Vec<&str> = node
        .property("interrupt-names")
        .map(|p| {
            p.value
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .filter_map(|s| core::str::from_utf8(s).ok())
                .collect()
        })
        .unwrap_or_default();
    let by_name = |name: &str| {
        names
            .iter()
            .position(|n| *n == name || *n == "combined")
            .and_then(|i| irqs.get(i))
            .map(|&(intid, _)| intid)
    };
    Ok(Some(SmmuInfo {
        regs,
        eventq_intid: by_name("eventq"),
        gerror_intid: by_name("gerror"),
    }))
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

fn memory(root: FdtNode) -> Result<Vec<MemRange>> {
    let mut memory = Vec::new();
    for node in root.children() {
        let by_name = node.name == "memory" || node.name.starts_with("memory@");
        if !(by_name || prop_str(node, "device_type") == Some("memory")) || !is_enabled(node) {
            continue;
        }
        memory.extend(reg(node)?.into_iter().filter(|r| r.size != 0));
    }
    if memory.is_empty() {
        return Err(PlatformError::NoMemory);
    }
    memory.sort_by_key(|r| r.base);
    Ok(memory)
}

fn reserved(root: FdtNode, memreserve: &[MemRange]) -> Result<Vec<MemRange>> {
    let mut reserved: Vec<MemRange> = memreserve.to_vec();
    if let Some(node) = root.children().find(|n| n.name == "reserved-memory") {
        // Children without `reg` are dynamic allocation requests ("size"/"alloc-ranges") for
        // the OS; there is nothing placed there yet, so nothing for us to avoid.
        for child in node.children().filter(|c| is_enabled(*c)) {
            if child.property("reg").is_some() {
                reserved.extend(reg(child)?.into_iter().filter(|r| r.size != 0));
            }
        }
    }
    reserved.sort_by_key(|r| r.base);
    Ok(reserved)
}

fn cpus(fdt: &Fdt) -> Result<Vec<u64>> {
    let Some(cpus_node) = fdt.find_node("/cpus") else {
        return Err(PlatformError::NoCpus);
    };
    let mut cpus = Vec::new();
    for cpu in cpus_node.children() {
        // `cpu-map` and friends also live under /cpus; only real CPU nodes count.
        if prop_str(cpu, "device_type") != Some("cpu") {
            continue;
        }
        // /cpus has #size-cells = 0, so each entry is just the MPIDR in `base`.
        let first = reg(cpu)?
            .first()
            .copied()
            .ok_or_else(|| missing(cpu, "reg"))?;
        cpus.push(first.base);
    }
    if cpus.is_empty() {
        return Err(PlatformError::NoCpus);
    }
    Ok(cpus)
}

fn psci(fdt: &Fdt) -> Result<Option<PsciConduit>> {
    // PSCI 0.1 (`arm,psci` alone) uses DT-provided function IDs, which we do not support.
    let Some(node) = fdt.find_compatible(&["arm,psci-1.0", "arm,psci-0.2"]) else {
        return Ok(None);
    };
    match prop_str(node, "method") {
        Some("smc") => Ok(Some(PsciConduit::Smc)),
        Some("hvc") => Ok(Some(PsciConduit::Hvc)),
        Some(other) => Err(PlatformError::UnknownPsciMethod(other.to_string())),
        None => Err(missing(node, "method")),
    }
}

fn gic(node: FdtNode, icells: u32) -> Result<GicInfo> {
    // Binding order: GICD, then #redistributor-regions GICR regions, then optional CPU
    // interface frames we do not use.
    let regs = reg(node)?;
    let [gicd, gicr, ..] = regs[..] else {
        return Err(bad(
            node,
            "reg",
            "needs at least a distributor and a redistributor region",
        ));
    };
    let maintenance_ppi = interrupts(node, icells)?
        .first()
        .map(|&(intid, _)| intid)
        .ok_or_else(|| missing(node, "interrupts"))?;
    Ok(GicInfo {
        gicd,
        gicr,
        maintenance_ppi,
    })
}

fn timer(fdt: &Fdt, icells: u32) -> Result<TimerInfo> {
    let node = fdt
        .find_compatible(&["arm,armv8-timer"])
        .ok_or(PlatformError::NoTimer)?;
    let irqs = interrupts(node, icells)?;
    // A fifth entry (hypervisor virtual timer, FEAT_VHE) may follow; we only use the four.
    if irqs.len() < 4 {
        return Err(bad(node, "interrupts", "fewer than four timer interrupts"));
    }
    let mut info = TimerInfo {
        intids: [0; 4],
        flags: [0; 4],
    };
    for (i, &(intid, flags)) in irqs.iter().take(4).enumerate() {
        info.intids[i] = intid;
        info.flags[i] = flags;
    }
    Ok(info)
}

fn uart<'b, 'a>(
    fdt: &'b Fdt<'a>,
    chosen: Option<FdtNode<'b, 'a>>,
    icells: u32,
) -> Result<UartInfo> {
    let node = chosen
        .and_then(|c| prop_str(c, "stdout-path"))
        .and_then(|path| stdout_node(fdt, path))
        .or_else(|| {
            fdt.all_nodes()
                .find(|n| is_enabled(*n) && compatibles(*n).any(|c| c == "arm,pl011"))
        })
        .ok_or(PlatformError::NoUart)?;
    let base = reg(node)?
        .first()
        .copied()
        .ok_or_else(|| missing(node, "reg"))?;
    let intid = interrupts(node, icells)?
        .first()
        .map(|&(intid, _)| intid)
        .ok_or_else(|| missing(node, "interrupts"))?;
    let compatible = compatibles(node)
        .next()
        .ok_or_else(|| missing(node, "compatible"))?;
    Ok(UartInfo {
        base,
        intid,
        compatible: compatible.to_string(),
    })
}

/// Resolves a `stdout-path` value ("path-or-alias[:options]") to its node.
fn stdout_node<'b, 'a>(fdt: &'b Fdt<'a>, value: &str) -> Option<FdtNode<'b, 'a>> {
    let name = value.split(':').next()?.trim();
    // Aliases are resolved here rather than through `Fdt::find_node`'s own fallback, because
    // that recurses without bound on an alias whose value is itself an unknown alias.
    let path = if name.starts_with('/') {
        name
    } else {
        prop_str(fdt.find_node("/aliases")?, name)?
    };
    if !path.starts_with('/') {
        return None;
    }
    fdt.find_node(path)
}

fn modules(root: FdtNode, chosen: FdtNode) -> Result<Vec<BootModule>> {
    // QEMU's guest-loader writes module `reg`s with the root's cell sizes and no cell
    // properties on /chosen; Xen copes because its walker inherits cell sizes from the parent.
    // Do the same, rather than the spec default of 2/1 which misreads those modules.
    let acells = prop_u32(chosen, "#address-cells")
        .or_else(|| prop_u32(root, "#address-cells"))
        .unwrap_or(2);
    let scells = prop_u32(chosen, "#size-cells")
        .or_else(|| prop_u32(root, "#size-cells"))
        .unwrap_or(1);
    let mut modules = Vec::new();
    for node in chosen.children() {
        let compat: Vec<&str> = compatibles(node).collect();
        let kind = if compat.contains(&"multiboot,kernel") {
            ModuleKind::Kernel
        } else if compat.contains(&"multiboot,ramdisk") {
            ModuleKind::Ramdisk
        } else if compat.contains(&"multiboot,module") {
            ModuleKind::Other
        } else {
            continue;
        };
        let value = node
            .property("reg")
            .ok_or_else(|| missing(node, "reg"))?
            .value;
        let range = decode_reg(node, value, acells, scells)?
            .first()
            .copied()
            .ok_or_else(|| missing(node, "reg"))?;
        let bootargs = prop_str(node, "bootargs").map(ToString::to_string);
        modules.push(BootModule {
            kind,
            range,
            bootargs,
        });
    }
    Ok(modules)
}

/// Decodes a node's `reg` with its parent's cell sizes (`fdt` knows the parent, we do not);
/// an absent `reg` is an empty list.
pub(crate) fn reg(node: FdtNode) -> Result<Vec<MemRange>> {
    let Some(prop) = node.property("reg") else {
        return Ok(Vec::new());
    };
    if prop.value.is_empty() {
        return Ok(Vec::new());
    }
    // The first entry tells us the parent's cell sizes. Only the first: with zero cells on both
    // sides `raw_reg` never ends.
    let first = node
        .raw_reg()
        .and_then(|mut r| r.next())
        .ok_or_else(|| bad(node, "reg", "shorter than one entry"))?;
    let acells = (first.address.len() / 4) as u32;
    let scells = (first.size.len() / 4) as u32;
    decode_reg(node, prop.value, acells, scells)
}

fn decode_reg(node: FdtNode, value: &[u8], acells: u32, scells: u32) -> Result<Vec<MemRange>> {
    if acells == 0 || acells > 2 || scells > 2 {
        return Err(bad(node, "reg", "unsupported #address-cells/#size-cells"));
    }
    let (alen, slen) = (acells as usize * 4, scells as usize * 4);
    if !value.len().is_multiple_of(alen + slen) {
        return Err(bad(node, "reg", "length is not a whole number of entries"));
    }
    value
        .chunks_exact(alen + slen)
        .map(|entry| {
            let (base, size) = (be(&entry[..alen]), be(&entry[alen..]));
            if base.checked_add(size).is_none() {
                return Err(bad(
                    node,
                    "reg",
                    "range wraps past the top of the address space",
                ));
            }
            Ok(MemRange { base, size })
        })
        .collect()
}

/// Decodes GIC interrupt specifiers into (INTID, trigger flags).
fn interrupts(node: FdtNode, icells: u32) -> Result<Vec<(u32, u32)>> {
    let Some(prop) = node.property("interrupts") else {
        return Ok(Vec::new());
    };
    // GICv3 specifiers are <type number flags> with an optional fourth (PPI partition) cell.
    if !(3..=4).contains(&icells) {
        return Err(bad(
            node,
            "interrupts",
            "interrupt parent's #interrupt-cells is not 3 or 4",
        ));
    }
    let stride = icells as usize * 4;
    if !prop.value.len().is_multiple_of(stride) {
        return Err(bad(
            node,
            "interrupts",
            "length is not a whole number of specifiers",
        ));
    }
    prop.value
        .chunks_exact(stride)
        .map(|spec| {
            let cell = |i: usize| be(&spec[i * 4..i * 4 + 4]) as u32;
            let (kind, num) = (cell(0), cell(1));
            // Ranges from the GICv3 binding: SPI 0-987, PPI 0-15, ESPI 0-1023, EPPI 0-63.
            let intid = match kind {
                0 if num < 988 => 32 + num,
                1 if num < 16 => 16 + num,
                2 if num < 1024 => 4096 + num,
                3 if num < 64 => 1056 + num,
                _ => {
                    return Err(bad(
                        node,
                        "interrupts",
                        "unknown type or out-of-range number",
                    ))
                }
            };
            Ok((intid, cell(2)))
        })
        .collect()
}

/// Big-endian value of up to two cells (callers guarantee the length).
pub(crate) fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

pub(crate) fn prop_u32(node: FdtNode, name: &str) -> Option<u32> {
    let value = node.property(name)?.value;
    let bytes: [u8; 4] = value.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// A string property, up to its first NUL (a stringlist yields its first string).
pub(crate) fn prop_str<'a>(node: FdtNode<'_, 'a>, name: &str) -> Option<&'a str> {
    let value = node.property(name)?.value;
    let end = value.iter().position(|&b| b == 0)?;
    core::str::from_utf8(&value[..end]).ok()
}

pub(crate) fn compatibles<'a>(node: FdtNode<'_, 'a>) -> impl Iterator<Item = &'a str> {
    let value = node.property("compatible").map_or(&[][..], |p| p.value);
    value
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| core::str::from_utf8(s).ok())
}

pub(crate) fn is_enabled(node: FdtNode) -> bool {
    matches!(prop_str(node, "status"), None | Some("okay") | Some("ok"))
}

fn node_name(node: FdtNode) -> String {
    if node.name.is_empty() { "/" } else { node.name }.to_string()
}

pub(crate) fn missing(node: FdtNode, property: &'static str) -> PlatformError {
    PlatformError::MissingProperty {
        node: node_name(node),
        property,
    }
}

pub(crate) fn bad(node: FdtNode, property: &'static str, reason: &'static str) -> PlatformError {
    PlatformError::BadProperty {
        node: node_name(node),
        property,
        reason,
    }
}

fn malformed(offset: usize, reason: &'static str) -> PlatformError {
    PlatformError::Malformed { offset, reason }
}

/// What [`check_blob`] learned while validating.
struct CheckedBlob {
    /// `totalsize` from the header (never more than the buffer).
    total: usize,
    /// `/memreserve/` entries with a non-zero size.
    memreserve: Vec<MemRange>,
    /// The blob with NOP tokens removed, if it had any.
    compacted: Option<Vec<u8>>,
}

fn read_u32(data: &[u8], off: usize) -> Option<u32> {
    let bytes: [u8; 4] = data.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Validates everything the `fdt` crate would otherwise `unwrap`/`expect`/index blindly.
fn check_blob(dtb: &[u8]) -> Result<CheckedBlob> {
    let field = |i: usize| read_u32(dtb, i * 4).map(|v| v as usize);
    let (Some(magic), Some(total)) = (field(0), field(1)) else {
        return Err(malformed(0, "shorter than the FDT header"));
    };
    if magic != FDT_MAGIC as usize {
        return Err(malformed(0, "bad magic"));
    }
    if dtb.len() < HEADER_LEN || total < HEADER_LEN || total > dtb.len() {
        return Err(malformed(
            4,
            "totalsize is smaller than the header or larger than the buffer",
        ));
    }
    let blob = &dtb[..total];
    let [off_struct, off_strings, off_rsv, version, last_comp, _, size_strings, size_struct] =
        core::array::from_fn(|i| field(i + 2).unwrap_or(0));
    // Version 17 is the first with size_dt_struct, which we rely on to bound the walk.
    if version < 17 || last_comp > 17 {
        return Err(malformed(
            20,
            "unsupported FDT version (need 17-compatible)",
        ));
    }
    let struct_end = off_struct.checked_add(size_struct).filter(|&e| e <= total);
    let strings_end = off_strings
        .checked_add(size_strings)
        .filter(|&e| e <= total);
    let (Some(struct_end), Some(strings_end)) = (struct_end, strings_end) else {
        return Err(malformed(8, "structure or strings block outside the blob"));
    };
    let strings = &blob[off_strings..strings_end];

    let mut memreserve = Vec::new();
    let mut off = off_rsv;
    loop {
        let entry = off
            .checked_add(16)
            .and_then(|end| blob.get(off..end))
            .ok_or_else(|| malformed(off, "memory reservation map runs off the blob"))?;
        let (base, size) = (be(&entry[..8]), be(&entry[8..]));
        if base == 0 && size == 0 {
            break;
        }
        if base.checked_add(size).is_none() {
            return Err(malformed(off, "memory reservation wraps"));
        }
        if size != 0 {
            memreserve.push(MemRange { base, size });
        }
        off += 16;
    }

    let structure = &blob[off_struct..struct_end];
    let err = |pos: usize, reason| malformed(off_struct + pos, reason);
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut saw_nop = false;
    let mut depth = 0usize;
    let mut seen_root = false;
    // Set once a node has had a child: `fdt` cannot cope with properties after subnodes.
    let mut after_child = false;
    let mut pos = 0usize;
    loop {
        let token = read_u32(structure, pos)
            .ok_or_else(|| err(pos, "structure block ends without FDT_END"))?;
        let start = pos;
        match token {
            FDT_BEGIN_NODE => {
                if seen_root && depth == 0 {
                    return Err(err(pos, "more than one root node"));
                }
                let name = cstr(structure, pos + 4)
                    .ok_or_else(|| err(pos, "node name is not a NUL-terminated UTF-8 string"))?;
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(err(pos, "nodes nested too deeply"));
                }
                seen_root = true;
                after_child = false;
                pos = align4(pos + 4 + name.len() + 1);
            }
            FDT_END_NODE => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| err(pos, "FDT_END_NODE without a node"))?;
                after_child = true;
                pos += 4;
            }
            FDT_PROP => {
                if depth == 0 {
                    return Err(err(pos, "property outside any node"));
                }
                if after_child {
                    return Err(err(pos, "property after a subnode"));
                }
                let (Some(len), Some(name_off)) =
                    (read_u32(structure, pos + 4), read_u32(structure, pos + 8))
                else {
                    return Err(err(pos, "truncated property header"));
                };
                let data_end = (pos + 12)
                    .checked_add(len as usize)
                    .filter(|&e| e <= structure.len())
                    .ok_or_else(|| err(pos, "property value runs off the structure block"))?;
                let name = cstr(strings, name_off as usize).ok_or_else(|| {
                    err(
                        pos,
                        "property name is not a NUL-terminated UTF-8 string in the strings block",
                    )
                })?;
                // Property names cannot contain '/' (DT spec 2.2.4); one that did could make
                // `fdt`'s alias fallback in `find_node` recurse forever.
                if name.contains('/') {
                    return Err(err(pos, "property name contains '/'"));
                }
                // `fdt` `expect`s these to be at least one cell.
                if (name == "#address-cells" || name == "#size-cells") && len != 4 {
                    return Err(err(pos, "#address-cells/#size-cells is not one cell"));
                }
                pos = align4(data_end);
            }
            FDT_NOP => {
                saw_nop = true;
                pos += 4;
                continue;
            }
            FDT_END => {
                if depth != 0 || !seen_root {
                    return Err(err(pos, "FDT_END inside a node or before the root"));
                }
                kept.push((start, pos + 4));
                break;
            }
            _ => return Err(err(pos, "unknown structure token")),
        }
        kept.push((start, pos.min(structure.len())));
    }

    let compacted = saw_nop.then(|| {
        let mut out = blob.to_vec();
        let mut w = off_struct;
        for &(s, e) in &kept {
            out.copy_within(off_struct + s..off_struct + e, w);
            w += e - s;
        }
        // The strings block stays where it was; only the structure block shrinks.
        out[w..struct_end].fill(0);
        out[36..40].copy_from_slice(&((w - off_struct) as u32).to_be_bytes());
        out
    });
    Ok(CheckedBlob {
        total,
        memreserve,
        compacted,
    })
}

/// The NUL-terminated UTF-8 string at `off`, without its NUL.
fn cstr(data: &[u8], off: usize) -> Option<&str> {
    let rest = data.get(off..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    core::str::from_utf8(&rest[..end]).ok()
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_fdt::{FdtReserveEntry, FdtWriter};

    const QEMU_VIRT: &[u8] = include_bytes!("../tests/data/qemu-virt-gicv3.dtb");
    const QEMU_VIRT_MODULES: &[u8] = include_bytes!("../tests/data/qemu-virt-gicv3-modules.dtb");

    fn qemu_expected() -> Platform {
        // Values read off `dtc -I dtb -O dts tests/data/qemu-virt-gicv3.dtb`.
        Platform {
            memory: vec![MemRange {
                base: 0x4000_0000,
                size: 0x1_0000_0000,
            }],
            reserved: vec![],
            cpus: vec![0, 1, 2, 3],
            psci: Some(PsciConduit::Smc),
            gic: GicInfo {
                gicd: MemRange {
                    base: 0x800_0000,
                    size: 0x1_0000,
                },
                gicr: MemRange {
                    base: 0x80a_0000,
                    size: 0xf6_0000,
                },
                maintenance_ppi: 25,
            },
            timer: TimerInfo {
                intids: [29, 30, 27, 26],
                flags: [4; 4],
            },
            uart: UartInfo {
                base: MemRange {
                    base: 0x900_0000,
                    size: 0x1000,
                },
                intid: 33,
                compatible: "arm,pl011".to_string(),
            },
            modules: vec![],
            bootargs: None,
            smmu: None,
        }
    }

    #[test]
    fn qemu_virt() {
        assert_eq!(Platform::parse(QEMU_VIRT).unwrap(), qemu_expected());
    }

    #[test]
    fn qemu_virt_smmuv3() {
        // Values read off `dtc -I dtb -O dts tests/data/qemu-virt-smmuv3-pci.dtb`: SPIs 74-77.
        let p = Platform::parse(include_bytes!("../tests/data/qemu-virt-smmuv3-pci.dtb")).unwrap();
        assert_eq!(
            p.smmu,
            Some(SmmuInfo {
                regs: MemRange {
                    base: 0x905_0000,
                    size: 0x2_0000,
                },
                eventq_intid: Some(32 + 0x4a),
                gerror_intid: Some(32 + 0x4d),
            })
        );
    }

    #[test]
    fn qemu_virt_guest_loader_modules() {
        let p = Platform::parse(QEMU_VIRT_MODULES).unwrap();
        // QEMU adds the ramdisk node last but it ends up first in the blob.
        assert_eq!(
            p.modules,
            vec![
                BootModule {
                    kind: ModuleKind::Ramdisk,
                    range: MemRange {
                        base: 0x5000_0000,
                        size: 0xc
                    },
                    bootargs: None,
                },
                BootModule {
                    kind: ModuleKind::Kernel,
                    range: MemRange {
                        base: 0x4800_0000,
                        size: 0x12
                    },
                    bootargs: Some("console=ttyAMA0 hvtest=x".to_string()),
                },
            ]
        );
        assert_eq!(
            Platform {
                modules: vec![],
                ..p
            },
            qemu_expected()
        );
    }

    #[test]
    fn memrange_end() {
        assert_eq!(
            MemRange {
                base: 0x1000,
                size: 0x2000
            }
            .end(),
            0x3000
        );
        assert_eq!(
            MemRange {
                base: u64::MAX,
                size: 2
            }
            .end(),
            u64::MAX
        );
    }

    /// Knobs for the synthetic DT, each removing or changing one thing.
    struct Opts {
        memory: bool,
        gic: bool,
        timer: bool,
        uarts: bool,
        psci_method: Option<&'static str>,
        stdout: Option<&'static str>,
        timer_irqs: &'static [u32],
    }

    const FULL: Opts = Opts {
        memory: true,
        gic: true,
        timer: true,
        uarts: true,
        psci_method: Some("hvc"),
        stdout: Some("serial1:115200n8"),
        timer_irqs: &[1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8],
    };

    /// A board unlike QEMU's: devices under a 1/1-cell bus, 2-cell MPIDRs, reservations,
    /// stdout-path through an alias with options, /chosen with its own cell sizes.
    fn synth(o: &Opts) -> Vec<u8> {
        let rsv = [FdtReserveEntry::new(0x8000_0000, 0x1000).unwrap()];
        let mut w = FdtWriter::new_with_mem_reserv(&rsv).unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_u32("interrupt-parent", 1).unwrap();
        if o.memory {
            let n = w.begin_node("memory@80000000").unwrap();
            w.property_string("device_type", "memory").unwrap();
            w.property_array_u64("reg", &[0x8000_0000, 0x4000_0000])
                .unwrap();
            w.end_node(n).unwrap();
            let n = w.begin_node("memory@40000000").unwrap();
            w.property_string("device_type", "memory").unwrap();
            w.property_array_u64("reg", &[0x6000_0000, 0x1000_0000, 0x4000_0000, 0x1000_0000])
                .unwrap();
            w.end_node(n).unwrap();
            let n = w.begin_node("memory@c0000000").unwrap();
            w.property_string("device_type", "memory").unwrap();
            w.property_string("status", "disabled").unwrap();
            w.property_array_u64("reg", &[0xc000_0000, 0x1000_0000])
                .unwrap();
            w.end_node(n).unwrap();
        }
        let rm = w.begin_node("reserved-memory").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_null("ranges").unwrap();
        let n = w.begin_node("fw@48000000").unwrap();
        w.property_array_u64("reg", &[0x4800_0000, 0x10_0000])
            .unwrap();
        w.property_null("no-map").unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("cma").unwrap();
        w.property_array_u64("size", &[0x100_0000]).unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("off@50000000").unwrap();
        w.property_string("status", "disabled").unwrap();
        w.property_array_u64("reg", &[0x5000_0000, 0x1000]).unwrap();
        w.end_node(n).unwrap();
        w.end_node(rm).unwrap();

        let cpus = w.begin_node("cpus").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 0).unwrap();
        for mpidr in [0x0u64, 0x1_0000_0100] {
            let n = w.begin_node(&format!("cpu@{mpidr:x}")).unwrap();
            w.property_string("device_type", "cpu").unwrap();
            w.property_u64("reg", mpidr).unwrap();
            w.end_node(n).unwrap();
        }
        let n = w.begin_node("cpu-map").unwrap();
        w.end_node(n).unwrap();
        w.end_node(cpus).unwrap();

        if let Some(method) = o.psci_method {
            let n = w.begin_node("psci").unwrap();
            w.property_string_list(
                "compatible",
                vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
            )
            .unwrap();
            w.property_string("method", method).unwrap();
            w.end_node(n).unwrap();
        }

        let soc = w.begin_node("soc").unwrap();
        w.property_u32("#address-cells", 1).unwrap();
        w.property_u32("#size-cells", 1).unwrap();
        w.property_null("ranges").unwrap();
        if o.gic {
            let n = w.begin_node("intc@2f000000").unwrap();
            w.property_string("compatible", "arm,gic-v3").unwrap();
            w.property_u32("#interrupt-cells", 3).unwrap();
            w.property_null("interrupt-controller").unwrap();
            w.property_array_u32("reg", &[0x2f00_0000, 0x1_0000, 0x2f10_0000, 0x20_0000])
                .unwrap();
            w.property_array_u32("interrupts", &[1, 9, 4]).unwrap();
            w.property_phandle(1).unwrap();
            w.end_node(n).unwrap();
        }
        if o.uarts {
            for (addr, spi) in [(0x1c09_0000u32, 5u32), (0x1c0a_0000, 6)] {
                let n = w.begin_node(&format!("serial@{addr:x}")).unwrap();
                w.property_string_list(
                    "compatible",
                    vec!["arm,pl011".into(), "arm,primecell".into()],
                )
                .unwrap();
                w.property_array_u32("reg", &[addr, 0x1000]).unwrap();
                w.property_array_u32("interrupts", &[0, spi, 4]).unwrap();
                w.end_node(n).unwrap();
            }
        }
        w.end_node(soc).unwrap();

        if o.timer {
            let n = w.begin_node("timer").unwrap();
            w.property_string("compatible", "arm,armv8-timer").unwrap();
            w.property_array_u32("interrupts", o.timer_irqs).unwrap();
            w.end_node(n).unwrap();
        }

        let n = w.begin_node("aliases").unwrap();
        w.property_string("serial0", "/soc/serial@1c090000")
            .unwrap();
        w.property_string("serial1", "/soc/serial@1c0a0000")
            .unwrap();
        w.property_string("loop", "loop").unwrap();
        w.end_node(n).unwrap();

        let chosen = w.begin_node("chosen").unwrap();
        w.property_u32("#address-cells", 1).unwrap();
        w.property_u32("#size-cells", 1).unwrap();
        w.property_string("bootargs", "hv=1").unwrap();
        if let Some(stdout) = o.stdout {
            w.property_string("stdout-path", stdout).unwrap();
        }
        let n = w.begin_node("module@90000000").unwrap();
        w.property_string_list(
            "compatible",
            vec!["multiboot,kernel".into(), "multiboot,module".into()],
        )
        .unwrap();
        w.property_array_u32("reg", &[0x9000_0000, 0x20_0000])
            .unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("module@a0000000").unwrap();
        w.property_string("compatible", "multiboot,module").unwrap();
        w.property_array_u32("reg", &[0xa000_0000, 0x1000]).unwrap();
        w.property_string("bootargs", "blob").unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("other").unwrap();
        w.property_string("compatible", "something,else").unwrap();
        w.end_node(n).unwrap();
        w.end_node(chosen).unwrap();

        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn synthetic_board() {
        let p = Platform::parse(&synth(&FULL)).unwrap();
        let r = |base, size| MemRange { base, size };
        assert_eq!(
            p.memory,
            vec![
                r(0x4000_0000, 0x1000_0000),
                r(0x6000_0000, 0x1000_0000),
                r(0x8000_0000, 0x4000_0000)
            ]
        );
        assert_eq!(
            p.reserved,
            vec![r(0x4800_0000, 0x10_0000), r(0x8000_0000, 0x1000)]
        );
        assert_eq!(p.cpus, vec![0, 0x1_0000_0100]);
        assert_eq!(p.psci, Some(PsciConduit::Hvc));
        assert_eq!(
            p.gic,
            GicInfo {
                gicd: r(0x2f00_0000, 0x1_0000),
                gicr: r(0x2f10_0000, 0x20_0000),
                maintenance_ppi: 25
            }
        );
        assert_eq!(
            p.timer,
            TimerInfo {
                intids: [29, 30, 27, 26],
                flags: [8; 4]
            }
        );
        assert_eq!(
            p.uart,
            UartInfo {
                base: r(0x1c0a_0000, 0x1000),
                intid: 38,
                compatible: "arm,pl011".into()
            }
        );
        assert_eq!(
            p.modules,
            vec![
                BootModule {
                    kind: ModuleKind::Kernel,
                    range: r(0x9000_0000, 0x20_0000),
                    bootargs: None
                },
                BootModule {
                    kind: ModuleKind::Other,
                    range: r(0xa000_0000, 0x1000),
                    bootargs: Some("blob".into())
                },
            ]
        );
        assert_eq!(p.bootargs.as_deref(), Some("hv=1"));
    }

    #[test]
    fn stdout_path_variants() {
        let uart_base = |stdout| {
            let dtb = synth(&Opts { stdout, ..FULL });
            Platform::parse(&dtb).unwrap().uart.base.base
        };
        assert_eq!(uart_base(Some("/soc/serial@1c0a0000")), 0x1c0a_0000);
        assert_eq!(uart_base(Some("/soc/serial@1c0a0000:115200")), 0x1c0a_0000);
        assert_eq!(uart_base(Some("serial1")), 0x1c0a_0000);
        // Unresolvable or self-referential: fall back to the first PL011.
        assert_eq!(uart_base(Some("serial7")), 0x1c09_0000);
        assert_eq!(uart_base(Some("loop")), 0x1c09_0000);
        assert_eq!(uart_base(Some("/nowhere")), 0x1c09_0000);
        assert_eq!(uart_base(None), 0x1c09_0000);
    }

    #[test]
    fn missing_mandatory_nodes() {
        let err = |o: Opts| Platform::parse(&synth(&o)).unwrap_err();
        assert_eq!(err(Opts { gic: false, ..FULL }), PlatformError::NoGic);
        assert_eq!(
            err(Opts {
                timer: false,
                ..FULL
            }),
            PlatformError::NoTimer
        );
        assert_eq!(
            err(Opts {
                memory: false,
                ..FULL
            }),
            PlatformError::NoMemory
        );
        assert_eq!(
            err(Opts {
                uarts: false,
                ..FULL
            }),
            PlatformError::NoUart
        );
        assert_eq!(
            err(Opts {
                psci_method: Some("svc"),
                ..FULL
            }),
            PlatformError::UnknownPsciMethod("svc".into())
        );
        assert!(matches!(
            err(Opts {
                timer_irqs: &[1, 13, 8, 1, 14, 8],
                ..FULL
            }),
            PlatformError::BadProperty {
                property: "interrupts",
                ..
            }
        ));
        assert!(matches!(
            err(Opts {
                timer_irqs: &[1, 16, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8],
                ..FULL
            }),
            PlatformError::BadProperty {
                property: "interrupts",
                ..
            }
        ));
        let no_psci = Platform::parse(&synth(&Opts {
            psci_method: None,
            ..FULL
        }))
        .unwrap();
        assert_eq!(no_psci.psci, None);
        assert!(err(Opts { gic: false, ..FULL })
            .to_string()
            .contains("arm,gic-v3"));
    }

    #[test]
    fn malformed_blobs() {
        assert!(matches!(
            Platform::parse(&[]),
            Err(PlatformError::Malformed { .. })
        ));
        assert!(matches!(
            Platform::parse(&[0u8; 64]),
            Err(PlatformError::Malformed { .. })
        ));
        let truncated = &QEMU_VIRT[..QEMU_VIRT.len() - 1];
        assert!(matches!(
            Platform::parse(truncated),
            Err(PlatformError::Malformed { .. })
        ));
    }

    /// Inserts a NOP token before every token of the structure block, fixing up the header.
    fn with_nops(dtb: &[u8]) -> Vec<u8> {
        let field = |i: usize| read_u32(dtb, i * 4).unwrap() as usize;
        let (off_struct, off_strings, size_struct) = (field(2), field(3), field(9));
        let strings = &dtb[off_strings..off_strings + field(8)];
        let s = &dtb[off_struct..off_struct + size_struct];
        let mut out_struct = Vec::new();
        let mut pos = 0;
        loop {
            let tok = read_u32(s, pos).unwrap();
            let next = match tok {
                FDT_BEGIN_NODE => align4(pos + 4 + cstr(s, pos + 4).unwrap().len() + 1),
                FDT_PROP => align4(pos + 12 + read_u32(s, pos + 4).unwrap() as usize),
                _ => pos + 4,
            };
            out_struct.extend_from_slice(&FDT_NOP.to_be_bytes());
            out_struct.extend_from_slice(&s[pos..next]);
            if tok == FDT_END {
                break;
            }
            pos = next;
        }
        // Rebuild as header | rsvmap | struct | strings.
        let mut out = dtb[..off_struct].to_vec();
        out.extend_from_slice(&out_struct);
        let new_strings = out.len();
        out.extend_from_slice(strings);
        let total = out.len();
        out[4..8].copy_from_slice(&(total as u32).to_be_bytes());
        out[12..16].copy_from_slice(&(new_strings as u32).to_be_bytes());
        out[36..40].copy_from_slice(&(out_struct.len() as u32).to_be_bytes());
        out
    }

    #[test]
    fn nop_tokens_are_tolerated() {
        // The raw `fdt` crate misreads (or panics on) this blob, which is why `check_blob`
        // compacts it.
        let nops = with_nops(QEMU_VIRT);
        let raw = std::panic::catch_unwind(|| {
            let fdt = Fdt::new(&nops).unwrap();
            fdt.find_node("/chosen").map(|n| n.name)
        });
        assert!(!matches!(raw, Ok(Some("chosen"))));
        assert_eq!(
            Platform::parse(&with_nops(QEMU_VIRT)).unwrap(),
            qemu_expected()
        );
        let synth = synth(&FULL);
        assert_eq!(Platform::parse(&with_nops(&synth)), Platform::parse(&synth));
    }

    #[test]
    fn corrupted_blobs_never_panic() {
        // Every byte of the blob, set to a few nasty values: parse may fail or even succeed,
        // but must return.
        let base = synth(&FULL);
        for i in 0..base.len() {
            for v in [0x00, 0x01, 0x03, 0x04, 0x7f, 0xff] {
                let mut dtb = base.clone();
                dtb[i] = v;
                let _ = Platform::parse(&dtb);
            }
        }
        for len in 0..base.len() {
            let _ = Platform::parse(&base[..len]);
        }
    }
}

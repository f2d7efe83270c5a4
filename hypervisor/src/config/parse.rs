//! Step one: each VM node of `/chosen` read into a [`VmSpec`], checking only what the node
//! itself says.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;

use log::Level;

use super::error::cfg_err;
use super::xen::{self, Note, XenCtx, XEN_DOMAIN};
use super::{ConfigError, IommuKind, ModuleSpec, NotedSpecs, VmSpec};
use crate::platform::tree::Tree;
use crate::platform::{self, MemRange, PlatformError};

/// The `compatible` that marks a `/chosen` child as a VM.
const VM_COMPATIBLE: &str = "smmu-hv,vm";

/// Every VM node of /chosen, in DT order: `compatible = "smmu-hv,vm"`, and
/// `compatible = "xen,domain"` under `/chosen/smmu-hv,xen-dom0less;`. Ok(empty) if there are
/// none. A node that cannot be read gives Err for that node only. What [`parse_vm_specs_noted`]
/// notes is logged.
pub fn parse_vm_specs(dtb: &[u8]) -> Result<Vec<Result<VmSpec, ConfigError>>, PlatformError> {
    let (specs, notes) = parse_vm_specs_noted(dtb)?;
    for (level, note) in notes {
        log::log!(level, "config: {note}");
    }
    Ok(specs)
}

/// [`parse_vm_specs`], with the lines to log (Xen domains left alone, Xen properties ignored)
/// returned instead of logged.
pub fn parse_vm_specs_noted(dtb: &[u8]) -> Result<NotedSpecs, PlatformError> {
    platform::with_fdt(dtb, |fdt| {
        let mut notes = Vec::new();
        let (Some(root), Some(chosen)) = (fdt.find_node("/"), fdt.find_node("/chosen")) else {
            return (Vec::new(), notes);
        };
        let (opt_in, bad_opt_in) = platform::xen_opt_in(chosen);
        notes.extend(bad_opt_in.map(|w| (Level::Warn, w)));
        let is = |n: FdtNode, c: &str| platform::compatibles(n).any(|x| x == c);
        let xen_domains = chosen
            .children()
            .filter(|n| !is(*n, VM_COMPATIBLE) && is(*n, XEN_DOMAIN))
            .count();
        // Built only for Xen domains, which are the only nodes with phandles to follow.
        let tree = (opt_in && xen_domains > 0)
            .then(|| Tree::new(fdt))
            .flatten();
        let ctx = tree.as_ref().map(|tree| XenCtx {
            tree,
            static_mem_cells: xen::chosen_cells(root, chosen),
        });
        if xen_domains > 0 && ctx.is_none() {
            notes.push((
                Level::Warn,
                format!("/chosen has {xen_domains} xen,domain node(s) (a Xen dom0less configuration): ignored; add `{};` to /chosen to run them as VMs", platform::XEN_OPT_IN),
            ));
        }
        let specs = chosen
            .children()
            .filter_map(|n| {
                if is(n, VM_COMPATIBLE) {
                    Some(parse_node(n, None, &mut notes))
                } else if is(n, XEN_DOMAIN) {
                    ctx.as_ref().map(|c| parse_node(n, Some(c), &mut notes))
                } else {
                    None
                }
            })
            .collect();
        (specs, notes)
    })
}

/// Xen's legacy (4.4) module compatibles next to today's: `xen,linux-zimage` is a kernel,
/// `xen,linux-initrd` a ramdisk (their generic `xen,multiboot-module` says nothing more).
const KERNEL_COMPATIBLES: [&str; 2] = ["multiboot,kernel", "xen,linux-zimage"];
const RAMDISK_COMPATIBLES: [&str; 2] = ["multiboot,ramdisk", "xen,linux-initrd"];

fn parse_node(
    node: FdtNode,
    xen: Option<&XenCtx>,
    notes: &mut Vec<Note>,
) -> Result<VmSpec, ConfigError> {
    let name = match node.property("smmu-hv,name") {
        None => node.name.to_string(),
        Some(_) => match platform::prop_str(node, "smmu-hv,name") {
            Some(s) if !s.is_empty() => s.to_string(),
            // Errors must name some VM: fall back to the node name.
            _ => {
                return Err(cfg_err(
                    node.name,
                    "smmu-hv,name",
                    "not a non-empty NUL-terminated string",
                ))
            }
        },
    };
    let err = |field, reason: String| cfg_err(&name, field, reason);

    // `check_blob` guarantees these are one cell if present. Sizes of 0 would make every
    // `reg` an address list, which means nothing for a module or static memory.
    let acells = platform::prop_u32(node, "#address-cells").unwrap_or(2);
    if !(1..=2).contains(&acells) {
        return Err(err("#address-cells", format!("{acells} (must be 1 or 2)")));
    }
    let scells = platform::prop_u32(node, "#size-cells").unwrap_or(2);
    if !(1..=2).contains(&scells) {
        return Err(err("#size-cells", format!("{scells} (must be 1 or 2)")));
    }

    let vcpus = match node.property("cpus").map(|p| p.value) {
        None => return Err(err("cpus", "missing".into())),
        Some(v) => u32_cells(v, 1).ok_or_else(|| {
            err(
                "cpus",
                format!("must be one u32 cell, is {} bytes", v.len()),
            )
        })?[0],
    };

    let pcpus = match node.property("smmu-hv,cpus").map(|p| p.value) {
        None => None,
        Some(v) => Some(
            u32_cells(v, v.len() / 4)
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    err(
                        "smmu-hv,cpus",
                        format!("must be one or more u32 cells, is {} bytes", v.len()),
                    )
                })?
                .into_iter()
                .map(u64::from)
                .collect(),
        ),
    };

    let mem_size = match node.property("memory").map(|p| p.value) {
        None => return Err(err("memory", "missing".into())),
        // Xen's binding: a 64-bit KiB count, always two cells whatever #size-cells says.
        Some(v) if v.len() == 8 => {
            let kib = platform::be(v);
            kib.checked_mul(1024)
                .ok_or_else(|| err("memory", format!("{kib} KiB overflows 64 bits of bytes")))?
        }
        Some(v) => {
            return Err(err(
                "memory",
                format!(
                    "must be two u32 cells (a 64-bit KiB count), is {} bytes",
                    v.len()
                ),
            ))
        }
    };

    let static_mem = match node.property("smmu-hv,static-mem").map(|p| p.value) {
        None => None,
        Some(v) => Some(
            one_range(v, acells, scells).map_err(|r| err("smmu-hv,static-mem", r.to_string()))?,
        ),
    };

    let mut kernel = None;
    let mut ramdisk = None;
    for child in node.children() {
        let is = |cs: [&str; 2]| platform::compatibles(child).any(|x| cs.contains(&x));
        let is_kernel = is(KERNEL_COMPATIBLES);
        if !is_kernel && !is(RAMDISK_COMPATIBLES) {
            // Other `multiboot,module`s (device trees, policies, ...) are not ours to use.
            continue;
        }
        let kind = if is_kernel { "kernel" } else { "ramdisk" };
        let merr = |reason: String| err("module", format!("{kind} {}: {reason}", child.name));
        let reg = child
            .property("reg")
            .ok_or_else(|| merr("no `reg`".into()))?;
        let range = one_range(reg.value, acells, scells).map_err(|r| merr(format!("`reg` {r}")))?;
        if range.size == 0 {
            return Err(merr("empty".into()));
        }
        if is_kernel {
            if kernel.is_some() {
                return Err(merr("more than one multiboot,kernel module".into()));
            }
            let bootargs = match child.property("bootargs") {
                None => None,
                Some(_) => Some(
                    platform::prop_str(child, "bootargs")
                        .ok_or_else(|| merr("`bootargs` is not a NUL-terminated string".into()))?
                        .to_string(),
                ),
            };
            kernel = Some(ModuleSpec { range, bootargs });
        } else {
            if ramdisk.is_some() {
                return Err(merr("more than one multiboot,ramdisk module".into()));
            }
            ramdisk = Some(range);
        }
    }

    let pci_devices = match node.property("smmu-hv,pci-devices").map(|p| p.value) {
        None => Vec::new(),
        Some(v) => {
            let mut out = Vec::new();
            for s in v.split(|&b| b == 0).filter(|s| !s.is_empty()) {
                let bdf = core::str::from_utf8(s)
                    .ok()
                    .and_then(crate::pci::PciAddr::parse)
                    .ok_or_else(|| {
                        err(
                            "smmu-hv,pci-devices",
                            format!(
                                "{:?} is not a BB:DD.F or DDDD:BB:DD.F function",
                                String::from_utf8_lossy(s)
                            ),
                        )
                    })?;
                if out.contains(&bdf) {
                    return Err(err("smmu-hv,pci-devices", format!("{bdf} named twice")));
                }
                out.push(bdf);
            }
            out
        }
    };

    // A boolean: present or absent (DT spec 2.2.4, an empty value), so that a typo such as
    // `= <0>` meaning "no" is refused rather than read as "yes".
    let intx_only = match node.property("smmu-hv,intx-only") {
        None => false,
        Some(p) if p.value.is_empty() => true,
        Some(_) => {
            return Err(err(
                "smmu-hv,intx-only",
                "is a boolean: it takes no value (present means INTx only)".into(),
            ))
        }
    };

    let iommu = match node.property("smmu-hv,iommu") {
        None => IommuKind::default(),
        Some(_) => platform::prop_str(node, "smmu-hv,iommu")
            .and_then(IommuKind::parse)
            .ok_or_else(|| {
                err(
                    "smmu-hv,iommu",
                    "must be \"smmuv3\" or \"virtio-iommu\"".into(),
                )
            })?,
    };

    let mut spec = VmSpec {
        name,
        vcpus,
        pcpus,
        mem_size,
        static_mem,
        kernel,
        ramdisk,
        pci_devices,
        intx_only,
        iommu,
        cpupool: None,
    };
    if let Some(ctx) = xen {
        xen::apply(node, ctx, &mut spec, notes)?;
    }
    Ok(spec)
}

/// `value` as exactly `n` big-endian u32 cells.
fn u32_cells(value: &[u8], n: usize) -> Option<Vec<u32>> {
    if value.len() != n * 4 {
        return None;
    }
    Some(
        value
            .chunks_exact(4)
            .map(|c| platform::be(c) as u32)
            .collect(),
    )
}

/// Why a `<base size>` property is not one usable range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not exactly one entry of the node's cell sizes.
    #[error("must be one <base size> entry of {acells}+{scells} cells, is {len} bytes")]
    Cells {
        /// `#address-cells`.
        acells: u32,
        /// `#size-cells`.
        scells: u32,
        /// The property's length.
        len: usize,
    },
    /// `base + size` is past 2^64.
    #[error("[{base:#x} +{size:#x}) wraps past the top of the address space")]
    Wraps {
        /// The range's base.
        base: u64,
        /// Its size.
        size: u64,
    },
}

/// `value` as exactly one `<base size>` entry of the given cell sizes (1 or 2 each).
fn one_range(value: &[u8], acells: u32, scells: u32) -> Result<MemRange, RangeError> {
    let (alen, slen) = (acells as usize * 4, scells as usize * 4);
    if value.len() != alen + slen {
        return Err(RangeError::Cells {
            acells,
            scells,
            len: value.len(),
        });
    }
    let (base, size) = (platform::be(&value[..alen]), platform::be(&value[alen..]));
    if base.checked_add(size).is_none() {
        return Err(RangeError::Wraps { base, size });
    }
    Ok(MemRange { base, size })
}

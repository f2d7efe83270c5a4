//! Step one: each VM node of `/chosen` read into a [`VmSpec`], checking only what the node
//! itself says.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;

use super::error::cfg_err;
use super::{ConfigError, IommuKind, ModuleSpec, VmSpec};
use crate::platform::{self, MemRange, PlatformError};

/// The `compatible` that marks a `/chosen` child as a VM.
const VM_COMPATIBLE: &str = "smmu-hv,vm";

/// Every `compatible = "smmu-hv,vm"` child of /chosen, in DT order. Ok(empty) if there are
/// none. A node that cannot be read gives Err for that node only.
pub fn parse_vm_specs(dtb: &[u8]) -> Result<Vec<Result<VmSpec, ConfigError>>, PlatformError> {
    platform::with_fdt(dtb, |fdt| {
        let Some(chosen) = fdt.find_node("/chosen") else {
            return Vec::new();
        };
        chosen
            .children()
            .filter(|n| platform::compatibles(*n).any(|c| c == VM_COMPATIBLE))
            .map(parse_node)
            .collect()
    })
}

fn parse_node(node: FdtNode) -> Result<VmSpec, ConfigError> {
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
        let is = |c: &str| platform::compatibles(child).any(|x| x == c);
        let is_kernel = is("multiboot,kernel");
        if !is_kernel && !is("multiboot,ramdisk") {
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

    Ok(VmSpec {
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
    })
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

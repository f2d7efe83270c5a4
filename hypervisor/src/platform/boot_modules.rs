//! The images the boot loader placed in memory, from the `multiboot,*` children of `/chosen`.

use alloc::string::ToString;
use alloc::vec::Vec;

use fdt::node::FdtNode;

use super::props::{compatibles, decode_reg, missing, prop_str, prop_u32};
use super::{BootModule, ModuleKind, Result};

pub(super) fn modules(root: FdtNode, chosen: FdtNode) -> Result<Vec<BootModule>> {
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

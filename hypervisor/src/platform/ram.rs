//! RAM (`/memory` nodes) and the ranges nothing may be placed over (`/memreserve/` and
//! `/reserved-memory`).

use alloc::vec::Vec;

use fdt::node::FdtNode;

use super::props::{is_enabled, prop_str, reg};
use super::{MemRange, PlatformError, Result};

pub(super) fn memory(root: FdtNode) -> Result<Vec<MemRange>> {
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

pub(super) fn reserved(root: FdtNode, memreserve: &[MemRange]) -> Result<Vec<MemRange>> {
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

//! Structural validation of the raw blob (header, memory reservation map, structure block)
//! before the `fdt` crate, which panics on several kinds of malformed input, is given it.

use alloc::vec::Vec;

use super::props::be;
use super::{MemRange, PlatformError, Result};

const FDT_MAGIC: u32 = 0xd00d_feed;
pub(super) const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
pub(super) const FDT_PROP: u32 = 3;
pub(super) const FDT_NOP: u32 = 4;
pub(super) const FDT_END: u32 = 9;
const HEADER_LEN: usize = 40;
/// `fdt` tracks parents in a fixed 64-entry array indexed from 1, so deeper trees would panic.
const MAX_DEPTH: usize = 63;

pub(super) fn malformed(offset: usize, reason: &'static str) -> PlatformError {
    PlatformError::Malformed { offset, reason }
}

/// What [`check_blob`] learned while validating.
pub(super) struct CheckedBlob {
    /// `totalsize` from the header (never more than the buffer).
    pub(super) total: usize,
    /// `/memreserve/` entries with a non-zero size.
    pub(super) memreserve: Vec<MemRange>,
    /// The blob with NOP tokens removed, if it had any.
    pub(super) compacted: Option<Vec<u8>>,
}

pub(super) fn read_u32(data: &[u8], off: usize) -> Option<u32> {
    let bytes: [u8; 4] = data.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Validates everything the `fdt` crate would otherwise `unwrap`/`expect`/index blindly.
pub(super) fn check_blob(dtb: &[u8]) -> Result<CheckedBlob> {
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
pub(super) fn cstr(data: &[u8], off: usize) -> Option<&str> {
    let rest = data.get(off..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    core::str::from_utf8(&rest[..end]).ok()
}

pub(super) const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

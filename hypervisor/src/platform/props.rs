//! Property readers shared by every host-DT parser (`reg`, cells, strings, `compatible`,
//! `status`) and the errors naming a node's missing or bad property.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;

use super::{MemRange, PlatformError, Result};

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

pub(super) fn decode_reg(
    node: FdtNode,
    value: &[u8],
    acells: u32,
    scells: u32,
) -> Result<Vec<MemRange>> {
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

/// The value as big-endian cells, if it is a whole number of them.
pub(crate) fn cells(value: &[u8]) -> Option<Vec<u32>> {
    if !value.len().is_multiple_of(4) {
        return None;
    }
    Some(value.chunks_exact(4).map(|c| be(c) as u32).collect())
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

//! Which controller a node's interrupts go to and what they are there: `interrupt-parent`
//! (inherited, DT spec 2.4.1, resolved as Linux's `of_irq_find_parent`), `interrupts` and
//! `interrupts-extended` (DT spec 2.4.1.2), each specifier read with its own controller's
//! `#interrupt-cells`. Only the GICv3 is a controller the hypervisor drives; interrupts that
//! reach another one (an mbigen, a nexus with an `interrupt-map`) are reported as such, so the
//! caller can poll instead or refuse with the controller's name.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::props::{cells, compatibles, prop_u32};
use super::tree::Tree;
use super::{bad, PlatformError, Result};

/// Where a node's interrupts go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Irqs {
    /// The node has no `interrupts` or `interrupts-extended`.
    None,
    /// Every one goes to the GICv3: (INTID, trigger-type cell), in property order.
    Gic(Vec<(u32, u32)>),
    /// At least one goes to another controller.
    Elsewhere {
        /// That controller's path.
        controller: String,
        /// Its first `compatible`.
        compatible: String,
    },
}

impl Irqs {
    /// The GIC interrupts, or an error naming the node and the controller it uses instead.
    pub(crate) fn require_gic(self, tree: &Tree, node: usize) -> Result<Vec<(u32, u32)>> {
        match self {
            Irqs::None => Ok(Vec::new()),
            Irqs::Gic(v) => Ok(v),
            Irqs::Elsewhere { controller, .. } => Err(PlatformError::NotThroughGic {
                node: tree.path(node),
                controller,
            }),
        }
    }
}

/// The interrupt parent of node `index`: its `interrupt-parent`, else its tree parent's, going
/// up until a node with `#interrupt-cells` is found (Linux `of_irq_find_parent`). Bounded by
/// the node count, so a phandle cycle is an error, not a hang.
fn interrupt_parent(tree: &Tree, index: usize) -> Result<Option<usize>> {
    let node = tree.nodes[index].node;
    let mut child = index;
    for _ in 0..=tree.nodes.len() {
        let c = tree.nodes[child].node;
        let parent = match c.property("interrupt-parent") {
            Some(_) => {
                let ph = prop_u32(c, "interrupt-parent")
                    .ok_or_else(|| bad(c, "interrupt-parent", "not one cell"))?;
                Some(
                    tree.by_phandle(ph)
                        .ok_or_else(|| bad(c, "interrupt-parent", "phandle names no node"))?,
                )
            }
            None => tree.nodes[child].parent,
        };
        let Some(parent) = parent else {
            return Ok(None);
        };
        if prop_u32(tree.nodes[parent].node, "#interrupt-cells").is_some() {
            return Ok(Some(parent));
        }
        child = parent;
    }
    Err(bad(node, "interrupt-parent", "the chain of parents loops"))
}

/// Where node `index`'s interrupts go; `gic` is the GICv3 node's index.
pub(crate) fn irqs(tree: &Tree, index: usize, gic: usize) -> Result<Irqs> {
    let node = tree.nodes[index].node;
    // Per-controller decode of a list of (controller, specifier cells).
    let mut entries: Vec<(usize, Vec<u32>)> = Vec::new();
    if let Some(prop) = node.property("interrupts-extended") {
        let cells =
            cells(prop.value).ok_or_else(|| bad(node, "interrupts-extended", "not whole cells"))?;
        let mut rest = &cells[..];
        while let Some((&ph, tail)) = rest.split_first() {
            let ctrl = tree
                .by_phandle(ph)
                .ok_or_else(|| bad(node, "interrupts-extended", "phandle names no node"))?;
            let n = icells(tree, ctrl).ok_or_else(|| {
                bad(
                    node,
                    "interrupts-extended",
                    "controller has no usable #interrupt-cells",
                )
            })?;
            let spec = tail
                .get(..n)
                .ok_or_else(|| bad(node, "interrupts-extended", "truncated specifier"))?;
            entries.push((ctrl, spec.to_vec()));
            rest = &tail[n..];
        }
    } else if let Some(prop) = node.property("interrupts") {
        if prop.value.is_empty() {
            return Ok(Irqs::None);
        }
        let ctrl = interrupt_parent(tree, index)?
            .ok_or_else(|| bad(node, "interrupts", "no interrupt parent"))?;
        let n = icells(tree, ctrl).ok_or_else(|| {
            bad(
                node,
                "interrupts",
                "interrupt parent has no usable #interrupt-cells",
            )
        })?;
        let cells = cells(prop.value).ok_or_else(|| bad(node, "interrupts", "not whole cells"))?;
        if n == 0 || !cells.len().is_multiple_of(n) {
            return Err(bad(
                node,
                "interrupts",
                "length is not a whole number of specifiers",
            ));
        }
        entries.extend(cells.chunks_exact(n).map(|c| (ctrl, c.to_vec())));
    } else {
        return Ok(Irqs::None);
    }
    // A controller with an `interrupt-map` is a nexus (DT spec 2.4.3, FVP's `bus@8000000`):
    // each specifier goes on to the parent its map names.
    let unit = unit_address(node);
    let mut routed = Vec::with_capacity(entries.len());
    for (ctrl, spec) in entries {
        routed.push(through_nexus(tree, index, ctrl, spec, &unit)?);
    }
    let entries = routed;
    if let Some(&(other, _)) = entries.iter().find(|(c, _)| *c != gic) {
        // Sub-controllers (an mbigen's children) often carry no compatible of their own: the
        // nearest ancestor's names the hardware.
        let compatible = tree
            .ancestors(other)
            .find_map(|i| compatibles(tree.nodes[i].node).next())
            .unwrap_or("");
        return Ok(Irqs::Elsewhere {
            controller: tree.path(other),
            compatible: compatible.to_string(),
        });
    }
    entries
        .iter()
        .map(|(_, spec)| gic_intid(spec).ok_or_else(|| bad(node, "interrupts", GIC_RANGE)))
        .collect::<Result<Vec<_>>>()
        .map(Irqs::Gic)
}

/// The node's unit address as its `reg` spells it (all cells of the first entry's address,
/// taken from the front; a nexus keys on as many as its own `#address-cells`).
fn unit_address(node: fdt::node::FdtNode) -> Vec<u32> {
    node.property("reg")
        .and_then(|p| cells(p.value))
        .unwrap_or_default()
}

/// Follows `interrupt-map` nexuses from `ctrl` until a controller without one (Linux
/// `of_irq_parse_raw`): the child unit address and specifier, masked by `interrupt-map-mask`,
/// select an entry, whose parent and parent specifier replace them. Bounded by the node count.
fn through_nexus(
    tree: &Tree,
    index: usize,
    mut ctrl: usize,
    mut spec: Vec<u32>,
    unit: &[u32],
) -> Result<(usize, Vec<u32>)> {
    let node = tree.nodes[index].node;
    let mut unit = unit.to_vec();
    for _ in 0..=tree.nodes.len() {
        let nexus = tree.nodes[ctrl].node;
        let Some(map) = nexus.property("interrupt-map") else {
            return Ok((ctrl, spec));
        };
        let bad_map = |reason| bad(nexus, "interrupt-map", reason);
        let ac = prop_u32(nexus, "#address-cells").unwrap_or(0) as usize;
        let ic = spec.len();
        if ac > 4 {
            return Err(bad(nexus, "#address-cells", "more than 4 cells"));
        }
        let mut key: Vec<u32> = (0..ac).map(|i| unit.get(i).copied().unwrap_or(0)).collect();
        key.extend_from_slice(&spec);
        let mask = match nexus.property("interrupt-map-mask") {
            None => alloc::vec![u32::MAX; key.len()],
            Some(m) => cells(m.value)
                .filter(|m| m.len() == key.len())
                .ok_or_else(|| {
                    bad(
                        nexus,
                        "interrupt-map-mask",
                        "not #address-cells + #interrupt-cells cells",
                    )
                })?,
        };
        let masked = |v: &[u32]| -> Vec<u32> { v.iter().zip(&mask).map(|(a, m)| a & m).collect() };
        let want = masked(&key);
        let map = cells(map.value).ok_or_else(|| bad_map("not whole cells"))?;
        let mut rest = &map[..];
        let mut found = None;
        while !rest.is_empty() {
            let head = rest
                .get(..ac + ic + 1)
                .ok_or_else(|| bad_map("truncated entry"))?;
            let parent = tree
                .by_phandle(head[ac + ic])
                .ok_or_else(|| bad_map("phandle names no node"))?;
            let pn = tree.nodes[parent].node;
            let pa = prop_u32(pn, "#address-cells").unwrap_or(0) as usize;
            let pi = icells(tree, parent)
                .ok_or_else(|| bad_map("parent has no usable #interrupt-cells"))?;
            if pa > 4 {
                return Err(bad_map("parent's #address-cells is more than 4"));
            }
            let len = ac + ic + 1 + pa + pi;
            let entry = rest.get(..len).ok_or_else(|| bad_map("truncated entry"))?;
            if found.is_none() && masked(&entry[..ac + ic]) == want {
                found = Some((
                    parent,
                    entry[ac + ic + 1..ac + ic + 1 + pa].to_vec(),
                    entry[ac + ic + 1 + pa..].to_vec(),
                ));
            }
            rest = &rest[len..];
        }
        let (parent, parent_unit, parent_spec) = found.ok_or_else(|| {
            bad(
                node,
                "interrupts",
                "no entry of its interrupt parent's interrupt-map matches it",
            )
        })?;
        ctrl = parent;
        unit = parent_unit;
        spec = parent_spec;
    }
    Err(bad(node, "interrupts", "its interrupt-map nexuses loop"))
}

const GIC_RANGE: &str = "not a GICv3 specifier (<type number flags>, known type, number in range)";

/// A controller's `#interrupt-cells`, if it is a plausible width (1-8 cells).
fn icells(tree: &Tree, ctrl: usize) -> Option<usize> {
    prop_u32(tree.nodes[ctrl].node, "#interrupt-cells")
        .filter(|n| (1..=8).contains(n))
        .map(|n| n as usize)
}

/// A GICv3 specifier `<type number flags [ppi-partition]>` as (INTID, flags). Ranges from the
/// GICv3 binding (`arm,gic-v3.yaml`): SPI 0-987, PPI 0-15, ESPI 0-1023, EPPI 0-63.
pub(crate) fn gic_intid(spec: &[u32]) -> Option<(u32, u32)> {
    if !(3..=4).contains(&spec.len()) {
        return None;
    }
    let (kind, num, flags) = (spec[0], spec[1], spec[2]);
    let intid = match kind {
        0 if num < 988 => 32 + num,
        1 if num < 16 => 16 + num,
        2 if num < 1024 => 4096 + num,
        3 if num < 64 => 1056 + num,
        _ => return None,
    };
    Some((intid, flags))
}

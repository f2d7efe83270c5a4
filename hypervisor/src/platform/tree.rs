//! The host DT as a tree the parsers can walk upwards: every node with its path and its parent,
//! and phandles resolved to nodes. The `fdt` crate only walks downwards, but interrupt parents
//! are inherited from ancestors (DT spec 2.4.1) and messages should name a node by its path.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;

use super::props::{compatibles, is_enabled, prop_u32};

/// One node, with where it sits.
#[derive(Clone, Copy)]
pub(crate) struct TreeNode<'b, 'a> {
    /// The node.
    pub node: FdtNode<'b, 'a>,
    /// Index of its parent in [`Tree::nodes`]; `None` for the root.
    pub parent: Option<usize>,
}

/// Every node of a (validated) blob in document order, the root first.
pub(crate) struct Tree<'b, 'a> {
    /// The nodes.
    pub nodes: Vec<TreeNode<'b, 'a>>,
    phandles: BTreeMap<u32, usize>,
}

impl<'b, 'a> Tree<'b, 'a> {
    /// Walks the whole tree. The blob validator bounds its depth (63) and size, so this ends.
    pub(crate) fn new(fdt: &'b Fdt<'a>) -> Option<Self> {
        let root = fdt.find_node("/")?;
        let mut nodes = Vec::new();
        // (node, parent index) still to visit; children pushed in reverse keep document order.
        let mut stack = alloc::vec![(root, None)];
        while let Some((node, parent)) = stack.pop() {
            let index = nodes.len();
            nodes.push(TreeNode { node, parent });
            let children: Vec<_> = node.children().collect();
            stack.extend(children.into_iter().rev().map(|c| (c, Some(index))));
        }
        let mut tree = Tree {
            nodes,
            phandles: BTreeMap::new(),
        };
        for i in 0..tree.nodes.len() {
            // The first node claiming a value keeps it.
            if let Some(p) = tree.phandle_of(i) {
                tree.phandles.entry(p).or_insert(i);
            }
        }
        Some(tree)
    }

    /// The node a phandle names.
    pub(crate) fn by_phandle(&self, phandle: u32) -> Option<usize> {
        self.phandles.get(&phandle).copied()
    }

    /// The node's own phandle, if it has one (old blobs spell it `linux,phandle`).
    pub(crate) fn phandle_of(&self, index: usize) -> Option<u32> {
        let n = self.nodes[index].node;
        prop_u32(n, "phandle").or_else(|| prop_u32(n, "linux,phandle"))
    }

    /// The node's full path, for messages ("/soc/iommu@fc900000").
    pub(crate) fn path(&self, index: usize) -> String {
        let names: Vec<&str> = self
            .ancestors(index)
            .filter(|&i| self.nodes[i].parent.is_some())
            .map(|i| self.nodes[i].node.name)
            .collect();
        if names.is_empty() {
            return String::from("/");
        }
        let mut path = String::new();
        for n in names.iter().rev() {
            path.push('/');
            path.push_str(n);
        }
        path
    }

    /// The CPU physical address of `addr`, an address in the space of node `index`'s parent
    /// bus (what its `reg` holds), through every ancestor's `ranges` (DT spec 2.3.8): an empty
    /// `ranges` is the identity, a bus without one is not memory-mapped. `Err` says why it does
    /// not translate.
    pub(crate) fn translate(&self, index: usize, addr: u64) -> Result<u64, &'static str> {
        let mut addr = addr;
        let mut bus = self.nodes[index].parent;
        // Bounded: parents always come earlier in document order.
        while let Some(b) = bus {
            let Some(up) = self.nodes[b].parent.filter(|&p| p < b) else {
                return Ok(addr); // the root's space is the CPU's
            };
            let node = self.nodes[b].node;
            let Some(ranges) = node.property("ranges") else {
                return Err("a bus above it has no ranges (not memory-mapped)");
            };
            if !ranges.value.is_empty() {
                let cells =
                    super::props::cells(ranges.value).ok_or("a ranges is not whole cells")?;
                let ac = prop_u32(node, "#address-cells").unwrap_or(2) as usize;
                let sc = prop_u32(node, "#size-cells").unwrap_or(1) as usize;
                let pac = prop_u32(self.nodes[up].node, "#address-cells").unwrap_or(2) as usize;
                if !(1..=2).contains(&ac) || !(1..=2).contains(&pac) || !(1..=2).contains(&sc) {
                    return Err("a bus above it has cell sizes other than 1 or 2");
                }
                let join = |c: &[u32]| c.iter().fold(0u64, |a, &v| (a << 32) | u64::from(v));
                let stride = ac + pac + sc;
                if !cells.len().is_multiple_of(stride) {
                    return Err("a ranges above it is not a whole number of entries");
                }
                addr = cells
                    .chunks_exact(stride)
                    .find_map(|e| {
                        let (child, parent, size) =
                            (join(&e[..ac]), join(&e[ac..ac + pac]), join(&e[ac + pac..]));
                        (addr >= child && addr - child < size)
                            .then(|| parent.checked_add(addr - child))
                            .flatten()
                    })
                    .ok_or("no ranges entry of a bus above it covers it")?;
            }
            bus = Some(up);
        }
        Ok(addr)
    }

    /// The node's `reg` entries as CPU physical ranges ([`Self::translate`]).
    pub(crate) fn cpu_reg(&self, index: usize) -> super::Result<Vec<super::MemRange>> {
        let node = self.nodes[index].node;
        super::props::reg(node)?
            .into_iter()
            .map(|r| {
                let base = self
                    .translate(index, r.base)
                    .map_err(|why| super::props::bad(node, "reg", why))?;
                base.checked_add(r.size)
                    .ok_or_else(|| super::props::bad(node, "reg", "translated range wraps"))?;
                Ok(super::MemRange { base, size: r.size })
            })
            .collect()
    }

    /// The node at `path` ("/soc/serial@fe660000"); a component without a unit address matches
    /// a node whose name has one, as in Linux's `of_find_node_by_path`.
    pub(crate) fn find(&self, path: &str) -> Option<usize> {
        let rest = path.strip_prefix('/')?;
        let mut at = 0;
        for want in rest.split('/').filter(|c| !c.is_empty()) {
            at = (at + 1..self.nodes.len())
                .filter(|&i| self.nodes[i].parent == Some(at))
                .find(|&i| {
                    let name = self.nodes[i].node.name;
                    name == want || (!want.contains('@') && name.split('@').next() == Some(want))
                })?;
        }
        Some(at)
    }

    /// Whether the node and every ancestor are enabled: a disabled bus disables what sits on it
    /// (Linux `of_device_is_available` on each level, as `of_platform_populate` walks it).
    pub(crate) fn enabled(&self, index: usize) -> bool {
        self.ancestors(index)
            .all(|i| is_enabled(self.nodes[i].node))
    }

    /// The node itself, then its parent, up to the root. Bounded: parents always come earlier
    /// in document order.
    pub(crate) fn ancestors(&self, index: usize) -> impl Iterator<Item = usize> + '_ {
        core::iter::successors(Some(index), |&i| self.nodes[i].parent.filter(|&p| p < i))
    }

    /// Indices of the enabled nodes with compatible `compat`, in document order.
    pub(crate) fn compatible(&self, compat: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| compatibles(self.nodes[i].node).any(|c| c == compat))
            .filter(|&i| self.enabled(i))
            .collect()
    }
}

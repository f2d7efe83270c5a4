//! Xen dom0less domains (`compatible = "xen,domain"` children of `/chosen`, Xen's
//! `docs/misc/arm/device-tree/booting.txt`, "Creating Multiple Domains directly from Xen") read
//! as VMs, under `/chosen/smmu-hv,xen-dom0less;`.
//!
//! The properties both bindings share (`cpus`, `memory`, the kernel and ramdisk modules and
//! their `bootargs`) are read by `parse.rs` for both. This file maps what only Xen has: each
//! property either becomes ours (`xen,static-mem`, `domain-cpupool`), is refused because the
//! guest would be built differently from what it was configured for (`direct-map`, privileged
//! `capabilities`, partial device trees, shared memory, `trap-unmapped-accesses = <0>`), or is
//! ignored with a note where the guest boots the same without it (`xen,enhanced`, `sve`, cache
//! colouring, vCPU affinity, event channels). `vpl011` and Xen's own resource limits
//! (`nr_spis`, grant and maptrack frames, `xen,domain-p2m-mem-mb`, ...) are ignored silently:
//! every VM has a PL011 and nothing here is sized by them.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;
use log::Level;

use super::error::cfg_err;
use super::{ConfigError, CpuPool, VmSpec};
use crate::platform::tree::Tree;
use crate::platform::{self, MemRange};

/// The `compatible` of a Xen dom0less domain.
pub(super) const XEN_DOMAIN: &str = "xen,domain";

/// A line to log while reading the config: its level and text.
pub(super) type Note = (Level, String);

/// What the Xen properties are read against: the whole tree (phandles) and the cell sizes
/// `xen,static-mem` uses unless the domain says otherwise.
pub(super) struct XenCtx<'t, 'b, 'a> {
    pub tree: &'t Tree<'b, 'a>,
    /// `/chosen`'s `#address-cells`/`#size-cells`, else the root's, else the DT spec's 2/1:
    /// since Xen 4.17, `xen,static-mem` is in the domain node's parent's cells (Xen's
    /// `dt_n_addr_cells` on the domain node), not the domain's own.
    pub static_mem_cells: (u32, u32),
}

/// `#address-cells`/`#size-cells` of `chosen`, inherited from `root` where it has none.
pub(super) fn chosen_cells(root: FdtNode, chosen: FdtNode) -> (u32, u32) {
    let get = |name, default| {
        platform::prop_u32(chosen, name)
            .or_else(|| platform::prop_u32(root, name))
            .unwrap_or(default)
    };
    (get("#address-cells", 2), get("#size-cells", 1))
}

/// Applies the Xen-only properties of domain `node` to `spec` (already read by the common
/// parser). Refusals name the VM and the property, as every config error does.
pub(super) fn apply(
    node: FdtNode,
    ctx: &XenCtx,
    spec: &mut VmSpec,
    notes: &mut Vec<Note>,
) -> Result<(), ConfigError> {
    let name = spec.name.clone();
    let err = |field, reason: String| cfg_err(&name, field, reason);
    let mut note = |what: String| notes.push((Level::Info, format!("{name}: {what}")));

    if node.property("direct-map").is_some() {
        return Err(err(
            "direct-map",
            "direct-map (1:1 IPA=PA) is not supported: a VM's RAM is always at IPA 0x4000_0000; drop it (xen,static-mem alone still puts the RAM at its PA)".into(),
        ));
    }
    if let Some(p) = node.property("capabilities") {
        match u32_value(p.value) {
            Some(0) => {}
            Some(caps) => {
                return Err(err(
                    "capabilities",
                    format!("{caps:#x}: control, hardware and xenstore domains are not supported: every VM is an unprivileged domU that owns only the devices it names"),
                ))
            }
            None => return Err(err("capabilities", "must be one u32 cell".into())),
        }
    }
    if let Some(p) = node.property("trap-unmapped-accesses") {
        match u32_value(p.value) {
            Some(1) => {}
            Some(0) => {
                return Err(err(
                    "trap-unmapped-accesses",
                    "0 (unmapped reads as all ones, writes ignored) is not supported: a VM's accesses outside its RAM and devices always fault".into(),
                ))
            }
            _ => return Err(err("trap-unmapped-accesses", "must be <0> or <1>".into())),
        }
    }
    if let Some(v) = platform::prop_str(node, "passthrough") {
        if v == "disabled" && !spec.pci_devices.is_empty() {
            return Err(err(
                "passthrough",
                "\"disabled\", but smmu-hv,pci-devices assigns PCI functions".into(),
            ));
        }
    }

    if node.property("xen,static-mem").is_some() {
        let r = static_mem(node, ctx).map_err(|r| err("xen,static-mem", r))?;
        match spec.static_mem {
            Some(ours) if ours != r => {
                return Err(err(
                    "xen,static-mem",
                    format!(
                        "[{:#x} +{:#x}) disagrees with smmu-hv,static-mem [{:#x} +{:#x})",
                        r.base, r.size, ours.base, ours.size
                    ),
                ))
            }
            _ => spec.static_mem = Some(r),
        }
    }

    if node.property("domain-cpupool").is_some() {
        let pool = cpupool(node, ctx).map_err(|r| err("domain-cpupool", r))?;
        if let Some(pinned) = &spec.pcpus {
            if let Some(m) = pinned.iter().find(|m| !pool.mpidrs.contains(m)) {
                return Err(err(
                    "domain-cpupool",
                    format!(
                        "smmu-hv,cpus names MPIDR {m:#x}, which cpupool {} does not have",
                        pool.path
                    ),
                ));
            }
        }
        spec.cpupool = Some(pool);
    }

    for child in node.children() {
        let is = |c: &str| platform::compatibles(child).any(|x| x == c);
        if is("multiboot,device-tree") {
            return Err(err(
                "module",
                format!("device-tree {}: partial device trees (Xen's platform-device passthrough) are not supported: assign PCI functions with smmu-hv,pci-devices", child.name),
            ));
        }
        if is("xen,domain-shared-memory-v1") {
            return Err(err(
                "xen,shared-mem",
                format!(
                    "{}: static shared memory between domains is not supported",
                    child.name
                ),
            ));
        }
        if is("xen,evtchn-v1") || is("xen,evtchn") {
            note(format!(
                "{}: static event channel ignored: there are no Xen event channels here",
                child.name
            ));
        }
        if is("xen,vcpu") {
            note(format!(
                "{}: vCPU affinity ignored: each vCPU has a physical CPU of its own (domain-cpupool or smmu-hv,cpus choose which)",
                child.name
            ));
        }
    }

    // Present without a value is Xen's "enabled".
    let enhanced = node
        .property("xen,enhanced")
        .map(|_| platform::prop_str(node, "xen,enhanced"));
    if enhanced.is_some_and(|v| v != Some("disabled")) {
        note("xen,enhanced ignored: no Xen PV interfaces (grant tables, xenstore, event channels); the guest finds no /hypervisor node".into());
    }
    if let Some(p) = node.property("sve") {
        if u32_value(p.value) != Some(0) {
            note("sve ignored: guests never see SVE (the ID registers hide it)".into());
        }
    }
    for colours in ["llc-colors", "colors"] {
        if node.property(colours).is_some() {
            note(format!(
                "{colours} ignored: no LLC colouring, the VM's RAM is one contiguous range"
            ));
        }
    }
    if let Some(t) = platform::prop_str(node, "xen,sci_type").filter(|t| *t != "none") {
        note(format!(
            "xen,sci_type {t:?} ignored: SCMI calls are not forwarded to firmware"
        ));
    }
    Ok(())
}

/// A one-cell u32.
fn u32_value(v: &[u8]) -> Option<u32> {
    (v.len() == 4).then(|| platform::be(v) as u32)
}

/// `xen,static-mem` as one range. Its cells: Xen 4.16's `#xen,static-mem-address-cells` and
/// `#xen,static-mem-size-cells` on the domain node if it has them, else the parent's (Xen 4.17
/// on). One bank only: a VM's RAM is one range at one IPA.
fn static_mem(node: FdtNode, ctx: &XenCtx) -> Result<MemRange, String> {
    let own = (
        node.property("#xen,static-mem-address-cells"),
        node.property("#xen,static-mem-size-cells"),
    );
    let (acells, scells) = match own {
        (None, None) => ctx.static_mem_cells,
        (Some(a), Some(s)) => match (u32_value(a.value), u32_value(s.value)) {
            (Some(a), Some(s)) => (a, s),
            _ => {
                return Err(
                    "#xen,static-mem-address-cells and -size-cells must be one u32 cell each"
                        .into(),
                )
            }
        },
        _ => {
            return Err(
                "#xen,static-mem-address-cells and #xen,static-mem-size-cells go together".into(),
            )
        }
    };
    if !(1..=2).contains(&acells) || !(1..=2).contains(&scells) {
        return Err(format!("in {acells}+{scells} cells: each must be 1 or 2"));
    }
    let value = node.property("xen,static-mem").map_or(&[][..], |p| p.value);
    let entry = (acells + scells) as usize * 4;
    if value.is_empty() || !value.len().is_multiple_of(entry) {
        return Err(format!(
            "must be <base size> entries of {acells}+{scells} cells, is {} bytes",
            value.len()
        ));
    }
    if value.len() > entry {
        return Err(format!(
            "{} banks: only one bank is supported (a VM's RAM is one contiguous range)",
            value.len() / entry
        ));
    }
    let split = acells as usize * 4;
    let (base, size) = (platform::be(&value[..split]), platform::be(&value[split..]));
    if base.checked_add(size).is_none() {
        return Err(format!(
            "[{base:#x} +{size:#x}) wraps past the top of the address space"
        ));
    }
    Ok(MemRange { base, size })
}

/// The `xen,cpupool` node `domain-cpupool` names, with the MPIDR of each of its CPUs.
fn cpupool(node: FdtNode, ctx: &XenCtx) -> Result<CpuPool, String> {
    let tree = ctx.tree;
    let value = node.property("domain-cpupool").map_or(&[][..], |p| p.value);
    let phandle = u32_value(value).ok_or("must be one phandle")?;
    let pool = tree
        .by_phandle(phandle)
        .ok_or_else(|| format!("phandle {phandle:#x} names no node"))?;
    let path = tree.path(pool);
    let pool_node = tree.nodes[pool].node;
    if !platform::compatibles(pool_node).any(|c| c == "xen,cpupool") {
        return Err(format!("{path} is not a xen,cpupool node"));
    }
    let cpus = pool_node
        .property("cpupool-cpus")
        .map_or(&[][..], |p| p.value);
    if cpus.is_empty() || !cpus.len().is_multiple_of(4) {
        return Err(format!(
            "{path}: cpupool-cpus must be one or more CPU phandles"
        ));
    }
    let mut mpidrs = Vec::new();
    for cell in cpus.chunks_exact(4) {
        let ph = platform::be(cell) as u32;
        let cpu = tree
            .by_phandle(ph)
            .ok_or_else(|| format!("{path}: cpupool-cpus phandle {ph:#x} names no node"))?;
        let cpu_node = tree.nodes[cpu].node;
        if platform::prop_str(cpu_node, "device_type") != Some("cpu") {
            return Err(format!(
                "{path}: cpupool-cpus names {}, which is not a CPU node (device_type = \"cpu\")",
                tree.path(cpu)
            ));
        }
        let mpidr = platform::reg(cpu_node)
            .ok()
            .and_then(|r| r.first().map(|r| r.base))
            .ok_or_else(|| format!("{path}: CPU node {} has no usable reg", tree.path(cpu)))?;
        if mpidrs.contains(&mpidr) {
            return Err(format!("{path}: names MPIDR {mpidr:#x} twice"));
        }
        mpidrs.push(mpidr);
    }
    Ok(CpuPool {
        path: path.to_string(),
        mpidrs,
    })
}

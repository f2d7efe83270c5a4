//! Static partitioning: which VMs to run, read from `/chosen` of the host DT.
//!
//! The binding follows Xen's dom0less one (domain nodes under `/chosen` with `cpus`, `memory`
//! in KiB, and `multiboot,kernel` / `multiboot,ramdisk` module children), with our own
//! `smmu-hv,*` properties for naming, CPU pinning and static memory:
//!
//! ```text
//! chosen {
//!     vm0 {
//!         compatible = "smmu-hv,vm";
//!         #address-cells = <2>; #size-cells = <2>;   /* default 2/2 */
//!         smmu-hv,name = "vm0";                      /* optional, else the node name */
//!         cpus = <2>;                                /* vCPU count */
//!         smmu-hv,cpus = <0x0 0x1>;                  /* optional MPIDR per vCPU */
//!         memory = <0x0 0x100000>;                   /* KiB, 64-bit */
//!         smmu-hv,static-mem = <0x1 0x0 0x0 0x40000000>; /* optional base/size */
//!         module@4a000000 { compatible = "multiboot,kernel", "multiboot,module";
//!                           reg = <...>; bootargs = "..."; };
//!         module@50000000 { compatible = "multiboot,ramdisk", "multiboot,module"; reg = <...>; };
//!     };
//! };
//! ```
//!
//! Reading happens in two steps: [`parse_vm_specs`] turns each node into a [`VmSpec`] (only
//! what the node itself says), then [`plan_vms`] checks every spec against the machine and the
//! VMs accepted before it and decides where each VM's CPUs and RAM are. A bad VM is refused on
//! its own, with a [`ConfigError`] naming it and the offending property, so one typo in one
//! node does not keep the other VMs from booting.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;

use crate::memory::{overlaps, place_top_down};
use crate::platform::{self, MemRange, PlatformError};

/// The `compatible` that marks a `/chosen` child as a VM.
const VM_COMPATIBLE: &str = "smmu-hv,vm";
/// Granule of VM RAM: stage-2 maps it with 2 MiB blocks, so base and size must be multiples.
const RAM_ALIGN: u64 = 2 << 20;

/// A boot module (an image the boot loader placed in memory) as a VM node names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Where the image is in physical memory.
    pub range: MemRange,
    /// The module's `bootargs` (the kernel command line, for a kernel).
    pub bootargs: Option<String>,
}

/// What one VM node says, before any machine-level checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// `smmu-hv,name`, or the node name.
    pub name: String,
    /// `cpus`: number of vCPUs (0 if the node says 0; [`plan_vms`] refuses that).
    pub vcpus: u32,
    /// `smmu-hv,cpus`: the MPIDR of the physical CPU each vCPU is pinned to, in vCPU order.
    pub pcpus: Option<Vec<u64>>,
    /// `memory`, converted from KiB to bytes.
    pub mem_size: u64,
    /// `smmu-hv,static-mem`: where the VM's RAM must be.
    pub static_mem: Option<MemRange>,
    /// The `multiboot,kernel` module child.
    pub kernel: Option<ModuleSpec>,
    /// The `multiboot,ramdisk` module child.
    pub ramdisk: Option<MemRange>,
    /// `smmu-hv,pci-devices`: the physical PCI functions the VM owns.
    pub pci_devices: Vec<crate::pci::Bdf>,
}

/// One VM config error: names the VM and the offending field, e.g.
/// "vm2: `cpus`: 5 vCPUs but the machine has 4 CPUs".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{vm}: `{field}`: {reason}")]
pub struct ConfigError {
    /// Name of the VM (`smmu-hv,name` if readable, else the node name).
    pub vm: String,
    /// The DT property at fault (`module` for module children, `name` for duplicate names).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// The host resources VMs are carved from.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// MPIDR of each CPU, indexed by logical CPU number.
    pub cpus: &'a [u64],
    /// Usable RAM.
    pub ram: &'a [MemRange],
    /// Memory nothing may overlap: the hypervisor image, the DTB, reserved memory. Must not
    /// include the boot modules themselves (they are checked against this list).
    pub busy: &'a [MemRange],
    /// The hypervisor image (checked separately so errors can say so).
    pub hypervisor: MemRange,
}

/// An accepted VM: everything it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    /// The VM's name, unique among accepted VMs.
    pub name: String,
    /// Logical index of the physical CPU each vCPU runs on, in vCPU order.
    pub pcpus: Vec<usize>,
    /// Physical base of the VM's RAM.
    pub ram_pa: u64,
    /// Size of the VM's RAM in bytes.
    pub ram_size: u64,
    /// The kernel image.
    pub kernel: ModuleSpec,
    /// The initramfs image, if any.
    pub ramdisk: Option<MemRange>,
    /// The physical PCI functions it owns (checked against IOMMU groups by the caller, who
    /// knows the PCI topology).
    pub pci_devices: Vec<crate::pci::Bdf>,
}

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

/// Builds a [`ConfigError`].
fn cfg_err(vm: &str, field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        vm: vm.to_string(),
        field,
        reason: reason.into(),
    }
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
        Some(v) => Some(one_range(v, acells, scells).map_err(|r| err("smmu-hv,static-mem", r))?),
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
                    .and_then(crate::pci::Bdf::parse)
                    .ok_or_else(|| {
                        err(
                            "smmu-hv,pci-devices",
                            format!("{:?} is not a BB:DD.F function", String::from_utf8_lossy(s)),
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

    Ok(VmSpec {
        name,
        vcpus,
        pcpus,
        mem_size,
        static_mem,
        kernel,
        ramdisk,
        pci_devices,
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

/// `value` as exactly one `<base size>` entry of the given cell sizes (1 or 2 each).
fn one_range(value: &[u8], acells: u32, scells: u32) -> Result<MemRange, String> {
    let (alen, slen) = (acells as usize * 4, scells as usize * 4);
    if value.len() != alen + slen {
        return Err(format!(
            "must be one <base size> entry of {acells}+{scells} cells, is {} bytes",
            value.len()
        ));
    }
    let (base, size) = (platform::be(&value[..alen]), platform::be(&value[alen..]));
    if base.checked_add(size).is_none() {
        return Err(format!(
            "[{base:#x} +{size:#x}) wraps past the top of the address space"
        ));
    }
    Ok(MemRange { base, size })
}

/// Resources a spec asks for explicitly, which VMs earlier in DT order with automatic
/// placement leave alone (explicit requests can only be met one way; automatic ones can
/// usually be met another).
#[derive(Debug, Default)]
struct Claims {
    /// Logical indices of the CPUs `smmu-hv,cpus` names, if the list is usable at all.
    cpus: Vec<usize>,
    /// `smmu-hv,static-mem`, if it passes the checks that do not depend on other VMs.
    mem: Option<MemRange>,
}

impl Claims {
    fn of(spec: &VmSpec, machine: &Machine) -> Claims {
        // Requests that will be refused whatever happens should not push other VMs around,
        // so only a pin list that can be met on this machine counts.
        let cpus = spec
            .pcpus
            .iter()
            .filter(|list| list.len() == spec.vcpus as usize)
            .map(|list| {
                list.iter()
                    .map(|m| machine.cpus.iter().position(|c| c == m))
                    .collect::<Option<Vec<usize>>>()
            })
            .find_map(|idx| idx.filter(|v| (1..v.len()).all(|i| !v[..i].contains(&v[i]))))
            .unwrap_or_default();
        let mem = spec.static_mem.filter(|r| {
            r.size == spec.mem_size
                && r.size != 0
                && r.base.is_multiple_of(RAM_ALIGN)
                && r.size.is_multiple_of(RAM_ALIGN)
                && in_ram(machine, *r)
        });
        Claims { cpus, mem }
    }
}

/// Checks every spec against the machine and the VMs accepted before it (DT order, first come
/// first served), and places RAM for VMs without static-mem (top-down, 2 MiB aligned, avoiding
/// busy ranges, every module of every spec, and every accepted VM's RAM). Returns the accepted
/// plans and one error per refused VM (a refused VM takes no resources).
///
/// Explicit requests of later VMs are honoured over automatic choices of earlier ones: a VM
/// without `smmu-hv,cpus` never gets a CPU a later VM pins, and a VM without
/// `smmu-hv,static-mem` is never placed over a later VM's (plausible) static memory.
pub fn plan_vms(
    specs: Vec<Result<VmSpec, ConfigError>>,
    machine: &Machine,
) -> (Vec<VmPlan>, Vec<ConfigError>) {
    // Modules are shared read-only images that must survive every VM's boot, so no VM's RAM
    // may cover any of them, whoever names them.
    let modules: Vec<MemRange> = specs
        .iter()
        .flatten()
        .flat_map(|s| s.kernel.iter().map(|k| k.range).chain(s.ramdisk))
        .collect();
    let claims: Vec<Claims> = specs
        .iter()
        .map(|s| match s {
            Ok(s) => Claims::of(s, machine),
            Err(_) => Claims::default(),
        })
        .collect();

    let mut plans = Vec::new();
    let mut errors = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let ctx = Ctx {
            machine,
            accepted: &plans,
            later: &claims[i + 1..],
            modules: &modules,
        };
        match spec.and_then(|s| ctx.plan(s)) {
            Ok(plan) => plans.push(plan),
            Err(e) => errors.push(e),
        }
    }
    (plans, errors)
}

/// What one VM is checked against.
struct Ctx<'a> {
    machine: &'a Machine<'a>,
    accepted: &'a [VmPlan],
    later: &'a [Claims],
    modules: &'a [MemRange],
}

impl Ctx<'_> {
    fn plan(&self, spec: VmSpec) -> Result<VmPlan, ConfigError> {
        let err = |field, reason: String| cfg_err(&spec.name, field, reason);

        if self.accepted.iter().any(|p| p.name == spec.name) {
            return Err(err("name", "another VM already has this name".into()));
        }

        let kernel = spec
            .kernel
            .clone()
            .ok_or_else(|| err("module", "no multiboot,kernel module".into()))?;
        let images = [("kernel", Some(kernel.range)), ("ramdisk", spec.ramdisk)];
        for (what, range) in images {
            let Some(r) = range else { continue };
            if let Some(why) = self.module_problem(r) {
                return Err(err("module", format!("{what} at {} {why}", show(r))));
            }
        }

        let pcpus = self.cpus(&spec).map_err(|(f, r)| err(f, r))?;
        let ram_pa = self.memory(&spec).map_err(|(f, r)| err(f, r))?;

        Ok(VmPlan {
            name: spec.name,
            pcpus,
            ram_pa,
            ram_size: spec.mem_size,
            kernel,
            ramdisk: spec.ramdisk,
            pci_devices: spec.pci_devices,
        })
    }

    /// Why a module cannot be used where it is, if it cannot.
    fn module_problem(&self, r: MemRange) -> Option<String> {
        if r.size == 0 {
            return Some("is empty".into());
        }
        if !in_ram(self.machine, r) {
            return Some("is outside RAM".into());
        }
        if overlaps(r, self.machine.hypervisor) {
            return Some("overlaps the hypervisor image".into());
        }
        let busy = self.machine.busy.iter().find(|b| overlaps(r, **b))?;
        Some(format!("overlaps busy range {}", show(*busy)))
    }

    fn cpus(&self, spec: &VmSpec) -> Result<Vec<usize>, (&'static str, String)> {
        let have = self.machine.cpus.len();
        let want = spec.vcpus as usize;
        if want == 0 {
            return Err(("cpus", "must be at least 1".into()));
        }
        if want > have {
            return Err((
                "cpus",
                format!("{want} vCPUs but the machine has {have} CPUs"),
            ));
        }
        let owner = |cpu: usize| self.accepted.iter().find(|p| p.pcpus.contains(&cpu));

        let Some(mpidrs) = &spec.pcpus else {
            let free: Vec<usize> = (0..have)
                .filter(|&c| owner(c).is_none())
                .filter(|c| !self.later.iter().any(|l| l.cpus.contains(c)))
                .collect();
            if free.len() < want {
                return Err((
                    "cpus",
                    format!("needs {want} CPUs, only {} free", free.len()),
                ));
            }
            return Ok(free[..want].to_vec());
        };

        let field = "smmu-hv,cpus";
        if mpidrs.len() != want {
            return Err((
                field,
                format!("lists {} CPUs but `cpus` is {want}", mpidrs.len()),
            ));
        }
        let mut pcpus = Vec::with_capacity(want);
        for &mpidr in mpidrs {
            let Some(cpu) = self.machine.cpus.iter().position(|&m| m == mpidr) else {
                return Err((
                    field,
                    format!("the machine has no CPU with MPIDR {mpidr:#x}"),
                ));
            };
            if pcpus.contains(&cpu) {
                return Err((field, format!("MPIDR {mpidr:#x} is listed twice")));
            }
            if let Some(p) = owner(cpu) {
                return Err((
                    field,
                    format!("MPIDR {mpidr:#x} overlaps {}'s CPUs", p.name),
                ));
            }
            pcpus.push(cpu);
        }
        Ok(pcpus)
    }

    /// Where the VM's RAM goes.
    fn memory(&self, spec: &VmSpec) -> Result<u64, (&'static str, String)> {
        let size = spec.mem_size;
        if size == 0 {
            return Err(("memory", "must not be 0".into()));
        }
        if !size.is_multiple_of(RAM_ALIGN) {
            return Err((
                "memory",
                format!("{size:#x} bytes is not a multiple of 2 MiB"),
            ));
        }
        let machine = self.machine;

        let Some(r) = spec.static_mem else {
            let mut avoid: Vec<MemRange> = machine.busy.to_vec();
            avoid.push(machine.hypervisor);
            avoid.extend_from_slice(self.modules);
            avoid.extend(self.accepted.iter().map(ram_of));
            avoid.extend(self.later.iter().filter_map(|l| l.mem));
            return place_top_down(machine.ram, &avoid, size, RAM_ALIGN)
                .ok_or_else(|| ("memory", format!("no room for {} MiB of RAM", size >> 20)));
        };

        let field = "smmu-hv,static-mem";
        let problem = if r.size != size {
            Some(format!(
                "size {:#x} does not match `memory` ({size:#x} bytes)",
                r.size
            ))
        } else if !r.base.is_multiple_of(RAM_ALIGN) {
            Some(format!("base {:#x} is not 2 MiB aligned", r.base))
        } else if !in_ram(machine, r) {
            Some(format!("{} is outside RAM", show(r)))
        } else if overlaps(r, machine.hypervisor) {
            Some(format!("{} overlaps the hypervisor image", show(r)))
        } else if let Some(b) = machine.busy.iter().find(|b| overlaps(r, **b)) {
            Some(format!("{} overlaps busy range {}", show(r), show(*b)))
        } else if let Some(m) = self.modules.iter().find(|m| overlaps(r, **m)) {
            Some(format!("{} overlaps module {}", show(r), show(*m)))
        } else {
            self.accepted
                .iter()
                .find(|p| overlaps(r, ram_of(p)))
                .map(|p| format!("{} overlaps {}'s memory", show(r), p.name))
        };
        match problem {
            Some(reason) => Err((field, reason)),
            None => Ok(r.base),
        }
    }
}

fn ram_of(p: &VmPlan) -> MemRange {
    MemRange {
        base: p.ram_pa,
        size: p.ram_size,
    }
}

/// Whether `r` lies entirely inside one RAM range.
fn in_ram(machine: &Machine, r: MemRange) -> bool {
    // A wrapping range (possible only in a hand-built spec) is never inside anything.
    r.base.checked_add(r.size).is_some()
        && machine
            .ram
            .iter()
            .any(|m| m.base <= r.base && r.end() <= m.end())
}

/// `[base, end)` for messages.
fn show(r: MemRange) -> String {
    format!("[{:#x}, {:#x})", r.base, r.end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Bdf;
    use vm_fdt::FdtWriter;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const KERNEL: MemRange = MemRange {
        base: 0x4a00_0000,
        size: 0x2a2_b000,
    };
    const RAMDISK: MemRange = MemRange {
        base: 0x5000_0000,
        size: 0xf_1000,
    };
    const HYP: MemRange = MemRange {
        base: 0x4020_0000,
        size: 16 * MIB,
    };
    /// Where the DTB sits in the synthetic machine.
    const DTB: MemRange = MemRange {
        base: 0x4800_0000,
        size: 0x1_0000,
    };
    const RAM: [MemRange; 1] = [MemRange {
        base: 0x4000_0000,
        size: 4 * GIB,
    }];
    const CPUS: [u64; 4] = [0, 1, 2, 3];
    const BUSY: [MemRange; 2] = [HYP, DTB];

    fn machine() -> Machine<'static> {
        Machine {
            cpus: &CPUS,
            ram: &RAM,
            busy: &BUSY,
            hypervisor: HYP,
        }
    }

    fn r(base: u64, size: u64) -> MemRange {
        MemRange { base, size }
    }

    fn cells(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|c| c.to_be_bytes()).collect()
    }

    /// `<hi lo hi lo>`: a 2/2-cell reg entry.
    fn reg2(m: MemRange) -> Vec<u8> {
        cells(&[
            (m.base >> 32) as u32,
            m.base as u32,
            (m.size >> 32) as u32,
            m.size as u32,
        ])
    }

    fn kib(bytes: u64) -> Vec<u8> {
        let k = bytes / 1024;
        cells(&[(k >> 32) as u32, k as u32])
    }

    /// A module child: node name, compatibles, raw `reg`, bootargs.
    #[derive(Clone)]
    struct Module {
        name: String,
        compat: Vec<&'static str>,
        reg: Vec<u8>,
        bootargs: Option<&'static str>,
    }

    fn kernel_mod(m: MemRange, bootargs: Option<&'static str>) -> Module {
        Module {
            name: format!("module@{:x}", m.base),
            compat: vec!["multiboot,kernel", "multiboot,module"],
            reg: reg2(m),
            bootargs,
        }
    }

    fn ramdisk_mod(m: MemRange) -> Module {
        Module {
            name: format!("module@{:x}", m.base),
            compat: vec!["multiboot,ramdisk", "multiboot,module"],
            reg: reg2(m),
            bootargs: None,
        }
    }

    /// A /chosen child, property by property, so tests can break any one of them.
    #[derive(Clone)]
    struct Node {
        name: String,
        props: Vec<(&'static str, Vec<u8>)>,
        modules: Vec<Module>,
    }

    /// A well-formed VM: `vcpus` auto-assigned CPUs, `mem` bytes placed automatically, the
    /// shared kernel and ramdisk.
    fn vm(name: &str, vcpus: u32, mem: u64) -> Node {
        Node {
            name: name.into(),
            props: vec![
                ("compatible", b"smmu-hv,vm\0".to_vec()),
                ("cpus", cells(&[vcpus])),
                ("memory", kib(mem)),
            ],
            modules: vec![
                kernel_mod(KERNEL, Some("console=ttyAMA0")),
                ramdisk_mod(RAMDISK),
            ],
        }
    }

    impl Node {
        fn set(mut self, name: &'static str, value: Vec<u8>) -> Self {
            self.props.retain(|(n, _)| *n != name);
            self.props.push((name, value));
            self
        }
        fn without(mut self, name: &str) -> Self {
            self.props.retain(|(n, _)| *n != name);
            self
        }
        fn pinned(self, mpidrs: &[u32]) -> Self {
            self.set("smmu-hv,cpus", cells(mpidrs))
        }
        fn static_mem(self, m: MemRange) -> Self {
            self.set("smmu-hv,static-mem", reg2(m))
        }
        fn modules(mut self, modules: Vec<Module>) -> Self {
            self.modules = modules;
            self
        }
    }

    fn dtb(nodes: &[Node]) -> Vec<u8> {
        let mut w = FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        let chosen = w.begin_node("chosen").unwrap();
        w.property_string("bootargs", "hv").unwrap();
        // Neighbours that are not VMs: a hypervisor-level module and an unrelated node.
        let n = w.begin_node("module@60000000").unwrap();
        w.property_string_list(
            "compatible",
            vec!["multiboot,kernel".into(), "multiboot,module".into()],
        )
        .unwrap();
        w.property_array_u64("reg", &[0x6000_0000, 0x1000]).unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("other").unwrap();
        w.property_string("compatible", "something,else").unwrap();
        w.end_node(n).unwrap();
        for node in nodes {
            let n = w.begin_node(&node.name).unwrap();
            for (name, value) in &node.props {
                w.property(name, value).unwrap();
            }
            for m in &node.modules {
                let c = w.begin_node(&m.name).unwrap();
                w.property_string_list(
                    "compatible",
                    m.compat.iter().map(|s| s.to_string()).collect(),
                )
                .unwrap();
                w.property("reg", &m.reg).unwrap();
                if let Some(b) = m.bootargs {
                    w.property_string("bootargs", b).unwrap();
                }
                w.end_node(c).unwrap();
            }
            w.end_node(n).unwrap();
        }
        w.end_node(chosen).unwrap();
        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    /// Parses and plans, checking the invariants every plan must keep.
    fn run(nodes: &[Node]) -> (Vec<VmPlan>, Vec<ConfigError>) {
        let specs = parse_vm_specs(&dtb(nodes)).unwrap();
        let modules: Vec<MemRange> = specs
            .iter()
            .flatten()
            .flat_map(|s| s.kernel.iter().map(|k| k.range).chain(s.ramdisk))
            .collect();
        let m = machine();
        let (plans, errors) = plan_vms(specs.clone(), &m);
        assert_eq!(plans.len() + errors.len(), specs.len());
        for (i, p) in plans.iter().enumerate() {
            let ram = ram_of(p);
            assert!(p.ram_pa.is_multiple_of(RAM_ALIGN));
            assert!(in_ram(&m, ram), "{p:?}");
            assert!(!overlaps(ram, HYP), "{p:?}");
            assert!(BUSY.iter().all(|b| !overlaps(ram, *b)), "{p:?}");
            assert!(modules.iter().all(|b| !overlaps(ram, *b)), "{p:?}");
            assert!(p.pcpus.iter().all(|&c| c < CPUS.len()));
            for q in &plans[i + 1..] {
                assert!(!overlaps(ram, ram_of(q)), "{p:?} {q:?}");
                assert!(p.pcpus.iter().all(|c| !q.pcpus.contains(c)), "{p:?} {q:?}");
                assert_ne!(p.name, q.name);
            }
        }
        (plans, errors)
    }

    fn names(plans: &[VmPlan]) -> Vec<&str> {
        plans.iter().map(|p| p.name.as_str()).collect()
    }

    /// The single error's VM and field.
    fn who(errors: &[ConfigError]) -> (&str, &'static str) {
        assert_eq!(errors.len(), 1, "{errors:?}");
        (errors[0].vm.as_str(), errors[0].field)
    }

    #[test]
    fn parses_a_node() {
        let node = vm("vm@0", 2, GIB)
            .set("smmu-hv,name", b"linux\0".to_vec())
            .pinned(&[1, 3])
            .static_mem(r(0x1_0000_0000, GIB))
            .set("smmu-hv,pci-devices", b"00:01.0\x0000:02.0\0".to_vec());
        let specs = parse_vm_specs(&dtb(&[node])).unwrap();
        assert_eq!(
            specs,
            vec![Ok(VmSpec {
                name: "linux".into(),
                vcpus: 2,
                pcpus: Some(vec![1, 3]),
                mem_size: GIB,
                static_mem: Some(r(0x1_0000_0000, GIB)),
                kernel: Some(ModuleSpec {
                    range: KERNEL,
                    bootargs: Some("console=ttyAMA0".into())
                }),
                ramdisk: Some(RAMDISK),
                pci_devices: vec![Bdf::new(0, 1, 0), Bdf::new(0, 2, 0)],
            })]
        );
    }

    #[test]
    fn pci_devices_must_be_bdfs_named_once() {
        for (value, why) in [
            (&b"00:01\0"[..], "not a BB:DD.F"),
            (b"00:20.0\0", "not a BB:DD.F"),
            (b"00:01.8\0", "not a BB:DD.F"),
            (b"00:01.0\x0000:01.0\0", "named twice"),
        ] {
            let node = vm("vm0", 1, 64 * MIB).set("smmu-hv,pci-devices", value.to_vec());
            let specs = parse_vm_specs(&dtb(&[node])).unwrap();
            let e = specs[0].clone().unwrap_err();
            assert_eq!(e.field, "smmu-hv,pci-devices");
            assert!(e.reason.contains(why), "{e}");
        }
    }

    #[test]
    fn one_cell_addresses_and_node_name() {
        let node = vm("guest", 1, 64 * MIB)
            .set("#address-cells", cells(&[1]))
            .set("#size-cells", cells(&[1]))
            .set("smmu-hv,static-mem", cells(&[0x8000_0000, 64 << 20]))
            .modules(vec![Module {
                reg: cells(&[KERNEL.base as u32, KERNEL.size as u32]),
                ..kernel_mod(KERNEL, None)
            }]);
        let spec = parse_vm_specs(&dtb(&[node])).unwrap().remove(0).unwrap();
        assert_eq!(spec.name, "guest");
        assert_eq!(spec.static_mem, Some(r(0x8000_0000, 64 * MIB)));
        assert_eq!(
            spec.kernel,
            Some(ModuleSpec {
                range: KERNEL,
                bootargs: None
            })
        );
        assert_eq!(spec.ramdisk, None);
        assert_eq!(spec.pcpus, None);
    }

    #[test]
    fn no_vms() {
        assert_eq!(parse_vm_specs(&dtb(&[])).unwrap(), vec![]);
        let mut w = FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.end_node(root).unwrap();
        assert_eq!(parse_vm_specs(&w.finish().unwrap()).unwrap(), vec![]);
        assert!(matches!(
            parse_vm_specs(&[0u8; 64]),
            Err(PlatformError::Malformed { .. })
        ));
        assert_eq!(plan_vms(vec![], &machine()), (vec![], vec![]));
    }

    #[test]
    fn happy_path() {
        let (plans, errors) = run(&[
            vm("vm0", 2, GIB),
            vm("vm1", 2, GIB)
                .pinned(&[3, 2])
                .static_mem(r(0x1_0000_0000, GIB)),
        ]);
        assert_eq!(errors, vec![]);
        let kernel = ModuleSpec {
            range: KERNEL,
            bootargs: Some("console=ttyAMA0".into()),
        };
        assert_eq!(
            plans,
            vec![
                VmPlan {
                    name: "vm0".into(),
                    pcpus: vec![0, 1],
                    // Top of RAM is vm1's static memory, so vm0 goes just below it.
                    ram_pa: 0xc000_0000,
                    ram_size: GIB,
                    kernel: kernel.clone(),
                    ramdisk: Some(RAMDISK),
                    pci_devices: vec![],
                },
                VmPlan {
                    name: "vm1".into(),
                    pcpus: vec![3, 2],
                    ram_pa: 0x1_0000_0000,
                    ram_size: GIB,
                    kernel,
                    ramdisk: Some(RAMDISK),
                    pci_devices: vec![],
                },
            ]
        );
    }

    #[test]
    fn auto_placement_steps_around_modules() {
        // 1.5 GiB VMs cannot both sit above the modules, so the second goes below and around
        // them (and around the hypervisor and the DTB).
        let (plans, errors) = run(&[
            vm("a", 1, GIB + GIB / 2),
            vm("b", 1, GIB + GIB / 2),
            vm("c", 1, 256 * MIB),
        ]);
        assert_eq!(errors, vec![]);
        assert_eq!(names(&plans), ["a", "b", "c"]);
        assert_eq!(plans[0].ram_pa, 0x1_4000_0000 - (GIB + GIB / 2));
    }

    #[test]
    fn auto_cpus_skip_later_pins() {
        let (plans, errors) = run(&[vm("vm0", 2, GIB), vm("vm1", 2, GIB).pinned(&[0, 1])]);
        assert_eq!(errors, vec![]);
        assert_eq!(plans[0].pcpus, vec![2, 3]);
        assert_eq!(plans[1].pcpus, vec![0, 1]);

        // Later pins can leave an automatic VM short; the pinned VM still gets its CPUs.
        let (plans, errors) = run(&[vm("vm0", 2, GIB), vm("vm1", 3, GIB).pinned(&[0, 1, 2])]);
        assert_eq!(who(&errors), ("vm0", "cpus"));
        assert_eq!(errors[0].reason, "needs 2 CPUs, only 1 free");
        assert_eq!(names(&plans), ["vm1"]);

        // A pin list that can never be met blocks nothing.
        let (plans, errors) = run(&[vm("vm0", 2, GIB), vm("vm1", 2, GIB).pinned(&[0, 9])]);
        assert_eq!(who(&errors), ("vm1", "smmu-hv,cpus"));
        assert_eq!(plans[0].pcpus, vec![0, 1]);
    }

    #[test]
    fn auto_memory_skips_later_static_memory() {
        let top = r(0x1_4000_0000 - GIB, GIB);
        let (plans, errors) = run(&[vm("vm0", 1, GIB), vm("vm1", 1, GIB).static_mem(top)]);
        assert_eq!(errors, vec![]);
        assert_eq!(plans[0].ram_pa, top.base - GIB);
        assert_eq!(plans[1].ram_pa, top.base);

        // Static memory that can never be granted (wrong size) reserves nothing.
        let wrong = r(top.base, 2 * GIB);
        let (plans, errors) = run(&[vm("vm0", 1, GIB), vm("vm1", 1, GIB).static_mem(wrong)]);
        assert_eq!(who(&errors), ("vm1", "smmu-hv,static-mem"));
        assert_eq!(plans[0].ram_pa, top.base);
    }

    #[test]
    fn dt_order_wins() {
        let (plans, errors) = run(&[vm("vm0", 3, GIB), vm("vm1", 2, GIB)]);
        assert_eq!(who(&errors), ("vm1", "cpus"));
        assert_eq!(errors[0].reason, "needs 2 CPUs, only 1 free");
        assert_eq!(names(&plans), ["vm0"]);

        let (plans, errors) = run(&[
            vm("vm0", 1, GIB).pinned(&[1]),
            vm("vm1", 2, GIB).pinned(&[2, 1]),
            vm("vm2", 2, GIB),
        ]);
        assert_eq!(who(&errors), ("vm1", "smmu-hv,cpus"));
        assert_eq!(errors[0].reason, "MPIDR 0x1 overlaps vm0's CPUs");
        assert_eq!(names(&plans), ["vm0", "vm2"]);
        // vm1 was refused, so CPU 2 is free again.
        assert_eq!(plans[1].pcpus, vec![0, 2]);

        let (plans, errors) = run(&[
            vm("vm0", 1, GIB).static_mem(r(0x1_0000_0000, GIB)),
            vm("vm1", 1, GIB).static_mem(r(0xe000_0000, GIB)),
            vm("vm2", 1, GIB),
        ]);
        assert_eq!(who(&errors), ("vm1", "smmu-hv,static-mem"));
        assert!(errors[0].reason.ends_with("overlaps vm0's memory"));
        assert_eq!(names(&plans), ["vm0", "vm2"]);
        // vm1's refused static memory is free for vm2.
        assert_eq!(plans[1].ram_pa, 0xc000_0000);

        let (plans, errors) = run(&[
            vm("vm0", 1, GIB),
            vm("other", 1, GIB).set("smmu-hv,name", b"vm0\0".to_vec()),
            vm("vm1", 1, GIB),
        ]);
        assert_eq!(who(&errors), ("vm0", "name"));
        assert_eq!(names(&plans), ["vm0", "vm1"]);
    }

    #[test]
    fn a_refused_vm_takes_nothing() {
        let (plans, errors) = run(&[
            vm("vm0", 4, 8 * GIB),
            vm("vm1", 4, 2 * GIB).static_mem(r(0x1_4000_0000 - 2 * GIB, 2 * GIB)),
            vm("vm2", 4, 2 * GIB),
        ]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!((errors[0].vm.as_str(), errors[0].field), ("vm0", "memory"));
        assert_eq!(errors[0].reason, "no room for 8192 MiB of RAM");
        assert_eq!((errors[1].vm.as_str(), errors[1].field), ("vm2", "cpus"));
        assert_eq!(names(&plans), ["vm1"]);
        assert_eq!(plans[0].pcpus, vec![0, 1, 2, 3]);
    }

    /// Each bad VM is refused with the expected field; a good VM after it is still accepted.
    #[test]
    fn each_error_names_the_vm_and_field() {
        let good = vm("good", 2, 512 * MIB);
        let outside = r(0x2_0000_0000, 0x1000);
        let cases: Vec<(Node, &str, &str)> =
            vec![
            // Modules.
            (
                vm("bad", 1, GIB).modules(vec![ramdisk_mod(RAMDISK)]),
                "module",
                "no multiboot,kernel",
            ),
            (
                vm("bad", 1, GIB).modules(vec![kernel_mod(outside, None)]),
                "module",
                "kernel at [0x200000000, 0x200001000) is outside RAM",
            ),
            (
                vm("bad", 1, GIB).modules(vec![kernel_mod(r(0x4100_0000, 0x1000), None)]),
                "module",
                "overlaps the hypervisor image",
            ),
            (
                vm("bad", 1, GIB)
                    .modules(vec![kernel_mod(KERNEL, None), ramdisk_mod(r(0x4800_8000, 0x10000))]),
                "module",
                "ramdisk at [0x48008000, 0x48018000) overlaps busy range [0x48000000, 0x48010000)",
            ),
            (
                vm("bad", 1, GIB).modules(vec![kernel_mod(KERNEL, None), kernel_mod(KERNEL, None)]),
                "module",
                "more than one multiboot,kernel",
            ),
            (
                vm("bad", 1, GIB).modules(vec![kernel_mod(r(0x4a00_0000, 0), None)]),
                "module",
                "empty",
            ),
            // CPUs.
            (vm("bad", 1, GIB).without("cpus"), "cpus", "missing"),
            (vm("bad", 0, GIB), "cpus", "must be at least 1"),
            (
                vm("bad", 5, GIB),
                "cpus",
                "5 vCPUs but the machine has 4 CPUs",
            ),
            (
                vm("bad", 2, GIB).pinned(&[0]),
                "smmu-hv,cpus",
                "lists 1 CPUs but `cpus` is 2",
            ),
            (
                vm("bad", 2, GIB).pinned(&[0, 0x100]),
                "smmu-hv,cpus",
                "no CPU with MPIDR 0x100",
            ),
            (
                vm("bad", 2, GIB).pinned(&[1, 1]),
                "smmu-hv,cpus",
                "MPIDR 0x1 is listed twice",
            ),
            // Memory.
            (vm("bad", 1, GIB).without("memory"), "memory", "missing"),
            (vm("bad", 1, 0), "memory", "must not be 0"),
            (vm("bad", 1, MIB), "memory", "not a multiple of 2 MiB"),
            (vm("bad", 1, 8 * GIB), "memory", "no room"),
            (
                vm("bad", 1, GIB).static_mem(r(0x1_0000_0000, 512 * MIB)),
                "smmu-hv,static-mem",
                "does not match `memory`",
            ),
            (
                vm("bad", 1, GIB).static_mem(r(0xc010_0000, GIB)),
                "smmu-hv,static-mem",
                "not 2 MiB aligned",
            ),
            (
                vm("bad", 1, GIB).static_mem(r(0x1_2000_0000, GIB)),
                "smmu-hv,static-mem",
                "outside RAM",
            ),
            (
                vm("bad", 1, GIB).static_mem(r(0x4000_0000, GIB)),
                "smmu-hv,static-mem",
                "overlaps the hypervisor image",
            ),
            (
                vm("bad", 1, 2 * MIB).static_mem(r(0x4800_0000, 2 * MIB)),
                "smmu-hv,static-mem",
                "overlaps busy range",
            ),
            (
                vm("bad", 1, GIB).static_mem(r(0x4e00_0000, GIB)),
                "smmu-hv,static-mem",
                "overlaps module [0x50000000, 0x500f1000)",
            ),
            // Malformed properties.
            (
                vm("bad", 1, GIB).set("cpus", cells(&[0, 1])),
                "cpus",
                "one u32 cell",
            ),
            (
                vm("bad", 1, GIB).set("memory", cells(&[0x10_0000])),
                "memory",
                "two u32 cells",
            ),
            (
                vm("bad", 1, GIB).set("smmu-hv,cpus", vec![0, 0, 1]),
                "smmu-hv,cpus",
                "u32 cells",
            ),
            (
                vm("bad", 1, GIB).set("smmu-hv,cpus", vec![]),
                "smmu-hv,cpus",
                "u32 cells",
            ),
            (
                vm("bad", 1, GIB).set("smmu-hv,static-mem", cells(&[1, 0, 0x4000_0000])),
                "smmu-hv,static-mem",
                "one <base size> entry of 2+2 cells",
            ),
            (
                vm("bad", 1, GIB)
                    .set("smmu-hv,static-mem", cells(&[u32::MAX, 0xffe0_0000, 1, 0])),
                "smmu-hv,static-mem",
                "wraps",
            ),
            (
                vm("bad", 1, GIB).set("memory", cells(&[u32::MAX, 0])),
                "memory",
                "overflows",
            ),
            (
                vm("bad", 1, GIB).modules(vec![Module {
                    reg: cells(&[0x4a00_0000, 0x1000]),
                    ..kernel_mod(KERNEL, None)
                }]),
                "module",
                "kernel module@4a000000: `reg` must be one <base size> entry",
            ),
            (
                vm("bad", 1, GIB).modules(vec![Module {
                    reg: vec![],
                    ..kernel_mod(KERNEL, None)
                }]),
                "module",
                "`reg`",
            ),
            (
                vm("bad", 1, GIB).set("#address-cells", cells(&[3])),
                "#address-cells",
                "must be 1 or 2",
            ),
            (
                vm("bad", 1, GIB).set("#size-cells", cells(&[0])),
                "#size-cells",
                "must be 1 or 2",
            ),
            (
                vm("bad", 1, GIB).set("smmu-hv,name", b"bad".to_vec()),
                "smmu-hv,name",
                "string",
            ),
            (
                vm("bad", 1, GIB).modules(vec![Module {
                    name: "module@4a000000".into(),
                    compat: vec!["multiboot,kernel"],
                    reg: reg2(KERNEL),
                    bootargs: None,
                }])
                .set("smmu-hv,name", b"\0".to_vec()),
                "smmu-hv,name",
                "non-empty",
            ),
        ];
        for (bad, field, reason) in cases {
            let (plans, errors) = run(&[bad.clone(), good.clone()]);
            assert_eq!(who(&errors), ("bad", field), "{errors:?}");
            assert!(
                errors[0].reason.contains(reason),
                "{:?} does not contain {reason:?}",
                errors[0].reason
            );
            assert_eq!(names(&plans), ["good"]);
            // And in the other order, the good VM is unaffected.
            let (plans, errors) = run(&[good.clone(), bad]);
            assert_eq!(who(&errors), ("bad", field), "{errors:?}");
            assert_eq!(names(&plans), ["good"]);
        }
    }

    #[test]
    fn error_message_format() {
        let (_, errors) = run(&[vm("vm2", 5, GIB)]);
        assert_eq!(
            errors[0].to_string(),
            "vm2: `cpus`: 5 vCPUs but the machine has 4 CPUs"
        );
    }

    #[test]
    fn hand_built_specs_are_checked_too() {
        let spec = VmSpec {
            name: "x".into(),
            vcpus: 1,
            pcpus: None,
            mem_size: 2 * MIB,
            static_mem: Some(r(u64::MAX - 2 * MIB + 1, 2 * MIB)),
            kernel: Some(ModuleSpec {
                range: KERNEL,
                bootargs: None,
            }),
            ramdisk: None,
            pci_devices: vec![],
        };
        let failed = cfg_err("y", "cpus", "unreadable");
        let (plans, errors) = plan_vms(vec![Ok(spec), Err(failed.clone())], &machine());
        assert_eq!(plans, vec![]);
        assert_eq!(errors[0].field, "smmu-hv,static-mem");
        assert_eq!(errors[1], failed);
    }

    #[test]
    fn corrupted_blobs_never_panic() {
        let base = dtb(&[
            vm("vm0", 2, GIB).pinned(&[0, 1]),
            vm("vm1", 2, GIB).static_mem(r(0x1_0000_0000, GIB)),
        ]);
        for i in 0..base.len() {
            for v in [0x00, 0x01, 0x03, 0x04, 0x7f, 0xff] {
                let mut blob = base.clone();
                blob[i] = v;
                if let Ok(specs) = parse_vm_specs(&blob) {
                    let _ = plan_vms(specs, &machine());
                }
            }
        }
        for len in 0..base.len() {
            let _ = parse_vm_specs(&base[..len]);
        }
    }
}

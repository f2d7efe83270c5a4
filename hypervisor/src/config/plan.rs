//! Step two: each [`VmSpec`] checked against the machine and the VMs accepted before it, and
//! given its CPUs and RAM.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::error::cfg_err;
use super::{ConfigError, Machine, VmPlan, VmSpec};
use crate::memory::{overlaps, place_top_down};
use crate::platform::MemRange;

/// Granule of VM RAM: stage-2 maps it with 2 MiB blocks, so base and size must be multiples.
pub(super) const RAM_ALIGN: u64 = 2 << 20;

/// Resources a spec asks for explicitly, which VMs earlier in DT order with automatic
/// placement leave alone (explicit requests can only be met one way; automatic ones can
/// usually be met another).
#[derive(Debug, Default)]
struct Claims {
    /// Logical indices of the CPUs `smmu-hv,cpus` names, if the list is usable at all.
    cpus: Vec<usize>,
    /// Logical indices of the CPUs of its `domain-cpupool`, if it does not pin its vCPUs:
    /// VMs without a pool or pins leave them alone (in Xen, a pool's CPUs run only the
    /// domains in that pool), VMs in a pool may share it.
    pool_cpus: Vec<usize>,
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
        let pool_cpus = match (&spec.pcpus, &spec.cpupool) {
            (None, Some(pool)) => pool
                .mpidrs
                .iter()
                .filter_map(|m| machine.cpus.iter().position(|c| c == m))
                .collect(),
            _ => Vec::new(),
        };
        Claims {
            cpus,
            pool_cpus,
            mem,
        }
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
            intx_only: spec.intx_only,
            iommu: spec.iommu,
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
            let (field, candidates) = match &spec.cpupool {
                None => ("cpus", (0..have).collect::<Vec<usize>>()),
                Some(pool) => {
                    let mut idx = Vec::with_capacity(pool.mpidrs.len());
                    for m in &pool.mpidrs {
                        let Some(cpu) = self.machine.cpus.iter().position(|c| c == m) else {
                            return Err((
                                "domain-cpupool",
                                format!("{}: the machine has no CPU with MPIDR {m:#x}", pool.path),
                            ));
                        };
                        idx.push(cpu);
                    }
                    ("domain-cpupool", idx)
                }
            };
            let in_pool = spec.cpupool.is_some();
            let free: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&c| owner(c).is_none())
                .filter(|c| {
                    !self
                        .later
                        .iter()
                        .any(|l| l.cpus.contains(c) || (!in_pool && l.pool_cpus.contains(c)))
                })
                .collect();
            if free.len() < want {
                let reason = match &spec.cpupool {
                    None => format!("needs {want} CPUs, only {} free", free.len()),
                    Some(pool) => format!(
                        "needs {want} CPUs, cpupool {} has {} of its {} free",
                        pool.path,
                        free.len(),
                        candidates.len()
                    ),
                };
                return Err((field, reason));
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

pub(super) fn ram_of(p: &VmPlan) -> MemRange {
    MemRange {
        base: p.ram_pa,
        size: p.ram_size,
    }
}

/// Whether `r` lies entirely inside one RAM range.
pub(super) fn in_ram(machine: &Machine, r: MemRange) -> bool {
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

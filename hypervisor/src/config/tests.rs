use super::error::cfg_err;
use super::plan::{in_ram, ram_of, RAM_ALIGN};
use super::*;
use crate::memory::overlaps;
use crate::pci::Bdf;
use crate::platform::PlatformError;
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
            pci_devices: vec![Bdf::new(0, 1, 0).into(), Bdf::new(0, 2, 0).into()],
            intx_only: false,
            iommu: IommuKind::Smmuv3,
            cpupool: None,
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
        (b"0000:00:01.0\x0000:01.0\0", "named twice"),
        (b"000:00:01.0\0", "not a BB:DD.F or DDDD:BB:DD.F"),
        (b"1:00:01.0\0", "not a BB:DD.F or DDDD:BB:DD.F"),
        (b"0001-00:01.0\0", "not a BB:DD.F or DDDD:BB:DD.F"),
        (b"g001:00:01.0\0", "not a BB:DD.F or DDDD:BB:DD.F"),
    ] {
        let node = vm("vm0", 1, 64 * MIB).set("smmu-hv,pci-devices", value.to_vec());
        let specs = parse_vm_specs(&dtb(&[node])).unwrap();
        let e = specs[0].clone().unwrap_err();
        assert_eq!(e.field, "smmu-hv,pci-devices");
        assert!(e.reason.contains(why), "{e}");
    }
}

#[test]
fn pci_devices_may_name_their_domain() {
    let node = vm("vm0", 1, 64 * MIB).set(
        "smmu-hv,pci-devices",
        b"0001:81:00.0\x0000:02.0\x000000:00:03.0\0".to_vec(),
    );
    let spec = parse_vm_specs(&dtb(&[node])).unwrap().remove(0).unwrap();
    assert_eq!(
        spec.pci_devices,
        vec![
            crate::pci::PciAddr::new(1, Bdf::new(0x81, 0, 0)),
            crate::pci::PciAddr::new(0, Bdf::new(0, 2, 0)),
            crate::pci::PciAddr::new(0, Bdf::new(0, 3, 0)),
        ]
    );
    assert_eq!(spec.pci_devices[0].to_string(), "0001:81:00.0");
    assert_eq!(spec.pci_devices[1].to_string(), "00:02.0");
}

#[test]
fn intx_only_is_a_boolean() {
    let plain = vm("vm0", 1, 64 * MIB);
    let spec = parse_vm_specs(&dtb(core::slice::from_ref(&plain)))
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(!spec.intx_only);
    let spec = parse_vm_specs(&dtb(&[plain.clone().set("smmu-hv,intx-only", vec![])]))
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(spec.intx_only);
    let e = parse_vm_specs(&dtb(&[plain.set("smmu-hv,intx-only", cells(&[0]))]))
        .unwrap()
        .remove(0)
        .unwrap_err();
    assert_eq!(e.field, "smmu-hv,intx-only");
    assert!(e.reason.contains("takes no value"), "{e}");
}

#[test]
fn iommu_names_one_of_two_kinds() {
    let plain = vm("vm0", 1, 64 * MIB);
    let parse = |n: Node| parse_vm_specs(&dtb(&[n])).unwrap().remove(0);
    assert_eq!(parse(plain.clone()).unwrap().iommu, IommuKind::Smmuv3);
    for (v, k) in [
        ("smmuv3", IommuKind::Smmuv3),
        ("virtio-iommu", IommuKind::VirtioIommu),
    ] {
        let spec = parse(
            plain
                .clone()
                .set("smmu-hv,iommu", [v.as_bytes(), b"\0"].concat()),
        );
        assert_eq!(spec.unwrap().iommu, k);
    }
    for bad in [&b"virtio\0"[..], b"SMMUv3\0", &[0xff, 0], b"", &cells(&[1])] {
        let e = parse(plain.clone().set("smmu-hv,iommu", bad.to_vec())).unwrap_err();
        assert_eq!(e.field, "smmu-hv,iommu");
        assert!(e.reason.contains("\"virtio-iommu\""), "{e}");
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
                intx_only: false,
                iommu: IommuKind::Smmuv3,
            },
            VmPlan {
                name: "vm1".into(),
                pcpus: vec![3, 2],
                ram_pa: 0x1_0000_0000,
                ram_size: GIB,
                kernel,
                ramdisk: Some(RAMDISK),
                pci_devices: vec![],
                intx_only: false,
                iommu: IommuKind::Smmuv3,
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
    let cases: Vec<(Node, &str, &str)> = vec![
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
            vm("bad", 1, GIB).modules(vec![
                kernel_mod(KERNEL, None),
                ramdisk_mod(r(0x4800_8000, 0x10000)),
            ]),
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
            vm("bad", 1, GIB).set("smmu-hv,static-mem", cells(&[u32::MAX, 0xffe0_0000, 1, 0])),
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
            vm("bad", 1, GIB)
                .modules(vec![Module {
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
        intx_only: false,
        iommu: IommuKind::Smmuv3,
        cpupool: None,
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

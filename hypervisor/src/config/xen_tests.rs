//! Xen dom0less domains and the hypervisor command line.

use super::*;
use crate::pci::Bdf;
use log::{Level, LevelFilter};
use vm_fdt::FdtWriter;

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
    size: 16 << 20,
};
const RAM: [MemRange; 1] = [MemRange {
    base: 0x4000_0000,
    size: 4 * GIB,
}];
const CPUS: [u64; 4] = [0, 1, 2, 3];
/// The phandle of /cpus/cpu@N.
const fn cpu_ph(n: u32) -> u32 {
    0x10 + n
}
const POOL_A: u32 = 0x20;
const POOL_B: u32 = 0x21;

fn machine() -> Machine<'static> {
    Machine {
        cpus: &CPUS,
        ram: &RAM,
        busy: &[HYP],
        hypervisor: HYP,
    }
}

fn cells(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|c| c.to_be_bytes()).collect()
}

fn reg2(m: MemRange) -> Vec<u8> {
    cells(&[
        (m.base >> 32) as u32,
        m.base as u32,
        (m.size >> 32) as u32,
        m.size as u32,
    ])
}

type Props = Vec<(&'static str, Vec<u8>)>;

/// A child node: name and properties.
#[derive(Clone)]
struct Child(String, Props);

/// A /chosen child.
#[derive(Clone)]
struct Node {
    name: &'static str,
    props: Props,
    children: Vec<Child>,
}

fn string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn strings(list: &[&str]) -> Vec<u8> {
    list.iter().flat_map(|s| string(s)).collect()
}

fn module(compat: &[&str], m: MemRange, bootargs: Option<&str>) -> Child {
    let mut props = vec![("compatible", strings(compat)), ("reg", reg2(m))];
    if let Some(b) = bootargs {
        props.push(("bootargs", string(b)));
    }
    Child(format!("module@{:x}", m.base), props)
}

/// A domain as ImageBuilder writes it: 2/2 cells, `memory` in KiB, `cpus`, `vpl011`, the
/// kernel and ramdisk modules.
fn domu(name: &'static str, vcpus: u32, mem: u64) -> Node {
    let kib = mem / 1024;
    Node {
        name,
        props: vec![
            ("compatible", string("xen,domain")),
            ("#address-cells", cells(&[2])),
            ("#size-cells", cells(&[2])),
            ("memory", cells(&[(kib >> 32) as u32, kib as u32])),
            ("cpus", cells(&[vcpus])),
            ("vpl011", string("pl011")),
        ],
        children: vec![
            module(
                &["multiboot,kernel", "multiboot,module"],
                KERNEL,
                Some("console=ttyAMA0"),
            ),
            module(&["multiboot,ramdisk", "multiboot,module"], RAMDISK, None),
        ],
    }
}

impl Node {
    fn set(mut self, name: &'static str, value: Vec<u8>) -> Self {
        self.props.retain(|(n, _)| *n != name);
        self.props.push((name, value));
        self
    }
    fn pool(self, phandle: u32) -> Self {
        self.set("domain-cpupool", cells(&[phandle]))
    }
    fn child(mut self, c: Child) -> Self {
        self.children.push(c);
        self
    }
}

/// The DT: 4 CPUs with phandles, two cpupools (A: CPUs 0 and 1, B: CPUs 2 and 3), a dom0
/// kernel module, `chosen` properties and the nodes.
fn dtb(chosen_props: &[(&'static str, Vec<u8>)], nodes: &[Node]) -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    let cpus = w.begin_node("cpus").unwrap();
    w.property_u32("#address-cells", 1).unwrap();
    w.property_u32("#size-cells", 0).unwrap();
    for n in 0..4 {
        let c = w.begin_node(&format!("cpu@{n}")).unwrap();
        w.property_string("device_type", "cpu").unwrap();
        w.property_u32("reg", n).unwrap();
        w.property_u32("phandle", cpu_ph(n)).unwrap();
        w.end_node(c).unwrap();
    }
    w.end_node(cpus).unwrap();
    let chosen = w.begin_node("chosen").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    for (name, value) in chosen_props {
        w.property(name, value).unwrap();
    }
    let d = w.begin_node("dom0").unwrap();
    w.property(
        "compatible",
        &strings(&["xen,linux-zimage", "xen,multiboot-module"]),
    )
    .unwrap();
    w.property("reg", &reg2(KERNEL)).unwrap();
    w.end_node(d).unwrap();
    for (name, ph, list) in [("cpupool_0", POOL_A, [0, 1]), ("cpupool_1", POOL_B, [2, 3])] {
        let p = w.begin_node(name).unwrap();
        w.property_u32("phandle", ph).unwrap();
        w.property_string("compatible", "xen,cpupool").unwrap();
        w.property("cpupool-cpus", &cells(&list.map(cpu_ph)))
            .unwrap();
        w.end_node(p).unwrap();
    }
    for node in nodes {
        let n = w.begin_node(node.name).unwrap();
        for (name, value) in &node.props {
            w.property(name, value).unwrap();
        }
        for Child(name, props) in &node.children {
            let c = w.begin_node(name).unwrap();
            for (pn, pv) in props {
                w.property(pn, pv).unwrap();
            }
            w.end_node(c).unwrap();
        }
        w.end_node(n).unwrap();
    }
    w.end_node(chosen).unwrap();
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

fn opt_in() -> Vec<(&'static str, Vec<u8>)> {
    vec![("smmu-hv,xen-dom0less", vec![])]
}

fn parse(chosen: &[(&'static str, Vec<u8>)], nodes: &[Node]) -> NotedSpecs {
    parse_vm_specs_noted(&dtb(chosen, nodes)).unwrap()
}

fn run(nodes: &[Node]) -> (Vec<VmPlan>, Vec<ConfigError>) {
    let (specs, _) = parse(&opt_in(), nodes);
    plan_vms(specs, &machine())
}

/// The single error's VM, field and reason.
fn refused(nodes: &[Node]) -> (String, &'static str, String) {
    let (specs, _) = parse(&opt_in(), nodes);
    let errs: Vec<ConfigError> = specs.into_iter().filter_map(Result::err).collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = errs.into_iter().next().unwrap();
    (e.vm, e.field, e.reason)
}

#[test]
fn xen_domains_need_the_opt_in() {
    let (specs, notes) = parse(&[], &[domu("domU0", 2, GIB)]);
    assert!(specs.is_empty());
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].0, Level::Warn);
    assert!(
        notes[0].1.contains("smmu-hv,xen-dom0less;"),
        "{}",
        notes[0].1
    );
    // A value is not a boolean: still ignored, and said so.
    let (specs, notes) = parse(
        &[("smmu-hv,xen-dom0less", cells(&[0]))],
        &[domu("domU0", 2, GIB)],
    );
    assert!(specs.is_empty());
    assert_eq!(notes.len(), 2, "{notes:?}");
    // No domains, no word.
    assert_eq!(parse(&[], &[]).1, vec![]);
}

#[test]
fn imagebuilder_two_domains_with_cpupools_and_static_mem() {
    let nodes = [
        domu("domU0", 2, GIB)
            .pool(POOL_A)
            .set("smmu-hv,pci-devices", strings(&["00:01.0", "00:02.0"])),
        domu("domU1", 2, GIB)
            .pool(POOL_B)
            .set(
                "xen,static-mem",
                reg2(MemRange {
                    base: 0x1_0000_0000,
                    size: GIB,
                }),
            )
            .set("xen,enhanced", string("enabled")),
    ];
    let (specs, notes) = parse(&opt_in(), &nodes);
    let spec = specs[1].clone().unwrap();
    assert_eq!(
        spec.cpupool,
        Some(CpuPool {
            path: "/chosen/cpupool_1".into(),
            mpidrs: vec![2, 3]
        })
    );
    assert_eq!(
        spec.kernel.unwrap().bootargs.as_deref(),
        Some("console=ttyAMA0")
    );
    assert_eq!(
        specs[0].as_ref().unwrap().pci_devices,
        vec![Bdf::new(0, 1, 0).into(), Bdf::new(0, 2, 0).into()]
    );
    assert!(
        notes
            .iter()
            .any(|(l, n)| *l == Level::Info && n.starts_with("domU1: xen,enhanced ignored")),
        "{notes:?}"
    );
    let (plans, errors) = plan_vms(specs, &machine());
    assert_eq!(errors, vec![]);
    assert_eq!(plans[0].name, "domU0");
    assert_eq!(plans[0].pcpus, vec![0, 1]);
    assert_eq!(plans[1].name, "domU1");
    assert_eq!(plans[1].pcpus, vec![2, 3]);
    assert_eq!(plans[1].ram_pa, 0x1_0000_0000);
}

#[test]
fn static_mem_cells_follow_xen() {
    let want = MemRange {
        base: 0x1_0000_0000,
        size: GIB,
    };
    let mem = |node: Node, chosen: &[(&'static str, Vec<u8>)]| {
        let (specs, _) = parse(chosen, &[node]);
        specs[0].clone().map(|s| s.static_mem)
    };
    // Xen 4.17 on: /chosen's cells (2/2 here).
    assert_eq!(
        mem(
            domu("d", 2, GIB).set("xen,static-mem", reg2(want)),
            &opt_in()
        ),
        Ok(Some(want))
    );
    // Xen 4.16: the domain's own #xen,static-mem-*-cells.
    let one_one = domu("d", 2, GIB)
        .set("#xen,static-mem-address-cells", cells(&[1]))
        .set("#xen,static-mem-size-cells", cells(&[1]))
        .set("xen,static-mem", cells(&[0x8000_0000, 0x4000_0000]));
    assert_eq!(
        mem(one_one, &opt_in()),
        Ok(Some(MemRange {
            base: 0x8000_0000,
            size: GIB
        }))
    );
    // Agreeing with smmu-hv,static-mem is fine.
    let both = domu("d", 2, GIB)
        .set("xen,static-mem", reg2(want))
        .set("smmu-hv,static-mem", reg2(want));
    assert_eq!(mem(both, &opt_in()), Ok(Some(want)));
}

#[test]
fn refusals_name_the_vm_and_the_property() {
    let mem = MemRange {
        base: 0x1_0000_0000,
        size: GIB,
    };
    let two_banks = [reg2(mem), reg2(mem)].concat();
    let cases: Vec<(Node, &str, &str)> = vec![
        (
            domu("d", 2, GIB).set("direct-map", vec![]),
            "direct-map",
            "direct-map (1:1 IPA=PA) is not supported: ",
        ),
        (
            domu("d", 2, GIB).set("xen,static-mem", two_banks),
            "xen,static-mem",
            "2 banks: only one bank is supported",
        ),
        (
            domu("d", 2, GIB).set("xen,static-mem", cells(&[1, 2, 3])),
            "xen,static-mem",
            "must be <base size> entries",
        ),
        (
            domu("d", 2, GIB)
                .set("#xen,static-mem-address-cells", cells(&[1]))
                .set("xen,static-mem", cells(&[1, 2])),
            "xen,static-mem",
            "#xen,static-mem-address-cells and #xen,static-mem-size-cells go together",
        ),
        (
            domu("d", 2, GIB).set("xen,static-mem", reg2(mem)).set(
                "smmu-hv,static-mem",
                reg2(MemRange {
                    base: 0xc000_0000,
                    size: GIB,
                }),
            ),
            "xen,static-mem",
            "disagrees with smmu-hv,static-mem",
        ),
        (
            domu("d", 2, GIB).pool(0x99),
            "domain-cpupool",
            "phandle 0x99 names no node",
        ),
        (
            domu("d", 2, GIB).pool(cpu_ph(0)),
            "domain-cpupool",
            "/cpus/cpu@0 is not a xen,cpupool node",
        ),
        (
            domu("d", 2, GIB)
                .pool(POOL_A)
                .set("smmu-hv,cpus", cells(&[1, 2])),
            "domain-cpupool",
            "smmu-hv,cpus names MPIDR 0x2, which cpupool /chosen/cpupool_0 does not have",
        ),
        (
            domu("d", 2, GIB).set("capabilities", cells(&[2])),
            "capabilities",
            "0x2: control, hardware and xenstore domains are not supported",
        ),
        (
            domu("d", 2, GIB).set("trap-unmapped-accesses", cells(&[0])),
            "trap-unmapped-accesses",
            "0 (unmapped reads as all ones",
        ),
        (
            domu("d", 2, GIB)
                .set("passthrough", string("disabled"))
                .set("smmu-hv,pci-devices", strings(&["00:01.0"])),
            "passthrough",
            "\"disabled\", but smmu-hv,pci-devices",
        ),
        (
            domu("d", 2, GIB).child(module(
                &["multiboot,device-tree", "multiboot,module"],
                MemRange {
                    base: 0x5800_0000,
                    size: 0x1000,
                },
                None,
            )),
            "module",
            "device-tree module@58000000: partial device trees",
        ),
        (
            domu("d", 2, GIB).child(Child(
                "shm@50000000".into(),
                vec![("compatible", string("xen,domain-shared-memory-v1"))],
            )),
            "xen,shared-mem",
            "static shared memory between domains is not supported",
        ),
    ];
    for (node, field, reason) in cases {
        let other = domu("ok", 1, GIB);
        let (vm, f, r) = refused(&[node, other]);
        assert_eq!((vm.as_str(), f), ("d", field), "{r}");
        assert!(r.contains(reason), "{field}: {r:?} does not say {reason:?}");
    }
}

#[test]
fn harmless_xen_properties_are_accepted_with_notes() {
    let node = domu("d", 2, GIB)
        .set("capabilities", cells(&[0]))
        .set("trap-unmapped-accesses", cells(&[1]))
        .set("passthrough", string("enabled"))
        .set("xen,enhanced", vec![])
        .set("sve", vec![])
        .set("llc-colors", string("0-3"))
        .set("nr_spis", cells(&[32]))
        .set("max_grant_frames", cells(&[64]))
        .child(Child(
            "vcpu0".into(),
            vec![
                ("compatible", string("xen,vcpu")),
                ("id", cells(&[0])),
                ("hard-affinity", string("0-3")),
            ],
        ));
    let (specs, notes) = parse(&opt_in(), &[node]);
    assert!(specs[0].is_ok(), "{specs:?}");
    let notes: Vec<&str> = notes.iter().map(|(_, n)| n.as_str()).collect();
    for what in ["xen,enhanced", "sve", "llc-colors", "vcpu0"] {
        assert!(
            notes.iter().any(|n| n.starts_with(&format!("d: {what}"))),
            "{what}: {notes:?}"
        );
    }
    assert_eq!(notes.len(), 4, "{notes:?}");
}

#[test]
fn legacy_module_compatibles() {
    let node = domu("d", 2, GIB);
    let node = Node {
        children: vec![
            module(
                &["xen,linux-zimage", "xen,multiboot-module"],
                KERNEL,
                Some("x"),
            ),
            module(&["xen,linux-initrd", "xen,multiboot-module"], RAMDISK, None),
        ],
        ..node
    };
    let (specs, _) = parse(&opt_in(), &[node]);
    let spec = specs[0].clone().unwrap();
    assert_eq!(spec.kernel.map(|k| k.range), Some(KERNEL));
    assert_eq!(spec.ramdisk, Some(RAMDISK));
}

#[test]
fn cpupools_place_vcpus() {
    // Two 1-vCPU domains share pool A; an unpooled domain earlier in DT order keeps off the
    // CPUs of later domains' pools.
    let (plans, errors) = run(&[
        domu("auto", 2, GIB),
        domu("a0", 1, GIB).pool(POOL_A),
        domu("a1", 1, GIB).pool(POOL_A),
        domu("b", 2, GIB).pool(POOL_B),
    ]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    // Every CPU is in a later domain's pool.
    assert_eq!(errors[0].vm, "auto");
    assert_eq!(errors[0].field, "cpus");
    let pcpus: Vec<(&str, Vec<usize>)> = plans
        .iter()
        .map(|p| (p.name.as_str(), p.pcpus.clone()))
        .collect();
    assert_eq!(
        pcpus,
        vec![("a0", vec![0]), ("a1", vec![1]), ("b", vec![2, 3])]
    );
    // A pool with too few free CPUs is the pool's fault.
    let (_, errors) = run(&[
        domu("a0", 1, GIB).pool(POOL_A),
        domu("a1", 2, GIB).pool(POOL_A),
    ]);
    assert_eq!(
        (errors[0].vm.as_str(), errors[0].field),
        ("a1", "domain-cpupool")
    );
    assert!(
        errors[0]
            .reason
            .contains("cpupool /chosen/cpupool_0 has 1 of its 2 free"),
        "{}",
        errors[0].reason
    );
    // Pins inside the pool are honoured as pins.
    let (plans, errors) = run(&[domu("a", 2, GIB)
        .pool(POOL_B)
        .set("smmu-hv,cpus", cells(&[3, 2]))]);
    assert_eq!(errors, vec![]);
    assert_eq!(plans[0].pcpus, vec![3, 2]);
}

#[test]
fn our_nodes_ignore_xen_properties() {
    // An `smmu-hv,vm` node is read by our binding only, opt-in or not.
    let node = domu("vm0", 2, GIB)
        .set("compatible", string("smmu-hv,vm"))
        .set("direct-map", vec![]);
    let (specs, _) = parse(&[], &[node]);
    assert!(specs[0].is_ok());
}

#[test]
fn bootargs_options() {
    let (o, w) = parse_hv_bootargs("");
    assert_eq!((o, w.len()), (HvOptions::default(), 0));
    for (line, level) in [
        ("loglvl=debug", LevelFilter::Debug),
        ("loglvl=all/info", LevelFilter::Trace),
        ("loglvl=warning", LevelFilter::Warn),
        ("loglvl=none", LevelFilter::Error),
        ("log=trace", LevelFilter::Trace),
        ("log=warn loglvl=info", LevelFilter::Info),
        ("  loglvl=error\t", LevelFilter::Error),
    ] {
        let (o, w) = parse_hv_bootargs(line);
        assert_eq!(o.log_level, Some(level), "{line}");
        assert!(w.is_empty(), "{line}: {w:?}");
    }
    // A Xen command line as ImageBuilder writes it: what we do not know is said, word by word.
    let (o, w) = parse_hv_bootargs(
        "console=dtuart dtuart=serial0 dom0_mem=1G bootscrub=0 vwfi=native sched=null loglvl=bogus",
    );
    assert_eq!(o.dtuart.as_deref(), Some("serial0"));
    assert_eq!(o.log_level, None);
    assert_eq!(w.len(), 5, "{w:?}");
    assert!(w[0].starts_with("`dom0_mem=1G`: unknown option"), "{w:?}");
    assert!(w[4].contains("unknown level \"bogus\""), "{w:?}");
    let (o, w) = parse_hv_bootargs("console=dtuart,vga dtuart=");
    assert_eq!(o.dtuart, None);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("console \"vga\" ignored"), "{w:?}");
}

#[test]
fn bootargs_ram_zeroing() {
    use crate::platform::RamZeroing;
    assert_eq!(parse_hv_bootargs("").0.ram_zero, None);
    assert_eq!(RamZeroing::default(), RamZeroing::Lazy);
    for (v, z) in [
        ("lazy", RamZeroing::Lazy),
        ("idle", RamZeroing::Idle),
        ("eager", RamZeroing::Eager),
    ] {
        let (o, w) = parse_hv_bootargs(&format!("ram-zero={v}"));
        assert_eq!((o.ram_zero, w.len()), (Some(z), 0), "{v}");
    }
    let (o, w) = parse_hv_bootargs("ram-zero=never");
    assert_eq!(
        o.ram_zero, None,
        "RAM is always zeroed: a bad value changes nothing"
    );
    assert!(w[0].contains("unknown value \"never\""), "{w:?}");
}

#[test]
fn bootargs_from_chosen() {
    let opts = |chosen: &[(&'static str, Vec<u8>)]| hv_options(&dtb(chosen, &[])).unwrap();
    assert_eq!(opts(&[]), (HvOptions::default(), vec![]));
    let xen = (
        "xen,xen-bootargs",
        string("loglvl=debug dtuart=serial0 sync_console"),
    );
    // Without the opt-in, Xen's command line is Xen's.
    assert_eq!(opts(std::slice::from_ref(&xen)).0, HvOptions::default());
    let (o, w) = opts(&[xen.clone(), opt_in()[0].clone()]);
    assert_eq!(o.log_level, Some(LevelFilter::Debug));
    assert_eq!(o.dtuart.as_deref(), Some("serial0"));
    assert_eq!(w.len(), 1);
    assert!(
        w[0].starts_with("/chosen/xen,xen-bootargs: `sync_console`"),
        "{w:?}"
    );
    // Ours wins over Xen's.
    let (o, _) = opts(&[
        xen,
        opt_in()[0].clone(),
        ("smmu-hv,bootargs", string("log=warn")),
    ]);
    assert_eq!(o.log_level, Some(LevelFilter::Warn));
    assert_eq!(o.dtuart.as_deref(), Some("serial0"));
    let (_, w) = opts(&[("smmu-hv,bootargs", vec![0xff, 0])]);
    assert!(w[0].contains("not a NUL-terminated string"), "{w:?}");
}

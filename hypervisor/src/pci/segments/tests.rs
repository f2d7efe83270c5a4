use super::*;
use crate::pci::assign::IommuEntry;
use crate::pci::enumerate::enumerate;
use crate::pci::fake::FakeConfigSpace;
use crate::pci::groups::iommu_groups;
use crate::pci::host::IommuMapEntry;
use alloc::vec;

const QEMU_SMMU: &[u8] = include_bytes!("../../../tests/data/qemu-virt-smmuv3-pci.dtb");

fn a(domain: u16, bus: u8, dev: u8, func: u8) -> PciAddr {
    PciAddr::new(domain, Bdf::new(bus, dev, func))
}

/// QEMU `virt`'s bridge as domain 0, and a second bridge with the same functions (so the same
/// BDFs) as domain 1 whose `iommu-map` sends its RIDs to the same SMMU at StreamID `sid_base`
/// up: 0x8000 keeps the two apart, 0 makes them overlap.
fn machine(sid_base: u32) -> (Vec<Segment>, IommuDirectory) {
    let host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
    let ph = host.iommu_map[0].iommu;
    let mut segments = Vec::new();
    for (domain, sid) in [(0u16, 0u32), (1, sid_base)] {
        let mut bridge = host.clone();
        bridge.iommu_map = vec![IommuMapEntry {
            rid_base: 0,
            iommu: ph,
            sid_base: sid,
            length: 0x1_0000,
        }];
        let mut f = FakeConfigSpace::qemu_flat();
        let topology = enumerate(&mut f, bridge.bus_start, bridge.bus_end).unwrap();
        let mut groups = iommu_groups(&topology, &bridge);
        let first = segments
            .iter()
            .flat_map(|s: &Segment| s.groups.iter().map(|g| g.id + 1))
            .max()
            .unwrap_or(0);
        number_groups(&mut groups, first);
        segments.push(Segment {
            domain,
            path: alloc::format!("/pcie@{domain}"),
            bridge,
            topology,
            groups,
        });
    }
    let dir = IommuDirectory {
        entries: vec![IommuEntry {
            phandle: ph,
            path: "/smmuv3@9050000".into(),
            driven: Ok(0),
        }],
    };
    (segments, dir)
}

fn resolve_on(
    segments: &[Segment],
    dir: &IommuDirectory,
    vm: &str,
    devices: &[PciAddr],
    earlier: &[(String, Vec<PciAddr>)],
) -> Result<VmPciDevices, AssignError> {
    resolve_all(segments, dir, vm, devices, earlier, 39)
}

#[test]
fn a_vm_takes_functions_on_two_bridges() {
    let (segs, dir) = machine(0x8000);
    // Group numbers go on across bridges: domain 1's first group follows domain 0's last.
    let last0 = segs[0].groups.iter().map(|g| g.id).max().unwrap();
    assert_eq!(segs[1].groups.iter().map(|g| g.id).min(), Some(last0 + 1));
    let d = resolve_on(&segs, &dir, "vm0", &[a(0, 0, 2, 0), a(1, 0, 3, 0)], &[]).unwrap();
    let on: Vec<(usize, u16, Vec<Bdf>)> = d
        .segments
        .iter()
        .map(|s| {
            (
                s.segment,
                s.domain,
                s.devices.functions.iter().map(|f| f.bdf).collect(),
            )
        })
        .collect();
    assert_eq!(
        on,
        vec![
            (0, 0, vec![Bdf::new(0, 2, 0)]),
            (1, 1, vec![Bdf::new(0, 3, 0)])
        ]
    );
    // One SMMU, the StreamIDs of both bridges on it.
    assert_eq!(d.stream_ids_on(0), &[0x10, 0x8018]);
    assert_eq!(d.groups().count(), 2);
    assert!(
        d.groups().any(|g| g > last0),
        "domain 1's group numbered after"
    );
    assert_eq!(d.intx_intids().count(), 2);
    assert!(!d.is_empty());
    // The same BDF on the other bridge is another function, which a second VM may have; but
    // both bridges' interrupt-maps route slot 3 to one SPI, so not next to vm0's 0001:00:03.0.
    let earlier = vec![(String::from("vm0"), vec![a(0, 0, 2, 0), a(1, 0, 3, 0)])];
    let e = resolve_on(&segs, &dir, "vm1", &[a(0, 0, 3, 0)], &earlier).unwrap_err();
    assert!(
        matches!(&e, AssignError::SharedIntxAcross { first, second, .. }
            if *first == a(1, 0, 3, 0) && *second == a(0, 0, 3, 0)),
        "{e}"
    );
    assert!(e.to_string().contains("0001:00:03.0"), "{e}");
    // A slot of its own line on each bridge is fine.
    let d = resolve_on(
        &segs,
        &dir,
        "vm1",
        &[a(1, 0, 1, 0), a(0, 0, 4, 0)],
        &earlier,
    )
    .unwrap();
    assert_eq!(d.stream_ids_on(0), &[0x20, 0x8008]);
}

#[test]
fn a_line_shared_across_bridges_makes_the_later_function_msi_only() {
    let (segs, dir) = machine(0x8000);
    // Slot 3 of both bridges routes to one SPI: vm0 has it on domain 1.
    let earlier = vec![(String::from("vm0"), vec![a(1, 0, 3, 0)])];
    let msi = ["vm0", "vm1"];
    let d = resolve_all_msi(
        &segs,
        &dir,
        "vm1",
        &[a(0, 0, 3, 0), a(0, 0, 4, 0)],
        &earlier,
        39,
        &msi,
    )
    .unwrap();
    assert_eq!(d.msi_only().collect::<Vec<_>>(), [a(0, 0, 3, 0)]);
    // Only 00:04.0's line is forwarded and in the guest's interrupt-map.
    let intx: Vec<Bdf> = d.segments[0].devices.intx.iter().map(|e| e.0).collect();
    assert_eq!(intx, [Bdf::new(0, 4, 0)]);
    assert_eq!(d.intx_intids().count(), 1);
    assert_eq!(d.segments[0].devices.functions.len(), 2);
    // Without MSI for vm1: refused as before.
    let e = resolve_all_msi(&segs, &dir, "vm1", &[a(0, 0, 3, 0)], &earlier, 39, &["vm0"]);
    assert!(
        matches!(e, Err(AssignError::SharedIntxAcross { .. })),
        "{e:?}"
    );
}

#[test]
fn refusals_name_the_bridge_and_the_domain() {
    let (segs, dir) = machine(0x8000);
    let e = resolve_on(&segs, &dir, "vm0", &[a(2, 0, 1, 0)], &[]).unwrap_err();
    assert_eq!(
        e,
        AssignError::UnknownDomain {
            vm: "vm0".into(),
            addr: a(2, 0, 1, 0),
            domains: vec![0, 1]
        }
    );
    assert!(
        e.to_string()
            .contains("no host bridge with PCI domain 0002"),
        "{e}"
    );
    let e = resolve_on(&segs, &dir, "vm0", &[a(1, 0, 9, 0)], &[]).unwrap_err();
    assert!(
        matches!(&e, AssignError::OnBridge { domain: 1, source, .. }
            if matches!(**source, AssignError::UnknownDevice { .. })),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("host bridge /pcie@1 (domain 0001): "),
        "{e}"
    );
    // One function to two VMs is still found per bridge.
    let earlier = vec![(String::from("vm0"), vec![a(1, 0, 3, 0)])];
    let e = resolve_on(&segs, &dir, "vm1", &[a(1, 0, 3, 0)], &earlier).unwrap_err();
    assert!(
        matches!(&e, AssignError::OnBridge { source, .. }
            if matches!(**source, AssignError::DoubleAssignment { .. })),
        "{e}"
    );
    // With one bridge, refusals read as they always did.
    let one = &segs[..1];
    let e = resolve_on(one, &dir, "vm0", &[a(0, 0, 9, 0)], &[]).unwrap_err();
    assert!(matches!(e, AssignError::UnknownDevice { .. }), "{e}");
}

#[test]
fn overlapping_iommu_maps_make_a_streamid_unassignable() {
    // Both bridges send RID 0x18 to StreamID 0x18 of the same SMMU: one STE for two functions.
    let (segs, dir) = machine(0);
    for addr in [a(0, 0, 3, 0), a(1, 0, 3, 0)] {
        let e = resolve_on(&segs, &dir, "vm0", &[addr], &[]).unwrap_err();
        assert!(
            matches!(&e, AssignError::SharedStreamId { sid: 0x18, function, .. } if *function == addr),
            "{e}"
        );
    }
}

#[test]
fn domains_fixed_first_then_the_lowest_free() {
    assert_eq!(
        domains(&[Some(1), None, None, Some(1), Some(70_000), Some(0xffff)]),
        vec![Some(1), Some(0), Some(2), None, None, Some(0xffff)]
    );
    assert_eq!(domains(&[None, None]), vec![Some(0), Some(1)]);
}

#[test]
fn addresses_parse_and_print_as_linux_writes_them() {
    assert_eq!(PciAddr::parse("0001:81:00.0"), Some(a(1, 0x81, 0, 0)));
    assert_eq!(PciAddr::parse("00:03.1"), Some(a(0, 0, 3, 1)));
    assert_eq!(PciAddr::parse("ffff:00:1f.7"), Some(a(0xffff, 0, 0x1f, 7)));
    for bad in [
        "1:00:01.0",
        "00001:00:01.0",
        "0001-00:01.0",
        "0001:00:20.0",
        "+001:00:01.0",
    ] {
        assert_eq!(PciAddr::parse(bad), None, "{bad}");
    }
    assert_eq!(a(0, 0, 3, 1).to_string(), "00:03.1");
    assert_eq!(a(0x1a, 0x81, 0, 0).to_string(), "001a:81:00.0");
}

#[test]
fn every_generic_bridge_is_taken_unless_it_clashes() {
    let host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
    let node = |path: &str, domain: Option<u32>, shift: u64| {
        let mut b = host.clone();
        b.domain = domain;
        b.ecam.base += shift;
        for w in &mut b.windows {
            w.cpu_base += shift;
        }
        BridgeNode {
            path: path.into(),
            compatible: "pci-host-ecam-generic".into(),
            domain,
            generic: true,
            bridge: Ok(b),
        }
    };
    let dw = BridgeNode {
        path: "/pcie@fe150000".into(),
        compatible: "rockchip,rk3588-pcie".into(),
        domain: None,
        generic: false,
        bridge: Err(crate::platform::PlatformError::BadProperty {
            node: "/pcie@fe150000".into(),
            property: "compatible",
            reason: "not a generic ECAM host bridge",
        }),
    };
    let (taken, left) = choose(vec![
        node("/a", None, 0),
        dw,
        node("/b", Some(0), 1 << 40),
        node("/c", Some(0), 2 << 40),
        node("/d", Some(5), 0x800),
        node("/e", None, 3 << 40),
    ]);
    let taken: Vec<(&str, u16)> = taken.iter().map(|(p, d, _)| (p.as_str(), *d)).collect();
    // The fixed domain 0 is /b's; /a, without one, gets the lowest free, and /e the next.
    assert_eq!(taken, vec![("/a", 1), ("/b", 0), ("/e", 2)]);
    let why = |p: &str| {
        left.iter()
            .find(|(q, _)| q == p)
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    };
    assert!(
        why("/pcie@fe150000").contains("rockchip,rk3588-pcie"),
        "{left:?}"
    );
    assert!(why("/c").contains("repeats another bridge's"), "{left:?}");
    assert!(why("/d").contains("overlap those of /a"), "{left:?}");
}

#[test]
fn bridges_sharing_a_page_are_not_both_taken() {
    // No byte in common, but one 4 KiB page: a BAR of each could land in it, and a VM given one
    // would map the other's registers.
    let host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
    let node = |path: &str, ecam: u64, window: u64| {
        let mut b = host.clone();
        b.domain = None;
        b.ecam.base = ecam;
        b.windows.truncate(1);
        b.windows[0].cpu_base = window;
        b.windows[0].size = 0x800;
        BridgeNode {
            path: path.into(),
            compatible: "pci-host-ecam-generic".into(),
            domain: None,
            generic: true,
            bridge: Ok(b),
        }
    };
    let (taken, left) = choose(vec![
        node("/g", 1 << 40, 0x5000_0000),
        node("/h", 2 << 40, 0x5000_0800),
        node("/i", 3 << 40, 0x5000_1000),
    ]);
    let taken: Vec<&str> = taken.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(taken, ["/g", "/i"], "{left:?}");
    assert!(left[0].1.contains("overlap those of /g"), "{left:?}");
}

//! IOMMU groups: the smallest sets of functions the SMMU can isolate from each other.
//!
//! Computed as Linux 6.12 `pci_device_group` (`drivers/iommu/iommu.c`) does when it probes
//! functions in bus order, because the guests run Linux and its VFIO-style expectations, and
//! because the rules encode what the hardware can and cannot keep apart:
//!
//! 1. **DMA aliases** (`pci_for_each_dma_alias`, `drivers/pci/search.c`): walking up from a
//!    function, a PCIe-to-PCI/PCI-X bridge takes ownership of its secondary side's requests and
//!    tags them with RID (secondary bus, 0, 0) (PCI Express to PCI/PCI-X Bridge spec 2.3); a
//!    PCI-to-PCIe bridge or a conventional PCI bridge uses its own RID. A function below such a
//!    bridge cannot be told apart from the bridge's other children, so it joins the group of
//!    the topmost aliasing bridge. Root and switch ports forward RIDs untouched.
//! 2. **ACS on the path** (`pci_acs_path_enabled` with `REQ_ACS_FLAGS` = SV|RR|CR|UF): if a
//!    port above the function (or any port above that one) lacks Source Validation, P2P
//!    Request/Completion Redirect or Upstream Forwarding, peers below it can reach each other
//!    without going through the SMMU, so the function joins the group of its parent bridge.
//! 3. **Multi-function devices** (`get_pci_function_alias_group`): functions of one device
//!    that do not each have those ACS controls may talk to each other internally; they share
//!    a group.
//!
//! ACS as `pci_acs_enabled` judges it (`drivers/pci/pci.c`, PCIe Base spec 6.12.1): a
//! conventional function never isolates; PCIe-to-PCI bridges and event collectors never do;
//! root and downstream ports must have the controls; endpoints and upstream ports need them
//! only when multi-function, since a single function has no internal peer (6.12.1.2). Linux's
//! device-specific ACS quirks and DMA-alias quirks are not modelled: none applies to QEMU's
//! devices.

use alloc::vec::Vec;

use super::enumerate::{PciDevice, PortType, Topology};
use super::host::HostBridge;
use super::regs::acs;
use super::Bdf;

/// Linux's `REQ_ACS_FLAGS`: requester IDs cannot be spoofed, peer requests and completions are
/// redirected upstream, and everything is forwarded upstream even when the target is below.
const REQ_ACS_FLAGS: u16 = acs::SV | acs::RR | acs::CR | acs::UF;

/// A set of functions that can only be given to a VM together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuGroup {
    /// Group number, in the order Linux would create them (bus order of the first member).
    pub id: usize,
    /// Every member, bridges included, sorted.
    pub devices: Vec<Bdf>,
    /// The members that are bridges (Type 1 headers). They are in the group because DMA from
    /// below can pass through them unchecked, but they stay with the hypervisor: a VM is never
    /// given a bridge, and need not take one to take the group (VFIO treats them alike).
    pub bridges: Vec<Bdf>,
    /// Every StreamID the group's DMA can carry: each member's RID and each of its DMA alias
    /// RIDs, through the host bridge's `iommu-map`; sorted, no duplicates.
    pub stream_ids: Vec<u32>,
    /// Which IOMMU those StreamIDs belong to, as the `iommu-map` says.
    pub iommu: GroupIommu,
}

/// What translates an IOMMU group's DMA, from the host bridge's `iommu-map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupIommu {
    /// The IOMMU with this phandle carries every StreamID of the group.
    Iommu(u32),
    /// The `iommu-map` has no entry for this member's RID (or one of its DMA aliases): nothing
    /// would translate its DMA.
    Unmapped {
        /// The member.
        bdf: Bdf,
        /// The Requester ID with no entry.
        rid: u16,
    },
    /// The group's RIDs map onto two IOMMUs (phandles): no one STE set confines it.
    Split(u32, u32),
}

/// Whether `dev` provides the isolation Linux's `pci_acs_enabled(dev, REQ_ACS_FLAGS)` asks for.
fn acs_enabled(dev: &PciDevice) -> bool {
    let has_acs = || dev.acs.is_some_and(|a| a.enabled(REQ_ACS_FLAGS));
    match dev.port_type() {
        // Conventional PCI: a shared bus; anyone can see anyone's DMA.
        None => false,
        Some(
            PortType::PciToPcieBridge | PortType::PcieToPciBridge | PortType::RcEventCollector,
        ) => false,
        Some(PortType::RootPort | PortType::DownstreamPort) => has_acs(),
        Some(
            PortType::Endpoint
            | PortType::LegacyEndpoint
            | PortType::UpstreamPort
            | PortType::RcIntegratedEndpoint,
        ) => !dev.multifunction || has_acs(),
        Some(PortType::Reserved(_)) => true,
    }
}

/// Linux `pci_acs_path_enabled(start, NULL, ...)`: `start` and every bridge above it isolate.
fn acs_path_enabled(topo: &Topology, start: usize) -> bool {
    let mut i = start;
    // Bounded by the function count (parents precede children in a `Topology`).
    for _ in 0..=topo.devices.len() {
        let dev = &topo.devices[i];
        if !acs_enabled(dev) {
            return false;
        }
        match dev.parent.and_then(|p| topo.index(p)) {
            None => return true,
            Some(p) => i = p,
        }
    }
    false
}

/// Linux `pci_for_each_dma_alias` (without quirks): (function, RID) pairs for every RID the
/// function's DMA may arrive with, starting with its own.
fn dma_aliases(topo: &Topology, dev: usize) -> Vec<(usize, u16)> {
    let mut aliases = alloc::vec![(dev, topo.devices[dev].bdf.rid())];
    let mut cur = dev;
    for _ in 0..topo.devices.len() {
        let Some(up) = topo.devices[cur].parent.and_then(|p| topo.index(p)) else {
            break;
        };
        let bridge = &topo.devices[up];
        match bridge.port_type() {
            Some(PortType::RootPort | PortType::UpstreamPort | PortType::DownstreamPort) => {}
            Some(PortType::PcieToPciBridge) => {
                let secondary = bridge.bridge.map_or(0, |b| b.secondary);
                aliases.push((up, u16::from(secondary) << 8));
            }
            Some(PortType::PciToPcieBridge) | None => aliases.push((up, bridge.bdf.rid())),
            Some(_) => {}
        }
        cur = up;
    }
    aliases
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    // The earlier-discovered root wins, so a group's representative is its first member.
    let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
    parent[hi] = lo;
}

/// Computes the IOMMU groups of `topo` and their StreamIDs through `host`'s `iommu-map`.
///
/// A group some member RID (or DMA alias) of which the `iommu-map` does not cover, or whose
/// RIDs map onto two IOMMUs, says so in [`IommuGroup::iommu`]: assignment refuses it, while the
/// other groups stay assignable.
pub fn iommu_groups(topo: &Topology, host: &HostBridge) -> Vec<IommuGroup> {
    let n = topo.devices.len();
    let mut parent: Vec<usize> = (0..n).collect();
    for i in 0..n {
        let dev = &topo.devices[i];
        // Step 1: an aliasing bridge above owns a group already (it was probed first); join it.
        let aliases = dma_aliases(topo, i);
        if let Some(&(bridge, _)) = aliases.get(1) {
            union(&mut parent, i, bridge);
            continue;
        }
        // Step 2: the first bridge above whose path to the root lacks ACS.
        if let Some(up) = dev.parent.and_then(|p| topo.index(p)) {
            if !acs_path_enabled(topo, up) {
                union(&mut parent, i, up);
                continue;
            }
        }
        // Step 3: non-isolated sibling functions of the same device.
        if dev.multifunction && !acs_enabled(dev) {
            for (j, other) in topo.devices.iter().enumerate() {
                if j != i
                    && other.bdf.bus == dev.bdf.bus
                    && other.bdf.dev == dev.bdf.dev
                    && !acs_enabled(other)
                {
                    union(&mut parent, i, j);
                }
            }
        }
    }

    let mut groups: Vec<IommuGroup> = Vec::new();
    // Per group: the IOMMUs its RIDs map onto, and the first RID with no mapping.
    let mut iommus: Vec<Vec<u32>> = alloc::vec![Vec::new(); n];
    let mut unmapped: Vec<Option<(Bdf, u16)>> = alloc::vec![None; n];
    let mut group_of_root: Vec<Option<usize>> = alloc::vec![None; n];
    for i in 0..n {
        let root = find(&mut parent, i);
        let g = *group_of_root[root].get_or_insert_with(|| {
            groups.push(IommuGroup {
                id: groups.len(),
                devices: Vec::new(),
                bridges: Vec::new(),
                stream_ids: Vec::new(),
                iommu: GroupIommu::Split(0, 0),
            });
            groups.len() - 1
        });
        let dev = &topo.devices[i];
        let group = &mut groups[g];
        group.devices.push(dev.bdf);
        if dev.bridge.is_some() {
            group.bridges.push(dev.bdf);
        }
        for (_, rid) in dma_aliases(topo, i) {
            match host.translate(rid) {
                Some((iommu, sid)) => {
                    group.stream_ids.push(sid);
                    iommus[g].push(iommu);
                }
                None => {
                    unmapped[g].get_or_insert((dev.bdf, rid));
                }
            }
        }
    }
    for (g, group) in groups.iter_mut().enumerate() {
        iommus[g].sort_unstable();
        iommus[g].dedup();
        group.iommu = match (unmapped[g], &iommus[g][..]) {
            (Some((bdf, rid)), _) => GroupIommu::Unmapped { bdf, rid },
            (None, [one]) => GroupIommu::Iommu(*one),
            (None, [a, b, ..]) => GroupIommu::Split(*a, *b),
            // A group always has a member, and each member at least its own RID.
            (None, []) => GroupIommu::Split(0, 0),
        };
    }
    for g in &mut groups {
        g.devices.sort_unstable();
        g.bridges.sort_unstable();
        g.stream_ids.sort_unstable();
        g.stream_ids.dedup();
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::enumerate::enumerate;
    use crate::pci::fake::{qemu_host_bridge, FakeConfigSpace, FakeFn};
    use crate::pci::host::IommuMapEntry;

    fn groups_of(mut f: FakeConfigSpace) -> Vec<IommuGroup> {
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        iommu_groups(&t, &qemu_host_bridge())
    }

    fn members(groups: &[IommuGroup]) -> Vec<Vec<Bdf>> {
        groups.iter().map(|g| g.devices.clone()).collect()
    }

    fn sids(bdfs: &[Bdf]) -> Vec<u32> {
        bdfs.iter().map(|b| u32::from(b.rid())).collect()
    }

    const B: fn(u8, u8, u8) -> Bdf = Bdf::new;

    #[test]
    fn qemu_flat_root_bus_one_group_each() {
        let g = groups_of(FakeConfigSpace::qemu_flat());
        assert_eq!(
            members(&g),
            (0..5).map(|s| vec![B(0, s, 0)]).collect::<Vec<_>>()
        );
        for (i, grp) in g.iter().enumerate() {
            assert_eq!(grp.id, i);
            assert_eq!(grp.stream_ids, vec![u32::from(B(0, i as u8, 0).rid())]);
            assert!(grp.bridges.is_empty());
        }
    }

    #[test]
    fn multifunction_without_acs_shares_a_group() {
        let g = groups_of(FakeConfigSpace::multifunction(false));
        assert_eq!(
            members(&g),
            vec![vec![B(0, 1, 0), B(0, 1, 1)], vec![B(0, 2, 0)]]
        );
        assert_eq!(g[0].stream_ids, vec![0x08, 0x09]);
    }

    #[test]
    fn multifunction_with_acs_is_split() {
        let g = groups_of(FakeConfigSpace::multifunction(true));
        assert_eq!(
            members(&g),
            vec![vec![B(0, 1, 0)], vec![B(0, 1, 1)], vec![B(0, 2, 0)]]
        );
    }

    #[test]
    fn multifunction_with_acs_on_one_function_only() {
        // Linux only merges functions that both lack ACS: the isolated one stays alone.
        let mut f = FakeConfigSpace::new();
        let func = || {
            FakeFn::endpoint(1, 1)
                .multifunction()
                .pcie(PortType::Endpoint)
        };
        f.add(None, 1, 0, func());
        f.add(None, 1, 1, func().full_acs());
        f.add(None, 1, 2, func());
        let g = groups_of(f);
        assert_eq!(
            members(&g),
            vec![vec![B(0, 1, 0), B(0, 1, 2)], vec![B(0, 1, 1)]]
        );
    }

    #[test]
    fn pcie_to_pci_bridge_aliases() {
        let g = groups_of(FakeConfigSpace::pci_bridge_topology());
        assert_eq!(
            members(&g),
            vec![vec![B(0, 1, 0)], vec![B(0, 2, 0), B(1, 1, 0), B(1, 2, 0)]]
        );
        assert_eq!(g[1].bridges, vec![B(0, 2, 0)]);
        // The bridge's own RID, the children's RIDs, and the alias RID 01:00.0 that the
        // bridge stamps on their requests.
        assert_eq!(
            g[1].stream_ids,
            sids(&[B(0, 2, 0), B(1, 0, 0), B(1, 1, 0), B(1, 2, 0)])
        );
    }

    #[test]
    fn switch_without_acs_merges_everything_below_each_root_port() {
        let g = groups_of(FakeConfigSpace::switch_topology(false));
        assert_eq!(
            members(&g),
            vec![
                vec![
                    B(0, 1, 0),
                    B(1, 0, 0),
                    B(2, 0, 0),
                    B(2, 1, 0),
                    B(3, 0, 0),
                    B(4, 0, 0)
                ],
                vec![B(0, 2, 0), B(5, 0, 0)],
            ]
        );
        assert_eq!(
            g[0].bridges,
            vec![B(0, 1, 0), B(1, 0, 0), B(2, 0, 0), B(2, 1, 0)]
        );
        assert_eq!(g[1].stream_ids, sids(&[B(0, 2, 0), B(5, 0, 0)]));
    }

    #[test]
    fn switch_with_acs_isolates_every_port_and_endpoint() {
        let g = groups_of(FakeConfigSpace::switch_topology(true));
        assert_eq!(
            members(&g),
            vec![
                vec![B(0, 1, 0)],
                vec![B(1, 0, 0)],
                vec![B(2, 0, 0)],
                vec![B(3, 0, 0)],
                vec![B(2, 1, 0)],
                vec![B(4, 0, 0)],
                vec![B(0, 2, 0)],
                vec![B(5, 0, 0)],
            ]
        );
    }

    #[test]
    fn acs_missing_on_the_root_port_only() {
        // Downstream ports isolate, but the root port above does not: the path is broken, so
        // every function joins its parent's group, up to the root port.
        let mut f = FakeConfigSpace::new();
        let rp = f.add(None, 1, 0, FakeFn::root_port());
        let up = f.add(Some(rp), 0, 0, FakeFn::bridge(Some(PortType::UpstreamPort)));
        let dp0 = f.add(
            Some(up),
            0,
            0,
            FakeFn::bridge(Some(PortType::DownstreamPort)).full_acs(),
        );
        f.add(
            Some(dp0),
            0,
            0,
            FakeFn::endpoint(1, 1).pcie(PortType::Endpoint),
        );
        let dp1 = f.add(
            Some(up),
            1,
            0,
            FakeFn::bridge(Some(PortType::DownstreamPort)).full_acs(),
        );
        f.add(
            Some(dp1),
            0,
            0,
            FakeFn::endpoint(1, 2).pcie(PortType::Endpoint),
        );
        let g = groups_of(f);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].devices.len(), 6);
    }

    #[test]
    fn uncovered_rid_marks_only_its_group() {
        let mut f = FakeConfigSpace::switch_topology(true);
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        let mut h = qemu_host_bridge();
        h.iommu_map[0].length = 0x400;
        let g = iommu_groups(&t, &h);
        // RIDs from 0x400 (bus 4 on) are outside the map: exactly the groups holding one are
        // marked, each naming its first such member; the others keep their IOMMU.
        let mut marked = 0;
        for grp in &g {
            let outside = grp.devices.iter().find(|b| b.rid() >= 0x400);
            match (outside, grp.iommu) {
                (Some(&bdf), GroupIommu::Unmapped { bdf: b, rid }) => {
                    assert_eq!((b, rid), (bdf, bdf.rid()), "{grp:?}");
                    marked += 1;
                }
                (None, GroupIommu::Iommu(ph)) => assert_eq!(ph, h.iommu_map[0].iommu),
                _ => panic!("{grp:?}"),
            }
        }
        assert!(marked >= 1 && marked < g.len(), "{g:#?}");
        assert!(g.iter().any(|x| x.devices.contains(&B(4, 0, 0))
            && x.iommu
                == GroupIommu::Unmapped {
                    bdf: B(4, 0, 0),
                    rid: 0x400
                }));
        h.iommu_map.clear();
        assert!(iommu_groups(&t, &h)
            .iter()
            .all(|g| matches!(g.iommu, GroupIommu::Unmapped { .. })));
    }

    #[test]
    fn rids_on_two_iommus_split_the_group() {
        // RIDs below 0x10 (device 0 and 1 of bus 0) go to IOMMU 7, the rest to IOMMU 9; a
        // multi-function device straddling the boundary cannot be confined by either alone.
        let mut f = FakeConfigSpace::qemu_flat();
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        let mut h = qemu_host_bridge();
        let whole = h.iommu_map[0];
        h.iommu_map = vec![
            IommuMapEntry {
                length: 0x10,
                iommu: 7,
                ..whole
            },
            IommuMapEntry {
                rid_base: 0x10,
                sid_base: 0x10,
                length: 0x10000 - 0x10,
                iommu: 9,
            },
        ];
        let g = iommu_groups(&t, &h);
        for grp in &g {
            let first = grp.devices[0].rid();
            let want = if first < 0x10 { 7 } else { 9 };
            assert_eq!(grp.iommu, GroupIommu::Iommu(want), "{grp:?}");
        }
    }

    #[test]
    fn stream_ids_follow_the_iommu_map() {
        let mut f = FakeConfigSpace::qemu_flat();
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        let mut h = qemu_host_bridge();
        h.iommu_map[0].sid_base = 0x1000;
        let g = iommu_groups(&t, &h);
        assert_eq!(g[2].stream_ids, vec![0x1010]);
    }
}

//! Every host bridge the hypervisor takes, one PCI segment (domain) each, and a VM's
//! assignment across them.
//!
//! A machine may have several generic ECAM host bridges, each its own hierarchy: its own bus
//! numbers, windows, `interrupt-map` and `iommu-map`. Functions are named by
//! [`PciAddr`] (domain and BDF). Each segment is enumerated and grouped on its own
//! ([`resolve`](super::resolve) does that segment's checks); what spans segments is checked here: an INTx line
//! is one GIC SPI whichever bridge routes to it, and a StreamID is one STE of one SMMU whichever
//! bridge's `iommu-map` produced it.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::assign::{
    resolve_noting, AssignError, IommuDirectory, LineOwners, MsiOnly, UnitStreams, VmDevices,
};
use super::enumerate::Topology;
use super::groups::IommuGroup;
use super::host::{BridgeNode, HostBridge};
use super::{Bdf, PciAddr, DEVICE_PAGE};
use crate::platform::MemRange;

/// One host bridge the hypervisor took: its hierarchy, enumerated with resources assigned, and
/// its IOMMU groups (numbered after the previous segments' so that a group number names one
/// group on the machine).
#[derive(Debug, Clone)]
pub struct Segment {
    /// Its PCI domain: `linux,pci-domain`, or its index among the taken bridges.
    pub domain: u16,
    /// Its DT node's path.
    pub path: String,
    /// The bridge as the hypervisor uses it (windows the VMs' stage 2 can reach).
    pub bridge: HostBridge,
    /// Its functions.
    pub topology: Topology,
    /// Its IOMMU groups.
    pub groups: Vec<IommuGroup>,
}

/// The functions a VM owns on one segment.
#[derive(Debug, Clone, Default)]
pub struct SegmentDevices {
    /// Index of the segment in the hypervisor's list.
    pub segment: usize,
    /// Its domain.
    pub domain: u16,
    /// What [`resolve`](super::resolve) gave the VM there.
    pub devices: VmDevices,
}

/// Every PCI function a VM owns, by segment (ascending), with the StreamIDs they emit on each
/// SMMU.
#[derive(Debug, Clone, Default)]
pub struct VmPciDevices {
    /// One entry per segment the VM has functions on.
    pub segments: Vec<SegmentDevices>,
    /// Per SMMU (driver unit, ascending), the StreamIDs of all of them.
    pub smmus: Vec<UnitStreams>,
}

impl VmPciDevices {
    /// Whether the VM owns no function.
    pub fn is_empty(&self) -> bool {
        self.segments.iter().all(|s| s.devices.functions.is_empty())
    }

    /// The StreamIDs on driver unit `unit`, empty if none of the VM's functions sit behind it.
    pub fn stream_ids_on(&self, unit: usize) -> &[u32] {
        UnitStreams::on(&self.smmus, unit)
    }

    /// The GIC INTIDs of the VM's functions' INTx lines, on every segment.
    pub fn intx_intids(&self) -> impl Iterator<Item = u32> + '_ {
        self.segments
            .iter()
            .flat_map(|s| s.devices.intx.iter().map(|&(_, _, intid, _)| intid))
    }

    /// The VM's functions assigned MSI-only ([`VmDevices::msi_only`]), on every segment.
    pub fn msi_only(&self) -> impl Iterator<Item = PciAddr> + '_ {
        self.segments.iter().flat_map(|s| {
            s.devices
                .msi_only
                .iter()
                .map(move |&bdf| PciAddr::new(s.domain, bdf))
        })
    }

    /// Every IOMMU group the VM owns.
    pub fn groups(&self) -> impl Iterator<Item = usize> + '_ {
        self.segments
            .iter()
            .flat_map(|s| s.devices.groups.iter().copied())
    }
}

/// The segment with `domain`.
fn segment_of(segments: &[Segment], domain: u16) -> Option<usize> {
    segments.iter().position(|s| s.domain == domain)
}

/// Checks that `vm` may own `devices` given what `earlier` VMs were given, on every segment
/// ([`resolve`](super::resolve) on each) and across them: no INTx line shared with another VM's function on
/// another bridge, no StreamID that a group of another bridge also emits on the same SMMU.
/// With more than one segment, a segment's refusal names the bridge. No VM takes MSIs:
/// [`resolve_all_msi`] with none.
pub fn resolve_all(
    segments: &[Segment],
    iommus: &IommuDirectory,
    vm: &str,
    devices: &[PciAddr],
    earlier: &[(String, Vec<PciAddr>)],
    ipa_bits: u32,
) -> Result<VmPciDevices, AssignError> {
    resolve_all_msi(segments, iommus, vm, devices, earlier, ipa_bits, &[])
}

/// [`resolve_all`], where the VMs named in `msi_vms` take MSIs (see
/// [`super::resolve_msi`]): a function of theirs on an INTx line an earlier VM's function has,
/// on this bridge or another, is assigned MSI-only if it has an MSI or MSI-X capability
/// ([`VmPciDevices::msi_only`]) and refused if not.
pub fn resolve_all_msi(
    segments: &[Segment],
    iommus: &IommuDirectory,
    vm: &str,
    devices: &[PciAddr],
    earlier: &[(String, Vec<PciAddr>)],
    ipa_bits: u32,
    msi_vms: &[&str],
) -> Result<VmPciDevices, AssignError> {
    let mut out = VmPciDevices::default();
    if devices.is_empty() {
        return Ok(out);
    }
    // Messages for the functions assigned MSI-only, logged once the VM is accepted.
    let mut notes: Vec<String> = Vec::new();
    if let Some(&addr) = devices
        .iter()
        .find(|a| segment_of(segments, a.domain).is_none())
    {
        return Err(AssignError::UnknownDomain {
            vm: vm.to_string(),
            addr,
            domains: segments.iter().map(|s| s.domain).collect(),
        });
    }
    let on = |list: &[PciAddr], domain: u16| -> Vec<Bdf> {
        list.iter()
            .filter(|a| a.domain == domain)
            .map(|a| a.bdf)
            .collect()
    };
    for (index, seg) in segments.iter().enumerate() {
        let mine = on(devices, seg.domain);
        if mine.is_empty() {
            continue;
        }
        let before: Vec<(String, Vec<Bdf>)> = earlier
            .iter()
            .map(|(name, list)| (name.clone(), on(list, seg.domain)))
            .collect();
        let d = resolve_noting(
            &seg.topology,
            &seg.groups,
            &seg.bridge,
            iommus,
            vm,
            &mine,
            &before,
            ipa_bits,
            msi_vms,
            &mut notes,
        )
        .map_err(|e| {
            if segments.len() > 1 {
                AssignError::OnBridge {
                    bridge: seg.path.clone(),
                    domain: seg.domain,
                    source: Box::new(e),
                }
            } else {
                e
            }
        })?;
        out.segments.push(SegmentDevices {
            segment: index,
            domain: seg.domain,
            devices: d,
        });
    }
    // A line another bridge's function of an earlier VM has: MSI-only too (a segment's own
    // check saw only its bridge), off the INTx list the guest's interrupt-map is made from.
    for m in check_lines_across(segments, vm, devices, earlier, msi_vms)? {
        if m.vm != earlier.len() {
            continue;
        }
        let Some(s) = out.segments.iter_mut().find(|s| s.domain == m.bdf.domain) else {
            continue;
        };
        if s.devices.msi_only.contains(&m.bdf.bdf) {
            continue;
        }
        notes.push(alloc::format!(
            "pci: VM {vm}: {} assigned MSI-only: its INTx line INTID {} is VM {}'s ({}, \
             another host bridge); it gets no INTx, only MSI/MSI-X",
            m.bdf,
            m.intid,
            m.first_vm,
            m.first
        ));
        s.devices.intx.retain(|&(bdf, ..)| bdf != m.bdf.bdf);
        s.devices.msi_only.push(m.bdf.bdf);
    }
    check_streams_across(segments, iommus, vm, &out)?;
    for s in &out.segments {
        for u in &s.devices.smmus {
            UnitStreams::add(&mut out.smmus, u.unit, u.stream_ids.iter().copied());
        }
    }
    UnitStreams::settle(&mut out.smmus);
    for n in notes {
        log::info!("{n}");
    }
    Ok(out)
}

/// An INTx line is one GIC SPI, whichever bridge's `interrupt-map` routes to it: two VMs'
/// functions on two bridges must not share one either (each segment's [`resolve`](super::resolve) checked its
/// own).
/// With `msi_vms`, a function of those VMs on an earlier VM's line is MSI-only instead of
/// refused if it has MSI or MSI-X (returned, in the order met) and claims no line.
fn check_lines_across(
    segments: &[Segment],
    vm: &str,
    devices: &[PciAddr],
    earlier: &[(String, Vec<PciAddr>)],
    msi_vms: &[&str],
) -> Result<Vec<MsiOnly<PciAddr>>, AssignError> {
    let mut lines = LineOwners::new();
    let mut msi_only = Vec::new();
    let requests = earlier
        .iter()
        .map(|(n, l)| (n.as_str(), &l[..]))
        .chain(core::iter::once((vm, devices)));
    for (index, (name, list)) in requests.enumerate() {
        for &addr in list {
            let Some(seg) = segment_of(segments, addr.domain).map(|i| &segments[i]) else {
                continue;
            };
            let Some(route) = seg.topology.intx_route(addr.bdf, &seg.bridge.interrupt_map) else {
                continue;
            };
            if let Some((first_vm, first)) = lines.claim(&route, name, addr) {
                let shared = AssignError::SharedIntxAcross {
                    first_vm: first_vm.to_string(),
                    first,
                    second_vm: name.to_string(),
                    second: addr,
                    intid: route.intid,
                };
                if !msi_vms.contains(&name) {
                    return Err(shared);
                }
                let msi = seg
                    .topology
                    .device(addr.bdf)
                    .is_some_and(|d| d.msi.is_some() || d.msix.is_some());
                if !msi {
                    return Err(AssignError::NoMsiCapability {
                        source: Box::new(shared),
                    });
                }
                msi_only.push(MsiOnly {
                    vm: index,
                    bdf: addr,
                    spi: route.spi,
                    intid: route.intid,
                    first_vm: first_vm.to_string(),
                    first,
                });
            }
        }
    }
    Ok(msi_only)
}

/// A StreamID is one STE: a group of the VM that emits one which another group also emits on the
/// same SMMU (two bridges whose `iommu-map`s overlap there) cannot be confined apart from it, so
/// the VM is refused whoever owns the other group.
fn check_streams_across(
    segments: &[Segment],
    iommus: &IommuDirectory,
    vm: &str,
    mine: &VmPciDevices,
) -> Result<(), AssignError> {
    for s in &mine.segments {
        let seg = &segments[s.segment];
        for g in seg
            .groups
            .iter()
            .filter(|g| s.devices.groups.contains(&g.id))
        {
            let Ok(unit) = iommus.unit_of(g) else {
                continue;
            };
            for (other_seg, o) in segments
                .iter()
                .flat_map(|os| os.groups.iter().map(move |g| (os, g)))
                .filter(|(_, o)| o.id != g.id)
            {
                if iommus.unit_of(o) != Ok(unit) {
                    continue;
                }
                if let Some(&sid) = g.stream_ids.iter().find(|s| o.stream_ids.contains(s)) {
                    return Err(AssignError::SharedStreamId {
                        vm: vm.to_string(),
                        function: PciAddr::new(seg.domain, g.devices[0]),
                        group: g.id,
                        sid,
                        other: PciAddr::new(other_seg.domain, o.devices[0]),
                        other_group: o.id,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The domain each taken bridge gets: its `linux,pci-domain` where the DT fixes one, else the
/// lowest number no bridge has yet (Linux numbers bridges without one from 0 up, but the
/// hypervisor must not let that collide with a fixed one). `None` for a bridge whose fixed
/// domain repeats an earlier one's or does not fit 16 bits: it cannot be named.
pub fn domains(fixed: &[Option<u32>]) -> Vec<Option<u16>> {
    let mut taken: Vec<u16> = Vec::new();
    let mut out = alloc::vec![None; fixed.len()];
    for (i, f) in fixed.iter().enumerate() {
        if let Some(d) = f.and_then(|d| u16::try_from(d).ok()) {
            if !taken.contains(&d) {
                taken.push(d);
                out[i] = Some(d);
            }
        }
    }
    for (i, f) in fixed.iter().enumerate() {
        if f.is_none() {
            let d = (0..=u16::MAX).find(|d| !taken.contains(d));
            if let Some(d) = d {
                taken.push(d);
                out[i] = Some(d);
            }
        }
    }
    out
}

/// The host bridges the hypervisor takes from the DT's (`host::host_bridges`, document order):
/// every generic ECAM one, with its DT path and PCI domain ([`domains`]), and every other one
/// with why it is left alone: not generic (it needs a driver of its own), unusable, a
/// `linux,pci-domain` that repeats an earlier bridge's or does not fit 16 bits, or an ECAM
/// window or address window overlapping an earlier taken bridge's, or sharing a stage-2 page
/// with one (one address would be two devices; one page would be two bridges' registers).
#[allow(clippy::type_complexity)]
pub fn choose(nodes: Vec<BridgeNode>) -> (Vec<(String, u16, HostBridge)>, Vec<(String, String)>) {
    let mut left = Vec::new();
    let mut generic = Vec::new();
    for n in nodes {
        match n.bridge {
            Ok(b) => generic.push((n.path, b)),
            Err(e) => left.push((n.path, alloc::format!("{e} ({:?})", n.compatible))),
        }
    }
    let fixed: Vec<Option<u32>> = generic.iter().map(|(_, b)| b.domain).collect();
    let mut taken: Vec<(String, u16, HostBridge)> = Vec::new();
    for ((path, b), domain) in generic.into_iter().zip(domains(&fixed)) {
        let Some(domain) = domain else {
            left.push((
                path,
                alloc::format!(
                    "its linux,pci-domain {:?} repeats another bridge's or does not fit 16 bits",
                    b.domain
                ),
            ));
            continue;
        };
        let mine = ranges(&b);
        let clash = taken.iter().find(|(_, _, o)| {
            ranges(o)
                .iter()
                .any(|x| mine.iter().any(|y| x.base < y.end() && y.base < x.end()))
        });
        if let Some((other, _, _)) = clash {
            left.push((
                path,
                alloc::format!("its ECAM or address windows overlap those of {other}"),
            ));
            continue;
        }
        taken.push((path, domain, b));
    }
    (taken, left)
}

/// A bridge's ECAM window and the CPU side of its address windows, each widened to whole
/// stage-2 pages: two bridges whose windows merely share a page would put one bridge's BAR in a
/// page the other's function's VM maps (the page isolation of `pci::isolation` is per segment).
fn ranges(h: &HostBridge) -> Vec<MemRange> {
    let page = |r: MemRange| {
        let base = r.base & !(DEVICE_PAGE - 1);
        let end = r
            .base
            .saturating_add(r.size)
            .saturating_add(DEVICE_PAGE - 1)
            & !(DEVICE_PAGE - 1);
        MemRange {
            base,
            size: end.saturating_sub(base),
        }
    };
    let mut r = alloc::vec![page(h.ecam)];
    r.extend(h.windows.iter().map(|w| {
        page(MemRange {
            base: w.cpu_base,
            size: w.size,
        })
    }));
    r
}

/// Renumbers `groups` (a segment's, numbered from 0) after `first`: group numbers name one
/// group on the whole machine.
pub fn number_groups(groups: &mut [IommuGroup], first: usize) {
    for g in groups {
        g.id += first;
    }
}

#[cfg(test)]
mod tests;

//! Checks on the VM configuration's device assignments, before anything is given away.
//!
//! Isolation between VMs rests on the SMMU, which can only separate IOMMU groups: giving part
//! of a group to a VM would let its devices reach (or be reached by) devices it does not own.
//! Legacy interrupts are wires: two VMs on one INTx line would see each other's interrupts and
//! could keep the line asserted for each other. So a line goes to the first VM that asks; a
//! later VM's function on it is refused, or, when that VM can take MSIs (it has a virtual ITS
//! and the host an ITS: `msi_vms` of [`resolve_msi`]) and the function has an MSI or MSI-X
//! capability, assigned MSI-only: no INTx route, Command.INTxDisable held set and no Interrupt
//! Pin in its vECAM ([`VmDevices::msi_only`]).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use thiserror::Error;

use super::enumerate::{PciDevice, Topology};
use super::groups::{GroupIommu, IommuGroup};
use super::host::{HostBridge, InterruptMap, IntxPin, IntxRoute};
use super::isolation::{device_slots, DeviceSlot, IsolationError};
use super::virtio::VirtioDma;
use super::{Bdf, PciAddr};

/// Why a set of device assignments cannot be honoured.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AssignError {
    /// A VM asks for a function the host bridge does not have.
    #[error("VM {vm}: device {bdf} does not exist on the host PCI bus")]
    UnknownDevice {
        /// The VM.
        vm: String,
        /// The requested function.
        bdf: Bdf,
    },
    /// A VM asks for a bridge; bridges route everyone's traffic and stay with the hypervisor.
    #[error("VM {vm}: device {bdf} is a bridge (IOMMU group {group}); bridges cannot be assigned")]
    Bridge {
        /// The VM.
        vm: String,
        /// The bridge.
        bdf: Bdf,
        /// Its IOMMU group.
        group: usize,
    },
    /// One function is given to two VMs (or listed twice for one).
    #[error("device {bdf} (IOMMU group {group}) is assigned to VM {first} and to VM {second}")]
    DoubleAssignment {
        /// The function.
        bdf: Bdf,
        /// Its IOMMU group.
        group: usize,
        /// The VM that got it first.
        first: String,
        /// The VM that asked for it again.
        second: String,
    },
    /// A VM gets some of a group's functions but not all.
    #[error(
        "VM {vm}: device {assigned} is in IOMMU group {group}, which also holds {missing}; \
         a VM must be given every device of a group"
    )]
    SplitGroup {
        /// The VM.
        vm: String,
        /// The group.
        group: usize,
        /// A function of the group the VM gets.
        assigned: Bdf,
        /// A function of the group the VM does not get.
        missing: Bdf,
    },
    /// Two VMs' functions raise the same legacy interrupt line.
    #[error(
        "VM {first_vm} ({first}) and VM {second_vm} ({second}) would share INTx line SPI {spi} \
         (INTID {intid}); move one device to a slot with another line"
    )]
    SharedIntx {
        /// The VM seen first.
        first_vm: String,
        /// Its function on the line.
        first: Bdf,
        /// The other VM.
        second_vm: String,
        /// Its function on the line.
        second: Bdf,
        /// The SPI number, as the DT writes it.
        spi: u32,
        /// The GIC INTID.
        intid: u32,
    },
    /// A function on another VM's INTx line cannot be assigned MSI-only instead.
    #[error("{source}; it cannot be assigned MSI-only instead: no MSI/MSI-X capability")]
    NoMsiCapability {
        /// The refusal it would otherwise get (`SharedIntx` or `SharedIntxAcross`).
        source: Box<AssignError>,
    },
    /// A function's DMA would not go through the IOMMU at all.
    #[error(
        "VM {vm}: device {bdf} is a {what} virtio device without VIRTIO_F_ACCESS_PLATFORM: its \
         DMA would bypass the SMMU and reach any memory; give it iommu_platform=on (QEMU: \
         -device ...,disable-legacy=on,iommu_platform=on)"
    )]
    DmaBypassesIommu {
        /// The VM.
        vm: String,
        /// The function.
        bdf: Bdf,
        /// "legacy-only", "modern" or "modern (feature bits unreadable)".
        what: &'static str,
    },
    /// A page the VM's stage 2 would map is not the VM's alone.
    #[error("{0}")]
    Isolation(#[from] IsolationError),
    /// A VM names a function in a PCI domain no host bridge the hypervisor took has.
    #[error(
        "VM {vm}: device {addr}: the machine has no host bridge with PCI domain {:04x} (the \
         hypervisor took domains {domains:04x?})",
        addr.domain
    )]
    UnknownDomain {
        /// The VM.
        vm: String,
        /// The function it named.
        addr: PciAddr,
        /// The domains there are.
        domains: Vec<u16>,
    },
    /// A refusal on one host bridge of several, naming it.
    #[error("host bridge {bridge} (domain {domain:04x}): {source}")]
    OnBridge {
        /// The bridge's DT path.
        bridge: String,
        /// Its domain.
        domain: u16,
        /// What that bridge's checks said.
        source: Box<AssignError>,
    },
    /// Two VMs' functions on two host bridges raise the same GIC line.
    #[error(
        "VM {first_vm} ({first}) and VM {second_vm} ({second}) would share INTx line INTID \
         {intid} (their host bridges route to the same SPI); move one device"
    )]
    SharedIntxAcross {
        /// The VM seen first.
        first_vm: String,
        /// Its function on the line.
        first: PciAddr,
        /// The other VM.
        second_vm: String,
        /// Its function on the line.
        second: PciAddr,
        /// The GIC INTID.
        intid: u32,
    },
    /// A group emits a StreamID that another group also emits on the same SMMU.
    #[error(
        "VM {vm}: device {function} (IOMMU group {group}) cannot be assigned: its StreamID \
         {sid:#x} is also that of {other} (IOMMU group {other_group}) on the same SMMU (the \
         host bridges' iommu-maps overlap), so no STE can confine one without the other"
    )]
    SharedStreamId {
        /// The VM.
        vm: String,
        /// A function of its group.
        function: PciAddr,
        /// Its group.
        group: usize,
        /// The StreamID.
        sid: u32,
        /// A function of the other group.
        other: PciAddr,
        /// The other group.
        other_group: usize,
    },
    /// No SMMU the hypervisor drives would translate the function's DMA.
    #[error(
        "VM {vm}: device {bdf} (IOMMU group {group}) cannot be assigned: {why}; a VM is never \
         given a device whose DMA its stage 2 does not confine"
    )]
    Untranslated {
        /// The VM.
        vm: String,
        /// The function.
        bdf: Bdf,
        /// Its IOMMU group.
        group: usize,
        /// What the `iommu-map` and the SMMUs say.
        why: String,
    },
}

/// The IOMMUs the host bridges' `iommu-map`s can name, as the hypervisor took them at boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuDirectory {
    /// One entry per `arm,smmu-v3` node with a phandle.
    pub entries: Vec<IommuEntry>,
}

/// One IOMMU of an [`IommuDirectory`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuEntry {
    /// Its phandle.
    pub phandle: u32,
    /// Its node's path.
    pub path: String,
    /// The index of the hypervisor's driver instance for it, or why there is none.
    pub driven: Result<usize, String>,
}

impl IommuDirectory {
    fn get(&self, phandle: u32) -> Option<&IommuEntry> {
        self.entries.iter().find(|e| e.phandle == phandle)
    }

    /// The name of the IOMMU with `phandle`, for messages.
    fn name(&self, phandle: u32) -> String {
        self.get(phandle).map_or_else(
            || format!("the node with phandle {phandle:#x}"),
            |e| e.path.clone(),
        )
    }

    /// The driver instance that translates group `g`'s DMA, or why none does.
    pub fn unit_of(&self, g: &IommuGroup) -> Result<usize, String> {
        match g.iommu {
            GroupIommu::Iommu(ph) => match self.get(ph) {
                Some(IommuEntry {
                    driven: Ok(unit), ..
                }) => Ok(*unit),
                Some(IommuEntry {
                    path,
                    driven: Err(why),
                    ..
                }) => Err(format!(
                    "its DMA goes through {path}, which the hypervisor does not drive ({why})"
                )),
                None => Err(format!(
                    "the host bridge's iommu-map sends its DMA to the node with phandle {ph:#x}, \
                     which is not an SMMUv3 the hypervisor knows"
                )),
            },
            GroupIommu::Unmapped { bdf, rid } => Err(format!(
                "the host bridge's iommu-map has no entry for Requester ID {rid:#06x} ({bdf}), so \
                 no SMMU translates its DMA"
            )),
            GroupIommu::Split(a, b) => Err(format!(
                "its Requester IDs map onto two IOMMUs ({} and {})",
                self.name(a),
                self.name(b)
            )),
        }
    }
}

/// The PCI functions one VM owns, resolved against the topology.
#[derive(Debug, Clone, Default)]
pub struct VmDevices {
    /// The functions, as enumerated (BARs assigned).
    pub functions: Vec<PciDevice>,
    /// The pages of their memory BARs, checked to hold nothing else: mapped into the VM's
    /// stage 2 at the same addresses. I/O BARs are not mapped (their accesses are forwarded).
    pub slots: Vec<DeviceSlot>,
    /// (function, its pin, INTID, (root-bus function, pin there)) of each function with a
    /// legacy interrupt. The last pair is where the pin reaches the host bridge
    /// ([`Topology::intx_at_root`]): the function itself on the root bus, else the bridge above
    /// it there, with the pin swizzled at every bridge on the way. The guest's `interrupt-map`
    /// is keyed on it, because Linux's `of_irq_parse_pci` looks the map up with that pair.
    pub intx: Vec<(Bdf, IntxPin, u32, (Bdf, IntxPin))>,
    /// Every bridge on the path from the root bus to one of the functions
    /// ([`Topology::bridges_above`]), once each, ordered by BDF. They are not assigned (they
    /// route everyone's traffic and stay with the hypervisor): the guest is shown them
    /// read-only so that its scan from the root bus reaches the functions below them.
    pub bridges: Vec<PciDevice>,
    /// The functions assigned MSI-only: their INTx line is another VM's, so they have no
    /// entry in [`Self::intx`] (no `interrupt-map` entry, no SPI forwarded) and the vECAM holds
    /// their Command.INTxDisable and hides their pin (`VirtualEcam::with_msi_only`). Ordered
    /// as the VM's configuration lists them.
    pub msi_only: Vec<Bdf>,
    /// IOMMU group numbers.
    pub groups: Vec<usize>,
    /// The SMMUs that translate their DMA, by driver instance (ascending), each with the
    /// StreamIDs whose STEs translate through the VM's stage 2 there. StreamIDs are per SMMU:
    /// two of a VM's groups behind different SMMUs may carry the same number.
    pub smmus: Vec<UnitStreams>,
}

/// The StreamIDs of a VM's functions on one SMMU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitStreams {
    /// The hypervisor's driver instance of the SMMU.
    pub unit: usize,
    /// Its StreamIDs the VM's functions emit, ascending.
    pub stream_ids: Vec<u32>,
}

impl UnitStreams {
    /// The StreamIDs `smmus` lists on driver instance `unit`, empty if it lists none there.
    pub fn on(smmus: &[UnitStreams], unit: usize) -> &[u32] {
        smmus
            .iter()
            .find(|u| u.unit == unit)
            .map_or(&[], |u| &u.stream_ids[..])
    }

    /// Adds `ids` to `unit`'s list in `smmus` (kept ordered by unit), making it if needed.
    /// [`UnitStreams::settle`] sorts and deduplicates once every list is complete.
    pub fn add(smmus: &mut Vec<UnitStreams>, unit: usize, ids: impl IntoIterator<Item = u32>) {
        let at = match smmus.binary_search_by_key(&unit, |u| u.unit) {
            Ok(i) => i,
            Err(i) => {
                smmus.insert(
                    i,
                    UnitStreams {
                        unit,
                        stream_ids: Vec::new(),
                    },
                );
                i
            }
        };
        smmus[at].stream_ids.extend(ids);
    }

    /// Every list of `smmus` ascending, each StreamID once.
    pub fn settle(smmus: &mut [UnitStreams]) {
        for u in smmus {
            u.stream_ids.sort_unstable();
            u.stream_ids.dedup();
        }
    }
}

impl VmDevices {
    /// The StreamIDs on driver instance `unit`, empty if none of the VM's functions sit
    /// behind it.
    pub fn stream_ids_on(&self, unit: usize) -> &[u32] {
        UnitStreams::on(&self.smmus, unit)
    }
}

/// Which VM each INTx line went to first, keyed by interrupt controller and INTID (a line is
/// one wire whichever bridge or slot routes to it): the one rule [`check_intx`] and the check
/// across host bridges apply.
#[derive(Debug)]
pub(crate) struct LineOwners<'a, T> {
    lines: BTreeMap<(u32, u32), (&'a str, T)>,
}

impl<'a, T: Copy> LineOwners<'a, T> {
    pub(crate) fn new() -> Self {
        Self {
            lines: BTreeMap::new(),
        }
    }

    /// Records that `vm`'s function `who` raises `route`; returns the VM and function that
    /// had the line first if that is another VM.
    pub(crate) fn claim(&mut self, route: &IntxRoute, vm: &'a str, who: T) -> Option<(&'a str, T)> {
        let first = *self
            .lines
            .entry((route.parent, route.intid))
            .or_insert((vm, who));
        (first.0 != vm).then_some(first)
    }
}

/// Checks that `vm` may own `devices` given what `earlier` VMs were given: whole IOMMU groups,
/// one VM per function, no shared INTx line, DMA that the IOMMU translates, device pages that
/// hold nothing of anyone else's and lie in the VM's `ipa_bits`-bit IPA space; and describes
/// what it gets. No VM takes MSIs: [`resolve_msi`] with none.
#[allow(clippy::too_many_arguments)]
pub fn resolve(
    topo: &Topology,
    groups: &[IommuGroup],
    host: &HostBridge,
    iommus: &IommuDirectory,
    vm: &str,
    devices: &[Bdf],
    earlier: &[(String, Vec<Bdf>)],
    ipa_bits: u32,
) -> Result<VmDevices, AssignError> {
    resolve_msi(
        topo,
        groups,
        host,
        iommus,
        vm,
        devices,
        earlier,
        ipa_bits,
        &[],
    )
}

/// [`resolve`], where the VMs named in `msi_vms` (`vm` or earlier ones) take MSIs: each has
/// a virtual ITS and the host a physical ITS. Such a VM's function whose INTx line an earlier
/// VM's function has is assigned MSI-only ([`VmDevices::msi_only`], with an info message naming
/// the VM, the function and the line) if it has an MSI or MSI-X capability, and refused
/// ([`AssignError::NoMsiCapability`]) if not; an MSI-only function claims no line.
#[allow(clippy::too_many_arguments)]
pub fn resolve_msi(
    topo: &Topology,
    groups: &[IommuGroup],
    host: &HostBridge,
    iommus: &IommuDirectory,
    vm: &str,
    devices: &[Bdf],
    earlier: &[(String, Vec<Bdf>)],
    ipa_bits: u32,
    msi_vms: &[&str],
) -> Result<VmDevices, AssignError> {
    let mut notes = Vec::new();
    let out = resolve_noting(
        topo, groups, host, iommus, vm, devices, earlier, ipa_bits, msi_vms, &mut notes,
    )?;
    for n in notes {
        log::info!("{n}");
    }
    Ok(out)
}

/// [`resolve_msi`], adding to `notes` the message for each function assigned MSI-only instead
/// of logging it: the caller logs them once the whole assignment is accepted, so no message
/// announces what a later check refuses.
#[allow(clippy::too_many_arguments)]
pub(crate) fn resolve_noting(
    topo: &Topology,
    groups: &[IommuGroup],
    host: &HostBridge,
    iommus: &IommuDirectory,
    vm: &str,
    devices: &[Bdf],
    earlier: &[(String, Vec<Bdf>)],
    ipa_bits: u32,
    msi_vms: &[&str],
    notes: &mut Vec<String>,
) -> Result<VmDevices, AssignError> {
    if devices.is_empty() {
        return Ok(VmDevices::default());
    }
    let mut requests: Vec<(String, Vec<Bdf>)> = earlier.to_vec();
    requests.push((vm.to_string(), devices.to_vec()));
    check_assignment(groups, &requests)?;
    let mut out = VmDevices::default();
    for m in plan_intx(&requests, topo, &host.interrupt_map, msi_vms)? {
        if m.vm == requests.len() - 1 {
            notes.push(format!(
                "pci: VM {vm}: {} assigned MSI-only: its INTx line SPI {} (INTID {}) is VM \
                 {}'s ({}); it gets no INTx, only MSI/MSI-X",
                m.bdf, m.spi, m.intid, m.first_vm, m.first
            ));
            out.msi_only.push(m.bdf);
        }
    }
    for &bdf in devices {
        let dev = topo.device(bdf).ok_or_else(|| AssignError::UnknownDevice {
            vm: vm.to_string(),
            bdf,
        })?;
        let what = match dev.virtio {
            Some(VirtioDma::LegacyOnly) => Some("legacy-only"),
            Some(VirtioDma::NoAccessPlatform) => Some("modern"),
            Some(VirtioDma::Unknown) => Some("modern (feature bits unreadable)"),
            Some(VirtioDma::Translated) | None => None,
        };
        if let Some(what) = what {
            return Err(AssignError::DmaBypassesIommu {
                vm: vm.to_string(),
                bdf,
                what,
            });
        }
        let route = topo
            .intx_route(bdf, &host.interrupt_map)
            .filter(|_| !out.msi_only.contains(&bdf));
        if let Some(route) = route {
            if let (Some(pin), Some(root)) = (dev.interrupt_pin, topo.intx_at_root(bdf)) {
                out.intx.push((bdf, pin, route.intid, root));
            }
        }
        out.functions.push(dev.clone());
    }
    // Which SMMU translates a group comes from the host bridge's iommu-map alone; a VM whose
    // groups sit behind several gets a vSMMU over each (Xen's and iommufd's 1:1 affinity).
    for g in groups {
        let Some(&bdf) = g.devices.iter().find(|d| devices.contains(d)) else {
            continue;
        };
        let unit = iommus.unit_of(g).map_err(|why| AssignError::Untranslated {
            vm: vm.to_string(),
            bdf,
            group: g.id,
            why,
        })?;
        out.groups.push(g.id);
        // A group's bridges stay with the hypervisor; their RIDs carry only the DMA of
        // functions below them, which is this VM's.
        UnitStreams::add(&mut out.smmus, unit, g.stream_ids.iter().copied());
    }
    UnitStreams::settle(&mut out.smmus);
    out.slots = device_slots(vm, topo, host, devices, ipa_bits)?;
    let mut bridges: Vec<&PciDevice> = devices
        .iter()
        .flat_map(|&bdf| topo.bridges_above(bdf))
        .collect();
    bridges.sort_unstable_by_key(|d| d.bdf);
    bridges.dedup_by_key(|d| d.bdf);
    out.bridges = bridges.into_iter().cloned().collect();
    Ok(out)
}

/// Checks that `requests` (VM name, functions it is to own) give whole IOMMU groups to single
/// VMs: no function to two VMs, no bridge to any VM, and for every group a VM touches, all of
/// its non-bridge functions. Bridges in a group stay with the hypervisor, which never lets a
/// VM reach them.
pub fn check_assignment<S: AsRef<str>>(
    groups: &[IommuGroup],
    requests: &[(S, Vec<Bdf>)],
) -> Result<(), AssignError> {
    let group_of = |bdf: Bdf| groups.iter().find(|g| g.devices.contains(&bdf));
    let mut owner: BTreeMap<Bdf, &str> = BTreeMap::new();
    for (vm, bdfs) in requests {
        let vm = vm.as_ref();
        for &bdf in bdfs {
            let group = group_of(bdf).ok_or_else(|| AssignError::UnknownDevice {
                vm: vm.to_string(),
                bdf,
            })?;
            if group.bridges.contains(&bdf) {
                return Err(AssignError::Bridge {
                    vm: vm.to_string(),
                    bdf,
                    group: group.id,
                });
            }
            if let Some(first) = owner.insert(bdf, vm) {
                return Err(AssignError::DoubleAssignment {
                    bdf,
                    group: group.id,
                    first: first.to_string(),
                    second: vm.to_string(),
                });
            }
        }
    }
    for (vm, bdfs) in requests {
        let vm = vm.as_ref();
        for &bdf in bdfs {
            let group = group_of(bdf).expect("checked above");
            let missing = group
                .devices
                .iter()
                .find(|d| !group.bridges.contains(d) && owner.get(*d) != Some(&vm));
            if let Some(&missing) = missing {
                return Err(AssignError::SplitGroup {
                    vm: vm.to_string(),
                    group: group.id,
                    assigned: bdf,
                    missing,
                });
            }
        }
    }
    Ok(())
}

/// Checks that no two VMs' functions raise the same INTx line, following each function's pin
/// through the bridges above it ([`Topology::intx_route`]). Functions without a pin, or whose
/// pin the `interrupt-map` does not route, raise nothing and are not counted. Functions of one
/// VM may share a line: the VM sees a level-triggered line shared between its own devices, as
/// it would on real hardware.
pub fn check_intx<S: AsRef<str>>(
    assignments: &[(S, Vec<Bdf>)],
    topo: &Topology,
    interrupt_map: &InterruptMap,
) -> Result<(), AssignError> {
    plan_intx(assignments, topo, interrupt_map, &[]).map(|_| ())
}

/// A function assigned MSI-only because an earlier VM has its INTx line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MsiOnly<T> {
    /// The index of its VM in the assignments.
    pub vm: usize,
    /// The function.
    pub bdf: T,
    /// The line's SPI (as the DT writes it) and INTID.
    pub spi: u32,
    pub intid: u32,
    /// The VM that has the line, and its function there.
    pub first_vm: String,
    pub first: T,
}

/// Whether `dev` can signal without INTx.
fn has_msi(dev: &PciDevice) -> bool {
    dev.msi.is_some() || dev.msix.is_some()
}

/// [`check_intx`], where a function of a VM in `msi_vms` on a line an earlier VM has is
/// assigned MSI-only (if it has MSI or MSI-X) rather than refused: returns those functions,
/// in the order met. An MSI-only function claims no line.
pub(crate) fn plan_intx<S: AsRef<str>>(
    assignments: &[(S, Vec<Bdf>)],
    topo: &Topology,
    interrupt_map: &InterruptMap,
    msi_vms: &[&str],
) -> Result<Vec<MsiOnly<Bdf>>, AssignError> {
    let mut lines = LineOwners::new();
    let mut msi_only = Vec::new();
    for (index, (vm, bdfs)) in assignments.iter().enumerate() {
        let vm = vm.as_ref();
        for &bdf in bdfs {
            if topo.device(bdf).is_none() {
                return Err(AssignError::UnknownDevice {
                    vm: vm.to_string(),
                    bdf,
                });
            }
            let Some(route) = topo.intx_route(bdf, interrupt_map) else {
                continue;
            };
            if let Some((first_vm, first)) = lines.claim(&route, vm, bdf) {
                let shared = AssignError::SharedIntx {
                    first_vm: first_vm.to_string(),
                    first,
                    second_vm: vm.to_string(),
                    second: bdf,
                    spi: route.spi,
                    intid: route.intid,
                };
                if !msi_vms.contains(&vm) {
                    return Err(shared);
                }
                if !topo.device(bdf).is_some_and(has_msi) {
                    return Err(AssignError::NoMsiCapability {
                        source: Box::new(shared),
                    });
                }
                msi_only.push(MsiOnly {
                    vm: index,
                    bdf,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::enumerate::enumerate;
    use crate::pci::fake::FakeConfigSpace;
    use crate::pci::groups::iommu_groups;
    use crate::pci::host::{HostBridge, IommuMapEntry};

    const QEMU_SMMU: &[u8] = include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb");
    const B: fn(u8, u8, u8) -> Bdf = Bdf::new;

    fn setup(mut f: FakeConfigSpace) -> (Topology, Vec<IommuGroup>, HostBridge) {
        let host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
        let t = enumerate(&mut f, host.bus_start, host.bus_end).unwrap();
        let g = iommu_groups(&t, &host);
        (t, g, host)
    }

    fn directory(entries: &[(u32, &str, Result<usize, &str>)]) -> IommuDirectory {
        IommuDirectory {
            entries: entries
                .iter()
                .map(|(phandle, path, driven)| IommuEntry {
                    phandle: *phandle,
                    path: path.to_string(),
                    driven: driven.map_err(|e| e.to_string()),
                })
                .collect(),
        }
    }

    fn resolve_with(
        dir: &IommuDirectory,
        host: &HostBridge,
        devices: &[Bdf],
    ) -> Result<VmDevices, AssignError> {
        let mut f = FakeConfigSpace::qemu_flat();
        let t = enumerate(&mut f, host.bus_start, host.bus_end).unwrap();
        let g = iommu_groups(&t, host);
        resolve(&t, &g, host, dir, "vm0", devices, &[], 39)
    }

    #[test]
    fn only_smmus_the_hypervisor_drives_translate() {
        let host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
        let ph = host.iommu_map[0].iommu;
        let driven = directory(&[(ph, "/smmuv3@9050000", Ok(0))]);
        let d = resolve_with(&driven, &host, &[B(0, 3, 0)]).unwrap();
        assert_eq!(
            d.smmus,
            vec![UnitStreams {
                unit: 0,
                stream_ids: vec![0x18]
            }]
        );

        let refused = directory(&[(ph, "/smmuv3@9050000", Err("it is not dma-coherent"))]);
        let e = resolve_with(&refused, &host, &[B(0, 3, 0)]).unwrap_err();
        assert!(
            matches!(&e, AssignError::Untranslated { bdf, why, .. }
                if *bdf == B(0, 3, 0) && why.contains("/smmuv3@9050000") && why.contains("not dma-coherent")),
            "{e}"
        );
        // The iommu-map names something that is not an SMMU the hypervisor found.
        let e = resolve_with(&IommuDirectory::default(), &host, &[B(0, 3, 0)]).unwrap_err();
        assert!(
            matches!(&e, AssignError::Untranslated { why, .. } if why.contains("not an SMMUv3")),
            "{e}"
        );
        // A RID the map does not cover.
        let mut short = host.clone();
        short.iommu_map[0].length = 0x18;
        let e = resolve_with(&driven, &short, &[B(0, 3, 0)]).unwrap_err();
        assert!(
            matches!(&e, AssignError::Untranslated { why, .. } if why.contains("no entry for Requester ID 0x0018")),
            "{e}"
        );
        // Other functions, still covered, are still assignable.
        assert!(resolve_with(&driven, &short, &[B(0, 2, 0)]).is_ok());
    }

    #[test]
    fn a_vm_behind_two_smmus_gets_streams_on_each() {
        let mut host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
        let whole = host.iommu_map[0];
        // RIDs below 0x18 go to the first SMMU, the rest to the second with the StreamIDs
        // starting again at 0x10: the same StreamID numbers on two SMMUs are two streams.
        host.iommu_map = vec![
            IommuMapEntry {
                length: 0x18,
                iommu: 1,
                ..whole
            },
            IommuMapEntry {
                rid_base: 0x18,
                sid_base: 0x10,
                length: 0x1_0000 - 0x18,
                iommu: 2,
            },
        ];
        let dir = directory(&[(1, "/display-smmu", Ok(0)), (2, "/pcie-smmu", Ok(1))]);
        let on = |d: &VmDevices| {
            d.smmus
                .iter()
                .map(|u| (u.unit, u.stream_ids.clone()))
                .collect::<Vec<_>>()
        };
        let d = resolve_with(&dir, &host, &[B(0, 3, 0)]).unwrap();
        assert_eq!(on(&d), vec![(1, vec![0x10])]);
        let d = resolve_with(&dir, &host, &[B(0, 2, 0)]).unwrap();
        assert_eq!(on(&d), vec![(0, vec![0x10])]);
        let d = resolve_with(&dir, &host, &[B(0, 3, 0), B(0, 2, 0)]).unwrap();
        assert_eq!(on(&d), vec![(0, vec![0x10]), (1, vec![0x10])]);
        assert_eq!(d.stream_ids_on(1), &[0x10]);
        assert!(d.stream_ids_on(2).is_empty());
        assert_eq!(d.groups.len(), 2);
        // Only a driven SMMU translates: with the second one refused, the function behind it
        // is refused and names it; the first one's function alone is still fine.
        let dir = directory(&[
            (1, "/display-smmu", Ok(0)),
            (2, "/pcie-smmu", Err("it is not dma-coherent")),
        ]);
        let e = resolve_with(&dir, &host, &[B(0, 2, 0), B(0, 3, 0)]).unwrap_err();
        assert!(
            matches!(&e, AssignError::Untranslated { bdf, why, .. }
                if *bdf == B(0, 3, 0) && why.contains("/pcie-smmu")),
            "{e}"
        );
        assert!(resolve_with(&dir, &host, &[B(0, 2, 0)]).is_ok());
    }

    #[test]
    fn whole_groups_to_distinct_vms() {
        let (_, g, _) = setup(FakeConfigSpace::qemu_flat());
        let ok = [
            ("vm0", vec![B(0, 1, 0), B(0, 2, 0)]),
            ("vm1", vec![B(0, 3, 0)]),
        ];
        assert_eq!(check_assignment(&g, &ok), Ok(()));
        assert_eq!(check_assignment::<&str>(&g, &[]), Ok(()));
    }

    #[test]
    fn device_to_two_vms() {
        let (_, g, _) = setup(FakeConfigSpace::qemu_flat());
        let req = [
            ("vm0", vec![B(0, 1, 0), B(0, 2, 0)]),
            ("vm1", vec![B(0, 2, 0)]),
        ];
        let err = check_assignment(&g, &req).unwrap_err();
        assert_eq!(
            err,
            AssignError::DoubleAssignment {
                bdf: B(0, 2, 0),
                group: 2,
                first: "vm0".into(),
                second: "vm1".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "device 00:02.0 (IOMMU group 2) is assigned to VM vm0 and to VM vm1"
        );
        let twice = [("vm0", vec![B(0, 1, 0), B(0, 1, 0)])];
        assert!(matches!(
            check_assignment(&g, &twice),
            Err(AssignError::DoubleAssignment { .. })
        ));
    }

    #[test]
    fn split_multifunction_group() {
        let (_, g, _) = setup(FakeConfigSpace::multifunction(false));
        let req = [("vm0", vec![B(0, 1, 0)]), ("vm1", vec![B(0, 1, 1)])];
        let err = check_assignment(&g, &req).unwrap_err();
        assert_eq!(
            err,
            AssignError::SplitGroup {
                vm: "vm0".into(),
                group: 0,
                assigned: B(0, 1, 0),
                missing: B(0, 1, 1)
            }
        );
        assert!(err
            .to_string()
            .contains("VM vm0: device 00:01.0 is in IOMMU group 0"));
        // Left to nobody is a split too.
        assert!(check_assignment(&g, &[("vm0", vec![B(0, 1, 1)])]).is_err());
        assert_eq!(
            check_assignment(&g, &[("vm0", vec![B(0, 1, 1), B(0, 1, 0)])]),
            Ok(())
        );
        // With ACS the functions are separate groups and may go to different VMs.
        let (_, g, _) = setup(FakeConfigSpace::multifunction(true));
        assert_eq!(check_assignment(&g, &req), Ok(()));
    }

    #[test]
    fn groups_with_bridges() {
        let (_, g, _) = setup(FakeConfigSpace::pci_bridge_topology());
        // Both conventional devices behind the PCIe-to-PCI bridge, without the bridge: fine.
        assert_eq!(
            check_assignment(&g, &[("vm0", vec![B(1, 1, 0), B(1, 2, 0)])]),
            Ok(())
        );
        assert!(matches!(
            check_assignment(&g, &[("vm0", vec![B(1, 1, 0)]), ("vm1", vec![B(1, 2, 0)])]),
            Err(AssignError::SplitGroup { group: 1, .. })
        ));
        assert_eq!(
            check_assignment(&g, &[("vm0", vec![B(0, 2, 0)])]),
            Err(AssignError::Bridge {
                vm: "vm0".into(),
                bdf: B(0, 2, 0),
                group: 1
            })
        );
        // Below a switch without ACS: all four endpoints' worth of group in one VM.
        let (_, g, _) = setup(FakeConfigSpace::switch_topology(false));
        assert!(check_assignment(&g, &[("a", vec![B(3, 0, 0)]), ("b", vec![B(4, 0, 0)])]).is_err());
        assert_eq!(
            check_assignment(&g, &[("a", vec![B(3, 0, 0), B(4, 0, 0)])]),
            Ok(())
        );
        let (_, g, _) = setup(FakeConfigSpace::switch_topology(true));
        assert_eq!(
            check_assignment(&g, &[("a", vec![B(3, 0, 0)]), ("b", vec![B(4, 0, 0)])]),
            Ok(())
        );
    }

    #[test]
    fn unknown_device() {
        let (t, g, host) = setup(FakeConfigSpace::qemu_flat());
        let req = [("vm0", vec![B(0, 9, 0)])];
        let want = AssignError::UnknownDevice {
            vm: "vm0".into(),
            bdf: B(0, 9, 0),
        };
        assert_eq!(check_assignment(&g, &req), Err(want.clone()));
        assert_eq!(check_intx(&req, &t, &host.interrupt_map), Err(want));
    }

    #[test]
    fn intx_lines_on_qemu_root_bus() {
        let (t, _, host) = setup(FakeConfigSpace::qemu_flat());
        let map = &host.interrupt_map;
        // Slots 1-4 raise SPIs 4, 5, 6, 3.
        let spis: Vec<u32> = (1..=4)
            .map(|s| t.intx_route(B(0, s, 0), map).unwrap().spi)
            .collect();
        assert_eq!(spis, vec![4, 5, 6, 3]);
        assert_eq!(
            t.intx_route(B(0, 0, 0), map),
            None,
            "the host bridge has no pin"
        );
        let ok = [
            ("vm0", vec![B(0, 1, 0), B(0, 2, 0)]),
            ("vm1", vec![B(0, 3, 0), B(0, 4, 0)]),
        ];
        assert_eq!(check_intx(&ok, &t, map), Ok(()));
    }

    #[test]
    fn shared_intx_line_is_refused() {
        // Slots 1 and 5 both raise SPI 4.
        let mut f = FakeConfigSpace::qemu_flat();
        let five = crate::pci::fake::FakeFn::endpoint(0x1af4, 0x1041)
            .pcie(crate::pci::PortType::RcIntegratedEndpoint)
            .pin(1);
        f.add(None, 5, 0, five);
        let (t, g, host) = setup(f);
        let req = [("vm0", vec![B(0, 1, 0)]), ("vm1", vec![B(0, 5, 0)])];
        assert_eq!(check_assignment(&g, &req), Ok(()));
        let err = check_intx(&req, &t, &host.interrupt_map).unwrap_err();
        assert_eq!(
            err,
            AssignError::SharedIntx {
                first_vm: "vm0".into(),
                first: B(0, 1, 0),
                second_vm: "vm1".into(),
                second: B(0, 5, 0),
                spi: 4,
                intid: 36
            }
        );
        assert!(err.to_string().contains("share INTx line SPI 4 (INTID 36)"));
        // One VM may own both.
        let same = [("vm0", vec![B(0, 1, 0), B(0, 5, 0)])];
        assert_eq!(check_intx(&same, &t, &host.interrupt_map), Ok(()));
    }

    /// qemu_flat (slots 1-4: virtio with MSI-X, SPIs 4, 5, 6, 3) and more slots, whose INTA
    /// repeats the root bus's routing every four: 5 (MSI-X, SPI 4), 6 (MSI, SPI 5), 7 (MSI-X,
    /// SPI 6), 8 (a pin and neither capability, SPI 3), 9 (MSI-X, SPI 4), 10 (neither a pin
    /// nor a capability).
    fn crowded() -> (Topology, Vec<IommuGroup>, HostBridge, IommuDirectory) {
        use crate::pci::fake::FakeFn;
        use crate::pci::PortType::RcIntegratedEndpoint;
        let mut f = FakeConfigSpace::qemu_flat();
        let ep = || FakeFn::endpoint(0x1234, 0x11).pcie(RcIntegratedEndpoint);
        f.add(None, 5, 0, ep().msix().pin(1));
        f.add(None, 6, 0, ep().msi().pin(1));
        f.add(None, 7, 0, ep().msix().pin(1));
        f.add(None, 8, 0, ep().pin(1));
        f.add(None, 9, 0, ep().msix().pin(1));
        f.add(None, 10, 0, ep());
        let (t, g, host) = setup(f);
        let dir = directory(&[(host.iommu_map[0].iommu, "/smmuv3@9050000", Ok(0))]);
        (t, g, host, dir)
    }

    #[test]
    fn three_vms_on_shared_lines_get_their_functions_msi_only() {
        let (t, g, host, dir) = crowded();
        let msi = ["vm0", "vm1", "vm2", "vm3"];
        let run = |vm: &str, devices: &[Bdf], earlier: &[(String, Vec<Bdf>)]| {
            resolve_msi(&t, &g, &host, &dir, vm, devices, earlier, 39, &msi)
        };
        let lines = |d: &VmDevices| -> Vec<(Bdf, u32)> {
            d.intx
                .iter()
                .map(|&(bdf, _, intid, _)| (bdf, intid))
                .collect()
        };
        let vm0 = vec![B(0, 1, 0), B(0, 2, 0), B(0, 4, 0)];
        let d0 = run("vm0", &vm0, &[]).unwrap();
        assert!(d0.msi_only.is_empty());
        assert_eq!(
            lines(&d0),
            [(B(0, 1, 0), 36), (B(0, 2, 0), 37), (B(0, 4, 0), 35)]
        );
        // vm1: 00:05.0 is on vm0's SPI 4; 00:03.0 has a line of its own.
        let mut earlier = vec![(String::from("vm0"), vm0)];
        let vm1 = vec![B(0, 5, 0), B(0, 3, 0)];
        let d1 = run("vm1", &vm1, &earlier).unwrap();
        assert_eq!(d1.msi_only, [B(0, 5, 0)]);
        assert_eq!(lines(&d1), [(B(0, 3, 0), 38)]);
        assert_eq!(d1.functions.len(), 2);
        // vm2: 00:06.0 (MSI) on vm0's SPI 5, 00:07.0 on vm1's SPI 6; 00:0a.0 has no pin and
        // is given as it would be anyway.
        earlier.push((String::from("vm1"), vm1));
        let vm2 = vec![B(0, 6, 0), B(0, 7, 0), B(0, 10, 0)];
        let d2 = run("vm2", &vm2, &earlier).unwrap();
        assert_eq!(d2.msi_only, [B(0, 6, 0), B(0, 7, 0)]);
        assert!(d2.intx.is_empty());
        assert_eq!(d2.functions.len(), 3);
        // An MSI-only function claims no line: on SPI 4, vm3 meets vm0's 00:01.0, not vm1's
        // MSI-only 00:05.0.
        earlier.push((String::from("vm2"), vm2));
        let mut all = earlier.clone();
        all.push((String::from("vm3"), vec![B(0, 9, 0)]));
        let plan = plan_intx(&all, &t, &host.interrupt_map, &msi).unwrap();
        let met: Vec<(usize, Bdf, &str, Bdf, u32)> = plan
            .iter()
            .map(|m| (m.vm, m.bdf, m.first_vm.as_str(), m.first, m.intid))
            .collect();
        assert_eq!(
            met,
            [
                (1, B(0, 5, 0), "vm0", B(0, 1, 0), 36),
                (2, B(0, 6, 0), "vm0", B(0, 2, 0), 37),
                (2, B(0, 7, 0), "vm1", B(0, 3, 0), 38),
                (3, B(0, 9, 0), "vm0", B(0, 1, 0), 36),
            ]
        );
    }

    #[test]
    fn the_msi_only_message_names_the_vm_the_function_and_the_line() {
        let (t, g, host, dir) = crowded();
        let earlier = vec![(String::from("vm0"), vec![B(0, 1, 0)])];
        let mut notes = Vec::new();
        let d = resolve_noting(
            &t,
            &g,
            &host,
            &dir,
            "vm1",
            &[B(0, 5, 0), B(0, 3, 0)],
            &earlier,
            39,
            &["vm1"],
            &mut notes,
        )
        .unwrap();
        assert_eq!(d.msi_only, [B(0, 5, 0)]);
        assert_eq!(
            notes,
            [
                "pci: VM vm1: 00:05.0 assigned MSI-only: its INTx line SPI 4 (INTID 36) is VM \
              vm0's (00:01.0); it gets no INTx, only MSI/MSI-X"
            ]
        );
        // A refused VM has no message: 00:08.0 (no MSI) on vm0's SPI 3 refuses it all.
        let earlier = vec![(String::from("vm0"), vec![B(0, 1, 0), B(0, 4, 0)])];
        let mut notes = Vec::new();
        let refused = resolve_noting(
            &t,
            &g,
            &host,
            &dir,
            "vm1",
            &[B(0, 5, 0), B(0, 8, 0)],
            &earlier,
            39,
            &["vm1"],
            &mut notes,
        );
        assert!(
            matches!(refused, Err(AssignError::NoMsiCapability { .. })),
            "{refused:?}"
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn a_function_without_msi_on_a_shared_line_is_still_refused() {
        let (t, g, host, dir) = crowded();
        let earlier = vec![(String::from("vm0"), vec![B(0, 4, 0)])];
        let e = resolve_msi(
            &t,
            &g,
            &host,
            &dir,
            "vm1",
            &[B(0, 8, 0)],
            &earlier,
            39,
            &["vm0", "vm1"],
        )
        .unwrap_err();
        assert_eq!(
            e,
            AssignError::NoMsiCapability {
                source: Box::new(AssignError::SharedIntx {
                    first_vm: "vm0".into(),
                    first: B(0, 4, 0),
                    second_vm: "vm1".into(),
                    second: B(0, 8, 0),
                    spi: 3,
                    intid: 35,
                })
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("share INTx line SPI 3"), "{msg}");
        assert!(msg.contains("no MSI/MSI-X capability"), "{msg}");
    }

    #[test]
    fn without_msi_a_shared_line_is_refused_as_before() {
        let (t, g, host, dir) = crowded();
        let earlier = vec![(String::from("vm0"), vec![B(0, 1, 0)])];
        let shared = AssignError::SharedIntx {
            first_vm: "vm0".into(),
            first: B(0, 1, 0),
            second_vm: "vm1".into(),
            second: B(0, 5, 0),
            spi: 4,
            intid: 36,
        };
        let devices = [B(0, 5, 0)];
        let old = resolve(&t, &g, &host, &dir, "vm1", &devices, &earlier, 39);
        assert_eq!(old.unwrap_err(), shared);
        // Only the earlier VM takes MSIs: the later one is still refused.
        let e = resolve_msi(&t, &g, &host, &dir, "vm1", &devices, &earlier, 39, &["vm0"]);
        assert_eq!(e.unwrap_err(), shared);
        // And a VM that takes MSIs but shares no line keeps its INTx.
        let d = resolve_msi(
            &t,
            &g,
            &host,
            &dir,
            "vm1",
            &[B(0, 3, 0)],
            &earlier,
            39,
            &["vm1"],
        )
        .unwrap();
        assert!(d.msi_only.is_empty());
        assert_eq!(d.intx.len(), 1);
    }

    #[test]
    fn intx_is_swizzled_through_bridges() {
        // Behind the PCIe-to-PCI bridge at 00:02.0 (bus 1): device 1 INTA -> INTB at the bridge,
        // device 2 INTA -> INTC; slot 2 maps INTB/INTC to SPIs 6 and 3.
        let (t, _, host) = setup(FakeConfigSpace::pci_bridge_topology());
        let map = &host.interrupt_map;
        assert_eq!(t.intx_route(B(1, 1, 0), map).unwrap().spi, 6);
        assert_eq!(t.intx_route(B(1, 2, 0), map).unwrap().spi, 3);
        // Behind root ports only device 0 exists, so the pin passes unchanged.
        let (t, _, host) = setup(FakeConfigSpace::switch_topology(true));
        let map = &host.interrupt_map;
        // 03:00.0: dev 0 below 02:00.0, dev 0 below 01:00.0, then slot 1 of the root bus
        // as INTA: SPI 4. 04:00.0 enters the switch at downstream port 02:01.0, device 1: INTB
        // from there up, root-bus slot 1 INTB: SPI 5.
        assert_eq!(t.intx_route(B(3, 0, 0), map).unwrap().spi, 4);
        assert_eq!(t.intx_route(B(4, 0, 0), map).unwrap().spi, 5);
        assert_eq!(t.intx_route(B(5, 0, 0), map).unwrap().spi, 5);
        let req = [("a", vec![B(4, 0, 0)]), ("b", vec![B(5, 0, 0)])];
        assert!(matches!(
            check_intx(&req, &t, map),
            Err(AssignError::SharedIntx { spi: 5, .. })
        ));
    }

    #[test]
    fn resolve_lists_the_bridges_above_and_where_each_pin_reaches_the_host_bridge() {
        let host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
        let dir = directory(&[(host.iommu_map[0].iommu, "/smmuv3@9050000", Ok(0))]);
        let mut f = FakeConfigSpace::switch_topology(true);
        let t = enumerate(&mut f, host.bus_start, host.bus_end).unwrap();
        let g = iommu_groups(&t, &host);
        let devices = [B(5, 0, 0), B(3, 0, 0), B(4, 0, 0)];
        let d = resolve(&t, &g, &host, &dir, "vm0", &devices, &[], 39).unwrap();
        let bridges: Vec<Bdf> = d.bridges.iter().map(|b| b.bdf).collect();
        // Both root ports, the switch's upstream port once, both downstream ports; by BDF.
        assert_eq!(
            bridges,
            [B(0, 1, 0), B(0, 2, 0), B(1, 0, 0), B(2, 0, 0), B(2, 1, 0)]
        );
        assert!(d.bridges.iter().all(|b| b.bridge.is_some()));
        assert!(d.functions.iter().all(|f| !bridges.contains(&f.bdf)));
        // 03:00.0 INTA enters at root slot 1 as INTA (SPI 4); 04:00.0 INTA is INTB from
        // downstream port 02:01.0 up, so root slot 1 INTB (SPI 5); 05:00.0 at slot 2 INTA (SPI
        // 5 too, QEMU's rotation).
        assert_eq!(
            d.intx,
            [
                (B(5, 0, 0), IntxPin::A, 37, (B(0, 2, 0), IntxPin::A)),
                (B(3, 0, 0), IntxPin::A, 36, (B(0, 1, 0), IntxPin::A)),
                (B(4, 0, 0), IntxPin::A, 37, (B(0, 1, 0), IntxPin::B)),
            ]
        );
        for &(bdf, _, intid, (root, pin)) in &d.intx {
            assert_eq!(t.intx_at_root(bdf), Some((root, pin)));
            assert_eq!(host.interrupt_map.lookup(root, pin).unwrap().intid, intid);
        }
        // A function on the root bus has no bridge above it.
        let d = resolve_with(&dir, &host, &[B(0, 3, 0)]).unwrap();
        assert!(d.bridges.is_empty());
        assert_eq!(d.intx[0].3, (B(0, 3, 0), IntxPin::A));
    }
}

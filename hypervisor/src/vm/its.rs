//! A VM's virtual ITS in its IPA space (issue 15): where its two frames are, which DeviceIDs it
//! may name, and how a physical LPI taken at EL2 becomes the guest's LPI.
//!
//! The vITS sits at the physical ITS's address, as the vSMMU sits at the physical SMMU's, and
//! its two 64 KiB frames are treated differently:
//!
//! - the control frame (GITS_CTLR ... GITS_BASER<n>) is never mapped: every access traps to
//!   the model (`devices::vits`), which keeps the guest's mappings and asks the physical ITS,
//!   through [`PhysicalIts`], for the physical side of each;
//! - the translation frame's first page, which holds GITS_TRANSLATER (+0x40), is mapped in the
//!   VM's stage 2 onto the *physical* GITS_TRANSLATER page, write-only. That stage 2 is the one
//!   the physical SMMU nests the guest's stage 1 under, so a function's MSI to the doorbell the
//!   guest gave it (an IOVA its stage 1 maps to this IPA, or the IPA itself without a vSMMU)
//!   reaches the physical ITS carrying the function's own DeviceID and the guest's EventID, and
//!   is translated by the ITT the hypervisor made for that DeviceID from the guest's MAPTIs.
//!
//! The same page is therefore reachable by the guest's CPUs. What a CPU store to
//! GITS_TRANSLATER carries as DeviceID is IMPLEMENTATION DEFINED (GICv3 leaves the transport to
//! the interconnect; GIC-600 takes it from AWUSER, which a CPU cluster drives as the SoC
//! wires it). On QEMU it is 0: TCG CPU stores carry no requester ID (see
//! `../shared/notes/its-facts.md` 3). The hypervisor never maps [`CPU_STORE_DEVICE_ID`] in
//! the physical ITS (a VM whose function has that DeviceID gets no vITS for it: see
//! [`ItsFacts::devices`], [`ItsFacts::no_msi_on`]), so such a store is dropped by the ITS as an unmapped DeviceID and
//! raises nothing. On hardware whose CPU stores carry another DeviceID, or one a guest could
//! choose, the board file must name it; the ITS control frame, any MSI-64 page and the ITS's
//! tables are never mapped into any stage 2.

use crate::devices::vits::{PhysicalIts, Vits, VitsConfig, DEFAULT_MAX_EVENTS};
use crate::hw::Ipa;
use crate::platform::MemRange;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use spin::Mutex;

/// Size of one ITS frame (IHI 0069H 12.1.3: control frame, then translation frame).
pub const ITS_FRAME_SIZE: u64 = 0x10000;
/// The DeviceID a guest CPU's store to GITS_TRANSLATER carries on QEMU `virt` (no requester
/// ID on CPU accesses): never mapped physically.
pub const CPU_STORE_DEVICE_ID: u32 = 0;

/// What the machine says about the physical ITS a VM's functions send their MSIs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItsFacts {
    /// Index of the physical ITS (in `Platform::gic.its` order).
    pub index: usize,
    /// Its control frame's physical address (the translation frame follows).
    pub base: u64,
    /// Its DT phandle, which host bridges' `msi-map` entries name.
    pub phandle: Option<u32>,
    /// Each of the VM's functions as (segment index, function, its DeviceID on this ITS): `None`
    /// where its host bridge's `msi-map` gives it none here.
    pub functions: Vec<(usize, crate::pci::Bdf, Option<u32>)>,
}

impl ItsFacts {
    /// Whether the ITS can take the MSIs of a function with DeviceID `id`: it has one, and not
    /// [`CPU_STORE_DEVICE_ID`], which the hypervisor never maps.
    fn takes_msi(id: Option<u32>) -> bool {
        id.is_some_and(|d| d != CPU_STORE_DEVICE_ID)
    }

    /// The DeviceIDs the VM may name in its vITS, sorted, each once.
    pub fn devices(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .functions
            .iter()
            .filter_map(|&(_, _, id)| id.filter(|_| Self::takes_msi(id)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The VM's functions on segment `segment` whose MSIs the ITS cannot take: their MSI and
    /// MSI-X stay hidden, so they keep INTx.
    pub fn no_msi_on(&self, segment: usize) -> Vec<crate::pci::Bdf> {
        self.functions
            .iter()
            .filter(|&&(seg, _, id)| seg == segment && !Self::takes_msi(id))
            .map(|&(_, bdf, _)| bdf)
            .collect()
    }
}

/// A VM's virtual ITS.
#[derive(Debug)]
pub struct VmIts {
    /// The trapped control frame (guest IPA, the physical ITS's address).
    pub regs: MemRange,
    /// The page of the translation frame holding GITS_TRANSLATER, mapped write-only to the
    /// physical one (same address).
    pub doorbell: MemRange,
    /// Which physical ITS it stands for.
    pub its: usize,
    /// That ITS's phandle in the host DT.
    pub host_phandle: Option<u32>,
    /// The command model.
    pub model: Mutex<Vits>,
    cfg: VitsConfig,
    /// Physical LPIs turned into guest LPIs (pending in the vGIC, injected through list
    /// registers) since the VM's last boot.
    delivered: AtomicU64,
    /// Physical LPIs dropped because the guest's vITS translated them to nothing (its ITS
    /// disabled, the collection unmapped).
    dropped: AtomicU64,
    /// GICv4.0 direct injection: the events are mapped to its vCPUs' vPEs and their vLPIs
    /// reach the guest with no exit; chosen once, when the VM is created.
    direct: AtomicBool,
}

impl VmIts {
    /// A vITS for `vcpus` vCPUs over `facts`' physical ITS, or `None` when the VM has no
    /// DeviceID there it could name.
    pub fn new(facts: &ItsFacts, vcpus: usize) -> Option<Self> {
        let devices = facts.devices();
        if devices.is_empty() {
            return None;
        }
        let cfg = VitsConfig {
            devices,
            vcpus,
            max_events: DEFAULT_MAX_EVENTS,
        };
        Some(Self {
            regs: MemRange {
                base: facts.base,
                size: ITS_FRAME_SIZE,
            },
            doorbell: MemRange {
                base: facts.base + ITS_FRAME_SIZE,
                size: 0x1000,
            },
            its: facts.index,
            host_phandle: facts.phandle,
            model: Mutex::new(Vits::new(&cfg)),
            cfg,
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            direct: AtomicBool::new(false),
        })
    }

    /// The DeviceIDs the VM owns on it.
    pub fn devices(&self) -> &[u32] {
        &self.cfg.devices
    }

    /// A VM reset: every physical mapping of the VM's events and devices undone (through
    /// `phys`) and the model back at its reset values.
    pub fn reset(&self, phys: &mut dyn PhysicalIts) {
        self.model.lock().reset(phys);
        self.delivered.store(0, Ordering::Relaxed);
        self.dropped.store(0, Ordering::Relaxed);
    }

    /// The guest LPI and vCPU a physical LPI stands for (`Vits::virtual_of`), counted as
    /// delivered or dropped.
    pub fn virtual_of(&self, plpi: u32) -> Option<(u32, usize)> {
        let v = self.model.lock().virtual_of(plpi);
        let counter = if v.is_some() {
            &self.delivered
        } else {
            &self.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        v
    }

    /// The VM's MSIs are directly injected (GICv4.0), set when the VM is created.
    pub fn set_direct(&self, direct: bool) {
        self.direct.store(direct, Ordering::Relaxed);
    }

    /// Whether the VM's MSIs are directly injected.
    pub fn is_direct(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }

    /// One statistics line: the delivery path (`gicv4-direct` or `list-registers`), the
    /// physical LPIs taken at EL2 for the VM (delivered + dropped; 0 with direct injection,
    /// where a device's MSI never reaches the hypervisor), delivered and dropped apart, the
    /// model's commands and errors.
    pub fn stats_line(&self, vm: &str) -> String {
        let m = self.model.lock();
        let st = m.stats();
        let (delivered, dropped) = (
            self.delivered.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        );
        alloc::format!(
            "vits: {vm} stats: delivery {}, lpis_at_el2={} lpis_delivered={} lpis_dropped={} commands={} command_errors={} stalls={} devices_mapped={} events_mapped={}",
            if self.is_direct() {
                "gicv4-direct"
            } else {
                "list-registers"
            },
            delivered + dropped,
            delivered,
            dropped,
            st.commands,
            st.total_errors(),
            st.stalls,
            m.mapped_devices(),
            m.mapped_events(),
        )
    }

    /// Whether `ipa` is in its trapped control frame: the offset there.
    pub fn control_offset(&self, ipa: Ipa) -> Option<u64> {
        ipa.offset_from(Ipa(self.regs.base))
            .filter(|&off| off < self.regs.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Facts of functions 00:01.0, 00:02.0, ... on segment 0 with DeviceIDs `devices`.
    fn facts(devices: &[u32]) -> ItsFacts {
        ItsFacts {
            index: 0,
            base: 0x0808_0000,
            phandle: Some(0x8003),
            functions: devices
                .iter()
                .enumerate()
                .map(|(i, &d)| (0, crate::pci::Bdf::new(0, i as u8 + 1, 0), Some(d)))
                .collect(),
        }
    }

    #[test]
    fn frames_sit_at_the_physical_its() {
        let its = VmIts::new(&facts(&[0x10, 0x18]), 2).unwrap();
        assert_eq!(
            its.regs,
            MemRange {
                base: 0x0808_0000,
                size: 0x10000
            }
        );
        // GITS_TRANSLATER is at +0x10040: its page, and only it, is the doorbell.
        assert_eq!(
            its.doorbell,
            MemRange {
                base: 0x0809_0000,
                size: 0x1000
            }
        );
        assert_eq!(its.control_offset(Ipa(0x0808_0008)), Some(8));
        assert_eq!(its.control_offset(Ipa(0x0809_0040)), None);
        assert_eq!(its.devices(), &[0x10, 0x18]);
    }

    #[test]
    fn the_stats_line_names_the_delivery_path_and_counts_lpis_taken_at_el2() {
        let its = VmIts::new(&facts(&[0x10]), 2).unwrap();
        assert!(its
            .stats_line("vm0")
            .contains("delivery list-registers, lpis_at_el2=0 "));
        // Two LPIs taken at EL2, neither translated by the (disabled) model: dropped, counted.
        assert_eq!(its.virtual_of(0x2000), None);
        assert_eq!(its.virtual_of(0x2001), None);
        let line = its.stats_line("vm0");
        assert!(
            line.contains("lpis_at_el2=2 lpis_delivered=0 lpis_dropped=2"),
            "{line}"
        );
        its.set_direct(true);
        assert!(its.is_direct());
        assert!(its
            .stats_line("vm0")
            .starts_with("vits: vm0 stats: delivery gicv4-direct, "));
    }

    #[test]
    fn the_cpu_store_device_id_is_never_owned() {
        let its = VmIts::new(&facts(&[CPU_STORE_DEVICE_ID, 0x10]), 1).unwrap();
        assert_eq!(its.devices(), &[0x10]);
        assert!(VmIts::new(&facts(&[CPU_STORE_DEVICE_ID]), 1).is_none());
        assert!(VmIts::new(&facts(&[]), 1).is_none());
    }

    #[test]
    fn functions_the_its_cannot_take_msis_from_keep_them_hidden() {
        use crate::pci::Bdf;
        let mut f = facts(&[0x18, CPU_STORE_DEVICE_ID, 0x10, 0x18]);
        f.functions.push((1, Bdf::new(0x81, 0, 0), None));
        f.functions.push((1, Bdf::new(0x82, 0, 0), Some(0x8200)));
        // Sorted, each once, without DeviceID 0.
        assert_eq!(f.devices(), [0x10, 0x18, 0x8200]);
        // By segment: DeviceID 0 and no DeviceID at all.
        assert_eq!(f.no_msi_on(0), [Bdf::new(0, 2, 0)]);
        assert_eq!(f.no_msi_on(1), [Bdf::new(0x81, 0, 0)]);
        assert!(f.no_msi_on(2).is_empty());
    }
}

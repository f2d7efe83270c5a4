//! Whether a virtio PCI function's DMA goes through the IOMMU at all.
//!
//! A virtio device that does not offer VIRTIO_F_ACCESS_PLATFORM (feature bit 33, virtio 1.2
//! 6.1) treats the addresses its driver gives it as physical addresses and, on QEMU, reaches
//! memory without translation: an assigned one would DMA straight into the hypervisor's or
//! another VM's memory, whatever the SMMU says. Legacy-only devices cannot offer the bit at all
//! (they have 32 feature bits). Such a function is refused for assignment; this module finds
//! out which kind a function is, reading `device_feature` in its common configuration structure
//! (virtio 1.2 4.1.4.3) through the BAR the hypervisor placed it in. (The spec's other way in,
//! the VIRTIO_PCI_CAP_PCI_CFG window in configuration space, trips an assertion in QEMU 10.0's
//! `virtio_address_space_lookup`, QEMU issue 2576.)

use super::enumerate::{BarKind, PciDevice, Topology};
use super::regs::{self, cap_id};
pub use super::VirtioDma;
use super::{Bdf, ConfigSpace};

/// The virtio PCI vendor ID (virtio 1.2 4.1.2).
pub const VENDOR_ID: u16 = 0x1af4;
/// Device IDs 0x1000-0x103f are transitional (legacy interface too), 0x1040-0x107f modern.
const DEVICE_IDS: core::ops::RangeInclusive<u16> = 0x1000..=0x107f;

/// VIRTIO_F_ACCESS_PLATFORM: the device's DMA goes through the platform's IOMMU.
pub const F_ACCESS_PLATFORM: u32 = 33;

/// `cfg_type` of the common configuration capability (virtio 1.2 4.1.4).
const CAP_COMMON_CFG: u8 = 1;

/// Offsets in `struct virtio_pci_cap`.
const CAP_CFG_TYPE: u16 = 3;
const CAP_BAR: u16 = 4;
const CAP_OFFSET: u16 = 8;

/// Offsets in `struct virtio_pci_common_cfg`.
const DEVICE_FEATURE_SELECT: u64 = 0;
const DEVICE_FEATURE: u64 = 4;

/// 32-bit accesses to memory BARs at their CPU physical addresses, for the probe.
pub trait BarMmio {
    /// Reads the dword at `pa`.
    fn read32(&mut self, pa: u64) -> u32;
    /// Writes the dword at `pa`.
    fn write32(&mut self, pa: u64, value: u32);
}

/// Whether `dev` is a virtio function (by its IDs).
pub fn is_virtio(dev: &PciDevice) -> bool {
    dev.vendor_id == VENDOR_ID && DEVICE_IDS.contains(&dev.device_id)
}

/// The virtio vendor capability of `cfg_type` in `bdf`'s conventional list, if any.
fn find_cap<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf, cfg_type: u8) -> Option<u16> {
    if cfg.read32(bdf, regs::COMMAND) & regs::STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut ptr = (cfg.read32(bdf, regs::CAP_PTR) & 0xfc) as u16;
    for _ in 0..regs::CAP_TTL {
        if ptr < 0x40 {
            return None;
        }
        let hdr = cfg.read32(bdf, ptr);
        if hdr as u8 == cap_id::VENDOR && (hdr >> (8 * CAP_CFG_TYPE)) as u8 == cfg_type {
            return Some(ptr);
        }
        ptr = ((hdr >> 8) & 0xfc) as u16;
    }
    None
}

/// Finds out how virtio function `dev` (its BARs placed, memory decoding on) does DMA, through
/// `hw`'s configuration space and BARs. Writes its `device_feature_select` and puts it back to
/// 0: run it before the function is given to a VM. `None` for non-virtio functions.
pub fn probe<H: ConfigSpace + BarMmio + ?Sized>(hw: &mut H, dev: &PciDevice) -> Option<VirtioDma> {
    let cfg: &H = hw;
    if !is_virtio(dev) {
        return None;
    }
    let Some(common) = find_cap(cfg, dev.bdf, CAP_COMMON_CFG) else {
        return Some(VirtioDma::LegacyOnly);
    };
    let bar = (cfg.read32(dev.bdf, common + CAP_BAR) & 0xff) as u8;
    let offset = u64::from(cfg.read32(dev.bdf, common + CAP_OFFSET));
    // The two registers must lie inside the placed memory BAR the capability names.
    let base = dev
        .bars
        .iter()
        .find(|b| b.index == bar && b.kind != BarKind::Io)
        .filter(|b| {
            offset
                .checked_add(DEVICE_FEATURE + 4)
                .is_some_and(|e| e <= b.size)
        })
        .and_then(|b| b.addr)
        .and_then(|a| a.cpu.checked_add(offset));
    let Some(base) = base else {
        return Some(VirtioDma::Unknown);
    };
    BarMmio::write32(hw, base + DEVICE_FEATURE_SELECT, 1);
    let high = BarMmio::read32(hw, base + DEVICE_FEATURE);
    BarMmio::write32(hw, base + DEVICE_FEATURE_SELECT, 0);
    Some(if high & (1 << (F_ACCESS_PLATFORM - 32)) != 0 {
        VirtioDma::Translated
    } else {
        VirtioDma::NoAccessPlatform
    })
}

/// Probes every virtio function of `topo` ([`probe`]) and records the answer in it. Run after
/// [`super::assign_resources`]: the common configuration is reached through its BAR.
pub fn probe_all<H: ConfigSpace + BarMmio + ?Sized>(hw: &mut H, topo: &mut Topology) {
    for d in &mut topo.devices {
        d.virtio = probe(hw, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::assign_resources;
    use crate::pci::enumerate::{enumerate, PortType};
    use crate::pci::fake::{qemu_host_bridge, FakeConfigSpace, FakeFn};

    fn placed(f: FakeFn) -> (FakeConfigSpace, PciDevice) {
        let mut cfg = FakeConfigSpace::new();
        cfg.add(None, 1, 0, f);
        let mut topo = enumerate(&mut cfg, 0, 0).unwrap();
        assign_resources(&mut cfg, &mut topo, &qemu_host_bridge()).unwrap();
        let dev = topo.device(Bdf::new(0, 1, 0)).unwrap().clone();
        (cfg, dev)
    }

    fn probe_one(f: FakeFn) -> Option<VirtioDma> {
        let (mut cfg, dev) = placed(f);
        probe(&mut cfg, &dev)
    }

    fn virtio(device: u16) -> FakeFn {
        FakeFn::endpoint(VENDOR_ID, device)
            .pcie(PortType::RcIntegratedEndpoint)
            .bar64(4, 0x4000, true)
    }

    #[test]
    fn access_platform_is_read_from_the_common_configuration() {
        let with = 1u64 << 33 | 1 << 32 | 0x3000_0000;
        assert_eq!(
            probe_one(virtio(0x1042).virtio_modern(with)),
            Some(VirtioDma::Translated)
        );
        // VIRTIO_F_VERSION_1 (32) alone: a modern device whose DMA bypasses the IOMMU.
        assert_eq!(
            probe_one(virtio(0x1042).virtio_modern(1 << 32 | 0xffff_ffff)),
            Some(VirtioDma::NoAccessPlatform)
        );
        // Transitional IDs with the modern interface are judged by their feature bits too.
        assert_eq!(
            probe_one(virtio(0x1001).bar_io(0, 0x80).virtio_modern(with)),
            Some(VirtioDma::Translated)
        );
    }

    #[test]
    fn legacy_only_and_unplaced_devices() {
        assert_eq!(
            probe_one(virtio(0x1000).bar_io(0, 0x20)),
            Some(VirtioDma::LegacyOnly)
        );
        assert!(!VirtioDma::LegacyOnly.translated());
        assert_eq!(probe_one(FakeFn::endpoint(0x8086, 0x10d3)), None);
        assert_eq!(probe_one(FakeFn::endpoint(VENDOR_ID, 0x1100)), None);
        // The capability names a BAR the function does not have.
        let no_bar = FakeFn::endpoint(VENDOR_ID, 0x1042).virtio_modern(1 << 33);
        assert_eq!(probe_one(no_bar), Some(VirtioDma::Unknown));
    }

    #[test]
    fn feature_select_is_put_back() {
        let (mut cfg, dev) = placed(virtio(0x1041).virtio_modern(1 << 33));
        assert_eq!(probe(&mut cfg, &dev), Some(VirtioDma::Translated));
        assert_eq!(cfg.virtio_select(dev.bdf), Some(0));
    }
}

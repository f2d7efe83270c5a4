//! A configuration space in memory for tests: functions with writable-bit masks (so BAR sizing
//! works as on hardware), RW1C status bits, and routing that follows the bus numbers software
//! programs into bridges (a function behind a bridge only answers once the bridge forwards
//! its bus).

use alloc::vec::Vec;

use super::enumerate::PortType;
use super::host::{InterruptMap, IommuMapEntry, PciSpace, PciWindow};
use super::regs::{self, acs, cap_id, command, ext_cap_id};
use super::{Bdf, ConfigSpace, HostBridge};
use crate::platform::MemRange;

/// QEMU virt's host bridge with `iommu=smmuv3`, as its DT describes it (checked against the
/// fixture DTB in resources.rs's tests): the ECAM window, the I/O, 32-bit and 64-bit windows,
/// and the identity `iommu-map` for every RID. The interrupt map is left empty.
pub(crate) fn qemu_host_bridge() -> HostBridge {
    let window = |space, base, cpu_base, size| PciWindow {
        space,
        prefetchable: false,
        pci_base: base,
        cpu_base,
        size,
    };
    HostBridge {
        ecam: MemRange {
            base: 0x40_1000_0000,
            size: 0x1000_0000,
        },
        bus_start: 0,
        bus_end: 0xff,
        windows: alloc::vec![
            window(PciSpace::Io, 0, 0x3eff_0000, 0x1_0000),
            window(PciSpace::Mem32, 0x1000_0000, 0x1000_0000, 0x2eff_0000),
            window(
                PciSpace::Mem64,
                0x80_0000_0000,
                0x80_0000_0000,
                0x80_0000_0000
            ),
        ],
        iommu_map: alloc::vec![IommuMapEntry {
            rid_base: 0,
            iommu: 0x8007,
            sid_base: 0,
            length: 0x1_0000,
        }],
        iommu_map_mask: None,
        msi_map: alloc::vec::Vec::new(),
        msi_map_mask: None,
        domain: None,
        interrupt_map: InterruptMap::default(),
        dma_coherent: true,
    }
}

const DWORDS: usize = 1024;

/// One fake function, built with the chained methods.
#[derive(Clone, Debug)]
pub(crate) struct FakeFn {
    regs: Vec<u32>,
    masks: Vec<u32>,
    next_cap: u8,
    last_cap: Option<u8>,
    /// A modern virtio device's feature bits, reached through its VIRTIO_PCI_CAP_PCI_CFG window.
    virtio: Option<FakeVirtio>,
}

/// What a virtio device's common configuration answers (virtio 1.2 4.1.4.3):
/// `device_feature_select` and `device_feature`, at offset 0 of its BAR 4.
#[derive(Clone, Copy, Debug)]
struct FakeVirtio {
    features: u64,
    select: u32,
}

impl FakeFn {
    fn blank(vendor: u16, device: u16, header_type: u8, class: u32) -> FakeFn {
        let mut f = FakeFn {
            regs: alloc::vec![0; DWORDS],
            masks: alloc::vec![0; DWORDS],
            next_cap: 0x40,
            last_cap: None,
            virtio: None,
        };
        f.regs[0] = u32::from(device) << 16 | u32::from(vendor);
        f.regs[2] = class << 8 | 1;
        f.regs[3] = u32::from(header_type) << 16;
        f.masks[1] = 0x0000_07ff;
        // Interrupt Line is plain storage.
        f.masks[(regs::INTERRUPT / 4) as usize] = 0xff;
        f
    }

    /// A Type 0 function of an unclassified class, no capabilities.
    pub(crate) fn endpoint(vendor: u16, device: u16) -> FakeFn {
        FakeFn::blank(vendor, device, 0, 0xff_00_00)
    }

    /// A Type 1 function with all windows (32-bit I/O, 64-bit prefetchable).
    pub(crate) fn bridge(port: Option<PortType>) -> FakeFn {
        let mut f = FakeFn::blank(0x1b36, 0x000c, 1, 0x06_04_00);
        let m = |r: u16| (r / 4) as usize;
        f.masks[m(regs::BRIDGE_BUSES)] = 0xffff_ffff;
        f.regs[m(regs::BRIDGE_IO)] = 0x0101;
        f.masks[m(regs::BRIDGE_IO)] = 0xf0f0;
        f.masks[m(regs::BRIDGE_MEM)] = 0xfff0_fff0;
        f.regs[m(regs::BRIDGE_PREF)] = 0x0001_0001;
        f.masks[m(regs::BRIDGE_PREF)] = 0xfff0_fff0;
        f.masks[m(regs::BRIDGE_PREF_BASE_UPPER)] = u32::MAX;
        f.masks[m(regs::BRIDGE_PREF_LIMIT_UPPER)] = u32::MAX;
        f.masks[m(regs::BRIDGE_IO_UPPER)] = u32::MAX;
        // Interrupt Line and Bridge Control (bits 11:0 of the upper half, Secondary Bus Reset
        // among them) are writable, as on hardware.
        f.masks[m(regs::INTERRUPT)] = 0x0fff_00ff;
        match port {
            Some(p) => f.pcie(p),
            None => f,
        }
    }

    /// A PCIe root port.
    pub(crate) fn root_port() -> FakeFn {
        FakeFn::bridge(Some(PortType::RootPort))
    }

    pub(crate) fn class(mut self, class: u32) -> FakeFn {
        self.regs[2] = class << 8 | (self.regs[2] & 0xff);
        self
    }

    pub(crate) fn multifunction(mut self) -> FakeFn {
        self.regs[3] |= u32::from(regs::HEADER_MULTIFUNCTION) << 16;
        self
    }

    pub(crate) fn pin(mut self, pin: u8) -> FakeFn {
        self.regs[(regs::INTERRUPT / 4) as usize] |= u32::from(pin) << 8;
        self
    }

    pub(crate) fn bar32(mut self, i: usize, size: u32, prefetchable: bool) -> FakeFn {
        self.regs[4 + i] = if prefetchable { 0x8 } else { 0 };
        self.masks[4 + i] = !(size - 1) & 0xffff_fff0;
        self
    }

    pub(crate) fn bar64(mut self, i: usize, size: u64, prefetchable: bool) -> FakeFn {
        let mask = !(size - 1);
        self.regs[4 + i] = 0x4 | if prefetchable { 0x8 } else { 0 };
        self.masks[4 + i] = mask as u32 & 0xffff_fff0;
        if i + 1 < 6 {
            self.masks[5 + i] = (mask >> 32) as u32;
        }
        self
    }

    pub(crate) fn bar_io(mut self, i: usize, size: u32) -> FakeFn {
        self.regs[4 + i] = 1;
        // A 16-bit decoder: the upper half is hard-wired to zero.
        self.masks[4 + i] = !(size - 1) & 0xfffc;
        self
    }

    fn cap(self, id: u8, second_byte_pair: u16) -> FakeFn {
        self.cap_sized(id, second_byte_pair, 0x10)
    }

    /// Links a capability of `len` bytes (a multiple of 4) at the next free offset.
    fn cap_sized(mut self, id: u8, second_byte_pair: u16, len: u8) -> FakeFn {
        let at = self.next_cap;
        self.next_cap += len;
        self.regs[(at / 4) as usize] = u32::from(second_byte_pair) << 16 | u32::from(id);
        match self.last_cap {
            None => {
                self.regs[(regs::CAP_PTR / 4) as usize] = u32::from(at);
                self.regs[1] |= regs::STATUS_CAP_LIST;
            }
            Some(prev) => self.regs[(prev / 4) as usize] |= u32::from(at) << 8,
        }
        self.last_cap = Some(at);
        self
    }

    pub(crate) fn pcie(self, port: PortType) -> FakeFn {
        let bits: u16 = match port {
            PortType::Endpoint => 0,
            PortType::LegacyEndpoint => 1,
            PortType::RootPort => 4,
            PortType::UpstreamPort => 5,
            PortType::DownstreamPort => 6,
            PortType::PcieToPciBridge => 7,
            PortType::PciToPcieBridge => 8,
            PortType::RcIntegratedEndpoint => 9,
            PortType::RcEventCollector => 10,
            PortType::Reserved(b) => u16::from(b),
        };
        // PCI Express Capabilities register: version 2, type in 7:4.
        self.cap(cap_id::PCIE, bits << 4 | 2)
    }

    /// Capability `id` with `second_byte_pair` in the upper half of its header and `body`, the
    /// (value, writable bits) of up to three dwords after the header: for capabilities without
    /// a builder of their own (the vECAM fuzz harness's PM, AF, EA and 64-bit MSI).
    pub(crate) fn raw_cap(self, id: u8, second_byte_pair: u16, body: &[(u32, u32)]) -> FakeFn {
        let at = usize::from(self.next_cap / 4);
        let mut f = self.cap(id, second_byte_pair);
        for (i, &(value, mask)) in body.iter().take(3).enumerate() {
            f.regs[at + 1 + i] = value;
            f.masks[at + 1 + i] = mask;
        }
        f
    }

    pub(crate) fn msi(self) -> FakeFn {
        self.cap(cap_id::MSI, 0)
    }

    pub(crate) fn msix(self) -> FakeFn {
        self.cap(cap_id::MSIX, 0)
    }

    /// A Power Management capability (PCI Bus PM Interface 1.2, 3.2): PMC with D1/D2 support,
    /// PMCSR in D0 with No_Soft_Reset as given; PowerState and PME_En writable, PME_Status RW1C.
    pub(crate) fn pm(self, no_soft_reset: bool) -> FakeFn {
        let at = usize::from(self.next_cap);
        let mut f = self.cap(regs::cap_id::PM, 0x0603);
        let pmcsr = at / 4 + 1;
        f.regs[pmcsr] = if no_soft_reset { 1 << 3 } else { 0 };
        f.masks[pmcsr] = 0x0103;
        f
    }

    /// An Advanced Features capability (PCI Advanced Features ECN): TP and FLR capable, AF
    /// Control (byte 4) with Initiate FLR writable.
    pub(crate) fn af(self) -> FakeFn {
        let at = usize::from(self.next_cap);
        let mut f = self.cap(regs::cap_id::AF, 0x0306);
        f.masks[at / 4 + 1] = 0x1;
        f
    }

    /// An Enhanced Allocation capability (PCIe Base spec 7.8.5) with one entry, Enable writable.
    pub(crate) fn ea(self) -> FakeFn {
        let at = usize::from(self.next_cap);
        let mut f = self.cap(regs::cap_id::EA, 0x0001);
        f.regs[at / 4 + 1] = 1 << 31 | 0x3 << 1;
        f.masks[at / 4 + 1] = 1 << 31;
        f
    }

    /// The modern virtio common configuration capability (virtio 1.2 4.1.4): the structure at
    /// offset 0 of BAR 4, answering with `features`.
    pub(crate) fn virtio_modern(self, features: u64) -> FakeFn {
        let at = usize::from(self.next_cap);
        // cap_len 16, cfg_type 1 (COMMON_CFG); bar 4, offset 0, length 0x38.
        let mut f = self.cap_sized(regs::cap_id::VENDOR, 0x0110, 0x10);
        f.regs[at / 4 + 1] = 4;
        f.regs[at / 4 + 3] = 0x38;
        f.virtio = Some(FakeVirtio {
            features,
            select: 0,
        });
        f
    }

    /// virtio's PCI configuration access capability (virtio 1.2 4.1.4.9): cap_len 20,
    /// cfg_type 5, its `bar`, `offset`, `length` and `pci_cfg_data` writable.
    pub(crate) fn virtio_pci_cfg(self) -> FakeFn {
        let at = usize::from(self.next_cap / 4);
        let mut f = self.cap_sized(regs::cap_id::VENDOR, 0x0514, 20);
        for (i, mask) in [0xff, u32::MAX, u32::MAX, u32::MAX].into_iter().enumerate() {
            f.masks[at + 1 + i] = mask;
        }
        f
    }

    /// An ACS extended capability (adds a PCIe endpoint capability if there is none).
    pub(crate) fn acs(self, capability: u16, control: u16) -> FakeFn {
        let mut f = if self.regs[1] & regs::STATUS_CAP_LIST == 0 {
            self.pcie(PortType::Endpoint)
        } else {
            self
        };
        f.regs[0x100 / 4] = 1 << 16 | u32::from(ext_cap_id::ACS);
        f.regs[0x104 / 4] = u32::from(control) << 16 | u32::from(capability);
        f
    }

    /// ACS with the four features Linux requires (SV, RR, CR, UF) implemented and enabled.
    pub(crate) fn full_acs(self) -> FakeFn {
        let all = acs::SV | acs::RR | acs::CR | acs::UF;
        self.acs(all, all)
    }
}

#[derive(Debug)]
struct Slot {
    parent: Option<usize>,
    dev: u8,
    func: u8,
    f: FakeFn,
}

/// The fake configuration space.
#[derive(Debug, Default)]
pub(crate) struct FakeConfigSpace {
    slots: Vec<Slot>,
    /// Set if a BAR was ever written all ones while its function decoded memory or I/O.
    pub(crate) decode_seen_with_all_ones: bool,
}

impl FakeConfigSpace {
    pub(crate) fn new() -> FakeConfigSpace {
        FakeConfigSpace::default()
    }

    /// Adds a function at `dev.func` on the root bus (`parent` = `None`) or behind the bridge
    /// that an earlier `add` returned; returns its handle.
    pub(crate) fn add(&mut self, parent: Option<usize>, dev: u8, func: u8, f: FakeFn) -> usize {
        self.slots.push(Slot {
            parent,
            dev,
            func,
            f,
        });
        self.slots.len() - 1
    }

    /// Sets a register behind the write masks' back.
    pub(crate) fn set(&mut self, handle: usize, offset: u16, value: u32) {
        self.slots[handle].f.regs[(offset / 4) as usize] = value;
    }

    fn bus_range(&self, i: usize) -> (u8, u8) {
        let v = self.slots[i].f.regs[(regs::BRIDGE_BUSES / 4) as usize];
        ((v >> 8) as u8, (v >> 16) as u8)
    }

    /// Whether bridge `i` and all its ancestors pass configuration requests for `bus` down.
    fn forwards(&self, i: usize, bus: u8) -> bool {
        let (sec, sub) = self.bus_range(i);
        let here = sec != 0 && sec <= bus && bus <= sub;
        here && self.slots[i].parent.is_none_or(|p| self.forwards(p, bus))
    }

    fn bus_of(&self, i: usize) -> Option<u8> {
        match self.slots[i].parent {
            None => Some(0),
            Some(p) => {
                let sec = self.bus_range(p).0;
                let parent_bus = self.bus_of(p)?;
                (sec > parent_bus && self.forwards(p, sec)).then_some(sec)
            }
        }
    }

    fn find(&self, bdf: Bdf) -> Option<usize> {
        (0..self.slots.len()).find(|&i| {
            let s = &self.slots[i];
            s.dev == bdf.dev && s.func == bdf.func && self.bus_of(i) == Some(bdf.bus)
        })
    }

    /// QEMU `virt` with four virtio devices on pcie.0: the gpex host bridge function at 00:00.0,
    /// then net, blk, blk, net in slots 1-4 (Root Complex Integrated Endpoints, INTA, a legacy
    /// I/O BAR, an MSI-X BAR and a 64-bit prefetchable BAR for the modern interface).
    pub(crate) fn qemu_flat() -> FakeConfigSpace {
        let mut f = FakeConfigSpace::new();
        f.add(
            None,
            0,
            0,
            FakeFn::endpoint(0x1b36, 0x0008).class(0x06_00_00),
        );
        for (slot, (device, class)) in [
            (0x1041, 0x02_00_00),
            (0x1042, 0x01_00_00),
            (0x1042, 0x01_00_00),
            (0x1041, 0x02_00_00),
        ]
        .into_iter()
        .enumerate()
        {
            f.add(None, slot as u8 + 1, 0, virtio(device, class));
        }
        f
    }

    /// Two root ports on the root bus. Behind 00:01.0, a switch (upstream port 01:00.0,
    /// downstream ports 02:00.0 and 02:01.0) with an endpoint below each downstream port; behind
    /// 00:02.0, one endpoint. `acs` puts full ACS on the root ports and downstream ports.
    pub(crate) fn switch_topology(acs: bool) -> FakeConfigSpace {
        let port = |t: PortType| {
            let f = FakeFn::bridge(Some(t));
            if acs && t != PortType::UpstreamPort {
                f.full_acs()
            } else {
                f
            }
        };
        let mut f = FakeConfigSpace::new();
        let rp = f.add(None, 1, 0, port(PortType::RootPort));
        let up = f.add(Some(rp), 0, 0, port(PortType::UpstreamPort));
        let dp0 = f.add(Some(up), 0, 0, port(PortType::DownstreamPort));
        f.add(
            Some(dp0),
            0,
            0,
            FakeFn::endpoint(0x8086, 0x10d3)
                .pcie(PortType::Endpoint)
                .bar32(0, 0x4000, false)
                .bar64(2, 0x10_0000, true)
                .pin(1),
        );
        let dp1 = f.add(Some(up), 1, 0, port(PortType::DownstreamPort));
        f.add(
            Some(dp1),
            0,
            0,
            FakeFn::endpoint(0x8086, 0x10d3)
                .pcie(PortType::Endpoint)
                .bar32(0, 0x1000, false)
                .bar_io(2, 0x20)
                .pin(1),
        );
        let rp2 = f.add(None, 2, 0, port(PortType::RootPort));
        f.add(
            Some(rp2),
            0,
            0,
            FakeFn::endpoint(0x1af4, 0x1042)
                .pcie(PortType::Endpoint)
                .bar64(4, 0x20_0000, true)
                .pin(1),
        );
        f
    }

    /// 00:01.0 an integrated endpoint; 00:02.0 a PCIe-to-PCI bridge with two conventional PCI
    /// devices, 01:01.0 and 01:02.0, behind it.
    pub(crate) fn pci_bridge_topology() -> FakeConfigSpace {
        let mut f = FakeConfigSpace::new();
        f.add(None, 1, 0, virtio(0x1042, 0x01_00_00));
        let br = f.add(None, 2, 0, FakeFn::bridge(Some(PortType::PcieToPciBridge)));
        f.add(
            Some(br),
            1,
            0,
            FakeFn::endpoint(0x10ec, 0x8139).bar_io(0, 0x100).pin(1),
        );
        f.add(
            Some(br),
            2,
            0,
            FakeFn::endpoint(0x10ec, 0x8139)
                .bar32(1, 0x100, false)
                .pin(1),
        );
        f
    }

    /// A two-function PCIe endpoint at 00:01.{0,1} (with full ACS on both if `acs`) and a
    /// single-function endpoint at 00:02.0.
    pub(crate) fn multifunction(acs: bool) -> FakeConfigSpace {
        let func = || {
            let f = FakeFn::endpoint(0x8086, 0x1521)
                .multifunction()
                .pcie(PortType::Endpoint)
                .bar32(0, 0x2_0000, false)
                .pin(1);
            if acs {
                f.full_acs()
            } else {
                f
            }
        };
        let mut f = FakeConfigSpace::new();
        f.add(None, 1, 0, func());
        f.add(None, 1, 1, func());
        f.add(None, 2, 0, virtio(0x1041, 0x02_00_00));
        f
    }
}

fn virtio(device: u16, class: u32) -> FakeFn {
    FakeFn::endpoint(0x1af4, device)
        .class(class)
        .pcie(PortType::RcIntegratedEndpoint)
        .msix()
        .bar_io(0, 0x80)
        .bar32(1, 0x1000, false)
        .bar64(4, 0x4000, true)
        .pin(1)
}

impl FakeConfigSpace {
    /// A virtio function's `device_feature_select` as the probe left it.
    pub(crate) fn virtio_select(&self, bdf: Bdf) -> Option<u32> {
        self.slots[self.find(bdf)?].f.virtio.map(|v| v.select)
    }

    /// The virtio function whose BAR 4 (as programmed, decoding memory) holds `pa`, and the
    /// offset there. Bus addresses are CPU addresses, as in [`qemu_host_bridge`]'s 32-bit window.
    fn virtio_at(&mut self, pa: u64) -> Option<(&mut FakeVirtio, u64)> {
        self.slots.iter_mut().find_map(|s| {
            let f = &mut s.f;
            let bar = u64::from(f.regs[8] & !0xf) | u64::from(f.regs[9]) << 32;
            let on = f.regs[1] & command::MEMORY != 0;
            let off = pa.checked_sub(bar).filter(|&o| on && o < 0x38)?;
            f.virtio.as_mut().map(|v| (v, off))
        })
    }
}

impl super::virtio::BarMmio for FakeConfigSpace {
    fn read32(&mut self, pa: u64) -> u32 {
        match self.virtio_at(pa) {
            Some((v, 0)) => v.select,
            Some((v, 4)) => match v.select {
                0 => v.features as u32,
                1 => (v.features >> 32) as u32,
                _ => 0,
            },
            _ => u32::MAX,
        }
    }

    fn write32(&mut self, pa: u64, value: u32) {
        if let Some((v, 0)) = self.virtio_at(pa) {
            v.select = value;
        }
    }
}

impl ConfigSpace for FakeConfigSpace {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        match self.find(bdf) {
            Some(i) => self.slots[i].f.regs[(offset / 4) as usize % DWORDS],
            None => u32::MAX,
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        let Some(i) = self.find(bdf) else {
            return;
        };
        let r = (offset / 4) as usize % DWORDS;
        let f = &mut self.slots[i].f;
        let mut new = (f.regs[r] & !f.masks[r]) | (value & f.masks[r]);
        if offset == regs::COMMAND {
            // Status is RW1C: ones written clear, zeros leave alone.
            new &= !(value & 0xffff_0000);
        }
        f.regs[r] = new;
        let is_bar = (regs::BAR0..regs::BAR0 + 24).contains(&offset);
        if is_bar && value == u32::MAX && f.regs[1] & (command::IO | command::MEMORY) != 0 {
            self.decode_seen_with_all_ones = true;
        }
    }
}

//! Depth-first enumeration of the hierarchy below the host bridge: find every function, number
//! bridges' buses, size BARs, read the capabilities that matter for assignment.
//!
//! Follows what Linux's `pci_scan_child_bus` / `pci_scan_bridge` / `__pci_read_base` do on a
//! machine where firmware configured nothing, minus the legacy corners (CardBus, ROM BARs,
//! quirks).

use alloc::vec::Vec;

use super::host::{InterruptMap, IntxPin, IntxRoute};
use super::regs::{self, acs, bar, cap_id, command, ext_cap_id};
use super::{Bdf, ConfigSpace, PciError};
use crate::platform::MemRange;

/// The layout of a function's configuration header (Header Type bits 6:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// Type 0: an endpoint, six BARs.
    Endpoint,
    /// Type 1: a PCI-to-PCI bridge (root port, switch port, PCIe-to-PCI bridge), two BARs.
    Bridge,
    /// Anything else (type 2 is CardBus); scanned but not configured.
    Other(u8),
}

/// Device/Port Type of the PCI Express Capabilities register (PCIe Base spec 7.5.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortType {
    /// 0b0000: PCI Express Endpoint.
    Endpoint,
    /// 0b0001: Legacy PCI Express Endpoint.
    LegacyEndpoint,
    /// 0b0100: Root Port of a Root Complex.
    RootPort,
    /// 0b0101: Upstream Port of a switch.
    UpstreamPort,
    /// 0b0110: Downstream Port of a switch.
    DownstreamPort,
    /// 0b0111: PCI Express to PCI/PCI-X bridge.
    PcieToPciBridge,
    /// 0b1000: PCI/PCI-X to PCI Express bridge.
    PciToPcieBridge,
    /// 0b1001: Root Complex Integrated Endpoint.
    RcIntegratedEndpoint,
    /// 0b1010: Root Complex Event Collector.
    RcEventCollector,
    /// A reserved encoding.
    Reserved(u8),
}

impl PortType {
    /// Decodes the 4-bit field.
    pub const fn from_bits(bits: u8) -> PortType {
        match bits & 0xf {
            0 => PortType::Endpoint,
            1 => PortType::LegacyEndpoint,
            4 => PortType::RootPort,
            5 => PortType::UpstreamPort,
            6 => PortType::DownstreamPort,
            7 => PortType::PcieToPciBridge,
            8 => PortType::PciToPcieBridge,
            9 => PortType::RcIntegratedEndpoint,
            10 => PortType::RcEventCollector,
            other => PortType::Reserved(other),
        }
    }
}

/// The PCI Express capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieInfo {
    /// Offset of the capability in configuration space.
    pub offset: u8,
    /// What kind of PCIe function this is.
    pub port_type: PortType,
}

/// The ACS extended capability (PCIe Base spec 7.7.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcsInfo {
    /// Offset of the capability in configuration space.
    pub offset: u16,
    /// ACS Capability register: what the function implements.
    pub capability: u16,
    /// ACS Control register: what is enabled.
    pub control: u16,
}

impl AcsInfo {
    /// Whether every ACS feature of `flags` is in effect, as Linux's `pci_acs_flags_enabled`
    /// decides it: a feature the function does not implement counts as enabled ("capabilities
    /// are either required or only required if controllable", so an absent one is hard-wired
    /// on), except Egress Control, which must really be there.
    pub const fn enabled(&self, flags: u16) -> bool {
        let needed = flags & (self.capability | acs::EC);
        self.control & needed == needed
    }
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// Memory below 4 GiB (type 00).
    Mem32,
    /// Memory anywhere (type 10); takes two BAR slots.
    Mem64,
}

/// Where a BAR was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarAddr {
    /// The PCI bus address written to the BAR.
    pub pci: u64,
    /// Where the CPU (and a VM's stage-2) reaches it.
    pub cpu: u64,
}

/// One implemented Base Address Register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR index (0-5); a 64-bit BAR also uses `index + 1`.
    pub index: u8,
    /// I/O, 32-bit or 64-bit memory.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Size in bytes, a power of two.
    pub size: u64,
    /// Placement, once [`super::assign_resources`] has run.
    pub addr: Option<BarAddr>,
}

/// Type 1 header state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeInfo {
    /// The bus the bridge sits on.
    pub primary: u8,
    /// The bus directly behind it.
    pub secondary: u8,
    /// The highest bus behind it.
    pub subordinate: u8,
    /// I/O Base reports 32-bit I/O addressing.
    pub io32: bool,
    /// Prefetchable Memory Base reports 64-bit addressing.
    pub pref64: bool,
    /// The I/O window (PCI addresses), once assigned.
    pub io: Option<MemRange>,
    /// The non-prefetchable memory window, once assigned.
    pub mem: Option<MemRange>,
    /// The prefetchable memory window, once assigned.
    pub pref: Option<MemRange>,
}

/// One PCI function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code: base class 23:16, subclass 15:8, programming interface 7:0.
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Header layout.
    pub header_type: HeaderType,
    /// Header Type bit 7 of this function.
    pub multifunction: bool,
    /// The PCI Express capability, absent on conventional PCI functions.
    pub pcie: Option<PcieInfo>,
    /// The ACS extended capability.
    pub acs: Option<AcsInfo>,
    /// Offset of the MSI capability.
    pub msi: Option<u8>,
    /// Offset of the MSI-X capability.
    pub msix: Option<u8>,
    /// The legacy interrupt pin it uses.
    pub interrupt_pin: Option<IntxPin>,
    /// Implemented BARs, by index.
    pub bars: Vec<Bar>,
    /// Bus numbers and windows, for a Type 1 function.
    pub bridge: Option<BridgeInfo>,
    /// The bridge whose secondary bus this function is on (Linux `bus->self`); `None` on the
    /// root bus.
    pub parent: Option<Bdf>,
    /// For a virtio function, whether its DMA goes through the IOMMU
    /// ([`super::virtio::probe_all`], after resources are assigned).
    pub virtio: Option<super::VirtioDma>,
}

impl PciDevice {
    /// The PCIe Device/Port Type, if it is a PCIe function.
    pub fn port_type(&self) -> Option<PortType> {
        self.pcie.map(|p| p.port_type)
    }
}

/// Everything below one host bridge, in depth-first discovery order (a bridge before what is
/// behind it; bus numbers grow along every path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The host bridge's first bus.
    pub root_bus: u8,
    /// The functions found.
    pub devices: Vec<PciDevice>,
}

impl Topology {
    /// The function at `bdf`.
    pub fn device(&self, bdf: Bdf) -> Option<&PciDevice> {
        self.devices.iter().find(|d| d.bdf == bdf)
    }

    pub(crate) fn index(&self, bdf: Bdf) -> Option<usize> {
        self.devices.iter().position(|d| d.bdf == bdf)
    }

    /// The bridge whose secondary bus is `bus`.
    pub fn bridge_of_bus(&self, bus: u8) -> Option<&PciDevice> {
        self.devices
            .iter()
            .find(|d| d.bridge.is_some_and(|b| b.secondary == bus))
    }

    /// The GIC line that function `bdf`'s INTx pin ends up on: swizzled at each bridge on the
    /// way to the root bus (PCI-to-PCI Bridge spec 9.1; Linux `of_irq_parse_pci` does the same
    /// for bridges without a DT node), then looked up in the host bridge's `interrupt-map`.
    pub fn intx_route(&self, bdf: Bdf, map: &InterruptMap) -> Option<IntxRoute> {
        let (root, pin) = self.intx_at_root(bdf)?;
        map.lookup(root, pin)
    }

    /// Where function `bdf`'s INTx pin reaches the host bridge: the function on the root bus it
    /// goes through (itself, or the bridge above it there) and the pin after swizzling at each
    /// bridge on the way (PCI-to-PCI Bridge spec 9.1). This is the key the host bridge's
    /// `interrupt-map` is looked up with (Linux `of_irq_parse_pci` builds it the same way for
    /// bridges without a DT node: the root-bus ancestor's bus/devfn and the swizzled pin).
    pub fn intx_at_root(&self, bdf: Bdf) -> Option<(Bdf, IntxPin)> {
        let mut dev = self.device(bdf)?;
        let mut pin = dev.interrupt_pin?;
        // Bounded by the number of functions: a parent link can never loop back in a
        // topology built by `enumerate`, but a hand-made one might.
        for _ in 0..=self.devices.len() {
            let Some(parent) = dev.parent else {
                return Some((dev.bdf, pin));
            };
            pin = pin.swizzle(dev.bdf.dev);
            dev = self.device(parent)?;
        }
        None
    }

    /// The bridges on the path from the root bus to function `bdf`, root-bus first: the
    /// bridges software must go through to reach it (Linux finds `bdf` only by scanning the
    /// secondary bus of each). Empty for a function on the root bus, an unknown one, or a
    /// hand-made topology whose parent links loop or name a function that is not there.
    pub fn bridges_above(&self, bdf: Bdf) -> Vec<&PciDevice> {
        let mut path = Vec::new();
        let Some(mut dev) = self.device(bdf) else {
            return path;
        };
        // Bounded like `intx_at_root`.
        for _ in 0..=self.devices.len() {
            let Some(parent) = dev.parent else {
                path.reverse();
                return path;
            };
            let Some(p) = self.device(parent) else {
                return Vec::new();
            };
            path.push(p);
            dev = p;
        }
        Vec::new()
    }
}

/// One bus being scanned.
struct Frame {
    bus: u8,
    /// Index (in the device list) of the bridge leading here.
    parent: Option<usize>,
    /// Next slot and function to probe.
    slot: u8,
    func: u8,
    /// Function 0 of `slot` is multi-function.
    multi: bool,
    /// Only device 0 can exist on this bus (below a PCIe root or downstream port).
    only_slot0: bool,
}

/// Scans buses `first..=last` depth first and numbers every bridge's secondary and
/// subordinate bus, exactly as Linux's `pci_scan_child_bus_extend` does when firmware left
/// them unset: each bridge gets the next free bus number, its subordinate is opened to `last`
/// while its children are scanned, then closed to the highest bus found below it.
///
/// Walked with an explicit stack: the depth is bounded only by the bus count, too much for
/// recursion on the EL2 stack.
pub fn enumerate<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    first: u8,
    last: u8,
) -> Result<Topology, PciError> {
    let mut devices: Vec<PciDevice> = Vec::new();
    let mut next_bus = u16::from(first) + 1;
    let mut stack = alloc::vec![Frame {
        bus: first,
        parent: None,
        slot: 0,
        func: 0,
        multi: false,
        only_slot0: false,
    }];
    while let Some(top) = stack.last_mut() {
        let slots = if top.only_slot0 { 1 } else { 32 };
        if top.slot >= slots {
            let done = stack.pop().expect("the stack has a top");
            if let Some(bridge) = done.parent {
                let subordinate = (next_bus - 1) as u8;
                let dev = &mut devices[bridge];
                let info = dev.bridge.as_mut().expect("only bridges lead to buses");
                info.subordinate = subordinate;
                write_bus_numbers(cfg, dev.bdf, info.primary, info.secondary, subordinate);
            }
            continue;
        }
        let bdf = Bdf::new(top.bus, top.slot, top.func);
        let parent = top.parent.map(|i| devices[i].bdf);
        let id = cfg.read32(bdf, regs::ID);
        let present = id & 0xffff != 0xffff;
        if present && top.func == 0 {
            top.multi =
                regs::header_type(cfg.read32(bdf, regs::HEADER)) & regs::HEADER_MULTIFUNCTION != 0;
        }
        // Advance before anything can push a child frame. Function 0 absent means the slot is
        // empty (PCIe Base spec 7.5.1.1.9: a multi-function device implements function 0).
        if (top.func == 0 && !(present && top.multi)) || top.func == 7 {
            top.slot += 1;
            top.func = 0;
            top.multi = false;
        } else {
            top.func += 1;
        }
        if !present {
            continue;
        }
        let mut dev = probe(cfg, bdf, id, parent)?;
        // Linux `only_one_child`: a PCIe root or downstream port's link leads to exactly one
        // device, number 0 (PCIe Base spec 7.3.1; without ARI, requests for other device
        // numbers are not forwarded).
        let only_slot0 = matches!(
            dev.port_type(),
            Some(PortType::RootPort | PortType::DownstreamPort)
        );
        if let Some(info) = dev.bridge.as_mut() {
            if next_bus > u16::from(last) {
                return Err(PciError::BusNumbersExhausted {
                    bridge: bdf,
                    first,
                    last,
                });
            }
            info.primary = bdf.bus;
            info.secondary = next_bus as u8;
            // Open the subordinate to the end of the range so that configuration requests for
            // every bus we may still number below reach the secondary side.
            info.subordinate = last;
            write_bus_numbers(cfg, bdf, bdf.bus, info.secondary, last);
            next_bus += 1;
            let frame = Frame {
                bus: info.secondary,
                parent: Some(devices.len()),
                slot: 0,
                func: 0,
                multi: false,
                only_slot0,
            };
            devices.push(dev);
            stack.push(frame);
        } else {
            devices.push(dev);
        }
    }
    Ok(Topology {
        root_bus: first,
        devices,
    })
}

fn write_bus_numbers<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    bdf: Bdf,
    primary: u8,
    secondary: u8,
    subordinate: u8,
) {
    let keep = cfg.read32(bdf, regs::BRIDGE_BUSES) & 0xff00_0000;
    let value =
        keep | u32::from(subordinate) << 16 | u32::from(secondary) << 8 | u32::from(primary);
    cfg.write32(bdf, regs::BRIDGE_BUSES, value);
}

/// Reads everything about one present function.
fn probe<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    bdf: Bdf,
    id: u32,
    parent: Option<Bdf>,
) -> Result<PciDevice, PciError> {
    let class_rev = cfg.read32(bdf, regs::CLASS_REV);
    let header = regs::header_type(cfg.read32(bdf, regs::HEADER));
    let header_type = match header & !regs::HEADER_MULTIFUNCTION {
        regs::HEADER_TYPE_ENDPOINT => HeaderType::Endpoint,
        regs::HEADER_TYPE_BRIDGE => HeaderType::Bridge,
        other => HeaderType::Other(other),
    };
    let bar_count = match header_type {
        HeaderType::Endpoint => 6,
        HeaderType::Bridge => 2,
        HeaderType::Other(_) => 0,
    };
    let caps = capabilities(cfg, bdf);
    let bridge = (header_type == HeaderType::Bridge).then(|| BridgeInfo {
        primary: 0,
        secondary: 0,
        subordinate: 0,
        // Bits 3:0 of the base registers are read-only addressing capability: 1 = 32-bit I/O
        // or 64-bit prefetchable (PCI-to-PCI Bridge spec 3.2.5.6 and 3.2.5.9).
        io32: cfg.read32(bdf, regs::BRIDGE_IO) & 0xf == 1,
        pref64: cfg.read32(bdf, regs::BRIDGE_PREF) & 0xf == 1,
        io: None,
        mem: None,
        pref: None,
    });
    Ok(PciDevice {
        bdf,
        vendor_id: id as u16,
        device_id: (id >> 16) as u16,
        class: class_rev >> 8,
        revision: class_rev as u8,
        header_type,
        multifunction: header & regs::HEADER_MULTIFUNCTION != 0,
        pcie: caps.pcie,
        acs: caps.acs,
        msi: caps.msi,
        msix: caps.msix,
        interrupt_pin: IntxPin::from_register((cfg.read32(bdf, regs::INTERRUPT) >> 8) as u8),
        bars: size_bars(cfg, bdf, bar_count)?,
        bridge,
        parent,
        virtio: None,
    })
}

#[derive(Default)]
struct Caps {
    pcie: Option<PcieInfo>,
    acs: Option<AcsInfo>,
    msi: Option<u8>,
    msix: Option<u8>,
}

/// Walks the conventional list (PCIe Base spec 7.5.1.1.11 / 7.5.2) and, for PCIe functions,
/// the extended list from 0x100 (7.6), each bounded like Linux's walkers.
fn capabilities<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf) -> Caps {
    let mut caps = Caps::default();
    if cfg.read32(bdf, regs::COMMAND) & regs::STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut ptr = (cfg.read32(bdf, regs::CAP_PTR) & 0xfc) as u8;
    for _ in 0..regs::CAP_TTL {
        // Pointers into the header are invalid (Linux `__pci_find_next_cap_ttl`).
        if ptr < 0x40 {
            break;
        }
        let hdr = cfg.read32(bdf, u16::from(ptr));
        match hdr as u8 {
            0xff => break,
            cap_id::PCIE => {
                caps.pcie = Some(PcieInfo {
                    offset: ptr,
                    // PCI Express Capabilities register (cap + 2), bits 7:4.
                    port_type: PortType::from_bits((hdr >> 20) as u8),
                })
            }
            cap_id::MSI => caps.msi = Some(ptr),
            cap_id::MSIX => caps.msix = Some(ptr),
            _ => {}
        }
        ptr = ((hdr >> 8) & 0xfc) as u8;
    }
    // Only PCIe functions have the extended space; conventional ones may alias 0x100 onto
    // their header or return garbage.
    if caps.pcie.is_none() {
        return caps;
    }
    let mut pos = regs::EXT_CAP_START;
    for _ in 0..regs::EXT_CAP_TTL {
        let hdr = cfg.read32(bdf, pos);
        if hdr == 0 || hdr == u32::MAX {
            break;
        }
        if hdr as u16 == ext_cap_id::ACS {
            let regs = cfg.read32(bdf, pos + 4);
            caps.acs = Some(AcsInfo {
                offset: pos,
                capability: regs as u16,
                control: (regs >> 16) as u16,
            });
        }
        pos = ((hdr >> 20) & 0xffc) as u16;
        if pos < regs::EXT_CAP_START {
            break;
        }
    }
    caps
}

/// Sizes each BAR the way PCIe Base spec 7.5.1.2.1 describes (write all ones, read back, the
/// lowest writable address bit is the size, restore), with decoding off meanwhile so the
/// transient all-ones address cannot claim someone else's cycles (Linux `__pci_read_base`).
fn size_bars<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    bdf: Bdf,
    count: u8,
) -> Result<Vec<Bar>, PciError> {
    let mut bars = Vec::new();
    if count == 0 {
        return Ok(bars);
    }
    // Only the Command half: Status bits are RW1C, writing back what we read would clear them.
    let cmd = cfg.read32(bdf, regs::COMMAND) & 0xffff;
    cfg.write32(bdf, regs::COMMAND, cmd & !(command::IO | command::MEMORY));
    let probe = |cfg: &mut C, off: u16| {
        let orig = cfg.read32(bdf, off);
        cfg.write32(bdf, off, u32::MAX);
        let value = cfg.read32(bdf, off);
        cfg.write32(bdf, off, orig);
        value
    };
    let mut i = 0;
    let mut result = Ok(());
    while i < count {
        let off = regs::BAR0 + 4 * u16::from(i);
        let low = probe(cfg, off);
        let index = i;
        i += 1;
        let (kind, mask, prefetchable) = if low & bar::IO_SPACE != 0 {
            // A 16-bit I/O decoder hard-wires the upper half to zero; the lowest set bit
            // still gives the size.
            (BarKind::Io, u64::from(low & bar::IO_ADDR_MASK), false)
        } else if low & bar::MEM_TYPE_MASK == bar::MEM_TYPE_64 {
            if i >= count {
                result = Err(PciError::TruncatedBar64 { bdf, bar: index });
                break;
            }
            let high = probe(cfg, off + 4);
            i += 1;
            let mask = u64::from(high) << 32 | u64::from(low & bar::MEM_ADDR_MASK);
            (BarKind::Mem64, mask, low & bar::PREFETCHABLE != 0)
        } else {
            let mask = u64::from(low & bar::MEM_ADDR_MASK);
            (BarKind::Mem32, mask, low & bar::PREFETCHABLE != 0)
        };
        // Nothing writable: the BAR is not implemented.
        if mask == 0 {
            continue;
        }
        bars.push(Bar {
            index,
            kind,
            prefetchable,
            size: mask & mask.wrapping_neg(),
            addr: None,
        });
    }
    cfg.write32(bdf, regs::COMMAND, cmd);
    result.map(|()| bars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeConfigSpace, FakeFn};

    #[test]
    fn flat_root_bus() {
        let mut f = FakeConfigSpace::qemu_flat();
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        let bdfs: Vec<Bdf> = t.devices.iter().map(|d| d.bdf).collect();
        assert_eq!(
            bdfs,
            vec![
                Bdf::new(0, 0, 0),
                Bdf::new(0, 1, 0),
                Bdf::new(0, 2, 0),
                Bdf::new(0, 3, 0),
                Bdf::new(0, 4, 0)
            ]
        );
        let host = t.device(Bdf::new(0, 0, 0)).unwrap();
        assert_eq!(
            (host.vendor_id, host.device_id, host.class),
            (0x1b36, 0x0008, 0x06_00_00)
        );
        assert!(host.bars.is_empty());
        let blk = t.device(Bdf::new(0, 2, 0)).unwrap();
        assert_eq!((blk.vendor_id, blk.device_id), (0x1af4, 0x1042));
        assert_eq!(blk.class, 0x01_00_00);
        assert_eq!(blk.port_type(), Some(PortType::RcIntegratedEndpoint));
        assert_eq!(blk.msix, Some(0x50));
        assert_eq!(blk.msi, None);
        assert_eq!(blk.acs, None);
        assert_eq!(blk.interrupt_pin, Some(IntxPin::A));
        assert_eq!(blk.parent, None);
        assert_eq!(
            blk.bars,
            vec![
                Bar {
                    index: 0,
                    kind: BarKind::Io,
                    prefetchable: false,
                    size: 0x80,
                    addr: None
                },
                Bar {
                    index: 1,
                    kind: BarKind::Mem32,
                    prefetchable: false,
                    size: 0x1000,
                    addr: None
                },
                Bar {
                    index: 4,
                    kind: BarKind::Mem64,
                    prefetchable: true,
                    size: 0x4000,
                    addr: None
                },
            ]
        );
    }

    #[test]
    fn sizing_restores_bars_and_command() {
        let mut f = FakeConfigSpace::new();
        let d = f.add(
            None,
            1,
            0,
            FakeFn::endpoint(0x1234, 0x5678)
                .bar32(0, 0x10_0000, false)
                .bar64(2, 0x2_0000_0000, true)
                .bar_io(5, 0x100),
        );
        f.set(d, regs::BAR0, 0xfe00_0000);
        f.set(d, regs::BAR0 + 8, 0x0000_000c);
        f.set(d, regs::BAR0 + 12, 0x4);
        f.set(d, regs::COMMAND, 0x0010_0006);
        let t = enumerate(&mut f, 0, 0).unwrap();
        let dev = &t.devices[0];
        assert_eq!(dev.bars.len(), 3);
        assert_eq!(
            (dev.bars[0].kind, dev.bars[0].size),
            (BarKind::Mem32, 0x10_0000)
        );
        assert_eq!(
            (
                dev.bars[1].index,
                dev.bars[1].kind,
                dev.bars[1].size,
                dev.bars[1].prefetchable
            ),
            (2, BarKind::Mem64, 0x2_0000_0000, true)
        );
        assert_eq!(
            (dev.bars[2].index, dev.bars[2].kind, dev.bars[2].size),
            (5, BarKind::Io, 0x100)
        );
        let b = Bdf::new(0, 1, 0);
        assert_eq!(f.read32(b, regs::BAR0), 0xfe00_0000);
        assert_eq!(f.read32(b, regs::BAR0 + 8), 0x0000_000c);
        assert_eq!(f.read32(b, regs::BAR0 + 12), 0x4);
        // Command restored; the RW1C status bit survived because we never wrote ones there.
        assert_eq!(f.read32(b, regs::COMMAND), 0x0010_0006);
        // Decoding was off whenever a BAR held all ones.
        assert!(!f.decode_seen_with_all_ones);
    }

    #[test]
    fn truncated_64bit_bar() {
        let mut f = FakeConfigSpace::new();
        f.add(None, 0, 0, FakeFn::endpoint(1, 2).bar64(5, 0x1000, false));
        assert_eq!(
            enumerate(&mut f, 0, 0),
            Err(PciError::TruncatedBar64 {
                bdf: Bdf::new(0, 0, 0),
                bar: 5
            })
        );
    }

    #[test]
    fn multifunction_scans_all_functions_only_when_flagged() {
        let mut f = FakeConfigSpace::new();
        f.add(None, 3, 0, FakeFn::endpoint(1, 1).multifunction());
        f.add(None, 3, 2, FakeFn::endpoint(1, 2).multifunction());
        // Single-function device: a function 1 would be a phantom and is not scanned.
        f.add(None, 4, 0, FakeFn::endpoint(1, 3));
        f.add(None, 4, 1, FakeFn::endpoint(1, 4));
        // No function 0: the slot is empty.
        f.add(None, 5, 1, FakeFn::endpoint(1, 5));
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        let bdfs: Vec<Bdf> = t.devices.iter().map(|d| d.bdf).collect();
        assert_eq!(
            bdfs,
            vec![Bdf::new(0, 3, 0), Bdf::new(0, 3, 2), Bdf::new(0, 4, 0)]
        );
        assert!(t.devices[1].multifunction);
    }

    #[test]
    fn bridges_get_bus_numbers_depth_first() {
        let mut f = FakeConfigSpace::switch_topology(false);
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        /// (function, its (primary, secondary, subordinate) if a bridge, its parent).
        type Row = (Bdf, Option<(u8, u8, u8)>, Option<Bdf>);
        let summary: Vec<Row> = t
            .devices
            .iter()
            .map(|d| {
                (
                    d.bdf,
                    d.bridge.map(|b| (b.primary, b.secondary, b.subordinate)),
                    d.parent,
                )
            })
            .collect();
        let b = Bdf::new;
        assert_eq!(
            summary,
            vec![
                (b(0, 1, 0), Some((0, 1, 4)), None),
                (b(1, 0, 0), Some((1, 2, 4)), Some(b(0, 1, 0))),
                (b(2, 0, 0), Some((2, 3, 3)), Some(b(1, 0, 0))),
                (b(3, 0, 0), None, Some(b(2, 0, 0))),
                (b(2, 1, 0), Some((2, 4, 4)), Some(b(1, 0, 0))),
                (b(4, 0, 0), None, Some(b(2, 1, 0))),
                (b(0, 2, 0), Some((0, 5, 5)), None),
                (b(5, 0, 0), None, Some(b(0, 2, 0))),
            ]
        );
        // The registers hold the final numbers.
        assert_eq!(
            f.read32(b(0, 1, 0), regs::BRIDGE_BUSES) & 0xff_ffff,
            0x04_01_00
        );
        assert_eq!(
            f.read32(b(1, 0, 0), regs::BRIDGE_BUSES) & 0xff_ffff,
            0x04_02_01
        );
        assert_eq!(
            f.read32(b(0, 2, 0), regs::BRIDGE_BUSES) & 0xff_ffff,
            0x05_05_00
        );
        let rp = t.device(b(0, 1, 0)).unwrap();
        assert_eq!(rp.port_type(), Some(PortType::RootPort));
        assert!(rp.bridge.unwrap().pref64);
        assert_eq!(t.bridge_of_bus(3).unwrap().bdf, b(2, 0, 0));
    }

    #[test]
    fn root_port_secondary_bus_has_only_device_0() {
        let mut f = FakeConfigSpace::new();
        let rp = f.add(None, 1, 0, FakeFn::root_port());
        f.add(Some(rp), 0, 0, FakeFn::endpoint(1, 1));
        // Below a root port a device 1 cannot exist; a fake that answers for it anyway must
        // not be scanned.
        f.add(Some(rp), 1, 0, FakeFn::endpoint(1, 2));
        let t = enumerate(&mut f, 0, 0xff).unwrap();
        assert_eq!(t.devices.len(), 2);
    }

    #[test]
    fn bus_numbers_run_out() {
        let mut f = FakeConfigSpace::switch_topology(false);
        assert_eq!(
            enumerate(&mut f, 0, 3),
            Err(PciError::BusNumbersExhausted {
                bridge: Bdf::new(2, 1, 0),
                first: 0,
                last: 3
            })
        );
    }

    #[test]
    fn acs_and_capabilities() {
        let mut f = FakeConfigSpace::new();
        f.add(
            None,
            0,
            0,
            FakeFn::endpoint(1, 1)
                .multifunction()
                .acs(acs::SV | acs::RR | acs::CR | acs::UF, acs::SV | acs::RR)
                .msi(),
        );
        let t = enumerate(&mut f, 0, 0).unwrap();
        let d = &t.devices[0];
        let a = d.acs.unwrap();
        assert_eq!(a.offset, 0x100);
        assert!(a.enabled(acs::SV | acs::RR));
        assert!(!a.enabled(acs::SV | acs::CR));
        // Not implemented counts as enabled, except Egress Control.
        assert!(a.enabled(acs::TB));
        assert!(!a.enabled(acs::EC));
        assert!(d.msi.is_some());
        assert_eq!(d.port_type(), Some(PortType::Endpoint));
    }

    #[test]
    fn capability_loops_are_bounded() {
        let mut f = FakeConfigSpace::new();
        let d = f.add(None, 0, 0, FakeFn::endpoint(1, 1).pcie(PortType::Endpoint));
        // The PCIe capability points at itself; the extended list at itself too.
        let pcie = f.read32(Bdf::new(0, 0, 0), regs::CAP_PTR) as u16 & 0xfc;
        let hdr = f.read32(Bdf::new(0, 0, 0), pcie);
        f.set(d, pcie, (hdr & !0xff00) | u32::from(pcie) << 8);
        f.set(d, 0x100, 0x1001_0001);
        let t = enumerate(&mut f, 0, 0).unwrap();
        assert!(t.devices[0].pcie.is_some());
    }

    #[test]
    fn bridges_above_a_function_root_bus_first() {
        let t = enumerate(&mut FakeConfigSpace::switch_topology(true), 0, 0xff).unwrap();
        let path = |bdf| {
            t.bridges_above(bdf)
                .iter()
                .map(|d| d.bdf)
                .collect::<Vec<_>>()
        };
        let b = Bdf::new;
        assert_eq!(path(b(3, 0, 0)), [b(0, 1, 0), b(1, 0, 0), b(2, 0, 0)]);
        assert_eq!(path(b(4, 0, 0)), [b(0, 1, 0), b(1, 0, 0), b(2, 1, 0)]);
        assert_eq!(path(b(5, 0, 0)), [b(0, 2, 0)]);
        assert_eq!(path(b(1, 0, 0)), [b(0, 1, 0)]);
        assert!(path(b(0, 1, 0)).is_empty());
        assert!(path(b(9, 0, 0)).is_empty());
        // A hand-made loop ends the walk with nothing rather than spinning.
        let mut looped = t.clone();
        looped.devices[0].parent = Some(b(3, 0, 0));
        assert!(looped.bridges_above(b(3, 0, 0)).is_empty());
        assert_eq!(t.intx_at_root(b(4, 0, 0)), Some((b(0, 1, 0), IntxPin::B)));
    }
}

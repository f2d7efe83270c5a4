//! The host bridge as its `pci-host-ecam-generic` DT node describes it (Linux
//! `Documentation/devicetree/bindings/pci/host-generic-pci.yaml`, the generic PCI bus binding
//! `pci-bus-common.yaml`, and `pci-iommu.yaml` for `iommu-map`).

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;

use super::{Bdf, PciError};
use crate::platform::tree::Tree;
use crate::platform::{
    bad, cells, compatibles, missing, prop_u32, reg, with_fdt, MemRange, PlatformError,
};

/// The address space a `ranges` entry maps, from bits 25:24 (`ss`) of its first PCI address
/// cell (IEEE 1275 PCI bus binding 2.2.1.1: `phys.hi = npt000ss bbbbbbbb dddddfff rrrrrrrr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciSpace {
    /// `ss = 00`: configuration space (never in `ranges` of an ECAM bridge).
    Config,
    /// `ss = 01`: I/O space.
    Io,
    /// `ss = 10`: 32-bit memory space.
    Mem32,
    /// `ss = 11`: 64-bit memory space.
    Mem64,
}

/// One `ranges` entry: a window of PCI bus addresses and where the CPU sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindow {
    /// Which PCI address space.
    pub space: PciSpace,
    /// The `p` bit (30) of `phys.hi`: the window may hold prefetchable BARs only.
    pub prefetchable: bool,
    /// First PCI bus address.
    pub pci_base: u64,
    /// CPU physical address of `pci_base`.
    pub cpu_base: u64,
    /// Size in bytes.
    pub size: u64,
}

impl PciWindow {
    /// One past the window's last PCI address.
    pub const fn pci_end(&self) -> u64 {
        // Saturating: `from_dtb` rejects wrapping windows, but the fields are public.
        self.pci_base.saturating_add(self.size)
    }

    /// The CPU physical address of PCI address `pci`, if the window holds it.
    pub fn to_cpu(&self, pci: u64) -> Option<u64> {
        (self.pci_base..self.pci_end())
            .contains(&pci)
            .then(|| self.cpu_base.checked_add(pci - self.pci_base))
            .flatten()
    }
}

/// One `iommu-map` entry: Requester IDs `rid_base..rid_base+length` become StreamIDs
/// `sid_base..` on the IOMMU with phandle `iommu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuMapEntry {
    /// First Requester ID covered.
    pub rid_base: u32,
    /// Phandle of the IOMMU (the SMMUv3 node).
    pub iommu: u32,
    /// StreamID of `rid_base`.
    pub sid_base: u32,
    /// Number of Requester IDs covered.
    pub length: u32,
}

/// One `msi-map` entry: Requester IDs `rid_base..rid_base+len` become DeviceIDs
/// `devid_base..` at the ITS with phandle `its_phandle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMapEntry {
    /// First Requester ID covered.
    pub rid_base: u32,
    /// Phandle of the MSI controller (the `arm,gic-v3-its` node).
    pub its_phandle: u32,
    /// DeviceID of `rid_base`.
    pub devid_base: u32,
    /// Number of Requester IDs covered.
    pub len: u32,
}

/// A legacy interrupt pin (PCIe Base spec 7.5.1.1.12, Interrupt Pin register).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IntxPin {
    /// INTA#.
    A,
    /// INTB#.
    B,
    /// INTC#.
    C,
    /// INTD#.
    D,
}

impl IntxPin {
    /// Decodes the Interrupt Pin register: 1-4 are INTA-INTD, 0 is "no pin".
    pub const fn from_register(value: u8) -> Option<IntxPin> {
        match value {
            1 => Some(IntxPin::A),
            2 => Some(IntxPin::B),
            3 => Some(IntxPin::C),
            4 => Some(IntxPin::D),
            _ => None,
        }
    }

    /// The register (and `interrupt-map`) encoding, 1-4.
    pub const fn number(self) -> u32 {
        self as u32 + 1
    }

    /// The pin this one becomes on the primary side of a bridge when it comes from device
    /// `dev` on the secondary side: the "swizzle" of the PCI-to-PCI Bridge spec 9.1 (Linux
    /// `pci_swizzle_interrupt_pin`), which PCIe keeps for virtual INTx (PCIe Base spec 2.2.8.1).
    pub const fn swizzle(self, dev: u8) -> IntxPin {
        match (self as u8 + dev) % 4 {
            0 => IntxPin::A,
            1 => IntxPin::B,
            2 => IntxPin::C,
            _ => IntxPin::D,
        }
    }
}

/// Where an INTx line lands on the GIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IntxRoute {
    /// Phandle of the interrupt controller.
    pub parent: u32,
    /// The SPI number as the DT writes it (INTID - 32).
    pub spi: u32,
    /// The GIC INTID.
    pub intid: u32,
    /// The DT trigger-type cell.
    pub flags: u32,
}

/// One `interrupt-map` entry, child side already reduced to what a PCI unit address holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptMapEntry {
    /// Child unit address (`phys.hi`, `phys.mid`, `phys.lo`).
    pub child: [u32; 3],
    /// Child interrupt specifier: the pin, 1-4.
    pub pin: u32,
    /// Where it goes.
    pub route: IntxRoute,
}

/// `interrupt-map` plus `interrupt-map-mask` of the host bridge (DT spec 2.4.3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterruptMap {
    /// The mask over (unit address, pin); all ones when the DT has none (Linux
    /// `of_irq_parse_raw` uses a dummy all-ones mask then).
    pub mask: [u32; 4],
    /// The entries, in DT order.
    pub entries: Vec<InterruptMapEntry>,
}

impl InterruptMap {
    /// The GIC line that `pin` of function `bdf` raises, `bdf` being on the host bridge's root
    /// bus (callers swizzle through bridges first: see [`super::Topology::intx_route`]).
    pub fn lookup(&self, bdf: Bdf, pin: IntxPin) -> Option<IntxRoute> {
        // A PCI unit address holds bus/dev/func in phys.hi bits 23:8, i.e. the RID shifted by 8.
        let key = [u32::from(bdf.rid()) << 8, 0, 0, pin.number()];
        let masked = |v: [u32; 4]| core::array::from_fn::<u32, 4, _>(|i| v[i] & self.mask[i]);
        let key = masked(key);
        self.entries
            .iter()
            .find(|e| masked([e.child[0], e.child[1], e.child[2], e.pin]) == key)
            .map(|e| e.route)
    }
}

/// The generic ECAM host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBridge {
    /// The ECAM window (`reg`), already cut to the buses it can hold.
    pub ecam: MemRange,
    /// First bus number (`bus-range`, default 0).
    pub bus_start: u8,
    /// Last bus number (`bus-range`, default 255, reduced to what the ECAM window holds).
    pub bus_end: u8,
    /// Every non-empty `ranges` entry, in DT order.
    pub windows: Vec<PciWindow>,
    /// `iommu-map` entries, in DT order; empty when the bridge has no `iommu-map`.
    pub iommu_map: Vec<IommuMapEntry>,
    /// `iommu-map-mask`, applied to a RID before the lookup.
    pub iommu_map_mask: Option<u32>,
    /// `msi-map` entries (`pci-msi.yaml`): Requester IDs onto ITS DeviceIDs, in DT order.
    /// Without an `msi-map`, an `msi-parent` is one identity entry over every RID.
    pub msi_map: Vec<MsiMapEntry>,
    /// `msi-map-mask`, applied to a RID before the lookup.
    pub msi_map_mask: Option<u32>,
    /// `linux,pci-domain`, if the DT fixes one.
    pub domain: Option<u32>,
    /// Legacy interrupt routing.
    pub interrupt_map: InterruptMap,
    /// `dma-coherent`: devices' DMA snoops CPU caches.
    pub dma_coherent: bool,
}

/// The binding of the generic ECAM host bridge (`host-generic-pci.yaml`).
const GENERIC_ECAM: &str = "pci-host-ecam-generic";

/// A PCI host bridge node of the host DT, generic or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeNode {
    /// Its path.
    pub path: String,
    /// Its first `compatible`.
    pub compatible: String,
    /// `linux,pci-domain`.
    pub domain: Option<u32>,
    /// Compatible with `pci-host-ecam-generic`.
    pub generic: bool,
    /// The bridge, if it is a generic ECAM one; else why the hypervisor cannot take it.
    pub bridge: Result<HostBridge, PlatformError>,
}

/// Every enabled PCI host bridge node (`device_type = "pci"` at the top of a PCI hierarchy, or
/// a generic ECAM compatible) in document order: the generic ECAM ones parsed, the others
/// (DesignWare, vendor controllers that need their own drivers) named with their compatible.
pub fn host_bridges(dtb: &[u8]) -> Result<Vec<BridgeNode>, PciError> {
    with_fdt(dtb, |fdt| {
        let Some(tree) = Tree::new(fdt) else {
            return Vec::new();
        };
        let generic = |i: usize| compatibles(tree.nodes[i].node).any(|c| c == GENERIC_ECAM);
        let is_host = |i: usize| {
            i > 0
                && (generic(i)
                    || tree.nodes[i]
                        .node
                        .property("device_type")
                        .is_some_and(|p| p.value.starts_with(b"pci\0")))
        };
        (0..tree.nodes.len())
            // A host bridge's children are PCI devices and bridges, not host bridges.
            .filter(|&i| is_host(i) && tree.enabled(i) && !tree.ancestors(i).skip(1).any(is_host))
            .map(|i| {
                let node = tree.nodes[i].node;
                let path = tree.path(i);
                let bridge = if generic(i) {
                    // `reg` and the CPU side of `ranges` are in the parent bus's space: through
                    // the buses' `ranges` to CPU addresses (a bridge under /soc on most boards).
                    parse(fdt, node).and_then(|mut h| {
                        to_cpu(&tree, i, &mut h).map(|()| h).map_err(|why| {
                            PlatformError::BadProperty {
                                node: path.clone(),
                                property: "reg",
                                reason: why,
                            }
                        })
                    })
                } else {
                    Err(PlatformError::BadProperty {
                        node: path.clone(),
                        property: "compatible",
                        reason: "not a generic ECAM host bridge (pci-host-ecam-generic): it needs a driver of its own",
                    })
                };
                BridgeNode {
                    compatible: compatibles(node).next().unwrap_or("").to_string(),
                    domain: prop_u32(node, "linux,pci-domain"),
                    generic: generic(i),
                    path,
                    bridge,
                }
            })
            .collect()
    })
    .map_err(PciError::from)
}

/// Rewrites the ECAM window and the windows' CPU addresses from the parent bus's space to the
/// CPU's.
fn to_cpu(tree: &Tree, index: usize, h: &mut HostBridge) -> Result<(), &'static str> {
    h.ecam.base = tree.translate(index, h.ecam.base)?;
    for w in &mut h.windows {
        w.cpu_base = tree.translate(index, w.cpu_base)?;
        w.cpu_base
            .checked_add(w.size)
            .ok_or("a window wraps once translated")?;
    }
    Ok(())
}

/// ECAM gives each bus 1 MiB: 32 devices x 8 functions x 4 KiB (PCIe Base spec 7.2.2).
const ECAM_BUS_SHIFT: u32 = 20;

impl HostBridge {
    /// Describes the first enabled `pci-host-ecam-generic` node of the host DT, or `None` if
    /// there is none ([`host_bridges`] lists them all).
    pub fn from_dtb(dtb: &[u8]) -> Result<Option<HostBridge>, PciError> {
        host_bridges(dtb)?
            .into_iter()
            .find(|b| b.generic)
            .map(|b| b.bridge.map_err(PciError::from))
            .transpose()
    }

    /// The I/O window.
    pub fn io_window(&self) -> Option<&PciWindow> {
        self.windows.iter().find(|w| w.space == PciSpace::Io)
    }

    /// The 32-bit memory window, preferring a non-prefetchable one: every memory BAR may live
    /// there, while a prefetchable window may only take prefetchable BARs.
    pub fn mem32_window(&self) -> Option<&PciWindow> {
        let mut mem32 = self.windows.iter().filter(|w| w.space == PciSpace::Mem32);
        mem32
            .clone()
            .find(|w| !w.prefetchable)
            .or_else(|| mem32.next())
    }

    /// The 64-bit memory window. QEMU's `virt` does not mark it prefetchable, but a
    /// prefetchable BAR may always be placed in non-prefetchable space (PCIe Base spec
    /// 7.5.1.2.1), which is also what Linux's `pci_bus_alloc_resource` does with it.
    pub fn mem64_window(&self) -> Option<&PciWindow> {
        self.windows.iter().find(|w| w.space == PciSpace::Mem64)
    }

    /// The StreamID the SMMU sees for Requester ID `rid`, or `None` if the `iommu-map` does
    /// not cover it (Linux `of_map_id`: first entry whose range holds the masked RID wins).
    pub fn stream_id(&self, rid: u16) -> Option<u32> {
        self.translate(rid).map(|(_, sid)| sid)
    }

    /// Which IOMMU (its phandle) translates Requester ID `rid`, and with which StreamID.
    pub fn translate(&self, rid: u16) -> Option<(u32, u32)> {
        let rid = u32::from(rid) & self.iommu_map_mask.unwrap_or(u32::MAX);
        self.iommu_map
            .iter()
            .find(|e| rid >= e.rid_base && rid - e.rid_base < e.length)
            .map(|e| (e.iommu, e.sid_base + (rid - e.rid_base)))
    }

    /// Which ITS (its phandle) an MSI of Requester ID `rid` goes to, with which DeviceID, or
    /// `None` if the `msi-map` does not cover it (Linux `of_map_id`, as [`Self::translate`]).
    pub fn device_id(&self, rid: u16) -> Option<(u32, u32)> {
        let rid = u32::from(rid) & self.msi_map_mask.unwrap_or(u32::MAX);
        self.msi_map
            .iter()
            .find(|e| rid >= e.rid_base && rid - e.rid_base < e.len)
            .map(|e| (e.its_phandle, e.devid_base + (rid - e.rid_base)))
    }

    /// CPU physical address of register `offset` of function `bdf` in the ECAM window, or
    /// `None` if the bus is outside the bridge's range. Buses are numbered from `bus_start`
    /// inside the window (Linux `pci_ecam_map_bus`).
    pub fn ecam_address(&self, bdf: Bdf, offset: u16) -> Option<u64> {
        if bdf.bus < self.bus_start || bdf.bus > self.bus_end || offset >= 4096 {
            return None;
        }
        let bus = u64::from(bdf.bus - self.bus_start);
        let devfn = u64::from(bdf.rid() & 0xff);
        Some(self.ecam.base + (bus << ECAM_BUS_SHIFT) + (devfn << 12) + u64::from(offset))
    }
}

fn parse(fdt: &Fdt, node: FdtNode) -> Result<HostBridge, PlatformError> {
    // Unit addresses (in `ranges` and `interrupt-map`) are 3-cell PCI addresses.
    if prop_u32(node, "#address-cells") != Some(3) {
        return Err(bad(node, "#address-cells", "a PCI bus needs 3"));
    }
    let ecam = reg(node)?
        .first()
        .copied()
        .ok_or_else(|| missing(node, "reg"))?;

    let (bus_start, mut bus_end) = match node.property("bus-range") {
        None => (0u8, 0xffu8),
        Some(p) => {
            let cells = cells(p.value).ok_or_else(|| bad(node, "bus-range", "not two cells"))?;
            match cells[..] {
                [s, e] if s <= e && e <= 0xff => (s as u8, e as u8),
                _ => {
                    return Err(bad(
                        node,
                        "bus-range",
                        "not <start end> with start <= end <= 255",
                    ))
                }
            }
        }
    };
    // An ECAM window smaller than the bus range only reaches its first buses; Linux
    // (`pci_ecam_create`) shrinks the range with a warning, and so do we.
    let fit = ecam.size >> ECAM_BUS_SHIFT;
    if fit == 0 {
        return Err(bad(node, "reg", "ECAM window smaller than one bus (1 MiB)"));
    }
    let wanted = u64::from(bus_end - bus_start) + 1;
    if fit < wanted {
        bus_end = bus_start + (fit - 1) as u8;
    }
    let ecam = MemRange {
        base: ecam.base,
        size: ecam
            .size
            .min((u64::from(bus_end - bus_start) + 1) << ECAM_BUS_SHIFT),
    };

    Ok(HostBridge {
        ecam,
        bus_start,
        bus_end,
        windows: ranges(node)?,
        iommu_map: id_map(fdt, node, "iommu-map", "#iommu-cells")?,
        iommu_map_mask: prop_u32(node, "iommu-map-mask"),
        msi_map: msi_map(fdt, node)?,
        msi_map_mask: prop_u32(node, "msi-map-mask"),
        domain: prop_u32(node, "linux,pci-domain"),
        interrupt_map: interrupt_map(fdt, node)?,
        dma_coherent: node.property("dma-coherent").is_some(),
    })
}

/// A value of one or two cells.
fn join(cells: &[u32]) -> u64 {
    cells.iter().fold(0, |acc, &c| (acc << 32) | u64::from(c))
}

fn ranges(node: FdtNode) -> Result<Vec<PciWindow>, PlatformError> {
    let Some(prop) = node.property("ranges") else {
        return Ok(Vec::new());
    };
    // The PCI side has 3 address cells (checked by `parse`); the CPU side has the parent's,
    // which `reg` (in the parent's address space) reveals; sizes use this node's #size-cells.
    let scells = prop_u32(node, "#size-cells").unwrap_or(2) as usize;
    let pcells = node
        .raw_reg()
        .and_then(|mut r| r.next())
        .map(|r| r.address.len() / 4)
        .ok_or_else(|| missing(node, "reg"))?;
    if !(1..=2).contains(&scells) || !(1..=2).contains(&pcells) {
        return Err(bad(node, "ranges", "unsupported cell sizes"));
    }
    let cells = cells(prop.value).ok_or_else(|| bad(node, "ranges", "not whole cells"))?;
    let stride = 3 + pcells + scells;
    if !cells.len().is_multiple_of(stride) {
        return Err(bad(
            node,
            "ranges",
            "length is not a whole number of entries",
        ));
    }
    let mut windows = Vec::new();
    for e in cells.chunks_exact(stride) {
        let hi = e[0];
        let space = match (hi >> 24) & 0x3 {
            0 => PciSpace::Config,
            1 => PciSpace::Io,
            2 => PciSpace::Mem32,
            _ => PciSpace::Mem64,
        };
        let w = PciWindow {
            space,
            prefetchable: hi & (1 << 30) != 0,
            pci_base: join(&e[1..3]),
            cpu_base: join(&e[3..3 + pcells]),
            size: join(&e[3 + pcells..]),
        };
        if w.size == 0 || space == PciSpace::Config {
            continue;
        }
        if w.pci_base.checked_add(w.size).is_none() || w.cpu_base.checked_add(w.size).is_none() {
            return Err(bad(
                node,
                "ranges",
                "window wraps past the top of the address space",
            ));
        }
        // I/O and 32-bit memory addresses are 32-bit on the bus (PCIe Base spec 7.5.1.2.1).
        if matches!(space, PciSpace::Io | PciSpace::Mem32) && w.pci_end() > 1 << 32 {
            return Err(bad(node, "ranges", "I/O or 32-bit window above 4 GiB"));
        }
        windows.push(w);
    }
    Ok(windows)
}

/// An `iommu-map` or `msi-map` (`pci-iommu.yaml`, `pci-msi.yaml`): <rid-base phandle
/// id-base length>, where id-base is one specifier of the target; the SMMUv3 and GICv3 ITS
/// bindings have #iommu-cells / #msi-cells = 1, the only width accepted.
fn id_map(
    fdt: &Fdt,
    node: FdtNode,
    name: &'static str,
    target_cells: &str,
) -> Result<Vec<IommuMapEntry>, PlatformError> {
    let Some(prop) = node.property(name) else {
        return Ok(Vec::new());
    };
    let cells = cells(prop.value).ok_or_else(|| bad(node, name, "not whole cells"))?;
    if !cells.len().is_multiple_of(4) {
        return Err(bad(node, name, "length is not a whole number of entries"));
    }
    cells
        .chunks_exact(4)
        .map(|e| {
            let iommu = fdt
                .find_phandle(e[1])
                .ok_or_else(|| bad(node, name, "phandle names no node"))?;
            if prop_u32(iommu, target_cells) != Some(1) {
                return Err(bad(
                    node,
                    name,
                    "its target's #iommu-cells / #msi-cells is not 1",
                ));
            }
            if u64::from(e[0]) + u64::from(e[3]) > 1 << 16 || e[2].checked_add(e[3]).is_none() {
                return Err(bad(node, name, "entry reaches past the RID or ID space"));
            }
            Ok(IommuMapEntry {
                rid_base: e[0],
                iommu: e[1],
                sid_base: e[2],
                length: e[3],
            })
        })
        .collect()
}

/// `msi-map`, parsed as `iommu-map` is; or, without one, `msi-parent`: its first cell names
/// the ITS and every RID is its own DeviceID (what Linux does for a bridge with no `msi-map`:
/// `pci_msi_domain_get_msi_rid` keeps the RID; an argument cell, if any, is the bridge's own
/// DeviceID for its own MSIs, which a host bridge never sends).
fn msi_map(fdt: &Fdt, node: FdtNode) -> Result<Vec<MsiMapEntry>, PlatformError> {
    let to_msi = |e: IommuMapEntry| MsiMapEntry {
        rid_base: e.rid_base,
        its_phandle: e.iommu,
        devid_base: e.sid_base,
        len: e.length,
    };
    if node.property("msi-map").is_some() {
        return Ok(id_map(fdt, node, "msi-map", "#msi-cells")?
            .into_iter()
            .map(to_msi)
            .collect());
    }
    let Some(prop) = node.property("msi-parent") else {
        return Ok(Vec::new());
    };
    let cells = cells(prop.value).ok_or_else(|| bad(node, "msi-parent", "not whole cells"))?;
    let (&phandle, args) = cells
        .split_first()
        .ok_or_else(|| bad(node, "msi-parent", "empty"))?;
    let target = fdt
        .find_phandle(phandle)
        .ok_or_else(|| bad(node, "msi-parent", "phandle names no node"))?;
    if args.len() > 1 || prop_u32(target, "#msi-cells").unwrap_or(0) as usize != args.len() {
        return Err(bad(
            node,
            "msi-parent",
            "not one controller with its #msi-cells (0 or 1) arguments",
        ));
    }
    Ok(alloc::vec![MsiMapEntry {
        rid_base: 0,
        its_phandle: phandle,
        devid_base: 0,
        len: 1 << 16,
    }])
}

fn interrupt_map(fdt: &Fdt, node: FdtNode) -> Result<InterruptMap, PlatformError> {
    let mask = match node.property("interrupt-map-mask") {
        None => [u32::MAX; 4],
        Some(p) => {
            let c =
                cells(p.value).ok_or_else(|| bad(node, "interrupt-map-mask", "not whole cells"))?;
            c.try_into().map_err(|_| {
                bad(
                    node,
                    "interrupt-map-mask",
                    "not 4 cells (3 address + 1 pin)",
                )
            })?
        }
    };
    let Some(prop) = node.property("interrupt-map") else {
        return Ok(InterruptMap {
            mask,
            entries: Vec::new(),
        });
    };
    if prop_u32(node, "#interrupt-cells") != Some(1) {
        return Err(bad(
            node,
            "#interrupt-cells",
            "a PCI bridge needs 1 (the pin)",
        ));
    }
    let cells = cells(prop.value).ok_or_else(|| bad(node, "interrupt-map", "not whole cells"))?;
    // Each entry: child unit address (3) | child specifier (1) | parent phandle | parent unit
    // address (parent's #address-cells, 0 when absent, as Linux's `of_irq_parse_raw` reads
    // it) | parent specifier (parent's #interrupt-cells). Entries differ in width when they
    // name different parents, so walk them one at a time.
    let mut entries = Vec::new();
    let mut rest = &cells[..];
    while !rest.is_empty() {
        let short = || bad(node, "interrupt-map", "truncated entry");
        let head = rest.get(..5).ok_or_else(short)?;
        let parent = fdt
            .find_phandle(head[4])
            .ok_or_else(|| bad(node, "interrupt-map", "phandle names no node"))?;
        let pa = prop_u32(parent, "#address-cells").unwrap_or(0) as usize;
        let pi = prop_u32(parent, "#interrupt-cells")
            .ok_or_else(|| bad(node, "interrupt-map", "parent has no #interrupt-cells"))?
            as usize;
        let len = 5 + pa + pi;
        let spec = rest.get(5 + pa..len).ok_or_else(short)?;
        // GICv3 specifier: <type number flags [ppi-partition]>; INTx must be an SPI (type 0).
        let route = match spec {
            [0, spi, flags, ..] if (3..=4).contains(&pi) && *spi < 988 => IntxRoute {
                parent: head[4],
                spi: *spi,
                intid: 32 + spi,
                flags: *flags,
            },
            _ => {
                return Err(bad(
                    node,
                    "interrupt-map",
                    "entry does not target a GIC SPI",
                ))
            }
        };
        entries.push(InterruptMapEntry {
            child: [head[0], head[1], head[2]],
            pin: head[3],
            route,
        });
        rest = &rest[len..];
    }
    Ok(InterruptMap { mask, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3,iommu=smmuv3 -cpu max
    /// -smp 4 -m 4G` plus a virtio-blk-pci and a virtio-net-pci, `dumpdtb` (QEMU 10.0.2).
    pub(crate) const QEMU_SMMU: &[u8] = include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb");
    /// The same machine without `iommu=smmuv3`.
    const QEMU_NO_IOMMU: &[u8] = include_bytes!("../../tests/data/qemu-virt-gicv3.dtb");

    #[test]
    fn qemu_virt_host_bridge() {
        let hb = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
        assert_eq!(
            hb.ecam,
            MemRange {
                base: 0x40_1000_0000,
                size: 0x1000_0000
            }
        );
        assert_eq!((hb.bus_start, hb.bus_end), (0, 0xff));
        assert!(hb.dma_coherent);
        assert_eq!(
            hb.io_window(),
            Some(&PciWindow {
                space: PciSpace::Io,
                prefetchable: false,
                pci_base: 0,
                cpu_base: 0x3eff_0000,
                size: 0x1_0000
            })
        );
        assert_eq!(
            hb.mem32_window(),
            Some(&PciWindow {
                space: PciSpace::Mem32,
                prefetchable: false,
                pci_base: 0x1000_0000,
                cpu_base: 0x1000_0000,
                size: 0x2eff_0000
            })
        );
        assert_eq!(
            hb.mem64_window(),
            Some(&PciWindow {
                space: PciSpace::Mem64,
                prefetchable: false,
                pci_base: 0x80_0000_0000,
                cpu_base: 0x80_0000_0000,
                size: 0x80_0000_0000
            })
        );
        assert_eq!(hb.windows.len(), 3);
        assert_eq!(
            hb.mem64_window().unwrap().to_cpu(0x80_0000_1000),
            Some(0x80_0000_1000)
        );
        assert_eq!(hb.io_window().unwrap().to_cpu(0x10), Some(0x3eff_0010));
        assert_eq!(hb.io_window().unwrap().to_cpu(0x1_0000), None);

        // iommu-map = <0 &smmu 0 0x10000>: StreamID = RID for every RID.
        assert_eq!(hb.iommu_map.len(), 1);
        assert_eq!(hb.iommu_map[0].rid_base, 0);
        assert_eq!(hb.iommu_map[0].sid_base, 0);
        assert_eq!(hb.iommu_map[0].length, 0x1_0000);
        for rid in [0u16, 0x8, 0x10, 0x100, 0x1234, 0xffff] {
            assert_eq!(hb.stream_id(rid), Some(u32::from(rid)));
        }

        // INTA of slot s raises SPI 3 + (s % 4); pin p of slot s raises 3 + (s + p - 1) % 4.
        assert_eq!(hb.interrupt_map.entries.len(), 16);
        for slot in 0..32u8 {
            for (i, pin) in [IntxPin::A, IntxPin::B, IntxPin::C, IntxPin::D]
                .into_iter()
                .enumerate()
            {
                let r = hb.interrupt_map.lookup(Bdf::new(0, slot, 0), pin).unwrap();
                let spi = 3 + (u32::from(slot) + i as u32) % 4;
                assert_eq!((r.spi, r.intid, r.flags), (spi, 32 + spi, 4));
            }
        }
        assert_eq!(
            hb.ecam_address(Bdf::new(1, 2, 3), 0x100),
            Some(0x40_1000_0000 + (1 << 20) + (0x13 << 12) + 0x100)
        );
        assert_eq!(hb.ecam_address(Bdf::new(0, 0, 0), 0x1000), None);
    }

    #[test]
    fn qemu_virt_msi_map_is_the_rid_identity_to_the_its() {
        // msi-map = <0 &its 0 0x10000> (its@8080000 has phandle 0x8006 in this blob).
        let hb = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
        assert_eq!(hb.msi_map.len(), 1);
        let its = hb.msi_map[0].its_phandle;
        assert_eq!(
            hb.msi_map[0],
            MsiMapEntry {
                rid_base: 0,
                its_phandle: its,
                devid_base: 0,
                len: 0x1_0000
            }
        );
        assert_eq!(hb.msi_map_mask, None);
        for rid in [0u16, 0x8, 0x100, 0xffff] {
            assert_eq!(hb.device_id(rid), Some((its, u32::from(rid))));
        }
    }

    /// A bridge with the MSI properties `props` (name, cells) and an ITS of phandle 9 with
    /// `msi_cells`.
    fn msi_bridge(props: &[(&str, &[u32])], msi_cells: u32) -> Vec<u8> {
        let mut w = vm_fdt::FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        let n = w.begin_node("its@8080000").unwrap();
        w.property_u32("#msi-cells", msi_cells).unwrap();
        w.property_phandle(9).unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("pcie@30000000").unwrap();
        w.property_string("compatible", "pci-host-ecam-generic")
            .unwrap();
        w.property_array_u64("reg", &[0x3000_0000, 0x100_0000])
            .unwrap();
        w.property_u32("#address-cells", 3).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        for (name, cells) in props {
            w.property_array_u32(name, cells).unwrap();
        }
        w.end_node(n).unwrap();
        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn msi_map_with_offset_and_mask_and_msi_parent() {
        let hb = HostBridge::from_dtb(&msi_bridge(
            &[
                ("msi-map", &[0x100, 9, 0x4000, 0x100, 0x800, 9, 0, 0x10]),
                ("msi-map-mask", &[0xfff8]),
            ],
            1,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(hb.msi_map.len(), 2);
        assert_eq!(hb.msi_map_mask, Some(0xfff8));
        // 0x10b & 0xfff8 = 0x108: DeviceID 0x4008 (first entry wins).
        assert_eq!(hb.device_id(0x10b), Some((9, 0x4008)));
        assert_eq!(hb.device_id(0x80f), Some((9, 0x8)));
        assert_eq!(hb.device_id(0x810), None);
        assert_eq!(hb.device_id(0xff), None);
        // msi-parent alone: every RID is its own DeviceID at that ITS, with or without the
        // controller's one argument cell.
        for (cells, msi_cells) in [(&[9u32][..], 0), (&[9, 0x7][..], 1)] {
            let hb = HostBridge::from_dtb(&msi_bridge(&[("msi-parent", cells)], msi_cells))
                .unwrap()
                .unwrap();
            assert_eq!(hb.device_id(0x1234), Some((9, 0x1234)));
            assert_eq!(hb.msi_map.len(), 1);
        }
        // msi-map wins over msi-parent.
        let hb = HostBridge::from_dtb(&msi_bridge(
            &[("msi-parent", &[9, 0]), ("msi-map", &[0, 9, 0x100, 0x10])],
            1,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(hb.device_id(0x3), Some((9, 0x103)));
        assert_eq!(hb.device_id(0x13), None);
        // Malformed: clear errors.
        for (props, msi_cells, why) in [
            (
                &[("msi-map", &[0u32, 9, 0][..])][..],
                1,
                "whole number of entries",
            ),
            (
                &[("msi-map", &[0, 8, 0, 0x10][..])][..],
                1,
                "phandle names no node",
            ),
            (
                &[("msi-map", &[0, 9, 0, 0x10][..])][..],
                2,
                "#msi-cells is not 1",
            ),
            (
                &[("msi-map", &[0xff00, 9, 0, 0x200][..])][..],
                1,
                "past the RID",
            ),
            (&[("msi-parent", &[8][..])][..], 0, "phandle names no node"),
            (&[("msi-parent", &[9][..])][..], 1, "#msi-cells"),
        ] {
            let e = HostBridge::from_dtb(&msi_bridge(props, msi_cells)).unwrap_err();
            assert!(alloc::format!("{e}").contains(why), "{e}");
        }
    }

    #[test]
    fn qemu_virt_without_smmu_has_no_iommu_map() {
        let hb = HostBridge::from_dtb(QEMU_NO_IOMMU).unwrap().unwrap();
        assert!(hb.iommu_map.is_empty());
        assert_eq!(hb.stream_id(0x8), None);
        assert_eq!(hb.windows.len(), 3);
    }

    #[test]
    fn malformed_blob_is_an_error() {
        assert!(matches!(
            HostBridge::from_dtb(&QEMU_SMMU[..100]),
            Err(PciError::Dt(PlatformError::Malformed { .. }))
        ));
    }

    /// A synthetic bridge: bus-range 0x10-0x1f on an ECAM window of only 4 buses, an
    /// iommu-map with an offset and a mask, a prefetchable 64-bit window, no interrupt-map.
    fn synth(ranges: &[u32], iommu_cells: u32) -> Vec<u8> {
        let mut w = vm_fdt::FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        let n = w.begin_node("smmu@1000").unwrap();
        w.property_u32("#iommu-cells", iommu_cells).unwrap();
        w.property_phandle(7).unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("pcie@30000000").unwrap();
        w.property_string("compatible", "pci-host-ecam-generic")
            .unwrap();
        w.property_array_u64("reg", &[0x3000_0000, 0x40_0000])
            .unwrap();
        w.property_u32("#address-cells", 3).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_array_u32("bus-range", &[0x10, 0x1f]).unwrap();
        w.property_array_u32("ranges", ranges).unwrap();
        w.property_array_u32(
            "iommu-map",
            &[0x1000, 7, 0x40, 0x800, 0x2000, 7, 0x1000, 0x100],
        )
        .unwrap();
        w.property_u32("iommu-map-mask", 0xfff8).unwrap();
        w.end_node(n).unwrap();
        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    const SYNTH_RANGES: &[u32] = &[
        0x4300_0000,
        0x10,
        0,
        0x10,
        0,
        0x1,
        0, // 64-bit prefetchable
        0x0200_0000,
        0,
        0x4000_0000,
        0,
        0x5000_0000,
        0,
        0x1000_0000, // 32-bit, offset
        0x0000_0000,
        0,
        0,
        0,
        0,
        0,
        0x1000, // config space: ignored
    ];

    #[test]
    fn synthetic_bridge() {
        let hb = HostBridge::from_dtb(&synth(SYNTH_RANGES, 1))
            .unwrap()
            .unwrap();
        assert_eq!((hb.bus_start, hb.bus_end), (0x10, 0x13));
        assert_eq!(hb.ecam.size, 0x40_0000);
        let m64 = hb.mem64_window().unwrap();
        assert!(m64.prefetchable);
        assert_eq!(
            (m64.pci_base, m64.cpu_base, m64.size),
            (0x10_0000_0000, 0x10_0000_0000, 1 << 32)
        );
        let m32 = hb.mem32_window().unwrap();
        assert_eq!(m32.to_cpu(0x4000_1000), Some(0x5000_1000));
        assert_eq!(hb.io_window(), None);
        assert_eq!(hb.windows.len(), 2);
        // The mask drops the function number before the lookup.
        assert_eq!(hb.stream_id(0x1000), Some(0x40));
        assert_eq!(hb.stream_id(0x1017), Some(0x50));
        assert_eq!(hb.stream_id(0x2008), Some(0x1008));
        assert_eq!(hb.stream_id(0x0800), None);
        assert_eq!(hb.stream_id(0x1800), None);
        assert_eq!(hb.ecam_address(Bdf::new(0x11, 0, 0), 0), Some(0x3010_0000));
        assert_eq!(hb.ecam_address(Bdf::new(0x14, 0, 0), 0), None);
        assert_eq!(hb.ecam_address(Bdf::new(0x0f, 0, 0), 0), None);
        assert!(hb.interrupt_map.entries.is_empty());
    }

    #[test]
    fn synthetic_errors() {
        let err = |dtb: Vec<u8>| HostBridge::from_dtb(&dtb).unwrap_err();
        assert!(err(synth(SYNTH_RANGES, 2))
            .to_string()
            .contains("#iommu-cells"));
        assert!(err(synth(&SYNTH_RANGES[..6], 1))
            .to_string()
            .contains("ranges"));
        // A 32-bit window reaching past 4 GiB.
        let high32 = [0x0200_0000, 0, 0xf000_0000, 0, 0xf000_0000, 0, 0x2000_0000];
        assert!(err(synth(&high32, 1)).to_string().contains("4 GiB"));
    }

    #[test]
    fn corrupted_blobs_never_panic() {
        let base = synth(SYNTH_RANGES, 1);
        for i in 0..base.len() {
            for v in [0x00, 0x01, 0x03, 0x7f, 0xff] {
                let mut dtb = base.clone();
                dtb[i] = v;
                let _ = HostBridge::from_dtb(&dtb);
            }
        }
        for len in 0..base.len() {
            let _ = HostBridge::from_dtb(&base[..len]);
        }
        // The QEMU blob exercises interrupt-map and phandle lookups: flip each byte of the
        // host bridge node (its properties follow its name in the structure block).
        let name = b"pcie@10000000\0";
        let start = QEMU_SMMU
            .windows(name.len())
            .position(|w| w == name)
            .unwrap();
        for i in start..(start + 1600).min(QEMU_SMMU.len()) {
            let mut dtb = QEMU_SMMU.to_vec();
            dtb[i] ^= 0xff;
            let _ = HostBridge::from_dtb(&dtb);
        }
    }

    #[test]
    fn no_host_bridge() {
        let mut w = vm_fdt::FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.end_node(root).unwrap();
        assert_eq!(HostBridge::from_dtb(&w.finish().unwrap()), Ok(None));
    }

    #[test]
    fn swizzle() {
        // PCI-to-PCI Bridge spec table 9-1: device 1's INTA becomes INTB upstream.
        assert_eq!(IntxPin::A.swizzle(0), IntxPin::A);
        assert_eq!(IntxPin::A.swizzle(1), IntxPin::B);
        assert_eq!(IntxPin::D.swizzle(1), IntxPin::A);
        assert_eq!(IntxPin::C.swizzle(6), IntxPin::A);
        assert_eq!(IntxPin::from_register(0), None);
        assert_eq!(IntxPin::from_register(4), Some(IntxPin::D));
    }
}

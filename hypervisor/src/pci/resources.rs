//! BAR and bridge window assignment from the host bridge's windows.
//!
//! No firmware runs before us on QEMU, so every BAR is unassigned. The scheme is Linux's
//! `pbus_size_mem` / `__pci_bus_assign_resources` reduced to what a fixed topology needs:
//!
//! - three resource classes: I/O; 32-bit memory; and 64-bit prefetchable memory, which goes
//!   into the host bridge's 64-bit window when there is one (and every bridge on the way has a
//!   64-bit prefetchable window), else into 32-bit memory (a prefetchable BAR may always live in
//!   non-prefetchable space, PCIe Base spec 7.5.1.2.1);
//! - bottom-up, each bridge's window for a class is sized from what is behind it: items
//!   sorted largest alignment first and packed, rounded to the window granularity (1 MiB for
//!   memory, 4 KiB for I/O; PCI-to-PCI Bridge spec 3.2.5.6-3.2.5.9);
//! - top-down, the root bus's items are placed in the host windows in the same order, every
//!   BAR naturally aligned (a BAR of size 2^n decodes only n-aligned bases, PCIe Base spec
//!   7.5.1.2.1), and each bridge window's contents follow at their precomputed offsets;
//! - every memory BAR gets a slot of whole pages of its own ([`DEVICE_PAGE`]-aligned, at least a
//!   page long), as Linux's `pci=resource_alignment` and VFIO arrange: a VM's stage 2 maps
//!   device registers a page at a time, so a page must never hold two functions' registers,
//!   whichever VMs (or none) own them. I/O BARs stay packed: they are never mapped into a VM,
//!   a VM's I/O accesses trap and are forwarded only inside its own functions' ranges.
//!
//! Everything is computed before anything is written, so an exhausted window leaves the
//! hardware untouched.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use super::enumerate::{BarAddr, BarKind, Topology};
use super::host::{HostBridge, PciWindow};
use super::regs::{self, command};
use super::{ConfigSpace, PciError};
use crate::platform::MemRange;

/// The granule of a VM's stage 2 (4 KiB): the unit in which device registers are given to a VM,
/// and so the smallest slot a memory BAR is placed in.
pub const DEVICE_PAGE: u64 = 4096;

/// The bytes a memory BAR of `size` occupies in its window, and the alignment of its slot: at
/// least one [`DEVICE_PAGE`], so that nothing else is ever placed in the pages it touches.
pub const fn memory_slot(size: u64) -> u64 {
    if size < DEVICE_PAGE {
        DEVICE_PAGE
    } else {
        size
    }
}

/// A resource of a function, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceName {
    /// One of its BARs, by index.
    Bar(u8),
    /// A bridge's I/O window.
    IoWindow,
    /// A bridge's non-prefetchable memory window.
    MemWindow,
    /// A bridge's prefetchable memory window.
    PrefWindow,
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceName::Bar(i) => write!(f, "BAR {i}"),
            ResourceName::IoWindow => f.write_str("bridge I/O window"),
            ResourceName::MemWindow => f.write_str("bridge memory window"),
            ResourceName::PrefWindow => f.write_str("bridge prefetchable window"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Io,
    Mem,
    Pref,
}

const CLASSES: [Class; 3] = [Class::Io, Class::Mem, Class::Pref];

impl Class {
    const fn window_name(self) -> &'static str {
        match self {
            Class::Io => "I/O",
            Class::Mem => "32-bit memory",
            Class::Pref => "64-bit memory",
        }
    }

    const fn bridge_window(self) -> ResourceName {
        match self {
            Class::Io => ResourceName::IoWindow,
            Class::Mem => ResourceName::MemWindow,
            Class::Pref => ResourceName::PrefWindow,
        }
    }

    const fn granule(self) -> u64 {
        match self {
            Class::Io => regs::BRIDGE_IO_GRANULE,
            Class::Mem | Class::Pref => regs::BRIDGE_MEM_GRANULE,
        }
    }

    fn host_window(self, host: &HostBridge) -> Option<&PciWindow> {
        match self {
            Class::Io => host.io_window(),
            Class::Mem => host.mem32_window(),
            Class::Pref => host.mem64_window(),
        }
    }
}

/// Something to place: a BAR, or a bridge window holding a whole sub-layout.
#[derive(Clone, Copy, Debug)]
struct Item {
    /// Index of the owning function in the topology.
    dev: usize,
    what: ResourceName,
    size: u64,
    align: u64,
}

/// A bus's items of one class, packed from offset 0.
#[derive(Debug, Default)]
struct Layout {
    items: Vec<(Item, u64)>,
    /// `None` if the packing overflowed u64: it can fit nowhere.
    size: Option<u64>,
    align: u64,
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

fn layout(mut items: Vec<Item>) -> Layout {
    // Largest alignment first packs power-of-two BARs without holes; ties broken by size and
    // then by position so the result does not depend on discovery order quirks.
    items.sort_by(|a, b| {
        (b.align, b.size)
            .cmp(&(a.align, a.size))
            .then((a.dev, sort_key(a.what)).cmp(&(b.dev, sort_key(b.what))))
    });
    let align = items.first().map_or(1, |i| i.align);
    let mut end = Some(0u64);
    let mut placed = Vec::with_capacity(items.len());
    for item in items {
        let off = end.and_then(|e| align_up(e, item.align));
        end = off.and_then(|o| o.checked_add(item.size));
        placed.push((item, off.unwrap_or(u64::MAX)));
    }
    Layout {
        items: placed,
        size: end,
        align,
    }
}

/// A total order on [`ResourceName`]: BARs by index, then the windows.
const fn sort_key(r: ResourceName) -> u8 {
    match r {
        ResourceName::Bar(i) => i,
        ResourceName::IoWindow => 6,
        ResourceName::MemWindow => 7,
        ResourceName::PrefWindow => 8,
    }
}

/// Where each thing ends up, before it is written anywhere.
#[derive(Default)]
struct Plan {
    /// (device, BAR position in `bars`) -> PCI address.
    bars: BTreeMap<(usize, usize), u64>,
    /// (bridge, class) -> window.
    windows: BTreeMap<(usize, Class), MemRange>,
}

/// Assigns every BAR and bridge window of `topo` from `host`'s windows, programs BARs, bridge
/// windows and Command registers, and records the result in `topo`.
///
/// Memory and I/O decoding are enabled where something was assigned. Bus mastering is
/// enabled on bridges only: a bridge forwards its secondary side's DMA upstream only with Bus
/// Master Enable set (PCIe Base spec 7.5.1.1.3), whereas whether an endpoint may master is the
/// choice of the VM that owns it.
pub fn assign_resources<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    topo: &mut Topology,
    host: &HostBridge,
) -> Result<(), PciError> {
    let high_ok = high_ok(topo, host);
    let class_of = |dev: usize, kind: BarKind, prefetchable: bool| match kind {
        BarKind::Io => Class::Io,
        BarKind::Mem64 if prefetchable && high_ok[dev] => Class::Pref,
        BarKind::Mem32 | BarKind::Mem64 => Class::Mem,
    };

    // Bottom up: a bridge is discovered before everything behind it, so walking the list
    // backwards sizes children before their parents.
    let mut windows: BTreeMap<(usize, Class), Layout> = BTreeMap::new();
    let items_on = |bus: u8, class: Class, windows: &BTreeMap<(usize, Class), Layout>| {
        let mut items = Vec::new();
        for (dev, d) in topo
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.bdf.bus == bus)
        {
            for bar in &d.bars {
                if class_of(dev, bar.kind, bar.prefetchable) == class {
                    // BAR sizes are powers of two, so a page-sized slot stays naturally aligned.
                    let slot = match class {
                        Class::Io => bar.size,
                        Class::Mem | Class::Pref => memory_slot(bar.size),
                    };
                    items.push(Item {
                        dev,
                        what: ResourceName::Bar(bar.index),
                        size: slot,
                        align: slot,
                    });
                }
            }
            if let Some(l) = windows.get(&(dev, class)) {
                let g = class.granule();
                items.push(Item {
                    dev,
                    what: class.bridge_window(),
                    size: l.size.and_then(|s| align_up(s, g)).unwrap_or(u64::MAX),
                    align: l.align.max(g),
                });
            }
        }
        items
    };
    for (dev, d) in topo.devices.iter().enumerate().rev() {
        let Some(b) = d.bridge else { continue };
        for class in CLASSES {
            let items = items_on(b.secondary, class, &windows);
            if !items.is_empty() {
                windows.insert((dev, class), layout(items));
            }
        }
    }

    // Top down.
    let mut plan = Plan::default();
    for class in CLASSES {
        let root = layout(items_on(topo.root_bus, class, &windows));
        let Some(&(first, _)) = root.items.first() else {
            continue;
        };
        let window = class.host_window(host).ok_or(PciError::NoWindow {
            bdf: topo.devices[first.dev].bdf,
            what: first.what,
            window: class.window_name(),
        })?;
        // Linux keeps PCI I/O below 0x1000 for legacy ISA decoders (arm64 PCIBIOS_MIN_IO).
        let mut cursor = match class {
            Class::Io => window.pci_base.max(0x1000),
            _ => window.pci_base,
        };
        for (item, _) in root.items {
            let base = align_up(cursor, item.align)
                .filter(|b| {
                    b.checked_add(item.size)
                        .is_some_and(|e| e <= window.pci_end())
                })
                .ok_or(PciError::WindowExhausted {
                    bdf: topo.devices[item.dev].bdf,
                    what: item.what,
                    size: item.size,
                    window: class.window_name(),
                    base: window.pci_base,
                    end: window.pci_end(),
                })?;
            cursor = base + item.size;
            // Place the item and, for a window, everything inside it, without recursion.
            let mut work = alloc::vec![(item, base)];
            while let Some((item, base)) = work.pop() {
                match item.what {
                    ResourceName::Bar(index) => {
                        let pos = topo.devices[item.dev]
                            .bars
                            .iter()
                            .position(|b| b.index == index)
                            .expect("items come from existing BARs");
                        plan.bars.insert((item.dev, pos), base);
                    }
                    _ => {
                        plan.windows.insert(
                            (item.dev, class),
                            MemRange {
                                base,
                                size: item.size,
                            },
                        );
                        let inner = &windows[&(item.dev, class)];
                        work.extend(inner.items.iter().map(|&(i, off)| (i, base + off)));
                    }
                }
            }
        }
    }

    program(cfg, topo, host, &plan, class_of);
    Ok(())
}

/// Whether a 64-bit prefetchable BAR of each function may go above 4 GiB: the host has a
/// 64-bit window and every bridge above the function has a 64-bit prefetchable window.
fn high_ok(topo: &Topology, host: &HostBridge) -> Vec<bool> {
    let has_high = host.mem64_window().is_some();
    let mut ok: Vec<bool> = Vec::with_capacity(topo.devices.len());
    for d in &topo.devices {
        // Parents come first in discovery order, so their answer is already known.
        let parent_ok = match d.parent.and_then(|p| topo.index(p)) {
            None => has_high,
            Some(p) => ok[p] && topo.devices[p].bridge.is_some_and(|b| b.pref64),
        };
        ok.push(parent_ok);
    }
    ok
}

fn program<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    topo: &mut Topology,
    host: &HostBridge,
    plan: &Plan,
    class_of: impl Fn(usize, BarKind, bool) -> Class,
) {
    for (dev, d) in topo.devices.iter_mut().enumerate() {
        let mut decode = 0;
        for (pos, bar) in d.bars.iter_mut().enumerate() {
            let Some(&pci) = plan.bars.get(&(dev, pos)) else {
                continue;
            };
            let class = class_of(dev, bar.kind, bar.prefetchable);
            let cpu = class
                .host_window(host)
                .and_then(|w| w.to_cpu(pci))
                .expect("placed inside the host window");
            bar.addr = Some(BarAddr { pci, cpu });
            let off = regs::BAR0 + 4 * u16::from(bar.index);
            // The type bits are read-only, so writing the bare address keeps them.
            cfg.write32(d.bdf, off, pci as u32);
            if bar.kind == BarKind::Mem64 {
                cfg.write32(d.bdf, off + 4, (pci >> 32) as u32);
            }
            decode |= match bar.kind {
                BarKind::Io => command::IO,
                _ => command::MEMORY,
            };
        }
        if let Some(b) = d.bridge.as_mut() {
            b.io = plan.windows.get(&(dev, Class::Io)).copied();
            b.mem = plan.windows.get(&(dev, Class::Mem)).copied();
            b.pref = plan.windows.get(&(dev, Class::Pref)).copied();
            program_bridge(cfg, d.bdf, b.io, b.mem, b.pref);
            if b.io.is_some() {
                decode |= command::IO;
            }
            if b.mem.is_some() || b.pref.is_some() {
                decode |= command::MEMORY;
            }
            decode |= command::BUS_MASTER;
        }
        // An endpoint masters DMA only once a VM's driver enables it: a boot loader leaves its
        // own devices live (U-Boot does not reset its virtio disk before `booti`), and until a
        // VM owns a function nothing should be mastering behind the hypervisor's back.
        let stop = if d.bridge.is_none() {
            command::BUS_MASTER
        } else {
            0
        };
        let cmd = cfg.read32(d.bdf, regs::COMMAND) & 0xffff;
        if decode != 0 || cmd & stop != 0 {
            cfg.write32(d.bdf, regs::COMMAND, (cmd & !stop) | decode);
        }
    }
}

/// Writes a bridge's three windows (PCI-to-PCI Bridge spec 3.2.5.6-3.2.5.9); an unused window
/// is closed by a base above its limit.
fn program_bridge<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    bdf: super::Bdf,
    io: Option<MemRange>,
    mem: Option<MemRange>,
    pref: Option<MemRange>,
) {
    let last = |r: MemRange| r.base + r.size - 1;
    // I/O: base/limit bytes hold address bits 15:12 in their upper nibble, the upper 16 bits
    // are in their own register; Secondary Status (RW1C) is written as zeros.
    let (io_lo, io_hi) = match io {
        Some(r) => {
            let (b, l) = (r.base, last(r));
            (
                (((l >> 8) & 0xf0) << 8 | ((b >> 8) & 0xf0)) as u32,
                ((l >> 16) << 16 | (b >> 16) & 0xffff) as u32,
            )
        }
        None => (0x00f0, 0),
    };
    // Keep the window shut while its upper half changes (Linux `pci_setup_bridge_io`).
    cfg.write32(bdf, regs::BRIDGE_IO_UPPER, 0x0000_ffff);
    cfg.write32(bdf, regs::BRIDGE_IO, io_lo);
    cfg.write32(bdf, regs::BRIDGE_IO_UPPER, io_hi);

    let mem_reg = |r: MemRange| {
        let (b, l) = (r.base, last(r));
        (((l >> 16) & 0xfff0) << 16 | ((b >> 16) & 0xfff0)) as u32
    };
    cfg.write32(bdf, regs::BRIDGE_MEM, mem.map_or(0x0000_fff0, mem_reg));

    // Linux `pci_setup_bridge_mmio_pref`: clear the upper limit first so the window is never
    // open at a half-written address.
    cfg.write32(bdf, regs::BRIDGE_PREF_LIMIT_UPPER, 0);
    cfg.write32(bdf, regs::BRIDGE_PREF, pref.map_or(0x0000_fff0, mem_reg));
    let (bu, lu) = pref.map_or((0, 0), |r| ((r.base >> 32) as u32, (last(r) >> 32) as u32));
    cfg.write32(bdf, regs::BRIDGE_PREF_BASE_UPPER, bu);
    cfg.write32(bdf, regs::BRIDGE_PREF_LIMIT_UPPER, lu);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::enumerate::enumerate;
    use crate::pci::fake::{qemu_host_bridge, FakeConfigSpace, FakeFn};
    use crate::pci::host::PciSpace;
    use crate::pci::Bdf;

    fn window(space: PciSpace, pci_base: u64, cpu_base: u64, size: u64) -> PciWindow {
        PciWindow {
            space,
            prefetchable: false,
            pci_base,
            cpu_base,
            size,
        }
    }

    fn bar_addr(t: &Topology, bdf: Bdf, index: u8) -> u64 {
        t.device(bdf)
            .unwrap()
            .bars
            .iter()
            .find(|b| b.index == index)
            .unwrap()
            .addr
            .unwrap()
            .pci
    }

    #[test]
    fn test_host_matches_the_qemu_dt() {
        const QEMU_SMMU: &[u8] = include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb");
        let dt = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
        assert_eq!(dt.windows, qemu_host_bridge().windows);
        assert_eq!(dt.iommu_map, qemu_host_bridge().iommu_map);
        assert_eq!(dt.ecam, qemu_host_bridge().ecam);
    }

    #[test]
    fn flat_root_bus() {
        let mut f = FakeConfigSpace::qemu_flat();
        let mut t = enumerate(&mut f, 0, 0xff).unwrap();
        let host = qemu_host_bridge();
        // A boot loader left 00:03.0 mastering (U-Boot's virtio disk).
        f.write32(Bdf::new(0, 3, 0), regs::COMMAND, command::BUS_MASTER);
        assert_eq!(
            f.read32(Bdf::new(0, 3, 0), regs::COMMAND) & 0x7,
            command::BUS_MASTER
        );
        assign_resources(&mut f, &mut t, &host).unwrap();
        let b = |s| Bdf::new(0, s, 0);
        // 64-bit prefetchable BARs, 16 KiB each, packed from the 64-bit window's base.
        let high: Vec<u64> = (1..=4).map(|s| bar_addr(&t, b(s), 4)).collect();
        assert_eq!(
            high,
            vec![
                0x80_0000_0000,
                0x80_0000_4000,
                0x80_0000_8000,
                0x80_0000_c000
            ]
        );
        let low: Vec<u64> = (1..=4).map(|s| bar_addr(&t, b(s), 1)).collect();
        assert_eq!(
            low,
            vec![0x1000_0000, 0x1000_1000, 0x1000_2000, 0x1000_3000]
        );
        // I/O from 0x1000, 0x80 each.
        let io: Vec<u64> = (1..=4).map(|s| bar_addr(&t, b(s), 0)).collect();
        assert_eq!(io, vec![0x1000, 0x1080, 0x1100, 0x1180]);
        // CPU addresses go through the window translation.
        let io0 = t.device(b(1)).unwrap().bars[0].addr.unwrap();
        assert_eq!(io0.cpu, 0x3eff_1000);
        // Registers hold the addresses; type bits intact.
        assert_eq!(f.read32(b(2), regs::BAR0 + 16), 0x0000_400c);
        assert_eq!(f.read32(b(2), regs::BAR0 + 20), 0x80);
        assert_eq!(f.read32(b(2), regs::BAR0 + 4), 0x1000_1000);
        // Decoding on, bus mastering left to the VM (and stopped where firmware left it on).
        for s in [2, 3] {
            assert_eq!(
                f.read32(b(s), regs::COMMAND) & 0x7,
                command::IO | command::MEMORY
            );
        }
        // The host bridge function has no BARs: its Command is untouched.
        assert_eq!(f.read32(b(0), regs::COMMAND) & 0x7, 0);
    }

    #[test]
    fn natural_alignment_largest_first() {
        let mut f = FakeConfigSpace::new();
        f.add(None, 1, 0, FakeFn::endpoint(1, 1).bar32(0, 0x1000, false));
        f.add(
            None,
            2,
            0,
            FakeFn::endpoint(1, 2)
                .bar32(0, 0x10_0000, false)
                .bar32(1, 0x100, false),
        );
        f.add(None, 3, 0, FakeFn::endpoint(1, 3).bar32(0, 0x8000, false));
        let mut t = enumerate(&mut f, 0, 0).unwrap();
        let mut host = qemu_host_bridge();
        // A window base that is only 4 KiB aligned.
        host.windows[1] = window(PciSpace::Mem32, 0x1000_1000, 0x1000_1000, 0x100_0000);
        assign_resources(&mut f, &mut t, &host).unwrap();
        let b = |s| Bdf::new(0, s, 0);
        assert_eq!(bar_addr(&t, b(2), 0), 0x1010_0000);
        assert_eq!(bar_addr(&t, b(3), 0), 0x1020_0000);
        assert_eq!(bar_addr(&t, b(1), 0), 0x1020_8000);
        assert_eq!(bar_addr(&t, b(2), 1), 0x1020_9000);
        for d in &t.devices {
            for bar in &d.bars {
                assert_eq!(
                    bar.addr.unwrap().pci % bar.size,
                    0,
                    "{} BAR {}",
                    d.bdf,
                    bar.index
                );
            }
        }
    }

    #[test]
    fn prefetchable_64bit_without_high_window_goes_low() {
        let mut f = FakeConfigSpace::qemu_flat();
        let mut t = enumerate(&mut f, 0, 0xff).unwrap();
        let mut host = qemu_host_bridge();
        host.windows.remove(2);
        assign_resources(&mut f, &mut t, &host).unwrap();
        let a = bar_addr(&t, Bdf::new(0, 1, 0), 4);
        assert!((0x1000_0000..0x3eff_0000).contains(&a));
        assert_eq!(f.read32(Bdf::new(0, 1, 0), regs::BAR0 + 20), 0);
    }

    #[test]
    fn window_exhaustion_names_device_and_bar() {
        let mut f = FakeConfigSpace::new();
        f.add(
            None,
            1,
            0,
            FakeFn::endpoint(1, 1).bar32(0, 0x80_0000, false),
        );
        f.add(
            None,
            2,
            0,
            FakeFn::endpoint(1, 2).bar32(3, 0x80_0000, false),
        );
        f.add(
            None,
            3,
            0,
            FakeFn::endpoint(1, 3).bar32(2, 0x40_0000, false),
        );
        let mut t = enumerate(&mut f, 0, 0).unwrap();
        let mut host = qemu_host_bridge();
        host.windows[1] = window(PciSpace::Mem32, 0x1000_0000, 0x1000_0000, 0x100_0000);
        let before = f.read32(Bdf::new(0, 1, 0), regs::BAR0);
        let err = assign_resources(&mut f, &mut t, &host).unwrap_err();
        assert_eq!(
            err,
            PciError::WindowExhausted {
                bdf: Bdf::new(0, 3, 0),
                what: ResourceName::Bar(2),
                size: 0x40_0000,
                window: "32-bit memory",
                base: 0x1000_0000,
                end: 0x1100_0000,
            }
        );
        assert_eq!(
            err.to_string(),
            "00:03.0: BAR 2 (0x400000 bytes) does not fit in the host bridge 32-bit memory \
             window 0x10000000-0x11000000"
        );
        // Nothing was written.
        assert_eq!(f.read32(Bdf::new(0, 1, 0), regs::BAR0), before);
        assert!(t
            .devices
            .iter()
            .all(|d| d.bars.iter().all(|b| b.addr.is_none())));
    }

    #[test]
    fn missing_io_window() {
        let mut f = FakeConfigSpace::qemu_flat();
        let mut t = enumerate(&mut f, 0, 0xff).unwrap();
        let mut host = qemu_host_bridge();
        host.windows.remove(0);
        assert_eq!(
            assign_resources(&mut f, &mut t, &host),
            Err(PciError::NoWindow {
                bdf: Bdf::new(0, 1, 0),
                what: ResourceName::Bar(0),
                window: "I/O"
            })
        );
    }

    #[test]
    fn bridge_windows_are_programmed() {
        let mut f = FakeConfigSpace::switch_topology(false);
        let mut t = enumerate(&mut f, 0, 0xff).unwrap();
        assign_resources(&mut f, &mut t, &qemu_host_bridge()).unwrap();
        let b = Bdf::new;
        let w = |bdf: Bdf| t.device(bdf).unwrap().bridge.unwrap();
        let r = |base, size| Some(MemRange { base, size });

        // Endpoint 03:00.0: 16 KiB BAR0, 1 MiB 64-bit prefetchable BAR2.
        // Endpoint 04:00.0: 4 KiB BAR0, 32-byte I/O BAR2.
        // Endpoint 05:00.0: 2 MiB 64-bit prefetchable BAR4.
        // Root bus, 64-bit class: 00:02.0's 2 MiB window first, then 00:01.0's 1 MiB one.
        assert_eq!(w(b(0, 2, 0)).pref, r(0x80_0000_0000, 0x20_0000));
        assert_eq!(w(b(0, 1, 0)).pref, r(0x80_0020_0000, 0x10_0000));
        assert_eq!(w(b(1, 0, 0)).pref, r(0x80_0020_0000, 0x10_0000));
        assert_eq!(w(b(2, 0, 0)).pref, r(0x80_0020_0000, 0x10_0000));
        assert_eq!(w(b(2, 1, 0)).pref, None);
        assert_eq!(bar_addr(&t, b(3, 0, 0), 2), 0x80_0020_0000);
        assert_eq!(bar_addr(&t, b(5, 0, 0), 4), 0x80_0000_0000);

        // 32-bit: each downstream port rounds to 1 MiB, the switch holds 2 MiB.
        assert_eq!(w(b(0, 1, 0)).mem, r(0x1000_0000, 0x20_0000));
        assert_eq!(w(b(2, 0, 0)).mem, r(0x1000_0000, 0x10_0000));
        assert_eq!(w(b(2, 1, 0)).mem, r(0x1010_0000, 0x10_0000));
        assert_eq!(w(b(0, 2, 0)).mem, None);
        assert_eq!(bar_addr(&t, b(4, 0, 0), 0), 0x1010_0000);

        // I/O: 4 KiB granules from 0x1000.
        assert_eq!(w(b(0, 1, 0)).io, r(0x1000, 0x1000));
        assert_eq!(w(b(2, 1, 0)).io, r(0x1000, 0x1000));
        assert_eq!(w(b(2, 0, 0)).io, None);
        assert_eq!(bar_addr(&t, b(4, 0, 0), 2), 0x1000);

        // Register encodings.
        let rd = |bdf, off| f.read32(bdf, off);
        assert_eq!(rd(b(0, 1, 0), regs::BRIDGE_MEM), 0x1010_1000);
        assert_eq!(rd(b(0, 1, 0), regs::BRIDGE_PREF), 0x0021_0021);
        assert_eq!(rd(b(0, 1, 0), regs::BRIDGE_PREF_BASE_UPPER), 0x80);
        assert_eq!(rd(b(0, 1, 0), regs::BRIDGE_PREF_LIMIT_UPPER), 0x80);
        assert_eq!(rd(b(0, 1, 0), regs::BRIDGE_IO) & 0xffff, 0x1111);
        assert_eq!(rd(b(0, 1, 0), regs::BRIDGE_IO_UPPER), 0);
        // Closed windows: base above limit.
        assert_eq!(rd(b(0, 2, 0), regs::BRIDGE_MEM), 0x0000_fff0);
        assert_eq!(rd(b(0, 2, 0), regs::BRIDGE_IO) & 0xffff, 0x01f1);
        assert_eq!(rd(b(2, 1, 0), regs::BRIDGE_PREF), 0x0001_fff1);
        // Bridges decode and forward DMA; endpoints only decode.
        let all = command::IO | command::MEMORY | command::BUS_MASTER;
        assert_eq!(rd(b(0, 1, 0), regs::COMMAND) & 0x7, all);
        assert_eq!(
            rd(b(0, 2, 0), regs::COMMAND) & 0x7,
            command::MEMORY | command::BUS_MASTER
        );
        assert_eq!(
            rd(b(4, 0, 0), regs::COMMAND) & 0x7,
            command::IO | command::MEMORY
        );
        assert_eq!(rd(b(3, 0, 0), regs::COMMAND) & 0x7, command::MEMORY);
    }

    #[test]
    fn bridge_without_64bit_prefetch_keeps_children_low() {
        let mut f = FakeConfigSpace::new();
        let rp = f.add(None, 1, 0, FakeFn::root_port());
        // Prefetchable window with 32-bit addressing only.
        f.set(rp, regs::BRIDGE_PREF, 0);
        f.add(
            Some(rp),
            0,
            0,
            FakeFn::endpoint(1, 1).bar64(0, 0x10_0000, true),
        );
        let mut t = enumerate(&mut f, 0, 0xff).unwrap();
        assert!(!t.devices[0].bridge.unwrap().pref64);
        assign_resources(&mut f, &mut t, &qemu_host_bridge()).unwrap();
        assert_eq!(bar_addr(&t, Bdf::new(1, 0, 0), 0), 0x1000_0000);
        assert_eq!(t.devices[0].bridge.unwrap().mem.unwrap().base, 0x1000_0000);
        assert_eq!(t.devices[0].bridge.unwrap().pref, None);
    }

    #[test]
    fn oversized_bridge_window_is_named() {
        let mut f = FakeConfigSpace::new();
        let rp = f.add(None, 1, 0, FakeFn::root_port());
        f.add(
            Some(rp),
            0,
            0,
            FakeFn::endpoint(1, 1).bar32(0, 0x4000_0000, false),
        );
        let mut t = enumerate(&mut f, 0, 0xff).unwrap();
        let err = assign_resources(&mut f, &mut t, &qemu_host_bridge()).unwrap_err();
        assert!(matches!(
            err,
            PciError::WindowExhausted {
                what: ResourceName::MemWindow,
                size: 0x4000_0000,
                ..
            }
        ));
        assert!(err.to_string().starts_with("00:01.0: bridge memory window"));
    }
}

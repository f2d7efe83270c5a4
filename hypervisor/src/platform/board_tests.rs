//! Real boards' device trees (Linux 6.12's, `hypervisor/tests/dtbs/`, README there) through the
//! platform parser and the host bridge reader: what the hypervisor finds on each, what it
//! drives, and what it refuses and why. Values cross-checked with `dtc -I dtb -O dts`.

use super::*;
use crate::pci::{host_bridges, IommuMapEntry};

const FVP: &[u8] = include_bytes!("../../tests/dtbs/fvp-base-revc.dtb");
const D05: &[u8] = include_bytes!("../../tests/dtbs/hip07-d05.dtb");
const ROCK5B: &[u8] = include_bytes!("../../tests/dtbs/rk3588-rock-5b-smmu.dtb");
const MULTI: &[u8] = include_bytes!("../../tests/dtbs/multi-smmu-virt.dtb");

fn r(base: u64, size: u64) -> MemRange {
    MemRange { base, size }
}

/// The SMMUs as (path, driven or why not, polled or why).
fn smmus(p: &Platform) -> Vec<(&str, Option<&str>, Option<&str>)> {
    p.smmus
        .iter()
        .map(|s| (s.path.as_str(), s.refused.as_deref(), s.polled.as_deref()))
        .collect()
}

const NOT_COHERENT: &str =
    "it is not dma-coherent, and the hypervisor's driver needs coherent table walks";

#[test]
fn fvp_base_revc() {
    let p = Platform::parse(FVP).unwrap();
    assert_eq!(p.cpus.len(), 8);
    assert_eq!(p.gic.gicr, vec![r(0x2f10_0000, 0x20_0000)]);
    // The console sits three buses down: its reg goes through their ranges (0x90000 on the
    // iofpga bus is 0x1c090000 for the CPU), and its interrupt through bus@8000000's
    // interrupt-map nexus (<5> -> GIC SPI 5).
    assert_eq!(
        p.uart.path,
        "/bus@8000000/motherboard-bus@8000000/iofpga-bus@300000000/serial@90000"
    );
    assert_eq!(p.uart.base, r(0x1c09_0000, 0x1000));
    assert_eq!(p.uart.intid, Some(32 + 5));
    assert_eq!(p.uart.kind, UartKind::Pl011);
    // One SMMUv3, driven, with its wired interrupts.
    let s = &p.smmus;
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].path, "/iommu@2b400000");
    assert_eq!(s[0].regs, r(0x2b40_0000, 0x10_0000));
    assert_eq!(
        (s[0].eventq_intid, s[0].gerror_intid),
        (Some(32 + 0x4a), Some(32 + 0x4f))
    );
    assert_eq!(
        (s[0].refused.as_deref(), s[0].polled.as_deref()),
        (None, None)
    );
    // One generic ECAM bridge whose iommu-map names that SMMU and msi-map the ITS.
    let b = host_bridges(FVP).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].path, "/pci@40000000");
    let h = b[0].bridge.as_ref().unwrap();
    assert_eq!(h.ecam, r(0x4000_0000, 0x20_0000));
    assert_eq!((h.bus_start, h.bus_end), (0, 1));
    let its = |phandle| IommuMapEntry {
        rid_base: 0,
        iommu: phandle,
        sid_base: 0,
        length: 0x1_0000,
    };
    assert_eq!(h.iommu_map, vec![its(s[0].phandle.unwrap())]);
    assert_eq!(h.msi_map.len(), 1);
    assert_ne!(h.msi_map[0].its_phandle, s[0].phandle.unwrap());
    // The one ITS of the FVP, a child of its GIC.
    let p = Platform::parse(FVP).unwrap();
    assert_eq!(p.gic.its.len(), 1);
    assert_eq!(p.gic.its[0].refused, None);
    assert_eq!(Some(h.msi_map[0].its_phandle), p.gic.its[0].phandle);
    assert_eq!(h.device_id(0x0108).map(|(_, d)| d), Some(0x0108));
    assert_eq!(h.translate(0x0108), Some((s[0].phandle.unwrap(), 0x0108)));
    assert_eq!(h.interrupt_map.entries.len(), 4);
}

#[test]
fn hisilicon_d05() {
    let p = Platform::parse(D05).unwrap();
    assert_eq!(p.cpus.len(), 64);
    // Four redistributor regions, GICv4-sized frames.
    assert_eq!(
        p.gic.gicr,
        vec![
            r(0x4d10_0000, 0x40_0000),
            r(0x6d10_0000, 0x40_0000),
            r(0x400_4d10_0000, 0x40_0000),
            r(0x400_6d10_0000, 0x40_0000)
        ]
    );
    assert_eq!(p.gic.redist_stride, Some(0x4_0000));
    // An SBSA UART whose interrupt goes through an mbigen: output only.
    assert_eq!(p.uart.kind, UartKind::SbsaUart);
    assert_eq!(p.uart.base, r(0x602b_0000, 0x1000));
    assert_eq!(p.uart.intid, None);
    // Five SMMUv3 nodes, one disabled; the four others driven, their event queues polled
    // because their interrupts are mbigen lines, not GIC ones.
    let s = smmus(&p);
    assert_eq!(
        s.iter().map(|s| s.0).collect::<Vec<_>>(),
        [
            "/iommu@d0040000",
            "/iommu@8d0040000",
            "/iommu@400d0040000",
            "/iommu@408d0040000"
        ]
    );
    for (path, refused, polled) in s {
        assert_eq!(refused, None, "{path}");
        let why = polled.unwrap();
        assert!(
            why.contains("intc_smmu_alg") && why.contains("hisilicon,mbigen-v2"),
            "{path}: {why}"
        );
    }
    // Its PCIe controllers are HiSilicon's own ECAM variant: named, not driven.
    let b = host_bridges(D05).unwrap();
    assert!(!b.is_empty());
    for n in &b {
        assert_eq!(n.compatible, "hisilicon,hip07-pcie-ecam", "{}", n.path);
        assert!(
            matches!(&n.bridge, Err(PlatformError::BadProperty { reason, .. }) if reason.contains("not a generic ECAM")),
            "{n:?}"
        );
    }
}

#[test]
fn rock_5b_with_its_mmu600s_enabled() {
    let p = Platform::parse(ROCK5B).unwrap();
    assert_eq!(p.cpus.len(), 8);
    // Rockchip's 8250 (a DesignWare APB UART): 32-bit registers 4 bytes apart.
    assert_eq!(p.uart.path, "/serial@feb50000");
    assert_eq!(
        p.uart.kind,
        UartKind::Ns16550 {
            reg_shift: 2,
            reg_io_width: 4
        }
    );
    assert_eq!(p.uart.intid, Some(32 + 333));
    // The two MMU-600s are not dma-coherent in this DT: refused, never touched.
    assert_eq!(
        smmus(&p),
        [
            ("/iommu@fc900000", Some(NOT_COHERENT), None),
            ("/iommu@fcb00000", Some(NOT_COHERENT), None)
        ]
    );
    assert_eq!(
        (p.smmus[0].eventq_intid, p.smmus[0].gerror_intid),
        (Some(32 + 0x171), Some(32 + 0x173))
    );
    // DesignWare PCIe: three controllers named with their domains, none driven.
    let b = host_bridges(ROCK5B).unwrap();
    let mut named: Vec<_> = b.iter().map(|n| (n.path.as_str(), n.domain)).collect();
    named.sort();
    assert_eq!(
        named,
        [
            ("/pcie@fe150000", Some(0)),
            ("/pcie@fe170000", Some(2)),
            ("/pcie@fe190000", Some(4))
        ]
    );
    assert!(b
        .iter()
        .all(|n| n.compatible == "rockchip,rk3588-pcie" && n.bridge.is_err()));
}

#[test]
fn multi_smmu_virt_takes_the_smmu_the_iommu_map_names() {
    let p = Platform::parse(MULTI).unwrap();
    // The display's SMMU is first in the DT and is not the PCIe one; it is refused (not
    // coherent), the other two are driven.
    assert_eq!(
        smmus(&p),
        [
            ("/iommu@2ce00000", Some(NOT_COHERENT), None),
            ("/iommu@4f400000", None, None),
            ("/iommu@4f000000", None, None)
        ]
    );
    let b = host_bridges(MULTI).unwrap();
    assert_eq!(b.len(), 1);
    let h = b[0].bridge.as_ref().unwrap();
    assert_eq!(b[0].domain, Some(0));
    // The bridge's iommu-map names the second SMMU, whatever the order: a function's DMA is
    // translated by that one (phandle), with StreamID = RID.
    let pcie_smmu = p.smmus[1].phandle.unwrap();
    assert_ne!(Some(pcie_smmu), p.smmus[0].phandle);
    assert_eq!(h.iommu_map_mask, Some(0xffff));
    assert_eq!(h.translate(0x0100), Some((pcie_smmu, 0x0100)));
    assert_eq!(h.msi_map.len(), 1);
}

#[test]
fn boards_its_nodes() {
    // D05 (hip07): eight ITSes, children of the GIC, each with msi-controller.
    let p = Platform::parse(D05).unwrap();
    assert_eq!(p.gic.its.len(), 8);
    assert!(
        p.gic.its.iter().all(|i| i.refused.is_none()),
        "{:?}",
        p.gic.its
    );
    // RK3588: two, both usable; its PCIe bridges' msi-maps name one or the other.
    let p = Platform::parse(ROCK5B).unwrap();
    assert_eq!(p.gic.its.len(), 2);
    assert!(
        p.gic.its.iter().all(|i| i.refused.is_none()),
        "{:?}",
        p.gic.its
    );
    let phandles: Vec<u32> = p.gic.its.iter().filter_map(|i| i.phandle).collect();
    assert_eq!(phandles.len(), 2);
}

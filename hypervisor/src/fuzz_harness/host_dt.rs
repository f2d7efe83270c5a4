//! The readers of the untrusted host DT on any blob: [`Platform::parse`] (which validates the
//! blob with `platform::blob::check_blob` before the `fdt` crate sees it),
//! [`HostBridge::from_dtb`] and [`parse_vm_specs`]. The input is the blob itself. Invariants,
//! each a panic naming it:
//!
//! - **(a) no panic, no hang**: every reader returns (libFuzzer's `-timeout` catches a hang; the
//!   fuzz build has overflow checks on);
//! - **(b) one validation**: the host bridge and the VM readers share `with_fdt`, so they call a
//!   blob malformed together, and [`Platform::parse`], which validates the same way first, then
//!   calls it malformed too;
//! - **(c) the platform is well-formed**: memory is non-empty, sorted, and no RAM or reserved
//!   range wraps; there is a CPU; every INTID (GIC maintenance, timer, console, SMMU) is an
//!   SPI, PPI, extended SPI or extended PPI; no register frame or boot module wraps;
//! - **(d) the host bridge is well-formed**: its bus range is ordered and its ECAM window holds no
//!   more than those buses without wrapping; every window is non-empty, I/O or memory, does not
//!   wrap on either side, and an I/O or 32-bit one ends at or below 4 GiB; every `iommu-map`
//!   entry stays inside RID space and does not wrap StreamID space; every INTx route is a GIC
//!   SPI (INTID = 32 + the SPI number, below 988);
//! - **(e) accepted VMs are well-formed**: the memory size is a whole number of KiB, the
//!   `smmu-hv,cpus` list (if any) is non-empty, module and static-memory ranges do not wrap, and
//!   the kernel and ramdisk are non-empty;
//! - **(f) deterministic**: reading the same blob twice gives the same answers;
//! - **(g) the host bridges taken are apart**: of every bridge node [`host_bridges`] lists,
//!   those `pci::segments::choose` takes are each well-formed as in (d), have distinct PCI
//!   domains, and no two share an address of their ECAM or address windows; every other node is
//!   named with a reason.
//!
//! Compiled only under `cfg(test)` or the `fuzzing` feature; no `unsafe`. The malformed-DT
//! corpus of `platform/corpus_tests.rs` checks (b)-(e) on each of its cases too.

use crate::config::{parse_vm_specs, ConfigError, VmSpec};
use crate::pci::{host_bridges, HostBridge, PciError, PciSpace};
use crate::platform::{MemRange, Platform, PlatformError};
use alloc::vec::Vec;

/// What [`Platform::parse`] returned.
pub type PlatformResult = Result<Platform, PlatformError>;
/// What [`HostBridge::from_dtb`] returned.
pub type BridgeResult = Result<Option<HostBridge>, PciError>;
/// What [`parse_vm_specs`] returned.
pub type VmsResult = Result<Vec<Result<VmSpec, ConfigError>>, PlatformError>;

/// Runs the three readers on `dtb` and checks every invariant.
pub fn run(dtb: &[u8]) {
    let first = read(dtb);
    check(&first.0, &first.1, &first.2);
    check_bridges(dtb);
    // The command line is read from /chosen too (the log level, Xen's dtuart=): it must return.
    let _ = crate::config::hv_options(dtb);
    assert!(
        read(dtb) == first,
        "(f) a second read of the same blob differs"
    );
}

/// Invariant (g).
pub fn check_bridges(dtb: &[u8]) {
    let Ok(nodes) = host_bridges(dtb) else {
        return;
    };
    let n = nodes.len();
    let (taken, left) = crate::pci::segments::choose(nodes);
    assert_eq!(
        taken.len() + left.len(),
        n,
        "(g) a bridge node neither taken nor named"
    );
    assert!(left.iter().all(|(_, why)| !why.is_empty()), "(g) no reason");
    let span = |h: &HostBridge| {
        let mut r = alloc::vec![h.ecam];
        r.extend(h.windows.iter().map(|w| MemRange {
            base: w.cpu_base,
            size: w.size,
        }));
        r
    };
    for (i, (_, d, b)) in taken.iter().enumerate() {
        check_bridge(b);
        for (_, e, o) in &taken[..i] {
            assert_ne!(d, e, "(g) two bridges with domain {d}");
            for x in span(b) {
                for y in span(o) {
                    assert!(
                        x.base >= y.end() || y.base >= x.end(),
                        "(g) taken bridges overlap: {x:x?} {y:x?}"
                    );
                }
            }
        }
    }
}

fn read(dtb: &[u8]) -> (PlatformResult, BridgeResult, VmsResult) {
    (
        Platform::parse(dtb),
        HostBridge::from_dtb(dtb),
        parse_vm_specs(dtb),
    )
}

/// Invariants (b) to (e) of what the three readers returned for one blob.
pub fn check(platform: &PlatformResult, bridge: &BridgeResult, vms: &VmsResult) {
    let malformed = |e: &PlatformError| matches!(e, PlatformError::Malformed { .. });
    let vms_malformed = vms.as_ref().err().is_some_and(malformed);
    let bridge_malformed = matches!(bridge, Err(PciError::Dt(e)) if malformed(e));
    assert_eq!(
        vms_malformed, bridge_malformed,
        "(b) the VM and host bridge readers disagree on whether the blob is malformed"
    );
    if vms_malformed {
        assert!(
            platform.as_ref().err().is_some_and(malformed),
            "(b) Platform::parse accepted a blob with_fdt calls malformed: {platform:?}"
        );
    }
    if let Ok(p) = platform {
        check_platform(p);
    }
    if let Ok(Some(hb)) = bridge {
        check_bridge(hb);
    }
    if let Ok(vms) = vms {
        vms.iter().flatten().for_each(check_vm);
    }
}

fn wraps(r: MemRange) -> bool {
    r.base.checked_add(r.size).is_none()
}

/// SPI 32-1019, PPI 16-31, extended SPI 4096-5119, extended PPI 1056-1119.
fn valid_intid(intid: u32) -> bool {
    matches!(intid, 16..=1019 | 1056..=1119 | 4096..=5119)
}

fn check_platform(p: &Platform) {
    assert!(!p.memory.is_empty(), "(c) no memory");
    for list in [&p.memory, &p.reserved] {
        assert!(
            list.windows(2).all(|w| w[0].base <= w[1].base),
            "(c) memory or reserved ranges unsorted: {list:x?}"
        );
        assert!(
            !list.iter().any(|&r| wraps(r)),
            "(c) a range wraps: {list:x?}"
        );
    }
    assert!(
        p.memory.iter().all(|r| r.size != 0),
        "(c) an empty RAM range"
    );
    assert!(!p.cpus.is_empty(), "(c) no CPU");
    let mut intids = alloc::vec![p.gic.maintenance_ppi];
    intids.extend(p.uart.intid);
    intids.extend(p.timer.intids);
    for s in &p.smmus {
        intids.extend(s.eventq_intid);
        intids.extend(s.gerror_intid);
        assert!(!wraps(s.regs), "(c) the SMMU's frame wraps: {:x?}", s.regs);
        assert!(
            s.refused.is_some() || s.regs.size >= 0x2_0000,
            "(c) an SMMU driven with a frame too small: {s:x?}"
        );
    }
    assert!(!p.gic.gicr.is_empty(), "(c) no redistributor region");
    assert!(
        intids.iter().all(|&i| valid_intid(i)),
        "(c) an INTID outside every GIC range: {intids:?}"
    );
    for r in p.gic.gicr.iter().copied().chain([p.gic.gicd, p.uart.base]) {
        assert!(!wraps(r), "(c) a register frame wraps: {r:x?}");
    }
    for m in &p.modules {
        assert!(!wraps(m.range), "(c) a boot module wraps: {m:x?}");
    }
}

fn check_bridge(hb: &HostBridge) {
    assert!(hb.bus_start <= hb.bus_end, "(d) bus range reversed");
    let buses = u64::from(hb.bus_end - hb.bus_start) + 1;
    assert!(
        hb.ecam.size <= buses << 20 && !wraps(hb.ecam),
        "(d) ECAM window {:x?} for {buses} buses",
        hb.ecam
    );
    for w in &hb.windows {
        let ok = w.size != 0
            && w.space != PciSpace::Config
            && w.pci_base.checked_add(w.size).is_some()
            && w.cpu_base.checked_add(w.size).is_some()
            && (w.space == PciSpace::Mem64 || w.pci_end() <= 1 << 32);
        assert!(ok, "(d) bad window {w:x?}");
    }
    for e in &hb.iommu_map {
        let ok = u64::from(e.rid_base) + u64::from(e.length) <= 1 << 16
            && e.sid_base.checked_add(e.length).is_some();
        assert!(
            ok,
            "(d) iommu-map entry {e:x?} leaves RID or StreamID space"
        );
    }
    for e in &hb.interrupt_map.entries {
        let r = e.route;
        assert!(
            r.spi < 988 && r.intid == 32 + r.spi,
            "(d) INTx route {r:?} is not a GIC SPI"
        );
    }
}

fn check_vm(vm: &VmSpec) {
    assert!(
        vm.mem_size.is_multiple_of(1024),
        "(e) {}: memory {} is not whole KiB",
        vm.name,
        vm.mem_size
    );
    assert!(
        vm.pcpus.as_ref().is_none_or(|c| !c.is_empty()),
        "(e) {}: empty smmu-hv,cpus",
        vm.name
    );
    let kernel = vm.kernel.as_ref().map(|k| k.range);
    for r in kernel.iter().chain(&vm.ramdisk) {
        assert!(r.size != 0 && !wraps(*r), "(e) {}: module {r:x?}", vm.name);
    }
    if let Some(r) = vm.static_mem {
        assert!(!wraps(r), "(e) {}: static memory {r:x?} wraps", vm.name);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Rng;
    use super::*;

    const SEEDS: [&[u8]; 7] = [
        include_bytes!("../../tests/data/qemu-virt-gicv3.dtb"),
        include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb"),
        include_bytes!("../../tests/data/qemu-virt-gicv3-modules.dtb"),
        include_bytes!("../../tests/dtbs/fvp-base-revc.dtb"),
        include_bytes!("../../tests/dtbs/hip07-d05.dtb"),
        include_bytes!("../../tests/dtbs/rk3588-rock-5b-smmu.dtb"),
        include_bytes!("../../tests/dtbs/multi-smmu-virt.dtb"),
    ];
    const MULTI: &[u8] = SEEDS[6];

    #[test]
    fn the_seed_corpus_keeps_the_invariants() {
        for seed in SEEDS {
            run(seed);
        }
        // The hand-written board is read in full by all three.
        let (p, hb, vms) = read(MULTI);
        assert!(p.is_ok() && matches!(hb, Ok(Some(_))) && vms.is_ok());
    }

    #[test]
    fn random_mutations_keep_the_invariants() {
        let mut rng = Rng(0x0d7b_5eed_f00d_cafe);
        let mut read_in_full = 0;
        for _ in 0..400 {
            let mut dtb = MULTI.to_vec();
            for _ in 0..1 + rng.next() % 3 {
                let at = (rng.next() % dtb.len() as u64) as usize;
                dtb[at] ^= 1 << (rng.next() % 8);
            }
            run(&dtb);
            read_in_full += usize::from(Platform::parse(&dtb).is_ok());
        }
        // Most single flips land in property values and leave a readable board.
        assert!(read_in_full > 100, "shallow: {read_in_full} of 400");
        for _ in 0..300 {
            run(&rng.input(200));
        }
    }

    #[test]
    #[should_panic(expected = "(c) memory or reserved ranges unsorted")]
    fn unsorted_memory_is_caught() {
        let mut p = Platform::parse(MULTI).unwrap();
        p.memory.reverse();
        check(&Ok(p), &Ok(None), &Ok(Vec::new()));
    }

    #[test]
    #[should_panic(expected = "(b) the VM and host bridge readers disagree")]
    fn disagreeing_validation_is_caught() {
        let malformed = PlatformError::Malformed {
            offset: 0,
            reason: "test",
        };
        check(&Err(malformed.clone()), &Ok(None), &Err(malformed));
    }

    #[test]
    #[should_panic(expected = "(d) INTx route")]
    fn an_intx_route_that_is_no_spi_is_caught() {
        let mut hb = HostBridge::from_dtb(MULTI).unwrap().unwrap();
        hb.interrupt_map.entries[0].route.intid = 16;
        check(&Err(PlatformError::NoGic), &Ok(Some(hb)), &Ok(Vec::new()));
    }
}

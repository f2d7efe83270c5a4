use super::regs::*;
use super::*;
use crate::mmio::AccessWidth::{Byte, Double, Half, Word};

/// 4 vCPUs: three in cluster 0 (Aff0 0..2) and one at Aff1=1, 64 SPIs (INTIDs 32..95).
fn gic() -> VGic {
    VGic::new(VGicConfig {
        num_spis: 64,
        vcpu_mpidr: vec![0x0, 0x1, 0x2, 0x100],
        ..VGicConfig::default()
    })
}

fn rd32(g: &mut VGic, vcpu: usize, off: u64) -> u32 {
    g.redist_read(vcpu, off, Word) as u32
}

fn wr32(g: &mut VGic, vcpu: usize, off: u64, v: u32) {
    g.redist_write(vcpu, off, Word, v.into());
}

fn dr32(g: &mut VGic, off: u64) -> u32 {
    g.dist_read(off, Word) as u32
}

fn dw32(g: &mut VGic, off: u64, v: u32) {
    g.dist_write(off, Word, v.into());
}

#[test]
fn linux_distributor_probe() {
    let mut g = gic();
    // gic_validate_dist_version(): PIDR2.ArchRev must be 3 or 4.
    assert_eq!((dr32(&mut g, GICD_PIDR2) >> 4) & 0xF, 3);
    assert_eq!(g.dist_read(GICD_PIDR2, Word), 0x3B);
    // GICD_TYPER: ITLinesNumber=2 -> 96 INTIDs; IDbits=9 -> 10 bits; no LPIS/MBIS/ESPI.
    let typer = dr32(&mut g, GICD_TYPER);
    assert_eq!(32 * ((typer & 0x1F) + 1), 96);
    assert_eq!((typer >> 19) & 0x1F, 9);
    assert_eq!(typer & ((1 << 17) | (1 << 16) | (1 << 8)), 0);
    assert_eq!((typer >> 5) & 7, 0, "CPUNumber is 0 with ARE");
    assert_eq!(dr32(&mut g, GICD_TYPER2), 0);
    assert_eq!(dr32(&mut g, GICD_IIDR), GIC_IIDR);
    // Reset: ARE and DS RAO, groups disabled.
    assert_eq!(dr32(&mut g, GICD_CTLR), GICD_CTLR_ARE | GICD_CTLR_DS);

    // gic_dist_init(): disable, wait for RWP, configure SPIs, enable, wait for RWP.
    dw32(&mut g, GICD_CTLR, 0);
    assert_eq!(dr32(&mut g, GICD_CTLR) & GICD_CTLR_RWP, 0);
    for i in (32..96).step_by(32) {
        dw32(&mut g, GICD_IGROUPR + i / 8, !0);
    }
    for i in (32..96).step_by(4) {
        dw32(&mut g, GICD_IPRIORITYR + i, 0xa0a0_a0a0);
    }
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ARE | 0b11);
    let ctlr = dr32(&mut g, GICD_CTLR);
    assert_eq!(ctlr, GICD_CTLR_ARE | GICD_CTLR_DS | 0b11);
    assert_eq!(ctlr & GICD_CTLR_RWP, 0);
    // Route all SPIs to the boot CPU (writeq of the affinity).
    for i in 32..96 {
        g.dist_write(GICD_IROUTER + 8 * i, Double, 0);
    }
    assert!(g.group1(0, IntId(40)));
    assert_eq!(g.priority(0, IntId(95)), 0xa0);
    // The writes to INTIDs past the implemented ones were ignored.
    assert_eq!(g.priority(0, IntId(96)), 0);
    assert_eq!(g.spi_target(IntId(40)), 0);
}

#[test]
fn typer_with_zero_spis_and_topology_flags() {
    let mut g = VGic::new(VGicConfig {
        num_spis: 0,
        vcpu_mpidr: vec![0x1_0000_0010],
        ..VGicConfig::default()
    });
    let typer = dr32(&mut g, GICD_TYPER);
    assert_eq!(typer & 0x1F, 0);
    assert_ne!(typer & GICD_TYPER_A3V, 0, "Aff3 in use");
    assert_ne!(typer & GICD_TYPER_RSS, 0, "Aff0 > 15 in use");
    // Every SPI register is RAZ/WI.
    dw32(&mut g, GICD_ISENABLER + 4, !0);
    assert_eq!(dr32(&mut g, GICD_ISENABLER + 4), 0);
    assert!(!g.enable_bit(0, IntId(32)));
    // Capping: more SPIs than INTIDs allow.
    let g = VGic::new(VGicConfig {
        num_spis: 4096 + 7,
        vcpu_mpidr: vec![0],
        ..VGicConfig::default()
    });
    assert_eq!(g.num_spis(), MAX_SPIS);
}

#[test]
fn linux_redistributor_iteration_and_wakeup() {
    let mut g = gic();
    assert_eq!(g.num_vcpus(), 4);
    // gic_iterate_rdists(): walk frames until TYPER.Last, matching affinity.
    let mut found = Vec::new();
    for vcpu in 0..8 {
        assert_eq!((rd32(&mut g, vcpu, GICR_PIDR2) >> 4) & 0xF, 3);
        let typer = g.redist_read(vcpu, GICR_TYPER, Double);
        assert_eq!(typer & 1, 0, "PLPIS");
        assert_eq!((typer >> 8) & 0xFFFF, vcpu as u64);
        found.push(typer >> 32);
        if typer & GICR_TYPER_LAST != 0 {
            break;
        }
    }
    assert_eq!(found, vec![0x0, 0x1, 0x2, 0x100]);
    // 32-bit halves of GICR_TYPER.
    let typer = g.redist_read(3, GICR_TYPER, Double);
    assert_eq!(g.redist_read(3, GICR_TYPER, Word), typer & 0xFFFF_FFFF);
    assert_eq!(g.redist_read(3, GICR_TYPER + 4, Word), 0x100);
    assert_eq!(rd32(&mut g, 3, GICR_IIDR), GIC_IIDR);

    // gic_enable_redist(true): clear ProcessorSleep, poll ChildrenAsleep.
    let waker = rd32(&mut g, 1, GICR_WAKER);
    assert_eq!(
        waker,
        GICR_WAKER_PROCESSOR_SLEEP | GICR_WAKER_CHILDREN_ASLEEP
    );
    wr32(&mut g, 1, GICR_WAKER, waker & !GICR_WAKER_PROCESSOR_SLEEP);
    assert_eq!(rd32(&mut g, 1, GICR_WAKER) & GICR_WAKER_CHILDREN_ASLEEP, 0);
    // Other redistributors stay asleep.
    assert_ne!(rd32(&mut g, 0, GICR_WAKER) & GICR_WAKER_CHILDREN_ASLEEP, 0);
    // And back to sleep.
    wr32(&mut g, 1, GICR_WAKER, GICR_WAKER_PROCESSOR_SLEEP);
    assert_ne!(rd32(&mut g, 1, GICR_WAKER) & GICR_WAKER_CHILDREN_ASLEEP, 0);

    // GICR_CTLR: RWP reads 0, EnableLPIs RAZ/WI. PROPBASER/PENDBASER RAZ/WI.
    wr32(&mut g, 0, GICR_CTLR, 1);
    assert_eq!(rd32(&mut g, 0, GICR_CTLR), 0);
    g.redist_write(0, GICR_PROPBASER, Double, 0x1234_5000);
    assert_eq!(g.redist_read(0, GICR_PROPBASER, Double), 0);
    g.redist_write(0, GICR_TYPER, Double, 0);
    assert_eq!(g.redist_read(0, GICR_TYPER, Double), typer_of(0, 0));
}

fn typer_of(vcpu: u64, aff: u64) -> u64 {
    (aff << 32) | (vcpu << 8)
}

#[test]
fn gicr_typer_affinity_layout() {
    let mut g = VGic::new(VGicConfig {
        num_spis: 32,
        vcpu_mpidr: vec![0x8000_0000 | 0x12_0304_0506],
        ..VGicConfig::default()
    });
    // Aff3=0x12 Aff2=0x04 Aff1=0x05 Aff0=0x06; MPIDR bit 31 (RES1) must not leak.
    assert_eq!(
        g.redist_read(0, GICR_TYPER, Double),
        (0x1204_0506 << 32) | GICR_TYPER_LAST
    );
}

#[test]
fn private_enables_are_banked_per_vcpu() {
    let mut g = gic();
    dw32(&mut g, GICD_CTLR, 0b11);
    // Linux gic_cpu_config(): disable everything, then enable SGIs.
    wr32(&mut g, 1, GICR_ICENABLER0, !0);
    wr32(&mut g, 1, GICR_ISENABLER0, 0xFFFF);
    wr32(&mut g, 1, GICR_ISENABLER0, 1 << 27); // vtimer PPI
    assert_eq!(rd32(&mut g, 1, GICR_ISENABLER0), 0x0800_FFFF);
    assert_eq!(rd32(&mut g, 1, GICR_ICENABLER0), 0x0800_FFFF);
    assert_eq!(rd32(&mut g, 0, GICR_ISENABLER0), 0);
    assert!(g.enable_bit(1, IntId(27)) && !g.enable_bit(0, IntId(27)));
    wr32(&mut g, 1, GICR_ICENABLER0, 1 << 3);
    assert!(!g.enable_bit(1, IntId(3)) && g.enable_bit(1, IntId(4)));
    // Group 0 by default; GICD_CTLR gates by group.
    assert!(g.is_enabled(1, IntId(27)));
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ENABLE_GRP1);
    assert!(!g.is_enabled(1, IntId(27)));
    assert!(g.enable_bit(1, IntId(27)));
    wr32(&mut g, 1, GICR_IGROUPR0, !0);
    assert!(g.is_enabled(1, IntId(27)) && g.group1(1, IntId(0)));
    assert_eq!(rd32(&mut g, 1, GICR_IGROUPR0), !0);
    assert!(!g.group1(2, IntId(0)));
    // The GICD banked views are RAZ/WI with ARE=1.
    dw32(&mut g, GICD_ISENABLER, !0);
    assert_eq!(dr32(&mut g, GICD_ISENABLER), 0);
    assert!(!g.enable_bit(0, IntId(5)));
}

#[test]
fn spi_enables_and_pending_via_distributor() {
    let mut g = gic();
    dw32(&mut g, GICD_ISENABLER + 4, 1 << 1 | 1 << 31); // INTIDs 33, 63
    dw32(&mut g, GICD_ISENABLER + 8, 1); // INTID 64
    assert!(g.enable_bit(3, IntId(33)) && g.enable_bit(0, IntId(63)) && g.enable_bit(0, IntId(64)));
    assert_eq!(dr32(&mut g, GICD_ICENABLER + 4), 0x8000_0002);
    dw32(&mut g, GICD_ICENABLER + 4, 1 << 31);
    assert!(!g.enable_bit(0, IntId(63)));
    // Word 3 (INTIDs 96..127) is beyond num_spis: RAZ/WI.
    dw32(&mut g, GICD_ISENABLER + 12, !0);
    assert_eq!(dr32(&mut g, GICD_ISENABLER + 12), 0);
    // Pending latch through ISPENDR/ICPENDR and the API.
    dw32(&mut g, GICD_ISPENDR + 4, 1 << 8);
    assert!(g.is_pending(2, IntId(40)));
    g.set_pending(0, IntId(41));
    assert_eq!(dr32(&mut g, GICD_ICPENDR + 4), 0x300);
    dw32(&mut g, GICD_ICPENDR + 4, 1 << 8);
    assert!(!g.is_pending(0, IntId(40)) && g.is_pending(0, IntId(41)));
    g.clear_pending(3, IntId(41));
    assert!(!g.is_pending(0, IntId(41)));
    // Active registers are RAZ/WI.
    dw32(&mut g, GICD_ISACTIVER + 4, !0);
    assert_eq!(dr32(&mut g, GICD_ISACTIVER + 4), 0);
    // Private pending via GICR and API.
    wr32(&mut g, 2, GICR_ISPENDR0, 1 << 20);
    assert!(g.is_pending(2, IntId(20)) && !g.is_pending(1, IntId(20)));
    g.set_pending(1, IntId(5));
    assert_eq!(rd32(&mut g, 1, GICR_ICPENDR0), 1 << 5);
    wr32(&mut g, 1, GICR_ICPENDR0, 1 << 5);
    assert!(!g.is_pending(1, IntId(5)));
}

#[test]
fn ipriorityr_byte_and_word() {
    let mut g = gic();
    dw32(&mut g, GICD_IPRIORITYR + 32, 0x4433_2211);
    assert_eq!(g.priority(0, IntId(32)), 0x11);
    assert_eq!(g.priority(0, IntId(35)), 0x44);
    g.dist_write(GICD_IPRIORITYR + 33, Byte, 0xFF);
    assert_eq!(g.priority(0, IntId(33)), 0xFF, "all 8 bits implemented");
    assert_eq!(g.dist_read(GICD_IPRIORITYR + 34, Byte), 0x33);
    assert_eq!(dr32(&mut g, GICD_IPRIORITYR + 32), 0x4433_FF11);
    // Private priorities: GICD view RAZ/WI, GICR view banked.
    dw32(&mut g, GICD_IPRIORITYR, !0);
    assert_eq!(g.priority(0, IntId(0)), 0);
    wr32(&mut g, 1, GICR_IPRIORITYR + 24, 0xa0b0_c0d0);
    g.redist_write(1, GICR_IPRIORITYR + 1, Byte, 0x80);
    assert_eq!(g.priority(1, IntId(24)), 0xd0);
    assert_eq!(g.priority(1, IntId(27)), 0xa0);
    assert_eq!(g.priority(1, IntId(1)), 0x80);
    assert_eq!(g.priority(0, IntId(1)), 0);
    assert_eq!(g.redist_read(1, GICR_IPRIORITYR + 25, Byte), 0xc0);
    assert_eq!(rd32(&mut g, 1, GICR_IPRIORITYR), 0x8000);
    // Halfword accesses are not supported: RAZ/WI.
    g.dist_write(GICD_IPRIORITYR + 36, Half, 0xFFFF);
    assert_eq!(g.priority(0, IntId(36)), 0);
    assert_eq!(g.dist_read(GICD_IPRIORITYR + 32, Half), 0);
    // Byte access to a register that only takes words: RAZ/WI.
    g.dist_write(GICD_ISENABLER + 4, Byte, 0xFF);
    assert!(!g.enable_bit(0, IntId(32)));
}

#[test]
fn icfgr_writable_bits() {
    let mut g = gic();
    // Reset: SPIs level.
    assert_eq!(dr32(&mut g, GICD_ICFGR + 8), 0);
    assert!(!g.is_edge(0, IntId(32)));
    // Only bit[2F+1] is writable.
    dw32(&mut g, GICD_ICFGR + 8, 0xFFFF_FFFF);
    assert_eq!(dr32(&mut g, GICD_ICFGR + 8), 0xAAAA_AAAA);
    assert!(g.is_edge(0, IntId(32)) && g.is_edge(0, IntId(47)) && !g.is_edge(0, IntId(48)));
    dw32(&mut g, GICD_ICFGR + 8, 0b10 << 2);
    assert!(!g.is_edge(0, IntId(32)) && g.is_edge(0, IntId(33)));
    // INTIDs 80..95 (ICFGR5) exist, ICFGR6 does not.
    dw32(&mut g, GICD_ICFGR + 20, 0x8000_0000);
    assert!(g.is_edge(0, IntId(95)));
    dw32(&mut g, GICD_ICFGR + 24, !0);
    assert_eq!(dr32(&mut g, GICD_ICFGR + 24), 0);
    // GICD view of private config is RAZ/WI.
    assert_eq!(dr32(&mut g, GICD_ICFGR), 0);
    // SGIs: always edge, ICFGR0 read-only.
    assert_eq!(rd32(&mut g, 0, GICR_ICFGR0), 0xAAAA_AAAA);
    wr32(&mut g, 0, GICR_ICFGR0, 0);
    assert_eq!(rd32(&mut g, 0, GICR_ICFGR0), 0xAAAA_AAAA);
    assert!(g.is_edge(0, IntId(15)));
    // PPIs: level at reset, programmable per vCPU.
    assert_eq!(rd32(&mut g, 0, GICR_ICFGR1), 0);
    assert!(!g.is_edge(0, IntId(27)));
    wr32(&mut g, 0, GICR_ICFGR1, 0b11 << 22); // INTID 27
    assert_eq!(rd32(&mut g, 0, GICR_ICFGR1), 0b10 << 22);
    assert!(g.is_edge(0, IntId(27)) && !g.is_edge(1, IntId(27)));
}

#[test]
fn irouter_routing() {
    let mut g = gic();
    // 64-bit write to vCPU 3 (Aff1=1).
    g.dist_write(GICD_IROUTER + 8 * 40, Double, 0x100);
    assert_eq!(g.spi_target(IntId(40)), 3);
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 40, Double), 0x100);
    // 32-bit halves.
    g.dist_write(GICD_IROUTER + 8 * 41, Word, 0x2);
    assert_eq!(g.spi_target(IntId(41)), 2);
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 41, Word), 0x2);
    // Aff3 in the upper half: no vCPU has Aff3=1 -> 0.
    g.dist_write(GICD_IROUTER + 8 * 41 + 4, Word, 0x1);
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 41 + 4, Word), 0x1);
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 41, Double), 0x1_0000_0002);
    assert_eq!(g.spi_target(IntId(41)), 0);
    // IRM=1 -> vCPU 0; reserved bits are RES0.
    g.dist_write(GICD_IROUTER + 8 * 42, Double, u64::MAX);
    assert_eq!(
        g.dist_read(GICD_IROUTER + 8 * 42, Double),
        GICD_IROUTER_WRITABLE
    );
    assert_eq!(g.spi_target(IntId(42)), 0);
    // IROUTER<n> for n < 32 and beyond the SPIs: RAZ/WI.
    g.dist_write(GICD_IROUTER + 8 * 5, Double, 1);
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 5, Double), 0);
    g.dist_write(GICD_IROUTER + 8 * 96, Double, 1);
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 96, Double), 0);
    assert_eq!(g.spi_target(IntId(96)), 0);
    assert_eq!(g.spi_target(IntId(3)), 0);
    // ITARGETSR is RAZ/WI with ARE=1.
    dw32(&mut g, GICD_ITARGETSR + 40, !0);
    assert_eq!(dr32(&mut g, GICD_ITARGETSR + 40), 0);
}

#[test]
fn pop_deliverable_order_exclusion_and_gating() {
    let mut g = gic();
    // Enable SGI 1, PPI 27 on vCPU 0 and SPIs 40 (-> vCPU 0) and 41 (-> vCPU 3).
    wr32(&mut g, 0, GICR_ISENABLER0, (1 << 1) | (1 << 27));
    dw32(&mut g, GICD_ISENABLER + 4, (1 << 8) | (1 << 9));
    g.dist_write(GICD_IROUTER + 8 * 41, Double, 0x100);
    g.redist_write(0, GICR_IPRIORITYR + 1, Byte, 0x80);
    g.redist_write(0, GICR_IPRIORITYR + 27, Byte, 0x40);
    g.dist_write(GICD_IPRIORITYR + 40, Byte, 0x40);
    g.dist_write(GICD_IPRIORITYR + 41, Byte, 0x10);
    for intid in [1, 27, 40, 41] {
        g.set_pending(0, IntId(intid));
    }
    g.set_pending(0, IntId(2)); // not enabled

    // Group 0 interrupts, group 0 disabled: nothing.
    assert_eq!(g.pop_deliverable(0, &[]), None);
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ENABLE_GRP0);

    // Ties at 0x40 go to the lowest INTID; exclusion skips an INTID without consuming it.
    assert_eq!(g.pop_deliverable(0, &[IntId(27)]), Some((IntId(40), 0x40)));
    assert!(g.is_pending(0, IntId(27)));
    assert_eq!(g.pop_deliverable(0, &[]), Some((IntId(27), 0x40)));
    assert!(!g.is_pending(0, IntId(27)));
    assert_eq!(g.pop_deliverable(0, &[]), Some((IntId(1), 0x80)));
    assert_eq!(g.pop_deliverable(0, &[]), None);
    assert!(g.is_pending(0, IntId(2)));
    // SPI 41 only goes to its target, vCPU 3.
    assert_eq!(g.pop_deliverable(1, &[]), None);
    assert_eq!(g.pop_deliverable(3, &[]), Some((IntId(41), 0x10)));
    assert_eq!(g.pop_deliverable(3, &[]), None);

    // Group 1 gating.
    dw32(&mut g, GICD_IGROUPR + 4, 1 << 8);
    g.set_pending(0, IntId(40));
    assert!(!g.is_enabled(0, IntId(40)));
    assert_eq!(g.pop_deliverable(0, &[]), None);
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ENABLE_GRP1);
    assert!(g.is_enabled(0, IntId(40)));
    assert_eq!(g.pop_deliverable(0, &[]), Some((IntId(40), 0x40)));
    // Unknown vCPU.
    assert_eq!(g.pop_deliverable(9, &[]), None);
}

#[test]
fn sgi_target_decoding() {
    let g = gic();
    let sgi1r = |intid: u64, aff1: u64, list: u64| (intid << 24) | (aff1 << 16) | list;
    // Target list in cluster 0: vCPUs 0 and 2; Aff0=3 does not exist.
    assert_eq!(g.sgi_targets(sgi1r(5, 0, 0b1101), 0), (IntId(5), 0b0101));
    // Aff1=1 selects vCPU 3 (Aff0=0).
    assert_eq!(g.sgi_targets(sgi1r(15, 1, 0b1), 1), (IntId(15), 0b1000));
    // Self-targeting through the list is allowed.
    assert_eq!(g.sgi_targets(sgi1r(0, 0, 0b10), 1), (IntId(0), 0b0010));
    // IRM=1: everyone but the sender.
    assert_eq!(g.sgi_targets((1 << 40) | (7 << 24), 2), (IntId(7), 0b1011));
    // Aff2/Aff3/RS mismatches hit nothing.
    assert_eq!(g.sgi_targets((1 << 32) | 1, 0), (IntId(0), 0));
    assert_eq!(g.sgi_targets((1 << 48) | 1, 0), (IntId(0), 0));
    assert_eq!(g.sgi_targets((1 << 44) | 1, 0), (IntId(0), 0));

    // Range selector and Aff3 addressing.
    let g = VGic::new(VGicConfig {
        num_spis: 0,
        vcpu_mpidr: vec![0x0, 0x12, 0x2_0000_0000],
        ..VGicConfig::default()
    });
    assert_eq!(g.sgi_targets((1 << 44) | (1 << 2), 0), (IntId(0), 0b010));
    assert_eq!(g.sgi_targets((2 << 48) | 1, 0), (IntId(0), 0b100));
}

#[test]
fn registers_with_no_state_are_raz_wi() {
    let mut g = gic();
    for off in [
        GICD_TYPER2,
        GICD_STATUSR,
        GICD_IGRPMODR + 4,
        GICD_NSACR + 8,
        GICD_SGIR,
        GICD_ICACTIVER + 4,
    ] {
        dw32(&mut g, off, !0);
        assert_eq!(dr32(&mut g, off), 0, "GICD offset {off:#x}");
    }
    for off in [
        GICR_STATUSR,
        GICR_IGRPMODR0,
        GICR_NSACR,
        GICR_ISACTIVER0,
        GICR_ICACTIVER0,
        GICR_PENDBASER,
        GICR_PENDBASER + 4,
    ] {
        wr32(&mut g, 0, off, !0);
        assert_eq!(rd32(&mut g, 0, off), 0, "GICR offset {off:#x}");
    }
    // Read-only registers stay put.
    let typer = dr32(&mut g, GICD_TYPER);
    dw32(&mut g, GICD_TYPER, 0);
    assert_eq!(dr32(&mut g, GICD_TYPER), typer);
    // A 64-bit read of a 32-bit register is RAZ.
    assert_eq!(g.dist_read(GICD_CTLR, Double), 0);
}

#[test]
fn never_panics_on_any_access() {
    let mut g = gic();
    let widths = [Byte, Half, Word, Double];
    let offsets = (0..0x2_0000u64).step_by(4).chain([
        1,
        3,
        5,
        0xFFFF,
        0xFFFF_FFFF,
        u64::MAX,
        u64::MAX - 3,
        0x1_FFFC,
    ]);
    let offsets: Vec<u64> = offsets.collect();
    for &w in &widths {
        for &off in &offsets {
            for v in [0, u64::MAX] {
                g.dist_read(off, w);
                g.dist_write(off, w, v);
                for vcpu in [0, 3, 4, usize::MAX] {
                    g.redist_read(vcpu, off, w);
                    g.redist_write(vcpu, off, w, v);
                }
            }
        }
    }
    for intid in [0, 31, 32, 95, 96, 1019, 1023, u32::MAX] {
        for vcpu in [0, 4, usize::MAX] {
            let _ = (
                g.is_enabled(vcpu, IntId(intid)),
                g.enable_bit(vcpu, IntId(intid)),
                g.priority(vcpu, IntId(intid)),
                g.group1(vcpu, IntId(intid)),
                g.is_edge(vcpu, IntId(intid)),
                g.spi_target(IntId(intid)),
                g.is_pending(vcpu, IntId(intid)),
            );
            g.set_pending(vcpu, IntId(intid));
            g.clear_pending(vcpu, IntId(intid));
        }
    }
    let _ = g.pop_deliverable(usize::MAX, &[]);
    let _ = g.sgi_targets(u64::MAX, usize::MAX);
    // Out-of-range vCPUs read as zero.
    assert_eq!(g.redist_read(4, GICR_PIDR2, Word), 0);
    assert_eq!(g.redist_read(4, GICR_TYPER, Double), 0);
    // Misaligned word: RAZ/WI.
    assert_eq!(g.dist_read(GICD_CTLR + 1, Word), 0);
    // No vCPUs at all.
    let mut empty = VGic::new(VGicConfig::default());
    assert_eq!(empty.num_vcpus(), 0);
    assert_eq!(empty.redist_read(0, GICR_TYPER, Double), 0);
    assert_eq!(empty.sgi_targets(1 << 40, 0), (IntId(0), 0));
    empty.dist_write(GICD_IROUTER + 8 * 32, Double, 0);
}

// ---- LPIs ----

use crate::hw::fake::FakeRam;

/// Guest RAM of the LPI tests: 1 MiB at IPA 0x4000_0000.
const RAM_BASE: u64 = 0x4000_0000;
/// Where the tests put the property table (64 KiB-aligned, as Linux allocates it).
const PROP_PA: u64 = RAM_BASE + 0x1_0000;
/// PROPBASER as Linux 6.12 writes it: PA | InnerCache=RaWaWb (7) | Shareability=Inner (1) |
/// IDbits=15.
const PROPBASER_LINUX: u64 = PROP_PA | (7 << 7) | (1 << 10) | 15;
/// PENDBASER as Linux writes it, with PTZ.
const PENDBASER_LINUX: u64 = (RAM_BASE + 0x2_0000) | (7 << 7) | (1 << 10) | (1 << 62);

/// Two vCPUs, 64 SPIs, LPIs bounded at `max_lpis`; Group 1 on.
fn lpi_gic(max_lpis: u32) -> VGic {
    let mut g = VGic::new(VGicConfig {
        num_spis: 64,
        vcpu_mpidr: vec![0, 1],
        lpis: true,
        max_lpis,
    });
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1);
    g
}

fn ram() -> FakeRam {
    FakeRam::new(RAM_BASE, 0x10_0000)
}

/// Writes the property table entry of `intid` in guest RAM.
fn prop(ram: &FakeRam, intid: u32, cfg: u8) {
    use crate::hw::GuestRam;
    ram.write(
        crate::hw::Ipa(PROP_PA + u64::from(intid - LPI_BASE)),
        &[cfg],
    )
    .unwrap();
}

/// What Linux's its_cpu_init_lpis does on `vcpu`: PROPBASER, PENDBASER, then EnableLPIs.
fn enable_lpis(g: &mut VGic, vcpu: usize) {
    g.redist_write(vcpu, GICR_PROPBASER, Double, PROPBASER_LINUX);
    g.redist_write(vcpu, GICR_PENDBASER, Double, PENDBASER_LINUX);
    wr32(g, vcpu, GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
}

#[test]
fn lpis_off_keeps_the_lpi_less_gic() {
    let mut g = gic();
    let typer = dr32(&mut g, GICD_TYPER);
    assert_eq!(typer & GICD_TYPER_LPIS, 0);
    assert_eq!((typer >> GICD_TYPER_IDBITS_SHIFT) & 0x1F, 9);
    assert_eq!((typer >> GICD_TYPER_NUM_LPIS_SHIFT) & 0x1F, 0);
    assert_eq!(g.redist_read(0, GICR_TYPER, Double) & GICR_TYPER_PLPIS, 0);
    wr32(&mut g, 0, GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    assert_eq!(rd32(&mut g, 0, GICR_CTLR), 0);
    g.redist_write(0, GICR_PROPBASER, Double, PROPBASER_LINUX);
    wr32(&mut g, 0, GICR_PENDBASER + 4, 0x1234);
    assert_eq!(g.redist_read(0, GICR_PROPBASER, Double), 0);
    assert_eq!(rd32(&mut g, 0, GICR_PENDBASER + 4), 0);
    assert_eq!(g.num_lpis(), 0);
    // No store: the LPI entry points do nothing.
    g.set_lpi_pending(0, LPI_BASE);
    assert!(!g.is_lpi_pending(0, LPI_BASE));
    assert!(!g.group1(0, IntId(LPI_BASE)));
    assert!(!g.is_edge(0, IntId(LPI_BASE)));
    let ram = ram();
    g.lpi_config_refresh_all(&ram, 0);
    assert_eq!(g.pop_deliverable(0, &[]), None);
}

#[test]
fn lpis_on_advertises_lpis_and_16_bit_intids() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let typer = dr32(&mut g, GICD_TYPER);
    assert_ne!(typer & GICD_TYPER_LPIS, 0);
    assert_eq!((typer >> GICD_TYPER_IDBITS_SHIFT) & 0x1F, 15);
    // Linux: numlpis = 2^(num_LPIs + 1) = 8192, the store's bound.
    assert_eq!(
        1u32 << (((typer >> GICD_TYPER_NUM_LPIS_SHIFT) & 0x1F) + 1),
        8192
    );
    assert_eq!(typer & 0x1F, 2, "ITLinesNumber unchanged");
    for vcpu in 0..2 {
        let t = g.redist_read(vcpu, GICR_TYPER, Double);
        assert_ne!(t & GICR_TYPER_PLPIS, 0);
        // VLPIS [1], DirectLPI [3], CommonLPIAff [25:24] all 0.
        assert_eq!(t & ((1 << 1) | (1 << 3) | (3 << 24)), 0);
        assert_eq!(rd32(&mut g, vcpu, GICR_TYPER) as u64, t & 0xFFFF_FFFF);
    }
    // The whole 16-bit range: no num_LPIs restriction.
    let mut full = lpi_gic(u32::MAX);
    assert_eq!(full.num_lpis(), MAX_LPIS);
    assert_eq!(
        (dr32(&mut full, GICD_TYPER) >> GICD_TYPER_NUM_LPIS_SHIFT) & 0x1F,
        0
    );
    // A bound that is not a power of two advertises the power of two below it.
    let mut odd = lpi_gic(3000);
    assert_eq!(
        (dr32(&mut odd, GICD_TYPER) >> GICD_TYPER_NUM_LPIS_SHIFT) & 0x1F,
        10
    );
}

#[test]
fn propbaser_and_pendbaser_read_back_as_written_until_enable_lpis() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    g.redist_write(0, GICR_PROPBASER, Double, PROPBASER_LINUX);
    assert_eq!(g.redist_read(0, GICR_PROPBASER, Double), PROPBASER_LINUX);
    // PTZ reads 0; the rest as written.
    g.redist_write(0, GICR_PENDBASER, Double, PENDBASER_LINUX);
    assert_eq!(
        g.redist_read(0, GICR_PENDBASER, Double),
        PENDBASER_LINUX & !(1 << 62)
    );
    // OuterCache and a high PA stick; RES0 bits do not.
    let outer = (5 << 56) | 0x000F_0000_0000_0000 | 0x60 | (1 << 63);
    g.redist_write(1, GICR_PROPBASER, Double, PROPBASER_LINUX | outer);
    assert_eq!(
        g.redist_read(1, GICR_PROPBASER, Double),
        PROPBASER_LINUX | (5 << 56) | 0x000F_0000_0000_0000
    );
    // Per vCPU: vCPU 0 unchanged.
    assert_eq!(g.redist_read(0, GICR_PROPBASER, Double), PROPBASER_LINUX);
    // 32-bit halves.
    wr32(&mut g, 1, GICR_PROPBASER, 0x4567_8F8F);
    wr32(&mut g, 1, GICR_PROPBASER + 4, 0x0000_0012);
    assert_eq!(
        g.redist_read(1, GICR_PROPBASER, Double),
        0x12_4567_8F8F & GICR_PROPBASER_WRITABLE
    );
    assert_eq!(rd32(&mut g, 1, GICR_PROPBASER + 4), 0x12);
    assert_eq!(rd32(&mut g, 1, GICR_PROPBASER), 0x4567_8F8F & 0xFFFF_FF9F);
    wr32(&mut g, 1, GICR_PENDBASER + 4, 0x4000_0001);
    assert_eq!(rd32(&mut g, 1, GICR_PENDBASER + 4), 0x1, "PTZ reads 0");
}

#[test]
fn enable_lpis_is_set_once_and_freezes_the_table_registers() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    assert_eq!(rd32(&mut g, 0, GICR_CTLR), 0);
    wr32(&mut g, 0, GICR_CTLR, 0);
    assert_eq!(rd32(&mut g, 0, GICR_CTLR), 0);
    enable_lpis(&mut g, 0);
    // EnableLPIs set, RWP (bit 3) and CES (bit 1) 0.
    assert_eq!(rd32(&mut g, 0, GICR_CTLR), GICR_CTLR_ENABLE_LPIS);
    // Linux's redist_disable_lpis: clearing fails, which it reports rather than hangs on.
    wr32(&mut g, 0, GICR_CTLR, 0);
    assert_eq!(rd32(&mut g, 0, GICR_CTLR), GICR_CTLR_ENABLE_LPIS);
    // Writes to the table registers are ignored now, 64- or 32-bit.
    g.redist_write(0, GICR_PROPBASER, Double, 0);
    wr32(&mut g, 0, GICR_PROPBASER, 0);
    g.redist_write(0, GICR_PENDBASER, Double, 0);
    wr32(&mut g, 0, GICR_PENDBASER + 4, 0);
    assert_eq!(g.redist_read(0, GICR_PROPBASER, Double), PROPBASER_LINUX);
    assert_eq!(
        g.redist_read(0, GICR_PENDBASER, Double),
        PENDBASER_LINUX & !(1 << 62)
    );
    // vCPU 1 still has EnableLPIs 0 and writable registers.
    assert_eq!(rd32(&mut g, 1, GICR_CTLR), 0);
    g.redist_write(1, GICR_PROPBASER, Double, PROP_PA);
    assert_eq!(g.redist_read(1, GICR_PROPBASER, Double), PROP_PA);
}

#[test]
fn lpi_config_is_read_from_the_property_table_at_refresh_only() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let ram = ram();
    let lpi = LPI_BASE + 5;
    prop(&ram, lpi, 0xA1);
    // Before EnableLPIs the table is not read.
    g.redist_write(0, GICR_PROPBASER, Double, PROPBASER_LINUX);
    g.lpi_config_refresh(&ram, 0, lpi);
    assert!(!g.enable_bit(0, IntId(lpi)));
    wr32(&mut g, 0, GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    g.lpi_config_refresh(&ram, 0, lpi);
    assert!(g.enable_bit(0, IntId(lpi)));
    assert!(g.is_enabled(0, IntId(lpi)));
    assert_eq!(
        g.priority(0, IntId(lpi)),
        0xA0,
        "Priority [7:2], low bits 0"
    );
    assert!(g.group1(0, IntId(lpi)));
    assert!(g.is_edge(0, IntId(lpi)));
    // The guest disables it in its table: no effect until the next INV.
    prop(&ram, lpi, 0xA0);
    assert!(g.enable_bit(0, IntId(lpi)));
    g.lpi_config_refresh(&ram, 0, lpi);
    assert!(!g.enable_bit(0, IntId(lpi)));
    // INVALL reads them all.
    prop(&ram, LPI_BASE, 0x41);
    prop(&ram, LPI_BASE + 8191, 0x61);
    prop(&ram, lpi, 0x81);
    g.lpi_config_refresh_all(&ram, 0);
    assert_eq!(g.priority(0, IntId(LPI_BASE)), 0x40);
    assert_eq!(g.priority(0, IntId(LPI_BASE + 8191)), 0x60);
    assert_eq!(g.priority(0, IntId(lpi)), 0x80);
    assert!(g.enable_bit(0, IntId(LPI_BASE + 8191)));
    assert!(!g.enable_bit(0, IntId(LPI_BASE + 1)));
    // GICD_CTLR.EnableGrp1 off: enabled in the table but not deliverable.
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ARE);
    assert!(!g.is_enabled(0, IntId(lpi)));
}

#[test]
fn a_property_table_outside_ram_or_past_idbits_leaves_lpis_disabled() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let ram = ram();
    prop(&ram, LPI_BASE, 0x01);
    prop(&ram, LPI_BASE + 4096, 0x01);
    // IDbits = 12 (13-bit INTIDs): no LPI in range at all.
    g.redist_write(0, GICR_PROPBASER, Double, PROP_PA | 12);
    wr32(&mut g, 0, GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    g.lpi_config_refresh_all(&ram, 0);
    assert!(!g.enable_bit(0, IntId(LPI_BASE)));
    g.lpi_config_refresh(&ram, 0, LPI_BASE);
    assert!(!g.enable_bit(0, IntId(LPI_BASE)));
    // IDbits = 13: 8192..16383 in range, so the INVALL read is 8192 bytes (all of the store).
    g.redist_write(1, GICR_PROPBASER, Double, PROP_PA | 13);
    wr32(&mut g, 1, GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    g.lpi_config_refresh_all(&ram, 1);
    assert!(g.enable_bit(0, IntId(LPI_BASE)));
    assert!(g.enable_bit(0, IntId(LPI_BASE + 4096)));

    // A table that runs off the end of RAM: the one bounded read fails, everything disabled.
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let end = RAM_BASE + 0x10_0000 - 0x1000;
    g.redist_write(0, GICR_PROPBASER, Double, end | 15);
    wr32(&mut g, 0, GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    g.lpi_config_refresh_all(&ram, 0);
    assert!(!g.enable_bit(0, IntId(LPI_BASE)));
    // ...but a single entry inside RAM reads fine, and one past it reads as disabled.
    use crate::hw::GuestRam;
    ram.write(crate::hw::Ipa(end + 3), &[0x01]).unwrap();
    g.lpi_config_refresh(&ram, 0, LPI_BASE + 3);
    assert!(g.enable_bit(0, IntId(LPI_BASE + 3)));
    g.lpi_config_refresh(&ram, 0, LPI_BASE + 0x1000);
    assert!(!g.enable_bit(0, IntId(LPI_BASE + 0x1000)));
    // PROPBASER with a PA the IPA space cannot hold.
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    g.redist_write(0, GICR_PROPBASER, Double, GICR_PROPBASER_PA_MASK | 15);
    wr32(&mut g, 0, GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    g.lpi_config_refresh_all(&ram, 0);
    g.lpi_config_refresh(&ram, 0, LPI_BASE + 8191);
    assert!(!g.enable_bit(0, IntId(LPI_BASE + 8191)));
}

#[test]
fn lpis_past_the_bound_are_ignored() {
    let mut g = lpi_gic(64);
    let ram = ram();
    enable_lpis(&mut g, 0);
    for i in [0, 63, 64, 65, 8191] {
        prop(&ram, LPI_BASE + i, 0x01);
    }
    g.lpi_config_refresh_all(&ram, 0);
    g.lpi_config_refresh(&ram, 0, LPI_BASE + 64);
    assert!(g.enable_bit(0, IntId(LPI_BASE + 63)));
    assert!(!g.enable_bit(0, IntId(LPI_BASE + 64)));
    assert!(!g.enable_bit(0, IntId(LPI_BASE + 8191)));
    for intid in [LPI_BASE + 64, LPI_BASE + 8191, u32::MAX] {
        g.set_lpi_pending(0, intid);
        assert!(!g.is_lpi_pending(0, intid));
        assert!(!g.group1(0, IntId(intid)));
    }
    // INTIDs 1024..8191 are not LPIs.
    g.set_lpi_pending(0, LPI_BASE - 1);
    assert!(!g.is_lpi_pending(0, LPI_BASE - 1));
    assert_eq!(g.pop_deliverable(0, &[]), None);
    g.set_lpi_pending(0, LPI_BASE + 63);
    assert_eq!(g.pop_deliverable(0, &[]), Some((IntId(LPI_BASE + 63), 0)));
}

#[test]
fn lpi_pending_and_delivery_gating() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let ram = ram();
    let (a, b) = (LPI_BASE + 1, LPI_BASE + 2);
    prop(&ram, a, 0x91);
    prop(&ram, b, 0x90); // disabled
                         // EnableLPIs 0 on vCPU 0: the redistributor takes no LPI.
    g.set_lpi_pending(0, a);
    assert!(!g.is_lpi_pending(0, a));
    enable_lpis(&mut g, 0);
    g.lpi_config_refresh_all(&ram, 0);
    g.set_lpi_pending(0, a);
    g.set_lpi_pending(0, b);
    assert!(g.is_lpi_pending(0, a) && g.is_pending(0, IntId(b)));
    assert!(!g.is_lpi_pending(1, a), "pending is per vCPU");
    // Excluded (already in a list register): not offered.
    assert_eq!(g.pop_deliverable(0, &[IntId(a)]), None);
    // Group 1 off: not delivered, still pending.
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP0);
    assert_eq!(g.pop_deliverable(0, &[]), None);
    dw32(&mut g, GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1);
    // The disabled one is never delivered; the enabled one once, and popping clears it.
    assert_eq!(g.pop_deliverable(0, &[]), Some((IntId(a), 0x90)));
    assert!(!g.is_lpi_pending(0, a));
    assert_eq!(g.pop_deliverable(0, &[]), None);
    assert!(g.is_lpi_pending(0, b), "a disabled LPI stays pending");
    // Enabling it by INV makes it deliverable.
    prop(&ram, b, 0x31);
    g.lpi_config_refresh(&ram, 0, b);
    assert_eq!(g.pop_deliverable(0, &[]), Some((IntId(b), 0x30)));
    // CLEAR.
    g.set_lpi_pending(0, a);
    g.clear_lpi_pending(0, a);
    assert_eq!(g.pop_deliverable(0, &[]), None);
}

#[test]
fn lpis_and_spis_are_ordered_by_priority() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let ram = ram();
    let lpi = LPI_BASE + 100;
    prop(&ram, lpi, 0x81);
    enable_lpis(&mut g, 0);
    g.lpi_config_refresh(&ram, 0, lpi);
    // SPI 40: Group 1, enabled, priority 0xA0 then 0x80.
    dw32(&mut g, GICD_IGROUPR + 4, !0);
    dw32(&mut g, GICD_ISENABLER + 4, 1 << 8);
    g.dist_write(GICD_IPRIORITYR + 40, Byte, 0xA0);
    let spi = IntId(40);
    g.set_pending(0, spi);
    g.set_lpi_pending(0, lpi);
    // LPI 0x80 beats SPI 0xA0.
    assert_eq!(g.pop_deliverable(0, &[]), Some((IntId(lpi), 0x80)));
    assert_eq!(g.pop_deliverable(0, &[]), Some((spi, 0xA0)));
    // A more urgent SPI beats the LPI; at equal priority the lower INTID (the SPI) wins.
    for (spi_prio, first) in [(0x40u8, spi), (0x80, spi)] {
        g.dist_write(GICD_IPRIORITYR + 40, Byte, spi_prio.into());
        g.set_pending(0, spi);
        g.set_lpi_pending(0, lpi);
        assert_eq!(g.pop_deliverable(0, &[]).map(|d| d.0), Some(first));
        assert_eq!(g.pop_deliverable(0, &[]).map(|d| d.0), Some(IntId(lpi)));
    }
}

#[test]
fn movall_moves_pending_lpis_between_vcpus() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let ram = ram();
    prop(&ram, LPI_BASE + 7, 0x01);
    prop(&ram, LPI_BASE + 700, 0x01);
    enable_lpis(&mut g, 0);
    enable_lpis(&mut g, 1);
    g.lpi_config_refresh_all(&ram, 0);
    g.set_lpi_pending(0, LPI_BASE + 7);
    g.set_lpi_pending(0, LPI_BASE + 700);
    g.set_lpi_pending(1, LPI_BASE + 8);
    g.move_lpis(0, 1);
    for l in [7, 700, 8] {
        assert!(g.is_lpi_pending(1, LPI_BASE + l), "{l}");
        assert!(!g.is_lpi_pending(0, LPI_BASE + l), "{l}");
    }
    assert_eq!(g.pop_deliverable(0, &[]), None);
    assert_eq!(
        g.pop_deliverable(1, &[]).map(|d| d.0),
        Some(IntId(LPI_BASE + 7))
    );
    // Out-of-range vCPUs and a move onto itself change nothing.
    g.move_lpis(1, 5);
    g.move_lpis(5, 1);
    g.move_lpis(1, 1);
    assert!(g.is_lpi_pending(1, LPI_BASE + 700));
}

#[test]
fn reset_clears_enable_lpis_the_table_registers_and_the_store() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let ram = ram();
    prop(&ram, LPI_BASE, 0x01);
    enable_lpis(&mut g, 0);
    g.lpi_config_refresh_all(&ram, 0);
    g.set_lpi_pending(0, LPI_BASE);
    g.reset();
    assert_eq!(rd32(&mut g, 0, GICR_CTLR), 0);
    assert_eq!(g.redist_read(0, GICR_PROPBASER, Double), 0);
    assert_eq!(g.redist_read(0, GICR_PENDBASER, Double), 0);
    assert!(!g.is_lpi_pending(0, LPI_BASE));
    assert!(!g.enable_bit(0, IntId(LPI_BASE)));
    assert_eq!(dr32(&mut g, GICD_CTLR), GICD_CTLR_ARE | GICD_CTLR_DS);
    // Same shape: LPIs still supported, and the registers writable again.
    assert_eq!(g.num_lpis(), DEFAULT_MAX_LPIS);
    assert_eq!(g.num_vcpus(), 2);
    g.redist_write(0, GICR_PROPBASER, Double, PROPBASER_LINUX);
    assert_eq!(g.redist_read(0, GICR_PROPBASER, Double), PROPBASER_LINUX);
}

#[test]
fn lpi_entry_points_never_panic() {
    let mut g = lpi_gic(DEFAULT_MAX_LPIS);
    let ram = ram();
    enable_lpis(&mut g, 0);
    for intid in [
        0,
        31,
        32,
        1019,
        1023,
        8191,
        8192,
        16383,
        16384,
        65535,
        u32::MAX,
    ] {
        for vcpu in [0, 2, usize::MAX] {
            g.lpi_config_refresh(&ram, vcpu, intid);
            g.set_lpi_pending(vcpu, intid);
            g.clear_lpi_pending(vcpu, intid);
            let _ = g.is_lpi_pending(vcpu, intid);
            g.move_lpis(vcpu, 0);
            g.move_lpis(0, vcpu);
        }
    }
    g.lpi_config_refresh_all(&ram, usize::MAX);
    g.redist_write(usize::MAX, GICR_PROPBASER, Double, 1);
    let _ = g.pop_deliverable(usize::MAX, &[]);
    let mut empty = VGic::new(VGicConfig {
        lpis: true,
        ..VGicConfig::default()
    });
    empty.lpi_config_refresh_all(&ram, 0);
    empty.set_lpi_pending(0, LPI_BASE);
    assert_eq!(empty.pop_deliverable(0, &[]), None);
}

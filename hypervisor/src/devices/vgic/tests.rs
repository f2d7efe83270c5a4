use super::regs::*;
use super::*;
use crate::mmio::AccessWidth::{Byte, Double, Half, Word};

/// 4 vCPUs: three in cluster 0 (Aff0 0..2) and one at Aff1=1, 64 SPIs (INTIDs 32..95).
fn gic() -> VGic {
    VGic::new(VGicConfig {
        num_spis: 64,
        vcpu_mpidr: vec![0x0, 0x1, 0x2, 0x100],
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

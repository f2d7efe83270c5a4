use super::*;
use crate::devices::vgic::regs::*;
use crate::devices::vgic::VGicConfig;
use crate::hw::fake::FakeHw;
use crate::mmio::AccessWidth::Word;

const TIMER: IntId = IntId(27);
const UART: IntId = IntId(33);

/// A two-vCPU vGIC whose guest turned on Group 1, put INTIDs 32..63 and the PPIs in Group 1
/// and enabled `spis` and the virtual timer on vCPU 0.
fn vgic(spis: &[u32]) -> VGic {
    let mut g = VGic::new(VGicConfig {
        num_spis: 64,
        vcpu_mpidr: alloc::vec![0, 1],
        ..VGicConfig::default()
    });
    g.dist_write(
        GICD_CTLR,
        Word,
        u64::from(GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1),
    );
    g.dist_write(GICD_IGROUPR + 4, Word, 0xffff_ffff);
    g.redist_write(0, GICR_IGROUPR0, Word, 0xffff_ffff);
    g.redist_write(0, GICR_ISENABLER0, Word, 1 << TIMER.0);
    for &i in spis {
        g.dist_write(GICD_ISENABLER + u64::from(i / 32) * 4, Word, 1 << (i % 32));
    }
    g
}

fn pend(g: &mut VGic, intid: u32) {
    g.dist_write(
        GICD_ISPENDR + u64::from(intid / 32) * 4,
        Word,
        1 << (intid % 32),
    );
}

#[test]
fn a_forwarded_interrupt_goes_in_as_a_hardware_entry() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    assert!(held.push(TIMER));
    let mut g = vgic(&[]);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    let lr = ListRegister(hw.lrs()[0]);
    assert_eq!(lr.state(), LrState::Pending);
    assert!(lr.is_hw());
    assert_eq!(lr.vintid(), TIMER.0);
    assert!(!held.any(), "it left the held set");
    assert_eq!(hw.hcr(), ICH_HCR_EN);
}

#[test]
fn a_forwarded_interrupt_the_guest_disabled_is_given_back() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    held.push(IntId(40));
    let mut g = vgic(&[]); // 40 not enabled
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(hw.lrs(), alloc::vec![0; 4]);
    assert_eq!(
        hw.take_ops(),
        alloc::vec![crate::hw::fake::HwOp::Deactivate(IntId(40))]
    );
    assert!(!held.any());
}

#[test]
fn more_pending_than_list_registers_asks_for_underflow_and_keeps_the_rest() {
    let hw = FakeHw::new(0, 2);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    let mut g = vgic(&[40, 41, 42]);
    for i in [40, 41, 42] {
        pend(&mut g, i);
    }
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    let got: alloc::vec::Vec<u32> = hw.lrs().iter().map(|&v| ListRegister(v).vintid()).collect();
    assert_eq!(got, [40, 41], "lowest INTID first at equal priority");
    assert_eq!(hw.hcr(), ICH_HCR_EN | ICH_HCR_UIE);
    assert!(
        g.pop_deliverable(0, &[IntId(40), IntId(41)]).is_some(),
        "42 still pending"
    );
    // The guest takes and EOIs both: the entries read back invalid.
    hw.set_lr(0, 0);
    hw.set_lr(1, 0);
    service_maintenance(&hw, &lrs);
    assert_eq!(hw.hcr(), ICH_HCR_EN, "underflow request dropped");
    pend(&mut g, 42);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(ListRegister(hw.lrs()[0]).vintid(), 42);
    assert_eq!(hw.hcr(), ICH_HCR_EN);
}

#[test]
fn a_completed_eoi_entry_is_cleared_so_the_maintenance_interrupt_drops() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut g = vgic(&[40]);
    // Level-triggered (ICFGR default): the entry asks for EOI maintenance.
    pend(&mut g, 40);
    let mut held = HwPending::default();
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    let lr = hw.lrs()[0];
    assert_ne!(
        lr & (1 << 41),
        0,
        "EOI maintenance requested for a level line"
    );
    // The guest deactivates it: state Invalid, the rest of the entry stays.
    hw.set_lr(0, lr & !(3 << 62));
    service_maintenance(&hw, &lrs);
    assert_eq!(hw.lrs()[0], 0);
}

#[test]
fn the_uart_level_is_delivered_once_to_the_vcpu_it_targets() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut g = vgic(&[UART.0]);
    let mut held = HwPending::default();
    fill(&hw, &lrs, &mut held, &mut g, 0, Some(UART));
    assert_eq!(ListRegister(hw.lrs()[0]).vintid(), UART.0);
    // Still high at the next exit, and still in a list register: not doubled.
    fill(&hw, &lrs, &mut held, &mut g, 0, Some(UART));
    let uarts = hw
        .lrs()
        .iter()
        .filter(|&&v| v != 0 && ListRegister(v).vintid() == UART.0)
        .count();
    assert_eq!(uarts, 1);
    // vCPU 1 is not its target.
    let hw1 = FakeHw::new(1, 4);
    let lrs1 = Lrs::new();
    lrs1.clear_all(&hw1);
    fill(&hw1, &lrs1, &mut held, &mut g, 1, Some(UART));
    assert_eq!(hw1.lrs(), alloc::vec![0; 4]);
}

#[test]
fn known_empty_list_registers_are_not_read_and_ich_hcr_is_written_on_change_only() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut g = vgic(&[]);
    let mut held = HwPending::default();
    let before = hw.sysreg_accesses();
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    let after = hw.sysreg_accesses();
    assert_eq!(after.0, before.0, "no list register read");
    assert_eq!(after.1, before.1, "no list register written");
    assert_eq!(after.2, before.2 + 1, "ICH_HCR_EL2 written once");
}

#[test]
fn pending_work_keeps_a_wfi_from_sleeping() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut g = vgic(&[40]);
    let mut held = HwPending::default();
    assert!(!has_pending(&hw, &lrs, &held, &mut g, 0));
    pend(&mut g, 40);
    assert!(has_pending(&hw, &lrs, &held, &mut g, 0));
    assert!(
        g.pop_deliverable(0, &[]).is_some(),
        "asking does not consume it"
    );
    held.push(TIMER);
    assert!(has_pending(&hw, &lrs, &held, &mut g, 0));
    let mut held = HwPending::default();
    lrs.write(&hw, 2, ListRegister::software(41, 0xa0, true, false));
    assert!(has_pending(&hw, &lrs, &held, &mut g, 0));
    held.take_all().for_each(drop);
}

#[test]
fn held_interrupts_are_bounded_and_not_doubled() {
    let mut held = HwPending::default();
    assert!(held.push(TIMER));
    assert!(held.push(TIMER));
    for i in 0..MAX_HW_PENDING as u32 - 1 {
        assert!(held.push(IntId(40 + i)));
    }
    assert!(!held.push(IntId(100)), "full: the caller deactivates it");
    assert_eq!(held.take_all().count(), MAX_HW_PENDING);
    assert!(!held.any());
}

// ---- LPIs ----

use crate::devices::vgic::{DEFAULT_MAX_LPIS, LPI_BASE};
use crate::hw::fake::FakeRam;
use crate::hw::{GuestRam, Ipa};

const PROP: u64 = 0x4001_0000;
const LPI: u32 = LPI_BASE + 42;

/// `vgic(spis)` with LPIs: vCPU 0 set EnableLPIs with its property table at `PROP`, where `LPI`
/// is enabled at priority 0x80, and INVALL read it.
fn lpi_vgic(spis: &[u32]) -> VGic {
    let mut g = VGic::new(VGicConfig {
        num_spis: 64,
        vcpu_mpidr: alloc::vec![0, 1],
        lpis: true,
        max_lpis: DEFAULT_MAX_LPIS,
    });
    g.dist_write(
        GICD_CTLR,
        Word,
        u64::from(GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1),
    );
    g.dist_write(GICD_IGROUPR + 4, Word, 0xffff_ffff);
    for &i in spis {
        g.dist_write(GICD_ISENABLER + u64::from(i / 32) * 4, Word, 1 << (i % 32));
    }
    let ram = FakeRam::new(0x4000_0000, 0x2_0000);
    ram.write(Ipa(PROP + u64::from(LPI - LPI_BASE)), &[0x81])
        .unwrap();
    g.redist_write(
        0,
        GICR_PROPBASER,
        crate::mmio::AccessWidth::Double,
        PROP | 15,
    );
    g.redist_write(0, GICR_CTLR, Word, u64::from(GICR_CTLR_ENABLE_LPIS));
    g.lpi_config_refresh_all(&ram, 0);
    g
}

fn lpis_in(hw: &FakeHw) -> usize {
    hw.lrs()
        .iter()
        .filter(|&&v| v != 0 && ListRegister(v).vintid() == LPI)
        .count()
}

#[test]
fn an_lpi_goes_in_as_a_software_entry_and_is_done_once_the_guest_eois_it() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    let mut g = lpi_vgic(&[]);
    g.set_lpi_pending(0, LPI);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    let v = hw.lrs()[0];
    let lr = ListRegister(v);
    assert_eq!(lr.state(), LrState::Pending);
    assert_eq!(lr.vintid(), LPI, "the 32-bit vINTID holds the LPI");
    assert!(!lr.is_hw());
    assert_eq!(
        v & (1 << 41),
        0,
        "no EOI maintenance: an LPI has no active state"
    );
    assert_ne!(v & (1 << 60), 0, "Group 1");
    assert_eq!((v >> 48) & 0xff, 0x80);
    assert!(!g.is_lpi_pending(0, LPI), "the list register has it now");
    // The guest acknowledges it (active) and EOIs it: the entry reads invalid.
    hw.set_lr(0, v & !(3 << 62) | (2 << 62));
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(lpis_in(&hw), 1, "still active: kept");
    hw.set_lr(0, v & !(3 << 62));
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(hw.lrs(), alloc::vec![0; 4], "done, and not delivered again");
    assert!(!has_pending(&hw, &lrs, &held, &mut g, 0));
    assert_eq!(hw.hcr(), ICH_HCR_EN);
}

#[test]
fn an_lpi_raised_again_merges_while_pending_and_follows_once_taken() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    let mut g = lpi_vgic(&[]);
    g.set_lpi_pending(0, LPI);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    // A second MSI before the guest took the first: one interrupt.
    g.set_lpi_pending(0, LPI);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(lpis_in(&hw), 1);
    assert!(!g.is_lpi_pending(0, LPI), "merged into the pending entry");
    // The guest took it (active); a third MSI stays pending in the vGIC meanwhile...
    let v = hw.lrs()[0];
    hw.set_lr(0, v & !(3 << 62) | (2 << 62));
    g.set_lpi_pending(0, LPI);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(lpis_in(&hw), 1, "not listed twice");
    assert!(g.is_lpi_pending(0, LPI), "kept, not lost");
    // ...and is delivered once the guest EOIs the first.
    hw.set_lr(0, v & !(3 << 62));
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(lpis_in(&hw), 1);
    assert_eq!(ListRegister(hw.lrs()[0]).state(), LrState::Pending);
    assert!(!g.is_lpi_pending(0, LPI));
}

#[test]
fn an_lpi_left_pending_in_a_list_register_at_exit_is_not_lost() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    let mut g = lpi_vgic(&[]);
    g.set_lpi_pending(0, LPI);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    // The vCPU exits (WFI) before taking it: it waits in the list register, so the vCPU must
    // not sleep, and the next fill keeps it there.
    assert!(has_pending(&hw, &lrs, &held, &mut g, 0));
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(lpis_in(&hw), 1);
    assert_eq!(ListRegister(hw.lrs()[0]).state(), LrState::Pending);
}

#[test]
fn lpis_and_spis_share_the_list_registers_by_priority() {
    let hw = FakeHw::new(0, 1);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    let mut g = lpi_vgic(&[40]);
    g.dist_write(GICD_IPRIORITYR + 40, crate::mmio::AccessWidth::Byte, 0xa0);
    pend(&mut g, 40);
    g.set_lpi_pending(0, LPI);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(ListRegister(hw.lrs()[0]).vintid(), LPI, "0x80 before 0xa0");
    assert_eq!(hw.hcr(), ICH_HCR_EN | ICH_HCR_UIE, "the SPI waits");
    hw.set_lr(0, 0);
    service_maintenance(&hw, &lrs);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(ListRegister(hw.lrs()[0]).vintid(), 40);
    assert_eq!(hw.hcr(), ICH_HCR_EN);
    // The other way round: an LPI that does not fit waits in the vGIC, still pending.
    g.dist_write(GICD_IPRIORITYR + 40, crate::mmio::AccessWidth::Byte, 0x10);
    hw.set_lr(0, 0);
    pend(&mut g, 40);
    g.set_lpi_pending(0, LPI);
    fill(&hw, &lrs, &mut held, &mut g, 0, None);
    assert_eq!(ListRegister(hw.lrs()[0]).vintid(), 40);
    assert!(g.is_lpi_pending(0, LPI), "put back, not lost");
    assert_eq!(hw.hcr(), ICH_HCR_EN | ICH_HCR_UIE);
}

#[test]
fn an_lpi_is_never_held_for_a_hardware_entry() {
    let mut held = HwPending::default();
    assert!(!held.push(IntId(LPI_BASE)));
    assert!(!held.push(IntId(u32::MAX)));
    assert!(!held.any());
    assert!(held.push(IntId(1019)));
}

#[test]
fn every_vgic_guard_moves_the_generation_on_when_dropped_and_a_vcpus_own_lock_does_not() {
    let l = VgicLock::new(vgic(&[40]));
    let g0 = l.generation();
    {
        let mut g = l.lock();
        pend(&mut g, 40);
        assert_eq!(l.generation(), g0, "not while held: the change is not done");
    }
    assert_eq!(l.generation(), g0 + 1);
    let _ = l.lock().is_pending(0, IntId(40));
    assert_eq!(
        l.generation(),
        g0 + 2,
        "reads count too: the cheap, safe side"
    );
    let held = HwPending::default();
    let lrs = Lrs::new();
    let hw = FakeHw::new(0, 4);
    lrs.clear_all(&hw);
    let mut pending = held;
    fill(&hw, &lrs, &mut pending, &mut l.lock_own(), 0, None);
    assert_eq!(
        l.generation(),
        g0 + 2,
        "a vCPU's own fill changes only its own state"
    );
}

#[test]
fn a_fill_is_skipped_only_when_nothing_it_would_look_at_changed() {
    let mut st = FillState::new();
    let none = HwPending::default();
    assert!(st.needed(5, &none, None), "nothing filled since the entry");
    st.filled(5, None, false);
    assert!(!st.needed(5, &none, None));
    assert!(st.needed(6, &none, None), "the vGIC moved on");
    assert!(st.needed(5, &none, Some(UART)), "the UART's line rose");
    let mut held = HwPending::default();
    assert!(held.push(IntId(40)));
    assert!(st.needed(5, &held, None), "a forwarded interrupt waits");
    st.filled(5, None, true);
    assert!(
        st.needed(5, &none, None),
        "interrupts were left for want of a list register"
    );
    st.filled(7, Some(UART), false);
    assert!(
        st.needed(7, &none, Some(UART)),
        "a high UART line is re-latched on every fill"
    );
    assert!(st.needed(7, &none, None), "the UART's line fell");
    st.filled(7, None, false);
    assert!(!st.needed(7, &none, None));
}

#[test]
fn a_fill_says_when_it_left_interrupts_for_want_of_a_list_register() {
    let hw = FakeHw::new(0, 2);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    let mut g = vgic(&[40, 41, 42]);
    pend(&mut g, 40);
    assert!(!fill(&hw, &lrs, &mut held, &mut g, 0, None));
    for i in [41, 42] {
        pend(&mut g, i);
    }
    assert!(
        fill(&hw, &lrs, &mut held, &mut g, 0, None),
        "one free entry, two pending"
    );
}

#[test]
fn an_edge_latched_again_while_in_a_list_register_keeps_the_next_fill_from_being_skipped() {
    let hw = FakeHw::new(0, 4);
    let lrs = Lrs::new();
    lrs.clear_all(&hw);
    let mut held = HwPending::default();
    let mut g = vgic(&[40]);
    g.dist_write(GICD_ICFGR + 8, Word, 2 << 16); // SPI 40 edge
    pend(&mut g, 40);
    assert!(!fill(&hw, &lrs, &mut held, &mut g, 0, None));
    // Raised again while the guest has it: it stays latched behind its own entry.
    pend(&mut g, 40);
    assert!(fill(&hw, &lrs, &mut held, &mut g, 0, None));
    assert!(g.is_pending(0, IntId(40)), "put back");
}

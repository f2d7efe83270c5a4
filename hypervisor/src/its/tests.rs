use super::cmd::{AnyCommand, VCommand};
use super::fake::{self, State, QEMU_TYPER, QEMU_TYPER_V4};
use super::*;
use alloc::rc::Rc;
use core::cell::RefCell;

const BASE: u64 = 0x808_0000;

fn cfg() -> ItsConfig {
    ItsConfig {
        max_device_id: 0xFF,
        cpus: 2,
        lpi_bits: 16,
        priority: 0xa0,
        poll_limit: 100,
        vpes: 0,
    }
}

type FakeIts = Its<fake::FakeRegs, fake::FakeMem>;

fn probe_with(
    cfg: ItsConfig,
    tweak: impl FnOnce(&mut State),
) -> (Result<FakeIts, ItsError>, Rc<RefCell<State>>) {
    let (r, m, s) = fake::new(QEMU_TYPER);
    tweak(&mut s.borrow_mut());
    (Its::probe(BASE, r, m, cfg), s)
}

/// A probed ITS with both CPUs' collections mapped.
fn ready() -> (FakeIts, Rc<RefCell<State>>) {
    let (its, s) = probe_with(cfg(), |_| {});
    let mut its = its.unwrap();
    its.init_cpu(0, 0, 0x80a_0000).unwrap();
    its.init_cpu(1, 1, 0x80c_0000).unwrap();
    s.borrow_mut().commands.clear();
    (its, s)
}

fn prop_byte(its: &FakeIts, s: &Rc<RefCell<State>>, plpi: u32) -> u8 {
    let (prop, _) = its.redistributor_tables(0).unwrap();
    s.borrow()
        .read_mem((prop & PROPBASER_PA_MASK) + u64::from(plpi - FIRST_LPI), 1)[0]
}

#[test]
fn probe_programs_tables_queue_then_enables() {
    let (its, s) = probe_with(cfg(), |_| {});
    let its = its.unwrap();
    let s = s.borrow();
    // Device table: 256 DeviceIDs × 8 B fit one 64 KiB page (QEMU accepts 64K first).
    let dt = its.device_table();
    assert_eq!(
        (dt.index, dt.page, dt.pages, dt.entry_size),
        (0, 0x1_0000, 1, 8)
    );
    let b0 = s.baser[0];
    assert_ne!(b0 & BASER_VALID, 0);
    assert_eq!(b0 & BASER_INDIRECT, 0);
    assert_eq!((b0 >> BASER_TYPE_SHIFT) & 7, TYPE_DEVICE);
    assert_eq!(b0 & 0x0000_FFFF_FFFF_0000, dt.pa);
    assert_eq!(b0 & BASER_SIZE_MASK, 0);
    assert_eq!(b0 & SHARE_MASK, SHARE_INNER);
    assert_eq!(b0 & CACHE_MASK, CACHE_RAWAWB);
    assert_eq!((s.baser[1] >> BASER_TYPE_SHIFT) & 7, TYPE_COLLECTION);
    assert_ne!(s.baser[1] & BASER_VALID, 0);
    assert!(dt.pa.is_multiple_of(0x1_0000));
    // The queue: 64 KiB = 16 pages of 4 KiB.
    assert_ne!(s.cbaser & CBASER_VALID, 0);
    assert_eq!(s.cbaser & 0xFF, 15);
    assert!(s.enabled);
    // Order: every BASER and CBASER, then CWRITER = 0, then GITS_CTLR.Enabled last.
    let pos = |off: u64, pred: &dyn Fn(u64) -> bool| {
        s.writes
            .iter()
            .position(|&(o, v)| o == off && pred(v))
            .unwrap()
    };
    let cbaser = pos(GITS_CBASER, &|v| v & CBASER_VALID != 0);
    let cwriter = pos(GITS_CWRITER, &|v| v == 0);
    let enable = pos(GITS_CTLR, &|v| v & u64::from(CTLR_ENABLED) != 0);
    let baser = pos(GITS_BASER, &|v| v & BASER_VALID != 0);
    assert!(baser < cbaser && cbaser < cwriter && cwriter < enable);
    assert_eq!(enable, s.writes.len() - 1);
    // LPI tables: 2^16 - 8192 property bytes, disabled with the priority and RES1; 8 KiB
    // pending tables, 64 KiB aligned, one per CPU.
    assert_eq!(its.lpi_count(), 65536 - 8192);
    let (prop, pend0) = its.redistributor_tables(0).unwrap();
    let (prop1, pend1) = its.redistributor_tables(1).unwrap();
    assert_eq!(prop, prop1);
    assert_ne!(pend0, pend1);
    assert_eq!(prop & 0x1F, 15);
    let table = s.read_mem(prop & PROPBASER_PA_MASK, 65536 - 8192);
    assert!(table.iter().all(|&b| b == 0xa2));
    for p in [pend0, pend1] {
        let pa = p & PENDBASER_PA_MASK;
        assert!(pa.is_multiple_of(0x1_0000));
        assert!(s.read_mem(pa, 8192).iter().all(|&b| b == 0));
    }
    assert!(its.redistributor_tables(2).is_none());
    assert_eq!(its.translater(), 0x809_0040);
}

#[test]
fn device_table_is_sized_for_the_largest_device_id() {
    let mut c = cfg();
    c.max_device_id = 0xFFFF;
    let (its, _) = probe_with(c, |s| s.page_sizes = [false, false, true]);
    let dt = its.unwrap().device_table();
    // 65536 × 8 B = 512 KiB in 4 KiB pages would be 128 pages.
    assert_eq!((dt.page, dt.pages), (0x1000, 128));
    // Beyond Devbits (16): refused.
    c.max_device_id = 0x1_0000;
    let (its, _) = probe_with(c, |_| {});
    assert_eq!(
        its.unwrap_err().kind,
        ItsErrorKind::DeviceOutOfRange(0x1_0000)
    );
    // 16K only: 64K falls back to 16K; 512 KiB is 32 pages.
    c.max_device_id = 0xFFFF;
    let (its, _) = probe_with(c, |s| s.page_sizes = [false, true, false]);
    let dt = its.unwrap().device_table();
    assert_eq!((dt.page, dt.pages), (0x4000, 32));
    // 32-byte DTEs in 4K pages: 2 MiB is more than 256 pages, which a flat table cannot say.
    let (its, _) = probe_with(c, |s| {
        s.page_sizes = [false, false, true];
        s.baser[0] |= 0x1F << BASER_ESZ_SHIFT;
    });
    assert_eq!(
        its.unwrap_err().kind,
        ItsErrorKind::TableTooLarge(0, 0x20_0000)
    );
}

#[test]
fn downgraded_shareability_makes_everything_non_cacheable_and_cleaned() {
    let (its, s) = probe_with(cfg(), |s| s.downgrade_shareability = true);
    let mut its = its.unwrap();
    assert!(!its.cacheable());
    {
        let st = s.borrow();
        assert_eq!(st.baser[0] & SHARE_MASK, 0);
        assert_eq!(st.baser[0] & CACHE_MASK, CACHE_NC);
        assert_eq!(st.cbaser & CACHE_MASK, CACHE_NC);
        let dt = its.device_table();
        assert!(st.cleans.contains(&(dt.pa, 0x1_0000)));
    }
    its.init_cpu(0, 0, 0).unwrap();
    let cmdq = s.borrow().cbaser & CBASER_PA_MASK;
    // The three commands were each cleaned before CWRITER moved.
    for i in 0..3 {
        assert!(s.borrow().cleans.contains(&(cmdq + i * 32, 32)));
    }
}

#[test]
fn probe_failures_are_errors_naming_the_its() {
    let (e, _) = probe_with(cfg(), |s| s.baser_drops_valid = true);
    let e = e.unwrap_err();
    assert!(matches!(
        e.kind,
        ItsErrorKind::DoesNotStick {
            reg: "GITS_BASER",
            ..
        }
    ));
    assert!(alloc::format!("{e}").starts_with("ITS at 0x8080000: GITS_BASER doesn't stick"));
    // Enabled by a previous owner and never quiescent: a bounded poll, then an error.
    let (e, s) = probe_with(cfg(), |s| {
        s.enabled = true;
        s.never_quiescent = true;
    });
    assert_eq!(e.unwrap_err().kind, ItsErrorKind::NotQuiescent);
    assert!(!s.borrow().enabled);
    let (e, _) = probe_with(cfg(), |s| s.typer &= !1);
    assert_eq!(e.unwrap_err().kind, ItsErrorKind::NotPhysical);
    let (e, _) = probe_with(cfg(), |s| s.memory_left = 0x1_0000);
    assert!(matches!(e.unwrap_err().kind, ItsErrorKind::OutOfMemory(_)));
    let mut c = cfg();
    c.lpi_bits = 13;
    assert_eq!(
        probe_with(c, |_| {}).0.unwrap_err().kind,
        ItsErrorKind::TooFewLpiBits(13)
    );
    let (e, _) = probe_with(cfg(), |s| s.baser = [0; 8]);
    assert_eq!(e.unwrap_err().kind, ItsErrorKind::NoTable("Device"));
}

#[test]
fn a_previously_enabled_its_is_quiesced_first() {
    let (its, s) = probe_with(cfg(), |s| s.enabled = true);
    its.unwrap();
    let s = s.borrow();
    assert_eq!(s.writes[0], (GITS_CTLR, 0));
}

#[test]
fn per_cpu_init_maps_the_collection_and_invalidates() {
    let (its, s) = probe_with(cfg(), |_| {});
    let mut its = its.unwrap();
    its.init_cpu(1, 1, 0x80c_0000).unwrap();
    assert_eq!(
        s.borrow().commands,
        [
            Command::Mapc {
                icid: 1,
                rdbase: 1,
                valid: true
            },
            Command::Invall { icid: 1 },
            Command::Sync { rdbase: 1 },
        ]
    );
    assert_eq!(
        its.init_cpu(2, 2, 0).unwrap_err().kind,
        ItsErrorKind::NoCollection(2)
    );
    // PTA = 1: the target is the redistributor's PA in 64 KiB units.
    let (r, m, s) = fake::new(QEMU_TYPER | 1 << 19);
    let mut its = Its::probe(BASE, r, m, cfg()).unwrap();
    its.init_cpu(0, 0, 0x80a_0000).unwrap();
    assert_eq!(s.borrow().collections.get(&0), Some(&0x80a));
}

#[test]
fn map_device_gives_an_aligned_itt_of_at_least_256_bytes() {
    let (mut its, s) = ready();
    its.map_device(0, 8, 3).unwrap();
    its.map_device(0, 9, 32).unwrap();
    let st = s.borrow();
    let (itt8, size8) = st.devices[&8];
    let (itt9, size9) = st.devices[&9];
    // 3 events round to 4 (Size 1); 4 × 12 B is below the 256 B minimum.
    assert_eq!(size8, 1);
    assert_eq!(size9, 4);
    assert!(itt8.is_multiple_of(256) && itt9.is_multiple_of(256));
    assert!(st.allocs.contains(&(itt8, 256, 256)));
    assert!(st.allocs.contains(&(itt9, 32 * 12, 256)));
    assert!(st.refused.is_empty());
    drop(st);
    assert_eq!(
        its.map_device(1, 8, 4).unwrap_err().kind,
        ItsErrorKind::DeviceMapped(8)
    );
    assert_eq!(
        its.map_device(0, 0x100, 4).unwrap_err().kind,
        ItsErrorKind::DeviceOutOfRange(0x100)
    );
    assert_eq!(
        its.map_device(0, 10, 0).unwrap_err().kind,
        ItsErrorKind::BadEventCount {
            device: 10,
            events: 0
        }
    );
    assert!(matches!(
        its.map_device(0, 10, (1 << 16) + 1).unwrap_err().kind,
        ItsErrorKind::BadEventCount { .. }
    ));
}

#[test]
fn map_event_maptis_an_enabled_lpi_to_the_cpu_collection() {
    let (mut its, s) = ready();
    its.map_device(3, 8, 4).unwrap();
    s.borrow_mut().commands.clear();
    let plpi = its.map_event(3, 8, 2, 1).unwrap();
    assert!((FIRST_LPI..65536).contains(&plpi));
    assert_eq!(
        s.borrow().commands,
        [
            Command::Mapti {
                device: 8,
                event: 2,
                intid: plpi,
                icid: 1
            },
            Command::Inv {
                device: 8,
                event: 2
            },
            Command::Sync { rdbase: 1 },
        ]
    );
    assert_eq!(s.borrow().ites[&(8, 2)], (plpi, 1));
    assert_eq!(prop_byte(&its, &s, plpi), 0xa3);
    assert_eq!(its.owner(plpi), Some((3, 8, 2)));
    assert_eq!(its.lpi_of(3, 8, 2), Some(plpi));
    assert_eq!(its.cpu_of(plpi), Some(1));
    assert_eq!(its.owner(plpi + 1), None);
    // Another VM cannot touch the device; the event cannot be mapped twice; EventIDs stop
    // at the ITT's size.
    assert_eq!(
        its.map_event(4, 8, 1, 0).unwrap_err().kind,
        ItsErrorKind::NotOwner { device: 8, vm: 4 }
    );
    assert_eq!(
        its.map_event(3, 8, 2, 0).unwrap_err().kind,
        ItsErrorKind::EventMapped {
            device: 8,
            event: 2
        }
    );
    assert_eq!(
        its.map_event(3, 8, 4, 0).unwrap_err().kind,
        ItsErrorKind::EventOutOfRange {
            device: 8,
            event: 4
        }
    );
    assert_eq!(its.lpis_in_use(), 1);
}

#[test]
fn lpis_are_never_handed_out_twice_and_run_out_cleanly() {
    let mut c = cfg();
    c.lpi_bits = 14; // 8192 LPIs
    let (its, s) = probe_with(c, |_| {});
    let mut its = its.unwrap();
    its.init_cpu(0, 0, 0).unwrap();
    for d in 0..4 {
        its.map_device(0, d, 2048).unwrap();
    }
    let mut seen = alloc::collections::BTreeSet::new();
    for d in 0..4 {
        for e in 0..2048 {
            let p = its.map_event(0, d, e, 0).unwrap();
            assert!(seen.insert(p), "LPI {p} handed out twice");
        }
    }
    assert_eq!(seen.len(), 8192);
    its.map_device(0, 4, 2).unwrap();
    assert_eq!(
        its.map_event(0, 4, 0, 0).unwrap_err().kind,
        ItsErrorKind::NoFreeLpi
    );
    // The fake holds exactly one translation per LPI.
    let st = s.borrow();
    let mut lpis: alloc::vec::Vec<u32> = st.ites.values().map(|&(p, _)| p).collect();
    lpis.sort_unstable();
    lpis.dedup();
    assert_eq!(lpis.len(), 8192);
    drop(st);
    let freed = its.lpi_of(0, 2, 7).unwrap();
    its.unmap_event(0, 2, 7).unwrap();
    assert_eq!(its.map_event(0, 4, 0, 0).unwrap(), freed);
}

#[test]
fn unmap_event_discards_and_frees() {
    let (mut its, s) = ready();
    its.map_device(0, 8, 4).unwrap();
    let plpi = its.map_event(0, 8, 1, 0).unwrap();
    s.borrow_mut().commands.clear();
    assert!(matches!(
        its.unmap_event(1, 8, 1).unwrap_err().kind,
        ItsErrorKind::NotOwner { .. }
    ));
    its.unmap_event(0, 8, 1).unwrap();
    assert_eq!(
        s.borrow().commands,
        [
            Command::Discard {
                device: 8,
                event: 1
            },
            Command::Sync { rdbase: 0 }
        ]
    );
    assert!(s.borrow().ites.is_empty());
    assert_eq!(prop_byte(&its, &s, plpi), 0xa2);
    assert_eq!(its.owner(plpi), None);
    assert_eq!(its.lpis_in_use(), 0);
    assert_eq!(
        its.unmap_event(0, 8, 1).unwrap_err().kind,
        ItsErrorKind::EventUnmapped {
            device: 8,
            event: 1
        }
    );
}

#[test]
fn unmap_device_discards_every_event_then_frees_the_itt() {
    let (mut its, s) = ready();
    its.map_device(0, 8, 4).unwrap();
    let itt = s.borrow().devices[&8].0;
    let a = its.map_event(0, 8, 0, 0).unwrap();
    let b = its.map_event(0, 8, 3, 1).unwrap();
    s.borrow_mut().commands.clear();
    its.unmap_device(0, 8).unwrap();
    let st = s.borrow();
    assert_eq!(
        st.commands,
        [
            Command::Discard {
                device: 8,
                event: 0
            },
            Command::Discard {
                device: 8,
                event: 3
            },
            Command::Mapd {
                device: 8,
                size: 0,
                itt: 0,
                valid: false
            },
            Command::Sync { rdbase: 0 },
            Command::Sync { rdbase: 1 },
        ]
    );
    assert!(st.devices.is_empty() && st.ites.is_empty());
    assert_eq!(st.frees, [(itt, 256, 256)]);
    drop(st);
    assert_eq!(its.owner(a), None);
    assert_eq!(its.owner(b), None);
    assert_eq!(its.lpis_in_use(), 0);
    // The DeviceID is free for another VM.
    its.map_device(1, 8, 2).unwrap();
}

#[test]
fn unmap_all_takes_only_that_vms_devices() {
    let (mut its, s) = ready();
    its.map_device(0, 1, 2).unwrap();
    its.map_device(1, 2, 2).unwrap();
    its.map_device(0, 3, 2).unwrap();
    its.map_event(0, 1, 0, 0).unwrap();
    let keep = its.map_event(1, 2, 1, 1).unwrap();
    its.unmap_all(0).unwrap();
    let st = s.borrow();
    assert_eq!(
        st.devices.keys().copied().collect::<alloc::vec::Vec<_>>(),
        [2]
    );
    assert_eq!(st.ites.len(), 1);
    drop(st);
    assert_eq!(its.owner(keep), Some((1, 2, 1)));
}

#[test]
fn move_raise_clear_and_enable() {
    let (mut its, s) = ready();
    its.map_device(0, 8, 2).unwrap();
    let plpi = its.map_event(0, 8, 1, 0).unwrap();
    s.borrow_mut().commands.clear();
    its.move_event(0, 8, 1, 1).unwrap();
    assert_eq!(s.borrow().ites[&(8, 1)], (plpi, 1));
    assert_eq!(its.cpu_of(plpi), Some(1));
    its.raise(0, 8, 1).unwrap();
    its.clear(0, 8, 1).unwrap();
    its.set_enabled(plpi, false).unwrap();
    assert_eq!(prop_byte(&its, &s, plpi), 0xa2);
    its.set_enabled(plpi, true).unwrap();
    assert_eq!(prop_byte(&its, &s, plpi), 0xa3);
    assert_eq!(
        s.borrow().commands,
        [
            Command::Movi {
                device: 8,
                event: 1,
                icid: 1
            },
            Command::Sync { rdbase: 0 },
            Command::Int {
                device: 8,
                event: 1
            },
            Command::Sync { rdbase: 1 },
            Command::Clear {
                device: 8,
                event: 1
            },
            Command::Sync { rdbase: 1 },
            Command::Inv {
                device: 8,
                event: 1
            },
            Command::Sync { rdbase: 1 },
            Command::Inv {
                device: 8,
                event: 1
            },
            Command::Sync { rdbase: 1 },
        ]
    );
    assert_eq!(
        its.set_enabled(plpi + 1, true).unwrap_err().kind,
        ItsErrorKind::UnknownLpi(plpi + 1)
    );
    assert_eq!(
        its.move_event(0, 8, 1, 5).unwrap_err().kind,
        ItsErrorKind::NoCollection(5)
    );
}

#[test]
fn a_hung_queue_times_out_and_a_stall_breaks_the_its() {
    let (mut its, s) = ready();
    s.borrow_mut().hang = true;
    let e = its.map_device(0, 8, 2).unwrap_err();
    assert!(
        matches!(
            e.kind,
            ItsErrorKind::Timeout {
                creadr: 0xc0,
                cwriter: 0xe0
            }
        ),
        "{e}"
    );
    // The device was not recorded: a retry is not "already mapped".
    s.borrow_mut().hang = false;
    its.map_device(0, 8, 2).unwrap();
    // A stall: reported with the command, then every later command refused.
    s.borrow_mut().stall_on = Some(0x0A);
    let e = its.map_event(0, 8, 0, 0).unwrap_err();
    assert!(
        matches!(
            e.kind,
            ItsErrorKind::Stalled {
                command: AnyCommand::P(Command::Mapti {
                    device: 8,
                    event: 0,
                    ..
                }),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(its.lpis_in_use(), 0);
    assert_eq!(
        its.map_event(0, 8, 0, 0).unwrap_err().kind,
        ItsErrorKind::Broken
    );
}

#[test]
fn the_queue_wraps() {
    let (mut its, s) = ready();
    its.map_device(0, 8, 2).unwrap();
    // 2048 slots; each raise is two commands: 1500 raises go round the queue once and a half.
    its.map_event(0, 8, 0, 0).unwrap();
    for _ in 0..1500 {
        its.raise(0, 8, 0).unwrap();
    }
    assert!(s.borrow().refused.is_empty());
    assert_eq!(s.borrow().creadr, s.borrow().cwriter);
    assert!(s.borrow().commands.len() > 3000);
}

#[test]
fn move_all_moves_only_that_vms_lpis_on_that_cpu() {
    let (mut its, s) = ready();
    its.map_device(0, 1, 4).unwrap();
    its.map_device(1, 2, 4).unwrap();
    let a = its.map_event(0, 1, 0, 0).unwrap();
    let b = its.map_event(0, 1, 1, 0).unwrap();
    let c = its.map_event(0, 1, 2, 1).unwrap();
    let other = its.map_event(1, 2, 0, 0).unwrap();
    s.borrow_mut().commands.clear();
    its.move_all(0, 0, 1).unwrap();
    assert_eq!(
        s.borrow().commands,
        [
            Command::Movi {
                device: 1,
                event: 0,
                icid: 1
            },
            Command::Movi {
                device: 1,
                event: 1,
                icid: 1
            },
            Command::Sync { rdbase: 0 },
        ]
    );
    for p in [a, b, c] {
        assert_eq!(its.cpu_of(p), Some(1));
    }
    assert_eq!(its.cpu_of(other), Some(0));
    assert_eq!(s.borrow().ites[&(2, 0)].1, 0);
    // Nothing to move: no command at all.
    s.borrow_mut().commands.clear();
    its.move_all(0, 0, 1).unwrap();
    assert!(s.borrow().commands.is_empty());
    its.sync(1).unwrap();
    assert_eq!(s.borrow().commands, [Command::Sync { rdbase: 1 }]);
    assert_eq!(
        its.move_all(0, 1, 7).unwrap_err().kind,
        ItsErrorKind::NoCollection(7)
    );
}

/// A GICv4.0 ITS (QEMU gic-version=4) with room for 4 vPEs and both CPUs' collections.
fn ready_v4() -> (FakeIts, Rc<RefCell<State>>) {
    let (r, m, s) = fake::new(QEMU_TYPER_V4);
    let mut its = Its::probe(BASE, r, m, ItsConfig { vpes: 4, ..cfg() }).unwrap();
    its.init_cpu(0, 0, 0x80a_0000).unwrap();
    its.init_cpu(1, 1, 0x80e_0000).unwrap();
    s.borrow_mut().commands.clear();
    s.borrow_mut().log.clear();
    (its, s)
}

#[test]
fn a_v4_its_gets_a_flat_vpe_table_and_a_v3_one_or_no_vpes_wanted_none() {
    let (its, s) = ready_v4();
    let t = its.vpe_table().unwrap();
    assert_eq!((t.index, t.pages, t.entry_size), (2, 1, 8));
    let b2 = s.borrow().baser[2];
    assert_ne!(b2 & BASER_VALID, 0);
    assert_eq!(b2 & BASER_INDIRECT, 0);
    assert_eq!((b2 >> BASER_TYPE_SHIFT) & 7, TYPE_VPE);
    assert_eq!(b2 & 0x0000_FFFF_FFFF_0000, t.pa);
    assert!(its.has_vpes());
    // GICv3: no vPE table, and direct injection refused.
    let (mut v3, _) = ready();
    assert!(!v3.has_vpes());
    assert_eq!(
        v3.create_vm(0, &[(0, 0), (1, 1)]).unwrap_err().kind,
        ItsErrorKind::NoVirtual
    );
    // Virtual but no vPEs wanted: BASER2 left invalid.
    let (r, m, s) = fake::new(QEMU_TYPER_V4);
    let its = Its::probe(BASE, r, m, cfg()).unwrap();
    assert!(!its.has_vpes());
    assert_eq!(s.borrow().baser[2] & BASER_VALID, 0);
}

#[test]
fn create_vm_maps_one_vpe_per_vcpu_on_its_pinned_cpu_with_zeroed_tables() {
    let (mut its, s) = ready_v4();
    let vpes = its.create_vm(3, &[(1, 1), (0, 0)]).unwrap();
    assert_eq!(vpes.len(), 2);
    assert_ne!(vpes[0].id, vpes[1].id);
    let st = s.borrow();
    for v in &vpes {
        assert!(v.mapped);
        assert!(v.vpt.is_multiple_of(0x1_0000));
        assert!(st.read_mem(v.vpt, VPT_SIZE).iter().all(|&b| b == 0));
        // VMAPP(vPE, RDbase of the pinned CPU = its processor number, vPT, 15).
        assert_eq!(st.vpes[&v.id], (v.cpu as u64, v.vpt, 15));
    }
    assert_eq!((vpes[0].cpu, vpes[1].cpu), (1, 0));
    assert!(st.refused.is_empty(), "{:?}", st.refused);
    // VMAPP, VINVALL, VSYNC per vPE.
    assert_eq!(
        st.log[..3],
        [
            AnyCommand::V(VCommand::Vmapp {
                vpe: vpes[0].id,
                rdbase: 1,
                vpt: vpes[0].vpt,
                vpt_size: 15,
                valid: true
            }),
            AnyCommand::V(VCommand::Vinvall { vpe: vpes[0].id }),
            AnyCommand::V(VCommand::Vsync { vpe: vpes[0].id }),
        ]
    );
    // GICR_VPROPBASER: the VM's own 4K-aligned table, zeroed (every vLPI disabled), IDbits 15.
    let vprop = its.vpropbaser(3).unwrap();
    assert_eq!(vprop & 0x1F, 15);
    let pa = vprop & PROPBASER_PA_MASK;
    assert!(st.read_mem(pa, VPROP_SIZE).iter().all(|&b| b == 0));
    drop(st);
    assert!(matches!(
        its.create_vm(3, &[(0, 0)]).unwrap_err().kind,
        ItsErrorKind::VpeState { vm: 3, .. }
    ));
    // Only 4 vPEIDs: a VM of 3 more vCPUs does not fit, and gives back what it took.
    let left = s.borrow().memory_left;
    assert_eq!(
        its.create_vm(4, &[(0, 0), (1, 1), (0, 0)])
            .unwrap_err()
            .kind,
        ItsErrorKind::NoFreeVpe
    );
    assert_eq!(s.borrow().memory_left, left);
    assert!(its.vpes(4).is_empty());
    its.create_vm(4, &[(0, 0), (1, 1)]).unwrap();
}

#[test]
fn a_virtual_event_is_vmapti_with_no_doorbell_and_its_config_goes_to_the_vprop_table() {
    let (mut its, s) = ready_v4();
    let vpes = its.create_vm(0, &[(0, 0), (1, 1)]).unwrap();
    its.map_device(0, 8, 4).unwrap();
    s.borrow_mut().log.clear();
    let h = its.map_vevent(0, 8, 2, 1, 8300).unwrap();
    assert!(its.is_virtual(0, 8, 2));
    assert_eq!(its.owner(h), Some((0, 8, 2)));
    {
        let st = s.borrow();
        assert_eq!(
            st.log,
            [
                AnyCommand::V(VCommand::Vmapti {
                    device: 8,
                    event: 2,
                    vpe: vpes[1].id,
                    vintid: 8300,
                    doorbell: 1023
                }),
                AnyCommand::V(VCommand::Vsync { vpe: vpes[1].id }),
            ]
        );
        assert_eq!(st.vites[&(8, 2)], (vpes[1].id, 8300, 1023));
        assert!(st.ites.is_empty(), "no physical ITE");
    }
    // The handle's physical LPI is never enabled.
    assert_eq!(prop_byte(&its, &s, h) & 1, 0);
    // The guest's config byte into the VM's table, then INV + VSYNC.
    s.borrow_mut().log.clear();
    its.set_vlpi_config(0, 8, 2, 8300, 0xa3).unwrap();
    let vprop = its.vpropbaser(0).unwrap() & PROPBASER_PA_MASK;
    assert_eq!(
        s.borrow().read_mem(vprop + u64::from(8300 - FIRST_LPI), 1),
        [0xa3]
    );
    assert_eq!(
        s.borrow().log,
        [
            AnyCommand::P(Command::Inv {
                device: 8,
                event: 2
            }),
            AnyCommand::V(VCommand::Vsync { vpe: vpes[1].id }),
        ]
    );
    // INT and CLEAR act on the virtual ITE, synchronised by VSYNC.
    s.borrow_mut().log.clear();
    its.raise(0, 8, 2).unwrap();
    its.clear(0, 8, 2).unwrap();
    assert_eq!(s.borrow().vlpis_raised, [(vpes[1].id, 8300)]);
    assert_eq!(
        s.borrow().log[1],
        AnyCommand::V(VCommand::Vsync { vpe: vpes[1].id })
    );
    // MOVI -> VMOVI, with a VSYNC of the old vPE; MOVI itself is refused for it.
    assert!(its.move_event(0, 8, 2, 0).is_err());
    s.borrow_mut().log.clear();
    its.move_vevent(0, 8, 2, 0).unwrap();
    assert_eq!(
        s.borrow().log,
        [
            AnyCommand::V(VCommand::Vmovi {
                device: 8,
                event: 2,
                vpe: vpes[0].id,
                doorbell: None
            }),
            AnyCommand::V(VCommand::Vsync { vpe: vpes[1].id }),
        ]
    );
    assert_eq!(s.borrow().vites[&(8, 2)].0, vpes[0].id);
    assert!(s.borrow().refused.is_empty(), "{:?}", s.borrow().refused);
    // DISCARD on the virtual ITE frees the handle.
    its.unmap_event(0, 8, 2).unwrap();
    assert!(s.borrow().vites.is_empty());
    assert_eq!(its.owner(h), None);
    assert_eq!(its.lpis_in_use(), 0);
    // Bad requests: another VM's vPE index, a vINTID that is no LPI, a physical ITE's config.
    assert!(its.map_vevent(0, 8, 1, 2, 8300).is_err());
    assert!(its.map_vevent(0, 8, 1, 0, 100).is_err());
    its.map_event(0, 8, 3, 0).unwrap();
    assert!(its.set_vlpi_config(0, 8, 3, 8300, 1).is_err());
    assert!(its.move_vevent(0, 8, 3, 1).is_err());
}

#[test]
fn a_vm_stop_unmaps_events_then_vpes_and_zeroes_the_tables_for_the_next_boot() {
    let (mut its, s) = ready_v4();
    let vpes = its.create_vm(0, &[(0, 0), (1, 1)]).unwrap();
    its.map_device(0, 8, 4).unwrap();
    its.map_vevent(0, 8, 0, 0, 8200).unwrap();
    its.set_vlpi_config(0, 8, 0, 8200, 0xa3).unwrap();
    // Pending state the redistributor left in a vPT.
    s.borrow_mut().memory.get_mut(&vpes[0].vpt).unwrap()[1025] = 0x10;
    // vPEs with events still mapped are not unmapped.
    assert!(its.unmap_vpes(0).is_err());
    its.unmap_all(0).unwrap();
    assert!(s.borrow().vites.is_empty());
    s.borrow_mut().log.clear();
    its.unmap_vpes(0).unwrap();
    let st = s.borrow();
    assert!(st.vpes.is_empty());
    assert_eq!(
        st.log[..2],
        [
            AnyCommand::V(VCommand::Vmapp {
                vpe: vpes[0].id,
                rdbase: 0,
                vpt: vpes[0].vpt,
                vpt_size: 15,
                valid: false
            }),
            AnyCommand::P(Command::Sync { rdbase: 0 }),
        ]
    );
    assert!(st.read_mem(vpes[0].vpt, VPT_SIZE).iter().all(|&b| b == 0));
    let vprop = its.vpropbaser(0).unwrap() & PROPBASER_PA_MASK;
    assert!(st.read_mem(vprop, VPROP_SIZE).iter().all(|&b| b == 0));
    drop(st);
    assert!(its.vpes(0).iter().all(|v| !v.mapped));
    // The next boot maps the same vPEs again.
    assert!(its.map_vevent(0, 8, 0, 0, 8200).is_err(), "vPE unmapped");
    its.map_device(0, 8, 4).unwrap();
    its.map_vpes(0).unwrap();
    assert_eq!(s.borrow().vpes.len(), 2);
    its.map_vevent(0, 8, 0, 0, 8200).unwrap();
    assert!(s.borrow().refused.is_empty(), "{:?}", s.borrow().refused);
}

#[test]
fn vmovp_moves_a_vpe_to_another_redistributor() {
    let (mut its, s) = ready_v4();
    let vpes = its.create_vm(0, &[(0, 0)]).unwrap();
    s.borrow_mut().log.clear();
    its.move_vpe(0, 0, 1).unwrap();
    assert_eq!(
        s.borrow().log,
        [
            AnyCommand::V(VCommand::Vmovp {
                vpe: vpes[0].id,
                rdbase: 1
            }),
            AnyCommand::V(VCommand::Vsync { vpe: vpes[0].id }),
        ]
    );
    assert_eq!(s.borrow().vpes[&vpes[0].id].0, 1);
    assert_eq!(its.vpes(0)[0].cpu, 1);
}

#[test]
fn the_lpi_space_is_the_smallest_that_gives_every_possible_vm_its_events() {
    // QEMU virt: 16 INTID bits; up to 8 CPUs x 1024 events fit 14 bits (8192 LPIs).
    assert_eq!(lpi_bits_for(4, 16, 1024), MIN_LPI_BITS);
    assert_eq!(lpi_bits_for(8, 16, 1024), 14);
    assert_eq!(lpi_bits_for(9, 16, 1024), 15);
    assert_eq!(lpi_bits_for(24, 16, 1024), 15);
    assert_eq!(lpi_bits_for(25, 16, 1024), 16);
    // More than the GIC has: all it has.
    assert_eq!(lpi_bits_for(64, 16, 1024), 16);
    assert_eq!(lpi_bits_for(64, 15, 1024), 15);
    assert_eq!(lpi_bits_for(64, 24, 1024), MAX_LPI_BITS);
    // A GIC below the minimum is the probe's to refuse.
    assert_eq!(lpi_bits_for(1, 13, 1024), 13);
    assert_eq!(lpi_bits_for(0, 16, 1024), 14);
}

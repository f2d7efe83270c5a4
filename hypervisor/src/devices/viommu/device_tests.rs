//! Host tests of [`VmViommu`] driven through its registers as a guest driver would (virtio 1.2
//! 4.2.2 / 3.1.1), with descriptors in fake guest RAM: the fuzz harness's device, RAM,
//! recording physical SMMU and driver helpers (`fuzz_harness::viommu`), whose invariants are
//! checked after every call here too.

use super::tests::{attach, detach, map, probe, unmap};
use super::*;
use crate::devices::virtio::mmio::regs;
use crate::devices::virtio::Status;
use crate::fuzz_harness::viommu::{queue_base, slot_buf, Harness, MSI, RAM, RAM_SIZE};
use smmu::event::{Event, EventKind};

const RW: u32 = MAP_F_READ | MAP_F_WRITE;

fn stat(h: &Harness, k: &str) -> u64 {
    h.counters()[k]
}

#[test]
fn identification_and_negotiation() {
    let mut h = Harness::new(0, 16);
    assert_eq!(h.read(regs::MAGIC_VALUE, 4), 0x7472_6976);
    assert_eq!(h.read(regs::VERSION, 4), 2);
    assert_eq!(h.read(regs::DEVICE_ID, 4), 23);
    h.set_status(1);
    h.set_status(3);
    h.write(regs::DEVICE_FEATURES_SEL, 4, 0);
    let lo = h.read(regs::DEVICE_FEATURES, 4);
    h.write(regs::DEVICE_FEATURES_SEL, 4, 1);
    let hi = h.read(regs::DEVICE_FEATURES, 4);
    let f = lo | hi << 32;
    assert_eq!(f, h.device_features());
    assert_ne!(f & feature::VERSION_1, 0);
    assert_eq!(f & feature::BYPASS, 0, "legacy F_BYPASS never offered");
    // Without VERSION_1 a v2 device refuses FEATURES_OK (spec 3.1.1 step 6).
    h.driver_features(f & !feature::VERSION_1);
    h.set_status(11);
    assert_eq!(h.read(regs::STATUS, 4) & 8, 0);
    h.set_status(0);
    assert!(h.negotiate(f, 64));
    for q in 0..2 {
        h.write(regs::QUEUE_SEL, 4, q);
        assert_eq!(h.read(regs::QUEUE_NUM_MAX, 4), 64);
        assert_eq!(h.read(regs::QUEUE_READY, 4), 1);
    }
    h.write(regs::QUEUE_SEL, 4, 2);
    assert_eq!(h.read(regs::QUEUE_NUM_MAX, 4), 0, "two queues only");
    // Config space: page_size_mask, then bypass = 1 until the driver writes it.
    assert_eq!(h.read(regs::CONFIG, 4), 0x4020_1000);
    assert_eq!(h.read(regs::CONFIG + 0x24, 1), 1);
}

#[test]
fn attach_map_unmap_detach_round_trip() {
    let mut h = Harness::probed();
    let iova = 0x10_0000;
    let out = h.requests(&[
        (attach(1, 8, 0), 4),
        (map(1, iova, iova + 0x3fff, RAM, RW), 4),
    ]);
    for o in &out {
        assert_eq!(
            o.as_ref().map(|(len, b)| (*len, b[0])),
            Some((4, status::OK))
        );
    }
    // Nested STE for psid 8 over the VM's stage 2.
    let ste = h.phys.inner.stes[&8];
    assert_eq!(ste.config(), smmu::ste::StreamConfig::Nested);
    assert_eq!(ste.s2_config(), smmu::vsmmu::harness::s2_config());
    let c = h.counters();
    assert_eq!((c["domains"], c["mappings"]), (1, 1));
    assert!(c["table_pages"] >= 2, "a root and an L3 table at least");
    h.phys.inner.take_commands();
    assert_eq!(
        h.status_of(&unmap(1, iova, iova + 0x3fff)),
        Some(status::OK)
    );
    // Four pages: one non-leaf TLBI_NH_VA each (ASID = domain + 1), then a waited CMD_SYNC.
    let cmds = h.phys.inner.take_commands();
    let vas: Vec<u64> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::TlbiNhVa { asid: 2, addr, .. } if !addr.leaf => Some(addr.addr),
            _ => None,
        })
        .collect();
    assert_eq!(vas, [iova, iova + 0x1000, iova + 0x2000, iova + 0x3000]);
    assert_eq!(h.phys.inner.ok_seq(), h.phys.inner.total_syncs);
    assert_eq!(h.status_of(&detach(1, 8)), Some(status::OK));
    assert_eq!(
        h.phys.inner.stes[&8],
        smmu::ste::Ste::stage2(smmu::vsmmu::harness::s2_config())
    );
    let c = h.counters();
    assert_eq!((c["domains"], c["mappings"], c["table_pages"]), (0, 0, 0));
    assert_eq!(
        (
            c["attach"],
            c["map"],
            c["unmap"],
            c["detach"],
            c["requests"]
        ),
        (1, 1, 1, 1, 4)
    );
    assert_eq!((c["errors"], c["queue_errors"], c["notifies"]), (0, 0, 3));
    // The domain went with its last endpoint.
    assert_eq!(h.status_of(&unmap(1, 0, u64::MAX)), Some(status::NOENT));
    assert_eq!(stat(&h, "errors"), 1);
}

#[test]
fn requests_complete_in_order_with_their_used_lengths() {
    let mut h = Harness::probed();
    let out = h.requests(&[
        (attach(0, 1, 0), 4),
        (attach(0, 7, 0), 4),
        (map(0, 0x1000, 0x1fff, RAM, RW), 4),
        (map(0, 0x1000, 0x1fff, RAM, RW), 4),
        (vec![0x77; 8], 4),
    ]);
    let st: Vec<Option<(u32, u8)>> = out
        .iter()
        .map(|o| {
            o.as_ref()
                .map(|(l, b)| (*l, b.len().checked_sub(4).map_or(0xff, |i| b[i])))
        })
        .collect();
    assert_eq!(
        st,
        [
            Some((4, status::OK)),
            Some((4, status::NOENT)),
            Some((4, status::OK)),
            Some((4, status::INVAL)),
            // An unknown type: completed, nothing written (used length 0).
            Some((0, 0xff)),
        ]
    );
    assert_eq!(h.used_idx(0), 5);
    assert_eq!(stat(&h, "unknown"), 1);
}

#[test]
fn probe_reports_the_msi_region() {
    let mut h = Harness::probed();
    let (len, b) = h.requests(&[(probe(2), 0x204)]).pop().unwrap().unwrap();
    assert_eq!(len, 0x204);
    assert_eq!(b[0x200], status::OK);
    // One RESV_MEM property: type 1, length 20, subtype MSI, [start, end].
    assert_eq!(&b[0..4], &[1, 0, 20, 0]);
    assert_eq!(b[4], RESV_MEM_T_MSI);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), MSI.0);
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), MSI.1);
    assert!(b[24..0x200].iter().all(|&x| x == 0));
    assert_eq!(h.status_of(&probe(7)), Some(status::NOENT));
    // A writable part too short for the properties: S_INVAL in its last 4 bytes.
    let (len, b) = h.requests(&[(probe(1), 0x20)]).pop().unwrap().unwrap();
    assert_eq!((len, b[0x1c]), (0x20, status::INVAL));
    assert_eq!(stat(&h, "probe"), 3);
}

#[test]
fn fault_records_reach_the_event_queue_and_the_backlog_is_bounded() {
    let mut h = Harness::probed();
    let mut e = Event::new(EventKind::FTranslation, 0x20);
    e.input_addr = 0x1234_5000;
    e.rnw = true;
    // No buffer yet: kept in the backlog.
    assert!(h.forward(0x20, &e));
    assert_eq!(stat(&h, "events"), 0);
    let irqs = h.irq.0.get();
    h.event_buffers(2, 24);
    assert_eq!(stat(&h, "events"), 1);
    assert!(h.irq.0.get() > irqs, "used-buffer interrupt");
    assert_eq!(h.used_idx(1), 1);
    let (head, len) = h.used_elem(1, 0);
    assert_eq!(len, 24);
    let rec = h.ram.bytes(RAM + 0x8000 + 0x20 * u64::from(head), 24);
    // MAPPING fault of endpoint 2 (psid 0x20), READ | ADDRESS, its IOVA.
    assert_eq!(rec[0], fault::R_MAPPING);
    assert_eq!(u32::from_le_bytes(rec[4..8].try_into().unwrap()), 0x101);
    assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), 2);
    assert_eq!(
        u64::from_le_bytes(rec[16..24].try_into().unwrap()),
        0x1234_5000
    );
    // The second buffer takes the next one at once.
    assert!(h.forward(1, &Event::new(EventKind::CBadCd, 1)));
    assert_eq!((stat(&h, "events"), h.used_idx(1)), (2, 2));
    // Not the guest's: a stage-2 fault, another VM's stream.
    let mut s2 = e;
    s2.s2 = true;
    assert!(!h.forward(0x20, &s2));
    assert!(!h.forward(7, &e));
    // With no buffer, 32 wait and the rest are dropped and counted.
    for _ in 0..40 {
        assert!(h.forward(8, &e));
    }
    assert_eq!(stat(&h, "events_dropped"), 8);
    h.event_buffers(40, 24);
    assert_eq!(stat(&h, "events"), 2 + 32);
    assert_eq!(stat(&h, "faults"), 2 + 40);
}

#[test]
fn bad_descriptors_need_a_reset_and_never_panic() {
    // Each breaks one rule of spec 2.7 for the request's chain; the device sets
    // DEVICE_NEEDS_RESET (spec 2.1.2) with a config-change interrupt and takes no more.
    type Spoil = fn(&mut Harness);
    let cases: [(&str, Spoil); 5] = [
        ("buffer outside RAM", |h| {
            h.put_desc(0, 0, RAM + RAM_SIZE as u64 - 8, 20, 1, 1)
        }),
        ("loop", |h| h.put_desc(0, 0, slot_buf(0), 20, 1, 0)),
        ("next out of range", |h| {
            h.put_desc(0, 0, slot_buf(0), 20, 1, 64)
        }),
        ("indirect", |h| h.put_desc(0, 0, slot_buf(0), 20, 4, 0)),
        ("readable after writable", |h| {
            h.put_desc(0, 1, slot_buf(0) + 0x100, 4, 3, 2);
            h.put_desc(0, 2, slot_buf(0), 4, 0, 0);
        }),
    ];
    for (what, spoil) in cases {
        let mut h = Harness::probed();
        h.ram.put(slot_buf(0), &attach(0, 1, 0));
        h.put_desc(0, 0, slot_buf(0), 20, 1, 1);
        h.put_desc(0, 1, slot_buf(0) + 0x100, 4, 2, 0);
        spoil(&mut h);
        h.make_available(0, &[0]);
        h.write(regs::QUEUE_NOTIFY, 4, 0);
        let st = h.read(regs::STATUS, 4);
        assert_ne!(st & 0x40, 0, "{what}: DEVICE_NEEDS_RESET");
        assert_eq!(h.read(regs::INTERRUPT_STATUS, 4) & 2, 2, "{what}");
        assert_eq!(stat(&h, "queue_errors"), 1, "{what}");
        assert_eq!(stat(&h, "domains"), 0, "{what}: not performed");
        // Notifies are ignored until the reset.
        h.write(regs::QUEUE_NOTIFY, 4, 0);
        assert_eq!(stat(&h, "notifies"), 1, "{what}");
        let f = h.device_features();
        assert!(h.negotiate(f, 64), "{what}: a reset recovers");
        assert_eq!(h.status_of(&attach(0, 1, 0)), Some(status::OK), "{what}");
    }
}

#[test]
fn short_and_odd_requests_get_their_statuses() {
    let mut h = Harness::probed();
    // A zero-length readable descriptor is left out of the chain: no type, nothing written.
    h.put_desc(0, 0, slot_buf(0), 0, 1, 1);
    h.put_desc(0, 1, slot_buf(0) + 0x100, 4, 2, 0);
    h.make_available(0, &[0]);
    h.write(regs::QUEUE_NOTIFY, 4, 0);
    assert_eq!((h.used_idx(0), h.used_elem(0, 0)), (1, (0, 0)));
    assert_eq!(stat(&h, "unknown"), 1);
    // Too short for its type: S_INVAL.
    assert_eq!(h.status_of(&attach(0, 1, 0)[..12]), Some(status::INVAL));
    assert_eq!(
        h.status_of(&map(0, 0, 0xfff, RAM, RW)[..30]),
        Some(status::INVAL)
    );
    // No room for the tail: completed with used length 0.
    let out = h.requests(&[(attach(0, 1, 0), 3)]);
    assert_eq!(out[0].as_ref().map(|o| o.0), Some(0));
    // Reserved bits: S_INVAL; an ATTACH the model cannot back: S_RANGE / S_NOENT.
    assert_eq!(h.status_of(&attach(0, 1, 2)), Some(status::INVAL));
    assert_eq!(h.status_of(&attach(8, 1, 0)), Some(status::RANGE));
    assert_eq!(h.status_of(&attach(0, 0x20, 0)), Some(status::NOENT));
    assert_eq!(stat(&h, "queue_errors"), 0);
    assert_eq!(h.read(regs::STATUS, 4) & 0x40, 0);
}

#[test]
fn a_physical_failure_is_ioerr_and_needs_a_reset() {
    let mut h = Harness::probed();
    h.phys.inner.fail = true;
    assert_eq!(h.status_of(&attach(0, 1, 0)), Some(status::IOERR));
    assert_ne!(h.read(regs::STATUS, 4) & 0x40, 0);
    assert!(stat(&h, "phys_errors") > 0);
    h.phys.inner.fail = false;
    let f = h.device_features();
    assert!(h.negotiate(f, 64));
    assert_eq!(h.read(regs::STATUS, 4) & 0x40, 0);
    assert_eq!(h.status_of(&attach(0, 1, 0)), Some(status::OK));
}

#[test]
fn reset_frees_everything_and_negotiation_works_again() {
    let mut h = Harness::probed();
    let out = h.requests(&[
        (attach(0, 1, 0), 4),
        (attach(3, 8, 0), 4),
        (map(0, 0, 0x1f_ffff, 0x20_0000, RW), 4),
        (map(3, 0x4000, 0x7fff, RAM, MAP_F_READ), 4),
    ]);
    assert!(out.iter().all(|o| o.as_ref().unwrap().1[0] == status::OK));
    assert_eq!(stat(&h, "domains"), 2);
    h.set_status(0);
    let c = h.counters();
    assert_eq!((c["domains"], c["mappings"], c["table_pages"]), (0, 0, 0));
    assert_eq!((c["resets"], c["status"]), (2, 0));
    for m in smmu::vsmmu::harness::STREAMS {
        assert_eq!(
            h.phys.inner.stes[&m.psid],
            smmu::ste::Ste::stage2(smmu::vsmmu::harness::s2_config())
        );
    }
    assert!(h
        .phys
        .inner
        .take_commands()
        .contains(&Command::TlbiNhAll { vmid: 5 }));
    // The queues are gone: a notify does nothing until set up again.
    h.write(regs::QUEUE_NOTIFY, 4, 0);
    assert_eq!(stat(&h, "notifies"), 1);
    let f = h.device_features();
    assert!(h.negotiate(f, 8));
    assert_eq!(h.used_idx(0), 0);
    assert_eq!(h.status_of(&attach(0, 1, 0)), Some(status::OK));
    assert_eq!(h.status_of(&map(0, 0, 0xfff, RAM, RW)), Some(status::OK));
    assert_eq!(stat(&h, "mappings"), 1);
    // A VM reset too, with bypass back to 1.
    h.write(regs::CONFIG + 0x24, 1, 0);
    assert_eq!(h.read(regs::CONFIG + 0x24, 1), 0);
    h.vm_reset();
    assert_eq!(h.read(regs::CONFIG + 0x24, 1), 1);
    assert_eq!(h.read(regs::STATUS, 4), 0);
    assert_eq!(stat(&h, "domains"), 0);
}

#[test]
fn bypass_byte_and_no_interrupt_hint() {
    let mut h = Harness::probed();
    h.write(regs::CONFIG + 0x24, 1, 0);
    for m in smmu::vsmmu::harness::STREAMS {
        assert_eq!(h.phys.inner.stes[&m.psid], smmu::ste::Ste::abort());
    }
    // VIRTQ_AVAIL_F_NO_INTERRUPT (Linux's request queue): completions raise nothing.
    h.ram.put(queue_base(0) + 0x400, &1u16.to_le_bytes());
    let irqs = h.irq.0.get();
    assert_eq!(
        h.status_of(&attach(0, 1, ATTACH_F_BYPASS)),
        Some(status::OK)
    );
    assert_eq!(h.irq.0.get(), irqs);
    assert_eq!(
        h.phys.inner.stes[&1],
        smmu::ste::Ste::stage2(smmu::vsmmu::harness::s2_config()),
        "a bypass domain is stage 2 only"
    );
    let s = h.dev.stats_line("vm");
    assert!(
        s.starts_with("viommu: vm stats: notifies=1 requests=1 attach=1 "),
        "{s}"
    );
    assert!(s.ends_with(&alloc::format!("status={}", h.read(regs::STATUS, 4))));
    assert_eq!(
        h.dev.status(),
        Status::all() - Status::DEVICE_NEEDS_RESET - Status::FAILED
    );
}

#[test]
fn a_bad_event_buffer_needs_a_reset_and_the_queue_is_left_alone() {
    let mut h = Harness::probed();
    let e = Event::new(EventKind::FTranslation, 1);
    // Two buffers outside RAM.
    for i in 0..2 {
        h.put_desc(1, i, RAM + RAM_SIZE as u64, 24, 2, 0);
    }
    h.make_available(1, &[0, 1]);
    assert!(h.forward(1, &e));
    assert_ne!(h.read(regs::STATUS, 4) & 0x40, 0);
    assert_eq!(stat(&h, "queue_errors"), 1);
    // Until the reset the device takes no more buffers (the harness's (d) checks it).
    assert!(h.forward(1, &e));
    assert_eq!(stat(&h, "queue_errors"), 1);
    let q = h.dev.queue(1).unwrap();
    assert_eq!((q.last_avail(), q.used_idx()), (1, 0));
}

use super::fake::{FakeSmmu, QEMU_IDR0, QEMU_IDR1, QEMU_IDR5};
use super::*;
use crate::cmd::TlbiAddr;
use crate::cmd::{Sync, SyncCs};
use crate::event::{EventClass, EventKind};
use crate::regs::StallModel;
use crate::ste::{S1Fields, S2Config};

type TestSmmu = Smmu<FakeSmmu, FakeSmmu>;

fn probe(fake: &FakeSmmu, cfg: SmmuConfig) -> Result<TestSmmu, DriverError> {
    Smmu::probe(fake.clone(), fake.clone(), cfg)
}

fn small_cfg() -> SmmuConfig {
    SmmuConfig {
        cmdq_max_log2: 2,
        evtq_max_log2: 2,
        poll_limit: 1000,
        ..SmmuConfig::default()
    }
}

fn s2() -> S2Config {
    S2Config {
        vmid: 3,
        root_pa: 0x8_1234_5000,
        t0sz: 24,
        sl0: 1,
        ps: 4,
        affd: false,
    }
}

fn ste_at(fake: &FakeSmmu, pa: u64) -> Ste {
    let mut w = [0u64; 8];
    for (i, x) in w.iter_mut().enumerate() {
        *x = fake.read_u64(pa + 8 * i as u64);
    }
    Ste(w)
}

#[test]
fn probe_linear_programs_everything() {
    let fake = FakeSmmu::new(QEMU_IDR0, 19 << 21 | 19 << 16 | 8, QEMU_IDR5);
    let smmu = probe(&fake, SmmuConfig::default()).unwrap();
    let f = smmu.features();
    assert_eq!(
        (f.sid_bits, f.two_level, f.vmid_bits, f.oas_bits),
        (8, false, 16, 44)
    );
    assert!(f.nesting);

    let cfg = fake.reg32(regs::SMMU_STRTAB_BASE_CFG);
    assert_eq!(cfg, 8, "FMT linear, LOG2SIZE 8");
    let base = fake.reg64(regs::SMMU_STRTAB_BASE);
    assert_ne!(base & 1 << 62, 0, "RA");
    let table = base & crate::bits::mask(51, 6);
    for sid in 0..256 {
        assert_eq!(ste_at(&fake, table + sid * 64), Ste::abort(), "sid {sid}");
    }

    let gbpa = Gbpa::from_bits_retain(fake.reg32(regs::SMMU_GBPA));
    assert!(gbpa.contains(Gbpa::ABORT) && !gbpa.contains(Gbpa::UPDATE));
    assert_eq!(gbpa.bits() & 0x3000, 0x1000, "other GBPA fields kept");
    assert_eq!(
        fake.reg32(regs::SMMU_CR0ACK),
        (Cr0::SMMUEN | Cr0::EVTQEN | Cr0::CMDQEN).bits()
    );
    assert_eq!(fake.reg32(regs::SMMU_CR1), regs::cr1::COHERENT);
    assert_eq!(
        fake.reg32(regs::SMMU_CR2),
        (Cr2::RECINVSID | Cr2::PTM).bits()
    );
    assert_eq!(fake.reg32(regs::SMMU_IRQ_CTRL), 0);
    assert_eq!(fake.reg64(regs::SMMU_CMDQ_BASE) & 0x1f, 8);
    assert_eq!(
        fake.reg64(regs::SMMU_EVENTQ_BASE) & 0x1f,
        u64::from(EVTQ_LOG2)
    );
    assert_eq!(
        fake.commands(),
        [
            Command::CfgiAll,
            Command::TlbiNsnhAll,
            Command::Sync(Sync::none())
        ]
    );
    // One PROD write to reset it, one for the whole batch.
    assert_eq!(fake.st().prod_writes, 2);
}

#[test]
fn probe_two_level_on_qemu_values() {
    let fake = FakeSmmu::qemu();
    let smmu = probe(&fake, SmmuConfig::default()).unwrap();
    assert!(smmu.features().two_level);
    assert_eq!(smmu.features().sid_bits, 16);
    // FMT = 2-level (0b01 at [17:16]), SPLIT 8 at [10:6], LOG2SIZE 16.
    assert_eq!(
        fake.reg32(regs::SMMU_STRTAB_BASE_CFG),
        1 << 16 | 8 << 6 | 16
    );
    let l1 = fake.reg64(regs::SMMU_STRTAB_BASE) & crate::bits::mask(51, 6);
    for i in 0..256 {
        assert_eq!(fake.read_u64(l1 + 8 * i), 0, "L1 descriptors start invalid");
    }
    // Queues capped by the config, not IDR1's 19.
    assert_eq!(fake.reg64(regs::SMMU_CMDQ_BASE) & 0x1f, 8);
    // A StreamID beyond the table.
    assert_eq!(
        smmu.ste(0x1_0000),
        Err(DriverError::StreamIdOutOfRange {
            sid: 0x1_0000,
            sid_bits: 16
        })
    );
}

#[test]
fn probe_issues_tlbi_el2_all_only_with_hyp() {
    let fake = FakeSmmu::new(QEMU_IDR0 | 1 << 9, QEMU_IDR1, QEMU_IDR5);
    probe(&fake, SmmuConfig::default()).unwrap();
    assert!(fake.commands().contains(&Command::TlbiEl2All));
    let fake = FakeSmmu::qemu();
    probe(&fake, SmmuConfig::default()).unwrap();
    assert!(!fake.commands().contains(&Command::TlbiEl2All));
}

#[test]
fn probe_names_missing_features() {
    let cases: [(u32, u32, u32, &str); 5] = [
        (QEMU_IDR0 & !1, QEMU_IDR1, QEMU_IDR5, "S2P"),
        (QEMU_IDR0 & !0b1100 | 0b0100, QEMU_IDR1, QEMU_IDR5, "TTF"),
        (QEMU_IDR0 & !(1 << 4), QEMU_IDR1, QEMU_IDR5, "COHACC"),
        (QEMU_IDR0, QEMU_IDR1, QEMU_IDR5 & !(1 << 4), "GRAN4K"),
        (QEMU_IDR0, QEMU_IDR1 | 1 << 30, QEMU_IDR5, "TABLES_PRESET"),
    ];
    for (i0, i1, i5, name) in cases {
        let fake = FakeSmmu::new(i0, i1, i5);
        match probe(&fake, SmmuConfig::default()) {
            Err(DriverError::MissingFeature(what)) => assert!(what.contains(name), "{what}"),
            other => panic!("{name}: {other:?}"),
        }
        // Nothing was touched before the checks.
        assert_eq!(fake.reg32(regs::SMMU_CR0), 0);
    }
    // Without VMID16 the SMMU still works, with 8-bit VMIDs.
    let fake = FakeSmmu::new(QEMU_IDR0 & !(1 << 18), QEMU_IDR1, QEMU_IDR5);
    assert_eq!(
        probe(&fake, SmmuConfig::default())
            .unwrap()
            .features()
            .vmid_bits,
        8
    );
}

#[test]
fn probe_polls_are_bounded() {
    let fake = FakeSmmu::qemu();
    fake.st().cr0ack_stuck = true;
    assert_eq!(
        probe(&fake, small_cfg()).unwrap_err(),
        DriverError::Timeout("SMMU_CR0ACK")
    );
    let fake = FakeSmmu::qemu();
    fake.st().gbpa_stuck = true;
    assert_eq!(
        probe(&fake, small_cfg()).unwrap_err(),
        DriverError::Timeout("SMMU_GBPA.UPDATE")
    );
}

fn numbered(n: u32) -> Vec<Command> {
    (0..n)
        .map(|sid| Command::CfgiSte { sid, leaf: true })
        .collect()
}

#[test]
fn submit_wraps_the_command_queue() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    fake.take_commands();
    // 4-entry queue: the probe left PROD at 3; 3 batches of 3 cross the wrap twice.
    for round in 0..3 {
        let cmds = numbered(3);
        smmu.submit_sync(&cmds).unwrap();
        let mut want = cmds.clone();
        want.push(Command::Sync(Sync::none()));
        assert_eq!(fake.take_commands(), want, "round {round}");
    }
    // A batch larger than the queue is split, waiting for space in between.
    let cmds = numbered(10);
    smmu.submit(&cmds).unwrap();
    assert_eq!(fake.take_commands(), cmds);
}

#[test]
fn submit_waits_for_space_when_the_smmu_is_slow() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    fake.take_commands();
    {
        let mut st = fake.st();
        st.consume_on_prod = false;
        st.consume_per_cons_read = 1;
    }
    let cmds = numbered(11);
    smmu.submit_sync(&cmds).unwrap();
    let mut want = cmds;
    want.push(Command::Sync(Sync::none()));
    assert_eq!(fake.take_commands(), want);
    let p = fake.reg32(regs::SMMU_CMDQ_PROD);
    assert_eq!(p, fake.reg32(regs::SMMU_CMDQ_CONS));
    // 3 (probe) + 12 = 15 entries: index 3, wrap bit (bit 2) set after 3 wraps.
    assert_eq!(p, 0b111);
}

#[test]
fn sync_times_out_when_nothing_is_consumed() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    {
        let mut st = fake.st();
        st.consume_on_prod = false;
        st.consume_per_cons_read = 0;
    }
    assert_eq!(
        smmu.sync(),
        Err(DriverError::Timeout("CMD_SYNC completion"))
    );
}

#[test]
fn illegal_command_is_reported_and_skipped() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    fake.take_commands();
    fake.st()
        .illegal_opcodes
        .push(crate::cmd::op::TLBI_S12_VMALL);
    let bad = Command::TlbiS12Vmall { vmid: 7 };
    let r = smmu.submit_sync(&[Command::TlbiNhAll { vmid: 7 }, bad]);
    // Probe used slots 0-2; the TLBI_NH_ALL is at 3, the bad one at index 0 after the wrap.
    assert_eq!(
        r,
        Err(DriverError::CommandError {
            cerror: Cerror::Illegal,
            index: 0,
            command: bad.encode(),
        })
    );
    assert!(
        !smmu.active_gerror().contains(Gerror::CMDQ_ERR),
        "acknowledged"
    );
    // The queue resumed: the bad command became a SYNC, and our SYNC ran after it.
    assert_eq!(
        fake.take_commands(),
        [
            Command::TlbiNhAll { vmid: 7 },
            Command::Sync(Sync::none()),
            Command::Sync(Sync::none())
        ]
    );
    smmu.submit_sync(&[Command::TlbiS2Ipa {
        vmid: 7,
        addr: TlbiAddr::single(0x4000_0000, true),
    }])
    .unwrap();
    assert_eq!(fake.take_commands().len(), 2);
}

#[test]
fn set_ste_linear_is_bit_exact_and_invalidates() {
    let fake = FakeSmmu::new(QEMU_IDR0, 19 << 21 | 19 << 16 | 6, QEMU_IDR5);
    let mut smmu = probe(&fake, SmmuConfig::default()).unwrap();
    fake.take_commands();
    let table = fake.reg64(regs::SMMU_STRTAB_BASE) & crate::bits::mask(51, 6);

    let ste = Ste::stage2(s2());
    smmu.set_ste(5, ste).unwrap();
    assert_eq!(ste_at(&fake, table + 5 * 64), ste);
    assert_eq!(smmu.ste(5), Ok(ste));
    assert_eq!(ste_at(&fake, table + 4 * 64), Ste::abort());
    assert_eq!(
        fake.take_commands(),
        [
            Command::CfgiSte { sid: 5, leaf: true },
            Command::Sync(Sync::none())
        ]
    );

    // Valid -> different valid: break (abort + CFGI_STE + SYNC), then make.
    let nested = Ste::nested(
        S1Fields {
            context_ptr: 0x4000_0000,
            cir: 1,
            cor: 1,
            csh: 3,
            ..S1Fields::default()
        },
        s2(),
    );
    smmu.set_ste(5, nested).unwrap();
    assert_eq!(ste_at(&fake, table + 5 * 64), nested);
    let cfgi = Command::CfgiSte { sid: 5, leaf: true };
    let sync = Command::Sync(Sync::none());
    assert_eq!(fake.take_commands(), [cfgi, sync, cfgi, sync]);

    // Back to abort: word 0 alone (any fetch sees the nested STE or an aborting one), no
    // break; words 1-7 keep their stale values, which an aborting STE ignores.
    smmu.set_ste(5, Ste::abort()).unwrap();
    let now = ste_at(&fake, table + 5 * 64);
    assert_eq!(now.0[0], Ste::abort().0[0]);
    assert_eq!(now.0[1..], nested.0[1..]);
    assert_eq!(fake.take_commands(), [cfgi, sync]);
    // From there (aborting) to stage 2: words 1-7, then word 0, no break.
    smmu.set_ste(5, ste).unwrap();
    assert_eq!(ste_at(&fake, table + 5 * 64), ste);
    assert_eq!(fake.take_commands(), [cfgi, sync]);
    // The same STE again: nothing written, nothing invalidated.
    smmu.set_ste(5, ste).unwrap();
    assert_eq!(fake.take_commands(), []);
    assert_eq!(
        smmu.set_ste(64, Ste::abort()),
        Err(DriverError::StreamIdOutOfRange {
            sid: 64,
            sid_bits: 6
        })
    );
}

#[test]
fn set_ste_two_level_allocates_l2_on_demand() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, SmmuConfig::default()).unwrap();
    fake.take_commands();
    let l1 = fake.reg64(regs::SMMU_STRTAB_BASE) & crate::bits::mask(51, 6);
    assert_eq!(smmu.ste(0x0103), Ok(Ste::abort()));

    let ste = Ste::stage2(s2());
    smmu.set_ste(0x0103, ste).unwrap();
    let desc = fake.read_u64(l1 + 8);
    assert_eq!(desc & 0x1f, 9, "Span = SPLIT + 1");
    let l2 = desc & crate::bits::mask(51, 6);
    assert_eq!(l2 % (16 << 10), 0, "L2 table aligned to its 16 KiB size");
    assert_eq!(ste_at(&fake, l2 + 3 * 64), ste);
    for i in (0..256).filter(|&i| i != 3) {
        assert_eq!(ste_at(&fake, l2 + i * 64), Ste::abort());
    }
    assert_eq!(fake.read_u64(l1), 0, "other L1 descriptors untouched");
    assert_eq!(
        fake.take_commands(),
        [
            Command::CfgiSte {
                sid: 0x0103,
                leaf: false
            },
            Command::Sync(Sync::none())
        ]
    );
    // Same bus: the L2 table is reused.
    smmu.set_ste(0x01ff, ste).unwrap();
    assert_eq!(fake.read_u64(l1 + 8), desc);
    assert_eq!(ste_at(&fake, l2 + 255 * 64), ste);
    assert_eq!(
        fake.take_commands()[0],
        Command::CfgiSte {
            sid: 0x01ff,
            leaf: true
        }
    );
}

fn event(n: u32) -> Event {
    Event {
        kind: EventKind::FTranslation,
        stream_id: n,
        substream: None,
        stag: 0,
        stall: false,
        pnu: false,
        ind: false,
        rnw: true,
        nsipa: false,
        s2: true,
        class: EventClass::In,
        input_addr: 0x1000 * u64::from(n),
        addr2: 0x8000_0000 + 0x1000 * u64::from(n),
    }
}

fn poll(smmu: &mut TestSmmu) -> (Vec<Event>, EventPoll) {
    let mut got = Vec::new();
    let r = smmu.poll_events(None, |e, fate| {
        assert_eq!(fate, EventFate::Deliver, "no clock, no budget");
        got.push(e)
    });
    (got, r)
}

#[test]
fn events_are_consumed_across_wrap_and_overflow_is_acknowledged() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    assert_eq!(poll(&mut smmu), (Vec::new(), EventPoll::default()));

    let mut n = 0;
    for round in 0..3 {
        let batch: Vec<Event> = (n..n + 3).map(event).collect();
        n += 3;
        for e in &batch {
            fake.push_event(*e);
        }
        let (got, r) = poll(&mut smmu);
        assert_eq!(got, batch, "round {round}");
        assert_eq!(
            r,
            EventPoll {
                events: 3,
                ..EventPoll::default()
            }
        );
        assert_eq!(
            fake.reg32(regs::SMMU_EVENTQ_CONS),
            fake.reg32(regs::SMMU_EVENTQ_PROD)
        );
    }

    // Six events into a 4-entry queue: two are dropped and OVFLG toggles.
    let batch: Vec<Event> = (n..n + 6).map(event).collect();
    for e in &batch {
        fake.push_event(*e);
    }
    let (got, r) = poll(&mut smmu);
    assert_eq!(got, batch[..4]);
    assert_eq!(
        r,
        EventPoll {
            events: 4,
            overflowed: true,
            stalls_terminated: 0
        }
    );
    let cons = fake.reg32(regs::SMMU_EVENTQ_CONS);
    assert_ne!(cons & OVERFLOW_FLAG, 0, "OVACKFLG copied from OVFLG");
    // Acknowledged: the next poll sees no overflow.
    fake.push_event(event(99));
    assert_eq!(
        poll(&mut smmu),
        (
            vec![event(99)],
            EventPoll {
                events: 1,
                ..EventPoll::default()
            }
        )
    );
}

#[test]
fn a_queued_sync_is_waited_for_apart_from_queueing_it() {
    let fake = FakeSmmu::qemu();
    let smmu = probe(&fake, small_cfg()).unwrap();
    fake.take_commands();
    let q = smmu.cmdq().clone();
    // Queued, not published: the SMMU has not been told.
    let prod = fake.reg32(regs::SMMU_CMDQ_PROD);
    let t = q.queue_sync(&[Command::TlbiNhAll { vmid: 1 }]).unwrap();
    assert_eq!(fake.reg32(regs::SMMU_CMDQ_PROD), prod);
    assert!(!q.completed(t));
    // QEMU consumes inside the PROD write: the wait publishes and sees it done.
    assert_eq!(q.wait(t), Ok(()));
    assert!(q.completed(t));
    assert_eq!(
        fake.take_commands(),
        [Command::TlbiNhAll { vmid: 1 }, Command::Sync(Sync::none())]
    );
    // An SMMU that consumes one command per CONS read: the wait drives it to completion.
    fake.st().consume_on_prod = false;
    let t = q
        .queue_sync(&[
            Command::TlbiNhAll { vmid: 1 },
            Command::TlbiNhAll { vmid: 2 },
        ])
        .unwrap();
    q.publish();
    assert!(!q.completed(t));
    assert_eq!(q.wait(t), Ok(()));
    assert_eq!(fake.take_commands().len(), 3);
    // A ticket long completed stays completed however many laps the queue made since.
    for _ in 0..10 {
        q.submit_sync(&numbered(3)).unwrap();
    }
    assert!(q.completed(t));
    assert_eq!(q.wait(t), Ok(()));
}

#[test]
fn a_command_error_is_reported_to_the_batch_that_had_it() {
    let fake = FakeSmmu::qemu();
    let smmu = probe(&fake, small_cfg()).unwrap();
    fake.st()
        .illegal_opcodes
        .push(crate::cmd::op::TLBI_S12_VMALL);
    fake.take_commands();
    let q = smmu.cmdq().clone();
    let bad = Command::TlbiS12Vmall { vmid: 7 };
    // Batch a (with the bad command), then batch b, queued before either is waited for.
    let a = q.queue_sync(&[bad]).unwrap();
    let b = q.queue_sync(&[Command::TlbiNhAll { vmid: 8 }]).unwrap();
    // b's wait finds the queue stopped, recovers it, and has nothing of its own to report.
    assert_eq!(q.wait(b), Ok(()));
    assert_eq!(q.error_count(), 1);
    // Probe used slots 0-2, a's bad command is at 3.
    assert_eq!(
        q.wait(a),
        Err(DriverError::CommandError {
            cerror: Cerror::Illegal,
            index: 3,
            command: bad.encode(),
        })
    );
    assert!(!smmu.active_gerror().contains(Gerror::CMDQ_ERR));
    assert_eq!(
        fake.take_commands(),
        [
            Command::Sync(Sync::none()),
            Command::Sync(Sync::none()),
            Command::TlbiNhAll { vmid: 8 },
            Command::Sync(Sync::none())
        ]
    );
}

#[test]
fn publication_takes_every_contiguous_ready_entry() {
    let fake = FakeSmmu::qemu();
    let smmu = probe(&fake, SmmuConfig::default()).unwrap();
    fake.take_commands();
    let writes = fake.st().prod_writes;
    let q = smmu.cmdq().clone();
    q.queue(&numbered(2)).unwrap();
    q.queue(&numbered(3)).unwrap();
    let t = q.queue_sync(&[]).unwrap();
    assert_eq!(fake.st().prod_writes, writes, "nothing published yet");
    q.publish();
    assert_eq!(
        fake.st().prod_writes,
        writes + 1,
        "one PROD write for three batches"
    );
    assert_eq!(fake.take_commands().len(), 6);
    assert!(q.completed(t) || q.wait(t).is_ok());
    q.publish();
    assert_eq!(
        fake.st().prod_writes,
        writes + 1,
        "nothing new: no PROD write"
    );
}

#[test]
fn write_ste_breaks_only_what_a_single_write_cannot_change() {
    let fake = FakeSmmu::new(QEMU_IDR0, 19 << 21 | 19 << 16 | 6, QEMU_IDR5);
    let mut smmu = probe(&fake, SmmuConfig::default()).unwrap();
    fake.take_commands();
    let table = fake.reg64(regs::SMMU_STRTAB_BASE) & crate::bits::mask(51, 6);
    let cfgi = Command::CfgiSte { sid: 3, leaf: true };
    let s1 = |ptr| S1Fields {
        context_ptr: ptr,
        cir: 1,
        cor: 1,
        csh: 3,
        ..S1Fields::default()
    };
    let a = Ste::nested(s1(0x4000_0000), s2());
    let b = Ste::nested(s1(0x4000_1000), s2());
    // From abort: written at once (words 1-7, then word 0).
    assert_eq!(smmu.write_ste(3, a), Ok(SteWrite::Written(cfgi)));
    assert_eq!(ste_at(&fake, table + 3 * 64), a);
    // Another CD pointer: only word 0 differs, one single-copy atomic write.
    assert_eq!(smmu.write_ste(3, b), Ok(SteWrite::Written(cfgi)));
    assert_eq!(ste_at(&fake, table + 3 * 64), b);
    assert_eq!(smmu.write_ste(3, b), Ok(SteWrite::Unchanged));
    // Nested to stage 2 changes words 0-2: break. Word 0 aborts now, nothing else moved.
    let st2 = Ste::stage2(s2());
    let SteWrite::Broken(br) = smmu.write_ste(3, st2).unwrap() else {
        panic!("nested -> stage 2 needs a break");
    };
    assert_eq!(
        br,
        SteBreak {
            sid: 3,
            ste: st2,
            cfgi
        }
    );
    let mid = ste_at(&fake, table + 3 * 64);
    assert_eq!(mid.0[0], Ste::abort().0[0]);
    assert_eq!(mid.0[1..], b.0[1..]);
    // The make writes the rest and hands back the CFGI_STE; nothing was queued by the driver.
    assert_eq!(smmu.make_ste(br), Ok(cfgi));
    assert_eq!(ste_at(&fake, table + 3 * 64), st2);
    assert_eq!(fake.take_commands(), []);
}

#[test]
fn stall_model_is_read_and_every_ste_honours_it() {
    let stall_idr0 = |model: u32| (QEMU_IDR0 & !(3 << 24)) | model << 24;
    let nested = Ste::nested(S1Fields::default(), s2());
    let st2 = Ste::stage2(s2());
    for (model, want, s1stalld, s2s) in [
        (0, StallModel::Stall, true, false),
        (1, StallModel::Terminate, false, false),
        (2, StallModel::Forced, false, true),
    ] {
        let fake = FakeSmmu::new(stall_idr0(model), QEMU_IDR1, QEMU_IDR5);
        let mut smmu = probe(&fake, SmmuConfig::default()).unwrap();
        assert_eq!(smmu.features().stall_model, want);
        smmu.set_ste(0x10, nested).unwrap();
        let got = smmu.ste(0x10).unwrap();
        assert_eq!(
            (got.s1stalld(), got.s2s()),
            (s1stalld, s2s),
            "nested STE, {want:?}"
        );
        smmu.set_ste(0x11, st2).unwrap();
        let got = smmu.ste(0x11).unwrap();
        assert_eq!(
            (got.s1stalld(), got.s2s()),
            (false, s2s),
            "stage 2, {want:?}"
        );
        // The abort STE carries neither.
        smmu.set_ste(0x12, Ste::abort()).unwrap();
        assert_eq!(smmu.ste(0x12).unwrap(), Ste::abort());
    }
}

#[test]
fn forced_stalls_are_all_terminated() {
    let fake = FakeSmmu::new((QEMU_IDR0 & !(3 << 24)) | 2 << 24, QEMU_IDR1, QEMU_IDR5);
    let mut smmu = probe(&fake, SmmuConfig::default()).unwrap();
    fake.take_commands();
    let mut stalled = event(0x10);
    stalled.stall = true;
    stalled.stag = 0x1234;
    let mut other = event(0x11);
    other.stall = true;
    other.stag = 7;
    fake.push_event(stalled);
    fake.push_event(event(0x12));
    fake.push_event(other);
    let (got, r) = poll(&mut smmu);
    assert_eq!(got.len(), 3);
    assert_eq!(r.stalls_terminated, 2);
    assert_eq!(smmu.stats().stalls_terminated, 2);
    assert_eq!(
        fake.take_commands(),
        [
            Command::Resume {
                sid: 0x10,
                stag: 0x1234,
                resp: RESUME_ABORT
            },
            Command::Resume {
                sid: 0x11,
                stag: 7,
                resp: RESUME_ABORT
            },
        ]
    );
}

#[test]
fn a_stream_faulting_beyond_its_budget_is_quarantined_then_restored() {
    let fake = FakeSmmu::qemu();
    let cfg = SmmuConfig {
        events: EventBudget {
            burst: 4,
            period_ns: 1_000,
            cooldown_ns: 100_000,
        },
        ..SmmuConfig::default()
    };
    let mut smmu = probe(&fake, cfg).unwrap();
    let st2 = Ste::stage2(s2());
    smmu.set_ste(0x10, st2).unwrap();
    smmu.set_ste(0x20, st2).unwrap();
    fake.take_commands();
    let mut t = 1_000_000u64;
    let run = |smmu: &mut TestSmmu, evs: &[Event], t: u64| {
        for e in evs {
            fake.push_event(*e);
        }
        let mut fates = Vec::new();
        smmu.poll_events(Some(t), |e, f| fates.push((e.stream_id, f)));
        fates
    };
    // Stream 0x10 floods: 4 delivered, the 5th quarantines, the rest are suppressed. The other
    // stream's records in between are all delivered.
    let mut evs: Vec<Event> = (0..10).map(|_| event(0x10)).collect();
    evs.insert(7, event(0x20));
    let fates = run(&mut smmu, &evs, t);
    let of = |sid: u32, fate| fates.iter().filter(|&&x| x == (sid, fate)).count();
    assert_eq!(of(0x10, EventFate::Deliver), 4);
    assert_eq!(of(0x10, EventFate::Quarantined), 1);
    assert_eq!(of(0x10, EventFate::Suppressed), 5);
    assert_eq!(of(0x20, EventFate::Deliver), 1);
    assert!(smmu.quarantined(0x10) && !smmu.quarantined(0x20));
    // Reported once, with its cool-down, for the caller to name the stream's VM.
    assert_eq!(smmu.take_quarantines(), [(0x10, 100_000)]);
    assert_eq!(smmu.take_quarantines(), []);
    assert_eq!(
        smmu.ste(0x10).unwrap().config(),
        crate::ste::StreamConfig::Abort
    );
    assert_eq!(
        fake.take_commands(),
        [
            Command::CfgiSte {
                sid: 0x10,
                leaf: true
            },
            Command::Sync(Sync::none())
        ]
    );
    // Its owner changes its STE meanwhile: kept for the restoration, the table still aborts.
    let nested = Ste::nested(S1Fields::default(), s2());
    assert_eq!(smmu.write_ste(0x10, nested), Ok(SteWrite::Unchanged));
    assert_eq!(
        smmu.ste(0x10).unwrap().config(),
        crate::ste::StreamConfig::Abort
    );
    // Before the cool-down ends: still quarantined.
    t += 50_000;
    assert_eq!(run(&mut smmu, &[], t), []);
    assert!(smmu.quarantined(0x10));
    // After: restored with the STE asked for last, its budget full again.
    t += 60_000;
    assert_eq!(
        run(&mut smmu, &[event(0x10)], t),
        [(0x10, EventFate::Deliver)]
    );
    assert!(!smmu.quarantined(0x10));
    assert_eq!(smmu.ste(0x10).unwrap(), nested);
    assert_eq!(smmu.stats().quarantines, 1);
    assert_eq!(smmu.stats().restores, 1);
    assert_eq!(smmu.stats().events_suppressed, 5);
    // Faulting again right away: the next cool-down is twice as long.
    let fates = run(&mut smmu, &vec![event(0x10); 8], t);
    assert!(fates.contains(&(0x10, EventFate::Quarantined)));
    t += 150_000;
    run(&mut smmu, &[], t);
    assert!(smmu.quarantined(0x10), "doubled cool-down: 200 us");
    t += 60_000;
    run(&mut smmu, &[], t);
    assert!(!smmu.quarantined(0x10));
}

/// A global error the hypervisor reports is acknowledged (its GERRORN bit toggled, IHI 0070
/// 7.5), once; CMDQ_ERR is left to the command queue's recovery.
#[test]
fn reported_global_errors_are_acknowledged_and_cmdq_err_is_left_alone() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, SmmuConfig::default()).unwrap();
    assert_eq!(smmu.acknowledge_gerror(), Gerror::empty());
    let raised = Gerror::EVENTQ_ABT_ERR | Gerror::CMDQ_ERR | Gerror::MSI_EVENTQ_ABT_ERR;
    fake.st().regs32.insert(regs::SMMU_GERROR, raised.bits());
    assert_eq!(
        smmu.acknowledge_gerror(),
        Gerror::EVENTQ_ABT_ERR | Gerror::MSI_EVENTQ_ABT_ERR
    );
    assert_eq!(smmu.active_gerror(), Gerror::CMDQ_ERR);
    assert_eq!(smmu.acknowledge_gerror(), Gerror::empty(), "once");
    // Raised again (the SMMU toggles its GERROR bit once more): acknowledged again.
    let again = raised ^ Gerror::EVENTQ_ABT_ERR;
    fake.st().regs32.insert(regs::SMMU_GERROR, again.bits());
    assert_eq!(smmu.acknowledge_gerror(), Gerror::EVENTQ_ABT_ERR);
}

/// SMMU_IDR0.MSI (IHI 0070 6.3.1).
const IDR0_MSI: u32 = 1 << 13;

#[test]
fn with_idr0_msi_a_cmd_sync_completes_by_its_msi_and_the_wait_reads_no_cons() {
    let fake = FakeSmmu::new(QEMU_IDR0 | IDR0_MSI, QEMU_IDR1, QEMU_IDR5);
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    assert!(smmu.cmdq().msi_completion());
    let word = {
        let Some(Command::Sync(s)) = fake.take_commands().last().copied() else {
            panic!("probe ends with a CMD_SYNC");
        };
        assert_eq!((s.cs, s.msh, s.msiattr), (SyncCs::Irq, 3, 0xf));
        // The word sits just after the queue (4 entries of 16 bytes here).
        assert_eq!(
            s.msiaddr,
            (fake.reg64(regs::SMMU_CMDQ_BASE) & crate::bits::mask(51, 5)) + 64
        );
        s.msiaddr
    };
    // Several syncs, across wraps of the 4-entry queue: each writes its own number (+ 1), and
    // no wait needs SMMU_CMDQ_CONS.
    for i in 0..10u32 {
        let reads = fake.st().cons_reads;
        smmu.submit_sync(&[Command::TlbiNhAll { vmid: 7 }]).unwrap();
        assert_eq!(fake.st().cons_reads, reads, "sync {i} read CMDQ_CONS");
        let cmds = fake.take_commands();
        let Some(Command::Sync(s)) = cmds.last().copied() else {
            panic!("{cmds:?}");
        };
        let mut b = [0u8; 4];
        fake.0.borrow().read_ram(word, &mut b);
        assert_eq!(u32::from_le_bytes(b), s.msidata);
    }
}

#[test]
fn with_msi_completion_a_command_error_is_still_found_through_cons() {
    let fake = FakeSmmu::new(QEMU_IDR0 | IDR0_MSI, QEMU_IDR1, QEMU_IDR5);
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    fake.take_commands();
    fake.st()
        .illegal_opcodes
        .push(crate::cmd::op::TLBI_S12_VMALL);
    let bad = Command::TlbiS12Vmall { vmid: 7 };
    let r = smmu.submit_sync(&[bad]);
    assert!(
        matches!(
            r,
            Err(DriverError::CommandError {
                cerror: Cerror::Illegal,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(fake.st().cons_reads > 0);
    // Resumed, and back to MSI completion.
    smmu.submit_sync(&[Command::TlbiNhAll { vmid: 7 }]).unwrap();
}

#[test]
fn without_idr0_msi_cmd_syncs_poll_cons() {
    let fake = FakeSmmu::qemu();
    let mut smmu = probe(&fake, small_cfg()).unwrap();
    assert!(!smmu.cmdq().msi_completion());
    let reads = fake.st().cons_reads;
    smmu.submit_sync(&[Command::TlbiNhAll { vmid: 7 }]).unwrap();
    assert!(fake.st().cons_reads > reads);
    assert_eq!(
        fake.take_commands().last(),
        Some(&Command::Sync(Sync::none()))
    );
}

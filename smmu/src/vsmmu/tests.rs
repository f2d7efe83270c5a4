use super::*;
use crate::cmd::{Sync, SyncCs, TlbiAddr};
use crate::driver::fake::FakeSmmu;
use crate::driver::{SmmuConfig, SyncTicket};
use crate::event::EventClass;
use crate::regs::Cerror;
use crate::regs::{Idr0, Idr1, Idr3, StLevel, Ttf};
use crate::ste::{S1Fields, StreamConfig};
use alloc::collections::BTreeMap;
use alloc::vec;

/// Guest RAM: 1 MiB at IPA 0x4000_0000.
const RAM: u64 = 0x4000_0000;
const RAM_SIZE: usize = 1 << 20;
/// Where the simulated guest driver keeps its structures.
const STRTAB: u64 = RAM + 0x1_0000;
const CMDQ: u64 = RAM + 0x2_0000;
const EVTQ: u64 = RAM + 0x3_0000;
const CD: u64 = RAM + 0x4_0000;
const L2: u64 = RAM + 0x5_0000;

struct FakeRam(Vec<u8>);

impl FakeRam {
    fn new() -> Self {
        Self(vec![0; RAM_SIZE])
    }

    fn range(ipa: u64, len: usize) -> Result<core::ops::Range<usize>, GuestMemError> {
        let err = GuestMemError {
            ipa,
            len: len as u64,
        };
        let off = ipa.checked_sub(RAM).ok_or(err)? as usize;
        if off + len > RAM_SIZE {
            return Err(err);
        }
        Ok(off..off + len)
    }

    fn put(&mut self, ipa: u64, data: &[u8]) {
        self.write(ipa, data).unwrap();
    }

    fn u32_at(&self, ipa: u64) -> u32 {
        let mut b = [0; 4];
        self.read(ipa, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn event_at(&self, ipa: u64) -> Event {
        let mut b = [0; 32];
        self.read(ipa, &mut b).unwrap();
        Event::from_bytes(&b)
    }
}

impl GuestMemory for FakeRam {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        buf.copy_from_slice(&self.0[Self::range(ipa, buf.len())?]);
        Ok(())
    }

    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let r = Self::range(ipa, data.len())?;
        self.0[r].copy_from_slice(data);
        Ok(())
    }
}

/// A physical SMMU that records what it is asked to do.
#[derive(Default)]
struct RecPhys {
    stes: BTreeMap<u32, Ste>,
    ste_writes: Vec<u32>,
    cmds: Vec<Command>,
    /// Submissions (with or without sync).
    submits: usize,
    syncs: usize,
    /// Publications asked for.
    publishes: core::cell::Cell<usize>,
    /// Tickets waited for, in order.
    waits: core::cell::RefCell<Vec<u64>>,
}

impl RecPhys {
    /// The StreamIDs whose STE was written or invalidated, sorted.
    fn touched(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.ste_writes.clone();
        v.extend(self.cmds.iter().filter_map(|c| match c {
            Command::CfgiSte { sid, .. } => Some(*sid),
            _ => None,
        }));
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl PhysicalSmmu for RecPhys {
    fn set_ste(&mut self, sid: u32, ste: Ste) -> Result<(), DriverError> {
        self.stes.insert(sid, ste);
        self.ste_writes.push(sid);
        Ok(())
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.cmds.extend_from_slice(cmds);
        self.submits += 1;
        Ok(())
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.cmds.extend_from_slice(cmds);
        self.submits += 1;
        self.syncs += 1;
        Ok(SyncTicket::at(self.syncs as u64))
    }

    fn publish(&self) {
        self.publishes.set(self.publishes.get() + 1);
    }

    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        self.waits.borrow_mut().push(ticket.seq());
        Ok(())
    }
}

fn s2() -> S2Config {
    S2Config {
        vmid: 7,
        root_pa: 0x8_0000_0000,
        t0sz: 25,
        sl0: 1,
        ps: 4,
        affd: false,
    }
}

/// The VM owns guest StreamIDs 8 and 16, physically 0x108 and 0x110.
fn cfg() -> VsmmuConfig {
    VsmmuConfig {
        name: "vm0".into(),
        streams: vec![
            StreamMap {
                vsid: 8,
                psid: 0x108,
            },
            StreamMap {
                vsid: 16,
                psid: 0x110,
            },
        ],
        s2: s2(),
        sid_bits: 16,
        oas_bits: 40,
        phys_idr5: 0x70 | 4,
        phys_ril: true,
    }
}

/// A vSMMU with a guest RAM and a recording physical SMMU, and a guest driver's helpers.
struct Rig {
    v: Vsmmu,
    ram: FakeRam,
    phys: RecPhys,
    /// Guest's own CMDQ PROD.
    prod: u32,
    cmdq_log2: u8,
}

impl Rig {
    fn new() -> Self {
        let mut r = Self {
            v: Vsmmu::new(cfg()),
            ram: FakeRam::new(),
            phys: RecPhys::default(),
            prod: 0,
            cmdq_log2: CMDQS,
        };
        r.v.reset(&mut r.phys);
        r.phys = RecPhys::default();
        r
    }

    fn w32(&mut self, off: u64, v: u32) -> Irqs {
        self.v
            .write(off, 4, v.into(), &mut self.ram, &mut self.phys)
    }

    fn w64(&mut self, off: u64, v: u64) -> Irqs {
        self.v.write(off, 8, v, &mut self.ram, &mut self.phys)
    }

    fn r32(&mut self, off: u64) -> u32 {
        self.v.read(off, 4) as u32
    }

    /// What Linux's probe does, with a linear stream table (or 2-level when `two_level`).
    fn enable(&mut self, two_level: bool) {
        self.w32(regs::SMMU_CR0, 0);
        self.w32(regs::SMMU_CR1, regs::cr1::COHERENT);
        self.w64(regs::SMMU_STRTAB_BASE, regs::strtab_base(STRTAB, true));
        let cfg = if two_level {
            regs::strtab_base_cfg(regs::StrtabFmt::TwoLevel, 16, 8)
        } else {
            regs::strtab_base_cfg(regs::StrtabFmt::Linear, 5, 0)
        };
        self.w32(regs::SMMU_STRTAB_BASE_CFG, cfg);
        self.w64(
            regs::SMMU_CMDQ_BASE,
            regs::queue_base(CMDQ, self.cmdq_log2, true),
        );
        self.w32(regs::SMMU_CMDQ_PROD, 0);
        self.w32(regs::SMMU_CMDQ_CONS, 0);
        self.w32(regs::SMMU_CR0, Cr0::CMDQEN.bits());
        self.w64(regs::SMMU_EVENTQ_BASE, regs::queue_base(EVTQ, 2, true));
        self.w32(regs::SMMU_EVENTQ_PROD, 0);
        self.w32(regs::SMMU_EVENTQ_CONS, 0);
        self.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::EVTQEN).bits());
        self.w32(
            regs::SMMU_IRQ_CTRL,
            (IrqCtrl::EVENTQ_IRQEN | IrqCtrl::GERROR_IRQEN).bits(),
        );
        self.w32(
            regs::SMMU_CR0,
            (Cr0::CMDQEN | Cr0::EVTQEN | Cr0::SMMUEN).bits(),
        );
    }

    /// Writes commands into the guest's queue; returns its new PROD.
    fn put_cmds(&mut self, cmds: &[Command]) -> u32 {
        let q = Queue::new(self.cmdq_log2);
        for c in cmds {
            let slot = CMDQ + u64::from(q.index(self.prod)) * 16;
            self.ram.put(slot, &c.to_bytes());
            self.prod = q.inc(self.prod);
        }
        self.prod
    }

    /// Writes commands into the guest's queue and publishes them with one PROD write.
    fn issue(&mut self, cmds: &[Command]) -> Irqs {
        let p = self.put_cmds(cmds);
        self.w32(regs::SMMU_CMDQ_PROD, p)
    }

    fn issue_raw(&mut self, words: [u64; 2]) -> Irqs {
        let q = Queue::new(self.cmdq_log2);
        let slot = CMDQ + u64::from(q.index(self.prod)) * 16;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&words[0].to_le_bytes());
        b[8..].copy_from_slice(&words[1].to_le_bytes());
        self.ram.put(slot, &b);
        self.prod = q.inc(self.prod);
        let p = self.prod;
        self.w32(regs::SMMU_CMDQ_PROD, p)
    }

    fn put_ste(&mut self, vsid: u32, ste: Ste) {
        self.ram.put(STRTAB + u64::from(vsid) * 64, &ste.to_bytes());
    }

    fn cons(&mut self) -> u32 {
        self.r32(regs::SMMU_CMDQ_CONS)
    }

    fn gerror_active(&mut self) -> u32 {
        self.r32(regs::SMMU_GERROR) ^ self.r32(regs::SMMU_GERRORN)
    }
}

fn s1_ste(ctx: u64) -> Ste {
    let mut s = Ste::default();
    s.set_v(true).set_config(StreamConfig::S1Translate);
    s.set_s1_context_ptr(ctx)
        .set_s1cir(1)
        .set_s1cor(1)
        .set_s1csh(3);
    s
}

fn guest_ste(config: u8) -> Ste {
    let mut s = Ste::default();
    s.set_v(true);
    s.0[0] |= u64::from(config) << 1;
    s
}

fn nested(ctx: u64) -> Ste {
    Ste::nested(
        S1Fields {
            context_ptr: ctx,
            fmt: 0,
            cdmax: 0,
            dss: 0,
            cir: 1,
            cor: 1,
            csh: 3,
        },
        s2(),
    )
}

#[test]
fn id_registers_advertise_stage_1_only() {
    let mut r = Rig::new();
    let idr0 = Idr0(r.r32(regs::SMMU_IDR0));
    assert!(idr0.s1p() && !idr0.s2p());
    assert!(!idr0.hyp() && !idr0.ats() && !idr0.pri() && !idr0.sev() && !idr0.vmid16());
    assert!(idr0.msi() && idr0.cohacc() && idr0.asid16());
    assert_eq!(idr0.ttf(), Ttf::AArch64);
    assert_eq!(idr0.st_level(), StLevel::TwoLevel);
    assert_eq!(idr0.ttendian(), 2);
    let idr1 = Idr1(r.r32(regs::SMMU_IDR1));
    assert_eq!(
        (
            idr1.sidsize(),
            idr1.ssidsize(),
            idr1.cmdqs(),
            idr1.eventqs()
        ),
        (16, 0, CMDQS, EVENTQS)
    );
    assert!(Idr3(r.r32(regs::SMMU_IDR3)).ril());
    let idr5 = regs::Idr5(r.r32(regs::SMMU_IDR5));
    assert_eq!(idr5.oas_bits(), Some(40));
    assert!(idr5.gran4k() && idr5.gran16k() && idr5.gran64k());
    assert_eq!(idr5.vax(), 0);
    // Writes to ID registers are ignored.
    r.w32(regs::SMMU_IDR0, 0);
    assert_eq!(r.r32(regs::SMMU_IDR0), idr0.0);
    // Without RIL on the physical SMMU, the guest is not offered it.
    let mut c = cfg();
    c.phys_ril = false;
    assert!(!Idr3(Vsmmu::new(c).read(regs::SMMU_IDR3, 4) as u32).ril());
}

#[test]
fn control_registers_acknowledge_and_guard() {
    let mut r = Rig::new();
    r.w32(regs::SMMU_CR0, 0xffff_ffff);
    // Only SMMUEN, EVTQEN, CMDQEN exist; the ACK follows at once.
    assert_eq!(r.r32(regs::SMMU_CR0ACK), 0b1101);
    r.w32(regs::SMMU_CR0, 0);
    r.w32(regs::SMMU_IRQ_CTRL, 0xff);
    assert_eq!(r.r32(regs::SMMU_IRQ_CTRLACK), 0b101);
    // 64-bit registers through two 32-bit halves.
    r.w32(regs::SMMU_IRQ_CTRL, 0);
    r.w32(regs::SMMU_STRTAB_BASE, 0x4001_0040);
    r.w32(regs::SMMU_STRTAB_BASE + 4, 0x4000_0001);
    assert_eq!(r.v.read(regs::SMMU_STRTAB_BASE, 8), 0x4000_0001_4001_0040);
    // A base is read-only while its enable is set.
    r.w32(regs::SMMU_CR0, Cr0::CMDQEN.bits());
    r.w64(regs::SMMU_CMDQ_BASE, 0x1234_5000);
    assert_eq!(r.v.read(regs::SMMU_CMDQ_BASE, 8), 0);
    r.w32(regs::SMMU_CR0, 0);
    r.w64(regs::SMMU_CMDQ_BASE, regs::queue_base(CMDQ, 8, false));
    assert_eq!(r.v.read(regs::SMMU_CMDQ_BASE, 8), CMDQ | 8);
    // Reserved space reads as zero and ignores writes.
    r.w32(0x400, 5);
    assert_eq!(r.r32(0x400), 0);
    assert_eq!(r.r32(regs::SMMU_PRIQ_PROD), 0);
}

#[test]
fn reset_puts_streams_on_stage_2_only_and_drops_the_vms_tlb() {
    let mut v = Vsmmu::new(cfg());
    let mut phys = RecPhys::default();
    v.reset(&mut phys);
    assert_eq!(phys.ste_writes, [0x108, 0x110]);
    for sid in [0x108, 0x110] {
        assert_eq!(phys.stes[&sid], Ste::stage2(s2()));
    }
    assert_eq!(phys.cmds, [Command::TlbiNhAll { vmid: 7 }]);
    assert_eq!(phys.syncs, 1);
    assert_eq!(v.read(regs::SMMU_GBPA, 4), 0x1000);
}

#[test]
fn gbpa_update_handshake_applies_only_while_disabled() {
    let mut r = Rig::new();
    // Without UPDATE the write is ignored.
    r.w32(regs::SMMU_GBPA, Gbpa::ABORT.bits());
    assert_eq!(r.r32(regs::SMMU_GBPA), 0x1000);
    assert!(r.phys.ste_writes.is_empty());
    // With UPDATE it takes effect at once and UPDATE reads back 0.
    r.w32(regs::SMMU_GBPA, (Gbpa::ABORT | Gbpa::UPDATE).bits());
    assert_eq!(r.r32(regs::SMMU_GBPA), Gbpa::ABORT.bits());
    assert_eq!(r.phys.stes[&0x108], Ste::abort());
    assert_eq!(r.phys.stes[&0x110], Ste::abort());
    // Back to bypass: stage 2 only, never physical bypass.
    r.w32(regs::SMMU_GBPA, Gbpa::UPDATE.bits());
    assert_eq!(r.phys.stes[&0x108], Ste::stage2(s2()));
    // While enabled, GBPA changes nothing physical.
    r.enable(false);
    r.phys.ste_writes.clear();
    r.w32(regs::SMMU_GBPA, (Gbpa::ABORT | Gbpa::UPDATE).bits());
    assert!(r.phys.ste_writes.is_empty());
    // Disabling puts GBPA (abort) in force.
    r.w32(regs::SMMU_CR0, 0);
    assert_eq!(r.phys.stes[&0x108], Ste::abort());
}

#[test]
fn every_config_value_shadows_to_the_right_physical_ste() {
    let bad = Some(EventKind::CBadSte);
    let cases: [(Ste, Ste, Option<EventKind>); 10] = [
        (guest_ste(0), Ste::abort(), None),
        (guest_ste(1), Ste::default(), bad),
        (guest_ste(2), Ste::default(), bad),
        (guest_ste(3), Ste::default(), bad),
        (guest_ste(4), Ste::stage2(s2()), None),
        (s1_ste(CD), nested(CD), None),
        (guest_ste(6), Ste::default(), bad),
        (guest_ste(7), Ste::default(), bad),
        // V = 0.
        (Ste::default(), Ste::default(), bad),
        (*s1_ste(CD).set_v(false), Ste::default(), bad),
    ];
    for (i, (g, want, want_bad)) in cases.into_iter().enumerate() {
        let (got, got_bad) = shadow_ste(&GuestSte(g), &cfg());
        assert_eq!((got, got_bad), (want, want_bad), "case {i}");
    }
    // Illegal for a stage-1-only SMMU without substreams: S1CDMax > 0, STRW = EL2, a CD pointer
    // beyond the 40-bit OAS.
    for g in [
        *s1_ste(CD).set_s1cdmax(1),
        *s1_ste(CD).set_strw(2),
        *s1_ste(CD).set_strw(1),
        s1_ste(1 << 40),
    ] {
        assert_eq!(shadow_ste(&GuestSte(g), &cfg()), (Ste::default(), bad));
    }
    // Guest fields a stage-1-only SMMU cannot honour do not reach the physical STE.
    let mut g = s1_ste(CD);
    g.set_eats(1)
        .set_s1stalld(true)
        .set_s2vmid(99)
        .set_s2ttb(0x1000);
    let (p, _) = shadow_ste(&GuestSte(g), &cfg());
    assert_eq!(p, nested(CD));
    assert_eq!((p.s2vmid(), p.s2ttb()), (7, s2().root_pa));
}

#[test]
fn linear_table_cfgi_ste_shadows_owned_streams_only() {
    let mut r = Rig::new();
    for sid in 0..32 {
        r.put_ste(sid, s1_ste(CD + u64::from(sid) * 64));
    }
    r.enable(false);
    // SMMUEN: the guest table comes into force for owned streams.
    assert_eq!(r.phys.stes[&0x108], nested(CD + 8 * 64));
    assert_eq!(r.phys.stes[&0x110], nested(CD + 16 * 64));
    r.phys = RecPhys::default();
    r.put_ste(8, guest_ste(4));
    r.issue(&[
        Command::CfgiSte { sid: 8, leaf: true },
        Command::Sync(Sync::none()),
    ]);
    assert_eq!(r.phys.ste_writes, [0x108]);
    assert_eq!(r.phys.stes[&0x108], Ste::stage2(s2()));
    // StreamIDs the VM does not own: nothing physical, whatever the guest table says.
    r.phys = RecPhys::default();
    r.issue(&[
        Command::CfgiSte { sid: 9, leaf: true },
        Command::CfgiSte { sid: 0, leaf: true },
        Command::Sync(Sync::none()),
    ]);
    assert!(r.phys.ste_writes.is_empty());
    assert!(r.phys.cmds.is_empty());
    // Ranges: [16, 32) covers 16 only; [0, 8) nothing; CFGI_ALL both.
    // An unchanged STE is not rewritten: the physical SMMU gets the invalidation only.
    r.issue(&[Command::CfgiSteRange { sid: 17, range: 3 }]);
    assert_eq!(r.phys.touched(), [0x110]);
    assert!(r.phys.ste_writes.is_empty());
    r.phys = RecPhys::default();
    r.issue(&[Command::CfgiSteRange { sid: 0, range: 2 }]);
    assert!(r.phys.touched().is_empty());
    r.issue(&[Command::CfgiAll]);
    assert_eq!(r.phys.touched(), [0x108, 0x110]);
    // A StreamID beyond LOG2SIZE (5 bits here): C_BAD_STREAMID for its transactions.
    let mut c = cfg();
    c.streams = vec![StreamMap { vsid: 40, psid: 40 }];
    let mut v = Vsmmu::new(c);
    let mut ram = FakeRam::new();
    let mut phys = RecPhys::default();
    v.write(regs::SMMU_STRTAB_BASE, 8, STRTAB, &mut ram, &mut phys);
    v.write(regs::SMMU_STRTAB_BASE_CFG, 4, 5, &mut ram, &mut phys);
    v.write(regs::SMMU_CR0, 4, 1, &mut ram, &mut phys);
    assert_eq!(phys.stes[&40], Ste::default());
    assert_eq!(v.streams[0].bad, Some(EventKind::CBadStreamid));
}

#[test]
fn two_level_table_walk() {
    let mut r = Rig::new();
    // L1 descriptor for StreamIDs 0-255: an L2 of 2^(Span-1) = 16 STEs at L2.
    r.ram.put(STRTAB, &(L2 | 5).to_le_bytes());
    r.ram.put(L2 + 8 * 64, &s1_ste(CD).to_bytes());
    r.enable(true);
    assert_eq!(r.phys.stes[&0x108], nested(CD));
    // StreamID 16 is beyond the L2's span: C_BAD_STREAMID.
    assert_eq!(r.phys.stes[&0x110], Ste::default());
    assert_eq!(r.v.streams[1].bad, Some(EventKind::CBadStreamid));
    // An invalid L1 descriptor (Span 0).
    r.ram.put(STRTAB, &L2.to_le_bytes());
    r.issue(&[Command::CfgiAll]);
    assert_eq!(r.v.streams[0].bad, Some(EventKind::CBadStreamid));
    // An L2 outside guest RAM: F_STE_FETCH.
    r.ram.put(STRTAB, &(0x1000_0000u64 | 9).to_le_bytes());
    r.issue(&[Command::CfgiAll]);
    assert_eq!(r.v.streams[0].bad, Some(EventKind::FSteFetch));
    assert_eq!(r.phys.stes[&0x108], Ste::default());
    // A stream table base outside guest RAM.
    r.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::EVTQEN).bits());
    r.w64(regs::SMMU_STRTAB_BASE, 0x10_0000_0000);
    r.w32(
        regs::SMMU_CR0,
        (Cr0::CMDQEN | Cr0::EVTQEN | Cr0::SMMUEN).bits(),
    );
    assert_eq!(r.v.streams[0].bad, Some(EventKind::FSteFetch));
}

#[test]
fn invalidations_are_forwarded_with_the_vms_vmid_and_physical_streamids() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys = RecPhys::default();
    let va = TlbiAddr::single(0x1234_5000, true);
    r.issue(&[
        Command::TlbiNhAll { vmid: 0 },
        Command::TlbiNhAsid { vmid: 3, asid: 5 },
        Command::TlbiNhVa {
            vmid: 0,
            asid: 5,
            addr: va,
        },
        Command::TlbiNhVaa { vmid: 0, addr: va },
        Command::TlbiNsnhAll,
        Command::CfgiCd {
            sid: 8,
            ssid: 0,
            leaf: true,
        },
        Command::CfgiCdAll { sid: 16 },
        // Not the VM's: dropped.
        Command::CfgiCdAll { sid: 9 },
        Command::PrefetchConfig { sid: 8, ssid: None },
        Command::PrefetchAddr {
            sid: 8,
            ssid: None,
            addr: 0x1000,
            size: 0,
        },
        Command::Sync(Sync::none()),
    ]);
    assert_eq!(
        r.phys.cmds,
        [
            Command::TlbiNhAll { vmid: 7 },
            Command::TlbiNhAsid { vmid: 7, asid: 5 },
            Command::TlbiNhVa {
                vmid: 7,
                asid: 5,
                addr: va
            },
            Command::TlbiNhVaa { vmid: 7, addr: va },
            Command::TlbiNhAll { vmid: 7 },
            Command::CfgiCd {
                sid: 0x108,
                ssid: 0,
                leaf: true
            },
            Command::CfgiCdAll { sid: 0x110 },
        ]
    );
    // One physical submission, with one sync, for the whole batch.
    assert_eq!((r.phys.submits, r.phys.syncs), (1, 1));
    assert_eq!(r.cons(), r.prod);
    assert_eq!(r.v.stats().commands, 11);
}

#[test]
fn illegal_commands_stop_the_queue_with_cerror_ill() {
    let va = TlbiAddr::single(0x1000, true);
    let illegal = [
        Command::TlbiEl2All,
        Command::TlbiEl2Asid { asid: 1 },
        Command::TlbiEl2Va { asid: 1, addr: va },
        Command::TlbiEl2Vaa { addr: va },
        Command::TlbiEl3All,
        Command::TlbiEl3Va { addr: va },
        Command::TlbiS2Ipa { vmid: 1, addr: va },
        Command::TlbiS12Vmall { vmid: 2 },
        Command::AtcInv {
            sid: 8,
            ssid: None,
            global: false,
            addr: 0,
            size: 0,
        },
        Command::PriResp {
            sid: 8,
            ssid: None,
            prgi: 0,
            resp: 0,
        },
        Command::Resume {
            sid: 8,
            stag: 0,
            resp: 0,
        },
        Command::StallTerm { sid: 8 },
        Command::CfgiCd {
            sid: 8,
            ssid: 1,
            leaf: true,
        },
    ];
    for bad in illegal {
        let mut r = Rig::new();
        r.enable(false);
        r.phys = RecPhys::default();
        let irqs = r.issue(&[
            Command::TlbiNhAll { vmid: 0 },
            bad,
            Command::TlbiNhAsid { vmid: 0, asid: 1 },
        ]);
        assert_eq!(irqs, Irqs::GERROR, "{bad:?}");
        // CONS points at the bad command, ERR = CERROR_ILL; what came before was done.
        assert_eq!(r.cons(), 1 | 1 << 24, "{bad:?}");
        assert_eq!(r.gerror_active(), Gerror::CMDQ_ERR.bits());
        assert_eq!(r.phys.cmds, [Command::TlbiNhAll { vmid: 7 }], "{bad:?}");
        // Stopped: more PROD writes consume nothing.
        r.issue(&[Command::TlbiNhAll { vmid: 0 }]);
        assert_eq!(r.cons() & 0xfffff, 1);
        // Linux's recovery: replace the bad command by a CMD_SYNC, acknowledge GERROR.
        r.ram
            .put(CMDQ + 16, &Command::Sync(Sync::none()).to_bytes());
        let g = r.r32(regs::SMMU_GERROR);
        r.w32(regs::SMMU_GERRORN, g);
        assert_eq!(r.gerror_active(), 0);
        assert_eq!(r.cons(), r.prod, "{bad:?}: queue resumed from CONS");
        assert_eq!(
            r.phys.cmds[1..],
            [
                Command::TlbiNhAsid { vmid: 7, asid: 1 },
                Command::TlbiNhAll { vmid: 7 }
            ]
        );
    }
    // An undecodable opcode and a reserved CMD_SYNC CS value.
    for raw in [[0x7f, 0], [0x46 | 3 << 12, 0]] {
        let mut r = Rig::new();
        r.enable(false);
        r.issue_raw(raw);
        assert_eq!(Cerror::from_cons(r.cons()), Cerror::Illegal);
    }
    // A range TLBI when the physical SMMU has no RIL.
    let mut c = cfg();
    c.phys_ril = false;
    let mut r = Rig::new();
    r.v = Vsmmu::new(c);
    r.enable(false);
    let mut ranged = va;
    ranged.num = 3;
    ranged.scale = 1;
    r.issue(&[Command::TlbiNhVa {
        vmid: 0,
        asid: 1,
        addr: ranged,
    }]);
    assert_eq!(Cerror::from_cons(r.cons()), Cerror::Illegal);
}

#[test]
fn command_fetch_outside_guest_ram_is_cerror_abt() {
    let mut r = Rig::new();
    r.w64(
        regs::SMMU_CMDQ_BASE,
        regs::queue_base(0x10_0000_0000, 8, true),
    );
    r.w32(regs::SMMU_CR0, Cr0::CMDQEN.bits());
    let irqs = r.w32(regs::SMMU_CMDQ_PROD, 1);
    assert_eq!(Cerror::from_cons(r.cons()), Cerror::Abort);
    // GERROR_IRQEN is off: recorded, not signalled.
    assert_eq!(irqs, Irqs::empty());
    assert_eq!(r.gerror_active(), Gerror::CMDQ_ERR.bits());
}

#[test]
fn cmd_sync_completes_by_msi_into_guest_memory() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys = RecPhys::default();
    let traps = r.v.stats().traps();
    // Linux's unmap: TLBI_NH_VA, then a CMD_SYNC whose MSI targets its own slot with data 0.
    let sync_slot = CMDQ + u64::from(r.prod + 1) * 16;
    let sync = Command::Sync(Sync {
        cs: SyncCs::Irq,
        msh: 3,
        msiattr: 0xf,
        msidata: 0,
        msiaddr: sync_slot,
    });
    let va = TlbiAddr::single(0x8000, true);
    r.issue(&[
        Command::TlbiNhVa {
            vmid: 0,
            asid: 1,
            addr: va,
        },
        sync,
    ]);
    // The first word of the slot (the CMD_SYNC opcode) was overwritten with MSIData.
    assert_eq!(r.ram.u32_at(sync_slot), 0);
    assert_eq!(
        r.v.stats().traps() - traps,
        1,
        "one trap per map+unmap batch"
    );
    assert_eq!((r.phys.submits, r.phys.syncs), (1, 1));
    // A CMD_SYNC with nothing forwarded before it needs no physical sync.
    r.issue(&[Command::Sync(Sync {
        msidata: 0xabcd,
        msiaddr: RAM + 0x100,
        ..match sync {
            Command::Sync(s) => s,
            _ => unreachable!(),
        }
    })]);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0xabcd);
    assert_eq!(r.phys.syncs, 1);
    // An MSI address outside guest RAM: GERROR.MSI_CMDQ_ABT_ERR, signalled.
    let irqs = r.issue(&[Command::Sync(Sync {
        cs: SyncCs::Irq,
        msh: 0,
        msiattr: 0,
        msidata: 1,
        msiaddr: 0x10_0000_0000,
    })]);
    assert_eq!(irqs, Irqs::GERROR);
    assert_eq!(r.gerror_active(), Gerror::MSI_CMDQ_ABT_ERR.bits());
    assert_eq!(r.cons(), r.prod, "the queue itself goes on");
}

#[test]
fn queue_wraps_and_a_full_queue_is_consumed() {
    let mut r = Rig::new();
    r.cmdq_log2 = 3;
    r.enable(false);
    r.phys = RecPhys::default();
    let mut sent = 0;
    for round in 0..5 {
        // 8 entries: PROD ends with the wrap bit flipped relative to CONS (full).
        let cmds: Vec<Command> = (0..8)
            .map(|i| Command::TlbiNhAsid {
                vmid: 0,
                asid: round * 8 + i,
            })
            .collect();
        r.issue(&cmds);
        sent += 8;
        assert_eq!(r.cons(), r.prod, "round {round}");
    }
    assert_eq!(r.phys.cmds.len(), sent);
    assert_eq!(
        r.phys.cmds[sent - 1],
        Command::TlbiNhAsid { vmid: 7, asid: 39 }
    );
    // Guest queue larger than IDR1.CMDQS: treated as CMDQS.
    let mut r = Rig::new();
    r.cmdq_log2 = 12;
    r.enable(false);
    r.cmdq_log2 = CMDQS;
    r.issue(&[Command::TlbiNhAll { vmid: 0 }]);
    assert_eq!(r.cons(), 1);
}

#[test]
fn stage_1_events_are_forwarded_and_stage_2_faults_kept() {
    let mut r = Rig::new();
    r.put_ste(8, s1_ste(CD));
    r.enable(false);
    let mut e = Event::new(EventKind::FTranslation, 0x108);
    e.input_addr = 0x2_0000_0000;
    e.rnw = true;
    e.class = EventClass::In;
    let (f, irqs) = r.v.forward_event(&e, &mut r.ram);
    let mut want = e;
    want.stream_id = 8;
    assert_eq!(f, Forward::Guest(want));
    assert_eq!(irqs, Irqs::EVENTQ);
    assert_eq!(r.ram.event_at(EVTQ), want);
    assert_eq!(r.r32(regs::SMMU_EVENTQ_PROD), 1);
    // A stage-2 fault on the data address: the hypervisor's.
    let mut s2f = e;
    s2f.s2 = true;
    s2f.addr2 = 0x2_0000_0000;
    assert_eq!(
        r.v.forward_event(&s2f, &mut r.ram),
        (Forward::Hypervisor, Irqs::empty())
    );
    assert_eq!(r.v.stats().s2_faults, 1);
    // A stage-2 fault fetching the CD: the guest pointed its CD outside its RAM.
    let mut cdf = s2f;
    cdf.class = EventClass::Cd;
    cdf.addr2 = 0x9_0000_0000;
    let (f, _) = r.v.forward_event(&cdf, &mut r.ram);
    let Forward::Guest(g) = f else {
        panic!("{f:?}")
    };
    assert_eq!(
        (g.kind, g.stream_id, g.addr2),
        (EventKind::FCdFetch, 8, cdf.addr2)
    );
    // Another VM's (or the hypervisor's) stream.
    let other = Event::new(EventKind::FTranslation, 0x200);
    assert_eq!(r.v.forward_event(&other, &mut r.ram).0, Forward::Hypervisor);
    // C_BAD_STE on a stream whose guest STE is bad: the guest's own event.
    r.put_ste(16, guest_ste(6));
    r.issue(&[Command::CfgiSte {
        sid: 16,
        leaf: true,
    }]);
    let (f, _) =
        r.v.forward_event(&Event::new(EventKind::CBadSte, 0x110), &mut r.ram);
    assert_eq!(f, Forward::Guest(Event::new(EventKind::CBadSte, 16)));
    // C_BAD_STE where the guest's STE is fine: not the guest's doing.
    let (f, _) =
        r.v.forward_event(&Event::new(EventKind::CBadSte, 0x108), &mut r.ram);
    assert_eq!(f, Forward::Hypervisor);
}

#[test]
fn full_event_queue_sets_overflow_once_until_acknowledged() {
    let mut r = Rig::new();
    r.enable(false);
    let e = Event::new(EventKind::FPermission, 0x108);
    // 4 slots.
    for _ in 0..4 {
        assert!(matches!(
            r.v.forward_event(&e, &mut r.ram).0,
            Forward::Guest(_)
        ));
    }
    let prod = r.r32(regs::SMMU_EVENTQ_PROD);
    assert_eq!(prod, 4, "full: index 0, wrap 1, no overflow");
    assert!(matches!(
        r.v.forward_event(&e, &mut r.ram).0,
        Forward::Dropped(_)
    ));
    assert_eq!(r.r32(regs::SMMU_EVENTQ_PROD), 4 | 1 << 31);
    assert!(matches!(
        r.v.forward_event(&e, &mut r.ram).0,
        Forward::Dropped(_)
    ));
    assert_eq!(r.r32(regs::SMMU_EVENTQ_PROD), 4 | 1 << 31, "toggled once");
    // The guest consumes everything and acknowledges the overflow.
    r.w32(regs::SMMU_EVENTQ_CONS, 4 | 1 << 31);
    assert!(matches!(
        r.v.forward_event(&e, &mut r.ram).0,
        Forward::Guest(_)
    ));
    assert_eq!(r.r32(regs::SMMU_EVENTQ_PROD), 5 | 1 << 31);
    assert_eq!(r.v.stats().dropped_events, 2);
    // Event queue disabled: nothing recorded.
    r.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::SMMUEN).bits());
    assert!(matches!(
        r.v.forward_event(&e, &mut r.ram).0,
        Forward::Dropped(_)
    ));
    // Event queue outside guest RAM: GERROR.EVENTQ_ABT_ERR.
    r.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::SMMUEN).bits());
    r.w64(
        regs::SMMU_EVENTQ_BASE,
        regs::queue_base(0x10_0000_0000, 2, true),
    );
    r.w32(regs::SMMU_EVENTQ_PROD, 0);
    r.w32(regs::SMMU_EVENTQ_CONS, 0);
    r.w32(
        regs::SMMU_CR0,
        (Cr0::CMDQEN | Cr0::EVTQEN | Cr0::SMMUEN).bits(),
    );
    let (_, irqs) = r.v.forward_event(&e, &mut r.ram);
    assert_eq!(irqs, Irqs::GERROR);
    assert_eq!(r.gerror_active(), Gerror::EVENTQ_ABT_ERR.bits());
}

#[test]
fn msi_configured_interrupts_are_memory_writes() {
    let mut r = Rig::new();
    r.enable(false);
    r.w32(regs::SMMU_IRQ_CTRL, 0);
    r.w64(regs::SMMU_EVENTQ_IRQ_CFG0, RAM + 0x200);
    r.w32(regs::SMMU_EVENTQ_IRQ_CFG1, 0x55);
    r.w32(regs::SMMU_IRQ_CTRL, IrqCtrl::EVENTQ_IRQEN.bits());
    // Guarded while enabled.
    r.w64(regs::SMMU_EVENTQ_IRQ_CFG0, RAM + 0x300);
    assert_eq!(r.v.read(regs::SMMU_EVENTQ_IRQ_CFG0, 8), RAM + 0x200);
    let e = Event::new(EventKind::FPermission, 0x108);
    let (_, irqs) = r.v.forward_event(&e, &mut r.ram);
    assert_eq!(irqs, Irqs::empty());
    assert_eq!(r.ram.u32_at(RAM + 0x200), 0x55);
}

#[test]
fn stats_count_traps_per_register() {
    let mut r = Rig::new();
    r.enable(false);
    let before = *r.v.stats();
    r.issue(&[Command::TlbiNhAll { vmid: 0 }]);
    r.r32(regs::SMMU_CMDQ_CONS);
    let s = r.v.stats();
    assert_eq!(s.traps() - before.traps(), 2);
    let prod = reg_index(regs::SMMU_CMDQ_PROD);
    assert_eq!(s.writes[prod] - before.writes[prod], 1);
    assert_eq!(reg_name(prod), "CMDQ_PROD");
    assert_eq!(reg_name(reg_index(regs::SMMU_EVENTQ_CONS)), "EVENTQ_CONS");
    assert_eq!(
        reg_name(reg_index(regs::SMMU_STRTAB_BASE + 4)),
        "STRTAB_BASE"
    );
    assert_eq!(s.reads[reg_index(regs::SMMU_CMDQ_CONS)], 1);
    // Reset clears them.
    r.v.reset(&mut r.phys);
    assert_eq!(r.v.stats().traps(), 0);
}

#[test]
fn vsmmu_over_the_physical_driver_writes_only_its_vms_stes() {
    let fake = FakeSmmu::qemu();
    let mut phys = Smmu::probe(fake.clone(), fake.clone(), SmmuConfig::default()).unwrap();
    // Another VM's stream, set by the hypervisor.
    let other = Ste::stage2(S2Config { vmid: 9, ..s2() });
    phys.set_ste(0x120, other).unwrap();
    let mut v = Vsmmu::new(cfg());
    v.reset(&mut phys);
    assert_eq!(phys.ste(0x108).unwrap(), Ste::stage2(s2()));
    let mut ram = FakeRam::new();
    for sid in 0..32u32 {
        ram.put(STRTAB + u64::from(sid) * 64, &s1_ste(CD).to_bytes());
    }
    let w = |v: &mut Vsmmu, ram: &mut FakeRam, phys: &mut Smmu<FakeSmmu, FakeSmmu>, off, x| {
        v.write(off, 8, x, ram, phys)
    };
    w(&mut v, &mut ram, &mut phys, regs::SMMU_STRTAB_BASE, STRTAB);
    w(&mut v, &mut ram, &mut phys, regs::SMMU_STRTAB_BASE_CFG, 5);
    w(&mut v, &mut ram, &mut phys, regs::SMMU_CMDQ_BASE, CMDQ | 8);
    w(&mut v, &mut ram, &mut phys, regs::SMMU_CR0, 0b1001);
    assert_eq!(phys.ste(0x108).unwrap(), nested(CD));
    assert_eq!(phys.ste(0x110).unwrap(), nested(CD));
    assert_eq!(phys.ste(0x120).unwrap(), other);
    assert_eq!(phys.ste(8).unwrap(), Ste::abort());
    // A guest TLBI reaches the physical queue with the VM's VMID.
    fake.take_commands();
    ram.put(CMDQ, &Command::TlbiNhAsid { vmid: 0, asid: 4 }.to_bytes());
    ram.put(CMDQ + 16, &Command::Sync(Sync::none()).to_bytes());
    w(&mut v, &mut ram, &mut phys, regs::SMMU_CMDQ_PROD, 2);
    assert_eq!(
        fake.commands(),
        [
            Command::TlbiNhAsid { vmid: 7, asid: 4 },
            Command::Sync(Sync::none())
        ]
    );
}

#[test]
fn a_flood_of_invalidations_costs_one_ste_write_per_stream_and_sync() {
    let mut r = Rig::new();
    r.put_ste(8, s1_ste(CD));
    r.enable(false);
    r.phys = RecPhys::default();
    let mut cmds = vec![Command::CfgiSte { sid: 8, leaf: true }; 100];
    cmds.push(Command::CfgiAll);
    cmds.push(Command::Sync(Sync::none()));
    cmds.extend([Command::CfgiSte { sid: 8, leaf: true }; 50]);
    r.issue(&cmds);
    // The STEs did not change: one physical CFGI_STE per stream invalidated before the sync,
    // completed by one physical sync, and one for the stream invalidated after it; no rewrite.
    assert!(r.phys.ste_writes.is_empty());
    assert_eq!(
        r.phys.cmds,
        [
            Command::CfgiSte {
                sid: 0x108,
                leaf: true
            },
            Command::CfgiSte {
                sid: 0x110,
                leaf: true
            },
            Command::CfgiSte {
                sid: 0x108,
                leaf: true
            },
        ]
    );
    assert_eq!((r.phys.submits, r.phys.syncs), (2, 1));
    // A changed STE is rewritten (with its own sync).
    r.phys = RecPhys::default();
    r.put_ste(8, guest_ste(4));
    r.issue(&[
        Command::CfgiSte { sid: 8, leaf: true },
        Command::Sync(Sync::none()),
    ]);
    assert_eq!(r.phys.ste_writes, [0x108]);
    r.put_ste(8, s1_ste(CD));
    r.issue(&[
        Command::CfgiSte { sid: 8, leaf: true },
        Command::Sync(Sync::none()),
    ]);
    assert_eq!(r.phys.stes[&0x108], nested(CD));
    assert_eq!(r.cons(), r.prod);
    assert_eq!(r.v.stats().commands, 156);
}

#[test]
fn without_ril_the_tlbi_hints_are_dropped_not_forwarded() {
    let mut c = cfg();
    c.phys_ril = false;
    let mut r = Rig::new();
    r.v = Vsmmu::new(c);
    r.enable(false);
    r.phys = RecPhys::default();
    let mut hinted = TlbiAddr::single(0x7000, true);
    hinted.tg = 1;
    hinted.ttl = 3;
    r.issue(&[Command::TlbiNhVaa {
        vmid: 0,
        addr: hinted,
    }]);
    assert_eq!(
        r.phys.cmds,
        [Command::TlbiNhVaa {
            vmid: 7,
            addr: TlbiAddr::single(0x7000, true)
        }]
    );
}

#[test]
fn accesses_beyond_the_register_pages_are_raz_wi() {
    let mut r = Rig::new();
    assert_eq!(r.v.read(u64::MAX - 3, 8), 0);
    assert_eq!(r.w64(u64::MAX - 7, 1), Irqs::empty());
    assert_eq!(r.v.read(regs::MMIO_SIZE, 4), 0);
    assert!(r.phys.ste_writes.is_empty());
}

#[test]
fn an_event_that_cannot_be_written_is_dropped_and_raises_gerror() {
    let mut r = Rig::new();
    r.enable(false);
    r.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::SMMUEN).bits());
    r.w64(
        regs::SMMU_EVENTQ_BASE,
        regs::queue_base(0x10_0000_0000, 2, true),
    );
    r.w32(
        regs::SMMU_CR0,
        (Cr0::CMDQEN | Cr0::EVTQEN | Cr0::SMMUEN).bits(),
    );
    let e = Event::new(EventKind::FPermission, 0x108);
    let (f, irqs) = r.v.forward_event(&e, &mut r.ram);
    assert!(matches!(f, Forward::Dropped(_)), "{f:?}");
    assert_eq!(irqs, Irqs::GERROR);
    assert_eq!(r.v.stats().guest_events, 0);
}

/// A CMD_SYNC whose completion MSI writes `data` to `addr`.
fn msi_sync(addr: u64, data: u32) -> Command {
    Command::Sync(Sync {
        cs: SyncCs::Irq,
        msh: 3,
        msiattr: 0xf,
        msidata: data,
        msiaddr: addr,
    })
}

impl Rig {
    /// Writes commands into the guest's queue and starts the trap of their PROD write, as a
    /// vCPU does before it lets go of the model to wait.
    fn start(&mut self, cmds: &[Command]) -> Outstanding {
        let p = self.put_cmds(cmds);
        self.v.write_start(
            regs::SMMU_CMDQ_PROD,
            4,
            p.into(),
            &mut self.ram,
            &mut self.phys,
        )
    }

    fn finish(&mut self, o: Outstanding) -> Irqs {
        let waited = o.wait(&self.phys);
        self.v.complete(o, waited, &mut self.ram)
    }
}

#[test]
fn two_vcpus_traps_overlap_and_complete_in_queue_order() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys = RecPhys::default();
    let tlbi = |asid| Command::TlbiNhAsid { vmid: 0, asid };
    // vCPU a: an unmap. Its commands are queued physically, nothing is visible yet.
    let a = r.start(&[tlbi(1), msi_sync(RAM + 0x100, 0xa)]);
    assert!(a.pending());
    assert_eq!(r.cons(), 0);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0);
    // vCPU b traps while a waits: the model is free, b's commands queue behind a's.
    let b = r.start(&[tlbi(2), msi_sync(RAM + 0x200, 0xb)]);
    assert_eq!(
        r.phys.cmds,
        [
            Command::TlbiNhAsid { vmid: 7, asid: 1 },
            Command::TlbiNhAsid { vmid: 7, asid: 2 }
        ]
    );
    assert_eq!(r.phys.syncs, 2);
    assert_eq!(r.cons(), 0);
    // vCPU c: a CMD_SYNC with nothing new to forward still waits for b's physical sync.
    let c = r.start(&[msi_sync(RAM + 0x300, 0xc)]);
    assert_eq!(r.phys.syncs, 2, "no physical sync of its own");
    assert_eq!(c.ticket, b.ticket);
    // b completes first: the physical queue completes in order, so a's sync has too.
    assert_eq!(r.finish(b), Irqs::empty());
    assert_eq!(r.cons(), 4);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0xa);
    assert_eq!(r.ram.u32_at(RAM + 0x200), 0xb);
    assert_eq!(
        r.ram.u32_at(RAM + 0x300),
        0,
        "c's sync is later in the queue"
    );
    // a's completion finds nothing left: CONS never goes back.
    r.finish(a);
    assert_eq!(r.cons(), 4);
    r.finish(c);
    assert_eq!(r.cons(), 5);
    assert_eq!(r.ram.u32_at(RAM + 0x300), 0xc);
    assert_eq!(*r.phys.waits.borrow(), [2, 1, 2]);
    // Nothing outstanding any more: the next batch without forwarded commands completes at once.
    let d = r.start(&[msi_sync(RAM + 0x400, 0xd)]);
    assert!(!d.pending());
    assert_eq!((r.cons(), r.ram.u32_at(RAM + 0x400)), (6, 0xd));
}

#[test]
fn a_command_error_behind_an_outstanding_sync_shows_after_it() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys = RecPhys::default();
    let a = r.start(&[Command::TlbiNhAll { vmid: 0 }, msi_sync(RAM + 0x100, 0xa)]);
    // vCPU b's batch has an illegal command: consumption stops there, but the guest sees the
    // error only once a's sync, which comes before it, has completed.
    let b = r.start(&[Command::TlbiNhAll { vmid: 0 }, Command::TlbiEl2All]);
    assert_eq!(r.gerror_active(), 0);
    assert_eq!(r.cons(), 0);
    let later = r.start(&[Command::TlbiNhAll { vmid: 0 }]);
    assert_eq!(
        r.phys.cmds.len(),
        2,
        "stopped: nothing after the bad command"
    );
    assert_eq!(r.finish(b), Irqs::GERROR);
    assert_eq!(r.cons(), 3 | 1 << 24);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0xa);
    assert_eq!(r.gerror_active(), Gerror::CMDQ_ERR.bits());
    assert_eq!(r.finish(a), Irqs::empty());
    r.finish(later);
    assert_eq!(r.cons(), 3 | 1 << 24);
}

#[test]
fn disabling_the_queue_completes_what_is_outstanding() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys = RecPhys::default();
    let a = r.start(&[Command::TlbiNhAll { vmid: 0 }, msi_sync(RAM + 0x100, 0xa)]);
    // Another vCPU turns the queue off (a driver's remove) while a waits.
    r.w32(regs::SMMU_CR0, (Cr0::EVTQEN | Cr0::SMMUEN).bits());
    assert_eq!(r.cons(), 2);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0xa);
    assert_eq!(r.phys.waits.borrow().len(), 1);
    r.finish(a);
    assert_eq!(r.cons(), 2);
}

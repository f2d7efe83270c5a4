use super::*;
use crate::cmd::{Sync, SyncCs, TlbiAddr};
use crate::driver::fake::FakeSmmu;
use crate::driver::{SmmuConfig, SyncTicket};
use crate::event::{EventClass, EventKind};
use crate::queue::Queue;
use crate::regs::{self, Cerror, Cr0, Gbpa, Gerror, IrqCtrl};
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

/// What [`RecPhys`] was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// An STE written at once.
    Write(u32),
    /// An STE broken (word 0 aborts).
    Break(u32),
    /// The make of a break.
    Make(u32),
    /// Commands queued without a sync.
    Submit(Vec<Command>),
    /// Commands and a CMD_SYNC queued: the ticket's sequence number.
    Sync(u64, Vec<Command>),
    /// A ticket waited for.
    Wait(u64),
    /// A budget wait until this clock reading.
    Until(u64),
}

/// A physical SMMU that records what it is asked to do. Its stream table follows the
/// driver's update rules ([`Smmu::write_ste`]): a valid STE changing in more than one
/// doubleword, into anything but abort, is a break-before-make.
#[derive(Default)]
struct RecPhys {
    /// The STEs in its table (an aborting one between break and make).
    stes: BTreeMap<u32, Ste>,
    /// StreamIDs whose STE was written (or broken), in order.
    ste_writes: Vec<u32>,
    cmds: Vec<Command>,
    /// Submissions (with or without sync).
    submits: usize,
    syncs: usize,
    /// The last ticket's sequence number (never cleared).
    seq: u64,
    /// Publications asked for.
    publishes: core::cell::Cell<usize>,
    /// Tickets waited for, in order.
    waits: core::cell::RefCell<Vec<u64>>,
    /// Everything, in order.
    ops: core::cell::RefCell<Vec<Op>>,
    /// Waits fail while set.
    fail: core::cell::Cell<bool>,
    /// The clock, if it has one.
    now: core::cell::Cell<Option<u64>>,
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

    /// Forgets what was asked so far; keeps its stream table, clock and failure injection.
    fn clear(&mut self) {
        self.ste_writes.clear();
        self.cmds.clear();
        self.submits = 0;
        self.syncs = 0;
        self.publishes.set(0);
        self.waits.borrow_mut().clear();
        self.ops.borrow_mut().clear();
    }

    fn with_clock(t: u64) -> Self {
        let p = Self::default();
        p.now.set(Some(t));
        p
    }
}

impl PhysicalSmmu for RecPhys {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        let cur = self.stes.get(&sid).copied().unwrap_or(Ste::abort());
        if cur == ste {
            return Ok(SteWrite::Unchanged);
        }
        self.ste_writes.push(sid);
        let cfgi = Command::CfgiSte { sid, leaf: true };
        let differ = (0..8).filter(|&i| cur.0[i] != ste.0[i]).count();
        let live = cur.v() && cur.config().bits() != 0;
        let to_abort = ste.v() && ste.config().bits() == 0;
        if live && differ > 1 && !to_abort {
            self.stes.insert(sid, Ste::abort());
            self.ops.borrow_mut().push(Op::Break(sid));
            return Ok(SteWrite::Broken(crate::driver::SteBreak { sid, ste, cfgi }));
        }
        self.stes.insert(sid, ste);
        self.ops.borrow_mut().push(Op::Write(sid));
        Ok(SteWrite::Written(cfgi))
    }

    fn make_ste(&mut self, b: crate::driver::SteBreak) -> Result<Command, DriverError> {
        self.stes.insert(b.sid, b.ste);
        self.ops.borrow_mut().push(Op::Make(b.sid));
        Ok(b.cfgi)
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.cmds.extend_from_slice(cmds);
        self.submits += 1;
        self.ops.borrow_mut().push(Op::Submit(cmds.to_vec()));
        Ok(())
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.cmds.extend_from_slice(cmds);
        self.submits += 1;
        self.syncs += 1;
        self.seq += 1;
        self.ops
            .borrow_mut()
            .push(Op::Sync(self.seq, cmds.to_vec()));
        Ok(SyncTicket::at(self.seq))
    }

    fn publish(&self) {
        self.publishes.set(self.publishes.get() + 1);
    }

    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        self.waits.borrow_mut().push(ticket.seq());
        self.ops.borrow_mut().push(Op::Wait(ticket.seq()));
        if self.fail.get() {
            return Err(DriverError::Timeout("CMD_SYNC completion"));
        }
        Ok(())
    }

    fn now(&self) -> Option<u64> {
        self.now.get()
    }

    fn wait_until(&self, deadline: u64) {
        self.ops.borrow_mut().push(Op::Until(deadline));
        if let Some(t) = self.now.get() {
            self.now.set(Some(t.max(deadline)));
        }
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
        budget: Budget::default(),
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
        Self::build(cfg(), RecPhys::default())
    }

    /// A reset vSMMU of `c` over `phys`, its reset's physical work forgotten.
    fn build(c: VsmmuConfig, phys: RecPhys) -> Self {
        let mut r = Self {
            v: Vsmmu::new(c),
            ram: FakeRam::new(),
            phys,
            prod: 0,
            cmdq_log2: CMDQS,
        };
        r.v.reset(&mut r.phys);
        r.phys.clear();
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
    // The STE writes' CFGI_STEs and the VM's TLBI_NH_ALL, completed by one CMD_SYNC.
    let cfgi = |sid| Command::CfgiSte { sid, leaf: true };
    assert_eq!(
        phys.cmds,
        [cfgi(0x108), cfgi(0x110), Command::TlbiNhAll { vmid: 7 }]
    );
    assert_eq!(phys.syncs, 1);
    assert_eq!(v.read(regs::SMMU_GBPA, 4), 0x1000);
    // A reboot that finds the streams at stage 2 already: no STE work, only the TLBI.
    phys.clear();
    v.reset(&mut phys);
    assert!(phys.ste_writes.is_empty());
    assert_eq!(phys.cmds, [Command::TlbiNhAll { vmid: 7 }]);
    assert_eq!(v.stats().ste_skipped, 2);
}

#[test]
fn abort_streams_aborts_every_stream_until_the_next_reset() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys.clear();
    r.v.abort_streams(&mut r.phys);
    for sid in [0x108, 0x110] {
        assert_eq!(r.phys.stes[&sid], Ste::abort(), "StreamID {sid:#x}");
    }
    let cfgi = |sid| Command::CfgiSte { sid, leaf: true };
    assert_eq!(
        r.phys.cmds,
        [cfgi(0x108), cfgi(0x110), Command::TlbiNhAll { vmid: 7 }]
    );
    assert_eq!(r.phys.syncs, 1, "in force before it returns");
    assert!(r
        .v
        .physical_stes()
        .all(|(_, ste)| ste == Some(Ste::abort())));
    // The reset of the next boot puts them back on stage 2 only.
    r.phys.clear();
    r.v.reset(&mut r.phys);
    for sid in [0x108, 0x110] {
        assert_eq!(r.phys.stes[&sid], Ste::stage2(s2()));
    }
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
    r.phys.clear();
    r.put_ste(8, guest_ste(4));
    r.issue(&[
        Command::CfgiSte { sid: 8, leaf: true },
        Command::Sync(Sync::none()),
    ]);
    assert_eq!(r.phys.ste_writes, [0x108]);
    assert_eq!(r.phys.stes[&0x108], Ste::stage2(s2()));
    // StreamIDs the VM does not own: nothing physical, whatever the guest table says.
    r.phys.clear();
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
    r.phys.clear();
    r.issue(&[Command::CfgiSteRange { sid: 0, range: 2 }]);
    assert!(r.phys.touched().is_empty());
    // CFGI_ALL: a physical CFGI_STE for the nested stream only (StreamID 8 is stage 2 only
    // now: nothing of the guest's is cached through it).
    r.issue(&[Command::CfgiAll]);
    assert_eq!(r.phys.touched(), [0x110]);
    assert!(r.phys.ste_writes.is_empty());
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
    r.phys.clear();
    let va = TlbiAddr::single(0x1234_5000, true);
    r.issue(&[
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
    // TLBI_NSNH_ALL becomes the VM's TLBI_NH_ALL, which subsumes the TLBIs before it.
    assert_eq!(
        r.phys.cmds,
        [
            Command::TlbiNhAll { vmid: 7 },
            Command::CfgiCd {
                sid: 0x108,
                ssid: 0,
                leaf: true
            },
            Command::CfgiCdAll { sid: 0x110 },
        ]
    );
    assert_eq!(r.v.stats().tlbi_merged, 3);
    // One physical submission, with one sync, for the whole batch.
    assert_eq!((r.phys.submits, r.phys.syncs), (1, 1));
    assert_eq!(r.cons(), r.prod);
    assert_eq!(r.v.stats().commands, 10);
    // Without a TLBI_NH_ALL each is forwarded as it is, with the VM's VMID.
    r.phys.clear();
    r.issue(&[
        Command::TlbiNhAsid { vmid: 3, asid: 5 },
        Command::TlbiNhVa {
            vmid: 0,
            asid: 5,
            addr: va,
        },
        Command::TlbiNhVaa { vmid: 9, addr: va },
        Command::Sync(Sync::none()),
    ]);
    assert_eq!(
        r.phys.cmds,
        [
            Command::TlbiNhAsid { vmid: 7, asid: 5 },
            Command::TlbiNhVa {
                vmid: 7,
                asid: 5,
                addr: va
            },
            Command::TlbiNhVaa { vmid: 7, addr: va },
        ]
    );
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
        r.phys.clear();
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
        // The TLBI_NH_ALL after it subsumes the TLBI_NH_ASID of the same trap.
        assert_eq!(r.phys.cmds[1..], [Command::TlbiNhAll { vmid: 7 }]);
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
    r.phys.clear();
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
    r.phys.clear();
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
    let (f, irqs) = r.v.forward_event(&e, EventFate::Deliver, &mut r.ram);
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
        r.v.forward_event(&s2f, EventFate::Deliver, &mut r.ram),
        (Forward::Hypervisor, Irqs::empty())
    );
    assert_eq!(r.v.stats().s2_faults, 1);
    // A stage-2 fault fetching the CD: the guest pointed its CD outside its RAM.
    let mut cdf = s2f;
    cdf.class = EventClass::Cd;
    cdf.addr2 = 0x9_0000_0000;
    let (f, _) = r.v.forward_event(&cdf, EventFate::Deliver, &mut r.ram);
    let Forward::Guest(g) = f else {
        panic!("{f:?}")
    };
    assert_eq!(
        (g.kind, g.stream_id, g.addr2),
        (EventKind::FCdFetch, 8, cdf.addr2)
    );
    // Another VM's (or the hypervisor's) stream.
    let other = Event::new(EventKind::FTranslation, 0x200);
    assert_eq!(
        r.v.forward_event(&other, EventFate::Deliver, &mut r.ram).0,
        Forward::Hypervisor
    );
    // C_BAD_STE on a stream whose guest STE is bad: the guest's own event.
    r.put_ste(16, guest_ste(6));
    r.issue(&[Command::CfgiSte {
        sid: 16,
        leaf: true,
    }]);
    let (f, _) = r.v.forward_event(
        &Event::new(EventKind::CBadSte, 0x110),
        EventFate::Deliver,
        &mut r.ram,
    );
    assert_eq!(f, Forward::Guest(Event::new(EventKind::CBadSte, 16)));
    // C_BAD_STE where the guest's STE is fine: not the guest's doing.
    let (f, _) = r.v.forward_event(
        &Event::new(EventKind::CBadSte, 0x108),
        EventFate::Deliver,
        &mut r.ram,
    );
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
            r.v.forward_event(&e, EventFate::Deliver, &mut r.ram).0,
            Forward::Guest(_)
        ));
    }
    let prod = r.r32(regs::SMMU_EVENTQ_PROD);
    assert_eq!(prod, 4, "full: index 0, wrap 1, no overflow");
    assert!(matches!(
        r.v.forward_event(&e, EventFate::Deliver, &mut r.ram).0,
        Forward::Dropped(_)
    ));
    assert_eq!(r.r32(regs::SMMU_EVENTQ_PROD), 4 | 1 << 31);
    assert!(matches!(
        r.v.forward_event(&e, EventFate::Deliver, &mut r.ram).0,
        Forward::Dropped(_)
    ));
    assert_eq!(r.r32(regs::SMMU_EVENTQ_PROD), 4 | 1 << 31, "toggled once");
    // The guest consumes everything and acknowledges the overflow.
    r.w32(regs::SMMU_EVENTQ_CONS, 4 | 1 << 31);
    assert!(matches!(
        r.v.forward_event(&e, EventFate::Deliver, &mut r.ram).0,
        Forward::Guest(_)
    ));
    assert_eq!(r.r32(regs::SMMU_EVENTQ_PROD), 5 | 1 << 31);
    assert_eq!(r.v.stats().dropped_events, 2);
    // Event queue disabled: nothing recorded.
    r.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::SMMUEN).bits());
    assert!(matches!(
        r.v.forward_event(&e, EventFate::Deliver, &mut r.ram).0,
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
    let (_, irqs) = r.v.forward_event(&e, EventFate::Deliver, &mut r.ram);
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
    let (_, irqs) = r.v.forward_event(&e, EventFate::Deliver, &mut r.ram);
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
    r.phys.clear();
    let mut cmds = vec![Command::CfgiSte { sid: 8, leaf: true }; 100];
    cmds.push(Command::CfgiAll);
    cmds.push(Command::Sync(Sync::none()));
    cmds.extend([Command::CfgiSte { sid: 8, leaf: true }; 50]);
    r.issue(&cmds);
    // The STEs did not change: one physical CFGI_STE for the nested stream (its guest CD may
    // be cached with it), none for the other (invalid: nothing cached), no rewrite, and one
    // physical sync for the trap, the invalidations after the guest's CMD_SYNC included.
    assert!(r.phys.ste_writes.is_empty());
    assert_eq!(
        r.phys.cmds,
        [Command::CfgiSte {
            sid: 0x108,
            leaf: true
        }]
    );
    assert_eq!((r.phys.submits, r.phys.syncs), (1, 1));
    assert_eq!(r.v.stats().ste_skipped, 1);
    // A changed STE is rewritten (with its own sync).
    r.phys.clear();
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
    r.phys.clear();
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
    let (f, irqs) = r.v.forward_event(&e, EventFate::Deliver, &mut r.ram);
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

    /// Waits and completes `o` as a vCPU does, round after round; the interrupts of every
    /// round after the first.
    fn finish(&mut self, mut o: Outstanding) -> Irqs {
        let mut irqs = Irqs::empty();
        for _ in 0..MAX_ROUNDS {
            if !o.pending() {
                break;
            }
            let waited = o.wait(&self.phys);
            o = self.v.complete(o, waited, &mut self.ram, &mut self.phys);
            irqs |= o.irqs;
        }
        assert!(
            !o.pending(),
            "a write still pending after MAX_ROUNDS: {o:?}"
        );
        o.publish(&self.phys);
        irqs
    }
}

#[test]
fn two_vcpus_traps_overlap_and_complete_in_queue_order() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys.clear();
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
    // b completes first: the physical queue completes in order, so a's sync has too, and c's,
    // which waited for nothing more than b's physical sync.
    assert_eq!(r.finish(b), Irqs::empty());
    assert_eq!(r.cons(), 5);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0xa);
    assert_eq!(r.ram.u32_at(RAM + 0x200), 0xb);
    assert_eq!(r.ram.u32_at(RAM + 0x300), 0xc);
    assert_eq!(r.v.stats().syncs_merged, 1, "c's");
    // a's and c's completions find nothing left: CONS never goes back.
    r.finish(a);
    assert_eq!(r.cons(), 5);
    r.finish(c);
    assert_eq!(r.cons(), 5);
    let seq = |o: &Outstanding| o.ticket.map(|t| t.seq());
    assert_eq!(
        r.phys
            .waits
            .borrow()
            .iter()
            .map(|&w| Some(w))
            .collect::<Vec<_>>(),
        [seq(&b), seq(&a), seq(&c)]
    );
    assert_eq!(seq(&a).map(|s| s + 1), seq(&b));
    // Nothing outstanding any more: the next batch without forwarded commands completes at once.
    let d = r.start(&[msi_sync(RAM + 0x400, 0xd)]);
    assert!(!d.pending());
    assert_eq!((r.cons(), r.ram.u32_at(RAM + 0x400)), (6, 0xd));
}

#[test]
fn a_command_error_behind_an_outstanding_sync_shows_after_it() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys.clear();
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
    r.phys.clear();
    let a = r.start(&[Command::TlbiNhAll { vmid: 0 }, msi_sync(RAM + 0x100, 0xa)]);
    // Another vCPU turns the queue off (a driver's remove) while a waits.
    r.w32(regs::SMMU_CR0, (Cr0::EVTQEN | Cr0::SMMUEN).bits());
    assert_eq!(r.cons(), 2);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0xa);
    assert_eq!(r.phys.waits.borrow().len(), 1);
    r.finish(a);
    assert_eq!(r.cons(), 2);
}

// ---- What one VM may take of the shared physical SMMU (issue 12, part 2) ----

impl Rig {
    /// A rig whose physical SMMU has a clock and whose budget is `b`.
    fn with_budget(b: Budget) -> Self {
        let mut c = cfg();
        c.budget = b;
        Self::build(c, RecPhys::with_clock(1_000_000))
    }

    /// Starts the trap of a register write, as a vCPU does before it lets go of the model.
    fn start_write(&mut self, off: u64, v: u32) -> Outstanding {
        self.v
            .write_start(off, 4, v.into(), &mut self.ram, &mut self.phys)
    }

    fn clock(&self) -> u64 {
        self.phys.now.get().unwrap_or(0)
    }
}

/// Guest RAM in which another vCPU keeps flipping StreamID 8's STE between two values: every
/// read of it sees the other one.
struct FlipRam<'a> {
    ram: &'a mut FakeRam,
    stes: [Ste; 2],
    reads: core::cell::Cell<usize>,
}

impl GuestMemory for FlipRam<'_> {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        if ipa == STRTAB + 8 * 64 && buf.len() == 64 {
            let n = self.reads.get();
            self.reads.set(n + 1);
            buf.copy_from_slice(&self.stes[n % 2].to_bytes());
            return Ok(());
        }
        self.ram.read(ipa, buf)
    }

    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        self.ram.write(ipa, data)
    }
}

/// The brief's first measurement: 128 CFGI_STE + CMD_SYNC pairs in one CMDQ_PROD write while a
/// second vCPU flips the STE between them cost 128 physical STE rewrites and 255 waited
/// CMD_SYNCs under the global lock. Now the stream is reshadowed once, at the end of the trap:
/// one rewrite (a break-before-make: two physical CMD_SYNCs in all), and the 128 guest
/// CMD_SYNCs complete together.
#[test]
fn ste_flips_between_a_trap_s_syncs_cost_one_rewrite_per_stream() {
    let mut r = Rig::new();
    r.put_ste(8, s1_ste(CD));
    r.enable(false);
    r.phys.clear();
    let before = *r.v.stats();
    let mut cmds = Vec::new();
    for i in 0..128u32 {
        cmds.push(Command::CfgiSte { sid: 8, leaf: true });
        cmds.push(msi_sync(RAM + 0x1000 + u64::from(i) * 4, 1));
    }
    let p = r.put_cmds(&cmds);
    let mut mem = FlipRam {
        ram: &mut r.ram,
        stes: [guest_ste(4), s1_ste(CD)],
        reads: core::cell::Cell::new(0),
    };
    let mut o =
        r.v.write_start(regs::SMMU_CMDQ_PROD, 4, p.into(), &mut mem, &mut r.phys);
    for _ in 0..MAX_ROUNDS {
        if !o.pending() {
            break;
        }
        let w = o.wait(&r.phys);
        o = r.v.complete(o, w, &mut mem, &mut r.phys);
    }
    assert!(!o.pending());
    assert_eq!(mem.reads.get(), 1, "the STE read once");
    assert_eq!(r.phys.ste_writes, [0x108]);
    assert_eq!(r.phys.stes[&0x108], Ste::stage2(s2()));
    assert_eq!(r.phys.syncs, 2, "the break's and the trap's");
    assert_eq!(r.cons(), r.prod);
    for i in 0..128 {
        assert_eq!(r.ram.u32_at(RAM + 0x1000 + i * 4), 1, "MSI {i}");
    }
    let st = r.v.stats();
    assert_eq!(
        (
            st.ste_writes - before.ste_writes,
            st.ste_breaks - before.ste_breaks,
            st.syncs - before.syncs
        ),
        (1, 1, 128)
    );
    assert_eq!(st.syncs_merged - before.syncs_merged, 127);
}

/// A break-before-make: word 0 aborts, its CMD_CFGI_STE and a CMD_SYNC are waited for outside
/// the model (the trap returns with that ticket to wait for), then the make, whose CMD_CFGI_STE
/// goes with the guest's own CMD_SYNC: abort word 0, CFGI_STE, sync, words 1-7, word 0,
/// CFGI_STE, sync.
#[test]
fn a_break_before_make_waits_without_the_model_and_shares_the_guest_s_sync() {
    let mut r = Rig::new();
    r.put_ste(8, s1_ste(CD));
    r.enable(false);
    r.phys.clear();
    r.put_ste(8, guest_ste(4));
    let o = r.start(&[
        Command::CfgiSte { sid: 8, leaf: true },
        msi_sync(RAM + 0x100, 7),
    ]);
    assert!(o.pending());
    assert!(
        r.phys.waits.borrow().is_empty(),
        "nothing waited for in the model"
    );
    let cfgi = Command::CfgiSte {
        sid: 0x108,
        leaf: true,
    };
    let t1 = o.ticket.expect("waits for the break's CMD_SYNC").seq();
    assert_eq!(
        *r.phys.ops.borrow(),
        [
            Op::Break(0x108),
            Op::Submit(vec![cfgi]),
            Op::Sync(t1, vec![])
        ]
    );
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0);
    r.finish(o);
    assert_eq!(
        r.phys.ops.borrow()[3..],
        [
            Op::Wait(t1),
            Op::Make(0x108),
            Op::Sync(t1 + 1, vec![cfgi]),
            Op::Wait(t1 + 1)
        ]
    );
    assert_eq!(r.ram.u32_at(RAM + 0x100), 7);
    assert_eq!(r.phys.stes[&0x108], Ste::stage2(s2()));
    // Back to nested is a break again; to abort a single word-0 write with no break.
    r.phys.clear();
    r.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::EVTQEN).bits());
    r.w32(regs::SMMU_GBPA, (Gbpa::ABORT | Gbpa::UPDATE).bits());
    assert_eq!(r.phys.stes[&0x108], Ste::abort());
    assert!(!r
        .phys
        .ops
        .borrow()
        .iter()
        .any(|o| matches!(o, Op::Break(_))));
}

/// GBPA while disabled (IHI 0070 6.3.14): a write that changes no physical STE completes at
/// once and costs nothing; one that does is STE work within the VM's budget, so a guest
/// toggling ABORT waits in its own traps (UPDATE reads 1 to its other vCPUs meanwhile) and
/// gets at most the budget's rate of physical STE writes.
#[test]
fn gbpa_toggles_are_budgeted_and_unchanged_ones_cost_nothing() {
    let period = 10_000;
    let mut r = Rig::with_budget(Budget {
        ste_burst: 4,
        ste_period_ns: period,
        ..Budget::default()
    });
    // Other fields only: no physical effect, nothing physical.
    r.w32(regs::SMMU_GBPA, Gbpa::UPDATE.bits() | 0x2000);
    assert_eq!(r.r32(regs::SMMU_GBPA), 0x2000);
    assert!(r.phys.ops.borrow().is_empty());
    let t0 = r.clock();
    for i in 0..20 {
        let v = if i % 2 == 0 { Gbpa::ABORT.bits() } else { 0 };
        r.w32(regs::SMMU_GBPA, Gbpa::UPDATE.bits() | v);
        assert_eq!(r.r32(regs::SMMU_GBPA) & Gbpa::UPDATE.bits(), 0);
    }
    // Two streams, 20 toggles: 40 writes, of which the burst's 4 came at once, the other 36 at
    // the budget's rate.
    assert_eq!(r.phys.ste_writes.len(), 40);
    assert!(r.clock() - t0 >= 36 * period, "{} ns", r.clock() - t0);
    assert!(r.v.stats().budget_waits >= 18);
    // Out of budget: the update waits, and another vCPU sees UPDATE = 1 meanwhile.
    let o = r.start_write(regs::SMMU_GBPA, (Gbpa::ABORT | Gbpa::UPDATE).bits());
    assert!(o.pending() && o.until.is_some(), "{o:?}");
    assert_ne!(r.r32(regs::SMMU_GBPA) & Gbpa::UPDATE.bits(), 0);
    r.finish(o);
    assert_eq!(r.r32(regs::SMMU_GBPA), Gbpa::ABORT.bits());
    assert!(r.v.stats().gbpa_deferred > 0);
}

/// CR0.SMMUEN: CR0ACK follows once the physical STEs are in force; and toggling it when the
/// guest's STEs and GBPA give the same physical STEs costs no STE work.
#[test]
fn cr0ack_follows_once_the_stes_are_in_force_and_unchanged_ones_cost_nothing() {
    let mut r = Rig::new();
    r.put_ste(8, s1_ste(CD));
    r.enable(false);
    r.phys.clear();
    let on = (Cr0::CMDQEN | Cr0::EVTQEN | Cr0::SMMUEN).bits();
    let o = r.start_write(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::EVTQEN).bits());
    assert!(o.pending());
    assert_eq!(r.r32(regs::SMMU_CR0ACK), on, "not yet in force");
    r.finish(o);
    assert_eq!(r.r32(regs::SMMU_CR0ACK), (Cr0::CMDQEN | Cr0::EVTQEN).bits());
    // Guest STEs abort, GBPA aborts: SMMUEN on and off change nothing physical.
    r.put_ste(8, guest_ste(0));
    r.put_ste(16, guest_ste(0));
    r.w32(regs::SMMU_GBPA, (Gbpa::ABORT | Gbpa::UPDATE).bits());
    r.phys.clear();
    let skipped = r.v.stats().ste_skipped;
    for _ in 0..4 {
        r.w32(regs::SMMU_CR0, on);
        r.w32(regs::SMMU_CR0, (Cr0::CMDQEN | Cr0::EVTQEN).bits());
    }
    assert!(r.phys.ste_writes.is_empty());
    assert!(r.phys.cmds.is_empty());
    assert_eq!(r.v.stats().ste_skipped - skipped, 16);
}

/// Item 2: within one trap, duplicates are dropped, a TLBI_NH_ALL subsumes the other TLBIs,
/// past the per-trap cap distinct TLBIs collapse into one TLBI_NH_ALL, and one physical
/// CMD_SYNC completes all of the trap's CMD_SYNCs (a flood of 128 TLBI + CMD_SYNC pairs was
/// 128 + 128 physical entries).
#[test]
fn a_trap_s_invalidations_and_syncs_are_merged() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys.clear();
    let va = |i: u64| Command::TlbiNhVa {
        vmid: 0,
        asid: 1,
        addr: TlbiAddr::single(i << 12, true),
    };
    let pva = |i: u64| Command::TlbiNhVa {
        vmid: 7,
        asid: 1,
        addr: TlbiAddr::single(i << 12, true),
    };
    r.issue(&[va(1), va(1), va(2), va(1), Command::Sync(Sync::none())]);
    assert_eq!(r.phys.cmds, [pva(1), pva(2)]);
    assert_eq!(r.v.stats().tlbi_merged, 2);
    // 20 distinct TLBIs with a cap of 16: one TLBI_NH_ALL.
    r.phys.clear();
    let cmds: Vec<Command> = (0..20).map(va).collect();
    r.issue(&cmds);
    assert_eq!(r.phys.cmds, [Command::TlbiNhAll { vmid: 7 }]);
    // 128 unmaps in one trap.
    r.phys.clear();
    let merged = r.v.stats().syncs_merged;
    let mut cmds = Vec::new();
    for i in 0..128 {
        cmds.push(va(i));
        cmds.push(msi_sync(RAM + 0x2000 + i * 4, 3));
    }
    r.issue(&cmds);
    assert_eq!(r.phys.cmds, [Command::TlbiNhAll { vmid: 7 }]);
    assert_eq!(r.phys.syncs, 1);
    assert_eq!(r.v.stats().syncs_merged - merged, 127);
    assert_eq!(r.cons(), r.prod);
    assert!((0..128).all(|i| r.ram.u32_at(RAM + 0x2000 + i * 4) == 3));
}

/// The ordering rule: an invalidation the guest put after a CD or STE change, with a CMD_SYNC
/// between them, reaches the physical SMMU only once that change is known complete (the trap
/// waits for it, outside the model); one before it may share its CMD_SYNC.
#[test]
fn an_invalidation_after_a_config_change_and_a_sync_waits_for_it() {
    let mut r = Rig::new();
    r.put_ste(8, s1_ste(CD));
    r.enable(false);
    r.phys.clear();
    let cd = Command::CfgiCd {
        sid: 8,
        ssid: 0,
        leaf: true,
    };
    let pcd = Command::CfgiCd {
        sid: 0x108,
        ssid: 0,
        leaf: true,
    };
    let asid = Command::TlbiNhAsid { vmid: 0, asid: 3 };
    let pasid = Command::TlbiNhAsid { vmid: 7, asid: 3 };
    let o = r.start(&[
        cd,
        Command::Sync(Sync::none()),
        asid,
        Command::Sync(Sync::none()),
    ]);
    let t1 = o.ticket.expect("waits for the CD change").seq();
    assert_eq!(*r.phys.ops.borrow(), [Op::Sync(t1, vec![pcd])]);
    r.finish(o);
    assert_eq!(
        *r.phys.ops.borrow(),
        [
            Op::Sync(t1, vec![pcd]),
            Op::Wait(t1),
            Op::Sync(t1 + 1, vec![pasid]),
            Op::Wait(t1 + 1)
        ]
    );
    assert_eq!(r.v.stats().order_waits, 1);
    // The other way round, or with no CMD_SYNC between: one physical CMD_SYNC.
    r.phys.clear();
    r.issue(&[
        asid,
        Command::Sync(Sync::none()),
        cd,
        Command::Sync(Sync::none()),
    ]);
    assert_eq!(r.phys.syncs, 1);
    r.phys.clear();
    r.issue(&[cd, asid, Command::Sync(Sync::none())]);
    assert_eq!(r.phys.syncs, 1);
    // An STE change then a TLBI: the STE's CFGI_STE is complete before the TLBI is queued.
    r.phys.clear();
    r.put_ste(8, guest_ste(0));
    r.issue(&[
        Command::CfgiSte { sid: 8, leaf: true },
        Command::Sync(Sync::none()),
        asid,
        Command::Sync(Sync::none()),
    ]);
    let ops = r.phys.ops.borrow().clone();
    let tlbi_at = ops
        .iter()
        .position(|o| matches!(o, Op::Sync(_, c) if c.contains(&pasid)))
        .expect("the TLBI");
    assert!(
        ops[..tlbi_at].contains(&Op::Write(0x108))
            && ops[..tlbi_at].iter().any(|o| matches!(o, Op::Wait(_))),
        "{ops:?}"
    );
}

/// Item 3: a VM with more than its outstanding budget queued waits for its own oldest
/// physical CMD_SYNC before queueing more; its physical CMD_SYNCs have a budget by time.
#[test]
fn a_vm_over_its_outstanding_budget_waits_for_its_own_sync() {
    let mut r = Rig::with_budget(Budget {
        outstanding: 4,
        ..Budget::default()
    });
    r.enable(false);
    r.phys.clear();
    let unmap = |i: u64| {
        [
            Command::TlbiNhVa {
                vmid: 0,
                asid: 1,
                addr: TlbiAddr::single(i << 12, true),
            },
            Command::Sync(Sync::none()),
        ]
    };
    // Two vCPUs' unmaps in flight: four entries.
    let a = r.start(&unmap(1));
    let b = r.start(&unmap(2));
    assert_eq!(r.phys.syncs, 2);
    // A third would make six: it waits for a's CMD_SYNC, its TLBI not queued yet.
    let c = r.start(&unmap(3));
    assert_eq!(r.phys.cmds.len(), 2);
    assert_eq!(c.ticket, a.ticket);
    assert_eq!(r.v.stats().budget_waits, 1);
    r.finish(c);
    assert_eq!(r.phys.cmds.len(), 3);
    r.finish(a);
    r.finish(b);
    assert_eq!(r.cons(), r.prod);
}

#[test]
fn physical_syncs_have_a_budget_by_time() {
    let period = 50_000;
    let mut r = Rig::with_budget(Budget {
        sync_burst: 2,
        sync_period_ns: period,
        ..Budget::default()
    });
    r.enable(false);
    r.phys.clear();
    let t0 = r.clock();
    for i in 0..10 {
        r.issue(&[
            Command::TlbiNhVa {
                vmid: 0,
                asid: 1,
                addr: TlbiAddr::single(i << 12, true),
            },
            Command::Sync(Sync::none()),
        ]);
    }
    assert_eq!(r.phys.syncs, 10);
    assert!(r.clock() - t0 >= 8 * period);
    assert!(r.v.stats().budget_waits >= 8);
    let untils = r
        .phys
        .ops
        .borrow()
        .iter()
        .filter(|o| matches!(o, Op::Until(_)))
        .count();
    assert!(untils >= 8);
}

/// Item 4: a physical CMD_SYNC whose wait fails is CERROR_ABT at the guest's CMD_SYNC (CONS on
/// it, GERROR.CMDQ_ERR, no MSI), never a completed sync. Acknowledged, the queue retries it,
/// with a full invalidation of the VM before its physical CMD_SYNC (what failed is unknown).
#[test]
fn a_failed_physical_sync_is_cerror_abt_never_a_completed_sync() {
    let mut r = Rig::new();
    r.put_ste(8, s1_ste(CD));
    r.enable(false);
    r.phys.clear();
    r.phys.fail.set(true);
    let irqs = r.issue(&[
        Command::TlbiNhVa {
            vmid: 0,
            asid: 1,
            addr: TlbiAddr::single(0x5000, true),
        },
        msi_sync(RAM + 0x100, 9),
    ]);
    assert_eq!(irqs, Irqs::GERROR);
    assert_eq!(r.cons(), 1 | u32::from(Cerror::Abort.code()) << 24);
    assert_eq!(r.gerror_active(), Gerror::CMDQ_ERR.bits());
    assert_eq!(r.ram.u32_at(RAM + 0x100), 0, "no MSI");
    assert_eq!(r.v.stats().phys_sync_errors, 1);
    // More PROD writes consume nothing until the guest acknowledges.
    r.issue(&[msi_sync(RAM + 0x200, 1)]);
    assert_eq!(r.cons() & 0xfffff, 1);
    // Linux's recovery for CERROR_ABT: acknowledge; the SMMU fetches the command again.
    r.phys.fail.set(false);
    r.phys.clear();
    let g = r.r32(regs::SMMU_GERROR);
    r.w32(regs::SMMU_GERRORN, g);
    assert_eq!(r.gerror_active(), 0);
    assert_eq!(r.cons(), r.prod);
    assert_eq!(r.ram.u32_at(RAM + 0x100), 9);
    assert_eq!(r.ram.u32_at(RAM + 0x200), 1);
    assert!(r.phys.cmds.contains(&Command::TlbiNhAll { vmid: 7 }));
    assert!(r.phys.cmds.contains(&Command::CfgiSte {
        sid: 0x108,
        leaf: false
    }));
    assert_eq!(r.phys.syncs, 1);
}

/// Item 4 with two vCPUs: the failure of one vCPU's wait stops the queue at the earliest
/// guest CMD_SYNC not known complete; the other's later CMD_SYNC is not completed either.
#[test]
fn a_failed_sync_stops_the_queue_at_the_first_guest_sync_it_covers() {
    let mut r = Rig::new();
    r.enable(false);
    r.phys.clear();
    let a = r.start(&[Command::TlbiNhAll { vmid: 0 }, msi_sync(RAM + 0x100, 1)]);
    let b = r.start(&[Command::TlbiNhAll { vmid: 0 }, msi_sync(RAM + 0x200, 2)]);
    r.phys.fail.set(true);
    let irqs = r.finish(b);
    assert_eq!(irqs, Irqs::GERROR);
    assert_eq!(
        r.cons(),
        1 | 2 << 24,
        "a's CMD_SYNC, the first not known complete"
    );
    assert_eq!(
        (r.ram.u32_at(RAM + 0x100), r.ram.u32_at(RAM + 0x200)),
        (0, 0)
    );
    r.phys.fail.set(false);
    r.finish(a);
    assert_eq!(
        (r.ram.u32_at(RAM + 0x100), r.ram.u32_at(RAM + 0x200)),
        (0, 0)
    );
    let g = r.r32(regs::SMMU_GERROR);
    r.w32(regs::SMMU_GERRORN, g);
    assert_eq!(r.cons(), 4);
    assert_eq!(
        (r.ram.u32_at(RAM + 0x100), r.ram.u32_at(RAM + 0x200)),
        (1, 2)
    );
}

/// Items 5 and 6 at the vSMMU: what the event budget suppressed is counted, never forwarded;
/// the record that quarantined its stream is forwarded and counted; and a stalled record is
/// forwarded without its stall (the guest's SMMU has none; the driver terminated it).
#[test]
fn budgeted_and_stalled_events_reach_the_guest_as_its_smmu_would_record_them() {
    let mut r = Rig::new();
    r.enable(false);
    let mut e = Event::new(EventKind::FTranslation, 0x108);
    e.input_addr = 0x1000;
    e.stall = true;
    e.stag = 0x55;
    let (f, _) = r.v.forward_event(&e, EventFate::Suppressed, &mut r.ram);
    assert_eq!(f, Forward::Suppressed);
    assert_eq!(r.v.stats().guest_events, 0);
    let (f, _) = r.v.forward_event(&e, EventFate::Quarantined, &mut r.ram);
    let Forward::Guest(g) = f else {
        panic!("{f:?}");
    };
    assert_eq!(
        (g.stream_id, g.stall, g.stag, g.input_addr),
        (8, false, 0, 0x1000)
    );
    let st = r.v.stats();
    assert_eq!(
        (st.evt_suppressed, st.evt_quarantined, st.guest_events),
        (1, 1, 1)
    );
}

/// Over the real driver: a VM's STE updates through `write_ste` never wait inside the
/// driver (nothing is queued by it), and a break-before-make's waits go through its lock-free
/// queue.
#[test]
fn over_the_driver_an_ste_update_waits_only_through_the_queue() {
    let fake = FakeSmmu::qemu();
    let mut phys = Smmu::probe(fake.clone(), fake.clone(), SmmuConfig::default()).unwrap();
    let mut v = Vsmmu::new(cfg());
    v.reset(&mut phys);
    let mut ram = FakeRam::new();
    ram.put(STRTAB + 8 * 64, &s1_ste(CD).to_bytes());
    v.write(regs::SMMU_STRTAB_BASE, 8, STRTAB, &mut ram, &mut phys);
    v.write(regs::SMMU_STRTAB_BASE_CFG, 4, 5, &mut ram, &mut phys);
    v.write(regs::SMMU_CMDQ_BASE, 8, CMDQ | 8, &mut ram, &mut phys);
    fake.take_commands();
    // SMMUEN: StreamID 8 goes from stage 2 to nested, a break-before-make.
    let o = v.write_start(regs::SMMU_CR0, 4, 0b1001, &mut ram, &mut phys);
    assert!(o.pending());
    assert_eq!(
        phys.ste(0x108).unwrap().config(),
        StreamConfig::Abort,
        "broken"
    );
    let mut o = o;
    while o.pending() {
        let w = o.wait(&phys);
        o = v.complete(o, w, &mut ram, &mut phys);
    }
    o.publish(&phys);
    assert_eq!(phys.ste(0x108).unwrap(), nested(CD));
    let cfgi = Command::CfgiSte {
        sid: 0x108,
        leaf: true,
    };
    let cmds = fake.take_commands();
    assert_eq!(cmds[0], cfgi);
    assert!(cmds.contains(&Command::Sync(Sync::none())));
    assert_eq!(cmds.iter().filter(|&&c| c == cfgi).count(), 2);
}

//! Hostile-guest driver of a VM's virtio-iommu ([`VmViommu`], issue 16): the virtio-mmio
//! transport, its request and event queues in fake guest RAM, and the request model over a
//! recording physical SMMU (`smmu::vsmmu::harness::CheckingSmmu`, which adds its own checks:
//! commands only with the VM's VMID, break-before-make, bounded windows).
//!
//! [`run`] builds the device for a VM owning endpoints 1, 8 and 2 (physical StreamIDs 1, 8 and
//! 0x20) with a table pool of a few pages, and plays the input as register accesses at any
//! offset and width, feature negotiations and queue set-ups, batches of requests of every type
//! in descriptor chains (mostly well formed, some with arbitrary flags, next, addr and len),
//! event-queue buffers, forwarded physical events, device and VM resets and physical failures.
//! Invariants, each a panic naming it, checked after every device call:
//!
//! - **(a) tables**: every leaf of every domain's stage-1 tables lies in a mapping the model
//!   validated (inside the input range, output inside the IPA space, not over a reserved
//!   region), with its output address, permission and memory type, and the leaves cover the
//!   readable/writable mappings exactly; every CD slot written and every nested STE's
//!   S1ContextPtr is one of the pool's CD slots; a live translating domain's CD is valid with
//!   its ASID and root, every other slot zero; table pages never exceed the pool;
//! - **(b) streams**: physical STEs name only the VM's StreamIDs and are abort, stage 2 only or
//!   nested, always over the VM's stage 2 ("bypass means stage 2 only"), never bypass or
//!   stage 1 alone; the model's STEs are what the physical SMMU holds;
//! - **(c) UNMAP**: before an UNMAP that removed readable/writable mappings returns OK (so before
//!   its used-ring completion, which the device writes only after the model returns), the
//!   physical SMMU saw non-leaf TLBIs of the domain's ASID covering every page (or the whole
//!   ASID or VMID) and then a CMD_SYNC that was waited for; likewise a TLBI of the whole ASID
//!   and a waited CMD_SYNC before an ATTACH or DETACH that freed a domain returns S_OK;
//! - **(d) the used ring**: per call, used.idx moves forward by at most the chains the driver
//!   made available, is what the device published in RAM, and never falls behind the chains it
//!   took except with DEVICE_NEEDS_RESET set (one chain at most); a device with
//!   DEVICE_NEEDS_RESET already set takes and uses nothing;
//! - **(e) counters**: no `stats_line` counter decreases; completions never exceed the
//!   requests the model saw, fault records written never exceed those made;
//! - **(f) reset**: after a device reset (Status 0) or VM reset, no domain, no mapping, no table
//!   page, every CD slot zero and every STE unattached (stage 2 with `bypass` 1, else abort).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use aarch64_paging::descriptor::El1Attributes;
use aarch64_paging::idmap::IdTranslation;
use smmu::cmd::Command;
use smmu::driver::{DriverError, SteBreak, SteWrite, SyncTicket};
use smmu::event::{Event, EventKind};
use smmu::ste::{Ste, StreamConfig};
use smmu::vsmmu::harness::{self as sh, CheckingSmmu};
use smmu::vsmmu::{GuestMemError, GuestMemory, PhysicalSmmu};
use spin::Mutex;

use super::{Input, MAX_OPS};
use crate::devices::viommu::device::{ViommuModel, VmViommu, QUEUE_SIZE};
use crate::devices::viommu::{
    feature, req, status, Reply, TablePool, Viommu, ViommuConfig, ViommuStats, MAP_F_MMIO,
    MAP_F_READ, MAP_F_WRITE, RESV_MEM_T_MSI,
};
use crate::devices::virtio::mmio::regs;
use crate::devices::virtio::{SplitQueue, Status};
use crate::devices::IrqPort;
use crate::hw::IntId;
use crate::platform::MemRange;

/// Guest RAM: 64 KiB at 1 GiB.
pub const RAM: u64 = 0x4000_0000;
/// Its size.
pub const RAM_SIZE: usize = 0x1_0000;
/// The table pool's IPA window (its CD slots first).
pub const POOL_IPA: u64 = 0x7000_0000;
/// The device's interrupt.
pub const INTID: u32 = 48;
/// The MSI doorbell page every endpoint's PROBE reports (RESV_MEM MSI).
pub const MSI: (u64, u64) = (0x0809_0000, 0x0809_ffff);
const VMID: u16 = sh::VMID;
/// Endpoints the guest may name that are not the VM's: another VM's, and a psid that is not
/// an endpoint ID.
const FOREIGN: [u32; 2] = [7, 0x20];

/// Queue areas of queue `q` as the well-behaved driver lays them out: descriptors, then the
/// available ring at +0x400, the used ring at +0x600.
pub fn queue_base(q: u16) -> u64 {
    RAM + 0x1000 * u64::from(q)
}
/// The request buffers of batch slot `j`: readable at +0, writable at +0x100 (0x300 bytes).
pub fn slot_buf(j: usize) -> u64 {
    RAM + 0x4000 + 0x400 * j as u64
}
/// Event-queue buffers: 24 bytes each, 0x20 apart.
const EVENT_BUF: u64 = RAM + 0x8000;

/// Guest RAM, bounds-checked.
#[derive(Debug)]
pub struct Ram(pub Vec<u8>);

impl Ram {
    fn range(ipa: u64, len: usize) -> Result<core::ops::Range<usize>, GuestMemError> {
        let err = GuestMemError {
            ipa,
            len: len as u64,
        };
        let off = usize::try_from(ipa.checked_sub(RAM).ok_or(err)?).map_err(|_| err)?;
        let end = off.checked_add(len).ok_or(err)?;
        if end > RAM_SIZE {
            return Err(err);
        }
        Ok(off..end)
    }

    /// Writes `data` if it is all inside RAM (a guest store outside faults; dropped here).
    pub fn put(&mut self, ipa: u64, data: &[u8]) {
        let _ = self.write(ipa, data);
    }

    /// The little-endian u16 at `ipa` (0 outside RAM).
    pub fn u16_at(&self, ipa: u64) -> u16 {
        let mut b = [0; 2];
        let _ = self.read(ipa, &mut b);
        u16::from_le_bytes(b)
    }

    /// The little-endian u32 at `ipa` (0 outside RAM).
    pub fn u32_at(&self, ipa: u64) -> u32 {
        let mut b = [0; 4];
        let _ = self.read(ipa, &mut b);
        u32::from_le_bytes(b)
    }

    /// `len` bytes at `ipa` (zeros outside RAM).
    pub fn bytes(&self, ipa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        let _ = self.read(ipa, &mut b);
        b
    }
}

impl GuestMemory for Ram {
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

/// The interrupt: counts edges, and only ever the device's own SPI.
#[derive(Debug, Default)]
pub struct Irq(pub Cell<u64>);

impl IrqPort for Irq {
    fn raise(&self, intid: IntId) {
        assert_eq!(intid.0, INTID, "the device raised another SPI");
        self.0.set(self.0.get() + 1);
    }
}

/// What the physical SMMU saw, in order, for invariant (c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Cmd(Command),
    Sync(u64),
    Waited(u64),
}

/// State shared by the physical SMMU wrapper, the model wrapper and the harness.
#[derive(Debug, Default)]
struct Log {
    /// Physical operations since the current request began.
    events: Vec<Ev>,
    /// The model's physical STEs after its last call.
    stes: Vec<(u32, Ste)>,
    /// Its live domains (the driver aims most requests at them).
    domains: Vec<u32>,
    /// Requests answered S_OK, by type (index = request type, 0 for others).
    ok: [u64; 6],
    /// Self-tests' breakages: the SMMU wrapper forgets TLBIs; the model wrapper skips resets.
    hide_tlbis: bool,
    skip_reset: bool,
}

/// The VM's table pool: host-heap tables (a `Send` model needs them: aarch64-paging's
/// `TargetAllocator` is not), CD slots at [`POOL_IPA`], a fixed capacity of table pages.
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    free: usize,
    cds: Vec<[u64; 8]>,
}

impl TablePool for Pool {
    type Tr = IdTranslation<El1Attributes>;

    fn translation(&mut self) -> Self::Tr {
        IdTranslation::new()
    }

    fn free_pages(&self) -> usize {
        self.free
    }

    fn cd_ipa(&self, slot: usize) -> u64 {
        POOL_IPA + 64 * slot as u64
    }

    fn write_cd(&mut self, slot: usize, cd: [u64; 8]) {
        let n = self.cds.len();
        match self.cds.get_mut(slot) {
            Some(c) => *c = cd,
            None => panic!("(a) CD slot {slot} written: the pool has {n}"),
        }
    }
}

/// The model, checking (a), (c) and (f) around every call.
struct Checked {
    v: Viommu<Pool>,
    log: Arc<Mutex<Log>>,
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The MSI doorbell a translating domain passes 1:1: PROBE's first RESV_MEM_T_MSI region,
/// widened to the granule, if it lies in the input range.
fn msi_window(cfg: &ViommuConfig) -> Option<(u64, u64)> {
    let g = 1u64 << cfg.page_size_mask.trailing_zeros();
    cfg.resv
        .iter()
        .find(|r| r.2 == RESV_MEM_T_MSI)
        .map(|&(rs, re, _)| (rs - rs % g, re | (g - 1)))
        .filter(|&(_, re)| re >> cfg.input_bits == 0)
}

/// Invariant (a) for one domain with tables: its leaves against its validated mappings, and
/// the MSI doorbell ([`msi_window`]) mapped 1:1, writable Device memory, whole.
pub fn check_leaves(
    cfg: &ViommuConfig,
    domain: u32,
    mappings: &[(u64, u64, u64, u32)],
    leaves: &[(u64, u64, u64, El1Attributes)],
) {
    let in_ipa = |a: u64| cfg.ipa_bits >= 64 || a >> cfg.ipa_bits == 0;
    let msi = msi_window(cfg);
    let mut want = msi.map_or(0, |(ms, me)| me - ms + 1);
    for &(s, e, p, f) in mappings {
        assert!(
            s <= e && e >> cfg.input_bits == 0,
            "(a) domain {domain}: mapping {s:#x}-{e:#x} outside the input range"
        );
        assert!(
            p.checked_add(e - s).is_some_and(in_ipa),
            "(a) domain {domain}: mapping {s:#x}-{e:#x} -> {p:#x} outside the IPA space"
        );
        assert!(
            !cfg.resv.iter().any(|&(rs, re, _)| rs <= e && s <= re),
            "(a) domain {domain}: mapping {s:#x}-{e:#x} over a reserved region"
        );
        if f & (MAP_F_READ | MAP_F_WRITE) != 0 {
            want += e - s + 1;
        }
    }
    let mut got = 0u64;
    for &(va, len, oa, attrs) in leaves {
        if msi.is_some_and(|(ms, me)| ms <= va && va + (len - 1) <= me) {
            assert!(
                oa == va
                    && !attrs.contains(El1Attributes::READ_ONLY)
                    && attrs.contains(El1Attributes::ATTRIBUTE_INDEX_1),
                "(a) domain {domain}: the MSI doorbell's leaf {va:#x} -> {oa:#x} ({attrs:?}) \
                 is not 1:1 writable Device memory"
            );
            got += len;
            continue;
        }
        let m = mappings
            .iter()
            .find(|&&(s, e, _, f)| s <= va && va + (len - 1) <= e && f & 3 != 0);
        let Some(&(s, _, p, f)) = m else {
            panic!(
                "(a) domain {domain}: leaf {va:#x}+{len:#x} -> {oa:#x} in no readable/writable \
                 mapping the model validated"
            );
        };
        assert_eq!(
            oa,
            p + (va - s),
            "(a) domain {domain}: leaf {va:#x} outputs {oa:#x}, its mapping says {:#x}",
            p + (va - s)
        );
        assert!(
            in_ipa(oa + (len - 1)),
            "(a) domain {domain}: leaf {va:#x} outputs {oa:#x} beyond the IPA space"
        );
        assert_eq!(
            !attrs.contains(El1Attributes::READ_ONLY),
            f & MAP_F_WRITE != 0,
            "(a) domain {domain}: leaf {va:#x} write permission against flags {f:#x}"
        );
        assert_eq!(
            attrs.contains(El1Attributes::ATTRIBUTE_INDEX_1),
            f & MAP_F_MMIO != 0,
            "(a) domain {domain}: leaf {va:#x} memory type against flags {f:#x}"
        );
        got += len;
    }
    assert_eq!(
        got, want,
        "(a) domain {domain}: leaves cover {got:#x} bytes, the mappings {want:#x}"
    );
}

/// Whether `c` invalidates page `va` of domain ASID `asid`, walk caches included.
fn covers(c: &Command, asid: u16, va: u64) -> bool {
    match *c {
        Command::TlbiNhAll { vmid } => vmid == VMID,
        Command::TlbiNhAsid { vmid, asid: a } => vmid == VMID && a == asid,
        Command::TlbiNhVa {
            vmid,
            asid: a,
            addr,
        } => {
            vmid == VMID
                && a == asid
                && !addr.leaf
                && addr.num == 0
                && addr.scale == 0
                && addr.addr >> 12 == va >> 12
        }
        _ => false,
    }
}

fn whole(c: &Command, asid: u16) -> bool {
    matches!(*c, Command::TlbiNhAll { vmid } if vmid == VMID)
        || matches!(*c, Command::TlbiNhAsid { vmid, asid: a } if vmid == VMID && a == asid)
}

/// Invariant (c): the pages of `removed` (of domain `domain`) were invalidated by commands in
/// `events`, and a CMD_SYNC after them was waited for.
fn check_unmap(domain: u32, removed: &[(u64, u64)], events: &[Ev]) {
    let asid = (domain + 1) as u16;
    let cmds: Vec<(usize, &Command)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Ev::Cmd(c) => Some((i, c)),
            _ => None,
        })
        .collect();
    let mut need = None::<usize>;
    let mut note = |i: usize| need = Some(need.map_or(i, |n: usize| n.max(i)));
    if let Some(&(i, _)) = cmds.iter().find(|(_, c)| whole(c, asid)) {
        note(i);
    } else {
        let pages: u64 = removed.iter().map(|&(s, e)| (e - s) / 4096 + 1).sum();
        assert!(
            pages <= 4096,
            "(c) UNMAP of domain {domain}: {pages} pages removed without a TLBI of the ASID"
        );
        for &(s, e) in removed {
            for va in (s..=e).step_by(4096) {
                match cmds.iter().find(|(_, c)| covers(c, asid, va)) {
                    Some(&(i, _)) => note(i),
                    None => panic!(
                        "(c) UNMAP of domain {domain} completed without a TLBI covering {va:#x}"
                    ),
                }
            }
        }
    }
    let Some(need) = need else { return };
    let sync = events[need..].iter().find_map(|e| match e {
        Ev::Sync(s) => Some(*s),
        _ => None,
    });
    let waited = sync.is_some_and(|s| {
        events[need..]
            .iter()
            .any(|e| matches!(e, Ev::Waited(w) if *w >= s))
    });
    assert!(
        waited,
        "(c) UNMAP of domain {domain} completed before a CMD_SYNC after its TLBIs was waited for"
    );
}

/// Invariant (c) for a freed domain: a TLBI of its whole ASID (or VMID) and a waited CMD_SYNC
/// after it.
fn check_freed(domain: u32, events: &[Ev]) {
    let asid = (domain + 1) as u16;
    let at = events
        .iter()
        .position(|e| matches!(e, Ev::Cmd(c) if whole(c, asid)));
    let Some(at) = at else {
        panic!("(c) domain {domain} freed without a TLBI of its ASID");
    };
    let sync = events[at..].iter().find_map(|e| match e {
        Ev::Sync(s) => Some(*s),
        _ => None,
    });
    assert!(
        sync.is_some_and(|s| events[at..]
            .iter()
            .any(|e| matches!(e, Ev::Waited(w) if *w >= s))),
        "(c) domain {domain} freed before a CMD_SYNC after its TLBI was waited for"
    );
}

impl Checked {
    fn refresh(&mut self) {
        let used = self.v.table_pages();
        let pool = self.v.pool_mut();
        assert!(
            used <= pool.capacity,
            "(a) {used} table pages in use, the pool has {}",
            pool.capacity
        );
        pool.free = pool.capacity - used;
        let mut log = self.log.lock();
        log.stes = self.v.physical_stes().collect();
        log.domains = self.v.domain_ids().collect();
    }

    fn check_domain(&self, d: u32) {
        let mut leaves = Vec::new();
        self.v
            .domain_leaves(d, &mut |va, len, oa, a| leaves.push((va, len, oa, a)));
        // A bypass domain has no tables, so no doorbell either: its STE is stage 2 only.
        if self.v.domain_translation(d).is_some() {
            check_leaves(self.v.config(), d, &self.v.domain_mappings(d), &leaves);
        }
    }

    /// (a) and (b) on the CDs and the model's STEs.
    fn check_cds(&self) {
        let cfg = self.v.config();
        let stes: BTreeMap<u32, Ste> = self.v.physical_stes().collect();
        let mut live = vec![false; self.v.pool().cds.len()];
        for m in &cfg.endpoints {
            let Some(ste) = stes.get(&m.psid) else {
                continue;
            };
            let d = self.v.attached_domain(m.vsid);
            let root = d.and_then(|d| self.v.domain_root(d));
            match (d, root) {
                (Some(d), Some(root)) => {
                    assert_eq!(
                        ste.config(),
                        StreamConfig::Nested,
                        "(b) endpoint {} in translating domain {d} is not nested",
                        m.vsid
                    );
                    assert_eq!(
                        ste.s1_context_ptr(),
                        POOL_IPA + 64 * u64::from(d),
                        "(a) endpoint {}'s CD is not domain {d}'s slot",
                        m.vsid
                    );
                    let cd = self.v.pool().cds[d as usize];
                    assert!(
                        cd[0] >> 31 & 1 == 1 && cd[0] >> 48 == u64::from(d) + 1,
                        "(a) domain {d}'s CD invalid or with another ASID: {cd:#x?}"
                    );
                    assert_eq!(
                        cd[1] & 0x000f_ffff_ffff_fff0,
                        root,
                        "(a) domain {d}'s CD.TTB0 is not its root"
                    );
                    live[d as usize] = true;
                }
                (Some(d), None) => assert_eq!(
                    *ste,
                    Ste::stage2(cfg.s2),
                    "(b) endpoint {} in bypass domain {d}: not stage 2 only",
                    m.vsid
                ),
                (None, _) => assert_eq!(
                    *ste,
                    self.unattached(),
                    "(b) unattached endpoint {}'s STE",
                    m.vsid
                ),
            }
        }
        for id in self.v.domain_ids() {
            if self.v.domain_root(id).is_some() {
                live[id as usize] = true;
            }
        }
        for (slot, cd) in self.v.pool().cds.iter().enumerate() {
            if !live[slot] {
                assert_eq!(
                    *cd, [0; 8],
                    "(a) CD slot {slot} of no live domain is not zero"
                );
            }
        }
    }

    fn unattached(&self) -> Ste {
        if self.v.bypass() == 1 {
            Ste::stage2(self.v.config().s2)
        } else {
            Ste::abort()
        }
    }

    /// (f)
    fn check_reset(&self) {
        let s = self.v.stats();
        assert!(
            s.domains == 0 && s.mappings == 0 && s.table_pages == 0,
            "(f) after a reset: {} domains, {} mappings, {} table pages",
            s.domains,
            s.mappings,
            s.table_pages
        );
        for (slot, cd) in self.v.pool().cds.iter().enumerate() {
            assert_eq!(*cd, [0; 8], "(f) CD slot {slot} not cleared by the reset");
        }
        for (psid, ste) in self.v.physical_stes() {
            assert_eq!(ste, self.unattached(), "(f) psid {psid:#x} still attached");
        }
    }
}

impl ViommuModel for Checked {
    fn device_features(&self) -> u64 {
        self.v.device_features()
    }
    fn set_driver_features(&mut self, features: u64) {
        self.v.set_driver_features(features);
    }
    fn config_read(&self, off: u64, size: u8) -> u32 {
        self.v.config_read(off, size)
    }
    fn config_write(&mut self, off: u64, size: u8, value: u32, phys: &mut dyn PhysicalSmmu) {
        ViommuModel::config_write(&mut self.v, off, size, value, phys);
        self.refresh();
        self.check_cds();
    }
    fn request(&mut self, r: &[u8], w: usize, phys: &mut dyn PhysicalSmmu) -> Reply {
        self.log.lock().events.clear();
        let domain = (r.len() >= 8).then(|| le32(r, 4));
        let before = domain.map(|d| self.v.domain_mappings(d));
        let translating: Vec<u32> = self
            .v
            .domain_ids()
            .filter(|&d| self.v.domain_root(d).is_some())
            .collect();
        let rep = ViommuModel::request(&mut self.v, r, w, phys);
        if matches!(rep.status(), Some(status::OK)) {
            // A domain an ATTACH (a move) or DETACH freed: its tables go back to the pool, so
            // its ASID must have left the TLBs and walk caches first.
            let events = self.log.lock().events.clone();
            for d in translating {
                if self.v.domain_root(d).is_none() {
                    check_freed(d, &events);
                }
            }
        }
        if rep.status() == Some(status::OK) {
            self.log.lock().ok[usize::from(r[0]).min(5)] += 1;
        }
        self.refresh();
        if let (Some(d), Some(before)) = (domain, before) {
            if r[0] == req::UNMAP && rep.status() == Some(status::OK) {
                let after = self.v.domain_mappings(d);
                let removed: Vec<(u64, u64)> = before
                    .iter()
                    .filter(|m| m.3 & (MAP_F_READ | MAP_F_WRITE) != 0 && !after.contains(m))
                    .map(|m| (m.0, m.1))
                    .collect();
                let events = core::mem::take(&mut self.log.lock().events);
                check_unmap(d, &removed, &events);
            }
            self.check_domain(d);
        }
        self.check_cds();
        rep
    }
    fn reset(&mut self, phys: &mut dyn PhysicalSmmu) {
        if !self.log.lock().skip_reset {
            ViommuModel::reset(&mut self.v, phys);
        }
        self.refresh();
        self.check_reset();
    }
    fn vm_reset(&mut self, phys: &mut dyn PhysicalSmmu) {
        ViommuModel::vm_reset(&mut self.v, phys);
        self.refresh();
        assert_eq!(self.v.bypass(), 1, "(f) bypass is not 1 after a VM reset");
        self.check_reset();
    }
    fn abort_streams(&mut self, phys: &mut dyn PhysicalSmmu) {
        ViommuModel::abort_streams(&mut self.v, phys);
        self.refresh();
        self.check_reset();
    }
    fn fault_record(&mut self, psid: u32, e: &Event) -> Option<[u8; 24]> {
        self.v.fault_record(psid, e)
    }
    fn stats(&self) -> ViommuStats {
        self.v.stats()
    }
    fn needs_reset(&self) -> bool {
        self.v.needs_reset()
    }
}

/// The physical SMMU: checks (b) on every STE, logs commands and waits for (c), then hands
/// everything to the smmu crate's checking SMMU.
#[derive(Debug)]
pub struct Phys {
    /// The checking SMMU (its `fail` injects physical failures).
    pub inner: CheckingSmmu,
    log: Arc<Mutex<Log>>,
    psids: Vec<u32>,
    max_domains: usize,
}

impl Phys {
    /// Invariant (b) (and (a) for a nested STE's CD pointer).
    pub fn check_ste(&self, sid: u32, ste: &Ste) {
        assert!(
            self.psids.contains(&sid),
            "(b) STE written for StreamID {sid:#x}, not one of the VM's {:#x?}",
            self.psids
        );
        if !ste.v() {
            return;
        }
        match ste.config() {
            StreamConfig::Abort => {}
            StreamConfig::S2Translate | StreamConfig::Nested => {
                assert_eq!(
                    ste.s2_config(),
                    sh::s2_config(),
                    "(b) StreamID {sid:#x}: STE not over the VM's stage 2"
                );
                if ste.config() == StreamConfig::Nested {
                    let p = ste.s1_context_ptr();
                    let slot = p.wrapping_sub(POOL_IPA) / 64;
                    assert!(
                        p >= POOL_IPA && p.is_multiple_of(64) && (slot as usize) < self.max_domains,
                        "(a) StreamID {sid:#x}: CD at {p:#x}, not one of the pool's slots"
                    );
                }
            }
            c => panic!("(b) StreamID {sid:#x}: STE with Config {c:?} bypasses stage 2"),
        }
    }

    fn record(&self, cmds: &[Command]) {
        let mut log = self.log.lock();
        let hide = log.hide_tlbis;
        for c in cmds {
            let tlbi = matches!(
                c,
                Command::TlbiNhVa { .. } | Command::TlbiNhAsid { .. } | Command::TlbiNhAll { .. }
            );
            if !(hide && tlbi) {
                log.events.push(Ev::Cmd(*c));
            }
        }
    }
}

impl PhysicalSmmu for Phys {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        self.check_ste(sid, &ste);
        self.inner.write_ste(sid, ste)
    }
    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        self.check_ste(b.sid, &b.ste);
        self.inner.make_ste(b)
    }
    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.record(cmds);
        self.inner.submit(cmds)
    }
    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.record(cmds);
        let t = self.inner.submit_sync(cmds);
        if let Ok(t) = &t {
            self.log.lock().events.push(Ev::Sync(t.seq()));
        }
        t
    }
    fn publish(&self) {
        self.inner.publish()
    }
    fn wait(&self, t: SyncTicket) -> Result<(), DriverError> {
        let r = self.inner.wait(t);
        if r.is_ok() {
            self.log.lock().events.push(Ev::Waited(t.seq()));
        }
        r
    }
    fn now(&self) -> Option<u64> {
        self.inner.now()
    }
    fn wait_until(&self, deadline: u64) {
        self.inner.wait_until(deadline)
    }
}

/// What one input reached, for the fixed-seed test's depth check.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Requests completed (used entries on the request queue).
    pub completed: u64,
    /// Requests answered S_OK, by type (ATTACH, DETACH, MAP, UNMAP, PROBE).
    pub ok: [u64; 5],
    /// Physical TLBIs.
    pub tlbis: u64,
    /// Fault records written into the event queue.
    pub events: u64,
    /// Queue errors (DEVICE_NEEDS_RESET).
    pub queue_errors: u64,
    /// Device resets.
    pub resets: u64,
}

/// The driver's view of one queue.
#[derive(Debug, Clone, Copy, Default)]
struct DriverQueue {
    size: u16,
    avail: u16,
}

/// The device, its RAM, SMMU and interrupt, and a driver's state; [`Harness::write`] and
/// friends check every invariant after the call.
pub struct Harness {
    /// The device.
    pub dev: VmViommu,
    /// Guest RAM.
    pub ram: Ram,
    /// The physical SMMU.
    pub phys: Phys,
    /// The interrupt.
    pub irq: Irq,
    log: Arc<Mutex<Log>>,
    cfg: ViommuConfig,
    queues: [DriverQueue; 2],
    counters: BTreeMap<String, u64>,
    /// MAP ranges asked for: (domain, start, end), for UNMAPs that hit them.
    maps: Vec<(u32, u64, u64)>,
    /// ATTACHes asked for: (domain, endpoint), for the MAPs and DETACHes that follow.
    attached: Vec<(u32, u32)>,
    tally: Tally,
}

impl core::fmt::Debug for Harness {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Harness")
            .field("dev", &self.dev)
            .field("queues", &self.queues)
            .field("tally", &self.tally)
            .finish_non_exhaustive()
    }
}

/// The VM's virtio-iommu configuration: `sel` picks input bits, page sizes, PROBE, domains.
pub fn config(sel: u8) -> ViommuConfig {
    ViommuConfig {
        name: String::from("fuzz-vm"),
        endpoints: sh::STREAMS.to_vec(),
        s2: sh::s2_config(),
        input_bits: [39, 36, 32, 31][usize::from(sel & 3)],
        ipa_bits: 40,
        page_size_mask: if sel & 4 != 0 { 0x1000 } else { 0x4020_1000 },
        max_domains: if sel & 8 != 0 { 2 } else { 8 },
        max_mappings: 16,
        resv: vec![(MSI.0, MSI.1, RESV_MEM_T_MSI)],
        probe_size: if sel & 16 != 0 { 0 } else { 0x200 },
    }
}

impl Harness {
    /// A device of [`config`]`(0)` over 16 table pages, probed as Linux does: every feature
    /// accepted, both queues of [`QUEUE_SIZE`] (the tests' usual start).
    pub fn probed() -> Self {
        let mut h = Self::new(0, 16);
        let f = h.device_features();
        assert!(h.negotiate(f, QUEUE_SIZE));
        h
    }

    /// A device for [`config`]`(sel)` over a pool of `capacity` table pages.
    pub fn new(sel: u8, capacity: usize) -> Self {
        let cfg = config(sel);
        let log = Arc::new(Mutex::new(Log::default()));
        let mut vc = sh::config(0);
        vc.streams = cfg.endpoints.clone();
        vc.s2 = cfg.s2;
        let mut phys = Phys {
            inner: CheckingSmmu::new(&vc),
            log: log.clone(),
            psids: cfg.endpoints.iter().map(|m| m.psid).collect(),
            max_domains: cfg.max_domains,
        };
        let pool = Pool {
            capacity,
            free: capacity,
            cds: vec![[0; 8]; cfg.max_domains],
        };
        let model = Checked {
            v: Viommu::new(cfg.clone(), pool),
            log: log.clone(),
        };
        let dev = VmViommu::new(
            0,
            None,
            MemRange {
                base: 0x0900_0000,
                size: 0x200,
            },
            INTID,
            MemRange {
                base: POOL_IPA,
                size: 1 << 20,
            },
            alloc::boxed::Box::new(model),
        );
        dev.vm_reset(&mut phys);
        let mut h = Self {
            dev,
            ram: Ram(vec![0; RAM_SIZE]),
            phys,
            irq: Irq::default(),
            log,
            cfg,
            queues: [DriverQueue::default(); 2],
            counters: BTreeMap::new(),
            maps: Vec::new(),
            attached: Vec::new(),
            tally: Tally::default(),
        };
        h.check(&[None, None], false);
        h
    }

    /// The features the device offers.
    pub fn device_features(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::INPUT_RANGE
            | feature::DOMAIN_RANGE
            | feature::MAP_UNMAP
            | feature::BYPASS_CONFIG
            | feature::MMIO;
        if self.cfg.probe_size != 0 {
            f |= feature::PROBE;
        }
        f
    }

    /// A register read.
    pub fn read(&self, off: u64, size: u8) -> u64 {
        let v = self.dev.read(off, size);
        if size == 4 {
            let want = match off {
                regs::MAGIC_VALUE => Some(0x7472_6976),
                regs::VERSION => Some(2),
                regs::DEVICE_ID => Some(23),
                _ => None,
            };
            if let Some(w) = want {
                assert_eq!(v, w, "register {off:#x} changed");
            }
        }
        v
    }

    fn before(&self) -> [Option<(QueueView, u16)>; 2] {
        let broken = self.dev.status().contains(Status::DEVICE_NEEDS_RESET);
        [0, 1].map(|q| {
            self.dev.queue(q).map(|s| {
                let mut v = QueueView::of(&s);
                v.broken = broken;
                (v, self.ram.u16_at(s.avail_addr() + 2))
            })
        })
    }

    /// A register write, then every check.
    pub fn write(&mut self, off: u64, size: u8, value: u64) {
        let before = self.before();
        self.dev
            .write(off, size, value, &mut self.ram, &mut self.phys, &self.irq);
        let reset = off == regs::STATUS && size == 4 && value as u32 == 0;
        if reset {
            self.tally.resets += 1;
            self.attached.clear();
            self.maps.clear();
            assert!(
                self.dev.queue(0).is_none() && self.dev.queue(1).is_none(),
                "(f) a queue is still live after the reset"
            );
            assert_eq!(self.dev.status(), Status::empty(), "(f) status after reset");
        }
        self.check(&before, reset);
    }

    /// A physical event of `psid`, forwarded.
    pub fn forward(&mut self, psid: u32, e: &Event) -> bool {
        let before = self.before();
        let seen = self.dev.forward_event(psid, e, &mut self.ram, &self.irq);
        self.check(&before, false);
        seen
    }

    /// A VM reset.
    pub fn vm_reset(&mut self) {
        self.dev.vm_reset(&mut self.phys);
        self.tally.resets += 1;
        self.attached.clear();
        self.maps.clear();
        self.queues = [DriverQueue::default(); 2];
        self.check(&[None, None], true);
    }

    /// The counters of `stats_line`.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        parse_stats(&self.dev.stats_line("fuzz-vm"))
    }

    fn check(&mut self, before: &[Option<(QueueView, u16)>; 2], reset: bool) {
        let status = self.dev.status();
        for q in 0..2u16 {
            let Some(now) = self.dev.queue(q) else {
                continue;
            };
            let b = before[usize::from(q)];
            check_used(q, b, QueueView::of(&now), &self.ram, status);
        }
        if reset {
            let c = self.check_counters();
            for k in ["domains", "mappings", "table_pages"] {
                assert_eq!(c[k], 0, "(f) {k} = {} after a reset", c[k]);
            }
        }
        let stes = self.log.lock().stes.clone();
        for (psid, ste) in stes {
            assert_eq!(
                self.phys.inner.stes.get(&psid),
                Some(&ste),
                "(b) the model's STE of psid {psid:#x} is not the physical one"
            );
        }
    }

    /// (e), once a step (parsing the line is most of a step's cost otherwise).
    fn check_counters(&mut self) -> BTreeMap<String, u64> {
        let c = self.counters();
        check_counters(&self.counters, &c);
        self.tally.completed = c["requests"];
        self.tally.events = c["events"];
        self.tally.queue_errors = c["queue_errors"];
        self.counters.clone_from(&c);
        c
    }

    // --- A driver: well-formed steps a test composes, and the fuzzer's hostile ones. ---

    /// Status `s` (bits added one step at a time, spec 3.1.1).
    pub fn set_status(&mut self, s: u32) {
        self.write(regs::STATUS, 4, u64::from(s));
    }

    /// Features: writes both words of `f`.
    pub fn driver_features(&mut self, f: u64) {
        self.write(regs::DRIVER_FEATURES_SEL, 4, 0);
        self.write(regs::DRIVER_FEATURES, 4, f & 0xffff_ffff);
        self.write(regs::DRIVER_FEATURES_SEL, 4, 1);
        self.write(regs::DRIVER_FEATURES, 4, f >> 32);
    }

    /// Sets queue `q` up with `size` entries at [`queue_base`] (rings zeroed first).
    pub fn setup_queue(&mut self, q: u16, size: u16) {
        let base = queue_base(q);
        self.ram.put(base, &[0; 0x1000]);
        self.write(regs::QUEUE_SEL, 4, u64::from(q));
        let _ = self.read(regs::QUEUE_NUM_MAX, 4);
        self.write(regs::QUEUE_NUM, 4, u64::from(size));
        for (reg, addr) in [
            (regs::QUEUE_DESC_LOW, base),
            (regs::QUEUE_DRIVER_LOW, base + 0x400),
            (regs::QUEUE_DEVICE_LOW, base + 0x600),
        ] {
            self.write(reg, 4, addr & 0xffff_ffff);
            self.write(reg + 4, 4, addr >> 32);
        }
        self.write(regs::QUEUE_READY, 4, 1);
        self.queues[usize::from(q)] = DriverQueue { size, avail: 0 };
    }

    /// The whole initialisation (spec 3.1.1) with features `f`, both queues of `size`; whether
    /// the device is DRIVER_OK.
    pub fn negotiate(&mut self, f: u64, size: u16) -> bool {
        self.set_status(0);
        self.set_status(1);
        self.set_status(3);
        self.driver_features(f);
        self.set_status(11);
        if self.read(regs::STATUS, 4) & 8 == 0 {
            return false;
        }
        self.setup_queue(0, size);
        self.setup_queue(1, size);
        self.set_status(15);
        self.read(regs::STATUS, 4) & 4 != 0
    }

    /// Puts descriptor `i` of queue `q`.
    pub fn put_desc(&mut self, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.ram.put(queue_base(q) + 16 * u64::from(i), &d);
    }

    /// Makes chains `heads` available on queue `q` (one avail.idx update), without a notify.
    pub fn make_available(&mut self, q: u16, heads: &[u16]) {
        let dq = self.queues[usize::from(q)];
        let size = dq.size.max(1);
        let avail = queue_base(q) + 0x400;
        for (k, &h) in heads.iter().enumerate() {
            let slot = dq.avail.wrapping_add(k as u16) % size;
            self.ram
                .put(avail + 4 + 2 * u64::from(slot), &h.to_le_bytes());
        }
        let idx = dq.avail.wrapping_add(heads.len() as u16);
        self.ram.put(avail + 2, &idx.to_le_bytes());
        self.queues[usize::from(q)].avail = idx;
    }

    /// Queue `q`'s used.idx in RAM.
    pub fn used_idx(&self, q: u16) -> u16 {
        self.ram.u16_at(queue_base(q) + 0x600 + 2)
    }

    /// Used element `i` (mod size) of queue `q`: (head, len).
    pub fn used_elem(&self, q: u16, i: u16) -> (u32, u32) {
        let size = self.queues[usize::from(q)].size.max(1);
        let at = queue_base(q) + 0x600 + 4 + 8 * u64::from(i % size);
        (self.ram.u32_at(at), self.ram.u32_at(at + 4))
    }

    /// Well-formed requests in batch slots 0.., one notify: each `(readable, writable_len)`.
    /// Returns each completion's (used_len, writable bytes), `None` for requests not completed.
    pub fn requests(&mut self, reqs: &[(Vec<u8>, u32)]) -> Vec<Option<(u32, Vec<u8>)>> {
        let used0 = self.used_idx(0);
        let mut heads = Vec::new();
        for (j, (r, w)) in reqs.iter().enumerate() {
            let head = 2 * j as u16;
            let buf = slot_buf(j);
            self.ram.put(buf, &[0xee; 0x400]);
            self.ram.put(buf, r);
            self.put_desc(0, head, buf, r.len() as u32, 1, head + 1);
            self.put_desc(0, head + 1, buf + 0x100, *w, 2, 0);
            heads.push(head);
        }
        self.make_available(0, &heads);
        self.write(regs::QUEUE_NOTIFY, 4, 0);
        let done = self.used_idx(0).wrapping_sub(used0);
        (0..reqs.len())
            .map(|j| {
                if j as u16 >= done {
                    return None;
                }
                let (head, len) = self.used_elem(0, used0.wrapping_add(j as u16));
                assert_eq!(head, 2 * j as u32, "completions out of order");
                Some((len, self.ram.bytes(slot_buf(j) + 0x100, len as usize)))
            })
            .collect()
    }

    /// One well-formed request; its status (the last byte of its used length), `None` if it
    /// was not completed or has no room for one.
    pub fn status_of(&mut self, r: &[u8]) -> Option<u8> {
        let w = if r.first() == Some(&req::PROBE) {
            self.cfg.probe_size + 4
        } else {
            4
        };
        let (len, bytes) = self.requests(&[(r.to_vec(), w)]).pop()??;
        (len >= 4).then(|| bytes[len as usize - 4])
    }

    /// `n` event buffers of `len` bytes made available on the event queue, then a notify.
    pub fn event_buffers(&mut self, n: u16, len: u32) {
        self.event_buffers_at(n, len, EVENT_BUF, 2);
    }

    /// As [`Harness::event_buffers`], buffer `h` at `base + 0x20 * h` with descriptor `flags`.
    pub fn event_buffers_at(&mut self, n: u16, len: u32, base: u64, flags: u16) {
        let size = self.queues[1].size.max(1);
        let heads: Vec<u16> = (0..n)
            .map(|k| self.queues[1].avail.wrapping_add(k) % size)
            .collect();
        for &h in &heads {
            self.put_desc(1, h, base.wrapping_add(0x20 * u64::from(h)), len, flags, 0);
        }
        self.make_available(1, &heads);
        self.write(regs::QUEUE_NOTIFY, 4, 1);
    }

    // --- The fuzzer's steps. ---

    fn offset(input: &mut Input) -> u64 {
        const NAMED: [u64; 24] = [
            regs::MAGIC_VALUE,
            regs::DEVICE_ID,
            regs::DEVICE_FEATURES,
            regs::DEVICE_FEATURES_SEL,
            regs::DRIVER_FEATURES,
            regs::DRIVER_FEATURES_SEL,
            regs::QUEUE_SEL,
            regs::QUEUE_NUM_MAX,
            regs::QUEUE_NUM,
            regs::QUEUE_READY,
            regs::QUEUE_NOTIFY,
            regs::INTERRUPT_STATUS,
            regs::INTERRUPT_ACK,
            regs::STATUS,
            regs::QUEUE_DESC_LOW,
            regs::QUEUE_DESC_HIGH,
            regs::QUEUE_DRIVER_LOW,
            regs::QUEUE_DEVICE_LOW,
            regs::SHM_SEL,
            regs::QUEUE_RESET,
            regs::CONFIG_GENERATION,
            regs::CONFIG + 0x24,
            regs::CONFIG + 0x20,
            regs::CONFIG,
        ];
        match input.u8() & 7 {
            0 => u64::from(input.u16()),
            1 => u64::from(input.u16() & 0x1ff),
            2 => NAMED[input.below(NAMED.len())] + u64::from(input.u8() & 3),
            _ => NAMED[input.below(NAMED.len())],
        }
    }

    fn size(input: &mut Input) -> u8 {
        [4, 4, 4, 1, 2, 8, 3, 0][usize::from(input.u8() & 7)]
    }

    fn domain(&self, input: &mut Input) -> u32 {
        match input.u8() & 15 {
            0 => input.u32(),
            1 => self.cfg.max_domains as u32,
            // Live domains, and those ATTACHes earlier in this batch are creating.
            2..=10 => {
                let mut live = self.log.lock().domains.clone();
                live.extend(self.attached.iter().map(|a| a.0));
                match live.len() {
                    0 => u32::from(input.u8()) % self.cfg.max_domains as u32,
                    n => live[input.below(n)],
                }
            }
            n => u32::from(n) % self.cfg.max_domains as u32,
        }
    }

    fn endpoint(input: &mut Input) -> u32 {
        match input.u8() & 15 {
            0 => input.u32(),
            1 | 2 => FOREIGN[usize::from(input.u8() & 1)],
            n => sh::STREAMS[usize::from(n) % 3].vsid,
        }
    }

    /// An IOVA range: small aligned ones mostly, some blocks, some anything.
    fn range(input: &mut Input) -> (u64, u64) {
        let s = match input.u8() & 7 {
            0 => input.u64(),
            1 => u64::from(input.u8()) << 21,
            2 => MSI.0 - 0x1000,
            _ => u64::from(input.u16() & 0xff) << 12,
        };
        let len = match input.u8() & 7 {
            0 => input.u64(),
            1 => 2 << 20,
            2 => 1 << 30,
            3 => u64::from(input.u16()),
            _ => u64::from(1 + (input.u8() & 15)) << 12,
        };
        (s, s.wrapping_add(len).wrapping_sub(1))
    }

    /// An output IPA: mostly in RAM, some at the MSI doorbell or anywhere in (or past) the IPA
    /// space.
    fn phys_addr(input: &mut Input, s: u64) -> u64 {
        match input.u8() & 7 {
            0 => input.u64(),
            1 => 0x0809_0000,
            2 => s,
            3 => (u64::from(input.u32()) << 12) & ((1 << 40) - 1),
            _ => RAM + (u64::from(input.u8()) << 12),
        }
    }

    fn request(&mut self, input: &mut Input) -> (Vec<u8>, u32) {
        let ty = match input.u8() % 12 {
            0..=2 => req::ATTACH,
            3 => req::DETACH,
            4..=6 => req::MAP,
            7 | 8 => req::UNMAP,
            9 => req::PROBE,
            10 => input.u8(),
            _ => req::MAP,
        };
        // Mappings need a domain: with none, mostly make one first.
        let none = self.log.lock().domains.is_empty() && self.attached.is_empty();
        let ty = if none && matches!(ty, req::MAP | req::UNMAP) && input.u8() & 3 != 0 {
            req::ATTACH
        } else {
            ty
        };
        let d = self.domain(input);
        let mut r = vec![0u8; 72];
        r[0] = ty;
        r[4..8].copy_from_slice(&d.to_le_bytes());
        let len = match ty {
            req::ATTACH | req::DETACH => {
                let (d, ep) = match (ty, self.attached.len()) {
                    (req::DETACH, n) if n > 0 && input.u8() & 3 != 0 => {
                        self.attached[input.below(n)]
                    }
                    _ => (d, Self::endpoint(input)),
                };
                // An endpoint is in one domain at a time: an ATTACH moves it.
                self.attached.retain(|&(_, e)| e != ep);
                if ty == req::ATTACH {
                    self.attached.push((d, ep));
                }
                r[4..8].copy_from_slice(&d.to_le_bytes());
                r[8..12].copy_from_slice(&ep.to_le_bytes());
                let flags: u32 = match input.u8() & 7 {
                    0 => 1,
                    1 => input.u32(),
                    _ => 0,
                };
                r[12..16].copy_from_slice(&flags.to_le_bytes());
                20
            }
            req::MAP => {
                let (s, e) = Self::range(input);
                let p = Self::phys_addr(input, s);
                let flags: u32 = match input.u8() & 7 {
                    0 => input.u32(),
                    1 => MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO,
                    2 => MAP_F_READ,
                    3 => 0,
                    4 => MAP_F_WRITE,
                    _ => MAP_F_READ | MAP_F_WRITE,
                };
                r[8..16].copy_from_slice(&s.to_le_bytes());
                r[16..24].copy_from_slice(&e.to_le_bytes());
                r[24..32].copy_from_slice(&p.to_le_bytes());
                r[32..36].copy_from_slice(&flags.to_le_bytes());
                if self.maps.len() >= 32 {
                    self.maps.remove(0);
                }
                self.maps.push((d, s, e));
                36
            }
            req::UNMAP => {
                let (d, s, e) = match (input.u8() & 7, self.maps.len()) {
                    (0 | 1, _) | (_, 0) => {
                        let (s, e) = Self::range(input);
                        (d, s, e)
                    }
                    (2, _) => (d, 0, u64::MAX),
                    (3, n) => {
                        // Part of a mapping: RANGE.
                        let (d, s, e) = self.maps[input.below(n)];
                        (d, s.wrapping_add(0x1000), e)
                    }
                    (4, n) => {
                        let (d, s, e) = self.maps[input.below(n)];
                        (d, s.saturating_sub(0x20_0000), e.saturating_add(0x20_0000))
                    }
                    (_, n) => self.maps[input.below(n)],
                };
                r[4..8].copy_from_slice(&d.to_le_bytes());
                r[8..16].copy_from_slice(&s.to_le_bytes());
                r[16..24].copy_from_slice(&e.to_le_bytes());
                28
            }
            req::PROBE => {
                r[4..8].copy_from_slice(&Self::endpoint(input).to_le_bytes());
                72
            }
            _ => 4 + input.below(60),
        };
        // Reserved bytes, a short or a long request now and then.
        let len = match input.u8() & 15 {
            0 => {
                let at = input.below(len);
                r[at] = input.u8();
                len
            }
            1 => input.below(len + 1),
            2 => (len + 1 + input.below(8)).min(72),
            _ => len,
        };
        r.truncate(len);
        let want = if ty == req::PROBE {
            self.cfg.probe_size + 4
        } else {
            4
        };
        let w = match input.u8() & 15 {
            0 => u32::from(input.u8() & 7),
            1 => want.saturating_sub(1 + u32::from(input.u8() & 15)),
            2 => want + u32::from(input.u8()),
            _ => want,
        };
        (r, w.min(0x300))
    }

    /// A batch of requests in slots 0.., some descriptors spoiled, then a notify.
    fn batch(&mut self, input: &mut Input) {
        // A driver that finds the device broken (or never set up) mostly starts over, so that
        // one bad descriptor does not waste the rest of the input.
        let s = self.dev.status();
        let broken = s.contains(Status::DEVICE_NEEDS_RESET) || !s.contains(Status::DRIVER_OK);
        if broken && input.u8() & 3 != 0 {
            let f = self.device_features();
            self.negotiate(f, QUEUE_SIZE);
        }
        let size = self.queues[0].size;
        let n = 1 + input.below(usize::from((size / 2).clamp(1, 8)));
        let mut heads = Vec::new();
        for j in 0..n {
            let (r, w) = self.request(input);
            let head = (2 * j) as u16;
            let buf = slot_buf(j);
            self.ram.put(buf, &r);
            let split = input.u8() & 7 == 0 && r.len() > 1;
            if split {
                // The readable part over two descriptors (head, then 16 + j).
                let k = r.len() / 2;
                let mid = 16 + j as u16;
                self.put_desc(0, head, buf, k as u32, 1, mid);
                self.put_desc(0, mid, buf + k as u64, (r.len() - k) as u32, 1, head + 1);
            } else {
                self.put_desc(0, head, buf, r.len() as u32, 1, head + 1);
            }
            self.put_desc(0, head + 1, buf + 0x100, w, 2, 0);
            if input.u8() & 31 == 0 {
                self.spoil(input, head);
            }
            heads.push(head);
        }
        let extra = input.u8() & 63 == 0;
        self.make_available(0, &heads);
        if extra {
            // avail.idx past what was written: stale ring slots, or an overrun.
            let idx = self.queues[0].avail.wrapping_add(u16::from(input.u8()));
            self.ram.put(queue_base(0) + 0x402, &idx.to_le_bytes());
            self.queues[0].avail = idx;
        }
        self.write(regs::QUEUE_NOTIFY, 4, 0);
        self.sync_driver(0);
    }

    /// Descriptor `head` or its successor gets a hostile field.
    fn spoil(&mut self, input: &mut Input, head: u16) {
        let i = head + u16::from(input.bool());
        let at = queue_base(0) + 16 * u64::from(i);
        match input.u8() & 7 {
            0 => self.ram.put(at, &input.u64().to_le_bytes()),
            1 => self.ram.put(at, &(RAM + RAM_SIZE as u64 - 2).to_le_bytes()),
            2 => self.ram.put(at + 8, &input.u32().to_le_bytes()),
            3 => self.ram.put(at + 8, &0u32.to_le_bytes()),
            4 => self.ram.put(at + 12, &input.u16().to_le_bytes()),
            5 => {
                // A loop: NEXT back to the head.
                self.ram.put(at + 12, &1u16.to_le_bytes());
                self.ram.put(at + 14, &head.to_le_bytes());
            }
            6 => self.ram.put(at + 14, &input.u16().to_le_bytes()),
            _ => {
                let slot = queue_base(0) + 0x404 + 2 * u64::from(self.queues[0].avail);
                self.ram.put(slot, &input.u16().to_le_bytes());
            }
        }
    }

    /// The driver takes the device's indices as its own after a hostile step (as Linux would
    /// after a reset, it starts over from what the rings say).
    fn sync_driver(&mut self, q: u16) {
        if let Some(s) = self.dev.queue(q) {
            self.queues[usize::from(q)] = DriverQueue {
                size: s.size(),
                avail: s.last_avail(),
            };
            let avail = s.avail_addr() + 2;
            self.ram.put(avail, &s.last_avail().to_le_bytes());
        }
    }

    fn event(input: &mut Input) -> (u32, Event) {
        const KINDS: [EventKind; 8] = [
            EventKind::FTranslation,
            EventKind::FPermission,
            EventKind::FAccess,
            EventKind::FAddrSize,
            EventKind::CBadCd,
            EventKind::FStreamDisabled,
            EventKind::FWalkEabt,
            EventKind::FCfgConflict,
        ];
        let psid = match input.u8() & 7 {
            0 => input.u32(),
            n => sh::STREAMS[usize::from(n) % 3].psid,
        };
        let kind = match input.u8() & 15 {
            0 => EventKind::from_id(input.u8()),
            n => KINDS[usize::from(n) % KINDS.len()],
        };
        let mut e = Event::new(kind, psid);
        let b = input.u8();
        e.s2 = b & 7 == 0;
        e.rnw = b & 8 != 0;
        e.ind = b & 16 != 0;
        e.input_addr = input.u64();
        (psid, e)
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % 16 {
            0 | 1 => {
                let off = Self::offset(input);
                let size = Self::size(input);
                let _ = self.read(off, size);
            }
            2 | 3 => {
                let off = Self::offset(input);
                let size = Self::size(input);
                let v = input.u64();
                self.write(off, size, v);
                for q in 0..2 {
                    self.sync_driver(q);
                }
            }
            4 => {
                let mut f = self.device_features();
                match input.u8() & 7 {
                    0 => f = input.u64(),
                    1 => f &= input.u64() | feature::VERSION_1,
                    2 => f &= !feature::BYPASS_CONFIG,
                    _ => {}
                }
                let size = [64, 64, 64, 8, 2, 128, 0, 1][usize::from(input.u8() & 7)];
                self.negotiate(f, size);
            }
            5..=9 => self.batch(input),
            10 => {
                let n = 1 + input.below(8) as u16;
                let len = match input.u8() & 7 {
                    0 => u32::from(input.u8()),
                    _ => 24,
                };
                // Mostly good buffers; some outside RAM, at its edge, or device-readable.
                let (base, flags) = match input.u8() & 7 {
                    0 => (input.u64(), 2),
                    1 => (RAM + RAM_SIZE as u64 - 0x20 * u64::from(input.u8() & 3), 2),
                    2 => (EVENT_BUF, u16::from(input.u8() & 7)),
                    _ => (EVENT_BUF, 2),
                };
                self.event_buffers_at(n, len, base, flags);
                self.sync_driver(1);
            }
            11 | 12 => {
                let (psid, e) = Self::event(input);
                self.forward(psid, &e);
            }
            13 => match input.u8() & 7 {
                0 => self.phys.inner.fail = !self.phys.inner.fail,
                1 | 2 => self.phys.inner.fail = false,
                3 => self.vm_reset(),
                _ => {
                    self.set_status(0);
                    self.queues = [DriverQueue::default(); 2];
                }
            },
            14 => {
                // The bypass byte.
                let v = u64::from(input.u8() & 1);
                self.write(regs::CONFIG + 0x24, 1, v);
            }
            _ => {
                // Raw bytes over the rings, then a notify of either queue.
                let q = u16::from(input.bool());
                let at = queue_base(q) + u64::from(input.u16() & 0x7ff);
                let n = 1 + input.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                self.ram.put(at, &bytes);
                self.write(regs::QUEUE_NOTIFY, 4, u64::from(q));
                self.sync_driver(q);
            }
        }
    }
}

/// The `key=value` counters of a `stats_line`.
pub fn parse_stats(line: &str) -> BTreeMap<String, u64> {
    line.split_once("stats: ")
        .map_or("", |(_, r)| r)
        .split(' ')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((String::from(k), v.parse().ok()?))
        })
        .collect()
}

/// (e)
pub fn check_counters(before: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) {
    const GAUGES: [&str; 4] = ["domains", "mappings", "table_pages", "status"];
    for (k, &v) in now {
        if GAUGES.contains(&k.as_str()) {
            continue;
        }
        if let Some(&b) = before.get(k) {
            assert!(v >= b, "(e) counter {k} went from {b} to {v}");
        }
    }
    let g = |k: &str| now.get(k).copied().unwrap_or(0);
    let seen: u64 = ["attach", "detach", "map", "unmap", "probe", "unknown"]
        .iter()
        .map(|k| g(k))
        .sum();
    assert!(
        g("requests") <= seen && seen <= g("requests") + g("queue_errors"),
        "(e) {} completions of {seen} requests with {} queue errors",
        g("requests"),
        g("queue_errors")
    );
    assert!(
        g("events") <= g("faults"),
        "(e) {} fault records written of {} made",
        g("events"),
        g("faults")
    );
}

/// A queue's device-side state for (d): next available index to take, next used index,
/// size, used ring address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueView {
    last_avail: u16,
    used_idx: u16,
    size: u16,
    used: u64,
    avail: u64,
    /// DEVICE_NEEDS_RESET was set (as of the view).
    broken: bool,
}

impl QueueView {
    fn of(q: &SplitQueue) -> Self {
        Self {
            last_avail: q.last_avail(),
            used_idx: q.used_idx(),
            size: q.size(),
            used: q.used_addr(),
            avail: q.avail_addr(),
            broken: false,
        }
    }
}

/// (d) for queue `q` over one call: `before` is the queue and its avail.idx in RAM before.
fn check_used(q: u16, before: Option<(QueueView, u16)>, now: QueueView, ram: &Ram, status: Status) {
    let broken = status.contains(Status::DEVICE_NEEDS_RESET);
    let behind = now.last_avail.wrapping_sub(now.used_idx);
    assert!(
        behind == 0 || (behind == 1 && broken),
        "(d) queue {q}: {behind} chains taken and not used, status {status:?}"
    );
    let Some((b, avail)) = before else {
        assert_eq!(now.used_idx, 0, "(d) queue {q}: a new queue's used.idx");
        return;
    };
    // A device that declared itself broken leaves the rings alone until the reset (virtio 1.2
    // 2.1.2; the transport ignores notifies then).
    assert!(
        !b.broken || (now.last_avail, now.used_idx) == (b.last_avail, b.used_idx),
        "(d) queue {q}: used by a device with DEVICE_NEEDS_RESET set"
    );
    let moved = now.used_idx.wrapping_sub(b.used_idx);
    // A reply the guest aimed at its own available ring may make more available mid-call.
    let after = ram.u16_at(now.avail + 2);
    let offered = avail
        .wrapping_sub(b.last_avail)
        .max(after.wrapping_sub(b.last_avail));
    assert!(
        moved <= offered && moved <= now.size,
        "(d) queue {q}: used.idx moved by {moved}, {offered} chains were available"
    );
    if moved != 0 && !broken {
        assert_eq!(
            ram.u16_at(now.used + 2),
            now.used_idx,
            "(d) queue {q}: used.idx in RAM is not the device's"
        );
    }
}

/// Runs one input and returns what it reached.
pub fn run_with(data: &[u8]) -> Tally {
    let mut input = Input::new(data);
    let sel = input.u8();
    // Table pages: every translating domain takes 3 at once (its root and the MSI doorbell's
    // L2 and L3 tables); 3 is one domain and no room for any MAP.
    let capacity = [18, 10, 26, 3][usize::from(input.u8() & 3)];
    let mut h = Harness::new(sel, capacity);
    // Most inputs start from Linux's probe: every feature, queues of 64.
    if input.u8() & 7 != 0 {
        let f = h.device_features();
        h.negotiate(f, QUEUE_SIZE);
        if input.bool() {
            h.event_buffers(8, 24);
        }
    }
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        h.step(&mut input);
        h.check_counters();
    }
    let s = h.counters();
    let mut t = h.tally;
    let ok = h.log.lock().ok;
    t.ok.copy_from_slice(&ok[1..]);
    t.tlbis = s["tlbis"];
    t
}

/// The fuzz target's entry point.
pub fn run(data: &[u8]) {
    run_with(data);
}

#[cfg(test)]
mod tests {
    use super::super::Rng;
    use super::*;
    use crate::devices::viommu::tests::{attach, map, unmap};

    #[test]
    fn random_inputs_keep_the_invariants() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = Tally::default();
        for _ in 0..900 {
            let a = run_with(&rng.input(400));
            t.completed += a.completed;
            t.events += a.events;
            t.queue_errors += a.queue_errors;
            t.resets += a.resets;
            t.tlbis += a.tlbis;
            for i in 0..5 {
                t.ok[i] += a.ok[i];
            }
        }
        assert!(
            t.completed > 6000
                && t.ok[0] > 800
                && t.ok[2] > 100
                && t.ok[3] > 200
                && t.events > 80
                && t.queue_errors > 500
                && t.resets > 1000,
            "shallow: {t:?}"
        );
    }

    /// What cargo-fuzz found in 3 s (29.5 k execs) with `flush_events`' DEVICE_NEEDS_RESET
    /// check taken out: a bad event buffer, then a fault flushed into the next one.
    #[test]
    fn a_broken_device_leaves_the_event_queue_alone() {
        run(&[
            0x06, 0xd7, 0xd7, 0xd7, 0x65, 0x00, 0x1b, 0x0c, 0xed, 0x65, 0x04, 0x04, 0xed, 0x2b,
            0x00, 0xed, 0x0c, 0xed, 0xed, 0x2b, 0x44,
        ]);
    }

    #[test]
    #[should_panic(expected = "(a) domain 0: leaf")]
    fn a_leaf_outside_its_mapping_is_caught() {
        let cfg = config(0);
        check_leaves(
            &cfg,
            0,
            &[(0x1000, 0x1fff, RAM, 3)],
            &[(0x1000, 0x1000, RAM + 0x5000, El1Attributes::empty())],
        );
    }

    #[test]
    #[should_panic(expected = "(b) STE written for StreamID 0x7")]
    fn a_foreign_stream_is_caught() {
        let mut h = Harness::new(0, 16);
        let _ = h.phys.write_ste(7, Ste::abort());
    }

    #[test]
    #[should_panic(expected = "bypasses stage 2")]
    fn a_bypass_ste_is_caught() {
        let mut h = Harness::new(0, 16);
        let _ = h.phys.write_ste(1, Ste::bypass());
    }

    #[test]
    #[should_panic(expected = "(c) UNMAP of domain 0 completed without a TLBI")]
    fn an_unmap_without_its_tlbi_is_caught() {
        let mut h = Harness::probed();
        assert_eq!(h.status_of(&attach(0, 1, 0)), Some(status::OK));
        assert_eq!(
            h.status_of(&map(0, 0x10_0000, 0x10_1fff, RAM, 3)),
            Some(status::OK)
        );
        h.log.lock().hide_tlbis = true;
        h.status_of(&unmap(0, 0x10_0000, 0x10_1fff));
    }

    #[test]
    #[should_panic(expected = "(c) UNMAP of domain 0 completed before a CMD_SYNC")]
    fn an_unmap_without_its_sync_is_caught() {
        check_unmap(
            0,
            &[(0x1000, 0x1fff)],
            &[
                Ev::Sync(1),
                Ev::Waited(1),
                Ev::Cmd(Command::TlbiNhAsid {
                    vmid: VMID,
                    asid: 1,
                }),
            ],
        );
    }

    #[test]
    #[should_panic(expected = "(c) domain 3 freed without a TLBI of its ASID")]
    fn a_domain_freed_without_its_tlbi_is_caught() {
        let mut h = Harness::probed();
        assert_eq!(h.status_of(&attach(3, 1, 0)), Some(status::OK));
        h.log.lock().hide_tlbis = true;
        let mut d = attach(3, 1, 0);
        d[0] = req::DETACH;
        h.status_of(&d);
    }

    #[test]
    #[should_panic(expected = "(d) queue 0: used.idx moved by 2, 1 chains")]
    fn a_used_ring_overrun_is_caught() {
        let ram = Ram(vec![0; RAM_SIZE]);
        let b = QueueView {
            last_avail: 0,
            used_idx: 0,
            size: 8,
            used: RAM + 0x600,
            avail: RAM + 0x400,
            broken: false,
        };
        let n = QueueView {
            last_avail: 2,
            used_idx: 2,
            ..b
        };
        check_used(0, Some((b, 1)), n, &ram, Status::DRIVER_OK);
    }

    #[test]
    #[should_panic(expected = "(e) counter events went from 3 to 2")]
    fn a_falling_counter_is_caught() {
        let a = parse_stats("viommu: vm stats: events=3 faults=3");
        let b = parse_stats("viommu: vm stats: events=2 faults=3");
        check_counters(&a, &b);
    }

    #[test]
    #[should_panic(expected = "(f) after a reset: 1 domains")]
    fn a_reset_that_keeps_domains_is_caught() {
        let mut h = Harness::probed();
        assert_eq!(h.status_of(&attach(0, 1, 0)), Some(status::OK));
        h.log.lock().skip_reset = true;
        h.set_status(0);
    }
}

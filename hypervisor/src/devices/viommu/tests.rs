//! Host tests of the virtio-iommu model against the smmu crate's checking physical SMMU, which
//! enforces invariants (b) only the VM's psids, (c) no physical bypass and the VM's stage 2,
//! (d) only the VM's VMID and psids in commands, (g) break-before-make.

use super::*;
use aarch64_paging::target::TargetAllocator;
use smmu::ste::StreamConfig;
use smmu::vsmmu::harness::{self, CheckingSmmu};
use std::collections::BTreeMap as Map;

const TABLE_BASE: u64 = 0x8000_0000;
const TABLE_STRIDE: u64 = 0x1000_0000;
const CD_BASE: u64 = 0x7000_0000;
const MSI: (u64, u64, u8) = (0x0809_0000, 0x0809_ffff, RESV_MEM_T_MSI);

/// Each domain's tables at a base IPA of their own; the free-page count is set by the test
/// (refreshed from the model's walked count after each request, [`Rig::req`]).
#[derive(Debug)]
struct Pool {
    next: u64,
    capacity: usize,
    used: usize,
    cds: Map<usize, [u64; 8]>,
}

impl TablePool for Pool {
    type Tr = TargetAllocator<El1Attributes>;

    fn translation(&mut self) -> Self::Tr {
        let base = TABLE_BASE + (self.next % 64) * TABLE_STRIDE;
        self.next += 1;
        TargetAllocator::new(base)
    }

    fn free_pages(&self) -> usize {
        self.capacity.saturating_sub(self.used)
    }

    fn cd_ipa(&self, slot: usize) -> u64 {
        CD_BASE + 64 * slot as u64
    }

    fn write_cd(&mut self, slot: usize, cd: [u64; 8]) {
        self.cds.insert(slot, cd);
    }
}

fn cfg() -> ViommuConfig {
    ViommuConfig {
        name: "vm".into(),
        endpoints: harness::STREAMS.to_vec(),
        s2: harness::s2_config(),
        input_bits: 39,
        ipa_bits: 40,
        page_size_mask: 0x4020_1000,
        max_domains: 8,
        max_mappings: 64,
        resv: vec![MSI],
        probe_size: 0x200,
    }
}

struct Rig {
    v: Viommu<Pool>,
    phys: CheckingSmmu,
}

const ALL: u64 = feature::VERSION_1
    | feature::INPUT_RANGE
    | feature::DOMAIN_RANGE
    | feature::MAP_UNMAP
    | feature::PROBE
    | feature::BYPASS_CONFIG
    | feature::MMIO;

impl Rig {
    fn with(c: ViommuConfig, capacity: usize, features: u64) -> Self {
        let mut vc = harness::config(0);
        vc.streams = c.endpoints.clone();
        vc.s2 = c.s2;
        let mut phys = CheckingSmmu::new(&vc);
        let pool = Pool {
            next: 0,
            capacity,
            used: 0,
            cds: Map::new(),
        };
        let mut v = Viommu::new(c, pool);
        v.vm_reset(&mut phys);
        v.set_driver_features(features);
        phys.take_commands();
        Self { v, phys }
    }

    fn new() -> Self {
        Self::with(cfg(), 1000, ALL)
    }

    fn req(&mut self, r: &[u8], w: usize) -> Reply {
        let rep = self.v.request(r, w, &mut self.phys);
        self.v.pool_mut().used = self.v.table_pages();
        self.check();
        rep
    }

    fn st(&mut self, r: &[u8]) -> u8 {
        let w = if r.first() == Some(&req::PROBE) {
            0x204
        } else {
            4
        };
        let rep = self.req(r, w);
        assert_eq!(rep.used_len as usize, w);
        rep.status().unwrap()
    }

    /// The model's STEs are what the physical SMMU holds, and follow from its state.
    fn check(&self) {
        for (psid, ste) in self.v.physical_stes() {
            assert_eq!(self.phys.stes.get(&psid), Some(&ste), "psid {psid:#x}");
        }
        assert_eq!(self.v.physical_stes().count(), harness::STREAMS.len());
        // Every physical CMD_SYNC queued was waited for before the call returned.
        assert_eq!(self.phys.ok_seq(), self.phys.total_syncs);
    }

    fn ste(&self, vsid: u32) -> Ste {
        let m = harness::STREAMS.iter().find(|m| m.vsid == vsid).unwrap();
        self.phys.stes[&m.psid]
    }

    /// Translates `iova` through domain `d`'s table image like the SMMU: levels 1-3, 4 KiB
    /// granule. Returns (IPA, writable, level of the leaf).
    fn walk(&self, d: u32, iova: u64) -> Option<(u64, bool, usize)> {
        self.leaf(d, iova).map(|(ipa, w, level, _)| (ipa, w, level))
    }

    /// As [`Rig::walk`], with the leaf's AttrIndx too.
    fn leaf(&self, d: u32, iova: u64) -> Option<(u64, bool, usize, u64)> {
        let tr = self.v.domain_translation(d)?;
        let img = tr.as_bytes();
        let base =
            TABLE_BASE + ((self.v.domain_root(d)? - TABLE_BASE) / TABLE_STRIDE) * TABLE_STRIDE;
        let mut table = self.v.domain_root(d)?;
        for level in 1..=3usize {
            let shift = 12 + 9 * (3 - level);
            let idx = (iova >> shift) & 511;
            let off = (table - base + idx * 8) as usize;
            let desc = u64::from_le_bytes(img[off..off + 8].try_into().unwrap());
            if desc & 1 == 0 {
                return None;
            }
            let oa = desc & 0x0000_ffff_ffff_f000;
            if level < 3 && desc & 2 != 0 {
                table = oa;
                continue;
            }
            if level == 3 {
                assert_ne!(desc & 2, 0, "level-3 descriptor must be a page");
            }
            // AF, nG, AP[1] (unprivileged), UXN/PXN, inner shareable, AttrIndx 0 (Normal) or
            // 1 (Device, MAP_F_MMIO).
            assert_eq!(
                desc & (1 << 10 | 1 << 11 | 1 << 6),
                1 << 10 | 1 << 11 | 1 << 6
            );
            assert_eq!(desc >> 53 & 3, 3);
            assert_eq!(desc >> 8 & 3, 3);
            assert!(desc >> 2 & 7 <= 1);
            let mask = (1u64 << shift) - 1;
            let ipa = (oa & !mask) | (iova & mask);
            return Some((ipa, desc & (1 << 7) == 0, level, desc >> 2 & 7));
        }
        None
    }
}

/// The device-readable part of an ATTACH (the device tests and the fuzz harness's tests build their requests with these too).
pub(crate) fn attach(d: u32, ep: u32, flags: u32) -> Vec<u8> {
    let mut r = vec![0; 20];
    r[0] = req::ATTACH;
    r[4..8].copy_from_slice(&d.to_le_bytes());
    r[8..12].copy_from_slice(&ep.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    r
}

pub(crate) fn detach(d: u32, ep: u32) -> Vec<u8> {
    let mut r = attach(d, ep, 0);
    r[0] = req::DETACH;
    r
}

pub(crate) fn map(d: u32, s: u64, e: u64, p: u64, flags: u32) -> Vec<u8> {
    let mut r = vec![0; 36];
    r[0] = req::MAP;
    r[4..8].copy_from_slice(&d.to_le_bytes());
    r[8..16].copy_from_slice(&s.to_le_bytes());
    r[16..24].copy_from_slice(&e.to_le_bytes());
    r[24..32].copy_from_slice(&p.to_le_bytes());
    r[32..36].copy_from_slice(&flags.to_le_bytes());
    r
}

pub(crate) fn unmap(d: u32, s: u64, e: u64) -> Vec<u8> {
    let mut r = vec![0; 28];
    r[0] = req::UNMAP;
    r[4..8].copy_from_slice(&d.to_le_bytes());
    r[8..16].copy_from_slice(&s.to_le_bytes());
    r[16..24].copy_from_slice(&e.to_le_bytes());
    r
}

pub(crate) fn probe(ep: u32) -> Vec<u8> {
    let mut r = vec![0; 72];
    r[0] = req::PROBE;
    r[4..8].copy_from_slice(&ep.to_le_bytes());
    r
}

const RW: u32 = MAP_F_READ | MAP_F_WRITE;
const K4: u64 = 0x1000;

#[test]
fn features_and_config_space() {
    let mut r = Rig::new();
    assert_eq!(r.v.device_features(), ALL);
    assert_eq!(r.v.device_features() & feature::BYPASS, 0);
    let c = |r: &Rig, off: u64| r.v.config_read(off, 4);
    assert_eq!((c(&r, 0), c(&r, 4)), (0x4020_1000, 0));
    assert_eq!((c(&r, 8), c(&r, 0xc)), (0, 0));
    assert_eq!((c(&r, 0x10), c(&r, 0x14)), (0xffff_ffff, 0x7f));
    assert_eq!((c(&r, 0x18), c(&r, 0x1c)), (0, 7));
    assert_eq!(c(&r, 0x20), 0x200);
    assert_eq!(r.v.config_read(0x24, 1), 1);
    assert_eq!(r.v.config_read(0x28, 4), 0);
    assert_eq!(r.v.config_read(0x2, 4), 0, "misaligned");
    // Unattached with bypass = 1: stage 2 only.
    assert_eq!(r.ste(1), Ste::stage2(harness::s2_config()));
    // Only 0 or 1; only with BYPASS_CONFIG.
    r.v.config_write(0x24, 1, 2, &mut r.phys);
    assert_eq!(r.v.bypass(), 1);
    r.v.config_write(0x20, 4, 0, &mut r.phys);
    assert_eq!(c(&r, 0x20), 0x200, "probe_size is read-only");
    r.v.config_write(0x24, 1, 0, &mut r.phys);
    assert_eq!(r.v.bypass(), 0);
    for m in harness::STREAMS {
        assert_eq!(r.ste(m.vsid), Ste::abort());
    }
    r.check();
    let mut n = Rig::with(cfg(), 100, ALL & !feature::BYPASS_CONFIG);
    n.v.config_write(0x24, 1, 0, &mut n.phys);
    assert_eq!(
        n.v.bypass(),
        1,
        "bypass is not writable without BYPASS_CONFIG"
    );
    // Features not offered are dropped.
    n.v.set_driver_features(u64::MAX);
    assert_eq!(n.v.driver_features(), ALL);
}

#[test]
fn attach_creates_a_domain_with_its_cd_and_a_nested_ste() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(3, 8, 0)), status::OK);
    let ste = r.ste(8);
    assert_eq!(ste.config(), StreamConfig::Nested);
    assert_eq!(ste.s1_context_ptr(), CD_BASE + 3 * 64);
    assert_eq!(ste.s2_config(), harness::s2_config());
    assert_eq!((ste.s1cdmax(), ste.s1fmt(), ste.s1dss()), (0, 0, 0));
    let cd = r.v.pool().cds[&3];
    // T0SZ 25, TG0 4K, IRGN0/ORGN0 WBWA, SH0 inner, EPD1, V, IPS 40 bits, AA64, R, A, ASET,
    // ASID 4 (domain 3 + 1).
    let w0 = 25 | 1 << 8 | 1 << 10 | 3 << 12 | 1 << 30 | 1 << 31 | 2 << 32 | 1 << 41;
    let w0 = w0 | 1 << 45 | 1 << 46 | 1 << 47 | 4 << 48;
    assert_eq!(cd[0], w0);
    assert_eq!(cd[1], r.v.domain_root(3).unwrap());
    assert_eq!(cd[3], 0x04ff);
    // The CD is invalidated with the STE change, with a waited CMD_SYNC.
    let cmds = r.phys.take_commands();
    assert!(cmds.contains(&Command::CfgiCd {
        sid: 8,
        ssid: 0,
        leaf: true
    }));
    // The root, and an L2 and an L3 table for the MSI doorbell's 1:1 pages.
    let s = r.v.stats();
    assert_eq!((s.domains, s.table_pages), (1, 3));
    // Attaching again is a no-op; a second endpoint shares the domain.
    assert_eq!(r.st(&attach(3, 8, 0)), status::OK);
    assert_eq!(r.st(&attach(3, 2, 0)), status::OK);
    assert_eq!(r.ste(2).s1_context_ptr(), CD_BASE + 3 * 64);
    assert_eq!(r.v.stats().domains, 1);
}

#[test]
fn abort_streams_aborts_every_endpoint_and_frees_its_domains_until_the_vm_reset() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(3, 8, 0)), status::OK);
    r.phys.take_commands();
    r.v.abort_streams(&mut r.phys);
    r.check();
    for m in harness::STREAMS.iter() {
        assert_eq!(r.ste(m.vsid), Ste::abort(), "endpoint {}", m.vsid);
    }
    assert_eq!(r.v.stats().domains, 0);
    assert!(r.phys.take_commands().contains(&Command::TlbiNhAll {
        vmid: harness::s2_config().vmid
    }));
    // The next boot's VM reset: every endpoint on stage 2 only again.
    r.v.vm_reset(&mut r.phys);
    r.check();
    for m in harness::STREAMS.iter() {
        assert_eq!(r.ste(m.vsid), Ste::stage2(harness::s2_config()));
    }
}

#[test]
fn attach_moves_and_frees_the_old_domain() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    assert_eq!(
        r.st(&map(0, 0x10_0000, 0x10_0fff, 0x4000_0000, RW)),
        status::OK
    );
    r.phys.take_commands();
    // Linux switches domains without a DETACH.
    assert_eq!(r.st(&attach(1, 1, 0)), status::OK);
    assert_eq!(r.ste(1).s1_context_ptr(), CD_BASE + 64);
    let cmds = r.phys.take_commands();
    assert!(cmds.contains(&Command::TlbiNhAsid {
        vmid: harness::VMID,
        asid: 1
    }));
    let s = r.v.stats();
    assert_eq!((s.domains, s.mappings, s.table_pages), (1, 0, 3));
    // The old domain's CD slot is cleared; its ID can be reused.
    assert_eq!(r.v.pool().cds[&0], [0; 8]);
    assert_eq!(r.st(&map(0, 0, 0xfff, 0, RW)), status::NOENT);
}

#[test]
fn attach_errors() {
    let mut r = Rig::new();
    let mut a = attach(0, 1, 0);
    a[16] = 1;
    assert_eq!(r.st(&a), status::INVAL, "reserved");
    assert_eq!(r.st(&attach(0, 1, 2)), status::INVAL, "unknown flag");
    assert_eq!(
        r.st(&attach(0, 0x20, 0)),
        status::NOENT,
        "a psid is not an endpoint ID"
    );
    assert_eq!(r.st(&attach(0, 7, 0)), status::NOENT, "foreign endpoint");
    assert_eq!(
        r.st(&attach(8, 1, 0)),
        status::RANGE,
        "outside domain_range"
    );
    // The pool cannot hold a root: NOMEM, nothing created.
    r.v.pool_mut().capacity = 0;
    assert_eq!(r.st(&attach(0, 1, 0)), status::NOMEM);
    assert_eq!(r.v.stats().domains, 0);
    assert_eq!(r.ste(1), Ste::stage2(harness::s2_config()));
    let s = r.v.stats();
    assert_eq!(s.requests[1], 6);
    assert_eq!(
        (s.statuses[4], s.statuses[6], s.statuses[5], s.statuses[8]),
        (2, 2, 1, 1)
    );
}

#[test]
fn bypass_domains() {
    let mut n = Rig::with(cfg(), 100, ALL & !feature::BYPASS_CONFIG);
    assert_eq!(n.st(&attach(0, 1, ATTACH_F_BYPASS)), status::INVAL);
    let mut r = Rig::new();
    r.v.config_write(0x24, 1, 0, &mut r.phys);
    assert_eq!(r.ste(1), Ste::abort());
    assert_eq!(r.st(&attach(2, 1, ATTACH_F_BYPASS)), status::OK);
    assert_eq!(
        r.ste(1),
        Ste::stage2(harness::s2_config()),
        "stage 2, never bypass"
    );
    assert_eq!(r.v.stats().table_pages, 0, "no tables for a bypass domain");
    assert_eq!(r.st(&attach(2, 8, 0)), status::INVAL, "bypass mismatch");
    assert_eq!(r.st(&attach(3, 8, 0)), status::OK);
    assert_eq!(
        r.st(&attach(3, 2, ATTACH_F_BYPASS)),
        status::INVAL,
        "bypass mismatch"
    );
    assert_eq!(r.st(&map(2, 0, 0xfff, 0, RW)), status::INVAL);
    assert_eq!(r.st(&unmap(2, 0, 0xfff)), status::INVAL);
    assert_eq!(r.st(&detach(2, 1)), status::OK);
    assert_eq!(r.ste(1), Ste::abort());
    assert_eq!(r.v.stats().domains, 1);
}

#[test]
fn detach_statuses_and_freeing() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(5, 8, 0)), status::OK);
    assert_eq!(r.st(&attach(5, 1, 0)), status::OK);
    assert_eq!(r.st(&detach(5, 7)), status::NOENT);
    assert_eq!(
        r.st(&detach(4, 8)),
        status::INVAL,
        "not attached to that domain"
    );
    assert_eq!(r.st(&detach(5, 2)), status::INVAL, "not attached");
    let mut d = detach(5, 8);
    d[12] = 1;
    assert_eq!(r.st(&d), status::INVAL, "reserved");
    assert_eq!(
        r.st(&map(5, 0x20_0000, 0x3f_ffff, 0x4020_0000, RW)),
        status::OK
    );
    assert_eq!(r.st(&detach(5, 8)), status::OK);
    assert_eq!(r.ste(8), Ste::stage2(harness::s2_config()));
    assert_eq!(r.v.stats().domains, 1, "domain 5 still has endpoint 1");
    r.v.config_write(0x24, 4, 0, &mut r.phys);
    assert_eq!(
        r.ste(8),
        Ste::abort(),
        "bypass applies to unattached endpoints at once"
    );
    assert_eq!(r.ste(1).config(), StreamConfig::Nested);
    r.phys.take_commands();
    assert_eq!(r.st(&detach(5, 1)), status::OK);
    assert_eq!(r.ste(1), Ste::abort());
    let cmds = r.phys.take_commands();
    assert!(cmds.contains(&Command::TlbiNhAsid {
        vmid: harness::VMID,
        asid: 6
    }));
    let s = r.v.stats();
    assert_eq!((s.domains, s.mappings, s.table_pages), (0, 0, 0));
}

#[test]
fn map_statuses() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    assert_eq!(r.st(&map(1, 0, 0xfff, 0, RW)), status::NOENT);
    assert_eq!(
        r.st(&map(0, 0x800, 0x17ff, 0, RW)),
        status::RANGE,
        "virt_start"
    );
    assert_eq!(
        r.st(&map(0, 0, 0xfff, 0x800, RW)),
        status::RANGE,
        "phys_start"
    );
    assert_eq!(
        r.st(&map(0, 0, 0x17ff, 0, RW)),
        status::RANGE,
        "virt_end + 1"
    );
    assert_eq!(
        r.st(&map(0, 0x2000, 0xfff, 0, RW)),
        status::INVAL,
        "end before start"
    );
    let top = 1u64 << 39;
    assert_eq!(
        r.st(&map(0, top, top + 0xfff, 0, RW)),
        status::RANGE,
        "input range"
    );
    assert_eq!(r.st(&map(0, 0, u64::MAX, 0, RW)), status::RANGE);
    assert_eq!(
        r.st(&map(0, 0, 0xfff, (1 << 40) - K4, RW)),
        status::OK,
        "last IPA page"
    );
    assert_eq!(
        r.st(&map(0, K4, 0x2fff, (1 << 40) - K4, RW)),
        status::RANGE,
        "beyond IPA"
    );
    assert_eq!(
        r.st(&map(0, K4, 0x1fff, 0, 8)),
        status::INVAL,
        "unknown flag"
    );
    // MMIO (Device memory: the MSI doorbell) only with F_MMIO negotiated.
    let mut no_mmio = Rig::with(cfg(), 1000, ALL & !feature::MMIO);
    assert_eq!(no_mmio.st(&attach(0, 8, 0)), status::OK);
    assert_eq!(
        no_mmio.st(&map(0, K4, 0x1fff, 0, MAP_F_WRITE | MAP_F_MMIO)),
        status::INVAL,
        "MMIO without F_MMIO"
    );
    assert_eq!(r.st(&map(0, 0x10_0000, 0x10_3fff, 0, RW)), status::OK);
    assert_eq!(
        r.st(&map(0, 0x10_3000, 0x10_4fff, 0, RW)),
        status::INVAL,
        "overlap"
    );
    assert_eq!(
        r.st(&map(0, 0xf_f000, 0x10_0fff, 0, RW)),
        status::INVAL,
        "overlap"
    );
    assert_eq!(
        r.st(&map(0, 0x800_0000, 0x80a_ffff, 0, RW)),
        status::INVAL,
        "RESV_MEM"
    );
    assert_eq!(r.v.stats().mappings, 2);
    // No TLB work for a MAP.
    r.phys.take_commands();
    assert_eq!(
        r.st(&map(0, 0x20_0000, 0x20_0fff, 0, MAP_F_READ)),
        status::OK
    );
    assert!(r.phys.take_commands().is_empty());
}

#[test]
fn map_nomem_changes_nothing() {
    let mut c = cfg();
    c.max_mappings = 2;
    // No MSI doorbell to pass 1:1, so that the root is the domain's only table.
    c.resv = vec![];
    let mut r = Rig::with(c, 2, ALL);
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    // A page not 2 MiB-congruent to its IPA needs an L2 and an L3 table: 2 > 1 free.
    assert_eq!(
        r.st(&map(0, 0x1000, 0x1fff, 0x4000_0000, RW)),
        status::NOMEM
    );
    assert_eq!(r.v.stats().mappings, 0);
    assert_eq!(r.v.table_pages(), 1);
    assert_eq!(r.walk(0, 0x1000), None);
    r.v.pool_mut().capacity = 10;
    assert_eq!(r.st(&map(0, 0x1000, 0x1fff, 0x4000_0000, RW)), status::OK);
    assert_eq!(r.st(&map(0, 0x2000, 0x2fff, 0x4000_0000, 0)), status::OK);
    assert_eq!(
        r.st(&map(0, 0x3000, 0x3fff, 0x4000_0000, RW)),
        status::NOMEM,
        "max_mappings"
    );
    // A huge identity map (what Linux sends without BYPASS_CONFIG) takes few pages.
    let mut r = Rig::with(cfg(), 8, ALL);
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    let e = (1 << 39) - 1;
    assert_eq!(r.st(&map(0, 0x4000_0000, e, 0x4000_0000, RW)), status::OK);
    assert_eq!(
        r.v.table_pages(),
        3,
        "1 GiB blocks only (and the doorbell's L2 and L3 tables)"
    );
    assert_eq!(r.walk(0, 0x12_3456_7000), Some((0x12_3456_7000, true, 1)));
}

#[test]
fn the_tables_translate_like_the_smmu() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    assert_eq!(
        r.st(&map(0, 0x10_0000, 0x10_1fff, 0x4123_4000, RW)),
        status::OK
    );
    assert_eq!(
        r.st(&map(0, 0x11_0000, 0x11_0fff, 0x4200_0000, MAP_F_READ)),
        status::OK
    );
    assert_eq!(
        r.st(&map(0, 0x12_0000, 0x12_0fff, 0x4300_0000, MAP_F_WRITE)),
        status::OK
    );
    assert_eq!(
        r.st(&map(0, 0x13_0000, 0x13_0fff, 0x4400_0000, 0)),
        status::OK
    );
    assert_eq!(
        r.st(&map(0, 0x4000_0000, 0x403f_ffff, 0x8000_0000, RW)),
        status::OK
    );
    assert_eq!(r.walk(0, 0x10_0abc), Some((0x4123_4abc, true, 3)));
    assert_eq!(r.walk(0, 0x10_1000), Some((0x4123_5000, true, 3)));
    assert_eq!(r.walk(0, 0x10_2000), None);
    assert_eq!(
        r.walk(0, 0x11_0010),
        Some((0x4200_0010, false, 3)),
        "read-only"
    );
    assert_eq!(
        r.walk(0, 0x12_0000),
        Some((0x4300_0000, true, 3)),
        "write-only widened"
    );
    assert_eq!(r.walk(0, 0x13_0000), None, "no permission: nothing mapped");
    assert_eq!(
        r.st(&map(0, 0x13_0000, 0x13_0fff, 0, RW)),
        status::INVAL,
        "but it overlaps"
    );
    assert_eq!(
        r.walk(0, 0x4030_0004),
        Some((0x8030_0004, true, 2)),
        "2 MiB blocks"
    );
    assert_eq!(r.st(&unmap(0, 0x10_0000, 0x10_1fff)), status::OK);
    assert_eq!(r.walk(0, 0x10_0000), None);
    assert_eq!(r.st(&unmap(0, 0x13_0000, 0x13_0fff)), status::OK);
    assert_eq!(r.st(&unmap(0, 0x4000_0000, 0x403f_ffff)), status::OK);
    assert_eq!(r.walk(0, 0x4030_0004), None);
    assert_eq!(
        r.walk(0, 0x11_0010),
        Some((0x4200_0010, false, 3)),
        "others stay"
    );
}

#[test]
fn unmap_follows_the_spec_examples_and_invalidates_before_replying() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 8, 0)), status::OK);
    let p = |n: u64| n * K4;
    // map(0,9) then unmap(0,4): RANGE, nothing removed.
    assert_eq!(r.st(&map(0, 0, p(10) - 1, 0x4000_0000, RW)), status::OK);
    r.phys.take_commands();
    assert_eq!(r.st(&unmap(0, 0, p(5) - 1)), status::RANGE);
    assert!(r.phys.take_commands().is_empty());
    assert_eq!(r.v.stats().mappings, 1);
    assert!(r.walk(0, p(9)).is_some());
    assert_eq!(r.st(&unmap(0, 0, p(10) - 1)), status::OK);
    // map(0,4) + map(5,9), unmap(0,4): only the first goes.
    assert_eq!(r.st(&map(0, 0, p(5) - 1, 0x4000_0000, RW)), status::OK);
    assert_eq!(r.st(&map(0, p(5), p(10) - 1, 0x4100_0000, RW)), status::OK);
    r.phys.take_commands();
    let syncs = r.phys.total_syncs;
    assert_eq!(r.st(&unmap(0, 0, p(5) - 1)), status::OK);
    let want: Vec<Command> = (0..5)
        .map(|i| Command::TlbiNhVa {
            vmid: harness::VMID,
            asid: 1,
            addr: TlbiAddr::single(p(i), false),
        })
        .collect();
    assert_eq!(r.phys.take_commands(), want);
    assert_eq!(
        r.phys.total_syncs,
        syncs + 1,
        "one CMD_SYNC, waited (Rig::check)"
    );
    assert_eq!(r.walk(0, 0), None);
    assert_eq!(r.walk(0, p(5)), Some((0x4100_0000, true, 3)));
    // Spilling over unmapped space is fine; nothing mapped: OK, no TLB work.
    assert_eq!(r.st(&unmap(0, 0, 1 << 30)), status::OK);
    assert_eq!(
        r.phys.take_commands(),
        [Command::TlbiNhVa {
            vmid: harness::VMID,
            asid: 1,
            addr: TlbiAddr::single(p(5), false),
        }; 5]
            .iter()
            .enumerate()
            .map(|(i, c)| match *c {
                Command::TlbiNhVa { vmid, asid, .. } => Command::TlbiNhVa {
                    vmid,
                    asid,
                    addr: TlbiAddr::single(p(5 + i as u64), false),
                },
                c => c,
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(r.st(&unmap(0, 0, 1 << 30)), status::OK);
    assert!(r.phys.take_commands().is_empty());
    // A large UNMAP invalidates the ASID.
    assert_eq!(r.st(&map(0, 0, p(17) - 1, 0x4000_0000, RW)), status::OK);
    r.phys.take_commands();
    assert_eq!(r.st(&unmap(0, 0, p(17) - 1)), status::OK);
    assert_eq!(
        r.phys.take_commands(),
        [Command::TlbiNhAsid {
            vmid: harness::VMID,
            asid: 1
        }]
    );
    assert_eq!(r.st(&unmap(1, 0, 0xfff)), status::NOENT);
    let mut u = unmap(0, 0, 0xfff);
    u[24] = 1;
    assert_eq!(r.st(&u), status::INVAL, "reserved");
    assert_eq!(
        r.st(&unmap(0, 0x2000, 0xfff)),
        status::INVAL,
        "end before start"
    );
}

#[test]
fn probe_and_malformed_requests() {
    let mut c = cfg();
    c.resv = vec![MSI, (0x1000_0000, 0x1000_ffff, RESV_MEM_T_RESERVED), MSI];
    let mut r = Rig::with(c, 100, ALL);
    let rep = r.req(&probe(8), 0x204);
    assert_eq!(rep.used_len, 0x204);
    assert_eq!(rep.bytes.len(), 0x204);
    let b = &rep.bytes;
    assert_eq!(&b[0..8], &[1, 0, 20, 0, 1, 0, 0, 0]);
    assert_eq!(le64(b, 8), 0x0809_0000);
    assert_eq!(le64(b, 16), 0x0809_ffff);
    assert_eq!(&b[24..32], &[1, 0, 20, 0, 0, 0, 0, 0]);
    assert_eq!((le64(b, 32), le64(b, 40)), (0x1000_0000, 0x1000_ffff));
    assert!(
        b[48..0x200].iter().all(|&x| x == 0),
        "one MSI region only, zero-filled"
    );
    assert_eq!(&b[0x200..], &[status::OK, 0, 0, 0]);
    assert_eq!(r.st(&probe(9)), status::NOENT);
    let mut p = probe(8);
    p[40] = 1;
    assert_eq!(r.st(&p), status::INVAL, "reserved");
    // Short writable part: INVAL at its end.
    let rep = r.req(&probe(8), 8);
    assert_eq!(
        (rep.used_len, rep.bytes.clone()),
        (8, vec![0, 0, 0, 0, 4, 0, 0, 0])
    );
    // Short readable part: INVAL.
    assert_eq!(
        r.req(&attach(0, 1, 0)[..16], 4).status(),
        Some(status::INVAL)
    );
    assert_eq!(r.req(&[req::MAP], 4).status(), Some(status::INVAL));
    assert_eq!(r.v.stats().domains, 0);
    // Unknown type, no type, no room for the tail: nothing written.
    assert_eq!(r.req(&[9; 40], 4), Reply::none());
    assert_eq!(r.req(&[], 4), Reply::none());
    assert_eq!(r.req(&attach(0, 1, 0), 3), Reply::none());
    assert_eq!(r.v.stats().domains, 0);
    // PROBE not negotiated: UNSUPP.
    let mut n = Rig::with(cfg(), 100, ALL & !feature::PROBE);
    assert_eq!(n.st(&probe(8)), status::UNSUPP);
    // A larger writable part: the tail where the layout puts it.
    let rep = r.req(&attach(0, 1, 0), 16);
    assert_eq!((rep.used_len, rep.bytes), (4, vec![0, 0, 0, 0]));
}

#[test]
fn reset_and_vm_reset() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    assert_eq!(r.st(&attach(1, 8, 0)), status::OK);
    assert_eq!(r.st(&attach(2, 2, ATTACH_F_BYPASS)), status::OK);
    assert_eq!(r.st(&map(0, 0x1000, 0x5fff, 0x4000_0000, RW)), status::OK);
    assert_eq!(
        r.st(&map(1, 0x40_1000, 0x7f_ffff, 0x4000_0000, RW)),
        status::OK
    );
    assert!(r.v.table_pages() > 2);
    r.v.config_write(0x24, 1, 0, &mut r.phys);
    r.phys.take_commands();
    r.v.reset(&mut r.phys);
    r.v.pool_mut().used = r.v.table_pages();
    r.check();
    let s = r.v.stats();
    assert_eq!((s.domains, s.mappings, s.table_pages), (0, 0, 0));
    assert_eq!(r.v.pool().free_pages(), 1000);
    assert_eq!(r.v.bypass(), 0, "kept across device reset");
    assert_eq!(r.v.driver_features(), 0);
    for m in harness::STREAMS {
        assert_eq!(r.ste(m.vsid), Ste::abort());
    }
    assert!(r.phys.take_commands().contains(&Command::TlbiNhAll {
        vmid: harness::VMID
    }));
    r.v.set_driver_features(ALL);
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    r.v.vm_reset(&mut r.phys);
    r.v.pool_mut().used = r.v.table_pages();
    r.check();
    assert_eq!(r.v.bypass(), 1, "restored on VM reset");
    assert_eq!(r.v.stats().domains, 0);
    for m in harness::STREAMS {
        assert_eq!(r.ste(m.vsid), Ste::stage2(harness::s2_config()));
    }
}

#[test]
fn fault_records() {
    let mut r = Rig::new();
    let mut e = Event::new(EventKind::FTranslation, 0x20);
    e.input_addr = 0x1234_5000;
    e.rnw = false;
    let rec = r.v.fault_record(0x20, &e).unwrap();
    assert_eq!(rec[0], fault::R_MAPPING);
    assert_eq!(&rec[1..4], &[0, 0, 0]);
    assert_eq!(le32(&rec, 4), fault::F_WRITE | fault::F_ADDRESS);
    assert_eq!(le32(&rec, 8), 2, "the endpoint ID, not the psid");
    assert_eq!(le64(&rec, 16), 0x1234_5000);
    let mut p = Event::new(EventKind::FPermission, 1);
    p.rnw = true;
    assert_eq!(le32(&r.v.fault_record(1, &p).unwrap(), 4), 0x101);
    let d =
        r.v.fault_record(8, &Event::new(EventKind::CBadCd, 8))
            .unwrap();
    assert_eq!(
        (d[0], le32(&d, 4) & fault::F_ADDRESS, le64(&d, 16)),
        (1, 0, 0)
    );
    let mut s2 = e;
    s2.s2 = true;
    assert_eq!(
        r.v.fault_record(0x20, &s2),
        None,
        "stage 2 is the hypervisor's"
    );
    assert_eq!(r.v.fault_record(7, &e), None, "not the VM's stream");
    assert_eq!(r.v.stats().faults, 3);
}

#[test]
fn cycles_do_not_leak_pool_pages() {
    let mut r = Rig::with(cfg(), 40, ALL);
    for i in 0..300u64 {
        let d = (i % 8) as u32;
        assert_eq!(r.st(&attach(d, 1, 0)), status::OK);
        assert_eq!(r.st(&attach(d, 8, 0)), status::OK);
        let base = ((i * 0x1234_5000) % (1 << 38)) & !0xfff;
        for k in 0..4 {
            let s = base + k * 0x20_3000;
            assert_eq!(
                r.st(&map(d, s, s + 0x2fff, 0x4000_0000 + k * K4, RW)),
                status::OK
            );
        }
        assert_eq!(r.st(&unmap(d, base, base + 0x20_3000 + 0x2fff)), status::OK);
        assert_eq!(r.st(&detach(d, 1)), status::OK);
        assert_eq!(r.st(&detach(d, 8)), status::OK);
        assert_eq!(r.v.table_pages(), 0);
    }
    // Churn within one domain: each UNMAP frees the subtables it empties.
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    for i in 0..200u64 {
        let s = (i * 0x4000_0000 + 0x1000) % (1 << 39);
        assert_eq!(
            r.st(&map(0, s, s + 0xfff, 0x4000_0000, RW)),
            status::OK,
            "{i}"
        );
        assert_eq!(r.st(&unmap(0, s, s + 0xfff)), status::OK);
    }
    assert!(r.v.table_pages() <= 40);
    assert_eq!(r.st(&detach(0, 1)), status::OK);
    assert_eq!(r.v.stats().table_pages, 0);
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[test]
fn hostile_requests_keep_the_invariants() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut r = Rig::with(cfg(), 60, ALL);
    let eps = [1u32, 8, 2, 0x20, 7];
    for step in 0..4000 {
        let x = rng.next();
        let d = (rng.next() % 10) as u32;
        let ep = eps[(rng.next() % 5) as usize];
        let addr = |rng: &mut XorShift| match rng.next() % 4 {
            0 => rng.next() & 0x7f_ffff_f000,
            1 => rng.next() % 64 * K4,
            2 => rng.next() % 8 * 0x20_0000,
            _ => rng.next(),
        };
        let s = addr(&mut rng);
        let len = match rng.next() % 4 {
            0 => K4,
            1 => (rng.next() % 32 + 1) * K4,
            2 => 0x20_0000,
            _ => rng.next() % (1 << 32),
        };
        let e = s.wrapping_add(len).wrapping_sub(1);
        let p = addr(&mut rng);
        let flags = (rng.next() % 9) as u32;
        let mut q = match x % 11 {
            0 | 1 => attach(d, ep, flags & 1),
            2 => detach(d, ep),
            3..=5 => map(d, s, e, p, flags & 3),
            6 | 7 => unmap(d, s, e),
            8 => probe(ep),
            9 => {
                let n = (rng.next() % 80) as usize;
                (0..n).map(|_| rng.next() as u8).collect()
            }
            _ => {
                match rng.next() % 4 {
                    0 => r.v.reset(&mut r.phys),
                    1 => {
                        r.v.config_write(0x24, 1, (rng.next() % 3) as u32, &mut r.phys)
                    }
                    2 => r.v.set_driver_features(rng.next()),
                    _ => r.v.set_driver_features(ALL),
                }
                r.v.pool_mut().used = r.v.table_pages();
                r.check();
                continue;
            }
        };
        if rng.next().is_multiple_of(16) {
            let i = (rng.next() as usize) % q.len().max(1);
            if let Some(b) = q.get_mut(i) {
                *b ^= 1 << (rng.next() % 8);
            }
        }
        let before = r.v.table_pages();
        let w = (rng.next() % 0x210) as usize;
        let rep = r.req(&q, w);
        assert!(rep.bytes.len() <= w, "step {step}");
        assert_eq!(rep.used_len as usize, rep.bytes.len());
        assert!(r.v.table_pages() <= 60, "never more than the pool");
        if q.first() == Some(&req::MAP) && q.len() >= 36 && rep.status() == Some(status::OK) {
            let (s, e, p) = (le64(&q, 8), le64(&q, 16), le64(&q, 24));
            assert!(r.v.table_pages() <= before + worst_case_tables(s, e, p));
        }
        // The STE of every endpoint follows the model's state.
        for (i, m) in harness::STREAMS.iter().enumerate() {
            let ste = r.ste(m.vsid);
            match r.v.attached[i] {
                None if r.v.bypass() == 1 => assert_eq!(ste, Ste::stage2(harness::s2_config())),
                None => assert_eq!(ste, Ste::abort()),
                Some(d) if r.v.domains[&d].bypass() => {
                    assert_eq!(ste, Ste::stage2(harness::s2_config()))
                }
                Some(d) => assert_eq!(ste.s1_context_ptr(), CD_BASE + 64 * u64::from(d)),
            }
        }
        let live: usize = r.v.domains.values().map(|d| d.mappings.len()).sum();
        assert_eq!(live, r.v.stats().mappings);
        assert!(live <= 64);
        for d in r.v.domains.values() {
            assert!(d.endpoints > 0, "a domain without endpoints is freed");
        }
    }
    let s = r.v.stats();
    // The sequence reaches every request type and the statuses that matter.
    assert!(s.requests.iter().all(|&n| n > 100), "{s:?}");
    for st in [status::OK, status::INVAL, status::RANGE, status::NOENT] {
        assert!(s.statuses[usize::from(st)] > 20, "{s:?}");
    }
    r.v.vm_reset(&mut r.phys);
    assert_eq!(r.v.table_pages(), 0);
    assert!(!r.v.needs_reset());
}

#[test]
fn a_failing_physical_smmu_gives_ioerr_and_needs_a_reset() {
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 1, 0)), status::OK);
    assert_eq!(r.st(&map(0, 0, 0xfff, 0x4000_0000, RW)), status::OK);
    r.phys.fail = true;
    let rep = r.v.request(&unmap(0, 0, 0xfff), 4, &mut r.phys);
    assert_eq!(rep.status(), Some(status::IOERR));
    assert!(r.v.needs_reset());
    assert_eq!(
        r.v.request(&attach(1, 1, 0), 4, &mut r.phys).status(),
        Some(status::IOERR)
    );
    assert!(r.v.stats().phys_errors > 0);
    r.phys.fail = false;
    r.v.reset(&mut r.phys);
    r.v.pool_mut().used = r.v.table_pages();
    assert!(!r.v.needs_reset());
    r.check();
    assert_eq!(r.ste(1), Ste::stage2(harness::s2_config()));
    assert_eq!(r.v.stats().table_pages, 0);
}

#[test]
fn an_mmio_mapping_is_device_memory() {
    // Linux maps its MSI doorbell (the vITS's GITS_TRANSLATER page) with IOMMU_MMIO in its
    // software MSI window at 0x800_0000: MAP_F_WRITE | MAP_F_MMIO, F_MMIO negotiated.
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 8, 0)), status::OK);
    let flags = MAP_F_WRITE | MAP_F_MMIO;
    assert_eq!(
        r.st(&map(0, 0x800_0000, 0x800_0fff, 0x809_0000, flags)),
        status::OK
    );
    assert_eq!(r.st(&map(0, K4, 0x1fff, 0x4000_0000, RW)), status::OK);
    assert_eq!(r.leaf(0, 0x800_0040), Some((0x809_0040, true, 3, 1)));
    assert_eq!(r.leaf(0, K4), Some((0x4000_0000, true, 3, 0)));
    // Attr1 of MAIR0 is Device-nGnRE, Attr0 Normal write-back.
    assert_eq!(MAIR0 >> 8 & 0xff, 0x04);
    assert_eq!(MAIR0 & 0xff, 0xff);
    // MMIO alone (no READ or WRITE) maps nothing, like any mapping without permissions.
    assert_eq!(
        r.st(&map(0, 0x900_0000, 0x900_0fff, 0x809_0000, MAP_F_MMIO)),
        status::OK
    );
    assert_eq!(r.walk(0, 0x900_0000), None);
    r.check();
}

#[test]
fn a_translating_domain_passes_the_msi_doorbell_one_to_one() {
    // PROBE reports the vITS's GITS_TRANSLATER frame as RESV_MEM_T_MSI, so Linux composes its
    // MSIs with the doorbell's own address as IOVA and never maps it: every translating domain
    // must map it 1:1, as Device memory, from its creation.
    let mut r = Rig::new();
    assert_eq!(r.st(&attach(0, 8, 0)), status::OK);
    assert_eq!(r.leaf(0, 0x809_0040), Some((0x809_0040, true, 3, 1)));
    assert_eq!(r.leaf(0, 0x809_f000), Some((0x809_f000, true, 3, 1)));
    assert_eq!(r.walk(0, 0x80a_0000), None, "only the region");
    // The guest can neither map over it nor take it away.
    assert_eq!(
        r.st(&map(0, 0x809_0000, 0x809_0fff, 0x4000_0000, RW)),
        status::INVAL
    );
    assert_eq!(
        r.st(&map(0, 0x800_0000, 0x800_ffff, 0x4000_0000, RW)),
        status::OK
    );
    assert_eq!(r.st(&unmap(0, 0, 0xfff_ffff)), status::OK);
    assert_eq!(r.walk(0, 0x800_0000), None);
    assert_eq!(r.leaf(0, 0x809_0040), Some((0x809_0040, true, 3, 1)));
    assert_eq!(r.v.stats().mappings, 0);
    // A bypass domain has no tables: stage 2 alone sends the doorbell's IPA to the ITS.
    assert_eq!(r.st(&attach(1, 1, ATTACH_F_BYPASS)), status::OK);
    assert_eq!(r.v.domain_translation(1).map(|_| ()), None);
    // A pool without room for the doorbell's tables: NOMEM, no domain.
    let used = r.v.table_pages();
    r.v.pool_mut().capacity = used + 2;
    assert_eq!(r.st(&attach(2, 2, 0)), status::NOMEM);
    assert_eq!(r.v.stats().domains, 2);
    r.v.pool_mut().capacity = used + 3;
    assert_eq!(r.st(&attach(2, 2, 0)), status::OK);
    // Freed with the domain, pages and all.
    assert_eq!(r.st(&detach(2, 2)), status::OK);
    assert_eq!(r.st(&detach(0, 8)), status::OK);
    assert_eq!(r.v.table_pages(), 0);
    r.check();
}

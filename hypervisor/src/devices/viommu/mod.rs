//! The virtio-iommu request model (virtio 1.2 section 5.13, device ID 23; Linux 6.12
//! `drivers/iommu/virtio-iommu.c`, `include/uapi/linux/virtio_iommu.h` v0.12 layout): one
//! request's device-readable bytes in, performed on the physical SMMU, its device-writable
//! reply out. The virtio-mmio transport and its virtqueues are elsewhere.
//!
//! Each translating domain is a set of stage-1 tables (built with aarch64-paging in pages of a
//! per-VM [`TablePool`], output addresses IPAs) and one context descriptor with an ASID of its
//! own; an endpoint attached to it has a **nested** physical STE pointing at that CD over the
//! VM's stage 2. Everything else is stage 2 only (a bypass domain, or unattached with
//! `bypass` = 1) or abort (unattached with `bypass` = 0): never physical bypass, so isolation
//! rests on stage 2 whatever the guest asks. Only the VM's own physical StreamIDs reach the
//! SMMU, and commands only with the VM's VMID.
//!
//! A request completes inside the caller (the guest's QueueNotify trap): ATTACH, DETACH and
//! UNMAP reply only once their STE update, TLB invalidation and CMD_SYNC completed, since Linux
//! takes completion as "no longer reachable" (notes A11.6).
//!
//! # What the glue must provide
//!
//! - The [`TablePool`]'s table pages and CD slots are **IPAs**: with a nested STE the SMMU
//!   walks stage 1 (CD fetch included) through the VM's stage 2. So the pool must be mapped in
//!   that stage 2, Normal write-back (S2PTW faults walks to Device memory) and **read-only**
//!   (the SMMU only reads them: CD.HA/HD = 0), or the guest could rewrite its own tables.
//! - [`Viommu::vm_reset`] once before the VM runs (it writes every endpoint's STE),
//!   [`Viommu::reset`] on Status 0, and DEVICE_NEEDS_RESET while [`Viommu::needs_reset`].
//! - Requests in the order they were made available, each reply's `used_len` into the used
//!   ring (Linux copies ATTACH/DETACH/PROBE statuses back only when it equals the writable
//!   length exactly).

pub mod device;
#[cfg(test)]
mod device_tests;
mod tables;
#[cfg(test)]
pub(crate) mod tests;

use aarch64_paging::descriptor::El1Attributes;
use aarch64_paging::paging::Translation;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use smmu::cmd::{Command, TlbiAddr};
use smmu::driver::{DriverError, SteWrite};
use smmu::event::{Event, EventKind};
use smmu::ste::{cache, share, S1Fields, S2Config, Ste};
use smmu::vsmmu::{PhysicalSmmu, StreamMap};
use tables::Tables;

pub use tables::{context_descriptor, leaf_attributes, worst_case_tables, MAIR0};

/// virtio device ID of an IOMMU.
pub const DEVICE_ID: u32 = 23;

/// Feature bits (virtio 1.2 5.13.3; `virtio_iommu.h`).
pub mod feature {
    /// VIRTIO_IOMMU_F_INPUT_RANGE.
    pub const INPUT_RANGE: u64 = 1 << 0;
    /// VIRTIO_IOMMU_F_DOMAIN_RANGE.
    pub const DOMAIN_RANGE: u64 = 1 << 1;
    /// VIRTIO_IOMMU_F_MAP_UNMAP.
    pub const MAP_UNMAP: u64 = 1 << 2;
    /// VIRTIO_IOMMU_F_BYPASS (legacy; never offered).
    pub const BYPASS: u64 = 1 << 3;
    /// VIRTIO_IOMMU_F_PROBE.
    pub const PROBE: u64 = 1 << 4;
    /// VIRTIO_IOMMU_F_MMIO: MAP_F_MMIO mappings (Device memory), which Linux uses for the
    /// MSI doorbell page it maps in its software MSI window when PROBE reports no MSI region.
    pub const MMIO: u64 = 1 << 5;
    /// VIRTIO_IOMMU_F_BYPASS_CONFIG.
    pub const BYPASS_CONFIG: u64 = 1 << 6;
    /// VIRTIO_F_VERSION_1.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Request types (`VIRTIO_IOMMU_T_*`).
pub mod req {
    /// VIRTIO_IOMMU_T_ATTACH.
    pub const ATTACH: u8 = 1;
    /// VIRTIO_IOMMU_T_DETACH.
    pub const DETACH: u8 = 2;
    /// VIRTIO_IOMMU_T_MAP.
    pub const MAP: u8 = 3;
    /// VIRTIO_IOMMU_T_UNMAP.
    pub const UNMAP: u8 = 4;
    /// VIRTIO_IOMMU_T_PROBE.
    pub const PROBE: u8 = 5;
}

/// Request statuses (`VIRTIO_IOMMU_S_*`).
pub mod status {
    /// VIRTIO_IOMMU_S_OK.
    pub const OK: u8 = 0;
    /// VIRTIO_IOMMU_S_IOERR.
    pub const IOERR: u8 = 1;
    /// VIRTIO_IOMMU_S_UNSUPP.
    pub const UNSUPP: u8 = 2;
    /// VIRTIO_IOMMU_S_DEVERR.
    pub const DEVERR: u8 = 3;
    /// VIRTIO_IOMMU_S_INVAL.
    pub const INVAL: u8 = 4;
    /// VIRTIO_IOMMU_S_RANGE.
    pub const RANGE: u8 = 5;
    /// VIRTIO_IOMMU_S_NOENT.
    pub const NOENT: u8 = 6;
    /// VIRTIO_IOMMU_S_FAULT.
    pub const FAULT: u8 = 7;
    /// VIRTIO_IOMMU_S_NOMEM.
    pub const NOMEM: u8 = 8;
}

/// VIRTIO_IOMMU_ATTACH_F_BYPASS.
pub const ATTACH_F_BYPASS: u32 = 1;
/// VIRTIO_IOMMU_MAP_F_READ.
pub const MAP_F_READ: u32 = 1;
/// VIRTIO_IOMMU_MAP_F_WRITE.
pub const MAP_F_WRITE: u32 = 2;
/// VIRTIO_IOMMU_MAP_F_MMIO.
pub const MAP_F_MMIO: u32 = 4;
/// VIRTIO_IOMMU_PROBE_T_RESV_MEM.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// VIRTIO_IOMMU_RESV_MEM_T_RESERVED.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// VIRTIO_IOMMU_RESV_MEM_T_MSI.
pub const RESV_MEM_T_MSI: u8 = 1;
/// Fault reasons and flags of an event-queue fault record (`VIRTIO_IOMMU_FAULT_*`).
pub mod fault {
    /// VIRTIO_IOMMU_FAULT_R_DOMAIN.
    pub const R_DOMAIN: u8 = 1;
    /// VIRTIO_IOMMU_FAULT_R_MAPPING.
    pub const R_MAPPING: u8 = 2;
    /// VIRTIO_IOMMU_FAULT_F_READ.
    pub const F_READ: u32 = 1;
    /// VIRTIO_IOMMU_FAULT_F_WRITE.
    pub const F_WRITE: u32 = 2;
    /// VIRTIO_IOMMU_FAULT_F_EXEC.
    pub const F_EXEC: u32 = 4;
    /// VIRTIO_IOMMU_FAULT_F_ADDRESS.
    pub const F_ADDRESS: u32 = 0x100;
}

/// Size of a RESV_MEM property (4-byte header + 20).
pub const RESV_MEM_PROP_SIZE: usize = 24;
/// Size of the request tail.
pub const TAIL: usize = 4;
/// An UNMAP of at most this many 4 KiB pages is invalidated page by page (CMD_TLBI_NH_VA),
/// a larger one with one CMD_TLBI_NH_ASID (Linux arm-smmu-v3 switches similarly, and the
/// physical queue's per-trap window allows 16 TLBIs).
pub const TLBI_VA_MAX_PAGES: u64 = 16;

const PAGE: u64 = 4096;

/// The pages of a VM's domain tables and context descriptors: hypervisor memory, per VM.
pub trait TablePool {
    /// The translation one domain's tables allocate through (all share the pool's pages).
    type Tr: Translation<El1Attributes>;
    /// A translation for a new domain's tables.
    fn translation(&mut self) -> Self::Tr;
    /// Table pages still free: checked before every MAP against the worst case the MAP can
    /// allocate (aarch64-paging's allocate_table cannot fail, so the model never asks for
    /// more than is free).
    fn free_pages(&self) -> usize;
    /// IPA of CD slot `slot` (64-byte context descriptors in the pool's CD page(s));
    /// `max_domains` slots exist.
    fn cd_ipa(&self, slot: usize) -> u64;
    /// Writes CD slot `slot` (8 little-endian doublewords, word 0 — with V — last, after a
    /// barrier, as the SMMU may fetch it).
    fn write_cd(&mut self, slot: usize, cd: [u64; 8]);
}

/// What a VM's virtio-iommu is made of.
#[derive(Debug, Clone)]
pub struct ViommuConfig {
    /// VM name, for log lines.
    pub name: String,
    /// The VM's endpoints: `vsid` is the endpoint ID the guest uses, `psid` the physical StreamID.
    pub endpoints: Vec<StreamMap>,
    /// The VM's stage 2, as every physical STE carries it.
    pub s2: S2Config,
    /// Input (IOVA) bits, clamped to 31..=39 (root level 1 tables).
    pub input_bits: u8,
    /// Output size of stage 1 = the VM's IPA size (CD.IPS).
    pub ipa_bits: u8,
    /// Page sizes offered; the lowest set bit is the granule MAP/UNMAP are aligned to.
    pub page_size_mask: u64,
    /// Domains at once; domain IDs are `0..max_domains` (DOMAIN_RANGE), ASID = ID + 1, CD slot = ID.
    pub max_domains: usize,
    /// Mappings at once, over all domains.
    pub max_mappings: usize,
    /// PROBE RESV_MEM regions of every endpoint: (start, end inclusive, subtype).
    pub resv: Vec<(u64, u64, u8)>,
    /// Bytes of PROBE properties (0: no PROBE).
    pub probe_size: u32,
}

/// The device-writable part of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// What to write at the start of the writable part (at most its length), the tail last.
    pub bytes: Vec<u8>,
    /// The used length to put in the used ring.
    pub used_len: u32,
}

impl Reply {
    fn none() -> Self {
        Self {
            bytes: Vec::new(),
            used_len: 0,
        }
    }

    /// The status in the tail, if one was written.
    pub fn status(&self) -> Option<u8> {
        self.bytes.len().checked_sub(TAIL).map(|i| self.bytes[i])
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ViommuStats {
    /// Requests by type: ATTACH, DETACH, MAP, UNMAP, PROBE, and others (index 0).
    pub requests: [u64; 6],
    /// Replies by status (index = status code).
    pub statuses: [u64; 9],
    /// Physical CMD_SYNCs.
    pub phys_syncs: u64,
    /// Physical TLBIs.
    pub tlbis: u64,
    /// Physical STE writes.
    pub ste_writes: u64,
    /// Physical operations that failed (the device then needs a reset).
    pub phys_errors: u64,
    /// Domains live.
    pub domains: usize,
    /// Mappings live.
    pub mappings: usize,
    /// Table pages in use (walked).
    pub table_pages: usize,
    /// Fault records made.
    pub faults: u64,
}

/// One guest mapping: `(virt_end, phys, flags)` keyed by virt_start.
type Mappings = BTreeMap<u64, (u64, u64, u32)>;

struct Domain<T: Translation<El1Attributes>> {
    /// None for a bypass domain.
    tables: Option<Tables<T>>,
    mappings: Mappings,
    endpoints: usize,
}

impl<T: Translation<El1Attributes>> Domain<T> {
    fn bypass(&self) -> bool {
        self.tables.is_none()
    }
}

impl<T: Translation<El1Attributes>> core::fmt::Debug for Domain<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Domain")
            .field("tables", &self.tables)
            .field("mappings", &self.mappings.len())
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// One VM's virtio-iommu model.
pub struct Viommu<P: TablePool> {
    cfg: ViommuConfig,
    pool: P,
    driver_features: u64,
    bypass: u8,
    domains: BTreeMap<u32, Domain<P::Tr>>,
    /// Per endpoint (index into `cfg.endpoints`): the domain it is attached to.
    attached: Vec<Option<u32>>,
    /// The physical STE last written per endpoint.
    stes: Vec<Option<Ste>>,
    mappings: usize,
    needs_reset: bool,
    stats: ViommuStats,
}

impl<P: TablePool> core::fmt::Debug for Viommu<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Viommu")
            .field("name", &self.cfg.name)
            .field("bypass", &self.bypass)
            .field("domains", &self.domains)
            .field("attached", &self.attached)
            .finish()
    }
}

/// A physical operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("physical SMMU: {0}")]
struct PhysError(DriverError);

impl From<DriverError> for PhysError {
    fn from(e: DriverError) -> Self {
        Self(e)
    }
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Readable and writable sizes each request type needs (notes A3).
fn layout(ty: u8, probe_size: u32) -> Option<(usize, usize)> {
    Some(match ty {
        req::ATTACH | req::DETACH => (20, TAIL),
        req::MAP => (36, TAIL),
        req::UNMAP => (28, TAIL),
        req::PROBE => (72, probe_size as usize + TAIL),
        _ => return None,
    })
}

impl<P: TablePool> Viommu<P> {
    /// A device for `cfg` over `pool`. It touches no hardware: call [`Viommu::vm_reset`] once
    /// before the VM runs, which writes every endpoint's physical STE.
    pub fn new(mut cfg: ViommuConfig, pool: P) -> Self {
        cfg.input_bits = cfg
            .input_bits
            .clamp(tables::MIN_INPUT_BITS, tables::MAX_INPUT_BITS);
        if cfg.page_size_mask & (PAGE - 1) != 0 || cfg.page_size_mask == 0 {
            // The tables have a 4 KiB granule: smaller pages cannot be offered.
            cfg.page_size_mask = (cfg.page_size_mask & !(PAGE - 1)) | PAGE;
        }
        // ASIDs are 16 bits and ASID = domain ID + 1.
        cfg.max_domains = cfg.max_domains.min(usize::from(u16::MAX));
        let n = cfg.endpoints.len();
        Self {
            cfg,
            pool,
            driver_features: 0,
            bypass: 1,
            domains: BTreeMap::new(),
            attached: vec![None; n],
            stes: vec![None; n],
            mappings: 0,
            needs_reset: false,
            stats: ViommuStats::default(),
        }
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &ViommuConfig {
        &self.cfg
    }

    /// The table pool.
    pub fn pool(&self) -> &P {
        &self.pool
    }

    /// The table pool, mutably (the glue's accounting; tests' free-page count).
    pub fn pool_mut(&mut self) -> &mut P {
        &mut self.pool
    }

    /// Feature bits offered: VERSION_1, INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP, PROBE (when
    /// `probe_size` is non-zero), BYPASS_CONFIG. Never F_BYPASS (the spec says new devices
    /// should not offer it with BYPASS_CONFIG), and F_MMIO: without it a Linux that gets no MSI
    /// region from PROBE (a VM without a vITS) cannot map its doorbell (`viommu_map_pages`
    /// refuses IOMMU_MMIO), and MSIs would fall back to INTx.
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

    /// The features the driver accepted (FEATURES_OK); bits not offered are dropped.
    pub fn set_driver_features(&mut self, f: u64) {
        self.driver_features = f & self.device_features();
    }

    /// The negotiated features.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn negotiated(&self, f: u64) -> bool {
        self.driver_features & f != 0
    }

    /// The `bypass` config byte.
    pub fn bypass(&self) -> u8 {
        self.bypass
    }

    /// A physical operation failed: the glue should set DEVICE_NEEDS_RESET (0x40) in Status.
    /// Cleared by [`Viommu::reset`].
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn config_bytes(&self) -> [u8; 40] {
        let mut c = [0; 40];
        c[0..8].copy_from_slice(&self.cfg.page_size_mask.to_le_bytes());
        c[8..16].copy_from_slice(&0u64.to_le_bytes());
        let end = (1u64 << self.cfg.input_bits) - 1;
        c[16..24].copy_from_slice(&end.to_le_bytes());
        c[24..28].copy_from_slice(&0u32.to_le_bytes());
        let dend = (self.cfg.max_domains.max(1) - 1) as u32;
        c[28..32].copy_from_slice(&dend.to_le_bytes());
        c[32..36].copy_from_slice(&self.cfg.probe_size.to_le_bytes());
        c[36] = self.bypass;
        c
    }

    /// Reads `size` (1, 2 or 4) bytes of the config space at `off` (notes A2): page_size_mask,
    /// input_range [0, 2^input_bits - 1], domain_range [0, max_domains - 1], probe_size,
    /// bypass. Outside it, or misaligned: 0.
    pub fn config_read(&self, off: u64, size: u8) -> u32 {
        let c = self.config_bytes();
        let n = usize::from(size);
        if !matches!(size, 1 | 2 | 4)
            || !off.is_multiple_of(u64::from(size))
            || off + u64::from(size) > 40
        {
            return 0;
        }
        let o = off as usize;
        let mut v = 0u32;
        for (i, b) in c[o..o + n].iter().enumerate() {
            v |= u32::from(*b) << (8 * i);
        }
        v
    }

    /// Writes the config space: only the `bypass` byte (offset 0x24, byte or word write), only
    /// with BYPASS_CONFIG negotiated, only 0 or 1 (anything else is ignored). A change applies
    /// at once to every unattached endpoint's physical STE.
    pub fn config_write(&mut self, off: u64, size: u8, value: u32, phys: &mut impl PhysicalSmmu) {
        if off != 0x24 || !matches!(size, 1 | 2 | 4) || !self.negotiated(feature::BYPASS_CONFIG) {
            return;
        }
        let v = value & 0xff;
        if v > 1 || v == u32::from(self.bypass) {
            return;
        }
        self.bypass = v as u8;
        for i in 0..self.cfg.endpoints.len() {
            if self.attached[i].is_none() {
                let ste = self.unattached_ste();
                if self.set_ste(i, ste, phys).is_err() {
                    self.needs_reset = true;
                }
            }
        }
    }

    /// Device reset (Status 0): every endpoint detached (stage 2 or abort per `bypass`, which
    /// is kept), every domain freed after one TLBI_NH_ALL of the VMID and its CMD_SYNC,
    /// negotiated features cleared.
    pub fn reset(&mut self, phys: &mut impl PhysicalSmmu) {
        self.driver_features = 0;
        if core::mem::take(&mut self.needs_reset) {
            // After a failed physical operation the STEs in force are unknown: write them all.
            self.stes.iter_mut().for_each(|s| *s = None);
        }
        let ste = self.unattached_ste();
        for i in 0..self.cfg.endpoints.len() {
            self.attached[i] = None;
            if self.set_ste(i, ste, phys).is_err() {
                self.needs_reset = true;
            }
        }
        let vmid = self.cfg.s2.vmid;
        if self.sync(&[Command::TlbiNhAll { vmid }], phys).is_err() {
            self.needs_reset = true;
        }
        self.stats.tlbis += 1;
        // Only now, with no STE pointing at them and the TLBs and walk caches clean, do the
        // table pages go back to the pool.
        let slots: Vec<u32> = self.domains.keys().copied().collect();
        for id in slots {
            if self.domains.get(&id).is_some_and(|d| !d.bypass()) {
                self.pool.write_cd(id as usize, [0; 8]);
            }
        }
        self.domains.clear();
        self.mappings = 0;
    }

    /// VM reset: `bypass` back to 1 (the spec's "restored on system reset"), then a device
    /// reset, whose TLBI_NH_ALL also drops what an earlier life of the VM left.
    pub fn vm_reset(&mut self, phys: &mut impl PhysicalSmmu) {
        self.bypass = 1;
        // Unknown after a VM reset: write every STE again.
        self.stes.iter_mut().for_each(|s| *s = None);
        self.reset(phys);
    }

    /// Every endpoint aborting: `bypass` 0 (unattached endpoints abort), then a device reset,
    /// which detaches them all, frees every domain and drops the VMID's TLB entries.
    pub fn abort_streams(&mut self, phys: &mut impl PhysicalSmmu) {
        self.bypass = 0;
        self.reset(phys);
    }

    /// The physical STE last written for each endpoint (psid, STE).
    pub fn physical_stes(&self) -> impl Iterator<Item = (u32, Ste)> + '_ {
        self.cfg
            .endpoints
            .iter()
            .zip(&self.stes)
            .filter_map(|(m, s)| s.map(|s| (m.psid, s)))
    }

    /// A domain's tables' translation (tests read the table image from it).
    pub fn domain_translation(&self, domain: u32) -> Option<&P::Tr> {
        self.domains
            .get(&domain)?
            .tables
            .as_ref()
            .map(Tables::translation)
    }

    /// IPA of a domain's root table.
    pub fn domain_root(&self, domain: u32) -> Option<u64> {
        self.domains.get(&domain)?.tables.as_ref().map(Tables::root)
    }

    /// The live domains' IDs.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn domain_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.domains.keys().copied()
    }

    /// A domain's mappings as the model recorded them: (virt_start, virt_end, phys, flags).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn domain_mappings(&self, domain: u32) -> Vec<(u64, u64, u64, u32)> {
        self.domains.get(&domain).map_or(Vec::new(), |d| {
            d.mappings
                .iter()
                .map(|(&s, &(e, p, f))| (s, e, p, f))
                .collect()
        })
    }

    /// A domain's valid leaves ([`tables::Tables::leaves`]); none for a bypass domain.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn domain_leaves(&self, domain: u32, f: &mut dyn FnMut(u64, u64, u64, El1Attributes)) {
        if let Some(t) = self.domains.get(&domain).and_then(|d| d.tables.as_ref()) {
            t.leaves(f);
        }
    }

    /// The domain endpoint `vsid` is attached to.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn attached_domain(&self, vsid: u32) -> Option<u32> {
        self.attached[self.endpoint(vsid)?]
    }

    /// Table pages in use by every domain (walks them all: for stats and tests).
    pub fn table_pages(&self) -> usize {
        self.domains
            .values()
            .filter_map(|d| d.tables.as_ref())
            .map(Tables::pages)
            .sum()
    }

    /// Counters.
    pub fn stats(&self) -> ViommuStats {
        let mut s = self.stats;
        s.domains = self.domains.len();
        s.mappings = self.mappings;
        s.table_pages = self.table_pages();
        s
    }

    /// The 24-byte fault record (virtio 1.2 5.13.6.9) for a physical event of one of the VM's
    /// streams: MAPPING (with ADDRESS and the IOVA) for a stage-1 translation, access-flag,
    /// address-size or permission fault, DOMAIN for a stream- or CD-level fault. None for
    /// stage-2 faults (the hypervisor's), other kinds, and streams not the VM's.
    pub fn fault_record(&mut self, psid: u32, e: &Event) -> Option<[u8; 24]> {
        let ep = self.cfg.endpoints.iter().find(|m| m.psid == psid)?.vsid;
        if e.s2 {
            return None;
        }
        let (reason, address) = match e.kind {
            EventKind::FTranslation
            | EventKind::FAccess
            | EventKind::FAddrSize
            | EventKind::FPermission => (fault::R_MAPPING, true),
            EventKind::CBadCd
            | EventKind::FCdFetch
            | EventKind::CBadSte
            | EventKind::FStreamDisabled
            | EventKind::FTranslForbidden
            | EventKind::CBadSubstreamid => (fault::R_DOMAIN, false),
            _ => return None,
        };
        let mut flags = if e.rnw { fault::F_READ } else { fault::F_WRITE };
        if e.ind {
            flags |= fault::F_EXEC;
        }
        if address {
            flags |= fault::F_ADDRESS;
        }
        let mut r = [0; 24];
        r[0] = reason;
        r[4..8].copy_from_slice(&flags.to_le_bytes());
        r[8..12].copy_from_slice(&ep.to_le_bytes());
        if address {
            r[16..24].copy_from_slice(&e.input_addr.to_le_bytes());
        }
        self.stats.faults += 1;
        Some(r)
    }

    /// Performs one request: `req` is its device-readable part, `writable_len` the size of its
    /// device-writable part. The tail goes where the type's layout puts it, after the
    /// properties for PROBE (or at the end of a shorter writable part). An unknown type, a
    /// readable part without a type, or a writable part with no room for the tail: nothing
    /// written, used length 0. A readable part shorter than the type needs: S_INVAL.
    pub fn request(
        &mut self,
        req: &[u8],
        writable_len: usize,
        phys: &mut impl PhysicalSmmu,
    ) -> Reply {
        let Some(&ty) = req.first() else {
            self.stats.requests[0] += 1;
            return Reply::none();
        };
        let Some((rlen, wlen)) = layout(ty, self.cfg.probe_size) else {
            self.stats.requests[0] += 1;
            return Reply::none();
        };
        self.stats.requests[usize::from(ty)] += 1;
        if writable_len < TAIL {
            return Reply::none();
        }
        let short = writable_len < wlen;
        let wlen = wlen.min(writable_len);
        let mut bytes = vec![0; wlen];
        let st = if req.len() < rlen || short {
            status::INVAL
        } else {
            match ty {
                req::ATTACH => self.attach(req, phys),
                req::DETACH => self.detach(req, phys),
                req::MAP => self.map(req),
                req::UNMAP => self.unmap(req, phys),
                _ => self.probe(req, &mut bytes[..wlen - TAIL]),
            }
        };
        self.stats.statuses[usize::from(st)] += 1;
        bytes[wlen - TAIL] = st;
        Reply {
            bytes,
            used_len: wlen as u32,
        }
    }

    /// The MSI regions PROBE reports (at most one, as the spec allows per endpoint; the same
    /// for every endpoint), page aligned: what each translating domain maps 1:1.
    fn msi_regions(&self) -> Vec<(u64, u64)> {
        let g = self.granule();
        self.cfg
            .resv
            .iter()
            .filter(|r| r.2 == RESV_MEM_T_MSI)
            .take(1)
            .map(|&(rs, re, _)| (rs - rs % g, re | (g - 1)))
            .filter(|&(_, re)| re >> self.cfg.input_bits == 0)
            .collect()
    }

    fn endpoint(&self, id: u32) -> Option<usize> {
        self.cfg.endpoints.iter().position(|m| m.vsid == id)
    }

    fn unattached_ste(&self) -> Ste {
        if self.bypass == 1 {
            Ste::stage2(self.cfg.s2)
        } else {
            Ste::abort()
        }
    }

    fn domain_ste(&self, id: u32) -> Ste {
        match self.domains.get(&id) {
            Some(d) if !d.bypass() => Ste::nested(
                S1Fields {
                    context_ptr: self.pool.cd_ipa(id as usize),
                    fmt: 0,
                    cdmax: 0,
                    dss: 0,
                    cir: cache::WBRA,
                    cor: cache::WBRA,
                    csh: share::ISH,
                },
                self.cfg.s2,
            ),
            Some(_) => Ste::stage2(self.cfg.s2),
            None => self.unattached_ste(),
        }
    }

    /// Queues `cmds` and a CMD_SYNC and waits for it.
    fn sync(&mut self, cmds: &[Command], phys: &mut impl PhysicalSmmu) -> Result<(), PhysError> {
        self.stats.phys_syncs += 1;
        let r = phys.submit_sync(cmds).and_then(|t| phys.wait(t));
        if r.is_err() {
            self.stats.phys_errors += 1;
        }
        Ok(r?)
    }

    /// Writes endpoint `i`'s physical STE and waits until it is in force (break-before-make
    /// when the driver needs it). A nested STE's CD is invalidated with it: the CD slot may
    /// hold a new domain's CD since this stream last used it.
    fn set_ste(
        &mut self,
        i: usize,
        ste: Ste,
        phys: &mut impl PhysicalSmmu,
    ) -> Result<(), PhysError> {
        if self.stes[i] == Some(ste) {
            return Ok(());
        }
        let psid = self.cfg.endpoints[i].psid;
        self.stes[i] = Some(ste);
        self.stats.ste_writes += 1;
        let nested = ste.config() == smmu::ste::StreamConfig::Nested;
        let cfgi_cd = Command::CfgiCd {
            sid: psid,
            ssid: 0,
            leaf: true,
        };
        let w = phys.write_ste(psid, ste).inspect_err(|_| {
            self.stats.phys_errors += 1;
        })?;
        match w {
            SteWrite::Unchanged => {
                if nested {
                    self.sync(&[cfgi_cd], phys)?;
                }
            }
            SteWrite::Written(c) => {
                if nested {
                    self.sync(&[c, cfgi_cd], phys)?;
                } else {
                    self.sync(&[c], phys)?;
                }
            }
            SteWrite::Broken(b) => {
                self.sync(&[b.cfgi], phys)?;
                let c = phys.make_ste(b).inspect_err(|_| {
                    self.stats.phys_errors += 1;
                })?;
                if nested {
                    self.sync(&[c, cfgi_cd], phys)?;
                } else {
                    self.sync(&[c], phys)?;
                }
            }
        }
        Ok(())
    }

    /// Frees domain `id` (no endpoint left): its ASID invalidated (walk caches included) and
    /// synced before its table pages go back to the pool and its CD slot and ASID can be reused.
    fn free_domain(&mut self, id: u32, phys: &mut impl PhysicalSmmu) -> Result<(), PhysError> {
        let Some(d) = self.domains.get(&id) else {
            return Ok(());
        };
        let r = if d.bypass() {
            Ok(())
        } else {
            self.stats.tlbis += 1;
            let c = Command::TlbiNhAsid {
                vmid: self.cfg.s2.vmid,
                asid: asid(id),
            };
            let r = self.sync(&[c], phys);
            self.pool.write_cd(id as usize, [0; 8]);
            r
        };
        if let Some(d) = self.domains.remove(&id) {
            self.mappings -= d.mappings.len();
        }
        r
    }

    fn phys_status(&mut self, r: Result<(), PhysError>) -> u8 {
        match r {
            Ok(()) => status::OK,
            Err(e) => {
                log::error!("viommu: {}: {e}", self.cfg.name);
                self.needs_reset = true;
                status::IOERR
            }
        }
    }

    fn attach(&mut self, r: &[u8], phys: &mut impl PhysicalSmmu) -> u8 {
        let (id, ep, flags, reserved) = (le32(r, 4), le32(r, 8), le32(r, 12), le32(r, 16));
        let known = if self.negotiated(feature::BYPASS_CONFIG) {
            ATTACH_F_BYPASS
        } else {
            0
        };
        if reserved != 0 || flags & !known != 0 {
            return status::INVAL;
        }
        let Some(i) = self.endpoint(ep) else {
            return status::NOENT;
        };
        if id as usize >= self.cfg.max_domains {
            // Outside domain_range.
            return status::RANGE;
        }
        let want_bypass = flags & ATTACH_F_BYPASS != 0;
        match self.domains.get(&id) {
            Some(d) if d.bypass() != want_bypass => return status::INVAL,
            Some(_) if self.attached[i] == Some(id) => return status::OK,
            Some(_) => {}
            None => {
                let tables = if want_bypass {
                    None
                } else {
                    // The root, and the tables of the MSI doorbells every translating domain
                    // passes 1:1 (the PROBE's RESV_MEM_T_MSI regions, which Linux then neither
                    // maps nor lets its IOVA allocator hand out).
                    let msi = self.msi_regions();
                    let need = 1 + msi
                        .iter()
                        .map(|&(rs, re)| worst_case_tables(rs, re, rs))
                        .sum::<usize>();
                    if self.pool.free_pages() < need {
                        return status::NOMEM;
                    }
                    let mut t = Tables::new(self.pool.translation(), asid(id));
                    for &(rs, re) in &msi {
                        if t.map(rs, re, rs, true, true).is_err() {
                            return status::NOMEM;
                        }
                    }
                    // The CD is in memory before any STE points at it.
                    let cd = context_descriptor(
                        self.cfg.input_bits,
                        self.cfg.ipa_bits,
                        asid(id),
                        t.root(),
                    );
                    self.pool.write_cd(id as usize, cd);
                    Some(t)
                };
                self.domains.insert(
                    id,
                    Domain {
                        tables,
                        mappings: BTreeMap::new(),
                        endpoints: 0,
                    },
                );
            }
        }
        // A move is DETACH then ATTACH: the STE goes straight to the new domain.
        let old = self.attached[i].replace(id);
        if let Some(d) = self.domains.get_mut(&id) {
            d.endpoints += 1;
        }
        let ste = self.domain_ste(id);
        let mut res = self.set_ste(i, ste, phys);
        if let Some(o) = old {
            let empty = self.domains.get_mut(&o).is_some_and(|d| {
                d.endpoints -= 1;
                d.endpoints == 0
            });
            if empty {
                res = res.and(self.free_domain(o, phys));
            }
        }
        self.phys_status(res)
    }

    fn detach(&mut self, r: &[u8], phys: &mut impl PhysicalSmmu) -> u8 {
        let (id, ep, reserved) = (le32(r, 4), le32(r, 8), le64(r, 12));
        if reserved != 0 {
            return status::INVAL;
        }
        let Some(i) = self.endpoint(ep) else {
            return status::NOENT;
        };
        if self.attached[i] != Some(id) {
            return status::INVAL;
        }
        self.attached[i] = None;
        let ste = self.unattached_ste();
        let mut res = self.set_ste(i, ste, phys);
        let empty = self.domains.get_mut(&id).is_some_and(|d| {
            d.endpoints -= 1;
            d.endpoints == 0
        });
        if empty {
            res = res.and(self.free_domain(id, phys));
        }
        self.phys_status(res)
    }

    fn granule(&self) -> u64 {
        1 << self.cfg.page_size_mask.trailing_zeros()
    }

    fn map(&mut self, r: &[u8]) -> u8 {
        let (id, s, e, p, flags) = (
            le32(r, 4),
            le64(r, 8),
            le64(r, 16),
            le64(r, 24),
            le32(r, 32),
        );
        let Some(d) = self.domains.get(&id) else {
            return status::NOENT;
        };
        if d.bypass() {
            return status::INVAL;
        }
        // MMIO only with F_MMIO negotiated.
        let mmio = if self.negotiated(feature::MMIO) {
            MAP_F_MMIO
        } else {
            0
        };
        if flags & !(MAP_F_READ | MAP_F_WRITE | mmio) != 0 {
            return status::INVAL;
        }
        if e < s {
            return status::INVAL;
        }
        let g = self.granule();
        if s % g != 0 || p % g != 0 || e.wrapping_add(1) % g != 0 {
            return status::RANGE;
        }
        if e >> self.cfg.input_bits != 0 {
            return status::RANGE;
        }
        // The output must fit the IPA space (CD.IPS); what it reaches there is stage 2's to say.
        match p.checked_add(e - s) {
            Some(pe) if self.cfg.ipa_bits >= 64 || pe >> self.cfg.ipa_bits == 0 => {}
            _ => return status::RANGE,
        }
        if overlaps(&d.mappings, s, e) {
            return status::INVAL;
        }
        if self.cfg.resv.iter().any(|&(rs, re, _)| rs <= e && s <= re) {
            return status::INVAL;
        }
        if self.mappings >= self.cfg.max_mappings {
            return status::NOMEM;
        }
        let present = flags & (MAP_F_READ | MAP_F_WRITE) != 0;
        if present {
            // Every UNMAP frees the subtables it empties, so what is free is all there is.
            if worst_case_tables(s, e, p) > self.pool.free_pages() {
                return status::NOMEM;
            }
        }
        let Some(d) = self.domains.get_mut(&id) else {
            return status::NOENT;
        };
        if present {
            if let Some(t) = d.tables.as_mut() {
                // Write-only is widened to read/write: stage-1 APs cannot express it, and the
                // spec allows reads then (notes A4, MAP).
                let (write, mmio) = (flags & MAP_F_WRITE != 0, flags & MAP_F_MMIO != 0);
                if let Err(err) = t.map(s, e, p, write, mmio) {
                    log::error!("viommu: {}: map {s:#x}-{e:#x}: {err}", self.cfg.name);
                    self.needs_reset = true;
                    return status::DEVERR;
                }
            }
        }
        // A mapping with neither READ nor WRITE is recorded (it overlaps, it can be unmapped)
        // but maps nothing. New entries replace invalid ones only, so no TLB work.
        d.mappings.insert(s, (e, p, flags));
        self.mappings += 1;
        status::OK
    }

    fn unmap(&mut self, r: &[u8], phys: &mut impl PhysicalSmmu) -> u8 {
        let (id, s, e, reserved) = (le32(r, 4), le64(r, 8), le64(r, 16), le32(r, 24));
        let Some(d) = self.domains.get_mut(&id) else {
            return status::NOENT;
        };
        if d.bypass() || reserved != 0 || e < s {
            return status::INVAL;
        }
        // A mapping only partly inside would be split: RANGE, and nothing removed.
        let mut inside = Vec::new();
        for (&ms, &(me, _, flags)) in d.mappings.range(..=e).rev() {
            if me < s {
                break;
            }
            if ms < s || me > e {
                return status::RANGE;
            }
            inside.push((ms, me, flags));
        }
        let mut pages = 0u64;
        let mut ranges = Vec::new();
        for &(ms, me, flags) in &inside {
            d.mappings.remove(&ms);
            if flags & (MAP_F_READ | MAP_F_WRITE) != 0 {
                if let Some(t) = d.tables.as_mut() {
                    if t.unmap(ms, me).is_err() {
                        self.needs_reset = true;
                    }
                }
                pages = pages.saturating_add((me - ms) / PAGE + 1);
                ranges.push((ms, me));
            }
        }
        self.mappings -= inside.len();
        if pages == 0 {
            return status::OK;
        }
        // Free the subtables this UNMAP emptied (every earlier one was freed by its own UNMAP,
        // so each freed table lies in a range unmapped here and the TLBIs below, non-leaf,
        // drop the walk-cache entries pointing at it). The pages are back in the pool before
        // the CMD_SYNC completes, but nothing allocates before this request's wait. Cost: one
        // pass over the domain's table pages.
        if let Some(t) = d.tables.as_mut() {
            t.compact();
        }
        let vmid = self.cfg.s2.vmid;
        let asid = asid(id);
        let cmds: Vec<Command> = if pages <= TLBI_VA_MAX_PAGES {
            // Leaf = 0: subtables the unmap freed must leave the walk caches too.
            ranges
                .iter()
                .flat_map(|&(ms, me)| (ms..=me).step_by(PAGE as usize))
                .map(|va| Command::TlbiNhVa {
                    vmid,
                    asid,
                    addr: TlbiAddr::single(va, false),
                })
                .collect()
        } else {
            vec![Command::TlbiNhAsid { vmid, asid }]
        };
        self.stats.tlbis += cmds.len() as u64;
        let res = self.sync(&cmds, phys);
        self.phys_status(res)
    }

    fn probe(&mut self, r: &[u8], props: &mut [u8]) -> u8 {
        let ep = le32(r, 4);
        if r[8..72].iter().any(|&b| b != 0) {
            return status::INVAL;
        }
        if !self.negotiated(feature::PROBE) {
            return status::UNSUPP;
        }
        if self.endpoint(ep).is_none() {
            return status::NOENT;
        }
        let mut off = 0;
        let mut msi = false;
        for &(start, end, sub) in &self.cfg.resv {
            // At most one MSI region per endpoint (spec); a second one is dropped.
            if sub == RESV_MEM_T_MSI && core::mem::replace(&mut msi, true) {
                continue;
            }
            let Some(p) = props.get_mut(off..off + RESV_MEM_PROP_SIZE) else {
                break;
            };
            p[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
            p[2..4].copy_from_slice(&((RESV_MEM_PROP_SIZE - 4) as u16).to_le_bytes());
            p[4] = sub;
            p[8..16].copy_from_slice(&start.to_le_bytes());
            p[16..24].copy_from_slice(&end.to_le_bytes());
            off += RESV_MEM_PROP_SIZE;
        }
        status::OK
    }
}

/// The ASID of domain `id`: IDs are below `max_domains`, ASIDs 1..=max_domains (ASID 0 is left
/// unused; the VMID already separates VMs).
fn asid(id: u32) -> u16 {
    (id + 1) as u16
}

fn overlaps(m: &Mappings, s: u64, e: u64) -> bool {
    m.range(..=e)
        .next_back()
        .is_some_and(|(_, &(me, _, _))| me >= s)
}

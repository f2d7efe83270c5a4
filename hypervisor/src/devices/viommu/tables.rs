//! One translating domain's stage-1 tables and its context descriptor: what the physical SMMU
//! walks for an endpoint attached to it, nested under the VM's stage 2 (so every output
//! address here is an IPA).

use aarch64_paging::descriptor::{El1Attributes, PhysicalAddress};
use aarch64_paging::paging::{Constraints, El1And0, MemoryRegion, Translation, VaRange};
use aarch64_paging::{MapError, Mapping};

/// Root level of every domain's tables: level 1 with the 4 KiB granule covers 39 input bits,
/// and the SMMU starts its walk at level 1 for T0SZ 25..=33 (IHI 0070 5.4, CD.T0SZ; Arm ARM
/// D8.2 "translation table walk starting level").
pub const ROOT_LEVEL: usize = 1;
/// Input address bits the tables can take at most (root level 1, 4 KiB granule).
pub const MAX_INPUT_BITS: u8 = 39;
/// Fewest input bits for which the walk still starts at level 1 (T0SZ = 33).
pub const MIN_INPUT_BITS: u8 = 31;

const SZ_2M: u64 = 1 << 21;
const SZ_1G: u64 = 1 << 30;

/// MAIR0 of every CD: Attr0 = 0xff Normal inner/outer write-back read/write-allocate (what
/// mappings use, through AttrIndx 0), Attr1 = 0x04 Device-nGnRE (the MSI doorbell every
/// translating domain passes 1:1, and MAP_F_MMIO mappings).
pub const MAIR0: u64 = 0x04_ff;

/// The leaf attributes of a mapping (Arm ARM D8.3 stage-1 descriptors): valid, access flag set
/// (the SMMU need not manage AF: CD.HA = 0), inner shareable, non-global (tagged with the
/// domain's ASID), AP\[1\] = 1 (PCIe transactions without PASID are unprivileged; Linux
/// io-pgtable-arm sets ARM_LPAE_PTE_AP_UNPRIV likewise), never executable, AttrIndx 0 (Normal)
/// or, for `mmio`, 1 (Device-nGnRE); AP\[2\] (READ_ONLY) unless `write`.
pub fn leaf_attributes(write: bool, mmio: bool) -> El1Attributes {
    let mut a = El1Attributes::VALID
        | El1Attributes::ACCESSED
        | El1Attributes::INNER_SHAREABLE
        | El1Attributes::NON_GLOBAL
        | El1Attributes::USER
        | El1Attributes::UXN
        | El1Attributes::PXN;
    a |= if mmio {
        El1Attributes::ATTRIBUTE_INDEX_1
    } else {
        El1Attributes::ATTRIBUTE_INDEX_0
    };
    if !write {
        a |= El1Attributes::READ_ONLY;
    }
    a
}

/// CD.IPS for an output (IPA) size: the largest encoding not above it (IHI 0070 5.4, CD.IPS,
/// same encoding as TCR_EL1.IPS).
pub fn ips(ipa_bits: u8) -> u64 {
    match ipa_bits {
        0..=35 => 0,
        36..=39 => 1,
        40..=41 => 2,
        42..=43 => 3,
        44..=47 => 4,
        _ => 5,
    }
}

/// The 64-byte context descriptor of a domain (IHI 0070 5.4; Linux `arm_smmu_make_s1_cd`,
/// `CTXDESC_CD_0_*`): AArch64 tables with TTB0 only, 4 KiB granule, write-back inner-shareable
/// walks, faults recorded (R) and aborted (A, no stall), ASET = 1 (the ASID is not shared with
/// any CPU, so broadcast TLBIs need not match it).
pub fn context_descriptor(input_bits: u8, ipa_bits: u8, asid: u16, ttb0: u64) -> [u64; 8] {
    let t0sz = u64::from(64 - input_bits);
    let w0 = t0sz // TG0 [7:6]: 4 KiB
        | 1 << 8 // IRGN0 [9:8]: write-back read/write-allocate
        | 1 << 10 // ORGN0 [11:10]
        | 3 << 12 // SH0 [13:12]: inner shareable
        | 1 << 30 // EPD1: no TTB1 walks
        | 1 << 31 // V
        | ips(ipa_bits) << 32 // IPS [34:32]
        | 1 << 41 // AA64
        | 1 << 45 // R: record faults
        | 1 << 46 // A: abort (never stall)
        | 1 << 47 // ASET
        | u64::from(asid) << 48; // ASID [63:48]
    let w1 = ttb0 & 0x000f_ffff_ffff_fff0; // TTB0 [51:4]
    [w0, w1, 0, MAIR0, 0, 0, 0, 0]
}

/// Worst-case number of table pages a MAP of `[s, e]` onto `p` allocates in tables that have
/// only their root: an L3 table for each 2 MiB chunk the range touches that cannot be a block
/// (every chunk when IOVA and IPA differ modulo 2 MiB, else at most the two partial ends), and
/// likewise an L2 table for each 1 GiB chunk. This refines `(len >> 21) + 2` / `(len >> 30) + 2`
/// so that the huge identity MAPs Linux sends without BYPASS_CONFIG stay cheap.
pub fn worst_case_tables(s: u64, e: u64, p: u64) -> usize {
    let chunks = |g: u64| ((e / g) - (s / g) + 1) as usize;
    let partial = |g: u64| {
        let first = !s.is_multiple_of(g);
        let last = !(e + 1).is_multiple_of(g);
        if chunks(g) == 1 {
            usize::from(first || last)
        } else {
            usize::from(first) + usize::from(last)
        }
    };
    let l3 = if (s ^ p).is_multiple_of(SZ_2M) {
        partial(SZ_2M)
    } else {
        chunks(SZ_2M)
    };
    let l2 = if (s ^ p).is_multiple_of(SZ_1G) {
        // Any L3 table lies in a partial 1 GiB chunk then.
        partial(SZ_1G)
    } else {
        chunks(SZ_1G)
    };
    l3 + l2
}

/// A domain's tables.
pub struct Tables<T: Translation<El1Attributes>> {
    map: Mapping<T, El1And0>,
    size: u64,
}

impl<T: Translation<El1Attributes>> core::fmt::Debug for Tables<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tables")
            .field("root", &self.root())
            .finish()
    }
}

impl<T: Translation<El1Attributes>> Tables<T> {
    /// Allocates the root table (one page). The tables are never marked active: the crate's
    /// own TLB maintenance is for a CPU's TTBR, the SMMU's is the model's.
    pub fn new(tr: T, asid: u16) -> Self {
        let map =
            Mapping::with_asid_and_va_range(tr, asid.into(), ROOT_LEVEL, El1And0, VaRange::Lower);
        let size = map.size() as u64;
        Self { map, size }
    }

    /// IPA of the root table (CD.TTB0).
    pub fn root(&self) -> u64 {
        self.map.root_address().0 as u64
    }

    /// The translation the tables allocate through (tests read the table image from it).
    pub fn translation(&self) -> &T {
        self.map.translation()
    }

    /// Maps `[s, e]` (page aligned, inside the input range) onto `p` with blocks where aligned,
    /// as Device memory if `mmio`.
    pub fn map(&mut self, s: u64, e: u64, p: u64, write: bool, mmio: bool) -> Result<(), MapError> {
        let r = MemoryRegion::new(s as usize, (e + 1) as usize);
        self.map.map_range(
            &r,
            PhysicalAddress(p as usize),
            leaf_attributes(write, mmio),
            Constraints::empty(),
        )
    }

    /// Invalidates `[s, e]`, exactly a range [`Tables::map`] mapped, so no table is split or
    /// allocated; subtables it covers whole are freed (the caller invalidates the SMMU's TLB
    /// and walk caches before any page is allocated again).
    pub fn unmap(&mut self, s: u64, e: u64) -> Result<(), MapError> {
        let r = MemoryRegion::new(s as usize, (e + 1) as usize);
        self.map.map_range(
            &r,
            PhysicalAddress(0),
            El1Attributes::empty(),
            Constraints::empty(),
        )
    }

    /// Frees every subtable left with only invalid entries (the caller then invalidates the
    /// domain's ASID, walk caches included, before any page is allocated again).
    pub fn compact(&mut self) {
        self.map.compact_subtables();
    }

    /// Every valid leaf (block or page): `f(iova, bytes, output IPA, attributes)`, in IOVA
    /// order (the fuzz harness checks them against the mappings the model validated).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn leaves(&self, f: &mut dyn FnMut(u64, u64, u64, El1Attributes)) {
        let r = MemoryRegion::new(0, self.size as usize);
        let _ = self.map.walk_range(&r, &mut |mr, d, _| {
            if d.is_valid() {
                let (s, e) = (mr.start().0 as u64, mr.end().0 as u64);
                f(s, e - s, d.output_address().0 as u64, d.flags());
            }
            Ok(())
        });
    }

    /// Table pages in use (root included), counted by walking the tables: every descriptor the
    /// walk reaches at level 2 lies in an L2 table, at level 3 in an L3 table, in address order.
    pub fn pages(&self) -> usize {
        let mut n = 1;
        let (mut last_l2, mut last_l3) = (u64::MAX, u64::MAX);
        let r = MemoryRegion::new(0, self.size as usize);
        let _ = self.map.walk_range(&r, &mut |mr, _, level| {
            let va = mr.start().0 as u64;
            if level >= 2 && va / SZ_1G != last_l2 {
                last_l2 = va / SZ_1G;
                n += 1;
            }
            if level == 3 && va / SZ_2M != last_l3 {
                last_l3 = va / SZ_2M;
                n += 1;
            }
            Ok(())
        });
        n
    }
}

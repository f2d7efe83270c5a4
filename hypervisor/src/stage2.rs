//! A VM's stage-2 translation table (IPA -> PA), built with `aarch64-paging`'s Stage2 regime.
//!
//! The hypervisor runs with an identity EL2 stage-1 map, so table pages are allocated from the heap
//! and their addresses are physical. The same root is later shared with the SMMU (STE.S2TTB) so
//! that the CPU and devices of a VM see one source of truth.

use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes};
use aarch64_paging::idmap::IdTranslation;
use aarch64_paging::paging::{Constraints, MemoryRegion, Stage2 as Stage2Regime};
use aarch64_paging::{MapError, Mapping};
use thiserror::Error;

/// IPA size the tables cover: 39 bits with a level-1 root and a 4 KiB granule (512 GiB), enough
/// for any guest layout derived from the host's (QEMU virt's high PCIe windows end below it).
pub const IPA_BITS: u32 = 39;
const ROOT_LEVEL: usize = 1;

/// Why a stage-2 mapping failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Stage2Error {
    /// The range is not page-aligned or is empty.
    #[error("range {ipa:#x}+{size:#x} is not page-aligned or empty")]
    Unaligned {
        /// IPA of the range.
        ipa: u64,
        /// Size of the range.
        size: u64,
    },
    /// The IPA range does not fit in the IPA space.
    #[error("range {ipa:#x}+{size:#x} is outside the {IPA_BITS}-bit IPA space")]
    OutOfRange {
        /// IPA of the range.
        ipa: u64,
        /// Size of the range.
        size: u64,
    },
    /// The range overlaps a live mapping in a way that would need break-before-make.
    #[error("range {ipa:#x}+{size:#x} overlaps an existing mapping")]
    Overlap {
        /// IPA of the range.
        ipa: u64,
        /// Size of the range.
        size: u64,
    },
}

/// Memory type of a stage-2 mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemType {
    /// Normal memory, inner/outer write-back, inner shareable: guest RAM.
    Normal,
    /// Device-nGnRE, execute-never: passed-through device registers.
    Device,
    /// Normal memory like [`MemType::Normal`], read-only and execute-never (S2AP = 0b01): the
    /// hypervisor's own stage-1 tables of a VM's virtio-iommu domains, which the SMMU's
    /// nested walk reads through this stage 2 and nothing of the VM may write.
    NormalReadOnly,
    /// Device-nGnRE, execute-never, write-only (S2AP = 0b10, Arm ARM D8.4.4): an interrupt
    /// controller's doorbell (GITS_TRANSLATER), which a device's MSI writes through the SMMU
    /// and nothing needs to read.
    DeviceWriteOnly,
}

impl MemType {
    fn attributes(self) -> Stage2Attributes {
        let common = Stage2Attributes::VALID | Stage2Attributes::ACCESS_FLAG;
        let rw = common | Stage2Attributes::S2AP_ACCESS_RW;
        match self {
            Self::Normal => {
                rw | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
                    | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
                    | Stage2Attributes::SH_INNER
            }
            Self::NormalReadOnly => {
                common
                    | Stage2Attributes::S2AP_ACCESS_RO
                    | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
                    | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
                    | Stage2Attributes::SH_INNER
                    | Stage2Attributes::XN
            }
            Self::Device => rw | Stage2Attributes::MEMATTR_DEVICE_nGnRE | Stage2Attributes::XN,
            Self::DeviceWriteOnly => {
                common
                    | Stage2Attributes::S2AP_ACCESS_WO
                    | Stage2Attributes::MEMATTR_DEVICE_nGnRE
                    | Stage2Attributes::XN
            }
        }
    }
}

/// One leaf of the table, as found by [`Stage2::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Output PA of the address looked up.
    pub pa: u64,
    /// Table level of the leaf (1: 1 GiB block, 2: 2 MiB block, 3: 4 KiB page).
    pub level: usize,
    /// Memory type.
    pub mem: MemType,
}

/// A VM's stage-2 table.
#[derive(Debug)]
pub struct Stage2 {
    mapping: Mapping<IdTranslation<Stage2Attributes>, Stage2Regime>,
}

impl Default for Stage2 {
    fn default() -> Self {
        Self::new()
    }
}

impl Stage2 {
    /// An empty table: every IPA faults.
    pub fn new() -> Self {
        Self {
            mapping: Mapping::new(IdTranslation::new(), ROOT_LEVEL, Stage2Regime),
        }
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)`, using the largest blocks that fit.
    pub fn map(&mut self, ipa: u64, pa: u64, size: u64, mem: MemType) -> Result<(), Stage2Error> {
        const PAGE: u64 = 4096;
        if size == 0
            || !ipa.is_multiple_of(PAGE)
            || !pa.is_multiple_of(PAGE)
            || !size.is_multiple_of(PAGE)
        {
            return Err(Stage2Error::Unaligned { ipa, size });
        }
        let end = ipa
            .checked_add(size)
            .ok_or(Stage2Error::OutOfRange { ipa, size })?;
        if end > 1u64 << IPA_BITS {
            return Err(Stage2Error::OutOfRange { ipa, size });
        }
        let region = MemoryRegion::new(ipa as usize, end as usize);
        self.mapping
            .map_range(
                &region,
                PhysicalAddress(pa as usize),
                mem.attributes(),
                Constraints::empty(),
            )
            .map_err(|e| match e {
                MapError::AddressRange(_) | MapError::InvalidVirtualAddress(_) => {
                    Stage2Error::OutOfRange { ipa, size }
                }
                _ => Stage2Error::Overlap { ipa, size },
            })
    }

    /// Makes `[ipa, ipa + size)` fault again (page-aligned). The caller invalidates the TLBs
    /// of the VMID (CPU and SMMU) before relying on it.
    pub fn unmap(&mut self, ipa: u64, size: u64) -> Result<(), Stage2Error> {
        const PAGE: u64 = 4096;
        if size == 0 || !ipa.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
            return Err(Stage2Error::Unaligned { ipa, size });
        }
        let end = ipa
            .checked_add(size)
            .filter(|&e| e <= 1u64 << IPA_BITS)
            .ok_or(Stage2Error::OutOfRange { ipa, size })?;
        let region = MemoryRegion::new(ipa as usize, end as usize);
        // Entries written without VALID stay invalid (aarch64-paging `map_range`); a block
        // partly covered is split first.
        self.mapping
            .map_range(
                &region,
                PhysicalAddress(0),
                Stage2Attributes::empty(),
                Constraints::empty(),
            )
            .map_err(|_| Stage2Error::OutOfRange { ipa, size })
    }

    /// Physical address of the root table (VTTBR_EL2.BADDR, and later STE.S2TTB).
    pub fn root_pa(&self) -> u64 {
        self.mapping.root_address().0 as u64
    }

    /// Finds the leaf that maps `ipa`, if any.
    pub fn lookup(&self, ipa: u64) -> Option<Leaf> {
        let region = MemoryRegion::new(ipa as usize, ipa as usize + 1);
        let mut found = None;
        let _ = self.mapping.walk_range(&region, &mut |_, desc, level| {
            let flags = desc.flags();
            if flags.contains(Stage2Attributes::VALID)
                && (level == 3 || !flags.contains(Stage2Attributes::TABLE_OR_PAGE))
            {
                // The callback's range is clipped to the walk; the leaf covers a whole block.
                let block_size = 1usize << (12 + 9 * (3 - level));
                let offset = ipa as usize & (block_size - 1);
                let ap = flags & Stage2Attributes::S2AP_ACCESS_RW;
                let mem = if ap == Stage2Attributes::S2AP_ACCESS_WO {
                    MemType::DeviceWriteOnly
                } else if ap == Stage2Attributes::S2AP_ACCESS_RO {
                    MemType::NormalReadOnly
                } else if flags.contains(Stage2Attributes::XN) {
                    MemType::Device
                } else {
                    MemType::Normal
                };
                found = Some(Leaf {
                    pa: (desc.output_address().0 + offset) as u64,
                    level,
                    mem,
                });
            }
            Ok(())
        });
        found
    }

    /// VTCR_EL2 for these tables (Arm ARM D24.2.197): T0SZ for [`IPA_BITS`], start level 1,
    /// 4 KiB granule, inner-shareable write-back walks, PS from the CPU's PA range, 16-bit VMIDs
    /// when the CPU has them.
    pub fn vtcr(pa_range: u64, vmid16: bool) -> u64 {
        use aarch64_cpu::registers::VTCR_EL2;
        // At most 48 bits of PA: no 52-bit tables (ID_AA64MMFR0_EL1.PARange 6 would need them).
        let ps = pa_range.min(VTCR_EL2::PS::PA_48B_256TB.value >> 16);
        (VTCR_EL2::T0SZ.val(64 - IPA_BITS as u64)
            + VTCR_EL2::SL0::Granule4KBLevel1
            + VTCR_EL2::IRGN0::NormalWBRAWA
            + VTCR_EL2::ORGN0::NormalWBRAWA
            + VTCR_EL2::SH0::Inner
            + VTCR_EL2::TG0::Granule4KB
            + VTCR_EL2::PS.val(ps)
            + if vmid16 {
                VTCR_EL2::VS::Bits16
            } else {
                VTCR_EL2::VS::Bits8
            }
            + VTCR_EL2::RES1::SET)
            .value
    }
}

/// The stage-2 fields of every physical STE of a VM: its VMID and the root its vCPUs' VTTBR_EL2
/// uses, the same IPA size and starting level as its VTCR_EL2 ([`Stage2::vtcr`]), and an output
/// size both the SMMU's OAS and 48 bits allow (S2PS encodes as VTCR_EL2.PS).
pub fn smmu_s2_config(oas_bits: u8, vmid: u16, s2_root: u64) -> smmu::ste::S2Config {
    let ps = match oas_bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        _ => 5,
    };
    smmu::ste::S2Config {
        vmid,
        root_pa: s2_root,
        t0sz: (64 - IPA_BITS) as u8,
        sl0: 1,
        ps,
        affd: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn unmap_makes_a_range_fault_and_it_can_be_mapped_elsewhere() {
        let mut s2 = Stage2::new();
        s2.map(0x1000_0000, 0x1000_0000, 0x4000, MemType::Device)
            .unwrap();
        s2.map(0x4000_0000, 0x8000_0000, 0x20_0000, MemType::Normal)
            .unwrap();
        s2.unmap(0x1000_0000, 0x4000).unwrap();
        assert!(s2.lookup(0x1000_0000).is_none());
        assert!(s2.lookup(0x1000_3fff).is_none());
        s2.map(0x1000_8000, 0x1000_0000, 0x4000, MemType::Device)
            .unwrap();
        assert_eq!(s2.lookup(0x1000_9000).map(|l| l.pa), Some(0x1000_1000));
        // Unmapping part of a block splits it: the rest stays.
        s2.unmap(0x4010_0000, 0x1000).unwrap();
        assert!(s2.lookup(0x4010_0000).is_none());
        assert_eq!(s2.lookup(0x4010_1000).map(|l| l.pa), Some(0x8010_1000));
        assert_eq!(s2.lookup(0x400f_f000).map(|l| l.pa), Some(0x800f_f000));
        assert_eq!(
            s2.unmap(0x1000_0001, 0x1000),
            Err(Stage2Error::Unaligned {
                ipa: 0x1000_0001,
                size: 0x1000
            })
        );
    }

    #[test]
    fn a_doorbell_page_is_write_only_device_memory() {
        let mut s2 = Stage2::new();
        s2.map(0x0809_0000, 0x0809_0000, 0x1000, MemType::DeviceWriteOnly)
            .unwrap();
        s2.map(0x0900_0000, 0x0900_0000, 0x1000, MemType::Device)
            .unwrap();
        let leaf = s2.lookup(0x0809_0040).unwrap();
        assert_eq!((leaf.pa, leaf.level), (0x0809_0040, 3));
        assert_eq!(leaf.mem, MemType::DeviceWriteOnly);
        assert_eq!(s2.lookup(0x0900_0000).unwrap().mem, MemType::Device);
        assert_eq!(s2.lookup(0x0809_1000), None);
        let wo = MemType::DeviceWriteOnly.attributes();
        assert_eq!(
            wo & Stage2Attributes::S2AP_ACCESS_RW,
            Stage2Attributes::S2AP_ACCESS_WO
        );
        assert!(wo.contains(Stage2Attributes::XN));
    }

    #[test]
    fn a_table_pool_is_read_only_normal_memory() {
        let mut s2 = Stage2::new();
        s2.map(0x8000_0000, 0x4800_0000, 0x10_0000, MemType::NormalReadOnly)
            .unwrap();
        let leaf = s2.lookup(0x8000_1008).unwrap();
        assert_eq!((leaf.pa, leaf.mem), (0x4800_1008, MemType::NormalReadOnly));
        let ro = MemType::NormalReadOnly.attributes();
        assert_eq!(
            ro & Stage2Attributes::S2AP_ACCESS_RW,
            Stage2Attributes::S2AP_ACCESS_RO
        );
        assert!(ro.contains(Stage2Attributes::MEMATTR_NORMAL_INNER_WB));
    }

    #[test]
    fn aligned_gigabyte_uses_one_level1_block() {
        let mut s2 = Stage2::new();
        s2.map(GIB, 4 * GIB, GIB, MemType::Normal).unwrap();
        let leaf = s2.lookup(GIB + 0x1234).unwrap();
        assert_eq!(
            leaf,
            Leaf {
                pa: 4 * GIB + 0x1234,
                level: 1,
                mem: MemType::Normal
            }
        );
        assert!(s2.lookup(GIB - 1).is_none());
        assert!(s2.lookup(2 * GIB).is_none());
    }

    #[test]
    fn non_identity_offset_with_2mib_alignment_uses_level2_blocks() {
        let mut s2 = Stage2::new();
        // IPA is 1 GiB aligned but PA only 2 MiB aligned: level-2 blocks.
        s2.map(GIB, 0x1_0020_0000, 64 * MIB, MemType::Normal)
            .unwrap();
        let leaf = s2.lookup(GIB + 3 * MIB).unwrap();
        assert_eq!(leaf.level, 2);
        assert_eq!(leaf.pa, 0x1_0020_0000 + 3 * MIB);
    }

    #[test]
    fn unaligned_tail_uses_pages() {
        let mut s2 = Stage2::new();
        s2.map(GIB, 2 * GIB, 2 * MIB + 8192, MemType::Normal)
            .unwrap();
        assert_eq!(s2.lookup(GIB).unwrap().level, 2);
        assert_eq!(s2.lookup(GIB + 2 * MIB + 4096).unwrap().level, 3);
        assert!(s2.lookup(GIB + 2 * MIB + 8192).is_none());
    }

    #[test]
    fn device_mappings_are_execute_never_device() {
        let mut s2 = Stage2::new();
        s2.map(0x1000_0000, 0x1000_0000, 0x1000, MemType::Device)
            .unwrap();
        assert_eq!(s2.lookup(0x1000_0004).unwrap().mem, MemType::Device);
    }

    #[test]
    fn bounds_and_alignment_are_checked() {
        let mut s2 = Stage2::new();
        assert_eq!(
            s2.map(1 << IPA_BITS, 0, 4096, MemType::Normal),
            Err(Stage2Error::OutOfRange {
                ipa: 1 << IPA_BITS,
                size: 4096
            })
        );
        assert_eq!(
            s2.map((1 << IPA_BITS) - 4096, 0, 8192, MemType::Normal),
            Err(Stage2Error::OutOfRange {
                ipa: (1 << IPA_BITS) - 4096,
                size: 8192
            })
        );
        assert!(matches!(
            s2.map(0x1001, 0, 4096, MemType::Normal),
            Err(Stage2Error::Unaligned { .. })
        ));
        assert!(matches!(
            s2.map(0, 0, 0, MemType::Normal),
            Err(Stage2Error::Unaligned { .. })
        ));
    }

    #[test]
    fn vtcr_fields() {
        let v = Stage2::vtcr(2, true); // 40-bit PA
        assert_eq!(v & 0x3f, 25);
        assert_eq!((v >> 6) & 3, 1);
        assert_eq!((v >> 16) & 7, 2);
        assert_eq!((v >> 19) & 1, 1);
        assert_eq!(v >> 31, 1);
        assert_eq!((Stage2::vtcr(6, false) >> 16) & 7, 5);
        // The value the hand-written shifts produced before the typed fields: unchanged.
        assert_eq!(Stage2::vtcr(2, true), 0x800a_3559);
    }
}

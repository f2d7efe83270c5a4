//! Where a VM's virtio-iommu goes (`smmu-hv,iommu = "virtio-iommu"`): one per physical SMMU its
//! functions sit behind, in place of the vSMMU there. Its register frame sits at the physical
//! SMMU's address (the guest has no vSMMU there, and the host's DT puts nothing else in that
//! frame); its table pool gets an IPA window just above the VM's RAM, inside the host's RAM
//! range, where the guest's IPA space (which mirrors the host's device map) has nothing.

use super::SmmuFacts;
use crate::devices::viommu::device::{ViommuFactory, VmViommu};
use crate::devices::viommu::{ViommuConfig, RESV_MEM_T_MSI};
use crate::devices::virtio::mmio::FRAME_SIZE as VIRTIO_MMIO_REGS_MIN;
use crate::platform::{MemRange, Platform};
use alloc::string::String;
use smmu::vsmmu::StreamMap;

/// IPA room for each virtio-iommu's table pool, 2 MiB-aligned so one block descriptor could
/// map it; the pool itself may be smaller.
pub const POOL_WINDOW: u64 = 2 << 20;
/// IOVA bits of the guest's domains: a level-1 root with a 4 KiB granule (512 GiB), which
/// Linux's IOVA allocator works within (the domain aperture from INPUT_RANGE).
pub const INPUT_BITS: u8 = 39;
/// Output size of the domains' stage 1: an IPA, as for the vSMMU (the smallest CD.IPS
/// encoding covering the VM's 39-bit IPA space).
pub const IPA_BITS: u8 = 40;
/// 4 KiB pages, 2 MiB and 1 GiB blocks: what a 4 KiB-granule stage-1 table maps.
pub const PAGE_SIZES: u64 = (1 << 12) | (1 << 21) | (1 << 30);
/// Domains at once: the CD slots of one pool page (Linux uses one per IOMMU group).
pub const MAX_DOMAINS: usize = 64;
/// Mappings at once over all of a VM's domains (Linux's streaming DMA keeps a few hundred).
pub const MAX_MAPPINGS: usize = 16384;
/// Bytes of PROBE properties per endpoint: room for two RESV_MEM properties (24 bytes each).
/// The one reported is the vITS's doorbell page as RESV_MEM_T_MSI, which every translating
/// domain maps 1:1; Linux then composes MSIs with the doorbell's own address and maps nothing
/// for them. (A VM without a vITS reports none, and Linux's MSIs, if any, would go through
/// its own software MSI window, mapped with MAP like any page.)
pub const PROBE_SIZE: u32 = 64;
/// SMMU_IDR5.GRAN4K (IHI 0070 6.3.6): the domains' tables use the 4 KiB granule.
const IDR5_GRAN4K: u32 = 1 << 4;

/// Why a VM gets no virtio-iommu over a physical SMMU (its devices there then run on stage 2
/// only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoViommu {
    /// The SMMU cannot nest stage 1 over stage 2.
    #[error("the SMMU cannot nest stage 1 over stage 2")]
    NoNesting,
    /// With stalls forced a CD with S = 0 is ILLEGAL (IHI 0070 5.4).
    #[error("the SMMU forces stalls, which the domains' CDs do not use")]
    StallsForced,
    /// The domains' tables use the 4 KiB granule.
    #[error("the SMMU has no 4 KiB stage-1 granule (IDR5.GRAN4K)")]
    NoGranule,
    /// The hypervisor writes the tables with ordinary stores and cleans no caches.
    #[error("the SMMU's table walks are not coherent (no `dma-coherent`)")]
    NotCoherent,
    /// Every SPI of the VM's vGIC is taken.
    #[error("no SPI of the VM's vGIC is free for its interrupt")]
    NoSpi,
    /// The host's RAM range has no room above the VM's RAM for the pool's window.
    #[error("no IPA room above the VM's RAM for its table pool")]
    NoPoolIpa,
    /// The machine gave no pool (heap exhausted, or no factory).
    #[error("no table pool: {0}")]
    NoPool(&'static str),
}

/// The virtio-iommu's interrupt: the physical SMMU's event queue line when the vGIC has it
/// and nothing else took it, else the highest free SPI.
fn pick_intid(s: &SmmuFacts<'_>, spi_end: u32, used: &[u32]) -> Option<u32> {
    let free = |i: u32| (32..spi_end).contains(&i) && !used.contains(&i);
    s.info
        .eventq_intid
        .filter(|&i| free(i))
        .or_else(|| (32..spi_end).rev().find(|&i| free(i)))
}

/// The IPA window of table pool `index` of a VM whose RAM is `ram`: above it, 2 MiB-aligned,
/// inside one of the host's RAM ranges (where the guest's IPA space has nothing).
pub fn pool_window(platform: &Platform, ram: MemRange, index: usize) -> Option<MemRange> {
    let base = ram
        .end()
        .checked_next_multiple_of(POOL_WINDOW)?
        .checked_add(POOL_WINDOW.checked_mul(index as u64)?)?;
    let window = MemRange {
        base,
        size: POOL_WINDOW,
    };
    let end = base.checked_add(POOL_WINDOW)?;
    platform
        .memory
        .iter()
        .any(|m| m.base <= base && end <= m.end())
        .then_some(window)
}

/// What a VM with `endpoints` (StreamIDs) on physical SMMU `s` is given: its virtio-iommu,
/// and the pool's physical range to map read-only at `VmViommu::pool`. `doorbell` is the
/// VM's vITS's GITS_TRANSLATER page, if it has one: PROBE's MSI region.
#[allow(clippy::too_many_arguments)]
pub fn build(
    vm: &str,
    s: &SmmuFacts<'_>,
    endpoints: &[u32],
    s2: smmu::ste::S2Config,
    spi_end: u32,
    used: &[u32],
    pool_ipa: Option<MemRange>,
    doorbell: Option<MemRange>,
    factory: Option<&dyn ViommuFactory>,
) -> Result<(VmViommu, MemRange), NoViommu> {
    if !s.phys.nesting {
        return Err(NoViommu::NoNesting);
    }
    if s.phys.stalls_forced {
        return Err(NoViommu::StallsForced);
    }
    if s.phys.idr5 & IDR5_GRAN4K == 0 {
        return Err(NoViommu::NoGranule);
    }
    if !s.info.coherent {
        return Err(NoViommu::NotCoherent);
    }
    let intid = pick_intid(s, spi_end, used).ok_or(NoViommu::NoSpi)?;
    let window = pool_ipa.ok_or(NoViommu::NoPoolIpa)?;
    let factory = factory.ok_or(NoViommu::NoPool("the machine offers none"))?;
    let cfg = ViommuConfig {
        name: String::from(vm),
        endpoints: endpoints
            .iter()
            .map(|&sid| StreamMap {
                vsid: sid,
                psid: sid,
            })
            .collect(),
        s2,
        input_bits: INPUT_BITS,
        ipa_bits: IPA_BITS,
        page_size_mask: PAGE_SIZES,
        max_domains: MAX_DOMAINS,
        max_mappings: MAX_MAPPINGS,
        resv: doorbell
            .map(|d| (d.base, d.end() - 1, RESV_MEM_T_MSI))
            .into_iter()
            .collect(),
        probe_size: PROBE_SIZE,
    };
    let (model, pool_pa) = factory.make(cfg, window.base).map_err(NoViommu::NoPool)?;
    let v = VmViommu::new(
        s.unit,
        s.info.phandle,
        MemRange {
            base: s.info.regs.base,
            size: VIRTIO_MMIO_REGS_MIN,
        },
        intid,
        MemRange {
            base: window.base,
            size: pool_pa.size,
        },
        model,
    );
    Ok((v, pool_pa))
}

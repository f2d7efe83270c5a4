//! The table pool of a VM's virtio-iommu: hypervisor memory holding the stage-1 tables and
//! context descriptors of the guest's domains (`devices::viommu`), which the hypervisor writes
//! and the physical SMMU reads.
//!
//! The SMMU walks a nested stream's stage 1 through the VM's stage 2 (IHI 0070 3.3.2: with
//! STE.Config = 0b111, S1ContextPtr, CD.TTB0 and every table descriptor are IPAs), so the pool
//! is mapped in the VM's stage 2 at an IPA window of its own, **read-only**
//! (`MemType::NormalReadOnly`): the SMMU's walks only read, the guest's CPUs may read their own
//! domains' tables (nothing there is not theirs) but never write them, and so the tables the
//! hypervisor walks and edits are ones no guest can corrupt. The tables' "physical" addresses,
//! as `aarch64-paging` writes them into descriptors, are those IPAs.
//!
//! Page 0 holds the context descriptors (64 bytes each), the last page is a scratch page (see
//! `allocate_table`), the rest the tables, handed out one
//! page at a time by [`PoolTranslation`], the `aarch64_paging::paging::Translation` of every
//! domain of the VM.

use aarch64_paging::descriptor::{El1Attributes, PhysicalAddress};
use aarch64_paging::paging::{PageTable, Translation};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::NonNull;
use spin::Mutex;

/// Bytes of one page of the pool.
pub const PAGE: usize = 4096;
/// Bytes of a context descriptor (IHI 0070 5.4).
const CD_SIZE: usize = 64;
/// Table pages kept out of [`IoPool::free_pages`]: the model checks a MAP's worst case
/// against what is free, so these are never needed; they make a mistake in that bound a
/// logged error instead of a corrupted table.
const RESERVE: usize = 4;

/// The pages not handed out.
#[derive(Debug)]
struct Free {
    pages: Vec<u32>,
    /// Times a table was asked for with only the reserve left.
    overdrawn: u64,
}

/// One VM's pool: `pages` pages of zeroed, 4 KiB-aligned hypervisor memory at `va` (the
/// identity-mapped heap: also its physical address), seen by the SMMU at `ipa`.
#[derive(Debug, Clone)]
pub struct IoPool {
    va: usize,
    ipa: u64,
    pages: usize,
    free: Arc<Mutex<Free>>,
}

// SAFETY: the pool's memory is owned by it for the hypervisor's lifetime (never freed) and
// every access to a page goes through the one domain (one `Mapping`, under the VM's viommu
// lock) that was handed it, or through `write_cd` under the same lock.
unsafe impl Send for IoPool {}
// SAFETY: as for `Send`; the free list is behind its own lock.
unsafe impl Sync for IoPool {}

impl IoPool {
    /// A pool of `bytes` (a multiple of [`PAGE`], at least three pages) from the heap, for the
    /// IPA window at `ipa`. `None` when the heap cannot give it.
    pub fn new(ipa: u64, bytes: usize) -> Option<Self> {
        let pages = bytes / PAGE;
        if pages < 3 || !bytes.is_multiple_of(PAGE) || !ipa.is_multiple_of(PAGE as u64) {
            return None;
        }
        let layout = core::alloc::Layout::from_size_align(bytes, PAGE).ok()?;
        // SAFETY: a non-zero size; the block is never freed (the pool lives as long as the
        // VM, which lives as long as the hypervisor).
        let va = unsafe { alloc::alloc::alloc_zeroed(layout) } as usize;
        if va == 0 {
            return None;
        }
        Some(Self {
            va,
            ipa,
            pages,
            // Page 0 is the CD page, the last the scratch page; hand out the others lowest
            // first (pop from the end).
            free: Arc::new(Mutex::new(Free {
                pages: (1..pages as u32 - 1).rev().collect(),
                overdrawn: 0,
            })),
        })
    }

    /// Physical address of the pool (what the VM's stage 2 maps the window onto).
    pub fn pa(&self) -> u64 {
        self.va as u64
    }

    /// Bytes of the pool.
    pub fn bytes(&self) -> usize {
        self.pages * PAGE
    }

    /// Its IPA window's base.
    pub fn ipa(&self) -> u64 {
        self.ipa
    }

    /// Context descriptor slots (one page of them).
    pub fn cd_slots(&self) -> usize {
        PAGE / CD_SIZE
    }

    /// Table pages free for the model's use (the reserve not counted).
    pub fn free_pages(&self) -> usize {
        self.free.lock().pages.len().saturating_sub(RESERVE)
    }

    /// Table pages in use.
    pub fn used_pages(&self) -> usize {
        self.pages - 2 - self.free.lock().pages.len()
    }

    /// IPA of CD slot `slot`.
    pub fn cd_ipa(&self, slot: usize) -> u64 {
        self.ipa + (slot % self.cd_slots() * CD_SIZE) as u64
    }

    /// Writes CD slot `slot`: words 1-7, a barrier, then word 0 (which holds V), so an SMMU
    /// fetching it concurrently sees the old word 0 or a complete new CD (IHI 0070 3.21.3).
    pub fn write_cd(&self, slot: usize, cd: [u64; 8]) {
        let at = self.va + slot % self.cd_slots() * CD_SIZE;
        let words = at as *mut u64;
        for (i, &w) in cd.iter().enumerate().skip(1) {
            // SAFETY: `at` is a 64-byte slot inside the pool's CD page, 8-aligned; the SMMU
            // reads it concurrently, hence volatile.
            unsafe { core::ptr::write_volatile(words.add(i), w) };
        }
        // Orders words 1-7 before word 0 for the SMMU's (coherent) observation.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(words, cd[0]) };
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }

    /// A translation for one domain's tables, allocating from this pool.
    pub fn translation(&self) -> PoolTranslation {
        PoolTranslation { pool: self.clone() }
    }

    /// Times the model asked for a table with only the reserve left (a bound that was wrong).
    pub fn overdrawn(&self) -> u64 {
        self.free.lock().overdrawn
    }
}

/// The `Translation` of one domain's tables: pages from its VM's [`IoPool`], addressed by
/// their IPAs.
#[derive(Debug)]
pub struct PoolTranslation {
    pool: IoPool,
}

impl Translation<El1Attributes> for PoolTranslation {
    fn allocate_table(&mut self) -> (NonNull<PageTable<El1Attributes>>, PhysicalAddress) {
        let index = {
            let mut free = self.pool.free.lock();
            if free.pages.len() <= RESERVE {
                free.overdrawn += 1;
                log::error!(
                    "viommu: table pool overdrawn: the MAP bound was too low ({} pages left)",
                    free.pages.len()
                );
            }
            // The reserve makes an empty list unreachable unless the model's bound is wrong
            // by more than RESERVE pages. aarch64-paging cannot be told there is no page, so
            // it then gets the scratch page, shared by every such table: that VM's own
            // translations go wrong (its stage 2 still confines them), the hypervisor lives.
            free.pages.pop().map_or(self.pool.pages - 1, |p| p as usize)
        };
        let va = self.pool.va + index * PAGE;
        // SAFETY: page `index` is inside the pool, was free (no domain's table, so neither the
        // SMMU nor aarch64-paging reads it), 4 KiB-aligned; a table must start zeroed
        // (all descriptors invalid).
        unsafe { core::ptr::write_bytes(va as *mut u8, 0, PAGE) };
        let ptr = NonNull::new(va as *mut PageTable<El1Attributes>)
            .expect("the pool's pages are not at address 0");
        (
            ptr,
            PhysicalAddress((self.pool.ipa + (index * PAGE) as u64) as usize),
        )
    }

    unsafe fn deallocate_table(&mut self, page_table: NonNull<PageTable<El1Attributes>>) {
        let index = (page_table.as_ptr() as usize - self.pool.va) / PAGE;
        // The scratch page (and anything not a table page) never goes back on the list.
        if (1..self.pool.pages - 1).contains(&index) {
            self.pool.free.lock().pages.push(index as u32);
        }
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<El1Attributes>> {
        // Descriptors in the pool are only ever written by aarch64-paging from addresses this
        // translation gave out (the guest cannot write the pool), so `pa` is one of its pages;
        // the modulo keeps a wrong one inside the pool anyway.
        let index = (pa.0 as u64).wrapping_sub(self.pool.ipa) as usize / PAGE % self.pool.pages;
        NonNull::new((self.pool.va + index * PAGE) as *mut PageTable<El1Attributes>)
            .expect("the pool's pages are not at address 0")
    }
}

impl crate::devices::viommu::TablePool for IoPool {
    type Tr = PoolTranslation;

    fn translation(&mut self) -> PoolTranslation {
        IoPool::translation(self)
    }

    fn free_pages(&self) -> usize {
        IoPool::free_pages(self)
    }

    fn cd_ipa(&self, slot: usize) -> u64 {
        IoPool::cd_ipa(self, slot)
    }

    fn write_cd(&mut self, slot: usize, cd: [u64; 8]) {
        IoPool::write_cd(self, slot, cd)
    }
}

/// Bytes of each VM's pool: 256 pages, 254 of them tables (a Linux guest's streaming DMA
/// needs a handful; a guest that maps more gets VIRTIO_IOMMU_S_NOMEM).
pub const POOL_BYTES: usize = 1 << 20;

/// Makes each virtio-iommu's model over a pool of its own from the heap.
#[derive(Debug)]
pub struct Factory;

impl crate::devices::viommu::device::ViommuFactory for Factory {
    fn make(
        &self,
        cfg: crate::devices::viommu::ViommuConfig,
        pool_ipa: u64,
    ) -> Result<
        (
            alloc::boxed::Box<dyn crate::devices::viommu::device::ViommuModel>,
            crate::platform::MemRange,
        ),
        &'static str,
    > {
        let pool = IoPool::new(pool_ipa, POOL_BYTES).ok_or("the heap cannot give it")?;
        let pa = crate::platform::MemRange {
            base: pool.pa(),
            size: pool.bytes() as u64,
        };
        let model = crate::devices::viommu::Viommu::new(cfg, pool);
        Ok((alloc::boxed::Box::new(model), pa))
    }
}

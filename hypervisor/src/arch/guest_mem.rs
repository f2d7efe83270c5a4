//! The one place that turns physical or guest-physical addresses into memory the hypervisor
//! reads or writes. Every access is bounds-checked against a range the hypervisor owns.

use super::sysreg;
use crate::hw::scrub::{By, Scrub};
use crate::hw::{GuestRam, Ipa, OutOfRam, PhysAddr, ZeroTime};
use crate::platform::MemRange;
use aarch64_cpu::registers::{Readable, CNTPCT_EL0};

/// A VM's RAM: IPA `ipa.base..` backed by PA `pa..`, with the zeroing state of its blocks.
#[derive(Debug)]
pub struct PhysRam {
    ipa: MemRange,
    pa: PhysAddr,
    scrub: Scrub,
}

impl PhysRam {
    /// # Safety
    ///
    /// `[pa, pa + ipa.size)` must be RAM owned by this VM alone (not the hypervisor's image, heap
    /// or another VM's RAM), identity-mapped at EL2. It starts stale: whatever firmware or an
    /// earlier boot left there is never read before its block is zeroed.
    pub unsafe fn new(ipa: MemRange, pa: PhysAddr) -> Self {
        Self {
            ipa,
            pa,
            scrub: Scrub::new(ipa, false),
        }
    }

    /// The PA of `[ipa, ipa + len)`, which must lie in this VM's RAM.
    fn pa_of(&self, ipa: Ipa, len: u64) -> Result<usize, OutOfRam> {
        let out = OutOfRam { ipa, len };
        let end = ipa.checked_add(len).ok_or(out)?;
        let off = ipa.offset_from(Ipa(self.ipa.base)).ok_or(out)?;
        if end.get() > self.ipa.end() {
            return Err(out);
        }
        Ok((self.pa.get() + off) as usize)
    }
}

impl GuestRam for PhysRam {
    fn ipa_range(&self) -> MemRange {
        self.ipa
    }

    /// Copies `data` to guest IPA `ipa` and cleans it to the point of coherency (the guest may
    /// read it with its MMU and caches off).
    fn write(&self, ipa: Ipa, data: &[u8]) -> Result<(), OutOfRam> {
        let pa = self.pa_of(ipa, data.len() as u64)?;
        // Never written into a stale block: zeroing it later would wipe what was written.
        self.ensure_zeroed(ipa, data.len() as u64, By::Access)?;
        // SAFETY: `pa_of` checked the range lies in this VM's RAM, which `new`'s caller
        // guaranteed is identity-mapped and aliased by no Rust reference.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pa as *mut u8, data.len()) };
        sysreg::clean_dcache_range(pa, data.len());
        Ok(())
    }

    /// Copies `data` to guest IPA `ipa`, with no cache maintenance: for the emulated devices,
    /// all `dma-coherent` (the guest maps their memory cacheable, as this mapping is; the
    /// caches are coherent between CPUs). On the CMD_SYNC completion path that saves a DC CVAC
    /// and a DSB SY per guest sync.
    fn write_coherent(&self, ipa: Ipa, data: &[u8]) -> Result<(), OutOfRam> {
        let pa = self.pa_of(ipa, data.len() as u64)?;
        // As in `write`: never into a stale block.
        self.ensure_zeroed(ipa, data.len() as u64, By::Access)?;
        // SAFETY: as in `write`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pa as *mut u8, data.len()) };
        Ok(())
    }

    /// Copies guest memory at IPA `ipa` into `buf`. Guest RAM is normal write-back memory in
    /// both the guest's and the hypervisor's mappings, so no cache maintenance is needed.
    fn read(&self, ipa: Ipa, buf: &mut [u8]) -> Result<(), OutOfRam> {
        let pa = self.pa_of(ipa, buf.len() as u64)?;
        // Nothing is read that this boot did not write or zero.
        self.ensure_zeroed(ipa, buf.len() as u64, By::Access)?;
        // The guest may write this memory concurrently: volatile reads make that a stale value
        // at worst, never an invalid one. Aligned doublewords where they fit (a command, STE or
        // CD is two to eight of them), bytes elsewhere: a trap reads its commands in a few loads.
        let mut i = 0;
        while i < buf.len() {
            let p = pa + i;
            if p.is_multiple_of(8) && buf.len() - i >= 8 {
                // SAFETY: `pa_of` checked the range lies in this VM's RAM, identity-mapped
                // (`new`); `p` is 8-byte aligned and 8 bytes of it are in the range.
                let v = unsafe { (p as *const u64).read_volatile() };
                buf[i..i + 8].copy_from_slice(&v.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: as above, one byte of the range.
                buf[i] = unsafe { (p as *const u8).read_volatile() };
                i += 1;
            }
        }
        Ok(())
    }

    fn scrub(&self) -> &Scrub {
        &self.scrub
    }

    fn zero(&self, ipa: Ipa, len: u64) -> Result<ZeroTime, OutOfRam> {
        let start = self.pa_of(ipa, len)?;
        let len = len as usize;
        let t0 = CNTPCT_EL0.get();
        // SAFETY: `pa_of` checked the range lies in this VM's RAM (see `new`), mapped as normal
        // memory; the caller claimed its blocks (`GuestRam::zero`), so no other CPU of the
        // hypervisor reads or writes it meanwhile and no Rust reference points into it.
        unsafe { sysreg::zero_range(start, len) };
        let t1 = CNTPCT_EL0.get();
        sysreg::clean_dcache_range(start, len);
        let t2 = CNTPCT_EL0.get();
        Ok(ZeroTime {
            zero: t1 - t0,
            clean: t2 - t1,
            zva_block: sysreg::zva_block(),
        })
    }
}

/// A boot module's bytes (pristine kernel or initramfs).
///
/// # Safety
///
/// `[pa, pa + len)` must be identity-mapped RAM the hypervisor reserved for the module, never
/// written for the hypervisor's life.
pub unsafe fn boot_module(pa: u64, len: u64) -> &'static [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts(pa as usize as *const u8, len as usize) }
}

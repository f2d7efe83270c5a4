//! The one place that turns physical or guest-physical addresses into memory the hypervisor
//! reads or writes. Every access is bounds-checked against a range the hypervisor owns.

use super::sysreg;
use crate::platform::MemRange;

/// A guest RAM range the hypervisor may access: IPA `ipa.base..` backed by PA `pa..`.
#[derive(Clone, Copy, Debug)]
pub struct GuestRam {
    ipa: MemRange,
    pa: u64,
}

/// An access outside the VM's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("IPA range {ipa:#x}+{len:#x} is outside guest RAM")]
pub struct OutOfRam {
    /// Start of the access.
    pub ipa: u64,
    /// Its length.
    pub len: u64,
}

impl GuestRam {
    /// # Safety
    ///
    /// `[pa, pa + ipa.size)` must be RAM owned by this VM alone (not the hypervisor's image, heap
    /// or another VM's RAM), identity-mapped at EL2.
    pub unsafe fn new(ipa: MemRange, pa: u64) -> Self {
        Self { ipa, pa }
    }

    fn pa_of(&self, ipa: u64, len: u64) -> Result<u64, OutOfRam> {
        let end = ipa.checked_add(len).ok_or(OutOfRam { ipa, len })?;
        if ipa < self.ipa.base || end > self.ipa.end() {
            return Err(OutOfRam { ipa, len });
        }
        Ok(self.pa + (ipa - self.ipa.base))
    }

    /// Copies `data` to guest IPA `ipa` and cleans it to the point of coherency (the guest may
    /// read it with its MMU and caches off).
    pub fn write(&self, ipa: u64, data: &[u8]) -> Result<(), OutOfRam> {
        let pa = self.pa_of(ipa, data.len() as u64)?;
        // SAFETY: `pa_of` checked the range lies in this VM's RAM, which `new`'s caller
        // guaranteed is identity-mapped and aliased by no Rust reference.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), pa as usize as *mut u8, data.len())
        };
        sysreg::clean_dcache_range(pa as usize, data.len());
        Ok(())
    }

    /// Copies guest memory at IPA `ipa` into `buf`. Guest RAM is normal write-back memory in
    /// both the guest's and the hypervisor's mappings, so no cache maintenance is needed.
    pub fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), OutOfRam> {
        let pa = self.pa_of(ipa, buf.len() as u64)?;
        // The guest may write this memory concurrently: volatile byte reads make that a stale
        // value at worst, never an invalid one.
        for (i, b) in buf.iter_mut().enumerate() {
            let p = (pa as usize + i) as *const u8;
            // SAFETY: `pa_of` checked the range lies in this VM's RAM, identity-mapped (`new`).
            *b = unsafe { p.read_volatile() };
        }
        Ok(())
    }

    /// Copies `len` bytes from a boot module at physical `src` into the guest at `ipa`.
    ///
    /// # Safety
    ///
    /// `[src, src + len)` must be RAM the hypervisor reserved for itself (a boot module) and
    /// identity-mapped.
    pub unsafe fn copy_from_phys(&self, ipa: u64, src: u64, len: u64) -> Result<(), OutOfRam> {
        let pa = self.pa_of(ipa, len)?;
        // SAFETY: the destination is checked guest RAM; the caller vouches for the source; they
        // cannot overlap since guest RAM is placed away from every boot module.
        unsafe {
            core::ptr::copy_nonoverlapping(
                src as usize as *const u8,
                pa as usize as *mut u8,
                len as usize,
            )
        };
        sysreg::clean_dcache_range(pa as usize, len as usize);
        Ok(())
    }

    /// Zeroes the whole of guest RAM (a fresh VM must not see a previous VM's data).
    pub fn zero_all(&self) {
        // SAFETY: the whole range is this VM's RAM (see `new`), mapped as normal memory.
        unsafe { sysreg::zero_and_clean(self.pa as usize, self.ipa.size as usize) };
    }
}

/// Reads `len` bytes of physical memory the hypervisor owns (a boot module header).
///
/// # Safety
///
/// `[pa, pa + len)` must be identity-mapped RAM not written concurrently.
pub unsafe fn read_phys(pa: u64, len: usize) -> &'static [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts(pa as usize as *const u8, len) }
}

//! The hardware port: the few machine operations the VM control plane (`vm/`) and the device
//! glue (`devices/`) need, as a trait. `arch/` implements it on the real machine (GICv3 CPU and
//! virtual CPU interfaces, TLB maintenance, the physical SMMU); host tests use [`fake::FakeHw`],
//! which records every call, as arm-gic's `sysreg/fake.rs` and Hafnium's `src/arch/fake/` do.
//!
//! Operations on "this CPU" (list registers, ICH_HCR_EL2, deactivation) act on the physical CPU
//! that calls them: the control plane only ever calls them for the vCPU pinned there.

pub mod addr;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fake;
pub mod scrub;

pub use addr::{Ipa, PhysAddr};

/// A GIC interrupt ID (Arm IHI 0069, 2.2): SGIs 0-15, PPIs 16-31, SPIs 32-1019.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IntId(pub u32);

impl IntId {
    /// Whether it is a Shared Peripheral Interrupt (routed through the distributor).
    pub const fn is_spi(self) -> bool {
        self.0 >= 32 && self.0 < 1020
    }
}

impl core::fmt::Display for IntId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the control plane asks of the machine.
pub trait Hw {
    /// Logical index of the calling physical CPU.
    fn this_cpu(&self) -> usize;

    /// Enables physical SPI `intid`, level-sensitive, routed to physical CPU `pcpu`.
    fn enable_spi(&self, intid: IntId, pcpu: usize);
    /// Disables physical SPI `intid`.
    fn disable_spi(&self, intid: IntId);
    /// Enables or disables SGI/PPI `intid` in physical CPU `pcpu`'s redistributor.
    fn set_ppi_enabled(&self, pcpu: usize, intid: IntId, enabled: bool);
    /// Clears the active state of SGI/PPI `intid` in physical CPU `pcpu`'s redistributor.
    fn clear_ppi_active(&self, pcpu: usize, intid: IntId);
    /// Deactivates physical `intid` on this CPU (ICC_DIR_EL1) after its priority drop.
    fn deactivate(&self, intid: IntId);
    /// Makes physical CPU `pcpu` leave its guest (or WFI) and look at its vCPU again.
    fn kick(&self, pcpu: usize);
    /// Wakes every CPU waiting in WFE (SEV).
    fn wake_all(&self);

    /// This CPU's implemented list registers (ICH_VTR_EL2.ListRegs + 1).
    fn lr_count(&self) -> usize;
    /// ICH_LR<i>_EL2 of this CPU.
    fn read_lr(&self, i: usize) -> u64;
    /// Writes ICH_LR<i>_EL2 of this CPU.
    fn write_lr(&self, i: usize, value: u64);
    /// ICH_HCR_EL2 of this CPU.
    fn read_ich_hcr(&self) -> u64;
    /// Writes ICH_HCR_EL2 of this CPU (the next exception return synchronises it).
    fn write_ich_hcr(&self, value: u64);

    /// Drops every CPU TLB entry of the VM whose VTTBR_EL2 is `vttbr`, in every CPU.
    fn tlbi_vm(&self, vttbr: u64);
    /// Drops every SMMU TLB entry of `vmid` (stage 2 and nested), and waits for it.
    fn smmu_tlbi_vmid(&self, vmid: u16);
    /// Makes stage-2 descriptors just turned from invalid to valid visible to every CPU's table
    /// walker (DSB ISHST) before a faulting access is retried. Nothing is invalidated: no TLB
    /// holds an entry for an invalid descriptor (Arm ARM D8.14.1).
    fn stage2_published(&self);

    /// Makes this CPU's log lines from now on count against VM `vm`'s log rate limits (`None`:
    /// the hypervisor's own). Returns what it was, to put back.
    fn log_context(&self, vm: Option<usize>) -> Option<usize>;

    /// The system counter (CNTPCT_EL0).
    fn counter(&self) -> u64;
    /// Its frequency in Hz (CNTFRQ_EL0).
    fn counter_freq(&self) -> u64;
}

/// An access outside the VM's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("IPA range {ipa:#x}+{len:#x} is outside guest RAM")]
pub struct OutOfRam {
    /// Start of the access.
    pub ipa: Ipa,
    /// Its length.
    pub len: u64,
}

/// A VM's RAM as the hypervisor reads and writes it: the one checked accessor that turns an IPA
/// range into memory or an error; nothing else dereferences guest addresses. `arch` backs it
/// with the VM's physical RAM, host tests with a buffer.
///
/// Its RAM is zeroed lazily, 2 MiB block by block ([`scrub`]): `read` and the writes first make
/// every block they touch zeroed in this boot (zeroing a stale one there and then), so the
/// hypervisor never hands a guest, or acts on, a byte this boot did not write or zero.
pub trait GuestRam: Send + Sync + core::fmt::Debug {
    /// The IPA range it covers.
    fn ipa_range(&self) -> crate::platform::MemRange;
    /// Copies guest memory at `ipa` into `buf`.
    fn read(&self, ipa: Ipa, buf: &mut [u8]) -> Result<(), OutOfRam>;
    /// Copies `data` to guest memory at `ipa`, visible to a guest running with its MMU and
    /// caches off.
    fn write(&self, ipa: Ipa, data: &[u8]) -> Result<(), OutOfRam>;
    /// Copies `data` to guest memory at `ipa` for a guest that reads it through cacheable
    /// mappings: what an emulated device writes whose guest DT node says `dma-coherent` (the
    /// vSMMU's queues and CMD_SYNC MSIs, virtio rings), which needs no cache maintenance. Like
    /// `write`, it never writes into a block not zeroed yet in this boot.
    fn write_coherent(&self, ipa: Ipa, data: &[u8]) -> Result<(), OutOfRam> {
        self.write(ipa, data)
    }
    /// Which of its blocks are zeroed in this boot.
    fn scrub(&self) -> &scrub::Scrub;
    /// Zeroes `[ipa, ipa + len)` and cleans it to the point of coherency, whatever its blocks'
    /// state: only for the claimant of those blocks, or the loader while the table is closed
    /// ([`scrub::Scrub`]). Says how long each half took.
    fn zero(&self, ipa: Ipa, len: u64) -> Result<ZeroTime, OutOfRam>;

    /// Makes every block `[ipa, ipa + len)` touches zeroed in this boot (by `by`): what `read`
    /// and `write` do first, and what maps a block in stage 2 does.
    fn ensure_zeroed(&self, ipa: Ipa, len: u64, by: scrub::By) -> Result<(), OutOfRam> {
        self.scrub().ensure_range(ipa, len, by, &mut |r| {
            self.zero(Ipa(r.base), r.size).unwrap_or_default()
        })
    }
}

/// What zeroing guest RAM cost, in system-counter ticks (CNTPCT_EL0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroTime {
    /// Writing the zeroes (DC ZVA, or stores).
    pub zero: u64,
    /// Cleaning them to the point of coherency (DC CVAC).
    pub clean: u64,
    /// DC ZVA's block size in bytes; `None`: prohibited, plain stores were used.
    pub zva_block: Option<usize>,
}

/// The emulated SMMU's model reads the guest's tables and queues straight through the VM's RAM
/// (the `smmu` crate has no address types: what it is handed from a guest register is an IPA).
impl smmu::vsmmu::GuestMemory for &dyn GuestRam {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), smmu::vsmmu::GuestMemError> {
        GuestRam::read(*self, Ipa(ipa), buf).map_err(|e| smmu::vsmmu::GuestMemError {
            ipa: e.ipa.get(),
            len: e.len,
        })
    }

    /// The emulated devices' writes: every one of them is `dma-coherent` in the guest's DT.
    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), smmu::vsmmu::GuestMemError> {
        GuestRam::write_coherent(*self, Ipa(ipa), data).map_err(|e| smmu::vsmmu::GuestMemError {
            ipa: e.ipa.get(),
            len: e.len,
        })
    }
}

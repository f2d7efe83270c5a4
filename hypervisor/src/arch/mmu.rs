//! The hypervisor's own EL2 stage-1 translation: an identity map of RAM (normal, write-back) and of
//! the device ranges it drives (Device-nGnRE), built with `aarch64-paging`, text read-only.

use super::sysreg;
use aarch64_cpu::registers::{Readable, Writeable, ID_AA64MMFR0_EL1, MAIR_EL2, SCTLR_EL2, TCR_EL2};
use aarch64_paging::descriptor::El23Attributes;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{El2, MemoryRegion};
use spin::Once;

/// MAIR_EL2: the same attribute indices as boot/'s early map.
const MAIR_VALUE: u64 = boot::MAIR_EL2_VALUE;
const NORMAL: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::ATTRIBUTE_INDEX_0);
const DEVICE: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::XN);

/// Values a secondary CPU loads to join the primary's translation regime. Written once, then
/// cleaned to the point of coherency because secondaries read it with their MMU off.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct MmuConfig {
    ttbr0: u64,
    tcr: u64,
}

static CONFIG: Once<MmuConfig> = Once::new();
static IDMAP: spin::Mutex<Option<IdMap<El2>>> = spin::Mutex::new(None);

/// What to map.
#[derive(Debug)]
pub struct Layout<'a> {
    /// RAM ranges: normal memory.
    pub ram: &'a [(u64, u64)],
    /// The hypervisor's text (read-only, executable): start, end.
    pub text: (u64, u64),
    /// Device ranges: base, size.
    pub devices: &'a [(u64, u64)],
}

/// Builds the fine-grained identity map and switches to it from boot/'s early map (same MAIR and
/// TCR, so only TTBR0_EL2 changes while translation stays on).
///
/// # Safety
///
/// Must be called once, on the primary CPU, running on boot/'s early map; `layout` must cover every byte the
/// hypervisor touches afterwards (its image, stacks, heap, DTB, devices).
pub unsafe fn init_primary(layout: &Layout) -> Result<(), aarch64_paging::MapError> {
    let mut map = IdMap::new(0, El2);
    for &(base, size) in layout.ram {
        let region = MemoryRegion::new(base as usize, (base + size) as usize);
        map.map_range(&region, NORMAL | El23Attributes::XN)?;
    }
    let text = MemoryRegion::new(layout.text.0 as usize, layout.text.1 as usize);
    map.map_range(&text, NORMAL | El23Attributes::READ_ONLY)?;
    for &(base, size) in layout.devices {
        let region = MemoryRegion::new(base as usize, (base + size) as usize);
        map.map_range(&region, DEVICE)?;
    }
    let pa_range = ID_AA64MMFR0_EL1.get() & 0xf;
    // The same TCR_EL2 as boot/'s early map, so that switching maps is only a TTBR0 swap.
    let tcr = boot::TCR_EL2_BASE | (pa_range.min(5) << 16);
    let ttbr0 = map.root_address().0 as u64;
    let stored = CONFIG.call_once(|| MmuConfig { ttbr0, tcr });
    // Secondaries read it with their MMU off.
    sysreg::clean_dcache_range(
        stored as *const _ as usize,
        core::mem::size_of::<MmuConfig>(),
    );
    let cfg = *stored;
    // SAFETY: the caller guarantees the map covers everything in use.
    unsafe { enable(&cfg) };
    map.mark_active();
    *IDMAP.lock() = Some(map);
    Ok(())
}

/// Loads the configuration the primary built and turns the MMU on.
///
/// # Safety
///
/// Must run on a secondary CPU with its MMU off, after `init_primary` and after the primary
/// cleaned the hypervisor image to the point of coherency.
pub unsafe fn init_secondary() {
    let cfg = *CONFIG
        .get()
        .expect("primary set up the MMU before starting secondaries");
    // SAFETY: the same map the primary runs on covers everything the secondary touches.
    unsafe { enable(&cfg) };
}

/// # Safety
///
/// `cfg` must describe a complete identity map.
unsafe fn enable(cfg: &MmuConfig) {
    MAIR_EL2.set(MAIR_VALUE);
    TCR_EL2.set(cfg.tcr);
    // SAFETY: TTBR0_EL2 takes the root of a valid identity map (caller's guarantee).
    unsafe {
        core::arch::asm!("msr ttbr0_el2, {}", "isb", "tlbi alle2", "dsb nsh", "isb", in(reg) cfg.ttbr0)
    };
    // SCTLR_EL2: M, C, SA, I, plus RES1 bits (4, 5, 11, 16, 18, 22, 23, 28, 29); WXN.
    let sctlr = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 12) | (1 << 19) | 0x30c5_0830;
    SCTLR_EL2.set(sctlr);
    sysreg::isb();
}

/// Adds an identity device mapping after the MMU is on (for devices found late).
pub fn map_device(base: u64, size: u64) -> Result<(), aarch64_paging::MapError> {
    let mut guard = IDMAP.lock();
    let map = guard.as_mut().expect("MMU initialised");
    map.map_range(
        &MemoryRegion::new(base as usize, (base + size) as usize),
        DEVICE,
    )
}

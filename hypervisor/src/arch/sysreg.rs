//! System registers that `aarch64-cpu` 11.2 does not name or cannot write (ICC_IAR1/EOIR1/DIR,
//! PMR, BPR1, CTLR, IGRPEN1 and SGI1R of the GICv3 CPU interface; HCRX_EL2; ID_AA64ISAR2 and
//! MMFR3; the ID group 3 space by encoding), the ICH_LR<n>_EL2 array by index over the crate's
//! registers, and cache/TLB maintenance. Every access is a single instruction.

use core::arch::asm;
#[rustfmt::skip]
use aarch64_cpu::registers::{Readable, Writeable, ICH_LR0_EL2, ICH_LR1_EL2, ICH_LR2_EL2, ICH_LR3_EL2, ICH_LR4_EL2, ICH_LR5_EL2, ICH_LR6_EL2, ICH_LR7_EL2, ICH_LR8_EL2, ICH_LR9_EL2, ICH_LR10_EL2, ICH_LR11_EL2, ICH_LR12_EL2, ICH_LR13_EL2, ICH_LR14_EL2, ICH_LR15_EL2};

macro_rules! sysreg_rw {
    ($read:ident, $write:ident, $enc:literal, $doc:literal) => {
        #[doc = concat!("Reads ", $doc, ".")]
        #[inline(always)]
        #[allow(dead_code)]
        pub fn $read() -> u64 {
            let v: u64;
            // SAFETY: reading this GIC/EL2 system register has no side effect on memory; the
            // hypervisor runs at EL2 where it is accessible (ICC_SRE_EL2.SRE is set at boot).
            unsafe { asm!(concat!("mrs {}, ", $enc), out(reg) v, options(nomem, nostack)) };
            v
        }
        #[doc = concat!("Writes ", $doc, ".")]
        #[inline(always)]
        #[allow(dead_code)]
        pub fn $write(v: u64) {
            // SAFETY: writing this register changes interrupt or virtualization state only,
            // never memory that Rust code relies on.
            unsafe { asm!(concat!("msr ", $enc, ", {}"), in(reg) v, options(nostack)) };
        }
    };
}

sysreg_rw!(
    icc_iar1,
    _icc_iar1_w,
    "s3_0_c12_c12_0",
    "ICC_IAR1_EL1 (acknowledge)"
);
sysreg_rw!(
    _icc_eoir1_r,
    icc_eoir1,
    "s3_0_c12_c12_1",
    "ICC_EOIR1_EL1 (priority drop)"
);
sysreg_rw!(
    _icc_dir_r,
    icc_dir,
    "s3_0_c12_c11_1",
    "ICC_DIR_EL1 (deactivate)"
);
sysreg_rw!(icc_pmr, set_icc_pmr, "s3_0_c4_c6_0", "ICC_PMR_EL1");
sysreg_rw!(icc_bpr1, set_icc_bpr1, "s3_0_c12_c12_3", "ICC_BPR1_EL1");
// aarch64-cpu 11.2 has ICC_CTLR_EL1 read-only (for its ExtRange field); EOImode is written here.
sysreg_rw!(icc_ctlr, set_icc_ctlr, "s3_0_c12_c12_4", "ICC_CTLR_EL1");
sysreg_rw!(
    icc_igrpen1,
    set_icc_igrpen1,
    "s3_0_c12_c12_7",
    "ICC_IGRPEN1_EL1"
);
sysreg_rw!(_icc_sgi1r_r, icc_sgi1r, "s3_0_c12_c11_5", "ICC_SGI1R_EL1");
sysreg_rw!(
    id_aa64isar2,
    _set_id_aa64isar2,
    "s3_0_c0_c6_2",
    "ID_AA64ISAR2_EL1"
);
sysreg_rw!(
    id_aa64mmfr3,
    _set_id_aa64mmfr3,
    "s3_0_c0_c7_3",
    "ID_AA64MMFR3_EL1"
);
sysreg_rw!(_hcrx_el2, set_hcrx_el2, "s3_4_c1_c2_2", "HCRX_EL2");

/// Reads ID group 3 register (op0 3, op1 0, CRn 0, CRm `crm` 1-7, op2 `op2`) at EL2; 0 for
/// anything else. Unallocated encodings in this space are RAZ (Arm ARM D19.2.1), so every one
/// may be read.
pub fn id_reg(crm: u8, op2: u8) -> u64 {
    macro_rules! id_read {
        ($enc:literal) => {{
            let v: u64;
            // SAFETY: reading an ID register has no side effect; the ID space is readable at
            // EL2 and its unallocated encodings are RAZ.
            unsafe { asm!(concat!("mrs {}, ", $enc), out(reg) v, options(nomem, nostack)) };
            v
        }};
    }
    match (crm, op2) {
        (1, 0) => id_read!("s3_0_c0_c1_0"),
        (1, 1) => id_read!("s3_0_c0_c1_1"),
        (1, 2) => id_read!("s3_0_c0_c1_2"),
        (1, 3) => id_read!("s3_0_c0_c1_3"),
        (1, 4) => id_read!("s3_0_c0_c1_4"),
        (1, 5) => id_read!("s3_0_c0_c1_5"),
        (1, 6) => id_read!("s3_0_c0_c1_6"),
        (1, 7) => id_read!("s3_0_c0_c1_7"),
        (2, 0) => id_read!("s3_0_c0_c2_0"),
        (2, 1) => id_read!("s3_0_c0_c2_1"),
        (2, 2) => id_read!("s3_0_c0_c2_2"),
        (2, 3) => id_read!("s3_0_c0_c2_3"),
        (2, 4) => id_read!("s3_0_c0_c2_4"),
        (2, 5) => id_read!("s3_0_c0_c2_5"),
        (2, 6) => id_read!("s3_0_c0_c2_6"),
        (2, 7) => id_read!("s3_0_c0_c2_7"),
        (3, 0) => id_read!("s3_0_c0_c3_0"),
        (3, 1) => id_read!("s3_0_c0_c3_1"),
        (3, 2) => id_read!("s3_0_c0_c3_2"),
        (3, 3) => id_read!("s3_0_c0_c3_3"),
        (3, 4) => id_read!("s3_0_c0_c3_4"),
        (3, 5) => id_read!("s3_0_c0_c3_5"),
        (3, 6) => id_read!("s3_0_c0_c3_6"),
        (3, 7) => id_read!("s3_0_c0_c3_7"),
        (4, 0) => id_read!("s3_0_c0_c4_0"),
        (4, 1) => id_read!("s3_0_c0_c4_1"),
        (4, 2) => id_read!("s3_0_c0_c4_2"),
        (4, 3) => id_read!("s3_0_c0_c4_3"),
        (4, 4) => id_read!("s3_0_c0_c4_4"),
        (4, 5) => id_read!("s3_0_c0_c4_5"),
        (4, 6) => id_read!("s3_0_c0_c4_6"),
        (4, 7) => id_read!("s3_0_c0_c4_7"),
        (5, 0) => id_read!("s3_0_c0_c5_0"),
        (5, 1) => id_read!("s3_0_c0_c5_1"),
        (5, 2) => id_read!("s3_0_c0_c5_2"),
        (5, 3) => id_read!("s3_0_c0_c5_3"),
        (5, 4) => id_read!("s3_0_c0_c5_4"),
        (5, 5) => id_read!("s3_0_c0_c5_5"),
        (5, 6) => id_read!("s3_0_c0_c5_6"),
        (5, 7) => id_read!("s3_0_c0_c5_7"),
        (6, 0) => id_read!("s3_0_c0_c6_0"),
        (6, 1) => id_read!("s3_0_c0_c6_1"),
        (6, 2) => id_read!("s3_0_c0_c6_2"),
        (6, 3) => id_read!("s3_0_c0_c6_3"),
        (6, 4) => id_read!("s3_0_c0_c6_4"),
        (6, 5) => id_read!("s3_0_c0_c6_5"),
        (6, 6) => id_read!("s3_0_c0_c6_6"),
        (6, 7) => id_read!("s3_0_c0_c6_7"),
        (7, 0) => id_read!("s3_0_c0_c7_0"),
        (7, 1) => id_read!("s3_0_c0_c7_1"),
        (7, 2) => id_read!("s3_0_c0_c7_2"),
        (7, 3) => id_read!("s3_0_c0_c7_3"),
        (7, 4) => id_read!("s3_0_c0_c7_4"),
        (7, 5) => id_read!("s3_0_c0_c7_5"),
        (7, 6) => id_read!("s3_0_c0_c7_6"),
        (7, 7) => id_read!("s3_0_c0_c7_7"),
        _ => 0,
    }
}

/// Reads ICH_LR<n>_EL2; 0 for an `n` past the 16 the architecture has.
pub fn ich_lr(n: usize) -> u64 {
    match n {
        0 => ICH_LR0_EL2.get(),
        1 => ICH_LR1_EL2.get(),
        2 => ICH_LR2_EL2.get(),
        3 => ICH_LR3_EL2.get(),
        4 => ICH_LR4_EL2.get(),
        5 => ICH_LR5_EL2.get(),
        6 => ICH_LR6_EL2.get(),
        7 => ICH_LR7_EL2.get(),
        8 => ICH_LR8_EL2.get(),
        9 => ICH_LR9_EL2.get(),
        10 => ICH_LR10_EL2.get(),
        11 => ICH_LR11_EL2.get(),
        12 => ICH_LR12_EL2.get(),
        13 => ICH_LR13_EL2.get(),
        14 => ICH_LR14_EL2.get(),
        15 => ICH_LR15_EL2.get(),
        _ => 0,
    }
}

/// Writes ICH_LR<n>_EL2 (`n` past the 16 the architecture has, or beyond ICH_VTR.ListRegs, is
/// ignored: the caller never writes one it did not count).
pub fn set_ich_lr(n: usize, v: u64) {
    match n {
        0 => ICH_LR0_EL2.set(v),
        1 => ICH_LR1_EL2.set(v),
        2 => ICH_LR2_EL2.set(v),
        3 => ICH_LR3_EL2.set(v),
        4 => ICH_LR4_EL2.set(v),
        5 => ICH_LR5_EL2.set(v),
        6 => ICH_LR6_EL2.set(v),
        7 => ICH_LR7_EL2.set(v),
        8 => ICH_LR8_EL2.set(v),
        9 => ICH_LR9_EL2.set(v),
        10 => ICH_LR10_EL2.set(v),
        11 => ICH_LR11_EL2.set(v),
        12 => ICH_LR12_EL2.set(v),
        13 => ICH_LR13_EL2.set(v),
        14 => ICH_LR14_EL2.set(v),
        15 => ICH_LR15_EL2.set(v),
        _ => {}
    }
}

/// Instruction synchronization barrier.
#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier has no memory effect beyond ordering.
    unsafe { asm!("isb", options(nostack)) };
}

/// Full-system data synchronization barrier.
#[inline(always)]
pub fn dsb_sy() {
    // SAFETY: a barrier has no memory effect beyond ordering.
    unsafe { asm!("dsb sy", options(nostack)) };
}

/// Inner-shareable store barrier: table writes reach every CPU's walker (and the SMMU's, which
/// is coherent) before what follows.
#[inline(always)]
pub fn dsb_ishst() {
    // SAFETY: a barrier has no memory effect beyond ordering.
    unsafe { asm!("dsb ishst", options(nostack)) };
}

/// Whether a physical IRQ is pending at this CPU (ISR_EL1.I, read at EL2: the physical
/// state, whatever HCR_EL2.IMO says), masked at EL2 as it is.
#[inline(always)]
pub fn irq_pending() -> bool {
    let isr: u64;
    // SAFETY: reading ISR_EL1 has no side effect.
    unsafe { asm!("mrs {}, isr_el1", out(reg) isr, options(nomem, nostack)) };
    isr & (1 << 7) != 0
}

/// Wakes CPUs waiting in WFE.
#[inline(always)]
pub fn sev() {
    // SAFETY: SEV only signals an event.
    unsafe { asm!("dsb ish", "sev", options(nostack)) };
}

/// Waits for an event.
#[inline(always)]
pub fn wfe() {
    // SAFETY: WFE suspends until an event; no memory effect.
    unsafe { asm!("wfe", options(nostack)) };
}

/// Waits for an interrupt (a masked one still wakes the CPU).
#[inline(always)]
pub fn wfi() {
    // SAFETY: WFI suspends until an interrupt is pending; no memory effect.
    unsafe { asm!("dsb sy", "wfi", options(nostack)) };
}

/// Smallest data cache line size, from CTR_EL0.DminLine.
fn dcache_line() -> usize {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effect.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    4 << ((ctr >> 16) & 0xf)
}

/// Cleans `[start, start + len)` to the point of coherency, so that agents reading memory with
/// caches off (a guest booting with its MMU off, a secondary CPU before its MMU is on) see it.
pub fn clean_dcache_range(start: usize, len: usize) {
    let line = dcache_line();
    let mut p = start & !(line - 1);
    while p < start + len {
        // SAFETY: DC CVAC on a mapped address writes back a cache line; no data changes.
        unsafe { asm!("dc cvac, {}", in(reg) p, options(nostack)) };
        p += line;
    }
    dsb_sy();
}

/// DC ZVA's block size in bytes (DCZID_EL0.BS: log2 of 4-byte words), or `None` where
/// DCZID_EL0.DZP prohibits the instruction.
pub fn zva_block() -> Option<usize> {
    let dczid: u64;
    // SAFETY: reading DCZID_EL0 has no side effect.
    unsafe { asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack)) };
    (dczid & (1 << 4) == 0).then_some(4usize << (dczid & 0xf))
}

/// Zeroes `[start, start + len)` with DC ZVA where the CPU allows it (one instruction per
/// block instead of a store loop: it matters for a whole guest's RAM, above all under
/// emulation), with plain stores otherwise. It is not cleaned: [`clean_dcache_range`] is the
/// caller's, for agents that read it with caches off.
///
/// # Safety
///
/// The caller must own the range (nothing else reads or writes it meanwhile, no Rust
/// reference points into it) and it must be mapped as normal memory.
pub unsafe fn zero_range(start: usize, len: usize) {
    let end = start + len;
    let whole = |b: usize| (start.next_multiple_of(b), end & !(b - 1));
    let Some(block) = zva_block().filter(|&b| whole(b).0 < whole(b).1) else {
        // SAFETY: the caller owns the range.
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, len) };
        return;
    };
    let (first, last) = whole(block);
    // SAFETY: the caller owns the range; these are its parts outside whole DC ZVA blocks.
    unsafe {
        core::ptr::write_bytes(start as *mut u8, 0, first - start);
        core::ptr::write_bytes(last as *mut u8, 0, end - last);
    }
    let mut p = first;
    while p < last {
        // SAFETY: DC ZVA zeroes one aligned block inside the caller's range.
        unsafe { asm!("dc zva, {}", in(reg) p, options(nostack)) };
        p += block;
    }
}

/// Invalidates `[start, start + len)` to the point of coherency, discarding lines that may have
/// been cached before the caller wrote the memory with caches off.
///
/// # Safety
///
/// Any dirty data in the range is lost: the caller must own the range and have written it with
/// caches off (or not care about its contents).
pub unsafe fn invalidate_dcache_range(start: usize, len: usize) {
    let line = dcache_line();
    let mut p = start & !(line - 1);
    while p < start + len {
        // SAFETY: the caller owns the range and accepts losing cached dirty data.
        unsafe { asm!("dc ivac, {}", in(reg) p, options(nostack)) };
        p += line;
    }
    dsb_sy();
}

/// Invalidates every stage-1 and stage-2 TLB entry of the VMID of `vttbr` (a VTTBR_EL2 value),
/// inner shareable, from a CPU that may be running another VM's vCPU or none: VTTBR_EL2 is
/// switched for the TLBI and put back (EL2's own accesses do not go through stage 2).
pub fn tlbi_vmid(vttbr: u64) {
    let old: u64;
    // SAFETY: reading a system register has no side effect.
    unsafe { asm!("mrs {}, vttbr_el2", out(reg) old, options(nostack, nomem)) };
    // VTTBR_EL2 only selects the stage-2 tables and VMID of EL1/EL0 accesses, none of which
    // run until it is restored below.
    // SAFETY: so switching it is harmless here; TLB invalidation does not touch memory contents.
    unsafe {
        asm!(
            "msr vttbr_el2, {new}",
            "isb",
            "dsb ishst",
            "tlbi vmalls12e1is",
            "dsb ish",
            "msr vttbr_el2, {old}",
            "isb",
            new = in(reg) vttbr,
            old = in(reg) old,
            options(nostack)
        )
    };
}

/// Invalidates every stage-1 and stage-2 TLB entry of the current VMID, inner shareable.
pub fn tlbi_vmalls12e1is() {
    // SAFETY: TLB invalidation has no effect on memory contents.
    unsafe {
        asm!(
            "dsb ishst",
            "tlbi vmalls12e1is",
            "dsb ish",
            "isb",
            options(nostack)
        )
    };
}

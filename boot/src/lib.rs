//! The first instructions of the hypervisor at EL2: the arm64 Image header (so QEMU `-kernel` and
//! U-Boot `booti` load it), self-relocation of the position-independent image, BSS clearing,
//! per-CPU stacks, the EL2 exception vector table, the trap frame save/restore and a vCPU's fresh
//! entry (the only code that touches FP/SIMD registers: it zeroes them).
//!
//! Nothing here runs Rust before the stack, BSS and relocations are set up. The Rust side provides:
//! `hv_primary_main(dtb: usize, image_base: usize) -> !`, `hv_secondary_main(cpu: usize) -> !`,
//! `hv_lower_exception(frame: &mut TrapFrame, kind: u64)` and
//! `hv_current_exception(frame: &mut TrapFrame, kind: u64)`.
#![no_std]
// The frame offsets and early-map constants are used only by the aarch64 assembly.
#![cfg_attr(
    not(all(target_arch = "aarch64", target_os = "none")),
    allow(dead_code)
)]

use core::mem::{offset_of, size_of};

/// Most physical CPUs the hypervisor drives, each with its own EL2 stack (64: HiSilicon D05 has
/// as many). A DT with more is told so at boot, and the CPUs beyond stay off.
pub const MAX_CPUS: usize = 64;
/// Bytes of EL2 stack per CPU.
pub const STACK_SIZE: usize = 64 * 1024;

/// Why the vector table was entered, passed to the Rust handlers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ExceptionKind {
    /// Synchronous exception (ESR_EL2 says which).
    Sync = 0,
    /// Physical IRQ.
    Irq = 1,
    /// Physical FIQ.
    Fiq = 2,
    /// SError.
    SError = 3,
}

impl ExceptionKind {
    /// Decodes the value the vector stub passes.
    pub fn from_raw(raw: u64) -> Self {
        match raw {
            0 => Self::Sync,
            1 => Self::Irq,
            2 => Self::Fiq,
            _ => Self::SError,
        }
    }
}

/// Register state of the interrupted context, saved on the EL2 stack by every vector entry and
/// restored (possibly modified) on return. For a trap from a guest this *is* the vCPU's
/// general-purpose and PC/PSTATE state.
///
/// It holds no FP/SIMD state: the hypervisor is built for `aarch64-unknown-none-softfloat` and
/// `qemu/check-no-fp.sh` proves that no instruction of it but [`enter`]'s zeroing touches an
/// FP/SIMD register, so the guest's V registers, FPCR and FPSR stay in the CPU across every trap.
/// That is enough because each vCPU is pinned to its own physical CPU for the VM's whole life
/// (static partitioning: nothing else ever runs there to need them), as with KVM's lazy FP
/// switching when nothing else is scheduled.
#[derive(Clone, Debug, Default)]
#[repr(C, align(16))]
pub struct TrapFrame {
    /// x0 to x30.
    pub x: [u64; 31],
    /// ELR_EL2: where the interrupted context resumes.
    pub elr: u64,
    /// SPSR_EL2: its PSTATE.
    pub spsr: u64,
    /// CNTPCT_EL0 at the vector's first instruction (the trap profile's start).
    pub entry_ts: u64,
    /// CNTPCT_EL0 just before the ERET of the last return through this frame slot: the vector
    /// code writes it there after the restore, and the next exception's save leaves it alone,
    /// so the next trap's handler reads when the previous one really ended.
    pub eret_ts: u64,
}

impl TrapFrame {
    /// A frame that enters EL1h at `pc` with DAIF masked and `x0 = arg0`, as Linux's boot
    /// protocol and PSCI CPU_ON require. Its other general-purpose registers are zero; [`enter`]
    /// zeroes the FP/SIMD registers, FPCR and FPSR as it enters it.
    pub fn new_el1_entry(pc: u64, arg0: u64) -> Self {
        let mut f = Self::default();
        f.x[0] = arg0;
        f.elr = pc;
        f.spsr = SPSR_EL1H_DAIF_MASKED;
        f
    }
}

/// MAIR_EL2 shared by the early and the final EL2 map: index 0 Normal inner/outer write-back
/// non-transient (0xff), index 1 Device-nGnRE (0x04).
pub const MAIR_EL2_VALUE: u64 = 0xff | (0x04 << 8);
/// TCR_EL2 (non-VHE) without PS: T0SZ = 16 (48-bit VA, level-0 root), IRGN0 = ORGN0 = write-back,
/// SH0 inner shareable, TG0 = 4 KiB, RES1 bits 23 and 31. PS (bits 18:16) comes from
/// ID_AA64MMFR0_EL1.PARange, capped at 48 bits.
pub const TCR_EL2_BASE: u64 = 16 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (1 << 31);
/// SCTLR_EL2 bits that turn translation and caches on: M, C, I.
pub const SCTLR_EL2_MMU_ON: u64 = (1 << 0) | (1 << 2) | (1 << 12);
/// Early map 1 GiB block: Device-nGnRE (AttrIndx 1), AF, XN (bit 54).
const EARLY_DEVICE_BLOCK: u64 = 0b01 | (1 << 2) | (1 << 10) | (1 << 54);
/// Early map 1 GiB block: Normal write-back (AttrIndx 0), inner shareable, AF.
const EARLY_NORMAL_BLOCK: u64 = 0b01 | (3 << 8) | (1 << 10);

/// SPSR_EL2 for entering EL1h (M = 0b0101) with D, A, I, F masked.
pub const SPSR_EL1H_DAIF_MASKED: u64 = 0x3c5;

const FRAME_SIZE: usize = size_of::<TrapFrame>();
const OFF_X30: usize = offset_of!(TrapFrame, x) + 30 * 8;
const OFF_ELR: usize = offset_of!(TrapFrame, elr);
const OFF_SPSR: usize = offset_of!(TrapFrame, spsr);
const OFF_ENTRY_TS: usize = offset_of!(TrapFrame, entry_ts);
const OFF_ERET_TS: usize = offset_of!(TrapFrame, eret_ts);
const _: () = assert!(
    OFF_ELR == OFF_X30 + 8,
    "asm stores x30 and ELR with one stp"
);
const _: () = assert!(FRAME_SIZE.is_multiple_of(16) && FRAME_SIZE < 4096);

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
mod asm {
    use super::*;

    core::arch::global_asm!(
        r#"
.section .text.head, "ax"
.global _start
_start:
    /* arm64 Image header, Documentation/arch/arm64/booting.rst */
    b       primary_entry           /* code0 */
    .long   0                       /* code1 */
    .quad   0                       /* text_offset */
    .quad   __image_size            /* image_size, BSS included */
    .quad   0xa                     /* flags: LE, 4 KiB pages, any 2 MiB-aligned base */
    .quad   0, 0, 0                 /* res2-4 */
    .ascii  "ARM\x64"               /* magic */
    .long   0                       /* res5 */

.section .text.boot, "ax"
primary_entry:
    mov     x19, x0                 /* DTB physical address */
    mrs     x1, CurrentEL
    cmp     x1, #(2 << 2)
    b.ne    park                    /* we must own EL2; nothing to report to without a UART */
    adr     x20, _start             /* run-time base == load address (linked at 0) */

    /* Apply R_AARCH64_RELATIVE relocations: *(base + r_offset) = base + r_addend. */
    adrp    x1, __rela_start
    add     x1, x1, :lo12:__rela_start
    adrp    x2, __rela_end
    add     x2, x2, :lo12:__rela_end
1:  cmp     x1, x2
    b.hs    2f
    ldp     x3, x4, [x1], #16       /* r_offset, r_info */
    ldr     x5, [x1], #8            /* r_addend */
    cmp     w4, #1027               /* R_AARCH64_RELATIVE */
    b.ne    park
    add     x5, x5, x20
    str     x5, [x20, x3]
    b       1b
2:
    /* Clear BSS (stacks and boot heap included). */
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
3:  cmp     x1, x2
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       3b
4:
    bl      early_mmu
    mov     x0, #0
    bl      set_stack_and_vectors
    mov     x0, x19
    mov     x1, x20
    bl      hv_primary_main
    b       park

/* Turns the MMU and caches on with a coarse identity map before any Rust runs, so that Rust's
 * atomics (exclusive loads/stores, which need Normal cacheable memory on real hardware) and
 * unaligned-tolerant code see ordinary memory. One level-0 table -> one level-1 table of 1 GiB
 * blocks covering the first 512 GiB: Device-nGnRE everywhere, Normal write-back for the
 * block(s) holding the image (with its BSS: stacks and boot heap). TCR_EL2 is the same one
 * the Rust side uses for its fine-grained map, which then only swaps TTBR0_EL2.
 * x20 = image base. Clobbers x0-x7. */
early_mmu:
    /* Lines the loader may have left for memory written above with caches off. */
    adrp    x1, __image_start
    add     x1, x1, :lo12:__image_start
    adrp    x2, __image_end
    add     x2, x2, :lo12:__image_end
    mrs     x3, ctr_el0
    ubfx    x3, x3, #16, #4
    mov     x4, #4
    lsl     x3, x4, x3              /* smallest D-cache line */
    sub     x4, x3, #1
    bic     x1, x1, x4
5:  dc      ivac, x1
    add     x1, x1, x3
    cmp     x1, x2
    b.lo    5b
    dsb     sy

    adrp    x1, __early_l1
    add     x1, x1, :lo12:__early_l1
    mov     x2, #0
    ldr     x3, ={early_device}
6:  lsl     x4, x2, #30
    orr     x4, x4, x3
    str     x4, [x1, x2, lsl #3]
    add     x2, x2, #1
    cmp     x2, #512
    b.lo    6b
    lsr     x5, x20, #30            /* first block of the image */
    adrp    x6, __image_end
    add     x6, x6, :lo12:__image_end
    sub     x6, x6, #1
    lsr     x6, x6, #30             /* last block of the image */
    ldr     x3, ={early_normal}
7:  lsl     x4, x5, #30
    orr     x4, x4, x3
    str     x4, [x1, x5, lsl #3]
    add     x5, x5, #1
    cmp     x5, x6
    b.ls    7b
    adrp    x2, __early_l0
    add     x2, x2, :lo12:__early_l0
    orr     x4, x1, #3              /* table descriptor -> level 1 */
    str     x4, [x2]
    dsb     sy

    ldr     x3, ={mair}
    msr     mair_el2, x3
    mrs     x3, id_aa64mmfr0_el1
    and     x3, x3, #0xf
    cmp     x3, #5
    mov     x4, #5
    csel    x3, x3, x4, ls          /* PS: at most 48 bits */
    ldr     x4, ={tcr_base}
    orr     x4, x4, x3, lsl #16
    msr     tcr_el2, x4
    msr     ttbr0_el2, x2
    isb
    tlbi    alle2
    dsb     nsh
    isb
    mrs     x3, sctlr_el2
    ldr     x4, ={sctlr_on}
    orr     x3, x3, x4
    msr     sctlr_el2, x3
    isb
    ret

/* PSCI CPU_ON entry point; x0 = logical CPU index (the context_id we passed). */
.global secondary_entry
secondary_entry:
    mov     x19, x0
    bl      set_stack_and_vectors
    mov     x0, x19
    bl      hv_secondary_main
    b       park

/* x0 = logical CPU index. Clobbers x1, x2. */
set_stack_and_vectors:
    cmp     x0, #{max_cpus}
    b.hs    park
    adrp    x1, __stacks_start
    add     x1, x1, :lo12:__stacks_start
    add     x2, x0, #1
    mov     x3, #{stack_size}
    madd    x1, x2, x3, x1          /* top of this CPU's stack */
    mov     sp, x1
    adrp    x1, __vectors
    add     x1, x1, :lo12:__vectors
    msr     vbar_el2, x1
    isb
    ret

.global park
park:
    wfe
    b       park

.macro SAVE_FRAME
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp, #0]
    mrs     x0, cntpct_el0
    str     x0, [sp, #{off_entry_ts}]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x0, elr_el2
    mrs     x1, spsr_el2
    stp     x30, x0, [sp, #{off_x30}]
    str     x1, [sp, #{off_spsr}]
.endm

.section .text.vectors, "ax"
.balign 0x800
.global __vectors
__vectors:
    /* Current EL with SP_EL0: never used by the hypervisor. */
    .balign 0x80
    b       current_sync
    .balign 0x80
    b       current_irq
    .balign 0x80
    b       current_fiq
    .balign 0x80
    b       current_serror
    /* Current EL with SP_ELx: a fault in the hypervisor itself. */
    .balign 0x80
    b       current_sync
    .balign 0x80
    b       current_irq
    .balign 0x80
    b       current_fiq
    .balign 0x80
    b       current_serror
    /* Lower EL using AArch64: the guest. */
    .balign 0x80
    b       lower_sync
    .balign 0x80
    b       lower_irq
    .balign 0x80
    b       lower_fiq
    .balign 0x80
    b       lower_serror
    /* Lower EL using AArch32: guests are AArch64 only (HCR_EL2.RW=1). */
    .balign 0x80
    b       lower_sync
    .balign 0x80
    b       lower_irq
    .balign 0x80
    b       lower_fiq
    .balign 0x80
    b       lower_serror

/* A vector's body: save the interrupted context, call `handler(frame, kind)`, return into the
 * (possibly modified) frame. */
.macro HANDLER name, kind, handler
\name:
    SAVE_FRAME
    mov     x0, sp
    mov     x1, #\kind
    bl      \handler
    b       restore_frame_and_eret
.endm

.section .text.boot, "ax"
    HANDLER lower_sync, 0, hv_lower_exception
    HANDLER lower_irq, 1, hv_lower_exception
    HANDLER lower_fiq, 2, hv_lower_exception
    HANDLER lower_serror, 3, hv_lower_exception
    HANDLER current_sync, 0, hv_current_exception
    HANDLER current_irq, 1, hv_current_exception
    HANDLER current_fiq, 2, hv_current_exception
    HANDLER current_serror, 3, hv_current_exception

/* Loads the frame at x0 straight into the general-purpose registers (it may live anywhere, even
 * on the stack being reset) and ERETs with sp = x1 (the top of this CPU's stack). With `stamp`,
 * CNTPCT_EL0 goes into the frame's eret_ts slot after the restore (the trap profile's end of the
 * exit); otherwise nothing is written to memory. */
.macro LOAD_FRAME_ERET stamp
    mov     sp, x1
    ldr     x3, [x0, #{off_spsr}]
    ldp     x30, x2, [x0, #{off_x30}]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    .if \stamp
    mrs     x1, cntpct_el0
    str     x1, [x0, #{off_eret_ts}]
    .endif
    ldp     x0, x1, [x0, #0]
    eret
.endm

/* Pops the frame at sp and returns from the exception into it. The guest's FP/SIMD registers,
 * FPCR and FPSR were never saved: no code at EL2 touches them (softfloat target, checked by
 * qemu/check-no-fp.sh), so they still hold what the guest left there. The frame slot stays below
 * sp, where the next exception's frame goes: its eret_ts survives for that handler to read. */
restore_frame_and_eret:
    mov     x0, sp
    add     x1, sp, #{frame}
    LOAD_FRAME_ERET 1

/* enter_fresh_frame(frame: *const TrapFrame, stack_top: usize): enters a vCPU afresh (power-on,
 * CPU_ON, a VM's boot or reset). Zeroes V0-V31, FPCR and FPSR, so that nothing an earlier boot of
 * the VM, another guest's image or the firmware left in them reaches this one (the traps never
 * switch them), then loads the frame as restore_frame_and_eret does (without the profile's stamp).
 *
 * The only code of the hypervisor that touches FP/SIMD state (qemu/check-no-fp.sh allows this
 * symbol alone): the target has no FP feature, so the assembler gets it for these lines only.
 * CPTR_EL2.TFP is clear here (configure_el2 ran), so none of it traps. */
.global enter_fresh_frame
enter_fresh_frame:
    .arch_extension fp
    .arch_extension simd
    movi    v0.2d, #0
    movi    v1.2d, #0
    movi    v2.2d, #0
    movi    v3.2d, #0
    movi    v4.2d, #0
    movi    v5.2d, #0
    movi    v6.2d, #0
    movi    v7.2d, #0
    movi    v8.2d, #0
    movi    v9.2d, #0
    movi    v10.2d, #0
    movi    v11.2d, #0
    movi    v12.2d, #0
    movi    v13.2d, #0
    movi    v14.2d, #0
    movi    v15.2d, #0
    movi    v16.2d, #0
    movi    v17.2d, #0
    movi    v18.2d, #0
    movi    v19.2d, #0
    movi    v20.2d, #0
    movi    v21.2d, #0
    movi    v22.2d, #0
    movi    v23.2d, #0
    movi    v24.2d, #0
    movi    v25.2d, #0
    movi    v26.2d, #0
    movi    v27.2d, #0
    movi    v28.2d, #0
    movi    v29.2d, #0
    movi    v30.2d, #0
    movi    v31.2d, #0
    msr     fpcr, xzr
    msr     fpsr, xzr
    .arch_extension nosimd
    .arch_extension nofp
    LOAD_FRAME_ERET 0

.section .bss.early_pt, "aw", @nobits
.balign 4096
__early_l0:
    .space  4096
__early_l1:
    .space  4096

.section .bss.stacks, "aw", @nobits
.balign 4096
.global __stacks_start
__stacks_start:
    .space  {max_cpus} * {stack_size}
"#,
        max_cpus = const MAX_CPUS,
        stack_size = const STACK_SIZE,
        early_device = const EARLY_DEVICE_BLOCK,
        early_normal = const EARLY_NORMAL_BLOCK,
        mair = const MAIR_EL2_VALUE,
        tcr_base = const TCR_EL2_BASE,
        sctlr_on = const SCTLR_EL2_MMU_ON,
        frame = const FRAME_SIZE,
        off_x30 = const OFF_X30,
        off_spsr = const OFF_SPSR,
        off_entry_ts = const OFF_ENTRY_TS,
        off_eret_ts = const OFF_ERET_TS,
    );

    extern "C" {
        fn enter_fresh_frame(frame: *const TrapFrame, stack_top: usize) -> !;
        static __stacks_start: u8;
        fn secondary_entry();
    }

    /// Enters a vCPU afresh (power-on, CPU_ON, a VM's boot or reset): zeroes the FP/SIMD
    /// registers, FPCR and FPSR, loads `frame` into the CPU and returns from the exception into
    /// it (ERET), with this CPU's EL2 stack reset to empty: every Rust frame on it is abandoned
    /// and nothing above this call runs again. Not for resuming a vCPU after a trap: that keeps
    /// its FP/SIMD state, which lives in the registers only.
    ///
    /// # Safety
    ///
    /// `cpu` must be the calling CPU's logical index, and nothing on its EL2 stack may be
    /// borrowed by anyone else (the stack is reused from the top).
    pub unsafe fn enter(cpu: usize, frame: &TrapFrame) -> ! {
        assert!(cpu < MAX_CPUS);
        let base = core::ptr::addr_of!(__stacks_start) as usize;
        let top = base + (cpu + 1) * STACK_SIZE;
        // SAFETY: `frame` is a valid TrapFrame; enter_fresh_frame only reads it and writes no
        // memory before the ERET (it zeroes FP/SIMD registers, which no EL2 code relies on);
        // the caller guarantees the stack may be reset.
        unsafe { enter_fresh_frame(frame, top) }
    }

    /// Physical address of the secondary CPU entry point, for PSCI CPU_ON.
    pub fn secondary_entry_addr() -> usize {
        secondary_entry as *const () as usize
    }
}

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub use asm::{enter, secondary_entry_addr};

//! GICv3 register offsets and field encodings (IHI 0069H chapter 12), restricted to what the
//! virtual distributor/redistributor model decodes. Offsets are relative to the frame they live in:
//! GICD_* to the distributor frame, GICR_* (RD_base) to a redistributor's first 64 KiB frame, and
//! the SGI_base registers already include the 0x10000 frame offset.

/// Size of the distributor frame (IHI 0069H 12.8).
pub const GICD_FRAME_SIZE: u64 = 0x1_0000;
/// Size of one redistributor (RD_base + SGI_base, no VLPI frames because GICR_TYPER.VLPIS=0).
pub const GICR_FRAME_SIZE: u64 = 0x2_0000;
/// Offset of the SGI_base frame inside a redistributor.
pub const GICR_SGI_BASE: u64 = 0x1_0000;

// ---- Distributor (IHI 0069H 12.9) ----
pub const GICD_CTLR: u64 = 0x0000;
pub const GICD_TYPER: u64 = 0x0004;
pub const GICD_IIDR: u64 = 0x0008;
pub const GICD_TYPER2: u64 = 0x000C;
pub const GICD_STATUSR: u64 = 0x0010;
pub const GICD_IGROUPR: u64 = 0x0080;
pub const GICD_ISENABLER: u64 = 0x0100;
pub const GICD_ICENABLER: u64 = 0x0180;
pub const GICD_ISPENDR: u64 = 0x0200;
pub const GICD_ICPENDR: u64 = 0x0280;
pub const GICD_ISACTIVER: u64 = 0x0300;
pub const GICD_ICACTIVER: u64 = 0x0380;
pub const GICD_IPRIORITYR: u64 = 0x0400;
pub const GICD_ITARGETSR: u64 = 0x0800;
pub const GICD_ICFGR: u64 = 0x0C00;
pub const GICD_IGRPMODR: u64 = 0x0D00;
pub const GICD_NSACR: u64 = 0x0E00;
pub const GICD_SGIR: u64 = 0x0F00;
pub const GICD_IROUTER: u64 = 0x6000;
pub const GICD_PIDR2: u64 = 0xFFE8;

/// Size of each bit-per-INTID register array (IGROUPR, IS/ICENABLER, ...): 32 words.
pub const GICD_BITS_ARRAY_SIZE: u64 = 0x80;
/// IPRIORITYR: one byte per INTID, 1024 INTIDs.
pub const GICD_IPRIORITYR_SIZE: u64 = 0x400;
/// ICFGR: two bits per INTID.
pub const GICD_ICFGR_SIZE: u64 = 0x100;
/// IROUTER<n>, n = 0..1023 (n < 32 reserved), 8 bytes each.
pub const GICD_IROUTER_SIZE: u64 = 0x2000;

pub const GICD_CTLR_ENABLE_GRP0: u32 = 1 << 0;
pub const GICD_CTLR_ENABLE_GRP1: u32 = 1 << 1;
pub const GICD_CTLR_ARE: u32 = 1 << 4;
pub const GICD_CTLR_DS: u32 = 1 << 6;
pub const GICD_CTLR_RWP: u32 = 1 << 31;

pub const GICD_TYPER_IDBITS_SHIFT: u32 = 19;
/// IDbits without LPIs: 10-bit INTIDs.
pub const GICD_TYPER_IDBITS_NO_LPIS: u32 = 9;
/// IDbits with LPIs: 16-bit INTIDs (as KVM and QEMU), LPIs 8192..65535.
pub const GICD_TYPER_IDBITS_LPIS: u32 = 15;
/// num_LPIs [15:11]: if non-zero, 2^(num_LPIs+1) LPIs are usable (IHI 0069H, GICD_TYPER).
pub const GICD_TYPER_NUM_LPIS_SHIFT: u32 = 11;
pub const GICD_TYPER_LPIS: u32 = 1 << 17;
pub const GICD_TYPER_A3V: u32 = 1 << 24;
pub const GICD_TYPER_RSS: u32 = 1 << 26;

/// IROUTER bits that hold state: Aff0-2 [23:0], Interrupt_Routing_Mode [31], Aff3 [39:32].
pub const GICD_IROUTER_WRITABLE: u64 = 0x0000_00FF_80FF_FFFF;
pub const GICD_IROUTER_IRM: u64 = 1 << 31;
/// Affinity fields of IROUTER and MPIDR_EL1 share their layout (Aff3 at [39:32]).
pub const AFFINITY_MASK: u64 = 0x0000_00FF_00FF_FFFF;

// ---- Redistributor RD_base (IHI 0069H 12.10) ----
pub const GICR_CTLR: u64 = 0x0000;
pub const GICR_IIDR: u64 = 0x0004;
pub const GICR_TYPER: u64 = 0x0008;
pub const GICR_STATUSR: u64 = 0x0010;
pub const GICR_WAKER: u64 = 0x0014;
pub const GICR_PROPBASER: u64 = 0x0070;
pub const GICR_PENDBASER: u64 = 0x0078;
pub const GICR_PIDR2: u64 = 0xFFE8;

/// GICR_CTLR.EnableLPIs (IHI 0069H 12.11.2). RWP is bit 3 and always reads 0 here.
pub const GICR_CTLR_ENABLE_LPIS: u32 = 1 << 0;

/// GICR_TYPER.PLPIS: physical LPIs supported.
pub const GICR_TYPER_PLPIS: u64 = 1 << 0;
pub const GICR_TYPER_LAST: u64 = 1 << 4;
pub const GICR_TYPER_PROCESSOR_NUMBER_SHIFT: u32 = 8;
pub const GICR_TYPER_AFFINITY_SHIFT: u32 = 32;

/// GICR_PROPBASER fields that hold state (IHI 0069H, GICR_PROPBASER): IDbits [4:0],
/// InnerCache [9:7], Shareability [11:10], Physical_Address [51:12], OuterCache [58:56]; the
/// rest is RES0.
pub const GICR_PROPBASER_WRITABLE: u64 = 0x070F_FFFF_FFFF_FF9F;
pub const GICR_PROPBASER_IDBITS_MASK: u64 = 0x1F;
pub const GICR_PROPBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// GICR_PENDBASER fields that hold state (IHI 0069H, GICR_PENDBASER): InnerCache [9:7],
/// Shareability [11:10], Physical_Address [51:16], OuterCache [58:56]. PTZ [62] is write-only
/// here (reads 0): the pending table is never read, so there is nothing for it to zero.
pub const GICR_PENDBASER_WRITABLE: u64 = 0x070F_FFFF_FFFF_0F80;

pub const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
pub const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;

// ---- Redistributor SGI_base (IHI 0069H 12.10), offsets include GICR_SGI_BASE ----
pub const GICR_IGROUPR0: u64 = GICR_SGI_BASE + 0x0080;
pub const GICR_ISENABLER0: u64 = GICR_SGI_BASE + 0x0100;
pub const GICR_ICENABLER0: u64 = GICR_SGI_BASE + 0x0180;
pub const GICR_ISPENDR0: u64 = GICR_SGI_BASE + 0x0200;
pub const GICR_ICPENDR0: u64 = GICR_SGI_BASE + 0x0280;
pub const GICR_ISACTIVER0: u64 = GICR_SGI_BASE + 0x0300;
pub const GICR_ICACTIVER0: u64 = GICR_SGI_BASE + 0x0380;
pub const GICR_IPRIORITYR: u64 = GICR_SGI_BASE + 0x0400;
/// IPRIORITYR0-7: 32 private INTIDs, one byte each.
pub const GICR_IPRIORITYR_SIZE: u64 = 0x20;
pub const GICR_ICFGR0: u64 = GICR_SGI_BASE + 0x0C00;
pub const GICR_ICFGR1: u64 = GICR_SGI_BASE + 0x0C04;
pub const GICR_IGRPMODR0: u64 = GICR_SGI_BASE + 0x0D00;
pub const GICR_NSACR: u64 = GICR_SGI_BASE + 0x0E00;

// ---- Identification ----
/// GICD_IIDR/GICR_IIDR: Implementer 0x43B (JEP106 code of Arm), ProductID 0, Revision 0. Product 0
/// matches none of the IIDR-keyed errata workarounds in Linux's irq-gic-v3.c.
pub const GIC_IIDR: u32 = 0x0000_043B;
/// GICD_PIDR2/GICR_PIDR2: ArchRev [7:4] = 3 (GICv3), JEDEC [3] = 1, DES_1 [2:0] = 0b011 (Arm).
pub const GIC_PIDR2: u32 = 0x3B;

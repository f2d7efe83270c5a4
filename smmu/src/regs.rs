//! SMMUv3 programming interface: register offsets and typed register values (Arm IHI 0070, chapter 6).
//!
//! Offsets are from the SMMU's base. The interface spans two 64 KiB pages: page 0 holds the
//! configuration and the command queue, page 1 (at [`PAGE1`]) the event and PRI queue PROD/CONS
//! pairs (IHI 0070 6.1, "Memory map"). Field positions were checked against Linux
//! `drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h` and QEMU `hw/arm/smmuv3-internal.h`.

use crate::bits;
use bitflags::bitflags;

/// Offset of register page 1 from the SMMU base.
pub const PAGE1: u64 = 0x1_0000;

/// Size of the SMMU's MMIO region (pages 0 and 1) that the driver touches.
pub const MMIO_SIZE: u64 = 0x2_0000;

/// Feature register 0: translation stages, table formats, coherency ([`Idr0`]).
pub const SMMU_IDR0: u64 = 0x00;
/// Feature register 1: StreamID/SubstreamID sizes, queue sizes ([`Idr1`]).
pub const SMMU_IDR1: u64 = 0x04;
/// Feature register 2: VATOS (unused here).
pub const SMMU_IDR2: u64 = 0x08;
/// Feature register 3: RIL, FWB, BBML, ... ([`Idr3`]).
pub const SMMU_IDR3: u64 = 0x0c;
/// Feature register 4: IMPLEMENTATION DEFINED.
pub const SMMU_IDR4: u64 = 0x10;
/// Feature register 5: OAS, granules, VAX ([`Idr5`]).
pub const SMMU_IDR5: u64 = 0x14;
/// Implementation identification.
pub const SMMU_IIDR: u64 = 0x18;
/// Architecture version (SMMUv3.x).
pub const SMMU_AIDR: u64 = 0x1c;
/// Global control 0: enables ([`Cr0`]).
pub const SMMU_CR0: u64 = 0x20;
/// Acknowledges [`SMMU_CR0`] updates.
pub const SMMU_CR0ACK: u64 = 0x24;
/// Table and queue walk attributes ([`cr1`]).
pub const SMMU_CR1: u64 = 0x28;
/// Global control 2 ([`Cr2`]).
pub const SMMU_CR2: u64 = 0x2c;
/// Status (DORMANT).
pub const SMMU_STATUSR: u64 = 0x40;
/// Global bypass attributes, used while SMMUEN == 0 ([`Gbpa`]).
pub const SMMU_GBPA: u64 = 0x44;
/// Alternative global bypass attributes (optional).
pub const SMMU_AGBPA: u64 = 0x48;
/// Interrupt enables ([`IrqCtrl`]).
pub const SMMU_IRQ_CTRL: u64 = 0x50;
/// Acknowledges [`SMMU_IRQ_CTRL`] updates.
pub const SMMU_IRQ_CTRLACK: u64 = 0x54;
/// Global errors, active where they differ from [`SMMU_GERRORN`] ([`Gerror`]).
pub const SMMU_GERROR: u64 = 0x60;
/// Global error acknowledgement: software toggles bits to match [`SMMU_GERROR`].
pub const SMMU_GERRORN: u64 = 0x64;
/// GERROR MSI address (64-bit).
pub const SMMU_GERROR_IRQ_CFG0: u64 = 0x68;
/// GERROR MSI data.
pub const SMMU_GERROR_IRQ_CFG1: u64 = 0x70;
/// GERROR MSI attributes.
pub const SMMU_GERROR_IRQ_CFG2: u64 = 0x74;
/// Stream table base (64-bit; [`strtab_base`]).
pub const SMMU_STRTAB_BASE: u64 = 0x80;
/// Stream table format and size ([`strtab_base_cfg`]).
pub const SMMU_STRTAB_BASE_CFG: u64 = 0x88;
/// Command queue base (64-bit; [`queue_base`]).
pub const SMMU_CMDQ_BASE: u64 = 0x90;
/// Command queue producer index (written by software).
pub const SMMU_CMDQ_PROD: u64 = 0x98;
/// Command queue consumer index and CERROR ([`CMDQ_CONS_ERR_HI`]).
pub const SMMU_CMDQ_CONS: u64 = 0x9c;
/// Event queue base (64-bit; [`queue_base`]).
pub const SMMU_EVENTQ_BASE: u64 = 0xa0;
/// Event queue producer index (page 1).
pub const SMMU_EVENTQ_PROD: u64 = PAGE1 + 0xa8;
/// Event queue consumer index (page 1).
pub const SMMU_EVENTQ_CONS: u64 = PAGE1 + 0xac;
/// Event queue MSI address (64-bit).
pub const SMMU_EVENTQ_IRQ_CFG0: u64 = 0xb0;
/// Event queue MSI data.
pub const SMMU_EVENTQ_IRQ_CFG1: u64 = 0xb8;
/// Event queue MSI attributes.
pub const SMMU_EVENTQ_IRQ_CFG2: u64 = 0xbc;
/// PRI queue base (64-bit).
pub const SMMU_PRIQ_BASE: u64 = 0xc0;
/// PRI queue producer index (page 1).
pub const SMMU_PRIQ_PROD: u64 = PAGE1 + 0xc8;
/// PRI queue consumer index (page 1).
pub const SMMU_PRIQ_CONS: u64 = PAGE1 + 0xcc;
/// PRI queue MSI address (64-bit).
pub const SMMU_PRIQ_IRQ_CFG0: u64 = 0xd0;
/// PRI queue MSI data.
pub const SMMU_PRIQ_IRQ_CFG1: u64 = 0xd8;
/// PRI queue MSI attributes.
pub const SMMU_PRIQ_IRQ_CFG2: u64 = 0xdc;

/// SMMU_CMDQ_CONS.ERR, bits [30:24]: the CERROR code of the command CONS points at.
pub const CMDQ_CONS_ERR_HI: u32 = 30;
/// Low bit of SMMU_CMDQ_CONS.ERR.
pub const CMDQ_CONS_ERR_LO: u32 = 24;
/// The overflow bit of a PROD register (EVENTQ_PROD.OVFLG) and the acknowledgement in CONS
/// (EVENTQ_CONS.OVACKFLG), bit 31 (IHI 0070 ch. 3 queues, 7.4).
pub const Q_OVERFLOW_FLAG: u32 = 1 << 31;

/// CERROR values in SMMU_CMDQ_CONS.ERR (IHI 0070 ch. 4, CMD_SYNC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cerror {
    /// CERROR_NONE.
    None,
    /// CERROR_ILL: an unknown opcode or a reserved field value.
    Illegal,
    /// CERROR_ABT: the command fetch aborted.
    Abort,
    /// CERROR_ATC_INV_SYNC: a CMD_SYNC after an ATC invalidation that timed out.
    AtcInvSync,
    /// Any other (IMPLEMENTATION DEFINED) code.
    Other(u8),
}

impl Cerror {
    /// Decodes the ERR field of a SMMU_CMDQ_CONS value.
    pub fn from_cons(cons: u32) -> Self {
        match bits::get(cons.into(), CMDQ_CONS_ERR_HI, CMDQ_CONS_ERR_LO) as u8 {
            0 => Self::None,
            1 => Self::Illegal,
            2 => Self::Abort,
            3 => Self::AtcInvSync,
            x => Self::Other(x),
        }
    }

    /// The ERR field value.
    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Illegal => 1,
            Self::Abort => 2,
            Self::AtcInvSync => 3,
            Self::Other(x) => x,
        }
    }
}

/// Translation table formats supported (SMMU_IDR0.TTF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttf {
    /// 0b00: reserved.
    Reserved,
    /// 0b01: AArch32 (LPAE) only.
    AArch32,
    /// 0b10: AArch64 only.
    AArch64,
    /// 0b11: both.
    Both,
}

impl Ttf {
    /// True when AArch64 tables (what the hypervisor uses) are supported.
    pub fn aarch64(self) -> bool {
        matches!(self, Self::AArch64 | Self::Both)
    }
}

/// Multi-level stream table support (SMMU_IDR0.ST_LEVEL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StLevel {
    /// 0b00: linear stream table only.
    Linear,
    /// 0b01: 2-level stream tables are supported as well.
    TwoLevel,
    /// 0b1x: reserved.
    Reserved(u8),
}

/// SMMU_IDR0.STALL_MODEL (IHI 0070 6.3.1): what the SMMU does with a faulting transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallModel {
    /// 0b00: stall and terminate both supported; STE.S1STALLD/S2S and CD.S choose.
    Stall,
    /// 0b01: terminate only; no transaction ever stalls.
    Terminate,
    /// 0b10: stalls forced: every fault stalls until software resumes or terminates it
    /// (CMD_RESUME, CMD_STALL_TERM); CD.S = 0 and STE.S2S = 0 are ILLEGAL.
    Forced,
}

/// SMMU_IDR0 (IHI 0070 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idr0(pub u32);

impl Idr0 {
    fn b(self, n: u32) -> bool {
        bits::bit(self.0.into(), n)
    }
    fn f(self, hi: u32, lo: u32) -> u8 {
        bits::get(self.0.into(), hi, lo) as u8
    }
    /// S2P: stage-2 translation.
    pub fn s2p(self) -> bool {
        self.b(0)
    }
    /// S1P: stage-1 translation.
    pub fn s1p(self) -> bool {
        self.b(1)
    }
    /// TTF: translation table formats.
    pub fn ttf(self) -> Ttf {
        match self.f(3, 2) {
            0 => Ttf::Reserved,
            1 => Ttf::AArch32,
            2 => Ttf::AArch64,
            _ => Ttf::Both,
        }
    }
    /// COHACC: coherent access to tables, queues and (with the right attributes) DMA.
    pub fn cohacc(self) -> bool {
        self.b(4)
    }
    /// BTM: broadcast TLB maintenance.
    pub fn btm(self) -> bool {
        self.b(5)
    }
    /// HTTU: hardware access/dirty flag updates (0 none, 1 access, 2 access+dirty).
    pub fn httu(self) -> u8 {
        self.f(7, 6)
    }
    /// HYP: the EL2 translation regime and the TLBI_EL2_* commands.
    pub fn hyp(self) -> bool {
        self.b(9)
    }
    /// ATS: PCIe ATS.
    pub fn ats(self) -> bool {
        self.b(10)
    }
    /// ASID16: 16-bit ASIDs.
    pub fn asid16(self) -> bool {
        self.b(12)
    }
    /// MSI: MSI generation (and CMD_SYNC CS=SIG_IRQ completion writes).
    pub fn msi(self) -> bool {
        self.b(13)
    }
    /// SEV: WFE wake-up events (CMD_SYNC CS=SIG_SEV).
    pub fn sev(self) -> bool {
        self.b(14)
    }
    /// ATOS: address translation operations.
    pub fn atos(self) -> bool {
        self.b(15)
    }
    /// PRI: PCIe page request interface.
    pub fn pri(self) -> bool {
        self.b(16)
    }
    /// VMW: VMID wildcard matching.
    pub fn vmw(self) -> bool {
        self.b(17)
    }
    /// VMID16: 16-bit VMIDs.
    pub fn vmid16(self) -> bool {
        self.b(18)
    }
    /// CD2L: 2-level context descriptor tables.
    pub fn cd2l(self) -> bool {
        self.b(19)
    }
    /// TTENDIAN: table endianness (0 mixed, 2 little only, 3 big only).
    pub fn ttendian(self) -> u8 {
        self.f(22, 21)
    }
    /// STALL_MODEL: 0 stall and terminate, 1 terminate only, 2 stall forced.
    pub fn stall_model(self) -> u8 {
        self.f(25, 24)
    }
    /// STALL_MODEL decoded (the reserved 0b11 is taken as terminate only: nothing stalls).
    pub fn stalls(self) -> StallModel {
        match self.stall_model() {
            0 => StallModel::Stall,
            2 => StallModel::Forced,
            _ => StallModel::Terminate,
        }
    }
    /// TERM_MODEL: 1 when terminated transactions always abort (never RAZ/WI).
    pub fn term_model(self) -> bool {
        self.b(26)
    }
    /// ST_LEVEL: stream table levels.
    pub fn st_level(self) -> StLevel {
        match self.f(28, 27) {
            0 => StLevel::Linear,
            1 => StLevel::TwoLevel,
            x => StLevel::Reserved(x),
        }
    }
}

/// SMMU_IDR1 (IHI 0070 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idr1(pub u32);

impl Idr1 {
    fn f(self, hi: u32, lo: u32) -> u8 {
        bits::get(self.0.into(), hi, lo) as u8
    }
    /// SIDSIZE: StreamID width in bits.
    pub fn sidsize(self) -> u8 {
        self.f(5, 0)
    }
    /// SSIDSIZE: SubstreamID width in bits (0: no substreams).
    pub fn ssidsize(self) -> u8 {
        self.f(10, 6)
    }
    /// PRIQS: log2 of the maximum PRI queue entries.
    pub fn priqs(self) -> u8 {
        self.f(15, 11)
    }
    /// EVENTQS: log2 of the maximum event queue entries.
    pub fn eventqs(self) -> u8 {
        self.f(20, 16)
    }
    /// CMDQS: log2 of the maximum command queue entries.
    pub fn cmdqs(self) -> u8 {
        self.f(25, 21)
    }
    /// ATTR_PERMS_OVR: STE permission overrides.
    pub fn attr_perms_ovr(self) -> bool {
        bits::bit(self.0.into(), 26)
    }
    /// ATTR_TYPES_OVR: STE MTCFG/MemAttr/ALLOCCFG/SHCFG overrides.
    pub fn attr_types_ovr(self) -> bool {
        bits::bit(self.0.into(), 27)
    }
    /// REL: base registers hold offsets relative to the SMMU base (only with the PRESET bits).
    pub fn rel(self) -> bool {
        bits::bit(self.0.into(), 28)
    }
    /// QUEUES_PRESET: queue base registers are fixed.
    pub fn queues_preset(self) -> bool {
        bits::bit(self.0.into(), 29)
    }
    /// TABLES_PRESET: stream table base registers are fixed.
    pub fn tables_preset(self) -> bool {
        bits::bit(self.0.into(), 30)
    }
}

/// SMMU_IDR3 (IHI 0070 6.3), the fields this crate cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idr3(pub u32);

impl Idr3 {
    /// FWB: stage-2 forced write-back.
    pub fn fwb(self) -> bool {
        bits::bit(self.0.into(), 8)
    }
    /// RIL: range invalidation (TLBI NUM/SCALE/TTL/TG fields).
    pub fn ril(self) -> bool {
        bits::bit(self.0.into(), 10)
    }
}

/// SMMU_IDR5 (IHI 0070 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idr5(pub u32);

impl Idr5 {
    /// OAS field value (0..=6 defined).
    pub fn oas(self) -> u8 {
        bits::get(self.0.into(), 2, 0) as u8
    }
    /// Output address size in bits, `None` for a reserved encoding.
    pub fn oas_bits(self) -> Option<u8> {
        oas_to_bits(self.oas())
    }
    /// GRAN4K: 4 KiB translation granule.
    pub fn gran4k(self) -> bool {
        bits::bit(self.0.into(), 4)
    }
    /// GRAN16K: 16 KiB translation granule.
    pub fn gran16k(self) -> bool {
        bits::bit(self.0.into(), 5)
    }
    /// GRAN64K: 64 KiB translation granule.
    pub fn gran64k(self) -> bool {
        bits::bit(self.0.into(), 6)
    }
    /// VAX: 0 = 48-bit VA, 1 = 52-bit VA with 64 KiB granule.
    pub fn vax(self) -> u8 {
        bits::get(self.0.into(), 11, 10) as u8
    }
    /// STALL_MAX: maximum outstanding stalled transactions.
    pub fn stall_max(self) -> u16 {
        bits::get(self.0.into(), 31, 16) as u16
    }
}

/// Address size encoding shared by IDR5.OAS, STE.S2PS and CD.IPS: bits for `0..=6`.
pub fn oas_to_bits(enc: u8) -> Option<u8> {
    Some(match enc {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        6 => 52,
        _ => return None,
    })
}

/// The address size encoding for `bits` (inverse of [`oas_to_bits`]).
pub fn bits_to_oas(bits: u8) -> Option<u8> {
    (0..=6).find(|&e| oas_to_bits(e) == Some(bits))
}

bitflags! {
    /// SMMU_CR0 (IHI 0070 6.3). Each enable is acknowledged in SMMU_CR0ACK.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Cr0: u32 {
        /// Non-secure SMMU enable: translate through the stream table (else GBPA applies).
        const SMMUEN = 1 << 0;
        /// PRI queue enable.
        const PRIQEN = 1 << 1;
        /// Event queue enable.
        const EVTQEN = 1 << 2;
        /// Command queue enable.
        const CMDQEN = 1 << 3;
        /// ATS checks.
        const ATSCHK = 1 << 4;
        const _ = !0;
    }
}

bitflags! {
    /// SMMU_CR2 (IHI 0070 6.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Cr2: u32 {
        /// E2H: EL2 regime is EL2-E2H (VHE); 0 for this hypervisor.
        const E2H = 1 << 0;
        /// RECINVSID: record C_BAD_STREAMID for out-of-range StreamIDs.
        const RECINVSID = 1 << 1;
        /// PTM: private TLB maintenance (ignore broadcast TLBIs).
        const PTM = 1 << 2;
        const _ = !0;
    }
}

/// SMMU_CR1 fields (IHI 0070 6.3) and the value for coherent walks.
pub mod cr1 {
    /// Non-cacheable (note: CR1 cacheability is not TCR-style; IHI 0070 6.3).
    pub const CACHE_NC: u32 = 0;
    /// Write-back cacheable.
    pub const CACHE_WB: u32 = 1;
    /// Write-through cacheable.
    pub const CACHE_WT: u32 = 2;
    /// Inner shareable.
    pub const SH_ISH: u32 = 3;
    /// Outer shareable.
    pub const SH_OSH: u32 = 2;

    /// Builds CR1 from the queue (QUEUE_IC/OC/SH, bits [5:0]) and table walk (TABLE_IC/OC/SH,
    /// bits [11:6]) attributes.
    pub const fn value(
        queue_ic: u32,
        queue_oc: u32,
        queue_sh: u32,
        table_ic: u32,
        table_oc: u32,
        table_sh: u32,
    ) -> u32 {
        (queue_ic & 3)
            | (queue_oc & 3) << 2
            | (queue_sh & 3) << 4
            | (table_ic & 3) << 6
            | (table_oc & 3) << 8
            | (table_sh & 3) << 10
    }

    /// Inner-shareable write-back cacheable queue and table accesses.
    pub const COHERENT: u32 = value(CACHE_WB, CACHE_WB, SH_ISH, CACHE_WB, CACHE_WB, SH_ISH);
}

bitflags! {
    /// SMMU_GBPA (IHI 0070 6.3): what incoming transactions get while SMMUEN == 0.
    /// Only the single-bit fields are named; MemAttr [3:0], ALLOCCFG [11:8], SHCFG [13:12],
    /// PRIVCFG [17:16] and INSTCFG [19:18] are retained as raw bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Gbpa: u32 {
        /// MTCFG: use MemAttr instead of the incoming memory type.
        const MTCFG = 1 << 4;
        /// ABORT: terminate all incoming transactions.
        const ABORT = 1 << 20;
        /// UPDATE: software sets it with a new value; the SMMU clears it when the value took effect.
        const UPDATE = 1 << 31;
        const _ = !0;
    }
}

bitflags! {
    /// SMMU_GERROR / SMMU_GERRORN bits (IHI 0070 6.3). An error is active while its GERROR
    /// bit differs from the GERRORN bit; software acknowledges by toggling GERRORN.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Gerror: u32 {
        /// CMDQ_ERR: command queue stopped on an error (see SMMU_CMDQ_CONS.ERR).
        const CMDQ_ERR = 1 << 0;
        /// EVENTQ_ABT_ERR: an event queue write aborted.
        const EVENTQ_ABT_ERR = 1 << 2;
        /// PRIQ_ABT_ERR: a PRI queue write aborted.
        const PRIQ_ABT_ERR = 1 << 3;
        /// MSI_CMDQ_ABT_ERR: a CMD_SYNC MSI write aborted.
        const MSI_CMDQ_ABT_ERR = 1 << 4;
        /// MSI_EVENTQ_ABT_ERR.
        const MSI_EVENTQ_ABT_ERR = 1 << 5;
        /// MSI_PRIQ_ABT_ERR.
        const MSI_PRIQ_ABT_ERR = 1 << 6;
        /// MSI_GERROR_ABT_ERR.
        const MSI_GERROR_ABT_ERR = 1 << 7;
        /// SFM_ERR: the SMMU entered Service Failure Mode.
        const SFM_ERR = 1 << 8;
        const _ = !0;
    }
}

bitflags! {
    /// SMMU_IRQ_CTRL / SMMU_IRQ_CTRLACK (IHI 0070 6.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IrqCtrl: u32 {
        /// GERROR_IRQEN.
        const GERROR_IRQEN = 1 << 0;
        /// PRIQ_IRQEN.
        const PRIQ_IRQEN = 1 << 1;
        /// EVENTQ_IRQEN.
        const EVENTQ_IRQEN = 1 << 2;
        const _ = !0;
    }
}

/// SMMU_STRTAB_BASE value: ADDR [51:6] and RA (read-allocate hint, bit 62).
pub fn strtab_base(pa: u64, read_allocate: bool) -> u64 {
    bits::set_bit(pa & bits::mask(51, 6), 62, read_allocate)
}

/// SMMU_STRTAB_BASE_CFG.FMT values (bits [17:16]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrtabFmt {
    /// 0b00: linear table of 2^LOG2SIZE STEs.
    Linear = 0,
    /// 0b01: 2-level table; the L1 table has 2^(LOG2SIZE - SPLIT) descriptors.
    TwoLevel = 1,
}

/// SMMU_STRTAB_BASE_CFG value: LOG2SIZE [5:0], SPLIT [10:6], FMT [17:16].
pub fn strtab_base_cfg(fmt: StrtabFmt, log2size: u8, split: u8) -> u32 {
    let v = bits::set(0, 5, 0, log2size.into());
    let v = bits::set(v, 10, 6, split.into());
    bits::set(v, 17, 16, fmt as u64) as u32
}

/// SMMU_CMDQ_BASE / SMMU_EVENTQ_BASE / SMMU_PRIQ_BASE value: LOG2SIZE [4:0], ADDR [51:5], and
/// RA/WA (bit 62).
pub fn queue_base(pa: u64, log2size: u8, allocate_hint: bool) -> u64 {
    let v = (pa & bits::mask(51, 5)) | u64::from(log2size & 0x1f);
    bits::set_bit(v, 62, allocate_hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IDR values of QEMU 10.0's `virt` SMMU (`hw/arm/smmuv3.c`, `smmuv3_init_regs`).
    const QEMU_IDR0: u32 = 0x0d44_101b;

    #[test]
    fn qemu_idr0_decodes() {
        let i = Idr0(QEMU_IDR0);
        assert!(i.s1p() && i.s2p());
        assert_eq!(i.ttf(), Ttf::AArch64);
        assert!(i.cohacc() && i.asid16() && i.vmid16());
        assert_eq!(i.st_level(), StLevel::TwoLevel);
        assert!(!i.msi() && !i.sev() && !i.hyp() && !i.ats() && !i.pri());
        assert_eq!(i.ttendian(), 2);
        assert_eq!(i.stall_model(), 1);
        assert!(i.term_model());
    }

    #[test]
    fn idr1_idr5_fields() {
        // CMDQS 19, EVENTQS 19, SSIDSIZE 0, SIDSIZE 16.
        let i = Idr1(19 << 21 | 19 << 16 | 16);
        assert_eq!(
            (i.cmdqs(), i.eventqs(), i.sidsize(), i.ssidsize()),
            (19, 19, 16, 0)
        );
        assert!(!i.tables_preset() && !i.queues_preset() && !i.rel());
        let i = Idr1(1 << 30 | 1 << 29 | 1 << 28 | 1 << 27 | 5 << 11 | 20 << 6);
        assert!(i.tables_preset() && i.queues_preset() && i.rel() && i.attr_types_ovr());
        assert_eq!((i.priqs(), i.ssidsize()), (5, 20));
        let i = Idr5(0x70 | 4);
        assert_eq!(i.oas_bits(), Some(44));
        assert!(i.gran4k() && i.gran16k() && i.gran64k());
        assert_eq!(i.vax(), 0);
        assert_eq!(Idr5(7).oas_bits(), None);
        assert_eq!(bits_to_oas(48), Some(5));
    }

    #[test]
    fn base_encodings() {
        // Linux: STRTAB_BASE_RA = 1 << 62, ADDR_MASK = GENMASK_ULL(51, 6).
        assert_eq!(strtab_base(0x8000_1040, true), 0x4000_0000_8000_1040);
        // Linux: STRTAB_BASE_CFG_FMT GENMASK(17,16), SPLIT GENMASK(10,6), LOG2SIZE GENMASK(5,0).
        assert_eq!(
            strtab_base_cfg(StrtabFmt::TwoLevel, 16, 8),
            1 << 16 | 8 << 6 | 16
        );
        // Linux: Q_BASE_RWA 1 << 62, ADDR GENMASK_ULL(51, 5), LOG2SIZE GENMASK(4, 0).
        assert_eq!(queue_base(0x4000_0000, 8, true), 0x4000_0000_4000_0008);
        // Linux CR1: QUEUE_IC [1:0], QUEUE_OC [3:2], QUEUE_SH [5:4], TABLE_* [11:6].
        assert_eq!(cr1::COHERENT, 0b11_01_01_11_01_01);
        assert_eq!(Cerror::from_cons(1 << 24 | 5), Cerror::Illegal);
    }
}

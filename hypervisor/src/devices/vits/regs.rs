//! GICv3 ITS control-frame register offsets and fields (IHI 0069H 12.19, "The ITS register
//! descriptions"), and the values this virtual ITS advertises. Offsets are from ITS_base; the
//! translation frame (GITS_TRANSLATER, ITS_base + 0x10000) is not part of the model: an assigned
//! function's MSI write goes to the physical ITS (`docs/design.md`, issue 15).

/// The control frame: 64 KiB (IHI 0069H 12.19).
pub const GITS_FRAME_SIZE: u64 = 0x1_0000;

pub const GITS_CTLR: u64 = 0x0000;
pub const GITS_IIDR: u64 = 0x0004;
pub const GITS_TYPER: u64 = 0x0008;
pub const GITS_CBASER: u64 = 0x0080;
pub const GITS_CWRITER: u64 = 0x0088;
pub const GITS_CREADR: u64 = 0x0090;
/// GITS_BASER<n>, n = 0..7, 8 bytes each.
pub const GITS_BASER: u64 = 0x0100;
pub const GITS_BASER_COUNT: u64 = 8;
pub const GITS_PIDR2: u64 = 0xFFE8;

/// GITS_CTLR.Enabled [0].
pub const CTLR_ENABLED: u32 = 1 << 0;
/// GITS_CTLR.Quiescent [31], read-only.
pub const CTLR_QUIESCENT: u32 = 1 << 31;

/// GITS_IIDR: Implementer 0x43B (Arm's JEP106 code), ProductID 0, Revision 0, as QEMU's ITS.
/// None of the IIDR-keyed quirks in Linux's irq-gic-v3-its.c match it.
pub const ITS_IIDR: u32 = 0x0000_043B;
/// GITS_PIDR2: ArchRev [7:4] = 3 (GICv3), JEDEC [3] = 1, DES_1 [2:0] = 0b011 (Arm), the value
/// Linux's `its_probe_one` checks the revision of.
pub const ITS_PIDR2: u32 = 0x3B;

/// Bytes per interrupt translation entry the guest is told to allocate (ITT_entry_size + 1).
/// The model keeps its translations itself and never reads the ITT; 8 bytes (as KVM's vITS)
/// keeps the guest's allocation small. The ITT range is still checked to lie in guest RAM.
pub const ITT_ENTRY_SIZE: u64 = 8;
/// EventID bits (IDbits + 1): 16, as KVM and QEMU offer; Linux's EventIDs are MSI-X table
/// indices, at most 2048 (11 bits). A MAPD Size above `EVENT_BITS - 1` is ITTSIZE_OOR.
pub const EVENT_BITS: u32 = 16;
/// DeviceID bits (Devbits + 1): 16, every PCI Requester ID of a segment (the guest's `msi-map`
/// is the identity, DeviceID = RID, as its `iommu-map`).
pub const DEVICE_BITS: u32 = 16;
/// Collection ID bits (CIL = 1, CIDbits + 1): 8. Linux's ICID is its CPU number and a VM has at
/// most `boot::MAX_CPUS` (64) vCPUs; 256 collections are kept in a fixed array, so a guest's
/// MAPCs cannot grow the hypervisor's memory.
pub const COLLECTION_BITS: u32 = 8;
/// INTID bits of the VM's LPIs: the vGIC is to say GICD_TYPER.IDbits = 15, as KVM's does
/// (INTERRUPT_ID_BITS_ITS = 16; Linux uses min(IDbits + 1, 16) bits), so a vINTID is an LPI in
/// 8192..65536.
pub const INTID_BITS: u32 = 16;
/// The first LPI (IHI 0069H 2.2.1).
pub const FIRST_LPI: u32 = 8192;

/// GITS_TYPER (IHI 0069H 12.19, GITS_TYPER): Physical = 1 [0]; Virtual = 0 [1] (guests never see
/// GICv4); ITT_entry_size [7:4]; IDbits [12:8]; Devbits [17:13]; SEIS = 0 [18] (no System
/// Error on command errors: they are ignored, see `cmd.rs`); PTA = 0 [19] (a collection's
/// target is a processor number, here a vCPU index, not a redistributor address the guest
/// could aim elsewhere); HCC = 0 [31:24] (collections live in "memory", the model's table);
/// CIDbits [35:32] with CIL = 1 [36].
pub const ITS_TYPER: u64 = 1
    | (ITT_ENTRY_SIZE - 1) << 4
    | ((EVENT_BITS - 1) as u64) << 8
    | ((DEVICE_BITS - 1) as u64) << 13
    | ((COLLECTION_BITS - 1) as u64) << 32
    | 1 << 36;

/// GITS_CBASER fields (IHI 0069H 12.19, GITS_CBASER): Valid [63], InnerCache [61:59],
/// OuterCache [55:53], Physical_Address [51:12], Shareability [11:10], Size [7:0]; the rest is
/// RES0.
pub const CBASER_VALID: u64 = 1 << 63;
pub const CBASER_FIELDS: u64 =
    CBASER_VALID | 0b111 << 59 | 0b111 << 53 | 0x000F_FFFF_FFFF_F000 | 0b11 << 10 | 0xFF;
/// CBASER.Physical_Address [51:12].
pub const CBASER_PA: u64 = 0x000F_FFFF_FFFF_F000;

/// GITS_CWRITER / GITS_CREADR.Offset [19:5] (IHI 0069H 12.19).
pub const QUEUE_OFFSET: u64 = 0x000F_FFE0;
/// GITS_CWRITER.Retry [0]: restart processing after a stall.
pub const CWRITER_RETRY: u64 = 1;
/// GITS_CREADR.Stalled [0].
pub const CREADR_STALLED: u64 = 1;

/// GITS_BASER<n>.Type [58:56] and Entry_Size [52:48] are read-only (IHI 0069H 12.19,
/// GITS_BASER<n>); everything else reads back as written (Linux's `its_setup_baser` insists).
pub const BASER_RO: u64 = 0b111 << 56 | 0x1F << 48;
/// Type values: Device 0b001, Collection 0b100.
pub const BASER_TYPE_DEVICE: u64 = 1 << 56;
pub const BASER_TYPE_COLLECTION: u64 = 4 << 56;
/// Entry_Size (bytes - 1) of both tables: 8-byte entries, as KVM's. The guest allocates them and
/// the model never reads them.
pub const BASER_ENTRY_8: u64 = 7 << 48;
/// GITS_BASER0 (Device table) and GITS_BASER1 (Collection table) at reset.
pub const BASER_RESET: [u64; 2] = [
    BASER_TYPE_DEVICE | BASER_ENTRY_8,
    BASER_TYPE_COLLECTION | BASER_ENTRY_8,
];

/// Is `off` one of the 64-bit registers (which take 64-bit accesses, and 32-bit ones to either
/// half, IHI 0069H 12.1.3)?
pub const fn is_64bit(off: u64) -> bool {
    matches!(off, GITS_TYPER | GITS_CBASER | GITS_CWRITER | GITS_CREADR)
        || (off >= GITS_BASER && off < GITS_BASER + 8 * GITS_BASER_COUNT && off.is_multiple_of(8))
}

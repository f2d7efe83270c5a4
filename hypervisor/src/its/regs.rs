//! The physical ITS's control-frame registers and the fields the driver programs (IHI 0069H
//! 12.19). Offsets are shared with the vITS model (`devices::vits::regs`), which emulates the
//! same frame.

pub use crate::devices::vits::regs::{
    CTLR_ENABLED, CTLR_QUIESCENT, GITS_BASER, GITS_BASER_COUNT, GITS_CBASER, GITS_CREADR,
    GITS_CTLR, GITS_CWRITER, GITS_TYPER,
};

/// GITS_TRANSLATER's offset from ITS_base: the second 64 KiB frame, + 0x40 (IHI 0069H 12.19).
pub const GITS_TRANSLATER: u64 = 0x1_0040;

/// GITS_BASER<n>.Valid [63].
pub const BASER_VALID: u64 = 1 << 63;
/// GITS_BASER<n>.Indirect [62]: never set (flat tables only).
pub const BASER_INDIRECT: u64 = 1 << 62;
/// GITS_BASER<n>.Type [58:56].
pub const BASER_TYPE_SHIFT: u32 = 56;
/// GITS_BASER<n>.Entry_Size [52:48], bytes - 1, read-only.
pub const BASER_ESZ_SHIFT: u32 = 48;
/// GITS_BASER<n>.Page_Size [9:8].
pub const BASER_PSZ_SHIFT: u32 = 8;
/// GITS_BASER<n>.Size [7:0], pages - 1.
pub const BASER_SIZE_MASK: u64 = 0xFF;
/// Type Device (IHI 0069H 12.19.1, GITS_BASER<n>.Type = 0b001).
pub const TYPE_DEVICE: u64 = 1;
/// Type Collection (0b100).
pub const TYPE_COLLECTION: u64 = 4;
/// Type vPE (0b010, GICv4).
pub const TYPE_VPE: u64 = 2;

/// InnerCache [61:59] (BASER, CBASER) = 0b111, Normal Inner Write-back, read- and
/// write-allocate, as Linux's GITS_BASER_RaWaWb.
pub const CACHE_RAWAWB: u64 = 7 << 59;
/// Shareability [11:10] = Inner Shareable.
pub const SHARE_INNER: u64 = 1 << 10;
/// The Shareability field.
pub const SHARE_MASK: u64 = 3 << 10;
/// InnerCache [61:59] = 0b001, Normal Inner Non-cacheable (the fallback when the ITS does not
/// keep Inner Shareable: the tables are then cleaned to the PoC after every write).
pub const CACHE_NC: u64 = 1 << 59;
/// The InnerCache field.
pub const CACHE_MASK: u64 = 7 << 59;

/// GITS_CBASER.Valid [63].
pub const CBASER_VALID: u64 = 1 << 63;
/// GITS_CBASER.Physical_Address [51:12].
pub const CBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// GITS_CREADR.Stalled [0].
pub const CREADR_STALLED: u64 = 1;
/// GITS_CWRITER / GITS_CREADR Offset [19:5].
pub const QUEUE_OFFSET_MASK: u64 = 0xF_FFE0;

/// Page sizes the Page_Size field encodes, by encoding (IHI 0069H 12.19.1).
pub const PAGE_SIZES: [(u64, usize); 3] = [(2, 0x1_0000), (1, 0x4000), (0, 0x1000)];

/// The Physical_Address field for a table of `page` bytes at `pa`: with 64 KiB pages bits
/// [15:12] hold PA[51:48] (IHI 0069H 12.19.1), otherwise [47:12] is PA[47:12].
pub fn baser_pa(pa: u64, page: usize) -> u64 {
    if page == 0x1_0000 {
        (pa & 0x0000_FFFF_FFFF_0000) | ((pa >> 48) & 0xF) << 12
    } else {
        pa & 0x0000_FFFF_FFFF_F000
    }
}

/// GITS_TYPER fields the driver uses (IHI 0069H 12.19, GITS_TYPER).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Typer {
    /// ITT_entry_size [7:4] + 1: bytes per ITE.
    pub itt_entry_size: u32,
    /// IDbits [12:8] + 1: EventID bits.
    pub id_bits: u32,
    /// Devbits [17:13] + 1: DeviceID bits.
    pub dev_bits: u32,
    /// PTA [19]: collection targets are redistributor PAs rather than processor numbers.
    pub pta: bool,
    /// CIDbits [35:32] + 1 when CIL [36] is set, 16 otherwise.
    pub cid_bits: u32,
    /// Physical [0]: physical LPIs supported.
    pub physical: bool,
    /// Virtual [1]: virtual LPIs and the GICv4 commands supported.
    pub virtual_: bool,
    /// VMOVP [37]: VMOVP needs no ITSList or sequence number.
    pub vmovp: bool,
}

impl Typer {
    /// Decodes GITS_TYPER.
    pub fn decode(v: u64) -> Self {
        let field = |shift: u32, bits: u32| ((v >> shift) & ((1 << bits) - 1)) as u32;
        Self {
            itt_entry_size: field(4, 4) + 1,
            id_bits: field(8, 5) + 1,
            dev_bits: field(13, 5) + 1,
            pta: v & (1 << 19) != 0,
            cid_bits: if v & (1 << 36) != 0 {
                field(32, 4) + 1
            } else {
                16
            },
            physical: v & 1 != 0,
            virtual_: v & 2 != 0,
            vmovp: v & (1 << 37) != 0,
        }
    }
}

/// GICR_PROPBASER / GICR_PENDBASER fields (IHI 0069H 12.11.27 and 12.11.22): InnerCache
/// [9:7] = RaWaWb, Shareability [11:10] = Inner Shareable, as Linux programs them.
pub const GICR_BASER_CACHE_SHARE: u64 = (7 << 7) | (1 << 10);
/// GICR_PROPBASER.Physical_Address [51:12].
pub const PROPBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// GICR_PENDBASER.Physical_Address [51:16].
pub const PENDBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_0000;

/// The GICR_PROPBASER value for a property table at `pa` covering INTIDs below 2^`bits`
/// (IDbits [4:0] = bits - 1).
pub fn propbaser(pa: u64, bits: u32) -> u64 {
    (pa & PROPBASER_PA_MASK) | GICR_BASER_CACHE_SHARE | u64::from(bits - 1)
}

/// The GICR_PENDBASER value for a pending table at `pa`. PTZ [62] is set: the table was
/// allocated zeroed, so the redistributor need not scan it.
pub fn pendbaser(pa: u64) -> u64 {
    (pa & PENDBASER_PA_MASK) | GICR_BASER_CACHE_SHARE | 1 << 62
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_typer_decodes_as_seen_on_the_machine() {
        // GITS_TYPER read on QEMU 10.0.2 virt, gic-version=3 (shared/notes/its-facts.md).
        let t = Typer::decode(0x0000_001F_0001_EFB1);
        assert_eq!(
            t,
            Typer {
                itt_entry_size: 12,
                id_bits: 16,
                dev_bits: 16,
                pta: false,
                cid_bits: 16,
                physical: true,
                virtual_: false,
                vmovp: false,
            }
        );
        // gic-version=4: Virtual and VMOVP as well.
        let t4 = Typer::decode(0x0000_003F_0001_EFB3);
        assert!(t4.virtual_ && t4.vmovp && t4.physical);
        assert!(Typer::decode(1 << 19).pta);
        assert!(!Typer::decode(1 << 19).physical);
        assert_eq!(Typer::decode(0).cid_bits, 16);
    }

    #[test]
    fn baser_pa_folds_high_bits_for_64k_pages() {
        assert_eq!(baser_pa(0x1_2345_0000, 0x1_0000), 0x1_2345_0000);
        assert_eq!(
            baser_pa(0x000A_0000_0001_0000, 0x1_0000),
            0x1_0000 | 0xA << 12
        );
        assert_eq!(baser_pa(0x4000_3000, 0x1000), 0x4000_3000);
    }

    #[test]
    fn redistributor_table_registers() {
        assert_eq!(propbaser(0x4001_0000, 14), 0x4001_0000 | 0x780 | 13);
        assert_eq!(pendbaser(0x4002_0000), 0x4002_0000 | 0x780 | 1 << 62);
    }
}

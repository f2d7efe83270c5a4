//! The Stream Table Entry (IHI 0070 5.2): 64 bytes, eight little-endian doublewords.
//!
//! Field positions (doubleword, bits) follow IHI 0070 5.2 and were checked against Linux
//! `arm-smmu-v3.h` (`STRTAB_STE_<n>_*`) and QEMU `smmuv3-internal.h` (`STE_*`, which counts 32-bit
//! words: QEMU word 2k+1 bit b is doubleword k bit 32+b).

use crate::bits;

/// STE.Config (dword 0 bits [3:1]): what happens to a stream's transactions (IHI 0070 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamConfig {
    /// 0b000 (any 0b0xx): abort every transaction, without recording an event.
    Abort,
    /// 0b100: bypass both stages.
    Bypass,
    /// 0b101: stage 1 translates, stage 2 bypassed.
    S1Translate,
    /// 0b110: stage 1 bypassed, stage 2 translates.
    S2Translate,
    /// 0b111: both stages translate (nested).
    Nested,
}

impl StreamConfig {
    /// Decodes the 3-bit field; 0b0xx is abort.
    pub fn from_bits(v: u8) -> Self {
        match v & 7 {
            4 => Self::Bypass,
            5 => Self::S1Translate,
            6 => Self::S2Translate,
            7 => Self::Nested,
            _ => Self::Abort,
        }
    }

    /// The field encoding.
    pub fn bits(self) -> u8 {
        match self {
            Self::Abort => 0,
            Self::Bypass => 4,
            Self::S1Translate => 5,
            Self::S2Translate => 6,
            Self::Nested => 7,
        }
    }

    /// True when stage 2 translates.
    pub fn s2_enabled(self) -> bool {
        matches!(self, Self::S2Translate | Self::Nested)
    }

    /// True when stage 1 translates.
    pub fn s1_enabled(self) -> bool {
        matches!(self, Self::S1Translate | Self::Nested)
    }
}

/// S1CIR/S1COR (CD table fetch cacheability) and S2IR0/S2OR0 (stage-2 walk cacheability) values.
pub mod cache {
    /// Non-cacheable.
    pub const NC: u8 = 0;
    /// Write-back, read/write-allocate.
    pub const WBRA: u8 = 1;
    /// Write-through.
    pub const WT: u8 = 2;
    /// Write-back, no allocate.
    pub const WB: u8 = 3;
}

/// Shareability values (S1CSH, S2SH0, SHCFG uses 1 for "use incoming").
pub mod share {
    /// Non-shareable.
    pub const NSH: u8 = 0;
    /// SHCFG only: use the incoming shareability.
    pub const INCOMING: u8 = 1;
    /// Outer shareable.
    pub const OSH: u8 = 2;
    /// Inner shareable.
    pub const ISH: u8 = 3;
}

/// Stage-2 configuration the hypervisor puts in an STE: the VM's stage-2 tables, which are the same
/// as (or kept identical to) the CPU's VTTBR_EL2/VTCR_EL2 ones (docs/design.md section 3).
///
/// Fixed by [`Ste::stage2`]: 4 KiB granule (S2TG 0b00), inner-shareable write-back walks
/// (S2IR0/S2OR0 WBRA, S2SH0 ISH), AArch64 tables (S2AA64 = 1: QEMU aborts itself otherwise),
/// little-endian, faults recorded (S2R = 1), no stall (S2S = 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S2Config {
    /// S2VMID: the VM's VMID (same as VTTBR_EL2.VMID).
    pub vmid: u16,
    /// S2TTB: physical address of the stage-2 root table (16-byte aligned at least, bits [51:4]).
    pub root_pa: u64,
    /// S2T0SZ: IPA size is 2^(64 - t0sz), as VTCR_EL2.T0SZ.
    pub t0sz: u8,
    /// S2SL0: starting level, as VTCR_EL2.SL0 (4 KiB granule: 0 = level 2, 1 = level 1, 2 = level 0).
    pub sl0: u8,
    /// S2PS: output size encoding, as VTCR_EL2.PS (0 = 32 bits ... 5 = 48 bits, 6 = 52 bits).
    pub ps: u8,
    /// S2AFFD: when set, an access-flag-clear descriptor does not fault. Keep `false` when the
    /// tables set AF, as the CPU's stage 2 requires anyway.
    pub affd: bool,
}

/// The stage-1 part of a nested STE: the guest's context descriptor table pointer and attributes,
/// which the vSMMU copies (after checking them) from the guest's own STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct S1Fields {
    /// S1ContextPtr: the IPA of the guest's CD (table), bits [51:6].
    pub context_ptr: u64,
    /// S1Fmt: 0 linear, 1 2-level 4 KiB leaves, 2 2-level 64 KiB leaves.
    pub fmt: u8,
    /// S1CDMax: log2 of the number of CDs (0: a single CD, no substreams).
    pub cdmax: u8,
    /// S1DSS: default substream behaviour (0 terminate, 1 bypass, 2 use substream 0).
    pub dss: u8,
    /// S1CIR: CD fetch inner cacheability ([`cache`]).
    pub cir: u8,
    /// S1COR: CD fetch outer cacheability ([`cache`]).
    pub cor: u8,
    /// S1CSH: CD fetch shareability ([`share`]).
    pub csh: u8,
}

/// A Stream Table Entry: eight doublewords, dword 0 first (IHI 0070 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ste(pub [u64; 8]);

macro_rules! ste_field {
    ($(#[$m:meta])* $get:ident, $set:ident, $dw:literal, $hi:literal, $lo:literal, $ty:ty) => {
        $(#[$m])*
        #[doc = concat!("\n\nDoubleword ", $dw, " bits [", $hi, ":", $lo, "].")]
        pub fn $get(&self) -> $ty {
            bits::get(self.0[$dw], $hi, $lo) as $ty
        }
        #[doc = concat!("Sets `", stringify!($get), "` (dword ", $dw, " bits [", $hi, ":", $lo, "]); excess bits are dropped.")]
        pub fn $set(&mut self, v: $ty) -> &mut Self {
            self.0[$dw] = bits::set(self.0[$dw], $hi, $lo, v as u64);
            self
        }
    };
}

macro_rules! ste_flag {
    ($(#[$m:meta])* $get:ident, $set:ident, $dw:literal, $bit:literal) => {
        $(#[$m])*
        #[doc = concat!("\n\nDoubleword ", $dw, " bit ", $bit, ".")]
        pub fn $get(&self) -> bool {
            bits::bit(self.0[$dw], $bit)
        }
        #[doc = concat!("Sets `", stringify!($get), "` (dword ", $dw, " bit ", $bit, ").")]
        pub fn $set(&mut self, v: bool) -> &mut Self {
            self.0[$dw] = bits::set_bit(self.0[$dw], $bit, v);
            self
        }
    };
}

macro_rules! ste_addr {
    ($(#[$m:meta])* $get:ident, $set:ident, $dw:literal, $hi:literal, $lo:literal) => {
        $(#[$m])*
        #[doc = concat!("\n\nDoubleword ", $dw, " bits [", $hi, ":", $lo, "], kept in place (an address).")]
        pub fn $get(&self) -> u64 {
            self.0[$dw] & bits::mask($hi, $lo)
        }
        #[doc = concat!("Sets `", stringify!($get), "`; address bits outside [", $hi, ":", $lo, "] are dropped.")]
        pub fn $set(&mut self, pa: u64) -> &mut Self {
            self.0[$dw] = (self.0[$dw] & !bits::mask($hi, $lo)) | (pa & bits::mask($hi, $lo));
            self
        }
    };
}

impl Ste {
    /// Size of an STE in bytes.
    pub const SIZE: usize = 64;

    /// A valid STE that aborts all traffic silently (V = 1, Config = 0b000).
    pub fn abort() -> Self {
        let mut s = Self::default();
        s.set_v(true).set_config(StreamConfig::Abort);
        s
    }

    /// A valid STE that bypasses both stages, using the incoming shareability (SHCFG = 0b01).
    /// Not for assigned devices: their DMA must go through their VM's stage 2.
    pub fn bypass() -> Self {
        let mut s = Self::default();
        s.set_v(true).set_config(StreamConfig::Bypass);
        s.set_shcfg(share::INCOMING);
        s
    }

    /// A valid stage-2-only STE (Config = 0b110) for `s2`.
    pub fn stage2(s2: S2Config) -> Self {
        let mut s = Self::default();
        s.set_v(true).set_config(StreamConfig::S2Translate);
        s.set_shcfg(share::INCOMING);
        s.apply_s2(s2);
        s
    }

    /// A valid nested STE (Config = 0b111): the guest's stage 1 (`s1`) followed by the VM's stage 2.
    /// S2PTW is set, so stage-1 walks hitting device memory at stage 2 fault (IHI 0070 5.2, S2PTW).
    pub fn nested(s1: S1Fields, s2: S2Config) -> Self {
        let mut s = Self::default();
        s.set_v(true).set_config(StreamConfig::Nested);
        s.set_s1_context_ptr(s1.context_ptr)
            .set_s1fmt(s1.fmt)
            .set_s1cdmax(s1.cdmax);
        s.set_s1dss(s1.dss)
            .set_s1cir(s1.cir)
            .set_s1cor(s1.cor)
            .set_s1csh(s1.csh)
            .set_shcfg(share::INCOMING);
        s.apply_s2(s2);
        s.set_s2ptw(true);
        s
    }

    fn apply_s2(&mut self, c: S2Config) {
        self.set_s2vmid(c.vmid)
            .set_s2t0sz(c.t0sz)
            .set_s2sl0(c.sl0)
            .set_s2ir0(cache::WBRA)
            .set_s2or0(cache::WBRA)
            .set_s2sh0(share::ISH)
            .set_s2tg(0)
            .set_s2ps(c.ps)
            .set_s2aa64(true)
            .set_s2endi(false)
            .set_s2affd(c.affd)
            .set_s2s(false)
            .set_s2r(true)
            .set_s2ttb(c.root_pa);
    }

    /// The stage-2 configuration this STE carries (meaningful when stage 2 is enabled).
    pub fn s2_config(&self) -> S2Config {
        S2Config {
            vmid: self.s2vmid(),
            root_pa: self.s2ttb(),
            t0sz: self.s2t0sz(),
            sl0: self.s2sl0(),
            ps: self.s2ps(),
            affd: self.s2affd(),
        }
    }

    /// The stage-1 fields this STE carries (meaningful when stage 1 is enabled).
    pub fn s1_fields(&self) -> S1Fields {
        S1Fields {
            context_ptr: self.s1_context_ptr(),
            fmt: self.s1fmt(),
            cdmax: self.s1cdmax(),
            dss: self.s1dss(),
            cir: self.s1cir(),
            cor: self.s1cor(),
            csh: self.s1csh(),
        }
    }

    /// STE.Config.
    pub fn config(&self) -> StreamConfig {
        StreamConfig::from_bits(bits::get(self.0[0], 3, 1) as u8)
    }

    /// Sets STE.Config (dword 0 bits [3:1]).
    pub fn set_config(&mut self, c: StreamConfig) -> &mut Self {
        self.0[0] = bits::set(self.0[0], 3, 1, c.bits().into());
        self
    }

    /// The STE as 64 little-endian bytes, as the SMMU reads it from memory.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0; 64];
        for (chunk, w) in out.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// The STE from 64 little-endian bytes.
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let mut s = Self::default();
        for (w, chunk) in s.0.iter_mut().zip(b.chunks_exact(8)) {
            let mut a = [0; 8];
            a.copy_from_slice(chunk);
            *w = u64::from_le_bytes(a);
        }
        s
    }

    ste_flag!(
        /// V: the STE is valid (else C_BAD_STE).
        v, set_v, 0, 0);
    ste_field!(
        /// S1Fmt: CD table format.
        s1fmt, set_s1fmt, 0, 5, 4, u8);
    ste_addr!(
        /// S1ContextPtr: the CD or L1CD table address.
        s1_context_ptr, set_s1_context_ptr, 0, 51, 6);
    ste_field!(
        /// S1CDMax: log2 of the number of CDs.
        s1cdmax, set_s1cdmax, 0, 63, 59, u8);
    ste_field!(
        /// S1DSS: default substream behaviour.
        s1dss, set_s1dss, 1, 1, 0, u8);
    ste_field!(
        /// S1CIR: CD fetch inner cacheability.
        s1cir, set_s1cir, 1, 3, 2, u8);
    ste_field!(
        /// S1COR: CD fetch outer cacheability.
        s1cor, set_s1cor, 1, 5, 4, u8);
    ste_field!(
        /// S1CSH: CD fetch shareability.
        s1csh, set_s1csh, 1, 7, 6, u8);
    ste_flag!(
        /// S1STALLD: stage-1 stalls disabled.
        s1stalld, set_s1stalld, 1, 27);
    ste_field!(
        /// EATS: ATS behaviour (0 = ATS translation requests abort).
        eats, set_eats, 1, 29, 28, u8);
    ste_field!(
        /// STRW: StreamWorld (0 = NS-EL1, 2 = EL2, 3 = EL2-E2H).
        strw, set_strw, 1, 31, 30, u8);
    ste_field!(
        /// SHCFG: shareability override (1 = use incoming).
        shcfg, set_shcfg, 1, 45, 44, u8);
    ste_field!(
        /// S2VMID.
        s2vmid, set_s2vmid, 2, 15, 0, u16);
    ste_field!(
        /// S2T0SZ (VTCR_EL2.T0SZ format).
        s2t0sz, set_s2t0sz, 2, 37, 32, u8);
    ste_field!(
        /// S2SL0 (VTCR_EL2.SL0 format).
        s2sl0, set_s2sl0, 2, 39, 38, u8);
    ste_field!(
        /// S2IR0: stage-2 walk inner cacheability.
        s2ir0, set_s2ir0, 2, 41, 40, u8);
    ste_field!(
        /// S2OR0: stage-2 walk outer cacheability.
        s2or0, set_s2or0, 2, 43, 42, u8);
    ste_field!(
        /// S2SH0: stage-2 walk shareability.
        s2sh0, set_s2sh0, 2, 45, 44, u8);
    ste_field!(
        /// S2TG: stage-2 granule (0 = 4 KiB, 1 = 64 KiB, 2 = 16 KiB).
        s2tg, set_s2tg, 2, 47, 46, u8);
    ste_field!(
        /// S2PS: stage-2 output size.
        s2ps, set_s2ps, 2, 50, 48, u8);
    ste_flag!(
        /// S2AA64: AArch64 stage-2 tables.
        s2aa64, set_s2aa64, 2, 51);
    ste_flag!(
        /// S2ENDI: big-endian stage-2 walks.
        s2endi, set_s2endi, 2, 52);
    ste_flag!(
        /// S2AFFD: stage-2 access flag fault disable.
        s2affd, set_s2affd, 2, 53);
    ste_flag!(
        /// S2PTW: stage-1 walks to stage-2 device memory fault.
        s2ptw, set_s2ptw, 2, 54);
    ste_flag!(
        /// S2S: stage-2 faults stall.
        s2s, set_s2s, 2, 57);
    ste_flag!(
        /// S2R: stage-2 faults are recorded as events.
        s2r, set_s2r, 2, 58);
    ste_addr!(
        /// S2TTB: stage-2 root table address.
        s2ttb, set_s2ttb, 3, 51, 4);
}

#[cfg(test)]
mod tests {
    use super::*;

    // Linux arm-smmu-v3.h, used as the independent source of the layout below:
    // STRTAB_STE_0_V (1 << 0), STRTAB_STE_0_CFG GENMASK(3, 1) (ABORT 0, BYPASS 4, S1_TRANS 5,
    // S2_TRANS 6, NESTED 7), STRTAB_STE_0_S1FMT GENMASK(5, 4), S1CTXPTR_MASK GENMASK(51, 6),
    // S1CDMAX GENMASK(63, 59); STRTAB_STE_1_S1DSS GENMASK(1, 0), S1CIR (3, 2), S1COR (5, 4),
    // S1CSH (7, 6), EATS (29, 28), STRW (31, 30), SHCFG (45, 44); STRTAB_STE_2_S2VMID (15, 0),
    // STRTAB_STE_2_VTCR (50, 32) holding T0SZ [5:0], SL0 [7:6], IR0 [9:8], OR0 [11:10],
    // SH0 [13:12], TG [15:14], PS [18:16]; S2AA64 bit 51, S2ENDI 52, S2PTW 54, S2S 57, S2R 58;
    // STRTAB_STE_3_S2TTB_MASK GENMASK(51, 4). S2AFFD is QEMU's STE_S2AFFD (word 5 bit 21 = 53).
    const V: u64 = 1;
    const fn cfg(c: u64) -> u64 {
        c << 1
    }

    fn s2() -> S2Config {
        S2Config {
            vmid: 0x1234,
            root_pa: 0x0000_0008_4321_f000,
            t0sz: 24,
            sl0: 1,
            ps: 4,
            affd: false,
        }
    }

    fn vtcr(t0sz: u64, sl0: u64, ps: u64) -> u64 {
        let ir0 = 1;
        let or0 = 1;
        let sh0 = 3;
        let tg = 0;
        t0sz | sl0 << 6 | ir0 << 8 | or0 << 10 | sh0 << 12 | tg << 14 | ps << 16
    }

    #[test]
    fn abort_and_bypass_are_bit_exact() {
        assert_eq!(Ste::abort().0, [V | cfg(0), 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Ste::bypass().0, [V | cfg(4), 1 << 44, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn stage2_is_bit_exact() {
        let ste = Ste::stage2(s2());
        let dw2 = 0x1234 | vtcr(24, 1, 4) << 32 | 1 << 51 | 1 << 58;
        assert_eq!(
            ste.0,
            [V | cfg(6), 1 << 44, dw2, 0x0000_0008_4321_f000, 0, 0, 0, 0]
        );
    }

    #[test]
    fn nested_is_bit_exact() {
        let s1 = S1Fields {
            context_ptr: 0x4567_8940,
            fmt: 0,
            cdmax: 0,
            dss: 0,
            cir: 1,
            cor: 1,
            csh: 3,
        };
        let ste = Ste::nested(s1, s2());
        let dw0 = V | cfg(7) | 0x4567_8940;
        let dw1 = 1 << 2 | 1 << 4 | 3 << 6 | 1 << 44;
        let dw2 = 0x1234 | vtcr(24, 1, 4) << 32 | 1 << 51 | 1 << 54 | 1 << 58;
        assert_eq!(ste.0, [dw0, dw1, dw2, 0x0000_0008_4321_f000, 0, 0, 0, 0]);
        assert_eq!(ste.s1_fields(), s1);
        assert_eq!(ste.s2_config(), s2());
        assert_eq!(ste.config(), StreamConfig::Nested);
    }

    #[test]
    fn getters_round_trip() {
        let mut s = Ste::default();
        s.set_v(true)
            .set_config(StreamConfig::S1Translate)
            .set_s1fmt(2)
            .set_s1_context_ptr(0x000f_ffff_ffff_ffc0)
            .set_s1cdmax(31)
            .set_s1dss(2)
            .set_s1cir(3)
            .set_s1cor(2)
            .set_s1csh(1)
            .set_s1stalld(true)
            .set_eats(1)
            .set_strw(2)
            .set_shcfg(1)
            .set_s2vmid(0xffff)
            .set_s2t0sz(63)
            .set_s2sl0(3)
            .set_s2ir0(2)
            .set_s2or0(3)
            .set_s2sh0(2)
            .set_s2tg(2)
            .set_s2ps(7)
            .set_s2aa64(true)
            .set_s2endi(true)
            .set_s2affd(true)
            .set_s2ptw(true)
            .set_s2s(true)
            .set_s2r(true)
            .set_s2ttb(0x000f_ffff_ffff_fff0);
        assert!(s.v());
        assert_eq!(s.config(), StreamConfig::S1Translate);
        assert_eq!((s.s1fmt(), s.s1cdmax(), s.s1dss()), (2, 31, 2));
        assert_eq!(s.s1_context_ptr(), 0x000f_ffff_ffff_ffc0);
        assert_eq!((s.s1cir(), s.s1cor(), s.s1csh()), (3, 2, 1));
        assert!(s.s1stalld());
        assert_eq!((s.eats(), s.strw(), s.shcfg()), (1, 2, 1));
        assert_eq!((s.s2vmid(), s.s2t0sz(), s.s2sl0()), (0xffff, 63, 3));
        assert_eq!(
            (s.s2ir0(), s.s2or0(), s.s2sh0(), s.s2tg(), s.s2ps()),
            (2, 3, 2, 2, 7)
        );
        assert!(s.s2aa64() && s.s2endi() && s.s2affd() && s.s2ptw() && s.s2s() && s.s2r());
        assert_eq!(s.s2ttb(), 0x000f_ffff_ffff_fff0);
        // Excess bits never spill into neighbours.
        let mut t = Ste::default();
        t.set_s2vmid(0xffff).set_s1dss(0xff);
        assert_eq!(t.0[2], 0xffff);
        assert_eq!(t.0[1], 3);
        t.set_s2ttb(u64::MAX);
        assert_eq!(t.0[3], bits::mask(51, 4));
        // Config 0b0xx all decode as abort.
        for c in 0..4 {
            assert_eq!(StreamConfig::from_bits(c), StreamConfig::Abort);
        }
        assert_eq!(Ste::from_bytes(&s.to_bytes()), s);
        assert_eq!(s.to_bytes()[0], (s.0[0] & 0xff) as u8);
    }
}

//! Command queue entries (IHI 0070 4, "Commands"): 16 bytes, two little-endian doublewords.
//!
//! Field positions follow IHI 0070 chapter 4 and were checked against Linux `arm-smmu-v3.h`
//! (`CMDQ_0_OP`, `CMDQ_CFGI_*`, `CMDQ_TLBI_*`, `CMDQ_ATC_*`, `CMDQ_PRI_*`, `CMDQ_RESUME_*`,
//! `CMDQ_SYNC_*`) and QEMU `smmuv3-internal.h` (`CMD_*` macros, counted in 32-bit words).
//! Common layout: opcode in dword 0 [7:0], SSV at bit 11, SubstreamID [31:12], StreamID [63:32].

use crate::bits;

/// Command opcodes (dword 0 bits [7:0]).
pub mod op {
    /// CMD_PREFETCH_CONFIG.
    pub const PREFETCH_CONFIG: u8 = 0x01;
    /// CMD_PREFETCH_ADDR.
    pub const PREFETCH_ADDR: u8 = 0x02;
    /// CMD_CFGI_STE.
    pub const CFGI_STE: u8 = 0x03;
    /// CMD_CFGI_STE_RANGE (and CMD_CFGI_ALL, which is Range = 31).
    pub const CFGI_STE_RANGE: u8 = 0x04;
    /// CMD_CFGI_CD.
    pub const CFGI_CD: u8 = 0x05;
    /// CMD_CFGI_CD_ALL.
    pub const CFGI_CD_ALL: u8 = 0x06;
    /// CMD_TLBI_NH_ALL.
    pub const TLBI_NH_ALL: u8 = 0x10;
    /// CMD_TLBI_NH_ASID.
    pub const TLBI_NH_ASID: u8 = 0x11;
    /// CMD_TLBI_NH_VA.
    pub const TLBI_NH_VA: u8 = 0x12;
    /// CMD_TLBI_NH_VAA.
    pub const TLBI_NH_VAA: u8 = 0x13;
    /// CMD_TLBI_EL3_ALL.
    pub const TLBI_EL3_ALL: u8 = 0x18;
    /// CMD_TLBI_EL3_VA.
    pub const TLBI_EL3_VA: u8 = 0x1a;
    /// CMD_TLBI_EL2_ALL.
    pub const TLBI_EL2_ALL: u8 = 0x20;
    /// CMD_TLBI_EL2_ASID.
    pub const TLBI_EL2_ASID: u8 = 0x21;
    /// CMD_TLBI_EL2_VA.
    pub const TLBI_EL2_VA: u8 = 0x22;
    /// CMD_TLBI_EL2_VAA.
    pub const TLBI_EL2_VAA: u8 = 0x23;
    /// CMD_TLBI_S12_VMALL.
    pub const TLBI_S12_VMALL: u8 = 0x28;
    /// CMD_TLBI_S2_IPA.
    pub const TLBI_S2_IPA: u8 = 0x2a;
    /// CMD_TLBI_NSNH_ALL.
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    /// CMD_ATC_INV.
    pub const ATC_INV: u8 = 0x40;
    /// CMD_PRI_RESP.
    pub const PRI_RESP: u8 = 0x41;
    /// CMD_RESUME.
    pub const RESUME: u8 = 0x44;
    /// CMD_STALL_TERM.
    pub const STALL_TERM: u8 = 0x45;
    /// CMD_SYNC.
    pub const SYNC: u8 = 0x46;
}

/// CMD_CFGI_STE_RANGE.Range value meaning "all StreamIDs" (CMD_CFGI_ALL, IHI 0070 ch. 4, CMD_CFGI_ALL).
pub const CFGI_RANGE_ALL: u8 = 31;

/// Why a command could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// An unknown opcode or a reserved field encoding: the SMMU stops with CERROR_ILL.
    #[error("illegal command (opcode {opcode:#04x})")]
    Illegal {
        /// The opcode byte of the offending command.
        opcode: u8,
    },
}

/// The address part of a TLBI-by-address command, including the range-invalidation fields
/// (IHI 0070 ch. 4, TLB invalidation; range invalidation needs SMMU_IDR3.RIL, otherwise NUM = SCALE = TG = 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlbiAddr {
    /// Address (VA [63:12] or IPA [51:12]); low 12 bits dropped.
    pub addr: u64,
    /// Leaf: only last-level entries need invalidating.
    pub leaf: bool,
    /// TTL [9:8]: level hint of the leaf entry (0 = none).
    pub ttl: u8,
    /// TG [11:10]: granule of the range (0 = not a range; 1 = 4 KiB, 2 = 16 KiB, 3 = 64 KiB).
    pub tg: u8,
    /// NUM [16:12] of dword 0: the range covers (NUM + 1) * 2^SCALE granules.
    pub num: u8,
    /// SCALE [24:20] of dword 0.
    pub scale: u8,
}

impl TlbiAddr {
    /// A single-address invalidation (no range, no level hint).
    pub fn single(addr: u64, leaf: bool) -> Self {
        Self {
            addr,
            leaf,
            ..Self::default()
        }
    }
}

/// CMD_SYNC completion signal (CS, dword 0 [13:12]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncCs {
    /// SIG_NONE: software polls CONS.
    None,
    /// SIG_IRQ: an MSI write to MSIAddr with MSIData (needs SMMU_IDR0.MSI).
    Irq,
    /// SIG_SEV: a WFE wake-up event (needs SMMU_IDR0.SEV).
    Sev,
}

/// CMD_SYNC's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sync {
    /// CS: completion signal.
    pub cs: SyncCs,
    /// MSH [23:22]: MSI shareability.
    pub msh: u8,
    /// MSIAttr [27:24]: MSI memory attributes.
    pub msiattr: u8,
    /// MSIData [63:32].
    pub msidata: u32,
    /// MSIAddr, dword 1 [51:2].
    pub msiaddr: u64,
}

impl Sync {
    /// A CMD_SYNC completed by polling CONS (CS = SIG_NONE).
    pub const fn none() -> Self {
        Self {
            cs: SyncCs::None,
            msh: 0,
            msiattr: 0,
            msidata: 0,
            msiaddr: 0,
        }
    }
}

/// A decoded SMMU command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CMD_PREFETCH_CONFIG: prefetch the STE (and CD for `ssid`).
    PrefetchConfig {
        /// StreamID.
        sid: u32,
        /// SubstreamID when SSV = 1.
        ssid: Option<u32>,
    },
    /// CMD_PREFETCH_ADDR: prefetch translations for an address range.
    PrefetchAddr {
        /// StreamID.
        sid: u32,
        /// SubstreamID when SSV = 1.
        ssid: Option<u32>,
        /// Address [63:12].
        addr: u64,
        /// Size [4:0]: log2 of the number of pages.
        size: u8,
    },
    /// CMD_CFGI_STE: invalidate cached configuration (STE, and L1STD) of one StreamID.
    CfgiSte {
        /// StreamID.
        sid: u32,
        /// Leaf: only the STE, not the L1 descriptor.
        leaf: bool,
    },
    /// CMD_CFGI_STE_RANGE with Range < 31: StreamIDs `sid & !(2^(range+1) - 1)` onwards,
    /// 2^(range+1) of them.
    CfgiSteRange {
        /// StreamID (low bits ignored).
        sid: u32,
        /// Range [4:0] of dword 1.
        range: u8,
    },
    /// CMD_CFGI_ALL: CMD_CFGI_STE_RANGE with Range = 31.
    CfgiAll,
    /// CMD_CFGI_CD: invalidate one CD.
    CfgiCd {
        /// StreamID.
        sid: u32,
        /// SubstreamID [31:12].
        ssid: u32,
        /// Leaf: only the CD, not the L1CD.
        leaf: bool,
    },
    /// CMD_CFGI_CD_ALL: all CDs of a StreamID.
    CfgiCdAll {
        /// StreamID.
        sid: u32,
    },
    /// CMD_TLBI_NH_ALL: all stage-1 NS-EL1 entries of a VMID.
    TlbiNhAll {
        /// VMID [47:32].
        vmid: u16,
    },
    /// CMD_TLBI_NH_ASID.
    TlbiNhAsid {
        /// VMID.
        vmid: u16,
        /// ASID [63:48].
        asid: u16,
    },
    /// CMD_TLBI_NH_VA.
    TlbiNhVa {
        /// VMID.
        vmid: u16,
        /// ASID.
        asid: u16,
        /// Address and range.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_NH_VAA: all ASIDs.
    TlbiNhVaa {
        /// VMID.
        vmid: u16,
        /// Address and range.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_EL3_ALL.
    TlbiEl3All,
    /// CMD_TLBI_EL3_VA.
    TlbiEl3Va {
        /// Address and range.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_EL2_ALL (needs SMMU_IDR0.HYP).
    TlbiEl2All,
    /// CMD_TLBI_EL2_ASID.
    TlbiEl2Asid {
        /// ASID.
        asid: u16,
    },
    /// CMD_TLBI_EL2_VA.
    TlbiEl2Va {
        /// ASID.
        asid: u16,
        /// Address and range.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_EL2_VAA.
    TlbiEl2Vaa {
        /// Address and range.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_S12_VMALL: all stage-1 and stage-2 entries of a VMID.
    TlbiS12Vmall {
        /// VMID.
        vmid: u16,
    },
    /// CMD_TLBI_S2_IPA: stage-2 entries for an IPA (QEMU 10.0 does not drop combined nested
    /// entries with it: a stage-2 change also needs TLBI_NH_ALL or TLBI_S12_VMALL for the VMID).
    TlbiS2Ipa {
        /// VMID.
        vmid: u16,
        /// IPA [51:12] and range.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_NSNH_ALL: all non-secure, non-hyp entries.
    TlbiNsnhAll,
    /// CMD_ATC_INV.
    AtcInv {
        /// StreamID.
        sid: u32,
        /// SubstreamID when SSV = 1.
        ssid: Option<u32>,
        /// Global [9].
        global: bool,
        /// Address [63:12].
        addr: u64,
        /// Size [5:0].
        size: u8,
    },
    /// CMD_PRI_RESP.
    PriResp {
        /// StreamID.
        sid: u32,
        /// SubstreamID when SSV = 1.
        ssid: Option<u32>,
        /// Page request group index, dword 1 [8:0].
        prgi: u16,
        /// Resp, dword 1 [13:12] (0 deny, 1 fail, 2 success).
        resp: u8,
    },
    /// CMD_RESUME: retry or abort a stalled transaction.
    Resume {
        /// StreamID.
        sid: u32,
        /// STAG, dword 1 [15:0].
        stag: u16,
        /// Action, dword 0 [13:12].
        resp: u8,
    },
    /// CMD_STALL_TERM: terminate all stalled transactions of a StreamID.
    StallTerm {
        /// StreamID.
        sid: u32,
    },
    /// CMD_SYNC.
    Sync(Sync),
}

const fn fld(hi: u32, lo: u32, v: u64) -> u64 {
    bits::set(0, hi, lo, v)
}

fn ssv_ssid(ssid: Option<u32>) -> u64 {
    match ssid {
        Some(s) => 1 << 11 | fld(31, 12, s.into()),
        None => 0,
    }
}

fn get_ssid(w0: u64) -> Option<u32> {
    bits::bit(w0, 11).then_some(bits::get(w0, 31, 12) as u32)
}

fn sid(s: u32) -> u64 {
    u64::from(s) << 32
}

impl TlbiAddr {
    fn encode(&self, w0: &mut u64, addr_mask: u64) -> u64 {
        *w0 |= fld(16, 12, self.num.into()) | fld(24, 20, self.scale.into());
        (self.addr & addr_mask)
            | u64::from(self.leaf)
            | fld(9, 8, self.ttl.into())
            | fld(11, 10, self.tg.into())
    }

    fn decode(w0: u64, w1: u64, addr_mask: u64) -> Self {
        Self {
            addr: w1 & addr_mask,
            leaf: bits::bit(w1, 0),
            ttl: bits::get(w1, 9, 8) as u8,
            tg: bits::get(w1, 11, 10) as u8,
            num: bits::get(w0, 16, 12) as u8,
            scale: bits::get(w0, 24, 20) as u8,
        }
    }
}

const VA_MASK: u64 = bits::mask(63, 12);
const IPA_MASK: u64 = bits::mask(51, 12);

impl Command {
    /// Size of a command in bytes.
    pub const SIZE: usize = 16;

    /// The opcode this command encodes with.
    pub fn opcode(&self) -> u8 {
        match self {
            Self::PrefetchConfig { .. } => op::PREFETCH_CONFIG,
            Self::PrefetchAddr { .. } => op::PREFETCH_ADDR,
            Self::CfgiSte { .. } => op::CFGI_STE,
            Self::CfgiSteRange { .. } | Self::CfgiAll => op::CFGI_STE_RANGE,
            Self::CfgiCd { .. } => op::CFGI_CD,
            Self::CfgiCdAll { .. } => op::CFGI_CD_ALL,
            Self::TlbiNhAll { .. } => op::TLBI_NH_ALL,
            Self::TlbiNhAsid { .. } => op::TLBI_NH_ASID,
            Self::TlbiNhVa { .. } => op::TLBI_NH_VA,
            Self::TlbiNhVaa { .. } => op::TLBI_NH_VAA,
            Self::TlbiEl3All => op::TLBI_EL3_ALL,
            Self::TlbiEl3Va { .. } => op::TLBI_EL3_VA,
            Self::TlbiEl2All => op::TLBI_EL2_ALL,
            Self::TlbiEl2Asid { .. } => op::TLBI_EL2_ASID,
            Self::TlbiEl2Va { .. } => op::TLBI_EL2_VA,
            Self::TlbiEl2Vaa { .. } => op::TLBI_EL2_VAA,
            Self::TlbiS12Vmall { .. } => op::TLBI_S12_VMALL,
            Self::TlbiS2Ipa { .. } => op::TLBI_S2_IPA,
            Self::TlbiNsnhAll => op::TLBI_NSNH_ALL,
            Self::AtcInv { .. } => op::ATC_INV,
            Self::PriResp { .. } => op::PRI_RESP,
            Self::Resume { .. } => op::RESUME,
            Self::StallTerm { .. } => op::STALL_TERM,
            Self::Sync(_) => op::SYNC,
        }
    }

    /// Encodes the command as the two doublewords the SMMU reads.
    pub fn encode(&self) -> [u64; 2] {
        let mut w0 = u64::from(self.opcode());
        let w1 = match *self {
            Self::PrefetchConfig { sid: s, ssid } => {
                w0 |= sid(s) | ssv_ssid(ssid);
                0
            }
            Self::PrefetchAddr {
                sid: s,
                ssid,
                addr,
                size,
            } => {
                w0 |= sid(s) | ssv_ssid(ssid);
                (addr & VA_MASK) | fld(4, 0, size.into())
            }
            Self::CfgiSte { sid: s, leaf } => {
                w0 |= sid(s);
                u64::from(leaf)
            }
            Self::CfgiSteRange { sid: s, range } => {
                w0 |= sid(s);
                fld(4, 0, range.into())
            }
            Self::CfgiAll => CFGI_RANGE_ALL.into(),
            Self::CfgiCd { sid: s, ssid, leaf } => {
                w0 |= sid(s) | fld(31, 12, ssid.into());
                u64::from(leaf)
            }
            Self::CfgiCdAll { sid: s } | Self::StallTerm { sid: s } => {
                w0 |= sid(s);
                0
            }
            Self::TlbiNhAll { vmid } | Self::TlbiS12Vmall { vmid } => {
                w0 |= fld(47, 32, vmid.into());
                0
            }
            Self::TlbiNhAsid { vmid, asid } => {
                w0 |= fld(47, 32, vmid.into()) | fld(63, 48, asid.into());
                0
            }
            Self::TlbiNhVa { vmid, asid, addr } => {
                w0 |= fld(47, 32, vmid.into()) | fld(63, 48, asid.into());
                addr.encode(&mut w0, VA_MASK)
            }
            Self::TlbiNhVaa { vmid, addr } => {
                w0 |= fld(47, 32, vmid.into());
                addr.encode(&mut w0, VA_MASK)
            }
            Self::TlbiEl3All | Self::TlbiEl2All | Self::TlbiNsnhAll => 0,
            Self::TlbiEl3Va { addr } | Self::TlbiEl2Vaa { addr } => addr.encode(&mut w0, VA_MASK),
            Self::TlbiEl2Asid { asid } => {
                w0 |= fld(63, 48, asid.into());
                0
            }
            Self::TlbiEl2Va { asid, addr } => {
                w0 |= fld(63, 48, asid.into());
                addr.encode(&mut w0, VA_MASK)
            }
            Self::TlbiS2Ipa { vmid, addr } => {
                w0 |= fld(47, 32, vmid.into());
                addr.encode(&mut w0, IPA_MASK)
            }
            Self::AtcInv {
                sid: s,
                ssid,
                global,
                addr,
                size,
            } => {
                w0 |= sid(s) | ssv_ssid(ssid) | u64::from(global) << 9;
                (addr & VA_MASK) | fld(5, 0, size.into())
            }
            Self::PriResp {
                sid: s,
                ssid,
                prgi,
                resp,
            } => {
                w0 |= sid(s) | ssv_ssid(ssid);
                fld(8, 0, prgi.into()) | fld(13, 12, resp.into())
            }
            Self::Resume { sid: s, stag, resp } => {
                w0 |= sid(s) | fld(13, 12, resp.into());
                stag.into()
            }
            Self::Sync(s) => {
                let cs = match s.cs {
                    SyncCs::None => 0,
                    SyncCs::Irq => 1,
                    SyncCs::Sev => 2,
                };
                w0 |= fld(13, 12, cs)
                    | fld(23, 22, s.msh.into())
                    | fld(27, 24, s.msiattr.into())
                    | u64::from(s.msidata) << 32;
                s.msiaddr & bits::mask(51, 2)
            }
        };
        [w0, w1]
    }

    /// Decodes a command. Unknown opcodes and reserved encodings are [`CommandError::Illegal`]
    /// (CERROR_ILL); RES0 fields are ignored.
    pub fn decode(w: [u64; 2]) -> Result<Self, CommandError> {
        let [w0, w1] = w;
        let opcode = w0 as u8;
        let s = (w0 >> 32) as u32;
        let vmid = bits::get(w0, 47, 32) as u16;
        let asid = bits::get(w0, 63, 48) as u16;
        let va = || TlbiAddr::decode(w0, w1, VA_MASK);
        Ok(match opcode {
            op::PREFETCH_CONFIG => Self::PrefetchConfig {
                sid: s,
                ssid: get_ssid(w0),
            },
            op::PREFETCH_ADDR => Self::PrefetchAddr {
                sid: s,
                ssid: get_ssid(w0),
                addr: w1 & VA_MASK,
                size: bits::get(w1, 4, 0) as u8,
            },
            op::CFGI_STE => Self::CfgiSte {
                sid: s,
                leaf: bits::bit(w1, 0),
            },
            op::CFGI_STE_RANGE => match bits::get(w1, 4, 0) as u8 {
                CFGI_RANGE_ALL => Self::CfgiAll,
                range => Self::CfgiSteRange { sid: s, range },
            },
            op::CFGI_CD => Self::CfgiCd {
                sid: s,
                ssid: bits::get(w0, 31, 12) as u32,
                leaf: bits::bit(w1, 0),
            },
            op::CFGI_CD_ALL => Self::CfgiCdAll { sid: s },
            op::TLBI_NH_ALL => Self::TlbiNhAll { vmid },
            op::TLBI_NH_ASID => Self::TlbiNhAsid { vmid, asid },
            op::TLBI_NH_VA => Self::TlbiNhVa {
                vmid,
                asid,
                addr: va(),
            },
            op::TLBI_NH_VAA => Self::TlbiNhVaa { vmid, addr: va() },
            op::TLBI_EL3_ALL => Self::TlbiEl3All,
            op::TLBI_EL3_VA => Self::TlbiEl3Va { addr: va() },
            op::TLBI_EL2_ALL => Self::TlbiEl2All,
            op::TLBI_EL2_ASID => Self::TlbiEl2Asid { asid },
            op::TLBI_EL2_VA => Self::TlbiEl2Va { asid, addr: va() },
            op::TLBI_EL2_VAA => Self::TlbiEl2Vaa { addr: va() },
            op::TLBI_S12_VMALL => Self::TlbiS12Vmall { vmid },
            op::TLBI_S2_IPA => Self::TlbiS2Ipa {
                vmid,
                addr: TlbiAddr::decode(w0, w1, IPA_MASK),
            },
            op::TLBI_NSNH_ALL => Self::TlbiNsnhAll,
            op::ATC_INV => Self::AtcInv {
                sid: s,
                ssid: get_ssid(w0),
                global: bits::bit(w0, 9),
                addr: w1 & VA_MASK,
                size: bits::get(w1, 5, 0) as u8,
            },
            op::PRI_RESP => Self::PriResp {
                sid: s,
                ssid: get_ssid(w0),
                prgi: bits::get(w1, 8, 0) as u16,
                resp: bits::get(w1, 13, 12) as u8,
            },
            op::RESUME => Self::Resume {
                sid: s,
                stag: w1 as u16,
                resp: bits::get(w0, 13, 12) as u8,
            },
            op::STALL_TERM => Self::StallTerm { sid: s },
            op::SYNC => Self::Sync(Sync {
                cs: match bits::get(w0, 13, 12) {
                    0 => SyncCs::None,
                    1 => SyncCs::Irq,
                    2 => SyncCs::Sev,
                    // CS = 0b11 is reserved (IHI 0070 ch. 4, CMD_SYNC).
                    _ => return Err(CommandError::Illegal { opcode }),
                },
                msh: bits::get(w0, 23, 22) as u8,
                msiattr: bits::get(w0, 27, 24) as u8,
                msidata: (w0 >> 32) as u32,
                msiaddr: w1 & bits::mask(51, 2),
            }),
            _ => return Err(CommandError::Illegal { opcode }),
        })
    }

    /// The command as 16 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let [a, b] = self.encode();
        let mut out = [0; 16];
        out[..8].copy_from_slice(&a.to_le_bytes());
        out[8..].copy_from_slice(&b.to_le_bytes());
        out
    }

    /// The two doublewords of a command from its 16 little-endian bytes.
    pub fn words_from_bytes(b: &[u8; 16]) -> [u64; 2] {
        let mut lo = [0; 8];
        let mut hi = [0; 8];
        lo.copy_from_slice(&b[..8]);
        hi.copy_from_slice(&b[8..]);
        [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn range_addr() -> TlbiAddr {
        TlbiAddr {
            addr: 0xffff_8000_1234_5000,
            leaf: true,
            ttl: 3,
            tg: 1,
            num: 31,
            scale: 17,
        }
    }

    fn all_commands() -> Vec<Command> {
        let a = range_addr();
        vec![
            Command::PrefetchConfig {
                sid: 0xffff_ffff,
                ssid: Some(0xf_ffff),
            },
            Command::PrefetchConfig { sid: 7, ssid: None },
            Command::PrefetchAddr {
                sid: 9,
                ssid: Some(3),
                addr: 0x1234_5000,
                size: 31,
            },
            Command::CfgiSte {
                sid: 0x1234,
                leaf: true,
            },
            Command::CfgiSte {
                sid: 0x10,
                leaf: false,
            },
            Command::CfgiSteRange {
                sid: 0x100,
                range: 7,
            },
            Command::CfgiAll,
            Command::CfgiCd {
                sid: 5,
                ssid: 0xabcde,
                leaf: true,
            },
            Command::CfgiCdAll { sid: 0x8000_0001 },
            Command::TlbiNhAll { vmid: 0xbeef },
            Command::TlbiNhAsid {
                vmid: 1,
                asid: 0xffff,
            },
            Command::TlbiNhVa {
                vmid: 2,
                asid: 3,
                addr: a,
            },
            Command::TlbiNhVaa {
                vmid: 4,
                addr: TlbiAddr::single(0x4000, false),
            },
            Command::TlbiEl3All,
            Command::TlbiEl3Va { addr: a },
            Command::TlbiEl2All,
            Command::TlbiEl2Asid { asid: 0x55 },
            Command::TlbiEl2Va {
                asid: 0x66,
                addr: a,
            },
            Command::TlbiEl2Vaa { addr: a },
            Command::TlbiS12Vmall { vmid: 0x77 },
            Command::TlbiS2Ipa {
                vmid: 0x88,
                addr: TlbiAddr {
                    addr: 0x000f_ffff_ffff_f000,
                    ..a
                },
            },
            Command::TlbiNsnhAll,
            Command::AtcInv {
                sid: 1,
                ssid: Some(2),
                global: true,
                addr: 0xffff_f000,
                size: 52,
            },
            Command::PriResp {
                sid: 3,
                ssid: None,
                prgi: 0x1ff,
                resp: 2,
            },
            Command::Resume {
                sid: 4,
                stag: 0xffff,
                resp: 1,
            },
            Command::StallTerm { sid: 0x4242 },
            Command::Sync(Sync::none()),
            Command::Sync(Sync {
                cs: SyncCs::Irq,
                msh: 3,
                msiattr: 0xf,
                msidata: 0xdead_beef,
                msiaddr: 0x000f_ffff_ffff_fffc,
            }),
            Command::Sync(Sync {
                cs: SyncCs::Sev,
                ..Sync::none()
            }),
        ]
    }

    #[test]
    fn every_command_round_trips() {
        let cmds = all_commands();
        let mut seen = Vec::new();
        for c in &cmds {
            let w = c.encode();
            assert_eq!(w[0] as u8, c.opcode());
            assert_eq!(Command::decode(w), Ok(*c), "{c:?} -> {w:x?}");
            assert_eq!(Command::words_from_bytes(&c.to_bytes()), w);
            seen.push(c.opcode());
        }
        for o in [
            op::PREFETCH_CONFIG,
            op::PREFETCH_ADDR,
            op::CFGI_STE,
            op::CFGI_STE_RANGE,
            op::CFGI_CD,
            op::CFGI_CD_ALL,
            op::TLBI_NH_ALL,
            op::TLBI_NH_ASID,
            op::TLBI_NH_VA,
            op::TLBI_NH_VAA,
            op::TLBI_EL3_ALL,
            op::TLBI_EL3_VA,
            op::TLBI_EL2_ALL,
            op::TLBI_EL2_ASID,
            op::TLBI_EL2_VA,
            op::TLBI_EL2_VAA,
            op::TLBI_S12_VMALL,
            op::TLBI_S2_IPA,
            op::TLBI_NSNH_ALL,
            op::ATC_INV,
            op::PRI_RESP,
            op::RESUME,
            op::STALL_TERM,
            op::SYNC,
        ] {
            assert!(seen.contains(&o), "opcode {o:#x} not covered");
        }
    }

    #[test]
    fn encodings_match_linux_header() {
        // CMDQ_CFGI_0_SID GENMASK(63, 32), CMDQ_CFGI_1_LEAF bit 0.
        assert_eq!(
            Command::CfgiSte {
                sid: 0x1234,
                leaf: true
            }
            .encode(),
            [0x0000_1234_0000_0003, 1]
        );
        // CMD_CFGI_ALL: opcode 0x4 (CMDQ_OP_CFGI_ALL), CMDQ_CFGI_1_RANGE = 31.
        assert_eq!(Command::CfgiAll.encode(), [0x04, 31]);
        // CMDQ_TLBI_0_NUM (16,12), SCALE (24,20), VMID (47,32), ASID (63,48); 1_LEAF bit 0,
        // 1_TTL (9,8), 1_TG (11,10), 1_VA_MASK (63,12).
        let c = Command::TlbiNhVa {
            vmid: 0x12,
            asid: 0x34,
            addr: range_addr(),
        };
        let w0: u64 = 0x12 | 31 << 12 | 17 << 20 | 0x12 << 32 | 0x34 << 48;
        let w1: u64 = 0xffff_8000_1234_5000 | 1 | 3 << 8 | 1 << 10;
        assert_eq!(c.encode(), [w0, w1]);
        // CMDQ_TLBI_1_IPA_MASK GENMASK(51, 12): IPA bits above 51 are dropped.
        let c = Command::TlbiS2Ipa {
            vmid: 1,
            addr: TlbiAddr::single(u64::MAX, false),
        };
        assert_eq!(c.encode()[1], 0x000f_ffff_ffff_f000);
        // CMDQ_PRI_1_GRPID (8,0), CMDQ_PRI_1_RESP (13,12); CMDQ_RESUME_0_RESP (13,12),
        // CMDQ_RESUME_1_STAG (15,0); CMDQ_ATC_0_GLOBAL bit 9, CMDQ_ATC_1_SIZE (5,0); CMDQ_0_SSV 11.
        let c = Command::PriResp {
            sid: 2,
            ssid: Some(5),
            prgi: 0x101,
            resp: 2,
        };
        assert_eq!(
            c.encode(),
            [0x41 | 1 << 11 | 5 << 12 | 2 << 32, 0x101 | 2 << 12]
        );
        let c = Command::Resume {
            sid: 3,
            stag: 0xabcd,
            resp: 2,
        };
        assert_eq!(c.encode(), [0x44 | 2 << 12 | 3 << 32, 0xabcd]);
        let c = Command::AtcInv {
            sid: 1,
            ssid: None,
            global: true,
            addr: 0x5000,
            size: 52,
        };
        assert_eq!(c.encode(), [0x40 | 1 << 9 | 1 << 32, 0x5000 | 52]);
    }

    #[test]
    fn sync_and_illegal() {
        // CMDQ_SYNC_0_CS (13,12), MSH (23,22), MSIATTR (27,24), MSIDATA (63,32); 1_MSIADDR (51,2).
        let s = Command::Sync(Sync {
            cs: SyncCs::Irq,
            msh: 3,
            msiattr: 0xf,
            msidata: 7,
            msiaddr: 0x8000_1004,
        });
        assert_eq!(
            s.encode(),
            [0x46 | 1 << 12 | 3 << 22 | 0xf << 24 | 7 << 32, 0x8000_1004]
        );
        assert_eq!(
            Command::decode([0x46 | 3 << 12, 0]),
            Err(CommandError::Illegal { opcode: 0x46 })
        );
        for opc in [
            0x00u8, 0x07, 0x14, 0x19, 0x24, 0x29, 0x2b, 0x31, 0x42, 0x47, 0xff,
        ] {
            assert_eq!(
                Command::decode([opc.into(), 0]),
                Err(CommandError::Illegal { opcode: opc })
            );
        }
    }
}

//! Event queue records (IHI 0070 7.3): 32 bytes, four little-endian doublewords.
//!
//! Common layout (IHI 0070 7.3, and Linux `arm-smmu-v3.h` `EVTQ_*`, QEMU `EVT_SET_*`):
//! dword 0: EventID [7:0], SSV [11], SubstreamID [31:12], StreamID [63:32];
//! dword 1: STAG [15:0], Stall [31], PnU [33], InD [34], RnW [35], NSIPA [38], S2 [39],
//! CLASS [41:40]; dword 2: InputAddr [63:0]; dword 3: the IPA (ADDR2, [51:12] significant for
//! translation faults) or a fetch address ([51:3]).
//!
//! Not every event uses every field; [`Event`] carries them all, zero where unused, so that the
//! vSMMU can forward a record field by field.

use crate::bits;

/// The event type (EventID, dword 0 [7:0]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// 0x01 F_UUT: unsupported upstream transaction.
    FUut,
    /// 0x02 C_BAD_STREAMID: StreamID out of range or its L1 descriptor invalid.
    CBadStreamid,
    /// 0x03 F_STE_FETCH: the STE fetch aborted.
    FSteFetch,
    /// 0x04 C_BAD_STE: invalid STE (V = 0 or an illegal field).
    CBadSte,
    /// 0x05 F_BAD_ATS_TREQ.
    FBadAtsTreq,
    /// 0x06 F_STREAM_DISABLED.
    FStreamDisabled,
    /// 0x07 F_TRANSL_FORBIDDEN.
    FTranslForbidden,
    /// 0x08 C_BAD_SUBSTREAMID.
    CBadSubstreamid,
    /// 0x09 F_CD_FETCH.
    FCdFetch,
    /// 0x0a C_BAD_CD.
    CBadCd,
    /// 0x0b F_WALK_EABT: external abort during a table walk.
    FWalkEabt,
    /// 0x10 F_TRANSLATION.
    FTranslation,
    /// 0x11 F_ADDR_SIZE.
    FAddrSize,
    /// 0x12 F_ACCESS.
    FAccess,
    /// 0x13 F_PERMISSION.
    FPermission,
    /// 0x20 F_TLB_CONFLICT.
    FTlbConflict,
    /// 0x21 F_CFG_CONFLICT.
    FCfgConflict,
    /// 0x24 E_PAGE_REQUEST.
    EPageRequest,
    /// 0x25 F_VMS_FETCH.
    FVmsFetch,
    /// Any other EventID (reserved or IMPLEMENTATION DEFINED), kept as is.
    Other(u8),
}

impl EventKind {
    /// Decodes an EventID.
    pub fn from_id(id: u8) -> Self {
        match id {
            0x01 => Self::FUut,
            0x02 => Self::CBadStreamid,
            0x03 => Self::FSteFetch,
            0x04 => Self::CBadSte,
            0x05 => Self::FBadAtsTreq,
            0x06 => Self::FStreamDisabled,
            0x07 => Self::FTranslForbidden,
            0x08 => Self::CBadSubstreamid,
            0x09 => Self::FCdFetch,
            0x0a => Self::CBadCd,
            0x0b => Self::FWalkEabt,
            0x10 => Self::FTranslation,
            0x11 => Self::FAddrSize,
            0x12 => Self::FAccess,
            0x13 => Self::FPermission,
            0x20 => Self::FTlbConflict,
            0x21 => Self::FCfgConflict,
            0x24 => Self::EPageRequest,
            0x25 => Self::FVmsFetch,
            x => Self::Other(x),
        }
    }

    /// The EventID.
    pub fn id(self) -> u8 {
        match self {
            Self::FUut => 0x01,
            Self::CBadStreamid => 0x02,
            Self::FSteFetch => 0x03,
            Self::CBadSte => 0x04,
            Self::FBadAtsTreq => 0x05,
            Self::FStreamDisabled => 0x06,
            Self::FTranslForbidden => 0x07,
            Self::CBadSubstreamid => 0x08,
            Self::FCdFetch => 0x09,
            Self::CBadCd => 0x0a,
            Self::FWalkEabt => 0x0b,
            Self::FTranslation => 0x10,
            Self::FAddrSize => 0x11,
            Self::FAccess => 0x12,
            Self::FPermission => 0x13,
            Self::FTlbConflict => 0x20,
            Self::FCfgConflict => 0x21,
            Self::EPageRequest => 0x24,
            Self::FVmsFetch => 0x25,
            Self::Other(x) => x,
        }
    }

    /// The spec's name for the event.
    pub fn name(self) -> &'static str {
        match self {
            Self::FUut => "F_UUT",
            Self::CBadStreamid => "C_BAD_STREAMID",
            Self::FSteFetch => "F_STE_FETCH",
            Self::CBadSte => "C_BAD_STE",
            Self::FBadAtsTreq => "F_BAD_ATS_TREQ",
            Self::FStreamDisabled => "F_STREAM_DISABLED",
            Self::FTranslForbidden => "F_TRANSL_FORBIDDEN",
            Self::CBadSubstreamid => "C_BAD_SUBSTREAMID",
            Self::FCdFetch => "F_CD_FETCH",
            Self::CBadCd => "C_BAD_CD",
            Self::FWalkEabt => "F_WALK_EABT",
            Self::FTranslation => "F_TRANSLATION",
            Self::FAddrSize => "F_ADDR_SIZE",
            Self::FAccess => "F_ACCESS",
            Self::FPermission => "F_PERMISSION",
            Self::FTlbConflict => "F_TLB_CONFLICT",
            Self::FCfgConflict => "F_CFG_CONFLICT",
            Self::EPageRequest => "E_PAGE_REQUEST",
            Self::FVmsFetch => "F_VMS_FETCH",
            Self::Other(_) => "IMPDEF/reserved",
        }
    }
}

/// CLASS (dword 1 [41:40]): what the faulting access was doing (IHI 0070 7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventClass {
    /// 0b00 CD: fetching a CD.
    #[default]
    Cd,
    /// 0b01 TT: a stage-1 table walk.
    Tt,
    /// 0b10 IN: the input address itself.
    In,
    /// 0b11: reserved.
    Reserved,
}

impl EventClass {
    fn from_bits(v: u64) -> Self {
        match v & 3 {
            0 => Self::Cd,
            1 => Self::Tt,
            2 => Self::In,
            _ => Self::Reserved,
        }
    }

    fn bits(self) -> u64 {
        match self {
            Self::Cd => 0,
            Self::Tt => 1,
            Self::In => 2,
            Self::Reserved => 3,
        }
    }
}

/// A decoded event record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// EventID.
    pub kind: EventKind,
    /// StreamID.
    pub stream_id: u32,
    /// SubstreamID when SSV = 1.
    pub substream: Option<u32>,
    /// STAG: stall tag (with `stall`).
    pub stag: u16,
    /// Stall: the transaction is stalled awaiting CMD_RESUME.
    pub stall: bool,
    /// PnU: privileged (1) or unprivileged access.
    pub pnu: bool,
    /// InD: instruction (1) or data access.
    pub ind: bool,
    /// RnW: read (1) or write access.
    pub rnw: bool,
    /// NSIPA: the IPA is non-secure.
    pub nsipa: bool,
    /// S2: the fault happened at stage 2 (in nested mode, also for stage-1 walks and CD fetches).
    pub s2: bool,
    /// CLASS.
    pub class: EventClass,
    /// InputAddr: the transaction's input address (IOVA).
    pub input_addr: u64,
    /// ADDR2: the IPA of a stage-2 fault ([51:12]) or a fetch address ([51:3]); bits [51:3] kept.
    pub addr2: u64,
}

const ADDR2_MASK: u64 = bits::mask(51, 3);

impl Event {
    /// Size of an event record in bytes.
    pub const SIZE: usize = 32;

    /// An event of `kind` for `stream_id` with every other field zero.
    pub fn new(kind: EventKind, stream_id: u32) -> Self {
        Self {
            kind,
            stream_id,
            substream: None,
            stag: 0,
            stall: false,
            pnu: false,
            ind: false,
            rnw: false,
            nsipa: false,
            s2: false,
            class: EventClass::Cd,
            input_addr: 0,
            addr2: 0,
        }
    }

    /// Decodes any four doublewords; never fails (unknown EventIDs become [`EventKind::Other`]).
    pub fn decode(w: [u64; 4]) -> Self {
        let [w0, w1, w2, w3] = w;
        Self {
            kind: EventKind::from_id(w0 as u8),
            stream_id: (w0 >> 32) as u32,
            substream: bits::bit(w0, 11).then_some(bits::get(w0, 31, 12) as u32),
            stag: w1 as u16,
            stall: bits::bit(w1, 31),
            pnu: bits::bit(w1, 33),
            ind: bits::bit(w1, 34),
            rnw: bits::bit(w1, 35),
            nsipa: bits::bit(w1, 38),
            s2: bits::bit(w1, 39),
            class: EventClass::from_bits(bits::get(w1, 41, 40)),
            input_addr: w2,
            addr2: w3 & ADDR2_MASK,
        }
    }

    /// Encodes the record (RES0 fields zero; `substream` above 20 bits and `addr2` outside
    /// [51:3] are dropped).
    pub fn encode(&self) -> [u64; 4] {
        let mut w0 = u64::from(self.kind.id()) | u64::from(self.stream_id) << 32;
        if let Some(ss) = self.substream {
            w0 |= 1 << 11 | bits::set(0, 31, 12, ss.into());
        }
        let w1 = u64::from(self.stag)
            | u64::from(self.stall) << 31
            | u64::from(self.pnu) << 33
            | u64::from(self.ind) << 34
            | u64::from(self.rnw) << 35
            | u64::from(self.nsipa) << 38
            | u64::from(self.s2) << 39
            | self.class.bits() << 40;
        [w0, w1, self.input_addr, self.addr2 & ADDR2_MASK]
    }

    /// Decodes 32 little-endian bytes.
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        let mut w = [0u64; 4];
        for (wi, chunk) in w.iter_mut().zip(b.chunks_exact(8)) {
            let mut a = [0; 8];
            a.copy_from_slice(chunk);
            *wi = u64::from_le_bytes(a);
        }
        Self::decode(w)
    }

    /// The record as 32 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0; 32];
        for (chunk, w) in out.chunks_exact_mut(8).zip(self.encode()) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_IDS: [u8; 19] = [
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x10, 0x11, 0x12, 0x13,
        0x20, 0x21, 0x24, 0x25,
    ];

    #[test]
    fn kinds_round_trip() {
        for id in 0..=255u8 {
            let k = EventKind::from_id(id);
            assert_eq!(k.id(), id);
            assert_eq!(
                matches!(k, EventKind::Other(_)),
                !ALL_IDS.contains(&id),
                "{id:#x}"
            );
        }
    }

    #[test]
    fn translation_fault_matches_linux_layout() {
        // Linux: EVTQ_0_ID (7,0), EVTQ_0_SSV bit 11, EVTQ_0_SSID (31,12), EVTQ_0_SID (63,32);
        // EVTQ_1_STAG (15,0), EVTQ_1_STALL bit 31, EVTQ_1_PnU 33, EVTQ_1_InD 34, EVTQ_1_RnW 35,
        // EVTQ_1_S2 39, EVTQ_1_CLASS (41,40); EVTQ_2_ADDR; EVTQ_3_IPA (51,12).
        let e = Event {
            kind: EventKind::FTranslation,
            stream_id: 0x10,
            substream: Some(0x3),
            stag: 0x55,
            stall: true,
            pnu: true,
            ind: false,
            rnw: true,
            nsipa: false,
            s2: true,
            class: EventClass::Tt,
            input_addr: 0xffff_0000_dead_b000,
            addr2: 0x0000_0008_4000_0000,
        };
        let w = e.encode();
        assert_eq!(w[0], 0x10 | 1 << 11 | 3 << 12 | 0x10 << 32);
        assert_eq!(w[1], 0x55 | 1 << 31 | 1 << 33 | 1 << 35 | 1 << 39 | 1 << 40);
        assert_eq!(w[2], 0xffff_0000_dead_b000);
        assert_eq!(w[3], 0x0000_0008_4000_0000);
        assert_eq!(Event::decode(w), e);
        assert_eq!(Event::from_bytes(&e.to_bytes()), e);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_reencode_stably() {
        // A cheap deterministic generator: decoding any bytes works, and decode(encode(decode(x)))
        // is a fixed point.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut w = [0u64; 4];
            for wi in &mut w {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *wi = x;
            }
            let e = Event::decode(w);
            assert_eq!(Event::decode(e.encode()), e);
        }
        let e = Event::from_bytes(&[0xff; 32]);
        assert_eq!(e.kind, EventKind::Other(0xff));
        assert_eq!(e.class, EventClass::Reserved);
        assert_eq!(Event::from_bytes(&[0; 32]).kind, EventKind::Other(0));
    }
}

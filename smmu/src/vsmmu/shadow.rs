//! Stream table shadowing: finding a guest STE in the guest's own (linear or 2-level) stream
//! table, and turning it into the physical STE for a stage-1-only SMMU nested over the VM's
//! stage 2.

use super::{GuestMemory, VsmmuConfig};
use crate::bits;
use crate::event::EventKind;
use crate::ste::{S1Fields, Ste, StreamConfig};

/// The guest's stream table registers (SMMU_STRTAB_BASE, SMMU_STRTAB_BASE_CFG) and the
/// StreamID size it was given.
#[derive(Debug, Clone, Copy)]
pub struct StreamTableCfg {
    /// SMMU_STRTAB_BASE.
    pub base: u64,
    /// SMMU_STRTAB_BASE_CFG.
    pub cfg: u32,
    /// SMMU_IDR1.SIDSIZE.
    pub sid_bits: u8,
}

/// A guest STE as read from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSte(pub Ste);

impl StreamTableCfg {
    /// Reads the guest's STE for `vsid`. An error is the event the guest's SMMU records for a
    /// transaction of that stream (IHI 0070 5.1, 7.3): C_BAD_STREAMID when the StreamID is
    /// beyond the table or its L1 descriptor is invalid, F_STE_FETCH when the table is not in
    /// guest RAM.
    pub fn fetch(&self, vsid: u32, mem: &impl GuestMemory) -> Result<GuestSte, EventKind> {
        let base = self.base & bits::mask(51, 6);
        // LOG2SIZE beyond SIDSIZE behaves as SIDSIZE (IHI 0070 6.3.24).
        let log2size = (bits::get(self.cfg.into(), 5, 0) as u8).min(self.sid_bits);
        if u64::from(vsid) >> log2size != 0 {
            return Err(EventKind::CBadStreamid);
        }
        let addr = match bits::get(self.cfg.into(), 17, 16) {
            0 => base + u64::from(vsid) * Ste::SIZE as u64,
            1 => {
                let split = bits::get(self.cfg.into(), 10, 6) as u32;
                // SPLIT is 6, 8 or 10; other values are reserved (treated as broken).
                if !matches!(split, 6 | 8 | 10) {
                    return Err(EventKind::CBadStreamid);
                }
                let l1_addr = base + (u64::from(vsid) >> split) * 8;
                let mut d = [0u8; 8];
                mem.read(l1_addr, &mut d)
                    .map_err(|_| EventKind::FSteFetch)?;
                let l1 = u64::from_le_bytes(d);
                // L1STD: Span [4:0] (0 = invalid, at most SPLIT + 1), L2Ptr [51:6].
                let span = (l1 & 0x1f) as u32;
                if span == 0 || span > split + 1 {
                    return Err(EventKind::CBadStreamid);
                }
                let index = u64::from(vsid) & ((1 << split) - 1);
                if index >> (span - 1) != 0 {
                    return Err(EventKind::CBadStreamid);
                }
                (l1 & bits::mask(51, 6)) + index * Ste::SIZE as u64
            }
            _ => return Err(EventKind::CBadStreamid),
        };
        let mut b = [0u8; 64];
        mem.read(addr, &mut b).map_err(|_| EventKind::FSteFetch)?;
        Ok(GuestSte(Ste::from_bytes(&b)))
    }
}

/// The physical STE for a guest STE, and the event the guest's SMMU would record for the
/// stream's transactions when the guest STE is invalid or ILLEGAL (IHI 0070 5.2) for a
/// stage-1-only SMMU with SSIDSIZE 0:
///
/// - V = 0, a reserved Config, a stage-2 Config (no S2P), S1CDMax > 0 (no substreams),
///   a reserved STRW, or S1ContextPtr beyond the OAS: C_BAD_STE, physical STE invalid;
/// - Config abort: abort; bypass: the VM's stage 2 only (never physical bypass);
/// - stage-1 translate: nested, the guest's CD pointer and CD fetch attributes over the VM's
///   stage 2. Every other guest field (STRW, EATS, S1STALLD, MEV, overrides) is left out: the
///   physical STE carries only what a stage-1-only SMMU could honour.
pub fn shadow_ste(g: &GuestSte, cfg: &VsmmuConfig) -> (Ste, Option<EventKind>) {
    let s = g.0;
    let bad = (Ste::default(), Some(EventKind::CBadSte));
    if !s.v() {
        return bad;
    }
    // Config [3:1]: 0b001-0b011 are reserved, which makes the STE ILLEGAL (QEMU would take
    // them as abort; the guest's SMMU follows the spec).
    if matches!(bits::get(s.0[0], 3, 1), 1..=3) {
        return bad;
    }
    match s.config() {
        StreamConfig::Abort => (Ste::abort(), None),
        StreamConfig::Bypass => (Ste::stage2(cfg.s2), None),
        StreamConfig::S1Translate => {
            let ptr = s.s1_context_ptr();
            // STRW 0b01 is reserved; EL2 regimes need IDR0.HYP.
            if s.s1cdmax() != 0 || s.strw() != 0 || ptr >> cfg.oas_bits != 0 {
                return bad;
            }
            let s1 = S1Fields {
                context_ptr: ptr,
                fmt: 0,
                cdmax: 0,
                dss: 0,
                cir: s.s1cir(),
                cor: s.s1cor(),
                csh: s.s1csh(),
            };
            (Ste::nested(s1, cfg.s2), None)
        }
        _ => bad,
    }
}

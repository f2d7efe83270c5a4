//! GICD frame (IHI 0069H 12.9).
//!
//! Affinity routing is always enabled, so every register slot that describes INTIDs 0-31 (the
//! "banked" GICv2-style views such as GICD_ISENABLER0, GICD_IPRIORITYR0-7, GICD_ICFGR0-1) is
//! RAZ/WI here: the guest must use the redistributor's SGI_base frame instead (IHI 0069H 12.9,
//! "When affinity routing is enabled ... RAZ/WI"). INTIDs past the configured SPIs are RAZ/WI.

use super::regs::*;
use super::{in_frame, in_range, BitReg, BitWrite, VGic, NUM_PRIVATE};
use crate::mmio::AccessWidth;

impl VGic {
    /// Guest read of the GICD frame; `offset` is within the 64 KiB frame.
    pub fn dist_read(&mut self, offset: u64, width: AccessWidth) -> u64 {
        if !in_frame(offset, width, GICD_FRAME_SIZE) {
            return 0;
        }
        match width {
            AccessWidth::Byte if in_range(offset, GICD_IPRIORITYR, GICD_IPRIORITYR_SIZE) => {
                self.dist_priority((offset - GICD_IPRIORITYR) as u32).into()
            }
            AccessWidth::Word if in_range(offset, GICD_IROUTER, GICD_IROUTER_SIZE) => {
                // 32-bit access to either half of the 64-bit register.
                let reg = self.irouter_read(offset & !7);
                if offset & 4 == 0 {
                    reg & 0xFFFF_FFFF
                } else {
                    reg >> 32
                }
            }
            AccessWidth::Word => self.dist_read32(offset).into(),
            AccessWidth::Double if in_range(offset, GICD_IROUTER, GICD_IROUTER_SIZE) => {
                self.irouter_read(offset)
            }
            _ => 0,
        }
    }

    /// Guest write of the GICD frame; `offset` is within the 64 KiB frame.
    pub fn dist_write(&mut self, offset: u64, width: AccessWidth, value: u64) {
        if !in_frame(offset, width, GICD_FRAME_SIZE) {
            return;
        }
        let value = value & width.mask();
        match width {
            AccessWidth::Byte if in_range(offset, GICD_IPRIORITYR, GICD_IPRIORITYR_SIZE) => {
                self.set_dist_priority((offset - GICD_IPRIORITYR) as u32, value as u8);
            }
            AccessWidth::Word if in_range(offset, GICD_IROUTER, GICD_IROUTER_SIZE) => {
                let base = offset & !7;
                let old = self.irouter_read(base);
                let new = if offset & 4 == 0 {
                    (old & !0xFFFF_FFFF) | value
                } else {
                    (old & 0xFFFF_FFFF) | (value << 32)
                };
                self.irouter_write(base, new);
            }
            AccessWidth::Word => self.dist_write32(offset, value as u32),
            AccessWidth::Double if in_range(offset, GICD_IROUTER, GICD_IROUTER_SIZE) => {
                self.irouter_write(offset, value);
            }
            _ => {}
        }
    }

    fn dist_typer(&self) -> u32 {
        // ITLinesNumber: 32 * (N + 1) INTIDs. CPUNumber stays 0 because ARE=1. No MBIS/ESPI.
        let mut typer = self.num_spis / 32;
        if self.lpi_support {
            typer |= GICD_TYPER_LPIS | GICD_TYPER_IDBITS_LPIS << GICD_TYPER_IDBITS_SHIFT;
            typer |= self.num_lpis_field() << GICD_TYPER_NUM_LPIS_SHIFT;
        } else {
            typer |= GICD_TYPER_IDBITS_NO_LPIS << GICD_TYPER_IDBITS_SHIFT;
        }
        // Advertise Aff3 and Range Selector support only when the vCPU topology needs them, so
        // Linux can address every vCPU; sgi_targets() decodes both regardless.
        if self.redists.iter().any(|r| (r.mpidr >> 32) & 0xFF != 0) {
            typer |= GICD_TYPER_A3V;
        }
        if self.redists.iter().any(|r| r.mpidr & 0xFF > 15) {
            typer |= GICD_TYPER_RSS;
        }
        typer
    }

    /// GICD_TYPER.num_LPIs: the largest 2^(n+1) within the store's bound, so that Linux
    /// (`its_lpi_init`, "hypervisor restricted LPI range") allocates only LPIs the store keeps.
    /// 0 (no restriction beyond IDbits) when the store covers every 16-bit LPI, or is too small
    /// to express (fewer than 4 LPIs, which Linux would not honour anyway).
    fn num_lpis_field(&self) -> u32 {
        let n = self.lpis.count();
        if !(4..super::MAX_LPIS).contains(&n) {
            0
        } else {
            n.ilog2() - 1
        }
    }

    /// Maps GICD bit-array register word `n` (INTIDs 32n..32n+31) to an SPI bank word.
    fn spi_word(&self, n: u64) -> Option<usize> {
        let n = n as usize;
        (n >= 1 && n <= self.spis.pending.len()).then(|| n - 1)
    }

    fn dist_bits_read(&self, reg: BitReg, base: u64, offset: u64) -> u32 {
        self.spi_word((offset - base) / 4)
            .map_or(0, |w| self.spis.read_word(reg, w))
    }

    fn dist_bits_write(&mut self, reg: BitReg, op: BitWrite, base: u64, offset: u64, value: u32) {
        if let Some(w) = self.spi_word((offset - base) / 4) {
            self.spis.write_word(reg, w, op, value, u32::MAX);
        }
    }

    fn dist_read32(&self, offset: u64) -> u32 {
        let bits = |base| in_range(offset, base, GICD_BITS_ARRAY_SIZE);
        match offset {
            GICD_CTLR => self.ctlr | GICD_CTLR_ARE | GICD_CTLR_DS, // RWP always 0
            GICD_TYPER => self.dist_typer(),
            GICD_IIDR => GIC_IIDR,
            GICD_PIDR2 => GIC_PIDR2,
            // TYPER2, STATUSR, SGIR, IGRPMODR (DS=1), NSACR (DS=1), ITARGETSR (ARE=1) and
            // IS/ICACTIVER (active state lives in the list registers): RAZ.
            o if bits(GICD_IGROUPR) => self.dist_bits_read(BitReg::Group, GICD_IGROUPR, o),
            o if bits(GICD_ISENABLER) => self.dist_bits_read(BitReg::Enable, GICD_ISENABLER, o),
            o if bits(GICD_ICENABLER) => self.dist_bits_read(BitReg::Enable, GICD_ICENABLER, o),
            o if bits(GICD_ISPENDR) => self.dist_bits_read(BitReg::Pending, GICD_ISPENDR, o),
            o if bits(GICD_ICPENDR) => self.dist_bits_read(BitReg::Pending, GICD_ICPENDR, o),
            o if in_range(o, GICD_IPRIORITYR, GICD_IPRIORITYR_SIZE) => {
                let first = (o - GICD_IPRIORITYR) as u32;
                (0..4).fold(0, |acc, i| {
                    acc | u32::from(self.dist_priority(first + i)) << (8 * i)
                })
            }
            o if in_range(o, GICD_ICFGR, GICD_ICFGR_SIZE) => {
                // ICFGR<n> covers INTIDs 16n..16n+15; n = 0, 1 are the private ones.
                let first = ((o - GICD_ICFGR) / 4 * 16) as u32;
                if first < NUM_PRIVATE || first - NUM_PRIVATE >= self.num_spis {
                    0
                } else {
                    self.spis.read_icfgr((first - NUM_PRIVATE) as usize)
                }
            }
            _ => 0,
        }
    }

    fn dist_write32(&mut self, offset: u64, value: u32) {
        let bits = |base| in_range(offset, base, GICD_BITS_ARRAY_SIZE);
        match offset {
            // Only the group enables are state; ARE/DS are RAO/WI, E1NWF RAZ/WI.
            GICD_CTLR => self.ctlr = value & (GICD_CTLR_ENABLE_GRP0 | GICD_CTLR_ENABLE_GRP1),
            o if bits(GICD_IGROUPR) => {
                self.dist_bits_write(BitReg::Group, BitWrite::Replace, GICD_IGROUPR, o, value)
            }
            o if bits(GICD_ISENABLER) => {
                self.dist_bits_write(BitReg::Enable, BitWrite::Set, GICD_ISENABLER, o, value)
            }
            o if bits(GICD_ICENABLER) => {
                self.dist_bits_write(BitReg::Enable, BitWrite::Clear, GICD_ICENABLER, o, value)
            }
            o if bits(GICD_ISPENDR) => {
                self.dist_bits_write(BitReg::Pending, BitWrite::Set, GICD_ISPENDR, o, value)
            }
            o if bits(GICD_ICPENDR) => {
                self.dist_bits_write(BitReg::Pending, BitWrite::Clear, GICD_ICPENDR, o, value)
            }
            o if in_range(o, GICD_IPRIORITYR, GICD_IPRIORITYR_SIZE) => {
                let first = (o - GICD_IPRIORITYR) as u32;
                for i in 0..4 {
                    self.set_dist_priority(first + i, (value >> (8 * i)) as u8);
                }
            }
            o if in_range(o, GICD_ICFGR, GICD_ICFGR_SIZE) => {
                let first = ((o - GICD_ICFGR) / 4 * 16) as u32;
                if first >= NUM_PRIVATE && first - NUM_PRIVATE < self.num_spis {
                    self.spis.write_icfgr((first - NUM_PRIVATE) as usize, value);
                }
            }
            // Everything else, including GICD_SGIR (SGIs are sent through ICC_SGI1R_EL1 with
            // ARE=1), is WI.
            _ => {}
        }
    }

    /// GICD_IPRIORITYR byte for `intid`; RAZ for private and unimplemented INTIDs.
    fn dist_priority(&self, intid: u32) -> u8 {
        if intid < NUM_PRIVATE {
            return 0;
        }
        self.spis
            .priority
            .get((intid - NUM_PRIVATE) as usize)
            .copied()
            .unwrap_or(0)
    }

    fn set_dist_priority(&mut self, intid: u32, prio: u8) {
        if intid < NUM_PRIVATE {
            return;
        }
        if let Some(p) = self.spis.priority.get_mut((intid - NUM_PRIVATE) as usize) {
            *p = prio;
        }
    }

    /// IROUTER at 8-byte-aligned `offset` (within the GICD frame); RAZ for n < 32 (reserved) and
    /// unimplemented SPIs.
    fn irouter_read(&self, offset: u64) -> u64 {
        ((offset - GICD_IROUTER) / 8)
            .checked_sub(NUM_PRIVATE.into())
            .and_then(|idx| self.irouter.get(idx as usize))
            .copied()
            .unwrap_or(0)
    }

    fn irouter_write(&mut self, offset: u64, value: u64) {
        let Some(idx) = ((offset - GICD_IROUTER) / 8).checked_sub(NUM_PRIVATE.into()) else {
            return;
        };
        let idx = idx as usize;
        let value = value & GICD_IROUTER_WRITABLE;
        let target = self.route(value);
        if let (Some(r), Some(t)) = (self.irouter.get_mut(idx), self.spi_target.get_mut(idx)) {
            *r = value;
            *t = target;
        }
    }
}

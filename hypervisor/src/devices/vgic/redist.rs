//! GICR frames of one vCPU (IHI 0069H 12.10): RD_base at 0, SGI_base at 0x10000.
//!
//! Without LPI support GICR_CTLR.EnableLPIs, PROPBASER and PENDBASER are RAZ/WI and
//! GICR_TYPER.PLPIS=0. With it, PLPIS=1 (VLPIS, DirectLPI and CommonLPIAff 0: each
//! redistributor has its own PROPBASER as the guest programs it, and Linux programs the same
//! table into each), EnableLPIs is set once and then stays set until reset (RES1 after being
//! written 1 is IMPLEMENTATION DEFINED, IHI 0069H 12.11.2; so GICR_CTLR.CES reads 0), and
//! PROPBASER/PENDBASER hold what was written while EnableLPIs is 0 and ignore writes once it is 1
//! (UNPREDICTABLE in the spec, IHI 0069H GICR_PROPBASER and GICR_PENDBASER).
//! DS=1 makes IGRPMODR0 and NSACR RAZ/WI; active state is not modelled (IS/ICACTIVER0 RAZ/WI).

use super::regs::*;
use super::{in_frame, in_range, BitReg, BitWrite, Redist, VGic, NUM_SGIS};
use crate::mmio::AccessWidth;

/// GICR_ICFGR0 read value: every SGI is edge-triggered (bit[2F+1] set), IHI 0069H 12.11.7.
const ICFGR0_SGIS_EDGE: u32 = 0xAAAA_AAAA;

impl VGic {
    /// Guest read of `vcpu`'s redistributor; `offset` is within its 128 KiB region.
    pub fn redist_read(&mut self, vcpu: usize, offset: u64, width: AccessWidth) -> u64 {
        if vcpu >= self.redists.len() || !in_frame(offset, width, GICR_FRAME_SIZE) {
            return 0;
        }
        match width {
            AccessWidth::Byte if in_range(offset, GICR_IPRIORITYR, GICR_IPRIORITYR_SIZE) => {
                self.redist_priority(vcpu, offset).into()
            }
            AccessWidth::Word => match self.redist_reg64(vcpu, offset & !7) {
                // 32-bit access to either half of a 64-bit register.
                Some(reg) if offset & 4 == 0 => reg & 0xFFFF_FFFF,
                Some(reg) => reg >> 32,
                None => self.redist_read32(vcpu, offset).into(),
            },
            AccessWidth::Double => self.redist_reg64(vcpu, offset).unwrap_or(0),
            _ => 0,
        }
    }

    /// Guest write of `vcpu`'s redistributor; `offset` is within its 128 KiB region.
    pub fn redist_write(&mut self, vcpu: usize, offset: u64, width: AccessWidth, value: u64) {
        if vcpu >= self.redists.len() || !in_frame(offset, width, GICR_FRAME_SIZE) {
            return;
        }
        let value = value & width.mask();
        match width {
            AccessWidth::Byte if in_range(offset, GICR_IPRIORITYR, GICR_IPRIORITYR_SIZE) => {
                self.set_redist_priority(vcpu, offset, value as u8);
            }
            AccessWidth::Word if self.lpi_support && Self::lpi_base_reg(offset & !7) => {
                let base = offset & !7;
                let old = self.redist_reg64(vcpu, base).unwrap_or(0);
                let new = if offset & 4 == 0 {
                    (old & !0xFFFF_FFFF) | value
                } else {
                    (old & 0xFFFF_FFFF) | (value << 32)
                };
                self.write_lpi_base(vcpu, base, new);
            }
            AccessWidth::Word => self.redist_write32(vcpu, offset, value as u32),
            AccessWidth::Double if self.lpi_support => self.write_lpi_base(vcpu, offset, value),
            // GICR_TYPER is read-only; PROPBASER/PENDBASER WI without LPIs.
            _ => {}
        }
    }

    /// GICR_PROPBASER or GICR_PENDBASER.
    fn lpi_base_reg(offset: u64) -> bool {
        offset == GICR_PROPBASER || offset == GICR_PENDBASER
    }

    /// The 64-bit register at 8-byte-aligned `offset`, if there is one there: GICR_TYPER, and
    /// with LPI support GICR_PROPBASER/PENDBASER.
    fn redist_reg64(&self, vcpu: usize, offset: u64) -> Option<u64> {
        let r = self.redist(vcpu)?;
        match offset {
            GICR_TYPER => Some(self.redist_typer(vcpu)),
            GICR_PROPBASER if self.lpi_support => Some(r.propbaser),
            GICR_PENDBASER if self.lpi_support => Some(r.pendbaser),
            _ => None,
        }
    }

    /// A write of PROPBASER or PENDBASER (other offsets WI); ignored once EnableLPIs is set.
    fn write_lpi_base(&mut self, vcpu: usize, offset: u64, value: u64) {
        let Some(r) = self.redists.get_mut(vcpu).filter(|r| !r.enable_lpis) else {
            return;
        };
        match offset {
            GICR_PROPBASER => r.propbaser = value & GICR_PROPBASER_WRITABLE,
            GICR_PENDBASER => r.pendbaser = value & GICR_PENDBASER_WRITABLE,
            _ => {}
        }
    }

    fn redist_typer(&self, vcpu: usize) -> u64 {
        let Some(r) = self.redists.get(vcpu) else {
            return 0;
        };
        // Affinity_Value [63:32] = Aff3.Aff2.Aff1.Aff0; MPIDR has Aff3 at [39:32].
        let aff = ((r.mpidr >> 8) & 0xFF00_0000) | (r.mpidr & 0x00FF_FFFF);
        let mut typer = (aff << GICR_TYPER_AFFINITY_SHIFT)
            | ((vcpu as u64 & 0xFFFF) << GICR_TYPER_PROCESSOR_NUMBER_SHIFT);
        if vcpu + 1 == self.redists.len() {
            // Lets Linux's gic_iterate_rdists() stop at the last frame.
            typer |= GICR_TYPER_LAST;
        }
        if self.lpi_support {
            typer |= GICR_TYPER_PLPIS;
        }
        typer
    }

    fn redist(&self, vcpu: usize) -> Option<&Redist> {
        self.redists.get(vcpu)
    }

    fn redist_read32(&self, vcpu: usize, offset: u64) -> u32 {
        let Some(r) = self.redist(vcpu) else {
            return 0;
        };
        match offset {
            // GICR_CTLR: RWP/UWP read 0 (writes take effect at once); EnableLPIs RAZ without
            // LPI support.
            GICR_CTLR if r.enable_lpis => GICR_CTLR_ENABLE_LPIS,
            GICR_IIDR => GIC_IIDR,
            GICR_WAKER if r.processor_sleep => {
                GICR_WAKER_PROCESSOR_SLEEP | GICR_WAKER_CHILDREN_ASLEEP
            }
            GICR_PIDR2 => GIC_PIDR2,
            GICR_IGROUPR0 => r.irqs.read_word(BitReg::Group, 0),
            GICR_ISENABLER0 | GICR_ICENABLER0 => r.irqs.read_word(BitReg::Enable, 0),
            GICR_ISPENDR0 | GICR_ICPENDR0 => r.irqs.read_word(BitReg::Pending, 0),
            o if in_range(o, GICR_IPRIORITYR, GICR_IPRIORITYR_SIZE) => (0..4).fold(0, |acc, i| {
                acc | u32::from(self.redist_priority(vcpu, o + i)) << (8 * i)
            }),
            GICR_ICFGR0 => ICFGR0_SGIS_EDGE,
            GICR_ICFGR1 => r.irqs.read_icfgr(16),
            // CTLR, STATUSR, WAKER (awake), IS/ICACTIVER0, IGRPMODR0, NSACR and everything
            // unimplemented.
            _ => 0,
        }
    }

    fn redist_write32(&mut self, vcpu: usize, offset: u64, value: u32) {
        match offset {
            GICR_CTLR if self.lpi_support && value & GICR_CTLR_ENABLE_LPIS != 0 => {
                if let Some(r) = self.redists.get_mut(vcpu) {
                    // 0 -> 1 only: a later 0 is ignored (RES1 once set).
                    r.enable_lpis = true;
                }
            }
            GICR_WAKER => {
                if let Some(r) = self.redists.get_mut(vcpu) {
                    // Only ProcessorSleep is writable; ChildrenAsleep follows it immediately.
                    r.processor_sleep = value & GICR_WAKER_PROCESSOR_SLEEP != 0;
                }
            }
            o if in_range(o, GICR_IPRIORITYR, GICR_IPRIORITYR_SIZE) => {
                for i in 0..4 {
                    self.set_redist_priority(vcpu, o + i, (value >> (8 * i)) as u8);
                }
            }
            _ => {
                let Some(r) = self.redists.get_mut(vcpu) else {
                    return;
                };
                let (reg, op) = match offset {
                    GICR_IGROUPR0 => (BitReg::Group, BitWrite::Replace),
                    GICR_ISENABLER0 => (BitReg::Enable, BitWrite::Set),
                    GICR_ICENABLER0 => (BitReg::Enable, BitWrite::Clear),
                    GICR_ISPENDR0 => (BitReg::Pending, BitWrite::Set),
                    GICR_ICPENDR0 => (BitReg::Pending, BitWrite::Clear),
                    GICR_ICFGR1 => {
                        // PPI trigger mode is programmable here (IMPLEMENTATION DEFINED,
                        // IHI 0069H 12.11.8); GICR_ICFGR0 (SGIs) is read-only.
                        r.irqs.write_icfgr(NUM_SGIS as usize, value);
                        return;
                    }
                    // CTLR (EnableLPIs RAZ/WI), STATUSR, IS/ICACTIVER0, ICFGR0, IGRPMODR0,
                    // NSACR, PROPBASER/PENDBASER halves and everything unimplemented: WI.
                    _ => return,
                };
                r.irqs.write_word(reg, 0, op, value, u32::MAX);
            }
        }
    }

    /// Priority byte at SGI_base-relative `offset` in GICR_IPRIORITYR0-7.
    fn redist_priority(&self, vcpu: usize, offset: u64) -> u8 {
        self.redist(vcpu)
            .and_then(|r| {
                r.irqs
                    .priority
                    .get(offset.wrapping_sub(GICR_IPRIORITYR) as usize)
            })
            .copied()
            .unwrap_or(0)
    }

    fn set_redist_priority(&mut self, vcpu: usize, offset: u64, prio: u8) {
        if let Some(p) = self.redists.get_mut(vcpu).and_then(|r| {
            r.irqs
                .priority
                .get_mut(offset.wrapping_sub(GICR_IPRIORITYR) as usize)
        }) {
            *p = prio;
        }
    }
}

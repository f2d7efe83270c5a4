//! The physical GICv3: distributor and redistributor set-up, the EL2 CPU interface, and the
//! operations the hypervisor needs at run time (enable/disable/route one interrupt, send an SGI).

use super::mmio::{block, GicdRegs, GicrRdRegs, GicrSgiRegs, Mmio};
use super::sysreg;
use crate::platform::GicInfo;
use aarch64_cpu::registers::{ICC_CTLR_EL1, ICC_SRE_EL2};
use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};

const GICD_CTLR_RWP: u32 = 1 << 31;
/// ARE_NS (bit 4) and EnableGrp1NS (bit 1); with a single security state these are ARE and
/// EnableGrp1 (IHI 0069, 12.9.4).
const GICD_CTLR_ARE_GRP1: u32 = (1 << 4) | (1 << 1);
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_STRIDE: u64 = 0x20000;
/// Priority of every physical interrupt the hypervisor takes; all equal, no preemption at EL2.
const DEFAULT_PRIORITY: u32 = 0xa0;
const POLL_LIMIT: u32 = 1_000_000;

/// ICC_CTLR_EL1.EOImode (bit 1; aarch64-cpu names only ExtRange): priority drop and
/// deactivation are separate, so that a forwarded interrupt stays active until the guest
/// deactivates it through a HW list register.
const ICC_CTLR_EOIMODE: u64 = 1 << 1;

/// INTID returned by ICC_IAR1_EL1 when nothing is pending.
pub const SPURIOUS: u32 = 1020;

/// The physical GIC.
#[derive(Debug)]
pub struct Gic {
    gicd: Mmio<GicdRegs>,
    /// Redistributor regions: (base, frames it can hold, frame stride).
    gicr: alloc::vec::Vec<(u64, usize, u64)>,
}

/// A redistributor that did not wake up or could not be found.
#[derive(Debug, thiserror::Error)]
pub enum GicError {
    /// No redistributor frame's GICR_TYPER matches the CPU's affinity.
    #[error("no redistributor for MPIDR {0:#x}")]
    NoRedistributor(u64),
    /// A register poll (RWP, ChildrenAsleep) never completed.
    #[error("GIC register poll timed out: {0}")]
    Timeout(&'static str),
}

impl Gic {
    /// Takes over the GIC described by the DT.
    ///
    /// # Safety
    ///
    /// The GICD and GICR ranges must be the GIC's and mapped as Device memory for the rest of the
    /// hypervisor's life.
    pub unsafe fn new(info: &GicInfo) -> Self {
        Self {
            // SAFETY: guaranteed by the caller.
            gicd: unsafe { block::<GicdRegs>(info.gicd.base) },
            gicr: info
                .gicr
                .iter()
                .map(|r| {
                    let stride = info.redist_stride.unwrap_or(GICR_STRIDE);
                    (r.base, (r.size / stride) as usize, stride)
                })
                .collect(),
        }
    }

    /// The address of redistributor frame `index`, counting through the regions in DT order.
    fn frame(&self, index: usize) -> u64 {
        let mut i = index;
        for &(base, count, stride) in &self.gicr {
            if i < count {
                return base + i as u64 * stride;
            }
            i -= count;
        }
        // `find_redistributor` only returns indices inside a region.
        unreachable!("redistributor index {index} outside every region")
    }

    fn wait_rwp(&self) -> Result<(), GicError> {
        for _ in 0..POLL_LIMIT {
            if self.gicd.ctlr.get() & GICD_CTLR_RWP == 0 {
                return Ok(());
            }
        }
        Err(GicError::Timeout("GICD_CTLR.RWP"))
    }

    /// Number of SPIs the distributor implements (from GICD_TYPER.ITLinesNumber).
    pub fn num_spis(&self) -> u32 {
        let lines = (self.gicd.typer.get() & 0x1f) + 1;
        (lines * 32).min(1020) - 32
    }

    /// Resets the distributor: every SPI Group 1, disabled, inactive, default priority, then
    /// affinity routing and Group 1 enabled.
    pub fn init_distributor(&self) -> Result<(), GicError> {
        self.gicd.ctlr.set(0);
        self.wait_rwp()?;
        let blocks = (self.num_spis() as usize + 32) / 32;
        for i in 1..blocks {
            self.gicd.igroupr[i].set(!0);
            self.gicd.icenabler[i].set(!0);
            self.gicd.icpendr[i].set(!0);
            self.gicd.icactiver[i].set(!0);
        }
        let prio = DEFAULT_PRIORITY * 0x0101_0101;
        for i in 8..(blocks * 8).min(255) {
            self.gicd.ipriorityr[i].set(prio);
        }
        self.wait_rwp()?;
        self.gicd.ctlr.set(GICD_CTLR_ARE_GRP1);
        self.wait_rwp()
    }

    fn rd(&self, index: usize) -> Mmio<GicrRdRegs> {
        // SAFETY: `frame` only returns frames inside a redistributor region the caller of `new`
        // vouched for.
        unsafe { block::<GicrRdRegs>(self.frame(index)) }
    }

    fn sgi(&self, index: usize) -> Mmio<GicrSgiRegs> {
        // SAFETY: as in `rd`; SGI_base is the second 64 KiB frame of the redistributor.
        unsafe { block::<GicrSgiRegs>(self.frame(index) + 0x10000) }
    }

    /// Index of the redistributor whose GICR_TYPER.Affinity_Value matches `mpidr`.
    pub fn find_redistributor(&self, mpidr: u64) -> Result<usize, GicError> {
        let aff = (mpidr & 0xff_ffff) | ((mpidr >> 32) & 0xff) << 24;
        // GICR_TYPER.Last ends a region's populated frames (IHI 0069 12.11.35), not the search.
        let mut first = 0;
        for &(_, count, _) in &self.gicr {
            for i in first..first + count {
                let typer = self.rd(i).typer.get();
                if typer >> 32 == aff {
                    return Ok(i);
                }
                if typer & GICR_TYPER_LAST != 0 {
                    break;
                }
            }
            first += count;
        }
        Err(GicError::NoRedistributor(mpidr))
    }

    /// Wakes this CPU's redistributor, resets its SGIs/PPIs, and enables the EL2 CPU interface.
    /// Returns the redistributor index.
    pub fn init_cpu(&self, mpidr: u64) -> Result<usize, GicError> {
        let idx = self.find_redistributor(mpidr)?;
        let rd = self.rd(idx);
        rd.waker.set(rd.waker.get() & !GICR_WAKER_PROCESSOR_SLEEP);
        let mut awake = false;
        for _ in 0..POLL_LIMIT {
            if rd.waker.get() & GICR_WAKER_CHILDREN_ASLEEP == 0 {
                awake = true;
                break;
            }
        }
        if !awake {
            return Err(GicError::Timeout("GICR_WAKER.ChildrenAsleep"));
        }
        let sgi = self.sgi(idx);
        sgi.igroupr0.set(!0);
        sgi.icenabler0.set(!0);
        sgi.icpendr0.set(!0);
        sgi.icactiver0.set(!0);
        for p in sgi.ipriorityr.iter() {
            p.set(DEFAULT_PRIORITY * 0x0101_0101);
        }

        // SRE: the system register interface; Enable: EL1 may use ICC_SRE_EL1.
        ICC_SRE_EL2.modify(ICC_SRE_EL2::SRE::SET + ICC_SRE_EL2::ENABLE::SET);
        sysreg::isb();
        sysreg::set_icc_pmr(0xff);
        sysreg::set_icc_bpr1(0);
        sysreg::set_icc_ctlr(ICC_CTLR_EL1.get() | ICC_CTLR_EOIMODE);
        sysreg::set_icc_igrpen1(1);
        sysreg::isb();
        Ok(idx)
    }

    /// Enables or disables SGI/PPI `intid` at redistributor `rd`.
    pub fn set_private_enabled(&self, rd: usize, intid: u32, enabled: bool) {
        let sgi = self.sgi(rd);
        if enabled {
            sgi.isenabler0.set(1 << intid);
        } else {
            sgi.icenabler0.set(1 << intid);
        }
    }

    /// Clears the active state of SGI/PPI `intid` at redistributor `rd` (a forwarded interrupt
    /// whose guest went away before deactivating it).
    pub fn clear_private_active(&self, rd: usize, intid: u32) {
        self.sgi(rd).icactiver0.set(1 << intid);
    }

    /// Routes SPI `intid` to the CPU with affinity `mpidr`, level-triggered, and enables it.
    pub fn enable_spi(&self, intid: u32, mpidr: u64) {
        self.enable_spi_with(intid, mpidr, false);
    }

    /// Routes SPI `intid` to the CPU with affinity `mpidr`, edge- or level-triggered
    /// (GICD_ICFGR, IHI 0069 12.9.9), and enables it.
    pub fn enable_spi_with(&self, intid: u32, mpidr: u64, edge: bool) {
        let n = intid as usize;
        let aff = (mpidr & 0xff_ffff) | ((mpidr >> 32) & 0xff) << 32;
        self.gicd.irouter[n - 32].set(aff);
        let cfg = &self.gicd.icfgr[n / 16];
        let bit = 2 << ((n % 16) * 2);
        cfg.set(if edge {
            cfg.get() | bit
        } else {
            cfg.get() & !bit
        });
        self.gicd.isenabler[n / 32].set(1 << (n % 32));
    }

    /// Disables SPI `intid`.
    pub fn disable_spi(&self, intid: u32) {
        let n = intid as usize;
        self.gicd.icenabler[n / 32].set(1 << (n % 32));
    }

    /// Sends SGI `intid` to the CPU with affinity `mpidr` (IHI 0069, 12.2.22).
    pub fn send_sgi(intid: u32, mpidr: u64) {
        let aff0 = mpidr & 0xff;
        let v = ((mpidr >> 32) & 0xff) << 48
            | ((mpidr >> 16) & 0xff) << 32
            | (aff0 / 16) << 44
            | ((intid as u64) & 0xf) << 24
            | ((mpidr >> 8) & 0xff) << 16
            | 1 << (aff0 % 16);
        sysreg::dsb_sy();
        sysreg::icc_sgi1r(v);
        sysreg::isb();
    }

    /// Acknowledges the highest-priority pending interrupt; [`SPURIOUS`] or above when none.
    pub fn ack() -> u32 {
        (sysreg::icc_iar1() & 0xff_ffff) as u32
    }

    /// Priority drop only: the interrupt stays active (a guest's HW list register deactivates it).
    pub fn eoi(intid: u32) {
        sysreg::icc_eoir1(intid as u64);
    }

    /// Priority drop and deactivation, for interrupts the hypervisor consumed itself.
    pub fn eoi_and_deactivate(intid: u32) {
        sysreg::icc_eoir1(intid as u64);
        sysreg::icc_dir(intid as u64);
    }

    /// Deactivates an interrupt whose priority was already dropped.
    pub fn deactivate(intid: u32) {
        sysreg::icc_dir(intid as u64);
    }
}

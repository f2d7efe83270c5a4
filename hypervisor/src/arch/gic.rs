//! The physical GICv3: distributor and redistributor set-up, the EL2 CPU interface, and the
//! operations the hypervisor needs at run time (enable/disable/route one interrupt, send an SGI).

use super::mmio::{block, GicdRegs, GicrRdRegs, GicrSgiRegs, Mmio};
use super::sysreg;
use crate::platform::GicInfo;
use aarch64_cpu::registers::{ICC_CTLR_EL1, ICC_SRE_EL2, ICH_VTR_EL2};
use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};

const GICD_CTLR_RWP: u32 = 1 << 31;
/// ARE_NS (bit 4) and EnableGrp1NS (bit 1); with a single security state these are ARE and
/// EnableGrp1 (IHI 0069, 12.9.4).
const GICD_CTLR_ARE_GRP1: u32 = (1 << 4) | (1 << 1);
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// GICR_TYPER.PLPIS [0]: the redistributor supports physical LPIs.
const GICR_TYPER_PLPIS: u64 = 1 << 0;
/// GICR_CTLR.EnableLPIs [0] and RWP [3] (IHI 0069H 12.11.2).
const GICR_CTLR_ENABLE_LPIS: u32 = 1 << 0;
const GICR_CTLR_RWP: u32 = 1 << 3;
/// GICD_TYPER.LPIS [17] (IHI 0069H 12.9.38).
const GICD_TYPER_LPIS: u32 = 1 << 17;
/// GICR_PROPBASER / GICR_PENDBASER Shareability [11:10] and InnerCache [9:7].
const GICR_BASER_SHARE: u64 = 3 << 10;
const GICR_BASER_CACHE: u64 = 7 << 7;
/// InnerCache = 0b001, Normal Non-cacheable.
const GICR_BASER_NC: u64 = 1 << 7;
/// GICD_TYPER.DVIS [18]: direct injection of virtual LPIs (GICv4).
const GICD_TYPER_DVIS: u32 = 1 << 18;
/// GICR_TYPER.VLPIS [1]: the redistributor takes virtual LPIs (and has a VLPI_base frame).
const GICR_TYPER_VLPIS: u64 = 1 << 1;
/// ICH_VTR_EL2.nV4 [20]: the CPU interface does not support direct injection.
const ICH_VTR_NV4: u64 = 1 << 20;
/// GICR_VPROPBASER and GICR_VPENDBASER, offsets in VLPI_base.
const GICR_VPROPBASER: u64 = 0x70;
const GICR_VPENDBASER: u64 = 0x78;
/// GICR_VPENDBASER.Valid [63] and PendingLast [61].
const GICR_VPENDBASER_VALID: u64 = 1 << 63;
const GICR_VPENDBASER_PENDING_LAST: u64 = 1 << 61;
/// Priority of every physical interrupt the hypervisor takes; all equal, no preemption at EL2.
pub const DEFAULT_PRIORITY: u32 = 0xa0;
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
    /// Every redistributor's RD_base, by index, counting through the regions in DT order.
    frames: alloc::vec::Vec<u64>,
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
    /// The redistributor has no physical LPIs (GICR_TYPER.PLPIS = 0).
    #[error("redistributor {0} has no physical LPIs")]
    NoLpis(usize),
    /// GICR_CTLR.EnableLPIs was set before us and cannot be cleared (it may be RES1 once set,
    /// IHI 0069H 12.11.2), so GICR_PROPBASER/PENDBASER cannot be reprogrammed.
    #[error("redistributor {0}: LPIs already enabled and EnableLPIs does not clear")]
    LpisStuck(usize),
    /// GICR_PROPBASER or GICR_PENDBASER did not keep the table address.
    #[error("redistributor {0}: {1} does not keep its address")]
    TableNotKept(usize, &'static str),
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
            // SAFETY: as above, the GICR ranges are mapped.
            frames: unsafe { redistributor_frames(info) },
        }
    }

    /// The address of redistributor frame `index` (an index `find_redistributor` returned).
    fn frame(&self, index: usize) -> u64 {
        self.frames[index]
    }

    /// Redistributors found.
    pub fn redistributors(&self) -> usize {
        self.frames.len()
    }

    /// GICD_TYPER.LPIS: the distributor supports LPIs.
    pub fn lpis_supported(&self) -> bool {
        self.gicd.typer.get() & GICD_TYPER_LPIS != 0
    }

    /// INTID bits the distributor supports (GICD_TYPER.IDbits + 1).
    pub fn id_bits(&self) -> u32 {
        ((self.gicd.typer.get() >> 19) & 0x1f) + 1
    }

    /// Redistributor `rd`'s GICR_TYPER.Processor_Number [23:8] (an ITS collection's target
    /// with GITS_TYPER.PTA = 0) and RD_base (the target with PTA = 1).
    pub fn processor_number(&self, rd: usize) -> (u16, u64) {
        ((self.rd(rd).typer.get() >> 8) as u16, self.frame(rd))
    }

    /// Gives redistributor `rd` the LPI tables and enables LPIs there (IHI 0069H 12.11.2,
    /// 12.11.22, 12.11.27): EnableLPIs cleared first if a previous owner left it set (and an
    /// error if it stays set), then GICR_PROPBASER and GICR_PENDBASER, read back; a
    /// redistributor that does not keep the shareability gets the non-cacheable attributes
    /// (the driver cleans every property-table write to the PoC anyway).
    pub fn enable_lpis(&self, rd: usize, propbaser: u64, pendbaser: u64) -> Result<(), GicError> {
        let r = self.rd(rd);
        if r.typer.get() & GICR_TYPER_PLPIS == 0 {
            return Err(GicError::NoLpis(rd));
        }
        let wait_rwp = || {
            (0..POLL_LIMIT)
                .any(|_| r.ctlr.get() & GICR_CTLR_RWP == 0)
                .then_some(())
                .ok_or(GicError::Timeout("GICR_CTLR.RWP"))
        };
        if r.ctlr.get() & GICR_CTLR_ENABLE_LPIS != 0 {
            r.ctlr.set(r.ctlr.get() & !GICR_CTLR_ENABLE_LPIS);
            wait_rwp()?;
            if r.ctlr.get() & GICR_CTLR_ENABLE_LPIS != 0 {
                return Err(GicError::LpisStuck(rd));
            }
        }
        let program = |reg: &tock_registers::registers::ReadWrite<u64>,
                       value: u64,
                       name: &'static str|
         -> Result<(), GicError> {
            reg.set(value);
            let mut read = reg.get();
            if read & GICR_BASER_SHARE != value & GICR_BASER_SHARE {
                reg.set(value & !(GICR_BASER_SHARE | GICR_BASER_CACHE) | GICR_BASER_NC);
                read = reg.get();
            }
            let addr = 0x000F_FFFF_FFFF_F000;
            if read & addr != value & addr {
                return Err(GicError::TableNotKept(rd, name));
            }
            Ok(())
        };
        program(&r.propbaser, propbaser, "GICR_PROPBASER")?;
        program(&r.pendbaser, pendbaser, "GICR_PENDBASER")?;
        // The tables' contents (cleaned by the ITS driver) before the redistributor reads them.
        sysreg::dsb_sy();
        r.ctlr.set(r.ctlr.get() | GICR_CTLR_ENABLE_LPIS);
        sysreg::dsb_sy();
        Ok(())
    }

    /// Whether the GIC side of GICv4.0 direct injection is there: GICD_TYPER.DVIS [18],
    /// GICR_TYPER.VLPIS [1] on every redistributor, and ICH_VTR_EL2.nV4 [20] = 0 (the CPU
    /// interface takes vLPIs). GITS_TYPER.Virtual is the ITS driver's to check.
    pub fn gicv4_capable(&self) -> bool {
        let dvis = self.gicd.typer.get() & GICD_TYPER_DVIS != 0;
        let vlpis = (0..self.frames.len()).all(|i| self.rd(i).typer.get() & GICR_TYPER_VLPIS != 0);
        let nv4 = ICH_VTR_EL2.get() & ICH_VTR_NV4 != 0;
        dvis && vlpis && !nv4 && !self.frames.is_empty()
    }

    /// GICR_VPROPBASER (+0x70) or GICR_VPENDBASER (+0x78) of redistributor `rd`'s VLPI_base
    /// frame (RD_base + 0x20000; IHI 0069H 9.11.36/9.11.37, GICv4.0 layout).
    fn vlpi_reg(&self, rd: usize, off: u64) -> *mut u64 {
        (self.frame(rd) + 0x2_0000 + off) as usize as *mut u64
    }

    /// Makes a vPE resident on redistributor `rd` (Linux its_vpe_schedule): Valid cleared first
    /// if a vPE was (fields other than Valid may not change while it is set), then
    /// GICR_VPROPBASER = `vpropbaser`, then GICR_VPENDBASER = `vpt` | RaWaWb | Inner Shareable
    /// | PendingLast (the table may hold pending vLPIs: scan it) | Valid. Only for a GIC that
    /// is [`Gic::gicv4_capable`].
    pub fn make_vpe_resident(&self, rd: usize, vpropbaser: u64, vpt: u64) {
        self.make_vpe_nonresident(rd);
        let pend = (vpt & 0x000F_FFFF_FFFF_0000)
            | GICR_BASER_CACHE
            | (1 << 10)
            | GICR_VPENDBASER_PENDING_LAST
            | GICR_VPENDBASER_VALID;
        sysreg::dsb_sy();
        // SAFETY: `rd` is a redistributor frame of the GIC `new` was given, whose VLPIS (checked
        // by gicv4_capable) makes it 0x40000 long with VLPI_base at +0x20000, mapped as Device
        // memory with the rest of the GICR region; GICR_VPROPBASER/VPENDBASER are 64-bit.
        unsafe {
            self.vlpi_reg(rd, GICR_VPROPBASER)
                .write_volatile(vpropbaser);
            self.vlpi_reg(rd, GICR_VPENDBASER).write_volatile(pend);
        }
        sysreg::dsb_sy();
    }

    /// Makes whatever vPE is resident on `rd` non-resident (GICR_VPENDBASER.Valid = 0; the
    /// redistributor writes its pending state back to the vPT: GICv4.0 has no Dirty to poll on
    /// QEMU, and a real 4.0 GIC completes it before the write returns). Returns the value read
    /// before (0 if nothing was resident).
    pub fn make_vpe_nonresident(&self, rd: usize) -> u64 {
        // SAFETY: as in `make_vpe_resident`.
        let old = unsafe { self.vlpi_reg(rd, GICR_VPENDBASER).read_volatile() };
        if old & GICR_VPENDBASER_VALID != 0 {
            // SAFETY: as above.
            unsafe {
                self.vlpi_reg(rd, GICR_VPENDBASER)
                    .write_volatile(old & !GICR_VPENDBASER_VALID)
            };
            sysreg::dsb_sy();
        }
        old
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
        (0..self.frames.len())
            .find(|&i| self.rd(i).typer.get() >> 32 == aff)
            .ok_or(GicError::NoRedistributor(mpidr))
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

/// Every redistributor frame of the GIC ([`crate::platform::redistributor_frames`]).
///
/// # Safety
///
/// The GICR ranges of `info` must be the GIC's redistributors, mapped as Device memory.
unsafe fn redistributor_frames(info: &GicInfo) -> alloc::vec::Vec<u64> {
    crate::platform::redistributor_frames(info, |at| {
        // SAFETY: the walk only reads frames inside a redistributor region the caller vouched
        // for, at whole-frame steps.
        unsafe { block::<GicrRdRegs>(at) }.typer.get()
    })
}

//! A VM's RAM in each boot: zeroed before first use, 2 MiB block by block, and mapped in its
//! stage 2 only once zeroed (docs/design.md, section 3, "Zeroed before first use").
//!
//! - The loader zeroes only what its images (kernel, initramfs, DT) do not overwrite in the
//!   blocks they touch, and maps those blocks; every other block starts unmapped.
//! - A vCPU's first access to a block is a stage-2 translation fault: the block is zeroed
//!   (by whoever gets there first) and mapped, and the access retried ([`Vm::ram_fault`]).
//! - The hypervisor's own accesses go through `hw::GuestRam`, which zeroes a stale block
//!   before reading or writing it.
//! - Device DMA goes through the same stage 2 (the SMMU shares it), but no function masters
//!   DMA before every block is zeroed and mapped: its virtual ECAM holds Bus Master Enable
//!   until [`Vm::open_dma`] has done that ([`crate::devices::vecam::VirtualEcam::take_dma_request`]).
//! - The VM's idle CPUs (a vCPU in WFI, one not powered on yet) help whoever needs all of it
//!   (the DMA gate, an eager load), and with `ram-zero=idle` zero ahead of need for a VM with
//!   PCI functions ([`Vm::zero_idle`]).

use super::{Vm, VmError};
use crate::hw::scrub::{self, By, ScrubStats};
use crate::hw::{Hw, Ipa, ZeroTime};
use crate::pci::ConfigSpace;
use crate::platform::{MemRange, RamZeroing};
use crate::stage2::{MemType, Stage2, Stage2Error};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// What a stage-2 fault at an IPA came to.
#[derive(Debug)]
pub enum RamFault {
    /// Not a fault on the VM's RAM (an emulated device, or nothing): the caller goes on.
    NotRam,
    /// The block is zeroed and mapped now (or was, by another CPU): retry the access.
    Retry,
    /// The block could not be mapped: the VM must stop.
    Failed(VmError),
}

/// Builds the stage-2 tables of all of `ram` (at `pa`) block by block, then unmaps every block:
/// mapping one later writes one descriptor and never allocates a table.
pub(super) fn prebuild(s2: &mut Stage2, ram: MemRange, pa: u64) -> Result<(), Stage2Error> {
    let blocks = scrub::Scrub::new(ram, true);
    for i in 0..blocks.len() {
        let r = blocks.range(i);
        s2.map(r.base, pa + (r.base - ram.base), r.size, MemType::Normal)?;
    }
    for i in 0..blocks.len() {
        let r = blocks.range(i);
        s2.unmap(r.base, r.size)?;
    }
    Ok(())
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

impl Vm {
    fn block_pa(&self, r: MemRange) -> u64 {
        self.ram_pa.get() + (r.base - self.ram_ipa.base)
    }

    fn ms(hw: &impl Hw, ticks: u64) -> u64 {
        ticks.saturating_mul(1000) / hw.counter_freq().max(1)
    }

    /// A new boot's RAM: every block stale and unmapped, the TLBs of its VMID (CPUs and SMMU)
    /// dropped. Its vCPUs are parked and its functions quiesced; the table stays closed (only
    /// the loader zeroes) until [`Vm::load_ram`] opens it.
    pub(super) fn restart_ram(&self, hw: &impl Hw) -> Result<(), VmError> {
        let scrub = self.ram.scrub();
        {
            // Under the stage-2 lock: a CPU that zeroed a block of the boot before cannot map
            // it into this one (it checks the block under the same lock).
            let mut s2 = self.stage2.lock();
            scrub.restart();
            for i in 0..scrub.len() {
                if self.ram_mapped[i].swap(false, Ordering::AcqRel) {
                    let r = scrub.range(i);
                    s2.unmap(r.base, r.size)?;
                }
            }
        }
        self.invalidate_tlbs(hw);
        Ok(())
    }

    /// Writes `images` ((IPA, bytes) each) into the new boot's RAM: first zeroes what of their
    /// blocks they do not cover, then writes them and maps those blocks, then lets the rest be
    /// zeroed as it is first used. Logs what it zeroed.
    pub(super) fn load_ram(&self, hw: &impl Hw, images: &[(Ipa, &[u8])]) -> Result<(), VmError> {
        let scrub = self.ram.scrub();
        let written: Vec<MemRange> = images
            .iter()
            .map(|(ipa, bytes)| MemRange {
                base: ipa.get(),
                size: bytes.len() as u64,
            })
            .collect();
        let mut blocks: Vec<usize> = Vec::new();
        for w in written.iter().filter(|w| w.size > 0) {
            blocks.extend(scrub.blocks_of(Ipa(w.base), w.size)?);
        }
        blocks.sort_unstable();
        blocks.dedup();
        let mut time = ZeroTime::default();
        let mut bytes = 0;
        for &i in &blocks {
            let mut t = ZeroTime::default();
            let mut n = 0;
            for g in scrub::gaps(scrub.range(i), &written) {
                let z = self.ram.zero(Ipa(g.base), g.size)?;
                t.zero += z.zero;
                t.clean += z.clean;
                t.zva_block = z.zva_block;
                n += g.size;
            }
            scrub.mark_zeroed(i, n, t);
            time.zero += t.zero;
            time.clean += t.clean;
            time.zva_block = time.zva_block.or(t.zva_block);
            bytes += n;
        }
        for (ipa, data) in images {
            self.ram.write(*ipa, data)?;
        }
        {
            let mut s2 = self.stage2.lock();
            for &i in &blocks {
                self.map_block(&mut s2, i)?;
            }
        }
        scrub.open();
        if self.config.ram_zeroing == RamZeroing::Eager {
            self.zero_all_now(hw)?;
        }
        log::info!(
            "{}: RAM of boot {}: {} MiB, zeroed before first use: {} MiB around the images now in {} ms ({} ms {}, {} ms cleaning to PoC), the other {} blocks of 2 MiB as they are first used{}",
            self.config.name,
            self.boots.load(Ordering::Acquire) + 1,
            mib(self.ram_ipa.size),
            mib(bytes),
            Self::ms(hw, time.zero + time.clean),
            Self::ms(hw, time.zero),
            match time.zva_block {
                Some(b) => format!("DC ZVA of {b}-byte blocks"),
                None => String::from("stores"),
            },
            Self::ms(hw, time.clean),
            scrub.len() - blocks.len(),
            match self.config.ram_zeroing {
                RamZeroing::Eager => ", now (ram-zero=eager)",
                _ if self.zero_ahead => {
                    " or while its CPUs idle, and all before its first bus mastering"
                }
                _ if self.pci.is_empty() => " (ram-zero=lazy)",
                _ => " (ram-zero=lazy), and all before its first bus mastering",
            }
        );
        Ok(())
    }

    /// `ram-zero=eager`: every block zeroed and mapped before the guest starts, by this CPU and
    /// the VM's others (kicked: they wait for their vCPU's power-on, `Vm::zero_idle`).
    fn zero_all_now(&self, hw: &impl Hw) -> Result<(), VmError> {
        let scrub = self.ram.scrub();
        let t0 = hw.counter();
        self.with_helpers(hw, || self.zero_and_map_all(By::Loader))?;
        hw.stage2_published();
        let s = scrub.stats();
        log::info!(
            "{}: RAM of boot {}: all {} MiB zeroed before the start in {} ms, on {} CPUs ({} MiB by the others), {} ms zeroing and {} ms cleaning, CPUs together",
            self.config.name,
            self.boots.load(Ordering::Acquire) + 1,
            mib(self.ram_ipa.size),
            Self::ms(hw, hw.counter().saturating_sub(t0)),
            self.vcpus.len(),
            mib(s.by(By::Idle)),
            Self::ms(hw, s.zero_ticks),
            Self::ms(hw, s.clean_ticks)
        );
        let _ = scrub.take_done();
        Ok(())
    }

    /// Zeroes (by `by`) and maps every block: first the stale ones nobody claimed, then each
    /// in turn, waiting for those other CPUs are zeroing.
    /// `Ok(false)`: given up because the VM stopped running (a reset or stop began, which must
    /// not wait for all of it: its vCPUs have a deadline to park).
    fn zero_and_map_all(&self, by: By) -> Result<bool, VmError> {
        let scrub = self.ram.scrub();
        let ram = &*self.ram;
        let runs = || by == By::Loader || self.life.runs();
        while runs() {
            let Some(i) = scrub.zero_one(by, &mut |r| {
                ram.zero(Ipa(r.base), r.size).unwrap_or_default()
            }) else {
                break;
            };
            let mut s2 = self.stage2.lock();
            self.map_block(&mut s2, i)?;
        }
        for i in 0..scrub.len() {
            if !runs() {
                return Ok(false);
            }
            self.zero_and_map(i, by)?;
        }
        Ok(true)
    }

    /// Maps block `i` in stage 2 if it is zeroed in this boot and not mapped yet (`s2` is the
    /// VM's stage-2 lock, taken by the caller). `Ok(false)`: it was not zeroed.
    fn map_block(&self, s2: &mut Stage2, i: usize) -> Result<bool, VmError> {
        let scrub = self.ram.scrub();
        if !scrub.is_zeroed(i) {
            return Ok(false);
        }
        if !self.ram_mapped[i].load(Ordering::Acquire) {
            let r = scrub.range(i);
            s2.map(r.base, self.block_pa(r), r.size, MemType::Normal)?;
            self.ram_mapped[i].store(true, Ordering::Release);
        }
        Ok(true)
    }

    /// Zeroes block `i` (by `by`) unless it is, and maps it.
    fn zero_and_map(&self, i: usize, by: By) -> Result<(), VmError> {
        let r = self.ram.scrub().range(i);
        // Never under the stage-2 lock: a claimant maps what it zeroed under it.
        self.ram.ensure_zeroed(Ipa(r.base), r.size, by)?;
        let mut s2 = self.stage2.lock();
        if self.map_block(&mut s2, i)? {
            Ok(())
        } else {
            Err(VmError::Mem(crate::hw::OutOfRam {
                ipa: Ipa(r.base),
                len: r.size,
            }))
        }
    }

    /// A vCPU's stage-2 fault at `ipa` (`translation`: a translation fault): on a block of its
    /// RAM not mapped yet, the block is zeroed and mapped and the access is to be retried.
    pub fn ram_fault(&self, ipa: Ipa, translation: bool, hw: &impl Hw) -> RamFault {
        let Some(i) = self.ram.scrub().block_of(ipa) else {
            return RamFault::NotRam;
        };
        if !translation {
            return RamFault::NotRam;
        }
        if self.ram_mapped[i].load(Ordering::Acquire) {
            // Another CPU mapped it since this access faulted.
            return RamFault::Retry;
        }
        match self.zero_and_map(i, By::Fault) {
            Ok(()) => {
                hw.stage2_published();
                self.report_zeroed(hw);
                RamFault::Retry
            }
            Err(e) => RamFault::Failed(e),
        }
    }

    /// Whether its CPUs zero its RAM ahead of need when idle, and there is some left.
    pub fn has_idle_zeroing(&self) -> bool {
        (self.zero_ahead || self.zero_wanted.load(Ordering::Acquire) > 0)
            && !self.ram.scrub().all_zeroed()
    }

    /// Runs `f` with the VM's idle CPUs helping to zero its RAM (the DMA gate, an eager load):
    /// they are kicked, and zero stale blocks until none is left or they have work of their own.
    fn with_helpers<T>(&self, hw: &impl Hw, f: impl FnOnce() -> T) -> T {
        self.zero_wanted.fetch_add(1, Ordering::AcqRel);
        if !self.ram.scrub().all_zeroed() {
            let me = self.vcpus.iter().position(|v| v.pcpu == hw.this_cpu());
            self.kick_all(me, hw);
        }
        let out = f();
        self.zero_wanted.fetch_sub(1, Ordering::AcqRel);
        out
    }

    /// A CPU of the VM with nothing to do zeroes and maps stale blocks until `stop` says to
    /// stop (asked before each block: an interrupt pending, its vCPU powered on) or none is
    /// left; only for a VM with PCI functions ([`Vm::has_idle_zeroing`]). Returns the blocks
    /// zeroed.
    pub fn zero_idle(&self, hw: &impl Hw, stop: &mut dyn FnMut() -> bool) -> usize {
        if !self.zero_ahead && self.zero_wanted.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let scrub = self.ram.scrub();
        let ram = &*self.ram;
        let mut n = 0;
        while !stop() {
            let Some(i) = scrub.zero_one(By::Idle, &mut |r| {
                ram.zero(Ipa(r.base), r.size).unwrap_or_default()
            }) else {
                break;
            };
            n += 1;
            let mut s2 = self.stage2.lock();
            if let Err(e) = self.map_block(&mut s2, i) {
                drop(s2);
                // Containment: left unmapped, its first access or the DMA gate retries it.
                log::error!(
                    "{}: RAM block at {:#x} zeroed but not mapped: {e}",
                    self.config.name,
                    scrub.range(i).base
                );
            }
        }
        if n > 0 {
            hw.stage2_published();
            self.report_zeroed(hw);
        }
        n
    }

    /// A function of the VM is to master DMA (its guest set Bus Master Enable, which its
    /// virtual ECAM held): every block is zeroed and mapped first, both TLBs see it, then every
    /// held Bus Master Enable of the VM's functions is let through (`cfg_of` the physical
    /// configuration space of a segment). The VM's idle CPUs help (they are kicked awake).
    /// `Ok(false)`: the VM stopped running meanwhile (a reset or stop, whose vCPUs must park
    /// in time): the gate stays closed, the Bus Master Enable held, for the next boot to drop.
    pub fn open_dma<C: ConfigSpace>(
        &self,
        hw: &impl Hw,
        mut cfg_of: impl FnMut(usize) -> Option<C>,
    ) -> Result<bool, VmError> {
        let scrub = self.ram.scrub();
        let before = scrub.stats();
        let t0 = hw.counter();
        if !self.with_helpers(hw, || self.zero_and_map_all(By::Gate))? {
            return Ok(false);
        }
        self.invalidate_tlbs(hw);
        for p in &self.pci {
            if let Some(mut cfg) = cfg_of(p.segment) {
                p.vecam.lock().open_dma(&mut cfg);
            }
        }
        let after = scrub.stats();
        log::info!(
            "{}: bus mastering enabled by its guest: all of its RAM zeroed and mapped first ({} MiB of it at the gate in {} ms)",
            self.config.name,
            mib(after.by(By::Gate) - before.by(By::Gate)),
            Self::ms(hw, hw.counter().saturating_sub(t0))
        );
        self.report_zeroed(hw);
        Ok(true)
    }

    /// What zeroing its RAM cost in this boot so far.
    pub fn ram_zeroing(&self) -> ScrubStats {
        self.ram.scrub().stats()
    }

    /// Logs, once per boot, that every block of its RAM is zeroed, and by whom.
    fn report_zeroed(&self, hw: &impl Hw) {
        let scrub = self.ram.scrub();
        if !scrub.take_done() {
            return;
        }
        let s = scrub.stats();
        let since = self.booted_at_ms.load(Ordering::Acquire);
        let now = hw.counter().saturating_mul(1000) / hw.counter_freq().max(1);
        log::info!(
            "{}: RAM of boot {} all zeroed, {} MiB, {} ms after its load began: {} MiB by the loader, {} on first touch, {} for the hypervisor's accesses, {} while idle, {} at the DMA gate; {} ms zeroing and {} ms cleaning, CPUs together",
            self.config.name,
            self.boots.load(Ordering::Acquire),
            mib(self.ram_ipa.size),
            now.saturating_sub(since),
            mib(s.by(By::Loader)),
            mib(s.by(By::Fault)),
            mib(s.by(By::Access)),
            mib(s.by(By::Idle)),
            mib(s.by(By::Gate)),
            Self::ms(hw, s.zero_ticks),
            Self::ms(hw, s.clean_ticks)
        );
    }
}

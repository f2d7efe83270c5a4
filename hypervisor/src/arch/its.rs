//! The physical ITS on the machine: its MMIO registers, heap memory for its tables, and the
//! one instance the hypervisor drives (`crate::its` has the logic and the tests).
//!
//! One ITS is driven, the first usable one in the DT: the LPI property and pending tables
//! belong to the redistributors, so every ITS shares one LPI space, and the driver allocating
//! it lives in one `crate::its::Its`. Another ITS is named at boot and left alone (the
//! functions whose `msi-map` names it get no MSIs).

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::collections::BTreeMap;
use alloc::string::String;

use spin::Mutex;

use super::gic::{Gic, DEFAULT_PRIORITY};
use super::sysreg;
use crate::its::{self as driver, ItsConfig, ItsMemory, ItsRegs};
use crate::platform::ItsInfo;

/// Register reads a poll makes before giving up. QEMU completes every command inside the
/// GITS_CWRITER write; hardware takes microseconds, far below a million MMIO reads.
const POLL_LIMIT: u32 = 1_000_000;

/// GITS_* at a DT-given base.
#[derive(Debug)]
pub struct MmioIts {
    base: u64,
}

impl MmioIts {
    fn ptr<T>(&self, offset: u64) -> *mut T {
        assert!(
            offset < 0x1_0000,
            "ITS register offset {offset:#x} outside the control frame"
        );
        (self.base + offset) as usize as *mut T
    }
}

impl ItsRegs for MmioIts {
    fn read32(&self, offset: u64) -> u32 {
        // SAFETY: `probe` took the base from the DT and mapped the control frame as Device
        // memory; `ptr` keeps the access inside it.
        unsafe { self.ptr::<u32>(offset).read_volatile() }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        sysreg::dsb_sy();
        // SAFETY: as in `read32`.
        unsafe { self.ptr::<u32>(offset).write_volatile(value) }
    }

    fn read64(&self, offset: u64) -> u64 {
        // SAFETY: as in `read32`; the 64-bit GITS registers take 64-bit accesses.
        unsafe { self.ptr::<u64>(offset).read_volatile() }
    }

    fn write64(&mut self, offset: u64, value: u64) {
        // The queue's and tables' contents before a GITS_CWRITER/BASER write publishes them.
        sysreg::dsb_sy();
        // SAFETY: as in `read64`.
        unsafe { self.ptr::<u64>(offset).write_volatile(value) }
    }
}

/// ITS tables, ITTs and LPI tables on the (identity-mapped, normal cacheable) heap.
#[derive(Debug, Default)]
pub struct HeapItsMemory {
    /// Live allocations: PA -> size.
    live: BTreeMap<u64, usize>,
}

impl HeapItsMemory {
    fn check(&self, pa: u64, len: usize) -> usize {
        let inside = self
            .live
            .range(..=pa)
            .next_back()
            .is_some_and(|(&b, &s)| pa + len as u64 <= b + s as u64);
        assert!(
            inside,
            "ITS memory access {pa:#x}+{len:#x} outside its allocations"
        );
        pa as usize
    }
}

impl ItsMemory for HeapItsMemory {
    fn alloc_zeroed(&mut self, size: usize, align: usize) -> Option<u64> {
        let layout = Layout::from_size_align(size, align).ok()?;
        if size == 0 {
            return None;
        }
        // SAFETY: `layout` has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        self.live.insert(p as u64, size);
        Some(p as u64)
    }

    fn free(&mut self, pa: u64, size: usize, align: usize) {
        if self.live.remove(&pa) != Some(size) {
            log::error!("its: free of {pa:#x}+{size:#x}, not an allocation: leaked");
            return;
        }
        if let Ok(layout) = Layout::from_size_align(size, align) {
            // SAFETY: `pa` was returned by `alloc_zeroed` with this layout (the driver frees
            // with the size and alignment it allocated with), and is no longer used.
            unsafe { dealloc(pa as usize as *mut u8, layout) };
        }
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        let p = self.check(pa, data.len());
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: `check` proved the range lies in a live allocation of ours. Bytewise
            // volatile: the ITS reads these bytes, the compiler must not elide the stores.
            unsafe { ((p + i) as *mut u8).write_volatile(b) };
        }
    }

    fn read(&self, pa: u64, buf: &mut [u8]) {
        let p = self.check(pa, buf.len());
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: as in `write`.
            *b = unsafe { ((p + i) as *const u8).read_volatile() };
        }
    }

    fn clean(&mut self, pa: u64, len: usize) {
        sysreg::clean_dcache_range(pa as usize, len);
    }
}

/// The driven ITS.
pub type PhysIts = driver::Its<MmioIts, HeapItsMemory>;

/// The hypervisor's ITS, if the machine has a usable one.
#[derive(Debug, Default)]
pub struct Its {
    /// The driven ITS's DT path and phandle (which `msi-map` entries name).
    pub unit: Option<(String, Option<u32>)>,
    /// The driver.
    pub its: Option<Mutex<PhysIts>>,
    /// GICv4.0 direct injection is available: the GIC has it (`Gic::gicv4_capable`) and the
    /// driven ITS has GITS_TYPER.Virtual and a vPE table.
    pub gicv4: bool,
}

/// Probes the first usable ITS of `infos`, its Device table sized for `max_device_id`, and
/// logs one line for it (and one per ITS left alone). Nothing usable: `Its::default()`, and
/// the machine runs as without an ITS.
pub fn init(infos: &[ItsInfo], gic: &Gic, cpus: usize, max_device_id: u32) -> Its {
    let mut driven = Its::default();
    for info in infos {
        if let Some(why) = &info.refused {
            log::warn!("its: {} not used: {why}", info.path);
            continue;
        }
        if driven.its.is_some() {
            log::warn!(
                "its: {} not used: one ITS is driven ({} already is)",
                info.path,
                driven.unit.as_ref().map_or("", |u| u.0.as_str())
            );
            continue;
        }
        if !gic.lpis_supported() {
            log::warn!(
                "its: {} not used: the distributor has no LPIs (GICD_TYPER.LPIS = 0)",
                info.path
            );
            continue;
        }
        // One vPE per CPU at most: vCPUs are pinned 1:1.
        let vpes = if gic.gicv4_capable() { cpus } else { 0 };
        let cfg = ItsConfig {
            max_device_id,
            cpus,
            lpi_bits: driver::lpi_bits_for(
                cpus,
                gic.id_bits(),
                crate::devices::vits::DEFAULT_MAX_EVENTS,
            ),
            priority: DEFAULT_PRIORITY as u8,
            poll_limit: POLL_LIMIT,
            vpes,
        };
        let regs = MmioIts {
            base: info.regs.base,
        };
        match driver::Its::probe(info.regs.base, regs, HeapItsMemory::default(), cfg) {
            Ok(its) => {
                let t = its.typer();
                log::info!(
                    "its: ITS at {:#x}: Devbits {}, IDbits {}, ITT entry {} B, PTA {}, {} LPIs ({} per VM for up to {cpus} VMs), Device table {} x {} KiB for DeviceIDs up to {max_device_id:#x}",
                    info.regs.base,
                    t.dev_bits,
                    t.id_bits,
                    t.itt_entry_size,
                    u8::from(t.pta),
                    its.lpi_count(),
                    crate::devices::vits::DEFAULT_MAX_EVENTS,
                    its.device_table().pages,
                    its.device_table().page / 1024,
                );
                driven.gicv4 = its.has_vpes();
                if driven.gicv4 {
                    log::info!(
                        "its: GICv4.0 direct injection: {} vPEs (vPE table {} KiB); vLPIs need no exit. A vCPU's WFI waits at EL2 with its vPE resident: QEMU wakes that WFI on a pending vIRQ, real hardware may not (the doorbell path, which would wake it, is not built)",
                        vpes,
                        its.vpe_table().map_or(0, |t| t.pages * t.page / 1024)
                    );
                } else if vpes > 0 {
                    log::info!("its: the GIC has GICv4 but the ITS has no GITS_TYPER.Virtual: list registers");
                }
                driven.unit = Some((info.path.clone(), info.phandle));
                driven.its = Some(Mutex::new(its));
            }
            Err(e) => log::error!("its: {}: {e}: not used", info.path),
        }
    }
    driven
}

/// Per-CPU LPI set-up, after the CPU's redistributor is awake: GICR_PROPBASER/PENDBASER and
/// EnableLPIs, then the CPU's collection (MAPC, INVALL, SYNC). A failure leaves the CPU
/// without LPIs (logged): events are then never routed to it.
pub fn init_cpu(its: &Its, gic: &Gic, cpu: usize, rd: usize) {
    let Some(its) = &its.its else {
        return;
    };
    let mut its = its.lock();
    let Some((prop, pend)) = its.redistributor_tables(cpu) else {
        return;
    };
    if let Err(e) = gic.enable_lpis(rd, prop, pend) {
        log::error!("its: CPU {cpu}: {e}: no LPIs on this CPU");
        return;
    }
    let (procnum, rd_pa) = gic.processor_number(rd);
    if let Err(e) = its.init_cpu(cpu, procnum, rd_pa) {
        log::error!("its: CPU {cpu}: {e}: no LPIs on this CPU");
    }
}

/// Who physical LPI `plpi` belongs to: (VM, DeviceID, EventID).
pub fn owner(its: &Its, plpi: u32) -> Option<(usize, u32, u32)> {
    its.its.as_ref()?.lock().owner(plpi)
}

/// Gives VM `vm` GICv4.0 direct injection if the machine has it: its vPEs (one per vCPU, on
/// the CPUs `pcpus` it is pinned to, whose MPIDRs are `mpidrs[cpu]`) and its vLPI property
/// table. `false`: list registers.
pub fn create_direct(
    its: &Its,
    gic: &Gic,
    mpidrs: &[u64],
    vm: usize,
    name: &str,
    pcpus: &[usize],
) -> bool {
    if !its.gicv4 {
        return false;
    }
    let Some(i) = &its.its else {
        return false;
    };
    let mut i = i.lock();
    let pta = i.typer().pta;
    let mut targets = alloc::vec::Vec::new();
    for &cpu in pcpus {
        // The redistributor's identity is readable before its CPU wakes it.
        let Some(rd) = mpidrs
            .get(cpu)
            .and_then(|&m| gic.find_redistributor(m).ok())
        else {
            log::warn!("its: {name}: no redistributor for CPU {cpu}: list registers instead");
            return false;
        };
        let (procnum, rd_pa) = gic.processor_number(rd);
        targets.push((cpu, crate::its::cmd::rdbase(pta, procnum, rd_pa)));
    }
    match i.create_vm(vm, &targets) {
        Ok(vpes) => {
            log::info!(
                "its: {name}: GICv4.0 direct injection, vPEIDs {:?} on CPUs {pcpus:?}",
                vpes.iter().map(|v| v.id).collect::<alloc::vec::Vec<_>>()
            );
            true
        }
        Err(e) => {
            log::warn!("its: {name}: {e}: list registers instead");
            false
        }
    }
}

/// Before vCPU `vcpu` of VM `vm` enters on this CPU (redistributor `rd`): its vPE made
/// resident there, and left so while the vCPU runs (vCPUs are pinned 1:1, so no other vPE
/// ever needs the redistributor). Nothing for a VM without vPEs.
pub fn vpe_enter(its: &Its, gic: &Gic, vm: usize, vcpu: usize, rd: usize) {
    let Some(i) = &its.its else {
        return;
    };
    let (vprop, vpe) = {
        let i = i.lock();
        let Some(vpe) = i.vpes(vm).get(vcpu).copied() else {
            return;
        };
        let Some(vprop) = i.vpropbaser(vm) else {
            return;
        };
        (vprop, vpe)
    };
    gic.make_vpe_resident(rd, vprop, vpe.vpt);
}

/// A vCPU stopping on this CPU: whatever vPE is resident on `rd` is made non-resident, so
/// that its vPT can be zeroed and reused.
pub fn vpe_leave(its: &Its, gic: &Gic, rd: usize) {
    if its.gicv4 {
        gic.make_vpe_nonresident(rd);
    }
}

/// VM `vm`'s reset, once its vCPUs left their vPEs and its events are unmapped: its vPEs
/// unmapped (VMAPP V=0) and their tables zeroed.
pub fn unmap_vpes(its: &Its, vm: usize, name: &str) {
    if let Some(i) = &its.its {
        let mut i = i.lock();
        if !i.vpes(vm).is_empty() {
            if let Err(e) = i.unmap_vpes(vm) {
                log::error!("its: {name}: reset: {e}");
            }
        }
    }
}

/// VM `vm`'s boot: its vPEs mapped again (VMAPP V=1) if a reset unmapped them.
pub fn map_vpes(its: &Its, vm: usize, name: &str) {
    if let Some(i) = &its.its {
        let mut i = i.lock();
        if !i.vpes(vm).is_empty() {
            if let Err(e) = i.map_vpes(vm) {
                log::error!("its: {name}: boot: {e}");
            }
        }
    }
}

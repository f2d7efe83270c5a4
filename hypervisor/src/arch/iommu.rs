//! The physical SMMUv3 and the PCI root complex as the hypervisor takes them over at boot:
//! register access and DMA memory for the `smmu` crate's driver, ECAM config space for the
//! `pci` module, and the boot sequence (SMMU on with global bypass off and every StreamID
//! aborting; PCI enumerated, BARs assigned, IOMMU groups computed).

use super::sysreg;
use crate::pci::{self, Bdf, ConfigSpace, HostBridge, IommuGroup, Topology};
use crate::platform::SmmuInfo;
use alloc::alloc::{alloc_zeroed, Layout};
use alloc::vec::Vec;
use core::arch::asm;
use smmu::driver::{DmaMemory, DriverError, Smmu, SmmuConfig, SmmuRegs};
use spin::Mutex;

/// SMMU registers at a physical address, with the barriers Linux's `writel`/`readl` imply:
/// memory writes (queue entries, STEs) are visible to the SMMU before a register write, and a
/// register read completes before the memory reads it announces (event records).
#[derive(Debug)]
pub struct HwRegs {
    base: u64,
    size: u64,
}

impl HwRegs {
    fn ptr<T>(&self, off: u64) -> *mut T {
        assert!(
            off + core::mem::size_of::<T>() as u64 <= self.size,
            "SMMU register offset {off:#x} outside its {:#x}-byte frame",
            self.size
        );
        (self.base + off) as usize as *mut T
    }
}

impl SmmuRegs for HwRegs {
    fn read32(&self, off: u64) -> u32 {
        // SAFETY: `ptr` checked the offset against the SMMU's register frame, which the EL2 map
        // covers as Device memory for the hypervisor's life.
        let v = unsafe { self.ptr::<u32>(off).read_volatile() };
        // SAFETY: a barrier has no memory effect beyond ordering.
        unsafe { asm!("dmb oshld", options(nostack)) };
        v
    }

    fn write32(&self, off: u64, v: u32) {
        // SAFETY: a barrier has no memory effect beyond ordering.
        unsafe { asm!("dsb st", options(nostack)) };
        // SAFETY: as in `read32`.
        unsafe { self.ptr::<u32>(off).write_volatile(v) };
    }

    fn read64(&self, off: u64) -> u64 {
        // SAFETY: as in `read32`.
        let v = unsafe { self.ptr::<u64>(off).read_volatile() };
        // SAFETY: a barrier has no memory effect beyond ordering.
        unsafe { asm!("dmb oshld", options(nostack)) };
        v
    }

    fn write64(&self, off: u64, v: u64) {
        // SAFETY: a barrier has no memory effect beyond ordering.
        unsafe { asm!("dsb st", options(nostack)) };
        // SAFETY: as in `read32`.
        unsafe { self.ptr::<u64>(off).write_volatile(v) };
    }
}

/// DMA memory for the SMMU's tables and queues, from the hypervisor heap (identity-mapped,
/// normal write-back: the driver requires a coherent SMMU). Only ranges this allocator handed
/// out can be read or written through it.
#[derive(Debug, Default)]
pub struct HeapDma {
    ranges: Vec<(u64, u64)>,
}

impl HeapDma {
    fn check(&self, pa: u64, len: usize) -> usize {
        let end = pa + len as u64;
        assert!(
            self.ranges.iter().any(|&(b, s)| pa >= b && end <= b + s),
            "SMMU DMA access {pa:#x}+{len:#x} outside its allocations"
        );
        pa as usize
    }
}

impl DmaMemory for HeapDma {
    fn alloc_zeroed(&mut self, size: usize, align: usize) -> Result<u64, DriverError> {
        let layout = Layout::from_size_align(size, align).map_err(|_| DriverError::OutOfMemory)?;
        // SAFETY: `layout` has a non-zero size (the driver never asks for empty tables).
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return Err(DriverError::OutOfMemory);
        }
        // The SMMU walks these tables for the hypervisor's whole life: never freed.
        self.ranges.push((p as u64, size as u64));
        Ok(p as u64)
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        let p = self.check(pa, data.len());
        for (i, chunk) in data.chunks(8).enumerate() {
            let at = p + i * 8;
            if chunk.len() == 8 && at.is_multiple_of(8) {
                let v = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                // SAFETY: `check` proved the range lies in an allocation of ours; one aligned
                // doubleword store, single-copy atomic as the SMMU's STE update rules require.
                unsafe { (at as *mut u64).write_volatile(v) };
            } else {
                for (j, &b) in chunk.iter().enumerate() {
                    // SAFETY: as above, byte by byte.
                    unsafe { ((at + j) as *mut u8).write_volatile(b) };
                }
            }
        }
    }

    fn read(&self, pa: u64, buf: &mut [u8]) {
        let p = self.check(pa, buf.len());
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `check` proved the range lies in an allocation of ours.
            *b = unsafe { ((p + i) as *const u8).read_volatile() };
        }
    }

    fn write_barrier(&mut self) {
        // SAFETY: a barrier has no memory effect beyond ordering.
        unsafe { asm!("dmb ishst", options(nostack)) };
    }
}

/// PCI configuration space through the host bridge's ECAM window.
#[derive(Debug)]
pub struct Ecam<'a> {
    host: &'a HostBridge,
}

impl Ecam<'_> {
    fn ptr(&self, bdf: Bdf, offset: u16) -> Option<*mut u32> {
        if !offset.is_multiple_of(4) || offset >= 4096 {
            return None;
        }
        self.host
            .ecam_address(bdf, offset)
            .map(|a| a as usize as *mut u32)
    }
}

impl ConfigSpace for Ecam<'_> {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        match self.ptr(bdf, offset) {
            // SAFETY: `ecam_address` only returns addresses inside the DT's ECAM window, which
            // the EL2 map covers as Device memory.
            Some(p) => unsafe { p.read_volatile() },
            None => u32::MAX,
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(p) = self.ptr(bdf, offset) {
            // SAFETY: as in `read32`.
            unsafe { p.write_volatile(value) };
        }
    }
}

/// What the hypervisor found and owns.
#[derive(Debug, Default)]
pub struct Iommu {
    /// The PCI hierarchy with BARs assigned.
    pub topology: Option<Topology>,
    /// Its IOMMU groups.
    pub groups: Vec<IommuGroup>,
}

/// The physical SMMU, once probed.
pub static SMMU: Mutex<Option<Smmu<HwRegs, HeapDma>>> = Mutex::new(None);

/// Takes the SMMU (global bypass off, every StreamID aborting) and the PCI root complex.
/// Problems are logged and leave that part out; nothing here stops the VMs from booting
/// without devices.
pub fn init(smmu: Option<&SmmuInfo>, host: Option<&HostBridge>) -> Iommu {
    let mut out = Iommu::default();
    match smmu {
        None => log::warn!("smmu: no arm,smmu-v3 in the DT: device DMA is not confined"),
        Some(info) => {
            let regs = HwRegs {
                base: info.regs.base,
                size: info.regs.size,
            };
            match Smmu::probe(regs, HeapDma::default(), SmmuConfig::default()) {
                Ok(s) => {
                    let f = s.features();
                    log::info!(
                        "smmu: SMMUv3 at {:#x}: {}-bit StreamIDs ({} stream table), {}-bit VMIDs, {}-bit OAS, nesting {}; enabled, global bypass off, every stream aborting",
                        info.regs.base,
                        f.sid_bits,
                        if f.two_level { "2-level" } else { "linear" },
                        f.vmid_bits,
                        f.oas_bits,
                        if f.nesting { "yes" } else { "no" }
                    );
                    *SMMU.lock() = Some(s);
                }
                Err(e) => log::error!("smmu: probe failed: {e}: device DMA is not confined"),
            }
        }
    }
    let Some(host) = host else {
        return out;
    };
    let mut ecam = Ecam { host };
    let mut topo = match pci::enumerate(&mut ecam, host.bus_start, host.bus_end) {
        Ok(t) => t,
        Err(e) => {
            log::error!("pci: enumeration failed: {e}");
            return out;
        }
    };
    if let Err(e) = pci::assign_resources(&mut ecam, &mut topo, host) {
        log::error!("pci: BAR assignment failed: {e}");
        return out;
    }
    sysreg::dsb_sy();
    for d in &topo.devices {
        log::info!(
            "pci: {} [{:04x}:{:04x}] class {:06x}{}",
            d.bdf,
            d.vendor_id,
            d.device_id,
            d.class,
            d.bars
                .iter()
                .filter_map(|b| b.addr.map(|a| alloc::format!(
                    ", BAR{} {:#x}+{:#x}",
                    b.index,
                    a.cpu,
                    b.size
                )))
                .collect::<alloc::string::String>()
        );
    }
    match pci::iommu_groups(&topo, host) {
        Ok(groups) => {
            for g in &groups {
                log::info!(
                    "pci: IOMMU group {}: devices {:?}, StreamIDs {:?}: unassigned, aborting",
                    g.id,
                    g.devices
                        .iter()
                        .map(|b| alloc::format!("{b}"))
                        .collect::<Vec<_>>(),
                    g.stream_ids
                );
            }
            out.groups = groups;
        }
        Err(e) => log::error!("pci: IOMMU groups: {e}"),
    }
    out.topology = Some(topo);
    out
}

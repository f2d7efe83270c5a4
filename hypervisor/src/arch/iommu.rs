//! The physical SMMUv3 and the PCI root complex as the hypervisor takes them over at boot:
//! register access and DMA memory for the `smmu` crate's driver, ECAM config space for the
//! `pci` module, and the boot sequence (SMMU on with global bypass off and every StreamID
//! aborting; PCI enumerated, BARs assigned, IOMMU groups computed).

use super::sysreg;
use crate::pci::{self, Bdf, ConfigSpace, HostBridge, IommuDirectory, IommuGroup};
use crate::platform::{MemRange, SmmuInfo};
use alloc::alloc::{alloc_zeroed, Layout};
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::arch::asm;
use smmu::cmd::Command;
use smmu::driver::{
    Cmdq, DmaMemory, DriverError, QueueMemory, Smmu, SmmuConfig, SmmuRegs, SteWrite,
};
use smmu::driver::{SteBreak, SyncTicket};
use smmu::ste::Ste;
use smmu::vsmmu::PhysicalSmmu;
use spin::Mutex;

/// SMMU registers at a physical address, with the barriers Linux's `writel`/`readl` imply:
/// memory writes (queue entries, STEs) are visible to the SMMU before a register write, and a
/// register read completes before the memory reads it announces (event records).
#[derive(Debug, Clone)]
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

    type Queue = HwQueue;

    fn queue_memory(&self, pa: u64, size: usize) -> HwQueue {
        self.check(pa, size);
        HwQueue { base: pa, size }
    }
}

/// The physical command queue's memory (an allocation of [`HeapDma`], never freed), written by
/// every CPU, each in the entries it reserved.
#[derive(Debug, Clone, Copy)]
pub struct HwQueue {
    base: u64,
    size: usize,
}

impl HwQueue {
    fn ptr(&self, pa: u64) -> *mut u64 {
        assert!(
            pa >= self.base && pa + 16 <= self.base + self.size as u64 && pa.is_multiple_of(16),
            "SMMU command queue access at {pa:#x} outside the queue"
        );
        pa as usize as *mut u64
    }
}

impl QueueMemory for HwQueue {
    fn write_entry(&self, pa: u64, words: [u64; 2]) {
        let p = self.ptr(pa);
        // The driver's reservations give each entry one writer at a time; aligned doubleword
        // stores are single-copy atomic.
        // SAFETY: `ptr` checked the entry lies in the queue (never-freed, identity-mapped heap).
        unsafe {
            p.write_volatile(words[0]);
            p.add(1).write_volatile(words[1]);
        }
    }

    fn read_entry(&self, pa: u64) -> [u64; 2] {
        let p = self.ptr(pa);
        // SAFETY: as in `write_entry`.
        unsafe { [p.read_volatile(), p.add(1).read_volatile()] }
    }

    fn entry_barrier(&self) {
        // Outer shareable, as Linux's dma_wmb: the SMMU is the observer.
        // SAFETY: a barrier has no memory effect beyond ordering.
        unsafe { asm!("dmb oshst", options(nostack)) };
    }
}

/// PCI configuration space through the host bridge's ECAM window.
#[derive(Debug)]
pub struct Ecam<'a> {
    host: &'a HostBridge,
}

impl<'a> Ecam<'a> {
    /// Config space under `host`'s ECAM window.
    pub fn new(host: &'a HostBridge) -> Self {
        Self { host }
    }

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

/// The host bridge windows whose CPU ranges the EL2 map covers as Device memory (set once at
/// boot, [`set_forwardable`]): the only places [`forward_access`] ever touches.
static FORWARDABLE: spin::Once<Vec<MemRange>> = spin::Once::new();

/// Records the host bridge windows the EL2 map covers, for [`forward_access`].
pub fn set_forwardable(windows: Vec<MemRange>) {
    FORWARDABLE.call_once(|| windows);
}

/// Performs a guest's trapped access at physical address `phys` (inside one of its own
/// functions' BARs, as `VirtualEcam::resolve` decided) with the guest's width: a read returns
/// the value, a write returns 0. Outside the recorded windows, or misaligned, a read returns all
/// ones and a write is dropped, as a PCI master abort would.
pub fn forward_access(
    phys: crate::hw::PhysAddr,
    width: crate::mmio::AccessWidth,
    write: Option<u64>,
) -> u64 {
    use crate::mmio::AccessWidth as W;
    let phys = phys.get();
    let inside = FORWARDABLE.get().is_some_and(|ws| {
        ws.iter().any(|w| {
            phys >= w.base
                && phys
                    .checked_add(width.bytes())
                    .is_some_and(|e| e <= w.end())
        })
    });
    if !inside || !phys.is_multiple_of(width.bytes()) {
        return if write.is_some() { 0 } else { width.mask() };
    }
    let p = phys as usize;
    // SAFETY: `phys` lies wholly inside a host bridge window, which the EL2 map covers as Device
    // memory for the hypervisor's life, and is aligned to the access width; it is inside a BAR
    // of a function the calling VM owns, which decodes it (checked by the caller).
    unsafe {
        match (width, write) {
            (W::Byte, None) => u64::from((p as *const u8).read_volatile()),
            (W::Half, None) => u64::from((p as *const u16).read_volatile()),
            (W::Word, None) => u64::from((p as *const u32).read_volatile()),
            (W::Double, None) => (p as *const u64).read_volatile(),
            (W::Byte, Some(v)) => {
                (p as *mut u8).write_volatile(v as u8);
                0
            }
            (W::Half, Some(v)) => {
                (p as *mut u16).write_volatile(v as u16);
                0
            }
            (W::Word, Some(v)) => {
                (p as *mut u32).write_volatile(v as u32);
                0
            }
            (W::Double, Some(v)) => {
                (p as *mut u64).write_volatile(v);
                0
            }
        }
    }
}

/// BAR registers at their CPU addresses, for probes at boot (only inside the windows
/// [`set_forwardable`] recorded, as [`forward_access`] checks).
impl pci::virtio::BarMmio for Ecam<'_> {
    fn read32(&mut self, pa: u64) -> u32 {
        forward_access(
            crate::hw::PhysAddr(pa),
            crate::mmio::AccessWidth::Word,
            None,
        ) as u32
    }

    fn write32(&mut self, pa: u64, value: u32) {
        forward_access(
            crate::hw::PhysAddr(pa),
            crate::mmio::AccessWidth::Word,
            Some(u64::from(value)),
        );
    }
}

/// What the hypervisor found and owns.
#[derive(Debug, Default)]
pub struct Iommu {
    /// Every host bridge it took, enumerated, with BARs assigned and IOMMU groups computed.
    pub segments: Vec<pci::Segment>,
    /// Every SMMU an `iommu-map` can name, driven or not.
    pub directory: IommuDirectory,
    /// One line per SMMU in the DT for the boot banner: its features, or why it is not driven.
    pub summary: Vec<String>,
}

/// The PCI functions one VM owns (see [`pci::resolve_all`]).
pub use crate::pci::VmPciDevices;

impl Iommu {
    /// Checks that `vm` may own `devices` given what earlier VMs were given and describes what
    /// it gets ([`pci::resolve_all`]: whole IOMMU groups, one VM per function, no shared INTx
    /// line or StreamID, DMA through an SMMU the hypervisor drives, device pages that are the
    /// VM's alone), on every host bridge. A VM that takes MSIs (`msi`: it gets a vITS) has a
    /// function on an earlier VM's INTx line assigned MSI-only instead of refused
    /// ([`pci::resolve_all_msi`]).
    pub fn resolve(
        &self,
        vm: &str,
        devices: &[pci::PciAddr],
        earlier: &[(String, Vec<pci::PciAddr>)],
        msi: bool,
    ) -> Result<VmPciDevices, DeviceError> {
        if devices.is_empty() {
            return Ok(VmPciDevices::default());
        }
        if self.segments.is_empty() {
            return Err(DeviceError::NoHostBridge);
        }
        let msi_vms: &[&str] = if msi { &[vm] } else { &[] };
        pci::resolve_all_msi(
            &self.segments,
            &self.directory,
            vm,
            devices,
            earlier,
            crate::stage2::IPA_BITS,
            msi_vms,
        )
        .map_err(DeviceError::Assign)
    }

    /// Configuration space of segment `index`'s host bridge.
    pub fn ecam(&self, index: usize) -> Option<Ecam<'_>> {
        self.segments.get(index).map(|s| Ecam::new(&s.bridge))
    }

    /// Every IOMMU group of every segment.
    pub fn groups(&self) -> impl Iterator<Item = &IommuGroup> {
        self.segments.iter().flat_map(|s| s.groups.iter())
    }
}

/// Why a VM cannot have the PCI functions it names, or cannot have them confined.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The DT has no host bridge the hypervisor could take.
    #[error("the machine has no usable PCI host bridge")]
    NoHostBridge,
    /// [`pci::resolve`] refused them.
    #[error(transparent)]
    Assign(#[from] pci::AssignError),
    /// No SMMU, so nothing would confine their DMA.
    #[error("no SMMU: DMA would not be confined")]
    NoSmmu,
    /// A StreamID's STE could not be written.
    #[error("StreamID {sid}: {source}")]
    Ste {
        /// The StreamID.
        sid: u32,
        /// What the driver said.
        source: DriverError,
    },
}

/// One physical SMMU the hypervisor drives: its stream table and event queue behind a lock
/// (the control path), its command queue shared by every CPU without one.
pub struct SmmuUnit {
    /// Its DT node's path, which names it in messages.
    pub path: String,
    /// Index of its node in `Platform::smmus`.
    pub info: usize,
    /// Its wired interrupts (event queue, global error), if any.
    pub intids: [Option<u32>; 2],
    /// The driver.
    pub smmu: Mutex<Smmu<HwRegs, HeapDma>>,
    /// Its command queue: the vSMMUs of the VMs behind it forward their guests'
    /// invalidations through it.
    pub cmdq: Arc<HwCmdq>,
}

impl core::fmt::Debug for SmmuUnit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SmmuUnit")
            .field("path", &self.path)
            .finish()
    }
}

/// Every SMMU the hypervisor drives, set once at boot ([`init`]); a unit's index is what
/// `VmDevices::smmus` and [`PhysSmmu`] name.
static UNITS: spin::Once<Vec<SmmuUnit>> = spin::Once::new();

fn units() -> &'static [SmmuUnit] {
    UNITS.get().map_or(&[], |u| &u[..])
}

fn unit(index: usize) -> Result<&'static SmmuUnit, DriverError> {
    units()
        .get(index)
        .ok_or(DriverError::MissingFeature("SMMU"))
}

/// The DT path of driven SMMU `unit`, for messages.
pub fn unit_path(index: usize) -> &'static str {
    units().get(index).map_or("no SMMU", |u| u.path.as_str())
}

/// Whether `intid` is one of a driven SMMU's wired interrupts.
pub fn is_smmu_irq(intid: u32) -> bool {
    units().iter().any(|u| u.intids.contains(&Some(intid)))
}

/// The wired interrupts of every driven SMMU.
pub fn smmu_irqs() -> impl Iterator<Item = u32> {
    units().iter().flat_map(|u| u.intids.into_iter().flatten())
}

/// Points `stream_ids` of SMMU `unit` at a VM's stage-2 (STE Config = stage 2 only, the VM's
/// VMID and root): its devices' DMA addresses are IPAs, confined to what the VM's stage-2 maps.
pub fn attach_stage2(
    vm: &str,
    unit_index: usize,
    stream_ids: &[u32],
    vmid: u16,
    s2_root: u64,
) -> Result<(), DeviceError> {
    let u = unit(unit_index).map_err(|_| DeviceError::NoSmmu)?;
    let oas_bits = u.smmu.lock().features().oas_bits;
    let s2 = crate::stage2::smmu_s2_config(oas_bits, vmid, s2_root);
    for &sid in stream_ids {
        set_ste(unit_index, sid, smmu::ste::Ste::stage2(s2))
            .map_err(|source| DeviceError::Ste { sid, source })?;
    }
    log::info!(
        "smmu: {vm}: StreamIDs {stream_ids:?} of {} translate through its stage-2 (VMID {vmid})",
        u.path
    );
    Ok(())
}

/// Writes the physical STE of `sid` on SMMU `unit` and waits until the SMMU uses it, holding
/// the SMMU's lock only for the stream-table writes: the CMD_CFGI_STE + CMD_SYNC waits (two
/// for a break-before-make) go through the lock-free command queue without it, so no other
/// CPU's STE change or event drain waits behind them.
pub fn set_ste(unit_index: usize, sid: u32, ste: smmu::ste::Ste) -> Result<(), DriverError> {
    let u = unit(unit_index)?;
    let write = u.smmu.lock().write_ste(sid, ste)?;
    let cfgi = match write {
        SteWrite::Unchanged => return Ok(()),
        SteWrite::Written(cfgi) => cfgi,
        SteWrite::Broken(b) => {
            u.cmdq.submit_sync(&[b.cfgi])?;
            u.smmu.lock().make_ste(b)?
        }
    };
    u.cmdq.submit_sync(&[cfgi])
}

/// Drops every TLB entry of a VM's VMID in every SMMU (TLBI_S12_VMALL + CMD_SYNC) after its
/// stage 2 changed: the SMMUs walk the same tables. Scoped to that VMID; nothing else is
/// touched.
pub fn invalidate_vm_tlbs(vmid: u16) {
    for u in units() {
        if let Err(e) = u
            .cmdq
            .submit_sync(&[smmu::cmd::Command::TlbiS12Vmall { vmid }])
        {
            log::error!("smmu: {}: TLBI_S12_VMALL for VMID {vmid}: {e}", u.path);
        }
    }
}

/// Logs the STE the SMMU holds for every StreamID of every IOMMU group, read back from the
/// stream table in memory (not from what the hypervisor meant to write).
pub fn dump_stream_table<'a>(
    groups: impl Iterator<Item = &'a IommuGroup>,
    directory: &IommuDirectory,
) {
    for g in groups {
        let Ok(index) = directory.unit_of(g) else {
            continue;
        };
        let Ok(u) = unit(index) else {
            continue;
        };
        let smmu = u.smmu.lock();
        for &sid in &g.stream_ids {
            match smmu.ste(sid) {
                Ok(ste) => {
                    let what = match ste.config() {
                        smmu::ste::StreamConfig::S2Translate | smmu::ste::StreamConfig::Nested => {
                            alloc::format!(
                                "{:?}, VMID {}, S2TTB {:#x}",
                                ste.config(),
                                ste.s2vmid(),
                                ste.s2ttb()
                            )
                        }
                        other => alloc::format!("{other:?}"),
                    };
                    log::info!(
                        "smmu: STE {sid} (IOMMU group {}): V={} {what}",
                        g.id,
                        u8::from(ste.v())
                    );
                }
                Err(e) => log::warn!("smmu: STE {sid}: {e}"),
            }
        }
    }
}

/// Nanoseconds since the counter started: the clock of the budgets on what VMs share (the
/// generic timer's CNTPCT_EL0, monotonic and the same on every CPU).
pub fn now_ns() -> u64 {
    use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTPCT_EL0};
    let freq = CNTFRQ_EL0.get().max(1);
    (u128::from(CNTPCT_EL0.get()) * 1_000_000_000 / u128::from(freq)) as u64
}

pub use crate::vm::events::Drained;

/// Drains every SMMU's event queue, budgeting each stream's records (a stream faulting beyond
/// its budget is quarantined, see `smmu::driver::EventBudget`) and terminating every stalled
/// transaction; streams whose quarantine is over get their STE back. No SMMU lock is held
/// once this returns, so the events can be handed to vSMMU models, which take it again.
pub fn drain_events() -> Vec<Drained> {
    units()
        .iter()
        .enumerate()
        .map(|(index, u)| {
            let mut smmu = u.smmu.lock();
            let mut events = Vec::new();
            let poll = smmu.poll_events(Some(now_ns()), |e, fate| events.push((e, fate)));
            Drained {
                unit: index,
                events,
                overflowed: poll.overflowed,
                gerror: smmu.acknowledge_gerror(),
                stalls_terminated: poll.stalls_terminated,
                quarantined: smmu.take_quarantines(),
            }
        })
        .collect()
}

/// The physical command queue's type.
pub type HwCmdq = Cmdq<HwRegs, HwQueue>;

/// Takes every SMMU the DT describes and the hypervisor can drive (global bypass off, every
/// StreamID aborting) and every host bridge in `bridges` (DT path, PCI domain, bridge). Problems are logged and leave that part out:
/// an SMMU not driven makes the functions behind it unassignable, and nothing here stops the
/// VMs from booting without devices.
pub fn init(smmus: &[SmmuInfo], bridges: &[(String, u16, HostBridge)]) -> Iommu {
    let mut out = Iommu::default();
    if smmus.is_empty() {
        log::warn!("smmu: no arm,smmu-v3 in the DT: no PCI function can be assigned");
    }
    let mut driven = Vec::new();
    for (i, info) in smmus.iter().enumerate() {
        let result = match &info.refused {
            Some(why) => Err(why.clone()),
            None => probe(info, i).map(|u| {
                let f = u.smmu.lock().features();
                out.summary.push(alloc::format!(
                    "{}: SMMUv3 at {:#x}, {}-bit StreamIDs, {}-bit VMIDs, {}-bit OAS, nesting {}",
                    info.path,
                    info.regs.base,
                    f.sid_bits,
                    f.vmid_bits,
                    f.oas_bits,
                    if f.nesting { "yes" } else { "no" }
                ));
                driven.push(u);
                driven.len() - 1
            }),
        };
        if let Err(why) = &result {
            out.summary
                .push(alloc::format!("{}: not driven: {why}", info.path));
        }
        if let Err(why) = &result {
            log::error!(
                "smmu: {}: not driven: {why}; the PCI functions behind it are never assigned",
                info.path
            );
        }
        if let Some(phandle) = info.phandle {
            out.directory.entries.push(pci::IommuEntry {
                phandle,
                path: info.path.clone(),
                driven: result,
            });
        }
    }
    UNITS.call_once(|| driven);
    for (path, domain, host) in bridges {
        let first_group = out.groups().map(|g| g.id + 1).max().unwrap_or(0);
        if let Some(seg) = take_bridge(path, *domain, host, first_group, &out.directory) {
            out.segments.push(seg);
        }
    }
    out
}

/// Enumerates one host bridge (PCI domain `domain`), assigns its BARs, probes its virtio
/// functions and computes its IOMMU groups (numbered from `first_group`), logging each function
/// and group. `None`, logged, when the bridge cannot be used.
fn take_bridge(
    path: &str,
    domain: u16,
    host: &HostBridge,
    first_group: usize,
    directory: &IommuDirectory,
) -> Option<pci::Segment> {
    // A VM's stage-2 covers a 39-bit IPA space: BARs go only in windows below it (QEMU's
    // 64-bit window at 512 GiB is left unused; every BAR fits the 32-bit one).
    let mut host = host.clone();
    host.windows
        .retain(|w| w.cpu_base + w.size <= 1 << crate::stage2::IPA_BITS);
    let mut ecam = Ecam { host: &host };
    let mut topo = match pci::enumerate(&mut ecam, host.bus_start, host.bus_end) {
        Ok(t) => t,
        Err(e) => {
            log::error!("pci: {path}: enumeration failed: {e}");
            return None;
        }
    };
    if let Err(e) = pci::assign_resources(&mut ecam, &mut topo, &host) {
        log::error!("pci: {path}: BAR assignment failed: {e}");
        return None;
    }
    sysreg::dsb_sy();
    pci::virtio::probe_all(&mut ecam, &mut topo);
    let at = |bdf: Bdf| pci::PciAddr::new(domain, bdf);
    for d in &topo.devices {
        log::info!(
            "pci: {} [{:04x}:{:04x}] class {:06x}{}{}",
            at(d.bdf),
            d.vendor_id,
            d.device_id,
            d.class,
            match d.virtio {
                Some(pci::virtio::VirtioDma::Translated) => ", virtio with ACCESS_PLATFORM",
                Some(_) =>
                    ", virtio WITHOUT ACCESS_PLATFORM (DMA bypasses the SMMU: never assigned)",
                None => "",
            },
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
    let mut groups = pci::iommu_groups(&topo, &host);
    pci::segments::number_groups(&mut groups, first_group);
    for g in &groups {
        let devices = g
            .devices
            .iter()
            .map(|&b| alloc::format!("{}", at(b)))
            .collect::<Vec<_>>();
        match directory.unit_of(g) {
            Ok(u) => log::info!(
                "pci: IOMMU group {}: devices {devices:?}, StreamIDs {:?} of {}: unassigned, aborting",
                g.id,
                g.stream_ids,
                units().get(u).map_or("?", |u| u.path.as_str())
            ),
            Err(why) => log::warn!(
                "pci: IOMMU group {}: devices {devices:?}: never assigned: {why}",
                g.id
            ),
        }
    }
    Some(pci::Segment {
        domain,
        path: String::from(path),
        bridge: host,
        topology: topo,
        groups,
    })
}

/// Probes one SMMU and takes it over: global bypass off, every stream aborting, its
/// interrupts on where it has them wired to the GIC.
fn probe(info: &SmmuInfo, index: usize) -> Result<SmmuUnit, String> {
    let regs = HwRegs {
        base: info.regs.base,
        size: info.regs.size,
    };
    let mut s = Smmu::probe(regs, HeapDma::default(), SmmuConfig::default())
        .map_err(|e| alloc::format!("probe failed: {e}"))?;
    let wired = info.eventq_intid.is_some() || info.gerror_intid.is_some();
    if wired {
        let irqs = smmu::regs::IrqCtrl::EVENTQ_IRQEN | smmu::regs::IrqCtrl::GERROR_IRQEN;
        if let Err(e) = s.set_irqs(irqs) {
            log::warn!(
                "smmu: {}: interrupts not enabled ({e}): its event queue is polled",
                info.path
            );
        }
    }
    if let Some(why) = &info.polled {
        log::warn!(
            "smmu: {}: {why}: its event queue is polled (every few guest timer ticks)",
            info.path
        );
    }
    let f = s.features();
    log::info!(
        "smmu: {} (SMMUv3 at {:#x}): {}-bit StreamIDs ({} stream table), {}-bit VMIDs, {}-bit OAS, nesting {}, CMD_SYNC completion by {}; enabled, global bypass off, every stream aborting",
        info.path,
        info.regs.base,
        f.sid_bits,
        if f.two_level { "2-level" } else { "linear" },
        f.vmid_bits,
        f.oas_bits,
        if f.nesting { "yes" } else { "no" },
        if s.cmdq().msi_completion() {
            "MSI (SMMU_IDR0.MSI)"
        } else {
            "polling SMMU_CMDQ_CONS (no SMMU_IDR0.MSI)"
        }
    );
    Ok(SmmuUnit {
        path: info.path.clone(),
        info: index,
        intids: [info.eventq_intid, info.gerror_intid],
        cmdq: s.cmdq().clone(),
        smmu: Mutex::new(s),
    })
}

/// The physical SMMU a vSMMU sits on (a unit index of [`UNITS`]), as the vSMMUs reach it:
/// stream-table writes under that SMMU's lock, held for the writes only (a
/// break-before-make's CMD_SYNC is waited for between `write_ste` and `make_ste`, without it);
/// commands through its lock-free command queue (the I/O path: every DMA unmap), so that no
/// lock on it is shared between VMs across a wait.
#[derive(Debug, Clone, Copy)]
pub struct PhysSmmu(pub usize);

/// Counter reads a budget wait spins at most per microsecond it waits (a bound on the loop
/// should the counter stop).
const SPINS_PER_US: u64 = 1_000;

impl PhysicalSmmu for PhysSmmu {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        unit(self.0)?.smmu.lock().write_ste(sid, ste)
    }

    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        unit(self.0)?.smmu.lock().make_ste(b)
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        unit(self.0)?.cmdq.queue(cmds)
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        unit(self.0)?.cmdq.queue_sync(cmds)
    }

    fn publish(&self) {
        if let Ok(u) = unit(self.0) {
            u.cmdq.publish();
        }
    }

    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        unit(self.0)?.cmdq.wait(ticket)
    }

    fn now(&self) -> Option<u64> {
        Some(now_ns())
    }

    fn wait_until(&self, deadline: u64) {
        let now = now_ns();
        let spins = deadline.saturating_sub(now) / 1_000 * SPINS_PER_US + SPINS_PER_US;
        for _ in 0..spins {
            if now_ns() >= deadline {
                return;
            }
            core::hint::spin_loop();
        }
    }
}

/// What a VM's construction needs of driven SMMU `unit`: its `Platform::smmus` index, its
/// output address size and what a vSMMU can be built on.
pub fn facts(unit_index: usize) -> Option<(usize, u8, crate::devices::vsmmu::PhysFacts)> {
    let u = units().get(unit_index)?;
    let smmu = u.smmu.lock();
    let f = smmu.features();
    let idr3 = SmmuRegs::read32(smmu.regs(), smmu::regs::SMMU_IDR3);
    Some((
        u.info,
        f.oas_bits,
        crate::devices::vsmmu::PhysFacts {
            nesting: f.nesting,
            stalls_forced: f.stall_model == smmu::regs::StallModel::Forced,
            idr5: f.idr5.0,
            ril: smmu::regs::Idr3(idr3).ril(),
        },
    ))
}

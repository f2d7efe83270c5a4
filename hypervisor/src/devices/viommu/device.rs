//! A VM's virtio-iommu as the guest sees it: the virtio-mmio transport ([`super::virtio`]) in
//! front of the request model ([`super::viommu::Viommu`]), with its request and event queues.
//!
//! Every request is completed inside the guest's QueueNotify trap: Linux's driver waits for
//! each batch with interrupts off (`viommu_sync_req` spins on the used ring, and it asks for no
//! request-queue interrupt), and an UNMAP must not be seen complete before the physical TLBI
//! and CMD_SYNC. Fault records (stage-1 faults of the VM's streams on the physical SMMU) wait
//! in a bounded backlog until the driver gives the event queue a buffer.
//!
//! The model is generic over its table pool (hypervisor memory, `arch::iopt`); the VM holds it
//! as a [`ViommuModel`] trait object, so neither `vm` nor this file names the machine's type.

use super::{Reply, TablePool, Viommu, ViommuConfig, ViommuStats};
use crate::devices::virtio::{MmioAction, Status, VirtioDevice, VirtioMmio};
use crate::devices::IrqPort;
use crate::hw::IntId;
use crate::platform::MemRange;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use smmu::cmd::Command;
use smmu::driver::{DriverError, SteBreak, SteWrite, SyncTicket};
use smmu::event::Event;
use smmu::ste::Ste;
use smmu::vsmmu::{GuestMemory, PhysicalSmmu};
use spin::Mutex;

/// Size of each virtqueue the device offers (QueueNumMax). Linux's driver sizes its rings to
/// it; 64 requests in flight is more than its one-batch-at-a-time use needs.
pub const QUEUE_SIZE: u16 = 64;
/// Bytes of a request's device-readable part the model is given at most: the largest request
/// (PROBE's head) is 72 bytes, so more is never needed and a huge buffer costs nothing.
const REQUEST_MAX: usize = 128;
/// Fault records kept for a guest whose event queue has no buffer (the rest are counted).
const EVENT_BACKLOG: usize = 32;
/// The request queue, then the event queue (virtio 1.2 section 5.13.2).
const REQUESTQ: u16 = 0;
const EVENTQ: u16 = 1;

/// The request model as the device uses it, whatever its table pool: what `Viommu<P>` does,
/// with the physical SMMU as a trait object.
pub trait ViommuModel: Send {
    /// Device features offered.
    fn device_features(&self) -> u64;
    /// The features the driver negotiated (at DRIVER_OK).
    fn set_driver_features(&mut self, features: u64);
    /// Config space read.
    fn config_read(&self, off: u64, size: u8) -> u32;
    /// Config space write (the `bypass` byte).
    fn config_write(&mut self, off: u64, size: u8, value: u32, phys: &mut dyn PhysicalSmmu);
    /// One request.
    fn request(&mut self, req: &[u8], writable: usize, phys: &mut dyn PhysicalSmmu) -> Reply;
    /// Device reset (Status 0).
    fn reset(&mut self, phys: &mut dyn PhysicalSmmu);
    /// VM reset.
    fn vm_reset(&mut self, phys: &mut dyn PhysicalSmmu);
    /// Every endpoint aborting (a VM stopped).
    fn abort_streams(&mut self, phys: &mut dyn PhysicalSmmu);
    /// The guest's fault record of a physical event of `psid`, if it is the guest's to see.
    fn fault_record(&mut self, psid: u32, e: &Event) -> Option<[u8; 24]>;
    /// Counters.
    fn stats(&self) -> ViommuStats;
    /// Whether a physical operation failed: the device then needs a reset.
    fn needs_reset(&self) -> bool;
}

/// A `&mut dyn PhysicalSmmu` as a `PhysicalSmmu` (the model's methods are generic over it).
struct DynSmmu<'a>(&'a mut dyn PhysicalSmmu);

impl PhysicalSmmu for DynSmmu<'_> {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        self.0.write_ste(sid, ste)
    }
    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        self.0.make_ste(b)
    }
    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.0.submit(cmds)
    }
    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.0.submit_sync(cmds)
    }
    fn publish(&self) {
        self.0.publish()
    }
    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        self.0.wait(ticket)
    }
    fn now(&self) -> Option<u64> {
        self.0.now()
    }
    fn wait_until(&self, deadline: u64) {
        self.0.wait_until(deadline)
    }
}

impl<P: TablePool + Send> ViommuModel for Viommu<P>
where
    P::Tr: Send,
{
    fn device_features(&self) -> u64 {
        Viommu::device_features(self)
    }
    fn set_driver_features(&mut self, features: u64) {
        Viommu::set_driver_features(self, features)
    }
    fn config_read(&self, off: u64, size: u8) -> u32 {
        Viommu::config_read(self, off, size)
    }
    fn config_write(&mut self, off: u64, size: u8, value: u32, phys: &mut dyn PhysicalSmmu) {
        Viommu::config_write(self, off, size, value, &mut DynSmmu(phys))
    }
    fn request(&mut self, req: &[u8], writable: usize, phys: &mut dyn PhysicalSmmu) -> Reply {
        Viommu::request(self, req, writable, &mut DynSmmu(phys))
    }
    fn reset(&mut self, phys: &mut dyn PhysicalSmmu) {
        Viommu::reset(self, &mut DynSmmu(phys))
    }
    fn vm_reset(&mut self, phys: &mut dyn PhysicalSmmu) {
        Viommu::vm_reset(self, &mut DynSmmu(phys))
    }
    fn abort_streams(&mut self, phys: &mut dyn PhysicalSmmu) {
        Viommu::abort_streams(self, &mut DynSmmu(phys))
    }
    fn fault_record(&mut self, psid: u32, e: &Event) -> Option<[u8; 24]> {
        Viommu::fault_record(self, psid, e)
    }
    fn stats(&self) -> ViommuStats {
        Viommu::stats(self)
    }
    fn needs_reset(&self) -> bool {
        Viommu::needs_reset(self)
    }
}

/// The model behind the transport for one register access (the config space's `bypass`
/// write reaches the physical SMMU).
struct Device<'a> {
    model: &'a mut dyn ViommuModel,
    phys: &'a mut dyn PhysicalSmmu,
}

impl VirtioDevice for Device<'_> {
    fn device_id(&self) -> u32 {
        super::DEVICE_ID
    }
    fn device_features(&self) -> u64 {
        self.model.device_features()
    }
    fn queue_max(&self, queue: u16) -> u16 {
        if queue <= EVENTQ {
            QUEUE_SIZE
        } else {
            0
        }
    }
    fn config_read(&self, off: u64, size: u8) -> u32 {
        self.model.config_read(off, size)
    }
    fn config_write(&mut self, off: u64, size: u8, value: u32, _features: u64) {
        self.model.config_write(off, size, value, self.phys)
    }
}

/// Device-side counters (the model keeps the request ones).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceStats {
    /// QueueNotify traps on the request queue.
    pub notifies: u64,
    /// Requests completed (used entries pushed on the request queue).
    pub completed: u64,
    /// Queue errors (bad descriptors, rings outside RAM): each set DEVICE_NEEDS_RESET.
    pub queue_errors: u64,
    /// Fault records written into the event queue.
    pub events: u64,
    /// Fault records dropped: the backlog was full.
    pub events_dropped: u64,
    /// Device resets (Status 0).
    pub resets: u64,
}

struct State {
    mmio: VirtioMmio,
    model: Box<dyn ViommuModel>,
    backlog: VecDeque<[u8; 24]>,
    stats: DeviceStats,
}

/// A VM's virtio-iommu over one physical SMMU.
pub struct VmViommu {
    /// The physical SMMU's driver instance (`arch::iommu`'s unit index).
    pub unit: usize,
    /// The physical SMMU's phandle, which the host bridges' `iommu-map` entries name: the
    /// guest's name this device instead.
    pub host_phandle: Option<u32>,
    /// Its virtio-mmio register frame (guest IPA; never mapped: every access traps).
    pub regs: MemRange,
    /// Its interrupt (an edge SPI).
    pub intid: u32,
    /// The IPA window of its table pool (mapped read-only in the VM's stage 2).
    pub pool: MemRange,
    state: Mutex<State>,
}

impl core::fmt::Debug for VmViommu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VmViommu")
            .field("unit", &self.unit)
            .field("regs", &self.regs)
            .field("intid", &self.intid)
            .field("pool", &self.pool)
            .finish()
    }
}

/// Builds a VM's virtio-iommu model over a table pool the machine provides (`arch::iopt`).
pub trait ViommuFactory: core::fmt::Debug {
    /// The model for `cfg` with its pool at IPA `pool_ipa`: the model and the pool's physical
    /// range (which the VM's stage 2 maps read-only at `pool_ipa`), or why there is none.
    fn make(
        &self,
        cfg: ViommuConfig,
        pool_ipa: u64,
    ) -> Result<(Box<dyn ViommuModel>, MemRange), &'static str>;
}

impl VmViommu {
    /// The device at `regs` raising `intid`, over physical SMMU `unit`, with `model`.
    pub fn new(
        unit: usize,
        host_phandle: Option<u32>,
        regs: MemRange,
        intid: u32,
        pool: MemRange,
        mut model: Box<dyn ViommuModel>,
    ) -> Self {
        let mmio = VirtioMmio::new(&Device {
            model: &mut *model,
            phys: &mut NoSmmu,
        });
        Self {
            unit,
            host_phandle,
            regs,
            intid,
            pool,
            state: Mutex::new(State {
                mmio,
                model,
                backlog: VecDeque::new(),
                stats: DeviceStats::default(),
            }),
        }
    }

    /// A trapped read at `off` of the register frame.
    pub fn read(&self, off: u64, size: u8) -> u64 {
        let mut st = self.state.lock();
        let st = &mut *st;
        st.mmio.read(
            off,
            size,
            &Device {
                model: &mut *st.model,
                phys: &mut NoSmmu,
            },
        )
    }

    /// A trapped write at `off`: requests are carried out (on `phys`) before it returns; the
    /// interrupt is raised through `irq`.
    pub fn write(
        &self,
        off: u64,
        size: u8,
        value: u64,
        ram: &mut impl GuestMemory,
        phys: &mut dyn PhysicalSmmu,
        irq: &impl IrqPort,
    ) {
        let mut st = self.state.lock();
        let st = &mut *st;
        let action = st.mmio.write(
            off,
            size,
            value,
            &mut Device {
                model: &mut *st.model,
                phys: &mut *phys,
            },
        );
        let raise = match action {
            MmioAction::None | MmioAction::FeaturesRejected => false,
            MmioAction::Reset => {
                st.stats.resets += 1;
                st.backlog.clear();
                st.model.reset(phys);
                false
            }
            MmioAction::DriverOk => {
                st.model.set_driver_features(st.mmio.driver_features());
                false
            }
            MmioAction::Notify(REQUESTQ) => {
                st.stats.notifies += 1;
                Self::requests(st, ram, phys)
            }
            MmioAction::Notify(_) => Self::flush_events(st, ram),
        };
        if raise {
            irq.raise(IntId(self.intid));
        }
    }

    /// Carries out every request the driver made available; whether to raise the interrupt.
    fn requests(st: &mut State, ram: &mut impl GuestMemory, phys: &mut dyn PhysicalSmmu) -> bool {
        let mut used = false;
        let mut failed = false;
        let mut interrupt = false;
        // At most one queue's worth per trap: the driver cannot have more outstanding, and a
        // guest that keeps refilling the ring from another vCPU waits for its next notify.
        for _ in 0..QUEUE_SIZE {
            let Some(q) = st.mmio.queue_mut(REQUESTQ) else {
                break;
            };
            let chain = match q.pop(ram) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            };
            let done = chain.read_all(ram, REQUEST_MAX).and_then(|req| {
                let reply = st.model.request(&req, chain.writable_len() as usize, phys);
                chain.write_all(ram, &reply.bytes)?;
                q.push_used(ram, chain.head, reply.used_len)
            });
            if done.is_err() {
                failed = true;
                break;
            }
            st.stats.completed += 1;
            used = true;
            interrupt |= q.needs_interrupt(ram);
        }
        if used && interrupt {
            st.mmio.raise_used();
        }
        let mut raise = used && interrupt;
        if failed || st.model.needs_reset() {
            st.stats.queue_errors += u64::from(failed);
            raise |= st.mmio.needs_reset();
        }
        raise
    }

    /// Writes waiting fault records into the event queue's buffers; whether to raise the
    /// interrupt.
    fn flush_events(st: &mut State, ram: &mut impl GuestMemory) -> bool {
        // A device that set DEVICE_NEEDS_RESET has met an error it cannot recover from (virtio
        // 1.2 2.1.2): like the notifies the transport now ignores, fault records must not take
        // more of the driver's buffers (each bad one would be consumed and never used) until
        // the reset, which drops the backlog.
        if st.mmio.status().contains(Status::DEVICE_NEEDS_RESET) {
            return false;
        }
        let mut used = false;
        while let Some(record) = st.backlog.front().copied() {
            let Some(q) = st.mmio.queue_mut(EVENTQ) else {
                break;
            };
            let chain = match q.pop(ram) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    st.stats.queue_errors += 1;
                    st.mmio.needs_reset();
                    return true;
                }
            };
            let written = chain
                .write_all(ram, &record)
                .and_then(|n| q.push_used(ram, chain.head, n));
            if written.is_err() {
                st.stats.queue_errors += 1;
                st.mmio.needs_reset();
                return true;
            }
            st.backlog.pop_front();
            st.stats.events += 1;
            used = true;
        }
        if used {
            st.mmio.raise_used();
        }
        used
    }

    /// Hands a physical event of StreamID `psid` (one of the VM's) to the device: a fault the
    /// guest's translation caused becomes a fault record in its event queue. Returns whether
    /// the guest is to see it.
    pub fn forward_event(
        &self,
        psid: u32,
        e: &Event,
        ram: &mut impl GuestMemory,
        irq: &impl IrqPort,
    ) -> bool {
        let mut st = self.state.lock();
        let st = &mut *st;
        let Some(record) = st.model.fault_record(psid, e) else {
            return false;
        };
        if !st.mmio.status().contains(Status::DRIVER_OK) {
            // No driver to tell: a fault of a device whose driver is gone is the guest's own.
            return true;
        }
        if st.backlog.len() >= EVENT_BACKLOG {
            st.stats.events_dropped += 1;
            return true;
        }
        st.backlog.push_back(record);
        if Self::flush_events(st, ram) {
            irq.raise(IntId(self.intid));
        }
        true
    }

    /// Every endpoint aborting (a VM stopped, or about to be reloaded): a device reset with
    /// `bypass` 0, so no endpoint is left on any translation. [`VmViommu::vm_reset`] brings
    /// them back at the next boot.
    pub fn abort_streams(&self, phys: &mut dyn PhysicalSmmu) {
        self.state.lock().model.abort_streams(phys);
    }

    /// VM reset: the transport and the model start over (`bypass` back to 1: every endpoint on
    /// stage 2 only).
    pub fn vm_reset(&self, phys: &mut dyn PhysicalSmmu) {
        let mut st = self.state.lock();
        let st = &mut *st;
        st.model.vm_reset(phys);
        st.mmio = VirtioMmio::new(&Device {
            model: &mut *st.model,
            phys: &mut NoSmmu,
        });
        st.backlog.clear();
    }

    /// Queue `q` as the device holds it (areas and indices) while it is live: the fuzz
    /// harness's invariant on the used ring.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn queue(&self, q: u16) -> Option<crate::devices::virtio::SplitQueue> {
        self.state.lock().mmio.queue(q).cloned()
    }

    /// The device status (Status register).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn status(&self) -> Status {
        self.state.lock().mmio.status()
    }

    /// The counters as one log line.
    pub fn stats_line(&self, vm: &str) -> String {
        let st = self.state.lock();
        let m = st.model.stats();
        let d = st.stats;
        let [other, attach, detach, map, unmap, probe] = m.requests;
        let errors: u64 = m.statuses[1..].iter().sum();
        alloc::format!(
            "viommu: {vm} stats: notifies={} requests={} attach={attach} detach={detach} map={map} unmap={unmap} probe={probe} unknown={other} errors={errors} phys_syncs={} tlbis={} ste_writes={} phys_errors={} domains={} mappings={} table_pages={} faults={} events={} events_dropped={} queue_errors={} resets={} status={}",
            d.notifies,
            d.completed,
            m.phys_syncs,
            m.tlbis,
            m.ste_writes,
            m.phys_errors,
            m.domains,
            m.mappings,
            m.table_pages,
            m.faults,
            d.events,
            d.events_dropped,
            d.queue_errors,
            d.resets,
            st.mmio.status().bits(),
        )
    }
}

/// The physical SMMU where no access may need it (register reads, building the transport):
/// every operation fails, which the model treats as a physical error.
struct NoSmmu;

impl PhysicalSmmu for NoSmmu {
    fn write_ste(&mut self, _: u32, _: Ste) -> Result<SteWrite, DriverError> {
        Err(DriverError::MissingFeature(
            "a physical SMMU (register read)",
        ))
    }
    fn make_ste(&mut self, _: SteBreak) -> Result<Command, DriverError> {
        Err(DriverError::MissingFeature(
            "a physical SMMU (register read)",
        ))
    }
    fn submit(&mut self, _: &[Command]) -> Result<(), DriverError> {
        Err(DriverError::MissingFeature(
            "a physical SMMU (register read)",
        ))
    }
    fn submit_sync(&mut self, _: &[Command]) -> Result<SyncTicket, DriverError> {
        Err(DriverError::MissingFeature(
            "a physical SMMU (register read)",
        ))
    }
    fn publish(&self) {}
    fn wait(&self, _: SyncTicket) -> Result<(), DriverError> {
        Err(DriverError::MissingFeature(
            "a physical SMMU (register read)",
        ))
    }
}

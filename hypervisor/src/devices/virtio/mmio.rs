//! The virtio-mmio register file, version 2 (the non-legacy interface, virtio 1.2 section
//! 4.2.2), for one device: feature negotiation, the device status, queue setup and the
//! interrupt status. Register names and offsets are Linux's `include/uapi/linux/virtio_mmio.h`.
//!
//! The transport refuses what the spec says the driver MUST NOT do rather than act on it: a
//! Status write clearing bits (other than the reset, 0), feature writes after FEATURES_OK,
//! queue configuration while the queue is ready, a queue made ready with a bad size or
//! misaligned areas (QueueReady then stays 0, which Linux's `vm_setup_vq` does not check, but
//! the queue simply never runs). Accesses of the wrong width or alignment are dropped and
//! counted ([`VirtioMmio::bad_accesses`]).

use super::queue::SplitQueue;
use super::{feature, Status, VirtioDevice, VIRTIO_F_VERSION_1};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

/// "virt" in little-endian ASCII (spec 4.2.2).
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy virtio-mmio interface (spec 4.2.2; 1 is legacy, 4.2.4).
pub const VERSION: u32 = 2;
/// Our VendorID: "SMHV" in little-endian ASCII, as QEMU's 0x554d4551 reads "QEMU". The spec
/// gives it no meaning; Linux only prints it.
pub const VENDOR_ID: u32 = 0x5648_4d53;
/// The size of a virtio-mmio frame (registers, then config space from 0x100), as QEMU's
/// `virtio,mmio` nodes have it.
pub const FRAME_SIZE: u64 = 0x200;
/// The most queues a transport keeps state for; queues the device has beyond it do not exist
/// for the driver.
pub const MAX_QUEUES: u16 = 64;

/// InterruptStatus bit: a queue has new used buffers (spec 4.2.2).
pub const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the device configuration (or DEVICE_NEEDS_RESET) changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Register offsets (virtio 1.2 4.2.2, Linux `virtio_mmio.h`).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// What the caller must do after a register write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioAction {
    /// Nothing.
    None,
    /// The driver notified queue `.0`, which exists, is ready, and the driver is DRIVER_OK (and
    /// the device not DEVICE_NEEDS_RESET): process its available chains.
    Notify(u16),
    /// Status was written 0: the transport has reset its own state (queues, features,
    /// InterruptStatus); the caller resets the device's and deasserts its interrupt.
    Reset,
    /// Status gained DRIVER_OK: the device is live with [`VirtioMmio::driver_features`].
    DriverOk,
    /// The driver asked for FEATURES_OK with features the device cannot accept (not a subset
    /// of the device's, or without VIRTIO_F_VERSION_1); FEATURES_OK stays clear and the driver
    /// will fail the device (spec 3.1.1). For the caller to log.
    FeaturesRejected,
}

/// One queue's configuration as the driver writes it, before and while it is live.
#[derive(Debug, Clone, Default)]
struct QueueSlot {
    /// QueueNum as written; 0 until a valid size is written.
    num: u16,
    desc: u64,
    driver: u64,
    device: u64,
    /// The live queue, once QueueReady = 1 succeeded.
    live: Option<SplitQueue>,
}

/// The virtio-mmio v2 transport's state for one device (spec 4.2.2).
#[derive(Debug)]
pub struct VirtioMmio {
    status: Status,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSlot>,
    interrupt_status: u32,
    config_generation: u32,
    bad_accesses: AtomicU64,
}

/// Sets the low or high 32 bits of `v`.
fn set_half(v: &mut u64, high: bool, value: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(value) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(value);
    }
}

impl VirtioMmio {
    /// A transport in its reset state for `dev`, with state for each queue it has (up to
    /// [`MAX_QUEUES`]).
    pub fn new(dev: &impl VirtioDevice) -> Self {
        let n = (0..MAX_QUEUES)
            .take_while(|&q| dev.queue_max(q) != 0)
            .count();
        Self {
            status: Status::empty(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: alloc::vec![QueueSlot::default(); n],
            interrupt_status: 0,
            config_generation: 0,
            bad_accesses: AtomicU64::new(0),
        }
    }

    /// The device status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The features the driver wrote; negotiated once [`Status::FEATURES_OK`] is set.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// InterruptStatus: non-zero while the device's interrupt should be asserted.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Accesses dropped: of the wrong width or alignment, to no register, writes to read-only
    /// and reads of write-only registers.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }

    /// Queue `q` if it is live (ready) and the driver is DRIVER_OK: the device must not use a
    /// queue before that (spec 2.1.2).
    pub fn queue_mut(&mut self, q: u16) -> Option<&mut SplitQueue> {
        if !self.status.contains(Status::DRIVER_OK) {
            return None;
        }
        self.queues.get_mut(usize::from(q))?.live.as_mut()
    }

    /// Queue `q` if it is live, whatever the status (for inspection: the device must use
    /// [`VirtioMmio::queue_mut`]).
    pub fn queue(&self, q: u16) -> Option<&SplitQueue> {
        self.queues.get(usize::from(q))?.live.as_ref()
    }

    /// Marks used buffers in InterruptStatus; the caller raises the interrupt (if the queue's
    /// [`SplitQueue::needs_interrupt`] says so).
    pub fn raise_used(&mut self) {
        self.interrupt_status |= INT_USED_BUFFER;
    }

    /// The device changed its config space: ConfigGeneration moves on (spec 4.2.2, so a driver
    /// reading it in several accesses retries) and a config change is marked in
    /// InterruptStatus. Returns whether the caller should raise the interrupt: only once the
    /// driver is DRIVER_OK, before which it reads config without waiting for notifications.
    pub fn config_changed(&mut self) -> bool {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.notify_config()
    }

    /// The device cannot go on (e.g. a queue error): sets DEVICE_NEEDS_RESET, and, if the
    /// driver is DRIVER_OK, marks a config change, as spec 2.1.2 requires; the return says
    /// whether to raise the interrupt. Notifies are ignored from now until the reset.
    pub fn needs_reset(&mut self) -> bool {
        self.status |= Status::DEVICE_NEEDS_RESET;
        self.notify_config()
    }

    fn notify_config(&mut self) -> bool {
        if self.status.contains(Status::DRIVER_OK) {
            self.interrupt_status |= INT_CONFIG_CHANGE;
            true
        } else {
            false
        }
    }

    fn bad(&self) {
        self.bad_accesses.fetch_add(1, Ordering::Relaxed);
    }

    fn selected(&self) -> Option<&QueueSlot> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Whether a config access of `size` bytes at `off` (from 0x100) is one the spec allows:
    /// 1, 2 or 4 bytes, naturally aligned (spec 4.2.2.2; 64-bit fields are read in 32-bit
    /// halves, 4.2.2.2 too).
    fn config_access_ok(off: u64, size: u8) -> bool {
        matches!(size, 1 | 2 | 4) && off.is_multiple_of(u64::from(size))
    }

    /// A read of `size` bytes at offset `off` in the frame.
    pub fn read(&self, off: u64, size: u8, dev: &impl VirtioDevice) -> u64 {
        if off >= regs::CONFIG {
            let coff = off - regs::CONFIG;
            if !Self::config_access_ok(coff, size) {
                self.bad();
                return 0;
            }
            return u64::from(dev.config_read(coff, size));
        }
        // Registers are 32-bit, accessed only as such (spec 4.2.2.2).
        if size != 4 || !off.is_multiple_of(4) {
            self.bad();
            return 0;
        }
        let q = self.selected();
        let v = match off {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => dev.device_id(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => dev.device_features() as u32,
                1 => (dev.device_features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => match q {
                Some(_) => u32::from(dev.queue_max(self.queue_sel as u16)),
                None => 0,
            },
            regs::QUEUE_READY => u32::from(q.is_some_and(|q| q.live.is_some())),
            regs::INTERRUPT_STATUS => self.interrupt_status,
            regs::STATUS => self.status.bits(),
            // No shared memory regions: a length of ~0 says so (spec 4.2.2, Linux
            // `vm_get_shm_region`).
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            // VIRTIO_F_RING_RESET is never offered; the register reads 0.
            regs::QUEUE_RESET => 0,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                self.bad();
                0
            }
        };
        u64::from(v)
    }

    /// A write of `size` bytes of `value` at offset `off` in the frame.
    pub fn write(
        &mut self,
        off: u64,
        size: u8,
        value: u64,
        dev: &mut impl VirtioDevice,
    ) -> MmioAction {
        if off >= regs::CONFIG {
            let coff = off - regs::CONFIG;
            if !Self::config_access_ok(coff, size) {
                self.bad();
                return MmioAction::None;
            }
            dev.config_write(coff, size, value as u32, self.driver_features);
            return MmioAction::None;
        }
        if size != 4 || !off.is_multiple_of(4) {
            self.bad();
            return MmioAction::None;
        }
        let value = value as u32;
        let features_ok = self.status.contains(Status::FEATURES_OK);
        match off {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Features are fixed once accepted: spec 3.1.1 has them written before FEATURES_OK
            // and never after.
            regs::DRIVER_FEATURES if !features_ok => match self.driver_features_sel {
                0 => set_half(&mut self.driver_features, false, value),
                1 => set_half(&mut self.driver_features, true, value),
                // Bits the device can never have; a non-zero word would be refused anyway.
                _ => {}
            },
            regs::DRIVER_FEATURES => {}
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_config(off, value, dev),
            regs::QUEUE_READY => self.write_queue_ready(value),
            regs::QUEUE_NOTIFY => return self.notify(value),
            regs::INTERRUPT_ACK => self.interrupt_status &= !value,
            regs::STATUS => return self.write_status(value, dev),
            // Stored by nobody: there are no regions to select.
            regs::SHM_SEL => {}
            _ => self.bad(),
        }
        MmioAction::None
    }

    fn write_queue_config(&mut self, off: u64, value: u32, dev: &impl VirtioDevice) {
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            return;
        };
        // The driver MUST NOT change a ready queue's configuration (spec 4.2.2).
        if q.live.is_some() {
            return;
        }
        match off {
            regs::QUEUE_NUM => {
                let max = dev.queue_max(sel as u16);
                // Queue sizes are powers of 2 (spec 2.7) no larger than QueueNumMax; anything
                // else leaves the size invalid, so QueueReady cannot succeed.
                q.num = match u16::try_from(value) {
                    Ok(n) if n.is_power_of_two() && n <= max => n,
                    _ => 0,
                };
            }
            regs::QUEUE_DESC_LOW => set_half(&mut q.desc, false, value),
            regs::QUEUE_DESC_HIGH => set_half(&mut q.desc, true, value),
            regs::QUEUE_DRIVER_LOW => set_half(&mut q.driver, false, value),
            regs::QUEUE_DRIVER_HIGH => set_half(&mut q.driver, true, value),
            regs::QUEUE_DEVICE_LOW => set_half(&mut q.device, false, value),
            _ => set_half(&mut q.device, true, value),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            return;
        };
        if value & 1 == 0 {
            // Linux writes 0 when it deletes a queue and reads it back (`vm_del_vq`).
            q.live = None;
        } else if q.live.is_none() {
            // Fails (QueueReady stays 0) on a size never validly written or misaligned areas.
            q.live = SplitQueue::new(q.num, q.desc, q.driver, q.device);
        }
    }

    fn notify(&self, value: u32) -> MmioAction {
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index (spec 4.2.2).
        let live = self
            .queues
            .get(value as usize)
            .is_some_and(|q| q.live.is_some());
        let running = self.status.contains(Status::DRIVER_OK)
            && !self.status.contains(Status::DEVICE_NEEDS_RESET);
        if live && running {
            MmioAction::Notify(value as u16)
        } else {
            MmioAction::None
        }
    }

    fn features_acceptable(&self, dev: &impl VirtioDevice) -> bool {
        self.driver_features & !dev.device_features() == 0
            && self.driver_features & feature(VIRTIO_F_VERSION_1) != 0
    }

    fn write_status(&mut self, value: u32, dev: &impl VirtioDevice) -> MmioAction {
        if value == 0 {
            self.reset();
            return MmioAction::Reset;
        }
        // Reserved bits are dropped; DEVICE_NEEDS_RESET is the device's to set, so the
        // driver's copy of it (it writes back what it read, plus a bit) is not compared.
        let new = Status::from_bits_truncate(value) - Status::DEVICE_NEEDS_RESET;
        let old = self.status - Status::DEVICE_NEEDS_RESET;
        // The driver MUST NOT clear a status bit (spec 2.1.1); only a reset does.
        if !new.contains(old) {
            return MmioAction::None;
        }
        let mut added = new - old;
        let mut action = MmioAction::None;
        if added.contains(Status::FEATURES_OK) && !self.features_acceptable(dev) {
            // The driver re-reads Status and gives up (spec 3.1.1 step 6).
            added.remove(Status::FEATURES_OK);
            action = MmioAction::FeaturesRejected;
        }
        // DRIVER_OK without accepted features would run a device whose features were never
        // negotiated: a v2 device has no legacy mode to fall back on (spec 3.1.1, 4.2.4).
        if added.contains(Status::DRIVER_OK) && !(old | added).contains(Status::FEATURES_OK) {
            added.remove(Status::DRIVER_OK);
        }
        self.status |= added;
        if added.contains(Status::DRIVER_OK) {
            action = MmioAction::DriverOk;
        }
        action
    }

    /// The device reset (spec 2.4): every queue unready and forgotten, features, selectors,
    /// InterruptStatus and Status 0. ConfigGeneration keeps counting, so a driver that read it
    /// before the reset never sees an old value again.
    fn reset(&mut self) {
        self.status = Status::empty();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.fill(QueueSlot::default());
        self.interrupt_status = 0;
    }
}

//! A generic virtio device transport: the virtio-mmio register file, version 2 (virtio 1.2
//! section 4.2.2, [`mmio::VirtioMmio`]) and the split virtqueue in guest RAM (section 2.7,
//! [`queue::SplitQueue`]), for devices the hypervisor itself emulates.
//!
//! The transport knows nothing of what is behind it: the device is a [`VirtioDevice`] (its ID,
//! features, queue sizes and config space), and the caller (the VM glue) turns each
//! [`mmio::MmioAction`] a register write returns into work: a `Notify` into popping that queue's
//! chains ([`queue::SplitQueue::pop`]) and pushing used entries, a `Reset` into resetting the
//! device's own state. Interrupts are the caller's too: the transport only keeps
//! InterruptStatus, and says when it changed.
//!
//! Guest RAM is reached only through [`GuestMemory`](smmu::vsmmu::GuestMemory), so all of this
//! is host-tested against a buffer (`fake.rs`). Little-endian throughout, as virtio 1.x is.

#[cfg(test)]
mod fake;
pub mod mmio;
pub mod queue;
#[cfg(test)]
mod tests;

pub use mmio::{MmioAction, VirtioMmio};
pub use queue::{Chain, QueueError, SplitQueue};

/// Feature bit (a bit number, as in the spec and Linux): the device complies with virtio 1.x
/// rather than the legacy interface (spec 6). A version 2 MMIO device needs it negotiated:
/// [`VirtioMmio`] refuses FEATURES_OK without it.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the device's DMA goes through the platform's IOMMU / access restrictions
/// (spec 6).
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// The feature mask of feature bit number `bit` (`feature(VIRTIO_F_VERSION_1)` = `1 << 32`).
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

bitflags::bitflags! {
    /// The device status field (spec 2.1). The driver sets bits one step at a time through the
    /// Status register (spec 3.1.1); DEVICE_NEEDS_RESET is the device's.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Status: u32 {
        /// The guest has found the device.
        const ACKNOWLEDGE = 1;
        /// The guest has a driver for it.
        const DRIVER = 2;
        /// The driver is ready: the device may now use its queues.
        const DRIVER_OK = 4;
        /// The driver has written its features and the device accepted them.
        const FEATURES_OK = 8;
        /// The device has met an error it cannot recover from; only a reset clears it.
        const DEVICE_NEEDS_RESET = 0x40;
        /// The driver has given up on the device.
        const FAILED = 0x80;
    }
}

/// The device behind a [`VirtioMmio`] transport.
pub trait VirtioDevice {
    /// virtio device ID (e.g. 23 for iommu).
    fn device_id(&self) -> u32;
    /// Device feature bits offered (the transport adds nothing itself; the device includes
    /// VIRTIO_F_VERSION_1).
    fn device_features(&self) -> u64;
    /// Max size (a power of 2) of virtqueue `queue`; 0 = no such queue. Queues are numbered from
    /// 0 without gaps: the first 0 ends them.
    fn queue_max(&self, queue: u16) -> u16;
    /// Device config space read at `off` from 0x100, `size` 1/2/4 bytes (8 never: MMIO config
    /// is read in 32-bit halves by Linux). Out of range reads 0.
    fn config_read(&self, off: u64, size: u8) -> u32;
    /// Config write; `features` = the negotiated driver features (the device decides what is
    /// writable).
    fn config_write(&mut self, off: u64, size: u8, value: u32, features: u64);
}

//! The split virtqueue (virtio 1.2 section 2.7), device side, in guest RAM.
//!
//! Three areas the driver allocates (spec 2.7, "Virtqueue Part / Alignment / Size"), all
//! little-endian:
//!
//! - the descriptor table, 16-byte aligned: `size` × { addr le64, len le32, flags le16,
//!   next le16 };
//! - the available (driver) ring, 2-byte aligned: flags le16, idx le16, `ring[size]` le16,
//!   used_event le16 (unused: VIRTIO_F_EVENT_IDX is never offered);
//! - the used (device) ring, 4-byte aligned: flags le16, idx le16, `ring[size]` { id le32,
//!   len le32 }, avail_event le16 (unused likewise).
//!
//! The ring indices are free-running 16-bit counters; slot = index % size, exact across the
//! wrap because size is a power of 2 and so divides 2^16 (spec 2.7.6, 2.7.8).
//!
//! Errors: everything the guest wrote is validated before it is trusted, and a bad entry is
//! an error, never a panic. [`SplitQueue::pop`] leaves the queue unchanged when it fails (the
//! bad entry stays at `last_avail`): the caller is expected to give up on the queue, by setting
//! DEVICE_NEEDS_RESET ([`VirtioMmio::needs_reset`](super::VirtioMmio::needs_reset), which the
//! spec allows a device that meets an error it cannot recover from, 2.1.2), and the driver's
//! reset then rebuilds it.

use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};
use smmu::vsmmu::{GuestMemError, GuestMemory};

/// Descriptor flag: the buffer continues in descriptor `next` (spec 2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds a table of indirect descriptors (spec 2.7.5.3). Never
/// valid here: VIRTIO_F_INDIRECT_DESC is not offered, and the driver MUST NOT set it then.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver does not want used-buffer interrupts (spec 2.7.7). Without
/// VIRTIO_F_EVENT_IDX it is the only suppression there is.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The most bytes the device-readable part, and separately the device-writable part, of one
/// chain may describe. A bound on what the device ever copies for one request, so that a guest
/// cannot make it allocate or walk without limit.
pub const MAX_CHAIN_BYTES: u64 = 64 * 1024;

/// Alignment of the descriptor table, the available ring and the used ring (spec 2.7, table
/// "Virtqueue Part / Alignment").
pub const DESC_ALIGN: u64 = 16;
/// See [`DESC_ALIGN`].
pub const AVAIL_ALIGN: u64 = 2;
/// See [`DESC_ALIGN`].
pub const USED_ALIGN: u64 = 4;

const DESC_SIZE: u64 = 16;
const USED_ELEM_SIZE: u64 = 8;
/// Offset of `idx` in both rings (after le16 `flags`), and of `ring[0]`.
const RING_IDX: u64 = 2;
const RING_START: u64 = 4;

/// Why a queue operation failed. All but [`QueueError::Memory`] are the driver breaking the
/// spec's rules for the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// A ring, descriptor or buffer is not guest RAM.
    #[error("virtqueue access: {0}")]
    Memory(#[from] GuestMemError),
    /// avail.idx is more than the queue size ahead of the device's next index: the driver
    /// cannot have made that many buffers available.
    #[error("avail.idx {avail_idx} is more than the queue size past {last_avail}")]
    AvailOverrun {
        /// What the driver wrote.
        avail_idx: u16,
        /// Where the device is.
        last_avail: u16,
    },
    /// A chain head (in the available ring, or given to `push_used`) beyond the table.
    #[error("descriptor head {0} out of range")]
    BadHead(u16),
    /// A descriptor's `next` beyond the table.
    #[error("descriptor next {0} out of range")]
    BadNext(u16),
    /// A chain longer than the table: it loops.
    #[error("descriptor chain loops")]
    Loop,
    /// VIRTQ_DESC_F_INDIRECT, which needs a feature never offered.
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    Indirect,
    /// A device-readable descriptor after a device-writable one (spec 2.7.4.2: the driver MUST
    /// NOT).
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The readable or the writable part of a chain over [`MAX_CHAIN_BYTES`].
    #[error("descriptor chain over {MAX_CHAIN_BYTES} bytes")]
    TooLong,
    /// A descriptor whose addr + len wraps around the address space.
    #[error("descriptor buffer {addr:#x}+{len:#x} wraps")]
    BadBuffer {
        /// Its addr.
        addr: u64,
        /// Its len.
        len: u32,
    },
}

/// One descriptor chain taken from the available ring: its buffers, in order, zero-length
/// descriptors left out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    /// The head descriptor's index: what goes back in the used ring.
    pub head: u16,
    /// The device-readable buffers (guest IPA, length).
    pub readable: Vec<(u64, u32)>,
    /// The device-writable buffers (guest IPA, length), all after the readable ones.
    pub writable: Vec<(u64, u32)>,
}

impl Chain {
    /// The readable bytes, concatenated, at most `max` of them (fewer when the chain has
    /// fewer).
    pub fn read_all(&self, mem: &impl GuestMemory, max: usize) -> Result<Vec<u8>, QueueError> {
        let total = (self.readable_len() as usize).min(max);
        let mut out = alloc::vec![0; total];
        let mut done = 0;
        for &(ipa, len) in &self.readable {
            if done == total {
                break;
            }
            let n = (len as usize).min(total - done);
            mem.read(ipa, &mut out[done..done + n])?;
            done += n;
        }
        Ok(out)
    }

    /// Total length of the readable buffers (at most [`MAX_CHAIN_BYTES`]).
    pub fn readable_len(&self) -> u32 {
        self.readable.iter().map(|&(_, l)| l).sum()
    }

    /// Total length of the writable buffers (at most [`MAX_CHAIN_BYTES`]).
    pub fn writable_len(&self) -> u32 {
        self.writable.iter().map(|&(_, l)| l).sum()
    }

    /// Scatters `data` into the writable buffers in order; what does not fit is dropped.
    /// Returns the bytes written, the `len` to give [`SplitQueue::push_used`]. A buffer outside
    /// guest RAM fails the whole call (buffers before it are already written).
    pub fn write_all(&self, mem: &mut impl GuestMemory, data: &[u8]) -> Result<u32, QueueError> {
        let mut done = 0;
        for &(ipa, len) in &self.writable {
            if done == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - done);
            mem.write(ipa, &data[done..done + n])?;
            done += n;
        }
        // At most writable_len(), itself at most MAX_CHAIN_BYTES.
        Ok(done as u32)
    }
}

/// A live split virtqueue: where its areas are in guest RAM and the device's two indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    used_idx: u16,
}

impl SplitQueue {
    /// A queue of `size` entries (a power of 2, non-zero) at the given descriptor table,
    /// available ring and used ring, with both indices at 0 as after a reset; `None` when the
    /// size or an area's alignment breaks the spec (2.7).
    pub fn new(size: u16, desc: u64, avail: u64, used: u64) -> Option<Self> {
        let aligned = desc.is_multiple_of(DESC_ALIGN)
            && avail.is_multiple_of(AVAIL_ALIGN)
            && used.is_multiple_of(USED_ALIGN);
        (size.is_power_of_two() && aligned).then_some(Self {
            size,
            desc,
            avail,
            used,
            last_avail: 0,
            used_idx: 0,
        })
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The descriptor table's IPA.
    pub fn desc_addr(&self) -> u64 {
        self.desc
    }

    /// The available (driver) ring's IPA.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// The used (device) ring's IPA.
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// The available ring index of the next chain the device will take.
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// The used ring index the device will write next (what used.idx holds).
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    #[cfg(test)]
    pub(super) fn set_indices(&mut self, last_avail: u16, used_idx: u16) {
        self.last_avail = last_avail;
        self.used_idx = used_idx;
    }

    fn slot(&self, idx: u16) -> u64 {
        u64::from(idx % self.size)
    }

    fn read_u16(mem: &impl GuestMemory, ipa: u64) -> Result<u16, QueueError> {
        let mut b = [0; 2];
        mem.read(ipa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// How many chains the driver has made available beyond the device's next index: whether
    /// there is a buffer to write into before popping one (an event queue's case).
    pub fn available(&self, mem: &impl GuestMemory) -> Result<u16, QueueError> {
        let avail_idx = Self::read_u16(mem, self.avail + RING_IDX)?;
        let n = avail_idx.wrapping_sub(self.last_avail);
        if n > self.size {
            return Err(QueueError::AvailOverrun {
                avail_idx,
                last_avail: self.last_avail,
            });
        }
        Ok(n)
    }

    /// Takes the next available chain, `None` when the driver has made none available. On an
    /// error the queue is unchanged (see the module's doc).
    pub fn pop(&mut self, mem: &impl GuestMemory) -> Result<Option<Chain>, QueueError> {
        if self.available(mem)? == 0 {
            return Ok(None);
        }
        // The driver writes the ring entry and descriptors before avail.idx, with a write
        // barrier between (spec 2.7.13.3.1); this pairs with it so they are not read stale.
        fence(Ordering::Acquire);
        let head = Self::read_u16(
            mem,
            self.avail + RING_START + 2 * self.slot(self.last_avail),
        )?;
        if head >= self.size {
            return Err(QueueError::BadHead(head));
        }
        let chain = self.walk(mem, head)?;
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    fn walk(&self, mem: &impl GuestMemory, head: u16) -> Result<Chain, QueueError> {
        let mut chain = Chain {
            head,
            ..Chain::default()
        };
        let (mut readable, mut writable) = (0u64, 0u64);
        let mut seen_write = false;
        let mut idx = head;
        // A chain of more descriptors than the table has revisits one: a loop, which the
        // driver MUST NOT make (spec 2.7.5.2).
        for _ in 0..self.size {
            let mut d = [0; DESC_SIZE as usize];
            mem.read(self.desc + DESC_SIZE * u64::from(idx), &mut d)?;
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(QueueError::BadBuffer { addr, len });
            }
            if flags & VIRTQ_DESC_F_WRITE != 0 {
                seen_write = true;
                writable += u64::from(len);
                if writable > MAX_CHAIN_BYTES {
                    return Err(QueueError::TooLong);
                }
                if len != 0 {
                    chain.writable.push((addr, len));
                }
            } else {
                // Checked on zero-length descriptors too: the order rule is on descriptors.
                if seen_write {
                    return Err(QueueError::ReadableAfterWritable);
                }
                readable += u64::from(len);
                if readable > MAX_CHAIN_BYTES {
                    return Err(QueueError::TooLong);
                }
                if len != 0 {
                    chain.readable.push((addr, len));
                }
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if next >= self.size {
                return Err(QueueError::BadNext(next));
            }
            idx = next;
        }
        Err(QueueError::Loop)
    }

    /// Puts chain `head` in the used ring with `len` bytes written into it, and publishes it
    /// (used.idx). The caller then raises the used-buffer interrupt if
    /// [`needs_interrupt`](Self::needs_interrupt) says so.
    pub fn push_used(
        &mut self,
        mem: &mut impl GuestMemory,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if head >= self.size {
            return Err(QueueError::BadHead(head));
        }
        let mut elem = [0; USED_ELEM_SIZE as usize];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        mem.write(
            self.used + RING_START + USED_ELEM_SIZE * self.slot(self.used_idx),
            &elem,
        )?;
        // The driver reads used.idx, then the entry, then the buffer (spec 2.7.8, 2.7.13): both
        // the data written into the buffers and this entry must be visible before the new index.
        fence(Ordering::Release);
        let next = self.used_idx.wrapping_add(1);
        mem.write(self.used + RING_IDX, &next.to_le_bytes())?;
        self.used_idx = next;
        Ok(())
    }

    /// Whether the driver wants a used-buffer interrupt now: not when it set
    /// VIRTQ_AVAIL_F_NO_INTERRUPT (a hint only, spec 2.7.7; VIRTIO_F_EVENT_IDX is never
    /// offered). An unreadable ring says yes: a spurious interrupt is harmless, a lost one is
    /// not.
    pub fn needs_interrupt(&self, mem: &impl GuestMemory) -> bool {
        // The used.idx store must be ordered before the flags load, else the device may read a
        // NO_INTERRUPT the driver has just cleared after seeing an old used.idx, and neither
        // side wakes the other (spec 2.7.7; Linux's `virtqueue_enable_cb` has the matching full
        // barrier).
        fence(Ordering::SeqCst);
        Self::read_u16(mem, self.avail).map_or(true, |f| f & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
    }
}

//! Test doubles: guest RAM as a buffer at a base IPA, and a device with two queues.

use super::{feature, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use alloc::vec;
use alloc::vec::Vec;
use smmu::vsmmu::{GuestMemError, GuestMemory};

/// Where [`FakeRam`] starts in the IPA space.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Its size.
pub const RAM_SIZE: usize = 0x10_0000;

/// Guest RAM: `RAM_SIZE` bytes at `RAM_BASE`, every access outside failing.
pub struct FakeRam(pub Vec<u8>);

impl FakeRam {
    pub fn new() -> Self {
        Self(vec![0; RAM_SIZE])
    }

    fn range(ipa: u64, len: usize) -> Result<core::ops::Range<usize>, GuestMemError> {
        let err = GuestMemError {
            ipa,
            len: len as u64,
        };
        let off = usize::try_from(ipa.checked_sub(RAM_BASE).ok_or(err)?).map_err(|_| err)?;
        let end = off.checked_add(len).ok_or(err)?;
        if end > RAM_SIZE {
            return Err(err);
        }
        Ok(off..end)
    }

    pub fn put(&mut self, ipa: u64, data: &[u8]) {
        self.write(ipa, data).unwrap();
    }

    pub fn put_u16(&mut self, ipa: u64, v: u16) {
        self.put(ipa, &v.to_le_bytes());
    }

    pub fn u16_at(&self, ipa: u64) -> u16 {
        let mut b = [0; 2];
        self.read(ipa, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    pub fn u32_at(&self, ipa: u64) -> u32 {
        let mut b = [0; 4];
        self.read(ipa, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    pub fn bytes(&self, ipa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.read(ipa, &mut b).unwrap();
        b
    }
}

impl GuestMemory for FakeRam {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        buf.copy_from_slice(&self.0[Self::range(ipa, buf.len())?]);
        Ok(())
    }

    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let r = Self::range(ipa, data.len())?;
        self.0[r].copy_from_slice(data);
        Ok(())
    }
}

/// Device features [`FakeDevice`] offers.
pub const FAKE_FEATURES: u64 = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_F_ACCESS_PLATFORM) | 1;

/// A device with ID 23, queues of 64 and 8 entries, and 8 bytes of config space, the first
/// 4 writable.
pub struct FakeDevice {
    pub config: [u8; 8],
    /// Config writes seen: (offset, size, value, features).
    pub writes: Vec<(u64, u8, u32, u64)>,
}

impl FakeDevice {
    pub fn new() -> Self {
        Self {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            writes: Vec::new(),
        }
    }
}

impl VirtioDevice for FakeDevice {
    fn device_id(&self) -> u32 {
        23
    }

    fn device_features(&self) -> u64 {
        FAKE_FEATURES
    }

    fn queue_max(&self, queue: u16) -> u16 {
        match queue {
            0 => 64,
            1 => 8,
            _ => 0,
        }
    }

    fn config_read(&self, off: u64, size: u8) -> u32 {
        let mut v = 0u32;
        for i in 0..u64::from(size) {
            let b = self.config.get((off + i) as usize).copied().unwrap_or(0);
            v |= u32::from(b) << (8 * i);
        }
        v
    }

    fn config_write(&mut self, off: u64, size: u8, value: u32, features: u64) {
        self.writes.push((off, size, value, features));
        for i in 0..u64::from(size) {
            if off + i < 4 {
                self.config[(off + i) as usize] = (value >> (8 * i)) as u8;
            }
        }
    }
}

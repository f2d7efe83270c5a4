//! Where a VM's kernel, device tree and initramfs go in its RAM (Linux's arm64 boot protocol,
//! Documentation/arch/arm64/booting.rst).

use crate::hw::Ipa;
use crate::platform::MemRange;

const MIB: u64 = 1 << 20;
/// Largest guest DT: one 2 MiB block.
pub const DTB_MAX: u64 = 2 * MIB;

/// Why the images cannot be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The kernel is not an arm64 Image.
    #[error("the kernel module is not an arm64 Image (bad magic)")]
    NotAnImage,
    /// The images do not fit.
    #[error("kernel, initramfs and DTB do not fit in {0:#x} bytes of RAM")]
    TooSmall(u64),
}

/// Where each image goes (IPAs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The kernel's first byte, also its entry point.
    pub entry: Ipa,
    /// The device tree (at most [`DTB_MAX`] bytes).
    pub dtb: Ipa,
    /// The initramfs, if any.
    pub initrd: Option<MemRange>,
}

/// Places an Image whose first 64 bytes are `header` (size `kernel_len`) and an initramfs of
/// `initrd_len` bytes in `ram`. The Image goes text_offset bytes above a 2 MiB-aligned base.
/// The DTB follows in the next 2 MiB block clear of the kernel's image_size (Linux maps it with
/// 2 MiB blocks: it must not share one with anything else), the initramfs in the block after it:
/// everything the guest is given sits low, as U-Boot's `booti` lays it out, so a guest that
/// limits its RAM with `mem=` still reaches its DTB and initramfs.
pub fn place(
    ram: MemRange,
    header: &[u8],
    kernel_len: u64,
    initrd_len: Option<u64>,
) -> Result<Placement, LayoutError> {
    if header.len() < 64 || &header[56..60] != b"ARM\x64" {
        return Err(LayoutError::NotAnImage);
    }
    let word = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
    let too_small = LayoutError::TooSmall(ram.size);
    let text_offset = word(8);
    let image_size = word(16).max(kernel_len);
    let entry = ram.base.checked_add(text_offset).ok_or(too_small)?;
    let dtb = entry
        .checked_add(image_size)
        .and_then(|e| e.checked_next_multiple_of(2 * MIB))
        .ok_or(too_small)?;
    let initrd = initrd_len.map(|size| MemRange {
        base: dtb + DTB_MAX,
        size,
    });
    let top = match initrd {
        Some(r) => r.base.checked_add(r.size).ok_or(too_small)?,
        None => dtb + DTB_MAX,
    };
    if top > ram.end() {
        return Err(too_small);
    }
    Ok(Placement {
        entry: Ipa(entry),
        dtb: Ipa(dtb),
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: MemRange = MemRange {
        base: 0x4000_0000,
        size: 0x4000_0000,
    };

    fn header(text_offset: u64, image_size: u64) -> [u8; 64] {
        let mut h = [0u8; 64];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn a_debian_kernel_is_laid_out_as_booti_does() {
        // Linux 6.12's header: text_offset 0, image_size covering BSS beyond the file.
        let p = place(RAM, &header(0, 0x2c9_0000), 0x260_0000, Some(0x80_0000)).unwrap();
        assert_eq!(p.entry, Ipa(RAM.base));
        assert_eq!(p.dtb, Ipa(0x42e0_0000), "next 2 MiB block after image_size");
        assert_eq!(
            p.initrd,
            Some(MemRange {
                base: 0x4300_0000,
                size: 0x80_0000
            })
        );
    }

    #[test]
    fn text_offset_and_a_file_larger_than_image_size_are_honoured() {
        let p = place(RAM, &header(0x8_0000, 0x1000), 0x30_0001, None).unwrap();
        assert_eq!(p.entry, Ipa(RAM.base + 0x8_0000));
        assert_eq!(p.dtb, Ipa(RAM.base + 0x40_0000));
        assert_eq!(p.initrd, None);
    }

    #[test]
    fn what_does_not_fit_or_is_not_an_image_is_refused() {
        let small = MemRange {
            base: RAM.base,
            size: 0x40_0000,
        };
        assert_eq!(
            place(small, &header(0, 0x20_0000), 0x20_0000, Some(1)),
            Err(LayoutError::TooSmall(0x40_0000))
        );
        assert_eq!(
            place(small, &header(0, 0x20_0000), 0x20_0000, None).map(|p| p.dtb),
            Ok(Ipa(RAM.base + 0x20_0000)),
            "exactly fits: kernel block + DTB block"
        );
        let mut bad = header(0, 0x1000);
        bad[56] = b'X';
        assert_eq!(place(RAM, &bad, 0x1000, None), Err(LayoutError::NotAnImage));
        assert_eq!(
            place(RAM, &[0; 16], 0x1000, None),
            Err(LayoutError::NotAnImage)
        );
        // A hostile header cannot wrap the arithmetic.
        assert_eq!(
            place(RAM, &header(u64::MAX - 4, 0x1000), 0x1000, None),
            Err(LayoutError::TooSmall(RAM.size))
        );
        assert_eq!(
            place(RAM, &header(0, u64::MAX), 0x1000, None),
            Err(LayoutError::TooSmall(RAM.size))
        );
    }
}

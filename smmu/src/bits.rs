//! Bit-field helpers for the packed SMMU structures. Fields are named by `hi..=lo` bit numbers as the
//! spec writes them (`[hi:lo]`), so every accessor reads like the table it comes from.

/// A mask of bits `lo..=hi` (inclusive, `hi < 64`).
pub(crate) const fn mask(hi: u32, lo: u32) -> u64 {
    let width = hi - lo + 1;
    if width >= 64 {
        u64::MAX
    } else {
        ((1u64 << width) - 1) << lo
    }
}

/// Extracts bits `[hi:lo]` of `word`, shifted down to bit 0.
pub(crate) const fn get(word: u64, hi: u32, lo: u32) -> u64 {
    (word & mask(hi, lo)) >> lo
}

/// Returns `word` with bits `[hi:lo]` replaced by `value` (excess high bits of `value` dropped).
pub(crate) const fn set(word: u64, hi: u32, lo: u32, value: u64) -> u64 {
    (word & !mask(hi, lo)) | ((value << lo) & mask(hi, lo))
}

/// Bit `bit` of `word`.
pub(crate) const fn bit(word: u64, bit: u32) -> bool {
    word & (1 << bit) != 0
}

/// Returns `word` with bit `bit` set to `value`.
pub(crate) const fn set_bit(word: u64, bit: u32, value: bool) -> u64 {
    if value {
        word | (1 << bit)
    } else {
        word & !(1 << bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_fields() {
        assert_eq!(mask(3, 1), 0b1110);
        assert_eq!(mask(63, 0), u64::MAX);
        assert_eq!(mask(63, 59), 0xf800_0000_0000_0000);
        assert_eq!(get(0xabcd, 11, 4), 0xbc);
        assert_eq!(set(0xffff, 11, 4, 0x1ff), 0xffff);
        assert_eq!(set(0xffff, 11, 4, 0), 0xf00f);
        assert!(bit(4, 2));
        assert_eq!(set_bit(0, 63, true), 1 << 63);
    }
}

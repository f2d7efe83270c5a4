//! Address types where addresses cross module boundaries: a physical address and a guest's
//! intermediate physical address (IPA) are different things, and mixing them up is exactly the
//! bug an isolation layer must not have (Hafnium `inc/hf/addr.h`, aarch64-paging's `PhysicalAddress`).

/// A physical address (what the CPU's and the SMMU's stage 2 output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(pub u64);

/// An intermediate physical address: a guest's view of its memory map (stage-2 input).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ipa(pub u64);

macro_rules! addr_ops {
    ($t:ident) => {
        impl $t {
            /// The raw value.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + off`, or `None` on overflow.
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// The offset of `self` from `base`, or `None` if `self` is below it.
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }
        }

        impl core::fmt::LowerHex for $t {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

addr_ops!(PhysAddr);
addr_ops!(Ipa);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Ipa(0x1000).checked_add(0x10), Some(Ipa(0x1010)));
        assert_eq!(Ipa(u64::MAX).checked_add(1), None);
        assert_eq!(PhysAddr(0x2000).offset_from(PhysAddr(0x1000)), Some(0x1000));
        assert_eq!(PhysAddr(0x1000).offset_from(PhysAddr(0x2000)), None);
        assert_eq!(alloc::format!("{:#x}", Ipa(0x40)), "0x40");
    }
}

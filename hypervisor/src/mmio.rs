//! Types shared by every emulated MMIO device.

/// Width of a trapped guest access, from ESR_EL2.ISS.SAS (Arm ARM D17.2.40).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessWidth {
    /// 8-bit access.
    Byte,
    /// 16-bit access.
    Half,
    /// 32-bit access.
    Word,
    /// 64-bit access.
    Double,
}

impl AccessWidth {
    /// Number of bytes moved by the access.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Byte => 1,
            Self::Half => 2,
            Self::Word => 4,
            Self::Double => 8,
        }
    }

    /// Decodes ESR_EL2.ISS.SAS.
    pub const fn from_sas(sas: u64) -> Self {
        match sas & 3 {
            0 => Self::Byte,
            1 => Self::Half,
            2 => Self::Word,
            _ => Self::Double,
        }
    }

    /// Mask of the bits the access moves.
    pub const fn mask(self) -> u64 {
        match self {
            Self::Double => u64::MAX,
            w => (1u64 << (w.bytes() * 8)) - 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_decoding_and_masks() {
        assert_eq!(AccessWidth::from_sas(0), AccessWidth::Byte);
        assert_eq!(AccessWidth::from_sas(3), AccessWidth::Double);
        assert_eq!(AccessWidth::Half.mask(), 0xffff);
        assert_eq!(AccessWidth::Word.bytes(), 4);
        assert_eq!(AccessWidth::Double.mask(), u64::MAX);
    }
}

//! ICH_LR<n>_EL2 list register encoding (Arm IHI 0069, 12.5.10).

/// State of a list register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrState {
    /// Free.
    Invalid,
    /// Pending.
    Pending,
    /// Active.
    Active,
    /// Active and pending.
    PendingActive,
}

/// One list register value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListRegister(pub u64);

const STATE_SHIFT: u32 = 62;
const HW: u64 = 1 << 61;
const GROUP1: u64 = 1 << 60;
const PRIORITY_SHIFT: u32 = 48;
const PINTID_SHIFT: u32 = 32;
/// For a software interrupt (HW=0), bit 41 asks for a maintenance interrupt when the guest
/// deactivates it (EOI), which is how level-triggered emulated lines get re-sampled.
const EOI: u64 = 1 << 41;

impl ListRegister {
    /// A pending virtual interrupt injected by software.
    pub fn software(vintid: u32, priority: u8, group1: bool, eoi_maintenance: bool) -> Self {
        let mut v = (1u64 << STATE_SHIFT) | ((priority as u64) << PRIORITY_SHIFT) | vintid as u64;
        if group1 {
            v |= GROUP1;
        }
        if eoi_maintenance {
            v |= EOI;
        }
        Self(v)
    }

    /// A pending virtual interrupt backed by physical `pintid`: the guest's deactivation
    /// deactivates the physical interrupt too.
    pub fn hardware(vintid: u32, pintid: u32, priority: u8, group1: bool) -> Self {
        let mut v = (1u64 << STATE_SHIFT)
            | HW
            | ((priority as u64) << PRIORITY_SHIFT)
            | (((pintid as u64) & 0x1fff) << PINTID_SHIFT)
            | vintid as u64;
        if group1 {
            v |= GROUP1;
        }
        Self(v)
    }

    /// The state field.
    pub fn state(self) -> LrState {
        match self.0 >> STATE_SHIFT {
            0 => LrState::Invalid,
            1 => LrState::Pending,
            2 => LrState::Active,
            _ => LrState::PendingActive,
        }
    }

    /// The virtual INTID.
    pub fn vintid(self) -> u32 {
        (self.0 & 0xffff_ffff) as u32
    }

    /// Whether the entry is backed by a physical interrupt.
    pub fn is_hw(self) -> bool {
        self.0 & HW != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn software_entry_layout() {
        let lr = ListRegister::software(33, 0xa0, true, true);
        assert_eq!(lr.0, (1 << 62) | (1 << 60) | (0xa0 << 48) | (1 << 41) | 33);
        assert_eq!(lr.state(), LrState::Pending);
        assert_eq!(lr.vintid(), 33);
        assert!(!lr.is_hw());
    }

    #[test]
    fn hardware_entry_layout() {
        let lr = ListRegister::hardware(27, 27, 0x80, true);
        assert_eq!(
            lr.0,
            (1 << 62) | (1 << 61) | (1 << 60) | (0x80 << 48) | (27 << 32) | 27
        );
        assert!(lr.is_hw());
        assert_eq!(ListRegister(2 << 62 | 5).state(), LrState::Active);
        assert_eq!(ListRegister(0).state(), LrState::Invalid);
    }
}

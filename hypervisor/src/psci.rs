//! Guest-facing PSCI 1.1 (Arm DEN 0022) and SMCCC (DEN 0028) calls: decoding of the function ID
//! and arguments a guest passes in x0-x3, and the return codes.

use smccc::arch::{SMCCC_ARCH_FEATURES, SMCCC_VERSION};
use smccc::psci::{
    PSCI_AFFINITY_INFO_32, PSCI_AFFINITY_INFO_64, PSCI_CPU_OFF, PSCI_CPU_ON_32, PSCI_CPU_ON_64,
    PSCI_CPU_SUSPEND_32, PSCI_CPU_SUSPEND_64, PSCI_FEATURES, PSCI_MIGRATE_INFO_TYPE,
    PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET, PSCI_VERSION,
};

pub use smccc::psci::error::{
    ALREADY_ON, DENIED, INVALID_ADDRESS, INVALID_PARAMETERS, NOT_SUPPORTED, ON_PENDING,
};

/// PSCI version the hypervisor implements: 1.1.
pub const VERSION_1_1: u64 = (1 << 16) | 1;
/// SMCCC version the hypervisor implements: 1.1 (needed for SMCCC_ARCH_FEATURES).
pub const SMCCC_VERSION_1_1: u64 = (1 << 16) | 1;
/// MIGRATE_INFO_TYPE: no Trusted OS that needs migration.
pub const MIGRATE_NOT_REQUIRED: u64 = 2;
/// AFFINITY_INFO results.
pub const AFFINITY_ON: u64 = 0;
/// AFFINITY_INFO: the CPU is off.
pub const AFFINITY_OFF: u64 = 1;
/// AFFINITY_INFO: CPU_ON was called and the CPU has not started yet.
pub const AFFINITY_ON_PENDING: u64 = 2;

/// A call a guest made with HVC (or SMC, which the hypervisor traps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// PSCI_VERSION.
    Version,
    /// PSCI_FEATURES for a function ID.
    Features(u32),
    /// CPU_SUSPEND: treated as a standby (WFI-like) state.
    CpuSuspend,
    /// CPU_OFF.
    CpuOff,
    /// CPU_ON.
    CpuOn {
        /// MPIDR of the target vCPU.
        target: u64,
        /// Entry point IPA.
        entry: u64,
        /// Value for the target's x0.
        context: u64,
    },
    /// AFFINITY_INFO at level 0.
    AffinityInfo {
        /// MPIDR of the vCPU asked about.
        target: u64,
        /// Lowest affinity level; only 0 is supported.
        level: u64,
    },
    /// MIGRATE_INFO_TYPE.
    MigrateInfoType,
    /// SYSTEM_OFF: stop this VM.
    SystemOff,
    /// SYSTEM_RESET: reboot this VM.
    SystemReset,
    /// SMCCC_VERSION.
    SmcccVersion,
    /// SMCCC_ARCH_FEATURES for a function ID.
    SmcccArchFeatures(u32),
    /// Anything else: answered NOT_SUPPORTED.
    Unknown(u32),
}

impl Call {
    /// Decodes x0-x3 of an SMCCC call. 32-bit calls only use the low 32 bits of arguments.
    pub fn decode(x: [u64; 4]) -> Self {
        let fid = x[0] as u32;
        let is32 = fid & (1 << 30) == 0;
        let arg = |i: usize| if is32 { x[i] & 0xffff_ffff } else { x[i] };
        match fid {
            PSCI_VERSION => Self::Version,
            PSCI_FEATURES => Self::Features(x[1] as u32),
            PSCI_CPU_SUSPEND_32 | PSCI_CPU_SUSPEND_64 => Self::CpuSuspend,
            PSCI_CPU_OFF => Self::CpuOff,
            PSCI_CPU_ON_32 | PSCI_CPU_ON_64 => Self::CpuOn {
                target: arg(1),
                entry: arg(2),
                context: arg(3),
            },
            PSCI_AFFINITY_INFO_32 | PSCI_AFFINITY_INFO_64 => Self::AffinityInfo {
                target: arg(1),
                level: arg(2),
            },
            PSCI_MIGRATE_INFO_TYPE => Self::MigrateInfoType,
            PSCI_SYSTEM_OFF => Self::SystemOff,
            PSCI_SYSTEM_RESET => Self::SystemReset,
            SMCCC_VERSION => Self::SmcccVersion,
            SMCCC_ARCH_FEATURES => Self::SmcccArchFeatures(x[1] as u32),
            other => Self::Unknown(other),
        }
    }

    /// Whether PSCI_FEATURES should report `fid` as implemented.
    pub fn is_implemented(fid: u32) -> bool {
        !matches!(Self::decode([fid as u64, 0, 0, 0]), Self::Unknown(_))
    }
}

/// Encodes a negative PSCI/SMCCC status as the 64-bit x0 value.
pub const fn status(code: i32) -> u64 {
    code as i64 as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_cpu_on_64_and_32() {
        assert_eq!(
            Call::decode([0xC400_0003, 0x1, 0x4020_0000, 7]),
            Call::CpuOn {
                target: 1,
                entry: 0x4020_0000,
                context: 7
            }
        );
        assert_eq!(
            Call::decode([0x8400_0003, 0xffff_ffff_0000_0001, 0x1_4020_0000, 0]),
            Call::CpuOn {
                target: 1,
                entry: 0x4020_0000,
                context: 0
            }
        );
    }

    #[test]
    fn decodes_system_calls_and_unknowns() {
        assert_eq!(Call::decode([0x8400_0008, 0, 0, 0]), Call::SystemOff);
        assert_eq!(Call::decode([0x8400_0009, 0, 0, 0]), Call::SystemReset);
        assert_eq!(Call::decode([0x8000_0000, 0, 0, 0]), Call::SmcccVersion);
        assert_eq!(Call::decode([0x8400_0000, 0, 0, 0]), Call::Version);
        assert_eq!(
            Call::decode([0xC600_0000, 0, 0, 0]),
            Call::Unknown(0xC600_0000)
        );
        // Only the low 32 bits of x0 are the function ID.
        assert_eq!(
            Call::decode([0xdead_0000_8400_0008, 0, 0, 0]),
            Call::SystemOff
        );
    }

    #[test]
    fn features_reports_what_is_implemented() {
        assert!(Call::is_implemented(PSCI_CPU_ON_64));
        assert!(Call::is_implemented(PSCI_SYSTEM_RESET));
        assert!(Call::is_implemented(SMCCC_ARCH_FEATURES));
        assert!(!Call::is_implemented(0x8400_000E)); // SYSTEM_SUSPEND
    }

    #[test]
    fn status_codes_are_sign_extended() {
        assert_eq!(status(NOT_SUPPORTED), u64::MAX);
        assert_eq!(status(ALREADY_ON), (-4i64) as u64);
    }
}

//! Guest-facing PSCI 1.1 (Arm DEN 0022) and SMCCC (DEN 0028) calls: decoding of the function ID
//! and arguments a guest passes in x0-x3, what each call means for the VM's vCPUs ([`handle`]),
//! and the return codes.

use super::lifecycle::{CpuOnError, Lifecycle, Power};
use super::VcpuSlot;
use crate::hw::{Hw, Ipa};
use crate::platform::MemRange;

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
        entry: Ipa,
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
                entry: Ipa(arg(2)),
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

/// What the calling vCPU's CPU does after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Return this value in x0 and resume the guest.
    Return(u64),
    /// CPU_SUSPEND: wait like a WFI unless an interrupt is pending, then return 0.
    Suspend,
    /// CPU_OFF: the vCPU is off (its state already says so); its CPU waits for a CPU_ON.
    CpuOff,
    /// SYSTEM_OFF: stop the VM.
    SystemOff,
    /// SYSTEM_RESET: reboot the VM alone.
    SystemReset,
}

/// A VM's vCPUs as PSCI sees them.
#[derive(Debug, Clone, Copy)]
pub struct Vcpus<'a> {
    /// The VM's name, for the log.
    pub vm: &'a str,
    /// Its vCPUs.
    pub slots: &'a [VcpuSlot],
    /// Its lifecycle (CPU_ON is denied unless it runs).
    pub life: &'a Lifecycle,
    /// Its RAM: a CPU_ON entry point must be inside.
    pub ram: MemRange,
}

impl Vcpus<'_> {
    /// The vCPU index with the given MPIDR (affinity fields only).
    pub fn by_mpidr(&self, mpidr: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|v| v.mpidr == mpidr & 0xff_00ff_ffff)
    }
}

/// Carries out `call` from vCPU `caller`: the state changes it makes (CPU_ON, CPU_OFF), the
/// vCPU it wakes, and what the caller does next.
pub fn handle(call: Call, vcpus: &Vcpus<'_>, caller: usize, hw: &impl Hw) -> Outcome {
    let ret = match call {
        Call::Version => VERSION_1_1,
        Call::SmcccVersion => SMCCC_VERSION_1_1,
        Call::Features(fid) => {
            if Call::is_implemented(fid) {
                0
            } else {
                status(NOT_SUPPORTED)
            }
        }
        Call::SmcccArchFeatures(_) => status(NOT_SUPPORTED),
        Call::MigrateInfoType => MIGRATE_NOT_REQUIRED,
        Call::CpuSuspend => return Outcome::Suspend,
        Call::CpuOn {
            target,
            entry,
            context,
        } => cpu_on(vcpus, target, entry, context, hw),
        Call::AffinityInfo { target, level } => {
            if level != 0 {
                status(INVALID_PARAMETERS)
            } else {
                match vcpus.by_mpidr(target) {
                    None => status(INVALID_PARAMETERS),
                    Some(t) => match vcpus.slots[t].power.get() {
                        Power::On => AFFINITY_ON,
                        Power::Off => AFFINITY_OFF,
                        Power::OnPending { .. } | Power::Boot => AFFINITY_ON_PENDING,
                    },
                }
            }
        }
        Call::CpuOff => {
            log::info!("{}: vcpu{caller} CPU_OFF", vcpus.vm);
            if let Some(slot) = vcpus.slots.get(caller) {
                slot.power.set(Power::Off);
            }
            return Outcome::CpuOff;
        }
        Call::SystemOff => {
            log::info!("{}: PSCI SYSTEM_OFF from vcpu{caller}", vcpus.vm);
            return Outcome::SystemOff;
        }
        Call::SystemReset => {
            log::info!("{}: PSCI SYSTEM_RESET from vcpu{caller}", vcpus.vm);
            return Outcome::SystemReset;
        }
        Call::Unknown(fid) => {
            log::debug!("{}: unknown SMCCC function {fid:#x}", vcpus.vm);
            status(NOT_SUPPORTED)
        }
    };
    Outcome::Return(ret)
}

fn cpu_on(vcpus: &Vcpus<'_>, target: u64, entry: Ipa, context: u64, hw: &impl Hw) -> u64 {
    let Some(t) = vcpus.by_mpidr(target) else {
        return status(INVALID_PARAMETERS);
    };
    if entry
        .offset_from(Ipa(vcpus.ram.base))
        .is_none_or(|off| off >= vcpus.ram.size)
    {
        return status(INVALID_ADDRESS);
    }
    match vcpus.slots[t].power.cpu_on(vcpus.life, entry, context) {
        Ok(()) => {
            // Its CPU waits in WFI: a kick wakes it.
            hw.kick(vcpus.slots[t].pcpu);
            0
        }
        Err(CpuOnError::AlreadyOn) => status(ALREADY_ON),
        Err(CpuOnError::OnPending) => status(ON_PENDING),
        // The VM is resetting (this vCPU has not parked yet) or stopping.
        Err(CpuOnError::Denied) => status(DENIED),
    }
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
                entry: Ipa(0x4020_0000),
                context: 7
            }
        );
        assert_eq!(
            Call::decode([0x8400_0003, 0xffff_ffff_0000_0001, 0x1_4020_0000, 0]),
            Call::CpuOn {
                target: 1,
                entry: Ipa(0x4020_0000),
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

    mod semantics {
        use super::super::*;
        use crate::hw::fake::{FakeHw, HwOp};
        use crate::vm::lifecycle::VcpuPower;

        fn slots() -> alloc::vec::Vec<VcpuSlot> {
            (0..3)
                .map(|i| VcpuSlot {
                    pcpu: 4 + i,
                    mpidr: i as u64,
                    power: VcpuPower::new(),
                    profile: Default::default(),
                })
                .collect()
        }

        const RAM: MemRange = MemRange {
            base: 0x4000_0000,
            size: 0x1000_0000,
        };

        fn view<'a>(slots: &'a [VcpuSlot], life: &'a Lifecycle) -> Vcpus<'a> {
            Vcpus {
                vm: "vm0",
                slots,
                life,
                ram: RAM,
            }
        }

        #[test]
        fn cpu_on_starts_an_off_vcpu_once_and_wakes_its_cpu() {
            let (s, life, hw) = (slots(), Lifecycle::new(), FakeHw::new(4, 4));
            s[0].power.set(Power::On);
            let v = view(&s, &life);
            let on = Call::CpuOn {
                target: 2,
                entry: Ipa(0x4008_0000),
                context: 9,
            };
            assert_eq!(handle(on, &v, 0, &hw), Outcome::Return(0));
            assert_eq!(hw.take_ops(), [HwOp::Kick(6)]);
            assert_eq!(
                s[2].power.get(),
                Power::OnPending {
                    entry: Ipa(0x4008_0000),
                    context: 9,
                    generation: life.generation()
                }
            );
            let info = Call::AffinityInfo {
                target: 2,
                level: 0,
            };
            assert_eq!(
                handle(info, &v, 0, &hw),
                Outcome::Return(AFFINITY_ON_PENDING)
            );
            assert_eq!(handle(on, &v, 0, &hw), Outcome::Return(status(ON_PENDING)));
            assert_eq!(s[2].power.take_entry(&life), Some((Ipa(0x4008_0000), 9)));
            assert_eq!(handle(on, &v, 0, &hw), Outcome::Return(status(ALREADY_ON)));
            assert_eq!(handle(info, &v, 0, &hw), Outcome::Return(AFFINITY_ON));
            assert!(hw.take_ops().is_empty(), "refusals wake nobody");
        }

        #[test]
        fn cpu_on_refuses_bad_targets_entries_and_a_vm_that_is_resetting() {
            let (s, life, hw) = (slots(), Lifecycle::new(), FakeHw::new(4, 4));
            let v = view(&s, &life);
            let call = |target, entry| Call::CpuOn {
                target,
                entry,
                context: 0,
            };
            assert_eq!(
                handle(call(7, Ipa(0x4000_0000)), &v, 0, &hw),
                Outcome::Return(status(INVALID_PARAMETERS))
            );
            assert_eq!(
                handle(call(1, Ipa(0x3fff_f000)), &v, 0, &hw),
                Outcome::Return(status(INVALID_ADDRESS))
            );
            assert_eq!(
                handle(call(1, Ipa(RAM.end())), &v, 0, &hw),
                Outcome::Return(status(INVALID_ADDRESS))
            );
            assert!(life.begin_reset());
            assert_eq!(
                handle(call(1, Ipa(0x4000_0000)), &v, 0, &hw),
                Outcome::Return(status(DENIED))
            );
            assert_eq!(s[1].power.get(), Power::Off);
            assert!(hw.take_ops().is_empty());
        }

        #[test]
        fn affinity_info_answers_level_0_only() {
            let (s, life, hw) = (slots(), Lifecycle::new(), FakeHw::new(4, 4));
            let v = view(&s, &life);
            assert_eq!(
                handle(
                    Call::AffinityInfo {
                        target: 1,
                        level: 0
                    },
                    &v,
                    0,
                    &hw
                ),
                Outcome::Return(AFFINITY_OFF)
            );
            assert_eq!(
                handle(
                    Call::AffinityInfo {
                        target: 1,
                        level: 1
                    },
                    &v,
                    0,
                    &hw
                ),
                Outcome::Return(status(INVALID_PARAMETERS))
            );
            assert_eq!(
                handle(
                    Call::AffinityInfo {
                        target: 0x100,
                        level: 0
                    },
                    &v,
                    0,
                    &hw
                ),
                Outcome::Return(status(INVALID_PARAMETERS))
            );
        }

        #[test]
        fn power_calls_tell_the_caller_what_to_do() {
            let (s, life, hw) = (slots(), Lifecycle::new(), FakeHw::new(4, 4));
            s[1].power.set(Power::On);
            let v = view(&s, &life);
            assert_eq!(handle(Call::CpuOff, &v, 1, &hw), Outcome::CpuOff);
            assert_eq!(s[1].power.get(), Power::Off);
            assert_eq!(handle(Call::SystemOff, &v, 0, &hw), Outcome::SystemOff);
            assert_eq!(handle(Call::SystemReset, &v, 0, &hw), Outcome::SystemReset);
            assert_eq!(handle(Call::CpuSuspend, &v, 0, &hw), Outcome::Suspend);
            assert_eq!(
                handle(Call::Version, &v, 0, &hw),
                Outcome::Return(VERSION_1_1)
            );
            assert_eq!(
                handle(Call::Features(PSCI_CPU_ON_64), &v, 0, &hw),
                Outcome::Return(0)
            );
            assert_eq!(
                handle(Call::Features(0x8400_000E), &v, 0, &hw),
                Outcome::Return(status(NOT_SUPPORTED))
            );
            assert_eq!(
                handle(Call::Unknown(0xC600_0000), &v, 0, &hw),
                Outcome::Return(status(NOT_SUPPORTED))
            );
            assert_eq!(
                handle(Call::MigrateInfoType, &v, 0, &hw),
                Outcome::Return(MIGRATE_NOT_REQUIRED)
            );
        }
    }
}

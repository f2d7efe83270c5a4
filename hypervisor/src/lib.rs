//! The EL2 hypervisor. Everything that is plain logic (device models, decoders, table builders,
//! device-tree handling) lives in modules that build and test on the host; code that touches
//! system registers or physical devices lives under `arch`, built only for `aarch64-unknown-none`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod config;
pub mod console;
pub mod esr;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_harness;
pub mod guest_dt;
pub mod idregs;
pub mod lr;
pub mod memory;
pub mod mmio;
pub mod pci;
pub mod platform;
pub mod psci;
pub mod ratelimit;
pub mod stage2;
pub mod vgic;
pub mod vm;
pub mod vpl011;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod arch;

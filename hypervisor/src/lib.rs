//! The EL2 hypervisor, in layers (docs/design.md):
//! - `arch`: what only runs on the machine — entry points, trap decode, the run loop, the
//!   physical drivers, and all `unsafe`. Built only for `aarch64-unknown-none-softfloat` (no
//!   FP/SIMD instruction at EL2: the guest's FP state stays in the registers across traps).
//! - [`hw`]: the port through which everything else reaches the machine (faked in host tests).
//! - [`vm`]: the VM control plane as plain Rust — power states and PSCI, lifecycle, the MMIO
//!   bus, BAR remapping, list-register scheduling, image placement.
//! - [`devices`]: the virtual devices, each given guest RAM and an interrupt port, never the VM.
//! - [`its`]: the physical GICv3 ITS driver and LPI allocation, generic over its registers and
//!   memory (`arch/its.rs` gives it the machine's).
//! - What the machine is: [`platform`] (its DT), [`config`] (the VMs asked for), [`pci`] (the
//!   physical PCI topology, resources and IOMMU groups), [`stage2`], [`guest_dt`].
//!
//! Every module but `arch` is `unsafe`-free, which the compiler checks (`deny(unsafe_code)`).
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod config;
pub mod console;
pub mod devices;
pub mod esr;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_harness;
pub mod guest_dt;
pub mod hw;
pub mod idregs;
pub mod its;
pub mod memory;
pub mod mmio;
pub mod monitor;
pub mod pci;
pub mod platform;
pub mod profile;
pub mod ratelimit;
pub mod stage2;
pub mod vm;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[allow(unsafe_code)]
pub mod arch;

//! SMMUv3 (Arm IHI 0070) support for the hypervisor: register and in-memory structure definitions,
//! the physical driver, and the guest-facing vSMMU model. Hardware and guest memory are reached only
//! through small traits so that all of it is testable on the host.
//!
//! Nothing here yet: the single-guest boot (issue 2) does not use the SMMU. PCI assignment and the
//! physical driver land with issue 4, the vSMMU with issue 5.
#![no_std]
#![forbid(unsafe_code)]

//! The VM control plane as plain, host-tested Rust (DESIGN.md section 2): what the run loop,
//! PSCI and the virtual ECAM decide about a VM, without touching the machine. `arch/` carries the
//! decisions out (stage-2 changes, TLB invalidation, entering vCPUs).

pub mod bars;
pub mod lifecycle;

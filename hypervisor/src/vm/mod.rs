//! The VM control plane as plain, host-tested Rust (DESIGN.md section 2): what the run loop and
//! PSCI decide about a VM's life, without touching the machine.

pub mod lifecycle;

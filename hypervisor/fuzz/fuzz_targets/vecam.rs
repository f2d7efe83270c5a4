//! The hostile-guest fuzz target of the virtual ECAM config space, over a recording fake
//! configuration space: every input is a sequence of operations checked against the model's
//! invariants by `hypervisor::fuzz_harness::vecam::run_with` (docs/fuzzing.md).
//!
//! `VECAM_CHECKS` picks the checks of the PCI isolation rules (`pm,af,ea,bar`, `all`, the default,
//! or `none` for code without them).
#![no_main]

use std::sync::OnceLock;

use hypervisor::fuzz_harness::vecam::{run_with, Checks};
use libfuzzer_sys::fuzz_target;

static CHECKS: OnceLock<Checks> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let checks = *CHECKS.get_or_init(|| {
        std::env::var("VECAM_CHECKS")
            .map(|s| Checks::parse(&s))
            .unwrap_or(Checks::ALL)
    });
    run_with(data, checks);
});

//! The hostile-guest fuzz target of the virtual GICv3 distributor and redistributors, with
//! simulated list registers: every input is a sequence of operations checked against the model's
//! invariants by `hypervisor::fuzz_harness::vgic::run_with` (docs/fuzzing.md).
//!
//! `VGIC_CHECKS=spi` switches on the check that an SPI is in flight on one vCPU at most.
#![no_main]

use std::sync::OnceLock;

use hypervisor::fuzz_harness::vgic::{run_with, Checks};
use libfuzzer_sys::fuzz_target;

static CHECKS: OnceLock<Checks> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let checks = *CHECKS.get_or_init(|| Checks {
        spi_single_pe: std::env::var("VGIC_CHECKS").is_ok_and(|s| s.contains("spi")),
    });
    run_with(data, checks);
});

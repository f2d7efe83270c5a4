//! The hostile-guest fuzz target of the virtual GICv3 distributor and redistributors, with
//! simulated list registers: every input is a sequence of operations checked against the model's
//! invariants by `hypervisor::fuzz_harness::vgic::run` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzz_harness::vgic::run(data);
});

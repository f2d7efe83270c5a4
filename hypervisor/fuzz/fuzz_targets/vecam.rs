//! The hostile-guest fuzz target of the virtual ECAM config space, over a recording fake
//! configuration space: every input is a sequence of operations checked against the model's
//! invariants by `hypervisor::fuzz_harness::vecam::run` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzz_harness::vecam::run(data);
});

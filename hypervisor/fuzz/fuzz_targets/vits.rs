//! The hostile-guest fuzz target of the virtual ITS model (issue 15): every input is a
//! sequence of register accesses, queued commands and physical failures checked against the
//! model's invariants by `hypervisor::fuzz_harness::vits::run` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzz_harness::vits::run(data);
});

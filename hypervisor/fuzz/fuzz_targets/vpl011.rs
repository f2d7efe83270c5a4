//! The hostile-guest fuzz target of the virtual PL011, the console input path into it and the
//! console output mux: every input is a sequence of operations checked against the model's
//! invariants by `hypervisor::fuzz_harness::vpl011::run` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzz_harness::vpl011::run(data);
});

//! The hostile-guest fuzz target of the vSMMU: every input is a sequence of guest operations
//! checked against the model's security invariants by `smmu::vsmmu::harness::run`
//! (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smmu::vsmmu::harness::run(data);
});

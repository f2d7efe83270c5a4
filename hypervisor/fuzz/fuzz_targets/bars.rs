//! The hostile-guest fuzz target of the BAR-move path: a guest placing its BARs anywhere, and
//! what `vm::bars` maps for it in its stage 2, checked by `hypervisor::fuzz_harness::bars::run`
//! (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzz_harness::bars::run(data);
});

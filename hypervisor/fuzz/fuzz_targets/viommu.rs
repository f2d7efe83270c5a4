//! The hostile-guest fuzz target of a VM's virtio-iommu (issue 16): every input is a sequence
//! of register accesses, descriptor chains of requests, event buffers, forwarded physical
//! events, resets and physical failures checked against the device's invariants by
//! `hypervisor::fuzz_harness::viommu::run` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hypervisor::fuzz_harness::viommu::run(data);
});

//! The untrusted host DT: every input is a blob handed to `Platform::parse` (with the validator
//! `check_blob` in front of the `fdt` crate), `HostBridge::from_dtb` and `parse_vm_specs`, and
//! `hypervisor::fuzz_harness::host_dt::run` checks that each returns and what it returns is
//! well-formed (docs/fuzzing.md). Seed it with the DTB fixtures of `hypervisor/tests/data/` and
//! `hypervisor/tests/dtbs/`.
#![no_main]

use hypervisor::fuzz_harness::host_dt::run;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data));

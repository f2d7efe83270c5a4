//! The hypervisor image. Everything lives in the library; this only links it with `boot`.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(target_os = "none")]
use hypervisor as _;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "the hypervisor runs only on aarch64-unknown-none-softfloat: build it with qemu/build.sh"
    );
    std::process::exit(1);
}

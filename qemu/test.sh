#!/usr/bin/env bash
# The test command (and CI's): host set-up, formatting, clippy on host and
# aarch64-unknown-none-softfloat, host unit tests, the hypervisor build and its no-FP/SIMD check,
# then the QEMU integration tests. Stops at the first failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=aarch64-unknown-none-softfloat
# Integration tests boot QEMU; they run in their own step, after the build.
IT_CRATE=integration-tests

STEP=""
say() { printf '[test] %s\n' "$*" >&2; }
step() {
    STEP="$1"
    printf '\n[test] ==> %s\n' "$STEP" >&2
}
on_exit() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        printf '\n[test] FAILED at step: %s (exit %s)\n' "${STEP:-start}" "$rc" >&2
    fi
}
trap on_exit EXIT

cd "$ROOT"

step "host set-up: qemu/setup.sh"
qemu/setup.sh

step "formatting: cargo fmt --all --check"
cargo fmt --all --check

step "clippy (host): cargo clippy --workspace --exclude $IT_CRATE --all-targets -- -D warnings"
cargo clippy --workspace --exclude "$IT_CRATE" --all-targets -- -D warnings

step "clippy (integration tests): cargo clippy -p $IT_CRATE --all-targets -- -D warnings"
cargo clippy -p "$IT_CRATE" --all-targets -- -D warnings

step "clippy ($TARGET): cargo clippy -p hypervisor -p boot -p smmu-hv-smmuv3 --target $TARGET -- -D warnings"
cargo clippy -p hypervisor -p boot -p smmu-hv-smmuv3 --target "$TARGET" -- -D warnings

step "host unit tests: cargo test --workspace --exclude $IT_CRATE"
cargo test --workspace --exclude "$IT_CRATE"

step "loom model checks (lock-free command queue, split vSMMU trap): qemu/loom.sh"
say "every interleaving within preemption bound 2: about 2 min on 2 cores with the build"
qemu/loom.sh

step "Miri (undefined behaviour) over a subset of the unit tests: qemu/miri.sh"
say "installs the pinned nightly with miri and rust-src once (about 700 MB on disk), then about 6 min on 2 cores"
qemu/miri.sh

step "hypervisor image: qemu/build.sh"
qemu/build.sh

step "no FP/SIMD instruction at EL2 but the fresh entry's zeroing: qemu/check-no-fp.sh"
say "the traps do not save the guest's FP/SIMD registers: nothing else may touch them"
qemu/check-no-fp.sh

step "cargo run, the default boot's entry point: cargo run -- --pci --show-dts"
# The DT the default boot would use, without booting it: the path cannot rot unseen.
vms="$(cargo run -q -- --pci --show-dts | grep -c 'compatible = "smmu-hv,vm"')" || true
[ "$vms" = 2 ] || { say "cargo run -- --pci --show-dts printed $vms VM nodes, not 2"; exit 1; }

step "modular guest kernel (IOMMU drivers as modules): qemu/kernel.sh"
say "built from linux-source-6.12 once per content (about 5 min on 2 cores), then cached in ~/.cache/smmu-hv"
qemu/kernel.sh

step "QEMU integration tests: cargo test -p $IT_CRATE -- --test-threads=1 --nocapture"
say "each QEMU boot has a wall-clock limit; consoles are logged to target/qemu-logs/"
cargo test -p "$IT_CRATE" -- --test-threads=1 --nocapture

STEP=""
printf '\n[test] all steps passed\n' >&2

#!/usr/bin/env bash
# Miri (the undefined-behaviour checker) over host unit tests, on a pinned nightly (the project
# itself stays on the stable toolchain of rust-toolchain.toml).
#
#   qemu/miri.sh          the CI subset, ~6 min on 2 cores: all of smmu (89 tests, ~2 min), and the
#                         hypervisor's memory placement, stage 2, ESR/ID-register decoding, PCI
#                         topology, device models and VM logic (~4 min incl. ~50 s Miri start-up)
#   qemu/miri.sh --full   every test of smmu and hypervisor. NOT feasible in CI: smmu takes ~2 min,
#                         but the hypervisor's 510 take many hours (its corrupted-blob, corpus and
#                         fuzz-harness loops run ~2000x slower than natively); each part is cut
#                         off after MIRI_FULL_TIMEOUT seconds (default 2400).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# rustc 1.101.0-nightly (92b5b8c87 2026-10-29)
NIGHTLY=nightly-2026-10-30
# cargo miri builds under $CARGO_TARGET_DIR/miri (default target/miri): the normal build cache stays.

say() { printf '[miri] %s\n' "$*" >&2; }

FULL=0
case "${1:-}" in
    --full) FULL=1 ;;
    "") ;;
    *)
        echo "usage: $0 [--full]" >&2
        exit 2
        ;;
esac

cd "$ROOT"

if ! rustup run "$NIGHTLY" cargo miri --version >/dev/null 2>&1 ||
    ! rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src'; then
    say "installing toolchain $NIGHTLY (profile minimal) with components miri and rust-src"
    rustup toolchain install "$NIGHTLY" --profile minimal --component miri,rust-src
else
    say "toolchain $NIGHTLY with miri and rust-src already installed"
fi
say "$(rustc +"$NIGHTLY" -V)"

say "cargo +$NIGHTLY miri setup"
cargo +"$NIGHTLY" miri setup

# run LIMIT NAME CMD...: runs CMD under a timeout, saying how long it took.
run() {
    local limit=$1 name=$2 t0 rc=0
    shift 2
    say "$name: $* (timeout ${limit}s)"
    t0=$SECONDS
    timeout "$limit" "$@" || rc=$?
    say "$name: $((SECONDS - t0)) s, exit $rc"
    return "$rc"
}

if [ "$FULL" = 1 ]; then
    limit="${MIRI_FULL_TIMEOUT:-2400}"
    run "$limit" "smmu (all)" cargo +"$NIGHTLY" miri test -p smmu-hv-smmuv3
    run "$limit" "hypervisor (all)" cargo +"$NIGHTLY" miri test -p hypervisor --lib
    say "all passed"
    exit 0
fi

# smmu: everything (the command queue, its multi-threaded stress test, queue/STE/command
# encodings, the driver, the vSMMU model and its fuzz harness' tests).
run 600 "smmu" cargo +"$NIGHTLY" miri test -p smmu-hv-smmuv3

# hypervisor: one invocation (Miri's start-up on this crate is ~50 s), filtered by module path.
# Left out: the exhaustive/corpus/fuzz-harness loops (hours under Miri), the ITS driver's tests
# (its::tests, ~150 s: fake-RAM table zeroing) and one PCI isolation sweep (~120 s).
HV_FILTERS=(
    memory:: stage2:: hw:: mmio:: esr:: idregs:: ratelimit::
    its::cmd its::regs its::lpi
    vm::lr vm::psci vm::layout vm::bars vm::its
    pci::groups pci::enumerate pci::resources pci::isolation pci::virtio
    devices::vpl011 devices::vsmmu devices::console devices::vecam devices::vits devices::vgic
)
HV_SKIPS=(
    fuzz_harness
    every_memory_bar_has_pages_of_its_own
    lpis_are_never_handed_out_twice
    never_panics_on_any_access
    never_panics_on_any_offset
    arbitrary_offsets_and_widths_never_panic
    the_event_cap_bounds_the_state
)
skip_args=()
for s in "${HV_SKIPS[@]}"; do skip_args+=(--skip "$s"); done
run 600 "hypervisor (subset)" cargo +"$NIGHTLY" miri test -p hypervisor --lib -- \
    "${HV_FILTERS[@]}" "${skip_args[@]}"

say "all passed"

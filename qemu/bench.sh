#!/usr/bin/env bash
# The benchmark (not part of qemu/test.sh): what the hypervisor costs a Linux guest, against the
# same guest kernel bare on the same QEMU, measured side by side in one run. Sets up the host
# (qemu/setup.sh), builds the hypervisor (qemu/build.sh) and the modular guest (qemu/kernel.sh,
# minutes the first time), then runs the `bench` binary of the integration-tests crate
# (tests/src/bin/bench/), which boots bare / vSMMU / stage-2-only setups N times each, runs
# tests/guest/bench.sh's workloads in them and prints a table. Arguments go to it:
#
#   qemu/bench.sh [--repeats N] [--out FILE] [--setups LIST] [--no-net] [--dma-seconds S] [--quick]
#
# e.g. `qemu/bench.sh --out docs/benchmarks/$(date +%F).md`; `qemu/bench.sh --help` for all.
# It takes 6 to 8 minutes on 2 cores with the default 3 repeats, after the builds. Each QEMU run is under a
# wall-clock limit; their console logs are in $CARGO_TARGET_DIR (or target/)/qemu-logs/bench-*.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

bench() {
    # The command line as typed, for the report; relative paths (--out) from where it was typed.
    BENCH_COMMAND="qemu/bench.sh$(printf ' %q' "$@")"
    BENCH_CWD="$PWD"
    export BENCH_COMMAND BENCH_CWD
    cd "$ROOT"
    exec cargo run --quiet --release -p integration-tests --bin bench -- "$@"
}

for arg in "$@"; do
    case "$arg" in -h | --help) bench --help ;; esac
done

say "host set-up (qemu/setup.sh)"
"$ROOT/qemu/setup.sh" || die "qemu/setup.sh failed"
say "building the hypervisor (qemu/build.sh)"
"$ROOT/qemu/build.sh" || die "qemu/build.sh failed"
say "building the modular guest (qemu/kernel.sh)"
"$ROOT/qemu/kernel.sh" || die "qemu/kernel.sh failed"
bench "$@"

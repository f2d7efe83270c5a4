#!/usr/bin/env bash
# The benchmark (not part of qemu/test.sh): what the hypervisor costs a Linux guest, against the
# same guest kernel bare on the same QEMU, measured side by side in one run. Sets up the host
# (qemu/setup.sh), builds the hypervisor (qemu/build.sh) and the modular guest (qemu/kernel.sh,
# minutes the first time), then runs the `bench` binary of the integration-tests crate
# (tests/src/bin/bench/), which boots each setup N times, runs tests/guest/bench.sh's workloads
# in them and prints a table. The setups (--setups names): bare (QEMU's SMMUv3), vsmmu, s2
# (stage 2 only), vsmmu-intx, vsmmu-v4, viommu (the hypervisor's virtio-iommu), bare-viommu
# (QEMU's virtio-iommu-pci, no SMMU) and net (two VMs); with a virtio-iommu setup the report
# also says which IOMMU to pick. Arguments go to it:
#
#   qemu/bench.sh [--repeats N] [--out FILE] [--setups LIST] [--no-net] [--dma-seconds S] [--quick]
#
# e.g. `qemu/bench.sh --setups bare,vsmmu,viommu,bare-viommu --repeats 2 --out
# docs/benchmarks/$(date +%F).md`; `qemu/bench.sh --help` for all. On 2 cores a boot takes
# about 30 s bare and 50 s under the hypervisor (--quick: 15 and 40 s): that run (8 boots)
# about 6 minutes, the default (all 7 setups and the two-VM pairs, 3 repeats: 27 boots) about
# 20, after the builds. Each QEMU run is under a wall-clock limit; their console logs are in
# $CARGO_TARGET_DIR (or target/)/qemu-logs/bench-*.log.
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

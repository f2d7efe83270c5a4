#!/usr/bin/env bash
# The loom model checks of the lock-free physical command queue and of the vSMMU's split trap
# (smmu/tests/loom_*.rs, docs/assurance.md): every interleaving of a few threads within a
# preemption bound. The test command runs them with bound 2 (LOOM_MAX_PREEMPTIONS, default 2);
# `qemu/loom.sh --full` with bound 3, the documented full run, about 17 min (the 3-producer
# model stays at 2, which it caps itself: at 3 it had not finished after 26 min).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '[loom] %s\n' "$*" >&2; }

BOUND="${LOOM_MAX_PREEMPTIONS:-2}"
LIMIT=900
if [ "${1:-}" = --full ]; then
    BOUND=3
    LIMIT=7200
elif [ -n "${1:-}" ]; then
    say "usage: qemu/loom.sh [--full]"
    exit 2
fi

cd "$ROOT"
# A target directory of its own: --cfg loom changes every crate's build, which must not
# invalidate the normal one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/loom"
export RUSTFLAGS="--cfg loom"
export LOOM_MAX_PREEMPTIONS="$BOUND"
say "model checks with preemption bound $BOUND (limit ${LIMIT} s per test binary), target dir $CARGO_TARGET_DIR"
for t in loom_cmdq loom_vsmmu; do
    start=$(date +%s)
    say "cargo test -p smmu-hv-smmuv3 --release --test $t"
    timeout "$LIMIT" cargo test -p smmu-hv-smmuv3 --release --test "$t" -- --test-threads=1 --nocapture
    say "$t: $(($(date +%s) - start)) s"
done

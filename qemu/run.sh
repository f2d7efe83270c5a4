#!/usr/bin/env bash
# The main command: sets up the host (idempotent), builds the hypervisor, and boots it on QEMU's
# `virt` board with two stock Linux guests (vm0, vm1), the console attached to this terminal.
# Extra arguments go to qemu/board-virt.sh (e.g. --vms 1, --vm-bootargs 1 "...", --bare, or --uboot
# for the U-Boot board path: U-Boot as the firmware, the commands of docs/vm-config.md typed at its
# prompt; see its --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '[run] %s\n' "$*" >&2; }
die() { printf '[run] error: %s\n' "$*" >&2; exit 1; }

bare=0
for arg in "$@"; do
    [ "$arg" = -- ] && break
    [ "$arg" = --bare ] && bare=1
done

say "host set-up (qemu/setup.sh)"
"$ROOT/qemu/setup.sh" || die "qemu/setup.sh failed"
if [ "$bare" = 1 ]; then
    say "--bare: the guest boots without the hypervisor; not building it"
else
    say "building the hypervisor (qemu/build.sh)"
    "$ROOT/qemu/build.sh" || die "qemu/build.sh failed"
fi
# The default machine: two VMs, each with its own virtio disk and NIC behind the SMMU.
if [ "$#" = 0 ]; then
    set -- --pci
fi
say "booting on QEMU virt; to quit QEMU press Ctrl-a then x; Ctrl-\\ then 0/1 picks the VM that gets input, Ctrl-\\ : opens the monitor (help lists its commands)"
exec "$ROOT/qemu/board-virt.sh" "$@"

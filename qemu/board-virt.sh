#!/usr/bin/env bash
# Board file for QEMU's `virt` machine: builds the QEMU command line and execs it.
# The guest modules' load addresses are facts of this board and live only here; the hypervisor
# finds the modules from /chosen in the device tree QEMU passes it.
#
#   qemu/board-virt.sh [--bootargs STR] [--guest DIR] [--bare] [--smp N] [--mem SIZE]
#                      [--dumpdtb FILE] [-- QEMU_ARGS...]
#
#   --bootargs STR   guest kernel command line (default: "console=ttyAMA0 rdinit=/init")
#   --guest DIR      guest images: DIR/Image, DIR/initramfs.cpio.gz (default: build/guest/stock)
#   --bare           boot the guest kernel directly on QEMU, no hypervisor (for comparisons)
#   --smp N          CPUs (default 4)
#   --mem SIZE       RAM (default 4G)
#   --dumpdtb FILE   write the DTB QEMU would pass to FILE and exit
#   -- QEMU_ARGS     appended to the QEMU command line as they are (e.g. -s -S for gdb)
#
# It does not build anything: run qemu/setup.sh and qemu/build.sh first (qemu/run.sh does all three).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '[board-virt] %s\n' "$*" >&2; }
die() { printf '[board-virt] error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# Load addresses of the guest modules (QEMU's guest-loader puts them in /chosen).
GUEST_KERNEL_ADDR=0x4a000000
GUEST_INITRD_ADDR=0x50000000

BOOTARGS="console=ttyAMA0 rdinit=/init"
GUEST="$ROOT/build/guest/stock"
BARE=0
SMP=4
MEM=4G
DUMPDTB=""
EXTRA=()

need_arg() { [ "$#" -ge 2 ] || die "$1 needs a value (see --help)"; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --bootargs) need_arg "$@"; BOOTARGS="$2"; shift 2 ;;
        --guest) need_arg "$@"; GUEST="$2"; shift 2 ;;
        --bare) BARE=1; shift ;;
        --smp) need_arg "$@"; SMP="$2"; shift 2 ;;
        --mem) need_arg "$@"; MEM="$2"; shift 2 ;;
        --dumpdtb) need_arg "$@"; DUMPDTB="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ "$SMP" =~ ^[1-9][0-9]*$ ]] || die "--smp wants a positive number, got '$SMP'"
command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 not found: run qemu/setup.sh"

GUEST_IMAGE="$GUEST/Image"
GUEST_INITRD="$GUEST/initramfs.cpio.gz"
HV_IMAGE="$ROOT/build/hypervisor.bin"
[ -f "$GUEST_IMAGE" ] || die "no guest kernel at $GUEST_IMAGE: run qemu/setup.sh"
[ -f "$GUEST_INITRD" ] || die "no guest initramfs at $GUEST_INITRD: run qemu/setup.sh"

# QEMU's option parser splits -device properties at commas; a literal comma is written twice.
qemu_escape() { printf '%s' "${1//,/,,}"; }

if [ "$BARE" = 1 ]; then
    MACHINE="virt,gic-version=3"
else
    MACHINE="virt,virtualization=on,gic-version=3"
fi
[ -n "$DUMPDTB" ] && MACHINE="$MACHINE,dumpdtb=$(qemu_escape "$DUMPDTB")"

# SVE and SME off: the hypervisor saves only the guest's V registers (its own Rust code uses
# them), so it traps the wider Z/ZA state; a CPU without them is what guests then see.
CMD=(qemu-system-aarch64
    -M "$MACHINE"
    -cpu max,sve=off,sme=off
    -smp "$SMP"
    -m "$MEM"
    -nographic
    -no-reboot)

if [ "$BARE" = 1 ]; then
    CMD+=(-kernel "$GUEST_IMAGE" -initrd "$GUEST_INITRD" -append "$BOOTARGS")
else
    [ -f "$HV_IMAGE" ] || die "no hypervisor image at $HV_IMAGE: run qemu/build.sh"
    CMD+=(-kernel "$HV_IMAGE"
        -device "guest-loader,addr=$GUEST_KERNEL_ADDR,kernel=$(qemu_escape "$GUEST_IMAGE"),bootargs=$(qemu_escape "$BOOTARGS")"
        -device "guest-loader,addr=$GUEST_INITRD_ADDR,initrd=$(qemu_escape "$GUEST_INITRD")")
fi
CMD+=("${EXTRA[@]}")

say "$(if [ "$BARE" = 1 ]; then echo "bare guest, no hypervisor"; else echo "hypervisor"; fi): ${CMD[*]}"
exec "${CMD[@]}"

#!/usr/bin/env bash
# Builds the hypervisor (cargo rebuilds only what is stale) and turns its ELF into a raw,
# bootable arm64 `Image` (the ELF starts with the 64-byte Linux Image header):
#   build/hypervisor.elf   the ELF, with symbols, for gdb and addr2line
#   build/hypervisor.bin   the raw image QEMU boots with -kernel
# objcopy is LLVM's, from rustup's llvm-tools component (rust-toolchain.toml): the same on every
# host (amd64 or arm64), pinned with the compiler, no apt package. cargo-binutils' `rust-objcopy`
# runs this same binary; it is called directly here rather than installing that crate for a name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Softfloat: the compiler emits no FP/SIMD instruction, so the trap path leaves the guest's FP/SIMD
# registers in place (docs/design.md, section 6; qemu/check-no-fp.sh checks the ELF).
TARGET=aarch64-unknown-none-softfloat
BUILD="$ROOT/build"

say() { printf '[build] %s\n' "$*" >&2; }
die() { printf '[build] error: %s\n' "$*" >&2; exit 1; }

# llvm-objcopy of the pinned toolchain (run from $ROOT, so that rust-toolchain.toml picks it):
# $(rustc --print sysroot)/lib/rustlib/HOST/bin/llvm-objcopy. Adds the llvm-tools component if
# the toolchain lacks it (a toolchain installed before rust-toolchain.toml listed it).
ensure_objcopy() {
    local sysroot host
    sysroot="$(cd "$ROOT" && rustc --print sysroot)" || die "rustc failed: run qemu/setup.sh"
    host="$(cd "$ROOT" && rustc -vV | sed -n 's/^host: //p')"
    OBJCOPY="$sysroot/lib/rustlib/$host/bin/llvm-objcopy"
    [ -x "$OBJCOPY" ] && return 0
    say "rustup component add llvm-tools (for llvm-objcopy)"
    (cd "$ROOT" && rustup component add llvm-tools) || die "rustup component add llvm-tools failed"
    [ -x "$OBJCOPY" ] || die "no $OBJCOPY after adding llvm-tools"
}

# The target's standard library in the pinned toolchain: rustup installs the targets of
# rust-toolchain.toml with the toolchain, not into a toolchain installed before the file named
# them (as when the target changed from aarch64-unknown-none), so add it here as qemu/setup.sh would.
ensure_target() {
    local have
    have="$(cd "$ROOT" && rustup target list --installed 2>/dev/null)" || return 0
    grep -qx "$TARGET" <<<"$have" && return 0
    say "rustup target add $TARGET (the pinned toolchain lacks it)"
    (cd "$ROOT" && rustup target add "$TARGET") || die "rustup target add $TARGET failed"
}

main() {
    command -v cargo >/dev/null || die "cargo not found: run qemu/setup.sh (needs rustup)"
    ensure_objcopy
    ensure_target

    # The workspace's target/ unless the caller chose another one the usual cargo way.
    local target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
    case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac

    say "cargo build --release -p hypervisor --target $TARGET"
    (cd "$ROOT" && CARGO_TARGET_DIR="$target_dir" cargo build --release -p hypervisor --target "$TARGET") ||
        die "cargo build failed"

    local elf="$target_dir/$TARGET/release/hypervisor"
    [ -f "$elf" ] || die "no ELF at $elf after cargo build"
    mkdir -p "$BUILD"

    if [ ! -f "$BUILD/hypervisor.bin" ] || [ "$elf" -nt "$BUILD/hypervisor.bin" ] ||
        ! cmp -s "$elf" "$BUILD/hypervisor.elf"; then
        say "llvm-objcopy -O binary -> build/hypervisor.bin"
        cp "$elf" "$BUILD/hypervisor.elf.tmp"
        "$OBJCOPY" -O binary "$BUILD/hypervisor.elf.tmp" "$BUILD/hypervisor.bin.tmp" ||
            die "objcopy failed on $elf"
        mv "$BUILD/hypervisor.elf.tmp" "$BUILD/hypervisor.elf"
        mv "$BUILD/hypervisor.bin.tmp" "$BUILD/hypervisor.bin"
    else
        say "build/hypervisor.bin is up to date"
    fi

    local size
    size="$(stat -c %s "$BUILD/hypervisor.bin")"
    [ "$size" -gt 64 ] || die "build/hypervisor.bin is only $size bytes: the ELF has no loadable image"
    # Bytes 56..59 of an arm64 Image hold the magic "ARM\x64".
    if [ "$(dd if="$BUILD/hypervisor.bin" bs=1 skip=56 count=3 2>/dev/null)" != ARM ]; then
        say "warning: build/hypervisor.bin has no arm64 Image magic at offset 56 (QEMU will not boot it at EL2 as a kernel)"
    fi
    say "image: build/hypervisor.bin, $size bytes ($(( (size + 1023) / 1024 )) KiB); ELF: build/hypervisor.elf"
}

main "$@"

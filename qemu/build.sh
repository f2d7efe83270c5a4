#!/usr/bin/env bash
# Builds the hypervisor (cargo rebuilds only what is stale) and turns its ELF into a raw,
# bootable arm64 `Image` (the ELF starts with the 64-byte Linux Image header):
#   build/hypervisor.elf   the ELF, with symbols, for gdb and addr2line
#   build/hypervisor.bin   the raw image QEMU boots with -kernel
# Installs binutils-aarch64-linux-gnu (for objcopy) if it is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=aarch64-unknown-none
BUILD="$ROOT/build"

say() { printf '[build] %s\n' "$*" >&2; }
die() { printf '[build] error: %s\n' "$*" >&2; exit 1; }

# The objcopy that understands aarch64 ELF: the cross binutils on other hosts, the native one on arm64.
find_objcopy() {
    if command -v aarch64-linux-gnu-objcopy >/dev/null; then
        echo aarch64-linux-gnu-objcopy
    elif [ "$(uname -m)" = aarch64 ] && command -v objcopy >/dev/null; then
        echo objcopy
    fi
}

ensure_objcopy() {
    OBJCOPY="$(find_objcopy)"
    [ -n "$OBJCOPY" ] && return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "aarch64-linux-gnu-objcopy missing, not root and no sudo: install binutils-aarch64-linux-gnu"
        sudo="sudo"
    fi
    command -v apt-get >/dev/null || die "aarch64-linux-gnu-objcopy missing and no apt-get: install binutils-aarch64-linux-gnu"
    say "installing binutils-aarch64-linux-gnu (for aarch64-linux-gnu-objcopy)"
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils-aarch64-linux-gnu >/dev/null; then
        say "apt-get install failed; retrying after apt-get update"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils-aarch64-linux-gnu >/dev/null
    fi
    OBJCOPY="$(find_objcopy)"
    [ -n "$OBJCOPY" ] || die "aarch64-linux-gnu-objcopy still missing after installing binutils-aarch64-linux-gnu"
}

main() {
    command -v cargo >/dev/null || die "cargo not found: run qemu/setup.sh (needs rustup)"
    ensure_objcopy

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
        say "$OBJCOPY -O binary -> build/hypervisor.bin"
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

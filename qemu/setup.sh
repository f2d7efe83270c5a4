#!/usr/bin/env bash
# Idempotent host set-up for building and running the hypervisor under QEMU.
# Installs only what is missing; says what it does. Debian bookworm (amd64 or arm64) only.
# qemu/kernel.sh sources it for its helpers (apt, the cache, the guest initramfs): sourced, it
# defines them and does nothing else.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Guest images and kernels are cached by content outside the git tree.
CACHE="${HV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smmu-hv}"
BUILD="$ROOT/build"
KVER_GLOB='linux-image-6.12.*-arm64-unsigned'
# Debian's U-Boot for QEMU's virt board (package u-boot-qemu), firmware of the U-Boot board path.
UBOOT_BIN=/usr/lib/u-boot/qemu_arm64/u-boot.bin
# Kernel config symbol and module name of each driver the guest needs beyond the kernel's built-in
# ones: the virtio PCI transport and the virtio disk and NIC, Intel's e1000e NIC (QEMU's
# `-device e1000e`, a device users plug as it comes) and the NVMe driver (QEMU's `-device nvme`:
# a controller with a vector per queue, which the MSI test gives a VM). Those the kernel has as modules (=m) go into
# the initramfs with their dependencies; built-in ones (=y) need nothing.
GUEST_DRIVERS=(VIRTIO_PCI:virtio_pci VIRTIO_BLK:virtio_blk VIRTIO_NET:virtio_net E1000E:e1000e BLK_DEV_NVME:nvme)
# modinfo lives in /usr/sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install packages"
    SUDO="sudo"
fi

check_host() {
    [ -r /etc/os-release ] || die "unsupported host: no /etc/os-release (need Debian bookworm)"
    . /etc/os-release
    if [ "${ID:-}" != debian ] || [ "${VERSION_CODENAME:-}" != bookworm ]; then
        die "unsupported host: ${PRETTY_NAME:-unknown}; this project's set-up needs Debian 12 (bookworm)"
    fi
}

APT_UPDATED=0
NEED_UPDATE=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
}

ensure_backports() {
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "adding the bookworm-backports suite (QEMU >= 10 lives there)"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' |
            $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
        NEED_UPDATE=1
    fi
}

ensure_arm64_arch() {
    if ! dpkg --print-foreign-architectures | grep -qx arm64 &&
        [ "$(dpkg --print-architecture)" != arm64 ]; then
        say "dpkg --add-architecture arm64 (for the guest kernel and busybox packages)"
        $SUDO dpkg --add-architecture arm64
        NEED_UPDATE=1
    fi
}

qemu_ok() {
    command -v qemu-system-aarch64 >/dev/null || return 1
    local v
    v="$(qemu-system-aarch64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)"
    [ -n "$v" ] && [ "$v" -ge 10 ]
}

ensure_host_packages() {
    local missing=()
    command -v dtc >/dev/null || missing+=(device-tree-compiler)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v python3 >/dev/null || missing+=(python3)
    command -v xz >/dev/null || missing+=(xz-utils)
    command -v modinfo >/dev/null || missing+=(kmod)
    # The U-Boot board path (qemu/board-virt.sh --uboot, tests/tests/uboot.rs): Debian's U-Boot
    # for QEMU as firmware, and the FAT disk it loads the images from (qemu/uboot-disk.sh).
    [ -f "$UBOOT_BIN" ] || missing+=(u-boot-qemu)
    command -v mkfs.vfat >/dev/null || missing+=(dosfstools)
    command -v mcopy >/dev/null || missing+=(mtools)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_update
        say "installing ${missing[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! qemu_ok; then
        apt_update
        say "installing qemu-system-arm >= 10 from bookworm-backports"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
            qemu-system-arm >/dev/null
        qemu_ok || die "qemu-system-aarch64 >= 10 still missing after install"
    fi
}

ensure_rust() {
    command -v rustup >/dev/null || die "rustup not found: install Rust with rustup first"
    # rust-toolchain.toml pins the version and names the target; this installs both if missing.
    (cd "$ROOT" && rustup show active-toolchain >/dev/null 2>&1) || true
    if ! (cd "$ROOT" && rustup target list --installed | grep -qx aarch64-unknown-none); then
        say "rustup: adding target aarch64-unknown-none"
        (cd "$ROOT" && rustup target add aarch64-unknown-none)
    fi
}

# Fetch a Debian arm64 package into the cache once; print its path.
fetch_deb() {
    local pkg="$1" dir="$CACHE/debs"
    mkdir -p "$dir"
    local ver
    ver="$(apt-cache policy "$pkg" | sed -n 's/ *Candidate: //p')"
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "package $pkg not found in apt"
    local f
    f="$(ls "$dir/${pkg%%:*}_${ver//:/%3a}_"*.deb 2>/dev/null | head -1 || true)"
    if [ -z "$f" ]; then
        say "apt-get download $pkg ($ver)"
        (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null)
        f="$(ls "$dir/${pkg%%:*}_${ver//:/%3a}_"*.deb | head -1)"
    fi
    echo "$f"
}

guest_kernel_pkg() {
    # Newest 6.12 arm64 unsigned image in the archive (bookworm-backports).
    apt-cache search --names-only "^linux-image-6\.12\.[0-9]+\+deb[0-9]+-arm64-unsigned$" 2>/dev/null |
        awk '{print $1}' | sort -V | tail -1
}

# Copies into $3 (a directory) the module $1 of the kernel tree $2 (lib/modules/KVER) after its
# dependencies (modinfo's `depends`), each decompressed (busybox insmod loads plain .ko files),
# and appends each name, dependencies first, to $3/load-order. Each module once.
declare -A GUEST_MOD_DONE=()
add_guest_module() {
    local name="$1" tree="$2" dest="$3" f dep
    [ -z "${GUEST_MOD_DONE[$name]-}" ] || return 0
    GUEST_MOD_DONE[$name]=1
    # Module names use `_`; some files use `-`.
    f="$(find "$tree" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) | head -1)"
    [ -n "$f" ] || die "guest kernel: no module file for $name under ${tree##*/}"
    for dep in $(modinfo -F depends "$f" | tr ',' ' '); do
        add_guest_module "$dep" "$tree" "$dest"
    done
    case "$f" in
        *.ko.xz) xz -dc "$f" >"$dest/$name.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$dest/$name.ko" ;;
        *.ko) cp "$f" "$dest/$name.ko" ;;
        *) die "guest kernel: $f: unknown module compression" ;;
    esac
    echo "$name" >>"$dest/load-order"
}

# The initramfs's modules (see GUEST_DRIVERS) from the extracted kernel package $1, into $2.
guest_modules() {
    local k="$1" ir="$2" config tree d sym name val
    config="$(ls "$k"/boot/config-* | head -1)"
    tree="$(ls -d "$k"/lib/modules/*/ | head -1)"
    tree="${tree%/}"
    mkdir -p "$ir/lib/modules"
    : >"$ir/lib/modules/load-order"
    for d in "${GUEST_DRIVERS[@]}"; do
        sym="${d%%:*}"
        name="${d#*:}"
        val="$(sed -n "s/^CONFIG_$sym=//p" "$config")"
        case "$val" in
            y) say "guest kernel: CONFIG_$sym=y ($name built in)" ;;
            m) add_guest_module "$name" "$tree" "$ir/lib/modules" ;;
            *) die "guest kernel: CONFIG_$sym is '${val:-not set}' in ${config##*/}: the guest needs $name" ;;
        esac
    done
    say "guest modules (load order): $(tr '\n' ' ' <"$ir/lib/modules/load-order")"
}

# The guest initramfs $3 (gzipped cpio, written whole, then renamed) from the directory $1, which
# holds the modules already (lib/modules/, with the load-order the init follows): adds the
# directories busybox and the init use, busybox $2 as /bin/busybox and the project's init
# (tests/guest/init) as /init. Shared by the stock guest and qemu/kernel.sh's modular one.
pack_guest_initramfs() {
    local ir="$1" busybox="$2" out="$3"
    mkdir -p "$ir"/{bin,sbin,proc,sys,dev,tmp,etc,root,usr/bin,usr/sbin}
    cp "$busybox" "$ir/bin/busybox"
    cp "$ROOT/tests/guest/init" "$ir/init"
    chmod +x "$ir/init"
    (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -9 >"$out.tmp")
    mv "$out.tmp" "$out"
}

ensure_guest_images() {
    local gdir="$BUILD/guest"
    mkdir -p "$gdir"
    local kpkg
    kpkg="$(guest_kernel_pkg)"
    if [ -z "$kpkg" ]; then
        apt_update
        kpkg="$(guest_kernel_pkg)"
    fi
    [ -n "$kpkg" ] || die "no $KVER_GLOB package found (is bookworm-backports enabled?)"
    local kdeb bdeb
    kdeb="$(fetch_deb "$kpkg:arm64")"
    bdeb="$(fetch_deb busybox-static:arm64)"

    local key
    key="$({
        cat "$kdeb" "$bdeb" "$ROOT/tests/guest/init"
        echo "modules: ${GUEST_DRIVERS[*]}"
    } | sha256sum | cut -c1-16)"
    local out="$CACHE/guest-$key"
    if [ ! -f "$out/initramfs.cpio.gz" ] || [ ! -f "$out/Image" ] || [ ! -f "$out/modules" ]; then
        say "building guest images from $(basename "$kdeb") and $(basename "$bdeb")"
        local tmp
        tmp="$(mktemp -d)"
        dpkg-deb -x "$kdeb" "$tmp/k"
        dpkg-deb -x "$bdeb" "$tmp/b"
        mkdir -p "$out"
        local vmlinuz
        vmlinuz="$(ls "$tmp"/k/boot/vmlinuz-* | head -1)"
        # Debian ships the arm64 kernel gzip-compressed; QEMU -kernel and our loader want a raw Image.
        if gzip -t "$vmlinuz" 2>/dev/null; then
            gzip -dc "$vmlinuz" >"$out/Image.tmp"
        else
            cp "$vmlinuz" "$out/Image.tmp"
        fi
        mv "$out/Image.tmp" "$out/Image"
        basename "$vmlinuz" | sed 's/^vmlinuz-//' >"$out/kver"
        # initramfs: busybox + the project's init + the virtio modules (lib/modules/NAME.ko and
        # lib/modules/load-order, which the init follows).
        local ir="$tmp/initramfs"
        guest_modules "$tmp/k" "$ir"
        # The modules the guest loads, in order, for the tests to compare with (`guest: modules=`).
        cp "$ir/lib/modules/load-order" "$out/modules"
        pack_guest_initramfs "$ir" "$tmp/b/bin/busybox" "$out/initramfs.cpio.gz"
        rm -rf "$tmp"
    fi
    ln -sfn "$out" "$gdir/stock"
    say "guest images ready: $gdir/stock -> $out (kernel $(cat "$out/kver"))"
}

main() {
    check_host
    ensure_backports
    ensure_arm64_arch
    # A suite or architecture added just now needs fresh package lists.
    [ "$APT_UPDATED" = 0 ] && [ "$NEED_UPDATE" = 1 ] && apt_update
    ensure_host_packages
    ensure_rust
    ensure_guest_images
}

# Sourced (by qemu/kernel.sh): the functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi

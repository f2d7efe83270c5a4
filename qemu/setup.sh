#!/usr/bin/env bash
# Idempotent host set-up for building and running the hypervisor under QEMU.
# Installs only what is missing, after saying in one block what that is (nothing on a re-run).
# Debian 12 (bookworm) or 13 (trixie), amd64 or arm64; refuses other hosts.
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

# The supported hosts: Debian 12 (bookworm) and 13 (trixie), amd64 and arm64. check_host sets:
#   HOST_SUITE   bookworm | trixie
#   HOST_ARCH    amd64 | arm64 (dpkg's architecture, which the packages follow)
#   QEMU_SUITE   the suite QEMU >= 10 comes from: bookworm-backports on bookworm (bookworm's own is
#                7.2, without nested SMMU), empty on trixie (its own is 10.0)
#   CROSS        the prefix of the C tool chain that makes aarch64 code (qemu/kernel.sh: the guest
#                kernel and the guest programs): aarch64-linux-gnu- on amd64, none on arm64 (native)
#   CC_PKG       its package; LIBC_A, LIBC_A_PKG: its static C library (the guest programs are static)
check_host() {
    [ -r /etc/os-release ] || die "unsupported host: no /etc/os-release (need Debian 12 bookworm or 13 trixie, amd64 or arm64)"
    local ID="" VERSION_CODENAME="" PRETTY_NAME=""
    # shellcheck disable=SC1091 # the host's file
    . /etc/os-release
    case "${ID:-}/${VERSION_CODENAME:-}" in
        debian/bookworm | debian/trixie) HOST_SUITE="$VERSION_CODENAME" ;;
        *) die "unsupported host: ${PRETTY_NAME:-unknown}; this project's set-up supports Debian 12 (bookworm) and 13 (trixie), on amd64 or arm64" ;;
    esac
    HOST_ARCH="$(dpkg --print-architecture)"
    local m
    m="$(uname -m)"
    # shellcheck disable=SC2034 # CROSS, CC_PKG, LIBC_A, LIBC_A_PKG: qemu/kernel.sh's
    case "$HOST_ARCH/$m" in
        amd64/x86_64) CROSS=aarch64-linux-gnu- CC_PKG=gcc-aarch64-linux-gnu
            LIBC_A=/usr/aarch64-linux-gnu/lib/libc.a LIBC_A_PKG=libc6-dev-arm64-cross ;;
        arm64/aarch64) CROSS="" CC_PKG=gcc
            LIBC_A=/usr/lib/aarch64-linux-gnu/libc.a LIBC_A_PKG=libc6-dev ;;
        *) die "unsupported host: ${PRETTY_NAME:-Debian} with dpkg architecture $HOST_ARCH on a $m CPU; the set-up supports amd64 (x86_64) and arm64 (aarch64)" ;;
    esac
    QEMU_SUITE=""
    [ "$HOST_SUITE" = bookworm ] && QEMU_SUITE=bookworm-backports
    return 0
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

# Whether the host lacks the suite QEMU comes from (bookworm-backports on bookworm; none on trixie).
need_qemu_suite() {
    [ -n "$QEMU_SUITE" ] && ! grep -rqs "$QEMU_SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/
}

ensure_backports() {
    if need_qemu_suite; then
        say "adding the $QEMU_SUITE suite (QEMU >= 10 lives there)"
        echo "deb http://deb.debian.org/debian $QEMU_SUITE main" |
            $SUDO tee "/etc/apt/sources.list.d/$QEMU_SUITE.list" >/dev/null
        NEED_UPDATE=1
    fi
}

# Whether dpkg lacks the arm64 architecture the guest's packages are (never on an arm64 host).
need_arm64_arch() {
    [ "$(dpkg --print-architecture)" != arm64 ] &&
        ! dpkg --print-foreign-architectures | grep -qx arm64
}

ensure_arm64_arch() {
    if need_arm64_arch; then
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

# The host packages setup.sh installs that are missing (QEMU aside: qemu_ok), one a line.
missing_host_packages() {
    command -v dtc >/dev/null || echo device-tree-compiler
    command -v cpio >/dev/null || echo cpio
    command -v python3 >/dev/null || echo python3
    command -v xz >/dev/null || echo xz-utils
    command -v modinfo >/dev/null || echo kmod
    # The U-Boot board path (qemu/board-virt.sh --uboot, tests/tests/uboot.rs): Debian's U-Boot
    # for QEMU as firmware, and the FAT disk it loads the images from (qemu/uboot-disk.sh).
    [ -f "$UBOOT_BIN" ] || echo u-boot-qemu
    command -v mkfs.vfat >/dev/null || echo dosfstools
    command -v mcopy >/dev/null || echo mtools
}

ensure_host_packages() {
    local missing=()
    mapfile -t missing < <(missing_host_packages)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_update
        say "installing ${missing[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! qemu_ok; then
        apt_update
        local t=()
        [ -n "$QEMU_SUITE" ] && t=(-t "$QEMU_SUITE")
        say "installing qemu-system-arm >= 10${QEMU_SUITE:+ from $QEMU_SUITE}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${t[@]}" \
            qemu-system-arm >/dev/null
        qemu_ok || die "qemu-system-aarch64 >= 10 still missing after install"
    fi
}

# The pinned toolchain of rust-toolchain.toml: RUST_CHANNEL, RUST_COMPONENTS, RUST_TARGETS (arrays).
read_rust_toolchain() {
    local f="$ROOT/rust-toolchain.toml" list
    RUST_CHANNEL="$(sed -n 's/^channel *= *"\([^"]*\)".*/\1/p' "$f")"
    [ -n "$RUST_CHANNEL" ] || die "no channel in rust-toolchain.toml"
    list="$(sed -n 's/^components *= *\[\(.*\)\].*/\1/p' "$f" | tr -d '" ' | tr ',' ' ')"
    read -r -a RUST_COMPONENTS <<<"$list"
    list="$(sed -n 's/^targets *= *\[\(.*\)\].*/\1/p' "$f" | tr -d '" ' | tr ',' ' ')"
    read -r -a RUST_TARGETS <<<"$list"
}

# What rustup lacks of the pinned toolchain: RUST_NEED_TOOLCHAIN (0/1), RUST_NEED_COMPONENTS and
# RUST_NEED_TARGETS (arrays; all of them when the toolchain itself is missing).
missing_rust() {
    command -v rustup >/dev/null || die "rustup not found: install Rust with rustup first (https://rustup.rs)"
    read_rust_toolchain
    RUST_NEED_TOOLCHAIN=0 RUST_NEED_COMPONENTS=() RUST_NEED_TARGETS=()
    if ! grep -q "^$RUST_CHANNEL-" <<<"$(rustup toolchain list)"; then
        RUST_NEED_TOOLCHAIN=1
        RUST_NEED_COMPONENTS=("${RUST_COMPONENTS[@]}")
        RUST_NEED_TARGETS=("${RUST_TARGETS[@]}")
        return 0
    fi
    local have c
    have="$(rustup component list --installed --toolchain "$RUST_CHANNEL" 2>/dev/null || true)"
    for c in "${RUST_COMPONENTS[@]}"; do
        grep -q "^$c-" <<<"$have" || RUST_NEED_COMPONENTS+=("$c")
    done
    have="$(rustup target list --installed --toolchain "$RUST_CHANNEL" 2>/dev/null || true)"
    for c in "${RUST_TARGETS[@]}"; do
        grep -qx "$c" <<<"$have" || RUST_NEED_TARGETS+=("$c")
    done
}

ensure_rust() {
    missing_rust
    local args=() list
    if [ "$RUST_NEED_TOOLCHAIN" = 1 ]; then
        list="$(IFS=,; echo "${RUST_COMPONENTS[*]}")"
        [ -z "$list" ] || args+=(--component "$list")
        list="$(IFS=,; echo "${RUST_TARGETS[*]}")"
        [ -z "$list" ] || args+=(--target "$list")
        say "rustup: installing toolchain $RUST_CHANNEL (profile minimal, ${args[*]})"
        (cd "$ROOT" && rustup toolchain install "$RUST_CHANNEL" --profile minimal "${args[@]}")
        return 0
    fi
    if [ "${#RUST_NEED_COMPONENTS[@]}" -gt 0 ]; then
        say "rustup: adding components ${RUST_NEED_COMPONENTS[*]} to $RUST_CHANNEL"
        (cd "$ROOT" && rustup component add --toolchain "$RUST_CHANNEL" "${RUST_NEED_COMPONENTS[@]}")
    fi
    if [ "${#RUST_NEED_TARGETS[@]}" -gt 0 ]; then
        say "rustup: adding targets ${RUST_NEED_TARGETS[*]} to $RUST_CHANNEL"
        (cd "$ROOT" && rustup target add --toolchain "$RUST_CHANNEL" "${RUST_NEED_TARGETS[@]}")
    fi
}

# The cached .deb of the candidate version of the arm64 package $1 (print its path), or fail
# (no candidate in the package lists, or not downloaded yet). Changes nothing.
cached_deb() {
    local pkg="$1" dir="$CACHE/debs" ver f
    ver="$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/ *Candidate: //p')"
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || return 1
    f="$(ls "$dir/${pkg%%:*}_${ver//:/%3a}_"*.deb 2>/dev/null | head -1 || true)"
    [ -n "$f" ] || return 1
    echo "$f"
}

# Fetch a Debian arm64 package into the cache once; print its path.
fetch_deb() {
    local pkg="$1" dir="$CACHE/debs"
    mkdir -p "$dir"
    local ver
    ver="$(apt-cache policy "$pkg" | sed -n 's/ *Candidate: //p')"
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "package $pkg not found in apt"
    local f
    f="$(cached_deb "$pkg" || true)"
    if [ -z "$f" ]; then
        say "apt-get download $pkg ($ver)"
        (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null)
        f="$(ls "$dir/${pkg%%:*}_${ver//:/%3a}_"*.deb | head -1)"
    fi
    echo "$f"
}

guest_kernel_pkg() {
    # Newest 6.12 arm64 unsigned image in the archive: linux-image-6.12.N+debNN-arm64-unsigned
    # (bookworm: from linux-6.12 in bookworm-security, +deb12; trixie: its own kernel, +deb13).
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
    # lib/modules on bookworm; usr/lib/modules on trixie (its kernel packages follow merged /usr).
    tree="$(ls -d "$k"/lib/modules/*/ "$k"/usr/lib/modules/*/ 2>/dev/null | head -1 || true)"
    [ -n "$tree" ] || die "guest kernel: no lib/modules/KVER or usr/lib/modules/KVER in the package"
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

# The busybox binary of busybox-static's package extracted in $1: bin/busybox on bookworm,
# usr/bin/busybox on trixie (merged /usr).
busybox_in() {
    local f
    for f in "$1/bin/busybox" "$1/usr/bin/busybox"; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    die "no bin/busybox or usr/bin/busybox in busybox-static's package"
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

# The cache directory of the stock guest made from the kernel .deb $1 and busybox's .deb $2.
guest_dir() {
    local key
    key="$({
        cat "$1" "$2" "$ROOT/tests/guest/init"
        echo "modules: ${GUEST_DRIVERS[*]}"
    } | sha256sum | cut -c1-16)"
    echo "$CACHE/guest-$key"
}

guest_complete() {
    [ -f "$1/initramfs.cpio.gz" ] && [ -f "$1/Image" ] && [ -f "$1/modules" ] && [ -f "$1/kver" ]
}

# The stock guest's cache directory if it is complete for the packages apt offers now (print it),
# else fail. Downloads nothing, changes nothing.
cached_guest() {
    local kpkg kdeb bdeb out
    kpkg="$(guest_kernel_pkg)"
    [ -n "$kpkg" ] || return 1
    kdeb="$(cached_deb "$kpkg:arm64")" || return 1
    bdeb="$(cached_deb busybox-static:arm64)" || return 1
    out="$(guest_dir "$kdeb" "$bdeb")"
    guest_complete "$out" || return 1
    echo "$out"
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
    [ -n "$kpkg" ] || die "no $KVER_GLOB package in the $HOST_SUITE archive (apt-cache search finds none)"
    local kdeb bdeb
    kdeb="$(fetch_deb "$kpkg:arm64")"
    bdeb="$(fetch_deb busybox-static:arm64)"

    local out
    out="$(guest_dir "$kdeb" "$bdeb")"
    if ! guest_complete "$out"; then
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
        pack_guest_initramfs "$ir" "$(busybox_in "$tmp/b")" "$out/initramfs.cpio.gz"
        rm -rf "$tmp"
    fi
    ln -sfn "$out" "$gdir/stock"
    say "guest images ready: $gdir/stock -> $out (kernel $(cat "$out/kver"))"
}

# Says up front, in one block, what main is about to add to the system (apt suites, the dpkg
# architecture, packages, the Rust toolchain, the guest images in the cache) and roughly how long
# it takes; prints nothing and returns 1 when nothing is missing.
plan() {
    local lines=() secs=0 pkgs=() update=0 guest
    if need_qemu_suite; then
        lines+=("apt suite:        $QEMU_SUITE (deb http://deb.debian.org/debian $QEMU_SUITE main, in /etc/apt/sources.list.d/$QEMU_SUITE.list): QEMU >= 10")
        update=1
    fi
    if need_arm64_arch; then
        lines+=("dpkg arch:        arm64 (dpkg --add-architecture arm64): the guest's kernel and busybox are arm64 packages")
        update=1
    fi
    mapfile -t pkgs < <(missing_host_packages)
    qemu_ok || pkgs+=("qemu-system-arm${QEMU_SUITE:+ (from $QEMU_SUITE)}")
    if [ "${#pkgs[@]}" -gt 0 ]; then
        lines+=("apt packages:     ${pkgs[*]} (and what apt pulls in)")
        update=1
        secs=$((secs + 15 + 5 * ${#pkgs[@]}))
        qemu_ok || secs=$((secs + 45))
    fi
    missing_rust
    if [ "$RUST_NEED_TOOLCHAIN" = 1 ]; then
        lines+=("rustup toolchain: $RUST_CHANNEL, profile minimal, components ${RUST_COMPONENTS[*]}, targets ${RUST_TARGETS[*]} (about 800 MB in ~/.rustup)")
        secs=$((secs + 75))
    else
        [ "${#RUST_NEED_COMPONENTS[@]}" = 0 ] ||
            lines+=("rustup component: ${RUST_NEED_COMPONENTS[*]} for $RUST_CHANNEL")
        [ "${#RUST_NEED_TARGETS[@]}" = 0 ] ||
            lines+=("rustup target:    ${RUST_NEED_TARGETS[*]} for $RUST_CHANNEL")
        secs=$((secs + 20 * (${#RUST_NEED_COMPONENTS[@]} + ${#RUST_NEED_TARGETS[@]})))
    fi
    if ! guest="$(cached_guest)"; then
        lines+=("guest images:     the newest ${KVER_GLOB} and busybox-static (arm64 .debs, about 95 MB, kept in $CACHE/debs), unpacked into $CACHE/guest-KEY (about 45 MB); build/guest/stock links there")
        secs=$((secs + 40))
    fi
    [ "${#lines[@]}" -gt 0 ] || return 1
    [ "$update" = 1 ] && secs=$((secs + 20)) && lines=("apt-get update" "${lines[@]}")
    {
        printf '[setup] Debian %s %s host: will add\n' "$HOST_SUITE" "$HOST_ARCH"
        printf '[setup]   %s\n' "${lines[@]}"
        printf '[setup] roughly %s min on a fast mirror (mostly downloads; an emulated or slow host takes longer); a re-run then finds nothing to do\n' \
            "$(((secs + 59) / 60))"
    } >&2
}

main() {
    check_host
    if ! plan; then
        # Nothing to install; only the link into the cache, if this worktree lacks it.
        local guest
        guest="$(cached_guest)"
        mkdir -p "$BUILD/guest"
        ln -sfn "$guest" "$BUILD/guest/stock"
        say "nothing to install (Debian $HOST_SUITE $HOST_ARCH; guest: build/guest/stock -> $guest, kernel $(cat "$guest/kver"))"
        return 0
    fi
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

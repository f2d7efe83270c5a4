#!/usr/bin/env bash
# Idempotent build of the modular guest: a Linux kernel with its IOMMU drivers as modules
# (arm_smmu_v3, virtio_iommu), from Debian's linux-source-6.12 with gcc-aarch64-linux-gnu (an
# amd64 host's cross compiler; an arm64 host's own gcc) and the config fragment
# qemu/guest-kernel.config, and its initramfs (busybox and tests/guest/init, as the stock guest's,
# loading arm_smmu_v3 first), which also carries the benchmark's guest script (tests/guest/bench.sh
# as /bench.sh), the kernel's dma_map_benchmark user tool (from the same
# source, built statically: /bin/dma_map_benchmark), the noisy-neighbour test's attacker
# (tests/guest/attacker.c, built statically: /bin/hvattack), the hostile virtio-iommu guest
# (tests/guest/viommu_attack.c: /bin/hvviommu) and the FP/SIMD state check across traps
# (tests/guest/fpcheck.c: /bin/hvfpcheck). Publishes build/guest/modular (Image,
# initramfs.cpio.gz, kver, modules, config), a link into the cache, like build/guest/stock.
#
#   qemu/kernel.sh                  build what is missing (the kernel: 5 to 8 minutes on 2 cores), then link
#   qemu/kernel.sh --packages-only  install the host packages the build needs, then stop (a new
#                                   host's or CI image's check that the build has what it needs)
#
# Cached by content outside the git tree (~/.cache/smmu-hv or $HV_CACHE), in two levels:
#   kernel-KEY/          Image, kver, config, lib/modules/KVER/ (modules_install + depmod),
#                        build.log; KEY hashes linux-source-6.12's version, the config fragment,
#                        this script's functions that build and check the kernel and the
#                        (cross or native) compiler's and binutils' versions
#   guest-modular-GKEY/  what build/guest/modular links to; GKEY hashes KEY, busybox's .deb,
#                        tests/guest/init, tests/guest/bench.sh, the guest programs
#                        (tests/guest/*.c) and the initramfs packing code
#                        (so a changed init repacks the initramfs in seconds, without rebuilding
#                        the kernel)
# The kernel is built in a scratch directory under the cache, removed afterwards.
# Installs what it needs with apt when missing. Debian 12 (bookworm) or 13 (trixie), amd64 or arm64
# (qemu/setup.sh's check_host refuses other hosts).
set -euo pipefail

KROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The helpers of qemu/setup.sh: SUDO, apt_update, check_host (which sets HOST_SUITE and the tool
# chain: CROSS, CC_PKG, LIBC_A, LIBC_A_PKG), ensure_arm64_arch, fetch_deb, pack_guest_initramfs,
# CACHE, BUILD. Sourced, it runs nothing.
# shellcheck source=qemu/setup.sh
. "$KROOT/qemu/setup.sh"

say() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf '[kernel] error: %s\n' "$*" >&2; exit 1; }

SRC_PKG=linux-source-6.12
SRC_TARBALL=/usr/src/linux-source-6.12.tar.xz
FRAGMENT="$ROOT/qemu/guest-kernel.config"
# The modules the initramfs's init loads, in this order (each after the modules it depends on):
# the SMMU driver first, as early as possible, because endpoints wait for their IOMMU driver only
# 10 s after boot (then bind without one). Every other module is shipped, not loaded.
LOAD_MODULES=(arm_smmu_v3)

# Host packages the build needs: command (or file) -> package.
ensure_build_packages() {
    local missing=() c
    local -A need=(
        ["${CROSS}gcc"]="$CC_PKG" # the aarch64 compiler and binutils (cross on amd64, native on arm64)
        [gcc]=gcc                 # host programs (kconfig, fixdep, ...)
        [make]=make
        [bc]=bc
        [bison]=bison
        [flex]=flex
        [xz]=xz-utils     # the source tarball
        [depmod]=kmod     # modules.dep (modules_install), modinfo
        [cpio]=cpio       # the initramfs
    )
    for c in "${!need[@]}"; do
        command -v "$c" >/dev/null || missing+=("${need[$c]}")
    done
    [ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
    # The static C library of the guest's static programs (dma_map_benchmark, hvattack, hvviommu).
    [ -e "$LIBC_A" ] || missing+=("$LIBC_A_PKG")
    local have want
    have="$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null || true)"
    want="$(apt-cache policy "$SRC_PKG" | sed -n 's/ *Candidate: //p')"
    if [ -z "$want" ] || [ "$want" = "(none)" ]; then
        apt_update
        want="$(apt-cache policy "$SRC_PKG" | sed -n 's/ *Candidate: //p')"
    fi
    [ -n "$want" ] && [ "$want" != "(none)" ] ||
        die "no $SRC_PKG in apt (bookworm: it is in bookworm-security; trixie: in trixie itself; is that suite in the apt sources?)"
    # The newest in the archive (bookworm-security or trixie), as the stock guest's kernel image.
    [ "$have" = "$want" ] || missing+=("$SRC_PKG")
    # Each package once (an arm64 host's compiler is gcc, its static C library libc6-dev).
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_update
        say "installing ${missing[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    [ -f "$SRC_TARBALL" ] || die "$SRC_PKG is installed but $SRC_TARBALL is missing"
}

# Checks that every symbol the fragment sets ended up so in the .config $1 (Kconfig drops a
# value whose dependencies are unmet, silently); names each one that did not.
verify_config() {
    local config="$1" line sym want got bad=0
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym="${BASH_REMATCH[1]}"
            want="${BASH_REMATCH[2]}"
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym="${BASH_REMATCH[1]}"
            want="n"
        else
            continue
        fi
        got="$(sed -n "s/^$sym=//p" "$config")"
        # Absent or `# ... is not set`: n (a symbol whose dependencies are off is not written).
        [ -n "$got" ] || got=n
        if [ "$got" != "$want" ]; then
            printf '[kernel] error: %s is %s in the .config, but %s wants %s\n' \
                "$sym" "$got" "${FRAGMENT#"$ROOT"/}" "$want" >&2
            bad=1
        fi
    done <"$FRAGMENT"
    [ "$bad" = 0 ] || die "the kernel config is not what the fragment asks (an unmet 'depends on', or a 'select' from another symbol; see the symbol's Kconfig entry): fix qemu/guest-kernel.config"
    say "config checked: every symbol of ${FRAGMENT#"$ROOT"/} is as it asks ($(grep -c '=m$' "$config") modules)"
}

# The cache key of the kernel build: what the Image and modules are made from (the source, the
# tool chain, the fragment and the functions that build and check it), not the whole script, so
# that an edit to the guest's tools or initramfs does not rebuild the kernel.
kernel_key() {
    {
        echo "source: $SRC_PKG $(dpkg-query -W -f='${Version}' "$SRC_PKG")"
        echo "cc: $("${CROSS}gcc" --version | head -1)"
        echo "ld: $("${CROSS}ld" --version | head -1)"
        echo "fragment:"
        cat "$FRAGMENT"
        echo "build:"
        declare -f build_kernel verify_config
    } | sha256sum | cut -c1-16
}

# Builds the kernel into the cache directory $1 (made whole under a temporary name, then renamed).
build_kernel() {
    local out="$1" scratch src jobs log t0 tmp="$1.tmp.$$"
    jobs="$(nproc)"
    scratch="$(mktemp -d "$CACHE/kernel-build.XXXXXX")"
    # shellcheck disable=SC2064 # expanded now, on purpose
    trap "rm -rf '$scratch' '$tmp'" EXIT
    log="$scratch/build.log"
    t0="$(date +%s)"
    say "unpacking $SRC_TARBALL ($SRC_PKG $(dpkg-query -W -f='${Version}' "$SRC_PKG")) into ${scratch}"
    tar -xf "$SRC_TARBALL" -C "$scratch"
    src="$scratch/linux-source-6.12"
    [ -f "$src/Makefile" ] || die "$SRC_TARBALL has no linux-source-6.12/Makefile"
    # A fixed build user and host in the version string; LOCALVERSION (empty) keeps
    # setlocalversion from appending anything (the release is 6.12.N-smmu-hv).
    local mk=(make -C "$src" ARCH=arm64 CROSS_COMPILE="$CROSS" LOCALVERSION=
        KBUILD_BUILD_USER=smmu-hv KBUILD_BUILD_HOST=kernel.sh)
    say "configuring: allnoconfig + ${FRAGMENT#"$ROOT"/}, then olddefconfig"
    "${mk[@]}" -s KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >>"$log" 2>&1 ||
        { tail -30 "$log" >&2; die "make allnoconfig failed"; }
    "${mk[@]}" -s olddefconfig >>"$log" 2>&1 || { tail -30 "$log" >&2; die "make olddefconfig failed"; }
    verify_config "$src/.config"
    local kver
    kver="$("${mk[@]}" -s kernelrelease)"
    say "building Image and modules of $kver (make -j$jobs; takes minutes)"
    if ! "${mk[@]}" -j"$jobs" Image modules >>"$log" 2>&1; then
        tail -40 "$log" >&2
        cp "$log" "$CACHE/kernel-failed.log"
        die "the kernel build failed (last lines above; whole log: $CACHE/kernel-failed.log)"
    fi
    rm -rf "$tmp"
    mkdir -p "$tmp"
    "${mk[@]}" -s INSTALL_MOD_PATH="$tmp" INSTALL_MOD_STRIP=1 modules_install >>"$log" 2>&1 ||
        { tail -30 "$log" >&2; die "make modules_install failed"; }
    # Links back into the (soon removed) source tree are no use to anyone.
    rm -f "$tmp/lib/modules/$kver/build" "$tmp/lib/modules/$kver/source"
    [ -s "$tmp/lib/modules/$kver/modules.dep" ] || die "modules_install made no modules.dep (depmod)"
    cp "$src/arch/arm64/boot/Image" "$tmp/Image"
    cp "$src/.config" "$tmp/config"
    echo "$kver" >"$tmp/kver"
    local secs=$(($(date +%s) - t0))
    echo "unpacked, configured and built in ${secs} s with make -j$jobs" >>"$log"
    cp "$log" "$tmp/build.log"
    rm -rf "$out"
    mv "$tmp" "$out"
    rm -rf "$scratch"
    trap - EXIT
    secs=$(($(date +%s) - t0))
    say "kernel $kver built in $((secs / 60)) min $((secs % 60)) s (unpack, config, make -j$jobs, clean-up): $out"
}

# Module name (as lsmod and the load-order name it) of the .ko file $1.
mod_name() {
    local n="${1##*/}"
    n="${n%.ko}"
    echo "${n//-/_}"
}

# Appends the module $1 to load-order of the staged lib/modules $2, after the modules it depends
# on (modinfo's `depends`), each once.
declare -A LOAD_DONE=()
add_load_order() {
    local name="$1" mods="$2" dep
    [ -z "${LOAD_DONE[$name]-}" ] || return 0
    LOAD_DONE[$name]=1
    [ -e "$mods/$name.ko" ] || die "no module $name in the modular kernel (is it =m in the fragment?)"
    for dep in $(modinfo -F depends "$mods/$name.ko" | tr ',' ' '); do
        add_load_order "$dep" "$mods"
    done
    echo "$name" >>"$mods/load-order"
}

# The user tool of the kernel's DMA map benchmark (CONFIG_DMA_MAP_BENCHMARK), from the kernel's
# source package: tools/testing/selftests/dma/dma_map_benchmark.c, built statically for the guest
# as $2 in the scratch directory $1. Its Makefile adds the tree's include/ for
# <linux/map_benchmark.h> (after usr/include, the installed uapi headers, which the tarball does
# not have); only that header is taken here, so that the rest (<linux/types.h>) is the cross C
# library's uapi headers.
build_dma_map_benchmark() {
    local scratch="$1" out="$2" src=linux-source-6.12
    local tool=tools/testing/selftests/dma/dma_map_benchmark.c hdr=include/linux/map_benchmark.h
    mkdir -p "$scratch/inc/linux"
    tar -xf "$SRC_TARBALL" -C "$scratch" "$src/$tool" "$src/$hdr" ||
        die "no $tool or $hdr in $SRC_TARBALL"
    cp "$scratch/$src/$hdr" "$scratch/inc/linux/"
    "${CROSS}gcc" -static -O2 -Wall -I"$scratch/inc" -o "$out" "$scratch/$src/$tool" ||
        die "could not build $tool"
    "${CROSS}strip" "$out"
}

# A guest program of the tests, tests/guest/$2, built statically for the guest as $1 (C,
# pthreads): the noisy-neighbour test's attacker (attacker.c, tests/tests/noisy.rs, init's
# `hvattack=`), the hostile virtio-iommu guest (viommu_attack.c, tests/tests/mediation.rs,
# init's `hvviommu=`) and the FP/SIMD check (fpcheck.c, tests/tests/mediation.rs, init's
# `hvfpcheck=`).
build_attacker() {
    local out="$1" src="$ROOT/tests/guest/$2"
    "${CROSS}gcc" -static -O2 -pthread -Wall -Wextra -Werror -o "$out" "$src" ||
        die "could not build ${src#"$ROOT"/}"
    "${CROSS}strip" "$out"
}

# The modular guest's images into the cache directory $1 from the kernel in $2 and busybox's .deb $3.
build_guest() {
    local out="$1" kdir="$2" bdeb="$3" kver tmp ir mods ko rel m
    kver="$(cat "$kdir/kver")"
    tmp="$(mktemp -d "$CACHE/guest-modular-build.XXXXXX")"
    # shellcheck disable=SC2064 # expanded now, on purpose
    trap "rm -rf '$tmp' '$out.tmp.$$'" EXIT
    dpkg-deb -x "$bdeb" "$tmp/b"
    ir="$tmp/initramfs"
    mods="$ir/lib/modules"
    mkdir -p "$mods"
    # The whole modules tree, for modprobe (busybox's reads lib/modules/KVER/modules.dep), and
    # lib/modules/NAME.ko, a link to each module, for insmod and the init.
    cp -a "$kdir/lib/modules/$kver" "$mods/$kver"
    while IFS= read -r ko; do
        rel="${ko#"$mods"/}"
        ln -s "$rel" "$mods/$(mod_name "$ko").ko"
    done < <(find "$mods/$kver" -name '*.ko' | sort)
    : >"$mods/load-order"
    for m in "${LOAD_MODULES[@]}"; do
        add_load_order "$m" "$mods"
    done
    say "initramfs modules: $(cd "$mods" && ls -- *.ko | sed 's/\.ko$//' | tr '\n' ' ')(load order: $(tr '\n' ' ' <"$mods/load-order" | sed 's/ $//'))"
    # The benchmark's guest side (qemu/bench.sh): its script and the kernel's DMA map tool.
    mkdir -p "$ir/bin"
    cp "$ROOT/tests/guest/bench.sh" "$ir/bench.sh"
    build_dma_map_benchmark "$tmp/dma" "$ir/bin/dma_map_benchmark"
    build_attacker "$ir/bin/hvattack" attacker.c
    build_attacker "$ir/bin/hvviommu" viommu_attack.c
    build_attacker "$ir/bin/hvfpcheck" fpcheck.c
    say "initramfs extras: /bench.sh, /bin/dma_map_benchmark (static, from $SRC_PKG), /bin/hvattack, /bin/hvviommu and /bin/hvfpcheck (static, tests/guest/attacker.c, viommu_attack.c and fpcheck.c)"
    mkdir -p "$out.tmp.$$"
    cp "$mods/load-order" "$out.tmp.$$/modules"
    pack_guest_initramfs "$ir" "$(busybox_in "$tmp/b")" "$out.tmp.$$/initramfs.cpio.gz"
    # The Image: a hard link to the kernel cache's (same file system), a copy if that fails.
    ln "$kdir/Image" "$out.tmp.$$/Image" 2>/dev/null || cp "$kdir/Image" "$out.tmp.$$/Image"
    cp "$kdir/kver" "$kdir/config" "$out.tmp.$$/"
    rm -rf "$out"
    mv "$out.tmp.$$" "$out"
    rm -rf "$tmp"
    trap - EXIT
}

main() {
    local t_start packages_only=0
    case "${1:-}" in
        "") ;;
        --packages-only) packages_only=1 ;;
        *) die "usage: qemu/kernel.sh [--packages-only]" ;;
    esac
    t_start="$(date +%s)"
    check_host
    ensure_arm64_arch
    [ "$APT_UPDATED" = 0 ] && [ "$NEED_UPDATE" = 1 ] && apt_update
    ensure_build_packages
    if [ "$packages_only" = 1 ]; then
        say "build packages present (Debian $HOST_SUITE $HOST_ARCH; compiler ${CROSS}gcc: $("${CROSS}gcc" --version | head -1); $SRC_PKG $(dpkg-query -W -f='${Version}' "$SRC_PKG")); --packages-only: not building"
        return 0
    fi
    mkdir -p "$CACHE" "$BUILD/guest"

    # One build at a time per cache (two checkouts would otherwise build the same kernel twice).
    exec 9>"$CACHE/kernel.lock"
    if ! flock -n 9; then
        say "another qemu/kernel.sh holds $CACHE/kernel.lock: waiting for it"
        flock 9
    fi

    local key kdir
    key="$(kernel_key)"
    kdir="$CACHE/kernel-$key"
    if [ -f "$kdir/Image" ] && [ -f "$kdir/kver" ] && [ -f "$kdir/config" ]; then
        say "kernel cached: $kdir ($(cat "$kdir/kver"))"
    else
        build_kernel "$kdir"
    fi

    local bdeb gkey gdir
    bdeb="$(fetch_deb busybox-static:arm64)"
    gkey="$({
        echo "kernel: $key"
        echo "load: ${LOAD_MODULES[*]}"
        cat "$bdeb" "$ROOT/tests/guest/init" "$ROOT/tests/guest/bench.sh" "$ROOT/tests/guest/attacker.c" \
            "$ROOT/tests/guest/viommu_attack.c" "$ROOT/tests/guest/fpcheck.c"
        declare -f pack_guest_initramfs build_guest add_load_order mod_name build_dma_map_benchmark \
            build_attacker busybox_in
    } | sha256sum | cut -c1-16)"
    gdir="$CACHE/guest-modular-$gkey"
    if [ ! -f "$gdir/initramfs.cpio.gz" ] || [ ! -f "$gdir/Image" ] || [ ! -f "$gdir/modules" ]; then
        say "building the modular guest's initramfs ($(basename "$bdeb"), tests/guest/init, tests/guest/bench.sh, tests/guest/attacker.c, tests/guest/viommu_attack.c, tests/guest/fpcheck.c)"
        build_guest "$gdir" "$kdir" "$bdeb"
    fi
    ln -sfn "$gdir" "$BUILD/guest/modular"
    say "modular guest ready in $(($(date +%s) - t_start)) s: $BUILD/guest/modular -> $gdir (kernel $(cat "$gdir/kver"); loads: $(tr '\n' ' ' <"$gdir/modules" | sed 's/ $//'))"
}

main "$@"

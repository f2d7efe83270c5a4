#!/usr/bin/env bash
# Regenerates the board DTB fixtures of this directory (README.md says what each one is).
#
#   hypervisor/tests/dtbs/make.sh [KERNEL_SOURCE_DIR]
#
# KERNEL_SOURCE_DIR is an unpacked Linux 6.12 tree (only include/, scripts/dtc/include-prefixes
# and arch/arm64/boot/dts/ are read). Without it, the needed parts of Debian's
# /usr/src/linux-source-6.12.tar.xz (package linux-source-6.12) are unpacked into a scratch
# directory that is removed afterwards. Needs cpp, dtc and fdtoverlay (package
# device-tree-compiler). The hand-written multi-smmu-virt.dts needs neither cpp nor the kernel.
#
# The DTBs are committed, so the host tests need none of this; run it only to regenerate them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tarball=/usr/src/linux-source-6.12.tar.xz

for tool in cpp dtc fdtoverlay; do
	command -v "$tool" >/dev/null || {
		echo "make.sh: $tool not found (apt-get install cpp device-tree-compiler)" >&2
		exit 1
	}
done

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

ksrc="${1:-${KSRC:-}}"
if [[ -z "$ksrc" ]]; then
	[[ -f "$tarball" ]] || {
		echo "make.sh: no kernel source given and no $tarball (apt-get install linux-source-6.12)" >&2
		exit 1
	}
	echo "unpacking the DT parts of $tarball into $scratch" >&2
	tar -xJf "$tarball" -C "$scratch" --wildcards \
		'linux-source-6.12/Makefile' \
		'linux-source-6.12/include/*' \
		'linux-source-6.12/scripts/dtc/include-prefixes*' \
		'linux-source-6.12/arch/arm64/boot/dts/arm/*' \
		'linux-source-6.12/arch/arm64/boot/dts/hisilicon/*' \
		'linux-source-6.12/arch/arm64/boot/dts/rockchip/*'
	ksrc="$scratch/linux-source-6.12"
fi
dts_root="$ksrc/arch/arm64/boot/dts"
[[ -d "$dts_root" ]] || {
	echo "make.sh: $ksrc has no arch/arm64/boot/dts" >&2
	exit 1
}

# The kernel's own default DTC_FLAGS (scripts/Makefile.dtbs), so dtc warns exactly as a kernel
# build would.
dtc_flags=(-b 0 -Wno-unique_unit_address -Wno-unit_address_vs_reg
	-Wno-avoid_unnecessary_addr_size -Wno-alias_paths -Wno-graph_child_address
	-Wno-simple_bus_reg)

# One kernel DT, preprocessed and compiled as scripts/Makefile.dtbs does it.
kernel_dtb() { # <path under arch/arm64/boot/dts> <output>
	local src="$dts_root/$1" pre="$scratch/$(basename "$1").pre"
	cpp -nostdinc -I "$ksrc/include" -I "$dts_root" \
		-I "$ksrc/scripts/dtc/include-prefixes" -undef -D__DTS__ \
		-x assembler-with-cpp -o "$pre" "$src"
	dtc -I dts -O dtb "${dtc_flags[@]}" -i "$(dirname "$src")" \
		-i "$ksrc/scripts/dtc/include-prefixes" -o "$2" "$pre"
	echo "$2 <- $1" >&2
}

kernel_dtb arm/fvp-base-revc.dts "$here/fvp-base-revc.dtb"
kernel_dtb hisilicon/hip07-d05.dts "$here/hip07-d05.dtb"

# The ROCK 5B with its MMU-600s enabled: the board DTB as the kernel builds it, then the overlay.
kernel_dtb rockchip/rk3588-rock-5b.dts "$scratch/rk3588-rock-5b.dtb"
dtc -I dts -O dtb -o "$scratch/rk3588-rock-5b-smmu.dtbo" "$here/rk3588-rock-5b-smmu.dtso"
fdtoverlay -i "$scratch/rk3588-rock-5b.dtb" -o "$here/rk3588-rock-5b-smmu.dtb" \
	"$scratch/rk3588-rock-5b-smmu.dtbo"
echo "$here/rk3588-rock-5b-smmu.dtb <- rockchip/rk3588-rock-5b.dts + rk3588-rock-5b-smmu.dtso" >&2

# Hand-written: plain DTS, no preprocessor.
dtc -I dts -O dtb "${dtc_flags[@]}" -o "$here/multi-smmu-virt.dtb" "$here/multi-smmu-virt.dts"
echo "$here/multi-smmu-virt.dtb <- multi-smmu-virt.dts" >&2

# What README.md should say about provenance.
echo "dtc: $(dtc --version)" >&2
if version="$(dpkg-query -W -f '${Version}' linux-source-6.12 2>/dev/null)"; then
	echo "linux-source-6.12: $version" >&2
fi
if [[ -f "$ksrc/Makefile" ]]; then
	echo "kernel Makefile: $(sed -n 's/^\(VERSION\|PATCHLEVEL\|SUBLEVEL\) = //p' "$ksrc/Makefile" | paste -sd.)" >&2
fi

#!/usr/bin/env bash
# The boot disk of the U-Boot board path (qemu/board-virt.sh --uboot): an MBR-partitioned disk
# image whose partition 1 is FAT, holding the four files that docs/vm-config.md ("A real board
# with U-Boot") has U-Boot `load`:
#
#   hypervisor.bin  board.dtb  Image  initramfs.cpio.gz
#
#   qemu/uboot-disk.sh HYPERVISOR_BIN BOARD_DTB IMAGE INITRAMFS
#
# Prints the image's path on stdout. The image is build/uboot/disk-HASH.img, HASH from the four
# files and this script: an unchanged set is reused, not rebuilt (images unused for a day are
# removed). It needs mkfs.vfat (dosfstools) and mcopy (mtools): run qemu/setup.sh.
#
# The layout (no partitioning tool needed): 1 MiB for the MBR and alignment, then partition 1
# (type 0x0c, FAT32 LBA, marked bootable) to the end, formatted with `mkfs.vfat --offset 2048`
# and filled with `mcopy -i IMG@@1M`. U-Boot reads it as `virtio 0:1` (QEMU: -device
# virtio-blk-device, on the virtio-mmio bus) or as `mmc 0:1` when written to an SD card.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# mkfs.vfat lives in /sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '[uboot-disk] %s\n' "$*" >&2; }
die() { printf '[uboot-disk] error: %s\n' "$*" >&2; exit 1; }

[ "$#" = 4 ] || die "usage: qemu/uboot-disk.sh HYPERVISOR_BIN BOARD_DTB IMAGE INITRAMFS"
FILES=("$1" "$2" "$3" "$4")
NAMES=(hypervisor.bin board.dtb Image initramfs.cpio.gz)
for f in "${FILES[@]}"; do
    [ -f "$f" ] || die "no file $f"
done
command -v mkfs.vfat >/dev/null || die "mkfs.vfat not found: run qemu/setup.sh (dosfstools)"
command -v mcopy >/dev/null || die "mcopy not found: run qemu/setup.sh (mtools)"

DIR="$ROOT/build/uboot"
mkdir -p "$DIR"
find "$DIR" -maxdepth 1 \( -name 'disk-*.img' -mmin +1440 -o -name 'tmp.*' -mmin +60 \) \
    -exec rm -f {} + 2>/dev/null || true

KEY="$({
    cat "${BASH_SOURCE[0]}"
    for i in "${!FILES[@]}"; do
        printf '%s %s\n' "${NAMES[$i]}" "$(sha256sum <"${FILES[$i]}" | cut -c1-64)"
    done
} | sha256sum | cut -c1-16)"
IMG="$DIR/disk-$KEY.img"
if [ -f "$IMG" ]; then
    touch "$IMG"
    echo "$IMG"
    exit 0
fi

# The partition: the files, 16 MiB for the FAT and slack, in whole MiB; at least 64 MiB.
bytes=0
for f in "${FILES[@]}"; do
    bytes=$((bytes + $(stat -L -c %s "$f")))
done
part_mib=$(((bytes >> 20) + 17))
[ "$part_mib" -ge 64 ] || part_mib=64
part_sectors=$((part_mib * 2048))

# A little-endian 32-bit number as printf escapes.
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }

TMP="$(mktemp "$DIR/tmp.XXXXXX")"
trap 'rm -f "$TMP"' EXIT
truncate -s "$((part_mib + 1))M" "$TMP"
# MBR partition entry 1 (offset 446): bootable, CHS "past 1024 cylinders" (LBA only), type 0x0c,
# first sector 2048, then its length in sectors; then the boot signature 55 aa at offset 510.
# shellcheck disable=SC2059 # the format is the bytes
printf "\\x80\\xfe\\xff\\xff\\x0c\\xfe\\xff\\xff$(le32 2048)$(le32 "$part_sectors")" |
    dd of="$TMP" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$TMP" bs=1 seek=510 conv=notrunc status=none
# A fixed volume ID and a label (the files' timestamps still differ from one build to the next).
mkfs.vfat --offset 2048 -i 534d4856 -n SMMU-HV "$TMP" $((part_sectors / 2)) >/dev/null ||
    die "mkfs.vfat failed on $TMP"
for i in "${!FILES[@]}"; do
    MTOOLS_SKIP_CHECK=1 mcopy -i "$TMP@@1M" "${FILES[$i]}" "::${NAMES[$i]}" ||
        die "mcopy of ${FILES[$i]} failed"
done
chmod 644 "$TMP"
mv -f "$TMP" "$IMG"
trap - EXIT
say "made ${IMG#"$ROOT"/} ($((part_mib + 1)) MiB: ${NAMES[*]} on partition 1, FAT)"
echo "$IMG"

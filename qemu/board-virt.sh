#!/usr/bin/env bash
# Board file for QEMU's `virt` machine: builds the QEMU command line and execs it.
# The guest images' load addresses are facts of this board and live only here. The hypervisor
# learns its VMs from /chosen/vmN nodes of the device tree it boots with (docs/vm-config.md); this
# script makes that DT: it dumps the machine's own DT (`-M ...,dumpdtb=`, same options), appends a
# generated `/ { chosen { vmN {...}; }; };` block, compiles it with dtc and boots with `-dtb`; the
# images are put in memory with `-device loader`, one pristine copy that every VM names.
#
#   qemu/board-virt.sh [--vms N] [--vm-bootargs I STR]... [--bootargs STR] [--vm-dts FILE]
#                      [--host-dts FILE] [--show-dts] [--guest DIR] [--bare] [--bare-iommu KIND]
#                      [--smp N] [--mem SIZE]
#                      [--pci] [--vm-pci I BDFS]... [--vm-intx-only I]... [--vm-iommu I KIND]... [--gic 3|4]
#                      [--dumpdtb FILE] [--uboot] [--hv-image FILE]
#                      [-- QEMU_ARGS...]
#
#   --vms N             VMs to generate (default 2): VM i gets 2 vCPUs pinned to the physical CPUs
#                       with MPIDRs 2i and 2i+1, 1 GiB of RAM, the guest kernel and initramfs
#   --vm-bootargs I STR kernel command line of VM I (default: "console=ttyAMA0 rdinit=/init")
#   --bootargs STR      the same as --vm-bootargs 0 STR (with --bare: the guest's command line)
#   --vm-dts FILE       use FILE, a hand-written `/ { chosen { ... }; };` DTS block, instead of the
#                       generated VMs; @KERNEL_ADDR@ @KERNEL_SIZE@ @INITRD_ADDR@ @INITRD_SIZE@ in it
#                       become the guest images' load addresses and sizes (hex)
#   --host-dts FILE     merge FILE, DTS `/ { ... };` blocks, into the machine's DT before the VMs
#                       block: nodes and properties added or overridden as another board's DT
#                       would differ (labels and `&{/path}` references work; tests add an SMMU
#                       the hypervisor cannot drive and break properties with it)
#   --show-dts          print the whole DTS the hypervisor would boot with (the machine's DT plus
#                       the VMs block, at its end) and exit
#   --guest DIR         guest images: DIR/Image, DIR/initramfs.cpio.gz (default: build/guest/stock)
#   --bare              boot VM 0's guest kernel directly on QEMU, no hypervisor (for comparisons)
#   --bare-iommu KIND   with --bare, the machine's IOMMU: smmuv3 (the default: `iommu=smmuv3`, the
#                       SMMUv3 the hypervisor runs on) or virtio-iommu (QEMU's own virtio-iommu-pci
#                       at 00:05.0, before any other device, and no SMMU: QEMU takes one or the
#                       other; it writes the DT node and the host bridge's `iommu-map` itself, for
#                       every other function of the root bus). tests/guest/init loads
#                       virtio_iommu when it sees that PCI function (1af4:1057)
#   --pci               PCI devices for vm0 and vm1 on the root bus: vm0 gets a virtio-blk-pci at
#                       00:01.0 (disk build/disks/vm0.img) and a virtio-net-pci at 00:02.0 (MAC
#                       52:54:00:00:00:10), vm1 the same at 00:03.0 and 00:04.0 (vm1.img, MAC
#                       ...:11); the NICs share one QEMU hub. Their VM nodes get
#                       `smmu-hv,pci-devices`. With --bare: vm0's devices, and QEMU's user network
#                       on the hub as a peer at 10.0.2.2
#   --vm-pci I BDFS     VM I's `smmu-hv,pci-devices` (comma-separated BDFs, e.g. "00:01.0,00:02.0";
#                       "" for none) instead of what --pci gives it; adds no device
#   --vm-intx-only I    VM I gets `smmu-hv,intx-only;`: no virtual ITS, its functions use INTx
#   --vm-iommu I KIND   VM I gets `smmu-hv,iommu = "KIND";`: smmuv3 (the default, an emulated
#                       SMMUv3) or virtio-iommu (a paravirtual virtio-iommu over virtio-mmio)
#   --gic 3|4           the GIC version (default 3): 4 is QEMU's GICv4.0 (GITS_TYPER.Virtual,
#                       GICR_TYPER.VLPIS, redistributors 0x40000 apart), with which the hypervisor
#                       injects its VMs' MSIs directly (`gic-version=4` in the DT dump and the run)
#   --smp N             CPUs (default 4)
#   --mem SIZE          RAM (default 4G)
#   --dumpdtb FILE      write the DTB QEMU would pass to FILE and exit
#   --hv-image FILE     boot this hypervisor image instead of build/hypervisor.bin (the bench's
#                       baseline column: another build of the hypervisor in the same run)
#   --uboot             the board path instead: QEMU starts Debian's U-Boot (u-boot-qemu) as its
#                       firmware, at EL2, with a virtio disk (qemu/uboot-disk.sh) holding
#                       hypervisor.bin, board.dtb (this machine's own DT, no VMs), Image and
#                       initramfs.cpio.gz; at U-Boot's prompt, type the commands of
#                       docs/vm-config.md ("A real board with U-Boot"), which describe the VMs
#                       (so --vms, --vm-bootargs, --vm-dts and --vm-pci do not apply; nor --pci,
#                       whose virtio disks would change U-Boot's numbering of its virtio disk)
#   -- QEMU_ARGS        appended to the QEMU command line as they are (e.g. -s -S for gdb)
#
# Generated files go to build/board/, named by a hash of their content (concurrent runs with
# different VMs do not clash): vms-HASH.dts (the complete DTS) and vms-HASH.dtb; files unused
# for a day are removed. --pci's disk images are build/disks/vm0.img and vm1.img, made when
# missing (8 MiB of deterministic content, different per VM, then 1 MiB the guest may scribble
# on); QEMU locks them, so two --pci runs at once need separate checkouts.
# It does not build anything: run qemu/setup.sh and qemu/build.sh first (qemu/run.sh does all three).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '[board-virt] %s\n' "$*" >&2; }
die() { printf '[board-virt] error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# Load addresses of the guest images (`-device loader`); the VMs' module nodes name them.
GUEST_KERNEL_ADDR=0x4a000000
GUEST_INITRD_ADDR=0x50000000
# Each generated VM: vCPUs and RAM in KiB (Xen's unit for `memory`).
VM_CPUS=2
VM_MEM_KIB=$((1024 * 1024))
DEFAULT_BOOTARGS="console=ttyAMA0 rdinit=/init"
# --pci: the functions of VM i are on root-bus slots PCI_SLOTS[i] (disk, NIC). On the root bus,
# INTA of slot s raises SPI 3 + (s % 4), so slots 1-4 give the four functions four different lines.
PCI_SLOTS=("1 2" "3 4")
# The disks: DISK_MIB MiB of content (deterministic, different per VM), which the tests checksum,
# then a 1 MiB scratch area the guest writes.
DISK_MIB=8

VMS=2
declare -A VM_BOOTARGS=()
VM_DTS=""
HOST_DTS=""
SHOW_DTS=0
GUEST="$ROOT/build/guest/stock"
BARE=0
BARE_IOMMU=""
SMP=4
MEM=4G
GIC=3
DUMPDTB=""
UBOOT=0
HV_IMAGE="$ROOT/build/hypervisor.bin"
PCI=0
declare -A VM_PCI=()
declare -A VM_INTX_ONLY=()
declare -A VM_IOMMU=()
EXTRA=()

need_arg() { [ "$#" -ge 2 ] || die "$1 needs a value (see --help)"; }
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --vms) need_arg "$@"; VMS="$2"; shift 2 ;;
        --vm-bootargs)
            [ "$#" -ge 3 ] || die "--vm-bootargs needs a VM index and a command line (see --help)"
            [[ "$2" =~ ^[0-9]+$ ]] || die "--vm-bootargs wants a VM index (0, 1, ...), got '$2'"
            VM_BOOTARGS[$((10#$2))]="$3"
            shift 3
            ;;
        --bootargs) need_arg "$@"; VM_BOOTARGS[0]="$2"; shift 2 ;;
        --vm-dts) need_arg "$@"; VM_DTS="$2"; shift 2 ;;
        --host-dts) need_arg "$@"; HOST_DTS="$2"; shift 2 ;;
        --show-dts) SHOW_DTS=1; shift ;;
        --guest) need_arg "$@"; GUEST="$2"; shift 2 ;;
        --bare) BARE=1; shift ;;
        --bare-iommu)
            need_arg "$@"
            case "$2" in
                smmuv3 | virtio-iommu) BARE_IOMMU="$2" ;;
                *) die "--bare-iommu: '$2' is neither smmuv3 nor virtio-iommu" ;;
            esac
            shift 2
            ;;
        --pci) PCI=1; shift ;;
        --vm-pci)
            [ "$#" -ge 3 ] || die "--vm-pci needs a VM index and a BDF list (see --help)"
            [[ "$2" =~ ^[0-9]+$ ]] || die "--vm-pci wants a VM index (0, 1, ...), got '$2'"
            VM_PCI[$((10#$2))]="$3"
            shift 3
            ;;
        --vm-intx-only)
            need_arg "$@"
            [[ "$2" =~ ^[0-9]+$ ]] || die "--vm-intx-only wants a VM index (0, 1, ...), got '$2'"
            VM_INTX_ONLY[$((10#$2))]=1
            shift 2
            ;;
        --vm-iommu)
            [ "$#" -ge 3 ] || die "--vm-iommu needs a VM index and smmuv3 or virtio-iommu"
            [[ "$2" =~ ^[0-9]+$ ]] || die "--vm-iommu wants a VM index (0, 1, ...), got '$2'"
            case "$3" in
                smmuv3 | virtio-iommu) VM_IOMMU[$((10#$2))]="$3" ;;
                *) die "--vm-iommu $2: '$3' is neither smmuv3 nor virtio-iommu" ;;
            esac
            shift 3
            ;;
        --smp) need_arg "$@"; SMP="$2"; shift 2 ;;
        --gic) need_arg "$@"; GIC="$2"; shift 2 ;;
        --mem) need_arg "$@"; MEM="$2"; shift 2 ;;
        --dumpdtb) need_arg "$@"; DUMPDTB="$2"; shift 2 ;;
        --uboot) UBOOT=1; shift ;;
        --hv-image) need_arg "$@"; HV_IMAGE="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

is_count "$SMP" || die "--smp wants a positive number, got '$SMP'"
[[ "$GIC" =~ ^[34]$ ]] || die "--gic wants 3 or 4, got '$GIC'"
is_count "$VMS" || die "--vms wants a positive number, got '$VMS'"
command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 not found: run qemu/setup.sh"

GUEST_IMAGE="$GUEST/Image"
GUEST_INITRD="$GUEST/initramfs.cpio.gz"
[ -f "$GUEST_IMAGE" ] || die "no guest kernel at $GUEST_IMAGE: run qemu/setup.sh"
[ -f "$GUEST_INITRD" ] || die "no guest initramfs at $GUEST_INITRD: run qemu/setup.sh"

# QEMU's option parser splits -M and -device properties at commas; a literal comma is written twice.
qemu_escape() { printf '%s' "${1//,/,,}"; }

# --pci: VM i's disk image, made (deterministic content) when missing.
disk_image() {
    local i="$1" dir="$ROOT/build/disks" img
    img="$dir/vm$i.img"
    if [ ! -f "$img" ]; then
        command -v python3 >/dev/null || die "python3 not found: run qemu/setup.sh"
        mkdir -p "$dir"
        # Each 32-byte block is SHA-256("smmu-hv disk vmI block N"); then 1 MiB of zeros (scratch).
        python3 - "$img.tmp.$$" "$i" "$DISK_MIB" <<'PY'
import hashlib, sys
path, vm, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path, "wb") as f:
    blocks = mib << 15
    for start in range(0, blocks, 4096):
        f.write(b"".join(hashlib.sha256(f"smmu-hv disk vm{vm} block {n}".encode()).digest()
                         for n in range(start, min(start + 4096, blocks))))
    f.write(bytes(1 << 20))
PY
        mv -f "$img.tmp.$$" "$img"
    fi
    echo "$img"
}

# --pci: the QEMU arguments of VM i's disk and NIC (their slots: PCI_SLOTS[i]); says where the
# disk is. iommu_platform=on is essential: without it QEMU's virtio devices skip the SMMU and
# DMA straight to physical addresses (a guest's IPAs would land in the hypervisor's memory).
pci_args() {
    local i="$1" slots disk_slot net_slot img
    read -r -a slots <<<"${PCI_SLOTS[$i]}"
    disk_slot="${slots[0]}"
    net_slot="${slots[1]}"
    img="$(disk_image "$i")"
    say "vm$i disk: ${img#"$ROOT"/} ($DISK_MIB MiB content + 1 MiB scratch) at 00:0$disk_slot.0; NIC 52:54:00:00:00:1$i at 00:0$net_slot.0"
    PCI_ARGS+=(-drive "if=none,id=vm${i}disk,format=raw,file=$(qemu_escape "$img")"
        -device "virtio-blk-pci,drive=vm${i}disk,bus=pcie.0,addr=$disk_slot.0,disable-legacy=on,iommu_platform=on"
        -netdev "hubport,id=vm${i}net,hubid=0"
        -device "virtio-net-pci,netdev=vm${i}net,bus=pcie.0,addr=$net_slot.0,disable-legacy=on,iommu_platform=on,mac=52:54:00:00:00:1$i,romfile=")
}

# The BDFs --pci gives VM i (none beyond vm1).
pci_bdfs() {
    local i="$1" s out=""
    [ "$PCI" = 1 ] && [ "$i" -lt "${#PCI_SLOTS[@]}" ] || return 0
    for s in ${PCI_SLOTS[$i]}; do
        out="$out${out:+,}00:0$s.0"
    done
    echo "$out"
}

PCI_ARGS=()

# Debian's U-Boot for QEMU virt (qemu/setup.sh installs u-boot-qemu).
UBOOT_BIN=/usr/lib/u-boot/qemu_arm64/u-boot.bin
# The section of docs/vm-config.md whose commands are typed at U-Boot's prompt.
UBOOT_DOC="$ROOT/docs/vm-config.md"

# --uboot: the machine's own DT as board.dtb, the boot disk with it and the images, and QEMU
# with U-Boot as its firmware. Execs QEMU.
uboot_board() {
    [ -f "$UBOOT_BIN" ] || die "no U-Boot at $UBOOT_BIN: run qemu/setup.sh (u-boot-qemu)"
    [ -z "$VM_DTS" ] && [ "${#VM_BOOTARGS[@]}" = 0 ] && [ "${#VM_PCI[@]}" = 0 ] && [ "$VMS" = 2 ] ||
        die "--uboot: the VMs come from the U-Boot commands typed at its prompt (docs/vm-config.md); --vms, --vm-bootargs, --vm-dts and --vm-pci do not apply"
    [ -z "$HOST_DTS" ] || die "--uboot: board.dtb is the machine's own DT; --host-dts does not apply"
    [ "$PCI" = 0 ] || die "--uboot: --pci is not supported (its virtio disks would change U-Boot's virtio numbering)"
    local dir="$ROOT/build/board" work hash dtb disk
    mkdir -p "$dir"
    find "$dir" -maxdepth 1 -name 'board-*.dtb' -mmin +1440 -exec rm -f {} + 2>/dev/null || true
    work="$(mktemp -d "$dir/tmp.XXXXXX")"
    # The board's DT as QEMU makes it for firmware (with -bios; without the gpio-keys it adds
    # for -kernel), from the same machine options, compiled small (QEMU's blob is 1 MiB) and with
    # the random seeds zeroed (the same machine gives the same file).
    qemu-system-aarch64 -M "$MACHINE,dumpdtb=$(qemu_escape "$work/machine.dtb")" "${MACHINE_OPTS[@]}" \
        -bios "$UBOOT_BIN" "${EXTRA[@]}" </dev/null >"$work/dump.log" 2>&1 ||
        { cat "$work/dump.log" >&2; rm -rf "$work"; die "QEMU could not dump the machine's DT"; }
    dtc -q -I dtb -O dts "$work/machine.dtb" |
        sed -E '/^\s*(rng-seed|kaslr-seed) = </s/0x[0-9a-f]+/0x00/g' >"$work/board.dts" ||
        { rm -rf "$work"; die "dtc could not decompile the machine's DT"; }
    hash="$(sha256sum "$work/board.dts" | cut -c1-16)"
    dtb="$dir/board-$hash.dtb"
    dtc -q -I dts -O dtb -o "$work/board.dtb" "$work/board.dts" ||
        { rm -rf "$work"; die "dtc could not compile the board DT"; }
    mv -f "$work/board.dtb" "$dtb"
    rm -rf "$work"
    if [ "$SHOW_DTS" = 1 ]; then
        dtc -q -I dtb -O dts "$dtb"
        exit 0
    fi
    disk="$("$ROOT/qemu/uboot-disk.sh" "$HV_IMAGE" "$dtb" "$GUEST_IMAGE" "$GUEST_INITRD")" ||
        die "qemu/uboot-disk.sh failed"
    M="$MACHINE"
    [ -n "$DUMPDTB" ] && M="$M,dumpdtb=$(qemu_escape "$DUMPDTB")"
    # The disk on QEMU's virtio-mmio bus: off the PCI bus (its slots and StreamIDs stay free),
    # read-only (U-Boot only reads it, and runs can share it).
    CMD=(qemu-system-aarch64 -M "$M" "${MACHINE_OPTS[@]}"
        -bios "$UBOOT_BIN"
        -drive "if=none,id=ubootdisk,format=raw,readonly=on,file=$(qemu_escape "$disk")"
        -device "virtio-blk-device,drive=ubootdisk"
        "${EXTRA[@]}")
    if [ -t 0 ]; then
        say "at U-Boot's prompt (press a key to stop its autoboot), type these commands, from ${UBOOT_DOC#"$ROOT"/}:"
        sed -n '/<!-- uboot-commands:begin -->/,/<!-- uboot-commands:end -->/{/^<!--/d;/^```/d;p}' "$UBOOT_DOC" >&2
    fi
    say "U-Boot, disk ${disk#"$ROOT"/} (board DT ${dtb#"$ROOT"/}): ${CMD[*]}"
    exec "${CMD[@]}"
}

[ -z "$BARE_IOMMU" ] || [ "$BARE" = 1 ] ||
    die "--bare-iommu picks the bare machine's IOMMU; without --bare use --vm-iommu"
# --bare-iommu virtio-iommu: QEMU's virtio-iommu-pci on this root-bus slot (--pci and the
# benchmark use slots 1 to 4).
BARE_VIOMMU_SLOT=5
BARE_IOMMU_ARGS=()
if [ "$BARE" = 1 ] && [ "$BARE_IOMMU" = virtio-iommu ]; then
    # No SMMU: QEMU refuses iommu=smmuv3 with a virtio-iommu-pci.
    MACHINE="virt,gic-version=$GIC"
    # First on the command line: a function takes its DMA address space when it is created, so
    # only those created after the IOMMU are behind it.
    BARE_IOMMU_ARGS=(-device "virtio-iommu-pci,bus=pcie.0,addr=$BARE_VIOMMU_SLOT.0")
elif [ "$BARE" = 1 ]; then
    # The same SMMUv3 as under the hypervisor: the bare reference runs its guest's stage 1 on it.
    MACHINE="virt,gic-version=$GIC,iommu=smmuv3"
else
    MACHINE="virt,virtualization=on,gic-version=$GIC,iommu=smmuv3"
fi

# SVE and SME off: the hypervisor saves only the guest's V registers (its own Rust code uses
# them), so it traps the wider Z/ZA state; a CPU without them is what guests then see.
# The machine's options, shared by the DT dump and the real run so that both see the same machine.
# shellcheck disable=SC2054 # the commas are QEMU's, inside one argument
MACHINE_OPTS=(-cpu max,sve=off,sme=off -smp "$SMP" -m "$MEM" -nographic -no-reboot)

if [ "$BARE" = 1 ]; then
    [ "$UBOOT" = 0 ] || die "--uboot boots the hypervisor; it cannot be combined with --bare"
    [ "$SHOW_DTS" = 0 ] || die "--show-dts shows the hypervisor's DT; with --bare there is none"
    [ -z "$VM_DTS" ] || die "--vm-dts configures the hypervisor's VMs; it means nothing with --bare"
    for i in "${!VM_BOOTARGS[@]}"; do
        [ "$i" = 0 ] || die "--bare boots one guest: --vm-bootargs $i has no VM to go to"
    done
    [ "${#VM_PCI[@]}" = 0 ] || die "--vm-pci configures the hypervisor's VMs; it means nothing with --bare"
    if [ "$PCI" = 1 ]; then
        # vm0's devices, and QEMU's user network (10.0.2.2) on the hub as something to ping.
        pci_args 0
        PCI_ARGS+=(-netdev "user,id=user0" -netdev "hubport,id=userport,hubid=0,netdev=user0")
    fi
    M="$MACHINE"
    [ -n "$DUMPDTB" ] && M="$M,dumpdtb=$(qemu_escape "$DUMPDTB")"
    CMD=(qemu-system-aarch64 -M "$M" "${MACHINE_OPTS[@]}"
        -kernel "$GUEST_IMAGE" -initrd "$GUEST_INITRD" -append "${VM_BOOTARGS[0]-$DEFAULT_BOOTARGS}"
        "${BARE_IOMMU_ARGS[@]}" "${PCI_ARGS[@]}" "${EXTRA[@]}")
    say "bare guest, no hypervisor: ${CMD[*]}"
    exec "${CMD[@]}"
fi

[ -f "$HV_IMAGE" ] || die "no hypervisor image at $HV_IMAGE: run qemu/build.sh"
command -v dtc >/dev/null || die "dtc not found: run qemu/setup.sh (device-tree-compiler)"

if [ "$UBOOT" = 1 ]; then
    uboot_board
fi

KERNEL_SIZE="$(printf '0x%x' "$(stat -L -c %s "$GUEST_IMAGE")")"
INITRD_SIZE="$(printf '0x%x' "$(stat -L -c %s "$GUEST_INITRD")")"

# The VMs block: hand-written (--vm-dts, placeholders filled in) or generated.
dts_string() {
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}

# A DTS string list from comma-separated items: "a", "b".
dts_string_list() {
    local item out="" items
    IFS=, read -r -a items <<<"$1"
    for item in "${items[@]}"; do
        item="${item// /}"
        [ -n "$item" ] || continue
        out="$out${out:+, }$(dts_string "$item")"
    done
    printf '%s' "$out"
}

vms_block() {
    if [ -n "$VM_DTS" ]; then
        [ -r "$VM_DTS" ] || die "--vm-dts: cannot read '$VM_DTS'"
        sed -e "s/@KERNEL_ADDR@/$GUEST_KERNEL_ADDR/g" -e "s/@KERNEL_SIZE@/$KERNEL_SIZE/g" \
            -e "s/@INITRD_ADDR@/$GUEST_INITRD_ADDR/g" -e "s/@INITRD_SIZE@/$INITRD_SIZE/g" "$VM_DTS"
        return
    fi
    local i cpu0 cpu1 mpidr0 mpidr1 bdfs
    printf '\n/* The VMs (generated by qemu/board-virt.sh --vms %s; binding: docs/vm-config.md). */\n' "$VMS"
    printf '/ {\n\tchosen {\n'
    for ((i = 0; i < VMS; i++)); do
        cpu0=$((2 * i))
        cpu1=$((2 * i + 1))
        # virt with GICv3: MPIDR Aff0 = CPU index % 16, Aff1 = CPU index / 16.
        mpidr0=$(((cpu0 / 16) << 8 | cpu0 % 16))
        mpidr1=$(((cpu1 / 16) << 8 | cpu1 % 16))
        printf '\t\tvm%d {\n' "$i"
        printf '\t\t\tcompatible = "smmu-hv,vm";\n'
        printf '\t\t\t#address-cells = <2>;\n\t\t\t#size-cells = <2>;\n'
        printf '\t\t\tcpus = <%d>;\n' "$VM_CPUS"
        printf '\t\t\tsmmu-hv,cpus = <0x%x 0x%x>;\n' "$mpidr0" "$mpidr1"
        printf '\t\t\tmemory = <0x0 0x%x>;\n' "$VM_MEM_KIB"
        bdfs="${VM_PCI[$i]-$(pci_bdfs "$i")}"
        if [ -n "$bdfs" ]; then
            printf '\t\t\tsmmu-hv,pci-devices = %s;\n' "$(dts_string_list "$bdfs")"
        fi
        [ -z "${VM_INTX_ONLY[$i]-}" ] || printf '\t\t\tsmmu-hv,intx-only;\n'
        [ -z "${VM_IOMMU[$i]-}" ] || printf '\t\t\tsmmu-hv,iommu = "%s";\n' "${VM_IOMMU[$i]}"
        printf '\t\t\tmodule@%x {\n' "$GUEST_KERNEL_ADDR"
        printf '\t\t\t\tcompatible = "multiboot,kernel", "multiboot,module";\n'
        printf '\t\t\t\treg = <0x0 %s 0x0 %s>;\n' "$GUEST_KERNEL_ADDR" "$KERNEL_SIZE"
        printf '\t\t\t\tbootargs = %s;\n' "$(dts_string "${VM_BOOTARGS[$i]-$DEFAULT_BOOTARGS}")"
        printf '\t\t\t};\n'
        printf '\t\t\tmodule@%x {\n' "$GUEST_INITRD_ADDR"
        printf '\t\t\t\tcompatible = "multiboot,ramdisk", "multiboot,module";\n'
        printf '\t\t\t\treg = <0x0 %s 0x0 %s>;\n' "$GUEST_INITRD_ADDR" "$INITRD_SIZE"
        printf '\t\t\t};\n'
        printf '\t\t};\n'
    done
    printf '\t};\n};\n'
}

if [ -z "$VM_DTS" ]; then
    for i in "${!VM_BOOTARGS[@]}"; do
        [ "$i" -lt "$VMS" ] || die "--vm-bootargs $i: there are only $VMS VMs (--vms $VMS)"
    done
    for i in "${!VM_PCI[@]}"; do
        [ "$i" -lt "$VMS" ] || die "--vm-pci $i: there are only $VMS VMs (--vms $VMS)"
    done
    for i in "${!VM_INTX_ONLY[@]}"; do
        [ "$i" -lt "$VMS" ] || die "--vm-intx-only $i: there are only $VMS VMs (--vms $VMS)"
    done
    for i in "${!VM_IOMMU[@]}"; do
        [ "$i" -lt "$VMS" ] || die "--vm-iommu $i: there are only $VMS VMs (--vms $VMS)"
    done
    [ $((VMS * VM_CPUS)) -le "$SMP" ] ||
        die "--vms $VMS needs $((VMS * VM_CPUS)) CPUs ($VM_CPUS per VM) but --smp is $SMP"
else
    [ "${#VM_BOOTARGS[@]}" = 0 ] || say "note: --vm-dts given: --bootargs/--vm-bootargs are ignored"
    [ "${#VM_PCI[@]}" = 0 ] || say "note: --vm-dts given: --vm-pci is ignored"
fi

BOARD_DIR="$ROOT/build/board"
mkdir -p "$BOARD_DIR"
# Every run rewrites its files, so those not used for a day belong to old configs (and tmp.*
# to runs that were killed before they could clean up).
find "$BOARD_DIR" -maxdepth 1 \( -name 'vms-*' -mmin +1440 -o -name 'tmp.*' -mmin +60 \) \
    -exec rm -rf {} + 2>/dev/null || true
WORK="$(mktemp -d "$BOARD_DIR/tmp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 1. The machine's own DT, from QEMU with the same machine options (it writes it and exits).
qemu-system-aarch64 -M "$MACHINE,dumpdtb=$(qemu_escape "$WORK/machine.dtb")" "${MACHINE_OPTS[@]}" \
    -kernel "$HV_IMAGE" "${EXTRA[@]}" </dev/null >"$WORK/dump.log" 2>&1 ||
    { cat "$WORK/dump.log" >&2; die "QEMU could not dump the machine's DT"; }
[ -s "$WORK/machine.dtb" ] || { cat "$WORK/dump.log" >&2; die "QEMU wrote no DT"; }

# 2. Decompiled, with the random seeds zeroed (QEMU refills rng-seed and kaslr-seed of the DT
#    it loads at every reset, so nothing is lost) so that the same VMs give the same file; then
#    the VMs block appended: dtc merges a second root block into the first.
dtc -q -I dtb -O dts -o "$WORK/machine.dts" "$WORK/machine.dtb" ||
    die "dtc could not decompile the machine's DT"
{
    sed -E '/^\s*(rng-seed|kaslr-seed) = </s/0x[0-9a-f]+/0x00/g' "$WORK/machine.dts"
    if [ -n "$HOST_DTS" ]; then
        [ -r "$HOST_DTS" ] || die "--host-dts: cannot read '$HOST_DTS'"
        printf '\n/* Merged from --host-dts %s. */\n' "$HOST_DTS"
        cat "$HOST_DTS"
    fi
    vms_block
} >"$WORK/vms.dts"

if [ "$SHOW_DTS" = 1 ]; then
    cat "$WORK/vms.dts"
    exit 0
fi

# 3. Compiled under a name from its content (written whole, then renamed: concurrent runs are safe).
HASH="$(sha256sum "$WORK/vms.dts" | cut -c1-16)"
DTS="$BOARD_DIR/vms-$HASH.dts"
DTB="$BOARD_DIR/vms-$HASH.dtb"
if ! dtc -q -I dts -O dtb -o "$WORK/vms.dtb" "$WORK/vms.dts"; then
    cp "$WORK/vms.dts" "$DTS.bad"
    die "dtc rejected the DTS (errors above; the DTS is kept as ${DTS#"$ROOT"/}.bad)"
fi
mv -f "$WORK/vms.dts" "$DTS"
mv -f "$WORK/vms.dtb" "$DTB"

# --pci: the devices of vm0 and vm1 (as many VMs as there are, at most two). Not in the DT dump
# above: PCI functions are not in the DT, and the disk images stay unopened until the real run.
if [ "$PCI" = 1 ]; then
    for ((i = 0; i < VMS && i < ${#PCI_SLOTS[@]}; i++)); do
        pci_args "$i"
    done
fi

M="$MACHINE"
[ -n "$DUMPDTB" ] && M="$M,dumpdtb=$(qemu_escape "$DUMPDTB")"
CMD=(qemu-system-aarch64 -M "$M" "${MACHINE_OPTS[@]}"
    -kernel "$HV_IMAGE"
    -dtb "$DTB"
    -device "loader,file=$(qemu_escape "$GUEST_IMAGE"),addr=$GUEST_KERNEL_ADDR,force-raw=on"
    -device "loader,file=$(qemu_escape "$GUEST_INITRD"),addr=$GUEST_INITRD_ADDR,force-raw=on"
    "${PCI_ARGS[@]}" "${EXTRA[@]}")

if [ -n "$VM_DTS" ]; then
    what="VMs from $VM_DTS"
else
    what="$VMS VM(s)"
    for ((i = 0; i < VMS; i++)); do
        what="$what; vm$i: ${VM_BOOTARGS[$i]-$DEFAULT_BOOTARGS}"
    done
fi
say "hypervisor, $what (DT: ${DTS#"$ROOT"/}): ${CMD[*]}"
rm -rf "$WORK"
trap - EXIT
exec "${CMD[@]}"

#!/bin/busybox sh
# Guest side of the benchmark (qemu/bench.sh, tests/src/bin/bench/). The modular guest's
# initramfs carries it as /bench.sh next to /init (qemu/kernel.sh); the host types
# `sh /bench.sh WORKLOAD [ARGS]` into the guest's shell. It prints its figures as
# `bench: KEY=VALUE` lines, which the host parses; it judges nothing.
#
# The measured part of each workload is bracketed by two handshakes with the host on the console,
# so the host can read the hypervisor's vSMMU counters just before and just after it:
# `bench: ready=WORKLOAD`, wait for a line on the console, the workload, its figures,
# `bench: measured=WORKLOAD`, wait for a line, `bench: end=WORKLOAD`. Each wait gives up after 600 s.
# Times are the guest's own wall clock in microseconds (busybox ash's EPOCHREALTIME; /proc/uptime
# in centiseconds if the shell lacks it).
#
# Workloads:
#   info                   what the guest has: clock source, IOMMU domains of its PCI functions
#   seq [PASSES]           sequential O_DIRECT reads, 1 MiB blocks over the disk's first 8 MiB,
#                          one dd a pass, PASSES times (default 64: 512 MiB): seq-bytes, seq-us
#   4k [PASSES]            4 KiB O_DIRECT reads, one read(2) each, sequential over the disk's
#                          first 8 MiB (2048 reads in one dd a pass), PASSES times (default 4):
#                          4k-reads, 4k-us
#   rand [COUNT]           COUNT (default 200) 4 KiB O_DIRECT reads at pseudo-random 4 KiB offsets
#                          of the first 8 MiB (a fixed list, the same every run), one dd each:
#                          rand-reads, rand-us; then the same loop of dd reading /dev/zero
#                          (no device I/O): rand-spawn-us, what the dd processes alone cost
#   dma-setup [BDF]        binds PCI function BDF (default 00:02.0, the NIC) to the kernel's
#                          dma_map_benchmark driver and mounts debugfs: dma-bound, dma-domain
#   dma T G S              dma_map_benchmark -t T -g G -s S (T threads, G pages per mapping,
#                          S seconds): dma-tT-gG-map-us, -map-sd-us, -unmap-us, -unmap-sd-us
#                          (the tool's averages and standard deviations, in us, 0.1 us steps)
#   net-sink [PORT]        (no handshake) serves TCP PORT (default 5001) in the background with
#                          busybox nc, for any number of connections: each one's bytes are
#                          counted (wc -c) and the count is sent back when the sender is done
#   net-send PEER MIB [PORT]  pings PEER (20 x 1400 bytes, 50 ms apart: ping-avg-ms), then sends
#                          it MIB MiB over TCP with nc and reads back the count the sink received:
#                          net-bytes (sent), net-received, net-us (from the first byte sent to the
#                          count back)
set -u

if [ -n "${EPOCHREALTIME:-}" ]; then
    clock=epochrealtime
    now_us() {
        t=$EPOCHREALTIME
        echo "${t%.*}${t#*.}"
    }
else
    clock=uptime-cs
    now_us() { echo $(($(tr -d . </proc/uptime | cut -d' ' -f1) * 10000)); }
fi

# The handshake: a marker line, then one line from the console.
handshake() {
    echo "bench: $1=$2"
    # shellcheck disable=SC3045 # busybox ash has read -t
    read -r -t 600 _ || echo "bench: no-go=$2"
}

# The whole records dd reports it read (`N+M records in` gives N).
records_in() { sed -n 's/^\([0-9]*\)+[0-9]* records in$/\1/p'; }

w=${1:-}
[ "$#" -gt 0 ] && shift
case "$w" in
    info)
        echo "bench: clock=$clock"
        echo "bench: kernel=$(uname -r)"
        echo "bench: nproc=$(nproc)"
        echo "bench: cmdline=$(cat /proc/cmdline)"
        for d in /sys/bus/pci/devices/*; do
            [ -e "$d" ] || continue
            t=none
            [ -r "$d/iommu_group/type" ] && t=$(cat "$d/iommu_group/type")
            echo "bench: iommu-domain-${d##*/0000:}=$t"
        done
        echo "bench: smmu-driver=$(grep -c '^arm_smmu_v3 ' /proc/modules)"
        echo "bench: dma-tool=$([ -x /bin/dma_map_benchmark ] && echo yes || echo no)"
        echo "bench: nc=$(busybox nc 2>&1 | grep -q 'applet not found' && echo no || echo yes)"
        ;;
    seq)
        passes=${1:-64}
        handshake ready seq
        bad=0
        t0=$(now_us)
        i=0
        while [ "$i" -lt "$passes" ]; do
            dd if=/dev/vda of=/dev/null bs=1048576 count=8 iflag=direct 2>/dev/null || bad=$((bad + 1))
            i=$((i + 1))
        done
        t1=$(now_us)
        echo "bench: seq-bytes=$((passes * 8 * 1048576))"
        echo "bench: seq-us=$((t1 - t0))"
        echo "bench: seq-errors=$bad"
        handshake measured seq
        echo "bench: end=seq"
        ;;
    4k)
        passes=${1:-4}
        handshake ready 4k
        n=0
        t0=$(now_us)
        i=0
        while [ "$i" -lt "$passes" ]; do
            r=$(dd if=/dev/vda of=/dev/null bs=4096 count=2048 iflag=direct 2>&1 | records_in)
            n=$((n + ${r:-0}))
            i=$((i + 1))
        done
        t1=$(now_us)
        echo "bench: 4k-reads=$n"
        echo "bench: 4k-us=$((t1 - t0))"
        handshake measured 4k
        echo "bench: end=4k"
        ;;
    rand)
        count=${1:-200}
        # 4 KiB block numbers in the first 8 MiB (2048 blocks), the same list every run.
        list=$(awk -v n="$count" 'BEGIN { srand(20261125); for (i = 0; i < n; i++) printf "%d ", int(rand() * 2048) }')
        handshake ready rand
        ok=0
        t0=$(now_us)
        for s in $list; do
            dd if=/dev/vda of=/dev/null bs=4096 count=1 skip="$s" iflag=direct 2>/dev/null && ok=$((ok + 1))
        done
        t1=$(now_us)
        echo "bench: rand-reads=$ok"
        echo "bench: rand-us=$((t1 - t0))"
        handshake measured rand
        # The same processes without the device: what spawning the dd's costs by itself.
        t0=$(now_us)
        for s in $list; do
            dd if=/dev/zero of=/dev/null bs=4096 count=1 skip="$s" 2>/dev/null
        done
        t1=$(now_us)
        echo "bench: rand-spawn-us=$((t1 - t0))"
        echo "bench: end=rand"
        ;;
    dma-setup)
        bdf=0000:${1:-00:02.0}
        d=/sys/bus/pci/devices/$bdf
        if [ ! -e "$d" ]; then
            echo "bench: dma-bound=no-device"
            exit 0
        fi
        grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs none /sys/kernel/debug
        drv=none
        [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
        if [ "$drv" != dma_map_benchmark ]; then
            echo dma_map_benchmark >"$d/driver_override"
            [ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
            echo "$bdf" >/sys/bus/pci/drivers_probe
        fi
        drv=none
        [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
        echo "bench: dma-bound=$drv"
        t=none
        [ -r "$d/iommu_group/type" ] && t=$(cat "$d/iommu_group/type")
        echo "bench: dma-domain=$t"
        [ -e /sys/kernel/debug/dma_map_benchmark ] || echo "bench: dma-debugfs=missing"
        ;;
    dma)
        t=${1:-1}
        g=${2:-1}
        s=${3:-3}
        k="dma-t$t-g$g"
        handshake ready "$k"
        out=$(dma_map_benchmark -t "$t" -g "$g" -s "$s" 2>&1)
        # average map latency(us):12.3 standard deviation:4.5
        m=$(echo "$out" | sed -n 's/^average map latency(us):\([0-9.]*\) standard deviation:\([0-9.]*\).*/\1 \2/p')
        u=$(echo "$out" | sed -n 's/^average unmap latency(us):\([0-9.]*\) standard deviation:\([0-9.]*\).*/\1 \2/p')
        if [ -n "$m" ] && [ -n "$u" ]; then
            echo "bench: $k-map-us=${m% *}"
            echo "bench: $k-map-sd-us=${m#* }"
            echo "bench: $k-unmap-us=${u% *}"
            echo "bench: $k-unmap-sd-us=${u#* }"
        else
            echo "bench: $k-error=$(echo "$out" | tr '\n' ' ')"
        fi
        handshake measured "$k"
        echo "bench: end=$k"
        ;;
    net-sink)
        port=${1:-5001}
        nc -ll -p "$port" -e wc -c </dev/null >/dev/null 2>&1 &
        echo "bench: net-sink=$port"
        ;;
    net-send)
        peer=$1
        mib=${2:-16}
        port=${3:-5001}
        # The peer's listener may still be starting: wait until it answers pings.
        n=0
        until ping -c 1 -W 1 "$peer" >/dev/null 2>&1 || [ "$n" -ge 30 ]; do
            n=$((n + 1))
        done
        handshake ready net
        avg=$(ping -c 20 -i 0.05 -s 1400 -q "$peer" 2>&1 | sed -n 's|.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p')
        echo "bench: ping-avg-ms=${avg:-none}"
        t0=$(now_us)
        got=$(dd if=/dev/zero bs=65536 count=$((mib * 16)) 2>/dev/null | nc "$peer" "$port")
        t1=$(now_us)
        echo "bench: net-bytes=$((mib * 1048576))"
        echo "bench: net-received=${got:-none}"
        echo "bench: net-us=$((t1 - t0))"
        handshake measured net
        echo "bench: end=net"
        ;;
    *)
        echo "bench: unknown-workload=$w"
        ;;
esac

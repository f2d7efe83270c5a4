/*
 * hvattack: the noisy neighbour of the noisy-neighbour test (tests/tests/noisy.rs), run by
 * tests/guest/init's `hvattack=` mode in a guest whose arm_smmu_v3 driver is unloaded. It drives
 * the guest's own vSMMU and its own devices by hand through /dev/mem and floods every path the
 * VMs share in the hypervisor (the physical command queue, stream table and event queue, and the
 * console), one flood after the other, round after round, until a stop file appears:
 *
 *   ste    STE flips on two vCPUs: one thread (pinned to CPU 0) rewrites the STE of the NIC's
 *          StreamID in its stream table between abort, bypass and stage-1 translate (with a valid
 *          CD over an empty page table), while another (pinned to CPU 1) publishes batches of
 *          128 x (CMD_CFGI_STE of that StreamID; CMD_SYNC) and waits for CONS to catch up.
 *   gbpa   With SMMUEN = 0: SMMU_GBPA written with UPDATE|ABORT, then with UPDATE alone, as fast as
 *          it goes, UPDATE polled back to 0 after each write (for 1 s at most; timeouts
 *          counted).
 *   cmdq   One full 256-entry queue of TLBI_NH_ALL, TLBI_NH_VA (naming another VM's VMID, which
 *          the vSMMU must ignore) and CMD_SYNC, PROD advanced by 256 on every write: the same
 *          entries consumed again and again.
 *   dma    Its virtio NIC (and with -b its disk too, each from its own thread on its own vCPU)
 *          programmed by hand in a loop (device reset, a queue's rings at an address that faults,
 *          the notify kick): first with SMMUEN = 0, rings at an IPA outside the VM's RAM
 *          (stage-2 faults, the hypervisor's events), then with SMMUEN = 1 and stage-1 STEs,
 *          rings at an IOVA its empty stage-1 table does not map (stage-1 faults, forwarded into
 *          its own event queue, which it consumes).
 *   storm  Loads from an IPA where the VM has nothing: each one makes the hypervisor log a line
 *          and inject an external abort, caught here as SIGBUS (sigsetjmp/siglongjmp).
 *   spin   (only with -f) a control: both vCPUs spin, no trap, no shared path.
 *
 * After each flood it prints one fact line, `guest: attack-NAME=round=R k=v ...`: what it did
 * (counts, milliseconds) and what the vSMMU answered (CMDQ_CONS, the active GERROR bits, the
 * events in its queue). It judges nothing: the host compares these facts with the hypervisor's
 * counters and log.
 *
 * Usage: hvattack -s SMMU_BASE -m RAM_BASE -p NIC_BDF [-b DISK_BDF] [-d SECS] [-n COUNT]
 *                 [-r ROUNDS] [-T MAX_SECS] [-x STOPFILE] [-u IPA] [-f ste,gbpa,cmdq,dma,storm]
 *   -s  the vSMMU's registers (the guest DT's smmuv3@ADDR node)
 *   -m  256 KiB of the VM's own RAM that Linux does not use (above its `mem=` limit)
 *   -p  its virtio-net-pci function (BB:DD.F), already released from its driver
 *   -b  its virtio-blk-pci function, released from its driver too: the dma flood kicks both
 *   -d  how long each flood runs (default 4 s); -n  at most this many iterations of each
 *   -r  rounds at most (default 0: until stopped); -T  whole run at most (default 300 s)
 *   -x  stop (after the current flood) once this file exists (default /tmp/hvattack-stop)
 *   -u  the unmapped IPA of the storm (default 0x0a000000)
 *   -f  the floods of a round, in this order (default ste,gbpa,cmdq,dma,storm; or spin)
 *
 * Every access to the vSMMU and to the tables is one aligned 32- or 64-bit load or store
 * (/dev/mem maps memory Linux does not own as Device memory, where libc's memset or memcpy
 * would fault); each trapped access is then one the hypervisor can decode.
 *
 * Encodings (Arm IHI 0070; the same as smmu/src/cmd.rs, smmu/src/ste.rs and the `hvhostile=`
 * mode of tests/guest/init):
 *  - registers, 6.3: CR0 0x20 (SMMUEN 0, EVTQEN 2, CMDQEN 3; 6.3.9), CR0ACK 0x24 (6.3.10),
 *    GBPA 0x44 (UPDATE 31, ABORT 20; 6.3.14), IRQ_CTRL 0x50, GERROR 0x60 / GERRORN 0x64 (active
 *    errors are the bits that differ; 6.3.18), STRTAB_BASE 0x80 (ADDR [51:6]), STRTAB_BASE_CFG
 *    0x88 (FMT [17:16] 0 = linear, LOG2SIZE [5:0]; 6.3.24), CMDQ_BASE 0x90 (ADDR [51:5],
 *    LOG2SIZE [4:0]), CMDQ_PROD 0x98 / CMDQ_CONS 0x9c (index and wrap bit [LOG2SIZE:0], CONS.ERR
 *    [30:24]), EVENTQ_BASE 0xa0, EVENTQ_PROD / EVENTQ_CONS at 0x100a8 / 0x100ac in page 1
 *    (OVFLG / OVACKFLG bit 31).
 *  - commands, chapter 4: 16 bytes, opcode in dword 0 [7:0].
 *    CMD_CFGI_STE 0x03 (4.3.1): StreamID dword 0 [63:32], SSec [10] = 0; Leaf dword 1 [0].
 *    CMD_TLBI_NH_ALL 0x10 (4.4): VMID dword 0 [47:32].
 *    CMD_TLBI_NH_VA 0x12 (4.4): NUM [16:12] = SCALE [24:20] = 0 (no range), VMID [47:32], ASID
 *    [63:48]; dword 1: Leaf [0], TTL [9:8] = TG [11:10] = 0, Address [63:12].
 *    CMD_SYNC 0x46 (4.7.3): CS [13:12] = 0 (SIG_NONE: completion is CONS passing it).
 *  - STE, 5.2: dword 0 V [0], Config [3:1] (0b000 abort, 0b100 bypass, 0b101 stage-1
 *    translate), S1Fmt [5:4] = 0, S1ContextPtr [51:6], S1CDMax [63:59] = 0; dwords 1-7 zero
 *    (S1DSS, S1CIR/COR/CSH, STRW = NS-EL1). Only dword 0 differs between the three, so a
 *    64-bit store switches them at once: the reader never sees half of one.
 *  - CD, 5.4: dword 0 T0SZ [5:0] = 25, TG0 [7:6] = 0 (4 KiB), IR0 [9:8] = OR0 [11:10] = 1,
 *    SH0 [13:12] = 3, EPD1 [30], V [31], IPS [34:32] = 2 (40 bits), AA64 [41], R [45], A [46],
 *    ASID [63:48] = 1; dword 1 TTB0 [51:4]; dword 3 MAIR. TTB0 is a zeroed level-1 table, so
 *    every stage-1 walk faults with F_TRANSLATION.
 *  - event record, 7.3: 32 bytes, event number in dword 0 [7:0], StreamID [63:32].
 *  - virtio 1.x PCI (virtio spec 4.1.4): the common configuration structure and the notify
 *    structure are found through the vendor capabilities in configuration space.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* SMMUv3 registers (IHI 0070 6.3). */
#define SMMU_IDR0 0x00
#define SMMU_CR0 0x20
#define SMMU_CR0ACK 0x24
#define SMMU_GBPA 0x44
#define SMMU_IRQ_CTRL 0x50
#define SMMU_GERROR 0x60
#define SMMU_GERRORN 0x64
#define SMMU_STRTAB_BASE 0x80
#define SMMU_STRTAB_BASE_CFG 0x88
#define SMMU_CMDQ_BASE 0x90
#define SMMU_CMDQ_PROD 0x98
#define SMMU_CMDQ_CONS 0x9c
#define SMMU_EVENTQ_BASE 0xa0
#define SMMU_EVENTQ_PROD 0x100a8
#define SMMU_EVENTQ_CONS 0x100ac
#define SMMU_MMIO_SIZE 0x20000

#define CR0_SMMUEN (1u << 0)
#define CR0_EVTQEN (1u << 2)
#define CR0_CMDQEN (1u << 3)
#define GBPA_ABORT (1u << 20)
#define GBPA_UPDATE (1u << 31)
#define CONS_ERR(c) (((c) >> 24) & 0x7f)
#define Q_OVFLG (1u << 31)

/* Command opcodes (IHI 0070 4.1.1). */
#define OP_CFGI_STE 0x03
#define OP_TLBI_NH_ALL 0x10
#define OP_TLBI_NH_VA 0x12
#define OP_SYNC 0x46

/* The queues: 256 commands (CMDQ LOG2SIZE 8), 128 events (EVENTQ LOG2SIZE 7). */
#define CMDQ_LOG2 8
#define CMDQ_ENTRIES (1u << CMDQ_LOG2)
#define CMDQ_PTR_MASK ((CMDQ_ENTRIES << 1) - 1) /* index and wrap bit */
#define EVTQ_LOG2 7
#define EVTQ_PTR_MASK (((1u << EVTQ_LOG2) << 1) - 1)

/* What the RAM window holds, as offsets from its base. */
#define RAM_SIZE 0x40000
#define OFF_STRTAB 0x00000 /* linear stream table, 256 STEs (STRTAB_BASE_CFG.LOG2SIZE 8) */
#define STRTAB_LOG2 8
#define OFF_CMDQ 0x10000
#define OFF_EVTQ 0x11000
#define OFF_CD 0x13000
#define OFF_PT 0x14000 /* the CD's TTB0: a level-1 table of invalid descriptors */

/* STE.Config values in dword 0 with V = 1 (IHI 0070 5.2). */
#define STE_ABORT 0x1ull
#define STE_BYPASS 0x9ull
#define STE_S1 0xbull


/* A poll of a register gives up after this long, as Linux's arm-smmu-v3 driver does
 * (ARM_SMMU_POLL_TIMEOUT_US): a guest driver would fail past it. */
#define POLL_SECS 1.0

/* The rings of the faulting DMA: outside the VM's RAM (1 GiB at 1 GiB; 8 GiB is far beyond it),
 * and an IOVA its stage-1 table does not map. */
#define DMA_S2_FAULT 0x200000000ull
#define DMA_S1_FAULT 0x10000000ull

static volatile uint8_t *smmu;  /* the vSMMU's two register pages */
static volatile uint8_t *ram;   /* RAM_SIZE bytes of the VM's RAM */
static uint64_t ram_base;       /* its IPA */

/* One of its virtio functions, programmed by hand: its StreamID, the queue it kicks, and its
 * common configuration and notify structures. */
struct vdev {
    const char *bdf;
    const char *kind;
    unsigned sid;
    uint16_t queue;
    int cfg_fd;
    volatile uint8_t *common;
    volatile uint8_t *notify;
    uint32_t notify_mult;
};

/* Its NIC (devs[0], whose STE the ste flood flips) and, with -b, its disk. */
static struct vdev devs[2];
static unsigned ndevs;

static double flood_secs = 4.0;
static unsigned long max_iters; /* 0: no limit */
static unsigned max_rounds;     /* 0: until stopped */
static double max_total = 300.0;
static const char *stop_file = "/tmp/hvattack-stop";
static uint64_t storm_ipa = 0x0a000000;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("guest: attack-error=");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    exit(1);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Polling state: the clock is read every 64 polls only. */
struct poll {
    double until;
    unsigned n;
};

static struct poll poll_start(void) { return (struct poll){now() + POLL_SECS, 0}; }

/* Whether a poll may go on. */
static int poll_more(struct poll *p) { return (++p->n & 63) || now() < p->until; }

static void barrier(void)
{
    /* Table and queue writes land before the register write that publishes them. */
    __asm__ volatile("dsb st" ::: "memory");
}

static uint32_t r32(unsigned off) { return *(volatile uint32_t *)(smmu + off); }
static void w32(unsigned off, uint32_t v) { *(volatile uint32_t *)(smmu + off) = v; }
static void w64(unsigned off, uint64_t v) { *(volatile uint64_t *)(smmu + off) = v; }
static uint64_t m64(unsigned off) { return *(volatile uint64_t *)(ram + off); }
static void set64(unsigned off, uint64_t v) { *(volatile uint64_t *)(ram + off) = v; }

/* Active global errors (GERROR ^ GERRORN). */
static uint32_t gerror(void) { return r32(SMMU_GERROR) ^ r32(SMMU_GERRORN); }

/* Writes CR0 and polls CR0ACK (IHI 0070 6.3.10); returns whether it followed. */
static int set_cr0(uint32_t v)
{
    w32(SMMU_CR0, v);
    for (struct poll p = poll_start(); poll_more(&p);)
        if (r32(SMMU_CR0ACK) == v)
            return 1;
    return 0;
}

static void cmd(unsigned slot, uint64_t d0, uint64_t d1)
{
    set64(OFF_CMDQ + slot * 16, d0);
    set64(OFF_CMDQ + slot * 16 + 8, d1);
}

static uint64_t cfgi_ste(unsigned sid) { return OP_CFGI_STE | (uint64_t)sid << 32; }
static uint64_t tlbi_nh_all(unsigned vmid) { return OP_TLBI_NH_ALL | (uint64_t)vmid << 32; }
static uint64_t tlbi_nh_va(unsigned vmid, unsigned asid)
{
    return OP_TLBI_NH_VA | (uint64_t)vmid << 32 | (uint64_t)asid << 48;
}

/* The command queue's producer index as last written, and the one CONS must reach. */
static uint32_t prod;

/* Publishes PROD and polls CONS (index, wrap and ERR) until it equals PROD; returns the polls
 * it took beyond the first read (0 when the PROD trap had already consumed everything), or -1
 * on an error or after POLL_SECS. *cons is what CONS read last. */
static long publish(uint32_t p, uint32_t *cons)
{
    barrier();
    w32(SMMU_CMDQ_PROD, p);
    struct poll t = poll_start();
    do {
        *cons = r32(SMMU_CMDQ_CONS);
        if (*cons == p)
            return (long)t.n;
        if (CONS_ERR(*cons))
            return -1;
    } while (poll_more(&t));
    return -1;
}

/* CFGI_STE of `sid` and a CMD_SYNC, published and waited for. */
static void invalidate_ste(unsigned sid)
{
    uint32_t cons;
    unsigned i = prod & (CMDQ_ENTRIES - 1);
    cmd(i, cfgi_ste(sid), 1);
    cmd((i + 1) & (CMDQ_ENTRIES - 1), OP_SYNC, 0);
    prod = (prod + 2) & CMDQ_PTR_MASK;
    publish(prod, &cons);
}

static void set_ste(unsigned sid, uint64_t dword0)
{
    barrier();
    set64(OFF_STRTAB + sid * 64, dword0);
    invalidate_ste(sid);
}

static int stop_requested(double t0)
{
    return access(stop_file, F_OK) == 0 || now() - t0 >= max_total;
}

/* Pins the calling thread to `cpu`; returns the CPU it then runs on. */
static int pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        return -1;
    sched_yield();
    return sched_getcpu();
}

/* ---- 1. STE flips on two vCPUs ---------------------------------------------------------- */

struct flip {
    volatile int stop;
    unsigned long flips;
    int cpu;
};

static void *flipper(void *arg)
{
    struct flip *f = arg;
    const uint64_t cfgs[3] = {STE_ABORT, STE_BYPASS, STE_S1 | (ram_base + OFF_CD)};
    unsigned off = OFF_STRTAB + devs[0].sid * 64;
    f->cpu = pin(0);
    while (!f->stop) {
        set64(off, cfgs[f->flips % 3]);
        f->flips++;
    }
    return NULL;
}

struct batcher {
    double secs;
    unsigned long batches, cons_timeouts, polls;
    uint32_t cons;
    int cpu;
};

static void *batcher(void *arg)
{
    struct batcher *b = arg;
    b->cpu = pin(1);
    double t0 = now();
    while (now() - t0 < b->secs && (!max_iters || b->batches < max_iters)) {
        /* A whole queue: PROD moves by 256, its index stays, its wrap bit flips. */
        prod = (prod + CMDQ_ENTRIES) & CMDQ_PTR_MASK;
        long n = publish(prod, &b->cons);
        if (n < 0) {
            b->cons_timeouts++;
            if (CONS_ERR(b->cons))
                break;
        } else {
            b->polls += (unsigned long)n;
        }
        b->batches++;
    }
    return NULL;
}

static void flood_ste(unsigned round)
{
    for (unsigned i = 0; i < CMDQ_ENTRIES; i += 2) {
        cmd(i, cfgi_ste(devs[0].sid), 1);
        cmd(i + 1, OP_SYNC, 0);
    }
    int en = set_cr0(CR0_CMDQEN | CR0_EVTQEN | CR0_SMMUEN);
    struct flip f = {0};
    struct batcher b = {.secs = flood_secs};
    pthread_t tf, tb;
    double t0 = now();
    if (pthread_create(&tf, NULL, flipper, &f) || pthread_create(&tb, NULL, batcher, &b))
        die("pthread_create: %s", strerror(errno));
    pthread_join(tb, NULL);
    f.stop = 1;
    pthread_join(tf, NULL);
    double ms = (now() - t0) * 1e3;
    /* Leave the NIC's stream as the next flood expects it (stage 2 only). */
    set_ste(devs[0].sid, STE_BYPASS);
    printf("guest: attack-ste=round=%u flips=%lu batches=%lu commands=%lu cfgi=%lu syncs=%lu "
           "cons-timeouts=%lu cons-polls=%lu cons=0x%08x prod=0x%08x gerror=%u smmuen=%d "
           "flip-cpu=%d batch-cpu=%d ms=%.0f\n",
           round, f.flips, b.batches, b.batches * CMDQ_ENTRIES, b.batches * CMDQ_ENTRIES / 2,
           b.batches * CMDQ_ENTRIES / 2, b.cons_timeouts, b.polls, r32(SMMU_CMDQ_CONS), prod,
           gerror(), en, f.cpu, b.cpu, ms);
}

/* ---- 2. GBPA toggles -------------------------------------------------------------------- */

static void flood_gbpa(unsigned round)
{
    int en = set_cr0(CR0_CMDQEN | CR0_EVTQEN);
    uint32_t keep = r32(SMMU_GBPA) & ~(GBPA_UPDATE | GBPA_ABORT);
    unsigned long toggles = 0, polls = 0, timeouts = 0;
    double t0 = now();
    while (now() - t0 < flood_secs && (!max_iters || toggles < max_iters)) {
        uint32_t v = keep | GBPA_UPDATE | (toggles % 2 == 0 ? GBPA_ABORT : 0);
        w32(SMMU_GBPA, v);
        int done = 0;
        for (struct poll p = poll_start(); !done && poll_more(&p);) {
            polls++;
            done = !(r32(SMMU_GBPA) & GBPA_UPDATE);
        }
        if (!done)
            timeouts++;
        toggles++;
    }
    double ms = (now() - t0) * 1e3;
    /* End on bypass (GBPA's reset value): the streams back to stage 2 only. */
    if (r32(SMMU_GBPA) & GBPA_ABORT) {
        w32(SMMU_GBPA, keep | GBPA_UPDATE);
        toggles++;
    }
    printf("guest: attack-gbpa=round=%u toggles=%lu update-polls=%lu update-timeouts=%lu "
           "gbpa=0x%08x gerror=%u smmuen-off=%d ms=%.0f\n",
           round, toggles, polls, timeouts, r32(SMMU_GBPA), gerror(), en, ms);
}

/* ---- 3. Command-queue resubmission ------------------------------------------------------ */

static void flood_cmdq(unsigned round)
{
    unsigned tlbi_all = 0, tlbi_va = 0, syncs = 0;
    /* VMID 2 is another VM's (vm1's): the vSMMU must scope every TLBI to this VM's VMID. */
    for (unsigned i = 0; i < CMDQ_ENTRIES; i++) {
        if (i % 8 == 7) {
            cmd(i, OP_SYNC, 0);
            syncs++;
        } else if (i % 2 == 0) {
            cmd(i, tlbi_nh_all(2), 0);
            tlbi_all++;
        } else {
            cmd(i, tlbi_nh_va(2, 1), (uint64_t)(0x100000 + i) << 12 | 1);
            tlbi_va++;
        }
    }
    unsigned long writes = 0, lagging = 0, timeouts = 0;
    uint32_t cons = 0;
    double t0 = now();
    while (now() - t0 < flood_secs && (!max_iters || writes < max_iters)) {
        prod = (prod + CMDQ_ENTRIES) & CMDQ_PTR_MASK;
        long n = publish(prod, &cons);
        writes++;
        if (n < 0) {
            timeouts++;
            if (CONS_ERR(cons))
                break;
        } else if (n > 0) {
            lagging++;
        }
    }
    double ms = (now() - t0) * 1e3;
    printf("guest: attack-cmdq=round=%u writes=%lu commands=%lu tlbi-nh-all=%lu tlbi-nh-va=%lu "
           "syncs=%lu cons-lagging=%lu cons-timeouts=%lu cons=0x%08x prod=0x%08x gerror=%u "
           "ms=%.0f\n",
           round, writes, writes * CMDQ_ENTRIES, writes * tlbi_all, writes * tlbi_va,
           writes * syncs, lagging, timeouts, cons, prod, gerror(), ms);
}

/* ---- 4. Faulting DMA -------------------------------------------------------------------- */

static void vw8(struct vdev *d, unsigned off, uint8_t v) { *(volatile uint8_t *)(d->common + off) = v; }
static uint8_t vr8(struct vdev *d, unsigned off) { return *(volatile uint8_t *)(d->common + off); }
static void vw16(struct vdev *d, unsigned off, uint16_t v) { *(volatile uint16_t *)(d->common + off) = v; }
static uint16_t vr16(struct vdev *d, unsigned off) { return *(volatile uint16_t *)(d->common + off); }
static void vw32(struct vdev *d, unsigned off, uint32_t v) { *(volatile uint32_t *)(d->common + off) = v; }

/* virtio common configuration (virtio 1.x, 4.1.4.3). */
#define VC_DRIVER_FEATURE_SELECT 0x08
#define VC_DRIVER_FEATURE 0x0c
#define VC_DEVICE_STATUS 0x14
#define VC_QUEUE_SELECT 0x16
#define VC_QUEUE_SIZE 0x18
#define VC_QUEUE_ENABLE 0x1c
#define VC_QUEUE_NOTIFY_OFF 0x1e
#define VC_QUEUE_DESC 0x20
#define VC_QUEUE_DRIVER 0x28
#define VC_QUEUE_DEVICE 0x30
#define VS_ACK 1
#define VS_DRIVER 2
#define VS_DRIVER_OK 4
#define VS_FEATURES_OK 8
#define VS_NEEDS_RESET 0x40
/* The queue kicked: a virtio-net device's transmit queue (kicked with nothing to send it still
 * reads its avail ring; the receive queue would not), a virtio-blk device's request queue. */
#define NET_TXQ 1
#define BLK_REQQ 0

static unsigned cfg_read(struct vdev *d, unsigned off, unsigned len)
{
    uint8_t b[4] = {0};
    if (pread(d->cfg_fd, b, len, off) != (ssize_t)len)
        die("%s: config space read at 0x%x: %s", d->bdf, off, strerror(errno));
    return b[0] | b[1] << 8 | b[2] << 16 | (unsigned)b[3] << 24;
}

/* The CPU address of BAR `bar` of the function (its sysfs `resource` line). */
static uint64_t bar_addr(const char *dev, unsigned bar)
{
    char path[256], line[128];
    snprintf(path, sizeof(path), "%s/resource", dev);
    FILE *f = fopen(path, "r");
    if (!f)
        die("%s: %s", path, strerror(errno));
    uint64_t start = 0;
    for (unsigned i = 0; i <= bar && fgets(line, sizeof(line), f); i++)
        start = strtoull(line, NULL, 16);
    fclose(f);
    return start;
}

static volatile uint8_t *map_phys(uint64_t pa, size_t len)
{
    static int fd = -1;
    if (fd < 0 && (fd = open("/dev/mem", O_RDWR | O_SYNC)) < 0)
        die("/dev/mem: %s", strerror(errno));
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)pa);
    if (p == MAP_FAILED)
        die("mmap of 0x%llx+0x%zx: %s", (unsigned long long)pa, len, strerror(errno));
    return p;
}

/* Its StreamID from its BDF (the `--pci` board's iommu-map: StreamID = RequesterID). */
static unsigned bdf_sid(const char *bdf)
{
    unsigned bus, dev, fn;
    if (sscanf(bdf, "%x:%x.%x", &bus, &dev, &fn) != 3)
        die("bad BDF %s", bdf);
    unsigned sid = bus << 8 | dev << 3 | fn;
    if (sid >= 1u << STRTAB_LOG2)
        die("StreamID %u of %s does not fit its 256-entry stream table", sid, bdf);
    return sid;
}

/* Finds the function's common and notify structures (virtio 1.x, 4.1.4: vendor-specific
 * capabilities, cfg_type 1 and 2) and maps them; enables memory decode and bus mastering. */
static void vdev_setup(struct vdev *d, const char *bdf, const char *kind, uint16_t queue)
{
    char dev[128], path[192];
    d->bdf = bdf;
    d->kind = kind;
    d->sid = bdf_sid(bdf);
    d->queue = queue;
    snprintf(dev, sizeof(dev), "/sys/bus/pci/devices/0000:%s", bdf);
    snprintf(path, sizeof(path), "%s/config", dev);
    if ((d->cfg_fd = open(path, O_RDWR)) < 0)
        die("%s: %s", path, strerror(errno));
    unsigned cmdreg = cfg_read(d, 4, 2) | 0x6; /* Memory Space, Bus Master */
    uint8_t c[2] = {cmdreg & 0xff, cmdreg >> 8};
    if (pwrite(d->cfg_fd, c, 2, 4) != 2)
        die("%s: command register: %s", bdf, strerror(errno));
    uint64_t common = 0, notify = 0;
    for (unsigned p = cfg_read(d, 0x34, 1) & 0xfc, n = 0; p && n < 48;
         p = cfg_read(d, p + 1, 1) & 0xfc, n++) {
        if (cfg_read(d, p, 1) != 0x09)
            continue;
        unsigned type = cfg_read(d, p + 3, 1), bar = cfg_read(d, p + 4, 1);
        uint64_t at = bar_addr(dev, bar) + cfg_read(d, p + 8, 4);
        if (type == 1 && !common)
            common = at;
        if (type == 2 && !notify) {
            notify = at;
            d->notify_mult = cfg_read(d, p + 16, 4);
        }
    }
    if (!common || !notify)
        die("%s: no virtio common or notify capability", bdf);
    d->common = map_phys(common & ~0xfffull, 0x1000) + (common & 0xfff);
    d->notify = map_phys(notify & ~0xfffull, 0x2000) + (notify & 0xfff);
}

/* One reset-program-kick of the function's queue with rings at `addr`; returns the device
 * status read back after the kick (-1: the reset did not complete). */
static int vdev_kick(struct vdev *d, uint64_t addr)
{
    vw8(d, VC_DEVICE_STATUS, 0);
    int reset = 0;
    for (struct poll p = poll_start(); !reset && poll_more(&p);)
        reset = vr8(d, VC_DEVICE_STATUS) == 0;
    if (!reset)
        return -1;
    vw8(d, VC_DEVICE_STATUS, VS_ACK | VS_DRIVER);
    vw32(d, VC_DRIVER_FEATURE_SELECT, 1);
    vw32(d, VC_DRIVER_FEATURE, 3); /* VERSION_1, ACCESS_PLATFORM: feature bits 32, 33 */
    vw8(d, VC_DEVICE_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
    vw16(d, VC_QUEUE_SELECT, d->queue);
    vw16(d, VC_QUEUE_SIZE, 16);
    /* 64-bit fields as two 32-bit halves, low first (virtio 1.x, 4.1.3.1). */
    vw32(d, VC_QUEUE_DESC, (uint32_t)addr);
    vw32(d, VC_QUEUE_DESC + 4, (uint32_t)(addr >> 32));
    vw32(d, VC_QUEUE_DRIVER, (uint32_t)(addr + 0x1000));
    vw32(d, VC_QUEUE_DRIVER + 4, (uint32_t)((addr + 0x1000) >> 32));
    vw32(d, VC_QUEUE_DEVICE, (uint32_t)(addr + 0x2000));
    vw32(d, VC_QUEUE_DEVICE + 4, (uint32_t)((addr + 0x2000) >> 32));
    vw16(d, VC_QUEUE_ENABLE, 1);
    vw8(d, VC_DEVICE_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
    uint16_t off = vr16(d, VC_QUEUE_NOTIFY_OFF);
    barrier();
    *(volatile uint16_t *)(d->notify + (uint32_t)off * d->notify_mult) = d->queue;
    return vr8(d, VC_DEVICE_STATUS);
}

/* Events in its own event queue since `*cons`, consumed (CONS moved to PROD, an overflow
 * acknowledged); `*overflows` counts the overflows seen, `*first` takes the first event's
 * number. */
static unsigned long drain_events(uint32_t *cons, unsigned long *overflows, unsigned *first)
{
    uint32_t p = r32(SMMU_EVENTQ_PROD);
    uint32_t pi = p & EVTQ_PTR_MASK, ci = *cons & EVTQ_PTR_MASK;
    unsigned long n = (pi - ci) & EVTQ_PTR_MASK;
    if (n && !*first)
        *first = (unsigned)(m64(OFF_EVTQ + (ci & ((1u << EVTQ_LOG2) - 1)) * 32) & 0xff);
    if ((p & Q_OVFLG) != (*cons & Q_OVFLG))
        (*overflows)++;
    *cons = pi | (p & Q_OVFLG);
    w32(SMMU_EVENTQ_CONS, *cons);
    return n;
}

/* One phase of the faulting DMA on one function, on one vCPU; the first one also consumes
 * its event queue when asked to. */
struct kicker {
    struct vdev *dev;
    int cpu;
    uint64_t addr;
    int drain;
    double secs;
    unsigned long kicks, stuck, needs_reset, events, overflows;
    uint32_t cons;
    unsigned first;
};

static void *kicker(void *arg)
{
    struct kicker *k = arg;
    pin(k->cpu);
    double t0 = now();
    while (now() - t0 < k->secs && (!max_iters || k->kicks < max_iters)) {
        int st = vdev_kick(k->dev, k->addr);
        if (st < 0)
            k->stuck++;
        else if (st & VS_NEEDS_RESET)
            k->needs_reset++;
        k->kicks++;
        if (k->drain)
            k->events += drain_events(&k->cons, &k->overflows, &k->first);
    }
    return NULL;
}

/* Runs a phase: each function kicked from its own thread, function i on vCPU i. */
static void kick_phase(struct kicker *ks, uint64_t addr, int drain, uint32_t cons)
{
    pthread_t t[2];
    for (unsigned i = 0; i < ndevs; i++) {
        ks[i] = (struct kicker){.dev = &devs[i], .cpu = (int)i, .addr = addr,
                                .drain = drain && i == 0, .secs = flood_secs / 2, .cons = cons};
        if (pthread_create(&t[i], NULL, kicker, &ks[i]))
            die("pthread_create: %s", strerror(errno));
    }
    for (unsigned i = 0; i < ndevs; i++)
        pthread_join(t[i], NULL);
}

static void flood_dma(unsigned round)
{
    struct kicker s2[2], s1[2];
    unsigned long kicks[2] = {0}, stuck = 0, needs_reset = 0;
    /* Phase 0, stage 2: the vSMMU off, GBPA bypass (stage 2 only), rings outside its RAM. */
    double t0 = now(), ms[2];
    int off = set_cr0(CR0_CMDQEN | CR0_EVTQEN);
    kick_phase(s2, DMA_S2_FAULT, 0, 0);
    ms[0] = (now() - t0) * 1e3;
    /* Phase 1, stage 1: their STEs translate through the CD's empty table. */
    double t1 = now();
    for (unsigned i = 0; i < ndevs; i++)
        set64(OFF_STRTAB + devs[i].sid * 64, STE_S1 | (ram_base + OFF_CD));
    int on = set_cr0(CR0_CMDQEN | CR0_EVTQEN | CR0_SMMUEN);
    for (unsigned i = 0; i < ndevs; i++)
        invalidate_ste(devs[i].sid);
    kick_phase(s1, DMA_S1_FAULT, 1, r32(SMMU_EVENTQ_CONS));
    /* The hypervisor forwards events as it drains the physical queue: let the last ones in. */
    usleep(300000);
    s1[0].events += drain_events(&s1[0].cons, &s1[0].overflows, &s1[0].first);
    ms[1] = (now() - t1) * 1e3;
    for (unsigned i = 0; i < ndevs; i++) {
        kicks[0] += s2[i].kicks;
        kicks[1] += s1[i].kicks;
        stuck += s2[i].stuck + s1[i].stuck;
        needs_reset += s2[i].needs_reset + s1[i].needs_reset;
        vw8(&devs[i], VC_DEVICE_STATUS, 0);
        set_ste(devs[i].sid, STE_BYPASS);
    }
    set_cr0(CR0_CMDQEN | CR0_EVTQEN);
    printf("guest: attack-dma=round=%u devices=%u kicks=%lu s2-kicks=%lu s1-kicks=%lu "
           "s1-events=%lu s1-first-event=0x%02x evtq-overflows=%lu needs-reset=%lu "
           "resets-stuck=%lu gerror=%u smmuen=%d,%d s2-ms=%.0f s1-ms=%.0f\n",
           round, ndevs, kicks[0] + kicks[1], kicks[0], kicks[1], s1[0].events, s1[0].first,
           s1[0].overflows, needs_reset, stuck, gerror(), off, on, ms[0], ms[1]);
}

/* ---- 5. Unmapped-IPA log storm ---------------------------------------------------------- */

static sigjmp_buf storm_env;
static volatile unsigned long sigbus;

static void on_sigbus(int sig)
{
    (void)sig;
    sigbus++;
    siglongjmp(storm_env, 1);
}

static void flood_storm(unsigned round)
{
    static volatile uint32_t *hole;
    if (!hole)
        hole = (volatile uint32_t *)map_phys(storm_ipa, 0x1000);
    /* SA_NODEFER and sigsetjmp without the mask: no sigprocmask call per load. */
    struct sigaction sa = {.sa_handler = on_sigbus, .sa_flags = SA_NODEFER};
    sigemptyset(&sa.sa_mask);
    struct sigaction old;
    sigaction(SIGBUS, &sa, &old);
    sigbus = 0;
    volatile unsigned long loads = 0, answered = 0;
    volatile uint32_t last = 0;
    double t0 = now();
    sigsetjmp(storm_env, 0);
    while (now() - t0 < flood_secs && (!max_iters || loads < max_iters)) {
        loads++;
        last = *hole;
        answered++;
    }
    sigaction(SIGBUS, &old, NULL);
    double ms = (now() - t0) * 1e3;
    printf("guest: attack-storm=round=%u ipa=0x%llx loads=%lu sigbus=%lu answered=%lu "
           "last=0x%x gerror=%u ms=%.0f\n",
           round, (unsigned long long)storm_ipa, loads, sigbus, answered, last, gerror(), ms);
}

/* ---- A control: CPU time only ---------------------------------------------------------- */

struct spinner {
    volatile int stop;
    unsigned long loops;
    int cpu;
};

static void *spinner(void *arg)
{
    struct spinner *p = arg;
    p->cpu = pin(p->cpu);
    while (!p->stop)
        p->loops++;
    return NULL;
}

/* Both vCPUs spin without a trap: what the floods cost the other VM through the host's CPUs
 * alone (under TCG its vCPUs are host threads), with no shared path of the hypervisor in it.
 * Not part of the default rounds (-f spin). */
static void flood_spin(unsigned round)
{
    struct spinner sp[2] = {{.cpu = 0}, {.cpu = 1}};
    pthread_t t[2];
    double t0 = now();
    for (unsigned i = 0; i < 2; i++)
        if (pthread_create(&t[i], NULL, spinner, &sp[i]))
            die("pthread_create: %s", strerror(errno));
    while (now() - t0 < flood_secs)
        usleep(10000);
    for (unsigned i = 0; i < 2; i++) {
        sp[i].stop = 1;
        pthread_join(t[i], NULL);
    }
    printf("guest: attack-spin=round=%u loops=%lu cpus=%d,%d gerror=%u ms=%.0f\n", round,
           sp[0].loops + sp[1].loops, sp[0].cpu, sp[1].cpu, gerror(), (now() - t0) * 1e3);
}

/* ---- set-up and the rounds -------------------------------------------------------------- */

static void setup(void)
{
    for (unsigned off = 0; off < RAM_SIZE; off += 8)
        set64(off, 0);
    /* The stream table: every STE bypass (for its StreamIDs the VM's stage 2 only) until a
     * flood changes its functions'. */
    for (unsigned sid = 0; sid < 1u << STRTAB_LOG2; sid++)
        set64(OFF_STRTAB + sid * 64, STE_BYPASS);
    /* The CD: 39-bit VA, 4 KiB granule, TTB1 disabled, 40-bit IPS, AArch64, faults recorded and
     * aborted, ASID 1, TTB0 the empty level-1 table (IHI 0070 5.4). */
    uint64_t cd0 = 25 | 1ull << 8 | 1ull << 10 | 3ull << 12 | 1ull << 30 | 1ull << 31 |
                   2ull << 32 | 1ull << 41 | 1ull << 45 | 1ull << 46 | 1ull << 48;
    set64(OFF_CD, cd0);
    set64(OFF_CD + 8, ram_base + OFF_PT);
    set64(OFF_CD + 24, 0xff);
    if (!set_cr0(0))
        die("CR0ACK did not follow CR0=0");
    w32(SMMU_IRQ_CTRL, 0);
    w64(SMMU_STRTAB_BASE, ram_base + OFF_STRTAB);
    w32(SMMU_STRTAB_BASE_CFG, STRTAB_LOG2);
    w64(SMMU_CMDQ_BASE, (ram_base + OFF_CMDQ) | CMDQ_LOG2);
    w32(SMMU_CMDQ_PROD, 0);
    w32(SMMU_CMDQ_CONS, 0);
    w64(SMMU_EVENTQ_BASE, (ram_base + OFF_EVTQ) | EVTQ_LOG2);
    w32(SMMU_EVENTQ_PROD, 0);
    w32(SMMU_EVENTQ_CONS, 0);
    prod = 0;
    if (!set_cr0(CR0_CMDQEN | CR0_EVTQEN))
        die("CR0ACK did not follow CMDQEN|EVTQEN");
    /* Acknowledge anything a previous user left active. */
    w32(SMMU_GERRORN, r32(SMMU_GERROR));
}

struct flood {
    const char *name;
    void (*run)(unsigned round);
};

static const struct flood floods[] = {
    {"ste", flood_ste}, {"gbpa", flood_gbpa}, {"cmdq", flood_cmdq},
    {"dma", flood_dma}, {"storm", flood_storm}, {"spin", flood_spin},
};
#define NFLOODS (sizeof(floods) / sizeof(floods[0]))

int main(int argc, char **argv)
{
    uint64_t smmu_base = 0;
    const char *bdf = NULL, *disk = NULL, *which = "ste,gbpa,cmdq,dma,storm";
    int opt;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while ((opt = getopt(argc, argv, "s:m:p:b:d:n:r:T:x:u:f:")) != -1) {
        switch (opt) {
        case 's': smmu_base = strtoull(optarg, NULL, 0); break;
        case 'm': ram_base = strtoull(optarg, NULL, 0); break;
        case 'p': bdf = optarg; break;
        case 'b': disk = optarg; break;
        case 'd': flood_secs = strtod(optarg, NULL); break;
        case 'n': max_iters = strtoul(optarg, NULL, 0); break;
        case 'r': max_rounds = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'T': max_total = strtod(optarg, NULL); break;
        case 'x': stop_file = optarg; break;
        case 'u': storm_ipa = strtoull(optarg, NULL, 0); break;
        case 'f': which = optarg; break;
        default: die("usage: hvattack -s SMMU -m RAM -p NIC [-b DISK] [-d S] [-n N] [-r R] [-T S] [-x F] [-u IPA] [-f LIST]");
        }
    }
    if (!smmu_base || !ram_base || !bdf)
        die("-s, -m and -p are needed");
    smmu = map_phys(smmu_base, SMMU_MMIO_SIZE);
    ram = map_phys(ram_base, RAM_SIZE);
    vdev_setup(&devs[ndevs++], bdf, "nic", NET_TXQ);
    if (disk)
        vdev_setup(&devs[ndevs++], disk, "disk", BLK_REQQ);
    if (ndevs == 2 && devs[1].sid == devs[0].sid)
        die("-p and -b name the same StreamID");
    setup();
    printf("guest: attack-setup=smmu=0x%llx ram=0x%llx nic=%s,sid=%u disk=%s,sid=%d idr0=0x%08x "
           "cpus=%ld flood-secs=%.1f floods=%s\n",
           (unsigned long long)smmu_base, (unsigned long long)ram_base, bdf, devs[0].sid,
           disk ? disk : "none", ndevs == 2 ? (int)devs[1].sid : -1, r32(SMMU_IDR0),
           sysconf(_SC_NPROCESSORS_ONLN), flood_secs, which);
    double t0 = now();
    /* Rounds begun, and floods run. */
    unsigned round = 0, ran = 0;
    int stopped = 0;
    char list[128];
    snprintf(list, sizeof(list), ",%s,", which);
    while (!stopped && (!max_rounds || round < max_rounds)) {
        int begun = 0;
        for (unsigned i = 0; i < NFLOODS; i++) {
            char want[16];
            snprintf(want, sizeof(want), ",%s,", floods[i].name);
            if (!strstr(list, want))
                continue;
            if (stop_requested(t0)) {
                stopped = 1;
                break;
            }
            if (!begun) {
                round++;
                begun = 1;
            }
            printf("guest: attack-flood=%s round=%u\n", floods[i].name, round);
            floods[i].run(round);
            ran++;
        }
        if (!begun)
            break;
    }
    /* Whatever the floods left: the vSMMU off, GBPA bypass, the queues empty. */
    set_cr0(CR0_CMDQEN | CR0_EVTQEN);
    printf("guest: attack-end=rounds=%u floods=%u secs=%.1f gerror=%u cons=0x%08x prod=0x%08x\n",
           round, ran, now() - t0, gerror(), r32(SMMU_CMDQ_CONS), prod);
    return 0;
}

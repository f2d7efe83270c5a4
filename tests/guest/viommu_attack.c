/*
 * hvviommu: the hostile guest of tests/tests/mediation.rs's `hostile_virtio_iommu_guest_is_contained`,
 * run by tests/guest/init's `hvviommu=` mode in a guest whose virtio_iommu driver is unloaded. It
 * drives its VM's virtio-iommu (the hypervisor's, over virtio-mmio) by hand through /dev/mem, with
 * its queues in RAM of its VM that Linux does not use (above `mem=`), and attacks it: requests a
 * driver would never make, malformed requests, broken rings, a flood; and DMA of its own NIC
 * through what it mapped. After each attack it prints one fact line, `guest: vi-NAME=...`: what
 * the device answered (statuses, used lengths, Status, fault records). It judges nothing: the
 * host compares the facts with the spec and the hypervisor's counters and log.
 *
 * Usage: hvviommu -v VIOMMU_BASE -m RAM_BASE -d DISK_EP -n NIC_EP -f FOREIGN_EP -p NIC_BDF
 *   -v  the virtio-iommu's registers (the guest DT's virtio_mmio@ADDR node)
 *   -m  256 KiB of the VM's own RAM that Linux does not use
 *   -d  -n  its disk's and its NIC's endpoint IDs; -f  an endpoint of another VM
 *   -p  its virtio-net-pci function (BB:DD.F), released from its driver
 *
 * Every access to the device and to the rings is one aligned 16-, 32- or 64-bit load or store
 * (/dev/mem maps memory Linux does not own as Device memory, where memcpy would fault).
 *
 * Encodings: virtio 1.2. virtio-mmio registers (4.2.2): MagicValue 0x000, Version 0x004,
 * DeviceID 0x008, DeviceFeatures 0x010 / DeviceFeaturesSel 0x014, DriverFeatures 0x020 /
 * DriverFeaturesSel 0x024, QueueSel 0x030, QueueNumMax 0x034, QueueNum 0x038, QueueReady 0x044,
 * QueueNotify 0x050, Status 0x070 (ACKNOWLEDGE 1, DRIVER 2, DRIVER_OK 4, FEATURES_OK 8,
 * DEVICE_NEEDS_RESET 0x40; 2.1), QueueDesc 0x080, QueueDriver 0x090, QueueDevice 0x0a0 (low
 * word, high word at +4), config from 0x100. Split virtqueues (2.7): descriptors of 16 bytes
 * (addr, len, flags NEXT 1 / WRITE 2, next), avail ring (flags, idx, ring[]), used ring (flags,
 * idx, {id, len}[]). virtio-iommu (5.13): config page_size_mask @0, input_range @8 (start, end),
 * domain_range @24 (start, end), probe_size @32; requests with a 4-byte head (type: ATTACH 1,
 * DETACH 2, MAP 3, UNMAP 4, PROBE 5) and a 4-byte tail (status: OK 0, IOERR 1, UNSUPP 2,
 * DEVERR 3, INVAL 4, RANGE 5, NOENT 6, FAULT 7, NOMEM 8); ATTACH {domain, endpoint, flags
 * (BYPASS 1), reserved[4]}, MAP {domain, virt_start, virt_end, phys_start, flags (READ 1,
 * WRITE 2, MMIO 4)}, UNMAP {domain, virt_start, virt_end, reserved[4]}; fault records of 24
 * bytes {reason (MAPPING 2), flags, endpoint, reserved, address}. virtio-pci's modern registers
 * in BAR4 as QEMU lays them out (common config at 0, notify at 0x3000, multiplier 4).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define QS 64u              /* the queue size the driver asks for (the device's maximum) */
#define RAM_SPAN 0x40000u   /* the 256 KiB of RAM it uses */
/* Where the rings and buffers lie in that RAM. */
#define RQ_DESC 0x0000u
#define RQ_AVAIL 0x1000u
#define RQ_USED 0x2000u
#define EQ_DESC 0x3000u
#define EQ_AVAIL 0x4000u
#define EQ_USED 0x5000u
#define REQ_BUF 0x6000u     /* 32 slots of 128 bytes: device-readable parts */
#define WR_BUF 0x7000u      /* 32 slots of 128 bytes: device-writable parts */
#define EV_BUF 0x8000u      /* event buffers, 32 bytes apart */
#define SLOT 128u
#define BATCH 32u
#define EVENTS 16u

/* Addresses outside the VM's RAM, and outside its 40-bit IPA space. */
#define IPA_OUTSIDE_RAM 0x200000000ull
#define IPA_BEYOND 0x10000000000ull

enum { ATTACH = 1, DETACH = 2, MAP = 3, UNMAP = 4, PROBE = 5 };

static volatile uint8_t *dev, *ram;
static uint64_t ram_ipa;
static uint16_t rq_avail, rq_used, eq_used;

static uint32_t rd32(uint32_t off) { return *(volatile uint32_t *)(dev + off); }
static void wr32(uint32_t off, uint32_t v) { *(volatile uint32_t *)(dev + off) = v; }
static uint16_t mr16(uint32_t off) { return *(volatile uint16_t *)(ram + off); }
static uint32_t mr32(uint32_t off) { return *(volatile uint32_t *)(ram + off); }
static uint64_t mr64(uint32_t off) { return *(volatile uint64_t *)(ram + off); }
static void mw16(uint32_t off, uint16_t v) { *(volatile uint16_t *)(ram + off) = v; }
static void mw32(uint32_t off, uint32_t v) { *(volatile uint32_t *)(ram + off) = v; }
static void mw64(uint32_t off, uint64_t v) { *(volatile uint64_t *)(ram + off) = v; }

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char *what)
{
    printf("guest: vi-error=%s (%s)\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static volatile uint8_t *map_phys(uint64_t addr, size_t len)
{
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0)
        die("open /dev/mem");
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)addr);
    if (p == MAP_FAILED)
        die("mmap /dev/mem");
    close(fd);
    return p;
}

static void desc(uint32_t table, unsigned i, uint64_t addr, uint32_t len, uint16_t flags,
                 uint16_t next)
{
    uint32_t d = table + 16 * i;
    mw64(d, addr);
    mw32(d + 8, len);
    mw32(d + 12, flags | (uint32_t)next << 16);
}

/* Sets queue `q` up at the given ring offsets. */
static void queue_setup(unsigned q, uint32_t d, uint32_t a, uint32_t u)
{
    wr32(0x030, q);
    wr32(0x038, QS);
    wr32(0x080, (uint32_t)(ram_ipa + d));
    wr32(0x084, (uint32_t)((ram_ipa + d) >> 32));
    wr32(0x090, (uint32_t)(ram_ipa + a));
    wr32(0x094, (uint32_t)((ram_ipa + a) >> 32));
    wr32(0x0a0, (uint32_t)(ram_ipa + u));
    wr32(0x0a4, (uint32_t)((ram_ipa + u) >> 32));
    wr32(0x044, 1);
}

/*
 * Resets the device and negotiates as Linux's driver does (3.1.1): every device feature it
 * offers accepted; the request queue empty, the event queue with EVENTS buffers. Returns the
 * Status read back.
 */
static uint32_t negotiate(void)
{
    wr32(0x070, 0);
    wr32(0x070, 1);
    wr32(0x070, 3);
    wr32(0x014, 0);
    uint32_t lo = rd32(0x010);
    wr32(0x014, 1);
    uint32_t hi = rd32(0x010);
    wr32(0x024, 0);
    wr32(0x020, lo);
    wr32(0x024, 1);
    wr32(0x020, hi);
    wr32(0x070, 0xb);
    for (uint32_t o = 0; o < 0x6000; o += 4)
        mw32(o, 0);
    rq_avail = rq_used = eq_used = 0;
    queue_setup(0, RQ_DESC, RQ_AVAIL, RQ_USED);
    for (unsigned i = 0; i < EVENTS; i++) {
        desc(EQ_DESC, i, ram_ipa + EV_BUF + 32 * i, 24, 2, 0);
        mw16(EQ_AVAIL + 4 + 2 * i, (uint16_t)i);
    }
    mw16(EQ_AVAIL + 2, EVENTS);
    queue_setup(1, EQ_DESC, EQ_AVAIL, EQ_USED);
    wr32(0x070, 0xf);
    return rd32(0x070);
}

/* One request being built: its readable bytes. */
struct req {
    uint8_t b[SLOT];
    uint32_t len;
};

static void put32(struct req *r, uint32_t v) { memcpy(r->b + r->len, &v, 4), r->len += 4; }
static void put64(struct req *r, uint64_t v) { memcpy(r->b + r->len, &v, 8), r->len += 8; }
static struct req head(uint8_t type)
{
    struct req r = {.len = 4};
    r.b[0] = type;
    return r;
}

struct reply {
    uint32_t used_len;
    uint8_t status;     /* the byte where the tail goes; 0xee if untouched */
    uint8_t w[SLOT];
};

/*
 * Makes `n` requests available at once (chain i: slot i's readable part, then `wlen` writable
 * bytes prefilled 0xee), notifies once and collects the replies. Returns the number completed.
 */
static unsigned submit(const struct req *rs, unsigned n, uint32_t wlen, struct reply *out)
{
    for (unsigned i = 0; i < n; i++) {
        uint32_t rb = REQ_BUF + SLOT * i, wb = WR_BUF + SLOT * i;
        for (uint32_t o = 0; o < SLOT; o += 4) {
            uint32_t v;
            memcpy(&v, rs[i].b + o, 4);
            mw32(rb + o, v);
            mw32(wb + o, 0xeeeeeeee);
        }
        desc(RQ_DESC, 2 * i, ram_ipa + rb, rs[i].len, 1, (uint16_t)(2 * i + 1));
        desc(RQ_DESC, 2 * i + 1, ram_ipa + wb, wlen, 2, 0);
        mw16(RQ_AVAIL + 4 + 2 * (rq_avail % QS), (uint16_t)(2 * i));
        rq_avail++;
    }
    mw16(RQ_AVAIL + 2, rq_avail);
    wr32(0x050, 0);
    /* The device completes requests inside the notify's trap; a second look is for safety. */
    double t0 = now_ms();
    while (mr16(RQ_USED + 2) != rq_avail && now_ms() - t0 < 1000)
        usleep(1000);
    unsigned done = 0;
    while (rq_used != mr16(RQ_USED + 2) && done < n) {
        uint32_t e = RQ_USED + 4 + 8 * (rq_used % QS);
        uint32_t id = mr32(e), len = mr32(e + 4);
        unsigned i = id / 2 < n ? id / 2 : 0;
        struct reply *r = &out[i];
        r->used_len = len;
        for (uint32_t o = 0; o < SLOT; o += 4) {
            uint32_t v = mr32(WR_BUF + SLOT * i + o);
            memcpy(r->w + o, &v, 4);
        }
        r->status = wlen >= 4 ? r->w[wlen - 4] : 0xee;
        rq_used++;
        done++;
    }
    return done;
}

/* One request, its status (0xff if it never completed). */
static uint8_t one(struct req r, uint32_t wlen, struct reply *out)
{
    struct reply tmp;
    if (!out)
        out = &tmp;
    memset(out, 0, sizeof(*out));
    if (submit(&r, 1, wlen, out) != 1)
        return 0xff;
    return out->status;
}

static uint8_t attach(uint32_t domain, uint32_t ep, uint32_t flags)
{
    struct req r = head(ATTACH);
    put32(&r, domain);
    put32(&r, ep);
    put32(&r, flags);
    put32(&r, 0);
    return one(r, 4, NULL);
}

static struct req map_req(uint32_t domain, uint64_t s, uint64_t e, uint64_t p, uint32_t flags)
{
    struct req r = head(MAP);
    put32(&r, domain);
    put64(&r, s);
    put64(&r, e);
    put64(&r, p);
    put32(&r, flags);
    return r;
}

static struct req unmap_req(uint32_t domain, uint64_t s, uint64_t e)
{
    struct req r = head(UNMAP);
    put32(&r, domain);
    put64(&r, s);
    put64(&r, e);
    put32(&r, 0);
    return r;
}

/*
 * A broken request queue: the chain the caller laid out from descriptor 0 made available, the
 * avail index moved on by `count` (more than the queue holds is itself an error), a notify.
 * Returns Status.
 */
static uint32_t broken(uint16_t count)
{
    mw16(RQ_AVAIL + 4 + 2 * (rq_avail % QS), 0);
    rq_avail += count;
    mw16(RQ_AVAIL + 2, rq_avail);
    wr32(0x050, 0);
    return rd32(0x070);
}

/* The NIC (virtio-pci, modern registers in BAR4): queue `q`'s rings at DMA address `a`, kicked. */
static volatile uint8_t *nic;
static void nic_dma(const char *bdf, unsigned q, uint64_t a)
{
    char path[128];
    if (!nic) {
        snprintf(path, sizeof path, "/sys/bus/pci/devices/0000:%s/resource", bdf);
        FILE *f = fopen(path, "r");
        if (!f)
            die("NIC resource");
        unsigned long long start = 0, end, flags;
        for (int i = 0; i < 5; i++)
            if (fscanf(f, "%llx %llx %llx", &start, &end, &flags) != 3)
                die("NIC resource line");
        fclose(f);
        snprintf(path, sizeof path, "/sys/bus/pci/devices/0000:%s/config", bdf);
        int fd = open(path, O_WRONLY);
        uint16_t cmd = 6; /* memory decode, bus master */
        if (fd < 0 || pwrite(fd, &cmd, 2, 4) != 2)
            die("NIC command register");
        close(fd);
        nic = map_phys(start, 0x4000);
    }
    volatile uint8_t *c = nic;
    c[0x14] = 0;
    c[0x14] = 3;
    *(volatile uint32_t *)(c + 0x08) = 1;
    *(volatile uint32_t *)(c + 0x0c) = 3; /* VERSION_1 | ACCESS_PLATFORM */
    c[0x14] = 11;
    *(volatile uint16_t *)(c + 0x16) = (uint16_t)q;
    *(volatile uint16_t *)(c + 0x18) = 16;
    *(volatile uint32_t *)(c + 0x20) = (uint32_t)a;
    *(volatile uint32_t *)(c + 0x24) = (uint32_t)(a >> 32);
    *(volatile uint32_t *)(c + 0x28) = (uint32_t)(a + 0x1000);
    *(volatile uint32_t *)(c + 0x2c) = (uint32_t)((a + 0x1000) >> 32);
    *(volatile uint32_t *)(c + 0x30) = (uint32_t)(a + 0x2000);
    *(volatile uint32_t *)(c + 0x34) = (uint32_t)((a + 0x2000) >> 32);
    *(volatile uint16_t *)(c + 0x1c) = 1;
    c[0x14] = 15;
    uint16_t noff = *(volatile uint16_t *)(c + 0x1e);
    *(volatile uint16_t *)(c + 0x3000 + noff * 4) = (uint16_t)q;
}

/* The fault records the device has put in the event queue since the last call, up to 1 s. */
static unsigned fault_records(char *first, size_t len, int wait)
{
    double t0 = now_ms();
    while (wait && mr16(EQ_USED + 2) == eq_used && now_ms() - t0 < 2000)
        usleep(10000);
    unsigned n = 0;
    snprintf(first, len, "none");
    while (eq_used != mr16(EQ_USED + 2)) {
        uint32_t e = EQ_USED + 4 + 8 * (eq_used % QS);
        uint32_t id = mr32(e), used = mr32(e + 4);
        uint32_t b = EV_BUF + 32 * (id % EVENTS);
        if (n == 0)
            snprintf(first, len, "reason=%u flags=0x%x ep=%u addr=0x%llx len=%u", mr32(b) & 0xff,
                     mr32(b + 4), mr32(b + 8), (unsigned long long)mr64(b + 16), used);
        /* The buffer goes back to the device. */
        mw16(EQ_AVAIL + 4 + 2 * ((EVENTS + eq_used) % QS), (uint16_t)(id % EVENTS));
        eq_used++;
        mw16(EQ_AVAIL + 2, (uint16_t)(EVENTS + eq_used));
        n++;
    }
    return n;
}

int main(int argc, char **argv)
{
    uint64_t base = 0;
    unsigned disk_ep = 0, nic_ep = 0, foreign_ep = 0;
    const char *nic_bdf = NULL;
    int o;
    while ((o = getopt(argc, argv, "v:m:d:n:f:p:")) != -1) {
        switch (o) {
        case 'v': base = strtoull(optarg, NULL, 0); break;
        case 'm': ram_ipa = strtoull(optarg, NULL, 0); break;
        case 'd': disk_ep = strtoul(optarg, NULL, 0); break;
        case 'n': nic_ep = strtoul(optarg, NULL, 0); break;
        case 'f': foreign_ep = strtoul(optarg, NULL, 0); break;
        case 'p': nic_bdf = optarg; break;
        default: fprintf(stderr, "usage: see tests/guest/viommu_attack.c\n"); return 2;
        }
    }
    if (!base || !ram_ipa || !nic_bdf) {
        fprintf(stderr, "hvviommu: -v, -m and -p are needed\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    dev = map_phys(base, 0x1000);
    ram = map_phys(ram_ipa, RAM_SPAN);
    struct reply rep;

    printf("guest: vi-id=magic=0x%08x version=%u device=%u\n", rd32(0), rd32(4), rd32(8));
    uint32_t st = negotiate();
    printf("guest: vi-init=status=0x%x page-mask=0x%llx input=0x%llx-0x%llx domains=%u-%u probe=%u\n",
           st, (unsigned long long)(rd32(0x100) | (uint64_t)rd32(0x104) << 32),
           (unsigned long long)(rd32(0x108) | (uint64_t)rd32(0x10c) << 32),
           (unsigned long long)(rd32(0x110) | (uint64_t)rd32(0x114) << 32), rd32(0x118),
           rd32(0x11c), rd32(0x120));

    /* ATTACH: its own disk; another VM's endpoint; an endpoint nobody has; a reserved flag. */
    printf("guest: vi-attach-own=%u\n", attach(1, disk_ep, 0));
    printf("guest: vi-attach-foreign=%u,%u\n", attach(1, foreign_ep, 0), attach(1, 0xfff0, 0));
    printf("guest: vi-attach-bad-flags=%u\n", attach(1, disk_ep, 4));

    /*
     * MAP of 1 GiB that must be 4 KiB pages (its IOVA and its IPA differ in their offsets in a
     * 2 MiB block): more tables than the VM's pool holds, and the half-built part given back.
     * Then a mapping that fits, as proof. (Both clear of the MSI doorbell PROBE reserves, near
     * 0x08090000, where any MAP is S_INVAL.)
     */
    printf("guest: vi-map-huge=%u,%u\n",
           one(map_req(1, 0x80001000, 0xc0000fff, 0x40000000, 3), 4, NULL),
           one(map_req(1, 0x40000000, 0x401fffff, 0x40000000, 3), 4, NULL));
    /* Outputs beyond the 40-bit IPA space, an input beyond the 39-bit range. */
    printf("guest: vi-map-beyond=%u,%u\n",
           one(map_req(1, 0x50000000, 0x50000fff, IPA_BEYOND, 3), 4, NULL),
           one(map_req(1, 1ull << 39, (1ull << 39) + 0xfff, 0x40000000, 3), 4, NULL));
    /* An output outside its RAM but inside its IPA space: stage 2's to refuse, on DMA. */
    printf("guest: vi-map-outside-ram=%u\n",
           one(map_req(1, 0x10000000, 0x1000ffff, IPA_OUTSIDE_RAM, 3), 4, NULL));
    /* Its MSI doorbell (PROBE's reserved MSI region, passed 1:1) redirected to its RAM. */
    printf("guest: vi-map-doorbell=%u\n",
           one(map_req(1, 0x08090000, 0x08090fff, 0x40000000, 3), 4, NULL));
    /* UNMAP splitting a mapping, then the whole of it. */
    uint8_t m = one(map_req(1, 0x20000000, 0x201fffff, 0x40200000, 3), 4, NULL);
    printf("guest: vi-unmap-split=%u,%u,%u\n", m, one(unmap_req(1, 0x20000000, 0x200fffff), 4, NULL),
           one(unmap_req(1, 0x20000000, 0x201fffff), 4, NULL));
    /* A type the spec does not have: nothing written, used length 0. */
    struct req unk = head(0x42);
    put32(&unk, 0);
    one(unk, 4, &rep);
    printf("guest: vi-unknown=used=%u tail=0x%02x\n", rep.used_len, rep.status);
    /* A MAP cut short, a MAP with an unknown flag, an ATTACH whose writable part is too short. */
    struct req shrt = head(MAP);
    put32(&shrt, 1);
    struct req tiny = head(ATTACH);
    put32(&tiny, 1);
    put32(&tiny, disk_ep);
    put32(&tiny, 0);
    put32(&tiny, 0);
    printf("guest: vi-malformed=%u,%u,used=%u\n", one(shrt, 4, NULL),
           one(map_req(1, 0x60000000, 0x60000fff, 0x40000000, 0x80), 4, NULL),
           (one(tiny, 2, &rep), rep.used_len));

    /* A flood: 10000 MAP and UNMAP requests, 32 a notify; then 10000 empty notifies. */
    unsigned errors = 0, done = 0;
    struct req batch[BATCH];
    struct reply reps[BATCH];
    double t0 = now_ms();
    while (done < 10000) {
        for (unsigned i = 0; i < BATCH; i++) {
            uint64_t iova = 0x70000000 + 0x1000ull * (i / 2);
            batch[i] = i % 2 ? unmap_req(1, iova, iova + 0xfff)
                             : map_req(1, iova, iova + 0xfff, 0x40000000, 3);
        }
        memset(reps, 0, sizeof reps);
        unsigned n = submit(batch, BATCH, 4, reps);
        for (unsigned i = 0; i < n; i++)
            errors += reps[i].status != 0;
        errors += BATCH - n;
        done += BATCH;
    }
    double flood_ms = now_ms() - t0;
    t0 = now_ms();
    for (unsigned i = 0; i < 10000; i++)
        wr32(0x050, 0);
    printf("guest: vi-flood=requests=%u errors=%u ms=%.0f notifies-ms=%.0f status=0x%x\n", done,
           errors, flood_ms, now_ms() - t0, rd32(0x070));

    /*
     * Its NIC's DMA. (1) In a domain of its own with nothing mapped: a stage-1 fault, which the
     * device reports as a fault record. (2) In domain 1, where IOVA 0x10000000 maps outside its
     * RAM: stage 2 refuses it, the hypervisor's fault, never the guest's.
     */
    char rec[160];
    fault_records(rec, sizeof rec, 0);
    printf("guest: vi-nic-attach=%u\n", attach(2, nic_ep, 0));
    nic_dma(nic_bdf, 1, 0x30000000);
    unsigned n = fault_records(rec, sizeof rec, 1);
    /*
     * The NIC retries while it is being read: reset it (its DMA stops) and take what was still
     * on its way, so that no record of this fault is left to be counted as the next one's.
     */
    nic[0x14] = 0;
    usleep(500000);
    char late[160];
    n += fault_records(late, sizeof late, 0);
    printf("guest: vi-s1-fault=records=%u first=%s\n", n, rec);
    printf("guest: vi-nic-move=%u\n", attach(1, nic_ep, 0));
    nic_dma(nic_bdf, 1, 0x10000000);
    sleep(1);
    n = fault_records(rec, sizeof rec, 0);
    printf("guest: vi-s2-fault=records=%u\n", n);
    nic[0x14] = 0;

    /* Broken rings: each must set DEVICE_NEEDS_RESET, and a reset must bring the device back. */
    desc(RQ_DESC, 0, IPA_OUTSIDE_RAM, 40, 1, 1);
    desc(RQ_DESC, 1, ram_ipa + WR_BUF, 4, 2, 0);
    st = broken(1);
    printf("guest: vi-bad-buffer=status=0x%x\n", st);
    printf("guest: vi-reset=status=0x%x attach=%u\n", negotiate(), attach(1, disk_ep, 0));
    desc(RQ_DESC, 0, ram_ipa + REQ_BUF, 20, 1, 0);
    printf("guest: vi-loop=status=0x%x\n", broken(1));
    negotiate();
    desc(RQ_DESC, 0, ram_ipa + REQ_BUF, 0x10000000, 1, 1);
    desc(RQ_DESC, 1, ram_ipa + WR_BUF, 4, 2, 0);
    printf("guest: vi-huge-len=status=0x%x\n", broken(1));
    negotiate();
    desc(RQ_DESC, 0, ram_ipa + REQ_BUF, 20, 1, 1);
    desc(RQ_DESC, 1, ram_ipa + WR_BUF, 4, 2, 0);
    printf("guest: vi-avail-overrun=status=0x%x\n", broken(1000));
    st = negotiate();
    printf("guest: vi-final=status=0x%x attach=%u\n", st, attach(1, disk_ep, 0));
    wr32(0x070, 0);
    printf("guest: vi-done\n");
    return 0;
}

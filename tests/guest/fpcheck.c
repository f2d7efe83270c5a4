/*
 * hvfpcheck: the guest's FP/SIMD state must survive the hypervisor's traps. The hypervisor saves
 * none of it (docs/design.md, section 6: a vCPU owns its physical CPU and no code at EL2 touches
 * FP/SIMD registers), so anything at EL2 that used a V register, FPCR or FPSR would show here.
 *
 * Usage: hvfpcheck ADDR TRAPS [THREADS]
 *   ADDR     an emulated register whose 32-bit reads trap to the hypervisor and touch no device:
 *            a hex or decimal physical address, or `smmu` for SMMU_IDR0 of the VM's vSMMU (the
 *            guest DT's /smmuv3@BASE node: IDR0 is at offset 0); `anon` reads ordinary memory
 *            instead (no trap: a check of this checker, under qemu-user for instance)
 *   TRAPS    trapping reads per thread (rounded up to whole batches of BATCH)
 *   THREADS  threads, thread i pinned to CPU i (default 2: the test VMs' two vCPUs)
 *
 * Each thread, in batches of BATCH reads: one asm block loads all 32 V registers (128 bits each)
 * with patterns of its own, sets a non-default FPCR (round towards plus infinity) and FPSR (the
 * QC and IOC flags), then does BATCH reads of ADDR through a /dev/mem mapping, each followed by
 * an FMLA that accumulates into v30 (an exactly known result), stores all 32 V registers, FPCR
 * and FPSR, and finally adds 1.0 + 2^-27 in v31, which only the round-up mode makes
 * 1.0 + 2^-23 (and which sets FPSR.IXC). The C code then checks every register against what it
 * must be. The asm block is one, so the compiler's own use of V registers cannot interfere.
 *
 * Prints one line:
 *   fpcheck: ok traps=N mismatches=0 threads=T batch=B secs=S ns_per_trap=X reg=0xVALUE
 * or
 *   fpcheck: FAIL traps=N mismatches=M ... first=thread T batch K WHAT expected E got G
 * (ns_per_trap: the run's wall-clock time over the reads of one thread, which all run at once.)
 * Exit status 0 only for ok.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <glob.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Trapping reads between two checks. */
#define BATCH 1000u
#define MAX_THREADS 8
/* FPCR.RMode (bits 23:22) = 0b01, round towards plus infinity. */
#define FPCR_SET (1u << 22)
/* FPSR.QC (bit 27) and IOC (bit 0): cumulative flags nothing clears. */
#define FPSR_SET ((1u << 27) | 1u)
/* FPSR.IXC (bit 4): the inexact add sets it. */
#define FPSR_IXC (1u << 4)
/* 1.0f + 2^-23: 1.0f + 2^-27 rounded up. */
#define ONE_UP 0x3f800001u

/* Register roles: v24 = 1.0f x4 and v25 = 2^-30..2^-27 (the rounding probe's operands), v28 and
 * v29 (the FMLA's factors), v30 (its accumulator), v31 (the probe's result); the others hold
 * patterns only. */
static const float ONES[4] = {1.0f, 1.0f, 1.0f, 1.0f};
static const float TINY[4] = {0x1p-30f, 0x1p-29f, 0x1p-28f, 0x1p-27f};
static const float MUL_A[4] = {1.0f, 2.0f, 0.5f, 4.0f};
static const float MUL_B[4] = {3.0f, 0.25f, 2.0f, 1.0f};

struct regs {
    uint8_t v[32][16];
};

/* What the asm block stores (offsets fixed by its stores). */
struct out {
    uint8_t v[32][16];   /* 0: the V registers after the reads */
    uint64_t fpcr;       /* 512 */
    uint64_t fpsr;       /* 520: after the reads */
    uint64_t fpsr_after; /* 528: after the probe's add */
    uint64_t last;       /* 536: the last value read */
    uint8_t probe[16];   /* 544: v31 after the probe's add */
};
_Static_assert(sizeof(struct out) == 560, "the asm block's store offsets");

struct first {
    int set;
    char text[400];
};

struct thread {
    pthread_t id;
    int cpu;
    volatile uint32_t *reg;
    uint64_t batches;
    uint64_t mismatches;
    uint64_t value;
    struct first first;
};

static pthread_barrier_t start;

/* One batch: `in` into the registers, `n` trapping reads of `reg` each with an FMLA, everything
 * stored to `o`, the probe. FPCR is put back before the block ends (the C code around it runs
 * with the default rounding) and FPSR cleared. */
static void batch(const struct regs *in, struct out *o, volatile uint32_t *reg, uint64_t n)
{
    __asm__ volatile(
        "mrs    x9, fpcr\n\t"
        "msr    fpcr, %[fpcr]\n\t"
        "msr    fpsr, %[fpsr]\n\t"
        "mov    x10, %[in]\n\t"
        "ld1    {v0.16b-v3.16b}, [x10], #64\n\t"
        "ld1    {v4.16b-v7.16b}, [x10], #64\n\t"
        "ld1    {v8.16b-v11.16b}, [x10], #64\n\t"
        "ld1    {v12.16b-v15.16b}, [x10], #64\n\t"
        "ld1    {v16.16b-v19.16b}, [x10], #64\n\t"
        "ld1    {v20.16b-v23.16b}, [x10], #64\n\t"
        "ld1    {v24.16b-v27.16b}, [x10], #64\n\t"
        "ld1    {v28.16b-v31.16b}, [x10], #64\n\t"
        "1:\n\t"
        "ldr    w11, [%[reg]]\n\t"
        "fmla   v30.4s, v28.4s, v29.4s\n\t"
        "subs   %[n], %[n], #1\n\t"
        "b.ne   1b\n\t"
        "mov    x10, %[out]\n\t"
        "st1    {v0.16b-v3.16b}, [x10], #64\n\t"
        "st1    {v4.16b-v7.16b}, [x10], #64\n\t"
        "st1    {v8.16b-v11.16b}, [x10], #64\n\t"
        "st1    {v12.16b-v15.16b}, [x10], #64\n\t"
        "st1    {v16.16b-v19.16b}, [x10], #64\n\t"
        "st1    {v20.16b-v23.16b}, [x10], #64\n\t"
        "st1    {v24.16b-v27.16b}, [x10], #64\n\t"
        "st1    {v28.16b-v31.16b}, [x10], #64\n\t"
        "mrs    x12, fpcr\n\t"
        "str    x12, [x10], #8\n\t"
        "mrs    x12, fpsr\n\t"
        "str    x12, [x10], #8\n\t"
        "fadd   v31.4s, v24.4s, v25.4s\n\t"
        "mrs    x12, fpsr\n\t"
        "str    x12, [x10], #8\n\t"
        "str    x11, [x10], #8\n\t"
        "st1    {v31.16b}, [x10]\n\t"
        "msr    fpcr, x9\n\t"
        "msr    fpsr, xzr\n\t"
        : [n] "+r"(n)
        : [in] "r"(in), [out] "r"(o), [reg] "r"(reg), [fpcr] "r"((uint64_t)FPCR_SET),
          [fpsr] "r"((uint64_t)FPSR_SET)
        : "x9", "x10", "x11", "x12", "cc", "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6",
          "v7", "v8", "v9", "v10", "v11", "v12", "v13", "v14", "v15", "v16", "v17", "v18", "v19",
          "v20", "v21", "v22", "v23", "v24", "v25", "v26", "v27", "v28", "v29", "v30", "v31");
}

static void hex128(char *buf, const uint8_t *b)
{
    uint64_t lo, hi;
    memcpy(&lo, b, 8);
    memcpy(&hi, b + 8, 8);
    sprintf(buf, "0x%016" PRIx64 "%016" PRIx64, hi, lo);
}

static void mismatch(struct thread *t, uint64_t k, const char *what, const char *want,
                     const char *got)
{
    t->mismatches++;
    if (!t->first.set) {
        t->first.set = 1;
        snprintf(t->first.text, sizeof t->first.text, "thread %d batch %" PRIu64 " %s expected %s got %s",
                 t->cpu, k, what, want, got);
    }
}

static void check_v(struct thread *t, uint64_t k, int r, const uint8_t *want, const uint8_t *got)
{
    if (memcmp(want, got, 16) != 0) {
        char what[16], w[40], g[40];
        snprintf(what, sizeof what, "v%d", r);
        hex128(w, want);
        hex128(g, got);
        mismatch(t, k, what, w, g);
    }
}

static void check_u64(struct thread *t, uint64_t k, const char *what, uint64_t want, uint64_t got)
{
    if (want != got) {
        char w[24], g[24];
        snprintf(w, sizeof w, "0x%" PRIx64, want);
        snprintf(g, sizeof g, "0x%" PRIx64, got);
        mismatch(t, k, what, w, g);
    }
}

static void *run(void *arg)
{
    struct thread *t = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(t->cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        snprintf(t->first.text, sizeof t->first.text, "thread %d: cannot pin to CPU %d", t->cpu,
                 t->cpu);
        t->first.set = 1;
        t->mismatches++;
    }
    sched_yield();
    if (sched_getcpu() != t->cpu && !t->first.set) {
        snprintf(t->first.text, sizeof t->first.text, "thread %d runs on CPU %d", t->cpu,
                 sched_getcpu());
        t->first.set = 1;
        t->mismatches++;
    }

    struct regs st;
    struct out o;
    for (int r = 0; r < 32; r++) {
        uint64_t w0 = 0xf0e1d2c3b4a59687ull ^ ((uint64_t)r * 0x0101010101010101ull) ^
                      ((uint64_t)(t->cpu + 1) << 56);
        uint64_t w1 = ~w0 ^ ((uint64_t)r << 32) ^ 0x5a5a5a5aull;
        memcpy(st.v[r], &w0, 8);
        memcpy(st.v[r] + 8, &w1, 8);
    }
    memcpy(st.v[24], ONES, 16);
    memcpy(st.v[25], TINY, 16);
    memcpy(st.v[28], MUL_A, 16);
    memcpy(st.v[29], MUL_B, 16);
    memset(st.v[30], 0, 16);
    /* v31 keeps its pattern for the first batch, then holds the probe's result. */
    uint32_t up[4] = {ONE_UP, ONE_UP, ONE_UP, ONE_UP};
    /* FMLAs accumulated in v30 since it was last zeroed: below 2^22, every lane stays exact. */
    uint64_t acc = 0;

    pthread_barrier_wait(&start);
    for (uint64_t k = 0; k < t->batches; k++) {
        batch(&st, &o, t->reg, BATCH);
        uint8_t want[16];
        for (int r = 0; r < 32; r++) {
            if (r == 30) {
                float e[4];
                for (int l = 0; l < 4; l++)
                    e[l] = (float)(acc + BATCH) * (MUL_A[l] * MUL_B[l]);
                memcpy(want, e, 16);
                check_v(t, k, r, want, o.v[r]);
            } else {
                check_v(t, k, r, st.v[r], o.v[r]);
            }
        }
        check_u64(t, k, "fpcr", FPCR_SET, o.fpcr);
        check_u64(t, k, "fpsr", FPSR_SET, o.fpsr);
        check_u64(t, k, "fpsr-after-inexact-add", FPSR_SET | FPSR_IXC, o.fpsr_after);
        memcpy(want, up, 16);
        check_v(t, k, 31, want, o.probe); /* v31 after the add: rounded up, so FPCR held */
        if (k == 0)
            t->value = o.last;
        else
            check_u64(t, k, "register value", t->value, o.last);
        /* The next batch starts from what must be there now. */
        acc += BATCH;
        if (acc + BATCH >= (1u << 22))
            acc = 0;
        float e[4];
        for (int l = 0; l < 4; l++)
            e[l] = (float)acc * (MUL_A[l] * MUL_B[l]);
        memcpy(st.v[30], e, 16);
        memcpy(st.v[31], up, 16);
    }
    return NULL;
}

/* SMMU_IDR0 of the VM's vSMMU: the base in the guest DT's node name, /smmuv3@BASE. */
static uint64_t smmu_base(void)
{
    glob_t g;
    if (glob("/proc/device-tree/smmuv3@*", 0, NULL, &g) != 0 || g.gl_pathc == 0) {
        printf("fpcheck: FAIL no /proc/device-tree/smmuv3@* node\n");
        exit(1);
    }
    uint64_t base = strtoull(strrchr(g.gl_pathv[0], '@') + 1, NULL, 16);
    globfree(&g);
    return base;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: hvfpcheck ADDR|smmu TRAPS [THREADS]\n");
        return 2;
    }
    int anon = strcmp(argv[1], "anon") == 0;
    uint64_t addr = anon ? 0 : strcmp(argv[1], "smmu") == 0 ? smmu_base() : strtoull(argv[1], NULL, 0);
    uint64_t traps = strtoull(argv[2], NULL, 0);
    int threads = argc == 4 ? atoi(argv[3]) : 2;
    if (traps == 0 || threads < 1 || threads > MAX_THREADS || (addr & 3)) {
        fprintf(stderr, "hvfpcheck: bad arguments\n");
        return 2;
    }
    uint64_t batches = (traps + BATCH - 1) / BATCH;

    long page = sysconf(_SC_PAGESIZE);
    uint64_t base = addr & ~(uint64_t)(page - 1);
    void *map;
    if (anon) {
        /* Ordinary memory, no trap: the checker's own check (qemu-user, bare metal). */
        map = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (map != MAP_FAILED)
            *(uint32_t *)map = 0x600df00d;
    } else {
        int fd = open("/dev/mem", O_RDWR | O_SYNC);
        if (fd < 0) {
            printf("fpcheck: FAIL cannot open /dev/mem\n");
            return 1;
        }
        map = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, (off_t)base);
    }
    if (map == MAP_FAILED) {
        printf("fpcheck: FAIL cannot map 0x%" PRIx64 " from /dev/mem\n", base);
        return 1;
    }
    volatile uint32_t *reg = (volatile uint32_t *)((char *)map + (addr - base));

    static struct thread t[MAX_THREADS];
    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++) {
        t[i].cpu = i;
        t[i].reg = reg;
        t[i].batches = batches;
        if (pthread_create(&t[i].id, NULL, run, &t[i]) != 0) {
            printf("fpcheck: FAIL cannot start thread %d\n", i);
            return 1;
        }
    }
    struct timespec t0, t1;
    pthread_barrier_wait(&start);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i].id, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);

    uint64_t ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ull + (uint64_t)t1.tv_nsec -
                  (uint64_t)t0.tv_nsec;
    uint64_t per_thread = batches * BATCH, mismatches = 0;
    const char *first = NULL;
    for (int i = 0; i < threads; i++) {
        mismatches += t[i].mismatches;
        if (!first && t[i].first.set)
            first = t[i].first.text;
        if (t[i].value != t[0].value && !first)
            first = "the threads read different register values";
    }
    printf("fpcheck: %s traps=%" PRIu64 " mismatches=%" PRIu64 " threads=%d batch=%u secs=%" PRIu64
           ".%03" PRIu64 " ns_per_trap=%" PRIu64 " reg=0x%" PRIx64 "%s%s\n",
           first ? "FAIL" : "ok", per_thread * (uint64_t)threads, mismatches, threads, BATCH,
           ns / UINT64_C(1000000000), ns / UINT64_C(1000000) % 1000, ns / per_thread, t[0].value,
           first ? " first=" : "", first ? first : "");
    return first ? 1 : 0;
}

//! Host benchmark of the budgets on what VMs share (issue 12): the real physical driver
//! ([`Smmu`], its lock-free [`Cmdq`]) and real vSMMU models ([`Vsmmu`]) of two VMs over a fake
//! physical SMMU that runs on its own thread, where a CMD_SYNC and an STE fetch (CMD_CFGI_STE)
//! take a few microseconds each. A victim VM's vCPU does unmaps (TLBI_NH_VA + CMD_SYNC through
//! its vSMMU, completed by the MSI the guest asks for, as Linux does) and every 8th time an STE
//! update (its STE's CD pointer changed, CFGI_STE + CMD_SYNC), first with the attacker VM idle,
//! then while the attacker's threads run each flood:
//!
//! - `ste-flip`: one attacker vCPU traps with 128 CFGI_STE + CMD_SYNC pairs while a second
//!   thread flips that STE in guest memory between stage-1 translate and bypass (each change
//!   a break-before-make);
//! - `gbpa`: an attacker vCPU toggles GBPA.ABORT with its vSMMU disabled (every write would
//!   rewrite each of its STEs);
//! - `cmdq`: an attacker vCPU resubmits its whole command queue, 128 TLBI_NH_VA + CMD_SYNC
//!   pairs, trap after trap;
//! - `events`: the attacker's device faults at stage 1 without end (every transaction an
//!   F_TRANSLATION record in the shared event queue), while the victim's device faults once
//!   every 5 ms; every victim record must reach the victim's guest.
//!
//! It prints, per flood, the victim's unmap and STE-update latency (median, p99) and the ratio
//! flooded/unflooded, and what the budgets did; with `--no-budget` the same with the VMs'
//! budgets lifted (merging still on), for comparison.
//!
//! Threads and the 2-core host: the fake SMMU spins in SCHED_FIFO on CPU 1 (it is hardware:
//! it never waits for software); the victim's vCPU runs at nice -20 on CPU 0 and sleeps between
//! operations (one every ~50 us); the attacker's threads (one or two) run flat out at nice 0 on
//! CPU 0, so they take it whenever the victim sleeps and rarely preempt it. On the hypervisor
//! each vCPU has a CPU of its own: what is measured is what the attacker leaves in the shared
//! SMMU (its queued commands, STE work, event records, locks), not the host's time slices; the
//! attacker does not queue more while a victim operation runs on the CPU they share, what it
//! queued before is what the victim waits behind. A waiter spinning on CMDQ_CONS yields every
//! 1024 reads (~10 us), so that an attacker thread preempted while holding command-queue slots
//! reserved but not yet written, the publisher's flag or the driver's lock can finish (a host
//! artifact too: the hypervisor runs with interrupts masked). Operations during which the host
//! preempted the victim's thread (its involuntary context switches, `getrusage`), or which
//! spun on an idle SMMU or waited for the driver's lock behind a preempted attacker thread, are
//! counted and their p99 shown apart: they are the host's time slices, which a vCPU with a CPU
//! of its own does not have. Event records are drained by whichever VM thread finds the queue
//! non-empty between its operations (as the hypervisor drains it from the SMMU interrupt on any
//! CPU). The priorities need root (else
//! all threads are SCHED_OTHER and other load on the host makes the tails). The figures that
//! matter are the ratios; absolute times are the host's.
//!
//! Run: `cargo run --release -p smmu-hv-smmuv3 --example shared_smmu_flood_bench -- [--secs S]
//! [--sync-ns N] [--ste-ns N] [--tlbi-ns N] [--no-budget] [FLOOD...]`

use smmu::cmd::{Command, Sync, SyncCs, TlbiAddr};
use smmu::driver::{
    Cmdq, DmaMemory, DriverError, EventBudget, QueueMemory, Smmu, SmmuConfig, SmmuRegs, SteBreak,
    SteWrite, SyncTicket,
};
use smmu::event::{Event, EventKind};
use smmu::queue::Queue;
use smmu::regs::{self, Cr0, Gbpa, Gerror};
use smmu::ste::{S2Config, Ste, StreamConfig};
use smmu::vsmmu::{
    Budget, GuestMemError, GuestMemory, PhysicalSmmu, StreamMap, Vsmmu, VsmmuConfig, MAX_ROUNDS,
};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---- The fake physical SMMU ----

/// PA of the fake's memory (stream table and queues).
const PA_BASE: u64 = 0x4000_0000;
/// Its size.
const PA_SIZE: usize = 1 << 20;

/// What the fake's operations cost, in ns (spun on its thread).
#[derive(Debug, Clone, Copy)]
struct Costs {
    sync: u64,
    ste_fetch: u64,
    tlbi: u64,
    other: u64,
    event: u64,
}

/// A device whose DMA faults: every `period` ns a transaction on `sid`, which records an
/// F_TRANSLATION unless the STE aborts.
#[derive(Debug)]
struct Device {
    sid: u32,
    period: AtomicU64,
    next: AtomicU64,
    /// Records written for it, and transactions that aborted without one.
    recorded: AtomicU64,
    aborted: AtomicU64,
}

/// The fake SMMU's registers and memory, shared by the driver's side and its own thread.
struct Hw {
    mem: Vec<AtomicU64>,
    next_alloc: AtomicU64,
    cr0: AtomicU32,
    irq_ctrl: AtomicU32,
    gbpa: AtomicU32,
    gerror: AtomicU32,
    gerrorn: AtomicU32,
    strtab_base: AtomicU64,
    cmdq_base: AtomicU64,
    cmdq_prod: AtomicU32,
    cmdq_cons: AtomicU32,
    eventq_base: AtomicU64,
    eventq_prod: AtomicU32,
    eventq_cons: AtomicU32,
    costs: Costs,
    stop: AtomicBool,
    devices: Vec<Device>,
    t0: Instant,
    commands: AtomicU64,
    overflows: AtomicU64,
}

impl Hw {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn word(&self, pa: u64) -> usize {
        ((pa - PA_BASE) / 8) as usize
    }

    fn read_u64(&self, pa: u64) -> u64 {
        self.mem[self.word(pa)].load(Ordering::Acquire)
    }

    fn spin(&self, ns: u64) {
        if ns == 0 {
            return;
        }
        let t = Instant::now();
        while (t.elapsed().as_nanos() as u64) < ns {
            std::hint::spin_loop();
        }
    }

    /// The SMMU: consumes commands, otherwise serves the devices' transactions.
    fn run(&self) {
        let mut cons = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            let base = self.cmdq_base.load(Ordering::Acquire);
            let log2 = (base & 0x1f) as u32;
            let prod = self.cmdq_prod.load(Ordering::Acquire);
            let cmdq_on = self.cr0.load(Ordering::Acquire) & Cr0::CMDQEN.bits() != 0;
            if cmdq_on && prod != cons {
                let mask = (2u32 << log2) - 1;
                let slot = u64::from(cons & ((1 << log2) - 1));
                let pa = (base & 0x000f_ffff_ffff_ffe0) + slot * 16;
                let w = [self.read_u64(pa), self.read_u64(pa + 8)];
                let cost = match Command::decode(w) {
                    Ok(Command::Sync(_)) => self.costs.sync,
                    Ok(Command::CfgiSte { .. } | Command::CfgiAll) => self.costs.ste_fetch,
                    Ok(
                        Command::TlbiNhAll { .. }
                        | Command::TlbiNhVa { .. }
                        | Command::TlbiNhAsid { .. }
                        | Command::TlbiNhVaa { .. }
                        | Command::TlbiNsnhAll,
                    ) => self.costs.tlbi,
                    Ok(_) => self.costs.other,
                    Err(_) => 0,
                };
                self.spin(cost);
                self.commands.fetch_add(1, Ordering::Relaxed);
                cons = (cons + 1) & mask;
                self.cmdq_cons.store(cons, Ordering::Release);
                continue;
            }
            if self.cr0.load(Ordering::Acquire) & Cr0::SMMUEN.bits() == 0 {
                std::hint::spin_loop();
                continue;
            }
            let now = self.now();
            let mut any = false;
            for d in &self.devices {
                let period = d.period.load(Ordering::Relaxed);
                if period == u64::MAX || d.next.load(Ordering::Relaxed) > now {
                    continue;
                }
                d.next.store(now + period, Ordering::Relaxed);
                any = true;
                self.transaction(d);
            }
            if !any {
                std::hint::spin_loop();
            }
        }
    }

    /// A transaction of device `d`: its STE (a linear table) decides.
    fn transaction(&self, d: &Device) {
        let table = self.strtab_base.load(Ordering::Acquire) & 0x000f_ffff_ffff_ffc0;
        let w0 = self.read_u64(table + u64::from(d.sid) * 64);
        let ste = Ste([w0, 0, 0, 0, 0, 0, 0, 0]);
        if !ste.v() || ste.config() == StreamConfig::Abort {
            d.aborted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let base = self.eventq_base.load(Ordering::Acquire);
        let mut q = Queue::new((base & 0x1f) as u8);
        let prod_raw = self.eventq_prod.load(Ordering::Acquire);
        q.set_prod(prod_raw);
        q.set_cons(self.eventq_cons.load(Ordering::Acquire));
        if q.is_full() {
            let ovf = !self.eventq_cons.load(Ordering::Acquire) & (1 << 31);
            self.eventq_prod
                .store((prod_raw & !(1 << 31)) | ovf, Ordering::Release);
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.spin(self.costs.event);
        let mut e = Event::new(EventKind::FTranslation, d.sid);
        e.input_addr = 0xdead_0000;
        let pa = (base & 0x000f_ffff_ffff_ffe0) + u64::from(q.prod_index()) * 32;
        for (i, w) in e.encode().into_iter().enumerate() {
            self.mem[self.word(pa) + i].store(w, Ordering::Release);
        }
        q.inc_prod();
        self.eventq_prod
            .store(q.prod() | (prod_raw & (1 << 31)), Ordering::Release);
        d.recorded.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Fake(Arc<Hw>);

thread_local! {
    /// CMDQ_CONS reads by this thread.
    static SPINS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// CMDQ_CONS reads by this thread that found the SMMU idle (everything published consumed):
    /// the waiter's own CMD_SYNC not published because a producer before it, preempted by the
    /// host, holds slots it has not written or the publisher's flag.
    static IDLE_SPINS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Nanoseconds this thread waited for the driver's lock.
    static LOCK_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Involuntary context switches of the calling thread so far (the host preempted it).
fn preemptions() -> i64 {
    // SAFETY: getrusage fills the rusage on our stack for the calling thread.
    unsafe {
        let mut u: libc::rusage = core::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut u);
        u.ru_nivcsw
    }
}

/// CONS reads with the SMMU idle, and driver-lock waits beyond which an operation counts as
/// stalled by the host's preemption of a thread the hypervisor would not preempt.
const HOST_STALL_SPINS: u64 = 256;
const HOST_STALL_LOCK_NS: u64 = 10_000;

/// Puts the calling thread in SCHED_FIFO at the lowest real-time priority, if allowed: the
/// fake SMMU (it is hardware: it never waits for software) then runs whatever else the
/// (shared) host runs, on a core of its own.
fn realtime_thread() -> bool {
    realtime(1)
}

/// SCHED_FIFO at `prio`, if allowed.
fn realtime(prio: i32) -> bool {
    if std::env::var_os("BENCH_NO_RT").is_some() {
        return false;
    }
    let p = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid parameter block;
    // it touches no memory of ours.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 }
}

/// Pins the calling thread to CPU `cpu` (where the host has it): the fake SMMU has one to
/// itself, the VMs' threads share the other (the kernel would otherwise put a woken vCPU
/// behind the spinning SMMU now and then, and the figures would be its migration times).
fn pin(cpu: usize) {
    // SAFETY: sysconf takes and returns numbers.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus <= cpu as libc::c_long {
        return;
    }
    // SAFETY: a cpu_set_t on the stack, zeroed and set with the libc macros, passed with its
    // size for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let r = libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &set);
        if std::env::var_os("BENCH_DEBUG").is_some() {
            eprintln!("pin({cpu}) = {r}, now on CPU {}", libc::sched_getcpu());
        }
    }
}

/// Sets the calling thread's nice value (where allowed).
fn nice(n: i32) {
    // SAFETY: setpriority on the calling thread (who = 0 is the caller's TID for
    // PRIO_PROCESS on Linux); no memory is passed.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
}

/// An attacker thread: on the VMs' CPU, at the default nice 0. Below the victim (nice -20),
/// but not starved, whatever else the host runs, while it holds something the victim waits
/// for (on the hypervisor it would run with interrupts masked, never preempted there).
fn attacker_thread() {
    pin(0);
}

/// IDR0 of QEMU's SMMU (nesting, 16-bit VMIDs, no stalls); IDR1 with 256 StreamIDs (a linear
/// table), CMDQS and EVENTQS 10; IDR5 4 KiB granules, 44-bit OAS.
const IDR0: u32 = 0x0d44_101b;
const IDR1: u32 = 10 << 21 | 10 << 16 | 8;
const IDR5: u32 = 0x70 | 4;

impl SmmuRegs for Fake {
    fn read32(&self, off: u64) -> u32 {
        let h = &self.0;
        match off {
            regs::SMMU_IDR0 => IDR0,
            regs::SMMU_IDR1 => IDR1,
            regs::SMMU_IDR5 => IDR5,
            regs::SMMU_CR0 | regs::SMMU_CR0ACK => h.cr0.load(Ordering::Acquire),
            regs::SMMU_IRQ_CTRL | regs::SMMU_IRQ_CTRLACK => h.irq_ctrl.load(Ordering::Acquire),
            regs::SMMU_GBPA => h.gbpa.load(Ordering::Acquire),
            regs::SMMU_GERROR => h.gerror.load(Ordering::Acquire),
            regs::SMMU_GERRORN => h.gerrorn.load(Ordering::Acquire),
            regs::SMMU_CMDQ_PROD => h.cmdq_prod.load(Ordering::Acquire),
            regs::SMMU_CMDQ_CONS => {
                if h.cmdq_cons.load(Ordering::Acquire) == h.cmdq_prod.load(Ordering::Acquire) {
                    IDLE_SPINS.with(|n| n.set(n.get() + 1));
                }
                SPINS.with(|n| {
                    let k = n.get() + 1;
                    n.set(k);
                    if k.is_multiple_of(1024) {
                        // See the module docs: let a preempted producer finish its slots.
                        std::thread::yield_now();
                    }
                });
                h.cmdq_cons.load(Ordering::Acquire)
            }
            regs::SMMU_EVENTQ_PROD => h.eventq_prod.load(Ordering::Acquire),
            regs::SMMU_EVENTQ_CONS => h.eventq_cons.load(Ordering::Acquire),
            _ => 0,
        }
    }

    fn write32(&self, off: u64, v: u32) {
        let h = &self.0;
        fence(Ordering::SeqCst);
        match off {
            regs::SMMU_CR0 => h.cr0.store(v, Ordering::Release),
            regs::SMMU_IRQ_CTRL => h.irq_ctrl.store(v, Ordering::Release),
            regs::SMMU_GBPA => h.gbpa.store(v & !Gbpa::UPDATE.bits(), Ordering::Release),
            regs::SMMU_GERRORN => h.gerrorn.store(v, Ordering::Release),
            regs::SMMU_CMDQ_PROD => h.cmdq_prod.store(v, Ordering::Release),
            regs::SMMU_CMDQ_CONS => h.cmdq_cons.store(v, Ordering::Release),
            regs::SMMU_EVENTQ_PROD => h.eventq_prod.store(v, Ordering::Release),
            regs::SMMU_EVENTQ_CONS => h.eventq_cons.store(v, Ordering::Release),
            _ => {}
        }
    }

    fn read64(&self, off: u64) -> u64 {
        let h = &self.0;
        match off {
            regs::SMMU_STRTAB_BASE => h.strtab_base.load(Ordering::Acquire),
            regs::SMMU_CMDQ_BASE => h.cmdq_base.load(Ordering::Acquire),
            regs::SMMU_EVENTQ_BASE => h.eventq_base.load(Ordering::Acquire),
            _ => 0,
        }
    }

    fn write64(&self, off: u64, v: u64) {
        let h = &self.0;
        match off {
            regs::SMMU_STRTAB_BASE => h.strtab_base.store(v, Ordering::Release),
            regs::SMMU_CMDQ_BASE => h.cmdq_base.store(v, Ordering::Release),
            regs::SMMU_EVENTQ_BASE => h.eventq_base.store(v, Ordering::Release),
            _ => {}
        }
    }
}

impl DmaMemory for Fake {
    fn alloc_zeroed(&mut self, size: usize, align: usize) -> Result<u64, DriverError> {
        let h = &self.0;
        let align = align as u64;
        let pa = h.next_alloc.load(Ordering::Relaxed).div_ceil(align) * align;
        let end = pa + size as u64;
        if end > PA_BASE + PA_SIZE as u64 {
            return Err(DriverError::OutOfMemory);
        }
        h.next_alloc.store(end, Ordering::Relaxed);
        Ok(pa)
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        // The driver writes whole, aligned doublewords (STEs, descriptors).
        let h = &self.0;
        for (i, chunk) in data.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            h.mem[h.word(pa) + i].store(u64::from_le_bytes(b), Ordering::Release);
        }
    }

    fn read(&self, pa: u64, buf: &mut [u8]) {
        let h = &self.0;
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let b = h.mem[h.word(pa) + i].load(Ordering::Acquire).to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }

    fn write_barrier(&mut self) {
        fence(Ordering::Release);
    }

    type Queue = Fake;

    fn queue_memory(&self, _pa: u64, _size: usize) -> Fake {
        self.clone()
    }
}

impl QueueMemory for Fake {
    fn write_entry(&self, pa: u64, words: [u64; 2]) {
        let h = &self.0;
        h.mem[h.word(pa)].store(words[0], Ordering::Release);
        h.mem[h.word(pa) + 1].store(words[1], Ordering::Release);
    }

    fn read_entry(&self, pa: u64) -> [u64; 2] {
        [self.0.read_u64(pa), self.0.read_u64(pa + 8)]
    }

    fn entry_barrier(&self) {
        fence(Ordering::Release);
    }
}

// ---- The hypervisor's side: the physical SMMU shared by the VMs ----

type Driver = Smmu<Fake, Fake>;

/// The physical SMMU as the hypervisor shares it (arch/iommu.rs): the driver behind a lock
/// (stream table, event queue), its command queue without one.
struct Shared {
    smmu: Mutex<Driver>,
    cmdq: Arc<Cmdq<Fake, Fake>>,
    hw: Arc<Hw>,
}

/// `PhysicalSmmu` as the hypervisor's `PhysSmmu` implements it, with the host's clock.
#[derive(Clone)]
struct Phys(Arc<Shared>);

impl Phys {
    fn lock(&self) -> std::sync::MutexGuard<'_, Driver> {
        let t = Instant::now();
        let g = self.0.smmu.lock().unwrap();
        LOCK_NS.with(|n| n.set(n.get() + t.elapsed().as_nanos() as u64));
        g
    }
}

impl PhysicalSmmu for Phys {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        self.lock().write_ste(sid, ste)
    }
    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        self.lock().make_ste(b)
    }
    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.0.cmdq.queue(cmds)
    }
    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.0.cmdq.queue_sync(cmds)
    }
    fn publish(&self) {
        self.0.cmdq.publish()
    }
    fn wait(&self, t: SyncTicket) -> Result<(), DriverError> {
        self.0.cmdq.wait(t)
    }
    fn now(&self) -> Option<u64> {
        Some(self.0.hw.now())
    }
    fn wait_until(&self, deadline: u64) {
        while self.0.hw.now() < deadline {
            std::thread::yield_now();
        }
    }
}

/// Guest RAM: 1 MiB at IPA 0x8000_0000, written by the guest's vCPUs and read by its vSMMU.
struct Ram(Vec<AtomicU64>);

const RAM: u64 = 0x8000_0000;
const STRTAB: u64 = RAM;
const CMDQ: u64 = RAM + 0x1_0000;
const EVTQ: u64 = RAM + 0x2_0000;
const CD_A: u64 = RAM + 0x3_0000;
const CD_B: u64 = RAM + 0x3_1000;
const MSI: u64 = RAM + 0x4_0000;
/// The guests' command queues: 2^8 entries.
const CMDQ_LOG2: u8 = 8;
const EVTQ_LOG2: u8 = 7;

impl Ram {
    fn new() -> Self {
        Self((0..(1 << 20) / 8).map(|_| AtomicU64::new(0)).collect())
    }
    fn idx(ipa: u64, len: usize) -> Result<usize, GuestMemError> {
        let err = GuestMemError {
            ipa,
            len: len as u64,
        };
        let off = ipa.checked_sub(RAM).ok_or(err)?;
        if off + len as u64 > 1 << 20 {
            return Err(err);
        }
        Ok(off as usize)
    }
    fn put(&self, ipa: u64, data: &[u8]) {
        let off = Self::idx(ipa, data.len()).expect("in RAM");
        for (i, &b) in data.iter().enumerate() {
            let a = off + i;
            let w = &self.0[a / 8];
            let sh = (a % 8) * 8;
            let mut cur = w.load(Ordering::Relaxed);
            loop {
                let new = (cur & !(0xff << sh)) | u64::from(b) << sh;
                match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(x) => cur = x,
                }
            }
        }
    }
    fn put_u64s(&self, ipa: u64, words: &[u64]) {
        let off = Self::idx(ipa, words.len() * 8).expect("in RAM");
        assert!(off.is_multiple_of(8));
        for (i, &w) in words.iter().enumerate() {
            self.0[off / 8 + i].store(w, Ordering::Release);
        }
    }
    fn u32_at(&self, ipa: u64) -> u32 {
        let mut b = [0u8; 4];
        (&self).read(ipa, &mut b).expect("in RAM");
        u32::from_le_bytes(b)
    }
}

impl GuestMemory for &Ram {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let off = Ram::idx(ipa, buf.len())?;
        if off.is_multiple_of(8) && buf.len().is_multiple_of(8) {
            for (i, c) in buf.chunks_mut(8).enumerate() {
                c.copy_from_slice(&self.0[off / 8 + i].load(Ordering::Acquire).to_le_bytes());
            }
            return Ok(());
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let a = off + i;
            *b = (self.0[a / 8].load(Ordering::Acquire) >> ((a % 8) * 8)) as u8;
        }
        Ok(())
    }
    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        Ram::idx(ipa, data.len())?;
        self.put(ipa, data);
        Ok(())
    }
}

/// A VM: its vSMMU model (the model lock), its RAM, and its guest driver's state.
struct Vm {
    model: Mutex<Vsmmu>,
    ram: Ram,
    phys: Phys,
    /// The guest's CMDQ_PROD, as its driver keeps it (one vCPU issues commands).
    prod: AtomicU32,
    vsid: u32,
}

fn s2(vmid: u16) -> S2Config {
    S2Config {
        vmid,
        root_pa: 0x1_0000_0000 * u64::from(vmid),
        t0sz: 25,
        sl0: 1,
        ps: 4,
        affd: false,
    }
}

fn guest_s1_ste(cd: u64) -> Ste {
    let mut s = Ste::default();
    s.set_v(true).set_config(StreamConfig::S1Translate);
    s.set_s1_context_ptr(cd)
        .set_s1cir(1)
        .set_s1cor(1)
        .set_s1csh(3);
    s
}

fn guest_bypass_ste() -> Ste {
    let mut s = Ste::default();
    s.set_v(true).set_config(StreamConfig::Bypass);
    s
}

impl Vm {
    fn new(name: &str, sid: u32, vmid: u16, phys: &Phys, budget: Budget) -> Arc<Self> {
        let cfg = VsmmuConfig {
            name: name.into(),
            streams: vec![StreamMap {
                vsid: sid,
                psid: sid,
            }],
            s2: s2(vmid),
            sid_bits: 8,
            oas_bits: 40,
            phys_idr5: IDR5,
            phys_ril: true,
            budget,
        };
        let vm = Arc::new(Self {
            model: Mutex::new(Vsmmu::new(cfg)),
            ram: Ram::new(),
            phys: phys.clone(),
            prod: AtomicU32::new(0),
            vsid: sid,
        });
        vm.model.lock().unwrap().reset(&mut vm.phys.clone());
        vm
    }

    /// A trapped register write, as the hypervisor's `vsmmu::access` carries it out: the model
    /// locked to start it and for each round of completion, the waits without it.
    fn trap(&self, off: u64, v: u64) {
        let mut phys = self.phys.clone();
        let mut o = self
            .model
            .lock()
            .unwrap()
            .write_start(off, 4, v, &mut &self.ram, &mut phys);
        for _ in 0..MAX_ROUNDS {
            if !o.pending() {
                break;
            }
            let w = o.wait(&phys);
            o = self
                .model
                .lock()
                .unwrap()
                .complete(o, w, &mut &self.ram, &mut phys);
        }
        assert!(
            !o.pending(),
            "a write still pending after MAX_ROUNDS: {o:?}"
        );
        o.publish(&phys);
    }

    fn read(&self, off: u64) -> u32 {
        self.model.lock().unwrap().read(off, 4) as u32
    }

    /// What Linux's probe does: tables and queues, then SMMUEN; its STE translates through CD A.
    fn bring_up(&self, smmuen: bool) {
        self.ram.put(
            STRTAB + u64::from(self.vsid) * 64,
            &guest_s1_ste(CD_A).to_bytes(),
        );
        self.trap(regs::SMMU_CR0, 0);
        self.trap(regs::SMMU_STRTAB_BASE, STRTAB | 1 << 62);
        self.trap(regs::SMMU_STRTAB_BASE + 4, 0);
        self.trap(regs::SMMU_STRTAB_BASE_CFG, 8);
        self.trap(regs::SMMU_CMDQ_BASE, CMDQ | u64::from(CMDQ_LOG2));
        self.trap(regs::SMMU_CMDQ_BASE + 4, 0);
        self.trap(regs::SMMU_EVENTQ_BASE, EVTQ | u64::from(EVTQ_LOG2));
        self.trap(regs::SMMU_EVENTQ_BASE + 4, 0);
        self.trap(
            regs::SMMU_CR0,
            u64::from((Cr0::CMDQEN | Cr0::EVTQEN).bits()),
        );
        if smmuen {
            self.trap(
                regs::SMMU_CR0,
                u64::from((Cr0::CMDQEN | Cr0::EVTQEN | Cr0::SMMUEN).bits()),
            );
        }
    }

    /// Writes `cmds` at the guest's CMDQ_PROD and traps the PROD write.
    fn issue(&self, cmds: &[Command]) {
        let entries = 1u32 << CMDQ_LOG2;
        let mut p = self.prod.load(Ordering::Relaxed);
        for c in cmds {
            let w = c.encode();
            self.ram
                .put_u64s(CMDQ + u64::from(p & (entries - 1)) * 16, &w);
            p = (p + 1) & ((entries << 1) - 1);
        }
        self.prod.store(p, Ordering::Relaxed);
        self.trap(regs::SMMU_CMDQ_PROD, p.into());
    }

    /// An unmap: TLBI_NH_VA and a CMD_SYNC whose MSI the guest polls in RAM.
    fn unmap(&self, n: u64) {
        let slot = MSI + (n % 512) * 8;
        self.ram.put_u64s(slot, &[u64::MAX]);
        self.issue(&[
            Command::TlbiNhVa {
                vmid: 0,
                asid: 1,
                addr: TlbiAddr::single(0x10_0000 + (n << 12), true),
            },
            msi_sync(slot, 1),
        ]);
        if self.ram.u32_at(slot) != 1 {
            let st = *self.model.lock().unwrap().stats();
            panic!(
                "the unmap's CMD_SYNC did not complete: CONS {:#x} PROD {:#x} GERROR {:#x}/{:#x}, {st:?}",
                self.read(regs::SMMU_CMDQ_CONS),
                self.read(regs::SMMU_CMDQ_PROD),
                self.read(regs::SMMU_GERROR),
                self.read(regs::SMMU_GERRORN)
            );
        }
    }

    /// An STE update: its CD pointer moves (one doubleword: no break), CFGI_STE + CMD_SYNC.
    fn ste_update(&self, n: u64) {
        let cd = if n.is_multiple_of(2) { CD_B } else { CD_A };
        self.ram
            .put_u64s(STRTAB + u64::from(self.vsid) * 64, &guest_s1_ste(cd).0);
        let slot = MSI + 0x1000;
        self.ram.put_u64s(slot, &[u64::MAX]);
        self.issue(&[
            Command::CfgiSte {
                sid: self.vsid,
                leaf: true,
            },
            msi_sync(slot, 1),
        ]);
        assert_eq!(
            self.ram.u32_at(slot),
            1,
            "the STE update's CMD_SYNC completed"
        );
    }

    /// Guest event records in its event queue, consumed (its driver's event thread).
    fn take_events(&self) -> u64 {
        let prod = self.read(regs::SMMU_EVENTQ_PROD);
        let cons = self.read(regs::SMMU_EVENTQ_CONS);
        let n = prod.wrapping_sub(cons) & ((2 << EVTQ_LOG2) - 1);
        if n == 0 {
            return 0;
        }
        // CONS := PROD, the overflow acknowledged (OVACKFLG := OVFLG).
        self.trap(regs::SMMU_EVENTQ_CONS, u64::from(prod));
        u64::from(n)
    }
}

fn msi_sync(addr: u64, data: u32) -> Command {
    Command::Sync(Sync {
        cs: SyncCs::Irq,
        msh: 3,
        msiattr: 0xf,
        msidata: data,
        msiaddr: addr,
    })
}

/// The hypervisor's `service_events`: drains the physical event queue (its per-stream budget
/// applied) and gives each record to the VM owning its StreamID.
fn service_events(shared: &Shared, vms: &[&Vm]) {
    let h = &shared.hw;
    if h.eventq_prod.load(Ordering::Acquire) & 0x000f_ffff
        == h.eventq_cons.load(Ordering::Acquire) & 0x000f_ffff
    {
        return;
    }
    let mut got = Vec::new();
    let mut smmu = shared.smmu.lock().unwrap();
    smmu.poll_events(Some(h.now()), |e, fate| got.push((e, fate)));
    drop(smmu);
    for (e, fate) in got {
        if let Some(vm) = vms.iter().find(|v| v.vsid == e.stream_id) {
            vm.model
                .lock()
                .unwrap()
                .forward_event(&e, fate, &mut &vm.ram);
        }
    }
}

// ---- The runs ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flood {
    None,
    SteFlip,
    Gbpa,
    Cmdq,
    Events,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Flood::None => "none",
            Flood::SteFlip => "ste-flip",
            Flood::Gbpa => "gbpa",
            Flood::Cmdq => "cmdq",
            Flood::Events => "events",
        }
    }
}

/// Latencies of the victim's operations, in ns.
#[derive(Debug, Default)]
struct Run {
    unmap: Vec<u64>,
    ste: Vec<u64>,
    /// The same without the operations the host's preemption stalled (see `HOST_STALL_*`).
    unmap_clean: Vec<u64>,
    ste_clean: Vec<u64>,
    victim_events_recorded: u64,
    victim_events_forwarded: u64,
    attacker: String,
    overflows: u64,
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

const VICTIM_SID: u32 = 0x10;
const ATTACKER_SID: u32 = 0x20;

fn run(flood: Flood, secs: f64, costs: Costs, budget: Budget) -> Run {
    let hw = Arc::new(Hw {
        mem: (0..PA_SIZE / 8).map(|_| AtomicU64::new(0)).collect(),
        next_alloc: AtomicU64::new(PA_BASE),
        cr0: AtomicU32::new(0),
        irq_ctrl: AtomicU32::new(0),
        gbpa: AtomicU32::new(0),
        gerror: AtomicU32::new(0),
        gerrorn: AtomicU32::new(0),
        strtab_base: AtomicU64::new(0),
        cmdq_base: AtomicU64::new(0),
        cmdq_prod: AtomicU32::new(0),
        cmdq_cons: AtomicU32::new(0),
        eventq_base: AtomicU64::new(0),
        eventq_prod: AtomicU32::new(0),
        eventq_cons: AtomicU32::new(0),
        costs,
        stop: AtomicBool::new(false),
        devices: [VICTIM_SID, ATTACKER_SID]
            .into_iter()
            .map(|sid| Device {
                sid,
                period: AtomicU64::new(u64::MAX),
                next: AtomicU64::new(0),
                recorded: AtomicU64::new(0),
                aborted: AtomicU64::new(0),
            })
            .collect(),
        t0: Instant::now(),
        commands: AtomicU64::new(0),
        overflows: AtomicU64::new(0),
    });
    let smmu_thread = {
        let hw = hw.clone();
        std::thread::spawn(move || {
            pin(1);
            realtime_thread();
            hw.run()
        })
    };
    let cfg = SmmuConfig {
        // Waits may outlast a host time slice: bound them in seconds, not microseconds.
        poll_limit: 200_000_000,
        events: EventBudget::default(),
        ..SmmuConfig::default()
    };
    let smmu = Smmu::probe(Fake(hw.clone()), Fake(hw.clone()), cfg).expect("probe");
    let shared = Arc::new(Shared {
        cmdq: smmu.cmdq().clone(),
        smmu: Mutex::new(smmu),
        hw: hw.clone(),
    });
    let phys = Phys(shared.clone());
    for (sid, vmid) in [(VICTIM_SID, 1), (ATTACKER_SID, 2)] {
        shared
            .smmu
            .lock()
            .unwrap()
            .set_ste(sid, Ste::stage2(s2(vmid)))
            .expect("attach");
    }
    let victim = Vm::new("victim", VICTIM_SID, 1, &phys, budget);
    let attacker = Vm::new("attacker", ATTACKER_SID, 2, &phys, budget);
    victim.bring_up(true);
    attacker.bring_up(flood != Flood::Gbpa);

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    match flood {
        Flood::None => {}
        Flood::SteFlip => {
            let (a, s) = (attacker.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                attacker_thread();
                let mut cmds = Vec::new();
                for i in 0..128u64 {
                    cmds.push(Command::CfgiSte {
                        sid: ATTACKER_SID,
                        leaf: true,
                    });
                    cmds.push(msi_sync(MSI + i * 4, 1));
                }
                while !s.load(Ordering::Relaxed) {
                    a.issue(&cmds);
                }
            }));
            let (a, s) = (attacker.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                attacker_thread();
                let at = STRTAB + u64::from(ATTACKER_SID) * 64;
                let (x, y) = (guest_s1_ste(CD_A), guest_bypass_ste());
                let mut n = 0u64;
                while !s.load(Ordering::Relaxed) {
                    let ste = if n.is_multiple_of(2) { x } else { y };
                    a.ram.put_u64s(at, &ste.0);
                    n += 1;
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                    if n.is_multiple_of(64) {
                        std::thread::yield_now();
                    }
                }
            }));
        }
        Flood::Gbpa => {
            let (a, s) = (attacker.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                attacker_thread();
                let mut abort = false;
                while !s.load(Ordering::Relaxed) {
                    abort = !abort;
                    let v = Gbpa::UPDATE.bits() | if abort { Gbpa::ABORT.bits() } else { 0 };
                    a.trap(regs::SMMU_GBPA, v.into());
                    while a.read(regs::SMMU_GBPA) & Gbpa::UPDATE.bits() != 0 {
                        std::thread::yield_now();
                    }
                }
            }));
        }
        Flood::Cmdq => {
            let (a, s) = (attacker.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                attacker_thread();
                let mut cmds = Vec::new();
                for i in 0..128u64 {
                    cmds.push(Command::TlbiNhVa {
                        vmid: 0,
                        asid: 1,
                        addr: TlbiAddr::single(i << 12, true),
                    });
                    cmds.push(msi_sync(MSI + i * 4, 1));
                }
                while !s.load(Ordering::Relaxed) {
                    a.issue(&cmds);
                }
            }));
        }
        Flood::Events => {
            hw.devices[1].period.store(0, Ordering::Relaxed);
            let (a, v, s, sh) = (
                attacker.clone(),
                victim.clone(),
                stop.clone(),
                shared.clone(),
            );
            threads.push(std::thread::spawn(move || {
                attacker_thread();
                while !s.load(Ordering::Relaxed) {
                    service_events(&sh, &[&v, &a]);
                    a.take_events();
                    std::thread::yield_now();
                }
            }));
        }
    }

    // The victim's device faults every 5 ms in every run (well within its event budget, even
    // when a drain comes late on this host).
    hw.devices[0].period.store(5_000_000, Ordering::Relaxed);

    let mut r = Run::default();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        let idle0 = IDLE_SPINS.with(|c| c.get());
        let lock0 = LOCK_NS.with(|c| c.get());
        let pre0 = preemptions();
        let t = Instant::now();
        let ste = n % 8 == 7;
        if ste {
            victim.ste_update(n);
        } else {
            victim.unmap(n);
        }
        let dt = t.elapsed().as_nanos() as u64;
        // The host took the victim's CPU in the middle (its vCPU would have a CPU of its own),
        // or it waited behind a preempted attacker thread.
        let stalled = preemptions() != pre0
            || IDLE_SPINS.with(|c| c.get()) - idle0 > HOST_STALL_SPINS
            || LOCK_NS.with(|c| c.get()) - lock0 > HOST_STALL_LOCK_NS;
        let (all, clean) = if ste {
            (&mut r.ste, &mut r.ste_clean)
        } else {
            (&mut r.unmap, &mut r.unmap_clean)
        };
        all.push(dt);
        if !stalled {
            clean.push(dt);
        }
        n += 1;
        service_events(&shared, &[&victim, &attacker]);
        r.victim_events_forwarded += victim.take_events();
        std::thread::sleep(Duration::from_micros(50));
    }
    stop.store(true, Ordering::Relaxed);
    hw.devices[0].period.store(u64::MAX, Ordering::Relaxed);
    hw.devices[1].period.store(u64::MAX, Ordering::Relaxed);
    for t in threads {
        t.join().expect("attacker thread");
    }
    // What is still in the queues reaches its guest.
    std::thread::sleep(Duration::from_millis(2));
    service_events(&shared, &[&victim, &attacker]);
    r.victim_events_forwarded += victim.take_events();
    r.victim_events_recorded = hw.devices[0].recorded.load(Ordering::Relaxed);
    r.overflows = hw.overflows.load(Ordering::Relaxed);
    let a = *attacker.model.lock().unwrap().stats();
    let d = shared.smmu.lock().unwrap().stats();
    r.attacker = format!(
        "attacker: {} guest commands -> {} physical + {} syncs, {} STE writes ({} breaks, {} skipped), \
         tlbi_merged={} syncs_merged={} budget_waits={} order_waits={} gbpa_deferred={}; \
         events: {} recorded, {} aborted silently, {} suppressed, {} quarantines",
        a.commands,
        a.phys_commands,
        a.phys_syncs,
        a.ste_writes,
        a.ste_breaks,
        a.ste_skipped,
        a.tlbi_merged,
        a.syncs_merged,
        a.budget_waits,
        a.order_waits,
        a.gbpa_deferred,
        hw.devices[1].recorded.load(Ordering::Relaxed),
        hw.devices[1].aborted.load(Ordering::Relaxed),
        d.events_suppressed,
        d.quarantines,
    );
    hw.stop.store(true, Ordering::Release);
    smmu_thread.join().expect("SMMU thread");
    let g = shared.smmu.lock().unwrap().active_gerror();
    assert!(!g.contains(Gerror::CMDQ_ERR), "no command error");
    r
}

fn main() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) on the calling thread takes a number, no pointer.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    // The victim's vCPU: nice -20, so that host load, not the SMMU, makes little of the figures.
    pin(0);
    nice(-20);
    let rt = std::env::var_os("BENCH_NO_RT").is_none();
    let mut secs = 2.0;
    let mut costs = Costs {
        sync: 2_000,
        ste_fetch: 2_000,
        tlbi: 200,
        other: 200,
        event: 300,
    };
    let mut budget = Budget::default();
    let mut floods = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || {
            args.next()
                .and_then(|v| v.parse::<f64>().ok())
                .expect("a number")
        };
        match a.as_str() {
            "--secs" => secs = num(),
            "--sync-ns" => costs.sync = num() as u64,
            "--ste-ns" => costs.ste_fetch = num() as u64,
            "--tlbi-ns" => costs.tlbi = num() as u64,
            "--no-budget" => {
                budget = Budget {
                    tlbi_per_trap: u16::MAX,
                    outstanding: u16::MAX,
                    ste_burst: u32::MAX,
                    ste_period_ns: 0,
                    sync_burst: u32::MAX,
                    sync_period_ns: 0,
                }
            }
            "ste-flip" => floods.push(Flood::SteFlip),
            "gbpa" => floods.push(Flood::Gbpa),
            "cmdq" => floods.push(Flood::Cmdq),
            "events" => floods.push(Flood::Events),
            other => panic!("unknown argument {other:?}"),
        }
    }
    if floods.is_empty() {
        floods = vec![Flood::SteFlip, Flood::Gbpa, Flood::Cmdq, Flood::Events];
    }
    println!(
        "costs: CMD_SYNC {} ns, STE fetch {} ns, TLBI {} ns; {secs} s per run; threads: {}; \
         budget {budget:?}",
        costs.sync,
        costs.ste_fetch,
        costs.tlbi,
        if rt {
            "SMMU SCHED_FIFO, victim nice -20"
        } else {
            "all SCHED_OTHER"
        }
    );
    let mut base = run(Flood::None, secs, costs, budget);
    let (bu50, bu99) = (
        percentile(&mut base.unmap, 0.5),
        percentile(&mut base.unmap, 0.99),
    );
    let (bs50, bs99) = (
        percentile(&mut base.ste, 0.5),
        percentile(&mut base.ste, 0.99),
    );
    println!(
        "{:9} unmap median {:6} ns p99 {:6} ns | STE update median {:6} ns p99 {:6} ns | {} unmaps, victim events {}/{}",
        "none",
        bu50,
        bu99,
        bs50,
        bs99,
        base.unmap.len(),
        base.victim_events_forwarded,
        base.victim_events_recorded
    );
    let (bcu99, bcs99) = (
        percentile(&mut base.unmap_clean, 0.99),
        percentile(&mut base.ste_clean, 0.99),
    );
    for f in floods {
        let mut r = run(f, secs, costs, budget);
        let (u50, u99) = (
            percentile(&mut r.unmap, 0.5),
            percentile(&mut r.unmap, 0.99),
        );
        let (s50, s99) = (percentile(&mut r.ste, 0.5), percentile(&mut r.ste, 0.99));
        let (cu99, cs99) = (
            percentile(&mut r.unmap_clean, 0.99),
            percentile(&mut r.ste_clean, 0.99),
        );
        let stalled = r.unmap.len() + r.ste.len() - r.unmap_clean.len() - r.ste_clean.len();
        let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        println!(
            "{:9} unmap median {:6} ns p99 {:6} ns | STE update median {:6} ns p99 {:6} ns | ratios unmap x{:.2} / x{:.2}, STE x{:.2} / x{:.2} | {} unmaps, victim events {}/{}, queue overflows {}",
            f.name(),
            u50,
            u99,
            s50,
            s99,
            ratio(u50, bu50),
            ratio(u99, bu99),
            ratio(s50, bs50),
            ratio(s99, bs99),
            r.unmap.len(),
            r.victim_events_forwarded,
            r.victim_events_recorded,
            r.overflows
        );
        println!(
            "          without the {stalled} operations a host preemption stalled: p99 unmap {cu99} ns \
             (x{:.2}), STE update {cs99} ns (x{:.2})",
            ratio(cu99, bcu99),
            ratio(cs99, bcs99)
        );
        println!("          {}", r.attacker);
    }
}

//! Host micro-benchmark of the vSMMU's command-queue emulation: the time of one trap path
//! (decode, scope to the VM, forward, complete CMD_SYNC by MSI) for a batch of guest commands,
//! with a physical SMMU that accepts everything at once, and whether the steady state allocates.
//!
//! Run: `cargo bench -p smmu-hv-smmuv3 --bench vsmmu_cmdq` (figures only; divan's options
//! follow `--`, e.g. `-- --sample-count 50`).
//!
//! One batch is what Linux issues for a strict-mode unmap: TLBI_NH_VA + CMD_SYNC (MSI to its own
//! slot), or a larger batch of TLBIs closed by one sync; the argument is the batch's size, and
//! divan's `item/s` is guest commands per second. Other sizes: edit `args` below (the old
//! example took them from its command line; divan takes no arguments of a benchmark's own). Divan's `AllocProfiler` counts the heap
//! operations of every measured trap (after a warm-up that lets the batch buffer reach its
//! capacity): a steady state that allocates shows `alloc:` rows under its batch size; none means
//! zero. Divan gives no way to read its counts from the program, so that is not a pass/fail
//! check. What divan cannot show (physical commands per guest command, that every command was
//! consumed) is asserted after each run and printed after divan's table.

use divan::counter::ItemsCount;
use divan::Bencher;
use smmu::cmd::{Command, Sync, SyncCs, TlbiAddr};
use smmu::driver::{DriverError, SteBreak, SteWrite, SyncTicket};
use smmu::regs::{self, Cr0};
use smmu::ste::{S2Config, Ste};
use smmu::vsmmu::{
    Budget, GuestMemError, GuestMemory, PhysicalSmmu, StreamMap, Vsmmu, VsmmuConfig,
};
use std::sync::Mutex;

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

/// Lines for after divan's table (a line printed during a run would break it).
static FIGURES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn main() {
    divan::main();
    for line in FIGURES.lock().unwrap().iter() {
        println!("{line}");
    }
}

const RAM: u64 = 0x4000_0000;
const CMDQ: u64 = RAM + 0x1_0000;
const STRTAB: u64 = RAM + 0x2_0000;
const LOG2: u8 = 8;

struct Ram(Vec<u8>);

impl GuestMemory for Ram {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let o = (ipa - RAM) as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let o = (ipa - RAM) as usize;
        self.0[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Accepts everything at once, counting. Its clock is a counter (one "ns" per reading), so the
/// budgets by time run their code without the host's clock_gettime in the figures (the
/// hypervisor reads CNTPCT_EL0).
#[derive(Default)]
struct Phys {
    cmds: u64,
    syncs: u64,
    clock: std::cell::Cell<u64>,
}

impl PhysicalSmmu for Phys {
    fn write_ste(&mut self, _: u32, _: Ste) -> Result<SteWrite, DriverError> {
        Ok(SteWrite::Unchanged)
    }
    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        Ok(b.cfgi)
    }
    fn now(&self) -> Option<u64> {
        let t = self.clock.get() + 1;
        self.clock.set(t);
        Some(t)
    }
    fn submit(&mut self, c: &[Command]) -> Result<(), DriverError> {
        self.cmds += c.len() as u64;
        Ok(())
    }
    fn submit_sync(&mut self, c: &[Command]) -> Result<SyncTicket, DriverError> {
        self.cmds += c.len() as u64;
        self.syncs += 1;
        Ok(SyncTicket::at(self.syncs))
    }
    fn publish(&self) {}
    fn wait(&self, _: SyncTicket) -> Result<(), DriverError> {
        Ok(())
    }
}

/// One vSMMU with its guest RAM and physical SMMU, enabled, its command queue empty.
struct Rig {
    v: Vsmmu,
    ram: Ram,
    phys: Phys,
    prod: u32,
    /// Traps so far (spreads the TLBIs' addresses).
    n: u64,
}

impl Rig {
    fn new() -> Self {
        let cfg = VsmmuConfig {
            name: "bench".into(),
            streams: vec![StreamMap { vsid: 8, psid: 8 }],
            s2: S2Config {
                vmid: 1,
                root_pa: 0x8000_0000,
                t0sz: 25,
                sl0: 1,
                ps: 4,
                affd: false,
            },
            sid_bits: 16,
            oas_bits: 40,
            phys_idr5: 0x74,
            phys_ril: true,
            // The default budget but CMD_SYNCs unbudgeted: the counter clock is not time.
            budget: Budget {
                sync_period_ns: 0,
                ..Budget::default()
            },
        };
        let mut v = Vsmmu::new(cfg);
        let mut ram = Ram(vec![0; 1 << 20]);
        let mut phys = Phys::default();
        v.reset(&mut phys);
        v.write(regs::SMMU_STRTAB_BASE, 8, STRTAB, &mut ram, &mut phys);
        v.write(regs::SMMU_STRTAB_BASE_CFG, 4, 5, &mut ram, &mut phys);
        v.write(
            regs::SMMU_CMDQ_BASE,
            8,
            CMDQ | u64::from(LOG2),
            &mut ram,
            &mut phys,
        );
        let en = (Cr0::CMDQEN | Cr0::SMMUEN).bits();
        v.write(regs::SMMU_CR0, 4, en.into(), &mut ram, &mut phys);
        Self {
            v,
            ram,
            phys,
            prod: 0,
            n: 0,
        }
    }

    /// One trap: the guest writes `batch` commands (the last a CMD_SYNC) and then PROD.
    fn trap(&mut self, batch: usize) {
        let entries = 1u32 << LOG2;
        // Distinct pages within a trap; the addresses wrap after 2^20 traps.
        let n = self.n & 0xf_ffff;
        self.n += 1;
        for i in 0..batch {
            let slot = CMDQ + u64::from(self.prod & (entries - 1)) * 16;
            let c = if i + 1 == batch {
                Command::Sync(Sync {
                    cs: SyncCs::Irq,
                    msh: 3,
                    msiattr: 0xf,
                    msidata: 0,
                    msiaddr: slot,
                })
            } else {
                Command::TlbiNhVa {
                    vmid: 0,
                    asid: 1,
                    addr: TlbiAddr::single((n << 12) + ((i as u64) << 20), true),
                }
            };
            self.ram.write(slot, &c.to_bytes()).unwrap();
            self.prod = (self.prod + 1) & ((entries << 1) - 1);
        }
        self.v.write(
            regs::SMMU_CMDQ_PROD,
            4,
            self.prod.into(),
            &mut self.ram,
            &mut self.phys,
        );
    }
}

/// Traps before the measured ones: the batch buffer reaches its capacity.
const WARM_UP: usize = 1000;

// Samples of 100 traps: divan's own choice of sample size swings (one slow first trap makes it
// time traps one by one, each then a few timer ticks). 1000 of them, not divan's default 100: a
// longer steady state is a better look for an allocation (100 000 traps, as the old example's
// 200 000 commands at batch 2).
#[divan::bench(args = [2, 8, 32], sample_size = 100, sample_count = 1000)]
fn trap(bencher: Bencher, batch: usize) {
    let mut rig = Rig::new();
    for _ in 0..WARM_UP {
        rig.trap(batch);
    }
    bencher
        .counter(ItemsCount::new(batch))
        .bench_local(|| rig.trap(batch));

    assert_eq!(
        rig.v.read(regs::SMMU_CMDQ_CONS, 4) as u32,
        rig.prod,
        "every command consumed"
    );
    let s = rig.v.stats();
    assert_eq!(s.commands, rig.n * batch as u64, "every command counted");
    FIGURES.lock().unwrap().push(format!(
        "batch of {batch:2}: {} traps, {} guest commands, {} guest syncs -> {} physical commands \
         ({:.3} per guest command), {} physical syncs; every command consumed",
        rig.n,
        s.commands,
        s.syncs,
        s.phys_commands,
        s.phys_commands as f64 / s.commands as f64,
        s.phys_syncs,
    ));
}

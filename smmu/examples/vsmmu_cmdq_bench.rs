//! Host micro-benchmark of the vSMMU's command-queue emulation: how many guest commands per
//! second one trap path consumes (decode, scope to the VM, forward, complete CMD_SYNC by MSI),
//! with a physical SMMU that accepts everything at once, and whether the steady state allocates.
//!
//! Run: `cargo run --release -p smmu-hv-smmuv3 --example vsmmu_cmdq_bench`
//! (figures only; not a pass/fail test).

use smmu::cmd::{Command, Sync, SyncCs, TlbiAddr};
use smmu::driver::{DriverError, SteBreak, SteWrite, SyncTicket};
use smmu::regs::{self, Cr0};
use smmu::ste::{S2Config, Ste};
use smmu::vsmmu::{
    Budget, GuestMemError, GuestMemory, PhysicalSmmu, StreamMap, Vsmmu, VsmmuConfig,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts heap allocations, to show the steady state makes none.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

fn main() {
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

    let entries = 1u32 << LOG2;
    let mut prod = 0u32;
    // One batch as Linux issues it for a strict-mode unmap: TLBI_NH_VA + CMD_SYNC (MSI to its
    // own slot), or a larger batch of TLBIs closed by one sync.
    // Batch sizes from the command line (default 2, 8, 32).
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![2, 8, 32]
    } else {
        sizes
    };
    for batch in sizes {
        let traps = 200_000 / batch as u64;
        let mut run = |count: u64, prod: &mut u32, ram: &mut Ram, phys: &mut Phys| {
            for n in 0..count {
                for i in 0..batch {
                    let slot = CMDQ + u64::from(*prod & (entries - 1)) * 16;
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
                    ram.write(slot, &c.to_bytes()).unwrap();
                    *prod = (*prod + 1) & ((entries << 1) - 1);
                }
                v.write(regs::SMMU_CMDQ_PROD, 4, (*prod).into(), ram, phys);
            }
        };
        // Warm-up (the batch buffer reaches its capacity), then the measured steady state.
        run(1000, &mut prod, &mut ram, &mut phys);
        let allocs0 = ALLOCS.load(Ordering::Relaxed);
        let t = Instant::now();
        run(traps, &mut prod, &mut ram, &mut phys);
        let dt = t.elapsed().as_secs_f64();
        let allocs = ALLOCS.load(Ordering::Relaxed) - allocs0;
        let cmds = traps * batch as u64;
        println!(
            "batch of {batch:2} commands per trap: {:6.2} M commands/s, {:6.0} ns per trap, {allocs} heap allocations in {traps} traps",
            cmds as f64 / dt / 1e6,
            dt / traps as f64 * 1e9,
        );
    }
    let s = v.stats();
    println!(
        "totals: {} guest commands, {} guest syncs -> {} physical commands, {} physical syncs",
        s.commands, s.syncs, s.phys_commands, s.phys_syncs
    );
    assert_eq!(
        v.read(regs::SMMU_CMDQ_CONS, 4) as u32,
        prod,
        "every command consumed"
    );
}

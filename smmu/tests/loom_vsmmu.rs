//! Every interleaving (within loom's preemption bound) of two vCPUs of one VM whose vSMMU traps
//! overlap the way the hypervisor runs them (`hypervisor/src/devices/vsmmu.rs`): the trap's
//! start under the VM's vSMMU lock, the physical publish and wait without it, then the
//! completion under the lock again, round after round; against the real physical command
//! queue ([`smmu::driver::Cmdq`]) over the model SMMU of `loom_support`. Asserted in each: the
//! guest's CMDQ_CONS never goes back, and neither it nor a CMD_SYNC's MSI shows a guest command
//! complete before the physical SMMU ran the invalidation it was forwarded as.
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p smmu-hv-smmuv3 --test loom_vsmmu --release` (qemu/loom.sh).
#![cfg(loom)]

mod loom_support;

use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use loom_support::{model, FakeSmmu};
use smmu::cmd::{Command, Sync, SyncCs};
use smmu::driver::{Cmdq, DriverError, SteBreak, SteWrite, SyncTicket};
use smmu::regs::{self, Cr0};
use smmu::ste::{S2Config, Ste};
use smmu::vsmmu::{
    Budget, GuestMemError, GuestMemory, PhysicalSmmu, Vsmmu, VsmmuConfig, MAX_ROUNDS,
};

const VMID: u16 = 7;
const RAM: u64 = 0x4000_0000;
const RAM_SIZE: usize = 0x1000;
const STRTAB: u64 = RAM;
const CMDQ: u64 = RAM + 0x800;
/// The guest's command queue: 8 entries.
const CMDQ_LOG2: u8 = 3;
/// Where each vCPU's CMD_SYNC writes its MSI.
const MSI: [u64; 2] = [RAM + 0x100, RAM + 0x200];

/// The physical SMMU as every vCPU reaches it: one shared queue.
#[derive(Clone)]
struct Phys(Arc<Cmdq<FakeSmmu, FakeSmmu>>);

impl PhysicalSmmu for Phys {
    fn write_ste(&mut self, sid: u32, _: Ste) -> Result<SteWrite, DriverError> {
        panic!("the VM has no streams, yet STE {sid:#x} was written")
    }

    fn make_ste(&mut self, _: SteBreak) -> Result<Command, DriverError> {
        panic!("the VM has no streams, yet an STE was made")
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.0.queue(cmds)
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.0.queue_sync(cmds)
    }

    fn publish(&self) {
        self.0.publish()
    }

    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        self.0.wait(ticket)
    }
}

/// The VM's RAM. An MSI write is checked against what the physical SMMU has run.
#[derive(Clone)]
struct Ram {
    bytes: Arc<Mutex<Vec<u8>>>,
    hw: FakeSmmu,
}

impl Ram {
    fn offset(ipa: u64, len: usize) -> Result<usize, GuestMemError> {
        let err = GuestMemError {
            ipa,
            len: len as u64,
        };
        let off = ipa.checked_sub(RAM).ok_or(err)? as usize;
        (off + len <= RAM_SIZE).then_some(off).ok_or(err)
    }

    fn u32_at(&self, ipa: u64) -> u32 {
        let mut b = [0; 4];
        self.read(ipa, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
}

impl GuestMemory for Ram {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let off = Self::offset(ipa, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[off..off + buf.len()]);
        Ok(())
    }

    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let off = Self::offset(ipa, data.len())?;
        if let Some(vcpu) = MSI.iter().position(|&a| a == ipa) {
            assert!(
                ran_tlbi(&self.hw, vcpu),
                "vCPU {vcpu}'s CMD_SYNC MSI written before its TLBI ran on the SMMU"
            );
        }
        self.bytes.lock().unwrap()[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// vCPU `i`'s invalidation: a TLBI of ASID `i + 1`.
fn tlbi(i: usize) -> Command {
    Command::TlbiNhAsid {
        vmid: 0,
        asid: i as u16 + 1,
    }
}

/// Whether the physical SMMU has run what vCPU `i`'s TLBI was forwarded as (or an invalidation
/// of the whole VMID, which covers it).
fn ran_tlbi(hw: &FakeSmmu, i: usize) -> bool {
    hw.0.log.lock().unwrap().iter().any(|c| {
        *c == Command::TlbiNhAsid {
            vmid: VMID,
            asid: i as u16 + 1,
        } || *c == Command::TlbiNhAll { vmid: VMID }
    })
}

fn msi_sync(i: usize) -> Command {
    Command::Sync(Sync {
        cs: SyncCs::Irq,
        msh: 3,
        msiattr: 0xf,
        msidata: 0xa + i as u32,
        msiaddr: MSI[i],
    })
}

/// The model under the VM's vSMMU lock, with the highest guest CMDQ_CONS any vCPU has read.
struct Vm {
    v: Vsmmu,
    seen_cons: u32,
}

impl Vm {
    /// A guest CMDQ_CONS read: it never goes back, and a command it shows consumed, if it was
    /// an invalidation, has run (`batches[i]`: vCPU i's commands are guest slots 2i, 2i + 1).
    fn read_cons(&mut self, hw: &FakeSmmu) -> u32 {
        let raw = self.v.read(regs::SMMU_CMDQ_CONS, 4) as u32;
        // CMDQ_CONS.ERR [30:24]: the only error these guests can see is CERROR_ABT for a
        // physical CMD_SYNC that failed (a poll that ran out).
        assert_eq!(
            raw >> 24 & 0x7f,
            0,
            "guest CMDQ_CONS {raw:#x}: a command error (a physical CMD_SYNC failed)"
        );
        let c = raw & ((2 << CMDQ_LOG2) - 1);
        assert!(
            c >= self.seen_cons,
            "guest CMDQ_CONS went back from {:#x} to {c:#x}",
            self.seen_cons
        );
        self.seen_cons = c;
        for i in 0..2 {
            // Its CMD_SYNC (slot 2i + 1) shown complete.
            if c > 2 * i as u32 + 1 {
                assert!(
                    ran_tlbi(hw, i),
                    "guest CONS {c:#x} past vCPU {i}'s CMD_SYNC before its TLBI ran"
                );
            }
        }
        c
    }
}

/// A guest that probed the vSMMU (stream table, command queue, SMMUEN) and wrote each vCPU's
/// TLBI and CMD_SYNC into its command queue (slots 0-1 and 2-3).
/// The physical queue has 2^`log2` entries; `others` producers of other VMs may share it.
fn boot(log2: u8, others: usize) -> (Arc<Mutex<Vm>>, Phys, Ram, FakeSmmu) {
    let hw = FakeSmmu::new(log2, others);
    let mut phys = Phys(Arc::new(hw.cmdq(64)));
    let mut ram = Ram {
        bytes: Arc::new(Mutex::new(vec![0; RAM_SIZE])),
        hw: hw.clone(),
    };
    let cfg = VsmmuConfig {
        name: "vm0".into(),
        streams: Vec::new(),
        s2: S2Config {
            vmid: VMID,
            root_pa: 0x8000_0000,
            t0sz: 24,
            sl0: 1,
            ps: 2,
            affd: false,
        },
        sid_bits: 8,
        oas_bits: 40,
        phys_idr5: 0x75,
        phys_ril: false,
        budget: Budget::default(),
    };
    let mut v = Vsmmu::new(cfg);
    v.reset(&mut phys);
    let mut w = |off, size, value| v.write(off, size, value, &mut ram, &mut phys);
    w(regs::SMMU_CR0, 4, 0);
    w(regs::SMMU_CR1, 4, regs::cr1::COHERENT.into());
    w(regs::SMMU_STRTAB_BASE, 8, regs::strtab_base(STRTAB, true));
    w(
        regs::SMMU_STRTAB_BASE_CFG,
        4,
        regs::strtab_base_cfg(regs::StrtabFmt::Linear, 5, 0).into(),
    );
    w(
        regs::SMMU_CMDQ_BASE,
        8,
        regs::queue_base(CMDQ, CMDQ_LOG2, true),
    );
    w(regs::SMMU_CMDQ_PROD, 4, 0);
    w(regs::SMMU_CMDQ_CONS, 4, 0);
    w(regs::SMMU_CR0, 4, Cr0::CMDQEN.bits().into());
    w(regs::SMMU_CR0, 4, (Cr0::CMDQEN | Cr0::SMMUEN).bits().into());
    for (slot, c) in [tlbi(0), msi_sync(0), tlbi(1), msi_sync(1)]
        .iter()
        .enumerate()
    {
        ram.write(CMDQ + slot as u64 * 16, &c.to_bytes()).unwrap();
    }
    hw.0.log.lock().unwrap().clear();
    let vm = Vm { v, seen_cons: 0 };
    (Arc::new(Mutex::new(vm)), phys, ram, hw)
}

/// vCPU `i`'s trap of its CMDQ_PROD write (`prod`), as `devices/vsmmu.rs` runs it; `started`
/// is told once the trap's start has let go of the lock.
fn trap(
    vm: &Mutex<Vm>,
    mut phys: Phys,
    mut ram: Ram,
    hw: &FakeSmmu,
    prod: u32,
    started: Option<&(Mutex<bool>, Condvar)>,
) {
    let mut o =
        vm.lock()
            .unwrap()
            .v
            .write_start(regs::SMMU_CMDQ_PROD, 4, prod.into(), &mut ram, &mut phys);
    if let Some((m, cv)) = started {
        *m.lock().unwrap() = true;
        cv.notify_one();
    }
    for _ in 0..MAX_ROUNDS {
        if !o.pending() {
            break;
        }
        let waited = o.wait(&phys);
        let mut vm = vm.lock().unwrap();
        o = vm.v.complete(o, waited, &mut ram, &mut phys);
        vm.read_cons(hw);
    }
    assert!(!o.pending(), "a trap still pending after MAX_ROUNDS");
    o.publish(&phys);
    // Done: everything up to this vCPU's PROD is consumed and visible.
    let c = vm.lock().unwrap().read_cons(hw);
    assert!(c >= prod, "the trap of PROD {prod} ended with CONS {c}");
}

#[test]
fn two_vcpus_traps_overlap_and_complete_only_after_the_physical_sync() {
    model(usize::MAX, || {
        let (vm, phys, ram, hw) = boot(2, 0);
        // vCPU 0 traps PROD = 2 first (a guest's PROD writes are ordered), then waits
        // outside the lock while vCPU 1 traps PROD = 4.
        let started = Arc::new((Mutex::new(false), Condvar::new()));
        let vcpu1 = {
            let (vm, phys, ram, hw, started) = (
                vm.clone(),
                phys.clone(),
                ram.clone(),
                hw.clone(),
                started.clone(),
            );
            thread::spawn(move || {
                let (m, cv) = &*started;
                let mut go = m.lock().unwrap();
                while !*go {
                    go = cv.wait(go).unwrap();
                }
                drop(go);
                trap(&vm, phys, ram, &hw, 4, None);
            })
        };
        trap(&vm, phys.clone(), ram.clone(), &hw, 2, Some(&started));
        vcpu1.join().unwrap();
        assert_eq!(vm.lock().unwrap().read_cons(&hw), 4);
        assert_eq!((ram.u32_at(MSI[0]), ram.u32_at(MSI[1])), (0xa, 0xb));
    });
}

#[test]
fn another_vms_commands_on_the_shared_queue_complete_nothing_of_the_guests() {
    model(usize::MAX, || {
        let (vm, phys, ram, hw) = boot(3, 1);
        // Another VM's vSMMU (or the hypervisor) queues a command and a CMD_SYNC of its own
        // on the same physical queue while vCPU 0's trap runs.
        let other = {
            let (q, hw) = (phys.0.clone(), hw.clone());
            thread::spawn(move || {
                q.submit_sync(&[loom_support::tagged(0, 0)]).unwrap();
                assert_eq!(
                    hw.ran(0),
                    1,
                    "the other VM's CMD_SYNC completed before its command"
                );
            })
        };
        trap(&vm, phys.clone(), ram.clone(), &hw, 2, None);
        other.join().unwrap();
        assert_eq!(ram.u32_at(MSI[0]), 0xa);
        // vCPU 1's commands were never handed over: nothing of them is visible.
        assert_eq!(vm.lock().unwrap().read_cons(&hw), 2);
        assert_eq!(ram.u32_at(MSI[1]), 0);
    });
}

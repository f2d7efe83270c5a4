//! Glue between a VM and its emulated SMMUv3 (`smmu::vsmmu`): the VM's RAM and the physical SMMU
//! as the model reaches them, trapped register accesses, the model's wired interrupts, routing of
//! physical SMMU events to the VM they belong to, and the statistics console command.

use super::guest_mem::GuestRam;
use super::iommu;
use super::vm::Vm;
use crate::platform::{MemRange, SmmuInfo};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use smmu::cmd::Command;
use smmu::driver::{DriverError, EventFate, SteBreak, SteWrite, SyncTicket};
use smmu::event::Event;
use smmu::ste::Ste;
use smmu::vsmmu::{
    reg_name, Budget, Forward, GuestMemError, GuestMemory, Irqs, PhysicalSmmu, StreamMap, Vsmmu,
    VsmmuConfig, MAX_ROUNDS, REG_SLOTS,
};
use spin::Mutex;

/// A VM's emulated SMMUv3: where the guest sees it and the model behind it.
#[derive(Debug)]
pub struct VmSmmu {
    /// Register pages 0 and 1 (guest IPA; never mapped, every access traps).
    pub regs: MemRange,
    /// INTID of its event queue interrupt (an edge SPI).
    pub eventq_intid: u32,
    /// INTID of its global error interrupt (an edge SPI).
    pub gerror_intid: u32,
    /// The register and queue model.
    pub model: Mutex<Vsmmu>,
}

/// Output address size of the guest's stage 1: the smallest SMMU OAS encoding that covers the
/// VM's IPA space (39 bits -> 40). Addresses above the IPA space fault at stage 2.
const GUEST_OAS_BITS: u8 = 40;
/// StreamID bits the guest sees: any PCI Requester ID, as on the physical SMMU.
const GUEST_SID_BITS: u8 = 16;

impl VmSmmu {
    /// A vSMMU for a VM owning `stream_ids` (the guest sees them under the same numbers, its
    /// `iommu-map` being the identity like the host's), at the physical SMMU's address and
    /// interrupt numbers. `None`, with the reason logged, when the physical SMMU cannot nest.
    pub fn new(
        vm: &str,
        info: &SmmuInfo,
        stream_ids: &[u32],
        vmid: u16,
        s2_root: u64,
    ) -> Option<Self> {
        let guard = iommu::SMMU.lock();
        let smmu = guard.as_ref()?;
        let f = smmu.features();
        let (Some(eventq_intid), Some(gerror_intid)) = (info.eventq_intid, info.gerror_intid)
        else {
            log::warn!("vsmmu: {vm}: the SMMU's DT node names no eventq/gerror interrupts: no vSMMU, stage 2 only");
            return None;
        };
        if !f.nesting {
            log::warn!(
                "vsmmu: {vm}: the SMMU cannot nest stage 1 over stage 2: no vSMMU, stage 2 only"
            );
            return None;
        }
        if f.stall_model == smmu::regs::StallModel::Forced {
            // With stalls forced a CD with S = 0 is ILLEGAL (IHI 0070 5.4), and the guest's CDs
            // have S = 0: its vSMMU says there are no stalls (STALL_MODEL = 0b01).
            log::warn!(
                "vsmmu: {vm}: the SMMU forces stalls, which a guest's stage 1 cannot use: no vSMMU, stage 2 only"
            );
            return None;
        }
        let idr3 = smmu::driver::SmmuRegs::read32(smmu.regs(), smmu::regs::SMMU_IDR3);
        let s2 = iommu::vm_s2_config(f.oas_bits, vmid, s2_root);
        drop(guard);
        let cfg = VsmmuConfig {
            name: vm.into(),
            streams: stream_ids
                .iter()
                .map(|&sid| StreamMap {
                    vsid: sid,
                    psid: sid,
                })
                .collect(),
            s2,
            sid_bits: GUEST_SID_BITS,
            oas_bits: GUEST_OAS_BITS,
            phys_idr5: f.idr5.0,
            phys_ril: smmu::regs::Idr3(idr3).ril(),
            budget: Budget::default(),
        };
        log::info!(
            "vsmmu: {vm}: SMMUv3 (stage 1) at {:#x}, StreamIDs {stream_ids:?}",
            info.regs.base
        );
        Some(Self {
            regs: MemRange {
                base: info.regs.base,
                size: smmu::regs::MMIO_SIZE,
            },
            eventq_intid,
            gerror_intid,
            model: Mutex::new(Vsmmu::new(cfg)),
        })
    }
}

/// The VM's RAM as the model reads the guest's tables and queues.
#[derive(Debug)]
pub struct VmMem<'a>(pub &'a GuestRam);

impl GuestMemory for VmMem<'_> {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        self.0.read(ipa, buf).map_err(|e| GuestMemError {
            ipa: e.ipa,
            len: e.len,
        })
    }

    fn write(&mut self, ipa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        self.0.write(ipa, data).map_err(|e| GuestMemError {
            ipa: e.ipa,
            len: e.len,
        })
    }
}

/// The physical SMMU as the vSMMUs reach it: stream-table writes under the physical SMMU's
/// lock, held for the writes only (a break-before-make's CMD_SYNC is waited for between
/// `write_ste` and `make_ste`, without it); commands through the lock-free command queue (the
/// I/O path: every DMA unmap), so that no lock on it is shared between VMs across a wait.
#[derive(Debug)]
pub struct PhysSmmu;

/// Counter reads a budget wait spins at most per microsecond it waits (a bound on the loop
/// should the counter stop).
const SPINS_PER_US: u64 = 1_000;

fn cmdq() -> Result<&'static iommu::HwCmdq, DriverError> {
    iommu::CMDQ
        .get()
        .map(|q| &**q)
        .ok_or(DriverError::MissingFeature("SMMU"))
}

impl PhysicalSmmu for PhysSmmu {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        match iommu::SMMU.lock().as_mut() {
            Some(s) => s.write_ste(sid, ste),
            None => Err(DriverError::MissingFeature("SMMU")),
        }
    }

    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        match iommu::SMMU.lock().as_mut() {
            Some(s) => s.make_ste(b),
            None => Err(DriverError::MissingFeature("SMMU")),
        }
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        cmdq()?.queue(cmds)
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        cmdq()?.queue_sync(cmds)
    }

    fn publish(&self) {
        if let Ok(q) = cmdq() {
            q.publish();
        }
    }

    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        cmdq()?.wait(ticket)
    }

    fn now(&self) -> Option<u64> {
        Some(iommu::now_ns())
    }

    fn wait_until(&self, deadline: u64) {
        let now = iommu::now_ns();
        let spins = deadline.saturating_sub(now) / 1_000 * SPINS_PER_US + SPINS_PER_US;
        for _ in 0..spins {
            if iommu::now_ns() >= deadline {
                return;
            }
            core::hint::spin_loop();
        }
    }
}

/// A trapped access to the VM's vSMMU registers (`off` from its base). Returns the value read.
/// A write that forwarded commands is finished without the model's lock: the physical queue is
/// published and waited for (and a budget waited out) while the VM's other vCPUs can trap on
/// their own vSMMU accesses; round after round, at most `MAX_ROUNDS`.
pub fn access(vm: &Vm, s: &VmSmmu, vcpu: usize, off: u64, size: u8, write: Option<u64>) -> u64 {
    match write {
        None => s.model.lock().read(off, size),
        Some(v) => {
            let mut o =
                s.model
                    .lock()
                    .write_start(off, size, v, &mut VmMem(vm.ram()), &mut PhysSmmu);
            let mut irqs = o.irqs;
            for _ in 0..MAX_ROUNDS {
                if !o.pending() {
                    break;
                }
                let waited = o.wait(&PhysSmmu);
                o = s
                    .model
                    .lock()
                    .complete(o, waited, &mut VmMem(vm.ram()), &mut PhysSmmu);
                irqs |= o.irqs;
            }
            if o.pending() {
                // A model bug: the rest is left to the VM's next trap.
                log::error!(
                    "vsmmu: {}: a register write still waits after {MAX_ROUNDS} rounds",
                    vm.config.name
                );
            }
            o.publish(&PhysSmmu);
            raise(vm, s, irqs, Some(vcpu));
            0
        }
    }
}

/// Makes the model's wired interrupts pending in the VM's vGIC and wakes the vCPU they target
/// (`here`: the vCPU running on this CPU, which needs no wake-up).
pub fn raise(vm: &Vm, s: &VmSmmu, irqs: Irqs, here: Option<usize>) {
    for (flag, intid) in [
        (Irqs::EVENTQ, s.eventq_intid),
        (Irqs::GERROR, s.gerror_intid),
    ] {
        if irqs.contains(flag) {
            let target = {
                let mut vgic = vm.vgic.lock();
                let t = vgic.spi_target(intid);
                vgic.set_pending(t, intid);
                t
            };
            if here != Some(target) {
                super::vcpu::kick(vm, target);
            }
        }
    }
}

/// Physical SMMU events since boot (they number the hypervisor's event lines).
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// Drains the physical event queue and gives each event to the VM owning its StreamID: what its
/// guest's stage 1 caused goes into its vSMMU's event queue; the rest (stage-2 faults, streams of
/// no VM) is logged with VM, StreamID and addresses. Every line counts against the log rate
/// limit of the VM whose stream it is about; what concerns the queue as a whole (records lost,
/// a global error) against the VM whose records this drain found most of. `here`: the (VM
/// index, vCPU) running on this CPU.
pub fn service_events(vms: &[Vm], here: Option<(usize, usize)>) {
    let drained = iommu::drain_events();
    let owner_of = |sid: u32| {
        vms.iter()
            .find(|v| v.config.devices.stream_ids.contains(&sid))
    };
    if drained.overflowed || !drained.gerror.is_empty() {
        let mut counts = alloc::collections::BTreeMap::<usize, usize>::new();
        for (e, _) in &drained.events {
            if let Some(v) = owner_of(e.stream_id) {
                *counts.entry(v.id).or_default() += 1;
            }
        }
        let top = counts.iter().max_by_key(|&(_, &n)| n).map(|(&vm, _)| vm);
        let ctx = super::uart::set_log_vm(top);
        let whose = top
            .and_then(|i| vms.get(i))
            .map_or("", |v| v.config.name.as_str());
        if drained.overflowed {
            log::warn!("smmu: event queue overflowed: events were lost (most records: {whose})");
        }
        if !drained.gerror.is_empty() {
            log::error!(
                "smmu: GERROR {:?} (acknowledged; most records: {whose})",
                drained.gerror
            );
        }
        super::uart::set_log_vm(ctx);
    }
    if drained.stalls_terminated > 0 {
        log::warn!(
            "smmu: {} stalled transactions terminated (CMD_RESUME, abort)",
            drained.stalls_terminated
        );
    }
    for &(sid, cooldown_ns) in &drained.quarantined {
        let owner = owner_of(sid);
        let ctx = super::uart::set_log_vm(owner.map(|v| v.id));
        log::warn!(
            "smmu: StreamID {sid} ({}): event records beyond its budget: its transactions abort for {} ms",
            owner.map_or("unassigned", |v| v.config.name.as_str()),
            cooldown_ns / 1_000_000
        );
        super::uart::set_log_vm(ctx);
    }
    for (e, fate) in &drained.events {
        let (e, fate) = (e, *fate);
        let owner = owner_of(e.stream_id);
        // An event's lines count against its VM's log rate limits, whichever CPU drained it.
        let ctx = super::uart::set_log_vm(owner.map(|v| v.id));
        let forwarded = owner.and_then(|vm| {
            let s = vm.vsmmu.as_ref().filter(|_| !vm.is_stopped())?;
            let (fwd, irqs) = s.model.lock().forward_event(e, fate, &mut VmMem(vm.ram()));
            raise(vm, s, irqs, here.filter(|h| h.0 == vm.id).map(|h| h.1));
            Some((vm, fwd))
        });
        if fate == EventFate::Suppressed {
            // Counted by the owner's vSMMU; the quarantine was logged above.
            super::uart::set_log_vm(ctx);
            continue;
        }
        let n = EVENTS.fetch_add(1, Ordering::Relaxed) + 1;
        match forwarded {
            Some((vm, Forward::Guest(g))) => log::info!(
                "vsmmu: {}: event {} StreamID {} forwarded to the guest (input {:#x})",
                vm.config.name,
                g.kind.name(),
                g.stream_id,
                g.input_addr
            ),
            Some((vm, Forward::Dropped(g))) => log::warn!(
                "vsmmu: {}: event {} StreamID {} for the guest dropped (its event queue is off or full)",
                vm.config.name,
                g.kind.name(),
                g.stream_id
            ),
            _ => log_hypervisor_event(n, e, owner.map(|v| v.config.name.as_str())),
        }
        super::uart::set_log_vm(ctx);
    }
}

fn log_hypervisor_event(n: u64, e: &Event, owner: Option<&str>) {
    log::warn!(
        "smmu: event #{n} {} StreamID {} ({}) {} {} input {:#x} IPA {:#x}",
        e.kind.name(),
        e.stream_id,
        owner.unwrap_or("unassigned"),
        if e.s2 { "stage-2" } else { "stage-1" },
        if e.rnw { "read" } else { "write" },
        e.input_addr,
        e.addr2,
    );
}

/// Logs the VM's vSMMU counters: one summary line, then the registers it trapped on.
pub fn log_stats(vm: &Vm) {
    let Some(s) = &vm.vsmmu else {
        return;
    };
    let st = *s.model.lock().stats();
    let prod = smmu::vsmmu::reg_index(smmu::regs::SMMU_CMDQ_PROD);
    let cons = smmu::vsmmu::reg_index(smmu::regs::SMMU_CMDQ_CONS);
    log::info!(
        "vsmmu: {} stats: traps={} cmdq_prod={} cmdq_cons={} reg_reads={} reg_writes={} commands={} syncs={} phys_commands={} phys_syncs={} ste_writes={} guest_events={} dropped_events={} s2_faults={} command_errors={} tlbi_merged={} syncs_merged={} budget_waits={} order_waits={} gbpa_deferred={} ste_skipped={} ste_breaks={} evt_quarantined={} evt_suppressed={} phys_sync_errors={}",
        vm.config.name,
        st.traps(),
        st.writes[prod],
        st.reads[cons],
        st.reg_reads(),
        st.reg_writes(),
        st.commands,
        st.syncs,
        st.phys_commands,
        st.phys_syncs,
        st.ste_writes,
        st.guest_events,
        st.dropped_events,
        st.s2_faults,
        st.command_errors,
        st.tlbi_merged,
        st.syncs_merged,
        st.budget_waits,
        st.order_waits,
        st.gbpa_deferred,
        st.ste_skipped,
        st.ste_breaks,
        st.evt_quarantined,
        st.evt_suppressed,
        st.phys_sync_errors
    );
    let mut by_reg: Vec<alloc::string::String> = Vec::new();
    for slot in 0..REG_SLOTS {
        let (r, w) = (st.reads[slot], st.writes[slot]);
        if r + w > 0 {
            let off = (slot / 64) as u64 * smmu::regs::PAGE1 + (slot % 64) as u64 * 4;
            by_reg.push(alloc::format!("{}@{off:#x} r{r}/w{w}", reg_name(slot)));
        }
    }
    log::info!(
        "vsmmu: {} traps by register: {}",
        vm.config.name,
        by_reg.join(", ")
    );
}

/// The console's Ctrl-\ s: every VM's vSMMU counters and the physical stream table.
pub fn print_stats(vms: &[Vm], groups: &[crate::pci::IommuGroup]) {
    for vm in vms {
        log_stats(vm);
    }
    iommu::dump_stream_table(groups);
}

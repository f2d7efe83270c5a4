//! Physical SMMU events given to the VM whose StreamID they carry: what its guest's stage 1
//! caused goes into its vSMMU's event queue; the rest (stage-2 faults, streams of no VM) is
//! logged with VM, StreamID and addresses. Every line counts against the log rate limit of the
//! VM whose stream it is about; what concerns the queue as a whole (records lost, a global
//! error) against the VM whose records the drain found most of.

use super::irq::VmIrqs;
use super::Vm;
use crate::hw::Hw;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use smmu::driver::EventFate;
use smmu::event::Event;
use smmu::vsmmu::Forward;

/// What one drain of the SMMU's event queue found.
#[derive(Debug)]
pub struct Drained {
    /// Which driven SMMU's queue it was (its unit index).
    pub unit: usize,
    /// The records in order, each with what its stream's budget made of it.
    pub events: Vec<(Event, EventFate)>,
    /// Some records were lost to an overflow.
    pub overflowed: bool,
    /// The global errors the drain found and acknowledged (records lost to a full event
    /// queue, failed MSI writes); CMD_SYNC errors are the command queue's to recover.
    pub gerror: smmu::regs::Gerror,
    /// Stalled transactions terminated (CMD_RESUME with Action = abort).
    pub stalls_terminated: usize,
    /// Streams the drain quarantined: (StreamID, cool-down in nanoseconds).
    pub quarantined: Vec<(u32, u64)>,
}

/// Physical SMMU events since boot (they number the hypervisor's event lines).
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// Gives what a drain found to the VMs. `here`: the (VM index, vCPU) running on this CPU.
/// Returns how many events went into guests' event queues.
pub fn route(vms: &[Vm], drained: &Drained, here: Option<(usize, usize)>, hw: &impl Hw) -> usize {
    // StreamIDs are per SMMU: a stream belongs to the VM whose devices sit behind this one.
    let owner_of = |sid: u32| {
        vms.iter()
            .find(|v| v.config.devices.stream_ids_on(drained.unit).contains(&sid))
    };
    if drained.overflowed || !drained.gerror.is_empty() {
        let mut counts = alloc::collections::BTreeMap::<usize, usize>::new();
        for (e, _) in &drained.events {
            if let Some(v) = owner_of(e.stream_id) {
                *counts.entry(v.id).or_default() += 1;
            }
        }
        let top = counts.iter().max_by_key(|&(_, &n)| n).map(|(&vm, _)| vm);
        let ctx = hw.log_context(top);
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
        hw.log_context(ctx);
    }
    if drained.stalls_terminated > 0 {
        log::warn!(
            "smmu: {} stalled transactions terminated (CMD_RESUME, abort)",
            drained.stalls_terminated
        );
    }
    for &(sid, cooldown_ns) in &drained.quarantined {
        let owner = owner_of(sid);
        let ctx = hw.log_context(owner.map(|v| v.id));
        log::warn!(
            "smmu: StreamID {sid} ({}): event records beyond its budget: its transactions abort for {} ms",
            owner.map_or("unassigned", |v| v.config.name.as_str()),
            cooldown_ns / 1_000_000
        );
        hw.log_context(ctx);
    }
    let mut to_guests = 0;
    for &(ref e, fate) in &drained.events {
        let owner = owner_of(e.stream_id);
        // An event's lines count against its VM's log rate limits, whichever CPU drained it.
        let ctx = hw.log_context(owner.map(|v| v.id));
        if let Some((vm, v)) = owner.and_then(|vm| {
            let v = vm.viommus.iter().find(|v| v.unit == drained.unit)?;
            Some((vm, v)).filter(|_| !vm.is_stopped())
        }) {
            if fate == EventFate::Suppressed {
                hw.log_context(ctx);
                continue;
            }
            let irqs = VmIrqs {
                vm,
                hw,
                here: here.filter(|h| h.0 == vm.id).map(|h| h.1),
            };
            let n = EVENTS.fetch_add(1, Ordering::Relaxed) + 1;
            if v.forward_event(e.stream_id, e, &mut vm.ram(), &irqs) {
                to_guests += 1;
                log::info!(
                    "viommu: {}: event {} StreamID {} forwarded to the guest (input {:#x})",
                    vm.config.name,
                    e.kind.name(),
                    e.stream_id,
                    e.input_addr
                );
            } else {
                log_hypervisor_event(n, e, Some(vm.config.name.as_str()));
            }
            hw.log_context(ctx);
            continue;
        }
        let forwarded = owner.and_then(|vm| {
            let s = vm
                .vsmmus
                .iter()
                .find(|s| s.unit == drained.unit)
                .filter(|_| !vm.is_stopped())?;
            let irqs = VmIrqs {
                vm,
                hw,
                here: here.filter(|h| h.0 == vm.id).map(|h| h.1),
            };
            Some((vm, s.forward_event(e, fate, vm.ram(), &irqs)))
        });
        if fate == EventFate::Suppressed {
            // Counted by the owner's vSMMU; the quarantine was logged above.
            hw.log_context(ctx);
            continue;
        }
        let n = EVENTS.fetch_add(1, Ordering::Relaxed) + 1;
        match forwarded {
            Some((vm, Forward::Guest(g))) => {
                to_guests += 1;
                log::info!(
                    "vsmmu: {}: event {} StreamID {} forwarded to the guest (input {:#x})",
                    vm.config.name,
                    g.kind.name(),
                    g.stream_id,
                    g.input_addr
                )
            }
            Some((vm, Forward::Dropped(g))) => log::warn!(
                "vsmmu: {}: event {} StreamID {} for the guest dropped (its event queue is off or full)",
                vm.config.name,
                g.kind.name(),
                g.stream_id
            ),
            _ => log_hypervisor_event(n, e, owner.map(|v| v.config.name.as_str())),
        }
        hw.log_context(ctx);
    }
    to_guests
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

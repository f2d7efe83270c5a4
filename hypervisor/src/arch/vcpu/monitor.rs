//! The monitor's commands carried out on the CPU that took the console input (parsing and
//! layout are `crate::monitor`'s, the lifecycle rules `vm::lifecycle`'s). What a command prints
//! goes straight to the console, whatever the log level: the operator asked for it.

use super::lifecycle::{stop_vm, OPERATOR_HOLD};
use crate::arch::hw::Machine;
use crate::arch::{hv, iommu, timestamp_ms, uart};
use crate::monitor::{self, Command, VmRow, VmState};
use crate::vm::lifecycle::{VmState as Life, RESET_WAIT_MS};
use crate::vm::Vm;
use aarch64_cpu::registers::{Readable, CNTFRQ_EL0};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

fn say(line: &str) {
    uart::print_hv(format_args!("{line}"));
}

/// Runs one command line typed at the monitor's prompt.
pub(super) fn run(line: &str) {
    let names: Vec<&str> = hv().vms.iter().map(|v| v.config.name.as_str()).collect();
    match monitor::parse(line, &names) {
        Ok(None) => {}
        Ok(Some(c)) => execute(c),
        Err(e) => say(&alloc::format!("monitor: {e}")),
    }
}

fn execute(c: Command) {
    let vms = &hv().vms;
    match c {
        Command::Help => say(monitor::HELP),
        Command::List => {
            let rows: Vec<VmRow> = vms.iter().map(row).collect();
            for l in monitor::list_lines(&rows, &hv().refused) {
                say(&l);
            }
        }
        Command::Start(i) => start(&vms[i]),
        Command::Stop(i) => {
            let vm = &vms[i];
            match vm.life.state() {
                Life::Running => {
                    // The operator is managing the machine: stopping the last VM leaves it on
                    // for a `start` (or `poweroff`).
                    OPERATOR_HOLD.store(true, Ordering::Release);
                    say(&alloc::format!("monitor: stopping {}", vm.config.name));
                    stop_vm(vm, "stopped by the operator");
                }
                s => say(&alloc::format!(
                    "monitor: {} is {}: only a running VM stops",
                    vm.config.name,
                    state_name(s)
                )),
            }
        }
        Command::Reset(i) => {
            let vm = &vms[i];
            if vm.life.request_reset() {
                say(&alloc::format!("monitor: resetting {}", vm.config.name));
                // Any of its vCPUs takes the request at its next exit (this CPU's own, when
                // it is one, on the way out of this interrupt).
                vm.kick_all(None, &Machine);
            } else {
                say(&alloc::format!(
                    "monitor: {} is {}: only a running VM resets (`start` boots a stopped one)",
                    vm.config.name,
                    state_name(vm.life.state())
                ));
            }
        }
        Command::Focus(i) => {
            uart::set_focus(i);
        }
        Command::Stats { vm, raw } => stats(vm, raw),
        Command::Log(level) => {
            log::set_max_level(level);
            say(&alloc::format!("monitor: log level {level}"));
        }
        Command::Poweroff => {
            say("monitor: stopping every VM and powering off");
            OPERATOR_HOLD.store(false, Ordering::Release);
            // Each running VM's devices quiesced first; one in the middle of a reset has had
            // them quiesced by the reset. Then off, whatever is left: the operator asked.
            for vm in vms {
                stop_vm(vm, "the operator powers the machine off");
            }
            crate::arch::system_off();
        }
    }
}

/// The monitor's name of a lifecycle state: one spelling for `list` and the messages.
fn state_name(s: Life) -> &'static str {
    state_of(s, 1).name()
}

/// The monitor's view of a lifecycle state; a running VM whose first boot is not loaded yet
/// (`boots` 0) is starting.
fn state_of(s: Life, boots: u32) -> VmState {
    match s {
        Life::Running if boots == 0 => VmState::Starting,
        Life::Running => VmState::Running,
        Life::Resetting => VmState::Resetting,
        Life::Stopped => VmState::Stopped,
    }
}

/// Boots a stopped VM again: exactly the second half of a reset, from this CPU. Its vCPUs
/// parked when it stopped; one that never did (a reset abandoned for it) keeps it stopped.
fn start(vm: &Vm) {
    if !vm.life.begin_start() {
        say(&alloc::format!(
            "monitor: {} is {}: only a stopped VM starts (`reset` reboots a running one)",
            vm.config.name,
            state_name(vm.life.state())
        ));
        return;
    }
    vm.kick_all(None, &Machine);
    if let Err(t) = vm.wait_stopped_for_reset(&Machine, RESET_WAIT_MS) {
        vm.life.abandon_reset();
        say(&alloc::format!(
            "monitor: {} cannot start: its vcpu{t} has not stopped",
            vm.config.name
        ));
        return;
    }
    say(&alloc::format!(
        "monitor: starting {} (boot {})",
        vm.config.name,
        vm.boots.load(Ordering::Acquire)
    ));
    // Its devices were quiesced when it stopped; the load resets its virtual devices and
    // vSMMUs, as every boot does.
    vm.life.finish_reset();
    vm.request_boot(&Machine);
}

/// What `list` and the boot banner show of `vm`.
pub fn row(vm: &Vm) -> VmRow {
    let boots = vm.boots.load(Ordering::Acquire);
    let state = state_of(vm.life.state(), boots);
    let d = &vm.config.devices;
    let functions: Vec<String> = d
        .segments
        .iter()
        .flat_map(|s| {
            s.devices
                .functions
                .iter()
                .map(|f| crate::pci::PciAddr::new(s.domain, f.bdf).to_string())
        })
        .collect();
    let iommu = if functions.is_empty() {
        None
    } else if vm.vsmmus.is_empty() && vm.viommus.is_empty() {
        Some("stage 2 only")
    } else {
        Some(vm.config.iommu.as_str())
    };
    VmRow {
        name: vm.config.name.clone(),
        uptime_ms: (state == VmState::Running)
            .then(|| timestamp_ms().saturating_sub(vm.booted_at_ms.load(Ordering::Acquire))),
        state,
        pcpus: vm.vcpus.iter().map(|c| c.pcpu).collect(),
        ram: (vm.ram_ipa.base, vm.ram_ipa.size, vm.ram_pa.0),
        functions,
        groups: d.groups().collect(),
        iommu,
        boots,
        iommu_summary: vm.iommu_summaries(),
    }
}

/// `stats`, and Ctrl-\ s (all VMs, tables): each VM's counters, then for all VMs the physical
/// stream table and the heap figure (what a leak over many driver cycles would show; tests
/// compare it across cycles). `raw` prints the counters as the `key=value` lines scripts read.
pub(super) fn stats(vm: Option<usize>, raw: bool) {
    // The console's own work, not the running VM's: none of its lines counts against that
    // VM's log rate limit (a vSMMU prints several lines from one call site, and the benchmark
    // asks twice per workload: the limit dropped its counters).
    let old = uart::set_log_vm(None);
    let vms = &hv().vms;
    for v in vms
        .iter()
        .enumerate()
        .filter(|(i, _)| vm.is_none_or(|w| w == *i))
    {
        let profile = v.1.profile_line(CNTFRQ_EL0.get());
        if raw {
            say(&profile);
        } else {
            for l in crate::profile::table(&profile).unwrap_or_default() {
                say(&l);
            }
        }
        for line in v.1.stats_lines() {
            if raw {
                say(&line);
            } else {
                for l in monitor::stats_table(&line) {
                    say(&l);
                }
            }
        }
    }
    if vm.is_none() {
        iommu::dump_stream_table(hv().iommu.groups(), &hv().iommu.directory);
        let (used, total) = crate::arch::heap_usage();
        say(&alloc::format!("heap: {used} bytes of {total} in use"));
    }
    uart::set_log_vm(old);
}

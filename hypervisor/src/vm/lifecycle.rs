//! A VM's lifecycle and its vCPUs' power states, as plain logic: what a VM stop, a VM reset and a
//! PSCI CPU_ON may do while the others happen on other CPUs.
//!
//! The rules this module enforces (and its tests check, with threads racing):
//!
//! - A VM is [`VmState::Running`], [`VmState::Resetting`] or [`VmState::Stopped`] (for good).
//!   Only a running VM can begin a reset or stop; a reset ends with the VM running its new boot
//!   ([`Lifecycle::finish_reset`]) or stopped ([`Lifecycle::abandon_reset`]). The machine powers
//!   off only when every VM is stopped for good ([`all_stopped_for_good`]), never while one is
//!   resetting.
//! - CPU_ON is accepted only while the VM runs, and it records the boot generation it was
//!   accepted in: a reset moves the generation on and cancels every CPU_ON still pending, so a
//!   vCPU never enters the entry point of the image the VM had before a reload
//!   ([`VcpuPower::take_entry`]).
//! - The check and the transition happen under the target vCPU's power lock, and a reset marks
//!   the VM resetting before it takes any vCPU's lock: a CPU_ON either completes before the reset
//!   looks at that vCPU (and is cancelled by it) or sees the reset and is refused with
//!   PSCI DENIED.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

use crate::hw::Ipa;
use spin::Mutex;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Its vCPUs may run.
    Running,
    /// One CPU is stopping its vCPUs to reload it; it runs again afterwards.
    Resetting,
    /// Stopped: its vCPUs are parked, and only the operator's `start` (the monitor) boots it
    /// again.
    Stopped,
}

impl VmState {
    const fn from_raw(v: u8) -> Self {
        match v {
            0 => VmState::Running,
            1 => VmState::Resetting,
            _ => VmState::Stopped,
        }
    }

    const fn raw(self) -> u8 {
        match self {
            VmState::Running => 0,
            VmState::Resetting => 1,
            VmState::Stopped => 2,
        }
    }
}

/// A VM's state and boot generation, shared by all its vCPUs' CPUs.
#[derive(Debug)]
pub struct Lifecycle {
    state: AtomicU8,
    generation: AtomicU32,
    reset_requested: AtomicBool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A VM about to boot for the first time: running, generation 0.
    pub const fn new() -> Self {
        Self {
            state: AtomicU8::new(0),
            generation: AtomicU32::new(0),
            reset_requested: AtomicBool::new(false),
        }
    }

    /// The state now.
    pub fn state(&self) -> VmState {
        VmState::from_raw(self.state.load(Ordering::Acquire))
    }

    /// Whether the VM's vCPUs may run.
    pub fn runs(&self) -> bool {
        self.state() == VmState::Running
    }

    /// The boot generation: moves on at every reset.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    fn transition(&self, from: VmState, to: VmState) -> bool {
        self.state
            .compare_exchange(from.raw(), to.raw(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Stops a running VM for good; `false` if it was not running (already stopped, or a reset
    /// is in charge of it).
    pub fn stop(&self) -> bool {
        self.transition(VmState::Running, VmState::Stopped)
    }

    /// Starts a reset of a running VM; `false` if it was not running (someone else is already
    /// resetting or has stopped it).
    pub fn begin_reset(&self) -> bool {
        self.transition(VmState::Running, VmState::Resetting)
    }

    /// Ends a reset with the VM running again, in a new generation. `false` (and nothing
    /// changes) unless it was resetting.
    pub fn finish_reset(&self) -> bool {
        if self.state() != VmState::Resetting {
            return false;
        }
        // The generation moves before the VM runs: whatever was accepted before is stale, a
        // reset asked of the boot that ended too.
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.reset_requested.store(false, Ordering::Release);
        self.transition(VmState::Resetting, VmState::Running)
    }

    /// Ends a reset with the VM stopped for good (its vCPUs would not stop).
    pub fn abandon_reset(&self) -> bool {
        self.transition(VmState::Resetting, VmState::Stopped)
    }

    /// Starts booting a stopped VM again (the operator's `start`): it is resetting from here,
    /// exactly as in a reset after its vCPUs stopped, and ends the same way. `false` unless it
    /// was stopped.
    pub fn begin_start(&self) -> bool {
        self.transition(VmState::Stopped, VmState::Resetting)
    }

    /// Asks for a reset that one of the VM's own vCPUs carries out at its next exit (the
    /// operator's `reset` comes from whatever CPU took the console input). `false` unless it
    /// is running.
    pub fn request_reset(&self) -> bool {
        if !self.runs() {
            return false;
        }
        self.reset_requested.store(true, Ordering::Release);
        true
    }

    /// Takes a reset request; a request made before a reset or a stop began is void (it
    /// asked about a boot that is over).
    pub fn take_reset_request(&self) -> bool {
        self.reset_requested.swap(false, Ordering::AcqRel) && self.runs()
    }
}

/// Whether the machine may power off: every VM is stopped for good (none running, none
/// resetting).
pub fn all_stopped_for_good<'a>(vms: impl IntoIterator<Item = &'a Lifecycle>) -> bool {
    vms.into_iter().all(|l| l.state() == VmState::Stopped)
}

/// Power state of a vCPU, as PSCI AFFINITY_INFO reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// Not running; CPU_ON may start it.
    Off,
    /// vCPU 0 only: the VM's images must be (re)loaded, then the vCPU starts at the kernel.
    Boot,
    /// CPU_ON accepted; its pCPU has not entered it yet.
    OnPending {
        /// Entry IPA.
        entry: Ipa,
        /// x0 at entry.
        context: u64,
        /// The boot generation it was accepted in.
        generation: u32,
    },
    /// Running.
    On,
}

/// Why a CPU_ON is refused (PSCI DEN 0022, 5.6: each maps to the PSCI return code named).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuOnError {
    /// ALREADY_ON.
    AlreadyOn,
    /// ON_PENDING.
    OnPending,
    /// DENIED: the VM is resetting or stopped.
    Denied,
}

/// One vCPU's power state.
#[derive(Debug)]
pub struct VcpuPower {
    power: Mutex<Power>,
}

impl Default for VcpuPower {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuPower {
    /// A vCPU that is off.
    pub const fn new() -> Self {
        Self {
            power: Mutex::new(Power::Off),
        }
    }

    /// The state now.
    pub fn get(&self) -> Power {
        *self.power.lock()
    }

    /// Sets the state (the vCPU's own CPU: it turned itself off or on; a boot request).
    pub fn set(&self, p: Power) {
        *self.power.lock() = p;
    }

    /// PSCI CPU_ON for this vCPU of a VM in `life`: accepted only while the VM runs and the
    /// vCPU is off; the entry point is tied to the current boot generation.
    pub fn cpu_on(&self, life: &Lifecycle, entry: Ipa, context: u64) -> Result<(), CpuOnError> {
        let mut power = self.power.lock();
        // Under the lock: a reset marks the VM before it takes this lock (see the module doc).
        if !life.runs() {
            return Err(CpuOnError::Denied);
        }
        match *power {
            Power::On => Err(CpuOnError::AlreadyOn),
            Power::OnPending { .. } | Power::Boot => Err(CpuOnError::OnPending),
            Power::Off => {
                *power = Power::OnPending {
                    entry,
                    context,
                    generation: life.generation(),
                };
                Ok(())
            }
        }
    }

    /// What the vCPU's CPU does when it looks: an accepted CPU_ON of the VM's current
    /// generation, taken (the vCPU is then on); a stale one is dropped (the vCPU stays off).
    pub fn take_entry(&self, life: &Lifecycle) -> Option<(Ipa, u64)> {
        let mut power = self.power.lock();
        let Power::OnPending {
            entry,
            context,
            generation,
        } = *power
        else {
            return None;
        };
        if !life.runs() || generation != life.generation() {
            *power = Power::Off;
            return None;
        }
        *power = Power::On;
        Some((entry, context))
    }

    /// During a reset: `true` once the vCPU is off, cancelling a CPU_ON or boot request that its
    /// CPU has not acted on yet; `false` while it still runs.
    pub fn stopped_for_reset(&self) -> bool {
        let mut power = self.power.lock();
        match *power {
            Power::Off => true,
            Power::OnPending { .. } | Power::Boot => {
                *power = Power::Off;
                true
            }
            Power::On => false,
        }
    }
}

/// Upper bound on the wait for a VM's other vCPUs to park during a reset.
pub const RESET_WAIT_MS: u64 = 1000;

impl super::Vm {
    /// Asks the CPU of the VM's vCPU 0 to load its images and start it (woken unless it is the
    /// calling CPU).
    pub fn request_boot(&self, hw: &impl crate::hw::Hw) {
        let Some(v0) = self.vcpus.first() else {
            return;
        };
        v0.power.set(Power::Boot);
        if v0.pcpu != hw.this_cpu() {
            hw.kick(v0.pcpu);
        }
    }

    /// Makes every vCPU of the VM but `except` (the caller's, which needs no kick) look at its
    /// state: those in the guest exit, those waiting wake.
    pub fn kick_all(&self, except: Option<usize>, hw: &impl crate::hw::Hw) {
        for (t, v) in self.vcpus.iter().enumerate() {
            if Some(t) != except {
                hw.kick(v.pcpu);
            }
        }
        hw.wake_all();
    }

    /// During a reset: waits until every vCPU is off (a CPU_ON accepted but never entered is
    /// cancelled; a running vCPU must park), at most `timeout_ms` by the system counter.
    /// `Err(t)`: vCPU `t` did not stop in time.
    pub fn wait_stopped_for_reset(
        &self,
        hw: &impl crate::hw::Hw,
        timeout_ms: u64,
    ) -> Result<(), usize> {
        let deadline = hw
            .counter()
            .saturating_add(hw.counter_freq().saturating_mul(timeout_ms) / 1000);
        for (t, v) in self.vcpus.iter().enumerate() {
            while !v.power.stopped_for_reset() {
                if hw.counter() > deadline {
                    return Err(t);
                }
                core::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Stops the VM's PCI functions from mastering DMA or raising their lines until its next
    /// boot's drivers set them up again (PCI Local Bus 3.0, 6.2.2: Command register): a VM
    /// stopped for good, or one being reset.
    pub fn quiesce_devices<C: crate::pci::ConfigSpace>(
        &self,
        cfg_of: impl FnMut(usize) -> Option<C>,
        hw: &impl crate::hw::Hw,
    ) {
        self.quiesce_functions(cfg_of);
        for intid in self.config.devices.intx_intids() {
            hw.disable_spi(crate::hw::IntId(intid));
        }
    }

    /// The configuration-space half of [`Vm::quiesce_devices`]: Bus Master off and INTx
    /// Disable on in each of the VM's functions (also how they start, before the first boot).
    pub fn quiesce_functions<C: crate::pci::ConfigSpace>(
        &self,
        mut cfg_of: impl FnMut(usize) -> Option<C>,
    ) {
        use crate::pci::regs::{command, COMMAND};
        let d = &self.config.devices;
        for seg in &d.segments {
            let Some(mut cfg) = cfg_of(seg.segment) else {
                continue;
            };
            for f in &seg.devices.functions {
                let cmd = cfg.read32(f.bdf, COMMAND) & 0xffff;
                // The status half is write-1-to-clear: 0s.
                cfg.write32(
                    f.bdf,
                    COMMAND,
                    (cmd & !command::BUS_MASTER) | command::INTX_DISABLE,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn a_stopped_vm_starts_again_through_a_reset_in_a_new_generation() {
        let l = Lifecycle::new();
        assert!(!l.begin_start(), "a running VM is not started");
        assert!(l.stop());
        assert!(!l.begin_reset(), "a stopped VM is not reset");
        assert!(!l.request_reset());
        assert!(l.begin_start());
        assert!(!l.begin_start(), "one start at a time");
        assert_eq!(l.state(), VmState::Resetting);
        assert!(l.finish_reset());
        assert!(l.runs());
        assert_eq!(l.generation(), 1);
        // A start whose vCPUs never stopped leaves it stopped.
        assert!(l.stop());
        assert!(l.begin_start());
        assert!(l.abandon_reset());
        assert_eq!(l.state(), VmState::Stopped);
    }

    #[test]
    fn a_reset_request_is_taken_once_and_only_while_the_vm_runs() {
        let l = Lifecycle::new();
        assert!(!l.take_reset_request());
        assert!(l.request_reset());
        assert!(l.take_reset_request());
        assert!(!l.take_reset_request(), "taken once");
        // Made before a stop: void once the VM is stopped, and after it starts again.
        assert!(l.request_reset());
        assert!(l.stop());
        assert!(!l.take_reset_request());
        assert!(l.begin_start() && l.finish_reset());
        assert!(!l.take_reset_request());
        // The same when nobody looked while it was stopped.
        assert!(l.request_reset());
        assert!(l.stop());
        assert!(l.begin_start() && l.finish_reset());
        assert!(!l.take_reset_request());
    }

    #[test]
    fn transitions() {
        let l = Lifecycle::new();
        assert!(l.runs());
        assert!(l.begin_reset());
        assert!(!l.begin_reset(), "one reset at a time");
        assert!(!l.stop(), "a resetting VM is the reset's to finish");
        assert_eq!(l.state(), VmState::Resetting);
        assert!(l.finish_reset());
        assert_eq!((l.state(), l.generation()), (VmState::Running, 1));
        assert!(!l.finish_reset());
        assert!(l.stop());
        assert!(!l.stop());
        assert!(!l.begin_reset(), "a stopped VM does not come back");
        let m = Lifecycle::new();
        assert!(m.begin_reset() && m.abandon_reset());
        assert_eq!(m.state(), VmState::Stopped);
    }

    #[test]
    fn power_off_waits_for_resetting_vms() {
        let (a, b) = (Lifecycle::new(), Lifecycle::new());
        assert!(a.stop());
        assert!(b.begin_reset());
        // vm1 resets while vm0 stopped: the machine must stay on.
        assert!(!all_stopped_for_good([&a, &b]));
        assert!(b.finish_reset());
        assert!(!all_stopped_for_good([&a, &b]));
        assert!(b.stop());
        assert!(all_stopped_for_good([&a, &b]));
    }

    #[test]
    fn cpu_on_is_refused_while_resetting_and_stale_entries_are_dropped() {
        let l = Lifecycle::new();
        let v = VcpuPower::new();
        assert_eq!(v.cpu_on(&l, Ipa(0x4008_0000), 7), Ok(()));
        assert_eq!(
            v.cpu_on(&l, Ipa(0x4008_0000), 7),
            Err(CpuOnError::OnPending)
        );
        assert!(l.begin_reset());
        assert_eq!(
            VcpuPower::new().cpu_on(&l, Ipa(0x4008_0000), 0),
            Err(CpuOnError::Denied)
        );
        // The reset's walk cancels the pending one; after the reload nothing of it is left.
        assert!(v.stopped_for_reset());
        assert!(l.finish_reset());
        assert_eq!(v.take_entry(&l), None);
        assert_eq!(v.get(), Power::Off);
        // A CPU_ON from before a reset that the walk never saw (it would have) is still stale.
        let stale = VcpuPower::new();
        stale.set(Power::OnPending {
            entry: Ipa(1),
            context: 2,
            generation: 0,
        });
        assert_eq!(stale.take_entry(&l), None);
        // A current one is entered once.
        assert_eq!(v.cpu_on(&l, Ipa(0x4100_0000), 9), Ok(()));
        assert_eq!(v.take_entry(&l), Some((Ipa(0x4100_0000), 9)));
        assert_eq!(v.get(), Power::On);
        assert_eq!(v.cpu_on(&l, Ipa(0), 0), Err(CpuOnError::AlreadyOn));
        assert!(!v.stopped_for_reset(), "a running vCPU must park first");
    }

    /// vCPU 0 (running the old image) turns vCPUs 1 and 2 on while another CPU resets the VM,
    /// and their CPUs enter whatever they find: whatever the interleaving, the reset waits for
    /// every vCPU to be off, and no vCPU enters an old-image entry point after the reset.
    #[test]
    fn cpu_on_racing_a_reset_never_runs_the_old_image() {
        for round in 0..300u64 {
            let life = Arc::new(Lifecycle::new());
            let vcpus: Arc<Vec<VcpuPower>> = Arc::new((0..3).map(|_| VcpuPower::new()).collect());
            vcpus[0].set(Power::On);
            let done = Arc::new(AtomicBool::new(false));
            let vcpu0 = {
                let (life, vcpus) = (life.clone(), vcpus.clone());
                thread::spawn(move || {
                    for t in 1..3 {
                        let _ = vcpus[t].cpu_on(&life, Ipa(0x1000 + round), t as u64);
                    }
                    // It notices the reset and parks.
                    vcpus[0].set(Power::Off);
                })
            };
            let cpus = {
                let (life, vcpus, done) = (life.clone(), vcpus.clone(), done.clone());
                thread::spawn(move || {
                    let mut entered = Vec::new();
                    while !done.load(Ordering::Acquire) {
                        for t in 1..3 {
                            if let Some(e) = vcpus[t].take_entry(&life) {
                                entered.push((e, life.generation()));
                                // It runs a moment, sees the reset, parks.
                                vcpus[t].set(Power::Off);
                            }
                        }
                    }
                    entered
                })
            };
            assert!(life.begin_reset());
            for v in vcpus.iter() {
                while !v.stopped_for_reset() {
                    std::hint::spin_loop();
                }
            }
            assert!(life.finish_reset());
            vcpu0.join().unwrap();
            for v in vcpus.iter() {
                assert_eq!(
                    v.take_entry(&life),
                    None,
                    "round {round}: an old entry is left"
                );
            }
            done.store(true, Ordering::Release);
            for ((entry, _), generation) in cpus.join().unwrap() {
                assert!(
                    generation == 0 && entry == Ipa(0x1000 + round),
                    "round {round}: entry {entry:#x} entered in generation {generation}"
                );
            }
        }
    }
}

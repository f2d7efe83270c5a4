//! The trap profile: where the time of a guest exit goes, stage by stage, from the generic
//! counter (CNTPCT_EL0), summed per vCPU and printed with the VM's statistics (`Ctrl-\ s`,
//! `stats raw`) so that the benchmark can show it next to the guest's own latencies.
//!
//! A trap is timed by a [`Stopwatch`]: the time between two readings of the counter is charged
//! to the stage the trap is in, and code that starts a stage says so with [`Laps::enter`]
//! (which returns the stage it interrupts, so a nested stage such as a physical command
//! submission inside the model's work can hand the time back). The vector code stores the
//! counter at the first instruction of an exception and at the last before its ERET, so
//! [`Stage::Save`] and [`Stage::Exit`] are the frame save and restore themselves; what the
//! hardware does before the first instruction and after the ERET is outside (the guest's own
//! clock sees it: the benchmark prints the difference).
//!
//! Only exits of a [`Kind`] are kept; the others cost two counter reads and nothing else.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt::Write;
use smmu::cmd::Command;
use smmu::driver::{DriverError, SteBreak, SteWrite, SyncTicket};
use smmu::ste::Ste;
use smmu::vsmmu::PhysicalSmmu;

/// The stages of a trap, in the order a CMDQ_PROD write goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Stage {
    /// From the vector's first instruction to the Rust handler: the frame save.
    Save,
    /// ESR_EL2 decode and routing to the device (for an interrupt: taking and handling it).
    Decode,
    /// The device model (for the vSMMU: reading the guest's queue, checking and translating its
    /// commands, under the model's lock).
    Model,
    /// Handing commands to the physical SMMU: writing queue entries and CMDQ_PROD.
    Submit,
    /// Waiting for the physical SMMU (its CMD_SYNC) or a budget.
    Wait,
    /// Completion: the guest's CMDQ_CONS, the MSIs of its CMD_SYNCs, its interrupts.
    Complete,
    /// Bringing the list registers up to date before the return.
    LrSync,
    /// From the handler's end to the ERET: the frame restore.
    Exit,
}

/// How many [`Stage`]s there are.
pub const STAGES: usize = 8;

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; STAGES] = [
        Stage::Save,
        Stage::Decode,
        Stage::Model,
        Stage::Submit,
        Stage::Wait,
        Stage::Complete,
        Stage::LrSync,
        Stage::Exit,
    ];

    /// Its name in the statistics.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Save => "save",
            Stage::Decode => "decode",
            Stage::Model => "model",
            Stage::Submit => "submit",
            Stage::Wait => "wait",
            Stage::Complete => "complete",
            Stage::LrSync => "lr_sync",
            Stage::Exit => "exit",
        }
    }
}

/// The exits the profile keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Kind {
    /// A guest write of a vSMMU's SMMU_CMDQ_PROD: the trap a map or unmap costs.
    CmdqProd,
    /// A guest read of an emulated register that touches no device, physical or modelled
    /// beyond its register file (a vSMMU register read): the fixed cost of any exit.
    RegRead,
    /// A physical LPI taken at EL2 while the guest ran (an assigned function's MSI, for list
    /// registers), and nothing but LPIs in that exit.
    Lpi,
    /// The guest's virtual timer (its physical PPI taken at EL2), and nothing else but LPIs.
    Timer,
    /// Any other physical interrupt exit (a device's INTx, a kick, SMMU events, several kinds
    /// at once); console input is left out (the operator's monitor runs in it).
    Irq,
}

/// How many [`Kind`]s there are.
pub const KINDS: usize = 5;

impl Kind {
    /// Every kind, in order.
    pub const ALL: [Kind; KINDS] = [
        Kind::CmdqProd,
        Kind::RegRead,
        Kind::Lpi,
        Kind::Timer,
        Kind::Irq,
    ];

    /// Its name in the statistics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::CmdqProd => "prod",
            Kind::RegRead => "read",
            Kind::Lpi => "lpi",
            Kind::Timer => "timer",
            Kind::Irq => "irq",
        }
    }
}

/// What code on the trap path tells the profile.
pub trait Laps {
    /// The trap enters `stage` now; returns the stage it was in.
    fn enter(&self, stage: Stage) -> Stage;
    /// The trap is of `kind` (the last call wins).
    fn kind(&self, kind: Kind);
}

/// For callers that are not on a trap path (tests, resets).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLaps;

impl Laps for NoLaps {
    fn enter(&self, stage: Stage) -> Stage {
        stage
    }

    fn kind(&self, _: Kind) {}
}

/// One trap's timing, in counter ticks. Interior mutability: the trap path hands out `&`
/// references to it, down to the physical SMMU's port.
#[derive(Debug)]
pub struct Stopwatch<C: Fn() -> u64> {
    clock: C,
    last: Cell<u64>,
    current: Cell<Stage>,
    kind: Cell<Option<Kind>>,
    ticks: [Cell<u64>; STAGES],
}

impl<C: Fn() -> u64> Stopwatch<C> {
    /// A trap whose vector started at counter value `entry` and that is in [`Stage::Save`] until
    /// its first [`Laps::enter`].
    pub fn start(clock: C, entry: u64) -> Self {
        Self {
            clock,
            last: Cell::new(entry),
            current: Cell::new(Stage::Save),
            kind: Cell::new(None),
            ticks: Default::default(),
        }
    }

    /// Ends the handler (what follows is [`Stage::Exit`], charged by
    /// [`TrapProfile::add_exit`] at the next trap): the trap's kind, its ticks by stage, and
    /// the counter value now.
    pub fn finish(&self) -> (Option<Kind>, [u64; STAGES], u64) {
        self.enter(Stage::Exit);
        (
            self.kind.get(),
            core::array::from_fn(|i| self.ticks[i].get()),
            self.last.get(),
        )
    }
}

impl<C: Fn() -> u64> Laps for Stopwatch<C> {
    fn enter(&self, stage: Stage) -> Stage {
        let now = (self.clock)();
        let cur = self.current.replace(stage);
        let t = &self.ticks[cur as usize];
        // A counter that went back (it never should) charges nothing rather than 2^64.
        t.set(t.get() + now.saturating_sub(self.last.get()));
        self.last.set(now);
        cur
    }

    fn kind(&self, kind: Kind) {
        self.kind.set(Some(kind));
    }
}

/// One vCPU's sums: per kind, how many exits and their ticks by stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrapProfile {
    /// Exits of each kind.
    pub count: [u64; KINDS],
    /// Their ticks, by kind and stage.
    pub ticks: [[u64; STAGES]; KINDS],
}

impl TrapProfile {
    /// Adds one finished trap (its [`Stopwatch::finish`]); [`Stage::Exit`] comes later.
    pub fn add(&mut self, kind: Kind, ticks: &[u64; STAGES]) {
        let k = kind as usize;
        self.count[k] += 1;
        for (sum, t) in self.ticks[k].iter_mut().zip(ticks) {
            *sum += t;
        }
    }

    /// Charges the return of the previous trap of `kind`: from its handler's end at `end` to
    /// its ERET at `eret`. A pair out of order (the frame slot holds an ERET from before that
    /// handler, after a return that bypassed it) is ignored.
    pub fn add_exit(&mut self, kind: Kind, end: u64, eret: u64) {
        if eret >= end {
            self.ticks[kind as usize][Stage::Exit as usize] += eret - end;
        }
    }

    /// The sum of `self` and `other` (a VM's vCPUs together).
    pub fn merged(mut self, other: &TrapProfile) -> Self {
        for k in 0..KINDS {
            self.count[k] += other.count[k];
            for s in 0..STAGES {
                self.ticks[k][s] += other.ticks[k][s];
            }
        }
        self
    }

    /// The statistics line: per kind its count (`prod_n`) and, for each stage, the sum in
    /// nanoseconds (`prod_wait`), so that a reader takes differences over a workload and
    /// divides. `freq` is CNTFRQ_EL0.
    pub fn stats_line(&self, vm: &str, freq: u64) -> String {
        let mut s = format!("profile: {vm} stats: ns sums,");
        for kind in Kind::ALL {
            let k = kind as usize;
            let _ = write!(s, " {}_n={}", kind.name(), self.count[k]);
            for stage in Stage::ALL {
                let ns = ticks_to_ns(self.ticks[k][stage as usize], freq);
                let _ = write!(s, " {}_{}={ns}", kind.name(), stage.name());
            }
        }
        s
    }
}

/// A physical SMMU port whose calls are charged to [`Stage::Submit`] (stream-table and queue
/// writes, CMDQ_PROD) and [`Stage::Wait`] (a CMD_SYNC, a budget), then hand the time back to
/// the stage they were called from.
#[derive(Debug)]
pub struct Timed<'a, P, L> {
    /// The port itself.
    pub inner: P,
    /// The trap's stopwatch.
    pub laps: &'a L,
}

impl<P, L: Laps> Timed<'_, P, L> {
    fn during<T>(&self, stage: Stage, f: impl FnOnce(&P) -> T) -> T {
        let back = self.laps.enter(stage);
        let r = f(&self.inner);
        self.laps.enter(back);
        r
    }

    fn during_mut<T>(&mut self, stage: Stage, f: impl FnOnce(&mut P) -> T) -> T {
        let back = self.laps.enter(stage);
        let r = f(&mut self.inner);
        self.laps.enter(back);
        r
    }
}

impl<P: PhysicalSmmu, L: Laps> PhysicalSmmu for Timed<'_, P, L> {
    fn write_ste(&mut self, sid: u32, ste: Ste) -> Result<SteWrite, DriverError> {
        self.during_mut(Stage::Submit, |p| p.write_ste(sid, ste))
    }

    fn make_ste(&mut self, b: SteBreak) -> Result<Command, DriverError> {
        self.during_mut(Stage::Submit, |p| p.make_ste(b))
    }

    fn submit(&mut self, cmds: &[Command]) -> Result<(), DriverError> {
        self.during_mut(Stage::Submit, |p| p.submit(cmds))
    }

    fn submit_sync(&mut self, cmds: &[Command]) -> Result<SyncTicket, DriverError> {
        self.during_mut(Stage::Submit, |p| p.submit_sync(cmds))
    }

    fn publish(&self) {
        self.during(Stage::Submit, |p| p.publish())
    }

    fn wait(&self, ticket: SyncTicket) -> Result<(), DriverError> {
        self.during(Stage::Wait, |p| p.wait(ticket))
    }

    fn now(&self) -> Option<u64> {
        self.inner.now()
    }

    fn wait_until(&self, deadline: u64) {
        self.during(Stage::Wait, |p| p.wait_until(deadline))
    }
}

/// `ticks` of a counter running at `freq` Hz, in nanoseconds.
pub fn ticks_to_ns(ticks: u64, freq: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(freq.max(1))) as u64
}

/// A [`TrapProfile::stats_line`] as a table for a person: a row per kind that occurred, its
/// count and the mean nanoseconds per exit of each stage and in all. `None` if `line` is not
/// a profile line.
pub fn table(line: &str) -> Option<Vec<String>> {
    let (what, fields) = line.split_once(" stats: ns sums,")?;
    let value = |key: &str| -> u64 {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    out.push(format!("{what} (ns per exit)"));
    let mut head = format!("  {:<5}{:>8}", "", "exits");
    for stage in Stage::ALL {
        let _ = write!(head, "{:>6}", short(stage));
    }
    let _ = write!(head, "{:>6}", "all");
    out.push(head);
    for kind in Kind::ALL {
        let n = value(&format!("{}_n", kind.name()));
        if n == 0 {
            continue;
        }
        let mut row = format!("  {:<5}{n:>8}", kind.name());
        let mut all = 0;
        for stage in Stage::ALL {
            let ns = value(&format!("{}_{}", kind.name(), stage.name()));
            all += ns;
            let _ = write!(row, "{:>6}", ns / n);
        }
        let _ = write!(row, "{:>6}", all / n);
        out.push(row);
    }
    Some(out)
}

/// A stage's column heading (five characters at most, for 80 columns).
fn short(stage: Stage) -> &'static str {
    match stage {
        Stage::Decode => "dec",
        Stage::Submit => "subm",
        Stage::Complete => "compl",
        Stage::LrSync => "lrs",
        s => s.name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A clock that advances by the next step on each reading.
    fn stepping(steps: &[u64]) -> impl Fn() -> u64 + '_ {
        let now = Cell::new(100);
        let i = Cell::new(0);
        move || {
            now.set(now.get() + steps[i.get()]);
            i.set(i.get() + 1);
            now.get()
        }
    }

    #[test]
    fn time_is_charged_to_the_stage_it_was_spent_in_and_nested_stages_hand_it_back() {
        // Readings at 110, 130, 135, 175, 176, 186, 206.
        let sw = Stopwatch::start(stepping(&[10, 20, 5, 40, 1, 10, 20]), 100);
        sw.enter(Stage::Decode); // save: 10
        sw.kind(Kind::CmdqProd);
        sw.enter(Stage::Model); // decode: 20
        let back = sw.enter(Stage::Submit); // model: 5
        assert_eq!(back, Stage::Model);
        sw.enter(back); // submit: 40
        sw.enter(Stage::Wait); // model: 1 more
        sw.enter(Stage::LrSync); // wait: 10
        let (kind, ticks, end) = sw.finish(); // lr_sync: 20
        assert_eq!(kind, Some(Kind::CmdqProd));
        assert_eq!(ticks, [10, 20, 6, 40, 10, 0, 20, 0]);
        assert_eq!(end, 206);
    }

    #[test]
    fn an_unclassified_trap_has_no_kind_and_a_counter_going_back_charges_nothing() {
        let sw = Stopwatch::start(|| 50, 100);
        sw.enter(Stage::Decode);
        let (kind, ticks, _) = sw.finish();
        assert_eq!(kind, None);
        assert_eq!(ticks, [0; STAGES]);
    }

    #[test]
    fn sums_exits_and_merges_vcpus() {
        let mut p = TrapProfile::default();
        p.add(Kind::CmdqProd, &[1, 2, 3, 4, 5, 6, 7, 0]);
        p.add(Kind::CmdqProd, &[1, 2, 3, 4, 5, 6, 7, 0]);
        p.add_exit(Kind::CmdqProd, 10, 15);
        p.add_exit(Kind::CmdqProd, 20, 15); // out of order: ignored
        assert_eq!(p.count[Kind::CmdqProd as usize], 2);
        assert_eq!(
            p.ticks[Kind::CmdqProd as usize],
            [2, 4, 6, 8, 10, 12, 14, 5]
        );
        let mut q = TrapProfile::default();
        q.add(Kind::Irq, &[1; STAGES]);
        let m = p.merged(&q);
        assert_eq!(m.count, [2, 0, 0, 0, 1]);
        assert_eq!(m.ticks[Kind::Irq as usize], [1; STAGES]);
    }

    #[test]
    fn the_line_has_ns_sums_a_reader_can_difference_and_the_table_means() {
        let mut p = TrapProfile::default();
        // 1 GHz: ticks are ns. Two CMDQ_PROD traps.
        p.add(Kind::CmdqProd, &[100, 200, 1000, 300, 2000, 400, 50, 0]);
        p.add(Kind::CmdqProd, &[100, 200, 1000, 300, 2000, 400, 50, 0]);
        p.add_exit(Kind::CmdqProd, 0, 160);
        let line = p.stats_line("vm0", 1_000_000_000);
        assert!(line.starts_with("profile: vm0 stats: ns sums, prod_n=2 prod_save=200 "));
        assert!(line.contains(" prod_wait=4000 "));
        assert!(line.contains(" prod_exit=160 read_n=0 "));
        assert!(line.ends_with(" irq_exit=0"));
        // 62.5 MHz (16 ns a tick).
        let slow = p.stats_line("vm0", 62_500_000);
        assert!(slow.contains(" prod_save=3200 "));

        let t = table(&line).unwrap();
        assert_eq!(
            t,
            vec![
                "profile: vm0 (ns per exit)".to_string(),
                "          exits  save   dec model  subm  wait compl   lrs  exit   all".to_string(),
                "  prod        2   100   200  1000   300  2000   400    50    80  4130".to_string(),
            ]
        );
        for l in &t {
            assert!(l.len() <= crate::monitor::WIDTH, "{l:?}");
        }
        assert_eq!(table("vsmmu: vm0 stats: traps=1"), None);
    }
}

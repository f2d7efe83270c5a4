//! The operator's monitor: commands typed on the shared console after Ctrl-\ : (`list`,
//! `start vm1`, `log debug`, ...), as plain logic. This module edits the command line, parses
//! it against the VMs' names and lays out what the commands print for an 80-column terminal;
//! `arch` carries the commands out (the VM lifecycle is `vm::lifecycle`'s).
//!
//! Commands name a VM by its name (`smmu-hv,vm` node name) or its index in `list`; every
//! message uses names, since a VM's index shifts when one before it was refused.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

/// Longest command line kept; the editor ignores what is typed beyond it.
pub const LINE_MAX: usize = 96;
/// Width the tables are laid out for: fits an 80-column terminal with its `[hv] ` prefix.
pub const WIDTH: usize = 75;

/// The monitor's help, one line per command.
pub const HELP: &str =
    "monitor commands (Ctrl-\\ : then a command and Enter; Esc or Ctrl-C cancels):
  list                 VMs: state, vCPUs, RAM, devices, IOMMU, boots, uptime
  start VM             boot a stopped VM again from its pristine images
  stop VM              stop a running VM (its devices quiesced, its streams aborting)
  reset VM             reboot a running VM
  focus VM             send console input to VM
  stats [VM] [raw]     counters as tables (raw: the key=value lines scripts read)
  log LEVEL            hypervisor log level: off, error, warn, info, debug, trace
  poweroff             stop every VM and power the machine off
  help                 this list
VM is a VM's name or its index in `list`.";

/// What one key did to the command line being edited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// The line changed: redraw it.
    Changed,
    /// Enter: the line is complete ([`LineEditor::take`]).
    Submit,
    /// Esc or Ctrl-C: the line is dropped.
    Cancel,
    /// Nothing changed (a control byte, or the line is full).
    Ignored,
}

/// The command line being typed: printable ASCII, Backspace/Delete, Ctrl-U (clear),
/// Enter, and Esc/Ctrl-C (cancel). Nothing else reaches it, so no terminal control sequence a
/// user pastes can end up in the hypervisor's output.
#[derive(Debug, Default)]
pub struct LineEditor {
    line: String,
}

impl LineEditor {
    /// An empty line.
    pub fn new() -> Self {
        Self::default()
    }

    /// The line so far.
    pub fn text(&self) -> &str {
        &self.line
    }

    /// Takes the line, leaving the editor empty.
    pub fn take(&mut self) -> String {
        core::mem::take(&mut self.line)
    }

    /// Handles one input byte.
    pub fn feed(&mut self, byte: u8) -> Edit {
        match byte {
            b'\r' | b'\n' => Edit::Submit,
            // Ctrl-C, Esc.
            0x03 | 0x1b => Edit::Cancel,
            // Backspace, Delete.
            0x08 | 0x7f => {
                if self.line.pop().is_some() {
                    Edit::Changed
                } else {
                    Edit::Ignored
                }
            }
            // Ctrl-U.
            0x15 if !self.line.is_empty() => {
                self.line.clear();
                Edit::Changed
            }
            0x20..=0x7e if self.line.len() < LINE_MAX => {
                self.line.push(char::from(byte));
                Edit::Changed
            }
            _ => Edit::Ignored,
        }
    }
}

/// A hypervisor log level (`log` command), as `log::LevelFilter` spells them.
pub fn parse_level(s: &str) -> Option<log::LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "off" | "none" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" | "warning" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" | "all" => log::LevelFilter::Trace,
        _ => return None,
    })
}

/// One monitor command, its VM resolved to an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `help`.
    Help,
    /// `list`.
    List,
    /// `start VM`.
    Start(usize),
    /// `stop VM`.
    Stop(usize),
    /// `reset VM`.
    Reset(usize),
    /// `focus VM`.
    Focus(usize),
    /// `stats [VM] [raw]`.
    Stats {
        /// One VM, or all.
        vm: Option<usize>,
        /// The machine-readable lines instead of tables.
        raw: bool,
    },
    /// `log LEVEL`.
    Log(log::LevelFilter),
    /// `poweroff`.
    Poweroff,
}

/// Why a command line was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The first word is no command.
    #[error("unknown command `{0}` (`help` lists them)")]
    Unknown(String),
    /// A command that needs a VM got none.
    #[error("`{0}` needs a VM: its name or index ({1})")]
    MissingVm(&'static str, String),
    /// No VM has that name or index.
    #[error("no VM `{0}` ({1})")]
    UnknownVm(String, String),
    /// `log` with a level it does not know.
    #[error("no log level `{0}`: off, error, warn, info, debug or trace")]
    BadLevel(String),
    /// Words after what the command takes.
    #[error("`{0}` does not take `{1}`")]
    Extra(&'static str, String),
}

/// "the VMs are vm0, vm1" for error messages.
fn known(names: &[&str]) -> String {
    if names.is_empty() {
        "there are no VMs".to_string()
    } else {
        format!("the VMs are {}", names.join(", "))
    }
}

/// The VM `arg` names: a name first (a VM may be called `1`), then an index.
pub fn resolve_vm(arg: &str, names: &[&str]) -> Result<usize, CommandError> {
    if let Some(i) = names.iter().position(|n| *n == arg) {
        return Ok(i);
    }
    arg.parse::<usize>()
        .ok()
        .filter(|&i| i < names.len())
        .ok_or_else(|| CommandError::UnknownVm(arg.to_string(), known(names)))
}

/// Parses a command line against the VMs' names (index order). `Ok(None)`: an empty line.
pub fn parse(line: &str, names: &[&str]) -> Result<Option<Command>, CommandError> {
    let mut words = line.split_ascii_whitespace();
    let Some(cmd) = words.next() else {
        return Ok(None);
    };
    let cmd = cmd.to_ascii_lowercase();
    let rest: Vec<&str> = words.collect();
    let no_more = |name: &'static str, from: usize| match rest.get(from) {
        Some(w) => Err(CommandError::Extra(name, (*w).to_string())),
        None => Ok(()),
    };
    let vm_arg = |name: &'static str| -> Result<usize, CommandError> {
        let arg = rest
            .first()
            .ok_or_else(|| CommandError::MissingVm(name, known(names)))?;
        let vm = resolve_vm(arg, names)?;
        no_more(name, 1)?;
        Ok(vm)
    };
    let c = match cmd.as_str() {
        "help" | "?" => {
            no_more("help", 0)?;
            Command::Help
        }
        "list" | "ls" => {
            no_more("list", 0)?;
            Command::List
        }
        "start" => Command::Start(vm_arg("start")?),
        "stop" | "destroy" => Command::Stop(vm_arg("stop")?),
        "reset" | "reboot" => Command::Reset(vm_arg("reset")?),
        "focus" => Command::Focus(vm_arg("focus")?),
        "stats" => {
            let mut vm = None;
            let mut raw = false;
            for w in &rest {
                if *w == "raw" && !raw {
                    raw = true;
                } else if vm.is_none() {
                    vm = Some(resolve_vm(w, names)?);
                } else {
                    return Err(CommandError::Extra("stats", (*w).to_string()));
                }
            }
            Command::Stats { vm, raw }
        }
        "log" => {
            let arg = rest
                .first()
                .ok_or_else(|| CommandError::BadLevel(String::new()))?;
            let level = parse_level(arg).ok_or_else(|| CommandError::BadLevel(arg.to_string()))?;
            no_more("log", 1)?;
            Command::Log(level)
        }
        "poweroff" | "halt" => {
            no_more("poweroff", 0)?;
            Command::Poweroff
        }
        _ => return Err(CommandError::Unknown(cmd)),
    };
    Ok(Some(c))
}

/// Where a VM of `list` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Accepted, its first boot not loaded yet.
    Starting,
    /// Its vCPUs run.
    Running,
    /// It is being reloaded.
    Resetting,
    /// Stopped; `start` boots it again.
    Stopped,
}

impl VmState {
    /// How `list` and the monitor's messages spell it.
    pub fn name(&self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Resetting => "resetting",
            VmState::Stopped => "stopped",
        }
    }
}

/// What `list` shows of one VM the hypervisor built.
#[derive(Clone, Debug)]
pub struct VmRow {
    /// Its name.
    pub name: String,
    /// Its state now.
    pub state: VmState,
    /// Physical CPU of each vCPU, by vCPU index.
    pub pcpus: Vec<usize>,
    /// Guest RAM: IPA base, size, physical base.
    pub ram: (u64, u64, u64),
    /// Its PCI functions (`0000:00:01.0`).
    pub functions: Vec<String>,
    /// Its IOMMU groups.
    pub groups: Vec<usize>,
    /// Which IOMMU its guest drives (`smmuv3`, `virtio-iommu`), or none without devices.
    pub iommu: Option<&'static str>,
    /// Completed boots.
    pub boots: u32,
    /// Milliseconds since its current boot started; `None` when it is not running.
    pub uptime_ms: Option<u64>,
    /// One line per emulated IOMMU: what the guest's driver made of it.
    pub iommu_summary: Vec<String>,
}

/// A VM the configuration asked for that was not built, and why.
#[derive(Clone, Debug)]
pub struct RefusedVm {
    /// The VM node's name.
    pub name: String,
    /// The error, as logged when it was refused.
    pub reason: String,
}

/// `1 GiB`, `512 MiB`, `64 KiB`: the largest unit that divides `bytes`.
pub fn size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// `h:mm:ss`.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `text` broken at spaces into lines of at most `width` columns, the first behind `first`,
/// the others behind `indent` (a word longer than a line gets a line of its own).
pub fn wrap(text: &str, width: usize, first: &str, indent: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = first.to_string();
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if !empty && cur.len() + 1 + word.len() > width {
            lines.push(core::mem::replace(&mut cur, indent.to_string()));
            empty = true;
        }
        if !empty {
            cur.push(' ');
        }
        cur.push_str(word);
        empty = false;
    }
    lines.push(cur);
    lines
}

/// `list`'s table: a header, then one line per VM with its state, boots, uptime, vCPUs and
/// IOMMU, and under it its RAM, devices and the guest's IOMMU; refused VMs last, with reasons.
pub fn list_lines(vms: &[VmRow], refused: &[RefusedVm]) -> Vec<String> {
    let name_w = vms
        .iter()
        .map(|v| v.name.len())
        .chain(refused.iter().map(|r| r.name.len()))
        .chain(core::iter::once(4))
        .max()
        .unwrap_or(4)
        .min(16);
    let mut out = Vec::new();
    out.push(format!(
        "{:>2}  {:<name_w$}  {:<9}  {:>5}  {:>8}  {:<14}  iommu",
        "#", "name", "state", "boots", "uptime", "vcpu:pcpu"
    ));
    for (i, v) in vms.iter().enumerate() {
        let cpus: Vec<String> = v
            .pcpus
            .iter()
            .enumerate()
            .map(|(c, p)| format!("{c}:{p}"))
            .collect();
        out.push(format!(
            "{i:>2}  {:<name_w$}  {:<9}  {:>5}  {:>8}  {:<14}  {}",
            v.name,
            v.state.name(),
            v.boots,
            v.uptime_ms.map_or_else(|| "-".to_string(), uptime),
            cpus.join(" "),
            v.iommu.unwrap_or("-")
        ));
        let indent = " ".repeat(4);
        let (ipa, len, pa) = v.ram;
        out.push(format!(
            "{indent}RAM {} at IPA {ipa:#x}, PA {pa:#x}",
            size(len)
        ));
        if v.functions.is_empty() {
            out.push(format!("{indent}no PCI functions"));
        } else {
            let groups: Vec<String> = v.groups.iter().map(|g| g.to_string()).collect();
            let text = format!(
                "{} (IOMMU groups {})",
                v.functions.join(" "),
                groups.join(", ")
            );
            out.extend(wrap(
                &text,
                WIDTH,
                &format!("{indent}PCI "),
                &format!("{indent}    "),
            ));
        }
        for s in &v.iommu_summary {
            out.extend(wrap(s, WIDTH, &indent, &format!("{indent}  ")));
        }
    }
    for r in refused {
        out.extend(wrap(
            &format!("refused: {}", r.reason),
            WIDTH,
            &format!("{:>2}  {:<name_w$}  ", "-", r.name),
            &" ".repeat(6 + name_w),
        ));
    }
    out
}

/// What the boot banner says of the machine.
#[derive(Clone, Debug)]
pub struct Machine<'a> {
    /// The hypervisor's version.
    pub version: &'a str,
    /// The DT root's `model` (or `compatible`).
    pub board: &'a str,
    /// Physical CPUs driven.
    pub cpus: usize,
    /// RAM banks: base, size.
    pub ram: &'a [(u64, u64)],
    /// One line per SMMU in the DT: its features, or why it is not driven.
    pub smmus: &'a [String],
    /// One line per ITS in the DT.
    pub its: &'a [String],
}

/// The boot banner: what runs, on what, and the table of VMs (`list`'s), accepted or refused.
pub fn banner_lines(m: &Machine, vms: &[VmRow], refused: &[RefusedVm]) -> Vec<String> {
    let total: u64 = m.ram.iter().map(|r| r.1).sum();
    let banks: Vec<String> = m
        .ram
        .iter()
        .map(|(b, l)| format!("{} at {b:#x}", size(*l)))
        .collect();
    let mut out = alloc::vec![format!(
        "smmu-hv {} on {}: {} CPUs, RAM {} ({})",
        m.version,
        m.board,
        m.cpus,
        size(total),
        banks.join(", ")
    )];
    if m.smmus.is_empty() {
        out.push("SMMU: none in the DT (no PCI function can be assigned)".to_string());
    }
    for l in m.smmus {
        out.extend(wrap(l, WIDTH, "SMMU ", "    "));
    }
    for l in m.its {
        out.extend(wrap(l, WIDTH, "ITS ", "    "));
    }
    out.push(format!(
        "VMs: {} accepted, {} refused",
        vms.len(),
        refused.len()
    ));
    out.extend(list_lines(vms, refused));
    out
}

/// Counter cells per table row: three cells of 24 columns fit [`WIDTH`].
const CELLS: usize = 3;
const KEY_W: usize = 16;
const VALUE_W: usize = 7;

/// One machine-readable stats line (`vsmmu: vm0 stats: traps=12 cmdq_prod=3 ...`, or the
/// `... traps by register: CR0@0x20 r1/w2, ...` line) as a small table: a heading with what
/// it counts and any words that are not counters, then the `key=value` counters three to a
/// row. Lines of another shape come back as they are, wrapped.
pub fn stats_table(line: &str) -> Vec<String> {
    let Some((what, fields)) = line.split_once(" stats: ") else {
        if let Some((what, list)) = line.split_once(" traps by register: ") {
            return wrap(
                &list.replace(", ", " "),
                WIDTH,
                &format!("{what} traps by register: "),
                "    ",
            );
        }
        return wrap(line, WIDTH, "", "    ");
    };
    let (mut notes, mut cells) = (Vec::new(), Vec::new());
    for word in fields.split(' ').filter(|w| !w.is_empty()) {
        match word.split_once('=') {
            Some((k, v)) => cells.push((k, v)),
            None => notes.push(word.trim_end_matches(',')),
        }
    }
    let mut heading = what.to_string();
    if !notes.is_empty() {
        let _ = write!(heading, " ({})", notes.join(" "));
    }
    let mut out = alloc::vec![heading];
    for row in cells.chunks(CELLS) {
        let mut l = String::from("  ");
        for (k, v) in row {
            let _ = write!(l, "{k:<KEY_W$}{v:>VALUE_W$}  ");
        }
        out.push(l.trim_end().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const NAMES: [&str; 3] = ["vm0", "web", "1"];

    fn p(line: &str) -> Result<Option<Command>, CommandError> {
        parse(line, &NAMES)
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(p("help"), Ok(Some(Command::Help)));
        assert_eq!(p("?"), Ok(Some(Command::Help)));
        assert_eq!(p("list"), Ok(Some(Command::List)));
        assert_eq!(p("  LS  "), Ok(Some(Command::List)));
        assert_eq!(p("start web"), Ok(Some(Command::Start(1))));
        assert_eq!(p("stop vm0"), Ok(Some(Command::Stop(0))));
        assert_eq!(p("destroy web"), Ok(Some(Command::Stop(1))));
        assert_eq!(p("reset web"), Ok(Some(Command::Reset(1))));
        assert_eq!(p("reboot 0"), Ok(Some(Command::Reset(0))));
        assert_eq!(p("focus web"), Ok(Some(Command::Focus(1))));
        assert_eq!(
            p("stats"),
            Ok(Some(Command::Stats {
                vm: None,
                raw: false
            }))
        );
        assert_eq!(
            p("stats raw"),
            Ok(Some(Command::Stats {
                vm: None,
                raw: true
            }))
        );
        assert_eq!(
            p("stats web raw"),
            Ok(Some(Command::Stats {
                vm: Some(1),
                raw: true
            }))
        );
        assert_eq!(
            p("log debug"),
            Ok(Some(Command::Log(log::LevelFilter::Debug)))
        );
        assert_eq!(
            p("log WARNING"),
            Ok(Some(Command::Log(log::LevelFilter::Warn)))
        );
        assert_eq!(p("log off"), Ok(Some(Command::Log(log::LevelFilter::Off))));
        assert_eq!(p("poweroff"), Ok(Some(Command::Poweroff)));
        assert_eq!(p(""), Ok(None));
        assert_eq!(p("   "), Ok(None));
    }

    #[test]
    fn a_name_wins_over_an_index_and_an_index_works_when_no_name_matches() {
        // The VM named "1" is VM 2; index 1 is "web", reachable by its name.
        assert_eq!(p("start 1"), Ok(Some(Command::Start(2))));
        assert_eq!(p("start 2"), Ok(Some(Command::Start(2))));
        assert_eq!(p("start 0"), Ok(Some(Command::Start(0))));
    }

    #[test]
    fn errors_name_what_was_wrong_and_the_vms_there_are() {
        let e = p("start vm7").unwrap_err();
        assert_eq!(
            e,
            CommandError::UnknownVm("vm7".into(), "the VMs are vm0, web, 1".into())
        );
        assert_eq!(e.to_string(), "no VM `vm7` (the VMs are vm0, web, 1)");
        assert!(matches!(p("start 3"), Err(CommandError::UnknownVm(..))));
        assert_eq!(
            p("stop").unwrap_err().to_string(),
            "`stop` needs a VM: its name or index (the VMs are vm0, web, 1)"
        );
        assert_eq!(
            p("frobnicate"),
            Err(CommandError::Unknown("frobnicate".into()))
        );
        assert_eq!(p("log loud"), Err(CommandError::BadLevel("loud".into())));
        assert_eq!(p("log"), Err(CommandError::BadLevel(String::new())));
        assert_eq!(
            p("list vm0"),
            Err(CommandError::Extra("list", "vm0".into()))
        );
        assert_eq!(
            p("reset vm0 web"),
            Err(CommandError::Extra("reset", "web".into()))
        );
        assert_eq!(
            p("stats vm0 web"),
            Err(CommandError::Extra("stats", "web".into()))
        );
        assert!(matches!(
            parse("start 0", &[]),
            Err(CommandError::UnknownVm(_, k)) if k == "there are no VMs"
        ));
    }

    #[test]
    fn the_editor_takes_printable_ascii_and_edits() {
        let mut e = LineEditor::new();
        for &b in b"lisx" {
            assert_eq!(e.feed(b), Edit::Changed);
        }
        assert_eq!(e.feed(0x7f), Edit::Changed);
        assert_eq!(e.feed(b't'), Edit::Changed);
        assert_eq!(e.text(), "list");
        // Control bytes and escape sequences never reach the line.
        assert_eq!(e.feed(0x07), Edit::Ignored);
        assert_eq!(e.feed(0xc3), Edit::Ignored);
        assert_eq!(e.text(), "list");
        assert_eq!(e.feed(b'\r'), Edit::Submit);
        assert_eq!(e.take(), "list");
        assert_eq!(e.text(), "");
        assert_eq!(e.feed(0x08), Edit::Ignored);
        e.feed(b'x');
        assert_eq!(e.feed(0x15), Edit::Changed);
        assert_eq!(e.text(), "");
        assert_eq!(e.feed(0x1b), Edit::Cancel);
        assert_eq!(e.feed(0x03), Edit::Cancel);
        for _ in 0..LINE_MAX + 10 {
            e.feed(b'a');
        }
        assert_eq!(e.text().len(), LINE_MAX);
        assert_eq!(e.feed(b'a'), Edit::Ignored);
    }

    fn row(name: &str, state: VmState) -> VmRow {
        VmRow {
            name: name.into(),
            state,
            pcpus: vec![2, 3],
            ram: (0x4000_0000, 1 << 30, 0x1_0000_0000),
            functions: vec!["0000:00:03.0".into(), "0000:00:04.0".into()],
            groups: vec![3, 4],
            iommu: Some("smmuv3"),
            boots: 2,
            uptime_ms: Some(3_723_000),
            iommu_summary: vec![
                "vsmmu 0x9050000: 2 nested; 812 traps 1600 cmds 0 errors 0 faults".into(),
            ],
        }
    }

    #[test]
    fn list_is_a_table_that_fits_80_columns() {
        let mut stopped = row("vm0", VmState::Stopped);
        stopped.uptime_ms = None;
        stopped.functions.clear();
        stopped.iommu = None;
        stopped.iommu_summary.clear();
        let refused = [RefusedVm {
            name: "bad".into(),
            reason: "`smmu-hv,cpus`: CPU 0x1 (MPIDR) is already vm0's: VM not started, and this reason is long enough to wrap".into(),
        }];
        let lines = list_lines(&[stopped, row("web", VmState::Running)], &refused);
        for l in &lines {
            assert!(l.len() + 5 <= 80, "{} columns: {l:?}", l.len() + 5);
        }
        assert_eq!(
            lines[0],
            " #  name  state      boots    uptime  vcpu:pcpu       iommu"
        );
        assert_eq!(
            lines[1],
            " 0  vm0   stopped        2         -  0:2 1:3         -"
        );
        assert_eq!(lines[2], "    RAM 1 GiB at IPA 0x40000000, PA 0x100000000");
        assert_eq!(lines[3], "    no PCI functions");
        assert_eq!(
            lines[4],
            " 1  web   running        2   1:02:03  0:2 1:3         smmuv3"
        );
        assert_eq!(
            lines[6],
            "    PCI 0000:00:03.0 0000:00:04.0 (IOMMU groups 3, 4)"
        );
        assert_eq!(
            lines[7],
            "    vsmmu 0x9050000: 2 nested; 812 traps 1600 cmds 0 errors 0 faults"
        );
        assert!(
            lines[8].starts_with(" -  bad   refused: `smmu-hv,cpus`"),
            "{}",
            lines[8]
        );
        assert!(lines[9].starts_with("          "), "{}", lines[9]);
        assert!(lines.last().unwrap().ends_with("to wrap"));
    }

    #[test]
    fn a_stats_line_becomes_a_table_of_its_counters() {
        let t = stats_table(
            "vits: vm1 stats: delivery list-registers, lpis_at_el2=63 lpis_delivered=63 lpis_dropped=0 commands=34",
        );
        assert_eq!(
            t,
            vec![
                "vits: vm1 (delivery list-registers)".to_string(),
                "  lpis_at_el2          63  lpis_delivered       63  lpis_dropped          0"
                    .to_string(),
                "  commands             34".to_string(),
            ]
        );
        for l in &t {
            assert!(l.len() <= WIDTH, "{l:?}");
        }
        let r = stats_table("vsmmu: vm0 traps by register: CR0@0x20 r1/w2, CMDQ_PROD@0x98 r0/w9");
        assert_eq!(
            r,
            vec!["vsmmu: vm0 traps by register: CR0@0x20 r1/w2 CMDQ_PROD@0x98 r0/w9".to_string()]
        );
        assert_eq!(
            stats_table("heap: 12 bytes"),
            vec!["heap: 12 bytes".to_string()]
        );
    }

    #[test]
    fn the_banner_says_what_runs_and_every_vm_accepted_or_refused() {
        let mut starting = row("vm0", VmState::Starting);
        starting.boots = 0;
        starting.uptime_ms = None;
        let refused = [RefusedVm {
            name: "vm2".into(),
            reason: "`cpus`: 5 vCPUs but the machine has 4 CPUs".into(),
        }];
        let smmus = ["/smmuv3@9050000: SMMUv3 at 0x9050000, 16-bit StreamIDs, nesting".to_string()];
        let its = ["/intc@8000000/its@8080000: driven".to_string()];
        let lines = banner_lines(
            &Machine {
                version: "0.1.0",
                board: "linux,dummy-virt",
                cpus: 4,
                ram: &[(0x4000_0000, 4 << 30)],
                smmus: &smmus,
                its: &its,
            },
            &[starting],
            &refused,
        );
        assert_eq!(
            lines[0],
            "smmu-hv 0.1.0 on linux,dummy-virt: 4 CPUs, RAM 4 GiB (4 GiB at 0x40000000)"
        );
        assert_eq!(
            lines[1],
            "SMMU /smmuv3@9050000: SMMUv3 at 0x9050000, 16-bit StreamIDs, nesting"
        );
        assert_eq!(lines[2], "ITS /intc@8000000/its@8080000: driven");
        assert_eq!(lines[3], "VMs: 1 accepted, 1 refused");
        assert!(
            lines[5].starts_with(" 0  vm0   starting       0         -"),
            "{}",
            lines[5]
        );
        assert!(
            lines.last().unwrap().contains("refused: `cpus`: 5 vCPUs"),
            "{lines:?}"
        );
    }

    #[test]
    fn sizes_and_uptimes_read_as_people_write_them() {
        assert_eq!(size(1 << 30), "1 GiB");
        assert_eq!(size(3 << 29), "1536 MiB");
        assert_eq!(size(0x1000), "4 KiB");
        assert_eq!(size(1000), "1000 B");
        assert_eq!(size(0), "0 B");
        assert_eq!(uptime(0), "0:00:00");
        assert_eq!(uptime(59_999), "0:00:59");
        assert_eq!(uptime(3_600_000 * 27 + 61_000), "27:01:01");
    }

    #[test]
    fn wrap_breaks_at_spaces_within_the_width() {
        assert_eq!(wrap("a b c", 3, "", "  "), vec!["a b", "  c"]);
        assert_eq!(wrap("", 10, "> ", ""), vec!["> "]);
        assert_eq!(wrap("toolongword x", 4, "", ""), vec!["toolongword", "x"]);
    }
}

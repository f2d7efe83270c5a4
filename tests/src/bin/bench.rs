//! The benchmark behind `qemu/bench.sh` (issue 7): what the hypervisor costs a Linux guest,
//! measured side by side in one run on one machine.
//!
//! It boots the same modular guest kernel (`build/guest/modular`, from `qemu/kernel.sh`) on
//! QEMU's `virt` in three setups, each with the same two PCI functions (a virtio disk at 00:01.0
//! and a virtio NIC at 00:02.0, behind QEMU's SMMUv3) and two CPUs:
//!
//! 1. bare: Linux directly on QEMU, its arm-smmu-v3 driver doing stage 1 on QEMU's SMMU;
//! 2. vSMMU: Linux as the one VM of the hypervisor, its stage 1 on the emulated SMMU (traps),
//!    nested over the hypervisor's stage 2 in the physical SMMU;
//! 3. stage-2 only: the same VM with `iommu.passthrough=1` (identity domains: no vIOMMU work).
//!
//! and, unless `--no-net`, two VMs for a guest-to-guest transfer (vSMMU and stage-2 only; bare
//! has one guest). In each, it types `sh /bench.sh WORKLOAD` into the guest shell
//! (`tests/guest/bench.sh`, in the initramfs) and reads its `bench: KEY=VALUE` lines; under the
//! hypervisor it reads the vSMMU counters (Ctrl-\ s) at the handshakes around each measured part,
//! for exact trap and command counts per operation. Every repeat boots every setup, in a rotated
//! order, so drift hits all alike; figures are min/median/max over the repeats and ratios are
//! taken within a repeat.
//!
//! The disks are private copies (under the cargo target directory) of `build/disks/vm0.img` and
//! `vm1.img`, given to QEMU exactly as the board script's `--pci` gives them: QEMU locks a disk
//! image, so the board's own would collide with any `--pci` test running in the same checkout.
//!
//! `bench --help` lists the options. Progress goes to stderr; the table to stdout and, with
//! `--out FILE`, to a Markdown file with the machine, the date and the command line.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use integration_tests::{
    console_command, focus, guest_kver, hv_text, modular_guest_dir, parse_stats, repo_root,
    target_dir, type_paced, Error, Line, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT,
};

/// What always holds when reading the figures (the Markdown report's notes).
const READING: &str = "\
How to read them:

- Everything runs under QEMU's TCG on a shared host: absolute times mean little, and other jobs' \
  load moves them from one boot to the next (the boots list below says how many other QEMUs ran). \
  The ratios are taken within a repeat, whose setups ran minutes apart; the counts below are exact.
- All three setups translate DMA in QEMU's SMMUv3 model: bare with stage 1 (the guest's tables), \
  vSMMU nested (the guest's stage 1 over the hypervisor's stage 2), stage-2 only with stage 2. \
  Bare is the same guest on the same emulated SMMU, not an IOMMU-less machine.
- Interrupts differ: bare QEMU virt has a GICv3 ITS, so the bare guest's virtio functions use MSI-X; \
  the hypervisor's guests have no ITS and use INTx through the virtual GIC.
- Boot to init under the hypervisor includes its load of the VM, mostly a first-boot pass zeroing \
  all 1 GiB of the VM's RAM, which under emulation makes the host allocate it. How long that takes \
  depends on the host, not on the setup: about 0.5 s when the boot before had freed as much \
  memory (another boot of the hypervisor with as many VMs), 1.5 to 5 s otherwise (after a bare \
  boot, or one VM before two), which the rotated order hands out unevenly. Its own \
  `loaded in N ms` is shown, and the boot time less it.
- dma_map_benchmark reports 0.1 µs steps; with `iommu.passthrough=1` it measures dma-direct.
- The random reads run one dd process per read: the row below them (the same loop on /dev/zero) \
  shows that process creation, not the disk, dominates them.
- The network figures come from two guests on two shared host cores; TCP goes through QEMU's hub.

";

const USAGE: &str = "\
usage: bench [--repeats N] [--out FILE] [--setups LIST] [--no-net] [--dma-seconds S] [--quick]

Boots the modular guest (build/guest/modular) bare on QEMU, under the hypervisor with its vSMMU,
and under the hypervisor with stage 2 only (iommu.passthrough=1), N times each in a rotated
order, runs the same workloads in each (tests/guest/bench.sh) and prints one table of figures
and ratios (median [min-max]) and the exact vSMMU counts per operation.

  --repeats N      boots of each setup (default 3)
  --out FILE       also write the tables as Markdown to FILE, with the date, the machine and
                   the command line
  --setups LIST    only these setups, comma-separated: bare, vsmmu, s2, net (the two-VM
                   pairs); default all
  --no-net         the same as --setups bare,vsmmu,s2
  --dma-seconds S  length of each dma_map_benchmark run (default 3)
  --quick          a smoke run: 1 repeat, short workloads (figures not worth keeping)

Run it through qemu/bench.sh, which sets up, builds the hypervisor and the modular guest first.";

/// What the three columns of the table are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Col {
    Bare,
    Vsmmu,
    S2,
}

impl Col {
    const ALL: [Col; 3] = [Col::Bare, Col::Vsmmu, Col::S2];

    fn label(self) -> &'static str {
        match self {
            Col::Bare => "bare",
            Col::Vsmmu => "vSMMU",
            Col::S2 => "stage-2 only",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Col::Bare => "bare",
            Col::Vsmmu => "vsmmu",
            Col::S2 => "s2",
        }
    }
}

/// One boot of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Boot {
    /// One guest, in the setup of the column.
    Single(Col),
    /// Two VMs under the hypervisor (vSMMU or stage-2 only), for the guest-to-guest transfer.
    Pair(Col),
}

impl Boot {
    fn col(self) -> Col {
        match self {
            Boot::Single(c) | Boot::Pair(c) => c,
        }
    }

    fn name(self) -> String {
        match self {
            Boot::Single(c) => c.slug().to_string(),
            Boot::Pair(c) => format!("{}-2vms", c.slug()),
        }
    }
}

/// The dma_map_benchmark runs: (threads, pages per mapping).
const DMA_CONFIGS: [(u32, u32); 4] = [(1, 1), (2, 1), (1, 4), (1, 16)];
/// The guest addresses of the two-VM setups (`hvip=`, tests/guest/init).
const VM_IPS: [&str; 2] = ["10.0.2.10", "10.0.2.11"];
const BASE_BOOTARGS: &str = "console=ttyAMA0 rdinit=/init";

#[derive(Debug, Clone)]
struct Opts {
    repeats: usize,
    out: Option<PathBuf>,
    singles: Vec<Col>,
    net: bool,
    dma_seconds: u32,
    seq_passes: u32,
    k4_passes: u32,
    rand_reads: u32,
    net_mib: u32,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            repeats: 3,
            out: None,
            singles: Col::ALL.to_vec(),
            net: true,
            dma_seconds: 3,
            seq_passes: 64,
            k4_passes: 4,
            rand_reads: 200,
            net_mib: 16,
        };
        let mut it = args.iter();
        let num = |v: Option<&String>, what: &str| -> Result<u64, String> {
            v.and_then(|s| s.parse::<u64>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{what} wants a positive number"))
        };
        while let Some(a) = it.next() {
            match a.as_str() {
                "--repeats" => o.repeats = num(it.next(), "--repeats")? as usize,
                "--dma-seconds" => o.dma_seconds = num(it.next(), "--dma-seconds")? as u32,
                "--out" => {
                    o.out = Some(PathBuf::from(it.next().ok_or("--out wants a file name")?));
                }
                "--no-net" => o.net = false,
                "--setups" => {
                    let list = it.next().ok_or("--setups wants a list")?;
                    o.singles.clear();
                    o.net = false;
                    for w in list.split(',') {
                        match w.trim() {
                            "net" => o.net = true,
                            w => o.singles.push(
                                *Col::ALL
                                    .iter()
                                    .find(|c| c.slug() == w)
                                    .ok_or_else(|| format!("--setups: unknown setup {w:?}"))?,
                            ),
                        }
                    }
                    o.singles.sort();
                    o.singles.dedup();
                }
                "--quick" => {
                    o.repeats = 1;
                    o.dma_seconds = 1;
                    o.seq_passes = 8;
                    o.k4_passes = 1;
                    o.rand_reads = 50;
                    o.net_mib = 8;
                }
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(o)
    }
}

/// The counter deltas of one VM over one measured part.
type Delta = BTreeMap<String, u64>;

#[derive(Debug, Default)]
struct Results {
    /// Metric -> column -> (repeat, value).
    samples: BTreeMap<String, BTreeMap<Col, Vec<(usize, f64)>>>,
    /// Count row -> column -> one entry per repeat: (operations, counter deltas).
    counts: BTreeMap<String, BTreeMap<Col, Vec<(f64, Delta)>>>,
    /// What each setup's guest said about itself (first boot of each).
    facts: BTreeMap<String, BTreeMap<String, String>>,
    /// One line per boot: what it was, how long it took, what else ran.
    boots: Vec<String>,
    failures: Vec<String>,
}

impl Results {
    fn add(&mut self, metric: &str, col: Col, rep: usize, v: f64) {
        if v.is_finite() {
            self.samples
                .entry(metric.to_string())
                .or_default()
                .entry(col)
                .or_default()
                .push((rep, v));
        }
    }

    fn add_count(&mut self, row: &str, col: Col, ops: f64, delta: Delta) {
        self.counts
            .entry(row.to_string())
            .or_default()
            .entry(col)
            .or_default()
            .push((ops, delta));
    }
}

/// Everything the boots share.
#[derive(Debug)]
struct Ctx {
    opts: Opts,
    guest: PathBuf,
    disks: [PathBuf; 2],
}

impl Ctx {
    /// The board script's arguments of `boot`.
    fn args(&self, boot: Boot) -> Vec<String> {
        let guest = self.guest.display().to_string();
        let s2 = if boot.col() == Col::S2 {
            " iommu.passthrough=1"
        } else {
            ""
        };
        let mut a: Vec<String> = Vec::new();
        let vms = match boot {
            Boot::Single(Col::Bare) => {
                a.extend(
                    ["--bare", "--smp", "2", "--guest", &guest, "--bootargs"].map(String::from),
                );
                a.push(BASE_BOOTARGS.to_string());
                1
            }
            Boot::Single(_) => {
                a.extend(["--vms", "1", "--smp", "2", "--guest", &guest].map(String::from));
                a.extend(
                    ["--vm-pci", "0", "00:01.0,00:02.0", "--vm-bootargs", "0"].map(String::from),
                );
                a.push(format!("{BASE_BOOTARGS}{s2}"));
                1
            }
            Boot::Pair(_) => {
                a.extend(["--vms", "2", "--smp", "4", "--guest", &guest].map(String::from));
                a.extend(["--vm-pci", "0", "00:01.0,00:02.0"].map(String::from));
                a.extend(["--vm-pci", "1", "00:03.0,00:04.0"].map(String::from));
                for (i, ip) in VM_IPS.iter().enumerate() {
                    a.extend(["--vm-bootargs".to_string(), i.to_string()]);
                    a.push(format!("{BASE_BOOTARGS} hvip={ip}/24{s2}"));
                }
                2
            }
        };
        a.push("--".to_string());
        a.extend(pci_devices(&self.disks[..vms]));
        a
    }
}

/// The QEMU arguments of the disk and NIC of VM i (i < disks.len()), as `qemu/board-virt.sh --pci`
/// makes them (its `pci_args`: VM i on root-bus slots 2i+1 and 2i+2, NICs on hub 0), with the
/// disk images `disks`.
fn pci_devices(disks: &[PathBuf]) -> Vec<String> {
    let mut a = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let (ds, ns) = (2 * i + 1, 2 * i + 2);
        let file = disk.display().to_string().replace(',', ",,");
        a.push("-drive".to_string());
        a.push(format!("if=none,id=vm{i}disk,format=raw,file={file}"));
        a.push("-device".to_string());
        a.push(format!(
            "virtio-blk-pci,drive=vm{i}disk,bus=pcie.0,addr={ds}.0,disable-legacy=on,iommu_platform=on"
        ));
        a.push("-netdev".to_string());
        a.push(format!("hubport,id=vm{i}net,hubid=0"));
        a.push("-device".to_string());
        a.push(format!(
            "virtio-net-pci,netdev=vm{i}net,bus=pcie.0,addr={ns}.0,disable-legacy=on,iommu_platform=on,mac=52:54:00:00:00:1{i},romfile="
        ));
    }
    a
}

type R<T> = Result<T, String>;

fn qe(e: Error) -> String {
    e.to_string()
}

/// A `bench: KEY=VALUE` line (anywhere in it): `(KEY, VALUE)`.
fn bench_fact(line: &str) -> Option<(&str, &str)> {
    let (_, rest) = line.split_once("bench: ")?;
    let (k, v) = rest.split_once('=')?;
    if k.is_empty() || k.contains(char::is_whitespace) {
        return None;
    }
    Some((k, v.trim()))
}

/// Waits for a guest line: any console line (`vm` None: one guest) or one of VM `vm`'s.
fn wait_guest(
    q: &mut Qemu,
    vm: Option<&str>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<Line, Error> {
    match vm {
        Some(vm) => q.wait_vm_until(vm, what, timeout, pred),
        None => q.wait_until(what, timeout, pred),
    }
}

type Facts = BTreeMap<String, String>;

/// Collects the guest's `bench:` facts into `facts` until `bench: STOP=...`; returns its value.
fn collect_until(
    q: &mut Qemu,
    vm: Option<&str>,
    stop: &str,
    timeout: Duration,
    facts: &mut Facts,
) -> R<String> {
    let found = RefCell::new(Facts::new());
    let missing = "can't open '/bench.sh'";
    let line = wait_guest(q, vm, &format!("\"bench: {stop}=...\""), timeout, |l| {
        if l.contains(missing) {
            return true;
        }
        match bench_fact(l) {
            Some((k, v)) => {
                found.borrow_mut().insert(k.to_string(), v.to_string());
                k == stop
            }
            None => false,
        }
    })
    .map_err(qe)?;
    if line.text.contains(missing) {
        return Err(
            "the guest has no /bench.sh: its initramfs predates the benchmark (run qemu/kernel.sh)"
                .to_string(),
        );
    }
    let found = found.into_inner();
    let value = found.get(stop).cloned().unwrap_or_default();
    facts.extend(found);
    Ok(value)
}

/// Types a command into the focused guest's shell: after its prompt (one guest), or after a
/// short pause (several: their prompts share the console).
fn type_command(q: &mut Qemu, one_guest: bool, cmd: &str) -> R<()> {
    if one_guest {
        q.wait_for_prompt("/ #", Duration::from_secs(20));
    } else {
        thread::sleep(Duration::from_millis(500));
    }
    type_paced(q, &format!("{cmd}\n")).map_err(qe)
}

/// The vSMMU counters of `vms` (Ctrl-\ s), by VM.
fn vsmmu_counters(q: &mut Qemu, vms: &[&str]) -> R<BTreeMap<String, Delta>> {
    console_command(q, 's').map_err(qe)?;
    let found = RefCell::new(BTreeMap::new());
    q.wait_until(
        &format!("the hypervisor's vSMMU stats lines of {vms:?}"),
        STEP_TIMEOUT,
        |l| {
            if let Some(t) = hv_text(l) {
                for vm in vms {
                    if t.starts_with(&format!("vsmmu: {vm} stats: ")) {
                        found.borrow_mut().insert(vm.to_string(), parse_stats(l));
                    }
                }
            }
            found.borrow().len() == vms.len()
        },
    )
    .map_err(qe)?;
    Ok(found.into_inner())
}

fn delta(before: &Delta, after: &Delta) -> Delta {
    after
        .iter()
        .map(|(k, &a)| {
            (
                k.clone(),
                a.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .collect()
}

/// Runs `sh /bench.sh CMD` (workload `key`) in the focused guest with its two handshakes; under
/// the hypervisor reads the counters of `stat_vms` at both. Returns the guest's facts and the
/// counter deltas over the measured part, by VM.
fn workload(
    q: &mut Qemu,
    vm: Option<&str>,
    stat_vms: &[&str],
    cmd: &str,
    key: &str,
    timeout: Duration,
) -> R<(Facts, BTreeMap<String, Delta>)> {
    let mut facts = Facts::new();
    type_command(q, vm.is_none(), &format!("sh /bench.sh {cmd}"))?;
    let ready = collect_until(q, vm, "ready", STEP_TIMEOUT, &mut facts)?;
    if ready != key {
        return Err(format!(
            "`sh /bench.sh {cmd}` said ready={ready}, not {key}"
        ));
    }
    let before = if stat_vms.is_empty() {
        BTreeMap::new()
    } else {
        vsmmu_counters(q, stat_vms)?
    };
    q.send("\n").map_err(qe)?;
    collect_until(q, vm, "measured", timeout, &mut facts)?;
    let after = if stat_vms.is_empty() {
        BTreeMap::new()
    } else {
        vsmmu_counters(q, stat_vms)?
    };
    q.send("\n").map_err(qe)?;
    collect_until(q, vm, "end", STEP_TIMEOUT, &mut facts)?;
    let deltas = after
        .iter()
        .map(|(vm, a)| (vm.clone(), delta(&before[vm], a)))
        .collect();
    Ok((facts, deltas))
}

fn num(facts: &Facts, key: &str) -> R<f64> {
    facts
        .get(key)
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            let err = facts
                .iter()
                .find(|(k, _)| k.ends_with("error"))
                .map(|(k, v)| format!(" ({k}={v})"))
                .unwrap_or_default();
            format!("the guest did not report a number for {key}{err}")
        })
}

/// The IOMMU domain each setup's guest must have put its functions in (`iommu_group/type`).
fn domain_ok(col: Col, domain: &str) -> bool {
    match col {
        Col::Bare | Col::Vsmmu => domain.starts_with("DMA"),
        Col::S2 => domain == "identity",
    }
}

/// The line of the board script just before it execs QEMU (its last one).
fn wait_exec(q: &mut Qemu) -> R<Line> {
    q.wait_until(
        "the board script's exec of QEMU",
        Duration::from_secs(120),
        |l| l.starts_with("[board-virt] bare guest") || l.starts_with("[board-virt] hypervisor,"),
    )
    .map_err(qe)
}

/// The guest kernel's own clock (its printk time stamp) when it started /init:
/// `[    0.333946] Run /init as init process` gives 0.333946.
fn kernel_init_time(lines: &[Line]) -> Option<f64> {
    lines.iter().find_map(|l| {
        let (stamp, _) = l.text.split_once("] Run /init as init process")?;
        let (_, secs) = stamp.rsplit_once('[')?;
        secs.trim().parse().ok()
    })
}

/// How long the hypervisor took to load VM `vm` (`[hv] vm0: boot 1: ... loaded in 518 ms, ...`).
fn vm_load_ms(lines: &[Line], vm: &str) -> Option<f64> {
    let prefix = format!("{vm}: boot ");
    lines.iter().find_map(|l| {
        let t = hv_text(&l.text)?.strip_prefix(&prefix)?;
        let (_, rest) = t.split_once(", loaded in ")?;
        rest.split_once(" ms")?.0.parse().ok()
    })
}

/// `sh /bench.sh info` in the focused guest: checks the IOMMU domains and the tool; returns the
/// facts.
fn info(q: &mut Qemu, vm: Option<&str>, col: Col) -> R<Facts> {
    let bdfs = if vm == Some("vm1") {
        ["00:03.0", "00:04.0"]
    } else {
        ["00:01.0", "00:02.0"]
    };
    let mut facts = Facts::new();
    type_command(q, vm.is_none(), "sh /bench.sh info")?;
    collect_until(q, vm, "nc", STEP_TIMEOUT, &mut facts)?;
    if facts.get("dma-tool").map(String::as_str) != Some("yes") {
        return Err("the guest has no /bin/dma_map_benchmark (run qemu/kernel.sh)".to_string());
    }
    for f in bdfs {
        let d = facts
            .get(&format!("iommu-domain-{f}"))
            .map_or("none", String::as_str);
        if !domain_ok(col, d) {
            return Err(format!(
                "{f} is in an IOMMU domain of type {d:?} in the {} setup",
                col.label()
            ));
        }
    }
    Ok(facts)
}

/// One guest: boot time, disk, DMA map/unmap.
fn run_single(col: Col, rep: usize, ctx: &Ctx, res: &mut Results, name: &str) -> R<()> {
    let args = ctx.args(Boot::Single(col));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut q = Qemu::spawn_with_limit(name, &argv, Duration::from_secs(900)).map_err(qe)?;
    let exec = wait_exec(&mut q)?;
    let init = q
        .wait_for_line("guest: init started", BOOT_TIMEOUT)
        .map_err(qe)?;
    let boot = (init.at - exec.at).as_secs_f64();
    res.add("boot", col, rep, boot);
    let lines = q.lines();
    if let Some(t) = kernel_init_time(&lines) {
        res.add("boot-kernel", col, rep, t);
    }
    let load = vm_load_ms(&lines, "vm0").map(|ms| ms / 1e3);
    if let Some(load) = load {
        res.add("boot-load", col, rep, load);
    }
    res.add("boot-less-load", col, rep, boot - load.unwrap_or(0.0));
    q.wait_for("guest: shell", STEP_TIMEOUT).map_err(qe)?;
    let facts = info(&mut q, None, col)?;
    res.facts.entry(col.label().to_string()).or_insert(facts);

    let hv: &[&str] = if col == Col::Bare { &[] } else { &["vm0"] };
    let long = Duration::from_secs(300);
    let o = &ctx.opts;

    let (f, d) = workload(
        &mut q,
        None,
        hv,
        &format!("seq {}", o.seq_passes),
        "seq",
        long,
    )?;
    let mib = num(&f, "seq-bytes")? / 1048576.0;
    res.add("seq", col, rep, mib / (num(&f, "seq-us")? / 1e6));
    if let Some(d) = d.get("vm0") {
        res.add_count("seq", col, mib, d.clone());
    }

    let (f, d) = workload(&mut q, None, hv, &format!("4k {}", o.k4_passes), "4k", long)?;
    let reads = num(&f, "4k-reads")?;
    res.add("4k", col, rep, reads / (num(&f, "4k-us")? / 1e6));
    if let Some(d) = d.get("vm0") {
        res.add_count("4k", col, reads, d.clone());
    }

    let (f, d) = workload(
        &mut q,
        None,
        hv,
        &format!("rand {}", o.rand_reads),
        "rand",
        long,
    )?;
    let reads = num(&f, "rand-reads")?;
    let us = num(&f, "rand-us")?;
    res.add("rand", col, rep, reads / (us / 1e6));
    res.add("rand-spawn", col, rep, num(&f, "rand-spawn-us")? / reads);
    if let Some(d) = d.get("vm0") {
        res.add_count("rand", col, reads, d.clone());
    }

    dma_setup(&mut q, None, "00:02.0", col)?;
    for (t, g) in DMA_CONFIGS {
        let k = format!("dma-t{t}-g{g}");
        let cmd = format!("dma {t} {g} {}", o.dma_seconds);
        let timeout = Duration::from_secs(u64::from(o.dma_seconds) * 4 + 120);
        let (f, d) = workload(&mut q, None, hv, &cmd, &k, timeout)?;
        let map = num(&f, &format!("{k}-map-us"))?;
        let unmap = num(&f, &format!("{k}-unmap-us"))?;
        res.add(&format!("{k}-map"), col, rep, map);
        res.add(&format!("{k}-unmap"), col, rep, unmap);
        res.add(&format!("{k}-pair"), col, rep, map + unmap);
        if let Some(d) = d.get("vm0") {
            // Strict invalidation: one CMD_SYNC per dma_unmap, none per dma_map.
            res.add_count(
                &k,
                col,
                d.get("syncs").copied().unwrap_or(0) as f64,
                d.clone(),
            );
        }
    }
    Ok(())
}

/// Two VMs: boot time of both, vm0 sending to vm1 over their NICs.
fn run_pair(col: Col, rep: usize, ctx: &Ctx, res: &mut Results, name: &str) -> R<()> {
    let args = ctx.args(Boot::Pair(col));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut q = Qemu::spawn_with_limit(name, &argv, Duration::from_secs(600)).map_err(qe)?;
    let exec = wait_exec(&mut q)?;
    let mut last = exec.at;
    for vm in ["vm0", "vm1"] {
        let l = q
            .wait_vm_until(vm, "\"guest: init started\"", BOOT_TIMEOUT, |t| {
                t.contains("guest: init started")
            })
            .map_err(qe)?;
        last = last.max(l.at);
    }
    let boot = (last - exec.at).as_secs_f64();
    res.add("boot2", col, rep, boot);
    // The two VMs load at once, each on its own CPUs.
    let lines = q.lines();
    let load = ["vm0", "vm1"]
        .iter()
        .filter_map(|vm| vm_load_ms(&lines, vm))
        .fold(0.0, f64::max);
    res.add("boot2-less-load", col, rep, boot - load / 1e3);
    for (vm, ip) in ["vm0", "vm1"].iter().zip(VM_IPS) {
        let got = q.wait_vm_fact(vm, "eth0-ip", STEP_TIMEOUT).map_err(qe)?;
        if got != format!("{ip}/24") {
            return Err(format!("{vm}'s eth0 is {got:?}, not {ip}/24"));
        }
        q.wait_vm_for(vm, "guest: shell", STEP_TIMEOUT)
            .map_err(qe)?;
    }
    let key = format!("two VMs, {} (vm1)", col.label());
    focus(&mut q, "vm1").map_err(qe)?;
    let facts = info(&mut q, Some("vm1"), col)?;
    res.facts.entry(key).or_insert(facts);
    let mut facts = Facts::new();
    type_command(&mut q, false, "sh /bench.sh net-sink")?;
    collect_until(&mut q, Some("vm1"), "net-sink", STEP_TIMEOUT, &mut facts)?;
    focus(&mut q, "vm0").map_err(qe)?;
    let mib = ctx.opts.net_mib;
    let cmd = format!("net-send {} {mib}", VM_IPS[1]);
    let (f, d) = workload(
        &mut q,
        Some("vm0"),
        &["vm0", "vm1"],
        &cmd,
        "net",
        Duration::from_secs(300),
    )?;
    let sent = num(&f, "net-bytes")?;
    let got = num(&f, "net-received")?;
    if got != sent {
        return Err(format!("vm1 received {got} bytes of the {sent} vm0 sent"));
    }
    res.add(
        "net",
        col,
        rep,
        sent / 1048576.0 / (num(&f, "net-us")? / 1e6),
    );
    res.add("ping", col, rep, num(&f, "ping-avg-ms")?);
    for (vm, row) in [("vm0", "net-tx"), ("vm1", "net-rx")] {
        if let Some(d) = d.get(vm) {
            res.add_count(row, col, f64::from(mib), d.clone());
        }
    }
    two_vms_dma(&mut q, col, rep, ctx, res)
}

/// Binds PCI function `bdf` of the focused guest (`vm`, or the one guest) to the kernel's
/// dma_map_benchmark driver and checks it sits in the IOMMU domain the setup `col` gives.
fn dma_setup(q: &mut Qemu, vm: Option<&str>, bdf: &str, col: Col) -> R<()> {
    let mut facts = Facts::new();
    type_command(q, vm.is_none(), &format!("sh /bench.sh dma-setup {bdf}"))?;
    collect_until(q, vm, "dma-domain", STEP_TIMEOUT, &mut facts)?;
    let bound = facts.get("dma-bound").map_or("", String::as_str);
    let domain = facts.get("dma-domain").map_or("", String::as_str);
    if bound != "dma_map_benchmark" || !domain_ok(col, domain) {
        return Err(format!(
            "{} {bdf} for dma_map_benchmark: bound to {bound:?}, IOMMU domain {domain:?}",
            vm.unwrap_or("the guest's")
        ));
    }
    Ok(())
}

/// DMA map/unmap in vm0 alone, then in vm0 and vm1 at the same time: what one VM's IOMMU
/// traffic costs another's (the physical command queue is the one thing they share).
fn two_vms_dma(q: &mut Qemu, col: Col, rep: usize, ctx: &Ctx, res: &mut Results) -> R<()> {
    // The NICs, done with the transfer, go to dma_map_benchmark; vm0 keeps the focus.
    for (vm, bdf) in [("vm1", "00:04.0"), ("vm0", "00:02.0")] {
        focus(q, vm).map_err(qe)?;
        dma_setup(q, Some(vm), bdf, col)?;
    }
    let secs = ctx.opts.dma_seconds;
    let args = format!("dma 1 1 {secs}");
    let cmd = format!("sh /bench.sh {args}");
    let key = "dma-t1-g1";
    let timeout = Duration::from_secs(u64::from(secs) * 4 + 120);
    let pair_us = |f: &Facts| -> R<f64> {
        Ok(num(f, &format!("{key}-map-us"))? + num(f, &format!("{key}-unmap-us"))?)
    };

    let (f, _) = workload(q, Some("vm0"), &[], &args, key, timeout)?;
    let alone = pair_us(&f)?;
    res.add("dma2-alone", col, rep, alone);

    // Both wait at their handshake; each is let go with its own Enter, vm1 first.
    let mut facts = [Facts::new(), Facts::new()];
    for (i, vm) in ["vm1", "vm0"].iter().enumerate() {
        focus(q, vm).map_err(qe)?;
        type_command(q, false, &cmd)?;
        collect_until(q, Some(vm), "ready", STEP_TIMEOUT, &mut facts[1 - i])?;
    }
    let before = vsmmu_counters(q, &["vm0", "vm1"])?;
    focus(q, "vm1").map_err(qe)?;
    let start = Instant::now();
    q.send("\n").map_err(qe)?;
    focus(q, "vm0").map_err(qe)?;
    q.send("\n").map_err(qe)?;
    let skew = start.elapsed().as_secs_f64();
    for (i, vm) in ["vm0", "vm1"].iter().enumerate() {
        collect_until(q, Some(vm), "measured", timeout, &mut facts[i])?;
    }
    let after = vsmmu_counters(q, &["vm0", "vm1"])?;
    for vm in ["vm0", "vm1"] {
        focus(q, vm).map_err(qe)?;
        q.send("\n").map_err(qe)?;
        collect_until(q, Some(vm), "end", STEP_TIMEOUT, &mut Facts::new())?;
    }
    let both = pair_us(&facts[0])?;
    res.add("dma2-both", col, rep, both);
    res.add("dma2-other", col, rep, pair_us(&facts[1])?);
    res.add("dma2-ratio", col, rep, both / alone);
    // Out of a run of `secs` seconds, the part the two did not overlap.
    res.add("dma2-skew", col, rep, skew / f64::from(secs));
    for (vm, row) in [("vm0", "dma2-vm0"), ("vm1", "dma2-vm1")] {
        if let (Some(b), Some(a)) = (before.get(vm), after.get(vm)) {
            let d = delta(b, a);
            let ops = d.get("syncs").copied().unwrap_or(0) as f64;
            res.add_count(row, col, ops, d);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The machine and the run's provenance.

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn cpu_model() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "CPU part").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}

/// QEMU processes running now (other jobs', when none of ours is).
fn qemu_processes() -> usize {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with("qemu-system"))
        })
        .count()
}

fn sha256(path: &Path) -> String {
    command_line("sha256sum", &[&path.display().to_string()])
        .split_whitespace()
        .next()
        .unwrap_or("unknown")
        .to_string()
}

/// Makes the private disk copies from the board's images (made by the board script when missing).
fn private_disks(dir: &Path) -> R<[PathBuf; 2]> {
    let board = repo_root().join("build/disks");
    let src0 = board.join("vm0.img");
    if !src0.exists() {
        eprintln!("[bench] making build/disks/vm0.img with qemu/board-virt.sh --bare --pci");
        let dtb = dir.join("dump.dtb");
        let _ = Command::new(repo_root().join("qemu/board-virt.sh"))
            .args(["--bare", "--pci", "--dumpdtb"])
            .arg(&dtb)
            .output();
    }
    let src1 = board.join("vm1.img");
    let src1 = if src1.exists() { src1 } else { src0.clone() };
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = [dir.join("vm0.img"), dir.join("vm1.img")];
    for (src, dst) in [&src0, &src1].into_iter().zip(out.iter_mut()) {
        fs::copy(src, &*dst).map_err(|e| format!("copying {}: {e}", src.display()))?;
    }
    Ok(out)
}

/// Checks that the board script still gives `--pci`'s functions the arguments [`pci_devices`]
/// copies (it prints its QEMU command line before exec).
fn check_board_pci(guest: &Path, dir: &Path) -> Option<String> {
    let out = Command::new(repo_root().join("qemu/board-virt.sh"))
        .args(["--bare", "--pci", "--guest"])
        .arg(guest)
        .arg("--dumpdtb")
        .arg(dir.join("check.dtb"))
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("[board-virt] bare guest"))?;
    let board: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.contains("vm0disk") || w.contains("vm0net"))
        .collect();
    let mine = pci_devices(&[PathBuf::from("DISK")]);
    let mine: Vec<&str> = mine
        .iter()
        .map(String::as_str)
        .filter(|w| w.contains("vm0disk") || w.contains("vm0net"))
        .collect();
    let norm = |w: &str| match w.split_once(",file=") {
        Some((a, _)) => a.to_string(),
        None => w.to_string(),
    };
    let same =
        board.len() == mine.len() && board.iter().zip(&mine).all(|(a, b)| norm(a) == norm(b));
    (!same).then(|| {
        format!(
            "the board script's --pci devices differ from the benchmark's copy: board {board:?}, bench {mine:?}"
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The tables.

#[derive(Debug)]
struct Row {
    key: String,
    label: String,
    higher_better: bool,
}

fn rows(o: &Opts) -> Vec<Row> {
    let row = |key: &str, label: String, higher_better: bool| Row {
        key: key.to_string(),
        label,
        higher_better,
    };
    let mut r = vec![
        row(
            "boot",
            "boot to init (s): QEMU's exec to `guest: init started`".to_string(),
            false,
        ),
        row(
            "boot-load",
            "of which the hypervisor loading the VM (its `loaded in N ms`) (s)".to_string(),
            false,
        ),
        row(
            "boot-less-load",
            "boot to init less that load (s)".to_string(),
            false,
        ),
        row(
            "boot-kernel",
            "the guest kernel's own clock at `Run /init` (s)".to_string(),
            false,
        ),
        row(
            "seq",
            format!(
                "sequential read, 1 MiB O_DIRECT, {} MiB (MiB/s)",
                o.seq_passes * 8
            ),
            true,
        ),
        row(
            "4k",
            format!(
                "4 KiB O_DIRECT reads, one dd, {} reads (IOPS)",
                o.k4_passes * 2048
            ),
            true,
        ),
        row(
            "rand",
            format!(
                "random 4 KiB O_DIRECT reads, one dd each, {} reads (IOPS)",
                o.rand_reads
            ),
            true,
        ),
        row(
            "rand-spawn",
            "the same dd loop on /dev/zero, no device: cost of one dd (µs)".to_string(),
            false,
        ),
    ];
    for (t, g) in DMA_CONFIGS {
        let k = format!("dma-t{t}-g{g}");
        for (part, what) in [("map", "map"), ("unmap", "unmap"), ("pair", "map + unmap")] {
            r.push(row(
                &format!("{k}-{part}"),
                format!("dma_map_benchmark -t {t} -g {g}: {what} (µs)"),
                false,
            ));
        }
    }
    if o.net {
        r.push(row(
            "boot2",
            "two VMs: boot to init of the later (s)".to_string(),
            false,
        ));
        r.push(row(
            "boot2-less-load",
            "two VMs: the same less the hypervisor's load of the VMs (s)".to_string(),
            false,
        ));
        r.push(row(
            "net",
            format!("guest-to-guest TCP (busybox nc), {} MiB (MiB/s)", o.net_mib),
            true,
        ));
        r.push(row(
            "ping",
            "guest-to-guest ping RTT, 1400 bytes (ms)".to_string(),
            false,
        ));
        r.push(row(
            "dma2-alone",
            "two VMs: vm0's dma_map_benchmark -t 1 -g 1 map + unmap, vm1 idle (µs)".to_string(),
            false,
        ));
        r.push(row(
            "dma2-both",
            "two VMs: the same while vm1 runs it too (µs)".to_string(),
            false,
        ));
        r.push(row(
            "dma2-other",
            "two VMs: vm1's figure meanwhile (µs)".to_string(),
            false,
        ));
        r.push(row(
            "dma2-ratio",
            "two VMs: vm0 with vm1 busy / vm0 alone, per boot (ratio)".to_string(),
            false,
        ));
        r.push(row(
            "dma2-skew",
            "two VMs: start of vm0's run after vm1's, as a share of the run".to_string(),
            false,
        ));
    }
    r
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `median [min–max]` of `vals` (just the value if there is one); "—" if none.
fn cell(vals: &[f64]) -> String {
    let mut v: Vec<f64> = vals.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => "—".to_string(),
        1 => fmt_num(v[0]),
        n => {
            let med = if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            };
            format!("{} [{}–{}]", fmt_num(med), fmt_num(v[0]), fmt_num(v[n - 1]))
        }
    }
}

/// Per-repeat ratios `a/b` of a metric (repeats where both columns have a sample).
fn ratios(samples: &BTreeMap<Col, Vec<(usize, f64)>>, a: Col, b: Col) -> Vec<f64> {
    let (Some(av), Some(bv)) = (samples.get(&a), samples.get(&b)) else {
        return Vec::new();
    };
    av.iter()
        .filter_map(|&(rep, x)| {
            let (_, y) = bv.iter().find(|&&(r, _)| r == rep)?;
            (*y != 0.0).then(|| x / y)
        })
        .collect()
}

fn figures_table(res: &Results, o: &Opts) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | better | bare | vSMMU | stage-2 only | vSMMU/bare | vSMMU/s2 |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    for row in rows(o) {
        let Some(samples) = res.samples.get(&row.key) else {
            continue;
        };
        let col = |c: Col| -> String {
            if c == Col::Bare {
                match row.key.as_str() {
                    "boot2" | "boot2-less-load" | "net" | "ping" | "dma2-alone" | "dma2-both"
                    | "dma2-other" | "dma2-ratio" | "dma2-skew" => {
                        return "n/a (one guest)".to_string()
                    }
                    "boot-load" => return "n/a".to_string(),
                    _ => {}
                }
            }
            let v: Vec<f64> = samples
                .get(&c)
                .map(|v| v.iter().map(|&(_, x)| x).collect())
                .unwrap_or_default();
            cell(&v)
        };
        let ratio = |b: Col| -> String {
            let r = ratios(samples, Col::Vsmmu, b);
            if r.is_empty() {
                "—".to_string()
            } else {
                format!("×{}", cell(&r))
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            if row.higher_better { "higher" } else { "lower" },
            col(Col::Bare),
            col(Col::Vsmmu),
            col(Col::S2),
            ratio(Col::Bare),
            ratio(Col::S2)
        );
    }
    s
}

/// A per-operation count over the repeats: the value if they all agree (to 0.001), else
/// `min–max`.
fn count_cell(vals: &[f64]) -> String {
    let mut v: Vec<f64> = vals.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "—".to_string();
    }
    v.sort_by(f64::total_cmp);
    let (lo, hi) = (fmt_num(v[0]), fmt_num(v[v.len() - 1]));
    if lo == hi {
        lo
    } else {
        format!("{lo}–{hi}")
    }
}

fn counts_table(res: &Results, o: &Opts) -> String {
    let mut s = String::new();
    let mut rows: Vec<(String, String, &str)> = vec![
        (
            "seq".into(),
            format!("sequential read, 1 MiB O_DIRECT, {} MiB", o.seq_passes * 8),
            "MiB",
        ),
        ("4k".into(), "4 KiB O_DIRECT reads, one dd".into(), "read"),
        (
            "rand".into(),
            "random 4 KiB O_DIRECT reads, one dd each".into(),
            "read",
        ),
    ];
    for (t, g) in DMA_CONFIGS {
        rows.push((
            format!("dma-t{t}-g{g}"),
            format!("dma_map_benchmark -t {t} -g {g}"),
            "map+unmap (= guest CMD_SYNC)",
        ));
    }
    if o.net {
        rows.push((
            "net-tx".into(),
            "guest-to-guest TCP: vm0, sending".into(),
            "MiB",
        ));
        rows.push((
            "net-rx".into(),
            "guest-to-guest TCP: vm1, receiving".into(),
            "MiB",
        ));
        for vm in ["vm0", "vm1"] {
            rows.push((
                format!("dma2-{vm}"),
                format!("two VMs' dma_map_benchmark -t 1 -g 1 at once: {vm}"),
                "map+unmap (= guest CMD_SYNC)",
            ));
        }
    }
    let _ = writeln!(
        s,
        "| workload | op | ops measured (vSMMU) | traps/op | CMDQ_PROD writes/op | CMDQ_CONS reads/op | other register traps/op | guest commands/op | guest CMD_SYNCs/op | physical commands per guest command | physical CMD_SYNCs per guest CMD_SYNC | traps/op, stage-2 only |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (key, label, op) in rows {
        let Some(cols) = res.counts.get(&key) else {
            continue;
        };
        let v = cols.get(&Col::Vsmmu).map(Vec::as_slice).unwrap_or(&[]);
        let get = |d: &Delta, k: &str| d.get(k).copied().unwrap_or(0) as f64;
        let per = |f: &dyn Fn(&Delta) -> f64| -> String {
            count_cell(
                &v.iter()
                    .map(|(ops, d)| if *ops > 0.0 { f(d) / ops } else { f64::NAN })
                    .collect::<Vec<_>>(),
            )
        };
        let ratio = |num: &dyn Fn(&Delta) -> f64, den: &str| -> String {
            count_cell(
                &v.iter()
                    .map(|(_, d)| num(d) / get(d, den))
                    .collect::<Vec<_>>(),
            )
        };
        let ops: Vec<f64> = v.iter().map(|(ops, _)| *ops).collect();
        let s2 = cols.get(&Col::S2).map(Vec::as_slice).unwrap_or(&[]);
        let s2_traps = if s2.is_empty() {
            "—".to_string()
        } else if s2.iter().all(|(_, d)| get(d, "traps") == 0.0) {
            "0".to_string()
        } else {
            count_cell(
                &s2.iter()
                    .map(|(ops, d)| {
                        // The stage-2-only guest issues no CMD_SYNC per DMA map: per the
                        // vSMMU setup's op count of the same repeat would mislead; totals.
                        if key.starts_with("dma") {
                            get(d, "traps")
                        } else {
                            get(d, "traps") / ops
                        }
                    })
                    .collect::<Vec<_>>(),
            ) + if key.starts_with("dma") {
                " (total)"
            } else {
                ""
            }
        };
        let _ = writeln!(
            s,
            "| {label} | {op} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&ops),
            per(&|d| get(d, "traps")),
            per(&|d| get(d, "cmdq_prod")),
            per(&|d| get(d, "cmdq_cons")),
            per(&|d| get(d, "traps") - get(d, "cmdq_prod") - get(d, "cmdq_cons")),
            per(&|d| get(d, "commands")),
            per(&|d| get(d, "syncs")),
            ratio(
                &|d| get(d, "phys_commands") + get(d, "phys_syncs"),
                "commands"
            ),
            ratio(&|d| get(d, "phys_syncs"), "syncs"),
            s2_traps,
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(opts, &args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs everything; `Ok(false)` if some boot failed (the table has what the others measured).
fn run(opts: Opts, args: &[String]) -> R<bool> {
    let started = Instant::now();
    let root = repo_root();
    let guest = fs::canonicalize(modular_guest_dir()).map_err(|e| {
        format!(
            "{}: {e} (run qemu/kernel.sh)",
            modular_guest_dir().display()
        )
    })?;
    let kver = guest_kver(&guest).map_err(|e| e.to_string())?;
    let hv_bin = root.join("build/hypervisor.bin");
    if !hv_bin.exists() {
        return Err("no build/hypervisor.bin (run qemu/build.sh)".to_string());
    }
    let work = target_dir().join("bench");
    let disks = private_disks(&work.join("disks"))?;
    let mut warnings = Vec::new();
    if let Some(w) = check_board_pci(&guest, &work) {
        eprintln!("[bench] warning: {w}");
        warnings.push(w);
    }
    let hv_hash = sha256(&hv_bin);
    let ctx = Ctx {
        opts: opts.clone(),
        guest: guest.clone(),
        disks,
    };
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_start = loadavg();
    let command = std::env::var("BENCH_COMMAND").unwrap_or_else(|_| {
        let mut c = "cargo run --release -p integration-tests --bin bench --".to_string();
        for a in args {
            c.push(' ');
            c.push_str(a);
        }
        c
    });

    let out = opts
        .out
        .as_ref()
        .map(|o| match std::env::var_os("BENCH_CWD") {
            Some(cwd) if o.is_relative() => PathBuf::from(cwd).join(o),
            _ => o.clone(),
        });
    let mut res = Results::default();
    let mut others_max = 0;
    let mut others_boots = 0;
    let mut hv_changed = Vec::new();
    let mut nboot = 0;
    for rep in 0..opts.repeats {
        let mut plan: Vec<Boot> = opts.singles.iter().map(|&c| Boot::Single(c)).collect();
        if !plan.is_empty() {
            let n = plan.len();
            plan.rotate_left(rep % n);
        }
        if opts.net {
            let mut pairs = vec![Boot::Pair(Col::Vsmmu), Boot::Pair(Col::S2)];
            pairs.rotate_left(rep % 2);
            plan.extend(pairs);
        }
        for boot in plan {
            nboot += 1;
            let name = format!("bench-{}-r{}", boot.name(), rep + 1);
            let others = qemu_processes();
            others_max = others_max.max(others);
            if others > 0 {
                others_boots += 1;
            }
            let h = sha256(&hv_bin);
            if h != hv_hash && boot.col() != Col::Bare {
                hv_changed.push(format!("{name}: {h}"));
            }
            eprintln!(
                "[bench] repeat {}/{}: {} (boot {nboot}, {:.0} s into the run, load {}, other QEMUs {others})",
                rep + 1,
                opts.repeats,
                boot.name(),
                started.elapsed().as_secs_f64(),
                loadavg()
            );
            let t0 = Instant::now();
            let result = match boot {
                Boot::Single(c) => run_single(c, rep, &ctx, &mut res, &name),
                Boot::Pair(c) => run_pair(c, rep, &ctx, &mut res, &name),
            };
            let secs = t0.elapsed().as_secs_f64();
            let log = target_dir().join("qemu-logs").join(format!("{name}.log"));
            match result {
                Ok(()) => res.boots.push(format!(
                    "{name}: {secs:.0} s, other QEMU processes at its start: {others}"
                )),
                Err(e) => {
                    eprintln!("[bench] {name} FAILED: {e} (log: {})", log.display());
                    res.failures
                        .push(format!("{name}: {e} (log: {})", log.display()));
                    res.boots.push(format!("{name}: FAILED after {secs:.0} s"));
                }
            }
        }
    }
    let load_end = loadavg();

    let figures = figures_table(&res, &opts);
    let counts = counts_table(&res, &opts);
    println!("{figures}");
    println!("Exact counts (vSMMU setup; hypervisor counters read before and after each measured part):\n");
    println!("{counts}");
    if !res.failures.is_empty() {
        println!("Failed boots:");
        for f in &res.failures {
            println!("- {f}");
        }
    }

    if let Some(out) = &out {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Benchmark: the hypervisor's cost against bare Linux on the same QEMU\n"
        );
        let _ = writeln!(md, "- Command: `{command}`");
        let _ = writeln!(
            md,
            "- Date: {date}; the whole run took {:.1} min",
            started.elapsed().as_secs_f64() / 60.0
        );
        let _ = writeln!(
            md,
            "- Machine: {} CPUs ({}), host {}, {}",
            thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model(),
            command_line("uname", &["-sr"]),
            command_line("qemu-system-aarch64", &["--version"])
                .lines()
                .next()
                .unwrap_or("QEMU ?")
        );
        let _ = writeln!(
            md,
            "- Load average at the start: {load_start}; at the end: {load_end}. Other QEMU processes \
             (other jobs on this machine) running at the start of {others_boots} of the {nboot} boots, \
             at most {others_max} at once."
        );
        let _ = writeln!(
            md,
            "- Guest: {} (kernel {kver}), the modular guest of `qemu/kernel.sh`",
            guest.display()
        );
        let _ = writeln!(md, "- Hypervisor: build/hypervisor.bin, sha256 {hv_hash}");
        for w in warnings.iter().chain(&hv_changed) {
            let _ = writeln!(md, "- **Warning**: {w}");
        }
        if !hv_changed.is_empty() {
            let _ = writeln!(
                md,
                "- **Warning**: build/hypervisor.bin changed during the run (another build); the boots above ran another binary"
            );
        }
        let _ = writeln!(
            md,
            "- Repeats: {} of each setup, the setups in a rotated order in each repeat; \
             dma_map_benchmark runs of {} s",
            opts.repeats, opts.dma_seconds
        );
        let _ = writeln!(md, "\n## Setups\n");
        let _ = writeln!(
            md,
            "Each boot is `qemu/board-virt.sh ARGS -- DEVICES`, `--guest G` being build/guest/modular \
             as it was at the start (the cache directory it links to, above). DEVICES are VM i's virtio \
             disk and NIC as `--pci` gives them, but with private copies of its disk images \
             (build/disks/vmN.img, copied to {}): QEMU locks a disk image, and the board's own would \
             collide with any `--pci` test running in the same checkout. All setups have the same \
             machine: QEMU virt with its SMMUv3, `-cpu max`, 2 CPUs (4 for two VMs), 4 GiB; each VM \
             has 2 vCPUs and 1 GiB.\n",
            ctx.disks[0].parent().map_or(String::new(), |d| d.display().to_string())
        );
        let setups = [
            (Boot::Single(Col::Bare), "bare"),
            (Boot::Single(Col::Vsmmu), "vSMMU"),
            (Boot::Single(Col::S2), "stage-2 only"),
            (Boot::Pair(Col::Vsmmu), "two VMs, vSMMU"),
            (Boot::Pair(Col::S2), "two VMs, stage-2 only"),
        ];
        for (b, label) in setups {
            if matches!(b, Boot::Pair(_)) && !opts.net {
                continue;
            }
            let guest_arg = ctx.guest.display().to_string();
            let a: Vec<String> = ctx
                .args(b)
                .into_iter()
                .take_while(|w| w != "--")
                .map(|w| {
                    if w == guest_arg {
                        "G".to_string()
                    } else if w.contains(' ') {
                        format!("'{w}'")
                    } else {
                        w
                    }
                })
                .collect();
            let _ = writeln!(md, "- {label}: `{}`", a.join(" "));
        }
        let devices = pci_devices(&ctx.disks);
        let _ = writeln!(
            md,
            "\nDEVICES (vm1's only with two VMs): `{}`",
            devices.join(" ")
        );
        let _ = writeln!(
            md,
            "\nWhat the guests reported (`sh /bench.sh info`, first boot of each):\n"
        );
        for (setup, facts) in &res.facts {
            let f: Vec<String> = facts
                .iter()
                .filter(|(k, _)| k.starts_with("iommu-domain") || *k == "clock" || *k == "cmdline")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(md, "- {setup}: {}", f.join("; "));
        }
        let _ = writeln!(
            md,
            "\n## Figures\n\nmedian [min–max] over the repeats; a ratio is taken within each repeat, \
             then summarised the same way. Times are the guests' own clocks.\n\n{READING}"
        );
        md.push_str(&figures);
        let _ = writeln!(
            md,
            "\n## Exact counts\n\nThe vSMMU setup's counters (Ctrl-\\ s), read at the guest's handshakes \
             just before and just after each measured part: each column is a counter's difference \
             divided by the operations the guest did (every repeat's quotient; one value when all \
             agree). dma_map_benchmark does not report its iteration count: with strict invalidation \
             Linux issues exactly one CMD_SYNC per `dma_unmap` and no command per `dma_map`, so the \
             guest's CMD_SYNCs over the run are its map+unmap pairs (nothing else does DMA meanwhile: \
             the disk is idle and the NIC is the benchmark's). \"Physical commands\" counts what the \
             hypervisor submitted to the physical SMMU on the guest's behalf, CMD_SYNCs included.\n"
        );
        md.push_str(&counts);
        if !res.failures.is_empty() {
            let _ = writeln!(md, "\n## Failed boots\n");
            for f in &res.failures {
                let _ = writeln!(md, "- {f}");
            }
        }
        let _ = writeln!(md, "\n## Boots\n");
        for b in &res.boots {
            let _ = writeln!(md, "- {b}");
        }
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        fs::write(out, md).map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("[bench] wrote {}", out.display());
    }
    eprintln!(
        "[bench] {nboot} boots in {:.1} min, {} failed",
        started.elapsed().as_secs_f64() / 60.0,
        res.failures.len()
    );
    Ok(res.failures.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> Line {
        Line {
            text: text.to_string(),
            at: Duration::ZERO,
            stream: integration_tests::Stream::Stdout,
        }
    }

    #[test]
    fn parsers() {
        assert_eq!(bench_fact("bench: seq-us=1234"), Some(("seq-us", "1234")));
        assert_eq!(
            bench_fact("[vm0] bench: ready=dma-t1-g1\r"),
            Some(("ready", "dma-t1-g1"))
        );
        assert_eq!(bench_fact("/ # sh /bench.sh seq 64"), None);
        assert_eq!(bench_fact("bench: no value"), None);
        let lines = [
            line("[vm0] [    0.000000] Linux version 6.12"),
            line("[hv] vm0: boot 1: 2 vCPUs on pCPUs [0, 1], RAM IPA 0x40000000+0x40000000 at PA 0x100000000, kernel at 0x40000000, DTB at 0x40800000, loaded in 518 ms, starting"),
            line("[vm0] [    0.333946] Run /init as init process"),
        ];
        assert_eq!(kernel_init_time(&lines), Some(0.333946));
        assert_eq!(vm_load_ms(&lines, "vm0"), Some(518.0));
        assert_eq!(vm_load_ms(&lines, "vm1"), None);
        assert_eq!(kernel_init_time(&lines[..1]), None);
    }

    #[test]
    fn summaries() {
        assert_eq!(cell(&[]), "—");
        assert_eq!(cell(&[2.0]), "2.000");
        assert_eq!(cell(&[3.0, 1.0, 2.0]), "2.000 [1.000–3.000]");
        assert_eq!(count_cell(&[4.0, 4.0]), "4.000");
        assert_eq!(count_cell(&[0.998, 1.0]), "0.998–1.000");
        let mut s = BTreeMap::new();
        s.insert(Col::Vsmmu, vec![(0, 10.0), (1, 12.0)]);
        s.insert(Col::Bare, vec![(1, 6.0), (0, 5.0), (2, 7.0)]);
        assert_eq!(ratios(&s, Col::Vsmmu, Col::Bare), vec![2.0, 2.0]);
        assert!(ratios(&s, Col::Vsmmu, Col::S2).is_empty());
    }

    #[test]
    fn options_and_setups() {
        let o = Opts::parse(&["--setups".into(), "s2,net,bare".into()]).unwrap();
        assert_eq!(o.singles, vec![Col::Bare, Col::S2]);
        assert!(o.net);
        assert!(Opts::parse(&["--setups".into(), "kvm".into()]).is_err());
        assert!(Opts::parse(&["--repeats".into(), "0".into()]).is_err());
        let ctx = Ctx {
            opts: o,
            guest: PathBuf::from("/g"),
            disks: [PathBuf::from("/d/vm0.img"), PathBuf::from("/d/a,b.img")],
        };
        let a = ctx.args(Boot::Single(Col::S2));
        assert!(a.contains(&"console=ttyAMA0 rdinit=/init iommu.passthrough=1".to_string()));
        assert!(!a.iter().any(|w| w.contains("vm1")));
        let a = ctx.args(Boot::Pair(Col::Vsmmu));
        assert!(a.contains(&"if=none,id=vm1disk,format=raw,file=/d/a,,b.img".to_string()));
        assert!(a
            .iter()
            .any(|w| w.contains("addr=4.0") && w.contains(":11,")));
    }
}

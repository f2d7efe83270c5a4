//! The benchmark behind `qemu/bench.sh` (issue 7; the virtio-iommu setups: issue 16): what the
//! hypervisor costs a Linux guest, measured side by side in one run on one machine.
//!
//! It boots the same modular guest kernel (`build/guest/modular`, from `qemu/kernel.sh`) on
//! QEMU's `virt` in up to seven setups ([`Col`]), each with the same two PCI functions (a virtio
//! disk at 00:01.0 and a virtio NIC at 00:02.0) and two CPUs:
//!
//! 1. bare: Linux directly on QEMU, its arm-smmu-v3 driver doing stage 1 on QEMU's SMMU;
//! 2. vSMMU: Linux as the one VM of the hypervisor, its stage 1 on the emulated SMMU (traps),
//!    nested over the hypervisor's stage 2 in the physical SMMU;
//! 3. stage-2 only: the same VM with `iommu.passthrough=1` (identity domains: no vIOMMU work);
//! 4. and 5. the vSMMU VM with INTx only, and on GICv4;
//! 6. virtio-iommu: the same VM with the hypervisor's virtio-iommu instead of the vSMMU (its
//!    virtio_iommu driver's requests, one trap each, on tables the hypervisor owns);
//! 7. bare with QEMU's virtio-iommu-pci (no SMMU): what a VMM's user would pick instead;
//!
//! and, unless `--no-net`, two VMs for a guest-to-guest transfer (vSMMU and stage-2 only; bare
//! has one guest). In each, it types `sh /bench.sh WORKLOAD` into the guest shell
//! (`tests/guest/bench.sh`, in the initramfs) and reads its `bench: KEY=VALUE` lines; under the
//! hypervisor it reads the vSMMU or virtio-iommu counters (the monitor's `stats raw`) at the handshakes around
//! each measured part, for exact trap, request and command counts per operation. Every repeat
//! boots every setup, in a rotated order, so drift hits all alike; figures are min/median/max
//! over the repeats and ratios are taken within a repeat.
//!
//! The disks are private copies (under the cargo target directory) of `build/disks/vm0.img` and
//! `vm1.img`, given to QEMU exactly as the board script's `--pci` gives them: QEMU locks a disk
//! image, so the board's own would collide with any `--pci` test running in the same checkout.
//!
//! `bench --help` lists the options. Progress goes to stderr; the table to stdout and, with
//! `--out FILE`, to a Markdown file with the machine, the date and the command line.

#![forbid(unsafe_code)]

mod boots;
mod guest;
mod machine;
mod opts;
mod report;
mod setup;
mod stats;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Instant;

use boots::{run_pair, run_single};
use integration_tests::{guest_kver, modular_guest_dir, repo_root, target_dir, Error};
use machine::{command_line, cpu_model, loadavg, qemu_processes, sha256};
use opts::{Opts, USAGE};
use report::{
    counts_table, figures_table, profile_table, shown_cols, viommu_counts_table, which_to_pick,
    READING,
};
use setup::{check_board_pci, pci_devices, private_disks, Boot, Col, Ctx};
use stats::Results;

type R<T> = Result<T, String>;

fn qe(e: Error) -> String {
    e.to_string()
}

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
            if h != hv_hash && !boot.col().is_bare() {
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
    let cols = shown_cols(&opts);
    let counts = if cols.contains(&Col::Vsmmu) {
        counts_table(&res, &opts)
    } else {
        String::new()
    };
    let vcounts = viommu_counts_table(&res, &opts);
    let pick = (cols.contains(&Col::Viommu) || cols.contains(&Col::BareViommu))
        .then(|| which_to_pick(&res));
    println!("{figures}");
    if !counts.is_empty() {
        println!("Exact counts (vSMMU setup; hypervisor counters read before and after each measured part):\n");
        println!("{counts}");
    }
    if !vcounts.is_empty() {
        println!("Exact counts (virtio-iommu setup):\n");
        println!("{vcounts}");
    }
    let profile = profile_table(&res, &opts);
    if !profile.is_empty() {
        println!("Trap profile (ns per exit, by stage, from the generic counter in EL2; median [min–max] over the repeats):\n");
        println!("{profile}");
    }
    if let Some(p) = &pick {
        println!("Which to pick:\n\n{p}");
    }
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
        if let Some(b) = &opts.baseline {
            let _ = writeln!(
                md,
                "- Baseline hypervisor (the column \"vSMMU, baseline\"): {}, sha256 {}",
                b.display(),
                sha256(b)
            );
        }
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
             has 2 vCPUs and 1 GiB. The one exception is bare with virtio-iommu-pci \
             (`--bare-iommu virtio-iommu`): no SMMU (QEMU takes one IOMMU or the other), QEMU's \
             virtio-iommu-pci at 00:05.0 instead, created before the functions; its guest's init \
             loads virtio_iommu on seeing that function (1af4:1057), the hypervisor's virtio-iommu \
             VM's because its DT's /chosen/hypervisor,iommu says so.\n",
            ctx.disks[0].parent().map_or(String::new(), |d| d.display().to_string())
        );
        let setups = [
            (Boot::Single(Col::Bare), "bare"),
            (Boot::Single(Col::Vsmmu), "vSMMU"),
            (
                Boot::Single(Col::VsmmuBase),
                "vSMMU on the baseline image (--baseline)",
            ),
            (Boot::Single(Col::S2), "stage-2 only"),
            (
                Boot::Single(Col::VsmmuIntx),
                "vSMMU with INTx (smmu-hv,intx-only)",
            ),
            (Boot::Single(Col::VsmmuV4), "vSMMU on GICv4"),
            (
                Boot::Single(Col::Viommu),
                "virtio-iommu (smmu-hv,iommu = \"virtio-iommu\")",
            ),
            (
                Boot::Single(Col::BareViommu),
                "bare, QEMU's virtio-iommu-pci",
            ),
            (
                Boot::Single(Col::BarePrealloc),
                "bare, the host's RAM for QEMU preallocated (`-mem-prealloc`)",
            ),
            (
                Boot::Single(Col::VsmmuPrealloc),
                "vSMMU, the host's RAM for QEMU preallocated (`-mem-prealloc`)",
            ),
            (Boot::Pair(Col::Vsmmu), "two VMs, vSMMU"),
            (Boot::Pair(Col::S2), "two VMs, stage-2 only"),
        ];
        for (b, label) in setups {
            let run = match b {
                Boot::Single(c) => opts.singles.contains(&c),
                Boot::Pair(_) => opts.net,
            };
            if !run {
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
                .filter(|(k, _)| {
                    k.starts_with("iommu-domain")
                        || ["clock", "cmdline", "modules"].contains(&k.as_str())
                })
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
        if !counts.is_empty() || !vcounts.is_empty() {
            let _ = writeln!(
                md,
                "\n## Exact counts\n\nThe hypervisor's counters (the monitor's `stats raw`), read at the guest's \
                 handshakes just before and just after each measured part: each column is a \
                 counter's difference divided by the operations the guest did (every repeat's \
                 quotient; one value when all agree). dma_map_benchmark does not report its \
                 iteration count; the counters give it (nothing else does DMA meanwhile: the disk \
                 is idle and the NIC is the benchmark's).\n"
            );
        }
        if !counts.is_empty() {
            let _ = writeln!(
                md,
                "The vSMMU setup: with strict invalidation Linux issues exactly one CMD_SYNC per \
                 `dma_unmap` and no command per `dma_map`, so the guest's CMD_SYNCs over the run \
                 are its map+unmap pairs. \"Physical commands\" counts what the hypervisor \
                 submitted to the physical SMMU on the guest's behalf, CMD_SYNCs included.\n"
            );
            md.push_str(&counts);
        }
        if !vcounts.is_empty() {
            let _ = writeln!(
                md,
                "\nThe virtio-iommu setup (its `viommu: vm0 stats:` line): each request is one \
                 trap, its QueueNotify, carried out inside it; Linux sends one MAP per `dma_map` \
                 and one UNMAP per `dma_unmap`, each followed by its notify, so the guest's UNMAP \
                 requests are its map+unmap pairs. \"Physical\" counts what the hypervisor \
                 submitted to the physical SMMU for them.\n"
            );
            md.push_str(&vcounts);
        }
        if !profile.is_empty() {
            let _ = writeln!(
                md,
                "\n## Trap profile\n\nThe hypervisor's trap profile (the monitor's `stats raw` \
                 `profile:` line: nanosecond sums per kind of exit and stage, from CNTPCT_EL0), read \
                 with the counters above: per workload and kind of exit, the exits per operation \
                 and the mean time per exit in each stage, from the vector's first instruction \
                 (save) to the ERET (exit). Stages: save and exit are the frame save and restore; \
                 decode the ESR_EL2 decode and routing; model the device model under its lock; \
                 submit the physical SMMU's queue and stream-table writes and CMDQ_PROD; wait its \
                 CMD_SYNC (or a budget); complete the guest's CMDQ_CONS, its CMD_SYNC MSI and \
                 interrupts; lr_sync the list registers. \"Outside EL2\" is the guest's own \
                 map+unmap time less the exits' time in EL2: the exception entry and return and \
                 what the guest itself does.\n"
            );
            md.push_str(&profile);
        }
        if let Some(p) = &pick {
            let _ = writeln!(md, "\n## Which to pick\n\n{p}");
        }
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

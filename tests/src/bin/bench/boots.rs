//! What each boot measures: one guest (boot time, disk, DMA map/unmap), and two VMs (boot
//! time, a guest-to-guest transfer, and one VM's DMA map/unmap with and without the other's).

use crate::guest::{
    check_iommu_driver, collect_until, delta, dma_setup, guest_modules, hv_counters, info,
    kernel_init_time, num, type_command, vm_gate_ms, vm_load_ms, wait_exec, workload, Facts,
};
use crate::setup::{Boot, Col, Ctx, VM_IPS};
use crate::stats::{dma_pairs, Results};
use crate::{qe, R};
use integration_tests::{focus, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT};
use std::time::{Duration, Instant};

/// The dma_map_benchmark runs: (threads, pages per mapping).
pub(crate) const DMA_CONFIGS: [(u32, u32); 4] = [(1, 1), (2, 1), (1, 4), (1, 16)];

/// One guest: boot time, disk, DMA map/unmap.
pub(crate) fn run_single(col: Col, rep: usize, ctx: &Ctx, res: &mut Results, name: &str) -> R<()> {
    let args = ctx.args(Boot::Single(col));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut q = Qemu::spawn_with_limit(name, &argv, Duration::from_secs(900)).map_err(qe)?;
    let mut exec = wait_exec(&mut q)?;
    if col.prealloc() {
        exec = start_paused(&mut q)?;
    }
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
    let shell = q.wait_for_line("guest: shell", STEP_TIMEOUT).map_err(qe)?;
    res.add("boot-shell", col, rep, (shell.at - exec.at).as_secs_f64());
    if let Some(ms) = vm_gate_ms(&q.lines(), "vm0") {
        res.add("boot-gate", col, rep, ms / 1e3);
    }
    let modules = guest_modules(&q.lines());
    check_iommu_driver(col, modules.as_deref())?;
    let mut facts = info(&mut q, None, col)?;
    if let Some(m) = modules {
        facts.insert("modules".to_string(), m.join(","));
    }
    res.facts.entry(col.label().to_string()).or_insert(facts);

    let hv: &[&str] = if col.is_bare() { &[] } else { &["vm0"] };
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
            let (pairs, traps) = dma_pairs(d);
            if pairs > 0.0 {
                res.add(&format!("{k}-traps"), col, rep, traps / pairs);
            }
            res.add_count(&k, col, pairs, d.clone());
        }
    }
    Ok(())
}

/// Lets a QEMU started paused (`-S`, with its RAM preallocated) run: `cont` at its monitor
/// (Ctrl-a c, the command, Ctrl-a c back to the console). QEMU reads it only after allocating
/// the RAM; its monitor's banner is the machine's start.
fn start_paused(q: &mut Qemu) -> R<integration_tests::Line> {
    q.send("\x01c").map_err(qe)?;
    let banner = q
        .wait_for_line("monitor - type 'help'", Duration::from_secs(300))
        .map_err(qe)?;
    q.send("cont\n").map_err(qe)?;
    q.send("\x01c").map_err(qe)?;
    Ok(banner)
}

/// Two VMs: boot time of both, vm0 sending to vm1 over their NICs.
pub(crate) fn run_pair(col: Col, rep: usize, ctx: &Ctx, res: &mut Results, name: &str) -> R<()> {
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
    let before = hv_counters(q, &["vm0", "vm1"])?;
    focus(q, "vm1").map_err(qe)?;
    let start = Instant::now();
    q.send("\n").map_err(qe)?;
    focus(q, "vm0").map_err(qe)?;
    q.send("\n").map_err(qe)?;
    let skew = start.elapsed().as_secs_f64();
    for (i, vm) in ["vm0", "vm1"].iter().enumerate() {
        collect_until(q, Some(vm), "measured", timeout, &mut facts[i])?;
    }
    let after = hv_counters(q, &["vm0", "vm1"])?;
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
            let (ops, _) = dma_pairs(&d);
            res.add_count(row, col, ops, d);
        }
    }
    Ok(())
}

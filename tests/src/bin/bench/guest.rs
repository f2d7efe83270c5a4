//! Talking to the guest's `tests/guest/bench.sh` and the hypervisor's console: typing a
//! workload and its handshakes, reading its `bench: KEY=VALUE` facts and the hypervisor's vSMMU
//! or virtio-iommu counters around the measured part, checking the IOMMU domains, and reading boot times off the log.

use crate::setup::Col;
use crate::stats::Delta;
use crate::{qe, R};
use integration_tests::{
    hv_text, parse_stats, parse_viommu_stats, raw_stats, type_paced, Error, Line, Qemu,
    STEP_TIMEOUT,
};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

/// A `bench: KEY=VALUE` line (anywhere in it): `(KEY, VALUE)`.
pub(crate) fn bench_fact(line: &str) -> Option<(&str, &str)> {
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

pub(crate) type Facts = BTreeMap<String, String>;

/// Collects the guest's `bench:` facts into `facts` until `bench: STOP=...`; returns its value.
pub(crate) fn collect_until(
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
pub(crate) fn type_command(q: &mut Qemu, one_guest: bool, cmd: &str) -> R<()> {
    if one_guest {
        q.wait_for_prompt("/ #", Duration::from_secs(20));
    } else {
        thread::sleep(Duration::from_millis(500));
    }
    type_paced(q, &format!("{cmd}\n")).map_err(qe)
}

/// The hypervisor's counters of `vms` (the monitor's `stats raw`), by VM: each VM's vIOMMU line (`vsmmu:` as
/// they are, or `viommu:` as `viommu_KEY`) with its trap profile (`prof_KEY`, nanosecond sums) and
/// vITS line (`vits_KEY`).
pub(crate) fn hv_counters(q: &mut Qemu, vms: &[&str]) -> R<BTreeMap<String, Delta>> {
    raw_stats(q).map_err(qe)?;
    let found = RefCell::new(BTreeMap::new());
    let extra: RefCell<BTreeMap<String, Delta>> = RefCell::new(BTreeMap::new());
    q.wait_until(
        &format!("the hypervisor's vSMMU or virtio-iommu stats lines of {vms:?}"),
        STEP_TIMEOUT,
        |l| {
            if let Some(t) = hv_text(l) {
                for vm in vms {
                    for (line, prefix) in [("vits", "vits_"), ("profile", "prof_")] {
                        if t.starts_with(&format!("{line}: {vm} stats: ")) {
                            extra
                                .borrow_mut()
                                .entry(vm.to_string())
                                .or_default()
                                .extend(parse_prefixed(t, prefix));
                        }
                    }
                    if let Some(mut d) = iommu_counters(t, vm) {
                        // The vITS line comes first (an INTx-only VM has none).
                        d.extend(extra.borrow_mut().remove(*vm).unwrap_or_default());
                        found.borrow_mut().insert(vm.to_string(), d);
                    }
                }
            }
            found.borrow().len() == vms.len()
        },
    )
    .map_err(qe)?;
    Ok(found.into_inner())
}

/// The counters of VM `vm`'s vIOMMU line (the text of a `[hv]` line): a vSMMU's as they are, a
/// virtio-iommu's as `viommu_KEY` (both have `phys_syncs`, `ste_writes`); `None` for any other
/// line.
pub(crate) fn iommu_counters(text: &str, vm: &str) -> Option<Delta> {
    if text.starts_with(&format!("vsmmu: {vm} stats: ")) {
        return Some(parse_stats(text));
    }
    if text.starts_with(&format!("viommu: {vm} stats: ")) {
        let d = parse_viommu_stats(text);
        return Some(
            d.into_iter()
                .map(|(k, v)| (format!("viommu_{k}"), v))
                .collect(),
        );
    }
    None
}

/// The numeric counters of a `vits: VM stats: delivery PATH, k=v ...` or `profile: VM stats:
/// ns sums, k=v ...` line, as `PREFIXk`.
fn parse_prefixed(text: &str, prefix: &str) -> Delta {
    text.split_whitespace()
        .filter_map(|f| {
            let (k, v) = f.split_once('=')?;
            Some((format!("{prefix}{k}"), v.parse().ok()?))
        })
        .collect()
}

pub(crate) fn delta(before: &Delta, after: &Delta) -> Delta {
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
pub(crate) fn workload(
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
        hv_counters(q, stat_vms)?
    };
    q.send("\n").map_err(qe)?;
    collect_until(q, vm, "measured", timeout, &mut facts)?;
    let after = if stat_vms.is_empty() {
        BTreeMap::new()
    } else {
        hv_counters(q, stat_vms)?
    };
    q.send("\n").map_err(qe)?;
    collect_until(q, vm, "end", STEP_TIMEOUT, &mut facts)?;
    let deltas = after
        .iter()
        .map(|(vm, a)| (vm.clone(), delta(&before[vm], a)))
        .collect();
    Ok((facts, deltas))
}

pub(crate) fn num(facts: &Facts, key: &str) -> R<f64> {
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
        Col::Bare
        | Col::Vsmmu
        | Col::VsmmuBase
        | Col::VsmmuIntx
        | Col::VsmmuV4
        | Col::Viommu
        | Col::BareViommu
        | Col::BarePrealloc
        | Col::VsmmuPrealloc => domain.starts_with("DMA"),
        Col::S2 => domain == "identity",
    }
}

/// The line of the board script just before it execs QEMU (its last one).
pub(crate) fn wait_exec(q: &mut Qemu) -> R<Line> {
    q.wait_until(
        "the board script's exec of QEMU",
        Duration::from_secs(120),
        |l| l.starts_with("[board-virt] bare guest") || l.starts_with("[board-virt] hypervisor,"),
    )
    .map_err(qe)
}

/// The guest kernel's own clock (its printk time stamp) when it started /init:
/// `[    0.333946] Run /init as init process` gives 0.333946.
pub(crate) fn kernel_init_time(lines: &[Line]) -> Option<f64> {
    lines.iter().find_map(|l| {
        let (stamp, _) = l.text.split_once("] Run /init as init process")?;
        let (_, secs) = stamp.rsplit_once('[')?;
        secs.trim().parse().ok()
    })
}

/// How long the hypervisor took to load VM `vm` (`[hv] vm0: boot 1: ... loaded in 518 ms, ...`).
pub(crate) fn vm_load_ms(lines: &[Line], vm: &str) -> Option<f64> {
    let prefix = format!("{vm}: boot ");
    lines.iter().find_map(|l| {
        let t = hv_text(&l.text)?.strip_prefix(&prefix)?;
        let (_, rest) = t.split_once(", loaded in ")?;
        rest.split_once(" ms")?.0.parse().ok()
    })
}

/// How long VM `vm`'s first Bus Master Enable waited for the rest of its RAM to be zeroed
/// (`[hv] vm0: bus mastering enabled by its guest: ... (900 MiB of it at the gate in 812 ms)`).
pub(crate) fn vm_gate_ms(lines: &[Line], vm: &str) -> Option<f64> {
    let prefix = format!("{vm}: bus mastering enabled by its guest: ");
    lines.iter().find_map(|l| {
        let t = hv_text(&l.text)?.strip_prefix(&prefix)?;
        let (_, rest) = t.split_once(" at the gate in ")?;
        rest.split_once(" ms")?.0.parse().ok()
    })
}

/// `sh /bench.sh info` in the focused guest: checks the IOMMU domains and the tool; returns the
/// facts.
pub(crate) fn info(q: &mut Qemu, vm: Option<&str>, col: Col) -> R<Facts> {
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

/// Binds PCI function `bdf` of the focused guest (`vm`, or the one guest) to the kernel's
/// dma_map_benchmark driver and checks it sits in the IOMMU domain the setup `col` gives.
pub(crate) fn dma_setup(q: &mut Qemu, vm: Option<&str>, bdf: &str, col: Col) -> R<()> {
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

/// The modules the guest's init loaded (`guest: modules=a,b,c`), if it said.
pub(crate) fn guest_modules(lines: &[Line]) -> Option<Vec<String>> {
    lines.iter().find_map(|l| {
        let (_, m) = l.text.split_once("guest: modules=")?;
        Some(m.trim().split(',').map(str::to_string).collect())
    })
}

/// The IOMMU driver the guest of setup `col` must have loaded.
pub(crate) fn iommu_driver(col: Col) -> &'static str {
    if col.is_viommu() {
        "virtio_iommu"
    } else {
        "arm_smmu_v3"
    }
}

/// Checks that the guest of `col` loaded its IOMMU driver (`modules`: [`guest_modules`]).
pub(crate) fn check_iommu_driver(col: Col, modules: Option<&[String]>) -> R<()> {
    let want = iommu_driver(col);
    match modules {
        Some(m) if m.iter().any(|x| x == want) => Ok(()),
        Some(m) => Err(format!(
            "the {} guest loaded {} but not {want}",
            col.label(),
            m.join(",")
        )),
        None => Err(format!(
            "the {} guest did not say which modules it loaded",
            col.label()
        )),
    }
}

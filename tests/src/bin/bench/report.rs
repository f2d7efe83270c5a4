//! The report: the table of figures (median [min–max] per setup, and the vSMMU setup's ratios
//! to the others), the table of exact vSMMU counts per operation, and the Markdown report's
//! notes on reading them.

use crate::boots::DMA_CONFIGS;
use crate::opts::Opts;
use crate::setup::Col;
use crate::stats::{cell, count_cell, ratios, Delta, Results};
use std::fmt::Write as _;

/// What always holds when reading the figures (the Markdown report's notes).
pub(crate) const READING: &str = "\
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

pub(crate) fn figures_table(res: &Results, o: &Opts) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | better | bare | vSMMU | stage-2 only | vSMMU, INTx | vSMMU, GICv4 | vSMMU/bare | vSMMU/s2 | vSMMU/INTx | GICv4/bare |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
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
        let ratio_of = |a: Col, b: Col| -> String {
            let r = ratios(samples, a, b);
            if r.is_empty() {
                "—".to_string()
            } else {
                format!("×{}", cell(&r))
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            if row.higher_better { "higher" } else { "lower" },
            col(Col::Bare),
            col(Col::Vsmmu),
            col(Col::S2),
            col(Col::VsmmuIntx),
            col(Col::VsmmuV4),
            ratio_of(Col::Vsmmu, Col::Bare),
            ratio_of(Col::Vsmmu, Col::S2),
            ratio_of(Col::Vsmmu, Col::VsmmuIntx),
            ratio_of(Col::VsmmuV4, Col::Bare)
        );
    }
    s
}

pub(crate) fn counts_table(res: &Results, o: &Opts) -> String {
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
        "| workload | op | ops measured (vSMMU) | traps/op | CMDQ_PROD writes/op | CMDQ_CONS reads/op | other register traps/op | guest commands/op | guest CMD_SYNCs/op | physical commands per guest command | physical CMD_SYNCs per guest CMD_SYNC | MSIs (LPIs at EL2)/op | traps/op, stage-2 only |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
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
            "| {label} | {op} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
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
            // Each one an exit: the physical LPI taken at EL2 and injected (list registers).
            per(&|d| get(d, "vits_lpis_at_el2")),
            s2_traps,
        );
    }
    s
}

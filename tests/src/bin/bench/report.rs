//! The report: the table of figures (median [min–max] per setup that ran, and the ratios between
//! those that ran), the tables of exact vSMMU and virtio-iommu counts per operation, the
//! Markdown report's notes on reading them and its "Which to pick" (figures from the run, facts
//! that hold anyway).

use crate::boots::DMA_CONFIGS;
use crate::opts::Opts;
use crate::setup::Col;
use crate::stats::{cell, count_cell, fmt_num, ratios, Delta, Results};
use std::fmt::Write as _;

/// What always holds when reading the figures (the Markdown report's notes).
pub(crate) const READING: &str = "\
How to read them:

- Everything runs under QEMU's TCG on a shared host: absolute times mean little, and other jobs' \
  load moves them from one boot to the next (the boots list below says how many other QEMUs ran). \
  The ratios are taken within a repeat, whose setups ran minutes apart; the counts below are exact.
- All setups but one translate DMA in QEMU's SMMUv3 model: bare with stage 1 (the guest's \
  tables), vSMMU nested (the guest's stage 1 over the hypervisor's stage 2), virtio-iommu nested \
  too (stage-1 tables the hypervisor writes for the guest's requests), stage-2 only with stage 2. \
  Bare is the same guest on the same emulated SMMU, not an IOMMU-less machine. Bare with \
  virtio-iommu-pci has no SMMU: QEMU's virtio-iommu model carries out the guest's requests and \
  translates itself.
- Under TCG the hypervisor's own code is emulated instruction by instruction, while QEMU's device \
  models run as native host code. Work the hypervisor does in a trap (a virtio-iommu request: \
  parsing its descriptors, editing the stage-1 tables, freeing emptied ones) is therefore dearer \
  here against the same work in QEMU's virtio-iommu-pci than it would be on hardware, where \
  both are native; a trap itself (a guest exit and return) is cheap under TCG. Compare the \
  setups' trap counts as well as their times.
- Interrupts: bare QEMU virt has a GICv3 ITS, so the bare guest's virtio functions use MSI-X; the \
  hypervisor's guests use MSI-X through their virtual ITS (physical LPIs taken at EL2 and \
  injected through list registers), but INTx through the virtual GIC with `smmu-hv,intx-only`, \
  and directly injected vLPIs on GICv4.
- Boot to init under the hypervisor includes its load of the VM (its own `loaded in N ms` is \
  shown, and the boot time less it). The VM's RAM is zeroed before first use, 2 MiB at a time \
  (`ram-zero=lazy`): the load zeroes only around the images, the guest's first touches zero \
  the blocks it uses, and the first Bus Master Enable of one of its functions waits until \
  the rest is zeroed (shown as its own row; these guests probe their drivers after init, so \
  it falls between init and the shell). Zeroing under emulation makes the host allocate every \
  page it touches, which a bare guest never pays for pages it does not use; how long that takes \
  depends on the host's free memory, not on the setup. The `host RAM preallocated` setups \
  (QEMU's `-mem-prealloc`, bare and vSMMU alike) take that allocation out of the zeroing; \
  they start paused and are timed from the machine's start (the `cont` typed at QEMU's monitor \
  once its 4 GiB are allocated), not from QEMU's exec like the others.
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
            "boot-shell",
            "boot to the shell (s): QEMU's exec to `guest: shell`, its drivers probed (modules \
             loaded by init)"
                .to_string(),
            false,
        ),
        row(
            "boot-gate",
            "of which the first Bus Master Enable waiting for the VM's RAM to be all zeroed (s)"
                .to_string(),
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
        r.push(row(
            &format!("{k}-traps"),
            format!(
                "dma_map_benchmark -t {t} -g {g}: traps per map + unmap (vSMMU: register traps \
                 per guest CMD_SYNC; virtio-iommu: QueueNotify per UNMAP request)"
            ),
            false,
        ));
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

/// The ratio columns, each shown when the run has both setups: (numerator, denominator, header).
const RATIOS: [(Col, Col, &str); 10] = [
    (Col::Vsmmu, Col::Bare, "vSMMU/bare"),
    (Col::VsmmuBase, Col::Bare, "baseline/bare"),
    (Col::Vsmmu, Col::VsmmuBase, "vSMMU/baseline"),
    (
        Col::VsmmuPrealloc,
        Col::BarePrealloc,
        "vSMMU/bare, host RAM preallocated",
    ),
    (
        Col::Viommu,
        Col::BareViommu,
        "virtio-iommu/bare virtio-iommu-pci",
    ),
    (Col::Viommu, Col::Vsmmu, "virtio-iommu/vSMMU"),
    (Col::BareViommu, Col::Bare, "bare: virtio-iommu-pci/SMMUv3"),
    (Col::Vsmmu, Col::S2, "vSMMU/s2"),
    (Col::Vsmmu, Col::VsmmuIntx, "vSMMU/INTx"),
    (Col::VsmmuV4, Col::Bare, "GICv4/bare"),
];

/// The setups the run has, in the table's order: the single-guest setups asked for, and vSMMU
/// and stage-2 only when the two-VM pairs ran.
pub(crate) fn shown_cols(o: &Opts) -> Vec<Col> {
    Col::ORDER
        .into_iter()
        .filter(|c| o.singles.contains(c) || (o.net && matches!(c, Col::Vsmmu | Col::S2)))
        .collect()
}

/// The ratio columns of the run: those whose two setups both ran.
pub(crate) fn shown_ratios(o: &Opts) -> Vec<(Col, Col, &'static str)> {
    let cols = shown_cols(o);
    RATIOS
        .into_iter()
        .filter(|(a, b, _)| cols.contains(a) && cols.contains(b))
        .collect()
}

/// What a bare setup shows in a row it cannot have (`None`: it has the row).
fn bare_na(key: &str) -> Option<&'static str> {
    match key {
        "boot2" | "boot2-less-load" | "net" | "ping" | "dma2-alone" | "dma2-both"
        | "dma2-other" | "dma2-ratio" | "dma2-skew" => Some("n/a (one guest)"),
        "boot-load" => Some("n/a"),
        k if k.ends_with("-traps") => Some("n/a"),
        _ => None,
    }
}

pub(crate) fn figures_table(res: &Results, o: &Opts) -> String {
    let cols = shown_cols(o);
    let ratio_cols = shown_ratios(o);
    let mut s = String::new();
    let mut header = "| workload | better |".to_string();
    for c in &cols {
        let _ = write!(header, " {} |", c.label());
    }
    for (_, _, h) in &ratio_cols {
        let _ = write!(header, " {h} |");
    }
    let _ = writeln!(s, "{header}");
    let _ = writeln!(s, "|{}", " --- |".repeat(2 + cols.len() + ratio_cols.len()));
    for row in rows(o) {
        let Some(samples) = res.samples.get(&row.key) else {
            continue;
        };
        let col = |c: Col| -> String {
            if c.is_bare() {
                if let Some(na) = bare_na(&row.key) {
                    return na.to_string();
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
        let _ = write!(
            s,
            "| {} | {} |",
            row.label,
            if row.higher_better { "higher" } else { "lower" }
        );
        for &c in &cols {
            let _ = write!(s, " {} |", col(c));
        }
        for &(a, b, _) in &ratio_cols {
            let _ = write!(s, " {} |", ratio_of(a, b));
        }
        s.push('\n');
    }
    s
}

/// The median of a metric's samples of setup `col` over the repeats.
pub(crate) fn median(res: &Results, key: &str, col: Col) -> Option<f64> {
    let v: Vec<f64> = res
        .samples
        .get(key)?
        .get(&col)?
        .iter()
        .map(|&(_, x)| x)
        .collect();
    med(&v)
}

/// The median of a metric's per-repeat ratios `a/b` (repeats with both).
pub(crate) fn median_ratio(res: &Results, key: &str, a: Col, b: Col) -> Option<f64> {
    med(&ratios(res.samples.get(key)?, a, b))
}

fn med(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A figure for the prose: the number with its unit, or "not measured".
fn fig(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) => format!("{} {unit}", fmt_num(v)).trim_end().to_string(),
        None => "not measured".to_string(),
    }
}

/// A ratio for the prose: `×1.234`, or "not measured".
fn rat(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("×{}", fmt_num(v)),
        None => "not measured".to_string(),
    }
}

/// Which of two setups did better by the ratio `a/b` of a metric (`higher`: higher is better),
/// in words with the ratio; within 5 % counts as even.
fn verdict(r: Option<f64>, higher: bool, a: &str, b: &str) -> String {
    match r {
        None => format!("not compared ({a} or {b} not measured)"),
        Some(r) if (0.95..=1.05).contains(&r) => {
            format!(
                "even, the {a} and the {b} within 5 % ({a}/{b} ×{})",
                fmt_num(r)
            )
        }
        Some(r) => format!(
            "the {} better ({a}/{b} ×{})",
            if (r > 1.0) == higher { a } else { b },
            fmt_num(r)
        ),
    }
}

/// The report's "Which to pick": the run's own figures for the virtio-iommu, the vSMMU and the
/// two bare machines, then what holds whatever the figures (this code base's facts).
pub(crate) fn which_to_pick(res: &Results) -> String {
    let (v, s, bv, b) = (Col::Viommu, Col::Vsmmu, Col::BareViommu, Col::Bare);
    let pair = "dma-t1-g1-pair";
    let pair16 = "dma-t1-g16-pair";
    let traps = "dma-t1-g1-traps";
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Measured in this run (medians over the repeats; a ratio is taken within each repeat):\n"
    );
    let _ = writeln!(
        t,
        "- DMA map + unmap of one page (`dma_map_benchmark -t 1 -g 1`): virtio-iommu {}, vSMMU {} \
         (virtio-iommu/vSMMU {}); bare on QEMU, virtio-iommu-pci {}, SMMUv3 {}. What the \
         hypervisor adds over the bare machine with the same kind of IOMMU: virtio-iommu {}, \
         vSMMU {}. With 16 pages per mapping: virtio-iommu {}, vSMMU {} (virtio-iommu/vSMMU {}).",
        fig(median(res, pair, v), "µs"),
        fig(median(res, pair, s), "µs"),
        rat(median_ratio(res, pair, v, s)),
        fig(median(res, pair, bv), "µs"),
        fig(median(res, pair, b), "µs"),
        rat(median_ratio(res, pair, v, bv)),
        rat(median_ratio(res, pair, s, b)),
        fig(median(res, pair16, v), "µs"),
        fig(median(res, pair16, s), "µs"),
        rat(median_ratio(res, pair16, v, s)),
    );
    let _ = writeln!(
        t,
        "- Traps per map + unmap (the hypervisor's counters): virtio-iommu {}, vSMMU {}.",
        fig(median(res, traps, v), ""),
        fig(median(res, traps, s), ""),
    );
    let _ = writeln!(
        t,
        "- Disk: sequential 1 MiB reads virtio-iommu {}, vSMMU {} ({}), bare virtio-iommu-pci {}, \
         bare SMMUv3 {}; 4 KiB reads virtio-iommu {}, vSMMU {} ({}).",
        fig(median(res, "seq", v), "MiB/s"),
        fig(median(res, "seq", s), "MiB/s"),
        rat(median_ratio(res, "seq", v, s)),
        fig(median(res, "seq", bv), "MiB/s"),
        fig(median(res, "seq", b), "MiB/s"),
        fig(median(res, "4k", v), "IOPS"),
        fig(median(res, "4k", s), "IOPS"),
        rat(median_ratio(res, "4k", v, s)),
    );
    let _ = writeln!(
        t,
        "\nSo here, DMA mapping churn: {}; disk throughput: {}; and on bare QEMU (a VMM user's \
         choice), DMA mapping churn: {}.\n",
        verdict(
            median_ratio(res, pair, v, s),
            false,
            "virtio-iommu",
            "vSMMU"
        ),
        verdict(
            median_ratio(res, "seq", v, s),
            true,
            "virtio-iommu",
            "vSMMU"
        ),
        verdict(
            median_ratio(res, pair, bv, b),
            false,
            "virtio-iommu-pci",
            "SMMUv3"
        ),
    );
    t.push_str(PICK_FACTS);
    t
}

/// What holds of the two vIOMMUs whatever the figures (docs/design.md section 5,
/// docs/vm-config.md).
pub(crate) const PICK_FACTS: &str = "\
What holds whatever the figures:

- **virtio-iommu** (`smmu-hv,iommu = \"virtio-iommu\"`): every MAP and every UNMAP is a request \
  and costs one trap (its QueueNotify), the hypervisor carrying it out inside the trap: a map \
  costs a trap where the vSMMU's costs none, and an UNMAP is answered only once the physical \
  TLBI and CMD_SYNC have completed, synchronously. The guest writes no stage-1 tables: the \
  hypervisor builds them in a pool of its own memory (read-only to the guest), so there is \
  nothing to shadow and nothing to read back from guest memory. It needs the guest's \
  virtio_iommu driver over virtio-mmio (Linux `CONFIG_VIRTIO_IOMMU`, `CONFIG_VIRTIO_MMIO`), and \
  offers 4 KiB pages (2 MiB and 1 GiB blocks), 39-bit IOVAs, 64 domains and 16384 mappings per \
  device.
- **vSMMU** (`smmuv3`, the default): the guest's stock arm-smmu-v3 driver, as on the bare \
  machine or hardware. A map writes the guest's own tables, no trap; an unmap's TLBI and \
  CMD_SYNC reach the hypervisor as one batch per CMDQ_PROD write, one trap. The guest's tables, \
  stream table and CDs live in its RAM: the hypervisor reads its STEs and shadows them, the \
  physical SMMU walks its stage 1 nested over stage 2. It is the one for a guest without a \
  virtio-iommu driver (another OS, a kernel without `CONFIG_VIRTIO_IOMMU`, firmware that \
  drives an SMMU).
- Neither gives a guest SVA or PASIDs: the vSMMU has no substreams (SSIDSIZE 0), ATS or PRI, \
  and the virtio-iommu offers no PASID feature. Both nest over the same stage 2, so isolation \
  is the same.
- The bare columns are QEMU's own models without a hypervisor, what a VMM's user would pick \
  between: the virtio-iommu-pci handles each request in QEMU, the SMMUv3 walks the guest's \
  tables in QEMU.
- In short: the vSMMU for any guest with an SMMUv3 driver, and where DMA mappings churn (a map \
  costs it no trap); the virtio-iommu for a guest with the driver where the hypervisor should \
  own the I/O page tables (no guest tables to shadow or validate), at the cost of a trap per \
  map and a synchronous invalidation per unmap, which the figures above put a price on.
";

/// The disk and DMA workloads of the counts tables: (key, label, the operation counted), the
/// dma_map_benchmark ones counted as `dma_op`.
fn workload_rows(o: &Opts, dma_op: &'static str) -> Vec<(String, String, &'static str)> {
    let mut rows: Vec<(String, String, &'static str)> = vec![
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
            dma_op,
        ));
    }
    rows
}

pub(crate) fn counts_table(res: &Results, o: &Opts) -> String {
    let mut s = String::new();
    let mut rows = workload_rows(o, "map+unmap (= guest CMD_SYNC)");
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

/// The virtio-iommu setup's exact counts per operation (its `viommu:` counters, read around each
/// measured part), as [`counts_table`] has the vSMMU's; empty without that setup's counts.
pub(crate) fn viommu_counts_table(res: &Results, o: &Opts) -> String {
    let rows = workload_rows(o, "map+unmap (= guest UNMAP request)");
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | op | ops measured (virtio-iommu) | traps (QueueNotify)/op | requests/op | MAP/op | UNMAP/op | ATTACH + DETACH/op | failed requests/op | physical CMD_SYNCs/op | physical TLBIs/op | MSIs (LPIs at EL2)/op |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(12));
    let mut any = false;
    for (key, label, op) in rows {
        let Some(v) = res.counts.get(&key).and_then(|c| c.get(&Col::Viommu)) else {
            continue;
        };
        any = true;
        let get = |d: &Delta, k: &str| d.get(&format!("viommu_{k}")).copied().unwrap_or(0) as f64;
        let per = |f: &dyn Fn(&Delta) -> f64| -> String {
            count_cell(
                &v.iter()
                    .map(|(ops, d)| if *ops > 0.0 { f(d) / ops } else { f64::NAN })
                    .collect::<Vec<_>>(),
            )
        };
        let ops: Vec<f64> = v.iter().map(|(ops, _)| *ops).collect();
        let _ = writeln!(
            s,
            "| {label} | {op} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&ops),
            per(&|d| get(d, "notifies")),
            per(&|d| get(d, "requests")),
            per(&|d| get(d, "map")),
            per(&|d| get(d, "unmap")),
            per(&|d| get(d, "attach") + get(d, "detach")),
            per(&|d| get(d, "errors")),
            per(&|d| get(d, "phys_syncs")),
            per(&|d| get(d, "tlbis")),
            per(&|d| d.get("vits_lpis_at_el2").copied().unwrap_or(0) as f64),
        );
    }
    if any {
        s
    } else {
        String::new()
    }
}

/// The hypervisor's trap profile per workload (its `profile:` sums, read around each measured
/// part): for each setup under the hypervisor and each kind of exit the workload caused, the
/// exits per operation and the mean nanoseconds per exit in each stage, measured in EL2 from
/// the vector's first instruction to the ERET. For the DMA workloads also the guest's own
/// map+unmap time and what of it lies outside EL2 (the exception entry and return themselves,
/// and the guest's side). Empty without profile counts.
pub(crate) fn profile_table(res: &Results, o: &Opts) -> String {
    const STAGES: [&str; 8] = [
        "save", "decode", "model", "submit", "wait", "complete", "lr_sync", "exit",
    ];
    const KINDS: [(&str, &str); 5] = [
        ("prod", "CMDQ_PROD write"),
        ("read", "vSMMU register read"),
        ("lpi", "LPI (MSI)"),
        ("timer", "guest timer"),
        ("irq", "other interrupt"),
    ];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | setup | exit | exits/op | {} | all in EL2 | guest's map+unmap | outside EL2 per op |",
        STAGES.join(" | ")
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(STAGES.len() + 7));
    let mut any = false;
    for (key, label, _) in workload_rows(o, "map+unmap") {
        let Some(cols) = res.counts.get(&key) else {
            continue;
        };
        for (col, v) in cols {
            for (kind, what) in KINDS {
                let get = |d: &Delta, k: &str| {
                    d.get(&format!("prof_{kind}_{k}")).copied().unwrap_or(0) as f64
                };
                let exits: Vec<f64> = v.iter().map(|(_, d)| get(d, "n")).collect();
                if exits.iter().all(|&n| n == 0.0) {
                    continue;
                }
                any = true;
                let per_exit = |stage: &str| -> Vec<f64> {
                    v.iter().map(|(_, d)| get(d, stage) / get(d, "n")).collect()
                };
                let all: Vec<f64> = v
                    .iter()
                    .map(|(_, d)| STAGES.iter().map(|st| get(d, st)).sum::<f64>() / get(d, "n"))
                    .collect();
                let per_op: Vec<f64> = v
                    .iter()
                    .map(|(ops, d)| {
                        if *ops > 0.0 {
                            get(d, "n") / ops
                        } else {
                            f64::NAN
                        }
                    })
                    .collect();
                let stages: Vec<String> =
                    STAGES.iter().map(|st| count_cell(&per_exit(st))).collect();
                let (guest, outside) = match (key.starts_with("dma") && kind == "prod")
                    .then(|| median(res, &format!("{key}-pair"), *col))
                    .flatten()
                {
                    Some(us) => {
                        let in_el2 =
                            med(&per_op).unwrap_or(f64::NAN) * med(&all).unwrap_or(f64::NAN);
                        (
                            format!("{} ns", fmt_num(us * 1000.0)),
                            format!("{} ns", fmt_num(us * 1000.0 - in_el2)),
                        )
                    }
                    None => ("—".to_string(), "—".to_string()),
                };
                let _ = writeln!(
                    s,
                    "| {label} | {} | {what} | {} | {} | {} | {guest} | {outside} |",
                    col.label(),
                    count_cell(&per_op),
                    stages.join(" | "),
                    count_cell(&all),
                );
            }
        }
    }
    if any {
        s
    } else {
        String::new()
    }
}

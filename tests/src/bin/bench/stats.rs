//! The measurements a run collects ([`Results`]) and how they are summarised: median
//! [min–max] over the repeats, per-repeat ratios between setups, per-operation counts.

use crate::setup::Col;
use std::collections::BTreeMap;

/// The counter deltas of one VM over one measured part.
pub(crate) type Delta = BTreeMap<String, u64>;

#[derive(Debug, Default)]
pub(crate) struct Results {
    /// Metric -> column -> (repeat, value).
    pub(crate) samples: BTreeMap<String, BTreeMap<Col, Vec<(usize, f64)>>>,
    /// Count row -> column -> one entry per repeat: (operations, counter deltas).
    pub(crate) counts: BTreeMap<String, BTreeMap<Col, Vec<(f64, Delta)>>>,
    /// What each setup's guest said about itself (first boot of each).
    pub(crate) facts: BTreeMap<String, BTreeMap<String, String>>,
    /// One line per boot: what it was, how long it took, what else ran.
    pub(crate) boots: Vec<String>,
    pub(crate) failures: Vec<String>,
}

impl Results {
    pub(crate) fn add(&mut self, metric: &str, col: Col, rep: usize, v: f64) {
        if v.is_finite() {
            self.samples
                .entry(metric.to_string())
                .or_default()
                .entry(col)
                .or_default()
                .push((rep, v));
        }
    }

    pub(crate) fn add_count(&mut self, row: &str, col: Col, ops: f64, delta: Delta) {
        self.counts
            .entry(row.to_string())
            .or_default()
            .entry(col)
            .or_default()
            .push((ops, delta));
    }
}

pub(crate) fn fmt_num(v: f64) -> String {
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
pub(crate) fn cell(vals: &[f64]) -> String {
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
pub(crate) fn ratios(samples: &BTreeMap<Col, Vec<(usize, f64)>>, a: Col, b: Col) -> Vec<f64> {
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

/// A per-operation count over the repeats: the value if they all agree (to 0.001), else
/// `min–max`.
pub(crate) fn count_cell(vals: &[f64]) -> String {
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

/// dma_map_benchmark's map+unmap pairs over a measured part, from the counter deltas `d` of its
/// VM (it does not report its iteration count), and the traps they took: `(pairs, traps)`.
///
/// - vSMMU: with strict invalidation Linux issues one CMD_SYNC per `dma_unmap` and no command
///   per `dma_map`, so the guest's CMD_SYNCs are the pairs; traps are all its register traps.
/// - virtio-iommu (`viommu_*`): one UNMAP request per `dma_unmap` (and one MAP per `dma_map`),
///   so the UNMAPs are the pairs; a trap is a QueueNotify (`notifies`), the only register the
///   driver writes per request.
///
/// (0, 0) from a VM with neither (none measured).
pub(crate) fn dma_pairs(d: &Delta) -> (f64, f64) {
    let get = |k: &str| d.get(k).copied().unwrap_or(0) as f64;
    if d.contains_key("viommu_notifies") {
        (get("viommu_unmap"), get("viommu_notifies"))
    } else {
        (get("syncs"), get("traps"))
    }
}

//! The command line: the usage text and the options it parses.

use crate::setup::Col;
use std::path::PathBuf;

pub(crate) const USAGE: &str = "\
usage: bench [--repeats N] [--out FILE] [--setups LIST] [--no-net] [--dma-seconds S] [--quick]
             [--baseline IMAGE]

Boots the modular guest (build/guest/modular) in each setup N times, in a rotated order, runs
the same workloads in each (tests/guest/bench.sh) and prints one table of figures and ratios
(median [min-max]), the exact vSMMU and virtio-iommu counts per operation and, with either
virtio-iommu setup, which to pick. The setups (--setups names):

  bare         Linux directly on QEMU, its arm-smmu-v3 driver on QEMU's SMMUv3
  vsmmu        the hypervisor's one VM, its stage 1 on the vSMMU nested over stage 2
  s2           the same VM with iommu.passthrough=1 (stage 2 only)
  vsmmu-intx   the vSMMU VM with smmu-hv,intx-only (INTx, no vITS)
  vsmmu-v4     the vSMMU VM on gic-version=4 (MSIs injected directly)
  viommu       the VM with the hypervisor's virtio-iommu (--vm-iommu 0 virtio-iommu)
  bare-viommu  Linux directly on QEMU with QEMU's virtio-iommu-pci, no SMMU
               (qemu/board-virt.sh --bare --bare-iommu virtio-iommu)
  bare-prealloc, vsmmu-prealloc
               bare and vsmmu with QEMU's guest RAM allocated by the host before the boot
               (-mem-prealloc): under TCG the first touch of a host page costs its allocation,
               which the hypervisor's zeroing pays for every page it zeroes; these two columns
               compare boots without that artefact
  net          two VMs (vSMMU, then stage 2 only): guest-to-guest TCP and concurrent DMA

  --repeats N      boots of each setup (default 3)
  --out FILE       also write the tables as Markdown to FILE, with the date, the machine and
                   the command line
  --setups LIST    only these setups, comma-separated (names above); default all
  --no-net         all but net
  --dma-seconds S  length of each dma_map_benchmark run (default 3)
  --quick          a smoke run: 1 repeat, short workloads (figures not worth keeping)
  --baseline IMAGE also boot the vSMMU setup on IMAGE, another build of the hypervisor (e.g.
                   the commit before a change: `git worktree add`, `qemu/build.sh` there), as the
                   column \"vSMMU, baseline\": before and after side by side, same host, same run

Run it through qemu/bench.sh, which sets up, builds the hypervisor and the modular guest first.";

#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) repeats: usize,
    pub(crate) out: Option<PathBuf>,
    pub(crate) singles: Vec<Col>,
    pub(crate) net: bool,
    pub(crate) dma_seconds: u32,
    pub(crate) seq_passes: u32,
    pub(crate) k4_passes: u32,
    pub(crate) rand_reads: u32,
    pub(crate) net_mib: u32,
    /// Another hypervisor image, booted as the vSMMU setup's baseline column.
    pub(crate) baseline: Option<PathBuf>,
}

impl Opts {
    pub(crate) fn parse(args: &[String]) -> Result<Opts, String> {
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
            baseline: None,
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
                "--baseline" => {
                    let f = PathBuf::from(it.next().ok_or("--baseline wants an image file")?);
                    if !f.is_file() {
                        return Err(format!("--baseline: no file {}", f.display()));
                    }
                    o.baseline = Some(f);
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
        if o.baseline.is_some() {
            o.singles.push(Col::VsmmuBase);
            o.singles.sort();
        }
        Ok(o)
    }
}

use super::*;
use crate::guest::{
    bench_fact, check_iommu_driver, guest_modules, iommu_counters, kernel_init_time, vm_load_ms,
};
use crate::report::{median, median_ratio, shown_ratios, PICK_FACTS};
use crate::stats::{cell, count_cell, dma_pairs, ratios, Delta};
use integration_tests::Line;
use std::collections::BTreeMap;
use std::time::Duration;

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

#[test]
fn viommu_setups() {
    let o = Opts::parse(&["--setups".into(), "bare,vsmmu,viommu,bare-viommu".into()]).unwrap();
    assert_eq!(
        o.singles,
        vec![Col::Bare, Col::Vsmmu, Col::Viommu, Col::BareViommu]
    );
    assert!(!o.net);
    let ctx = Ctx {
        opts: o,
        guest: PathBuf::from("/g"),
        disks: [PathBuf::from("/d/vm0.img"), PathBuf::from("/d/vm1.img")],
    };
    let a = ctx.args(Boot::Single(Col::Viommu));
    assert!(a
        .windows(3)
        .any(|w| w == ["--vm-iommu", "0", "virtio-iommu"]));
    assert!(a
        .windows(3)
        .any(|w| w == ["--vm-pci", "0", "00:01.0,00:02.0"]));
    let a = ctx.args(Boot::Single(Col::BareViommu));
    assert_eq!(a[0], "--bare");
    assert!(a.windows(2).any(|w| w == ["--bare-iommu", "virtio-iommu"]));
    assert!(!a.iter().any(|w| w.starts_with("--vm-")));
    // The functions keep their slots; the board script puts the IOMMU at 00:05.0.
    assert!(a.iter().any(|w| w.contains("addr=1.0")));
    assert!(!a.iter().any(|w| w.contains("addr=5.0")));
    let a = ctx.args(Boot::Single(Col::Bare));
    assert!(!a.iter().any(|w| w == "--bare-iommu"));
    assert!(Col::BareViommu.is_bare() && Col::Bare.is_bare() && !Col::Viommu.is_bare());
}

#[test]
fn hypervisor_counters() {
    let v = "viommu: vm0 stats: notifies=10 requests=10 attach=1 detach=0 map=4 unmap=5 probe=0 unknown=0 errors=0 phys_syncs=5 tlbis=5 ste_writes=2 phys_errors=0 domains=1 mappings=3 table_pages=4 faults=0 events=0 events_dropped=0 queue_errors=0 resets=0 status=15";
    let d = iommu_counters(v, "vm0").unwrap();
    assert_eq!(d["viommu_notifies"], 10);
    assert_eq!(d["viommu_phys_syncs"], 5);
    assert!(!d.contains_key("notifies") && !d.contains_key("phys_syncs"));
    assert!(iommu_counters(v, "vm1").is_none());
    let s = "vsmmu: vm0 stats: traps=3 cmdq_prod=3 cmdq_cons=0 reg_reads=0 reg_writes=3 commands=6 syncs=3 guest_events=0 s2_faults=0 phys_syncs=3";
    let d = iommu_counters(s, "vm0").unwrap();
    assert_eq!((d["traps"], d["syncs"]), (3, 3));
    assert!(iommu_counters("vits: vm0 stats: delivery lr, lpis_at_el2=1", "vm0").is_none());

    // Pairs and traps per dma_map_benchmark iteration: CMD_SYNCs and traps of a vSMMU,
    // UNMAPs and notifies of a virtio-iommu.
    assert_eq!(dma_pairs(&d), (3.0, 3.0));
    let mut v = Delta::new();
    v.insert("viommu_notifies".into(), 2001);
    v.insert("viommu_unmap".into(), 1000);
    v.insert("viommu_map".into(), 1000);
    v.insert("vits_lpis_at_el2".into(), 7);
    assert_eq!(dma_pairs(&v), (1000.0, 2001.0));
    assert_eq!(dma_pairs(&Delta::new()), (0.0, 0.0));
}

#[test]
fn iommu_driver_check() {
    let lines = [
        line("guest: init started"),
        line("guest: modules=virtio_iommu,virtio_blk\r"),
    ];
    let m = guest_modules(&lines).unwrap();
    assert_eq!(m, vec!["virtio_iommu", "virtio_blk"]);
    assert!(check_iommu_driver(Col::Viommu, Some(&m)).is_ok());
    assert!(check_iommu_driver(Col::BareViommu, Some(&m)).is_ok());
    assert!(check_iommu_driver(Col::Bare, Some(&m)).is_err());
    assert!(check_iommu_driver(Col::Vsmmu, None).is_err());
    assert_eq!(guest_modules(&lines[..1]), None);
}

fn four_setups() -> Opts {
    Opts::parse(&["--setups".into(), "bare,vsmmu,viommu,bare-viommu".into()]).unwrap()
}

#[test]
fn table_columns_and_missing_figures() {
    let o = four_setups();
    assert_eq!(
        shown_cols(&o),
        vec![Col::Bare, Col::Vsmmu, Col::Viommu, Col::BareViommu]
    );
    let heads: Vec<&str> = shown_ratios(&o).iter().map(|r| r.2).collect();
    assert_eq!(
        heads,
        [
            "vSMMU/bare",
            "virtio-iommu/bare virtio-iommu-pci",
            "virtio-iommu/vSMMU",
            "bare: virtio-iommu-pci/SMMUv3"
        ]
    );
    let mut res = Results::default();
    // The virtio-iommu boot of repeat 1 failed: its column has repeat 0 only.
    for (rep, b, bv, s, v) in [(0, 10.0, 20.0, 15.0, 40.0), (1, 11.0, 22.0, 16.0, f64::NAN)] {
        res.add("dma-t1-g1-pair", Col::Bare, rep, b);
        res.add("dma-t1-g1-pair", Col::BareViommu, rep, bv);
        res.add("dma-t1-g1-pair", Col::Vsmmu, rep, s);
        res.add("dma-t1-g1-pair", Col::Viommu, rep, v);
    }
    res.add("dma-t1-g1-traps", Col::Vsmmu, 0, 1.0);
    res.add("dma-t1-g1-traps", Col::Viommu, 0, 2.0);
    let t = figures_table(&res, &o);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].contains("| bare | vSMMU | virtio-iommu | bare, virtio-iommu-pci |"));
    assert!(!lines[0].contains("stage-2 only"));
    let cells = |row: &str| -> Vec<String> {
        let l = lines.iter().find(|l| l.contains(row)).unwrap();
        l.split('|').map(|c| c.trim().to_string()).collect()
    };
    let pair = cells("-g 1: map + unmap (µs)");
    // | label | better | bare | vSMMU | viommu | bare-viommu | 4 ratios |
    assert_eq!(pair[3], "10.50 [10.00–11.00]");
    assert_eq!(pair[5], "40.00");
    assert_eq!(
        pair[8], "×2.000",
        "virtio-iommu/bare virtio-iommu-pci, repeat 0 only"
    );
    assert_eq!(pair[9], "×2.667", "virtio-iommu/vSMMU");
    let traps = cells("-g 1: traps per map + unmap");
    assert_eq!(traps[3], "n/a");
    assert_eq!(traps[4], "1.000");
    assert_eq!(traps[5], "2.000");
    assert_eq!(traps[6], "n/a");
    assert_eq!(traps[7], "—", "no ratio to a bare n/a");
    // A row nobody measured is left out, one a setup missed shows "—".
    assert!(!t.contains("sequential read"));
    res.add("seq", Col::Bare, 0, 200.0);
    let t = figures_table(&res, &o);
    let l = t.lines().find(|l| l.contains("sequential read")).unwrap();
    assert!(l.contains("| 200.0 | — | — | — |"), "{l}");
}

#[test]
fn ratios_within_a_repeat() {
    let mut res = Results::default();
    for (rep, v, bv) in [(0, 10.0, 5.0), (1, 30.0, 10.0), (2, 12.0, 4.0)] {
        res.add("k", Col::Viommu, rep, v);
        res.add("k", Col::BareViommu, rep, bv);
    }
    // Repeat by repeat 2, 3, 3: median 3, not the ratio of the medians (12 / 5).
    assert_eq!(
        median_ratio(&res, "k", Col::Viommu, Col::BareViommu),
        Some(3.0)
    );
    assert_eq!(median(&res, "k", Col::Viommu), Some(12.0));
    assert_eq!(median(&res, "k", Col::Vsmmu), None);
    assert_eq!(median_ratio(&res, "k", Col::Viommu, Col::Vsmmu), None);
    // A repeat where one setup failed gives no ratio.
    res.add("j", Col::Viommu, 0, 4.0);
    res.add("j", Col::BareViommu, 1, 2.0);
    assert_eq!(median_ratio(&res, "j", Col::Viommu, Col::BareViommu), None);
}

#[test]
fn which_to_pick_prose() {
    // Nothing measured: every figure says so, no verdict is made up, the facts stay.
    let p = which_to_pick(&Results::default());
    assert!(p.contains("virtio-iommu not measured, vSMMU not measured"));
    assert!(p.contains("DMA mapping churn: not compared (virtio-iommu or vSMMU not measured)"));
    assert!(!p.contains('×'));
    assert!(p.contains(PICK_FACTS));
    assert!(PICK_FACTS.contains("one trap"));
    assert!(PICK_FACTS.contains("arm-smmu-v3"));

    let mut res = Results::default();
    for (rep, s, v, b, bv) in [(0, 18.0, 27.0, 10.0, 30.0), (1, 20.0, 30.0, 12.0, 33.0)] {
        res.add("dma-t1-g1-pair", Col::Vsmmu, rep, s);
        res.add("dma-t1-g1-pair", Col::Viommu, rep, v);
        res.add("dma-t1-g1-pair", Col::Bare, rep, b);
        res.add("dma-t1-g1-pair", Col::BareViommu, rep, bv);
        res.add("seq", Col::Vsmmu, rep, 160.0);
        res.add("seq", Col::Viommu, rep, 164.0);
    }
    res.add("dma-t1-g1-traps", Col::Viommu, 0, 2.0);
    res.add("dma-t1-g1-traps", Col::Vsmmu, 0, 1.0);
    let p = which_to_pick(&res);
    assert!(
        p.contains("virtio-iommu 28.50 µs, vSMMU 19.00 µs (virtio-iommu/vSMMU ×1.500)"),
        "{p}"
    );
    assert!(p.contains("virtio-iommu-pci 31.50 µs, SMMUv3 11.00 µs"));
    assert!(p.contains(
        "Traps per map + unmap (the hypervisor's counters): virtio-iommu 2.000, vSMMU 1.000."
    ));
    assert!(
        p.contains("DMA mapping churn: the vSMMU better (virtio-iommu/vSMMU ×1.500)"),
        "{p}"
    );
    assert!(p.contains(
        "disk throughput: even, the virtio-iommu and the vSMMU within 5 % (virtio-iommu/vSMMU ×1.025)"
    ));
    assert!(p.contains("DMA mapping churn: the SMMUv3 better (virtio-iommu-pci/SMMUv3 ×2.875)"));
    // 16-page mappings were not measured.
    assert!(p.contains("With 16 pages per mapping: virtio-iommu not measured"));
}

#[test]
fn a_baseline_image_adds_its_column_booted_on_that_image() {
    let dir = std::env::temp_dir().join(format!("bench-baseline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("before.bin");
    std::fs::write(&image, b"img").unwrap();
    let o = Opts::parse(&[
        "--setups".into(),
        "bare,vsmmu".into(),
        "--baseline".into(),
        image.display().to_string(),
    ])
    .unwrap();
    assert_eq!(o.singles, vec![Col::Bare, Col::Vsmmu, Col::VsmmuBase]);
    assert_eq!(shown_cols(&o), vec![Col::Bare, Col::VsmmuBase, Col::Vsmmu]);
    let ctx = Ctx {
        opts: o,
        guest: PathBuf::from("/g"),
        disks: [PathBuf::from("/d/vm0.img"), PathBuf::from("/d/vm1.img")],
    };
    let a = ctx.args(Boot::Single(Col::VsmmuBase));
    assert!(a
        .windows(2)
        .any(|w| w[0] == "--hv-image" && w[1] == image.display().to_string()));
    assert!(!ctx
        .args(Boot::Single(Col::Vsmmu))
        .contains(&"--hv-image".to_string()));
    assert!(Opts::parse(&["--baseline".into(), "/no/such/image".into()]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prealloc_setups_are_bare_and_vsmmu_with_the_hosts_ram_preallocated() {
    let o = Opts::parse(&[
        "--setups".into(),
        "bare-prealloc,vsmmu-prealloc,bare".into(),
    ])
    .unwrap();
    assert_eq!(
        o.singles,
        vec![Col::Bare, Col::BarePrealloc, Col::VsmmuPrealloc]
    );
    let ctx = Ctx {
        opts: o,
        guest: PathBuf::from("/g"),
        disks: [PathBuf::from("/d/vm0.img"), PathBuf::from("/d/vm1.img")],
    };
    let qemu = |a: &[String]| {
        a.iter()
            .skip_while(|w| *w != "--")
            .cloned()
            .collect::<Vec<_>>()
    };
    let bare = ctx.args(Boot::Single(Col::BarePrealloc));
    assert_eq!(bare[0], "--bare");
    assert_eq!(qemu(&bare)[1..3], ["-mem-prealloc", "-S"]);
    let plain = ctx.args(Boot::Single(Col::Bare));
    assert_eq!(
        bare.iter()
            .filter(|w| *w != "-mem-prealloc" && *w != "-S")
            .collect::<Vec<_>>(),
        plain.iter().collect::<Vec<_>>(),
        "the same boot otherwise"
    );
    let hv = ctx.args(Boot::Single(Col::VsmmuPrealloc));
    assert!(hv.windows(2).any(|w| w == ["--vm-pci", "0"]));
    assert!(qemu(&hv).contains(&"-mem-prealloc".to_string()));
    assert!(!qemu(&ctx.args(Boot::Single(Col::Vsmmu))).contains(&"-mem-prealloc".to_string()));
    assert!(Col::BarePrealloc.is_bare() && !Col::VsmmuPrealloc.is_bare());
    assert!(shown_ratios(&ctx.opts)
        .iter()
        .any(|(a, b, _)| (*a, *b) == (Col::VsmmuPrealloc, Col::BarePrealloc)));
}

use super::*;
use crate::guest::{bench_fact, kernel_init_time, vm_load_ms};
use crate::stats::{cell, count_cell, ratios};
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

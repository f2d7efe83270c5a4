//! The malformed-DT corpus: the three readers of the untrusted host DT ([`Platform::parse`],
//! [`HostBridge::from_dtb`], [`parse_vm_specs`]) run on blobs derived from real DTBs (QEMU's
//! `virt` of `tests/data/`, the boards of `tests/dtbs/`) and must return, never panic or hang.
//! Where a mutation can only be an error (a truncated blob, a dangling `iommu-map` phandle, a
//! `reg` that is not whole entries...) the case also asserts the error.
//!
//! The mutations are built here in Rust, on the bytes (header fields, tokens, property headers),
//! on a token list (unbalanced and deep nesting) or on a small tree model of the DT (properties
//! and nodes), so the tests need no `dtc`. Every case runs on a worker thread under a watchdog
//! with panics caught, and a failing test lists each case by name.
//!
//! The board fixtures' own facts (what `README.md` of `tests/dtbs/` reports) are asserted first.
//! Three tests pin what the readers once got wrong on them without panicking (the SMMU the
//! `iommu-map` names, FVP's console behind a nexus, specifiers of a non-GIC controller).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::blob::{align4, cstr, read_u32, FDT_BEGIN_NODE, FDT_END, FDT_NOP, FDT_PROP};
use super::*;
use crate::config::{parse_vm_specs, ConfigError, VmSpec};
use crate::fuzz_harness::Rng;
use crate::pci::{Bdf, HostBridge, PciError};

const QEMU_VIRT: &[u8] = include_bytes!("../../tests/data/qemu-virt-gicv3.dtb");
const QEMU_SMMU: &[u8] = include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb");
const QEMU_MODULES: &[u8] = include_bytes!("../../tests/data/qemu-virt-gicv3-modules.dtb");
const FVP: &[u8] = include_bytes!("../../tests/dtbs/fvp-base-revc.dtb");
const D05: &[u8] = include_bytes!("../../tests/dtbs/hip07-d05.dtb");
const ROCK5B: &[u8] = include_bytes!("../../tests/dtbs/rk3588-rock-5b-smmu.dtb");
const MULTI: &[u8] = include_bytes!("../../tests/dtbs/multi-smmu-virt.dtb");

const FIXTURES: [(&str, &[u8]); 7] = [
    ("qemu-virt", QEMU_VIRT),
    ("qemu-smmu", QEMU_SMMU),
    ("qemu-modules", QEMU_MODULES),
    ("fvp", FVP),
    ("d05", D05),
    ("rock5b", ROCK5B),
    ("multi", MULTI),
];

/// How many of `n` mutations of one kind to make of a fixture. Every entry point validates the
/// whole blob first, which in a debug build takes about 0.2 ms per 8 KiB, and a blob that passes
/// takes 1.5-20 ms to read in full; so the small, dissimilar blobs get the most mutations, the
/// three near-identical QEMU ones share, and the 34 and 86 KiB boards get a sample.
fn share(name: &str, n: usize) -> usize {
    let percent = match name {
        "qemu-smmu" | "multi" => 100,
        "fvp" => 50,
        "qemu-virt" | "qemu-modules" | "d05" => 25,
        _ => 10,
    };
    (n * percent / 100).max(3)
}

/// The whole corpus must finish well within this (it takes a few seconds in debug).
const WATCHDOG: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// Running the entry points

/// What the three entry points made of one blob.
#[derive(Debug)]
struct Outcome {
    platform: core::result::Result<Platform, PlatformError>,
    bridge: core::result::Result<Option<HostBridge>, PciError>,
    vms: core::result::Result<Vec<core::result::Result<VmSpec, ConfigError>>, PlatformError>,
}

/// The three readers' answers, checked against the invariants of the `host_dt` fuzz target
/// (`fuzz_harness::host_dt`: one validation, well-formed results).
fn outcome(dtb: &[u8]) -> Outcome {
    let o = Outcome {
        platform: Platform::parse(dtb),
        bridge: HostBridge::from_dtb(dtb),
        vms: parse_vm_specs(dtb),
    };
    crate::fuzz_harness::host_dt::check(&o.platform, &o.bridge, &o.vms);
    crate::fuzz_harness::host_dt::check_bridges(dtb);
    o
}

/// What a case must come to besides returning: a set of these bits, all of which must hold.
type Expect = u8;
/// Only that every entry point returns.
const RETURNS: Expect = 0;
/// `check_blob` rejects it: all three entry points return [`PlatformError::Malformed`].
const MALFORMED: Expect = 1;
/// [`Platform::parse`] fails.
const PLATFORM_ERR: Expect = 2;
/// [`HostBridge::from_dtb`] fails (not `Ok(None)`).
const BRIDGE_ERR: Expect = 4;
/// [`parse_vm_specs`] reads the DT but refuses a VM.
const VM_REFUSED: Expect = 8;
/// [`Platform::parse`] succeeds.
const PLATFORM_OK: Expect = 16;

/// The first expectation `o` breaks.
fn unmet(o: &Outcome, e: Expect) -> Option<&'static str> {
    let malformed = matches!(o.platform, Err(PlatformError::Malformed { .. }))
        && matches!(o.bridge, Err(PciError::Dt(PlatformError::Malformed { .. })))
        && matches!(o.vms, Err(PlatformError::Malformed { .. }));
    let vm_refused = matches!(&o.vms, Ok(v) if v.iter().any(|s| s.is_err()));
    [
        (MALFORMED, malformed, "Malformed from all three"),
        (PLATFORM_ERR, o.platform.is_err(), "Platform::parse to fail"),
        (
            BRIDGE_ERR,
            o.bridge.is_err(),
            "HostBridge::from_dtb to fail",
        ),
        (VM_REFUSED, vm_refused, "parse_vm_specs to refuse a VM"),
        (
            PLATFORM_OK,
            o.platform.is_ok(),
            "Platform::parse to succeed",
        ),
    ]
    .into_iter()
    .find(|&(bit, holds, _)| e & bit != 0 && !holds)
    .map(|(_, _, what)| what)
}

struct Case {
    label: String,
    dtb: Vec<u8>,
    expect: Expect,
}

#[derive(Default)]
struct Corpus(Vec<Case>);

impl Corpus {
    fn add(&mut self, label: impl Into<String>, dtb: Vec<u8>, expect: Expect) {
        self.0.push(Case {
            label: label.into(),
            dtb,
            expect,
        });
    }

    fn count(&self, e: Expect) -> usize {
        self.0.iter().filter(|c| c.expect & e == e).count()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".into())
}

fn short(s: String) -> String {
    if s.len() <= 300 {
        s
    } else {
        format!("{}...", &s[..s.floor_char_boundary(300)])
    }
}

/// Runs every case on a worker thread with panics caught, under [`WATCHDOG`], and fails listing
/// every case that panicked or broke its expectation. Returns the number of cases run.
fn check(corpus: Corpus) -> usize {
    check_with(corpus, outcome, WATCHDOG)
}

fn check_with(corpus: Corpus, run: fn(&[u8]) -> Outcome, watchdog: Duration) -> usize {
    let n = corpus.0.len();
    let current = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let cur = Arc::clone(&current);
    std::thread::spawn(move || {
        let mut failures = Vec::new();
        for case in corpus.0 {
            cur.lock().unwrap().clone_from(&case.label);
            match catch_unwind(AssertUnwindSafe(|| run(&case.dtb))) {
                Err(p) => failures.push(format!(
                    "PANIC in {} ({} bytes): {}",
                    case.label,
                    case.dtb.len(),
                    panic_message(&*p)
                )),
                Ok(o) => {
                    if let Some(what) = unmet(&o, case.expect) {
                        failures.push(short(format!("{}: expected {what}, got {o:?}", case.label)));
                    }
                }
            }
        }
        let _ = tx.send(failures);
    });
    let failures = rx.recv_timeout(watchdog).unwrap_or_else(|e| {
        panic!(
            "corpus did not finish ({e}): hung or died at {:?}",
            current.lock().unwrap()
        )
    });
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures[..failures.len().min(25)].join("\n")
    );
    n
}

// The runner's own checks: it reports broken expectations, panics and hangs.

#[test]
#[should_panic(expected = "qemu-smmu as is: expected Malformed from all three")]
fn runner_reports_a_broken_expectation() {
    let mut c = Corpus::default();
    c.add("qemu-smmu as is", QEMU_SMMU.to_vec(), PLATFORM_OK);
    c.add("qemu-smmu as is", QEMU_SMMU.to_vec(), MALFORMED);
    check(c);
}

#[test]
#[should_panic(expected = "PANIC in the bad one (1 bytes): boom")]
fn runner_reports_a_panic() {
    let mut c = Corpus::default();
    c.add("the bad one", vec![0], RETURNS);
    check_with(
        c,
        |dtb| {
            if dtb == [0] {
                panic!("boom")
            } else {
                outcome(dtb)
            }
        },
        WATCHDOG,
    );
}

#[test]
#[should_panic(expected = "hung or died at \"slow\"")]
fn runner_reports_a_hang() {
    let mut c = Corpus::default();
    c.add("slow", Vec::new(), RETURNS);
    check_with(
        c,
        |dtb| {
            std::thread::sleep(Duration::from_secs(2));
            outcome(dtb)
        },
        Duration::from_millis(100),
    );
}

// ---------------------------------------------------------------------------------------------
// Blobs as bytes, as tokens and as a tree

fn header(dtb: &[u8], field: usize) -> u32 {
    read_u32(dtb, field * 4).unwrap()
}

fn with_header(dtb: &[u8], field: usize, value: u32) -> Vec<u8> {
    let mut out = dtb.to_vec();
    out[field * 4..field * 4 + 4].copy_from_slice(&value.to_be_bytes());
    out
}

fn with_u32(dtb: &[u8], off: usize, value: u32) -> Vec<u8> {
    let mut out = dtb.to_vec();
    out[off..off + 4].copy_from_slice(&value.to_be_bytes());
    out
}

fn cells(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|c| c.to_be_bytes()).collect()
}

fn be32(v: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(v[i * 4..i * 4 + 4].try_into().unwrap())
}

/// Absolute offset and value of every token of a valid blob's structure block, in order.
fn token_offsets(dtb: &[u8]) -> Vec<(usize, u32)> {
    let base = header(dtb, 2) as usize;
    let s = &dtb[base..base + header(dtb, 9) as usize];
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let tok = read_u32(s, pos).unwrap();
        out.push((base + pos, tok));
        pos = match tok {
            FDT_BEGIN_NODE => align4(pos + 4 + cstr(s, pos + 4).unwrap().len() + 1),
            FDT_PROP => align4(pos + 12 + read_u32(s, pos + 4).unwrap() as usize),
            FDT_END => return out,
            _ => pos + 4,
        };
    }
}

/// `n` indexes spread evenly over `0..len`.
fn spread(len: usize, n: usize) -> Vec<usize> {
    if len <= n {
        return (0..len).collect();
    }
    (0..n).map(|i| i * len / n).collect()
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Begin(Vec<u8>),
    End,
    Prop(u32, Vec<u8>),
    Nop,
    Fin,
}

/// A blob as its memory reservations, structure tokens and strings block.
#[derive(Clone, Debug)]
struct Toks {
    rsv: Vec<(u64, u64)>,
    toks: Vec<Tok>,
    strings: Vec<u8>,
}

impl Toks {
    fn parse(dtb: &[u8]) -> Toks {
        let strings_at = header(dtb, 3) as usize;
        let strings = dtb[strings_at..strings_at + header(dtb, 8) as usize].to_vec();
        let mut rsv = Vec::new();
        let mut off = header(dtb, 4) as usize;
        loop {
            let e = |i: usize| u64::from(read_u32(dtb, off + i * 4).unwrap());
            let (base, size) = (e(0) << 32 | e(1), e(2) << 32 | e(3));
            if base == 0 && size == 0 {
                break;
            }
            rsv.push((base, size));
            off += 16;
        }
        let toks = token_offsets(dtb)
            .into_iter()
            .map(|(off, tok)| match tok {
                FDT_BEGIN_NODE => Tok::Begin(cstr(dtb, off + 4).unwrap().as_bytes().to_vec()),
                FDT_PROP => {
                    let len = read_u32(dtb, off + 4).unwrap() as usize;
                    Tok::Prop(
                        read_u32(dtb, off + 8).unwrap(),
                        dtb[off + 12..off + 12 + len].to_vec(),
                    )
                }
                FDT_NOP => Tok::Nop,
                FDT_END => Tok::Fin,
                _ => Tok::End,
            })
            .collect();
        Toks { rsv, toks, strings }
    }

    fn dtb(&self) -> Vec<u8> {
        let mut s = Vec::new();
        for t in &self.toks {
            match t {
                Tok::Begin(name) => {
                    s.extend(FDT_BEGIN_NODE.to_be_bytes());
                    s.extend(name);
                    s.push(0);
                }
                Tok::End => s.extend(2u32.to_be_bytes()),
                Tok::Prop(nameoff, v) => {
                    s.extend(FDT_PROP.to_be_bytes());
                    s.extend((v.len() as u32).to_be_bytes());
                    s.extend(nameoff.to_be_bytes());
                    s.extend(v);
                }
                Tok::Nop => s.extend(FDT_NOP.to_be_bytes()),
                Tok::Fin => s.extend(FDT_END.to_be_bytes()),
            }
            s.resize(align4(s.len()), 0);
        }
        assemble(&self.rsv, &s, &self.strings)
    }

    /// Index of the `End` token that closes the node at `path`.
    fn end_of(&self, path: &str) -> usize {
        let want: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let mut stack: Vec<Vec<u8>> = Vec::new();
        for (i, t) in self.toks.iter().enumerate() {
            match t {
                Tok::Begin(name) => stack.push(name.clone()),
                Tok::End => {
                    let here: Vec<&[u8]> = stack[1..].iter().map(Vec::as_slice).collect();
                    if here.len() == want.len()
                        && here.iter().zip(&want).all(|(a, b)| *a == b.as_bytes())
                    {
                        return i;
                    }
                    stack.pop();
                }
                _ => {}
            }
        }
        panic!("no node {path}");
    }
}

/// header | memory reservation map | structure block | strings block, version 17.
fn assemble(rsv: &[(u64, u64)], structure: &[u8], strings: &[u8]) -> Vec<u8> {
    let off_struct = 40 + 16 * (rsv.len() + 1);
    let off_strings = off_struct + structure.len();
    let total = off_strings + strings.len();
    let mut out = cells(&[
        0xd00d_feed,
        total as u32,
        off_struct as u32,
        off_strings as u32,
        40,
        17,
        16,
        0,
        strings.len() as u32,
        structure.len() as u32,
    ]);
    for &(base, size) in rsv.iter().chain([(0, 0)].iter()) {
        out.extend(base.to_be_bytes());
        out.extend(size.to_be_bytes());
    }
    out.extend(structure);
    out.extend(strings);
    out
}

/// A DT node of the tree model.
#[derive(Clone, Debug, Default, PartialEq)]
struct Node {
    name: String,
    props: Vec<(String, Vec<u8>)>,
    children: Vec<Node>,
}

impl Node {
    fn new(name: &str) -> Node {
        Node {
            name: name.into(),
            ..Node::default()
        }
    }

    fn with(mut self, name: &str, value: impl AsRef<[u8]>) -> Node {
        self.set(name, value);
        self
    }

    fn child(mut self, c: Node) -> Node {
        self.children.push(c);
        self
    }

    fn prop(&self, name: &str) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn u32(&self, name: &str) -> Option<u32> {
        self.prop(name).filter(|v| v.len() == 4).map(|v| be32(v, 0))
    }

    fn set(&mut self, name: &str, value: impl AsRef<[u8]>) -> &mut Node {
        let value = value.as_ref().to_vec();
        match self.props.iter_mut().find(|(n, _)| n == name) {
            Some(p) => p.1 = value,
            None => self.props.push((name.into(), value)),
        }
        self
    }

    fn remove(&mut self, name: &str) {
        self.props.retain(|(n, _)| n != name);
    }

    fn is_compatible(&self, c: &str) -> bool {
        self.prop("compatible")
            .is_some_and(|v| v.split(|&b| b == 0).any(|s| s == c.as_bytes()))
    }
}

/// A blob as a tree: memory reservations and the root node.
#[derive(Clone, Debug)]
struct Tree {
    rsv: Vec<(u64, u64)>,
    root: Node,
}

impl Tree {
    fn parse(dtb: &[u8]) -> Tree {
        let t = Toks::parse(dtb);
        let mut stack: Vec<Node> = Vec::new();
        let mut root = None;
        for tok in t.toks {
            match tok {
                Tok::Begin(name) => stack.push(Node::new(core::str::from_utf8(&name).unwrap())),
                Tok::Prop(off, v) => {
                    let name = cstr(&t.strings, off as usize).unwrap().to_string();
                    stack.last_mut().unwrap().props.push((name, v));
                }
                Tok::End => {
                    let n = stack.pop().unwrap();
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(n),
                        None => root = Some(n),
                    }
                }
                Tok::Nop | Tok::Fin => {}
            }
        }
        Tree {
            rsv: t.rsv,
            root: root.unwrap(),
        }
    }

    fn dtb(&self) -> Vec<u8> {
        fn emit(n: &Node, s: &mut Vec<u8>, strings: &mut Vec<u8>, offs: &mut HashMap<String, u32>) {
            s.extend(FDT_BEGIN_NODE.to_be_bytes());
            s.extend(n.name.as_bytes());
            s.push(0);
            s.resize(align4(s.len()), 0);
            for (name, v) in &n.props {
                let off = *offs.entry(name.clone()).or_insert_with(|| {
                    let o = strings.len() as u32;
                    strings.extend(name.as_bytes());
                    strings.push(0);
                    o
                });
                s.extend(FDT_PROP.to_be_bytes());
                s.extend((v.len() as u32).to_be_bytes());
                s.extend(off.to_be_bytes());
                s.extend(v);
                s.resize(align4(s.len()), 0);
            }
            for c in &n.children {
                emit(c, s, strings, offs);
            }
            s.extend(2u32.to_be_bytes());
        }
        let (mut s, mut strings) = (Vec::new(), Vec::new());
        emit(&self.root, &mut s, &mut strings, &mut HashMap::new());
        s.extend(FDT_END.to_be_bytes());
        assemble(&self.rsv, &s, &strings)
    }

    fn get(&self, path: &str) -> &Node {
        path.split('/')
            .filter(|c| !c.is_empty())
            .fold(&self.root, |n, c| {
                n.children
                    .iter()
                    .find(|k| k.name == c)
                    .unwrap_or_else(|| panic!("no node {path}"))
            })
    }

    fn at(&mut self, path: &str) -> &mut Node {
        let mut n = &mut self.root;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            n = n
                .children
                .iter_mut()
                .find(|k| k.name == c)
                .unwrap_or_else(|| panic!("no node {path}"));
        }
        n
    }

    /// Paths of every node `pred` holds for, in DT order.
    fn paths(&self, pred: impl Fn(&Node) -> bool) -> Vec<String> {
        fn walk(n: &Node, path: String, pred: &dyn Fn(&Node) -> bool, out: &mut Vec<String>) {
            if pred(n) {
                out.push(if path.is_empty() {
                    "/".into()
                } else {
                    path.clone()
                });
            }
            for c in &n.children {
                walk(c, format!("{path}/{}", c.name), pred, out);
            }
        }
        let mut out = Vec::new();
        walk(&self.root, String::new(), &pred, &mut out);
        out
    }

    fn compatible(&self, c: &str) -> Vec<String> {
        self.paths(|n| n.is_compatible(c))
    }

    fn first_compatible(&self, c: &str) -> String {
        self.compatible(c)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no node compatible with {c}"))
    }

    fn by_phandle(&self, phandle: u32) -> Option<String> {
        self.paths(|n| n.u32("phandle") == Some(phandle))
            .into_iter()
            .next()
    }

    /// The node's phandle, given it one (past every other) if it has none.
    fn phandle(&mut self, path: &str) -> u32 {
        if let Some(p) = self.get(path).u32("phandle") {
            return p;
        }
        let next = self
            .paths(|n| n.prop("phandle").is_some())
            .iter()
            .filter_map(|p| self.get(p).u32("phandle"))
            .max()
            .unwrap_or(0)
            + 1;
        self.at(path).set("phandle", cells(&[next]));
        next
    }

    fn ensure(&mut self, parent: &str, name: &str) -> String {
        let path = format!("{}/{name}", parent.trim_end_matches('/'));
        if !self.get(parent).children.iter().any(|c| c.name == name) {
            self.at(parent).children.push(Node::new(name));
        }
        path
    }
}

// ---------------------------------------------------------------------------------------------
// The board fixtures themselves

fn range(base: u64, size: u64) -> MemRange {
    MemRange { base, size }
}

#[test]
fn tree_model_round_trips_every_fixture() {
    for (name, dtb) in FIXTURES {
        let t = Tree::parse(dtb);
        let again = Tree::parse(&t.dtb());
        assert_eq!(again.root, t.root, "{name}");
        assert_eq!(again.rsv, t.rsv, "{name}");
        let tokens = Toks::parse(dtb);
        assert_eq!(Toks::parse(&tokens.dtb()).toks, tokens.toks, "{name}");
        // What the hypervisor reads is the same from the rebuilt blob.
        assert_eq!(
            format!("{:?}", outcome(&t.dtb())),
            format!("{:?}", outcome(dtb)),
            "{name}"
        );
    }
}

#[test]
fn fvp_base_revc() {
    let t = Tree::parse(FVP);
    let smmus = t.compatible("arm,smmu-v3");
    assert_eq!(smmus, ["/iommu@2b400000"]);
    let hb = HostBridge::from_dtb(FVP).unwrap().unwrap();
    // bus-range <0 1> cuts the 256 MiB ECAM window to two buses.
    assert_eq!(hb.ecam, range(0x4000_0000, 2 << 20));
    assert_eq!((hb.bus_start, hb.bus_end), (0, 1));
    assert_eq!(hb.windows.len(), 1);
    assert_eq!(
        hb.mem32_window().map(|w| (w.pci_base, w.cpu_base, w.size)),
        Some((0x5000_0000, 0x5000_0000, 0x1000_0000))
    );
    assert_eq!(hb.iommu_map.len(), 1);
    let e = hb.iommu_map[0];
    assert_eq!((e.rid_base, e.sid_base, e.length), (0, 0, 0x1_0000));
    assert_eq!(t.by_phandle(e.iommu).as_deref(), Some("/iommu@2b400000"));
    assert_eq!(hb.iommu_map_mask, None);
    assert!(hb.dma_coherent);
    // INTA-D on SPIs 168-171; the GIC parent has #address-cells = <2>, which the entries skip.
    let spis: Vec<u32> = hb
        .interrupt_map
        .entries
        .iter()
        .map(|e| e.route.spi)
        .collect();
    assert_eq!(spis, [168, 169, 170, 171]);
    assert_eq!(hb.interrupt_map.mask, [0, 0, 0, 7]);
    // The console PL011 sits behind an `interrupt-map` nexus (one-cell `interrupts`) and two
    // levels of `ranges` (`fvp_console_uart_behind_a_nexus`).
    assert!(Platform::parse(FVP).is_ok());
    assert!(parse_vm_specs(FVP).unwrap().is_empty());
}

#[test]
fn hip07_d05() {
    let t = Tree::parse(D05);
    let smmus = t.compatible("arm,smmu-v3");
    assert_eq!(
        smmus,
        [
            "/iommu@a0040000",
            "/iommu@d0040000",
            "/iommu@8d0040000",
            "/iommu@400d0040000",
            "/iommu@408d0040000"
        ]
    );
    assert_eq!(t.get(&smmus[0]).prop("status"), Some(&b"disabled\0"[..]));
    // The enabled ones interrupt through mbigen, an MSI-to-wired bridge with 2-cell specifiers.
    for p in &smmus[1..] {
        let parent = t
            .by_phandle(t.get(p).u32("interrupt-parent").unwrap())
            .unwrap();
        let mbigen = parent.rsplit_once('/').unwrap().0;
        assert!(t.get(mbigen).is_compatible("hisilicon,mbigen-v2"), "{p}");
        assert_eq!(t.get(&parent).u32("#interrupt-cells"), Some(2), "{p}");
    }
    // Its PCIe host bridge is `hisilicon,hip07-pcie-ecam`, not the generic binding.
    assert_eq!(HostBridge::from_dtb(D05).unwrap(), None);
    // The console (an SBSA UART) also interrupts through mbigen: driven for output, its
    // interrupt not misread as a GIC one.
    let p = Platform::parse(D05).unwrap();
    assert_eq!(p.uart.kind, UartKind::SbsaUart);
    assert_eq!(p.uart.intid, None);
}

#[test]
fn rk3588_rock_5b_with_its_mmu600s() {
    assert_eq!(HostBridge::from_dtb(ROCK5B).unwrap(), None);
    let mut t = Tree::parse(ROCK5B);
    assert_eq!(
        t.compatible("arm,smmu-v3"),
        ["/iommu@fc900000", "/iommu@fcb00000"]
    );
    // The board DT has no /memory (the boot loader adds it): without the one the overlay adds,
    // there is nothing to run VMs in.
    let memory = t
        .root
        .children
        .iter()
        .position(|n| n.name == "memory@0")
        .unwrap();
    let node = t.root.children.remove(memory);
    assert_eq!(Platform::parse(&t.dtb()), Err(PlatformError::NoMemory));
    t.root.children.insert(memory, node);
    let p = Platform::parse(&t.dtb()).unwrap();
    assert_eq!(p.memory, [range(0x20_0000, 0xefe0_0000)]);
    assert_eq!(p.cpus, [0, 0x100, 0x200, 0x300, 0x400, 0x500, 0x600, 0x700]);
    // GIC-600 with 4-cell specifiers (the fourth, the PPI partition, is 0 everywhere).
    assert_eq!(p.gic.gicd, range(0xfe60_0000, 0x1_0000));
    assert_eq!(p.gic.gicr, [range(0xfe68_0000, 0x10_0000)]);
    assert_eq!(p.timer.intids, [29, 30, 27, 26]);
    // stdout-path "serial2:1500000n8": a DesignWare 8250, driven as one.
    assert_eq!(p.uart.base, range(0xfeb5_0000, 0x100));
    assert_eq!(p.uart.intid, Some(32 + 333));
    assert_eq!(p.uart.compatible, "rockchip,rk3588-uart");
    assert!(matches!(p.uart.kind, UartKind::Ns16550 { .. }));
    // The overlay enabled both MMU-600s; the first is mmu600_pcie. Neither is dma-coherent.
    assert_eq!(p.smmus.len(), 2);
    let s = &p.smmus[0];
    assert_eq!(s.regs, range(0xfc90_0000, 0x20_0000));
    assert_eq!(
        (s.eventq_intid, s.gerror_intid),
        (Some(32 + 369), Some(32 + 371))
    );
    assert!(s
        .refused
        .as_deref()
        .is_some_and(|r| r.contains("dma-coherent")));
    // Without the overlay neither would be found.
    for s in ["/iommu@fc900000", "/iommu@fcb00000"] {
        t.at(s).set("status", b"disabled\0");
    }
    assert!(Platform::parse(&t.dtb()).unwrap().smmus.is_empty());
}

#[test]
fn multi_smmu_virt() {
    let t = Tree::parse(MULTI);
    let smmus = t.compatible("arm,smmu-v3");
    assert_eq!(
        smmus,
        ["/iommu@2ce00000", "/iommu@4f400000", "/iommu@4f000000"]
    );
    let p = Platform::parse(MULTI).unwrap();
    assert_eq!(
        p.memory,
        [
            range(0x8000_0000, 0x7f00_0000),
            range(0x80_8000_0000, 0x1_8000_0000)
        ]
    );
    assert_eq!(p.reserved, [range(0xff00_0000, 0x100_0000)]);
    assert_eq!(p.cpus, [0, 0x100, 0x1_0000, 0x1_0100]);
    assert_eq!(p.psci, Some(PsciConduit::Smc));
    assert_eq!(p.gic.gicd, range(0x3000_0000, 0x1_0000));
    assert_eq!(p.gic.gicr, [range(0x300c_0000, 0x8_0000)]);
    assert_eq!(p.uart.base, range(0x2a40_0000, 0x1000));
    assert_eq!(p.uart.intid, Some(32 + 63));
    let hb = HostBridge::from_dtb(MULTI).unwrap().unwrap();
    assert_eq!(hb.ecam, range(0x28_c000_0000, 0x1000_0000));
    assert_eq!((hb.bus_start, hb.bus_end), (0, 255));
    assert_eq!(hb.windows.len(), 3);
    assert!(hb.mem64_window().unwrap().prefetchable);
    assert_eq!(hb.iommu_map_mask, Some(0xffff));
    assert_eq!(hb.stream_id(Bdf::new(1, 2, 3).rid()), Some(0x113));
    // The bridge's iommu-map names the SECOND SMMU of the DT.
    assert_eq!(hb.iommu_map.len(), 1);
    assert_eq!(t.by_phandle(hb.iommu_map[0].iommu), Some(smmus[1].clone()));
    let msi_map = t.get("/pci@28c0000000").prop("msi-map").unwrap();
    assert_eq!(
        t.by_phandle(be32(msi_map, 1)).as_deref(),
        Some("/interrupt-controller@30000000/msi-controller@30040000")
    );
}

/// On a board with several SMMUs, the one that translates PCI DMA is the one the host bridge's
/// `iommu-map` names (here the second in the DT): it is found by phandle and driven.
#[test]
fn pci_smmu_is_the_one_iommu_map_names() {
    let t = Tree::parse(MULTI);
    let hb = HostBridge::from_dtb(MULTI).unwrap().unwrap();
    let target = t.by_phandle(hb.iommu_map[0].iommu).unwrap();
    let reg = t.get(&target).prop("reg").unwrap();
    let base = u64::from(be32(reg, 0)) << 32 | u64::from(be32(reg, 1));
    let p = Platform::parse(MULTI).unwrap();
    let named = p
        .smmus
        .iter()
        .find(|s| s.phandle == Some(hb.iommu_map[0].iommu))
        .unwrap();
    assert_eq!(named.regs.base, base);
    assert_eq!(named.refused, None);
    assert_ne!(
        p.smmus[0].regs.base, base,
        "the first in the DT is another one"
    );
}

/// FVP's console PL011 is behind `bus@8000000`'s `interrupt-map` (one-cell
/// `interrupts = <5>`, SPI 5) and two `ranges` translations (`reg = <0x90000 0x1000>` in
/// iofpga-bus is 0x1c090000 on the CPU side).
#[test]
fn fvp_console_uart_behind_a_nexus() {
    let p = Platform::parse(FVP).unwrap();
    assert_eq!(p.uart.base, range(0x1c09_0000, 0x1000));
    assert_eq!(p.uart.intid, Some(32 + 5));
}

/// Interrupt specifiers are decoded with their own controller's `#interrupt-cells`: an SMMU
/// wired through a 2-cell controller (as D05's are, through mbigen) with
/// `interrupts = <0 1>, <0 1>, <0 1>` must not have its 24 bytes read as two GIC specifiers,
/// <0 1 0> (SPI 1) and <1 0 1> (PPI 0).
#[test]
fn smmu_behind_a_non_gic_parent_is_not_read_as_gic_specifiers() {
    let mut t = Tree::parse(MULTI);
    t.root.children.push(
        Node::new("mbigen")
            .with("interrupt-controller", b"")
            .with("#interrupt-cells", cells(&[2]))
            .with("phandle", cells(&[0x100])),
    );
    let smmu = t.at("/iommu@2ce00000");
    smmu.set("interrupt-parent", cells(&[0x100]));
    smmu.set("interrupts", cells(&[0, 1, 0, 1, 0, 1]));
    let p = Platform::parse(&t.dtb()).unwrap();
    let s = &p.smmus[0];
    assert_eq!((s.eventq_intid, s.gerror_intid), (None, None), "{s:?}");
    assert!(
        s.polled.as_deref().is_some_and(|w| w.contains("/mbigen")),
        "{s:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Mutations of the bytes and tokens, on every fixture

/// Where a valid blob's blocks end (the most a `totalsize` may be cut to).
fn blocks_end(dtb: &[u8]) -> usize {
    let rsv_end = header(dtb, 4) as usize + 16 * (Toks::parse(dtb).rsv.len() + 1);
    [
        header(dtb, 2) as usize + header(dtb, 9) as usize,
        header(dtb, 3) as usize + header(dtb, 8) as usize,
        rsv_end,
    ]
    .into_iter()
    .max()
    .unwrap()
}

#[test]
fn truncated_blobs_are_malformed() {
    let mut c = Corpus::default();
    for (name, dtb) in FIXTURES {
        let end = blocks_end(dtb);
        let cuts = (0..64).chain(spread(dtb.len(), 300)).chain([dtb.len() - 1]);
        for cut in cuts.filter(|&n| n < dtb.len()) {
            c.add(
                format!("{name} cut to {cut}"),
                dtb[..cut].to_vec(),
                MALFORMED,
            );
            // Cut with totalsize saying so: the blocks now run past the end.
            if cut >= 40 {
                let e = if cut < end { MALFORMED } else { RETURNS };
                c.add(
                    format!("{name} cut to {cut} with totalsize {cut}"),
                    with_header(&dtb[..cut], 1, cut as u32),
                    e,
                );
            }
        }
        // A buffer longer than totalsize is fine: the rest is ignored.
        let mut longer = dtb.to_vec();
        longer.extend([0xff; 13]);
        c.add(format!("{name} + 13 bytes"), longer, RETURNS);
    }
    c.add("empty", Vec::new(), MALFORMED);
    c.add("magic only", cells(&[0xd00d_feed]), MALFORMED);
    c.add(
        "bare header",
        assemble(&[], &[], &[])[..40].to_vec(),
        MALFORMED,
    );
    c.add("no root", assemble(&[], &cells(&[FDT_END]), &[]), MALFORMED);
    let n = check(c);
    assert!(n > 4000, "only {n} cases");
}

#[test]
fn bad_header_fields() {
    let mut c = Corpus::default();
    for (name, dtb) in FIXTURES {
        let len = dtb.len() as u32;
        let end = blocks_end(dtb) as u32;
        for field in 0..10 {
            let orig = header(dtb, field);
            let mut values = vec![
                0,
                1,
                3,
                4,
                16,
                17,
                18,
                39,
                40,
                41,
                end - 1,
                len - 1,
                len,
                len + 1,
                len + 4,
                0x7fff_ffff,
                0x8000_0000,
                0xffff_fffc,
                0xffff_ffff,
                orig.wrapping_add(1),
                orig.wrapping_sub(1),
                orig.wrapping_add(4),
                orig.wrapping_sub(4),
                orig ^ 0x8000_0000,
            ];
            values.sort_unstable();
            values.dedup();
            values.retain(|&v| v != orig);
            let keep = spread(values.len(), share(name, values.len()).max(8));
            for v in keep.into_iter().map(|i| values[i]) {
                let blob = with_header(dtb, field, v);
                let (total, off_struct, off_strings) =
                    (header(&blob, 1), header(&blob, 2), header(&blob, 3));
                let (size_strings, size_struct) = (header(&blob, 8), header(&blob, 9));
                let outside =
                    |off: u32, size: u32| u64::from(off) + u64::from(size) > u64::from(total);
                let malformed = match field {
                    0 => true,
                    1 => v < 40 || v > len || v < end,
                    2 => outside(off_struct, size_struct),
                    3 => outside(off_strings, size_strings),
                    4 => outside(v, 16),
                    5 => v < 17,
                    6 => v > 17,
                    8 => outside(off_strings, size_strings),
                    9 => v < orig || outside(off_struct, v),
                    _ => false,
                };
                let e = if malformed { MALFORMED } else { RETURNS };
                c.add(
                    format!("{name} header[{field}] {orig:#x} -> {v:#x}"),
                    blob,
                    e,
                );
            }
        }
    }
    let n = check(c);
    assert!(n > 800, "only {n} cases");
}

#[test]
fn corrupted_structure_tokens() {
    let mut c = Corpus::default();
    for (name, dtb) in FIXTURES {
        let toks = token_offsets(dtb);
        for i in spread(toks.len(), share(name, 80)) {
            let (off, tok) = toks[i];
            let mut values: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 9, 0xffff_ffff];
            values.extend([0, 1, 2, 3, 8, 31].map(|b| tok ^ 1 << b));
            values.sort_unstable();
            values.dedup();
            for v in values.into_iter().filter(|&v| v != tok) {
                let known = matches!(v, FDT_BEGIN_NODE | 2 | FDT_PROP | FDT_NOP | FDT_END);
                // An unknown token, a lost END_NODE or a lost FDT_END cannot pass.
                let malformed = !known || (tok == 2 && v == FDT_NOP) || tok == FDT_END;
                let e = if malformed { MALFORMED } else { RETURNS };
                c.add(
                    format!("{name} token {i} at {off:#x}: {tok} -> {v:#x}"),
                    with_u32(dtb, off, v),
                    e,
                );
            }
        }
    }
    let n = check(c);
    assert!(n > 2500, "only {n} cases");
}

#[test]
fn bad_property_headers() {
    let mut c = Corpus::default();
    for (name, dtb) in FIXTURES {
        let struct_end = (header(dtb, 2) + header(dtb, 9)) as usize;
        let size_strings = header(dtb, 8);
        let props: Vec<usize> = token_offsets(dtb)
            .into_iter()
            .filter(|&(_, t)| t == FDT_PROP)
            .map(|(off, _)| off)
            .collect();
        for i in spread(props.len(), share(name, 40)) {
            let off = props[i];
            let len = read_u32(dtb, off + 4).unwrap();
            let nameoff = read_u32(dtb, off + 8).unwrap();
            let room = (struct_end - off - 12) as u32;
            let label = |what: &str| format!("{name} property {i} at {off:#x}: {what}");
            for v in [room + 1, room + 4, 0x7fff_ffff, 0xffff_fffc, 0xffff_ffff] {
                c.add(
                    label(&format!("len {len} -> {v:#x}")),
                    with_u32(dtb, off + 4, v),
                    MALFORMED,
                );
            }
            for v in [
                0,
                len + 1,
                len + 4,
                len.saturating_sub(1),
                len.saturating_sub(4),
            ] {
                if v != len {
                    c.add(
                        label(&format!("len {len} -> {v}")),
                        with_u32(dtb, off + 4, v),
                        RETURNS,
                    );
                }
            }
            for v in [size_strings, size_strings + 7, 0x7fff_ffff, 0xffff_ffff] {
                c.add(
                    label(&format!("name offset {nameoff} -> {v:#x}")),
                    with_u32(dtb, off + 8, v),
                    MALFORMED,
                );
            }
            // The strings block's last NUL (an empty name), and the middle of a name.
            for v in [size_strings - 1, nameoff + 1] {
                c.add(
                    label(&format!("name offset {nameoff} -> {v}")),
                    with_u32(dtb, off + 8, v),
                    RETURNS,
                );
            }
        }
        // Names that are not UTF-8 or contain '/', through the strings block.
        let strings_at = header(dtb, 3) as usize;
        for (byte, what) in [(0xff, "not UTF-8"), (b'/', "with '/'")] {
            let mut blob = dtb.to_vec();
            blob[strings_at] = byte;
            c.add(
                format!("{name}: first property name {what}"),
                blob,
                MALFORMED,
            );
        }
    }
    let n = check(c);
    assert!(n > 2000, "only {n} cases");
}

#[test]
fn unbalanced_and_misplaced_nodes() {
    let mut c = Corpus::default();
    for (name, dtb) in FIXTURES {
        let base = Toks::parse(dtb);
        let n = base.toks.len();
        let mut edit = |what: String, e: Expect, f: &dyn Fn(&mut Vec<Tok>)| {
            let mut t = base.clone();
            f(&mut t.toks);
            c.add(format!("{name}: {what}"), t.dtb(), e);
        };
        let ends: Vec<usize> = (0..n).filter(|&i| base.toks[i] == Tok::End).collect();
        for &i in spread(ends.len(), 12).iter().map(|&k| &ends[k]) {
            edit(format!("END_NODE {i} removed"), MALFORMED, &|t| {
                t.remove(i);
            });
        }
        for i in spread(n, 12) {
            edit(format!("END_NODE inserted at {i}"), MALFORMED, &|t| {
                t.insert(i, Tok::End)
            });
            edit(format!("BEGIN_NODE inserted at {i}"), MALFORMED, &|t| {
                t.insert(i, Tok::Begin(b"extra".to_vec()))
            });
        }
        edit("FDT_END removed".into(), MALFORMED, &|t| {
            t.pop();
        });
        edit("FDT_END twice".into(), RETURNS, &|t| t.push(Tok::Fin));
        edit("a second root".into(), MALFORMED, &|t| {
            t.insert(n - 1, Tok::Begin(Vec::new()));
            t.insert(n, Tok::End);
        });
        edit("a property before the root".into(), MALFORMED, &|t| {
            t.insert(0, Tok::Prop(0, vec![0; 4]))
        });
        // The root's first property moved after its first child node.
        let first_child_end = {
            let mut depth = 0;
            (1..n)
                .find(|&i| {
                    match base.toks[i] {
                        Tok::Begin(_) => depth += 1,
                        Tok::End => {
                            depth -= 1;
                            return depth == 0;
                        }
                        _ => {}
                    }
                    false
                })
                .unwrap()
        };
        edit("a property after a subnode".into(), MALFORMED, &|t| {
            let p = t.remove(1);
            t.insert(first_child_end, p);
        });
        edit("a node name that is not UTF-8".into(), MALFORMED, &|t| {
            let b = 1 + t[1..]
                .iter()
                .position(|x| matches!(x, Tok::Begin(_)))
                .unwrap();
            t[b] = Tok::Begin(vec![0xff, 0xfe]);
        });
    }
    let n = check(c);
    assert!(n > 250, "only {n} cases");
}

/// Nodes nested `depth` deep (each one level below the last) just before `path` closes.
fn nested_under(base: &Toks, path: &str, depth: usize) -> Vec<u8> {
    let mut t = base.clone();
    let at = t.end_of(path);
    let chain = (0..depth)
        .map(|i| Tok::Begin(format!("n{i}").into_bytes()))
        .chain(core::iter::repeat_n(Tok::End, depth));
    t.toks.splice(at..at, chain);
    t.dtb()
}

#[test]
fn deep_and_wide_nesting() {
    // `fdt` keeps 64 parents, so `check_blob` allows nodes 63 deep (the root is 1).
    let mut c = Corpus::default();
    for (name, dtb) in [
        ("qemu-smmu", QEMU_SMMU),
        ("multi", MULTI),
        ("rock5b", ROCK5B),
    ] {
        let base = Toks::parse(dtb);
        let ok = if Platform::parse(dtb).is_ok() {
            PLATFORM_OK
        } else {
            RETURNS
        };
        let pci = Tree::parse(dtb).compatible("pci-host-ecam-generic");
        for path in ["/chosen"]
            .into_iter()
            .chain(pci.iter().map(String::as_str))
        {
            // `path` is 2 deep.
            for d in [1, 30, 61] {
                c.add(
                    format!("{name}: {d} deep under {path}"),
                    nested_under(&base, path, d),
                    ok,
                );
            }
            for d in [62, 63, 64, 100, 4096] {
                c.add(
                    format!("{name}: {d} deep under {path}"),
                    nested_under(&base, path, d),
                    MALFORMED,
                );
            }
        }
        let mut wide = base.clone();
        let at = wide.end_of("/chosen");
        let siblings =
            (0..3000).flat_map(|i| [Tok::Begin(format!("n@{i}").into_bytes()), Tok::End]);
        wide.toks.splice(at..at, siblings);
        c.add(format!("{name}: 3000 children of /chosen"), wide.dtb(), ok);
    }
    // The deepest VM node a VM may still be read from.
    let vm = Toks::parse(&with_vm(QEMU_SMMU).dtb());
    c.add(
        "vm 60 deep",
        nested_under(&vm, "/chosen/vm0", 60),
        PLATFORM_OK,
    );
    c.add(
        "vm 61 deep",
        nested_under(&vm, "/chosen/vm0", 61),
        MALFORMED,
    );
    let n = check(c);
    assert!(n > 40, "only {n} cases");
}

#[test]
fn random_bit_flips() {
    let mut c = Corpus::default();
    let mut rng = Rng(0x5eed_d7b5);
    for (name, dtb) in FIXTURES {
        // Most flips land in property values, so most of these blobs are read in full.
        let n = share(name, if name == "multi" { 300 } else { 120 });
        for k in 0..n {
            let mut blob = dtb.to_vec();
            let flips = 1 + rng.next() % 4;
            let mut what = Vec::new();
            for _ in 0..flips {
                let at = (rng.next() % dtb.len() as u64) as usize;
                let bit = rng.next() % 8;
                blob[at] ^= 1 << bit;
                what.push(format!("{at:#x}.{bit}"));
            }
            c.add(
                format!("{name} flip #{k}: {}", what.join(" ")),
                blob,
                RETURNS,
            );
        }
        // Interesting words at aligned offsets of the structure block.
        let (s, len) = (header(dtb, 2) as usize, header(dtb, 9) as usize);
        for k in 0..n / 2 {
            let at = s + (rng.next() as usize % (len / 4)) * 4;
            let v = [0, 1, 2, 3, 4, 9, 0xffff_ffff, dtb.len() as u32][k % 8];
            c.add(
                format!("{name} word {at:#x} = {v:#x}"),
                with_u32(dtb, at, v),
                RETURNS,
            );
        }
    }
    let n = check(c);
    assert!(n > 800, "only {n} cases");
}

// ---------------------------------------------------------------------------------------------
// Mutations of properties and nodes, on bases every entry point accepts

/// The fixture with a boot module in /chosen (for `Platform::modules`) and a VM node.
fn with_vm(dtb: &[u8]) -> Tree {
    let mut t = Tree::parse(dtb);
    let chosen = t.ensure("/", "chosen");
    let kernel = |addr: u32| {
        Node::new(&format!("module@{addr:x}"))
            .with("compatible", b"multiboot,kernel\0multiboot,module\0")
            .with("reg", cells(&[0, addr, 0, 0x100_0000]))
            .with("bootargs", b"console=ttyAMA0\0")
    };
    let vm = Node::new("vm0")
        .with("compatible", b"smmu-hv,vm\0")
        .with("#address-cells", cells(&[2]))
        .with("#size-cells", cells(&[2]))
        .with("smmu-hv,name", b"guest\0")
        .with("cpus", cells(&[2]))
        .with("smmu-hv,cpus", cells(&[0, 1]))
        .with("memory", cells(&[0, 0x4_0000]))
        .with("smmu-hv,pci-devices", b"00:01.0\0")
        .child(kernel(0x4a00_0000))
        .child(
            Node::new("module@50000000")
                .with("compatible", b"multiboot,ramdisk\0multiboot,module\0")
                .with("reg", cells(&[0, 0x5000_0000, 0, 0x10_0000])),
        );
    let chosen = t.at(&chosen);
    chosen.children.push(kernel(0x4800_0000));
    chosen.children.push(vm);
    t
}

const SEMANTIC_BASES: [(&str, &[u8]); 2] = [("qemu-smmu", QEMU_SMMU), ("multi", MULTI)];

#[test]
fn semantic_bases_are_accepted_by_every_entry_point() {
    for (name, dtb) in SEMANTIC_BASES {
        let dtb = with_vm(dtb).dtb();
        let p = Platform::parse(&dtb).unwrap();
        assert_eq!(p.modules.len(), 1, "{name}");
        assert!(HostBridge::from_dtb(&dtb).unwrap().is_some(), "{name}");
        let vms = parse_vm_specs(&dtb).unwrap();
        assert_eq!(vms.len(), 1, "{name}");
        let vm = vms[0].as_ref().unwrap();
        assert_eq!(
            (vm.name.as_str(), vm.vcpus, vm.mem_size),
            ("guest", 2, 0x4_0000 << 10)
        );
        assert_eq!(vm.pci_devices, [Bdf::new(0, 1, 0).into()]);
    }
}

/// Where the interesting nodes of a semantic base are.
struct Paths {
    gic: String,
    its: String,
    uart: String,
    pci: String,
    /// The first enabled SMMU, the one `Platform::parse` reads.
    smmu: String,
    /// The SMMU the host bridge's `iommu-map` names.
    pci_smmu: String,
    /// Bytes per `interrupt-map` entry of the host bridge (all name the GIC).
    intmap_entry: usize,
    timer: String,
    memory: String,
    cpu0: String,
}

fn paths(t: &Tree) -> Paths {
    let pci = t.first_compatible("pci-host-ecam-generic");
    let iommu_map = t.get(&pci).prop("iommu-map").unwrap();
    let gic = t.get(&t.first_compatible("arm,gic-v3")).clone();
    let gic_cells = gic.u32("#address-cells").unwrap_or(0) + gic.u32("#interrupt-cells").unwrap();
    Paths {
        pci_smmu: t.by_phandle(be32(iommu_map, 1)).unwrap(),
        intmap_entry: 4 * (5 + gic_cells as usize),
        gic: t.first_compatible("arm,gic-v3"),
        its: t.first_compatible("arm,gic-v3-its"),
        uart: t.first_compatible("arm,pl011"),
        pci,
        smmu: t.first_compatible("arm,smmu-v3"),
        timer: t.first_compatible("arm,armv8-timer"),
        memory: t.paths(|n| n.name.starts_with("memory@"))[0].clone(),
        cpu0: t.paths(|n| n.prop("device_type") == Some(b"cpu\0"))[0].clone(),
    }
}

const VM: &str = "/chosen/vm0";
const VM_KERNEL: &str = "/chosen/vm0/module@4a000000";
const CHOSEN_MODULE: &str = "/chosen/module@48000000";

/// Builds cases from one semantic base: each a copy of it, edited.
struct Sem<'a> {
    name: &'a str,
    base: &'a Tree,
    corpus: &'a mut Corpus,
}

impl Sem<'_> {
    fn case(&mut self, what: impl AsRef<str>, e: Expect, f: impl FnOnce(&mut Tree)) {
        let mut t = self.base.clone();
        f(&mut t);
        self.corpus
            .add(format!("{}: {}", self.name, what.as_ref()), t.dtb(), e);
    }

    fn set(&mut self, path: &str, prop: &str, value: impl AsRef<[u8]>, e: Expect) {
        let v = value.as_ref().to_vec();
        let what = format!("{path} {prop} = {v:02x?}");
        self.case(short(what), e, |t| {
            t.at(path).set(prop, v);
        });
    }
}

fn semantic(check_cases: impl Fn(&mut Sem<'_>, &Paths)) -> usize {
    let mut corpus = Corpus::default();
    for (name, dtb) in SEMANTIC_BASES {
        let base = with_vm(dtb);
        let p = paths(&base);
        check_cases(
            &mut Sem {
                name,
                base: &base,
                corpus: &mut corpus,
            },
            &p,
        );
    }
    assert!(corpus.count(RETURNS) > 0);
    check(corpus)
}

const DANGLING: [u32; 3] = [0xdead, 0, 0xffff_ffff];

#[test]
fn loops_and_cycles() {
    let n = semantic(|s, p| {
        // Aliases naming aliases, themselves, or paths through aliases: stdout-path resolves
        // none of them and the first PL011 (the console on both bases) is used.
        for (what, aliases, stdout) in [
            (
                "alias cycle",
                &[("loopa", "loopb"), ("loopb", "loopa")][..],
                "loopa",
            ),
            ("alias naming itself", &[("self", "self")], "self:115200"),
            (
                "alias naming itself with options",
                &[("opt", "opt:9600")],
                "opt",
            ),
            ("alias to an alias path", &[("loopa", "/loopa")], "loopa"),
            (
                "alias to an alias of a path",
                &[("a", "b"), ("b", "/aliases")],
                "a",
            ),
        ] {
            s.case(what, PLATFORM_OK, |t| {
                let a = t.ensure("/", "aliases");
                for (k, v) in aliases {
                    t.at(&a).set(k, format!("{v}\0"));
                }
                t.at("/chosen").set("stdout-path", format!("{stdout}\0"));
            });
        }
        // interrupt-parent cycles: A's parent is B and B's is A, wired to the console, the
        // SMMU, the bridge and the root; then nodes that are their own parent.
        s.case("interrupt-parent cycle", RETURNS, |t| {
            for n in ["ic-a", "ic-b"] {
                t.root.children.push(
                    Node::new(n)
                        .with("interrupt-controller", b"")
                        .with("#interrupt-cells", cells(&[3])),
                );
            }
            let (a, b) = (t.phandle("/ic-a"), t.phandle("/ic-b"));
            t.at("/ic-a").set("interrupt-parent", cells(&[b]));
            t.at("/ic-b").set("interrupt-parent", cells(&[a]));
            for path in [&p.uart, &p.smmu, &p.pci] {
                t.at(path).set("interrupt-parent", cells(&[a]));
            }
            t.root.set("interrupt-parent", cells(&[b]));
        });
        for (what, path) in [("console", &p.uart), ("GIC", &p.gic), ("SMMU", &p.smmu)] {
            s.case(
                format!("{what} is its own interrupt-parent"),
                RETURNS,
                |t| {
                    let me = t.phandle(path);
                    t.at(path).set("interrupt-parent", cells(&[me]));
                },
            );
        }
        s.case("interrupt-map parents in a cycle", RETURNS, |t| {
            t.root.children.push(
                Node::new("ic-a")
                    .with("interrupt-controller", b"")
                    .with("#interrupt-cells", cells(&[3])),
            );
            let a = t.phandle("/ic-a");
            t.at("/ic-a").set("interrupt-parent", cells(&[a]));
            let mut map = t.get(&p.pci).prop("interrupt-map").unwrap().to_vec();
            for entry in map.chunks_exact_mut(p.intmap_entry) {
                entry[16..20].copy_from_slice(&a.to_be_bytes());
            }
            t.at(&p.pci).set("interrupt-map", map);
        });
        s.case("SMMU is its own msi-parent", RETURNS, |t| {
            let me = t.phandle(&p.smmu);
            t.at(&p.smmu).set("msi-parent", cells(&[me, 0]));
        });
        s.case("host bridge's iommu-map names itself", BRIDGE_ERR, |t| {
            let me = t.phandle(&p.pci);
            t.at(&p.pci).set("iommu-map", cells(&[0, me, 0, 0x1_0000]));
        });
    });
    assert!(n > 20, "only {n} cases");
}

#[test]
fn wrong_cell_counts() {
    let n = semantic(|s, p| {
        for v in [0, 5, 0x8000_0000, 0xffff_ffff] {
            // The root's cell sizes are those of /memory's reg.
            s.set("/", "#address-cells", cells(&[v]), PLATFORM_ERR);
            s.set("/", "#size-cells", cells(&[v]), PLATFORM_ERR);
            s.set("/cpus", "#address-cells", cells(&[v]), PLATFORM_ERR);
            if v != 0 {
                s.set("/cpus", "#size-cells", cells(&[v]), PLATFORM_ERR);
                s.set("/chosen", "#size-cells", cells(&[v]), PLATFORM_ERR);
            }
            s.set("/chosen", "#address-cells", cells(&[v]), PLATFORM_ERR);
            s.set(&p.gic, "#interrupt-cells", cells(&[v]), PLATFORM_ERR);
            s.set(&p.gic, "#address-cells", cells(&[v]), RETURNS);
            s.set(&p.pci, "#address-cells", cells(&[v]), BRIDGE_ERR);
            s.set(&p.pci, "#size-cells", cells(&[v]), BRIDGE_ERR);
            s.set(&p.pci, "#interrupt-cells", cells(&[v]), BRIDGE_ERR);
            s.set(VM, "#address-cells", cells(&[v]), VM_REFUSED);
            s.set(VM, "#size-cells", cells(&[v]), VM_REFUSED);
            s.set(&p.pci_smmu, "#iommu-cells", cells(&[v]), BRIDGE_ERR);
            s.set(&p.its, "#msi-cells", cells(&[v]), RETURNS);
        }
        s.set("/chosen", "#size-cells", cells(&[0]), RETURNS);
        // Cell counts that are not one cell: `fdt` would `expect` these.
        for len in [0, 1, 3, 5, 8] {
            let v = vec![0u8; len];
            for path in ["/", "/cpus", &p.pci, VM] {
                s.set(path, "#address-cells", &v, MALFORMED);
                s.set(path, "#size-cells", &v, MALFORMED);
            }
            s.set(&p.gic, "#interrupt-cells", &v, PLATFORM_ERR);
            s.set(&p.pci, "#interrupt-cells", &v, BRIDGE_ERR);
            s.set(&p.pci_smmu, "#iommu-cells", &v, BRIDGE_ERR);
        }
    });
    assert!(n > 100, "only {n} cases");
}

#[test]
fn dangling_phandles() {
    let n = semantic(|s, p| {
        for ph in DANGLING {
            s.set("/", "interrupt-parent", cells(&[ph]), RETURNS);
            s.set(&p.uart, "interrupt-parent", cells(&[ph]), RETURNS);
            s.set(&p.smmu, "interrupt-parent", cells(&[ph]), RETURNS);
            s.set(
                &p.pci,
                "iommu-map",
                cells(&[0, ph, 0, 0x1_0000]),
                BRIDGE_ERR,
            );
            s.set(&p.pci, "msi-map", cells(&[0, ph, 0, 0x1_0000]), RETURNS);
            s.set(&p.pci, "msi-parent", cells(&[ph]), RETURNS);
            s.set(&p.pci, "iommus", cells(&[ph, 0]), RETURNS);
            s.set(&p.smmu, "msi-parent", cells(&[ph, 0]), RETURNS);
            s.set(
                &p.smmu,
                "interrupts-extended",
                cells(&[ph, 0, 1, 4]),
                RETURNS,
            );
            // The console with only interrupts-extended, naming nothing: no usable interrupt.
            s.case(
                format!("console interrupts-extended <{ph:#x} ...>"),
                PLATFORM_ERR,
                |t| {
                    let u = t.at(&p.uart);
                    u.remove("interrupts");
                    u.set("interrupts-extended", cells(&[ph, 0, 1, 4]));
                },
            );
            s.case(format!("interrupt-map parent {ph:#x}"), BRIDGE_ERR, |t| {
                let mut map = t.get(&p.pci).prop("interrupt-map").unwrap().to_vec();
                map[16..20].copy_from_slice(&ph.to_be_bytes());
                t.at(&p.pci).set("interrupt-map", map);
            });
            s.case(
                format!("second iommu-map entry names {ph:#x}"),
                BRIDGE_ERR,
                |t| {
                    let smmu = t.phandle(&p.smmu);
                    t.at(&p.pci).set(
                        "iommu-map",
                        cells(&[0, smmu, 0, 0x100, 0x100, ph, 0x100, 0x100]),
                    );
                },
            );
        }
        // iommu-map naming something that is no IOMMU.
        s.case("iommu-map names the GIC", BRIDGE_ERR, |t| {
            let gic = t.phandle(&p.gic);
            t.at(&p.pci).set("iommu-map", cells(&[0, gic, 0, 0x1_0000]));
        });
        s.case("iommu-map names the console", BRIDGE_ERR, |t| {
            let uart = t.phandle(&p.uart);
            t.at(&p.pci)
                .set("iommu-map", cells(&[0, uart, 0, 0x1_0000]));
        });
        s.case(
            "iommu-map names a node with a 0-cell phandle",
            BRIDGE_ERR,
            |t| {
                t.root.children.push(
                    Node::new("odd")
                        .with("phandle", b"")
                        .with("#iommu-cells", cells(&[1])),
                );
                t.at(&p.pci).set("iommu-map", cells(&[0, 0, 0, 0x1_0000]));
            },
        );
        // Malformed and duplicate phandles.
        for len in [0, 2, 8] {
            s.set(&p.gic, "phandle", vec![0u8; len], RETURNS);
            s.set(&p.smmu, "phandle", vec![0x80u8; len], RETURNS);
        }
        s.case("the console has the SMMU's phandle", RETURNS, |t| {
            let smmu = t.phandle(&p.smmu);
            t.at(&p.uart).set("phandle", cells(&[smmu]));
        });
        s.case("iommu-map entry past RID space", BRIDGE_ERR, |t| {
            let smmu = t.phandle(&p.smmu);
            t.at(&p.pci)
                .set("iommu-map", cells(&[0xff00, smmu, 0, 0x200]));
        });
        s.case("iommu-map entry past StreamID space", BRIDGE_ERR, |t| {
            let smmu = t.phandle(&p.smmu);
            t.at(&p.pci)
                .set("iommu-map", cells(&[0, smmu, 0xffff_ff00, 0x1_0000]));
        });
    });
    assert!(n > 50, "only {n} cases");
}

#[test]
fn lengths_that_are_not_whole_entries() {
    let n = semantic(|s, p| {
        let cpu_cells = s.base.get("/cpus").u32("#address-cells").unwrap();
        // (node, property, entry bytes, exact length, expectation when not whole, when empty)
        let table: Vec<(&str, &str, u32, bool, Expect, Expect)> = vec![
            (&p.pci, "iommu-map", 16, false, BRIDGE_ERR, RETURNS),
            (&p.pci, "msi-map", 16, false, RETURNS, RETURNS),
            (
                &p.pci,
                "interrupt-map",
                p.intmap_entry as u32,
                false,
                BRIDGE_ERR,
                RETURNS,
            ),
            (&p.pci, "ranges", 28, false, BRIDGE_ERR, RETURNS),
            (&p.pci, "reg", 16, false, BRIDGE_ERR, BRIDGE_ERR),
            (&p.pci, "bus-range", 8, true, BRIDGE_ERR, BRIDGE_ERR),
            (
                &p.pci,
                "interrupt-map-mask",
                16,
                true,
                BRIDGE_ERR,
                BRIDGE_ERR,
            ),
            (&p.pci, "linux,pci-domain", 4, true, RETURNS, RETURNS),
            (&p.gic, "reg", 16, false, PLATFORM_ERR, PLATFORM_ERR),
            (&p.gic, "interrupts", 12, false, PLATFORM_ERR, PLATFORM_ERR),
            (&p.uart, "reg", 16, false, PLATFORM_ERR, PLATFORM_ERR),
            // A console without an interrupt still prints (input is lost).
            (&p.uart, "interrupts", 12, false, PLATFORM_ERR, RETURNS),
            // An SMMU with an unusable reg is refused on its own (`SmmuInfo::refused`): the
            // rest of the machine is still described.
            (&p.smmu, "reg", 16, false, RETURNS, RETURNS),
            (&p.smmu, "interrupts", 12, false, PLATFORM_ERR, RETURNS),
            (
                &p.timer,
                "interrupts",
                12,
                false,
                PLATFORM_ERR,
                PLATFORM_ERR,
            ),
            (&p.memory, "reg", 16, false, PLATFORM_ERR, PLATFORM_ERR),
            (
                &p.cpu0,
                "reg",
                4 * cpu_cells,
                false,
                PLATFORM_ERR,
                PLATFORM_ERR,
            ),
            (CHOSEN_MODULE, "reg", 16, false, PLATFORM_ERR, PLATFORM_ERR),
            (VM, "cpus", 4, true, VM_REFUSED, VM_REFUSED),
            (VM, "memory", 8, true, VM_REFUSED, VM_REFUSED),
            (VM, "smmu-hv,cpus", 4, false, VM_REFUSED, VM_REFUSED),
            (VM_KERNEL, "reg", 16, true, VM_REFUSED, VM_REFUSED),
        ];
        for (path, prop, stride, exact, bad, empty) in table {
            let orig = s.base.get(path).prop(prop).unwrap().to_vec();
            let l = orig.len();
            let lens = [l + 1, l + 2, l + 3, l + 4, 1]
                .into_iter()
                .chain([1, 2, 3, 4].into_iter().filter_map(|d| l.checked_sub(d)));
            for len in lens.chain([0]) {
                let mut v = orig.clone();
                v.resize(len, 0);
                let whole = if exact {
                    len == stride as usize
                } else {
                    len % stride as usize == 0
                };
                let e = match len {
                    0 => empty,
                    _ if whole => RETURNS,
                    _ => bad,
                };
                s.case(format!("{path} {prop} {l} -> {len} bytes"), e, |t| {
                    t.at(path).set(prop, v);
                });
            }
        }
        // String properties: unterminated, empty, not UTF-8.
        s.set("/chosen", "stdout-path", b"/nowhere", PLATFORM_OK);
        s.set("/chosen", "stdout-path", b"\xff\xfe\0", PLATFORM_OK);
        s.set("/chosen", "stdout-path", b"", PLATFORM_OK);
        s.set("/chosen", "stdout-path", b"/chosen\0", RETURNS);
        s.set("/chosen", "stdout-path", b"/\0", RETURNS);
        for odd in [
            "//",
            "/chosen/",
            "/@",
            "///x",
            "/chosen/../chosen",
            ":",
            "/:x",
        ] {
            s.set("/chosen", "stdout-path", format!("{odd}\0"), RETURNS);
        }
        s.set("/chosen", "bootargs", b"\xff\0", PLATFORM_OK);
        s.set(&p.gic, "compatible", b"arm,gic-v3", RETURNS);
        s.set(&p.gic, "compatible", b"", PLATFORM_ERR);
        s.set(&p.smmu, "status", b"disabled", RETURNS);
        s.set(
            &p.smmu,
            "interrupt-names",
            b"eventq\0\xff\0gerr",
            PLATFORM_OK,
        );
        s.set(&p.smmu, "interrupt-names", b"", PLATFORM_OK);
        s.set(VM_KERNEL, "bootargs", b"console=ttyAMA0", VM_REFUSED);
        s.set(VM, "smmu-hv,name", b"\0", VM_REFUSED);
        s.set(VM, "smmu-hv,name", b"\xff\0", VM_REFUSED);
        s.set(VM, "smmu-hv,pci-devices", b"junk\0", VM_REFUSED);
        s.set(
            VM,
            "smmu-hv,pci-devices",
            b"00:01.0\x0000:01.0\0",
            VM_REFUSED,
        );
        s.set(VM, "smmu-hv,pci-devices", b"00:01.0", RETURNS);
        s.case("property named with '/'", MALFORMED, |t| {
            t.at(&p.uart).set("a/b", b"x\0");
        });
        s.case("node named with '/'", RETURNS, |t| {
            t.root.children.push(Node::new("a/b"));
        });
        s.case("memory reservation wraps", MALFORMED, |t| {
            t.rsv.push((u64::MAX - 0xfff, 0x2000));
        });
        s.case("empty memory reservation", PLATFORM_OK, |t| {
            t.rsv.push((0x1000, 0));
        });
    });
    assert!(n > 400, "only {n} cases");
}

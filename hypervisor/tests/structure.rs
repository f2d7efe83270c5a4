//! The layering rules of `docs/design.md` section 2, checked on the sources:
//!
//! - `unsafe` appears in code only under `boot/` and `hypervisor/src/arch/` (the compiler
//!   checks the hypervisor crate's other modules through `#![deny(unsafe_code)]`; this also
//!   covers the `smmu` crate, the test tooling and `qemu/runner/`, where only the two host benchmarks
//!   listed in [`HOST_ONLY_UNSAFE`] may use it);
//! - no import cycle: between the hypervisor's top-level modules, and between sibling modules
//!   anywhere below them (a directory module counts with everything under it);
//! - `devices/` never reaches the VM (`crate::vm`) or the machine (`crate::arch`): a device gets
//!   guest RAM and an interrupt port, and the `hw` port is the machine's one way in.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Host-only programs that need `unsafe` for what has no safe form: libc's per-thread scheduling
/// and rusage calls. Never linked into the hypervisor. (The micro-benchmarks in smmu/benches/
/// count allocations with divan's `AllocProfiler` and need none.)
const HOST_ONLY_UNSAFE: &[&str] = &["smmu/examples/shared_smmu_flood_bench.rs"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            // Build output and fuzz corpora are not sources.
            if name != "target" && !name.starts_with('.') && name != "corpus" {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// The file's code with comments and string/char literals blanked, so that words in prose or
/// messages are not taken for code.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && matches!(b.get(i + 1), Some(b'"') | Some(b'#')) && !ident(b, i) {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            out.push_str("' '");
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // '\n', '\x00', '\u{..}'
            let mut j = i + 2;
            while j < b.len() && b[j] != b'\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Whether the byte before `i` continues an identifier (so `b[i]` is not a token start).
fn ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Whether `code` uses the `unsafe` keyword (lint names such as `unsafe_code` do not count).
fn uses_unsafe(code: &str) -> bool {
    let b = code.as_bytes();
    code.match_indices("unsafe").any(|(i, _)| {
        let after = b.get(i + 6).copied().unwrap_or(b' ');
        !(ident(b, i) || after.is_ascii_alphanumeric() || after == b'_')
    })
}

#[test]
fn unsafe_only_in_boot_and_arch() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in ["boot", "hypervisor", "smmu", "tests", "qemu/runner"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 100, "found only {} sources", files.len());
    let mut offenders = Vec::new();
    let mut in_arch = 0;
    for f in &files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let code = code_only(&fs::read_to_string(f).unwrap());
        if !uses_unsafe(&code) {
            continue;
        }
        if rel.starts_with("hypervisor/src/arch/") {
            in_arch += 1;
        } else if !rel.starts_with("boot/") && !HOST_ONLY_UNSAFE.contains(&rel.as_str()) {
            offenders.push(rel);
        }
    }
    assert!(
        offenders.is_empty(),
        "`unsafe` outside boot/ and hypervisor/src/arch/: {offenders:?}"
    );
    // The check sees the keyword where it is: arch/ has it.
    assert!(
        in_arch > 0,
        "no `unsafe` found in hypervisor/src/arch/: the scan is broken"
    );
}

/// The names a `use`/path names at the head of `crate::` / `super::`: for `crate::{a, b::c}`
/// both `a` and `b`.
fn heads_after(code: &str, prefix: &str) -> Vec<(usize, String)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        if ident(b, i) {
            continue;
        }
        let mut j = i + prefix.len();
        if b.get(j) == Some(&b'{') {
            // A group: the top-level names in it.
            let mut depth = 0;
            let mut name = String::new();
            let mut at_head = true;
            while j < b.len() {
                let c = b[j] as char;
                match c {
                    '{' => {
                        depth += 1;
                        if depth > 1 {
                            at_head = false;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            if !name.is_empty() {
                                out.push((i, std::mem::take(&mut name)));
                            }
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        if !name.is_empty() {
                            out.push((i, std::mem::take(&mut name)));
                        }
                        at_head = true;
                    }
                    c if depth == 1 && at_head && (c.is_ascii_alphanumeric() || c == '_') => {
                        name.push(c)
                    }
                    c if depth == 1 && !c.is_whitespace() && !name.is_empty() => {
                        at_head = false;
                    }
                    _ => {}
                }
                j += 1;
            }
        } else {
            let start = j;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j > start {
                out.push((i, code[start..j].to_string()));
            }
        }
    }
    out
}

/// Module path of a source file below `src` (`arch/vcpu/irqs.rs` -> `[arch, vcpu, irqs]`,
/// `vm/mod.rs` -> `[vm]`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// A module's path below the crate root.
type ModPath = Vec<String>;

/// Every reference from one module to another in the hypervisor crate, as (from, to) module
/// paths; `to` is as deep as the path names a module that exists.
fn references() -> (BTreeSet<ModPath>, Vec<(ModPath, ModPath)>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files
        .iter()
        .map(|f| module_path(f.strip_prefix(&src).unwrap()))
        .collect();
    let mut refs = Vec::new();
    for f in &files {
        let from = module_path(f.strip_prefix(&src).unwrap());
        // Tests may use whatever they test with (a module's tests use the fakes of the modules
        // it calls, which use its types): only what is built into the hypervisor counts. Test
        // modules are `tests.rs` or `<what>_tests.rs` (`platform/corpus_tests.rs` runs the
        // readers of the host DT from `pci` and `config` too).
        if from
            .last()
            .is_some_and(|m| m == "tests" || m.ends_with("_tests"))
        {
            continue;
        }
        let code = without_test_modules(&code_only(&fs::read_to_string(f).unwrap()));
        for (at, head) in heads_after(&code, "crate::") {
            let mut to = vec![head];
            extend_path(&code[at + "crate::".len()..], &mut to, &modules);
            refs.push((from.clone(), to));
        }
        // `super::x` from a file: its parent's module path, then x (only one level of super is
        // used in this crate; `super::super` is followed too).
        for (at, head) in heads_after(&code, "super::") {
            let mut base = from.clone();
            base.pop();
            let mut rest = &code[at + "super::".len()..];
            let mut head = head;
            while head == "super" {
                base.pop();
                rest = &rest["super::".len()..];
                head = match heads_after(rest, "").first() {
                    Some((_, h)) => h.clone(),
                    None => break,
                };
            }
            let mut to = base;
            to.push(head);
            if modules.contains(&to) {
                extend_path(rest, &mut to, &modules);
            } else {
                to.pop();
            }
            refs.push((from.clone(), to));
        }
    }
    (modules, refs)
}

/// `code` without its inline `#[cfg(test)] mod tests { .. }` modules.
fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(i) = rest.find("#[cfg(test)]") {
        let after = rest[i + "#[cfg(test)]".len()..].trim_start();
        if !after.starts_with("mod ") || !after.split('\n').next().unwrap_or("").contains('{') {
            out.push_str(&rest[..i + "#[cfg(test)]".len()]);
            rest = &rest[i + "#[cfg(test)]".len()..];
            continue;
        }
        out.push_str(&rest[..i]);
        let open = rest.len() - after.len() + after.find('{').unwrap();
        let mut depth = 0;
        let mut end = rest.len();
        for (k, c) in rest[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Follows `a::b::c` after the head while the path still names a module.
fn extend_path(after_head: &str, to: &mut Vec<String>, modules: &BTreeSet<Vec<String>>) {
    let mut rest = after_head
        .trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_')
        .to_string();
    while let Some(r) = rest.strip_prefix("::") {
        let name: String = r
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            break;
        }
        let mut next = to.clone();
        next.push(name.clone());
        if !modules.contains(&next) {
            break;
        }
        *to = next;
        rest = r[name.len()..].to_string();
    }
}

/// The first cycle in `graph`, if any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// For each parent module, the graph among its children (a child is named for itself and stands
/// for everything below it); references to the parent itself are not edges between siblings.
fn sibling_graphs(
    modules: &BTreeSet<Vec<String>>,
    refs: &[(Vec<String>, Vec<String>)],
) -> BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> {
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for m in modules {
        if let Some((last, parent)) = m.split_last() {
            graphs
                .entry(parent.to_vec())
                .or_default()
                .entry(last.clone())
                .or_default();
        }
    }
    for (from, to) in refs {
        // The deepest common ancestor; below it, `from` and `to` are in different children.
        let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        if common < from.len() && common < to.len() {
            let parent = from[..common].to_vec();
            graphs
                .entry(parent)
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    graphs
}

#[test]
fn no_module_cycle() {
    let (modules, refs) = references();
    assert!(modules.len() > 50, "found only {} modules", modules.len());
    let graphs = sibling_graphs(&modules, &refs);
    let top = &graphs[&Vec::new()];
    // The scan sees the layering it checks: arch uses vm, vm uses devices, devices use hw.
    for (a, b) in [
        ("arch", "vm"),
        ("vm", "devices"),
        ("devices", "hw"),
        ("arch", "hw"),
    ] {
        assert!(
            top[a].contains(b),
            "no {a} -> {b} reference found: the scan is broken"
        );
    }
    for (parent, g) in &graphs {
        if let Some(c) = find_cycle(g) {
            panic!(
                "import cycle among the children of `crate{}`: {}",
                parent.iter().map(|p| format!("::{p}")).collect::<String>(),
                c.join(" -> ")
            );
        }
    }
}

#[test]
fn devices_reach_neither_the_vm_nor_the_machine() {
    let (_, refs) = references();
    let bad: Vec<_> = refs
        .iter()
        .filter(|(from, to)| {
            from.first().map(String::as_str) == Some("devices")
                && matches!(to.first().map(String::as_str), Some("vm") | Some("arch"))
        })
        .map(|(from, to)| format!("{} -> {}", from.join("::"), to.join("::")))
        .collect();
    assert!(
        bad.is_empty(),
        "devices/ reaching the VM or the machine: {bad:?}"
    );
}

#[test]
fn the_scanner_finds_a_cycle_and_ignores_prose() {
    // A cycle of three, as the old arch/ had (vcpu -> vm -> vsmmu -> vcpu).
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("vcpu".into()).or_default().insert("vm".into());
    g.entry("vm".into()).or_default().insert("vsmmu".into());
    g.entry("vsmmu".into()).or_default().insert("vcpu".into());
    assert_eq!(find_cycle(&g).unwrap(), ["vcpu", "vm", "vsmmu", "vcpu"]);
    g.get_mut("vsmmu").unwrap().clear();
    assert!(find_cycle(&g).is_none());

    let code = code_only("// unsafe here\nlet s = \"unsafe\"; #![deny(unsafe_code)]\n");
    assert!(!uses_unsafe(&code));
    assert!(uses_unsafe(&code_only("unsafe { x() }")));
    let stripped = without_test_modules(
        "fn a() {}\n#[cfg(test)]\nmod tests {\n use crate::x; {}\n}\nfn b() {}",
    );
    assert!(
        !stripped.contains("crate::x") && stripped.contains("fn b()"),
        "{stripped}"
    );
    let heads: Vec<_> = heads_after("use crate::{a::b, c, d::{e, f}};", "crate::")
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    assert_eq!(heads, ["a", "c", "d"]);
}

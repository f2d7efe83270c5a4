//! The hypervisor's console: its commands (Ctrl-\ then a key), typing at the pace its vPL011
//! takes, switching the input between VMs, and reading what its commands print (vSMMU
//! counters, STE dumps).

use crate::text::hv_text;
use crate::{Error, Qemu, STEP_TIMEOUT};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

/// The byte that starts a hypervisor console command (Ctrl-\).
pub const CONSOLE_ESCAPE: char = '\u{1c}';
/// [`type_paced`]: bytes per write to the console, and the pause after each.
const TYPE_CHUNK: usize = 8;
const TYPE_PAUSE: Duration = Duration::from_millis(100);

/// Sends a hypervisor console command: Ctrl-\ then `key`.
pub fn console_command(q: &mut Qemu, key: char) -> Result<(), Error> {
    q.send(&format!("{CONSOLE_ESCAPE}{key}"))
}

/// Runs a command of the hypervisor's monitor: Ctrl-\ :, the line, Enter (the monitor echoes
/// it as `[hv] monitor> LINE`).
pub fn monitor(q: &mut Qemu, line: &str) -> Result<(), Error> {
    q.send(&format!("{CONSOLE_ESCAPE}:{line}\r"))
}

/// Asks for every VM's counters as the machine-readable `key=value` lines, then the physical
/// stream table and the heap figure (the monitor's `stats raw`; Ctrl-\ s prints the same
/// counters as tables for people).
pub fn raw_stats(q: &mut Qemu) -> Result<(), Error> {
    monitor(q, "stats raw")
}

/// Types `text` into the focused VM's console a few bytes at a time (8 bytes per 100 ms): the
/// hypervisor's vPL011 has a 32-byte receive FIFO like the real one, and bytes that arrive while
/// it is full are lost (the guest logs `ttyAMA0: 1 input overrun(s)`).
pub fn type_paced(q: &mut Qemu, text: &str) -> Result<(), Error> {
    let mut rest = text;
    while !rest.is_empty() {
        let mut n = rest.len().min(TYPE_CHUNK);
        while !rest.is_char_boundary(n) {
            n -= 1;
        }
        let (chunk, tail) = rest.split_at(n);
        q.send(chunk)?;
        rest = tail;
        if !rest.is_empty() {
            thread::sleep(TYPE_PAUSE);
        }
    }
    Ok(())
}

/// Types a computation into `vm`'s shell (which has the input) and checks that the answer comes
/// back as a whole line of that VM: `[vm] 42<vm>`. The typed line itself echoes as `$((6*7))`,
/// so only the shell's answer can match.
pub fn check_answer(q: &mut Qemu, vm: &str) -> Result<(), Error> {
    q.send(&format!("echo $((6*7)){vm}\n"))?;
    let line = q.wait_for(&format!("42{vm}"), STEP_TIMEOUT)?;
    assert_eq!(
        line.trim_end(),
        format!("[{vm}] 42{vm}"),
        "the answer to what was typed must be a line of {vm}, the VM with the input"
    );
    Ok(())
}

/// Switches the console input to `vm` (Ctrl-\ then its digit) and waits for the hypervisor to
/// say so (a global wait: it consumes the lines up to that one).
pub fn focus(q: &mut Qemu, vm: &str) -> Result<(), Error> {
    console_command(q, vm.trim_start_matches("vm").chars().next().unwrap_or('?'))?;
    q.wait_for(&format!("[hv] console input -> {vm}"), STEP_TIMEOUT)?;
    Ok(())
}

/// The counters every `[hv] vsmmu: vmN stats: ...` line has (it may have more).
pub const VSMMU_STATS_KEYS: [&str; 9] = [
    "traps",
    "cmdq_prod",
    "cmdq_cons",
    "reg_reads",
    "reg_writes",
    "commands",
    "syncs",
    "guest_events",
    "s2_faults",
];

/// The counters of a `[hv] vsmmu: vmN stats: traps=1 cmdq_prod=2 ...` line (all of them, decimal;
/// at least [`VSMMU_STATS_KEYS`]); panics on anything else.
pub fn parse_stats(line: &str) -> BTreeMap<String, u64> {
    parse_counters(line, &VSMMU_STATS_KEYS)
}

/// The counters every `[hv] viommu: vmN stats: ...` line has (it may have more).
pub const VIOMMU_STATS_KEYS: [&str; 12] = [
    "notifies",
    "requests",
    "attach",
    "detach",
    "map",
    "unmap",
    "errors",
    "phys_syncs",
    "domains",
    "mappings",
    "table_pages",
    "queue_errors",
];

/// The counters of a `[hv] viommu: vmN stats: ...` line (at least [`VIOMMU_STATS_KEYS`]).
pub fn parse_viommu_stats(line: &str) -> BTreeMap<String, u64> {
    parse_counters(line, &VIOMMU_STATS_KEYS)
}

/// Asks the hypervisor for its counters ([`raw_stats`]) and returns VM `vm`'s virtio-iommu
/// ones, as [`vsmmu_stats`] does the vSMMU's.
pub fn viommu_stats(q: &mut Qemu, vm: &str) -> Result<BTreeMap<String, u64>, Error> {
    raw_stats(q)?;
    let prefix = format!("viommu: {vm} stats: ");
    let what = format!("the hypervisor's line {prefix:?}...");
    let line = q.wait_until(&what, STEP_TIMEOUT, |l| {
        hv_text(l).is_some_and(|t| t.starts_with(&prefix))
    })?;
    println!("hypervisor: {}", line.text);
    Ok(parse_viommu_stats(&line.text))
}

/// The `key=value` counters after ` stats: ` in `line`, all decimal, at least `keys`.
fn parse_counters(line: &str, keys: &[&str]) -> BTreeMap<String, u64> {
    let (_, fields) = line
        .split_once(" stats: ")
        .unwrap_or_else(|| panic!("not a stats line: {line:?}"));
    let stats: BTreeMap<String, u64> = fields
        .split_whitespace()
        .map(|f| {
            f.split_once('=')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .unwrap_or_else(|| panic!("unreadable counter {f:?} in {line:?}"))
        })
        .collect();
    for &key in keys {
        assert!(
            stats.contains_key(key),
            "the stats line lacks {key}: {line:?}"
        );
    }
    stats
}

/// Asks the hypervisor for its vSMMU counters ([`raw_stats`]) and returns VM `vm`'s, from the
/// first stats line of `vm` after the last line a global wait consumed (the STE dump that
/// follows is left for the next wait, [`ste_lines`]).
pub fn vsmmu_stats(q: &mut Qemu, vm: &str) -> Result<BTreeMap<String, u64>, Error> {
    raw_stats(q)?;
    let prefix = format!("vsmmu: {vm} stats: ");
    let what = format!("the hypervisor's line {prefix:?}...");
    let line = q.wait_until(&what, STEP_TIMEOUT, |l| {
        hv_text(l).is_some_and(|t| t.starts_with(&prefix))
    })?;
    println!("hypervisor: {}", line.text);
    Ok(parse_stats(&line.text))
}

/// The per-register counts of a `[hv] vsmmu: vmN traps by register: IDR0@0x0 r5/w0, CR0@0x20
/// r3/w2, ...` line (the second line of a VM's vSMMU counters): by register name, (reads,
/// writes). Panics on anything else.
pub fn parse_register_traps(line: &str) -> BTreeMap<String, (u64, u64)> {
    let (_, list) = line
        .split_once(" traps by register:")
        .unwrap_or_else(|| panic!("not a traps-by-register line: {line:?}"));
    list.split(", ")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let parsed = e.split_once('@').and_then(|(name, rest)| {
                let (_, counts) = rest.split_once(" r")?;
                let (r, w) = counts.split_once("/w")?;
                Some((name.to_string(), (r.parse().ok()?, w.parse().ok()?)))
            });
            parsed.unwrap_or_else(|| panic!("unreadable register count {e:?} in {line:?}"))
        })
        .collect()
}

/// VM `vm`'s vSMMU trap counts by register: the `vsmmu: vm traps by register: ...` line that
/// follows its stats line, so to be called right after [`vsmmu_stats`] (a global wait).
pub fn vsmmu_register_traps(q: &mut Qemu, vm: &str) -> Result<BTreeMap<String, (u64, u64)>, Error> {
    let prefix = format!("vsmmu: {vm} traps by register:");
    let what = format!("the hypervisor's line {prefix:?}...");
    let line = q.wait_until(&what, STEP_TIMEOUT, |l| {
        hv_text(l).is_some_and(|t| t.starts_with(&prefix))
    })?;
    Ok(parse_register_traps(&line.text))
}

/// The first STE dump line of each of `sids` after the last line a global wait consumed
/// (`[hv] smmu: STE 8 (IOMMU group 1): V=1 Nested, VMID 1, S2TTB 0x...`), by StreamID.
pub fn ste_lines(q: &mut Qemu, sids: &[u32]) -> Result<BTreeMap<u32, String>, Error> {
    let found = RefCell::new(BTreeMap::new());
    let what = format!("the STE dump lines of StreamIDs {sids:?}");
    q.wait_until(&what, STEP_TIMEOUT, |l| {
        let mut found = found.borrow_mut();
        for &sid in sids {
            if hv_text(l).is_some_and(|t| t.starts_with(&format!("smmu: STE {sid} ("))) {
                found.entry(sid).or_insert_with(|| l.to_string());
            }
        }
        found.len() == sids.len()
    })?;
    Ok(found.into_inner())
}

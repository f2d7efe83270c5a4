//! The operator's monitor (Ctrl-\ : then a command), on a configuration written the way Xen's
//! ImageBuilder writes dom0less domains (`tests/configs/xen-dom0less.dts`: `xen,domain` nodes
//! domU0 and domU1 with cpupools, `xen,static-mem`, `xen,xen-bootargs = "loglvl=warning"`),
//! each with its own disk and NIC (`--pci`).
//!
//! The boot banner lists both domains on their pools' CPUs and domU1 at its static PA; the
//! command line's log level holds back the info lines (a VM's boot line) until `log info`.
//! `list` shows them running; `stop domU0` stops it while domU1 keeps answering at its shell,
//! `list` shows domU0 stopped and its StreamIDs' physical STEs abort; `start domU0` boots it
//! again from its pristine images (its boot count goes up; its disk's MD5 through its DMA, its
//! vSMMU probe and its ping of the other domain are as on its first boot); `reset domU1`
//! reboots domU1 alone; domU1's own `poweroff -f` leaves it stopped, and `start domU1` boots it
//! a third time; `log warn` hides the STE dump of Ctrl-\ s until `log info`; the
//! statistics are tables that fit an 80-column terminal; an unknown VM gets an error naming the
//! VMs there are; `poweroff` ends the run.

use std::time::Duration;

use integration_tests::{
    check_answer, console_command, host_disk_md5, hv_text, monitor, raw_stats, repo_root,
    ste_lines, Error, Line, Qemu, BOOT_TIMEOUT, DISK_BYTES, STEP_TIMEOUT, VM0,
};

/// Wall-clock limit of the run: five guest boots (two first boots, two starts, a reset).
const RUN_LIMIT: Duration = Duration::from_secs(900);

/// The domains and the `--pci` disks they own (the config gives domU0 vm0's functions).
const DOMAINS: [(&str, &str); 2] = [("domU0", "vm0"), ("domU1", "vm1")];

/// What a VM's guest shows of one boot: its boot count, the MD5 of its disk, its vSMMU probe,
/// its ping of the other domain. Its guest stays at its shell afterwards (no `hvtest=`).
#[derive(Debug, PartialEq)]
struct Boot {
    count: String,
    md5: String,
    probe: String,
    ping: String,
}

fn wait_boot(q: &mut Qemu, vm: &str) -> Result<Boot, Error> {
    let count = q.wait_vm_fact(vm, "boot-count", BOOT_TIMEOUT)?;
    let probe = q.wait_vm_fact(vm, "smmu-probe", STEP_TIMEOUT)?;
    assert_eq!(
        q.wait_vm_fact(vm, "disk-bytes", STEP_TIMEOUT)?,
        DISK_BYTES.to_string(),
        "{vm}'s /dev/vda size"
    );
    let md5 = q.wait_vm_fact(vm, "disk-md5", STEP_TIMEOUT)?;
    let disk = DOMAINS.iter().find(|d| d.0 == vm).expect("a domain").1;
    assert_eq!(
        md5,
        host_disk_md5(disk),
        "{vm}'s disk (build/disks/{disk}.img) through its DMA"
    );
    let ping = q.wait_vm_fact(vm, "ping", STEP_TIMEOUT)?;
    q.wait_vm_for(vm, "guest: shell", STEP_TIMEOUT)?;
    Ok(Boot {
        count,
        md5,
        probe,
        ping,
    })
}

/// Runs `cmd` at the monitor and returns the hypervisor's lines from its echo up to the first
/// one `end` matches.
fn command(q: &mut Qemu, cmd: &str, end: impl Fn(&str) -> bool) -> Result<Vec<String>, Error> {
    let from = q.lines().len();
    monitor(q, cmd)?;
    let echo = format!("[hv] monitor> {cmd}");
    q.wait_for(&echo, STEP_TIMEOUT)?;
    let what = format!("the end of what `{cmd}` prints");
    q.wait_until(&what, STEP_TIMEOUT, |l| hv_text(l).is_some_and(&end))?;
    let lines = q.lines();
    let start = from
        + lines[from..]
            .iter()
            .position(|l| l.text.contains(&echo))
            .expect("the echo was seen");
    Ok(hv_lines(&lines[start + 1..]))
}

fn hv_lines(lines: &[Line]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| hv_text(&l.text).map(str::to_string))
        .collect()
}

/// `list`'s row of `vm` (` 0  vm0   running ...`), split into words.
fn list_row(q: &mut Qemu, vm: &str) -> Result<Vec<String>, Error> {
    let lines = command(q, "list", |l| l.starts_with(" 1  domU1 "))?;
    let row = lines
        .iter()
        .find(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|i| i.parse::<usize>().is_ok()) && w.next() == Some(vm)
        })
        .unwrap_or_else(|| panic!("no row of {vm} in `list`: {lines:#?}"));
    println!("list: {row}");
    Ok(row.split_whitespace().map(str::to_string).collect())
}

#[test]
fn the_operator_runs_xen_dom0less_domains_from_the_monitor() -> Result<(), Error> {
    let config = repo_root().join("tests/configs/xen-dom0less.dts");
    let mut q = Qemu::spawn_with_limit(
        "the_operator_runs_xen_dom0less_domains_from_the_monitor",
        &["--vm-dts", config.to_str().unwrap(), "--pci"],
        RUN_LIMIT,
    )?;
    // The banner: the machine, its SMMU, both domains accepted on their pools' CPUs, domU1's
    // RAM at its xen,static-mem.
    q.wait_for("[hv] smmu-hv ", BOOT_TIMEOUT)?;
    q.wait_for(
        "[hv] SMMU /smmuv3@9050000: SMMUv3 at 0x9050000",
        STEP_TIMEOUT,
    )?;
    q.wait_for("[hv] VMs: 2 accepted, 0 refused", STEP_TIMEOUT)?;
    q.wait_for(
        "[hv]  0  domU0  starting       0         -  0:0 1:1",
        STEP_TIMEOUT,
    )?;
    q.wait_for("[hv]     RAM 1 GiB at IPA 0x40000000, PA 0x", STEP_TIMEOUT)?;
    q.wait_for(
        "[hv]  1  domU1  starting       0         -  0:2 1:3",
        STEP_TIMEOUT,
    )?;
    q.wait_for(
        "[hv]     RAM 1 GiB at IPA 0x40000000, PA 0x100000000",
        STEP_TIMEOUT,
    )?;
    let first0 = wait_boot(&mut q, "domU0")?;
    let first1 = wait_boot(&mut q, "domU1")?;
    assert_eq!(first0.count, "0", "domU0's first boot");
    assert_eq!(first0.ping, "ok", "domU0 pinged domU1 over its own NIC");
    // `loglvl=warning`: no VM's boot line (info) was printed.
    let boot_lines = |q: &Qemu, vm: &str| {
        hv_lines(&q.lines())
            .iter()
            .filter(|l| l.starts_with(&format!("{vm}: boot ")))
            .count()
    };
    assert_eq!(boot_lines(&q, "domU0"), 0, "info lines at loglvl=warning");
    command(&mut q, "log info", |l| l == "monitor: log level INFO")?;

    let row = list_row(&mut q, "domU0")?;
    assert_eq!(row[2], "running", "domU0 in `list`: {row:?}");
    assert_eq!(row[3], "1", "domU0's boots in `list`: {row:?}");

    // An unknown VM: an error naming the VMs there are, and nothing else happens.
    let err = command(&mut q, "stop vm7", |l| l.starts_with("monitor: "))?;
    assert_eq!(
        err.last().map(String::as_str),
        Some("monitor: no VM `vm7` (the VMs are domU0, domU1)")
    );

    // Stop domU0: stopped, listed so, its streams aborting, and domU1 still answers.
    command(&mut q, "stop domU0", |l| {
        l == "domU0: stopped: stopped by the operator"
    })?;
    let row = list_row(&mut q, "domU0")?;
    assert_eq!(row[2], "stopped", "domU0 after `stop domU0`: {row:?}");
    raw_stats(&mut q)?;
    let stes = ste_lines(&mut q, &[VM0.disk.1, VM0.nic.1])?;
    for (sid, l) in &stes {
        assert!(
            l.contains("Abort"),
            "domU0's StreamID {sid} aborts while it is stopped: {l}"
        );
    }
    command(&mut q, "focus domU1", |l| l == "console input -> domU1")?;
    check_answer(&mut q, "domU1")?;

    // Start it again: a new boot from the pristine images, the same disk, vSMMU and NIC.
    command(&mut q, "start domU0", |l| {
        l == "monitor: starting domU0 (boot 1)"
    })?;
    let again0 = wait_boot(&mut q, "domU0")?;
    assert_eq!(again0.count, "1", "domU0's boot count after `start domU0`");
    assert_eq!(
        again0.md5, first0.md5,
        "domU0's disk through its DMA, again"
    );
    assert_eq!(again0.probe, first0.probe, "domU0's vSMMU probe, again");
    assert_eq!(again0.ping, "ok", "domU0's ping of domU1, again");
    assert_eq!(
        boot_lines(&q, "domU0"),
        1,
        "its boot line, at log level info"
    );
    let row = list_row(&mut q, "domU0")?;
    assert_eq!(
        (row[2].as_str(), row[3].as_str()),
        ("running", "2"),
        "domU0 after `start domU0`: {row:?}"
    );

    // Reset domU1 by command: it reboots alone.
    command(&mut q, "reset domU1", |l| {
        l == "domU1: resetting: reset by the operator"
    })?;
    let again1 = wait_boot(&mut q, "domU1")?;
    assert_eq!(again1.count, "1", "domU1's boot count after `reset domU1`");
    assert_eq!(
        again1.md5, first1.md5,
        "domU1's disk through its DMA, again"
    );
    assert_eq!(again1.probe, first1.probe, "domU1's vSMMU probe, again");

    // A guest that powered itself off is stopped, not gone: `start` brings it back.
    command(&mut q, "focus domU1", |l| l == "console input -> domU1")?;
    q.send("poweroff -f\n")?;
    q.wait_for("[hv] domU1: stopped: PSCI SYSTEM_OFF", STEP_TIMEOUT)?;
    let row = list_row(&mut q, "domU1")?;
    assert_eq!(row[2], "stopped", "domU1 after its poweroff: {row:?}");
    command(&mut q, "start domU1", |l| {
        l == "monitor: starting domU1 (boot 2)"
    })?;
    let third1 = wait_boot(&mut q, "domU1")?;
    assert_eq!(third1.count, "2", "domU1's boot count after `start domU1`");
    assert_eq!(
        third1.md5, first1.md5,
        "domU1's disk through its DMA, a third time"
    );

    // The log level by command: at `warn` the STE dump (info lines) of Ctrl-\ s is gone; the
    // counters (the console's own output) stay. Every line of the tables fits 80 columns.
    command(&mut q, "log warn", |l| l == "monitor: log level WARN")?;
    let stats = |q: &mut Qemu| -> Result<Vec<String>, Error> {
        let from = q.lines().len();
        console_command(q, 's')?;
        q.wait_until("the heap line of Ctrl-\\ s", STEP_TIMEOUT, |l| {
            hv_text(l).is_some_and(|t| t.starts_with("heap: "))
        })?;
        Ok(hv_lines(&q.lines()[from..]))
    };
    let quiet = stats(&mut q)?;
    assert!(
        quiet.iter().any(|l| l == "vsmmu: domU0"),
        "domU0's vSMMU table: {quiet:#?}"
    );
    assert!(
        !quiet.iter().any(|l| l.starts_with("smmu: STE ")),
        "no STE dump at log level warn: {quiet:#?}"
    );
    for l in &quiet {
        assert!(
            l.len() + "[hv] ".len() <= 80,
            "wider than 80 columns: {l:?}"
        );
    }
    command(&mut q, "log info", |l| l == "monitor: log level INFO")?;
    let loud = stats(&mut q)?;
    assert!(
        loud.iter().any(|l| l.starts_with("smmu: STE ")),
        "the STE dump at log level info: {loud:#?}"
    );

    monitor(&mut q, "poweroff")?;
    q.wait_for(
        "[hv] monitor: stopping every VM and powering off",
        STEP_TIMEOUT,
    )?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(status.success(), "QEMU's exit after `poweroff`: {status}");
    Ok(())
}

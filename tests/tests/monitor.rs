//! The operator's monitor (Ctrl-\ : then a command), on two VMs with their own disks and NICs
//! (`--pci`): the boot banner lists both; `list` shows them running; `stop vm0` stops vm0 while
//! vm1 keeps answering at its shell, `list` shows vm0 stopped and its StreamIDs' physical STEs
//! abort; `start vm0` boots it again
//! from its pristine images (its boot count goes up, its disk's MD5 through its DMA and its
//! vSMMU probe are as on its first boot); `reset vm1` reboots vm1 alone; `log warn` hides the
//! hypervisor's info lines (the STE dump of Ctrl-\ s) until `log info`; the statistics are
//! tables that fit an 80-column terminal; an unknown VM gets an error naming the VMs there are;
//! `poweroff` ends the run.

use std::time::Duration;

use integration_tests::{
    check_answer, check_vm_disk, console_command, hv_text, monitor, raw_stats, ste_lines, Error,
    Line, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT, VM0,
};

/// Wall-clock limit of the run: four guest boots (two first boots, a start, a reset).
const RUN_LIMIT: Duration = Duration::from_secs(900);

/// The guest stays at its shell (no `hvtest=`): the VMs run until the monitor ends them.
const BOOTARGS: &str = "console=ttyAMA0 rdinit=/init";

/// What a VM's guest shows of one boot: its boot count, the MD5 of its disk, its vSMMU probe.
#[derive(Debug, PartialEq)]
struct Boot {
    count: String,
    md5: String,
    probe: String,
}

fn wait_boot(q: &mut Qemu, vm: &str) -> Result<Boot, Error> {
    let count = q.wait_vm_fact(vm, "boot-count", BOOT_TIMEOUT)?;
    let probe = q.wait_vm_fact(vm, "smmu-probe", STEP_TIMEOUT)?;
    let md5 = check_vm_disk(q, vm)?;
    q.wait_vm_for(vm, "guest: shell", STEP_TIMEOUT)?;
    Ok(Boot { count, md5, probe })
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
    let lines = command(q, "list", |l| l.starts_with(" 1  vm1 "))?;
    let row = lines
        .iter()
        .find(|l| l.split_whitespace().nth(1) == Some(vm))
        .unwrap_or_else(|| panic!("no row of {vm} in `list`: {lines:#?}"));
    println!("list: {row}");
    Ok(row.split_whitespace().map(str::to_string).collect())
}

#[test]
fn the_operator_stops_starts_and_resets_vms_from_the_monitor() -> Result<(), Error> {
    let mut q = Qemu::spawn_two_pci_vms(
        "the_operator_stops_starts_and_resets_vms_from_the_monitor",
        None,
        BOOTARGS,
        BOOTARGS,
        RUN_LIMIT,
    )?;
    // The banner: the machine, its SMMU, both VMs accepted.
    q.wait_for("[hv] smmu-hv ", BOOT_TIMEOUT)?;
    q.wait_for(
        "[hv] SMMU /smmuv3@9050000: SMMUv3 at 0x9050000",
        STEP_TIMEOUT,
    )?;
    q.wait_for("[hv] VMs: 2 accepted, 0 refused", STEP_TIMEOUT)?;
    let first0 = wait_boot(&mut q, "vm0")?;
    let first1 = wait_boot(&mut q, "vm1")?;
    assert_eq!(first0.count, "0", "vm0's first boot");

    let row = list_row(&mut q, "vm0")?;
    assert_eq!(row[2], "running", "vm0 in `list`: {row:?}");
    assert_eq!(row[3], "1", "vm0's boots in `list`: {row:?}");

    // An unknown VM: an error naming the VMs there are, and nothing else happens.
    let err = command(&mut q, "stop vm7", |l| l.starts_with("monitor: "))?;
    assert_eq!(
        err.last().map(String::as_str),
        Some("monitor: no VM `vm7` (the VMs are vm0, vm1)")
    );

    // Stop vm0: stopped, listed so, and vm1 still answers at its shell.
    command(&mut q, "stop vm0", |l| {
        l == "vm0: stopped: stopped by the operator"
    })?;
    let row = list_row(&mut q, "vm0")?;
    assert_eq!(row[2], "stopped", "vm0 after `stop vm0`: {row:?}");
    raw_stats(&mut q)?;
    let stes = ste_lines(&mut q, &[VM0.disk.1, VM0.nic.1])?;
    for (sid, l) in &stes {
        assert!(
            l.contains("Abort"),
            "vm0's StreamID {sid} aborts while it is stopped: {l}"
        );
    }
    command(&mut q, "focus vm1", |l| l == "console input -> vm1")?;
    check_answer(&mut q, "vm1")?;

    // Start it again: a new boot from the pristine images, the same disk and vSMMU as before.
    command(&mut q, "start vm0", |l| {
        l == "monitor: starting vm0 (boot 1)"
    })?;
    let again0 = wait_boot(&mut q, "vm0")?;
    assert_eq!(again0.count, "1", "vm0's boot count after `start vm0`");
    assert_eq!(again0.md5, first0.md5, "vm0's disk through its DMA, again");
    assert_eq!(again0.probe, first0.probe, "vm0's vSMMU probe, again");
    let row = list_row(&mut q, "vm0")?;
    assert_eq!(
        (row[2].as_str(), row[3].as_str()),
        ("running", "2"),
        "vm0 after `start vm0`: {row:?}"
    );

    // Reset vm1 by command: it reboots alone.
    command(&mut q, "reset vm1", |l| {
        l == "vm1: resetting: reset by the operator"
    })?;
    let again1 = wait_boot(&mut q, "vm1")?;
    assert_eq!(again1.count, "1", "vm1's boot count after `reset vm1`");
    assert_eq!(again1.md5, first1.md5, "vm1's disk through its DMA, again");
    assert_eq!(again1.probe, first1.probe, "vm1's vSMMU probe, again");

    // The log level: at `warn` the STE dump (info lines) of Ctrl-\ s is gone; the counters
    // (the console's own output) stay. Every line of the tables fits 80 columns.
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
        quiet.iter().any(|l| l == "vsmmu: vm0"),
        "vm0's vSMMU table: {quiet:#?}"
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

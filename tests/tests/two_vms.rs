//! Several VMs on one hypervisor: each boots, reboots and stops on its own, their console lines
//! stay whole and prefixed (`[vm0] `, `[vm1] `, `[hv] `), input goes to the VM the user picked
//! (Ctrl-\ then the VM's digit), and a VM with a bad config is refused without stopping the others.
//!
//! The VMs come from the DT `qemu/board-virt.sh` generates (`--vms`, `--vm-bootargs`) or from a
//! hand-written block (`--vm-dts`, `tests/configs/`); the binding is in `docs/vm-config.md`.

use std::time::Duration;

use integration_tests::{
    check_answer, check_vm_guest_facts, guest_fact, line_source, repo_root, stock_guest_dir,
    vm_text, Line, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT,
};

/// vCPUs the board script gives each generated VM.
const VM_CPUS: usize = 2;
/// Resets vm0 asks for in `two_guests_lifecycle` (it boots `RESETS + 1` times).
const RESETS: u32 = 3;
/// vm1's count in `two_guests_lifecycle`, one line every 0.2 s. Measured on QEMU TCG with two
/// host cores (this test, 250 lines): a counted line every 0.226 s, the first 0.02 s before vm0's
/// first reset; vm0's three resets at 26.2, 32.6 and 37.9 s and its last boot's init at 43.3 s,
/// so the reboots take about 17 s. 200 lines (about 45 s) cover them more than twice over, with
/// room for a vm1 that starts counting a few seconds late or for slower reboots.
const COUNT: u32 = 200;
/// The longest silence allowed between two of vm1's counted lines (measured: 1.0 s).
const MAX_COUNT_GAP: Duration = Duration::from_secs(10);
/// How long vm1's whole count may take from its first line (about 45 s expected).
const COUNT_TIMEOUT: Duration = Duration::from_secs(200);
/// The byte that starts a console command (Ctrl-\): then a VM's digit switches the input to it.
const CONSOLE_ESCAPE: char = '\u{1c}';

/// The first console line, if any, whose text contains `pattern` (searching `lines`).
fn find<'a>(lines: &'a [Line], pattern: &str) -> Option<(usize, &'a Line)> {
    lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.text.contains(pattern))
}

fn count_lines(lines: &[Line], pattern: &str) -> usize {
    lines.iter().filter(|l| l.text.contains(pattern)).count()
}

/// Switches the console input to `vm` (Ctrl-\ then its digit) and waits for the hypervisor to
/// say so.
fn focus(q: &mut Qemu, vm: &str) -> Result<(), integration_tests::Error> {
    let digit = vm.trim_start_matches("vm");
    q.send(&format!("{CONSOLE_ESCAPE}{digit}"))?;
    q.wait_for(&format!("[hv] console input -> {vm}"), STEP_TIMEOUT)?;
    Ok(())
}

/// Two VMs at once (the board script's default): vm0 resets itself three times through PSCI
/// SYSTEM_RESET while vm1 counts to `COUNT` every 0.2 s. Every boot of each VM must come up whole
/// (its facts, its own name in its DT), only vm0 is reset, vm1's counting must go on unbroken
/// through vm0's reboots, with every counted line whole and vm1's. Then the console input goes to
/// vm1, which answers and powers off alone; then to vm0, which answers and powers off, and the
/// hypervisor powers the machine off.
#[test]
fn two_guests_lifecycle() -> Result<(), integration_tests::Error> {
    let vm0_args = format!("console=ttyAMA0 rdinit=/init hvtest=reboot{RESETS}-shell");
    let vm1_args = format!("console=ttyAMA0 rdinit=/init hvtest=count{COUNT}");
    let mut q = Qemu::spawn(
        "two_guests_lifecycle",
        &[
            "--vms",
            "2",
            "--vm-bootargs",
            "0",
            &vm0_args,
            "--vm-bootargs",
            "1",
            &vm1_args,
        ],
    )?;
    let guest = stock_guest_dir();

    // vm0: RESETS + 1 boots, each whole, with its boot count in its DT.
    let mut vm0_inits = Vec::new();
    for boot in 0..=RESETS {
        let report = check_vm_guest_facts(&mut q, "vm0", &guest, VM_CPUS)?;
        vm0_inits.push(report.init_started_at);
        assert_eq!(
            q.wait_vm_fact("vm0", "boot-count", STEP_TIMEOUT)?,
            boot.to_string(),
            "vm0's /chosen/hypervisor,boot-count"
        );
        if boot < RESETS {
            q.wait_vm_for("vm0", "guest: rebooting", STEP_TIMEOUT)?;
            q.wait_for("[hv] vm0: resetting: PSCI SYSTEM_RESET", STEP_TIMEOUT)?;
            q.wait_for("[hv] vm0: reset done", STEP_TIMEOUT)?;
        } else {
            q.wait_vm_for("vm0", "guest: shell", STEP_TIMEOUT)?;
        }
    }

    // vm1: one boot, whole, then its count and a shell.
    let vm1 = check_vm_guest_facts(&mut q, "vm1", &guest, VM_CPUS)?;
    assert_eq!(
        q.wait_vm_fact("vm1", "boot-count", STEP_TIMEOUT)?,
        "0",
        "vm1's /chosen/hypervisor,boot-count"
    );
    q.wait_vm_fact("vm1", "count", BOOT_TIMEOUT)?;
    q.wait_vm_for("vm1", "guest: count done", COUNT_TIMEOUT)?;
    q.wait_vm_for("vm1", "guest: shell", STEP_TIMEOUT)?;

    let lines = q.lines();
    // Every counted line is a whole line of vm1: nothing of another VM or of the hypervisor
    // before it, inside it or after it.
    let counted: Vec<&Line> = lines
        .iter()
        .filter(|l| l.text.contains("guest: count="))
        .collect();
    for l in &counted {
        assert!(
            l.text.starts_with("[vm1] "),
            "a counter line that is not whole and vm1's: {:?}",
            l.text
        );
        let value = vm_text(&l.text, "vm1").and_then(|t| t.strip_prefix("guest: count="));
        // vm1's own kernel may print in the middle of its shell's line (its console is not
        // line-aware, as on a real serial port): that is still vm1's line. Anything else is not.
        let digits = value.map(|v| v.split_once('[').map_or(v, |(d, _)| d));
        assert!(
            digits.is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())),
            "a counter line with something else in it: {:?}",
            l.text
        );
    }
    let values: Vec<u32> = counted
        .iter()
        .filter_map(|l| {
            let v = guest_fact(&l.text)?.1;
            v.split_once('[').map_or(v, |(d, _)| d).parse().ok()
        })
        .collect();
    let expected: Vec<u32> = (1..=COUNT).collect();
    if values != expected {
        let first_bad = values
            .iter()
            .zip(&expected)
            .position(|(v, e)| v != e)
            .unwrap_or(values.len().min(expected.len()));
        panic!(
            "vm1 counted {} lines, not 1..={COUNT} in order: the first wrong one is #{} ({:?})",
            values.len(),
            first_bad + 1,
            values.get(first_bad)
        );
    }
    let (first, last) = (counted[0].at, counted[counted.len() - 1].at);
    let (gap_at, max_gap) = counted
        .windows(2)
        .map(|w| (w[1].at, w[1].at - w[0].at))
        .max_by_key(|(_, gap)| *gap)
        .unwrap_or_default();
    assert!(
        max_gap <= MAX_COUNT_GAP,
        "vm1's console stalled for {:.1} s (before the line at {:.1} s) while vm0 rebooted",
        max_gap.as_secs_f64(),
        gap_at.as_secs_f64()
    );

    // The hypervisor reset vm0 three times and vm1 never; vm0's resets happened while vm1 counted
    // (the last one entirely: vm1 may start counting after vm0's first reset).
    let resets: Vec<&Line> = lines
        .iter()
        .filter(|l| l.text.contains("[hv] vm0: resetting"))
        .collect();
    assert_eq!(
        resets.len(),
        RESETS as usize,
        "resets of vm0 the hypervisor reported"
    );
    assert_eq!(
        count_lines(&lines, "[hv] vm1: resetting"),
        0,
        "the hypervisor reset vm1, which never asked"
    );
    let done: Vec<&Line> = lines
        .iter()
        .filter(|l| l.text.contains("[hv] vm0: reset done"))
        .collect();
    let during = resets
        .iter()
        .filter(|l| l.at > first && l.at < last)
        .count();
    println!(
        "timing: vm0 inits at {:?} s; vm0 resets at {:?} s, done at {:?} s; vm1 init at {:.2} s, \
         counted {COUNT} lines from {:.2} s to {:.2} s ({:.3} s per line), longest gap {:.2} s; \
         {during} of vm0's resets during the count",
        vm0_inits
            .iter()
            .map(|t| (t.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        resets
            .iter()
            .map(|l| (l.at.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        done.iter()
            .map(|l| (l.at.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        vm1.init_started_at.as_secs_f64(),
        first.as_secs_f64(),
        last.as_secs_f64(),
        (last - first).as_secs_f64() / f64::from(COUNT - 1),
        max_gap.as_secs_f64()
    );
    assert!(
        during >= 2 && done.last().is_some_and(|l| l.at < last),
        "vm1's count ({:.1} s to {:.1} s) did not span vm0's reboots: {during} of the {RESETS} \
         resets fell inside it; raise COUNT",
        first.as_secs_f64(),
        last.as_secs_f64()
    );

    // Input to vm1: it answers, then powers off alone.
    focus(&mut q, "vm1")?;
    check_answer(&mut q, "vm1")?;
    q.send("poweroff -f\n")?;
    q.wait_for("[hv] vm1: stopped", STEP_TIMEOUT)?;
    let lines = q.lines();
    let (vm1_stop, _) = find(&lines, "[hv] vm1: stopped").expect("just waited for it");
    assert!(
        find(&lines[..vm1_stop], "[hv] vm1: PSCI SYSTEM_OFF").is_some(),
        "the hypervisor did not report vm1's PSCI SYSTEM_OFF before stopping it"
    );
    assert!(
        find(&lines, "[hv] vm0: stopped").is_none() && find(&lines, "all VMs stopped").is_none(),
        "vm1's power-off stopped more than vm1"
    );

    // Input to vm0: still alive, it answers, then powers off, and with it the machine.
    focus(&mut q, "vm0")?;
    check_answer(&mut q, "vm0")?;
    q.send("poweroff -f\n")?;
    q.wait_for("[hv] vm0: stopped", STEP_TIMEOUT)?;
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after both VMs powered off"
    );
    println!("timing: QEMU exit at {:.2} s", q.elapsed().as_secs_f64());
    Ok(())
}

/// The faulty VMs of `tests/configs/config-errors.dts` and the field each must be refused for.
const FAULTY: [(&str, &str); 6] = [
    ("vm1", "smmu-hv,cpus"),       // pins a CPU of vm0's
    ("vm2", "module"),             // no kernel module
    ("vm3", "cpus"),               // 5 vCPUs on a 4-CPU machine
    ("vm4", "smmu-hv,static-mem"), // outside RAM
    ("vm5", "smmu-hv,static-mem"), // inside vm0's static memory
    ("vm6", "module"),             // kernel over the hypervisor image
];

/// One boot with a healthy vm0 and one faulty VM per kind of config error: the hypervisor must
/// refuse each faulty VM with one `config:` error naming it and the property at fault, run none of
/// them, and boot vm0 as usual, which powers off, and with it the machine.
#[test]
fn config_errors_refuse_only_the_faulty_vm() -> Result<(), integration_tests::Error> {
    let config = repo_root().join("tests/configs/config-errors.dts");
    let config = config.to_str().expect("the repository path is UTF-8");
    let mut q = Qemu::spawn(
        "config_errors_refuse_only_the_faulty_vm",
        &["--mem", "4G", "--vm-dts", config],
    )?;
    check_vm_guest_facts(&mut q, "vm0", &stock_guest_dir(), VM_CPUS)?;
    assert_eq!(q.wait_vm_fact("vm0", "boot-count", STEP_TIMEOUT)?, "0");
    q.wait_vm_for("vm0", "guest: powering off", STEP_TIMEOUT)?;
    q.wait_for("[hv] vm0: stopped", STEP_TIMEOUT)?;
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after vm0 powered off"
    );

    let lines = q.lines();
    let errors: Vec<&str> = lines
        .iter()
        .map(|l| l.text.as_str())
        .filter(|t| t.starts_with("[hv] ") && t.contains("config: vm"))
        .collect();
    for e in &errors {
        println!("hypervisor: {e}");
    }
    for (vm, field) in FAULTY {
        let mine: Vec<&&str> = errors
            .iter()
            .filter(|t| t.contains(&format!("config: {vm}: ")))
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "{vm} must be refused with exactly one config error, got {mine:?}"
        );
        assert!(
            mine[0].starts_with(&format!("[hv] ERROR: config: {vm}: `{field}`: ")),
            "{vm} must be refused for `{field}`, got {:?}",
            mine[0]
        );
        assert!(
            !lines.iter().any(|l| line_source(&l.text) == Some(vm)),
            "refused {vm} printed on the console"
        );
    }
    assert_eq!(
        errors.len(),
        FAULTY.len(),
        "config errors other than one per faulty VM (vm0 is healthy): {errors:?}"
    );
    Ok(())
}

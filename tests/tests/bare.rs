//! The guest kernel booted directly on QEMU, no hypervisor (`qemu/board-virt.sh --bare`).
//!
//! These prove the runner and the guest images work on their own, and give the reference boot time
//! to compare with the hypervisor's (`tests/boot.rs`).

use integration_tests::{check_guest_facts, stock_guest_dir, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT};

/// The same CPU count as the hypervisor gives vm0, so the boot times compare.
const SMP: usize = 2;

#[test]
fn bare_guest_facts_and_poweroff() -> Result<(), integration_tests::Error> {
    let smp = SMP.to_string();
    let mut q = Qemu::spawn(
        "bare_guest_facts_and_poweroff",
        &[
            "--bare",
            "--smp",
            &smp,
            "--bootargs",
            "console=ttyAMA0 rdinit=/init hvtest=poweroff",
        ],
    )?;
    let report = check_guest_facts(&mut q, &stock_guest_dir(), SMP)?;
    assert_eq!(
        report.vm_name, "none",
        "without a hypervisor the guest's DT names no VM"
    );
    q.wait_for("guest: powering off", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after the guest powered off"
    );
    println!(
        "boot time (bare, no hypervisor, -smp {SMP}): QEMU start -> 'guest: init started' = {:.2} s; \
         QEMU exit at {:.2} s",
        report.init_started_at.as_secs_f64(),
        q.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn bare_interactive_shell() -> Result<(), integration_tests::Error> {
    let smp = SMP.to_string();
    let mut q = Qemu::spawn("bare_interactive_shell", &["--bare", "--smp", &smp])?;
    q.wait_for("guest: shell", BOOT_TIMEOUT)?;
    q.wait_for_prompt("# ", STEP_TIMEOUT);
    q.send("echo $((6*7))xyz\n")?;
    q.wait_for("42xyz", STEP_TIMEOUT)?;
    q.send("poweroff -f\n")?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after poweroff -f"
    );
    Ok(())
}

//! The hypervisor on QEMU `virt` with the stock Linux guest as vm0.
//!
//! Every verdict comes from what the guest computed at run time (see `tests/guest/init`) or from
//! what the hypervisor reported, compared with what the host expects.

use integration_tests::{check_guest_facts, stock_guest_dir, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT};

/// vCPUs the hypervisor gives vm0.
const VM0_CPUS: usize = 2;

/// One boot (TCG is slow) shared by all the checks of a guest that powers itself off.
#[test]
fn guest_facts_and_system_off() -> Result<(), integration_tests::Error> {
    let mut q = Qemu::spawn(
        "guest_facts_and_system_off",
        &["--bootargs", "console=ttyAMA0 rdinit=/init hvtest=poweroff"],
    )?;
    let report = check_guest_facts(&mut q, &stock_guest_dir(), VM0_CPUS)?;
    q.wait_for("guest: powering off", STEP_TIMEOUT)?;
    // The guest's PSCI SYSTEM_OFF reaches the hypervisor, which reports it and powers off QEMU.
    let off = q.wait_for_all(&["vm0", "SYSTEM_OFF"], STEP_TIMEOUT)?;
    println!("hypervisor: {off}");
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after vm0's SYSTEM_OFF"
    );
    println!(
        "boot time (hypervisor, vm0 with {VM0_CPUS} vCPUs): QEMU start -> 'guest: init started' = \
         {:.2} s; QEMU exit at {:.2} s",
        report.init_started_at.as_secs_f64(),
        q.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The guest console is interactive through the hypervisor's vPL011: input reaches the shell.
#[test]
fn interactive_shell() -> Result<(), integration_tests::Error> {
    let mut q = Qemu::spawn("interactive_shell", &[])?;
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

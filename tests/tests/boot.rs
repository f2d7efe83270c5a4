//! The hypervisor on QEMU `virt` with the stock Linux guest as vm0, the only VM (`--vms 1`;
//! several VMs: `tests/two_vms.rs`).
//!
//! Every verdict comes from what the guest computed at run time (see `tests/guest/init`) or from
//! what the hypervisor reported, compared with what the host expects.

use integration_tests::{check_guest_facts, stock_guest_dir, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT};

/// vCPUs the hypervisor gives vm0.
const VM0_CPUS: usize = 2;

/// Boots of vm0 in `guest_facts_reboots_and_system_off`: the first plus two PSCI SYSTEM_RESETs.
const BOOTS: u32 = 3;
/// A guest IPA where vm0 has nothing (its DT puts RAM at 0x4000_0000 and only the emulated GIC
/// and UART below): a load from it must reach the guest as an abort, i.e. SIGBUS for devmem.
const UNMAPPED_IPA: &str = "0x0a000000";
/// A word of vm0's RAM (1 GiB at 0x4000_0000) above what its kernel uses (`mem=768M`): each
/// boot reads it through /dev/mem, then leaves a marker there for the next boot not to find.
const RAM_PROBE: &str = "0x7f000000";

/// One QEMU run (TCG is slow) shared by the checks of a guest that reboots itself twice through
/// PSCI SYSTEM_RESET and then powers off: every boot must come up whole from pristine images
/// (same kernel, 2 CPUs, working timer, the checksum), see its boot count grow, get an
/// abort for a load from an unmapped IPA, and find zeroes in RAM where the boot before left a
/// marker; the hypervisor must report each reset and the final
/// SYSTEM_OFF, then power the machine off.
#[test]
fn guest_facts_reboots_and_system_off() -> Result<(), integration_tests::Error> {
    let bootargs = format!(
        "console=ttyAMA0 rdinit=/init hvtest=reboot{} hvprobe={UNMAPPED_IPA} mem=768M hvramprobe={RAM_PROBE}",
        BOOTS - 1
    );
    // A PCI function assigned to no VM: the hypervisor must own it (SMMU enabled with global
    // bypass off, its StreamID aborting) and no guest may see it.
    let mut q = Qemu::spawn(
        "guest_facts_reboots_and_system_off",
        &[
            "--vms",
            "1",
            "--bootargs",
            &bootargs,
            "--",
            "-device",
            "virtio-rng-pci,disable-legacy=on,addr=3",
        ],
    )?;
    let smmu = q.wait_for_all(
        &["[hv] smmu: /smmuv3@9050000 (SMMUv3 at", "global bypass off"],
        BOOT_TIMEOUT,
    )?;
    println!("hypervisor: {smmu}");
    let rng = q.wait_for_all(&["[hv] pci: 00:03.0 [1af4:1044]", "BAR"], STEP_TIMEOUT)?;
    println!("hypervisor: {rng}");
    let group = q.wait_for_all(
        &[
            "[hv] pci: IOMMU group",
            "\"00:03.0\"",
            "StreamIDs [24]",
            "unassigned, aborting",
        ],
        STEP_TIMEOUT,
    )?;
    println!("hypervisor: {group}");
    let mut first_init = None;
    for boot in 0..BOOTS {
        let report = check_guest_facts(&mut q, &stock_guest_dir(), VM0_CPUS)?;
        assert_eq!(
            q.wait_fact("pci-functions", STEP_TIMEOUT)?,
            "0",
            "vm0 has no PCI function assigned: it must see none"
        );
        first_init.get_or_insert(report.init_started_at);
        assert_eq!(report.vm_name, "vm0", "the VM name in the guest's DT");
        assert_eq!(q.wait_fact("boot-count", STEP_TIMEOUT)?, boot.to_string());
        let ipa = UNMAPPED_IPA.trim_start_matches("0x0");
        let refused = q.wait_for_all(&["[hv]", "vm0", "unmapped IPA", ipa], STEP_TIMEOUT)?;
        println!("hypervisor: {refused}");
        assert_eq!(
            q.wait_fact("unmapped-read-status", STEP_TIMEOUT)?,
            "135",
            "devmem of an unmapped IPA must die of SIGBUS (128 + 7)"
        );
        // RAM no boot's kernel uses, which the boot before marked: zeroed before this boot's
        // first read of it (a reset re-zeroes the VM's RAM; the first boot's was stale).
        let hex = |v: String| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok();
        assert_eq!(
            hex(q.wait_fact("ram-probe", STEP_TIMEOUT)?),
            Some(0),
            "boot {boot}: RAM at {RAM_PROBE} before this boot wrote it"
        );
        assert_eq!(
            hex(q.wait_fact("ram-probe-marked", STEP_TIMEOUT)?),
            Some(0x5a5a_0000 + u64::from(boot)),
            "boot {boot}: the marker it left at {RAM_PROBE}"
        );
        if boot + 1 < BOOTS {
            q.wait_for("guest: rebooting", STEP_TIMEOUT)?;
            q.wait_for_all(&["[hv]", "vm0", "SYSTEM_RESET"], STEP_TIMEOUT)?;
            q.wait_for_all(&["[hv]", "vm0: reset done"], STEP_TIMEOUT)?;
        }
    }
    q.wait_for("guest: powering off", STEP_TIMEOUT)?;
    // The guest's PSCI SYSTEM_OFF reaches the hypervisor, which reports it and powers off QEMU.
    let off = q.wait_for_all(&["[hv]", "vm0", "SYSTEM_OFF"], STEP_TIMEOUT)?;
    println!("hypervisor: {off}");
    q.wait_for_all(&["[hv]", "all VMs stopped"], STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after vm0's SYSTEM_OFF"
    );
    println!(
        "boot time (hypervisor, vm0 with {VM0_CPUS} vCPUs): QEMU start -> 'guest: init started' = \
         {:.2} s; {BOOTS} boots and QEMU exit at {:.2} s",
        first_init.unwrap_or_default().as_secs_f64(),
        q.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The guest console is interactive through the hypervisor's vPL011: input reaches the shell.
#[test]
fn interactive_shell() -> Result<(), integration_tests::Error> {
    let mut q = Qemu::spawn("interactive_shell", &["--vms", "1"])?;
    q.wait_for("guest: shell", BOOT_TIMEOUT)?;
    // The tty buffers what is typed before the shell reads; the shell's prompt, a partial
    // line, is shown by the console mux once the VM is being typed into.
    q.send("echo $((6*7))xyz\n")?;
    q.wait_for("42xyz", STEP_TIMEOUT)?;
    assert!(
        q.wait_for_prompt("# ", STEP_TIMEOUT),
        "the shell's prompt (a partial line) never showed after typing into the VM"
    );
    q.send("poweroff -f\n")?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after poweroff -f"
    );
    Ok(())
}

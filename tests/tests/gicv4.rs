//! GICv4.0 direct injection of assigned functions' MSIs (QEMU `gic-version=4`): two VMs with
//! `--pci` (a virtio disk and NIC each). Each guest's vITS MAPTIs become VMAPTIs to the vPE of
//! the target vCPU, which stays resident on its pinned CPU, so a function's MSI becomes a vLPI
//! the guest takes with no exit: the disks' MD5s cross DMA whose completions are those MSIs,
//! the guests ping each other over their NICs, their /proc/interrupts count the MSIs, and the
//! hypervisor's stats say `delivery gicv4-direct` with no LPI taken at EL2 for either VM.

use std::time::Duration;

use integration_tests::{
    check_vm_disk, check_vm_guest_facts, check_vm_pings, pci_irqs_of, stock_guest_dir, vits_stats,
    Error, Qemu, STEP_TIMEOUT, VM0, VM1,
};

/// Wall-clock limit of the run (two guest boots with their disk reads and pings).
const RUN_LIMIT: Duration = Duration::from_secs(420);

/// No physical ITS command failed: the port logs one as `its: VM: COMMAND: error` (the only
/// other `its: vmN` line is the boot's statement of direct injection).
fn check_no_failed_its_command(log: &str) {
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.starts_with("[hv] its: vm") && !l.contains("GICv4.0 direct injection, vPEIDs")
        })
        .collect();
    assert!(
        failed.is_empty(),
        "physical ITS commands failed: {failed:?}"
    );
}

#[test]
fn msix_directly_injected_with_gicv4() -> Result<(), Error> {
    let vm0 = format!("{} hvtest=poweroff", VM0.net_bootargs(VM1.ip));
    let vm1 = format!("{} hvtest=poweroff", VM1.net_bootargs(VM0.ip));
    let mut q = Qemu::spawn_with_limit(
        "msix_directly_injected_with_gicv4",
        &[
            "--gic",
            "4",
            "--vms",
            "2",
            "--pci",
            "--vm-bootargs",
            "0",
            &vm0,
            "--vm-bootargs",
            "1",
            &vm1,
        ],
        RUN_LIMIT,
    )?;
    let l = q.wait_for_all(&["[hv] its: GICv4.0 direct injection"], STEP_TIMEOUT)?;
    println!("hypervisor: {l}");
    // Real hardware would need the doorbell path for a WFI: the boot log says it is not built.
    assert!(l.contains("doorbell path"), "{l}");
    for vm in ["vm0", "vm1"] {
        let l = q.wait_for_all(
            &["[hv] its:", vm, "GICv4.0 direct injection, vPEIDs"],
            STEP_TIMEOUT,
        )?;
        println!("hypervisor: {l}");
    }
    for vm in ["vm0", "vm1"] {
        check_vm_guest_facts(&mut q, vm, &stock_guest_dir(), 2)?;
    }
    // The DMA, whose completions are the MSIs below.
    check_vm_disk(&mut q, "vm0")?;
    check_vm_disk(&mut q, "vm1")?;
    for a in [&VM0, &VM1] {
        let line = q.wait_vm_fact(a.vm, "pci-irqs", STEP_TIMEOUT)?;
        println!("{}: pci-irqs={line}", a.vm);
        for f in [a.disk.0, a.nic.0] {
            let (mode, _, n) = pci_irqs_of(&line, f);
            assert_eq!(mode, "msix", "{}'s {f} uses MSI-X: {line}", a.vm);
            if f == a.disk.0 {
                assert!(n > 0, "{}'s disk {f} raised MSIs: {line}", a.vm);
            }
        }
        let msis: u64 = q
            .wait_vm_fact(a.vm, "its-msi-irqs", STEP_TIMEOUT)?
            .parse()
            .unwrap();
        assert!(msis > 0, "{}'s ITS MSI domain counted interrupts", a.vm);
        println!("{}: its-msi-irqs={msis}", a.vm);
    }
    // NIC interrupts both ways, directly injected too.
    check_vm_pings(&mut q, "vm0")?;
    check_vm_pings(&mut q, "vm1")?;

    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(status.success(), "QEMU exit {status:?} after two poweroffs");
    let log = q.log();
    for vm in ["vm0", "vm1"] {
        let (path, c) = vits_stats(&log, vm);
        assert_eq!(path, "gicv4-direct", "{vm}'s delivery path");
        // Not one of the VM's MSIs reached the hypervisor as a physical LPI.
        assert_eq!(c["lpis_at_el2"], 0, "{vm}");
        assert_eq!(c["command_errors"], 0, "{vm}");
        assert!(c["events_mapped"] > 0, "{vm}: no event mapped");
    }
    assert!(
        !log.contains("that no device owns"),
        "an LPI no device owns reached the hypervisor"
    );
    check_no_failed_its_command(&log);
    Ok(())
}

/// A VM reset under direct injection: vm0 reboots itself once. Its vCPUs leave their vPEs, its
/// events are unmapped, its vPEs unmapped (VMAPP V=0) and their tables zeroed; the next boot
/// maps them again and its disk's MSIs arrive directly as before.
#[test]
fn a_reset_vm_gets_its_vpes_back() -> Result<(), Error> {
    let mut q = Qemu::spawn_with_limit(
        "a_reset_vm_gets_its_vpes_back",
        &[
            "--gic",
            "4",
            "--vms",
            "2",
            "--pci",
            "--vm-bootargs",
            "0",
            "console=ttyAMA0 rdinit=/init hvtest=reboot1",
            "--vm-bootargs",
            "1",
            "console=ttyAMA0 rdinit=/init hvtest=poweroff",
        ],
        RUN_LIMIT,
    )?;
    q.wait_for_all(&["[hv] its: vm0: GICv4.0 direct injection"], STEP_TIMEOUT)?;
    for boot in 0..2 {
        check_vm_disk(&mut q, "vm0")?;
        let line = q.wait_vm_fact("vm0", "pci-irqs", STEP_TIMEOUT)?;
        println!("vm0 boot {boot}: pci-irqs={line}");
        let (mode, _, n) = pci_irqs_of(&line, VM0.disk.0);
        assert_eq!(mode, "msix", "{line}");
        assert!(n > 0, "vm0's disk raised MSIs on boot {boot}: {line}");
        if boot == 0 {
            q.wait_for("[hv] vm0: resetting: PSCI SYSTEM_RESET", STEP_TIMEOUT)?;
            q.wait_for("[hv] vm0: reset done, reloading", STEP_TIMEOUT)?;
        }
    }
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(status.success(), "QEMU exit {status:?}");
    let log = q.log();
    // The last stats line is the stop's (the reset logs one too, after its unmapping).
    let (path, c) = vits_stats(&log, "vm0");
    assert_eq!(path, "gicv4-direct");
    assert_eq!(c["lpis_at_el2"], 0);
    assert_eq!(c["command_errors"], 0);
    assert!(c["events_mapped"] > 0, "vm0: no event mapped at its stop");
    check_no_failed_its_command(&log);
    Ok(())
}

//! The machine as its device tree describes it, when that DT is not QEMU's own: a second SMMU
//! the hypervisor cannot drive, named by the host bridge's `iommu-map` for some functions, and a
//! DT the hypervisor cannot use at all. The host DTs are QEMU virt's with
//! `qemu/board-virt.sh --host-dts tests/configs/*.dtsi` merged in.

use std::time::Duration;

use integration_tests::{
    check_vm_disk, check_vm_guest_facts, repo_root, stock_guest_dir, Error, Qemu, STEP_TIMEOUT,
};

/// Wall-clock limit of the run with devices (one guest boot and its disk reads).
const RUN_LIMIT: Duration = Duration::from_secs(420);

/// The second SMMU of `tests/configs/second-smmu.dtsi` and why it cannot be driven.
const SECOND_SMMU: &str = "/smmuv3@c000000";
const NOT_COHERENT: &str = "it is not dma-coherent";

#[test]
fn an_smmu_the_hypervisor_cannot_drive_refuses_only_its_functions() -> Result<(), Error> {
    let host = repo_root().join("tests/configs/second-smmu.dtsi");
    let mut q = Qemu::spawn_with_limit(
        "an_smmu_the_hypervisor_cannot_drive_refuses_only_its_functions",
        &[
            "--vms",
            "2",
            "--pci",
            "--host-dts",
            host.to_str().unwrap(),
            "--vm-bootargs",
            "0",
            "console=ttyAMA0 rdinit=/init hvtest=poweroff",
        ],
        RUN_LIMIT,
    )?;
    // Both SMMUs are reported: QEMU's driven, the second left alone with the reason.
    q.wait_for_all(
        &["[hv] smmu: /smmuv3@9050000", "enabled, global bypass off"],
        STEP_TIMEOUT,
    )?;
    q.wait_for_all(
        &[
            &format!("smmu: {SECOND_SMMU}: not driven: {NOT_COHERENT}"),
            "never assigned",
        ],
        STEP_TIMEOUT,
    )?;
    // The iommu-map, not the DT's order, says which SMMU each IOMMU group is behind.
    for (dev, behind) in [
        ("00:01.0", "of /smmuv3@9050000"),
        ("00:02.0", "of /smmuv3@9050000"),
    ] {
        q.wait_for_all(
            &["[hv] pci: IOMMU group", dev, behind, "unassigned, aborting"],
            STEP_TIMEOUT,
        )?;
    }
    for dev in ["00:03.0", "00:04.0"] {
        q.wait_for_all(
            &[
                "pci: IOMMU group",
                dev,
                "never assigned: its DMA goes through",
                SECOND_SMMU,
            ],
            STEP_TIMEOUT,
        )?;
    }
    // vm1 asked for those two functions: refused before it starts, naming the SMMU and why.
    let refusal = q.wait_for_all(
        &[
            "config: vm1:",
            "cannot be assigned",
            SECOND_SMMU,
            NOT_COHERENT,
            "VM not started",
        ],
        STEP_TIMEOUT,
    )?;
    assert!(
        refusal.contains("00:03.0"),
        "the refusal names the function: {refusal}"
    );
    // vm0's functions are behind the SMMU that is driven: it boots and reads its own disk
    // through its stage 2 (the MD5 of what its DMA brought in against the host's).
    check_vm_guest_facts(&mut q, "vm0", &stock_guest_dir(), 2)?;
    check_vm_disk(&mut q, "vm0")?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exit {status:?} after vm0's poweroff"
    );
    let log = q.log();
    assert!(!log.contains("[vm1]"), "vm1 must never have run:\n{log}");
    Ok(())
}

#[test]
fn a_host_dt_error_is_reported_before_power_off() -> Result<(), Error> {
    let host = repo_root().join("tests/configs/broken-timer.dtsi");
    let mut q = Qemu::spawn_with_limit(
        "a_host_dt_error_is_reported_before_power_off",
        &["--host-dts", host.to_str().unwrap()],
        Duration::from_secs(120),
    )?;
    // The parser rejects the timer node before the console is set up; the stdout-path UART,
    // found from the blob alone, still carries the reason.
    let line = q.wait_for_all(
        &[
            "[hv] smmu-hv",
            "the host device tree cannot be used",
            "timer",
            "interrupts",
            "powering off",
        ],
        STEP_TIMEOUT,
    )?;
    assert!(
        line.contains("not a whole number of specifiers"),
        "the message says what is wrong: {line}"
    );
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exit {status:?}: the board powered off"
    );
    Ok(())
}

//! A machine with two PCI host bridges (two segments): QEMU's one root complex described as two
//! generic ECAM bridges by `tests/configs/two-bridges.dtsi`, domain 1 being a `pxb-pcie`
//! expander's root bus (0x80) with a root port and a virtio disk below it. vm0 gets that disk
//! (0001:81:00.0) and a NIC of domain 0, so its guest sees two virtual host bridges, each
//! with the host's `linux,pci-domain`, the disk behind its root port, both behind its vSMMU; it
//! reads the disk through nested translation (the MD5 of what its DMA brought in against the
//! host's of the image). vm1 keeps domain 0's other functions. vm2, INTx only
//! (`smmu-hv,intx-only`, so it cannot take the function MSI-only instead), asks for the domain-0
//! function whose INTx line is the one vm0's domain-1 disk raises: refused, naming both.

use std::time::Duration;

use integration_tests::{
    check_vm_disk, check_vm_guest_facts, make_disk_image, repo_root, stock_guest_dir, Error, Qemu,
    DISK_BYTES, STEP_TIMEOUT,
};

/// Wall-clock limit of the run (two guest boots and their disk reads).
const RUN_LIMIT: Duration = Duration::from_secs(480);

/// The disk behind domain 1's root port, as the hypervisor's enumeration numbers it: the root
/// port at 80:01.0 (pxb slot 1, so its INTx is QEMU's line of slot 1 on pcie.0: INTID 36),
/// its secondary bus 0x81.
const DISK: &str = "0001:81:00.0";
const ROOT_PORT: &str = "0001:80:01.0";

#[test]
fn functions_on_two_host_bridges() -> Result<(), Error> {
    let host = repo_root().join("tests/configs/two-bridges.dtsi");
    let (image, md5) = make_disk_image("domain1", 0x5eed_d0d1);
    let drive = format!("if=none,id=d1disk,file={image},format=raw");
    let off = "console=ttyAMA0 rdinit=/init hvtest=poweroff";
    let mut q = Qemu::spawn_with_limit(
        "functions_on_two_host_bridges",
        &[
            "--vms",
            "3",
            "--smp",
            "6",
            "--mem",
            "5G",
            "--pci",
            "--host-dts",
            host.to_str().unwrap(),
            "--vm-pci",
            "0",
            "0001:81:00.0,00:02.0",
            "--vm-pci",
            "1",
            "00:03.0,00:04.0",
            "--vm-pci",
            "2",
            "00:01.0",
            "--vm-intx-only",
            "2",
            "--vm-bootargs",
            "0",
            off,
            "--vm-bootargs",
            "1",
            off,
            "--",
            "-drive",
            &drive,
            "-device",
            "pxb-pcie,bus_nr=128,id=pxb1,addr=0x10",
            "-device",
            "pcie-root-port,bus=pxb1,chassis=9,id=rp1,addr=1",
            "-device",
            "virtio-blk-pci,bus=rp1,drive=d1disk,disable-legacy=on,iommu_platform=on",
        ],
        RUN_LIMIT,
    )?;
    // Both bridges taken, each its own segment.
    for (node, what) in [
        ("/pcie@10000000", "domain 0000, buses 00-7f"),
        ("/pcie@4018000000", "domain 0001, buses 80-ff"),
    ] {
        q.wait_for_all(&["[hv] pci: host bridge", node, what], STEP_TIMEOUT)?;
    }
    // Domain 1 enumerated on its own: the root port and the disk below it, in one IOMMU group
    // whose StreamIDs are domain 1's RIDs (0x8008, 0x8100) through its iommu-map.
    q.wait_for_all(&[&format!("[hv] pci: {DISK} [1af4:1042]")], STEP_TIMEOUT)?;
    let group = q.wait_for_all(
        &[
            "[hv] pci: IOMMU group",
            ROOT_PORT,
            DISK,
            "StreamIDs [32776, 33024]",
        ],
        STEP_TIMEOUT,
    )?;
    println!("hypervisor: {group}");
    let assigned = q.wait_for_all(
        &[&format!("[hv] vm0: assigned {DISK} (IOMMU groups"), "33024"],
        STEP_TIMEOUT,
    )?;
    println!("hypervisor: {assigned}");
    // vm2's 00:01.0 raises the SPI vm0's domain-1 disk raises: refused before it starts.
    let refusal = q.wait_for_all(
        &[
            "config: vm2:",
            "would share INTx line INTID 36",
            DISK,
            "00:01.0",
            "VM not started",
        ],
        STEP_TIMEOUT,
    )?;
    println!("hypervisor: {refusal}");

    // vm0's guest: both virtual bridges, its disk behind the root port it is shown, both of
    // its functions in IOMMU groups of its vSMMU, the disk's content through its DMA.
    let facts = check_vm_guest_facts(&mut q, "vm0", &stock_guest_dir(), 2)?;
    println!("vm0: {facts:?}");
    let list = q.wait_vm_fact("vm0", "pci-list", STEP_TIMEOUT)?;
    assert_eq!(
        list,
        format!("00:02.0:1af4:1041,{ROOT_PORT}:1b36:000c,{DISK}:1af4:1042"),
        "vm0's functions on its two host bridges (and the root port above its disk)"
    );
    let probe = q.wait_vm_fact("vm0", "smmu-probe", STEP_TIMEOUT)?;
    assert!(probe.starts_with("9050000.smmuv3: ias"), "{probe}");
    let groups = q.wait_vm_fact("vm0", "iommu-groups", STEP_TIMEOUT)?;
    for f in ["00:02.0", DISK] {
        assert!(
            groups.split(',').any(|g| g == f),
            "vm0's IOMMU driver grouped {f}: {groups}"
        );
    }
    assert_eq!(
        q.wait_vm_fact("vm0", "disk-bytes", STEP_TIMEOUT)?,
        DISK_BYTES.to_string(),
        "vm0's /dev/vda is the domain-1 disk"
    );
    assert_eq!(
        q.wait_vm_fact("vm0", "disk-md5", STEP_TIMEOUT)?,
        md5,
        "vm0's MD5 of the domain-1 disk against the host's of {image}"
    );
    assert_eq!(q.wait_vm_fact("vm0", "disk-rw", STEP_TIMEOUT)?, "ok");

    // vm1 on domain 0 alone, as before.
    check_vm_guest_facts(&mut q, "vm1", &stock_guest_dir(), 2)?;
    check_vm_disk(&mut q, "vm1")?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exit {status:?} after both poweroffs"
    );
    let log = q.log();
    assert!(!log.contains("[vm2]"), "vm2 must never have run");
    assert!(
        !log.contains("smmu: event"),
        "no physical SMMU event: every DMA was translated"
    );
    Ok(())
}

//! MSI and MSI-X through each VM's virtual ITS, with more functions than INTx lines: three VMs
//! on `-smp 6`, two functions each on the root bus's slots 1-6. QEMU `virt` has four INTx lines,
//! so vm2's functions (an NVMe controller at 00:05.0 and a virtio NIC at 00:06.0) share vm0's
//! lines: the hypervisor assigns them MSI-only (holding INTx Disable) instead of refusing them.
//! Every function's interrupts are MSI-X through the guest's own ITS, nested over its stage 2
//! (the guest's stage 1 maps its doorbell IOVA onto the vITS's GITS_TRANSLATER, whose page the
//! VM's stage 2 sends to the physical one): the disks' MD5s cross DMA whose completions are
//! those MSIs, the NVMe has a vector per I/O queue, vm0 and vm2 ping each other over their
//! NICs. vm2 runs with `iommu.passthrough=1` (identity domains: its functions' DMA, MSIs
//! included, meets stage 2 only, the doorbell address being the vITS's IPA itself): MSIs work
//! the same without the guest's stage 1. vm1 forges MSIs with CPU stores to its doorbell page (nothing is raised anywhere, and
//! a read of the page aborts), then points its NIC's MSI-X table elsewhere: the NIC's MSIs fault
//! in vm1's own SMMU stage 1, and the other VMs' pings and interrupts go on.

use std::time::Duration;

use integration_tests::{
    check_vm_disk, check_vm_guest_facts, check_vm_pings, make_disk_image, pci_irqs_of,
    stock_guest_dir, vits_stats, Error, Qemu, DISK_BYTES, STEP_TIMEOUT, VM0,
};

/// Wall-clock limit of the run (three guest boots with their disk reads and pings).
const RUN_LIMIT: Duration = Duration::from_secs(540);

/// vm2's functions: QEMU's NVMe controller (1b36:0010) and a virtio NIC, on slots whose INTx
/// lines are vm0's (slot 5 swizzles onto slot 1's line, slot 6 onto slot 2's).
const NVME: &str = "00:05.0";
const NIC2: &str = "00:06.0";
const VM2_IP: &str = "10.0.2.12";

#[test]
fn msix_through_each_vms_vits_with_more_functions_than_intx_lines() -> Result<(), Error> {
    let (image, nvme_md5) = make_disk_image("nvme", 0x0a5e_2b1d);
    let drive = format!("if=none,id=nvm,file={image},format=raw");
    let vm0 = format!("{} hvtest=poweroff", VM0.net_bootargs(VM2_IP));
    let vm1 = "console=ttyAMA0 rdinit=/init iomem=relaxed hvforge=0x8090040 \
               hvmsixforge=10.0.2.11/24 hvtest=poweroff"
        .to_string();
    let vm2 = format!(
        "console=ttyAMA0 rdinit=/init iommu.passthrough=1 hvip={VM2_IP}/24 hvping={} hvpinged=1 hvtest=poweroff",
        VM0.ip
    );
    let mut q = Qemu::spawn_with_limit(
        "msix_through_each_vms_vits_with_more_functions_than_intx_lines",
        &[
            "--vms",
            "3",
            "--smp",
            "6",
            "--mem",
            "5G",
            "--pci",
            "--vm-pci",
            "2",
            &format!("{NVME},{NIC2}"),
            "--vm-bootargs",
            "0",
            &vm0,
            "--vm-bootargs",
            "1",
            &vm1,
            "--vm-bootargs",
            "2",
            &vm2,
            "--",
            "-drive",
            &drive,
            "-device",
            "nvme,serial=smmu-hv-nvme,drive=nvm,bus=pcie.0,addr=5.0",
            "-netdev",
            "hubport,id=vm2net,hubid=0",
            "-device",
            "virtio-net-pci,netdev=vm2net,bus=pcie.0,addr=6.0,disable-legacy=on,iommu_platform=on,mac=52:54:00:00:00:12,romfile=",
        ],
        RUN_LIMIT,
    )?;
    let its = q.wait_for_all(&["[hv] its: ITS at 0x8080000"], STEP_TIMEOUT)?;
    println!("hypervisor: {its}");
    // vm2's two functions would share vm0's lines: assigned MSI-only, each with a message.
    for f in [NVME, NIC2] {
        let l = q.wait_for_all(&["vm2", f, "MSI-only"], STEP_TIMEOUT)?;
        println!("hypervisor: {l}");
    }

    for vm in ["vm0", "vm1", "vm2"] {
        check_vm_guest_facts(&mut q, vm, &stock_guest_dir(), 2)?;
    }
    // The guests' ITS drivers probed their vITS (the virtual one: 8192 LPIs, the vGIC's bound).
    let log = q.log();
    for vm in ["vm0", "vm1", "vm2"] {
        assert!(
            log.lines().any(|l| l.starts_with(&format!("[{vm}] "))
                && l.contains("ITS: Using hypervisor restricted LPI range [8192]")),
            "{vm}'s ITS driver probed the vITS"
        );
    }

    // vm2's IOMMU driver left its functions untranslated (stage 2 only).
    assert!(
        log.lines()
            .any(|l| l.starts_with("[vm2] ")
                && l.contains("iommu: Default domain type: Passthrough")),
        "vm2's functions in identity domains (iommu.passthrough=1)"
    );

    // The DMA, whose completions are the MSIs below.
    check_vm_disk(&mut q, "vm0")?;
    check_vm_disk(&mut q, "vm1")?;
    assert_eq!(
        q.wait_vm_fact("vm2", "nvme-bytes", STEP_TIMEOUT)?,
        DISK_BYTES.to_string()
    );
    assert_eq!(
        q.wait_vm_fact("vm2", "nvme-md5", STEP_TIMEOUT)?,
        nvme_md5,
        "vm2's MD5 of its NVMe namespace against the host's of {image}"
    );
    assert_eq!(q.wait_vm_fact("vm2", "nvme-rw", STEP_TIMEOUT)?, "ok");

    // Every function interrupts by MSI-X, and did: the disks' completions, the NICs' queues.
    let mut counts = Vec::new();
    for (vm, fns) in [
        ("vm0", ["00:01.0", "00:02.0"]),
        ("vm1", ["00:03.0", "00:04.0"]),
        ("vm2", [NVME, NIC2]),
    ] {
        let line = q.wait_vm_fact(vm, "pci-irqs", STEP_TIMEOUT)?;
        println!("{vm}: pci-irqs={line}");
        for f in fns {
            let (mode, vectors, n) = pci_irqs_of(&line, f);
            assert_eq!(mode, "msix", "{vm}'s {f} uses MSI-X: {line}");
            if f == "00:01.0" || f == "00:03.0" || f == NVME {
                assert!(n > 0, "{vm}'s disk {f} raised MSIs: {line}");
            }
            if f == NVME {
                // The admin queue and one I/O queue per vCPU, each its own vector.
                assert!(vectors >= 3, "NVMe: a vector per queue: {line}");
            }
        }
        counts.push(q.wait_vm_fact(vm, "its-msi-irqs", STEP_TIMEOUT)?);
    }
    println!("ITS MSIs per VM: {counts:?}");

    // vm1 forged MSIs from its CPU: every store returned (the page is write-only, not absent),
    // none raised anything in vm1 (its devices are idle then: no network), the load aborted.
    assert_eq!(
        q.wait_vm_fact("vm1", "forge-read-status", STEP_TIMEOUT)?,
        "135",
        "a load from the doorbell page aborts (SIGBUS)"
    );
    let forged = q.wait_vm_fact("vm1", "forge-stores", STEP_TIMEOUT)?;
    let f: Vec<&str> = forged.split_whitespace().collect();
    assert_eq!(f[0], "64", "every forged store returned: {forged}");
    let before = f[1].trim_start_matches("its-msi-before=");
    let after = f[2].trim_start_matches("its-msi-after=");
    assert_eq!(
        before, after,
        "a CPU store to the doorbell raised an MSI: {forged}"
    );

    // vm1 then pointed its NIC's MSI-X table at an IOVA its stage 1 does not map and made the
    // NIC receive: those MSIs faulted in vm1's own SMMU stage 1 (events to vm1's driver).
    let msix = q.wait_vm_fact("vm1", "msixforge", STEP_TIMEOUT)?;
    let (entries, events) = msix
        .split_once(" smmu-events:")
        .unwrap_or_else(|| panic!("msixforge={msix}"));
    assert!(
        entries
            .trim_start_matches("entries:")
            .parse::<u32>()
            .unwrap()
            >= 2,
        "vm1 rewrote its NIC's MSI-X table: {msix}"
    );
    assert!(
        events.parse::<u32>().unwrap() > 0,
        "vm1's misdirected MSIs faulted in its own stage 1: {msix}"
    );

    // vm0 and vm2 reach each other over their NICs (MSI-X on both sides).
    check_vm_pings(&mut q, "vm0")?;
    check_vm_pings(&mut q, "vm2")?;

    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exit {status:?} after three poweroffs"
    );
    let log = q.log();
    // Each vITS delivered LPIs, dropped none, and no LPI reached the hypervisor unowned (a
    // forged one would have, had DeviceID 0 been mapped).
    for vm in ["vm0", "vm1", "vm2"] {
        let (path, c) = vits_stats(&log, vm);
        assert_eq!(path, "list-registers", "{vm}'s delivery path");
        assert_eq!(c["lpis_dropped"], 0, "{vm}");
        assert_eq!(c["command_errors"], 0, "{vm}");
        assert!(c["lpis_delivered"] > 0, "{vm}: no LPI delivered");
    }
    assert!(
        !log.contains("that no device owns"),
        "an LPI no device owns reached the hypervisor"
    );
    // The misdirected MSIs' faults went to vm1's vSMMU, and only there.
    assert!(
        log.lines()
            .any(|l| l.contains("[hv] vsmmu: vm1: event") && l.contains("forwarded to the guest")),
        "vm1's faults forwarded to its guest"
    );
    for vm in ["vm0", "vm2"] {
        assert!(
            !log.contains(&format!("[hv] vsmmu: {vm}: event")),
            "{vm} got an SMMU event"
        );
    }
    assert!(
        !log.contains("smmu: event"),
        "no SMMU event the hypervisor had to keep: every fault was a guest's own"
    );
    Ok(())
}

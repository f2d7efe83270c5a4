//! PCI device assignment: each VM gets its own physical PCI functions (`qemu/board-virt.sh --pci`:
//! a virtio-blk-pci disk and a virtio-net-pci NIC per VM, named in the VM's
//! `smmu-hv,pci-devices`), sees only those behind its virtual host bridge, and drives them with
//! the stock kernel's virtio modules: it reads its own disk (the MD5 the host computes of that
//! VM's image), writes and reads back a scratch area, and pings the other VM over the NICs' shared
//! QEMU hub. `bare_guest_with_vm0s_pci_devices` runs the same guest with vm0's devices directly on
//! QEMU, without the hypervisor: the reference for the guest side (and for throughput).
//!
//! What the guest prints is in `tests/guest/init` (`pci-list`, `eth0-*`, `disk-*`, `ping`,
//! `pinged`); the board's PCI topology and disk images in `docs/vm-config.md`.

use std::fs;
use std::time::Duration;

use integration_tests::{
    check_guest_facts, check_vm_disk, check_vm_guest_facts, check_vm_pings, host_disk_md5,
    pci_irqs_of, stock_guest_dir, vm_text, Assigned, Line, Qemu, DISK_BYTES, DISK_CONTENT,
    STEP_TIMEOUT, VM0, VM1,
};

/// vCPUs the board script gives each generated VM (and `--smp` of the bare run).
const VM_CPUS: usize = 2;
/// Wall-clock limit of a run with PCI devices (two boots, disk I/O, pings that wait for the peer).
const PCI_RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// The PCI function QEMU's host bridge shows at 00:00.0; a host bridge in a guest's list is no
/// assigned device, so the lists are compared without it.
const HOST_BRIDGE: &str = "00:00.0:1b36:0008";

/// Kernel command line of VM `a` with its NIC at its address, pinging `peer`, waiting to be pinged
/// and then powering off.
fn bootargs(a: &Assigned, peer: &str) -> String {
    format!(
        "console=ttyAMA0 rdinit=/init hvip={}/24 hvping={peer} hvpinged=1 hvtest=poweroff",
        a.ip
    )
}

/// The modules the guest must have loaded, in order (`guest: modules=`), as `qemu/setup.sh`
/// listed them.
fn expected_modules() -> String {
    let path = stock_guest_dir().join("modules");
    let list = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run qemu/setup.sh)", path.display()));
    list.split_whitespace().collect::<Vec<_>>().join(",")
}

/// The functions of a `pci-list` value, without QEMU's host bridge.
fn functions(list: &str) -> Vec<String> {
    list.split(',')
        .filter(|f| !f.is_empty() && *f != "none" && *f != HOST_BRIDGE)
        .map(str::to_string)
        .collect()
}

/// The StreamIDs in a hypervisor line's `StreamIDs [8, 16]`.
fn stream_ids(line: &str) -> Vec<u32> {
    line.split_once("StreamIDs [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(ids, _)| {
            ids.split(',')
                .filter_map(|id| id.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of the first fact `key` that `source` printed (`source` `None`: a line without a
/// console prefix, as in a bare run; `Some(vm)`: a line of `vm`).
fn fact_in(lines: &[Line], source: Option<&str>, key: &str) -> Option<String> {
    let needle = format!("guest: {key}=");
    lines.iter().find_map(|l| {
        let text = match source {
            Some(vm) => vm_text(&l.text, vm)?,
            None => l.text.as_str(),
        };
        let (_, value) = text.split_once(&needle)?;
        Some(value.trim().to_string())
    })
}

/// Two VMs, each with its own disk and NIC (`--vms 2 --pci`), pinging each other: each sees
/// exactly its own two functions, reads its own disk (the host's MD5 of that VM's image, and the
/// two images differ), writes and reads back its scratch MiB, gets its own MAC and address, pings
/// the other and is pinged by it; the hypervisor reports the functions and their assignment
/// (StreamID = RequesterID), aborts none of them, and powers off when both VMs have. vm0's
/// functions interrupt by MSI-X through its vITS; vm1 asks for INTx only
/// (`smmu-hv,intx-only`), so its functions keep the forwarded INTx lines, the fallback.
#[test]
fn two_guests_with_their_own_disks_and_nics() -> Result<(), integration_tests::Error> {
    let vm0_args = bootargs(&VM0, VM1.ip);
    let vm1_args = bootargs(&VM1, VM0.ip);
    let mut q = Qemu::spawn_with_limit(
        "two_guests_with_their_own_disks_and_nics",
        &[
            "--vms",
            "2",
            "--pci",
            "--vm-intx-only",
            "1",
            "--vm-bootargs",
            "0",
            &vm0_args,
            "--vm-bootargs",
            "1",
            &vm1_args,
        ],
        PCI_RUN_TIMEOUT,
    )?;
    let guest = stock_guest_dir();

    let mut disk_md5s = Vec::new();
    for a in [&VM0, &VM1] {
        let vm = a.vm;
        check_vm_guest_facts(&mut q, vm, &guest, VM_CPUS)?;
        let list = q.wait_vm_fact(vm, "pci-list", STEP_TIMEOUT)?;
        assert_eq!(
            functions(&list),
            functions(&a.pci_list()),
            "{vm}'s PCI functions (guest: pci-list={list}): exactly its own disk and NIC"
        );
        assert_eq!(
            q.wait_vm_fact(vm, "eth0-mac", STEP_TIMEOUT)?,
            a.mac,
            "{vm}'s NIC MAC: its own NIC"
        );
        assert_eq!(
            q.wait_vm_fact(vm, "eth0-ip", STEP_TIMEOUT)?,
            format!("{}/24", a.ip),
            "{vm}'s eth0 address"
        );
        disk_md5s.push(check_vm_disk(&mut q, vm)?);
        // How they interrupted, after the disk's DMA: MSI-X (vm0, through its vITS) or the
        // INTx line (vm1, INTx only); the disk's completions counted either way.
        let irqs = q.wait_vm_fact(vm, "pci-irqs", STEP_TIMEOUT)?;
        let want = if vm == "vm0" { "msix" } else { "intx" };
        for (bdf, _) in [a.disk, a.nic] {
            let (mode, _, n) = pci_irqs_of(&irqs, bdf);
            assert_eq!(mode, want, "{vm}'s {bdf} interrupts by {want}: {irqs}");
            if bdf == a.disk.0 {
                assert!(n > 0, "{vm}'s disk interrupted: {irqs}");
            }
        }
        check_vm_pings(&mut q, vm)?;
        q.wait_vm_for(vm, "guest: powering off", STEP_TIMEOUT)?;
    }
    assert_ne!(
        disk_md5s[0], disk_md5s[1],
        "vm0 and vm1 read the same disk content"
    );

    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after both VMs powered off"
    );

    let lines = q.lines();
    let modules = expected_modules();
    let hv: Vec<&str> = lines
        .iter()
        .map(|l| l.text.as_str())
        .filter(|t| t.starts_with("[hv] "))
        .collect();
    for a in [&VM0, &VM1] {
        let vm = a.vm;
        assert_eq!(
            fact_in(&lines, Some(vm), "modules").as_deref(),
            Some(modules.as_str()),
            "the modules {vm}'s guest loaded"
        );
        for ((bdf, rid), id) in [(a.disk, "1042"), (a.nic, "1041")] {
            let found = format!("[hv] pci: {bdf} [1af4:{id}]");
            assert!(
                hv.iter().any(|t| t.starts_with(&found)),
                "the hypervisor did not report {found:?}"
            );
            // `[hv] vm0: assigned 00:01.0 (IOMMU group 1, StreamIDs [8])` (or, for all of the
            // VM's groups at once, `(IOMMU groups [1, 2], StreamIDs [8, 16])`).
            let assigned = format!("[hv] {vm}: assigned {bdf} (IOMMU group");
            let at = hv.iter().position(|t| t.starts_with(&assigned));
            let line = at.map(|i| hv[i]);
            assert!(
                line.is_some_and(|t| stream_ids(t).contains(&rid)),
                "the hypervisor did not report {bdf} assigned to {vm} with StreamID {rid} \
                 (= its RequesterID): {line:?}"
            );
            println!("hypervisor: {}", line.expect("just checked"));
            // Enumeration may report every group unassigned first; none of the VM's may be
            // left so after its assignment.
            let aborted: Vec<&&str> = hv[at.expect("just checked")..]
                .iter()
                .filter(|t| t.contains("unassigned") && t.contains(bdf))
                .collect();
            assert!(
                aborted.is_empty(),
                "{bdf} is {vm}'s but the hypervisor left it unassigned: {aborted:?}"
            );
        }
        assert!(
            hv.iter()
                .any(|t| t.starts_with(&format!("[hv] {vm}: stopped"))),
            "the hypervisor did not report {vm} stopped"
        );
    }
    let errors: Vec<&&str> = hv.iter().filter(|t| t.contains("config: ")).collect();
    assert!(errors.is_empty(), "config errors: {errors:?}");
    Ok(())
}

/// The same guest with vm0's devices (`--bare --pci`) behind QEMU's own SMMUv3, no hypervisor:
/// it loads its modules, sees the disk and NIC (and QEMU's host bridge), probes the SMMU and puts
/// the disk and NIC in IOMMU groups, reads the disk's content (the host's MD5 of
/// build/disks/vm0.img), writes and reads back its scratch MiB, configures eth0 and pings QEMU's
/// user network at 10.0.2.2 on the same hub.
#[test]
fn bare_guest_with_vm0s_pci_devices() -> Result<(), integration_tests::Error> {
    let smp = VM_CPUS.to_string();
    let bootargs = format!(
        "console=ttyAMA0 rdinit=/init hvip={}/24 hvping=10.0.2.2 hvtest=poweroff",
        VM0.ip
    );
    // QEMU's own SMMUv3 on the PCIe root complex (`--bare` leaves it out; QEMU merges a second
    // -M into the first): the guest's DMA goes through the stage 1 of its own arm-smmu-v3
    // driver, as it does on its vSMMU under the hypervisor.
    let mut q = Qemu::spawn_with_limit(
        "bare_guest_with_vm0s_pci_devices",
        &[
            "--bare",
            "--smp",
            &smp,
            "--pci",
            "--bootargs",
            &bootargs,
            "--",
            "-M",
            "virt,iommu=smmuv3",
        ],
        PCI_RUN_TIMEOUT,
    )?;
    let report = check_guest_facts(&mut q, &stock_guest_dir(), VM_CPUS)?;
    assert_eq!(report.vm_name, "none", "without a hypervisor");
    let list = q.wait_fact("pci-list", STEP_TIMEOUT)?;
    assert_eq!(
        functions(&list),
        functions(&VM0.pci_list()),
        "the bare guest's PCI functions (guest: pci-list={list})"
    );
    let probe = q.wait_fact("smmu-probe", STEP_TIMEOUT)?;
    assert!(
        probe.starts_with("9050000.smmuv3: ias "),
        "the guest's arm-smmu-v3 driver did not probe QEMU's SMMUv3 at 0x9050000: {probe:?}"
    );
    println!("bare guest's arm-smmu-v3: {probe}");
    assert_eq!(
        q.wait_fact("iommu-groups", STEP_TIMEOUT)?,
        format!("{},{}", VM0.disk.0, VM0.nic.0),
        "the functions in the bare guest's IOMMU groups: its disk and NIC"
    );
    assert_eq!(q.wait_fact("eth0-mac", STEP_TIMEOUT)?, VM0.mac);
    assert_eq!(
        q.wait_fact("eth0-ip", STEP_TIMEOUT)?,
        format!("{}/24", VM0.ip)
    );
    assert_eq!(
        q.wait_fact("disk-bytes", STEP_TIMEOUT)?,
        DISK_BYTES.to_string()
    );
    assert_eq!(
        q.wait_fact("disk-md5", STEP_TIMEOUT)?,
        host_disk_md5("vm0"),
        "the guest's MD5 of its disk's first {DISK_CONTENT} bytes against the host's of build/disks/vm0.img"
    );
    assert_eq!(q.wait_fact("disk-rw", STEP_TIMEOUT)?, "ok");
    assert_eq!(
        q.wait_fact("ping", STEP_TIMEOUT)?,
        "ok",
        "ping QEMU's user network"
    );
    q.wait_for("guest: powering off", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after the guest powered off"
    );
    assert_eq!(
        fact_in(&q.lines(), None, "modules"),
        Some(expected_modules()),
        "the modules the guest loaded"
    );
    println!(
        "boot time (bare, --pci, -smp {VM_CPUS}): QEMU start -> 'guest: init started' = {:.2} s; \
         QEMU exit at {:.2} s",
        report.init_started_at.as_secs_f64(),
        q.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A device DMA that leaves its VM's memory is stopped by the SMMU at stage 2 and reported by
/// the hypervisor with the VM, StreamID and IPA, while the other VM's disk I/O goes on untouched;
/// a DMA into RAM no CPU of the VM touched lands in zeroed memory (a second virtio-rng, 00:08.0,
/// StreamID 64, with its rings and buffer above vm1's kernel's `mem=768M`).
/// vm1 also owns a virtio-rng function at 00:07.0 (RID/StreamID 56), which its init takes from
/// the driver and programs by hand with rings at IPA 8 GiB (its RAM is 1 GiB at 1 GiB). vm1
/// boots with `iommu.passthrough=1`: its driver gives its functions identity domains, so its
/// vSMMU lets their DMA through untranslated to stage 2 (STE S2Translate; the stage-1 case is
/// `vsmmu.rs`, `stage1_fault_is_forwarded_to_the_guest`). The STE dump shows each StreamID's
/// real table entry: the host bridge's, unassigned, aborts.
#[test]
fn stage2_fault_is_logged_and_contained() -> Result<(), integration_tests::Error> {
    let mut q = Qemu::spawn_with_limit(
        "stage2_fault_is_logged_and_contained",
        &[
            "--vms",
            "2",
            "--pci",
            "--vm-pci",
            "1",
            "00:03.0,00:04.0,00:07.0,00:08.0",
            "--vm-bootargs",
            "0",
            "console=ttyAMA0 rdinit=/init hvtest=poweroff",
            "--vm-bootargs",
            "1",
            "console=ttyAMA0 rdinit=/init iommu.passthrough=1 mem=768M hvdmafault=00:07.0 hvdmazero=00:08.0 hvtest=poweroff",
            "--",
            "-device",
            "virtio-rng-pci,disable-legacy=on,iommu_platform=on,addr=7",
            "-device",
            "virtio-rng-pci,disable-legacy=on,iommu_platform=on,addr=8",
        ],
        PCI_RUN_TIMEOUT,
    )?;
    let abort = q.wait_for_all(
        &["[hv] smmu: STE 0 (IOMMU group 0)", "Abort"],
        PCI_RUN_TIMEOUT,
    )?;
    println!("hypervisor: {abort}");
    let ste = q.wait_for_all(&["[hv] smmu: STE 56 ", "S2Translate, VMID 2"], STEP_TIMEOUT)?;
    println!("hypervisor: {ste}");
    let kicked = q.wait_vm_fact("vm1", "dma-fault-kicked", PCI_RUN_TIMEOUT)?;
    assert_eq!(kicked, "00:07.0");
    // vm1's driver put the function in an identity domain (iommu.passthrough=1): its vSMMU
    // leaves the stream untranslated, so the DMA meets stage 2 only, and its fault is the
    // hypervisor's, not forwarded to the guest.
    assert_eq!(
        q.wait_vm_fact("vm1", "dma-fault-domain", STEP_TIMEOUT)?,
        "identity",
        "vm1's IOMMU domain of 00:07.0 with iommu.passthrough=1"
    );
    assert_eq!(
        q.wait_vm_fact("vm1", "smmu-event", STEP_TIMEOUT)?,
        "none",
        "SMMU events vm1's own driver received for a stage-2 fault"
    );
    let event = q.wait_for_all(
        &[
            "smmu: event",
            "F_TRANSLATION",
            "StreamID 56 (vm1)",
            "stage-2",
            "IPA 0x20000",
        ],
        STEP_TIMEOUT,
    )?;
    println!("hypervisor: {event}");
    // A DMA into RAM no CPU of vm1 touched (above its kernel's mem=768M): the SMMU finds it
    // mapped (no event) and it lands in a block the hypervisor zeroed before vm1's first Bus
    // Master Enable, the rest of which reads 0.
    assert_eq!(
        q.wait_vm_fact("vm1", "dma-zero-used", STEP_TIMEOUT)?,
        "1 len=64",
        "vm1's virtio-rng wrote its buffer at 0x7e000000"
    );
    assert_eq!(
        q.wait_vm_fact("vm1", "dma-zero-after", STEP_TIMEOUT)?,
        "0x00000000,0x00000000,0x00000000",
        "the rest of that never-touched block, after the DMA"
    );
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(status.success(), "QEMU exited with {status}");
    assert!(
        !q.lines()
            .iter()
            .any(|l| l.text.contains("smmu: event") && l.text.contains("StreamID 64 ")),
        "the DMA into never-touched RAM faulted"
    );

    // vm0's disk: whole and intact, checked from its own output.
    let lines = q.lines();
    let md5 = fact_in(&lines, Some("vm0"), "disk-md5");
    assert_eq!(md5.as_deref(), Some(host_disk_md5("vm0").as_str()));
    assert_eq!(
        fact_in(&lines, Some("vm0"), "disk-rw").as_deref(),
        Some("ok")
    );
    assert_eq!(
        fact_in(&lines, Some("vm1"), "disk-rw").as_deref(),
        Some("ok")
    );
    // No event names vm0 or an unassigned stream.
    assert!(
        !lines
            .iter()
            .any(|l| l.text.contains("smmu: event") && !l.text.contains("(vm1)")),
        "an SMMU event outside vm1's deliberate fault"
    );
    Ok(())
}

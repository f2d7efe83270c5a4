//! The emulated stage-1 SMMUv3 (vSMMU) of each VM with PCI devices: the guest's DT has an
//! `arm,smmu-v3` node and its PCI host an `iommu-map`, so the stock kernel's built-in arm-smmu-v3
//! driver probes it and puts the VM's functions in IOMMU groups; their DMA then goes IOVA
//! -(the guest's stage 1)-> IPA -(the VM's stage 2)-> PA, with nested STEs in the physical SMMU.
//!
//! `two_guests_nested_over_stage2`: both VMs probe their vSMMU, group exactly their own
//! functions, read and write their disks and ping each other through it; the physical STEs of
//! both VMs' StreamIDs are nested with the VM's VMID; and vm0 measures how many vSMMU register
//! traps one 4 KiB O_DIRECT disk read costs (`hvbench=traps`, read against the hypervisor's
//! counters, the monitor's `stats raw`). `stage1_fault_is_forwarded_to_the_guest`: a DMA outside vm0's own
//! stage-1 mappings faults at stage 1, the event reaches vm0's own driver through its vSMMU's
//! event queue, and vm1's disk is untouched. (A stage-2 fault stays the hypervisor's:
//! `pci.rs`, `stage2_fault_is_logged_and_contained`.)
//!
//! What the guest prints is in `tests/guest/init` (`smmu-probe`, `iommu-groups`,
//! `trapbench-*`, `dma-fault-*`, `smmu-event*`).

use std::time::Duration;

use integration_tests::{
    check_vm_disk, check_vm_guest_facts, check_vm_pings, focus, host_disk_md5, hv_text,
    parse_stats, ste_lines, stock_guest_dir, type_paced, vm_text, vsmmu_stats, Assigned, Line,
    Qemu, DISK_CONTENT, STEP_TIMEOUT, VM0, VM1, VSMMU_STATS_KEYS,
};

/// vCPUs the board script gives each generated VM.
const VM_CPUS: usize = 2;
/// Wall-clock limit of one run (two boots, disk I/O, pings that wait for the peer, the benchmark).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// The reads `hvbench=traps` does (tests/guest/init).
const TRAPBENCH_READS: u64 = 256;
/// The most vSMMU traps one 4 KiB O_DIRECT read may cost. Linux (strict invalidation, Debian's
/// default) unmaps each of a virtio-blk request's buffers on completion, one TLBI + CMD_SYNC
/// batch (one CMDQ_PROD write) each: 4 per read on bare QEMU's SMMUv3, where each is followed by
/// CMDQ_CONS polls. With the CMD_SYNC completed by an MSI write into guest memory the polls go.
const MAX_TRAPS_PER_READ: f64 = 8.0;
/// The IPA at which tests/guest/init's `hvdmafault=` puts the rings (descriptors, then avail and
/// used rings a page apart): an IOVA the guest never mapped.
const DMAFAULT_BASE: u64 = 0x2_0000_0000;

/// What the hypervisor said at boot of VM `vm`'s vSMMU:
/// `[hv] vsmmu: vm0: SMMUv3 (stage 1) at 0x9050000, StreamIDs [8, 16]` gives
/// `(0x9050000, [8, 16])` (StreamIDs sorted).
fn vsmmu_boot_line(lines: &[Line], vm: &str) -> (u64, Vec<u32>) {
    let prefix = format!("vsmmu: {vm}: SMMUv3 (stage 1) at ");
    let line = lines
        .iter()
        .find_map(|l| hv_text(&l.text)?.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the hypervisor did not report {vm}'s vSMMU ({prefix:?}...)"));
    let parsed = line.split_once(", StreamIDs [").and_then(|(addr, rest)| {
        let addr = u64::from_str_radix(addr.trim().strip_prefix("0x")?, 16).ok()?;
        let (ids, _) = rest.split_once(']')?;
        let mut ids = ids
            .split(',')
            .map(|id| id.trim().parse().ok())
            .collect::<Option<Vec<u32>>>()?;
        ids.sort_unstable();
        Some((addr, ids))
    });
    parsed.unwrap_or_else(|| panic!("unreadable vSMMU line of {vm}: {line:?}"))
}

/// Checks VM `a.vm`'s guest through its disk facts: the common facts, exactly its own two PCI
/// functions, its driver's probe of the vSMMU the hypervisor reported for it (same address), its
/// own functions (and only those) in IOMMU groups, its NIC's MAC and address when `net`, its disk
/// (the host's MD5 of its image) and the scratch MiB written and read back.
fn check_guest_through_disk(
    q: &mut Qemu,
    a: &Assigned,
    net: bool,
) -> Result<(), integration_tests::Error> {
    let vm = a.vm;
    check_vm_guest_facts(q, vm, &stock_guest_dir(), VM_CPUS)?;
    let list = q.wait_vm_fact(vm, "pci-list", STEP_TIMEOUT)?;
    let list = list.replace("00:00.0:1b36:0008,", "");
    assert_eq!(
        list,
        a.pci_list(),
        "{vm}'s PCI functions: exactly its own disk and NIC"
    );
    let probe = q.wait_vm_fact(vm, "smmu-probe", STEP_TIMEOUT)?;
    assert_ne!(
        probe, "none",
        "{vm}'s arm-smmu-v3 driver probed no SMMU (no `ias ..-bit` line in its kernel log)"
    );
    let (addr, sids) = vsmmu_boot_line(&q.lines(), vm);
    println!("{vm}: vSMMU at {addr:#x}, StreamIDs {sids:?}; the guest's driver: {probe}");
    assert_eq!(
        sids,
        a.stream_ids(),
        "{vm}'s vSMMU StreamIDs: those of its functions (StreamID = RequesterID)"
    );
    assert!(
        probe.starts_with(&format!("{addr:x}.")),
        "{vm}'s driver probed an SMMU ({probe:?}) other than its vSMMU at {addr:#x}"
    );
    assert_eq!(
        q.wait_vm_fact(vm, "iommu-groups", STEP_TIMEOUT)?,
        a.iommu_groups(),
        "the functions in {vm}'s IOMMU groups: exactly its own"
    );
    if net {
        assert_eq!(q.wait_vm_fact(vm, "eth0-mac", STEP_TIMEOUT)?, a.mac);
        assert_eq!(
            q.wait_vm_fact(vm, "eth0-ip", STEP_TIMEOUT)?,
            format!("{}/24", a.ip)
        );
    }
    check_vm_disk(q, vm)?;
    Ok(())
}

/// Lines of the whole run that report an SMMU event: the hypervisor's own (`[hv] smmu: event`),
/// its forwarding to a guest, and the guests' drivers' (`arm-smmu-v3 ...: event 0x.. received`).
fn event_lines(lines: &[Line]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l.text.as_str())
        .filter(|t| {
            hv_text(t).is_some_and(|h| {
                h.starts_with("smmu: event") || (h.starts_with("vsmmu: ") && h.contains(": event "))
            }) || (t.contains("arm-smmu-v3") && t.contains(": event 0x"))
        })
        .collect()
}

/// Two VMs (`--vms 2 --pci`), each translating its own devices' DMA through its own stage 1
/// over its stage 2: each guest's driver probes its vSMMU and groups exactly its own two
/// functions, reads its own disk (the host's MD5), writes and reads back its scratch MiB, and
/// the two ping each other. vm0 then measures the vSMMU traps of 256 4 KiB O_DIRECT reads
/// against the hypervisor's counters (`stats raw` before and after): CMDQ_CONS is never read (its
/// CMD_SYNCs complete through an MSI write into its memory) and a read costs at most
/// [`MAX_TRAPS_PER_READ`]; meanwhile the physical STEs of both VMs' StreamIDs are nested, with
/// each VM's VMID. No SMMU event anywhere; both VMs power off and so does the machine.
#[test]
fn two_guests_nested_over_stage2() -> Result<(), integration_tests::Error> {
    let vm0_args = format!("{} hvbench=traps hvtest=poweroff", VM0.net_bootargs(VM1.ip));
    // vm1 stays up with a shell, so that its STEs are still its own when vm0's benchmark ends.
    let vm1_args = VM1.net_bootargs(VM0.ip);
    let mut q = Qemu::spawn_two_pci_vms(
        "two_guests_nested_over_stage2",
        None,
        &vm0_args,
        &vm1_args,
        RUN_TIMEOUT,
    )?;

    for a in [&VM0, &VM1] {
        let vm = a.vm;
        check_guest_through_disk(&mut q, a, true)?;
        check_vm_pings(&mut q, vm)?;
    }
    q.wait_vm_for("vm1", "guest: shell", STEP_TIMEOUT)?;

    // vm0's benchmark: counters, go, the reads, counters (and the STE dump), go on.
    q.wait_vm_for("vm0", "guest: trapbench-ready", STEP_TIMEOUT)?;
    let before = vsmmu_stats(&mut q, "vm0")?;
    focus(&mut q, "vm0")?;
    q.send("\n")?;
    let done = q.wait_vm_for("vm0", "guest: trapbench-done", STEP_TIMEOUT)?;
    let reads: u64 = done
        .split_once("reads=")
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("vm0: unreadable {done:?}"));
    assert_eq!(
        reads, TRAPBENCH_READS,
        "the 4 KiB O_DIRECT reads vm0's dd completed"
    );
    let after = vsmmu_stats(&mut q, "vm0")?;

    // Both VMs up, with their drivers attached: each StreamID's physical STE is nested, with
    // its VM's VMID. The StreamIDs are the ones the hypervisor gave each vSMMU.
    let lines = q.lines();
    let mut want = Vec::new();
    for a in [&VM0, &VM1] {
        let (_, sids) = vsmmu_boot_line(&lines, a.vm);
        want.extend(sids.into_iter().map(|sid| (sid, a)));
    }
    let sids: Vec<u32> = want.iter().map(|&(sid, _)| sid).collect();
    let stes = ste_lines(&mut q, &sids)?;
    for (sid, a) in &want {
        let ste = &stes[sid];
        println!("hypervisor: {ste}");
        assert!(
            ste.contains(&format!("V=1 Nested, VMID {},", a.vmid)),
            "StreamID {sid} of {}: its STE must be valid and nested (the guest's stage 1 over \
             its stage 2) with VMID {}: {ste:?}",
            a.vm,
            a.vmid
        );
    }
    q.send("\n")?;

    let delta = |key: &str| {
        after[key].checked_sub(before[key]).unwrap_or_else(|| {
            panic!(
                "vm0's vSMMU counter {key} went down: {} -> {}",
                before[key], after[key]
            )
        })
    };
    let per_read = |key: &str| delta(key) as f64 / reads as f64;
    eprintln!(
        "vsmmu traps per 4 KiB O_DIRECT read (vm0, {reads} reads): cmdq_prod {:.2}, cmdq_cons \
         {:.2}, reg_reads {:.2}, reg_writes {:.2}, total {:.2} (commands {:.2}, syncs {:.2})",
        per_read("cmdq_prod"),
        per_read("cmdq_cons"),
        per_read("reg_reads"),
        per_read("reg_writes"),
        per_read("traps"),
        per_read("commands"),
        per_read("syncs"),
    );
    assert_eq!(
        delta("cmdq_cons"),
        0,
        "vm0 read CMDQ_CONS during its reads: its CMD_SYNCs should complete through an MSI \
         write into its memory, not be polled"
    );
    assert!(delta("traps") > 0, "no vSMMU trap during vm0's reads");
    assert!(
        delta("cmdq_prod") >= reads,
        "fewer CMDQ_PROD writes ({}) than reads ({reads}): with strict invalidation each read \
         unmaps its buffers, an invalidation batch each",
        delta("cmdq_prod")
    );
    assert!(
        per_read("traps") <= MAX_TRAPS_PER_READ,
        "{:.2} vSMMU traps per 4 KiB read (at most {MAX_TRAPS_PER_READ})",
        per_read("traps")
    );
    for key in ["guest_events", "s2_faults"] {
        assert_eq!(delta(key), 0, "vm0's {key} during ordinary disk reads");
    }

    q.wait_vm_for("vm0", "guest: powering off", STEP_TIMEOUT)?;
    q.wait_for("[hv] vm0: stopped", STEP_TIMEOUT)?;
    focus(&mut q, "vm1")?;
    q.send("poweroff -f\n")?;
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after both VMs powered off"
    );
    let lines = q.lines();
    let events = event_lines(&lines);
    assert!(
        events.is_empty(),
        "SMMU events while both VMs only did ordinary DMA: {events:?}"
    );
    Ok(())
}

/// A DMA at an IOVA vm0's own stage 1 never mapped faults at stage 1, and the fault is vm0's to
/// see: its init takes its disk from the driver and programs it by hand with rings at IOVA
/// 8 GiB (`hvdmafault=`, kept translated by its stage 1), then kicks it. The hypervisor forwards
/// the F_TRANSLATION event into vm0's vSMMU event queue, vm0's own driver reports it (event
/// 0x10, StreamID 8, the ring's address), and nothing of it is a stage-2 fault. vm1, whose
/// disk I/O runs alongside, reads its disk whole before and after.
#[test]
fn stage1_fault_is_forwarded_to_the_guest() -> Result<(), integration_tests::Error> {
    let vm0_args = format!(
        "console=ttyAMA0 rdinit=/init hvdmafault={} hvtest=poweroff",
        VM0.disk.0
    );
    let mut q = Qemu::spawn_two_pci_vms(
        "stage1_fault_is_forwarded_to_the_guest",
        None,
        &vm0_args,
        "console=ttyAMA0 rdinit=/init",
        RUN_TIMEOUT,
    )?;

    check_guest_through_disk(&mut q, &VM0, false)?;
    assert_eq!(
        q.wait_vm_fact("vm0", "dma-fault-kicked", STEP_TIMEOUT)?,
        VM0.disk.0
    );
    let domain = q.wait_vm_fact("vm0", "dma-fault-domain", STEP_TIMEOUT)?;
    assert!(
        domain.starts_with("DMA"),
        "vm0's IOMMU domain of {}: translated by its stage 1 (DMA or DMA-FQ), got {domain:?}",
        VM0.disk.0
    );
    assert_eq!(
        q.wait_vm_fact("vm0", "smmu-event", STEP_TIMEOUT)?,
        "0x10",
        "the SMMU events vm0's own driver received: F_TRANSLATION (0x10) only"
    );
    assert_eq!(
        q.wait_vm_fact("vm0", "smmu-event-sid", STEP_TIMEOUT)?,
        VM0.disk.1.to_string(),
        "the StreamID of the event vm0's driver received: its disk's"
    );
    let input = q.wait_vm_fact("vm0", "smmu-event-input", STEP_TIMEOUT)?;
    let addr = input
        .strip_prefix("0x")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("vm0: unreadable smmu-event-input={input:?}"));
    assert!(
        (DMAFAULT_BASE..DMAFAULT_BASE + 0x3000).contains(&addr),
        "the faulting input address vm0's driver received ({input}) is not in the rings at \
         {DMAFAULT_BASE:#x}"
    );
    let want = format!(
        "vsmmu: vm0: event F_TRANSLATION StreamID {} forwarded to the guest",
        VM0.disk.1
    );
    let forwarded = q.wait_until(&format!("the hypervisor's {want:?}"), STEP_TIMEOUT, |l| {
        hv_text(l).is_some_and(|t| t.starts_with(&want))
    })?;
    println!("hypervisor: {}", forwarded.text);
    q.wait_vm_for("vm0", "guest: powering off", STEP_TIMEOUT)?;

    // vm1: its disk whole at boot and again after vm0's fault (typed into its shell; the typed
    // line cannot match the fact: its key is a printf argument).
    check_guest_through_disk(&mut q, &VM1, false)?;
    q.wait_vm_for("vm1", "guest: shell", STEP_TIMEOUT)?;
    focus(&mut q, "vm1")?;
    type_paced(
        &mut q,
        &format!(
            "printf 'guest: %s=%s\\n' disk-md5-after \"$(dd if=/dev/vda bs=1048576 count={} \
         iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)\"\n",
            DISK_CONTENT >> 20
        ),
    )?;
    assert_eq!(
        q.wait_vm_fact("vm1", "disk-md5-after", STEP_TIMEOUT)?,
        host_disk_md5("vm1"),
        "vm1's MD5 of its disk after vm0's fault"
    );
    q.send("poweroff -f\n")?;
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(status.success(), "QEMU exited with {status}");

    // Every event is vm0's stage-1 fault: the hypervisor's own lines, if it logs the physical
    // event, say stage-1 and vm0; none names vm1 or is a stage-2 fault; vm1 was told of none.
    let lines = q.lines();
    for t in event_lines(&lines) {
        assert!(
            vm_text(t, "vm1").is_none() && !t.contains("vm1"),
            "an SMMU event of vm1, which only did ordinary disk I/O: {t:?}"
        );
        if hv_text(t).is_some_and(|h| h.starts_with("smmu: event")) {
            assert!(
                t.contains("(vm0)") && t.contains("stage-1"),
                "vm0's stage-1 fault must not be logged as anything else: {t:?}"
            );
        }
    }
    Ok(())
}

/// The parsers above, on the hypervisor's line formats (no QEMU).
#[test]
fn vsmmu_line_parsers() {
    let line = |text: &str| Line {
        text: text.to_string(),
        at: Duration::ZERO,
        stream: integration_tests::Stream::Stdout,
    };
    assert_eq!(
        hv_text("[hv] smmu: STE 8 (IOMMU group 1)"),
        Some("smmu: STE 8 (IOMMU group 1)")
    );
    assert_eq!(hv_text("[hv] WARN: smmu: event #1"), Some("smmu: event #1"));
    assert_eq!(hv_text("[vm0] [hv] x"), None);
    let lines = [
        line("[vm0] guest: vsmmu: vm0: SMMUv3 (stage 1) at 0x1, StreamIDs [1]"),
        line("[hv] vsmmu: vm1: SMMUv3 (stage 1) at 0x9060000, StreamIDs [32, 24]"),
        line("[hv] vsmmu: vm0: SMMUv3 (stage 1) at 0x9050000, StreamIDs [8, 16]"),
    ];
    assert_eq!(vsmmu_boot_line(&lines, "vm0"), (0x905_0000, vec![8, 16]));
    assert_eq!(vsmmu_boot_line(&lines, "vm1"), (0x906_0000, vec![24, 32]));
    let stats = parse_stats(
        "[hv] vsmmu: vm0 stats: traps=1200 cmdq_prod=1024 cmdq_cons=0 reg_reads=10 \
         reg_writes=1190 commands=2048 syncs=1024 guest_events=0 s2_faults=0",
    );
    assert_eq!(stats["traps"], 1200);
    assert_eq!(stats["cmdq_cons"], 0);
    assert_eq!(stats.len(), VSMMU_STATS_KEYS.len());
    let events = [
        line("[hv] WARN: smmu: event #1 F_TRANSLATION StreamID 56 (vm1) stage-2 read"),
        line("[hv] vsmmu: vm0: event F_TRANSLATION StreamID 8 forwarded to the guest"),
        line("[vm0] [    3.5] arm-smmu-v3 9050000.smmuv3: event 0x10 received:"),
        line("[vm0] [    3.5] arm-smmu-v3 9050000.smmuv3: \t0x0000000800000010"),
        line("[hv] vsmmu: vm0 stats: traps=1 cmdq_prod=0 cmdq_cons=0 reg_reads=1"),
        line("[hv] smmu: STE 8 (IOMMU group 1): V=1 Nested, VMID 1, S2TTB 0x4000"),
    ];
    assert_eq!(event_lines(&events).len(), 3);
}

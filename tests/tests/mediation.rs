//! Probe/remove mediation (issue 6): two VMs on the modular guest kernel (`arm_smmu_v3` a
//! module, `build/guest/modular`), each with its own virtio disk and NIC behind its own vSMMU.
//! What one guest does to its SMMU must change only its own streams: the other VM's DMA goes on
//! without a single error, an SMMU event or a stall.
//!
//! `vm0_rebinds_its_iommu_driver_while_vm1_does_dma` and its mirror image
//! `vm1_rebinds_its_iommu_driver_while_vm0_does_dma`: the cycler unloads and reloads its IOMMU
//! driver 20 times (`hvcycle=`: its endpoints removed, `rmmod arm_smmu_v3`, `modprobe
//! arm_smmu_v3`, a rescan, its disk's content checked) and then reboots 3 times, while the worker
//! runs continuous checked disk DMA and a ping stream to the cycler (`hvload=`).
//! `vm0_rebinds_its_iommu_driver_while_vm1_does_dma` also checks that a guest's FP/SIMD state
//! survives the hypervisor's traps, which never save it (docs/design.md, section 6):
//! `/bin/hvfpcheck` (tests/guest/fpcheck.c) holds patterns in all 32 V registers, FPCR and FPSR
//! on both vCPUs of a VM across millions of trapped SMMU_IDR0 reads, which the hypervisor's
//! counters must show: on the cycler's last boot, after its reboots (`hvfpcheck=`), and in the
//! worker's shell at the end.
//! `hostile_guest_is_contained`: vm0, its driver unloaded, programs its vSMMU by hand with busybox
//! `devmem` (`hvhostile=`: bypass and reserved STEs, another VM's StreamID, illegal commands, a
//! command flood, a queue outside its RAM, DMA through a bad STE and a bad CD) and gets what the
//! SMMU architecture says hardware answers, while vm1 runs the same load untouched.
//!
//! What the guest prints is in `tests/guest/init` (`hvload=`, `hvcycle=`, `hvhostile=`).

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use integration_tests::{
    check_fpcheck, check_vm_disk, check_vm_guest_facts, focus, hv_text, modular_guest_dir,
    parse_register_traps, parse_stats, parse_viommu_stats, ste_lines, type_paced, viommu_stats,
    vm_text, vsmmu_register_traps, vsmmu_stats, Assigned, Error, Line, Qemu, MAX_LOAD_GAP_MS,
    STEP_TIMEOUT, VM0, VM1,
};

/// vCPUs the board script gives each generated VM.
const VM_CPUS: usize = 2;
/// The driver unload/reload cycles the cycler does (`hvcycle=`).
const CYCLES: u32 = 20;
/// The reboots the cycler does after its cycles (`hvtest=rebootN`).
const REBOOTS: u32 = 3;
/// How long the worker's load may run at most (`hvload=`): far longer than any run; the test
/// stops it (`/tmp/hvload-stop`).
const LOAD_SECONDS: u32 = 900;
/// How long the worker's load runs on after the cycler stopped, for the idle throughput figure.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// The fewest rounds the worker's load must complete over the cycling run (6-15 a second measured).
const MIN_ROUNDS: u64 = 50;
/// Wall-clock limit of a cycling run (measured: 37-49 s here, up to ~4 minutes on a busier host).
const CYCLE_RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// Wall-clock limit of the hostile run (measured: 13-17 s here, ~80 s on a busier host).
const HOSTILE_RUN_TIMEOUT: Duration = Duration::from_secs(420);
/// The IPA where the hostile guest keeps its stream table and queues: in its VM's RAM (1 GiB at
/// 1 GiB) but above the 896 MiB `mem=` leaves Linux.
const HOSTILE_BASE: &str = "0x78000000";
/// The commands the hostile guest's flood publishes: 100 PROD writes of a full 256-entry queue.
const FLOOD_COMMANDS: u64 = 100 * 256;
/// The commands the hostile guest has refused (3 illegal, 1 queue outside its RAM).
const HOSTILE_COMMAND_ERRORS: u64 = 4;
/// `hvfpcheck`'s threads: one pinned to each of a VM's vCPUs.
const FP_THREADS: u64 = 2;
/// Trapped SMMU_IDR0 reads per thread of `hvfpcheck` in the worker's shell at the end, both
/// threads at once: about 8 µs a trap under TCG, so about 10 s.
const FP_TRAPS: u64 = 1_000_000;
/// The same on the cycler's last boot, after its reboots, while the worker's load still runs.
const FP_TRAPS_AFTER_REBOOTS: u64 = 500_000;
/// How long one `hvfpcheck` run may take (measured: see the reads above; a busy host is slower).
const FP_TIMEOUT: Duration = Duration::from_secs(180);

/// Starts both VMs (`--vms 2 --pci`) on the modular guest with these kernel command lines, the
/// VMs in `virtio` on a virtio-iommu (`--vm-iommu I virtio-iommu`), the others on their vSMMU.
fn spawn_two(
    name: &str,
    vm0_args: &str,
    vm1_args: &str,
    virtio: &[&Assigned],
    limit: Duration,
) -> Result<Qemu, Error> {
    let indices: Vec<&str> = virtio
        .iter()
        .map(|a| a.vm.trim_start_matches("vm"))
        .collect();
    let mut board = Vec::new();
    for i in &indices {
        board.extend(["--vm-iommu", i, "virtio-iommu"]);
    }
    Qemu::spawn_two_pci_vms_with(
        name,
        Some(&modular_guest_dir()),
        vm0_args,
        vm1_args,
        &board,
        limit,
    )
}

/// The IOMMU a VM's guest drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Iommu {
    /// Its vSMMU, with `arm_smmu_v3`.
    Smmuv3,
    /// Its virtio-iommu, with `virtio_iommu`.
    Virtio,
}

/// The MSI window of the guest's IOMMU groups with arm-smmu-v3 (its IOMMU_RESV_SW_MSI region,
/// MSI_IOVA_BASE and MSI_IOVA_LENGTH, where Linux maps the doorbell).
const SW_MSI_WINDOW: &str = "0x0000000008000000-0x00000000080fffff";
/// The MSI window with the hypervisor's virtio-iommu: the page of the vITS's GITS_TRANSLATER
/// (QEMU virt's ITS at 0x8080000, its translation frame 64 KiB on), which PROBE reports as
/// RESV_MEM_T_MSI and every translating domain passes 1:1.
const VITS_DOORBELL: &str = "0x0000000008090000-0x0000000008090fff";

/// The virtio-iommu's probe as the guest's driver logs it (tests/guest/init `viommu-probe`):
/// the device on virtio-mmio, a 39-bit input range, 4 KiB pages and 2 MiB / 1 GiB blocks.
const VIOMMU_PROBE_TAIL: &str = "input-bits=39 page-mask=0x40201000";

/// Checks boot `boot_count` of VM `a.vm`'s guest (the next one among its lines): the common facts
/// (the modular kernel's release), its boot count, its driver's probe of its vSMMU, exactly its
/// own functions in IOMMU groups, and its disk ([`check_vm_disk`]: the host's MD5 of its image,
/// the scratch MiB written and read back).
fn check_boot(q: &mut Qemu, a: &Assigned, boot_count: u32, iommu: Iommu) -> Result<(), Error> {
    let vm = a.vm;
    check_vm_guest_facts(q, vm, &modular_guest_dir(), VM_CPUS)?;
    expect_fact(
        q,
        vm,
        "boot-count",
        &boot_count.to_string(),
        "its boot count",
    )?;
    let probe = q.wait_vm_fact(vm, "smmu-probe", STEP_TIMEOUT)?;
    let viommu = q.wait_vm_fact(vm, "viommu-probe", STEP_TIMEOUT)?;
    match iommu {
        Iommu::Smmuv3 => {
            assert_ne!(
                probe, "none",
                "{vm}'s arm_smmu_v3 module probed no SMMU on boot {boot_count}"
            );
            assert_eq!(
                viommu, "none",
                "{vm} has no virtio-iommu on boot {boot_count}"
            );
        }
        Iommu::Virtio => {
            assert_eq!(probe, "none", "{vm} has no SMMUv3 on boot {boot_count}");
            assert!(
                viommu.starts_with("virtio") && viommu.ends_with(VIOMMU_PROBE_TAIL),
                "{vm}'s virtio_iommu module probed its virtio-iommu ({VIOMMU_PROBE_TAIL}) on \
                 boot {boot_count}: {viommu:?}"
            );
        }
    }
    let why = format!("the functions in its IOMMU groups on boot {boot_count}: exactly its own");
    expect_fact(q, vm, "iommu-groups", &a.iommu_groups(), &why)?;
    let (window, why) = match iommu {
        Iommu::Smmuv3 => (SW_MSI_WINDOW, "arm-smmu-v3's software MSI window"),
        Iommu::Virtio => (
            VITS_DOORBELL,
            "the vITS's doorbell page, its virtio-iommu's PROBE MSI region",
        ),
    };
    expect_fact(q, vm, "iommu-msi-window", window, why)?;
    check_vm_disk(q, vm)?;
    Ok(())
}

/// Waits for VM `vm`'s next fact `key` and checks it is exactly `want`; `why` says what it is.
fn expect_fact(q: &mut Qemu, vm: &str, key: &str, want: &str, why: &str) -> Result<(), Error> {
    let got = q.wait_vm_fact(vm, key, STEP_TIMEOUT)?;
    assert_eq!(got, want, "{vm}'s {key}: {why}");
    Ok(())
}

/// The `key=value` words of `text` (other words are skipped).
fn fields(text: &str) -> BTreeMap<&str, &str> {
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// One of the load's reports: `guest: load-report rounds=R ioerrors=E mismatches=M maxgap-ms=G
/// smmu-events=V io-error-lines=K echo-requests=Q echo-replies=P` (or `load-final`).
#[derive(Clone, Debug)]
struct LoadReport {
    /// When the line arrived.
    at: Duration,
    /// Its counters, by name.
    counters: BTreeMap<String, u64>,
    /// The line.
    text: String,
}

/// The counters every load report has.
const LOAD_KEYS: [&str; 8] = [
    "rounds",
    "ioerrors",
    "mismatches",
    "maxgap-ms",
    "smmu-events",
    "io-error-lines",
    "echo-requests",
    "echo-replies",
];

impl LoadReport {
    /// Parses `[vm] guest: load-KIND ...` of VM `vm` with `KIND` `report` or `final`.
    fn parse(line: &Line, vm: &str, kind: &str) -> Option<LoadReport> {
        let (_, rest) = vm_text(&line.text, vm)?.split_once("guest: load-")?;
        let words = rest.strip_prefix(kind)?.strip_prefix(' ')?;
        let counters: BTreeMap<String, u64> = fields(words)
            .into_iter()
            .map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect::<Option<_>>()
            .unwrap_or_else(|| panic!("unreadable load report of {vm}: {:?}", line.text));
        for key in LOAD_KEYS {
            assert!(
                counters.contains_key(key),
                "{vm}'s load report lacks {key}: {:?}",
                line.text
            );
        }
        Some(LoadReport {
            at: line.at,
            counters,
            text: line.text.clone(),
        })
    }

    fn get(&self, key: &str) -> u64 {
        self.counters[key]
    }
}

/// Every periodic load report of VM `vm` in `lines`, in order.
fn load_reports(lines: &[Line], vm: &str) -> Vec<LoadReport> {
    lines
        .iter()
        .filter_map(|l| LoadReport::parse(l, vm, "report"))
        .collect()
}

/// Stops VM `vm`'s load (typed into its shell: `touch /tmp/hvload-stop`) and returns its final
/// report, after checking that none of its reports (periodic or final) showed an I/O error, a
/// checksum mismatch, an SMMU event or a kernel I/O error line, and that it never stalled for
/// longer than [`MAX_LOAD_GAP_MS`].
fn stop_load(q: &mut Qemu, vm: &str) -> Result<LoadReport, Error> {
    q.wait_vm_for(vm, "guest: shell", STEP_TIMEOUT)?;
    focus(q, vm)?;
    type_paced(q, "touch /tmp/hvload-stop\n")?;
    let line = q.wait_vm_until(vm, "\"guest: load-final ...\"", STEP_TIMEOUT, |l| {
        l.contains("guest: load-final ")
    })?;
    let last = LoadReport::parse(&line, vm, "final").expect("the line matched as load-final");
    println!("{vm}: {}", last.text);
    let reports = load_reports(&q.lines(), vm);
    for r in reports.iter().chain([&last]) {
        for key in ["ioerrors", "mismatches", "smmu-events"] {
            assert_eq!(r.get(key), 0, "{vm}'s load saw {key}: {:?}", r.text);
        }
    }
    for key in ["ioerrors", "mismatches", "smmu-events", "io-error-lines"] {
        assert_eq!(
            last.get(key),
            0,
            "{vm}'s load's final {key} (its own count of failed reads and writes, checksum \
             mismatches, SMMU events its driver logged, kernel I/O error lines): {:?}",
            last.text
        );
    }
    assert!(
        last.get("maxgap-ms") <= MAX_LOAD_GAP_MS,
        "{vm}'s load stalled for {} ms (at most {MAX_LOAD_GAP_MS}): {:?}",
        last.get("maxgap-ms"),
        last.text
    );
    Ok(last)
}

/// How often the load reports (tests/guest/init: at the end of the first round at least 5 s after
/// its start, and so on from there).
const LOAD_REPORT_PERIOD: Duration = Duration::from_secs(5);

/// A load's rate in a window: rounds a second, the rounds done in it, its length in seconds.
type Rate = (f64, f64, f64);

/// Rounds per second of a load between `from` and `to`, from its reports in order (the periodic
/// ones, then the final one): the rounds done at each end of the window are interpolated
/// linearly between the arrival times and `rounds` of the reports around it. The load's start,
/// with 0 rounds, counts as a report [`LOAD_REPORT_PERIOD`] before the first one (it is at most
/// one round, ~0.2 s, earlier). The window is clipped to the span of these points. Returns the
/// rate, the rounds done in the clipped window and its length in seconds; `None` if the window
/// and the points do not overlap.
fn rounds_rate(reports: &[LoadReport], from: Duration, to: Duration) -> Option<Rate> {
    let first = reports.first()?;
    let start = first.at.checked_sub(LOAD_REPORT_PERIOD)?;
    let points: Vec<(f64, f64)> = [(start, 0)]
        .into_iter()
        .chain(reports.iter().map(|r| (r.at, r.get("rounds"))))
        .map(|(at, rounds)| (at.as_secs_f64(), rounds as f64))
        .collect();
    let (first, last) = (points[0].0, points[points.len() - 1].0);
    let (from, to) = (from.as_secs_f64().max(first), to.as_secs_f64().min(last));
    if to <= from {
        return None;
    }
    let rounds_at = |t: f64| {
        points
            .windows(2)
            .find(|w| w[0].0 <= t && t <= w[1].0)
            .map_or(points[0].1, |w| {
                let ((t0, r0), (t1, r1)) = (w[0], w[1]);
                if t1 > t0 {
                    r0 + (r1 - r0) * (t - t0) / (t1 - t0)
                } else {
                    r1
                }
            })
    };
    let rounds = rounds_at(to) - rounds_at(from);
    Some((rounds / (to - from), rounds, to - from))
}

/// The text of a hypervisor warning or error (`[hv] WARN: ...`, `[hv] ERROR: ...`).
fn hv_complaint(line: &str) -> Option<&str> {
    let text = line.strip_prefix("[hv] ")?;
    ["WARN: ", "ERROR: "]
        .iter()
        .find_map(|tag| text.strip_prefix(tag))
}

/// Whether `text` names VM `vm` as a word (`vm1:`, `(vm1)`, `vm1 stats`, not `vm10`).
fn names_vm(text: &str, vm: &str) -> bool {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == vm)
}

/// Checks that the hypervisor logged no warning or error that names VM `a.vm` or one of its PCI
/// functions, and no SMMU event of its streams, over the whole run.
fn check_no_complaint_about(lines: &[Line], a: &Assigned) {
    let vm = a.vm;
    let about =
        |text: &str| names_vm(text, vm) || text.contains(a.disk.0) || text.contains(a.nic.0);
    let bad: Vec<&str> = lines
        .iter()
        .map(|l| l.text.as_str())
        .filter(|t| {
            hv_complaint(t).is_some_and(about)
                || hv_text(t).is_some_and(|h| h.starts_with("smmu: event") && about(h))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "hypervisor warnings, errors or SMMU events about {vm}, which only did ordinary DMA: \
         {bad:?}"
    );
}

/// The STE dump after a global wait on a stats line: each of `a`'s StreamIDs must be nested
/// (its guest's stage 1 over its stage 2) with its VMID.
fn check_nested(q: &mut Qemu, a: &Assigned) -> Result<(), Error> {
    let stes = ste_lines(q, &a.stream_ids())?;
    for (sid, ste) in &stes {
        println!("hypervisor: {ste}");
        assert!(
            ste.contains(&format!("V=1 Nested, VMID {},", a.vmid)),
            "StreamID {sid} of {}: its STE must still be valid and nested with VMID {}: {ste:?}",
            a.vm,
            a.vmid
        );
    }
    Ok(())
}

/// Powers off VM `vm`, the last one running (typed into its shell), and checks that the machine
/// then stops and QEMU exits cleanly.
fn power_off_last(q: &mut Qemu, vm: &str) -> Result<(), Error> {
    focus(q, vm)?;
    type_paced(q, "poweroff -f\n")?;
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after {vm}, the last VM, powered off"
    );
    Ok(())
}

/// The cycler's `guest: iommu-cycle=I rmmod=ok modprobe=ok disk=ok groups=2 irq=msix:N:C ms=T`
/// lines, checked in order: every step ok, both its functions back in IOMMU groups and its disk
/// interrupting by MSI-X after each cycle. Returns
/// the first and last lines' arrival times and each cycle's duration (ms).
fn check_cycles(
    q: &mut Qemu,
    vm: &str,
    cycles: u32,
) -> Result<(Duration, Duration, Vec<u64>), Error> {
    let mut times = Vec::new();
    let mut ms = Vec::new();
    for i in 1..=cycles {
        let what = "\"guest: iommu-cycle=...\" (or a kernel panic)";
        let line = q.wait_vm_until(vm, what, STEP_TIMEOUT, |l| {
            l.contains("guest: iommu-cycle=") || l.contains("Kernel panic")
        })?;
        let text = vm_text(&line.text, vm).unwrap_or_default();
        assert!(
            !text.contains("Kernel panic"),
            "{vm}'s kernel panicked in its driver cycle {i} (its oops is in the log): {text:?}"
        );
        let (_, rest) = text.split_once("guest: ").expect("the line matched");
        let f = fields(rest);
        let want = [
            ("iommu-cycle", i.to_string()),
            ("rmmod", "ok".to_string()),
            ("modprobe", "ok".to_string()),
            ("disk", "ok".to_string()),
            ("groups", "2".to_string()),
        ];
        for (key, value) in &want {
            assert_eq!(
                f.get(key).copied(),
                Some(value.as_str()),
                "{vm}'s driver cycle {i}: {key} (rmmod/modprobe of its IOMMU driver, its \
                 disk's content after the rescan, the functions back in IOMMU groups): {text:?}"
            );
        }
        // The disk re-probed after the rescan interrupts by MSI-X through the VM's vITS (the
        // guest's ITS driver mapped its events again) and did for the reads just checked.
        let irq: Vec<&str> = f.get("irq").copied().unwrap_or("").split(':').collect();
        assert!(
            irq.len() == 3 && irq[0] == "msix" && irq[2].parse::<u64>().is_ok_and(|n| n > 0),
            "{vm}'s driver cycle {i}: its disk's MSI-X after the rescan (irq=MODE:N:COUNT): {text:?}"
        );
        ms.push(
            f.get("ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{vm}: no ms= in {text:?}")),
        );
        times.push(line.at);
    }
    let all = format!("{cycles}/{cycles}");
    expect_fact(
        q,
        vm,
        "iommu-cycles",
        &all,
        "its driver cycles that went through",
    )?;
    Ok((times[0], times[times.len() - 1], ms))
}

/// `cycler` unloads and reloads its IOMMU driver [`CYCLES`] times and then reboots [`REBOOTS`]
/// times, checking its own disk after each; meanwhile `worker` runs its load (checked disk DMA
/// and a ping stream to `cycler`), which must end clean: no I/O error, checksum mismatch, SMMU
/// event or kernel I/O error line, no stall longer than [`MAX_LOAD_GAP_MS`], at least
/// [`MIN_ROUNDS`] rounds; the worker's STEs are still nested with its VMID, its vSMMU counted no
/// event and no stage-2 fault, and the hypervisor logged nothing against it.
///
/// The throughput figure (printed, not judged beyond "it went on"): the worker's rounds per
/// second between the arrival of the cycler's first and last `iommu-cycle=` lines, and during
/// the idle window from the cycler's `[hv] vmN: stopped` to the worker's `load-final`; the rounds
/// done at each end of a window are interpolated linearly between the arrival times
/// ([`Line::at`]) and `rounds` of the worker's load reports around it (and its estimated start:
/// [`rounds_rate`]).
///
/// With `fpcheck`, both VMs also run `hvfpcheck` (FP/SIMD state across traps): the cycler on its
/// last boot ([`FP_TRAPS_AFTER_REBOOTS`] reads a thread, its vSMMU's SMMU_IDR0 count at its stop
/// at least as large), the worker in its shell at the end ([`fpcheck_in_shell`]).
fn rebind_while_the_other_does_dma(
    cycler: &Assigned,
    worker: &Assigned,
    cycler_iommu: Iommu,
    fpcheck: bool,
) -> Result<(), Error> {
    let (c, w) = (cycler.vm, worker.vm);
    let fp_args = if fpcheck {
        format!(" hvfpcheck={FP_TRAPS_AFTER_REBOOTS}@{REBOOTS}")
    } else {
        String::new()
    };
    let cycler_args = format!(
        "console=ttyAMA0 rdinit=/init hvip={}/24 hvcycle={CYCLES} hvtest=reboot{REBOOTS}{fp_args}",
        cycler.ip
    );
    let worker_args = format!(
        "console=ttyAMA0 rdinit=/init hvip={}/24 hvping={} hvload={LOAD_SECONDS}",
        worker.ip, cycler.ip
    );
    let (vm0_args, vm1_args) = if c == "vm0" {
        (&cycler_args, &worker_args)
    } else {
        (&worker_args, &cycler_args)
    };
    let (name, virtio) = match cycler_iommu {
        Iommu::Smmuv3 => (
            format!("{c}_rebinds_its_iommu_driver_while_{w}_does_dma"),
            vec![],
        ),
        Iommu::Virtio => (
            format!("{c}_on_virtio_iommu_rebinds_while_{w}_on_vsmmu_does_dma"),
            vec![cycler],
        ),
    };
    let mut q = spawn_two(&name, vm0_args, vm1_args, &virtio, CYCLE_RUN_TIMEOUT)?;

    check_boot(&mut q, cycler, 0, cycler_iommu)?;
    check_boot(&mut q, worker, 0, Iommu::Smmuv3)?;
    let (cycling_from, cycling_to, ms) = check_cycles(&mut q, c, CYCLES)?;
    for boot in 1..=REBOOTS {
        q.wait_vm_for(c, "guest: rebooting", STEP_TIMEOUT)?;
        check_boot(&mut q, cycler, boot, cycler_iommu)?;
    }
    let cycler_fp = if fpcheck {
        // After three resets, each entering its vCPUs afresh.
        let line = q.wait_vm_for(c, "fpcheck: ", FP_TIMEOUT)?;
        Some(check_fpcheck(c, &line, FP_THREADS * FP_TRAPS_AFTER_REBOOTS))
    } else {
        None
    };
    q.wait_vm_for(c, "guest: powering off", STEP_TIMEOUT)?;
    let stopped = q.wait_for_line(&format!("[hv] {c}: stopped"), STEP_TIMEOUT)?;
    if let Some(fp) = cycler_fp {
        // Its counters as the hypervisor logged them at its stop (a reset zeroes them, so they
        // are its last boot's): every read of hvfpcheck's trapped.
        let prefix = format!("vsmmu: {c} traps by register:");
        let line = q.wait_until(&format!("{prefix:?}..."), STEP_TIMEOUT, |l| {
            hv_text(l).is_some_and(|t| t.starts_with(&prefix))
        })?;
        let idr0 = parse_register_traps(&line.text)
            .get("IDR0")
            .map_or(0, |&(r, _)| r);
        println!(
            "{c} after {REBOOTS} reboots: {} (IDR0 reads trapped in that boot: {idr0})",
            fp.text
        );
        assert!(
            idr0 >= fp.traps,
            "{c}'s vSMMU counted {idr0} SMMU_IDR0 reads in its last boot, fewer than hvfpcheck's \
             {} (its reads did not trap to the hypervisor?): {}",
            fp.traps,
            line.text
        );
    }

    // The idle window: the worker alone.
    thread::sleep(IDLE_WINDOW);
    let last = stop_load(&mut q, w)?;
    assert!(
        last.get("rounds") >= MIN_ROUNDS,
        "{w}'s load did only {} rounds: {:?}",
        last.get("rounds"),
        last.text
    );
    assert!(
        last.get("echo-requests") > 0,
        "{w}'s ping stream to {c} sent nothing: {:?}",
        last.text
    );
    let mut reports = load_reports(&q.lines(), w);
    reports.push(last.clone());
    let cycling = rounds_rate(&reports, cycling_from, cycling_to);
    let idle = rounds_rate(&reports, stopped.at, last.at);
    let (Some(cycling), Some(idle)) = (cycling, idle) else {
        panic!(
            "{w}'s load reports ({} of them, {:.1} s to {:.1} s) do not cover both the cycling \
             window ({:.1} s to {:.1} s) and the idle one ({:.1} s to {:.1} s)",
            reports.len(),
            reports[0].at.as_secs_f64(),
            last.at.as_secs_f64(),
            cycling_from.as_secs_f64(),
            cycling_to.as_secs_f64(),
            stopped.at.as_secs_f64(),
            last.at.as_secs_f64()
        )
    };
    eprintln!(
        "{w}'s load: {:.2} rounds/s while {c} cycled its driver ({:.0} rounds in {:.1} s), {:.2} \
         rounds/s idle ({:.0} rounds in {:.1} s): {:.2} of idle; {c}'s {CYCLES} cycles took \
         {}..{} ms (mean {} ms); {w}'s final: {}",
        cycling.0,
        cycling.1,
        cycling.2,
        idle.0,
        idle.1,
        idle.2,
        cycling.0 / idle.0,
        ms.iter().min().expect("cycles"),
        ms.iter().max().expect("cycles"),
        ms.iter().sum::<u64>() / ms.len() as u64,
        last.text
    );
    assert!(
        cycling.1 > 0.0,
        "{w}'s load made no progress while {c} cycled its driver"
    );

    // The hypervisor's side: the worker's streams nested as before, nothing against it.
    let stats = vsmmu_stats(&mut q, w)?;
    for key in ["guest_events", "s2_faults"] {
        assert_eq!(stats[key], 0, "{w}'s vSMMU counter {key}");
    }
    check_nested(&mut q, worker)?;
    check_no_complaint_about(&q.lines(), worker);
    if fpcheck {
        fpcheck_in_shell(&mut q, w, FP_TRAPS)?;
    }
    if cycler_iommu == Iommu::Virtio {
        // The cycler's device answered every request of its 20 probes and 4 boots without an
        // error status, a queue error or a failed physical operation (its counters at its stop).
        let stats = last_viommu_stats(&q.lines(), c);
        for key in ["errors", "queue_errors", "phys_errors"] {
            assert_eq!(stats[key], 0, "{c}'s virtio-iommu counter {key}: {stats:?}");
        }
        assert!(
            stats["attach"] > 0 && stats["map"] > 0 && stats["unmap"] > 0,
            "{c}'s guest drove its virtio-iommu: {stats:?}"
        );
    }
    power_off_last(&mut q, w)
}

/// Runs `hvfpcheck smmu TRAPS` in VM `vm`'s shell (two threads, one on each vCPU) between two
/// readings of its vSMMU counters: it must print `ok` with no mismatch, and the hypervisor must
/// have counted at least its reads as trapped SMMU_IDR0 reads (and as traps).
fn fpcheck_in_shell(q: &mut Qemu, vm: &str, traps: u64) -> Result<(), Error> {
    let before = vsmmu_stats(q, vm)?;
    let before_regs = vsmmu_register_traps(q, vm)?;
    focus(q, vm)?;
    type_paced(q, &format!("hvfpcheck smmu {traps}\n"))?;
    let line = q.wait_vm_for(vm, "fpcheck: ", FP_TIMEOUT)?;
    let fp = check_fpcheck(vm, &line, FP_THREADS * traps);
    let after = vsmmu_stats(q, vm)?;
    let after_regs = vsmmu_register_traps(q, vm)?;
    let idr0 = |m: &BTreeMap<String, (u64, u64)>| m.get("IDR0").map_or(0, |&(r, _)| r);
    let idr0_delta = idr0(&after_regs).saturating_sub(idr0(&before_regs));
    let traps_delta = after["traps"].saturating_sub(before["traps"]);
    println!(
        "{vm}: {} (vSMMU traps +{traps_delta}, SMMU_IDR0 reads +{idr0_delta})",
        fp.text
    );
    assert!(
        idr0_delta >= fp.traps && traps_delta >= fp.traps,
        "{vm}'s vSMMU counted {idr0_delta} more SMMU_IDR0 reads and {traps_delta} more traps \
         over hvfpcheck's {} reads (they did not all trap to the hypervisor?)",
        fp.traps
    );
    Ok(())
}

/// The counters of the last `[hv] viommu: VM stats:` line of `vm` in `lines`.
fn last_viommu_stats(lines: &[Line], vm: &str) -> BTreeMap<String, u64> {
    let prefix = format!("viommu: {vm} stats: ");
    let line = lines
        .iter()
        .rev()
        .find(|l| hv_text(&l.text).is_some_and(|t| t.starts_with(&prefix)))
        .unwrap_or_else(|| panic!("no virtio-iommu stats line of {vm}"));
    parse_viommu_stats(&line.text)
}

/// vm0 cycles its IOMMU driver and reboots while vm1 does DMA; see
/// [`rebind_while_the_other_does_dma`].
#[test]
fn vm0_rebinds_its_iommu_driver_while_vm1_does_dma() -> Result<(), Error> {
    rebind_while_the_other_does_dma(&VM0, &VM1, Iommu::Smmuv3, true)
}

/// vm1 cycles its IOMMU driver and reboots while vm0 does DMA; see
/// [`rebind_while_the_other_does_dma`].
#[test]
fn vm1_rebinds_its_iommu_driver_while_vm0_does_dma() -> Result<(), Error> {
    rebind_while_the_other_does_dma(&VM1, &VM0, Iommu::Smmuv3, false)
}

/// vm0, on a virtio-iommu, cycles `virtio_iommu` and reboots while vm1, on its vSMMU, does DMA;
/// see [`rebind_while_the_other_does_dma`].
#[test]
fn vm0_on_virtio_iommu_rebinds_while_vm1_on_vsmmu_does_dma() -> Result<(), Error> {
    rebind_while_the_other_does_dma(&VM0, &VM1, Iommu::Virtio, false)
}

/// The mirror image: vm1 on a virtio-iommu cycles while vm0 on its vSMMU does DMA.
#[test]
fn vm1_on_virtio_iommu_rebinds_while_vm0_on_vsmmu_does_dma() -> Result<(), Error> {
    rebind_while_the_other_does_dma(&VM1, &VM0, Iommu::Virtio, false)
}

/// Driver cycles of the leak check (`virtio_iommu_driver_cycles_leak_nothing`).
const LEAK_CYCLES: u32 = 100;
/// Wall-clock limit of the leak run (100 cycles at ~1.5 s, two boots).
const LEAK_RUN_TIMEOUT: Duration = Duration::from_secs(900);

/// The hypervisor's heap in use, from the `[hv] heap: N bytes of M in use` line that ends a
/// `stats raw` dump (after the last line a global wait consumed).
fn heap_in_use(q: &mut Qemu) -> Result<u64, Error> {
    let line = q.wait_until("the hypervisor's heap line", STEP_TIMEOUT, |l| {
        hv_text(l).is_some_and(|t| t.starts_with("heap: "))
    })?;
    println!("hypervisor: {}", line.text);
    let text = hv_text(&line.text).expect("matched");
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable heap line {text:?}")))
}

/// How long vm0's init idles after its first and last driver cycle (`hvcyclewait=`).
const LEAK_IDLE: Duration = Duration::from_secs(15);
/// `stats raw` dumps [`settled_figures`] may ask for before it gives up on a steady heap.
const HEAP_READS: usize = 6;

/// vm0's virtio-iommu figures and the hypervisor's heap in use, read while vm0 idles after
/// cycle `cycle` (whose `iommu-cycle-idle` line arrived at `idle_at`): the dump is repeated until
/// two in a row agree, because a trap in flight on another CPU holds its transient allocations
/// for a moment (CI once read 128 bytes more this way); and it must all fall inside the idle
/// window, or vm0's next cycle could be in the figures.
fn settled_figures(
    q: &mut Qemu,
    cycle: u32,
    idle_at: Duration,
) -> Result<(BTreeMap<String, u64>, u64), Error> {
    let mut last: Option<(BTreeMap<String, u64>, u64)> = None;
    for _ in 0..HEAP_READS {
        let stats = viommu_stats(q, "vm0")?;
        let heap = heap_in_use(q)?;
        let since = q.elapsed().saturating_sub(idle_at);
        assert!(
            since < LEAK_IDLE - Duration::from_secs(1),
            "the hypervisor's figures after cycle {cycle} were read {since:?} into vm0's \
             {LEAK_IDLE:?} idle window: too late to be sure vm0 was idle"
        );
        if let Some((prev_stats, prev_heap)) = &last {
            if *prev_heap == heap && *prev_stats == stats {
                return Ok((stats, heap));
            }
        }
        last = Some((stats, heap));
        thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "the hypervisor's heap never read the same twice in a row while vm0 idled after cycle \
         {cycle} ({HEAP_READS} reads, last {last:?})"
    );
}

/// vm0 on its virtio-iommu unloads and reloads `virtio_iommu` 100 times (its endpoints removed
/// and rescanned each time: 100 device resets, ~200 domains made and freed): its device's
/// figures (domains, mappings, table pages) and the hypervisor's heap after the last cycle are
/// exactly what they were after the first, with the guest idle in the same state each time
/// (`hvcyclewait=`). vm1 boots on its vSMMU (checked like any boot) and then sits idle, so the
/// first figures wait for its boot checks to end and nothing else moves the heap.
#[test]
fn virtio_iommu_driver_cycles_leak_nothing() -> Result<(), Error> {
    let vm0_args = format!(
        "console=ttyAMA0 rdinit=/init hvip={}/24 hvcycle={LEAK_CYCLES} hvcyclewait={} hvtest=poweroff",
        VM0.ip,
        LEAK_IDLE.as_secs()
    );
    let vm1_args = "console=ttyAMA0 rdinit=/init";
    let mut q = spawn_two(
        "virtio_iommu_driver_cycles_leak_nothing",
        &vm0_args,
        vm1_args,
        &[&VM0],
        LEAK_RUN_TIMEOUT,
    )?;
    check_boot(&mut q, &VM0, 0, Iommu::Virtio)?;
    check_boot(&mut q, &VM1, 0, Iommu::Smmuv3)?;
    let mut figures = Vec::new();
    for i in [1, LEAK_CYCLES] {
        let idle = q.wait_vm_until(
            "vm0",
            "\"guest: iommu-cycle-idle=...\"",
            LEAK_RUN_TIMEOUT,
            |l| l.contains(&format!("guest: iommu-cycle-idle={i}")),
        )?;
        figures.push(settled_figures(&mut q, i, idle.at)?);
    }
    let (first, last) = (&figures[0], &figures[1]);
    for key in ["domains", "mappings", "table_pages"] {
        assert_eq!(
            first.0[key], last.0[key],
            "vm0's virtio-iommu {key} after 1 and after {LEAK_CYCLES} driver cycles"
        );
    }
    assert_eq!(
        first.1, last.1,
        "the hypervisor's heap in use after 1 and after {LEAK_CYCLES} driver cycles of vm0"
    );
    assert!(
        last.0["resets"] >= u64::from(LEAK_CYCLES),
        "vm0's virtio-iommu was reset by each rmmod: {:?}",
        last.0
    );
    for key in ["errors", "queue_errors", "phys_errors"] {
        assert_eq!(
            last.0[key], 0,
            "vm0's virtio-iommu counter {key}: {:?}",
            last.0
        );
    }
    eprintln!(
        "vm0's virtio-iommu after 1 and {LEAK_CYCLES} cycles: domains {} / {}, mappings {} / {}, \
         table pages {} / {}; hypervisor heap {} / {} bytes",
        first.0["domains"],
        last.0["domains"],
        first.0["mappings"],
        last.0["mappings"],
        first.0["table_pages"],
        last.0["table_pages"],
        first.1,
        last.1
    );
    expect_fact(
        &mut q,
        "vm0",
        "iommu-cycles",
        &format!("{LEAK_CYCLES}/{LEAK_CYCLES}"),
        "its driver cycles that went through",
    )?;
    q.wait_vm_for("vm0", "guest: powering off", STEP_TIMEOUT)?;
    power_off_last(&mut q, "vm1")
}

/// vm1, the worker beside a hostile vm0: its load stopped, it did rounds and ended clean, its
/// vSMMU saw no event, fault or refused command, its STEs are its own nested ones. Returns its
/// last load report and its rate between `from` and `to` (the attacks).
fn check_worker_clean(
    q: &mut Qemu,
    from: Duration,
    to: Duration,
) -> Result<(LoadReport, Option<Rate>), Error> {
    let last = stop_load(q, "vm1")?;
    assert!(
        last.get("rounds") > 0,
        "vm1's load did no round: {:?}",
        last.text
    );
    let mut reports = load_reports(&q.lines(), "vm1");
    reports.push(last.clone());
    let rate = rounds_rate(&reports, from, to);
    let stats = vsmmu_stats(q, "vm1")?;
    for key in ["guest_events", "s2_faults", "command_errors"] {
        assert_eq!(stats.get(key), Some(&0), "vm1's vSMMU counter {key}");
    }
    check_nested(q, &VM1)?;
    Ok((last, rate))
}

/// Whether the hypervisor logged a line whose text (without its level tag) starts with `want`.
fn hv_logged(lines: &[Line], want: &str) -> bool {
    lines
        .iter()
        .any(|l| hv_text(&l.text).is_some_and(|t| t.starts_with(want)))
}

/// The counters of the last `[hv] vsmmu: VM stats:` line of `vm` in `lines`.
fn last_stats(lines: &[Line], vm: &str) -> BTreeMap<String, u64> {
    let prefix = format!("vsmmu: {vm} stats: ");
    let line = lines
        .iter()
        .rev()
        .find(|l| hv_text(&l.text).is_some_and(|t| t.starts_with(&prefix)))
        .unwrap_or_else(|| panic!("no stats line of {vm}"));
    parse_stats(&line.text)
}

/// vm0, with its driver unloaded, attacks its own vSMMU with busybox `devmem` (tests/guest/init,
/// `hvhostile=`) and gets the architected answers: the queue stops with CERROR_ILL on
/// TLBI_EL2_ALL, TLBI_S2_IPA and TLBI_S12_VMALL and with CERROR_ABT on a queue outside its RAM,
/// a flood of 25600 CFGI_ALL is consumed, its DMA through a reserved STE and an invalid CD gives
/// C_BAD_STE and C_BAD_CD in its own event queue. The physical STEs show the containment: its
/// bypass STE is stage 2 only, its reserved one invalid, and vm1's StreamID 24, which vm0 wrote
/// as bypass and invalidated, is still vm1's nested STE. vm1's load meanwhile ends clean, its
/// vSMMU saw no event, fault or refused command, and the hypervisor logged nothing against it.
#[test]
fn hostile_guest_is_contained() -> Result<(), Error> {
    let vm0_args =
        format!("console=ttyAMA0 rdinit=/init mem=896M hvhostile={HOSTILE_BASE} hvtest=poweroff");
    let vm1_args = format!(
        "console=ttyAMA0 rdinit=/init hvip={}/24 hvload={LOAD_SECONDS}",
        VM1.ip
    );
    let mut q = spawn_two(
        "hostile_guest_is_contained",
        &vm0_args,
        &vm1_args,
        &[],
        HOSTILE_RUN_TIMEOUT,
    )?;

    check_vm_guest_facts(&mut q, "vm0", &modular_guest_dir(), VM_CPUS)?;
    check_boot(&mut q, &VM1, 0, Iommu::Smmuv3)?;
    let why = "its arm_smmu_v3 unloaded for the attacks";
    expect_fact(&mut q, "vm0", "hostile-driver-loaded", "0", why)?;
    let attacks_from = q.elapsed();

    // a) Bypass STE for its disk, reserved Config for its NIC, bypass for vm1's StreamID 24.
    expect_fact(
        &mut q,
        "vm0",
        "hostile-a",
        "cons=0x00000005 gerror=0 msi=0x00005A5A",
        "its 5 commands consumed, no GERROR, the CMD_SYNC's MSI written",
    )?;
    q.wait_vm_for("vm0", "guest: hostile-a-done", STEP_TIMEOUT)?;
    let stats = vsmmu_stats(&mut q, "vm0")?;
    println!("vm0's vSMMU after its STEs: {stats:?}");
    let stes = ste_lines(&mut q, &[8, 16, 24, 32])?;
    for ste in stes.values() {
        println!("hypervisor: {ste}");
    }
    let want = [
        (
            8,
            "V=1 S2Translate, VMID 1,",
            "vm0's bypass STE: stage 2 only, never physical bypass",
        ),
        (16, "V=0", "vm0's STE with a reserved Config: invalid"),
        (
            24,
            "V=1 Nested, VMID 2,",
            "vm1's, untouched by vm0's STE 24 and its CFGIs",
        ),
        (32, "V=1 Nested, VMID 2,", "vm1's"),
    ];
    for (sid, expect, why) in want {
        assert!(
            stes[&sid].contains(expect),
            "StreamID {sid}'s physical STE: {why} ({expect:?}): {:?}",
            stes[&sid]
        );
    }
    focus(&mut q, "vm0")?;
    q.send("\n")?;

    // b) Illegal commands: CERROR_ILL (1) at CONS index 5, 6, 7, GERROR.CMDQ_ERR active.
    for (key, want) in [
        ("hostile-tlbi-el2-all", "1,5,1"),
        ("hostile-tlbi-s2-ipa", "1,6,1"),
        ("hostile-tlbi-s12-vmall", "1,7,1"),
    ] {
        expect_fact(
            &mut q,
            "vm0",
            key,
            want,
            "CERROR_ILL, the queue stopped at it, GERROR.CMDQ_ERR",
        )?;
    }
    expect_fact(
        &mut q,
        "vm0",
        "hostile-b",
        "cons=0x00000008 gerror=0",
        "the queue going on after each recovery",
    )?;
    // c) The flood.
    let flood = q.wait_vm_fact("vm0", "hostile-c", STEP_TIMEOUT)?;
    let flood_ms = flood
        .strip_prefix("cons=0x00000008 prod=0x00000008 gerror=0 ms=")
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or_else(|| {
            panic!("vm0's flood: every command consumed, no GERROR, and its time: {flood:?}")
        });
    eprintln!("vm0's flood of {FLOOD_COMMANDS} CFGI_ALL: {flood_ms} ms");
    // d) A command queue outside its RAM: CERROR_ABT (2) at index 0.
    expect_fact(
        &mut q,
        "vm0",
        "hostile-d",
        "2,0,1",
        "CERROR_ABT for a queue outside its RAM",
    )?;
    // e) Its NIC's DMA through the reserved STE, then through an invalid CD.
    expect_fact(
        &mut q,
        "vm0",
        "hostile-e-bad-ste",
        "0x04,16",
        "C_BAD_STE of its NIC in its own event queue",
    )?;
    expect_fact(
        &mut q,
        "vm0",
        "hostile-e-cfgi",
        "cons=0x00000002 gerror=0",
        "its CFGI_STE + CMD_SYNC consumed",
    )?;
    expect_fact(
        &mut q,
        "vm0",
        "hostile-e-bad-cd",
        "0x0a,16",
        "C_BAD_CD of its NIC in its own event queue",
    )?;
    q.wait_vm_for("vm0", "guest: hostile-done", STEP_TIMEOUT)?;
    let attacks_to = q.elapsed();
    q.wait_vm_for("vm0", "guest: powering off", STEP_TIMEOUT)?;
    q.wait_for("[hv] vm0: stopped", STEP_TIMEOUT)?;

    let (last, rate) = check_worker_clean(&mut q, attacks_from, attacks_to)?;
    let lines = q.lines();
    let vm0 = last_stats(&lines, "vm0");
    assert_eq!(
        vm0.get("command_errors"),
        Some(&HOSTILE_COMMAND_ERRORS),
        "vm0's refused commands: 3 illegal, 1 queue outside its RAM"
    );
    assert!(
        vm0["commands"] >= FLOOD_COMMANDS,
        "vm0's vSMMU consumed {} commands, fewer than its flood's {FLOOD_COMMANDS}",
        vm0["commands"]
    );
    check_no_complaint_about(&lines, &VM1);
    eprintln!(
        "vm1's load during vm0's attacks: {}; final: {}",
        rate.map_or("no report".to_string(), |(r, n, s)| format!(
            "{r:.2} rounds/s ({n:.0} rounds in {s:.1} s)"
        )),
        last.text
    );
    power_off_last(&mut q, "vm1")?;

    // What the hypervisor logged of each attack.
    let missing: Vec<&str> = [
        "vsmmu: vm0: StreamID 16: guest configuration is invalid (C_BAD_STE)",
        "vsmmu: vm0: command at CMDQ index 5 refused (Illegal)",
        "vsmmu: vm0: command at CMDQ index 6 refused (Illegal)",
        "vsmmu: vm0: command at CMDQ index 7 refused (Illegal)",
        "vsmmu: vm0: command at CMDQ index 0 refused (Abort)",
        "vsmmu: vm0: event C_BAD_STE StreamID 16 forwarded to the guest",
        "vsmmu: vm0: event C_BAD_CD StreamID 16 forwarded to the guest",
    ]
    .into_iter()
    .filter(|want| !hv_logged(&lines, want))
    .collect();
    assert!(
        missing.is_empty(),
        "the hypervisor did not log these of vm0's attacks: {missing:?}"
    );

    Ok(())
}

/// What vm0's hostile virtio-iommu guest must read back (tests/guest/viommu_attack.c's facts, in
/// order) and why: the spec's statuses for each request a driver would never make, and
/// DEVICE_NEEDS_RESET (Status 0x4f) for each broken ring, each undone by a reset.
const VIOMMU_ATTACKS: [(&str, &str, &str); 18] = [
    (
        "vi-id",
        "magic=0x74726976 version=2 device=23",
        "virtio-mmio v2, device ID 23",
    ),
    (
        "vi-init",
        "status=0xf page-mask=0x40201000 input=0x0-0x7fffffffff domains=0-63 probe=64",
        "DRIVER_OK with every feature, the config space of its VM's virtio-iommu",
    ),
    ("vi-attach-own", "0", "S_OK for its own disk"),
    (
        "vi-attach-foreign",
        "6,6",
        "S_NOENT for vm1's endpoint and for one nobody has",
    ),
    ("vi-attach-bad-flags", "4", "S_INVAL for a reserved flag"),
    (
        "vi-map-huge",
        "8,0",
        "S_NOMEM for 1 GiB of 4 KiB pages, then S_OK for a 2 MiB block: the pool given back",
    ),
    (
        "vi-map-beyond",
        "5,5",
        "S_RANGE for an output beyond the IPA space and an input beyond the input range",
    ),
    (
        "vi-map-outside-ram",
        "0",
        "S_OK for an output outside its RAM: stage 2's to refuse",
    ),
    (
        "vi-map-doorbell",
        "4",
        "S_INVAL for a MAP over the MSI doorbell PROBE reserves",
    ),
    (
        "vi-unmap-split",
        "0,5,0",
        "S_RANGE for an UNMAP that would split a mapping, S_OK for the whole",
    ),
    (
        "vi-unknown",
        "used=0 tail=0xee",
        "nothing written for an unknown type, used length 0",
    ),
    (
        "vi-malformed",
        "4,4,used=0",
        "S_INVAL for a short MAP and an unknown MAP flag, nothing for a 2-byte writable part",
    ),
    ("vi-nic-attach", "0", "its NIC in a domain of its own"),
    ("vi-nic-move", "0", "its NIC moved to domain 1"),
    (
        "vi-s2-fault",
        "records=0",
        "no fault record for a stage-2 fault: the hypervisor's",
    ),
    (
        "vi-bad-buffer",
        "status=0x4f",
        "DEVICE_NEEDS_RESET for a buffer outside its RAM",
    ),
    (
        "vi-reset",
        "status=0xf attach=0",
        "a reset and a new negotiation bring the device back",
    ),
    (
        "vi-final",
        "status=0xf attach=0",
        "the device back after the loop, the huge length and the avail overrun",
    ),
];

/// The requests of the hostile virtio-iommu guest's flood (313 notifies of 32 each).
const VIOMMU_FLOOD_REQUESTS: u64 = 10016;

/// vm0, on a virtio-iommu with its driver unloaded, attacks the device by hand
/// (tests/guest/viommu_attack.c, init's `hvviommu=`) while vm1, on its vSMMU, runs its DMA load:
/// ATTACH of vm1's endpoint, MAPs beyond its IPA space, a MAP of more tables than its pool has,
/// a MAP over its MSI doorbell,
/// an UNMAP that would split, unknown and short requests, a flood of 10016 requests and 10000
/// empty notifies, its NIC's DMA through an empty domain (a fault record in its event queue) and
/// through a mapping outside its RAM (a stage-2 fault only the hypervisor sees), and four
/// broken rings. Each gets the spec's answer; vm1's load ends clean, its vSMMU saw nothing, its
/// STEs are its own, and the hypervisor logged nothing against it.
#[test]
fn hostile_virtio_iommu_guest_is_contained() -> Result<(), Error> {
    let vm0_args = format!(
        "console=ttyAMA0 rdinit=/init mem=896M hvviommu={HOSTILE_BASE},{},{},{} hvtest=poweroff",
        VM0.disk.1, VM0.nic.1, VM1.disk.1
    );
    let vm1_args = format!(
        "console=ttyAMA0 rdinit=/init hvip={}/24 hvload={LOAD_SECONDS}",
        VM1.ip
    );
    let mut q = spawn_two(
        "hostile_virtio_iommu_guest_is_contained",
        &vm0_args,
        &vm1_args,
        &[&VM0],
        HOSTILE_RUN_TIMEOUT,
    )?;
    check_vm_guest_facts(&mut q, "vm0", &modular_guest_dir(), VM_CPUS)?;
    check_boot(&mut q, &VM1, 0, Iommu::Smmuv3)?;
    expect_fact(
        &mut q,
        "vm0",
        "vi-driver-loaded",
        "0",
        "its virtio_iommu unloaded for the attacks",
    )?;
    let attacks_from = q.elapsed();
    let mut facts = BTreeMap::new();
    for key in [
        "vi-id",
        "vi-init",
        "vi-attach-own",
        "vi-attach-foreign",
        "vi-attach-bad-flags",
        "vi-map-huge",
        "vi-map-beyond",
        "vi-map-outside-ram",
        "vi-map-doorbell",
        "vi-unmap-split",
        "vi-unknown",
        "vi-malformed",
        "vi-flood",
        "vi-nic-attach",
        "vi-s1-fault",
        "vi-nic-move",
        "vi-s2-fault",
        "vi-bad-buffer",
        "vi-reset",
        "vi-loop",
        "vi-huge-len",
        "vi-avail-overrun",
        "vi-final",
    ] {
        let v = q.wait_vm_fact("vm0", key, STEP_TIMEOUT)?;
        println!("vm0: {key}={v}");
        facts.insert(key, v);
    }
    expect_fact(&mut q, "vm0", "vi-exit", "0", "hvviommu ran to its end")?;
    let attacks_to = q.elapsed();
    let wrong: Vec<String> = VIOMMU_ATTACKS
        .iter()
        .filter(|(key, want, _)| facts[key] != *want)
        .map(|(key, want, why)| format!("{key}: {why}: want {want:?}, read {:?}", facts[key]))
        .collect();
    assert!(
        wrong.is_empty(),
        "vm0's attacks answered wrongly: {wrong:#?}"
    );
    for key in ["vi-loop", "vi-huge-len", "vi-avail-overrun"] {
        assert_eq!(
            facts[key], "status=0x4f",
            "{key}: DEVICE_NEEDS_RESET for a broken ring"
        );
    }
    let flood = fields(&facts["vi-flood"]);
    assert_eq!(
        (flood["requests"], flood["errors"], flood["status"]),
        (VIOMMU_FLOOD_REQUESTS.to_string().as_str(), "0", "0xf"),
        "vm0's flood: every MAP and UNMAP done with S_OK, the device still DRIVER_OK: {:?}",
        facts["vi-flood"]
    );
    // The stage-1 fault of its NIC's DMA through the empty domain, as a fault record: MAPPING,
    // a read with its address (F_READ | F_ADDRESS, bit 8), the NIC's endpoint, an address in
    // its rings (at 0x30000000).
    let s1 = &facts["vi-s1-fault"];
    let (records, first) = s1
        .split_once(" first=")
        .unwrap_or_else(|| panic!("vi-s1-fault unreadable: {s1:?}"));
    let rec = fields(first);
    assert!(
        records != "records=0"
            && rec.get("reason") == Some(&"2")
            && rec.get("flags") == Some(&"0x101")
            && rec.get("ep") == Some(&VM0.nic.1.to_string().as_str())
            && rec.get("len") == Some(&"24"),
        "its NIC's stage-1 fault as a MAPPING fault record (READ | ADDRESS, endpoint {}): {s1:?}",
        VM0.nic.1
    );
    let addr = rec["addr"]
        .strip_prefix("0x")
        .and_then(|a| u64::from_str_radix(a, 16).ok());
    assert!(
        addr.is_some_and(|a| (0x3000_0000..0x3000_3000).contains(&a)),
        "the fault record's address lies in the NIC's rings at IOVA 0x30000000: {s1:?}"
    );
    q.wait_vm_for("vm0", "guest: powering off", STEP_TIMEOUT)?;
    q.wait_for("[hv] vm0: stopped", STEP_TIMEOUT)?;
    let stats = viommu_stats(&mut q, "vm0")?;
    println!("vm0's virtio-iommu after its attacks: {stats:?}");
    assert_eq!(
        (stats["queue_errors"], stats["phys_errors"]),
        (4, 0),
        "vm0's virtio-iommu: 4 broken rings, no physical error: {stats:?}"
    );
    assert!(
        stats["requests"] >= VIOMMU_FLOOD_REQUESTS && stats["notifies"] >= 10000,
        "vm0's virtio-iommu counted its flood: {stats:?}"
    );

    let (last, rate) = check_worker_clean(&mut q, attacks_from, attacks_to)?;
    let lines = q.lines();
    check_no_complaint_about(&lines, &VM1);
    eprintln!(
        "vm0's flood: {}; vm1's load during vm0's attacks: {}; final: {}",
        facts["vi-flood"],
        rate.map_or("no report".to_string(), |(r, n, s)| format!(
            "{r:.2} rounds/s ({n:.0} rounds in {s:.1} s)"
        )),
        last.text
    );
    power_off_last(&mut q, "vm1")?;

    // The hypervisor's side: the stage-1 fault forwarded, the stage-2 fault its own.
    let nic = VM0.nic.1;
    assert!(
        hv_logged(
            &lines,
            &format!("viommu: vm0: event F_TRANSLATION StreamID {nic} forwarded to the guest")
        ),
        "the hypervisor logged no forwarded stage-1 fault of vm0's NIC"
    );
    assert!(
        lines.iter().any(|l| hv_text(&l.text).is_some_and(|t| {
            t.starts_with("smmu: event #")
                && t.contains(&format!("StreamID {nic} (vm0) stage-2"))
                && t.contains("IPA 0x20000")
        })),
        "the hypervisor logged no stage-2 fault of vm0's NIC at its mapping outside its RAM"
    );
    Ok(())
}

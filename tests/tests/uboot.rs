//! The board boot path, U-Boot's `booti`, as docs/vm-config.md ("A real board with U-Boot")
//! gives it to a board user: QEMU `virt` at EL2 with Debian's U-Boot as its firmware and a
//! virtio disk holding the hypervisor, the guest images and the board's DT
//! (`qemu/board-virt.sh --uboot`, `qemu/uboot-disk.sh`). The commands typed at U-Boot's prompt
//! are the doc's own block, read from the doc between its markers: the doc and the test cannot
//! drift apart.
//!
//! Both VMs must come up whole (the stock guest's facts, each its own name), answer at their
//! shells and power off, and with them the machine. The same two VMs are also booted the usual
//! way (`-kernel`, the board script generating the VMs), and the time from QEMU's start to each
//! guest's init is printed for both paths (not asserted: TCG on a shared host).

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use integration_tests::{
    check_answer, check_uboot_commands, check_vm_guest_facts, doc_uboot_commands, focus, hv_text,
    repo_root, stock_guest_dir, stop_autoboot, type_uboot_commands, uboot_literal_vars,
    uboot_words, Line, Qemu, Stream, BOOT_TIMEOUT, STEP_TIMEOUT, UBOOT_DOC,
};

/// vCPUs of each VM, in the doc's block and in the board script's generated VMs.
const VM_CPUS: usize = 2;
/// The VMs the doc's block describes.
const VMS: [&str; 2] = ["vm0", "vm1"];
/// Wall-clock limit of each QEMU run (measured: about 20 s to both shells through U-Boot).
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// U-Boot's `fdt_high` that keeps the DT in place.
const FDT_HIGH_IN_PLACE: &str = "0xffffffffffffffff";

/// The files `qemu/uboot-disk.sh` puts on the disk (its `NAMES=(...)` line).
fn disk_file_names() -> Vec<String> {
    let script = repo_root().join("qemu/uboot-disk.sh");
    let text = fs::read_to_string(&script).expect("qemu/uboot-disk.sh is readable");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("NAMES=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("qemu/uboot-disk.sh has a NAMES=(...) line");
    line.split_whitespace().map(str::to_string).collect()
}

/// The doc's block fits U-Boot (line length, words per command, `booti` last), loads every file
/// the disk script puts on the disk and nothing else, and describes the VMs the QEMU test
/// expects. No QEMU: this catches a bad edit of the doc in a second.
#[test]
fn doc_commands_fit_uboot_and_the_disk() {
    let commands = doc_uboot_commands();
    check_uboot_commands(&commands).unwrap_or_else(|e| panic!("{UBOOT_DOC}: {e}"));
    let mut loaded: Vec<String> = commands
        .iter()
        .map(|c| uboot_words(c))
        .filter(|w| w.first().is_some_and(|w| w == "load"))
        .map(|w| w.last().cloned().unwrap_or_default())
        .collect();
    loaded.sort();
    let mut on_disk = disk_file_names();
    on_disk.sort();
    assert_eq!(
        loaded, on_disk,
        "the files {UBOOT_DOC}'s commands load and those qemu/uboot-disk.sh puts on the disk"
    );
    for vm in VMS {
        assert!(
            commands
                .iter()
                .any(|c| uboot_words(c) == ["fdt", "mknode", "/chosen", vm]),
            "{UBOOT_DOC}'s commands make no /chosen/{vm}"
        );
    }
}

/// The moment the board script handed over to QEMU: its last line, which shows the QEMU command
/// line, just before `exec` (the runner's clock also counts the script's DT dump and disk).
fn qemu_exec_at(lines: &[Line]) -> Duration {
    lines
        .iter()
        .find(|l| {
            l.stream == Stream::Stderr
                && l.text.starts_with("[board-virt] ")
                && l.text.contains(": qemu-system-aarch64 ")
        })
        .map(|l| l.at)
        .expect("qemu/board-virt.sh shows the QEMU command line before it execs QEMU")
}

/// Both VMs' facts (each among its own lines) and their shells; returns their inits' times.
fn both_vms_up(q: &mut Qemu) -> Result<Vec<Duration>, integration_tests::Error> {
    let guest = stock_guest_dir();
    let mut inits = Vec::new();
    for vm in VMS {
        let report = check_vm_guest_facts(q, vm, &guest, VM_CPUS)?;
        assert_eq!(
            q.wait_vm_fact(vm, "boot-count", STEP_TIMEOUT)?,
            "0",
            "{vm}'s /chosen/hypervisor,boot-count"
        );
        q.wait_vm_for(vm, "guest: shell", STEP_TIMEOUT)?;
        inits.push(report.init_started_at);
    }
    Ok(inits)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// U-Boot boots the hypervisor with two VMs from the doc's commands, typed at its prompt.
/// Then, for comparison, the same VMs through `-kernel`.
#[test]
fn uboot_booti_from_the_doc_boots_two_vms() -> Result<(), integration_tests::Error> {
    let commands = doc_uboot_commands();
    check_uboot_commands(&commands).unwrap_or_else(|e| panic!("{UBOOT_DOC}: {e}"));
    let root = repo_root();
    let guest = stock_guest_dir();
    let size = |p: std::path::PathBuf| {
        fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .len()
    };
    let sizes: BTreeMap<String, u64> = [
        ("hypervisor.bin", size(root.join("build/hypervisor.bin"))),
        ("Image", size(guest.join("Image"))),
        ("initramfs.cpio.gz", size(guest.join("initramfs.cpio.gz"))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let vars = uboot_literal_vars(&commands);

    // 1. Through U-Boot.
    let mut q = Qemu::spawn_with_limit("uboot_booti", &["--uboot"], RUN_LIMIT)?;
    let (banner_at, prompt_at) = stop_autoboot(&mut q, BOOT_TIMEOUT)?;
    let typed = type_uboot_commands(&mut q, &commands, &sizes)?;
    let hv = q.wait_until("the hypervisor's banner at EL2", BOOT_TIMEOUT, |l| {
        hv_text(l).is_some_and(|t| t.starts_with("smmu-hv ") && t.contains(" at EL2: "))
    })?;
    println!("hypervisor: {}", hv.text);
    // With fdt_high all-ones U-Boot leaves the DT where the commands built it: the hypervisor
    // must find it there (the doc says so).
    if vars.get("fdt_high").map(String::as_str) == Some(FDT_HIGH_IN_PLACE) {
        let fdt = vars
            .get("fdt_addr_r")
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .expect("the commands set fdt_addr_r to a hex address");
        assert!(
            hv.text.contains(&format!("DTB at {fdt:#x},")),
            "the hypervisor must boot with the DT at fdt_addr_r ({fdt:#x}): {}",
            hv.text
        );
    }
    q.wait_for("[hv] boot done", STEP_TIMEOUT)?;
    // The hypervisor takes the VMs in DT order, and Ctrl-\ d counts in it: vm0 must come first
    // (`fdt mknode` puts a node before its siblings; the doc's block allows for that).
    let first_vm = q
        .lines()
        .iter()
        .find_map(|l| {
            let t = hv_text(&l.text)?;
            VMS.iter().find(|vm| t.starts_with(&format!("{vm}: ")))
        })
        .copied();
    assert_eq!(
        first_vm,
        Some("vm0"),
        "the first VM the hypervisor reports, i.e. the first in the DT the commands built"
    );
    let uboot_inits = both_vms_up(&mut q)?;
    for vm in VMS.iter().rev() {
        focus(&mut q, vm)?;
        check_answer(&mut q, vm)?;
        q.send("poweroff -f\n")?;
        q.wait_for(&format!("[hv] {vm}: stopped"), STEP_TIMEOUT)?;
    }
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(
        status.success(),
        "QEMU exited with {status} after both VMs powered off"
    );
    let uboot_exec = qemu_exec_at(&q.lines());
    let uboot_total = q.elapsed();
    drop(q);

    // 2. The same two VMs the usual way: -kernel, the VMs in the DT the board script makes.
    let mut q = Qemu::spawn_with_limit("uboot_compare_kernel", &["--vms", "2"], RUN_LIMIT)?;
    let kernel_inits = both_vms_up(&mut q)?;
    let kernel_exec = qemu_exec_at(&q.lines());
    let kernel_total = q.elapsed();
    drop(q);

    println!(
        "u-boot path: QEMU exec at {:.2} s after the runner's start; from QEMU's exec: U-Boot \
         banner {:.2} s, prompt {:.2} s, {} commands typed by booti's echo at {:.2} s, hypervisor \
         at EL2 {:.2} s, vm0 init {:.2} s, vm1 init {:.2} s; run {:.1} s in all",
        secs(uboot_exec),
        secs(banner_at - uboot_exec),
        secs(prompt_at - uboot_exec),
        typed.typed,
        secs(typed.booti_at - uboot_exec),
        secs(hv.at - uboot_exec),
        secs(uboot_inits[0] - uboot_exec),
        secs(uboot_inits[1] - uboot_exec),
        secs(uboot_total)
    );
    println!(
        "-kernel path: QEMU exec at {:.2} s after the runner's start; from QEMU's exec: vm0 init \
         {:.2} s, vm1 init {:.2} s; run {:.1} s (stopped after both shells)",
        secs(kernel_exec),
        secs(kernel_inits[0] - kernel_exec),
        secs(kernel_inits[1] - kernel_exec),
        secs(kernel_total)
    );
    Ok(())
}

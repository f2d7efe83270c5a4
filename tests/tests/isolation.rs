//! Isolation for devices as a user plugs them, with their default options: two stock e1000e NICs
//! (32-byte I/O BARs that QEMU packs into one page of the I/O window) assigned to two VMs, and a
//! plain `virtio-blk-pci` (transitional: a legacy I/O BAR in that page too, no `iommu_platform`)
//! that a third VM asks for. The VMs are `tests/configs/user-devices.dts`.
//!
//! What a working system shows: the hypervisor refuses vm2, naming the virtio device and the
//! option that would make its DMA go through the SMMU; vm0 and vm1 each see their own NIC only and
//! reach its registers through both BARs (the I/O BAR's accesses trap and are forwarded inside
//! the function's own 32 bytes); vm1, aimed at vm0's registers and at the unassigned virtio
//! device's, gets a bus error for each (reads, and the writes that would reset vm0's NIC through
//! its I/O window); and vm0's NIC keeps working, never reset.

use std::fs;
use std::time::Duration;

use integration_tests::{
    focus, hv_text, repo_root, target_dir, type_paced, vm_text, Error, Line, Qemu, STEP_TIMEOUT,
};

/// Wall-clock limit of the run: two boots, typed commands, pings.
const RUN_LIMIT: Duration = Duration::from_secs(420);
/// The exit status of a shell command killed by SIGBUS (128 + 7): what `devmem` gets when the
/// hypervisor makes its access fault.
const SIGBUS_STATUS: &str = "135";

/// A BAR as the hypervisor's `pci: BB:DD.F [VVVV:DDDD] ... BARn ADDR+SIZE` line reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bar {
    index: u8,
    addr: u64,
    size: u64,
}

/// The BARs of `bdf` from the hypervisor's enumeration lines.
fn bars(lines: &[Line], bdf: &str) -> Vec<Bar> {
    let prefix = format!("pci: {bdf} [");
    let line = lines
        .iter()
        .filter_map(|l| hv_text(&l.text))
        .find(|t| t.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no hypervisor enumeration line for {bdf}"));
    line.split(", BAR")
        .skip(1)
        .map(|b| {
            let (index, rest) = b.split_once(' ').expect("BARn ADDR+SIZE");
            let (addr, size) = rest.split_once('+').expect("ADDR+SIZE");
            let hex = |s: &str| {
                let s = s
                    .split(|c: char| !c.is_ascii_hexdigit() && c != 'x')
                    .next()
                    .unwrap();
                u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("a hex number")
            };
            Bar {
                index: index.parse().expect("a BAR index"),
                addr: hex(addr),
                size: hex(size),
            }
        })
        .collect()
}

fn bar(bars: &[Bar], index: u8) -> Bar {
    *bars
        .iter()
        .find(|b| b.index == index)
        .unwrap_or_else(|| panic!("no BAR {index} in {bars:?}"))
}

/// A guest's `guest: e1000e-bars=MEM,IO` fact, as numbers.
fn e1000e_bars(value: &str) -> (u64, u64) {
    let (mem, io) = value
        .split_once(',')
        .unwrap_or_else(|| panic!("e1000e-bars={value}: the guest found no e1000e BARs"));
    let num = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    (num(mem), num(io))
}

/// Checks a guest's `guest: e1000e-status=io:STATUS,carrier:C,speed:S,duplex:D`: the STATUS
/// register read through the I/O BAR (forwarded by the hypervisor) must say what the driver,
/// which reads it through the memory BAR, reports (82574 datasheet 10.2.2.2: FD bit 0, LU bit 1,
/// SPEED bits 7:6).
fn check_status(vm: &str, fact: &str) {
    let field = |name: &str| {
        fact.split(',')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("{vm}: e1000e-status={fact}: no {name}"))
    };
    let status = u32::from_str_radix(field("io").trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{vm}: e1000e-status={fact}: STATUS unreadable"));
    assert_ne!(
        status,
        u32::MAX,
        "{vm}: STATUS through the I/O BAR read as absent"
    );
    let speed = match (status >> 6) & 3 {
        0 => "10",
        1 => "100",
        _ => "1000",
    };
    let duplex = if status & 1 != 0 { "full" } else { "half" };
    assert_eq!(
        (field("carrier"), field("speed"), field("duplex")),
        (if status & 2 != 0 { "1" } else { "0" }, speed, duplex),
        "{vm}: STATUS {status:#x} through the I/O BAR disagrees with the link its driver reports"
    );
}

/// What a typed command line echoes instead of `guest: `, so that the shell's echo of the
/// command is not taken for the fact the command prints.
const FACT: &str = "gu\"\"est:";

/// Types `cmd` into `vm`'s shell followed by `; echo guest: KEY=$?` and returns the status.
fn status_of(q: &mut Qemu, vm: &str, key: &str, cmd: &str) -> Result<String, Error> {
    type_paced(q, &format!("{cmd}; echo {FACT} {key}=$?\n"))?;
    q.wait_vm_fact(vm, key, STEP_TIMEOUT)
}

#[test]
fn user_plugged_devices_stay_private() -> Result<(), Error> {
    let disk = target_dir().join("tmp/plain-virtio.img");
    fs::create_dir_all(disk.parent().unwrap()).unwrap();
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = repo_root().join("tests/configs/user-devices.dts");
    let drive = format!("if=none,id=plain,format=raw,file={}", disk.display());
    let mut q = Qemu::spawn_with_limit(
        "user_plugged_devices_stay_private",
        &[
            "--vm-dts",
            config.to_str().unwrap(),
            "--",
            "-netdev",
            "hubport,id=n0,hubid=1",
            "-device",
            "e1000e,netdev=n0,bus=pcie.0,addr=1.0",
            "-netdev",
            "hubport,id=n1,hubid=1",
            "-device",
            "e1000e,netdev=n1,bus=pcie.0,addr=2.0",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=plain,bus=pcie.0,addr=3.0",
        ],
        RUN_LIMIT,
    )?;

    // vm2 is refused before it starts, for a reason that names the device and the fix.
    let refusal = q.wait_for_all(
        &[
            "config: vm2:",
            "00:03.0",
            "VIRTIO_F_ACCESS_PLATFORM",
            "VM not started",
        ],
        STEP_TIMEOUT,
    )?;
    assert!(
        refusal.contains("iommu_platform=on"),
        "vm2's refusal must say what to add: {refusal}"
    );

    // Both VMs up, each with its own NIC configured; its registers agree through both BARs.
    let mut facts = Vec::new();
    for (vm, ip, bdf) in [
        ("vm0", "10.0.2.10/24", "00:01.0:8086:10d3"),
        ("vm1", "10.0.2.11/24", "00:02.0:8086:10d3"),
    ] {
        let list = q.wait_vm_fact(vm, "pci-list", STEP_TIMEOUT)?;
        assert_eq!(
            list.split(',')
                .filter(|f| !f.starts_with("00:00.0"))
                .collect::<Vec<_>>(),
            [bdf],
            "{vm} sees exactly its own e1000e"
        );
        assert_eq!(q.wait_vm_fact(vm, "eth0-ip", STEP_TIMEOUT)?, ip);
        let (mem, io) = e1000e_bars(&q.wait_vm_fact(vm, "e1000e-bars", STEP_TIMEOUT)?);
        let status = q.wait_vm_fact(vm, "e1000e-status", STEP_TIMEOUT)?;
        check_status(vm, &status);
        q.wait_vm_for(vm, "guest: shell", STEP_TIMEOUT)?;
        facts.push((mem, io));
    }
    let lines = q.lines();
    let (nic0, nic1, plain) = (
        bars(&lines, "00:01.0"),
        bars(&lines, "00:02.0"),
        bars(&lines, "00:03.0"),
    );
    assert_eq!(
        facts,
        [
            (bar(&nic0, 0).addr, bar(&nic0, 2).addr),
            (bar(&nic1, 0).addr, bar(&nic1, 2).addr)
        ],
        "the guests' BARs are where the hypervisor placed them"
    );
    // The hazard is real: the three I/O BARs sit in one 4 KiB page.
    let page = |b: Bar| b.addr & !0xfff;
    assert!(
        page(bar(&nic0, 2)) == page(bar(&nic1, 2)) && page(bar(&nic1, 2)) == page(bar(&plain, 0)),
        "QEMU's I/O BARs no longer share a page: {nic0:?} {nic1:?} {plain:?}"
    );
    // Memory BARs: each in pages of its own.
    let mut pages: Vec<(u64, &str)> = Vec::new();
    for (bdf, bs) in [("00:01.0", &nic0), ("00:02.0", &nic1), ("00:03.0", &plain)] {
        for b in bs
            .iter()
            .filter(|b| b.addr < 0x3eff_0000 || b.addr >= 0x3f00_0000)
        {
            assert_eq!(
                b.addr % 0x1000,
                0,
                "{bdf} BAR{} {:#x} is not page-aligned",
                b.index,
                b.addr
            );
            for p in (b.addr..b.addr + b.size.max(0x1000)).step_by(0x1000) {
                assert!(
                    !pages.iter().any(|&(q, o)| q == p && o != bdf),
                    "page {p:#x} holds BARs of {bdf} and another function"
                );
                pages.push((p, bdf));
            }
        }
    }

    // vm0's NIC works before the attack.
    focus(&mut q, "vm0")?;
    let ping = status_of(
        &mut q,
        "vm0",
        "ping-before",
        "ping -c 2 -W 3 10.0.2.11 >/dev/null",
    )?;
    assert_eq!(ping, "0", "vm0 pings vm1 over their e1000e NICs");

    // vm1 aims at vm0's registers and at the unassigned device's: each access faults.
    focus(&mut q, "vm1")?;
    let (mem0, io0) = facts[0];
    let plain_io = bar(&plain, 0).addr;
    let attacks = [
        ("attack-mmio", format!("devmem {:#x} 32", mem0 + 8)),
        ("attack-io-ioaddr", format!("devmem {io0:#x} 32 0")),
        (
            "attack-io-reset",
            format!("devmem {:#x} 32 0x04000000", io0 + 4),
        ),
        ("attack-io-read", format!("devmem {:#x} 32", io0 + 4)),
        ("attack-unassigned-io", format!("devmem {plain_io:#x} 8")),
        (
            "attack-unassigned-mmio",
            format!("devmem {:#x} 32", bar(&plain, 1).addr),
        ),
    ];
    for (key, cmd) in &attacks {
        let status = status_of(&mut q, "vm1", key, cmd)?;
        assert_eq!(
            status, SIGBUS_STATUS,
            "vm1's `{cmd}` (another function's registers) must fault, not reach them"
        );
    }
    // Its own I/O BAR, in the same page as vm0's, still answers.
    let io1 = facts[1].1;
    let n = "/sys/class/net/eth0";
    type_paced(
        &mut q,
        &format!(
            "devmem {io1:#x} 32 8; echo {FACT} own=io:$(devmem {:#x} 32),carrier:$(cat {n}/carrier),speed:$(cat {n}/speed),duplex:$(cat {n}/duplex)\n",
            io1 + 4
        ),
    )?;
    let own = q.wait_vm_fact("vm1", "own", STEP_TIMEOUT)?;
    check_status("vm1", &own);

    // vm0's NIC was never reached: it still pings, and its driver saw no reset.
    focus(&mut q, "vm0")?;
    let ping = status_of(
        &mut q,
        "vm0",
        "ping-after",
        "ping -c 3 -W 3 10.0.2.11 >/dev/null",
    )?;
    assert_eq!(ping, "0", "vm0 still pings vm1 after vm1's attack");
    type_paced(
        &mut q,
        &format!("echo {FACT} nic-resets=$(dmesg | grep -c 'Reset adapter')\n"),
    )?;
    assert_eq!(
        q.wait_vm_fact("vm0", "nic-resets", STEP_TIMEOUT)?,
        "0",
        "vm0's e1000e driver logged a reset: vm1 reached its NIC"
    );

    // The hypervisor said what vm1 did, and blamed nobody else.
    let lines = q.lines();
    let logged = lines
        .iter()
        .filter_map(|l| hv_text(&l.text))
        .filter(|t| t.starts_with("vm1: ") && t.contains("unmapped IPA"))
        .count();
    assert!(
        logged > 0,
        "no hypervisor line about vm1's faulting accesses"
    );
    assert!(
        !lines
            .iter()
            .filter_map(|l| hv_text(&l.text))
            .any(|t| t.starts_with("vm0: ") && t.contains("unmapped IPA")),
        "vm0 faulted: it only used its own device"
    );
    assert!(
        !lines
            .iter()
            .any(|l| vm_text(&l.text, "vm0")
                .is_some_and(|t| t.contains("Reset adapter unexpectedly"))),
        "vm0's console shows a NIC reset"
    );

    type_paced(&mut q, "poweroff -f\n")?;
    q.wait_for("[hv] vm0: stopped", STEP_TIMEOUT)?;
    focus(&mut q, "vm1")?;
    type_paced(&mut q, "poweroff -f\n")?;
    q.wait_for("[hv] all VMs stopped", STEP_TIMEOUT)?;
    let status = q.wait_exit(STEP_TIMEOUT)?;
    assert!(status.success(), "QEMU exited with {status}");
    Ok(())
}

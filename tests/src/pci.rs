//! The devices the board script's `--pci` gives each VM (a virtio disk and NIC), and the
//! checks of their disk and network facts.

use crate::md5::md5_hex;
use crate::paths::repo_root;
use crate::{Error, Qemu, STEP_TIMEOUT};
use std::collections::BTreeMap;
use std::fs;

/// The part of each `--pci` disk image the host and the guest checksum: its first 8 MiB.
pub const DISK_CONTENT: usize = 8 << 20;
/// The whole `--pci` disk: the content, then 1 MiB of scratch that the guest writes each boot.
pub const DISK_BYTES: usize = DISK_CONTENT + (1 << 20);

/// The MD5 of the first [`DISK_CONTENT`] bytes of VM `vm`'s disk image `build/disks/VM.img` (made
/// by the board script's `--pci`); panics if it is missing or not [`DISK_BYTES`] long.
pub fn host_disk_md5(vm: &str) -> String {
    let path = repo_root().join(format!("build/disks/{vm}.img"));
    let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(data.len(), DISK_BYTES, "the size of {}", path.display());
    md5_hex(&data[..DISK_CONTENT])
}

/// Checks the disk facts of VM `vm`'s next boot, in the order its guest prints them: its
/// `/dev/vda` size ([`DISK_BYTES`]), the MD5 of its first [`DISK_CONTENT`] bytes against the
/// host's of its image ([`host_disk_md5`]), and its scratch MiB written and read back
/// (`disk-rw=ok`). Returns the MD5.
pub fn check_vm_disk(q: &mut Qemu, vm: &str) -> Result<String, Error> {
    assert_eq!(
        q.wait_vm_fact(vm, "disk-bytes", STEP_TIMEOUT)?,
        DISK_BYTES.to_string(),
        "{vm}'s /dev/vda size"
    );
    let md5 = q.wait_vm_fact(vm, "disk-md5", STEP_TIMEOUT)?;
    assert_eq!(
        md5,
        host_disk_md5(vm),
        "{vm}'s MD5 of its disk's first {DISK_CONTENT} bytes against the host's of \
         build/disks/{vm}.img"
    );
    assert_eq!(
        q.wait_vm_fact(vm, "disk-rw", STEP_TIMEOUT)?,
        "ok",
        "{vm} read back (O_DIRECT) the pattern it wrote to its disk's scratch MiB"
    );
    Ok(md5)
}

/// Checks that VM `vm` pinged the other VM over its own NIC and was pinged by it (`hvping=`).
pub fn check_vm_pings(q: &mut Qemu, vm: &str) -> Result<(), Error> {
    assert_eq!(
        q.wait_vm_fact(vm, "ping", STEP_TIMEOUT)?,
        "ok",
        "{vm} pinging the other VM"
    );
    assert_eq!(
        q.wait_vm_fact(vm, "pinged", STEP_TIMEOUT)?,
        "yes",
        "{vm} pinged by the other VM"
    );
    Ok(())
}

/// What the board script's `--pci` gives a VM (its own virtio disk and NIC), and the network
/// address the tests give it.
#[derive(Debug)]
pub struct Assigned {
    /// The VM's name.
    pub vm: &'static str,
    /// The VMID the hypervisor gives the VM (vm0: 1, vm1: 2).
    pub vmid: u32,
    /// virtio-blk-pci (modern: 1af4:1042): its BDF and RequesterID (= StreamID).
    pub disk: (&'static str, u32),
    /// virtio-net-pci (modern: 1af4:1041): its BDF and RequesterID.
    pub nic: (&'static str, u32),
    /// The NIC's MAC address.
    pub mac: &'static str,
    /// The address the tests give its NIC (`hvip=IP/24`).
    pub ip: &'static str,
}

/// vm0's devices with `--pci`.
pub const VM0: Assigned = Assigned {
    vm: "vm0",
    vmid: 1,
    disk: ("00:01.0", 0x08),
    nic: ("00:02.0", 0x10),
    mac: "52:54:00:00:00:10",
    ip: "10.0.2.10",
};
/// vm1's devices with `--pci`.
pub const VM1: Assigned = Assigned {
    vm: "vm1",
    vmid: 2,
    disk: ("00:03.0", 0x18),
    nic: ("00:04.0", 0x20),
    mac: "52:54:00:00:00:11",
    ip: "10.0.2.11",
};

impl Assigned {
    /// The guest's `pci-list` of exactly these functions (BDF:VENDOR:DEVICE, sorted), without
    /// QEMU's host bridge.
    pub fn pci_list(&self) -> String {
        format!("{}:1af4:1042,{}:1af4:1041", self.disk.0, self.nic.0)
    }

    /// The guest's `iommu-groups` of exactly these functions (sorted BDFs).
    pub fn iommu_groups(&self) -> String {
        format!("{},{}", self.disk.0, self.nic.0)
    }

    /// Its StreamIDs, sorted.
    pub fn stream_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.disk.1, self.nic.1];
        ids.sort_unstable();
        ids
    }

    /// Kernel command line with its NIC at its address, pinging `peer` and waiting to be pinged.
    pub fn net_bootargs(&self, peer: &str) -> String {
        format!(
            "console=ttyAMA0 rdinit=/init hvip={}/24 hvping={peer} hvpinged=1",
            self.ip
        )
    }
}

/// Writes `build/disks/NAME.img`: [`DISK_BYTES`] whose first [`DISK_CONTENT`] bytes are a fixed
/// pseudo-random sequence from `seed` (a test's own disk, unlike the `--pci` ones); returns its
/// path and that part's MD5.
pub fn make_disk_image(name: &str, seed: u64) -> (String, String) {
    let path = repo_root().join(format!("build/disks/{name}.img"));
    let mut data = Vec::with_capacity(DISK_BYTES);
    let mut x = seed;
    while data.len() < DISK_BYTES {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(DISK_BYTES);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, &data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        path.to_str().unwrap().to_string(),
        md5_hex(&data[..DISK_CONTENT]),
    )
}

/// VM `vm`'s last `[hv] vits: VM stats: delivery PATH, k=v ...` line in `log`: the delivery path
/// and the counters. Panics if there is none.
pub fn vits_stats(log: &str, vm: &str) -> (String, BTreeMap<String, u64>) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&format!("[hv] vits: {vm} stats: ")))
        .unwrap_or_else(|| panic!("no vITS stats for {vm}"));
    println!("{line}");
    let (_, rest) = line
        .split_once(" stats: delivery ")
        .expect("the stats line's format");
    let (path, counters) = rest.split_once(", ").expect("the stats line's format");
    let counters = counters
        .split_whitespace()
        .filter_map(|f| {
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    (path.to_string(), counters)
}

/// The entry of function `bdf` in a guest's `pci-irqs=BDF:MODE:N:COUNT,...` fact: (mode: msix,
/// msi, intx or none; vectors; interrupts counted). Panics if `bdf` is not in it.
pub fn pci_irqs_of<'a>(line: &'a str, bdf: &str) -> (&'a str, u32, u64) {
    let entry = line
        .split(',')
        .find(|e| e.starts_with(&format!("{bdf}:")))
        .unwrap_or_else(|| panic!("no {bdf} in pci-irqs={line}"));
    let f: Vec<&str> = entry.rsplitn(4, ':').collect();
    (f[2], f[1].parse().unwrap(), f[0].parse().unwrap())
}

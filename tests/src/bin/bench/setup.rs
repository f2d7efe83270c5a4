//! The setups and how each boot is made: the table's columns ([`Col`]), the boots ([`Boot`]),
//! the board script's arguments and QEMU's PCI devices of each, and the private disk copies
//! they use.

use crate::opts::Opts;
use crate::R;
use integration_tests::repo_root;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The setups: the columns of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Col {
    /// Linux directly on QEMU, its arm-smmu-v3 driver on QEMU's SMMUv3.
    Bare,
    Vsmmu,
    S2,
    /// The vSMMU setup with `smmu-hv,intx-only`: no vITS, the functions on their INTx lines
    /// (the others interrupt by MSI-X: bare through QEMU's ITS, the hypervisor's through the
    /// VM's vITS, injected through list registers).
    VsmmuIntx,
    /// The vSMMU setup on `gic-version=4`: MSIs injected directly into the running vCPU
    /// (GICv4.0 vLPIs), no exit per interrupt.
    VsmmuV4,
    /// The vSMMU setup's VM with `smmu-hv,iommu = "virtio-iommu"`: the same functions behind the
    /// hypervisor's virtio-iommu (virtio-mmio), the guest's virtio_iommu driver.
    Viommu,
    /// Linux directly on QEMU with QEMU's own virtio-iommu-pci and no SMMU
    /// (`--bare-iommu virtio-iommu`): what a VMM's user would pick instead.
    BareViommu,
    /// The vSMMU setup on another build of the hypervisor (`--baseline FILE`): before and after
    /// a change, side by side in one run.
    VsmmuBase,
    /// [`Col::Bare`] with QEMU's guest RAM allocated by the host before the boot
    /// (`-mem-prealloc`): under TCG the first touch of a page costs a host page fault and
    /// allocation, which the hypervisor's zeroing pays for every page it zeroes and a bare
    /// guest only for the pages it uses. Preallocated, neither pays it during the boot, which
    /// is timed from the machine's start (QEMU starts paused, `-S`, and is let go from its
    /// monitor once the allocation is done), not from QEMU's exec.
    BarePrealloc,
    /// [`Col::Vsmmu`] with the host's RAM preallocated, as [`Col::BarePrealloc`].
    VsmmuPrealloc,
}

impl Col {
    /// The setups `--setups` names (the baseline comes with `--baseline` instead).
    pub(crate) const ALL: [Col; 9] = [
        Col::Bare,
        Col::Vsmmu,
        Col::S2,
        Col::VsmmuIntx,
        Col::VsmmuV4,
        Col::Viommu,
        Col::BareViommu,
        Col::BarePrealloc,
        Col::VsmmuPrealloc,
    ];

    /// Every setup in the tables' order.
    pub(crate) const ORDER: [Col; 10] = [
        Col::Bare,
        Col::VsmmuBase,
        Col::Vsmmu,
        Col::S2,
        Col::VsmmuIntx,
        Col::VsmmuV4,
        Col::Viommu,
        Col::BareViommu,
        Col::BarePrealloc,
        Col::VsmmuPrealloc,
    ];

    /// Linux directly on QEMU, no hypervisor (no hypervisor counters).
    pub(crate) fn is_bare(self) -> bool {
        matches!(self, Col::Bare | Col::BareViommu | Col::BarePrealloc)
    }

    /// QEMU's guest RAM allocated by the host before the boot (`-mem-prealloc`).
    pub(crate) fn prealloc(self) -> bool {
        matches!(self, Col::BarePrealloc | Col::VsmmuPrealloc)
    }

    /// The guest drives a virtio-iommu (virtio_iommu), not an SMMUv3 (arm_smmu_v3).
    pub(crate) fn is_viommu(self) -> bool {
        matches!(self, Col::Viommu | Col::BareViommu)
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Col::Bare => "bare",
            Col::Vsmmu => "vSMMU",
            Col::S2 => "stage-2 only",
            Col::VsmmuIntx => "vSMMU, INTx",
            Col::VsmmuV4 => "vSMMU, GICv4",
            Col::Viommu => "virtio-iommu",
            Col::BareViommu => "bare, virtio-iommu-pci",
            Col::BarePrealloc => "bare, host RAM preallocated",
            Col::VsmmuPrealloc => "vSMMU, host RAM preallocated",
            Col::VsmmuBase => "vSMMU, baseline",
        }
    }

    pub(crate) fn slug(self) -> &'static str {
        match self {
            Col::Bare => "bare",
            Col::Vsmmu => "vsmmu",
            Col::S2 => "s2",
            Col::VsmmuIntx => "vsmmu-intx",
            Col::VsmmuV4 => "vsmmu-v4",
            Col::Viommu => "viommu",
            Col::BareViommu => "bare-viommu",
            Col::BarePrealloc => "bare-prealloc",
            Col::VsmmuPrealloc => "vsmmu-prealloc",
            Col::VsmmuBase => "vsmmu-base",
        }
    }
}

/// One boot of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Boot {
    /// One guest, in the setup of the column.
    Single(Col),
    /// Two VMs under the hypervisor (vSMMU or stage-2 only), for the guest-to-guest transfer.
    Pair(Col),
}

impl Boot {
    pub(crate) fn col(self) -> Col {
        match self {
            Boot::Single(c) | Boot::Pair(c) => c,
        }
    }

    pub(crate) fn name(self) -> String {
        match self {
            Boot::Single(c) => c.slug().to_string(),
            Boot::Pair(c) => format!("{}-2vms", c.slug()),
        }
    }
}

/// The guest addresses of the two-VM setups (`hvip=`, tests/guest/init).
pub(crate) const VM_IPS: [&str; 2] = ["10.0.2.10", "10.0.2.11"];
const BASE_BOOTARGS: &str = "console=ttyAMA0 rdinit=/init";

/// Everything the boots share.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) opts: Opts,
    pub(crate) guest: PathBuf,
    pub(crate) disks: [PathBuf; 2],
}

impl Ctx {
    /// The board script's arguments of `boot`.
    pub(crate) fn args(&self, boot: Boot) -> Vec<String> {
        let guest = self.guest.display().to_string();
        let s2 = if boot.col() == Col::S2 {
            " iommu.passthrough=1"
        } else {
            ""
        };
        let mut a: Vec<String> = Vec::new();
        let vms = match boot {
            Boot::Single(c) if c.is_bare() => {
                a.extend(["--bare", "--smp", "2", "--guest", &guest].map(String::from));
                if c == Col::BareViommu {
                    a.extend(["--bare-iommu", "virtio-iommu"].map(String::from));
                }
                a.push("--bootargs".to_string());
                a.push(BASE_BOOTARGS.to_string());
                1
            }
            Boot::Single(c) => {
                a.extend(["--vms", "1", "--smp", "2", "--guest", &guest].map(String::from));
                if c == Col::VsmmuIntx {
                    a.extend(["--vm-intx-only", "0"].map(String::from));
                }
                if c == Col::VsmmuV4 {
                    a.extend(["--gic", "4"].map(String::from));
                }
                if c == Col::Viommu {
                    a.extend(["--vm-iommu", "0", "virtio-iommu"].map(String::from));
                }
                if let (Col::VsmmuBase, Some(image)) = (c, &self.opts.baseline) {
                    a.push("--hv-image".to_string());
                    a.push(image.display().to_string());
                }
                a.extend(
                    ["--vm-pci", "0", "00:01.0,00:02.0", "--vm-bootargs", "0"].map(String::from),
                );
                a.push(format!("{BASE_BOOTARGS}{s2}"));
                1
            }
            Boot::Pair(_) => {
                a.extend(["--vms", "2", "--smp", "4", "--guest", &guest].map(String::from));
                a.extend(["--vm-pci", "0", "00:01.0,00:02.0"].map(String::from));
                a.extend(["--vm-pci", "1", "00:03.0,00:04.0"].map(String::from));
                for (i, ip) in VM_IPS.iter().enumerate() {
                    a.extend(["--vm-bootargs".to_string(), i.to_string()]);
                    a.push(format!("{BASE_BOOTARGS} hvip={ip}/24{s2}"));
                }
                2
            }
        };
        a.push("--".to_string());
        if boot.col().prealloc() {
            // Started paused (`-S`): the boot is timed from the `cont` the bench types at QEMU's
            // monitor, which QEMU reads only once it has allocated the RAM.
            a.push("-mem-prealloc".to_string());
            a.push("-S".to_string());
        }
        a.extend(pci_devices(&self.disks[..vms]));
        a
    }
}

/// The QEMU arguments of the disk and NIC of VM i (i < disks.len()), as `qemu/board-virt.sh --pci`
/// makes them (its `pci_args`: VM i on root-bus slots 2i+1 and 2i+2, NICs on hub 0), with the
/// disk images `disks`.
pub(crate) fn pci_devices(disks: &[PathBuf]) -> Vec<String> {
    let mut a = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let (ds, ns) = (2 * i + 1, 2 * i + 2);
        let file = disk.display().to_string().replace(',', ",,");
        a.push("-drive".to_string());
        a.push(format!("if=none,id=vm{i}disk,format=raw,file={file}"));
        a.push("-device".to_string());
        a.push(format!(
            "virtio-blk-pci,drive=vm{i}disk,bus=pcie.0,addr={ds}.0,disable-legacy=on,iommu_platform=on"
        ));
        a.push("-netdev".to_string());
        a.push(format!("hubport,id=vm{i}net,hubid=0"));
        a.push("-device".to_string());
        a.push(format!(
            "virtio-net-pci,netdev=vm{i}net,bus=pcie.0,addr={ns}.0,disable-legacy=on,iommu_platform=on,mac=52:54:00:00:00:1{i},romfile="
        ));
    }
    a
}

/// Makes the private disk copies from the board's images (made by the board script when missing).
pub(crate) fn private_disks(dir: &Path) -> R<[PathBuf; 2]> {
    let board = repo_root().join("build/disks");
    let src0 = board.join("vm0.img");
    if !src0.exists() {
        eprintln!("[bench] making build/disks/vm0.img with qemu/board-virt.sh --bare --pci");
        let dtb = dir.join("dump.dtb");
        let _ = Command::new(repo_root().join("qemu/board-virt.sh"))
            .args(["--bare", "--pci", "--dumpdtb"])
            .arg(&dtb)
            .output();
    }
    let src1 = board.join("vm1.img");
    let src1 = if src1.exists() { src1 } else { src0.clone() };
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = [dir.join("vm0.img"), dir.join("vm1.img")];
    for (src, dst) in [&src0, &src1].into_iter().zip(out.iter_mut()) {
        fs::copy(src, &*dst).map_err(|e| format!("copying {}: {e}", src.display()))?;
    }
    Ok(out)
}

/// Checks that the board script still gives `--pci`'s functions the arguments [`pci_devices`]
/// copies (it prints its QEMU command line before exec).
pub(crate) fn check_board_pci(guest: &Path, dir: &Path) -> Option<String> {
    let out = Command::new(repo_root().join("qemu/board-virt.sh"))
        .args(["--bare", "--pci", "--guest"])
        .arg(guest)
        .arg("--dumpdtb")
        .arg(dir.join("check.dtb"))
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("[board-virt] bare guest"))?;
    let board: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.contains("vm0disk") || w.contains("vm0net"))
        .collect();
    let mine = pci_devices(&[PathBuf::from("DISK")]);
    let mine: Vec<&str> = mine
        .iter()
        .map(String::as_str)
        .filter(|w| w.contains("vm0disk") || w.contains("vm0net"))
        .collect();
    let norm = |w: &str| match w.split_once(",file=") {
        Some((a, _)) => a.to_string(),
        None => w.to_string(),
    };
    let same =
        board.len() == mine.len() && board.iter().zip(&mine).all(|(a, b)| norm(a) == norm(b));
    (!same).then(|| {
        format!(
            "the board script's --pci devices differ from the benchmark's copy: board {board:?}, bench {mine:?}"
        )
    })
}

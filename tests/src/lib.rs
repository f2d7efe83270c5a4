//! A QEMU runner for the integration tests.
//!
//! [`Qemu::spawn`] starts `qemu/board-virt.sh` (which execs QEMU) in its own process group, with stdin
//! piped so a test can type into the guest console and stdout and stderr captured line by line into a
//! log. Tests wait for lines ([`Qemu::wait_for`], [`Qemu::wait_fact`]), type ([`Qemu::send`]) and wait
//! for QEMU to exit ([`Qemu::wait_exit`]).
//!
//! Every wait is bounded, and so is the whole run: a wall-clock limit kills QEMU and its process
//! group, and a `timeout` wrapper kills it even if the test process itself dies. QEMU is always killed
//! on drop. On any failure (a wait that failed, or a panic such as a failed assertion) the whole
//! console log is printed with a clear header. The log is also written, as it arrives, to
//! `target/qemu-logs/<name>.log`.
//!
//! Guest facts are lines like `guest: nproc=2` printed by the guest's init (`tests/guest/init`);
//! [`guest_fact`] splits them into key and value.
//!
//! With several VMs the hypervisor prefixes every guest console line with the VM's name
//! (`[vm1] guest: nproc=2`) and its own lines with `[hv] `. The `wait_vm_*` methods look only at
//! one VM's lines, each VM with a cursor of its own, so waiting for vm0 does not skip vm1's lines;
//! [`vm_text`] strips the prefix.
//!
//! Set `HV_TEST_ECHO=1` to also echo the console live to the test's stderr.

//! The modules: [`Qemu`] and its waits (`qemu`), [`Error`], the paths of the repository and the
//! guest images (`paths`), console text (`text`), the checks of the guests' facts (`guest`),
//! of the `--pci` devices (`pci`), the hypervisor console's commands (`console`), the U-Boot
//! board path's commands, taken from docs/vm-config.md and typed at U-Boot's prompt (`uboot`),
//! and MD5.

#![forbid(unsafe_code)]

mod console;
mod error;
mod guest;
mod md5;
mod paths;
mod pci;
mod qemu;
#[cfg(test)]
mod tests;
mod text;
mod uboot;

use std::time::Duration;

pub use console::{
    check_answer, console_command, focus, monitor, parse_register_traps, parse_stats,
    parse_viommu_stats, raw_stats, ste_lines, type_paced, viommu_stats, vsmmu_register_traps,
    vsmmu_stats, CONSOLE_ESCAPE, VIOMMU_STATS_KEYS, VSMMU_STATS_KEYS,
};
pub use error::Error;
pub use guest::{
    check_fpcheck, check_guest_facts, check_vm_guest_facts, parse_fpcheck, FpCheck, GuestReport,
    CPU_FEATURES_HIDDEN, CPU_FEATURES_KEPT, MAX_LOAD_GAP_MS,
};
pub use md5::md5_hex;
pub use paths::{guest_kver, modular_guest_dir, repo_root, stock_guest_dir, target_dir};
pub use pci::{
    check_vm_disk, check_vm_pings, host_disk_md5, make_disk_image, pci_irqs_of, vits_stats,
    Assigned, DISK_BYTES, DISK_CONTENT, VM0, VM1,
};
pub use qemu::{Line, Qemu, Stream};
pub use text::{guest_fact, hv_text, line_source, strip_ansi, vm_text};
pub use uboot::{
    check_uboot_commands, doc_uboot_commands, stop_autoboot, type_uboot_commands, uboot_commands,
    uboot_literal_vars, uboot_words, UbootReport, AUTOBOOT_PROMPT, BEGIN_MARKER, END_MARKER,
    UBOOT_DOC, UBOOT_LINE_MAX, UBOOT_MAX_ARGS, UBOOT_PROMPT,
};

/// How long a guest may take from QEMU's start to its first `guest:` line (TCG on two slow cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one step after boot (a fact, a command's answer, the power-off) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Wall-clock limit of one whole QEMU run, whatever the test waits for.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(420);

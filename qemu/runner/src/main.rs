//! `cargo run` at the workspace root, the convention of Rust embedded projects: it execs
//! `qemu/run.sh` with the arguments after `--`, which sets up the host (`qemu/setup.sh`), builds
//! the hypervisor for `aarch64-unknown-none-softfloat` (`qemu/build.sh`) and boots it on QEMU `virt`
//! (`qemu/board-virt.sh`): with no arguments the two default VMs, each with its own virtio disk and
//! NIC, exactly as `qemu/run.sh` does.
//!
//! - `cargo run` boots the two VMs, console attached (Ctrl-a x quits QEMU);
//! - `cargo run -- --vms 3` (any `qemu/run.sh` / `qemu/board-virt.sh` option) passes them on;
//! - `cargo run -- --pci --show-dts` prints the device tree the default boot would use and exits
//!   without booting (what CI runs to exercise this path without a boot's cost).
//!
//! The host build of this binary is the only thing `cargo run` compiles itself; the workspace's
//! default build target stays the host, so `cargo test` and the fuzz, loom and Miri commands are
//! untouched.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The workspace root: two levels above this crate's manifest directory (`qemu/runner/`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("qemu/runner/ sits two levels below the workspace root")
        .to_path_buf()
}

/// The command `cargo run -- ARGS` stands for: `qemu/run.sh ARGS`, from the workspace root.
fn run_command(root: &Path, args: impl IntoIterator<Item = std::ffi::OsString>) -> Command {
    let mut cmd = Command::new(root.join("qemu").join("run.sh"));
    cmd.args(args).current_dir(root);
    cmd
}

fn main() -> ExitCode {
    let root = workspace_root();
    let mut cmd = run_command(&root, env::args_os().skip(1));
    // Replace this process, so QEMU owns the terminal and its exit status is cargo's.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = cmd.exec();
        eprintln!(
            "[run] error: cannot exec {}: {err}",
            root.join("qemu/run.sh").display()
        );
        ExitCode::FAILURE
    }
    #[cfg(not(unix))]
    {
        match cmd.status() {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("[run] error: cannot run qemu/run.sh: {err}");
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_holds_the_run_script() {
        let root = workspace_root();
        assert!(root.join("Cargo.toml").is_file());
        assert!(root.join("qemu/run.sh").is_file());
    }

    #[test]
    fn arguments_pass_through_unchanged() {
        let root = workspace_root();
        let cmd = run_command(&root, ["--vms", "3", "--", "-s"].map(Into::into));
        assert_eq!(cmd.get_program(), root.join("qemu/run.sh"));
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["--vms", "3", "--", "-s"]);
        assert_eq!(cmd.get_current_dir(), Some(root.as_path()));
    }
}

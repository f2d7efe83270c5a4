//! The machine and the run's provenance: the host's CPU and load, other QEMUs running, the
//! output of a command, a file's SHA-256.

use std::fs;
use std::path::Path;
use std::process::Command;

pub(crate) fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

pub(crate) fn cpu_model() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "CPU part").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}

/// QEMU processes running now (other jobs', when none of ours is).
pub(crate) fn qemu_processes() -> usize {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with("qemu-system"))
        })
        .count()
}

pub(crate) fn sha256(path: &Path) -> String {
    command_line("sha256sum", &[&path.display().to_string()])
        .split_whitespace()
        .next()
        .unwrap_or("unknown")
        .to_string()
}

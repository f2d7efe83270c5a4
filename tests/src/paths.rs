//! Where things are: the repository, the guest images the `qemu/*.sh` scripts build, and the
//! cargo target directory (where the QEMU logs go).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The stock guest images built by `qemu/setup.sh`.
pub fn stock_guest_dir() -> PathBuf {
    repo_root().join("build/guest/stock")
}

/// The modular guest images built by `qemu/kernel.sh` (`arm_smmu_v3` as a module, which the guest
/// can unload and reload).
pub fn modular_guest_dir() -> PathBuf {
    repo_root().join("build/guest/modular")
}

/// The kernel release of the guest images in `dir` (its `kver` file), as `uname -r` prints it.
pub fn guest_kver(dir: &Path) -> io::Result<String> {
    let path = dir.join("kver");
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e} (run qemu/setup.sh)", path.display()),
            )
        })
}

/// The cargo target directory (`CARGO_TARGET_DIR` or the workspace's `target/`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

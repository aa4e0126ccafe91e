//! The system C++ compiler for the tests that run the CUDA kernels' code on the host
//! (`tests/kernel_host.rs`, `tests/kernel_emulated.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles `source` (a file of `tests/kernel_host/`) with the kernels' folder on the include
/// path into `dir`; `None` (after printing that `test` skipped) without a C++ compiler, unless
/// `FWL_REQUIRE_CXX=1`.
pub fn compile(test: &str, source: &str, dir: &Path, extra: &[&str]) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.join(source.trim_end_matches(".cpp"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        // (no _FORTIFY_SOURCE: its checked longjmp refuses emu.h's jumps between fiber stacks;
        // no contraction into fused multiply-adds on any machine, x86-64's default)
        .args(["-O2", "-std=c++17", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-ffp-contract=off", "-I"])
        .arg(dir)
        .arg("-I")
        .arg(root.join("kernels"))
        .args(extra)
        .arg(root.join("tests/kernel_host").join(source))
        .arg("-o")
        .arg(&exe)
        .output();
    let built = match built {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // (CI sets FWL_REQUIRE_CXX=1: there a missing compiler fails instead of skipping)
            assert!(
                std::env::var("FWL_REQUIRE_CXX").as_deref() != Ok("1"),
                "{test}: FWL_REQUIRE_CXX=1 but no C++ compiler ({cxx})"
            );
            println!("{test}: skipped, no C++ compiler ({cxx})");
            return None;
        }
        Err(e) => panic!("running {cxx}: {e}"),
    };
    assert!(built.status.success(), "compiling {source} for the host:\n{}", String::from_utf8_lossy(&built.stderr));
    Some(exe)
}

/// A folder of this process's own under the temporary one, removed when dropped.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(what: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), what)
    }

    /// A folder of this process's own under `base`.
    pub fn new_in(base: &Path, what: &str) -> Self {
        let dir = base.join(format!("fwl-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}
impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

//! The CUDA kernels' online-softmax statistics (`struct MS`, its push and merges, and a row's loss
//! and gradient factors from them: `row_loss`, `row_factors`; between the `fwl-host` markers of
//! `kernels/weighted_loss.cu`) compiled for the host with the system C++ compiler (`$CXX`, else
//! `c++`) and checked against float64 by `tests/kernel_host/ms_check.cpp`: block and split folds
//! of random rows at large common offsets, and the edge cases (empty sides, `-inf`, NaN). The
//! whole kernels run on the host in `tests/kernel_emulated.rs`. Without a C++ compiler the test
//! prints that it skipped.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::host_cxx::{compile, TempDir};

#[test]
fn kernel_statistics_fold_and_merge_on_the_host() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cu = std::fs::read_to_string(root.join("kernels/weighted_loss.cu")).unwrap();
    let begin = cu.find("// fwl-host: begin").expect("the begin marker in weighted_loss.cu");
    let end = cu.find("// fwl-host: end").expect("the end marker in weighted_loss.cu");
    assert!(begin < end, "markers in order");
    let dir = TempDir::new("kernel-host");
    std::fs::write(dir.0.join("ms.inc"), &cu[begin..end]).unwrap();
    let Some(exe) = compile("kernel_statistics_fold_and_merge_on_the_host", "ms_check.cpp", &dir.0, &[]) else {
        return;
    };
    let run = Command::new(&exe).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(run.status.success() && out.trim_end().ends_with("ok"), "the host check failed:\n{out}");
}

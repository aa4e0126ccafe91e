//! The CUDA kernels' online-softmax statistics (`struct MS`, its push and merges, and a row's loss and
//! gradient factors from them: `row_loss`, `row_factors`; between the
//! `fwl-host` markers of `kernels/weighted_loss.cu`) compiled for the host with the system C++
//! compiler (`$CXX`, else `c++`) and checked against float64 by `tests/kernel_host/ms_check.cpp`:
//! block and split folds of random rows at large common offsets, and the edge cases (empty sides,
//! `-inf`, NaN). The arithmetic of the kernels that needs no GPU to run, run where there is none.
//! Without a C++ compiler the test prints that it skipped.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn kernel_statistics_fold_and_merge_on_the_host() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cu = std::fs::read_to_string(root.join("kernels/weighted_loss.cu")).unwrap();
    let begin = cu.find("// fwl-host: begin").expect("the begin marker in weighted_loss.cu");
    let end = cu.find("// fwl-host: end").expect("the end marker in weighted_loss.cu");
    assert!(begin < end, "markers in order");
    let dir = std::env::temp_dir().join(format!("fwl-kernel-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ms.inc"), &cu[begin..end]).unwrap();
    let exe = dir.join("ms_check");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-O2", "-std=c++17", "-I"])
        .arg(&dir)
        .arg(root.join("tests/kernel_host/ms_check.cpp"))
        .arg("-o")
        .arg(&exe)
        .output();
    let built = match built {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("kernel_statistics_fold_and_merge_on_the_host: skipped, no C++ compiler ({cxx})");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        Err(e) => panic!("running {cxx}: {e}"),
    };
    assert!(
        built.status.success(),
        "compiling the kernels' statistics for the host:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(run.status.success() && out.trim_end().ends_with("ok"), "the host check failed:\n{out}");
}

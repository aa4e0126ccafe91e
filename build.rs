//! With the `cuda` feature: compiles `kernels/*.cu` with nvcc into one fatbin per file (SASS for
//! sm_80, sm_86, sm_89, sm_90 and PTX for compute_80, every entry compressed), embedded in the
//! crate, and runs bindgen on `kernels/params.h` so the Rust launch structs cannot drift from
//! the CUDA side. Without the feature it does nothing and needs nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
    // Executables with candle-core's `cuda` link CUDA's libraries at build time:
    // `scripts/cuda-link-libs.sh` makes a folder of them on a machine without CUDA.
    println!("cargo:rerun-if-env-changed=FWL_CUDA_LINK_DIR");
    if let Some(dir) = std::env::var_os("FWL_CUDA_LINK_DIR") {
        println!("cargo:rustc-link-search=native={}", std::path::Path::new(&dir).display());
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Machine code for these architectures, plus PTX for the first (forward compatibility).
    const ARCHS: [&str; 4] = ["80", "86", "89", "90"];

    /// Where nvcc is: `NVCC`, then `CUDA_HOME`/`CUDA_PATH` (`bin/nvcc`), then `PATH`.
    fn find_nvcc() -> Result<PathBuf, String> {
        for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-env-changed=PATH");
        if let Some(p) = env::var_os("NVCC") {
            let p = PathBuf::from(p);
            return if p.is_file() { Ok(p) } else { Err(format!("NVCC={} is not a file", p.display())) };
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(home) = env::var_os(var) {
                let p = Path::new(&home).join("bin").join("nvcc");
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        if let Some(path) = env::var_os("PATH") {
            for dir in env::split_paths(&path) {
                let p = dir.join("nvcc");
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err("no nvcc found".into())
    }

    /// Compiles one kernel file into `out` as a fatbin.
    fn nvcc_fatbin(nvcc: &Path, src: &Path, include: &Path, out: &Path) {
        let mut cmd = Command::new(nvcc);
        cmd.arg("--fatbin").args(["-O3", "-std=c++17", "-lineinfo"]).arg("-I").arg(include);
        for a in ARCHS {
            cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
        }
        cmd.arg("-gencode").arg(format!("arch=compute_{0},code=compute_{0}", ARCHS[0]));
        // every entry compressed (zstd; the driver inflates it at load): left alone, nvcc
        // compresses only the largest, and the embedded fatbin was 30 MB instead of 5
        cmd.args(["-Xfatbin", "-compress-all"]);
        cmd.arg("-o").arg(out).arg(src);
        let status = cmd.status().unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }

    pub fn build() {
        let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
        let kernels = root.join("kernels");
        let out = PathBuf::from(env::var("OUT_DIR").unwrap());
        let nvcc = find_nvcc().unwrap_or_else(|why| {
            panic!(
                "the `cuda` feature needs nvcc ({why}). Set NVCC to its path, or CUDA_HOME / CUDA_PATH to a \
                 toolkit, or put it on PATH; `bash scripts/install-cuda-toolchain.sh` installs nvcc 13.0 from PyPI \
                 and prints the variables to export."
            )
        });

        let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
            .expect("kernels/ is missing")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        sources.sort();
        for p in &sources {
            println!("cargo:rerun-if-changed={}", p.display());
        }
        for src in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            nvcc_fatbin(&nvcc, src, &kernels, &out.join(format!("{stem}.fatbin")));
        }

        let bindings = bindgen::Builder::default()
            .header(kernels.join("params.h").to_string_lossy())
            .allowlist_type("Fwl.*")
            .allowlist_var("FWL_.*")
            .derive_default(true)
            .derive_debug(true)
            .generate()
            .expect("bindgen failed on kernels/params.h (bindgen needs libclang: apt-get install libclang-dev)");
        bindings.write_to_file(out.join("params.rs")).expect("writing params.rs");
    }
}

//! With the `cuda` feature: compiles `kernels/*.cu` with nvcc into one fatbin per file (SASS for
//! sm_80, sm_86, sm_89, sm_90 and PTX for compute_80, every entry compressed), embedded in the
//! crate, and runs bindgen on `kernels/params.h` so the Rust launch structs cannot drift from
//! the CUDA side. Without the feature it does nothing and needs nothing.
//!
//! nvcc is the slow step (minutes for four architectures), and every feature set and profile
//! runs this script again: so a fatbin is kept in `<target>/fwl-kernels/` under a hash of
//! nvcc's path and version, its arguments and every file in `kernels/`, and copied from there
//! when nothing of those changed. `FWL_KERNEL_CACHE=<dir>` puts that cache elsewhere, `=off`
//! turns it off.

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
        // (PATH is searched, and watched, only when neither names nvcc: a shell that adds to
        // PATH then reruns nothing)
        let nvcc = format!("nvcc{}", env::consts::EXE_SUFFIX);
        if let Some(p) = env::var_os("NVCC") {
            let p = PathBuf::from(p);
            return if p.is_file() { Ok(p) } else { Err(format!("NVCC={} is not a file", p.display())) };
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(home) = env::var_os(var) {
                let p = Path::new(&home).join("bin").join(&nvcc);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        println!("cargo:rerun-if-env-changed=PATH");
        if let Some(path) = env::var_os("PATH") {
            for dir in env::split_paths(&path) {
                let p = dir.join(&nvcc);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err("no nvcc found".into())
    }

    /// nvcc's arguments for one kernel file, but for its output: a fatbin of [`ARCHS`].
    fn nvcc_args(src: &Path, include: &Path) -> Vec<String> {
        let mut args: Vec<String> = ["--fatbin", "-O3", "-std=c++17", "-lineinfo"].map(String::from).into();
        args.extend(["-I".into(), include.display().to_string()]);
        for a in ARCHS {
            args.extend(["-gencode".into(), format!("arch=compute_{a},code=sm_{a}")]);
        }
        args.extend(["-gencode".into(), format!("arch=compute_{0},code=compute_{0}", ARCHS[0])]);
        // every entry compressed (zstd; the driver inflates it at load): left alone, nvcc
        // compresses only the largest, and the embedded fatbin was 30 MB instead of 5
        args.extend(["-Xfatbin", "-compress-all"].map(String::from));
        // the architectures compiled side by side, one thread per core
        args.extend(["--threads", "0"].map(String::from));
        args.push(src.display().to_string());
        args
    }

    /// Where compiled fatbins are kept (see the crate's build notes above): `FWL_KERNEL_CACHE`,
    /// else `<target>/fwl-kernels`, found from `OUT_DIR` (`<target>[/<triple>]/<profile>/build/
    /// <package>-<hash>/out`); `None` (no cache) for `off` or an `OUT_DIR` of another shape.
    fn cache_dir(out: &Path) -> Option<PathBuf> {
        println!("cargo:rerun-if-env-changed=FWL_KERNEL_CACHE");
        match env::var_os("FWL_KERNEL_CACHE") {
            Some(v) if v == "off" || v.is_empty() => None,
            Some(v) => Some(PathBuf::from(v)),
            None => {
                let build = out.ancestors().nth(2)?;
                (build.file_name()? == "build").then(|| build.ancestors().nth(2).map(|t| t.join("fwl-kernels")))?
            }
        }
    }

    /// The cache key of one compile: nvcc's path and `--version`, the arguments, nvcc's
    /// variables (`NVCC_PREPEND_FLAGS`, ...), and the names and bytes of every file in
    /// `kernels/` (a kernel includes headers). A hash that moves between Rust versions only
    /// costs a compile.
    fn cache_key(nvcc: &Path, args: &[String], kernel_files: &[PathBuf]) -> Option<String> {
        use std::hash::{Hash, Hasher};
        let version = Command::new(nvcc).arg("--version").output().ok().filter(|o| o.status.success())?;
        #[allow(deprecated)] // SipHash with fixed keys: the same on every run of one toolchain
        let mut h = std::hash::SipHasher::new();
        (nvcc, &version.stdout, args).hash(&mut h);
        // what nvcc itself takes from the environment
        for var in ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN"] {
            println!("cargo:rerun-if-env-changed={var}");
            env::var_os(var).hash(&mut h);
        }
        for f in kernel_files {
            (f.file_name(), std::fs::read(f).ok()?).hash(&mut h);
        }
        Some(format!("{:016x}", h.finish()))
    }

    /// Compiles one kernel file (`stem`: its name without `.cu`) into `out` as a fatbin, or
    /// copies the same compile from `cache`.
    fn nvcc_fatbin(
        nvcc: &Path,
        src: &Path,
        stem: &str,
        kernel_files: &[PathBuf],
        include: &Path,
        out: &Path,
        cache: Option<&Path>,
    ) {
        let args = nvcc_args(src, include);
        let kept =
            cache.and_then(|dir| Some(dir.join(format!("{stem}-{}.fatbin", cache_key(nvcc, &args, kernel_files)?))));
        if let Some(kept) = &kept {
            if std::fs::copy(kept, out).is_ok() {
                eprintln!("kernels/{stem}.cu: the fatbin compiled before, from {}", kept.display());
                return;
            }
        }
        let status = Command::new(nvcc)
            .args(&args)
            .arg("-o")
            .arg(out)
            .status()
            .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
        // kept through a temporary file renamed into place: a build beside this one reads a
        // whole fatbin or none; a cache that cannot be written costs nothing but the next compile
        if let Some(kept) = &kept {
            let tmp = kept.with_extension(format!("tmp{}", std::process::id()));
            let saved = kept.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
                && std::fs::copy(out, &tmp).is_ok()
                && std::fs::rename(&tmp, kept).is_ok();
            if !saved {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }

    pub fn build() {
        let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
        let kernels = root.join("kernels");
        let out = PathBuf::from(env::var("OUT_DIR").unwrap());
        // bindgen first: a missing libclang is told in seconds, not after minutes of nvcc
        bindings(&kernels, &out);
        let nvcc = find_nvcc().unwrap_or_else(|why| {
            panic!(
                "the `cuda` feature needs nvcc ({why}). Set NVCC to its path, or CUDA_HOME / CUDA_PATH to a \
                 toolkit, or put it on PATH (cudarc's own build runs `nvcc --version` from PATH unless \
                 CUDARC_CUDA_VERSION is set, e.g. 13000); `bash scripts/install-cuda-toolchain.sh` installs nvcc \
                 13.0 from PyPI and prints the variables to export."
            )
        });

        // (the folder too: a new file reruns this script, and so does any change in it, an
        // editor's swap file too, when the fatbin cache makes the rerun short; names starting
        // with '.', such lock or swap files, are not compiled or hashed)
        println!("cargo:rerun-if-changed={}", kernels.display());
        let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
            .expect("kernels/ is missing")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')))
            .collect();
        sources.sort();
        for p in &sources {
            println!("cargo:rerun-if-changed={}", p.display());
        }
        let cache = cache_dir(&out);
        for src in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            nvcc_fatbin(&nvcc, src, &stem, &sources, &kernels, &out.join(format!("{stem}.fatbin")), cache.as_deref());
        }
    }

    /// `params.rs` from `kernels/params.h`. bindgen panics by itself where it finds no libclang;
    /// that panic is caught and told with what to install.
    fn bindings(kernels: &Path, out: &Path) {
        for var in ["LIBCLANG_PATH", "BINDGEN_EXTRA_CLANG_ARGS", "CLANG_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let header = kernels.join("params.h");
        let generated = std::panic::catch_unwind(|| {
            bindgen::Builder::default()
                .header(header.to_string_lossy())
                .allowlist_type("Fwl.*")
                .allowlist_var("FWL_.*")
                .derive_default(true)
                .derive_debug(true)
                .generate()
        });
        let hint = "bindgen needs libclang: apt-get install libclang-dev, or LIBCLANG_PATH=<its folder>";
        match generated {
            Ok(Ok(b)) => b.write_to_file(out.join("params.rs")).expect("writing params.rs"),
            Ok(Err(e)) => panic!("bindgen failed on kernels/params.h: {e}"),
            Err(_) => panic!("bindgen failed on kernels/params.h ({hint}; its own message is above)"),
        }
    }
}

//! Whether CUDA can run here: the driver library is probed before cudarc touches it.

use super::*;

/// Whether a CUDA driver and at least one device are present (checked once per process,
/// without touching cudarc until the driver library is known to load).
pub(crate) fn status() -> std::result::Result<(), String> {
    static STATUS: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATUS
        .get_or_init(|| {
            let present = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"].iter().any(|name| {
                // SAFETY: loads the CUDA driver library, as cudarc itself would; its
                // initialisers are the driver's own.
                unsafe { libloading::Library::new(name) }.is_ok()
            });
            if !present {
                return Err("no CUDA driver (libcuda) on this machine".into());
            }
            match CudaContext::device_count() {
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err("the CUDA driver reports no device".into()),
                Err(e) => Err(format!("the CUDA driver did not initialise: {e}")),
            }
        })
        .clone()
}

/// Whether the cuBLAS library loads (checked once per process): cudarc opens it on the first
/// cuBLAS call and panics when it cannot, so the fused linear path asks this first. The names
/// are those cudarc tries on Linux and Windows; a build linked against cuBLAS (candle's `cuda`
/// feature) finds it loaded already.
pub(crate) fn cublas_status() -> std::result::Result<(), String> {
    static STATUS: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATUS
        .get_or_init(|| {
            const NAMES: [&str; 8] = [
                "libcublas.so",
                "libcublas.so.13",
                "libcublas.so.12",
                "libcublas.so.11",
                "cublas64_13.dll",
                "cublas64_12.dll",
                "cublas64_11.dll",
                "cublas.dll",
            ];
            // SAFETY: loads cuBLAS, as cudarc itself would; its initialisers are the library's own.
            if NAMES.iter().any(|name| unsafe { libloading::Library::new(name) }.is_ok()) {
                Ok(())
            } else {
                Err(format!(
                    "the fused linear path needs cuBLAS, and no cuBLAS library loads here (tried {}): \
                     install CUDA's cuBLAS or add its folder to LD_LIBRARY_PATH",
                    NAMES.join(", ")
                ))
            }
        })
        .clone()
}

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

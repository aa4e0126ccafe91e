//! The cuBLAS layer of the fused linear path: one handle and its workspace per
//! [`CudaLinearLoss`](super::CudaLinearLoss), bound to each call's stream under a lock, and the
//! products as `cublasGemmEx` calls (f32 compute).

use super::super::{drv, output};
use super::WORKSPACE_BYTES;
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut};
use std::ffi::c_void;
use std::sync::Arc;

/// A cuBLAS handle with its workspace.
pub(super) struct Blas {
    handle: CudaBlas,
    workspace: CudaSlice<u8>,
    /// Recorded on the last call's stream after its products (their use of the workspace).
    done: Option<CudaEvent>,
}

/// The handle bound to one call's stream, under the lock. When it is dropped, however the call
/// ends, it records on that stream where the call's products end: the next call (on any stream)
/// waits for that before its own products use the workspace. (The workspace's own borrow in
/// [`Blas::bind`] records its event before the products are queued, so it cannot order them.)
pub(super) struct Bound<'a> {
    blas: std::sync::MutexGuard<'a, Blas>,
    stream: &'a Arc<CudaStream>,
}

impl<'a> Bound<'a> {
    pub(super) fn new(blas: std::sync::MutexGuard<'a, Blas>, stream: &'a Arc<CudaStream>) -> Result<Bound<'a>> {
        let mut b = Bound { blas, stream };
        b.blas.bind(stream)?;
        Ok(b)
    }
}

impl std::ops::Deref for Bound<'_> {
    type Target = Blas;
    fn deref(&self) -> &Blas {
        &self.blas
    }
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        // a failure here means the context is failing already; the call reports that itself
        self.blas.done = self.stream.record_event(None).ok();
    }
}

fn blas_err(context: &'static str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::Cuda { context, message: format!("{e:?}") }
}

pub(super) fn blas_type(d: DType) -> cudaDataType_t {
    match d {
        DType::F32 => cudaDataType_t::CUDA_R_32F,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
    }
}

/// One operand of a product: device address, cuBLAS type, leading dimension.
#[derive(Clone, Copy)]
pub(super) struct Operand {
    pub(super) ptr: u64,
    pub(super) ty: cudaDataType_t,
    pub(super) ld: usize,
}

/// A column-major product `c = alpha·op(a)·op(b) (+ c)` for cuBLAS: `m x n`, inner size `k`.
pub(super) struct Product {
    /// 1, or `1/S` for the products of float16 gradient rows scaled by `S` (`scale.rs`).
    pub(super) alpha: f32,
    pub(super) ta: bool,
    pub(super) tb: bool,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) a: Operand,
    pub(super) b: Operand,
    pub(super) c: Operand,
    pub(super) accumulate: bool,
}

impl Blas {
    /// Binds the handle to `stream`, with this handle's workspace (setting a stream resets the
    /// workspace to cuBLAS's own pool, so it is set again after).
    fn bind(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        // the last call's products, on whatever stream, end before this call's start (`Bound`)
        if let Some(done) = &self.done {
            stream.wait(done).map_err(drv("ordering the cuBLAS workspace between streams"))?;
        }
        // SAFETY: the handle is used only under its lock, and only for work on `stream`.
        unsafe { self.handle.set_stream(stream.clone()) }.map_err(blas_err("binding cuBLAS to the stream"))?;
        let (w, _g) = self.workspace.device_ptr_mut(stream);
        // SAFETY: the workspace is a live device buffer of WORKSPACE_BYTES, owned by `self` with
        // the handle; its allocation completed before the first call (see `new`).
        unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*self.handle.handle(), w as *mut c_void, WORKSPACE_BYTES) }
            .result()
            .map_err(blas_err("setting the cuBLAS workspace"))
    }

    /// Queues one product on the handle's stream (f32 compute, f32 scalars on the host).
    pub(super) fn gemm(&self, p: Product) -> Result<()> {
        let dim = |x: usize| i32::try_from(x).map_err(|_| Error::Unsupported("matrix too large for cuBLAS".into()));
        let op = |t| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (p.alpha, if p.accumulate { 1f32 } else { 0f32 });
        // SAFETY: every caller passes device addresses of live buffers (held by the caller for
        // the call) large enough for the shape and leading dimensions given, of the types given;
        // the handle is bound to the stream the buffers are used on; alpha and beta are host f32
        // scalars, as the default pointer mode and CUBLAS_COMPUTE_32F expect.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.handle.handle(),
                op(p.ta),
                op(p.tb),
                dim(p.m)?,
                dim(p.n)?,
                dim(p.k)?,
                &alpha as *const f32 as *const c_void,
                p.a.ptr as *const c_void,
                p.a.ty,
                dim(p.a.ld)?,
                p.b.ptr as *const c_void,
                p.b.ty,
                dim(p.b.ld)?,
                &beta as *const f32 as *const c_void,
                p.c.ptr as *mut c_void,
                p.c.ty,
                dim(p.c.ld)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err("running a cuBLAS product"))
    }
}

impl Blas {
    /// Opens cuBLAS on `ctx` (probed first: cudarc panics where the library is missing), with
    /// its workspace bound to the context's default stream (this waits once for the workspace's
    /// allocation, which later calls use from other streams).
    pub(super) fn open(ctx: &Arc<CudaContext>) -> Result<Blas> {
        super::super::probe::cublas_status()
            .map_err(|reason| Error::BackendUnavailable { backend: crate::Backend::Cuda, reason })?;
        let stream = ctx.default_stream();
        // cudarc loads cuBLAS on its first call, by the names of the CUDA version it was built
        // for, and panics when none loads: a library the probe found under another version's
        // name (libcublas.so.13 for a CUDA 12 build) is then an error, not a panic
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| CudaBlas::new(stream.clone())));
        let handle = opened
            .map_err(|_| Error::BackendUnavailable {
                backend: crate::Backend::Cuda,
                reason: "cudarc could not load cuBLAS under the names of the CUDA version it was built for \
                         (a cuBLAS of another version is installed)"
                    .into(),
            })?
            .map_err(blas_err("opening cuBLAS"))?;
        let workspace = output::<u8>(&stream, WORKSPACE_BYTES)?;
        stream.synchronize().map_err(drv("synchronising"))?;
        let mut blas = Blas { handle, workspace, done: None };
        blas.bind(&stream)?;
        Ok(blas)
    }
}

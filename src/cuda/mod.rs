//! The CUDA backend (feature `cuda`): the caller's device buffers and stream, three launches per
//! call, no host synchronisation until the caller asks for results on the host.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use fused_weighted_loss::cuda::{cudarc::driver::CudaContext, CudaLoss, DeviceInputs};
//! use fused_weighted_loss::{bf16, LossSpec, Shape};
//!
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let shape = Shape::new(8, 1024, 128_256)?;
//! let logits = stream.alloc_zeros::<bf16>(shape.logits_len())?; // your model's output
//! let ids = stream.alloc_zeros::<i64>(shape.rows())?;
//! let mut grad = stream.alloc_zeros::<bf16>(shape.logits_len())?;
//!
//! let loss = CudaLoss::new(&ctx)?;
//! let spec = LossSpec::builder().keywords([3, 17]).build()?;
//! let ids = ids.as_view();
//! let out = loss.loss_and_grad(&spec, shape, &stream, &logits.as_view(), &DeviceInputs::new(&ids), &mut grad.as_view_mut())?;
//! // everything so far is queued on `stream`; this synchronises and checks the ids:
//! let host = out.to_host(&stream)?;
//! println!("loss {}", host.loss);
//! # Ok(()) }
//! ```
//!
//! Ids and labels live on the device, so their range is checked there: an id or label outside
//! `[0, V)` and other than `ignore_index` is treated as "no target" by the kernels (never read out of bounds) and reported as
//! [`Error::IdOutOfRange`] by [`DeviceLossOutput::to_host`] or [`DeviceLossOutput::check`].
//!
//! Layers, one file each: `probe` (is there a driver and a device, asked before cudarc is
//! touched), `module` (the kernels loaded once per context, the rows kernel's launch knobs),
//! `launch` (the plan, rows and finish launches of a call and the buffers between them), `api`
//! (the public device API), `host` (host slices through the GPU), `bench` (device timings); `linear` is the fused linear path on cuBLAS, `external` runs on
//! another framework's device pointers and stream; `split` is the vocabulary- and data-parallel
//! split (`nccl` its NCCL all-gather, feature `nccl`).

pub mod linear;

mod params {
    #![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, missing_docs)]
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/params.rs"));
}

pub use cudarc;
pub mod external;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod split;

use crate::dtype::{DType, Logit, TokenId};
use crate::error::{Error, Result};
use crate::spec::{check_len, LossOutput, LossSpec, Reduction, RowMean, Shape, Tokens};
use crate::{Backend, Grad};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg,
};
use params::{FwlFinishParams, FwlNarrowParams, FwlPlanParams, FwlRowParams, FwlScaleParams, FwlStatus};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Threads per block of every kernel.
const THREADS: u32 = params::FWL_THREADS;

/// Most keywords one launch carries (`FWL_MAX_KEYWORDS`).
pub const MAX_KEYWORDS: usize = params::FWL_MAX_KEYWORDS as usize;

// SAFETY: bindgen's #[repr(C)] copies of kernels/params.h, plain data (device addresses and
// numbers) that the kernels take by value; their layout is the C layout nvcc uses.
unsafe impl DeviceRepr for FwlPlanParams {}
unsafe impl DeviceRepr for FwlRowParams {}
unsafe impl DeviceRepr for FwlFinishParams {}
unsafe impl DeviceRepr for FwlScaleParams {}
unsafe impl DeviceRepr for FwlNarrowParams {}
unsafe impl DeviceRepr for FwlStatus {}

/// Maps a driver error to [`Error::Cuda`] with what the crate was doing.
fn drv(context: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Cuda { context, message: e.to_string() }
}

/// A device buffer of `n` elements for a kernel output, ordered on `stream` and left
/// uninitialised: every caller passes it to a launch that writes all of it before anything reads
/// it (see each use).
fn output<T: DeviceRepr>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: see above; the memory is only ever read after the kernel that fills it.
    unsafe { stream.alloc::<T>(n) }.map_err(drv("allocating device memory"))
}

mod api;
mod bench;
mod host;
mod launch;
mod module;
mod probe;

pub(crate) use api::cuda_shape_fits as shape_fits;
pub(crate) use api::grad_buffer;
pub use api::{CudaLoss, DeviceInputs, DeviceLossOutput};
pub use bench::{bench_device, bench_device_split, DeviceBench, DeviceSplitBench};
use host::{host_device, Uploaded};
pub(crate) use host::{run_host, run_host_in_place};
use launch::Ptrs;
use module::Module;
pub(crate) use probe::{cublas_status, status};

/// [`Error::ContextMismatch`] unless `stream` belongs to `ctx` (the context whose kernels or
/// communicator would run on it).
pub(crate) fn same_context(ctx: &CudaContext, stream: &Arc<CudaStream>) -> Result<()> {
    match stream.context().cu_ctx() == ctx.cu_ctx() {
        true => Ok(()),
        false => Err(Error::ContextMismatch { expected: ctx.ordinal(), got: stream.context().ordinal() }),
    }
}

/// Whether host calls with [`Backend::Auto`] go to the GPU: a driver, a device, and this crate's
/// kernels loaded on device 0 (a GPU the fatbin has no code for, or a driver too old for it,
/// leaves `Auto` on the CPU instead of failing every call).
pub(crate) fn auto_usable() -> bool {
    host_device().is_ok()
}

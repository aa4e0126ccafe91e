//! The vocabulary- and data-parallel split on device buffers (semantics: [`crate::parallel`]):
//! the steps of [`ShardedLoss`](crate::parallel::ShardedLoss) as kernels queued on the caller's
//! stream, with no host synchronisation, and [`DeviceSharded`], one call over
//! [`DeviceCollective`]s (NCCL: `cuda::nccl`, feature `nccl`).
//!
//! Per chunk of rows: [`CudaSharded::partials`] (the statistics of this rank's columns, `W` f32
//! per row: max, sum of `exp(z − max)`, the raw target logit when the target is in the slice,
//! and with label smoothing the sum of `z − max` and the slice's length), the caller's
//! all-gather in rank order,
//! [`CudaSharded::finish_rows_grad`] (merge in rank order, row losses, the gradient of the
//! slice). The gradient kernel reads the chunk's logits again: a chunk whose logits fit the
//! GPU's L2 cache reads them from there ([`default_device_chunk_rows`]).
//! [`DeviceSharded::linear_loss_and_grad`] runs the same steps inside the fused linear path's
//! chunk loop, on each product's f32 logits of this rank's rows of the output weight.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use fused_weighted_loss::cuda::cudarc::driver::CudaContext;
//! use fused_weighted_loss::cuda::split::{DeviceSharded, DeviceSolo};
//! use fused_weighted_loss::cuda::{CudaLoss, DeviceInputs};
//! use fused_weighted_loss::parallel::VocabSlice;
//! use fused_weighted_loss::{bf16, LossSpec, Shape};
//!
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let (shape, slice) = (Shape::new(8, 1024, 128_256)?, VocabSlice::even(0, 1, 128_256)?);
//! let logits = stream.alloc_zeros::<bf16>(shape.rows() * slice.len())?;
//! let ids = stream.alloc_zeros::<i64>(shape.rows())?;
//! let mut grad = stream.alloc_zeros::<bf16>(shape.rows() * slice.len())?;
//! let ids = ids.as_view();
//! // a group of one; with NCCL: cuda::nccl::NcclGroup (feature `nccl`)
//! let out = DeviceSharded::vocab_parallel(slice, &DeviceSolo).loss_and_grad(
//!     &CudaLoss::new(&ctx)?, &LossSpec::default(), shape, &stream, &logits.as_view(),
//!     &DeviceInputs::new(&ids), &mut grad.as_view_mut())?;
//! println!("loss {}", out.to_host(&stream)?.loss);
//! # Ok(()) }
//! ```

mod call;
mod collective;
mod linear;

pub use call::{default_device_chunk_rows, DeviceSharded};
pub use collective::{DeviceCollective, DeviceSolo};
mod kernels;
mod steps;

pub(in crate::cuda) use kernels::SplitFns;
pub use steps::CudaSharded;

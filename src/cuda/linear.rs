//! The fused linear + weighted loss on CUDA: cuBLAS (`cublasGemmEx`, f32 compute, opened at run
//! time like the driver) for the products, this crate's plan, rows and finish kernels for the
//! loss, all queued on the caller's stream; nothing synchronises with the host (on a device with
//! stream-ordered memory pools, as every GPU of the last decade has; where the driver has none,
//! cudarc frees each scratch buffer after waiting for its stream).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use fused_weighted_loss::cuda::cudarc::driver::CudaContext;
//! use fused_weighted_loss::cuda::linear::{CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs};
//! use fused_weighted_loss::cuda::DeviceInputs;
//! use fused_weighted_loss::{bf16, Chunking, LinearShape, LossSpec};
//!
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let shape = LinearShape::new(8, 1024, 4096, 128_256)?;
//! let hidden = stream.alloc_zeros::<bf16>(shape.hidden_len())?; // the model's last hidden states
//! let weight = stream.alloc_zeros::<bf16>(shape.weight_len())?; // lm_head / tied embedding
//! let ids = stream.alloc_zeros::<i64>(shape.rows())?;
//! let mut d_hidden = stream.alloc_zeros::<bf16>(shape.hidden_len())?;
//! let mut d_weight = stream.alloc_zeros::<f32>(shape.weight_len())?; // f32 accumulation
//!
//! let fused = CudaLinearLoss::new(&ctx)?;
//! let spec = LossSpec::builder().keywords([3, 17]).build()?;
//! let (h, w, i) = (hidden.as_view(), weight.as_view(), ids.as_view());
//! let (mut dh, mut dw) = (d_hidden.as_view_mut(), d_weight.as_view_mut());
//! let grads = DeviceLinearGrads::new().hidden(DeviceGrad::Into(&mut dh)).weight(DeviceGrad::IntoF32(&mut dw));
//! let out = fused.loss_and_grad(&spec, shape, &stream, &DeviceLinearInputs::new(&h, &w), &DeviceInputs::new(&i), grads, Chunking::Auto)?;
//! println!("C = {} rows", out.chunk_rows);
//! let host = out.loss.to_host(&stream)?; // synchronises
//! # Ok(()) }
//! ```
//!
//! **Chunks.** The `N` token rows run in consecutive chunks of `C` rows (the ids are on the
//! device, so rows without a target are not known to the host and go through the products too;
//! the rows kernel gives them a zero gradient). Per chunk: the logits of `C'` rows at a time,
//! `z = h·Wᵀ (+ b)` in f32, which the rows kernel turns into the gradient rows of the chunk; then
//! `d h = G·W`, `d W += Gᵀ·h`, `d b += Σ G`, each one cuBLAS call. For f32 inputs `C' = C` and
//! the gradient is written over the logits; for f16/bf16 inputs the gradient is in the inputs'
//! dtype (the products' operands) and `C' = C/4`, so that `d W`'s update, a read and write of all
//! of `W`'s size per chunk, runs over `C` rows at a time while the f32 logits stay small.
//!
//! **Memory** beyond inputs and gradients: f32 inputs `4·C·V`; 16-bit inputs `2·C·V + 4·C'·V`;
//! plus `12·N` (the plan's targets, i32, and row losses, f64; `20·N` with z-loss, and the tiled
//! schedule's copy of the token weights `4·N` more), `C` elements of ones when a bias is given,
//! and the cuBLAS
//! workspace ([`WORKSPACE_BYTES`], allocated once per [`CudaLinearLoss`]). `C` comes from
//! [`Chunking`]: [`DEFAULT_BUDGET`] bytes of chunk buffers unless set, rounded down to a multiple
//! of 64 rows when it is larger than 64.

use super::{CudaLoss, DeviceInputs, DeviceLossOutput, Ptrs};
use crate::dtype::{DType, Logit, TokenId};
use crate::error::Result;
use crate::linear::{Chunking, LinearShape};
use crate::spec::LossSpec;
use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{CudaContext, CudaStream, CudaView, CudaViewMut, DevicePtrMut, SyncOnDrop};
use std::ops::Range;
use std::sync::{Arc, Mutex};

mod blas;
use blas::{blas_type, Blas};
mod host;
#[cfg(test)]
mod host_product;
mod scale;
mod sweep;
mod tiles;
pub(crate) use host::run_host;
pub use host::{bench_device, DeviceLinearBench, LinearBenchExtras};
pub(in crate::cuda) use scale::scaled_for;
pub(crate) use sweep::linear_shape_fits;
pub(in crate::cuda) use sweep::{check_buffers, Cut};
pub use tiles::LinearSchedule;

/// Default bytes of chunk buffers on CUDA. 160 MiB: on an H200 (2026-12-04), at N = 8192,
/// H = 4096, V = 128256 in bf16, 384-row chunks took 58.5 ms against 79.0 ms for the 256 rows
/// of 96 MiB (its logits products 96 rows each instead of 64), with a peak memory still under
/// Liger-Kernel's fused linear cross-entropy's (2.27 GiB with inputs and gradients); 256 MiB
/// took 48.2 ms at 0.1 GiB more.
pub const DEFAULT_BUDGET: usize = 160 << 20;

/// The cuBLAS workspace each [`CudaLinearLoss`] holds (what cuBLAS recommends on Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Logits rows per gradient row of a chunk for 16-bit inputs (`C' = C / 4`).
const SUB_CHUNKS: usize = 4;

/// Where one gradient goes on the device.
#[derive(Debug)]
pub enum DeviceGrad<'a, 'b, L: Logit> {
    /// Not wanted.
    Skip,
    /// In the inputs' dtype.
    Into(&'a mut CudaViewMut<'b, L>),
    /// In f32.
    IntoF32(&'a mut CudaViewMut<'b, f32>),
}

impl<L: Logit> DeviceGrad<'_, '_, L> {
    fn len(&self) -> Option<usize> {
        match self {
            DeviceGrad::Skip => None,
            DeviceGrad::Into(g) => Some(g.len()),
            DeviceGrad::IntoF32(g) => Some(g.len()),
        }
    }

    /// The device address, cuBLAS type and element size (none when skipped), with the guard
    /// that orders other streams after this call's writes.
    fn target<'s>(&'s mut self, stream: &'s Arc<CudaStream>) -> Option<(u64, cudaDataType_t, usize, SyncOnDrop<'s>)> {
        match self {
            DeviceGrad::Skip => None,
            DeviceGrad::Into(g) => {
                let (p, guard) = g.device_ptr_mut(stream);
                Some((p, blas_type(L::DTYPE), L::DTYPE.size(), guard))
            }
            DeviceGrad::IntoF32(g) => {
                let (p, guard) = g.device_ptr_mut(stream);
                Some((p, blas_type(DType::F32), 4, guard))
            }
        }
    }
}

/// The device inputs: hidden `[N, H]`, weight `[V, H]`, optional bias `[V]`, of one dtype.
#[derive(Debug)]
pub struct DeviceLinearInputs<'a, L: Logit> {
    hidden: &'a CudaView<'a, L>,
    weight: &'a CudaView<'a, L>,
    bias: Option<&'a CudaView<'a, L>>,
}

impl<'a, L: Logit> DeviceLinearInputs<'a, L> {
    /// Hidden states and weight.
    pub fn new(hidden: &'a CudaView<'a, L>, weight: &'a CudaView<'a, L>) -> Self {
        DeviceLinearInputs { hidden, weight, bias: None }
    }
    /// Adds a bias.
    pub fn with_bias(self, bias: &'a CudaView<'a, L>) -> Self {
        DeviceLinearInputs { bias: Some(bias), ..self }
    }
}

/// The device gradients of a call, as [`crate::LinearGrads`] on the host.
#[derive(Debug)]
pub struct DeviceLinearGrads<'a, 'b, L: Logit> {
    hidden: DeviceGrad<'a, 'b, L>,
    pub(in crate::cuda) weight: DeviceGrad<'a, 'b, L>,
    pub(in crate::cuda) bias: DeviceGrad<'a, 'b, L>,
    pub(in crate::cuda) accumulate: bool,
}

impl<L: Logit> Default for DeviceLinearGrads<'_, '_, L> {
    fn default() -> Self {
        DeviceLinearGrads {
            hidden: DeviceGrad::Skip,
            weight: DeviceGrad::Skip,
            bias: DeviceGrad::Skip,
            accumulate: false,
        }
    }
}

impl<'a, 'b, L: Logit> DeviceLinearGrads<'a, 'b, L> {
    /// None (the loss only).
    pub fn new() -> Self {
        Self::default()
    }
    /// `d hidden`, `N·H` elements (overwritten).
    pub fn hidden(self, g: DeviceGrad<'a, 'b, L>) -> Self {
        DeviceLinearGrads { hidden: g, ..self }
    }
    /// `d weight`, `V·H` elements.
    pub fn weight(self, g: DeviceGrad<'a, 'b, L>) -> Self {
        DeviceLinearGrads { weight: g, ..self }
    }
    /// `d bias`, `V` elements (with a bias input only).
    pub fn bias(self, g: DeviceGrad<'a, 'b, L>) -> Self {
        DeviceLinearGrads { bias: g, ..self }
    }
    /// Add into `d weight` and `d bias` instead of overwriting them. A call that fails after
    /// queuing its first products (a launch or driver error, not a refused input: those are
    /// found before any work) may have added part of its sums already: treat both buffers as
    /// undefined then.
    pub fn accumulate(self, on: bool) -> Self {
        DeviceLinearGrads { accumulate: on, ..self }
    }
}

/// What a device call leaves: the loss outputs (on the device) and how it was chunked.
#[derive(Debug)]
pub struct DeviceLinearOutput {
    /// Loss, per-sample losses, weights, row losses, as the logits path gives them.
    pub loss: DeviceLossOutput,
    /// Token rows per chunk (`C`).
    pub chunk_rows: usize,
    /// Rows per logits product (`C'`): `C` for f32 inputs, `C / 4` for 16-bit ones; `R` (the
    /// chunk's rows) for every dtype under [`LinearSchedule::Tiles`].
    pub logits_rows: usize,
    /// Chunks queued.
    pub chunks: usize,
    /// Bytes of chunk buffers allocated by the call (the workspace not included).
    pub scratch_bytes: usize,
    /// Vocabulary columns per block under [`LinearSchedule::Tiles`] (0 under
    /// [`LinearSchedule::Chunks`]).
    pub tile_cols: usize,
}

/// The fused linear loss on one CUDA context: the loss kernels and a cuBLAS handle.
pub struct CudaLinearLoss {
    loss: CudaLoss,
    blas: Mutex<Blas>,
    schedule: LinearSchedule,
}

impl std::fmt::Debug for CudaLinearLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLinearLoss").field("loss", &self.loss).field("schedule", &self.schedule).finish()
    }
}

impl CudaLinearLoss {
    /// Loads (or reuses) the kernels on `ctx` and opens cuBLAS (a handle and its workspace; this
    /// waits once for the workspace allocation). The schedule is
    /// [`LinearSchedule::from_env`]'s.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<CudaLinearLoss> {
        let schedule = LinearSchedule::from_env()?;
        let loss = CudaLoss::new(ctx)?;
        let blas = Blas::open(ctx)?;
        Ok(CudaLinearLoss { loss, blas: Mutex::new(blas), schedule })
    }

    /// This instance with calls of [`loss_and_grad`](Self::loss_and_grad) ordered by `schedule`
    /// (the vocabulary-parallel split keeps its chunks).
    pub fn with_schedule(self, schedule: LinearSchedule) -> Result<CudaLinearLoss> {
        if schedule == (LinearSchedule::Tiles { cols: 0 }) {
            return Err(crate::error::Error::InvalidChunking("0 columns per vocabulary block".into()));
        }
        Ok(CudaLinearLoss { schedule, ..self })
    }

    /// How [`loss_and_grad`](Self::loss_and_grad) orders its work.
    pub fn schedule(&self) -> LinearSchedule {
        self.schedule
    }

    /// The instance of `ctx`, made on first use and kept for the life of the process (its
    /// cuBLAS handle and workspace with it), for callers that run many steps.
    pub fn shared(ctx: &Arc<CudaContext>) -> Result<Arc<CudaLinearLoss>> {
        static CACHE: Mutex<Vec<(usize, Arc<CudaLinearLoss>)>> = Mutex::new(Vec::new());
        let key = ctx.cu_ctx() as usize;
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, l)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(l.clone());
        }
        let l = Arc::new(CudaLinearLoss::new(ctx)?);
        cache.push((key, l.clone()));
        Ok(l)
    }

    /// Loss and the gradients asked for, queued on `stream` (see the [module docs](self)).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: LinearShape,
        stream: &Arc<CudaStream>,
        inputs: &DeviceLinearInputs<'_, L>,
        tokens: &DeviceInputs<'_, I>,
        mut grads: DeviceLinearGrads<'_, '_, L>,
        chunking: Chunking,
    ) -> Result<DeviceLinearOutput> {
        check_buffers(shape, inputs, &grads)?;
        let t = shape.tokens();
        self.loss.validate(spec, t, shape.rows() * shape.vocab(), tokens, None)?;
        if let LinearSchedule::Tiles { cols } = self.schedule {
            return self.tiled(cols, spec, shape, stream, inputs, tokens, &mut grads, chunking);
        }
        let cut = Cut::new::<L>(chunking, shape.vocab(), shape.rows())?;
        let loss = &self.loss;
        // float16 gradient rows scaled by a power of two (the plan's gradient scale), their
        // products by its inverse (`scale.rs`)
        let (scaled_spec, unscale) = scaled_for::<L, I>(spec, t, tokens);
        // the token inputs stay borrowed until the finish is queued: the rows and finish kernels
        // read the token weights through the plan
        loss.with_inputs(stream, tokens, 0, 0, |stream, token_ptrs| {
            let mut planned = loss.launch_plan::<I>(&scaled_spec, t, stream, token_ptrs)?;
            let mut rows_kernel = |rows: Range<usize>, z: u64, g: u64| -> Result<()> {
                let p = Ptrs { logits: z, grad: g, ids: 0, labels: 0, token_weights: 0, scale: 0 };
                let (first, m) = (rows.start, rows.len());
                match L::DTYPE {
                    DType::F32 => loss.launch_rows::<f32, f32>(t, stream, &p, first, m, &mut planned),
                    DType::F16 => loss.launch_rows::<f32, half::f16>(t, stream, &p, first, m, &mut planned),
                    DType::BF16 => loss.launch_rows::<f32, half::bf16>(t, stream, &p, first, m, &mut planned),
                }
            };
            let swept = self.sweep(shape, stream, inputs, &mut grads, cut, unscale, &mut rows_kernel)?;
            Ok(DeviceLinearOutput {
                loss: loss.launch_finish(spec, t, stream, planned)?,
                chunk_rows: cut.c,
                logits_rows: cut.cl,
                chunks: swept.chunks,
                scratch_bytes: swept.scratch_bytes,
                tile_cols: 0,
            })
        })
    }

    /// The loss kernels this instance launches.
    pub(in crate::cuda) fn kernels(&self) -> &CudaLoss {
        &self.loss
    }
}

//! Host buffers through the device path (the host API with `Backend::Cuda`), and the device
//! timing of `bench-linear`.

use super::{CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs};
use crate::cuda::{drv, host_device, Uploaded};
use crate::dtype::{Logit, TokenId};
use crate::error::{Error, Result};
use crate::linear::{Chunking, LinearGrads, LinearInputs, LinearOutput, LinearShape};
use crate::spec::{LossSpec, Tokens};
use crate::Grad;
use cudarc::driver::sys::{CUevent_flags, CUmemPool_attribute, CUmemoryPool};
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut};
use std::ffi::c_void;
use std::sync::Arc;

/// A host gradient's device copy: in `L` or in f32 (or none).
struct DevGrad<L: Logit> {
    l: Option<CudaSlice<L>>,
    f: Option<CudaSlice<f32>>,
}

impl<L: Logit> DevGrad<L> {
    /// A device buffer for `g`, holding its current values when `keep` (accumulation).
    fn new(stream: &Arc<CudaStream>, g: &Grad<'_, L>, keep: bool) -> Result<Self> {
        let up = drv("copying inputs to the device");
        Ok(match g {
            Grad::Skip => DevGrad { l: None, f: None },
            Grad::Into(x) if keep => DevGrad { l: Some(stream.clone_htod(&**x).map_err(up)?), f: None },
            Grad::Into(x) => DevGrad { l: Some(crate::cuda::output::<L>(stream, x.len())?), f: None },
            Grad::IntoF32(x) if keep => DevGrad { l: None, f: Some(stream.clone_htod(&**x).map_err(up)?) },
            Grad::IntoF32(x) => DevGrad { l: None, f: Some(crate::cuda::output::<f32>(stream, x.len())?) },
        })
    }

    /// A new device buffer of `len` elements in `L`, or in f32 when `f32`, or none when `len`
    /// is `None` (values unset: the bench's calls overwrite them).
    fn fresh(stream: &Arc<CudaStream>, len: Option<usize>, f32: bool) -> Result<Self> {
        Ok(match len {
            None => DevGrad { l: None, f: None },
            Some(n) if f32 => DevGrad { l: None, f: Some(crate::cuda::output::<f32>(stream, n)?) },
            Some(n) => DevGrad { l: Some(crate::cuda::output::<L>(stream, n)?), f: None },
        })
    }

    /// Views of whichever buffer is present, for [`device_grad`].
    fn views(&mut self) -> (Option<CudaViewMut<'_, L>>, Option<CudaViewMut<'_, f32>>) {
        (self.l.as_mut().map(|s| s.as_view_mut()), self.f.as_mut().map(|s| s.as_view_mut()))
    }

    /// Copies the device values back into `g`.
    fn download(&self, stream: &Arc<CudaStream>, g: &mut Grad<'_, L>) -> Result<()> {
        let down = drv("copying a gradient to the host");
        match (g, &self.l, &self.f) {
            (Grad::Into(x), Some(d), _) => stream.memcpy_dtoh(d, &mut **x).map_err(down),
            (Grad::IntoF32(x), _, Some(d)) => stream.memcpy_dtoh(d, &mut **x).map_err(down),
            _ => Ok(()),
        }
    }
}

/// The [`DeviceGrad`] of whichever view is present.
fn device_grad<'a, 'b, L: Logit>(
    l: &'a mut Option<CudaViewMut<'b, L>>,
    f: &'a mut Option<CudaViewMut<'b, f32>>,
) -> DeviceGrad<'a, 'b, L> {
    match (l, f) {
        (Some(v), _) => DeviceGrad::Into(v),
        (_, Some(v)) => DeviceGrad::IntoF32(v),
        _ => DeviceGrad::Skip,
    }
}

/// Host slices through the GPU: upload, run, download.
pub(crate) fn run_host<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: LinearShape,
    inputs: LinearInputs<'_, L>,
    tokens: Tokens<'_, I>,
    mut grads: LinearGrads<'_, L>,
    chunking: Chunking,
) -> Result<LinearOutput> {
    let linear = CudaLinearLoss::shared(&host_device()?.0)?;
    let stream = host_device()?.0.default_stream();
    let up = |x: &[L]| stream.clone_htod(x).map_err(drv("copying inputs to the device"));
    let (hidden, weight) = (up(inputs.hidden)?, up(inputs.weight)?);
    let bias = inputs.bias.map(up).transpose()?;
    let mut dh = DevGrad::new(&stream, &grads.hidden, false)?;
    let mut dw = DevGrad::new(&stream, &grads.weight, grads.accumulate)?;
    let mut db = DevGrad::new(&stream, &grads.bias, grads.accumulate)?;
    let out = {
        let (h, w, b) = (hidden.as_view(), weight.as_view(), bias.as_ref().map(|b| b.as_view()));
        let mut inp = DeviceLinearInputs::new(&h, &w);
        if let Some(b) = b.as_ref() {
            inp = inp.with_bias(b);
        }
        let ((mut hl, mut hf), (mut wl, mut wf), (mut bl, mut bf)) = (dh.views(), dw.views(), db.views());
        let g = DeviceLinearGrads::new()
            .hidden(device_grad(&mut hl, &mut hf))
            .weight(device_grad(&mut wl, &mut wf))
            .bias(device_grad(&mut bl, &mut bf))
            .accumulate(grads.accumulate);
        Uploaded::new(&stream, &tokens)?.with(|t| linear.loss_and_grad(spec, shape, &stream, &inp, t, g, chunking))?
    };
    dh.download(&stream, &mut grads.hidden)?;
    dw.download(&stream, &mut grads.weight)?;
    db.download(&stream, &mut grads.bias)?;
    Ok(LinearOutput {
        loss: out.loss.to_host(&stream)?,
        chunk_rows: out.chunk_rows,
        chunks: out.chunks,
        scratch_bytes: out.scratch_bytes,
    })
}

/// Device timings of `bench-linear` (scripts/gpu-check.sh).
#[derive(Debug, Clone)]
pub struct DeviceLinearBench {
    /// The device's name.
    pub device: String,
    /// Milliseconds of each timed call (CUDA events around it).
    pub ms: Vec<f64>,
    /// The loss of the last call.
    pub loss: f64,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Rows per logits product.
    pub logits_rows: usize,
    /// Vocabulary columns per block (0: the chunk schedule; see
    /// [`LinearSchedule`](super::LinearSchedule)).
    pub tile_cols: usize,
    /// Chunks per call.
    pub chunks: usize,
    /// Chunk buffers per call (bytes).
    pub scratch_bytes: usize,
    /// The device memory pool's high-water mark of memory in use over the whole bench: inputs,
    /// gradients, cuBLAS workspace and chunk buffers (`None` where the driver cannot say).
    pub peak_bytes: Option<u64>,
}

/// The device's default memory pool (where this crate's and the bench's buffers come from).
fn default_pool(ordinal: usize) -> Option<CUmemoryPool> {
    let mut pool: CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver queries on an initialised device; `pool` is written by the call.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ordinal as i32) }.result().ok()?;
    Some(pool)
}

/// Sets (or, with `None`, reads) a 64-bit attribute of a memory pool.
fn pool_attr(pool: CUmemoryPool, attr: CUmemPool_attribute, set: Option<u64>) -> Option<u64> {
    let mut v = set.unwrap_or(0);
    let p = &mut v as *mut u64 as *mut c_void;
    // SAFETY: the attributes used here are 64-bit values (cuuint64_t), read from or written to `v`.
    let r = unsafe {
        match set {
            Some(_) => cudarc::driver::sys::cuMemPoolSetAttribute(pool, attr, p),
            None => cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, p),
        }
    };
    r.result().ok().map(|_| v)
}

/// What [`bench_device`] runs besides the loss, `d hidden` and `d weight` in the inputs' dtype.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinearBenchExtras {
    /// A bias `[V]` in the inputs and its gradient `d bias`.
    pub bias: bool,
    /// Every gradient in f32 ([`DeviceGrad::IntoF32`]) whatever the inputs' dtype.
    pub f32_grads: bool,
}

/// Times loss + `d hidden` + `d weight` (in the inputs' dtype, or as `extras` asks, with a bias
/// and `d bias`) on random device data, after `warmup` untimed calls; the memory pool keeps
/// freed memory (as frameworks' caching allocators do) and its high-water mark is the peak.
pub fn bench_device<L: Logit>(
    spec: &LossSpec,
    shape: LinearShape,
    chunking: Chunking,
    extras: LinearBenchExtras,
    warmup: usize,
    iters: usize,
) -> Result<DeviceLinearBench> {
    shape.tokens().require_samples()?;
    let ctx = &host_device()?.0;
    let linear = CudaLinearLoss::new(ctx)?;
    let stream = ctx.default_stream();
    let pool = default_pool(ctx.ordinal());
    if let Some(pool) = pool {
        pool_attr(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX));
        pool_attr(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0));
    }
    let copy = || drv("copying inputs to the device");
    let hidden = stream.clone_htod(&crate::synthetic::logits::<L>(1, shape.hidden_len(), 1.0)).map_err(copy())?;
    let w_scale = 3.0 / (shape.hidden() as f32).sqrt();
    let weight = stream.clone_htod(&crate::synthetic::logits::<L>(2, shape.weight_len(), w_scale)).map_err(copy())?;
    let ids = stream.clone_htod(&crate::synthetic::ids::<i64>(3, shape.rows(), shape.vocab())).map_err(copy())?;
    let bias = match extras.bias {
        true => Some(stream.clone_htod(&crate::synthetic::logits::<L>(4, shape.vocab(), 0.5)).map_err(copy())?),
        false => None,
    };
    let f32_grads = extras.f32_grads;
    let mut dh = DevGrad::<L>::fresh(&stream, Some(shape.hidden_len()), f32_grads)?;
    let mut dw = DevGrad::<L>::fresh(&stream, Some(shape.weight_len()), f32_grads)?;
    let mut db = DevGrad::<L>::fresh(&stream, extras.bias.then_some(shape.vocab()), f32_grads)?;
    let (h, w, i) = (hidden.as_view(), weight.as_view(), ids.as_view());
    let b = bias.as_ref().map(|b| b.as_view());
    let mut inputs = DeviceLinearInputs::new(&h, &w);
    if let Some(b) = b.as_ref() {
        inputs = inputs.with_bias(b);
    }
    let tokens = crate::cuda::DeviceInputs::new(&i);
    let event = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("recording an event"));
    let (mut ms, mut last) = (Vec::new(), None);
    for k in 0..warmup.saturating_add(iters) {
        let ((mut hl, mut hf), (mut wl, mut wf), (mut bl, mut bf)) = (dh.views(), dw.views(), db.views());
        let grads = DeviceLinearGrads::new()
            .hidden(device_grad(&mut hl, &mut hf))
            .weight(device_grad(&mut wl, &mut wf))
            .bias(device_grad(&mut bl, &mut bf));
        let a = event()?;
        let out = linear.loss_and_grad(spec, shape, &stream, &inputs, &tokens, grads, chunking)?;
        let b = event()?;
        if k >= warmup {
            ms.push(a.elapsed_ms(&b).map_err(drv("timing"))? as f64);
        }
        last = Some(out);
    }
    let Some(out) = last else {
        return Err(Error::Unsupported("bench needs at least one iteration".into()));
    };
    let loss = out.loss.to_host(&stream)?.loss;
    let peak_bytes = pool.and_then(|p| pool_attr(p, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None));
    Ok(DeviceLinearBench {
        device: ctx.name().map_err(drv("querying the device"))?,
        ms,
        loss,
        chunk_rows: out.chunk_rows,
        logits_rows: out.logits_rows,
        tile_cols: out.tile_cols,
        chunks: out.chunks,
        scratch_bytes: out.scratch_bytes,
        peak_bytes,
    })
}

//! Device timings for the CLI's `bench --backend cuda` and `bench-split --backend cuda`, and
//! scripts/gpu-check.sh.

use super::*;

/// Device timings of one shape (CLI `bench --backend cuda`, scripts/gpu-check.sh).
#[derive(Debug, Clone)]
pub struct DeviceBench {
    /// The device's name.
    pub device: String,
    /// Milliseconds of each timed fused call (CUDA events around the three launches).
    pub fused_ms: Vec<f64>,
    /// Milliseconds of each timed device-to-device copy of the same bytes (the copy floor).
    pub copy_ms: Vec<f64>,
    /// The loss of the last call (a sanity value).
    pub loss: f64,
    /// The rows kernel's launch: threads per block, resident blocks per multiprocessor, loads in
    /// flight per thread (the lean kernels of the loss options take one whatever it says), 1
    /// where the lean kernels are on (0 off), 1 where the lean plain kernels take L2 eviction
    /// hints (0 off) and 1 where they prefetch (0 off; see the `FWL_CUDA_*` tuning knobs in the
    /// README).
    pub row_launch: [u32; 6],
}

/// A bench's device and data: random logits of `shape` (seed 1, scale 4) and ids (seed 2) on a
/// new stream of the host's device, and a gradient buffer of the logits' dtype.
struct Data<L: Logit> {
    ctx: &'static Arc<CudaContext>,
    loss: &'static CudaLoss,
    stream: Arc<CudaStream>,
    logits: CudaSlice<L>,
    ids: CudaSlice<i64>,
    grad: CudaSlice<L>,
}

impl<L: Logit> Data<L> {
    fn new(shape: Shape) -> Result<Self> {
        shape.require_samples()?;
        let (ctx, loss) = host_device()?;
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let logits: Vec<L> = crate::synthetic::logits(1, shape.logits_len(), 4.0);
        let ids: Vec<i64> = crate::synthetic::ids(2, shape.rows(), shape.vocab());
        let d_logits = stream.clone_htod(&logits).map_err(drv("copying inputs to the device"))?;
        drop(logits);
        let d_ids = stream.clone_htod(&ids).map_err(drv("copying inputs to the device"))?;
        let grad = grad_buffer::<L>(&stream, shape.logits_len())?;
        Ok(Data { ctx, loss, stream, logits: d_logits, ids: d_ids, grad })
    }
}

/// Times loss + gradient (into the logits' dtype) on random device data of `shape`, alternating
/// with a device copy of the same byte count, after `warmup` untimed rounds; with random
/// per-token weights in `[0.5, 1.5)` when `token_weights`.
pub fn bench_device<L: Logit>(
    spec: &LossSpec,
    shape: Shape,
    warmup: usize,
    iters: usize,
    token_weights: bool,
) -> Result<DeviceBench> {
    let Data { ctx, loss, stream, logits: d_logits, ids: d_ids, grad: mut d_grad } = Data::<L>::new(shape)?;
    // the copy floor moves the same bytes: logits read once, gradient written once
    let mut copy_dst = grad_buffer::<L>(&stream, shape.logits_len())?;
    let weights: Vec<f32> = crate::synthetic::logits::<f32>(3, shape.rows(), 0.5).iter().map(|w| w + 1.0).collect();
    let d_weights = stream.clone_htod(&weights).map_err(drv("copying inputs to the device"))?;
    let (ids_view, weights_view) = (d_ids.as_view(), d_weights.as_view());
    let mut inputs = DeviceInputs::new(&ids_view);
    if token_weights {
        inputs = inputs.with_token_weights(&weights_view);
    }
    let timed = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("recording an event"));
    let (mut fused_ms, mut copy_ms, mut last) = (Vec::new(), Vec::new(), None);
    for i in 0..warmup.saturating_add(iters) {
        let a = timed()?;
        let out = loss.loss_and_grad(spec, shape, &stream, &d_logits.as_view(), &inputs, &mut d_grad.as_view_mut())?;
        let b = timed()?;
        stream.memcpy_dtod(&d_logits, &mut copy_dst).map_err(drv("copying on the device"))?;
        let c = timed()?;
        if i >= warmup {
            fused_ms.push(a.elapsed_ms(&b).map_err(drv("timing"))? as f64);
            copy_ms.push(b.elapsed_ms(&c).map_err(drv("timing"))? as f64);
        }
        last = Some(out);
    }
    let host = match last {
        Some(out) => out.to_host(&stream)?,
        None => return Err(Error::Unsupported("bench needs at least one iteration".into())),
    };
    let l = loss.module.launch;
    Ok(DeviceBench {
        device: ctx.name().map_err(drv("querying the device"))?,
        fused_ms,
        copy_ms,
        loss: host.loss,
        row_launch: [l.threads, l.blocks_per_sm, l.unroll, l.lean as u32, l.hints as u32, l.prefetch as u32],
    })
}

/// Device timings of one rank's slice (CLI `bench-split --backend cuda`, scripts/gpu-check.sh).
#[derive(Debug, Clone)]
pub struct DeviceSplitBench {
    /// The device's name.
    pub device: String,
    /// Milliseconds of each timed one-device call on the slice (CUDA events around it).
    pub single_ms: Vec<f64>,
    /// Milliseconds of each timed call through the split's kernels, chunk by chunk, on the same
    /// logits (a group of one: no exchange), alternating with the one-device calls.
    pub split_ms: Vec<f64>,
    /// Rows per chunk of the split.
    pub chunk_rows: usize,
    /// The loss of the last one-device and split calls (they must agree).
    pub loss: [f64; 2],
}

/// Times one rank's kernels of a vocabulary-parallel split: `shape` is the rank's `[B, T, V_r]`
/// (its slice of the vocabulary, ids within it), through the split's statistics and gradient
/// kernels chunk by chunk (`chunk_rows`, default the split's for this slice) against the
/// one-device pass on the same device logits, alternately, after `warmup` untimed rounds of
/// each. Loss and gradient into the logits' dtype.
pub fn bench_device_split<L: Logit>(
    spec: &LossSpec,
    shape: Shape,
    chunk_rows: Option<usize>,
    warmup: usize,
    iters: usize,
) -> Result<DeviceSplitBench> {
    let Data { ctx, loss, stream, logits: d_logits, ids: d_ids, grad: mut d_grad } = Data::<L>::new(shape)?;
    let ids_view = d_ids.as_view();
    let inputs = DeviceInputs::new(&ids_view);
    let chunk = chunk_rows.unwrap_or_else(|| split::default_device_chunk_rows(shape.vocab(), 1, L::DTYPE));
    let slice = crate::parallel::VocabSlice::full(shape.vocab())?;
    let sharded =
        split::DeviceSharded::vocab_parallel(slice, &split::DeviceSolo).with_split_steps().with_chunk_rows(chunk);
    let timed = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("recording an event"));
    let (mut single_ms, mut split_ms, mut last) = (Vec::new(), Vec::new(), None);
    for i in 0..warmup.saturating_add(iters) {
        let a = timed()?;
        let one = loss.loss_and_grad(spec, shape, &stream, &d_logits.as_view(), &inputs, &mut d_grad.as_view_mut())?;
        let b = timed()?;
        let two = sharded.loss_and_grad(
            loss,
            spec,
            shape,
            &stream,
            &d_logits.as_view(),
            &inputs,
            &mut d_grad.as_view_mut(),
        )?;
        let c = timed()?;
        if i >= warmup {
            single_ms.push(a.elapsed_ms(&b).map_err(drv("timing"))? as f64);
            split_ms.push(b.elapsed_ms(&c).map_err(drv("timing"))? as f64);
        }
        last = Some((one, two));
    }
    let Some((one, two)) = last else {
        return Err(Error::Unsupported("bench-split needs at least one iteration".into()));
    };
    let (one, two) = (one.to_host(&stream)?, two.to_host(&stream)?);
    Ok(DeviceSplitBench {
        device: ctx.name().map_err(drv("querying the device"))?,
        single_ms,
        split_ms,
        chunk_rows: chunk,
        loss: [one.loss, two.loss],
    })
}

//! Device timings for the CLI's `bench --backend cuda` and scripts/gpu-check.sh.

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
    shape.require_samples()?;
    let (ctx, loss) = host_device()?;
    let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
    let logits: Vec<L> = crate::synthetic::logits(1, shape.logits_len(), 4.0);
    let ids: Vec<i64> = crate::synthetic::ids(2, shape.rows(), shape.vocab());
    let d_logits = stream.clone_htod(&logits).map_err(drv("copying inputs to the device"))?;
    drop(logits);
    let d_ids = stream.clone_htod(&ids).map_err(drv("copying inputs to the device"))?;
    let mut d_grad = grad_buffer::<L>(&stream, shape.logits_len())?;
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

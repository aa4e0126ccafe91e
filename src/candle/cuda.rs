//! The CUDA half: this crate's kernels on candle's device and stream.
use super::*;
use crate::cuda::cudarc::driver::{CudaSlice, CudaView};
use crate::cuda::{grad_buffer, CudaLoss, DeviceInputs};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Storage};

/// A gradient on the device, with what it takes to become a tensor.
pub(super) struct DeviceGrad {
    pub(super) slice: GradSlice,
    pub(super) device: CudaDevice,
    pub(super) loss: CudaLoss,
    pub(super) dims: candle_core::Shape,
}

pub(super) enum GradSlice {
    F32(CudaSlice<f32>),
    F16(CudaSlice<half::f16>),
    BF16(CudaSlice<half::bf16>),
    /// The float32 gradient of float16 inputs, cast to float16 after the scaling.
    F16Wide(CudaSlice<f32>),
    /// The float32 gradient of bfloat16 inputs (the fused linear op's `d weight` and `d bias`),
    /// cast to bfloat16 after the scaling.
    Bf16Wide(CudaSlice<f32>),
}

impl DeviceGrad {
    /// Scales by the upstream gradient (a device scalar; no work when it is 1) and wraps the
    /// buffer as a tensor without copying it.
    pub(super) fn into_tensor(self, grad_res: &Tensor) -> candle_core::Result<Tensor> {
        let stream = self.device.cuda_stream();
        let scale = grad_res.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let (st, layout) = scale.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(candle_core::Error::msg("weighted_loss: the upstream gradient is not on the GPU"));
        };
        let s = cs.as_cuda_slice::<f32>()?;
        let s = s.slice(layout.start_offset()..layout.start_offset() + 1);
        let narrow = match self.slice {
            GradSlice::F16Wide(_) => Some(candle_core::DType::F16),
            GradSlice::Bf16Wide(_) => Some(candle_core::DType::BF16),
            _ => None,
        };
        let storage = match self.slice {
            GradSlice::F32(mut g) | GradSlice::F16Wide(mut g) | GradSlice::Bf16Wide(mut g) => {
                self.loss.scale_by_device_scalar(&stream, &mut g.as_view_mut(), &s).map_err(wrap)?;
                CudaStorage::wrap_cuda_slice(g, self.device.clone())
            }
            GradSlice::F16(mut g) => {
                self.loss.scale_by_device_scalar(&stream, &mut g.as_view_mut(), &s).map_err(wrap)?;
                CudaStorage::wrap_cuda_slice(g, self.device.clone())
            }
            GradSlice::BF16(mut g) => {
                self.loss.scale_by_device_scalar(&stream, &mut g.as_view_mut(), &s).map_err(wrap)?;
                CudaStorage::wrap_cuda_slice(g, self.device.clone())
            }
        };
        drop(st);
        let t = Tensor::from_storage(Storage::Cuda(storage), self.dims, BackpropOp::none(), false);
        match narrow {
            Some(dtype) => t.to_dtype(dtype),
            None => Ok(t),
        }
    }
}

pub(super) fn view<'a, T>(s: &'a CudaSlice<T>, layout: &Layout, what: &str) -> candle_core::Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((a, b)) if b <= s.len() => Ok(s.slice(a..b)),
        _ => Err(candle_core::Error::msg(format!("fused-weighted-loss op: {what} must be contiguous"))),
    }
}

/// `G`: the kept gradient's dtype (the logits', or f32 for f16 logits).
fn run<L: Logit, G: Logit, I: TokenId>(
    op: &WeightedLossOp,
    dev: &CudaDevice,
    logits: &CudaView<'_, L>,
    ids: &CudaView<'_, I>,
    labels: Option<&CudaView<'_, I>>,
    keep: impl FnOnce(CudaSlice<G>) -> GradSlice,
) -> candle_core::Result<CudaStorage> {
    let stream = dev.cuda_stream();
    // kept loaded across steps: a new instance per forward reloaded the module whenever the
    // last step's had been dropped
    let loss = CudaLoss::shared(stream.context()).map_err(wrap)?;
    let mut inputs = DeviceInputs::new(ids);
    if let Some(l) = labels {
        inputs = inputs.with_labels(l);
    }
    let weights = op.token_weights.as_ref().map(|w| w.storage_and_layout());
    let weights_view = match weights.as_ref() {
        Some((st, layout)) => match &**st {
            Storage::Cuda(CudaStorage { slice: CudaStorageSlice::F32(w), .. }) => {
                Some(view(w, layout, "token_weights")?)
            }
            _ => return Err(candle_core::Error::msg("weighted_loss: token_weights must be f32 on the GPU")),
        },
        None => None,
    };
    if let Some(w) = weights_view.as_ref() {
        inputs = inputs.with_token_weights(w);
    }
    let out = if op.want_grad {
        let mut g = grad_buffer::<G>(&stream, op.shape.logits_len()).map_err(wrap)?;
        let out =
            loss.loss_and_grad(&op.spec, op.shape, &stream, logits, &inputs, &mut g.as_view_mut()).map_err(wrap)?;
        let dims = (op.shape.batch(), op.shape.seq(), op.shape.vocab()).into();
        *op.stash.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Stash::Cuda(DeviceGrad { slice: keep(g), device: dev.clone(), loss, dims }));
        out
    } else {
        loss.loss(&op.spec, op.shape, &stream, logits, &inputs).map_err(wrap)?
    };
    Ok(CudaStorage::wrap_cuda_slice(out.loss_f32, dev.clone()))
}

pub(super) fn forward(
    op: &WeightedLossOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
    let dev = s1.device();
    macro_rules! with_ids {
        ($logits:expr, $keep:expr) => {
            match (&s2.slice, s3.map(|(s, l)| (&s.slice, l))) {
                (CudaStorageSlice::U32(i), None) => run(op, dev, &$logits, &view(i, l2, "ids")?, None, $keep),
                (CudaStorageSlice::I64(i), None) => run(op, dev, &$logits, &view(i, l2, "ids")?, None, $keep),
                (CudaStorageSlice::I32(i), None) => run(op, dev, &$logits, &view(i, l2, "ids")?, None, $keep),
                (CudaStorageSlice::U32(i), Some((CudaStorageSlice::U32(y), l3))) => {
                    run(op, dev, &$logits, &view(i, l2, "ids")?, Some(&view(y, l3, "labels")?), $keep)
                }
                (CudaStorageSlice::I64(i), Some((CudaStorageSlice::I64(y), l3))) => {
                    run(op, dev, &$logits, &view(i, l2, "ids")?, Some(&view(y, l3, "labels")?), $keep)
                }
                (CudaStorageSlice::I32(i), Some((CudaStorageSlice::I32(y), l3))) => {
                    run(op, dev, &$logits, &view(i, l2, "ids")?, Some(&view(y, l3, "labels")?), $keep)
                }
                _ => Err(candle_core::Error::msg("weighted_loss: ids and labels must be u32, i64 or i32, alike")),
            }
        };
    }
    let storage = match &s1.slice {
        CudaStorageSlice::F32(v) => with_ids!(view(v, l1, "logits")?, GradSlice::F32),
        CudaStorageSlice::F16(v) => with_ids!(view(v, l1, "logits")?, GradSlice::F16Wide),
        CudaStorageSlice::BF16(v) => with_ids!(view(v, l1, "logits")?, GradSlice::BF16),
        _ => Err(candle_core::Error::msg(format!(
            "weighted_loss: logits must be f32, f16 or bf16, got {:?}",
            s1.dtype()
        ))),
    }?;
    Ok((storage, candle_core::Shape::from(())))
}

//! [`weighted_linear_loss`]: the fused linear + weighted loss as a candle custom op, with a
//! backward for the hidden states, the weight and the bias.

use super::contiguous;
use crate::dtype::Logit;
use crate::linear::{Chunking, LinearGrads, LinearInputs, LinearShape};
use crate::{Backend, Grad, LossSpec, Tokens};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Storage, Tensor};
use std::sync::Mutex;

/// The keyword-weighted loss of the logits `hidden·weightᵀ (+ bias)` for `ids` `[B, T]` (and
/// optional `labels`), without building the logits, as an f32 scalar tensor whose backward gives
/// the gradients of `hidden` (`[B, T, H]` or `[B·T, H]`), `weight` (`[V, H]`, an `lm_head` or a
/// tied embedding) and `bias` (`[V]`).
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
/// use fused_weighted_loss::{candle::weighted_linear_loss, LossSpec};
///
/// let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu)?)?;
/// let weight = Var::from_tensor(&Tensor::randn(0f32, 0.3, (11, 8), &Device::Cpu)?)?;
/// let ids = Tensor::new(&[[1u32, 4, 4, 0, 9], [2, 3, 4, 5, 6]], &Device::Cpu)?;
/// let spec = LossSpec::builder().keywords([4]).build().map_err(candle_core::Error::wrap)?;
///
/// let loss = weighted_linear_loss(hidden.as_tensor(), weight.as_tensor(), None, &ids, None, &spec)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&hidden).expect("d hidden").dims(), &[2, 5, 8]);
/// assert_eq!(grads.get(&weight).expect("d weight").dims(), &[11, 8]);
/// # Ok(()) }
/// ```
///
/// Like [`weighted_loss`](super::weighted_loss), the forward computes the loss and the gradients
/// of whichever inputs track gradients in one chunked sweep (the CPU backend on CPU tensors, the
/// CUDA one on candle's device and stream) and keeps them for the backward, which only scales them
/// by the upstream gradient when that is not 1. Memory between forward and backward: those
/// gradients, `B·T·H + V·H (+ V)` elements of the inputs' dtype (f16 inputs: f32; bf16 inputs:
/// `d weight` and `d bias` in f32, which add up a product per chunk of rows and are rounded to
/// bf16 once, in the backward); the logits never exist.
/// Inputs f32, f16 or bf16 (all alike), ids and labels u32, i64 or i32 (on the inputs' device),
/// any layout (strided views are copied first, as by the loss op).
pub fn weighted_linear_loss(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    ids: &Tensor,
    labels: Option<&Tensor>,
    spec: &LossSpec,
) -> candle_core::Result<Tensor> {
    let err = |m: String| candle_core::Error::msg(format!("weighted_linear_loss: {m}"));
    let (b, t) = ids.dims2()?;
    let (v, h) = weight.dims2()?;
    let hidden_ok = match hidden.dims() {
        [n, hh] => *n == b * t && *hh == h,
        [bb, tt, hh] => *bb == b && *tt == t && *hh == h,
        _ => false,
    };
    if !hidden_ok {
        return Err(err(format!("hidden {:?} does not match ids [{b}, {t}] and weight [{v}, {h}]", hidden.dims())));
    }
    if let Some(bias) = bias {
        if bias.dims() != [v] {
            return Err(err(format!("bias has shape {:?}, expected [{v}]", bias.dims())));
        }
    }
    if let Some(l) = labels {
        if l.dims() != [b, t] {
            return Err(err(format!("labels have shape {:?}, expected [{b}, {t}]", l.dims())));
        }
    }
    // ids and labels: integers (a float id was truncated), on the hidden states' device (the op
    // holds them, so candle's own check does not see them)
    for (what, x) in [("ids", Some(ids)), ("labels", labels)] {
        let Some(x) = x else { continue };
        if !matches!(x.dtype(), DType::U32 | DType::I64 | DType::I32) {
            return Err(err(format!("{what} must be u32, i64 or i32, got {:?}", x.dtype())));
        }
        if !x.device().same_device(hidden.device()) {
            return Err(err(format!("{what} must be on the hidden states' device")));
        }
    }
    let shape = LinearShape::new(b, t, h, v).map_err(super::wrap)?;
    super::refuse_grad_scale(spec, "weighted_linear_loss")?;
    // token ids as contiguous i64 (a device op on CUDA, no copy to the host)
    let as_i64 = |x: &Tensor| x.to_dtype(DType::I64).and_then(|x| x.contiguous());
    let op = LinearOp {
        spec: spec.clone(),
        shape,
        ids: as_i64(ids)?,
        labels: labels.map(as_i64).transpose()?,
        want: [hidden.track_op(), weight.track_op(), bias.is_some_and(|b| b.track_op())],
        dims: [hidden.shape().clone(), weight.shape().clone(), candle_core::Shape::from(v)],
        stash: Mutex::new(None),
    };
    // strided views copied (see the loss op); contiguous tensors are taken as they are
    let (hidden, weight) = (hidden.contiguous()?, weight.contiguous()?);
    match bias {
        Some(bias) => hidden.apply_op3(&weight, &bias.contiguous()?, op),
        None => hidden.apply_op2(&weight, op),
    }
}

/// The custom op of one call, holding the gradients between forward and backward.
struct LinearOp {
    spec: LossSpec,
    shape: LinearShape,
    ids: Tensor,
    labels: Option<Tensor>,
    /// Which of hidden, weight, bias want a gradient.
    want: [bool; 3],
    /// Their dims.
    dims: [candle_core::Shape; 3],
    stash: Mutex<Option<Vec<Option<Stashed>>>>,
}

/// One gradient kept for the backward.
enum Stashed {
    Cpu(Tensor),
    /// A float32 gradient of float16 inputs (see the `candle` module docs).
    /// Float32, rounded to this dtype in the backward.
    CpuWide(Tensor, candle_core::DType),
    #[cfg(feature = "candle-cuda")]
    Cuda(super::cuda::DeviceGrad),
}

/// A CPU tensor's i64 elements.
fn cpu_i64<R>(t: &Tensor, f: impl FnOnce(&[i64]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (st, layout) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(CpuStorage::I64(v)) => f(contiguous(v, layout, "ids")?),
        _ => Err(candle_core::Error::msg("weighted_linear_loss: ids must be on the CPU with the other inputs")),
    }
}

/// One gradient's buffer on the CPU: the inputs' dtype, or f32 for f16 inputs.
enum Buf<L> {
    Same(Vec<L>),
    Wide(Vec<f32>),
}

/// A gradient into `b` when there is one.
fn grad_of<L: Logit>(b: &mut Option<Buf<L>>) -> Grad<'_, L> {
    match b {
        None => Grad::Skip,
        Some(Buf::Same(x)) => Grad::Into(x),
        Some(Buf::Wide(x)) => Grad::IntoF32(x),
    }
}

/// Whether gradient `i` (0: `d hidden`, 1: `d weight`, 2: `d bias`) of `L` inputs is kept in
/// float32 until the backward rounds it once: every one of f16 inputs (whose range a loss scale
/// can leave), and of bf16 inputs `d weight` and `d bias`, which add up one product per chunk of
/// rows (rounded to bf16 after each, the bias gradient of 42 chunks came out 2.6e-2 off).
fn wide<L: Logit>(i: usize) -> bool {
    match L::DTYPE {
        crate::DType::F16 => true,
        crate::DType::BF16 => i > 0,
        _ => false,
    }
}

impl LinearOp {
    fn cpu_typed<L: Logit + candle_core::WithDType>(
        &self,
        hidden: &[L],
        weight: &[L],
        bias: Option<&[L]>,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let spec = self.spec.to_builder().backend(Backend::Cpu).build().map_err(super::wrap)?;
        let s = self.shape;
        let lens = [s.hidden_len(), s.weight_len(), s.vocab()];
        let buf = |i: usize| {
            let n = lens[i];
            if wide::<L>(i) {
                Buf::Wide(f32::zeroed(n))
            } else {
                Buf::Same(L::zeroed(n))
            }
        };
        let mut bufs: Vec<Option<Buf<L>>> = (0..3).map(|i| self.want[i].then(|| buf(i))).collect();
        let out = cpu_i64(&self.ids, |ids| {
            let run = |labels: Option<&[i64]>, bufs: &mut [Option<Buf<L>>]| {
                let tokens = match labels {
                    Some(l) => Tokens::new(ids).with_labels(l),
                    None => Tokens::new(ids),
                };
                let [dh, dw, db] = bufs else { unreachable!("three gradient slots") };
                let grads = LinearGrads::new().hidden(grad_of(dh)).weight(grad_of(dw)).bias(grad_of(db));
                let mut inputs = LinearInputs::new(hidden, weight);
                if let Some(b) = bias {
                    inputs = inputs.with_bias(b);
                }
                spec.linear_loss_and_grad(s, inputs, tokens, grads, Chunking::Auto).map_err(super::wrap)
            };
            match &self.labels {
                Some(l) => cpu_i64(l, |l| run(Some(l), &mut bufs)),
                None => run(None, &mut bufs),
            }
        })?;
        let mut stash = Vec::new();
        for (buf, dims) in bufs.into_iter().zip(&self.dims) {
            stash.push(match buf {
                Some(Buf::Same(b)) => Some(Stashed::Cpu(Tensor::from_vec(b, dims.clone(), &Device::Cpu)?)),
                Some(Buf::Wide(b)) => Some(Stashed::CpuWide(
                    Tensor::from_vec(b, dims.clone(), &Device::Cpu)?,
                    <L as candle_core::WithDType>::DTYPE,
                )),
                None => None,
            });
        }
        *self.stash.lock().unwrap_or_else(|e| e.into_inner()) = Some(stash);
        Ok((CpuStorage::F32(vec![out.loss.loss as f32]), candle_core::Shape::from(())))
    }

    fn cpu(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        macro_rules! typed {
            ($v:ident) => {
                match (s1, s2, s3) {
                    (CpuStorage::$v(h), CpuStorage::$v(w), None) => {
                        self.cpu_typed(contiguous(h, l1, "hidden")?, contiguous(w, l2, "weight")?, None)
                    }
                    (CpuStorage::$v(h), CpuStorage::$v(w), Some((CpuStorage::$v(b), l3))) => self.cpu_typed(
                        contiguous(h, l1, "hidden")?,
                        contiguous(w, l2, "weight")?,
                        Some(contiguous(b, l3, "bias")?),
                    ),
                    _ => {
                        Err(candle_core::Error::msg("weighted_linear_loss: hidden, weight and bias must share a dtype"))
                    }
                }
            };
        }
        match s1 {
            CpuStorage::F32(_) => typed!(F32),
            CpuStorage::F16(_) => typed!(F16),
            CpuStorage::BF16(_) => typed!(BF16),
            other => Err(candle_core::Error::msg(format!(
                "weighted_linear_loss: hidden must be f32, f16 or bf16, got {:?}",
                other.dtype()
            ))),
        }
    }

    /// The kept gradients of hidden, weight and bias, scaled by the upstream gradient.
    fn grads(&self, grad_res: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        let stash = self.stash.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| {
            candle_core::Error::msg("weighted_linear_loss: no gradients kept (the backward already ran)")
        })?;
        // the upstream gradient, read once from its tensor at the first kept host gradient
        let mut scale = None;
        let mut upstream = || -> candle_core::Result<f64> {
            match scale {
                Some(s) => Ok(s),
                None => Ok(*scale.insert(super::upstream(grad_res)?)),
            }
        };
        let grads: Vec<Option<Tensor>> = stash
            .into_iter()
            .map(|g| match g {
                None => Ok(None),
                Some(Stashed::Cpu(t)) => super::scale_kept(t, upstream()?).map(Some),
                Some(Stashed::CpuWide(t, to)) => super::narrow_wide(&t, upstream()?, to).map(Some),
                #[cfg(feature = "candle-cuda")]
                Some(Stashed::Cuda(g)) => g.into_tensor(grad_res).map(Some),
            })
            .collect::<candle_core::Result<_>>()?;
        let mut g = grads.into_iter();
        Ok([g.next().flatten(), g.next().flatten(), g.next().flatten()])
    }
}

custom_ops!(LinearOp, "fused-weighted-linear-loss", cuda::forward);

#[cfg(feature = "candle-cuda")]
mod cuda {
    //! The CUDA half: cuBLAS and this crate's kernels on candle's device and stream.
    use super::*;
    use crate::candle::cuda::{view, DeviceGrad, GradSlice};
    use crate::cuda::cudarc::driver::{CudaSlice, CudaView};
    use crate::cuda::linear::{CudaLinearLoss, DeviceGrad as DevGrad, DeviceLinearGrads, DeviceLinearInputs};
    use crate::cuda::{CudaLoss, DeviceInputs};
    use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
    use candle_core::CudaStorage;

    /// Runs `f` with a CUDA tensor's i64 elements.
    fn with_i64<R>(t: &Tensor, f: impl FnOnce(&CudaView<'_, i64>) -> candle_core::Result<R>) -> candle_core::Result<R> {
        let (st, layout) = t.storage_and_layout();
        match &*st {
            Storage::Cuda(cs) => f(&view(cs.as_cuda_slice::<i64>()?, layout, "ids")?),
            _ => Err(candle_core::Error::msg("weighted_linear_loss: ids must be on the GPU with the other inputs")),
        }
    }

    /// One gradient's buffer on the device: the inputs' dtype, or f32 for f16 inputs.
    enum DevBuf<L> {
        Same(CudaSlice<L>),
        Wide(CudaSlice<f32>),
    }

    fn run<L: Logit>(
        op: &LinearOp,
        dev: &CudaDevice,
        h: &CudaView<'_, L>,
        w: &CudaView<'_, L>,
        b: Option<&CudaView<'_, L>>,
        keep: fn(CudaSlice<L>) -> GradSlice,
    ) -> candle_core::Result<CudaStorage> {
        let stream = dev.cuda_stream();
        let linear = CudaLinearLoss::shared(stream.context()).map_err(super::super::wrap)?;
        let s = op.shape;
        let lens = [s.hidden_len(), s.weight_len(), s.vocab()];
        let mut bufs = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            bufs.push(match (op.want[i], super::wide::<L>(i)) {
                (false, _) => None,
                (true, false) => {
                    Some(DevBuf::Same(crate::cuda::grad_buffer::<L>(&stream, len).map_err(super::super::wrap)?))
                }
                (true, true) => {
                    Some(DevBuf::Wide(crate::cuda::grad_buffer::<f32>(&stream, len).map_err(super::super::wrap)?))
                }
            });
        }
        let out = with_i64(&op.ids, |ids| {
            let mut call = |labels: Option<&CudaView<'_, i64>>| {
                let mut tokens = DeviceInputs::new(ids);
                if let Some(l) = labels {
                    tokens = tokens.with_labels(l);
                }
                let mut inputs = DeviceLinearInputs::new(h, w);
                if let Some(b) = b {
                    inputs = inputs.with_bias(b);
                }
                let mut views: Vec<_> = bufs
                    .iter_mut()
                    .map(|b| match b {
                        None => (None, None),
                        Some(DevBuf::Same(b)) => (Some(b.as_view_mut()), None),
                        Some(DevBuf::Wide(b)) => (None, Some(b.as_view_mut())),
                    })
                    .collect();
                let mut it = views.iter_mut().map(|v| match v {
                    (Some(g), _) => DevGrad::Into(g),
                    (None, Some(g)) => DevGrad::IntoF32(g),
                    (None, None) => DevGrad::Skip,
                });
                let (gh, gw, gb) = (
                    it.next().unwrap_or(DevGrad::Skip),
                    it.next().unwrap_or(DevGrad::Skip),
                    it.next().unwrap_or(DevGrad::Skip),
                );
                let grads = DeviceLinearGrads::new().hidden(gh).weight(gw).bias(gb);
                linear
                    .loss_and_grad(&op.spec, s, &stream, &inputs, &tokens, grads, Chunking::Auto)
                    .map_err(super::super::wrap)
            };
            match &op.labels {
                Some(l) => with_i64(l, |l| call(Some(l))),
                None => call(None),
            }
        })?;
        let loss = CudaLoss::shared(stream.context()).map_err(super::super::wrap)?;
        let stash = bufs
            .into_iter()
            .zip(&op.dims)
            .map(|(b, dims)| {
                b.map(|b| {
                    Stashed::Cuda(DeviceGrad {
                        slice: match b {
                            DevBuf::Same(b) => keep(b),
                            DevBuf::Wide(b) if L::DTYPE == crate::DType::BF16 => GradSlice::Bf16Wide(b),
                            DevBuf::Wide(b) => GradSlice::F16Wide(b),
                        },
                        device: dev.clone(),
                        loss: loss.clone(),
                        dims: dims.clone(),
                    })
                })
            })
            .collect();
        *op.stash.lock().unwrap_or_else(|e| e.into_inner()) = Some(stash);
        Ok(CudaStorage::wrap_cuda_slice(out.loss.loss_f32, dev.clone()))
    }

    pub(super) fn forward(
        op: &LinearOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let dev = s1.device();
        macro_rules! typed {
            ($v:ident, $keep:expr) => {
                match (&s1.slice, &s2.slice, s3.map(|(s, l)| (&s.slice, l))) {
                    (CudaStorageSlice::$v(h), CudaStorageSlice::$v(w), None) => {
                        run(op, dev, &view(h, l1, "hidden")?, &view(w, l2, "weight")?, None, $keep)
                    }
                    (CudaStorageSlice::$v(h), CudaStorageSlice::$v(w), Some((CudaStorageSlice::$v(b), l3))) => run(
                        op,
                        dev,
                        &view(h, l1, "hidden")?,
                        &view(w, l2, "weight")?,
                        Some(&view(b, l3, "bias")?),
                        $keep,
                    ),
                    _ => {
                        Err(candle_core::Error::msg("weighted_linear_loss: hidden, weight and bias must share a dtype"))
                    }
                }
            };
        }
        let storage = match &s1.slice {
            CudaStorageSlice::F32(_) => typed!(F32, GradSlice::F32),
            CudaStorageSlice::F16(_) => typed!(F16, GradSlice::F16),
            CudaStorageSlice::BF16(_) => typed!(BF16, GradSlice::BF16),
            _ => Err(candle_core::Error::msg(format!(
                "weighted_linear_loss: hidden must be f32, f16 or bf16, got {:?}",
                s1.dtype()
            ))),
        }?;
        Ok((storage, candle_core::Shape::from(())))
    }
}

//! candle integration (feature `candle`; `candle-cuda` adds candle's CUDA backend).
//!
//! [`weighted_loss`] is the loss as a candle custom op with a backward, so `loss.backward()`
//! gives the logits' gradient through candle's autograd:
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{Device, Tensor, Var};
//! use fused_weighted_loss::{candle::weighted_loss, LossSpec};
//!
//! let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 11), &Device::Cpu)?)?;
//! let ids = Tensor::new(&[[1u32, 4, 4, 0, 9], [2, 3, 4, 5, 6]], &Device::Cpu)?;
//! let spec = LossSpec::builder().keywords([4]).build().map_err(candle_core::Error::wrap)?;
//!
//! let loss = weighted_loss(logits.as_tensor(), &ids, None, &spec)?;
//! let grads = loss.backward()?;
//! let g = grads.get(&logits).expect("the logits' gradient");
//! assert_eq!(g.dims(), &[2, 5, 11]);
//! # Ok(()) }
//! ```
//!
//! **One pass, and what it costs.** The forward computes the loss *and* the gradient in one fused
//! pass (CPU storage: this crate's CPU backend; CUDA storage: its kernels on candle's device and
//! stream, no copy to the host) and keeps the gradient until the backward, which then does no
//! work on the logits: it hands the gradient over, multiplied by the upstream gradient only when
//! that is not exactly 1 (on CUDA a device-side check, no host synchronisation). The cost is
//! memory: one gradient, `B·T·V` elements of the logits' dtype, lives from the forward until the
//! backward (or until the loss tensor is dropped). When the logits do not track gradients (no
//! `Var` upstream) the forward computes the loss only and keeps nothing. candle has no no-grad
//! mode: a loss only for evaluation (a validation pass) on logits that track gradients pays for
//! the gradient too; compute it on `logits.detach()`.
//!
//! **float16 logits keep a float32 gradient** (4 bytes per logit instead of 2): a loss scaled
//! to keep float16 gradients above float16's smallest values (`(loss * 65536.0).backward()`, a
//! loss scaler's step) would otherwise come too late, the small entries rounded to 0 at scale 1
//! in the forward. The backward multiplies the float32 gradient by the upstream gradient and
//! rounds the product once to float16 (on the CPU with this crate's vector code, on CUDA with
//! candle's cast), as a float16 framework's own backward does. The fused linear op
//! ([`weighted_linear_loss`]) keeps float32 `d hidden`, `d weight` and `d bias` for float16
//! inputs likewise (its `d weight` then also adds the chunks up in float32). bfloat16 has
//! float32's range and keeps its own dtype for the logits op's gradient and the fused linear
//! op's `d hidden`; the fused linear op's bfloat16 `d weight` and `d bias` are kept in float32,
//! because they add up one product per chunk of rows (rounded to bfloat16 after each chunk, a
//! bias gradient over 42 chunks came out 2.6e-2 off), and rounded once in the backward.
//!
//! Inputs: logits `[B, T, V]` f32, f16 or bf16; ids (and labels) `[B, T]` u32, i64 or i32;
//! optional per-token weights `[B, T]` f32 ([`weighted_loss_with_token_weights`]). Any layout:
//! a strided view (a transpose, a narrow, a broadcast) is copied first by candle's `contiguous`,
//! which passes the gradient back to it.
//!
//! Each op's gradients are kept until the first backward through it, which takes them (that is
//! what frees their memory): a second `backward()` through the same forward is an error ("no
//! gradient(s) kept"). Sum the losses that share a forward before one backward.
//! The spec's options (z-loss, label smoothing, soft-capping) apply as they do on the host API;
//! its `grad_scale` must be 1 (the gradient's scale comes from autograd: scale the loss).
//! The loss is an f32 scalar. On CUDA, what the device finds is not reported (that would need a
//! host synchronisation): ids outside `[0, V)` are positions without a target, non-finite
//! token weights and, with `check_finite`, a non-finite loss are not errors there as they are
//! on the CPU (the loss comes back NaN or infinite: check it where the step reads it anyway).

/// Implements candle's `CustomOp2` and `CustomOp3` for an op of two or three inputs: its
/// `cpu(s1, l1, s2, l2, Option<(s3, l3)>)`, the CUDA forward `$cuda(op, s1, l1, s2, l2, Option<..>)`
/// and its `grads(grad_res)`, the gradients of its (up to three) inputs.
macro_rules! custom_ops {
    ($op:ty, $name:literal, $cuda:path) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
                self.cpu(s1, l1, s2, l2, None)
            }

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $cuda(self, s1, l1, s2, l2, None)
            }

            fn bwd(
                &self,
                _: &Tensor,
                _: &Tensor,
                _: &Tensor,
                grad_res: &Tensor,
            ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
                let [a, b, _] = self.grads(grad_res)?;
                Ok((a, b))
            }
        }

        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
                self.cpu(s1, l1, s2, l2, Some((s3, l3)))
            }

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
                s3: &candle_core::CudaStorage,
                l3: &Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $cuda(self, s1, l1, s2, l2, Some((s3, l3)))
            }

            fn bwd(
                &self,
                _: &Tensor,
                _: &Tensor,
                _: &Tensor,
                _: &Tensor,
                grad_res: &Tensor,
            ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                let [a, b, c] = self.grads(grad_res)?;
                Ok((a, b, c))
            }
        }
    };
}

mod linear;
pub use linear::weighted_linear_loss;

use crate::dtype::{Logit, TokenId};
use crate::{Backend, Grad, LossSpec, Shape, Tokens};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Layout, Tensor};
use std::sync::Mutex;

/// The keyword-weighted loss of `logits` `[B, T, V]` for `ids` `[B, T]` (and optional `labels`),
/// as an f32 scalar tensor whose backward gives the logits' gradient.
pub fn weighted_loss(
    logits: &Tensor,
    ids: &Tensor,
    labels: Option<&Tensor>,
    spec: &LossSpec,
) -> candle_core::Result<Tensor> {
    weighted_loss_with_token_weights(logits, ids, labels, None, spec)
}

/// [`weighted_loss`] with per-token weights `[B, T]` (f32, on the logits' device, aligned with
/// the labels as in [`Tokens::with_token_weights`]); they take no gradient.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
/// use fused_weighted_loss::{candle::weighted_loss_with_token_weights, LossSpec};
///
/// let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, 7), &Device::Cpu)?)?;
/// let ids = Tensor::new(&[[1u32, 4, 4, 0]], &Device::Cpu)?;
/// let w = Tensor::new(&[[0f32, 1.0, 0.5, 2.0]], &Device::Cpu)?;
/// let spec = LossSpec::builder().label_smoothing(0.1).build().map_err(candle_core::Error::wrap)?;
/// let loss = weighted_loss_with_token_weights(logits.as_tensor(), &ids, None, Some(&w), &spec)?;
/// assert!(loss.to_scalar::<f32>()? > 0.0);
/// # Ok(()) }
/// ```
pub fn weighted_loss_with_token_weights(
    logits: &Tensor,
    ids: &Tensor,
    labels: Option<&Tensor>,
    token_weights: Option<&Tensor>,
    spec: &LossSpec,
) -> candle_core::Result<Tensor> {
    let shape = Shape::from_dims(logits.dims(), ids.dims()).map_err(candle_core::Error::wrap)?;
    refuse_grad_scale(spec, "weighted_loss")?;
    if let Some(w) = token_weights {
        shape.check_token_dims("token_weights", w.dims()).map_err(candle_core::Error::wrap)?;
        if w.dtype() != candle_core::DType::F32 || !w.device().same_device(logits.device()) {
            return Err(candle_core::Error::msg("token_weights must be f32 on the logits' device"));
        }
    }
    if let Some(l) = labels {
        shape.check_token_dims("labels", l.dims()).map_err(candle_core::Error::wrap)?;
        if l.dtype() != ids.dtype() {
            return Err(candle_core::Error::msg(format!(
                "labels must have the ids' dtype ({:?}), got {:?}",
                ids.dtype(),
                l.dtype()
            )));
        }
    }
    // any layout: strided views copied (contiguous tensors are taken as they are), and the copy
    // passes the gradient back to the view
    let (logits, ids) = (&logits.contiguous()?, &ids.contiguous()?);
    let labels = labels.map(Tensor::contiguous).transpose()?;
    let token_weights = token_weights.map(Tensor::contiguous).transpose()?;
    let op = WeightedLossOp {
        spec: spec.clone(),
        shape,
        want_grad: logits.track_op(),
        token_weights: token_weights.map(|w| w.detach()),
        stash: Mutex::new(None),
    };
    match labels {
        Some(labels) => logits.apply_op3(ids, &labels, op),
        None => logits.apply_op2(ids, op),
    }
}

/// The custom op: one per call, holding the gradient between forward and backward.
struct WeightedLossOp {
    spec: LossSpec,
    shape: Shape,
    want_grad: bool,
    /// Per-token weights `[B, T]` f32, read inside the forward (they take no gradient).
    token_weights: Option<Tensor>,
    stash: Mutex<Option<Stash>>,
}

/// The gradient the forward produced, waiting for the backward.
enum Stash {
    Cpu(Tensor),
    /// A float32 gradient of float16 logits (see the module docs).
    CpuWide(Tensor),
    #[cfg(feature = "candle-cuda")]
    Cuda(cuda::DeviceGrad),
}

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The float16 gradient of a kept float32 CPU gradient `g` times the upstream gradient `s`,
/// rounded once ([`crate::scale_into`]).
fn narrow_f16(g: &Tensor, s: f64) -> candle_core::Result<Tensor> {
    narrow_wide(g, s, candle_core::DType::F16)
}

/// A kept float32 gradient (on the CPU) scaled by `s` and rounded once to `to` (f16 or bf16).
fn narrow_wide(g: &Tensor, s: f64, to: candle_core::DType) -> candle_core::Result<Tensor> {
    let (st, layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        return Err(candle_core::Error::msg("fused-weighted-loss op: the kept gradient is not f32 on the CPU"));
    };
    let src = contiguous(v, layout, "kept gradient")?;
    match to {
        candle_core::DType::F16 => {
            let mut out = <half::f16 as Logit>::zeroed(src.len());
            crate::scale_into(src, s as f32, &mut out).map_err(wrap)?;
            Tensor::from_vec(out, g.shape(), &Device::Cpu)
        }
        candle_core::DType::BF16 => {
            let mut out = <half::bf16 as Logit>::zeroed(src.len());
            crate::scale_into(src, s as f32, &mut out).map_err(wrap)?;
            Tensor::from_vec(out, g.shape(), &Device::Cpu)
        }
        other => Err(candle_core::Error::msg(format!("fused-weighted-loss op: no kept gradient narrows to {other:?}"))),
    }
}

/// A kept gradient of the logits' own dtype (on the CPU) times the upstream gradient `s`:
/// bfloat16 is scaled in f32 and rounded once (candle's `affine` would round `s` itself to
/// bfloat16 first: 1/3 became 0.33398, every element 0.2% high), as on CUDA.
fn scale_kept(g: Tensor, s: f64) -> candle_core::Result<Tensor> {
    match (s == 1.0, g.dtype()) {
        (true, _) => Ok(g),
        (false, candle_core::DType::BF16) => {
            narrow_wide(&g.to_dtype(candle_core::DType::F32)?, s, candle_core::DType::BF16)
        }
        (false, _) => g.affine(s, 0.0),
    }
}

/// The candle ops take the upstream gradient from autograd (`(loss * s).backward()`), which
/// their backward multiplies in: a spec's `grad_scale` would multiply the gradient a second
/// time while the loss stays unscaled, so only 1 is taken.
fn refuse_grad_scale(spec: &LossSpec, op: &str) -> candle_core::Result<()> {
    match spec.grad_scale() {
        1.0 => Ok(()),
        g => Err(candle_core::Error::msg(format!(
            "{op}: the spec's grad_scale is {g}; the candle ops take the gradient's scale from autograd \
             (scale the loss: (loss * s).backward()), so it must be 1"
        ))),
    }
}

/// The upstream gradient of a scalar loss, on the host (1 unless the loss was scaled).
fn upstream(grad_res: &Tensor) -> candle_core::Result<f64> {
    grad_res.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

/// A contiguous storage's elements.
fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) if b <= v.len() => Ok(&v[a..b]),
        _ => Err(candle_core::Error::msg(format!("fused-weighted-loss op: {what} must be contiguous"))),
    }
}

impl WeightedLossOp {
    fn cpu_typed<L: Logit + candle_core::WithDType, I: TokenId>(
        &self,
        logits: &[L],
        ids: &[I],
        labels: Option<&[I]>,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let spec = self.spec.to_builder().backend(Backend::Cpu).build().map_err(wrap)?;
        let mut tokens = match labels {
            Some(l) => Tokens::new(ids).with_labels(l),
            None => Tokens::new(ids),
        };
        let weights = self.token_weights.as_ref().map(|w| w.storage_and_layout());
        if let Some((st, layout)) = weights.as_ref() {
            match &**st {
                candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
                    tokens = tokens.with_token_weights(contiguous(v, layout, "token_weights")?)
                }
                _ => return Err(candle_core::Error::msg("weighted_loss: token_weights must be f32 on the CPU")),
            }
        }
        let out = if self.want_grad {
            let (n, dims) = (self.shape.logits_len(), (self.shape.batch(), self.shape.seq(), self.shape.vocab()));
            let (out, kept) = if <L as Logit>::DTYPE == crate::DType::F16 {
                // (float32 until the backward: see the module docs)
                let mut g = f32::zeroed(n);
                let out = spec.loss_and_grad(self.shape, logits, tokens, Grad::IntoF32(&mut g)).map_err(wrap)?;
                (out, Stash::CpuWide(Tensor::from_vec(g, dims, &Device::Cpu)?))
            } else {
                let mut g = L::zeroed(n);
                let out = spec.loss_and_grad(self.shape, logits, tokens, Grad::Into(&mut g)).map_err(wrap)?;
                (out, Stash::Cpu(Tensor::from_vec(g, dims, &Device::Cpu)?))
            };
            *self.stash.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
            out
        } else {
            spec.loss_and_grad(self.shape, logits, tokens, Grad::Skip).map_err(wrap)?
        };
        Ok((CpuStorage::F32(vec![out.loss as f32]), candle_core::Shape::from(())))
    }

    fn cpu(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        macro_rules! with_ids {
            ($logits:expr) => {
                match (s2, s3) {
                    (CpuStorage::U32(i), None) => self.cpu_typed($logits, contiguous(i, l2, "ids")?, None),
                    (CpuStorage::I64(i), None) => self.cpu_typed($logits, contiguous(i, l2, "ids")?, None),
                    (CpuStorage::I32(i), None) => self.cpu_typed($logits, contiguous(i, l2, "ids")?, None),
                    (CpuStorage::U32(i), Some((CpuStorage::U32(y), l3))) => {
                        self.cpu_typed($logits, contiguous(i, l2, "ids")?, Some(contiguous(y, l3, "labels")?))
                    }
                    (CpuStorage::I64(i), Some((CpuStorage::I64(y), l3))) => {
                        self.cpu_typed($logits, contiguous(i, l2, "ids")?, Some(contiguous(y, l3, "labels")?))
                    }
                    (CpuStorage::I32(i), Some((CpuStorage::I32(y), l3))) => {
                        self.cpu_typed($logits, contiguous(i, l2, "ids")?, Some(contiguous(y, l3, "labels")?))
                    }
                    _ => Err(candle_core::Error::msg("weighted_loss: ids and labels must be u32, i64 or i32, alike")),
                }
            };
        }
        match s1 {
            CpuStorage::F32(v) => with_ids!(contiguous(v, l1, "logits")?),
            CpuStorage::F16(v) => with_ids!(contiguous(v, l1, "logits")?),
            CpuStorage::BF16(v) => with_ids!(contiguous(v, l1, "logits")?),
            other => Err(candle_core::Error::msg(format!(
                "weighted_loss: logits must be f32, f16 or bf16, got {:?}",
                other.dtype()
            ))),
        }
    }

    /// The backward: the logits' gradient (ids and labels get none).
    fn grads(&self, grad_res: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
        Ok([Some(self.bwd(grad_res)?), None, None])
    }

    fn bwd(&self, grad_res: &Tensor) -> candle_core::Result<Tensor> {
        let stash = self.stash.lock().unwrap_or_else(|e| e.into_inner()).take();
        match stash {
            Some(Stash::Cpu(g)) => scale_kept(g, upstream(grad_res)?),
            Some(Stash::CpuWide(g)) => narrow_f16(&g, upstream(grad_res)?),
            #[cfg(feature = "candle-cuda")]
            Some(Stash::Cuda(g)) => g.into_tensor(grad_res),
            None => Err(candle_core::Error::msg(
                "weighted_loss: no gradient kept (the backward already ran, or the logits did not track gradients)",
            )),
        }
    }
}

custom_ops!(WeightedLossOp, "fused-weighted-loss", cuda::forward);

#[cfg(feature = "candle-cuda")]
mod cuda;

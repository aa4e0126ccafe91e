//! # fused-weighted-loss
//!
//! The keyword-weighted causal language-model loss (the Hugging Face course's
//! `keytoken_weighted_loss`) and its gradient, computed in one pass over the logits.
//!
//! For logits `[B, T, V]` and ids `[B, T]`, row `(b, t)` of the logits predicts `labels[b, t+1]`
//! (the labels default to the ids). Each sample's loss is the mean of its per-token
//! cross-entropies; its weight is `alpha * (1 + sum_k weight_k * count(ids[b, :] == keyword_k))`;
//! the batch loss is `mean_b(loss_b * w_b)`. The gradient w.r.t. every logit has the closed form
//! `w_b / (B * N_b) * (softmax - onehot(label))` with the defaults (`N_b = T − 1`; the row mean,
//! the reduction, token weights and a gradient scale change only this per-row factor), so loss
//! and gradient come out of one read of the logits and one write of the gradient.
//!
//! ```
//! use fused_weighted_loss::{Grad, LossSpec, Shape, Tokens};
//!
//! let (b, t, v) = (2, 4, 10);
//! let shape = Shape::new(b, t, v)?;
//! let logits: Vec<f32> = (0..b * t * v).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
//! let ids: Vec<i64> = vec![1, 3, 3, 7, 2, 9, 0, 3];
//! let spec = LossSpec::builder().keywords([3]).build()?;
//!
//! let mut grad = vec![0f32; shape.logits_len()];
//! let out = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad))?;
//! assert_eq!(out.weights, vec![3.0, 2.0]); // 1 + two 3s, 1 + one 3
//!
//! // the float64 oracle agrees
//! let r = fused_weighted_loss::reference::reference(&spec, shape, &logits, Tokens::new(&ids))?;
//! assert!((out.loss - r.loss).abs() <= 1e-6 * r.loss.abs());
//! assert!(fused_weighted_loss::reference::rel_err(&grad, &r.grad) <= 1e-5);
//! # Ok::<(), fused_weighted_loss::Error>(())
//! ```
//!
//! Defaults reproduce the course function exactly; [`LossSpecBuilder`] sets the extensions:
//! `ignore_index` (the labels themselves come with [`Tokens::with_labels`]), [`RowMean`],
//! [`Reduction`], per-keyword weights, an upstream gradient scale, z-loss, label smoothing,
//! soft-capping, a finiteness check, the backend and the CPU's instruction set ([`CpuSimd`]);
//! [`Tokens::with_token_weights`] adds per-token weights.
//!
//! [`LossSpec::linear_loss_and_grad`] computes the same loss from the last hidden states and the
//! output weight, in chunks of token rows, so that the logits never exist (module [`linear`]).

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "candle")]
pub mod candle;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dtype;
mod error;
pub mod linear;
pub mod measure;
pub mod parallel;
mod plan;
mod pool;
pub mod reference;
mod spec;
pub mod synthetic;

pub use dtype::{DType, Logit, TokenId};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use linear::{Chunking, LinearGrads, LinearInputs, LinearOutput, LinearShape};
pub use spec::{
    Backend, CpuSimd, Keyword, LossOutput, LossSpec, LossSpecBuilder, Reduction, RowMean, Shape, Tokens, MAX_VOCAB,
};

/// Where the gradient goes.
#[derive(Debug)]
pub enum Grad<'a, L: Logit> {
    /// Loss only: the logits are read once and nothing is written.
    Skip,
    /// Into a caller buffer of the logits' dtype, `B * T * V` elements.
    Into(&'a mut [L]),
    /// Into a caller `f32` buffer, `B * T * V` elements (whatever the logits' dtype).
    IntoF32(&'a mut [f32]),
}

/// `dst[i] = src[i] · scale`, the product in `f32`, rounded to nearest even into `dst`'s dtype
/// (into bf16, products below about 1.2e-38 become zeros of their sign: see [`Logit`]), on the
/// rayon pool with the CPU backend's vector code (the best level this CPU runs).
///
/// The backward of a gradient kept in `f32` for 16-bit inputs ([`Grad::IntoF32`]): the
/// upstream gradient (a loss scale such as 65536) applies before the one rounding, so entries
/// that a 16-bit gradient rounded at scale 1 would lose below `f16`'s range survive. A
/// non-finite `scale` or entry gives non-finite results, as the product does.
///
/// ```
/// use fused_weighted_loss::{f16, scale_into};
/// let kept = [3.0e-9f32, -1.5e-8, 0.25];
/// let mut grad = [f16::ZERO; 3];
/// scale_into(&kept, 65536.0, &mut grad)?;
/// assert_eq!(grad[2], f16::from_f32(16384.0));
/// assert!(grad[0] != f16::ZERO && f16::from_f32(kept[0]) == f16::ZERO); // kept, not lost
/// # Ok::<(), fused_weighted_loss::Error>(())
/// ```
pub fn scale_into<G: Logit>(src: &[f32], scale: f32, dst: &mut [G]) -> Result<()> {
    if src.len() != dst.len() {
        return Err(Error::GradLength { expected: src.len(), got: dst.len() });
    }
    let k = cpu_kernels(CpuSimd::Auto)?;
    cpu::scale_into(&k, src, scale, dst);
    Ok(())
}

impl<L: Logit> Grad<'_, L> {
    fn len(&self) -> Option<usize> {
        match self {
            Grad::Skip => None,
            Grad::Into(g) => Some(g.len()),
            Grad::IntoF32(g) => Some(g.len()),
        }
    }
}

/// The CPU instruction set [`CpuSimd::Auto`] picks on this machine (chosen at run time).
pub fn cpu_simd_level() -> CpuSimd {
    cpu::simd::Kernels::select(CpuSimd::Auto).map_or(CpuSimd::Portable, |k| k.level)
}

/// Whether this CPU runs the given instruction-set level.
pub fn cpu_simd_supported(level: CpuSimd) -> bool {
    cpu::simd::supported(level)
}

/// The CPU kernels the spec asks for.
fn cpu_kernels(level: CpuSimd) -> Result<cpu::simd::Kernels> {
    cpu::simd::Kernels::select(level).ok_or_else(|| Error::BackendUnavailable {
        backend: Backend::Cpu,
        reason: format!("this CPU does not support the {level} instruction set"),
    })
}

/// Whether the CUDA backend can run here (built with `cuda`, a driver, a device), and why not.
/// Never panics, also on machines with no CUDA at all.
pub fn cuda_status() -> std::result::Result<(), String> {
    #[cfg(feature = "cuda")]
    return cuda::status();
    #[cfg(not(feature = "cuda"))]
    Err("this build has no `cuda` feature".into())
}

impl LossSpec {
    /// The backend a call with this spec runs on here: [`Backend::Cpu`] as asked;
    /// [`Backend::Cuda`] if usable, else [`Error::BackendUnavailable`]; [`Backend::Auto`] is CUDA
    /// when a driver and a device are there, the kernels load on device 0 (the fatbin holds code
    /// for compute capability 8.0 and up) and the spec is within the kernels' limits (at most 64
    /// keywords), else the CPU. Only `Auto` and `Cuda` probe for a driver, and only `Auto` loads
    /// the kernels to decide (each once per process).
    pub fn resolved_backend(&self) -> Result<Backend> {
        match self.backend {
            Backend::Cpu => Ok(Backend::Cpu),
            #[cfg(feature = "cuda")]
            Backend::Auto if self.keywords.len() > cuda::MAX_KEYWORDS => Ok(Backend::Cpu),
            #[cfg(feature = "cuda")]
            Backend::Auto => {
                Ok(if cuda_status().is_ok() && cuda::auto_usable() { Backend::Cuda } else { Backend::Cpu })
            }
            #[cfg(not(feature = "cuda"))]
            Backend::Auto => Ok(Backend::Cpu),
            Backend::Cuda => match cuda_status() {
                Ok(()) => Ok(Backend::Cuda),
                Err(reason) => Err(Error::BackendUnavailable { backend: Backend::Cuda, reason }),
            },
        }
    }

    /// The backend a host call of `shape` runs on: [`resolved_backend`](Self::resolved_backend),
    /// except that [`Backend::Auto`] takes the CPU for a shape beyond the CUDA kernels' 32-bit
    /// fields (`V > 2^31 − 1` or `T − 1 > 2^32 − 1`), where [`Backend::Cuda`] is
    /// [`Error::Unsupported`].
    fn backend_for(&self, shape: Shape) -> Result<Backend> {
        let backend = self.resolved_backend()?;
        #[cfg(feature = "cuda")]
        return Ok(auto_within(self.backend, backend, cuda::shape_fits(shape)));
        #[cfg(not(feature = "cuda"))]
        {
            let _ = shape;
            Ok(backend)
        }
    }
}

/// What [`Backend::Auto`] (`asked`), resolved to `resolved`, runs a host call on when the call's
/// shape `fits` the GPU's limits or not: the CPU where it does not; any other request as
/// resolved (an explicit [`Backend::Cuda`] reports the shape as unsupported).
#[cfg(feature = "cuda")]
fn auto_within(asked: Backend, resolved: Backend, fits: bool) -> Backend {
    match (asked, resolved, fits) {
        (Backend::Auto, Backend::Cuda, false) => Backend::Cpu,
        _ => resolved,
    }
}

impl LossSpec {
    /// Computes the loss and, unless `grad` is [`Grad::Skip`], its gradient w.r.t. the logits.
    ///
    /// `logits` is `[B, T, V]` row-major, `tokens` holds ids (and optional labels and token
    /// weights) `[B, T]`. Every input is validated before any work starts; on error nothing has
    /// been written. The exception is [`Error::NonFinite`] (with `check_finite`), found after the
    /// gradient is written.
    pub fn loss_and_grad<L: Logit, I: TokenId>(
        &self,
        shape: Shape,
        logits: &[L],
        tokens: Tokens<'_, I>,
        grad: Grad<'_, L>,
    ) -> Result<LossOutput> {
        self.run(shape, logits, tokens, grad, None)
    }

    /// [`loss_and_grad`](Self::loss_and_grad), also writing each position's loss into
    /// `token_loss`, `[B, T - 1]` row-major (the course function's per-token intermediate, what
    /// `reduction="none"` returns): the loss of row `(b, t)` predicting `labels[b, t + 1]`, with
    /// smoothing and z-loss, before token and sample weights; 0 where the label is ignored.
    ///
    /// ```
    /// use fused_weighted_loss::{Grad, LossSpec, Shape, Tokens};
    /// let shape = Shape::new(1, 3, 2)?;
    /// let logits = [0.0f32, 0.0, 1.0, -1.0, 5.0, 5.0];
    /// let mut per_token = [0f32; 2];
    /// let out = LossSpec::default().loss_and_grad_per_token(
    ///     shape, &logits, Tokens::new(&[0i64, 1, 0]), Grad::Skip, &mut per_token)?;
    /// assert!((per_token[0] as f64 - 2f64.ln()).abs() < 1e-6); // uniform row
    /// // row 1 (1, -1) predicts id 0: ln(e + 1/e) - 1 = ln(1 + e^-2)
    /// assert!((per_token[1] as f64 - (-2f64).exp().ln_1p()).abs() < 1e-6);
    /// assert!((out.loss - (per_token[0] + per_token[1]) as f64 / 2.0).abs() < 1e-6);
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn loss_and_grad_per_token<L: Logit, I: TokenId>(
        &self,
        shape: Shape,
        logits: &[L],
        tokens: Tokens<'_, I>,
        grad: Grad<'_, L>,
        token_loss: &mut [f32],
    ) -> Result<LossOutput> {
        self.run(shape, logits, tokens, grad, Some(token_loss))
    }

    fn run<L: Logit, I: TokenId>(
        &self,
        shape: Shape,
        logits: &[L],
        tokens: Tokens<'_, I>,
        grad: Grad<'_, L>,
        token_loss: Option<&mut [f32]>,
    ) -> Result<LossOutput> {
        spec::check_len("logits", logits.len(), shape.logits_len(), shape)?;
        if let Some(got) = grad.len() {
            if got != shape.logits_len() {
                return Err(Error::GradLength { expected: shape.logits_len(), got });
            }
        }
        check_token_loss(shape, token_loss.as_deref())?;
        let backend = self.backend_for(shape)?;
        let wants_grad = !matches!(grad, Grad::Skip);
        #[cfg(feature = "cuda")]
        if backend == Backend::Cuda {
            // found on the device only after the outputs came back (or not at all, for a
            // gradient factor beyond f32): checked before they do
            self.plan_checked(shape, &tokens, wants_grad, backend)?;
            return cuda::run_host(self, shape, logits, tokens, grad, token_loss);
        }
        let plan = self.plan_checked(shape, &tokens, wants_grad, backend)?;
        let k = cpu_kernels(self.cpu_simd)?;
        let rows = match grad {
            Grad::Skip => cpu::run::<L, f32>(&k, &plan, logits, None),
            Grad::Into(g) => cpu::run::<L, L>(&k, &plan, logits, Some(g)),
            Grad::IntoF32(g) => cpu::run::<L, f32>(&k, &plan, logits, Some(g)),
        };
        plan.finish(&rows, self.check_finite, backend, token_loss)
    }

    /// Computes the loss and writes the gradient over the logits (no gradient buffer needed;
    /// extra memory is `O(B * T)`).
    ///
    /// ```
    /// use fused_weighted_loss::{LossSpec, Shape, Tokens};
    /// let shape = Shape::new(1, 2, 3)?;
    /// let mut logits = [0.0f32, 2f32.ln(), 0.0, 1.0, 2.0, 3.0];
    /// let out = LossSpec::default().loss_and_grad_in_place(shape, &mut logits, Tokens::new(&[0i32, 2]))?;
    /// // row 0 predicts id 2: exponentials 1, 2, 1, so softmax 1/4, 1/2, 1/4 and loss ln 4
    /// assert!((out.loss - 4f64.ln()).abs() < 1e-6);
    /// let want = [0.25, 0.5, 0.25 - 1.0]; // softmax, minus one at the target
    /// assert!(logits[..3].iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{logits:?}");
    /// assert_eq!(&logits[3..], &[0.0, 0.0, 0.0]); // the last position has no target
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn loss_and_grad_in_place<L: Logit, I: TokenId>(
        &self,
        shape: Shape,
        logits: &mut [L],
        tokens: Tokens<'_, I>,
    ) -> Result<LossOutput> {
        self.run_in_place(shape, logits, tokens, None)
    }

    /// [`loss_and_grad_in_place`](Self::loss_and_grad_in_place), also writing each position's
    /// loss into `token_loss` as [`loss_and_grad_per_token`](Self::loss_and_grad_per_token) does.
    pub fn loss_and_grad_in_place_per_token<L: Logit, I: TokenId>(
        &self,
        shape: Shape,
        logits: &mut [L],
        tokens: Tokens<'_, I>,
        token_loss: &mut [f32],
    ) -> Result<LossOutput> {
        self.run_in_place(shape, logits, tokens, Some(token_loss))
    }

    fn run_in_place<L: Logit, I: TokenId>(
        &self,
        shape: Shape,
        logits: &mut [L],
        tokens: Tokens<'_, I>,
        token_loss: Option<&mut [f32]>,
    ) -> Result<LossOutput> {
        spec::check_len("logits", logits.len(), shape.logits_len(), shape)?;
        check_token_loss(shape, token_loss.as_deref())?;
        let backend = self.backend_for(shape)?;
        #[cfg(feature = "cuda")]
        if backend == Backend::Cuda {
            // as `run`
            self.plan_checked(shape, &tokens, true, backend)?;
            return cuda::run_host_in_place(self, shape, logits, tokens, token_loss);
        }
        let plan = self.plan_checked(shape, &tokens, true, backend)?;
        let k = cpu_kernels(self.cpu_simd)?;
        let rows = cpu::run_in_place(&k, &plan, logits);
        plan.finish(&rows, self.check_finite, backend, token_loss)
    }
}

impl LossSpec {
    /// The call's plan, and for a call that writes a gradient the check that every row's
    /// gradient factor is within f32 as `backend` forms it ([`plan::Plan::check_grad_factors`]).
    pub(crate) fn plan_checked<I: TokenId>(
        &self,
        shape: Shape,
        tokens: &Tokens<'_, I>,
        grad: bool,
        backend: Backend,
    ) -> Result<plan::Plan> {
        let plan = self.plan(shape, tokens)?;
        if grad {
            plan.check_grad_factors(backend == Backend::Cuda)?;
        }
        Ok(plan)
    }
}

/// Checks the per-token loss buffer's length, `B * (T - 1)`.
fn check_token_loss(shape: Shape, token_loss: Option<&[f32]>) -> Result<()> {
    let expected = shape.batch() * (shape.seq() - 1);
    match token_loss {
        Some(b) if b.len() != expected => Err(Error::TokenLossLength { expected, got: b.len() }),
        _ => Ok(()),
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::{auto_within, Backend};

    /// `Auto` falls back to the CPU for a shape the kernels cannot hold, where it failed with
    /// `Unsupported`; an explicit `Cuda` still reports it, and the CPU stays the CPU.
    #[test]
    fn auto_takes_the_cpu_for_shapes_beyond_the_kernels() {
        assert_eq!(auto_within(Backend::Auto, Backend::Cuda, false), Backend::Cpu);
        assert_eq!(auto_within(Backend::Auto, Backend::Cuda, true), Backend::Cuda);
        assert_eq!(auto_within(Backend::Auto, Backend::Cpu, true), Backend::Cpu);
        assert_eq!(auto_within(Backend::Cuda, Backend::Cuda, false), Backend::Cuda);
        assert_eq!(auto_within(Backend::Cpu, Backend::Cpu, false), Backend::Cpu);
    }
}

/// The README's Rust examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

//! The fused linear + weighted loss: the loss and its gradients straight from the last hidden
//! states and the output weight, without ever holding the `[B·T, V]` logits.
//!
//! For hidden states `h` `[N = B·T, H]`, an output weight `W` `[V, H]` (the `lm_head` or tied
//! embedding layout) and an optional bias `b` `[V]`, the logits would be `z = h·Wᵀ + b`. The
//! tokens are cut into chunks of `C` rows; per chunk:
//!
//! 1. `z_c = h_c·Wᵀ (+ b)` into a `C x V` buffer (f32);
//! 2. the crate's fused rows pass (the same one [`LossSpec::loss_and_grad_in_place`] runs) turns
//!    `z_c` in place into `G_c = coef_row · (softmax − onehot)` and gives each row's loss;
//! 3. `d h_c = G_c·W`, `d W += G_cᵀ·h_c`, `d b += Σ_rows G_c`.
//!
//! The per-sample weights and coefficients depend only on the ids, so they are known before the
//! first chunk (the same per-call plan as the logits path); the per-row losses are combined at
//! the end in a fixed order. Rows without a target (each sample's last position, ignored labels)
//! have a zero gradient: on the CPU they are left out of every chunk (no matrix work); on CUDA,
//! whose ids live on the device, they go through the chunk like the others and come out as zero.
//!
//! ```
//! use fused_weighted_loss::{Chunking, Grad, LinearGrads, LinearInputs, LinearShape, LossSpec, Tokens};
//!
//! let (b, t, h, v) = (2, 4, 3, 10);
//! let shape = LinearShape::new(b, t, h, v)?;
//! let hidden: Vec<f32> = (0..b * t * h).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.4).collect();
//! let weight: Vec<f32> = (0..v * h).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.3).collect();
//! let ids: Vec<i64> = vec![1, 3, 3, 7, 2, 9, 0, 3];
//! let spec = LossSpec::builder().keywords([3]).build()?;
//!
//! let (mut dh, mut dw) = (vec![0f32; shape.hidden_len()], vec![0f32; shape.weight_len()]);
//! let grads = LinearGrads::new().hidden(Grad::Into(&mut dh)).weight(Grad::Into(&mut dw));
//! let out = spec.linear_loss_and_grad(
//!     shape,
//!     LinearInputs::new(&hidden, &weight),
//!     Tokens::new(&ids),
//!     grads,
//!     Chunking::Rows(3),
//! )?;
//! assert_eq!(out.chunk_rows, 3);
//! assert_eq!(out.loss.weights, vec![3.0, 2.0]);
//!
//! // the same as the logits path on h·Wᵀ
//! let mut logits = vec![0f32; b * t * v];
//! for r in 0..b * t {
//!     for j in 0..v {
//!         logits[r * v + j] = (0..h).map(|k| hidden[r * h + k] * weight[j * h + k]).sum();
//!     }
//! }
//! let full = spec.loss_and_grad(shape.tokens(), &logits, Tokens::new(&ids), Grad::Skip)?;
//! assert!((out.loss.loss - full.loss).abs() <= 1e-5 * full.loss);
//! # Ok::<(), fused_weighted_loss::Error>(())
//! ```
//!
//! **Memory.** Beyond the inputs and the caller's gradient buffers, a call holds the plan
//! (`O(B·T)`) and the chunk buffers; [`LinearOutput::scratch_bytes`] reports them:
//!
//! - CPU: `C·(4V + 12H + 4P)` bytes (the f32 logits of a chunk, its gathered hidden rows, once
//!   as they are and once column-major for the products, and their gradient, `C·(4V + 8H + 4P)`
//!   without `d hidden`, whose budget still counts `12H`, and one column-major panel of its
//!   logits as the GEMM writes them fastest; `P` rows of `W` per panel, about 4 MiB of them,
//!   rounded up to even here; the column-major buffers take `C` rounded up to 16), plus for
//!   f16/bf16 inputs an f32 copy of one vocabulary panel of `W` (`P·H·4`) and, when `d W` is
//!   16-bit, as much again; `4V` each for an f32 copy of the bias and for the chunk's bias
//!   gradient when a bias is given.
//! - CUDA: see the `cuda::linear` module (feature `cuda`).
//!
//! `C` comes from [`Chunking`]: a byte budget for the chunk buffers (default
//! [`CPU_BUDGET`] on the CPU, whatever the thread count) or a fixed number of rows.
//!
//! **Precision.** Inputs f32, f16 or bf16 (hidden, weight and bias of one dtype); every product
//! accumulates in f32 and the logits of a chunk are f32, so the loss is as accurate as the logits
//! path on f32 logits. `d W` and `d b` are accumulated chunk by chunk in the buffer's own dtype:
//! pass f32 buffers ([`Grad::IntoF32`]) for f32 accumulation across chunks with 16-bit inputs.

pub(crate) mod cpu;

use crate::dtype::{Logit, TokenId};
use crate::error::{Error, Result};
use crate::spec::{check_len, LossOutput, LossSpec, Shape, Tokens};
use crate::Grad;

/// Default CPU chunk budget (bytes of chunk buffers), the same whatever the thread count: the
/// chunks' rows, and with them the order in which `d W` and `d b` add the chunks up, do not
/// depend on it, so [`Chunking::Auto`] gives the same bits on any number of threads (it was
/// 12 MiB per thread, which changed the chunks and the last bits of `d W` with the pool).
pub const CPU_BUDGET: usize = 24 << 20;

/// The default CPU chunk budget per rayon thread before it became [`CPU_BUDGET`].
#[deprecated(note = "the CPU default budget no longer depends on the thread count: use CPU_BUDGET")]
pub const CPU_BUDGET_PER_THREAD: usize = 12 << 20;

/// Bytes of one f32 vocabulary panel of `W` on the CPU for 16-bit inputs.
pub(crate) const CPU_PANEL_BYTES: usize = 4 << 20;

/// A validated fused linear shape: `[B, T]` tokens, hidden size `H`, vocabulary `V`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearShape {
    tokens: Shape,
    hidden: usize,
}

impl LinearShape {
    /// Validates and builds a shape: the token shape as [`Shape::new`] (with `vocab`), `hidden >= 1`,
    /// and `B·T·H`, `V·H` fit in `usize`.
    ///
    /// ```
    /// use fused_weighted_loss::{Error, LinearShape};
    /// let s = LinearShape::new(8, 1024, 4096, 128_256)?;
    /// assert_eq!((s.rows(), s.hidden_len(), s.weight_len()), (8192, 8192 * 4096, 128_256 * 4096));
    /// assert!(matches!(LinearShape::new(8, 1024, 0, 100), Err(Error::EmptyHidden)));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn new(batch: usize, seq: usize, hidden: usize, vocab: usize) -> Result<Self> {
        let tokens = Shape::new(batch, seq, vocab)?;
        if hidden == 0 {
            return Err(Error::EmptyHidden);
        }
        tokens.rows().checked_mul(hidden).ok_or(Error::SizeOverflow { product: "batch * seq * hidden" })?;
        vocab.checked_mul(hidden).ok_or(Error::SizeOverflow { product: "vocab * hidden" })?;
        Ok(LinearShape { tokens, hidden })
    }

    /// The shape of a data-parallel rank without samples this step: `[0, seq]` tokens, the rest
    /// checked as [`LinearShape::new`] checks it. As [`Shape::without_samples`], only the sharded
    /// calls with a data group of more than one rank accept it: `d hidden` is empty, `d weight`
    /// and `d bias` come back zero (or untouched with [`LinearGrads::accumulate`]), this rank's
    /// part of what a data-parallel trainer sums.
    ///
    /// ```
    /// use fused_weighted_loss::LinearShape;
    /// let s = LinearShape::without_samples(1024, 4096, 128_256)?;
    /// assert_eq!((s.rows(), s.hidden_len(), s.weight_len()), (0, 0, 128_256 * 4096));
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn without_samples(seq: usize, hidden: usize, vocab: usize) -> Result<Self> {
        let one = LinearShape::new(1, seq, hidden, vocab)?;
        Ok(LinearShape { tokens: Shape::without_samples(seq, vocab)?, ..one })
    }

    /// This shape with another vocabulary (`batch == 0` kept): see [`Shape::with_vocab`].
    pub fn with_vocab(&self, vocab: usize) -> Result<Self> {
        match self.batch() {
            0 => LinearShape::without_samples(self.seq(), self.hidden, vocab),
            b => LinearShape::new(b, self.seq(), self.hidden, vocab),
        }
    }

    /// Builds a shape from the dimensions of the hidden states (`[B, T, H]` or `[B·T, H]`), the
    /// weight (`[V, H]`) and the ids (`[B, T]`), checking ranks and that they agree: the ids give
    /// `B` and `T`, the weight `V` and `H`, and the hidden states must match both.
    ///
    /// ```
    /// use fused_weighted_loss::{Error, LinearShape};
    /// let s = LinearShape::from_dims(&[2, 8, 64], &[100, 64], &[2, 8])?;
    /// assert_eq!((s.batch(), s.seq(), s.hidden(), s.vocab()), (2, 8, 64, 100));
    /// assert_eq!(LinearShape::from_dims(&[16, 64], &[100, 64], &[2, 8])?, s);
    /// assert!(matches!(LinearShape::from_dims(&[2, 8, 32], &[100, 64], &[2, 8]), Err(Error::ShapeMismatch { .. })));
    /// assert!(matches!(LinearShape::from_dims(&[2, 8, 64], &[64], &[2, 8]), Err(Error::InputRank { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_dims(hidden: &[usize], weight: &[usize], ids: &[usize]) -> Result<Self> {
        let &[batch, seq] = ids else {
            return Err(Error::TokensRank { what: "ids", rank: ids.len(), dims: ids.to_vec() });
        };
        let &[vocab, h] = weight else {
            return Err(Error::InputRank { what: "weight", expected: "[vocab, hidden]", dims: weight.to_vec() });
        };
        let expected = match hidden.len() {
            2 => vec![batch.checked_mul(seq).ok_or(Error::SizeOverflow { product: "batch * seq" })?, h],
            3 => vec![batch, seq, h],
            _ => {
                return Err(Error::InputRank {
                    what: "hidden",
                    expected: "[batch, seq, hidden] or [batch * seq, hidden]",
                    dims: hidden.to_vec(),
                })
            }
        };
        if hidden != expected.as_slice() {
            return Err(Error::ShapeMismatch { what: "hidden", expected, got: hidden.to_vec() });
        }
        LinearShape::new(batch, seq, h, vocab)
    }

    /// [`from_dims`](Self::from_dims) for a rank of a sharded call: ids `[0, T]` (and hidden
    /// states `[0, T, H]` or `[0, H]`) give [`LinearShape::without_samples`] rather than
    /// [`Error::EmptyBatch`].
    ///
    /// ```
    /// use fused_weighted_loss::LinearShape;
    /// let empty = LinearShape::without_samples(8, 64, 100)?;
    /// assert_eq!(LinearShape::from_dims_of_rank(&[0, 64], &[100, 64], &[0, 8])?, empty);
    /// assert_eq!(LinearShape::from_dims_of_rank(&[0, 8, 64], &[100, 64], &[0, 8])?, empty);
    /// assert!(LinearShape::from_dims_of_rank(&[8, 64], &[100, 64], &[0, 8]).is_err());
    /// assert!(LinearShape::from_dims_of_rank(&[0, 7, 64], &[100, 64], &[0, 8]).is_err()); // T
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn from_dims_of_rank(hidden: &[usize], weight: &[usize], ids: &[usize]) -> Result<Self> {
        let &[0, seq] = ids else { return Self::from_dims(hidden, weight, ids) };
        // checked as a batch of one sample's `T` rows, then made empty
        let one: Vec<usize> = match hidden {
            [0, h] => vec![seq, *h],
            [0, t, h] if *t == seq => vec![1, seq, *h],
            // no rows beside ids of no samples: `[0, H]` or `[0, T, H]`
            [_, h] => return Err(Error::ShapeMismatch { what: "hidden", expected: vec![0, *h], got: hidden.to_vec() }),
            [_, _, h] => {
                return Err(Error::ShapeMismatch { what: "hidden", expected: vec![0, seq, *h], got: hidden.to_vec() })
            }
            _ => return Err(Self::from_dims(hidden, weight, ids).err().unwrap_or(Error::EmptyBatch)),
        };
        let s = Self::from_dims(&one, weight, &[1, seq])?;
        Self::without_samples(seq, s.hidden, s.vocab())
    }

    /// Checks that a bias's dimensions are `[V]`.
    ///
    /// ```
    /// use fused_weighted_loss::LinearShape;
    /// let s = LinearShape::new(2, 8, 64, 100)?;
    /// assert!(s.check_bias_dims(&[100]).is_ok());
    /// assert!(s.check_bias_dims(&[1, 100]).is_err());
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn check_bias_dims(&self, dims: &[usize]) -> Result<()> {
        if dims != [self.vocab()] {
            return Err(Error::ShapeMismatch { what: "bias", expected: vec![self.vocab()], got: dims.to_vec() });
        }
        Ok(())
    }

    /// The `[B, T, V]` shape the loss sees (the logits that are never built).
    pub const fn tokens(&self) -> Shape {
        self.tokens
    }
    /// Samples (`B`).
    pub const fn batch(&self) -> usize {
        self.tokens.batch()
    }
    /// Positions per sample (`T`).
    pub const fn seq(&self) -> usize {
        self.tokens.seq()
    }
    /// Hidden size (`H`).
    pub const fn hidden(&self) -> usize {
        self.hidden
    }
    /// Vocabulary size (`V`).
    pub const fn vocab(&self) -> usize {
        self.tokens.vocab()
    }
    /// Token rows, `N = B·T`.
    pub const fn rows(&self) -> usize {
        self.tokens.rows()
    }
    /// Elements of the hidden states and of their gradient, `N·H`.
    pub const fn hidden_len(&self) -> usize {
        self.rows() * self.hidden
    }
    /// Elements of the weight and of its gradient, `V·H`.
    pub const fn weight_len(&self) -> usize {
        self.vocab() * self.hidden
    }
}

impl std::fmt::Display for LinearShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} x {}] hidden {}, vocab {}", self.batch(), self.seq(), self.hidden, self.vocab())
    }
}

/// The floating-point inputs of a fused linear call, all of one dtype: hidden states `[N, H]`,
/// weight `[V, H]` and optional bias `[V]`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct LinearInputs<'a, L: Logit> {
    pub(crate) hidden: &'a [L],
    pub(crate) weight: &'a [L],
    pub(crate) bias: Option<&'a [L]>,
}

impl<'a, L: Logit> LinearInputs<'a, L> {
    /// Hidden states and weight, no bias.
    pub fn new(hidden: &'a [L], weight: &'a [L]) -> Self {
        LinearInputs { hidden, weight, bias: None }
    }
    /// Adds a bias `[V]`.
    pub fn with_bias(self, bias: &'a [L]) -> Self {
        LinearInputs { bias: Some(bias), ..self }
    }
    pub(crate) fn check(&self, shape: LinearShape) -> Result<()> {
        let t = shape.tokens;
        check_len("hidden", self.hidden.len(), shape.hidden_len(), t)?;
        check_len("weight", self.weight.len(), shape.weight_len(), t)?;
        if let Some(b) = self.bias {
            check_len("bias", b.len(), shape.vocab(), t)?;
        }
        Ok(())
    }
}

/// Where the gradients of a fused linear call go: `d hidden` `[N, H]` (overwritten), `d weight`
/// `[V, H]` and `d bias` `[V]` (overwritten, or added to with [`accumulate`](Self::accumulate)),
/// each [`Grad::Skip`], [`Grad::Into`] (the inputs' dtype) or [`Grad::IntoF32`].
#[derive(Debug)]
pub struct LinearGrads<'a, L: Logit> {
    pub(crate) hidden: Grad<'a, L>,
    pub(crate) weight: Grad<'a, L>,
    pub(crate) bias: Grad<'a, L>,
    pub(crate) accumulate: bool,
}

impl<L: Logit> Default for LinearGrads<'_, L> {
    fn default() -> Self {
        LinearGrads { hidden: Grad::Skip, weight: Grad::Skip, bias: Grad::Skip, accumulate: false }
    }
}

impl<'a, L: Logit> LinearGrads<'a, L> {
    /// Whether any gradient is asked for.
    pub(crate) fn wants_any(&self) -> bool {
        [&self.hidden, &self.weight, &self.bias].iter().any(|g| !matches!(g, Grad::Skip))
    }

    /// No gradients (the loss only); add them with the methods below.
    pub fn new() -> Self {
        Self::default()
    }
    /// `d hidden`, `N·H` elements.
    pub fn hidden(self, g: Grad<'a, L>) -> Self {
        LinearGrads { hidden: g, ..self }
    }
    /// `d weight`, `V·H` elements.
    pub fn weight(self, g: Grad<'a, L>) -> Self {
        LinearGrads { weight: g, ..self }
    }
    /// `d bias`, `V` elements (only with a bias input).
    pub fn bias(self, g: Grad<'a, L>) -> Self {
        LinearGrads { bias: g, ..self }
    }
    /// Adds into `d weight` and `d bias` instead of overwriting them (gradient accumulation
    /// across micro-batches, or a tied embedding's other gradient). `d hidden` is always written.
    pub fn accumulate(self, on: bool) -> Self {
        LinearGrads { accumulate: on, ..self }
    }
    pub(crate) fn check(&self, shape: LinearShape, has_bias: bool) -> Result<()> {
        let t = shape.tokens;
        if let Some(n) = self.hidden.len() {
            check_len("d hidden", n, shape.hidden_len(), t)?;
        }
        if let Some(n) = self.weight.len() {
            check_len("d weight", n, shape.weight_len(), t)?;
        }
        if let Some(n) = self.bias.len() {
            if !has_bias {
                return Err(Error::Unsupported("a bias gradient was asked for without a bias input".into()));
            }
            check_len("d bias", n, shape.vocab(), t)?;
        }
        Ok(())
    }
}

/// How a fused linear call cuts the tokens into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Chunking {
    /// The backend's default budget: [`CPU_BUDGET`] (24 MiB) on the CPU, whatever the thread count,
    /// `cuda::linear::DEFAULT_BUDGET` (160 MiB) on CUDA.
    #[default]
    Auto,
    /// At most this many bytes of chunk buffers, the per-row part of the memory (at least one
    /// row is always used); the fixed parts (on the CPU, 16-bit inputs' f32 panel copies of
    /// ~4 MiB and an f32 bias's buffers) come on top, and `scratch_bytes` reports both. Not
    /// in either: the CPU rows pass's working row of `4V` bytes per running task (README,
    /// "Memory"). Under a vocabulary split each rank's chunk rows come from the even share
    /// `ceil(V / ranks)`: a rank holding a larger slice uses more than the budget, in
    /// proportion.
    Budget(usize),
    /// Exactly this many token rows per chunk (at least 1; more than `N` means one chunk).
    Rows(usize),
}

impl Chunking {
    /// Rows per chunk for a budget-free per-row cost, within `[1, max_rows]`.
    pub(crate) fn rows_for(self, default_budget: usize, row_bytes: usize, max_rows: usize) -> Result<usize> {
        let rows = match self {
            Chunking::Rows(0) => return Err(Error::InvalidChunking("0 rows per chunk".into())),
            Chunking::Rows(c) => c,
            Chunking::Auto => default_budget / row_bytes.max(1),
            Chunking::Budget(b) => b / row_bytes.max(1),
        };
        Ok(rows.clamp(1, max_rows.max(1)))
    }
}

/// The results of a fused linear call; the gradients are in the caller's buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearOutput {
    /// The loss, per-sample losses, weights, valid tokens and backend, as the logits path
    /// reports them.
    pub loss: LossOutput,
    /// Token rows per chunk (`C`; 0 when no chunk ran: no row has a target, or a rank without
    /// samples).
    pub chunk_rows: usize,
    /// Chunks the call ran.
    pub chunks: usize,
    /// Bytes of chunk buffers the call allocated (beyond the `O(B·T)` plan).
    pub scratch_bytes: usize,
}

impl LossSpec {
    /// The backend [`linear_loss_and_grad`](Self::linear_loss_and_grad) runs on here: as
    /// [`resolved_backend`](Self::resolved_backend), except that [`Backend::Auto`](crate::Backend::Auto)
    /// also needs cuBLAS for the GPU's products, and without it takes the CPU (a call of a shape
    /// beyond the GPU path's 32-bit fields takes it too).
    pub fn resolved_linear_backend(&self) -> Result<crate::Backend> {
        let backend = self.resolved_backend()?;
        #[cfg(feature = "cuda")]
        if backend == crate::Backend::Cuda
            && self.backend == crate::Backend::Auto
            && crate::cuda::cublas_status().is_err()
        {
            return Ok(crate::Backend::Cpu);
        }
        Ok(backend)
    }

    /// The loss of `hidden·Wᵀ (+ bias)` with this spec, and the gradients asked for in `grads`,
    /// in chunks of token rows (see the [module docs](crate::linear)); the logits never exist.
    ///
    /// Every input is validated before any work starts; on error nothing has been written
    /// (except for [`Error::NonFinite`] with `check_finite`, found after the gradients). The
    /// CPU backend takes at most `u32::MAX` token rows ([`Error::Unsupported`] beyond) and
    /// allocates its chunk buffers fallibly ([`Error::OutOfMemory`] for a [`Chunking::Rows`]
    /// this machine cannot hold).
    pub fn linear_loss_and_grad<L: Logit, I: TokenId>(
        &self,
        shape: LinearShape,
        inputs: LinearInputs<'_, L>,
        tokens: Tokens<'_, I>,
        grads: LinearGrads<'_, L>,
        chunking: Chunking,
    ) -> Result<LinearOutput> {
        inputs.check(shape)?;
        grads.check(shape, inputs.bias.is_some())?;
        chunking.rows_for(1, 1, 1)?;
        let backend = self.resolved_linear_backend()?;
        // `Auto` takes the CPU for a shape beyond the GPU path's 32-bit fields
        #[cfg(feature = "cuda")]
        let backend = crate::auto_within(self.backend, backend, crate::cuda::linear::linear_shape_fits(shape));
        let wants_grad = grads.wants_any();
        #[cfg(feature = "cuda")]
        if backend == crate::Backend::Cuda {
            // found on the device only after the gradients came back (or not at all, for a
            // gradient factor beyond f32): checked before they do
            self.plan_checked(shape.tokens, &tokens, wants_grad, backend)?;
            return crate::cuda::linear::run_host(self, shape, inputs, tokens, grads, chunking);
        }
        let plan = self.plan_checked(shape.tokens, &tokens, wants_grad, backend)?;
        let k = crate::cpu_kernels(self.cpu_simd)?;
        let (row_loss, chunks) = cpu::run(&k, &plan, shape, &inputs, grads, chunking)?;
        Ok(LinearOutput {
            loss: plan.finish(&row_loss, self.check_finite, backend, None)?,
            chunk_rows: chunks.rows,
            chunks: chunks.count,
            scratch_bytes: chunks.scratch_bytes,
        })
    }
}

/// How a call was chunked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunks {
    pub rows: usize,
    pub count: usize,
    pub scratch_bytes: usize,
}

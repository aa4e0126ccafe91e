//! Options (here), shapes (`shape`) and the token inputs, results and their validation
//! (`tokens`): everything a backend receives has been checked here first.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

mod shape;
mod tokens;

pub use shape::{Shape, MAX_VOCAB};
pub(crate) use tokens::{check_len, validate_tokens, validate_tokens_of_rank};
pub use tokens::{LossOutput, Tokens};

/// How a sample's per-token losses are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RowMean {
    /// Divide by `T - 1`, ignored targets counting as 0 (the course function: `loss.mean(axis=1)`).
    #[default]
    AllPositions,
    /// Divide by the number of non-ignored targets; a sample with none contributes 0 (never NaN).
    ValidTokens,
}

/// How the weighted per-sample losses are combined into the batch loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// `mean_b(loss_b * w_b)`: divide by `B` (the course function).
    #[default]
    Mean,
    /// `sum_b(loss_b * w_b) / sum_b(w_b)`; when every weight is 0, `sum_b(loss_b * 0)`: 0, or
    /// NaN where a sample's loss is not finite (a zero weight does not hide a NaN).
    WeightedMean,
    /// `sum_b(loss_b * w_b)`.
    Sum,
}

/// Where the computation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// CUDA when the crate is built with `cuda`, a device is present and the spec is within the
    /// kernels' limits (at most 64 keywords); the CPU otherwise.
    #[default]
    Auto,
    /// The fused CPU implementation (always available).
    Cpu,
    /// The fused CUDA kernel (feature `cuda`, a driver and a device).
    Cuda,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        })
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "cpu" => Ok(Backend::Cpu),
            "cuda" | "gpu" => Ok(Backend::Cuda),
            other => Err(format!("unknown backend '{other}' (expected auto, cpu or cuda)")),
        }
    }
}

impl FromStr for RowMean {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "all" | "all-positions" => Ok(RowMean::AllPositions),
            "valid" | "valid-tokens" => Ok(RowMean::ValidTokens),
            other => Err(format!("unknown row mean '{other}' (expected all or valid)")),
        }
    }
}

impl FromStr for Reduction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "mean" => Ok(Reduction::Mean),
            "weighted-mean" | "weighted_mean" => Ok(Reduction::WeightedMean),
            "sum" => Ok(Reduction::Sum),
            other => Err(format!("unknown reduction '{other}' (expected mean, weighted-mean or sum)")),
        }
    }
}

/// The instruction set of the CPU backend.
///
/// `Auto` takes the best this CPU has. Results are bit-identical across runs and thread counts at
/// any level, and across machines at the same level; `Portable` runs everywhere, so it gives the
/// same bits on every CPU (at some cost in speed). The fused linear path's matrix products are the
/// `gemm` crate's, which picks its own instruction set: its bits are the same across runs and
/// thread counts on one machine, not across CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CpuSimd {
    /// The best level this CPU supports.
    #[default]
    Auto,
    /// x86-64 AVX-512 (F, BW, VL, DQ) with FMA.
    Avx512,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// The build target's baseline vector unit (SSE2 on x86-64, NEON on aarch64), no FMA.
    Portable,
}

impl fmt::Display for CpuSimd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuSimd::Auto => "auto",
            CpuSimd::Avx512 => "avx512",
            CpuSimd::Avx2 => "avx2",
            CpuSimd::Portable => "portable",
        })
    }
}

impl FromStr for CpuSimd {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(CpuSimd::Auto),
            "avx512" | "avx-512" => Ok(CpuSimd::Avx512),
            "avx2" => Ok(CpuSimd::Avx2),
            "portable" | "scalar" => Ok(CpuSimd::Portable),
            other => Err(format!("unknown SIMD level '{other}' (expected auto, avx512, avx2 or portable)")),
        }
    }
}

/// One keyword id and the weight each of its occurrences adds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keyword {
    /// The token id.
    pub id: i64,
    /// What one occurrence adds to `1 + hits` (1.0 in the course function).
    pub weight: f64,
}

/// The validated options of the loss. [`LossSpec::default()`] is the course function exactly:
/// no keywords, `alpha = 1`, `ignore_index = -100`, [`RowMean::AllPositions`], [`Reduction::Mean`].
///
/// ```
/// use fused_weighted_loss::{LossSpec, RowMean};
/// let spec = LossSpec::builder()
///     .keywords([3, 17, 40])
///     .alpha(1.0)
///     .row_mean(RowMean::ValidTokens)
///     .build()?;
/// assert_eq!(spec.keywords().len(), 3);
/// # Ok::<(), fused_weighted_loss::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    pub(crate) keywords: Vec<Keyword>,
    pub(crate) alpha: f64,
    pub(crate) ignore_index: i64,
    pub(crate) row_mean: RowMean,
    pub(crate) reduction: Reduction,
    pub(crate) grad_scale: f64,
    pub(crate) z_loss: f64,
    pub(crate) label_smoothing: f64,
    pub(crate) softcap: Option<f64>,
    pub(crate) check_finite: bool,
    pub(crate) backend: Backend,
    pub(crate) cpu_simd: CpuSimd,
}

impl Default for LossSpec {
    fn default() -> Self {
        LossSpec {
            keywords: Vec::new(),
            alpha: 1.0,
            ignore_index: -100,
            row_mean: RowMean::AllPositions,
            reduction: Reduction::Mean,
            grad_scale: 1.0,
            z_loss: 0.0,
            label_smoothing: 0.0,
            softcap: None,
            check_finite: false,
            backend: Backend::Auto,
            cpu_simd: CpuSimd::Auto,
        }
    }
}

impl LossSpec {
    /// Starts a builder from the defaults.
    pub fn builder() -> LossSpecBuilder {
        LossSpecBuilder { spec: LossSpec::default() }
    }
    /// A builder seeded with this spec, to change a few options.
    pub fn to_builder(&self) -> LossSpecBuilder {
        LossSpecBuilder { spec: self.clone() }
    }
    /// The keywords, in the order given (duplicates kept: each counts).
    pub fn keywords(&self) -> &[Keyword] {
        &self.keywords
    }
    /// `alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// The label value that marks a position with no target.
    pub fn ignore_index(&self) -> i64 {
        self.ignore_index
    }
    /// The per-sample averaging.
    pub fn row_mean(&self) -> RowMean {
        self.row_mean
    }
    /// The batch reduction.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }
    /// The upstream gradient scale the gradient is multiplied by.
    pub fn grad_scale(&self) -> f64 {
        self.grad_scale
    }
    /// The z-loss coefficient (0: off).
    pub fn z_loss(&self) -> f64 {
        self.z_loss
    }
    /// The label-smoothing factor `ε` (0: off).
    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing
    }
    /// The logit soft-cap `c` (`None`: off).
    pub fn softcap(&self) -> Option<f64> {
        self.softcap
    }
    /// Whether a non-finite per-position loss is an error.
    pub fn check_finite(&self) -> bool {
        self.check_finite
    }
    /// The requested backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// The requested CPU instruction set.
    pub fn cpu_simd(&self) -> CpuSimd {
        self.cpu_simd
    }
}

/// Builder for [`LossSpec`]; [`build`](Self::build) validates.
#[derive(Debug, Clone)]
pub struct LossSpecBuilder {
    spec: LossSpec,
}

impl LossSpecBuilder {
    /// Keyword ids, each occurrence adding 1 to the sample's hit count. A repeated id counts
    /// twice, as in the course function. Replaces earlier keywords.
    pub fn keywords<K: Into<i64>>(mut self, ids: impl IntoIterator<Item = K>) -> Self {
        self.spec.keywords = ids.into_iter().map(|id| Keyword { id: id.into(), weight: 1.0 }).collect();
        self
    }
    /// Keyword ids with a weight per keyword. Replaces earlier keywords.
    pub fn weighted_keywords<K: Into<i64>>(mut self, ids: impl IntoIterator<Item = (K, f64)>) -> Self {
        self.spec.keywords = ids.into_iter().map(|(id, weight)| Keyword { id: id.into(), weight }).collect();
        self
    }
    /// The weight scale (default 1.0): `w_b = alpha * (1 + hits_b)`.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.spec.alpha = alpha;
        self
    }
    /// The label value that marks "no target" (default -100).
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.spec.ignore_index = ignore_index;
        self
    }
    /// The per-sample averaging (default [`RowMean::AllPositions`]).
    pub fn row_mean(mut self, row_mean: RowMean) -> Self {
        self.spec.row_mean = row_mean;
        self
    }
    /// The batch reduction (default [`Reduction::Mean`]).
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.spec.reduction = reduction;
        self
    }
    /// The upstream gradient (`dL_total/dloss`) the gradient is scaled by (default 1.0). Must be
    /// finite. Gradient entries are f32: a call on host buffers that writes a gradient refuses a
    /// per-row factor `grad_scale · w_b / (D · N_b)` (times a token weight) beyond f32's range
    /// ([`Error::InvalidOption`] naming `grad_scale, alpha, the keyword weights and the token weights`, before
    /// anything is written), whose entries would be infinite or NaN while the loss, in f64,
    /// stays right; a loss-only call takes it (a host call that runs on CUDA checks the factor
    /// as the kernels form it: the sample's part rounded to f32 before the token weight
    /// multiplies it). The calls on device buffers and the sharded calls do not check it (their
    /// factors are made on the device or after an exchange). A factor
    /// below f32's smallest subnormal (about 1.4e-45) gives zero entries. Keep the scale, alpha
    /// and token weights within a few orders of magnitude of 1.
    ///
    /// ```
    /// use fused_weighted_loss::{Error, Grad, LossSpec, Shape, Tokens};
    /// let (shape, ids) = (Shape::new(1, 2, 3)?, [0i64, 2]);
    /// let spec = LossSpec::builder().grad_scale(1e40).build()?;
    /// let mut grad = [0f32; 6];
    /// let e = spec.loss_and_grad(shape, &[0.5f32; 6], Tokens::new(&ids), Grad::Into(&mut grad));
    /// assert!(matches!(e, Err(Error::InvalidOption { .. }))); // 1e40 per row: beyond f32
    /// assert!(spec.loss_and_grad(shape, &[0.5f32; 6], Tokens::new(&ids), Grad::Skip).is_ok());
    /// # Ok::<(), Error>(())
    /// ```
    pub fn grad_scale(mut self, grad_scale: f64) -> Self {
        self.spec.grad_scale = grad_scale;
        self
    }
    /// Adds the z-loss of PaLM, `z_loss · lse²` per token (`lse` the log-sum-exp of the row, after
    /// soft-capping), to each token's loss; its gradient is `2 · z_loss · lse · softmax`. The
    /// z-loss part of the batch loss is reported in [`LossOutput::z_loss`]. Default 0 (off);
    /// must be finite and `>= 0`.
    pub fn z_loss(mut self, coef: f64) -> Self {
        self.spec.z_loss = coef;
        self
    }
    /// Uniform label smoothing `ε`: each token's cross-entropy becomes
    /// `(1 − ε) · (lse − z[target]) + ε · (lse − mean_v z_v)`, as PyTorch's
    /// `cross_entropy(label_smoothing=ε)`; the gradient is `softmax − (1 − ε) · onehot − ε / V`.
    /// Ignored targets stay 0. Default 0 (off); must be in `[0, 1]`.
    pub fn label_smoothing(mut self, eps: f64) -> Self {
        self.spec.label_smoothing = eps;
        self
    }
    /// Logit soft-capping (Gemma 2): the loss sees `c · tanh(z / c)` instead of `z`, and the
    /// gradient gets the chain factor `1 − tanh²(z / c)`. Applied before the other options.
    /// `None` (default) is off; `c` must be a normal, finite f32 (1.2e-38 to 3.4e38: the kernels
    /// divide by it in f32).
    ///
    /// ```
    /// use fused_weighted_loss::LossSpec;
    /// let spec = LossSpec::builder().softcap(30.0).z_loss(1e-4).label_smoothing(0.1).build()?;
    /// assert_eq!(spec.softcap(), Some(30.0));
    /// assert!(LossSpec::builder().softcap(0.0).build().is_err());
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn softcap(mut self, cap: impl Into<Option<f64>>) -> Self {
        self.spec.softcap = cap.into();
        self
    }
    /// Makes a non-finite per-position loss an error ([`Error::NonFinite`]) instead of
    /// propagating it as PyTorch does (default off). `-inf` logits on non-target entries, the
    /// usual way to mask a vocabulary, stay accepted, except with label smoothing without
    /// soft-capping: its term `ε · (lse − mean z)` is then `+inf` (as in PyTorch), an error here.
    /// On a data-parallel group the one calls (`parallel::Sharded`, `cuda::split::DeviceSharded`
    /// and its steps' `combine_loss`) fail every rank together ([`Error::NonFiniteInGroup`] on the
    /// ranks whose own positions are finite); the host steps `parallel::ShardedLoss` check this
    /// rank's positions only. The losses are checked, not the gradient entries (a factor beyond
    /// f32's range, which made every entry of its row infinite or NaN, is refused before the
    /// pass on host buffers: see [`grad_scale`](Self::grad_scale)).
    pub fn check_finite(mut self, on: bool) -> Self {
        self.spec.check_finite = on;
        self
    }
    /// The backend (default [`Backend::Auto`]).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.spec.backend = backend;
        self
    }
    /// The CPU backend's instruction set (default [`CpuSimd::Auto`]). A level this CPU lacks is
    /// an [`Error::BackendUnavailable`] when the CPU backend runs.
    pub fn cpu_simd(mut self, level: CpuSimd) -> Self {
        self.spec.cpu_simd = level;
        self
    }
    /// Validates the options.
    ///
    /// ```
    /// use fused_weighted_loss::{Error, LossSpec};
    /// assert!(matches!(LossSpec::builder().alpha(-1.0).build(), Err(Error::InvalidAlpha(_))));
    /// assert!(matches!(
    ///     LossSpec::builder().weighted_keywords([(5, f64::NAN)]).build(),
    ///     Err(Error::InvalidKeywordWeight { id: 5, .. })
    /// ));
    /// ```
    pub fn build(self) -> Result<LossSpec> {
        let mut s = self.spec;
        // -0 is 0 (`-0.0 >= 0.0`): kept, it came out as weights and losses of -0
        for x in [&mut s.alpha, &mut s.z_loss, &mut s.label_smoothing] {
            *x += 0.0;
        }
        for k in &mut s.keywords {
            k.weight += 0.0;
        }
        if !(s.alpha.is_finite() && s.alpha >= 0.0) {
            return Err(Error::InvalidAlpha(s.alpha));
        }
        for k in &s.keywords {
            if !(k.weight.is_finite() && k.weight >= 0.0) {
                return Err(Error::InvalidKeywordWeight { id: k.id, weight: k.weight });
            }
        }
        let bad = |name, value, expected| Err(Error::InvalidOption { name, value, expected });
        if !(s.z_loss.is_finite() && s.z_loss >= 0.0) {
            return bad("z_loss", s.z_loss, "finite and >= 0");
        }
        if !(0.0..=1.0).contains(&s.label_smoothing) {
            return bad("label_smoothing", s.label_smoothing, "in [0, 1]");
        }
        if let Some(c) = s.softcap {
            if !(c.is_finite() && c > 0.0) {
                return bad("softcap", c, "finite and > 0");
            }
            // f32 kernels divide by c: it must stay a finite, normal f32
            if !(c >= f32::MIN_POSITIVE as f64 && c <= f32::MAX as f64) {
                return bad("softcap", c, "a normal f32 (1.2e-38 to 3.4e38)");
            }
        }
        if !s.grad_scale.is_finite() {
            return Err(Error::InvalidGradScale(s.grad_scale));
        }
        Ok(s)
    }
}

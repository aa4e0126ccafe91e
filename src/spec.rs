//! Options, shapes and validation: everything a backend receives has been checked here first.

use crate::dtype::TokenId;
use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// The largest vocabulary the kernels index within one row (`i32::MAX`).
pub const MAX_VOCAB: usize = i32::MAX as usize;

/// A validated `[batch, seq, vocab]` shape: `batch >= 1`, `seq >= 2`, `1 <= vocab <= MAX_VOCAB`,
/// and `batch * seq * vocab` fits in `usize` (all offsets are 64-bit). The one exception,
/// [`Shape::without_samples`], has `batch == 0`: the shape of a data-parallel rank that holds
/// no samples this step, which only the sharded calls accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    batch: usize,
    seq: usize,
    vocab: usize,
}

impl Shape {
    /// Validates and builds a shape.
    ///
    /// ```
    /// use fused_weighted_loss::{Error, Shape};
    /// let s = Shape::new(2, 128, 50_000)?;
    /// assert_eq!(s.logits_len(), 2 * 128 * 50_000);
    /// assert!(matches!(Shape::new(2, 1, 10), Err(Error::SequenceTooShort { seq: 1 })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn new(batch: usize, seq: usize, vocab: usize) -> Result<Self> {
        if batch == 0 {
            return Err(Error::EmptyBatch);
        }
        if seq < 2 {
            return Err(Error::SequenceTooShort { seq });
        }
        if vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        if vocab > MAX_VOCAB {
            return Err(Error::VocabTooLarge { vocab, max: MAX_VOCAB });
        }
        batch.checked_mul(seq).and_then(|r| r.checked_mul(vocab)).ok_or(Error::SizeOverflow)?;
        Ok(Shape { batch, seq, vocab })
    }

    /// The shape of a rank of a data-parallel group that holds no samples this step (an uneven
    /// last batch): `[0, seq, vocab]`, `seq` and `vocab` checked as [`Shape::new`] checks them.
    /// Only the sharded calls (`parallel::Sharded`, and `cuda::split::DeviceSharded` with the
    /// `cuda` feature) accept it, and only with a data group of more than one rank: the rank
    /// takes part in the group's exchanges with nothing and gets the loss of its peers' samples.
    /// Every other call returns [`Error::EmptyBatch`] for it.
    ///
    /// ```
    /// use fused_weighted_loss::{Error, LossSpec, Grad, Shape, Tokens};
    /// let empty = Shape::without_samples(128, 50_000)?;
    /// assert_eq!((empty.batch(), empty.rows(), empty.logits_len()), (0, 0, 0));
    /// let none: [i64; 0] = [];
    /// let plain = LossSpec::default().loss_and_grad::<f32, i64>(empty, &[], Tokens::new(&none), Grad::Skip);
    /// assert!(matches!(plain, Err(Error::EmptyBatch)));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn without_samples(seq: usize, vocab: usize) -> Result<Self> {
        let one = Shape::new(1, seq, vocab)?;
        Ok(Shape { batch: 0, ..one })
    }

    /// This shape with another vocabulary (`batch == 0` kept: see [`Shape::without_samples`]):
    /// what a rank of a vocabulary-parallel call, whose logits hold a slice, passes as the
    /// whole call's shape.
    ///
    /// ```
    /// use fused_weighted_loss::Shape;
    /// assert_eq!(Shape::new(2, 8, 100)?.with_vocab(400)?, Shape::new(2, 8, 400)?);
    /// assert_eq!(Shape::without_samples(8, 100)?.with_vocab(400)?, Shape::without_samples(8, 400)?);
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn with_vocab(&self, vocab: usize) -> Result<Self> {
        match self.batch {
            0 => Shape::without_samples(self.seq, vocab),
            b => Shape::new(b, self.seq, vocab),
        }
    }

    /// [`Error::EmptyBatch`] for a [`Shape::without_samples`]: what every call but the sharded
    /// ones checks first.
    pub(crate) fn require_samples(self) -> Result<Self> {
        if self.batch == 0 {
            return Err(Error::EmptyBatch);
        }
        Ok(self)
    }

    /// Builds a shape from the dimensions of the logits (`[B, T, V]`) and of the ids (`[B, T]`),
    /// checking ranks and that they agree.
    ///
    /// ```
    /// use fused_weighted_loss::{Error, Shape};
    /// assert!(Shape::from_dims(&[2, 8, 100], &[2, 8]).is_ok());
    /// assert!(matches!(Shape::from_dims(&[2, 8, 100], &[2, 9]), Err(Error::ShapeMismatch { .. })));
    /// assert!(matches!(Shape::from_dims(&[16, 100], &[2, 8]), Err(Error::LogitsRank { rank: 2, .. })));
    /// ```
    pub fn from_dims(logits: &[usize], ids: &[usize]) -> Result<Self> {
        if logits.len() != 3 {
            return Err(Error::LogitsRank { rank: logits.len(), dims: logits.to_vec() });
        }
        check_token_dims("ids", logits, ids)?;
        Shape::new(logits[0], logits[1], logits[2])
    }

    /// [`from_dims`](Self::from_dims) for a rank of a sharded call: a leading dimension of 0
    /// gives [`Shape::without_samples`] rather than [`Error::EmptyBatch`].
    ///
    /// ```
    /// use fused_weighted_loss::Shape;
    /// assert_eq!(Shape::from_dims_of_rank(&[0, 8, 100], &[0, 8])?, Shape::without_samples(8, 100)?);
    /// assert!(Shape::from_dims_of_rank(&[1, 8, 100], &[0, 8]).is_err());
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn from_dims_of_rank(logits: &[usize], ids: &[usize]) -> Result<Self> {
        match (logits, ids) {
            ([0, seq, vocab], [0, _]) => {
                check_token_dims("ids", logits, ids)?;
                Shape::without_samples(*seq, *vocab)
            }
            _ => Self::from_dims(logits, ids),
        }
    }

    /// Checks that a `[B, T]` token tensor's dimensions (ids or labels) match this shape.
    ///
    /// ```
    /// use fused_weighted_loss::Shape;
    /// let s = Shape::new(2, 8, 100)?;
    /// assert!(s.check_token_dims("labels", &[2, 8]).is_ok());
    /// assert!(s.check_token_dims("labels", &[2, 8, 1]).is_err());
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn check_token_dims(&self, what: &'static str, dims: &[usize]) -> Result<()> {
        check_token_dims(what, &[self.batch, self.seq, self.vocab], dims)
    }

    /// Samples in the batch (`B`).
    pub const fn batch(&self) -> usize {
        self.batch
    }
    /// Positions per sample (`T`).
    pub const fn seq(&self) -> usize {
        self.seq
    }
    /// Vocabulary size (`V`).
    pub const fn vocab(&self) -> usize {
        self.vocab
    }
    /// Logits rows, `B * T`.
    pub const fn rows(&self) -> usize {
        self.batch * self.seq
    }
    /// Elements of the logits (and of the gradient), `B * T * V`.
    pub const fn logits_len(&self) -> usize {
        self.batch * self.seq * self.vocab
    }
    /// Bytes a fused pass moves: the logits read once plus the gradient written once
    /// (`usize::MAX` if that does not fit).
    pub const fn fused_bytes(&self, logits: crate::DType, grad: crate::DType) -> usize {
        self.logits_len().saturating_mul(logits.size() + grad.size())
    }
}

/// Checks that a `[B, T]` token tensor matches the logits' `[B, T, V]`.
pub(crate) fn check_token_dims(what: &'static str, logits: &[usize], tokens: &[usize]) -> Result<()> {
    if tokens.len() != 2 {
        return Err(Error::TokensRank { what, rank: tokens.len(), dims: tokens.to_vec() });
    }
    if tokens[0] != logits[0] || tokens[1] != logits[1] {
        return Err(Error::ShapeMismatch { what, expected: logits[..2].to_vec(), got: tokens.to_vec() });
    }
    Ok(())
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}, {}]", self.batch, self.seq, self.vocab)
    }
}

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
/// same bits on every CPU (at some cost in speed).
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
    /// The upstream gradient (`dL_total/dloss`) the gradient is scaled by (default 1.0).
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
    /// `None` (default) is off; `c` must be finite and `> 0`.
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
    /// usual way to mask a vocabulary, stay accepted.
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
        let s = self.spec;
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

/// The token inputs of one call: ids `[B, T]` and optional labels `[B, T]` (default: the ids).
#[derive(Debug, Clone, Copy)]
pub struct Tokens<'a, I: TokenId> {
    pub(crate) ids: &'a [I],
    pub(crate) labels: Option<&'a [I]>,
    pub(crate) token_weights: Option<&'a [f32]>,
}

impl<'a, I: TokenId> Tokens<'a, I> {
    /// Ids only: the labels are the ids, as in the course function. Ids lie in `[0, V)` or equal
    /// `ignore_index`, which makes the position an ignored target (the course function's
    /// `CrossEntropyLoss` ignores it too); keywords are counted on the ids as given.
    pub fn new(ids: &'a [I]) -> Self {
        Tokens { ids, labels: None, token_weights: None }
    }
    /// Separate labels (values in `[0, V)` or `ignore_index`); keywords are still counted in the ids
    /// (which may hold `ignore_index` too).
    pub fn with_labels(self, labels: &'a [I]) -> Self {
        Tokens { labels: Some(labels), ..self }
    }
    /// Per-token weights `[B, T]`, aligned with the labels: `token_weights[b, t + 1]` multiplies the
    /// loss of row `(b, t)` (the one that predicts `labels[b, t + 1]`) before the row mean, and its
    /// gradient; `token_weights[b, 0]` is not used. Combined with the keyword sample weights.
    /// Values must be finite.
    ///
    /// ```
    /// use fused_weighted_loss::{Grad, LossSpec, Shape, Tokens};
    /// let shape = Shape::new(1, 3, 4)?;
    /// let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0, 1.5, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0];
    /// let ids = [1i64, 2, 3];
    /// let spec = LossSpec::default();
    /// // weight 0 on the prediction of ids[2]: the same as ignoring that label
    /// let weights = [1.0f32, 1.0, 0.0];
    /// let w = spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_token_weights(&weights), Grad::Skip)?;
    /// let labels = [1i64, 2, -100];
    /// let y = spec.loss_and_grad(shape, &logits, Tokens::new(&ids).with_labels(&labels), Grad::Skip)?;
    /// assert!((w.loss - y.loss).abs() <= 1e-7 * y.loss);
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn with_token_weights(self, weights: &'a [f32]) -> Self {
        Tokens { token_weights: Some(weights), ..self }
    }
    /// The per-token weights, if given.
    pub fn token_weights(&self) -> Option<&'a [f32]> {
        self.token_weights
    }
    /// The ids.
    pub fn ids(&self) -> &'a [I] {
        self.ids
    }
    /// The labels, if given.
    pub fn labels(&self) -> Option<&'a [I]> {
        self.labels
    }
}

impl<'a, I: TokenId> From<&'a [I]> for Tokens<'a, I> {
    fn from(ids: &'a [I]) -> Self {
        Tokens::new(ids)
    }
}

impl<'a, I: TokenId> From<&'a Vec<I>> for Tokens<'a, I> {
    fn from(ids: &'a Vec<I>) -> Self {
        Tokens::new(ids)
    }
}

/// The results of one call. The gradient, when asked for, is in the caller's buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The batch loss after the reduction.
    pub loss: f64,
    /// Each sample's mean per-token loss (before weighting).
    pub per_sample_loss: Vec<f64>,
    /// Each sample's weight `alpha * (1 + sum_k weight_k * count_k)`.
    pub weights: Vec<f64>,
    /// Each sample's number of non-ignored targets.
    pub valid_tokens: Vec<u64>,
    /// The z-loss part of `loss` (reduced like the loss: the same token weights, row means,
    /// sample weights and reduction); 0 when [`LossSpecBuilder::z_loss`] is off.
    pub z_loss: f64,
    /// The backend that ran ([`Backend::Cpu`] or [`Backend::Cuda`], never `Auto`).
    pub backend: Backend,
}

/// Checks a buffer's length against what the shape implies.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize, shape: Shape) -> Result<()> {
    if got != expected {
        return Err(Error::LengthMismatch { what, expected, got, shape });
    }
    Ok(())
}

/// Validates token inputs (lengths, ranges, keywords) without building anything.
pub(crate) fn validate_tokens<I: TokenId>(spec: &LossSpec, shape: Shape, tokens: &Tokens<'_, I>) -> Result<()> {
    shape.require_samples()?;
    validate_tokens_of_rank(spec, shape, tokens)
}

/// [`validate_tokens`] for a shape that may hold no samples (a sharded call's rank without
/// samples checks what its peers check before their first exchange).
pub(crate) fn validate_tokens_of_rank<I: TokenId>(spec: &LossSpec, shape: Shape, tokens: &Tokens<'_, I>) -> Result<()> {
    let (t, v) = (shape.seq, shape.vocab as i64);
    check_len("ids", tokens.ids.len(), shape.rows(), shape)?;
    if let Some(labels) = tokens.labels {
        check_len("labels", labels.len(), shape.rows(), shape)?;
    }
    for k in &spec.keywords {
        if !(0..v).contains(&k.id) {
            return Err(Error::KeywordOutOfRange { id: k.id, vocab: shape.vocab });
        }
    }
    let out_of_range =
        |what, i: usize, value| Error::IdOutOfRange { what, batch: i / t, position: i % t, value, vocab: shape.vocab };
    // an id equal to `ignore_index` is an ignored target where the ids are the labels (as in
    // the course function, whose `CrossEntropyLoss` ignores it)
    for (i, id) in tokens.ids.iter().enumerate() {
        let id = id.to_i64();
        if id != spec.ignore_index && !(0..v).contains(&id) {
            return Err(out_of_range("ids", i, id));
        }
    }
    if let Some(labels) = tokens.labels {
        for (i, y) in labels.iter().enumerate() {
            let y = y.to_i64();
            if y != spec.ignore_index && !(0..v).contains(&y) {
                return Err(out_of_range("labels", i, y));
            }
        }
    }
    if let Some(w) = tokens.token_weights {
        check_len("token_weights", w.len(), shape.rows(), shape)?;
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            return Err(Error::InvalidTokenWeight { batch: i / t, position: i % t, value: w[i] });
        }
    }
    Ok(())
}

//! Options, shapes and validation: everything a backend receives has been checked here first.

use crate::dtype::TokenId;
use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// The largest vocabulary the kernels index within one row (`i32::MAX`).
pub const MAX_VOCAB: usize = i32::MAX as usize;

/// A validated `[batch, seq, vocab]` shape: `batch >= 1`, `seq >= 2`, `1 <= vocab <= MAX_VOCAB`,
/// and `batch * seq * vocab` fits in `usize` (all offsets are 64-bit).
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
    /// `sum_b(loss_b * w_b) / sum_b(w_b)`; 0 when every weight is 0.
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
}

impl<'a, I: TokenId> Tokens<'a, I> {
    /// Ids only: the labels are the ids, as in the course function.
    pub fn new(ids: &'a [I]) -> Self {
        Tokens { ids, labels: None }
    }
    /// Separate labels (values in `[0, V)` or `ignore_index`); keywords are still counted in the ids.
    pub fn with_labels(self, labels: &'a [I]) -> Self {
        Tokens { labels: Some(labels), ..self }
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
    /// The backend that ran ([`Backend::Cpu`] or [`Backend::Cuda`], never `Auto`).
    pub backend: Backend,
}

/// Marks a row with no target (the last position, or an ignored label).
pub(crate) const NO_TARGET: u32 = u32::MAX;

/// Everything the kernels need that depends only on the tokens: validated once per call.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub shape: Shape,
    /// Per row `b*T + t`: the target id, or [`NO_TARGET`].
    pub targets: Vec<u32>,
    /// Per sample: `w_b` .
    pub weights: Vec<f64>,
    /// Per sample: non-ignored targets.
    pub valid: Vec<u64>,
    /// Per sample: what the sum of its per-token losses is divided by (0: contributes nothing).
    pub row_div: Vec<f64>,
    /// Per sample: `d loss / d loss_b` before the upstream scale (the reduction's factor).
    pub reduce: Vec<f64>,
    /// Per sample: the gradient coefficient `grad_scale * reduce_b / row_div_b`.
    pub coef: Vec<f32>,
}

/// Keywords merged by id (a repeated id's weights add up) and sorted, so that counting the hits
/// of a sample is one pass over its ids whatever the number of keywords.
struct KeywordTable(Vec<(i64, f64)>);

impl KeywordTable {
    fn new(keywords: &[Keyword]) -> Self {
        let mut v: Vec<(i64, f64)> = keywords.iter().map(|k| (k.id, k.weight)).collect();
        v.sort_by_key(|&(id, _)| id);
        v.dedup_by(|b, a| {
            let same = a.0 == b.0;
            if same {
                a.1 += b.1;
            }
            same
        });
        KeywordTable(v)
    }

    /// What one occurrence of `id` adds to the hit count (0 for a non-keyword).
    #[inline]
    fn weight(&self, id: i64) -> f64 {
        match self.0.binary_search_by_key(&id, |&(k, _)| k) {
            Ok(i) => self.0[i].1,
            Err(_) => 0.0,
        }
    }
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
    for (i, id) in tokens.ids.iter().enumerate() {
        let id = id.to_i64();
        if !(0..v).contains(&id) {
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
    Ok(())
}

impl LossSpec {
    /// Validates the tokens and works out targets, weights and per-sample coefficients.
    pub(crate) fn plan<I: TokenId>(&self, shape: Shape, tokens: &Tokens<'_, I>) -> Result<Plan> {
        validate_tokens(self, shape, tokens)?;
        let (b, t) = (shape.batch, shape.seq);
        let labels = tokens.labels.unwrap_or(tokens.ids);
        let table = KeywordTable::new(&self.keywords);
        let mut targets = vec![NO_TARGET; shape.rows()];
        let mut valid = vec![0u64; b];
        let mut weights = vec![0f64; b];
        for s in 0..b {
            for p in 0..t - 1 {
                let y = labels[s * t + p + 1].to_i64();
                if y != self.ignore_index {
                    // In range: checked by `validate_tokens`.
                    targets[s * t + p] = y as u32;
                    valid[s] += 1;
                }
            }
            let hits: f64 = tokens.ids[s * t..(s + 1) * t].iter().map(|id| table.weight(id.to_i64())).sum();
            weights[s] = self.alpha * (1.0 + hits);
        }
        let row_div: Vec<f64> = valid
            .iter()
            .map(|&n| match self.row_mean {
                RowMean::AllPositions => (t - 1) as f64,
                RowMean::ValidTokens => n as f64,
            })
            .collect();
        let denom = match self.reduction {
            Reduction::Mean => b as f64,
            Reduction::WeightedMean => weights.iter().sum(),
            Reduction::Sum => 1.0,
        };
        let reduce: Vec<f64> = weights.iter().map(|&w| if denom > 0.0 { w / denom } else { 0.0 }).collect();
        let coef = reduce
            .iter()
            .zip(&row_div)
            .map(|(&r, &d)| if d > 0.0 { (self.grad_scale * r / d) as f32 } else { 0.0 })
            .collect();
        Ok(Plan { shape, targets, weights, valid, row_div, reduce, coef })
    }
}

impl Plan {
    /// Combines per-row losses (0 for rows without a target) into the output, in a fixed order.
    pub(crate) fn finish(&self, row_loss: &[f64], check_finite: bool, backend: Backend) -> Result<LossOutput> {
        let t = self.shape.seq;
        let mut per_sample = Vec::with_capacity(self.shape.batch);
        for (s, rows) in row_loss.chunks_exact(t).enumerate() {
            let mut sum = 0f64;
            for (p, &l) in rows.iter().enumerate() {
                if self.targets[s * t + p] == NO_TARGET {
                    continue;
                }
                if check_finite && !l.is_finite() {
                    return Err(Error::NonFinite { batch: s, position: p, value: l });
                }
                sum += l;
            }
            per_sample.push(if self.row_div[s] > 0.0 { sum / self.row_div[s] } else { 0.0 });
        }
        let loss = per_sample.iter().zip(&self.reduce).map(|(l, r)| l * r).sum();
        Ok(LossOutput {
            loss,
            per_sample_loss: per_sample,
            weights: self.weights.clone(),
            valid_tokens: self.valid.clone(),
            backend,
        })
    }
}

//! The token inputs and the results of a call, and the validation of the tokens against a
//! shape and a spec.

use super::{Backend, LossSpec, Shape};
use crate::dtype::TokenId;
use crate::error::{Error, Result};

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
    /// gradient; `token_weights[b, 0]` is not used (but, like every value, must be finite).
    /// Combined with the keyword sample weights. Any finite value is taken, negative ones too
    /// (they turn a position's loss and gradient around, as `loss * w` does in PyTorch; alpha and
    /// the keyword weights, by contrast, must be at least 0). A weight of 0 removes a position's
    /// finite loss and its gradient; with [`RowMean::ValidTokens`](crate::RowMean::ValidTokens)
    /// the position still counts in its sample's divisor (an ignored label does not). It does not
    /// hide a non-finite loss: `0 · NaN` is NaN, in the loss, the row's gradient and
    /// [`check_finite`](crate::LossSpecBuilder::check_finite)'s verdict; to drop a position whose
    /// logits may not be finite, give it `ignore_index` in the labels instead.
    ///
    /// ```
    /// use fused_weighted_loss::{Grad, LossSpec, Shape, Tokens};
    /// let shape = Shape::new(1, 3, 4)?;
    /// let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0, 1.5, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0];
    /// let ids = [1i64, 2, 3];
    /// let spec = LossSpec::default();
    /// // weight 0 on the prediction of ids[2]: the same as ignoring that label (with the
    /// // default row mean over all positions)
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
    /// Each sample's row mean of its per-token losses (times the token weights, when given),
    /// before the sample weight.
    pub per_sample_loss: Vec<f64>,
    /// Each sample's weight `alpha * (1 + sum_k weight_k * count_k)`.
    pub weights: Vec<f64>,
    /// Each sample's number of non-ignored targets.
    pub valid_tokens: Vec<u64>,
    /// The z-loss part of `loss` (reduced like the loss: the same token weights, row means,
    /// sample weights and reduction); 0 when [`LossSpecBuilder::z_loss`](super::LossSpecBuilder::z_loss) is off.
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
    let (t, v) = (shape.seq(), shape.vocab() as i64);
    check_len("ids", tokens.ids.len(), shape.rows(), shape)?;
    if let Some(labels) = tokens.labels {
        check_len("labels", labels.len(), shape.rows(), shape)?;
    }
    for k in &spec.keywords {
        if !(0..v).contains(&k.id) {
            return Err(Error::KeywordOutOfRange { id: k.id, vocab: shape.vocab() });
        }
    }
    let out_of_range = |what, i: usize, value| Error::IdOutOfRange {
        what,
        batch: i / t,
        position: i % t,
        value,
        vocab: shape.vocab(),
    };
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

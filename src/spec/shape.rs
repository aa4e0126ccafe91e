//! The validated `[batch, seq, vocab]` shape of a call.

use crate::error::{Error, Result};
use std::fmt;

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
        batch
            .checked_mul(seq)
            .and_then(|r| r.checked_mul(vocab))
            .ok_or(Error::SizeOverflow { product: "batch * seq * vocab" })?;
        Ok(Shape { batch, seq, vocab })
    }

    /// The shape of a rank of a data-parallel group that holds no samples this step (an uneven
    /// last batch): `[0, seq, vocab]`, `seq` and `vocab` checked as [`Shape::new`] checks them.
    /// Only the sharded calls (`parallel::Sharded`, its host steps `parallel::ShardedLoss`, and
    /// `cuda::split::DeviceSharded` with the `cuda` feature) accept it, and only with a data
    /// group of more than one rank: the rank takes part in the group's exchanges with nothing
    /// and gets the loss of its peers' samples.
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
fn check_token_dims(what: &'static str, logits: &[usize], tokens: &[usize]) -> Result<()> {
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

//! The crate's error type. Every bad input reachable from the public API ends here, never in a panic.

use crate::spec::{Backend, Shape};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when computing the loss.
///
/// The enum is `#[non_exhaustive]`: new backends may add variants.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The logits do not have rank 3 (`[batch, seq, vocab]`).
    #[error("logits must have rank 3 [batch, seq, vocab], got rank {rank} {dims:?}")]
    LogitsRank {
        /// The rank that was given.
        rank: usize,
        /// The dimensions that were given.
        dims: Vec<usize>,
    },
    /// Ids or labels do not have rank 2 (`[batch, seq]`).
    #[error("{what} must have rank 2 [batch, seq], got rank {rank} {dims:?}")]
    TokensRank {
        /// `"ids"` or `"labels"`.
        what: &'static str,
        /// The rank that was given.
        rank: usize,
        /// The dimensions that were given.
        dims: Vec<usize>,
    },
    /// Two inputs disagree on a dimension.
    #[error("shape mismatch: {what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which input disagrees.
        what: &'static str,
        /// The shape implied by the logits.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// `batch == 0` (outside a data-parallel group of several ranks: see
    /// [`Shape::without_samples`]).
    #[error("batch size is 0")]
    EmptyBatch,
    /// No rank of a data-parallel group holds a sample: every rank called with
    /// [`Shape::without_samples`].
    #[error("batch size is 0 on every rank of the data group")]
    EmptyDataGroup,
    /// `seq < 2`: no position has a next-token target.
    #[error("sequence length is {seq}; at least 2 is needed (position t predicts id t+1)")]
    SequenceTooShort {
        /// The sequence length that was given.
        seq: usize,
    },
    /// `vocab == 0`.
    #[error("vocabulary size is 0")]
    EmptyVocab,
    /// `vocab` is larger than the kernels index within a row.
    #[error("vocabulary size {vocab} exceeds the supported maximum {max}")]
    VocabTooLarge {
        /// The vocabulary size that was given.
        vocab: usize,
        /// The largest supported vocabulary size.
        max: usize,
    },
    /// A product of the shape's sizes (`batch * seq * vocab` for logits; `batch * seq * hidden`
    /// or `vocab * hidden` for the fused linear path) does not fit in `usize`.
    #[error("{product} overflows the address space")]
    SizeOverflow {
        /// The product, as `batch * seq * vocab`.
        product: &'static str,
    },
    /// A flat buffer has the wrong number of elements for the shape.
    #[error("{what} has {got} elements, expected {expected} for shape {shape}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        got: usize,
        /// The shape the call was made with.
        shape: Shape,
    },
    /// An id or a label that is not `ignore_index` lies outside `[0, vocab)`.
    #[error("{what}[{batch}, {position}] = {value} is outside [0, {vocab})")]
    IdOutOfRange {
        /// `"ids"` or `"labels"`.
        what: &'static str,
        /// Sample index.
        batch: usize,
        /// Position in the sample.
        position: usize,
        /// The offending value.
        value: i64,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A keyword id lies outside `[0, vocab)`.
    #[error("keyword id {id} is outside [0, {vocab})")]
    KeywordOutOfRange {
        /// The offending keyword id.
        id: i64,
        /// The vocabulary size.
        vocab: usize,
    },
    /// `alpha` is negative, NaN or infinite.
    #[error("alpha must be finite and >= 0, got {}", Short(*.0))]
    InvalidAlpha(f64),
    /// A keyword weight is negative, NaN or infinite.
    #[error("weight of keyword {id} must be finite and >= 0, got {}", Short(*weight))]
    InvalidKeywordWeight {
        /// The keyword id.
        id: i64,
        /// The offending weight.
        weight: f64,
    },
    /// A value outside its range: a loss option (z-loss coefficient, label smoothing, soft-cap),
    /// sample weights (alpha and the keyword weights) whose product with the keyword counts, or
    /// under `WeightedMean` their sum, passes `f64`'s range, or another numeric argument named in
    /// `name` (a number of ranks, say).
    #[error("{name} must be {expected}, got {}", Short(*value))]
    InvalidOption {
        /// The option's builder method.
        name: &'static str,
        /// The offending value.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// A per-token weight is NaN or infinite.
    #[error("token_weights[{batch}, {position}] = {value} is not finite")]
    InvalidTokenWeight {
        /// Sample index.
        batch: usize,
        /// Position (aligned with the labels: it weights the loss of predicting this position).
        position: usize,
        /// The offending weight.
        value: f32,
    },
    /// The per-token loss buffer has the wrong length.
    #[error("per-token loss buffer has {got} elements, expected {expected} (batch * (seq - 1))")]
    TokenLossLength {
        /// `batch * (seq - 1)`.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// The upstream gradient scale is NaN or infinite.
    #[error("gradient scale must be finite, got {}", Short(*.0))]
    InvalidGradScale(f64),
    /// The gradient buffer has the wrong length.
    #[error("gradient buffer has {got} elements, expected {expected}")]
    GradLength {
        /// The length the call needs: `batch * seq * vocab` for the logits calls, the rows times
        /// the slice's width for a vocabulary slice, the source's length for a scale.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// With [`LossSpecBuilder::check_finite`](crate::LossSpecBuilder::check_finite), a position
    /// produced a non-finite loss (a NaN or `+inf` logit, a `-inf` target logit, or with label
    /// smoothing and no soft-capping any `-inf` logit).
    #[error("non-finite loss {value} at sample {batch}, position {position}")]
    NonFinite {
        /// Sample index.
        batch: usize,
        /// Position whose logits row gave the non-finite loss.
        position: usize,
        /// The loss value (NaN or ±inf).
        value: f64,
    },
    /// The requested backend cannot run here (not compiled in, no driver, no device).
    #[error("backend {backend} is not available: {reason}")]
    BackendUnavailable {
        /// The backend that was asked for.
        backend: Backend,
        /// Why it cannot run.
        reason: String,
    },
    /// The CUDA driver reported an error.
    #[error("CUDA error while {context}: {message}")]
    Cuda {
        /// What the crate was doing.
        context: &'static str,
        /// The driver's message.
        message: String,
    },
    /// A vocabulary slice (vocabulary-parallel calls) that is empty or does not fit the vocabulary.
    #[error("vocabulary slice [{start}, {start} + {len}) is empty or does not fit a vocabulary of {vocab}")]
    InvalidVocabSlice {
        /// First vocabulary id of the slice.
        start: usize,
        /// Ids in the slice.
        len: usize,
        /// The whole vocabulary.
        vocab: usize,
    },
    /// The slices of a vocabulary-parallel group do not cover the vocabulary exactly once.
    #[error("the vocabulary slices of the group (start, len in rank order: {slices:?}) do not tile [0, {vocab})")]
    SlicesDoNotTile {
        /// The whole vocabulary.
        vocab: usize,
        /// Each rank's `(start, len)`, in rank order.
        slices: Vec<(usize, usize)>,
    },
    /// The ranks of a vocabulary group name different vocabularies (in rank order).
    #[error(
        "the ranks of the vocabulary group name different vocabularies ({vocabs:?}): V must be the same on every rank"
    )]
    VocabMismatch {
        /// Each rank's vocabulary, in rank order.
        vocabs: Vec<usize>,
    },
    /// With [`LossSpecBuilder::check_finite`](crate::LossSpecBuilder::check_finite) on a data
    /// group: the group's loss is not finite, from a position of another rank's samples (the
    /// rank that holds it reports [`Error::NonFinite`]; every rank of the group fails), or with
    /// every position finite, from a total beyond `f64` (weighted losses near `f64::MAX`, which
    /// the single-device call returns as an infinite loss).
    #[error(
        "non-finite loss {value} over the data group (a non-finite position on another rank, or a sum beyond f64)"
    )]
    NonFiniteInGroup {
        /// The group's loss (NaN or ±inf).
        value: f64,
    },
    /// A rank of a sharded call's group ([`parallel::Sharded`](crate::parallel::Sharded)) failed
    /// before the call's first exchanges, on an error of its own (its ids or labels outside the
    /// vocabulary, its sample weights beyond `f64`, a buffer of the wrong length, ...): it took
    /// part in those exchanges with its words marked as failed and reports its own error; every
    /// other rank of its groups reports this one, rather than wait for it in a later exchange
    /// (no rank has written a gradient then).
    /// On a 2-D grid the rank named may be one that learned of the failure from its other group,
    /// or one whose vocabulary group failed its first exchange's checks (slices, shapes).
    #[error(
        "rank {rank} of the {group} group failed before or in the first exchanges of this call (its own error is \
         reported on that rank); no gradient was written on this rank"
    )]
    PeerFailed {
        /// `"data"` or `"vocabulary"`: the group whose exchange carried the failure.
        group: &'static str,
        /// The failed rank's index in that group (the first in rank order).
        rank: usize,
    },
    /// The ranks of a vocabulary group ([`parallel::Sharded`](crate::parallel::Sharded)) were
    /// called with tokens of different shapes: every rank of a vocabulary group holds the same
    /// samples (the same `[B, T]` ids), and other shapes would make their later exchanges differ
    /// in number and length (a hang or an abort in a real collective). Found in the group's
    /// first exchange, which carries every rank's `[B, T]`, and reported alike on every rank of
    /// the group before any gradient is written: the first rank, in rank order, whose shape is
    /// not rank 0's. A rank without samples ([`Shape::without_samples`]) beside ranks with
    /// samples is one (`B = 0`).
    #[error(
        "rank {rank} of the vocabulary group was called with ids of shape [B, T] = {got:?}, rank 0 with \
         {expected:?}: every rank of a vocabulary group must hold the same samples"
    )]
    GroupShapeMismatch {
        /// The first rank (in the group's rank order) whose `[B, T]` differs from rank 0's.
        rank: usize,
        /// Rank 0's `[B, T]`.
        expected: [usize; 2],
        /// That rank's `[B, T]`.
        got: [usize; 2],
    },
    /// The ranks of a group ([`parallel::Sharded`](crate::parallel::Sharded)) made different
    /// calls: every rank of a group must pass the same loss options (all of the spec but its
    /// backend, SIMD level and `grad_scale`) and vocabulary size, and every rank of a vocabulary
    /// group also the same call (logits, or fused linear with the same hidden size) with the
    /// same rows per exchange and the same ids, labels and token weights (but for each sample's
    /// label and weight at position 0, never a target). Other options or
    /// chunking would make the group's later exchanges differ in number or length (a hang or an
    /// abort in a real collective); other tokens or options, different losses on the ranks
    /// without a word. Found in the group's first exchange, which carries a 32-bit digest
    /// of each part, and reported alike on every rank of the group before any gradient is
    /// written: the first rank, in rank order, whose digest is not rank 0's, and the first part
    /// that differs. (Two different calls share a digest with odds of 2^-32.)
    #[error(
        "rank {rank} of the {group} group made another call than rank 0: its {what} differ from rank 0's (every \
         rank of a group must make the same call)"
    )]
    GroupCallMismatch {
        /// `"data"` or `"vocabulary"`.
        group: &'static str,
        /// The first rank (in the group's rank order) whose call differs from rank 0's.
        rank: usize,
        /// The first part that differs: the loss options or vocabulary size, the call or its
        /// chunking, or the tokens.
        what: &'static str,
    },
    /// A buffer of a sharded step or of an exchange has the wrong length.
    #[error("{what} has {got} elements, expected {expected}")]
    ExchangeLength {
        /// Which buffer.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A sharded step named rows outside the call's `B * T` rows.
    #[error("rows {start}..{end} are not within the call's {rows} rows")]
    RowRange {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows of the call.
        rows: usize,
    },
    /// The steps of a sharded call were taken out of order (see the message).
    #[error("sharded steps out of order: {0}")]
    StepOrder(&'static str),
    /// A collective (an all-gather between ranks) failed or is not available.
    #[error("collective communication failed: {0}")]
    Collective(String),
    /// A fused linear input (hidden states, weight) has a rank it cannot have.
    #[error("{what} must be {expected}, got rank {} {dims:?}", dims.len())]
    InputRank {
        /// `"hidden"` or `"weight"`.
        what: &'static str,
        /// The accepted layouts, in words.
        expected: &'static str,
        /// The dimensions that were given.
        dims: Vec<usize>,
    },
    /// `hidden == 0` in a fused linear call.
    #[error("hidden size is 0")]
    EmptyHidden,
    /// A fused linear call's chunking cannot be used (0 rows per chunk).
    #[error("invalid chunking: {0}")]
    InvalidChunking(String),
    /// A working buffer could not be allocated (a chunk of `Chunking::Rows` too large for this
    /// machine's memory, say): an error, before anything is written, not an abort.
    #[error("cannot allocate {} GB for {what}", *bytes as f64 * 1e-9)]
    OutOfMemory {
        /// The buffer.
        what: &'static str,
        /// Its size in bytes.
        bytes: u128,
    },
    /// A CUDA stream of another context (another device, or another context on the same device)
    /// than the one the kernels were loaded on (or an NCCL communicator was made on): launching
    /// there would read buffers the kernels cannot address.
    #[error(
        "the stream belongs to another CUDA context (device {got}) than the kernels' or the communicator's (device {expected})"
    )]
    ContextMismatch {
        /// Ordinal of the device the kernels are loaded on.
        expected: usize,
        /// Ordinal of the stream's device.
        got: usize,
    },
    /// A candle tensor had an unsupported dtype, layout or device.
    #[error("unsupported tensor: {0}")]
    Unsupported(String),
}

/// A value as a message shows it: plain decimals where they are short, else scientific (a
/// `1e-300` printed as a 300-digit decimal).
struct Short(f64);

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.0.abs();
        if a == 0.0 || !a.is_finite() || (1e-6..1e16).contains(&a) {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{:e}", self.0)
        }
    }
}

//! Beyond one device: the loss when the vocabulary (vocabulary-parallel, as Megatron-LM shards the
//! output layer), the batch (data-parallel), or both (a 2-D grid of ranks) are split between
//! ranks.
//!
//! **Vocabulary-parallel.** Rank `r` of a *vocabulary group* holds the logits of the vocabulary
//! slice `[v0_r, v0_r + V_r)` ([`VocabSlice`]) for every row; ids, labels, keywords and token
//! weights are global and the same on every rank of the group (keyword weights therefore need no
//! communication). Per row, each rank computes its slice's statistics (reference maximum, sum of
//! exponentials, the target logit when the target is in its slice, the logit sum for label
//! smoothing; soft-capping applied elementwise); the statistics are **all-gathered** (a few
//! floats per row, nothing proportional to `V`); every rank merges them **in rank order**, so all
//! ranks and all reruns get the same bits (a float all-reduce would not promise that), and writes
//! the gradient of its own slice. Every rank gets the same loss.
//!
//! **Data-parallel.** Each rank of a *data group* holds some samples. [`Reduction::Mean`] divides
//! by the global batch and [`Reduction::WeightedMean`] by the global `Σ w_b`: each rank
//! all-gathers two numbers (its `B` and its `Σ w_b`, from the ids alone, before the logits are
//! read; on host buffers with a third, a digest of its loss options that every rank compares)
//! and sums them in rank order. The gradient of a rank's logits is then that of the loss of
//! the concatenated batch, and a last all-gather of two numbers (the rank's share of the loss and
//! of the z-loss) gives every rank the global loss. (Trainers that *average* gradients over
//! data-parallel ranks, as PyTorch's DDP does, divide this gradient by their world size once more:
//! scale the loss, or `grad_scale`, by it to get the gradient of the global loss.) A rank that
//! holds no samples this step (an uneven last batch) passes [`Shape::without_samples`] (or
//! [`LinearShape::without_samples`](crate::LinearShape::without_samples)) and empty buffers: it
//! makes the checks its peers make before their first exchange, joins the two exchanges with
//! nothing, and gets the loss of the whole batch, the same bits as its peers.
//!
//! **Both.** Ranks `(d, t)` of a grid: the vocabulary group of rank `(d, ·)` shares its samples,
//! the data group of `(·, t)` its slice. Each exchange above runs in its own group.
//!
//! **Errors fail the group.** An error a rank finds on its own before the first exchange (its
//! ids, labels or token weights invalid, its sample weights beyond `f64`, a buffer of the wrong
//! length, a slice of another vocabulary) does not end its call there, which would leave its
//! peers waiting for it in an exchange (forever, with NCCL or gloo): [`Sharded`]'s calls always
//! make the vocabulary group's exchange of the slices and `[B, T]`s and then the data group's of
//! the batch totals, and a rank that failed sends words marked as failed in both (the same
//! lengths, no more bytes). It returns its own error; every other rank of both groups returns
//! [`Error::PeerFailed`] (on a grid the data group's exchange passes on what a vocabulary group
//! learnt), before any gradient is written. Errors every rank of a group finds alike fail every
//! rank by themselves: in the vocabulary group's exchange, slices that do not tile one
//! vocabulary and ranks called with tokens of different `[B, T]`
//! ([`Error::GroupShapeMismatch`]; a rank without samples beside ranks with samples is one),
//! and ranks that made different calls (other loss options, another call or chunking, other
//! ids, or other labels or token weights where a target reads them, that is beyond each
//! sample's position 0: [`Error::GroupCallMismatch`], from a 32-bit digest of each in
//! the same exchange), which the data group's exchange then passes on to the other vocabulary
//! groups of a grid; in the data group's, a `Σ w_b` beyond `f64` (the same in every data group
//! of a grid, which all hold the same samples) and ranks with other loss options or another
//! vocabulary size ([`Error::GroupCallMismatch`]); after the last exchange, non-finite losses with `check_finite`
//! ([`Error::NonFiniteInGroup`]). Only a group whose rank is not within its size, and an
//! exchange that itself fails ([`Error::Collective`]), end a call at once. A caller that finds
//! an error of its own before it can make a call fails its groups the same way with
//! [`Sharded::fail_with`].
//!
//! # Communication per call, bytes per rank
//!
//! | exchange | group | each rank sends | when |
//! |---|---|---|---|
//! | row statistics (host buffers, `f64`) | vocabulary | `8 · W` per row, `W` = 3 (4 with label smoothing, 5 with soft-capping), plus 24 (the slice and `V`, checked by every rank to tile `[0, V)`) | per chunk of rows |
//! | slices, shapes and calls (host buffers, `f64`) | vocabulary | 64: `B`, `T`, the digests of the spec, of the call and its chunking and of the tokens, then the slice and `V` (checked by every rank: the same `[B, T]` and digests on every rank, slices that tile `[0, V)`) | once, before the chunks and before any gradient is written |
//! | row statistics (CUDA buffers, `f32`) | vocabulary | `4 · W` per row, `W` = 3 (5 with label smoothing) | per chunk of rows |
//! | batch totals (`B`, `Σ w_b`; [`Sharded`]'s: and the spec's digest) | data | 16 ([`Sharded`] on host buffers: 24) | before the logits are read |
//! | loss shares (loss, z-loss) | data | 16 | at the end |
//!
//! An all-gather delivers `group size ×` that to every rank. With a group of one the exchange is
//! skipped.
//!
//! # Ways in
//!
//! - [`Sharded`] (host buffers): one call that runs the steps below and the exchanges through a
//!   [`Collective`] of each group;
//! - [`Sharded::linear_loss_and_grad`] (host buffers): the fused linear path with this rank's
//!   rows of the output weight (the same exchange per chunk of token rows; `d hidden` comes back
//!   as this rank's part, to be summed over the vocabulary group);
//! - [`ShardedLoss`] (host buffers): the steps themselves, on ranges of rows, for a driver that
//!   owns its communication (each rank's words end with its slice, which the merge checks; a
//!   rank that fails before it has one sends [`ShardedLoss::failed_partials`] and
//!   [`ShardedLoss::FAILED_TOTALS`], which fail its peers' steps with [`Error::PeerFailed`]); the
//!   Python package runs [`Sharded`] instead, its exchanges calling `torch.distributed`;
//! - `cuda::split` (feature `cuda`): the same steps on device buffers, the one call
//!   `DeviceSharded` on the logits and, with the output weight's rows, on the fused linear path
//!   (`DeviceSharded::linear_loss_and_grad`), and an NCCL collective (feature `nccl`).
//!
//! # No second pass over the logits
//!
//! The gradient of a row needs the merged statistics, which exist only after the exchange. The
//! steps therefore work on **chunks of rows**: the statistics step keeps the exponentials of its
//! rows (as the single-device pass keeps a row's between its two passes), the exchange runs, and
//! the gradient step turns the kept exponentials into the gradient while they are still in
//! cache. [`Sharded`] exchanges once per chunk ([`default_chunk_rows`]: 512 KiB of kept
//! exponentials) and runs one worker per thread of the pool, the calling thread being one: each
//! takes the same share of the rows of every chunk, writing the gradient of its share of chunk
//! `k` inside the statistics loops of its share of chunk `k + 2` (as the single-device pass
//! writes a row's gradient inside the next row's loop), so its three chunks in flight stay in
//! its core's L2; the calling thread also exchanges and merges each chunk, and hands it to the
//! others with a few atomic operations (no fork-join of the pool per chunk). A driver of the
//! steps with an asynchronous exchange can likewise compute the statistics of chunk `k + 1`
//! while chunk `k`'s are in flight (two chunks kept at once, within the default budget).

mod agree;
mod call;
mod exchange;
mod linear;
mod pipeline;
mod steps;
mod wire;

pub use call::{chunk_rows_for, default_chunk_rows, Sharded, DEFAULT_CHUNK_BYTES};
pub use steps::ShardedLoss;

use crate::error::{Error, Result};
#[cfg(doc)]
use crate::{Reduction, Shape};

/// The part of the vocabulary one rank's logits hold: ids `[start, start + len)` of a
/// vocabulary of `vocab`, `len >= 1`.
///
/// ```
/// use fused_weighted_loss::parallel::VocabSlice;
/// let s = VocabSlice::new(1000, 250, 2000)?;
/// assert_eq!((s.start(), s.len(), s.end()), (1000, 250, 1250));
/// assert!(VocabSlice::new(1900, 250, 2000).is_err()); // past the vocabulary
/// // Megatron-LM's split: equal slices in rank order, the last one shorter when V does not divide
/// assert_eq!(VocabSlice::even(3, 4, 1001)?, VocabSlice::new(753, 248, 1001)?);
/// # Ok::<(), fused_weighted_loss::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VocabSlice {
    start: usize,
    len: usize,
    vocab: usize,
}

impl VocabSlice {
    /// Validates and builds a slice.
    pub fn new(start: usize, len: usize, vocab: usize) -> Result<Self> {
        match start.checked_add(len) {
            Some(end) if len >= 1 && end <= vocab => Ok(VocabSlice { start, len, vocab }),
            _ => Err(Error::InvalidVocabSlice { start, len, vocab }),
        }
    }

    /// The whole vocabulary (a rank that holds every logit: data-parallel only).
    pub fn full(vocab: usize) -> Result<Self> {
        Self::new(0, vocab, vocab)
    }

    /// Rank `rank`'s slice when `ranks` ranks split the vocabulary in rank order into slices of
    /// `ceil(vocab / ranks)` ids (the last ones shorter). An error when a rank would get none,
    /// and for a group of no ranks.
    pub fn even(rank: usize, ranks: usize, vocab: usize) -> Result<Self> {
        if ranks == 0 {
            return Err(Error::InvalidOption { name: "ranks", value: 0.0, expected: "at least 1" });
        }
        let per = vocab.div_ceil(ranks);
        let start = rank.saturating_mul(per);
        Self::new(start, per.min(vocab.saturating_sub(start)), vocab)
    }

    /// First id of the slice.
    pub const fn start(&self) -> usize {
        self.start
    }
    /// Ids in the slice (the logits' last dimension on this rank).
    #[allow(clippy::len_without_is_empty)] // never empty
    pub const fn len(&self) -> usize {
        self.len
    }
    /// One past the last id of the slice.
    pub const fn end(&self) -> usize {
        self.start + self.len
    }
    /// The whole vocabulary.
    pub const fn vocab(&self) -> usize {
        self.vocab
    }
}

/// An all-gather between the ranks of a group, on host buffers: what the split needs of a
/// communication library (MPI, a framework's process group, threads of one process).
///
/// Every rank calls the same methods in the same order with buffers of the same length `n`;
/// afterwards `recv[r * n..(r + 1) * n]` holds rank `r`'s `send`, on every rank. A failure is
/// [`Error::Collective`] (or any error the implementation finds fitting).
pub trait Collective {
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group (a sharded call refuses 0 and more than [`MAX_RANKS`]).
    fn size(&self) -> usize;
    /// All-gathers `f64`s in rank order (`recv.len() == size() * send.len()`).
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()>;
    /// All-gathers `f32`s in rank order (`recv.len() == size() * send.len()`).
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
}

/// The group of one rank: every all-gather is a copy.
///
/// ```
/// use fused_weighted_loss::parallel::{Collective, Solo};
/// let mut out = [0.0; 2];
/// Solo.all_gather_f64(&[1.0, 2.0], &mut out)?;
/// assert_eq!(out, [1.0, 2.0]);
/// # Ok::<(), fused_weighted_loss::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

/// `recv = send` for a group of one.
fn copy_one<T: Copy>(send: &[T], recv: &mut [T]) -> Result<()> {
    if recv.len() != send.len() {
        return Err(Error::ExchangeLength { what: "all-gather receive buffer", expected: send.len(), got: recv.len() });
    }
    recv.copy_from_slice(send);
    Ok(())
}

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        copy_one(send, recv)
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        copy_one(send, recv)
    }
}

/// Checks that the slices `(start, len)` of a group (in rank order) cover `[0, vocab)` exactly
/// once, in any order.
///
/// ```
/// use fused_weighted_loss::parallel::check_tiling;
/// assert!(check_tiling(&[(0, 6), (6, 4)], 10).is_ok());
/// assert!(check_tiling(&[(5, 5), (0, 5)], 10).is_ok()); // any order
/// assert!(check_tiling(&[(0, 6), (5, 5)], 10).is_err()); // overlap
/// assert!(check_tiling(&[(0, 4), (5, 5)], 10).is_err()); // gap
/// ```
pub fn check_tiling(slices: &[(usize, usize)], vocab: usize) -> Result<()> {
    let mut sorted = slices.to_vec();
    sorted.sort_unstable();
    let mut next = 0usize;
    for &(start, len) in &sorted {
        if start != next || len == 0 {
            return Err(Error::SlicesDoNotTile { vocab, slices: slices.to_vec() });
        }
        next = start.saturating_add(len);
    }
    if next != vocab {
        return Err(Error::SlicesDoNotTile { vocab, slices: slices.to_vec() });
    }
    Ok(())
}

/// The most ranks a group may have: NCCL's and torch.distributed's ranks are C `int`s, and no
/// exchange's length (words per rank × ranks) can overflow below it.
pub const MAX_RANKS: usize = i32::MAX as usize;

/// A group's rank lies within its size, and its size within `1..=`[`MAX_RANKS`]: the checks each
/// sharded call makes of its groups before anything else ([`Error::Collective`] otherwise).
pub(crate) fn check_group(rank: usize, size: usize) -> Result<()> {
    if size == 0 || size > MAX_RANKS || rank >= size {
        return Err(Error::Collective(format!("rank {rank} of a group of {size}")));
    }
    Ok(())
}

/// Sums rank-order numbers `gathered[r * stride + i]` over ranks `r` (left to right: the same
/// bits on every rank).
pub(crate) fn sum_in_rank_order(gathered: &[f64], stride: usize, i: usize) -> f64 {
    gathered.chunks_exact(stride).fold(0.0, |acc, rank| acc + rank[i])
}

/// A data group's all-gather of two numbers per rank, in rank order (`None` for a group of one:
/// nothing to exchange).
fn gather_pairs(dg: &dyn Collective, local: [f64; 2]) -> Result<Option<Vec<f64>>> {
    gather_words(dg, &local)
}

/// A data group's all-gather of `local` (the same length on every rank), in rank order (`None`
/// for a group of one: nothing to exchange).
fn gather_words(dg: &dyn Collective, local: &[f64]) -> Result<Option<Vec<f64>>> {
    if dg.size() <= 1 {
        return Ok(None);
    }
    let mut all = vec![0.0; local.len() * dg.size()];
    dg.all_gather_f64(local, &mut all)?;
    Ok(Some(all))
}

/// A data-parallel rank without samples ([`crate::Shape::without_samples`]): after the checks
/// its peers make before their first exchange (`checked`: those made so far), it takes part in
/// the data group's two exchanges with nothing (`B = 0`, `Σ w_b = 0`, then a share of 0 of the
/// loss) and in the vocabulary group's check of the slices and shapes (the group holds the same
/// samples: none on any of its ranks, or the check fails them all), and returns the loss of its peers' samples, the same bits as
/// theirs, with no per-sample outputs. A data group of one, or one in which no rank holds a
/// sample, is an error (on every rank: [`Error::EmptyBatch`], [`Error::EmptyDataGroup`]), as is
/// a group's `Σ w_b` beyond `f64` under the weighted mean (its peers' error).
fn no_samples<I: crate::dtype::TokenId>(
    spec: &crate::LossSpec,
    shape: crate::Shape,
    tokens: &crate::Tokens<'_, I>,
    call: &Sharded<'_>,
    agree: impl FnOnce() -> agree::Agreement,
    checked: Result<()>,
) -> Result<crate::LossOutput> {
    let mine = checked.and_then(|()| {
        crate::spec::validate_tokens_of_rank(spec, shape, tokens)?;
        crate::cpu_kernels(spec.cpu_simd).map(|_| ())
    });
    let dg = call.data_group;
    first_exchanges(
        call,
        token_dims(shape),
        agree,
        mine,
        |()| [0.0, 0.0],
        |(), all| {
            let Some(all) = all else { return Err(Error::EmptyBatch) };
            if sum_in_rank_order(all, 2, 0) == 0.0 {
                return Err(Error::EmptyDataGroup);
            }
            // (the peers' denominator: an overflowing Σ w_b fails them, and so this rank)
            denominator(spec.reduction, all).map(|_| ())
        },
    )?;
    let mut out = crate::LossOutput {
        loss: 0.0,
        per_sample_loss: Vec::new(),
        weights: Vec::new(),
        valid_tokens: Vec::new(),
        z_loss: 0.0,
        backend: crate::Backend::Cpu,
    };
    combine_over(&mut out, dg)?;
    if spec.check_finite {
        return group_finite(out, None);
    }
    Ok(out)
}

/// `[B, T]` of a call's tokens, for the vocabulary group's first exchange.
fn token_dims(shape: crate::Shape) -> [usize; 2] {
    [shape.batch(), shape.seq()]
}

/// This rank's batch totals `[B, Σ w_b]`, for the data group's first exchange.
fn plan_totals(plan: &crate::plan::Plan) -> [f64; 2] {
    [plan.shape.batch() as f64, plan.weights.iter().sum()]
}

/// Sets `plan`'s denominator from the data group's batch (`all`: `B` and `Σ w_b` of every rank,
/// `None` for a group of one, which leaves it).
fn global_denominator(plan: &mut crate::plan::Plan, spec: &crate::LossSpec, all: Option<&[f64]>) -> Result<()> {
    if let Some(all) = all {
        plan.set_denominator(denominator(spec.reduction, all)?, spec.grad_scale);
    }
    Ok(())
}

/// The first exchanges of every sharded call on host buffers, on every path: the vocabulary
/// group's slices, `[B, T]`s and agreements (`tokens` and `agree()`: this rank's; the digests
/// are taken only when a group has other ranks to compare them with), checked to tile
/// one vocabulary and to be the same on every rank of the group, then the data group's batch
/// totals (`totals` of this rank's preparation) and spec digests, checked to be the same on
/// every rank of the group. `mine` is this rank's preparation, or the error it found alone (bad
/// ids or labels, sample weights beyond `f64`, a buffer of the wrong length, ...); `group`
/// finishes it from the data group's gathered totals (`[B, Σ w_b]` per rank, `None` for a group
/// of one) with the errors every rank of the data group sees alike (an empty group, a `Σ w_b`
/// beyond `f64`).
///
/// A rank that failed, by its own error or by what the vocabulary group's exchange told it
/// (a peer's failure, or the group's own checks), still takes part in both exchanges, its words
/// marked [`FAILED`](wire::FAILED) (the same lengths), and returns its own error; a rank that
/// did not fail returns [`Error::PeerFailed`] when a peer's words are so marked. So an error on
/// one rank, or in one vocabulary group, fails every rank of both groups (on a grid, the data
/// group's exchange passes on what a vocabulary group learnt, and every data group sees the same
/// samples' totals) instead of leaving its peers waiting in an exchange it never joins. An
/// exchange that itself fails ([`Error::Collective`]) ends the call at once.
fn first_exchanges<T>(
    call: &Sharded<'_>,
    tokens: [usize; 2],
    agree: impl FnOnce() -> agree::Agreement,
    mine: Result<T>,
    totals: impl FnOnce(&T) -> [f64; 2],
    group: impl FnOnce(&mut T, Option<&[f64]>) -> Result<()>,
) -> Result<T> {
    let (vg, dg) = (call.vocab_group.size(), call.data_group.size());
    let agree = if mine.is_ok() && (vg > 1 || dg > 1) { Some(agree()) } else { None };
    let mine = if vg > 1 {
        let mut ex = exchange::Exchange::new(call.vocab_group, call.slice);
        let checked = ex.check_slices(agree.map(|a| (tokens, a, call.slice)))?;
        // this rank's own error first (the exchange then names this rank itself)
        mine.and_then(|t| checked.map(|()| t))
    } else {
        mine
    };
    const STRIDE: usize = 2 + agree::DATA_WORDS;
    let mut send = [wire::FAILED; STRIDE];
    if let (Ok(t), Some(a)) = (&mine, agree) {
        send[..2].copy_from_slice(&totals(t));
        send[2..].copy_from_slice(&a.data_words());
    }
    let all = gather_words(call.data_group, &send)?;
    mine.and_then(|mut t| {
        let Some(all) = all else {
            group(&mut t, None)?;
            return Ok(t);
        };
        if let Some(rank) = all.chunks_exact(STRIDE).position(|p| p[0] == wire::FAILED) {
            return Err(Error::PeerFailed { group: "data", rank });
        }
        agree::check_agreement("data", &all, STRIDE, 2, agree::DATA_WORDS)?;
        let pairs: Vec<f64> = all.chunks_exact(STRIDE).flat_map(|p| [p[0], p[1]]).collect();
        group(&mut t, Some(&pairs))?;
        Ok(t)
    })
}

/// This rank's output (`finish(check)`: with or without the check of non-finite positions),
/// its loss combined over the data group ([`combine_over`]). With `check` on a data group of
/// more than one, the check waits until after the exchange and every rank fails together: the
/// rank that holds a non-finite position with [`Error::NonFinite`], the others with
/// [`Error::NonFiniteInGroup`] (an error on one rank alone left its peers waiting in the
/// exchange).
fn finish_over(
    dg: &dyn Collective,
    check: bool,
    mut finish: impl FnMut(bool) -> Result<crate::LossOutput>,
) -> Result<crate::LossOutput> {
    if !check || dg.size() <= 1 {
        let mut out = finish(check)?;
        combine_over(&mut out, dg)?;
        return Ok(out);
    }
    let mine = finish(true).err();
    let mut out = finish(false)?;
    combine_over(&mut out, dg)?;
    group_finite(out, mine)
}

/// The combined output of a data group, or this rank's own error, or
/// [`Error::NonFiniteInGroup`] when the group's loss is not finite.
fn group_finite(out: crate::LossOutput, mine: Option<Error>) -> Result<crate::LossOutput> {
    match mine {
        Some(e) => Err(e),
        None if !out.loss.is_finite() => Err(Error::NonFiniteInGroup { value: out.loss }),
        None => Ok(out),
    }
}

/// Sets `out`'s loss and z-loss to their sums over the data group (the same bits on every rank);
/// a group of one leaves them.
fn combine_over(out: &mut crate::LossOutput, dg: &dyn Collective) -> Result<()> {
    if let Some(all) = gather_pairs(dg, ShardedLoss::loss_totals(out))? {
        ShardedLoss::combine_loss(out, &all)?;
    }
    Ok(())
}

/// The reduction's denominator from a data group's all-gathered `[B, Σ w_b]` pairs, summed in
/// rank order: the global `B`, the global `Σ w_b`, or 1. A global `Σ w_b` beyond f64 (each
/// rank's finite) is an error on every rank alike, as on one device (it made every weight's
/// share 0).
fn denominator(reduction: crate::Reduction, gathered: &[f64]) -> Result<f64> {
    Ok(match reduction {
        crate::Reduction::Mean => sum_in_rank_order(gathered, 2, 0),
        crate::Reduction::WeightedMean => {
            let w = sum_in_rank_order(gathered, 2, 1);
            if !w.is_finite() {
                return Err(crate::plan::weights_overflow(w));
            }
            w
        }
        crate::Reduction::Sum => 1.0,
    })
}

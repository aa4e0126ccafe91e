//! The one-call API on host buffers: the steps of [`ShardedLoss`] with the exchanges done through
//! the caller's [`Collective`]s, chunk by chunk.

use super::agree::{call_digest, Agreement, LOGITS_CALL};
use super::exchange::Exchange;
use super::pipeline::{self, InPlace, ReadInto};
use super::{check_tiling, Collective, ShardedLoss, Solo, VocabSlice};
use crate::cpu::split::Dest as Fused;
use crate::cpu::RowStats;
use crate::dtype::{Logit, TokenId};
use crate::error::{Error, Result};
use crate::spec::{check_len, LossOutput, LossSpec, Shape, Tokens};
use crate::Grad;
use std::ops::Range;

/// Bytes of `f32` exponentials a chunk of rows keeps between its statistics and gradient steps
/// by default: each thread's share of the chunks in flight (three) then stays in its core's L2
/// while the exchange runs (see [`Sharded::with_chunk_bytes`] for slow collectives).
pub const DEFAULT_CHUNK_BYTES: usize = 512 << 10;

/// Fewest rows per chunk (an exchange costs a round trip; very long rows get more than the
/// byte budget rather than one exchange per row).
const MIN_CHUNK_ROWS: usize = 4;

/// Rows per chunk for slices of `len` logits and `bytes` of kept exponentials per chunk.
pub(crate) fn chunk_rows_for_len(len: usize, bytes: usize) -> usize {
    (bytes / (4 * len.max(1))).max(MIN_CHUNK_ROWS)
}

/// The rows [`Sharded`] exchanges at once when `ranks` ranks split a vocabulary of `vocab` and
/// a chunk may keep `bytes` of `f32` exponentials (at least 4 rows; [`DEFAULT_CHUNK_BYTES`] by
/// default). It depends only on numbers every rank of a vocabulary group shares, so every rank
/// cuts the same chunks.
///
/// ```
/// use fused_weighted_loss::parallel::{chunk_rows_for, DEFAULT_CHUNK_BYTES};
/// // 16032 logits per rank, 62.6 KiB per row
/// assert_eq!(chunk_rows_for(128_256, 8, DEFAULT_CHUNK_BYTES), 8);
/// assert_eq!(chunk_rows_for(50_000, 4, DEFAULT_CHUNK_BYTES), 10);
/// assert_eq!(chunk_rows_for(50_000, 4, 8 << 20), 167);
/// ```
pub fn chunk_rows_for(vocab: usize, ranks: usize, bytes: usize) -> usize {
    chunk_rows_for_len(vocab.div_ceil(ranks.max(1)), bytes)
}

/// The rows [`Sharded`] exchanges at once by default when `ranks` ranks split a vocabulary of
/// `vocab`: [`chunk_rows_for`] with [`DEFAULT_CHUNK_BYTES`].
///
/// ```
/// use fused_weighted_loss::parallel::default_chunk_rows;
/// assert_eq!(default_chunk_rows(50_000, 4), 10);
/// ```
pub fn default_chunk_rows(vocab: usize, ranks: usize) -> usize {
    chunk_rows_for(vocab, ranks, DEFAULT_CHUNK_BYTES)
}

/// One sharded call on host buffers: this rank's place in the vocabulary group (its slice) and
/// in the data group, and the collectives that reach the other ranks.
///
/// ```
/// use fused_weighted_loss::parallel::{Sharded, VocabSlice};
/// use fused_weighted_loss::{Grad, LossSpec, Shape, Tokens};
///
/// // a group of one rank holding the whole vocabulary: the same loss as the plain call
/// let shape = Shape::new(2, 4, 10)?;
/// let logits: Vec<f32> = (0..80).map(|i| ((i * 7) % 13) as f32 * 0.3 - 2.0).collect();
/// let ids = [1i64, 3, 3, 7, 2, 9, 0, 3];
/// let spec = LossSpec::builder().keywords([3]).build()?;
/// let mut grad = vec![0f32; 80];
/// let out = Sharded::data_parallel(10, &fused_weighted_loss::parallel::Solo)
///     .loss_and_grad(&spec, shape, &logits, Tokens::new(&ids), Grad::Into(&mut grad))?;
/// let whole = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip)?;
/// assert!((out.loss - whole.loss).abs() <= 1e-6 * whole.loss);
/// # Ok::<(), fused_weighted_loss::Error>(())
/// ```
///
/// Every rank of a group must make the same calls (the same spec, `T`, chunking and, in a
/// vocabulary group, the same samples), as with any collective. A vocabulary group's first
/// exchange checks that its ranks' slices tile one vocabulary, that their tokens have the same
/// `[B, T]` ([`Error::GroupShapeMismatch`] on every rank otherwise) and that they made the same
/// call (the same loss options, call and chunking, ids, labels and token weights, compared by
/// 32-bit digests: [`Error::GroupCallMismatch`] on every rank otherwise); a data group's, that
/// its ranks have the same loss options and vocabulary size. The backend, SIMD level and
/// `grad_scale` may differ between ranks.
#[derive(Clone, Copy)]
pub struct Sharded<'a> {
    pub(super) slice: VocabSlice,
    pub(super) vocab_group: &'a dyn Collective,
    pub(super) data_group: &'a dyn Collective,
    chunk_rows: Option<usize>,
    chunk_bytes: Option<usize>,
    split_steps: bool,
}

impl std::fmt::Debug for Sharded<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded")
            .field("slice", &self.slice)
            .field("vocab_group", &(self.vocab_group.rank(), self.vocab_group.size()))
            .field("data_group", &(self.data_group.rank(), self.data_group.size()))
            .field("chunk_rows", &self.chunk_rows)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("split_steps", &self.split_steps)
            .finish()
    }
}

static SOLO: Solo = Solo;

impl<'a> Sharded<'a> {
    /// Vocabulary-parallel: this rank's logits hold `slice` of the vocabulary; `group` reaches
    /// the ranks holding the other slices (of the same samples).
    pub fn vocab_parallel(slice: VocabSlice, group: &'a dyn Collective) -> Self {
        Sharded {
            slice,
            vocab_group: group,
            data_group: &SOLO,
            chunk_rows: None,
            chunk_bytes: None,
            split_steps: false,
        }
    }

    /// Data-parallel: this rank holds some samples with every logit of a vocabulary of `vocab`;
    /// `group` reaches the ranks holding the other samples.
    pub fn data_parallel(vocab: usize, group: &'a dyn Collective) -> Self {
        // a zero vocabulary is reported by the call, as the plain API does
        let slice = VocabSlice { start: 0, len: vocab, vocab };
        Sharded {
            slice,
            vocab_group: &SOLO,
            data_group: group,
            chunk_rows: None,
            chunk_bytes: None,
            split_steps: false,
        }
    }

    /// Adds a data group to a vocabulary-parallel call (a 2-D grid of ranks).
    pub fn with_data_group(self, group: &'a dyn Collective) -> Self {
        Sharded { data_group: group, ..self }
    }

    /// Rows per exchange of the vocabulary group (default [`default_chunk_rows`]); the same on
    /// every rank of the group. At least 1. Takes precedence over
    /// [`with_chunk_bytes`](Self::with_chunk_bytes).
    ///
    /// On CPU, the kept `f32` exponentials of three chunks are in flight (`12 × rows × slice
    /// width` bytes); they are kept for the next call only up to 64 MiB in all. Chunks much
    /// larger than the default cost an allocation and its page faults on every call, and leave
    /// the caches: in a benchmark, chunks of 2048 rows of a 12 500-wide slice (100 MB of
    /// exponentials each) took 8–11× the single-device time of the slice.
    pub fn with_chunk_rows(self, rows: usize) -> Self {
        Sharded { chunk_rows: Some(rows.max(1)), ..self }
    }

    /// Rows per exchange from a budget of kept exponentials per chunk ([`chunk_rows_for`];
    /// default [`DEFAULT_CHUNK_BYTES`]), the same on every rank of the group. The default keeps
    /// each thread's share of the chunks in flight in its core's L2, which needs one exchange
    /// per few rows; a collective with a long latency per call (`torch.distributed` over gloo:
    /// 0.3–0.7 ms on a 2-core machine) costs less with fewer, larger chunks, as the Python
    /// package's 8 MiB.
    pub fn with_chunk_bytes(self, bytes: usize) -> Self {
        Sharded { chunk_bytes: Some(bytes), ..self }
    }

    /// Runs the split's steps chunk by chunk even when the vocabulary group is this rank alone
    /// (which otherwise runs the single-device pass): what the benches use to time one rank's
    /// kernels of a larger group without its exchange.
    #[doc(hidden)]
    pub fn with_split_steps(self) -> Self {
        Sharded { split_steps: true, ..self }
    }

    /// The loss and, unless `grad` is [`Grad::Skip`], the gradient of this rank's logits
    /// (`[B, T, slice.len()]`; `shape` is `[B, T, V]` with this rank's `B` and the whole `V`).
    /// Every rank gets the loss of the whole batch over the whole vocabulary; the per-sample
    /// outputs are those of this rank's samples. A rank of a data group of several that holds
    /// no samples passes [`Shape::without_samples`] and empty slices (see the
    /// [module docs](super)). An error of this rank's own inputs fails every rank of its groups
    /// (the others with [`Error::PeerFailed`]), none left waiting in an exchange.
    ///
    /// ```
    /// use fused_weighted_loss::parallel::{Collective, Sharded};
    /// use fused_weighted_loss::{Grad, LossSpec, Shape, Tokens};
    /// # // stands in for a real group of two whose rank 0 holds one sample (weight 1) of loss 2:
    /// # // its [B, Σw] (and the same spec's digest), then its [loss share, z-loss share]
    /// # struct Two(std::cell::Cell<usize>);
    /// # impl Collective for Two {
    /// #     fn rank(&self) -> usize { 1 }
    /// #     fn size(&self) -> usize { 2 }
    /// #     fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> fused_weighted_loss::Result<()> {
    /// #         let calls = self.0.replace(self.0.get() + 1);
    /// #         let n = send.len();
    /// #         recv[..n].copy_from_slice(send);
    /// #         recv[..2].copy_from_slice(if calls == 0 { &[1.0, 1.0] } else { &[2.0, 0.0] });
    /// #         recv[n..].copy_from_slice(send);
    /// #         Ok(())
    /// #     }
    /// #     fn all_gather_f32(&self, _: &[f32], _: &mut [f32]) -> fused_weighted_loss::Result<()> { unreachable!() }
    /// # }
    /// let none: [i64; 0] = [];
    /// let out = Sharded::data_parallel(10, &Two(Default::default())).loss_and_grad::<f32, i64>(
    ///     &LossSpec::default(), Shape::without_samples(4, 10)?, &[], Tokens::new(&none), Grad::Skip)?;
    /// assert_eq!(out.loss, 2.0); // the peer's share
    /// assert!(out.per_sample_loss.is_empty());
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn loss_and_grad<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        logits: &[L],
        tokens: Tokens<'_, I>,
        grad: Grad<'_, L>,
    ) -> Result<LossOutput> {
        self.run(spec, shape, Src::Read(logits), tokens, grad.into(), None)
    }

    /// [`loss_and_grad`](Self::loss_and_grad), also writing each of this rank's positions' loss
    /// into `token_loss` (`[B, T - 1]`, as [`LossSpec::loss_and_grad_per_token`]).
    pub fn loss_and_grad_per_token<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        logits: &[L],
        tokens: Tokens<'_, I>,
        grad: Grad<'_, L>,
        token_loss: &mut [f32],
    ) -> Result<LossOutput> {
        self.run(spec, shape, Src::Read(logits), tokens, grad.into(), Some(token_loss))
    }

    /// [`loss_and_grad`](Self::loss_and_grad) with the gradient written over the logits.
    pub fn loss_and_grad_in_place<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        logits: &mut [L],
        tokens: Tokens<'_, I>,
    ) -> Result<LossOutput> {
        self.run::<L, I>(spec, shape, Src::Write(logits), tokens, Dest::Skip, None)
    }

    /// For a caller that finds an error of this rank before it can make a call (inputs it
    /// cannot describe to the call at all, such as a binding's own checks of its tensors):
    /// takes part in the call's first exchanges as a rank that failed, as the calls do with an
    /// error of their own, so that every other rank of both groups returns
    /// [`Error::PeerFailed`] from its call instead of waiting for this one; returns `error`.
    /// This rank's slice, and so the vocabulary, may be any (its words only say that it
    /// failed). An exchange that itself fails is returned instead ([`Error::Collective`]); a
    /// group whose rank is not within its size exchanges nothing (as the calls do).
    ///
    /// ```
    /// use fused_weighted_loss::parallel::{Sharded, Solo, VocabSlice};
    /// use fused_weighted_loss::Error;
    /// // (a group of one: nothing to exchange)
    /// let e = Sharded::vocab_parallel(VocabSlice::full(10)?, &Solo).fail_with(Error::EmptyHidden);
    /// assert_eq!(e, Error::EmptyHidden);
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn fail_with(&self, error: Error) -> Error {
        if self.check_ranks().is_err() {
            return error;
        }
        // (the [B, T] words of a rank that failed are not sent)
        let none = || Agreement { spec: 0, call: 0, tokens: 0 };
        match super::first_exchanges(self, [0, 0], none, Err(error), |()| [0.0; 2], |_, _| Ok(())) {
            Err(e) => e,
            Ok(()) => unreachable!("a rank that failed returns an error from its first exchanges"),
        }
    }

    /// Each group's rank is within its size, and its size within [`MAX_RANKS`](super::MAX_RANKS):
    /// a group that is not one fails the call at once, before any exchange (there is no group
    /// to tell).
    pub(super) fn check_ranks(&self) -> Result<()> {
        for g in [self.vocab_group, self.data_group] {
            crate::parallel::check_group(g.rank(), g.size())?;
        }
        Ok(())
    }

    /// This rank's slice names the call's vocabulary.
    pub(super) fn check_vocab(&self, vocab: usize) -> Result<()> {
        let slice = self.slice;
        if slice.vocab() != vocab {
            return Err(Error::InvalidVocabSlice { start: slice.start(), len: slice.len(), vocab });
        }
        Ok(())
    }

    /// In a vocabulary group of one, this rank's slice is the whole vocabulary (larger groups
    /// check that their slices tile it in their first exchange).
    pub(super) fn check_alone_holds_all(&self) -> Result<()> {
        if self.vocab_group.size() == 1 {
            check_tiling(&[(self.slice.start(), self.slice.len())], self.slice.vocab())?;
        }
        Ok(())
    }

    /// This rank's checks of a logits call before its first exchange: the slice, the buffers'
    /// lengths.
    fn check_call<L>(
        &self,
        shape: Shape,
        src: &Src<'_, L>,
        dest: &Dest<'_, L>,
        token_loss: Option<&[f32]>,
    ) -> Result<()> {
        self.check_vocab(shape.vocab())?;
        self.check_alone_holds_all()?;
        let (rows, len) = (shape.rows(), self.slice.len());
        check_len("logits", src.len(), rows * len, shape)?;
        let n = match dest {
            Dest::Skip => rows * len,
            Dest::Into(g) => g.len(),
            Dest::IntoF32(g) => g.len(),
        };
        if n != rows * len {
            return Err(Error::GradLength { expected: rows * len, got: n });
        }
        crate::check_token_loss(shape, token_loss)
    }

    fn run<L: Logit, I: TokenId>(
        &self,
        spec: &LossSpec,
        shape: Shape,
        mut src: Src<'_, L>,
        tokens: Tokens<'_, I>,
        mut dest: Dest<'_, L>,
        token_loss: Option<&mut [f32]>,
    ) -> Result<LossOutput> {
        let (vg, dg) = (self.vocab_group, self.data_group);
        let slice = self.slice;
        self.check_ranks()?;
        // this rank's own errors (here and in the plan) wait for the first exchanges, which
        // carry them to every rank of both groups (see `first_exchanges`)
        let checked = self.check_call(shape, &src, &dest, token_loss.as_deref());
        let bytes = self.chunk_bytes.unwrap_or(DEFAULT_CHUNK_BYTES);
        let chunk = self.chunk_rows.unwrap_or_else(|| chunk_rows_for(shape.vocab(), vg.size(), bytes));
        let agree =
            || Agreement::new(spec, shape.vocab(), shape.seq(), call_digest(LOGITS_CALL, chunk as u64, 0), &tokens);
        if shape.batch() == 0 {
            return super::no_samples(spec, shape, &tokens, self, agree, checked);
        }
        if vg.size() == 1 && !self.split_steps {
            // the whole vocabulary on this rank: nothing to exchange per row, so the
            // single-device pass (one read of each row, no chunks) with the data group's
            // denominators
            return whole_rows(spec, shape, src, tokens, dest, token_loss, self, agree, checked);
        }
        let (rows, len) = (shape.rows(), slice.len());
        let wants_grad = !matches!((&src, &dest), (Src::Read(_), Dest::Skip));
        let steps = checked.and_then(|()| ShardedLoss::new(spec, shape, slice, tokens));
        // every rank's [B, T], slice and V in words of the same length on every rank (the
        // chunks' number and lengths follow from B·T and V, which a rank may have wrong), then
        // the data group's batch totals
        let steps = super::first_exchanges(
            self,
            super::token_dims(shape),
            agree,
            steps,
            ShardedLoss::batch_totals,
            |st, all| match all {
                Some(all) => st.set_batch_totals(all),
                None => Ok(()),
            },
        )?;
        // (each chunk's exponentials are kept for its gradient; the next chunk's beside them)
        let mut steps = steps.with_keep_rows(if wants_grad { chunk.saturating_mul(2) } else { 0 });

        // chunk k's exchange, merge, then its gradient beside chunk k + 1's statistics (one
        // parallel pass); every exchange also carries each rank's slice, checked to tile
        let chunks: Vec<Range<usize>> = (0..rows).step_by(chunk.max(1)).map(|r0| r0..(r0 + chunk).min(rows)).collect();
        let mut ex = Exchange::new(vg, slice);
        // (not from a thread of the pool itself: it would wait for workers that may need its thread)
        if wants_grad && chunks.len() > 1 && steps.cpu_mut().can_keep() && rayon::current_thread_index().is_none() {
            // one worker per thread of the pool, this one too, the exchanges on this thread
            let step = chunk.max(1) * len;
            match (&mut src, &mut dest) {
                (Src::Write(l), _) => {
                    pipeline::run(&mut steps, &mut ex, &chunks, len, l.chunks_mut(step).map(InPlace).collect())
                }
                (Src::Read(l), Dest::Into(g)) => {
                    let mems = l.chunks(step).zip(g.chunks_mut(step)).map(|(logits, grad)| ReadInto { logits, grad });
                    pipeline::run(&mut steps, &mut ex, &chunks, len, mems.collect())
                }
                (Src::Read(l), Dest::IntoF32(g)) => {
                    let mems = l.chunks(step).zip(g.chunks_mut(step)).map(|(logits, grad)| ReadInto { logits, grad });
                    pipeline::run(&mut steps, &mut ex, &chunks, len, mems.collect())
                }
                (Src::Read(_), Dest::Skip) => unreachable!("a loss-only call writes no gradient"),
            }?;
            let mut token_loss = token_loss;
            return super::finish_over(dg, spec.check_finite, |check| {
                steps.output_checked(check, token_loss.as_deref_mut())
            });
        }
        if let Some(c0) = chunks.first() {
            let n = steps.partials_len(c0.len());
            steps.partials(c0.clone(), src.rows(c0, len), ex.buffer(n))?;
        }
        for (k, r) in chunks.iter().enumerate() {
            let n = steps.partials_len(r.len());
            let merged = {
                let (gathered, stride) = ex.gather(n)?;
                steps.merge(r, gathered, Some(stride))?
            };
            let next = chunks.get(k + 1).cloned();
            let span = r.start * len..r.end * len;
            match (&mut src, &mut dest, next) {
                (Src::Read(_), Dest::Skip, Some(nx)) => {
                    let n1 = steps.partials_len(nx.len());
                    steps.partials(nx.clone(), src.rows(&nx, len), ex.buffer(n1))?;
                }
                (Src::Read(_), Dest::Skip, None) => {}
                (Src::Write(logits), _, nx) => {
                    let (done, rest) = logits.split_at_mut(r.end * len);
                    let next = nx.map(|nx| (nx.clone(), &rest[..nx.len() * len]));
                    step(&mut steps, &mut ex, r, &merged, Fused::InPlace(&mut done[span]), next);
                }
                (Src::Read(logits), Dest::Into(g), nx) => {
                    let next = nx.map(|nx| (nx.clone(), &logits[nx.start * len..nx.end * len]));
                    step(&mut steps, &mut ex, r, &merged, Fused::Into(&logits[span.clone()], &mut g[span]), next);
                }
                (Src::Read(logits), Dest::IntoF32(g), nx) => {
                    let next = nx.map(|nx| (nx.clone(), &logits[nx.start * len..nx.end * len]));
                    step(&mut steps, &mut ex, r, &merged, Fused::Into(&logits[span.clone()], &mut g[span]), next);
                }
            }
        }

        let mut token_loss = token_loss;
        super::finish_over(dg, spec.check_finite, |check| steps.output_checked(check, token_loss.as_deref_mut()))
    }
}

/// A call whose vocabulary group is this rank alone: the single-device CPU pass over every
/// row, normalised by the data group's batch (one all-gather of three numbers per rank before,
/// its batch totals and spec digest, and one of two after, as the chunked path does).
/// `checked`: this rank's checks so far.
#[allow(clippy::too_many_arguments)]
fn whole_rows<L: Logit, I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    src: Src<'_, L>,
    tokens: Tokens<'_, I>,
    dest: Dest<'_, L>,
    token_loss: Option<&mut [f32]>,
    call: &Sharded<'_>,
    agree: impl FnOnce() -> Agreement,
    checked: Result<()>,
) -> Result<LossOutput> {
    let dg = call.data_group;
    let planned = checked.and_then(|()| Ok((spec.plan(shape, &tokens)?, crate::cpu_kernels(spec.cpu_simd)?)));
    let (plan, k) = super::first_exchanges(
        call,
        super::token_dims(shape),
        agree,
        planned,
        |(plan, _)| super::plan_totals(plan),
        |(plan, _), all| super::global_denominator(plan, spec, all),
    )?;
    let rows = match (src, dest) {
        (Src::Write(logits), _) => crate::cpu::run_in_place(&k, &plan, logits),
        (Src::Read(logits), Dest::Skip) => crate::cpu::run::<L, f32>(&k, &plan, logits, None),
        (Src::Read(logits), Dest::Into(g)) => crate::cpu::run::<L, L>(&k, &plan, logits, Some(g)),
        (Src::Read(logits), Dest::IntoF32(g)) => crate::cpu::run::<L, f32>(&k, &plan, logits, Some(g)),
    };
    let mut token_loss = token_loss;
    super::finish_over(dg, spec.check_finite, |check| {
        plan.finish(&rows, check, crate::Backend::Cpu, token_loss.as_deref_mut())
    })
}

/// One chunk's gradient from its merged statistics, beside the next chunk's statistics into the
/// exchange's send buffer when there is a next chunk.
fn step<L: Logit, G: Logit>(
    steps: &mut ShardedLoss,
    ex: &mut Exchange<'_>,
    r: &Range<usize>,
    merged: &[RowStats],
    dest: Fused<'_, L, G>,
    next: Option<(Range<usize>, &[L])>,
) {
    match next {
        Some((nx, logits)) => {
            let n = steps.partials_len(nx.len());
            steps.grad_and_partials(r.clone(), merged, dest, nx, logits, ex.buffer(n));
        }
        None => steps.grad(r.clone(), merged, dest),
    }
}

/// The logits of a call: read, or read and then overwritten with the gradient.
enum Src<'a, L> {
    Read(&'a [L]),
    Write(&'a mut [L]),
}

impl<L> Src<'_, L> {
    fn len(&self) -> usize {
        match self {
            Src::Read(l) => l.len(),
            Src::Write(l) => l.len(),
        }
    }

    /// The logits of rows `r`, `len` per row.
    fn rows(&self, r: &std::ops::Range<usize>, len: usize) -> &[L] {
        match self {
            Src::Read(l) => &l[r.start * len..r.end * len],
            Src::Write(l) => &l[r.start * len..r.end * len],
        }
    }
}

/// Where the gradient goes (in place: see [`Src::Write`]).
enum Dest<'a, L> {
    Skip,
    Into(&'a mut [L]),
    IntoF32(&'a mut [f32]),
}

impl<'a, L: Logit> From<Grad<'a, L>> for Dest<'a, L> {
    fn from(g: Grad<'a, L>) -> Self {
        match g {
            Grad::Skip => Dest::Skip,
            Grad::Into(g) => Dest::Into(g),
            Grad::IntoF32(g) => Dest::IntoF32(g),
        }
    }
}

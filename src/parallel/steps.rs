//! The split as steps on host buffers, driven by the caller's exchange.

use super::wire::{check_pairs, check_sealed, encode_sealed, FAILED, SLICE_WORDS};
use super::{sum_in_rank_order, VocabSlice};
use crate::cpu::split::{merge_rows, words, Dest, Rows, SplitCpu};
use crate::cpu::RowStats;
use crate::dtype::{Logit, TokenId};
use crate::error::{Error, Result};
use crate::plan::{Plan, RowLosses, NO_TARGET};
use crate::spec::{check_len, LossOutput, LossSpec, Shape, Tokens};
use crate::Backend;
use std::ops::Range;

/// Bytes of exponentials [`ShardedLoss`] keeps by default between its steps: two chunks of
/// 2 MiB (a driver may take a chunk's statistics while the previous chunk's are exchanged).
const KEEP_BYTES: usize = 4 << 20;

/// One sharded call on host buffers, as steps (see the [module](super) docs): the statistics of
/// a range of rows, the caller's all-gather, the merge and the gradient of this rank's slice of
/// those rows, then the per-sample and batch loss.
///
/// The driver's contract: every rank of a vocabulary group takes the same row ranges in the same
/// order (the words a rank sends carry its slice, not its rows, so the merge cannot tell that a
/// peer's words are of other rows), and the ranks of a group make the same exchanges. Unlike
/// [`Sharded`](super::Sharded), the steps do not check that the ranks' tokens, spec or `[B, T]`
/// agree (there is no first exchange). On a grid (vocabulary and data groups both of more than
/// one rank) a failure has to be passed on: a rank whose
/// [`set_batch_totals`](Self::set_batch_totals) returns [`Error::PeerFailed`] sends
/// [`failed_partials`](Self::failed_partials) in the vocabulary exchange it would have made next,
/// then stops, so that its vocabulary peers, which the failed rank never told, fail too instead
/// of waiting ([`Sharded`](super::Sharded) does this itself).
///
/// ```
/// use fused_weighted_loss::parallel::{ShardedLoss, VocabSlice};
/// use fused_weighted_loss::{Grad, LossSpec, Shape, Tokens};
///
/// // two ranks split a vocabulary of 6: rank 0 holds ids 0..4, rank 1 ids 4..6
/// let shape = Shape::new(1, 3, 6)?;
/// let logits: Vec<f32> = (0..18).map(|i| (i % 5) as f32 * 0.7 - 1.0).collect();
/// let ids = [1i64, 5, 2];
/// let spec = LossSpec::default();
/// let slices = [VocabSlice::new(0, 4, 6)?, VocabSlice::new(4, 2, 6)?];
/// let local = |s: &VocabSlice| -> Vec<f32> {
///     logits.chunks(6).flat_map(|row| row[s.start()..s.end()].to_vec()).collect()
/// };
///
/// let mut steps: Vec<ShardedLoss> =
///     slices.iter().map(|&s| ShardedLoss::new(&spec, shape, s, Tokens::new(&ids))).collect::<Result<_, _>>()?;
/// let rows = 0..shape.rows();
/// // statistics of every row on each rank, then "all-gather": concatenate in rank order
/// let mut gathered = Vec::new();
/// for (st, s) in steps.iter_mut().zip(&slices) {
///     let mut part = vec![0.0; st.partials_len(rows.len())];
///     st.partials(rows.clone(), &local(s), &mut part)?;
///     gathered.extend(part);
/// }
/// // each rank merges and writes the gradient of its slice
/// let mut outs = Vec::new();
/// for (mut st, s) in steps.into_iter().zip(&slices) {
///     let mut grad = vec![0f32; shape.rows() * s.len()];
///     st.finish_rows_grad(rows.clone(), &gathered, &local(s), &mut grad)?;
///     outs.push(st.finish()?);
/// }
/// let whole = spec.loss_and_grad(shape, &logits, Tokens::new(&ids), Grad::Skip)?;
/// assert_eq!(outs[0].loss, outs[1].loss); // every rank: the same bits
/// assert!((outs[0].loss - whole.loss).abs() <= 1e-6 * whole.loss);
/// # Ok::<(), fused_weighted_loss::Error>(())
/// ```
pub struct ShardedLoss {
    spec: LossSpec,
    plan: Plan,
    slice: VocabSlice,
    cpu: SplitCpu,
    words: usize,
    losses: RowLosses,
    /// Rows whose loss is known, and how many are still missing.
    finished: Vec<bool>,
    missing: usize,
    /// Whether a gradient has been written (the denominators are fixed from then on).
    grad_written: bool,
    /// Whether the data group's batch totals were set (a rank without samples needs them).
    totals_set: bool,
}

impl std::fmt::Debug for ShardedLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedLoss").field("shape", &self.plan.shape).field("slice", &self.slice).finish()
    }
}

impl ShardedLoss {
    /// Validates the tokens (`[B, T]` of this rank's samples, ids and labels in the whole
    /// vocabulary) and plans the call. `shape` is `[B, T, V]` with this rank's `B` and the whole
    /// `V`; the logits of each step hold `slice.len()` columns per row. The steps run on the
    /// CPU backend (at the spec's `cpu_simd` level).
    ///
    /// A data-parallel rank that holds no samples this step passes
    /// [`Shape::without_samples`] and empty tokens: it has no rows (its
    /// [`partials`](Self::partials) of `0..0` are its slice's words alone), sends
    /// [`batch_totals`](Self::batch_totals) `[0, 0]`, and its [`finish`](Self::finish) then
    /// gives a share of 0 of the loss, which [`combine_loss`](Self::combine_loss) turns into its
    /// peers' loss. Its [`set_batch_totals`](Self::set_batch_totals) is required (without it,
    /// `finish` is [`Error::EmptyBatch`]) and fails with [`Error::EmptyDataGroup`] when no rank
    /// holds a sample.
    ///
    /// ```
    /// use fused_weighted_loss::parallel::{ShardedLoss, VocabSlice};
    /// use fused_weighted_loss::{LossSpec, Shape, Tokens};
    ///
    /// let (spec, full) = (LossSpec::default(), VocabSlice::full(4)?);
    /// let none: [i64; 0] = [];
    /// let mut empty = ShardedLoss::new(&spec, Shape::without_samples(3, 4)?, full, Tokens::new(&none))?;
    /// let ids = [1i64, 3, 2];
    /// let mut full_rank = ShardedLoss::new(&spec, Shape::new(1, 3, 4)?, full, Tokens::new(&ids))?;
    /// // the data group's exchange of [B, Σ w_b], in rank order
    /// let totals = [empty.batch_totals(), full_rank.batch_totals()].concat();
    /// empty.set_batch_totals(&totals)?;
    /// full_rank.set_batch_totals(&totals)?;
    /// let mut words = vec![0.0; full_rank.partials_len(3)];
    /// full_rank.partials(0..3, &[0.25f32; 12], &mut words)?;
    /// full_rank.finish_rows(0..3, &words)?;
    /// let mut outs = [empty.finish()?, full_rank.finish()?];
    /// let shares = [ShardedLoss::loss_totals(&outs[0]), ShardedLoss::loss_totals(&outs[1])].concat();
    /// for out in &mut outs {
    ///     ShardedLoss::combine_loss(out, &shares)?;
    /// }
    /// assert_eq!(outs[0].loss, outs[1].loss); // the empty rank: its peers' loss
    /// assert!((outs[0].loss - 4f64.ln()).abs() < 1e-6); // uniform rows of 4
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    pub fn new<I: TokenId>(spec: &LossSpec, shape: Shape, slice: VocabSlice, tokens: Tokens<'_, I>) -> Result<Self> {
        if slice.vocab() != shape.vocab() {
            return Err(Error::InvalidVocabSlice { start: slice.start(), len: slice.len(), vocab: shape.vocab() });
        }
        let plan = spec.plan_of_rank(shape, &tokens)?;
        let k = crate::cpu_kernels(spec.cpu_simd)?;
        let rows = shape.rows();
        let keep = super::call::chunk_rows_for_len(slice.len(), KEEP_BYTES);
        let cpu = SplitCpu::new(k, &plan.opts, shape.vocab(), (slice.start(), slice.len()), rows, keep);
        Ok(ShardedLoss {
            spec: spec.clone(),
            words: words(&plan.opts),
            plan,
            slice,
            cpu,
            losses: RowLosses { loss: vec![0.0; rows], z: vec![0.0; rows] },
            finished: vec![false; rows],
            missing: rows,
            grad_written: false,
            totals_set: false,
        })
    }

    /// For a driver whose rank fails before it has a `ShardedLoss` (an error of [`new`](Self::new)
    /// or of its own checks): the words this rank sends in the vocabulary group's exchange of
    /// the first `rows` rows instead of [`partials`](Self::partials)' (the same length as a
    /// healthy rank's for the same `spec`, every word marked as failed). Every peer's merge of
    /// that exchange ([`finish_rows`](Self::finish_rows) and the other `finish_rows_*`) then
    /// returns [`Error::PeerFailed`] instead of the peers waiting in a later exchange that this
    /// rank never joins; with [`FAILED_TOTALS`](Self::FAILED_TOTALS) in the data group's
    /// exchange, the same there. The rank itself keeps its own error; neither it nor its peers
    /// make the call's later exchanges.
    ///
    /// ```
    /// use fused_weighted_loss::parallel::{ShardedLoss, VocabSlice};
    /// use fused_weighted_loss::{Error, LossSpec, Shape, Tokens};
    ///
    /// let (shape, spec) = (Shape::new(1, 3, 6)?, LossSpec::default());
    /// let slices = [VocabSlice::new(0, 4, 6)?, VocabSlice::new(4, 2, 6)?];
    /// let mut rank0 = ShardedLoss::new(&spec, shape, slices[0], Tokens::new(&[1i64, 5, 2]))?;
    /// // rank 1 holds an id outside the vocabulary: its own error, and words that say so
    /// assert!(ShardedLoss::new(&spec, shape, slices[1], Tokens::new(&[1i64, 9, 2])).is_err());
    /// let mut gathered = vec![0.0; rank0.partials_len(3)];
    /// rank0.partials(0..3, &[0.5f32; 12], &mut gathered)?;
    /// gathered.extend(ShardedLoss::failed_partials(&spec, 3));
    /// assert_eq!(rank0.finish_rows(0..3, &gathered), Err(Error::PeerFailed { group: "vocabulary", rank: 1 }));
    /// # Ok::<(), fused_weighted_loss::Error>(())
    /// ```
    ///
    /// # Panics
    ///
    /// As `vec!` does, when `rows` is beyond any call's: the words would not fit in memory.
    pub fn failed_partials(spec: &LossSpec, rows: usize) -> Vec<f64> {
        let len = rows.saturating_mul(words(&spec.row_options())).saturating_add(SLICE_WORDS);
        vec![FAILED; len]
    }

    /// What a rank that failed (see [`failed_partials`](Self::failed_partials)) sends in the
    /// data group's exchange instead of its [`batch_totals`](Self::batch_totals): every peer's
    /// [`set_batch_totals`](Self::set_batch_totals) then returns [`Error::PeerFailed`].
    pub const FAILED_TOTALS: [f64; 2] = [FAILED; 2];

    /// Rows whose exponentials are kept at once between [`partials`](Self::partials) and
    /// [`finish_rows_grad`](Self::finish_rows_grad), `slice.len() × 4` bytes each (twice that with
    /// soft-capping and label smoothing together). Default: 4 MiB of kept exponentials (at
    /// least 4 rows), twice [`DEFAULT_CHUNK_BYTES`](super::DEFAULT_CHUNK_BYTES) and more; a driver
    /// whose chunks in flight are larger sets it to what it keeps. Rows beyond it are recomputed from the logits in the gradient step (one
    /// more read); 0 keeps nothing (for loss-only calls). The row buffers kept by the last call
    /// of the same slice length serve this one.
    pub fn with_keep_rows(mut self, rows: usize) -> Self {
        self.cpu.set_keep_rows(rows);
        self
    }

    /// The call's shape: this rank's `B`, `T`, the whole `V`.
    pub fn shape(&self) -> Shape {
        self.plan.shape
    }

    /// The call's rows, `B * T`.
    pub fn rows(&self) -> usize {
        self.plan.shape.rows()
    }

    /// This rank's slice.
    pub fn slice(&self) -> VocabSlice {
        self.slice
    }

    /// `f64` words of one row's statistics: 3, 4 with label smoothing, 5 with soft-capping.
    pub fn words_per_row(&self) -> usize {
        self.words
    }

    /// The length of [`partials`](Self::partials)' output for `rows` rows:
    /// [`words_per_row`](Self::words_per_row) per row, then this rank's slice (3 words: start,
    /// length, vocabulary), by which the merge checks what it was given.
    /// (`usize::MAX` where that overflows: no buffer of that length can be had).
    pub fn partials_len(&self, rows: usize) -> usize {
        rows.saturating_mul(self.words).saturating_add(SLICE_WORDS)
    }

    /// This rank's data-parallel totals, `[B, Σ w_b]`, to all-gather over the data group (they
    /// depend on the ids only).
    pub fn batch_totals(&self) -> [f64; 2] {
        [self.plan.shape.batch() as f64, self.plan.weights.iter().sum()]
    }

    /// Sets the reduction's denominator from the data group's all-gathered
    /// [`batch_totals`](Self::batch_totals) (`2 × ranks` numbers in rank order), summed in rank
    /// order: the global `B` for `Mean`, the global `Σ w_b` for `WeightedMean`. Before any
    /// gradient is written. A rank's [`FAILED_TOTALS`](Self::FAILED_TOTALS) make it
    /// [`Error::PeerFailed`].
    pub fn set_batch_totals(&mut self, gathered: &[f64]) -> Result<()> {
        check_pairs("gathered batch totals", gathered)?;
        if self.grad_written {
            return Err(Error::StepOrder("set_batch_totals after a gradient was written"));
        }
        if let Some(rank) = gathered.chunks_exact(2).position(|p| p == Self::FAILED_TOTALS) {
            return Err(Error::PeerFailed { group: "data", rank });
        }
        // every rank's pair, this rank's among them (zeros, or another call's numbers, set a
        // denominator that zeroed or skewed the loss and gradient silently)
        let mine = self.batch_totals();
        // (Σ w_b may overflow to +inf where the reduction does not use it)
        let ok =
            gathered.chunks_exact(2).all(|p| p[0].is_finite() && p[0] >= 0.0 && p[0].fract() == 0.0 && p[1] >= 0.0)
                && gathered.chunks_exact(2).any(|p| p == mine);
        if !ok {
            return Err(Error::Collective(format!(
                "the gathered batch totals {gathered:?} are not every rank's [B, Σ w_b] (this rank's: {mine:?})"
            )));
        }
        if sum_in_rank_order(gathered, 2, 0) == 0.0 {
            return Err(Error::EmptyDataGroup);
        }
        self.plan.set_denominator(super::denominator(self.spec.reduction, gathered)?, self.spec.grad_scale);
        self.totals_set = true;
        Ok(())
    }

    /// Checks a row range.
    /// Checks a row range and a buffer of `per_row` elements per row.
    fn check_rows(&self, rows: &Range<usize>, what: &'static str, got: usize, per_row: usize) -> Result<()> {
        check_range(rows, self.rows())?;
        check_len(what, got, rows.len() * per_row, self.plan.shape)
    }

    /// The statistics of this rank's slice of rows `rows` into `out`
    /// ([`partials_len`](Self::partials_len)`(rows.len())` words, row after row), for the
    /// all-gather. `logits` holds those rows' `slice.len()` logits each. Their exponentials are
    /// kept (within the budget, see [`with_keep_rows`](Self::with_keep_rows)) for the gradient
    /// step of the same range.
    pub fn partials<L: Logit>(&mut self, rows: Range<usize>, logits: &[L], out: &mut [f64]) -> Result<()> {
        self.check_rows(&rows, "logits", logits.len(), self.slice.len())?;
        if out.len() != self.partials_len(rows.len()) {
            let expected = self.partials_len(rows.len());
            return Err(Error::ExchangeLength { what: "partials buffer", expected, got: out.len() });
        }
        let mut st = vec![RowStats::EMPTY; rows.len()];
        self.cpu.stats(&self.plan, &Rows::range(rows), logits, &mut st, true);
        self.encode_all(&st, out);
        Ok(())
    }

    fn encode_all(&self, st: &[RowStats], out: &mut [f64]) {
        encode_sealed(st, self.words, self.slice, out);
    }

    /// A pipelined driver's step: [`finish_rows_grad`](Self::finish_rows_grad) of rows `done`
    /// and [`partials`](Self::partials) of rows `next` in one parallel pass (one chunk's
    /// gradient writes beside the next chunk's reads).
    #[allow(clippy::too_many_arguments)]
    pub fn finish_rows_grad_then_partials<L: Logit, G: Logit>(
        &mut self,
        done: Range<usize>,
        gathered: &[f64],
        logits: &[L],
        grad: &mut [G],
        next: Range<usize>,
        next_logits: &[L],
        next_out: &mut [f64],
    ) -> Result<()> {
        self.check_rows(&done, "logits", logits.len(), self.slice.len())?;
        self.check_rows(&done, "gradient", grad.len(), self.slice.len())?;
        self.check_rows(&next, "logits", next_logits.len(), self.slice.len())?;
        if next_out.len() != self.partials_len(next.len()) {
            let expected = self.partials_len(next.len());
            return Err(Error::ExchangeLength { what: "partials buffer", expected, got: next_out.len() });
        }
        let merged = self.merge(&done, gathered, None)?;
        self.grad_and_partials(done, &merged, Dest::Into(logits, grad), next, next_logits, next_out);
        Ok(())
    }

    /// The gradient of rows `done` (merged) beside the statistics of rows `next` (buffers
    /// checked by the caller).
    pub(crate) fn grad_and_partials<L: Logit, G: Logit>(
        &mut self,
        done: Range<usize>,
        merged: &[RowStats],
        dest: Dest<'_, L, G>,
        next: Range<usize>,
        next_logits: &[L],
        next_out: &mut [f64],
    ) {
        self.grad_written = true;
        let mut st = vec![RowStats::EMPTY; next.len()];
        let (done, next) = (Rows::range(done), Rows::range(next));
        self.cpu.grad_and_stats(&self.plan, &done, merged, dest, &next, next_logits, &mut st);
        self.encode_all(&st, next_out);
    }

    /// Merges the all-gathered statistics of rows `rows` (every rank's
    /// [`partials`](Self::partials) output, concatenated in rank order) and records the rows'
    /// losses. Loss only: kept exponentials of the range are dropped.
    pub fn finish_rows(&mut self, rows: Range<usize>, gathered: &[f64]) -> Result<()> {
        self.merge(&rows, gathered, None)?;
        self.cpu.drop_kept(&rows);
        Ok(())
    }

    /// [`finish_rows`](Self::finish_rows), and the gradient of this rank's slice of those rows
    /// into `grad` (`slice.len()` per row, in `G`: the logits' dtype or another). `logits` are
    /// the same rows' logits, read again only for rows whose exponentials were not kept.
    pub fn finish_rows_grad<L: Logit, G: Logit>(
        &mut self,
        rows: Range<usize>,
        gathered: &[f64],
        logits: &[L],
        grad: &mut [G],
    ) -> Result<()> {
        self.check_rows(&rows, "logits", logits.len(), self.slice.len())?;
        self.check_rows(&rows, "gradient", grad.len(), self.slice.len())?;
        let merged = self.merge(&rows, gathered, None)?;
        self.grad(rows, &merged, Dest::Into(logits, grad));
        Ok(())
    }

    /// [`finish_rows_grad`](Self::finish_rows_grad) with the gradient written over the logits.
    pub fn finish_rows_in_place<L: Logit>(
        &mut self,
        rows: Range<usize>,
        gathered: &[f64],
        logits: &mut [L],
    ) -> Result<()> {
        self.check_rows(&rows, "logits", logits.len(), self.slice.len())?;
        let merged = self.merge(&rows, gathered, None)?;
        self.grad::<L, L>(rows, &merged, Dest::InPlace(logits));
        Ok(())
    }

    /// The gradient of rows `rows` from their merged statistics (buffers checked by the caller).
    pub(crate) fn grad<L: Logit, G: Logit>(&mut self, rows: Range<usize>, merged: &[RowStats], dest: Dest<'_, L, G>) {
        self.grad_written = true;
        self.cpu.grad(&self.plan, &Rows::range(rows), merged, dest);
    }

    /// Merges the rows' statistics from `gathered`, in which rank `r`'s words start at
    /// `r * stride` (`stride`: `None` for `partials_len(rows.len())`), and records their losses.
    pub(crate) fn merge(
        &mut self,
        rows: &Range<usize>,
        gathered: &[f64],
        stride: Option<usize>,
    ) -> Result<Vec<RowStats>> {
        self.parts().2.merge(rows, gathered, stride)
    }

    fn parts(&mut self) -> (&Plan, &SplitCpu, Merge<'_>) {
        let ShardedLoss { plan, cpu, losses, finished, missing, words, slice, .. } = self;
        let (plan, cpu) = (&*plan, &*cpu);
        (plan, cpu, Merge { plan, cpu, words: *words, slice: *slice, losses, finished, missing })
    }

    /// For a driver with passes in flight while it exchanges and merges: the plan and the CPU
    /// side (shared by the passes) and the merge (the driver's own). Gradients are written from
    /// then on.
    pub(crate) fn pipeline_parts(&mut self) -> (&Plan, &SplitCpu, Merge<'_>) {
        self.grad_written = true;
        self.parts()
    }

    /// The CPU side, for row buffers a pipelined driver owns.
    pub(crate) fn cpu_mut(&mut self) -> &mut SplitCpu {
        &mut self.cpu
    }

    /// The per-sample and batch loss once every row is finished: on a data group of one, the
    /// loss; otherwise this rank's share of it (see [`loss_totals`](Self::loss_totals)). With
    /// `check_finite`, this rank's positions are checked here, before any exchange of the loss: a
    /// driver on a data group whose ranks should fail together builds the steps' spec without
    /// it and checks the loss [`combine_loss`](Self::combine_loss) gives, as [`Sharded`](super::Sharded)
    /// does.
    pub fn finish(self) -> Result<LossOutput> {
        self.output(None)
    }

    /// [`finish`](Self::finish), also writing each position's loss (`[B, T - 1]`, as
    /// [`LossSpec::loss_and_grad_per_token`]).
    pub fn finish_per_token(self, token_loss: &mut [f32]) -> Result<LossOutput> {
        self.output(Some(token_loss))
    }

    fn output(self, token_loss: Option<&mut [f32]>) -> Result<LossOutput> {
        self.output_checked(self.spec.check_finite, token_loss)
    }

    /// The output, with the spec's `check_finite` (`check`) or without it (the one calls check
    /// after combining the data group's loss, so that every rank of the group fails together).
    pub(crate) fn output_checked(&self, check: bool, token_loss: Option<&mut [f32]>) -> Result<LossOutput> {
        if self.missing > 0 {
            return Err(Error::StepOrder("finish before every row's statistics were merged"));
        }
        // a rank without samples has a share of its data group's loss only
        if self.plan.shape.batch() == 0 && !self.totals_set {
            return Err(Error::EmptyBatch);
        }
        crate::check_token_loss(self.plan.shape, token_loss.as_deref())?;
        self.plan.finish(&self.losses, check, Backend::Cpu, token_loss)
    }

    /// A data-parallel rank's share of the loss, `[loss, z_loss]`, to all-gather over the data
    /// group; [`combine_loss`](Self::combine_loss) sums them.
    pub fn loss_totals(out: &LossOutput) -> [f64; 2] {
        [out.loss, out.z_loss]
    }

    /// Sets `out.loss` and `out.z_loss` to the sums, in rank order, of the data group's
    /// all-gathered [`loss_totals`](Self::loss_totals) (`2 × ranks` numbers).
    pub fn combine_loss(out: &mut LossOutput, gathered: &[f64]) -> Result<()> {
        check_pairs("gathered loss totals", gathered)?;
        out.loss = sum_in_rank_order(gathered, 2, 0);
        out.z_loss = sum_in_rank_order(gathered, 2, 1);
        Ok(())
    }
}

/// The merge of a [`ShardedLoss`]: the rows' statistics from an all-gather, and their losses
/// recorded.
pub(crate) struct Merge<'a> {
    plan: &'a Plan,
    cpu: &'a SplitCpu,
    words: usize,
    slice: VocabSlice,
    losses: &'a mut RowLosses,
    finished: &'a mut [bool],
    missing: &'a mut usize,
}

impl Merge<'_> {
    /// The exchange words of `st`, this rank's statistics of `st.len()` rows, into `out`
    /// ([`ShardedLoss::partials_len`] words).
    pub(crate) fn encode(&self, st: &[RowStats], out: &mut [f64]) {
        encode_sealed(st, self.words, self.slice, out);
    }

    /// See [`ShardedLoss::merge`]. Without a `stride` (the steps' own callers) every rank's
    /// slice words are checked here; with one, the caller's exchange has checked them.
    pub(crate) fn merge(
        &mut self,
        rows: &Range<usize>,
        gathered: &[f64],
        stride: Option<usize>,
    ) -> Result<Vec<RowStats>> {
        check_range(rows, self.finished.len())?;
        let (w, n) = (self.words, rows.len());
        let sealed = n * w + SLICE_WORDS;
        let checked = stride.is_some();
        let stride = stride.unwrap_or(sealed);
        if stride < sealed || gathered.is_empty() || !gathered.len().is_multiple_of(stride) {
            let expected = stride.max(sealed) * (gathered.len() / stride.max(1)).max(1);
            return Err(Error::ExchangeLength { what: "gathered partials", expected, got: gathered.len() });
        }
        if !checked {
            check_sealed(gathered, stride, self.slice.vocab())?;
        }
        let m = &self.cpu.m;
        let merged = merge_rows(gathered, stride, w, n);
        for (i, r) in rows.clone().enumerate() {
            (self.losses.loss[r], self.losses.z[r]) =
                if self.plan.targets[r] == NO_TARGET { (0.0, 0.0) } else { m.loss(&merged[i]) };
            if !std::mem::replace(&mut self.finished[r], true) {
                *self.missing -= 1;
            }
        }
        Ok(merged)
    }
}

/// Checks a row range of a call of `total` rows.
fn check_range(rows: &Range<usize>, total: usize) -> Result<()> {
    if rows.start > rows.end || rows.end > total {
        return Err(Error::RowRange { start: rows.start, end: rows.end, rows: total });
    }
    Ok(())
}

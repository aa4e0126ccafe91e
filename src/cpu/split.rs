//! The vocabulary-parallel split on the CPU: the same two passes as a whole row (module docs of
//! [`super`]), cut at the exchange of the row statistics.
//!
//! - [`SplitCpu::stats`] runs the statistics pass over a rank's slice of each row of a range of
//!   rows (the slice's own reference, sum of exponentials (without the target's, when the target
//!   lies in the slice), logit sum; its capped target logit when the target lies in the slice) and keeps the exponentials of those rows, as a whole row keeps
//!   them between its passes;
//! - the caller exchanges the statistics and merges them ([`merge_row`], in rank order);
//! - [`SplitCpu::grad`] writes the slice's gradient from the kept exponentials and the merged
//!   statistics: one multiply per element, as for a whole row, with no second read of the
//!   logits. Rows whose exponentials were not kept (beyond the budget, or never asked for) are
//!   recomputed from the logits instead: the same values to rounding (a kept row scales its
//!   exponentials to the merged shift, a recomputed one takes them at it), one more read;
//! - [`SplitCpu::grad_and_stats`] runs one chunk's gradient beside the next chunk's statistics
//!   in one parallel pass, for drivers that pipeline; [`SplitCpu::pass_rows`] runs one thread's
//!   share of such a pass, each gradient row written inside the statistics loop of a row of the
//!   later chunk (the pipeline of [`Sharded`](crate::parallel::Sharded)).
//!
//! The row buffers of the kept exponentials outlive a call (up to 64 MiB, process-wide) and
//! serve the next call whose slice has the same length: no allocation, zeroing or page faults
//! of a few MiB per call.

use super::row::{RowMath, RowStats};
use super::simd::Kernels;
use super::{
    rows_per_task, stats_pass, target_of, zero, Pending, PrevRow, RowExps, RowSel, Scratch, CHUNK, SCRATCH_MAX,
    STREAM_MIN_BYTES,
};
use crate::dtype::Logit;
use crate::plan::{Plan, RowOptions};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Mutex;

/// Words (`f64`) one row's statistics take in the exchange: reference, sum of exponentials
/// (`RowStats::others`: without the target's term in the slice that holds the target), (capped)
/// target logit (0 outside the slice), the logit sum (label smoothing; 0 without it)
/// and, with soft-capping, the target's chain factor (0 outside the slice): 3, 4 with label
/// smoothing, 5 with soft-capping. The owner's chain factor is sent because the others cannot
/// recover it from the rounded capped value (`1 − (z / c)²` keeps an error of an ulp of 1).
pub(crate) fn words(opts: &RowOptions) -> usize {
    if opts.softcap.is_some() {
        5
    } else if opts.smoothing != 0.0 {
        4
    } else {
        3
    }
}

/// Writes a slice's row statistics as exchange words (`out.len()` is [`words`]).
pub(crate) fn encode(st: &RowStats, out: &mut [f64]) {
    out[0] = st.shift as f64;
    out[1] = st.others;
    out[2] = st.target_logit;
    if let Some(s) = out.get_mut(3) {
        *s = st.logit_sum;
    }
    if let Some(c) = out.get_mut(4) {
        *c = st.target_chain;
    }
}

/// Reads a slice's row statistics back from exchange words.
fn decode(w: &[f64]) -> RowStats {
    RowStats {
        shift: w[0] as f32,
        others: w[1],
        target_logit: w[2],
        target_chain: 1.0,
        logit_sum: w.get(3).copied().unwrap_or(0.0),
    }
}

/// The statistics of a whole row from those of every rank's slice, merged in the order given
/// (rank order: every rank gets the same bits). The (soft-capped) target logit is held by one
/// slice, 0 in the others, and so is its chain factor with soft-capping (both sums are exact);
/// without soft-capping the chain factor is 1.
pub(crate) fn merge_row<'a>(parts: impl Iterator<Item = &'a [f64]>) -> RowStats {
    let mut chain: Option<f64> = None;
    let mut st = parts
        .map(|w| {
            if let Some(&c) = w.get(4) {
                *chain.get_or_insert(0.0) += c;
            }
            decode(w)
        })
        .fold(RowStats::EMPTY, RowStats::merge);
    st.target_chain = chain.unwrap_or(1.0);
    st
}

/// The merged statistics of `n` rows from an all-gather in which rank `r`'s `words` per row
/// start at `r * stride`.
pub(crate) fn merge_rows(gathered: &[f64], stride: usize, words: usize, n: usize) -> Vec<RowStats> {
    let ranks = gathered.chunks_exact(stride.max(1));
    (0..n).map(|i| merge_row(ranks.clone().map(|rank| &rank[i * words..(i + 1) * words]))).collect()
}

/// The rows a step covers: buffer row `i` is plan row `sel.global(i)`, `key.len()` rows; `key`
/// names them for the exponentials kept between the steps (the same key in both steps).
#[derive(Debug, Clone)]
pub(crate) struct Rows<'a> {
    pub key: Range<usize>,
    pub sel: RowSel<'a>,
}

impl Rows<'static> {
    /// Plan rows `r`, consecutive.
    pub fn range(r: Range<usize>) -> Rows<'static> {
        Rows { sel: RowSel::From(r.start), key: r }
    }
}

impl Rows<'_> {
    fn len(&self) -> usize {
        self.key.len()
    }
}

/// Where a gradient step writes.
pub(crate) enum Dest<'a, L, G> {
    /// Into a buffer, the logits beside it (read again for rows whose exponentials were not kept).
    Into(&'a [L], &'a mut [G]),
    /// Over the logits (then `L` is `G`).
    InPlace(&'a mut [G]),
}

impl<'a, L: Logit, G: Logit> Dest<'a, L, G> {
    /// The gradient and the logits beside it (`None`: in place, the logits are the gradient).
    fn into_parts(self) -> (&'a mut [G], Option<&'a [L]>) {
        match self {
            Dest::Into(l, o) => (o, Some(l)),
            Dest::InPlace(o) => (o, None),
        }
    }
}

/// Row buffers of the last call that ended, for the next call whose rows have the same length
/// (calls repeat with the same shapes: no fresh allocation, zeroing and page faults per call).
static SPARE: Mutex<Vec<RowExps>> = Mutex::new(Vec::new());

/// At most this many bytes of row buffers are kept between calls.
const SPARE_MAX_BYTES: usize = 64 << 20;

/// Bytes of one row buffer.
fn row_bytes(e: &RowExps) -> usize {
    4 * (e.exps.len() + e.chain.len() + e.shifts.len())
}

/// Exponentials kept for some rows between [`SplitCpu::stats`] and [`SplitCpu::grad`].
struct Kept {
    key: Range<usize>,
    exps: Vec<RowExps>,
}

/// The CPU side of one split call: kernels, the row arithmetic (of the whole vocabulary), the
/// slice `[v0, v0 + len)` and the exponentials kept between the steps.
pub(crate) struct SplitCpu {
    k: Kernels,
    pub m: RowMath,
    v0: usize,
    len: usize,
    /// Rows of the whole call (whether gradient stores stream depends on the whole gradient).
    rows: usize,
    /// At most this many rows' exponentials are kept at once.
    keep_rows: usize,
    kept: Vec<Kept>,
    /// Row buffers of rows already written, for reuse.
    pool: Vec<RowExps>,
}

impl SplitCpu {
    /// `vocab` is the whole vocabulary (label smoothing divides by it), `v0..v0 + len` this
    /// rank's slice, `rows` the call's rows; the exponentials of up to `keep_rows` rows are kept
    /// between the steps (none for slices longer than a kept row can be).
    pub fn new(
        k: Kernels,
        opts: &RowOptions,
        vocab: usize,
        (v0, len): (usize, usize),
        rows: usize,
        keep_rows: usize,
    ) -> SplitCpu {
        let keep_rows = if len <= SCRATCH_MAX { keep_rows } else { 0 };
        let m = RowMath::new(opts, vocab);
        // the last call's row buffers when they fit these rows (else they are freed)
        let mut pool = SPARE.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        let chain = if m.keeps_chain() { len } else { 0 }; // a kept row's buffers, as `RowExps::new`
        let fits = |e: &RowExps| (e.exps.len(), e.chain.len(), e.shifts.len()) == (len, chain, len.div_ceil(CHUNK));
        if keep_rows == 0 || !pool.iter().all(fits) {
            pool.clear();
        }
        SplitCpu { k, m, v0, len, rows, keep_rows, kept: Vec::new(), pool }
    }

    /// Keeps up to `keep_rows` rows' exponentials from now on (none for slices longer than a
    /// kept row can be), with the row buffers in hand (a new `SplitCpu` for the new budget took
    /// an empty spare list while this one held it, and the spare buffers were freed).
    pub fn set_keep_rows(&mut self, keep_rows: usize) {
        self.keep_rows = if self.len <= SCRATCH_MAX { keep_rows } else { 0 };
    }

    /// At most this many rows' exponentials are kept at once (0 for slices longer than a kept
    /// row can be).
    pub fn keep_rows(&self) -> usize {
        self.keep_rows
    }

    /// Forgets the exponentials kept for `key` (a loss-only finish).
    pub fn drop_kept(&mut self, key: &Range<usize>) {
        if let Some(mut e) = self.take(key) {
            self.pool.append(&mut e);
        }
    }

    /// The kept exponentials of exactly `key`, if any (taken out of the kept set).
    fn take(&mut self, key: &Range<usize>) -> Option<Vec<RowExps>> {
        let i = self.kept.iter().position(|c| c.key == *key)?;
        Some(self.kept.swap_remove(i).exps)
    }

    /// Row buffers for `n` rows to keep, within the budget (`None`: not kept).
    fn alloc(&mut self, key: &Range<usize>, n: usize) -> Option<Vec<RowExps>> {
        self.drop_kept(key); // rows asked again replace their earlier copy
        let kept: usize = self.kept.iter().map(|c| c.key.len()).sum();
        if kept + n > self.keep_rows {
            return None;
        }
        let m = &self.m;
        Some((0..n).map(|_| self.pool.pop().unwrap_or_else(|| RowExps::new(self.len, m))).collect())
    }

    /// The slice's statistics of `rows` (`logits`: their `len` columns each) into `out`,
    /// keeping their exponentials when `keep` and the budget allows.
    pub fn stats<L: Logit>(&mut self, plan: &Plan, rows: &Rows<'_>, logits: &[L], out: &mut [RowStats], keep: bool) {
        let mut exps = if keep { self.alloc(&rows.key, rows.len()) } else { None };
        let this = &*self;
        crate::pool::install(|| this.stats_into(plan, rows, logits, out, exps.as_deref_mut()));
        if let Some(exps) = exps {
            self.kept.push(Kept { key: rows.key.clone(), exps });
        }
    }

    /// Writes the slice's gradient of `rows` from their merged statistics: from the kept
    /// exponentials, or re-reading the logits.
    pub fn grad<L: Logit, G: Logit>(
        &mut self,
        plan: &Plan,
        rows: &Rows<'_>,
        merged: &[RowStats],
        dest: Dest<'_, L, G>,
    ) {
        let mut kept = self.take(&rows.key);
        let this = &*self;
        crate::pool::install(|| this.write_from(plan, rows, merged, dest, kept.as_deref_mut()));
        self.pool.append(&mut kept.unwrap_or_default());
    }

    /// [`grad`](Self::grad) of `done` and [`stats`](Self::stats) of `next` in one parallel
    /// pass (the writes of one chunk beside the reads of the next, one fork-join instead of two).
    #[allow(clippy::too_many_arguments)]
    pub fn grad_and_stats<L: Logit, G: Logit>(
        &mut self,
        plan: &Plan,
        done: &Rows<'_>,
        merged: &[RowStats],
        dest: Dest<'_, L, G>,
        next: &Rows<'_>,
        next_logits: &[L],
        next_out: &mut [RowStats],
    ) {
        let mut kept = self.take(&done.key);
        let mut exps = self.alloc(&next.key, next.len());
        let this = &*self;
        crate::pool::install(|| {
            rayon::join(
                || this.write_from(plan, done, merged, dest, kept.as_deref_mut()),
                || this.stats_into(plan, next, next_logits, next_out, exps.as_deref_mut()),
            )
        });
        if let Some(exps) = exps {
            self.kept.push(Kept { key: next.key.clone(), exps });
        }
        self.pool.append(&mut kept.unwrap_or_default());
    }

    /// Whether this slice's exponentials can be kept (it is not too long).
    pub fn can_keep(&self) -> bool {
        self.len <= SCRATCH_MAX
    }

    /// Row buffers for the exponentials of `rows` rows, from the pool (`None`: this slice is
    /// too long to keep). A pipelined driver owns them and hands them to [`pass`](Self::pass).
    pub fn chunk_buffers(&mut self, rows: usize) -> Option<ChunkExps> {
        if !self.can_keep() {
            return None;
        }
        let m = &self.m;
        Some(ChunkExps((0..rows).map(|_| self.pool.pop().unwrap_or_else(|| RowExps::new(self.len, m))).collect()))
    }

    /// Takes row buffers back for reuse.
    pub fn recycle(&mut self, mut b: ChunkExps) {
        self.pool.append(&mut b.0);
    }

    /// One worker's part of a pipelined pass, on this thread: the gradient of `grad`'s rows
    /// from their kept exponentials and the statistics of `stats`' rows into theirs. Row `i` of
    /// each is paired: the gradient row is written chunk by chunk inside the statistics loop of
    /// its partner ([`PrevRow`]), as the single-device pass writes the previous row, so that the
    /// gradient's stores overlap the reads and the arithmetic of the statistics; the rows one
    /// part has beyond the other run alone. The same bits as either step alone.
    pub fn pass_rows<L: Logit, G: Logit>(
        &self,
        plan: &Plan,
        grad: Option<GradPart<'_, L, G>>,
        stats: Option<StatsPart<'_, L>>,
        sc: &mut WorkerScratch,
    ) {
        let (sc, len) = (&mut sc.0, self.len);
        let gn = grad.as_ref().map_or(0, |g| g.rows.len());
        let sn = stats.as_ref().map_or(0, |s| s.rows.len());
        let n = gn.min(sn);
        let mut g = grad.map(|g| {
            let (out, logits) = g.dest.into_parts();
            (Rows::range(g.rows), g.merged, out, logits, &mut g.exps.0[..gn])
        });
        let mut s = stats.map(|s| (Rows::range(s.rows), s.logits, s.out, &mut s.exps.0[..sn]));
        if let (Some((gr, gm, gout, gl, gx)), Some((sr, sl, so, sx))) = (g.as_mut(), s.as_mut()) {
            let gl = gl.map(|l| &l[..n * len]);
            let grad = (&*gr, &gm[..n], &mut gout[..n * len], gl, &mut gx[..n]);
            self.fused_rows(plan, grad, (&*sr, &sl[..n * len], &mut so[..n], &mut sx[..n]), sc);
        }
        if let Some((gr, gm, gout, gl, gx)) = g.as_mut().filter(|_| gn > n) {
            let gl = gl.map(|l| &l[n * len..]);
            self.grad_rows(plan, gr, n, &gm[n..], &mut gout[n * len..], gl, Some(&mut gx[n..]), sc);
        }
        if let Some((sr, sl, so, sx)) = s.as_mut().filter(|_| sn > n) {
            self.stats_rows(plan, sr, n, &sl[n * len..], &mut so[n..], Some(&mut sx[n..]), sc);
        }
    }

    /// A scratch for [`pass_rows`](Self::pass_rows) on one thread.
    pub fn scratch(&self) -> WorkerScratch {
        WorkerScratch(Scratch::new(&self.m))
    }

    /// Whether the gradient's stores stream (that depends on the whole gradient).
    fn streams<G: Logit>(&self) -> bool {
        self.rows * self.len * G::DTYPE.size() >= STREAM_MIN_BYTES
    }

    /// Rows `j0..` of `rows` (`out.len()` of them): their statistics into `out` and their
    /// exponentials into `exps` when given (one per row), from `src` (their logits).
    #[allow(clippy::too_many_arguments)]
    fn stats_rows<L: Logit>(
        &self,
        plan: &Plan,
        rows: &Rows<'_>,
        j0: usize,
        src: &[L],
        out: &mut [RowStats],
        mut exps: Option<&mut [RowExps]>,
        sc: &mut Scratch,
    ) {
        let (k, m, v0, len) = (&self.k, &self.m, self.v0, self.len);
        for (i, (o, row)) in out.iter_mut().zip(src.chunks_exact(len)).enumerate() {
            let Some(y) = target_of(plan, rows.sel.global(j0 + i)) else {
                *o = RowStats::EMPTY;
                continue;
            };
            let e = exps.as_deref_mut().map(|e| &mut e[i]);
            // the target, when it lies in this slice, is capped as this slice's loop caps it,
            // with the loop's chain factor, and summed apart; outside the slice both are 0 (the
            // merge adds them)
            let own = y.checked_sub(v0).filter(|&j| j < len);
            let mut st = stats_pass(k, m, row, &src[i * len..], own, e, sc, &mut ());
            if own.is_none() {
                (st.target_logit, st.target_chain) = (0.0, 0.0);
            }
            *o = st;
        }
    }

    /// The gradient of rows `j0..` of `rows` (`out.len() / len` of them; `merged[i]` the merged
    /// statistics of the `i`-th), from `exps` when given (one per row), else recomputing the
    /// exponentials from the logits (`logits`; `None`: they are `out` itself).
    #[allow(clippy::too_many_arguments)]
    fn grad_rows<L: Logit, G: Logit>(
        &self,
        plan: &Plan,
        rows: &Rows<'_>,
        j0: usize,
        merged: &[RowStats],
        out: &mut [G],
        logits: Option<&[L]>,
        mut exps: Option<&mut [RowExps]>,
        sc: &mut Scratch,
    ) {
        let (k, m, v0, len) = (&self.k, &self.m, self.v0, self.len);
        let stream = self.streams::<G>();
        // rows whose exponentials were not kept recompute them (an empty `RowExps` says so)
        let mut none = RowExps { exps: Vec::new(), chain: Vec::new(), shifts: Vec::new() };
        for (i, o) in out.chunks_exact_mut(len).enumerate() {
            let r = rows.sel.global(j0 + i);
            let Some(y) = target_of(plan, r) else {
                zero(k, o, stream);
                continue;
            };
            let target = y.checked_sub(v0).filter(|&j| j < len).unwrap_or(usize::MAX);
            let p = Pending::new(m, o, merged[i], target, plan.row_coef(r));
            let e = match exps.as_deref_mut() {
                Some(e) => &mut e[i],
                None => &mut none,
            };
            p.write(k, m, e, logits.map(|l| &l[i * len..(i + 1) * len]), sc, stream);
        }
        // the streaming stores of these rows, on the thread that made them
        k.fence();
    }

    /// Two parts as many rows long, paired one to one: the `i`-th gradient row of
    /// `g` (rows, merged statistics, gradient, its logits or `None` in place, kept
    /// exponentials) written chunk by chunk inside the statistics loop of the `i`-th row of `s`
    /// (rows, logits, statistics out, exponentials kept).
    #[allow(clippy::type_complexity)]
    fn fused_rows<L: Logit, G: Logit>(
        &self,
        plan: &Plan,
        (g_rows, merged, out, logits, ge): (&Rows<'_>, &[RowStats], &mut [G], Option<&[L]>, &mut [RowExps]),
        (s_rows, src, so, se): (&Rows<'_>, &[L], &mut [RowStats], &mut [RowExps]),
        sc: &mut Scratch,
    ) {
        let (k, m, v0, len) = (&self.k, &self.m, self.v0, self.len);
        let stream = self.streams::<G>();
        let rows = so.iter_mut().zip(src.chunks_exact(len)).zip(se).zip(ge).zip(out.chunks_exact_mut(len));
        for (i, ((((o, row), se), ge), gout)) in rows.enumerate() {
            let rg = g_rows.sel.global(i);
            let mut pending = match target_of(plan, rg) {
                Some(y) => {
                    let target = y.checked_sub(v0).filter(|&t| t < len).unwrap_or(usize::MAX);
                    Some(Pending::new(m, gout, merged[i], target, plan.row_coef(rg)))
                }
                None => {
                    zero(k, gout, stream);
                    None
                }
            };
            let Some(y) = target_of(plan, s_rows.sel.global(i)) else {
                *o = RowStats::EMPTY;
                if let Some(p) = pending {
                    p.write(k, m, ge, logits.map(|l| &l[i * len..(i + 1) * len]), sc, stream);
                }
                continue;
            };
            let own = y.checked_sub(v0).filter(|&t| t < len);
            let mut inter = PrevRow { k, m, p: &mut pending, e: ge, stream, fused: None };
            let mut st = stats_pass(k, m, row, &src[i * len..], own, Some(se), sc, &mut inter);
            if own.is_none() {
                (st.target_logit, st.target_chain) = (0.0, 0.0);
            }
            *o = st;
        }
        k.fence();
    }

    /// The statistics pass over `rows`, exponentials into `exps` when given (one per row), on
    /// the pool.
    fn stats_into<L: Logit>(
        &self,
        plan: &Plan,
        rows: &Rows<'_>,
        logits: &[L],
        out: &mut [RowStats],
        exps: Option<&mut [RowExps]>,
    ) {
        let (m, len) = (&self.m, self.len);
        let rpt = rows_per_task(rows.len(), len);
        let mut parts = task_parts(exps, rows.len(), rpt);
        let tasks = out.par_chunks_mut(rpt).zip(logits.par_chunks(rpt * len)).zip(parts.par_iter_mut()).enumerate();
        tasks.for_each_init(
            || Scratch::new(m),
            |s, (task, ((out, src), ex))| self.stats_rows(plan, rows, task * rpt, src, out, ex.as_deref_mut(), s),
        );
    }

    /// The gradient pass over `rows`, from `exps` when given (one per row), else recomputing
    /// the exponentials from the logits, on the pool.
    fn write_from<L: Logit, G: Logit>(
        &self,
        plan: &Plan,
        rows: &Rows<'_>,
        merged: &[RowStats],
        dest: Dest<'_, L, G>,
        exps: Option<&mut [RowExps]>,
    ) {
        let (m, len) = (&self.m, self.len);
        let rpt = rows_per_task(rows.len(), len);
        let mut parts = task_parts(exps, rows.len(), rpt);
        let (out, logits) = dest.into_parts();
        let logits: Vec<Option<&[L]>> = match logits {
            Some(l) => l.chunks(rpt * len).map(Some).collect(),
            None => (0..rows.len().div_ceil(rpt)).map(|_| None).collect(),
        };
        let tasks = out.par_chunks_mut(rpt * len).zip(logits).zip(parts.par_iter_mut()).enumerate();
        tasks.for_each_init(
            || Scratch::new(m),
            |s, (task, ((out, src), ex))| {
                let j0 = task * rpt;
                self.grad_rows(plan, rows, j0, &merged[j0..], out, src, ex.as_deref_mut(), s)
            },
        );
    }
}

impl Drop for SplitCpu {
    /// Hands the row buffers on to the next call (within [`SPARE_MAX_BYTES`]).
    fn drop(&mut self) {
        let mut pool = std::mem::take(&mut self.pool);
        pool.extend(self.kept.drain(..).flat_map(|c| c.exps));
        let bytes: usize = pool.iter().map(row_bytes).sum();
        if !pool.is_empty() && bytes <= SPARE_MAX_BYTES {
            if let Ok(mut s) = SPARE.lock() {
                *s = pool;
            }
        }
    }
}

/// The kept exponentials of a chunk of rows, owned by a pipelined driver (one row buffer per
/// row; a shorter chunk uses the first ones).
pub(crate) struct ChunkExps(Vec<RowExps>);

/// The gradient half of a [`SplitCpu::pass_rows`]: rows (consecutive), their merged statistics,
/// where the gradient goes and their kept exponentials (the first rows of the buffers).
pub(crate) struct GradPart<'a, L, G> {
    pub rows: Range<usize>,
    pub merged: &'a [RowStats],
    pub dest: Dest<'a, L, G>,
    pub exps: &'a mut ChunkExps,
}

/// The statistics half of a [`SplitCpu::pass_rows`]: rows (consecutive), their logits, the
/// statistics out and the buffers that keep their exponentials (the first rows of them).
pub(crate) struct StatsPart<'a, L> {
    pub rows: Range<usize>,
    pub logits: &'a [L],
    pub out: &'a mut [RowStats],
    pub exps: &'a mut ChunkExps,
}

/// A [`SplitCpu::pass_rows`] worker's scratch.
pub(crate) struct WorkerScratch(Scratch);

/// Each task's part of the row buffers (`None` for every task when nothing is kept).
fn task_parts(exps: Option<&mut [RowExps]>, n: usize, rpt: usize) -> Vec<Option<&mut [RowExps]>> {
    match exps {
        Some(e) => e.chunks_mut(rpt).map(Some).collect(),
        None => (0..n.div_ceil(rpt)).map(|_| None).collect(),
    }
}

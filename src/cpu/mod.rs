//! The fused CPU backend.
//!
//! Per row, in chunks of [`CHUNK`] elements:
//!
//! 1. **statistics pass** — each chunk is read once from memory, and in the same loop
//!    `e = exp(z - r)` is computed against the row's running reference `r` (its maximum so
//!    far), summed into `sum_exp` and kept in a scratch row of the task, and the chunk's maximum
//!    is taken. Only when that maximum exceeds `r` by more than [`MARGIN`] (and for the first
//!    finite chunk) does `r` move up, `sum_exp` get rescaled and the chunk get recomputed; with
//!    real logits that is the first chunk of a row and almost never another;
//! 2. **gradient pass** — from the scratch row (in L2): `grad = e * coef / sum_exp * exp(r_c - r)`,
//!    one multiply per element, stored with streaming stores so the gradient's cache lines are
//!    never read; the target entry is written last as `coef * (softmax - 1)`.
//!
//! Each logit is read from memory once, each gradient element written once, and `exp` is
//! evaluated once per element. Consecutive rows of a thread are software-pipelined: the
//! gradient of row `r-1` is written chunk by chunk between the chunks of row `r`'s statistics
//! pass, so reads, writes and arithmetic overlap. Rows longer than [`SCRATCH_MAX`] (beyond any
//! real vocabulary) skip the scratch row and recompute `exp` in the gradient pass instead.
//!
//! Rows run in parallel on the rayon pool; every row is computed by the same sequential routine
//! whatever thread runs it, and per-sample sums are taken afterwards in a fixed order, so results
//! do not depend on the number of threads.

pub(crate) mod gemm;
pub(crate) mod simd;

use crate::dtype::{DType, Logit};
use crate::spec::{Plan, NO_TARGET};
use rayon::prelude::*;
use simd::{Ahead, Kernels};

/// Elements of a row handled per step.
pub(crate) const CHUNK: usize = 2048;

/// Longest row (elements) whose exponentials are kept in a scratch row (16 MiB of f32).
pub(crate) const SCRATCH_MAX: usize = 1 << 22;

/// How far a chunk's maximum may exceed the row's reference before the reference moves: the
/// kept exponentials stay below `e^20` (sums of a row stay far from f32 overflow).
const MARGIN: f32 = 20.0;

/// Gradients at least this large (bytes) are written with streaming stores: they cannot stay in
/// cache anyway, and streaming skips reading the destination lines first.
const STREAM_MIN_BYTES: usize = 32 << 20;

/// The statistics of one logits row (or of a slice of it), from which loss and gradient follow:
/// with any reference `r`, `sum_exp = sum(exp(z - r))`,
/// `loss = (r - target_logit) + ln(sum_exp)`,
/// `grad_j = coef * (exp(z_j - r) / sum_exp - [j == target])`.
///
/// Statistics of disjoint slices of a row combine with [`RowStats::merge`]; a slice that does
/// not hold the target contributes `target_logit = 0`, so merging adds the target logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowStats {
    /// The reference `r`: within [`MARGIN`] of the maximum logit (NaN skipped), `-inf` while
    /// every logit seen is `-inf`.
    pub shift: f32,
    /// `sum(exp(z - shift))` (NaN when a logit is NaN or `+inf`). Chunks are summed in f32
    /// lanes and the chunk sums in f64, so even a 2^29-wide row keeps f32 accuracy.
    pub sum_exp: f64,
    /// The target's logit (0 when the target lies outside the slice).
    pub target_logit: f32,
}

/// `s * exp(from - to)` for `to >= from`, with `0 * exp(-inf - -inf)` kept at 0.
#[inline]
fn rescale(s: f64, from: f32, to: f32) -> f64 {
    if s == 0.0 {
        0.0
    } else {
        s * (from as f64 - to as f64).exp()
    }
}

impl RowStats {
    /// Statistics of an empty slice.
    pub const EMPTY: RowStats = RowStats { shift: f32::NEG_INFINITY, sum_exp: 0.0, target_logit: 0.0 };

    /// Moves the reference up to `m`, rescaling the sum.
    #[inline]
    fn raise(&mut self, m: f32) {
        if m > self.shift {
            self.sum_exp = rescale(self.sum_exp, self.shift, m);
            self.shift = m;
        }
    }

    /// What a chunk's exponentials are taken against: the reference, or 0 while every value so
    /// far is `-inf` (then `-inf` adds 0 and NaN adds NaN).
    #[inline]
    fn exp_shift(&self) -> f32 {
        if self.shift == f32::NEG_INFINITY {
            0.0
        } else {
            self.shift
        }
    }

    /// Combines the statistics of two disjoint slices of one row.
    #[allow(dead_code)] // the vocabulary-parallel mode's combine step; exercised by unit tests
    pub fn merge(self, other: RowStats) -> RowStats {
        let shift = if other.shift > self.shift { other.shift } else { self.shift };
        RowStats {
            shift,
            sum_exp: rescale(self.sum_exp, self.shift, shift) + rescale(other.sum_exp, other.shift, shift),
            target_logit: self.target_logit + other.target_logit,
        }
    }

    /// The row's cross-entropy, `logsumexp(z) - z[target]`.
    #[inline]
    pub fn loss(&self) -> f32 {
        ((self.shift as f64 - self.target_logit as f64) + self.sum_exp.ln()) as f32
    }

    /// The gradient at the target, `coef * (softmax[target] - 1)`.
    #[inline]
    fn target_grad(&self, coef: f32) -> f32 {
        (coef as f64 * ((self.target_logit as f64 - self.shift as f64).exp() / self.sum_exp - 1.0)) as f32
    }

    /// The factor that turns `exp(z - r_c)` into the gradient: `coef / sum_exp * exp(r_c - r)`.
    /// A chunk whose `r_c` is `-inf` (all `-inf` or NaN) gets 0, or NaN for an all `-inf` row.
    #[inline]
    fn grad_factor(&self, coef: f32, chunk_shift: f32) -> f32 {
        (coef as f64 / self.sum_exp * (chunk_shift as f64 - self.shift as f64).exp()) as f32
    }
}

/// The exponentials of one row, kept between its two passes.
struct RowExps {
    /// `exp(z - shift_c)` (empty when rows are too long to keep).
    exps: Vec<f32>,
    /// The running maximum each chunk's exponentials are taken against.
    shifts: Vec<f32>,
}

impl RowExps {
    fn new(vocab: usize) -> RowExps {
        let keep = vocab <= SCRATCH_MAX;
        RowExps {
            exps: vec![0.0; if keep { vocab } else { 0 }],
            shifts: vec![0.0; if keep { vocab.div_ceil(CHUNK) } else { 0 }],
        }
    }

    fn kept(&self) -> bool {
        !self.exps.is_empty()
    }
}

/// Per-task buffers, allocated once per task (never per row).
struct Scratch {
    /// Widened input chunk.
    buf: Vec<f32>,
    /// Exponentials nobody keeps (loss only, or rows too long to keep).
    tmp: Vec<f32>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch { buf: vec![0.0; CHUNK], tmp: vec![0.0; CHUNK] }
    }
}

/// The chunk as f32: itself, or widened into `buf`.
#[inline]
pub(crate) fn load<'a, L: Logit>(k: &Kernels, src: &'a [L], buf: &'a mut [f32]) -> &'a [f32] {
    match (L::as_f32(src), L::as_bits(src)) {
        (Some(x), _) => x,
        (None, Some(bits)) => {
            let buf = &mut buf[..src.len()];
            match L::DTYPE {
                DType::BF16 => k.widen_bf16(bits, buf),
                _ => k.widen_f16(bits, buf),
            }
            buf
        }
        (None, None) => unreachable!("every Logit is f32 or 16-bit"),
    }
}

/// `out = x * f` in the output's dtype (equal lengths), streaming when asked.
#[inline]
pub(crate) fn store_scaled<G: Logit>(k: &Kernels, x: &[f32], f: f32, out: &mut [G], stream: bool) {
    if let Some(o) = G::as_f32_mut(out) {
        return k.scale_f32(x, f, o, stream);
    }
    if let Some(bits) = G::as_bits_mut(out) {
        match G::DTYPE {
            DType::BF16 => k.scale_bf16(x, f, bits, stream),
            _ => k.scale_f16(x, f, bits, stream),
        }
    }
}

/// `out = exp(chunk - shift)`, returning the sum and the chunk's maximum. 16-bit input is widened
/// inside the loop and gets the short polynomial, matched to its precision.
#[inline]
fn exp_chunk<L: Logit>(
    k: &Kernels,
    chunk: &[L],
    shift: f32,
    out: &mut [f32],
    pf: Ahead,
    buf: &mut [f32],
) -> (f32, f32) {
    match L::as_bits(chunk) {
        Some(bits) => k.exp_sum_max_bits(L::DTYPE == DType::BF16, bits, shift, out, pf),
        None => k.exp_sum_max(load(k, chunk, buf), shift, out, pf),
    }
}

/// Chunks to prefetch (into L2) ahead of the one being read.
const PREFETCH_CHUNKS: usize = 4;

/// Statistics pass over one row. Keeps the exponentials in `keep` when given (and long enough);
/// calls `after(c)` after chunk `c`, which is where the previous row's gradient is interleaved.
/// `ahead` is the task's input from this row on, for prefetching.
fn stats_pass<L: Logit>(
    k: &Kernels,
    row: &[L],
    ahead: &[L],
    target: usize,
    mut keep: Option<&mut RowExps>,
    s: &mut Scratch,
    mut after: impl FnMut(usize),
) -> RowStats {
    let mut st = RowStats::EMPTY;
    for (c, chunk) in row.chunks(CHUNK).enumerate() {
        let p = (c + PREFETCH_CHUNKS) * CHUNK;
        let pf = if p < ahead.len() { Ahead::of(&ahead[p..(p + CHUNK).min(ahead.len())]) } else { Ahead::NONE };
        let out = match keep.as_deref_mut().filter(|e| e.kept()) {
            Some(e) => &mut e.exps[c * CHUNK..],
            None => &mut s.tmp[..],
        };
        if st.shift == f32::NEG_INFINITY {
            // no finite reference yet: take this chunk's maximum first
            st.raise(k.max(load(k, chunk, &mut s.buf)));
        }
        let (mut sum, top) = exp_chunk(k, chunk, st.exp_shift(), &mut *out, pf, &mut s.buf);
        if top > st.shift + MARGIN {
            // a much larger maximum (or +inf): move the reference and redo the chunk
            st.raise(top);
            sum = exp_chunk(k, chunk, st.exp_shift(), &mut *out, Ahead::NONE, &mut s.buf).0;
        }
        st.sum_exp += sum as f64;
        if let Some(e) = keep.as_deref_mut().filter(|e| e.kept()) {
            e.shifts[c] = st.shift;
        }
        after(c);
    }
    st.target_logit = row[target].to_f32();
    st
}

/// A row whose statistics are known and whose gradient is still to be written.
struct Pending<'a, G> {
    out: &'a mut [G],
    st: RowStats,
    target: usize,
    coef: f32,
}

impl<G: Logit> Pending<'_, G> {
    /// Writes chunk `c` of the gradient from the row's kept exponentials.
    fn write_chunk(&mut self, k: &Kernels, e: &RowExps, c: usize, stream: bool) {
        let lo = c * CHUNK;
        let hi = (lo + CHUNK).min(self.out.len());
        let f = self.st.grad_factor(self.coef, e.shifts[c]);
        let has_target = (lo..hi).contains(&self.target);
        // the target's chunk goes through the cache: its entry is rewritten just after
        store_scaled(k, &e.exps[lo..hi], f, &mut self.out[lo..hi], stream && !has_target);
        if has_target {
            self.out[self.target] = G::from_f32(self.st.target_grad(self.coef));
        }
    }

    /// Writes the whole gradient: from `e` when it was kept, else by re-reading the logits
    /// (`row`; `None` when the logits are `out` itself) and recomputing the exponentials.
    fn write<L: Logit>(mut self, k: &Kernels, e: &RowExps, row: Option<&[L]>, s: &mut Scratch, stream: bool) {
        if e.kept() {
            for c in 0..self.out.len().div_ceil(CHUNK) {
                self.write_chunk(k, e, c, stream);
            }
            return;
        }
        let scale = self.st.grad_factor(self.coef, self.st.shift);
        for (c, o) in self.out.chunks_mut(CHUNK).enumerate() {
            let n = o.len();
            // the same exponentials as the statistics pass took (in place, `out` is the logits)
            match row {
                Some(row) => exp_chunk(
                    k,
                    &row[c * CHUNK..c * CHUNK + n],
                    self.st.exp_shift(),
                    &mut s.tmp,
                    Ahead::NONE,
                    &mut s.buf,
                ),
                None => exp_chunk(k, o, self.st.exp_shift(), &mut s.tmp, Ahead::NONE, &mut s.buf),
            };
            store_scaled(k, &s.tmp[..n], scale, o, false);
        }
        self.out[self.target] = G::from_f32(self.st.target_grad(self.coef));
    }
}

/// Zeros a row's gradient (positions without a target).
fn zero<G: Logit>(k: &Kernels, out: &mut [G], stream: bool) {
    static ZEROS: [f32; CHUNK] = [0.0; CHUNK];
    for o in out.chunks_mut(CHUNK) {
        store_scaled(k, &ZEROS[..o.len()], 0.0, o, stream);
    }
}

/// Rows per parallel task: enough tasks to balance the threads, each at least ~256 KiB of logits.
fn rows_per_task(rows: usize, vocab: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 8;
    let min_rows = (65_536 / vocab.max(1)).max(1);
    rows.div_ceil(tasks).max(min_rows).min(rows).max(1)
}

/// A row's target, if it has one.
#[inline]
fn target_of(plan: &Plan, r: usize) -> Option<usize> {
    match plan.targets[r] {
        NO_TARGET => None,
        y => Some(y as usize),
    }
}

/// One task of [`run`] with a gradient: rows `r0..` of `src` into `dst`.
///
/// Software-pipelined over rows: while row `r`'s statistics pass reads its logits chunk by
/// chunk, row `r-1`'s gradient is written chunk by chunk from its kept exponentials, so reads,
/// writes and `exp` overlap instead of alternating. Two scratch rows take turns.
fn grad_task<L: Logit, G: Logit>(
    k: &Kernels,
    plan: &Plan,
    r0: usize,
    src: &[L],
    dst: &mut [G],
    losses: &mut [f32],
    stream: bool,
) {
    let (v, t) = (plan.shape.vocab(), plan.shape.seq());
    let (mut cur, mut prev) = (RowExps::new(v), RowExps::new(v));
    let mut s = Scratch::new();
    let mut pending: Option<Pending<'_, G>> = None;
    let mut pending_row: &[L] = &[];
    for (i, ((row, out), l)) in src.chunks_exact(v).zip(dst.chunks_exact_mut(v)).zip(losses).enumerate() {
        let r = r0 + i;
        let Some(y) = target_of(plan, r) else {
            if let Some(p) = pending.take() {
                p.write(k, &prev, Some(pending_row), &mut s, stream);
            }
            zero(k, out, stream);
            continue;
        };
        let st = if cur.kept() {
            let (p, e) = (&mut pending, &prev);
            stats_pass(k, row, &src[i * v..], y, Some(&mut cur), &mut s, |c| {
                if let Some(p) = p.as_mut() {
                    p.write_chunk(k, e, c, stream);
                }
            })
        } else {
            if let Some(p) = pending.take() {
                p.write(k, &prev, Some(pending_row), &mut s, stream);
            }
            stats_pass(k, row, &src[i * v..], y, None, &mut s, |_| {})
        };
        *l = st.loss();
        pending = Some(Pending { out, st, target: y, coef: plan.coef[r / t] });
        pending_row = row;
        std::mem::swap(&mut cur, &mut prev);
    }
    if let Some(p) = pending.take() {
        p.write(k, &prev, Some(pending_row), &mut s, stream);
    }
    k.fence();
}

/// Loss of every row (0 for rows without a target) and, when `grad` is given, the gradient.
pub(crate) fn run<L: Logit, G: Logit>(k: &Kernels, plan: &Plan, logits: &[L], grad: Option<&mut [G]>) -> Vec<f32> {
    let (rows, v) = (plan.shape.rows(), plan.shape.vocab());
    let rpt = rows_per_task(rows, v);
    let stream = plan.shape.logits_len() * G::DTYPE.size() >= STREAM_MIN_BYTES;
    let mut row_loss = vec![0f32; rows];
    let losses = row_loss.par_chunks_mut(rpt).zip(logits.par_chunks(rpt * v)).enumerate();
    match grad {
        Some(grad) => losses
            .zip(grad.par_chunks_mut(rpt * v))
            .for_each(|((task, (ls, src)), dst)| grad_task(k, plan, task * rpt, src, dst, ls, stream)),
        None => losses.for_each(|(task, (ls, src))| {
            let mut s = Scratch::new();
            for (i, (l, row)) in ls.iter_mut().zip(src.chunks_exact(v)).enumerate() {
                if let Some(y) = target_of(plan, task * rpt + i) {
                    *l = stats_pass(k, row, &src[i * v..], y, None, &mut s, |_| {}).loss();
                }
            }
        }),
    }
    row_loss
}

/// Loss of every row, with the gradient written over the logits.
pub(crate) fn run_in_place<L: Logit>(k: &Kernels, plan: &Plan, logits: &mut [L]) -> Vec<f32> {
    let mut row_loss = vec![0f32; plan.shape.rows()];
    run_rows_in_place(k, plan, RowSel::From(0), logits, &mut row_loss);
    row_loss
}

/// Which rows of the plan a rows pass covers: buffer row `i` is plan row `global(i)`, whose
/// target, coefficient and any other per-row input are used.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowSel<'a> {
    /// Consecutive rows from this one on.
    From(usize),
    /// These rows, one per buffer row (the fused linear path's chunks of rows with a target).
    List(&'a [u32]),
}

impl RowSel<'_> {
    #[inline]
    fn global(&self, i: usize) -> usize {
        match self {
            RowSel::From(first) => first + i,
            RowSel::List(rows) => rows[i] as usize,
        }
    }
}

/// [`run_in_place`] over some rows of the plan: `logits` holds `row_loss.len()` rows, buffer row
/// `i` being plan row `sel.global(i)`; its loss goes to `row_loss[i]`.
pub(crate) fn run_rows_in_place<L: Logit>(
    k: &Kernels,
    plan: &Plan,
    sel: RowSel<'_>,
    logits: &mut [L],
    row_loss: &mut [f32],
) {
    let (rows, v, t) = (row_loss.len(), plan.shape.vocab(), plan.shape.seq());
    let rpt = rows_per_task(rows, v);
    row_loss.par_chunks_mut(rpt).zip(logits.par_chunks_mut(rpt * v)).enumerate().for_each(|(task, (ls, rows))| {
        let mut e = RowExps::new(v);
        let mut s = Scratch::new();
        for (i, (l, row)) in ls.iter_mut().zip(rows.chunks_exact_mut(v)).enumerate() {
            let r = sel.global(task * rpt + i);
            match target_of(plan, r) {
                Some(y) => {
                    let st = stats_pass(k, row, row, y, Some(&mut e), &mut s, |_| {});
                    *l = st.loss();
                    // the row was just read, its lines are in cache: no streaming
                    let p = Pending { out: row, st, target: y, coef: plan.coef[r / t] };
                    p.write::<L>(k, &e, None, &mut s, false);
                }
                None => row.fill(L::default()),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::CpuSimd;

    fn stats_of(k: &Kernels, row: &[f32], target: usize) -> RowStats {
        stats_pass(k, row, row, target, None, &mut Scratch::new(), |_| {})
    }

    #[test]
    fn merged_slices_equal_whole_row() {
        let k = Kernels::select(CpuSimd::Auto).unwrap();
        let row: Vec<f32> = (0..10_000).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
        let whole = stats_of(&k, &row, 6_000);
        // vocabulary split in two shards; the target lives in the second one
        let (a, b) = row.split_at(4_000);
        let mut sa = stats_of(&k, a, 0);
        sa.target_logit = 0.0;
        let sb = stats_of(&k, b, 2_000);
        let merged = sa.merge(sb);
        assert_eq!(merged.target_logit, whole.target_logit);
        let (ma, mw) = (merged.sum_exp * (merged.shift as f64).exp(), whole.sum_exp * (whole.shift as f64).exp());
        assert!((ma - mw).abs() <= 1e-6 * mw);
        assert!((merged.loss() - whole.loss()).abs() <= 1e-6);
        assert_eq!(RowStats::EMPTY.merge(whole), whole);
    }
}

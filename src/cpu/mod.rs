//! The fused CPU backend: per row, one streaming pass for the statistics and one pass (from
//! cache) that writes the gradient; rows in parallel on the rayon pool.
//!
//! Results do not depend on the number of threads: every row is computed by the same
//! sequential routine whatever thread runs it, and per-sample sums are taken afterwards on the
//! calling thread in a fixed order.

pub(crate) mod simd;

use crate::dtype::Logit;
use crate::spec::{Plan, NO_TARGET};
use rayon::prelude::*;
use simd::Kernels;

/// Elements of a row handled per step (widened into an on-stack buffer for f16/bf16).
pub(crate) const CHUNK: usize = 2048;

/// The statistics of one logits row (or of a slice of it), from which loss and gradient follow:
/// `loss = (max - target_logit) + ln(sum_exp)`,
/// `grad_j = coef * (exp(z_j - max) / sum_exp - [j == target])`.
///
/// Statistics of disjoint slices of a row combine with [`RowStats::merge`]; a slice that does
/// not hold the target contributes `target_logit = 0`, so merging adds the target logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowStats {
    /// Maximum logit (NaN entries skipped; they reach `sum_exp` instead).
    pub max: f32,
    /// `sum(exp(z - max))` (NaN when a logit is NaN or `+inf`). Chunks are summed in f32
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
    pub const EMPTY: RowStats = RowStats { max: f32::NEG_INFINITY, sum_exp: 0.0, target_logit: 0.0 };

    /// Folds one chunk of widened logits in (online softmax, one rescale per chunk at most).
    #[inline]
    fn push(&mut self, x: &[f32], k: &Kernels) {
        let cm = (k.max)(x);
        if cm > self.max {
            self.sum_exp = rescale(self.sum_exp, self.max, cm);
            self.max = cm;
        }
        // While every value so far is -inf, sum relative to 0: -inf adds 0, NaN adds NaN.
        let shift = if self.max == f32::NEG_INFINITY { 0.0 } else { self.max };
        self.sum_exp += (k.sum_exp)(x, shift) as f64;
    }

    /// Combines the statistics of two disjoint slices of one row.
    #[allow(dead_code)] // the vocabulary-parallel mode's combine step; exercised by unit tests
    pub fn merge(self, other: RowStats) -> RowStats {
        let max = if other.max > self.max { other.max } else { self.max };
        RowStats {
            max,
            sum_exp: rescale(self.sum_exp, self.max, max) + rescale(other.sum_exp, other.max, max),
            target_logit: self.target_logit + other.target_logit,
        }
    }

    /// The row's cross-entropy, `logsumexp(z) - z[target]`.
    #[inline]
    pub fn loss(&self) -> f32 {
        ((self.max as f64 - self.target_logit as f64) + self.sum_exp.ln()) as f32
    }

    /// The gradient at the target, `coef * (softmax[target] - 1)`.
    #[inline]
    fn target_grad(&self, coef: f32) -> f32 {
        (coef as f64 * ((self.target_logit as f64 - self.max as f64).exp() / self.sum_exp - 1.0)) as f32
    }

    /// The factor that turns `exp(z - max)` into the gradient: `coef / sum_exp`.
    #[inline]
    fn grad_scale(&self, coef: f32) -> f32 {
        (coef as f64 / self.sum_exp) as f32
    }
}

/// Widens `src` into `buf` unless it already is `f32`.
#[inline]
fn widened<'a, L: Logit>(src: &'a [L], buf: &'a mut [f32]) -> &'a [f32] {
    match L::as_f32(src) {
        Some(x) => x,
        None => {
            let buf = &mut buf[..src.len()];
            L::widen(src, buf);
            buf
        }
    }
}

/// Statistics of one row; `target` indexes into `row`.
pub(crate) fn row_stats<L: Logit>(row: &[L], target: Option<usize>, k: &Kernels, buf: &mut [f32; CHUNK]) -> RowStats {
    let mut st = RowStats::EMPTY;
    for chunk in row.chunks(CHUNK) {
        st.push(widened(chunk, buf), k);
    }
    if let Some(y) = target {
        st.target_logit = row[y].to_f32();
    }
    st
}

/// Writes the gradient of one row into `out` (same length), given its statistics.
pub(crate) fn row_grad<L: Logit, G: Logit>(
    row: &[L],
    st: &RowStats,
    target: usize,
    coef: f32,
    out: &mut [G],
    k: &Kernels,
    buf: &mut [f32; CHUNK],
) {
    let scale = st.grad_scale(coef);
    for (src, dst) in row.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
        let n = src.len();
        match (L::as_f32(src), G::as_f32_mut(dst)) {
            (Some(x), Some(o)) => (k.exp_scale)(x, st.max, scale, o),
            (Some(x), None) => {
                (k.exp_scale)(x, st.max, scale, &mut buf[..n]);
                G::narrow(&buf[..n], dst);
            }
            (None, Some(o)) => {
                L::widen(src, o);
                (k.exp_scale_in_place)(o, st.max, scale);
            }
            (None, None) => {
                L::widen(src, &mut buf[..n]);
                (k.exp_scale_in_place)(&mut buf[..n], st.max, scale);
                G::narrow(&buf[..n], dst);
            }
        }
    }
    out[target] = G::from_f32(st.target_grad(coef));
}

/// Overwrites one row of logits with its gradient, given its statistics.
pub(crate) fn row_grad_in_place<L: Logit>(
    row: &mut [L],
    st: &RowStats,
    target: usize,
    coef: f32,
    k: &Kernels,
    buf: &mut [f32; CHUNK],
) {
    let scale = st.grad_scale(coef);
    for chunk in row.chunks_mut(CHUNK) {
        let n = chunk.len();
        match L::as_f32_mut(chunk) {
            Some(x) => (k.exp_scale_in_place)(x, st.max, scale),
            None => {
                L::widen(chunk, &mut buf[..n]);
                (k.exp_scale_in_place)(&mut buf[..n], st.max, scale);
                L::narrow(&buf[..n], chunk);
            }
        }
    }
    row[target] = L::from_f32(st.target_grad(coef));
}

/// Rows per parallel task: enough tasks to balance the threads, each at least ~256 KiB of logits.
fn rows_per_task(rows: usize, vocab: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 8;
    let min_rows = (65_536 / vocab.max(1)).max(1);
    rows.div_ceil(tasks).max(min_rows).min(rows).max(1)
}

/// Where a row's target is, if it has one.
#[inline]
fn target_of(plan: &Plan, r: usize) -> Option<usize> {
    match plan.targets[r] {
        NO_TARGET => None,
        y => Some(y as usize),
    }
}

/// Loss of every row (0 for rows without a target) and, when `grad` is given, the gradient.
pub(crate) fn run<L: Logit, G: Logit>(plan: &Plan, logits: &[L], grad: Option<&mut [G]>) -> Vec<f32> {
    let k = Kernels::detect();
    let (rows, v, t) = (plan.shape.rows(), plan.shape.vocab(), plan.shape.seq());
    let rpt = rows_per_task(rows, v);
    let mut row_loss = vec![0f32; rows];
    let losses = row_loss.par_chunks_mut(rpt).zip(logits.par_chunks(rpt * v)).enumerate();
    match grad {
        Some(grad) => losses.zip(grad.par_chunks_mut(rpt * v)).for_each(|((task, (ls, src)), dst)| {
            let mut buf = [0f32; CHUNK];
            let rows = src.chunks_exact(v).zip(dst.chunks_exact_mut(v));
            for (i, (l, (row, out))) in ls.iter_mut().zip(rows).enumerate() {
                let r = task * rpt + i;
                match target_of(plan, r) {
                    Some(y) => {
                        let st = row_stats(row, Some(y), &k, &mut buf);
                        *l = st.loss();
                        row_grad(row, &st, y, plan.coef[r / t], out, &k, &mut buf);
                    }
                    None => out.fill(G::default()),
                }
            }
        }),
        None => losses.for_each(|(task, (ls, src))| {
            let mut buf = [0f32; CHUNK];
            for (i, (l, row)) in ls.iter_mut().zip(src.chunks_exact(v)).enumerate() {
                if let Some(y) = target_of(plan, task * rpt + i) {
                    *l = row_stats(row, Some(y), &k, &mut buf).loss();
                }
            }
        }),
    }
    row_loss
}

/// Loss of every row, with the gradient written over the logits.
pub(crate) fn run_in_place<L: Logit>(plan: &Plan, logits: &mut [L]) -> Vec<f32> {
    let k = Kernels::detect();
    let (rows, v, t) = (plan.shape.rows(), plan.shape.vocab(), plan.shape.seq());
    let rpt = rows_per_task(rows, v);
    let mut row_loss = vec![0f32; rows];
    row_loss.par_chunks_mut(rpt).zip(logits.par_chunks_mut(rpt * v)).enumerate().for_each(|(task, (ls, rows))| {
        let mut buf = [0f32; CHUNK];
        for (i, (l, row)) in ls.iter_mut().zip(rows.chunks_exact_mut(v)).enumerate() {
            let r = task * rpt + i;
            match target_of(plan, r) {
                Some(y) => {
                    let st = row_stats(row, Some(y), &k, &mut buf);
                    *l = st.loss();
                    row_grad_in_place(row, &st, y, plan.coef[r / t], &k, &mut buf);
                }
                None => row.fill(L::default()),
            }
        }
    });
    row_loss
}

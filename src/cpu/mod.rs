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
//! The options (label smoothing, soft-capping, z-loss, token weights; [`row::RowMath`]) ride on
//! the same two passes: soft-capping and smoothing switch the statistics loop to one that also
//! computes `tanh` and the sum of the logits (and keeps `exp · (1 − tanh²)` in the scratch row),
//! smoothing adds one fused multiply-add per element to the gradient pass, and z-loss and token
//! weights only change per-row factors. With every option off the plain loops run.
//!
//! Rows run in parallel on the rayon pool; every row is computed by the same sequential routine
//! whatever thread runs it, and per-sample sums are taken afterwards in a fixed order, so results
//! do not depend on the number of threads.

pub(crate) mod gemm;
mod row;
pub(crate) mod simd;
pub(crate) mod split;

use crate::dtype::{DType, Logit};
use crate::spec::{Plan, RowLosses, NO_TARGET};
use rayon::prelude::*;
use row::RowMath;
pub(crate) use row::RowStats;
use simd::{Ahead, Input, Kernels};

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

/// The exponentials of one row, kept between its two passes.
struct RowExps {
    /// `exp(z - shift_c)`, times the chain factor with soft-capping (empty when rows are too
    /// long to keep).
    exps: Vec<f32>,
    /// The chain factors, when soft-capping and smoothing are both on (else empty).
    chain: Vec<f32>,
    /// The running maximum each chunk's exponentials are taken against.
    shifts: Vec<f32>,
}

impl RowExps {
    fn new(vocab: usize, m: &RowMath) -> RowExps {
        let keep = vocab <= SCRATCH_MAX;
        RowExps {
            exps: vec![0.0; if keep { vocab } else { 0 }],
            chain: vec![0.0; if keep && m.keeps_chain() { vocab } else { 0 }],
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
    /// Their chain factors (soft-capping with smoothing; else empty).
    chain: Vec<f32>,
}

impl Scratch {
    fn new(m: &RowMath) -> Scratch {
        Scratch {
            buf: vec![0.0; CHUNK],
            tmp: vec![0.0; CHUNK],
            chain: vec![0.0; if m.keeps_chain() { CHUNK } else { 0 }],
        }
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
    store_products(k, x, f, out, stream, false)
}

/// [`store_scaled`], told whether every product is finite (a bf16 store then skips the NaN
/// handling where the level emulates the conversion; the bits are the same).
#[inline]
fn store_products<G: Logit>(k: &Kernels, x: &[f32], f: f32, out: &mut [G], stream: bool, finite: bool) {
    if let Some(o) = G::as_f32_mut(out) {
        return k.scale_f32(x, f, o, stream);
    }
    if let Some(bits) = G::as_bits_mut(out) {
        match G::DTYPE {
            DType::BF16 if finite => k.scale_bf16_finite(x, f, bits, stream),
            DType::BF16 => k.scale_bf16(x, f, bits, stream),
            _ => k.scale_f16(x, f, bits, stream),
        }
    }
}

/// `out = exp(chunk - shift)` (with the options: of the capped chunk, times the chain factor,
/// chain factors into `chain`), returning the sum, the chunk's (capped) maximum and, with
/// smoothing, the sum of its (capped) logits. 16-bit input is widened inside the loop and gets
/// the short polynomial, matched to its precision.
#[inline]
#[allow(clippy::too_many_arguments)]
fn exp_chunk<L: Logit>(
    k: &Kernels,
    m: &RowMath,
    chunk: &[L],
    shift: f32,
    out: &mut [f32],
    chain: &mut [f32],
    pf: Ahead,
    buf: &mut [f32],
) -> (f32, f32, f32) {
    if let Some(o) = m.elem {
        let x = match (L::as_f32(chunk), L::as_bits(chunk)) {
            (Some(x), _) => Input::F32(x),
            (None, Some(b)) if L::DTYPE == DType::BF16 => Input::Bf16(b),
            (None, Some(b)) => Input::F16(b),
            (None, None) => unreachable!("every Logit is f32 or 16-bit"),
        };
        return k.exp_opts(x, shift, o, out, chain, pf);
    }
    let (sum, top) = match L::as_bits(chunk) {
        Some(bits) => k.exp_sum_max_bits(L::DTYPE == DType::BF16, bits, shift, out, pf),
        None => k.exp_sum_max(load(k, chunk, buf), shift, out, pf),
    };
    (sum, top, 0.0)
}

/// Chunks to prefetch (into L2) ahead of the one being read.
const PREFETCH_CHUNKS: usize = 4;

/// Statistics pass over one row. Keeps the exponentials in `keep` when given (and long enough);
/// calls `after(c)` after chunk `c`, which is where the previous row's gradient is interleaved.
/// `ahead` is the task's input from this row on, for prefetching.
#[allow(clippy::too_many_arguments)]
fn stats_pass<L: Logit>(
    k: &Kernels,
    m: &RowMath,
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
        let (out, chain) = match keep.as_deref_mut().filter(|e| e.kept()) {
            Some(e) => (&mut e.exps[c * CHUNK..], chain_from(&mut e.chain, c * CHUNK)),
            None => (&mut s.tmp[..], &mut s.chain[..]),
        };
        if st.shift == f32::NEG_INFINITY {
            // no finite reference yet: take this chunk's maximum first
            st.raise(m.cap_max(k.max(load(k, chunk, &mut s.buf))));
        }
        let (mut sum, top, mut zsum) = exp_chunk(k, m, chunk, st.exp_shift(), &mut *out, &mut *chain, pf, &mut s.buf);
        if top > st.shift + MARGIN {
            // a much larger maximum (or +inf): move the reference and redo the chunk
            st.raise(top);
            (sum, _, zsum) = exp_chunk(k, m, chunk, st.exp_shift(), out, chain, Ahead::NONE, &mut s.buf);
        }
        st.sum_exp += sum as f64;
        st.logit_sum += zsum as f64;
        if let Some(e) = keep.as_deref_mut().filter(|e| e.kept()) {
            e.shifts[c] = st.shift;
        }
        after(c);
    }
    (st.target_logit, st.target_chain) = m.cap(row[target].to_f32() as f64);
    st
}

/// `chain[from..]`, or the empty slice when no chain factors are kept.
#[inline]
fn chain_from(chain: &mut [f32], from: usize) -> &mut [f32] {
    if chain.is_empty() {
        chain
    } else {
        &mut chain[from..]
    }
}

/// A row whose statistics are known and whose gradient is still to be written.
struct Pending<'a, G> {
    out: &'a mut [G],
    st: RowStats,
    target: usize,
    coef: f32,
}

impl<G: Logit> Pending<'_, G> {
    /// Turns kept `exp · s` values of chunk `c` (with shift `shift`) into the gradient and
    /// stores them: one multiply, or with smoothing first `q · f − k · s` in place.
    #[allow(clippy::too_many_arguments)]
    fn store(&mut self, k: &Kernels, m: &RowMath, q: &mut [f32], chain: &[f32], lo: usize, shift: f32, stream: bool) {
        let hi = lo + q.len();
        let f = m.grad_factor(&self.st, self.coef, shift);
        let off = m.smoothing_offset(self.coef);
        let has_target = (lo..hi).contains(&self.target);
        // the target's chunk goes through the cache: its entry is rewritten just after
        let stream = stream && !has_target;
        // a finite row sum bounds every kept exponential: with finite factors, every product is
        let finite = self.st.sum_exp.is_finite() && f.is_finite() && off.is_finite();
        if off != 0.0 {
            k.affine(q, f, off, chain);
            store_products(k, q, 1.0, &mut self.out[lo..hi], stream, finite);
        } else {
            store_products(k, q, f, &mut self.out[lo..hi], stream, finite);
        }
        if has_target {
            self.out[self.target] = G::from_f32(m.target_grad(&self.st, self.coef));
        }
    }

    /// Writes chunk `c` of the gradient from the row's kept exponentials.
    fn write_chunk(&mut self, k: &Kernels, m: &RowMath, e: &mut RowExps, c: usize, stream: bool) {
        let lo = c * CHUNK;
        let hi = (lo + CHUNK).min(self.out.len());
        let chain = if e.chain.is_empty() { &[][..] } else { &e.chain[lo..hi] };
        self.store(k, m, &mut e.exps[lo..hi], chain, lo, e.shifts[c], stream);
    }

    /// Writes the whole gradient: from `e` when it was kept, else by re-reading the logits
    /// (`row`; `None` when the logits are `out` itself) and recomputing the exponentials.
    fn write<L: Logit>(
        mut self,
        k: &Kernels,
        m: &RowMath,
        e: &mut RowExps,
        row: Option<&[L]>,
        s: &mut Scratch,
        stream: bool,
    ) {
        if e.kept() {
            for c in 0..self.out.len().div_ceil(CHUNK) {
                self.write_chunk(k, m, e, c, stream);
            }
            return;
        }
        let shift = self.st.exp_shift();
        for c in 0..self.out.len().div_ceil(CHUNK) {
            let lo = c * CHUNK;
            let n = (self.out.len() - lo).min(CHUNK);
            // the same exponentials as the statistics pass took (in place, `out` is the logits)
            let (tmp, chain) = (&mut s.tmp[..n], &mut s.chain[..]);
            match row {
                Some(row) => exp_chunk(k, m, &row[lo..lo + n], shift, tmp, chain, Ahead::NONE, &mut s.buf),
                None => exp_chunk(k, m, &self.out[lo..lo + n], shift, tmp, chain, Ahead::NONE, &mut s.buf),
            };
            let chain = if s.chain.is_empty() { &[][..] } else { &s.chain[..n] };
            self.store(k, m, &mut s.tmp[..n], chain, lo, self.st.shift, false);
        }
    }
}

/// Zeros a row's gradient (positions without a target).
fn zero<G: Logit>(k: &Kernels, out: &mut [G], stream: bool) {
    static ZEROS: [f32; CHUNK] = [0.0; CHUNK];
    for o in out.chunks_mut(CHUNK) {
        store_products(k, &ZEROS[..o.len()], 0.0, o, stream, true);
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

/// Per-row results of one task: the loss and its z-loss part.
struct TaskLosses<'a> {
    loss: &'a mut [f64],
    z: &'a mut [f64],
}

impl TaskLosses<'_> {
    #[inline]
    fn set(&mut self, i: usize, (loss, z): (f64, f64)) {
        self.loss[i] = loss;
        self.z[i] = z;
    }
}

/// One task of [`run`] with a gradient: rows `r0..` of `src` into `dst`.
///
/// Software-pipelined over rows: while row `r`'s statistics pass reads its logits chunk by
/// chunk, row `r-1`'s gradient is written chunk by chunk from its kept exponentials, so reads,
/// writes and `exp` overlap instead of alternating. Two scratch rows take turns.
#[allow(clippy::too_many_arguments)]
fn grad_task<L: Logit, G: Logit>(
    k: &Kernels,
    m: &RowMath,
    plan: &Plan,
    r0: usize,
    src: &[L],
    dst: &mut [G],
    mut losses: TaskLosses<'_>,
    stream: bool,
) {
    let v = plan.shape.vocab();
    let (mut cur, mut prev) = (RowExps::new(v, m), RowExps::new(v, m));
    let mut s = Scratch::new(m);
    let mut pending: Option<Pending<'_, G>> = None;
    let mut pending_row: &[L] = &[];
    for (i, (row, out)) in src.chunks_exact(v).zip(dst.chunks_exact_mut(v)).enumerate() {
        let r = r0 + i;
        let Some(y) = target_of(plan, r) else {
            if let Some(p) = pending.take() {
                p.write(k, m, &mut prev, Some(pending_row), &mut s, stream);
            }
            zero(k, out, stream);
            continue;
        };
        let st = if cur.kept() {
            let (p, e) = (&mut pending, &mut prev);
            stats_pass(k, m, row, &src[i * v..], y, Some(&mut cur), &mut s, |c| {
                if let Some(p) = p.as_mut() {
                    p.write_chunk(k, m, e, c, stream);
                }
            })
        } else {
            if let Some(p) = pending.take() {
                p.write(k, m, &mut prev, Some(pending_row), &mut s, stream);
            }
            stats_pass(k, m, row, &src[i * v..], y, None, &mut s, |_| {})
        };
        losses.set(i, m.loss(&st));
        pending = Some(Pending { out, st, target: y, coef: plan.row_coef(r) });
        pending_row = row;
        std::mem::swap(&mut cur, &mut prev);
    }
    if let Some(p) = pending.take() {
        p.write(k, m, &mut prev, Some(pending_row), &mut s, stream);
    }
    k.fence();
}

/// Loss of every row (0 for rows without a target) and, when `grad` is given, the gradient.
pub(crate) fn run<L: Logit, G: Logit>(k: &Kernels, plan: &Plan, logits: &[L], grad: Option<&mut [G]>) -> RowLosses {
    let (rows, v) = (plan.shape.rows(), plan.shape.vocab());
    let m = RowMath::new(&plan.opts, v);
    let rpt = rows_per_task(rows, v);
    let stream = plan.shape.logits_len() * G::DTYPE.size() >= STREAM_MIN_BYTES;
    let mut out = RowLosses { loss: vec![0f64; rows], z: vec![0f64; rows] };
    let tasks = out.loss.par_chunks_mut(rpt).zip(out.z.par_chunks_mut(rpt)).zip(logits.par_chunks(rpt * v)).enumerate();
    match grad {
        Some(grad) => tasks.zip(grad.par_chunks_mut(rpt * v)).for_each(|((task, ((loss, z), src)), dst)| {
            grad_task(k, &m, plan, task * rpt, src, dst, TaskLosses { loss, z }, stream)
        }),
        None => tasks.for_each(|(task, ((loss, z), src))| {
            let mut s = Scratch::new(&m);
            let mut losses = TaskLosses { loss, z };
            for (i, row) in src.chunks_exact(v).enumerate() {
                if let Some(y) = target_of(plan, task * rpt + i) {
                    losses.set(i, m.loss(&stats_pass(k, &m, row, &src[i * v..], y, None, &mut s, |_| {})));
                }
            }
        }),
    }
    out
}

/// Loss of every row, with the gradient written over the logits.
pub(crate) fn run_in_place<L: Logit>(k: &Kernels, plan: &Plan, logits: &mut [L]) -> RowLosses {
    let rows = plan.shape.rows();
    let mut out = RowLosses { loss: vec![0f64; rows], z: vec![0f64; rows] };
    run_rows_in_place(k, plan, RowSel::From(0), logits, &mut out.loss, &mut out.z);
    out
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

/// [`run_in_place`] over some rows of the plan: `logits` holds `loss.len()` rows, buffer row
/// `i` being plan row `sel.global(i)`; its loss goes to `loss[i]` and its z-loss part to `z[i]`.
pub(crate) fn run_rows_in_place<L: Logit>(
    k: &Kernels,
    plan: &Plan,
    sel: RowSel<'_>,
    logits: &mut [L],
    loss: &mut [f64],
    z: &mut [f64],
) {
    let (rows, v) = (loss.len(), plan.shape.vocab());
    let m = RowMath::new(&plan.opts, v);
    let rpt = rows_per_task(rows, v);
    let tasks = loss.par_chunks_mut(rpt).zip(z.par_chunks_mut(rpt)).zip(logits.par_chunks_mut(rpt * v));
    tasks.enumerate().for_each(|(task, ((loss, z), src))| {
        let mut e = RowExps::new(v, &m);
        let mut s = Scratch::new(&m);
        let mut losses = TaskLosses { loss, z };
        for (i, row) in src.chunks_exact_mut(v).enumerate() {
            let r = sel.global(task * rpt + i);
            match target_of(plan, r) {
                Some(y) => {
                    let st = stats_pass(k, &m, row, row, y, Some(&mut e), &mut s, |_| {});
                    losses.set(i, m.loss(&st));
                    // the row was just read, its lines are in cache: no streaming
                    let p = Pending { out: row, st, target: y, coef: plan.row_coef(r) };
                    p.write::<L>(k, &m, &mut e, None, &mut s, false);
                }
                None => row.fill(L::default()),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{CpuSimd, RowOptions};

    fn stats_of(k: &Kernels, m: &RowMath, row: &[f32], target: usize) -> RowStats {
        stats_pass(k, m, row, row, target, None, &mut Scratch::new(m), |_| {})
    }

    #[test]
    fn merged_slices_equal_whole_row() {
        let k = Kernels::select(CpuSimd::Auto).unwrap();
        let row: Vec<f32> = (0..10_000).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
        for opts in [
            RowOptions::default(),
            RowOptions { z_loss: 1e-3, smoothing: 0.1, softcap: Some(3.0) },
            RowOptions { z_loss: 0.0, smoothing: 0.2, softcap: None },
        ] {
            let m = RowMath::new(&opts, row.len());
            let whole = stats_of(&k, &m, &row, 6_000);
            // vocabulary split in two shards; the target lives in the second one
            let (a, b) = row.split_at(4_000);
            let mut sa = stats_of(&k, &m, a, 0);
            (sa.target_logit, sa.target_chain) = (0.0, 1.0);
            let sb = stats_of(&k, &m, b, 2_000);
            let merged = sa.merge(sb);
            assert_eq!(merged.target_logit, whole.target_logit);
            assert_eq!(merged.target_chain, whole.target_chain);
            let (ma, mw) = (merged.sum_exp * (merged.shift as f64).exp(), whole.sum_exp * (whole.shift as f64).exp());
            assert!((ma - mw).abs() <= 1e-6 * mw, "{opts:?}");
            assert!((merged.logit_sum - whole.logit_sum).abs() <= 1e-6 * whole.logit_sum.abs().max(1.0), "{opts:?}");
            let (lm, lw) = (m.loss(&merged), m.loss(&whole));
            assert!((lm.0 - lw.0).abs() <= 1e-6 * lw.0.abs() && (lm.1 - lw.1).abs() <= 1e-6 * lw.1.abs(), "{opts:?}");
            assert_eq!(RowStats::EMPTY.merge(whole), whole);
        }
    }
}

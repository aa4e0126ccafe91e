//! The fused CPU backend.
//!
//! Per row, in chunks of [`CHUNK`] elements:
//!
//! 1. **statistics pass** — each chunk is read once from memory, and in the same loop
//!    `e = exp(z - r)` is computed against the row's running reference `r` (the first finite
//!    chunk's maximum), summed (every entry but the target's, whose term is taken in f64 from
//!    its logit: [`row::RowStats`]) and kept in a scratch row of the task. Only when
//!    a chunk's sum is large enough ([`CHECK_SUM`]) to hide an element more than [`MARGIN`]
//!    above `r` is the chunk's maximum taken, and only when it does exceed `r + MARGIN` does `r`
//!    move up, the sum get rescaled and the chunk get recomputed; with real logits that is
//!    almost never;
//! 2. **gradient pass** — from the scratch row (in L2): `grad = e * coef / sum_exp * exp(r_c - r)`,
//!    one multiply per element, stored with streaming stores so the gradient's cache lines are
//!    never read; the target entry is written last as `coef * (softmax - 1)`, and its 64-byte
//!    line alone goes through the cache (a streamed line is not rewritten; until 2026-12-04 the
//!    target's whole chunk of 2048 did, which cost an f32 pass 2.5–5.6% on a Xeon). The lines
//!    written through the cache (that one, and a chunk's partial end line when the gradient is
//!    not 64-byte aligned, as a large `Vec` is not) are prefetched at the chunk's start: a store
//!    to a line that is not in cache waits for its read, and every streamed line behind it waits
//!    too (bf16 4–15% of the pass on a Xeon, up to 22% at AVX2).
//!
//! Each logit is read from memory once, each gradient element written once, and `exp` is
//! evaluated once per element. Consecutive rows of a thread are software-pipelined: the
//! gradient of row `r-1` is written chunk by chunk between the chunks of row `r`'s statistics
//! pass, so reads, writes and arithmetic overlap; at the AVX2 and AVX-512 levels, for every input
//! and gradient dtype and without soft-capping or label smoothing, the store runs inside the
//! statistics loop itself, one cache line per step, so that the streaming stores drain under the
//! `exp` arithmetic (`pass.rs`). Rows longer than [`SCRATCH_MAX`] (beyond any
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
mod pass;
mod row;
mod scratch;
pub(crate) mod simd;
pub(crate) mod split;

use crate::dtype::Logit;
use crate::plan::{Plan, RowLosses, NO_TARGET};
use pass::store_scaled_ahead;
pub(crate) use pass::{load, store_scaled};
use pass::{stats_pass, zero, ChunkEdges, Pending, PrevRow};
use rayon::prelude::*;
use row::RowMath;
pub(crate) use row::RowStats;
use scratch::{RowExps, Scratch};
use simd::Kernels;

/// Elements of a row handled per step.
pub(crate) const CHUNK: usize = 2048;

/// Elements per task of [`scale_into`] (whole cache lines of every dtype).
const SCALE_TASK: usize = 1 << 16;

/// Longest row (elements) whose exponentials are kept in a scratch row (16 MiB of f32).
pub(crate) const SCRATCH_MAX: usize = 1 << 22;

/// How far a chunk's maximum may exceed the row's reference before the reference moves: the
/// kept exponentials stay below `e^20` (sums of a row stay far from f32 overflow; for a reference
/// of magnitude 2^26 and more, `reference + MARGIN` rounds in f32 and the bound grows to about
/// `e^32` at 2^28, still far from it).
const MARGIN: f32 = 20.0;

/// A chunk's sum of exponentials above which the statistics pass looks for the chunk's maximum
/// (an extra pass over the chunk, in cache): an element more than [`MARGIN`] above the reference
/// adds more than `e^19` to the sum, and a float sum of non-negative terms is at least its
/// largest term, so a sum at most this large (1e8 < e^19) rules one out without a running
/// maximum in the loop.
const CHECK_SUM: f32 = 1e8;

/// Gradients at least this large (bytes) are written with streaming stores: they cannot stay in
/// cache anyway, and streaming skips reading the destination lines first.
const STREAM_MIN_BYTES: usize = 32 << 20;

/// Rows per parallel task: enough tasks to balance the threads, each at least 65 536 logits
/// (256 KiB of f32, 128 KiB of 16-bit).
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
            let mut inter = PrevRow { k, m, p: &mut pending, e: &mut prev, stream, fused: None };
            stats_pass(k, m, row, &src[i * v..], Some(y), Some(&mut cur), &mut s, &mut inter)
        } else {
            if let Some(p) = pending.take() {
                p.write(k, m, &mut prev, Some(pending_row), &mut s, stream);
            }
            stats_pass(k, m, row, &src[i * v..], Some(y), None, &mut s, &mut ())
        };
        losses.set(i, m.loss(&st));
        pending = Some(Pending::new(m, out, st, y, plan.row_coef(r)));
        pending_row = row;
        std::mem::swap(&mut cur, &mut prev);
    }
    if let Some(p) = pending.take() {
        p.write(k, m, &mut prev, Some(pending_row), &mut s, stream);
    }
    k.fence();
}

/// `dst = src * f` rounded to `dst`'s dtype, on the rayon pool with the level's vector code
/// (streaming stores where the level has them). Equal lengths.
pub(crate) fn scale_into<G: Logit>(k: &Kernels, src: &[f32], f: f32, dst: &mut [G]) {
    crate::pool::install(|| {
        src.par_chunks(SCALE_TASK).zip(dst.par_chunks_mut(SCALE_TASK)).for_each(|(s, d)| {
            // the partial lines the streaming stores write through the cache, a chunk ahead
            let edges = ChunkEdges::of(d);
            edges.ask(0);
            for (c, (s, d)) in s.chunks(CHUNK).zip(d.chunks_mut(CHUNK)).enumerate() {
                edges.ask(c + 1);
                store_scaled_ahead(k, s, f, d);
            }
            k.fence();
        })
    });
}

/// Loss of every row (0 for rows without a target) and, when `grad` is given, the gradient.
pub(crate) fn run<L: Logit, G: Logit>(k: &Kernels, plan: &Plan, logits: &[L], grad: Option<&mut [G]>) -> RowLosses {
    crate::pool::install(|| run_here(k, plan, logits, grad))
}

/// [`run`] on the pool this thread reaches (see [`crate::pool`]).
fn run_here<L: Logit, G: Logit>(k: &Kernels, plan: &Plan, logits: &[L], grad: Option<&mut [G]>) -> RowLosses {
    let stream = plan.shape.logits_len() * G::DTYPE.size() >= STREAM_MIN_BYTES;
    run_streaming(k, plan, logits, grad, stream)
}

/// [`run_here`] with the gradient streamed or not, whatever its size (the same bits either way).
fn run_streaming<L: Logit, G: Logit>(
    k: &Kernels,
    plan: &Plan,
    logits: &[L],
    grad: Option<&mut [G]>,
    stream: bool,
) -> RowLosses {
    let (rows, v) = (plan.shape.rows(), plan.shape.vocab());
    let m = RowMath::new(&plan.opts, v);
    let rpt = rows_per_task(rows, v);
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
                    losses.set(i, m.loss(&stats_pass(k, &m, row, &src[i * v..], Some(y), None, &mut s, &mut ())));
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
    crate::pool::install(|| {
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
                        let st = stats_pass(k, &m, row, row, Some(y), Some(&mut e), &mut s, &mut ());
                        losses.set(i, m.loss(&st));
                        // the row was just read, its lines are in cache: no streaming
                        let p = Pending::new(&m, row, st, y, plan.row_coef(r));
                        p.write::<L>(k, &m, &mut e, None, &mut s, false);
                    }
                    None => row.fill(L::default()),
                }
            }
        });
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RowOptions;
    use crate::spec::CpuSimd;

    fn stats_of(k: &Kernels, m: &RowMath, row: &[f32], target: Option<usize>) -> RowStats {
        stats_pass(k, m, row, row, target, None, &mut Scratch::new(m), &mut ())
    }

    #[test]
    fn the_sum_check_cannot_miss_an_element_beyond_the_margin() {
        // an element MARGIN above the reference adds at least e^MARGIN·(1 − 1e-5) to the sum
        assert!(((MARGIN - 1.0) as f64).exp() > CHECK_SUM as f64);
    }

    #[test]
    fn the_reference_moves_only_for_a_chunk_far_above_it() {
        // row of four chunks around 0 (reference: the first chunk's maximum, 1.0), and in the
        // third chunk: one element just beyond the margin (the reference moves to it), 100 and
        // 1e4 above (past `exp`'s range: it moves too), just inside it (it stays), a block of
        // elements 12 above (a sum past CHECK_SUM, no move), +inf (the sum turns NaN); every
        // level, with and without the element-wise options
        let levels = [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512];
        let base: Vec<f32> = (0..4 * CHUNK).map(|i| ((i * 7919) % 1000) as f32 * 0.002 - 1.0).collect();
        let first_max = base[..CHUNK].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let at = 2 * CHUNK + 77;
        type Edit = fn(&mut [f32], f32);
        let cases: [(&str, Edit); 6] = [
            ("beyond", |r, m| r[0] = m + MARGIN + 0.5),
            ("far beyond", |r, m| r[0] = m + 100.0),
            ("very far beyond", |r, m| r[0] = m + 1e4),
            ("inside", |r, m| r[0] = m + MARGIN - 0.5),
            ("block", |r, m| r[..CHUNK - 100].fill(m + 12.0)),
            ("inf", |r, _| r[0] = f32::INFINITY),
        ];
        for k in levels.into_iter().filter_map(Kernels::select) {
            for opts in [RowOptions::default(), RowOptions { z_loss: 0.0, smoothing: 0.1, softcap: None }] {
                let m = RowMath::new(&opts, base.len());
                for (name, edit) in cases {
                    let mut row = base.clone();
                    edit(&mut row[at..], first_max);
                    let st = stats_of(&k, &m, &row, Some(5));
                    let what = format!("{:?} {opts:?} {name}", k.level);
                    let top = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let moves = name.ends_with("beyond") || name == "inf";
                    let want_shift = if moves { top } else { first_max };
                    assert_eq!(st.shift, want_shift, "{what}");
                    if name == "inf" {
                        assert!(st.sum_exp().is_nan(), "{what}: {}", st.sum_exp());
                        continue;
                    }
                    // (exp's own bound at 20 above the reference: a few 1e-6)
                    let want: f64 = row.iter().map(|&z| (z as f64 - st.shift as f64).exp()).sum();
                    assert!((st.sum_exp() - want).abs() <= 5e-6 * want, "{what}: {} vs {want}", st.sum_exp());
                }
            }
        }
    }

    /// Streamed gradients are the bits of cached ones, for every level, dtype pair and target
    /// place: at a row's first and last entries, at chunk edges and at every place in a cache
    /// line (the target's line is stored through the cache and rewritten; the lines around it
    /// stream), in rows that start on a line and rows that do not, with the plain loop (whose
    /// store runs inside the statistics loop) and with label smoothing (a store of its own).
    #[test]
    fn streamed_gradients_equal_cached_ones() {
        use crate::{LossSpec, Shape, Tokens};
        use half::{bf16, f16};
        fn case<L: Logit, G: Logit>(k: &Kernels, spec: &LossSpec, v: usize, targets: &[i64]) {
            // one sample whose positions predict `targets` (position t predicts id t + 1)
            let shape = Shape::new(1, targets.len() + 1, v).unwrap();
            let mut ids = vec![0i64];
            ids.extend_from_slice(targets);
            let plan = spec.plan(shape, &Tokens::new(&ids)).unwrap();
            let logits: Vec<L> = crate::synthetic::logits(7, shape.logits_len(), 3.0);
            // one element more, so that the gradient can start off a line as well as on one
            let mut cached = vec![G::default(); shape.logits_len() + 1];
            let mut streamed = vec![G::default(); shape.logits_len() + 1];
            for off in [0, 1] {
                let c = &mut cached[off..off + shape.logits_len()];
                let a = crate::pool::install(|| run_streaming(k, &plan, &logits, Some(&mut *c), false));
                let s = &mut streamed[off..off + shape.logits_len()];
                let b = crate::pool::install(|| run_streaming(k, &plan, &logits, Some(&mut *s), true));
                let bits = |g: &[G]| g.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
                let what = format!("{:?}, {:?} -> {:?}, offset {off}", k.level, L::DTYPE, G::DTYPE);
                assert_eq!(
                    bits(&cached[off..][..shape.logits_len()]),
                    bits(&streamed[off..][..shape.logits_len()]),
                    "{what}"
                );
                assert_eq!(a.loss, b.loss, "{what}");
                // and the target entries are the softmax's, not what the chunk's store left
                for (r, &y) in targets.iter().enumerate() {
                    let g = streamed[off + r * v + y as usize].to_f32();
                    assert!(g < 0.0, "{what}: the target entry of row {r} ({y}) is {g}");
                }
            }
        }
        let v = 2 * CHUNK + 100;
        // the targets' places: row edges, chunk edges, every place of one line and around it
        let mut targets: Vec<i64> = vec![0, v as i64 - 1, CHUNK as i64 - 1, CHUNK as i64, 2 * CHUNK as i64 + 1];
        targets.extend((0..40).map(|i| (CHUNK + 300 + i) as i64));
        for level in [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512] {
            let Some(k) = Kernels::select(level) else { continue };
            for smoothing in [0.0, 0.1] {
                let spec = LossSpec::builder().keywords([1i64]).label_smoothing(smoothing).build().unwrap();
                case::<f32, f32>(&k, &spec, v, &targets);
                case::<bf16, bf16>(&k, &spec, v, &targets);
                case::<f16, f16>(&k, &spec, v, &targets);
                case::<bf16, f32>(&k, &spec, v, &targets);
                case::<f16, f32>(&k, &spec, v, &targets);
            }
        }
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
            let whole = stats_of(&k, &m, &row, Some(6_000));
            // vocabulary split in two shards; the target lives in the second one
            let (a, b) = row.split_at(4_000);
            let sa = stats_of(&k, &m, a, None);
            let sb = stats_of(&k, &m, b, Some(2_000));
            let merged = sa.merge(sb);
            assert_eq!(merged.target_logit, whole.target_logit);
            assert_eq!(merged.target_chain, whole.target_chain);
            let (ma, mw) =
                (merged.sum_exp() * (merged.shift as f64).exp(), whole.sum_exp() * (whole.shift as f64).exp());
            assert!((ma - mw).abs() <= 1e-6 * mw, "{opts:?}");
            // (the logits are summed against each slice's reference: the rounding scales with
            // the sum of |z - shift|, not with |sum z|, which is near 0 here)
            let scale = row.len() as f64 * (whole.shift as f64).abs() + whole.logit_sum.abs();
            assert!((merged.logit_sum - whole.logit_sum).abs() <= 1e-6 * scale.max(1.0), "{opts:?}");
            let (lm, lw) = (m.loss(&merged), m.loss(&whole));
            assert!((lm.0 - lw.0).abs() <= 1e-6 * lw.0.abs() && (lm.1 - lw.1).abs() <= 1e-6 * lw.1.abs(), "{opts:?}");
            assert_eq!(RowStats::EMPTY.merge(whole), whole);
        }
    }

    #[test]
    fn scale_into_rounds_the_product_once_on_every_level() {
        // values across f16's subnormal and normal ranges and past its top, both signs, and
        // non-finite ones; a length that is no multiple of a task, a chunk or a vector, at an
        // offset that misaligns the start
        let mut src: Vec<f32> = (0..SCALE_TASK + 3 * CHUNK + 37)
            .map(|i| {
                let m = 1.0 + ((i * 7919) % 1000) as f32 / 1000.0;
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                sign * m * 2f32.powi(((i * 31) % 60) as i32 - 45)
            })
            .collect();
        for (i, x) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 7e4].into_iter().enumerate() {
            src[101 * i + 5] = x;
        }
        let src = &src[3..];
        fn check<G: Logit>(k: &Kernels, src: &[f32], f: f32) {
            let mut dst = vec![G::default(); src.len()];
            scale_into(k, src, f, &mut dst);
            for (i, (&x, &d)) in src.iter().zip(&dst).enumerate() {
                let want = G::from_f32(x * f);
                let same = want == d || (want.to_f32().is_nan() && d.to_f32().is_nan());
                assert!(same, "{:?} {:?} at {i}: {x} * {f} gave {d:?}, want {want:?}", k.level, G::DTYPE);
            }
        }
        for k in [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512].into_iter().filter_map(Kernels::select) {
            for f in [1.0, 65536.0, 0.3, -2.5e-3] {
                check::<half::f16>(&k, src, f);
                check::<half::bf16>(&k, src, f);
                check::<f32>(&k, src, f);
            }
        }
    }
}

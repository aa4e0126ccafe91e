//! The fused linear path on the CPU: chunks of the rows that have a target, f32 products from
//! [`crate::cpu::gemm`], and the CPU backend's rows pass in place on each chunk's logits.
//!
//! `W` is taken one vocabulary panel of about [`CPU_PANEL_BYTES`] at a time (twice per chunk: for
//! the logits, and for `d hidden`): f32 panels where they lie (the panel bounds the GEMM
//! crate's packing buffer), f16/bf16 panels widened to f32 into one buffer; a chunk's hidden
//! rows are widened when they are gathered.
//!
//! Every schedule makes the same products, of the same shapes and layouts: the logits by half
//! panels of `W`, from the chunk's hidden rows column-major (padded with zero rows to a
//! multiple of 16); `d hidden` panel after panel; `d W` by half panels, each half panel of the
//! gradient first turned column-major into a free half of the logits panel buffer. Laid out so,
//! the operands are read by the GEMM as they lie and it allocates no packing buffer per call
//! (from a pool thread such buffers, freed and reallocated a hundred times a step, stay in that
//! thread's allocator arena: they had raised the resident peak by 10-20 MiB). On pools of two to
//! [`TASKS_MAX_THREADS`] threads the products run as tasks of one thread each (two half panels
//! of logits at a time; `d hidden` beside the half panels of `d W`), one fork and join per
//! step of a chunk; on other pools each product runs on every thread. The GEMM crate's sums
//! depend on the shapes and layouts of its operands, not on its threads, so the bits are the
//! same on every pool (tested, at shapes where the crate changes its method).

mod layout;

use super::{Chunking, Chunks, LinearGrads, LinearInputs, LinearShape, CPU_BUDGET, CPU_PANEL_BYTES};
use crate::cpu::gemm::{matmul, matmul_single, MatMut, MatRef};
use crate::cpu::simd::Kernels;
use crate::cpu::{load, run_rows_in_place, store_scaled, RowSel};
use crate::dtype::Logit;
use crate::error::{Error, Result};
use crate::plan::{Plan, RowLosses, NO_TARGET};
use crate::Grad;
use layout::{column_blocks, columns_into, halve, transpose_into};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per parallel task of the element-wise helpers.
const BLOCK: usize = 4096;

/// Pools of two to this many threads run a chunk's products as tasks of one thread each
/// (two half panels of logits at a time, and `d hidden` beside the half panels of `d W`)
/// instead of each product on every thread: on two cores the products' own fork and join,
/// over a hundred per chunk, cost 12% of a step (BENCHMARKS.md, 2026-12-04). Larger pools are
/// not measured yet. The same bits either way.
const TASKS_MAX_THREADS: usize = 2;

/// `dst = src` as f32 (equal lengths).
fn widen<L: Logit>(k: &Kernels, src: &[L], dst: &mut [f32]) {
    match L::as_f32(src) {
        Some(x) => dst.copy_from_slice(x),
        None => {
            load(k, src, dst);
        }
    }
}

/// `out += acc` in `out`'s dtype (rounded once per element), in parallel.
fn add_into<G: Logit>(k: &Kernels, acc: &[f32], out: &mut [G]) {
    crate::pool::install(|| {
        if let Some(o) = G::as_f32_mut(out) {
            o.par_chunks_mut(BLOCK).zip(acc.par_chunks(BLOCK)).for_each(|(o, a)| {
                o.iter_mut().zip(a).for_each(|(o, a)| *o += a);
            });
            return;
        }
        out.par_chunks_mut(BLOCK).zip(acc.par_chunks(BLOCK)).for_each(|(o, a)| {
            let mut buf = [0f32; BLOCK];
            let mut sum = [0f32; BLOCK];
            let cur = load(k, o, &mut buf);
            for ((s, c), a) in sum.iter_mut().zip(cur).zip(a) {
                *s = c + a;
            }
            store_scaled(k, &sum[..o.len()], 1.0, o, false);
        });
    })
}

/// `out = acc` in `out`'s dtype (rounded once per element), in parallel.
fn narrow_into<G: Logit>(k: &Kernels, acc: &[f32], out: &mut [G]) {
    crate::pool::install(|| {
        out.par_chunks_mut(BLOCK).zip(acc.par_chunks(BLOCK)).for_each(|(o, a)| store_scaled(k, a, 1.0, o, false))
    })
}

/// Zeros a gradient buffer.
fn zero<L: Logit>(g: &mut Grad<'_, L>) {
    crate::pool::install(|| match g {
        Grad::Skip => {}
        Grad::Into(x) => x.par_chunks_mut(BLOCK).for_each(|x| x.fill(L::default())),
        Grad::IntoF32(x) => x.par_chunks_mut(BLOCK).for_each(|x| x.fill(0.0)),
    })
}

/// Buffers that tasks take one at a time: at most as many run at once as the pool has threads,
/// and a task that finds none left (or none long enough) works in one of its own.
struct BufPool<'a>(std::sync::Mutex<Vec<&'a mut [f32]>>);

impl<'a> BufPool<'a> {
    fn new(bufs: Vec<&'a mut [f32]>) -> Self {
        BufPool(std::sync::Mutex::new(bufs))
    }

    /// `f` of a free buffer of at least `len` elements.
    fn with<R>(&self, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        let taken = lock().pop();
        match taken {
            Some(b) if b.len() >= len => {
                let r = f(&mut *b);
                lock().push(b);
                r
            }
            other => {
                lock().extend(other);
                f(&mut vec![0.0; len])
            }
        }
    }
}

/// Rows of `W` per panel (of `v` rows of `h`): also the columns of a chunk's logits panel.
fn panel_rows(h: usize, v: usize) -> usize {
    (CPU_PANEL_BYTES / (4 * h.max(1))).clamp(1, v.max(1))
}

/// Columns of the buffer of a chunk's logits panel: the panel's rows rounded up to even, so
/// that its two halves, either of which may take the larger half of a panel, fit side by side.
fn panel_slots(panel_rows: usize) -> usize {
    panel_rows.div_ceil(2) * 2
}

/// What a chunk row costs in the budget, for logits `v` wide from hidden rows of `h`: its f32
/// logits, its hidden rows twice (gathered, and column-major for the products) and `d hidden`,
/// and its part of the logits panel buffer.
pub(crate) fn chunk_row_bytes(h: usize, v: usize) -> usize {
    4 * v + 12 * h + 4 * panel_slots(panel_rows(h, v))
}

/// The vocabulary panels of `W` as f32, `rows` rows each: borrowed from `W` when it is f32,
/// widened into `buf` otherwise.
struct Panels<'a, L: Logit> {
    w: &'a [L],
    h: usize,
    v: usize,
    rows: usize,
    buf: Vec<f32>,
}

impl<'a, L: Logit> Panels<'a, L> {
    fn new(w: &'a [L], h: usize, v: usize) -> Self {
        let widened = L::as_f32(w).is_none();
        // f32 panels too: the GEMM crate packs a whole right-hand side at once, so the panel
        // bounds its packing buffer
        let rows = panel_rows(h, v);
        Panels { w, h, v, rows, buf: if widened { vec![0.0; rows * h] } else { Vec::new() } }
    }

    fn ranges(&self) -> impl Iterator<Item = Range<usize>> {
        let (rows, v) = (self.rows, self.v);
        (0..v.div_ceil(rows)).map(move |p| p * rows..((p + 1) * rows).min(v))
    }

    /// Rows `r` of `W` as f32, `r.len() x H` row-major.
    fn get(&mut self, k: &Kernels, r: Range<usize>) -> &[f32] {
        let h = self.h;
        let src = &self.w[r.start * h..r.end * h];
        match L::as_f32(src) {
            Some(x) => x,
            None => {
                let dst = &mut self.buf[..src.len()];
                crate::pool::install(|| {
                    dst.par_chunks_mut(BLOCK).zip(src.par_chunks(BLOCK)).for_each(|(d, s)| widen(k, s, d))
                });
                dst
            }
        }
    }
}

/// `d W[p] += G[:, p]ᵀ · h_c` for one panel `p` of `W`'s rows (`d W[p] = …` when `fresh`: the
/// first chunk of a call that does not accumulate, instead of zeroing `d W` first); `scratch`
/// (`p.len() x H`) is used when `d W` is 16-bit.
#[allow(clippy::too_many_arguments)]
fn weight_grad<L: Logit>(
    k: &Kernels,
    dw: &mut Grad<'_, L>,
    g: MatRef<'_>,
    hc: MatRef<'_>,
    p: &Range<usize>,
    h: usize,
    scratch: &mut [f32],
    fresh: bool,
    single: bool,
) {
    let matmul = if single { matmul_single } else { matmul };
    let f32_out = match dw {
        Grad::Skip => return,
        Grad::IntoF32(x) => Some(&mut x[p.start * h..p.end * h]),
        Grad::Into(x) => L::as_f32_mut(&mut x[p.start * h..p.end * h]),
    };
    // as `d Wᵀ += h_cᵀ · G`: the same sums, 10-15% faster from the GEMM crate at these shapes
    // (it packs the small `h_c` rather than the wide `G`)
    match f32_out {
        Some(out) => matmul(MatMut::rows(out, p.len(), h, h).t(), hc.t(), g, !fresh),
        None => {
            let s = &mut scratch[..p.len() * h];
            matmul(MatMut::rows(s, p.len(), h, h).t(), hc.t(), g, false);
            if let Grad::Into(x) = dw {
                let x = &mut x[p.start * h..p.end * h];
                if fresh {
                    narrow_into(k, s, x);
                } else {
                    add_into(k, s, x);
                }
            }
        }
    }
}

/// One panel's logits: `h_c · W[cols]ᵀ` into `buf` (column-major, `hm`'s rows by
/// `cols.len()`), then its first `out.len()` rows (those past them pad `hm` to a multiple of
/// 16) into the rows `out` with the bias; `w` holds `W`'s rows `cols` (f32, `H` each).
/// `single`: on this thread alone (a task), else on the pool.
#[allow(clippy::too_many_arguments)]
fn logits_panel(
    k: &Kernels,
    hm: MatRef<'_>,
    w: &[f32],
    h: usize,
    cols: Range<usize>,
    buf: &mut [f32],
    out: &mut [&mut [f32]],
    bias: Option<&[f32]>,
    single: bool,
) {
    let (m, n) = (hm.nrows(), cols.len());
    let zc = &mut buf[..m * n];
    let matmul = if single { matmul_single } else { matmul };
    matmul(MatMut::rows(zc, n, m, m).t(), hm, MatRef::rows(w, n, h, h).t(), false);
    transpose_into(k, zc, m, n, out, bias.map(|b| &b[cols]), !single);
}

/// Writes row `i` of `dhc` (f32) to row `rows[i]` of `dh`.
fn scatter<G: Logit>(k: &Kernels, dhc: &[f32], rows: &[u32], h: usize, dh: &mut [G]) {
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        store_scaled(k, &dhc[i * h..(i + 1) * h], 1.0, &mut dh[r * h..(r + 1) * h], false);
    }
}

/// What turns a chunk's logits (`rows.len() x V`, f32) into their gradient in place and gives
/// each row's loss and z-loss part: the rows pass, or the vocabulary-parallel split's steps.
pub(crate) type RowsPass<'a> = dyn FnMut(&[u32], &mut [f32], &mut [f64], &mut [f64]) -> Result<()> + 'a;

/// The rows plan row `r` has a target in, in order: the chunks' rows, listed as `u32` (a call of
/// more than `u32::MAX` token rows is refused, before anything is written).
pub(crate) fn active_rows(plan: &Plan) -> Result<Vec<u32>> {
    let rows = plan.shape.rows();
    if u32::try_from(rows).is_err() {
        return Err(Error::Unsupported(format!(
            "the CPU fused linear path takes at most {} token rows (B * T), got {rows}",
            u32::MAX
        )));
    }
    Ok((0..rows).filter(|&r| plan.targets[r] != NO_TARGET).map(|r| r as u32).collect())
}

/// `n` zeros, or [`Error::OutOfMemory`] naming `what` where the allocator refuses `n`
/// elements (a size past the address space, or past what the system lets this process map).
/// The test reservation is given back and the zeros come from `vec!`, which asks the allocator
/// for zeroed memory instead of writing every element.
fn zeroed<T: Default + Clone>(n: usize, what: &'static str) -> Result<Vec<T>> {
    let bytes = n as u128 * std::mem::size_of::<T>() as u128;
    Vec::<T>::new().try_reserve_exact(n).map_err(|_| Error::OutOfMemory { what, bytes })?;
    Ok(vec![T::default(); n])
}

/// Runs every chunk; returns each plan row's loss (0 for rows without a target).
pub(crate) fn run<L: Logit>(
    k: &Kernels,
    plan: &Plan,
    shape: LinearShape,
    inp: &LinearInputs<'_, L>,
    g: LinearGrads<'_, L>,
    chunking: Chunking,
) -> Result<(RowLosses, Chunks)> {
    let mut pass = |rows: &[u32], z: &mut [f32], loss: &mut [f64], zl: &mut [f64]| {
        run_rows_in_place(k, plan, RowSel::List(rows), z, loss, zl);
        Ok(())
    };
    run_with(k, plan, shape, inp, g, chunking, &mut pass)
}

/// [`run`] with the chunks' rows pass given: `shape`'s vocabulary is the width of the logits
/// this call computes (its rows of `W`), the plan's that of the loss.
pub(crate) fn run_with<L: Logit>(
    k: &Kernels,
    plan: &Plan,
    shape: LinearShape,
    inp: &LinearInputs<'_, L>,
    mut g: LinearGrads<'_, L>,
    chunking: Chunking,
    rows_pass: &mut RowsPass<'_>,
) -> Result<(RowLosses, Chunks)> {
    let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
    // rows without a target have no loss and a zero gradient: they are left out of the chunks
    let active = active_rows(plan)?;
    let default_budget = CPU_BUDGET;
    let slots = panel_slots(panel_rows(h, v));
    let c = chunking.rows_for(default_budget, chunk_row_bytes(h, v), active.len())?;
    let tasks = (2..=TASKS_MAX_THREADS).contains(&crate::pool::install(rayon::current_num_threads));

    // the gradients start from zero (or, accumulating, from what they hold): after every
    // check and allocation that can fail, so that a failed call writes nothing. `d W` is not
    // zeroed where a first chunk writes every panel of it (`fresh`) instead of adding
    let start = |g: &mut LinearGrads<'_, L>, weight: bool| {
        zero(&mut g.hidden);
        if !g.accumulate {
            if weight {
                zero(&mut g.weight);
            }
            zero(&mut g.bias);
        }
    };
    if active.is_empty() {
        // no row has a target: no chunk and no buffer (it reported chunks of 1 row, and their
        // buffers, for none run)
        start(&mut g, true);
        let row_loss = RowLosses { loss: vec![0f64; n], z: vec![0f64; n] };
        return Ok((row_loss, Chunks { rows: 0, count: 0, scratch_bytes: 0 }));
    }
    let want_dh = g.hidden.len().is_some();
    let want_db = g.bias.len().is_some();
    let mut panels = Panels::new(inp.weight, h, v);
    let dw_scratch = matches!(g.weight, Grad::Into(_)) && L::as_f32(inp.weight).is_none();
    let bias32 = inp.bias.map(|b| {
        let mut x = vec![0f32; v];
        widen(k, b, &mut x);
        x
    });
    // (allocated fallibly: `Chunking::Rows` can ask for more than the machine has)
    let mut hc = zeroed::<f32>(c * h, "the chunk's hidden rows")?;
    let mut z = zeroed::<f32>(c * v, "the chunk's logits")?;
    // one panel of a chunk's logits, column-major, before it goes into `z` (rows rounded up
    // to 16, as the products compute them)
    let c16 = c.next_multiple_of(16);
    let mut zp = zeroed::<f32>(c16 * slots, "a panel of the chunk's logits")?;
    // the chunk's hidden rows column-major, padded with zero rows to a multiple of 16: the GEMM
    // reads them as they lie (no packing buffer of its own per call)
    let mut hct = zeroed::<f32>(c16 * h, "the chunk's hidden rows, column-major")?;
    let mut dhc = zeroed::<f32>(if want_dh { c * h } else { 0 }, "the chunk's d hidden")?;
    let mut dwp = zeroed::<f32>(if dw_scratch { panels.rows * h } else { 0 }, "a panel of d weight")?;
    let mut dbc = vec![0f32; if want_db { v } else { 0 }];
    let (mut chunk_loss, mut chunk_z) = (zeroed::<f64>(c, "the chunk's losses")?, zeroed::<f64>(c, "the chunk's z")?);
    let mut row_loss = RowLosses { loss: vec![0f64; n], z: vec![0f64; n] };
    start(&mut g, false);
    let scratch_bytes = 4
        * (hc.len()
            + hct.len()
            + z.len()
            + zp.len()
            + dhc.len()
            + dwp.len()
            + dbc.len()
            + panels.buf.len()
            + bias32.as_ref().map_or(0, |b| b.len()));

    // the panels of `W`, and their halves, which the products take
    let ranges: Vec<Range<usize>> = panels.ranges().collect();
    let halves: Vec<Range<usize>> = ranges.iter().cloned().flat_map(halve).collect();
    for (ci, rows) in active.chunks(c).enumerate() {
        let m = rows.len();
        let z = &mut z[..m * v];
        let widen_rows = hc[..m * h].par_chunks_mut(h).zip(rows.par_iter());
        crate::pool::install(|| {
            widen_rows.for_each(|(d, &r)| {
                let r = r as usize;
                widen(k, &inp.hidden[r * h..(r + 1) * h], d);
            })
        });
        let hm = MatRef::rows(&hc, m, h, h);
        // the same rows column-major, padded with zero rows to a multiple of 16
        let m16 = m.next_multiple_of(16);
        {
            let mut cols: Vec<&mut [f32]> = hct[..h * m16].chunks_mut(m16).collect();
            transpose_into(k, &hc[..m * h], h, m, &mut cols, None, true);
            cols.iter_mut().for_each(|c| c[m..].fill(0.0));
        }
        let hmc = MatRef::rows(&hct, h, m16, m16).t();

        // logits of the chunk by half panels of `W`: h_c · W[r]ᵀ into a column-major buffer
        // (the GEMM crate then reads `W`'s rows as they lie, ~1.5x faster at these shapes than
        // into rows), then into the rows with the bias added. The same products, of the same
        // shapes, whatever the schedule: as tasks, or each on the whole pool
        let bias = bias32.as_deref();
        let half_cap = m16 * slots / 2;
        match L::as_f32(inp.weight).filter(|_| tasks) {
            // f32 `W` as it lies: every half panel a task, each into a free half of the buffer
            Some(w) => {
                let blocks = column_blocks(z, v, &halves);
                let bufs = BufPool::new(zp.chunks_mut(half_cap).take(2).collect());
                crate::pool::install(|| {
                    halves.par_iter().cloned().zip(blocks).for_each(|(r, mut rows)| {
                        let wr = &w[r.start * h..r.end * h];
                        bufs.with(m16 * r.len(), |b| logits_panel(k, hmc, wr, h, r, b, &mut rows, bias, true));
                    })
                });
            }
            None => {
                for p in &ranges {
                    let w = panels.get(k, p.clone());
                    let halves = halve(p.clone());
                    let [mut ba, mut bb]: [Vec<&mut [f32]>; 2] =
                        column_blocks(z, v, &halves).try_into().expect("a block per half");
                    let (za, zb) = zp.split_at_mut(half_cap);
                    let (wa, wb) = w.split_at(halves[0].len() * h);
                    let [ha, hb] = halves;
                    if tasks {
                        crate::pool::install(|| {
                            rayon::join(
                                || logits_panel(k, hmc, wa, h, ha, za, &mut ba, bias, true),
                                || logits_panel(k, hmc, wb, h, hb, zb, &mut bb, bias, true),
                            )
                        });
                    } else {
                        logits_panel(k, hmc, wa, h, ha, za, &mut ba, bias, false);
                        logits_panel(k, hmc, wb, h, hb, za, &mut bb, bias, false);
                    }
                }
            }
        }

        // the rows pass: logits -> coef * (softmax - onehot), and each row's loss
        rows_pass(rows, z, &mut chunk_loss[..m], &mut chunk_z[..m])?;
        for ((&r, &l), &zl) in rows.iter().zip(&chunk_loss).zip(&chunk_z) {
            row_loss.loss[r as usize] = l;
            row_loss.z[r as usize] = zl;
        }

        // d hidden = G · W panel after panel, and d W += Gᵀ · h_c by half panels, each half
        // panel of `G` first turned column-major into a free half of the panel buffer (the
        // GEMM then reads it as it lies, and allocates no packing buffer of its own). As
        // tasks: `d hidden` on one thread, the half panels of `d W` on the others
        let fresh = ci == 0 && !g.accumulate;
        let z = &*z;
        let single = tasks && want_dh && g.weight.len().is_some();
        let mut dh_chain = || {
            if !want_dh {
                return;
            }
            let matmul = if single { matmul_single } else { matmul };
            for (i, p) in ranges.iter().enumerate() {
                let gp = MatRef::rows(&z[p.start..], m, p.len(), v);
                let w = panels.get(k, p.clone());
                matmul(MatMut::rows(&mut dhc, m, h, h), gp, MatRef::rows(w, p.len(), h, h), i > 0);
            }
        };
        let half = m * slots / 2;
        let mut dw_panels = || {
            let f32_out = match &mut g.weight {
                Grad::IntoF32(x) => Some(&mut x[..]),
                Grad::Into(x) => L::as_f32_mut(x),
                Grad::Skip => return,
            };
            match f32_out {
                Some(mut out) if single => {
                    let mut pieces = Vec::new();
                    for r in &halves {
                        let (piece, rest) = std::mem::take(&mut out).split_at_mut(r.len() * h);
                        pieces.push((r.clone(), piece));
                        out = rest;
                    }
                    let bufs = BufPool::new(zp.chunks_mut(half).take(2).collect());
                    pieces.into_par_iter().for_each(|(r, out)| {
                        bufs.with(m * r.len(), |buf| {
                            let gp = columns_into(k, z, v, m, &r, buf, false);
                            matmul_single(MatMut::rows(out, r.len(), h, h).t(), hm.t(), gp, !fresh);
                        })
                    });
                }
                // one half panel after another (a 16-bit `d W` through its f32 panel scratch)
                _ => halves.iter().for_each(|r| {
                    let buf = &mut zp[..half];
                    let gp = columns_into(k, z, v, m, r, buf, !single);
                    weight_grad(k, &mut g.weight, gp, hm, r, h, &mut dwp, fresh, single);
                }),
            }
        };
        if single {
            crate::pool::install(|| rayon::join(dh_chain, dw_panels));
        } else {
            dh_chain();
            dw_panels();
        }
        match &mut g.hidden {
            Grad::Into(dh) => scatter(k, &dhc, rows, h, dh),
            Grad::IntoF32(dh) => scatter(k, &dhc, rows, h, dh),
            Grad::Skip => {}
        }

        // d b += column sums of G (rows summed in order)
        if want_db {
            crate::pool::install(|| {
                dbc.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, d)| {
                    d.fill(0.0);
                    for row in z.chunks_exact(v) {
                        d.iter_mut().zip(&row[bi * BLOCK..]).for_each(|(d, x)| *d += x);
                    }
                })
            });
            match &mut g.bias {
                Grad::Into(db) => add_into(k, &dbc, db),
                Grad::IntoF32(db) => add_into(k, &dbc, db),
                Grad::Skip => {}
            }
        }
    }
    Ok((row_loss, Chunks { rows: c, count: active.len().div_ceil(c), scratch_bytes }))
}

#[cfg(test)]
mod tests {
    use super::zeroed;
    use crate::error::Error;

    #[test]
    fn a_buffer_past_the_address_space_is_an_error() {
        let n = usize::MAX / 4 + 1;
        match zeroed::<f32>(n, "the chunk's logits") {
            Err(Error::OutOfMemory { what, bytes }) => {
                assert_eq!((what, bytes), ("the chunk's logits", n as u128 * 4));
            }
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        let e = Error::OutOfMemory { what: "x", bytes: 3_000_000_000 };
        assert_eq!(e.to_string(), "cannot allocate 3 GB for x");
        assert_eq!(zeroed::<f64>(5, "y").unwrap(), vec![0.0; 5]);
    }
}

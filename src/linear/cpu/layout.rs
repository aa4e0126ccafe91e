//! How the fused linear path lays out its operands between the GEMM and the rows pass: column-
//! major panels into rows and back (in registers where the level can), the logits rows cut
//! into column blocks that tasks write apart, and a panel's halves.

use crate::cpu::gemm::MatRef;
use crate::cpu::simd::Kernels;
use rayon::prelude::*;
use std::ops::Range;

/// Rows of [`transpose_into`]'s blocks (the rows of [`Kernels::transpose16`]).
const TILE: usize = 16;

/// `rows[i][j] = src[i + j * ld] (+ bias[j])` for the `m = rows.len()` rows and `j < n`: a
/// column-major `m x n` matrix whose columns are `ld` apart into rows, with the bias added (a
/// panel of logits as the GEMM writes it fastest into its place in the row-major logits, or a
/// panel of row-major gradient, its rows `ld` apart, into the columns the GEMM reads without
/// packing). Sixteen rows at a time in registers where the level can; the rest (the last rows,
/// the last columns, or all at the portable level) element by element in tiles of 16 x 16,
/// each row of a tile written contiguously; the same bits either way. With `parallel`, a task
/// per 16 rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn transpose_into(
    k: &Kernels,
    src: &[f32],
    ld: usize,
    n: usize,
    rows: &mut [&mut [f32]],
    bias: Option<&[f32]>,
    parallel: bool,
) {
    let m = rows.len();
    let reach = if n == 0 || m == 0 { 0 } else { (n - 1) * ld + m };
    assert!(ld >= m && src.len() >= reach && bias.is_none_or(|b| b.len() >= n) && rows.iter().all(|r| r.len() >= n));
    if reach == 0 {
        return;
    }
    let block = |(bi, out): (usize, &mut [&mut [f32]])| {
        let i0 = bi * TILE;
        let done = k.transpose16(&src[i0..], ld, out, n, bias);
        for j0 in (done..n).step_by(TILE) {
            let cols = (n - j0).min(TILE);
            for (i, o) in out.iter_mut().enumerate() {
                let o = &mut o[j0..j0 + cols];
                for (j, y) in o.iter_mut().enumerate() {
                    *y = src[(j0 + j) * ld + i0 + i];
                }
                if let Some(b) = bias {
                    o.iter_mut().zip(&b[j0..j0 + cols]).for_each(|(y, b)| *y += b);
                }
            }
        }
    };
    if parallel {
        crate::pool::install(|| rows.par_chunks_mut(TILE).enumerate().for_each(block));
    } else {
        rows.chunks_mut(TILE).enumerate().for_each(block);
    }
}

/// Columns `r` of the row-major matrix `z` (`m` rows of `v`) column-major in `buf`: the view
/// `m x r.len()` of them there (each column contiguous, as the GEMM reads it without packing).
pub(super) fn columns_into<'b>(
    k: &Kernels,
    z: &[f32],
    v: usize,
    m: usize,
    r: &Range<usize>,
    buf: &'b mut [f32],
    parallel: bool,
) -> MatRef<'b> {
    let buf = &mut buf[..m * r.len()];
    let mut cols: Vec<&mut [f32]> = buf.chunks_mut(m.max(1)).collect();
    transpose_into(k, &z[r.start..], v, m, &mut cols, None, parallel);
    MatRef::rows(buf, r.len(), m, m).t()
}

/// A panel's two halves (the first one longer by one row when the panel's rows are odd).
pub(super) fn halve(p: Range<usize>) -> [Range<usize>; 2] {
    let mid = p.start + p.len().div_ceil(2);
    [p.start..mid, mid..p.end]
}

/// The pieces of the logits rows `z` (rows of `v`) that the column ranges `cuts` (in order,
/// disjoint) hold: per range, its piece of every row, so that each range can be written apart.
pub(super) fn column_blocks<'a>(z: &'a mut [f32], v: usize, cuts: &[Range<usize>]) -> Vec<Vec<&'a mut [f32]>> {
    let mut blocks: Vec<Vec<&mut [f32]>> = cuts.iter().map(|_| Vec::with_capacity(z.len() / v.max(1))).collect();
    for row in z.chunks_exact_mut(v) {
        let (mut rest, mut at) = (row, 0);
        for (b, r) in blocks.iter_mut().zip(cuts) {
            let (piece, tail) = std::mem::take(&mut rest)[r.start - at..].split_at_mut(r.len());
            b.push(piece);
            (rest, at) = (tail, r.end);
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::{column_blocks, columns_into, transpose_into};
    use crate::cpu::simd::Kernels;
    use crate::spec::CpuSimd;

    #[test]
    fn a_panel_lands_transposed_at_every_level() {
        let levels: Vec<Kernels> =
            [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512].into_iter().filter_map(Kernels::select).collect();
        // rows and columns below, at and past the 16-element blocks, and a destination wider
        // than the panel (the logits row of which the panel is a slice)
        for (m, n, ld) in [
            (1, 1, 1),
            (15, 17, 20),
            (16, 16, 16),
            (16, 33, 40),
            (35, 48, 48),
            (179, 70, 101),
            (64, 5, 9),
            (20, 0, 4),
            (0, 5, 5),
        ] {
            let src: Vec<f32> = (0..m * n).map(|i| ((i * 7919) % 1009) as f32 * 0.37 - 150.0).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.011 - 0.2).collect();
            for b in [None, Some(&bias[..])] {
                // NaN where nothing may be written: a write past the panel's columns shows
                let mut want = vec![f32::NAN; m * ld];
                for i in 0..m {
                    for j in 0..n {
                        want[i * ld + j] = src[i + j * m] + b.map_or(0.0, |b| b[j]);
                    }
                }
                for (k, parallel) in levels.iter().flat_map(|k| [(k, false), (k, true)]) {
                    let mut got = vec![f32::NAN; m * ld];
                    {
                        // the rows' pieces as the chunk loop cuts them (a row's first n entries)
                        let mut rows: Vec<&mut [f32]> = got.chunks_mut(ld).map(|r| &mut r[..n]).collect();
                        transpose_into(k, &src, m, n, &mut rows, b, parallel);
                    }
                    let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                    let level = k.level;
                    assert!(same, "{level:?} (parallel {parallel}), {m} x {n} into rows of {ld}, bias {}", b.is_some());
                }
            }
        }
    }

    #[test]
    fn columns_come_out_column_major() {
        let k = Kernels::select(CpuSimd::Auto).unwrap();
        let (m, v) = (37, 41);
        let z: Vec<f32> = (0..m * v).map(|i| i as f32 * 0.5).collect();
        for (r, parallel) in [(3..37, false), (0..41, true), (40..41, false), (5..5, true)] {
            let mut buf = vec![f32::NAN; m * 41 + 3];
            let g = columns_into(&k, &z, v, m, &r, &mut buf, parallel);
            assert_eq!(g.nrows(), m);
            for (j, col) in r.clone().enumerate() {
                for i in 0..m {
                    assert_eq!(buf[j * m + i], z[i * v + col], "{r:?}: row {i} of column {col}");
                }
            }
            assert!(buf[m * r.len()..].iter().all(|x| x.is_nan()), "nothing past the columns");
        }
    }

    #[test]
    fn column_blocks_cut_every_row_at_the_ranges() {
        let (v, rows) = (10, 3);
        let mut z: Vec<f32> = (0..v * rows).map(|i| i as f32).collect();
        let cuts = [1..4, 4..4, 6..10];
        let blocks = column_blocks(&mut z, v, &cuts);
        assert_eq!(blocks.len(), 3);
        for (b, r) in blocks.iter().zip(&cuts) {
            assert_eq!(b.len(), rows);
            for (i, piece) in b.iter().enumerate() {
                let want: Vec<f32> = r.clone().map(|j| (i * v + j) as f32).collect();
                assert_eq!(&piece[..], &want[..]);
            }
        }
    }
}

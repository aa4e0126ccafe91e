//! Matrix products for the fused linear path, from the `gemm` crate (the one candle uses):
//! cache-blocked, SIMD kernels chosen at run time (AVX-512 with its `x86-v4` feature, AVX2/FMA,
//! NEON), threads from the rayon pool. BENCHMARKS.md has the measurement behind the choice.
//!
//! The crate takes raw pointers and strides; this module is where they are made from slices. A
//! [`MatRef`]/[`MatMut`] is built only after checking that every element its shape and strides
//! reach lies inside its slice, and [`matmul`] checks that the three shapes agree, so the one
//! `unsafe` call below stays within the borrowed memory. The output is a `&mut` slice, so it
//! cannot overlap the inputs.

/// A read-only `rows x cols` f32 matrix inside a slice: element `(i, j)` at `i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable `rows x cols` f32 matrix: element `(i, j)` at `i * rs + j * cs`, one of the two
/// strides 1 and the other at least the extent it steps over (no two elements share memory).
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Elements from the first to one past the last that a strided matrix reaches (`usize::MAX`
/// where that overflows, which no slice holds: the views' bound checks stand on this).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    (rows - 1)
        .checked_mul(rs)
        .zip((cols - 1).checked_mul(cs))
        .and_then(|(a, b)| a.checked_add(b)?.checked_add(1))
        .unwrap_or(usize::MAX)
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix whose rows are `rs` elements apart.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self::strided(data, rows, cols, rs, 1)
    }

    fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(span(rows, cols, rs, cs) <= data.len(), "matrix view outside its slice");
        MatRef { data, rows, cols, rs, cs }
    }

    /// The transpose (a view of the same elements).
    pub(crate) fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Rows of the matrix.
    pub(crate) fn nrows(&self) -> usize {
        self.rows
    }
}

impl<'a> MatMut<'a> {
    /// A row-major `rows x cols` matrix whose rows are `rs` elements apart.
    pub(crate) fn rows(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(cols <= rs || rows <= 1, "rows of a writable matrix overlap");
        assert!(span(rows, cols, rs, 1) <= data.len(), "matrix view outside its slice");
        MatMut { data, rows, cols, rs, cs: 1 }
    }

    /// The transpose (a view of the same elements: columns `rs` apart, rows contiguous).
    pub(crate) fn t(self) -> Self {
        MatMut { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }
}

/// `c = a · b`, or `c += a · b` when `accumulate`, in f32 on the rayon pool. The summation order
/// depends only on the shapes and the machine's cache sizes, so reruns give the same bits.
pub(crate) fn matmul(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    crate::pool::install(|| matmul_on(c, a, b, accumulate, rayon::current_num_threads()))
}

/// [`matmul`] on the calling thread alone (a task among others on the pool): the same bits,
/// as the crate's summation order does not depend on its threads.
pub(crate) fn matmul_single(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    matmul_on(c, a, b, accumulate, 1)
}

/// [`matmul`] on `threads` threads of the pool this thread reaches (see [`crate::pool`]).
fn matmul_on(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: usize) {
    assert!(a.rows == c.rows && b.cols == c.cols && a.cols == b.rows, "matmul shapes disagree");
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[i * c.rs + j * c.cs] = 0.0;
                }
            }
        }
        return;
    }
    let threads = threads.max(1);
    // SAFETY: `a`, `b` and `c` were checked at construction to reach only elements inside their
    // slices for their shapes and strides, and a transpose reaches the same elements (strides fit
    // in isize: they index a slice); the shapes agree (checked above); `c` is an exclusive
    // borrow, so it overlaps neither input. The crate computes dst = alpha * dst + beta * lhs *
    // rhs, reading dst only when `read_dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            c.cs as isize,
            c.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_that_overflows_is_past_every_slice() {
        assert_eq!(span(3, 4, 4, 1), 12);
        assert_eq!(span(0, 4, 4, 1), 0);
        assert_eq!(span(usize::MAX / 2, 2, 3, 1), usize::MAX);
        assert_eq!(span(2, 2, usize::MAX, 1), usize::MAX);
        let data = [0f32; 4];
        let wrap = std::panic::catch_unwind(|| MatRef::strided(&data, 2, 2, usize::MAX, 1));
        assert!(wrap.is_err(), "a view whose span wraps must be refused");
    }

    #[test]
    fn strided_products_match_a_plain_loop() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        // b stored transposed (n x k), used as k x n
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        // c inside a wider buffer (row stride 9) with a known starting value
        let mut c = vec![1.0f32; m * 9];
        matmul(MatMut::rows(&mut c, m, n, 9), MatRef::rows(&a, m, k, k), MatRef::rows(&bt, n, k, k).t(), true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f32>();
                assert!((c[i * 9 + j] - want).abs() <= 1e-5, "({i}, {j}): {} vs {want}", c[i * 9 + j]);
            }
            assert!(c[i * 9 + n..i * 9 + 9].iter().all(|&x| x == 1.0), "outside the view untouched");
        }
        matmul(MatMut::rows(&mut c, m, n, 9), MatRef::rows(&a, m, 0, 0), MatRef::rows(&bt, 0, n, n), false);
        assert!(c.chunks(9).all(|r| r[..n].iter().all(|&x| x == 0.0)), "k = 0 without accumulate zeroes c");
    }

    #[test]
    fn a_transposed_destination_gets_the_transposed_product() {
        let (m, n, k) = (4, 6, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.29).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.13).cos()).collect();
        // c^T stored row-major (n x m, row stride 7): c = a · b written through the transpose
        let mut ct = vec![2.0f32; n * 7];
        matmul(MatMut::rows(&mut ct, n, m, 7).t(), MatRef::rows(&a, m, k, k), MatRef::rows(&b, k, n, n), true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 2.0 + (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f32>();
                assert!((ct[j * 7 + i] - want).abs() <= 1e-5, "({i}, {j}): {} vs {want}", ct[j * 7 + i]);
            }
        }
        assert!(ct.chunks(7).all(|r| r[m..].iter().all(|&x| x == 2.0)), "outside the view untouched");
        matmul(MatMut::rows(&mut ct, n, m, 7).t(), MatRef::rows(&a, m, 0, 0), MatRef::rows(&b, 0, n, n), false);
        assert!(ct.chunks(7).all(|r| r[..m].iter().all(|&x| x == 0.0)), "k = 0 without accumulate zeroes c");
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn a_view_past_its_slice_is_refused() {
        let d = [0f32; 10];
        let _ = MatRef::rows(&d, 3, 4, 4);
    }
}

//! Transposition of a column-major block of f32 into row-major rows, in registers: the fused
//! linear path's logits come out of the GEMM column-major and go into the rows pass row-major.
//! AVX-512 transposes 16 × 16 elements per block (four rounds of shuffles), AVX2 four blocks of
//! 8 × 8 (three rounds). A transposition moves values and the optional bias is one f32 addition
//! per element, so the result is the same bits as the scalar loop's.

use std::arch::x86_64::*;

/// `rows[i][j] = src[i + j * m] (+ bias[j])` for `i < 16`, `j < n / 16 * 16`; returns the
/// columns done. AVX-512.
///
/// # Safety
/// The CPU has AVX-512F; `src` holds `(n − 1) · m + 16` elements, `rows` 16 rows of at least
/// `n`, `bias` (when given) `n`, and `m ≥ 16` (checked by the caller, `Kernels::transpose16`).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16_512(
    src: &[f32],
    m: usize,
    rows: &mut [&mut [f32]],
    n: usize,
    bias: Option<&[f32]>,
) -> usize {
    let full = n / 16 * 16;
    for j0 in (0..full).step_by(16) {
        // SAFETY: column j0 + j of the block starts at (j0 + j) · m, and its 16 elements end at
        // most at (n − 1) · m + 16 (the caller's bound on `src`).
        let r: [__m512; 16] = std::array::from_fn(|j| unsafe { _mm512_loadu_ps(src.as_ptr().add((j0 + j) * m)) });
        // pairs of rows interleaved element by element within each 128-bit lane
        let t: [__m512; 16] = std::array::from_fn(|x| {
            let (a, b) = (r[x & !1], r[x | 1]);
            if x % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4q + e], lane L: element 4L + e of columns 4q .. 4q + 4
        let u: [__m512; 16] = std::array::from_fn(|x| {
            let (q, e) = (x / 4, x % 4);
            let a = _mm512_castps_pd(t[4 * q + e / 2]);
            let b = _mm512_castps_pd(t[4 * q + 2 + e / 2]);
            _mm512_castpd_ps(if e % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
        });
        let b = bias.map(|b| unsafe { _mm512_loadu_ps(b.as_ptr().add(j0)) });
        for e in 0..4 {
            let (a, bb, c, d) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
            let v0 = _mm512_shuffle_f32x4::<0x44>(a, bb);
            let v1 = _mm512_shuffle_f32x4::<0xEE>(a, bb);
            let v2 = _mm512_shuffle_f32x4::<0x44>(c, d);
            let v3 = _mm512_shuffle_f32x4::<0xEE>(c, d);
            // output rows e, 4 + e, 8 + e, 12 + e
            let out = [
                _mm512_shuffle_f32x4::<0x88>(v0, v2),
                _mm512_shuffle_f32x4::<0xDD>(v0, v2),
                _mm512_shuffle_f32x4::<0x88>(v1, v3),
                _mm512_shuffle_f32x4::<0xDD>(v1, v3),
            ];
            for (l, row) in out.into_iter().enumerate() {
                let row = match b {
                    Some(b) => _mm512_add_ps(row, b),
                    None => row,
                };
                // SAFETY: row 4l + e < 16, columns j0 .. j0 + 16 ≤ n: within the row.
                unsafe { _mm512_storeu_ps(rows[4 * l + e].as_mut_ptr().add(j0), row) };
            }
        }
    }
    full
}

/// [`transpose16_512`] with AVX2: each 16 × 16 block as four 8 × 8 ones.
///
/// # Safety
/// As [`transpose16_512`], with AVX instead of AVX-512F.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn transpose16_256(
    src: &[f32],
    m: usize,
    rows: &mut [&mut [f32]],
    n: usize,
    bias: Option<&[f32]>,
) -> usize {
    let full = n / 16 * 16;
    for j0 in (0..full).step_by(8) {
        let b = bias.map(|b| unsafe { _mm256_loadu_ps(b.as_ptr().add(j0)) });
        for i0 in [0, 8] {
            // SAFETY: as in transpose16_512, for rows i0 .. i0 + 8 ≤ 16 of columns j0 .. j0 + 8.
            let r: [__m256; 8] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(src.as_ptr().add((j0 + j) * m + i0)) });
            let t: [__m256; 8] = std::array::from_fn(|x| {
                let (a, b) = (r[x & !1], r[x | 1]);
                if x % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let u: [__m256; 8] = std::array::from_fn(|x| {
                let (q, e) = (x / 4, x % 4);
                let a = _mm256_castps_pd(t[4 * q + e / 2]);
                let b = _mm256_castps_pd(t[4 * q + 2 + e / 2]);
                _mm256_castpd_ps(if e % 2 == 0 { _mm256_unpacklo_pd(a, b) } else { _mm256_unpackhi_pd(a, b) })
            });
            for e in 0..4 {
                let out =
                    [_mm256_permute2f128_ps::<0x20>(u[e], u[4 + e]), _mm256_permute2f128_ps::<0x31>(u[e], u[4 + e])];
                for (l, row) in out.into_iter().enumerate() {
                    let row = match b {
                        Some(b) => _mm256_add_ps(row, b),
                        None => row,
                    };
                    // SAFETY: row i0 + 4l + e < 16, columns j0 .. j0 + 8 ≤ n: within the row.
                    unsafe { _mm256_storeu_ps(rows[i0 + 4 * l + e].as_mut_ptr().add(j0), row) };
                }
            }
        }
    }
    full
}

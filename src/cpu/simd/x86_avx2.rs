//! The AVX2 statistics loop in intrinsics: the lane code's arithmetic and summation order (so the
//! same bits as [`exp_sum_max_body`](super::lanes::exp_sum_max_body) and its 16-bit blocks), with
//! 16-bit input widened in registers instead of through a stack buffer.

use super::lanes::hsum;
use super::math::*;
use super::x86::SideLines;
use super::{Ahead, LANES};
use std::arch::x86_64::*;

/// `exp` of 8 lanes that are at least `EXP_LO` or NaN: the lane code's [`exp`] with FMA, to the
/// bit, for those lanes. Callers clamp below `EXP_LO` first and mask those lanes to 0 after, only
/// for steps that have such a lane (the clamp and the mask change nothing for the others).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp8<const SHORT: bool>(xc: __m256) -> __m256 {
    let c = |k: f32| _mm256_set1_ps(k);
    let t = _mm256_fmadd_ps(xc, c(LOG2E), c(ROUND_MAGIC));
    let n = _mm256_sub_ps(t, c(ROUND_MAGIC));
    let f = _mm256_fmsub_ps(xc, c(LOG2E), n);
    let p = if SHORT {
        let p = _mm256_fmadd_ps(c(S4), f, c(S3));
        let p = _mm256_fmadd_ps(p, f, c(S2));
        _mm256_fmadd_ps(p, f, c(S1))
    } else {
        let mut p = _mm256_fmadd_ps(c(P6), f, c(P5));
        p = _mm256_fmadd_ps(p, f, c(P4));
        p = _mm256_fmadd_ps(p, f, c(P3));
        p = _mm256_fmadd_ps(p, f, c(P2));
        _mm256_fmadd_ps(p, f, c(P1))
    };
    let p = _mm256_fmadd_ps(p, f, c(1.0));
    let y = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32::<23>(_mm256_castps_si256(t)));
    _mm256_castsi256_ps(y)
}

/// Sums and maxima of 16 lanes as two halves.
struct Acc {
    sum: [__m256; 2],
    top: [__m256; 2],
}

impl Acc {
    #[target_feature(enable = "avx2")]
    #[inline]
    fn new() -> Acc {
        Acc { sum: [_mm256_setzero_ps(); 2], top: [_mm256_set1_ps(f32::NEG_INFINITY); 2] }
    }

    /// Spills the lanes for the scalar tail and the fixed-order reductions.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn lanes(&self) -> ([f32; LANES], [f32; LANES]) {
        let (mut s, mut t) = ([0f32; LANES], [0f32; LANES]);
        // SAFETY: each array holds 16 f32, two halves of 8.
        unsafe {
            _mm256_storeu_ps(s.as_mut_ptr(), self.sum[0]);
            _mm256_storeu_ps(s.as_mut_ptr().add(8), self.sum[1]);
            _mm256_storeu_ps(t.as_mut_ptr(), self.top[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), self.top[1]);
        }
        (s, t)
    }
}

/// The 16-lane steps of `x[..n]` (`load(i)` gives elements `i..i + 8` as f32), then the tail
/// element by element as the lane code does it; returns the lanes' `(sum, top)`.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
fn steps<const SHORT: bool>(
    n: usize,
    load: impl Fn(usize) -> __m256,
    scalar: impl Fn(usize) -> f32,
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
    first_step: usize,
    mut side: impl FnMut(usize),
) -> ([f32; LANES], [f32; LANES]) {
    let mut a = Acc::new();
    let sh = _mm256_set1_ps(shift);
    let lo = _mm256_set1_ps(EXP_LO);
    let body = n / LANES * LANES;
    assert!(out.len() >= n);
    for (j, i) in (0..body).step_by(LANES).enumerate() {
        ahead.line(first_step + j);
        let v = [load(i), load(i + 8)];
        let x = [_mm256_sub_ps(v[0], sh), _mm256_sub_ps(v[1], sh)];
        // below EXP_LO: EXP_LO, then 0 by the mask; NaN compares unordered, so its lane is kept
        // (and max passes it on). Both change nothing unless a lane is below EXP_LO.
        let keep = [_mm256_cmp_ps::<_CMP_NLT_UQ>(x[0], lo), _mm256_cmp_ps::<_CMP_NLT_UQ>(x[1], lo)];
        let above = _mm256_movemask_ps(keep[0]) & _mm256_movemask_ps(keep[1]) == 0xff;
        for h in 0..2 {
            a.top[h] = _mm256_max_ps(v[h], a.top[h]);
            let e = if above {
                exp8::<SHORT>(x[h])
            } else {
                _mm256_and_ps(exp8::<SHORT>(_mm256_max_ps(lo, x[h])), keep[h])
            };
            // SAFETY: i + 8h + 8 <= body <= n <= out.len().
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * h), e) };
            a.sum[h] = _mm256_add_ps(a.sum[h], e);
        }
        side(j);
    }
    let (mut acc, mut top) = a.lanes();
    for i in 0..n - body {
        let v = scalar(body + i);
        top[i] = if v > top[i] { v } else { top[i] };
        out[body + i] = exp::<true, SHORT>(v - shift);
        acc[i] += out[body + i];
    }
    (acc, top)
}

/// The maximum of the lanes, NaN skipped.
#[inline]
fn fold_max(top: &[f32; LANES]) -> f32 {
    top.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `out = exp(x - shift)`, returning `(sum, max x)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_max_256(x: &[f32], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
    // SAFETY (each load): i + 8 <= the 16-lane body of x.
    let load = |i: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
    let (acc, top) = steps::<false>(x.len(), load, |i| x[i], shift, out, ahead, 0, |_| {});
    (hsum(acc), fold_max(&top))
}

/// [`exp_sum_max_256`] with the scaled store of `side` in the same loop, one 16-element step of
/// each per iteration (the store's memory traffic under the arithmetic): the same bits as
/// `exp_sum_max_256` and then `scale_f32_256`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_max_side_256(
    x: &[f32],
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
    side: super::Side<'_>,
) -> (f32, f32) {
    // SAFETY (each load): i + 8 <= the 16-lane body of x.
    let load = |i: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
    let mut lines = SideLines::new(side);
    let (acc, top) = steps::<false>(x.len(), load, |i| x[i], shift, out, ahead, 0, |j| lines.line256(j));
    lines.finish(x.len() / LANES, |l, j| l.line256(j));
    (hsum(acc), fold_max(&top))
}

/// The same over 16-bit input, in blocks of 256 as the lane code (each block's sum and maximum
/// taken apart, then added in order), widened in registers by `widen` (8 elements at `p`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn exp_sum_max_bits(
    x: &[u16],
    widen: impl Fn(*const u16) -> __m256,
    scalar: impl Fn(u16) -> f32,
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    let (mut sum, mut top) = (0f32, f32::NEG_INFINITY);
    for (b, (xs, os)) in x.chunks(256).zip(out.chunks_mut(256)).enumerate() {
        // each load reads 8 elements inside the block's 16-lane body
        let load = |i: usize| widen(xs[i..i + 8].as_ptr());
        let (acc, t) = steps::<true>(xs.len(), load, |i| scalar(xs[i]), shift, os, ahead, b * 256 / LANES, |_| {});
        sum += hsum(acc);
        let t = fold_max(&t);
        top = if t > top { t } else { top };
    }
    (sum, top)
}

/// [`exp_sum_max_256`] over bf16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_max_bf16_256(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
    let widen = |p: *const u16| {
        // SAFETY: callers pass a pointer to 8 readable elements.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    };
    exp_sum_max_bits(x, widen, |b| f32::from_bits((b as u32) << 16), shift, out, ahead)
}

/// [`exp_sum_max_256`] over f16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_max_f16_256(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
    let widen = |p: *const u16| {
        // SAFETY: callers pass a pointer to 8 readable elements.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_cvtph_ps(h)
    };
    exp_sum_max_bits(x, widen, |b| half::f16::from_bits(b).to_f32(), shift, out, ahead)
}

//! The AVX2 statistics loop in intrinsics: the lane code's arithmetic and summation order (so the
//! same bits as [`exp_sum_body`](super::lanes::exp_sum_body) and its 16-bit form), with
//! 16-bit input widened in registers instead of through a stack buffer.

use super::lanes::{exp_opts_bits_body, exp_opts_body, f16_widen, hsum, widen_bf16_body, ElemOpts};
use super::math::*;
use super::x86_side::{with_lines, SideKind, SideLines, StatsLoop};
use super::{Ahead, Input, LANES};
use std::arch::x86_64::*;

/// `exp` of 8 lanes in `[EXP_LO, EXP_HI]` or NaN: the lane code's [`exp`] with FMA, to the bit,
/// for those lanes. Callers clamp to `EXP_HI` first, and below `EXP_LO` clamp and mask those
/// lanes to 0 after, only for steps that have such a lane (the clamp and the mask change nothing
/// for the others).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp8<const SHORT: bool>(xc: __m256) -> __m256 {
    let c = |k: f32| _mm256_set1_ps(k);
    let t = _mm256_fmadd_ps(xc, c(LOG2E), c(EXP_MAGIC));
    let n = _mm256_sub_ps(t, c(EXP_MAGIC));
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
    // p · 2^n as the lane code takes it (see `exp`): NaN stays NaN
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(t))))
}

/// Sums and (for label smoothing) sums of the elements of 16 lanes as two halves.
struct Acc {
    sum: [__m256; 2],
    zsum: [__m256; 2],
}

impl Acc {
    #[target_feature(enable = "avx2")]
    #[inline]
    fn new() -> Acc {
        let zero = _mm256_setzero_ps();
        Acc { sum: [zero; 2], zsum: [zero; 2] }
    }

    /// Spills the lanes for the scalar tail and the fixed-order reductions.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn lanes<const ZSUM: bool>(&self) -> Lanes {
        let mut l = Lanes { sum: [0f32; LANES], zsum: [0f32; LANES] };
        let spill = |v: &[__m256; 2], a: &mut [f32; LANES]| {
            // SAFETY: each array holds 16 f32, two halves of 8.
            unsafe {
                _mm256_storeu_ps(a.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(a.as_mut_ptr().add(8), v[1]);
            }
        };
        spill(&self.sum, &mut l.sum);
        if ZSUM {
            spill(&self.zsum, &mut l.zsum);
        }
        l
    }
}

/// [`Acc`] spilled: 16 lanes each.
struct Lanes {
    sum: [f32; LANES],
    zsum: [f32; LANES],
}

impl Lanes {
    /// `(sum, sum of the elements)`, reduced in the lane code's order (the second 0 unless
    /// `ZSUM`).
    fn reduce<const ZSUM: bool>(&self) -> (f32, f32) {
        (hsum(self.sum), if ZSUM { hsum(self.zsum) } else { 0.0 })
    }
}

/// The 16-lane steps of `x[..n]` (`load(i)` gives elements `i..i + 8` as f32), then the tail
/// element by element as the lane code does it; returns the lanes (the elements less the shift
/// summed too when `ZSUM`, as the lane code's options loop does for label smoothing).
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
fn steps<const SHORT: bool, const ZSUM: bool>(
    n: usize,
    load: impl Fn(usize) -> __m256,
    scalar: impl Fn(usize) -> f32,
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
    mut side: impl FnMut(usize),
) -> Lanes {
    let mut a = Acc::new();
    let sh = _mm256_set1_ps(shift);
    let lo = _mm256_set1_ps(EXP_LO);
    let hi = _mm256_set1_ps(EXP_HI);
    let body = n / LANES * LANES;
    assert!(out.len() >= n);
    for (j, i) in (0..body).step_by(LANES).enumerate() {
        ahead.line(j);
        let v = [load(i), load(i + 8)];
        let x = [_mm256_sub_ps(v[0], sh), _mm256_sub_ps(v[1], sh)];
        // above EXP_HI: EXP_HI, as the lane code (`vminps` passes its second operand, a NaN x, on)
        let xh = [_mm256_min_ps(hi, x[0]), _mm256_min_ps(hi, x[1])];
        // below EXP_LO: EXP_LO, then 0 by the mask; NaN compares unordered, so its lane is kept
        // (and max passes it on). Both change nothing unless a lane is below EXP_LO.
        let keep = [_mm256_cmp_ps::<_CMP_NLT_UQ>(x[0], lo), _mm256_cmp_ps::<_CMP_NLT_UQ>(x[1], lo)];
        let above = _mm256_movemask_ps(keep[0]) & _mm256_movemask_ps(keep[1]) == 0xff;
        for h in 0..2 {
            let e = if above {
                exp8::<SHORT>(xh[h])
            } else {
                _mm256_and_ps(exp8::<SHORT>(_mm256_max_ps(lo, xh[h])), keep[h])
            };
            // SAFETY: i + 8h + 8 <= body <= n <= out.len().
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * h), e) };
            a.sum[h] = _mm256_add_ps(a.sum[h], e);
            if ZSUM {
                a.zsum[h] = _mm256_add_ps(a.zsum[h], x[h]);
            }
        }
        side(j);
    }
    let mut l = a.lanes::<ZSUM>();
    for i in 0..n - body {
        let v = scalar(body + i);
        out[body + i] = exp::<true, SHORT>(v - shift);
        l.sum[i] += out[body + i];
        if ZSUM {
            l.zsum[i] += v - shift;
        }
    }
    l
}

/// `out = exp(x - shift)`, returning the sum.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_256(x: &[f32], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
    f32_steps::<false>(x, shift, out, ahead).0
}

/// [`exp_sum_256`], and the sum of the elements when `ZSUM`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f32_steps<const ZSUM: bool>(x: &[f32], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
    // SAFETY (each load): i + 8 <= the 16-lane body of x.
    let load = |i: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
    steps::<false, ZSUM>(x.len(), load, |i| x[i], shift, out, ahead, |_| {}).reduce::<ZSUM>()
}

/// [`exp_sum_256`] (or its 16-bit forms) with the store of `side` in the same loop, one 64-byte
/// line of it per 64 bytes of the store (the store's memory traffic under the arithmetic): the
/// same bits as the two calls one after the other.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_side_256(
    x: Input<'_>,
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
    side: super::Side<'_>,
) -> f32 {
    let lines = SideLines::new(side);
    // SAFETY: this function has the features of the loop and of every line.
    unsafe {
        match lines.kind() {
            (SideKind::F32, _) => with_lines::<Loop256>(x, shift, out, ahead, lines, |l, j| l.line256(j)),
            (SideKind::Bf16, true) => {
                with_lines::<Loop256>(x, shift, out, ahead, lines, |l, j| l.line256_bf16::<true>(j))
            }
            (SideKind::Bf16, false) => {
                with_lines::<Loop256>(x, shift, out, ahead, lines, |l, j| l.line256_bf16::<false>(j))
            }
            (SideKind::F16, _) => with_lines::<Loop256>(x, shift, out, ahead, lines, |l, j| l.line256_f16(j)),
        }
    }
}

/// The AVX2 statistics loop.
struct Loop256;

impl StatsLoop for Loop256 {
    #[inline(always)]
    unsafe fn run(x: Input<'_>, shift: f32, out: &mut [f32], ahead: Ahead, side: impl FnMut(usize)) -> f32 {
        // SAFETY: the caller has the features (the trait's contract).
        unsafe { input_with(x, shift, out, ahead, side) }
    }
}

/// The statistics loop of `x` (f32, bf16 or f16) with `side(j)` after each 16-element step.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn input_with(x: Input<'_>, shift: f32, out: &mut [f32], ahead: Ahead, side: impl FnMut(usize)) -> f32 {
    match x {
        Input::F32(x) => {
            // SAFETY (each load): i + 8 <= the 16-lane body of x.
            let load = |i: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            steps::<false, false>(x.len(), load, |i| x[i], shift, out, ahead, side).reduce::<false>().0
        }
        Input::Bf16(b) => exp_sum_bits::<false>(b, |p| widen_bf16x8(p), bf16_scalar, shift, out, ahead, side).0,
        Input::F16(b) => exp_sum_bits::<false>(b, |p| widen_f16x8(p), f16_widen, shift, out, ahead, side).0,
    }
}

/// The same over 16-bit input, widened in registers by `widen` (8 elements at `p`): the lane
/// code's bits, whose blocks are summed in the same lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
fn exp_sum_bits<const ZSUM: bool>(
    x: &[u16],
    widen: impl Fn(*const u16) -> __m256,
    scalar: impl Fn(u16) -> f32,
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
    side: impl FnMut(usize),
) -> (f32, f32) {
    // each load reads 8 elements inside the 16-lane body
    let load = |i: usize| widen(x[i..i + 8].as_ptr());
    steps::<true, ZSUM>(x.len(), load, |i| scalar(x[i]), shift, out, ahead, side).reduce::<ZSUM>()
}

/// 8 bf16 at `p` widened (callers pass a pointer to 8 readable elements): the 16 bytes loaded
/// into both 128-bit halves, each of which places its four elements in the high words of its
/// lanes with one byte shuffle (a widening move and a shift took two instructions).
#[target_feature(enable = "avx2")]
#[inline]
fn widen_bf16x8(p: *const u16) -> __m256 {
    // SAFETY: 8 readable elements at p (the callers' contract).
    let h = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast())) };
    let high_words = _mm256_setr_epi8(
        -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, //
        -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15,
    );
    _mm256_castsi256_ps(_mm256_shuffle_epi8(h, high_words))
}

/// 8 f16 at `p` widened (callers pass a pointer to 8 readable elements).
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn widen_f16x8(p: *const u16) -> __m256 {
    // SAFETY: 8 readable elements at p (the callers' contract).
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

fn bf16_scalar(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// [`exp_sum_256`] over bf16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_bf16_256(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
    exp_sum_bits::<false>(x, |p| widen_bf16x8(p), bf16_scalar, shift, out, ahead, |_| {}).0
}

/// [`exp_sum_256`] over f16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum_f16_256(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
    exp_sum_bits::<false>(x, |p| widen_f16x8(p), f16_widen, shift, out, ahead, |_| {}).0
}

/// Whether the options are label smoothing alone (the case these intrinsics take).
fn smoothing_alone(o: ElemOpts) -> bool {
    o.cap == 0.0 && o.sum
}

/// The statistics loop under per-element options: label smoothing alone (the elements summed
/// beside the plain loop) in these intrinsics, the lane code's bits; soft-capping in the lane
/// code ([`exp_opts_body`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_opts_256(
    x: &[f32],
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    if smoothing_alone(o) {
        return f32_steps::<true>(x, shift, out, ahead);
    }
    exp_opts_body::<true, false>(x, shift, o, out, chain, ahead)
}

/// [`exp_opts_256`] over 16-bit input: `widen8` and `scalar` as for [`exp_sum_bits`],
/// `widen` (a block at a time) for the lane code.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
fn opts_bits(
    x: &[u16],
    widen8: impl Fn(*const u16) -> __m256,
    scalar: impl Fn(u16) -> f32,
    widen: impl Fn(&[u16], &mut [f32]),
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    if smoothing_alone(o) {
        return exp_sum_bits::<true>(x, widen8, scalar, shift, out, ahead, |_| {});
    }
    exp_opts_bits_body::<true>(x, widen, shift, o, out, chain, ahead)
}

/// [`exp_opts_256`] over bf16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_opts_bf16_256(
    x: &[u16],
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    opts_bits(x, |p| widen_bf16x8(p), bf16_scalar, widen_bf16_body, shift, o, out, chain, ahead)
}

/// [`exp_opts_256`] over f16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_opts_f16_256(
    x: &[u16],
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    // SAFETY: this function has the conversion's features (avx2, f16c).
    let widen = |s: &[u16], d: &mut [f32]| unsafe { super::x86::widen_f16_256(s, d) };
    opts_bits(x, |p| widen_f16x8(p), f16_widen, widen, shift, o, out, chain, ahead)
}

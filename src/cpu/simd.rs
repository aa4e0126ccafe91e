//! The vector primitives a row is built from, with a vectorised `exp`, and their run-time
//! dispatch. This module is the CPU backend's one `unsafe` boundary.
//!
//! Most primitives are written once, over fixed-width lane arrays the compiler turns into
//! vector instructions, and compiled per level: AVX-512 (`avx512f/bw/vl/dq` with FMA and F16C),
//! AVX2 with FMA and F16C, and portable (the build's baseline: SSE2 on x86-64, NEON on aarch64). The best
//! level this CPU has is chosen at run time ([`CpuSimd::Auto`]); no `-C target-cpu` is needed.
//! Explicit intrinsics are used where the lane code cannot say what is needed: streaming
//! (non-temporal) stores, which write the gradient without first reading its cache lines; the
//! F16C and AVX-512 BF16 conversions; and the AVX-512 `exp` loop (`vscalefps`), the hottest loop.
//!
//! Why not a SIMD crate: the kernels need streaming stores, hardware half-precision conversions
//! and a fixed 16-lane summation order, which the portable-SIMD crates do not expose; lane
//! arrays plus one `#[target_feature]` instantiation per level keep most code to one body.
//!
//! Each level sums in a fixed order (16 lanes; 16-bit input on the lane-code levels in blocks of
//! 256 first); levels differ in that, in FMA and in the AVX-512 `exp`, so results are
//! bit-identical for a given level on any machine (whatever the thread count or buffer
//! alignment), and [`CpuSimd::Portable`] gives the same bits on every CPU.
//!
//! # `exp` and its error bound
//!
//! `exp(x)` for `x <= 20` (callers subtract a running reference within 20 of the row maximum),
//! as `2^y` with `y = x·log2(e)`: `n = round(y)` by the 1.5·2²³ rounding trick, `f = y - n` in
//! `[-1/2, 1/2]` (one rounding where the level has FMA), `2^f` by a polynomial fitted here for
//! relative error on `[-1/2, 1/2]`, and `2^n` added to the exponent field (AVX2, portable) or
//! applied by `vscalefps` (AVX-512). The polynomial is matched to the logits' precision: degree 6
//! (1.3 ulp in f32 Horner form) for f32 logits, degree 4 (2.9e-6) for f16/bf16 logits, whose own
//! rounding is 2^-12 / 2^-9. The reduction adds a relative error of about `|y|·2^-24`, so the
//! total stays within `2 ulp + |x|·1e-7` for f32 logits (test `exp_error_bound`) and
//! `3e-6 + |x|·1e-7` for 16-bit logits (test `exp_of_16_bit_input_within_the_short_bound`).
//! Tiny results differ by level: AVX2 and portable return exactly 0 below `x = -86.6`, AVX-512
//! returns subnormals down to `x = -103` and exactly 0 below; both are under 2.4e-38, less than
//! one part in 1e37 of a row sum (which is at least 1). `exp(-inf) = 0` and NaN in gives NaN out
//! at every level.

use crate::spec::CpuSimd;

/// Lanes per step: 16 f32 (one AVX-512 register, two AVX2 registers, four NEON registers).
pub(crate) const LANES: usize = 16;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this (`-125 ln 2`), `exp` returns 0.
const EXP_LO: f32 = -125.0 * std::f32::consts::LN_2;
/// `2^f` on `[-1/2, 1/2]`: coefficients of f^1..f^6 (f^0 is 1), a relative-error fit.
const P1: f32 = std::f32::consts::LN_2; // the fit lands on ln 2 itself
const P2: f32 = 0.240_226_48;
const P3: f32 = 0.055_503_286;
const P4: f32 = 0.009_618_46;
const P5: f32 = 0.001_339_993;
const P6: f32 = 0.000_153_533_2;
/// The short polynomial for 16-bit logits: f^1..f^4 (f^0 is 1), 2.9e-6 relative on `[-1/2, 1/2]`,
/// a thousand times finer than the inputs' own rounding (2^-9 for bf16, 2^-12 for f16).
const S1: f32 = 0.693_124_2;
const S2: f32 = 0.240_240_99;
const S3: f32 = 0.055_906_4;
const S4: f32 = 0.009_582_837;

/// `a * b + c`, fused when the level has FMA (`FMA = true`), two roundings otherwise.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `2^f` for `f` in `[-1/2, 1/2]`: degree 6, or degree 4 when `SHORT` (16-bit logits).
#[inline(always)]
fn pow2_frac<const FMA: bool, const SHORT: bool>(f: f32) -> f32 {
    if SHORT {
        let p = madd::<FMA>(S4, f, S3);
        let p = madd::<FMA>(p, f, S2);
        let p = madd::<FMA>(p, f, S1);
        return madd::<FMA>(p, f, 1.0);
    }
    let mut p = madd::<FMA>(P6, f, P5);
    p = madd::<FMA>(p, f, P4);
    p = madd::<FMA>(p, f, P3);
    p = madd::<FMA>(p, f, P2);
    p = madd::<FMA>(p, f, P1);
    madd::<FMA>(p, f, 1.0)
}

/// `exp(x)` for `x <= 20` or NaN; see the module docs for the method and the bound.
#[inline(always)]
pub(crate) fn exp<const FMA: bool, const SHORT: bool>(x: f32) -> f32 {
    // NaN compares false and passes through unchanged.
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let t = madd::<FMA>(xc, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let f = madd::<FMA>(xc, LOG2E, -n);
    let p = pow2_frac::<FMA, SHORT>(f);
    // 2^n * p by adding n to p's exponent field (an integer add, not a multiply): t's bits are
    // 0x4B40_0000 + n, whose low 9 bits shifted left by 23 leave exactly n << 23. p is in
    // [0.70, 1.42] and n >= -125, so the result is a normal number.
    let y = f32::from_bits(p.to_bits().wrapping_add(t.to_bits() << 23));
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

// ---- the primitives, once, over lane arrays -------------------------------------------------

/// Maximum of `x`, NaN entries skipped (`-inf` for an empty slice).
#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    for &v in it.remainder() {
        acc[0] = if v > acc[0] { v } else { acc[0] };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Sums the lane accumulators in a fixed pairwise order.
#[inline(always)]
fn hsum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `out = exp(x - shift)`; returns `sum(out)` and `max(x)` (NaN skipped). `out` may be longer
/// than `x`. `x - shift` may be positive up to ~88 (the caller keeps it below 20).
#[inline(always)]
fn exp_sum_max_body<const FMA: bool, const SHORT: bool>(
    x: &[f32],
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    let out = &mut out[..x.len()];
    let mut acc = [0f32; LANES];
    let mut top = [f32::NEG_INFINITY; LANES];
    let mut xi = x.chunks_exact(LANES);
    let mut oi = out.chunks_exact_mut(LANES);
    for (j, (c, o)) in (&mut xi).zip(&mut oi).enumerate() {
        ahead.line(j);
        for i in 0..LANES {
            top[i] = if c[i] > top[i] { c[i] } else { top[i] };
            o[i] = exp::<FMA, SHORT>(c[i] - shift);
            acc[i] += o[i];
        }
    }
    for (i, (&v, o)) in xi.remainder().iter().zip(oi.into_remainder()).enumerate() {
        top[i] = if v > top[i] { v } else { top[i] };
        *o = exp::<FMA, SHORT>(v - shift);
        acc[i] += *o;
    }
    (hsum(acc), top.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m }))
}

/// `exp_sum_max` of 16-bit input (short polynomial): widened a block at a time into a stack
/// buffer.
#[inline(always)]
fn exp_sum_max_bits_body<const FMA: bool>(
    x: &[u16],
    widen: impl Fn(&[u16], &mut [f32]),
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    let mut buf = [0f32; 256];
    let (mut sum, mut top) = (0f32, f32::NEG_INFINITY);
    for (b, (xs, os)) in x.chunks(256).zip(out.chunks_mut(256)).enumerate() {
        let w = &mut buf[..xs.len()];
        widen(xs, w);
        let (s, t) = exp_sum_max_body::<FMA, true>(w, shift, os, ahead.skip(b * 256 / LANES));
        sum += s;
        top = if t > top { t } else { top };
    }
    (sum, top)
}

/// Memory to prefetch while computing, spread through the loop so that the loads are in flight
/// while the arithmetic runs (a burst of prefetches at once overflows the miss queues and is
/// dropped): step `j` of a 16-lane loop over the same element type asks for the line holding
/// step `j`'s elements of the region, once per 64-byte line.
#[derive(Clone, Copy)]
pub(crate) struct Ahead {
    start: *const u8,
    bytes: usize,
    /// Bytes of the region per 16-lane step (16 elements of the input's type).
    step: usize,
}

impl Ahead {
    /// Nothing to prefetch.
    pub const NONE: Ahead = Ahead { start: std::ptr::null(), bytes: 0, step: 64 };

    /// The memory of `data` (never dereferenced: prefetching has no architectural effect).
    pub fn of<T>(data: &[T]) -> Ahead {
        Ahead { start: data.as_ptr().cast(), bytes: std::mem::size_of_val(data), step: 16 * std::mem::size_of::<T>() }
    }

    /// The same region from step `steps` on.
    #[inline(always)]
    fn skip(self, steps: usize) -> Ahead {
        let off = (steps * self.step).min(self.bytes);
        Ahead { start: self.start.wrapping_add(off), bytes: self.bytes - off, step: self.step }
    }

    #[inline(always)]
    fn line(self, j: usize) {
        let off = j * self.step;
        #[cfg(target_arch = "x86_64")]
        if off < self.bytes && off.is_multiple_of(64) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: prefetching never faults, whatever the address; SSE is x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.start.wrapping_add(off).cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = off;
    }
}

/// `out = x * f`. `out` may be longer than `x`.
#[inline(always)]
fn scale_body(x: &[f32], f: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * f;
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
fn widen_bf16_body(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s as u32) << 16);
    }
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays NaN (quietened); subnormal inputs
/// become a zero of the same sign, as the AVX-512 BF16 instruction does, so every level gives
/// the same bits. Otherwise the same bits as `half::bf16::from_f32`.
#[inline(always)]
fn bf16_round(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    let zero = ((b >> 16) & 0x8000) as u16;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else if b & 0x7F80_0000 == 0 {
        zero
    } else {
        rounded
    }
}

/// `out = bf16(x * f)`.
#[inline(always)]
fn scale_bf16_body(x: &[f32], f: f32, out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16_round(v * f);
    }
}

/// `out = f16(x * f)` (round to nearest even, as F16C does).
#[inline(always)]
fn scale_f16_body(x: &[f32], f: f32, out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = half::f16::from_f32(v * f).to_bits();
    }
}

/// f16 bits to f32 (exact).
#[inline(always)]
fn widen_f16_body(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(s).to_f32();
    }
}

// ---- one instantiation per level ------------------------------------------------------------

macro_rules! level {
    ($name:ident $(, $feat:literal)?) => {
        mod $name {
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn max(x: &[f32]) -> f32 {
                max_body(x)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn widen_bf16(src: &[u16], dst: &mut [f32]) {
                widen_bf16_body(src, dst)
            }
        }
    };
}

/// The lane-code `exp` loops of a level (AVX-512 has its own, `x86::exp_sum_max_*512`).
macro_rules! lane_exp {
    ($name:ident, $fma:literal $(, $feat:literal)?) => {
        mod $name {
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn exp_sum_max(x: &[f32], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
                exp_sum_max_body::<$fma, false>(x, shift, out, ahead)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn exp_sum_max_bf16(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
                exp_sum_max_bits_body::<$fma>(x, widen_bf16_body, shift, out, ahead)
            }
        }
    };
}

level!(portable);
lane_exp!(portable_exp, false);
#[cfg(target_arch = "x86_64")]
level!(avx2, "avx2,fma,f16c");
#[cfg(target_arch = "x86_64")]
lane_exp!(avx2_exp, true, "avx2,fma,f16c");
#[cfg(target_arch = "x86_64")]
level!(avx512, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");

/// The portable stores (no streaming; f16 through `half`).
mod portable_store {
    use super::*;
    pub(super) unsafe fn scale_f32(x: &[f32], f: f32, out: &mut [f32], _stream: bool) {
        scale_body(x, f, out)
    }
    pub(super) unsafe fn scale_bf16(x: &[f32], f: f32, out: &mut [u16], _stream: bool) {
        scale_bf16_body(x, f, out)
    }
    pub(super) unsafe fn scale_f16(x: &[f32], f: f32, out: &mut [u16], _stream: bool) {
        scale_f16_body(x, f, out)
    }
    pub(super) unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        widen_f16_body(src, dst)
    }
    pub(super) unsafe fn exp_sum_max_f16(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
        exp_sum_max_bits_body::<false>(x, widen_f16_body, shift, out, ahead)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Stores with streaming (non-temporal) writes on the aligned body of the output, and the
    //! F16C conversions. Heads and tails use the lane-code bodies, which give the same bits.
    use super::*;
    use std::arch::x86_64::*;

    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

    /// `(head, body)`: the elements before the vector body, then the body's length in whole
    /// `block`s. Streaming stores need `align`-byte alignment, so the head runs up to it; plain
    /// stores take any address, so there is no head.
    fn split<T>(out: &[T], n: usize, align: usize, block: usize, stream: bool) -> (usize, usize) {
        let head = if stream { out.as_ptr().align_offset(align).min(n) } else { 0 };
        (head, (n - head) / block * block)
    }

    /// Eight/sixteen f32 lanes rounded to bf16 bits in the low half of 32-bit lanes.
    macro_rules! bf16_lanes {
        ($v:expr, $cast:ident, $srli:ident, $and:ident, $add:ident, $or:ident, $set1:ident) => {{
            let b = $cast($v);
            let lsb = $and($srli::<16>(b), $set1(1));
            let rounded = $srli::<16>($add(b, $add(lsb, $set1(0x7FFF))));
            let nan = $or($srli::<16>(b), $set1(0x40));
            (b, rounded, nan)
        }};
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn bf16x16(v: __m512) -> __m256i {
        let (b, rounded, nan) = bf16_lanes!(
            v,
            _mm512_castps_si512,
            _mm512_srli_epi32,
            _mm512_and_si512,
            _mm512_add_epi32,
            _mm512_or_si512,
            _mm512_set1_epi32
        );
        let is_nan = _mm512_cmpgt_epi32_mask(
            _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF)),
            _mm512_set1_epi32(0x7F80_0000),
        );
        let is_sub = _mm512_testn_epi32_mask(b, _mm512_set1_epi32(0x7F80_0000));
        let zero = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x8000));
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_sub, _mm512_mask_blend_epi32(is_nan, rounded, nan), zero))
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn bf16x8(v: __m256) -> __m256i {
        let (b, rounded, nan) = bf16_lanes!(
            v,
            _mm256_castps_si256,
            _mm256_srli_epi32,
            _mm256_and_si256,
            _mm256_add_epi32,
            _mm256_or_si256,
            _mm256_set1_epi32
        );
        let is_nan =
            _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFF_FFFF)), _mm256_set1_epi32(0x7F80_0000));
        let is_sub = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F80_0000)), _mm256_setzero_si256());
        let zero = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x8000));
        _mm256_blendv_epi8(_mm256_blendv_epi8(rounded, nan, is_nan), zero, is_sub)
    }

    /// `exp` of 16 lanes: the same reduction and polynomial as [`exp`], with `2^n` applied by
    /// `vscalefps`, which also flushes `x < -87.3` to subnormals and 0 (`x <= -110` to exactly 0),
    /// so no compare-and-mask is needed; NaN propagates (`max` returns its second operand).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp16<const SHORT: bool>(x: __m512) -> __m512 {
        let xc = _mm512_max_ps(_mm512_set1_ps(-110.0), x);
        let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUND_MAGIC));
        let n = _mm512_sub_ps(t, _mm512_set1_ps(ROUND_MAGIC));
        let f = _mm512_fmsub_ps(xc, _mm512_set1_ps(LOG2E), n);
        let c = |k: f32| _mm512_set1_ps(k);
        let p = if SHORT {
            let p = _mm512_fmadd_ps(c(S4), f, c(S3));
            let p = _mm512_fmadd_ps(p, f, c(S2));
            _mm512_fmadd_ps(p, f, c(S1))
        } else {
            let mut p = _mm512_fmadd_ps(c(P6), f, c(P5));
            p = _mm512_fmadd_ps(p, f, c(P4));
            p = _mm512_fmadd_ps(p, f, c(P3));
            p = _mm512_fmadd_ps(p, f, c(P2));
            _mm512_fmadd_ps(p, f, c(P1))
        };
        _mm512_scalef_ps(_mm512_fmadd_ps(p, f, c(1.0)), n)
    }

    /// `exp_sum_max` over 16-lane steps, reading the input as `$elem` and widening each step
    /// in registers with `$load` (full step) / `$load_masked` (the partial last step).
    macro_rules! exp_sum_max_512 {
        ($name:ident, $elem:ty, $short:literal, |$p:ident| $load:expr, |$m:ident, $pm:ident| $load_masked:expr) => {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
            pub(super) unsafe fn $name(x: &[$elem], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
                let n = x.len().min(out.len());
                let sh = _mm512_set1_ps(shift);
                let (mut acc, mut top) = (_mm512_setzero_ps(), _mm512_set1_ps(f32::NEG_INFINITY));
                let body = n / 16 * 16;
                for (j, i) in (0..body).step_by(16).enumerate() {
                    ahead.line(j);
                    // SAFETY: i + 16 <= n, within both slices.
                    unsafe {
                        let $p = x.as_ptr().add(i);
                        let v: __m512 = $load;
                        top = _mm512_max_ps(v, top);
                        let e = exp16::<$short>(_mm512_sub_ps(v, sh));
                        _mm512_storeu_ps(out.as_mut_ptr().add(i), e);
                        acc = _mm512_add_ps(acc, e);
                    }
                }
                if body < n {
                    // the partial last step: masked load, store, sum and max
                    let $m: __mmask16 = (1u16 << (n - body)) - 1;
                    // SAFETY: the mask covers only body..n, within both slices.
                    unsafe {
                        let $pm = x.as_ptr().add(body);
                        let v: __m512 = $load_masked;
                        top = _mm512_mask_max_ps(top, $m, v, top);
                        let e = exp16::<$short>(_mm512_sub_ps(v, sh));
                        _mm512_mask_storeu_ps(out.as_mut_ptr().add(body), $m, e);
                        acc = _mm512_mask_add_ps(acc, $m, acc, e);
                    }
                }
                let (mut a, mut t) = ([0f32; LANES], [0f32; LANES]);
                // SAFETY: both arrays hold 16 f32.
                unsafe {
                    _mm512_storeu_ps(a.as_mut_ptr(), acc);
                    _mm512_storeu_ps(t.as_mut_ptr(), top);
                }
                (hsum(a), t.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m }))
            }
        };
    }

    exp_sum_max_512!(exp_sum_max_512, f32, false, |p| _mm512_loadu_ps(p), |m, p| _mm512_maskz_loadu_ps(m, p));
    exp_sum_max_512!(
        exp_sum_max_bf16_512,
        u16,
        true,
        |p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))),
        |m, p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
            m,
            p.cast()
        ))))
    );
    exp_sum_max_512!(exp_sum_max_f16_512, u16, true, |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())), |m, p| {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast()))
    });

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn scale_f32_512(x: &[f32], f: f32, out: &mut [f32], stream: bool) {
        let n = x.len().min(out.len());
        let (head, body) = split(out, n, 64, 16, stream);
        scale_body(&x[..head], f, &mut out[..head]);
        let fv = _mm512_set1_ps(f);
        for i in (head..head + body).step_by(16) {
            // SAFETY: i + 16 <= head + body <= n, within both slices; when streaming, out + i is
            // 64-byte aligned.
            unsafe {
                let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv);
                if stream {
                    _mm512_stream_ps(out.as_mut_ptr().add(i), v);
                } else {
                    _mm512_storeu_ps(out.as_mut_ptr().add(i), v);
                }
            }
        }
        scale_body(&x[head + body..n], f, &mut out[head + body..n]);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn scale_bf16_512(x: &[f32], f: f32, out: &mut [u16], stream: bool) {
        let n = x.len().min(out.len());
        let (head, body) = split(out, n, 64, 32, stream);
        scale_bf16_body(&x[..head], f, &mut out[..head]);
        let fv = _mm512_set1_ps(f);
        for i in (head..head + body).step_by(32) {
            // SAFETY: i + 32 <= head + body <= n, within both slices; when streaming, out + i is
            // 64-byte aligned.
            unsafe {
                let lo = bf16x16(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv));
                let hi = bf16x16(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), fv));
                let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                if stream {
                    _mm512_stream_si512(out.as_mut_ptr().add(i).cast(), v);
                } else {
                    _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
                }
            }
        }
        scale_bf16_body(&x[head + body..n], f, &mut out[head + body..n]);
    }

    /// As [`scale_bf16_512`], with the AVX-512 BF16 conversion instruction (same bits).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    pub(super) unsafe fn scale_bf16_512bf(x: &[f32], f: f32, out: &mut [u16], stream: bool) {
        let n = x.len().min(out.len());
        let (head, body) = split(out, n, 64, 32, stream);
        scale_bf16_body(&x[..head], f, &mut out[..head]);
        let fv = _mm512_set1_ps(f);
        for i in (head..head + body).step_by(32) {
            // SAFETY: i + 32 <= head + body <= n, within both slices; when streaming out + i is
            // 64-byte aligned.
            unsafe {
                let lo = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv);
                let hi = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), fv);
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                if stream {
                    _mm512_stream_si512(out.as_mut_ptr().add(i).cast(), v);
                } else {
                    _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
                }
            }
        }
        scale_bf16_body(&x[head + body..n], f, &mut out[head + body..n]);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn scale_f16_512(x: &[f32], f: f32, out: &mut [u16], stream: bool) {
        let n = x.len().min(out.len());
        let (head, body) = split(out, n, 64, 32, stream);
        scale_f16_body(&x[..head], f, &mut out[..head]);
        let fv = _mm512_set1_ps(f);
        for i in (head..head + body).step_by(32) {
            // SAFETY: i + 32 <= head + body <= n, within both slices; when streaming out + i is
            // 64-byte aligned.
            unsafe {
                let lo = _mm512_cvtps_ph::<NEAREST>(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv));
                let hi = _mm512_cvtps_ph::<NEAREST>(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), fv));
                let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                if stream {
                    _mm512_stream_si512(out.as_mut_ptr().add(i).cast(), v);
                } else {
                    _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
                }
            }
        }
        scale_f16_body(&x[head + body..n], f, &mut out[head + body..n]);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn widen_f16_512(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n / 16 * 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 <= n, within both slices.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        widen_f16_body(&src[body..n], &mut dst[body..n]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_f32_256(x: &[f32], f: f32, out: &mut [f32], stream: bool) {
        let n = x.len().min(out.len());
        let (head, body) = split(out, n, 32, 8, stream);
        scale_body(&x[..head], f, &mut out[..head]);
        let fv = _mm256_set1_ps(f);
        for i in (head..head + body).step_by(8) {
            // SAFETY: i + 8 <= head + body <= n, within both slices; when streaming, out + i is
            // 32-byte aligned.
            unsafe {
                let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), fv);
                if stream {
                    _mm256_stream_ps(out.as_mut_ptr().add(i), v);
                } else {
                    _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
                }
            }
        }
        scale_body(&x[head + body..n], f, &mut out[head + body..n]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_bf16_256(x: &[f32], f: f32, out: &mut [u16], stream: bool) {
        let n = x.len().min(out.len());
        let (head, body) = split(out, n, 32, 16, stream);
        scale_bf16_body(&x[..head], f, &mut out[..head]);
        let fv = _mm256_set1_ps(f);
        for i in (head..head + body).step_by(16) {
            // SAFETY: i + 16 <= head + body <= n, within both slices; when streaming, out + i is
            // 32-byte aligned.
            unsafe {
                let lo = bf16x8(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), fv));
                let hi = bf16x8(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8)), fv));
                // packus interleaves 128-bit halves: put them back in order
                let v = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(lo, hi));
                if stream {
                    _mm256_stream_si256(out.as_mut_ptr().add(i).cast(), v);
                } else {
                    _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), v);
                }
            }
        }
        scale_bf16_body(&x[head + body..n], f, &mut out[head + body..n]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_f16_256(x: &[f32], f: f32, out: &mut [u16], stream: bool) {
        let n = x.len().min(out.len());
        let (head, body) = split(out, n, 32, 16, stream);
        scale_f16_body(&x[..head], f, &mut out[..head]);
        let fv = _mm256_set1_ps(f);
        for i in (head..head + body).step_by(16) {
            // SAFETY: i + 16 <= head + body <= n, within both slices; when streaming out + i is
            // 32-byte aligned.
            unsafe {
                let lo = _mm256_cvtps_ph::<NEAREST>(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), fv));
                let hi = _mm256_cvtps_ph::<NEAREST>(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8)), fv));
                let v = _mm256_set_m128i(hi, lo);
                if stream {
                    _mm256_stream_si256(out.as_mut_ptr().add(i).cast(), v);
                } else {
                    _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), v);
                }
            }
        }
        scale_f16_body(&x[head + body..n], f, &mut out[head + body..n]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp_sum_max_f16_256(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
        // SAFETY: this function has widen_f16_256's features.
        exp_sum_max_bits_body::<true>(x, |s, d| unsafe { widen_f16_256(s, d) }, shift, out, ahead)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen_f16_256(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        widen_f16_body(&src[body..n], &mut dst[body..n]);
    }
}

/// `out = exp(x - shift)` while prefetching; returns `(sum, max(x))`.
type ExpSumMax = unsafe fn(&[f32], f32, &mut [f32], Ahead) -> (f32, f32);
/// The same over 16-bit input (bf16 or f16 bits), widened in registers.
type ExpSumMax16 = unsafe fn(&[u16], f32, &mut [f32], Ahead) -> (f32, f32);

/// A scaled store into one output dtype: `out = narrow(x * f)`, streaming when asked and the
/// level can.
type ScaleInto<T> = unsafe fn(&[f32], f32, &mut [T], bool);

/// The primitives of one level. The pointers are `unsafe fn` because the x86 ones require CPU
/// features: a `Kernels` holding them is only built by [`Kernels::select`] after run-time
/// detection confirmed those features, which is what makes the calls below sound.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub level: CpuSimd,
    max: unsafe fn(&[f32]) -> f32,
    exp_sum_max: ExpSumMax,
    exp_sum_max_bf16: ExpSumMax16,
    exp_sum_max_f16: ExpSumMax16,
    widen_bf16: unsafe fn(&[u16], &mut [f32]),
    widen_f16: unsafe fn(&[u16], &mut [f32]),
    scale_f32: ScaleInto<f32>,
    scale_bf16: ScaleInto<u16>,
    scale_f16: ScaleInto<u16>,
    streaming: bool,
}

/// Whether this CPU runs the given level (`Auto` and `Portable` always).
pub(crate) fn supported(level: CpuSimd) -> bool {
    match level {
        CpuSimd::Auto | CpuSimd::Portable => true,
        #[cfg(target_arch = "x86_64")]
        CpuSimd::Avx2 => {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        }
        #[cfg(target_arch = "x86_64")]
        CpuSimd::Avx512 => {
            supported(CpuSimd::Avx2)
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuSimd::Avx2 | CpuSimd::Avx512 => false,
    }
}

impl Kernels {
    /// The kernels of `level` (`Auto`: the best this CPU runs), or `None` if the CPU lacks it.
    pub(crate) fn select(level: CpuSimd) -> Option<Kernels> {
        if !supported(level) {
            return None;
        }
        let portable = Kernels {
            level: CpuSimd::Portable,
            max: portable::max,
            exp_sum_max: portable_exp::exp_sum_max,
            exp_sum_max_bf16: portable_exp::exp_sum_max_bf16,
            exp_sum_max_f16: portable_store::exp_sum_max_f16,
            widen_bf16: portable::widen_bf16,
            widen_f16: portable_store::widen_f16,
            scale_f32: portable_store::scale_f32,
            scale_bf16: portable_store::scale_bf16,
            scale_f16: portable_store::scale_f16,
            streaming: false,
        };
        match level {
            #[cfg(target_arch = "x86_64")]
            CpuSimd::Auto if supported(CpuSimd::Avx512) => Kernels::select(CpuSimd::Avx512),
            #[cfg(target_arch = "x86_64")]
            CpuSimd::Auto if supported(CpuSimd::Avx2) => Kernels::select(CpuSimd::Avx2),
            CpuSimd::Auto | CpuSimd::Portable => Some(portable),
            #[cfg(target_arch = "x86_64")]
            CpuSimd::Avx2 => Some(Kernels {
                level,
                max: avx2::max,
                exp_sum_max: avx2_exp::exp_sum_max,
                exp_sum_max_bf16: avx2_exp::exp_sum_max_bf16,
                exp_sum_max_f16: x86::exp_sum_max_f16_256,
                widen_bf16: avx2::widen_bf16,
                widen_f16: x86::widen_f16_256,
                scale_f32: x86::scale_f32_256,
                scale_bf16: x86::scale_bf16_256,
                scale_f16: x86::scale_f16_256,
                streaming: true,
            }),
            #[cfg(target_arch = "x86_64")]
            CpuSimd::Avx512 => Some(Kernels {
                level,
                max: avx512::max,
                exp_sum_max: x86::exp_sum_max_512,
                exp_sum_max_bf16: x86::exp_sum_max_bf16_512,
                exp_sum_max_f16: x86::exp_sum_max_f16_512,
                widen_bf16: avx512::widen_bf16,
                widen_f16: x86::widen_f16_512,
                scale_f32: x86::scale_f32_512,
                scale_bf16: if is_x86_feature_detected!("avx512bf16") {
                    x86::scale_bf16_512bf
                } else {
                    x86::scale_bf16_512
                },
                scale_f16: x86::scale_f16_512,
                streaming: true,
            }),
            #[cfg(not(target_arch = "x86_64"))]
            CpuSimd::Avx2 | CpuSimd::Avx512 => None,
        }
    }

    /// Maximum, NaN skipped.
    #[inline]
    pub fn max(&self, x: &[f32]) -> f32 {
        // SAFETY: see the struct docs: the level's features were detected.
        unsafe { (self.max)(x) }
    }
    /// `out[..x.len()] = exp(x - shift)`, returning the sum of what was written and the
    /// maximum of `x`, while prefetching `ahead`.
    #[inline]
    pub fn exp_sum_max(&self, x: &[f32], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
        // SAFETY: as above.
        unsafe { (self.exp_sum_max)(x, shift, out, ahead) }
    }
    /// [`Kernels::exp_sum_max`] over bf16 (`bf16 = true`) or f16 bits, widened on the fly.
    #[inline]
    pub fn exp_sum_max_bits(&self, bf16: bool, x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> (f32, f32) {
        let f = if bf16 { self.exp_sum_max_bf16 } else { self.exp_sum_max_f16 };
        // SAFETY: as above.
        unsafe { f(x, shift, out, ahead) }
    }
    /// bf16 bits to f32.
    #[inline]
    pub fn widen_bf16(&self, src: &[u16], dst: &mut [f32]) {
        // SAFETY: as above.
        unsafe { (self.widen_bf16)(src, dst) }
    }
    /// f16 bits to f32.
    #[inline]
    pub fn widen_f16(&self, src: &[u16], dst: &mut [f32]) {
        // SAFETY: as above.
        unsafe { (self.widen_f16)(src, dst) }
    }
    /// `out = x * f`; with `stream`, streaming stores where the level has them (call
    /// [`Kernels::fence`] before the memory is handed to another thread).
    #[inline]
    pub fn scale_f32(&self, x: &[f32], f: f32, out: &mut [f32], stream: bool) {
        // SAFETY: as above.
        unsafe { (self.scale_f32)(x, f, out, stream) }
    }
    /// `out = bf16(x * f)` as bits, round to nearest even; `stream` as for [`Kernels::scale_f32`].
    #[inline]
    pub fn scale_bf16(&self, x: &[f32], f: f32, out: &mut [u16], stream: bool) {
        // SAFETY: as above.
        unsafe { (self.scale_bf16)(x, f, out, stream) }
    }
    /// `out = f16(x * f)` as bits, round to nearest even; `stream` as for [`Kernels::scale_f32`].
    #[inline]
    pub fn scale_f16(&self, x: &[f32], f: f32, out: &mut [u16], stream: bool) {
        // SAFETY: as above.
        unsafe { (self.scale_f16)(x, f, out, stream) }
    }
    /// Orders this thread's streaming stores before what follows (a no-op where none are used).
    #[inline]
    pub fn fence(&self) {
        #[cfg(target_arch = "x86_64")]
        if self.streaming {
            // SAFETY: SSE is part of the x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_at(b: f64) -> f64 {
        let b32 = b as f32;
        (f32::from_bits(b32.to_bits() + 1) - b32) as f64
    }

    fn ulps(a: f32, b: f64) -> f64 {
        (a as f64 - b).abs() / ulp_at(b)
    }

    #[test]
    fn exp_error_bound() {
        for k in levels() {
            let n = 1 << 20;
            // the domain callers use: down to the zero threshold, up to the reference margin
            let x: Vec<f32> = (0..n).map(|i| EXP_LO + (20.0 - EXP_LO) * i as f32 / (n - 1) as f32).collect();
            let mut out = vec![0f32; n];
            k.exp_sum_max(&x, 0.0, &mut out, Ahead::NONE);
            for (&x, &y) in x.iter().zip(&out) {
                let want = (x as f64).exp();
                let bound = 2.0 + (x as f64).abs() * 1e-7 * want / ulp_at(want);
                let e = ulps(y, want);
                assert!(e <= bound, "{:?}: exp({x}) = {y}, want {want}: {e} ulp > {bound}", k.level);
                assert!(((y as f64 - want) / want).abs() <= 1e-5);
            }
        }
    }

    #[test]
    fn exp_special_values() {
        for k in levels() {
            let x = [0.0, -0.0, f32::NEG_INFINITY, -110.0, -1e30, f32::NAN, -86.6, -88.0, -100.0];
            let mut out = [1f32; 9];
            k.exp_sum_max(&x, 0.0, &mut out, Ahead::NONE);
            assert_eq!(&out[..5], &[1.0, 1.0, 0.0, 0.0, 0.0], "{:?}", k.level);
            assert!(out[5].is_nan());
            assert!(out[6] > 0.0 && out[6].is_normal());
            // below exp(-86.6), levels return 0 or a subnormal
            assert!(out[7..].iter().all(|&y| (0.0..f32::MIN_POSITIVE).contains(&y)), "{:?}", &out[7..]);
        }
    }

    fn levels() -> impl Iterator<Item = Kernels> {
        [CpuSimd::Portable, CpuSimd::Avx2, CpuSimd::Avx512].into_iter().filter_map(Kernels::select)
    }

    fn test_floats() -> Vec<f32> {
        (0..70_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .chain([
                f32::NAN,
                f32::INFINITY,
                -0.0,
                3.389_531_4e38,
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                6.0e-8,
                1e-39,
                -1e-40,
            ])
            .collect()
    }

    #[test]
    fn conversions_match_half_at_every_level_alignment_and_stream_mode() {
        let xs = test_floats();
        for k in levels() {
            for (off, stream) in [(0, false), (0, true), (1, true), (7, true), (13, false)] {
                let x = &xs[off..];
                let mut b = vec![0u16; x.len()];
                let mut h = vec![0u16; x.len()];
                k.scale_bf16(x, 1.0, &mut b, stream);
                k.scale_f16(x, 1.0, &mut h, stream);
                k.fence();
                for ((&v, &b), &h) in x.iter().zip(&b).zip(&h) {
                    let want =
                        if v.is_subnormal() { half::bf16::from_f32(v.signum() * 0.0) } else { half::bf16::from_f32(v) };
                    assert!(
                        want.to_bits() == b || (want.is_nan() && half::bf16::from_bits(b).is_nan()),
                        "{:?}: bf16({v}) = {b:#x}, want {want}",
                        k.level
                    );
                    let want = half::f16::from_f32(v);
                    assert!(
                        want.to_bits() == h || (want.is_nan() && half::f16::from_bits(h).is_nan()),
                        "{:?}: f16({v}) = {h:#x}, want {want}",
                        k.level
                    );
                }
                let mut wb = vec![0f32; b.len()];
                let mut wh = vec![0f32; h.len()];
                k.widen_bf16(&b, &mut wb);
                k.widen_f16(&h, &mut wh);
                for (i, (&b, &h)) in b.iter().zip(&h).enumerate() {
                    let (eb, eh) = (half::bf16::from_bits(b).to_f32(), half::f16::from_bits(h).to_f32());
                    assert!(eb.to_bits() == wb[i].to_bits() || (eb.is_nan() && wb[i].is_nan()));
                    assert!(eh.to_bits() == wh[i].to_bits() || (eh.is_nan() && wh[i].is_nan()));
                }
            }
        }
    }

    #[test]
    fn streaming_scale_equals_plain_scale() {
        for k in levels() {
            let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 50.0).collect();
            for off in 0..17 {
                let mut a = vec![0f32; 1100];
                let mut b = vec![0f32; 1100];
                k.scale_f32(&x[off..], 0.3, &mut a[off..], true);
                k.fence();
                k.scale_f32(&x[off..], 0.3, &mut b[off..], false);
                assert_eq!(a, b, "{:?} offset {off}", k.level);
                let want: Vec<f32> = x[off..].iter().map(|v| v * 0.3).collect();
                assert_eq!(&a[off..off + want.len()], &want[..]);
            }
        }
    }

    #[test]
    fn exp_of_16_bit_input_within_the_short_bound() {
        // 16-bit logits use the degree-4 polynomial: within 3e-6 (+ the reduction's |x|·1e-7)
        // of exp, over the domain callers use, and the same max and sum as the values say
        for k in levels() {
            let n = 4000;
            let xs: Vec<f32> = (0..n).map(|i| EXP_LO + (20.0 - EXP_LO) * i as f32 / (n - 1) as f32).collect();
            for (bf, bits) in [
                (true, xs.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect::<Vec<_>>()),
                (false, xs.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect::<Vec<_>>()),
            ] {
                for m in [4000, 3999, 17, 3] {
                    let mut w = vec![0f32; m];
                    if bf {
                        k.widen_bf16(&bits[..m], &mut w)
                    } else {
                        k.widen_f16(&bits[..m], &mut w)
                    }
                    let mut e = vec![0f32; m];
                    let (sum, top) = k.exp_sum_max_bits(bf, &bits[..m], 0.0, &mut e, Ahead::NONE);
                    assert_eq!(top, w.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
                    let mut want_sum = 0f64;
                    for (&x, &y) in w.iter().zip(&e) {
                        let want = (x as f64).exp();
                        want_sum += want;
                        if want < f32::MIN_POSITIVE as f64 {
                            assert!(y >= 0.0 && (y as f64) < f32::MIN_POSITIVE as f64);
                            continue;
                        }
                        let rel = ((y as f64 - want) / want).abs();
                        assert!(
                            rel <= 3e-6 + (x as f64).abs() * 1e-7,
                            "{:?} bf16={bf}: exp({x}) = {y}, rel {rel:e}",
                            k.level
                        );
                    }
                    assert!(
                        ((sum as f64 - want_sum) / want_sum).abs() <= 1e-5,
                        "{:?}: sum {sum} vs {want_sum}",
                        k.level
                    );
                }
            }
        }
    }

    #[test]
    fn max_skips_nan() {
        let k = Kernels::select(CpuSimd::Auto).unwrap();
        let mut x = vec![1f32; 37];
        x[3] = f32::NAN;
        x[36] = 2.0;
        assert_eq!(k.max(&x), 2.0);
        assert_eq!(k.max(&[]), f32::NEG_INFINITY);
    }
}

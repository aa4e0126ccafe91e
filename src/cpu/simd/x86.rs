//! The AVX-512 statistics loops (`exp` with `vscalefps`, 16-bit input widened in registers),
//! the stores with streaming (non-temporal) writes on the aligned body of the output at both
//! levels, and the F16C conversions. Heads and tails use the lane-code bodies, which give the
//! same bits (for f16, the lane code's own branchless conversions, which the compiler
//! vectorises). The stores that run inside a statistics loop are in `x86_side`.

use super::lanes::*;
use super::math::*;
use super::{Ahead, LANES};
use std::arch::x86_64::*;

pub(super) const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

/// `(head, body)`: the elements before the vector body, then the body's length in whole
/// `block`s. Streaming stores need `align`-byte alignment, so the head runs up to it; plain
/// stores take any address, so there is no head.
pub(super) fn split<T>(out: &[T], n: usize, align: usize, block: usize, stream: bool) -> (usize, usize) {
    let head = if stream { out.as_ptr().align_offset(align).min(n) } else { 0 };
    (head, (n - head) / block * block)
}

/// Thirty-two f32 lanes (`a`: elements 0..16, `b`: 16..32) rounded to bf16 bits in order, as
/// [`bf16_round`]: [`bf16x16`]'s rounding on 16-bit lanes at 512 bits (32 elements per
/// instruction), NaN quietened unless `FINITE` (lanes known to hold no NaN or infinity).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(super) fn bf16x32<const FINITE: bool>(a: __m512, b: __m512) -> __m512i {
    // the odd words: b's
    const ODD: __mmask32 = 0xAAAA_AAAA;
    let (a, b) = if FINITE { (_mm512_castps_si512(a), _mm512_castps_si512(b)) } else { (quiet_nan(a), quiet_nan(b)) };
    // words a0 b0 a1 b1 .. of the high and the low halves
    let high = _mm512_mask_blend_epi16(ODD, _mm512_srli_epi32::<16>(a), b);
    let low = _mm512_mask_blend_epi16(ODD, a, _mm512_slli_epi32::<16>(b));
    let sign = _mm512_set1_epi16(i16::MIN);
    // up when low > 0x8000, or low == 0x8000 and high is odd: `low − 0x8000` as a signed word
    // above `−(high & 1)`
    let minus_odd = _mm512_srai_epi16::<15>(_mm512_slli_epi16::<15>(high));
    let up = _mm512_cmpgt_epi16_mask(_mm512_xor_si512(low, sign), minus_odd);
    let r = _mm512_mask_add_epi16(high, up, high, _mm512_set1_epi16(1));
    // exponent bits 0: a zero of the sign
    let subnormal = _mm512_testn_epi16_mask(high, _mm512_set1_epi16(0x7F80));
    let r = _mm512_mask_mov_epi16(r, subnormal, _mm512_and_si512(high, sign));
    // a's sixteen words (the even ones), then b's
    static ORDER: [u16; 32] = {
        let mut o = [0u16; 32];
        let mut i = 0;
        while i < 16 {
            o[i] = 2 * i as u16;
            o[i + 16] = 2 * i as u16 + 1;
            i += 1;
        }
        o
    };
    // SAFETY: ORDER holds 64 bytes.
    let order = unsafe { _mm512_loadu_si512(ORDER.as_ptr().cast()) };
    _mm512_permutexvar_epi16(order, r)
}

/// The bits of 16 f32 lanes, each NaN with its quiet bit set and its low half cleared: what
/// [`bf16_round`] makes of a NaN (its high half, quietened) is then what the rounding makes of it.
#[target_feature(enable = "avx512f")]
#[inline]
fn quiet_nan(v: __m512) -> __m512i {
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    // (v | quiet) & high half: the truth table of (A | B) & C
    _mm512_mask_ternarylogic_epi32::<0xA8>(
        _mm512_castps_si512(v),
        nan,
        _mm512_set1_epi32(0x0040_0000),
        _mm512_set1_epi32(0xFFFF_0000u32 as i32),
    )
}

/// Sixteen f32 lanes (`a`: elements 0..8, `b`: 8..16) rounded to bf16 bits in order, as
/// [`bf16_round`], with the rounding done on 16-bit lanes (16 elements per instruction): each
/// element's high and low 16 bits are gathered apart, and the high half goes up by one where
/// round-to-nearest-even says so (a finite value's carry never reaches the sign); a subnormal
/// (exponent bits 0) becomes a zero of its sign. NaN is quietened unless `FINITE` (lanes known
/// to hold no NaN).
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn bf16x16<const FINITE: bool>(a: __m256, b: __m256) -> __m256i {
    let (a, b) = if FINITE { (_mm256_castps_si256(a), _mm256_castps_si256(b)) } else { (quiet_nan8(a), quiet_nan8(b)) };
    // words a0 b0 a1 b1 .. (a: the even words, b: the odd ones) of the high and the low halves
    let high = _mm256_blend_epi16::<0b1010_1010>(_mm256_srli_epi32::<16>(a), b);
    let low = _mm256_blend_epi16::<0b1010_1010>(a, _mm256_slli_epi32::<16>(b));
    let odd = _mm256_and_si256(high, _mm256_set1_epi16(1));
    let above = _mm256_xor_si256(low, _mm256_set1_epi16(i16::MIN));
    let up = _mm256_cmpgt_epi16(above, _mm256_sub_epi16(_mm256_setzero_si256(), odd));
    let rounded = _mm256_sub_epi16(high, up);
    // exponent bits 0: 0 (vpsignw by a non-negative word keeps or zeroes), then the sign back
    let exponent = _mm256_and_si256(high, _mm256_set1_epi16(0x7F80));
    let sign = _mm256_and_si256(high, _mm256_set1_epi16(i16::MIN));
    let v = _mm256_or_si256(_mm256_sign_epi16(rounded, exponent), sign);
    // a0..a3 b0..b3 | a4..a7 b4..b7 by 128-bit half, then the quarters in order
    let order = _mm256_setr_epi8(
        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, //
        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
    );
    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(v, order))
}

/// [`quiet_nan`] of 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn quiet_nan8(v: __m256) -> __m256i {
    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
    let bits = _mm256_castps_si256(v);
    let quiet = _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000)), _mm256_set1_epi32(-0x1_0000));
    _mm256_castps_si256(_mm256_blendv_ps(v, _mm256_castsi256_ps(quiet), nan))
}

/// `exp` of 16 lanes: the same reduction and polynomial as [`exp`], with `2^n` applied by
/// `vscalefps`, which also flushes `x < -87.3` to subnormals and 0 (`x <= -110` to exactly 0),
/// so no compare-and-mask is needed; NaN propagates (`max` returns its second operand).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn exp16<const SHORT: bool>(x: __m512) -> __m512 {
    let (n, f, q) = exp16_parts::<SHORT>(x);
    _mm512_scalef_ps(_mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0)), n)
}

/// Below this [`exp16`] clamps its argument (`exp` of it is exactly 0 after `vscalefps`).
pub(super) const EXP16_LO: f32 = -110.0;

/// The parts of [`exp16`]: `(n, f, q)` with `exp(x) = 2^n · (1 + q·f)`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn exp16_parts<const SHORT: bool>(x: __m512) -> (__m512, __m512, __m512) {
    clamped_parts::<SHORT>(_mm512_max_ps(_mm512_set1_ps(EXP16_LO), x))
}

/// [`exp16_parts`] of `xc` in `[EXP16_LO, EXP_HI]` or NaN.
#[target_feature(enable = "avx512f")]
#[inline]
fn clamped_parts<const SHORT: bool>(xc: __m512) -> (__m512, __m512, __m512) {
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
    (n, f, p)
}

/// `exp_sum` over 16-lane steps, reading the input as `$elem` and widening each step
/// in registers with `$load` (full step) / `$load_masked` (the partial last step); `$with` runs
/// `side(j)` after step `j` (another loop's work interleaved), `$name` nothing.
macro_rules! exp_sum_512 {
    ($name:ident, $with:ident, $elem:ty, $short:literal, |$p:ident| $load:expr, |$m:ident, $pm:ident| $load_masked:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn $name(x: &[$elem], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
            // SAFETY: the same features as this function.
            unsafe { $with(x, shift, out, ahead, |_| {}) }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        #[inline]
        pub(super) unsafe fn $with(
            x: &[$elem],
            shift: f32,
            out: &mut [f32],
            ahead: Ahead,
            mut side: impl FnMut(usize),
        ) -> f32 {
            let n = x.len().min(out.len());
            let sh = _mm512_set1_ps(shift);
            let mut acc = _mm512_setzero_ps();
            let body = n / 16 * 16;
            for (j, i) in (0..body).step_by(16).enumerate() {
                ahead.line_l2(j);
                // SAFETY: i + 16 <= n, within both slices.
                unsafe {
                    let $p = x.as_ptr().add(i);
                    let v: __m512 = $load;
                    let e = exp16::<$short>(_mm512_sub_ps(v, sh));
                    _mm512_storeu_ps(out.as_mut_ptr().add(i), e);
                    acc = _mm512_add_ps(acc, e);
                }
                side(j);
            }
            if body < n {
                // the partial last step: masked load, store and sum
                let $m: __mmask16 = (1u16 << (n - body)) - 1;
                // SAFETY: the mask covers only body..n, within both slices.
                unsafe {
                    let $pm = x.as_ptr().add(body);
                    let v: __m512 = $load_masked;
                    let e = exp16::<$short>(_mm512_sub_ps(v, sh));
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(body), $m, e);
                    acc = _mm512_mask_add_ps(acc, $m, acc, e);
                }
            }
            let mut a = [0f32; LANES];
            // SAFETY: the array holds 16 f32.
            unsafe { _mm512_storeu_ps(a.as_mut_ptr(), acc) };
            hsum(a)
        }
    };
}

exp_sum_512!(exp_sum_512, exp_sum_with_512, f32, false, |p| _mm512_loadu_ps(p), |m, p| { _mm512_maskz_loadu_ps(m, p) });
exp_sum_512!(
    exp_sum_bf16_512,
    exp_sum_bf16_with_512,
    u16,
    true,
    |p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))),
    |m, p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p.cast()))))
);
exp_sum_512!(
    exp_sum_f16_512,
    exp_sum_f16_with_512,
    u16,
    true,
    |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
    |m, p| { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast())) }
);

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn scale_f32_512<const AHEAD: bool>(x: &[f32], f: f32, k: f32, out: &mut [f32], stream: bool) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 64, 16, stream);
    scale_body::<true>(&x[..head], f, k, &mut out[..head]);
    let (fv, kv) = (_mm512_set1_ps(f), _mm512_set1_ps(k));
    for i in (head..head + body).step_by(16) {
        // SAFETY: i + 16 <= head + body <= n, within both slices; when streaming, out + i is
        // 64-byte aligned.
        unsafe {
            if AHEAD && stream {
                source_ahead(x, i);
            }
            let v = _mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv, kv);
            if stream {
                _mm512_stream_ps(out.as_mut_ptr().add(i), v);
            } else {
                _mm512_storeu_ps(out.as_mut_ptr().add(i), v);
            }
        }
    }
    scale_body::<true>(&x[head + body..n], f, k, &mut out[head + body..n]);
}

/// How far ahead of the copy [`copy_ahead_512`] and [`copy_ahead_256`] prefetch (32 KiB, as the
/// statistics pass prefetches its logits).
const COPY_AHEAD: usize = 8192;

/// Prefetches into L2 the source line [`COPY_AHEAD`] floats past element `i`, from the loop of
/// a streaming store over a long source (`AHEAD` kernels, as the copy floor does): left to the
/// hardware prefetcher, `scale_into` over 51.2M elements took 15–17% longer on a Xeon. Not in
/// the pass's stores, whose source (the scratch row) is in L2 already: there the requests cost
/// 4–7%. Never read through; past the slice's end it asks for a line that is not read.
#[inline(always)]
fn source_ahead(x: &[f32], i: usize) {
    // SAFETY: a prefetch never faults, whatever the address; SSE is part of the x86-64 baseline.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(x.as_ptr().wrapping_add(i + COPY_AHEAD).cast()) }
}

/// `out = x` with streaming stores, the source prefetched into L2 [`COPY_AHEAD`] floats ahead,
/// one line per step: the copy floor's prefetching candidate (`measure::CopyBuffers`).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn copy_ahead_512(x: &[f32], out: &mut [f32]) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 64, 16, true);
    out[..head].copy_from_slice(&x[..head]);
    for i in (head..head + body).step_by(16) {
        // SAFETY: a prefetch never faults; i + 16 <= head + body <= n, within both slices, and
        // out + i is 64-byte aligned (split).
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(x.as_ptr().wrapping_add(i + COPY_AHEAD).cast());
            _mm512_stream_ps(out.as_mut_ptr().add(i), _mm512_loadu_ps(x.as_ptr().add(i)));
        }
    }
    out[head + body..n].copy_from_slice(&x[head + body..n]);
}

/// [`copy_ahead_512`] with AVX2 (two 32-byte halves per line).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn copy_ahead_256(x: &[f32], out: &mut [f32]) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 64, 16, true);
    out[..head].copy_from_slice(&x[..head]);
    for i in (head..head + body).step_by(16) {
        // SAFETY: as in copy_ahead_512; out + i and out + i + 8 are 32-byte aligned.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(x.as_ptr().wrapping_add(i + COPY_AHEAD).cast());
            _mm256_stream_ps(out.as_mut_ptr().add(i), _mm256_loadu_ps(x.as_ptr().add(i)));
            _mm256_stream_ps(out.as_mut_ptr().add(i + 8), _mm256_loadu_ps(x.as_ptr().add(i + 8)));
        }
    }
    out[head + body..n].copy_from_slice(&x[head + body..n]);
}

/// `out = bf16(x * f - k)` with AVX-512 and the rounding emulated ([`bf16x32`]), streaming
/// when asked.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn scale_bf16_512<const AHEAD: bool>(x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
    scale_bf16_512_with::<false, AHEAD>(x, f, k, out, stream)
}

/// [`scale_bf16_512`] for products known to be finite (no NaN handling; the same bits).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn scale_bf16_finite_512(x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
    scale_bf16_512_with::<true, false>(x, f, k, out, stream)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[inline]
fn scale_bf16_512_with<const FINITE: bool, const AHEAD: bool>(
    x: &[f32],
    f: f32,
    k: f32,
    out: &mut [u16],
    stream: bool,
) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 64, 32, stream);
    scale_bf16_body::<true>(&x[..head], f, k, &mut out[..head]);
    let (fv, kv) = (_mm512_set1_ps(f), _mm512_set1_ps(k));
    for i in (head..head + body).step_by(32) {
        // SAFETY: i + 32 <= head + body <= n, within both slices; when streaming, out + i is
        // 64-byte aligned.
        unsafe {
            if AHEAD && stream {
                source_ahead(x, i);
                source_ahead(x, i + 16);
            }
            let lo = _mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv, kv);
            let hi = _mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), fv, kv);
            let v = bf16x32::<FINITE>(lo, hi);
            if stream {
                _mm512_stream_si512(out.as_mut_ptr().add(i).cast(), v);
            } else {
                _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
            }
        }
    }
    scale_bf16_body::<true>(&x[head + body..n], f, k, &mut out[head + body..n]);
}

/// As [`scale_bf16_512`], with the AVX-512 BF16 conversion instruction (same bits).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
pub(super) unsafe fn scale_bf16_512bf<const AHEAD: bool>(x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 64, 32, stream);
    scale_bf16_body::<true>(&x[..head], f, k, &mut out[..head]);
    let (fv, kv) = (_mm512_set1_ps(f), _mm512_set1_ps(k));
    for i in (head..head + body).step_by(32) {
        // SAFETY: i + 32 <= head + body <= n, within both slices; when streaming out + i is
        // 64-byte aligned.
        unsafe {
            if AHEAD && stream {
                source_ahead(x, i);
                source_ahead(x, i + 16);
            }
            let lo = _mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv, kv);
            let hi = _mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), fv, kv);
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            if stream {
                _mm512_stream_si512(out.as_mut_ptr().add(i).cast(), v);
            } else {
                _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
            }
        }
    }
    scale_bf16_body::<true>(&x[head + body..n], f, k, &mut out[head + body..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn scale_f16_512<const AHEAD: bool>(x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 64, 32, stream);
    scale_f16_body::<true>(&x[..head], f, k, &mut out[..head]);
    let (fv, kv) = (_mm512_set1_ps(f), _mm512_set1_ps(k));
    for i in (head..head + body).step_by(32) {
        // SAFETY: i + 32 <= head + body <= n, within both slices; when streaming out + i is
        // 64-byte aligned.
        unsafe {
            if AHEAD && stream {
                source_ahead(x, i);
                source_ahead(x, i + 16);
            }
            let lo = _mm512_cvtps_ph::<NEAREST>(_mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), fv, kv));
            let hi = _mm512_cvtps_ph::<NEAREST>(_mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), fv, kv));
            let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            if stream {
                _mm512_stream_si512(out.as_mut_ptr().add(i).cast(), v);
            } else {
                _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
            }
        }
    }
    scale_f16_body::<true>(&x[head + body..n], f, k, &mut out[head + body..n]);
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
pub(super) unsafe fn scale_f32_256<const AHEAD: bool>(x: &[f32], f: f32, k: f32, out: &mut [f32], stream: bool) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 32, 8, stream);
    scale_body::<true>(&x[..head], f, k, &mut out[..head]);
    let (fv, kv) = (_mm256_set1_ps(f), _mm256_set1_ps(k));
    for i in (head..head + body).step_by(8) {
        // SAFETY: i + 8 <= head + body <= n, within both slices; when streaming, out + i is
        // 32-byte aligned.
        unsafe {
            if AHEAD && stream && (i - head) % 16 == 0 {
                source_ahead(x, i);
            }
            let v = _mm256_fmsub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), fv, kv);
            if stream {
                _mm256_stream_ps(out.as_mut_ptr().add(i), v);
            } else {
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
            }
        }
    }
    scale_body::<true>(&x[head + body..n], f, k, &mut out[head + body..n]);
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scale_bf16_256_with<const FINITE: bool, const AHEAD: bool>(
    x: &[f32],
    f: f32,
    k: f32,
    out: &mut [u16],
    stream: bool,
) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 32, 16, stream);
    scale_bf16_body::<true>(&x[..head], f, k, &mut out[..head]);
    let (fv, kv) = (_mm256_set1_ps(f), _mm256_set1_ps(k));
    for i in (head..head + body).step_by(16) {
        // SAFETY: i + 16 <= head + body <= n, within both slices; when streaming, out + i is
        // 32-byte aligned.
        unsafe {
            if AHEAD && stream {
                source_ahead(x, i);
            }
            let (lo, hi) = (_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(x.as_ptr().add(i + 8)));
            let (lo, hi) = (_mm256_fmsub_ps(lo, fv, kv), _mm256_fmsub_ps(hi, fv, kv));
            let v = bf16x16::<FINITE>(lo, hi);
            if stream {
                _mm256_stream_si256(out.as_mut_ptr().add(i).cast(), v);
            } else {
                _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), v);
            }
        }
    }
    scale_bf16_body::<true>(&x[head + body..n], f, k, &mut out[head + body..n]);
}

/// `out = bf16(x * f)` (see [`bf16_round`]), streaming when asked.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_bf16_256<const AHEAD: bool>(x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
    // SAFETY: the same features.
    unsafe { scale_bf16_256_with::<false, AHEAD>(x, f, k, out, stream) }
}

/// [`scale_bf16_256`] for products known to be finite (no NaN handling; the same bits).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_bf16_finite_256(x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
    // SAFETY: the same features.
    unsafe { scale_bf16_256_with::<true, false>(x, f, k, out, stream) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_f16_256<const AHEAD: bool>(x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
    let n = x.len().min(out.len());
    let (head, body) = split(out, n, 32, 16, stream);
    scale_f16_body::<true>(&x[..head], f, k, &mut out[..head]);
    let (fv, kv) = (_mm256_set1_ps(f), _mm256_set1_ps(k));
    for i in (head..head + body).step_by(16) {
        // SAFETY: i + 16 <= head + body <= n, within both slices; when streaming out + i is
        // 32-byte aligned.
        unsafe {
            if AHEAD && stream {
                source_ahead(x, i);
            }
            let lo = _mm256_cvtps_ph::<NEAREST>(_mm256_fmsub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), fv, kv));
            let hi = _mm256_cvtps_ph::<NEAREST>(_mm256_fmsub_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8)), fv, kv));
            let v = _mm256_set_m128i(hi, lo);
            if stream {
                _mm256_stream_si256(out.as_mut_ptr().add(i).cast(), v);
            } else {
                _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), v);
            }
        }
    }
    scale_f16_body::<true>(&x[head + body..n], f, k, &mut out[head + body..n]);
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

//! The AVX-512 statistics loop under per-element options (label smoothing, soft-capping): the
//! same arithmetic as the lane code's [`exp_opts_body`](super::lanes::exp_opts_body), with
//! `vscalefps` for both exponentials and `vrcp14ps` plus one Newton step for `1 / (1 + u)`, and
//! 16-bit input widened in registers.

use super::lanes::{hsum, ElemOpts};
use super::math::*;
use super::x86::{exp16, exp16_parts};
use super::{Ahead, LANES};
use std::arch::x86_64::*;

/// The per-call constants of the loop.
#[derive(Clone, Copy)]
struct Consts {
    shift: __m512,
    cap: __m512,
    /// `−2 / c`.
    neg_two_inv_cap: __m512,
}

/// `(z − shift, exp(z − shift), s)` of 16 lanes: `z = c · tanh(x / c)` and `s = 1 − tanh²(x / c)`
/// with soft-capping (as [`cap_and_chain`] of `x · (−2/c)`, `1 − u` as [`exp16_and_one_minus`]
/// takes it), else `z = x`, `s = 1`.
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
fn step<const SHORT: bool, const CAP: bool>(x: __m512, k: Consts) -> (__m512, __m512, __m512) {
    let one = _mm512_set1_ps(1.0);
    if !CAP {
        let d = _mm512_sub_ps(x, k.shift);
        return (d, exp16::<SHORT>(d), one);
    }
    // `vminps` returns its second operand when either is NaN: the argument goes second, so a
    // NaN logit stays NaN (first, it became the clamp, and `tanh` of it -1)
    let a = _mm512_min_ps(_mm512_set1_ps(TANH_ARG_MAX), _mm512_mul_ps(x, k.neg_two_inv_cap));
    let (u, one_minus_u) = exp16_and_one_minus(a);
    let d = _mm512_add_ps(one, u);
    let r0 = _mm512_rcp14_ps(d);
    // one Newton step on the 14-bit reciprocal: r = r0 · (2 − d · r0), ~1 ulp
    let r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.0)));
    let z = _mm512_mul_ps(k.cap, _mm512_mul_ps(one_minus_u, r));
    let d = _mm512_sub_ps(z, k.shift);
    // 1 − t² = 4u / (1 + u)²: no cancellation where tanh saturates (see cap_and_chain)
    let s = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(4.0), u), r), r);
    (d, exp16::<SHORT>(d), s)
}

/// `(exp(x), 1 − exp(x))` of 16 lanes: `exp` as [`exp16`] (the same bits), `1 − exp(x)` as the
/// lane code's [`exp_and_one_minus`] takes it, `−q·f` of the
/// polynomial's terms where `n = 0`.
#[target_feature(enable = "avx512f")]
#[inline]
fn exp16_and_one_minus(x: __m512) -> (__m512, __m512) {
    let c = |k: f32| _mm512_set1_ps(k);
    let (n, f, q) = exp16_parts::<false>(x);
    let u = _mm512_scalef_ps(_mm512_fmadd_ps(q, f, c(1.0)), n);
    let n_is_0 = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(n, _mm512_setzero_ps());
    let minus_qf = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(q, f));
    (u, _mm512_mask_blend_ps(n_is_0, _mm512_sub_ps(c(1.0), u), minus_qf))
}

/// The loop over 16-lane steps, reading the input as `$elem` and widening each step in
/// registers with `$load` / `$load_masked`, for one combination of options.
macro_rules! exp_opts_512 {
    ($name:ident, $inner:ident, $elem:ty, $short:literal, |$p:ident| $load:expr, |$m:ident, $pm:ident| $load_masked:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        unsafe fn $inner<const CAP: bool, const SUM: bool>(
            x: &[$elem],
            k: Consts,
            out: &mut [f32],
            chain: &mut [f32],
            ahead: Ahead,
        ) -> (f32, f32) {
            let n = x.len().min(out.len());
            let both = CAP && SUM;
            assert!(!both || chain.len() >= n);
            let (mut acc, mut zacc) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let body = n / 16 * 16;
            for (j, i) in (0..body).step_by(16).enumerate() {
                ahead.line_l2(j);
                // SAFETY: i + 16 <= n, within `x` and `out`, and within `chain` when it is written.
                unsafe {
                    let $p = x.as_ptr().add(i);
                    let (d, e, s) = step::<$short, CAP>($load, k);
                    acc = _mm512_add_ps(acc, e);
                    if SUM {
                        zacc = _mm512_add_ps(zacc, d);
                    }
                    _mm512_storeu_ps(out.as_mut_ptr().add(i), if CAP { _mm512_mul_ps(e, s) } else { e });
                    if both {
                        _mm512_storeu_ps(chain.as_mut_ptr().add(i), s);
                    }
                }
            }
            if body < n {
                let $m: __mmask16 = (1u16 << (n - body)) - 1;
                // SAFETY: the mask covers only body..n, within the slices as above.
                unsafe {
                    let $pm = x.as_ptr().add(body);
                    let (d, e, s) = step::<$short, CAP>($load_masked, k);
                    acc = _mm512_mask_add_ps(acc, $m, acc, e);
                    if SUM {
                        zacc = _mm512_mask_add_ps(zacc, $m, zacc, d);
                    }
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(body), $m, if CAP { _mm512_mul_ps(e, s) } else { e });
                    if both {
                        _mm512_mask_storeu_ps(chain.as_mut_ptr().add(body), $m, s);
                    }
                }
            }
            let (mut a, mut zs) = ([0f32; LANES], [0f32; LANES]);
            // SAFETY: the arrays hold 16 f32.
            unsafe {
                _mm512_storeu_ps(a.as_mut_ptr(), acc);
                _mm512_storeu_ps(zs.as_mut_ptr(), zacc);
            }
            (hsum(a), hsum(zs))
        }

        /// The AVX-512 statistics loop under per-element options (see the module docs).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn $name(
            x: &[$elem],
            shift: f32,
            o: ElemOpts,
            out: &mut [f32],
            chain: &mut [f32],
            ahead: Ahead,
        ) -> (f32, f32) {
            let k = Consts {
                shift: _mm512_set1_ps(shift),
                cap: _mm512_set1_ps(o.cap),
                neg_two_inv_cap: _mm512_set1_ps(-2.0 * o.inv_cap),
            };
            // SAFETY: the same features as this function.
            unsafe {
                match (o.cap != 0.0, o.sum) {
                    (false, false) => $inner::<false, false>(x, k, out, chain, ahead),
                    (false, true) => $inner::<false, true>(x, k, out, chain, ahead),
                    (true, false) => $inner::<true, false>(x, k, out, chain, ahead),
                    (true, true) => $inner::<true, true>(x, k, out, chain, ahead),
                }
            }
        }
    };
}

exp_opts_512!(exp_opts_512, opts_f32, f32, false, |p| _mm512_loadu_ps(p), |m, p| _mm512_maskz_loadu_ps(m, p));
exp_opts_512!(
    exp_opts_bf16_512,
    opts_bf16,
    u16,
    true,
    |p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))),
    |m, p| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p.cast()))))
);
exp_opts_512!(exp_opts_f16_512, opts_f16, u16, true, |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())), |m, p| {
    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast()))
});

//! The scalar math every lane runs: a vectorisable `exp` and `tanh`.
//!
//! # `exp` and its error bound
//!
//! `exp(x)` for `x <= 88` (callers subtract a running reference; 88 keeps `2^n` a normal float),
//! as `2^y` with `y = x·log2(e)`: `n = round(y)` by the 1.5·2²³ rounding trick, `f = y - n` in
//! `[-1/2, 1/2]` (one rounding where the level has FMA), `2^f` by a polynomial fitted here for
//! relative error on `[-1/2, 1/2]`, and `2^n`, built from the rounding's bits, multiplied in
//! (AVX2, portable; exact, and NaN stays NaN whatever its payload) or applied by `vscalefps`
//! (AVX-512). The polynomial is matched to the logits' precision: degree 6
//! (1.3 ulp in f32 Horner form) for f32 logits, degree 4 (2.9e-6) for f16/bf16 logits, whose own
//! rounding is 2^-12 / 2^-9. The reduction adds a relative error of about `|y|·2^-24`, so the
//! total stays within `2 ulp + |x|·1e-7` for f32 logits (test `exp_error_bound`) and
//! `3e-6 + |x|·1e-7` for 16-bit logits (test `exp_of_16_bit_input_within_the_short_bound`).
//! Tiny results differ by level: AVX2 and portable return exactly 0 below `x = -86.6`, AVX-512
//! returns subnormals down to `x = -103` and exactly 0 below; both are under 2.4e-38, less than
//! one part in 1e37 of a row sum (which is at least 1). `exp(-inf) = 0` and NaN in gives NaN out
//! at every level.
//!
//! Above 88 the levels differ too, and only there: AVX2 and portable clamp the argument to
//! [`EXP_HI`] (`exp(88)`, 1.65e38), AVX-512 returns `+inf` from `vscalefps`. Either way a chunk
//! holding an element far above the running reference sums past `CHECK_SUM` (or to `inf`), and
//! the statistics pass moves the reference and takes the chunk again. Without the clamp the
//! bits of `2^n` wrapped for `n >= 128` and such an element vanished from its row (a logit 100
//! above the first chunk's maximum gave a loss of 9.85 where 99.4 was due).

pub(super) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
#[cfg(target_arch = "x86_64")]
pub(super) const ROUND_MAGIC: f32 = 12_582_912.0;
/// [`ROUND_MAGIC`] + 127: the rounded `n` then sits in the low mantissa bits as `n + 127`,
/// which shifted left by 23 are the bits of the float `2^n` (the lane code's and AVX2's `exp`).
/// An odd constant, where the plain one is even, breaks an exact tie `n + 1/2` the other way:
/// with FMA no such tie occurs (`x · log2(e)`, `log2(e)` an odd 24-bit mantissa, is a half-integer
/// only for `|x| >= 2^22`); without FMA it moves `f` from `1/2` to `−1/2`, within the same bound.
pub(super) const EXP_MAGIC: f32 = 12_583_039.0;
/// Below this (`-125 ln 2`), `exp` returns 0.
pub(super) const EXP_LO: f32 = -125.0 * std::f32::consts::LN_2;
/// Above this, `exp` takes this (see the module docs): `n` at most 127, `2^n` a normal float.
pub(super) const EXP_HI: f32 = 88.0;
/// `2^f` on `[-1/2, 1/2]`: coefficients of f^1..f^6 (f^0 is 1), a relative-error fit.
pub(super) const P1: f32 = std::f32::consts::LN_2; // the fit lands on ln 2 itself
pub(super) const P2: f32 = 0.240_226_48;
pub(super) const P3: f32 = 0.055_503_286;
pub(super) const P4: f32 = 0.009_618_46;
pub(super) const P5: f32 = 0.001_339_993;
pub(super) const P6: f32 = 0.000_153_533_2;
/// The short polynomial for 16-bit logits: f^1..f^4 (f^0 is 1), 2.9e-6 relative on `[-1/2, 1/2]`,
/// a thousand times finer than the inputs' own rounding (2^-9 for bf16, 2^-12 for f16).
pub(super) const S1: f32 = 0.693_124_2;
pub(super) const S2: f32 = 0.240_240_99;
pub(super) const S3: f32 = 0.055_906_4;
pub(super) const S4: f32 = 0.009_582_837;

/// `a * b + c`, fused when the level has FMA (`FMA = true`), two roundings otherwise.
#[inline(always)]
pub(super) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `2^f` for `f` in `[-1/2, 1/2]`: degree 6, or degree 4 when `SHORT` (16-bit logits).
#[inline(always)]
pub(super) fn pow2_frac<const FMA: bool, const SHORT: bool>(f: f32) -> f32 {
    if SHORT {
        let p = madd::<FMA>(S4, f, S3);
        let p = madd::<FMA>(p, f, S2);
        let p = madd::<FMA>(p, f, S1);
        return madd::<FMA>(p, f, 1.0);
    }
    madd::<FMA>(pow2_frac_q::<FMA>(f), f, 1.0)
}

/// `q` with `2^f = 1 + q·f` (degree 6): the polynomial before its last step, which
/// [`exp_and_one_minus`] takes apart.
#[inline(always)]
fn pow2_frac_q<const FMA: bool>(f: f32) -> f32 {
    let mut p = madd::<FMA>(P6, f, P5);
    p = madd::<FMA>(p, f, P4);
    p = madd::<FMA>(p, f, P3);
    p = madd::<FMA>(p, f, P2);
    madd::<FMA>(p, f, P1)
}

/// `(exp(x), 1 − exp(x))` for `x <= 88` or NaN (`exp` as [`exp`] of f32 logits, the same
/// bits), the second accurate relative to itself also where `exp(x)` is near 1: there (`n = 0`,
/// `|x| < 0.35`) it is `−q·f` of the polynomial's own terms, not `1 − exp(x)`, whose rounding of
/// `exp(x)` is an absolute error of an ulp of 1, all of `1 − exp(x)` once `|x|` is below 6e-8.
#[inline(always)]
pub(super) fn exp_and_one_minus<const FMA: bool>(x: f32) -> (f32, f32) {
    let (scale, n, f) = reduce::<FMA>(x.clamp(EXP_LO, EXP_HI));
    let q = pow2_frac_q::<FMA>(f);
    let u = madd::<FMA>(q, f, 1.0) * scale;
    let u = if x < EXP_LO { 0.0 } else { u };
    (u, if n == 0.0 { -(q * f) } else { 1.0 - u })
}

/// `exp(x)`, `x` clamped to [`EXP_HI`] above, 0 below [`EXP_LO`], NaN for NaN; see the module
/// docs for the method and the bound.
#[inline(always)]
pub(super) fn exp<const FMA: bool, const SHORT: bool>(x: f32) -> f32 {
    // (`clamp` passes NaN through unchanged)
    let (scale, _, f) = reduce::<FMA>(x.clamp(EXP_LO, EXP_HI));
    // p · 2^n, exact: p is in [0.70, 1.42], so the product is a normal number. A multiply, not
    // an integer add of n << 23 to p's bits: that add turned a NaN `x` whose low payload bits
    // were not all 0 (a NaN logit as some producers write it) into a finite number; NaN ·
    // anything is NaN.
    let y = pow2_frac::<FMA, SHORT>(f) * scale;
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

/// The reduction of every `exp` here, for `xc` in `[EXP_LO, EXP_HI]` or NaN: `(2^n, n, f)` with
/// `n = round(xc · log2 e)` and `f = xc · log2 e − n`. `2^n` comes from the rounding's own bits:
/// `t`'s are 0x4B40_0000 + 127 + n, whose low 9 bits shifted left by 23 are the float `2^n`
/// (`n` in [-125, 127]).
#[inline(always)]
fn reduce<const FMA: bool>(xc: f32) -> (f32, f32, f32) {
    let t = madd::<FMA>(xc, LOG2E, EXP_MAGIC);
    let n = t - EXP_MAGIC;
    (f32::from_bits(t.to_bits() << 23), n, madd::<FMA>(xc, LOG2E, -n))
}

/// Where the argument of the `exp` inside [`cap_and_chain`] is clamped: `tanh` is `-1` to f32
/// precision long before, `exp(80)` leaves `4u` (2.2e35) and `1 + u` below overflow, and the
/// chain factor of a saturated `tanh` comes out as `4/e^80`, 7e-35, where the true one is
/// smaller still (at 40 it was 1.7e-17: a row whose every logit saturated then got a gradient
/// many times its true size, relative to it).
pub(super) const TANH_ARG_MAX: f32 = 80.0;

/// `(c · tanh(x), 1 − tanh²(x))` from `a = −2x` (a loop over `x / c` takes it as one product,
/// `x · (−2/c)`: the same bits as `−2 · (x · (1/c))`, the factor 2 being exact), through one
/// `exp` and one division. With `u = exp(a)` (`a` clamped to [`TANH_ARG_MAX`]) and
/// `r = 1 / (1 + u)`:
/// - `c · tanh x = c · (1 − u)·r`, with `1 − u` from [`exp_and_one_minus`]: a few ulp relative
///   for every `x`. The shorter `c · (2r − 1)` (one multiply-add) left `r`'s rounding as an
///   absolute error of ~2e-7 in `tanh` where `x` is small, which the cap multiplies: with caps
///   of 30–64 it was 10–150 times the error of this form (loss, z-loss and gradient 1e-6 to
///   9.4e-6 from float64 at V = 2, against 4e-8 to 2e-7), and past f32's 1e-5 for the z-loss
///   of a vocabulary of one. It saved ~12% of a soft-capped pass at the portable level, nothing
///   measurable at AVX2 (BENCHMARKS.md, the twenty-ninth session).
/// - `1 − tanh² x = 4u·r²`: a few ulp relative. Taken from `t`, as `1 − t²`, it kept only an
///   absolute error of an ulp of 1, tens of percent of itself where `tanh` saturates; the
///   target's entry, `coef · (p − 1) · s`, carries that into the gradient.
///
/// `±inf` give `±c` and 0 (about `7e-35` for `−inf`, through the clamp), NaN gives NaN.
#[inline(always)]
pub(super) fn cap_and_chain<const FMA: bool>(a: f32, c: f32) -> (f32, f32) {
    let a = if a > TANH_ARG_MAX { TANH_ARG_MAX } else { a };
    let (u, one_minus_u) = exp_and_one_minus::<FMA>(a);
    let r = 1.0 / (1.0 + u);
    (c * (one_minus_u * r), 4.0 * u * r * r)
}

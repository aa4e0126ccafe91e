//! The four f32 primitives a row is built from, with a vectorised `exp`.
//!
//! The primitives are written once, over fixed-width lane arrays that the compiler turns into
//! vector instructions, and instantiated per instruction set (see [`Kernels`]).
//!
//! # `exp` and its error bound
//!
//! `exp(x)` for `x <= 0` (every caller subtracts the running row maximum first):
//! `x = n ln2 + r` with `n = round(x / ln2)` (by the 1.5·2²³ rounding trick) and `|r| <= ln2/2`,
//! `ln2` split in two (Cody–Waite) so `n ln2` is exact; `exp(r)` by its Taylor polynomial of
//! degree 7 (truncation below 7.6e-9 relative on `|r| <= ln2/2`); `2^n` built in the exponent
//! bits. `x < -87` returns exactly 0 (the true value is below 1.7e-38, under one part in 1e38 of
//! the row sum, which is at least 1), so no denormal is ever produced. NaN in gives NaN out.
//! The measured error over `[-87, 0]` is at most 2 ulp (test `exp_error_bound`).

/// Lanes per step: 16 f32 (one AVX-512 register, two AVX2 registers, four NEON registers).
pub(crate) const LANES: usize = 16;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// High part of ln 2 with 9 significant bits, so `n * LN2_HI` is exact for |n| < 2^15.
const LN2_HI: f32 = 355.0 / 512.0;
/// `ln 2 - LN2_HI`.
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this, `exp` returns 0.
const EXP_LO: f32 = -87.0;
/// 1/k! for k = 2..=7.
const C2: f32 = 1.0 / 2.0;
const C3: f32 = 1.0 / 6.0;
const C4: f32 = 1.0 / 24.0;
const C5: f32 = 1.0 / 120.0;
const C6: f32 = 1.0 / 720.0;
const C7: f32 = 1.0 / 5040.0;

/// `a * b + c`, fused when the instantiation has FMA (`FMA = true`), two roundings otherwise.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` for `x <= 0` or NaN; see the module docs for the method and the bound.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    // NaN compares false and passes through unchanged.
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let t = madd::<FMA>(xc, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = madd::<FMA>(C7, r, C6);
    p = madd::<FMA>(p, r, C5);
    p = madd::<FMA>(p, r, C4);
    p = madd::<FMA>(p, r, C3);
    p = madd::<FMA>(p, r, C2);
    p = madd::<FMA>(p, r, 1.0);
    p = madd::<FMA>(p, r, 1.0);
    // t's bits are 0x4B40_0000 + n; 2^n has bits (n + 127) << 23.
    let pow2n = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    let y = p * pow2n;
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

/// Maximum of `x`, NaN entries skipped (`-inf` for an empty slice).
#[inline(always)]
pub(crate) fn max<const FMA: bool>(x: &[f32]) -> f32 {
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

/// Sums `LANES` accumulators in a fixed pairwise order.
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

/// `sum(exp(x - shift))`.
#[inline(always)]
pub(crate) fn sum_exp<const FMA: bool>(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] += exp::<FMA>(c[i] - shift);
        }
    }
    for (i, &v) in it.remainder().iter().enumerate() {
        acc[i] += exp::<FMA>(v - shift);
    }
    hsum(acc)
}

/// `out = exp(x - shift) * scale`.
#[inline(always)]
pub(crate) fn exp_scale<const FMA: bool>(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    let n = x.len().min(out.len());
    let (x, out) = (&x[..n], &mut out[..n]);
    let mut xi = x.chunks_exact(LANES);
    let mut oi = out.chunks_exact_mut(LANES);
    for (c, o) in (&mut xi).zip(&mut oi) {
        for i in 0..LANES {
            o[i] = exp::<FMA>(c[i] - shift) * scale;
        }
    }
    for (&v, o) in xi.remainder().iter().zip(oi.into_remainder()) {
        *o = exp::<FMA>(v - shift) * scale;
    }
}

/// `buf = exp(buf - shift) * scale`, in place.
#[inline(always)]
pub(crate) fn exp_scale_in_place<const FMA: bool>(buf: &mut [f32], shift: f32, scale: f32) {
    let mut it = buf.chunks_exact_mut(LANES);
    for c in &mut it {
        for v in c.iter_mut() {
            *v = exp::<FMA>(*v - shift) * scale;
        }
    }
    for v in it.into_remainder() {
        *v = exp::<FMA>(*v - shift) * scale;
    }
}

/// The primitives of one instruction set, chosen once per call.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub name: &'static str,
    pub max: fn(&[f32]) -> f32,
    pub sum_exp: fn(&[f32], f32) -> f32,
    pub exp_scale: fn(&[f32], f32, f32, &mut [f32]),
    pub exp_scale_in_place: fn(&mut [f32], f32, f32),
}

impl Kernels {
    /// Portable code (whatever the build's baseline target features vectorise to).
    pub(crate) const PORTABLE: Kernels = Kernels {
        name: "portable",
        max: max::<false>,
        sum_exp: sum_exp::<false>,
        exp_scale: exp_scale::<false>,
        exp_scale_in_place: exp_scale_in_place::<false>,
    };

    /// The best instruction set this CPU has.
    pub(crate) fn detect() -> Kernels {
        Kernels::PORTABLE
    }
}

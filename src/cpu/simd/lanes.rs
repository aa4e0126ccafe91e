//! The primitives written once over fixed-width lane arrays; each level compiles them with its
//! own target features (see the parent module), so one body serves every instruction set.

use super::math::*;
use super::LANES;

// ---- the primitives, once, over lane arrays -------------------------------------------------

/// Maximum of `x`, NaN entries skipped (`-inf` for an empty slice).
#[inline(always)]
pub(super) fn max_body(x: &[f32]) -> f32 {
    max_lanes(x, |v| v)
}

/// [`max_body`] of 16-bit values widened by `widen` (exactly) in registers: the same lanes and
/// so the same result as widening the slice into a buffer first, without the buffer's writes
/// and reads.
#[inline(always)]
pub(super) fn max_lanes<T: Copy>(x: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            let v = widen(c[i]);
            acc[i] = if v > acc[i] { v } else { acc[i] };
        }
    }
    for &b in it.remainder() {
        let v = widen(b);
        acc[0] = if v > acc[0] { v } else { acc[0] };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Sums the lane accumulators in a fixed pairwise order.
#[inline(always)]
pub(super) fn hsum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `out = exp(x - shift)`; returns `sum(out)`. `out` may be longer than `x`. `x - shift` may be
/// positive up to ~88 (the caller keeps it below 20).
#[inline(always)]
pub(super) fn exp_sum_body<const FMA: bool, const SHORT: bool>(
    x: &[f32],
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
) -> f32 {
    let mut acc = [0f32; LANES];
    exp_acc_body::<FMA, SHORT>(x, shift, out, ahead, &mut acc);
    hsum(acc)
}

/// [`exp_sum_body`] adding element `i` of `x` (`x` a whole number of 16-lane steps but for its
/// last call) to lane `i % 16` of `acc`: blocks of one row summed as if in one loop.
#[inline(always)]
fn exp_acc_body<const FMA: bool, const SHORT: bool>(
    x: &[f32],
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
    acc: &mut [f32; LANES],
) {
    let out = &mut out[..x.len()];
    let mut xi = x.chunks_exact(LANES);
    let mut oi = out.chunks_exact_mut(LANES);
    for (j, (c, o)) in (&mut xi).zip(&mut oi).enumerate() {
        ahead.line(j);
        for i in 0..LANES {
            o[i] = exp::<FMA, SHORT>(c[i] - shift);
            acc[i] += o[i];
        }
    }
    for (i, (&v, o)) in xi.remainder().iter().zip(oi.into_remainder()).enumerate() {
        *o = exp::<FMA, SHORT>(v - shift);
        acc[i] += *o;
    }
}

/// `exp_sum` of 16-bit input (short polynomial): widened a block at a time into a stack
/// buffer, the blocks summed in the same lanes (the same bits as one loop over the widened row).
#[inline(always)]
pub(super) fn exp_sum_bits_body<const FMA: bool>(
    x: &[u16],
    widen: impl Fn(&[u16], &mut [f32]),
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
) -> f32 {
    let mut buf = [0f32; BLOCK];
    let mut acc = [0f32; LANES];
    for (b, (xs, os)) in x.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).enumerate() {
        let w = &mut buf[..xs.len()];
        widen(xs, w);
        exp_acc_body::<FMA, true>(w, shift, os, ahead.skip(b * BLOCK / LANES), &mut acc);
    }
    hsum(acc)
}

/// Elements of 16-bit input widened at a time into the lane code's stack buffer (a whole number
/// of 16-lane steps).
const BLOCK: usize = 256;

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
    pub(super) fn skip(self, steps: usize) -> Ahead {
        let off = (steps * self.step).min(self.bytes);
        Ahead { start: self.start.wrapping_add(off), bytes: self.bytes - off, step: self.step }
    }

    /// Prefetches the line of step `j` into every cache level (L1 too).
    #[inline(always)]
    pub(super) fn line(self, j: usize) {
        #[cfg(target_arch = "x86_64")]
        self.line_with::<{ std::arch::x86_64::_MM_HINT_T0 }>(j);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = j;
    }

    /// Prefetches the line of step `j` into L2 and beyond, not L1: for the AVX-512 loops, which
    /// read fast enough that lines fetched into L1 this far ahead evict the ones in use (one
    /// thread 21.9 -> 16.5 ms at 8x128x50000 f32; the AVX2 and portable loops gain nothing).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) fn line_l2(self, j: usize) {
        self.line_with::<{ std::arch::x86_64::_MM_HINT_T1 }>(j);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn line_with<const HINT: i32>(self, j: usize) {
        let off = j * self.step;
        if off < self.bytes && off.is_multiple_of(64) {
            // SAFETY: prefetching never faults, whatever the address; SSE is x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(self.start.wrapping_add(off).cast()) };
        }
    }
}

/// Asks for the 64-byte line holding `p` in every cache level ahead of a store through the
/// cache to it (the partial lines at the ends of a streamed store, the target's line): such a
/// store to a line not in cache waits for the line's read, and every later store, streaming ones
/// too, waits behind it. Prefetching never faults, whatever the address.
#[inline(always)]
pub(crate) fn line_for_store<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching has no architectural effect; SSE is part of the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `v * f - k`, as [`affine_body`] computes it (one rounding where the level has FMA), and
/// exactly `v * f` when `k` is +0 (no FMA call outside the level's own functions then; -0 takes
/// the general form, as the vector stores do, turning a product of -0 into +0).
#[inline(always)]
pub(super) fn mul_sub<const FMA: bool>(v: f32, f: f32, k: f32) -> f32 {
    if k.to_bits() == 0 {
        v * f
    } else {
        madd::<FMA>(v, f, -k)
    }
}

/// `out = x * f - k` ([`mul_sub`]). `out` may be longer than `x`.
#[inline(always)]
pub(super) fn scale_body<const FMA: bool>(x: &[f32], f: f32, k: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = mul_sub::<FMA>(v, f, k);
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub(super) fn widen_bf16_body(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s as u32) << 16);
    }
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays NaN (quietened); subnormal inputs
/// become a zero of the same sign, as the AVX-512 BF16 instruction does, so every level gives
/// the same bits. Otherwise the same bits as `half::bf16::from_f32`.
#[inline(always)]
pub(super) fn bf16_round(x: f32) -> u16 {
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

/// `out = bf16(x * f - k)`.
#[inline(always)]
pub(super) fn scale_bf16_body<const FMA: bool>(x: &[f32], f: f32, k: f32, out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16_round(mul_sub::<FMA>(v, f, k));
    }
}

/// f32 to f16 bits, rounding to nearest even as F16C does (overflow to infinity, subnormal
/// results, NaN quietened with the high bits of its payload kept): the bits of
/// `half::f16::from_f32`, in integer and float operations without branches that a compiler
/// vectorises (`half` converts one element per call, behind a run-time feature check where
/// the CPU has a conversion instruction: a third of the speed of bf16 on the portable level).
/// The same bits on every machine.
#[inline(always)]
pub(super) fn f16_round(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7FFF_FFFF;
    // a NaN: quiet, the payload's high bits
    let nan = 0x7E00 | ((a >> 13) & 0x3FF);
    // |x| in [2^-14, 2^16): the exponent rebased from 127 to 15, the 13 dropped bits rounded to
    // nearest even (a carry into the exponent is right, up to 65520 and above giving infinity)
    // (wrapping: below 2^-15 the rebased value wraps around, and is not taken then; a checked
    // add panicked there in debug builds)
    let normal = a.wrapping_sub(112 << 23).wrapping_add(0xFFF + ((a >> 13) & 1)) >> 13;
    // |x| below 2^-14: adding 0.5, whose ulp is the f16 subnormal step 2^-24, rounds at that
    // step (to nearest even); the low bits are then the f16 bits
    let small = (f32::from_bits(a) + 0.5).to_bits().wrapping_sub(0.5f32.to_bits());
    let h = if a > 0x7F80_0000 {
        nan
    } else if a >= 143 << 23 {
        0x7C00
    } else if a < 113 << 23 {
        small
    } else {
        normal
    };
    (h | sign) as u16
}

/// f16 bits to f32, exactly (NaN quietened, its payload kept): the bits of
/// `half::f16::to_f32`, without branches, for a compiler to vectorise (see [`f16_round`]).
#[inline(always)]
pub(super) fn f16_widen(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // a normal number: the exponent rebased from 15 to 127
    let normal = (em << 13) + (112 << 23);
    // infinity or NaN: exponent 255, a NaN quietened
    let special = (normal + (112 << 23)) | if em & 0x3FF != 0 { 0x0040_0000 } else { 0 };
    // zero or subnormal (`m · 2^-24`): `2^-14 · (1 + m/1024) − 2^-14`, exact
    let magic = f32::from_bits(113 << 23);
    let small = (f32::from_bits((em << 13) + (113 << 23)) - magic).to_bits();
    let bits = match em >> 10 {
        0 => small,
        31 => special,
        _ => normal,
    };
    f32::from_bits(bits | sign)
}

/// `out = f16(x * f - k)` (round to nearest even, as F16C does: [`f16_round`]).
#[inline(always)]
pub(super) fn scale_f16_body<const FMA: bool>(x: &[f32], f: f32, k: f32, out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f16_round(mul_sub::<FMA>(v, f, k));
    }
}

/// f16 bits to f32 (exact: [`f16_widen`]).
#[inline(always)]
pub(super) fn widen_f16_body(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16_widen(s);
    }
}

/// What the statistics pass computes per element beyond the plain loss (label smoothing,
/// soft-capping). Built once per call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ElemOpts {
    /// The soft-cap `c` (0: off): elements become `c · tanh(x / c)`.
    pub cap: f32,
    /// `1 / c` (0 when off).
    pub inv_cap: f32,
    /// Whether the (capped) elements are summed (label smoothing needs their mean).
    pub sum: bool,
}

/// One 16-lane step of [`exp_opts_inner`]: capped values and chain factors of `x`
/// (`neg_two_inv_cap`: `−2/c`).
#[inline(always)]
fn cap_lanes<const FMA: bool, const CAP: bool>(
    x: &[f32],
    o: ElemOpts,
    neg_two_inv_cap: f32,
) -> ([f32; LANES], [f32; LANES]) {
    let (mut z, mut s) = ([0f32; LANES], [1f32; LANES]);
    for i in 0..LANES.min(x.len()) {
        if CAP {
            (z[i], s[i]) = cap_and_chain::<FMA>(x[i] * neg_two_inv_cap, o.cap);
        } else {
            z[i] = x[i];
        }
    }
    (z, s)
}

/// [`exp_opts_body`] for one combination of options.
#[inline(always)]
fn exp_opts_inner<const FMA: bool, const SHORT: bool, const CAP: bool, const SUM: bool>(
    x: &[f32],
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
    (acc, zacc): (&mut [f32; LANES], &mut [f32; LANES]),
) {
    let n = x.len();
    let out = &mut out[..n];
    let body = n / LANES * LANES;
    let k = -2.0 * o.inv_cap;
    for (j, b) in (0..body).step_by(LANES).enumerate() {
        ahead.line(j);
        let (z, s) = cap_lanes::<FMA, CAP>(&x[b..b + LANES], o, k);
        let o = &mut out[b..b + LANES];
        for i in 0..LANES {
            let e = exp::<FMA, SHORT>(z[i] - shift);
            acc[i] += e;
            if SUM {
                zacc[i] += z[i] - shift;
            }
            o[i] = if CAP { e * s[i] } else { e };
        }
        if CAP && SUM {
            chain[b..b + LANES].copy_from_slice(&s);
        }
    }
    let (z, s) = cap_lanes::<FMA, CAP>(&x[body..], o, k);
    for i in 0..n - body {
        let e = exp::<FMA, SHORT>(z[i] - shift);
        acc[i] += e;
        if SUM {
            zacc[i] += z[i] - shift;
        }
        out[body + i] = if CAP { e * s[i] } else { e };
        if CAP && SUM {
            chain[body + i] = s[i];
        }
    }
}

/// The statistics pass of a chunk under per-element options: with `z = c · tanh(x / c)` (or
/// `x`) and `s = 1 − tanh²(x / c)` (or 1), writes `out = exp(z − shift) · s` and, when both
/// options are on, `chain = s`; returns `(Σ exp(z − shift), Σ (z − shift))` (the second is 0
/// unless `o.sum`; taken against the shift, so that a large common offset of the logits does
/// not cancel it away).
#[inline(always)]
pub(super) fn exp_opts_body<const FMA: bool, const SHORT: bool>(
    x: &[f32],
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    let (mut acc, mut zacc) = ([0f32; LANES], [0f32; LANES]);
    exp_opts_acc::<FMA, SHORT>(x, shift, o, out, chain, ahead, (&mut acc, &mut zacc));
    (hsum(acc), hsum(zacc))
}

/// [`exp_opts_body`] adding into the lanes `acc` (and `zacc`) as [`exp_acc_body`] does.
#[inline(always)]
fn exp_opts_acc<const FMA: bool, const SHORT: bool>(
    x: &[f32],
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
    lanes: (&mut [f32; LANES], &mut [f32; LANES]),
) {
    use exp_opts_inner as inner;
    let (ch, l) = (chain, lanes);
    match (o.cap != 0.0, o.sum) {
        (false, false) => exp_acc_body::<FMA, SHORT>(x, shift, out, ahead, l.0),
        (false, true) => inner::<FMA, SHORT, false, true>(x, shift, o, out, ch, ahead, l),
        (true, false) => inner::<FMA, SHORT, true, false>(x, shift, o, out, ch, ahead, l),
        (true, true) => inner::<FMA, SHORT, true, true>(x, shift, o, out, ch, ahead, l),
    }
}

/// [`exp_opts_body`] of 16-bit input (short polynomial), widened a block at a time, the blocks
/// summed in the same lanes.
#[inline(always)]
pub(super) fn exp_opts_bits_body<const FMA: bool>(
    x: &[u16],
    widen: impl Fn(&[u16], &mut [f32]),
    shift: f32,
    o: ElemOpts,
    out: &mut [f32],
    chain: &mut [f32],
    ahead: Ahead,
) -> (f32, f32) {
    let mut buf = [0f32; BLOCK];
    let (mut acc, mut zacc) = ([0f32; LANES], [0f32; LANES]);
    for (b, xs) in x.chunks(BLOCK).enumerate() {
        let w = &mut buf[..xs.len()];
        widen(xs, w);
        let lo = b * BLOCK;
        let ch = if chain.is_empty() { &mut chain[..0] } else { &mut chain[lo..] };
        let pf = ahead.skip(b * BLOCK / LANES);
        exp_opts_acc::<FMA, true>(w, shift, o, &mut out[lo..], ch, pf, (&mut acc, &mut zacc));
    }
    (hsum(acc), hsum(zacc))
}

/// `q = q · f − k · s` in place (`s = chain`, or 1 where `chain` is empty), fused where the level
/// has FMA: a chunk's gradient under label smoothing, before it is stored.
#[inline(always)]
pub(super) fn affine_body<const FMA: bool>(q: &mut [f32], f: f32, k: f32, chain: &[f32]) {
    if chain.is_empty() {
        for v in q.iter_mut() {
            *v = madd::<FMA>(*v, f, -k);
        }
    } else {
        for (v, &s) in q.iter_mut().zip(chain) {
            *v = madd::<FMA>(*v, f, -(k * s));
        }
    }
}

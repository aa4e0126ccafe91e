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
//! Every level sums in the same fixed order (element `i` of a chunk into lane `i % 16`, 16-bit
//! input too); levels differ in FMA and in the AVX-512 `exp`, so results are
//! bit-identical for a given level on any machine (whatever the thread count or buffer
//! alignment), and [`CpuSimd::Portable`] gives the same bits on every CPU.
//!
//! The `exp` and its error bound are documented in [`math`].

mod lanes;
mod math;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_opts;
#[cfg(target_arch = "x86_64")]
mod x86_side;
#[cfg(target_arch = "x86_64")]
mod x86_transpose;

use crate::spec::CpuSimd;
use lanes::*;
pub(crate) use lanes::{line_for_store, Ahead, ElemOpts};

/// Lanes per step: 16 f32 (one AVX-512 register, two AVX2 registers, four NEON registers).
pub(crate) const LANES: usize = 16;

// ---- one instantiation per level ------------------------------------------------------------

macro_rules! level {
    ($name:ident, $fma:literal $(, $feat:literal)?) => {
        mod $name {
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn affine(q: &mut [f32], f: f32, k: f32, chain: &[f32]) {
                affine_body::<$fma>(q, f, k, chain)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn max(x: &[f32]) -> f32 {
                max_body(x)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn max_bf16(x: &[u16]) -> f32 {
                max_lanes(x, |b| f32::from_bits((b as u32) << 16))
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn max_f16(x: &[u16]) -> f32 {
                max_lanes(x, f16_widen)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn widen_bf16(src: &[u16], dst: &mut [f32]) {
                widen_bf16_body(src, dst)
            }
        }
    };
}

/// The lane-code `exp` loops of a level (AVX-512 has its own, `x86::exp_sum_*512`).
macro_rules! lane_exp {
    ($name:ident, $fma:literal $(, $feat:literal)?) => {
        mod $name {
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn exp_sum(x: &[f32], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
                exp_sum_body::<$fma, false>(x, shift, out, ahead)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn exp_sum_bf16(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
                exp_sum_bits_body::<$fma>(x, widen_bf16_body, shift, out, ahead)
            }
        }
    };
}

/// The per-element option loops of a level (label smoothing, soft-capping) in lane code
/// (AVX-512 has its own, `x86_opts`); `$widen_f16` is the level's f16 conversion.
macro_rules! lane_opts {
    ($name:ident, $fma:literal, $widen_f16:expr $(, $feat:literal)?) => {
        mod $name {
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn exp_opts(
                x: &[f32],
                shift: f32,
                o: ElemOpts,
                out: &mut [f32],
                chain: &mut [f32],
                ahead: Ahead,
            ) -> (f32, f32) {
                exp_opts_body::<$fma, false>(x, shift, o, out, chain, ahead)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn exp_opts_bf16(
                x: &[u16],
                shift: f32,
                o: ElemOpts,
                out: &mut [f32],
                chain: &mut [f32],
                ahead: Ahead,
            ) -> (f32, f32) {
                exp_opts_bits_body::<$fma>(x, widen_bf16_body, shift, o, out, chain, ahead)
            }
            $(#[target_feature(enable = $feat)])?
            pub(super) unsafe fn exp_opts_f16(
                x: &[u16],
                shift: f32,
                o: ElemOpts,
                out: &mut [f32],
                chain: &mut [f32],
                ahead: Ahead,
            ) -> (f32, f32) {
                exp_opts_bits_body::<$fma>(x, $widen_f16, shift, o, out, chain, ahead)
            }
        }
    };
}

level!(portable, false);
lane_exp!(portable_exp, false);
lane_opts!(portable_opts, false, widen_f16_body);

#[cfg(target_arch = "x86_64")]
level!(avx2, true, "avx2,fma,f16c");
#[cfg(target_arch = "x86_64")]
level!(avx512, true, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");

/// The portable stores (no streaming; f16 through the lane code's conversions, [`f16_round`]).
mod portable_store {
    use super::*;
    pub(super) unsafe fn scale_f32(x: &[f32], f: f32, k: f32, out: &mut [f32], _stream: bool) {
        scale_body::<false>(x, f, k, out)
    }
    pub(super) unsafe fn scale_bf16(x: &[f32], f: f32, k: f32, out: &mut [u16], _stream: bool) {
        scale_bf16_body::<false>(x, f, k, out)
    }
    pub(super) unsafe fn scale_f16(x: &[f32], f: f32, k: f32, out: &mut [u16], _stream: bool) {
        scale_f16_body::<false>(x, f, k, out)
    }
    pub(super) unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        widen_f16_body(src, dst)
    }
    pub(super) unsafe fn exp_sum_f16(x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
        exp_sum_bits_body::<false>(x, widen_f16_body, shift, out, ahead)
    }
}

/// `out = exp(x - shift)` while prefetching; returns the sum.
type ExpSum = unsafe fn(&[f32], f32, &mut [f32], Ahead) -> f32;
/// The same over 16-bit input (bf16 or f16 bits), widened in registers.
type ExpSum16 = unsafe fn(&[u16], f32, &mut [f32], Ahead) -> f32;

/// The statistics loop under per-element options: `(sum, sum of elements)`.
type ExpOpts = unsafe fn(&[f32], f32, ElemOpts, &mut [f32], &mut [f32], Ahead) -> (f32, f32);
/// The same over 16-bit input.
type ExpOpts16 = unsafe fn(&[u16], f32, ElemOpts, &mut [f32], &mut [f32], Ahead) -> (f32, f32);

/// A copy of f32 into f32 (equal lengths).
type CopyInto = unsafe fn(&[f32], &mut [f32]);

/// A transposition of 16 rows in registers (see [`Kernels::transpose16`]).
type Transpose16 = unsafe fn(&[f32], usize, &mut [&mut [f32]], usize, Option<&[f32]>) -> usize;

/// A scaled store into one output dtype: `out = narrow(x * f - k)` (the product and the
/// difference rounded once where the level has FMA, as [`Kernels::affine`]; exactly
/// `narrow(x * f)` when `k` is +0), streaming when asked and the level can.
type ScaleInto<T> = unsafe fn(&[f32], f32, f32, &mut [T], bool);

/// A level's scaled stores that also prefetch their source (x86; the portable ones do not).
#[derive(Clone, Copy)]
struct ScaleAhead {
    f32: ScaleInto<f32>,
    bf16: ScaleInto<u16>,
    f16: ScaleInto<u16>,
}

/// `out = exp(x - shift)` and, step by step in the same loop, another row's scaled store
/// ([`Side`]); returns the sum.
type ExpSumSide = unsafe fn(Input<'_>, f32, &mut [f32], Ahead, Side<'_>) -> f32;

/// A scaled store, `dst = src * f` in the destination's dtype (streaming when `stream` and the
/// level can), to run inside a statistics loop: the previous row's gradient, whose memory
/// traffic then overlaps the arithmetic instead of following it.
pub(crate) struct Side<'a> {
    pub src: &'a [f32],
    pub f: f32,
    pub dst: SideDst<'a>,
    pub stream: bool,
    /// Every product is finite (a bf16 store may then skip the NaN handling where the level
    /// emulates the conversion; the bits are the same).
    pub finite: bool,
    /// An element whose 64-byte line is stored through the cache even when streaming (the
    /// row's target, which its writer rewrites just after: a streamed line is not rewritten).
    /// Read by the x86 levels' fused loops only (elsewhere no loop streams).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub cached: Option<usize>,
}

/// Where a [`Side`] store (or [`Kernels::scale_sub_ahead`]) writes: f32, or the bits of bf16 or
/// f16.
pub(crate) enum SideDst<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

/// A chunk of logits as the option loops take it.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl Input<'_> {
    /// Elements in the chunk.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::Bf16(b) | Input::F16(b) => b.len(),
        }
    }
}

/// The primitives of one level. The pointers are `unsafe fn` because the x86 ones require CPU
/// features: a `Kernels` holding them is only built by [`Kernels::select`] after run-time
/// detection confirmed those features, which is what makes the calls below sound.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub level: CpuSimd,
    max: unsafe fn(&[f32]) -> f32,
    max_bf16: unsafe fn(&[u16]) -> f32,
    max_f16: unsafe fn(&[u16]) -> f32,
    exp_sum: ExpSum,
    /// The fused form of `exp_sum` then the side's store, where the level has one: f32 input
    /// and store only, unless `side_16`.
    exp_sum_side: Option<ExpSumSide>,
    side_16: bool,
    exp_sum_bf16: ExpSum16,
    exp_sum_f16: ExpSum16,
    widen_bf16: unsafe fn(&[u16], &mut [f32]),
    widen_f16: unsafe fn(&[u16], &mut [f32]),
    scale_f32: ScaleInto<f32>,
    /// A streaming copy that prefetches its source line by line (x86 levels; the copy floor's).
    copy_ahead: Option<CopyInto>,
    /// The in-register transposition of 16 rows (x86 levels).
    transpose16: Option<Transpose16>,
    scale_bf16: ScaleInto<u16>,
    scale_bf16_finite: ScaleInto<u16>,
    scale_f16: ScaleInto<u16>,
    /// The streaming stores again, prefetching a long source ahead ([`Kernels::scale_sub_ahead`]).
    scale_ahead: ScaleAhead,
    exp_opts: ExpOpts,
    exp_opts_bf16: ExpOpts16,
    exp_opts_f16: ExpOpts16,
    affine: unsafe fn(&mut [f32], f32, f32, &[f32]),
    /// Whether the level's stores stream (x86 only: [`fence`](Self::fence) reads it).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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
            max_bf16: portable::max_bf16,
            max_f16: portable::max_f16,
            exp_sum: portable_exp::exp_sum,
            exp_sum_side: None,
            side_16: false,
            exp_sum_bf16: portable_exp::exp_sum_bf16,
            exp_sum_f16: portable_store::exp_sum_f16,
            widen_bf16: portable::widen_bf16,
            widen_f16: portable_store::widen_f16,
            scale_f32: portable_store::scale_f32,
            copy_ahead: None,
            transpose16: None,
            scale_bf16: portable_store::scale_bf16,
            scale_bf16_finite: portable_store::scale_bf16,
            scale_f16: portable_store::scale_f16,
            scale_ahead: ScaleAhead {
                f32: portable_store::scale_f32,
                bf16: portable_store::scale_bf16,
                f16: portable_store::scale_f16,
            },
            exp_opts: portable_opts::exp_opts,
            exp_opts_bf16: portable_opts::exp_opts_bf16,
            exp_opts_f16: portable_opts::exp_opts_f16,
            affine: portable::affine,
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
                max_bf16: avx2::max_bf16,
                max_f16: avx2::max_f16,
                exp_sum: x86_avx2::exp_sum_256,
                exp_sum_side: Some(x86_avx2::exp_sum_side_256),
                side_16: true,
                exp_sum_bf16: x86_avx2::exp_sum_bf16_256,
                exp_sum_f16: x86_avx2::exp_sum_f16_256,
                widen_bf16: avx2::widen_bf16,
                widen_f16: x86::widen_f16_256,
                scale_f32: x86::scale_f32_256::<false>,
                scale_ahead: ScaleAhead {
                    f32: x86::scale_f32_256::<true>,
                    bf16: x86::scale_bf16_256::<true>,
                    f16: x86::scale_f16_256::<true>,
                },
                copy_ahead: Some(x86::copy_ahead_256),
                transpose16: Some(x86_transpose::transpose16_256),
                scale_bf16: x86::scale_bf16_256::<false>,
                scale_bf16_finite: x86::scale_bf16_finite_256,
                scale_f16: x86::scale_f16_256::<false>,
                exp_opts: x86_avx2::exp_opts_256,
                exp_opts_bf16: x86_avx2::exp_opts_bf16_256,
                exp_opts_f16: x86_avx2::exp_opts_f16_256,
                affine: avx2::affine,
                streaming: true,
            }),
            #[cfg(target_arch = "x86_64")]
            CpuSimd::Avx512 => Some(Kernels {
                level,
                max: avx512::max,
                max_bf16: avx512::max_bf16,
                max_f16: avx512::max_f16,
                exp_sum: x86::exp_sum_512,
                exp_sum_side: Some(if is_x86_feature_detected!("avx512bf16") {
                    x86_side::exp_sum_side_512bf
                } else {
                    x86_side::exp_sum_side_512
                }),
                side_16: true,
                exp_sum_bf16: x86::exp_sum_bf16_512,
                exp_sum_f16: x86::exp_sum_f16_512,
                widen_bf16: avx512::widen_bf16,
                widen_f16: x86::widen_f16_512,
                scale_f32: x86::scale_f32_512::<false>,
                copy_ahead: Some(x86::copy_ahead_512),
                transpose16: Some(x86_transpose::transpose16_512),
                scale_bf16: if is_x86_feature_detected!("avx512bf16") {
                    x86::scale_bf16_512bf::<false>
                } else {
                    x86::scale_bf16_512::<false>
                },
                scale_ahead: ScaleAhead {
                    f32: x86::scale_f32_512::<true>,
                    bf16: if is_x86_feature_detected!("avx512bf16") {
                        x86::scale_bf16_512bf::<true>
                    } else {
                        x86::scale_bf16_512::<true>
                    },
                    f16: x86::scale_f16_512::<true>,
                },
                scale_bf16_finite: if is_x86_feature_detected!("avx512bf16") {
                    x86::scale_bf16_512bf::<false>
                } else {
                    x86::scale_bf16_finite_512
                },
                scale_f16: x86::scale_f16_512::<false>,
                exp_opts: x86_opts::exp_opts_512,
                exp_opts_bf16: x86_opts::exp_opts_bf16_512,
                exp_opts_f16: x86_opts::exp_opts_f16_512,
                affine: avx512::affine,
                streaming: true,
            }),
            #[cfg(not(target_arch = "x86_64"))]
            CpuSimd::Avx2 | CpuSimd::Avx512 => None,
        }
    }

    /// The maximum of a chunk as the loops take it (NaN skipped, `-inf` when empty), 16-bit
    /// input widened in registers (the same result as widening it into a buffer first).
    #[inline]
    pub fn max_of(&self, x: Input<'_>) -> f32 {
        // SAFETY: see the struct docs: the level's features were detected.
        unsafe {
            match x {
                Input::F32(v) => (self.max)(v),
                Input::Bf16(b) => (self.max_bf16)(b),
                Input::F16(b) => (self.max_f16)(b),
            }
        }
    }
    /// `out[..x.len()] = exp(x - shift)`, returning the sum of what was written, while
    /// prefetching `ahead`.
    #[inline]
    pub fn exp_sum(&self, x: &[f32], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
        // SAFETY: as above.
        unsafe { (self.exp_sum)(x, shift, out, ahead) }
    }
    /// Whether [`Kernels::exp_sum_side`] runs the store inside the statistics loop for this
    /// input (16-bit or f32) and store (16-bit or f32); otherwise it runs one after the other.
    #[inline]
    pub fn fuses_side(&self, input_16: bool, store_16: bool) -> bool {
        self.exp_sum_side.is_some() && (self.side_16 || !(input_16 || store_16))
    }
    /// [`Kernels::exp_sum`] (or [`Kernels::exp_sum_bits`]) and then the store of `side`
    /// ([`Kernels::scale_f32`] or the 16-bit `scale_sub_*` with an offset of +0), the same
    /// bits, in one loop where [`Kernels::fuses_side`] says so (the store's lines between the
    /// arithmetic's steps).
    #[inline]
    pub fn exp_sum_side(&self, x: Input<'_>, shift: f32, out: &mut [f32], ahead: Ahead, side: Side<'_>) -> f32 {
        let input_16 = !matches!(x, Input::F32(_));
        let store_16 = !matches!(side.dst, SideDst::F32(_));
        match self.exp_sum_side {
            // SAFETY: as above; the level takes this input and store (fuses_side).
            Some(f) if self.fuses_side(input_16, store_16) => unsafe { f(x, shift, out, ahead, side) },
            _ => {
                let r = match x {
                    Input::F32(x) => self.exp_sum(x, shift, out, ahead),
                    Input::Bf16(b) => self.exp_sum_bits(true, b, shift, out, ahead),
                    Input::F16(b) => self.exp_sum_bits(false, b, shift, out, ahead),
                };
                match side.dst {
                    SideDst::F32(d) => self.scale_f32(side.src, side.f, d, side.stream),
                    SideDst::Bf16(d) if side.finite => {
                        self.scale_sub_bf16_finite(side.src, side.f, 0.0, d, side.stream)
                    }
                    SideDst::Bf16(d) => self.scale_sub_bf16(side.src, side.f, 0.0, d, side.stream),
                    SideDst::F16(d) => self.scale_sub_f16(side.src, side.f, 0.0, d, side.stream),
                }
                r
            }
        }
    }
    /// [`Kernels::exp_sum`] over bf16 (`bf16 = true`) or f16 bits, widened on the fly.
    #[inline]
    pub fn exp_sum_bits(&self, bf16: bool, x: &[u16], shift: f32, out: &mut [f32], ahead: Ahead) -> f32 {
        let f = if bf16 { self.exp_sum_bf16 } else { self.exp_sum_f16 };
        // SAFETY: as above.
        unsafe { f(x, shift, out, ahead) }
    }
    /// The statistics loop under per-element options ([`ElemOpts`]) over f32 input (`bits:
    /// None`) or 16-bit input (`Some(bf16?)`): with `z` the capped element and `s` its chain
    /// factor, writes `out = exp(z − shift) · s` (and `chain = s` when capping and summing; pass
    /// an empty `chain` otherwise), returns `(Σ exp(z − shift), Σ (z − shift))` (the second
    /// against the shift: a large common offset of the logits does not cancel it away).
    #[inline]
    pub fn exp_opts(
        &self,
        x: Input<'_>,
        shift: f32,
        o: ElemOpts,
        out: &mut [f32],
        chain: &mut [f32],
        ahead: Ahead,
    ) -> (f32, f32) {
        // SAFETY: as above.
        unsafe {
            match x {
                Input::F32(x) => (self.exp_opts)(x, shift, o, out, chain, ahead),
                Input::Bf16(x) => (self.exp_opts_bf16)(x, shift, o, out, chain, ahead),
                Input::F16(x) => (self.exp_opts_f16)(x, shift, o, out, chain, ahead),
            }
        }
    }
    /// `q = q · f − k · chain` in place (`chain` empty: `− k`), fused where the level has FMA.
    #[inline]
    pub fn affine(&self, q: &mut [f32], f: f32, k: f32, chain: &[f32]) {
        // SAFETY: as above.
        unsafe { (self.affine)(q, f, k, chain) }
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
    /// Whether [`Kernels::copy_ahead`] copies at this level.
    pub fn has_copy_ahead(&self) -> bool {
        self.copy_ahead.is_some()
    }
    /// `out = x` with streaming stores and the source prefetched ahead, line by line, where the
    /// level has such a copy (`false`, and nothing written, elsewhere); call [`Kernels::fence`]
    /// after, as for any streaming store.
    #[inline]
    pub fn copy_ahead(&self, x: &[f32], out: &mut [f32]) -> bool {
        match self.copy_ahead {
            // SAFETY: the level's features were checked when the kernels were selected.
            Some(copy) => {
                unsafe { copy(x, out) };
                true
            }
            None => false,
        }
    }
    /// Sixteen rows of a column-major matrix into rows, in registers where the level can:
    /// `rows[i][j] = src[i + j * m] (+ bias[j])` for `i < 16` and `j` below the returned count
    /// of columns (a multiple of 16, at most `n`; 0 at the portable level, or where `m < 16`,
    /// there are not 16 rows or a slice is too short), which the caller finishes.
    #[inline]
    pub fn transpose16(&self, src: &[f32], m: usize, rows: &mut [&mut [f32]], n: usize, bias: Option<&[f32]>) -> usize {
        const R: usize = 16;
        let fits = n > 0
            && m >= R
            && rows.len() == R
            && rows.iter().all(|r| r.len() >= n)
            && (n - 1).checked_mul(m).and_then(|x| x.checked_add(R)).is_some_and(|x| x <= src.len())
            && bias.is_none_or(|b| b.len() >= n);
        match self.transpose16 {
            // SAFETY: the level's features were detected; the bounds the kernel reads and writes
            // within were checked just above.
            Some(t) if fits => unsafe { t(src, m, rows, n, bias) },
            _ => 0,
        }
    }
    /// `out = x * f`; with `stream`, streaming stores where the level has them (call
    /// [`Kernels::fence`] before the memory is handed to another thread).
    #[inline]
    pub fn scale_f32(&self, x: &[f32], f: f32, out: &mut [f32], stream: bool) {
        self.scale_sub_f32(x, f, 0.0, out, stream)
    }
    /// `out = x * f - k`: the same bits as [`Kernels::affine`] of `x` with no chain factors and
    /// then [`Kernels::scale_f32`] by 1, in one pass (`k` +0: [`Kernels::scale_f32`]).
    #[inline]
    pub fn scale_sub_f32(&self, x: &[f32], f: f32, k: f32, out: &mut [f32], stream: bool) {
        // SAFETY: as above.
        unsafe { (self.scale_f32)(x, f, k, out, stream) }
    }
    /// [`Kernels::scale_sub_f32`] into bf16 bits, round to nearest even (subnormal results become
    /// a zero of the same sign); `stream` as for [`Kernels::scale_f32`].
    #[inline]
    pub fn scale_sub_bf16(&self, x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
        // SAFETY: as above.
        unsafe { (self.scale_bf16)(x, f, k, out, stream) }
    }
    /// [`Kernels::scale_sub_bf16`] for results known to be finite (no NaN or infinity): the same
    /// bits, cheaper where the level emulates the conversion (AVX2, AVX-512 without BF16).
    #[inline]
    pub fn scale_sub_bf16_finite(&self, x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
        // SAFETY: as above.
        unsafe { (self.scale_bf16_finite)(x, f, k, out, stream) }
    }
    /// [`Kernels::scale_sub_f32`] into f16 bits, round to nearest even.
    #[inline]
    pub fn scale_sub_f16(&self, x: &[f32], f: f32, k: f32, out: &mut [u16], stream: bool) {
        // SAFETY: as above.
        unsafe { (self.scale_f16)(x, f, k, out, stream) }
    }
    /// `out = x * f` in the output's dtype, streamed, with the source prefetched ahead: for a
    /// long source read once from memory (`scale_into`), not for the pass's stores from its
    /// scratch rows, which are in L2 already. The same bits as [`Kernels::scale_f32`] and the
    /// 16-bit stores with an offset of +0.
    #[inline]
    pub fn scale_sub_ahead(&self, x: &[f32], f: f32, out: SideDst<'_>) {
        // SAFETY: as above.
        unsafe {
            match out {
                SideDst::F32(o) => (self.scale_ahead.f32)(x, f, 0.0, o, true),
                SideDst::Bf16(o) => (self.scale_ahead.bf16)(x, f, 0.0, o, true),
                SideDst::F16(o) => (self.scale_ahead.f16)(x, f, 0.0, o, true),
            }
        }
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

//! The stores that run inside a statistics loop ([`Side`](super::Side)): the previous row's
//! gradient, one 64-byte line at a time between the loop's steps, so that its memory traffic
//! overlaps the arithmetic, for every input and store dtype.

use super::lanes::{scale_bf16_body, scale_body, scale_f16_body};
use super::x86::{bf16x16, bf16x32, exp_sum_bf16_with_512, exp_sum_f16_with_512, exp_sum_with_512, split, NEAREST};
use super::{Ahead, Input};
use std::arch::x86_64::*;

/// The dtype of a [`Side`](super::Side) store's destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SideKind {
    F32,
    Bf16,
    F16,
}

/// A [`Side`](super::Side) store cut for a loop of 16-element steps: its head up to a cache
/// line (when streaming) is written at once, then the level's `line*(j)` writes the body one
/// whole 64-byte line at a time (a streaming line left half-written while the arithmetic runs
/// costs a partial write) from inside the loop: f32 one line per step `j`, 16-bit one line
/// (32 elements) after every second step (odd `j`). [`finish`](Self::finish) writes the steps
/// the loop did not reach and the tail. The same bits as the level's `scale_f32` (or
/// `scale_sub_bf16`, `scale_sub_f16` with an offset of +0).
pub(super) struct SideLines<'a> {
    src: &'a [f32],
    stream: bool,
    /// The steps the statistics loop writes: the body's, or when streaming with a
    /// [`cached`](super::Side::cached) element in the body, those before its line (the rest,
    /// that line through the cache, is [`finish`](Self::finish)'s: a check per line inside the
    /// loop cost the AVX2 loops 2–12%).
    loop_steps: usize,
    /// The first step of the line stored through the cache (`usize::MAX`: none).
    cached_step: usize,
    finite: bool,
    kind: SideKind,
    /// The store's memory (`len` elements of the `kind`'s type, borrowed for `'a`).
    dst: *mut u8,
    len: usize,
    f: f32,
    head: usize,
    /// The body's length in 16-element steps (even for 16-bit stores).
    steps: usize,
    _dst: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> SideLines<'a> {
    /// Cuts `side` and writes its head (with the features every level that runs these loops
    /// has: the lane code's `mul_add` is then one instruction, not a call per element).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn new(side: super::Side<'a>) -> Self {
        use super::SideDst;
        let (src, f, stream, finite, cached) = (side.src, side.f, side.stream, side.finite, side.cached);
        let (kind, dst, len, head, body) = match side.dst {
            SideDst::F32(d) => {
                let len = src.len().min(d.len());
                let (head, body) = split(d, len, 64, 16, stream);
                scale_body::<true>(&src[..head], f, 0.0, &mut d[..head]);
                (SideKind::F32, d.as_mut_ptr().cast::<u8>(), len, head, body)
            }
            SideDst::Bf16(d) => {
                let len = src.len().min(d.len());
                let (head, body) = split(d, len, 64, 32, stream);
                scale_bf16_body::<true>(&src[..head], f, 0.0, &mut d[..head]);
                (SideKind::Bf16, d.as_mut_ptr().cast::<u8>(), len, head, body)
            }
            SideDst::F16(d) => {
                let len = src.len().min(d.len());
                let (head, body) = split(d, len, 64, 32, stream);
                scale_f16_body::<true>(&src[..head], f, 0.0, &mut d[..head]);
                (SideKind::F16, d.as_mut_ptr().cast::<u8>(), len, head, body)
            }
        };
        let steps = body / 16;
        // the body's line holding `cached` (one in the head or the tail is stored through the
        // cache anyway): lines of 64 bytes, one step of 16 f32 or two of 16 16-bit elements
        let per_line = if kind == SideKind::F32 { 16 } else { 32 };
        let cached_step = match cached {
            Some(t) if stream && t >= head && t < head + body => (t - head) / per_line * per_line / 16,
            _ => usize::MAX,
        };
        SideLines {
            src,
            stream,
            loop_steps: steps.min(cached_step),
            cached_step,
            finite,
            kind,
            dst,
            len,
            f,
            head,
            steps,
            _dst: std::marker::PhantomData,
        }
    }

    /// The destination's dtype, and for bf16 whether every product is finite.
    pub(super) fn kind(&self) -> (SideKind, bool) {
        (self.kind, self.finite)
    }

    /// Stores one 64-byte line of the body at element `s`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn put512(&mut self, s: usize, v: __m512i) {
        let size = if self.kind == SideKind::F32 { 4 } else { 2 };
        // SAFETY: the callers' `s` starts a whole line of the body, within the store's memory,
        // which `self` borrows exclusively; when streaming, it is 64-byte aligned (split).
        unsafe {
            let p = self.dst.add(s * size).cast::<__m512i>();
            if self.stream {
                _mm512_stream_si512(p, v);
            } else {
                _mm512_storeu_si512(p, v);
            }
        }
    }

    /// `src * f` of the 16 elements at `s`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn product16(&self, s: usize) -> __m512 {
        // SAFETY: s + 16 <= head + 16 * steps <= len <= src.len() (the callers' steps).
        _mm512_mul_ps(unsafe { _mm512_loadu_ps(self.src.as_ptr().add(s)) }, _mm512_set1_ps(self.f))
    }

    /// Step `j` of an f32 body with AVX-512, if the body has it.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn line512(&mut self, j: usize) {
        if j < self.loop_steps {
            let s = self.head + 16 * j;
            let v = _mm512_castps_si512(self.product16(s));
            self.put512(s, v);
        }
    }

    /// Steps `j - 1` and `j` (odd `j`) of a bf16 body with AVX-512, emulating the rounding
    /// (without the NaN handling when `FINITE`).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub(super) fn line512_bf16<const FINITE: bool>(&mut self, j: usize) {
        if j % 2 == 1 && j < self.loop_steps {
            let s = self.head + 16 * (j - 1);
            self.put512(s, bf16x32::<FINITE>(self.product16(s), self.product16(s + 16)));
        }
    }

    /// [`line512_bf16`](Self::line512_bf16) with the AVX-512 BF16 conversion (same bits; the
    /// instruction has no NaN handling to skip, so `FINITE` changes nothing).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    pub(super) fn line512_bf16bf<const _FINITE: bool>(&mut self, j: usize) {
        if j % 2 == 1 && j < self.loop_steps {
            let s = self.head + 16 * (j - 1);
            let (lo, hi) = (self.product16(s), self.product16(s + 16));
            // SAFETY: a vector of 32 bf16 is 64 bytes, as __m512i.
            let v: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo)) };
            self.put512(s, v);
        }
    }

    /// Steps `j - 1` and `j` (odd `j`) of an f16 body with AVX-512.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn line512_f16(&mut self, j: usize) {
        if j % 2 == 1 && j < self.loop_steps {
            let s = self.head + 16 * (j - 1);
            let lo = _mm512_cvtps_ph::<NEAREST>(self.product16(s));
            let hi = _mm512_cvtps_ph::<NEAREST>(self.product16(s + 16));
            self.put512(s, _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi));
        }
    }

    /// Stores half a line (32 bytes) of the body at element `s` with AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn put256(&mut self, s: usize, v: __m256i) {
        let size = if self.kind == SideKind::F32 { 4 } else { 2 };
        // SAFETY: the callers' `s` starts 32 bytes of the body, within the store's memory,
        // which `self` borrows exclusively; when streaming, it is 32-byte aligned (split).
        unsafe {
            let p = self.dst.add(s * size).cast::<__m256i>();
            if self.stream {
                _mm256_stream_si256(p, v);
            } else {
                _mm256_storeu_si256(p, v);
            }
        }
    }

    /// `src * f` of the 8 elements at `s`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn product8(&self, s: usize) -> __m256 {
        // SAFETY: s + 8 <= head + 16 * steps <= len <= src.len() (the callers' steps).
        _mm256_mul_ps(unsafe { _mm256_loadu_ps(self.src.as_ptr().add(s)) }, _mm256_set1_ps(self.f))
    }

    /// Steps `j - 1` and `j` (odd `j`) of a bf16 body with AVX2 (two halves of one line), as
    /// `scale_bf16_256` (without the NaN handling when `FINITE`).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) fn line256_bf16<const FINITE: bool>(&mut self, j: usize) {
        if j % 2 == 1 && j < self.loop_steps {
            for h in 0..2 {
                let s = self.head + 16 * (j - 1) + 16 * h;
                let (lo, hi) = (self.product8(s), self.product8(s + 8));
                self.put256(s, bf16x16::<FINITE>(lo, hi));
            }
        }
    }

    /// Steps `j - 1` and `j` (odd `j`) of an f16 body with AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub(super) fn line256_f16(&mut self, j: usize) {
        if j % 2 == 1 && j < self.loop_steps {
            for h in 0..2 {
                let s = self.head + 16 * (j - 1) + 16 * h;
                let lo = _mm256_cvtps_ph::<NEAREST>(self.product8(s));
                let hi = _mm256_cvtps_ph::<NEAREST>(self.product8(s + 8));
                self.put256(s, _mm256_set_m128i(hi, lo));
            }
        }
    }

    /// Step `j` of an f32 body with AVX2 (two halves of one line), if the body has it.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) fn line256(&mut self, j: usize) {
        if j >= self.loop_steps {
            return;
        }
        let fv = _mm256_set1_ps(self.f);
        for h in 0..2 {
            let s = self.head + 16 * j + 8 * h;
            // SAFETY: s + 8 <= head + 16 * steps <= len, within `src` and the store's memory
            // (f32 here); when streaming, dst + s is 32-byte aligned.
            unsafe {
                let v = _mm256_mul_ps(_mm256_loadu_ps(self.src.as_ptr().add(s)), fv);
                let p = self.dst.cast::<f32>().add(s);
                if self.stream {
                    _mm256_stream_ps(p, v);
                } else {
                    _mm256_storeu_ps(p, v);
                }
            }
        }
    }

    /// The steps of the body the statistics loop (of `from` steps) did not write through `line`,
    /// the cached line through the cache, then the tail.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn finish(mut self, from: usize, mut line: impl FnMut(&mut Self, usize)) {
        let start = from.min(self.loop_steps);
        self.loop_steps = self.steps;
        let stream = self.stream;
        // the step that writes the cached line (a 16-bit line is written at its second step)
        let cached = if self.kind == SideKind::F32 { self.cached_step } else { self.cached_step.saturating_add(1) };
        for j in start..self.steps {
            self.stream = stream && j != cached;
            line(&mut self, j);
        }
        self.stream = stream;
        let done = self.head + 16 * self.steps;
        let (src, f, n) = (&self.src[done..self.len], self.f, self.len - done);
        // SAFETY: done..len lies within the store's memory, of the kind's type, borrowed by
        // `self` for 'a.
        unsafe {
            match self.kind {
                SideKind::F32 => {
                    scale_body::<true>(src, f, 0.0, std::slice::from_raw_parts_mut(self.dst.cast::<f32>().add(done), n))
                }
                SideKind::Bf16 => scale_bf16_body::<true>(
                    src,
                    f,
                    0.0,
                    std::slice::from_raw_parts_mut(self.dst.cast::<u16>().add(done), n),
                ),
                SideKind::F16 => scale_f16_body::<true>(
                    src,
                    f,
                    0.0,
                    std::slice::from_raw_parts_mut(self.dst.cast::<u16>().add(done), n),
                ),
            }
        }
    }
}

/// The statistics loop of `x` (f32, bf16 or f16) with `side(j)` after each step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[inline]
fn exp_sum_input_with_512(x: Input<'_>, shift: f32, out: &mut [f32], ahead: Ahead, side: impl FnMut(usize)) -> f32 {
    // SAFETY: the same features as this function.
    unsafe {
        match x {
            Input::F32(x) => exp_sum_with_512(x, shift, out, ahead, side),
            Input::Bf16(b) => exp_sum_bf16_with_512(b, shift, out, ahead, side),
            Input::F16(b) => exp_sum_f16_with_512(b, shift, out, ahead, side),
        }
    }
}

/// A level's statistics loop that runs `side(j)` after each of its 16-element steps `j`.
pub(super) trait StatsLoop {
    /// # Safety
    /// The caller has the loop's CPU features.
    unsafe fn run(x: Input<'_>, shift: f32, out: &mut [f32], ahead: Ahead, side: impl FnMut(usize)) -> f32;
}

/// The AVX-512 statistics loop.
struct Loop512;

impl StatsLoop for Loop512 {
    #[inline(always)]
    unsafe fn run(x: Input<'_>, shift: f32, out: &mut [f32], ahead: Ahead, side: impl FnMut(usize)) -> f32 {
        // SAFETY: the caller has the features (the trait's contract).
        unsafe { exp_sum_input_with_512(x, shift, out, ahead, side) }
    }
}

/// The statistics loop `S` of `x` with step `j` of `lines` (`line(lines, j)`) after its step
/// `j`, then the steps the loop did not reach and the tail of the store.
///
/// # Safety
/// The caller has the features of `S` and those `line` needs (every level's include AVX2, FMA
/// and F16C); this is inlined into it, so that the loop and `line` are compiled with them.
#[inline(always)]
pub(super) unsafe fn with_lines<S: StatsLoop>(
    x: Input<'_>,
    shift: f32,
    out: &mut [f32],
    ahead: Ahead,
    mut lines: SideLines<'_>,
    line: impl Fn(&mut SideLines<'_>, usize) + Copy,
) -> f32 {
    let steps = out.len().min(x.len()) / 16;
    // SAFETY: the caller has the features (above).
    unsafe {
        let r = S::run(x, shift, out, ahead, |j| line(&mut lines, j));
        lines.finish(steps, line);
        r
    }
}

/// [`exp_sum_512`](super::x86::exp_sum_512) (or its 16-bit forms) with the store of `side` in
/// the same loop, one line of the store per 64 bytes of it (the store's memory traffic under the
/// arithmetic): the same bits as the two calls one after the other. `$line_bf16` is the bf16
/// line of the CPU, told whether every product is finite.
macro_rules! exp_sum_side_512 {
    ($name:ident, $feat:literal, $line_bf16:ident) => {
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn $name(
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
                    (SideKind::F32, _) => with_lines::<Loop512>(x, shift, out, ahead, lines, |l, j| l.line512(j)),
                    (SideKind::Bf16, true) => {
                        with_lines::<Loop512>(x, shift, out, ahead, lines, |l, j| l.$line_bf16::<true>(j))
                    }
                    (SideKind::Bf16, false) => {
                        with_lines::<Loop512>(x, shift, out, ahead, lines, |l, j| l.$line_bf16::<false>(j))
                    }
                    (SideKind::F16, _) => with_lines::<Loop512>(x, shift, out, ahead, lines, |l, j| l.line512_f16(j)),
                }
            }
        }
    };
}

exp_sum_side_512!(exp_sum_side_512, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c", line512_bf16);
exp_sum_side_512!(exp_sum_side_512bf, "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c", line512_bf16bf);

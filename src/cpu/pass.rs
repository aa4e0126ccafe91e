//! The two passes over one row (module docs of [`super`]): the statistics pass, which reads a
//! row chunk by chunk and keeps its exponentials, and the pending gradient, written from them;
//! with what a pipelined task runs between the chunks of the next row's statistics. The buffers
//! they work in are in `scratch`.

use super::row::{RowMath, RowStats};
use super::scratch::{RowExps, Scratch};
use super::simd::{line_for_store, Ahead, ElemOpts, Input, Kernels, Side, SideDst};
use super::{CHECK_SUM, CHUNK, MARGIN};
use crate::dtype::{DType, Logit};
use std::ops::Range;

/// The chunk as f32: itself, or widened into `buf`.
#[inline]
pub(crate) fn load<'a, L: Logit>(k: &Kernels, src: &'a [L], buf: &'a mut [f32]) -> &'a [f32] {
    match (L::as_f32(src), L::as_bits(src)) {
        (Some(x), _) => x,
        (None, Some(bits)) => {
            let buf = &mut buf[..src.len()];
            match L::DTYPE {
                DType::BF16 => k.widen_bf16(bits, buf),
                _ => k.widen_f16(bits, buf),
            }
            buf
        }
        (None, None) => unreachable!("every Logit is f32 or 16-bit"),
    }
}

/// `out = x * f` in the output's dtype (equal lengths), streaming when asked.
#[inline]
pub(crate) fn store_scaled<G: Logit>(k: &Kernels, x: &[f32], f: f32, out: &mut [G], stream: bool) {
    store_products(k, x, f, 0.0, out, stream, false)
}

/// [`store_scaled`], streamed, with the source prefetched ahead ([`Kernels::scale_sub_ahead`]:
/// for a long source read once from memory, not for a scratch row in L2).
#[inline]
pub(super) fn store_scaled_ahead<G: Logit>(k: &Kernels, x: &[f32], f: f32, out: &mut [G]) {
    if let Some(dst) = dst_of(out) {
        k.scale_sub_ahead(x, f, dst);
    }
}

/// `out` as the kernels' stores take it (`None` never happens: every `Logit` is f32 or 16-bit).
#[inline]
fn dst_of<G: Logit>(out: &mut [G]) -> Option<SideDst<'_>> {
    Some(match G::DTYPE {
        DType::F32 => SideDst::F32(G::as_f32_mut(out)?),
        DType::BF16 => SideDst::Bf16(G::as_bits_mut(out)?),
        _ => SideDst::F16(G::as_bits_mut(out)?),
    })
}

/// `out = x * f - off` ([`Kernels::scale_sub_f32`]) in the output's dtype, told whether every
/// result is finite (a bf16 store then skips the NaN handling where the level emulates the
/// conversion; the bits are the same).
#[inline]
pub(super) fn store_products<G: Logit>(
    k: &Kernels,
    x: &[f32],
    f: f32,
    off: f32,
    out: &mut [G],
    stream: bool,
    finite: bool,
) {
    // a zero offset of either sign is the plain product (as `affine` would leave it)
    let off = if off == 0.0 { 0.0 } else { off };
    if let Some(o) = G::as_f32_mut(out) {
        return k.scale_sub_f32(x, f, off, o, stream);
    }
    if let Some(bits) = G::as_bits_mut(out) {
        match G::DTYPE {
            DType::BF16 if finite => k.scale_sub_bf16_finite(x, f, off, bits, stream),
            DType::BF16 => k.scale_sub_bf16(x, f, off, bits, stream),
            _ => k.scale_sub_f16(x, f, off, bits, stream),
        }
    }
}

/// `out = exp(chunk - shift)` (with the options: of the capped chunk, times the chain factor,
/// chain factors into `chain`), returning the sum and, with smoothing, the sum of its (capped)
/// logits. 16-bit input is widened inside the loop and gets
/// the short polynomial, matched to its precision.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) fn exp_chunk<L: Logit>(
    k: &Kernels,
    m: &RowMath,
    chunk: &[L],
    shift: f32,
    out: &mut [f32],
    chain: &mut [f32],
    pf: Ahead,
    buf: &mut [f32],
) -> (f32, f32) {
    if let Some(o) = m.elem {
        return k.exp_opts(input_of(chunk), shift, o, out, chain, pf);
    }
    let sum = match L::as_bits(chunk) {
        Some(bits) => k.exp_sum_bits(L::DTYPE == DType::BF16, bits, shift, out, pf),
        None => k.exp_sum(load(k, chunk, buf), shift, out, pf),
    };
    (sum, 0.0)
}

/// One logit soft-capped as the level's element loop caps it (`x` itself without
/// soft-capping): the target's value and the reference must be the loop's own, or a row whose
/// target dominates could come out with a loss below 0 (by the two `tanh`s' difference, ~1e-6
/// at `c` = 30) and a one-entry row with a loss other than 0.
#[inline]
pub(super) fn cap_one(k: &Kernels, m: &RowMath, x: Input<'_>) -> f32 {
    cap_one_with_chain(k, m, x).0
}

/// [`cap_one`] and the element loop's chain factor `1 − tanh²(x / c)` of the same element (1
/// without soft-capping): from the loop's `u = exp(−2x/c)`, accurate where `tanh` saturates,
/// where `1 − (z / c)²` of the rounded capped value `z` keeps only an error of an ulp of 1.
#[inline]
pub(super) fn cap_one_with_chain(k: &Kernels, m: &RowMath, x: Input<'_>) -> (f32, f32) {
    match m.elem.filter(|o| o.cap != 0.0) {
        Some(o) => {
            let (mut out, mut chain) = ([0f32; 1], [0f32; 1]);
            // summing: the loop returns the capped element itself, and with soft-capping and
            // summing both on it keeps the chain factor apart
            let z = k.exp_opts(x, 0.0, ElemOpts { sum: true, ..o }, &mut out, &mut chain, Ahead::NONE).1;
            (z, chain[0])
        }
        None => match x {
            Input::F32(v) => (v[0], 1.0),
            Input::Bf16(b) => (half::bf16::from_bits(b[0]).to_f32(), 1.0),
            Input::F16(b) => (half::f16::from_bits(b[0]).to_f32(), 1.0),
        },
    }
}

/// A chunk as the kernels take it.
#[inline]
pub(super) fn input_of<L: Logit>(chunk: &[L]) -> Input<'_> {
    match (L::as_f32(chunk), L::as_bits(chunk)) {
        (Some(x), _) => Input::F32(x),
        (None, Some(b)) if L::DTYPE == DType::BF16 => Input::Bf16(b),
        (None, Some(b)) => Input::F16(b),
        (None, None) => unreachable!("every Logit is f32 or 16-bit"),
    }
}

/// Chunks to prefetch ahead of the one being read (into L2 at AVX-512, every level otherwise:
/// [`Ahead::line_l2`](super::simd::Ahead)).
const PREFETCH_CHUNKS: usize = 4;

/// What a statistics pass runs between its chunks: the previous row's gradient, chunk by chunk
/// (`()`: nothing).
pub(super) trait Interleave {
    /// Before chunk `c`'s statistics (and any store of chunk `c`).
    fn before(&mut self, _c: usize) {}
    /// Chunk `c`'s store as a plain scale, to run inside the statistics loop of chunk `c`
    /// (asked only where that loop is the plain one; `input_16`: over 16-bit logits) when the
    /// kernels fuse such a store ([`Kernels::fuses_side`]); `None`: [`after`](Self::after)
    /// writes it instead.
    fn side(&mut self, _c: usize, _input_16: bool) -> Option<Side<'_>> {
        None
    }
    /// After chunk `c`'s statistics: what is left of chunk `c`'s store.
    fn after(&mut self, _c: usize) {}
}

impl Interleave for () {}

/// The previous row of a pipelined task: its pending gradient and its kept exponentials.
pub(super) struct PrevRow<'a, 'b, G> {
    pub(super) k: &'a Kernels,
    pub(super) m: &'a RowMath,
    pub(super) p: &'a mut Option<Pending<'b, G>>,
    pub(super) e: &'a mut RowExps,
    pub(super) stream: bool,
    /// The chunk whose store [`Interleave::side`] handed out.
    pub(super) fused: Option<usize>,
}

impl<G: Logit> Interleave for PrevRow<'_, '_, G> {
    fn before(&mut self, c: usize) {
        if let Some(p) = self.p.as_ref() {
            p.prefetch_cached_lines(c, self.stream);
        }
    }

    fn side(&mut self, c: usize, input_16: bool) -> Option<Side<'_>> {
        let PrevRow { k, m, p, e, stream, fused } = self;
        if !k.fuses_side(input_16, G::DTYPE != DType::F32) {
            return None;
        }
        let side = p.as_mut()?.side(m, e, c, *stream)?;
        *fused = Some(c);
        Some(side)
    }

    fn after(&mut self, c: usize) {
        let Some(p) = self.p.as_mut() else { return };
        if self.fused.take() == Some(c) {
            p.fix_target(self.k, self.m, c);
        } else {
            p.write_chunk(self.k, self.m, self.e, c, self.stream);
        }
    }
}

/// The sum of `x` without `x[skip]`, in 16 f32 lanes (the same bits on every machine).
fn sum_apart(x: &[f32], skip: usize) -> f32 {
    let mut lanes = [0f32; 16];
    let mut add = |part: &[f32]| {
        let mut it = part.chunks_exact(16);
        for v in &mut it {
            for (l, &e) in lanes.iter_mut().zip(v) {
                *l += e;
            }
        }
        for (l, &e) in lanes.iter_mut().zip(it.remainder()) {
            *l += e;
        }
    };
    add(&x[..skip]);
    add(&x[skip + 1..]);
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
    }
    lanes[0]
}

/// [`exp_chunk`] with element `apart` of the chunk (the row's target) left out of the returned
/// sum, its exponential still written: `(sum without it, logit sum with it, sum with it)`.
///
/// A confident row's target term is near 1 and every other term tiny: summed in the same f32
/// lane, each later term of that lane fell below half an ulp of it, and the row's small loss
/// `ln(1 + Σ_{j≠y} e^{z_j − z_y})` lost its relative accuracy (2e-3 at a margin of 18 over
/// V = 32000). The target's term is taken in f64 from its logit instead ([`RowStats`]).
#[inline]
#[allow(clippy::too_many_arguments)]
fn exp_chunk_apart<L: Logit>(
    k: &Kernels,
    m: &RowMath,
    chunk: &[L],
    apart: Option<usize>,
    shift: f32,
    out: &mut [f32],
    chain: &mut [f32],
    pf: Ahead,
    buf: &mut [f32],
) -> (f32, f32, f32) {
    let Some(o) = apart else {
        let (sum, zsum) = exp_chunk(k, m, chunk, shift, out, chain, pf, buf);
        return (sum, zsum, sum);
    };
    if m.elem.is_none() {
        // the plain loop: the whole chunk, then its kept exponentials summed again without the
        // target's (in L1; cheaper than cutting the loop)
        let (sum, zsum) = exp_chunk(k, m, chunk, shift, out, chain, pf, buf);
        return (sum_apart(&out[..chunk.len()], o), zsum, sum);
    }
    let mut part = |r: Range<usize>, pf: Ahead| {
        if r.is_empty() {
            return (0.0, 0.0);
        }
        let chain = if chain.is_empty() { &mut chain[..] } else { &mut chain[r.start..] };
        exp_chunk(k, m, &chunk[r.clone()], shift, &mut out[r.start..], chain, pf, buf)
    };
    let (before, z0) = part(0..o, pf);
    let (own, z1) = part(o..o + 1, Ahead::NONE);
    let (after, z2) = part(o + 1..chunk.len(), Ahead::NONE);
    (before + after, z0 + z1 + z2, before + own + after)
}

/// Statistics pass over one row. Keeps the exponentials in `keep` when given (and long enough);
/// runs `inter`'s steps for chunk `c` with and after it (the previous row's gradient).
/// `ahead` is the task's input from this row on, for prefetching. The target (`None`: a slice
/// of the row without it) is capped as the loop caps it, and its exponential joins the sum in
/// the row's statistics apart from the f32 lanes of the others ([`exp_chunk_apart`],
/// [`RowStats`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn stats_pass<L: Logit>(
    k: &Kernels,
    m: &RowMath,
    row: &[L],
    ahead: &[L],
    target: Option<usize>,
    mut keep: Option<&mut RowExps>,
    s: &mut Scratch,
    inter: &mut impl Interleave,
) -> RowStats {
    let mut st = RowStats::EMPTY;
    for (c, chunk) in row.chunks(CHUNK).enumerate() {
        inter.before(c);
        let apart = target.and_then(|t| t.checked_sub(c * CHUNK)).filter(|&o| o < chunk.len());
        let p = (c + PREFETCH_CHUNKS) * CHUNK;
        let pf = if p < ahead.len() { Ahead::of(&ahead[p..(p + CHUNK).min(ahead.len())]) } else { Ahead::NONE };
        let (out, chain) = match keep.as_deref_mut().filter(|e| e.kept()) {
            Some(e) => (&mut e.exps[c * CHUNK..], chain_from(&mut e.chain, c * CHUNK)),
            None => (&mut s.tmp[..], &mut s.chain[..]),
        };
        if st.shift == f32::NEG_INFINITY {
            // no finite reference yet: take this chunk's maximum first
            st.raise(cap_one(k, m, Input::F32(&[k.max_of(input_of(chunk))])));
        }
        // the plain loop takes the previous row's store of this chunk into its own loop
        let x = if m.elem.is_none() { Some(input_of(chunk)) } else { None };
        let side = x.and_then(|x| inter.side(c, !matches!(x, Input::F32(_))));
        let mut used = st.exp_shift();
        let (mut sum, mut zsum, all) = match (x, side) {
            (Some(x), Some(side)) => {
                let sum = k.exp_sum_side(x, used, &mut *out, pf, side);
                (apart.map_or(sum, |o| sum_apart(&out[..chunk.len()], o)), 0.0, sum)
            }
            _ => exp_chunk_apart(k, m, chunk, apart, used, &mut *out, &mut *chain, pf, &mut s.buf),
        };
        if all > CHECK_SUM || all.is_nan() {
            // a large sum (or +inf, NaN) may come from a much larger maximum: if the chunk has
            // one (or +inf), move the reference and redo the chunk
            let top = cap_one(k, m, Input::F32(&[k.max_of(input_of(chunk))]));
            if top > st.shift + MARGIN {
                st.raise(top);
                used = st.exp_shift();
                (sum, zsum, _) = exp_chunk_apart(k, m, chunk, apart, used, out, chain, Ahead::NONE, &mut s.buf);
            }
        }
        st.others += sum as f64;
        if m.elem.is_some_and(|o| o.sum) {
            // the loop summed `z − shift`: the shift goes back in here, in f64
            st.logit_sum += zsum as f64 + chunk.len() as f64 * used as f64;
        }
        if let Some(e) = keep.as_deref_mut().filter(|e| e.kept()) {
            e.shifts[c] = st.shift;
        }
        inter.after(c);
    }
    if let Some(t) = target {
        let (z, chain) = cap_one_with_chain(k, m, input_of(&row[t..=t]));
        st.target_logit = z as f64;
        st.target_chain = chain as f64;
    }
    st
}

/// `chain[from..]`, or the empty slice when no chain factors are kept.
#[inline]
fn chain_from(chain: &mut [f32], from: usize) -> &mut [f32] {
    if chain.is_empty() {
        chain
    } else {
        &mut chain[from..]
    }
}

/// A row whose statistics are known and whose gradient is still to be written.
pub(super) struct Pending<'a, G> {
    pub(super) out: &'a mut [G],
    pub(super) st: RowStats,
    pub(super) target: usize,
    pub(super) coef: f32,
    /// [`RowMath::row_scale`] of the row.
    scale: f64,
    /// Whether the row's sum is finite (it then bounds every kept exponential).
    finite_sum: bool,
}

impl<'a, G: Logit> Pending<'a, G> {
    pub(super) fn new(m: &RowMath, out: &'a mut [G], st: RowStats, target: usize, coef: f32) -> Self {
        let (scale, finite_sum) = (m.row_scale(&st, coef), st.sum_exp().is_finite());
        Pending { out, st, target, coef, scale, finite_sum }
    }

    /// Turns kept `exp · s` values of chunk `c` (with shift `shift`) into the gradient and
    /// stores them: one multiply, or with smoothing `q · f − off` (inside the store itself, or,
    /// with soft-capping too, first in place with each element's chain factor).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store(
        &mut self,
        k: &Kernels,
        m: &RowMath,
        q: &mut [f32],
        chain: &[f32],
        lo: usize,
        shift: f32,
        stream: bool,
    ) {
        let hi = lo + q.len();
        let f = m.grad_factor(&self.st, self.scale, shift);
        let off = m.smoothing_offset(self.coef);
        // a finite row sum bounds every kept exponential: with finite factors, every product is
        let finite = self.finite_sum && f.is_finite() && off.is_finite();
        let (f, off) = if off != 0.0 && !chain.is_empty() {
            // with soft-capping the offset is scaled by each element's chain factor first
            k.affine(q, f, off, chain);
            (1.0, 0.0)
        } else {
            // `q · f − off` in the store itself: the same bits as `affine` and then the store
            (f, off)
        };
        // streamed but for the target's line, which goes through the cache because its target
        // entry is rewritten just after (`write_target`): the parts before and after it stream
        let cached = if stream { self.cached_line(lo..hi) } else { hi..hi };
        for (r, stream) in [(lo..cached.start, stream), (cached.clone(), false), (cached.end..hi, stream)] {
            if !r.is_empty() {
                store_products(k, &q[r.start - lo..r.end - lo], f, off, &mut self.out[r], stream, finite);
            }
        }
        self.write_target(k, m, lo..hi);
    }

    /// Asks for the lines of chunk `c`'s gradient that a streaming store of it writes through
    /// the cache, ahead of that store: the line its end shares with the next chunk or row (when
    /// the chunk does not end on a line), the row's first line (when the row does not start on
    /// one; mostly in cache already, from the previous row's end) and the target's line. A
    /// store to a line that is not in cache waits for the line's read from memory, and the
    /// streaming stores behind it wait too: with a gradient 16 bytes off a line (a large
    /// `Vec`'s), once per chunk, 4–15% of a 16-bit pass on a Xeon at AVX-512, up to 22% at AVX2.
    pub(super) fn prefetch_cached_lines(&self, c: usize, stream: bool) {
        for i in self.cached_line_elements(c, stream).into_iter().flatten() {
            line_for_store(&self.out[i]);
        }
    }

    /// An element of each line [`prefetch_cached_lines`](Self::prefetch_cached_lines) asks for.
    fn cached_line_elements(&self, c: usize, stream: bool) -> [Option<usize>; 3] {
        let lo = c * CHUNK;
        if !stream || lo >= self.out.len() {
            return [None; 3];
        }
        let [end, first] = ChunkEdges::of(self.out).elements(c);
        let hi = (lo + CHUNK).min(self.out.len());
        [end, first, (lo..hi).contains(&self.target).then_some(self.target)]
    }

    /// The elements of `r` in the target's 64-byte line of the gradient (`r.end..r.end` when
    /// the target is not in `r`): a streamed line is not rewritten, and the target entry is.
    fn cached_line(&self, r: Range<usize>) -> Range<usize> {
        if !r.contains(&self.target) {
            return r.end..r.end;
        }
        let size = std::mem::size_of::<G>();
        // elements of the target's line before it (the gradient's elements are `size`-aligned)
        let before = (self.out[self.target..].as_ptr() as usize % 64) / size;
        // (the line may begin before the row's first element)
        let start = self.target.saturating_sub(before).max(r.start);
        start..(self.target + (64 / size - before)).min(r.end)
    }

    /// The target entry, `coef · (softmax − 1)`, when it lies in `r` (after that range's store).
    fn write_target(&mut self, k: &Kernels, m: &RowMath, r: Range<usize>) {
        if r.contains(&self.target) {
            // through the level's store, as every other entry (its bf16 rounding flushes what
            // `G::from_f32` would keep as a subnormal)
            let g = [m.target_grad(&self.st, self.coef)];
            store_scaled(k, &g, 1.0, &mut self.out[self.target..=self.target], false);
        }
    }

    /// Chunk `c`'s store when it is a plain scale of the kept exponentials (no smoothing), for a
    /// statistics loop to run; [`fix_target`](Self::fix_target) finishes it.
    fn side<'s>(&'s mut self, m: &RowMath, e: &'s RowExps, c: usize, stream: bool) -> Option<Side<'s>> {
        let lo = c * CHUNK;
        let hi = (lo + CHUNK).min(self.out.len());
        if lo >= hi || !e.kept() || m.smoothing_offset(self.coef) != 0.0 {
            return None;
        }
        let f = m.grad_factor(&self.st, self.scale, e.shifts[c]);
        // all streamed but the target's line (`Side::cached`)
        let cached = (lo..hi).contains(&self.target).then(|| self.target - lo);
        let dst = dst_of(&mut self.out[lo..hi])?;
        // as in `store`: a finite row sum bounds every kept exponential
        let finite = self.finite_sum && f.is_finite();
        Some(Side { src: &e.exps[lo..hi], f, dst, stream, finite, cached })
    }

    /// The target entry of chunk `c`, after a [`side`](Self::side) store.
    fn fix_target(&mut self, k: &Kernels, m: &RowMath, c: usize) {
        let lo = c * CHUNK;
        self.write_target(k, m, lo..(lo + CHUNK).min(self.out.len()));
    }

    /// Writes chunk `c` of the gradient from the row's kept exponentials.
    pub(super) fn write_chunk(&mut self, k: &Kernels, m: &RowMath, e: &mut RowExps, c: usize, stream: bool) {
        let lo = c * CHUNK;
        let hi = (lo + CHUNK).min(self.out.len());
        let chain = if e.chain.is_empty() { &[][..] } else { &e.chain[lo..hi] };
        self.store(k, m, &mut e.exps[lo..hi], chain, lo, e.shifts[c], stream);
    }

    /// Writes the whole gradient: from `e` when it was kept, else by re-reading the logits
    /// (`row`; `None` when the logits are `out` itself) and recomputing the exponentials.
    pub(super) fn write<L: Logit>(
        mut self,
        k: &Kernels,
        m: &RowMath,
        e: &mut RowExps,
        row: Option<&[L]>,
        s: &mut Scratch,
        stream: bool,
    ) {
        // a recomputed row (at least 16 MiB) streams as a kept one does, unless in place: its
        // lines were just read and are in cache
        let stream = stream && (e.kept() || row.is_some());
        self.prefetch_cached_lines(0, stream);
        if e.kept() {
            for c in 0..self.out.len().div_ceil(CHUNK) {
                self.prefetch_cached_lines(c + 1, stream);
                self.write_chunk(k, m, e, c, stream);
            }
            return;
        }
        let shift = self.st.exp_shift();
        for c in 0..self.out.len().div_ceil(CHUNK) {
            self.prefetch_cached_lines(c + 1, stream);
            let lo = c * CHUNK;
            let n = (self.out.len() - lo).min(CHUNK);
            // the same exponentials as the statistics pass took (in place, `out` is the logits)
            let (tmp, chain) = (&mut s.tmp[..n], &mut s.chain[..]);
            match row {
                Some(row) => exp_chunk(k, m, &row[lo..lo + n], shift, tmp, chain, Ahead::NONE, &mut s.buf),
                None => exp_chunk(k, m, &self.out[lo..lo + n], shift, tmp, chain, Ahead::NONE, &mut s.buf),
            };
            let chain = if s.chain.is_empty() { &[][..] } else { &s.chain[..n] };
            self.store(k, m, &mut s.tmp[..n], chain, lo, self.st.shift, stream);
        }
    }
}

/// The partial lines at the ends of the chunks of a buffer stored chunk by chunk with streaming
/// stores, which such a store writes through the cache: to ask for a chunk ahead, as
/// [`Pending::prefetch_cached_lines`] does. Keeps the buffer's address only (never read
/// through), so the buffer can be borrowed mutably for the stores meanwhile.
pub(super) struct ChunkEdges<G> {
    base: *const G,
    len: usize,
}

impl<G> ChunkEdges<G> {
    pub(super) fn of(buf: &[G]) -> Self {
        ChunkEdges { base: buf.as_ptr(), len: buf.len() }
    }

    /// An element of chunk `c`'s partial last line, and of the buffer's partial first line when
    /// `c` is 0 (none past the end).
    fn elements(&self, c: usize) -> [Option<usize>; 2] {
        let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(self.len));
        if lo >= hi {
            return [None; 2];
        }
        let on_line = |i: usize| (self.base.wrapping_add(i) as usize).is_multiple_of(64);
        [(!on_line(hi)).then_some(hi - 1), (lo == 0 && !on_line(0)).then_some(0)]
    }

    /// Prefetches the lines of [`elements`](Self::elements) for stores to them.
    pub(super) fn ask(&self, c: usize) {
        for i in self.elements(c).into_iter().flatten() {
            line_for_store(self.base.wrapping_add(i));
        }
    }
}

/// Zeros a row's gradient (positions without a target).
pub(super) fn zero<G: Logit>(k: &Kernels, out: &mut [G], stream: bool) {
    static ZEROS: [f32; CHUNK] = [0.0; CHUNK];
    let edges = ChunkEdges::of(out);
    if stream {
        edges.ask(0);
    }
    for (c, o) in out.chunks_mut(CHUNK).enumerate() {
        if stream {
            edges.ask(c + 1);
        }
        store_products(k, &ZEROS[..o.len()], 0.0, 0.0, o, stream, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RowOptions;

    /// Every element a streaming store of a chunk writes through the cache (the head before the
    /// first aligned block, the tail after the last whole one, the target's line) lies on a line
    /// asked for ahead: at this chunk or, for its head, at the chunk before (whose tail line it
    /// shares). Both cuts the stores make: 64-byte lines (AVX-512, and every fused store) and
    /// 32-byte halves (the AVX2 stores); for a row's gradient (`Pending`, with its target) and
    /// for a buffer zeroed or scaled chunk by chunk (`ChunkEdges`).
    fn check_prefetched_lines<G: Logit>(per_line: usize) {
        let m = RowMath::new(&RowOptions::default(), 8);
        let mut buf = [G::default(); 3 * CHUNK + 200];
        let base = buf.as_ptr().align_offset(64);
        let size = std::mem::size_of::<G>();
        for skew in 0..per_line {
            for len in [1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 37, 3 * CHUNK] {
                for target in [0, len / 2, len - 1] {
                    let out = &mut buf[base + skew..base + skew + len];
                    let start = out.as_ptr() as usize;
                    let line = |i: usize| (start + i * size) / 64;
                    let edges = ChunkEdges::of(out);
                    let p = Pending::new(&m, out, RowStats::EMPTY, target, 1.0);
                    let asked = |c: usize, with_target: bool| -> Vec<usize> {
                        let row = p.cached_line_elements(c, true).into_iter().flatten();
                        let bare = edges.elements(c).into_iter().flatten();
                        if with_target {
                            row.map(line).collect()
                        } else {
                            bare.map(line).collect()
                        }
                    };
                    for (align, block) in [(64, per_line), (32, per_line / 2)] {
                        for c in 0..len.div_ceil(CHUNK) {
                            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(len));
                            let head = (start + lo * size).wrapping_neg() % align / size;
                            let head = head.min(hi - lo);
                            let body = (hi - lo - head) / block * block;
                            let edge: Vec<usize> = (lo..lo + head).chain(lo + head + body..hi).collect();
                            for with_target in [true, false] {
                                let mut cached = edge.clone();
                                if with_target && (lo..hi).contains(&target) {
                                    cached.push(target);
                                }
                                let mut ahead = asked(c, with_target);
                                if c > 0 {
                                    ahead.extend(asked(c - 1, with_target));
                                }
                                for i in cached {
                                    assert!(
                                        ahead.contains(&line(i)),
                                        "skew {skew}, len {len}, target {target}, cut {align}: element {i} of chunk {c} not asked for (target: {with_target})"
                                    );
                                }
                            }
                            assert!(p.cached_line_elements(c, false).iter().all(Option::is_none));
                        }
                    }
                    // nothing asked for past the end
                    assert!(edges.elements(len.div_ceil(CHUNK)).iter().all(Option::is_none));
                }
            }
        }
    }

    #[test]
    fn the_lines_a_streaming_store_writes_through_the_cache_are_asked_for_ahead() {
        check_prefetched_lines::<f32>(16);
        check_prefetched_lines::<half::bf16>(32);
    }
}

//! The tiled schedule of the fused linear path on CUDA ([`LinearSchedule::Tiles`]), an
//! alternative to the chunk loop of [`sweep`](super::sweep) for large vocabularies.
//!
//! The chunk loop holds a chunk's gradient rows for the whole vocabulary, so its chunks are a
//! few hundred rows at most and every chunk streams all of `W` through its products. Here a
//! chunk of `R` rows is cut again into vocabulary blocks of `V_b` columns, and only one block's
//! logits exist at a time:
//!
//! 1. per block, `z = h_c·W_bᵀ (+ b_b)` (f32) and the split's statistics kernel on it, each
//!    block's statistics of a row merged into the previous blocks' (`fold`: the operations, in
//!    the order, of the gradient kernel's merge of ranks, so reruns are bit-identical);
//! 2. per block again, the same product, the split's gradient kernel (the merged statistics as
//!    one rank's) writing `G_b`, then `d h_c (+)= G_b·W_b` into an f32 accumulator (the caller's `d hidden` when it
//!    is f32), `d W_b (+)= G_bᵀ·h_c` and `d b_b (+)= Σ G_b`;
//! 3. a 16-bit `d hidden` gets the accumulator's rows rounded once (`fwl_narrow_*`).
//!
//! Four products instead of three (the logits twice), but each has `R` rows (thousands) against
//! `V_b` columns, so `W` is read three times per chunk (and `d W` read and written once) rather
//! than once per `C/4` rows. A call that wants no gradient stops after step 1, with one
//! gradient-kernel launch per chunk that writes the rows' losses only.
//!
//! **Memory** beyond inputs and gradients (`V_b` = `min(cols, V)`): `R·V_b` f32 logits, `R·V_b`
//! 16-bit gradients (16-bit inputs), `4·R·H` bytes of `d hidden` accumulator (16-bit
//! `d hidden` only), the merged statistics (`4·R·words`), `R` ones with a bias (not counted by
//! the budget), and the split's `O(B·T)` plan.

use super::blas::{blas_type, Bound, Operand, Product};
use super::scale::scaled_for;
use super::sweep::Operands;
use super::{CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs, DeviceLinearOutput, DEFAULT_BUDGET};
use crate::cuda::split::CudaSharded;
use crate::cuda::{drv, output, DeviceInputs};
use crate::dtype::{DType, Logit, TokenId};
use crate::error::{Error, Result};
use crate::linear::{Chunking, LinearShape};
use crate::parallel::VocabSlice;
use crate::spec::LossSpec;
use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{CudaStream, DevicePtrMut};
use std::ops::Range;
use std::sync::Arc;

/// How a fused linear call on CUDA orders its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearSchedule {
    /// Chunks of rows over the whole vocabulary (the [module docs](super)).
    #[default]
    Chunks,
    /// Chunks of rows cut into vocabulary blocks of this many columns (at least 1), each block's
    /// logits computed twice: per block the logits and their statistics (merged into the
    /// previous blocks'), then per block the logits again, the gradient and the products of
    /// `d hidden` (summed in f32), `d weight` and `d bias`. Memory `R·(4·V_b + s·V_b + 4·H +
    /// 4·words)` bytes, `V_b = min(cols, V)`, `R` from the budget (`s`: 2 for 16-bit inputs,
    /// else 0; `4·H` for a 16-bit `d hidden` only; `words`: 3, 5 with label smoothing), plus `R`
    /// ones with a bias. Not yet timed on a GPU.
    Tiles {
        /// Columns per vocabulary block (`V_b`).
        cols: usize,
    },
}

impl LinearSchedule {
    /// From `FWL_CUDA_LINEAR_TILES`: a column count selects [`Tiles`](Self::Tiles) with it;
    /// unset, empty or 0 [`Chunks`](Self::Chunks). Anything else is an error.
    pub fn from_env() -> Result<LinearSchedule> {
        match std::env::var("FWL_CUDA_LINEAR_TILES") {
            Ok(s) => Self::parse(Some(&s)),
            Err(std::env::VarError::NotPresent) => Self::parse(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Error::InvalidChunking("FWL_CUDA_LINEAR_TILES: not a column count (not UTF-8)".into()))
            }
        }
    }

    fn parse(var: Option<&str>) -> Result<LinearSchedule> {
        match var.map(str::trim) {
            None | Some("") => Ok(LinearSchedule::Chunks),
            Some(s) => match s.parse::<usize>() {
                Ok(0) => Ok(LinearSchedule::Chunks),
                Ok(cols) => Ok(LinearSchedule::Tiles { cols }),
                Err(_) => Err(Error::InvalidChunking(format!("FWL_CUDA_LINEAR_TILES={s:?}: not a column count"))),
            },
        }
    }
}

/// A tiled call's cut: `r` rows per chunk, `vb` vocabulary columns per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::cuda) struct TileCut {
    pub r: usize,
    pub vb: usize,
}

impl TileCut {
    /// The cut of `shape` for blocks of `cols` columns, rows from `chunking` counting the
    /// per-row buffers: logits, 16-bit gradients, the `d hidden` accumulator when `acc`, the
    /// merged statistics (`words` floats).
    pub(in crate::cuda) fn new(
        dtype: DType,
        chunking: Chunking,
        shape: LinearShape,
        cols: usize,
        acc: bool,
        words: usize,
    ) -> Result<TileCut> {
        if cols == 0 {
            return Err(Error::InvalidChunking("0 columns per vocabulary block".into()));
        }
        let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
        let vb = cols.min(v).max(1);
        let wide = dtype == DType::F32;
        let row_bytes = 4 * vb + if wide { 0 } else { dtype.size() * vb } + if acc { 4 * h } else { 0 } + 4 * words;
        let mut r = chunking.rows_for(DEFAULT_BUDGET, row_bytes, n)?;
        if r > 64 && !matches!(chunking, Chunking::Rows(_)) {
            r -= r % 64;
        }
        Ok(TileCut { r, vb })
    }

    /// Vocabulary blocks of a call of `v` columns.
    #[cfg(test)]
    fn blocks(&self, v: usize) -> usize {
        v.div_ceil(self.vb)
    }
}

/// A tiled call's operands: the chunk loop's ([`Operands`]: `z` holds `r · vb` f32, `g16`
/// `r · vb` of the inputs' dtype, `ones` `r`), the merged statistics (`r · words` f32) and, when
/// `d hidden` is 16-bit, its f32 sum (`r · H`).
pub(in crate::cuda) struct TileOperands {
    pub base: Operands,
    pub partials: u64,
    pub acc: Option<u64>,
}

/// The work a tiled call queues, apart from its order (the device's in the crate, host stand-ins
/// in the tests).
pub(in crate::cuda) trait TileSteps {
    /// One product.
    fn gemm(&mut self, p: Product) -> Result<()>;
    /// The statistics of rows `rows`' columns `cols` (f32 logits at `z`, `cols.len()` per row)
    /// into `words` f32 per row at `out`, merged into what `out` holds when `fold`.
    fn stats(&mut self, rows: Range<usize>, cols: Range<usize>, z: u64, out: u64, fold: bool) -> Result<()>;
    /// The rows' losses and the gradient of their columns `cols` at `g` (over `z` for f32
    /// inputs), from the rows' merged statistics at `merged` (`rows.len() · words` f32); with
    /// `g` 0 the losses only (`cols` the whole vocabulary, `z` not read).
    fn grad(&mut self, rows: Range<usize>, cols: Range<usize>, z: u64, g: u64, merged: u64) -> Result<()>;
    /// `n` f32 at `src` rounded into the 16-bit `d hidden` at `dst`.
    fn narrow(&mut self, src: u64, dst: u64, n: usize) -> Result<()>;
}

/// Queues a tiled call's work (see the [module docs](self)) in order; returns the chunks.
pub(in crate::cuda) fn queue_tiles(
    dtype: DType,
    shape: LinearShape,
    cut: TileCut,
    ops: &TileOperands,
    steps: &mut dyn TileSteps,
) -> Result<usize> {
    let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
    let TileCut { r, vb } = cut;
    let wide = dtype == DType::F32;
    let ty = blas_type(dtype);
    let es = dtype.size() as u64;
    let f32_ = cudaDataType_t::CUDA_R_32F;
    let gp = if wide { ops.base.z } else { ops.base.g16 };
    // where d h_c adds up: the accumulator, else the caller's (f32) rows
    let dh_sum = ops.base.d_hidden.map(|(p, t, s)| match ops.acc {
        Some(a) => (a, f32_, 4, 0usize),
        None => (p, t, s, 1),
    });
    let mut chunks = 0;
    for r0 in (0..n).step_by(r) {
        let m = r.min(n - r0);
        let rows = r0..r0 + m;
        let hrows = Operand { ptr: ops.base.hidden + (r0 * h) as u64 * es, ty, ld: h };
        let logits = |steps: &mut dyn TileSteps, c0: usize, w: usize| -> Result<()> {
            let z = Operand { ptr: ops.base.z, ty: f32_, ld: w };
            if let Some(bp) = ops.base.bias {
                // z (m x w, row-major) = 1 · b_b: column-major (w x m) = (b_b as w x 1) · (ones as 1 x m)
                let b = Operand { ptr: bp + c0 as u64 * es, ty, ld: w };
                let o = Operand { ptr: ops.base.ones, ty, ld: 1 };
                steps.gemm(Product {
                    alpha: 1.0,
                    ta: false,
                    tb: false,
                    m: w,
                    n: m,
                    k: 1,
                    a: b,
                    b: o,
                    c: z,
                    accumulate: false,
                })?;
            }
            // z (+)= h_c · W_bᵀ: column-major (w x m) = op_T(W_b as H x w) · (h_c as H x m)
            let wb = Operand { ptr: ops.base.weight + (c0 * h) as u64 * es, ty, ld: h };
            let p = Product {
                alpha: 1.0,
                ta: true,
                tb: false,
                m: w,
                n: m,
                k: h,
                a: wb,
                b: hrows,
                c: z,
                accumulate: ops.base.bias.is_some(),
            };
            steps.gemm(p)
        };
        for c0 in (0..v).step_by(vb) {
            let w = vb.min(v - c0);
            logits(steps, c0, w)?;
            steps.stats(rows.clone(), c0..c0 + w, ops.base.z, ops.partials, c0 > 0)?;
        }
        if ops.base.d_hidden.is_none() && ops.base.d_weight.is_none() && ops.base.d_bias.is_none() {
            // the loss only: the merged statistics give the rows' losses, no second pass
            steps.grad(rows.clone(), 0..v, ops.base.z, 0, ops.partials)?;
            chunks += 1;
            continue;
        }
        for (k, c0) in (0..v).step_by(vb).enumerate() {
            let w = vb.min(v - c0);
            logits(steps, c0, w)?;
            steps.grad(rows.clone(), c0..c0 + w, ops.base.z, gp, ops.partials)?;
            let (g, u) = (Operand { ptr: gp, ty, ld: w }, ops.base.unscale);
            if let Some((dp, dty, des, caller)) = dh_sum {
                // d h_c (m x H) (+)= G_b · W_b: column-major (H x m) = (W_b as H x w) · (G_b as w x m)
                let c = Operand { ptr: dp + (caller * r0 * h * des) as u64, ty: dty, ld: h };
                let wb = Operand { ptr: ops.base.weight + (c0 * h) as u64 * es, ty, ld: h };
                steps.gemm(Product {
                    alpha: u,
                    ta: false,
                    tb: false,
                    m: h,
                    n: m,
                    k: w,
                    a: wb,
                    b: g,
                    c,
                    accumulate: k > 0,
                })?;
            }
            let acc = ops.base.accumulate || r0 > 0;
            if let Some((dp, dty, des)) = ops.base.d_weight {
                // d W_b (w x H) (+)= G_bᵀ · h_c: column-major (H x w) = (h_c as H x m) · op_T(G_b as w x m)
                let c = Operand { ptr: dp + (c0 * h * des) as u64, ty: dty, ld: h };
                steps.gemm(Product {
                    alpha: u,
                    ta: false,
                    tb: true,
                    m: h,
                    n: w,
                    k: m,
                    a: hrows,
                    b: g,
                    c,
                    accumulate: acc,
                })?;
            }
            if let Some((dp, dty, des)) = ops.base.d_bias {
                // d b_b (w) (+)= Σ_rows G_b: column-major (w x 1) = (G_b as w x m) · (ones as m x 1)
                let c = Operand { ptr: dp + (c0 * des) as u64, ty: dty, ld: w };
                let o = Operand { ptr: ops.base.ones, ty, ld: m };
                steps.gemm(Product {
                    alpha: u,
                    ta: false,
                    tb: false,
                    m: w,
                    n: 1,
                    k: m,
                    a: g,
                    b: o,
                    c,
                    accumulate: acc,
                })?;
            }
        }
        if let (Some(a), Some((dp, _, des))) = (ops.acc, ops.base.d_hidden) {
            steps.narrow(a, dp + (r0 * h * des) as u64, m * h)?;
        }
        chunks += 1;
    }
    Ok(chunks)
}

/// The device's [`TileSteps`]: cuBLAS and the split's kernels over the whole vocabulary.
struct DeviceTiles<'a> {
    blas: &'a Bound<'a>,
    loss: &'a crate::cuda::CudaLoss,
    st: &'a mut CudaSharded,
    stream: &'a Arc<CudaStream>,
    dtype: DType,
    vocab: usize,
    words: usize,
    /// The partials buffer's length in f32.
    partials_len: usize,
}

impl DeviceTiles<'_> {
    fn cols(&self, cols: Range<usize>) -> Result<VocabSlice> {
        VocabSlice::new(cols.start, cols.len(), self.vocab)
    }

    /// The merged statistics' length for `rows`, within the buffer.
    fn merged_len(&self, rows: &Range<usize>) -> Result<usize> {
        let n = rows.len() * self.words;
        if n > self.partials_len {
            return Err(Error::ExchangeLength { what: "tile partials", expected: n, got: self.partials_len });
        }
        Ok(n)
    }
}

impl TileSteps for DeviceTiles<'_> {
    fn gemm(&mut self, p: Product) -> Result<()> {
        self.blas.gemm(p)
    }

    fn stats(&mut self, rows: Range<usize>, cols: Range<usize>, z: u64, out: u64, fold: bool) -> Result<()> {
        let (cols, n) = (self.cols(cols)?, self.merged_len(&rows)?);
        self.st.launch_stats_of::<f32>(self.stream, rows, cols, z, (out, n), fold)
    }

    fn grad(&mut self, rows: Range<usize>, cols: Range<usize>, z: u64, g: u64, merged: u64) -> Result<()> {
        let (cols, len) = (self.cols(cols)?, self.merged_len(&rows)?);
        let (s, q) = (self.stream, (merged, len));
        match self.dtype {
            DType::F32 => self.st.launch_grad_of::<f32, f32>(s, rows, cols, q, z, g),
            DType::F16 => self.st.launch_grad_of::<f32, half::f16>(s, rows, cols, q, z, g),
            DType::BF16 => self.st.launch_grad_of::<f32, half::bf16>(s, rows, cols, q, z, g),
        }
    }

    fn narrow(&mut self, src: u64, dst: u64, n: usize) -> Result<()> {
        self.loss.launch_narrow(self.stream, self.dtype, src, dst, n)
    }
}

impl CudaLinearLoss {
    /// [`loss_and_grad`](Self::loss_and_grad) under [`LinearSchedule::Tiles`]: the caller has
    /// checked the buffers.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cuda) fn tiled<L: Logit, I: TokenId>(
        &self,
        cols: usize,
        spec: &LossSpec,
        shape: LinearShape,
        stream: &Arc<CudaStream>,
        inputs: &DeviceLinearInputs<'_, L>,
        tokens: &DeviceInputs<'_, I>,
        grads: &mut DeviceLinearGrads<'_, '_, L>,
        chunking: Chunking,
    ) -> Result<DeviceLinearOutput> {
        let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
        let whole = VocabSlice::new(0, v, v)?;
        // float16 gradient rows scaled by a power of two, their products by its inverse
        let (spec, unscale) = scaled_for::<L, I>(spec, shape.tokens(), tokens);
        let mut st = CudaSharded::new(&self.loss, &spec, shape.tokens(), whole, stream, tokens)?;
        // blocks of threads as wide as a vocabulary block's f32 vectors (see `block_threads`)
        st.fit_blocks();
        let words = st.words_per_row();
        let acc_needed = matches!(grads.hidden, DeviceGrad::Into(_)) && L::DTYPE != DType::F32;
        let cut = TileCut::new(L::DTYPE, chunking, shape, cols, acc_needed, words)?;
        let TileCut { r, vb } = cut;
        let wide = L::DTYPE == DType::F32;
        let partials_len = r.min(n) * words;
        // (no allocation is empty: the driver refuses size 0)
        let mut z = output::<f32>(stream, r * vb)?;
        let mut g16 = output::<L>(stream, if wide { 1 } else { r * vb })?;
        let mut ones = output::<L>(stream, if inputs.bias.is_some() { r } else { 1 })?;
        let mut partials = output::<f32>(stream, partials_len.max(1))?;
        let mut acc = output::<f32>(stream, if acc_needed { r * h } else { 1 })?;
        let scratch_bytes = 4 * (z.len() + partials.len() + if acc_needed { acc.len() } else { 0 })
            + L::DTYPE.size() * (if wide { 0 } else { g16.len() } + if inputs.bias.is_some() { r } else { 0 });

        stream.context().bind_to_thread().map_err(drv("binding the context"))?;
        let blas = Bound::new(self.blas.lock().unwrap_or_else(|e| e.into_inner()), stream)?;
        let (zp, _g1) = z.device_ptr_mut(stream);
        let (gp16, _g2) = g16.device_ptr_mut(stream);
        let (op, _g3) = ones.device_ptr_mut(stream);
        let (pp, _g4) = partials.device_ptr_mut(stream);
        let (ap, _g5) = acc.device_ptr_mut(stream);
        if inputs.bias.is_some() {
            super::sweep::fill_ones(L::DTYPE, stream, op, r)?;
        }
        let held = super::sweep::hold(inputs, grads, stream);
        let ops =
            TileOperands { base: held.operands(zp, gp16, op, unscale), partials: pp, acc: acc_needed.then_some(ap) };
        let mut steps = DeviceTiles {
            blas: &blas,
            loss: &self.loss,
            st: &mut st,
            stream,
            dtype: L::DTYPE,
            vocab: v,
            words,
            partials_len,
        };
        let chunks = queue_tiles(L::DTYPE, shape, cut, &ops, &mut steps)?;
        drop(held);
        Ok(DeviceLinearOutput {
            loss: st.finish(stream)?,
            chunk_rows: r,
            logits_rows: r,
            chunks,
            scratch_bytes,
            tile_cols: vb,
        })
    }
}

#[cfg(test)]
mod tests;

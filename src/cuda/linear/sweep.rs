//! The chunk loop of the fused linear path on CUDA, shared by the one-device call
//! ([`CudaLinearLoss::loss_and_grad`]) and the vocabulary-parallel split
//! ([`DeviceSharded::linear_loss_and_grad`](crate::cuda::split::DeviceSharded::linear_loss_and_grad)):
//! the products through cuBLAS, and between them a rows step that the caller gives (the rows
//! kernel, or the split's statistics, exchange and gradient).

use super::blas::{blas_type, Bound, Operand, Product};
use super::{CudaLinearLoss, DeviceLinearGrads, DeviceLinearInputs, DEFAULT_BUDGET, SUB_CHUNKS};
use crate::cuda::{drv, output};
use crate::dtype::{DType, Logit};
use crate::error::{Error, Result};
use crate::linear::{Chunking, LinearShape};
use crate::spec::check_len;
use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use std::ops::Range;
use std::sync::Arc;

/// How a call cuts its `N` token rows: `c` gradient rows per chunk (the `d W`, `d b` products),
/// `cl` rows per logits product (`c` for f32 inputs, `⌈c / 4⌉` for 16-bit ones).
#[derive(Debug, Clone, Copy)]
pub(in crate::cuda) struct Cut {
    pub c: usize,
    pub cl: usize,
}

impl Cut {
    /// The cut of `n` rows from `chunking`, counting the chunk buffers for rows of `width`
    /// logits (a split counts `ceil(V / ranks)` on every rank, so that all cut alike).
    pub(in crate::cuda) fn new<L: Logit>(chunking: Chunking, width: usize, n: usize) -> Result<Cut> {
        // the gradient rows (2 bytes each for 16-bit, in place for f32) and the f32 logits of a
        // quarter of them
        let wide = L::DTYPE == DType::F32;
        let row_bytes = if wide { 4 * width } else { 2 * width + 4 * width / SUB_CHUNKS };
        let mut c = chunking.rows_for(DEFAULT_BUDGET, row_bytes, n)?;
        if c > 64 && !matches!(chunking, Chunking::Rows(_)) {
            c -= c % 64;
        }
        Ok(Cut { c, cl: if wide { c } else { c.div_ceil(SUB_CHUNKS) } })
    }
}

/// Checks a call's buffers against `shape` (whose `V` is the rows of `W` this call holds).
pub(in crate::cuda) fn check_buffers<L: Logit>(
    shape: LinearShape,
    inputs: &DeviceLinearInputs<'_, L>,
    grads: &DeviceLinearGrads<'_, '_, L>,
) -> Result<()> {
    let (t, v) = (shape.tokens(), shape.vocab());
    check_len("hidden", inputs.hidden.len(), shape.hidden_len(), t)?;
    check_len("weight", inputs.weight.len(), shape.weight_len(), t)?;
    if let Some(b) = inputs.bias {
        check_len("bias", b.len(), v, t)?;
    }
    for (what, g, len) in [
        ("d hidden", &grads.hidden, shape.hidden_len()),
        ("d weight", &grads.weight, shape.weight_len()),
        ("d bias", &grads.bias, v),
    ] {
        if let Some(got) = g.len() {
            check_len(what, got, len, t)?;
        }
    }
    if grads.bias.len().is_some() && inputs.bias.is_none() {
        return Err(Error::Unsupported("a bias gradient was asked for without a bias input".into()));
    }
    if !blas_shape_fits(shape) {
        return Err(Error::Unsupported("shape too large for cuBLAS".into()));
    }
    Ok(())
}

/// Whether cuBLAS's 32-bit dimensions hold `shape`'s products (`H` and `N`; `V` is bounded
/// tighter by the rows kernels).
pub(in crate::cuda) fn blas_shape_fits(shape: LinearShape) -> bool {
    shape.hidden() <= i32::MAX as usize && shape.rows() <= i32::MAX as usize
}

/// Whether the fused linear path on the GPU holds `shape`: the rows kernels' limits
/// ([`shape_fits`](crate::cuda::shape_fits)) and cuBLAS's.
pub(crate) fn linear_shape_fits(shape: LinearShape) -> bool {
    crate::cuda::shape_fits(shape.tokens()) && blas_shape_fits(shape)
}

/// The rows step of a sweep: `(rows, z, g)` turns the f32 logits of token rows `rows` at device
/// address `z` (`V` per row) into their gradient rows at `g` (the same address for f32 inputs,
/// else `V` elements of the inputs' dtype per row), queued on the sweep's stream.
pub(in crate::cuda) type RowsStep<'s> = dyn FnMut(Range<usize>, u64, u64) -> Result<()> + 's;

/// What a sweep queued.
pub(in crate::cuda) struct Swept {
    pub chunks: usize,
    /// Bytes of chunk buffers it allocated.
    pub scratch_bytes: usize,
}

impl CudaLinearLoss {
    /// Queues the products of every chunk of `cut` on `stream` and `step` between them (see the
    /// [module docs](super)); `shape` as for [`check_buffers`], which the caller has run. The
    /// cuBLAS handle stays locked for the whole sweep, `step`'s exchanges included.
    pub(in crate::cuda) fn sweep<L: Logit>(
        &self,
        shape: LinearShape,
        stream: &Arc<CudaStream>,
        inputs: &DeviceLinearInputs<'_, L>,
        grads: &mut DeviceLinearGrads<'_, '_, L>,
        cut: Cut,
        step: &mut RowsStep<'_>,
    ) -> Result<Swept> {
        let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
        let Cut { c, cl } = cut;
        let wide = L::DTYPE == DType::F32;
        // (no allocation is empty: the driver refuses size 0)
        let g16_len = if wide { 0 } else { c * v };
        let ones_len = if inputs.bias.is_some() { c } else { 0 };
        let mut z = output::<f32>(stream, (cl * v).max(1))?;
        let mut g16 = output::<L>(stream, g16_len.max(1))?;
        let mut ones = output::<L>(stream, ones_len.max(1))?;
        let scratch_bytes = 4 * z.len() + L::DTYPE.size() * (g16_len + ones_len);

        stream.context().bind_to_thread().map_err(drv("binding the context"))?;
        let blas = Bound::new(self.blas.lock().unwrap_or_else(|e| e.into_inner()), stream)?;

        let ty = blas_type(L::DTYPE);
        let es = L::DTYPE.size() as u64;
        let (hp, _g1) = inputs.hidden.device_ptr(stream);
        let (wp, _g2) = inputs.weight.device_ptr(stream);
        let bias = inputs.bias.map(|b| b.device_ptr(stream));
        let (zp, _g3) = z.device_ptr_mut(stream);
        let (gp16, _g4) = g16.device_ptr_mut(stream);
        let (op, _g5) = ones.device_ptr_mut(stream);
        if inputs.bias.is_some() {
            let one = L::from_f32(1.0).to_f32().to_bits();
            // SAFETY: `ones` holds `c` elements of L; 1.0 in L's bits, 16 or 32 wide.
            let r = unsafe {
                match L::DTYPE {
                    DType::F32 => cudarc::driver::sys::cuMemsetD32Async(op, one, c, stream.cu_stream()),
                    DType::F16 => cudarc::driver::sys::cuMemsetD16Async(op, 0x3C00, c, stream.cu_stream()),
                    DType::BF16 => cudarc::driver::sys::cuMemsetD16Async(op, (one >> 16) as u16, c, stream.cu_stream()),
                }
            };
            r.result().map_err(drv("filling a buffer"))?;
        }
        let dh = grads.hidden.target(stream);
        let dw = grads.weight.target(stream);
        let db = grads.bias.target(stream);
        // the gradient of the chunk: over the logits (f32), or its own 16-bit buffer
        let gp = if wide { zp } else { gp16 };
        let mut chunks = 0;
        for r0 in (0..n).step_by(c) {
            let m = c.min(n - r0);
            for s0 in (0..m).step_by(cl) {
                let ms = cl.min(m - s0);
                let hrow = Operand { ptr: hp + ((r0 + s0) * h) as u64 * es, ty, ld: h };
                let zc = Operand { ptr: zp, ty: cudaDataType_t::CUDA_R_32F, ld: v };
                if let Some((bp, _)) = &bias {
                    let b = Operand { ptr: *bp, ty, ld: v };
                    let o = Operand { ptr: op, ty, ld: 1 };
                    blas.gemm(Product {
                        ta: false,
                        tb: false,
                        m: v,
                        n: ms,
                        k: 1,
                        a: b,
                        b: o,
                        c: zc,
                        accumulate: false,
                    })?;
                }
                // z (rows x V, row-major) = h · Wᵀ: column-major (V x rows) = op_T(W as H x V) · (h as H x rows)
                let w = Operand { ptr: wp, ty, ld: h };
                blas.gemm(Product {
                    ta: true,
                    tb: false,
                    m: v,
                    n: ms,
                    k: h,
                    a: w,
                    b: hrow,
                    c: zc,
                    accumulate: bias.is_some(),
                })?;
                let first = r0 + s0;
                step(first..first + ms, zp, if wide { zp } else { gp16 + (s0 * v) as u64 * es })?;
            }
            let g = Operand { ptr: gp, ty, ld: v };
            let hrows = Operand { ptr: hp + (r0 * h) as u64 * es, ty, ld: h };
            let acc = grads.accumulate || r0 > 0;
            if let Some((dp, dty, des, _)) = &dh {
                let (dp, dty, des) = (*dp, *dty, *des);
                // d h (rows x H) = G · W: column-major (H x rows) = (W as H x V) · (G as V x rows)
                let c_ = Operand { ptr: dp + (r0 * h * des) as u64, ty: dty, ld: h };
                let w = Operand { ptr: wp, ty, ld: h };
                blas.gemm(Product { ta: false, tb: false, m: h, n: m, k: v, a: w, b: g, c: c_, accumulate: false })?;
            }
            if let Some((dp, dty, ..)) = &dw {
                let (dp, dty) = (*dp, *dty);
                // d W (V x H) += Gᵀ · h: column-major (H x V) = (h as H x rows) · op_T(G as V x rows)
                let c_ = Operand { ptr: dp, ty: dty, ld: h };
                blas.gemm(Product { ta: false, tb: true, m: h, n: v, k: m, a: hrows, b: g, c: c_, accumulate: acc })?;
            }
            if let Some((dp, dty, ..)) = &db {
                let (dp, dty) = (*dp, *dty);
                // d b (V) += Σ_rows G: column-major (V x 1) = (G as V x rows) · (ones as rows x 1)
                let c_ = Operand { ptr: dp, ty: dty, ld: v };
                let o = Operand { ptr: op, ty, ld: m };
                blas.gemm(Product { ta: false, tb: false, m: v, n: 1, k: m, a: g, b: o, c: c_, accumulate: acc })?;
            }
            chunks += 1;
        }
        Ok(Swept { chunks, scratch_bytes })
    }
}

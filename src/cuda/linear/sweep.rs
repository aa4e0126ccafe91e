//! The chunk loop of the fused linear path on CUDA, shared by the one-device call
//! ([`CudaLinearLoss::loss_and_grad`]) and the vocabulary-parallel split
//! ([`DeviceSharded::linear_loss_and_grad`](crate::cuda::split::DeviceSharded::linear_loss_and_grad)):
//! the products through cuBLAS, and between them a rows step that the caller gives (the rows
//! kernel, or the split's statistics, exchange and gradient). The order of that work and every
//! product's operands are [`queue_chunks`]'s, apart from cuBLAS: its tests run it with a product
//! on the host.

use super::blas::{blas_type, Bound, Operand, Product};
use super::{CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs, DEFAULT_BUDGET, SUB_CHUNKS};
use crate::cuda::{drv, output};
use crate::dtype::{DType, Logit};
use crate::error::{Error, Result};
use crate::linear::{Chunking, LinearShape};
use crate::spec::check_len;
use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
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
    /// [module docs](super)); `shape` as for [`check_buffers`], which the caller has run;
    /// `unscale` the `alpha` of the gradient rows' products (1, or `1/S` when `step` writes them
    /// scaled by `S`, `scale.rs`). The cuBLAS handle stays locked for the whole sweep, `step`'s
    /// exchanges included.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cuda) fn sweep<L: Logit>(
        &self,
        shape: LinearShape,
        stream: &Arc<CudaStream>,
        inputs: &DeviceLinearInputs<'_, L>,
        grads: &mut DeviceLinearGrads<'_, '_, L>,
        cut: Cut,
        unscale: f32,
        step: &mut RowsStep<'_>,
    ) -> Result<Swept> {
        let v = shape.vocab();
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

        let held = hold(inputs, grads, stream);
        let (zp, _g3) = z.device_ptr_mut(stream);
        let (gp16, _g4) = g16.device_ptr_mut(stream);
        let (op, _g5) = ones.device_ptr_mut(stream);
        if inputs.bias.is_some() {
            fill_ones(L::DTYPE, stream, op, c)?;
        }
        let operands = held.operands(zp, gp16, op, unscale);
        let chunks = queue_chunks(L::DTYPE, shape, cut, &operands, &mut |p| blas.gemm(p), step)?;
        Ok(Swept { chunks, scratch_bytes })
    }
}

/// The device addresses of a call's inputs and of the gradients it writes (address, cuBLAS type,
/// element size; none when skipped), with the guards that order other streams after this call's
/// use of them: held while the call queues its work.
pub(super) struct Held<'s> {
    pub hidden: u64,
    pub weight: u64,
    pub bias: Option<u64>,
    pub d_hidden: Option<(u64, cudaDataType_t, usize)>,
    pub d_weight: Option<(u64, cudaDataType_t, usize)>,
    pub d_bias: Option<(u64, cudaDataType_t, usize)>,
    /// Whether `d weight` and `d bias` are added to.
    pub accumulate: bool,
    _guards: Vec<SyncOnDrop<'s>>,
}

impl Held<'_> {
    /// The chunk loop's operands: these inputs and gradients with the buffers `z`, `g16`, `ones`.
    /// The operands, the gradient rows' products multiplied by `unscale` (`1/S`, see `scale.rs`).
    pub(super) fn operands(&self, z: u64, g16: u64, ones: u64, unscale: f32) -> Operands {
        Operands {
            unscale,
            hidden: self.hidden,
            weight: self.weight,
            bias: self.bias,
            z,
            g16,
            ones,
            d_hidden: self.d_hidden,
            d_weight: self.d_weight,
            d_bias: self.d_bias,
            accumulate: self.accumulate,
        }
    }
}

/// [`Held`] for `inputs` and `grads` on `stream`.
pub(super) fn hold<'s, L: Logit>(
    inputs: &'s DeviceLinearInputs<'_, L>,
    grads: &'s mut DeviceLinearGrads<'_, '_, L>,
    stream: &'s Arc<CudaStream>,
) -> Held<'s> {
    let mut guards = Vec::new();
    let mut keep = |(p, g): (u64, SyncOnDrop<'s>)| {
        guards.push(g);
        p
    };
    let hidden = keep(inputs.hidden.device_ptr(stream));
    let weight = keep(inputs.weight.device_ptr(stream));
    let bias = inputs.bias.map(|b| keep(b.device_ptr(stream)));
    let accumulate = grads.accumulate;
    let mut target = |g: &'s mut DeviceGrad<'_, '_, L>| {
        g.target(stream).map(|(p, ty, es, guard)| {
            guards.push(guard);
            (p, ty, es)
        })
    };
    let DeviceLinearGrads { hidden: dh, weight: dw, bias: db, .. } = grads;
    let (d_hidden, d_weight, d_bias) = (target(dh), target(dw), target(db));
    Held { hidden, weight, bias, d_hidden, d_weight, d_bias, accumulate, _guards: guards }
}

/// Queues `n` ones of `dtype` at device address `ptr`, which the caller holds while this runs
/// and which has room for them.
pub(super) fn fill_ones(dtype: DType, stream: &Arc<CudaStream>, ptr: u64, n: usize) -> Result<()> {
    // 1.0's bits: f32 0x3F80_0000, f16 0x3C00, bf16 0x3F80 (f32's upper half)
    let one = 1f32.to_bits();
    // SAFETY: `ptr` holds `n` elements of `dtype` (the caller's buffer); 16- or 32-bit stores.
    let r = unsafe {
        match dtype {
            DType::F32 => cudarc::driver::sys::cuMemsetD32Async(ptr, one, n, stream.cu_stream()),
            DType::F16 => cudarc::driver::sys::cuMemsetD16Async(ptr, 0x3C00, n, stream.cu_stream()),
            DType::BF16 => cudarc::driver::sys::cuMemsetD16Async(ptr, (one >> 16) as u16, n, stream.cu_stream()),
        }
    };
    r.result().map_err(drv("filling a buffer"))
}

/// Device addresses of a sweep's operands and chunk buffers (`z`: `cl · V` f32; `g16`: `c · V`
/// of the inputs' dtype, unused for f32 inputs; `ones`: `c` ones of the inputs' dtype, used with
/// a bias), and of the gradients it writes (address, cuBLAS type, element size), each present
/// when wanted.
pub(in crate::cuda) struct Operands {
    pub hidden: u64,
    pub weight: u64,
    pub bias: Option<u64>,
    pub z: u64,
    pub g16: u64,
    pub ones: u64,
    pub d_hidden: Option<(u64, cudaDataType_t, usize)>,
    pub d_weight: Option<(u64, cudaDataType_t, usize)>,
    pub d_bias: Option<(u64, cudaDataType_t, usize)>,
    /// Whether `d weight` and `d bias` are added to (else the first chunk overwrites them).
    pub accumulate: bool,
    /// The `alpha` of the products of the gradient rows (`d hidden`, `d weight`, `d bias`): 1, or
    /// `1/S` when the rows step wrote them scaled by `S` (`scale.rs`).
    pub unscale: f32,
}

/// The sweep's work in the order it is queued: per chunk of `cut.c` rows, per `cut.cl` of them
/// the logits product (after the bias's, when there is one) and `step`, then the chunk's
/// `d hidden`, `d weight` and `d bias` products, each handed to `gemm`. Returns the chunks.
/// Apart from cuBLAS and the device, so that a host product can run it (the tests).
pub(in crate::cuda) fn queue_chunks(
    dtype: DType,
    shape: LinearShape,
    cut: Cut,
    ops: &Operands,
    gemm: &mut dyn FnMut(Product) -> Result<()>,
    step: &mut RowsStep<'_>,
) -> Result<usize> {
    let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
    let Cut { c, cl } = cut;
    let wide = dtype == DType::F32;
    let ty = blas_type(dtype);
    let es = dtype.size() as u64;
    let (hp, wp, zp, gp16, op) = (ops.hidden, ops.weight, ops.z, ops.g16, ops.ones);
    // the gradient of the chunk: over the logits (f32), or its own 16-bit buffer
    let gp = if wide { zp } else { gp16 };
    let mut chunks = 0;
    for r0 in (0..n).step_by(c) {
        let m = c.min(n - r0);
        for s0 in (0..m).step_by(cl) {
            let ms = cl.min(m - s0);
            let hrow = Operand { ptr: hp + ((r0 + s0) * h) as u64 * es, ty, ld: h };
            let zc = Operand { ptr: zp, ty: cudaDataType_t::CUDA_R_32F, ld: v };
            if let Some(bp) = ops.bias {
                let b = Operand { ptr: bp, ty, ld: v };
                let o = Operand { ptr: op, ty, ld: 1 };
                gemm(Product {
                    alpha: 1.0,
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
            gemm(Product {
                alpha: 1.0,
                ta: true,
                tb: false,
                m: v,
                n: ms,
                k: h,
                a: w,
                b: hrow,
                c: zc,
                accumulate: ops.bias.is_some(),
            })?;
            let first = r0 + s0;
            step(first..first + ms, zp, if wide { zp } else { gp16 + (s0 * v) as u64 * es })?;
        }
        let g = Operand { ptr: gp, ty, ld: v };
        let hrows = Operand { ptr: hp + (r0 * h) as u64 * es, ty, ld: h };
        let acc = ops.accumulate || r0 > 0;
        if let Some((dp, dty, des)) = ops.d_hidden {
            // d h (rows x H) = G · W: column-major (H x rows) = (W as H x V) · (G as V x rows)
            let c_ = Operand { ptr: dp + (r0 * h * des) as u64, ty: dty, ld: h };
            let w = Operand { ptr: wp, ty, ld: h };
            gemm(Product {
                alpha: ops.unscale,
                ta: false,
                tb: false,
                m: h,
                n: m,
                k: v,
                a: w,
                b: g,
                c: c_,
                accumulate: false,
            })?;
        }
        if let Some((dp, dty, _)) = ops.d_weight {
            // d W (V x H) += Gᵀ · h: column-major (H x V) = (h as H x rows) · op_T(G as V x rows)
            let c_ = Operand { ptr: dp, ty: dty, ld: h };
            gemm(Product {
                alpha: ops.unscale,
                ta: false,
                tb: true,
                m: h,
                n: v,
                k: m,
                a: hrows,
                b: g,
                c: c_,
                accumulate: acc,
            })?;
        }
        if let Some((dp, dty, _)) = ops.d_bias {
            // d b (V) += Σ_rows G: column-major (V x 1) = (G as V x rows) · (ones as rows x 1)
            let c_ = Operand { ptr: dp, ty: dty, ld: v };
            let o = Operand { ptr: op, ty, ld: m };
            gemm(Product {
                alpha: ops.unscale,
                ta: false,
                tb: false,
                m: v,
                n: 1,
                k: m,
                a: g,
                b: o,
                c: c_,
                accumulate: acc,
            })?;
        }
        chunks += 1;
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    //! [`queue_chunks`] with a column-major product on the host in place of cuBLAS, on host
    //! buffers whose addresses stand for device ones: every operand checked to lie inside its
    //! buffer, of its buffer's type, with a leading dimension cuBLAS accepts; the logits each rows
    //! step receives and the gradients the products leave compared with float64.
    use super::super::host_product::*;
    use super::*;
    use crate::synthetic::Rng;
    use std::cell::RefCell;

    /// One random sweep against float64; returns the chunks it queued.
    fn one_sweep(rng: &mut Rng) -> usize {
        let pb = Problem::random(rng);
        let (dtype, ty, shape) = (pb.dtype, pb.ty, pb.shape);
        let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
        let c = 1 + rng.below(n as u64 + 3) as usize;
        let cut = Cut { c, cl: if dtype == DType::F32 { c } else { c.div_ceil(SUB_CHUNKS) } };

        let mut bufs = pb.input_buffers();
        bufs.extend(pb.work_buffers(cut.cl * v, c * v, c));
        bufs.extend(pb.grad_buffers());
        let addr: Vec<u64> = bufs.iter().map(Buf::addr).collect();
        let ops = pb.operands(&addr, 6);

        let memory = RefCell::new(Memory(bufs));
        let mut stepped = Vec::new();
        let mut step = |rows: Range<usize>, z: u64, g: u64| -> Result<()> {
            let mut mem = memory.borrow_mut();
            assert_eq!(z, addr[3], "the logits at the start of z");
            assert!(rows.len() <= cut.cl, "more rows than a logits product holds");
            let (zb, gb) = (&mem.0[3], if dtype == DType::F32 { 3 } else { 4 });
            let got: Vec<f64> = (0..rows.len() * v).map(|i| zb.get(i)).collect();
            let cells = || rows.clone().flat_map(|r| (0..v).map(move |j| (r, j)));
            let model: Vec<f64> = cells().map(|(r, j)| round(F32, pb.logit(r, j).0)).collect();
            let mag: Vec<f64> = cells().map(|(r, j)| pb.logit(r, j).1).collect();
            assert_rounded(F32, &got, &model, &mag, &format!("logits of rows {rows:?}"));
            // the step's gradient rows: over the logits (f32), else at the sub-chunk's rows of g16
            let (buf, g0) = mem.find(g, if dtype == DType::F32 { F32 } else { ty });
            let want0 = if dtype == DType::F32 { 0 } else { (rows.start % c) * v };
            assert_eq!((buf, g0), (gb, want0), "the gradient rows of {rows:?}");
            for (i, r) in rows.clone().enumerate() {
                for j in 0..v {
                    mem.0[gb].set(g0 + i * v + j, pb.grad[r * v + j] * pb.scale);
                }
            }
            stepped.push(rows);
            Ok(())
        };
        let chunks = queue_chunks(
            dtype,
            shape,
            cut,
            &ops,
            &mut |p| {
                memory.borrow_mut().gemm(p);
                Ok(())
            },
            &mut step,
        )
        .unwrap();
        assert_eq!(chunks, n.div_ceil(c));
        let covered: Vec<usize> = stepped.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (0..n).collect::<Vec<_>>(), "every row stepped once, in order");

        let mem = memory.into_inner();
        let what = format!("{dtype:?} N {n} H {h} V {v} c {c} bias {} accumulate {}", pb.with_bias, pb.accumulate);
        if let Some(d) = pb.dh_ty {
            let term = |i: usize, j: usize| pb.grad[(i / h) * v + j] * pb.weight[j * h + i % h];
            let model: Vec<f64> = (0..n * h).map(|i| round(d, (0..v).map(|j| term(i, j)).sum())).collect();
            let mag: Vec<f64> = (0..n * h).map(|i| (0..v).map(|j| term(i, j).abs()).sum()).collect();
            assert_rounded(d, &mem.0[6].values(), &model, &mag, &format!("d hidden ({what})"));
        }
        pb.check_weight_and_bias(&mem.0[7], &mem.0[8], c, &what);
        chunks
    }

    #[test]
    fn the_sweeps_products_and_steps_match_float64_with_a_host_product() {
        let mut rng = Rng::new(0x7377656570);
        let cases = test_cases(300);
        let chunks: usize = (0..cases).map(|_| one_sweep(&mut rng)).sum();
        // (a handful of sweeps could all be of one chunk)
        assert!(cases < 20 || chunks > cases, "some sweeps of more than one chunk");
    }
}

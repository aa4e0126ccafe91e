//! The chunk loop of the fused linear path on CUDA, shared by the one-device call
//! ([`CudaLinearLoss::loss_and_grad`]) and the vocabulary-parallel split
//! ([`DeviceSharded::linear_loss_and_grad`](crate::cuda::split::DeviceSharded::linear_loss_and_grad)):
//! the products through cuBLAS, and between them a rows step that the caller gives (the rows
//! kernel, or the split's statistics, exchange and gradient). The order of that work and every
//! product's operands are [`queue_chunks`]'s, apart from cuBLAS: its tests run it with a product
//! on the host.

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
        let operands = Operands {
            hidden: hp,
            weight: wp,
            bias: bias.as_ref().map(|(b, _)| *b),
            z: zp,
            g16: gp16,
            ones: op,
            d_hidden: dh.as_ref().map(|(p, ty, es, _)| (*p, *ty, *es)),
            d_weight: dw.as_ref().map(|(p, ty, ..)| (*p, *ty)),
            d_bias: db.as_ref().map(|(p, ty, ..)| (*p, *ty)),
            accumulate: grads.accumulate,
        };
        let chunks = queue_chunks(L::DTYPE, shape, cut, &operands, &mut |p| blas.gemm(p), step)?;
        Ok(Swept { chunks, scratch_bytes })
    }
}

/// Device addresses of a sweep's operands and chunk buffers (`z`: `cl · V` f32; `g16`: `c · V`
/// of the inputs' dtype, unused for f32 inputs; `ones`: `c` ones of the inputs' dtype, used with
/// a bias), and of the gradients it writes (address, cuBLAS type, and for `d hidden` the element
/// size), each present when wanted.
pub(in crate::cuda) struct Operands {
    pub hidden: u64,
    pub weight: u64,
    pub bias: Option<u64>,
    pub z: u64,
    pub g16: u64,
    pub ones: u64,
    pub d_hidden: Option<(u64, cudaDataType_t, usize)>,
    pub d_weight: Option<(u64, cudaDataType_t)>,
    pub d_bias: Option<(u64, cudaDataType_t)>,
    /// Whether `d weight` and `d bias` are added to (else the first chunk overwrites them).
    pub accumulate: bool,
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
                gemm(Product { ta: false, tb: false, m: v, n: ms, k: 1, a: b, b: o, c: zc, accumulate: false })?;
            }
            // z (rows x V, row-major) = h · Wᵀ: column-major (V x rows) = op_T(W as H x V) · (h as H x rows)
            let w = Operand { ptr: wp, ty, ld: h };
            gemm(Product {
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
            gemm(Product { ta: false, tb: false, m: h, n: m, k: v, a: w, b: g, c: c_, accumulate: false })?;
        }
        if let Some((dp, dty)) = ops.d_weight {
            // d W (V x H) += Gᵀ · h: column-major (H x V) = (h as H x rows) · op_T(G as V x rows)
            let c_ = Operand { ptr: dp, ty: dty, ld: h };
            gemm(Product { ta: false, tb: true, m: h, n: v, k: m, a: hrows, b: g, c: c_, accumulate: acc })?;
        }
        if let Some((dp, dty)) = ops.d_bias {
            // d b (V) += Σ_rows G: column-major (V x 1) = (G as V x rows) · (ones as rows x 1)
            let c_ = Operand { ptr: dp, ty: dty, ld: v };
            let o = Operand { ptr: op, ty, ld: m };
            gemm(Product { ta: false, tb: false, m: v, n: 1, k: m, a: g, b: o, c: c_, accumulate: acc })?;
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
    use super::*;
    use crate::synthetic::Rng;
    use crate::{bf16, f16};
    use std::cell::RefCell;

    fn size_of(ty: cudaDataType_t) -> usize {
        match ty {
            cudaDataType_t::CUDA_R_32F => 4,
            cudaDataType_t::CUDA_R_16F | cudaDataType_t::CUDA_R_16BF => 2,
            other => panic!("no host product for {other:?}"),
        }
    }

    /// `x` as `ty` holds it.
    fn round(ty: cudaDataType_t, x: f64) -> f64 {
        match ty {
            cudaDataType_t::CUDA_R_32F => x as f32 as f64,
            cudaDataType_t::CUDA_R_16F => f16::from_f64(x).to_f64(),
            _ => bf16::from_f64(x).to_f64(),
        }
    }

    /// A stand-in for a device buffer: `len` elements of `ty`, NaN until written.
    struct Buf {
        name: &'static str,
        ty: cudaDataType_t,
        bytes: Vec<u8>,
    }

    impl Buf {
        fn new(name: &'static str, ty: cudaDataType_t, len: usize) -> Buf {
            Buf { name, ty, bytes: vec![0xff; len * size_of(ty)] }
        }
        fn addr(&self) -> u64 {
            self.bytes.as_ptr() as u64
        }
        fn len(&self) -> usize {
            self.bytes.len() / size_of(self.ty)
        }
        fn get(&self, i: usize) -> f64 {
            let b = &self.bytes[i * size_of(self.ty)..];
            match self.ty {
                cudaDataType_t::CUDA_R_32F => f32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
                cudaDataType_t::CUDA_R_16F => f16::from_le_bytes([b[0], b[1]]).to_f64(),
                _ => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            }
        }
        fn set(&mut self, i: usize, x: f64) {
            let s = size_of(self.ty);
            let b = &mut self.bytes[i * s..(i + 1) * s];
            match self.ty {
                cudaDataType_t::CUDA_R_32F => b.copy_from_slice(&(x as f32).to_le_bytes()),
                cudaDataType_t::CUDA_R_16F => b.copy_from_slice(&f16::from_f64(x).to_le_bytes()),
                _ => b.copy_from_slice(&bf16::from_f64(x).to_le_bytes()),
            }
        }
        fn values(&self) -> Vec<f64> {
            (0..self.len()).map(|i| self.get(i)).collect()
        }
        fn fill(&mut self, values: &[f64]) {
            values.iter().enumerate().for_each(|(i, &x)| self.set(i, x));
        }
    }

    /// The buffers a sweep sees, found by address.
    struct Memory(Vec<Buf>);

    impl Memory {
        /// The buffer and element at `ptr`, which must be an element of a buffer of type `ty`.
        fn find(&self, ptr: u64, ty: cudaDataType_t) -> (usize, usize) {
            for (k, b) in self.0.iter().enumerate() {
                let (lo, hi) = (b.addr(), b.addr() + b.bytes.len() as u64);
                if ptr >= lo && ptr < hi {
                    assert_eq!(b.ty, ty, "an operand of the wrong type in {}", b.name);
                    assert_eq!((ptr - lo) % size_of(ty) as u64, 0, "a misaligned operand in {}", b.name);
                    return (k, ((ptr - lo) / size_of(ty) as u64) as usize);
                }
            }
            panic!("an operand outside every buffer");
        }

        /// cuBLAS's `c = op(a)·op(b) (+ c)`, column-major, in f64 and rounded once to `c`'s
        /// type; every element it touches checked to lie in its operand's buffer.
        fn gemm(&mut self, p: Product) {
            let (m, n, k) = (p.m, p.n, p.k);
            assert!(m > 0 && n > 0 && k > 0, "an empty product");
            let (ar, br) = (if p.ta { k } else { m }, if p.tb { n } else { k });
            assert!(p.a.ld >= ar && p.b.ld >= br && p.c.ld >= m, "a leading dimension cuBLAS refuses");
            let (ab, a0) = self.find(p.a.ptr, p.a.ty);
            let (bb, b0) = self.find(p.b.ptr, p.b.ty);
            let (cb, c0) = self.find(p.c.ptr, p.c.ty);
            let elem = |buf: usize, i: usize| {
                let b = &self.0[buf];
                assert!(i < b.len(), "a product reads past the end of {}", b.name);
                b.get(i)
            };
            let mut out = vec![0f64; m * n];
            for j in 0..n {
                for i in 0..m {
                    let mut s = 0f64;
                    for q in 0..k {
                        let ai = if p.ta { q + i * p.a.ld } else { i + q * p.a.ld };
                        let bi = if p.tb { j + q * p.b.ld } else { q + j * p.b.ld };
                        s += elem(ab, a0 + ai) * elem(bb, b0 + bi);
                    }
                    out[i + j * m] = s;
                }
            }
            for j in 0..n {
                for i in 0..m {
                    let ci = c0 + i + j * p.c.ld;
                    assert!(ci < self.0[cb].len(), "a product writes past the end of {}", self.0[cb].name);
                    let prior = if p.accumulate { self.0[cb].get(ci) } else { 0.0 };
                    self.0[cb].set(ci, prior + out[i + j * m]);
                }
            }
        }
    }

    /// At least one unit in the last place of `ty` at `x`.
    fn ulp(ty: cudaDataType_t, x: f64) -> f64 {
        let (bits, tiny) = match ty {
            cudaDataType_t::CUDA_R_32F => (23, 2f64.powi(-149)),
            cudaDataType_t::CUDA_R_16F => (10, 2f64.powi(-24)),
            _ => (7, 2f64.powi(-133)),
        };
        (x.abs() * 2f64.powi(-bits)).max(tiny)
    }

    /// Each of `got` is `model` (what a product computed exactly and rounded once to `ty` per
    /// chunk gives) within 2 units in its last place, and f64's own rounding of sums whose terms
    /// have magnitudes summing to `mag` (the host product adds them in another order).
    fn assert_rounded(ty: cudaDataType_t, got: &[f64], model: &[f64], mag: &[f64], what: &str) {
        for (i, ((&g, &m), &a)) in got.iter().zip(model).zip(mag).enumerate() {
            let bound = 2.0 * ulp(ty, m) + 1e-12 * a;
            assert!((g - m).abs() <= bound, "{what}: element {i} is {g}, not {m} (within {bound:e})");
        }
    }

    fn random_values(rng: &mut Rng, ty: cudaDataType_t, n: usize) -> Vec<f64> {
        (0..n).map(|_| round(ty, rng.unit() * 2.0 - 1.0)).collect()
    }

    const F32: cudaDataType_t = cudaDataType_t::CUDA_R_32F;

    /// One random sweep against float64; returns the chunks it queued.
    fn one_sweep(rng: &mut Rng) -> usize {
        let dtype = [DType::F32, DType::F16, DType::BF16][rng.below(3) as usize];
        let ty = blas_type(dtype);
        let (b, t) = (1 + rng.below(3) as usize, 2 + rng.below(6) as usize);
        let (h, v) = (1 + rng.below(33) as usize, 1 + rng.below(40) as usize);
        let shape = LinearShape::new(b, t, h, v).unwrap();
        let n = shape.rows();
        let c = 1 + rng.below(n as u64 + 3) as usize;
        let cut = Cut { c, cl: if dtype == DType::F32 { c } else { c.div_ceil(SUB_CHUNKS) } };
        let with_bias = rng.below(2) == 0;
        // each gradient skipped, in the inputs' type or in f32 (d bias only with a bias)
        let target = |rng: &mut Rng, allowed: bool| match rng.below(3) {
            _ if !allowed => None,
            0 => None,
            1 => Some(ty),
            _ => Some(F32),
        };
        let (dh_ty, dw_ty, db_ty) = (target(rng, true), target(rng, true), target(rng, with_bias));
        let accumulate = rng.below(2) == 0;

        let hidden = random_values(rng, ty, n * h);
        let weight = random_values(rng, ty, v * h);
        let bias = random_values(rng, ty, v);
        // the gradient rows the steps write, as the rows kernel leaves them (in the inputs' type)
        let grad = random_values(rng, ty, n * v);
        let dw_prior = random_values(rng, dw_ty.unwrap_or(F32), v * h);
        let db_prior = random_values(rng, db_ty.unwrap_or(F32), v);

        let mut bufs = vec![Buf::new("hidden", ty, n * h), Buf::new("weight", ty, v * h), Buf::new("bias", ty, v)];
        bufs[0].fill(&hidden);
        bufs[1].fill(&weight);
        bufs[2].fill(&bias);
        bufs.push(Buf::new("z", F32, cut.cl * v));
        bufs.push(Buf::new("g16", ty, if dtype == DType::F32 { 1 } else { c * v }));
        let mut ones = Buf::new("ones", ty, c);
        ones.fill(&vec![1.0; c]);
        bufs.push(ones);
        bufs.push(Buf::new("d hidden", dh_ty.unwrap_or(F32), n * h));
        let mut dw = Buf::new("d weight", dw_ty.unwrap_or(F32), v * h);
        let mut db = Buf::new("d bias", db_ty.unwrap_or(F32), v);
        if accumulate {
            dw.fill(&dw_prior);
            db.fill(&db_prior);
        }
        bufs.push(dw);
        bufs.push(db);
        let addr: Vec<u64> = bufs.iter().map(Buf::addr).collect();
        let ops = Operands {
            hidden: addr[0],
            weight: addr[1],
            bias: with_bias.then_some(addr[2]),
            z: addr[3],
            g16: addr[4],
            ones: addr[5],
            d_hidden: dh_ty.map(|d| (addr[6], d, size_of(d))),
            d_weight: dw_ty.map(|d| (addr[7], d)),
            d_bias: db_ty.map(|d| (addr[8], d)),
            accumulate,
        };

        // float64: a logit and the sum of its terms' magnitudes
        let logit = |r: usize, j: usize| {
            let b = if with_bias { bias[j] } else { 0.0 };
            let terms = (0..h).map(|q| hidden[r * h + q] * weight[j * h + q]);
            (terms.clone().sum::<f64>() + b, terms.map(f64::abs).sum::<f64>() + b.abs())
        };
        let memory = RefCell::new(Memory(bufs));
        let mut stepped = Vec::new();
        let mut step = |rows: Range<usize>, z: u64, g: u64| -> Result<()> {
            let mut mem = memory.borrow_mut();
            assert_eq!(z, addr[3], "the logits at the start of z");
            assert!(rows.len() <= cut.cl, "more rows than a logits product holds");
            let (zb, gb) = (&mem.0[3], if dtype == DType::F32 { 3 } else { 4 });
            let got: Vec<f64> = (0..rows.len() * v).map(|i| zb.get(i)).collect();
            let cells = || rows.clone().flat_map(|r| (0..v).map(move |j| (r, j)));
            let model: Vec<f64> = cells().map(|(r, j)| round(F32, logit(r, j).0)).collect();
            let mag: Vec<f64> = cells().map(|(r, j)| logit(r, j).1).collect();
            assert_rounded(F32, &got, &model, &mag, &format!("logits of rows {rows:?}"));
            // the step's gradient rows: over the logits (f32), else at the sub-chunk's rows of g16
            let (buf, g0) = mem.find(g, if dtype == DType::F32 { F32 } else { ty });
            let want0 = if dtype == DType::F32 { 0 } else { (rows.start % c) * v };
            assert_eq!((buf, g0), (gb, want0), "the gradient rows of {rows:?}");
            for (i, r) in rows.clone().enumerate() {
                for j in 0..v {
                    mem.0[gb].set(g0 + i * v + j, grad[r * v + j]);
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
        let what = format!("{dtype:?} N {n} H {h} V {v} c {c} bias {with_bias} accumulate {accumulate}");
        // d weight and d bias: chunk by chunk, each chunk's sum added to what the target holds
        // and rounded to its type (the first chunk's onto 0 unless accumulating)
        let chunked = |d: cudaDataType_t, len: usize, prior: &[f64], term: &dyn Fn(usize, usize) -> f64| {
            let mut model: Vec<f64> = (0..len).map(|i| if accumulate { prior[i] } else { 0.0 }).collect();
            let mut mag: Vec<f64> = model.iter().map(|x| x.abs()).collect();
            for r0 in (0..n).step_by(c) {
                for i in 0..len {
                    let rows = r0..n.min(r0 + c);
                    model[i] = round(d, model[i] + rows.clone().map(|r| term(r, i)).sum::<f64>());
                    mag[i] += rows.map(|r| term(r, i).abs()).sum::<f64>();
                }
            }
            (model, mag)
        };
        if let Some(d) = dh_ty {
            let term = |i: usize, j: usize| grad[(i / h) * v + j] * weight[j * h + i % h];
            let model: Vec<f64> = (0..n * h).map(|i| round(d, (0..v).map(|j| term(i, j)).sum())).collect();
            let mag: Vec<f64> = (0..n * h).map(|i| (0..v).map(|j| term(i, j).abs()).sum()).collect();
            assert_rounded(d, &mem.0[6].values(), &model, &mag, &format!("d hidden ({what})"));
        }
        if let Some(d) = dw_ty {
            let (model, mag) = chunked(d, v * h, &dw_prior, &|r, i| grad[r * v + i / h] * hidden[r * h + i % h]);
            assert_rounded(d, &mem.0[7].values(), &model, &mag, &format!("d weight ({what})"));
        }
        if let Some(d) = db_ty {
            let (model, mag) = chunked(d, v, &db_prior, &|r, j| grad[r * v + j]);
            assert_rounded(d, &mem.0[8].values(), &model, &mag, &format!("d bias ({what})"));
        }
        chunks
    }

    #[test]
    fn the_sweeps_products_and_steps_match_float64_with_a_host_product() {
        let mut rng = Rng::new(0x7377656570);
        let cases = match std::env::var("FWL_TEST_CASES") {
            Ok(s) => s.parse().unwrap_or_else(|_| panic!("FWL_TEST_CASES={s:?}: not a count of cases")),
            Err(_) => 300,
        };
        let chunks: usize = (0..cases).map(|_| one_sweep(&mut rng)).sum();
        // (a handful of sweeps could all be of one chunk)
        assert!(cases < 20 || chunks > cases, "some sweeps of more than one chunk");
    }
}

//! A column-major product on the host in place of cuBLAS, on host buffers whose addresses
//! stand for device ones (the tests of the sweep's and the tiles' orders of work): every operand
//! checked to lie inside its buffer, of its buffer's type, with a leading dimension cuBLAS
//! accepts; results compared with float64 models within a few units in the last place.

use super::blas::Product;
use crate::synthetic::Rng;
use crate::{bf16, f16};
use cudarc::cublas::sys::cudaDataType_t;

pub(super) fn size_of(ty: cudaDataType_t) -> usize {
    match ty {
        cudaDataType_t::CUDA_R_32F => 4,
        cudaDataType_t::CUDA_R_16F | cudaDataType_t::CUDA_R_16BF => 2,
        other => panic!("no host product for {other:?}"),
    }
}

/// `x` as `ty` holds it.
pub(super) fn round(ty: cudaDataType_t, x: f64) -> f64 {
    match ty {
        cudaDataType_t::CUDA_R_32F => x as f32 as f64,
        cudaDataType_t::CUDA_R_16F => f16::from_f64(x).to_f64(),
        _ => bf16::from_f64(x).to_f64(),
    }
}

/// A stand-in for a device buffer: `len` elements of `ty`, NaN until written.
pub(super) struct Buf {
    name: &'static str,
    ty: cudaDataType_t,
    bytes: Vec<u8>,
}

impl Buf {
    pub(super) fn new(name: &'static str, ty: cudaDataType_t, len: usize) -> Buf {
        Buf { name, ty, bytes: vec![0xff; len * size_of(ty)] }
    }
    pub(super) fn addr(&self) -> u64 {
        self.bytes.as_ptr() as u64
    }
    pub(super) fn len(&self) -> usize {
        self.bytes.len() / size_of(self.ty)
    }
    pub(super) fn get(&self, i: usize) -> f64 {
        let b = &self.bytes[i * size_of(self.ty)..];
        match self.ty {
            cudaDataType_t::CUDA_R_32F => f32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
            cudaDataType_t::CUDA_R_16F => f16::from_le_bytes([b[0], b[1]]).to_f64(),
            _ => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        }
    }
    pub(super) fn set(&mut self, i: usize, x: f64) {
        let s = size_of(self.ty);
        let b = &mut self.bytes[i * s..(i + 1) * s];
        match self.ty {
            cudaDataType_t::CUDA_R_32F => b.copy_from_slice(&(x as f32).to_le_bytes()),
            cudaDataType_t::CUDA_R_16F => b.copy_from_slice(&f16::from_f64(x).to_le_bytes()),
            _ => b.copy_from_slice(&bf16::from_f64(x).to_le_bytes()),
        }
    }
    pub(super) fn values(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
    pub(super) fn fill(&mut self, values: &[f64]) {
        values.iter().enumerate().for_each(|(i, &x)| self.set(i, x));
    }
}

/// The buffers a sweep sees, found by address.
pub(super) struct Memory(pub(super) Vec<Buf>);

impl Memory {
    /// The buffer and element at `ptr`, which must be an element of a buffer of type `ty`.
    pub(super) fn find(&self, ptr: u64, ty: cudaDataType_t) -> (usize, usize) {
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
    pub(super) fn gemm(&mut self, p: Product) {
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
                out[i + j * m] = f64::from(p.alpha) * s;
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
pub(super) fn ulp(ty: cudaDataType_t, x: f64) -> f64 {
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
pub(super) fn assert_rounded(ty: cudaDataType_t, got: &[f64], model: &[f64], mag: &[f64], what: &str) {
    for (i, ((&g, &m), &a)) in got.iter().zip(model).zip(mag).enumerate() {
        let bound = 2.0 * ulp(ty, m) + 1e-12 * a;
        assert!((g - m).abs() <= bound, "{what}: element {i} is {g}, not {m} (within {bound:e})");
    }
}

pub(super) fn random_values(rng: &mut Rng, ty: cudaDataType_t, n: usize) -> Vec<f64> {
    (0..n).map(|_| round(ty, rng.unit() * 2.0 - 1.0)).collect()
}

pub(super) const F32: cudaDataType_t = cudaDataType_t::CUDA_R_32F;

/// The number of random cases: `FWL_TEST_CASES`, else `default`.
pub(super) fn test_cases(default: usize) -> usize {
    match std::env::var("FWL_TEST_CASES") {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("FWL_TEST_CASES={s:?}: not a count of cases")),
        Err(_) => default,
    }
}

/// A random fused linear call for an order-of-work test: dtype, shape, which gradients are
/// wanted in which type, the inputs, the gradient rows the steps write (as the loss kernels leave
/// them, in the inputs' type) and what `d weight` and `d bias` hold before the call.
pub(super) struct Problem {
    pub dtype: crate::dtype::DType,
    pub ty: cudaDataType_t,
    pub shape: crate::linear::LinearShape,
    pub with_bias: bool,
    /// The type of `d hidden`, `d weight`, `d bias` (None: skipped).
    pub dh_ty: Option<cudaDataType_t>,
    pub dw_ty: Option<cudaDataType_t>,
    pub db_ty: Option<cudaDataType_t>,
    pub accumulate: bool,
    pub hidden: Vec<f64>,
    pub weight: Vec<f64>,
    pub bias: Vec<f64>,
    pub grad: Vec<f64>,
    /// The power of two the steps write the gradient rows scaled by (as the float16 rows are,
    /// `scale.rs`): the products' `alpha` must take it out again.
    pub scale: f64,
    pub dw_prior: Vec<f64>,
    pub db_prior: Vec<f64>,
}

impl Problem {
    pub(super) fn random(rng: &mut Rng) -> Problem {
        use crate::dtype::DType;
        let dtype = [DType::F32, DType::F16, DType::BF16][rng.below(3) as usize];
        let ty = super::blas::blas_type(dtype);
        let (b, t) = (1 + rng.below(3) as usize, 2 + rng.below(6) as usize);
        let (h, v) = (1 + rng.below(33) as usize, 1 + rng.below(40) as usize);
        let shape = crate::linear::LinearShape::new(b, t, h, v).unwrap();
        let n = shape.rows();
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
        Problem {
            dtype,
            ty,
            shape,
            with_bias,
            dh_ty,
            dw_ty,
            db_ty,
            accumulate,
            hidden: random_values(rng, ty, n * h),
            weight: random_values(rng, ty, v * h),
            bias: random_values(rng, ty, v),
            grad: random_values(rng, ty, n * v),
            scale: 2f64.powi(rng.below(13) as i32),
            dw_prior: random_values(rng, dw_ty.unwrap_or(F32), v * h),
            db_prior: random_values(rng, db_ty.unwrap_or(F32), v),
        }
    }

    /// Buffers 0, 1, 2: hidden, weight and bias, filled.
    pub(super) fn input_buffers(&self) -> Vec<Buf> {
        let (n, h, v) = (self.shape.rows(), self.shape.hidden(), self.shape.vocab());
        let mut bufs =
            vec![Buf::new("hidden", self.ty, n * h), Buf::new("weight", self.ty, v * h), Buf::new("bias", self.ty, v)];
        bufs[0].fill(&self.hidden);
        bufs[1].fill(&self.weight);
        bufs[2].fill(&self.bias);
        bufs
    }

    /// Buffers 3, 4, 5 after [`input_buffers`](Self::input_buffers): `z_len` f32 logits,
    /// `g_len` gradient entries in the inputs' type (one for f32 inputs, whose gradient is
    /// written over the logits) and `ones` ones.
    pub(super) fn work_buffers(&self, z_len: usize, g_len: usize, ones: usize) -> [Buf; 3] {
        let wide = self.dtype == crate::dtype::DType::F32;
        let mut o = Buf::new("ones", self.ty, ones);
        o.fill(&vec![1.0; ones]);
        [Buf::new("z", F32, z_len), Buf::new("g16", self.ty, if wide { 1 } else { g_len }), o]
    }

    /// `d hidden`, `d weight`, `d bias` (of f32 where skipped), the last two holding their
    /// priors when accumulating.
    pub(super) fn grad_buffers(&self) -> [Buf; 3] {
        let (n, h, v) = (self.shape.rows(), self.shape.hidden(), self.shape.vocab());
        let dh = Buf::new("d hidden", self.dh_ty.unwrap_or(F32), n * h);
        let mut dw = Buf::new("d weight", self.dw_ty.unwrap_or(F32), v * h);
        let mut db = Buf::new("d bias", self.db_ty.unwrap_or(F32), v);
        if self.accumulate {
            dw.fill(&self.dw_prior);
            db.fill(&self.db_prior);
        }
        [dh, dw, db]
    }

    /// The chunk loop's operands at `addr`, of buffers laid out as [`input_buffers`](Self::input_buffers)
    /// then [`work_buffers`](Self::work_buffers) (0–5), with the gradient buffers at `grads`,
    /// `grads + 1`, `grads + 2`; each gradient present when wanted.
    pub(super) fn operands(&self, addr: &[u64], grads: usize) -> super::sweep::Operands {
        let at = |d: Option<cudaDataType_t>, k: usize| d.map(|d| (addr[grads + k], d, size_of(d)));
        super::sweep::Operands {
            hidden: addr[0],
            weight: addr[1],
            bias: self.with_bias.then_some(addr[2]),
            z: addr[3],
            g16: addr[4],
            ones: addr[5],
            d_hidden: at(self.dh_ty, 0),
            d_weight: at(self.dw_ty, 1),
            d_bias: at(self.db_ty, 2),
            accumulate: self.accumulate,
            unscale: (1.0 / self.scale) as f32,
        }
    }

    /// A logit in float64 and the sum of its terms' magnitudes.
    pub(super) fn logit(&self, r: usize, j: usize) -> (f64, f64) {
        let h = self.shape.hidden();
        let b = if self.with_bias { self.bias[j] } else { 0.0 };
        let terms = (0..h).map(|q| self.hidden[r * h + q] * self.weight[j * h + q]);
        (terms.clone().sum::<f64>() + b, terms.map(f64::abs).sum::<f64>() + b.abs())
    }

    /// `d weight` and `d bias` as left in `dw` and `db` (when wanted) against float64 added
    /// chunk by chunk of `c` rows onto what they held, each chunk's sum rounded to its type.
    pub(super) fn check_weight_and_bias(&self, dw: &Buf, db: &Buf, c: usize, what: &str) {
        let (n, h, v) = (self.shape.rows(), self.shape.hidden(), self.shape.vocab());
        let chunked = |d: cudaDataType_t, len: usize, prior: &[f64], term: &dyn Fn(usize, usize) -> f64| {
            let mut model: Vec<f64> = (0..len).map(|i| if self.accumulate { prior[i] } else { 0.0 }).collect();
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
        let (grad, hidden) = (&self.grad, &self.hidden);
        if let Some(d) = self.dw_ty {
            let (model, mag) = chunked(d, v * h, &self.dw_prior, &|r, i| grad[r * v + i / h] * hidden[r * h + i % h]);
            assert_rounded(d, &dw.values(), &model, &mag, &format!("d weight ({what})"));
        }
        if let Some(d) = self.db_ty {
            let (model, mag) = chunked(d, v, &self.db_prior, &|r, j| grad[r * v + j]);
            assert_rounded(d, &db.values(), &model, &mag, &format!("d bias ({what})"));
        }
    }
}

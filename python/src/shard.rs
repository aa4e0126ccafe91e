//! The vocabulary- and data-parallel split for the Python driver (`fused_weighted_loss/_dist.py`),
//! which does the exchanges with `torch.distributed`: one call's state between its exchanges,
//! as the crate's `parallel::ShardedLoss` (CPU tensors) or `cuda::split::CudaSharded` (CUDA
//! tensors, on the stream given at construction).
//!
//! Buffers, by the step that fills or reads them: `batch_totals` writes two float64 (`B`, the
//! sum of the sample weights), `set_batch_totals` reads the data group's gather of them;
//! `partials` writes `words_per_row()` numbers per row (float64 on CPU, float32 on CUDA),
//! `finish_rows` reads the vocabulary group's gather of them; `finish` writes the outputs.

use crate::cpu::host;
use crate::{id_dtype, logit_dtype, to_py, IdType, Options, TensorArg};
use fused_weighted_loss::parallel::{default_chunk_rows, ShardedLoss, VocabSlice};
use fused_weighted_loss::{Backend, DType, Logit, Shape, TokenId, Tokens};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::ops::Range;

/// Where a call's outputs go (data pointers, 0 for not wanted): its share of the loss
/// `[loss, z_loss]` (two float64: the loss itself on a data group of one), the loss as one
/// float32, per-sample losses and weights (`[B]` float64 each), per-token losses (on CPU
/// `[B, T - 1]` float32, on CUDA `[B, T]` float64, as the plain call's).
#[derive(FromPyObject, Debug, Clone, Copy)]
pub(crate) struct ShardOutputs(pub u64, pub u64, pub u64, pub u64, pub u64);

/// Checks a buffer's dtype and returns its element count.
pub(crate) fn elements(t: &TensorArg, dtype: &str, what: &str) -> PyResult<usize> {
    if t.dtype() != dtype {
        return Err(PyTypeError::new_err(format!("{what} must be {dtype}, got {}", t.dtype())));
    }
    Ok(t.dims().iter().product())
}

/// The validated shape, slice and id type of a sharded call.
pub(crate) fn plan_args(
    tokens: &(TensorArg, Option<TensorArg>, Option<TensorArg>),
    dims: (usize, usize, usize),
    slice: (usize, usize),
) -> PyResult<(Shape, VocabSlice, IdType)> {
    let (ids, labels, weights) = tokens;
    let shape = Shape::new(dims.0, dims.1, dims.2).map_err(to_py)?;
    shape.check_token_dims("ids", ids.dims()).map_err(to_py)?;
    if let Some(l) = labels {
        shape.check_token_dims("labels", l.dims()).map_err(to_py)?;
    }
    if let Some(w) = weights {
        elements(w, "float32", "token_weights")?;
        shape.check_token_dims("token_weights", w.dims()).map_err(to_py)?;
    }
    let slice = VocabSlice::new(slice.0, slice.1, shape.vocab()).map_err(to_py)?;
    Ok((shape, slice, id_dtype(ids, labels.as_ref())?))
}

fn rows_of((r0, r1): (usize, usize)) -> Range<usize> {
    r0..r1
}

/// One sharded call (see the module docs).
#[pyclass(unsendable, module = "fused_weighted_loss._native")]
pub(crate) struct Shard {
    inner: Inner,
}

enum Inner {
    /// Taken by `finish`.
    Cpu(Option<Box<ShardedLoss>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::shard::CudaShard>),
}

impl Shard {
    fn cpu(&mut self) -> PyResult<&mut ShardedLoss> {
        match &mut self.inner {
            Inner::Cpu(Some(st)) => Ok(st),
            Inner::Cpu(None) => Err(PyRuntimeError::new_err("this sharded call is finished")),
            #[cfg(feature = "cuda")]
            Inner::Cuda(_) => unreachable!("CPU step on a CUDA call"),
        }
    }
}

#[pymethods]
impl Shard {
    /// Plans the call: `tokens` = (ids, labels or None, token weights or None) of this rank's
    /// samples, `dims` = (B, T, V) with the whole vocabulary, `slice` = (start, len) of this
    /// rank's logits; `device` None for CPU tensors, else (ordinal, stream).
    #[new]
    #[pyo3(signature = (tokens, dims, slice, options, device=None))]
    fn new(
        tokens: (TensorArg, Option<TensorArg>, Option<TensorArg>),
        dims: (usize, usize, usize),
        slice: (usize, usize),
        options: Options,
        device: Option<(usize, usize)>,
    ) -> PyResult<Shard> {
        let (shape, slice, ids_type) = plan_args(&tokens, dims, slice)?;
        match device {
            None => {
                let spec = options.spec(Backend::Cpu)?;
                let st = match ids_type {
                    IdType::I64 => cpu_new::<i64>(&spec, shape, slice, &tokens)?,
                    IdType::I32 => cpu_new::<i32>(&spec, shape, slice, &tokens)?,
                };
                Ok(Shard { inner: Inner::Cpu(Some(Box::new(st))) })
            }
            #[cfg(feature = "cuda")]
            Some(device) => {
                let spec = options.spec(Backend::Cuda)?;
                let st = crate::cuda::shard::CudaShard::new(&spec, shape, slice, ids_type, &tokens, device)?;
                Ok(Shard { inner: Inner::Cuda(Box::new(st)) })
            }
            #[cfg(not(feature = "cuda"))]
            Some(_) => Err(PyRuntimeError::new_err("this build of fused_weighted_loss has no CUDA support")),
        }
    }

    /// Numbers of one row's statistics in the exchange.
    fn words_per_row(&mut self) -> PyResult<usize> {
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.words_per_row(),
            Inner::Cpu(_) => Ok(self.cpu()?.words_per_row()),
        }
    }

    /// Rows per exchange by default when `ranks` ranks split the vocabulary (logits of `dtype`).
    fn default_chunk_rows(&mut self, ranks: usize, dtype: &str) -> PyResult<usize> {
        let l = logit_dtype(dtype)?;
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => Ok(c.default_chunk_rows(ranks, l)),
            Inner::Cpu(_) => {
                let _ = l;
                Ok(default_chunk_rows(self.cpu()?.slice().vocab(), ranks))
            }
        }
    }

    /// Writes `[B, sum of weights]` (float64) into `out`.
    fn batch_totals(&mut self, out: TensorArg) -> PyResult<()> {
        if elements(&out, "float64", "batch totals")? != 2 {
            return Err(PyValueError::new_err("batch totals need 2 elements"));
        }
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.batch_totals(&out),
            Inner::Cpu(_) => {
                let t = self.cpu()?.batch_totals();
                // SAFETY: `out` is a live, contiguous float64 CPU tensor of 2 elements (checked)
                // that Python allocated for this call and holds through it.
                unsafe { host::slice_mut::<f64>(out.ptr(), 2, "batch totals")? }.copy_from_slice(&t);
                Ok(())
            }
        }
    }

    /// The data group's gathered totals (float64 `[2 * ranks]`) set the denominators.
    fn set_batch_totals(&mut self, gathered: TensorArg) -> PyResult<()> {
        let n = elements(&gathered, "float64", "gathered batch totals")?;
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.set_batch_totals(&gathered, n),
            Inner::Cpu(_) => {
                // SAFETY: a live, contiguous float64 CPU tensor of n elements (checked), held by
                // Python through the call.
                let g = unsafe { host::slice::<f64>(gathered.ptr(), n, "gathered batch totals")? };
                self.cpu()?.set_batch_totals(g).map_err(to_py)
            }
        }
    }

    /// The statistics of rows `rows` (their `logits`, `[rows, len]`) into `out`.
    fn partials(&mut self, py: Python<'_>, rows: (usize, usize), logits: TensorArg, out: TensorArg) -> PyResult<()> {
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.partials(rows_of(rows), &logits, &out),
            Inner::Cpu(_) => {
                let n = elements(&out, "float64", "partials")?;
                let st = self.cpu()?;
                cpu_dispatch_partials(py, st, rows_of(rows), &logits, out.ptr(), n)
            }
        }
    }

    /// Merges the gathered statistics of rows `rows`, records their losses and, with `grad`
    /// (the logits' dtype and shape), writes this rank's gradient of them.
    #[pyo3(signature = (rows, gathered, logits, grad=None))]
    fn finish_rows(
        &mut self,
        py: Python<'_>,
        rows: (usize, usize),
        gathered: TensorArg,
        logits: TensorArg,
        grad: Option<TensorArg>,
    ) -> PyResult<()> {
        if let Some(g) = &grad {
            if g.dtype() != logits.dtype()
                || g.dims().iter().product::<usize>() != logits.dims().iter().product::<usize>()
            {
                return Err(PyValueError::new_err("the gradient must have the logits' dtype and size"));
            }
        }
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.finish_rows(rows_of(rows), &gathered, &logits, grad.as_ref()),
            Inner::Cpu(_) => {
                let n = elements(&gathered, "float64", "gathered partials")?;
                // SAFETY: a live, contiguous float64 CPU tensor of n elements (checked).
                let g = unsafe { host::slice::<f64>(gathered.ptr(), n, "gathered partials")? };
                let st = self.cpu()?;
                match logit_dtype(logits.dtype())? {
                    DType::F32 => cpu_finish_rows::<f32>(py, st, rows_of(rows), g, &logits, grad.as_ref()),
                    DType::F16 => {
                        cpu_finish_rows::<fused_weighted_loss::f16>(py, st, rows_of(rows), g, &logits, grad.as_ref())
                    }
                    DType::BF16 => {
                        cpu_finish_rows::<fused_weighted_loss::bf16>(py, st, rows_of(rows), g, &logits, grad.as_ref())
                    }
                }
            }
        }
    }

    /// Per-sample and batch loss into `outputs` (see `ShardOutputs`), once every row is finished.
    fn finish(&mut self, outputs: ShardOutputs) -> PyResult<()> {
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda(c) => c.finish(outputs),
            Inner::Cpu(st) => {
                let st = st.take().ok_or_else(|| PyRuntimeError::new_err("this sharded call is finished"))?;
                cpu_finish(*st, outputs)
            }
        }
    }
}

fn cpu_new<I: TokenId>(
    spec: &fused_weighted_loss::LossSpec,
    shape: Shape,
    slice: VocabSlice,
    (ids, labels, weights): &(TensorArg, Option<TensorArg>, Option<TensorArg>),
) -> PyResult<ShardedLoss> {
    let rows = shape.rows();
    // SAFETY: live, contiguous CPU tensors of these dtypes and `[B, T]` shapes (checked in
    // `plan_args`), held by Python through the call; the plan copies what it keeps.
    let (ids, labels, weights) = unsafe {
        (
            host::slice::<I>(ids.ptr(), rows, "ids")?,
            labels.as_ref().map(|l| host::slice::<I>(l.ptr(), rows, "labels")).transpose()?,
            weights.as_ref().map(|w| host::slice::<f32>(w.ptr(), rows, "token_weights")).transpose()?,
        )
    };
    let mut tokens = Tokens::new(ids);
    if let Some(l) = labels {
        tokens = tokens.with_labels(l);
    }
    if let Some(w) = weights {
        tokens = tokens.with_token_weights(w);
    }
    ShardedLoss::new(spec, shape, slice, tokens).map_err(to_py)
}

fn cpu_dispatch_partials(
    py: Python<'_>,
    st: &mut ShardedLoss,
    rows: Range<usize>,
    logits: &TensorArg,
    out: u64,
    n: usize,
) -> PyResult<()> {
    fn typed<L: Logit>(
        py: Python<'_>,
        st: &mut ShardedLoss,
        rows: Range<usize>,
        logits: &TensorArg,
        out: u64,
        n: usize,
    ) -> PyResult<()> {
        let len: usize = logits.dims().iter().product();
        // SAFETY: `logits` is a live, contiguous CPU tensor of `len` elements of L (dtype
        // checked by the caller's dispatch), `out` one of n float64 (checked) allocated for this
        // step; Python holds both through the call and nothing else writes `out`.
        let (x, o) =
            unsafe { (host::slice::<L>(logits.ptr(), len, "logits")?, host::slice_mut::<f64>(out, n, "partials")?) };
        py.detach(|| st.partials(rows, x, o)).map_err(to_py)
    }
    match logit_dtype(logits.dtype())? {
        DType::F32 => typed::<f32>(py, st, rows, logits, out, n),
        DType::F16 => typed::<fused_weighted_loss::f16>(py, st, rows, logits, out, n),
        DType::BF16 => typed::<fused_weighted_loss::bf16>(py, st, rows, logits, out, n),
    }
}

fn cpu_finish_rows<L: Logit>(
    py: Python<'_>,
    st: &mut ShardedLoss,
    rows: Range<usize>,
    gathered: &[f64],
    logits: &TensorArg,
    grad: Option<&TensorArg>,
) -> PyResult<()> {
    let len: usize = logits.dims().iter().product();
    // SAFETY: live, contiguous CPU tensors of `len` elements of L (the gradient: the same dtype
    // and size, checked), held by Python through the call; the gradient is a buffer of this call
    // that nothing else uses and that overlaps no input.
    let (x, g) = unsafe {
        (
            host::slice::<L>(logits.ptr(), len, "logits")?,
            grad.map(|g| host::slice_mut::<L>(g.ptr(), len, "grad")).transpose()?,
        )
    };
    py.detach(|| match g {
        Some(g) => st.finish_rows_grad(rows, gathered, x, g),
        None => st.finish_rows(rows, gathered),
    })
    .map_err(to_py)
}

fn cpu_finish(st: ShardedLoss, out: ShardOutputs) -> PyResult<()> {
    let ShardOutputs(share, loss32, per, weights, token) = out;
    let (b, t) = (st.shape().batch(), st.shape().seq());
    // SAFETY: each non-zero pointer is a live, contiguous tensor Python allocated for this call
    // with the documented dtype and length (`ShardOutputs`), overlapping nothing else.
    unsafe {
        let token = match token {
            0 => None,
            p => Some(host::slice_mut::<f32>(p, b * (t - 1), "token_loss")?),
        };
        let r = match token {
            Some(tl) => st.finish_per_token(tl),
            None => st.finish(),
        }
        .map_err(to_py)?;
        host::slice_mut::<f64>(share, 2, "loss share")?.copy_from_slice(&ShardedLoss::loss_totals(&r));
        host::slice_mut::<f32>(loss32, 1, "loss")?[0] = r.loss as f32;
        if per != 0 {
            host::slice_mut::<f64>(per, b, "per_sample")?.copy_from_slice(&r.per_sample_loss);
        }
        if weights != 0 {
            host::slice_mut::<f64>(weights, b, "weights")?.copy_from_slice(&r.weights);
        }
    }
    Ok(())
}

//! The vocabulary- and data-parallel split of CUDA tensors for the Python driver
//! (`fused_weighted_loss/_dist.py`), which does the exchanges with `torch.distributed`: one
//! call's state between its exchanges, as the crate's `cuda::split::CudaSharded` (on the stream
//! given at construction). CPU tensors do not come here: they run the crate's one call
//! `parallel::Sharded` (`crate::forward` with a split), whose exchanges call back into Python.
//!
//! Buffers, by the step that fills or reads them: `batch_totals` writes two float64 (`B`, the
//! sum of the sample weights), `set_batch_totals` reads the data group's gather of them;
//! `partials` writes `words_per_row()` float32 per row, `finish_rows` reads the vocabulary
//! group's gather of them; `finish` writes the outputs.

use crate::cuda::shard::CudaShard;
use crate::{id_dtype, logit_dtype, to_py, IdType, Options, TensorArg};
use fused_weighted_loss::parallel::VocabSlice;
use fused_weighted_loss::{Backend, Shape};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::ops::Range;

/// Where a call's outputs go (data pointers, 0 for not wanted): its share of the loss
/// `[loss, z_loss]` (two float64: the loss itself on a data group of one), the loss as one
/// float32, per-sample losses and weights (`[B]` float64 each), per-token losses (`[B, T]`
/// float64, as the plain call's on CUDA).
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

/// One sharded call on CUDA tensors (see the module docs).
#[pyclass(unsendable, module = "fused_weighted_loss._native")]
pub(crate) struct Shard {
    inner: Box<CudaShard>,
}

#[pymethods]
impl Shard {
    /// Plans the call: `tokens` = (ids, labels or None, token weights or None) of this rank's
    /// samples, `dims` = (B, T, V) with the whole vocabulary, `slice` = (start, len) of this
    /// rank's logits, `device` = (ordinal, stream).
    #[new]
    fn new(
        tokens: (TensorArg, Option<TensorArg>, Option<TensorArg>),
        dims: (usize, usize, usize),
        slice: (usize, usize),
        options: Options,
        device: (usize, usize),
    ) -> PyResult<Shard> {
        let (shape, slice, ids_type) = plan_args(&tokens, dims, slice)?;
        let spec = options.spec(Backend::Cuda)?;
        let inner = CudaShard::new(&spec, shape, slice, ids_type, &tokens, device)?;
        Ok(Shard { inner: Box::new(inner) })
    }

    /// Numbers of one row's statistics in the exchange.
    fn words_per_row(&mut self) -> PyResult<usize> {
        self.inner.words_per_row()
    }

    /// Rows per exchange by default when `ranks` ranks split the vocabulary (logits of `dtype`).
    fn default_chunk_rows(&mut self, ranks: usize, dtype: &str) -> PyResult<usize> {
        Ok(self.inner.default_chunk_rows(ranks, logit_dtype(dtype)?))
    }

    /// Writes `[B, sum of weights]` (float64) into `out`.
    fn batch_totals(&mut self, out: TensorArg) -> PyResult<()> {
        if elements(&out, "float64", "batch totals")? != 2 {
            return Err(PyValueError::new_err("batch totals need 2 elements"));
        }
        self.inner.batch_totals(&out)
    }

    /// The data group's gathered totals (float64 `[2 * ranks]`) set the denominators.
    fn set_batch_totals(&mut self, gathered: TensorArg) -> PyResult<()> {
        let n = elements(&gathered, "float64", "gathered batch totals")?;
        self.inner.set_batch_totals(&gathered, n)
    }

    /// The statistics of rows `rows` (their `logits`, `[rows, len]`) into `out`.
    fn partials(&mut self, rows: (usize, usize), logits: TensorArg, out: TensorArg) -> PyResult<()> {
        self.inner.partials(rows_of(rows), &logits, &out)
    }

    /// Merges the gathered statistics of rows `rows`, records their losses and, with `grad`
    /// (the logits' dtype and shape), writes this rank's gradient of them.
    #[pyo3(signature = (rows, gathered, logits, grad=None))]
    fn finish_rows(
        &mut self,
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
        self.inner.finish_rows(rows_of(rows), &gathered, &logits, grad.as_ref())
    }

    /// Per-sample and batch loss into `outputs` (see `ShardOutputs`), once every row is finished.
    fn finish(&mut self, outputs: ShardOutputs) -> PyResult<()> {
        self.inner.finish(outputs)
    }
}

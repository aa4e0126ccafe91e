//! The sharded call on CUDA tensors (see `crate::shard`): the crate's `CudaSharded` steps on
//! torch's device pointers, all queued on the stream given at construction (torch's current
//! stream there), no host synchronisation.

use super::Call;
use crate::shard::{elements, ShardOutputs};
use crate::{logit_dtype, to_py, IdType, TensorArg};
use fused_weighted_loss::cuda::split::{default_device_chunk_rows, CudaSharded};
use fused_weighted_loss::cuda::DeviceInputs;
use fused_weighted_loss::parallel::VocabSlice;
use fused_weighted_loss::{DType, Logit, LossSpec, Shape, TokenId};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::ops::Range;

/// One sharded call on a device (`device` = (ordinal, stream), the same for every step).
pub(crate) struct CudaShard {
    device: (usize, usize),
    shape: Shape,
    /// Taken by `finish`.
    st: Option<CudaSharded>,
}

impl CudaShard {
    pub(crate) fn new(
        spec: &LossSpec,
        shape: Shape,
        slice: VocabSlice,
        ids_type: IdType,
        tokens: &(TensorArg, Option<TensorArg>, Option<TensorArg>),
        device: (usize, usize),
    ) -> PyResult<CudaShard> {
        let st = match ids_type {
            IdType::I64 => plan::<i64>(spec, shape, slice, tokens, device)?,
            IdType::I32 => plan::<i32>(spec, shape, slice, tokens, device)?,
        };
        Ok(CudaShard { device, shape, st: Some(st) })
    }

    fn st(&mut self) -> PyResult<&mut CudaSharded> {
        self.st.as_mut().ok_or_else(|| PyRuntimeError::new_err("this sharded call is finished"))
    }

    pub(crate) fn words_per_row(&mut self) -> PyResult<usize> {
        Ok(self.st()?.words_per_row())
    }

    pub(crate) fn default_chunk_rows(&self, ranks: usize, dtype: DType) -> usize {
        default_device_chunk_rows(self.shape.vocab(), ranks, dtype)
    }

    pub(crate) fn batch_totals(&mut self, out: &TensorArg) -> PyResult<()> {
        let call = Call::new(self.device)?;
        // SAFETY: a live, contiguous float64 tensor of 2 elements on this device (checked by the
        // caller), allocated by Python for this step.
        let mut o = unsafe { call.borrow::<f64>(out.ptr(), 2) };
        self.st()?.batch_totals(&call.stream, &mut o.view_mut()).map_err(to_py)
    }

    pub(crate) fn set_batch_totals(&mut self, gathered: &TensorArg, n: usize) -> PyResult<()> {
        let call = Call::new(self.device)?;
        // SAFETY: a live, contiguous float64 tensor of n elements on this device (checked).
        let g = unsafe { call.borrow::<f64>(gathered.ptr(), n) };
        self.st()?.set_batch_totals(&call.stream, &g.view()).map_err(to_py)
    }

    pub(crate) fn partials(&mut self, rows: Range<usize>, logits: &TensorArg, out: &TensorArg) -> PyResult<()> {
        let n = elements(out, "float32", "partials")?;
        match logit_dtype(logits.dtype())? {
            DType::F32 => self.partials_typed::<f32>(rows, logits, out.ptr(), n),
            DType::F16 => self.partials_typed::<fused_weighted_loss::f16>(rows, logits, out.ptr(), n),
            DType::BF16 => self.partials_typed::<fused_weighted_loss::bf16>(rows, logits, out.ptr(), n),
        }
    }

    fn partials_typed<L: Logit>(&mut self, rows: Range<usize>, logits: &TensorArg, out: u64, n: usize) -> PyResult<()> {
        let call = Call::new(self.device)?;
        let len = logits.dims().iter().product();
        // SAFETY: live, contiguous tensors on this device: the logits (`len` elements of L, dtype
        // dispatched on) and the partials buffer (n float32, checked) allocated for this step.
        let (x, mut o) = unsafe { (call.borrow::<L>(logits.ptr(), len), call.borrow::<f32>(out, n)) };
        self.st()?.partials(&call.stream, rows, &x.view(), &mut o.view_mut()).map_err(to_py)
    }

    pub(crate) fn finish_rows(
        &mut self,
        rows: Range<usize>,
        gathered: &TensorArg,
        logits: &TensorArg,
        grad: Option<&TensorArg>,
    ) -> PyResult<()> {
        let n = elements(gathered, "float32", "gathered partials")?;
        match logit_dtype(logits.dtype())? {
            DType::F32 => self.finish_typed::<f32>(rows, gathered.ptr(), n, logits, grad),
            DType::F16 => self.finish_typed::<fused_weighted_loss::f16>(rows, gathered.ptr(), n, logits, grad),
            DType::BF16 => self.finish_typed::<fused_weighted_loss::bf16>(rows, gathered.ptr(), n, logits, grad),
        }
    }

    fn finish_typed<L: Logit>(
        &mut self,
        rows: Range<usize>,
        gathered: u64,
        n: usize,
        logits: &TensorArg,
        grad: Option<&TensorArg>,
    ) -> PyResult<()> {
        let call = Call::new(self.device)?;
        let len = logits.dims().iter().product();
        // SAFETY: live, contiguous tensors on this device: the gathered partials (n float32,
        // checked), the logits (`len` elements of L) and the gradient (the logits' dtype and size,
        // checked by the caller), a buffer of this call that overlaps no input.
        let (g_all, x, g) = unsafe {
            (
                call.borrow::<f32>(gathered, n),
                call.borrow::<L>(logits.ptr(), len),
                grad.map(|g| call.borrow::<L>(g.ptr(), len)),
            )
        };
        let st = self.st()?;
        match g {
            Some(mut g) => st.finish_rows_grad(&call.stream, rows, &g_all.view(), &x.view(), &mut g.view_mut()),
            None => st.finish_rows(&call.stream, rows, &g_all.view(), &x.view()),
        }
        .map_err(to_py)
    }

    pub(crate) fn finish(&mut self, out: ShardOutputs) -> PyResult<()> {
        let call = Call::new(self.device)?;
        let st = self.st.take().ok_or_else(|| PyRuntimeError::new_err("this sharded call is finished"))?;
        let result = st.finish(&call.stream).map_err(to_py)?;
        let ShardOutputs(share, loss32, per, weights, token) = out;
        let (b, rows) = (self.shape.batch(), self.shape.rows());
        // SAFETY: each non-zero pointer is a live, contiguous tensor on this device that Python
        // allocated for this call with the documented dtype and length (`ShardOutputs`: token
        // losses `[B, T]` float64 here), overlapping nothing else.
        let (mut share, mut loss32, per, weights, token) = unsafe {
            let optional = |p: u64, n: usize| (p != 0).then(|| call.borrow::<f64>(p, n));
            (
                call.borrow::<f64>(share, 2),
                call.borrow::<f32>(loss32, 1),
                optional(per, b),
                optional(weights, b),
                optional(token, rows),
            )
        };
        let copy = |e| PyRuntimeError::new_err(format!("CUDA error while copying the results: {e}"));
        CudaSharded::loss_totals(&result, &call.stream, &mut share.view_mut()).map_err(to_py)?;
        call.stream.memcpy_dtod(&result.loss_f32, &mut loss32.view_mut()).map_err(copy)?;
        for (from, to) in [(&result.per_sample_loss, per), (&result.weights, weights), (&result.row_loss, token)] {
            if let Some(mut to) = to {
                call.stream.memcpy_dtod(from, &mut to.view_mut()).map_err(copy)?;
            }
        }
        Ok(())
    }
}

/// Queues the plan of a call on its device.
fn plan<I: TokenId>(
    spec: &LossSpec,
    shape: Shape,
    slice: VocabSlice,
    (ids, labels, weights): &(TensorArg, Option<TensorArg>, Option<TensorArg>),
    device: (usize, usize),
) -> PyResult<CudaSharded> {
    let call = Call::new(device)?;
    let rows = shape.rows();
    if [Some(ids), labels.as_ref(), weights.as_ref()].iter().flatten().any(|t| t.ptr() == 0) {
        return Err(PyValueError::new_err("a token tensor has no data"));
    }
    // SAFETY: live, contiguous tensors on this device of these dtypes and `[B, T]` shapes
    // (checked in `shard::plan_args`), which torch holds until the queued work has run; the
    // plan reads them (and copies the token weights) on this stream.
    let (ids, labels, weights) = unsafe {
        (
            call.borrow::<I>(ids.ptr(), rows),
            labels.as_ref().map(|l| call.borrow::<I>(l.ptr(), rows)),
            weights.as_ref().map(|w| call.borrow::<f32>(w.ptr(), rows)),
        )
    };
    let (ids, labels, weights) = (ids.view(), labels.as_ref().map(|l| l.view()), weights.as_ref().map(|w| w.view()));
    let mut inputs = DeviceInputs::new(&ids);
    if let Some(l) = labels.as_ref() {
        inputs = inputs.with_labels(l);
    }
    if let Some(w) = weights.as_ref() {
        inputs = inputs.with_token_weights(w);
    }
    CudaSharded::new(call.dev.loss(), spec, shape, slice, &call.stream, &inputs).map_err(to_py)
}

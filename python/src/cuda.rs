//! CUDA tensors: the crate's kernels (and, for the fused linear loss, cuBLAS) on torch's device
//! pointers, queued on torch's current stream, in the device's primary context (the one torch
//! uses): no copy of the inputs or the gradients, no host synchronisation (unless `check` asks
//! for one, or a data-parallel rank holds no samples), no second context.

use crate::group::PySplit;
use crate::linear::LinearRequest;
use crate::{to_py, IdType, Inputs, Options, Outputs, Request, TensorArg};
use fused_weighted_loss::cuda::cudarc::driver::sys::CUcontext;
use fused_weighted_loss::cuda::cudarc::driver::{result, CudaStream, CudaViewMut, DeviceRepr};
use fused_weighted_loss::cuda::external::{Borrowed, ExternalDevice};
use fused_weighted_loss::cuda::linear::{CudaLinearLoss, DeviceGrad, DeviceLinearGrads, DeviceLinearInputs};
use fused_weighted_loss::cuda::split::DeviceSharded;
use fused_weighted_loss::cuda::{DeviceInputs, DeviceLossOutput};
use fused_weighted_loss::{Backend, DType, Error, Logit, TokenId};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// Puts back, when dropped, the context that was current on the thread before the call (torch's
/// current device is the runtime's current context; a call on another device's tensors, or the
/// first call, which retains the device's primary context, must not change it).
struct RestoreContext(Option<CUcontext>);

impl RestoreContext {
    /// The thread's current context (none when the driver has not been initialised).
    fn save() -> RestoreContext {
        RestoreContext(result::ctx::get_current().ok().flatten())
    }
}

impl Drop for RestoreContext {
    fn drop(&mut self) {
        // SAFETY: a context that was current on this thread when the call began, owned by the
        // caller's runtime, which keeps it (the primary context of a device) alive; or none, as
        // it was (the runtime then binds its own current device's context when it next needs one)
        let _ = unsafe { result::ctx::set_current(self.0.unwrap_or(std::ptr::null_mut())) };
    }
}

/// The device, its stream and the context guard of one call.
struct Call {
    dev: Arc<ExternalDevice>,
    stream: Arc<CudaStream>,
    _restore: RestoreContext,
}

impl Call {
    /// The device's state is made on a process's first call for it (the primary context
    /// retained, the kernels loaded, which the driver compiles from PTX on a GPU newer than the
    /// embedded binaries: seconds), with the GIL released, so that other Python threads run
    /// meanwhile; later calls find it made. The GIL is released for later calls too (a release
    /// and a take, well under a microsecond beside a launch's tens): the lookup waits on the
    /// lock of the devices' table, which a thread making a device holds for those seconds.
    fn new(py: Python<'_>, (ordinal, stream): (usize, usize)) -> PyResult<Call> {
        // the driver must be known to load before any driver call
        fused_weighted_loss::cuda_status()
            .map_err(|reason| to_py(Error::BackendUnavailable { backend: Backend::Cuda, reason }))?;
        let restore = RestoreContext::save();
        // SAFETY: the buffers this package makes through the context are the crate's own (each
        // call's scratch and results, on that call's stream) and torch's, borrowed on torch's
        // current stream, and cuBLAS's workspace, which the crate orders across streams with its own
        // event: none is used on a second stream unordered.
        let dev = py.detach(|| unsafe { ExternalDevice::primary(ordinal) }).map_err(to_py)?;
        dev.loss()
            .context()
            .bind_to_thread()
            .map_err(|e| PyRuntimeError::new_err(format!("CUDA error while binding the context: {e}")))?;
        // SAFETY: `stream` is torch's current stream of device `ordinal` (`_ops.py` passes
        // `torch.cuda.current_stream(device).cuda_stream`), a stream of that device's primary
        // context which torch keeps alive for the life of the process.
        let stream = unsafe { dev.borrow_stream(stream) };
        Ok(Call { dev, stream, _restore: restore })
    }

    /// # Safety
    /// `ptr` is the data pointer of a live, contiguous CUDA tensor of this device with `len`
    /// elements of `T`, which torch holds until the work queued on the stream has run, and
    /// nothing else writes while that work runs.
    unsafe fn borrow<T: DeviceRepr>(&self, ptr: u64, len: usize) -> Borrowed<T> {
        // SAFETY: as the caller promises.
        unsafe { Borrowed::new(&self.stream, ptr, len) }
    }
}

/// See `crate::forward`.
/// The loss (and gradient) of CUDA tensors; with `split`, this rank's slice of the vocabulary
/// through the crate's one call `DeviceSharded` (`chunk_rows` rows per exchange, None: its
/// default), its exchanges going through torch.distributed on torch's stream (see group.rs).
pub(crate) fn forward(
    py: Python<'_>,
    req: &Request<'_>,
    device: (usize, usize),
    check: bool,
    split: Split,
) -> PyResult<()> {
    dispatch!(req.types, typed(py, req, device, check, split))
}

/// This rank's split and its rows per exchange.
type Split<'a> = Option<(&'a PySplit, Option<usize>)>;

fn typed<L: Logit, I: TokenId>(
    py: Python<'_>,
    req: &Request<'_>,
    device: (usize, usize),
    check: bool,
    split: Split,
) -> PyResult<()> {
    let (spec, shape, out) = (&req.spec, req.shape, req.out);
    let call = Call::new(py, device)?;
    let (n, rows, b) = (shape.logits_len(), shape.rows(), shape.batch());
    // SAFETY: the data pointers of live, contiguous tensors on this device with these dtypes and
    // shapes (dtypes and shapes checked in `Inputs::request`, device and contiguity in _ops.py),
    // which torch keeps alive until the queued work has run (its caching allocator reuses memory
    // in the order of the stream the tensors were used on, this one); the outputs are tensors
    // allocated for this call, which nothing else uses and which overlap no input (the per-token
    // losses: `[B, T]` f64, see `crate::Outputs`).
    let (
        logits,
        ids,
        labels,
        token_weights,
        mut grad,
        mut loss,
        mut per_sample,
        mut weights,
        mut z_loss,
        mut token_loss,
    ) = unsafe {
        let optional = |ptr: u64, len: usize| (ptr != 0).then(|| call.borrow::<f64>(ptr, len));
        (
            call.borrow::<L>(req.logits.ptr(), n),
            call.borrow::<I>(req.ids.ptr(), rows),
            req.labels.map(|l| call.borrow::<I>(l.ptr(), rows)),
            req.token_weights.map(|w| call.borrow::<f32>(w.ptr(), rows)),
            (out.grad() != 0).then(|| match out.grad_f32() {
                true => GradBuf::Wide(call.borrow::<f32>(out.grad(), n)),
                false => GradBuf::Same(call.borrow::<L>(out.grad(), n)),
            }),
            call.borrow::<f32>(out.loss(), 1),
            optional(out.per_sample(), b),
            optional(out.weights(), b),
            optional(out.z_loss(), 1),
            optional(out.token_loss(), rows),
        )
    };
    let (ids, labels, token_weights) =
        (ids.view(), labels.as_ref().map(|l| l.view()), token_weights.as_ref().map(|w| w.view()));
    let mut inputs = DeviceInputs::new(&ids);
    if let Some(l) = labels.as_ref() {
        inputs = inputs.with_labels(l);
    }
    if let Some(w) = token_weights.as_ref() {
        inputs = inputs.with_token_weights(w);
    }
    let (stream, kernels) = (&call.stream, call.dev.loss());
    let result: DeviceLossOutput = match split {
        None => match grad.as_mut() {
            Some(GradBuf::Same(g)) => {
                kernels.loss_and_grad(spec, shape, stream, &logits.view(), &inputs, &mut g.view_mut())
            }
            Some(GradBuf::Wide(g)) => {
                kernels.loss_and_grad(spec, shape, stream, &logits.view(), &inputs, &mut g.view_mut())
            }
            None => kernels.loss(spec, shape, stream, &logits.view(), &inputs),
        }
        .map_err(to_py)?,
        Some((split, chunk_rows)) => {
            // the logits hold this rank's columns: the loss's shape has the whole vocabulary
            let slice = split.slice().map_err(to_py)?;
            let whole = shape.with_vocab(slice.vocab()).map_err(to_py)?;
            // without the GIL, as on the CPU: the exchanges call into Python, which takes it back
            py.detach(|| {
                let mut sharded = DeviceSharded::vocab_parallel(slice, &split.1).with_data_group(&split.2);
                if let Some(rows) = chunk_rows {
                    sharded = sharded.with_chunk_rows(rows);
                }
                let l = logits.view();
                match grad.as_mut() {
                    Some(GradBuf::Same(g)) => {
                        sharded.loss_and_grad(kernels, spec, whole, stream, &l, &inputs, &mut g.view_mut())
                    }
                    Some(GradBuf::Wide(g)) => {
                        sharded.loss_and_grad(kernels, spec, whole, stream, &l, &inputs, &mut g.view_mut())
                    }
                    None => sharded.loss(kernels, spec, whole, stream, &l, &inputs),
                }
            })
            .map_err(crate::group::to_py_kept)?
        }
    };
    copy_outputs(stream, &result, &mut loss, [&mut per_sample, &mut weights, &mut z_loss, &mut token_loss])?;
    finish(py, stream, &result, check)
}

/// Copies the device results into the output tensors (on the stream, no host wait): the f32
/// loss, then per-sample losses, weights, z-loss part and per-position losses where wanted.
fn copy_outputs(
    stream: &Arc<CudaStream>,
    result: &DeviceLossOutput,
    loss: &mut Borrowed<f32>,
    rest: [&mut Option<Borrowed<f64>>; 4],
) -> PyResult<()> {
    let copy = |e| PyRuntimeError::new_err(format!("CUDA error while copying the results: {e}"));
    stream.memcpy_dtod(&result.loss_f32, &mut loss.view_mut()).map_err(copy)?;
    let from = [&result.per_sample_loss, &result.weights, &result.z_loss, &result.row_loss];
    for (from, to) in from.into_iter().zip(rest) {
        if let Some(to) = to.as_mut() {
            // (a rank without samples: `from` has one element beyond the results, `to` none)
            let n = to.len().min(from.len());
            stream.memcpy_dtod(&from.slice(..n), &mut to.view_mut()).map_err(copy)?;
        }
    }
    Ok(())
}

/// With `check`, waits for the stream (without the GIL, so that other Python threads run
/// meanwhile) and reports what the kernels found.
fn finish(py: Python<'_>, stream: &Arc<CudaStream>, result: &DeviceLossOutput, check: bool) -> PyResult<()> {
    if check {
        let stream = stream.clone();
        py.detach(|| result.check(&stream)).map_err(to_py)?;
    }
    Ok(())
}

/// See `crate::linear::linear_forward`.
pub(crate) fn linear_forward(
    py: Python<'_>,
    req: &LinearRequest<'_>,
    device: (usize, usize),
    check: bool,
) -> PyResult<()> {
    dispatch!(req.types, linear_typed(py, req, device, check))
}

/// A gradient tensor on the device, in the inputs' dtype or in f32.
enum GradBuf<L> {
    Same(Borrowed<L>),
    Wide(Borrowed<f32>),
}

/// A [`GradBuf`]'s memory, to write.
enum GradView<'a, L> {
    Same(CudaViewMut<'a, L>),
    Wide(CudaViewMut<'a, f32>),
    Skip,
}

fn linear_typed<L: Logit, I: TokenId>(
    py: Python<'_>,
    req: &LinearRequest<'_>,
    device: (usize, usize),
    check: bool,
) -> PyResult<()> {
    let (shape, out) = (req.shape, req.out);
    let call = Call::new(py, device)?;
    // the first call on a device creates its cuBLAS handle (and workspace): without the GIL, as
    // the device's state in `Call::new`
    let linear = py.detach(|| CudaLinearLoss::shared(call.dev.loss().context())).map_err(to_py)?;
    let (rows, b) = (shape.rows(), shape.batch());
    let lens = [shape.hidden_len(), shape.weight_len(), shape.vocab()];
    // SAFETY: the data pointers of live, contiguous tensors on this device with these dtypes and
    // shapes (checked in `LinearInputs::request` and _linear.py), which torch keeps alive until
    // the queued work has run (stream order, as in `typed`); the gradients and outputs are
    // tensors allocated for this call, which nothing else uses and which overlap no input (the
    // inputs are only read, so hidden, weight and bias may share memory).
    let (hidden, weight, bias, ids, labels, token_weights, mut loss, mut per_sample, mut weights, mut z_loss) = unsafe {
        let optional = |ptr: u64, len: usize| (ptr != 0).then(|| call.borrow::<f64>(ptr, len));
        (
            call.borrow::<L>(req.hidden.ptr(), shape.hidden_len()),
            call.borrow::<L>(req.weight.ptr(), shape.weight_len()),
            req.bias.map(|t| call.borrow::<L>(t.ptr(), shape.vocab())),
            call.borrow::<I>(req.ids.ptr(), rows),
            req.labels.map(|l| call.borrow::<I>(l.ptr(), rows)),
            req.token_weights.map(|w| call.borrow::<f32>(w.ptr(), rows)),
            call.borrow::<f32>(out.loss(), 1),
            optional(out.per_sample(), b),
            optional(out.weights(), b),
            optional(out.z_loss(), 1),
        )
    };
    let mut bufs: Vec<Option<GradBuf<L>>> = Vec::with_capacity(3);
    for (g, &len) in req.grads.iter().zip(&lens) {
        // SAFETY: as above (a gradient tensor of the input's shape, allocated for this call).
        bufs.push(g.map(|g| unsafe {
            if g.f32 {
                GradBuf::Wide(call.borrow::<f32>(g.ptr, len))
            } else {
                GradBuf::Same(call.borrow::<L>(g.ptr, len))
            }
        }));
    }
    let (ids, labels, token_weights) =
        (ids.view(), labels.as_ref().map(|l| l.view()), token_weights.as_ref().map(|w| w.view()));
    let mut tokens = DeviceInputs::new(&ids);
    if let Some(l) = labels.as_ref() {
        tokens = tokens.with_labels(l);
    }
    if let Some(w) = token_weights.as_ref() {
        tokens = tokens.with_token_weights(w);
    }
    let (h, w, bv) = (hidden.view(), weight.view(), bias.as_ref().map(|b| b.view()));
    let mut inputs = DeviceLinearInputs::new(&h, &w);
    if let Some(b) = bv.as_ref() {
        inputs = inputs.with_bias(b);
    }
    // the views of the gradient buffers, then a `DeviceGrad` borrowing each
    let mut views: Vec<GradView<'_, L>> = bufs
        .iter_mut()
        .map(|g| match g {
            Some(GradBuf::Same(x)) => GradView::Same(x.view_mut()),
            Some(GradBuf::Wide(x)) => GradView::Wide(x.view_mut()),
            None => GradView::Skip,
        })
        .collect();
    let mut targets = views.iter_mut().map(|v| match v {
        GradView::Same(v) => DeviceGrad::Into(v),
        GradView::Wide(v) => DeviceGrad::IntoF32(v),
        GradView::Skip => DeviceGrad::Skip,
    });
    let mut next = || targets.next().unwrap_or(DeviceGrad::Skip);
    let grads = DeviceLinearGrads::new().hidden(next()).weight(next()).bias(next());
    let stream = &call.stream;
    let result = match &req.split {
        // without the GIL too: a split call on another thread holds the device's cuBLAS handle
        // while its exchanges wait for the GIL, and this one would wait for the handle
        None => py.detach(|| linear.loss_and_grad(&req.spec, shape, stream, &inputs, &tokens, grads, req.chunking)),
        Some(split) => {
            // the weight holds this rank's rows: the loss's shape has the whole vocabulary; the
            // exchanges go through torch.distributed on torch's stream (see group.rs)
            let slice = split.slice().map_err(to_py)?;
            let whole = shape.with_vocab(slice.vocab()).map_err(to_py)?;
            // without the GIL, as on the CPU: the exchanges call into Python (which takes it back)
            // while this call holds the cuBLAS handle, which another thread's call may wait for
            py.detach(|| {
                let call = DeviceSharded::vocab_parallel(slice, &split.1).with_data_group(&split.2);
                call.linear_loss_and_grad(&linear, &req.spec, whole, stream, &inputs, &tokens, grads, req.chunking)
            })
        }
    }
    .map_err(crate::group::to_py_kept)?;
    copy_outputs(stream, &result.loss, &mut loss, [&mut per_sample, &mut weights, &mut z_loss, &mut None])?;
    finish(py, stream, &result.loss, check)
}

/// See `crate::scale_grad`.
pub(crate) fn scale_grad(
    py: Python<'_>,
    l: DType,
    grad: &TensorArg,
    scale: u64,
    device: (usize, usize),
) -> PyResult<()> {
    match l {
        DType::F32 => scale_typed::<f32>(py, grad, scale, device),
        DType::F16 => scale_typed::<fused_weighted_loss::f16>(py, grad, scale, device),
        DType::BF16 => scale_typed::<fused_weighted_loss::bf16>(py, grad, scale, device),
    }
}

fn scale_typed<G: Logit>(py: Python<'_>, grad: &TensorArg, scale: u64, device: (usize, usize)) -> PyResult<()> {
    let call = Call::new(py, device)?;
    let n = grad.dims().iter().product();
    // SAFETY: `grad` is the contiguous gradient tensor the forward wrote (on this device, of
    // dtype G and these dims) and `scale` a one-element f32 tensor on the same device, both held
    // by the autograd graph while the backward's work is queued; nothing else uses the gradient
    // until the backward returns it.
    let (mut g, s) = unsafe { (call.borrow::<G>(grad.ptr(), n), call.borrow::<f32>(scale, 1)) };
    call.dev.loss().scale_by_device_scalar(&call.stream, &mut g.view_mut(), &s.view()).map_err(to_py)
}

/// Times the Rust call that the Python entry wraps, on CUDA tensors: `iters` back-to-back calls
/// (after `warmup`) of the crate's device API (`CudaLoss::loss_and_grad` through
/// `ExternalDevice`) on the same device memory, queued on the same stream, the gradient into one
/// buffer. Returns the wall seconds from the first timed call until the stream has finished them
/// all, and each timed call's host seconds. For benches/python_overhead.py.
#[pyfunction]
#[pyo3(signature = (inputs, grad, options, device, warmup, iters))]
pub(crate) fn time_rust_call_cuda(
    py: Python<'_>,
    inputs: Inputs,
    grad: u64,
    options: Options,
    device: (usize, usize),
    warmup: usize,
    iters: usize,
) -> PyResult<(f64, Vec<f64>)> {
    crate::check_counts(warmup, iters)?;
    let req = inputs.request(&options, Backend::Cuda, Outputs(grad, 0, 0, 0, 0, 0, false))?;
    if grad == 0 {
        return Err(PyValueError::new_err("time_rust_call_cuda needs a gradient buffer"));
    }
    dispatch!(req.types, time_typed(py, &req, device, warmup, iters))
}

fn time_typed<L: Logit, I: TokenId>(
    py: Python<'_>,
    req: &Request<'_>,
    device: (usize, usize),
    warmup: usize,
    iters: usize,
) -> PyResult<(f64, Vec<f64>)> {
    let call = Call::new(py, device)?;
    let (shape, n, rows) = (req.shape, req.shape.logits_len(), req.shape.rows());
    // SAFETY: as in `typed`: live contiguous tensors on this device that Python holds for the
    // call; the gradient buffer is one Python allocated for this measurement alone.
    let (logits, ids, mut grad) = unsafe {
        (
            call.borrow::<L>(req.logits.ptr(), n),
            call.borrow::<I>(req.ids.ptr(), rows),
            call.borrow::<L>(req.out.grad(), n),
        )
    };
    let ids = ids.view();
    let inputs = DeviceInputs::new(&ids);
    let sync = |e| PyRuntimeError::new_err(format!("CUDA error while synchronising: {e}"));
    let mut host = Vec::with_capacity(iters);
    let mut start = Instant::now();
    for k in 0..warmup + iters {
        if k == warmup {
            py.detach(|| call.stream.synchronize()).map_err(sync)?;
            start = Instant::now();
        }
        let t = Instant::now();
        let out = call
            .dev
            .loss()
            .loss_and_grad(&req.spec, shape, &call.stream, &logits.view(), &inputs, &mut grad.view_mut())
            .map_err(to_py)?;
        drop(out);
        if k >= warmup {
            host.push(t.elapsed().as_secs_f64());
        }
    }
    py.detach(|| call.stream.synchronize()).map_err(sync)?;
    Ok((start.elapsed().as_secs_f64(), host))
}

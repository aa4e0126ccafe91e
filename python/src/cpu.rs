//! CPU tensors: slices over torch's host memory and the crate's `LossSpec::loss_and_grad` (or
//! `loss_and_grad_per_token`, or `linear_loss_and_grad`) on them, with the GIL released while it
//! runs.

use crate::group::PySplit;
use crate::linear::LinearRequest;
use crate::{id_dtype, logit_dtype, shape_of, to_py, IdType, Options, Request, TensorArg};
use fused_weighted_loss::{
    bf16, f16, Backend, DType, Grad, LinearGrads, LinearInputs, Logit, LossOutput, LossSpec, Shape, TokenId, Tokens,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::time::Instant;

/// The unsafe boundary of the CPU path: host memory that Python owns, seen as slices.
pub(crate) mod host {
    use pyo3::exceptions::PyValueError;
    use pyo3::PyResult;

    fn check<T>(ptr: u64, len: usize, what: &str) -> PyResult<()> {
        // (torch's tensors without elements may have a null data pointer)
        if (ptr == 0 && len > 0) || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(PyValueError::new_err(format!("{what}: data pointer {ptr:#x} is null or misaligned")));
        }
        Ok(())
    }

    /// `len` elements of `T` at `ptr`.
    ///
    /// # Safety
    /// `ptr` addresses `len` elements of `T` (any bit pattern of the types used here is a valid
    /// value) that stay allocated, and are not written, for `'a`.
    pub(crate) unsafe fn slice<'a, T>(ptr: u64, len: usize, what: &str) -> PyResult<&'a [T]> {
        check::<T>(ptr, len, what)?;
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: non-null and aligned (checked); the rest as the caller promises.
        Ok(unsafe { std::slice::from_raw_parts(ptr as usize as *const T, len) })
    }

    /// `len` elements of `T` at `ptr`, to write.
    ///
    /// # Safety
    /// As [`slice`], and nothing else reads or writes that memory for `'a`.
    pub(crate) unsafe fn slice_mut<'a, T>(ptr: u64, len: usize, what: &str) -> PyResult<&'a mut [T]> {
        check::<T>(ptr, len, what)?;
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: non-null and aligned (checked); the rest as the caller promises.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr as usize as *mut T, len) })
    }
}

/// Bytes of kept exponentials per chunk of a split on CPU tensors when `chunk_rows` is None.
const TORCH_CHUNK_BYTES: usize = 8 << 20;

/// See `crate::forward`.
pub(crate) fn forward(
    py: Python<'_>,
    req: &Request<'_>,
    split: Option<&PySplit>,
    chunk_rows: Option<usize>,
) -> PyResult<()> {
    dispatch!(req.types, typed(py, req, split, chunk_rows))
}

fn typed<L: Logit, I: TokenId>(
    py: Python<'_>,
    req: &Request<'_>,
    split: Option<&PySplit>,
    chunk_rows: Option<usize>,
) -> PyResult<()> {
    let (shape, out) = (req.shape, req.out);
    let (n, rows, b) = (shape.logits_len(), shape.rows(), shape.batch());
    // SAFETY: Python passes the data pointers of live, contiguous tensors of these dtypes and
    // shapes (dtypes and shapes checked in `Inputs::request`, contiguity and device in _ops.py),
    // which it holds for the whole call; the outputs are tensors it has just allocated for this
    // call, so nothing else reads or writes them, and none of them overlaps an input.
    let (logits, ids, labels, token_weights, grad, loss, per_sample, weights, z_loss, token_loss) = unsafe {
        (
            host::slice::<L>(req.logits.ptr(), n, "logits")?,
            host::slice::<I>(req.ids.ptr(), rows, "ids")?,
            req.labels.map(|l| host::slice::<I>(l.ptr(), rows, "labels")).transpose()?,
            req.token_weights.map(|w| host::slice::<f32>(w.ptr(), rows, "token_weights")).transpose()?,
            optional_grad::<L>(out.grad(), out.grad_f32(), n)?,
            host::slice_mut::<f32>(out.loss(), 1, "loss")?,
            optional_mut::<f64>(out.per_sample(), b, "per_sample")?,
            optional_mut::<f64>(out.weights(), b, "weights")?,
            optional_mut::<f64>(out.z_loss(), 1, "z_loss")?,
            optional_mut::<f32>(out.token_loss(), b * (shape.seq() - 1), "token_loss")?,
        )
    };
    let mut tokens = Tokens::new(ids);
    if let Some(l) = labels {
        tokens = tokens.with_labels(l);
    }
    if let Some(w) = token_weights {
        tokens = tokens.with_token_weights(w);
    }
    let spec = &req.spec;
    let r = py
        .detach(|| match split {
            None => match token_loss {
                Some(t) => spec.loss_and_grad_per_token(shape, logits, tokens, grad, t),
                None => spec.loss_and_grad(shape, logits, tokens, grad),
            },
            Some(split) => {
                // the logits hold this rank's columns: the loss's shape has the whole vocabulary
                let (mut call, whole) = split.host_call(|v| shape.with_vocab(v))?;
                call = match chunk_rows {
                    Some(c) => call.with_chunk_rows(c),
                    // each exchange is a `torch.distributed` call (0.3–0.7 ms over gloo on a
                    // 2-core machine): fewer, larger chunks than the crate's default
                    None => call.with_chunk_bytes(TORCH_CHUNK_BYTES),
                };
                match token_loss {
                    Some(t) => call.loss_and_grad_per_token(spec, whole, logits, tokens, grad, t),
                    None => call.loss_and_grad(spec, whole, logits, tokens, grad),
                }
            }
        })
        .map_err(crate::group::to_py_kept)?;
    write_outputs(&r, loss, per_sample, weights, z_loss);
    Ok(())
}

/// The loss, and the per-sample losses, weights and z-loss part where wanted, into the output
/// tensors.
fn write_outputs(
    r: &LossOutput,
    loss: &mut [f32],
    per_sample: Option<&mut [f64]>,
    weights: Option<&mut [f64]>,
    z_loss: Option<&mut [f64]>,
) {
    loss[0] = r.loss as f32;
    if let Some(p) = per_sample {
        p.copy_from_slice(&r.per_sample_loss);
    }
    if let Some(w) = weights {
        w.copy_from_slice(&r.weights);
    }
    if let Some(z) = z_loss {
        z[0] = r.z_loss;
    }
}

/// See `crate::linear::linear_forward`.
pub(crate) fn linear_forward(py: Python<'_>, req: &LinearRequest<'_>) -> PyResult<()> {
    dispatch!(req.types, linear_typed(py, req))
}

fn linear_typed<L: Logit, I: TokenId>(py: Python<'_>, req: &LinearRequest<'_>) -> PyResult<()> {
    let (shape, out) = (req.shape, req.out);
    let (rows, b) = (shape.rows(), shape.batch());
    let lens = [shape.hidden_len(), shape.weight_len(), shape.vocab()];
    let names = ["d hidden", "d weight", "d bias"];
    // SAFETY: as in `typed`: Python passes the data pointers of live, contiguous tensors of these
    // dtypes and shapes (checked in `LinearInputs::request` and _linear.py), held for the whole
    // call; the gradients and the outputs are tensors allocated for this call, which nothing
    // else uses and which overlap no input (the inputs are only read, so hidden, weight and
    // bias may share memory).
    let (hidden, weight, bias, ids, labels, token_weights, loss, per_sample, weights, z_loss) = unsafe {
        (
            host::slice::<L>(req.hidden.ptr(), shape.hidden_len(), "hidden")?,
            host::slice::<L>(req.weight.ptr(), shape.weight_len(), "weight")?,
            req.bias.map(|t| host::slice::<L>(t.ptr(), shape.vocab(), "bias")).transpose()?,
            host::slice::<I>(req.ids.ptr(), rows, "ids")?,
            req.labels.map(|l| host::slice::<I>(l.ptr(), rows, "labels")).transpose()?,
            req.token_weights.map(|w| host::slice::<f32>(w.ptr(), rows, "token_weights")).transpose()?,
            host::slice_mut::<f32>(out.loss(), 1, "loss")?,
            optional_mut::<f64>(out.per_sample(), b, "per_sample")?,
            optional_mut::<f64>(out.weights(), b, "weights")?,
            optional_mut::<f64>(out.z_loss(), 1, "z_loss")?,
        )
    };
    let mut grads: [Grad<'_, L>; 3] = [Grad::Skip, Grad::Skip, Grad::Skip];
    for (k, g) in req.grads.iter().enumerate() {
        if let Some(g) = g {
            // SAFETY: as above (a gradient tensor of the input's shape, allocated for this call).
            grads[k] = unsafe {
                if g.f32 {
                    Grad::IntoF32(host::slice_mut::<f32>(g.ptr, lens[k], names[k])?)
                } else {
                    Grad::Into(host::slice_mut::<L>(g.ptr, lens[k], names[k])?)
                }
            };
        }
    }
    let [dh, dw, db] = grads;
    let mut tokens = Tokens::new(ids);
    if let Some(l) = labels {
        tokens = tokens.with_labels(l);
    }
    if let Some(w) = token_weights {
        tokens = tokens.with_token_weights(w);
    }
    let mut inputs = LinearInputs::new(hidden, weight);
    if let Some(b) = bias {
        inputs = inputs.with_bias(b);
    }
    let grads = LinearGrads::new().hidden(dh).weight(dw).bias(db);
    let (spec, chunking) = (&req.spec, req.chunking);
    let r = match &req.split {
        None => py.detach(|| spec.linear_loss_and_grad(shape, inputs, tokens, grads, chunking)),
        Some(split) => {
            // the weight holds this rank's rows: the loss's shape has the whole vocabulary
            py.detach(|| {
                let (call, whole) = split.host_call(|v| shape.with_vocab(v))?;
                call.linear_loss_and_grad(spec, whole, inputs, tokens, grads, chunking)
            })
        }
    }
    .map_err(crate::group::to_py_kept)?;
    write_outputs(&r.loss, loss, per_sample, weights, z_loss);
    Ok(())
}

/// The gradient of the logits at `ptr` (`n` elements): [`Grad::Skip`] when `ptr` is 0, else
/// of the logits' dtype, or f32 with `f32`.
///
/// # Safety
/// As `host::slice_mut` when `ptr` is not 0.
unsafe fn optional_grad<'a, L: Logit>(ptr: u64, f32: bool, n: usize) -> PyResult<Grad<'a, L>> {
    Ok(match (ptr, f32) {
        (0, _) => Grad::Skip,
        // SAFETY: as the caller promises.
        (p, true) => Grad::IntoF32(unsafe { host::slice_mut::<f32>(p, n, "grad") }?),
        // SAFETY: as the caller promises.
        (p, false) => Grad::Into(unsafe { host::slice_mut::<L>(p, n, "grad") }?),
    })
}

/// `dst = round(src · scale)`: a float32 gradient kept for 16-bit inputs, times the upstream
/// gradient `scale` (taken as f32, the product in f32), rounded once to nearest even into
/// `dst` (float16 or bfloat16, `src`'s shape): the crate's `scale_into`, with the GIL released.
/// Internal (`_ops._times`): both must be contiguous CPU tensors, which the caller checks (the
/// device and the strides are not passed here).
/// The CPU backward of a float32 kept gradient: one pass, where torch's multiply with a
/// float16 output takes several times as long.
#[pyfunction]
pub(crate) fn narrow_grad(py: Python<'_>, src: TensorArg, dst: TensorArg, scale: f64) -> PyResult<()> {
    if src.dtype() != "float32" {
        return Err(PyValueError::new_err(format!("narrow_grad: src must be float32, got {}", src.dtype())));
    }
    if src.dims() != dst.dims() {
        return Err(PyValueError::new_err(format!(
            "narrow_grad: src has shape {:?}, dst {:?}",
            src.dims(),
            dst.dims()
        )));
    }
    let n = src.dims().iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let n = n.ok_or_else(|| PyValueError::new_err("narrow_grad: the shape's size overflows"))?;
    if n == 0 {
        return Ok(());
    }
    match logit_dtype(dst.dtype())? {
        DType::F16 => narrow::<f16>(py, &src, &dst, n, scale as f32),
        DType::BF16 => narrow::<bf16>(py, &src, &dst, n, scale as f32),
        DType::F32 => Err(PyValueError::new_err("narrow_grad: dst must be float16 or bfloat16")),
    }
}

fn narrow<G: Logit>(py: Python<'_>, src: &TensorArg, dst: &TensorArg, n: usize, scale: f32) -> PyResult<()> {
    // SAFETY: Python passes the data pointers of two live, contiguous CPU tensors (contiguity
    // checked by the caller, `_ops._times`) of these dtypes and this shape (checked in
    // `narrow_grad`), held for the call; `dst` is a tensor it has just allocated for the
    // result, which overlaps nothing and nothing else uses.
    let (src, dst) = unsafe { (host::slice::<f32>(src.ptr(), n, "src")?, host::slice_mut::<G>(dst.ptr(), n, "dst")?) };
    py.detach(|| fused_weighted_loss::scale_into(src, scale, dst)).map_err(to_py)
}

/// # Safety
/// As `host::slice_mut` when `ptr` is not 0.
unsafe fn optional_mut<'a, T>(ptr: u64, len: usize, what: &str) -> PyResult<Option<&'a mut [T]>> {
    match ptr {
        0 => Ok(None),
        // SAFETY: as the caller promises.
        p => unsafe { host::slice_mut::<T>(p, len, what) }.map(Some),
    }
}

/// Times `iters` calls (after `warmup`) of the Rust call the Python entry wraps,
/// `LossSpec::loss_and_grad` on the same host memory with the same options, and returns each
/// call's seconds. The gradient goes into one buffer reused by every call, or, with
/// `fresh_grad`, into a new one per call (as the Python entry, which returns a new tensor each
/// time, must). For measuring the Python entry's overhead (benches/python_overhead.py).
#[pyfunction]
#[pyo3(signature = (logits, ids, options, warmup, iters, fresh_grad))]
pub(crate) fn time_rust_call(
    py: Python<'_>,
    logits: TensorArg,
    ids: TensorArg,
    options: Options,
    warmup: usize,
    iters: usize,
    fresh_grad: bool,
) -> PyResult<Vec<f64>> {
    crate::check_counts(warmup, iters)?;
    let shape = shape_of(&logits, &ids, None)?;
    let spec = options.spec(Backend::Cpu)?;
    let types = (logit_dtype(logits.dtype())?, id_dtype(&ids, None)?);
    dispatch!(types, time_typed(py, &spec, shape, &logits, &ids, warmup, iters, fresh_grad))
}

#[allow(clippy::too_many_arguments)]
fn time_typed<L: Logit, I: TokenId>(
    py: Python<'_>,
    spec: &LossSpec,
    shape: Shape,
    logits: &TensorArg,
    ids: &TensorArg,
    warmup: usize,
    iters: usize,
    fresh_grad: bool,
) -> PyResult<Vec<f64>> {
    // SAFETY: as in `typed`: live contiguous tensors that Python holds for the call.
    let (logits, ids) = unsafe {
        (
            host::slice::<L>(logits.ptr(), shape.logits_len(), "logits")?,
            host::slice::<I>(ids.ptr(), shape.rows(), "ids")?,
        )
    };
    let run = |grad: &mut [L]| {
        spec.loss_and_grad(shape, logits, Tokens::new(ids), Grad::Into(grad)).map(|r| r.loss).map_err(to_py)
    };
    py.detach(|| {
        let mut reused = if fresh_grad { Vec::new() } else { L::zeroed(shape.logits_len()) };
        let mut times = Vec::with_capacity(iters);
        for k in 0..warmup + iters {
            let t = Instant::now();
            let loss = if fresh_grad { run(&mut L::zeroed(shape.logits_len()))? } else { run(&mut reused)? };
            let dt = t.elapsed().as_secs_f64();
            if !loss.is_finite() {
                return Err(PyValueError::new_err(format!("the timed call gave a non-finite loss {loss}")));
            }
            if k >= warmup {
                times.push(dt);
            }
        }
        Ok(times)
    })
}

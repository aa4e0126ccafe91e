//! The native half of the `fused_weighted_loss` Python package: torch hands over data pointers,
//! shapes, dtypes, the device and its current CUDA stream; this module runs the crate's backends
//! on that memory (no libtorch headers, no copies of the logits or the gradient).
//!
//! `forward` runs the loss on logits; `linear_forward` (linear.rs) the fused linear + loss on
//! hidden states and an output weight.
//!
//! The Python side (`fused_weighted_loss/_ops.py`, `_linear.py`) checks devices and contiguity and allocates
//! every output before it calls in here; this side checks shapes, dtypes and options with the
//! crate's own validation and maps the crate's errors to Python exceptions.

use fused_weighted_loss::{Backend, DType, Error, LossSpec, Reduction, RowMean, Shape};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Calls `$f::<L, I>(args)` for the runtime (logits dtype, id dtype) pair.
macro_rules! dispatch {
    ($types:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $types {
            (DType::F32, IdType::I64) => $f::<f32, i64>($($arg),*),
            (DType::F32, IdType::I32) => $f::<f32, i32>($($arg),*),
            (DType::F16, IdType::I64) => $f::<fused_weighted_loss::f16, i64>($($arg),*),
            (DType::F16, IdType::I32) => $f::<fused_weighted_loss::f16, i32>($($arg),*),
            (DType::BF16, IdType::I64) => $f::<fused_weighted_loss::bf16, i64>($($arg),*),
            (DType::BF16, IdType::I32) => $f::<fused_weighted_loss::bf16, i32>($($arg),*),
        }
    };
}

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod group;
mod linear;

/// A contiguous tensor as Python describes it: `(data_ptr, shape, dtype name)`, the dtype name
/// without its `torch.` prefix (`float32`, `bfloat16`, `int64`, ...).
#[derive(FromPyObject, Debug, Clone)]
pub(crate) struct TensorArg(pub u64, pub Vec<usize>, pub String);

impl TensorArg {
    pub(crate) fn ptr(&self) -> u64 {
        self.0
    }
    pub(crate) fn dims(&self) -> &[usize] {
        &self.1
    }
    pub(crate) fn dtype(&self) -> &str {
        &self.2
    }
}

/// Where the results go, as data pointers of tensors Python allocated: the gradient
/// (`[B, T, V]` of the logits' dtype, or f32 when the last field says so; 0 for loss only), the
/// loss (one f32), the per-sample
/// losses and weights (`[B]` f64 each; 0 when not wanted), the z-loss part of the loss (one f64;
/// 0 when not wanted) and the per-token losses (0 when not wanted): on CPU `[B, T - 1]` f32 (the
/// crate's `loss_and_grad_per_token`), on CUDA `[B, T]` f64 (the device's per-position losses,
/// `DeviceLossOutput::row_loss`, 0 at the last position of each sample), which Python narrows;
/// last, whether the gradient is f32 whatever the logits' dtype (float16 logits keep an f32
/// gradient until the backward, which applies the loss scale before rounding to float16).
#[derive(FromPyObject, Debug, Clone, Copy)]
pub(crate) struct Outputs(pub u64, pub u64, pub u64, pub u64, pub u64, pub u64, pub bool);

impl Outputs {
    pub(crate) fn grad(&self) -> u64 {
        self.0
    }
    pub(crate) fn grad_f32(&self) -> bool {
        self.6
    }
    pub(crate) fn loss(&self) -> u64 {
        self.1
    }
    pub(crate) fn per_sample(&self) -> u64 {
        self.2
    }
    pub(crate) fn weights(&self) -> u64 {
        self.3
    }
    pub(crate) fn z_loss(&self) -> u64 {
        self.4
    }
    pub(crate) fn token_loss(&self) -> u64 {
        self.5
    }
}

/// The loss options: `(keywords, keyword_weights, alpha, ignore_index, row_mean, reduction,
/// check_finite, z_loss, label_smoothing, softcap)` (softcap `None`: off).
#[derive(FromPyObject, Debug, Clone)]
pub(crate) struct Options(Vec<i64>, Vec<f64>, f64, i64, String, String, bool, f64, f64, Option<f64>);

impl Options {
    /// The validated spec for `backend`.
    pub(crate) fn spec(&self, backend: Backend) -> PyResult<LossSpec> {
        let Options(
            keywords,
            weights,
            alpha,
            ignore_index,
            row_mean,
            reduction,
            check_finite,
            z_loss,
            smoothing,
            softcap,
        ) = self;
        if weights.len() != keywords.len() {
            return Err(PyValueError::new_err(format!(
                "keyword_weights has {} entries for {} keywords",
                weights.len(),
                keywords.len()
            )));
        }
        let row_mean: RowMean = row_mean.parse().map_err(PyValueError::new_err)?;
        // (the Python spelling in the message: the parse takes "weighted_mean" too)
        let reduction: Reduction = reduction.parse().map_err(|_| {
            PyValueError::new_err(format!("unknown reduction '{reduction}' (expected mean, weighted_mean or sum)"))
        })?;
        LossSpec::builder()
            .weighted_keywords(keywords.iter().copied().zip(weights.iter().copied()))
            .alpha(*alpha)
            .ignore_index(*ignore_index)
            .row_mean(row_mean)
            .reduction(reduction)
            .check_finite(*check_finite)
            .z_loss(*z_loss)
            .label_smoothing(*smoothing)
            .softcap(*softcap)
            .backend(backend)
            .build()
            .map_err(to_py)
    }
}

/// `warmup` and `iters` of the timing calls, each at most a million (a count near `usize::MAX`
/// overflowed their sum, or asked `Vec::with_capacity` for more than memory: a panic).
pub(crate) fn check_counts(warmup: usize, iters: usize) -> PyResult<()> {
    const MAX: usize = 1_000_000;
    match warmup <= MAX && iters <= MAX {
        true => Ok(()),
        false => {
            Err(PyValueError::new_err(format!("warmup and iters must be at most {MAX}, got {warmup} and {iters}")))
        }
    }
}

/// The crate's error as the Python exception that fits: bad values and shapes are `ValueError`,
/// a backend that cannot run (or a driver error) is `RuntimeError`. The message is the crate's.
pub(crate) fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::BackendUnavailable { .. }
        | Error::Cuda { .. }
        | Error::Collective(_)
        | Error::ContextMismatch { .. } => PyRuntimeError::new_err(msg),
        Error::OutOfMemory { .. } => PyMemoryError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// A logits dtype by torch's name.
pub(crate) fn logit_dtype(name: &str) -> PyResult<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::BF16),
        other => Err(PyTypeError::new_err(format!("logits must be float32, float16 or bfloat16, got {other}"))),
    }
}

/// The token-id dtypes the package takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdType {
    I32,
    I64,
}

/// The ids' dtype, and the labels' (which must be the same).
pub(crate) fn id_dtype(ids: &TensorArg, labels: Option<&TensorArg>) -> PyResult<IdType> {
    let t = match ids.dtype() {
        "int64" => IdType::I64,
        "int32" => IdType::I32,
        other => return Err(PyTypeError::new_err(format!("ids must be int64 or int32, got {other}"))),
    };
    if let Some(l) = labels {
        if l.dtype() != ids.dtype() {
            return Err(PyTypeError::new_err(format!(
                "labels must have the ids' dtype ({}), got {}",
                ids.dtype(),
                l.dtype()
            )));
        }
    }
    Ok(t)
}

/// The validated shape of one call.
pub(crate) fn shape_of(logits: &TensorArg, ids: &TensorArg, labels: Option<&TensorArg>) -> PyResult<Shape> {
    // (`[0, T, V]`: a data-parallel rank without samples, which only a sharded call accepts)
    let shape = Shape::from_dims_of_rank(logits.dims(), ids.dims()).map_err(to_py)?;
    if let Some(l) = labels {
        shape.check_token_dims("labels", l.dims()).map_err(to_py)?;
    }
    Ok(shape)
}

/// Checks the per-token weights: float32 `[B, T]` (their values are the backend's to check).
pub(crate) fn check_token_weights(shape: Shape, weights: &TensorArg) -> PyResult<()> {
    if weights.dtype() != "float32" {
        return Err(PyTypeError::new_err(format!("token_weights must be float32, got {}", weights.dtype())));
    }
    shape.check_token_dims("token_weights", weights.dims()).map_err(to_py)
}

/// The inputs of one call: logits, ids, optional labels and optional per-token weights.
#[derive(FromPyObject, Debug, Clone)]
pub(crate) struct Inputs(pub TensorArg, pub TensorArg, pub Option<TensorArg>, pub Option<TensorArg>);

impl Inputs {
    /// The validated request of these inputs, for `backend`, writing into `out`.
    pub(crate) fn request(&self, options: &Options, backend: Backend, out: Outputs) -> PyResult<Request<'_>> {
        let Inputs(logits, ids, labels, token_weights) = self;
        let shape = shape_of(logits, ids, labels.as_ref())?;
        if let Some(w) = token_weights {
            check_token_weights(shape, w)?;
        }
        Ok(Request {
            shape,
            types: (logit_dtype(logits.dtype())?, id_dtype(ids, labels.as_ref())?),
            spec: options.spec(backend)?,
            logits,
            ids,
            labels: labels.as_ref(),
            token_weights: token_weights.as_ref(),
            out,
        })
    }
}

/// One validated call, for a backend.
pub(crate) struct Request<'a> {
    pub spec: LossSpec,
    pub shape: Shape,
    pub types: (DType, IdType),
    pub logits: &'a TensorArg,
    pub ids: &'a TensorArg,
    pub labels: Option<&'a TensorArg>,
    pub token_weights: Option<&'a TensorArg>,
    pub out: Outputs,
}

/// Loss (and gradient, when `outputs` has one) of `inputs` (logits, ids, labels or None, token
/// weights or None), written into the tensors of `outputs`. `device` is `None` for CPU tensors,
/// else `(ordinal, stream)`: the CUDA device and the stream to queue the work on (torch's current
/// stream). On CUDA, `check` waits for the work and reports ids or labels outside the vocabulary
/// and non-finite token weights (and, with `check_finite`, a non-finite loss); without it
/// nothing waits (except on a data-parallel rank without samples, which reads its group's batch
/// sizes on the host). `split`: this rank's slice `(start, len, vocab)` of the vocabulary (the
/// logits hold its `len` columns) and its vocabulary and data groups (see `group.rs`), run as
/// the crate's one call (`parallel::Sharded` for CPU tensors, `cuda::split::DeviceSharded` for
/// CUDA tensors) with `chunk_rows` rows per exchange (None: its default).
#[pyfunction]
#[pyo3(signature = (inputs, outputs, options, device=None, check=false, split=None, chunk_rows=None))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments, with `py`
fn forward(
    py: Python<'_>,
    inputs: Inputs,
    outputs: Outputs,
    options: Options,
    device: Option<(usize, usize)>,
    check: bool,
    split: Option<group::PySplit>,
    chunk_rows: Option<usize>,
) -> PyResult<()> {
    let backend = if device.is_some() { Backend::Cuda } else { Backend::Cpu };
    let req = inputs
        .request(&options, backend, outputs)
        .map_err(|e| group::failed_before(py, split.as_ref(), device.is_none(), e))?;
    match device {
        None => cpu::forward(py, &req, split.as_ref(), chunk_rows),
        #[cfg(feature = "cuda")]
        Some(device) => {
            let check = check || req.spec.check_finite();
            cuda::forward(py, &req, device, check, split.as_ref().map(|s| (s, chunk_rows)))
        }
        #[cfg(not(feature = "cuda"))]
        Some(_) => {
            let _ = (check, chunk_rows);
            Err(PyRuntimeError::new_err(
                "this build of fused_weighted_loss has no CUDA support (build it with the `cuda` feature)",
            ))
        }
    }
}

/// `grad *= scale[0]` on the device, in place, queued on `stream` (no work when the scale is
/// exactly 1, and no host read of it): the backward of the loss on CUDA tensors.
#[pyfunction]
fn scale_grad(py: Python<'_>, grad: TensorArg, scale: u64, device: (usize, usize)) -> PyResult<()> {
    let l = logit_dtype(grad.dtype())?;
    #[cfg(feature = "cuda")]
    return cuda::scale_grad(py, l, &grad, scale, device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (py, l, scale, device);
        Err(PyRuntimeError::new_err("this build of fused_weighted_loss has no CUDA support"))
    }
}

/// Why the CUDA backend cannot run here (`None` when it can): no `cuda` feature in this build,
/// no driver, no device.
#[pyfunction]
fn cuda_unavailable_reason() -> Option<String> {
    fused_weighted_loss::cuda_status().err()
}

/// Whether this build carries the CUDA kernels.
#[pyfunction]
fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_forward, m)?)?;
    m.add_function(wrap_pyfunction!(group::fail_split, m)?)?;
    m.add_function(wrap_pyfunction!(scale_grad, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::narrow_grad, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(built_with_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::time_rust_call, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_function(wrap_pyfunction!(cuda::time_rust_call_cuda, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! The fused linear + weighted loss (`weighted_linear_loss` in Python): validation of one call,
//! then the CPU or CUDA backend (`cpu::linear_forward`, `cuda::linear_forward`).

use crate::group::PySplit;
use crate::{id_dtype, logit_dtype, to_py, IdType, Options, Outputs, TensorArg};
use fused_weighted_loss::{Backend, Chunking, DType, Error, LinearShape, LossSpec};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// The inputs of one call: hidden (`[B, T, H]` or `[B·T, H]`), weight (`[V, H]`), bias (`[V]`)
/// or None, ids (`[B, T]`), labels or None, token weights (float32 `[B, T]`) or None.
#[derive(FromPyObject, Debug, Clone)]
pub(crate) struct LinearInputs(
    TensorArg,
    TensorArg,
    Option<TensorArg>,
    TensorArg,
    Option<TensorArg>,
    Option<TensorArg>,
);

/// Where the gradients go: `d hidden`, `d weight`, `d bias`, each None when not wanted, else a
/// tensor of the input's shape in the inputs' dtype or in float32.
#[derive(FromPyObject, Debug, Clone)]
pub(crate) struct LinearGradArgs(Option<TensorArg>, Option<TensorArg>, Option<TensorArg>);

/// Where the results go: the gradients, and the loss outputs as `crate::forward`'s (their
/// logits gradient and per-token losses unused: 0).
#[derive(FromPyObject, Debug, Clone)]
pub(crate) struct LinearOutputs(LinearGradArgs, Outputs);

/// One gradient to write: its data pointer, and whether it is float32 (rather than the inputs'
/// dtype).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GradOut {
    pub ptr: u64,
    pub f32: bool,
}

/// A validated fused linear call, for a backend.
pub(crate) struct LinearRequest<'a> {
    pub spec: LossSpec,
    pub shape: LinearShape,
    pub types: (DType, IdType),
    pub hidden: &'a TensorArg,
    pub weight: &'a TensorArg,
    pub bias: Option<&'a TensorArg>,
    pub ids: &'a TensorArg,
    pub labels: Option<&'a TensorArg>,
    pub token_weights: Option<&'a TensorArg>,
    /// `d hidden`, `d weight`, `d bias`.
    pub grads: [Option<GradOut>; 3],
    /// The loss outputs (their gradient pointer unused: 0).
    pub out: Outputs,
    pub chunking: Chunking,
    /// Vocabulary- and data-parallel: this rank's slice of the whole vocabulary (the weight's
    /// rows) and its groups; None for the whole call on this rank.
    pub split: Option<&'a PySplit>,
}

/// A gradient tensor's pointer once its dims are the input's and its dtype is the inputs' or
/// float32.
fn grad_out(
    what: &'static str,
    g: Option<&TensorArg>,
    input: Option<&TensorArg>,
    dtype: DType,
) -> PyResult<Option<GradOut>> {
    let Some(g) = g else { return Ok(None) };
    let Some(input) = input else {
        return Err(to_py(Error::Unsupported("a bias gradient was asked for without a bias input".into())));
    };
    if g.dims() != input.dims() {
        return Err(to_py(Error::ShapeMismatch { what, expected: input.dims().to_vec(), got: g.dims().to_vec() }));
    }
    let f32 = match logit_dtype(g.dtype()) {
        Ok(d) if d == dtype => false,
        Ok(DType::F32) => true,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{what} must be {} or float32, got {}",
                dtype_name(dtype),
                g.dtype()
            )))
        }
    };
    Ok(Some(GradOut { ptr: g.ptr(), f32 }))
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

/// The chunking of a call: `rows` rows per chunk, or a `budget` of bytes, or neither (the
/// backend's default); negative values and both at once are errors.
fn chunking((rows, budget): (Option<i64>, Option<i64>)) -> PyResult<Chunking> {
    let non_negative = |name: &str, v: i64| {
        usize::try_from(v).map_err(|_| to_py(Error::InvalidChunking(format!("{name} must be >= 0, got {v}"))))
    };
    match (rows, budget) {
        (None, None) => Ok(Chunking::Auto),
        (Some(r), None) => Ok(Chunking::Rows(non_negative("chunk_rows", r)?)),
        (None, Some(b)) => Ok(Chunking::Budget(non_negative("chunk_budget", b)?)),
        (Some(_), Some(_)) => Err(to_py(Error::InvalidChunking("give chunk_rows or chunk_budget, not both".into()))),
    }
}

impl LinearInputs {
    fn request<'a>(
        &'a self,
        LinearOutputs(grads, out): &LinearOutputs,
        options: &Options,
        chunks: (Option<i64>, Option<i64>),
        backend: Backend,
        split: Option<&'a PySplit>,
    ) -> PyResult<LinearRequest<'a>> {
        let LinearInputs(hidden, weight, bias, ids, labels, token_weights) = self;
        let dtype = logit_dtype(hidden.dtype()).map_err(|_| {
            PyTypeError::new_err(format!("hidden must be float32, float16 or bfloat16, got {}", hidden.dtype()))
        })?;
        for (what, t) in [("weight", Some(weight)), ("bias", bias.as_ref())] {
            if let Some(t) = t {
                if t.dtype() != hidden.dtype() {
                    return Err(PyTypeError::new_err(format!(
                        "{what} must have the hidden states' dtype ({}), got {}",
                        hidden.dtype(),
                        t.dtype()
                    )));
                }
            }
        }
        // (`[0, T]` ids: a data-parallel rank without samples, which only a sharded call accepts)
        let shape = LinearShape::from_dims_of_rank(hidden.dims(), weight.dims(), ids.dims()).map_err(to_py)?;
        if let Some(b) = bias {
            shape.check_bias_dims(b.dims()).map_err(to_py)?;
        }
        if let Some(l) = labels {
            shape.tokens().check_token_dims("labels", l.dims()).map_err(to_py)?;
        }
        if let Some(w) = token_weights {
            crate::check_token_weights(shape.tokens(), w)?;
        }
        let LinearGradArgs(dh, dw, db) = grads;
        Ok(LinearRequest {
            spec: options.spec(backend)?,
            shape,
            types: (dtype, id_dtype(ids, labels.as_ref())?),
            hidden,
            weight,
            bias: bias.as_ref(),
            ids,
            labels: labels.as_ref(),
            token_weights: token_weights.as_ref(),
            grads: [
                grad_out("d hidden", dh.as_ref(), Some(hidden), dtype)?,
                grad_out("d weight", dw.as_ref(), Some(weight), dtype)?,
                grad_out("d bias", db.as_ref(), bias.as_ref(), dtype)?,
            ],
            out: *out,
            chunking: chunking(chunks)?,
            split,
        })
    }
}

/// The fused linear loss of `inputs` (see [`LinearInputs`]) and the gradients that `outputs`
/// has tensors for (see [`LinearOutputs`]; every gradient is overwritten), the loss outputs
/// written into the tensors of `outputs`. `chunks`: `(rows per chunk, byte budget)`, at most one
/// of them given. `device` and `check` as in `crate::forward`. `split`: this rank's slice
/// `(start, len, vocab)` of the vocabulary (`weight` holds its `len` rows) and its vocabulary
/// and data groups, each `(rank, size, all-gather callable or None)`, the callable a host or a
/// device one as the tensors are (see `group.rs`); `d hidden` is then this rank's part, to be
/// summed over the vocabulary group.
#[pyfunction]
#[pyo3(signature = (inputs, outputs, options, chunks, device=None, check=false, split=None))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments, with `py`
pub(crate) fn linear_forward(
    py: Python<'_>,
    inputs: LinearInputs,
    outputs: LinearOutputs,
    options: Options,
    chunks: (Option<i64>, Option<i64>),
    device: Option<(usize, usize)>,
    check: bool,
    split: Option<PySplit>,
) -> PyResult<()> {
    let backend = if device.is_some() { Backend::Cuda } else { Backend::Cpu };
    let req = inputs
        .request(&outputs, &options, chunks, backend, split.as_ref())
        .map_err(|e| crate::group::failed_before(py, split.as_ref(), device.is_none(), e))?;
    match device {
        None => crate::cpu::linear_forward(py, &req),
        #[cfg(feature = "cuda")]
        Some(device) => {
            let check = check || req.spec.check_finite();
            crate::cuda::linear_forward(py, &req, device, check)
        }
        #[cfg(not(feature = "cuda"))]
        Some(_) => {
            let _ = check;
            Err(pyo3::exceptions::PyRuntimeError::new_err(
                "this build of fused_weighted_loss has no CUDA support (build it with the `cuda` feature)",
            ))
        }
    }
}

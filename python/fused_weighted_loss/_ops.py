"""The loss as PyTorch custom operators: a fused forward that returns the loss and keeps the
gradient, a backward that scales that gradient by the upstream gradient, and fake (meta)
implementations so that ``torch.compile(fullgraph=True)`` traces both without a graph break.
An eager call runs the same forward and backward as a plain autograd function (``_EagerLoss``),
which skips the op's dispatch layers.

The tensors' memory goes to the native module as data pointers: on CPU the crate's CPU backend
runs on it in place; on CUDA its kernels run on torch's device pointers, queued on torch's current
stream, in the device's primary context (torch's own), with no copy and no host synchronisation.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _cpu_pool, _native

_NS = "fused_weighted_loss"

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUM_INPUTS = 7  # arguments of the loss op


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _arg(t: Tensor) -> Tuple[int, List[int], str]:
    """What the native module reads of a tensor: data pointer, shape, dtype name."""
    return (t.data_ptr(), list(t.shape), _dtype_name(t))


def _aligned(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t``, or a copy of it where its data does not start at a multiple of its element size (a
    legal view at an odd byte offset, e.g. of a numpy buffer; the native code reads whole
    elements). The caller keeps the copy alive until the native call returns."""
    if t is None or t.data_ptr() % t.element_size() == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _ptr(t: Optional[Tensor]) -> int:
    return t.data_ptr() if t is not None and t.numel() > 0 else 0


def _check_same_device(first: str, x: Tensor, named: Dict[str, Optional[Tensor]]) -> None:
    """Every tensor of ``named`` (None: absent) is on ``x``'s device, the ``first`` one's."""
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, the {first} on {x.device}: they must share a device")


def _check_devices(logits: Tensor, ids: Tensor, labels: Optional[Tensor], token_weights: Optional[Tensor]) -> None:
    _check_same_device("logits", logits, {"ids": ids, "labels": labels, "token_weights": token_weights})


def _check_kinds(named: Dict[str, Optional[Tensor]]) -> None:
    """Every tensor of ``named`` (None: absent) is a dense CPU or CUDA tensor: the only memory the
    native module may read through a data pointer."""
    for name, t in named.items():
        if t is None:
            continue
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {t.device}: only CPU and CUDA tensors are supported")
        if t.layout != torch.strided or t.is_nested:
            kind = "a nested tensor" if t.is_nested else t.layout
            raise ValueError(f"{name} must be a dense (strided) tensor, got {kind}")
        # a lazy negation or conjugation (torch._neg_view, .conj() of a complex view): the memory
        # holds the values before it, which the native module would read as they lie (checked in
        # eager calls only: dynamo cannot trace the flags' queries)
        if not torch.compiler.is_compiling() and (t.is_neg() or t.is_conj()):
            raise ValueError(f"{name} carries a lazy negation or conjugation: call .resolve_neg() first")


def _check_layouts(named: Dict[str, Optional[Tensor]]) -> None:
    """What only torch knows besides devices: CPU or CUDA, dense, contiguous (shapes, dtypes and
    values are the crate's to check, with its messages)."""
    _check_kinds(named)
    for name, t in named.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _check_tensors(logits: Tensor, ids: Tensor, labels: Optional[Tensor], token_weights: Optional[Tensor]) -> None:
    _check_devices(logits, ids, labels, token_weights)
    _check_layouts({"logits": logits, "ids": ids, "labels": labels, "token_weights": token_weights})


def _device_arg(t: Tensor) -> Optional[Tuple[int, int]]:
    """None for CPU; (ordinal, torch's current stream) for CUDA."""
    if t.device.type != "cuda":
        return None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return (index, torch.cuda.current_stream(index).cuda_stream)


# The scalar options a mode string carries as ``:name=value`` (omitted when at their default):
# name -> (type, default).
_MODE_OPTIONS = {"alpha": (float, 1.0), "ignore_index": (int, -100), "z_loss": (float, 0.0),
                 "label_smoothing": (float, 0.0), "softcap": (float, None)}


def _mode(row_mean: str, reduction: str, flags: str, options: Dict[str, object], kinds=None) -> str:
    """``row_mean:reduction:flags``, then ``:name=value`` for each option of ``options`` not at
    its default in ``kinds`` (floats as Python's ``repr``, which reads back exactly)."""
    kinds = _MODE_OPTIONS if kinds is None else kinds
    for name, value in (("row_mean", row_mean), ("reduction", reduction)):
        if ":" in value:  # the mode's separator: it would be read as more fields
            raise ValueError(f"unknown {name} {value!r}")
    mode = f"{row_mean}:{reduction}:{flags}"
    for name, value in options.items():
        # `!=` is True for NaN: passed on, for the crate to reject
        if value is not None and value != kinds[name][1]:
            mode += f":{name}={value!r}"
    return mode


def mode_string(row_mean: str, reduction: str, compute_grad: bool, per_sample: bool, check_ids: bool,
                check_finite: bool, *, token_loss: bool = False, grad_f32: bool = False, alpha: float = 1.0,
                ignore_index: int = -100, z_loss: float = 0.0, label_smoothing: float = 0.0,
                softcap: Optional[float] = None) -> str:
    """The loss op's last argument: ``row_mean:reduction:flags``, then ``:name=value`` for each
    scalar option not at its default (``alpha``, ``ignore_index``, ``z_loss``,
    ``label_smoothing``, ``softcap``; floats as Python's ``repr``, which reads back exactly).
    Flags among ``g`` (compute the gradient), ``p`` (per-sample outputs and the z-loss part),
    ``t`` (per-token losses), ``i`` (check ids and token weights on CUDA), ``f`` (check
    finiteness), ``w`` (keep the gradient in float32 whatever the logits' dtype: ``grad_f32``).
    (One string rather than a dozen arguments: the per-call cost of a custom op grows with the
    square of its argument count.)"""
    flags = ("g" * compute_grad + "p" * per_sample + "t" * token_loss + "i" * check_ids + "f" * check_finite
             + "w" * grad_f32)
    return _mode(row_mean, reduction, flags, dict(alpha=alpha, ignore_index=ignore_index, z_loss=z_loss,
                                                  label_smoothing=label_smoothing, softcap=softcap))


def _parse_mode(mode: str, kinds=None) -> Tuple[str, str, str, Dict[str, float]]:
    """``(row_mean, reduction, flags, scalar options given)`` of a mode string; ``kinds``: the
    options it may carry (name -> (type, default); the loss op's by default)."""
    kinds = _MODE_OPTIONS if kinds is None else kinds
    parts = mode.split(":")
    if len(parts) < 3:
        raise ValueError(f"mode must be 'row_mean:reduction:flags[:name=value...]', got {mode!r}")
    options = {}
    for item in parts[3:]:
        name, _, value = item.partition("=")
        kind = kinds.get(name, (None,))[0]
        if kind is None or name in options:
            raise ValueError(f"mode {mode!r}: unknown or repeated option {name!r} "
                             f"(expected {', '.join(kinds)})")
        try:
            options[name] = kind(value)
        except ValueError:
            raise ValueError(f"mode {mode!r}: {name} must be {'a float' if kind is float else 'an int'}, "
                             f"got {value!r}") from None
    return parts[0], parts[1], parts[2], options


def _native_options(keywords: List[int], keyword_weights: List[float], row_mean: str, reduction: str, flags: str,
                    opt: Dict[str, float]) -> tuple:
    """The native module's options tuple (see python/src/lib.rs, ``Options``)."""
    return (list(keywords), list(keyword_weights), opt.get("alpha", 1.0), opt.get("ignore_index", -100), row_mean,
            reduction, "f" in flags, opt.get("z_loss", 0.0), opt.get("label_smoothing", 0.0), opt.get("softcap"))


def _empty_like(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A new contiguous tensor of ``t``'s shape and device, of ``t``'s dtype or ``dtype``."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def _wide(grad: Tensor, like: Tensor) -> bool:
    """Whether the gradient ``grad`` the native module writes is float32 where the inputs
    (``like``) are 16-bit."""
    return grad.dtype == torch.float32 and like.dtype != torch.float32


def _outputs_like(logits: Tensor, flags: str, grad_alloc) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    rank3 = logits.dim() == 3
    n = logits.shape[0] if "p" in flags and rank3 else 0
    loss = logits.new_empty((), dtype=torch.float32)
    per = logits.new_empty((n,), dtype=torch.float64)
    weights = logits.new_empty((n,), dtype=torch.float64)
    z_loss = logits.new_empty(() if "p" in flags else (0,), dtype=torch.float64)
    if "t" in flags and rank3:
        token_loss = logits.new_empty((logits.shape[0], max(logits.shape[1] - 1, 0)), dtype=torch.float32)
    else:
        token_loss = logits.new_empty((0,), dtype=torch.float32)
    if "g" in flags and logits.dtype in _LOGIT_DTYPES and rank3:
        grad = grad_alloc(logits, torch.float32 if "w" in flags else None)
    else:
        grad = logits.new_empty((0,))
    return loss, per, weights, z_loss, token_loss, grad


@torch.library.custom_op(f"{_NS}::loss", mutates_args=())
def _loss_custom_op(
    logits: Tensor,
    ids: Tensor,
    labels: Optional[Tensor],
    token_weights: Optional[Tensor],
    keywords: List[int],
    keyword_weights: List[float],
    mode: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss (float32 0-d), per-sample losses and weights (float64 [B]) and the z-loss part of the
    loss (float64 0-d) (each empty without the ``p`` flag), the per-token losses (float32
    [B, T-1], empty without the ``t`` flag), and the gradient w.r.t. the logits (the logits'
    shape and dtype, float32 with the ``w`` flag, or empty without the ``g`` flag), in one fused
    pass. ``mode``: see
    :func:`mode_string`.

    The gradient output is the buffer the autograd graph keeps for the backward, which may scale
    it in place (an upstream gradient other than 1): a caller of this op itself (an internal API;
    the package's functions never return it) that keeps it across a backward should clone it."""
    return _loss_impl(logits, ids, labels, token_weights, keywords, keyword_weights, mode)


def _loss_impl(logits, ids, labels, token_weights, keywords, keyword_weights, mode):
    """The loss op's computation (see ``_loss_custom_op``), shared by the registered op and the
    eager autograd function."""
    _check_tensors(logits, ids, labels, token_weights)
    logits, ids, labels, token_weights = (_aligned(t) for t in (logits, ids, labels, token_weights))
    row_mean, reduction, flags, opt = _parse_mode(mode)
    loss, per, weights, z_loss, token_loss, grad = _outputs_like(logits, flags, _cpu_pool.empty_like)
    # on CUDA the kernels leave every position's loss ([B, T] float64) on the device: copied
    # there into `rows`, then narrowed into token_loss on the same stream (no host sync)
    rows = token_loss
    if logits.is_cuda and token_loss.numel() > 0:
        rows = logits.new_empty((token_loss.shape[0], token_loss.shape[1] + 1), dtype=torch.float64)
    _native.forward(
        (_arg(logits), _arg(ids), _arg(labels) if labels is not None else None,
         _arg(token_weights) if token_weights is not None else None),
        (_ptr(grad), loss.data_ptr(), _ptr(per), _ptr(weights), _ptr(z_loss), _ptr(rows), _wide(grad, logits)),
        _native_options(keywords, keyword_weights, row_mean, reduction, flags, opt),
        _device_arg(logits),
        "i" in flags,
    )
    if rows is not token_loss:
        token_loss.copy_(rows[:, :-1])
    return loss, per, weights, z_loss, token_loss, grad


@_loss_custom_op.register_fake
def _loss_fake(logits, ids, labels, token_weights, keywords, keyword_weights, mode):
    _check_devices(logits, ids, labels, token_weights)
    _, _, flags, _ = _parse_mode(mode)
    return _outputs_like(logits, flags, _empty_like)


@torch.library.custom_op(f"{_NS}::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale, in place, where scale is the 0-d upstream gradient of the loss. CUDA: the
    crate's kernel, which reads the scale on the device and does nothing when it is exactly 1
    (no host read). CPU: the scale is in host memory already; the pass is skipped when it is 1."""
    # the op is public (torch.ops.fused_weighted_loss.scale_grad_): the native side writes
    # grad.numel() elements from its data pointer, so only a dense contiguous tensor may go there
    _check_layouts({"grad": grad})
    if grad.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"grad must be float32, float16 or bfloat16, got {grad.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one number, got shape {list(scale.shape)}")
    if grad.is_cuda:
        s = scale.detach().to(device=grad.device, dtype=torch.float32).reshape(())
        _native.scale_grad(_arg(grad), s.data_ptr(), _device_arg(grad))
    else:
        s = float(scale)
        if s != 1.0:
            grad.mul_(s)


@_scale_grad_op.register_fake
def _scale_grad_fake(grad, scale):
    return None


def _setup_context(ctx, inputs, output):
    loss, per, weights, z_loss, token_loss, grad = output
    ctx.mark_non_differentiable(per, weights, z_loss, token_loss, grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.fwl_dtype = inputs[0].dtype  # the logits': the dtype of the gradient the backward returns


def _host_value(g: Tensor, grad: Tensor) -> Optional[float]:
    """The upstream gradient as a float when reading it costs nothing: a plain CPU tensor with a
    CPU gradient, in eager mode (never a CUDA tensor, never while tracing)."""
    if type(g) is Tensor and g.device.type == "cpu" and grad.device.type == "cpu" and g.numel() == 1:
        return float(g)
    return None


_CONSUMED = (
    "fused_weighted_loss: an earlier backward through this loss consumed the gradient kept by the "
    "forward (it scales it in place); a second backward through the same graph (retain_graph=True) "
    "is not supported: compute the loss again"
)

_MODIFIED = (
    "fused_weighted_loss: the gradient an earlier backward through this loss returned (the kept "
    "gradient itself, upstream gradient 1) was modified in place since; a second backward through "
    "the same graph would return the modified values: clone that gradient before modifying it, or "
    "compute the loss again"
)


def _kept(ctx) -> Tuple[Tensor, ...]:
    """The gradients the forward kept (``ctx.saved_tensors``), with a clear error when an
    earlier backward already scaled them in place: from the context's own flag, since the
    version counter's check that ``saved_tensors`` makes is skipped for tensors that went through
    saved-tensor hooks (``torch.autograd.graph.save_on_cpu`` and the like), where a second
    backward then multiplied the already scaled gradient again."""
    if getattr(ctx, "fwl_scaled_in_place", False):
        raise RuntimeError(_CONSUMED)
    handed = getattr(ctx, "fwl_handed_versions", None)
    try:
        kept = ctx.saved_tensors
    except RuntimeError as e:
        if "inplace operation" not in str(e):
            raise
        raise RuntimeError(_MODIFIED if handed is not None else _CONSUMED) from e
    return kept


def _refuse_double_backward() -> None:
    """An eager backward runs with grad mode on only under ``create_graph=True``: the kept
    gradient has no graph, so a gradient of it would silently lack its second-order terms."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("fused_weighted_loss: a backward with create_graph=True (a double backward) is not "
                           "supported: the fused gradient has no graph of its own")


def _scaled(ctx, grads: List[Tensor], g_loss: Tensor) -> List[Tensor]:
    """The kept gradients times the upstream gradient ``g_loss`` (a 0-d tensor), never read on
    the host unless it is a CPU value already, in the inputs' dtype (``ctx.fwl_dtype``).

    Gradients kept in float32 for 16-bit inputs (float16's, see ``weighted_loss``) are scaled
    and rounded once into a new tensor of the inputs' dtype: the upstream gradient (a loss
    scale) applies before the rounding, as in PyTorch's own float16 backward.

    The first backward through a forward may scale the kept gradients in place (no new buffer):
    nobody else holds them yet. Once a backward has handed them out unscaled (upstream 1 on the
    CPU), they may be anyone's (``torch.autograd.grad`` results, hook arguments), so a later
    backward through the same graph multiplies out of place instead of rewriting them."""
    _refuse_double_backward()
    handed = getattr(ctx, "fwl_handed_versions", None)
    # handed out before (upstream 1: the kept tensors themselves): their version counters tell
    # whether the caller changed them since, also where saved-tensor hooks skip torch's check
    if handed is not None and tuple(g._version for g in grads) != handed:
        raise RuntimeError(_MODIFIED)
    dtype = getattr(ctx, "fwl_dtype", None)
    if torch.compiler.is_compiling():
        # traced (torch.compile): a functional multiply, which the compiler fuses with whatever
        # follows; scaling the kept gradient in place would make it copy the gradient first
        return [g * g_loss if dtype in (None, g.dtype) else (g * g_loss).to(dtype) for g in grads]
    if any(g.dtype != (dtype or g.dtype) or not g.is_contiguous() for g in grads):
        # kept wider than the inputs, or handed back in another layout by a saved-tensor hook
        # (an unpack hook may return any tensor of the same values): a new tensor each time,
        # the kept ones stay as they are
        return [_times(g, g_loss, dtype) for g in grads]
    if grads and _host_value(g_loss, grads[0]) == 1.0:
        # CPU, upstream gradient 1: the kept gradients are the answer, untouched (their versions
        # noted: a later backward through the same graph refuses them if the caller changed them)
        ctx.fwl_handed_out = True
        ctx.fwl_handed_versions = tuple(g._version for g in grads)
        return grads
    if getattr(ctx, "fwl_handed_out", False):
        return [_times(g, g_loss) for g in grads]
    ctx.fwl_handed_out = True
    ctx.fwl_scaled_in_place = True
    for g in grads:
        torch.ops.fused_weighted_loss.scale_grad_(g, g_loss)
    return grads


def _times(grad: Tensor, g_loss: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``grad · g_loss`` in a new tensor of ``dtype`` (default ``grad``'s), the product taken
    in float32 and rounded once (an upstream gradient such as a loss scale of 65536 does not
    fit float16)."""
    g = _host_value(g_loss, grad)
    if dtype is None or dtype == grad.dtype:
        if g is not None:
            return grad * g  # a Python float: the product is taken in float32, rounded once
        return (grad.to(torch.float32) * g_loss.to(device=grad.device, dtype=torch.float32)).to(grad.dtype)
    # a float32 gradient into the inputs' dtype: one pass, rounded on the write
    out = _cpu_pool.empty_like(grad, dtype)
    if g is not None and grad.device.type == "cpu" and grad.is_contiguous():
        # the native pass (which reads `grad` as one contiguous block): torch's multiply into
        # float16 takes several times as long on the CPU
        _native.narrow_grad(_arg(grad), _arg(out), g)
    else:
        torch.mul(grad, g if g is not None else g_loss.to(device=grad.device, dtype=torch.float32), out=out)
    return out


def logits_grad(ctx, g_loss: Tensor) -> Tensor:
    """The gradient of the logits a forward kept (``ctx.saved_tensors``), scaled by ``g_loss``:
    the backward of the loss op and of the split's autograd function."""
    (grad,) = _kept(ctx)
    if grad.dim() == 1 and grad.numel() == 0:  # the placeholder (a rank without samples keeps [0, T, V])
        raise RuntimeError("fused_weighted_loss: the forward computed no gradient (the logits did not require one)")
    return _scaled(ctx, [grad], g_loss)[0]


def _backward(ctx, g_loss, *g_non_differentiable):
    if g_loss is None:
        return (None,) * _NUM_INPUTS
    return (logits_grad(ctx, g_loss),) + (None,) * (_NUM_INPUTS - 1)


_loss_custom_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoss(torch.autograd.Function):
    """The same forward and backward as the registered op, as a plain autograd function: what
    an eager call runs. The op's dispatch layers (its autograd wrapper, the redispatch to the
    implementation, the alias checks of its outputs) cost a few hundred microseconds per call
    once a pass over hundreds of MB has evicted the interpreter's working set from the caches;
    the registered op stays what ``torch.compile`` traces."""

    @staticmethod
    def forward(ctx, logits, ids, labels, token_weights, keywords, keyword_weights, mode):
        output = _loss_impl(logits, ids, labels, token_weights, keywords, keyword_weights, mode)
        _setup_context(ctx, (logits,), output)
        return output

    @staticmethod
    def backward(ctx, g_loss, *g_non_differentiable):
        return _backward(ctx, g_loss, *g_non_differentiable)


# (torch's query of whether a torch.func transform is running; absent: never taken as running)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)

_TRANSFORMS = (
    "fused_weighted_loss does not run under torch.func transforms (grad, vjp, vmap, jacrev, ...): "
    "its gradient comes from the forward, with no graph a transform could differentiate or batch; "
    "use loss.backward() or torch.autograd.grad"
)


def refuse_transforms() -> None:
    """A clear error under a ``torch.func`` transform, where the autograd functions would fail
    with torch's message about their own structure, or a nested transform would silently get
    no second derivative."""
    if not torch.compiler.is_compiling() and _transforms_active():
        raise RuntimeError(_TRANSFORMS)


def _loss_op(logits, ids, labels, token_weights, keywords, keyword_weights, mode):
    """The fused loss: the registered op while ``torch.compile`` traces, the eager autograd
    function otherwise (the same computation)."""
    if torch.compiler.is_compiling():
        return _loss_custom_op(logits, ids, labels, token_weights, keywords, keyword_weights, mode)
    return _EagerLoss.apply(logits, ids, labels, token_weights, keywords, keyword_weights, mode)

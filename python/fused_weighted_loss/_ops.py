"""The loss as PyTorch custom operators: a fused forward that returns the loss and keeps the
gradient, a backward that scales that gradient by the upstream gradient, and fake (meta)
implementations so that ``torch.compile(fullgraph=True)`` traces both without a graph break.

The tensors' memory goes to the native module as data pointers: on CPU the crate's CPU backend
runs on it in place; on CUDA its kernels run on torch's device pointers, queued on torch's current
stream, in the device's primary context (torch's own), with no copy and no host synchronisation.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _cpu_pool, _native

_NS = "fused_weighted_loss"

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUM_INPUTS = 8  # arguments of the loss op


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _arg(t: Tensor) -> Tuple[int, List[int], str]:
    """What the native module reads of a tensor: data pointer, shape, dtype name."""
    return (t.data_ptr(), list(t.shape), _dtype_name(t))


def _ptr(t: Optional[Tensor]) -> int:
    return t.data_ptr() if t is not None and t.numel() > 0 else 0


def _check_devices(logits: Tensor, ids: Tensor, labels: Optional[Tensor]) -> None:
    for name, t in (("ids", ids), ("labels", labels)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, the logits on {logits.device}: they must share a device")


def _check_tensors(logits: Tensor, ids: Tensor, labels: Optional[Tensor]) -> None:
    """What only torch knows: devices and layouts (shapes, dtypes and values are the crate's to
    check, with its messages)."""
    _check_devices(logits, ids, labels)
    for name, t in (("logits", logits), ("ids", ids), ("labels", labels)):
        if t is None:
            continue
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {t.device}: only CPU and CUDA tensors are supported")
        if t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got {t.layout}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _device_arg(t: Tensor) -> Optional[Tuple[int, int]]:
    """None for CPU; (ordinal, torch's current stream) for CUDA."""
    if t.device.type != "cuda":
        return None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return (index, torch.cuda.current_stream(index).cuda_stream)


def mode_string(row_mean: str, reduction: str, compute_grad: bool, per_sample: bool, check_ids: bool,
                check_finite: bool) -> str:
    """The op's last argument: ``row_mean:reduction:flags``, flags among ``g`` (compute the
    gradient), ``p`` (per-sample outputs), ``i`` (check ids on CUDA), ``f`` (check finiteness).
    (One string rather than six arguments: the per-call cost of a custom op grows with the
    square of its argument count.)"""
    flags = "g" * compute_grad + "p" * per_sample + "i" * check_ids + "f" * check_finite
    return f"{row_mean}:{reduction}:{flags}"


def _parse_mode(mode: str) -> Tuple[str, str, str]:
    parts = mode.split(":")
    if len(parts) != 3:
        raise ValueError(f"mode must be 'row_mean:reduction:flags', got {mode!r}")
    return parts[0], parts[1], parts[2]


def _outputs_like(logits: Tensor, flags: str, grad_alloc) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    n = logits.shape[0] if "p" in flags and logits.dim() == 3 else 0
    loss = logits.new_empty((), dtype=torch.float32)
    per = logits.new_empty((n,), dtype=torch.float64)
    weights = logits.new_empty((n,), dtype=torch.float64)
    if "g" in flags and logits.dtype in _LOGIT_DTYPES and logits.dim() == 3:
        grad = grad_alloc(logits)
    else:
        grad = logits.new_empty((0,))
    return loss, per, weights, grad


@torch.library.custom_op(f"{_NS}::loss", mutates_args=())
def _loss_op(
    logits: Tensor,
    ids: Tensor,
    labels: Optional[Tensor],
    keywords: List[int],
    keyword_weights: List[float],
    alpha: float,
    ignore_index: int,
    mode: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss (float32 0-d), per-sample losses and weights (float64 [B], or empty without the
    ``p`` flag), and the gradient w.r.t. the logits (the logits' shape and dtype, or empty
    without the ``g`` flag), in one fused pass. ``mode``: see :func:`mode_string`."""
    _check_tensors(logits, ids, labels)
    row_mean, reduction, flags = _parse_mode(mode)
    loss, per, weights, grad = _outputs_like(logits, flags, _cpu_pool.empty_like)
    _native.forward(
        (_arg(logits), _arg(ids), _arg(labels) if labels is not None else None),
        (_ptr(grad), loss.data_ptr(), _ptr(per), _ptr(weights)),
        (list(keywords), list(keyword_weights), alpha, ignore_index, row_mean, reduction, "f" in flags),
        _device_arg(logits),
        "i" in flags,
    )
    return loss, per, weights, grad


@_loss_op.register_fake
def _loss_fake(logits, ids, labels, keywords, keyword_weights, alpha, ignore_index, mode):
    _check_devices(logits, ids, labels)
    _, _, flags = _parse_mode(mode)
    return _outputs_like(logits, flags, lambda t: torch.empty_like(t, memory_format=torch.contiguous_format))


@torch.library.custom_op(f"{_NS}::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale, in place, where scale is the 0-d upstream gradient of the loss. CUDA: the
    crate's kernel, which reads the scale on the device and does nothing when it is exactly 1
    (no host read). CPU: the scale is in host memory already; the pass is skipped when it is 1."""
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


# The fused-linear op (fused_weighted_loss::linear_loss, for weighted_linear_loss) belongs beside
# the loss op above once the crate has its fused linear API: its forward returns the loss and the
# gradients of hidden, weight and bias (fake implementation alike), and its backward scales them
# as _backward below does for the logits' gradient.


def _setup_context(ctx, inputs, output):
    loss, per, weights, grad = output
    ctx.mark_non_differentiable(per, weights, grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)


def _host_value(g: Tensor, grad: Tensor) -> Optional[float]:
    """The upstream gradient as a float when reading it costs nothing: a plain CPU tensor with a
    CPU gradient, in eager mode (never a CUDA tensor, never while tracing)."""
    if type(g) is Tensor and g.device.type == "cpu" and grad.device.type == "cpu" and g.numel() == 1:
        return float(g)
    return None


def _backward(ctx, g_loss, g_per, g_weights, g_grad):
    if g_loss is None:
        return (None,) * _NUM_INPUTS
    try:
        (grad,) = ctx.saved_tensors
    except RuntimeError as e:
        if "inplace operation" not in str(e):
            raise
        raise RuntimeError(
            "fused_weighted_loss: an earlier backward through this loss consumed the gradient kept by the "
            "forward (it scales it in place); a second backward through the same graph (retain_graph=True) "
            "is not supported: compute the loss again"
        ) from e
    if grad.numel() == 0:
        raise RuntimeError("fused_weighted_loss: the forward computed no gradient (the logits did not require one)")
    if torch.compiler.is_compiling():
        # traced (torch.compile): a functional multiply, which the compiler fuses with whatever
        # follows; scaling the kept gradient in place would make it copy the gradient first
        return (grad * g_loss,) + (None,) * (_NUM_INPUTS - 1)
    if _host_value(g_loss, grad) == 1.0:
        # CPU, upstream gradient 1: the kept gradient is the answer, untouched (so a second
        # backward through the same graph sees it unchanged)
        return (grad,) + (None,) * (_NUM_INPUTS - 1)
    torch.ops.fused_weighted_loss.scale_grad_(grad, g_loss)
    return (grad,) + (None,) * (_NUM_INPUTS - 1)


_loss_op.register_autograd(_backward, setup_context=_setup_context)

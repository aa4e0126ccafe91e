"""The fused linear + weighted loss as a PyTorch custom operator: the loss of
``hidden @ weight.T (+ bias)`` computed chunk by chunk without the logits, its forward returning
the loss with the gradients of hidden, weight and bias, which the backward scales by the upstream
gradient; a fake implementation so that ``torch.compile(fullgraph=True)`` traces it.

CPU tensors run the crate's ``LossSpec::linear_loss_and_grad`` (the ``gemm`` crate's products)
on torch's memory; CUDA tensors run its cuBLAS path on torch's device pointers, queued on torch's
current stream, with no copy and no host synchronisation.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _cpu_pool, _native
from ._ops import (_MODE_OPTIONS, _NS, _aligned, _arg, _check_layouts, _check_same_device, _device_arg, _empty_like,
                   _kept, _mode, _native_options, _parse_mode, _ptr, _scaled)

_NUM_INPUTS = 9  # arguments of the linear op
_HALF = (torch.float16, torch.bfloat16)

# the loss op's scalar options, and the chunking (rows per chunk, or a byte budget)
_LINEAR_OPTIONS = dict(_MODE_OPTIONS, chunk_rows=(int, None), chunk_budget=(int, None))
_GRAD_FLAGS = "hwb"  # d hidden, d weight, d bias: the order of the op's gradient outputs


def linear_mode_string(row_mean: str, reduction: str, grads: str, per_sample: bool, check_ids: bool,
                       check_finite: bool, *, accumulate_f32: bool = True, chunk_rows: Optional[int] = None,
                       chunk_budget: Optional[int] = None, alpha: float = 1.0, ignore_index: int = -100,
                       z_loss: float = 0.0, label_smoothing: float = 0.0, softcap: Optional[float] = None) -> str:
    """The linear op's last argument, as the loss op's (:func:`._ops.mode_string`): flags among
    ``h``, ``w``, ``b`` (compute the gradient of hidden, weight, bias: ``grads``), ``p``
    (per-sample outputs and the z-loss part), ``i`` (check ids and token weights on CUDA), ``f``
    (check finiteness), ``n`` (16-bit inputs: accumulate ``d weight`` and ``d bias`` across
    chunks in their own dtype rather than in float32); options as the loss op's, and
    ``chunk_rows`` or ``chunk_budget`` (bytes)."""
    if any(c not in _GRAD_FLAGS for c in grads):
        raise ValueError(f"grads must be made of {_GRAD_FLAGS!r}, got {grads!r}")
    flags = grads + "p" * per_sample + "i" * check_ids + "f" * check_finite + "n" * (not accumulate_f32)
    return _mode(row_mean, reduction, flags,
                 dict(alpha=alpha, ignore_index=ignore_index, z_loss=z_loss, label_smoothing=label_smoothing,
                      softcap=softcap, chunk_rows=chunk_rows, chunk_budget=chunk_budget), _LINEAR_OPTIONS)


def _check_devices(hidden: Tensor, named) -> None:
    _check_same_device("hidden states", hidden, named)


def _kept_dtype(hidden: Tensor, flags: str) -> Optional[torch.dtype]:
    """The dtype of the gradients the forward keeps for the backward, when not the inputs':
    float32 for float16 inputs (unless the ``n`` flag), so that the backward applies the upstream
    gradient (a loss scale) before rounding to float16."""
    return torch.float32 if hidden.dtype == torch.float16 and "n" not in flags else None


def _outputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, flags: str, alloc):
    """loss, per-sample losses, weights, z-loss part, and the gradients of hidden, weight and
    bias asked for in ``flags`` (None for the others), of the dtype the forward keeps."""
    n = ids.shape[0] if "p" in flags and ids.dim() == 2 else 0
    loss = hidden.new_empty((), dtype=torch.float32)
    per = hidden.new_empty((n,), dtype=torch.float64)
    weights = hidden.new_empty((n,), dtype=torch.float64)
    z_loss = hidden.new_empty(() if "p" in flags else (0,), dtype=torch.float64)
    kept = _kept_dtype(hidden, flags)
    grads = [alloc(t, kept) if c in flags and t is not None else None
             for c, t in zip(_GRAD_FLAGS, (hidden, weight, bias))]
    return loss, per, weights, z_loss, grads


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


@torch.library.custom_op(f"{_NS}::linear_loss", mutates_args=())
def _linear_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ids: Tensor,
    labels: Optional[Tensor],
    token_weights: Optional[Tensor],
    keywords: List[int],
    keyword_weights: List[float],
    mode: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss (float32 0-d), per-sample losses and weights (float64 [B]) and the z-loss part
    (float64 0-d) (each empty without the ``p`` flag), and the gradients of hidden, weight and
    bias (each the input's shape and dtype, float32 for float16 inputs without the ``n`` flag,
    or empty without its flag), in one chunked pass that never holds the logits. ``mode``: see
    :func:`linear_mode_string`."""
    return linear_forward(hidden, weight, bias, ids, labels, token_weights, keywords, keyword_weights, mode)


def linear_forward(hidden, weight, bias, ids, labels, token_weights, keywords, keyword_weights, mode, split=None):
    """The linear op's forward; ``split``: this rank's vocabulary slice and groups for the
    native call (see ``_dist.ShardedLinear``)."""
    named = dict(hidden=hidden, weight=weight, bias=bias, ids=ids, labels=labels, token_weights=token_weights)
    _check_devices(hidden, named)
    _check_layouts(named)
    hidden, weight, bias, ids, labels, token_weights = (_aligned(t) for t in (hidden, weight, bias, ids, labels,
                                                                               token_weights))
    row_mean, reduction, flags, opt = _parse_mode(mode, _LINEAR_OPTIONS)
    alloc = _cpu_pool.empty_like if hidden.device.type == "cpu" else _empty_like
    loss, per, weights, z_loss, grads = _outputs(hidden, weight, bias, ids, flags, alloc)
    # 16-bit inputs: d weight and d bias are sums over the chunks, kept in float32 until the end
    # (unless the `n` flag says otherwise); d hidden is written once per row. float16's are
    # float32 already (kept so until the backward)
    wide = hidden.dtype in _HALF and "n" not in flags
    targets = [g if k == 0 or g is None or not wide or g.dtype == torch.float32 else alloc(g, torch.float32)
               for k, g in enumerate(grads)]
    _native.linear_forward(
        tuple(_arg(t) if t is not None else None for t in (hidden, weight, bias, ids, labels, token_weights)),
        (tuple(_arg(t) if t is not None else None for t in targets),
         (0, loss.data_ptr(), _ptr(per), _ptr(weights), _ptr(z_loss), 0, False)),
        _native_options(keywords, keyword_weights, row_mean, reduction, flags, opt),
        (opt.get("chunk_rows"), opt.get("chunk_budget")),
        _device_arg(hidden),
        "i" in flags,
        split,
    )
    for g, t in zip(grads, targets):
        if g is not t:
            g.copy_(t)
    dh, dw, db = (_empty_if_none(g, hidden) for g in grads)
    return loss, per, weights, z_loss, dh, dw, db


@_linear_op.register_fake
def _linear_fake(hidden, weight, bias, ids, labels, token_weights, keywords, keyword_weights, mode):
    _check_devices(hidden, dict(weight=weight, bias=bias, ids=ids, labels=labels, token_weights=token_weights))
    _, _, flags, _ = _parse_mode(mode, _LINEAR_OPTIONS)
    loss, per, weights, z_loss, grads = _outputs(hidden, weight, bias, ids, flags, _empty_like)
    dh, dw, db = (_empty_if_none(g, hidden) for g in grads)
    return loss, per, weights, z_loss, dh, dw, db


def _setup_context(ctx, inputs, output):
    loss, per, weights, z_loss, dh, dw, db = output
    ctx.mark_non_differentiable(per, weights, z_loss, dh, dw, db)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dh, dw, db)
    ctx.fwl_dtype = inputs[0].dtype  # hidden's, the inputs': the dtype of the gradients returned


def linear_grads(ctx, g_loss: Tensor, n_inputs: int) -> tuple:
    """The gradients of hidden, weight and bias a forward kept, those asked for scaled by
    ``g_loss``, then None for the rest of ``n_inputs``: the backward of the linear op and of the
    split's autograd function."""
    kept = _kept(ctx)
    wanted = [k for k in range(3) if ctx.needs_input_grad[k]]
    for k in wanted:
        if kept[k].dim() == 1 and kept[k].numel() == 0:  # the placeholder, not an empty batch's [0, H]
            raise RuntimeError(f"fused_weighted_loss: the forward computed no gradient for "
                               f"{('hidden', 'weight', 'bias')[k]} (it did not require one then)")
    out = [None] * n_inputs
    for k, g in zip(wanted, _scaled(ctx, [kept[k] for k in wanted], g_loss)):
        out[k] = g
    return tuple(out)


def _backward(ctx, g_loss, *g_non_differentiable):
    if g_loss is None:
        return (None,) * _NUM_INPUTS
    return linear_grads(ctx, g_loss, _NUM_INPUTS)


_linear_op.register_autograd(_backward, setup_context=_setup_context)

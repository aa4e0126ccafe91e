"""The keyword-weighted causal LM loss of the Hugging Face course (``keytoken_weighted_loss``)
and its gradient in one fused pass over the logits, on CPU and CUDA tensors, with autograd and
``torch.compile`` support.

    from fused_weighted_loss import keytoken_weighted_loss
    loss = keytoken_weighted_loss(batch["input_ids"], logits, keytoken_ids)   # the course's call
    loss.backward()

    # the options of current trainers, and the per-token losses to log, in the same fused call
    out = weighted_loss(logits, batch["input_ids"], keywords=keytoken_ids, z_loss=1e-4,
                        label_smoothing=0.1, softcap=30.0,
                        token_weights=batch["attention_mask"].float(), return_token_loss=True)
    out.loss.backward()   # out.z_loss, out.token_loss [B, T-1]: detached, for logging

Where the logits would not fit (an LLM's vocabulary), the fused linear entry takes the last
hidden states and the output weight instead, and never builds them:

    loss = weighted_linear_loss(hidden, model.lm_head.weight, batch["input_ids"],
                                keywords=keytoken_ids)   # gradients to hidden and the weight

The forward computes the loss and the gradient w.r.t. the logits together and keeps the
gradient (one tensor of the logits' shape, in their dtype; float32 for float16 logits unless
``kept_grad_dtype`` says otherwise) until the backward, which scales it by the upstream gradient
(in place, or rounding the float32 one once into float16). When the logits do not require a
gradient (or under ``torch.no_grad()``) only the loss is computed and nothing is kept.
"""
import contextlib
import math
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _cpu_pool, _native
from ._linear import _check_devices as _check_linear_devices
from ._linear import _linear_op, linear_mode_string
from ._ops import _check_devices, _check_kinds, _loss_op, mode_string, refuse_transforms

__version__ = _native.__version__

__all__ = [
    "keytoken_weighted_loss",
    "weighted_loss",
    "weighted_linear_loss",
    "LossOutput",
    "cuda_available",
    "cuda_unavailable_reason",
    "built_with_cuda",
    "clear_gradient_pool",
]


class LossOutput(NamedTuple):
    """What ``weighted_loss(..., return_per_sample=True)`` (or ``return_token_loss=True``)
    returns. Only ``loss`` carries a gradient; the other fields are detached."""

    loss: Tensor
    """The batch loss, float32 0-d, with a gradient to the logits."""
    per_sample_loss: Tensor
    """Each sample's mean per-token loss (token weights applied) before the sample weight,
    float64 [B]."""
    weights: Tensor
    """Each sample's weight ``alpha * (1 + sum_k weight_k * count_k)``, float64 [B]."""
    z_loss: Tensor
    """The z-loss part of ``loss`` (reduced like the loss), float64 0-d; 0 when ``z_loss=0``."""
    token_loss: Optional[Tensor] = None
    """With ``return_token_loss=True``: each position's loss, float32 [B, T-1] (the course
    function's ``CrossEntropyLoss(reduction="none")`` intermediate, with label smoothing and
    z-loss, before token and sample weights; 0 where the label is ignored); else None."""


def _index(name, value):
    """``value`` as a 64-bit int: an int (or anything with ``__index__``, not a bool or float)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {value!r}")
    v = int(value.__index__())
    if not -(1 << 63) <= v < (1 << 63):
        raise ValueError(f"{name} = {v} does not fit in 64 bits")
    return v


def _keyword_lists(keywords, keyword_weights):
    if isinstance(keywords, Tensor):
        keywords = keywords.tolist()
    try:
        ids = [_index("a keyword id", k) for k in keywords]
    except TypeError:
        raise TypeError(f"keywords must be a sequence of int token ids, got {keywords!r}") from None
    if keyword_weights is None:
        return ids, [1.0] * len(ids)
    if isinstance(keyword_weights, Tensor):
        keyword_weights = keyword_weights.tolist()
    try:
        weights = [float(w) for w in keyword_weights]
    except (TypeError, ValueError):
        raise TypeError(f"keyword_weights must be a sequence of floats, got {keyword_weights!r}") from None
    return ids, weights


def _check_alpha(alpha) -> None:
    """``alpha`` is a number, not a tensor that requires grad: the sample weights are constants of
    the op, so such a tensor would get no gradient, silently (the course function, which
    multiplies by it, gives it one)."""
    if isinstance(alpha, Tensor) and alpha.requires_grad:
        raise TypeError("alpha must be a float (a tensor that requires grad would get no gradient from this op)")


def _alpha(alpha):
    """``(alpha for the op's mode, factor applied to the op's outputs or None)``.

    Eager calls put ``alpha`` into the op's mode string. Under ``torch.compile``, once a second
    value of ``alpha`` has been seen, dynamo passes it as a symbolic float; written into the
    mode string it would be specialised again: one compilation per value, and eager fallback
    after eight. Every output the weights reach is linear in ``alpha`` (the weights, and the
    loss, z-loss part and gradients unless ``reduction="weighted_mean"``, where it cancels), so
    while tracing the op runs with ``alpha = 1`` and the graph multiplies by ``alpha``: one
    compilation serves every positive finite value. Other values (0, negative, NaN, infinite)
    are specialised and go to the op as in eager mode, which computes 0 or raises the crate's
    error."""
    if torch.compiler.is_compiling() and alpha > 0 and alpha < math.inf:  # guards on the range
        return 1.0, alpha
    return float(alpha), None


def _scaled_by_alpha(scale, reduction, loss, weights, z):
    """``loss, weights, z`` of an op that ran with ``alpha = 1``, times ``scale`` (see
    :func:`_alpha`; None: unchanged)."""
    if scale is None:
        return loss, weights, z
    # spelled as the crate reads it: any case, "-" or "_" (an unknown one raised in the op)
    if reduction.lower().replace("-", "_") == "weighted_mean":
        return loss, weights * scale, z
    return loss * scale, weights * scale, z * scale


def weighted_loss(
    logits: Tensor,
    ids: Tensor,
    *,
    labels: Optional[Tensor] = None,
    keywords: Iterable[int] = (),
    keyword_weights: Optional[Sequence[float]] = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    row_mean: str = "all",
    reduction: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    token_weights: Optional[Tensor] = None,
    check_finite: bool = False,
    check_ids: bool = False,
    return_per_sample: bool = False,
    return_token_loss: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    data_group=None,
    chunk_rows: Optional[int] = None,
    kept_grad_dtype: Optional[torch.dtype] = None,
):
    """The keyword-weighted loss of ``logits`` [B, T, V] (float32, float16 or bfloat16) for
    ``ids`` [B, T] (int64 or int32), with the crate's options.

    Position t of sample b predicts ``labels[b, t+1]`` (the labels default to the ids, which may
    then hold ``ignore_index`` as the course function allows; a label equal to ``ignore_index``
    has no target). Sample b's loss is the mean of its per-token
    cross-entropies (``row_mean="all"``: over the T-1 positions, ignored ones counting 0;
    ``"valid"``: over its non-ignored targets); its weight is
    ``alpha * (1 + sum_k keyword_weights[k] * count(ids[b] == keywords[k]))``; the batch loss is
    ``mean_b(loss_b * w_b)`` (``reduction="mean"``), ``sum_b(loss_b * w_b) / sum_b(w_b)``
    (``"weighted_mean"``) or ``sum_b(loss_b * w_b)`` (``"sum"``).

    Options of current trainers, each off by default and computed in the same fused pass, in
    this order (``z`` a row of logits, ``lse`` its log-sum-exp, ``y`` the target, V the vocabulary):

    - ``softcap=c`` (Gemma 2): the loss sees ``c * tanh(z / c)`` instead of ``z``; ``c > 0``.
    - ``label_smoothing=eps`` in [0, 1]: each token's loss is
      ``(1 - eps) * (lse - z[y]) + eps * (lse - mean(z))``, as
      ``torch.nn.functional.cross_entropy(label_smoothing=eps)``.
    - ``z_loss=k >= 0`` (PaLM): ``k * lse**2`` added to each token's loss; its part of the batch
      loss is ``LossOutput.z_loss``.
    - ``token_weights``: float32 [B, T] on the logits' device, aligned with the labels:
      ``token_weights[b, t+1]`` multiplies the loss of position t (the one predicting
      ``labels[b, t+1]``) before the row mean, combined with the keyword sample weights;
      ``token_weights[:, 0]`` is not used. Values must be finite; they take no gradient.

    Returns the loss as a float32 0-d tensor; with ``return_per_sample=True`` a
    :class:`LossOutput` (loss, per-sample losses, weights, z-loss part); with
    ``return_token_loss=True`` a :class:`LossOutput` whose ``token_loss`` also holds the
    [B, T-1] per-token losses (``reduction="none"`` of the course function's cross-entropy),
    written by the same fused call. Non-contiguous inputs, and views whose data does not start
    at a multiple of their element size, are copied first.
    Bad inputs raise ``ValueError`` / ``TypeError`` with the crate's message. On CUDA the call
    never waits for the device (except, with ``data_group``, on a rank without samples, and the
    first call with each ``process_group``, which checks once that the slices tile the
    vocabulary): ids
    or labels outside the vocabulary are then treated as positions without a target (and non-finite token weights are not reported), unless
    ``check_ids=True`` (or ``check_finite=True``), which waits for the kernels and raises
    ``ValueError`` as on CPU. At most 64 keywords on CUDA. ``keywords`` and ``keyword_weights``
    are host values: sequences, or tensors read to the host on every call (a CUDA tensor there
    waits for the device: pass a list, as the course does; under ``torch.compile`` with
    ``fullgraph=True`` a tensor there fails to trace: pass a list).

    ``kept_grad_dtype``: the dtype of the gradient the forward keeps until the backward,
    ``torch.float32`` or the logits' dtype; by default float32 for float16 logits and the logits'
    dtype otherwise. A float32 gradient kept for 16-bit logits is multiplied by the upstream
    gradient (a ``GradScaler`` loss scale) and rounded once to the logits' dtype in the
    backward, so that its small entries survive loss scaling as in PyTorch's own float16
    backward; it costs twice the memory of a float16 one and a pass to round it. Kept in
    float16 (``kept_grad_dtype=torch.float16``) it is rounded at scale 1: entries below
    float16's range (6e-8) are 0 whatever the loss scale.

    Beyond one device (``torch.distributed``, NCCL for CUDA tensors, gloo for CPU tensors):

    - ``process_group``: vocabulary-parallel. This rank's ``logits`` hold the vocabulary slice
      ``[vocab_start, vocab_start + logits.shape[-1])`` of a vocabulary of ``vocab_size``
      (defaults: Megatron-LM's equal slices in rank order, ``rank * V_r`` and ``ranks * V_r``);
      ids, labels, keywords and token weights are global and the same on every rank of the group.
      Every rank returns the loss over the whole vocabulary; the gradient is that of this rank's
      slice. The slices are checked to tile the vocabulary, without gaps or overlaps, and every
      rank to name the same ``vocab_size``: on CPU tensors on every call, with the check that
      every rank holds ids of the same ``[B, T]`` (a ``ValueError`` on every rank otherwise); on
      CUDA tensors the first time each rank uses the group (the check is a collective that waits
      for the device; ``[B, T]`` is not checked there).
    - On CPU tensors an error of one rank's own inputs, found by this package's checks or the
      crate's, raises on every rank of its groups: that rank's own exception there, a
      ``ValueError`` naming it on the others (none waits for it in an exchange). On CUDA tensors
      such an error leaves the other ranks waiting for this one.
    - ``data_group``: data-parallel. This rank holds some samples; ``reduction="mean"`` divides
      by the global batch and ``"weighted_mean"`` by the global sum of weights, so that loss and
      gradients equal the single-device result on the concatenated batch, and every rank returns
      that loss (per-sample outputs are this rank's samples). DDP, which averages gradients over
      its ranks, then needs the loss scaled by the data-parallel size. A rank may hold no
      samples (``[0, T, V]`` logits): it returns the others' loss and an empty gradient.
    - both: a 2-D grid of ranks. ``chunk_rows``: rows per exchange of the vocabulary group (the
      same on every rank; at least 1; None, the default: on CPU tensors, chunks of 8 MiB of kept
      exponentials, few exchanges since each costs a collective's latency; on CUDA tensors, the
      device split's default).

    Every rank of a group makes the same call: on CPU tensors, ranks of a vocabulary group with
    other loss options, ``chunk_rows``, ids, or labels or token weights past each sample's first
    position (which is never a target), and ranks of a data group
    with other loss options, raise the same ``ValueError`` on every rank (the first exchange
    compares a digest of each); on CUDA tensors only the slices are compared.

    Per call each rank sends ``8 * W`` bytes per row to its vocabulary group on CPU (``W`` = 3, 4
    with label smoothing, 5 with soft-capping; and 24 per exchange, 64 in the first: the slice,
    ``[B, T]`` and the digests) and ``4 * W`` on CUDA (``W`` = 3, 5 with label smoothing), and
    to its data group 24 bytes then 16 on CPU, 16 twice on CUDA. This path is an eager autograd function (``torch.compile`` breaks the
    graph around it).
    """
    refuse_transforms()
    sharded = process_group is not None or data_group is not None
    # (a split: this rank's errors here fail its groups, not only this rank: see _fails_together)
    with _fails_together(sharded, process_group, data_group, logits):
        if not isinstance(logits, Tensor) or not isinstance(ids, Tensor):
            raise TypeError("logits and ids must be torch tensors")
        for name, t in (("labels", labels), ("token_weights", token_weights)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch tensor or None")
        _check_devices(logits, ids, labels, token_weights)
        # dense CPU/CUDA tensors first: `.contiguous()` of a sparse or nested tensor raises torch's
        # own error, not the ValueError promised
        _check_kinds({"logits": logits, "ids": ids, "labels": labels, "token_weights": token_weights})
        if not sharded:
            _whole_vocabulary(logits.shape[-1] if logits.dim() == 3 else None, vocab_start, vocab_size)
        kw, kww = _keyword_lists(keywords, keyword_weights)
        ignore_index = _index("ignore_index", ignore_index)
        _check_alpha(alpha)
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        chunk_rows = _chunk_rows(chunk_rows)  # checked with or without a group
        grad_f32 = _grad_f32(logits, kept_grad_dtype)
        outputs = bool(return_per_sample) or bool(return_token_loss)
        if sharded:
            split = _sharded_args(logits, ids, labels, token_weights, process_group, data_group, vocab_start,
                                  vocab_size, chunk_rows, compute_grad, grad_f32, outputs, bool(return_token_loss),
                                  bool(check_ids),
                                  (kw, kww, float(alpha), ignore_index, str(row_mean), str(reduction),
                                   bool(check_finite), float(z_loss), float(label_smoothing),
                                   None if softcap is None else float(softcap)))
    if sharded:
        return _sharded(*split, outputs, bool(return_token_loss))
    alpha, scale = _alpha(alpha)
    loss, per, weights, z, token_loss, _ = _loss_op(
        logits.contiguous(),
        ids.contiguous(),
        labels.contiguous() if labels is not None else None,
        token_weights.detach().contiguous() if token_weights is not None else None,
        kw,
        kww,
        mode_string(str(row_mean), str(reduction), compute_grad, outputs, bool(check_ids), bool(check_finite),
                    token_loss=bool(return_token_loss), grad_f32=grad_f32, alpha=alpha, ignore_index=ignore_index,
                    z_loss=float(z_loss), label_smoothing=float(label_smoothing),
                    softcap=None if softcap is None else float(softcap)),
    )
    loss, weights, z = _scaled_by_alpha(scale, str(reduction), loss, weights, z)
    if outputs:
        return LossOutput(loss, per, weights, z, token_loss if return_token_loss else None)
    return loss


def _whole_vocabulary(vocab: Optional[int], vocab_start, vocab_size) -> None:
    """Without a group (no split) ``vocab_start`` and ``vocab_size`` may only describe the whole
    vocabulary ``vocab`` (the logits' last dimension or the weight's rows; None where the
    tensor's rank is wrong, which the native call reports): code that always passes them still
    gets the registered op, which ``torch.compile`` traces."""
    if vocab is not None and (vocab_start is not None or vocab_size is not None):
        from . import _dist

        _dist.slice_of(vocab, None, vocab_start, vocab_size)


# what autocast casts (float64 it leaves as it is)
_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs a linear layer in on ``device``'s type, or None outside
    an autocast region (torch >= 2.4's per-device-type functions; the older per-device ones
    where those are missing)."""
    kind = device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except (AttributeError, TypeError):
        if kind == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _grad_f32(logits: Tensor, kept_grad_dtype) -> bool:
    """Whether the forward keeps a float32 gradient of 16-bit ``logits`` (see
    ``weighted_loss``'s ``kept_grad_dtype``)."""
    if kept_grad_dtype is None:
        return logits.dtype == torch.float16
    if not isinstance(kept_grad_dtype, torch.dtype):
        raise TypeError(f"kept_grad_dtype must be a torch.dtype or None, got {kept_grad_dtype!r}")
    if kept_grad_dtype not in (torch.float32, logits.dtype):
        raise ValueError(f"kept_grad_dtype must be torch.float32 or the logits' dtype ({logits.dtype}), "
                         f"got {kept_grad_dtype}")
    return kept_grad_dtype == torch.float32 and logits.dtype != torch.float32


def _fails_together(sharded: bool, process_group, data_group, first):
    """Where a sharded call (``sharded``) makes this rank's checks before the crate's call, which
    makes the call's first exchanges: an exception raised there fails the call's groups before it
    propagates (``_dist.fails_together``), so that no peer waits for this rank in an exchange."""
    if not sharded:
        return contextlib.nullcontext()
    from . import _dist

    return _dist.fails_together(process_group, data_group, first)


def _sharded_args(logits, ids, labels, token_weights, process_group, data_group, vocab_start, vocab_size,
                  chunk_rows, compute_grad, grad_f32, outputs, return_token_loss, check_ids, options):
    """The checked arguments of the split's autograd function (see :func:`_sharded`)."""
    from . import _dist

    _dist.check_members(process_group, data_group)
    _dist.check_logits(logits)
    params = dict(
        check=check_ids,
        options=options,
        process_group=process_group,
        data_group=data_group,
        slice_=_dist.resolve_slice(logits, process_group, vocab_start, vocab_size),
        chunk_rows=chunk_rows,
        compute_grad=compute_grad,
        grad_f32=grad_f32,
        want_per_sample=outputs,
        want_token_loss=return_token_loss,
    )
    args = (
        logits.contiguous(),
        ids.contiguous(),
        labels.contiguous() if labels is not None else None,
        token_weights.detach().contiguous() if token_weights is not None else None,
    )
    return args, params


def _sharded(args, params, outputs, return_token_loss):
    from . import _dist

    loss, per, weights, z, token_loss = _dist.ShardedLoss.apply(*args, params)
    if outputs:
        return LossOutput(loss, per, weights, z, token_loss if return_token_loss else None)
    return loss


def _optional_int(name, value):
    """None, or ``value`` as a 64-bit int (:func:`_index`: not a bool or a float)."""
    if value is None:
        return None
    try:
        return _index(name, value)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {value!r}") from None


def _chunk_rows(value):
    """``chunk_rows`` (the split's rows per exchange, the fused linear path's rows per chunk): None
    (the default) or at least 1."""
    rows = _optional_int("chunk_rows", value)
    if rows is not None and rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 (or None for the default), got {rows}")
    return rows


def weighted_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    labels: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    keywords: Iterable[int] = (),
    keyword_weights: Optional[Sequence[float]] = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    row_mean: str = "all",
    reduction: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    token_weights: Optional[Tensor] = None,
    chunk_rows: Optional[int] = None,
    chunk_budget: Optional[int] = None,
    accumulate_f32: bool = True,
    check_finite: bool = False,
    check_ids: bool = False,
    return_per_sample: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    data_group=None,
    reduce_hidden_grad: bool = True,
):
    """:func:`weighted_loss` of the logits ``hidden @ weight.T + bias``, computed without ever
    holding them: the last hidden states ``hidden`` ([B, T, H] or [B*T, H]), the output weight
    ``weight`` ([V, H]: an ``nn.Linear(H, V)`` head's weight, or a tied input embedding) and an
    optional ``bias`` [V], all float32, float16 or bfloat16 alike (inside ``torch.autocast``
    they are cast to autocast's dtype first, as the head's ``F.linear`` would be, so float32
    parameters with autocast's 16-bit hidden states work); ``ids`` (and ``labels``,
    ``token_weights``) [B, T] as for :func:`weighted_loss`, whose options this takes too.

    The forward cuts the B*T token rows into chunks, and per chunk computes the chunk's logits
    (float32), turns them into their gradient in place, and adds the chunk's part of the
    gradients of hidden, weight and bias, for those of them that require a gradient; the
    backward only scales those gradients by the upstream gradient. Memory beyond inputs and
    gradients: the chunk buffers (a fixed budget: 24 MiB on CPU whatever the thread count, 160 MiB on CUDA) instead
    of the B*T*V logits and their gradient. ``chunk_rows`` (rows per chunk) or ``chunk_budget``
    (bytes of chunk buffers) sets the chunking instead; the results do not depend on it beyond
    rounding. With 16-bit inputs the gradients of weight and bias are summed over the chunks in
    float32 and rounded once (``accumulate_f32=False``: in their own dtype, once per chunk,
    which saves a float32 copy of the weight's size during the forward). With float16 inputs
    all three gradients stay float32 until the backward, which multiplies them by the upstream
    gradient (a ``GradScaler`` loss scale) before rounding them to float16, as PyTorch's own
    float16 backward does; with ``accumulate_f32=False`` they are float16 from the forward on,
    at scale 1, and entries below float16's range (6e-8) are 0 whatever the loss scale.

    A tied embedding (``weight`` also the input embedding's weight) needs nothing special: the op
    returns this loss's part of the weight's gradient and autograd adds the embedding's.

    Returns the float32 0-d loss, or with ``return_per_sample=True`` a :class:`LossOutput`
    (``token_loss`` None). Bad inputs raise ``ValueError`` / ``TypeError`` with the crate's
    message; CUDA tensors as in :func:`weighted_loss` (``check_ids``).

    Beyond one device (``torch.distributed``: NCCL for CUDA tensors, gloo for CPU tensors):
    ``process_group`` (vocabulary-parallel: ``weight`` and
    ``bias`` hold this rank's rows ``[vocab_start, vocab_start + weight.shape[0])`` of a
    vocabulary of ``vocab_size``, defaults as in :func:`weighted_loss`; ``hidden``, ids, labels
    and token weights the same on every rank of the group) and ``data_group``
    (data-parallel), with :func:`weighted_loss`'s semantics. The gradients of weight and bias are
    those of this rank's rows; the gradient of ``hidden`` is summed over the vocabulary group
    (one ``all_reduce`` of ``B*T*H`` numbers in the forward) unless ``reduce_hidden_grad=False``,
    which leaves this rank's part, for a model whose layer all-reduces it in its own backward
    (Megatron-LM's ``copy_to_tensor_model_parallel_region``). Each rank sends its vocabulary
    group 24 bytes per row with a target (32 with label smoothing, 40 with soft-capping) on CPU tensors, 12 bytes per
    row (20) on CUDA tensors, one all-gather per chunk of rows (CUDA: per logits product, a
    quarter of a chunk for 16-bit inputs). This path is an eager ``torch.autograd.Function``.
    """
    refuse_transforms()
    sharded = process_group is not None or data_group is not None
    # (a split: this rank's errors here fail its groups, not only this rank: see _fails_together)
    with _fails_together(sharded, process_group, data_group, hidden):
        named = dict(weight=weight, ids=ids)
        for name, t in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch tensor")
        if not isinstance(hidden, Tensor):
            raise TypeError("hidden must be a torch tensor")
        for name, t in (("bias", bias), ("labels", labels), ("token_weights", token_weights)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch tensor or None")
        _check_linear_devices(hidden, dict(named, bias=bias, labels=labels, token_weights=token_weights))
        _check_kinds(dict(named, hidden=hidden, bias=bias, labels=labels, token_weights=token_weights))
        if not sharded:
            _whole_vocabulary(weight.shape[0] if weight.dim() == 2 else None, vocab_start, vocab_size)
        # inside torch.autocast the head runs in autocast's dtype, as nn.Linear's F.linear would
        # (float32 parameters with 16-bit hidden states are then no dtype mismatch); autograd
        # carries the casts' gradients back to the parameters' dtype
        cast = _autocast_dtype(hidden.device)
        if cast is not None:
            hidden, weight, bias = (t.to(cast) if t is not None and t.dtype in _AUTOCAST_FROM and t.dtype != cast else t
                                    for t in (hidden, weight, bias))
        kw, kww = _keyword_lists(keywords, keyword_weights)
        ignore_index = _index("ignore_index", ignore_index)
        _check_alpha(alpha)
        grad_on = torch.is_grad_enabled()
        grads = "".join(flag for flag, t in zip("hwb", (hidden, weight, bias))
                        if grad_on and t is not None and t.requires_grad)
        args = (
            hidden.contiguous(),
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            ids.contiguous(),
            labels.contiguous() if labels is not None else None,
            token_weights.detach().contiguous() if token_weights is not None else None,
        )
        alpha, scale = _alpha(alpha)
        mode = linear_mode_string(str(row_mean), str(reduction), grads, bool(return_per_sample), bool(check_ids),
                                  bool(check_finite), accumulate_f32=bool(accumulate_f32),
                                  chunk_rows=_chunk_rows(chunk_rows),
                                  chunk_budget=_optional_int("chunk_budget", chunk_budget), alpha=alpha,
                                  ignore_index=ignore_index, z_loss=float(z_loss),
                                  label_smoothing=float(label_smoothing),
                                  softcap=None if softcap is None else float(softcap))
        if sharded:
            from . import _dist

            _dist.check_members(process_group, data_group)
            params = dict(process_group=process_group, data_group=data_group, keywords=kw, keyword_weights=kww,
                          mode=mode, reduce_hidden_grad=bool(reduce_hidden_grad),
                          slice_=_dist.slice_of(weight.shape[0] if weight.dim() == 2 else 0, process_group,
                                                  vocab_start, vocab_size))
    if sharded:
        loss, per, weights, z = _dist.ShardedLinear.apply(*args, params)
    else:
        loss, per, weights, z, *_ = _linear_op(*args, kw, kww, mode)
    loss, weights, z = _scaled_by_alpha(scale, str(reduction), loss, weights, z)
    if return_per_sample:
        return LossOutput(loss, per, weights, z, None)
    return loss


def keytoken_weighted_loss(inputs: Tensor, logits: Tensor, keytoken_ids: Iterable[int], alpha: float = 1.0) -> Tensor:
    """The Hugging Face course's ``keytoken_weighted_loss(inputs, logits, keytoken_ids, alpha)``:
    shifted next-token cross-entropy, mean per sample, each sample weighted by
    ``alpha * (1 + number of keyword occurrences in its inputs)``, mean over the batch.

    A drop-in replacement (same signature and semantics; the loss is float32 whatever the logits'
    dtype), computed with the gradient in one fused pass. See :func:`weighted_loss` for the
    options and the error behaviour.
    """
    return weighted_loss(logits, inputs, keywords=keytoken_ids, alpha=alpha)


def built_with_cuda() -> bool:
    """Whether this build carries the CUDA kernels (the ``cuda`` feature)."""
    return _native.built_with_cuda()


def cuda_unavailable_reason() -> Optional[str]:
    """Why CUDA tensors cannot be used here (no ``cuda`` build, no driver, no device), or None."""
    return _native.cuda_unavailable_reason()


def cuda_available() -> bool:
    """Whether CUDA tensors can be passed (a ``cuda`` build, a driver and a device)."""
    return cuda_unavailable_reason() is None


def clear_gradient_pool() -> None:
    """Frees the idle blocks of the CPU gradient pool (large CPU gradients come from a pool of at
    most four blocks, reused across steps; a block still in use is freed once it is dropped)."""
    _cpu_pool.clear()

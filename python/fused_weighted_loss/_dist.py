"""The loss when the vocabulary (``process_group``: vocabulary-parallel, Megatron-LM's layout)
and/or the batch (``data_group``: data-parallel) are split between ranks, with the exchanges done
by ``torch.distributed`` (NCCL for CUDA tensors, gloo for CPU tensors).

The crate's split (``fused_weighted_loss::parallel``) runs in chunks of rows: the statistics of a
chunk (a few numbers per row: max, sum of exponentials, the target logit if this rank holds it, with
label smoothing the logit sum, on CUDA as the sum of z - max and the slice's length) are
all-gathered over the vocabulary group (on the CPU while later chunks are computed), then merged in
rank order, the same bits on every rank, and the gradient of this rank's
slice written. Data-parallel denominators (global ``B`` and ``sum w_b``) are all-gathered before
the logits are read; the loss shares at the end, so that every rank returns the loss of the whole
batch. Both run as the crate's one call, with the GIL released, its exchanges calling back into
``torch.distributed`` here: ``parallel::Sharded`` for CPU tensors, ``cuda::split::DeviceSharded``
for CUDA tensors (and their ``linear_loss_and_grad`` for the fused linear split).

This path is an eager ``torch.autograd.Function`` (``torch.compile`` breaks the graph around it).
"""
import contextlib
import weakref
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _cpu_pool, _native
from ._ops import _aligned, _arg, _device_arg, _ptr, _wide, logits_grad

# groups whose slices were checked on CUDA tensors, held weakly: the decision to skip the check
# must be the same on every rank, and the first call on a group is the one call every rank knows
# to be first (a key with this rank's own slice let a rank that kept its slice skip the
# all-gather its re-tiled peers ran). A group torch has let go of leaves the table with it (a
# table of strong references kept every group it ever saw alive, and an id of a dead group can
# be a new group's); a group that takes no weak reference is checked on every call.
_TILED: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()


def _was_tiled(group) -> bool:
    """Whether ``group``'s slices were checked already (see ``_TILED``)."""
    try:
        return group in _TILED
    except TypeError:
        return False


def _remember_tiled(group) -> None:
    """Notes that ``group``'s slices tile the vocabulary, without keeping it alive."""
    try:
        _TILED[group] = True
    except TypeError:
        pass


def _size(group) -> int:
    return dist.get_world_size(group)


def _gather(t: Tensor, group) -> Tensor:
    """All-gather ``t`` (1-d) over ``group`` in rank order."""
    out = t.new_empty((t.numel() * _size(group),))
    dist.all_gather_into_tensor(out, t, group=group)
    return out


def _check_tiling(group, start: int, length: int, vocab: int, device: torch.device) -> None:
    """Every rank's slice covers [0, vocab) exactly once, and every rank names the same vocab:
    on CUDA tensors, whose device calls do not check it, on the first call on each group only
    (reading the result waits for the device, which the later calls do not do). (The host
    calls, on CPU tensors, check it in their own first exchange, with every rank's [B, T].)
    ``device``: the tensors' device, where the three numbers are gathered (NCCL through the
    current CUDA device: made that one for the check). A tensor all-gather, not
    ``all_gather_object``, whose pickling needs NumPy, which torch does not."""
    cuda = device.type == "cuda"
    if cuda and _was_tiled(group):
        return
    mine = torch.tensor([start, length, vocab], dtype=torch.int64, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        flat = _gather(mine, group).tolist()
    gathered = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
    vocabs = sorted({v for _, _, v in gathered})
    if len(vocabs) > 1:
        raise ValueError(f"the ranks of the vocabulary group name different vocabularies ({vocabs}): "
                         "vocab_size must be the same on every rank")
    slices = [(s, n) for s, n, _ in gathered]
    # sorted by start, each slice must begin where the one before ended: no gap, no overlap
    covered = 0
    for s, n in sorted(slices):
        if s != covered:
            covered = -1
            break
        covered = s + n
    if covered != vocab or any(n <= 0 for _, n in slices):
        raise ValueError(f"the vocabulary slices of the group (start, len in rank order: {slices}) do not tile "
                         f"[0, {vocab})")
    if cuda:
        _remember_tiled(group)


@contextlib.contextmanager
def fails_together(process_group, data_group, first):
    """Around this rank's checks of a sharded call before the crate's call (which makes the
    call's first exchanges): an exception raised in them, with host tensors (``first``: the
    logits or hidden states, CPU or not a tensor at all), first takes part in those exchanges as
    a rank that failed (``_native.fail_split``: the crate's ``Sharded::fail_with``, the same
    collectives as the peers' calls make), so that the peers raise the crate's ``PeerFailed``
    (a ``ValueError`` naming this rank) instead of waiting for it; then it propagates (or, if
    that exchange itself fails, what it raised, chained to it). The native call does the same
    with its own checks. On CUDA tensors it propagates at once: the device calls have no words
    for a failed rank (their exchanges are device all-gathers that nothing reads on the host),
    so a peer whose own checks pass still waits for this rank."""
    try:
        yield
    except Exception:
        if not (isinstance(first, Tensor) and first.is_cuda) and (process_group is not None or data_group is not None):
            # (the slice does not travel in a failed rank's words: any)
            _native.fail_split(((0, 1, 1), _group_arg(process_group), _group_arg(data_group)))
        raise


def check_logits(logits: Tensor) -> None:
    """This rank's logits for the split: rank 3, and on CUDA a build with CUDA support."""
    if logits.dim() != 3:
        raise ValueError(f"logits must have rank 3 [batch, seq, vocab slice], got {list(logits.shape)}")
    if logits.device.type == "cuda" and not _native.built_with_cuda():
        raise RuntimeError("this build of fused_weighted_loss has no CUDA support (build it with the `cuda` feature)")


def resolve_slice(logits: Tensor, process_group, vocab_start: Optional[int], vocab_size: Optional[int]):
    """(start, len, vocab) of this rank's logits: given, or Megatron-LM's equal slices in rank
    order (start = rank * V_r, vocab = ranks * V_r)."""
    return slice_of(logits.shape[-1] if logits.dim() == 3 else 0, process_group, vocab_start, vocab_size)


def slice_of(length: int, process_group, vocab_start: Optional[int], vocab_size: Optional[int]):
    """(start, len, vocab) of this rank's ``length`` vocabulary ids (logits' columns or weight
    rows): given, or Megatron-LM's equal slices in rank order."""
    if process_group is None:
        if vocab_start not in (None, 0) or vocab_size not in (None, length):
            raise ValueError("vocab_start and vocab_size need a process_group (the vocabulary group)")
        return 0, length, length
    rank, ranks = dist.get_rank(process_group), _size(process_group)
    start = rank * length if vocab_start is None else _count("vocab_start", vocab_start)
    vocab = ranks * length if vocab_size is None else _count("vocab_size", vocab_size)
    return start, length, vocab


def _count(name: str, value) -> int:
    """``value`` as an int in ``[0, 2^63)``: a TypeError for a bool or a float (2.7 was taken as
    2), a ValueError for a negative one (which the native call's conversion refused with a
    TypeError or OverflowError after this rank's checks, its peers left waiting in gloo)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    v = int(value.__index__())
    if not 0 <= v < (1 << 63):
        raise ValueError(f"{name} must be in [0, 2^63), got {v}")
    return v


def sharded_forward(logits: Tensor, ids: Tensor, labels: Optional[Tensor], token_weights: Optional[Tensor],
                    options: tuple, process_group, data_group, slice_: Tuple[int, int, int],
                    chunk_rows: Optional[int], compute_grad: bool, want_per_sample: bool, want_token_loss: bool,
                    check: bool = False, grad_f32: bool = False):
    """Runs the split as the crate's one call (``parallel::Sharded`` for CPU tensors,
    ``cuda::split::DeviceSharded`` for CUDA tensors) with the GIL released, its exchanges calling
    back into ``torch.distributed`` from the calling thread: on the CPU the pool's threads run up
    to two chunks ahead meanwhile; on CUDA the crate's numbers go through torch tensors on torch's current
    stream (``_DeviceExchange``). ``check`` (CUDA): wait for the kernels and report bad ids.
    ``grad_f32``: the gradient in float32 whatever the logits' dtype. Returns (loss f32,
    per_sample, weights, z_loss f64, token_loss, grad)."""
    start, length, vocab = slice_
    logits, ids, labels, token_weights = (_aligned(t) for t in (logits, ids, labels, token_weights))
    b, t, _ = logits.shape  # (checked by check_logits)
    cuda = logits.device.type == "cuda"
    if cuda and process_group is not None:
        # the device call does not check that the slices tile the vocabulary (the host call
        # does, in its first exchange); the same message on every path
        _check_tiling(process_group, start, length, vocab, logits.device)
    new = logits.new_empty
    loss = new((), dtype=torch.float32)
    per = new((b if want_per_sample else 0,), dtype=torch.float64)
    weights = new((b if want_per_sample else 0,), dtype=torch.float64)
    z_loss = new((), dtype=torch.float64)
    token_loss = new((b, max(t - 1, 0)) if want_token_loss else (0,), dtype=torch.float32)
    # on CUDA every position's loss ([B, T] float64) comes back, narrowed on the stream below
    rows = new((b, t), dtype=torch.float64) if cuda and want_token_loss else token_loss
    if not compute_grad:
        grad = new((0,))
    else:
        dtype = torch.float32 if grad_f32 else None
        grad = torch.empty_like(logits, dtype=dtype) if cuda else _cpu_pool.empty_like(logits, dtype)
    if cuda:
        groups = (_device_group_arg(process_group, logits.device), _device_group_arg(data_group, logits.device))
    else:
        groups = (_group_arg(process_group), _group_arg(data_group))
    _native.forward(
        (_arg(logits), _arg(ids), _arg(labels) if labels is not None else None,
         _arg(token_weights) if token_weights is not None else None),
        (_ptr(grad), loss.data_ptr(), _ptr(per), _ptr(weights), z_loss.data_ptr(), _ptr(rows),
         _wide(grad, logits)),
        options, _device_arg(logits), bool(check),
        ((start, length, vocab), *groups),
        # None is the default (checked >= 1 otherwise); at most every row at once
        None if chunk_rows is None else max(1, min(chunk_rows, b * t)),
    )
    if rows is not token_loss:
        token_loss.copy_(rows[:, :-1])
    return loss, per, weights, z_loss, token_loss, grad


class ShardedLoss(torch.autograd.Function):
    """The forward runs the split and keeps this rank's gradient; the backward scales it."""

    @staticmethod
    def forward(ctx, logits, ids, labels, token_weights, params):
        # params["compute_grad"] was decided by the caller (grad mode is off in here)
        loss, per, weights, z, token_loss, grad = sharded_forward(logits.detach(), ids, labels, token_weights, **params)
        ctx.mark_non_differentiable(per, weights, z, token_loss)
        ctx.save_for_backward(grad)
        ctx.fwl_dtype = logits.dtype
        return loss, per, weights, z, token_loss

    @staticmethod
    def backward(ctx, g_loss, *_):
        # as the plain path's: upstream 1 on the CPU hands out the kept gradient, no pass over it
        return logits_grad(ctx, g_loss), None, None, None, None


def _member(group) -> bool:
    """Whether this rank is in ``group`` (torch gives a rank of -1, and a size of -1, for a group
    it is not in)."""
    return group is not None and dist.get_rank(group) >= 0


def check_members(process_group, data_group) -> None:
    """This rank is a member of each group it names: of one it is not in, torch reports rank and
    size -1, which the native call refused with a TypeError naming neither group (and on CPU,
    outside this rank's checks, its peers in the other group left waiting)."""
    for name, group in (("process_group", process_group), ("data_group", data_group)):
        if group is not None and not _member(group):
            raise ValueError(f"{name}: this rank is not a member of the group (torch.distributed gives it rank -1)")


def _group_arg(group):
    """``(rank, size, all-gather)`` of ``group`` for the native split: the callable takes this
    rank's float64 numbers (a list) and returns every rank's, concatenated in rank order. A group
    this rank is not in (refused by ``check_members``; a failed rank's words go to the groups it
    is in) counts as none."""
    if not _member(group):
        return (0, 1, None)

    def gather(values):
        return _gather(torch.tensor(values, dtype=torch.float64), group).tolist()

    return (dist.get_rank(group), _size(group), gather)


class _DeviceExchange:
    """The all-gather of the native split on CUDA tensors, over ``group``: ``buffers(n, wide)``
    returns the device addresses of torch's own tensors for this rank's ``n`` numbers and every
    rank's (float64 when ``wide``, else float32); the crate copies its numbers in on torch's
    current stream, ``run()`` all-gathers them there, and the crate copies the result out. The
    tensors are torch's (the caching allocator's), kept for the next exchange of the call."""

    def __init__(self, group, device):
        self.group, self.device, self.size = group, device, _size(group)
        self.kept = {}
        self.last = None

    def buffers(self, n: int, wide: bool):
        send, recv = self.kept.get(wide, (None, None))
        if send is None or send.numel() < n:
            dtype = torch.float64 if wide else torch.float32
            send = torch.empty(max(n, 1), dtype=dtype, device=self.device)
            recv = torch.empty(max(n, 1) * self.size, dtype=dtype, device=self.device)
            self.kept[wide] = (send, recv)
        self.last = (send[:n], recv[:n * self.size])
        return send.data_ptr(), recv.data_ptr()

    def run(self):
        send, recv = self.last
        with torch.cuda.device(self.device):
            dist.all_gather_into_tensor(recv, send, group=self.group)


def _device_group_arg(group, device):
    """``(rank, size, exchange)`` of ``group`` for the native split on CUDA tensors (see
    ``_DeviceExchange``)."""
    if not _member(group):
        return (0, 1, None)
    return (dist.get_rank(group), _size(group), _DeviceExchange(group, device))


class ShardedLinear(torch.autograd.Function):
    """The fused linear split: the forward runs the crate's ``Sharded::linear_loss_and_grad``
    (CPU tensors) or ``DeviceSharded::linear_loss_and_grad`` (CUDA tensors) with the exchanges
    through ``torch.distributed`` and keeps the gradients (``d hidden`` summed over the
    vocabulary group unless told otherwise); the backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, labels, token_weights, params):
        from ._linear import linear_forward

        process_group, data_group = params["process_group"], params["data_group"]
        if hidden.device.type == "cuda":
            # the device call does not check that the slices tile the vocabulary: checked here
            if process_group is not None:
                _check_tiling(process_group, *params["slice_"], hidden.device)
            groups = (_device_group_arg(process_group, hidden.device), _device_group_arg(data_group, hidden.device))
        else:
            groups = (_group_arg(process_group), _group_arg(data_group))
        split = (params["slice_"], *groups)
        loss, per, weights, z, dh, dw, db = linear_forward(hidden, weight, bias, ids, labels, token_weights,
                                                           params["keywords"], params["keyword_weights"],
                                                           params["mode"], split)
        if process_group is not None and params["reduce_hidden_grad"] and dh.numel() > 0:
            dist.all_reduce(dh, group=process_group)
        ctx.mark_non_differentiable(per, weights, z)
        ctx.save_for_backward(dh, dw, db)
        ctx.fwl_dtype = hidden.dtype
        ctx.has_bias = bias is not None
        return loss, per, weights, z

    @staticmethod
    def backward(ctx, g_loss, *_):
        from ._linear import linear_grads

        return linear_grads(ctx, g_loss, 7)

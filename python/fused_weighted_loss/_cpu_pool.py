"""Reuse of large CPU gradient buffers from one step to the next.

The forward returns a new ``B·T·V`` gradient each step. On the CPU a new buffer of that size
costs its first touch: a page fault per 4 KiB page and the kernel zeroing every page, which can
cost several times the fused pass itself (measured in benches/python_overhead.py). torch's CUDA
caching allocator avoids this on GPUs; its CPU allocator does not. So large CPU gradients come
from a small pool: a block is handed out again only when no tensor other than the pool's own
uses its storage any more (the previous step's gradient was dropped, e.g. by
``optimizer.zero_grad()``); a gradient someone still holds (the tensor, a view of it, its storage
object) is never reused, nor one moved to shared memory to be sent to another process. A block
serves any gradient of half its size or more: a gradient's storage (the whole block) can be up
to twice the gradient, which ``torch.save`` and ``share_memory_()`` of it see.

At most four blocks are kept (the fused linear loss uses three at once with bfloat16 inputs:
``d hidden``, the float32 ``d weight`` it accumulates and the ``d weight`` it returns; with
float16 inputs it keeps float32 ``d hidden`` and ``d weight`` until the backward, which takes
two more for the float16 gradients it returns: the pool then allocates some of them anew).
Kept blocks stay allocated until :func:`clear` (``fused_weighted_loss.clear_gradient_pool()``)
drops them. ``FWL_CPU_GRAD_POOL=0`` in the environment turns the pool off (read when the
package is imported).
"""
import os
import sys
import threading

import torch

_MIN_BYTES = 1 << 20
_KEEP = 4

_lock = threading.Lock()
_blocks = []  # flat uint8 tensors, the most recently handed out last


def _storage_uses(t):
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _storage_refs(t):
    """References to the Python object of ``t``'s storage: someone holding only the storage
    (``g.untyped_storage()``) adds no use of it, but one reference to this object."""
    return sys.getrefcount(t.untyped_storage())


def _free_count():
    """The use count a block's storage shows when only the pool holds it (None: no pool)."""
    if os.environ.get("FWL_CPU_GRAD_POOL", "1") == "0" or not hasattr(torch._C, "_storage_Use_Count"):
        return None
    return _storage_uses(torch.empty(1, dtype=torch.uint8))


_FREE = _free_count()
_FREE_REFS = _storage_refs(torch.empty(1, dtype=torch.uint8))


def _is_free(block):
    """No tensor, storage object or other process uses the block but the pool (a block moved to
    shared memory, as torch.multiprocessing does to send it, is never reused)."""
    return _storage_uses(block) == _FREE and _storage_refs(block) == _FREE_REFS and not block.is_shared()


def _as(block, nbytes, like, dtype):
    return block[:nbytes].view(dtype).view(like.shape)


def empty_like(like, dtype=None):
    """An uninitialised contiguous CPU tensor of ``like``'s shape and dtype (or ``dtype``), from
    the pool when it is large."""
    dtype = like.dtype if dtype is None else dtype
    nbytes = like.numel() * dtype.itemsize
    if _FREE is None or nbytes < _MIN_BYTES or like.device.type != "cpu":
        return torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)
    with _lock:
        for i, block in enumerate(_blocks):
            if nbytes <= block.numel() <= 2 * nbytes and _is_free(block):
                _blocks.append(_blocks.pop(i))
                return _as(block, nbytes, like, dtype)
        block = torch.empty(nbytes, dtype=torch.uint8)
        if len(_blocks) >= _KEEP:
            free = [i for i, b in enumerate(_blocks) if _is_free(b)]
            if not free:
                return _as(block, nbytes, like, dtype)  # every kept block is in use: this one is not kept
            del _blocks[free[0]]
        _blocks.append(block)
        return _as(block, nbytes, like, dtype)


def clear():
    """Drops the kept blocks (their memory is freed once no gradient uses it)."""
    with _lock:
        _blocks.clear()

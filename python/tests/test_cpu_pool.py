"""The CPU gradient pool: a large gradient's memory is reused once nothing holds it, never while
something does, and every gradient it hands out is right."""
import os
import subprocess
import sys

import torch

import fused_weighted_loss as fwl
from fused_weighted_loss import _cpu_pool
from conftest import reference, rel_err

SHAPE = (2, 64, 4096)  # 2 MiB of f32: pooled


def case(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    ids = torch.randint(0, shape[2], shape[:2], generator=g)
    return logits, ids, [int(ids[0, 0]), 5]


def step(x, ids, keys):
    fwl.keytoken_weighted_loss(ids, x, keys).backward()
    return x.grad


def test_a_dropped_gradient_is_reused_and_right():
    _cpu_pool.clear()
    logits, ids, keys = case()
    _, _, _, ref = reference(logits, ids, keys)
    x = logits.clone().requires_grad_()
    first = step(x, ids, keys).data_ptr()
    x.grad = None
    x.data.mul_(1.0)  # same values
    g = step(x, ids, keys)
    assert g.data_ptr() == first
    assert rel_err(g, ref) <= 1e-5


def test_a_held_gradient_is_never_reused():
    _cpu_pool.clear()
    logits, ids, keys = case(1)
    x = logits.clone().requires_grad_()
    held = step(x, ids, keys)
    snapshot = held.clone()
    x.grad = None
    other = case(2)[0]
    y = other.clone().requires_grad_()
    g = step(y, ids, keys)
    assert g.data_ptr() != held.data_ptr()
    assert torch.equal(held, snapshot)
    _, _, _, ref = reference(other, ids, keys)
    assert rel_err(g, ref) <= 1e-5


def test_a_gradient_whose_storage_object_is_held_is_never_reused():
    """Holding only the storage object (no tensor) keeps the block out of the pool's hands."""
    _cpu_pool.clear()
    logits, ids, keys = case(1)
    x = logits.clone().requires_grad_()
    held = step(x, ids, keys).untyped_storage()
    snapshot = bytes(held[:4096])
    x.grad = None
    y = case(2)[0].clone().requires_grad_()
    step(y, ids, keys)
    assert bytes(held[:4096]) == snapshot


def test_a_gradient_moved_to_shared_memory_is_never_reused():
    """A block moved to shared memory (as sending the gradient to another process does) may
    still be read there once this process dropped it: the pool does not hand it out again."""
    _cpu_pool.clear()
    logits, ids, keys = case(1)
    x = logits.clone().requires_grad_()
    g = step(x, ids, keys)
    g.share_memory_()
    shared = g.data_ptr()
    del g
    x.grad = None
    y = case(2)[0].clone().requires_grad_()
    assert step(y, ids, keys).data_ptr() != shared


def test_accumulation_and_many_live_gradients():
    _cpu_pool.clear()
    logits, ids, keys = case(3)
    _, _, _, ref = reference(logits, ids, keys)
    x = logits.clone().requires_grad_()
    for _ in range(3):  # .grad kept and accumulated into, as without zero_grad
        step(x, ids, keys)
    assert rel_err(x.grad, 3 * ref) <= 1e-5
    live = []
    for k in range(5):
        y = logits.clone().requires_grad_()
        live.append(step(y, ids, keys))
    assert len({g.data_ptr() for g in live}) == 5
    assert len(_cpu_pool._blocks) <= _cpu_pool._KEEP
    for g in live:
        assert rel_err(g, ref) <= 1e-5


def test_smaller_shapes_reuse_a_block_larger_ones_do_not():
    _cpu_pool.clear()
    logits, ids, keys = case(4)
    x = logits.clone().requires_grad_()
    big = step(x, ids, keys).data_ptr()
    x.grad = None
    small_logits, small_ids = logits[:, :48].contiguous(), ids[:, :48].contiguous()
    y = small_logits.clone().requires_grad_()
    g = step(y, small_ids, keys)
    assert g.data_ptr() == big and g.shape == small_logits.shape
    _, _, _, ref = reference(small_logits, small_ids, keys)
    assert rel_err(g, ref) <= 1e-5
    # a larger shape than any free block: a new block, not the small one's (nor an overrun of it)
    y.grad = None
    del g
    large_logits = torch.cat([logits, logits], dim=1)
    large_ids = torch.cat([ids, ids], dim=1)
    z = large_logits.clone().requires_grad_()
    h = step(z, large_ids, keys)
    assert h.data_ptr() != big and h.shape == large_logits.shape
    _, _, _, ref = reference(large_logits, large_ids, keys)
    assert rel_err(h, ref) <= 1e-5


def test_the_pool_can_be_turned_off():
    code = "import fused_weighted_loss._cpu_pool as p; print(p._FREE)"
    env = dict(os.environ, FWL_CPU_GRAD_POOL="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    assert _cpu_pool._FREE is not None

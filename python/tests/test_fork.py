"""A process forked after the package's CPU work started (``multiprocessing``'s default start
method on Linux) computes what the parent does, instead of waiting forever on the parent's
thread pool, whose threads the fork did not copy (the crate's rayon pool; the child gets its
own)."""
import multiprocessing as mp
import sys

import pytest
import torch

import fused_weighted_loss as fwl

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork start method (Linux)")

_CASE = {}


def _case():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 8, 32000, generator=g) * 3
    ids = torch.randint(0, 32000, (8, 8), generator=g)
    hidden = torch.randn(8, 8, 48, generator=g)
    weight = torch.randn(3000, 48, generator=g) * 0.2
    return logits, ids, hidden, weight, torch.randint(0, 3000, (8, 8), generator=g)


def _compute():
    """Loss and gradient bits of the logits call and the fused linear call on ``_CASE``."""
    logits = _CASE["logits"].clone().requires_grad_()
    out = fwl.weighted_loss(logits, _CASE["ids"], keywords=[3, 7], softcap=30.0)
    out.backward()
    hidden = _CASE["hidden"].clone().requires_grad_()
    weight = _CASE["weight"].clone().requires_grad_()
    lin = fwl.weighted_linear_loss(hidden, weight, _CASE["linear_ids"], keywords=[3, 7])
    lin.backward()
    return [t.detach().clone() for t in (out, logits.grad, lin, hidden.grad, weight.grad)]


def _compare(parent):
    # one torch thread, as DataLoader workers run: torch's own OpenMP ops (this build's GNU
    # libgomp) wait forever in a child forked after the parent ran parallel regions
    torch.set_num_threads(1)
    return all(torch.equal(a, b) for a, b in zip(parent, _compute()))


def test_a_forked_worker_computes_the_parents_bits():
    _CASE["logits"], _CASE["ids"], _CASE["hidden"], _CASE["weight"], _CASE["linear_ids"] = _case()
    parent = _compute()  # the parent's thread pool starts here
    assert all(torch.isfinite(t).all() for t in parent)
    with mp.get_context("fork").Pool(1) as pool:
        # a hang fails here after two minutes instead of stopping the suite
        same = pool.apply_async(_compare, (parent,)).get(timeout=120)
    assert same, "the forked worker's loss or gradients differ from the parent's"

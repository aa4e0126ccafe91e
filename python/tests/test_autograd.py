"""Autograd: gradcheck, the upstream gradient, repeated backward, the loss-only forward."""
import pytest
import torch

import fused_weighted_loss as fwl
from conftest import Spy, random_case, reference, rel_err

GRADCHECK_OPTIONS = [
    dict(),
    dict(keywords=[1, 1, 4], alpha=0.75),
    dict(keywords=[2], keyword_weights=[2.5], reduction="weighted_mean"),
    dict(labels=[[1, 2, -100, 4, 0], [-100, 3, 3, -100, 2]], row_mean="valid", reduction="sum"),
]


@pytest.mark.parametrize("opts", GRADCHECK_OPTIONS, ids=["course", "keywords", "weighted_mean", "labels"])
def test_gradcheck_float64(opts):
    """torch.autograd.gradcheck with float64 inputs, through the float32 kernels: the analytic
    gradient (the fused forward's, weights and reductions included) against central differences;
    the tolerances are what a float32 forward allows at this step, and they reject a gradient
    0.3% off (checked when they were chosen)."""
    opts = dict(opts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[1, 2, 1, 4, 0], [2, 3, 3, 1, 2]])
    if "labels" in opts:
        opts["labels"] = torch.tensor(opts["labels"])

    def f(x64):
        return fwl.weighted_loss(x64.float(), ids, **opts).double()

    assert torch.autograd.gradcheck(f, (x,), eps=1e-2, atol=2e-5, rtol=1e-3)


def test_upstream_gradient_scales(device):
    logits, ids, keywords, _ = random_case(4, device, dtype=torch.float32, id_dtype=torch.int64)
    _, _, _, ref = reference(logits, ids, keywords)
    x = logits.detach().clone().requires_grad_()
    (fwl.keytoken_weighted_loss(ids, x, keywords) * 3.5).backward()
    assert rel_err(x.grad, 3.5 * ref) <= 1e-5
    loss = fwl.keytoken_weighted_loss(ids, x, keywords)
    (g,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(-2.0, device=device))
    assert rel_err(g, -2.0 * ref) <= 1e-5


def test_gradients_accumulate_into_grad(device):
    logits, ids, keywords, _ = random_case(5, device, dtype=torch.float32, id_dtype=torch.int64)
    _, _, _, ref = reference(logits, ids, keywords)
    x = logits.detach().clone().requires_grad_()
    fwl.keytoken_weighted_loss(ids, x, keywords).backward()
    (2 * fwl.keytoken_weighted_loss(ids, x, keywords)).backward()
    assert rel_err(x.grad, 3 * ref) <= 1e-5


def test_second_backward_through_one_graph():
    """The kept gradient is scaled in place by the first backward: a second backward through the
    same graph works when nothing was scaled (CPU, upstream gradient 1) and raises otherwise."""
    logits, ids, keywords, _ = random_case(6, "cpu", dtype=torch.float32, id_dtype=torch.int64)
    x = logits.clone().requires_grad_()
    loss = fwl.keytoken_weighted_loss(ids, x, keywords)
    (a,) = torch.autograd.grad(loss, x, retain_graph=True)
    (b,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert torch.equal(a, b)
    loss = fwl.keytoken_weighted_loss(ids, x, keywords)
    (a,) = torch.autograd.grad(loss * 2, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        torch.autograd.grad(loss * 3, x)


def test_second_backward_raises_under_saved_tensor_hooks():
    """Saved-tensor hooks (``save_on_cpu`` here) skip the version counter's check: a second
    backward after an in-place scaling still raises (it used to multiply the scaled gradient
    again: 6× where 2× was due), and one after an unscaled hand-out still gives the product."""
    logits, ids, keywords, _ = random_case(6, "cpu", dtype=torch.float32, id_dtype=torch.int64)
    _, _, _, ref = reference(logits, ids, keywords)
    x = logits.clone().requires_grad_()
    with torch.autograd.graph.save_on_cpu():
        loss = fwl.keytoken_weighted_loss(ids, x, keywords)
    (a,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
    assert rel_err(a, 3 * ref) <= 1e-5
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        torch.autograd.grad(loss * 2, x)
    with torch.autograd.graph.save_on_cpu():
        loss = fwl.keytoken_weighted_loss(ids, x, keywords)
    (a,) = torch.autograd.grad(loss, x, retain_graph=True)
    (b,) = torch.autograd.grad(loss * 2, x)
    assert rel_err(a, ref) <= 1e-5 and rel_err(b, 2 * ref) <= 1e-5


def test_second_backward_raises_on_cuda():
    from conftest import require_cuda

    device = require_cuda()
    logits, ids, keywords, _ = random_case(6, device, dtype=torch.float32, id_dtype=torch.int64)
    x = logits.clone().requires_grad_()
    loss = fwl.keytoken_weighted_loss(ids, x, keywords)
    torch.autograd.grad(loss, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        torch.autograd.grad(loss, x)


def test_loss_only_when_no_gradient_is_needed(device, monkeypatch):
    spy = Spy(monkeypatch)
    logits, ids, keywords, _ = random_case(2, device, dtype=torch.float32, id_dtype=torch.int64)
    ref_loss, _, _, _ = reference(logits, ids, keywords)
    plain = fwl.keytoken_weighted_loss(ids, logits, keywords)  # requires_grad False
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        no_grad = fwl.keytoken_weighted_loss(ids, x, keywords)
    with_grad = fwl.keytoken_weighted_loss(ids, x, keywords)
    grads_asked = [outputs[0] != 0 for outputs, _ in spy.calls]
    assert grads_asked == [False, False, True]
    assert not plain.requires_grad and not no_grad.requires_grad and with_grad.requires_grad
    for loss in (plain, no_grad, with_grad):
        assert rel_err(loss, ref_loss) <= 1e-5


def test_eager_function_matches_the_registered_op(device):
    """An eager call runs a plain autograd function; torch.compile traces the registered op.
    Both run the same computation: the same loss, per-sample outputs and gradient bits, and the
    op called directly still has its autograd."""
    from fused_weighted_loss._ops import _EagerLoss, mode_string

    logits, ids, keywords, _ = random_case(7, device, dtype=torch.float32, id_dtype=torch.int64)
    x = logits.detach().clone().requires_grad_()
    y = logits.detach().clone().requires_grad_()
    seen = []
    original = _EagerLoss.forward
    try:
        _EagerLoss.forward = staticmethod(lambda ctx, *a: seen.append(1) or original(ctx, *a))
        eager = fwl.weighted_loss(x, ids, keywords=keywords, return_per_sample=True)
    finally:
        _EagerLoss.forward = staticmethod(original)
    assert seen == [1], "the eager call went through the autograd function"
    mode = mode_string("all", "mean", True, True, False, False)
    op = torch.ops.fused_weighted_loss.loss(y, ids, None, None, list(keywords), [1.0] * len(keywords), mode)
    for a, b in zip(eager[:4], op[:4]):
        assert torch.equal(a, b)
    (eager.loss * 0.5).backward()
    (op[0] * 0.5).backward()
    assert torch.equal(x.grad, y.grad)
    _, _, _, ref = reference(logits, ids, keywords)
    assert rel_err(x.grad, 0.5 * ref) <= 1e-5


def test_a_later_backward_never_rewrites_a_gradient_handed_out_before():
    """The first backward (upstream 1, CPU) hands out the kept gradient itself; a second backward
    through the same graph with another upstream gradient multiplies out of place."""
    logits, ids, keys, _ = random_case(3, "cpu", dtype=torch.float32)
    x = logits.clone().requires_grad_()
    loss = fwl.keytoken_weighted_loss(ids, x, keys)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    snapshot = first.clone()
    (second,) = torch.autograd.grad(loss * 65536.0, x)
    assert torch.equal(first, snapshot)
    assert rel_err(second, snapshot * 65536.0) <= 1e-6


def test_a_second_backward_refuses_a_handed_out_gradient_modified_since():
    """Upstream 1 on the CPU hands out the kept gradient itself: a caller that changes it in place
    and backwards through the same graph again gets an error that says so, also under identity
    saved-tensor hooks, which skip torch's version check (it returned 100× the gradient there)."""
    logits, ids, keys, _ = random_case(3, "cpu", dtype=torch.float32)
    for hooks in (False, True):
        x = logits.clone().requires_grad_()
        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                loss = fwl.keytoken_weighted_loss(ids, x, keys)
        else:
            loss = fwl.keytoken_weighted_loss(ids, x, keys)
        (first,) = torch.autograd.grad(loss, x, retain_graph=True)
        first.mul_(100.0)
        with pytest.raises(RuntimeError, match="modified in place since"):
            torch.autograd.grad(loss, x, retain_graph=True)


def test_a_double_backward_raises():
    logits, ids, keys, _ = random_case(4, "cpu", dtype=torch.float32)
    x = logits.clone().requires_grad_()
    loss = fwl.keytoken_weighted_loss(ids, x, keys)
    # (before: a gradient without a graph, and no error)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_torch_func_transforms_are_refused_with_a_clear_error():
    """torch.func.grad/vjp/vmap over the loss (whose gradient comes from the forward, with no
    graph to transform) raise this package's RuntimeError naming the alternative, for both
    entries; plain autograd still works after."""
    import torch.func

    logits, ids, keys = random_case(4, "cpu", dtype=torch.float32)[:3]
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    hid_ids = torch.randint(0, 11, (2, 5))
    f = lambda x: fwl.weighted_loss(x, ids, keywords=keys)
    g = lambda h: fwl.weighted_linear_loss(h, weight, hid_ids)
    for transform in (torch.func.grad, lambda fn: (lambda x: torch.func.vjp(fn, x)), torch.func.vmap):
        with pytest.raises(RuntimeError, match="torch.func transforms"):
            transform(f)(logits.unsqueeze(0) if transform is torch.func.vmap else logits)
        with pytest.raises(RuntimeError, match="torch.func transforms"):
            transform(g)(hidden.unsqueeze(0) if transform is torch.func.vmap else hidden)
    x = logits.clone().requires_grad_()
    f(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

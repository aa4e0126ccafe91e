"""Shared test helpers: the course function in float64 (the oracle), relative errors, devices.

CUDA tests skip, saying why, where there is no usable GPU, and fail instead when
FWL_REQUIRE_CUDA=1 (as the crate's Rust GPU tests do).
"""
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.nn import CrossEntropyLoss

import fused_weighted_loss as fwl

REQUIRE_CUDA = os.environ.get("FWL_REQUIRE_CUDA") == "1"

# The crate's tolerances against the float64 reference (‖out − ref‖ / ‖ref‖).
TOL = {
    torch.float32: {"loss": 1e-5, "grad": 1e-5},
    torch.float16: {"loss": 1e-4, "grad": 1.5e-2},
    torch.bfloat16: {"loss": 1e-4, "grad": 1.5e-2},
}


def cuda_unavailable():
    """Why this package cannot run on CUDA here, or None."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return fwl.cuda_unavailable_reason()


def require_cuda():
    """torch.device("cuda"), or skip the test (fail it with FWL_REQUIRE_CUDA=1)."""
    reason = cuda_unavailable()
    if reason is not None:
        if REQUIRE_CUDA:
            pytest.fail(f"FWL_REQUIRE_CUDA=1 but CUDA cannot be used: {reason}")
        pytest.skip(f"skipped, no GPU: {reason}")
    return torch.device("cuda")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    return torch.device("cpu") if request.param == "cpu" else require_cuda()


def course_keytoken_weighted_loss(inputs, logits, keytoken_ids, alpha=1.0):
    """The course function, as written in the course (../shared/reference/course_loss.py with
    its defaults)."""
    shift_labels = inputs[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    loss_fct = CrossEntropyLoss(reduction="none")
    loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    loss_per_sample = loss.view(shift_logits.size(0), shift_logits.size(1)).mean(axis=1)
    weights = torch.stack([(inputs == kt).float() for kt in keytoken_ids]).sum(axis=[0, 2])
    weights = alpha * (1.0 + weights)
    weighted_loss = (loss_per_sample * weights).mean()
    return weighted_loss


class Reference(NamedTuple):
    """What :func:`reference_with_options` returns, float64."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    weights: torch.Tensor
    z_loss: torch.Tensor
    token_loss: torch.Tensor
    grad: torch.Tensor


def course_terms(x, ids, keywords=(), alpha=1.0, labels=None, keyword_weights=None, ignore_index=-100,
                 row_mean="all", reduction="mean", z_loss=0.0, label_smoothing=0.0, softcap=None, token_weights=None):
    """The course function's steps with the crate's documented extensions, on float64 logits
    ``x`` [B, T, V] that may carry an autograd graph: labels with ignore_index, row_mean "valid",
    weighted keywords, reductions, and the options as PyTorch writes them (as
    scripts/check_options.py): soft-capping ``c * tanh(z / c)`` before the loss,
    ``F.cross_entropy(label_smoothing=eps)``, ``+ k * logsumexp(z)**2`` per target, per-token
    losses times ``token_weights[:, 1:]`` before the row mean. Returns (loss, per-sample losses,
    weights, z-loss part, per-token losses), the loss differentiable."""
    inputs = ids.to(x.device, torch.int64)
    labels = inputs if labels is None else labels.to(x.device, torch.int64)
    b, t, v = x.shape
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    shift_labels = labels[..., 1:].contiguous().view(-1)
    shift_logits = z[..., :-1, :].contiguous().view(-1, v)
    ce = F.cross_entropy(shift_logits, shift_labels, reduction="none", ignore_index=ignore_index,
                         label_smoothing=label_smoothing)
    valid = shift_labels != ignore_index
    zpart = torch.where(valid, z_loss * torch.logsumexp(shift_logits, dim=-1) ** 2, torch.zeros_like(ce))
    token_loss = (ce + zpart).view(b, t - 1)
    w_tok = (torch.ones_like(token_loss) if token_weights is None
             else token_weights.to(x.device, torch.float64)[:, 1:])
    n_valid = valid.view(b, t - 1).sum(1)

    def row_mean_of(loss):
        loss = loss * w_tok
        if row_mean == "all":
            return loss.mean(axis=1)
        return torch.where(n_valid > 0, loss.sum(1) / n_valid.clamp(min=1), torch.zeros_like(loss[:, 0]))

    per, per_z = row_mean_of(token_loss), row_mean_of(zpart.view(b, t - 1))
    keyword_weights = [1.0] * len(keywords) if keyword_weights is None else keyword_weights
    hits = torch.zeros(b, dtype=torch.float64, device=x.device)
    for kt, w in zip(keywords, keyword_weights):
        hits = hits + w * (inputs == kt).to(torch.float64).sum(1)
    weights = alpha * (1.0 + hits)

    def reduce(per):
        if reduction == "mean":
            return (per * weights).mean()
        if reduction == "sum":
            return (per * weights).sum()
        return (per * weights).sum() / weights.sum()

    return reduce(per), per, weights, reduce(per_z), token_loss


def reference_with_options(logits, ids, keywords=(), alpha=1.0, **options):
    """:func:`course_terms` in float64 on the logits as given (already rounded to their dtype),
    on their device, the gradient by autograd."""
    x = logits.detach().to(torch.float64).requires_grad_()
    total, per, weights, z, token_loss = course_terms(x, ids, keywords, alpha, **options)
    total.backward()
    return Reference(total.detach(), per.detach(), weights.detach(), z.detach(), token_loss.detach(), x.grad)


class LinearReference(NamedTuple):
    """What :func:`linear_reference` returns, float64 (``d_bias`` None without a bias)."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    weights: torch.Tensor
    z_loss: torch.Tensor
    d_hidden: torch.Tensor
    d_weight: torch.Tensor
    d_bias: object


def linear_reference(hidden, weight, ids, bias=None, keywords=(), alpha=1.0, **options):
    """The unfused computation in float64: ``F.linear(hidden, weight, bias)`` (inputs as given,
    already rounded to their dtype), reshaped to [B, T, V], then :func:`course_terms`; the
    gradients of hidden, weight and bias by autograd."""
    leaf = lambda t: t.detach().to(torch.float64).requires_grad_()
    h, w = leaf(hidden), leaf(weight)
    b = leaf(bias) if bias is not None else None
    logits = F.linear(h, w, b).reshape(ids.shape[0], ids.shape[1], w.shape[0])
    total, per, weights, z, _ = course_terms(logits, ids, keywords, alpha, **options)
    total.backward()
    return LinearReference(total.detach(), per.detach(), weights.detach(), z.detach(), h.grad, w.grad,
                           b.grad if b is not None else None)


def reference(logits, ids, keywords=(), alpha=1.0, **options):
    """:func:`reference_with_options` as (loss, per_sample, weights, grad)."""
    r = reference_with_options(logits, ids, keywords, alpha, **options)
    return r.loss, r.per_sample, r.weights, r.grad


class Spy:
    """Records, as (outputs, options), what each native forward was asked to write and with
    which options (the calls still run)."""

    def __init__(self, monkeypatch):
        import fused_weighted_loss._ops as ops

        self.calls = []
        real = ops._native.forward

        def forward(inputs, outputs, options, device=None, check=False):
            self.calls.append((outputs, options))
            return real(inputs, outputs, options, device, check)

        monkeypatch.setattr(ops._native, "forward", forward)


def train_side_by_side(model_a, loss_a, model_b, loss_b, steps, optimizer=torch.optim.SGD, lr=0.5):
    """``steps`` optimizer steps of two models, ``loss_a()`` / ``loss_b()`` giving each step's
    loss: at each step the losses agree within 1e-6 and every gradient within 1e-5 (float32
    rounding), named parameter by named parameter."""
    opt_a, opt_b = optimizer(model_a.parameters(), lr=lr), optimizer(model_b.parameters(), lr=lr)
    for _ in range(steps):
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
        la, lb = loss_a(), loss_b()
        la.backward()
        lb.backward()
        assert rel_err(lb, la) <= 1e-6
        for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
            assert rel_err(pb.grad, pa.grad) <= 1e-5, name
        opt_a.step()
        opt_b.step()


def without_host_sync(step):
    """Runs ``step()`` behind about 0.2 s of queued device work, under torch's sync debug mode
    ("error"): asserts that it returned while the device was still busy (it did not wait for the
    device) and returns what it returned."""
    torch.cuda._sleep(400_000_000)  # ~0.2 s of device time
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
        still_busy = not torch.cuda.current_stream().query()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert still_busy, "the device finished before the call returned: the call waited for it"
    return out


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64, on ref's device (NaN if either holds a NaN, so that NaN
    never passes)."""
    ref = torch.as_tensor(ref).detach().to(torch.float64)
    out = torch.as_tensor(out).detach().to(ref.device, torch.float64)
    den = ref.norm()
    assert den > 0, "the reference is all zeros: the test data is degenerate"
    return ((out - ref).norm() / den).item()


def random_case(seed, device, dtype=None, id_dtype=None, vocabs=(2, 7, 50, 257, 1000, 5003)):
    """Random logits [B, T, V] (scale 3, rounded to dtype), ids and a few keywords."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]
    b, t = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
    v = pick(vocabs)
    dtype = dtype or pick([torch.float32, torch.float16, torch.bfloat16])
    id_dtype = id_dtype or pick([torch.int64, torch.int32])
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g).to(id_dtype)
    # keywords that occur (and a repeated one, which counts twice as in the course function)
    flat = ids.flatten().tolist()
    keywords = [flat[int(i)] for i in torch.randint(len(flat), (int(torch.randint(0, 4, (1,), generator=g)),),
                                                    generator=g)]
    alpha = pick([1.0, 0.5, 2.5])
    return logits.to(device), ids.to(device), keywords, alpha

"""Shared test helpers: the course function in float64 (the oracle), relative errors, devices.

CUDA tests skip, saying why, where there is no usable GPU, and fail instead when
FWL_REQUIRE_CUDA=1 (as the crate's Rust GPU tests do).
"""
import os

import pytest
import torch
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


def reference(logits, ids, keywords=(), alpha=1.0, labels=None, keyword_weights=None, ignore_index=-100,
              row_mean="all", reduction="mean"):
    """The course function with the crate's documented extensions (labels with ignore_index,
    row_mean "valid", weighted keywords, reductions), in float64 on the CPU, on the logits as
    given (already rounded to their dtype), on their device. Returns (loss, per_sample, weights,
    grad), float64."""
    x = logits.detach().to(torch.float64).requires_grad_()
    inputs = ids.to(x.device, torch.int64)
    labels = inputs if labels is None else labels.to(x.device, torch.int64)
    b, t, v = x.shape
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = x[..., :-1, :].contiguous()
    loss_fct = CrossEntropyLoss(reduction="none", ignore_index=ignore_index)
    loss = loss_fct(shift_logits.view(-1, v), shift_labels.view(-1)).view(b, t - 1)
    if row_mean == "all":
        per = loss.mean(axis=1)
    else:
        n = (shift_labels != ignore_index).sum(1)
        per = torch.where(n > 0, loss.sum(1) / n.clamp(min=1), torch.zeros_like(loss[:, 0]))
    keyword_weights = [1.0] * len(keywords) if keyword_weights is None else keyword_weights
    hits = torch.zeros(b, dtype=torch.float64, device=x.device)
    for kt, w in zip(keywords, keyword_weights):
        hits = hits + w * (inputs == kt).to(torch.float64).sum(1)
    weights = alpha * (1.0 + hits)
    if reduction == "mean":
        total = (per * weights).mean()
    elif reduction == "sum":
        total = (per * weights).sum()
    else:
        total = (per * weights).sum() / weights.sum()
    total.backward()
    return total.detach(), per.detach(), weights.detach(), x.grad


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

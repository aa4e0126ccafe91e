"""float16 logits under a loss scale (``torch.amp.GradScaler``'s 65536): the gradient kept by the
forward stays float32 until the backward, which multiplies it by the scale and rounds it once to
float16, so that it matches the float64 gradient times the scale, rounded to float16, entry by
entry wherever that is a normal float16. Kept in float16 at scale 1 (``kept_grad_dtype``), the
small entries are lost: the same check fails, which these tests assert too."""
import pytest
import torch

import fused_weighted_loss as fwl

from conftest import TOL, course_terms, linear_reference, reference, rel_err

SCALE = 65536.0
HALF_NORMAL = 2.0 ** -14  # float16's smallest normal number


def _case(device, b=4, t=64, v=3001, seed=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g).mul(2.0).to(torch.float16).to(device)
    ids = torch.randint(0, v, (b, t), generator=g).to(device)
    return logits, ids, [int(ids[0, 3 % t]), int(ids[-1, 7 % t])]


def _entrywise(got: torch.Tensor, scaled_ref: torch.Tensor) -> float:
    """The largest relative error of ``got`` (float16) over the entries where the scaled float64
    reference is a normal float16 (one rounding of an f32 product: at most 2**-11 plus the f32
    computation's error), and how many of those entries ``got`` has as 0."""
    mask = scaled_ref.abs() >= HALF_NORMAL
    assert int(mask.sum()) > 1000, "the case must have many normal entries to check"
    rel = ((got.double() - scaled_ref).abs() / scaled_ref.abs())[mask]
    return float(rel.max()), int((got[mask] == 0).sum())


def _small_entries(scaled_ref: torch.Tensor) -> int:
    """How many normal entries of the scaled reference are below float16's range at scale 1."""
    return int(((scaled_ref.abs() >= HALF_NORMAL) & (scaled_ref.abs() / SCALE < 2.0 ** -24)).sum())


def test_float16_logits_keep_their_small_gradients_under_a_loss_scale(device):
    logits, ids, keywords = _case(device)
    _, _, _, ref_grad = reference(logits, ids, keywords)
    scaled = ref_grad * SCALE
    assert _small_entries(scaled) > 1000, "the case must have entries that float16 loses at scale 1"

    x = logits.clone().requires_grad_()
    (fwl.weighted_loss(x, ids, keywords=keywords) * SCALE).backward()
    assert x.grad.dtype == torch.float16 and bool(torch.isfinite(x.grad).all())
    worst, zeros = _entrywise(x.grad, scaled)
    assert worst <= 1e-3 and zeros == 0, (worst, zeros)
    assert rel_err(x.grad, scaled) <= TOL[torch.float16]["grad"]

    # the kept float16 gradient (rounded at scale 1): the same check fails
    y = logits.clone().requires_grad_()
    (fwl.weighted_loss(y, ids, keywords=keywords, kept_grad_dtype=torch.float16) * SCALE).backward()
    worst16, zeros16 = _entrywise(y.grad, scaled)
    assert zeros16 > 1000 and worst16 == 1.0, (worst16, zeros16)


def test_a_float32_kept_gradient_gives_the_same_result_at_scale_one(device):
    """At scale 1 the float32 gradient rounded in the backward and the float16 one rounded in
    the forward are the same float16 numbers, for float16 and bfloat16 logits."""
    logits, ids, keywords = _case(device, b=2, t=17, v=517)
    for dtype in (torch.float16, torch.bfloat16):
        grads = []
        for kept in (torch.float32, dtype):
            x = logits.to(dtype).clone().requires_grad_()
            fwl.weighted_loss(x, ids, keywords=keywords, label_smoothing=0.1, kept_grad_dtype=kept).backward()
            assert x.grad.dtype == dtype
            grads.append(x.grad)
        assert torch.equal(grads[0], grads[1])


def test_a_float32_kept_gradient_allows_a_second_backward(device):
    """Nothing is scaled in place when the kept gradient is wider than the logits: a second
    backward through the same graph gives the same gradient, scaled by its own upstream."""
    logits, ids, keywords = _case(device, b=2, t=9, v=301)
    x = logits.clone().requires_grad_()
    loss = fwl.weighted_loss(x, ids, keywords=keywords)
    (first,) = torch.autograd.grad(loss * SCALE, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss * SCALE, x)
    assert torch.equal(first, second)


def test_kept_grad_dtype_is_checked():
    logits, ids, _ = _case("cpu", b=1, t=4, v=11)
    x = logits.requires_grad_()
    with pytest.raises(TypeError, match="kept_grad_dtype"):
        fwl.weighted_loss(x, ids, kept_grad_dtype="float32")
    for bad in (torch.float64, torch.bfloat16):
        with pytest.raises(ValueError, match="kept_grad_dtype"):
            fwl.weighted_loss(x, ids, kept_grad_dtype=bad)
    # float32 logits: float32 is their own dtype
    assert torch.isfinite(fwl.weighted_loss(x.detach().float(), ids, kept_grad_dtype=torch.float32))


def _mixed(got: torch.Tensor, scaled_ref: torch.Tensor) -> float:
    """The largest error of ``got`` relative to each entry of the scaled float64 reference plus
    1e-4 of its largest: the gradients of the fused linear loss are sums over rows or the
    vocabulary, whose small entries carry the float32 products' cancellation error."""
    err = (got.double() - scaled_ref).abs()
    return float((err / (scaled_ref.abs() + 1e-4 * scaled_ref.abs().max())).max())


def _rounded_rows_bound(hidden, weight, ids, keywords):
    """Entry-wise bounds on ``d hidden`` and ``d weight`` (times ``SCALE``) of a backend whose
    products take the gradient rows ``G = d loss / d logits`` rounded to float16 (CUDA: cuBLAS
    takes float16 operands; the rows are written times a power of two ``S``, ``S`` times a host
    bound of ``max|G|`` at most 2**14, so each entry is rounded relative to itself, 2**-11, or
    absolutely by 2**-25 / S where it falls below float16's normal range): those roundings
    through the products, with float32 sums and the final rounding to float16 (2**-11 of the
    entry each, 2**-10 together), and float16's smallest subnormal. The absolute term,
    ``2**-37 * max|G|`` per entry, assumes the host bound within 2x of ``max|G|`` (``S`` is the
    largest power of two with ``S * bound <= 2**14``); a looser bound grows it in proportion,
    which stays far under the relative term here."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1]).cpu()
    w = weight.detach().double().cpu()
    logits = (h @ w.T).requires_grad_()
    total = course_terms(logits.reshape(ids.shape[0], ids.shape[1], -1), ids.cpu(), keywords)[0]
    total.backward()
    g = logits.grad.abs()
    per_entry = 2.0 ** -11 * g + 2.0 ** -37 * float(g.max())
    return (per_entry @ w.abs()) * SCALE * 1.01, (per_entry.T @ h.abs()) * SCALE * 1.01


def test_the_fused_linear_loss_keeps_float16_gradients_under_a_loss_scale(device):
    g = torch.Generator().manual_seed(9)
    n_b, t, h, v = 8, 128, 32, 4001
    hidden0 = torch.randn(n_b, t, h, generator=g).mul(0.5).to(torch.float16).to(device)
    weight0 = torch.randn(v, h, generator=g).mul(0.5).to(torch.float16).to(device)
    ids = torch.randint(0, v, (n_b, t), generator=g).to(device)
    keywords = [int(ids[0, 1])]
    ref = linear_reference(hidden0, weight0, ids, keywords=keywords)
    # CUDA's products take the gradient rows in float16 (the CPU's in float32): its entries are
    # within the bound of that one rounding, not within 2e-3 of themselves (on an H200 the
    # worst entry of d hidden was 0.25 off under the measure of the CPU's bound, exactly as a
    # float64 model of the rounded rows gives)
    rows_bound = _rounded_rows_bound(hidden0, weight0, ids, keywords) if torch.device(device).type == "cuda" else None
    for accumulate_f32 in (True, False):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        loss = fwl.weighted_linear_loss(hidden, weight, ids, keywords=keywords, accumulate_f32=accumulate_f32,
                                        chunk_rows=37)
        (loss * SCALE).backward()
        assert hidden.grad.dtype == weight.grad.dtype == torch.float16
        worst = []
        for i, (got, r) in enumerate(((hidden.grad, ref.d_hidden * SCALE), (weight.grad, ref.d_weight * SCALE))):
            assert bool(torch.isfinite(got).all())
            assert rel_err(got, r) <= TOL[torch.float16]["grad"]
            worst.append(_mixed(got, r))
            if accumulate_f32:
                assert int((got[r.abs() >= HALF_NORMAL] == 0).sum()) == 0
                if rows_bound is not None:
                    err = (got.double() - r).abs().reshape(rows_bound[i].shape).cpu()
                    allowed = rows_bound[i] + 2.0 ** -10 * r.abs().reshape(rows_bound[i].shape).cpu() + 2.0 ** -24
                    over = int((err > allowed).sum())
                    assert over == 0, f"{over} entries of gradient {i} beyond the float16 rows' bound"
        if accumulate_f32 and rows_bound is None:
            assert max(worst) <= 2e-3, worst
        elif not accumulate_f32:
            # float16 from the forward on, at scale 1: the documented loss
            assert worst[1] > 1e-2, worst


def _other_layout(t: torch.Tensor) -> torch.Tensor:
    """The same values in another memory layout (the last two dimensions' strides swapped)."""
    if t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("kept", [None, torch.float16])
def test_a_saved_tensor_hook_may_return_the_kept_gradient_in_another_layout(kept):
    """An unpack hook may hand the kept gradient back as any tensor of the same values: in
    another layout, or (all zeros) as an expanded scalar. The backward reads it as torch
    describes it (it once read a float32 one as contiguous memory: a wrong gradient, or a
    crash)."""
    logits, ids, keywords = _case("cpu", b=2, t=9, v=301)
    _, _, _, ref_grad = reference(logits, ids, keywords)
    x = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _other_layout):
        loss = fwl.weighted_loss(x, ids, keywords=keywords, kept_grad_dtype=kept)
    (loss * SCALE).backward()
    assert x.grad.dtype == torch.float16
    assert rel_err(x.grad, ref_grad * SCALE) <= TOL[torch.float16]["grad"]

    # every target ignored: a zero gradient, handed back as an expanded zero
    labels = torch.full_like(ids, -100)
    y = logits.clone().requires_grad_()
    zero = lambda t: torch.zeros((), dtype=t.dtype).expand(t.shape) if not bool(t.any()) else t
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, zero):
        loss = fwl.weighted_loss(y, ids, labels=labels, kept_grad_dtype=kept)
    (loss * SCALE).backward()
    assert y.grad.dtype == torch.float16 and not bool(y.grad.any())

    # the fused linear loss
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 8, generator=g).to(torch.float16).requires_grad_()
    weight = torch.randn(301, 8, generator=g).to(torch.float16).requires_grad_()
    ref = linear_reference(hidden, weight, ids, keywords=keywords)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _other_layout):
        loss = fwl.weighted_linear_loss(hidden, weight, ids, keywords=keywords, accumulate_f32=kept is None)
    (loss * SCALE).backward()
    assert rel_err(hidden.grad, ref.d_hidden * SCALE) <= TOL[torch.float16]["grad"]
    assert rel_err(weight.grad, ref.d_weight * SCALE) <= TOL[torch.float16]["grad"]

"""Loss, gradient, per-sample losses and weights against the course function in float64."""
import pytest
import torch

import fused_weighted_loss as fwl
from conftest import TOL, course_keytoken_weighted_loss, random_case, reference, rel_err


def grad_of(loss_fn, logits):
    x = logits.detach().clone().requires_grad_()
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("seed", range(24))
def test_course_function_random_shapes_and_dtypes(device, seed):
    logits, ids, keywords, alpha = random_case(seed, device)
    loss, grad = grad_of(lambda x: fwl.keytoken_weighted_loss(ids, x, keywords, alpha), logits)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device == logits.device
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref_loss, _, _, ref_grad = reference(logits, ids, keywords, alpha)
    tol = TOL[logits.dtype]
    assert rel_err(loss, ref_loss) <= tol["loss"], (seed, logits.shape, logits.dtype)
    assert rel_err(grad, ref_grad) <= tol["grad"], (seed, logits.shape, logits.dtype)


def test_course_text_itself_agrees(device):
    """The course function exactly as written (float64 here), not the test's extended oracle."""
    logits, ids, _, _ = random_case(3, device, dtype=torch.float32, id_dtype=torch.int64)
    keywords = ids[0, :2].tolist()
    x64 = logits.detach().double().cpu().requires_grad_()
    course = course_keytoken_weighted_loss(ids.cpu(), x64, keywords, 1.5)
    course.backward()
    loss, grad = grad_of(lambda x: fwl.keytoken_weighted_loss(ids, x, keywords, alpha=1.5), logits)
    assert rel_err(loss, course.detach()) <= 1e-5
    assert rel_err(grad, x64.grad) <= 1e-5


def test_inputs_holding_ignore_index_as_the_course_function_allows(device):
    """The course function hands its inputs to ``CrossEntropyLoss`` (ignore_index -100): an input of
    -100 is an ignored target there (e.g. labels with masked padding passed as the inputs), and a
    keyword never. The same here, against the course text in float64."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 8, 257, generator=g) * 3).to(device)
    ids = torch.randint(0, 257, (3, 8), generator=g).to(device)
    keywords = ids[0, 1:3].tolist()
    ids[0, 0] = -100  # never a target
    ids[0, 2] = -100
    ids[-1, -3:] = -100  # the end of a sample, masked
    x64 = logits.detach().double().cpu().requires_grad_()
    course = course_keytoken_weighted_loss(ids.cpu(), x64, keywords, 1.5)
    course.backward()
    loss, grad = grad_of(lambda x: fwl.keytoken_weighted_loss(ids, x, keywords, alpha=1.5), logits)
    assert torch.isfinite(course) and rel_err(loss, course.detach()) <= 1e-5
    assert rel_err(grad, x64.grad) <= 1e-5
    # another ignore_index: -100 is then an id out of range
    with pytest.raises(ValueError, match="outside"):
        fwl.weighted_loss(logits, ids, ignore_index=-1, check_ids=True)


OPTIONS = [
    dict(row_mean="valid"),
    dict(reduction="sum"),
    dict(reduction="weighted_mean", keyword_weights=[0.5, 2.0]),
    dict(labels=True, row_mean="all"),
    dict(labels=True, row_mean="valid", reduction="weighted_mean"),
    dict(labels=True, ignore_index=-1, row_mean="valid", reduction="sum", keyword_weights=[0.0, 3.0]),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_options_and_per_sample(device, opts, dtype):
    opts = dict(opts)
    logits, ids, _, _ = random_case(11, device, dtype=dtype, id_dtype=torch.int64, vocabs=(300,))
    b, t = ids.shape
    keywords = [int(ids[0, 0]), int(ids[-1, -1])]
    if opts.pop("labels", False):
        # labels that differ from the ids, with ignored positions (every sample keeps one target)
        g = torch.Generator().manual_seed(5)
        labels = torch.randint(0, logits.shape[-1], (b, t), generator=g)
        ignore = opts.get("ignore_index", -100)
        mask = torch.rand(b, t, generator=g) < 0.4
        mask[:, 1] = False
        labels[mask] = ignore
        opts["labels"] = labels.to(device)
    x = logits.detach().clone().requires_grad_()
    out = fwl.weighted_loss(x, ids, keywords=keywords, alpha=1.25, return_per_sample=True, **opts)
    assert isinstance(out, fwl.LossOutput)
    out.loss.backward()
    ref_loss, ref_per, ref_w, ref_grad = reference(logits, ids, keywords, 1.25, **opts)
    tol = TOL[dtype]
    assert rel_err(out.loss, ref_loss) <= tol["loss"]
    assert rel_err(out.per_sample_loss, ref_per) <= tol["loss"]
    assert torch.equal(out.weights.cpu(), ref_w.cpu())
    assert out.per_sample_loss.dtype == torch.float64 and out.per_sample_loss.shape == (b,)
    assert not out.per_sample_loss.requires_grad and not out.weights.requires_grad
    assert rel_err(x.grad, ref_grad) <= tol["grad"]


def test_int32_and_int64_ids_agree(device):
    logits, ids, keywords, _ = random_case(7, device, dtype=torch.float32, id_dtype=torch.int64)
    a, ga = grad_of(lambda x: fwl.keytoken_weighted_loss(ids, x, keywords), logits)
    b, gb = grad_of(lambda x: fwl.keytoken_weighted_loss(ids.int(), x, keywords), logits)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_non_contiguous_inputs_are_made_contiguous(device):
    logits, ids, keywords, _ = random_case(8, device, dtype=torch.float32, id_dtype=torch.int64)
    # the same values behind a transposed layout
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    a, ga = grad_of(lambda x: fwl.keytoken_weighted_loss(ids, x, keywords), logits)
    b, gb = grad_of(lambda x: fwl.keytoken_weighted_loss(ids, x, keywords), strided)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def _misaligned(t):
    """A copy of CPU tensor ``t`` whose data starts one byte past an aligned address (legal in
    torch, e.g. for a view of a file or network buffer): the package copies it before the native
    call."""
    out = torch.frombuffer(bytearray(t.numel() * t.element_size() + 1), dtype=t.dtype, count=t.numel(), offset=1)
    out = out.view(t.shape).copy_(t)
    assert out.data_ptr() % t.element_size() != 0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_inputs_are_copied(dtype):
    logits, ids, keywords, _ = random_case(10, "cpu", dtype=dtype, id_dtype=torch.int64)
    tw = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3))
    a, ga = grad_of(lambda x: fwl.weighted_loss(x, ids, keywords=keywords, token_weights=tw), logits)
    x = _misaligned(logits).requires_grad_()
    b = fwl.weighted_loss(x, _misaligned(ids), keywords=keywords, token_weights=_misaligned(tw))
    b.backward()
    assert torch.equal(a, b.detach()) and torch.equal(ga, x.grad)
    # the fused linear entry too
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(*ids.shape, 24, generator=g).to(dtype)
    weight = (torch.randn(logits.shape[-1], 24, generator=g) * 0.3).to(dtype)
    c = fwl.weighted_linear_loss(hidden, weight, ids, keywords=keywords)
    d = fwl.weighted_linear_loss(_misaligned(hidden), _misaligned(weight), _misaligned(ids), keywords=keywords)
    assert torch.equal(c, d)


def test_keywords_as_tensor_and_empty(device):
    logits, ids, _, _ = random_case(9, device, dtype=torch.float32, id_dtype=torch.int64)
    kw = [int(ids[0, 1]), int(ids[0, 1])]
    a = fwl.keytoken_weighted_loss(ids, logits, kw)
    b = fwl.keytoken_weighted_loss(ids, logits, torch.tensor(kw))
    assert torch.equal(a, b)
    plain = fwl.keytoken_weighted_loss(ids, logits, [])
    ref_loss, _, _, _ = reference(logits, ids, [])
    assert rel_err(plain, ref_loss) <= 1e-5

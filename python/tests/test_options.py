"""The loss options (z-loss, label smoothing, soft-capping, token weights) and the per-token
losses, alone and combined, against PyTorch's own float64 computation of them (conftest's
reference_with_options: F.cross_entropy(label_smoothing=eps), c * tanh(z / c) before the loss,
+ k * logsumexp**2, token weights times the per-token losses before the row mean)."""
import pytest
import torch

import fused_weighted_loss as fwl
from conftest import TOL, Spy, random_case, reference_with_options, rel_err


def token_weights_like(ids, seed=0):
    """Weights in [0, 2) with a few exact zeros (positions that then count for nothing)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(ids.shape, generator=g) * 2
    w[torch.rand(ids.shape, generator=g) < 0.2] = 0.0
    return w.to(ids.device)


def ignored_labels(ids, vocab, seed=5, ignore_index=-100):
    """Labels that differ from the ids, some ignored (every sample keeps its second target)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, ids.shape, generator=g)
    mask = torch.rand(ids.shape, generator=g) < 0.4
    mask[:, 1] = False
    labels[mask] = ignore_index
    return labels.to(ids.device, ids.dtype)


ALL = dict(z_loss=1e-3, label_smoothing=0.1, softcap=5.0, token_weights=True)
CASES = {
    "z_loss": dict(z_loss=1e-3),
    "label_smoothing": dict(label_smoothing=0.1),
    "label_smoothing=1": dict(label_smoothing=1.0),
    "softcap": dict(softcap=5.0),
    "token_weights": dict(token_weights=True),
    "all": ALL,
    "all,labels,valid,weighted_mean": dict(ALL, labels=True, row_mean="valid", reduction="weighted_mean"),
    "all,labels,ignore_index=-1,sum": dict(ALL, labels=True, ignore_index=-1, reduction="sum", z_loss=0.05,
                                           softcap=2.0),
}


def materialise(opts, ids, vocab):
    opts = dict(opts)
    if opts.pop("token_weights", False):
        opts["token_weights"] = token_weights_like(ids)
    if opts.pop("labels", False):
        opts["labels"] = ignored_labels(ids, vocab, ignore_index=opts.get("ignore_index", -100))
    return opts


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_options_against_pytorch(device, name, dtype):
    """Loss, per-sample losses, weights, z-loss part, per-token losses and the gradient (through
    autograd, as a training step gets it) against the float64 computation."""
    logits, ids, _, _ = random_case(31, device, dtype=dtype, id_dtype=torch.int64, vocabs=(300,))
    logits = logits * 2  # logits up to about ±20: soft-capping at 5 or 2 bends them
    b, t, v = logits.shape
    keywords = [int(ids[0, 0]), int(ids[-1, -1])]
    opts = materialise(CASES[name], ids, v)
    x = logits.detach().clone().requires_grad_()
    out = fwl.weighted_loss(x, ids, keywords=keywords, alpha=1.25, return_per_sample=True, return_token_loss=True,
                            **opts)
    (out.loss * 0.5).backward()
    ref = reference_with_options(logits, ids, keywords, 1.25, **opts)
    tol = TOL[dtype]
    assert rel_err(out.loss, ref.loss) <= tol["loss"], name
    assert rel_err(out.per_sample_loss, ref.per_sample) <= tol["loss"], name
    assert torch.equal(out.weights.cpu(), ref.weights.cpu())
    assert rel_err(out.token_loss, ref.token_loss) <= tol["loss"], name
    assert rel_err(x.grad, 0.5 * ref.grad) <= tol["grad"], name
    if opts.get("z_loss", 0.0) > 0:
        assert rel_err(out.z_loss, ref.z_loss) <= tol["loss"], name
    else:
        assert out.z_loss.item() == 0.0
    assert out.z_loss.dtype == torch.float64 and out.z_loss.shape == () and out.z_loss.device == logits.device
    assert out.token_loss.dtype == torch.float32 and out.token_loss.shape == (b, t - 1)
    assert out.token_loss.device == logits.device
    assert not any(o.requires_grad for o in out[1:])
    if "labels" in opts:  # ignored positions: zero loss, zero gradient
        ignored = opts["labels"][:, 1:] == opts.get("ignore_index", -100)
        assert ignored.any() and (out.token_loss[ignored] == 0).all()
        assert (x.grad[:, :-1][ignored] == 0).all()


def test_options_change_the_loss(device):
    """Each option moves the loss away from the plain one (none of them is silently dropped on
    its way to the crate)."""
    logits, ids, _, _ = random_case(32, device, dtype=torch.float32, id_dtype=torch.int64, vocabs=(300,))
    plain = fwl.weighted_loss(logits * 2, ids)
    for opt in ("z_loss", "label_smoothing", "softcap", "token_weights"):
        opts = materialise({opt: CASES[opt][opt]}, ids, logits.shape[-1])
        with_opt = fwl.weighted_loss(logits * 2, ids, **opts)
        assert rel_err(with_opt, plain) > 1e-3, opt


def test_zero_token_weights_equal_ignored_labels(device):
    """A token weight of 0 on a position is that position's label ignored (row_mean="all")."""
    logits, ids, _, _ = random_case(33, device, dtype=torch.float32, id_dtype=torch.int32, vocabs=(257,))
    labels = ignored_labels(ids, logits.shape[-1])
    w = (labels != -100).to(torch.float32)
    a = fwl.weighted_loss(logits, ids, labels=labels, label_smoothing=0.2, z_loss=1e-3, return_per_sample=True)
    b = fwl.weighted_loss(logits, ids, labels=torch.where(labels == -100, ids, labels), token_weights=w,
                          label_smoothing=0.2, z_loss=1e-3, return_per_sample=True)
    assert rel_err(b.loss, a.loss) <= 1e-6 and rel_err(b.z_loss, a.z_loss) <= 1e-6


def test_token_weights_take_no_gradient_and_any_layout(device):
    logits, ids, _, _ = random_case(37, device, dtype=torch.float32, id_dtype=torch.int64, vocabs=(257,))
    w = token_weights_like(ids).requires_grad_()
    x = logits.clone().requires_grad_()
    loss = fwl.weighted_loss(x, ids, token_weights=w)
    loss.backward()
    assert w.grad is None and x.grad is not None
    strided = w.detach().t().contiguous().t()
    assert not strided.is_contiguous()
    assert torch.equal(fwl.weighted_loss(logits, ids, token_weights=strided), loss.detach())


def test_token_loss_is_the_course_intermediate(device):
    """Without options, return_token_loss gives CrossEntropyLoss(reduction="none") of the shifted
    logits, the course function's per-token losses; their row means are the per-sample losses."""
    logits, ids, keywords, alpha = random_case(34, device, dtype=torch.float32, id_dtype=torch.int64)
    b, t, v = logits.shape
    out = fwl.weighted_loss(logits, ids, keywords=keywords, alpha=alpha, return_token_loss=True)
    course = torch.nn.CrossEntropyLoss(reduction="none")(
        logits[:, :-1].double().reshape(-1, v), ids[:, 1:].reshape(-1)).view(b, t - 1)
    assert rel_err(out.token_loss, course) <= 1e-5
    assert rel_err(out.per_sample_loss, out.token_loss.double().mean(1)) <= 1e-6
    assert isinstance(out, fwl.LossOutput) and out.z_loss.item() == 0.0


def test_outputs_are_computed_only_when_asked(monkeypatch):
    """The per-token losses are written by the native call only with return_token_loss; the
    per-sample outputs and the z-loss part with either return flag; and the float options reach
    the crate exactly (through the op's mode string)."""
    spy = Spy(monkeypatch)
    logits, ids, _, _ = random_case(35, "cpu", dtype=torch.float32, id_dtype=torch.int64)
    k, eps, cap = 1.0 / 3.0, 0.1 + 0.2, 7.000000000000001
    plain = fwl.weighted_loss(logits, ids, z_loss=k, label_smoothing=eps, softcap=cap)
    per = fwl.weighted_loss(logits, ids, z_loss=k, return_per_sample=True)
    tok = fwl.weighted_loss(logits, ids, return_token_loss=True)
    asked = [tuple(p != 0 for p in outputs[2:6]) for outputs, _ in spy.calls]
    assert asked == [(False,) * 4, (True, True, True, False), (True, True, True, True)]
    assert spy.calls[0][1][-3:] == (k, eps, cap)
    assert spy.calls[1][1][-3:] == (k, 0.0, None)
    assert isinstance(plain, torch.Tensor) and per.token_loss is None and tok.token_loss is not None
    assert torch.equal(per.loss, fwl.weighted_loss(logits, ids, z_loss=k))


def test_keytoken_weighted_loss_keeps_the_course_signature():
    import inspect

    params = list(inspect.signature(fwl.keytoken_weighted_loss).parameters)
    assert params == ["inputs", "logits", "keytoken_ids", "alpha"]


def test_gradcheck_float64_all_options():
    """torch.autograd.gradcheck of the fused gradient with every option on (as
    test_autograd.test_gradcheck_float64, the float32 kernels under float64 inputs)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ids = torch.tensor([[1, 2, 1, 4, 0], [2, 3, 3, 1, 2]])
    w = torch.tensor([[9.0, 1.0, 0.5, 0.0, 2.0], [1.0, 1.5, 1.0, 0.25, 1.0]])
    labels = torch.tensor([[1, 2, -100, 4, 0], [-100, 3, 3, -100, 2]])

    def f(x64):
        return fwl.weighted_loss(x64.float(), ids, labels=labels, keywords=[1], z_loss=0.01, label_smoothing=0.2,
                                 softcap=3.0, token_weights=w, row_mean="valid").double()

    assert torch.autograd.gradcheck(f, (x,), eps=1e-2, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_with_options(device, backend):
    """Every option and output under torch.compile(fullgraph=True): the fake implementation
    gives the new outputs their shapes, and the compiled step equals the eager one."""
    torch._dynamo.reset()
    logits, ids, _, _ = random_case(36, device, dtype=torch.float32, id_dtype=torch.int64, vocabs=(100,))
    w = token_weights_like(ids)
    labels = ignored_labels(ids, 100)
    keyword = int(ids[0, 0])

    def f(x, k):
        out = fwl.weighted_loss(x * 1.0, ids, labels=labels, keywords=[keyword], z_loss=k, label_smoothing=0.1,
                                softcap=4.0, token_weights=w, row_mean="valid", return_token_loss=True)
        return out.loss * 3.0, out.per_sample_loss, out.weights, out.z_loss, out.token_loss

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    results = []
    for fn in (f, compiled):
        x = logits.clone().requires_grad_()
        outs = fn(x, 1e-3)
        outs[0].backward()
        results.append(outs + (x.grad,))
    for name, eager, traced in zip(["loss", "per", "weights", "z", "token", "grad"], *results):
        assert eager.shape == traced.shape and eager.dtype == traced.dtype, name
        assert torch.equal(eager, traced), name
    assert results[1][4].shape == (ids.shape[0], ids.shape[1] - 1)

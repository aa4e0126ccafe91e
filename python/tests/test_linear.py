"""weighted_linear_loss against the unfused computation in float64 (F.linear, then the course
function's steps with the options: conftest's linear_reference), gradients to hidden, weight and
bias through autograd; chunking; which gradients the forward computes; the upstream gradient."""
import pytest
import torch

import fused_weighted_loss as fwl
from conftest import TOL, linear_reference, rel_err, require_cuda, without_host_sync
from test_options import ignored_labels, token_weights_like


def linear_case(seed, device, dtype=torch.float32, b=3, t=7, h=24, v=301, rank=3, bias=False, id_dtype=torch.int64):
    """Hidden states (scale 1), a weight (rows of norm about 3: logits of a few units), an
    optional bias, ids and two keywords that occur, rounded to dtype, as leaves that require a
    gradient."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    if rank == 2:
        hidden = hidden.reshape(b * t, h)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (3.0 / h ** 0.5)
    leaf = lambda x: x.to(dtype).to(device).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g).to(device, id_dtype)
    keywords = [int(ids[0, 1]), int(ids[-1, 2])]
    return dict(hidden=leaf(hidden), weight=leaf(weight),
                bias=leaf(torch.randn(v, generator=g, dtype=torch.float64)) if bias else None,
                ids=ids, keywords=keywords)


def grads_of(case):
    names = ["hidden", "weight"] + (["bias"] if case["bias"] is not None else [])
    return {n: case[n].grad for n in names}


def check_against(case, ref, dtype, scale=1.0, what=""):
    tol = TOL[dtype]
    for name, g in grads_of(case).items():
        assert g is not None and g.dtype == case[name].dtype and g.shape == case[name].shape, (what, name)
        want = getattr(ref, "d_" + name) * scale
        assert rel_err(g, want) <= tol["grad"], (what, name, rel_err(g, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("rank", [3, 2], ids=["BTH", "NH"])
def test_against_float64_reference(device, dtype, bias, rank):
    """Loss and the three gradients (an upstream gradient of 0.5) against F.linear + the course
    function in float64, for hidden [B, T, H] and [B*T, H], with and without a bias."""
    case = linear_case(1, device, dtype, rank=rank, bias=bias, id_dtype=torch.int32 if rank == 2 else torch.int64)
    loss = fwl.weighted_linear_loss(case["hidden"], case["weight"], case["ids"], bias=case["bias"],
                                    keywords=case["keywords"], alpha=1.5)
    (loss * 0.5).backward()
    ref = linear_reference(case["hidden"], case["weight"], case["ids"], case["bias"], case["keywords"], 1.5)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.device == case["hidden"].device
    assert rel_err(loss, ref.loss) <= TOL[dtype]["loss"]
    check_against(case, ref, dtype, 0.5)


def test_matches_the_logits_entry():
    """The same loss as weighted_loss on the logits that F.linear builds (float32)."""
    case = linear_case(2, "cpu", bias=True)
    logits = torch.nn.functional.linear(case["hidden"], case["weight"], case["bias"])
    a = fwl.weighted_linear_loss(case["hidden"], case["weight"], case["ids"], bias=case["bias"],
                                 keywords=case["keywords"])
    b = fwl.weighted_loss(logits, case["ids"], keywords=case["keywords"])
    assert rel_err(a, b) <= 1e-6


ALL = dict(z_loss=1e-3, label_smoothing=0.1, softcap=5.0, token_weights=True)
OPTION_CASES = {
    "z_loss": dict(z_loss=1e-3),
    "label_smoothing": dict(label_smoothing=0.1),
    "softcap": dict(softcap=2.0),
    "token_weights": dict(token_weights=True),
    "labels,ignore_index=-1,valid": dict(labels=True, ignore_index=-1, row_mean="valid"),
    "all,labels,weighted_mean": dict(ALL, labels=True, reduction="weighted_mean"),
    "all,labels,valid,sum": dict(ALL, labels=True, row_mean="valid", reduction="sum", z_loss=0.05),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_options_against_float64_reference(device, name, dtype):
    """The loss options, labels with ignore_index, row means and reductions (as in
    test_options.py), with per-sample outputs, through the linear path."""
    case = linear_case(3, device, dtype, bias=True)
    opts = dict(OPTION_CASES[name])
    if opts.pop("token_weights", False):
        opts["token_weights"] = token_weights_like(case["ids"])
    if opts.pop("labels", False):
        opts["labels"] = ignored_labels(case["ids"], case["weight"].shape[0],
                                        ignore_index=opts.get("ignore_index", -100))
    out = fwl.weighted_linear_loss(case["hidden"], case["weight"], case["ids"], bias=case["bias"],
                                   keywords=case["keywords"], keyword_weights=[2.0, 0.5], return_per_sample=True,
                                   **opts)
    out.loss.backward()
    ref = linear_reference(case["hidden"], case["weight"], case["ids"], case["bias"], case["keywords"],
                           keyword_weights=[2.0, 0.5], **opts)
    tol = TOL[dtype]
    assert rel_err(out.loss, ref.loss) <= tol["loss"], name
    assert rel_err(out.per_sample_loss, ref.per_sample) <= tol["loss"], name
    assert torch.equal(out.weights.cpu(), ref.weights.cpu())
    assert out.token_loss is None
    if opts.get("z_loss", 0.0) > 0:
        assert rel_err(out.z_loss, ref.z_loss) <= tol["loss"], name
    else:
        assert out.z_loss.item() == 0.0
    check_against(case, ref, dtype, what=name)


@pytest.mark.parametrize("chunking", [dict(chunk_rows=1), dict(chunk_rows=4), dict(chunk_rows=1000),
                                      dict(chunk_budget=0), dict(chunk_budget=1 << 30)],
                         ids=["rows=1", "rows=4", "rows=1000", "budget=0", "budget=1G"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_chunking_does_not_change_the_results(device, chunking, dtype):
    """One row per chunk up to one chunk for everything, by rows or by byte budget: the same
    loss and gradients within the tolerances (bf16: d weight and d bias summed over 21 chunks,
    in float32 by default and in bf16 with accumulate_f32=False)."""
    case = linear_case(4, device, dtype, bias=True)
    ref = linear_reference(case["hidden"], case["weight"], case["ids"], case["bias"], case["keywords"])
    for accumulate_f32 in ([True, False] if dtype != torch.float32 else [True]):
        for name in ("hidden", "weight", "bias"):
            case[name].grad = None
        loss = fwl.weighted_linear_loss(case["hidden"], case["weight"], case["ids"], bias=case["bias"],
                                        keywords=case["keywords"], accumulate_f32=accumulate_f32, **chunking)
        loss.backward()
        assert rel_err(loss, ref.loss) <= TOL[dtype]["loss"]
        check_against(case, ref, dtype, what=f"accumulate_f32={accumulate_f32}")


class LinearSpy:
    """Records which gradients each native linear forward was asked to write (the calls still
    run): a tuple of three booleans (hidden, weight, bias) per call."""

    def __init__(self, monkeypatch):
        import fused_weighted_loss._linear as lin

        self.calls = []
        real = lin._native.linear_forward

        def linear_forward(inputs, outputs, *rest):
            self.calls.append(tuple(g is not None for g in outputs[0]))
            return real(inputs, outputs, *rest)

        monkeypatch.setattr(lin._native, "linear_forward", linear_forward)


def test_only_the_gradients_needed_are_computed(device, monkeypatch):
    """A frozen hidden state (or weight, or bias) gets no gradient computed; no gradient at all
    (no input requires one, or torch.no_grad()) is the loss only; the losses agree."""
    spy = LinearSpy(monkeypatch)
    case = linear_case(5, device, bias=True)
    h, w, b, ids = case["hidden"], case["weight"], case["bias"], case["ids"]
    ref = linear_reference(h, w, ids, b)
    losses = [
        fwl.weighted_linear_loss(h, w, ids, bias=b),
        fwl.weighted_linear_loss(h.detach(), w, ids, bias=b),
        fwl.weighted_linear_loss(h, w.detach(), ids, bias=b.detach()),
        fwl.weighted_linear_loss(h.detach(), w.detach(), ids, bias=b.detach()),
        fwl.weighted_linear_loss(h, w, ids),
    ]
    with torch.no_grad():
        losses.append(fwl.weighted_linear_loss(h, w, ids, bias=b))
    assert spy.calls == [(True, True, True), (False, True, True), (True, False, False), (False, False, False),
                         (True, True, False), (False, False, False)]
    assert [x.requires_grad for x in losses] == [True, True, True, False, True, False]
    for x in losses[:4] + losses[5:]:
        assert rel_err(x, ref.loss) <= 1e-5
    # a frozen weight: the gradient of the hidden states alone, right
    losses[2].backward()
    assert w.grad is None and b.grad is None
    assert rel_err(h.grad, ref.d_hidden) <= 1e-5


def test_upstream_gradient_and_accumulation(device):
    """A CUDA upstream gradient is never read on the host; here its value must reach all three
    gradients, and a second loss's gradients add to .grad."""
    case = linear_case(6, device, bias=True)
    h, w, b, ids = case["hidden"], case["weight"], case["bias"], case["ids"]
    ref = linear_reference(h, w, ids, b)
    loss = fwl.weighted_linear_loss(h, w, ids, bias=b)
    grads = torch.autograd.grad(loss, (h, w, b), grad_outputs=torch.tensor(-2.0, device=h.device))
    for g, want in zip(grads, (ref.d_hidden, ref.d_weight, ref.d_bias)):
        assert rel_err(g, -2.0 * want) <= 1e-5
    fwl.weighted_linear_loss(h, w, ids, bias=b).backward()
    (3 * fwl.weighted_linear_loss(h, w, ids, bias=b)).backward()
    for g, want in zip((h.grad, w.grad, b.grad), (ref.d_hidden, ref.d_weight, ref.d_bias)):
        assert rel_err(g, 4 * want) <= 1e-5


def test_second_backward_through_one_graph():
    """As for the logits entry: the kept gradients are scaled in place, so a second backward
    through one graph works while every upstream gradient is 1 (CPU) and raises otherwise."""
    case = linear_case(7, "cpu")
    h, w, ids = case["hidden"], case["weight"], case["ids"]
    loss = fwl.weighted_linear_loss(h, w, ids)
    a = torch.autograd.grad(loss, (h, w), retain_graph=True)
    b = torch.autograd.grad(loss, (h, w), retain_graph=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    loss = fwl.weighted_linear_loss(h, w, ids)
    torch.autograd.grad(loss * 2, (h, w), retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        torch.autograd.grad(loss * 3, (h, w))


def test_sparse_inputs_are_value_errors():
    case = linear_case(7, "cpu")
    h, w, ids = case["hidden"], case["weight"], case["ids"]
    with pytest.raises(ValueError, match=r"weight must be a dense \(strided\) tensor"):
        fwl.weighted_linear_loss(h, w.detach().to_sparse(), ids)
    with pytest.raises(ValueError, match=r"ids must be a dense \(strided\) tensor"):
        fwl.weighted_linear_loss(h, w, ids.to_sparse())


def test_second_backward_raises_under_saved_tensor_hooks():
    """As for the logits entry: with ``save_on_cpu`` a second backward after an in-place scaling
    raises instead of scaling the kept gradients twice."""
    case = linear_case(7, "cpu")
    h, w, ids = case["hidden"], case["weight"], case["ids"]
    with torch.autograd.graph.save_on_cpu():
        loss = fwl.weighted_linear_loss(h, w, ids)
    torch.autograd.grad(loss * 3, (h, w), retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        torch.autograd.grad(loss * 2, (h, w))


def test_gradcheck_float64():
    """torch.autograd.gradcheck with float64 leaves, through the float32 kernels (tolerances as
    for the logits entry's gradcheck): hidden, weight and bias together."""
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[1, 2, 1, 4], [2, 3, 5, 0]])

    def f(h64, w64, b64):
        return fwl.weighted_linear_loss(h64.float(), w64.float(), ids, bias=b64.float(), keywords=[1],
                                        chunk_rows=3).double()

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-2, atol=2e-5, rtol=1e-3)


def test_cuda_runs_on_torchs_current_stream():
    """On a side stream whose hidden states are written after a long device sleep: work queued on
    any other stream would read them before they are written (zeros: a different loss)."""
    dev = require_cuda()
    case = linear_case(9, dev, torch.float32, b=4, t=64, h=256, v=5003, bias=True)
    src, w, b, ids = case["hidden"].detach(), case["weight"], case["bias"], case["ids"]
    ref = linear_reference(src, w, ids, b, case["keywords"])
    x = torch.zeros_like(src).requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        with torch.no_grad():
            x.copy_(src)
        loss = fwl.weighted_linear_loss(x, w, ids, bias=b, keywords=case["keywords"])
        loss.backward()
    torch.cuda.synchronize()
    assert rel_err(loss, ref.loss) <= 1e-5
    assert rel_err(x.grad, ref.d_hidden) <= 1e-5
    assert rel_err(w.grad, ref.d_weight) <= 1e-5 and rel_err(b.grad, ref.d_bias) <= 1e-5


def test_cuda_no_host_synchronisation():
    """Forward and backward return while the device is still busy with earlier work, and torch's
    sync debug mode sees no synchronising call (bf16, several chunks)."""
    dev = require_cuda()
    case = linear_case(10, dev, torch.bfloat16, b=4, t=256, h=512, v=32003)
    h, w, ids = case["hidden"], case["weight"], case["ids"]
    fwl.weighted_linear_loss(h, w, ids, chunk_rows=256).backward()  # loads kernels and cuBLAS once
    torch.cuda.synchronize()
    h.grad = w.grad = None

    def step():
        loss = fwl.weighted_linear_loss(h, w, ids, keywords=case["keywords"], chunk_rows=256)
        loss.backward()
        return loss

    loss = without_host_sync(step)
    ref = linear_reference(h, w, ids, None, case["keywords"])
    assert rel_err(loss, ref.loss) <= TOL[torch.bfloat16]["loss"]
    assert rel_err(h.grad, ref.d_hidden) <= TOL[torch.bfloat16]["grad"]
    assert rel_err(w.grad, ref.d_weight) <= TOL[torch.bfloat16]["grad"]


def test_cuda_check_ids_reports_bad_ids():
    dev = require_cuda()
    case = linear_case(11, dev)
    ids = case["ids"].clone()
    ids[1, 3] = 10_000
    with pytest.raises(ValueError, match=r"ids\[1, 3\] = 10000 is outside \[0, 301\)"):
        fwl.weighted_linear_loss(case["hidden"], case["weight"], ids, check_ids=True)


def test_bf16_weight_gradient_summed_in_float32_over_many_chunks():
    """128 chunks of 4 rows, bf16: d weight and d bias summed in float32 stay within the bf16
    tolerance; summed in bf16 (accumulate_f32=False) the bias gradient drifts past it (about
    2e-2 here), which is why float32 is the default."""
    errors = {}
    for accumulate_f32 in (True, False):
        case = linear_case(4, "cpu", torch.bfloat16, b=8, t=64, h=64, v=3001, bias=True)
        loss = fwl.weighted_linear_loss(case["hidden"], case["weight"], case["ids"], bias=case["bias"], chunk_rows=4,
                                        accumulate_f32=accumulate_f32)
        loss.backward()
        ref = linear_reference(case["hidden"], case["weight"], case["ids"], case["bias"])
        errors[accumulate_f32] = rel_err(case["bias"].grad, ref.d_bias)
        if accumulate_f32:
            check_against(case, ref, torch.bfloat16)
    assert errors[True] <= TOL[torch.bfloat16]["grad"] < errors[False]


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_runs_the_head_in_autocasts_dtype(device, cast):
    """Inside torch.autocast, 16-bit hidden states (what autocast's layers give) with float32
    head parameters: the head runs in autocast's dtype, as F.linear would; the loss and the
    gradients (float32, the parameters' dtype) match float64 on the inputs rounded to it.
    Outside autocast the same dtypes are a TypeError."""
    case = linear_case(11, device, torch.float32, bias=True)
    hidden16 = case["hidden"].detach().to(cast).requires_grad_()
    args = dict(bias=case["bias"], keywords=case["keywords"])
    with pytest.raises(TypeError):
        fwl.weighted_linear_loss(hidden16, case["weight"], case["ids"], **args)
    with torch.autocast(device_type=torch.device(device).type, dtype=cast):
        loss = fwl.weighted_linear_loss(hidden16, case["weight"], case["ids"], **args)
    loss.backward()
    rounded = lambda t: t.detach().to(cast)
    ref = linear_reference(hidden16, rounded(case["weight"]), case["ids"], rounded(case["bias"]), case["keywords"])
    assert loss.dtype == torch.float32 and rel_err(loss, ref.loss) <= TOL[cast]["loss"]
    for name, g, want in (("hidden", hidden16.grad, ref.d_hidden), ("weight", case["weight"].grad, ref.d_weight),
                          ("bias", case["bias"].grad, ref.d_bias)):
        leaf = hidden16 if name == "hidden" else case[name]
        assert g is not None and g.dtype == leaf.dtype, name
        assert rel_err(g, want) <= TOL[cast]["grad"], (name, rel_err(g, want))

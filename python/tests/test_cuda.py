"""CUDA specifics: torch's stream, no host synchronisation, the device left as it was, errors
found on the device, the LLM-sized shapes, torch.compile with inductor/triton. Every test skips
without a usable GPU and fails instead with FWL_REQUIRE_CUDA=1."""

import pytest
import torch

import fused_weighted_loss as fwl
from conftest import TOL, random_case, reference, reference_with_options, rel_err, require_cuda, without_host_sync


def fresh_leaf(t):
    return t.detach().clone().requires_grad_()


def test_runs_on_torchs_current_stream():
    """On a side stream whose logits are written after a long device sleep: a kernel queued on
    any other stream would read the logits before they are written (zeros: a different loss)."""
    dev = require_cuda()
    src, ids, keywords, alpha = random_case(21, dev, dtype=torch.float32, id_dtype=torch.int64, vocabs=(5003,))
    ref_loss, _, _, ref_grad = reference(src, ids, keywords, alpha)
    x = torch.zeros_like(src).requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of device time before the logits are written
        with torch.no_grad():
            x.copy_(src)
        loss = fwl.keytoken_weighted_loss(ids, x, keywords, alpha)
        loss.backward()
    torch.cuda.synchronize()
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(x.grad, ref_grad) <= 1e-5


def test_no_host_synchronisation():
    """Forward and backward return while the device is still busy with earlier work (a long
    sleep queued first), and torch's sync debug mode sees no synchronising call."""
    dev = require_cuda()
    logits, ids, keywords, _ = random_case(22, dev, dtype=torch.bfloat16, id_dtype=torch.int64, vocabs=(5003,))
    x = fresh_leaf(logits)
    fwl.keytoken_weighted_loss(ids, x, keywords).backward()  # loads the kernels once
    torch.cuda.synchronize()
    x.grad = None

    def step():
        loss = fwl.keytoken_weighted_loss(ids, x, keywords)
        loss.backward()
        return loss

    loss = without_host_sync(step)
    ref_loss, _, _, ref_grad = reference(logits, ids, keywords)
    assert rel_err(loss, ref_loss) <= TOL[torch.bfloat16]["loss"]
    assert rel_err(x.grad, ref_grad) <= TOL[torch.bfloat16]["grad"]


def test_current_device_is_left_as_it_was():
    require_cuda()
    n = torch.cuda.device_count()
    target = torch.device("cuda", n - 1)
    logits, ids, keywords, _ = random_case(23, target, dtype=torch.float32, id_dtype=torch.int64)
    with torch.cuda.device(0):
        x = fresh_leaf(logits)
        loss = fwl.keytoken_weighted_loss(ids, x, keywords)
        loss.backward()
        assert torch.cuda.current_device() == 0
    ref_loss, _, _, ref_grad = reference(logits, ids, keywords)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(x.grad, ref_grad) <= 1e-5
    if n < 2:
        pytest.skip("one GPU: checked on device 0 only (another device's tensors need a second GPU)")


def test_ids_outside_the_vocabulary():
    """Without check_ids nothing waits and the position counts as one without a target (never
    read out of bounds); with it, the crate's error as on CPU."""
    dev = require_cuda()
    logits, ids, _, _ = random_case(24, dev, dtype=torch.float32, id_dtype=torch.int64, vocabs=(257,))
    bad = ids.clone()
    bad[0, 1] = 1000
    loss = fwl.weighted_loss(logits, bad)
    labels = bad.clone()
    labels[0, 1] = -100
    ref_loss, _, _, _ = reference(logits, bad.clamp(max=256), labels=labels)
    assert rel_err(loss, ref_loss) <= 1e-5
    with pytest.raises(ValueError, match=r"ids\[0, 1\] = 1000 is outside \[0, 257\)"):
        fwl.weighted_loss(logits, bad, check_ids=True)
    bad_labels = ids.clone()
    bad_labels[-1, -1] = -7
    with pytest.raises(ValueError, match=r"labels\[.*\] = -7 is outside"):
        fwl.weighted_loss(logits, ids, labels=bad_labels, check_ids=True)
    with pytest.raises(ValueError, match="non-finite loss"):
        fwl.weighted_loss(torch.full_like(logits, float("nan")), ids, check_finite=True)
    assert torch.isfinite(fwl.weighted_loss(logits, ids, check_ids=True))


@pytest.mark.parametrize("shape,dtype", [((4, 128, 50000), torch.bfloat16), ((2, 64, 50000), torch.float32),
                                         ((2, 33, 128256), torch.float16)])
def test_llm_sized_rows(shape, dtype):
    dev = require_cuda()
    g = torch.Generator(device=dev).manual_seed(1)
    logits = (torch.randn(shape, device=dev, generator=g) * 4).to(dtype)
    ids = torch.randint(0, shape[2], shape[:2], device=dev, generator=g)
    keywords = [int(ids[0, 0]), 3, 17]
    x = fresh_leaf(logits)
    loss = fwl.keytoken_weighted_loss(ids, x, keywords)
    loss.backward()
    ref_loss, _, _, ref_grad = reference(logits, ids, keywords)
    assert rel_err(loss, ref_loss) <= TOL[dtype]["loss"]
    assert rel_err(x.grad, ref_grad) <= TOL[dtype]["grad"]


def test_cuda_agrees_with_cpu():
    dev = require_cuda()
    logits, ids, keywords, alpha = random_case(25, "cpu", dtype=torch.float32, id_dtype=torch.int32, vocabs=(1000,))
    out = []
    for d in ("cpu", dev):
        x = fresh_leaf(logits.to(d))
        loss = fwl.keytoken_weighted_loss(ids.to(d), x, keywords, alpha)
        loss.backward()
        out.append((loss.cpu(), x.grad.cpu()))
    assert rel_err(out[1][0], out[0][0]) <= 1e-6
    assert rel_err(out[1][1], out[0][1]) <= 1e-6


def test_compile_fullgraph_inductor_on_cuda():
    dev = require_cuda()
    torch._dynamo.reset()
    logits, ids, keywords, _ = random_case(26, dev, dtype=torch.bfloat16, id_dtype=torch.int64, vocabs=(5003,))
    w = torch.randn(logits.shape[-1], device=dev, dtype=logits.dtype)

    def step(x):
        return fwl.keytoken_weighted_loss(ids, x * w, keywords) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x = fresh_leaf(logits)
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert rel_err(results[1][0], results[0][0]) <= 1e-6
    assert rel_err(results[1][1], results[0][1]) <= 1e-2  # bf16 products rounded in another order


def test_options_without_host_synchronisation():
    """Every option, the per-sample outputs and the per-token losses (copied and narrowed on the
    device): still no synchronising call, and the results right."""
    dev = require_cuda()
    logits, ids, keywords, _ = random_case(27, dev, dtype=torch.bfloat16, id_dtype=torch.int64, vocabs=(5003,))
    w = torch.rand(ids.shape, device=dev)
    opts = dict(keywords=keywords, z_loss=1e-3, label_smoothing=0.1, softcap=5.0, token_weights=w)
    x = fresh_leaf(logits)
    fwl.weighted_loss(x, ids, return_token_loss=True, **opts).loss.backward()  # loads the kernels once
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda._sleep(400_000_000)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fwl.weighted_loss(x, ids, return_token_loss=True, **opts)
        out.loss.backward()
        still_busy = not torch.cuda.current_stream().query()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert still_busy, "the device finished before the call returned: the call waited for it"
    ref = reference_with_options(logits, ids, **opts)
    tol = TOL[torch.bfloat16]
    assert rel_err(out.loss, ref.loss) <= tol["loss"] and rel_err(out.z_loss, ref.z_loss) <= tol["loss"]
    assert rel_err(out.token_loss, ref.token_loss) <= tol["loss"]
    assert rel_err(x.grad, ref.grad) <= tol["grad"]


def test_non_finite_token_weights_on_cuda():
    """Found on the device: reported with check_ids=True (which waits), as on the CPU."""
    dev = require_cuda()
    logits, ids, _, _ = random_case(28, dev, dtype=torch.float32, id_dtype=torch.int64, vocabs=(257,))
    w = torch.ones(ids.shape, device=dev)
    w[-1, -1] = float("nan")
    with pytest.raises(ValueError, match=r"token_weights\[.*\] = NaN is not finite"):
        fwl.weighted_loss(logits, ids, token_weights=w, check_ids=True)
    w[-1, -1] = 0.5
    ref = reference_with_options(logits, ids, token_weights=w)
    assert rel_err(fwl.weighted_loss(logits, ids, token_weights=w, check_ids=True), ref.loss) <= 1e-5


def test_options_agree_with_cpu():
    dev = require_cuda()
    logits, ids, keywords, alpha = random_case(29, "cpu", dtype=torch.float32, id_dtype=torch.int32, vocabs=(1000,))
    w = torch.rand(ids.shape)
    out = []
    for d in ("cpu", dev):
        x = fresh_leaf(logits.to(d))
        r = fwl.weighted_loss(x, ids.to(d), keywords=keywords, alpha=alpha, z_loss=1e-3, label_smoothing=0.2,
                              softcap=10.0, token_weights=w.to(d), return_token_loss=True)
        r.loss.backward()
        out.append([t.cpu() for t in (r.loss, r.per_sample_loss, r.z_loss, r.token_loss, x.grad)])
    # tanh and exp are computed by different means on each (the crate's CPU/GPU bound)
    for name, c, g in zip(["loss", "per_sample", "z_loss", "token_loss", "grad"], *out):
        assert rel_err(g, c) <= 1e-5, name

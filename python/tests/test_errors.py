"""Every bad input is a Python exception carrying the crate's message, never a crash (a crash
would take this test process down with it)."""
import pytest
import torch

import fused_weighted_loss as fwl

B, T, V = 2, 5, 11


def inputs(**over):
    g = torch.Generator().manual_seed(0)
    x = dict(
        logits=torch.randn(B, T, V, generator=g).requires_grad_(),
        ids=torch.randint(0, V, (B, T), generator=g),
    )
    x.update(over)
    return x


def call(**kw):
    x = inputs(**{k: kw.pop(k) for k in ("logits", "ids") if k in kw})
    return fwl.weighted_loss(x["logits"], x["ids"], **kw)


CASES = [
    # shapes (crate messages)
    (dict(logits=torch.randn(B * T, V)), ValueError, r"logits must have rank 3 \[batch, seq, vocab\], got rank 2"),
    (dict(ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError,
     r"shape mismatch: ids has shape \[2, 6\], expected \[2, 5\]"),
    (dict(ids=torch.zeros(B * T, dtype=torch.long)), ValueError, r"ids must have rank 2 \[batch, seq\]"),
    (dict(labels=torch.zeros(B, T - 1, dtype=torch.long)), ValueError, r"shape mismatch: labels has shape"),
    (dict(logits=torch.randn(B, 1, V), ids=torch.zeros(B, 1, dtype=torch.long)), ValueError,
     r"sequence length is 1; at least 2 is needed"),
    (dict(logits=torch.randn(0, T, V), ids=torch.zeros(0, T, dtype=torch.long)), ValueError, r"batch size is 0"),
    (dict(logits=torch.randn(B, T, 0), ids=torch.zeros(B, T, dtype=torch.long)), ValueError,
     r"vocabulary size is 0"),
    # values (crate messages)
    (dict(ids=torch.tensor([[1, 2, 3, 4, 5], [6, 7, 99, 8, 9]])), ValueError, r"ids\[1, 2\] = 99 is outside \[0, 11\)"),
    (dict(ids=torch.tensor([[1, 2, 3, 4, 5], [6, 7, -3, 8, 9]])), ValueError, r"ids\[1, 2\] = -3 is outside"),
    (dict(labels=torch.full((B, T), 11)), ValueError, r"labels\[0, 0\] = 11 is outside \[0, 11\)"),
    (dict(keywords=[3, 11]), ValueError, r"keyword id 11 is outside \[0, 11\)"),
    (dict(alpha=-1.0), ValueError, r"alpha must be finite and >= 0, got -1"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be finite and >= 0, got NaN"),
    # a lazy negation: its memory holds the values before it, which were read as they lie
    (dict(logits=torch._neg_view(torch.randn(B, T, V))), ValueError, r"logits carries a lazy negation"),
    # a tensor that requires grad: it got no gradient, silently (the course function gives it one)
    (dict(alpha=torch.tensor(2.0, requires_grad=True)), TypeError, r"alpha must be a float \(a tensor that requires grad"),
    (dict(keywords=[3], keyword_weights=[-2.0]), ValueError, r"weight of keyword 3 must be finite and >= 0, got -2"),
    (dict(keywords=[3, 4], keyword_weights=[1.0]), ValueError, r"keyword_weights has 1 entries for 2 keywords"),
    (dict(row_mean="median"), ValueError, r"unknown row mean 'median' \(expected all or valid\)"),
    (dict(reduction="max"), ValueError, r"unknown reduction 'max' \(expected mean, weighted_mean or sum\)"),
    # the mode string's separator: a misread mode ("unknown or repeated option ''") before
    (dict(reduction="mean:sum"), ValueError, r"unknown reduction 'mean:sum'"),
    (dict(row_mean="all:valid"), ValueError, r"unknown row_mean 'all:valid'"),
    # the split's rows per exchange, checked with or without a group (-5 was taken as 1, 0 as
    # the default, 2.5 as 2)
    (dict(chunk_rows=0), ValueError, r"chunk_rows must be >= 1 \(or None for the default\), got 0"),
    (dict(chunk_rows=-5), ValueError, r"chunk_rows must be >= 1 \(or None for the default\), got -5"),
    (dict(chunk_rows=2.5), TypeError, r"chunk_rows must be an int or None, got 2.5"),
    (dict(chunk_rows=True), TypeError, r"chunk_rows must be an int or None, got True"),
    (dict(logits=torch.full((B, T, V), float("nan")), check_finite=True), ValueError,
     r"non-finite loss NaN at sample 0, position 0"),
    # the options (crate messages)
    (dict(z_loss=-1e-4), ValueError, r"z_loss must be finite and >= 0, got -0.0001"),
    (dict(z_loss=float("inf")), ValueError, r"z_loss must be finite and >= 0, got inf"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
    (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing must be in \[0, 1\], got NaN"),
    (dict(softcap=0.0), ValueError, r"softcap must be finite and > 0, got 0"),
    (dict(softcap=-30.0), ValueError, r"softcap must be finite and > 0, got -30"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be finite and > 0, got inf"),
    (dict(z_loss="a lot"), ValueError, r"could not convert string to float"),
    (dict(token_weights=torch.ones(B, T - 1)), ValueError,
     r"shape mismatch: token_weights has shape \[2, 4\], expected \[2, 5\]"),
    (dict(token_weights=torch.ones(B * T)), ValueError, r"token_weights must have rank 2 \[batch, seq\], got rank 1"),
    (dict(token_weights=torch.tensor([[1.0, 1, 1, float("nan"), 1], [1.0] * T])), ValueError,
     r"token_weights\[0, 3\] = NaN is not finite"),
    (dict(token_weights=torch.tensor([[1.0] * T, [1.0, float("-inf"), 1, 1, 1]])), ValueError,
     r"token_weights\[1, 1\] = -inf is not finite"),
    # dtypes
    (dict(logits=torch.randn(B, T, V, dtype=torch.float64)), TypeError,
     r"logits must be float32, float16 or bfloat16, got float64"),
    (dict(ids=torch.zeros(B, T, dtype=torch.int16)), TypeError, r"ids must be int64 or int32, got int16"),
    (dict(ids=torch.zeros(B, T, dtype=torch.float32)), TypeError, r"ids must be int64 or int32, got float32"),
    (dict(labels=torch.zeros(B, T, dtype=torch.int32)), TypeError, r"labels must have the ids' dtype \(int64\), got int32"),
    (dict(keywords=["a"]), TypeError, r"keywords must be a sequence of int token ids"),
    (dict(keywords=[1.5]), TypeError, r"keywords must be a sequence of int token ids"),
    (dict(keywords=[True]), TypeError, r"keywords must be a sequence of int token ids"),
    (dict(keywords=[2 ** 70]), ValueError, r"a keyword id = 1180591620717411303424 does not fit in 64 bits"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int, got 1.5"),
    (dict(ignore_index=2 ** 70), ValueError, r"ignore_index = 1180591620717411303424 does not fit in 64 bits"),
    (dict(logits=[[[0.0]]]), TypeError, r"logits and ids must be torch tensors"),
    (dict(token_weights=torch.ones(B, T, dtype=torch.float64)), TypeError,
     r"token_weights must be float32, got float64"),
    (dict(token_weights=torch.ones(B, T, dtype=torch.bool)), TypeError, r"token_weights must be float32, got bool"),
    (dict(token_weights=[[1.0] * T] * B), TypeError, r"token_weights must be a torch tensor or None"),
    # devices
    (dict(logits=torch.randn(B, T, V, device="meta")), ValueError, r"ids is on cpu, the logits on meta"),
    (dict(labels=torch.zeros(B, T, dtype=torch.long, device="meta")), ValueError, r"labels is on meta, the logits on cpu"),
    (dict(token_weights=torch.ones(B, T, device="meta")), ValueError, r"token_weights is on meta, the logits on cpu"),
    # layouts: the package's message, not torch's from `.contiguous()` of a sparse tensor
    (dict(logits=torch.randn(B, T, V).to_sparse()), ValueError, r"logits must be a dense \(strided\) tensor"),
    (dict(ids=torch.zeros(B, T, dtype=torch.long).to_sparse()), ValueError, r"ids must be a dense \(strided\) tensor"),
    (dict(token_weights=torch.ones(B, T).to_sparse()), ValueError, r"token_weights must be a dense \(strided\) tensor"),
    # a nested tensor's layout is strided too, but it has no sizes to read
    (dict(logits=torch.nested.nested_tensor([torch.randn(T, V)] * B)), ValueError,
     r"logits must be a dense \(strided\) tensor, got a nested tensor"),
    # the split's entry checks the same before any pointer is read
    (dict(logits=torch.randn(B, T, V, device="meta"), ids=torch.zeros(B, T, dtype=torch.long, device="meta"),
          vocab_start=0), ValueError, r"logits is on meta: only CPU and CUDA tensors are supported"),
]


@pytest.mark.parametrize("kwargs,exc,message", CASES, ids=[m[:40] for _, _, m in CASES])
def test_bad_input_raises_with_the_crates_message(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        call(**kwargs)


def test_the_op_itself_refuses_non_contiguous_tensors():
    x = inputs()
    strided = x["logits"].detach().transpose(0, 1)
    with pytest.raises(ValueError, match=r"logits must be contiguous"):
        torch.ops.fused_weighted_loss.loss(strided, x["ids"].t(), None, None, [], [], "all:mean:")
    w = torch.ones(T, B).t()
    with pytest.raises(ValueError, match=r"token_weights must be contiguous"):
        torch.ops.fused_weighted_loss.loss(x["logits"].detach(), x["ids"], None, w, [], [], "all:mean:")



def test_the_public_scale_op_refuses_what_it_cannot_write():
    """torch.ops.fused_weighted_loss.scale_grad_ is callable directly: on CUDA it writes numel()
    elements from the data pointer, so a strided, expanded or wrongly typed gradient is refused
    (on every device, the same rules)."""
    scale = torch.tensor(2.0)
    base = torch.randn(4, 6)
    for bad, message in ((base.t(), "grad must be contiguous"), (torch.randn(6).expand(4, 6), "grad must be contiguous"),
                         (base.double(), "grad must be float32"), (base, "scale must hold one number")):
        s = torch.ones(2) if message.startswith("scale") else scale
        with pytest.raises(ValueError, match=message):
            torch.ops.fused_weighted_loss.scale_grad_(bad, s)
    g = base.clone()
    torch.ops.fused_weighted_loss.scale_grad_(g, scale)
    assert torch.equal(g, base * 2)


@pytest.mark.parametrize("mode,message", [
    ("all:mean", r"mode must be 'row_mean:reduction:flags\[:name=value...\]'"),
    ("all:mean::softcap=1:softcap=2", r"unknown or repeated option 'softcap'"),
    ("all:mean::temperature=2", r"unknown or repeated option 'temperature'"),
    ("all:mean::z_loss=abc", r"z_loss must be a float, got 'abc'"),
    ("all:mean::ignore_index=1.5", r"ignore_index must be an int, got '1.5'"),
])
def test_the_op_refuses_bad_mode_strings(mode, message):
    x = inputs()
    with pytest.raises(ValueError, match=message):
        torch.ops.fused_weighted_loss.loss(x["logits"].detach(), x["ids"], None, None, [], [], mode)


def test_errors_leave_the_process_usable():
    for kwargs, exc, _ in CASES:
        with pytest.raises(exc):
            call(**kwargs)
    x = inputs()
    loss = fwl.weighted_loss(x["logits"], x["ids"])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x["logits"].grad).all()


def test_cuda_tensors_in_a_build_or_place_without_cuda():
    """Where torch has a GPU but this package cannot use it, a CUDA tensor is a RuntimeError."""
    if not torch.cuda.is_available():
        pytest.skip("skipped, no GPU: torch sees no CUDA device")
    if fwl.cuda_available():
        pytest.skip("skipped: this build runs on CUDA (covered by test_cuda.py)")
    x = inputs()
    with pytest.raises(RuntimeError, match="CUDA"):
        fwl.weighted_loss(x["logits"].cuda(), x["ids"].cuda())


def test_timing_counts_are_bounded():
    """The native timing call (benches/python_overhead.py) with a count near 2^62 raised a Rust
    PanicException ("capacity overflow") with a backtrace; now a ValueError."""
    from fused_weighted_loss import _native

    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 3, 5, generator=g), torch.randint(0, 5, (2, 3), generator=g)
    arg = lambda t: (t.data_ptr(), list(t.shape), str(t.dtype).removeprefix("torch."))
    options = ([], [], 1.0, -100, "all", "mean", False, 0.0, 0.0, None)
    for warmup, iters in ((0, 2 ** 62), (2 ** 62, 1)):
        with pytest.raises(ValueError, match=r"warmup and iters must be at most 1000000"):
            _native.time_rust_call(arg(logits), arg(ids), options, warmup, iters, False)
    assert len(_native.time_rust_call(arg(logits), arg(ids), options, 1, 3, False)) == 3

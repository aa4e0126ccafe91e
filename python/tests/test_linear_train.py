"""weighted_linear_loss in models: a training step with an nn.Linear head and with a tied
embedding against the unfused step (F.linear + the course function), torch.compile(fullgraph=True)
forward and backward, and bad inputs (exceptions with the crate's messages, never a crash)."""
import copy

import pytest
import torch

import fused_weighted_loss as fwl
from conftest import course_keytoken_weighted_loss, rel_err, train_side_by_side


class TinyLM(torch.nn.Module):
    """Embedding -> tanh MLP -> hidden states; the vocabulary head is an nn.Linear (with a bias)
    or, tied, the embedding's weight."""

    def __init__(self, vocab=64, dim=16, tied=False):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Linear(dim, dim)
        self.tied = tied
        self.head = None if tied else torch.nn.Linear(dim, vocab)

    def hidden(self, ids):
        return torch.tanh(self.mlp(self.emb(ids)))

    def head_params(self):
        return (self.emb.weight, None) if self.tied else (self.head.weight, self.head.bias)


def unfused_loss(model, ids, keys):
    w, b = model.head_params()
    return course_keytoken_weighted_loss(ids, torch.nn.functional.linear(model.hidden(ids), w, b), keys)


def fused_loss(model, ids, keys):
    w, b = model.head_params()
    return fwl.weighted_linear_loss(model.hidden(ids), w, ids, bias=b, keywords=keys)


def batch(device, vocab=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    return ids.to(device), [int(ids[0, 3]), int(ids[2, 5]), 7]


def models(device, seed=0, tied=False):
    torch.manual_seed(seed)
    a = TinyLM(tied=tied).to(device)
    return a, copy.deepcopy(a)


@pytest.mark.parametrize("tied", [False, True], ids=["linear_head", "tied_embedding"])
def test_training_steps_match_the_unfused_steps(device, tied):
    """Three AdamW steps with F.linear + the course function and with weighted_linear_loss: the
    losses and every parameter agree to float32 rounding. Tied: the embedding's weight gets the
    head's gradient from the op and the lookup's from autograd, summed."""
    ref_model, our_model = models(device, tied=tied)
    ids, keys = batch(device)
    train_side_by_side(ref_model, lambda: unfused_loss(ref_model, ids, keys), our_model,
                       lambda: fused_loss(our_model, ids, keys), 3, torch.optim.AdamW, lr=1e-2)
    for (name, pa), pb in zip(ref_model.named_parameters(), our_model.parameters()):
        assert rel_err(pb, pa) <= 1e-5, name
    assert not torch.equal(our_model.emb.weight, models(device, tied=tied)[0].emb.weight)


def test_compiled_training_step_fullgraph_matches_eager(device):
    """Model and fused loss compiled with fullgraph=True (inductor; fullgraph raises on a graph
    break): the same loss and gradients as the eager step, two SGD steps."""
    torch._dynamo.reset()
    eager_model, compiled_model = models(device, seed=3)
    ids, keys = batch(device)
    compiled = torch.compile(lambda i: fused_loss(compiled_model, i, keys), fullgraph=True)
    train_side_by_side(eager_model, lambda: fused_loss(eager_model, ids, keys), compiled_model,
                       lambda: compiled(ids), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compile_options_per_sample_and_frozen_weight(device, dtype):
    """Options, per-sample outputs, an upstream gradient, a frozen weight and a [B*T, H] hidden
    under fullgraph tracing (aot_eager: dynamo and AOTAutograd with the fake implementation):
    bit-identical to eager."""
    g = torch.Generator().manual_seed(12)
    b, t, h, v = 3, 6, 8, 40
    hidden = torch.randn(b * t, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(device, dtype)
    bias = torch.randn(v, generator=g).to(device, dtype)
    ids = torch.randint(0, v, (b, t), generator=g).to(device, torch.int32)
    labels = ids.clone()
    labels[:, 2] = -100
    keyword = int(ids[0, 0])

    def f(x, bias):
        out = fwl.weighted_linear_loss(x * 1.0, weight, ids, labels=labels, bias=bias, keywords=[keyword],
                                       keyword_weights=[2.0], row_mean="valid", reduction="weighted_mean",
                                       z_loss=1e-3, label_smoothing=0.1, softcap=3.0, chunk_rows=5,
                                       return_per_sample=True)
        return out.loss * 3.0, out.per_sample_loss, out.weights, out.z_loss

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        x, bb = hidden.clone().requires_grad_(), bias.clone().requires_grad_()
        loss, per, w, z = fn(x, bb)
        loss.backward()
        results.append((loss.detach(), per, w, z, x.grad, bb.grad))
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


B, T, H, V = 2, 5, 4, 11


def call(**over):
    g = torch.Generator().manual_seed(0)
    x = dict(hidden=torch.randn(B, T, H, generator=g).requires_grad_(), weight=torch.randn(V, H, generator=g),
             ids=torch.randint(0, V, (B, T), generator=g))
    x.update({k: over.pop(k) for k in ("hidden", "weight", "ids") if k in over})
    return fwl.weighted_linear_loss(x["hidden"], x["weight"], x["ids"], **over)


ERRORS = [
    # shapes (crate messages)
    (dict(hidden=torch.randn(B, T, H + 1)), ValueError, r"shape mismatch: hidden has shape \[2, 5, 5\], expected \[2, 5, 4\]"),
    (dict(hidden=torch.randn(B * T + 1, H)), ValueError, r"shape mismatch: hidden has shape \[11, 4\], expected \[10, 4\]"),
    (dict(hidden=torch.randn(B, T, 1, H)), ValueError,
     r"hidden must be \[batch, seq, hidden\] or \[batch \* seq, hidden\], got rank 4 \[2, 5, 1, 4\]"),
    (dict(weight=torch.randn(V * H)), ValueError, r"weight must be \[vocab, hidden\], got rank 1 \[44\]"),
    (dict(weight=torch.randn(V, H + 2)), ValueError, r"shape mismatch: hidden has shape \[2, 5, 4\], expected \[2, 5, 6\]"),
    (dict(ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError,
     r"shape mismatch: hidden has shape \[2, 5, 4\], expected \[2, 6, 4\]"),
    (dict(ids=torch.zeros(B * T, dtype=torch.long)), ValueError, r"ids must have rank 2 \[batch, seq\]"),
    (dict(bias=torch.zeros(V + 1)), ValueError, r"shape mismatch: bias has shape \[12\], expected \[11\]"),
    (dict(labels=torch.zeros(B, T - 1, dtype=torch.long)), ValueError, r"shape mismatch: labels has shape"),
    (dict(token_weights=torch.ones(B, T - 1)), ValueError, r"shape mismatch: token_weights has shape \[2, 4\]"),
    (dict(hidden=torch.randn(B, 1, H), ids=torch.zeros(B, 1, dtype=torch.long)), ValueError,
     r"sequence length is 1; at least 2 is needed"),
    (dict(hidden=torch.randn(B, T, 0), weight=torch.randn(V, 0)), ValueError, r"hidden size is 0"),
    (dict(weight=torch.randn(0, H), ids=torch.zeros(B, T, dtype=torch.long)), ValueError, r"vocabulary size is 0"),
    # values and options (crate messages)
    (dict(ids=torch.tensor([[1, 2, 3, 4, 5], [6, 7, 99, 8, 9]])), ValueError, r"ids\[1, 2\] = 99 is outside \[0, 11\)"),
    (dict(keywords=[3, 11]), ValueError, r"keyword id 11 is outside \[0, 11\)"),
    (dict(alpha=-1.0), ValueError, r"alpha must be finite and >= 0, got -1"),
    (dict(z_loss=-1e-4), ValueError, r"z_loss must be finite and >= 0, got -0.0001"),
    (dict(softcap=0.0), ValueError, r"softcap must be finite and > 0, got 0"),
    (dict(reduction="max"), ValueError, r"unknown reduction 'max'"),
    # (as the logits path says it: -3 was "must be >= 0", and 0 was refused by another message)
    (dict(chunk_rows=0), ValueError, r"chunk_rows must be >= 1 \(or None for the default\), got 0"),
    (dict(chunk_rows=-3), ValueError, r"chunk_rows must be >= 1 \(or None for the default\), got -3"),
    (dict(alpha=torch.tensor(2.0, requires_grad=True)), TypeError, r"alpha must be a float \(a tensor that requires grad"),
    (dict(chunk_rows=4, chunk_budget=1 << 20), ValueError, r"invalid chunking: give chunk_rows or chunk_budget"),
    (dict(chunk_rows=2.5), TypeError, r"chunk_rows must be an int or None, got 2.5"),
    (dict(chunk_rows=True), TypeError, r"chunk_rows must be an int or None, got True"),
    (dict(chunk_rows=2 ** 70), ValueError, r"chunk_rows = 1180591620717411303424 does not fit in 64 bits"),
    (dict(hidden=torch.full((B, T, H), float("nan")), check_finite=True), ValueError, r"non-finite loss NaN"),
    # dtypes
    (dict(hidden=torch.randn(B, T, H, dtype=torch.float64)), TypeError,
     r"hidden must be float32, float16 or bfloat16, got float64"),
    (dict(weight=torch.randn(V, H, dtype=torch.bfloat16)), TypeError,
     r"weight must have the hidden states' dtype \(float32\), got bfloat16"),
    (dict(bias=torch.zeros(V, dtype=torch.float16)), TypeError,
     r"bias must have the hidden states' dtype \(float32\), got float16"),
    (dict(ids=torch.zeros(B, T, dtype=torch.int16)), TypeError, r"ids must be int64 or int32, got int16"),
    (dict(labels=torch.zeros(B, T, dtype=torch.int32)), TypeError, r"labels must have the ids' dtype"),
    (dict(token_weights=torch.ones(B, T, dtype=torch.float64)), TypeError, r"token_weights must be float32"),
    (dict(hidden=[[0.0]]), TypeError, r"hidden must be a torch tensor"),
    (dict(bias=[0.0] * V), TypeError, r"bias must be a torch tensor or None"),
    # devices
    (dict(weight=torch.randn(V, H, device="meta")), ValueError, r"weight is on meta, the hidden states on cpu"),
    (dict(bias=torch.zeros(V, device="meta")), ValueError, r"bias is on meta, the hidden states on cpu"),
    (dict(ids=torch.zeros(B, T, dtype=torch.long, device="meta")), ValueError, r"ids is on meta, the hidden states"),
]


@pytest.mark.parametrize("kwargs,exc,message", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_bad_input_raises_with_the_crates_message(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        call(**kwargs)


def test_the_op_refuses_non_contiguous_tensors_and_bad_modes():
    h, w, ids = torch.randn(B, T, H), torch.randn(H, V).t(), torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must be contiguous"):
        torch.ops.fused_weighted_loss.linear_loss(h, w, None, ids, None, None, [], [], "all:mean:")
    with pytest.raises(ValueError, match=r"unknown or repeated option 'chunk_rows'"):
        torch.ops.fused_weighted_loss.linear_loss(h, w.contiguous(), None, ids, None, None, [], [],
                                                  "all:mean::chunk_rows=2:chunk_rows=3")
    with pytest.raises(ValueError, match=r"unknown or repeated option 'chunk_rows'"):
        torch.ops.fused_weighted_loss.loss(torch.randn(B, T, V), ids, None, None, [], [], "all:mean::chunk_rows=2")
    with pytest.raises(RuntimeError, match=r"the forward computed no gradient for weight"):
        w = torch.randn(V, H, requires_grad=True)
        loss = torch.ops.fused_weighted_loss.linear_loss(h, w, None, ids, None, None, [], [], "all:mean:")[0]
        loss.backward()


def test_errors_leave_the_process_usable():
    for kwargs, exc, _ in ERRORS:
        with pytest.raises(exc):
            call(**kwargs)
    loss = call(bias=torch.zeros(V, requires_grad=True))
    loss.backward()
    assert torch.isfinite(loss)


def test_cuda_tensors_in_a_build_or_place_without_cuda():
    if not torch.cuda.is_available():
        pytest.skip("skipped, no GPU: torch sees no CUDA device")
    if fwl.cuda_available():
        pytest.skip("skipped: this build runs on CUDA (covered by test_linear.py)")
    with pytest.raises(RuntimeError, match="CUDA"):
        call(hidden=torch.randn(B, T, H).cuda(), weight=torch.randn(V, H).cuda(), ids=torch.zeros(B, T).long().cuda())

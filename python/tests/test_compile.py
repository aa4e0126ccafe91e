"""torch.compile(fullgraph=True) and a training step against the course function's."""
import copy

import pytest
import torch

import fused_weighted_loss as fwl
from conftest import course_keytoken_weighted_loss, random_case, rel_err, train_side_by_side


class TinyLM(torch.nn.Module):
    """Embedding -> tanh MLP -> vocabulary logits: enough to train a step."""

    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.emb(ids))))


def train_step(model, opt, ids, loss_fn):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(ids, model(ids))
    loss.backward()
    opt.step()
    return loss.detach()


def models(device, seed=0):
    torch.manual_seed(seed)
    a = TinyLM().to(device)
    b = copy.deepcopy(a)
    return a, b


def batch(device, vocab=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    keys = [int(ids[0, 3]), int(ids[2, 5]), 7]
    return ids.to(device), keys


def test_training_step_matches_course_function(device):
    """Three AdamW steps of the same model with the course function and with this package: the
    losses and every parameter agree to float32 rounding."""
    course_model, our_model = models(device)
    ids, keys = batch(device)
    opt_a = torch.optim.AdamW(course_model.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(our_model.parameters(), lr=1e-2)
    for _ in range(3):
        la = train_step(course_model, opt_a, ids, lambda i, x: course_keytoken_weighted_loss(i, x, keys))
        lb = train_step(our_model, opt_b, ids, lambda i, x: fwl.keytoken_weighted_loss(i, x, keys))
        assert rel_err(lb, la) <= 1e-6
    for (name, pa), pb in zip(course_model.named_parameters(), our_model.parameters()):
        assert rel_err(pb, pa) <= 1e-5, name
    # the steps did something
    assert not torch.equal(next(course_model.parameters()), next(models(device)[0].parameters()))


def test_compiled_training_step_fullgraph_matches_eager(device):
    """A training step whose model and loss are compiled with fullgraph=True (inductor): no graph
    break (fullgraph raises on one), the same loss and parameters as the eager step."""
    torch._dynamo.reset()
    eager_model, compiled_model = models(device, seed=3)
    ids, keys = batch(device)

    def loss_of(model):
        return lambda i: fwl.keytoken_weighted_loss(i, model(i), keys)

    compiled = torch.compile(loss_of(compiled_model), fullgraph=True)
    train_side_by_side(eager_model, lambda: loss_of(eager_model)(ids), compiled_model, lambda: compiled(ids), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compile_options_and_per_sample(device, dtype):
    """The options, the per-sample outputs and an upstream gradient under fullgraph tracing
    (aot_eager: dynamo and AOTAutograd with the fake implementations, no code generation)."""
    logits, ids, _, _ = random_case(12, device, dtype=dtype, id_dtype=torch.int32, vocabs=(100,))
    labels = ids.long().clone()
    labels[:, 2] = -100
    labels = labels.int()
    keyword = int(ids[0, 0])

    def f(x):
        out = fwl.weighted_loss(x * 1.0, ids, labels=labels, keywords=[keyword], keyword_weights=[2.0],
                                row_mean="valid", reduction="weighted_mean", return_per_sample=True)
        return out.loss * 3.0, out.per_sample_loss, out.weights

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        x = logits.clone().requires_grad_()
        loss, per, w = fn(x)
        loss.backward()
        results.append((loss.detach(), per, w, x.grad))
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


def _count_compilations(fn):
    """``torch.compile(fn, fullgraph=True)`` through aot_eager, and its counter of compilations."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter), counter


# a schedule of alpha values a trainer might anneal through (the first one compiles with alpha
# as a constant, the second makes it a symbolic float, the rest reuse that graph)
ALPHAS = [1.0, 0.5, 0.25, 2.0, 3.0, 1e-3, 7.5]


# (the crate reads reductions in any case, with "-" or "_": so must the compiled path's scaling)
@pytest.mark.parametrize("reduction", ["mean", "weighted_mean", "sum", "weighted-mean", "Weighted_Mean"])
def test_changing_alpha_compiles_at_most_twice(device, reduction):
    """A compiled step called with seven values of alpha is compiled at most twice, as the course
    function is (not once per value, which hits dynamo's recompile limit after eight and then
    fails under fullgraph=True), and each value gives eager's loss, weights, z-loss part and
    gradient; 0 and a negative alpha are specialised and behave as in eager mode."""
    logits, ids, _, _ = random_case(21, device, dtype=torch.float32, vocabs=(257,))
    keys = [int(ids[0, 1]), int(ids[-1, -1])]

    def f(x, a):
        out = fwl.weighted_loss(x, ids, keywords=keys, alpha=a, reduction=reduction, z_loss=1e-3,
                                return_per_sample=True)
        return out.loss, out.weights, out.z_loss

    compiled, counter = _count_compilations(f)

    def compare(a):
        results = []
        for fn in (f, compiled):
            x = logits.clone().requires_grad_()
            loss, w, z = fn(x, a)
            (loss * 1.5).backward()
            results.append((loss.detach(), w, z, x.grad))
        return zip(("loss", "weights", "z", "grad"), *results)

    for a in ALPHAS:
        for name, eager, traced in compare(a):
            assert rel_err(traced, eager) <= 1e-6, (a, name)
    assert counter.frame_count <= 2  # the previous code compiled once per value (7)
    # alpha = 0: every weight 0, so the loss and gradient are 0 (also for weighted_mean)
    for name, eager, traced in compare(0.0):
        assert torch.count_nonzero(eager) == 0, name
        assert torch.equal(traced, eager), name
    with pytest.raises(ValueError, match="alpha"):
        compiled(logits.clone().requires_grad_(), -1.0)


def test_changing_alpha_compiles_the_linear_entry_at_most_twice(device):
    """weighted_linear_loss under a schedule of alpha values: at most two compilations, eager's
    loss and gradients of hidden, weight and bias for each."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 6, 16, generator=g).to(device)
    weight = (torch.randn(40, 16, generator=g) * 0.3).to(device)
    bias = torch.randn(40, generator=g).to(device)
    ids = torch.randint(0, 40, (3, 6), generator=g).to(device)
    keys = [int(ids[1, 2])]

    def f(h, w, b, a):
        return fwl.weighted_linear_loss(h, w, ids, bias=b, keywords=keys, alpha=a)

    compiled, counter = _count_compilations(f)
    for a in ALPHAS:
        results = []
        for fn in (f, compiled):
            h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
            loss = fn(h, w, b, a)
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad, b.grad))
        for name, eager, traced in zip(("loss", "hidden", "weight", "bias"), *results):
            assert rel_err(traced, eager) <= 1e-6, (a, name)
    assert counter.frame_count <= 2


def test_the_whole_vocabulary_named_without_a_group_compiles_fullgraph():
    """vocab_start=0 and vocab_size=V without a process group (code that always passes them) is
    no split: the registered op, which torch.compile(fullgraph=True) traces; any other slice
    without a group is a ValueError."""
    logits, ids, keys = random_case(3, "cpu")[:3]
    v = logits.shape[-1]
    eager = fwl.weighted_loss(logits, ids, keywords=keys)
    f = torch.compile(lambda x, i: fwl.weighted_loss(x, i, keywords=keys, vocab_start=0, vocab_size=v),
                      fullgraph=True)
    assert rel_err(f(logits, ids), eager) <= 1e-6
    for start, size in ((1, v), (0, v + 1)):
        with pytest.raises(ValueError, match="process_group"):
            fwl.weighted_loss(logits, ids, keywords=keys, vocab_start=start, vocab_size=size)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
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

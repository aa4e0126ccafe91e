"""Vocabulary-parallel, data-parallel and 2x2 calls as real separate processes under torchrun
(gloo, CPU tensors; ``[nccl]``: NCCL on the GPUs this machine has, one rank per GPU, or a world
of one), against the single-process result: within 1e-6 relative for float32 logits, the same
loss bits on every rank and on a rerun, and a typed error on every rank for slices that do not
tile the vocabulary (a gap, or every rank claiming all of it), for ranks that name different
vocabularies and for a non-finite loss with check_finite on one rank of a data group; slices
re-tiled between calls are checked again. With gloo, errors one rank alone has (FAILURES: ids
outside the vocabulary, a vocabulary group's rank with one sample fewer, on the logits, the fused
linear and a grid's split, a check of the Python or the native layer) raise on every rank, that
rank's own error there and the error that names it on the others, none left waiting, and the
next call is right. In this process, with a group of
one: a float16 backward from a loss scale above float16's range. dist_worker.py is the rank's
side."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import require_cuda

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def torchrun(tmp_path, nproc, backend):
    """The worker on ``nproc`` ranks, with NumPy hidden from them: torch does not need it, so the
    package must not either (torch's object collectives do, through ``Tensor.numpy``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", WORKER,
           str(tmp_path), backend]
    hide = tmp_path / "no_numpy" / "numpy"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ModuleNotFoundError("NumPy is hidden from the ranks of this test", name="numpy")\n')
    path = os.pathsep.join(p for p in (str(hide.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    ranks = []
    for r in range(nproc):
        with open(tmp_path / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    return ranks


SHAPE = "ValueError", "of the vocabulary group was called with ids of shape [B, T] = "
# failure_cases of dist_worker.py (4 gloo ranks): the rank whose inputs are wrong, the start and a
# part of its error, a function of the other ranks giving theirs (None: the same as its own)
FAILURES = {
    "badids": (3, ("ValueError", "is outside [0, 1000)"),
               lambda r: ("ValueError", "rank 3 of the data group failed")),
    "shape": (1, ("ValueError", "rank 1 " + SHAPE[1] + "[4, 7], rank 0 with [5, 7]"), None),
    "linear shape": (2, ("ValueError", "rank 2 " + SHAPE[1] + "[4, 7], rank 0 with [5, 7]"), None),
    # ranks 0 and 1 (a vocabulary group) see it, ranks 2 and 3 from their data groups
    "grid shape": (1, ("ValueError", "rank 1 " + SHAPE[1] + "[1, 7], rank 0 with [2, 7]"),
                   lambda r: ("ValueError", "rank 1 " + SHAPE[1] if r == 0 else "rank 0 of the data group failed")),
    "python check": (2, ("ValueError", "kept_grad_dtype must be"),
                     lambda r: ("ValueError", "rank 2 of the vocabulary group failed")),
    "native check": (0, ("TypeError", "token_weights must be float32"),
                     lambda r: ("ValueError", "rank 0 of the data group failed")),
    # a negative vocab_start failed only in the native call's argument conversion, after this
    # rank's checks: its peers waited in gloo until the timeout
    "negative start": (1, ("ValueError", "vocab_start must be in [0, 2^63), got -1"),
                       lambda r: ("ValueError", "rank 1 of the vocabulary group failed")),
    # ranks of a group that make different calls: every rank raises the same error
    "options": (2, ("ValueError", "rank 2 of the vocabulary group made another call than rank 0: its loss options"),
                None),
    "chunking": (3, ("ValueError", "rank 3 of the vocabulary group made another call than rank 0: its call or its "
                                   "chunking"), None),
    "ids": (1, ("ValueError", "rank 1 of the vocabulary group made another call than rank 0: its ids, labels"),
            None),
    "data options": (0, ("ValueError", "rank 1 of the data group made another call than rank 0: its loss options"),
                     None),
}


def judge(ranks):
    world = ranks[0]["world"]
    by_case = {}
    for r in ranks:
        for res in r["results"]:
            by_case.setdefault(res["case"], []).append(res)
    checked = 0
    for case, per_rank in by_case.items():
        assert len(per_rank) == world, case
        if case in ("overlap", "duplicate"):
            if world > 1:
                assert all(p["error"] and "do not tile" in p["error"] for p in per_rank), per_rank
            continue
        if case == "vocab":
            # a world of one: its slice does not cover the vocabulary it names
            want = "different vocabularies" if world > 1 else "do not tile"
            assert all(p["error"] and want in p["error"] for p in per_rank), per_rank
            continue
        if case == "rerun":
            continue
        if case in FAILURES:
            # (own rank, what it raises, what the others raise; None: what the own rank raises)
            own, mine, others = FAILURES[case]
            errors = [p["error"] for p in per_rank]
            for r, e in enumerate(errors):
                want = mine if r == own or others is None else others(r)
                assert e and e.startswith(want[0]) and want[1] in e, (case, r, errors)
            continue
        if case == "finite":
            # rank 0 holds the non-finite position; every rank fails, none waits
            errors = [p["error"] for p in per_rank]
            assert errors[0] and "non-finite loss" in errors[0] and "data group" not in errors[0], errors
            assert all(e and "over the data group" in e for e in errors[1:]), errors
            continue
        bf16 = "bfloat16" in case
        # bf16 logits: the gradient comes back in bf16 (rounded), the loss is computed in f32
        grad_tol, loss_tol = (1e-2, 1e-5) if bf16 else (1e-6, 1e-6)
        for p in per_rank:
            assert p["rel_loss"] <= loss_tol, (case, p)
            assert p["rel_z"] <= loss_tol, (case, p)
            assert p["rel_grad"] <= grad_tol, (case, p)
            assert p["rel_per_sample"] <= loss_tol, (case, p)
            # (the logits cases: the fused linear ones return no per-token losses)
            assert ("linear" in case) != ("rel_token_loss" in p), (case, p)
            assert p.get("rel_token_loss", 0.0) <= loss_tol, (case, p)
        # every rank merged the same numbers in the same order
        assert len({p["loss_bits"] for p in per_rank}) == 1, (case, [p["loss_bits"] for p in per_rank])
        checked += 1
    first = by_case["vocab torch.float32 opts0 chunkNone"]
    assert [p["loss_bits"] for p in first] == [p["loss_bits"] for p in by_case["rerun"]], "rerun bits"
    return checked


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_torchrun_four_cpu_ranks_gloo(tmp_path):
    ranks = torchrun(tmp_path, 4, "gloo")
    # 2 dtypes x 3 option sets x (vocab twice, data, data with an empty rank, grid), the fused
    # linear split: 3 option sets x (vocab, vocab with d hidden summed by hand, data, data with
    # an empty rank, grid), the re-tiled slices, and the call after the failures (FAILURES, each
    # judged apart)
    judged = {r["case"] for r in ranks[0]["results"]}
    assert set(FAILURES) <= judged, sorted(set(FAILURES) - judged)
    assert judge(ranks) == 2 * 3 * 5 + 3 * 5 + 1 + 1


def test_torchrun_nccl_cuda(tmp_path):
    require_cuda()
    if not dist.is_nccl_available():
        pytest.skip("skipped: this torch has no NCCL")
    n = torch.cuda.device_count()
    nproc = 4 if n >= 4 else 1
    ranks = torchrun(tmp_path, nproc, "nccl")
    # the logits path and the fused linear split (CUDA tensors), 3 layouts each with one rank
    layouts = 5 if nproc == 4 else 3
    # (4 ranks: and the re-tiled slices)
    assert judge(ranks) == 2 * 3 * layouts + 3 * layouts + (1 if nproc == 4 else 0)


def test_cuda_device_exchange_all_gathers_through_torchs_buffers(tmp_path):
    """The Python half of the exchange the split calls on CUDA tensors (a world of
    one with NCCL: the native call skips the exchange of a group of one, so it is called here
    directly): the addresses it hands out are torch tensors of the asked size, and run()
    all-gathers into the receive one, float32 and float64."""
    require_cuda()
    if not dist.is_nccl_available():
        pytest.skip("skipped: this torch has no NCCL")
    script = """
import os, sys, torch, torch.distributed as dist
from fused_weighted_loss import _dist
dist.init_process_group("nccl", init_method="file://" + os.path.join(sys.argv[1], "store"), rank=0, world_size=1)
dev = torch.device("cuda", 0)
rank, size, ex = _dist._device_group_arg(dist.group.WORLD, dev)
assert (rank, size) == (0, 1)
for wide, n in ((False, 7), (True, 2), (False, 3)):
    s, r = ex.buffers(n, wide)
    send, recv = ex.last
    assert (send.data_ptr(), recv.data_ptr()) == (s, r) and send.numel() == n and recv.numel() == n
    assert send.dtype == (torch.float64 if wide else torch.float32) and send.device == dev
    send.copy_(torch.arange(n, dtype=send.dtype, device=dev) * 0.5 + 1)
    recv.fill_(-1)
    ex.run()
    torch.cuda.synchronize()
    assert torch.equal(recv, send), (recv, send)
dist.destroy_process_group()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_backward_takes_a_loss_scale_beyond_the_logits_dtype(dtype):
    """GradScaler's 65536 does not fit float16: the split's backward multiplies in float32, as the
    plain path does, for the loss and for the fused linear loss (a group of one, gloo)."""
    import fused_weighted_loss as fwl

    run = subprocess.run([sys.executable, "-c", _SCALE_SCRIPT, str(dtype).removeprefix("torch.")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert fwl is not None and got["finite"], got
    assert got["rel_loss_grad"] <= 1e-6, got
    assert got["rel_linear_grads"] <= 1e-6, got


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_split_with_no_positions_raises_the_crates_error():
    """T = 0 with return_token_loss: the split asked torch for a [B, -1] buffer first
    (RuntimeError "negative dimension", and on a real group its peers left waiting); now the
    crate's ValueError on the sequence length, as the plain path (a group of one, gloo)."""
    run = subprocess.run([sys.executable, "-c", _NO_POSITIONS_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-4000:]
    got = run.stdout.strip().splitlines()[-1]
    assert got.startswith("ValueError") and "sequence length" in got, got


_NO_POSITIONS_SCRIPT = """
import os, tempfile
import torch, torch.distributed as dist
import fused_weighted_loss as fwl
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"), rank=0,
                        world_size=1)
try:
    fwl.weighted_loss(torch.randn(2, 0, 7), torch.zeros(2, 0, dtype=torch.long), process_group=dist.group.WORLD,
                      return_token_loss=True)
    print("no error")
except Exception as e:
    print(type(e).__name__, e)
dist.destroy_process_group()
"""


# in a child process: a process group of its own, whatever this one has
_SCALE_SCRIPT = """
import json, os, sys, tempfile
import torch, torch.distributed as dist
import fused_weighted_loss as fwl
store = tempfile.mkdtemp()
dist.init_process_group("gloo", init_method="file://" + os.path.join(store, "store"), rank=0, world_size=1)
dtype = getattr(torch, sys.argv[1])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 7, (2, 5), generator=g)
x0 = (torch.randn(2, 5, 7, generator=g) * 3).to(dtype)
a = x0.clone().requires_grad_(); (fwl.weighted_loss(a, ids, keywords=[1]) * 65536.0).backward()
b = x0.clone().requires_grad_(); (fwl.weighted_loss(b, ids, keywords=[1], process_group=dist.group.WORLD) * 65536.0).backward()
rel = lambda p, q: float((p.double() - q.double()).norm() / q.double().norm())
h0, w0 = torch.randn(2, 5, 4, generator=g).to(dtype), torch.randn(7, 4, generator=g).to(dtype)
lin = []
for group in (None, dist.group.WORLD):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    (fwl.weighted_linear_loss(h, w, ids, process_group=group) * 65536.0).backward()
    lin.append((h.grad, w.grad))
finite = all(bool(torch.isfinite(t).all()) for t in (a.grad, b.grad, *lin[0], *lin[1]))
print(json.dumps(dict(finite=finite, rel_loss_grad=rel(b.grad, a.grad),
                      rel_linear_grads=float(torch.tensor([rel(lin[1][0], lin[0][0]),
                                                           rel(lin[1][1], lin[0][1])]).max()))))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_a_rank_without_samples_raises_what_its_peers_raise(tmp_path):
    """Two gloo ranks, rank 1 without samples: inputs every rank gets wrong (a float64 token
    weight, a bfloat16 weight beside float32 hidden states, both chunkings) raise the same error
    on both ranks, not a hang on the empty one; inputs that do not match its empty ids raise
    there, and on rank 0, whose call is fine, the error that names rank 1 (rank 1 fails the
    call's exchanges instead of leaving rank 0 waiting in them); a data group without any sample
    raises on every rank."""
    script = tmp_path / "empty_rank.py"  # a file: the spawned ranks import their function from it
    script.write_text(_EMPTY_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    got = {}
    for rank in (0, 1):
        for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            got.setdefault(r["case"], {})[rank] = r["error"]
    cases = ["token weights float64", "weight bfloat16", "both chunkings", "all empty"]
    for case in cases:
        errors = got.get(case, {})
        assert set(errors) == {0, 1} and all(errors.values()), (case, errors)
        assert len({e.split(":")[0] for e in errors.values()}) == 1, (case, errors)
    assert "every rank" in got["all empty"][0]
    for case in ("hidden of 2 samples, ids of none", "labels longer", "logits of 1 sample, ids of none",
                 "hidden of 1 sample's rows, ids of none", "hidden of another T, ids of none"):
        assert got[case][1] and "Error" in got[case][1] and "rank 1" not in got[case][1], (case, got.get(case))
        assert got[case][0] and "rank 1 of the data group failed" in got[case][0], (case, got.get(case))


# a script of two gloo ranks (a short timeout: a hang fails the test)
_EMPTY_SCRIPT = """
import datetime, json, os, sys, tempfile
import torch, torch.distributed as dist, torch.multiprocessing as mp
import fused_weighted_loss as fwl

def rank_main(rank, store, out):
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    g = torch.Generator().manual_seed(0)
    b = 2 if rank == 0 else 0
    x = torch.randn(2, 5, 11, generator=g)[:b]
    ids = torch.randint(0, 11, (2, 5), generator=g)[:b]
    h, w = torch.randn(2, 5, 4, generator=g)[:b], torch.randn(11, 4, generator=g)
    group = dist.group.WORLD
    def case(name, f, fine=None):
        # fine: rank 0's call where rank 1 alone makes a bad one
        try:
            (fine if fine is not None and rank == 0 else f)()
            err = None
        except Exception as e:
            err = type(e).__name__ + ": " + str(e)
        with open(os.path.join(out, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(dict(case=name, error=err)) + "\\n")
    case("token weights float64", lambda: fwl.weighted_loss(x, ids, data_group=group,
         token_weights=torch.ones(b, 5, dtype=torch.float64)))
    case("weight bfloat16", lambda: fwl.weighted_linear_loss(h, w.bfloat16(), ids, data_group=group))
    case("both chunkings", lambda: fwl.weighted_linear_loss(h, w, ids, data_group=group, chunk_rows=2,
         chunk_budget=1 << 20))
    # the empty rank alone: inputs that do not match its empty ids (rank 0's call is fine)
    fine_loss = lambda: fwl.weighted_loss(x, ids, data_group=group)
    fine_linear = lambda: fwl.weighted_linear_loss(h, w, ids, data_group=group)
    case("hidden of 2 samples, ids of none", lambda: fwl.weighted_linear_loss(torch.randn(2, 5, 4), w, ids,
         data_group=group), fine_linear)
    case("labels longer", lambda: fwl.weighted_loss(x, ids, labels=torch.zeros(0, 8, dtype=torch.int64),
         data_group=group), fine_loss)
    case("logits of 1 sample, ids of none", lambda: fwl.weighted_loss(torch.randn(1, 5, 11), ids,
         data_group=group), fine_loss)
    case("hidden of 1 sample's rows, ids of none", lambda: fwl.weighted_linear_loss(torch.randn(5, 4), w, ids,
         data_group=group), fine_linear)
    case("hidden of another T, ids of none", lambda: fwl.weighted_linear_loss(torch.randn(0, 7, 4), w, ids,
         data_group=group), fine_linear)
    case("all empty", lambda: fwl.weighted_loss(x[:0], ids[:0], data_group=group))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(rank_main, args=(os.path.join(tempfile.mkdtemp(), "store"), sys.argv[1]), nprocs=2)
"""


class _Interrupted(Exception):
    """Raised by a test's all-gather."""


@pytest.mark.parametrize("linear", [False, True])
def test_an_exception_in_an_exchange_comes_out_as_itself(monkeypatch, linear):
    """The one calls exchange through a Python callable with the GIL released around them: an
    exception the exchange raises (a KeyboardInterrupt, a torch.distributed error) reaches the
    caller as itself, not as a RuntimeError of the crate's, and the process stays usable."""
    import fused_weighted_loss as fwl
    from fused_weighted_loss import _dist

    def gather(values):
        raise _Interrupted("the data group went away")

    # a data group of two whose all-gather raises (no torch.distributed needed)
    monkeypatch.setattr(_dist, "_group_arg", lambda g: (0, 1, None) if g is None else (0, 2, gather))
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(_Interrupted, match="went away"):
        if linear:
            fwl.weighted_linear_loss(torch.randn(2, 5, 8), torch.randn(50, 8), ids, data_group=object())
        else:
            fwl.weighted_loss(torch.randn(2, 5, 50), ids, data_group=object())
    # and the next call is not handed that exception
    monkeypatch.undo()
    assert torch.isfinite(fwl.weighted_loss(torch.randn(2, 5, 50), ids))


def test_the_table_of_tiled_groups_keeps_no_group_alive():
    """The CUDA path checks a group's slices on its first call only, and remembers the group in a
    table: a group that is gone leaves the table (it kept every group alive, and a dead group's id
    could be a new group's), and a group that takes no weak reference is checked every time."""
    import gc
    import weakref

    from fused_weighted_loss import _dist

    class Group:  # stands for a ProcessGroup: hashed and compared by identity, weakly referenced
        pass

    g = Group()
    assert not _dist._was_tiled(g)
    _dist._remember_tiled(g)
    assert _dist._was_tiled(g) and not _dist._was_tiled(Group())
    alive = weakref.ref(g)
    del g
    gc.collect()
    assert alive() is None, "the table kept the group alive"
    assert len(_dist._TILED) == 0
    # no weak reference (and an unhashable one): never remembered, no error
    for odd in (object(), [1]):
        _dist._remember_tiled(odd)
        assert not _dist._was_tiled(odd)
    assert len(_dist._TILED) == 0


_NOT_A_MEMBER_SCRIPT = """
import os, tempfile
import torch, torch.distributed as dist
from torch.distributed.distributed_c10d import GroupMember
import fused_weighted_loss as fwl
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"), rank=0,
                        world_size=1)
g = torch.Generator().manual_seed(0)
logits, ids = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
h, w = torch.randn(2, 5, 4, generator=g), torch.randn(7, 4, generator=g)
other = GroupMember.NON_GROUP_MEMBER
calls = [lambda: fwl.weighted_loss(logits, ids, process_group=dist.group.WORLD, data_group=other),
         lambda: fwl.weighted_loss(logits, ids, process_group=other),
         lambda: fwl.weighted_linear_loss(h, w, ids, data_group=other)]
for call in calls:
    try:
        call()
        print("no error")
    except Exception as e:
        print(type(e).__name__, e)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_a_group_this_rank_is_not_in_is_named():
    """A group this rank is not a member of (torch's rank -1): a ValueError naming the group,
    raised among the rank's own checks (it was a TypeError from the native call's argument
    conversion, "failed to extract field PySplit.2", after them)."""
    run = subprocess.run([sys.executable, "-c", _NOT_A_MEMBER_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-4000:]
    got = run.stdout.strip().splitlines()[-3:]
    for line, name in zip(got, ("data_group", "process_group", "data_group")):
        assert line.startswith("ValueError") and f"{name}: this rank is not a member" in line, got

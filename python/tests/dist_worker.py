"""One rank of the distributed checks, run by ``torchrun`` (see test_distributed.py):

    torchrun --standalone --nproc-per-node 4 dist_worker.py OUT_DIR [gloo|nccl]

Each rank builds the same inputs (seeded), runs vocabulary-parallel (4 ranks, uneven slices, one
rank holding no target), data-parallel (4 ranks, uneven batches, and a rank without samples) and 2x2 calls through
``weighted_loss(..., process_group=..., data_group=...)`` with autograd, and the single-process
call on the whole batch and vocabulary in the same process; with 4 ranks or NCCL, the same
layouts of ``weighted_linear_loss`` (the weight's rows split); writes what it measured to
``OUT_DIR/rank<r>.json`` for the test to judge. With one process (``--nproc-per-node 1``, e.g.
NCCL on one GPU) the same cases run with groups of one, whose exchanges the native calls skip.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import fused_weighted_loss as fwl


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def worst(*errors):
    """The largest error, NaN if any is (Python's max keeps its running value past a NaN)."""
    return float(torch.tensor(errors, dtype=torch.float64).max())


def inputs(device, dtype, b=5, t=7, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    ids[:, ::3] %= 100  # many targets in the first slice
    labels = ids.clone()
    labels[1, 2:4] = -100
    weights = torch.rand(b, t, generator=g, dtype=torch.float64).to(torch.float32) + 0.5
    return logits.to(device), ids.to(device), labels.to(device), weights.to(device)


OPTIONS = [
    dict(keywords=[3, 7], reduction="mean"),
    dict(keywords=[5], row_mean="valid", reduction="weighted_mean", z_loss=1e-3, label_smoothing=0.1, softcap=20.0),
    # the backward from an upstream gradient other than 1 ("grad_output", not a loss option)
    dict(keywords=[1], reduction="sum", alpha=0.5, grad_output=0.5),
]


def split_grad_output(opts):
    """The loss options and the upstream gradient of the backward."""
    opts = dict(opts)
    return opts, opts.pop("grad_output", 1.0)


def run(logits, ids, labels, weights, opts, **group_args):
    x = logits.detach().clone().requires_grad_()
    opts, g = split_grad_output(opts)
    out = fwl.weighted_loss(x, ids, labels=labels, token_weights=weights, return_token_loss=True, **opts, **group_args)
    (out.loss * g).backward()
    return out, x.grad


def compare(case, out, grad, ref, ref_grad, rows=slice(None), cols=slice(None)):
    return {
        "case": case,
        "loss": float(out.loss.detach()),
        "loss_bits": float(out.loss.detach()).hex(),
        "rel_loss": rel(out.loss, ref.loss),
        "rel_z": rel(out.z_loss, ref.z_loss) if float(ref.z_loss) != 0 else abs(float(out.z_loss)),
        "rel_grad": rel(grad.float(), ref_grad[rows][..., cols].float()),
        "rel_per_sample": rel(out.per_sample_loss, ref.per_sample_loss[rows]),
        "rel_token_loss": rel(out.token_loss, ref.token_loss[rows]),
    }


def linear_inputs(seed=1, b=5, t=7, h=16, v=1000):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    bias = torch.randn(v, generator=g)
    return hidden, weight, bias


def run_linear(hidden, weight, bias, ids, labels, weights, opts, **group_args):
    """weighted_linear_loss with autograd: (output, d hidden, d weight, d bias)."""
    xs = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    opts, g = split_grad_output(opts)
    out = fwl.weighted_linear_loss(xs[0], xs[1], ids, bias=xs[2], labels=labels, token_weights=weights,
                                   return_per_sample=True, chunk_rows=4, **opts, **group_args)
    (out.loss * g).backward()
    return out, xs[0].grad, xs[1].grad, xs[2].grad


def compare_linear(case, got, ref, rows=slice(None), cols=slice(None)):
    """``got``: output and the three gradients, d weight and d bias already summed over the
    data group, d hidden over the vocabulary group."""
    (out, dh, dw, db), (r, rdh, rdw, rdb) = got, ref
    return {
        "case": case,
        "loss": float(out.loss.detach()),
        "loss_bits": float(out.loss.detach()).hex(),
        "rel_loss": rel(out.loss, r.loss),
        "rel_z": rel(out.z_loss, r.z_loss) if float(r.z_loss) != 0 else abs(float(out.z_loss)),
        "rel_grad": worst(rel(dh, rdh[rows]), rel(dw, rdw[cols]), rel(db, rdb[cols])),
        "rel_per_sample": rel(out.per_sample_loss, r.per_sample_loss[rows]),
        # (no per-token losses from the fused linear call: no "rel_token_loss")
    }


def linear_cases(rank, world, vocab_groups, data_groups, device):
    """The fused linear split: vocabulary-parallel over the weight's rows (uneven, d hidden
    all-reduced by the call, or by hand with reduce_hidden_grad=False), data-parallel and (4
    ranks) 2x2, against the single-process call on the same device."""
    results = []
    hidden, weight, bias = (x.to(device) for x in linear_inputs())
    _, ids, labels, weights = inputs(device, torch.float32)
    b, v = hidden.shape[0], weight.shape[0]
    for k, opts in enumerate(OPTIONS):
        ref = run_linear(hidden, weight, bias, ids, labels, weights, opts)
        cuts = [0, 300, 310, 777, 1000] if world == 4 else [0, v]
        s, e = cuts[rank], cuts[rank + 1]
        got = run_linear(hidden, weight[s:e], bias[s:e], ids, labels, weights, opts, process_group=dist.group.WORLD,
                         vocab_start=s, vocab_size=v)
        results.append(compare_linear(f"linear vocab opts{k}", got, ref, cols=slice(s, e)))
        out, dh, dw, db = run_linear(hidden, weight[s:e], bias[s:e], ids, labels, weights, opts,
                                     process_group=dist.group.WORLD, vocab_start=s, vocab_size=v,
                                     reduce_hidden_grad=False)
        dist.all_reduce(dh)
        results.append(compare_linear(f"linear vocab part opts{k}", (out, dh, dw, db), ref, cols=slice(s, e)))
        bounds = [0, 1, 2, 4, 5] if world == 4 else [0, b]
        b0, b1 = bounds[rank], bounds[rank + 1]
        out, dh, dw, db = run_linear(hidden[b0:b1], weight, bias, ids[b0:b1], labels[b0:b1], weights[b0:b1], opts,
                                     data_group=dist.group.WORLD)
        dist.all_reduce(dw)
        dist.all_reduce(db)
        results.append(compare_linear(f"linear data opts{k}", (out, dh, dw, db), ref, rows=slice(b0, b1)))
        if world != 4:
            continue
        # a rank without samples (rank 1): an empty d hidden, zeros for d weight and d bias
        b0, b1 = [0, 2, 2, 4, 5][rank:rank + 2]
        out, dh, dw, db = run_linear(hidden[b0:b1], weight, bias, ids[b0:b1], labels[b0:b1], weights[b0:b1], opts,
                                     data_group=dist.group.WORLD)
        dist.all_reduce(dw)
        dist.all_reduce(db)
        results.append(compare_linear(f"linear data empty opts{k}", (out, dh, dw, db), ref, rows=slice(b0, b1)))
        d, p = rank // 2, rank % 2
        (b0, b1), (s, e) = [(0, 2), (2, 5)][d], [(0, 400), (400, 1000)][p]
        out, dh, dw, db = run_linear(hidden[b0:b1], weight[s:e], bias[s:e], ids[b0:b1], labels[b0:b1],
                                     weights[b0:b1], opts, process_group=vocab_groups[d], vocab_start=s,
                                     vocab_size=v, data_group=data_groups[p])
        dist.all_reduce(dw, group=data_groups[p])
        dist.all_reduce(db, group=data_groups[p])
        results.append(compare_linear(f"linear grid opts{k}", (out, dh, dw, db), ref, rows=slice(b0, b1),
                                      cols=slice(s, e)))
    return results


def error_of(case, f):
    """``f()``'s exception as ``{"case", "error": "Type: message"}`` (``None``: it returned)."""
    try:
        f()
        return {"case": case, "error": None}
    except Exception as err:  # noqa: BLE001 (the judge reads the type too)
        return {"case": case, "error": f"{type(err).__name__}: {err}"}


def failure_cases(rank, vocab_groups, data_groups, device):
    """Errors that one rank alone has (4 gloo ranks): every rank raises, none waits in an
    exchange (a hang fails the run by its timeout), and the calls after them are right."""
    results = []
    world = dist.group.WORLD
    logits, ids, labels, weights = inputs(device, torch.float32)
    b, v = logits.shape[0], logits.shape[-1]
    cuts = [0, 300, 310, 777, 1000]
    s, e = cuts[rank], cuts[rank + 1]
    b0, b1 = [0, 1, 2, 4, 5][rank:rank + 2]
    opts = OPTIONS[0]
    # badids: rank 3's ids out of the vocabulary in a data group (its own ValueError; the others'
    # names rank 3)
    bad = ids[b0:b1].clone()
    if rank == 3:
        bad[0, 2] = v
    results.append(error_of("badids", lambda: run(logits[b0:b1], bad, labels[b0:b1], weights[b0:b1], opts,
                                                  data_group=world)))
    # shape: rank 1 of a vocabulary group holds one sample fewer (gloo aborted the process on the
    # chunks' different lengths): every rank raises the same ValueError
    n = b - 1 if rank == 1 else b
    results.append(error_of("shape", lambda: run(logits[:n, :, s:e], ids[:n], labels[:n], weights[:n], opts,
                                                 process_group=world, vocab_start=s, vocab_size=v)))
    # the same for the fused linear split, rank 2 with one sample fewer
    hidden, weight, bias = linear_inputs()
    n = b - 1 if rank == 2 else b
    results.append(error_of("linear shape", lambda: run_linear(hidden[:n], weight[s:e], bias[s:e], ids[:n], labels[:n],
                                                               weights[:n], opts, process_group=world,
                                                               vocab_start=s, vocab_size=v)))
    # 2x2: rank (0, 1) with one sample fewer than (0, 0); the other row hears it in its data groups
    d, p = rank // 2, rank % 2
    (g0, g1), (s2, e2) = [(0, 2), (2, 5)][d], [(0, 400), (400, 1000)][p]
    if rank == 1:
        g1 -= 1
    results.append(error_of("grid shape", lambda: run(logits[g0:g1, :, s2:e2], ids[g0:g1], labels[g0:g1],
                                                      weights[g0:g1], opts, process_group=vocab_groups[d],
                                                      vocab_start=s2, vocab_size=v, data_group=data_groups[p])))
    # a check of the Python layer on rank 2 alone (a kept_grad_dtype it refuses), in a vocabulary
    # group, and one of the native layer on rank 0 alone (float64 token weights), in a data group
    grad_dtype = torch.float64 if rank == 2 else None
    results.append(error_of("python check", lambda: fwl.weighted_loss(
        logits[..., s:e].clone().requires_grad_(), ids, process_group=world, vocab_start=s, vocab_size=v,
        kept_grad_dtype=grad_dtype)))
    # a negative vocab_start on rank 1 alone, in a vocabulary group
    start = -1 if rank == 1 else s
    results.append(error_of("negative start", lambda: fwl.weighted_loss(
        logits[..., s:e].clone().requires_grad_(), ids, process_group=world, vocab_start=start, vocab_size=v)))
    tw = weights[b0:b1].double() if rank == 0 else weights[b0:b1]
    results.append(error_of("native check", lambda: fwl.weighted_loss(logits[b0:b1], ids[b0:b1], token_weights=tw,
                                                                      data_group=world)))
    # ranks of one group that make different calls (gloo aborted the process on the chunks'
    # different lengths, or the ranks got different losses): every rank raises the same ValueError
    # naming the first rank whose call differs. Label smoothing on rank 2 of a vocabulary group:
    other = dict(opts, label_smoothing=0.1) if rank == 2 else opts
    results.append(error_of("options", lambda: run(logits[..., s:e], ids, labels, weights, other,
                                                   process_group=world, vocab_start=s, vocab_size=v)))
    # rank 3 exchanges every 2 rows, its peers every 3
    results.append(error_of("chunking", lambda: run(logits[..., s:e], ids, labels, weights, opts,
                                                    process_group=world, vocab_start=s, vocab_size=v,
                                                    chunk_rows=2 if rank == 3 else 3)))
    # rank 1 holds other ids than its vocabulary group
    other_ids = ids.clone()
    if rank == 1:
        other_ids[0, 3] = (other_ids[0, 3] + 1) % v
    results.append(error_of("ids", lambda: run(logits[..., s:e], other_ids, labels, weights, opts,
                                               process_group=world, vocab_start=s, vocab_size=v)))
    # a data group whose rank 0 takes another reduction
    red = dict(opts, reduction="sum") if rank == 0 else opts
    results.append(error_of("data options", lambda: run(logits[b0:b1], ids[b0:b1], labels[b0:b1], weights[b0:b1],
                                                        red, data_group=world)))
    # and then every rank is in step: the first vocabulary-parallel case again
    ref, ref_grad = run(logits, ids, labels, weights, opts)
    out, grad = run(logits[..., s:e], ids, labels, weights, opts, process_group=world, vocab_start=s, vocab_size=v)
    results.append(compare("after failures", out, grad, ref, ref_grad, cols=slice(s, e)))
    return results


def main():
    out_dir, backend = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    results = []
    # the grid's groups: every rank creates every group, in the same order
    vocab_groups = [dist.new_group([d * 2, d * 2 + 1]) for d in range(2)] if world == 4 else None
    data_groups = [dist.new_group([p, p + 2]) for p in range(2)] if world == 4 else None
    for dtype in (torch.float32, torch.bfloat16):
        logits, ids, labels, weights = inputs(device, dtype)
        b, _, v = logits.shape
        cuts = [0, 300, 310, 777, 1000] if world == 4 else [0, v]
        for k, opts in enumerate(OPTIONS):
            ref, ref_grad = run(logits, ids, labels, weights, opts)
            # vocabulary-parallel: rank r holds columns cuts[r]..cuts[r+1] (uneven; rank 1's ten ids
            # hold no target of the first positions)
            s, e = cuts[rank], cuts[rank + 1]
            for chunk in (None, 3):
                out, grad = run(logits[..., s:e], ids, labels, weights, opts, process_group=dist.group.WORLD,
                                vocab_start=s, vocab_size=v, chunk_rows=chunk)
                results.append(compare(f"vocab {dtype} opts{k} chunk{chunk}", out, grad, ref, ref_grad, cols=slice(s, e)))
            # data-parallel: uneven batches
            bounds = [0, 1, 2, 4, 5] if world == 4 else [0, b]
            b0, b1 = bounds[rank], bounds[rank + 1]
            out, grad = run(logits[b0:b1], ids[b0:b1], labels[b0:b1], weights[b0:b1], opts,
                            data_group=dist.group.WORLD)
            results.append(compare(f"data {dtype} opts{k}", out, grad, ref, ref_grad, rows=slice(b0, b1)))
            if world == 4:
                # data-parallel with a rank that holds no samples (rank 1): the loss of the others'
                b0, b1 = [0, 2, 2, 4, 5][rank:rank + 2]
                out, grad = run(logits[b0:b1], ids[b0:b1], labels[b0:b1], weights[b0:b1], opts,
                                data_group=dist.group.WORLD)
                results.append(compare(f"data empty {dtype} opts{k}", out, grad, ref, ref_grad, rows=slice(b0, b1)))
            if world == 4:
                # 2x2: ranks (d, p) = (rank // 2, rank % 2); samples split in 2, vocabulary in 2
                d, p = rank // 2, rank % 2
                (b0, b1), (s, e) = [(0, 2), (2, 5)][d], [(0, 400), (400, 1000)][p]
                out, grad = run(logits[b0:b1, :, s:e], ids[b0:b1], labels[b0:b1], weights[b0:b1], opts,
                                process_group=vocab_groups[d], vocab_start=s, vocab_size=v,
                                data_group=data_groups[p])
                results.append(compare(f"grid {dtype} opts{k}", out, grad, ref, ref_grad, rows=slice(b0, b1),
                                       cols=slice(s, e)))
    if world == 4 or backend == "nccl":
        results.extend(linear_cases(rank, world, vocab_groups, data_groups, device))
    # a rerun of the first vocabulary-parallel case gives the same bits
    logits, ids, labels, weights = inputs(device, torch.float32)
    s, e = ([0, 300, 310, 777, 1000] if world == 4 else [0, 1000])[rank:rank + 2]
    again, _ = run(logits[..., s:e], ids, labels, weights, OPTIONS[0], process_group=dist.group.WORLD,
                   vocab_start=s, vocab_size=1000)
    results.append({"case": "rerun", "loss_bits": float(again.loss.detach()).hex()})
    # slices that do not tile the vocabulary: every rank raises, none hangs
    try:
        run(logits[..., :10], ids, labels, weights, OPTIONS[0], process_group=dist.group.WORLD, vocab_start=0,
            vocab_size=1000)
        results.append({"case": "overlap", "error": None})
    except ValueError as err:
        results.append({"case": "overlap", "error": str(err)})
    # rank 0 names another vocabulary than the others: every rank raises, none hangs (a new
    # group: on CUDA tensors each rank remembers the groups it checked)
    fresh = dist.new_group(list(range(world)))
    try:
        run(logits[..., s:e], ids, labels, weights, OPTIONS[0], process_group=fresh, vocab_start=s,
            vocab_size=1000 + (rank == 0))
        results.append({"case": "vocab", "error": None})
    except ValueError as err:
        results.append({"case": "vocab", "error": str(err)})
    # every rank claims the whole vocabulary: covered, but more than once
    try:
        run(logits, ids, labels, weights, OPTIONS[0], process_group=dist.group.WORLD, vocab_start=0, vocab_size=1000)
        results.append({"case": "duplicate", "error": None})
    except ValueError as err:
        results.append({"case": "duplicate", "error": str(err)})
    if world == 4:
        # the slices re-tiled between two calls, rank 0 keeping its own: every rank checks them
        # again (the same collectives on every rank: a check remembered per rank's own slice
        # let rank 0 skip the all-gather its peers ran), and the loss is right
        logits, ids, labels, weights = inputs(device, torch.float32)
        ref, ref_grad = run(logits, ids, labels, weights, OPTIONS[0])
        for cuts in ([0, 300, 310, 777, 1000], [0, 300, 600, 900, 1000]):
            s, e = cuts[rank:rank + 2]
            out, grad = run(logits[..., s:e], ids, labels, weights, OPTIONS[0], process_group=dist.group.WORLD,
                            vocab_start=s, vocab_size=1000)
        results.append(compare("retile", out, grad, ref, ref_grad, cols=slice(s, e)))
        # check_finite over a data group: a +inf logit among rank 0's samples; every rank raises
        # (rank 0 alone did, and left the others waiting in the loss exchange)
        b0, b1 = [0, 1, 2, 4, 5][rank:rank + 2]
        bad = logits[b0:b1].clone()
        if rank == 0:
            bad[0, 0, 5] = float("inf")
        try:
            run(bad, ids[b0:b1], labels[b0:b1], weights[b0:b1], dict(OPTIONS[0], check_finite=True),
                data_group=dist.group.WORLD)
            results.append({"case": "finite", "error": None})
        except ValueError as err:
            results.append({"case": "finite", "error": str(err)})
    if world == 4 and backend == "gloo":
        results.extend(failure_cases(rank, vocab_groups, data_groups, device))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "backend": backend, "results": results}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

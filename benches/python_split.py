"""The Python split's time per rank against the single-device pass on the same rank's share.

    torchrun --standalone --nproc-per-node 2 benches/python_split.py [--layout data|vocab] [--iters 15] \
        [--chunk-rows N]

Each rank times, alternating and after a barrier each, ``weighted_loss`` forward + backward on
its share without a group (the single-device pass on the same bytes: its samples, or its slice's
columns with the ids folded into the slice) and with its group (``data_group=`` or
``process_group=`` over all ranks, gloo on CPU tensors), and the all-gather of 60 float64 alone
(the latency every exchange pays). Prints one JSON line per rank: medians in ms, their ratio and
the median of the paired ratios. Set ``RAYON_NUM_THREADS`` so that the ranks do not share cores
they do not have.
"""
import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

import fused_weighted_loss as fwl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["data", "vocab"], default="data")
    ap.add_argument("--shape", default="8x128x50000")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--chunk-rows", type=int, default=None, help="rows per exchange (vocab layout)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    b, t, v = (int(x) for x in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, v, generator=g) * 3
    ids = torch.randint(0, v, (b, t), generator=g)
    if args.layout == "data":
        b0, b1 = rank * b // world, (rank + 1) * b // world
        mine, mine_ids = x[b0:b1].contiguous().requires_grad_(), ids[b0:b1]
        plain_ids, group = mine_ids, dict(data_group=dist.group.WORLD)
    else:
        n = v // world
        s, e = rank * n, (rank + 1) * n if rank + 1 < world else v
        mine, mine_ids = x[..., s:e].contiguous().requires_grad_(), ids
        plain_ids = ids % (e - s)  # the same pass over the same bytes (not the same loss)
        group = dict(process_group=dist.group.WORLD, vocab_start=s, vocab_size=v, chunk_rows=args.chunk_rows)

    def step(split):
        mine.grad = None
        kw = group if split else {}
        fwl.weighted_loss(mine, mine_ids if split else plain_ids, keywords=[3, 7], **kw).backward()

    for _ in range(3):
        step(False)
        step(True)
    plain, split = [], []
    for _ in range(args.iters):
        for out, on in ((plain, False), (split, True)):
            dist.barrier()
            t0 = time.perf_counter()
            step(on)
            out.append(time.perf_counter() - t0)
    send, recv = torch.zeros(60, dtype=torch.float64), torch.empty(60 * world, dtype=torch.float64)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(200):
        dist.all_gather_into_tensor(recv, send)
    latency = (time.perf_counter() - t0) / 200
    mp, ms = statistics.median(plain), statistics.median(split)
    print(json.dumps(dict(layout=args.layout, rank=rank, world=world, plain_ms=round(mp * 1e3, 2),
                          split_ms=round(ms * 1e3, 2), ratio=round(ms / mp, 3),
                          paired=round(statistics.median([s_ / p_ for p_, s_ in zip(plain, split)]), 3),
                          allgather_us=round(latency * 1e6, 1))))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

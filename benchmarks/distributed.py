#!/usr/bin/env python
"""Time reductions of distributed bundles in a gloo group on the CPU, against the collectives.

Each rank holds an FSDP2-sharded MLP with gradients; rank 0 prints the median time per call
of each method, next to one bare `all_reduce` and one bare `all_gather_object` of a scalar
(the floor of any cross-rank reduction). Every method's value is checked against the first.

    python benchmarks/distributed.py --world 2          # ~15 s on 2 cores
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _time(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run(rank: int, world: int, port: int, width: int, depth: int, repeat: int) -> None:
    import modtensor as mt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.randn(4, width)).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    b = mt.bundle(model)
    g = b.grad
    one = torch.ones(())
    methods: dict[str, Callable[[], Any]] = {
        "dist.all_reduce(scalar)": lambda: dist.all_reduce(one),
        "dist.all_gather_object(scalar)": lambda: dist.all_gather_object([None] * world, 1.0),
        "mt.bundle(model).grad.norm()  [all_reduce]": lambda: mt.bundle(model).grad.norm(),
        "torch.nn.utils.get_total_norm(grads).full_tensor()": lambda: torch.nn.utils.get_total_norm(grads).full_tensor(),
        "mt.bundle(model).grad  [no collective]": lambda: mt.bundle(model).grad,
        "g.norm(), g = mt.bundle(model).grad made once": lambda: g.norm(),
        "b.sum()  [all_reduce]": lambda: b.sum(),
        "b.std()  [all_gather_object]": lambda: b.std(),
        "b.amax()  [all_gather_object]": lambda: b.amax(),
        "b.norm(p=3)  [all_gather_object]": lambda: b.norm(p=3),
        "b.per_param().norm()  [all_gather_object]": lambda: b.per_param().norm(),
    }
    norms = [float(methods[k]()) for k in list(methods)[2:4]]
    assert abs(norms[0] - norms[1]) <= 1e-5 * norms[1], norms
    rows = [(name, _time(fn, repeat)) for name, fn in methods.items()]
    if rank == 0:
        numel = sum(p.numel() for p in model.parameters())
        print(f"world {world}, gloo on the CPU, {len(list(model.parameters()))} tensors, {numel} elements, "
              f"median of {repeat} calls")
        for name, t in rows:
            print(f"  {name:55s} {t * 1e3:8.3f} ms")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=50)
    a = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_run, args=(a.world, port, a.width, a.depth, a.repeat), nprocs=a.world, start_method="spawn")


if __name__ == "__main__":
    main()

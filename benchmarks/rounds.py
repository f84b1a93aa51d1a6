#!/usr/bin/env python
"""modtensor's ratio to the fastest baseline, in many short interleaved rounds of one process.

bench.py's table times each method in blocks of calls over 5 rounds; on a shared machine a
ratio near 1 still moves by 20-50% between its rounds, so a run cannot tell 0.97 from 1.03.
Here each round takes every method of a case in turn and keeps its fastest of `--best-of`
calls (the call the machine's noise disturbed least); modtensor's ratio to the fastest
baseline (by its median over the rounds) is taken within each round, and the median of
those ratios over `--rounds` rounds is what the benchmarks README quotes as "in one
process". Every method is checked against the float64 reference first (bench.check), and a
baseline whose best call in the first round is over twice the fastest baseline's is dropped
from the later rounds (it cannot be the fastest; torch.cat on the large models).
The op `std/sum` times modtensor's std and sum in the same rounds (target 2). CPU only.

    python benchmarks/rounds.py                                  # ResNet-50, 1 thread (~2 min)
    python benchmarks/rounds.py --models resnet50,gpt2,seed --ops sum,mean,norm,amax,std/sum,dist
    python benchmarks/rounds.py --ops sum --profile 200          # where modtensor's sum spends its time
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - the models, the methods and the correctness check


def best_of(call: Callable[[], Any], k: int) -> float:
    """The fastest of k calls, in seconds (on the CPU: nothing to synchronize)."""
    fastest = float("inf")
    for _ in range(k):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def calls_of(c: bench.Case, op: str, methods: list[str] | None) -> dict[str, Callable[[], Any]]:
    """The checked calls of `op` by name, modtensor's first (each one's error printed)."""
    if op == "std/sum":  # target 2, one method's two ops in the same rounds
        return {name: bench.make_call(bench.MOMENT_CALLS[name](c), "sum", c.A)
                for name in ("modtensor sum", "modtensor std")}
    calls: dict[str, Callable[[], Any]] = {}
    keep = lambda name: methods is None or name in methods or name == "modtensor"  # noqa: E731
    for name, call, status, err in bench.checked_calls(c, op, keep):
        if status.startswith("error"):
            print(f"  {name}: {status} (not timed)")
            continue
        print(f"  {name:28} relative error against float64 {err:.1e}, {status}")
        calls[name] = call
    return calls


def run_case(c: bench.Case, model: str, op: str, args: argparse.Namespace) -> None:
    calls = calls_of(c, op, args.methods)
    best: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.rounds):
        # Each round starts one method later: what a method inherits from the one before it
        # (the caches, the allocator's state) falls on each in turn.
        names = list(calls)
        for name in names[r % len(names):] + names[: r % len(names)]:
            best[name].append(best_of(calls[name], args.best_of))
        if r == 0 and op != "std/sum":
            fastest = min((times[0] for n, times in best.items() if n not in bench.MODTENSOR), default=0.0)
            for name in [n for n, times in best.items() if times[0] > 2 * fastest and n not in bench.MODTENSOR]:
                print(f"  {name}: {times_ms(best[name][0])} in round 1, x{best[name][0] / fastest:.1f}: dropped")
                del calls[name], best[name]
    for p in c.A:
        p.grad = None
    for name in best:
        print(f"  {name:28} {times_ms(statistics.median(best[name]))} (median of the rounds' best)")
    if op == "std/sum":
        ours, baselines = ["modtensor std"], ["modtensor sum"]
    else:
        ours = [n for n in best if n in bench.MODTENSOR]
        baselines = [n for n in best if n not in bench.MODTENSOR]
    if not baselines:
        return
    # The fastest baseline over all rounds, then the ratio to it round by round (the fastest
    # of several baselines in each round would be the luckiest of their noisy times).
    baseline = min(baselines, key=lambda name: statistics.median(best[name]))
    for top in ours:
        ratios = [best[top][r] / best[baseline][r] for r in range(args.rounds)]
        wins = sum(x < 1 for x in ratios)
        label = op if top in ("modtensor", "modtensor std") else f"{op} ({top.removeprefix('modtensor ')})"
        print(f"{model:9} {label:8} ratio {statistics.median(ratios):.3f} to {baseline} (rounds {min(ratios):.3f}-"
              f"{max(ratios):.3f}, below 1 in {wins} of {args.rounds})", flush=True)


def profile(c: bench.Case, op: str, calls: int) -> None:
    """Where modtensor's call spends its time: cProfile's top entries over `calls` calls."""
    call = bench.make_call(bench.METHODS["modtensor"](c, op), op, c.A)
    call()
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [call() for _ in range(calls)])
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def times_ms(t: float) -> str:
    return f"{t * 1e3:9.3f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50", help=f"comma-separated, from {','.join(bench.MODELS)}")
    p.add_argument("--ops", default="sum,mean,norm,amax,std/sum",
                   help=f"comma-separated, from {','.join(bench.FLAT_OPS)},std/sum")
    p.add_argument("--methods", help="comma-separated baselines to time (default: all of bench.py's)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--best-of", type=int, default=7, help="calls per method per round")
    p.add_argument("--profile", type=int, metavar="CALLS",
                   help="instead of timing, profile CALLS of modtensor's call per op (cProfile, by own time)")
    args = p.parse_args()
    args.methods = None if args.methods is None else args.methods.split(",")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # bench.check records the warnings; here only times count
    print(f"torch {torch.__version__}, {args.threads} thread(s), {bench.device_name('cpu')}, "
          f"{args.rounds} rounds of the best of {args.best_of} calls, at {bench.source_state()}")
    for model in args.models.split(","):
        c = bench.Case(model, "cpu", pair=any(op in bench.PAIR_OPS for op in args.ops.split(",")))
        for op in args.ops.split(","):
            print(f"{model} {op}:")
            if args.profile:
                profile(c, op, args.profile)
            else:
                run_case(c, model, op, args)
        del c


if __name__ == "__main__":
    main()

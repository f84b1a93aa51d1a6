"""In-place updates of a whole model: an EMA step and `a.add_(b)`, against the per-tensor
loop and torch's `_foreach` call (what `torch.optim.swa_utils.get_ema_multi_avg_fn` uses).

Run from the repository root; prints the median of each method and its ratio to the
fastest, methods timed in interleaved rounds (bench.time_interleaved):

    python benchmarks/inplace.py                       # ResNet-50 and GPT-2 shapes, 1 thread
    python benchmarks/inplace.py --models seed --min-time 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - the models' shapes and the interleaved timer

import modtensor as mt  # noqa: E402


def methods(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, dict[str, Callable[[], Any]]]:
    ta, tb = mt.bundle(a), mt.bundle(b)

    def ema_loop() -> None:
        for x, y in zip(a, b):
            x.lerp_(y, 0.001)

    def add_loop() -> None:
        for x, y in zip(a, b):
            x.add_(y)

    return {
        "ema (lerp_, weight 0.001)": {
            "mt.recipes.ema_(a, b, 0.999)": lambda: mt.recipes.ema_(ta, tb, 0.999),
            "torch._foreach_lerp_": lambda: torch._foreach_lerp_(a, b, 0.001),
            "per-tensor loop": ema_loop,
        },
        "a.add_(b)": {
            "modtensor": lambda: ta.add_(tb),
            "torch._foreach_add_": lambda: torch._foreach_add_(a, b),
            "per-tensor loop": add_loop,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,gpt2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per method")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.min_time} s per method in {bench.ROUNDS} rounds")
    for model in args.models.split(","):
        a = [t.detach() for t in bench.build_model(model, "cpu", seed=0).parameters()]
        b = [t.detach() for t in bench.build_model(model, "cpu", seed=1).parameters()]
        with torch.no_grad():
            for op, calls in methods(a, b).items():
                times = bench.time_interleaved(list(calls.values()), args.threads, args.min_time)
                best = min(t for t, _, _ in times)
                for name, (t, _, _) in zip(calls, times):
                    print(f"{model:9} {op:26} {name:30} {t * 1e3:9.3f} ms  x{t / best:.2f}")


if __name__ == "__main__":
    main()

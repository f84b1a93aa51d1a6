#!/usr/bin/env python
"""The GPU multi-tensor kernels (modtensor/_multitensor.py) against the memory's bandwidth.

For each model and kernel shape (CHUNK elements per row, BLOCK per step, warps), prints the
median time of a full reduction of the bundle, the bandwidth it reached (the model's bytes
read once over that time), its relative error against float64, and the same for a single
contiguous tensor of the model's size (torch's own reduction: what one launch over one buffer
reaches) and a device-to-device copy (bytes read plus written: the card's ceiling). Needs
CUDA and Triton; ratios are within one run. Sum and mean are timed with each way of adding
in a lane (`_multitensor.SUM_LANES`: the library's first, then the others).

    python benchmarks/multitensor.py                        # ResNet-50 and GPT-2 shapes
    python benchmarks/multitensor.py --shapes 16384,1024,4 --ops sum
    python benchmarks/multitensor.py --models resnet50,gpt2,mlp1g --ops sum,mean --no-chains
    python benchmarks/multitensor.py --models resnet50 --ops sum --no-chains --profile
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - the models' shapes

import modtensor as mt  # noqa: E402
from modtensor import _multitensor  # noqa: E402


LANES = ("kahan", "float64", "float32")


def median(stmt, min_time: float) -> float:  # type: ignore[no-untyped-def]
    timer = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt})
    return float(timer.blocked_autorange(min_run_time=min_time).median)


def chains(module: torch.nn.Module, min_time: float) -> None:
    """`(a - b).norm()` against `torch.dist(a, b)`: where the chain's time goes."""
    a, b = mt.bundle(module), mt.bundle([torch.randn_like(p) for p in module.parameters()])
    with torch.no_grad():
        for name, call in [("a - b (made, not reduced)", lambda: a - b), ("(a - b).norm()", lambda: (a - b).norm()),
                           ("torch.dist(a, b)", lambda: torch.dist(a, b))]:
            print(f"  {name:26}: {median(call, min_time) * 1e6:8.1f} us")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                (a - b).norm()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,gpt2")
    p.add_argument("--ops", default="sum,norm,std,amax")
    p.add_argument("--shapes", default="65536,1024,4;16384,1024,4", help="CHUNK,BLOCK,WARPS;...")
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--no-chains", action="store_true", help="skip the (a - b).norm() profile")
    p.add_argument("--profile", action="store_true", help="cProfile the fixed cost's host time")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    defaults = _multitensor.CHUNK, _multitensor.BLOCK, _multitensor.WARPS
    lanes_default = _multitensor.SUM_LANES
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for model in args.models.split(","):
        module = bench.build_model(model, "cuda", seed=0)
        params = list(module.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in params)
        flat = torch.cat([t.detach().reshape(-1) for t in params])
        ref = flat.double()
        copy = torch.empty_like(flat)
        t_copy = median(functools.partial(copy.copy_, flat), args.min_time)
        print(f"\n{model}: {len(params)} tensors, {nbytes / 2**20:.1f} MiB; copy {2 * nbytes / t_copy / 1e12:.2f} TB/s")
        for op in args.ops.split(","):
            want = float(getattr(ref, op)())
            with torch.no_grad():
                t_flat = median(getattr(flat, op), args.min_time)
            print(f"  {op:5} one flat tensor: {t_flat * 1e6:8.1f} us, {nbytes / t_flat / 1e12:.2f} TB/s")
            variants = [(shape, lanes_default) for shape in args.shapes.split(";")]
            if op in ("sum", "mean"):  # what each way of adding costs
                variants += [(args.shapes.split(";")[0], lanes) for lanes in LANES if lanes != lanes_default]
            for shape, lanes in variants:
                chunk, block, warps = (int(v) for v in shape.split(","))
                _multitensor.CHUNK, _multitensor.BLOCK, _multitensor.WARPS = chunk, block, warps
                _multitensor.SUM_LANES = lanes
                b = mt.bundle(module)  # a fresh plan for this CHUNK
                with torch.no_grad():
                    got = float(getattr(b, op)())
                    t = median(getattr(b, op), args.min_time)
                err = abs(got - want) / abs(want)
                flat_err = abs(float(getattr(flat, op)()) - want) / abs(want)
                added = lanes if op in ("sum", "mean") else "float32"
                print(f"  {op:5} {shape:17} {added:7} lanes: {t * 1e6:8.1f} us, "
                      f"{nbytes / t / 1e12:.2f} TB/s, x{t / t_flat:.2f} the flat tensor; "
                      f"rel. error {err:.1e} (flat tensor {flat_err:.1e})")
            _multitensor.SUM_LANES = lanes_default
        _multitensor.CHUNK, _multitensor.BLOCK, _multitensor.WARPS = defaults
        if not args.no_chains:
            chains(module, args.min_time)
        del module, params, flat, ref, copy
        torch.cuda.empty_cache()
    # The fixed cost of one call: a small bundle, where the GPU has almost nothing to do.
    small = [torch.randn(4096, device="cuda") for _ in range(8)]
    b = mt.bundle(small)
    with torch.no_grad():
        t = median(lambda: b.sum(), args.min_time)
        t_loop = median(lambda: torch.stack([x.sum() for x in small]).sum(), args.min_time)
    print(f"\nfixed cost, 8 x 4096 floats: bundle sum {t * 1e6:.1f} us, per-tensor loop {t_loop * 1e6:.1f} us")
    if args.profile:  # where that host time goes: modtensor's Python, torch.empty, Triton's launcher
        profile = cProfile.Profile()
        with torch.no_grad():
            profile.runcall(lambda: [b.sum() for _ in range(2000)])
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()

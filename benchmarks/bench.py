#!/usr/bin/env python
"""Benchmark modtensor against the usual ways of reducing over all of a model's parameters.

Every method computes the same number as `op(torch.cat([p.reshape(-1) for p in params]))`;
each result is checked against a float64 reference, timed (medians), and its peak extra
memory is measured in a fresh process per (model, op, method). See benchmarks/README.md.

    python benchmarks/bench.py --quick            # smoke test, under ~2 minutes on 2 cores
    python benchmarks/bench.py                    # full run; --big adds a 1 GiB MLP
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils import benchmark

import modtensor as mt

# Imported only where used: it adds ~1.5 s to each memory subprocess's start.
HAVE_TENSORDICT = importlib.util.find_spec("tensordict") is not None

HERE = Path(__file__).resolve().parent
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")

# -- models: real parameter shapes, built as plain tensors (no torchvision, no downloads) -------


Shapes = list[tuple[str, tuple[int, ...]]]


def resnet50_shapes() -> Shapes:
    """torchvision's resnet50: 161 tensors, 25,557,032 parameters (BN weights and biases included)."""
    shapes: Shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for i in range(blocks):
            pre = f"layer{layer}.{i}."
            convs = [(inplanes, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)]
            for j, (cin, cout, k) in enumerate(convs, start=1):
                shapes += [(f"{pre}conv{j}.weight", (cout, cin, k, k)),
                           (f"{pre}bn{j}.weight", (cout,)), (f"{pre}bn{j}.bias", (cout,))]
            if i == 0:  # the first block of each stage changes width: a 1x1 conv + BN shortcut
                shapes += [(f"{pre}downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                           (f"{pre}downsample.1.weight", (planes * 4,)),
                           (f"{pre}downsample.1.bias", (planes * 4,))]
            inplanes = planes * 4
    return shapes + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


def gpt2_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> Shapes:
    """HF GPT-2 small: 148 tensors, 124,439,808 parameters (lm_head is tied to wte, see build_model)."""
    shapes: Shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)), (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


MODELS: dict[str, Callable[[], Shapes]] = {
    "resnet50": resnet50_shapes,
    "gpt2": gpt2_shapes,
    # The README's seed example: nn.Conv2d(3, 16, 3, padding=1), 448 parameters.
    "seed": lambda: [("weight", (16, 3, 3, 3)), ("bias", (16,))],
    # Opt-in (--big): four 8192x8192 float32 matrices, 1 GiB.
    "mlp1g": lambda: [(f"{i}.weight", (8192, 8192)) for i in range(4)],
}


def build_model(model: str, device: str, seed: int) -> nn.Module:
    """An nn.Module tree holding random parameters of `model`'s shapes, under their usual names."""
    torch.manual_seed(seed)
    root = nn.Module()
    for name, shape in MODELS[model]():
        t = torch.randn(shape, device=device)
        if len(shape) == 1 and name.endswith("weight"):  # BN / LayerNorm scales sit near 1, so
            t.mul_(0.1).add_(1.0)                          # tensor means differ (std's merge matters)
        else:
            t.mul_((t[0].numel() if t.dim() > 1 else 1) ** -0.5)
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module.get_submodule(part)
        module.register_parameter(leaf, nn.Parameter(t))
    if model == "gpt2":  # tied: parameters() yields wte.weight once, as in HF's GPT2LMHeadModel
        root.add_module("lm_head", nn.Module())
        root.get_submodule("lm_head").register_parameter("weight", root.get_parameter("wte.weight"))
    return root


class Case:
    """One model's parameters, a second set of the same shapes for pairwise ops, and the
    containers the methods read (built once, outside the timings: see setup costs)."""

    def __init__(self, model: str, device: str, pair: bool) -> None:
        self.a = build_model(model, device, seed=0)
        self.b = build_model(model, device, seed=1) if pair else None
        self.A = list(self.a.parameters())
        self.B = list(self.b.parameters()) if self.b is not None else None
        self.numel = sum(p.numel() for p in self.A)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.A)

    @cached_property
    def bundles(self) -> tuple[Any, Any]:
        return mt.bundle(self.a), (mt.bundle(self.b) if self.b is not None else None)

    @cached_property
    def tds(self) -> tuple[Any, Any]:
        # from_dict over named_parameters(), not from_module: from_module keeps tied weights
        # twice (GPT-2's lm_head), which would change the result (see the models table).
        from tensordict import TensorDict

        def td(m: nn.Module | None) -> Any:
            return None if m is None else TensorDict.from_dict(dict(m.named_parameters()))
        return td(self.a), td(self.b)

    @cached_property
    def reference64(self) -> tuple[Any, Any]:
        def cat64(ps: Sequence[torch.Tensor] | None) -> torch.Tensor | None:
            return None if ps is None else torch.cat([p.detach().reshape(-1).double() for p in ps])
        return cat64(self.A), cat64(self.B)


# -- ops and methods --------------------------------------------------------------------------

# The op on anything that behaves as the flat concatenation: a tensor, or a bundle.
FLAT_OPS: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "sum": lambda v, w: torch.sum(v),
    "mean": lambda v, w: v.mean(),
    "std": lambda v, w: v.std(),
    "norm": lambda v, w: v.norm(),
    "amax": lambda v, w: v.amax(),
    "sqsum": lambda v, w: (v ** 2).sum(),
    "dist": lambda v, w: (v - w).norm(),
    # Not among the ops: the L1 norm and distance.
    "norm1": lambda v, w: v.norm(1),
    "dist1": lambda v, w: torch.dist(v, w, 1),
}
OP_TITLES = {"sqsum": "(x ** 2).sum() fwd+bwd", "dist": "(a - b).norm()", "norm1": "norm(1)", "dist1": "dist(a, b, 1)"}
GRAD_OPS = {"sqsum"}  # timed as forward + backward; the others run under torch.no_grad()
PAIR_OPS = {"dist", "dist1"}


def _norm_of_norms(norms: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack(list(norms)).square().sum().sqrt()


def _sum_of_norms(norms: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack(list(norms)).double().sum()  # 1-norms add


def _loop_std(A: Sequence[torch.Tensor]) -> torch.Tensor:
    # Chan et al.'s merge of per-tensor (count, mean, M2), combined in float64. var and mean
    # separately: on CPU torch.var_mean is several times slower than the two together.
    n = torch.tensor([p.numel() for p in A], dtype=torch.float64, device=A[0].device)
    var = torch.stack([torch.var(p, correction=0) for p in A]).double()
    mean = torch.stack([p.mean() for p in A]).double()
    total = n.sum()
    grand = (n * mean).sum() / total
    m2 = (n * var).sum() + (n * (mean - grand) ** 2).sum()
    return (m2 / (total - 1)).sqrt()


LOOP_OPS: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "sum": lambda A, B: torch.stack([p.sum() for p in A]).double().sum(),
    "mean": lambda A, B: torch.stack([p.sum() for p in A]).double().sum() / sum(p.numel() for p in A),
    "std": lambda A, B: _loop_std(A),
    "norm": lambda A, B: _norm_of_norms([p.norm() for p in A]),
    "amax": lambda A, B: torch.stack([p.amax() for p in A]).amax(),
    "sqsum": lambda A, B: torch.stack([(p ** 2).sum() for p in A]).sum(),
    "dist": lambda A, B: _norm_of_norms([(a - b).norm() for a, b in zip(A, B)]),
    "norm1": lambda A, B: _sum_of_norms([p.norm(1) for p in A]),
    "dist1": lambda A, B: _sum_of_norms([torch.dist(a, b, 1) for a, b in zip(A, B)]),
}
# torch has no _foreach sum, mean or var; _foreach_powsum has no backward.
FOREACH_OPS: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "norm": lambda A, B: _norm_of_norms(torch._foreach_norm(A)),
    "amax": lambda A, B: torch.stack(torch._foreach_max(A)).amax(),
    "sqsum": lambda A, B: torch.stack(torch._foreach_norm(A)).square().sum(),
    "dist": lambda A, B: _norm_of_norms(torch._foreach_norm(torch._foreach_sub(A, B))),
    "norm1": lambda A, B: _sum_of_norms(torch._foreach_norm(A, 1)),
    "dist1": lambda A, B: _sum_of_norms(torch._foreach_norm(torch._foreach_sub(A, B), 1)),
}


def _td_norm(td: Any) -> torch.Tensor:
    # TensorDict.norm() has no reduce=: per-leaf norms, combined here.
    return _norm_of_norms(list(td.norm().values(True, True)))


TD_OPS: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "sum": lambda a, b: a.sum(reduce=True),
    "mean": lambda a, b: a.mean(reduce=True),
    "std": lambda a, b: a.std(reduce=True),
    "norm": lambda a, b: _td_norm(a),
    "amax": lambda a, b: a.amax(reduce=True),
    "sqsum": lambda a, b: (a ** 2).sum(reduce=True),
    "dist": lambda a, b: _td_norm(a - b),
}


def _flat(make: Callable[[Sequence[torch.Tensor]], torch.Tensor]) -> Callable[[Case, str], Callable[[], Any]]:
    def factory(c: Case, op: str) -> Callable[[], Any]:
        pair = op in PAIR_OPS  # flatten the second parameter set only where the op reads it
        return lambda: FLAT_OPS[op](make(c.A), make(c.B) if pair and c.B is not None else None)
    return factory


def _table(ops: dict[str, Callable[[Any, Any], torch.Tensor]], args: Callable[[Case], tuple[Any, Any]]) -> Callable[[Case, str], Any]:
    def factory(c: Case, op: str) -> Callable[[], Any] | None:
        if op not in ops:
            return None
        x, y = args(c)
        return lambda: ops[op](x, y)
    return factory


def _modtensor(c: Case, op: str) -> Callable[[], Any]:
    ba, bb = c.bundles
    return lambda: FLAT_OPS[op](ba, bb)


def _modtensor_dist(c: Case, op: str) -> Callable[[], Any] | None:
    ba, bb = c.bundles
    return (lambda: torch.dist(ba, bb)) if op == "dist" else None  # (dist1 is torch.dist already)


# name -> factory(case, op) returning a zero-argument callable, or None where it does not apply.
METHODS: dict[str, Callable[[Case, str], Any]] = {
    "modtensor": _modtensor,
    "modtensor torch.dist(a, b)": _modtensor_dist,
    "torch.cat": _flat(lambda ps: torch.cat([p.reshape(-1) for p in ps])),
    "parameters_to_vector": _flat(parameters_to_vector),
    "per-tensor loop": _table(LOOP_OPS, lambda c: (c.A, c.B)),
    "torch._foreach": _table(FOREACH_OPS, lambda c: (c.A, c.B)),
    "tensordict": _table(TD_OPS, lambda c: c.tds) if HAVE_TENSORDICT else lambda c, op: None,
}
MODTENSOR = ("modtensor", "modtensor torch.dist(a, b)")


def make_call(fn: Callable[[], Any], op: str, params: Sequence[torch.Tensor]) -> Callable[[], Any]:
    if op in GRAD_OPS:
        def call() -> Any:
            for p in params:  # every method allocates its gradients afresh, as after zero_grad()
                p.grad = None
            loss = fn()
            loss.backward()
            return loss.detach()
    else:
        def call() -> Any:
            with torch.no_grad():
                return fn()
    return call


# -- checking, timing, memory -----------------------------------------------------------------


def check(call: Callable[[], Any], c: Case, op: str) -> tuple[str, float | None]:
    """Run once (also the warm-up); return (status, relative error against float64)."""
    a64, b64 = c.reference64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = call()
        except Exception as e:  # recorded in the table, not hidden
            return f"error: {type(e).__name__}: {str(e)[:60]}", None
    ref = float(FLAT_OPS[op](a64, b64))
    err = abs(float(value) - ref) / abs(ref)
    if op in GRAD_OPS:  # d/dp sum(p ** 2) = 2p
        grad = torch.cat([p.grad.reshape(-1).double() for p in c.A])  # type: ignore[union-attr]
        err = max(err, float((grad - 2 * a64).norm() / (2 * a64).norm()))
    kinds = sorted({w.category.__name__ for w in caught})
    if "MaterializationWarning" in kinds:
        return "fallback (MaterializationWarning)", err
    return ("warns: " + ", ".join(kinds) if kinds else "ok"), err


def checked_calls(
    c: Case, op: str, keep: Callable[[str], bool] = lambda method: True
) -> Iterator[tuple[str, Callable[[], Any], str, float | None]]:
    """`(method, call, status, error)` for each method `keep` names that applies to `op`, each
    call run once by `check` (the warm-up), the gradients it left cleared."""
    for method, factory in METHODS.items():
        if not keep(method):
            continue
        fn = factory(c, op)
        if fn is None:
            continue
        call = make_call(fn, op, c.A)
        status, err = check(call, c, op)
        for p in c.A:
            p.grad = None
        yield method, call, status, err


def timeit(stmt: Callable[[], Any], threads: int, min_time: float) -> tuple[float, int]:
    """Median seconds per call and the number of calls. torch.utils.benchmark synchronizes
    CUDA around each block and runs blocks until min_time has passed."""
    m = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=threads).blocked_autorange(
        min_run_time=min_time
    )
    return m.median, m.number_per_run * len(m.times)


ROUNDS = 5


def time_interleaved(
    stmts: list[Callable[[], Any]], threads: int, min_time: float
) -> list[tuple[float, int, list[float]]]:
    """`timeit` for several methods of one case, in ROUNDS rounds that take each method in
    turn: a slow spell of this noisy machine then lands on every method alike, not on
    whichever one it was timing (the same method's median varied 2x between runs).
    Per method: the median over all blocks, the calls timed, and each round's median (their
    ratios between two methods show how far the machine's noise moves a ratio)."""
    times: list[list[float]] = [[] for _ in stmts]
    rounds: list[list[float]] = [[] for _ in stmts]
    runs = [0] * len(stmts)
    for _ in range(ROUNDS):
        for i, stmt in enumerate(stmts):
            m = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=threads).blocked_autorange(
                min_run_time=min_time / ROUNDS
            )
            times[i] += m.times
            rounds[i].append(m.median)
            runs[i] += m.number_per_run * len(m.times)
    return [(statistics.median(t), n, r) for t, n, r in zip(times, runs, rounds)]


# Target 2 (std and var within 2x of sum) is a ratio of two ops: timed in separate blocks,
# minutes apart, the machine's drift lands on one and not the other (ResNet-50's sum took
# 2.64 ms in its block and 3.2-3.4 ms in others of the same run). So both are also timed in
# the same interleaved rounds, with the per-tensor loop's pair for comparison.
MOMENT_CALLS: dict[str, Callable[[Case], Callable[[], Any]]] = {
    "modtensor sum": lambda c: (lambda: torch.sum(c.bundles[0])),
    "modtensor std": lambda c: (lambda: c.bundles[0].std()),
    "modtensor var": lambda c: (lambda: c.bundles[0].var()),
    "loop sum": lambda c: (lambda: LOOP_OPS["sum"](c.A, None)),
    "loop std": lambda c: (lambda: LOOP_OPS["std"](c.A, None)),
}


def moment_ratios(c: Case, model: str, args: argparse.Namespace) -> list[str]:
    """A row of the std/var-to-sum table: each method's median and the ratios within rounds."""
    names = list(MOMENT_CALLS)
    calls = [make_call(MOMENT_CALLS[name](c), "sum", c.A) for name in names]
    timed = dict(zip(names, time_interleaved(calls, args.threads, args.min_time)))

    def ratio(top: str, bottom: str) -> str:
        (t, _, r1), (b, _, r2) = timed[top], timed[bottom]
        rounds = [x / y for x, y in zip(r1, r2)]
        return f"{t / b:.2f} ({min(rounds):.2f}-{max(rounds):.2f})"

    return [model, *(fmt_time(timed[name][0]) for name in names),
            ratio("modtensor std", "modtensor sum"), ratio("modtensor var", "modtensor sum"),
            ratio("loop std", "loop sum")]


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one_case(args: argparse.Namespace) -> None:
    """--one-case MODEL OP METHOD: peak extra memory of one call, in this fresh process."""
    model, op, method = args.one_case
    warnings.simplefilter("ignore")
    c = Case(model, args.device, pair=op in PAIR_OPS)
    call = make_call(METHODS[method](c, op), op, c.A)
    # One call first, so one-time allocations (autograd engine, lazy imports, BLAS workspaces,
    # allocator pools, modtensor's kept scratch block) are not charged to the op: what is
    # measured is a call in a loop, as in the timings. (A tiny model would not do: its calls
    # take other paths than the real model's.)
    call()
    for p in c.A:
        p.grad = None
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        # VmHWM is the peak RSS of this process image (ru_maxrss is not: Linux carries it over
        # from the parent across fork + exec, so it would report the parent's size).
        try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # no reset: the peak so far is the parameters, built without temporaries
            pass
        base = _status_bytes("VmHWM")
        call()
        peak = _status_bytes("VmHWM")
    print(json.dumps({"extra": peak - base, "model_bytes": c.nbytes}))


def measure_memory(row: dict[str, Any], args: argparse.Namespace) -> None:
    cmd = [sys.executable, __file__, "--one-case", row["model"], row["op"], row["method"],
           "--device", args.device, "--threads", str(args.threads)]
    # A fixed mmap threshold makes glibc return every freed block over 64 KiB to the OS at
    # once; its default adaptive threshold keeps some freed temporaries resident, so the
    # peak would depend on the allocation history rather than on what the method holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        row["mem"] = "error: " + (out.stderr.strip().splitlines() or ["?"])[-1][:60]
        return
    result = json.loads(out.stdout.strip().splitlines()[-1])
    row["mem"] = (result["extra"], result["extra"] / result["model_bytes"])


# -- report -----------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_mem(mem: Any) -> tuple[str, str]:
    if isinstance(mem, tuple):
        return f"{mem[0] / 2**20:.1f}", f"{mem[1]:.2f}"
    return (mem or "–"), "–"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in lines)


def device_name(device: str) -> str:
    if device == "cuda":
        return f"CUDA {torch.cuda.get_device_name()}"
    cpuinfo = Path("/proc/cpuinfo")
    names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines()
             if l.startswith("model name")] if cpuinfo.exists() else []
    return f"CPU {names[0] if names else platform.processor() or platform.machine()}"


def source_state() -> str:
    """The commit modtensor was benchmarked at, `-dirty` if its working tree had changes.

    BENCH_SOURCE, where set, says instead: a copy of the checkout sent to a GPU machine may
    carry no history, or another commit's.
    """
    if os.environ.get("BENCH_SOURCE"):
        return os.environ["BENCH_SOURCE"]
    try:
        return subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def round_ratios(r: dict[str, Any], base: dict[str, Any] | None) -> str:
    """The lowest and highest of modtensor's ratio to the baseline within one round."""
    if not base or not r.get("rounds") or not base.get("rounds"):
        return "–"
    ratios = [a / b for a, b in zip(r["rounds"], base["rounds"])]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def report(
    rows: list[dict[str, Any]], setups: list[list[str]], moments: list[list[str]], args: argparse.Namespace
) -> str:
    ok = [r for r in rows if r["time"] is not None]
    summary = []
    for key in dict.fromkeys((r["model"], r["op"]) for r in rows):
        group = [r for r in ok if (r["model"], r["op"]) == key]
        base = min((r for r in group if r["method"] not in MODTENSOR), key=lambda r: r["time"], default=None)
        for r in (r for r in group if r["method"] in MODTENSOR):
            ratio = f"{r['time'] / base['time']:.2f}" if base else "–"
            summary.append([key[0], OP_TITLES.get(key[1], key[1]), r["method"], fmt_time(r["time"]),
                            base["method"] if base else "–", fmt_time(base["time"] if base else None), ratio,
                            round_ratios(r, base), fmt_mem(r.get("mem"))[1], fmt_mem(base and base.get("mem"))[1]])
    details = []
    for r in rows:
        mib, frac = fmt_mem(r.get("mem"))
        err = "–" if r["err"] is None else f"{r['err']:.1e}"
        details.append([r["model"], OP_TITLES.get(r["op"], r["op"]), r["method"], fmt_time(r["time"]),
                        str(r["runs"] or "–"), err, r["status"], mib, frac])
    lib = f"tensordict {importlib.metadata.version('tensordict')}" if HAVE_TENSORDICT else "tensordict not installed"
    return "\n\n".join([
        f"Generated by `{shlex.join(['python', *sys.argv])}` on "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        f"- device: {device_name(args.device)}, torch.set_num_threads({args.threads})\n"
        f"- torch {torch.__version__}, modtensor {mt.__version__} ({source_state()}), {lib}, "
        f"Python {platform.python_version()}\n"
        f"- load average (1 min) at the start / end of the timings: {args.load[0]:.2f} / "
        f"{args.load[1]:.2f} (other processes on the machine compete for its cores)\n"
        f"- timing: torch.utils.benchmark `blocked_autorange`, {args.min_time} s per method in {ROUNDS} "
        "rounds that take the methods of a case in turn; medians over all blocks",
        "### Models and setup costs (built once, outside the timings)",
        md_table(["model", "tensors", "parameters", "MiB", "mt.bundle(model)", "TensorDict.from_dict",
                  "TensorDict.from_module leaves"], setups),
        "### Summary: modtensor vs the fastest baseline",
        md_table(["model", "op", "modtensor", "time", "fastest baseline", "its time",
                  "ratio (mt / baseline)", "ratio per round", "mt peak extra (× model)",
                  "baseline peak extra (× model)"],
                 summary),
        "### std and var against sum, timed in the same rounds (target 2)",
        md_table(["model", *MOMENT_CALLS, "modtensor std / sum (per round)", "modtensor var / sum (per round)",
                  "loop std / sum (per round)"], moments) if moments else "(not run: needs the ops sum and std)",
        "### All methods",
        md_table(["model", "op", "method", "median", "runs", "rel. error vs float64", "status",
                  "peak extra MiB", "× model"], details),
    ])


def write_report(text: str, out: Path) -> None:
    """Replace the marked section of `out` if it has one, else write the whole file."""
    old = out.read_text() if out.exists() else ""
    if MARKERS[0] in old and MARKERS[1] in old:
        head, _, rest = old.partition(MARKERS[0])
        _, _, tail = rest.partition(MARKERS[1])
        text = f"{head}{MARKERS[0]}\n{text}\n{MARKERS[1]}{tail}"
    else:
        text += "\n"
    out.write_text(text)


# -- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet50 and seed only, short timings (smoke test)")
    p.add_argument("--big", action="store_true", help="add the 1 GiB MLP (4 x 8192x8192 float32)")
    p.add_argument("--models", help=f"comma-separated, from {','.join(MODELS)} (overrides --quick/--big)")
    p.add_argument("--ops", default=",".join(FLAT_OPS), help="comma-separated ops (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--min-time", type=float, help="seconds of timed calls per method (default 1, --quick 0.05)")
    p.add_argument("--mem-jobs", type=int, default=2, help="memory subprocesses run at once (default 2)")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", type=Path, default=HERE / "README.md",
                   help="markdown output; its <!-- results:start/end --> section is replaced if present")
    p.add_argument("--one-case", nargs=3, metavar=("MODEL", "OP", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.models is None:
        args.models = "resnet50,seed" if args.quick else "resnet50,gpt2,seed"
        args.models += ",mlp1g" if args.big else ""
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 1.0
    return args


def setup_costs(c: Case, model: str, args: argparse.Namespace) -> list[Any]:
    """A row of the models table: sizes, and the cost of building each container once."""
    t = min(args.min_time, 0.2)
    row = [model, len(c.A), f"{c.numel:,}", f"{c.nbytes / 2**20:.1f}",
           fmt_time(timeit(lambda: mt.bundle(c.a), args.threads, t)[0]), "–", "–"]
    if HAVE_TENSORDICT:
        from tensordict import TensorDict

        row[5] = fmt_time(timeit(lambda: TensorDict.from_dict(dict(c.a.named_parameters())), args.threads, t)[0])
        row[6] = len(list(TensorDict.from_module(c.a).values(True, True)))
    return row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.one_case:
        return one_case(args)
    args.load = [os.getloadavg()[0], None]
    if not HAVE_TENSORDICT:
        print("tensordict not installed: skipping the tensordict baseline", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    setups, moments = [], []
    for model in args.models.split(","):
        c = Case(model, args.device, pair=True)
        setups.append(setup_costs(c, model, args))
        for op in args.ops.split(","):
            op_rows, calls = [], []
            for method, call, status, err in checked_calls(c, op):
                op_rows.append(dict(model=model, op=op, method=method, status=status, err=err, time=None,
                                    runs=None, nbytes=c.nbytes))
                calls.append(None if status.startswith("error") else call)
            timed = [i for i, f in enumerate(calls) if f is not None]
            for i, (median, runs, rounds) in zip(
                timed, time_interleaved([calls[i] for i in timed], args.threads, args.min_time)
            ):
                op_rows[i]["time"], op_rows[i]["runs"], op_rows[i]["rounds"] = median, runs, rounds
            for p in c.A:
                p.grad = None
            for row in op_rows:
                print(f"{model:9} {op:6} {row['method']:28} {fmt_time(row['time']):>10}  {row['status']}",
                      file=sys.stderr, flush=True)
            rows += op_rows
        if {"sum", "std"} <= set(args.ops.split(",")) and model != "seed":  # target 2: models of 1M+
            moments.append(moment_ratios(c, model, args))
        del c
    args.load[1] = os.getloadavg()[0]
    if not args.no_mem:
        # On CPU, RSS moves in pages: a model under 1 MiB gives no meaningful fraction.
        todo = [r for r in rows if r["time"] is not None and (args.device == "cuda" or r["nbytes"] >= 2**20)]
        with ThreadPoolExecutor(args.mem_jobs) as pool:
            list(pool.map(lambda r: measure_memory(r, args), todo))
    write_report(report(rows, setups, moments, args), args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

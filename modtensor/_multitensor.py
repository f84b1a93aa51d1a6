"""Multi-tensor kernels: one Triton launch reduces every tensor of a bundle on a GPU.

On a GPU the per-tensor path pays a kernel launch and some Python per tensor: ResNet-50's 161
tensors cost milliseconds, while the card reads the whole model in about 30 µs. Here one
launch reads every tensor where it lies, nothing copied: each program reduces one row of a
table, a chunk of one tensor, into a partial state, and the last program to finish combines
the rows' states in float64 and writes the result in the result's dtype.

The table gives each chunk's start relative to the first tensor's address, so one pointer
argument reaches every tensor. Starts and lengths of chunks whose tensor is 16-byte aligned
are kept in units of 16 bytes, which lets Triton emit 16-byte loads; the few elements past
the last full unit, and tensors that are not aligned, get rows in units of one element.
A plan (the table, with the addresses it was made for) is kept per bundle and made again
when a tensor moved (`p.data = ...`): checking the addresses is the one per-tensor cost of a
call, a few microseconds of its ~50 µs of Python and launch.

Triton is optional: without it, on other devices, while torch.compile traces, for dtype=
casts, keepdim, mixed dtypes and non-contiguous tensors, and where autograd records (but for
sum, mean, the L2 norm and `(b ** 2).sum()`, whose backward is here), reductions take the
per-tensor path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from modtensor._strategies import may_pack

if TYPE_CHECKING:
    from modtensor._bundle import ParameterBundle

__all__ = ["CHUNK", "DEVICES", "GRADIENTS", "OPS", "distance", "reduce", "serves", "sum_of_squares"]

# Elements per row: ResNet-50's 25M parameters make ~550 rows, GPT-2's 124M ~1,900, so that
# every multiprocessor gets several and a row's fixed cost (its table entry, the reduction
# across its lanes, the last program's read of its state) stays small. Measured on an H200
# (benchmarks/multitensor.py): GPT-2 norm 126.7 us with 64Ki-element rows, 136.2 with 16Ki
# (one flat tensor: 121.1); ResNet-50 the same within noise.
CHUNK = 1 << 16
BLOCK = 1024  # elements a program loads per step
WARPS = 4
TILE = 1024  # rows the combining program reads per step
DEVICES = {"cuda"}  # the tests add "cpu" under TRITON_INTERPRET=1
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The kernels' op codes: what one row reduces to, and how the rows combine.
OPS = {
    "sum": 0,  # sum of x
    "mean": 1,  # sum of x, divided by the count
    "norm": 2,  # sqrt of the sum of x * x
    "amax": 3,  # max of x (NaN if any)
    "amin": 4,  # max of -x, negated
    "var": 5,  # Welford's (mean, M2) per lane, merged as Chan et al.; a row: (shift, mean, M2)
    "std": 6,
    "var_mean": 7,
    "std_mean": 8,
    "dist": 9,  # sqrt of the sum of (x - y) ** 2
    "sumsq": 10,  # sum of x * x: (x ** 2).sum()
}
GRADIENTS = frozenset({"sum", "mean", "norm", "sumsq"})  # the ops whose backward is here
_STATES = {5: 3, 6: 3, 7: 3, 8: 3}  # words of state per row (default 1)
# How lanes add for sum and mean, which may cancel: plain float32 lanes of 64 steps each left
# the 1 GiB MLP's sum 8.4e-7 off the float64 reference, twice the error of torch's sum of the
# concatenation. "kahan" compensates each float32 lane, "float64" adds in float64 (1.2x the
# time on an H200: GPT-2's sum 149 us against 126). Squares and moments do not cancel and
# add in float32. Float64 tensors always add in float64.
SUM_LANES = "kahan"  # or "float64", "float32" (benchmarks/multitensor.py times all three)
_CANCELLING = (0, 1)
_TWO_RESULTS = (7, 8)


@functools.cache
def _triton() -> Any:
    """The kernels' module, or None without Triton. Imported on first use: Triton takes a second."""
    try:
        return importlib.import_module("modtensor._triton_kernels")
    except ImportError:
        return None


@dataclass(frozen=True)
class _Plan:
    table: torch.Tensor  # (rows, 3) int64: start in x, start in y, length
    vector_rows: int  # the first rows, in units of `vec` elements; the rest in elements
    vec: int
    counts: torch.Tensor  # per row, the elements it holds (float64), for var
    # Per stream, how many programs of the running launch have stored their row: zero
    # between launches (the last program resets it), so launches on one stream share it.
    arrived: dict[int, torch.Tensor] = field(default_factory=dict)


def _addresses(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return tuple(map(torch.Tensor.data_ptr, tensors))


def _make_plan(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None) -> _Plan | None:
    """The rows of `xs` (and of `ys`, tensor by tensor the same shapes), or None where a
    tensor is not contiguous (its elements do not lie in one run), or where the tensors no
    longer all have the first one's dtype and device, or `ys` not `xs`'s sizes."""
    size = xs[0].element_size()
    vec = max(1, 16 // size)
    sides = [xs] if ys is None else [xs, ys]
    bases = [side[0].data_ptr() for side in sides]
    # A bundle records its tensors' dtypes and devices when made. Dispatch refuses a tensor
    # whose size or itemsize changed since (_check_unchanged), not one made bfloat16 from
    # float16 or moved by `model.cpu()`, which the kernel would read in the wrong format or
    # off the device. The per-tensor path reads each tensor as it is now.
    dtype, device = xs[0].dtype, xs[0].device
    if device.type not in DEVICES:
        return None
    vector_rows: list[tuple[int, int, int]] = []
    element_rows: list[tuple[int, int, int]] = []
    for i, x in enumerate(xs):
        operands = [side[i] for side in sides]
        n = x.numel()
        if any(t.dtype != dtype or t.device != device or t.numel() != n for t in operands):
            return None
        if n == 0:
            continue
        if not all(t.is_contiguous() for t in operands):
            return None
        gaps = [t.data_ptr() - base for t, base in zip(operands, bases)]
        if any(g % size for g in gaps):  # not even aligned to its element size
            return None
        start_x, start_y = gaps[0] // size, gaps[-1] // size  # y: x's again where there is none
        aligned = all(g % 16 == 0 for g in gaps)
        whole = n - n % vec if aligned else 0
        for s in range(0, whole, CHUNK):
            length = min(CHUNK, whole - s)
            vector_rows.append(((start_x + s) // vec, (start_y + s) // vec, length // vec))
        for s in range(whole, n, CHUNK):
            element_rows.append((start_x + s, start_y + s, min(CHUNK, n - s)))
    rows = vector_rows + element_rows
    device = xs[0].device
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    lengths = [r[2] * vec for r in vector_rows] + [r[2] for r in element_rows]
    counts_t = torch.tensor(lengths, dtype=torch.float64).to(device)
    return _Plan(table, len(vector_rows), vec, counts_t)


def _plan(cache: dict[Any, Any], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None) -> _Plan | None:
    key = ("multitensor", CHUNK, ys is not None)
    addresses = _addresses(xs) + (_addresses(ys) if ys is not None else ())
    found = cache.get(key)
    if found is not None and found[0] == addresses:  # else made again after `p.data = ...`
        plan: _Plan | None = found[1]
        return plan
    plan = _make_plan(xs, ys)
    cache[key] = (addresses, plan)  # None too: a non-contiguous tensor is not looked for again
    return plan


def reduce(
    op: str,
    xs: Sequence[torch.Tensor],
    out_dtype: torch.dtype,
    cache: dict[Any, Any],
    ys: Sequence[torch.Tensor] | None = None,
    numel: int = 0,
    correction: float = 1.0,
) -> Any:
    """`op` over the concatenation of `xs` (with `ys`, for `dist`) in one pass, or None.

    The tensors are those of bundles that `serves` accepts; `numel` is their total count of
    elements; `cache` keeps the plan (a bundle's `_plans`). Returns a 0-d tensor of
    `out_dtype` (a pair for var_mean / std_mean), or None where a tensor is not contiguous.
    Where autograd records (ops in GRADIENTS only), the result has a gradient.
    """
    plan = _plan(cache, xs, ys)
    if plan is None:
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        assert op in GRADIENTS and ys is None, f"{op}: the kernels have no backward for it"
        return _Differentiable.apply(op, plan, numel, *xs)  # type: ignore[no-untyped-call]
    return _launch(op, plan, xs, ys, out_dtype, numel, correction)


def _launch(
    op: str,
    plan: _Plan,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor] | None,
    out_dtype: torch.dtype,
    numel: int,
    correction: float,
) -> Any:
    kernels = _triton()
    code = OPS[op]
    rows = plan.table.shape[0]
    device = xs[0].device
    partials = torch.empty(rows * _STATES.get(code, 1), dtype=torch.float64, device=device)
    out = torch.empty((), dtype=out_dtype, device=device)
    second = torch.empty((), dtype=out_dtype, device=device) if code in _TWO_RESULTS else out
    y = ys[0] if ys is not None else xs[0]
    f64 = xs[0].dtype == torch.float64 or (SUM_LANES == "float64" and code in _CANCELLING)
    kahan = not f64 and SUM_LANES == "kahan" and code in _CANCELLING
    elsewhere = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if elsewhere else contextlib.nullcontext():  # Triton launches on the current one
        kernels.reduce[(rows,)](
            xs[0], y, plan.table, plan.vector_rows, partials, plan.counts, rows, numel, correction,
            _arrived(plan, device), out, second,
            OP=code, VEC=plan.vec, BLOCK=BLOCK, F64=f64, KAHAN=kahan, TILE=TILE, num_warps=WARPS,
        )
    return (out, second) if code in _TWO_RESULTS else out


def _arrived(plan: _Plan, device: torch.device) -> torch.Tensor:
    # Launches on two streams may overlap: each stream counts on its own.
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    counter = plan.arrived.get(stream)
    if counter is None:
        counter = plan.arrived[stream] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


class _Differentiable(torch.autograd.Function):
    """The kernels' result with torch's gradient: each tensor's by one foreach call for all."""

    @staticmethod
    def forward(ctx: Any, op: str, plan: _Plan, numel: int, *xs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _launch(op, plan, xs, None, xs[0].dtype, numel, 1.0)
        ctx.op, ctx.numel, ctx.shapes = op, numel, [x.shape for x in xs]
        if op in ("norm", "sumsq"):
            ctx.save_for_backward(out, *xs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        op = ctx.op
        if op in ("sum", "mean"):
            each = grad if op == "sum" else grad / ctx.numel
            grads = [each.expand(shape) for shape in ctx.shapes]
        else:
            out, *xs = ctx.saved_tensors
            if op == "norm":  # torch's: x * grad / norm, and zero where the norm is zero
                scale = torch.where(out == 0, torch.zeros_like(grad), grad / out)
            else:  # sumsq: 2 x grad
                scale = 2 * grad
            if torch.is_grad_enabled():  # create_graph=True: ops autograd differentiates again
                grads = [x * scale for x in xs]
            else:
                grads = list(torch._foreach_mul(xs, scale))
        return (None, None, None, *grads)


def serves(*bundles: ParameterBundle, gradients: bool = False) -> bool:
    """True where one launch may reduce `bundles` (one, or two of the same structure).

    That is: their own tensors (not computed on demand), all of one floating dtype and on
    one device that has the kernels, at least one element, not in a graph being compiled,
    and no gradient recorded unless `gradients` (the op is in GRADIENTS). Cheapest tests
    first: on the CPU this costs one comparison.
    """
    first = bundles[0]
    return (
        first._device.type in DEVICES
        and all(_uniform(b) and b._device == first._device and b._dtype == first._dtype for b in bundles)
        and not torch.compiler.is_compiling()
        and (gradients or may_pack(*bundles))
        and _triton() is not None
    )


def _uniform(b: ParameterBundle) -> bool:
    """True where `b` holds tensors of its own (not on demand), not sharded, with elements,
    of one floating dtype and on one device. Kept with the bundle's plans: it never changes."""
    found: bool | None = b._plans.get("multitensor")
    if found is None:
        found = b._plans["multitensor"] = (
            b._tensors is not None and b._dist is None and b._on_one_device and b._numel > 0
            and b._dtype in _FLOATS and all(d == b._dtype for d in b._dtypes)
        )
    return found


def sum_of_squares(x: ParameterBundle, records: bool, check: Callable[[], None]) -> Any:
    """`(x ** 2).sum()` by one launch, or None; with a gradient if `records` (the grad mode
    the on-demand `x ** 2` was made in). `check()` raises if x changed since then."""
    if not serves(x, gradients=True):
        return None
    check()
    assert x._tensors is not None
    with torch.set_grad_enabled(records):
        return reduce("sumsq", x._tensors, x._dtype, x._plans, numel=x._numel)


def distance(x: ParameterBundle, y: ParameterBundle, check: Callable[[], None] | None = None) -> Any:
    """`torch.dist(x, y)` (the L2 norm of `x - y`) of two bundles by one launch, or None.

    `check()`, for the on-demand `x - y`, raises if x or y changed since it was made."""
    if not (x._strategy == "concat" and x._shapes == y._shapes and serves(x, y)):
        return None
    if check is not None:
        check()
    assert x._tensors is not None and y._tensors is not None
    return reduce("dist", x._tensors, x._dtype, x._plans, ys=y._tensors, numel=x._numel)

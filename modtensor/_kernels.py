"""Per-tensor kernels for the hottest reductions, and the chains fused into them.

torch's CPU `vector_norm` of one long float32 tensor accumulates with a relative error of
about 1e-3, and `(x ** 2).sum()` or `(a - b).norm()` first write a whole-tensor temporary.
Here a long tensor's L2 norm is taken over a `(-1, ROW)` view, one short row at a time in
torch's kernel (as fast, and accurate on short rows), the rows' norms combined in float64;
`a - b` is formed a block at a time; and a sum of squares or a norm of a difference computed
on demand is recognised and computed by these kernels, with one-allocation backwards.
The raw moments (sum, sum of squares) that a fast variance needs come from the same rows.
The distance between two bundles, and their moments, follow plans kept with the bundle: where
each block's rows go, worked out once rather than sliced at every call.

float16 and bfloat16 tensors are read the same way, a block at a time converted into a float32
buffer: torch's CPU float16 norm of 16Mi elements is 1.4% off (and 4x slower than the blocks),
and its float32 sum or var of one (which the concatenation's accumulator is) makes a whole
float32 copy, twice the tensor's memory.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from modtensor import _multitensor
from modtensor._dispatch import NOT_HANDLED
from modtensor._reduce_common import (
    _LOW_PRECISION,
    _cast,
    _partial_dtype,
    _stack,
    kept_empty,
    records,
    sqrt0,
    transformed,
)
from modtensor._strategies import Pieces, _places

if TYPE_CHECKING:
    from modtensor._bundle import ParameterBundle
    from modtensor._strategies import ReduceArgs

__all__ = [
    "by_rows", "diff_l2_norm", "diff_squares", "fuse", "l2_norm", "moments", "moments_dtype", "moments_served",
    "narrow_cosine", "narrow_sum", "p_norm", "planned_distance", "rows_numel", "sum_of_squares", "wide_dot", "wide_logsumexp",
    "wide_norm",
]

ROW = 1024
# Below these torch's own kernels are faster (their temporaries fit in cache and the allocator
# reuses them; a row pass costs a few more calls), and accurate enough.
MIN_NUMEL = 1 << 20
# The norm reduction takes rows from this many elements only: below, torch's norm of a tensor
# is off by at most about 5e-5 (1.2e-5 at 1Mi elements, growing with the length), far closer
# than the concatenation's, and a row pass would cost ~10% more than torch._foreach_norm.
NORM_ROWS_NUMEL = 1 << 22
DIST_MAX_NUMEL = 1 << 14  # torch.dist is the fastest up to here
# A distance between bundles packs its pairs of tensors of at most this many elements (one copy
# and one subtraction for all of a pack), and takes the longer ones by blocks (_DistancePlan).
DIST_PACK_NUMEL = 1 << 14
# p-norms of other orders than 2 take sums of powers in the block buffer from here (see
# _power_sum_norm): its Python costs about 10 us, torch's kernel 2 ns an element and more.
POWERS_MIN_NUMEL = 1 << 14
BLOCK = 1 << 18  # elements of `a - b` formed at once: 1 MiB in float32, cache-sized; ROW * k
# A difference of float32 or float64 tensors is taken by rows from MIN_NUMEL elements, not from
# NORM_ROWS_NUMEL as a norm is: a whole difference of a few MiB is a new allocation per call,
# whose page faults decide its time. On GPT-2's shapes, 1 thread, `(a - b).norm()` took 42 or
# 130 ms from one process to the next with differences of up to 4Mi elements made whole, 44-48
# ms by rows (ResNet-50's: 10-19, 11-11.4).
DIFF_ROWS_NUMEL = MIN_NUMEL
# Moments serve tensors from MOMENTS_MIN_NUMEL elements: below, torch's var and mean take
# fewer calls than the moments and the checks on them. Below MOMENTS_ROWS_NUMEL they are added in
# float64, exact in practice (rows would be few to average their rounding out, and cost at most
# 1.3x less there); from it, by rows. A bundle's var per tensor, 1 thread, against torch's var and
# mean: 16 against 17 µs at 8Ki elements, 19 against 24 at 16Ki, 47 against 128 at 128Ki, 0.18
# against 0.96 ms at 1Mi.
MOMENTS_MIN_NUMEL = 1 << 13
MOMENTS_ROWS_NUMEL = 1 << 17
# Elements whose row norms and sums are taken before the next block's: the second pass reads them
# from the cache, the closer the smaller the block, down to where the calls cost more than
# that saves. A bundle's std, 1 thread, best of 7 (a Xeon with 2 MiB of L2 per core): ResNet-50
# 11.7-12.7 ms at 128Ki (512 KiB), 12.5-13.1 at 256Ki, 14.0-15.4 at 1Mi, 12.9-13.8 at 64Ki
# (its sum 7.1-8.2); GPT-2 57-59 ms at 128Ki, 70-76 at 1Mi (its sum 34-36); in float16 and
# float64 too, 128Ki-256Ki came out fastest.
MOMENTS_BLOCK = 1 << 17  # ROW * k
MOMENTS_WIDE_ROWS = 1 << 12  # rows of the moments converted to float64 at once (64 KiB)
_SCRATCH = threading.local()
_DTYPES = (torch.float32, torch.float64)
# float16 and bfloat16 tensors take the row kernels from here: torch's float16 norm is off by
# 6e-4 at 1Mi elements, over a float16 step, and its float32 sum of one copies it; below, a
# float32 copy takes at most 256 KiB. (5e-6 at 100Ki elements.)
NARROW_MIN_NUMEL = 1 << 16


def rows_numel(dtype: torch.dtype) -> int:
    """The fewest elements of `dtype` whose norm `l2_norm` takes by rows.

    Example:
        >>> import torch
        >>> rows_numel(torch.float32) > rows_numel(torch.bfloat16)
        True
    """
    return NARROW_MIN_NUMEL if dtype in _LOW_PRECISION else NORM_ROWS_NUMEL


def by_rows(numel: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `diff_l2_norm` takes a pair of contiguous tensors of this size, dtype and device
    by rows, a block at a time (no difference made whole), where torch does not compile.

    Example:
        >>> import torch
        >>> cpu = torch.device("cpu")
        >>> by_rows(1 << 20, torch.float32, cpu), by_rows(1 << 19, torch.float32, cpu)
        (True, False)
    """
    least = DIFF_ROWS_NUMEL if dtype in _DTYPES else rows_numel(dtype)
    return device.type == "cpu" and (dtype in _DTYPES or dtype in _LOW_PRECISION) and numel >= least


def _eligible(*tensors: torch.Tensor) -> bool:
    # CPU only: on a GPU torch's reductions are tree-shaped (accurate) and a Python block loop
    # would cost a kernel launch per block.
    t = tensors[0]
    return (
        t.numel() >= NARROW_MIN_NUMEL  # first: the cheapest test, and most tensors are smaller
        and t.device.type == "cpu"
        and (t.dtype in _LOW_PRECISION or (t.dtype in _DTYPES and t.numel() >= MIN_NUMEL))
        and all(u.dtype == t.dtype and u.shape == t.shape and u.is_contiguous() for u in tensors)
        and all(u.device == t.device for u in tensors)
        and not transformed()
    )


def _in_scratch(*tensors: torch.Tensor) -> bool:
    # Whether these (of one shape and dtype) may be read into the kept block buffer (`a - b`,
    # `|a|`): float32 and float64 contiguous CPU tensors, outside torch.compile and torch.func.
    return (
        tensors[0].dtype in _DTYPES and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and not torch.compiler.is_compiling() and not transformed()
    )


def _by_blocks(*tensors: torch.Tensor) -> bool:
    # Whether a 16-bit reduction without autograd of its own (out=, buffers) may read these
    # by blocks: where they are eligible and autograd records nothing, outside torch.compile.
    return (
        _eligible(*tensors) and not torch.compiler.is_compiling()
        and not records(*tensors)
    )


def _rows_into(
    flat: torch.Tensor, rows: torch.Tensor, reduce: Callable[..., Any] = torch.linalg.vector_norm
) -> None:
    # The norms (or sums) of flat's rows of ROW elements (the last one shorter) into `rows`.
    full = flat.numel() // ROW * ROW
    if full == flat.numel():  # no tail row: no slices to make (each costs about a microsecond)
        reduce(flat.view(-1, ROW), dim=1, out=rows)
        return
    reduce(flat[:full].view(-1, ROW), dim=1, out=rows[: full // ROW])
    reduce(flat[full:], dim=0, out=rows[-1])


def _rows_norm(flat: torch.Tensor) -> torch.Tensor:
    # The L2 norm of flat's rows' L2 norms is flat's own.
    if records(flat):  # traced by autograd (torch.compile)
        full = flat.numel() // ROW * ROW
        parts = [torch.linalg.vector_norm(flat[:full].view(-1, ROW), dim=1, dtype=_partial_dtype(flat.dtype))]
        if full < flat.numel():
            parts.append(torch.linalg.vector_norm(flat[full:], dtype=_partial_dtype(flat.dtype)).reshape(1))
        rows = torch.cat(parts)
    else:  # written in place: out= has no autograd
        rows = torch.empty(-(-flat.numel() // ROW), dtype=_partial_dtype(flat.dtype), device=flat.device)
        for start, stop, block in _blocks(flat, BLOCK if flat.dtype in _LOW_PRECISION else flat.numel()):
            _rows_into(block, rows[start // ROW : -(-stop // ROW)])
    norm: torch.Tensor = torch.linalg.vector_norm(rows.to(torch.float64))
    return norm


def _blocks(flat: torch.Tensor, size: int, slot: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
    """`(start, stop, flat[start:stop])` by blocks of `size` elements (a multiple of ROW, so
    one tail row at most); float16 and bfloat16 converted into a float32 buffer, reused for
    each block (`slot` tells a second such buffer from the first)."""
    n = flat.numel()
    buffer = _scratch(min(size, n), torch.float32, flat.device, slot) if flat.dtype in _LOW_PRECISION else None
    for start in range(0, n, size):
        stop = min(start + size, n)
        if buffer is None:
            yield start, stop, flat[start:stop]
        else:
            block = buffer[: stop - start]
            block.copy_(flat[start:stop])
            yield start, stop, block


def _scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    # One block buffer per thread, dtype, device and slot, kept: a fresh block per tensor costs
    # its page faults again each time (the allocator hands large blocks back to the system).
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (dtype, device, slot)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = kept_empty(numel, dtype, device)
    return buffer[:numel]


def _scale(g: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # torch's norm backward is x * g / norm, and 0 where the norm is 0
    return _as_factor(torch.where(norm == 0, torch.zeros_like(norm), g / norm), dtype)


def _as_factor(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A 0-d factor for a tensor of `dtype`. Left wide for 16-bit tensors: a 16-bit tensor times
    # a 0-d float64 one rounds once, where the factor rounded to 16 bits first (g / norm of a
    # long tensor is a float16 subnormal from a norm of about 8000) lost its precision.
    return scale if dtype in _LOW_PRECISION else scale.to(dtype)


class _L2Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        norm = _rows_norm(t.detach().reshape(-1))
        ctx.save_for_backward(t, norm)
        return norm

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        t, norm = ctx.saved_tensors
        grad: torch.Tensor = t * _scale(g, norm, t.dtype)
        return grad


class _SumOfSquares(torch.autograd.Function):
    # Its backward, 2 * g * t, is itself differentiable (create_graph): the square's second
    # derivative, 2, also where t is 0 (through _L2Norm it came out 0 there).
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(t)
        flat = t.detach().reshape(-1)
        # No square of t. torch's norm of a tensor is off by up to 5e-5 below MIN_NUMEL, where
        # the square's pairwise sum was within 1e-8: its rows' norms are as accurate.
        by_rows = flat.device.type == "cpu" and flat.numel() >= ROW and not transformed()
        # (a short 16-bit tensor's norm in float32: rounded to 16 bits, then squared, it was a
        # 16-bit step off the concatenation's in some draws)
        norm = _rows_norm(flat) if by_rows else torch.linalg.vector_norm(flat, dtype=_partial_dtype(flat.dtype))
        return norm.to(torch.float64).square()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (t,) = ctx.saved_tensors
        grad: torch.Tensor = t * _as_factor(2 * g, t.dtype)
        return grad


class _DiffSquares(torch.autograd.Function):
    # `((a - b) ** 2).sum()` for the L2 norms of a gradient penalty (see diff_squares); the
    # difference is formed again in backward, one tensor at a time, rather than kept.
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        with torch.no_grad():
            return diff_l2_norm(a, b).to(torch.float64).square()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        scale = _as_factor(2 * g, a.dtype)
        # out of place where the backward is differentiated itself (create_graph)
        grad = (a - b) * scale if torch.is_grad_enabled() else (a - b).mul_(scale)
        return (grad if ctx.needs_input_grad[0] else None), (-grad if ctx.needs_input_grad[1] else None)


def _diff_rows_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The L2 norm of a - b from the norms of its rows, the difference formed a block at a time.
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    n = fa.numel()
    dtype = _partial_dtype(fa.dtype)
    rows = torch.empty(-(-n // ROW), dtype=dtype, device=fa.device)
    if fa.dtype in _LOW_PRECISION:  # both converted by blocks, the difference made in float32
        for (start, stop, x), (_, _, y) in zip(_blocks(fa, BLOCK), _blocks(fb, BLOCK, slot=1)):
            _rows_into(x.sub_(y), rows[start // ROW : -(-stop // ROW)])
    else:
        for start, stop, difference in _scratch_blocks(fa, fb):
            _rows_into(difference, rows[start // ROW : -(-stop // ROW)])
    norm: torch.Tensor = torch.linalg.vector_norm(rows.to(torch.float64))
    return norm


def _scratch_blocks(fa: torch.Tensor, fb: torch.Tensor | None) -> Iterator[tuple[int, int, torch.Tensor]]:
    # `(start, stop, block)` by blocks of BLOCK elements (a multiple of ROW: one tail row at
    # most), each block `fa - fb` (`|fa|` where fb is None) of those elements, written into the
    # kept buffer: flat float32 or float64 tensors, no temporary of theirs made whole.
    n = fa.numel()
    buffer = _scratch(min(BLOCK, n), fa.dtype, fa.device)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        block = buffer[: stop - start]
        if fb is None:
            torch.abs(fa[start:stop], out=block)
        else:
            torch.sub(fa[start:stop], fb[start:stop], out=block)
        yield start, stop, block


def _power_sum_norm(a: torch.Tensor, b: torch.Tensor | None, p: float) -> torch.Tensor:
    # (sum of |a - b| ** p) ** (1 / p) (of |a| where b is None) of float32 or float64
    # contiguous tensors: |a - b| formed a block at a time in the kept buffer and raised to p
    # there (torch's pow has fast paths for 3, 0.5, -1 and the like; vector_norm of another p
    # than 2 took 2-9x as long on one CPU, 2x for p = 1), its rows summed, the rows' sums
    # added in float64. Each power over- or underflows as in torch's norm, whose
    # float32 sum it is (a zero for p < 0: an infinite sum, a norm of 0).
    fa, fb = a.detach().reshape(-1), None if b is None else b.detach().reshape(-1)
    rows = torch.empty(-(-fa.numel() // ROW), dtype=fa.dtype, device=fa.device)
    for start, stop, powers in _scratch_blocks(fa, fb):
        if fb is not None:
            powers.abs_()
        if p != 1:
            powers.pow_(p)
        _rows_into(powers, rows[start // ROW : -(-stop // ROW)], torch.sum)
    norm: torch.Tensor = rows.to(torch.float64).sum().pow(1 / p)
    return norm


class _DiffL2Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        norm = _diff_rows_norm(a, b)
        ctx.save_for_backward(a, b, norm)
        return norm

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b, norm = ctx.saved_tensors
        grad = (a - b).mul_(_scale(g, norm, a.dtype))
        return (grad if ctx.needs_input_grad[0] else None), (-grad if ctx.needs_input_grad[1] else None)


class _PowerSum(torch.autograd.Function):
    # `(|a - b| ** p).sum()` (b may be None) from `norm`, its p-norm made without a gradient;
    # the difference is formed again in backward rather than kept. The backward is torch's
    # norm backward's, with its scale folded into g, and is itself differentiable.
    @staticmethod
    def forward(ctx: Any, norm: torch.Tensor, p: float, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.p = p
        ctx.save_for_backward(a, b)
        return norm.to(torch.float64).pow(p)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        p = ctx.p
        x = a if b is None else a - b
        factor = _as_factor(p * g, x.dtype)
        if torch.is_grad_enabled():  # the backward differentiated itself (create_graph)
            grad = (x.sgn() * x.abs().pow(p - 1) if p < 2 else x * x.abs().pow(p - 2)) * factor
            if p < 1:  # torch's norm gradient for p < 1 is 0 at 0, not |0| ** (p - 1) = inf
                grad = torch.where(x == 0, 0.0, grad)
        else:  # in place on the one new tensor
            grad = x.abs().pow_(p - 1).mul_(x.sgn()) if p < 2 else x.abs().pow_(p - 2).mul_(x)
            if p < 1:
                grad = grad.masked_fill_(x == 0, 0.0)
            grad = grad.mul_(factor)
        return None, None, (grad if ctx.needs_input_grad[2] else None), (-grad if ctx.needs_input_grad[3] else None)


def power_sum(norm: torch.Tensor, p: float, t: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """`norm ** p` in float64, with the gradient of `(|t - other| ** p).sum()` (`other` None: of
    `|t| ** p`), where `norm` is that p-norm made without a gradient (finite p, not 0 or 1).

    A norm combined from these is twice differentiable where a tensor is all zeros, as the
    concatenation's is: through the tensor's own norm its second derivative is NaN there.

    Example:
        >>> import torch
        >>> t = torch.tensor([0.0, 2.0], requires_grad=True)
        >>> s = power_sum(torch.linalg.vector_norm(t.detach(), 3), 3.0, t)
        >>> s.item(), torch.autograd.grad(s, t)[0].tolist()
        (8.0, [0.0, 12.0])
    """
    result: torch.Tensor = _PowerSum.apply(norm, p, t, other)  # type: ignore[no-untyped-call]
    return result


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    """`torch.linalg.vector_norm(t)`, accurate for long float tensors (then in float64).

    Example:
        >>> import torch
        >>> x = torch.full((1 << 20,), 0.1)
        >>> abs(float(l2_norm(x)) - 0.1 * 2 ** 10) < 1e-4  # the float32 concatenation's: 6e-3 off
        True
    """
    if not _eligible(t):
        norm: torch.Tensor = torch.linalg.vector_norm(t)
        return norm
    if torch.compiler.is_compiling() or not records(t):
        # no backward to write (or the compiler traces the rows through autograd itself)
        return _rows_norm(t.reshape(-1))
    result: torch.Tensor = _L2Norm.apply(t)  # type: ignore[no-untyped-call]
    return result


def p_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """`torch.linalg.vector_norm(t, p)` for finite p other than 0 and 2. For float32 and
    float64 contiguous CPU tensors of `POWERS_MIN_NUMEL` elements or more where no gradient is
    recorded, from the sums of `|t| ** p` by rows, added in float64: torch's float32 1-norm of
    8M random elements is about 1e-3 off, this one about 1e-8 (1e-5 where the elements are all
    equal: every row rounds the same way), and on one CPU 2-9x faster than torch's.

    Example:
        >>> import torch
        >>> x = torch.full((1 << 22,), 0.1)
        >>> exact = float(x.double().sum())  # torch's float32 1-norm: 1.7% off on one CPU
        >>> abs(float(p_norm(x, 1)) - exact) < 1e-4 * exact
        True
    """
    if not (
        t.numel() >= POWERS_MIN_NUMEL and _in_scratch(t) and not records(t)
    ):
        whole: torch.Tensor = torch.linalg.vector_norm(t, p)
        return whole
    return _power_sum_norm(t, None, p)


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """`(t ** 2).sum()`: by `l2_norm` for long tensors, else torch's (accurate) sum.

    Example:
        >>> import torch
        >>> float(sum_of_squares(torch.full((3,), 2.0)))
        12.0
    """
    if records(t) and t.is_floating_point() and not torch.compiler.is_compiling() and not transformed():
        # no square kept for backward, and twice differentiable (see _SumOfSquares)
        result: torch.Tensor = _SumOfSquares.apply(t)  # type: ignore[no-untyped-call]
        return result
    if not _eligible(t):  # the square fits in cache, and torch's sum is pairwise
        # 16-bit squares summed in float32, as the concatenation's sum accumulates (a 16-bit
        # partial would round before the combine)
        small: torch.Tensor = torch.square(t).sum(dtype=_partial_dtype(t.dtype) if t.is_floating_point() else None)
        return small
    return l2_norm(t).square()


def diff_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`((a - b) ** 2).sum()` in float64, twice differentiable, keeping no `a - b` for backward.

    The L2 norm of a bundle that requires grad is the square root of its tensors' sums of
    squares, not a norm of their norms: a tensor whose norm is 0 (a zero bias, a layer equal
    to the reference) would make the second derivative NaN (gradient penalties).

    Example:
        >>> import torch
        >>> float(diff_squares(torch.full((4,), 2.0), torch.ones(4)))
        4.0
    """
    if torch.compiler.is_compiling() or transformed():  # traced by the compiler / torch.func
        # (16-bit squares summed in 16 bits overflow from 65504: a zero gradient)
        traced: torch.Tensor = torch.square((a - b).to(_partial_dtype(a.dtype))).sum().to(torch.float64)
        return traced
    result: torch.Tensor = _DiffSquares.apply(a, b)  # type: ignore[no-untyped-call]
    return result


def diff_l2_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.dist(a, b)`: for long CPU tensors of one shape and dtype, without an `a - b`
    temporary (and accurate, by rows); without a gradient, no fresh `a - b` from
    `DIST_MAX_NUMEL` elements either (by rows past `BLOCK`).

    Example:
        >>> import torch
        >>> float(diff_l2_norm(torch.ones(1 << 22), torch.zeros(1 << 22)))
        2048.0
    """
    recorded = records(a, b)
    if by_rows(a.numel(), a.dtype, a.device) and _eligible(a, b) and not torch.compiler.is_compiling():
        if not recorded:
            return _diff_rows_norm(a, b)  # the autograd Function's call costs ~30 us
        result: torch.Tensor = _DiffL2Norm.apply(a, b)  # type: ignore[no-untyped-call]
        return result
    if a.dtype in _LOW_PRECISION and a.dtype == b.dtype and a.shape == b.shape:
        # A 16-bit norm would round before the combine: worse than the concatenation's in 23
        # of 300 draws (whose float32 accumulator rounds once, at the end).
        return wide_norm(a, 2, b)
    if a.numel() > DIST_MAX_NUMEL and a.dtype == b.dtype and a.shape == b.shape:
        # torch.dist's CPU kernel is slower than a difference and a norm from here (1 thread:
        # 10.7 against 8.3 ms on ResNet-50's long tensors).
        if not recorded and _in_scratch(a, b):
            # Formed in the kept block buffer: a fresh difference of a few MiB may cost its
            # page faults at every call, depending on the allocator's state (ResNet-50's
            # distance with allocations from 128 KiB mapped afresh: 25 -> 11 ms, the
            # per-tensor loop 49; as fast as before otherwise).
            if a.numel() > BLOCK:
                return _diff_rows_norm(a, b)
            _, _, whole = next(_scratch_blocks(a.reshape(-1), b.reshape(-1)))  # one block
            norm: torch.Tensor = torch.linalg.vector_norm(whole)
            return norm
        difference: torch.Tensor = torch.linalg.vector_norm(a - b)  # the difference is one tensor's
        return difference
    distance: torch.Tensor = torch.dist(a, b)
    return distance


def diff_p_norm(a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """`torch.dist(a, b, p)` for finite p other than 0 and 2. Without a gradient, for float32
    and float64 contiguous CPU tensors of one shape from `POWERS_MIN_NUMEL` elements, from the
    sum of `|a - b| ** p`, formed a block at a time in the kept block buffer (a fresh `a - b`
    of a few MiB may cost its page faults at every call) and added by rows in float64: on one
    CPU 2-9x faster than torch's (ResNet-50's tensors of 2.4M elements, p = 3: 4.1 against 35
    ms for four pairs), and about 1e-9 off where torch's float32 dist is 2e-5 to 4e-3 off.

    Example:
        >>> import torch
        >>> float(diff_p_norm(torch.full((1 << 20,), 0.5), torch.zeros(1 << 20), 1))
        524288.0
    """
    if (
        a.numel() >= POWERS_MIN_NUMEL and a.dtype == b.dtype and a.shape == b.shape and _in_scratch(a, b)
        and not records(a, b)
        and math.isfinite(p) and p not in (0, 2)
    ):
        return _power_sum_norm(a, b, p)
    distance: torch.Tensor = torch.dist(a, b, p)
    return distance


_RowsOut = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _row_views(block: torch.Tensor, rows: torch.Tensor) -> _RowsOut:
    # (block's full rows as (-1, ROW) or None, their places in rows, the tail or None, its place)
    full = block.numel() // ROW * ROW
    tail = block[full:] if full < block.numel() else None
    return (
        block[:full].view(-1, ROW) if full else None, rows[: full // ROW],
        tail, rows[full // ROW] if tail is not None else None,
    )


def _norms_into(views: _RowsOut) -> None:
    # A block's row norms into their places (see _row_views).
    full, rows, tail, tail_row = views
    if full is not None:
        torch.linalg.vector_norm(full, dim=1, out=rows)
    if tail is not None:
        torch.linalg.vector_norm(tail, dim=0, out=tail_row)


class _DistancePlan:
    """How the L2 distance between two bundles of one structure is read: every block of each
    long pair's difference formed in a block buffer of the plan's own, and every pack of
    small pairs (copied, then subtracted in place, each by one `_foreach` call), their rows'
    norms written into a rows buffer that is widened and reduced once. Worked out once per
    bundle and thread (each call writes the buffers): made per call, the blocks' slices,
    checks and rows cost ResNet-50's distance about a tenth of its time. Holds no tensor of
    the bundles, only where their elements go (so no old data after `p.data = ...`)."""

    def __init__(self, offsets: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.key = (offsets, dtype, device, ROW, BLOCK, DIST_PACK_NUMEL)
        numels = [stop - start for start, stop in zip(offsets, offsets[1:])]
        size = min(BLOCK, max(numels))
        self.block = kept_empty(size, dtype, device)
        least = min(DIST_PACK_NUMEL, size)  # a pack fits the block
        small = [i for i, n in enumerate(numels) if 0 < n <= least]
        packs: list[tuple[list[int], int]] = []  # (tensors, elements): at most the block's size
        for i in small:
            if packs and packs[-1][1] + numels[i] <= size:
                packs[-1] = (packs[-1][0] + [i], packs[-1][1] + numels[i])
            else:
                packs.append(([i], numels[i]))
        spans = [(i, start, min(start + size, n)) for i, n in enumerate(numels) if n > least
                 for start in range(0, n, size)]
        lengths = [stop - start for _, start, stop in spans] + [numel for _, numel in packs]
        counts = [-(-n // ROW) for n in lengths]
        first = list(itertools.accumulate(counts, initial=0))
        self.rows = kept_empty(first[-1], dtype, device)
        rows = [_row_views(self.block[:n], self.rows[r : r + k]) for n, r, k in zip(lengths, first, counts)]
        # Per block of a long pair: (tensor, start, stop, the block's buffer, its rows' places)
        self.spans = [(i, start, stop, self.block[: stop - start], r) for (i, start, stop), r in zip(spans, rows)]
        # Per pack: (its tensors, their places in the buffer shaped as the tensors (made at the
        # first call), its elements, its rows' places)
        self.packs: list[tuple[list[int], list[torch.Tensor] | None, int, _RowsOut]] = [
            (pack, None, numel, r) for (pack, numel), r in zip(packs, rows[len(spans):])
        ]

    def fits(self, offsets: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
        # A bundle's offsets, not its shapes' numels: those are fixed with it, and a call
        # would walk every shape to remake them.
        return self.key == (offsets, dtype, device, ROW, BLOCK, DIST_PACK_NUMEL)

    def distance(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """`‖cat(xs) - cat(ys)‖` in float64, or None where a long tensor is not contiguous."""
        sub = torch.sub
        last, fa, fb = -1, xs[0], ys[0]
        try:
            for i, start, stop, block, rows_out in self.spans:
                if i != last:
                    last, fa, fb = i, xs[i].view(-1), ys[i].view(-1)
                sub(fa[start:stop], fb[start:stop], out=block)
                _norms_into(rows_out)
        except RuntimeError:  # view(-1): a long tensor that is not contiguous
            return None
        for k, (pack, places, numel, rows_out) in enumerate(self.packs):
            a, b = [xs[i] for i in pack], [ys[i] for i in pack]
            if places is None:  # shaped as the tensors (of the sizes the bundle checked)
                places = _places(self.block[:numel], a)
                self.packs[k] = (pack, places, numel, rows_out)
            try:
                torch._foreach_copy_(places, a)
                torch._foreach_sub_(places, b)
            except RuntimeError:
                # A tensor reshaped since, to its own size (`p.data = p.data.view(...)`): flat,
                # and shaped afresh at the next call. (Of one size, a shape that broadcasts
                # to a place is the place's own, up to ones: the same order of elements.)
                a, b = [t.reshape(-1) for t in a], [t.reshape(-1) for t in b]
                flat = _places(self.block[:numel], a)
                torch._foreach_copy_(flat, a)
                torch._foreach_sub_(flat, b)
                self.packs[k] = (pack, None, numel, rows_out)
            _norms_into(rows_out)
        distance: torch.Tensor = torch.linalg.vector_norm(self.rows.to(torch.float64))
        return distance


def planned_distance(x: ParameterBundle, y: ParameterBundle) -> torch.Tensor | None:
    """`‖x - y‖` of two bundles of one structure, by a plan kept with x (see _DistancePlan),
    in x's dtype; None where not served: float32 or float64 bundles of their own tensors on
    the CPU, of one dtype, where autograd records nothing, outside torch.compile and
    torch.func, more than tiny (one call on the concatenations is faster there)."""
    from modtensor._dispatch import is_tiny

    dtype = x._dtype
    if not (
        dtype in _DTYPES and _uniform(x, dtype) and _uniform(y, dtype)
        and x._tensors is not None and y._tensors is not None
        and x._shapes == y._shapes and x._on_one_device and y._on_one_device
        and x._device.type == "cpu" and y._device == x._device and x._strategy == y._strategy == "concat"
        and x._dist is None and y._dist is None and not is_tiny(x) and x._numel
        and not records(x, y) and not torch.compiler.is_compiling() and not transformed()
    ):
        return None
    key = ("distance plan", threading.get_ident())
    plan = x._plans.get(key)
    if plan is None or not plan.fits(x._offsets, dtype, x._device):
        plan = x._plans[key] = _DistancePlan(x._offsets, dtype, x._device)
    with torch.no_grad():
        distance = plan.distance(x._tensors, y._tensors)
    return None if distance is None else _cast(distance, dtype)


def moments_served(t: torch.Tensor) -> bool:
    """Whether `moments` serves this tensor (alone or with others of its dtype and device).

    Example:
        >>> import torch
        >>> moments_served(torch.ones(1 << 13)), moments_served(torch.ones(1 << 13, requires_grad=True))
        (True, False)
    """
    # No autograd here (out= has none): a tensor that wants a gradient keeps torch's exact one.
    return (
        not torch.compiler.is_compiling()
        and t.numel() >= MOMENTS_MIN_NUMEL
        and t.device.type == "cpu"
        and (t.dtype in _DTYPES or t.dtype in _LOW_PRECISION)
        and t.is_contiguous()
        and not records(t)
        and not transformed()
    )


def narrow_sum(t: torch.Tensor, nan: bool = False) -> torch.Tensor | None:
    """`torch.sum(t, dtype=torch.float64)` (`nansum` if `nan`) of a float16 or bfloat16 CPU
    tensor of at least `NARROW_MIN_NUMEL` elements that needs no gradient, by blocks converted
    to float32 (no float32 copy of `t`), their rows' sums added in float64; None where not served.

    Example:
        >>> import torch
        >>> float(narrow_sum(torch.full((1 << 17,), 0.1, dtype=torch.half)))  # 131072 * 0.0999755859375
        13104.0
    """
    if not (t.dtype in _LOW_PRECISION and _by_blocks(t)):
        return None
    flat = t.reshape(-1)
    rows = torch.empty(-(-flat.numel() // ROW), dtype=torch.float32, device=flat.device)
    for start, stop, block in _blocks(flat, BLOCK):
        _rows_into(block, rows[start // ROW : -(-stop // ROW)], torch.nansum if nan else torch.sum)
    return rows.to(torch.float64).sum()


def wide_norm(t: torch.Tensor, p: float, other: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.linalg.vector_norm(t, p)` of a float16 or bfloat16 tensor (of `t - other` where
    given), in float32: a 16-bit partial would round before the combine. By blocks converted
    to float32 where `_eligible` and no gradient is recorded (no float32 copy of `t`, no
    `t - other`), finite orders other than 0 and 2 from sums of `|x| ** p` added in float64;
    otherwise torch's, whose float32 copy autograd keeps.

    Example:
        >>> import torch
        >>> float(wide_norm(torch.ones(1 << 17, dtype=torch.half), 1))
        131072.0
    """
    if not _by_blocks(t, *(() if other is None else (other,))):
        whole: torch.Tensor = torch.linalg.vector_norm(t if other is None else t - other, p, dtype=torch.float32)
        return whole
    flat = t.reshape(-1)
    if other is None:
        blocks: Iterator[torch.Tensor] = (block for _, _, block in _blocks(flat, BLOCK))
    else:
        pairs = zip(_blocks(flat, BLOCK), _blocks(other.reshape(-1), BLOCK, slot=1))
        blocks = (x.sub_(y) for (_, _, x), (_, _, y) in pairs)
    if flat.dtype in _LOW_PRECISION and math.isfinite(p) and p not in (0, 2):
        # The blocks are float32 copies, ours to write: |x| ** p in place and summed (see
        # _power_sum_norm; vector_norm of such p took 2-9x as long), the sums added in float64.
        sums = torch.stack([block.abs_().pow_(p).sum() for block in blocks])
        powers: torch.Tensor = sums.to(torch.float64).sum().pow(1 / p)
        return powers
    parts = [torch.linalg.vector_norm(block, p) for block in blocks]
    # the blocks' norms combine as elements do: p-th powers add (counts for p = 0)
    return torch.stack(parts).sum() if p == 0 else torch.linalg.vector_norm(torch.stack(parts), p)


def wide_logsumexp(t: torch.Tensor) -> torch.Tensor:
    """`torch.logsumexp(t.reshape(-1), 0)` of a float16 or bfloat16 tensor, in float32: a
    16-bit partial would round before the combine. By blocks converted to float32 where
    `_eligible` and no gradient is recorded (no float32 copy of `t`); otherwise on a float32
    copy.

    Example:
        >>> import torch
        >>> wide_logsumexp(torch.zeros(1 << 17, dtype=torch.half)).dtype
        torch.float32
    """
    flat = t.reshape(-1)
    if not _by_blocks(t):
        return torch.logsumexp(flat.to(torch.float32), 0)
    # (smaller blocks than BLOCK: torch's logsumexp makes a temporary of its input's size)
    parts = [torch.logsumexp(block, 0) for _, _, block in _blocks(flat, BLOCK // 4)]
    return torch.logsumexp(torch.stack(parts), 0)


_Partials = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a cosine's: a . b, a . a, b . b


class _NarrowCosine(torch.autograd.Function):
    # Only the 16-bit operands are kept for backward.
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> _Partials:
        ctx.save_for_backward(a, b)
        return _rows_cosine(a.detach().reshape(-1), b.detach().reshape(-1))

    @staticmethod
    def backward(
        ctx: Any, g_ab: torch.Tensor, g_aa: torch.Tensor, g_bb: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # differentiated itself (create_graph): torch's ops, in 16 bits
            # (g stays float64: torch's CPU product of a 16-bit tensor and a 0-d one rounds
            # once, where a 16-bit g, about 1 / (|a| |b|), is a subnormal for long tensors)
            return (
                (b * g_ab + a * (2 * g_aa)) if needs[0] else None,
                (a * g_ab + b * (2 * g_bb)) if needs[1] else None,
            )
        # Where a and b point alike a gradient's two terms nearly cancel: it is made in float32,
        # a block at a time, and rounded once (as on float32 copies), not each term and their sum.
        grads = [torch.empty_like(t) if need else None for t, need in zip((a, b), needs)]
        scales = ((2 * g_aa).float(), (2 * g_bb).float())
        pairs = zip(_blocks(a.reshape(-1), BLOCK), _blocks(b.reshape(-1), BLOCK, slot=1))
        for (start, stop, x), (_, _, y) in pairs:
            if grads[1] is not None:  # before x is overwritten
                buffer = _scratch(stop - start, torch.float32, x.device, slot=2)
                grads[1].view(-1)[start:stop].copy_(torch.mul(y, scales[1], out=buffer).addcmul_(x, g_ab))
            if grads[0] is not None:
                grads[0].view(-1)[start:stop].copy_(x.mul_(scales[0]).addcmul_(y, g_ab))
        return grads[0], grads[1]


def _rows_cosine(fa: torch.Tensor, fb: torch.Tensor) -> _Partials:
    # A product of two float16 numbers is exact in float32, of two bfloat16 ones too (but for
    # overflow, as in a float32 dot product): only the rows' sums and norms round.
    rows = torch.empty(3, -(-fa.numel() // ROW), dtype=torch.float32, device=fa.device)
    for (start, stop, x), (_, _, y) in zip(_blocks(fa, BLOCK), _blocks(fb, BLOCK, slot=1)):
        norms_a, norms_b, dots = rows[:, start // ROW : -(-stop // ROW)].unbind()
        _rows_into(x, norms_a)
        _rows_into(y, norms_b)
        _rows_into(x.mul_(y), dots, torch.sum)
    norms_a, norms_b, dots = rows.to(torch.float64).unbind()
    return dots.sum(), torch.dot(norms_a, norms_a), torch.dot(norms_b, norms_b)


def narrow_cosine(a: torch.Tensor, b: torch.Tensor) -> _Partials | None:
    """`(a * b).sum()`, `(a * a).sum()` and `(b * b).sum()` in float64, of two float16 or bfloat16
    CPU tensors of one shape and dtype and at least `NARROW_MIN_NUMEL` elements, in one pass by
    blocks converted to float32; None where not served.

    A 16-bit dot product overflows (0.6 * 0.6 over 200k elements passes 65504), and a float32
    one of the whole tensors makes a float32 copy of each, which autograd would keep for
    backward. Here no copy is made, and backward keeps `a` and `b` only (twice differentiable).

    Example:
        >>> import torch
        >>> x = torch.full((1 << 17,), 0.75, dtype=torch.half)
        >>> [float(s) for s in narrow_cosine(x, -x)]  # 131072 * 0.5625, inf in float16
        [-73728.0, 73728.0, 73728.0]
    """
    if not (a.dtype in _LOW_PRECISION and _eligible(a, b) and not torch.compiler.is_compiling()):
        return None
    if records(a, b):
        result: _Partials = _NarrowCosine.apply(a, b)  # type: ignore[no-untyped-call]
        return result
    return _rows_cosine(a.reshape(-1), b.reshape(-1))


class _NarrowDot(torch.autograd.Function):
    # Only the 16-bit operands are kept for backward, whose products are torch's (twice
    # differentiable): a 16-bit tensor times the 0-d float64 gradient rounds once on the CPU.
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _rows_dot(a.detach().reshape(-1), b.detach().reshape(-1))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        return (b * g if ctx.needs_input_grad[0] else None), (a * g if ctx.needs_input_grad[1] else None)


def _rows_dot(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    # (products of two 16-bit numbers are exact in float32; see _rows_cosine)
    rows = torch.empty(-(-fa.numel() // ROW), dtype=torch.float32, device=fa.device)
    for (start, stop, x), (_, _, y) in zip(_blocks(fa, BLOCK), _blocks(fb, BLOCK, slot=1)):
        _rows_into(x.mul_(y), rows[start // ROW : -(-stop // ROW)], torch.sum)
    return rows.to(torch.float64).sum()


def wide_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.dot(a, b)` of two float16 or bfloat16 tensors of one shape and dtype, unrounded
    (float32 or float64): a 16-bit partial would round before the combine, or overflow where
    the concatenation's float32 accumulator does not. Long CPU tensors go by blocks converted
    to float32 (no float32 copy; backward keeps `a` and `b` only), short ones on float32
    copies; elsewhere (a GPU, torch.compile) torch's 16-bit dot.

    Example:
        >>> import torch
        >>> x = torch.full((1 << 17,), 0.75, dtype=torch.half)
        >>> float(wide_dot(x, -x))  # 131072 * 0.5625, -inf in float16
        -73728.0
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.numel() < NARROW_MIN_NUMEL:
        return torch.dot(fa.float(), fb.float())
    if not (_eligible(a, b) and not torch.compiler.is_compiling()):
        return torch.dot(fa, fb)
    if records(a, b):
        result: torch.Tensor = _NarrowDot.apply(a, b)  # type: ignore[no-untyped-call]
        return result
    return _rows_dot(fa, fb)


def _numel(t: torch.Tensor | Sequence[torch.Tensor]) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else sum(x.numel() for x in t)


def moments_dtype(t: torch.Tensor | Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype `moments(t)` adds in: float64 below `MOMENTS_ROWS_NUMEL` elements, else `t`'s
    (float32 for float16 and bfloat16).

    Example:
        >>> import torch
        >>> moments_dtype(torch.ones(3)), moments_dtype(torch.ones(1 << 20, dtype=torch.half))
        (torch.float64, torch.float32)
    """
    dtype = t.dtype if isinstance(t, torch.Tensor) else t[0].dtype
    return torch.float64 if _numel(t) < MOMENTS_ROWS_NUMEL else _partial_dtype(dtype)


def _block_moments(block: torch.Tensor, rows: torch.Tensor) -> None:
    # The norms first: their pass computes more per element, which hides the reads from memory
    # better; the sums then read the block from the cache (10% faster than the other order).
    norms, sums = rows.unbind()
    _rows_into(block, norms)
    _rows_into(block, sums, torch.sum)


def _wide_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (sum, sum of squares) from rows' (norms, sums), in float64 (the copy freed on return)
    norms, sums = rows.to(torch.float64).unbind()
    return sums.sum(), torch.dot(norms, norms)


def _row_moments(flats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # Every tensor's rows go into one buffer, converted and added once: for each tensor apart,
    # the conversion, the two sums and their checks cost as much as the row kernels of 128Ki
    # elements (ResNet-50's var: 7.1 -> 6.2 ms with its 35 long tensors together, 1 thread).
    counts = [-(-flat.numel() // ROW) for flat in flats]
    rows = torch.empty(2, sum(counts), dtype=_partial_dtype(flats[0].dtype), device=flats[0].device)  # norms, sums
    first = 0
    for flat, count in zip(flats, counts):
        for start, stop, block in _blocks(flat, MOMENTS_BLOCK):
            _block_moments(block, rows[:, first + start // ROW : first + -(-stop // ROW)])
        first += count
    return _widened_moments(rows)


def _widened_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The rows are widened to float64 MOMENTS_WIDE_ROWS at a time: all at once, with the float32
    # rows, they took 1.2% of a float16 model's memory.
    wide = MOMENTS_WIDE_ROWS
    parts = [_wide_moments(rows[:, start : start + wide]) for start in range(0, rows.shape[1], wide)]
    if len(parts) == 1:
        return parts[0]
    s1, s2 = (torch.stack(column).sum() for column in zip(*parts))
    return s1, s2


_RowPlaces = tuple[torch.Tensor, torch.Tensor]  # where some rows' norms and sums go


class _RowsPlan:
    """Where the row kernels put the rows of each block of some float32 or float64 tensors'
    moments: views of a rows buffer of its own, worked out once for the tensors' sizes.
    Slicing the rows at each call cost ResNet-50's var about 1 ms of 13 (1 thread). The
    tensors themselves are viewed afresh at each call: views kept here would keep their old
    data alive after `p.data = ...` or `model.to(...)`. Each call writes the buffer, so a
    plan serves one thread (`moments` keeps one per thread)."""

    def __init__(self, numels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.key = (numels, dtype, device, ROW, MOMENTS_BLOCK)
        counts = [-(-n // ROW) for n in numels]
        self.rows = kept_empty((2, sum(counts)), dtype, device)
        norms, sums = self.rows.unbind()
        per_block = MOMENTS_BLOCK // ROW
        # Per tensor: its elements in full rows, the rows where its blocks after the first
        # start (for one torch.tensor_split), the places of each block's rows, the tail row's.
        self.places: list[tuple[int, list[int], list[_RowPlaces], _RowPlaces | None]] = []
        first = 0
        for n, count in zip(numels, counts):
            full = n // ROW
            blocks = []
            for start in range(0, full, per_block):
                at = slice(first + start, first + min(start + per_block, full))
                blocks.append((norms[at], sums[at]))
            tail = (norms[first + full], sums[first + full]) if full < count else None
            self.places.append((full * ROW, list(range(per_block, full, per_block)), blocks, tail))
            first += count

    def fits(self, numels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
        return self.key == (numels, dtype, device, ROW, MOMENTS_BLOCK)

    def moments(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        norm, add = torch.linalg.vector_norm, torch.sum
        for t, (full, starts, blocks, tail) in zip(tensors, self.places):
            flat = t.view(-1)  # contiguous: served
            if blocks:
                rows = (flat if tail is None else flat[:full]).view(-1, ROW)
                for block, (norms, sums) in zip(torch.tensor_split(rows, starts) if starts else (rows,), blocks):
                    norm(block, dim=1, out=norms)  # the norms first, as in _block_moments
                    add(block, 1, out=sums)
            if tail is not None:
                norm(flat[full:], dim=0, out=tail[0])
                add(flat[full:], 0, out=tail[1])
        return _widened_moments(self.rows)


def moments(
    t: torch.Tensor | Sequence[torch.Tensor], plans: dict[Any, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(x.sum(), (x ** 2).sum())` as float64 0-d tensors, in one pass, where x is the tensor
    `t` or the concatenation of the tensors `t` (of one dtype and device); None where not served.

    Served: float16, bfloat16, float32 and float64 contiguous CPU tensors of at least
    `MOMENTS_MIN_NUMEL` elements that need no gradient, while torch.compile is not tracing.
    Their elements are added in float64 below `MOMENTS_ROWS_NUMEL` (in all), else in rows of
    `ROW` in their own dtype (float32 for 16-bit ones), the rows' sums and norms then in
    float64: a relative error of about 1e-8 in float32 at the smallest sizes, 1e-9 from 4Mi
    elements. `plans`, where given, keeps where the rows of tensors of these sizes go (and a
    buffer for them, 0.2% of the tensors' memory), for the next call on them in this thread
    (such as a bundle's own tensors, whose plans live as long as the bundle).

    Example:
        >>> import torch
        >>> s1, s2 = moments(torch.full((1 << 20,), 0.5))
        >>> float(s1), float(s2), s1.dtype
        (524288.0, 262144.0, torch.float64)
        >>> [float(s) for s in moments([torch.ones(1 << 17), torch.full((1 << 17,), 2.0)])]
        [393216.0, 655360.0]
        >>> moments(torch.ones(1 << 20, requires_grad=True)) is None  # torch's var keeps the gradient
        True
    """
    tensors = [t] if isinstance(t, torch.Tensor) else list(t)
    first = tensors[0]
    if not all(
        moments_served(x) and x.dtype == first.dtype and x.device == first.device for x in tensors
    ):
        return None
    if plans is not None and first.dtype in _DTYPES and _numel(tensors) >= MOMENTS_ROWS_NUMEL:
        numels = tuple(x.numel() for x in tensors)
        key = ("rows plan", threading.get_ident())
        plan = plans.get(key)
        if plan is None or not plan.fits(numels, first.dtype, first.device):
            plan = plans[key] = _RowsPlan(numels, first.dtype, first.device)
        return plan.moments(tensors)
    flats = [x.reshape(-1) for x in tensors]
    if _numel(flats) >= MOMENTS_ROWS_NUMEL:
        return _row_moments(flats)
    # float32 squares are exact in float64, their sums round at 2**-53
    wide = (flats[0] if len(flats) == 1 else torch.cat(flats)).to(torch.float64)
    return wide.sum(), torch.dot(wide, wide)


# -- fused chains ------------------------------------------------------------------------------

_T = torch.Tensor
_SUMS = frozenset({torch.sum, _T.sum})
_NORMS = frozenset({torch.norm, _T.norm, torch.linalg.vector_norm, torch.linalg.norm})
_SQUARES = frozenset({torch.pow, _T.pow, _T.__pow__, torch.square, _T.square})
_DIFFERENCES = frozenset({torch.sub, _T.sub, _T.__sub__, torch.subtract, _T.subtract})


def _uniform(x: Any, dtype: torch.dtype) -> bool:
    from modtensor._bundle import is_bundle

    return is_bundle(x) and (dtype in _DTYPES or dtype in _LOW_PRECISION) and all(d == dtype for d in x._dtypes)


def fuse(func: Callable[..., Any], parsed: ReduceArgs, b: ParameterBundle) -> Any:
    """`(x ** 2).sum()` and `(x - y).norm()` of an on-demand `b`, by the kernels above.

    `parsed` are the call's arguments. NOT_HANDLED where `b` is not such a chain, or the
    call asks for more than the plain full reduction (keepdim, another dtype or order).
    """
    from modtensor._bundle import is_bundle

    expr = b._expr
    if expr is None or b._strategy != "concat" or parsed.keepdim or parsed.dtype != b._dtype:
        return NOT_HANDLED
    op, op_args, op_kwargs, guard = expr
    if func in _SUMS and op in _SQUARES and not op_kwargs:
        x, exponent = op_args if len(op_args) == 2 else (op_args[0], 2)
        if not (type(exponent) in (int, float) and exponent == 2):
            return NOT_HANDLED
        if is_bundle(x):  # one launch, on a GPU
            fused = _multitensor.sum_of_squares(x, b._lazy_requires_grad, guard.check)
            if fused is not None:
                return fused
        if not _uniform(x, b._dtype):
            return NOT_HANDLED
        ranges = None if x._tensors is not None else lambda i, start, stop: _flat_ranges((x,), i, start, stop)
        squares = _per_segment(b, guard, sum_of_squares, lambda i: (x._tensor(i),), ranges, _plans_of(x, b))
        if not squares:
            return NOT_HANDLED
        return _cast(_stack(squares, torch.float64).sum(), b._dtype)
    if func in _NORMS and parsed.options.get("p") == 2 and op in _DIFFERENCES and not op_kwargs and len(op_args) == 2:
        x, y = op_args
        if is_bundle(x) and is_bundle(y) and not b._lazy_requires_grad:  # one launch, on a GPU
            fused = _multitensor.distance(x, y, guard.check)
            if fused is not None:
                return fused
        if not (_uniform(x, b._dtype) and _uniform(y, b._dtype)):
            return NOT_HANDLED
        twice = bool(parsed.options.get("squares"))  # twice differentiable (see diff_squares)
        kernel = diff_squares if twice else diff_l2_norm
        # An operand computed on demand is read by chunks, as the sum of squares' base is.
        on_demand = x._tensors is None or y._tensors is None
        if not (twice or on_demand or b._lazy_requires_grad):
            guard.check()
            planned = planned_distance(x, y)
            if planned is not None:
                return planned
        ranges = (lambda i, start, stop: _flat_ranges((x, y), i, start, stop)) if on_demand else None
        norms = _per_segment(b, guard, kernel, lambda i: (x._tensor(i), y._tensor(i)), ranges, _plans_of(x, b))
        if not norms:
            return NOT_HANDLED
        stacked = _stack(norms, torch.float64)
        return _cast(sqrt0(stacked.sum()) if twice else torch.linalg.vector_norm(stacked), b._dtype)
    return NOT_HANDLED


def _plans_of(x: ParameterBundle, b: ParameterBundle) -> dict[Any, Any] | None:
    # x keeps b's packing plans where b has x's offsets and keys (an on-demand b is new at
    # each call; working its plan out again cost 0.2 ms on ResNet-50): a plan is lists of
    # indices, a function of those alone (see Pieces._plan).
    return x._plans.setdefault("chains' plans", {}) if x._offsets is b._offsets and x._keys is b._keys else None


def _flat_ranges(xs: tuple[ParameterBundle, ...], i: int, start: int, stop: int) -> tuple[torch.Tensor, ...] | None:
    # Elements [start, stop) of each x's tensor i, or None where one cannot make them alone.
    chunks = tuple(x._flat_range(i, start, stop) for x in xs)
    return None if any(c is None for c in chunks) else chunks  # type: ignore[return-value]


def _per_segment(
    b: ParameterBundle,
    guard: Any,  # a _pointwise._Guard
    kernel: Callable[..., torch.Tensor],
    operands: Callable[[int], tuple[torch.Tensor, ...]],
    ranges: Callable[[int, int, int], tuple[torch.Tensor, ...] | None] | None = None,
    plans: dict[Any, Any] | None = None,
) -> list[torch.Tensor]:
    """`kernel(*operands(i))` for each non-empty tensor i of the on-demand `b`, under its guard.

    Where no gradient is recorded, small tensors are packed together as in the concat
    strategy (see `Pieces.map_segments`; both kernels are commutative): one call for many.
    `ranges(i, start, stop)`, where given, is the operands' elements [start, stop) flat (or
    None): an operand computed on demand is then read a chunk at a time, as `run_reduction`
    reads chains, rather than made whole with its intermediates.
    `plans`, where given, keeps the packing plan (of an operand with b's offsets and keys).
    """
    # Nothing but these kernels runs until they are done: one check of every input stands for
    # a check before each tensor (ResNet-50's: 16 us, against 160 for one per tensor).
    guard.check()
    run = guard.run
    if b._lazy_requires_grad or torch.compiler.is_compiling():
        return [run(kernel, *operands(i)) for i in range(len(b._names)) if b._shapes[i].numel()]
    # Without ranges the operands are the bundles' own tensors: read, not computed, they need
    # none of the guard's modes (through them, ResNet-50's 161 pairs took 73 us, else 25).
    get = operands if ranges is None else lambda i: run(operands, i)

    def chunks(i: int) -> Any:
        from modtensor._selection import chunk_size, chunks_of

        assert ranges is not None
        read = lambda start, stop: run(ranges, i, start, stop)  # noqa: E731
        return chunks_of(b._shapes[i].numel(), chunk_size(b._devices[i]), read)

    pieces = Pieces(get, b._offsets, b._keys, plans=plans, chunks=None if ranges is None else chunks)
    with torch.no_grad():  # the guard's grad mode recorded nothing either
        return pieces.map_segments(lambda operands, offset: kernel(*operands))

"""Reductions over the whole bundle, each a monoid: per-tensor partial, combine, finalize.

Reductions accept a full reduction or `dim` 0 / -1 (the bundle is one-dimensional), with
`keepdim`. Partials are combined in float64 (complex128) where the result is floating, so
the combine adds no rounding of its own. Here: the sums, var and std, all / any, logsumexp,
the norms, and the table of every reduction (the extrema's parts are in `_extrema.py`).
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from modtensor._bundle import ParameterBundle
from modtensor._dispatch import NOT_HANDLED, func_name
from modtensor._extend import register_reduction
from modtensor import _kernels, _multitensor
from modtensor._extrema import (
    _arg_extremum_parts,
    _combine_aminmax,
    _extremum,
    _extremum_parts,
    _fin_index,
    _fin_values_indices,
    _kept,
    _parse_amax,
    _parse_aminmax,
    _parse_argmax,
    _parse_max_dim,
    _partial_aminmax,
    _partials_amax,
    max_handler,
    records,
)
from modtensor._kernels import l2_norm, moments, moments_dtype, moments_served, narrow_sum, power_sum, rows_numel, sum_of_squares
from modtensor._reduce_common import (
    _LOW_PRECISION,
    _acc_dtype,
    _bind,
    _cast,
    _is_floating,
    _partial_dtype,
    _real,
    _require_floating,
    _stack,
    _sum_dtype,
    check_dim,
    check_dtype,
    dim_ints,
    kept_empty,
    quiet_count,
    root_of_sum,
    takes_powers,
    transformed,
)
from modtensor._strategies import Reduction, ReduceArgs, ReductionCall, TensorGroup

__all__ = ["REDUCTIONS", "REDUCTION_FUNCTIONS", "UNSUPPORTED"]

# Known gaps, by OpInfo name: these fall back to the concatenation (with a warning).
UNSUPPORTED = {
    "masked.*": "torch.masked reductions take a mask shaped like the input",
    "hash_tensor": "a hash of the concatenation's bytes has no per-tensor partial",
}

_T = torch.Tensor


# -- sum, nansum, mean, nanmean, prod ---------------------------------------------------------


def _sig_sum(input: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Any:
    return dim, keepdim, dtype


def _parse_sum_like(
    b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], mean: bool
) -> ReduceArgs:
    name = func_name(func)
    dim, keepdim, dtype = _bind(_sig_sum, name, args, kwargs)
    check_dtype(dtype, name, b)
    dim_ints(dim, name)
    if mean:
        if dtype is not None and not _is_floating(dtype):
            raise RuntimeError(
                f"{name}: dtype={dtype} cannot hold a mean: it must be a floating point or complex "
                f"dtype (torch raises the same on the concatenation of {b.describe()}). Pass e.g. "
                "dtype=torch.float64, or leave it out."
            )
        if func in REDUCTION_FUNCTIONS["nanmean"]:  # torch.mean takes integers given dtype=; nanmean does not
            _require_floating(b._dtype, name, b, "the mean", dtype_helps=False)
        elif dtype is None:
            _require_floating(b._dtype, name, b, "the mean")
    check_dim(dim, name, b)  # after the dtypes, as torch checks them
    return ReduceArgs(name, _sum_dtype(b._dtype, dtype), b._numel, bool(keepdim))


def _parse_sum(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _parse_sum_like(b, func, args, kwargs, mean=False)


def _parse_mean(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _parse_sum_like(b, func, args, kwargs, mean=True)


def _narrowed(t: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
    # torch's sum, nansum and nanmean with dtype=float16 (or bfloat16) convert each element
    # first: in float16 a float32 element past 65504 is inf. Their partials are then added in
    # float32 (see _partial_dtype), which would otherwise see the unrounded elements. (torch's
    # mean converts only its result.)
    return t.to(a.dtype) if a.dtype in _LOW_PRECISION and t.dtype != a.dtype else t


def _make_sum(
    reducer: Callable[..., torch.Tensor], converts: bool = True
) -> Callable[[torch.Tensor, int, ReduceArgs], Any]:
    def partial(t: torch.Tensor, offset: int, a: ReduceArgs) -> torch.Tensor:
        if converts:
            t = _narrowed(t, a)
        if t.dtype == a.dtype and t.dtype in _LOW_PRECISION:  # by blocks: no float32 copy
            by_blocks = narrow_sum(t, nan=reducer is torch.nansum)
            if by_blocks is not None:
                return by_blocks
        dtype = _partial_dtype(a.dtype)
        if t.dtype == torch.float64 and dtype.is_floating_point:  # a widened pack: keep it exact
            dtype = t.dtype
        return reducer(_complex_input(t, dtype) if dtype.is_complex else t, dtype=dtype)

    return partial


def _make_partials_sum(partial: Callable[[torch.Tensor, int, ReduceArgs], Any]) -> Callable[..., list[Any]]:
    def partials(tensors: list[torch.Tensor], a: ReduceArgs) -> list[Any]:
        # A bundle's own float32 or float64 tensors too long to be packed, summed in their
        # dtype (as `partial` does) into a row kept with them, one per thread (each call writes
        # it), then added in float64: one state for them all. A new 0-d sum per tensor, then
        # their stack and its conversion, cost ResNet-50's sum about 0.2 ms of 8 (1 thread, 49
        # tensors).
        dtype = tensors[0].dtype
        if not (isinstance(tensors, TensorGroup) and dtype == a.dtype and dtype in _kernels._DTYPES):
            return [partial(t, 0, a) for t in tensors]
        key = ("sums", threading.get_ident())
        kept = tensors.derived.get(key)
        if kept is None:
            row = kept_empty(len(tensors), dtype, tensors[0].device)
            kept = tensors.derived[key] = (row, row.unbind())
        row, places = kept
        for t, place in zip(tensors, places):
            torch.sum(t, None, out=place)
        return [row.sum(dtype=torch.float64)]

    return partials


def _wide_pack(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # Small float32 tensors packed together are added in float64 (see Reduction.pack_dtype):
    # their float32 sums' roundings were most of the error of ResNet-50's and GPT-2's sums.
    # Converting costs about 20 us a 55Ki-element pack: about 1.3% of ResNet-50's sum (3 packs
    # and the combine), 0.2% of GPT-2's.
    if dtype == torch.float32 and device.type != "mps":  # MPS has no float64
        return torch.float64
    return dtype


def _combine_sum(states: list[torch.Tensor], a: ReduceArgs) -> torch.Tensor:
    dtype = _acc_dtype(a.dtype)
    wide = [s for s in states if s.dtype == dtype]
    if not wide or len(wide) == len(states):
        return _stack(states, dtype).sum()
    # Widened packs give float64 states among float32 ones. A stack of mixed dtypes is slow (50
    # float32 states and 3 float64: 88 us); stacked apart, they take 10 us more than 53 of one.
    parts = [_stack([s for s in states if s.dtype != dtype], dtype), _stack(wide, dtype)]
    try:
        return torch.cat(parts).sum()
    except RuntimeError:  # on several devices
        return _stack([part.sum() for part in parts], dtype).sum()


def _finalize_sum(state: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
    return _cast(state, a.dtype)


def _finalize_mean(state: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
    # torch's mean divides its sum, taken in its accumulator's dtype (float32 for float16):
    # a float32 mean of values whose sum passes 3.4e38 is inf, in any order of addition.
    # Only then is the sum rounded first: the mean is otherwise the exact one, rounded once.
    total = _cast(state, _partial_dtype(a.dtype))
    return _cast(torch.where(total.isinf(), total, state) / a.numel, a.dtype)


def _partial_nanmean(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
    t = _narrowed(t, a)
    by_blocks = narrow_sum(t, nan=True) if t.dtype == a.dtype else None
    total = torch.nansum(t, dtype=_partial_dtype(a.dtype)) if by_blocks is None else by_blocks
    return total, t.numel() - _count_nan(t)


def _count_nan(t: torch.Tensor) -> torch.Tensor:
    # By blocks: `t.isnan().sum()` made a bool copy of t and an int64 one of that (2.25x a
    # float32 tensor); `count_nonzero` counts without the int64 one.
    if t.numel() <= _kernels.BLOCK or not t.is_contiguous():
        return torch.count_nonzero(torch.isnan(t))
    counts = [torch.count_nonzero(torch.isnan(block)) for block in torch.split(t.reshape(-1), _kernels.BLOCK)]
    return torch.stack(counts).sum()


def _combine_nanmean(states: list[Any], a: ReduceArgs) -> Any:
    sums = _stack([s for s, _ in states], _acc_dtype(a.dtype)).sum()
    counts = _stack([c for _, c in states], torch.int64).sum()
    return sums, counts


def _finalize_nanmean(state: Any, a: ReduceArgs) -> torch.Tensor:
    total, count = state
    # torch's nanmean is nansum(x) / count: the sum rounds to the dtype first (a float16 sum
    # past 65504 is inf), unlike mean's
    return _cast(_cast(total, a.dtype) / count, a.dtype)


def _partial_prod(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
    product = torch.prod(_complex_input(t, a.dtype), dtype=a.dtype)
    if not a.dtype.is_floating_point:
        return product, None, None
    # Whether t holds an exact 0 or an exact infinity (see _combine_prod): counted, not
    # compared, so that no boolean copy of t is made.
    low, high = torch.aminmax(t.detach())
    state = (product, torch.count_nonzero(t.detach()) < t.numel(), (high == math.inf) | (low == -math.inf))
    # The tensor is kept for _Prod's gradient, as torch's prod keeps its input anyway.
    return (*state, t) if a.options.get("keeps") and t.requires_grad else state


def _complex_input(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # torch has no backward for a real tensor reduced with a complex dtype=; the concatenation
    # converts it first (torch.cat promotes), which has one.
    if dtype.is_complex and not t.dtype.is_complex and t.requires_grad and torch.is_grad_enabled():
        return t.to(dtype)
    return t


def _combine_prod(states: list[Any], a: ReduceArgs) -> Any:
    # A state is (product, holds a zero, holds an inf, the tensor kept for the gradient if any).
    products = _stack([s[0] for s in states], _acc_dtype(a.dtype))
    if not a.dtype.is_floating_point:
        return products.prod(), None, None
    zeros, infs = _stack([s[1] for s in states], torch.bool), _stack([s[2] for s in states], torch.bool)
    tensors = [t for s in states for t in s[3:]]
    if tensors and torch.is_grad_enabled():
        product = _Prod.apply(products, zeros, infs, a.dtype, *tensors)  # type: ignore[no-untyped-call]
    else:
        product = _ordered_prod(products, zeros, infs)
    return product, zeros.any(), infs.any()


def _ordered_prod(products: torch.Tensor, zeros: torch.Tensor, infs: torch.Tensor) -> torch.Tensor:
    # torch multiplies in the concatenation's own dtype, element after element (float16 in
    # float16), so once its running product has overflowed to inf or underflowed to 0 it stays
    # there, unless a later element is an exact 0 or inf (then NaN). A tensor's partial that
    # overflowed times a later one that underflowed is NaN (inf * 0): the first partial to reach
    # 0 or inf decides, as in the concatenation.
    zero, inf = products == 0, products.isinf()
    regrouped = zero.any() & inf.any() & ~products.isnan().any()
    # (selected by masks, not by indexing with a tensor, which would wait for the device)
    first = (zero | inf).to(torch.uint8).argmax()
    positions = torch.arange(len(products), device=products.device)
    at_first, later = positions == first, positions > first
    killed = torch.where((zero & at_first).any(), (infs & later).any(), (zeros & later).any())
    negative = torch.signbit(products).sum() % 2 == 1
    magnitude = torch.where(at_first, products.detach().abs(), 0).sum()
    saturated = magnitude * torch.where(negative, -1.0, 1.0).to(products.dtype)
    ordered = torch.where(killed, torch.full_like(saturated, math.nan), saturated)
    return torch.where(regrouped, ordered, products.prod())


class _Prod(torch.autograd.Function):
    """The product of the tensors' products, with torch's gradient on the concatenation.

    Without a zero element that is `g * result / x` for each element x, in the concatenation's
    dtype. Through the tensors' products it would be `g * (result / product) * (product / x)`:
    NaN (inf / inf) for every element of a tensor whose own product overflowed, where torch's
    is inf (likewise 0 / 0 for one that underflowed). With a zero element torch multiplies
    the other elements instead: each tensor's product gets the product of the others', and
    its own backward does the rest. Twice differentiable: the backward is torch's ops on the
    inputs and the (saved) result.
    """

    @staticmethod
    def forward(
        ctx: Any, products: torch.Tensor, zeros: torch.Tensor, infs: torch.Tensor, dtype: torch.dtype,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        result = _ordered_prod(products, zeros, infs)
        ctx.dtype = dtype
        ctx.save_for_backward(result, products, zeros, *tensors)
        return result

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        result, products, zeros, *tensors = ctx.saved_tensors
        if bool(zeros.any()):  # (waits for the device, once per backward)
            ones = products.new_ones(1)
            before = torch.cat([ones, products[:-1]]).cumprod(0)
            after = torch.cat([products[1:], ones]).flip(0).cumprod(0).flip(0)
            return g * before * after, None, None, None, *(None for _ in tensors)
        # (each tensor's on its own device: a bundle may span several)
        return None, None, None, None, *(
            (g.to(t.device, ctx.dtype) * (result.to(t.device, ctx.dtype) / t.to(ctx.dtype))).to(t.dtype)
            for t in tensors
        )


def _finalize_prod(state: Any, a: ReduceArgs) -> torch.Tensor:
    return _cast(state[0], a.dtype)


def _sig_prod(input: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Any:
    return dim, keepdim, dtype


def _parse_prod(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, keepdim, dtype = _bind(_sig_prod, name, args, kwargs)
    if dim is not None and not isinstance(dim, int):
        raise TypeError(f"{name}: dim must be an int (torch.prod takes no tuple of dims), got {dim!r}.")
    check_dim(dim, name, b)
    dtype = _sum_dtype(b._dtype, dtype)
    # (not under torch.compile or torch.func, whose transforms follow torch's own ops)
    keeps = dtype.is_floating_point and records(b) and not torch.compiler.is_compiling() and not transformed()
    return ReduceArgs(name, dtype, b._numel, bool(keepdim), {"keeps": keeps})


# -- var, std, var_mean, std_mean (Chan et al.'s parallel merge) --------------------------------


def _sig_var(
    input: Any, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *, correction: Any = None
) -> Any:
    return dim, unbiased, keepdim, correction


def _parse_var(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, unbiased, keepdim, correction = _bind(_sig_var, name, args, kwargs)
    if isinstance(dim, bool):  # the legacy overload var(input, unbiased)
        dim, unbiased = None, dim
    dim_ints(dim, name)
    if unbiased is not None and correction is not None:
        raise RuntimeError(f"{name}: cannot specify both unbiased and correction.")
    if correction is None:
        correction = 0 if unbiased is False else 1
    _require_floating(b._dtype, name, b, "var and std", dtype_helps=False)
    check_dim(dim, name, b)  # after the dtype, as torch checks it
    # Without degrees of freedom the gradient depends on each element (see _NoDof): the
    # tensors are kept for it, as torch's own var keeps its input.
    keeps = (
        b._numel - correction <= 0 and not b._dtype.is_complex and records(b)
        and not torch.compiler.is_compiling() and not transformed()
    )
    return ReduceArgs(name, b._dtype, b._numel, bool(keepdim), {"correction": correction, "keeps": keeps})


# Raw moments lose digits to cancellation: M2 = S2 - S1 * mean carries a relative error of
# about delta * (1 + n * mean**2 / M2), delta being the moments' own. They are used while
# n * mean**2 <= K * M2, so that M2 stays within the result's own rounding (6e-8 in float32)
# and as accurate as torch's var:
# - moments added in the tensor's own dtype (float32 rows, float64): K = 1. Float32 rows have
#   delta up to 2.5e-8 at their smallest (128 rows; under 1e-8 from 1Mi elements, measured), so
#   M2 stays within 5e-8; float64 has delta 1e-16..2e-15, torch's float64 var 4e-15..3e-14.
# - float32 added in float64 (short tensors): delta ~1e-15, its squares being exact, so
#   K = 2**16 keeps M2 within about 1e-10, and lets norm-layer scales through (mean 1, std 0.1:
#   n * mean**2 / M2 = 100).
# - float16 and bfloat16 in float32 rows: K = 2**12 keeps M2 within about 1e-4, under a
#   float16 step (4.9e-4).
_CANCELLATION_SAME = 1.0
_CANCELLATION_WIDER = float(2**16)
_CANCELLATION_NARROW = float(2**12)
# Squares under finfo.tiny lose digits (at most tiny * eps each): a variance over tiny / eps
# (1e-31 in float32) keeps that loss under eps**2 of M2.
_SMALLEST_VAR = {t: torch.finfo(t).tiny / torch.finfo(t).eps for t in (torch.float32, torch.float64)}


def _var_by_moments(
    x: torch.Tensor | list[torch.Tensor], plans: dict[Any, Any] | None = None
) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """`(n, var(correction=0), mean)` of x (or of the concatenation of the tensors x) from its
    raw moments, or None where inaccurate. `plans`: see `moments`."""
    found = moments(x, plans)
    if found is None:
        return None
    s1, s2 = float(found[0]), float(found[1])  # floats: a 0-d tensor op costs more than the math
    tensors = [x] if isinstance(x, torch.Tensor) else x
    n = sum(t.numel() for t in tensors)
    mean = s1 / n
    m2 = s2 - s1 * mean
    dtype = moments_dtype(x)
    if dtype == tensors[0].dtype:
        k = _CANCELLATION_SAME
    else:
        k = _CANCELLATION_NARROW if dtype == torch.float32 else _CANCELLATION_WIDER
    accurate = (
        math.isfinite(s1) and math.isfinite(s2)  # else NaN, inf or an overflow: torch's var says
        and m2 > n * _SMALLEST_VAR[dtype]
        and n * mean * mean <= k * m2
    )
    if not accurate:
        return None
    # scalar_tensor: half the time of torch.tensor
    return n, torch.scalar_tensor(m2 / n, dtype=torch.float64), torch.scalar_tensor(mean, dtype=torch.float64)


def _short_in_float64(x: torch.Tensor) -> torch.Tensor:
    # torch's CPU reductions of float32 (var, logsumexp) accumulate in float64 and round once:
    # a short tensor's float32 partial would round before the combine. Its copy is small.
    if x.dtype == torch.float32 and x.numel() < _kernels.MOMENTS_MIN_NUMEL and x.device.type == "cpu":
        return x.to(torch.float64)
    return x


def _partial_var(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
    state = _moments_of(t, a)
    if a.options.get("keeps") and t.requires_grad:
        return (*state, t)
    return state


def _partials_var(tensors: list[torch.Tensor], a: ReduceArgs) -> list[Any]:
    # A bundle's own tensors of one dtype and device, too long to be packed, no gradient
    # recorded: the moments of all those the moments serve together (one state: their
    # concatenation's), by rows where they hold MOMENTS_ROWS_NUMEL elements in all. A tensor
    # too short for rows alone then needs no float64 copy (ResNet-50's 11 tensors of 16Ki to
    # 128Ki elements, a bundle of them alone: 1.04 -> 0.74 ms, 1 thread). The raw moments'
    # accuracy rule then holds of that concatenation, as of any segment; where it fails, each
    # tensor is checked alone (its moments taken again: a rare case).
    served = [t.dtype == a.dtype and moments_served(t) for t in tensors]
    together = [t for t, y in zip(tensors, served) if y]
    enough = len(together) > 1 and sum(t.numel() for t in together) >= _kernels.MOMENTS_ROWS_NUMEL
    plans = tensors.derived if isinstance(tensors, TensorGroup) else None
    state = _var_by_moments(together, plans) if enough and not a.options.get("keeps") else None
    if state is None:
        return [_partial_var(t, 0, a) for t in tensors]
    return [state, *(_partial_var(t, 0, a) for t, y in zip(tensors, served) if not y)]


def _moments_of(t: torch.Tensor, a: ReduceArgs) -> tuple[int, torch.Tensor, torch.Tensor]:
    # float16 and bfloat16 go to the moments as they are (read by blocks: no float32 copy)
    narrow = t.dtype == a.dtype and a.dtype in _LOW_PRECISION
    x = t if narrow else _cast(t, _partial_dtype(a.dtype))
    if narrow or a.dtype in (torch.float32, torch.float64):  # complex: torch's var
        fast = _var_by_moments(x)
        if fast is not None:
            return fast
    # (a float32 partial was worse than the concatenation's in 3-4 of 20 draws)
    x = _short_in_float64(_cast(x, _partial_dtype(a.dtype)))
    # Two calls, not torch.var_mean: on the CPU its fused kernel is about 5x slower than var's.
    var, mean = x.var(correction=0), x.mean()
    eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling() and not transformed()  # (.item())
    if x.dtype == torch.float32 and eager_cpu and not math.isfinite(var.item() + mean.item()):
        # torch's CPU var and std of float32 accumulate in float64: the concatenation's std of
        # values near 2e19 is finite where one tensor's float32 var (past 3.4e38) is inf, and
        # its mean finite where one tensor's float32 sum overflows. Its std_mean keeps both
        # in range (at the cost of one more rounding of the var, in this rare case). (.item():
        # 0.5 us, a tenth of a tensor op on these 0-d tensors.)
        std, wide_mean = torch.std_mean(x, correction=0)
        if math.isfinite(std.item() + wide_mean.item()):
            var, mean = std.to(torch.float64).square(), wide_mean
    return t.numel(), var, mean


def _combine_var(states: list[Any], a: ReduceArgs) -> Any:
    acc = _acc_dtype(a.dtype)
    variances = _stack([s[1] for s in states], _real(acc))
    counts = torch.tensor([s[0] for s in states], dtype=_real(acc), device=variances.device)
    means = _stack([s[2] for s in states], acc)
    total = counts.sum()
    mean = _weighted_mean(counts, total, means)
    m2 = (counts * variances).sum() + (counts * _deviations(means, mean).abs().square()).sum()
    # (then the tensors kept for the gradient without degrees of freedom, if any)
    return (total, m2, mean, *(t for s in states for t in s[3:]))


def _weighted_mean(counts: torch.Tensor, total: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    # Weights first: `counts * means` overflows for float64 means near the largest float (a
    # tensor of 1e308s), where torch's mean, updated element by element, does not.
    return ((counts / total) * means).sum()


def _finite_or_constant(mean: torch.Tensor) -> torch.Tensor:
    # M2's gradient through the overall mean is 0 for a finite mean (the counts' weighted
    # deviations sum to 0), but an infinite one makes it inf - inf: NaN for every element, where
    # torch's var gradient is inf at the finite ones. (Not detached always: it is needed for the
    # second derivative.)
    return torch.where(mean.isfinite(), mean, mean.detach())


def _deviations(means: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Each part's mean less the overall mean, the parts' share of M2 (Chan et al.)."""
    deviations = means - _finite_or_constant(mean)
    # A part holding inf has the overall mean (inf) as its own: inf - inf would make its finite
    # elements' gradient NaN, where torch's, 2 (x - mean) / dof, is -inf, as the part's own
    # var already gives it (M2 is NaN either way).
    return torch.where(means.isinf() & (means == mean), 0, deviations)


def _warn_without_dof(a: ReduceArgs) -> None:
    # torch's warning where the concatenation leaves no degrees of freedom (its var is inf or
    # NaN); per tensor (per_param, weighted, tiny bundles) torch gives it itself.
    if a.numel - a.options["correction"] <= 0:
        warnings.warn(
            f"{a.name.rsplit('.', 1)[-1]}(): degrees of freedom is <= 0. Correction should be strictly "
            "less than the reduction factor (input numel divided by output numel).",
            UserWarning,
        )


def _var_of(state: Any, a: ReduceArgs) -> torch.Tensor:
    _warn_without_dof(a)
    m2: torch.Tensor = state[1]
    dof = a.numel - a.options["correction"]
    if dof > 0:
        var: torch.Tensor = m2 / dof
        return var
    # No degrees of freedom: torch's value divides by 0, and its gradient (var_backward, as of
    # torch 2.13; older releases divided by dof) is g * inf at every element, whatever its sign,
    # but NaN at one exactly equal to the mean. Through M2 it would be g * inf * (x - mean), or
    # NaN where M2's paths meet; so it is given to the kept tensors directly, or else (across
    # ranks, complex) as g * inf through the mean.
    var = _NoDof.apply(m2, state[2], a.numel, _real(a.dtype), *state[3:])  # type: ignore[no-untyped-call]
    return var


class _NoDof(torch.autograd.Function):
    """`M2 / 0`, with torch's gradient: `g * inf` for every element, NaN at one equal to the mean."""

    @staticmethod
    def forward(
        ctx: Any, m2: torch.Tensor, mean: torch.Tensor, numel: int, dtype: torch.dtype, *tensors: torch.Tensor
    ) -> torch.Tensor:
        ctx.numel, ctx.mean_dtype, ctx.dtype = numel, mean.dtype, dtype
        # torch subtracts its mean, in the concatenation's dtype, from each element
        ctx.save_for_backward(mean.detach().to(dtype), *tensors)
        return torch.div(m2, 0)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        mean, *tensors = ctx.saved_tensors
        infinite = g * math.inf
        if not tensors:  # d mean / d x is 1 / numel for each element
            return None, (infinite * ctx.numel).to(ctx.mean_dtype), None, None
        at_mean = [torch.where(t.to(ctx.dtype) == mean, math.nan, infinite).to(t.dtype) for t in tensors]
        return None, None, None, None, *at_mean


def _fin_var(state: Any, a: ReduceArgs) -> torch.Tensor:
    return _cast(_var_of(state, a), _real(a.dtype))


def _fin_std(state: Any, a: ReduceArgs) -> torch.Tensor:
    var = _var_of(state, a)
    # torch's std has a zero gradient where the std is zero, not sqrt's infinite one.
    zero = var == 0
    std = torch.where(zero, var.detach(), torch.where(zero, torch.ones_like(var), var).sqrt())
    return _cast(std, _real(a.dtype))


def _fin_var_mean(state: Any, a: ReduceArgs) -> Any:
    return _fin_var(state, a), _cast(_welford_mean(state[2], a), a.dtype)


def _fin_std_mean(state: Any, a: ReduceArgs) -> Any:
    return _fin_std(state, a), _cast(_welford_mean(state[2], a), a.dtype)


def _welford_mean(mean: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
    # torch's var_mean updates its mean element by element (Welford): after an infinite element
    # the next one gives inf - inf, so its mean is NaN where the plain mean is +-inf: an infinite
    # element among others (float32 and narrower cannot overflow the float64 combine; float64
    # near its largest can, and was inf already). The gradient stays torch's.
    if a.numel < 2:
        return mean
    return mean + (torch.where(mean.isinf(), math.nan, mean) - mean).detach()


# -- all, any, count_nonzero, logsumexp --------------------------------------------------------


def _sig_all(input: Any, dim: Any = None, keepdim: bool = False) -> Any:
    return dim, keepdim


def _parse_all(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, keepdim = _bind(_sig_all, name, args, kwargs)
    if check_dim(dim, name, b) == ():
        # torch's all / any over no dim (dim=()) test each element, keeping the input's shape:
        # no reduction, so the concatenation's answer (the fallback) is the exact one.
        return NOT_HANDLED
    return ReduceArgs(name, torch.uint8 if b._dtype == torch.uint8 else torch.bool, b._numel, bool(keepdim))


def _all_parts(reducer: Callable[..., torch.Tensor]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def partial(t: torch.Tensor, offset: int, a: ReduceArgs) -> torch.Tensor:
        return _cast(reducer(t), torch.bool)

    def combine(states: list[torch.Tensor], a: ReduceArgs) -> torch.Tensor:
        return _cast(reducer(_stack(states, torch.bool)), a.dtype)

    return partial, combine


def _sig_count_nonzero(input: Any, dim: Any = None) -> Any:
    return dim


def _parse_count_nonzero(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    check_dim(_bind(_sig_count_nonzero, name, args, kwargs), name, b)
    return ReduceArgs(name, torch.int64, b._numel)


def _sig_logsumexp(input: Any, dim: Any, keepdim: bool = False) -> Any:
    return dim, keepdim


def _parse_logsumexp(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, keepdim = _bind(_sig_logsumexp, name, args, kwargs)
    if check_dim(dim, name, b) == () and not keepdim and b._numel:
        # torch reduces over every dim for dim=(), then cannot write into the 0-d result
        raise RuntimeError(
            f"{name}: output with shape [] doesn't match the broadcast shape [1] (torch raises "
            f"this on the concatenation for dim={dim!r}; {b.describe()}). Use dim=0."
        )
    dtype = b._dtype if _is_floating(b._dtype) else torch.get_default_dtype()
    # torch.compile and torch.func trace torch's own ops: there the partials keep their autograd.
    keeps = records(b) and not torch.compiler.is_compiling() and not transformed()
    return ReduceArgs(name, dtype, b._numel, bool(keepdim), {"records": keeps})


def _partial_logsumexp(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
    t = _cast(t, a.dtype)
    if a.options["records"]:
        # No gradient through the tensor's own logsumexp: the chain rule through it breaks
        # at an infinite partial (see _LogSumExp). The tensor is kept for _LogSumExp instead,
        # where it needs a gradient (a frozen one, or an inference tensor, is not saved).
        with torch.no_grad():
            return _logsumexp_of(t), (t if t.requires_grad else None)
    return _logsumexp_of(t), None


def _logsumexp_of(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in _LOW_PRECISION:  # a 16-bit partial was worse than the concatenation's in 1 draw of 8
        return _kernels.wide_logsumexp(t)
    return torch.logsumexp(_short_in_float64(t).reshape(-1), 0)


class _LogSumExp(torch.autograd.Function):
    """The logsumexp of the partials, with torch's gradient on the concatenation.

    That is `g * exp(x - result)` for each element x, taken here from the result itself.
    Through the partials it would be `g * exp(partial - result) * exp(x - partial)`: NaN
    everywhere in a tensor whose partial is infinite (`[inf, 1.0]`, or all -inf next to a
    finite tensor), where torch's is NaN at the inf element alone, or 0. Twice
    differentiable: the backward is torch's ops on the inputs and the (saved) result.
    """

    @staticmethod
    def forward(ctx: Any, partials: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        result = torch.logsumexp(partials, 0)
        ctx.save_for_backward(result, *tensors)
        return result

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        result, *tensors = ctx.saved_tensors
        return None, *(g * torch.exp(t - result).conj() for t in tensors)


def _combine_logsumexp(states: list[Any], a: ReduceArgs) -> torch.Tensor:
    # A state is (logsumexp, tensors it keeps for the gradient...); across ranks another
    # rank's is its logsumexp alone (see _across_ranks._logsumexp_form).
    values = [s[0] if isinstance(s, tuple) else s for s in states]
    partials = _stack(values, _acc_dtype(a.dtype))
    tensors = [t for s in states if isinstance(s, tuple) for t in s[1:] if t is not None]
    if tensors and torch.is_grad_enabled():
        result: torch.Tensor = _LogSumExp.apply(partials, *tensors)  # type: ignore[no-untyped-call]
    else:
        result = torch.logsumexp(partials, 0)
    return _cast(result, a.dtype)


# -- norms: torch.norm, Tensor.norm, linalg.vector_norm, linalg.norm of a vector ------------------


def _sig_norm(input: Any, p: Any = "fro", dim: Any = None, keepdim: bool = False, out: Any = None, dtype: Any = None) -> Any:
    return p, dim, keepdim, out, dtype


def _sig_vector_norm(x: Any, ord: Any = 2, dim: Any = None, keepdim: bool = False, *, dtype: Any = None, out: Any = None) -> Any:
    return ord, dim, keepdim, out, dtype


def _sig_linalg_norm(A: Any, ord: Any = None, dim: Any = None, keepdim: bool = False, *, out: Any = None, dtype: Any = None) -> Any:
    return ord, dim, keepdim, out, dtype


_NORM_SIGNATURES: dict[Any, Callable[..., Any]] = {
    torch.norm: _sig_norm,
    _T.norm: _sig_norm,
    torch.linalg.vector_norm: _sig_vector_norm,
    torch.linalg.norm: _sig_linalg_norm,
}


def _order(p: Any, name: str, b: ParameterBundle, func: Callable[..., Any]) -> float:
    """A norm's p as a float, checked as torch checks it: from the arguments alone."""
    # 'fro' is the 2-norm of a vector for torch.norm alone: torch.linalg.norm takes any
    # string as a matrix norm, which the 1-D concatenation is refused.
    if isinstance(p, torch.Tensor) and p.ndim == 0:
        p = p.item()  # torch takes a 0-d tensor as a number
    if p is None or (p == "fro" and func in (torch.norm, _T.norm)):
        p = 2.0
    if isinstance(p, str):
        raise RuntimeError(
            f"{name}: ord {p!r} is a matrix norm, but {b.describe()} behaves as a vector "
            "(torch raises on the 1-D concatenation: linalg.matrix_norm: The input tensor A must "
            "have at least 2 dimensions). Use a number (0, 1, 2, any p, inf, -inf)."
        )
    # Any real number, as torch's: True is 1, NumPy scalars are numbers.
    if not isinstance(p, numbers.Real):
        error = RuntimeError if isinstance(p, numbers.Complex) else TypeError
        raise error(
            f"{name}: ord must be a real number, not {type(p).__name__} ({p!r}) (torch raises "
            f"{error.__name__} on the concatenation); {b.describe()} behaves as a vector. Use 0, "
            "1, 2, any p, inf or -inf."
        )
    return float(p)


def _norm_order(call: ReductionCall) -> float:
    """The p of a norm call, for `_across_ranks`: every rank finds the same, even one whose
    parse fails on its own shards (their dtype), as it takes the arguments alone."""
    p, *_ = _bind(_NORM_SIGNATURES[call.func], call.name, call.args, call.kwargs)
    return _order(p, call.name, call.bundle, call.func)


def _parse_norm(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    p, dim, keepdim, out, dtype = _bind(_NORM_SIGNATURES[func], name, args, kwargs)
    check_dtype(dtype, name, b)
    dim_ints(dim, name)
    if out is not None:
        return NOT_HANDLED
    p = _order(p, name, b, func)
    _require_floating(b._dtype, name, b, "a norm", dtype_helps=False)  # whatever dtype= says
    if dtype is not None and dtype.is_complex != b._dtype.is_complex:
        kind = "complex" if b._dtype.is_complex else "real"
        raise RuntimeError(
            f"{name}: dtype should be {kind} for {kind} inputs, but got {dtype}: {b.describe()} "
            f"concatenates to {b._dtype} (torch raises the same on the concatenation)."
        )
    if dtype is not None and torch.promote_types(b._dtype, dtype) != dtype:
        raise RuntimeError(
            f"{name}: dtype={dtype} would narrow {b._dtype}, the dtype {b.describe()} concatenates "
            "to (torch raises the same on the concatenation: the input should be convertible "
            f"without narrowing to dtype=). Use dtype={torch.promote_types(b._dtype, dtype)}, or leave it out."
        )
    check_dim(dim, name, b)  # after the dtypes, as torch checks them
    dtype = dtype or b._dtype
    # Where autograd records, an L2 norm is the root of the tensors' sums of squares, not the
    # norm of their norms: a tensor whose norm is 0 (a zero bias) would make the second
    # derivative NaN, where the concatenation's is finite (gradient penalties). Other finite
    # p > 1 likewise take sums of p-th powers (see takes_powers).
    squares = p == 2 and not dtype.is_complex and records(b)
    options = {"p": p, "squares": squares, "powers": takes_powers(p, dtype, records(b)), "records": records(b)}
    return ReduceArgs(name, dtype, b._numel, bool(keepdim), options)


def _partial_norm(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
    if not _is_floating(t.dtype) or (a.dtype.is_complex and not t.dtype.is_complex):
        t = t.to(a.dtype)  # as in the concatenation: vector_norm takes no complex dtype= for real input
    if a.options.get("squares"):  # (16-bit tensors are widened inside: no copy kept for backward)
        return sum_of_squares(_cast(t, a.dtype)), None
    if a.options.get("powers"):
        with torch.no_grad():
            norm = _norm_of(t, a)
        return power_sum(norm, a.options["p"], _cast(t, a.dtype)), None
    return _norm_of(t, a), _kept(t, a)


def _norm_of(t: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
    p = a.options["p"]
    if p == 2 and t.dtype == a.dtype and t.numel() >= rows_numel(t.dtype):
        return l2_norm(t)
    if t.dtype in _LOW_PRECISION and t.dtype == a.dtype:
        # A float16 partial would round to float16 before the combine (a float16 step off the
        # concatenation's in about 1 draw of 5).
        return _kernels.wide_norm(t, p)
    if t.dtype == a.dtype and t.dtype in (torch.float32, torch.float64) and math.isfinite(p) and p not in (0, 2):
        return _kernels.p_norm(t, p)  # (long ones by rows)
    dtype = _partial_dtype(a.dtype)
    with quiet_count(t, p):
        value: torch.Tensor = torch.linalg.vector_norm(t, ord=p, dtype=dtype if dtype != t.dtype else None)
    return value


def _partials_norm(tensors: list[torch.Tensor], a: ReduceArgs) -> list[Any]:
    # Tensors of one dtype and device, no gradient recorded: the L2 norms of the short ones
    # by one torch._foreach_norm (no Python per tensor), the long ones by rows (accurate).
    if a.options["p"] != 2 or a.options.get("squares") or tensors[0].dtype != a.dtype or len(tensors) == 1:
        return [_partial_norm(t, 0, a) for t in tensors]
    least = rows_numel(a.dtype)
    key = ("norm rows", least)
    split = tensors.derived.get(key) if isinstance(tensors, TensorGroup) else None
    if split is None:
        split = (
            [t for t in tensors if t.numel() >= least],
            [t for t in tensors if t.numel() < least],
        )
        if isinstance(tensors, TensorGroup):
            tensors.derived[key] = split
    long, short = split
    states = [(l2_norm(t), _kept(t, a)) for t in long]
    if short:  # one state for them all, as for amax: their norms' norm
        dtype = _partial_dtype(a.dtype)  # float16 norms would round before the combine
        norms = torch.stack(torch._foreach_norm(short, 2, dtype=dtype if dtype != a.dtype else None))
        states.append((torch.linalg.vector_norm(norms.to(torch.float64)), None))
    return states


def _combine_norm(states: list[Any], a: ReduceArgs) -> torch.Tensor:
    p = a.options["p"]
    real = _real(a.dtype)
    values, tensors = zip(*states)
    if math.isinf(p):
        return _extremum(values, tensors, p > 0, real, key=torch.abs)
    if a.options.get("squares") or a.options.get("powers"):  # sums of p-th powers (see _parse_norm)
        return _cast(root_of_sum(values, real, p), real)
    if len(values) == 1:
        return _cast(values[0], real)
    stacked = _stack(values, _acc_dtype(real))
    # The partial norms are >= 0, so for p in (0, 1) a plain sum combines them, and keeps
    # torch's sign(x) gradient where another element is NaN.
    combined = stacked.sum() if p in (0, 1) else torch.linalg.vector_norm(stacked, ord=p)
    return _cast(combined, real)


# -- one launch for all tensors, on a GPU (see _multitensor) -------------------------------------


def _fused(op: str) -> Callable[[ParameterBundle, ReduceArgs], Any]:
    """The `fused` of reduction `op`: its plain full form, by one multi-tensor kernel."""

    def fused(b: ParameterBundle, a: ReduceArgs) -> Any:
        # keepdim, dtype= casts and norms other than L2 keep the per-tensor path.
        if a.keepdim or a.dtype != b._dtype or a.options.get("p", 2) != 2:
            return NOT_HANDLED
        if not _multitensor.serves(b, gradients=op in _multitensor.GRADIENTS):
            return NOT_HANDLED
        assert b._tensors is not None
        result = _multitensor.reduce(
            op, b._tensors, a.dtype, b._plans, numel=b._numel, correction=a.options.get("correction", 1)
        )
        if result is None:
            return NOT_HANDLED
        if "correction" in a.options:  # var and std
            _warn_without_dof(a)
        return result

    return fused


# -- the table of reductions and its handler ---------------------------------------------------

# Which torch functions each reduction serves; the tests import this to cover every entry.
REDUCTION_FUNCTIONS: dict[str, tuple[Any, ...]] = {
    "sum": (torch.sum, _T.sum),
    "nansum": (torch.nansum, _T.nansum),
    "mean": (torch.mean, _T.mean),
    "nanmean": (torch.nanmean, _T.nanmean),
    "prod": (torch.prod, _T.prod),
    "var": (torch.var, _T.var),
    "std": (torch.std, _T.std),
    "var_mean": (torch.var_mean,),
    "std_mean": (torch.std_mean,),
    "amax": (torch.amax, _T.amax),
    "amin": (torch.amin, _T.amin),
    "aminmax": (torch.aminmax, _T.aminmax),
    "argmax": (torch.argmax, _T.argmax),
    "argmin": (torch.argmin, _T.argmin),
    "all": (torch.all, _T.all),
    "any": (torch.any, _T.any),
    "count_nonzero": (torch.count_nonzero, _T.count_nonzero),
    "logsumexp": (torch.logsumexp, _T.logsumexp, torch.special.logsumexp),
    "norm": (torch.norm, _T.norm, torch.linalg.vector_norm, torch.linalg.norm),
}


_NEEDS_ELEMENTS = lambda a: True  # noqa: E731 - no identity: torch raises on empty input


def _register(funcs: tuple[Any, ...], *parts: Any, **kwargs: Any) -> Reduction:
    # torch's functions reduce a plain flat tensor themselves: tiny bundles may call them once.
    # Most ignore where elements stand (not the arg-extrema): small tensors may be packed.
    # Those with a multi-tensor kernel take it on a GPU.
    name = next(name for name, served in REDUCTION_FUNCTIONS.items() if served == funcs)
    fused = _fused(name) if name in _multitensor.OPS else None
    return register_reduction(funcs, *parts, direct=True, fused=fused, **{"commutative": True, **kwargs})


# var and std: the small tensors packed (and added in float64), the long ones' moments together.
_VAR_PARTS: dict[str, Any] = {"parse": _parse_var, "partials": _partials_var, "partials_small": False}

_PARTIAL_SUM, _PARTIAL_MEAN = _make_sum(torch.sum), _make_sum(torch.sum, converts=False)

# Every reduction goes through the public `register_reduction`, as another library's would.
REDUCTIONS: dict[str, Reduction] = {
    "sum": _register(
        REDUCTION_FUNCTIONS["sum"], _PARTIAL_SUM, _combine_sum, _finalize_sum, parse=_parse_sum,
        pack_dtype=_wide_pack, partials=_make_partials_sum(_PARTIAL_SUM), partials_small=False,
    ),
    "nansum": _register(
        REDUCTION_FUNCTIONS["nansum"], _make_sum(torch.nansum), _combine_sum, _finalize_sum, parse=_parse_sum,
        pack_dtype=_wide_pack,
    ),
    "mean": _register(
        REDUCTION_FUNCTIONS["mean"], _PARTIAL_MEAN, _combine_sum, _finalize_mean, parse=_parse_mean,
        pack_dtype=_wide_pack, partials=_make_partials_sum(_PARTIAL_MEAN), partials_small=False,
    ),
    "nanmean": _register(
        REDUCTION_FUNCTIONS["nanmean"], _partial_nanmean, _combine_nanmean, _finalize_nanmean, parse=_parse_mean
    ),
    # prod overflows and underflows easily: regrouping its factors would change where it does
    "prod": _register(
        REDUCTION_FUNCTIONS["prod"], _partial_prod, _combine_prod, _finalize_prod, parse=_parse_prod,
        commutative=False,
    ),
    # var and std: Chan et al.'s parallel merge of per-tensor (count, mean, M2)
    "var": _register(REDUCTION_FUNCTIONS["var"], _partial_var, _combine_var, _fin_var, **_VAR_PARTS),
    "std": _register(REDUCTION_FUNCTIONS["std"], _partial_var, _combine_var, _fin_std, **_VAR_PARTS),
    "var_mean": _register(REDUCTION_FUNCTIONS["var_mean"], _partial_var, _combine_var, _fin_var_mean, **_VAR_PARTS),
    "std_mean": _register(REDUCTION_FUNCTIONS["std_mean"], _partial_var, _combine_var, _fin_std_mean, **_VAR_PARTS),
    "amax": _register(
        REDUCTION_FUNCTIONS["amax"], *_extremum_parts(True), parse=_parse_amax, needs_elements=_NEEDS_ELEMENTS,
        partials=_partials_amax,
    ),
    "amin": _register(
        REDUCTION_FUNCTIONS["amin"], *_extremum_parts(False), parse=_parse_amax, needs_elements=_NEEDS_ELEMENTS
    ),
    "aminmax": _register(
        REDUCTION_FUNCTIONS["aminmax"],
        _partial_aminmax,
        _combine_aminmax,
        parse=_parse_aminmax,
        needs_elements=_NEEDS_ELEMENTS,
    ),
    "argmax": _register(
        REDUCTION_FUNCTIONS["argmax"], *_arg_extremum_parts(True), _fin_index, parse=_parse_argmax,
        needs_elements=_NEEDS_ELEMENTS, commutative=False,
    ),
    "argmin": _register(
        REDUCTION_FUNCTIONS["argmin"], *_arg_extremum_parts(False), _fin_index, parse=_parse_argmax,
        needs_elements=_NEEDS_ELEMENTS, commutative=False,
    ),
    "all": _register(REDUCTION_FUNCTIONS["all"], *_all_parts(torch.all), parse=_parse_all),
    "any": _register(REDUCTION_FUNCTIONS["any"], *_all_parts(torch.any), parse=_parse_all),
    "count_nonzero": _register(
        REDUCTION_FUNCTIONS["count_nonzero"],
        lambda t, offset, a: torch.count_nonzero(t),
        _combine_sum,
        parse=_parse_count_nonzero,
    ),
    "logsumexp": _register(
        REDUCTION_FUNCTIONS["logsumexp"], _partial_logsumexp, _combine_logsumexp, parse=_parse_logsumexp
    ),
    "norm": _register(
        REDUCTION_FUNCTIONS["norm"],
        _partial_norm,
        _combine_norm,
        parse=_parse_norm,
        partials=_partials_norm,
        needs_elements=lambda a: a.options["p"] < 0 or math.isinf(a.options["p"]),
    ),
}

# max / min with dim (values and indices) serve the max and min handler, not a function.
_MAX_DIM = {
    largest: Reduction(
        _parse_max_dim,
        *_arg_extremum_parts(largest),
        _fin_values_indices(torch.return_types.max if largest else torch.return_types.min),
        _NEEDS_ELEMENTS,
        direct=True,
    )
    for largest in (True, False)
}

REDUCTION_FUNCTIONS["max"] = (torch.max, _T.max)
REDUCTION_FUNCTIONS["min"] = (torch.min, _T.min)
ParameterBundle.implements(REDUCTION_FUNCTIONS["max"])(max_handler(REDUCTIONS["amax"], _MAX_DIM[True]))
ParameterBundle.implements(REDUCTION_FUNCTIONS["min"])(max_handler(REDUCTIONS["amin"], _MAX_DIM[False]))

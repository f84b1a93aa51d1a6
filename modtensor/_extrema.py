"""Extrema over the whole bundle: amax, amin, aminmax, argmax, argmin, and max / min.

Each is a monoid as the other reductions are (see `_reductions.py`, which holds the table);
here also torch's gradient for ties (spread evenly over every tied element of the
concatenation, not over tensors) and the max / min handler, which is a full reduction, one
with `dim` (values and indices) or an elementwise op with `other`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from modtensor._bundle import ParameterBundle, is_bundle
from modtensor._dispatch import NOT_HANDLED, func_name
from modtensor._extend import run_reduction
from modtensor._pointwise import map_elementwise
from modtensor._reduce_common import _bind, _cast, _stack, check_dim, records, transformed
from modtensor._strategies import Reduction, ReduceArgs, TensorGroup

__all__ = ["max_handler", "records", "spreads_nan", "tie_shared"]


# -- extrema: amax, amin, max, min, aminmax, argmax, argmin ------------------------------------


def _kept(t: Any, a: ReduceArgs) -> Any:
    """The tensor, kept for `_extremum`'s tie counting only where a gradient is recorded.

    Otherwise it is dropped as soon as its partial is computed: a tensor computed on demand
    (`(a - b).abs().amax()`) or cast to the concatenation's dtype is a new one, and keeping
    them all would hold the model's size. Decided per call, not per tensor: where one tensor
    requires grad, a frozen one's ties still take their share.
    """
    # Under forward AD and torch.func, tangents and batches need the ties too (see _extremum).
    return t if a.options.get("records", torch.is_grad_enabled()) or _functional() else None


def _functional() -> bool:
    # Under forward AD or torch.func, not inside torch.compile (where transformed() is true too)
    return transformed() and not torch.compiler.is_compiling()


def _extremum(
    values: Sequence[torch.Tensor],
    tensors: Sequence[Any],
    largest: bool,
    dtype: torch.dtype,
    key: Callable[[torch.Tensor], torch.Tensor] | None = None,
    nan_spread: bool = False,
) -> torch.Tensor:
    """The max (or min) of per-tensor extrema, with torch's gradient for ties.

    torch spreads an extremum's gradient evenly over all tied elements of the input; the
    plain max of per-tensor maxima would split it evenly over tensors instead. So where
    several tensors tie and a gradient is wanted, weigh each by its share of the ties.
    `key` maps a tensor to the values that were compared (`abs` for the inf-norms).

    A NaN result (see `_SharedExtremum`) gets amax's gradient (NaN everywhere), or with
    `nan_spread` that of max() (shared by the NaN elements); with `key`, the inf-norms' (zeros).
    """
    stacked = _stack(values, dtype)
    m = stacked.amax() if largest else stacked.amin()
    functional = _functional()
    if not (m.requires_grad and torch.is_grad_enabled()) and not functional:
        return m
    if (
        torch.compiler.is_compiling() or functional or m.is_meta
        or ((key is not None or nan_spread) and bool(m.isnan()))
    ):
        # (at a NaN, the stacked extrema's amax would send NaN into every tensor; under
        # torch.func the branches below would read values, which vmap cannot, nor can they
        # on meta tensors, which hold none; and the stacked extrema's tangent would average
        # tensors' ties, not elements')
        return _shared_extremum(m, tensors, dtype, key, nan_spread)
    if len(values) == 1:
        return m
    tied = (stacked == m).tolist()
    if sum(tied) <= 1:
        return m
    compared = [_cast(key(t) if key else t, dtype) if is_tied else None for t, is_tied in zip(tensors, tied)]
    # (each where its tensor lives: a pair of tensors for a distance has no device of its own)
    counts = [None if c is None else (c == m.to(c.device)).sum().to(m.device) for c in compared]
    return tie_shared(stacked, m, counts)


def tie_shared(stacked: torch.Tensor, m: torch.Tensor, counts: Sequence[Any]) -> torch.Tensor:
    """`m`, the extremum of `stacked`, with its gradient split over the tied entries.

    `counts[i]` is how many elements entry i's extremum stands for (None where it is not
    tied), so each tied entry gets its share of torch's evenly spread gradient.
    """
    total = sum(c for c in counts if c is not None)
    shares = [
        (v, (c.to(torch.float64) if isinstance(c, torch.Tensor) else float(c)) / total)
        for v, c in zip(stacked, counts)
        if c is not None
    ]
    if not bool(m.isfinite()):  # +-inf: the shares sum to one, so the value stays exact
        return sum((v * _as_share(w, v) for v, w in shares), torch.zeros_like(m))
    result = m.detach()
    for v, w in shares:
        result = result + (v - v.detach()) * _as_share(w, v)
    return result


def _as_share(w: Any, v: torch.Tensor) -> Any:
    return w.to(v.dtype) if isinstance(w, torch.Tensor) else w


def _shared_extremum(
    m: torch.Tensor,
    tensors: Sequence[Any],
    dtype: torch.dtype,
    key: Callable[[Any], torch.Tensor] | None,
    nan_spread: bool,
) -> torch.Tensor:
    # _extremum without data-dependent branches, which torch.compile cannot trace; eagerly,
    # its NaN results. The gradient goes straight to the compared values (the kept tensors,
    # or pairs of them for a distance, through `key`), not through the per-tensor extrema:
    # their amax backward is NaN at a NaN even for a zero gradient, so any path from a
    # tensor holding a NaN poisons it.
    keyed = [_cast(key(t) if key else t, dtype) for t in tensors]
    mode = "zeros" if key is not None else "spread" if nan_spread else "amax"
    function = _SharedExtremum if torch.compiler.is_compiling() else _SharedExtremumWithTangent
    result: torch.Tensor = function.apply(m.detach(), mode, *keyed)  # type: ignore[no-untyped-call]
    return result


class _SharedExtremum(torch.autograd.Function):
    """`m`, the extremum of `keyed`, with torch's gradient on their concatenation.

    That is the gradient spread evenly over the elements equal to `m`; at a NaN `m`, over
    the NaN elements with mode "spread" (max / min), none with "zeros" (the inf-norms), and
    NaN everywhere with "amax" (0 / 0, as torch's amax). The value is `m` itself, exact at
    +-inf, where `x - x.detach()` would be NaN.
    """

    # Written with torch ops alone, no value read in Python: torch.func batches it (vmap)
    # by running them on batched tensors.
    generate_vmap_rule = True

    @staticmethod
    def forward(m: torch.Tensor, mode: str, *keyed: torch.Tensor) -> torch.Tensor:
        return m.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        m, mode, *keyed = inputs
        ctx.mode = mode
        ctx.save_for_backward(m, *keyed)
        ctx.save_for_forward(m, *keyed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        m, *keyed = ctx.saved_tensors
        masks, count = _SharedExtremum.tied(m, ctx.mode, keyed)
        share = grad / count
        return None, None, *(share.to(k.device) * mask for k, mask in zip(keyed, masks))

    @staticmethod
    def tied(m: torch.Tensor, mode: str, keyed: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The masks of the elements sharing the gradient, and how many they are."""
        masks = [k == m.to(k.device) for k in keyed]
        if mode == "spread":
            # a NaN element makes m NaN, so this adds none where m is a number
            masks = [mask | k.isnan() for mask, k in zip(masks, keyed)]
        count = torch.stack([mask.sum().to(m.device) for mask in masks]).sum()
        if mode == "zeros":
            count = count.clamp(min=1)
        return masks, count


class _SharedExtremumWithTangent(_SharedExtremum):
    """_SharedExtremum with its tangent, for forward AD and torch.func.jvp (torch.compile
    does not trace a Function that defines jvp, so the compiled graph takes the one above)."""

    @staticmethod
    def jvp(ctx: Any, m_tangent: Any, mode_tangent: Any, *tangents: torch.Tensor | None) -> torch.Tensor:
        # The mean of the tied elements' tangents, as torch's: at a NaN, NaN for amax and max
        # (whose backward spreads there, but whose tangent counts the elements equal to it:
        # none), 0 for the inf-norms.
        m, *keyed = ctx.saved_tensors
        masks, count = _SharedExtremum.tied(m, "amax" if ctx.mode == "spread" else ctx.mode, keyed)
        total = torch.zeros_like(m)
        for tangent, mask in zip(tangents, masks):
            if tangent is not None:
                total = total + (tangent * mask).sum().to(device=m.device, dtype=m.dtype)
        return total / count


def _sig_amax(input: Any, dim: Any = (), keepdim: bool = False) -> Any:
    return dim, keepdim


def _parse_amax(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, keepdim = _bind(_sig_amax, name, args, kwargs)
    check_dim(dim, name, b)
    return ReduceArgs(name, b._dtype, b._numel, bool(keepdim), {"records": records(b)})


# On the CPU, torch._foreach_max is a loop of Tensor.max(), whose kernel reads a long float32
# tensor up to 2.8x slower than amax's on some machines (0.56 against 0.20 ms for 4Mi elements
# on an AMD EPYC, one thread): tensors of this many elements or more take amax one by one,
# where a call's Python (about 1 us) is a small share of the read.
_AMAX_ONE_BY_ONE = 1 << 16


def _partials_amax(tensors: list[torch.Tensor], a: ReduceArgs) -> list[Any]:
    # No gradient is recorded where partials serve, so no tie needs its tensor: one state for
    # all, the max of the tensors' maxima (the short ones' by one torch._foreach_max, not one
    # per tensor to walk in Python again after the model was read, from cold caches).
    if tensors[0].device.type != "cpu":  # one kernel for them all
        return [(torch.stack(torch._foreach_max(tensors)).amax(), None)]
    split = tensors.derived.get("amax long") if isinstance(tensors, TensorGroup) else None
    if split is None:
        split = (
            [t for t in tensors if t.numel() >= _AMAX_ONE_BY_ONE],
            [t for t in tensors if t.numel() < _AMAX_ONE_BY_ONE],
        )
        if isinstance(tensors, TensorGroup):
            tensors.derived["amax long"] = split
    long, short = split
    maxima = [torch.amax(t) for t in long] + (list(torch._foreach_max(short)) if short else [])
    return [(torch.stack(maxima).amax(), None)]


def spreads_nan(a: ReduceArgs) -> bool:
    """Whether a NaN result's gradient goes to the NaN elements (see `_SharedExtremum`).

    max() / min() share the reduction of amax / amin; only their gradient there differs.
    """
    return a.name.endswith((".max", ".min"))


def _extremum_parts(largest: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    reducer = torch.amax if largest else torch.amin

    def partial(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
        return reducer(t), _kept(t, a)

    def combine(states: list[Any], a: ReduceArgs) -> torch.Tensor:
        values, tensors = zip(*states)
        return _extremum(values, tensors, largest, a.dtype, nan_spread=spreads_nan(a))

    return partial, combine


def _sig_aminmax(input: Any, *, dim: Any = None, keepdim: bool = False) -> Any:
    return dim, keepdim


def _parse_aminmax(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, keepdim = _bind(_sig_aminmax, name, args, kwargs)
    check_dim(dim, name, b)
    return ReduceArgs(name, b._dtype, b._numel, bool(keepdim), {"records": records(b)})


def _partial_aminmax(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
    return torch.amin(t), torch.amax(t), _kept(t, a)


def _combine_aminmax(states: list[Any], a: ReduceArgs) -> Any:
    tensors = [t for _, _, t in states]
    low = _extremum([lo for lo, _, _ in states], tensors, False, a.dtype)
    high = _extremum([hi for _, hi, _ in states], tensors, True, a.dtype)
    return torch.return_types.aminmax((low, high))


def _sig_argmax(input: Any, dim: Any = None, keepdim: bool = False) -> Any:
    return dim, keepdim


def _parse_argmax(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, keepdim = _bind(_sig_argmax, name, args, kwargs)
    check_dim(dim, name, b)
    if b._dtype == torch.bool:
        raise RuntimeError(f"{name}: does not support bool input ({b.describe()}); cast first, e.g. `b.int()`.")
    return ReduceArgs(name, b._dtype, b._numel, bool(keepdim))


def _comparable(t: torch.Tensor) -> torch.Tensor:
    # torch's argmax has no bool kernel, but max(dim=) of a bool tensor has: compare as uint8.
    return t.to(torch.uint8) if t.dtype == torch.bool else t


def _arg_extremum_parts(largest: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Partial and combine of argmax / argmin, and of max / min with dim: (value, global index)."""

    def partial(t: torch.Tensor, offset: int, a: ReduceArgs) -> Any:
        # torch's arg-extrema count NaN as the extremum and pick the first; taking the
        # first tensor's candidate among equals keeps that order across tensors. Compared in
        # the concatenation's dtype (a bool tensor among integers has no argmax of its own).
        flat = _cast(t, a.dtype).reshape(-1)
        keyed = _comparable(flat)
        local = keyed.argmax() if largest else keyed.argmin()
        # gather, not flat[local]: indexing with a tensor would read it back (and fail on meta)
        return flat.gather(0, local.reshape(1)).reshape(()), local + offset

    def combine(states: list[Any], a: ReduceArgs) -> Any:
        values = _stack([v for v, _ in states], a.dtype)
        k = _comparable(values).argmax() if largest else _comparable(values).argmin()
        pick = k.reshape(1)
        indices = _stack([i for _, i in states], torch.int64)
        return values.gather(0, pick).reshape(()), indices.gather(0, pick).reshape(())

    return partial, combine


def _fin_index(state: Any, a: ReduceArgs) -> torch.Tensor:
    index: torch.Tensor = state[1]
    return index


def _fin_values_indices(return_type: Any) -> Callable[[Any, ReduceArgs], Any]:
    return lambda state, a: return_type(state)


# -- max / min: full (like amax), with dim (values and indices), or elementwise with `other` ---


def _sig_max(input: Any, dim: Any = None, keepdim: bool = False, *, other: Any = None, out: Any = None) -> Any:
    return dim, keepdim, other


def max_handler(full: Reduction, with_dim: Reduction) -> Callable[..., Any]:
    """The handler of torch.max (or min): `full` without dim, `with_dim` with one, and
    elementwise with a tensor `other`."""

    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not is_bundle(args[0]):
            return map_elementwise(func, types, args, kwargs)
        b = args[0]
        dim, keepdim, other = _bind(_sig_max, func_name(func), args, kwargs)
        # a tensor second argument is torch's `other` (elementwise), a tensor `dim=` a dim
        if (isinstance(dim, torch.Tensor) and "dim" not in kwargs) or other is not None:
            return map_elementwise(func, types, args, kwargs)
        if kwargs.get("out") is not None:
            return NOT_HANDLED
        if dim is None:
            if keepdim:
                return NOT_HANDLED
            return run_reduction(func, args, kwargs, b, full)
        return run_reduction(func, args, kwargs, b, with_dim)

    return handler


def _parse_max_dim(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    dim, keepdim, _ = _bind(_sig_max, name, args, kwargs)
    if isinstance(dim, (tuple, list)):  # torch takes one int here (a NumPy integer too)
        raise TypeError(f"{name}: dim must be an int, got {dim!r}.")
    check_dim(dim, name, b)
    return ReduceArgs(name, b._dtype, b._numel, bool(keepdim))

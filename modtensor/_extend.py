"""The public extension API: handlers, reductions and strategies for other libraries.

Everything built in is registered through these same functions: every reduction of
`_reductions.py` (var, for one, is Chan et al.'s parallel merge of per-tensor
`(count, mean, M2)` partials) goes through `register_reduction`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from modtensor import _strategies
from modtensor._bundle import ParameterBundle, is_bundle
from modtensor._kernels import fuse
from modtensor._dispatch import (
    ANY_STRATEGY, NOT_HANDLED, Handler, _as_functions, check_signature, copy_is_cheap, func_name, remember_direct,
)
from modtensor._pointwise import per_tensor_caller
from modtensor._reduce_common import _bind, _is_floating, check_dim, without_none_out
from modtensor._selection import chunk_size, chunks_of
from modtensor._strategies import (
    Pieces,
    Reduction,
    ReduceArgs,
    ReductionCall,
    Strategy,
    may_pack,
    register_strategy,
    strategies,
)

__all__ = [
    "Reduction", "ReduceArgs", "ReductionCall", "Strategy", "implements", "register_reduction",
    "register_strategy", "run_reduction", "strategies",
]

H = TypeVar("H", bound=Handler)


def implements(
    funcs: Callable[..., Any] | Iterable[Callable[..., Any]], strategy: str = ANY_STRATEGY
) -> Callable[[H], H]:
    """Register the decorated handler in ParameterBundle's table for one or more torch functions.

    The handler is called as `handler(func, types, args, kwargs)`; `strategy` restricts it to
    bundles of that strategy (the default `"*"` serves all; a specific entry wins). Return
    `NotImplemented` from it to send a call to the fallback. Subclass `ParameterBundle` to
    keep your entries out of everyone else's table: a subclass inherits its parent's entries,
    registered before or after it was defined, except where it registered its own. `funcs` is
    a callable or an iterable of them, `strategy` `"*"` or a registered strategy. A second
    registration for the same function and strategy replaces the first (that is how the
    built-in handlers are overridden), whichever library made it.

    Example:
        >>> import torch, modtensor as mt
        >>> class Mine(mt.ParameterBundle):
        ...     pass
        >>> @Mine.implements(torch.cumsum, strategy="per_param")
        ... def per_tensor_cumsum(func, types, args, kwargs):
        ...     b, dim = args
        ...     return b.derive([torch.cumsum(t.reshape(-1), 0) for t in b.tensors])
        >>> b = Mine([torch.ones(2), torch.ones(3)], ["a", "b"], strategy="per_param")
        >>> [t.tolist() for t in torch.cumsum(b, 0).tensors]
        [[1.0, 2.0], [1.0, 2.0, 3.0]]
    """
    return ParameterBundle.implements(funcs, strategy)


def _sig_dim_keepdim(input: Any, dim: Any = None, keepdim: bool = False) -> Any:
    return dim, keepdim


def parse_dim_keepdim(
    b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ReduceArgs:
    """The default argument parser of `register_reduction`: `(input, dim=None, keepdim=False)`."""
    name = func_name(func)
    dim, keepdim = _bind(_sig_dim_keepdim, name, args, kwargs)
    check_dim(dim, name, b)
    return ReduceArgs(name, b.dtype, b.numel(), bool(keepdim))


def _has_integers_in_floats(b: ParameterBundle) -> bool:
    found = b._plans.get("integers in floats")
    if found is None:  # once per bundle: most have none
        found = b._plans["integers in floats"] = _is_floating(b._dtype) and not all(map(_is_floating, b._dtypes))
    return bool(found)


def _as_in_concatenation(b: ParameterBundle) -> tuple[Callable[[int], torch.Tensor], tuple[Any, ...]]:
    # torch.cat converts integer tensors to a floating concatenation's dtype before anything
    # reduces them, and that rounds (70000 is inf in float16, 2**24 + 1 is 2**24 in float32):
    # the partials see them so too. The converted copies are of the integer tensors only.
    def get(i: int) -> torch.Tensor:
        t = b._tensor(i)
        return t if _is_floating(t.dtype) else t.to(b._dtype)

    keys = tuple((d if _is_floating(d) else b._dtype, device) for d, device in b._keys)
    return get, keys


_BUILTIN: set[int] = set()


def _is_builtin(reduction: Reduction) -> bool:
    if not _BUILTIN:  # read on first use: _reductions registers them through this module
        from modtensor._reductions import REDUCTIONS

        _BUILTIN.update(map(id, REDUCTIONS.values()))  # they live as long as the process
    return id(reduction) in _BUILTIN


def run_reduction(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], b: ParameterBundle, reduction: Reduction
) -> Any:
    """Run `reduction` for the call `func(*args, **kwargs)` under `b`'s strategy."""
    if reduction.direct and copy_is_cheap([b], b._strategy):
        # Parsed all the same: bad arguments get the error the per-tensor path gives.
        if reduction.parse(b, func, args, kwargs) is NOT_HANDLED:
            return NOT_HANDLED
        remember_direct(b, func, args, kwargs)  # valid for every tiny bundle of this dtype
        return func(b._concatenation(), *args[1:], **kwargs)  # the handler takes b as args[0]
    parse: Callable[[], Any] = lambda: reduction.parse(b, func, args, kwargs)
    # The whole local bundle at once where possible: the reduction's own `fused` (one GPU
    # kernel), or a chain such as (x ** 2).sum() fused into one (a distributed bundle combines
    # across ranks instead).
    if b._strategy == "concat" and b._dist is None and (reduction.fused is not None or b._expr is not None):
        parsed = parse()
        if parsed is not NOT_HANDLED:
            result = NOT_HANDLED if reduction.fused is None else reduction.fused(b, parsed)
            if result is NOT_HANDLED and b._expr is not None and _is_builtin(reduction):
                # The kernels compute the built-in sum and norm: not a reduction that a
                # library registered in their place for the same function.
                result = fuse(func, parsed, b)
            if result is not NOT_HANDLED:
                return _strategies.with_empty_grads(result, [b])
        parse = lambda: parsed  # noqa: E731 - parsed once, for the strategy too
    packs = reduction.commutative and may_pack(b)
    get: Callable[[int], torch.Tensor] = b._tensor
    keys: tuple[Any, ...] = b._keys
    views = b._tensors is not None
    integers = b._strategy == "concat" and _has_integers_in_floats(b)
    if integers:
        get, keys = _as_in_concatenation(b)
        # Its integer tensors' converted copies are made at each call: kept with the bundle's
        # plans (as its own tensors are), they would miss later in-place updates of the buffers.
        views = False
    # A chain computed on demand (`(a - b).abs().sum()`) is read by chunks where it can make
    # them alone: made whole, each tensor's intermediates were alive together, twice or more
    # the tensor. Only the built-in reductions, whose partials take any flat segment; not
    # where a gradient is recorded, which would keep every chunk for backward anyway.
    by_chunks = (
        b._strategy == "concat" and b._dist is None and b._tensors is None and not b._lazy_requires_grad
        and not integers and _is_builtin(reduction)
    )

    def chunks(i: int) -> Any:
        read = lambda start, stop: b._flat_range(i, start, stop)  # noqa: E731
        return chunks_of(b._shapes[i].numel(), chunk_size(b._devices[i]), read)

    pieces = Pieces(
        get, b._offsets, keys if packs else None, views, b._plans, reduction.pack_dtype, chunks if by_chunks else None,
        kept_packs=_is_builtin(reduction),  # a library's partial may keep a view of its segment
    )

    callers: list[Any] = []

    def per_tensor(i: int) -> Any:
        # Under per_param and weighted, dim and the like apply to each tensor's own shape.
        # Built on first use: the concat strategy never needs it.
        if not callers:
            callers.append(per_tensor_caller(func, args, kwargs, b, cast=False, split_tensors=False))
            if callers[0] is NOT_HANDLED:
                raise ValueError(f"{func_name(func)}: an argument cannot be split tensor by tensor.")
        try:
            return callers[0](i)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            if type(e) not in (RuntimeError, TypeError, ValueError, IndexError):
                raise  # a subclass may take other arguments: as it is
            raise _strategies.per_tensor_error(
                func_name(func), b, i, e, lambda t: func(t, *args[1:], **kwargs)  # b is args[0]
            ) from e

    call = ReductionCall(
        func, args, kwargs, b, reduction, parse, pieces, per_tensor
    )
    return _strategies.reduce(call)


# How register_reduction calls each part: the parameters it is checked against.
_PART_PARAMETERS = {
    "partial": ("segment", "offset", "args"), "combine": ("states", "args"), "finalize": ("state", "args"),
    "parse": ("bundle", "func", "args", "kwargs"), "needs_elements": ("args",), "partials": ("tensors", "args"),
    "fused": ("bundle", "args"), "pack_dtype": ("dtype", "device"),
}


def _check_part(what: str, part: Any) -> None:
    # At registration, not at the first reduction, where a wrong signature would surface as
    # a bare TypeError from inside the library's own function.
    required = what in ("partial", "combine")
    if part is None and not required:
        return
    if not callable(part):
        raise TypeError(
            f"register_reduction: {what} must be a callable{'' if required else ' or None'}, got {part!r}."
        )
    who = f"register_reduction: {what} {getattr(part, '__name__', part)!r}"
    check_signature(part, _PART_PARAMETERS[what], who, what)


def register_reduction(
    funcs: Callable[..., Any] | Iterable[Callable[..., Any]],
    partial: Callable[[Any, int, ReduceArgs], Any],
    combine: Callable[[list[Any], ReduceArgs], Any],
    finalize: Callable[[Any, ReduceArgs], Any] | None = None,
    *,
    parse: Callable[..., Any] | None = None,
    needs_elements: Callable[[ReduceArgs], bool] | None = None,
    direct: bool = False,
    commutative: bool = False,
    partials: Callable[[list[Any], ReduceArgs], list[Any]] | None = None,
    partials_small: bool = True,
    fused: Callable[[Any, ReduceArgs], Any] | None = None,  # Any: bundle_type's bundles (see Reduction)
    pack_dtype: Callable[[torch.dtype, torch.device], torch.dtype] | None = None,
    bundle_type: type[ParameterBundle] = ParameterBundle,
) -> Reduction:
    """Declare a reduction over the concatenation as a monoid, and register it for `funcs`.

    `partial(segment, offset, args)` is the state of one non-empty segment of the
    concatenation: a tensor (`offset`: where it starts in the concatenation) or, with
    `commutative=True` (the order of elements does not matter), small tensors of one dtype
    and device from anywhere in the bundle, packed flat. `combine(states, args)` merges
    states associatively, `finalize(state, args)` makes the result (default: the state
    itself). `args` is the `ReduceArgs` that `parse(bundle, func, args, kwargs)` returns
    (default: accepts `dim=0/-1` and `keepdim`). `needs_elements(args)` says torch raises on
    an empty input. `direct=True` says `func` itself reduces a plain flat tensor the same way,
    so a tiny bundle may be reduced by one call on its concatenation. `partials(tensors, args)`
    may give the states of many tensors of one dtype and device in one call (for a
    commutative reduction, where no gradient is recorded): any number of states, one for
    all of them if it likes; `tensors` is kept with the bundle, so it must not be modified.
    With `partials_small=False` it gets only the tensors too long to be packed, and the small
    ones are packed and reach `partial` as usual.
    `fused(bundle, args)` may compute the whole result of a concat-strategy bundle at once
    (say, one GPU kernel for all its tensors), returning NotImplemented where it does not
    apply. `pack_dtype(dtype, device)` may name a wider dtype for the packed small tensors
    of a commutative reduction (the sums add float32 ones in float64, exactly). The per_param
    and weighted strategies come for free: they call `func` on each tensor. The reduction is
    registered in `bundle_type`'s table (by default ParameterBundle's, which its subclasses
    inherit; name your subclass to keep it out of everyone else's) and replaces what was there
    for `funcs`, as `implements` does. A part that cannot be called as above, and `partials` or
    `pack_dtype` without `commutative=True` (they would never be used), are refused here.

    Example:
        >>> import torch, modtensor as mt
        >>> # the sum of squares, as torch.Tensor.square().sum() would give on the concatenation
        >>> def sum_of_squares(x, dim=None, keepdim=False):
        ...     if torch.overrides.has_torch_function_unary(x):
        ...         return torch.overrides.handle_torch_function(sum_of_squares, (x,), x, dim=dim, keepdim=keepdim)
        ...     return x.square().sum()
        >>> _ = mt.register_reduction(
        ...     sum_of_squares,
        ...     partial=lambda t, offset, a: t.square().sum(),
        ...     combine=lambda states, a: torch.stack(states).sum(),
        ... )
        >>> b = mt.bundle([torch.ones(2), torch.full((3,), 2.0)])
        >>> float(sum_of_squares(b)), sum_of_squares(b.per_param()).tolist()
        (14.0, [2.0, 12.0])
    """
    funcs = _as_functions(funcs, "register_reduction")
    if not (isinstance(bundle_type, type) and issubclass(bundle_type, ParameterBundle)):
        raise TypeError(f"register_reduction: bundle_type must be ParameterBundle or a subclass, got {bundle_type!r}.")
    for what, part in dict(
        partial=partial, combine=combine, finalize=finalize, parse=parse, needs_elements=needs_elements,
        partials=partials, fused=fused, pack_dtype=pack_dtype,
    ).items():
        _check_part(what, part)
    for what, flag in (("direct", direct), ("commutative", commutative), ("partials_small", partials_small)):
        if not isinstance(flag, bool):
            raise TypeError(f"register_reduction: {what} must be True or False, got {flag!r}.")
    if not commutative and (partials is not None or pack_dtype is not None):
        # Both serve packed or grouped tensors, which only a commutative reduction gets:
        # without it they would be silently left unused.
        given = "partials" if partials is not None else "pack_dtype"
        raise ValueError(
            f"register_reduction: {given} is used only by a commutative reduction (small tensors "
            "from anywhere in the bundle reduced together); pass commutative=True if the order "
            f"of the elements does not matter, or leave {given} out."
        )
    reduction = Reduction(
        parse=parse or parse_dim_keepdim,
        partial=partial,
        combine=combine,
        finalize=finalize or (lambda state, args: state),
        needs_elements=needs_elements or (lambda args: False),
        direct=direct,
        commutative=commutative,
        partials=partials,
        partials_small=partials_small,
        fused=fused,
        pack_dtype=pack_dtype,
    )

    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not args or not is_bundle(args[0]) or kwargs.get("out") is not None:
            return NOT_HANDLED
        return run_reduction(func, args, without_none_out(kwargs), args[0], reduction)

    bundle_type.implements(funcs)(handler)
    return reduction

"""Bundle-with-bundle reductions: dot products, distances, cosine similarity, losses, equality.

The other operand is a bundle of the same structure or a flat `(N,)` tensor (a 0-d tensor
where torch broadcasts one). Each reduction is a monoid over pairs of tensors, like the
one-bundle reductions, so every strategy applies to it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from modtensor import _multitensor, _strategies
from modtensor._bundle import ParameterBundle, is_bundle
from modtensor._dispatch import NOT_HANDLED, concatenated, copy_is_cheap, func_name, remember_direct
from modtensor._distributed import refuse
from modtensor._errors import UnsupportedOperationError
from modtensor._kernels import (
    by_rows, diff_l2_norm, diff_p_norm, diff_squares, narrow_cosine, planned_distance, power_sum, sum_of_squares, wide_dot,
    wide_norm,
)
from modtensor._pointwise import (
    _operand_range, _piece_getter, check_same_structure, map_elementwise, per_tensor_caller,
)
from modtensor._extrema import _extremum, _kept, records
from modtensor._reduce_common import (
    _LOW_PRECISION, _acc_dtype, _bind, _cast, _partial_dtype, _real, _stack, check_dim, quiet_count, root_of_sum,
    takes_powers,
)
from modtensor._selection import chunk_size, chunks_of, flat_views
from modtensor._strategies import Pieces, Reduction, ReduceArgs, ReductionCall, may_pack

__all__ = ["PAIRWISE_FUNCTIONS"]

_T = torch.Tensor
# Pairs of tensors from this many elements are read by chunks by torch.dist: their difference
# made whole leaves the caches. Below, the chunks' calls cost more than they save (1 thread,
# against the whole difference: ResNet-50's distance by chunks from 2**18 elements took 10.1
# against 8.2 ms, 20.5 against 19.0 with p=1; GPT-2's, 38.6M elements in one tensor, 95 against
# 152 ms with p=1).
DIST_CHUNK_NUMEL = 1 << 22


def _dtype_of(x: Any) -> torch.dtype:
    return x._dtype if is_bundle(x) else x.dtype  # a bundle's: its concatenation's


def _operands(
    name: str, first: Any, second: Any, by_chunks: bool | Callable[[int], bool] = False
) -> tuple[ParameterBundle, Pieces, torch.dtype, Exception | None] | Any:
    """Pair the two operands tensor by tensor: `(reference bundle, pieces, dtype, problem)`.

    Pairs of long tensors are read by chunks (see `_pair_chunks`) where an operand is computed
    on demand, or with `by_chunks` (a reduction whose torch kernel makes temporaries; a
    function of the tensor's index where that holds of some tensors only).

    `problem` is why the operands do not pair, where that is known of this rank's shards
    alone (a distributed operand): their shapes, or a plain tensor's length against them, may
    differ from the other ranks', so `_run` raises it in the exchange, where every rank stops,
    rather than here, where the other ranks would wait for this one.
    """
    ref = first if is_bundle(first) else second
    if any(is_bundle(x) and x._dist is not None for x in (first, second)):
        problem = _unpaired_shards(name, ref, first if ref is second else second)
        if problem is not None:
            return _unpaired(ref, problem)
    getters = [_piece_getter(x, ref, name) for x in (first, second)]
    if any(g is NOT_HANDLED or g is None for g in getters):
        return NOT_HANDLED
    chunks = _pair_chunks(ref, first, second, by_chunks)
    keys = _pack_keys(ref, first, second)
    # A plan is a function of the offsets and keys alone: with ref's keys, ref keeps it
    # (working it out cost ResNet-50's distance 0.2 ms a call). Apart from ref's own plans,
    # which a bundle mixing integers and floats makes with other keys (see _extend).
    plans = ref._plans.setdefault("pairs' plans", {}) if keys is ref._keys else None
    pieces = Pieces(lambda i: (getters[0](i), getters[1](i)), ref._offsets, keys, plans=plans, chunks=chunks)
    return ref, pieces, torch.promote_types(_dtype_of(first), _dtype_of(second)), None


def _unpaired(ref: ParameterBundle, problem: Exception) -> tuple[Any, ...]:
    """`_operands` of operands that do not pair: their pieces are never read, as `_run`
    raises `problem` first."""

    def get(i: int) -> Any:
        raise problem

    return ref, Pieces(get, ref._offsets), ref._dtype, problem


def _unpaired_shards(name: str, ref: ParameterBundle, other: Any) -> Exception | None:
    """Why `other` does not pair with this rank's shards of `ref`, a distributed bundle; None
    where it does: a bundle of the same structure, or a flat tensor of this rank's length."""
    if is_bundle(other):
        try:
            check_same_structure(name, ref, other)
        except ValueError as e:
            return e
        return None
    if isinstance(other, torch.Tensor) and other.dim() == 1 and other.shape[0] == ref._numel:
        return None
    if isinstance(other, torch.Tensor) and other.numel() != 1:
        return ValueError(
            f"{name}: cannot pair {ref.describe()} ({ref._numel} elements on this rank) with a "
            f"tensor of shape {tuple(other.shape)}: a plain tensor pairs with a distributed "
            f"bundle's shards as a flat tensor of this rank's length ({ref._numel},)."
        )
    try:  # a scalar (a (1,) tensor is one on the ranks whose shards are not one element long)
        refuse(
            name, ref,
            "a scalar operand is broadcast by the fallback, which would compute it on this "
            "rank's shards alone,",
        )
    except UnsupportedOperationError as e:
        return e


def _pair_chunks(
    ref: ParameterBundle, first: Any, second: Any, always: bool | Callable[[int], bool]
) -> Callable[[int], Any] | None:
    """`Pieces.chunks` for pairs: tensor i's pair as flat chunk pairs, where no gradient is
    recorded (autograd would keep every chunk) and chunks help: an operand computed on demand
    (`mse_loss(a * 2, b)`) would be made whole, and `always` (or `always(i)`) says torch's own
    kernel makes temporaries of a tensor's size (mse_loss's elementwise buffer)."""
    on_demand = any(is_bundle(x) and x._tensors is None for x in (first, second))
    if ref._strategy != "concat" or ref._dist is not None or records(first, second) or not (always or on_demand):
        return None
    by_chunks = (lambda i: True) if on_demand or not callable(always) else always

    def pair(i: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        x, y = (_operand_range(z, ref, i, start, stop, cast=True) for z in (first, second))
        whole = (stop - start,)
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape == whole):
            return None  # a broadcast scalar, or a tensor whose chunks are not views
        return x, y

    return lambda i: chunks_of(
        ref._shapes[i].numel(), chunk_size(ref._devices[i]), lambda start, stop: pair(i, start, stop)
    ) if by_chunks(i) else None


def _pack_keys(ref: ParameterBundle, first: Any, second: Any) -> Sequence[Any] | None:
    """Which pairs may be packed together (see `Pieces.map_segments`; every reduction here
    is commutative); None where none may. `ref`'s own keys where both are bundles of its
    dtypes (they group the pairs alike), so that its plans may keep the packing plan."""
    if not may_pack(first, second):
        return None
    if is_bundle(first) and is_bundle(second) and first._dtypes == second._dtypes == ref._dtypes:
        return ref._keys
    sides = []
    for x in (first, second):
        if is_bundle(x):
            sides.append(x._dtypes)
        elif x.dim() == 1 and x.shape[0] == ref._numel:  # a flat tensor, split into views
            sides.append((x.dtype,) * len(ref._names))
        else:  # a broadcast scalar: packing would repeat it once per tensor
            return None
    return list(zip(*sides, ref._devices))


def _run(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    reduction: Reduction,
    parse: Callable[[], ReduceArgs],
    operands: Any,
    tensor_op: Callable[..., Any] | None = None,
) -> Any:
    """`tensor_op`, where given, stands for `func` on each pair of tensors.

    `parse` checks the operands' dtypes: of a distributed bundle, this rank's (a rank without
    tensors has the default dtype), so it runs in the exchange across the ranks, where an
    error on some ranks stops them all (see `_across_ranks`); elsewhere, first. So does a
    distributed pair's problem of shapes (see `_operands`).
    """
    if operands is NOT_HANDLED:
        return NOT_HANDLED
    ref, pieces, _, problem = operands
    if problem is not None:
        fail = _raiser(problem)
        return _strategies.reduce(ReductionCall(func, args, kwargs, ref, reduction, fail, pieces, fail))
    bundles = [x for x in (*args, *kwargs.values()) if is_bundle(x)]
    if all(x._dist is None for x in bundles):
        parsed = parse()
        parse = lambda: parsed  # noqa: E731
    if reduction.direct and copy_is_cheap(bundles, ref._strategy):
        if is_bundle(args[0]):
            remember_direct(args[0], func, args, kwargs)  # valid for any tiny pair of these kinds
        return func(*concatenated(args), **concatenated(kwargs))
    # Per tensor (per_param, weighted), each pair of tensors is compared as two vectors.
    per_tensor = per_tensor_caller(tensor_op or func, args, kwargs, ref, cast=False, flatten=True)
    call = ReductionCall(func, args, kwargs, ref, reduction, parse, pieces, _naming(per_tensor, func, ref))
    return _strategies.reduce(call)


def _raiser(problem: Exception) -> Callable[..., Any]:
    def raise_it(*args: Any) -> Any:
        raise problem

    return raise_it


def _naming(per_tensor: Callable[[int], Any], func: Callable[..., Any], ref: ParameterBundle) -> Callable[[int], Any]:
    """`per_tensor`, whose errors name the function, the tensor and the bundle.

    A pair is reduced in its own dtypes, which torch may refuse where the concatenation's
    are fine (a bool tensor in a float bundle: torch.dot has no bool kernel).
    """

    def call(i: int) -> Any:
        try:
            return per_tensor(i)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            raise type(e)(
                f"{func_name(func)}: {e} (tensor {ref.names[i]!r} of {ref.describe()}, reduced on its own "
                f"under the {ref.strategy!r} strategy; torch raises the same on that tensor alone)"
            ) from None

    return call


def _combine_sum(states: list[torch.Tensor], a: ReduceArgs) -> torch.Tensor:
    return _cast(_stack(states, _acc_dtype(a.dtype)).sum(), a.dtype)


# -- dot, vdot, inner, matmul of two vectors ---------------------------------------------------


def _sig_dot(input: Any, other: Any) -> Any:
    return input, other


def _sig_tensor(input: Any, tensor: Any) -> Any:  # torch.dot names its second `tensor`
    return input, tensor


_TENSOR_SECOND = (torch.dot, torch.Tensor.dot)


def _partial_dot(product: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype in _LOW_PRECISION and x.dtype == y.dtype and x.numel() == y.numel():
        return wide_dot(x.reshape(-1), y.reshape(-1))  # a 16-bit partial would round, or overflow
    return product(x.reshape(-1), y.reshape(-1))


def _make_dot(product: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    reduction = Reduction(
        parse=lambda *a: None,
        partial=lambda pair, offset, a: _partial_dot(product, *pair),
        combine=_combine_sum,
        direct=True, commutative=True,
    )

    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = func_name(func)
        first, second = _bind(_sig_tensor if func in _TENSOR_SECOND else _sig_dot, name, args, kwargs)
        if "matmul" in name and not (
            isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
            and first.dim() == 1 and second.dim() == 1
        ):
            return NOT_HANDLED  # vector @ matrix: only the concatenation can do it
        operands = _operands(name, first, second)
        if operands is NOT_HANDLED:
            return NOT_HANDLED

        def parse() -> ReduceArgs:
            dtypes = (_dtype_of(first), _dtype_of(second))
            if dtypes[0] != dtypes[1]:
                raise RuntimeError(
                    f"{name}: expected both operands to have the same dtype, got {dtypes[0]} and "
                    f"{dtypes[1]} (torch raises the same on the concatenations); cast one first."
                )
            _probe(product, name, operands[0], (operands[2], operands[2]))  # torch refuses bool
            return ReduceArgs(name, operands[2], operands[0]._numel)

        return _run(func, args, kwargs, reduction, parse, operands)

    return handler


# -- dist ----------------------------------------------------------------------------------------


def _sig_dist(input: Any, other: Any, p: Any = 2) -> Any:
    return input, other, p


def _partial_dist(pair: Any, offset: int, a: ReduceArgs) -> Any:
    x, y = pair
    if a.options.get("squares"):  # twice differentiable where a pair is equal (see _dist)
        return diff_squares(_cast(x, a.dtype), _cast(y, a.dtype)), None
    x, y = _cast(x, a.dtype), _cast(y, a.dtype)
    if a.options.get("powers"):  # twice differentiable where a pair is equal (see takes_powers)
        with torch.no_grad():
            norm = _pair_norm(x, y, a.options["p"])
        return power_sum(norm, a.options["p"], x, y), None
    return _pair_norm(x, y, a.options["p"]), _kept(pair, a)


def _pair_norm(x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    if p == 2:
        return diff_l2_norm(x, y)
    if x.dtype in _LOW_PRECISION and not math.isinf(p):
        # a 16-bit partial would round before the combine (see diff_l2_norm)
        return wide_norm(x, p, y)
    with quiet_count(x, p):
        return diff_p_norm(x, y, p)


def _combine_dist(states: list[Any], a: ReduceArgs) -> torch.Tensor:
    p = a.options["p"]
    values = [v for v, _ in states]
    real = _real(a.dtype)
    if a.options.get("squares") or a.options.get("powers"):
        return _cast(root_of_sum(values, real, p), real)
    if math.isinf(p):
        pairs = [pair for _, pair in states]
        return _extremum(values, pairs, p > 0, real, key=lambda pr: (pr[0] - pr[1]).abs())
    stacked = _stack(values, _acc_dtype(real))
    combined = stacked.sum() if p == 0 else torch.linalg.vector_norm(stacked, ord=p)
    return _cast(combined, real)


_DIST = Reduction(
    parse=lambda *a: None,
    partial=_partial_dist,
    combine=_combine_dist,
    needs_elements=lambda a: a.options["p"] < 0 or math.isinf(a.options["p"]),
    direct=True, commutative=True,
)


def _dist_by_chunks(first: Any, second: Any, p: Any) -> Callable[[int], bool]:
    """Which pairs of tensors torch.dist reads by chunks (see `_pair_chunks`) though both exist:
    its kernel and `vector_norm(a - b)` make the difference whole. From DIST_CHUNK_NUMEL
    elements, but not the L2 distances that diff_l2_norm takes by rows, a block at a time
    (more accurately than by the chunks' norms)."""

    def by_chunks(i: int) -> bool:
        ref = first if is_bundle(first) else second
        numel = ref._shapes[i].numel()
        if numel < DIST_CHUNK_NUMEL:
            return False
        dtype = torch.promote_types(_dtype_of(first), _dtype_of(second))
        return not (p == 2 and by_rows(numel, dtype, ref._devices[i]))

    return by_chunks


def _dist(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    first, second, p = _bind(_sig_dist, name, args, kwargs)
    if p == 2 and is_bundle(first) and is_bundle(second):  # one launch, on a GPU
        fused = _multitensor.distance(first, second)
        if fused is not None:
            return fused
    operands = _operands(name, first, second, by_chunks=_dist_by_chunks(first, second, p))
    if operands is NOT_HANDLED:
        return NOT_HANDLED

    def parse() -> ReduceArgs:
        _probe(torch.dist, name, operands[0], (_dtype_of(first), _dtype_of(second)), p=p)
        # Where autograd records, the root of the pairs' sums of squares, as for norms (see
        # _reductions._parse_norm): a pair of equal tensors (a layer left as the reference)
        # would make the second derivative NaN.
        squares = (
            p == 2 and not operands[2].is_complex and torch.is_grad_enabled()
            and any(isinstance(x, torch.Tensor) and x.requires_grad for x in (first, second))
        )
        powers = takes_powers(float(p), operands[2], records(first, second))
        options = {"p": float(p), "squares": squares, "powers": powers, "records": records(first, second)}
        return ReduceArgs(name, operands[2], operands[0]._numel, options=options)

    if type(p) in (int, float) and p == 2 and is_bundle(first) and is_bundle(second) and operands[3] is None:
        planned = planned_distance(first, second)  # (of two float bundles: nothing for parse to refuse)
        if planned is not None:
            return planned
    return _run(func, args, kwargs, _DIST, parse, operands)


def _dist_order(call: ReductionCall) -> float:
    """The p of a torch.dist call, for `_across_ranks`: from the arguments alone, so the same
    on every rank, even one whose parse fails on its own shards (their dtype)."""
    return float(_bind(_sig_dist, call.name, call.args, call.kwargs)[2])


# -- cosine similarity ---------------------------------------------------------------------------


def _sig_cosine(x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8) -> Any:
    return x1, x2, dim, eps


def _partial_cosine(pair: Any, offset: int, a: ReduceArgs) -> Any:
    # torch divides by the norms before it sums, so its products never overflow; a tensor's
    # dot product in float16 would (0.6 * 0.6 over 200k elements passes 65504): the partials
    # of 16-bit dtypes are made in float32, a long tensor's by blocks (a float32 copy of each
    # operand would be kept by autograd: twice the concatenations' memory). They are the norms'
    # squares, not the norms: a tensor whose norm is 0 (a zero bias) would make a gradient
    # penalty's second derivative NaN, where the concatenation's is finite.
    x, y = (t.reshape(-1) for t in pair)
    partials = narrow_cosine(x, y) if a.dtype in _LOW_PRECISION else None
    if partials is not None:
        return partials
    x, y = (_cast(t, torch.promote_types(a.dtype, torch.float32)) for t in (x, y))
    return torch.dot(x, y), _squares(x), _squares(y)


def _squares(x: torch.Tensor) -> torch.Tensor:
    return torch.vdot(x, x).real if x.is_complex() else sum_of_squares(x)


def _combine_cosine(states: list[Any], a: ReduceArgs) -> torch.Tensor:
    acc = _acc_dtype(a.dtype)
    dot = _stack([d for d, _, _ in states], acc).sum()
    eps = a.options["eps"]
    norms = []
    for j in (1, 2):
        norm = root_of_sum([s[j] for s in states], _real(a.dtype))
        # torch clamps the norms at eps outside autograd: the value is clamped, the
        # gradient is the unclamped norm's.
        norms.append(norm + (norm.clamp_min(eps) - norm).detach())
    return _cast(dot / (norms[0] * norms[1]), a.dtype)


_COSINE = Reduction(
    parse=lambda *a: None, partial=_partial_cosine, combine=_combine_cosine, direct=True, commutative=True
)


def _cosine_similarity(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    first, second, dim, eps = _bind(_sig_cosine, name, args, kwargs)
    ref = first if is_bundle(first) else second
    check_dim(dim, name, ref)
    operands = _operands(name, first, second)
    if operands is NOT_HANDLED:
        return NOT_HANDLED

    def parse() -> ReduceArgs:
        _probe(torch.cosine_similarity, name, ref, (_dtype_of(first), _dtype_of(second)), dim=0)
        return ReduceArgs(name, operands[2], ref._numel, options={"eps": eps})

    return _run(func, args, kwargs, _COSINE, parse, operands)


# -- losses: mse, l1, smooth_l1, huber -----------------------------------------------------------


def _sig_loss(
    input: Any, target: Any, size_average: Any = None, reduce: Any = None, reduction: str = "mean",
    weight: Any = None,
) -> Any:
    return input, target, size_average is not None or reduce is not None or weight is not None, reduction, {}


def _sig_smooth_l1(
    input: Any, target: Any, size_average: Any = None, reduce: Any = None, reduction: str = "mean",
    beta: float = 1.0,
) -> Any:
    return input, target, size_average is not None or reduce is not None, reduction, {"beta": beta}


def _sig_huber(input: Any, target: Any, reduction: str = "mean", delta: float = 1.0, weight: Any = None) -> Any:
    return input, target, weight is not None, reduction, {"delta": delta}


_PROBED: dict[tuple[Any, ...], torch.dtype] = {}


def _probe(
    op: Callable[..., torch.Tensor], name: str, ref: Any, dtypes: tuple[torch.dtype, torch.dtype], **kwargs: Any
) -> torch.dtype:
    """The dtype of `op` on operands of `dtypes`, or torch's own error where it refuses them.

    `op` runs on two-element tensors of those dtypes, where the bundle lives, once per kind
    (torch.dist of one complex element with p=0 warns that it discards an imaginary part):
    torch.dist refuses bool (it subtracts), cosine_similarity anything but real floats,
    l1_loss bool, huber_loss integers, mse_loss complex; l1_loss of complex is real.
    """
    device = ref._device
    key = (op, *dtypes, device.type, *kwargs.items())
    dtype = _PROBED.get(key)
    if dtype is None:
        if len(_PROBED) >= 1024:  # a scheduled delta, beta or p makes ever new keys
            _PROBED.clear()
        x, y = (torch.ones(2, dtype=d, device=device) for d in dtypes)
        try:
            dtype = op(x, y, **kwargs).dtype
        except Exception as e:
            raise type(e)(f"{name}: {e} ({ref.describe()}; torch raises the same on the concatenations)") from None
        _PROBED[key] = dtype
    return dtype


def _make_loss(loss: Callable[..., torch.Tensor], signature: Callable[..., Any]) -> Callable[..., Any]:
    def partial(pair: Any, offset: int, a: ReduceArgs) -> torch.Tensor:
        x, y = pair
        # A float16 tensor's sum passes 65504 long before its mean does (torch's mean loss
        # accumulates in float32): 16-bit partials are made in float32.
        dtype = _partial_dtype(a.options["input_dtype"])
        if dtype != a.options["input_dtype"]:
            y = _cast(y, dtype)
        return _unpinned(loss(_cast(x, dtype), y, reduction="sum", **a.options["loss_kwargs"]))

    @functools.wraps(loss)  # its name is the one errors give
    def tensor_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _unpinned(loss(*args, **kwargs))

    def combine(states: list[torch.Tensor], a: ReduceArgs) -> torch.Tensor:
        return _stack(states, _acc_dtype(a.dtype)).sum()  # cast after the division, in finalize

    def finalize(state: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
        return _cast(state / a.numel if a.options["mean"] else state, a.dtype)

    reduction_of = Reduction(
        parse=lambda *a: None,
        partial=partial,
        combine=combine,
        finalize=finalize,
        direct=True,
        commutative=True,
    )

    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = func_name(func)
        first, second, unusual, reduction, loss_kwargs = _bind(signature, name, args, kwargs)
        if unusual:
            return NOT_HANDLED  # legacy reduction flags or per-element weights: the fallback is exact
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(
                f"{name}: {reduction!r} is not a valid value for reduction; expect 'mean', 'sum' or 'none'."
            )
        if reduction == "none":
            return map_elementwise(func, types, args, kwargs)
        operands = _operands(name, first, second, by_chunks=True)
        if operands is NOT_HANDLED:
            return NOT_HANDLED
        ref, _, input_dtype, _ = operands

        def parse() -> ReduceArgs:
            dtypes = (_dtype_of(first), _dtype_of(second))
            dtype = _probe(loss, name, ref, dtypes, reduction=reduction, **loss_kwargs)
            options = {"loss_kwargs": loss_kwargs, "mean": reduction == "mean", "input_dtype": input_dtype}
            return ReduceArgs(name, dtype, ref._numel, options=options)

        return _run(func, args, kwargs, reduction_of, parse, operands, tensor_loss)

    return handler


def _unpinned(result: torch.Tensor) -> torch.Tensor:
    """The loss, without the whole-tensor buffer its storage may hold.

    torch's CPU mse_loss and smooth_l1_loss reduce into their elementwise buffer, so their
    0-d result keeps a tensor's size of storage alive; kept for every tensor until the
    combine, or in a per_param result, that is the model's size.
    """
    if torch.compiler.is_compiling():  # the compiler plans the graph's memory itself
        return result
    try:
        pinned = result.untyped_storage().nbytes() > result.numel() * result.element_size()
    except NotImplementedError:  # a torch.func transform's wrapper has no storage
        return result
    return result.clone() if pinned else result


# -- allclose and equal: Python bools, true only if every pair is ------------------------------


def _sig_allclose(input: Any, other: Any, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> Any:
    return input, other, rtol, atol, equal_nan


def _all_pairs(test: Callable[..., bool]) -> Reduction:
    # The combine stops at nothing: every pair is tested, then the verdicts are and-ed.
    return Reduction(
        parse=lambda *a: None,
        partial=lambda pair, offset, a: test(*pair, **a.options),
        combine=lambda states, a: all(states),
        direct=True, commutative=True,
    )


def _allclose_by_chunks(
    input: torch.Tensor, other: torch.Tensor, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False
) -> bool:
    """`torch.allclose` of two tensors, a chunk at a time where both are contiguous and of one
    shape (elementwise, so the same verdict): torch's isclose makes temporaries of a few times
    the tensor's size."""
    xs, ys = flat_views(input), flat_views(other)
    if input.shape != other.shape or len(xs) != len(ys):
        xs, ys = [input], [other]
    return all(torch.allclose(x, y, rtol, atol, equal_nan) for x, y in zip(xs, ys))


_ALLCLOSE = _all_pairs(_allclose_by_chunks)
_EQUAL = _all_pairs(torch.equal)


def _allclose(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    first, second, rtol, atol, equal_nan = _bind(_sig_allclose, name, args, kwargs)
    operands = _operands(name, first, second)
    if operands is NOT_HANDLED:
        return NOT_HANDLED
    options = {"rtol": rtol, "atol": atol, "equal_nan": equal_nan}
    parsed = ReduceArgs(name, torch.bool, operands[0]._numel, options=options)
    return _run(func, args, kwargs, _ALLCLOSE, lambda: parsed, operands, _allclose_by_chunks)


def _equal(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    name = func_name(func)
    first, second = _bind(_sig_dot, name, args, kwargs)
    if not isinstance(first, torch.Tensor) or not isinstance(second, torch.Tensor):
        return NOT_HANDLED
    ref = first if is_bundle(first) else second
    assert is_bundle(ref)
    # A distributed bundle's shapes are this rank's: the other ranks' may match, so their
    # mismatch is raised in the exchange (see `_operands`), not answered here alone.
    local = all(not is_bundle(x) or x._dist is None for x in (first, second))
    if local and ref.strategy == "concat" and first.shape != second.shape:
        return False
    if local and is_bundle(first) and is_bundle(second) and first._shapes != second._shapes:
        return NOT_HANDLED  # same length, different split: compare the concatenations
    operands = _operands(name, first, second)
    if operands is NOT_HANDLED:
        return NOT_HANDLED
    return _run(func, args, kwargs, _EQUAL, lambda: ReduceArgs(name, torch.bool, ref._numel), operands)


PAIRWISE_FUNCTIONS: dict[str, tuple[tuple[Any, ...], Callable[..., Any]]] = {
    "dot": ((torch.dot, _T.dot), _make_dot(torch.dot)),
    "vdot": ((torch.vdot, _T.vdot), _make_dot(torch.vdot)),
    "inner": ((torch.inner, _T.inner), _make_dot(torch.dot)),
    "matmul": ((torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__), _make_dot(torch.dot)),
    "dist": ((torch.dist, _T.dist), _dist),
    "cosine_similarity": ((F.cosine_similarity, torch.cosine_similarity), _cosine_similarity),
    "mse_loss": ((F.mse_loss,), _make_loss(F.mse_loss, _sig_loss)),
    "l1_loss": ((F.l1_loss,), _make_loss(F.l1_loss, _sig_loss)),
    "smooth_l1_loss": ((F.smooth_l1_loss,), _make_loss(F.smooth_l1_loss, _sig_smooth_l1)),
    "huber_loss": ((F.huber_loss,), _make_loss(F.huber_loss, _sig_huber)),
    "allclose": ((torch.allclose, _T.allclose), _allclose),
    "equal": ((torch.equal, _T.equal), _equal),
}

for _funcs, _handler in PAIRWISE_FUNCTIONS.values():
    ParameterBundle.implements(_funcs)(_handler)

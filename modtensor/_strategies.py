"""Strategies: what a reduction does with the per-tensor partials.

An op (see `_reductions.py`) says how to compute one tensor's partial state and how partial
states combine. A strategy decides what to do with them: `concat` combines them into the
result over the concatenation, `per_param` keeps one result per tensor, `weighted` weighs
the per-tensor results. Adding an op never touches a strategy and vice versa.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch

from modtensor._dispatch import BUNDLE_TYPES, NOT_HANDLED, check_signature, find_bundles, materialized
from modtensor._reduce_common import kept_empty, transformed

if TYPE_CHECKING:
    from modtensor._bundle import ParameterBundle

__all__ = [
    "PACK_LIMIT", "PACK_NUMEL", "PACK_SHARE", "Pieces", "Reduction", "ReduceArgs", "ReductionCall",
    "Strategy", "STRATEGIES", "Weights", "get", "may_pack", "own_options", "register_strategy", "strategies",
    "resolve_weights", "reduce", "with_empty_grads",
]

# A commutative reduction over the concatenation (a sum, not an argmax) is a monoid over any
# partition of its elements, not only over its tensors. Calling torch once per tensor costs a
# few microseconds of Python and dispatch each, more than copying a small tensor, so small
# tensors are copied into flat segments and reduced together. The copies are bounded: a
# segment holds at most PACK_LIMIT elements and 1% of the bundle (with its widened copy, where
# a reduction asks for one: see Reduction.pack_dtype), and only one exists at a time (packing
# is off while autograd records, which would keep every segment for backward).
PACK_NUMEL = 1 << 14  # tensors of at most this many elements are packed (64 KiB of float32)
PACK_LIMIT = 1 << 16  # elements in one packed segment (256 KiB of float32: cache-sized)
PACK_SHARE = 100  # and at most 1/PACK_SHARE of the bundle's elements


def may_pack(*operands: Any) -> bool:
    """True where small tensors of `operands` (bundles or tensors) may be packed: not while
    autograd records (it would keep every copy for the backward), nor in a compiled graph."""
    records = torch.is_grad_enabled() and any(x.requires_grad for x in operands)
    return not records and not torch.compiler.is_compiling() and not transformed()


# fnmatch, which torch.compile takes as a constant instead of tracing it (it cannot).
glob_match: Callable[[str, str], bool] = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call]
    fnmatch.fnmatchcase
)


@dataclass
class ReduceArgs:
    """A reduction call's arguments, parsed once and shared by partial, combine and finalize.

    Example:
        >>> import torch, modtensor as mt
        >>> mt.ReduceArgs("torch.sum", torch.float32, numel=10, keepdim=True)
        ReduceArgs(name='torch.sum', dtype=torch.float32, numel=10, keepdim=True, options={})
    """

    name: str
    dtype: torch.dtype  # what the concatenation computes in (the bundle's, or dtype=)
    numel: int
    keepdim: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reduction:
    """A reduction over the concatenation, written as a monoid over segments of it.

    `partial(segment, offset, args)` is one non-empty segment's state: a tensor (`offset` is
    where it starts in the concatenation), or, for a `commutative` reduction, small tensors
    from anywhere in the bundle packed flat. `combine(states, args)` merges states
    associatively (and, if `commutative`, in any order), `finalize(state, args)` turns the
    merged state into the result. `needs_elements(args)` is true where torch raises on an
    empty input (no identity). `direct` is true where the torch function computes the
    reduction of a flat tensor itself (tiny bundles then take one call on their
    concatenation). `mt.register_reduction` builds one and puts it in the dispatch table.

    Example:
        >>> import torch, modtensor as mt
        >>> count = mt.Reduction(
        ...     parse=lambda b, func, args, kwargs: mt.ReduceArgs("count", torch.int64, b.numel()),
        ...     partial=lambda t, offset, a: torch.tensor(t.numel()),
        ...     combine=lambda states, a: torch.stack(states).sum(),
        ... )
        >>> states = [count.partial(t, 0, None) for t in (torch.ones(3), torch.ones(2, 2))]
        >>> count.finalize(count.combine(states, None), None)
        tensor(7)
    """

    # The bundle parse and fused get is typed Any: a reduction registered for a subclass
    # (register_reduction's bundle_type=) gets that subclass's bundles, and may say so.
    parse: Callable[[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
    partial: Callable[[Any, int, ReduceArgs], Any]
    combine: Callable[[list[Any], ReduceArgs], Any]
    finalize: Callable[[Any, ReduceArgs], Any] = lambda state, args: state
    needs_elements: Callable[[ReduceArgs], bool] = lambda args: False
    # True where the torch function itself computes the reduction of a flat tensor, so that
    # a tiny bundle may be reduced by one call on its concatenation (see copy_is_cheap).
    direct: bool = False
    # True where the order of the elements does not matter (not argmax): small tensors may
    # then be packed together, wherever they stand (see Pieces.map_segments).
    commutative: bool = False
    # `partials(tensors, args)`: the states (any number) of several tensors of one dtype and
    # device at once (one torch call for many), for a commutative reduction where no gradient
    # is recorded. `tensors` (a TensorGroup) is kept with the bundle: not to be modified.
    partials: Callable[[list[Any], ReduceArgs], list[Any]] | None = None
    # Whether `partials` also gets the tensors small enough to be packed (False: those are
    # packed and reach `partial`, and `partials` gets the others).
    partials_small: bool = True
    # `fused(bundle, args)`: the whole result for a bundle of the concat strategy in one go
    # (one multi-tensor kernel on a GPU), or NotImplemented to take the per-tensor path.
    fused: Callable[[Any, ReduceArgs], Any] | None = None
    # `pack_dtype(dtype, device)`: the dtype that small tensors of `dtype` on `device`, packed
    # together, reach `partial` in (default: their own). The sums widen float32 packs to float64,
    # which makes them exact: a pack of norm-layer scales near 1 adds up to thousands, where one
    # float32 rounding is as large as the error of all of GPT-2's long tensors together.
    pack_dtype: Callable[[torch.dtype, torch.device], torch.dtype] | None = None


class TensorGroup(list):  # type: ignore[type-arg]
    """A bundle's own tensors of one dtype and device, as `partials` receives them.

    Kept with the bundle's plans (its tensors never change), so that a call walks no tensor
    in Python: after the model was read, each tensor touched again comes from cold caches
    (ResNet-50's norm: 0.3 ms of 5). `derived` keeps what a reduction works out from the
    tensors once, such as which of them are long. Not to be modified.
    """

    def __init__(self, tensors: Iterable[Any]) -> None:
        super().__init__(tensors)
        self.derived: dict[Any, Any] = {}


class Pieces(Sequence[tuple[Any, int, int]]):
    """`(operand, offset, numel)` per tensor, each operand made only when asked for.

    A strategy that walks the pieces once holds one tensor's operand at a time, which is
    what keeps reductions of on-demand bundles (`(b ** 2).sum()`) within one tensor's memory.
    `keys[i]` (the operand's dtypes and device), where given, lets `map_segments` pack small
    tensors of one key together (for commutative reductions only); None keeps one segment per
    tensor. `widen(dtype, device)`, where given, is the dtype packed tensors (keyed
    `(dtype, device)`) are converted to (see Reduction.pack_dtype). `chunks(i)`, where given,
    may read tensor i as flat `(chunk, start)` segments made one at a time, or return None
    to have it whole. `kept_packs=True`, with `plans`, says that no state `fn` returns is a
    view of its segment (as for the built-in reductions): packs of several tensors (not of
    pairs) are then copied into a buffer kept with the plans, which the next pack writes again.
    """

    def __init__(
        self,
        get: Callable[[int], Any],
        offsets: Sequence[int],
        keys: Sequence[Hashable] | None = None,
        views: bool = False,
        plans: dict[Any, Any] | None = None,
        widen: Callable[[torch.dtype, torch.device], torch.dtype] | None = None,
        chunks: Callable[[int], Iterable[tuple[Any, int]] | None] | None = None,
        kept_packs: bool = False,
    ) -> None:
        self._get, self._offsets, self._keys = get, offsets, keys
        self._chunks = chunks
        self._kept_packs = kept_packs and plans is not None
        self.views = views  # True where `get(i)` is a tensor that exists anyway (not on demand)
        self._plans = plans  # where the packing plan of these offsets and keys is kept
        self._widen = widen

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def operand(self, i: int) -> tuple[Any, int]:
        """Tensor i's operand and its offset in the concatenation."""
        return self._get(i), self._offsets[i]

    def nonempty(self) -> list[int]:
        """The indices of the tensors with elements."""
        return [i for i in range(len(self)) if self._offsets[i + 1] > self._offsets[i]]

    def map_segments(
        self,
        fn: Callable[[Any, int], Any],
        batch: Callable[[list[Any]], list[Any]] | None = None,
        batch_small: bool = True,
    ) -> list[Any]:
        """`fn(operand, offset)` for segments that together cover the non-empty tensors.

        Without keys a segment is one tensor, in order. With keys, small tensors of one key
        are gathered, wherever they stand, into flat copies of at most PACK_LIMIT elements
        (their offset is the first one's). Each operand is made just before its call and
        dropped just after it. `batch(tensors)`, where given and the operands are the
        bundle's own tensors (`views`), gives the results of the tensors reduced alone, one
        key at a time, in one call for many (such as `torch._foreach_norm`): of all of them,
        or with `batch_small=False` of those too long to be packed (the packs go to `fn`).
        """
        get, offsets = self._get, self._offsets
        if self._keys is None:
            if self._chunks is None:  # the common case, written out: a reduction of ResNet-50 reads 161
                return [fn(get(i), offsets[i]) for i in self.nonempty()]
            return [state for i in self.nonempty() for state in self._segments(fn, i)]
        results: list[Any] = []
        if batch is not None and self.views and batch_small:
            # One call takes the small tensors too: packing them would only copy them
            # (ResNet-50's amax: 4.4 -> 4.3 ms, 1 thread).
            for tensors in self._groups("groups", self._by_key):
                results.extend(batch(tensors))
            return results
        alone, packs = self._plan()
        if batch is not None and self.views:  # (not batch_small) the tensors alone in one call per key
            key = ("alone groups", *self._sizes())
            for tensors in self._groups(key, lambda: alone):
                results.extend(batch(tensors))
            alone = []
        for group in alone:
            if self._chunks is None:
                results.extend(fn(get(i), offsets[i]) for i in group)
                continue
            for i in group:
                results.extend(self._segments(fn, i))
        results.extend(fn(self._packed(run), offsets[run[0]]) for run in packs)
        return results

    def _segments(self, fn: Callable[[Any, int], Any], i: int) -> list[Any]:
        # Tensor i's states: of the whole tensor, or of each chunk that `chunks` reads of it.
        chunks = None if self._chunks is None else self._chunks(i)
        if chunks is None:
            return [fn(self._get(i), self._offsets[i])]
        states = []
        for chunk, start in chunks:
            states.append(fn(chunk, self._offsets[i] + start))
            del chunk  # not held while the next one is made
        return states

    def _groups(self, key: Hashable, indices: Callable[[], list[list[int]]]) -> list[TensorGroup]:
        # The tensors of each list of `indices()` as a TensorGroup, kept with the plans by `key`.
        groups = None if self._plans is None else self._plans.get(key)
        if groups is None:
            groups = [TensorGroup(map(self._get, group)) for group in indices()]
            if self._plans is not None:
                self._plans[key] = groups
        return groups

    def _by_key(self) -> list[list[int]]:
        # The non-empty tensors by key, kept with the packing plans.
        if self._plans is not None and "by key" in self._plans:
            return self._plans["by key"]  # type: ignore[no-any-return]
        keys = self._keys
        assert keys is not None
        groups: dict[Hashable, list[int]] = {}
        for i in self.nonempty():
            groups.setdefault(keys[i], []).append(i)
        by_key = list(groups.values())
        if self._plans is not None:
            self._plans["by key"] = by_key
        return by_key

    def _sizes(self) -> tuple[Any, ...]:
        # What the packing plan depends on besides the offsets and keys: whatever is kept for
        # a plan (its groups, its kept buffers) is keyed by it too.
        return (PACK_NUMEL, PACK_LIMIT, PACK_SHARE, self._widen)

    def _plan(self) -> tuple[list[list[int]], list[list[int]]]:
        # (the tensors reduced alone, by key; the runs of small ones packed together), made
        # once per bundle: the walk over every tensor costs as much as a reduction's Python.
        sizes = self._sizes()
        if self._plans is not None and sizes in self._plans:
            return self._plans[sizes]  # type: ignore[no-any-return]
        offsets, keys = self._offsets, self._keys
        assert keys is not None
        limits = {key: self._pack_limit(key) for key in set(keys)}
        alone: dict[Hashable, list[int]] = {}
        runs: dict[Hashable, tuple[list[int], int]] = {}  # per key: the tensors gathered, their numel
        packs: list[list[int]] = []
        for i in range(len(self)):
            n = offsets[i + 1] - offsets[i]
            limit = limits[keys[i]]
            if n > min(PACK_NUMEL, limit):
                alone.setdefault(keys[i], []).append(i)
            elif n:
                run, numel = runs.get(keys[i], ([], 0))
                if numel + n > limit:
                    packs.append(run)
                    run, numel = [], 0
                runs[keys[i]] = (run + [i], numel + n)
        packs.extend(run for run, _ in runs.values())
        plan = (list(alone.values()), packs)
        if self._plans is not None:
            self._plans[sizes] = plan
        return plan

    def _pack_limit(self, key: Any) -> int:
        # Elements in one segment of `key`: at most 1/PACK_SHARE of the bundle's, counting the
        # widened copy (made beside the segment) by its bytes.
        share = PACK_SHARE
        if self._widen is not None:
            dtype, device = key  # a bundle's key (pairs of bundles take no widening)
            wide = self._widen(dtype, device)
            if wide != dtype:
                share = int(share * (1 + wide.itemsize / dtype.itemsize))
        return min(PACK_LIMIT, self._offsets[-1] // share)

    def _packed(self, run: list[int]) -> Any:
        operands = [self._get(i) for i in run]
        if isinstance(operands[0], tuple):  # pairs of tensors: pack each side
            if len(run) == 1:
                return operands[0]
            return tuple(torch._C._nn.flatten_dense_tensors([o[k] for o in operands]) for k in range(len(operands[0])))
        if self._kept_packs and len(run) > 1:
            return self._into_kept(run, operands)
        # One C++ call flattens and copies them all: a Python reshape per tensor cost
        # ResNet-50's 108 small tensors 116 us against 48.
        segment = operands[0] if len(run) == 1 else torch._C._nn.flatten_dense_tensors(operands)
        return segment if self._widen is None else segment.to(self._widen(segment.dtype, segment.device))

    def _into_kept(self, run: list[int], operands: list[torch.Tensor]) -> torch.Tensor:
        # The pack copied into its segment of a buffer kept with the plans, one per key (of the
        # pack limit's size) and thread (each call writes it), each tensor into a place shaped
        # as it is: one C++ call that converts to the widened dtype as it copies. A new segment
        # and its widened copy were allocations (512 KiB) whose page faults cost more than the
        # copies: ResNet-50's sum after its long tensors, 1 thread, 115 small tensors: 571 us
        # against 355 (385 tensor by tensor).
        assert self._plans is not None and self._keys is not None
        buffers: dict[Hashable, torch.Tensor]
        places: dict[int, tuple[torch.Tensor, list[torch.Tensor]]]
        buffers, places = self._plans.setdefault(("kept packs", threading.get_ident(), *self._sizes()), ({}, {}))
        found = places.get(run[0])  # a run is known by its first tensor
        if found is None:
            key, first = self._keys[run[0]], operands[0]  # the key's dtype and device are first's
            buffer = buffers.get(key)
            if buffer is None:
                wide = first.dtype if self._widen is None else self._widen(first.dtype, first.device)
                buffer = buffers[key] = kept_empty(self._pack_limit(key), wide, first.device)
            segment = buffer[: sum(t.numel() for t in operands)]
            found = places[run[0]] = (segment, _places(segment, operands))
        segment, views = found
        try:
            torch._foreach_copy_(views, operands)
        except RuntimeError:
            # A tensor reshaped since, to the same size (`p.data = p.data.view(...)`, which the
            # bundle's check of sizes lets through, and a sum does not mind): shaped afresh.
            views = _places(segment, operands)
            torch._foreach_copy_(views, operands)
            places[run[0]] = (segment, views)
        return segment

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self._get(i), self._offsets[i], self._offsets[i + 1] - self._offsets[i]


def _places(segment: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # Each tensor's place in the segment, one after the other, shaped as the tensor.
    starts = itertools.accumulate((t.numel() for t in tensors), initial=0)
    return [segment[i : i + t.numel()].view(t.shape) for i, t in zip(starts, tensors)]


class ReductionCall:
    """Everything a strategy sees of one reduction call.

    `pieces` holds `(operand, offset, numel)` per tensor: the tensor itself, or a tuple of the
    tensor's operands for bundle-with-bundle reductions. `parsed` checks and parses the
    arguments for the concatenation (so `dim` must name its one dimension) on first use;
    `per_tensor(i)` calls the torch function on tensor i's operands alone, where `dim` and
    the like apply to that tensor's own shape. See `Strategy` for a strategy that uses it.

    Example:
        >>> import torch, modtensor as mt
        >>> class Describe(mt.Strategy):
        ...     name = "describe_call"
        ...     def reduce(self, call):
        ...         return call.name, [float(call.per_tensor(i)) for i in range(len(call.bundle.names))]
        >>> mt.register_strategy(Describe())
        >>> mt.bundle([torch.ones(2), torch.ones(3)], strategy="describe_call").sum()
        ('torch.Tensor.sum', [2.0, 3.0])
    """

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        bundle: ParameterBundle,
        reduction: Reduction,
        parse: Callable[[], Any],
        pieces: Pieces,
        per_tensor: Callable[[int], Any],
    ) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        self.bundle, self.reduction, self.pieces = bundle, reduction, pieces
        self.per_tensor = per_tensor
        self._parse = parse
        self._parsed: Any = None

    @property
    def parsed(self) -> Any:
        """The parsed `ReduceArgs`, or `NotImplemented` where only the fallback is exact: `reduce`
        then returns `NotImplemented` to send the call there."""
        if self._parsed is None:
            self._parsed = self._parse()
        return self._parsed

    @property
    def name(self) -> str:
        """torch's name for the function, for messages."""
        from modtensor._dispatch import func_name

        return func_name(self.func)


class Strategy:
    """Base class of strategies: a name, its options, and `reduce`.

    Subclass it and register an instance with `mt.register_strategy` to add a strategy.

    Example:
        >>> import torch, modtensor as mt
        >>> class MaxOverTensors(mt.Strategy):
        ...     name = "max_over_tensors"
        ...     def reduce(self, call):
        ...         results = [call.per_tensor(i) for i in range(len(call.bundle.names))]
        ...         return torch.stack(results).amax()
        >>> mt.register_strategy(MaxOverTensors())
        >>> b = mt.bundle([torch.ones(2), torch.full((3,), 5.0)], strategy="max_over_tensors")
        >>> float(b.sum())
        15.0
    """

    name: str = ""

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise TypeError for options this strategy does not take."""
        if len(options):  # not `if options`: torch.compile takes a mappingproxy as always true
            raise TypeError(f"strategy {self.name!r} takes no options, got {sorted(options)}.")

    def reduce(self, call: ReductionCall) -> Any:
        """Compute the reduction `call` under this strategy."""
        raise NotImplementedError


def _keepdim(result: Any, keepdim: bool) -> Any:
    if not keepdim:
        return result
    if isinstance(result, torch.Tensor):
        return result.reshape(1)
    return type(result)(tuple(r.reshape(1) for r in result))


class Concat(Strategy):
    """Combine the partials into the reduction over the explicit concatenation."""

    name = "concat"

    def reduce(self, call: ReductionCall) -> Any:
        b, red, parsed = call.bundle, call.reduction, call.parsed
        if parsed is NOT_HANDLED:
            return NOT_HANDLED
        many = red.partials
        states = call.pieces.map_segments(
            lambda operand, offset: red.partial(operand, offset, parsed),
            None if many is None else lambda tensors: many(tensors, parsed),
            red.partials_small,
        )
        if not states:
            # The empty concatenation is torch.empty(0): let torch give its own answer.
            args, kwargs = materialized(call.args), materialized(call.kwargs)
            if red.needs_elements(parsed):
                raise _empty_error(call, args, kwargs)(
                    f"{parsed.name}: {b.describe()} has no elements, and this reduction has no "
                    "identity (torch raises the same on torch.empty(0)). Check `b.numel() > 0` first."
                )
            return call.func(*args, **kwargs)
        return _keepdim(red.finalize(red.combine(states, parsed), parsed), parsed.keepdim)


def _empty_error(call: ReductionCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> type[Exception]:
    # The type of torch's exception on the empty concatenation: IndexError for argmax and
    # max(dim), RuntimeError for amax.
    try:
        call.func(*args, **kwargs)
    except (IndexError, ValueError) as e:
        return type(e)
    except Exception:
        pass
    return RuntimeError


def per_tensor_error(
    name: str, b: ParameterBundle, i: int, error: Exception, on: Callable[[torch.Tensor], Any]
) -> Exception:
    """`error`, which `on(tensor i of b)` raised, saying which function, tensor and bundle
    (torch's message names none of them: the tensor is one of many), and where that tensor's
    dtype is what torch refuses (`on` takes a float tensor of its dims), what would work."""
    dtype = b._dtypes[i]
    hint = ""
    if not (dtype.is_floating_point or dtype.is_complex):
        try:
            on(torch.zeros([2] * len(b._shapes[i])))
            hint = " (a floating point tensor would do: cast first, e.g. `b.float()`)"
        except Exception:
            pass  # the dtype is not what torch refuses: no cast would help
    return type(error)(
        f"{name} under the {b._strategy} strategy, on tensor {b._names[i]!r} ({dtype}) of "
        f"{b.describe()}: {error}{hint}"
    )


def _as_tensor(result: Any, device: torch.device) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else torch.tensor(result, device=device)


def _per_tensor_bundle(b: ParameterBundle, results: list[Any], dtype: torch.dtype) -> ParameterBundle:
    from modtensor._bundle import ParameterBundle

    tensors = [_as_tensor(r, device) for r, device in zip(results, b._devices)]
    return ParameterBundle.__new__(b._derived_class(), tensors, b.names, "concat", None, dtype, device=b._device)


class PerParam(Strategy):
    """Return the reduction of each tensor on its own, as a bundle with the same names."""

    name = "per_param"

    def reduce(self, call: ReductionCall) -> Any:
        b = call.bundle
        results = [call.per_tensor(i) for i in range(len(b.names))]
        if results and isinstance(results[0], tuple):
            parts = list(zip(*results))
            return type(results[0])(
                [_per_tensor_bundle(b, list(p), b.dtype) for p in parts]
            )
        if not results:
            # No tensor, no result; but the result's structure and dtypes are those torch
            # gives on one tensor: on the empty concatenation, or where that has no answer (no
            # identity: argmax, max(dim)), on one element.
            probe = None
            rest, kwargs = materialized(call.args[1:]), materialized(call.kwargs)  # other operands too
            for one in (b.materialize(), torch.zeros(1, dtype=b.dtype, device=b.device)):
                try:
                    probe = call.func(one, *rest, **kwargs)
                    break
                except (RuntimeError, IndexError, ValueError):
                    pass
            if isinstance(probe, tuple):
                return type(probe)([_per_tensor_bundle(b, [], _as_tensor(p, b.device).dtype) for p in probe])
            return _per_tensor_bundle(b, [], b.dtype if probe is None else _as_tensor(probe, b.device).dtype)
        return _per_tensor_bundle(b, results, b.dtype)


Weights = Union[None, Mapping[str, float], Callable[[str, torch.Tensor], float], Sequence[float]]


def _number(value: Any, what: str) -> float:
    # Any number float() takes (a NumPy scalar, a one-element tensor), but not a string: "1"
    # is a name gone astray, not a weight.
    if not isinstance(value, (str, bytes)) and value is not None:
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"weighted: {what} is {value!r}; weights are numbers.")


def resolve_weights(b: ParameterBundle, weights: Weights) -> list[float]:
    """One weight per tensor: numel by default, else from patterns, a callable or a list."""
    if weights is None:
        return [float(shape.numel()) for shape in b._shapes]
    if callable(weights):
        return [
            _number(weights(n, b._tensor(i)), f"the weight the callable gave tensor {n!r}")
            for i, n in enumerate(b.names)
        ]
    if isinstance(weights, Mapping):
        resolved, unmatched = [], []
        for n in b.names:
            # The name itself first: "w[0]" is a name, as a glob it would mean "w0".
            pattern = n if n in weights else next((p for p in weights if glob_match(n, p)), None)
            if pattern is None:
                unmatched.append(n)
                resolved.append(0.0)
                continue
            resolved.append(_number(weights[pattern], f"the weight of {pattern!r}"))
        if unmatched:
            raise ValueError(
                f"weighted: no weight for {unmatched} in {b.describe()}; patterns are "
                f"{list(weights)}. Add a '*' entry for the rest."
            )
        return resolved
    resolved = [_number(w, f"weight {i}") for i, w in enumerate(weights)]
    if len(resolved) != len(b.names):
        raise ValueError(f"weighted: {len(resolved)} weights for {len(b.names)} tensors ({b.describe()}).")
    return resolved


def check_weights(b: ParameterBundle) -> None:
    """Resolve a weighted bundle's weights once where it is made, so that a list of the wrong
    length, a name no pattern matches or a weight that is not a number raises there, not at
    its first reduction. A callable is left to the reductions: it may read on-demand tensors."""
    weights = b._options.get("weights")
    if weights is not None and not callable(weights):
        resolve_weights(b, weights)


def own_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a bundle keeps: its own copies of the dicts and lists in them (weights),
    so that the caller changing theirs later does not change the bundle's."""
    return {
        k: dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, list) else v
        for k, v in options.items()
    }


# torch functions whose first argument after the input is a number (an order, a quantile),
# not a dim: `torch.linalg.vector_norm(b, 3, keepdim=True)` reduces every element.
_NUMBER_FIRST = frozenset({
    torch.linalg.vector_norm, torch.linalg.norm, torch.quantile, torch.nanquantile,
    torch.Tensor.quantile, torch.Tensor.nanquantile,
})


def _has_dim(call: ReductionCall) -> bool:
    # A dim given by keyword, or an int (or ints) after the input: then keepdim keeps each
    # tensor's shape, as the per-tensor results are.
    if any(call.kwargs.get(k) is not None for k in ("dim", "axis")):
        return True
    return any(
        (isinstance(a, int) and not isinstance(a, bool))
        or (isinstance(a, (tuple, list)) and len(a) > 0 and all(isinstance(x, int) for x in a))
        for a in call.args[2 if call.func in _NUMBER_FIRST else 1:]
    )


def _whole(result: Any, shape: torch.Size, keepdim: bool) -> Any:
    """A tensor's full reduction shaped as the concatenation's, so that tensors of any ndim weigh together.

    With keepdim=True torch keeps the tensor's ndim of ones after the dims of the result's
    own (quantile's q): (2, 1, 1) for two quantiles of a (3, 4) weight, (2, 1) for a bias; the
    concatenation's is (2, 1). A 0-d tensor keeps none: its (2,) becomes (2, 1) too.
    """
    if isinstance(result, tuple):
        return type(result)([_whole(r, shape, keepdim) for r in result])
    if not isinstance(result, torch.Tensor):
        return result
    ndim = len(shape)
    if not ndim:
        return result.unsqueeze(-1) if keepdim else result
    lead = result.dim() - ndim
    if lead < 0 or any(d != 1 for d in result.shape[lead:]):
        return result
    return result.reshape(*result.shape[:lead], 1)


class Weighted(Strategy):
    """`sum_i w_i * op(t_i) / sum_i w_i` (or without the division, `normalize=False`).

    Options: `weights` (None for each tensor's numel, a mapping of names or glob patterns
    to floats where the first match wins, a callable `(name, tensor) -> float`, or one
    float per tensor) and `normalize` (default True). Tensors of weight 0 are skipped.
    """

    name = "weighted"

    def check_options(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - {"weights", "normalize"}
        if unknown:
            raise TypeError(f"strategy 'weighted' takes weights= and normalize=, got {sorted(unknown)}.")
        normalize = options.get("normalize", True)
        if not isinstance(normalize, bool):
            raise TypeError(f"weighted: normalize must be True or False, got {normalize!r}.")
        w = options.get("weights")
        if not (w is None or callable(w) or isinstance(w, (Mapping, Sequence))) or isinstance(w, (str, bytes)):
            raise TypeError(
                "weighted: weights must be None, a mapping of names or glob patterns to floats, a "
                f"callable (name, tensor) -> float, or a sequence of floats; got {type(w).__name__}."
            )
        if isinstance(w, Mapping):
            key = next((k for k in w if not isinstance(k, str)), None)
            if key is not None:
                raise TypeError(
                    f"weighted: the weights' keys are tensor names or glob patterns (str); got {key!r}. "
                    "For weights by position, pass a list of floats."
                )

    def reduce(self, call: ReductionCall) -> Any:
        b = call.bundle
        if not b.names:
            raise ValueError(
                f"{call.name}: {b.describe()} has no tensors, so there is nothing to weigh under the "
                "weighted strategy. Check `len(b.names) > 0` first."
            )
        weights = resolve_weights(b, b.options.get("weights"))
        if any(math.isnan(w) for w in weights):
            name = b.names[next(i for i, w in enumerate(weights) if math.isnan(w))]
            raise ValueError(f"{call.name}: the weight of tensor {name!r} of {b.describe()} is NaN.")
        if not any(weights):
            raise ValueError(f"{call.name}: all weights are zero for {b.describe()}; nothing to weigh.")
        if b.options.get("normalize", True) and sum(weights) == 0:
            raise ValueError(
                f"{call.name}: the weights of {b.describe()} sum to 0, and normalize=True divides "
                "by their sum; pass normalize=False for the plain weighted sum."
            )
        kept = [i for i, w in enumerate(weights) if w != 0]
        full = not _has_dim(call)
        # (keepdim given by keyword; given by position it follows a dim, so the call is no full reduction)
        keepdim = bool(call.kwargs.get("keepdim", call.kwargs.get("keepdims", False)))
        terms = [
            (weights[i], _whole(call.per_tensor(i), b._shapes[i], keepdim) if full else call.per_tensor(i))
            for i in kept
        ]
        if isinstance(terms[0][1], tuple):
            parts = zip(*(r for _, r in terms))
            return type(terms[0][1])([self._combine(call, [w for w, _ in terms], list(p)) for p in parts])
        return self._combine(call, [w for w, _ in terms], [r for _, r in terms])

    def _combine(self, call: ReductionCall, weights: list[float], results: list[Any]) -> torch.Tensor:
        b = call.bundle
        values = [_as_tensor(r, b.device) for r in results]
        if any(v.shape != values[0].shape for v in values):
            raise ValueError(
                f"{call.name}: under the weighted strategy each tensor's result must have one "
                f"shape, got {sorted({tuple(v.shape) for v in values})} for {b.describe()}: a dim "
                "applies to each tensor's own shape (kthvalue, topk and median with a dim, whose "
                "default is -1 for the first two). Use a full reduction, the per_param strategy, "
                "or the concatenation's: `b.with_strategy('concat')`."
            )
        # At least float32, whatever the default dtype: the weights are Python floats, and a
        # float16 sum of weighted terms would overflow where the per-tensor results do not.
        dtype = torch.promote_types(values[0].dtype, torch.float32)
        for v in values[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        device = b.device  # where a bundle's partials meet (see mt.bundle)
        total = sum(
            (w * v.to(device=device, dtype=dtype) for w, v in zip(weights, values)),
            torch.zeros(values[0].shape, dtype=dtype, device=device),
        )
        return total / sum(weights) if b.options.get("normalize", True) else total


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Concat(), PerParam(), Weighted())}
_BUILTIN_STRATEGIES = frozenset(STRATEGIES)


def get(name: str) -> Strategy:
    """Return the registered strategy `name`, or raise ValueError listing the valid ones."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown strategy {name!r}. Expect one of {tuple(STRATEGIES)}.") from None


def reduce(call: ReductionCall) -> Any:
    """Run `call` under its bundle's strategy; with a distributed operand, across its group."""
    bundles = find_bundles(call.args, call.kwargs)
    if any(getattr(x, "_dist", None) is not None for x in bundles):
        from modtensor._across_ranks import reduce as reduce_across_ranks

        return reduce_across_ranks(call)
    return with_empty_grads(get(call.bundle.strategy).reduce(call), bundles)


def with_empty_grads(result: Any, bundles: Sequence[Any]) -> Any:
    """`result` (a tensor, or a tuple of them), linked to the bundles' tensors that have no
    elements and require grad, as the concatenation's result is: each gets an empty gradient
    from it, not None. Bundles (per_param's results) and non-floating results are left as
    they are. The partials skip empty tensors, so nothing else links them.
    """
    if not torch.is_grad_enabled():
        return result
    empty = [t for x in bundles for t in _empty_and_trained(x)]
    if not empty:
        return result

    def link(r: Any) -> Any:
        if not isinstance(r, torch.Tensor) or isinstance(r, BUNDLE_TYPES) or not (r.is_floating_point() or r.is_complex()):
            return r
        # Subtracting 0 changes no value (-0.0 stays -0.0); its backward reaches the tensors.
        return r - sum(t.sum().to(device=r.device, dtype=r.dtype) for t in empty)

    if isinstance(result, tuple):
        return type(result)([link(r) for r in result])
    return link(result)


def _empty_and_trained(b: Any) -> list[torch.Tensor]:
    # Which tensors have no elements is structure, kept with the bundle's plans: the walk
    # over the offsets is paid once, not at every reduction.
    plans = getattr(b, "_plans", None)
    if plans is None or getattr(b, "_dist", None) is not None:
        return []  # (a distributed bundle's combine across ranks links its own)
    empty = plans.get("empty")
    if empty is None:
        offsets = b._offsets
        empty = plans["empty"] = tuple(i for i in range(len(offsets) - 1) if offsets[i] == offsets[i + 1])
    return [t for t in map(b._tensor, empty) if t.requires_grad]


def register_strategy(strategy: Strategy, *, replace: bool = False) -> None:
    """Add `strategy` to the strategies bundles can use, under `strategy.name` (a str).

    A name already registered is refused unless `replace=True` (registering an instance of
    the same class again, as a reloaded module does, replaces it too). The built-in
    strategies (`concat`, `per_param`, `weighted`) cannot be replaced: parts of the library
    (tiny bundles, the fused kernels) implement them directly. A strategy whose class does not
    define `reduce(self, call)` is refused.

    Example:
        >>> import modtensor as mt
        >>> "per_param" in mt.strategies()
        True
        >>> class Largest(mt.Strategy):
        ...     name = "largest_example"
        ...     def reduce(self, call):
        ...         return max(float(call.per_tensor(i)) for i in range(len(call.bundle.names)))
        >>> mt.register_strategy(Largest(), replace=True)
    """
    if not isinstance(strategy, Strategy) or not isinstance(strategy.name, str) or not strategy.name:
        raise TypeError(
            "register_strategy: expected a Strategy instance whose `name` is a non-empty str; got "
            f"{strategy!r}" + (f" named {strategy.name!r}." if isinstance(strategy, Strategy) else ".")
        )
    name = strategy.name
    # Checked here, not at the first reduction, which would raise a bare NotImplementedError
    # or TypeError from inside the strategy.
    if type(strategy).reduce is Strategy.reduce:
        raise TypeError(
            f"register_strategy: {type(strategy).__qualname__} ({name!r}) does not define "
            "reduce(self, call), which computes a reduction under it (see mt.Strategy)."
        )
    who = f"register_strategy: {type(strategy).__qualname__}.reduce"
    check_signature(strategy.reduce, ("call",), who, "reduce")
    if name in _BUILTIN_STRATEGIES:
        raise ValueError(
            f"register_strategy: {name!r} is a built-in strategy, which modtensor implements in "
            "places a replacement would not reach (tiny bundles, fused kernels); give yours "
            "another name."
        )
    existing = STRATEGIES.get(name)
    if existing is not None and not replace and not _same_class(existing, strategy):
        raise ValueError(
            f"register_strategy: a strategy named {name!r} is already registered "
            f"({type(existing).__module__}.{type(existing).__qualname__}); give yours another "
            "name, or pass replace=True to replace it for every bundle."
        )
    STRATEGIES[name] = strategy


def _same_class(a: Strategy, b: Strategy) -> bool:
    # By name: a reloaded module defines its classes again.
    return (type(a).__module__, type(a).__qualname__) == (type(b).__module__, type(b).__qualname__)


def strategies() -> tuple[str, ...]:
    """Return the names of the registered strategies.

    Example:
        >>> import modtensor as mt
        >>> mt.strategies()[:3]
        ('concat', 'per_param', 'weighted')
    """
    return tuple(STRATEGIES)

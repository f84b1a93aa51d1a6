"""ParameterBundle: many tensors that behave as their flattened concatenation."""

from __future__ import annotations

import copy
import difflib
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Union, cast

from typing_extensions import Self, TypeGuard

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from modtensor import _distributed, _source, _strategies
from modtensor._dispatch import DispatchTensor, TracedDispatch, func_name
from modtensor._errors import UnsupportedOperationError
from modtensor._reduce_common import transformed
from modtensor._strategies import Weights
from modtensor._typed_methods import TypedMethods

__all__ = ["ParameterBundle", "bundle", "is_bundle", "Selector", "Source"]

Selector = Union[str, Sequence[str], Callable[[str, torch.Tensor], bool], None]
Source = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[Any], "ParameterBundle"]

_SOURCE_COUNTS = _source.COUNTS
_UNINITIALIZED = (UninitializedParameter, UninitializedBuffer)  # of Lazy modules
_SOURCES = (
    "an nn.Module, a Mapping[str, Tensor] such as a state_dict, an iterable of tensors "
    "or of (name, tensor) pairs, or a ParameterBundle"
)


def _cat_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    if not dtypes:
        return torch.get_default_dtype()
    dtype = dtypes[0]
    if len(set(dtypes)) == 1:  # most models: promote_types(d, d) is d for every dtype
        return dtype
    # Every step, in order, repeats included: for the bit and float8 dtypes promote_types is
    # not a join (some orders raise where others do not), so skipping repeats could change it.
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _combine_device(devices: Sequence[torch.device]) -> torch.device:
    # Where results land, as in clip_grad_norm_: the first tensor's device; meta wins, since
    # a meta tensor's partial cannot be moved anywhere else.
    distinct = list(dict.fromkeys(devices))  # in order; a model has one or two
    for d in distinct:
        if d.type == "meta":
            return d
    return distinct[0] if distinct else torch.device("cpu")


_NBYTES = operator.attrgetter("nbytes")


def _caller(func: Callable[..., Any] | str | None) -> str:
    # What an error names: the torch function, the bundle's accessor, or the library.
    return func if isinstance(func, str) else "modtensor" if func is None else func_name(func)


def _more(others: int, what: str) -> str:
    return f" ({others} more {'tensor' if others == 1 else 'tensors'} {what})" if others else ""


def _format_shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class _BundleAPI:
    """Structure and methods of a bundle, shared by `ParameterBundle` and its traced twin.

    While torch.compile traces a function, `ParameterBundle(...)` makes a `_TracedBundle`
    (see `TracedDispatch`): the same attributes and methods below, without the tensor.
    """

    _tensors: tuple[torch.Tensor, ...] | None  # None while computed on demand (see lazy)
    _compute: Callable[[int], torch.Tensor] | None
    _compute_range: Callable[[int, int, int], torch.Tensor | None] | None
    _dtypes: tuple[torch.dtype, ...]
    _devices: tuple[torch.device, ...]
    _lazy_requires_grad: bool
    _names: tuple[str, ...]
    _shapes: tuple[torch.Size, ...]
    _offsets: tuple[int, ...]
    _keys: tuple[tuple[torch.dtype, torch.device], ...]  # which tensors may be packed together
    _on_one_device: bool
    _plans: dict[Any, Any]
    _options: Mapping[str, Any]
    _dtype: torch.dtype
    _device: torch.device
    _numel: int
    _left_out: tuple[str, ...]
    _strategy: str
    # How an on-demand bundle is computed: (func, args, kwargs, guard), for _kernels.fuse.
    _expr: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any] | None  # guard: _pointwise._Guard
    _dist: _distributed.Sharding | None = None  # this rank's shards of a bundle over a group
    # An op's result on a tiny bundle, computed on the concatenation: the tensors are views of it.
    _flat: torch.Tensor | None
    _flat_attrs: dict[str, Any] | None = None  # what _over_flat's results share
    _source: _source.ModuleSource | None = None  # the module it was made from, if any
    # The version counters of tensors computed on demand when `tensors` kept them: a bundle
    # computed from this one before then sees from them whether they were written since.
    _kept_versions: tuple[int, ...] = ()

    # -- structure -------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """The tensors' names, in order (`"0"`, `"1"`, ... for an iterable source).

        Example:
            >>> import torch, modtensor as mt
            >>> mt.bundle(torch.nn.Linear(2, 2)).names, mt.bundle([torch.ones(2), torch.ones(1)]).names
            (('weight', 'bias'), ('0', '1'))
        """
        return self._names

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The real tensors, in order; never copies. A bundle computed on demand (the result of
        an elementwise op) computes them here, once, and keeps them.

        Example:
            >>> import torch, modtensor as mt
            >>> w = torch.ones(3)
            >>> mt.bundle([w]).tensors[0] is w
            True
        """
        if self._tensors is None:  # computed on demand until now: compute and keep them
            self._tensors = tuple(self._tensor(i) for i in range(len(self._names)))
            self._kept_versions = tuple(map(version, self._tensors))
            self._compute = self._compute_range = None
            self._flat = None  # the kept tensors may now be given other data (`t.data = ...`)
            self._expr = None  # a snapshot now: fused chains must not read its inputs again
        return self._tensors

    @property
    def strategy(self) -> str:
        """The name of the strategy reductions use (`"concat"` by default).

        Example:
            >>> import torch, modtensor as mt
            >>> b = mt.bundle([torch.ones(2)])
            >>> b.strategy, b.per_param().strategy
            ('concat', 'per_param')
        """
        return self._strategy

    @property
    def options(self) -> Mapping[str, Any]:
        """The strategy's options (read-only).

        Example:
            >>> import torch, modtensor as mt
            >>> dict(mt.bundle({"w": torch.ones(2)}).weighted({"*": 1.0}, normalize=False).options)
            {'weights': {'*': 1.0}, 'normalize': False}
        """
        return self._options

    @property
    def requires_grad(self) -> bool:
        """True if any of the tensors requires grad; read-only (set it on the tensors).

        Example:
            >>> import torch, modtensor as mt
            >>> mt.bundle([torch.ones(2, requires_grad=True), torch.ones(1)]).requires_grad
            True
        """
        if self._tensors is None:
            return self._lazy_requires_grad
        return any(t.requires_grad for t in self._tensors)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        raise UnsupportedOperationError(
            f"Setting requires_grad on {self.describe()} would change its tensors; set it on "
            "the tensors themselves (`for t in b.tensors: t.requires_grad_(...)`)."
        )

    @property
    def group(self) -> Any:
        """The process group over which this bundle is sharded; None for a local bundle.

        A distributed bundle holds this rank's shards (see `mt.bundle(..., group=)`): its shape,
        tensors, elementwise and in-place ops are this rank's, its full reductions are global.

        Example:
            >>> import torch, torch.distributed as dist, modtensor as mt
            >>> mt.bundle([torch.ones(2)]).group is None
            True
            >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            >>> b = mt.bundle({"w": torch.ones(2, 3), "b": torch.zeros(2)}, group=dist.group.WORLD)
            >>> b.group is dist.group.WORLD, b.describe()
            (True, 'ParameterBundle of 2 tensors [w (2, 3), b (2,)] (shards of rank 0 of 1)')
            >>> float(b.mean())  # over every rank's shards (here, a group of one)
            0.75
            >>> dist.destroy_process_group()
        """
        return None if self._dist is None else self._dist.group

    def _derived_class(self) -> type[ParameterBundle]:
        # Bundles derived from this one (`.grad`, `derive`, an op's result) are of its class,
        # as torch's default __torch_function__ keeps a tensor subclass; while compiling, the
        # stand-in names the class it stands for. They are made by `ParameterBundle.__new__`
        # itself, given that class: a subclass's own __new__ (and __init__) may take other
        # arguments, so, as torch's as_subclass, they are not called.
        return type(self) if isinstance(self, ParameterBundle) else self._owner  # type: ignore[attr-defined]

    def _carry(self, derived: ParameterBundle, same_tensors: bool = False) -> Self:
        # A bundle derived from a distributed one holds the same ranks' shards, so its
        # reductions run over the same group; only the same tensors keep their parameters.
        if self._dist is not None:
            derived._dist = self._dist if same_tensors else self._dist.derived()
        if same_tensors:
            derived._source = self._source
        return cast(Self, derived)  # of this bundle's class: see _derived_class

    @property
    def left_out(self) -> tuple[str, ...]:
        """Names a derived bundle had to leave out (e.g. tensors without a gradient in `b.grad`).

        Example:
            >>> import torch, modtensor as mt
            >>> lin = torch.nn.Linear(2, 2)
            >>> lin.bias.sum().backward()
            >>> mt.bundle(lin).grad.left_out
            ('weight',)
        """
        return self._left_out

    @property
    def grad(self) -> Self | None:
        """The bundle of the tensors' gradients, same names; None if no tensor has one.

        Tensors without a gradient are left out and named in `b.grad.left_out`. A distributed
        bundle's is never None (other ranks' tensors may have gradients): an empty bundle then.

        Example:
            >>> import torch, modtensor as mt
            >>> lin = torch.nn.Linear(2, 2)
            >>> lin.weight.sum().backward()
            >>> g = mt.bundle(lin).grad
            >>> g.names, g.left_out, float(g.norm())
            (('weight',), ('bias',), 2.0)
        """
        if self._dist is not None and self._dist.sources is not None:  # DTensor parameters
            return cast(Self, _distributed.grad(cast(ParameterBundle, self)))
        self._check_held("ParameterBundle.grad")  # the old tensors' gradients would be stale
        named = [(n, t.grad) for n, t in zip(self._names, self.tensors) if t.grad is not None]
        if not named and self._dist is None:
            return None
        left_out = tuple(n for n, t in zip(self._names, self.tensors) if t.grad is None)
        return self._carry(ParameterBundle.__new__(
            self._derived_class(), [g for _, g in named], [n for n, _ in named], self._strategy,
            self._options, self._dtype, left_out, self._device,
        ))

    @grad.setter
    def grad(self, value: Any) -> None:
        raise UnsupportedOperationError(
            f"Setting .grad on {self.describe()} would change its tensors' gradients; use "
            "`model.zero_grad()` or set them on the tensors (`for t in b.tensors: t.grad = None`)."
        )

    @property
    def data(self) -> Self:
        """The bundle of the tensors' `.data` (detached aliases, same names).

        Example:
            >>> import torch, modtensor as mt
            >>> d = mt.bundle({"w": torch.ones(2, requires_grad=True)}).data
            >>> d.names, d.requires_grad
            (('w',), False)
        """
        self._check_held("ParameterBundle.data")
        return self.derive([t.data for t in self.tensors])

    @data.setter
    def data(self, value: Any) -> None:
        raise UnsupportedOperationError(
            f"Setting .data on {self.describe()} would replace its tensors' data; copy the values "
            "in with `with torch.no_grad(): b.copy_(value)` (a flat tensor or a bundle of the same "
            "structure), or set `.data` on the tensors themselves."
        )

    def _tensor(self, i: int) -> torch.Tensor:
        # Tensor i alone. Ops that walk a bundle one tensor at a time use this rather than
        # `tensors`, so a bundle computed on demand never holds all its tensors at once.
        if self._tensors is not None:
            return self._tensors[i]
        if self._compute is None:  # an op's result kept flat (_over_flat)
            assert self._flat is not None
            return self._flat[self._offsets[i]:self._offsets[i + 1]].view(self._shapes[i])
        return self._compute(i)

    def _check_unchanged(self, func: Callable[..., Any] | str | None) -> None:
        # The offsets, element count and dtype were read from the tensors when the bundle was
        # made. After `p.data = p.data[:100]` (pruning) or `model.double()` every op would use
        # stale ones, and a mean would divide by the old count, silently. Bytes per tensor
        # compare sizes and dtypes at once, at about 70 ns a tensor (11 us for ResNet-50).
        tensors = self._tensors
        if tensors is None or self._dist is not None:  # results of ops; shards (FSDP swaps them)
            return
        src = self._source
        if src is not None and src.seen != _SOURCE_COUNTS[src.slot]:  # src.stale(), written out
            self._check_source(func, tensors)
        expected = self._plans.get("nbytes")
        if expected is None:
            expected = self._plans["nbytes"] = tuple(
                s.numel() * d.itemsize for s, d in zip(self._shapes, self._dtypes)
            )
        try:
            current = tuple(map(_NBYTES, tensors))
        except RuntimeError:  # a sparse tensor has no nbytes
            current = tuple(t.numel() * t.element_size() for t in tensors)
        if current == expected:
            return
        changed = [
            (name, shape, dtype, t)
            for name, shape, dtype, t in zip(self._names, self._shapes, self._dtypes, tensors)
            if t.shape != shape or t.dtype != dtype
        ]
        if not changed:  # a tensor type whose nbytes is not numel * itemsize
            return
        name, shape, dtype, t = changed[0]
        raise RuntimeError(
            f"{_caller(func)}: {self.describe()} was made when its tensor {name!r} was "
            f"{_format_shape(shape)} {dtype}; it is now {_format_shape(t.shape)} {t.dtype}"
            f"{_more(len(changed) - 1, 'changed too')}. "
            "A bundle keeps the sizes and dtypes its tensors had when it was made "
            "(`p.data = ...`, pruning, `model.half()` or `.double()` change them), so its "
            "results would be wrong. Make a new bundle after the change: `mt.bundle(model)`."
        )

    def _apart(self) -> tuple[int, ...]:
        # The tensors torch treats apart: sparse and other non-strided layouts (torch cannot
        # reshape them, so their concatenation does not exist) and inference tensors (outside
        # inference mode torch records no graph through their views). Found once per bundle:
        # the usual bundle has none, and an op pays one dict lookup for it.
        found: tuple[int, ...] | None = self._plans.get("apart")
        if found is None:
            if self._tensors is None:  # computed on demand: from tensors that were checked
                return ()
            found = self._plans["apart"] = tuple(
                i for i, t in enumerate(self._tensors) if t.layout != torch.strided or t.is_inference()
            )
        return found

    def _check_strided(self, func: Callable[..., Any] | str | None) -> None:
        # A sparse tensor in the concatenation would fail deep inside the op with torch's
        # "reshape is not implemented for sparse tensors", which names neither it nor a way out.
        tensors = self._tensors or ()
        odd = [(self._names[i], tensors[i].layout) for i in self._apart() if tensors[i].layout != torch.strided]
        if odd:
            name, layout = odd[0]
            raise RuntimeError(
                f"{_caller(func)}: tensor {name!r} of {self.describe()} has layout {layout}"
                f"{_more(len(odd) - 1, 'are not strided either')}; torch cannot reshape such a "
                "tensor, so the concatenation this op reads cannot be made (`torch.cat([t.reshape(-1) "
                f"...])` raises too). Bundle a dense copy instead (`t.to_dense()`, e.g. "
                f"`mt.bundle({{..., {name!r}: t.to_dense()}})`), or take per-tensor results with "
                "`b.per_param()`; in-place ops write each tensor as it is."
            )

    def _detach_inference(self, copy: bool = False) -> Self:
        # Outside inference mode torch records no graph through an inference tensor's views, so
        # the concatenation (of `t.reshape(-1)`) does not require grad through it, where an op
        # on t itself would save it for backward and raise. The same bundle, such tensors
        # detached; this one where none of them requires grad. With `copy`, every inference
        # tensor is read from a copy: an op whose other operand requires grad saves this one
        # for backward, which torch cannot do with an inference tensor (the concatenation, a
        # copy itself, it can).
        tensors = list(self._tensors or ())
        apart = [i for i in self._apart() if tensors[i].is_inference() and (copy or tensors[i].requires_grad)]
        if not apart:
            return self
        for i in apart:
            tensors[i] = tensors[i].detach().clone() if copy else tensors[i].detach()
        return self.derive(tensors)

    def _check_held(self, where: str) -> None:
        # _check_unchanged for the accessors that read the tensors outside dispatch; not for
        # the stand-ins of torch.compile, whose tensors are traced, not held.
        if isinstance(self, DispatchTensor):
            self._check_unchanged(where)

    def _check_source(self, func: Callable[..., Any] | str | None, tensors: tuple[torch.Tensor, ...]) -> None:
        assert self._source is not None
        replaced = self._source.replaced(self._names, tensors)
        if not replaced:
            return
        name, what = replaced[0]
        raise RuntimeError(
            f"{_caller(func)}: {self.describe()} was made from a module whose tensor {name!r} {what}"
            f"{_more(len(replaced) - 1, 'too')} (`load_state_dict(..., assign=True)`, "
            "`module.weight = nn.Parameter(...)`, `model.fc = nn.Linear(...)`). The bundle holds "
            "the tensors it was made with, so its results would no longer be the module's. Make "
            "a new bundle after the change: `mt.bundle(model)`; to go on with the old tensors, "
            "bundle them by name: `mt.bundle(dict(b.items()))`."
        )

    def _flat_range(self, i: int, start: int, stop: int) -> torch.Tensor | None:
        # Elements [start, stop) of tensor i flattened, without making the rest of it; None
        # where that is impossible (a non-contiguous tensor, an op that is not elementwise).
        # Order statistics read on-demand bundles this way, a chunk at a time.
        if self._tensors is not None:
            t = self._tensors[i]
            return t.reshape(-1)[start:stop] if t.is_contiguous() else None
        if self._compute is None and self._flat is not None:  # an op's result kept flat (_over_flat)
            return self._flat[self._offsets[i] + start:self._offsets[i] + stop]
        return None if self._compute_range is None else self._compute_range(i, start, stop)

    def items(self) -> tuple[tuple[str, torch.Tensor], ...]:
        """Return `(name, tensor)` pairs in order.

        Example:
            >>> import torch, modtensor as mt
            >>> [(n, tuple(t.shape)) for n, t in mt.bundle({"a": torch.ones(2)}).items()]
            [('a', (2,))]
        """
        return tuple(zip(self._names, self.tensors))

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Return a `{name: tensor}` dict of the real tensors, in order.

        Example:
            >>> import torch, modtensor as mt
            >>> list(mt.bundle([torch.ones(1), torch.ones(2)]).to_dict())
            ['0', '1']
        """
        return dict(zip(self._names, self.tensors))

    def derive(self, tensors: Sequence[torch.Tensor]) -> Self:
        """Return a bundle of `tensors` with this bundle's names, strategy and options.

        Example:
            >>> import torch, modtensor as mt
            >>> b = mt.bundle({"w": torch.ones(2)})
            >>> b.derive([torch.zeros(2)]).names
            ('w',)
        """
        return self._carry(
            ParameterBundle.__new__(
                self._derived_class(), tensors, self._names, self._strategy, self._options, self._dtype,
                device=self._device,
            )
        )

    def per_param(self) -> Self:
        """Return the same tensors under the `per_param` strategy.

        Reductions then return a bundle of per-tensor results with the same names, and `dim`
        applies to each tensor's own shape.

        Example:
            >>> import torch, modtensor as mt
            >>> b = mt.bundle({"w": torch.ones(2, 2), "b": torch.zeros(3)})
            >>> b.per_param().sum().to_dict()
            {'w': tensor(4.), 'b': tensor(0.)}
            >>> float(b.per_param().norm().max())  # the largest tensor norm
            2.0
        """
        return self.with_strategy("per_param")

    def weighted(self, weights: Weights = None, normalize: bool = True) -> Self:
        """Return the same tensors under the `weighted` strategy.

        A reduction then gives `sum_i w_i * op(t_i) / sum_i w_i` (without the division when
        `normalize=False`). `weights`: None (each tensor's numel: then the mean equals the
        concatenation's), a mapping of names or glob patterns to floats (first match wins;
        add `"*"` for the rest; a tensor's exact name wins over patterns), a callable
        `(name, tensor) -> float`, or one float per tensor. The bundle keeps its own copy of a
        weights dict or list; results are at least float32.

        Example:
            >>> import torch, modtensor as mt
            >>> b = mt.bundle({"w": torch.ones(3), "b": torch.zeros(1)})
            >>> float(b.weighted().mean())          # numel weights: the mean of all elements
            0.75
            >>> float(b.weighted({"*": 1.0}).mean())  # the mean of the per-tensor means
            0.5
        """
        return self.with_strategy("weighted", weights=weights, normalize=normalize)

    def with_strategy(self, name: str, **options: Any) -> Self:
        """Return the same tensors under another strategy (see `mt.strategies()`).

        Example:
            >>> import torch, modtensor as mt
            >>> mt.bundle([torch.ones(2)]).with_strategy("concat").strategy
            'concat'
        """
        same = self._as_strategy(name, options)
        if name == "weighted":
            _strategies.check_weights(cast(ParameterBundle, same))
        return same

    def _as_strategy(self, name: str, options: Mapping[str, Any]) -> Self:
        # with_strategy without its check of the weights, for operands dispatch converts to
        # another operand's strategy (whose weights were checked when it was made): resolving
        # weights by pattern costs about 1 us a tensor.
        if self._tensors is None:  # stay on demand (or flat: _compute is None then)
            same = self._derived_class()._on_demand(
                self._compute, cast(ParameterBundle, self), self._dtypes, self._lazy_requires_grad, name, options, self._compute_range
            )
            same._flat = self._flat
            return cast(Self, same)
        return self._carry(
            ParameterBundle.__new__(
                self._derived_class(), self._tensors, self._names, name, options, self._dtype, device=self._device
            ),
            same_tensors=True,
        )

    def materialize(self) -> torch.Tensor:
        """Return exactly `torch.cat([t.reshape(-1) for t in b.tensors])`, differentiable.

        This is the reference semantics, and the only place a full copy is made on purpose.

        Example:
            >>> import torch, modtensor as mt
            >>> mt.bundle([torch.ones(2), torch.zeros(1)]).materialize()
            tensor([1., 1., 0.])
        """
        self._check_held("ParameterBundle.materialize")
        return self._cat()

    def _cat(self, func: Callable[..., Any] | str = "ParameterBundle.materialize") -> torch.Tensor:
        if self._flat is not None:
            return self._flat.clone()
        if not self._names:
            return torch.empty(0, dtype=self._dtype, device=self._device)
        try:
            if self._tensors is not None and self._on_one_device:
                copied = _copied_flat(self._tensors, self._dtype, self._device)
                if copied is not None:
                    return copied
                if len(self._tensors) > 1:  # the same cat, in one call: 3.4 -> 2.0 us for a conv layer
                    return _flatten(self._tensors)
                return torch.cat([t.reshape(-1) for t in self._tensors])
            return torch.cat([self._tensor(i).reshape(-1).to(self._device) for i in range(len(self._names))])
        except RuntimeError:
            self._check_strided(func)  # a sparse tensor: say which
            raise

    def _concatenation(self, func: Callable[..., Any] | None = None) -> torch.Tensor:
        # The concatenation, for reading only: the result of an op on a tiny bundle is kept
        # flat, and is not copied again for the next op. The common case first, written out:
        # it is most of a small layer's `a - b`. Tiny bundles' fast lane skips dispatch and
        # its check of the tensors (_check_unchanged), so a changed count or dtype of the
        # concatenation (a cheaper sign) sends it there.
        if self._flat is not None:
            return self._flat
        tensors = self._tensors
        if tensors is not None and len(tensors) > 1 and self._on_one_device:
            try:  # _flatten, written out
                flat: torch.Tensor = torch._C._nn.flatten_dense_tensors(tensors)  # type: ignore[arg-type]
            except RuntimeError:
                self._check_strided(func)  # a sparse tensor: the tiny lane skips dispatch's check
                flat = torch.cat([t.reshape(-1) for t in tensors])  # under vmap: no batching rule
        else:
            flat = self._cat(func) if func is not None else self._cat()
        src = self._source
        if tensors is not None and (
            flat.numel() != self._numel or flat.dtype != self._dtype
            or (src is not None and src.seen != _SOURCE_COUNTS[src.slot])  # src.stale(), written out
        ):
            self._check_unchanged(func)
        return flat

    def _over_flat(self, flat: torch.Tensor, cls: type[ParameterBundle] | None = None) -> ParameterBundle:
        # Shaped and named like this bundle, its tensors views of `flat`, an op's (N,) result
        # on the concatenation, made on demand (most are never asked for). Written out, not
        # through _layout: chains on small layers make one per op. The attributes all such
        # results share are kept in one dict, which the results carry on (2.3 us a result,
        # made and freed; 4 through _layout). The result's __dict__ is a copy of that dict, its
        # own entries set in the copy: one block, where filling a new dict resizes it, and dict
        # stores, where setting attributes on a tensor takes the slow generic path.
        attrs = self._flat_attrs
        if attrs is None or attrs["_dtype"] != flat.dtype:
            dtypes = (flat.dtype,) * len(self._names)
            attrs = dict(
                _names=self._names, _shapes=self._shapes, _offsets=self._offsets, _devices=self._devices,
                _device=self._device, _on_one_device=self._on_one_device, _dtypes=dtypes, _dtype=flat.dtype,
                _keys=self._keys if dtypes == self._dtypes else tuple(zip(dtypes, self._devices)),
                _strategy=self._strategy, _options=self._options, _numel=self._numel, _left_out=(),
                _tensors=None, _expr=None, _compute=None, _compute_range=None,  # _tensor reads _flat
                _plans=None, _flat=None, _lazy_requires_grad=False,  # each result's own, set below
            )
            attrs["_flat_attrs"] = attrs
            self._flat_attrs = attrs
        result: ParameterBundle = torch.Tensor._make_wrapper_subclass(
            cls or self._derived_class(), (self._numel,), dtype=flat.dtype, device=self._device
        )
        own = attrs.copy()
        own["_plans"], own["_flat"], own["_lazy_requires_grad"] = {}, flat, flat.requires_grad
        result.__dict__ = own
        return result

    def split(self, vector: Any, *args: Any, **kwargs: Any) -> Self:
        """Return a bundle of views of a flat `(N,)` tensor, shaped and named like this bundle.

        This is the inverse of `materialize()`; torch's own `split(split_size)` is available
        as `b.materialize().split(...)`.

        Example:
            >>> import torch, modtensor as mt
            >>> b = mt.bundle({"w": torch.ones(2, 2), "b": torch.ones(1)})
            >>> v = b.split(torch.arange(5.0))
            >>> v.to_dict()["w"]
            tensor([[0., 1.],
                    [2., 3.]])
        """
        if args or kwargs or not isinstance(vector, torch.Tensor) or is_bundle(vector):
            raise TypeError(
                f"ParameterBundle.split takes one flat tensor of {self._numel} elements "
                f"(got {type(vector).__name__}); for torch's split by sizes use "
                "`b.materialize().split(...)`."
            )
        if vector.dim() != 1 or vector.shape[0] != self._numel:
            raise ValueError(
                f"ParameterBundle.split: expected a flat tensor of shape ({self._numel},) for "
                f"{self.describe()}, got shape {tuple(vector.shape)}."
            )
        views = [
            vector.narrow(0, start, end - start).view(shape)
            for start, end, shape in zip(self._offsets, self._offsets[1:], self._shapes)
        ]
        return self._carry(
            ParameterBundle.__new__(
                self._derived_class(), views, self._names, self._strategy, self._options, vector.dtype,
                device=vector.device,
            )
        )

    # -- text ------------------------------------------------------------------------------

    def describe(self, limit: int = 4) -> str:
        """Return a one-line description of the structure, used in error messages.

        Example:
            >>> import torch, modtensor as mt
            >>> mt.bundle({"w": torch.ones(2, 3), "b": torch.ones(2)}).describe()
            'ParameterBundle of 2 tensors [w (2, 3), b (2,)]'
        """
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"describe: limit is how many tensors to show, a count >= 0; got {limit!r}.")
        parts = [f"{n} {_format_shape(s)}" for n, s in zip(self._names[:limit], self._shapes)]
        if len(self._names) > limit:
            parts.append(f"... {len(self._names) - limit} more")
        where = "" if self._dist is None else f" {self._dist}"
        kind = self._derived_class().__name__  # a subclass's errors name it
        return f"{kind} of {len(self._names)} tensors [" + ", ".join(parts) + "]" + where

    def __repr__(self, *, tensor_contents: Any = None) -> Any:
        shown = list(self._names[:3]) + (["..."] if len(self._names) > 3 else [])
        dtype = str(self._dtype).replace("torch.", "")
        left_out = f", left_out={list(self._left_out)}" if self._left_out else ""
        return (
            f"{self._derived_class().__name__}({len(self._names)} tensors, {self._numel} elements, "
            f"dtype={dtype}, device={self._device}, strategy={self._strategy!r}, "
            f"names={shown}{left_out}{'' if self._dist is None else ', ' + str(self._dist)[1:-1]})"
        )

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        if not format_spec:
            return repr(self)
        # torch formats 0-d tensors only, and a bundle is 1-D: its concatenation would be
        # copied only for torch to raise this, without naming the bundle.
        raise TypeError(
            f"unsupported format string {format_spec!r} passed to {self.describe()} (a 1-D "
            "tensor, as its concatenation: torch formats 0-d tensors only). Format a number: "
            "`f'{b.item():.3f}'` for one element, or a reduction such as `b.mean().item()`."
        )

    def __dir__(self) -> list[str]:
        # torch's would list a copy of the concatenation's attributes (tab completion and an
        # AttributeError's "Did you mean" call it): a full copy, without the bundle's own.
        return sorted(set(dir(type(self))) | set(self.__dict__))

    def __copy__(self) -> Self:
        # copy.copy: a bundle of the same tensors, as a copy of a list of them holds them.
        return self.with_strategy(self._strategy, **self._options)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle and torch.save: a bundle again, of its tensors (which torch pickles as usual),
        # names, strategy and options. torch.Tensor's own would save the concatenation.
        if self._dist is not None:
            raise TypeError(
                f"pickle: {self.describe()} holds this rank's shards; save `b.to_dict()` per rank "
                "(or the model's state_dict) instead."
            )
        return _rebuild, (
            self._derived_class(), self.tensors, self._names, self._strategy, dict(self._options),
            self._dtype, self._left_out, self._device,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        # A bundle is a view of tensors it does not own: copying it copies the tensors, through
        # `memo`, so that a module deep-copied with a bundle of its parameters (an attribute)
        # gives a bundle of the copy's parameters, watching the copy.
        # (Views are cloned: a deep copy of one copies all of its base's storage.)
        made = self.derive([
            copy.deepcopy(t, memo) if t.is_leaf and t._base is None
            else t.detach().clone().requires_grad_(t.requires_grad)
            for t in self.tensors
        ])
        if self._source is not None:
            made._source = self._source.copied(memo)
        return made


# The shared methods stand in for torch.Tensor's (grad, data, split, __repr__) on purpose.
# TypedMethods is DispatchTensor, with the Tensor methods' results typed as bundles for mypy.
class ParameterBundle(_BundleAPI, TypedMethods):  # type: ignore[misc]
    """A bundle of tensors that behaves like `torch.cat([t.reshape(-1) for t in tensors])`.

    It is a `torch.Tensor` of shape `(N,)` (N the total number of elements) whose torch calls
    are dispatched tensor by tensor, so the concatenation is never built. Make one with
    `mt.bundle(...)`.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle({"w": torch.ones(2, 2), "b": torch.zeros(2)})
        >>> b.shape, b.names
        (torch.Size([6]), ('w', 'b'))
        >>> round(float(torch.mean(b)), 4)  # same as torch.cat([...]).mean()
        0.6667
    """

    __module__ = "modtensor"

    @staticmethod
    def __new__(
        cls,
        tensors: Sequence[torch.Tensor],
        names: Sequence[str],
        strategy: str = "concat",
        options: Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        left_out: Sequence[str] = (),
        device: torch.device | None = None,
    ) -> ParameterBundle:
        """`dtype` and `device` only serve a bundle of no tensors, which nothing else places
        (`torch.empty(0).cuda()` is on the GPU, so an empty bundle's `.cuda()` must be too);
        `left_out` names tensors a derived bundle (such as `b.grad`) had to leave out."""
        tensors = tuple(tensors)
        if len(tensors) != len(names):
            raise ValueError(f"ParameterBundle: {len(tensors)} tensors but {len(names)} names.")
        _check_names(names)
        try:
            self = cls._layout(
                names, [t.shape for t in tensors], [t.dtype for t in tensors], [t.device for t in tensors],
                strategy, options, dtype, left_out, device=device,
            )
        except (RuntimeError, AttributeError):
            _refuse_nested(names, tensors)  # torch's own error names neither it nor a way out
            raise
        self._tensors = tensors
        self._compute = None
        self._compute_range = None
        return self

    @classmethod
    def _layout(
        cls,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        dtypes: Sequence[torch.dtype],
        devices: Sequence[torch.device],
        strategy: str,
        options: Mapping[str, Any] | None,
        dtype: torch.dtype | None,
        left_out: Sequence[str],
        like: ParameterBundle | None = None,
        device: torch.device | None = None,
    ) -> ParameterBundle:
        _strategies.get(strategy).check_options(options or {})
        dtypes = tuple(dtypes)
        if like is not None:
            # Shaped and placed like `like` (an op's result): its offsets and device hold, and
            # its dtype too where the dtypes are its own (ResNet-50's `a - b`: 255 -> 60 us).
            same = dtypes == like._dtypes
            dtype = like._dtype if same else _cat_dtype(dtypes)
            device, offsets = like._device, like._offsets
        else:
            dtype = _cat_dtype(dtypes) if dtypes or dtype is None else dtype
            device = _combine_device(devices) if devices or device is None else device
            ends = [0]
            for shape in shapes:
                ends.append(ends[-1] + shape.numel())
            offsets = tuple(ends)
        self: ParameterBundle
        if torch.compiler.is_compiling():  # no wrapper tensor can be made in a graph
            traced = _TracedBundle()
            traced._owner = cls
            self = cast(ParameterBundle, traced)
        else:
            self = torch.Tensor._make_wrapper_subclass(
                cls, (offsets[-1],), dtype=dtype, device=device, requires_grad=False
            )
        self._names = tuple(names)
        self._shapes = tuple(shapes)
        self._dtypes = dtypes
        self._devices = tuple(devices)
        self._offsets = offsets
        if like is not None and same:
            self._keys, self._on_one_device = like._keys, like._on_one_device
        else:
            self._keys = tuple(zip(self._dtypes, self._devices))
            self._on_one_device = all(d == device for d in self._devices)
        self._plans = {}  # caches of its structure: packing plans (Pieces), GPU plans, probes
        self._strategy = strategy
        self._options = MappingProxyType(_strategies.own_options(options) if options else {})
        self._dtype = dtype
        self._device = device
        self._numel = offsets[-1]
        self._left_out = tuple(left_out)
        self._lazy_requires_grad = False
        self._expr = None
        self._flat = None
        return self

    @classmethod
    def _on_demand(
        cls,
        compute: Callable[[int], torch.Tensor] | None,
        like: ParameterBundle,
        dtypes: Sequence[torch.dtype],
        requires_grad: bool,
        strategy: str | None = None,
        options: Mapping[str, Any] | None = None,
        compute_range: Callable[[int, int, int], torch.Tensor | None] | None = None,
    ) -> ParameterBundle:
        """A bundle shaped and named like `like` whose tensor i is `compute(i)`, made on demand.

        Reductions and further elementwise ops take its tensors one at a time, so a chain such
        as `(a - b).abs().sum()` never holds more than one tensor's intermediate. `tensors`
        computes and keeps them all. `compute_range(i, start, stop)`, where given, makes just
        elements [start, stop) of tensor i flattened (or None where it cannot).
        """
        self = cls._layout(
            like._names,
            like._shapes,
            dtypes,
            like._devices,
            like._strategy if strategy is None else strategy,
            like._options if strategy is None else options,
            None,
            (),
            like=like,
        )
        self._tensors = None
        self._compute = compute
        self._compute_range = compute_range
        self._lazy_requires_grad = requires_grad
        self._dist = None if like._dist is None else like._dist.derived()
        return self


def version(t: torch.Tensor) -> int:
    """t's version counter; -1 for an inference tensor, which has none (outside inference mode
    it cannot be written)."""
    return -1 if t.is_inference() else t._version


def _refuse_nested(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    nested = [n for n, t in zip(names, tensors) if t.is_nested]
    if nested:
        raise RuntimeError(
            f"ParameterBundle: tensor {nested[0]!r}{_more(len(nested) - 1, 'too')} is a nested "
            "tensor, which has no fixed shape to place in the concatenation (torch cannot "
            "reshape it either). Bundle its components instead: `t.unbind()`, or `t.values()` "
            "for a jagged one."
        )


def _copied_flat(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The concatenation of tensors some of which are not contiguous, each copied (and cast)
    straight into its place; None where `torch.cat` must make it.

    torch.cat first makes every such tensor's flat copy, all alive until the cat: the result's
    size again. Where autograd or a torch.func transform follows the result, the cat does:
    writing into slices would record a `CopySlices` per tensor, each of whose backward clones
    the whole gradient, and has no batching rule.
    """
    if all(t.is_contiguous() for t in tensors):
        return None  # the cat reads views: no copy to save
    if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or transformed():
        return None
    if torch.compiler.is_compiling():
        return None  # the compiler plans the graph's memory itself
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    start = 0
    for t in tensors:
        flat[start:start + t.numel()].view(t.shape).copy_(t)
        start += t.numel()
    return flat


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.cat([t.reshape(-1) for t in tensors])` in one call."""
    try:
        flat: torch.Tensor = torch._C._nn.flatten_dense_tensors(tensors)  # type: ignore[arg-type]  # a tuple works
    except RuntimeError:  # it has no batching rule: under torch.func.vmap
        flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat


# Names tuples found unique, by id: bundles derived from a bundle pass its names again, and
# checking 161 names (ResNet-50) costs 2 us, 3% of a derive.
_UNIQUE_NAMES: dict[int, tuple[str, ...]] = {}


def _check_names(names: Sequence[str]) -> None:
    # to_dict() and per-tensor results are keyed by name: a repeated one would lose tensors.
    if len(names) < 2:
        return
    compiling = torch.compiler.is_compiling()  # dynamo cannot keep an id() across graph breaks
    if not compiling and _UNIQUE_NAMES.get(id(names)) is names:
        return
    if len(set(names)) != len(names):
        _refuse_duplicates(names)
    if type(names) is tuple and not compiling:  # immutable: unique for good
        if len(_UNIQUE_NAMES) >= 256:
            _UNIQUE_NAMES.clear()
        _UNIQUE_NAMES[id(names)] = names


def _refuse_duplicates(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for repeated in names:
        if repeated in seen:
            break
        seen.add(repeated)
    raise ValueError(
        f"ParameterBundle: the name {repeated!r} is given to more than one tensor; names must be "
        "unique (to_dict() and per-tensor results are keyed by them). Prefix them, for instance "
        "for two modules: mt.bundle({**{f'm1.{n}': p for n, p in m1.named_parameters()}, "
        "**{f'm2.{n}': p for n, p in m2.named_parameters()}})."
    )


def _rebuild(cls: type[ParameterBundle], *args: Any) -> ParameterBundle:
    """What pickle calls to make a bundle again (see `__reduce_ex__`)."""
    return ParameterBundle.__new__(cls, *args)


class _TracedBundle(_BundleAPI, TracedDispatch):
    """What `mt.bundle` makes while torch.compile traces: see `TracedDispatch`."""

    __module__ = "modtensor"


def is_bundle(x: object) -> TypeGuard[ParameterBundle]:
    """True for a `ParameterBundle`, and for its stand-in while torch.compile traces.

    Example:
        >>> import torch, modtensor as mt
        >>> mt.is_bundle(mt.bundle([torch.ones(2)])), mt.is_bundle(torch.ones(2))
        (True, False)
    """
    return isinstance(x, (ParameterBundle, _TracedBundle))


def _patterns(selector: Selector, what: str) -> list[str] | None:
    # The glob patterns of a selector; None for a predicate or no selector.
    if selector is None or callable(selector):
        return None
    try:
        patterns = [selector] if isinstance(selector, str) else list(selector)
    except TypeError:
        patterns = [selector]  # type: ignore[list-item]  # reported just below
    if not all(isinstance(p, str) for p in patterns) or isinstance(selector, bytes):
        raise TypeError(
            f"bundle: {what} must be a glob pattern (str), a list of them, or a predicate "
            f"(name, tensor) -> bool; got {selector!r}."
        )
    return patterns


def _as_predicate(selector: Selector, what: str) -> Callable[[str, torch.Tensor], bool] | None:
    patterns = _patterns(selector, what)
    if patterns is None:
        return cast(Union[Callable[[str, torch.Tensor], bool], None], selector)
    # A name matches itself first: "w[0]" is a name, as a glob it would mean "w0".
    return lambda name, _t: any(name == p or _strategies.glob_match(name, p) for p in patterns)


def _named_tensors(source: Any, recurse: bool, buffers: bool) -> list[tuple[str, torch.Tensor]]:
    if is_bundle(source):
        return list(source.items())
    if isinstance(source, nn.Module):
        named: list[tuple[str, torch.Tensor]] = list(source.named_parameters(recurse=recurse))
        if buffers:
            seen = {id(t) for _, t in named}
            named += [(n, t) for n, t in source.named_buffers(recurse=recurse) if id(t) not in seen]
        return named
    if isinstance(source, torch.Tensor):
        raise TypeError(
            "bundle: got a single tensor; wrap it in a list (`mt.bundle([t])`). "
            f"The source must be {_SOURCES}."
        )
    if isinstance(source, Mapping):
        named = []
        for key, value in source.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"bundle: a mapping source needs str keys and tensor values; entry {key!r} "
                    f"holds {type(value).__name__}."
                )
            named.append((key, value))
        return named
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        named = []
        for i, item in enumerate(source):
            if isinstance(item, torch.Tensor):
                named.append((str(i), item))
            elif (
                isinstance(item, tuple)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)
            ):
                named.append(item)
            else:
                raise TypeError(
                    f"bundle: item {i} of the iterable is {type(item).__name__}; expected a "
                    "tensor or a (name, tensor) pair."
                )
        return named
    raise TypeError(f"bundle: unsupported source {type(source).__name__}. Expect {_SOURCES}.")


_BUNDLE_KEYWORDS = ("strategy", "include", "exclude", "recurse", "buffers", "group")


def _check_options(strategy: str, options: Mapping[str, Any]) -> None:
    # bundle()'s other keywords go to the strategy, so a misspelt one (`buffer=True`) would be
    # refused as an option of the strategy, and `buffers=` never mentioned.
    try:
        _strategies.get(strategy).check_options(options)
    except TypeError as e:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            for key in options
            if (close := difflib.get_close_matches(key, _BUNDLE_KEYWORDS, 1))
        ]
        if not hints:
            raise
        raise TypeError(f"{e} bundle() keywords: {', '.join(hints)}") from None


def bundle(
    source: Source,
    *,
    strategy: str = "concat",
    include: Selector = None,
    exclude: Selector = None,
    recurse: bool = True,
    buffers: bool = False,
    group: Any = None,
    **options: Any,
) -> ParameterBundle:
    """Bundle the tensors of `source` so they behave as one flat tensor.

    `source` is an `nn.Module` (its parameters, tied ones once; its buffers too with
    `buffers=True`), a `Mapping[str, Tensor]` such as a state_dict, an iterable of tensors
    (named `"0"`, `"1"`, ...) or of `(name, tensor)` pairs, or a `ParameterBundle`.
    `include` / `exclude` select tensors by glob pattern(s) on the name or by a predicate
    `(name, tensor) -> bool`; a name matches itself first (`"w[0]"`), and patterns that match
    no tensor warn (the bundle is then empty). Tensors may live on several devices: partials are computed
    where each tensor lives and combined on the first tensor's device (meta if any is meta).
    `strategy` is `"concat"` (the default), `"per_param"`, `"weighted"` (options `weights=`,
    `normalize=`) or a registered one.

    Sharded tensors (torch.distributed): DTensor parameters, as FSDP2's `fully_shard` makes
    them, give a bundle of this rank's local shards over their device mesh's group (FSDP2
    modules' sharded parameters, whatever their state). `group=` (a ProcessGroup, such as
    `dist.group.WORLD`) says plain tensors are this rank's shards of a bundle that
    concatenates every rank's, in rank order. Such a bundle's shape, tensors, elementwise and
    in-place ops are this rank's; its full reductions run over all ranks and give every rank
    the global value, so every rank must call them (see the README on FSDP2 and DDP).

    Example:
        >>> import torch, modtensor as mt
        >>> conv = torch.nn.Conv2d(3, 16, 3)
        >>> b = mt.bundle(conv)
        >>> b.names, b.shape
        (('weight', 'bias'), torch.Size([448]))
        >>> torch.allclose(torch.mean(b), torch.cat([conv.weight.reshape(-1), conv.bias]).mean())
        True
        >>> mt.bundle(conv, exclude="bias").names
        ('weight',)
    """
    if options:
        _check_options(strategy, options)
    keep = _as_predicate(include, "include")
    drop = _as_predicate(exclude, "exclude")
    named = _named_tensors(source, recurse, buffers)
    kinds = {type(t) for _, t in named}  # a model has one or two: check them, not each tensor
    if any(issubclass(k, (ParameterBundle, _TracedBundle)) for k in kinds):
        name = next(n for n, t in named if is_bundle(t))
        raise TypeError(
            f"bundle: tensor {name!r} is itself a bundle; pass its tensors instead "
            "(`mt.bundle(inner)` keeps its names)."
        )
    included = named if keep is None else [(n, t) for n, t in named if keep(n, t)]
    if named and not included and not callable(include) and group is None:
        # A misspelt pattern would give an empty bundle, whose sum is a silent 0. A warning, not
        # an error: generic code may ask for "*.bias" of a model without biases, and the ranks
        # of a group (sharded) must all reach their collectives.
        shown = ", ".join(repr(n) for n, _ in named[:5]) + (", ..." if len(named) > 5 else "")
        warnings.warn(
            f"bundle: include={include!r} matches none of the {len(named)} tensors ({shown}): the "
            "bundle is empty. Patterns are globs on these names, such as '*.weight' or 'encoder.*'.",
            UserWarning,
            stacklevel=2,
        )
    named = included if drop is None else [(n, t) for n, t in included if not drop(n, t)]
    if any(issubclass(k, _UNINITIALIZED) for k in kinds):
        lazy = [n for n, t in named if isinstance(t, _UNINITIALIZED)]
        if lazy:
            # Following the advice must work at once: name them all (the first alone was named),
            # and keep the caller's own exclude, which a new one would replace.
            shown = repr(lazy[0]) if len(lazy) == 1 else repr(lazy)
            how = f"with exclude={shown}" if exclude is None else f"by adding {shown} to exclude"
            raise ValueError(
                f"bundle: {lazy[0]!r} is an uninitialized parameter (of a Lazy module, before its "
                f"first forward pass){_more(len(lazy) - 1, 'too')}: it has no shape yet. Run a "
                f"forward pass first, or leave {'it' if len(lazy) == 1 else 'them'} out {how}."
            )
    if group is not None or _distributed.involved(source, named):
        made = _distributed.bundle(source, named, strategy, options, group)
    else:
        made = ParameterBundle([t for _, t in named], [n for n, _ in named], strategy, options)
        if isinstance(source, nn.Module) and isinstance(made, ParameterBundle):  # not while compiling
            made._source = _source.ModuleSource(source, recurse, buffers)
    if strategy == "weighted" and isinstance(made, ParameterBundle):
        _strategies.check_weights(made)
    return made

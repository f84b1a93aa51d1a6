"""Bundles over sharded tensors: full reductions across a torch.distributed process group.

A distributed bundle holds this rank's shards of a larger bundle: DTensor parameters (as
FSDP2's `fully_shard` makes them, found by `mt.bundle(model)` itself) or plain tensors given
with `mt.bundle(tensors, group=)`. Its shape, tensors, elementwise and in-place ops are this
rank's; full reductions run over every rank's shards and give every rank the global value
(how they cross the ranks: `_across_ranks.py`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn

from modtensor._dispatch import find_bundles, func_name
from modtensor._errors import UnsupportedOperationError

if TYPE_CHECKING:
    from modtensor._bundle import ParameterBundle

__all__ = ["Sharding", "bundle", "involved", "reference", "refuse", "refuse_fallback"]


@dataclass(frozen=True, eq=False)
class Sharding:
    """Where a distributed bundle's other shards are: its process group, and what to count once.

    `replicated` names tensors every rank of the group holds whole (DTensor `Replicate`
    placements): their partials are not exchanged but merged on every rank, so they count
    once and every replica gets the full gradient. `sources` are the DTensor parameters the
    tensors are local shards of, in order, for `.grad`; a derived bundle has none.
    """

    group: Any  # torch.distributed.ProcessGroup
    ranks: tuple[int, ...]  # the group's members as global ranks, in group order
    rank: int  # this process's index in the group
    replicated: frozenset[str] = frozenset()
    sources: tuple[Any, ...] | None = None

    def __str__(self) -> str:
        return f"(shards of rank {self.rank} of {len(self.ranks)})"

    def derived(self) -> Sharding:
        """The sharding of a bundle derived from this one: same group, no parameters of its own."""
        return self if self.sources is None else dataclasses.replace(self, sources=None)


# -- making distributed bundles ----------------------------------------------------------------


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("bundle: group= needs torch.distributed, which this build of torch lacks.")
    return dist


def _dtensor_type() -> type | None:
    # No DTensor can exist unless its module was imported: checking sys.modules keeps the
    # import (and its cost) away from programs that never use it.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _group_sharding(group: Any) -> Sharding:
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError(
            "bundle: group= needs an initialized default process group; call "
            "torch.distributed.init_process_group(...) first."
        )
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        # what dist.new_group(ranks) returns on the processes it leaves out
        raise ValueError(
            "bundle: this process is not a member of the given group (dist.new_group(ranks) "
            "gives GroupMember.NON_GROUP_MEMBER to the processes outside ranks); make the bundle "
            "on the group's ranks only, or pass a group this process belongs to."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"bundle: group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
            f"dist.new_group(ranks)), got {type(group).__name__}."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("bundle: this process is not a member of the given group; pass a group it belongs to.")
    return Sharding(group, tuple(dist.get_process_group_ranks(group)), rank)


def _fsdp_sharded_params(source: Any) -> dict[int, Any]:
    """Registered parameters of FSDP2 modules that are not their sharded DTensor, mapped to it.

    Between forward and backward FSDP2 leaves the root's parameters unsharded (plain tensors
    registered on the modules); a bundle holds the sharded parameters whatever the state, so
    it means the same thing before, during and after a step. This reads FSDP2's parameter
    records (`_get_fsdp_state`), so it is empty where their layout differs.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    # fully_shard gives each module it shards a subclass of FSDPModule: while there is none,
    # no module is sharded, and the walk over the modules (a third of `mt.bundle(model)`'s
    # time on ResNet-50) is skipped.
    if module_type is None or not isinstance(source, nn.Module) or not module_type.__subclasses__():
        return {}
    found: dict[int, Any] = {}
    try:
        for m in source.modules():
            if not isinstance(m, module_type):
                continue
            for param_group in m._get_fsdp_state()._fsdp_param_groups:
                for p in param_group.fsdp_params:
                    registered = getattr(p._module_info.module, p._module_info.param_name)
                    if registered is not p.sharded_param:
                        found[id(registered)] = p.sharded_param
    except AttributeError:  # another version of FSDP2's internals: use what is registered
        return {}
    return found


def involved(source: Any, named: Sequence[tuple[str, torch.Tensor]]) -> bool:
    """True if `mt.bundle` must make a distributed bundle even without `group=`."""
    if getattr(source, "_dist", None) is not None:
        return True
    dtensor = _dtensor_type()
    if dtensor is not None and any(issubclass(kind, dtensor) for kind in {type(t) for _, t in named}):
        return True
    return bool(_fsdp_sharded_params(source))


def bundle(
    source: Any, named: list[tuple[str, torch.Tensor]], strategy: str, options: dict[str, Any], group: Any
) -> ParameterBundle:
    """`mt.bundle` for sharded tensors: DTensors, `group=`, or a distributed bundle as source."""
    from modtensor._bundle import ParameterBundle

    sharded = _fsdp_sharded_params(source)
    if sharded:
        named = [(n, sharded.get(id(t), t)) for n, t in named]
    dtensor = _dtensor_type()
    inherited: Sharding | None = getattr(source, "_dist", None)
    if dtensor is not None and any(isinstance(t, dtensor) for _, t in named):
        sharding, tensors = _from_dtensors(named, dtensor, group)
    else:
        tensors = [t for _, t in named]
        if inherited is not None:
            sharding = _selected(inherited, source, tensors)
            if group is not None and _group_sharding(group).ranks != sharding.ranks:
                raise ValueError(
                    f"bundle: {source.describe()} is sharded over ranks {list(sharding.ranks)}, "
                    f"but group= has ranks {list(_group_sharding(group).ranks)}; leave group= out."
                )
        else:
            sharding = _group_sharding(group)
    b = ParameterBundle(tensors, [n for n, _ in named], strategy, options)
    b._dist = sharding
    return b


def _selected(inherited: Sharding, source: ParameterBundle, tensors: list[torch.Tensor]) -> Sharding:
    # `mt.bundle(b, include=...)` keeps the parameters of the tensors it keeps.
    if inherited.sources is None:
        return inherited
    position = {id(t): i for i, t in enumerate(source.tensors)}
    if not all(id(t) in position for t in tensors):
        return inherited.derived()
    return dataclasses.replace(inherited, sources=tuple(inherited.sources[position[id(t)]] for t in tensors))


def _from_dtensors(
    named: list[tuple[str, torch.Tensor]], dtensor: type, group: Any
) -> tuple[Sharding, list[torch.Tensor]]:
    plain = [n for n, t in named if not isinstance(t, dtensor)]
    if plain:
        shown = [n for n, t in named if isinstance(t, dtensor)][:3]
        raise TypeError(
            f"bundle: plain tensors {plain[:4]}{' ...' if len(plain) > 4 else ''} among DTensor "
            f"parameters {shown}...: a plain tensor's place among the shards is unknown. Make it "
            "a DTensor (distribute_tensor / DTensor.from_local), or leave it out (exclude=...)."
        )
    mesh = named[0][1].device_mesh  # type: ignore[attr-defined]
    others = [n for n, t in named if t.device_mesh != mesh]  # type: ignore[attr-defined]
    if others:
        raise ValueError(
            f"bundle: DTensors on different device meshes: {named[0][0]!r} is on {mesh}, "
            f"{others[:4]} are not. Bundle each mesh's tensors separately (include=/exclude=)."
        )
    shard_dims: dict[int, str] = {}
    replicated = set()
    for n, t in named:
        placements = t.placements  # type: ignore[attr-defined]
        if any(p.is_partial() for p in placements):
            raise ValueError(
                f"bundle: DTensor {n!r} has placements {placements}: a Partial placement holds "
                "pending sums, not a shard of the value. Redistribute it first "
                "(`t.redistribute(placements=[Replicate()])` or `Shard(0)`)."
            )
        dims = [k for k, p in enumerate(placements) if p.is_shard()]
        if len(dims) > 1:
            raise ValueError(
                f"bundle: DTensor {n!r} is sharded over {len(dims)} mesh dimensions "
                f"({placements}); a bundle reduces over one. Bundle the shards of one mesh "
                "dimension with group= (`mt.bundle([t.to_local() ...], group=mesh.get_group(d))`)."
            )
        if dims:
            shard_dims.setdefault(dims[0], n)
        else:
            replicated.add(n)
    if len(shard_dims) > 1:
        raise ValueError(
            f"bundle: DTensors sharded over different mesh dimensions ({shard_dims}); a bundle "
            "reduces over one. Bundle each group of tensors separately (include=/exclude=)."
        )
    dim = next(iter(shard_dims), 0)
    sharding = _group_sharding(mesh.get_group(dim))
    if group is not None and _group_sharding(group).ranks != sharding.ranks:
        raise ValueError(
            f"bundle: the DTensors are sharded over ranks {list(sharding.ranks)} (mesh dimension "
            f"{dim} of {mesh}), but group= has ranks {list(_group_sharding(group).ranks)}. "
            "Leave group= out: DTensors carry their own."
        )
    sources = tuple(t for _, t in named)
    # to_local is a view of the shard: in-place ops write into the parameter, and gradients
    # reach it as a DTensor of its own placements. Made in grad mode whatever the caller's, as
    # a bundle of plain parameters stays differentiable wherever it was made.
    with torch.enable_grad():
        tensors = [t.to_local() for t in sources]  # type: ignore[attr-defined]
    return dataclasses.replace(sharding, replicated=frozenset(replicated), sources=sources), tensors


def grad(b: ParameterBundle) -> ParameterBundle:
    """`b.grad` of a bundle of DTensor parameters: their gradients' local shards, same group.

    Never None, even where no parameter has a gradient: every rank must be able to make the
    same calls on it.
    """
    from modtensor._bundle import ParameterBundle

    sharding = b._dist
    assert sharding is not None and sharding.sources is not None
    pairs = [(n, p.grad) for n, p in zip(b.names, sharding.sources)]
    named = [(n, g) for n, g in pairs if g is not None]
    dtensor = _dtensor_type()
    local: Callable[[Any], torch.Tensor] = lambda g: g.to_local()  # noqa: E731
    tensors = [local(g) if dtensor is not None and isinstance(g, dtensor) else g for _, g in named]
    left_out = [n for n, g in pairs if g is None]
    out = ParameterBundle.__new__(
        b._derived_class(), tensors, [n for n, _ in named], b.strategy, b.options, b.dtype, left_out, b.device
    )
    out._dist = sharding.derived()
    return out


def sharding_of(name: str, bundles: Iterable[Any]) -> Sharding | None:
    """The one sharding of the distributed bundles among `bundles`; None if there is none."""
    found = [x for x in bundles if getattr(x, "_dist", None) is not None]
    if not found:
        return None
    first: Sharding = found[0]._dist
    for other in found[1:]:
        if other._dist.ranks != first.ranks:
            raise ValueError(
                f"{name}: bundles sharded over different process groups: {found[0].describe()} "
                f"over ranks {list(first.ranks)} and {other.describe()} over ranks "
                f"{list(other._dist.ranks)}. Their tensors pair shard by shard, so both must be "
                "sharded over the same group."
            )
    replicated = frozenset().union(*(x._dist.replicated for x in found))
    return first if replicated == first.replicated else dataclasses.replace(first, replicated=replicated)


def reference(
    func: Callable[..., Any], ref: ParameterBundle | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ParameterBundle | None:
    """The bundle an elementwise result is shaped after, carrying any operand's group.

    `local + distributed` must give a distributed bundle too, or its reductions would
    silently be this rank's alone.
    """
    bundles = find_bundles(args, kwargs)
    if ref is None or all(getattr(x, "_dist", None) is None for x in bundles):
        return ref
    sharding = sharding_of(func_name(func), bundles)
    if ref._dist is not None:
        return ref
    carrier = ref.with_strategy(ref.strategy, **ref.options)
    carrier._dist = sharding.derived() if sharding is not None else None
    return carrier


# -- refusing what would be rank-local ----------------------------------------------------------

_ACROSS = (
    "Full reductions run across the ranks (b.sum(), b.mean(), b.std(), b.norm(), b.amax(), "
    "b.amin(), b.count_nonzero(), b.all(), b.any(), torch.dist(a, b)...)"
)


def refuse(name: str, b: Any, why: str) -> NoReturn:
    """Raise UnsupportedOperationError: `name` on the distributed bundle `b` would be rank-local."""
    raise UnsupportedOperationError(
        f"{name} on {b.describe()}: {why} so modtensor refuses it on a distributed bundle. "
        f"{_ACROSS}; for this rank's shards alone, call it on `b.materialize()` (this rank's "
        "concatenation) or on `b.tensors`."
    )


def refuse_fallback(name: str, bundles: Sequence[Any], declined: bool = False, out: bool = False) -> None:
    """Raise if a bundle among `bundles` is distributed: the fallback would be rank-local.

    `declined`: the table has a handler for `name`, which does not take these arguments
    (`out` among them: `torch.sum(b, 0, out=t)`).
    """
    if out:
        what = (
            "its handler takes no out= (call it without out=, and copy the result where it is "
            "needed), and the fallback would compute it on this rank's shards alone,"
        )
    elif declined:
        what = "its handler does not take these arguments, and the fallback would compute it on this rank's shards"
    else:
        what = "it is not in the dispatch table, and its fallback would compute it on this rank's shards"
    if not out:
        what += " alone,"
    for x in bundles:
        if getattr(x, "_dist", None) is not None:
            refuse(name, x, what)

"""Full reductions of distributed bundles (see `_distributed.py`) across their process group.

How a reduction crosses ranks. Each rank combines its own tensors' partial states into one
payload; the payloads are exchanged (one `all_reduce` where payloads merge by adding, as for
sum, mean and the 0-, 1- and 2-norms; else one `all_gather_object`), and every rank merges all
of them into the state `finalize` takes. In that merge this rank's slot is its own live
payload and the others are detached copies: every rank computes the same global value, and
autograd on a rank reaches only its own shards, with exactly the gradient the unsharded
computation gives those elements. So no collective runs in backward.

A reduction's `combine` need not return a state (the built-in ones return what `finalize`
takes), so each built-in reduction says here how its payload is made and merged (`_Form`);
a registered reduction without one must follow the documented contract, a `combine` that
returns a state, and is exchanged with `all_gather_object`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch.utils import _pytree as pytree

from modtensor import _strategies
from modtensor._dispatch import NOT_HANDLED, find_bundles, materialized
from modtensor._distributed import Sharding, _dist, refuse, sharding_of
from modtensor._errors import UnsupportedOperationError
from modtensor._reduce_common import _acc_dtype, _cast, _real, _stack, sqrt0
from modtensor._strategies import Pieces, ReduceArgs, Reduction, ReductionCall, _keepdim

if TYPE_CHECKING:
    from modtensor._bundle import ParameterBundle

__all__ = ["reduce"]

_EMPTY = object()  # a segment without elements on any rank


@functools.cache
def _positional() -> frozenset[int]:
    from modtensor import _reductions

    found = [_reductions.REDUCTIONS["argmax"], _reductions.REDUCTIONS["argmin"], *_reductions._MAX_DIM.values()]
    return frozenset(id(r) for r in found)


# -- how payloads are made and merged ------------------------------------------------------------


@dataclass(frozen=True)
class _Form:
    """How one reduction's states cross ranks.

    `local(states, args)` makes this rank's payload from its tensors' states (differentiable);
    `merge(payloads, args)` makes, from every rank's payload, the state `finalize` takes.
    Where `summed` (or `summed(call)`) is true, payloads merge by adding: `encode(payload,
    args)` is a float64 vector of `width` numbers whose sum over ranks `decode(sum, args)`
    turns into that state, so one all_reduce does the exchange. `summed(call)` reads the
    call's arguments alone, which every rank shares, not its parse: that checks this rank's
    shards too (their dtype), and a rank where it fails must still join the others'
    collective, to raise there. `wire(payload)` is what of a payload crosses to the other
    ranks; the rest (tensors kept for this rank's gradient) stays here. Where `ties` (or
    `ties(args)`) is true, the payload counts this rank's ties for the extremum (see `_ties`).
    """

    local: Callable[[list[Any], ReduceArgs], Any]
    merge: Callable[[list[Any], ReduceArgs], Any]
    width: int = 0
    encode: Callable[[Any, ReduceArgs], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor, ReduceArgs], Any] | None = None
    summed: Callable[[ReductionCall], bool] | bool = False
    wire: Callable[[Any], Any] = lambda payload: payload
    ties: Callable[[ReduceArgs], bool] | bool = False


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1).to(torch.float64)


def _sum_form(combine: Callable[[list[Any], ReduceArgs], Any], integer: bool = False) -> _Form:
    """Sums (and counts) cross ranks in one all_reduce whatever their dtype: every rank must
    choose the same collective, and a rank holding no tensors has the default dtype.

    A payload is three float64 numbers: a float's value, a complex one's real and imaginary
    parts, an integer's high 32 bits (times 2**32) and its low 32 bits, each added exactly
    (integer sums are exact in float64 only below 2**53), joined again as torch's int64 sum
    wraps.
    """

    def encode(p: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
        zero = p.new_zeros((), dtype=torch.float64)
        if p.is_complex():
            return torch.stack([p.real.double(), p.imag.double(), zero])
        if p.is_floating_point():
            return torch.stack([p.double(), zero, zero])
        high = torch.div(p, 2**32, rounding_mode="floor")
        return torch.stack([high.double() * 2**32, zero, (p - high * 2**32).double()])

    def decode(s: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
        dtype = torch.int64 if integer else _acc_dtype(a.dtype)
        if dtype.is_complex:
            return torch.complex(s[0] + s[2], s[1]).to(dtype)
        if dtype.is_floating_point:
            return (s[0] + s[2]).to(dtype)
        total = int(s[0].item()) + int(s[2].item())
        wrapped = (total + 2**63) % 2**64 - 2**63
        return torch.tensor(wrapped, dtype=torch.int64, device=s.device).to(dtype)

    return _Form(combine, combine, 3, encode, decode, True)


@dataclass(frozen=True)
class _Reread:
    """In place of a tensor `_extrema._kept` did not keep (autograd records nothing on this
    rank): tensor `index` of `pieces`, read again by `_ties` only where its extremum is this
    rank's, so that no tensor is held meanwhile (one computed on demand would be made anew)."""

    pieces: Pieces
    index: int

    def read(self) -> Any:
        return self.pieces.operand(self.index)[0]


def _ties(value: torch.Tensor, states: list[Any], at: int, key: Callable[[Any], torch.Tensor]) -> int:
    """How many elements of this rank's tensors equal `value` (the extremum at `at` of each state).

    Only in grad mode: torch spreads an extremum's gradient evenly over all tied elements, so
    the merge must know each rank's share of the ties, also of a rank whose tensors are
    frozen (its states hold `_Reread`s) when another rank's are trainable. A NaN counts as
    equal to NaN, as in torch's max() / min() (see `_extrema._SharedExtremum`).
    """
    kept = [s[-1] for s in states]
    if not torch.is_grad_enabled() or any(k is None for k in kept):
        return 0
    v = value.detach()
    nan = bool(v.isnan())
    count = 0
    for s, k in zip(states, kept):
        extremum = s[at].detach().to(v.dtype)
        if bool(extremum.isnan() if nan else extremum == v.to(extremum.device)):
            keyed = key(k.read() if isinstance(k, _Reread) else k).to(v.dtype)
            count += int((keyed.isnan() if nan else keyed == v.to(keyed.device)).sum())
    return count


def _merge_extremum(payloads: list[Any], largest: bool, dtype: torch.dtype, nan_grad: str = "amax") -> torch.Tensor:
    """The max (or min) of every rank's `(extremum, ties)`, with torch's gradient for ties.

    `nan_grad` is the gradient of a NaN result, as `_extrema._SharedExtremum`'s mode says.
    """
    from modtensor._extrema import tie_shared

    if len(payloads) == 1:  # already its rank's gradient; an amax of it would be NaN at a NaN
        return _cast(payloads[0][0], dtype)
    stacked = _stack([v for v, _ in payloads], dtype)
    m = stacked.amax() if largest else stacked.amin()
    if not (m.requires_grad and torch.is_grad_enabled()):
        return m
    if nan_grad != "amax" and bool(m.isnan()):
        return _nan_merged(stacked, m, [c for _, c in payloads] if nan_grad == "spread" else None)
    tied = (stacked == m).tolist()
    total = sum(c for (_, c), t in zip(payloads, tied) if t)
    if sum(tied) <= 1 or total == 0:
        return m
    return tie_shared(stacked, m, [c if t else None for (_, c), t in zip(payloads, tied)])


def _nan_merged(stacked: torch.Tensor, m: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """`m`, which is NaN, with torch's gradient: each rank's extremum gets its share of the
    NaN elements (`counts`, from `_ties`; the extremum spreads it over its rank's own), or
    none where `counts` is None (the inf-norms).

    The amax of `stacked` would give every entry NaN, also one whose share is zero.
    """
    nans = stacked.isnan().tolist()
    held = [c if nan else 0 for c, nan in zip(counts or [0] * len(nans), nans)]
    total = max(sum(held), 1)
    shares = torch.tensor([c / total for c in held], dtype=stacked.dtype, device=stacked.device)
    # NaN values, as m's; the gradient of each entry is its share
    return m.detach() + ((stacked - stacked.detach()) * shares).sum()


def _extremum_form(
    combine: Callable[[list[Any], ReduceArgs], Any],
    largest: Callable[[ReduceArgs], bool],
    dtype: Callable[[ReduceArgs], torch.dtype],
    key: Callable[[Any], torch.Tensor],
    nan_grad: Callable[[ReduceArgs], str],
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def local(states: list[Any], a: ReduceArgs) -> Any:
        value = combine(states, a)  # this rank's extremum, its gradient spread over its own ties
        return value, _ties(value, states, 0, key)

    def merge(payloads: list[Any], a: ReduceArgs) -> torch.Tensor:
        return _merge_extremum(payloads, largest(a), dtype(a), nan_grad(a))

    return local, merge


def _acc_args(a: ReduceArgs) -> ReduceArgs:

    return dataclasses.replace(a, dtype=_acc_dtype(a.dtype))


def _pnorm_form(
    combine: Callable[[list[Any], ReduceArgs], Any],
    key: Callable[[Any], torch.Tensor],
    order: Callable[[ReductionCall], float],
) -> _Form:
    """Norms (and torch.dist): finite p merges the per-rank norms, +-inf as an extremum.

    The payload of a finite p other than 0 and 1 is this rank's sum of p-th powers in float64
    (of squares for the L2 norm): where autograd records, the partials are those sums (the
    "squares" and "powers" options), as the root of one, raised again, would have a NaN
    gradient at inf and lose the second derivative where a rank's norm is 0; elsewhere this
    rank's norm raised to p. Every rank's payload means the same whether or not autograd
    records on it (frozen shards, or none). For p 0 and 1 it is this rank's norm. For p in
    (0, 1, 2) norms merge by adding (their p-th powers), which one all_reduce does. `order(call)`
    is the call's p.
    """
    import math

    def is_inf(a: ReduceArgs) -> bool:
        return math.isinf(a.options["p"])

    ext_local, ext_merge = _extremum_form(
        combine, lambda a: a.options["p"] > 0, lambda a: _real(a.dtype), key, lambda a: "zeros"
    )

    def local(states: list[Any], a: ReduceArgs) -> Any:
        if is_inf(a):
            return ext_local(states, a)
        if a.options.get("squares") or a.options.get("powers"):
            return _stack([v for v, _ in states], _acc_dtype(_real(a.dtype))).sum()
        norm = combine(states, _acc_args(a))
        return norm if a.options["p"] in (0.0, 1.0) else norm ** a.options["p"]

    def merge(payloads: list[Any], a: ReduceArgs) -> Any:
        if is_inf(a):
            return ext_merge(payloads, a)
        # (see _reductions._combine_norm: "powers" says the partials are sums of p-th powers)
        powers = dataclasses.replace(a, options={**a.options, "powers": a.options["p"] not in (0.0, 1.0)})
        return combine([(p, None) for p in payloads], powers)

    def encode(p: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
        return _f64(p)

    def decode(s: torch.Tensor, a: ReduceArgs) -> torch.Tensor:
        total = s[0]
        if a.options["p"] == 2:
            total = sqrt0(total)
        return _cast(total, _real(a.dtype))

    return _Form(local, merge, 1, encode, decode, lambda call: order(call) in (0.0, 1.0, 2.0), ties=is_inf)


def _merge_var(payloads: list[Any], a: ReduceArgs) -> Any:
    # Chan et al.'s merge of (count, M2, mean) per rank, as _combine_var's of the tensors.
    from modtensor._reductions import _deviations, _weighted_mean

    acc = _acc_dtype(a.dtype)
    counts = _stack([p[0] for p in payloads], _real(acc))
    m2s = _stack([p[1] for p in payloads], _real(acc))
    means = _stack([p[2] for p in payloads], acc)
    total = counts.sum()
    mean = _weighted_mean(counts, total, means)
    m2 = m2s.sum() + (counts * _deviations(means, mean).abs().square()).sum()
    return total, m2, mean


def _aminmax_form() -> _Form:
    from modtensor._extrema import _combine_aminmax

    def local(states: list[Any], a: ReduceArgs) -> Any:
        low, high = _combine_aminmax(states, a)
        return low, _ties(low, states, 0, lambda t: t), high, _ties(high, states, 1, lambda t: t)

    def merge(payloads: list[Any], a: ReduceArgs) -> Any:
        low = _merge_extremum([(p[0], p[1]) for p in payloads], False, a.dtype)
        high = _merge_extremum([(p[2], p[3]) for p in payloads], True, a.dtype)
        return torch.return_types.aminmax((low, high))

    return _Form(local, merge, ties=True)


def _logsumexp_form() -> _Form:
    """logsumexp: the payload is this rank's logsumexp and the tensors that need a gradient.

    They are merged as one rank's partials are (`_reductions._LogSumExp`): each element's
    gradient comes from the global result, `g * exp(x - result)`. Through this rank's own
    logsumexp it would be `g * exp(own - result) * exp(x - own)`: NaN for every element of a
    rank whose own is infinite (one holding inf, or only -inf), where torch's is NaN at the inf
    element alone, or 0.
    """
    from modtensor._reductions import _combine_logsumexp

    def local(states: list[Any], a: ReduceArgs) -> Any:
        with torch.no_grad():
            value = _combine_logsumexp([s[0] for s in states], _acc_args(a))
        return (value, *(s[1] for s in states if s[1] is not None))

    return _Form(local, _combine_logsumexp, wire=lambda payload: payload[0])


def _cosine_form() -> _Form:
    from modtensor._pairwise import _combine_cosine

    def local(states: list[Any], a: ReduceArgs) -> Any:
        acc = _acc_dtype(a.dtype)
        dot = _stack([s[0] for s in states], acc).sum()
        return dot, *(_stack([s[j] for s in states], _real(acc)).sum() for j in (1, 2))  # squares

    return _Form(local, _combine_cosine)


@functools.cache
def _forms() -> dict[int, _Form]:
    from modtensor import _extrema, _pairwise, _reductions

    r = _reductions.REDUCTIONS

    def nan_grad(a: ReduceArgs) -> str:
        return "spread" if _extrema.spreads_nan(a) else "amax"

    # (the tensors a var without degrees of freedom keeps for its gradient stay on this rank)
    var = _Form(_reductions._combine_var, _merge_var, wire=lambda payload: payload[:3])
    forms = {
        "sum": _sum_form(r["sum"].combine),
        "nansum": _sum_form(r["nansum"].combine),
        "mean": _sum_form(r["mean"].combine),
        "count_nonzero": _sum_form(r["count_nonzero"].combine, integer=True),
        "nanmean": _Form(  # (of floating dtypes only: torch refuses others)
            r["nanmean"].combine, r["nanmean"].combine, 2,
            lambda p, a: torch.cat([_f64(p[0]), _f64(p[1])]),
            lambda s, a: (s[0].to(_acc_dtype(a.dtype)), s[1].to(torch.int64)),
            True,
        ),
        "var": var, "std": var, "var_mean": var, "std_mean": var,
        "amax": _Form(
            *_extremum_form(r["amax"].combine, lambda a: True, lambda a: a.dtype, lambda t: t, nan_grad), ties=True
        ),
        "amin": _Form(
            *_extremum_form(r["amin"].combine, lambda a: False, lambda a: a.dtype, lambda t: t, nan_grad), ties=True
        ),
        "aminmax": _aminmax_form(),
        "norm": _pnorm_form(_reductions._combine_norm, torch.abs, _reductions._norm_order),
        "logsumexp": _logsumexp_form(),
    }
    found = {id(r[name]): form for name, form in forms.items()}
    found[id(_pairwise._DIST)] = _pnorm_form(
        _pairwise._combine_dist, lambda pair: (pair[0] - pair[1]).abs(), _pairwise._dist_order
    )
    found[id(_pairwise._COSINE)] = _cosine_form()
    return found


def _form(reduction: Reduction) -> _Form:
    # A reduction without a form of its own follows the documented contract: combine -> state.
    return _forms().get(id(reduction)) or _Form(reduction.combine, reduction.combine)


# -- the exchange --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wire:
    """A tensor as it crosses ranks: Python numbers pickle about 10x faster than tensors do,
    and carry no device (a CUDA tensor pickled on one rank would be unpickled onto that
    rank's device on the others)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    values: Any


def _portable(payload: Any) -> Any:
    def wire(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return _Wire(x.dtype, tuple(x.shape), x.detach().cpu().tolist())

    return pytree.tree_map(wire, payload)


def _to(payload: Any, device: torch.device) -> Any:
    def tensor(x: Any) -> Any:
        if not isinstance(x, _Wire):
            return x
        return torch.tensor(x.values, dtype=x.dtype, device=device).reshape(x.shape)

    return pytree.tree_map(tensor, payload)


def _with_numel(a: Any, numel: int) -> Any:
    return dataclasses.replace(a, numel=numel) if isinstance(a, ReduceArgs) else a


def _described(error: BaseException | None) -> tuple[str, str, str] | None:
    """What the other ranks learn of this rank's error: its type (module, name) and message."""
    if error is None:
        return None
    return type(error).__module__, type(error).__qualname__, str(error)


def _failure(name: str, error: BaseException | None, failures: Sequence[tuple[int, Any]]) -> NoReturn:
    """Raise on every rank: a failed rank its own error, the others the first failed rank's
    type (where it is an exception class this process has imported that takes a message;
    else RuntimeError), saying which rank failed and why."""
    if error is not None:
        raise error
    rank, (module, qualname, message) = failures[0]
    text = (
        f"{name}: rank {rank} of the group failed with {qualname}: {message} (every rank stops "
        "here, as the reduction has no value without that rank's shards)"
    )
    kind = getattr(sys.modules.get(module), qualname, None)
    try:
        raised = kind(text) if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError(text)
    except Exception:  # a constructor that wants more than a message
        raised = RuntimeError(text)
    raise raised


@dataclass
class _Local:
    """This rank's side of a reduction: per segment (a list of tensor indices), its payloads."""

    live: list[Any]  # the payload of the tensors it shards, or None
    replicated: list[Any]  # the payload of the tensors every rank holds whole, or None
    numels: list[int]
    replicated_numels: list[int]
    error: BaseException | None = None


def _local(call: ReductionCall, sharding: Sharding, segments: list[list[int]], form: _Form, a: Any) -> _Local:
    b, red = call.bundle, call.reduction
    out = _Local([], [], [], [])
    # A rank recording no gradient counts its ties all the same: another rank may record.
    reread = torch.is_grad_enabled() and (form.ties if isinstance(form.ties, bool) else form.ties(a))
    try:
        for segment in segments:
            states: tuple[list[Any], list[Any]] = ([], [])
            numels = [0, 0]
            for i in segment:
                size = b._offsets[i + 1] - b._offsets[i]
                if not size:
                    continue
                whole = int(b.names[i] in sharding.replicated)
                # One call per tensor, so each operand is dropped before the next is made.
                state = red.partial(*call.pieces.operand(i), a)
                if reread and state[-1] is None:
                    state = (*state[:-1], _Reread(call.pieces, i))
                states[whole].append(state)
                numels[whole] += size
            out.live.append(form.local(states[0], a) if states[0] else None)
            out.replicated.append(form.local(states[1], a) if states[1] else None)
            out.numels.append(numels[0])
            out.replicated_numels.append(numels[1])
    except Exception as e:  # every rank must still join the exchange, or the others hang
        out.error = e
    return out


class _LiveSlot(torch.autograd.Function):
    """`total`, the sum of every rank's payload, differentiable as its term `own`.

    `total + (own - own.detach())` would make the value NaN where `own` is infinite (a shard
    holding inf): inf - inf.
    """

    @staticmethod
    def forward(ctx: Any, total: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return None, grad


def _summed(call: ReductionCall, sharding: Sharding, form: _Form, mine: _Local, a: Any) -> tuple[Any, int]:
    """Exchange one segment by all_reduce; return the merged state and the global count."""
    assert form.encode is not None and form.decode is not None
    dist = _dist()
    live = mine.live[0] if mine.error is None else None
    own = form.encode(live, a) if live is not None else None
    device = own.device if own is not None else call.bundle.device
    numel = mine.numels[0] if mine.error is None else 0
    head = torch.tensor([float(mine.error is not None), float(numel)], dtype=torch.float64, device=device)
    body = own.detach() if own is not None else torch.zeros(form.width, dtype=torch.float64, device=device)
    vector = torch.cat([head, body])
    dist.all_reduce(vector, group=sharding.group)
    failures, total_numel = vector[:2].tolist()
    if failures:  # every rank knows it: all of them make the exchange that says who and why
        described: list[Any] = [None] * len(sharding.ranks)
        dist.all_gather_object(described, _described(mine.error), group=sharding.group)
        _failure(call.name, mine.error, [(r, d) for r, d in enumerate(described) if d is not None])
    total = vector[2:]
    if own is not None:  # this rank's slot, live: gradients reach its shards
        total = _LiveSlot.apply(total, own)  # type: ignore[no-untyped-call]
    if mine.replicated[0] is not None:
        total = total + form.encode(mine.replicated[0], a)
    count = int(total_numel) + mine.replicated_numels[0]
    return (form.decode(total, _with_numel(a, count)) if count else _EMPTY), count


def _gathered(
    call: ReductionCall, sharding: Sharding, form: _Form, mine: _Local, args_of: Callable[[int], Any], check: Any
) -> tuple[list[Any], list[int]]:
    """Exchange every segment by all_gather_object; return the merged states and global counts."""
    dist = _dist()
    packet = (
        _described(mine.error),
        [_portable(form.wire(p) if p is not None else None) for p in mine.live] if mine.error is None else None,
        mine.numels,
        check,
    )
    packets: list[Any] = [None] * len(sharding.ranks)
    dist.all_gather_object(packets, packet, group=sharding.group)
    failures = [(r, p[0]) for r, p in enumerate(packets) if p[0] is not None]
    if failures:
        _failure(call.name, mine.error, failures)
    differ = [r for r, p in enumerate(packets) if p[3] != check]
    if differ:
        raise ValueError(
            f"{call.name}: under the {call.bundle.strategy} strategy tensor i of every rank must "
            f"be a shard of the same tensor, with the same weight, but rank {differ[0]} holds "
            f"{packets[differ[0]][3]} where rank {sharding.rank} holds {check}."
        )
    device = call.bundle.device
    states, counts = [], []
    for s in range(len(mine.live)):
        payloads = []
        for r, p in enumerate(packets):
            payload = mine.live[s] if r == sharding.rank else _to(p[1][s], device)
            if payload is not None:
                payloads.append(payload)
        if mine.replicated[s] is not None:
            payloads.append(mine.replicated[s])
        count = sum(p[2][s] for p in packets) + mine.replicated_numels[s]
        a = _with_numel(args_of(s), count)
        states.append(form.merge(payloads, a) if payloads else _EMPTY)
        counts.append(count)
    return states, counts


def _connect(result: Any, b: ParameterBundle, indices: Sequence[int]) -> Any:
    """`result`, with a zero gradient path to each empty shard among `indices` that needs one.

    An empty shard has no partial, so autograd would leave its parameter's gradient None on
    this rank while the other ranks set theirs; DTensor-aware code that then walks the
    gradients (`clip_grad_norm_`, optimizers) would run different collectives on different
    ranks. So every shard gets a gradient (empty), and every rank's result requires grad
    where the bundle does, so every rank can call backward.
    """
    if not torch.is_grad_enabled() or not b.requires_grad:
        return result
    empty = [i for i in indices if b._offsets[i + 1] == b._offsets[i]]
    if not empty:
        return result

    def link(r: Any) -> Any:
        if not isinstance(r, torch.Tensor) or not (r.is_floating_point() or r.is_complex()):
            return r
        zeros = [z for z in (b._tensor(i).sum() * 0 for i in empty) if z.requires_grad]
        return r + sum(z.to(r.device, r.dtype) for z in zeros) if zeros else r

    if isinstance(result, tuple):  # var_mean's tuple, aminmax's torch.return_types
        linked = tuple(link(r) for r in result)
        return linked if type(result) is tuple else type(result)(linked)
    return link(result)


# -- reductions ----------------------------------------------------------------------------------


def reduce(call: ReductionCall) -> Any:
    """Run `call`, a reduction with a distributed operand, across its process group.

    Every rank of the group must make the same call: each runs a collective.
    """
    b = call.bundle
    sharding = sharding_of(call.name, find_bundles(call.args, call.kwargs))
    assert sharding is not None
    if id(call.reduction) in _positional():
        refuse(
            call.name,
            b,
            "its result is a position in the concatenation (or comes with one), and a "
            "distributed bundle's positions are each rank's own,",
        )
    if b.strategy == "concat":
        return _concat(call, sharding)
    if b.strategy in ("per_param", "weighted"):
        return _per_tensor(call, sharding)
    raise UnsupportedOperationError(
        f"{call.name}: the strategy {b.strategy!r} of {b.describe()} has no distributed form; "
        "distributed bundles reduce under 'concat', 'per_param' and 'weighted'."
    )


def _failed(error: Exception, segments: int) -> _Local:
    """This rank's side of a reduction it could not start: no payloads, only its error."""
    return _Local([None] * segments, [None] * segments, [0] * segments, [0] * segments, error)


def _concat(call: ReductionCall, sharding: Sharding) -> Any:
    b, red = call.bundle, call.reduction
    form = _form(red)
    try:
        parsed = call.parsed
    except Exception as e:
        # An error from this rank's own shards (their dtype, which a rank without tensors takes
        # as the default, or their count) is raised in the exchange, or the other ranks would
        # wait there.
        parsed, mine = None, _failed(e, 1)
    else:
        if parsed is NOT_HANDLED:
            return NOT_HANDLED
        mine = _local(call, sharding, [list(range(len(b.names)))], form, parsed)
    if form.width and (form.summed if isinstance(form.summed, bool) else form.summed(call)):
        state, count = _summed(call, sharding, form, mine, parsed)
    else:
        states, counts = _gathered(call, sharding, form, mine, lambda s: parsed, None)
        state, count = states[0], counts[0]
    a = _with_numel(parsed, count)
    if state is _EMPTY:
        if red.needs_elements(a):
            raise RuntimeError(
                f"{a.name}: {b.describe()} has no elements on any rank, and this reduction has "
                "no identity (torch raises the same on torch.empty(0))."
            )
        # Every rank's concatenation is empty: torch's own answer on torch.empty(0).
        return call.func(*materialized(call.args), **materialized(call.kwargs))
    return _connect(_keepdim(red.finalize(state, a), a.keepdim), b, range(len(b.names)))


def _probe(call: ReductionCall, i: int) -> Any:
    """What `func` gives on tensor i alone (its shape and dtype): torch's error where it
    refuses the tensor's dtype, as the per-tensor call of a local bundle raises it.

    On a tiny tensor of its dims, each 2 long: a reduction over some of the dims then leaves
    more than one element, and only full reductions of each tensor can merge across ranks.
    """
    b = call.bundle

    def on(t: torch.Tensor) -> Any:
        return call.func(t, *call.args[1:], **call.kwargs)

    try:
        out = on(torch.zeros([2] * len(b._shapes[i]), dtype=b._dtypes[i]))
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        if type(e) not in (RuntimeError, TypeError, ValueError, IndexError):
            raise  # a subclass may take other arguments: as it is
        raise _strategies.per_tensor_error(call.name, b, i, e, on) from e
    parts = out if isinstance(out, tuple) else (out,)
    if not all(isinstance(p, torch.Tensor) and p.numel() == 1 for p in parts):
        raise UnsupportedOperationError(
            f"{call.name} under the {b.strategy} strategy reduces each tensor of {b.describe()} "
            "over some of its dims, which needs the rest of each dim from the other ranks. "
            "Across ranks each tensor is reduced whole: leave dim out where the function allows it."
        )
    return out


def _like(result: Any, probe: Any) -> Any:
    if probe is None:
        return result
    if isinstance(probe, tuple):
        return type(probe)(tuple(_like(r, p) for r, p in zip(result, probe)))
    return result.reshape(probe.shape).to(probe.dtype)


def _per_tensor(call: ReductionCall, sharding: Sharding) -> Any:
    b, red = call.bundle, call.reduction
    n = len(b.names)
    # A one-bundle reduction takes no other tensor; a bundle-with-bundle one compares vectors.
    one_bundle = not any(isinstance(x, torch.Tensor) for x in (*call.args[1:], *call.kwargs.values()))
    probed: dict[tuple[int, torch.dtype], Any] = {}
    weights: list[float] | None = None
    form = _form(red)
    try:  # (an error here is raised in the exchange, as in _concat)
        # in order: the error of the first tensor torch refuses, as a local bundle's
        for i, kind in enumerate(zip(map(len, b._shapes), b._dtypes)) if one_bundle else ():
            if kind not in probed:
                probed[kind] = _probe(call, i)
        parsed = call.parsed
        if b.strategy == "weighted" and b.options.get("weights") is not None:
            weights = _strategies.resolve_weights(b, b.options.get("weights"))
    except Exception as e:
        parsed, mine = None, _failed(e, n)
    else:
        if parsed is NOT_HANDLED:
            return NOT_HANDLED
        mine = _local(call, sharding, [[i] for i in range(n)], form, parsed)
    probes = [probed.get(kind) for kind in zip(map(len, b._shapes), b._dtypes)]
    states, counts = _gathered(call, sharding, form, mine, lambda s: parsed, (b.names, weights))
    results = []
    for i, (state, count) in enumerate(zip(states, counts)):
        if state is _EMPTY:  # this tensor is empty on every rank: torch's own answer on it
            results.append(_EMPTY)
            continue
        a = _with_numel(parsed, count)
        results.append(_connect(_like(_keepdim(red.finalize(state, a), a.keepdim), probes[i]), b, [i]))
    if b.strategy == "per_param":
        if not n:
            return _strategies.PerParam().reduce(call)
        results = [call.per_tensor(i) if r is _EMPTY else r for i, r in enumerate(results)]
        if isinstance(results[0], tuple):
            return type(results[0])(
                [_strategies._per_tensor_bundle(b, list(p), b.dtype) for p in zip(*results)]
            )
        return _strategies._per_tensor_bundle(b, results, b.dtype)
    if weights is None:  # each tensor's global numel: the weighted mean is the global mean
        weights = [float(c) for c in counts]
    terms = [(w, call.per_tensor(i) if r is _EMPTY else r) for i, (w, r) in enumerate(zip(weights, results)) if w]
    if not terms:
        raise ValueError(f"{call.name}: all weights are zero for {b.describe()}; nothing to weigh.")
    weighted = _strategies.Weighted()
    if isinstance(terms[0][1], tuple):
        parts = zip(*(r for _, r in terms))
        return type(terms[0][1])([weighted._combine(call, [w for w, _ in terms], list(p)) for p in parts])
    return weighted._combine(call, [w for w, _ in terms], [r for _, r in terms])

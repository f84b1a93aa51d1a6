"""Order statistics over the whole bundle: topk, kthvalue, median, nanmedian, quantile, nanquantile.

Results equal the same call on `torch.cat([t.reshape(-1) for t in tensors])`, found by counting
rather than sorting (see `_selection.py`), so the concatenation is never built, and the extra
memory is a few chunk-sized temporaries plus a few candidates. `topk` of up to a sixteenth of a
chunk needs no counting: one pass keeps the best k seen so far, and skips the many chunks that
hold none better.

Ties and NaN follow a stable sort of the concatenation, NaN last (first for `topk(largest=True)`):
`kthvalue(b, k)` gives the element `torch.sort(cat, stable=True)` puts at position k - 1, `topk`
gives `torch.sort(cat, descending=largest, stable=True)[:k]` (also with `sorted=False`), the
median with `dim` the lower median (the first NaN if there is any NaN). torch itself leaves the
order of ties unspecified, so indices may differ from its own among equal values; the values do
not. Gradients reach the selected elements; the full `median` and `nanmedian` spread theirs evenly
over the elements equal to the result, as torch does.

`quantile` computes the ranks `q * (N - 1)` in the input's dtype, as torch does, so results match
it exactly; beyond torch's own limit of 2**24 elements the ranks are computed in float64.

Under a strategy other than concat each tensor is handled on its own, as for reductions. `torch.sort`,
`argsort`, `msort` and `mode` are not handled (they fall back to the concatenation): a sort's result
is as large as the model anyway.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from modtensor._bundle import ParameterBundle, is_bundle
from modtensor._dispatch import NOT_HANDLED, func_name, materialized
from modtensor._distributed import refuse
from modtensor._extend import run_reduction
from modtensor._reduce_common import _bind, check_dim, transformed, without_none_out
from modtensor._selection import Number, _elements, _equal, _evenly, _scan, _Selection, _Stat, chunk_size, has_keys
from modtensor._strategies import Reduction, with_empty_grads

__all__ = ["ORDER_FUNCTIONS", "kthvalue", "median", "nanmedian", "nanquantile", "quantile", "topk"]

_T = torch.Tensor

_INTERPOLATIONS = ("linear", "lower", "higher", "midpoint", "nearest")


# -- argument checks ------------------------------------------------------------------------------


def _check_dtype(name: str, b: ParameterBundle, probe: Callable[[torch.Tensor], Any]) -> bool:
    """Raise torch's own error where it has no kernel for the bundle's dtype (from a
    one-element tensor of it); return whether the counting's keys cover the dtype.

    Where torch has a kernel the keys do not cover (unsigned 16-, 32- and 64-bit integers or
    bool, on a device whose torch orders them), the call goes to the concatenation, with the
    fallback's warning, rather than giving another answer.
    """
    try:
        probe(torch.zeros(1, dtype=b._dtype, device=b._device))
    except (RuntimeError, NotImplementedError) as e:
        raise type(e)(f"{name}: {e} ({b.describe()} concatenates to {b._dtype})") from None
    return has_keys(b._dtype)


def _on_empty(func: Callable[..., Any], b: ParameterBundle, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch's answer (or error) on the empty concatenation, linked to the bundle's tensors that
    require grad as the concatenation's answer is (`median` of no elements is NaN)."""
    try:
        result = func(torch.empty(0, dtype=b._dtype, device=b._device), *args[1:], **kwargs)
    except (RuntimeError, IndexError) as e:
        raise type(e)(f"{func_name(func)}: {b.describe()} has no elements ({e}).") from None
    return with_empty_grads(result, [b])


def _values_indices(b: ParameterBundle, stat: _Stat, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1,) if keepdim else ()
    values = _elements(b, torch.tensor([stat.index])).reshape(shape)
    return values, torch.tensor(stat.index, device=b._device).reshape(shape)


# -- the handlers -------------------------------------------------------------------------------


def _sig_topk(input: Any, k: Any, dim: int = -1, largest: bool = True, sorted: bool = True) -> Any:
    return k, dim, largest, sorted


def topk(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`torch.topk(b, k)`: the k largest (or smallest) elements and their global indices.

    Same as `torch.topk(torch.cat([...]), k)`, ties ordered by index (see the module's docstring).

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.tensor([1.0, 5.0]), torch.tensor([[3.0, 4.0]])])
        >>> torch.topk(b, 2)
        torch.return_types.topk(
        values=tensor([5., 4.]),
        indices=tensor([1, 3]))
    """
    name = func_name(func)
    k, dim, largest, _ = _bind(_sig_topk, name, args, kwargs)
    k = operator.index(k)  # torch's parser has already refused floats and bools
    check_dim(operator.index(dim), name, b)
    if not 0 <= k <= b._numel:  # torch checks k before the dtype
        raise RuntimeError(f"{name}: selected index k out of range: k={k} for {b.describe()} of {b._numel} elements.")
    if not _check_dtype(name, b, lambda x: torch.topk(x, 1)):
        return NOT_HANDLED
    if k == 0:  # nothing to find; the empty values still require grad as the concatenation's
        indices = torch.empty(0, dtype=torch.int64, device=b._device)
        return torch.return_types.topk((_elements(b, indices), indices))
    if k * _POOL_SHARE <= chunk_size(b._device):
        indices, values = _top(b, k, bool(largest))
    else:
        kth = _Selection(b).stats([b._numel - k if largest else k - 1], with_index=False)[0]
        indices, values = _members(b, kth, k, bool(largest))
    if torch.is_grad_enabled() and b.requires_grad:  # the same values, read again to carry gradients
        values = _elements(b, indices)
    return torch.return_types.topk((values, indices))


# The pool of `_top` serves k up to a chunk's size / `_POOL_SHARE`. Beyond, it is sorted about
# once per chunk, and counting the k-th (a few passes of `_Selection`, then `_members`) is faster:
# for 8M random float32 (chunks of 2**18, one thread), k=1000: 11-15 ms against 32-35; k=16384:
# 30-35 against 34-40; k=30000: 42-44 against 36-40; k=10**6: 595-658 against 150-153. Where the
# k-th has many ties or is NaN, `_members` stops after the chunks holding the k: k=100000 of all
# equal takes 30 ms (the pool's: 10; the two counting passes are most of it), of 30% NaN 28 (30).
_POOL_SHARE = 16


def _members(b: ParameterBundle, threshold: _Stat, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass, ending once the k are found: the global indices and values of the top k, given
    the k-th one, in the order of the result."""
    v = threshold.value
    beyond = (b._numel - threshold.upto) if largest else threshold.below  # elements before v in the result
    ties = k - beyond  # ties of v to take: the first ones, by index
    found: list[torch.Tensor] = []
    values: list[torch.Tensor] = []

    def visit(c: torch.Tensor, offset: int) -> bool:
        nonlocal beyond, ties
        # One mask over the chunk (the passes over it are the cost): the elements on the
        # result's side of v, its ties only while some are still to take; then the few
        # selected are split into those beyond v and its ties.
        side = _side(c, v, largest, ties > 0)
        pos = side.nonzero().squeeze(1)
        del side
        if ties:
            tie = _equal(c[pos], v)
            tied = pos[tie][:ties]
            ties -= tied.numel()
            pos = torch.cat([pos[~tie], tied]).sort().values
            beyond -= pos.numel() - tied.numel()
        else:
            beyond -= pos.numel()
        found.append((pos + offset).to(b._device))
        values.append(c[pos].to(b._device))
        # all found: the rest of the bundle holds none (where all tie, most of it is never read)
        return beyond == 0 and ties == 0

    _scan(b, visit)
    indices, chosen = torch.cat(found), torch.cat(values)
    order = torch.sort(chosen, descending=largest, stable=True).indices
    return indices[order], chosen[order]


def _side(c: torch.Tensor, v: Number, largest: bool, ties: bool) -> torch.Tensor:
    """The mask of the elements of `c` before `v` in the result (NaN sorts above every number),
    and of its ties with `ties`."""
    if isinstance(v, float) and math.isnan(v):
        if largest:
            return c.isnan() if ties else torch.zeros_like(c, dtype=torch.bool)
        return torch.ones_like(c, dtype=torch.bool) if ties else c.isnan().logical_not_()
    if ties:
        return (c < v).logical_not_() if largest else c <= v
    return _before(c, v, largest)


def _top(b: ParameterBundle, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: the global indices and values of the top k (1 <= k <= N), in the order of the result.

    A pool holds the best k elements seen so far, in the result's order; its last value is the
    cut a later element must beat. Ties of the cut never do: chunks come in index order, and a
    stable sort puts earlier ties first. Once the pool is full, most chunks hold few elements
    that beat the cut, found by rows (see `_beating`). They wait until they are k before they are
    sorted into the pool (a sort for each chunk cost the most where k is large), meanwhile
    beating the last cut; so the pool and the waiting stay 3k at most.
    """
    pool_values = torch.empty(0, dtype=b._dtype, device=b._device)
    pool_indices = torch.empty(0, dtype=torch.int64, device=b._device)
    waiting: list[tuple[torch.Tensor, torch.Tensor]] = []  # (values, indices), in index order
    cut: Number | None = None

    def merge() -> None:
        nonlocal pool_values, pool_indices, cut
        # the pool's ties precede the waiting ones, and a stable sort keeps them so
        values = torch.cat([pool_values, *(v for v, _ in waiting)])
        indices = torch.cat([pool_indices, *(i for _, i in waiting)])
        waiting.clear()
        order = torch.sort(values, descending=largest, stable=True).indices[:k]
        pool_values, pool_indices = values[order], indices[order]
        if pool_values.numel() == k:
            cut = pool_values[-1].item()

    def visit(c: torch.Tensor, offset: int) -> bool:
        pos = None if cut is None else _beating(c, cut, largest, k)
        if pos is None:  # the chunk's own top k are all of it that can still enter
            pos = _chunk_top(c, k, largest)
        if pos.numel() > 0:
            waiting.append((c[pos].to(b._device), (pos + offset).to(b._device)))
            if sum(v.numel() for v, _ in waiting) >= k:
                merge()
        return False

    _scan(b, visit)
    if waiting:
        merge()
    return pool_indices, pool_values


_ROW = 1024  # elements per row of a chunk, each row summed up by its amax or amin


def _beating(c: torch.Tensor, cut: Number, largest: bool, limit: int) -> torch.Tensor | None:
    """The positions in `c` of its elements that come before `cut` in the result (NaN first for
    largest, last otherwise), in position order; None where there are more than `limit`.

    Comparing each element costs several times an amax over it: so rows of `_ROW` elements are
    compared by their amax (amin), and only the few rows that may hold such elements by element.
    """
    if isinstance(cut, float) and math.isnan(cut):  # a NaN cut: only a later NaN ties it, or a number beats it
        if largest:
            return torch.empty(0, dtype=torch.int64, device=c.device)
        beats = c.isnan().logical_not_()
        return None if int(beats.sum()) > limit else beats.nonzero().squeeze(1)
    rows = c.numel() // _ROW
    table = c[: rows * _ROW].reshape(rows, _ROW)
    best = table.amax(1) if largest else table.amin(1)
    # (a row whose best is NaN is looked at: a NaN beats any number, a NaN amin says nothing)
    hit = ((best <= cut) if largest else (best >= cut)).logical_not_().nonzero().squeeze(1)
    del best
    if 2 * hit.numel() > rows:  # rows that beat the cut whole may settle it without a look at each element
        worst = table.amin(1) if largest else table.amax(1)
        # (strictly, so that a NaN worst, which says nothing of its row's other elements, counts none)
        if int(((worst > cut) if largest else (worst < cut)).sum()) * _ROW > limit:
            return None
        del worst
    sub = table if hit.numel() == rows else table[hit]
    beats = _before(sub, cut, largest).reshape(-1)
    tail = _before(c[rows * _ROW :], cut, largest)
    if int(beats.sum()) + int(tail.sum()) > limit:
        return None
    at = beats.nonzero().squeeze(1)
    return torch.cat([hit[at // _ROW] * _ROW + at % _ROW, tail.nonzero().squeeze(1) + rows * _ROW])


def _before(x: torch.Tensor, cut: Number, largest: bool) -> torch.Tensor:
    # `cut` is a number; a NaN element comes before it for largest
    return (x <= cut).logical_not_() if largest else x < cut


def _chunk_top(c: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The positions in `c` of its own top k (all of it if it is shorter), ties by position, in
    position order."""
    if c.numel() <= k:
        return torch.arange(c.numel(), device=c.device)
    among = _candidates(c, k, largest)
    if among is not None:  # (torch's CPU topk is slow on sorted input: ~20 ms for k=1000 of 2**18)
        return among[_chunk_top(c[among], k, largest)]
    kth = torch.topk(c, k, largest=largest).values[-1].item()  # (torch's topk puts NaN first for largest)
    if isinstance(kth, float) and math.isnan(kth):
        side = c.isnan() if largest else torch.ones_like(c, dtype=torch.bool)
    else:
        side = (c < kth).logical_not_() if largest else c <= kth
    pos = side.nonzero().squeeze(1)
    del side
    tie = _equal(c[pos], kth)
    # the first ties, by position, fill the k places the elements beyond kth leave
    keep = tie.logical_not().logical_or_(tie.cumsum(0) <= k - int((~tie).sum()))
    return pos[keep]


def _candidates(c: torch.Tensor, k: int, largest: bool) -> torch.Tensor | None:
    """The positions in `c`, in order, of the rows (and the tail) that may hold its top k (k < its
    size); None where they are more than half of it.

    A row whose worst element is v holds `_ROW` elements as good as v, so the `ceil(k / _ROW)`-th
    best row worst bounds the chunk's k-th value (the k-th best row best does too): a row whose
    best falls short of the bound holds none of the top k. On sorted input that leaves a row or
    two beyond k elements; on shuffled input, usually every row.
    """
    rows = c.numel() // _ROW
    if rows == 0:
        return None
    table = c[: rows * _ROW].reshape(rows, _ROW)
    best, worst = (table.amax(1), table.amin(1)) if largest else (table.amin(1), table.amax(1))
    if c.is_floating_point() and bool(best.isnan().any()):  # a NaN hides its row's other elements
        return None
    bounds = [torch.topk(worst, -(-k // _ROW), largest=largest).values[-1]] if k <= rows * _ROW else []
    if k <= rows:
        bounds.append(torch.topk(best, k, largest=largest).values[-1])
    if not bounds:
        return None
    bound = torch.stack(bounds).amax() if largest else torch.stack(bounds).amin()
    hit = ((best >= bound) if largest else (best <= bound)).nonzero().squeeze(1)
    if 2 * hit.numel() > rows:
        return None
    at = (hit[:, None] * _ROW + torch.arange(_ROW, device=c.device)).reshape(-1)
    return torch.cat([at, torch.arange(rows * _ROW, c.numel(), device=c.device)])


def _sig_kthvalue(input: Any, k: Any, dim: int = -1, keepdim: bool = False) -> Any:
    return k, dim, keepdim


def kthvalue(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`torch.kthvalue(b, k)`: the k-th smallest element (from 1) and its global index.

    Same as on the concatenation; among ties, the index a stable sort puts at position k - 1.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.tensor([4.0, 1.0]), torch.tensor([3.0])])
        >>> torch.kthvalue(b, 2)
        torch.return_types.kthvalue(
        values=tensor(3.),
        indices=tensor(2))
    """
    name = func_name(func)
    k, dim, keepdim = _bind(_sig_kthvalue, name, args, kwargs)
    k = operator.index(k)  # torch's parser has already refused floats and bools
    check_dim(operator.index(dim), name, b)
    if b._numel == 0:
        return _on_empty(func, b, args, kwargs)
    if not 1 <= k <= b._numel:  # torch checks k before the dtype
        raise RuntimeError(
            f"{name}: selected number k out of range for dimension 0: k={k} for {b.describe()} "
            f"of {b._numel} elements."
        )
    if not _check_dtype(name, b, lambda x: torch.kthvalue(x, 1)):
        return NOT_HANDLED
    stat = _Selection(b).stats([k - 1])[0]
    return torch.return_types.kthvalue(_values_indices(b, stat, bool(keepdim)))


_NO_DIM: Any = object()


def _sig_median(input: Any, dim: Any = _NO_DIM, keepdim: bool = False) -> Any:
    return dim, keepdim


def _median_rank(sel: _Selection, ignore_nan: bool) -> int:
    # the lower median; with NaN, torch's median is the first NaN, nanmedian skips them
    if not ignore_nan and sel.n_valid < sel.n:
        return sel.n_valid
    return max(sel.n_valid - 1, 0) // 2


def _median(
    b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ignore_nan: bool
) -> Any:
    name = func_name(func)
    dim, keepdim = _bind(_sig_median, name, args, kwargs)  # torch's parser rejects keepdim without dim
    if dim is not _NO_DIM:
        check_dim(operator.index(dim), name, b)
    if b._numel == 0:
        return _on_empty(func, b, args, kwargs)
    if not _check_dtype(name, b, lambda x: torch.median(x, 0)):
        return NOT_HANDLED
    sel = _Selection(b)
    stat = sel.stats([_median_rank(sel, ignore_nan)])[0]
    if dim is _NO_DIM:
        return _evenly(b, stat)
    return_type = torch.return_types.nanmedian if ignore_nan else torch.return_types.median
    return return_type(_values_indices(b, stat, bool(keepdim)))


def median(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`torch.median(b)`: the lower median of the concatenation (NaN if any element is NaN).

    With `dim` (0 or -1): values and global indices. The full median's gradient is spread
    evenly over the elements equal to it, as torch does.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.tensor([4.0, 1.0]), torch.tensor([3.0, 2.0])])
        >>> torch.median(b), b.median(dim=0).indices
        (tensor(2.), tensor(3))
    """
    return _median(b, func, args, kwargs, ignore_nan=False)


def nanmedian(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`torch.nanmedian(b)`: the lower median of the elements that are not NaN.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.tensor([4.0, float("nan")]), torch.tensor([3.0, 2.0])])
        >>> torch.nanmedian(b)
        tensor(3.)
    """
    return _median(b, func, args, kwargs, ignore_nan=True)


def _sig_quantile(input: Any, q: Any, dim: Any = None, keepdim: bool = False, *, interpolation: str = "linear") -> Any:
    return q, dim, keepdim, interpolation


def _ranks(q: torch.Tensor, count: int, has_nan: bool, ignore_nan: bool) -> torch.Tensor:
    """The fractional ranks torch.quantile reads, computed in the same dtype as torch does."""
    if count > 2**24:  # beyond torch's limit: float64 keeps the rank exact
        q = q.double()
    ranks = q * (count - 1)
    if ignore_nan:
        return ranks.clamp(min=0)
    # NaN sorts last; filled rather than made anew, so that a q requiring grad gets its zero
    # gradient, as from torch's masked_fill
    return ranks.masked_fill(torch.tensor(has_nan), count - 1)


def _quantile(
    b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ignore_nan: bool
) -> Any:
    name = func_name(func)
    q, dim, keepdim, interpolation = _bind(_sig_quantile, name, args, kwargs)
    if is_bundle(q):
        return NOT_HANDLED
    if b._numel == 0:  # torch's verdict, whose order of checks depends on the size
        return _on_empty(func, b, args, kwargs)
    # torch's own checks of q, interpolation and dtype, on one element; and the result's shape.
    # They come before the dim's, so the same bad call raises the same type of error.
    try:
        probe = torch.zeros(1, dtype=b._dtype, device=b._device)
        # its dtype too: under autocast, a float16 or bfloat16 input's quantile is float32's
        out = func(probe, q, dim, keepdim, interpolation=interpolation)
    except RuntimeError as e:
        raise RuntimeError(f"{name}: {e} ({b.describe()} concatenates to {b._dtype})") from None
    except IndexError:  # the dim, said with the bundle's structure
        check_dim(dim, name, b)
        raise
    sel = _Selection(b)
    qs = torch.as_tensor(q, dtype=out.dtype).reshape(-1).cpu()
    ranks = _ranks(qs, sel.n_valid if ignore_nan else b._numel, sel.n_valid < b._numel, ignore_nan)
    return _interpolate(b, sel, ranks, interpolation, out.dtype).reshape(out.shape)


def quantile(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`torch.quantile(b, q)`: the q-th quantiles of the concatenation (NaN if any element is NaN).

    `q` is a float or a 1-D tensor of the bundle's dtype; `interpolation` is one of linear,
    lower, higher, midpoint, nearest. Works beyond torch's limit of 2**24 elements.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.tensor([4.0, 1.0]), torch.tensor([3.0, 2.0])])
        >>> torch.quantile(b, 0.5), b.quantile(torch.tensor([0.0, 1.0]), interpolation="lower")
        (tensor(2.5000), tensor([1., 4.]))
    """
    return _quantile(b, func, args, kwargs, ignore_nan=False)


def nanquantile(b: ParameterBundle, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`torch.nanquantile(b, q)`: the q-th quantiles of the elements that are not NaN.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.tensor([4.0, float("nan")]), torch.tensor([3.0, 2.0])])
        >>> torch.nanquantile(b, 0.5)
        tensor(3.)
    """
    return _quantile(b, func, args, kwargs, ignore_nan=True)


def _interpolate(
    b: ParameterBundle, sel: _Selection, ranks: torch.Tensor, interpolation: str, dtype: torch.dtype
) -> torch.Tensor:
    """torch.quantile's last steps: round or interpolate, in `dtype`, between the order
    statistics at `ranks` (found in the bundle's dtype: a wider float orders them alike)."""
    if interpolation == "lower":
        ranks = ranks.floor()
    elif interpolation == "higher":
        ranks = ranks.ceil()
    elif interpolation == "nearest":
        ranks = ranks.round()
    below = ranks.long()
    above = ranks.ceil().long()
    wanted = sorted(set(below.tolist()) | set(above.tolist()))
    stats = dict(zip(wanted, sel.stats(wanted)))
    at = _elements(b, torch.tensor([stats[r].index for r in wanted], dtype=torch.int64)).to(dtype)
    position = {r: i for i, r in enumerate(wanted)}
    low = at[[position[r] for r in below.tolist()]]
    if interpolation not in ("linear", "midpoint"):
        return low
    high = at[[position[r] for r in above.tolist()]]
    weights = torch.full_like(ranks, 0.5) if interpolation == "midpoint" else ranks - below
    return torch.lerp(low, high, weights.to(device=b._device, dtype=dtype))


# -- registration ---------------------------------------------------------------------------------

# Under per_param and weighted, each tensor's own result (the reductions' behaviour); other
# strategies get NOT_HANDLED from `parse`, which sends them to the fallback.
_PER_TENSOR = Reduction(
    parse=lambda b, func, args, kwargs: NOT_HANDLED,
    partial=lambda t, offset, a: t,
    combine=lambda states, a: NOT_HANDLED,
)

_COMPUTE: dict[str, Callable[..., Any]] = {
    "topk": topk,
    "kthvalue": kthvalue,
    "median": median,
    "nanmedian": nanmedian,
    "quantile": quantile,
    "nanquantile": nanquantile,
}

# The torch functions each op serves; tests/test_coverage.py counts them as tested in tests/test_order.py.
ORDER_FUNCTIONS = tuple(f for name in _COMPUTE for f in (getattr(torch, name), getattr(_T, name)))


def _handler(compute: Callable[..., Any]) -> Callable[..., Any]:
    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        b = args[0] if args else None
        if not is_bundle(b) or kwargs.get("out") is not None:
            return NOT_HANDLED
        kwargs = without_none_out(kwargs)
        if b._dist is not None:
            refuse(func_name(func), b, "an order statistic needs every rank's values,")
        if b.strategy != "concat":
            return run_reduction(func, args, kwargs, b, _PER_TENSOR)
        if b._device.type == "meta":  # no values to count, and torch.cat of meta tensors is free: no copy to warn of
            return func(*materialized(args), **materialized(kwargs))
        if transformed():  # radix counting carries no tangent and has no batching rule
            return NOT_HANDLED
        return compute(b, func, args, kwargs)

    return handler


for _name, _compute in _COMPUTE.items():
    ParameterBundle.implements((getattr(torch, _name), getattr(_T, _name)))(_handler(_compute))

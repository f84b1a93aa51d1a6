"""Model algebra recipes built on bundles, each checked against torch's own implementation.

Every recipe takes bundles or modules (a module means `mt.bundle(module)`), updates the real
tensors in place where its name ends in `_`, and never concatenates the model. A recipe's figures
are those of the concatenation whatever the strategy of a bundle given to it (it computes on the
same tensors under `concat`): `clip_grad_norm_(b.weighted(), 1.0)` clips by the global norm.

Example:
    >>> import copy, torch, modtensor as mt
    >>> model = torch.nn.Linear(4, 2)
    >>> ema = copy.deepcopy(model)
    >>> _ = mt.recipes.ema_(ema, model, decay=0.99)
    >>> mt.recipes.distance(ema, model).l2
    0.0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from modtensor._bundle import ParameterBundle, bundle, is_bundle
from modtensor._errors import UnsupportedOperationError
from modtensor._pointwise import check_same_structure
from modtensor._selection import chunk_size, flat_views

__all__ = [
    "DistanceReport", "clip_grad_norm_", "distance", "ema_", "magnitude_prune_", "merge", "task_vector",
]

BundleLike = Union[ParameterBundle, nn.Module]


def _b(x: Any) -> ParameterBundle:
    # Elementwise ops on a bundle return a bundle; torch's stubs say Tensor.
    assert is_bundle(x)
    return x


def _as_bundle(x: BundleLike, what: str) -> ParameterBundle:
    # The recipes define their own semantics, those of the concatenation: a bundle's strategy
    # (weighted, per_param) would silently change them, so they compute under concat.
    if is_bundle(x):
        return x if x.strategy == "concat" else x.with_strategy("concat")
    if isinstance(x, nn.Module):
        return bundle(x)
    raise TypeError(f"{what}: expected a ParameterBundle or an nn.Module, got {type(x).__name__}.")


# _read_only: the recipes that read models compute under torch.no_grad() rather than on
# `b.detach()`. A detached bundle is made at once, in the concatenation's dtype: a model that
# mixes dtypes (float16 weights, float32 norms) would have every tensor cast, all held together,
# and an on-demand bundle (`ft - base` as a task vector) computed whole.


def _new(result: ParameterBundle, like: BundleLike) -> ParameterBundle:
    """`result` as a bundle of new tensors, computed now, under the strategy of `like`.

    An on-demand result would read its inputs whenever used, and refuse once one of them was
    modified in place (`mt.bundle(base).add_(tv)`): a task vector must outlive its models.
    """
    held = result.derive(list(result.tensors))
    if is_bundle(like) and like.strategy != "concat":
        return held.with_strategy(like.strategy, **like.options)
    return held


@torch.no_grad()  # as torch's: the total carries no graph, even of create_graph gradients
def clip_grad_norm_(
    parameters: BundleLike | torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip the gradients' global norm to `max_norm`, in place; return the norm before clipping.

    Same as `torch.nn.utils.clip_grad_norm_` on the bundle's tensors (tensors without a
    gradient are skipped), up to the last bit of the norm, which is summed in float64. It also
    takes torch's arguments: a tensor or an iterable of them (`model.parameters()`), a
    `norm_type` such as `"inf"`, and `foreach` (the bundle picks its kernels itself). Of order
    0, torch's total is the number of tensors with a nonzero gradient (the order-0 norm of
    their norms), not of nonzero elements; so is this one.

    Example:
        >>> import torch, modtensor as mt
        >>> lin = torch.nn.Linear(3, 1)
        >>> (lin.weight.sum() * 100).backward()
        >>> round(float(mt.recipes.clip_grad_norm_(lin, max_norm=1.0)), 2)  # 100 * sqrt(3)
        173.21
        >>> round(float(mt.bundle(lin).grad.norm()), 4)
        1.0
    """
    if isinstance(parameters, torch.Tensor) and not is_bundle(parameters):
        parameters = [parameters]
    if not is_bundle(parameters) and not isinstance(parameters, nn.Module):
        parameters = bundle(list(parameters))
    grads = _as_bundle(parameters, "clip_grad_norm_").grad
    if grads is None:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    total: torch.Tensor
    if norm_type == 0:  # torch's total is a norm of the per-tensor norms: the same but here
        total = torch.linalg.vector_norm(_b(grads.per_param().norm(0)).materialize(), 0)
    else:
        total = grads.norm(norm_type)
    if error_if_nonfinite and not bool(total.isfinite()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    # torch's formula, epsilon included. The norm is summed in float64, so it can differ from
    # torch's float32 total in the last bit (it is the more accurate of the two).
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    grads.mul_(coefficient)
    return total


def ema_(target: BundleLike, source: BundleLike, decay: float) -> ParameterBundle:
    """Move `target` towards `source` in place: `target = decay * target + (1 - decay) * source`.

    Same as the update of `torch.optim.swa_utils.get_ema_multi_avg_fn(decay)` (a `lerp_` with
    weight `1 - decay`), so an `AveragedModel` and `ema_` stay equal step after step once both
    start from the same weights (`AveragedModel`'s first `update_parameters` copies them).
    Integer tensors (a BatchNorm's step count, in `mt.bundle(model, buffers=True)`), which
    have no `lerp_`, take `target * decay + source * (1 - decay)` truncated, as there.

    Example:
        >>> import torch, modtensor as mt
        >>> ema, w = mt.bundle([torch.zeros(2)]), mt.bundle([torch.ones(2)])
        >>> mt.recipes.ema_(ema, w, decay=0.9).tensors[0]
        tensor([0.1000, 0.1000])
    """
    t, s = _as_bundle(target, "ema_"), _as_bundle(source, "ema_")
    check_same_structure("recipes.ema_", t, s)
    floating = [i for i, d in enumerate(t._dtypes) if d.is_floating_point or d.is_complex]
    with torch.no_grad():  # one torch._foreach_lerp_ (no detach: nothing is recorded)
        if len(floating) == len(t.names):
            t.lerp_(s, 1.0 - decay)
            return target if is_bundle(target) else t
        # torch has no lerp_ for integers; get_ema_multi_avg_fn blends them (a BatchNorm's
        # step count, with buffers=True) as `copy_(ema * decay + model * (1 - decay))`. The
        # floating tensors go first: a lerp_ that fails writes nothing, the copies cannot fail.
        if floating:
            ends = bundle({t.names[i]: s.tensors[i] for i in floating})
            bundle({t.names[i]: t.tensors[i] for i in floating}).lerp_(ends, 1.0 - decay)
        for i in sorted(set(range(len(t.names))) - set(floating)):
            x, y = t.tensors[i], s.tensors[i]
            x.copy_(x * decay + y * (1.0 - decay))
    return target if is_bundle(target) else t


def task_vector(finetuned: BundleLike, base: BundleLike) -> ParameterBundle:
    """Return `finetuned - base` as a bundle of new tensors (no gradient), named like `finetuned`.

    The tensors are computed here, so the task vector stays as it is when the models change
    later (`mt.bundle(base).add_(tv)` applies it in place).

    Example:
        >>> import torch, modtensor as mt
        >>> mt.recipes.task_vector(mt.bundle([torch.ones(2)]), mt.bundle([torch.zeros(2)])).tensors
        (tensor([1., 1.]),)
    """
    ft, b = _as_bundle(finetuned, "task_vector"), _as_bundle(base, "task_vector")
    # No detach under no_grad (see _read_only): it would cast a mixed-dtype model whole.
    with torch.no_grad():
        return _new(_b(ft - b), finetuned)


def _kth_smallest_magnitude(b: ParameterBundle, k: int) -> torch.Tensor:
    return torch.kthvalue(b.abs(), k).values


def _keep_largest(tv: ParameterBundle, keep: float) -> ParameterBundle:
    """Zero all but the `keep` fraction of largest-magnitude entries (TIES' trim)."""
    n = tv.numel()
    k = int(math.ceil(keep * n))
    if k >= n:
        return tv
    if k <= 0:
        return _b(tv * 0)
    threshold = _kth_smallest_magnitude(tv, n - k + 1)
    return _b(torch.where(tv.abs() >= threshold, tv, torch.zeros((), dtype=tv.dtype)))


def merge(
    base: BundleLike,
    task_vectors: Sequence[BundleLike],
    weights: Sequence[float] | float = 1.0,
    trim: float | None = None,
    elect_sign: bool = False,
) -> ParameterBundle:
    """Merge task vectors into `base`: task arithmetic, or TIES with `trim` and `elect_sign`.

    Without options: `base + sum_k w_k * tv_k`. With `trim` (a fraction in (0, 1]), each task
    vector keeps only its `trim` fraction of largest magnitudes over the whole model. With
    `elect_sign`, each element takes the sign of the sum of the (trimmed, weighted) task
    vectors, and the mean of the entries that agree with it. Returns a bundle of new tensors
    (no gradient), named and with the strategy of `base`.

    Example:
        >>> import torch, modtensor as mt
        >>> base = mt.bundle([torch.zeros(4)])
        >>> tv1, tv2 = mt.bundle([torch.tensor([1.0, -2.0, 0.1, 3.0])]), mt.bundle([torch.tensor([1.0, 2.0, 0.0, -1.0])])
        >>> mt.recipes.merge(base, [tv1, tv2], weights=0.5).tensors[0]
        tensor([1.0000, 0.0000, 0.0500, 1.0000])
        >>> # trim keeps each vector's 2 largest magnitudes (ties included); -2 and 2 cancel
        >>> mt.recipes.merge(base, [tv1, tv2], trim=0.5, elect_sign=True).tensors[0]
        tensor([1., 0., 0., 3.])
    """
    b = _as_bundle(base, "merge")  # read under no_grad below, not detached (see _read_only)
    tvs = [_as_bundle(tv, "merge") for tv in task_vectors]
    if not tvs:
        raise ValueError("merge: no task vectors given.")
    for tv in tvs:  # elect_sign pairs the tensors one by one: it would drop extra ones silently
        check_same_structure("recipes.merge", b, tv)
    # one number for all: a Python or NumPy number, or a one-element tensor
    if isinstance(weights, numbers.Real) or (isinstance(weights, torch.Tensor) and weights.numel() == 1):
        ws = [float(weights)] * len(tvs)
    else:
        ws = [float(w) for w in cast(Iterable[Any], weights)]
    if len(ws) != len(tvs):
        raise ValueError(f"merge: {len(ws)} weights for {len(tvs)} task vectors.")
    if trim is not None and not 0 < trim <= 1:
        raise ValueError(f"merge: trim is the fraction of entries to keep, in (0, 1]; got {trim}.")
    with torch.no_grad():
        if trim is not None:
            tvs = [_keep_largest(tv, trim) for tv in tvs]
        scaled = [_b(tv * w) for tv, w in zip(tvs, ws)]
        if not elect_sign:
            total = scaled[0]
            for s in scaled[1:]:
                total = _b(total + s)
            return _new(_b(b + total), base)
        return _new(b.derive([_elected(b, scaled, i) for i in range(len(b.names))]), base)


def _elected(b: ParameterBundle, scaled: Sequence[ParameterBundle], i: int) -> torch.Tensor:
    # Tensor i of the sign-elected merge, a chunk at a time where every operand can make one
    # alone (each element's result reads only that element): the stack of every task
    # vector's tensor and the masks over it came to 10x the largest tensor.
    n = b._shapes[i].numel()
    size = chunk_size(b._devices[i])
    if n > size and all(x._flat_range(i, 0, 0) is not None for x in (b, *scaled)):
        result: torch.Tensor | None = None
        for start in range(0, n, size):
            stop = min(start + size, n)
            # No chunk is kept past its own step: each is its k task vectors' stack and masks.
            elected = _elect(
                cast(torch.Tensor, b._flat_range(i, start, stop)),
                torch.stack([cast(torch.Tensor, s._flat_range(i, start, stop)) for s in scaled]),
            )
            if result is None:
                result = torch.empty(n, dtype=elected.dtype, device=elected.device)
            result[start:stop] = elected
            del elected
        return cast(torch.Tensor, result).view(b._shapes[i])
    return _elect(b._tensor(i), torch.stack([s._tensor(i) for s in scaled]))


def _elect(base: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    # `stacked` is the caller's own temporary: it is overwritten rather than copied again.
    sign = stacked.sum(dim=0).sign_()
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    del sign
    # int32: summing bools as int64 casts the whole mask first (2x the stack's bytes).
    count = agree.sum(dim=0, dtype=torch.int32).clamp_(min=1)
    total = stacked.mul_(agree).sum(dim=0)
    del agree
    return base + total.div_(count)  # floating: the task vectors were scaled by a float


def magnitude_prune_(parameters: BundleLike, amount: float | int) -> ParameterBundle:
    """Zero the `amount` smallest-magnitude entries over the whole model, in place.

    As in `torch.nn.utils.prune.global_unstructured` with `L1Unstructured`, a float `amount` is
    a fraction in [0, 1], of which exactly `round(amount * N)` entries are zeroed, and an int
    is a count (so `amount=1` prunes one entry; `1.0` all of them; a bool is refused). Among
    entries tied at the threshold the first ones in the concatenation's order go. NaN counts
    as the largest magnitude, as in torch's `topk`, so NaNs go last; a pruned NaN is zeroed
    (torch's mask leaves it NaN: NaN * 0). Returns the bundle.

    Example:
        >>> import torch, modtensor as mt
        >>> w = torch.tensor([0.5, -0.1, 2.0, 0.3])
        >>> _ = mt.recipes.magnitude_prune_(mt.bundle([w]), amount=0.5)
        >>> w
        tensor([0.5000, 0.0000, 2.0000, 0.0000])
        >>> _ = mt.recipes.magnitude_prune_(mt.bundle([w]), amount=3)  # a count: 3 entries
        >>> w
        tensor([0., 0., 2., 0.])
    """
    b = _as_bundle(parameters, "magnitude_prune_")
    result = parameters if is_bundle(parameters) else b
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(
            f"magnitude_prune_: amount is a fraction (a float) or a count (an int), got {amount!r}."
        )
    n = b.numel()
    if isinstance(amount, numbers.Integral):
        if not 0 <= amount <= n:
            raise ValueError(
                f"magnitude_prune_: an int amount is a count of entries, in [0, {n}] here; got "
                f"{amount}. For a fraction, pass a float."
            )
        k = int(amount)
    else:
        if not 0 <= amount <= 1:
            raise ValueError(f"magnitude_prune_: amount is a fraction in [0, 1], got {amount}.")
        k = round(amount * n)
    if k == 0:
        return result
    with torch.no_grad():
        threshold = _kth_smallest_magnitude(b, k)
        # torch's topk(largest=False) takes NaN as the largest magnitude, so NaNs go last. A
        # NaN threshold (k beyond the other entries) compares False with everything: then all
        # the other entries go, and the NaNs are the ones tied at it.
        nan_threshold = bool(threshold.isnan())

        def below(m: torch.Tensor) -> torch.Tensor:
            return ~m.isnan() if nan_threshold else m < threshold

        def at(m: torch.Tensor) -> torch.Tensor:
            return m.isnan() if nan_threshold else m == threshold

        def magnitude_of(piece: torch.Tensor) -> torch.Tensor:
            # In the concatenation's dtype, as the threshold: a 16-bit piece would round the
            # 0-d float32 threshold to 16 bits, and entries above it would tie with it.
            return piece.abs().to(b.dtype)

        # A chunk at a time (views, written in place): a whole tensor's magnitudes, masks and
        # the tie count's int64 cumsum came to 6x the largest tensor.
        pieces = [piece for t in b.tensors for piece in flat_views(t)]
        remaining = k - sum(int(torch.count_nonzero(below(magnitude_of(p)))) for p in pieces)
        for piece in pieces:
            magnitude = magnitude_of(piece)
            prune = below(magnitude)
            if remaining > 0:
                tied = at(magnitude).reshape(-1)
                first = tied & (tied.cumsum(0) <= remaining)
                remaining -= int(torch.count_nonzero(first))
                prune |= first.reshape(piece.shape)
            piece.masked_fill_(prune, 0)
    return result


@dataclass
class DistanceReport:
    """How far two models are: global figures and the same per parameter.

    What `distance(a, b)` returns: `l2` (the L2 distance), `max_abs` (the largest
    `|a - b|`), `cosine` (the cosine similarity) and `changed_fraction` (the fraction of
    entries that differ), and `per_param`, the same four figures for each parameter name.

    Example:
        >>> import torch, modtensor as mt
        >>> r = mt.recipes.distance(torch.nn.Linear(2, 1), torch.nn.Linear(2, 1))
        >>> sorted(r.per_param), sorted(r.per_param["bias"])
        (['bias', 'weight'], ['changed_fraction', 'cosine', 'l2', 'max_abs'])
    """

    l2: float
    max_abs: float
    cosine: float
    changed_fraction: float
    per_param: dict[str, dict[str, float]] = field(default_factory=dict)


def distance(a: BundleLike, b: BundleLike) -> DistanceReport:
    """Compare two models of the same structure: L2 distance, max |a - b|, cosine similarity,
    and the fraction of entries that differ, globally and per parameter (a NaN in both at the
    same place is no difference).

    Example:
        >>> import torch, modtensor as mt
        >>> r = mt.recipes.distance(mt.bundle({"w": torch.tensor([3.0, 0.0])}), mt.bundle({"w": torch.zeros(2)}))
        >>> r.l2, r.max_abs, r.changed_fraction, r.per_param["w"]["l2"]
        (3.0, 3.0, 0.5, 3.0)
    """
    x, y = _as_bundle(a, "distance"), _as_bundle(b, "distance")  # read under no_grad (see _read_only)
    if x.group is not None or y.group is not None:
        raise UnsupportedOperationError(
            f"recipes.distance of {x.describe()}: its per-parameter figures and changed fraction "
            "would be this rank's alone. Use the global reductions: torch.dist(a, b), "
            "(a - b).abs().amax(), F.cosine_similarity(a, b, dim=0), (a - b).per_param().norm()."
        )
    with torch.no_grad():
        figures = _distance_figures(x, y)
        report = DistanceReport(figures["l2"], figures["max_abs"], figures["cosine"], figures["changed_fraction"])
        for i, name in enumerate(x.names):  # in the concatenations' dtypes, one tensor at a time
            report.per_param[name] = _distance_figures(x._tensor(i).to(x.dtype), y._tensor(i).to(y.dtype))
    return report


def _distance_figures(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    # The same torch calls serve a bundle (over the whole model) and a single tensor.
    empty = x.numel() == 0
    if not is_bundle(x):
        x, y = x.reshape(-1), y.reshape(-1)
    return {
        "l2": float(torch.dist(x, y)),
        "max_abs": 0.0 if empty else float((x - y).abs().amax()),
        "cosine": float(F.cosine_similarity(x, y, dim=0)),
        "changed_fraction": 0.0 if empty else float(torch.count_nonzero(_changed(x, y))) / x.numel(),
    }


def _changed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # NaN != NaN, but a NaN left as it was is no change (as `modtensor diff` counts them)
    return (x != y) & ~(x.isnan() & y.isnan())

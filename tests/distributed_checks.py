"""Checks that run in every rank of a real gloo process group (see test_distributed.py).

`run(rank, world, port, out_dir)` runs every check of `CHECKS` in order and writes, per rank,
`{check: None or the traceback}` to `out_dir/rank<r>.json`. Each rank computes the unsharded
reference itself, from the same seed, and compares its distributed results with it.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CHECKS: dict[str, Callable[[int, int], None]] = {}
# Checks that need torch.distributed.fsdp and DTensor.
FSDP_CHECKS: set[str] = set()


def check(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    CHECKS[fn.__name__] = fn
    return fn


# A comparison that fails on some ranks only must not stop them there: the others would go on
# to the check's next collective and wait for them. So comparisons are recorded, and a check
# fails at its end.
FAILURES: list[str] = []


def close(got: Any, want: Any, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    try:
        _close(got, want, rtol, atol)
    except AssertionError as e:
        caller = traceback.extract_stack(limit=2)[0]
        FAILURES.append(f"line {caller.lineno}: {caller.line}\n{e}")


def _close(got: Any, want: Any, rtol: float, atol: float) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            _close(g, w, rtol, atol)
        return
    if isinstance(want, bool):
        assert got is want, (got, want)
        return
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


# -- plain shards with group= ----------------------------------------------------------------------

SHAPES = {"a": (5, 3), "b": (7,), "c": (0, 2), "d": (4, 2, 2), "e": (), "f": (1,)}


def full_tensors(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """The unsharded tensors: the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=dtype) for n, s in SHAPES.items()}


def rows(n: int, world: int, rank: int) -> slice:
    """Uneven rows of dim 0 for `rank`: the last rank gets the most, the first ranks often none."""
    weights = [r * r for r in range(world)]  # 0, 1, 4, 9...: rank 0 holds nothing
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    cut = [round(n * b / total) for b in bounds]
    return slice(cut[rank], cut[rank + 1])


def shard(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    if t.dim() == 0:  # a 0-d tensor is one rank's alone: the last's
        return t.clone() if rank == world - 1 else t.new_empty(0)
    return t[rows(t.shape[0], world, rank)].clone()


def sharded(full: dict[str, torch.Tensor], world: int, rank: int, grad: bool = False) -> dict[str, torch.Tensor]:
    return {n: shard(t, world, rank).requires_grad_(grad) for n, t in full.items()}


def cat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in (tensors.values() if isinstance(tensors, dict) else tensors)])


def world_bundle(tensors: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    import modtensor as mt

    return mt.bundle(tensors, group=dist.group.WORLD, **kwargs)


REDUCTIONS: dict[str, Callable[[Any], Any]] = {
    "sum": lambda x: x.sum(),
    "sum_dim_keepdim": lambda x: torch.sum(x, dim=0, keepdim=True),
    "mean": lambda x: x.mean(),
    "prod": lambda x: (x * 0.1 + 1).prod(),
    "var": lambda x: x.var(),
    "var_correction0": lambda x: torch.var(x, correction=0),
    "std_correction2": lambda x: x.std(correction=2),
    "var_mean": lambda x: torch.var_mean(x),
    "std_mean": lambda x: torch.std_mean(x, correction=0),
    "norm2": lambda x: x.norm(),
    "norm1": lambda x: x.norm(p=1),
    "norm3": lambda x: x.norm(p=3),
    "norm0": lambda x: torch.linalg.vector_norm(x, ord=0),
    "norm_inf": lambda x: x.norm(p=float("inf")),
    "norm_neg_inf": lambda x: torch.linalg.vector_norm(x, ord=float("-inf")),
    "vector_norm": lambda x: torch.linalg.vector_norm(x),
    "linalg_norm": lambda x: torch.linalg.norm(x, ord=1),
    "amax": lambda x: x.amax(),
    "amin": lambda x: torch.amin(x),
    "max_full": lambda x: x.max(),
    "aminmax": lambda x: tuple(torch.aminmax(x)),
    "logsumexp": lambda x: torch.logsumexp(x, 0),
    "count_nonzero": lambda x: torch.count_nonzero(x > 0),
    "all": lambda x: (x > -10).all(),
    "any": lambda x: (x > 1.5).any(),
    "any_false": lambda x: (x > 100).any(),
}
DIFFERENTIABLE = [
    "sum", "mean", "prod", "var", "std_correction2", "var_mean", "norm2", "norm1", "norm3", "norm_inf",
    "amax", "amin", "logsumexp", "aminmax",
]


def _scalar(result: Any) -> torch.Tensor:
    return sum(r.sum() for r in result) if isinstance(result, tuple) else result.sum()


@check
def group_shards_values(rank: int, world: int) -> None:
    full = full_tensors()
    b = world_bundle(sharded(full, world, rank))
    assert b.group is dist.group.WORLD and b.numel() == cat(sharded(full, world, rank)).numel()
    want_all = cat(full)
    for name, f in REDUCTIONS.items():
        close(f(b), f(want_all))
        if FAILURES and not FAILURES[-1].startswith(name):
            FAILURES[-1] = f"{name}: {FAILURES[-1]}"


@check
def group_shards_float32_and_int(rank: int, world: int) -> None:
    full = full_tensors(torch.float32)
    b = world_bundle(sharded(full, world, rank))
    for f in (REDUCTIONS["sum"], REDUCTIONS["mean"], REDUCTIONS["std_correction2"], REDUCTIONS["norm2"]):
        close(f(b), f(cat(full)), rtol=1e-5, atol=1e-6)
    ints = {n: (t * 10).to(torch.int64) for n, t in full.items()}
    bi = world_bundle(sharded(ints, world, rank))
    close(bi.sum(), cat(ints).sum(), 0, 0)
    close(bi.amax(), cat(ints).amax(), 0, 0)
    close(torch.count_nonzero(bi), torch.count_nonzero(cat(ints)), 0, 0)


@check
def group_shards_nan(rank: int, world: int) -> None:
    full = full_tensors()
    full["a"][1, 1] = float("nan")
    full["d"][3, 0, 1] = float("nan")
    b = world_bundle(sharded(full, world, rank))
    close(b.nansum(), cat(full).nansum())
    close(torch.nanmean(b), torch.nanmean(cat(full)))
    close(b.sum(), cat(full).sum())  # nan on every rank
    close(b.amax(), cat(full).amax())


@check
def group_shards_inf(rank: int, world: int) -> None:
    # An inf on one rank, or -inf everywhere: the ranks holding one got NaN sums and norms
    # (their own payload re-added for autograd as inf - inf).
    for case in ("inf on the last rank", "-inf everywhere"):
        full = full_tensors()
        if case == "-inf everywhere":
            for t in full.values():
                t.fill_(float("-inf"))
        else:
            full["d"][-1, 0, 0] = float("inf")
        b = world_bundle(sharded(full, world, rank, grad=True))
        for name in ("sum", "mean", "norm1", "norm2", "norm0", "vector_norm", "amax", "var"):
            before = len(FAILURES)
            close(REDUCTIONS[name](b), REDUCTIONS[name](cat(full)))
            close(torch.nansum(b), torch.nansum(cat(full)))
            close(torch.nanmean(b), torch.nanmean(cat(full)))
            FAILURES[before:] = [f"{case}, {name}: {e}" for e in FAILURES[before:]]


@check
def group_gradients_at_inf(rank: int, world: int) -> None:
    # torch's gradient of the L2 norm at an inf element: NaN there, x / inf = 0 elsewhere; each
    # rank's norm squared again for the all_reduce gave NaN to all of that rank's elements.
    # logsumexp's, g * exp(x - result): merged through each rank's own logsumexp it was NaN
    # for every element of a rank whose own is +-inf (holding inf, or -inf alone).
    cases = {"inf on the last rank": full_tensors(), "-inf alone on the first ranks": full_tensors()}
    cases["inf on the last rank"]["d"][-1, 0, 0] = float("inf")
    for n in ("a", "b", "d"):  # (the last rank also holds finite e and f)
        cases["-inf alone on the first ranks"][n].fill_(float("-inf"))
    tests: dict[str, Callable[[Any], Any]] = {
        "norm2": REDUCTIONS["norm2"], "dist": lambda x: torch.dist(x, x.detach() * 0.5),
        "diff_norm": lambda x: (x - 1).norm(), "logsumexp": REDUCTIONS["logsumexp"],
    }
    for case, full in cases.items():
        for name, f in tests.items():
            ref = {n: t.clone().requires_grad_() for n, t in full.items()}
            f(cat(ref)).backward()
            mine = sharded(full, world, rank, grad=True)
            f(world_bundle(mine)).backward()
            for n, t in mine.items():
                before = len(FAILURES)
                close(t.grad if t.grad is not None else torch.zeros_like(t), shard(ref[n].grad, world, rank))
                FAILURES[before:] = [f"{case}, {name}, gradient of {n}: {e}" for e in FAILURES[before:]]


@check
def group_norms_where_autograd_records_on_some_ranks(rank: int, world: int) -> None:
    # Where autograd records, a rank's payload of a p > 1 norm is its sum of p-th powers, else
    # its norm: the merge read every rank's payload as its own kind, so a rank with frozen
    # shards (or none) and one with trainable shards computed different values.
    full = full_tensors()
    tests: dict[str, Callable[[Any], Any]] = {
        "norm3": REDUCTIONS["norm3"], "norm_half": lambda x: torch.linalg.vector_norm(x, ord=0.5),
        "dist3": lambda x: torch.dist(x, x.detach() * 0.5, p=3),
    }
    for layout in ("frozen on the other ranks", "none on rank 0"):
        trains = rank == world - 1
        mine = sharded(full, world, rank, grad=trains)
        if layout == "none on rank 0" and rank == 0:
            mine = {}
        for name, f in tests.items():
            before = len(FAILURES)
            ref = {n: t.clone().requires_grad_() for n, t in full.items()}
            want = f(cat(ref))
            got = f(world_bundle(mine))
            if mine:
                close(got, want)
            else:  # a rank without tensors has the default dtype
                close(got.double(), want, rtol=1e-6)
            if trains:
                got.backward()
                want.backward()
                for n, t in mine.items():
                    close(t.grad, shard(ref[n].grad, world, rank))
                    t.grad = None
            FAILURES[before:] = [f"{layout}, {name}: {e}" for e in FAILURES[before:]]
    # per tensor, the L2 norm too (its payload is a sum of squares where autograd records)
    got_norms = world_bundle(sharded(full, world, rank, grad=rank == world - 1)).per_param().norm().to_dict()
    for n, t in full.items():
        close(got_norms[n], t.norm())


@check
def group_second_derivatives_are_each_ranks_own_part(rank: int, world: int) -> None:
    # As the README says: no collective runs in backward, so a penalty on this rank's gradients
    # (create_graph=True) differentiates to its shards without the other ranks' terms.
    full = full_tensors()
    for name in ("norm2", "norm3", "logsumexp"):
        f = REDUCTIONS[name]
        mine = sharded(full, world, rank, grad=True)
        leaves = [t for t in mine.values() if t.numel()]
        value = f(world_bundle(mine))  # on every rank: a collective
        if not leaves:
            continue
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        got = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
        ref = {n: t.clone().requires_grad_() for n, t in full.items()}
        ref_grads = dict(zip(ref, torch.autograd.grad(f(cat(ref)), list(ref.values()), create_graph=True)))
        own_penalty = sum(shard(g, world, rank).square().sum() for g in ref_grads.values())
        own = torch.autograd.grad(own_penalty, list(ref.values()), retain_graph=True, allow_unused=True)
        whole = torch.autograd.grad(sum(g.square().sum() for g in ref_grads.values()), list(ref.values()))
        own_parts = [shard(o, world, rank) for n, o in zip(ref, own) if mine[n].numel()]
        whole_parts = [shard(w, world, rank) for n, w in zip(ref, whole) if mine[n].numel()]
        for g, o in zip(got, own_parts):
            close(g, o)
        others_hold_some = sum(t.numel() for t in leaves) < cat(full).numel()
        if others_hold_some and all(torch.allclose(g, w) for g, w in zip(got, whole_parts)):
            FAILURES.append(f"{name}: the whole model's second derivative, where only this rank's part was expected")


@check
def group_shards_gradients(rank: int, world: int) -> None:
    for name in DIFFERENTIABLE:
        f = REDUCTIONS[name]
        full = {n: t.requires_grad_() for n, t in full_tensors().items()}
        _scalar(f(cat(full))).backward()
        mine = sharded({n: t.detach() for n, t in full.items()}, world, rank, grad=True)
        _scalar(f(world_bundle(mine))).backward()
        for n, t in mine.items():
            close(t.grad if t.grad is not None else torch.zeros_like(t), shard(full[n].grad, world, rank))
            if FAILURES and not FAILURES[-1].startswith(name):
                FAILURES[-1] = f"{name}, gradient of {n}: {FAILURES[-1]}"


@check
def group_shards_square_sum_penalty(rank: int, world: int) -> None:
    # (b ** 2).sum(): an on-demand bundle keeps the group; its gradient is 2 * the shard.
    full = full_tensors()
    mine = sharded(full, world, rank, grad=True)
    b = world_bundle(mine)
    square = b**2
    assert square.group is b.group
    loss = (square).sum()
    close(loss, (cat(full) ** 2).sum())
    loss.backward()
    for n, t in mine.items():  # an empty shard gets no gradient (as an empty tensor in a bundle)
        close(t.grad if t.numel() else torch.zeros_like(t), 2 * t.detach())


@check
def group_ties_split_gradient_across_ranks(rank: int, world: int) -> None:
    # The maximum appears on several ranks: torch spreads the gradient over all its copies.
    full = {n: t.clamp(max=1.0) for n, t in full_tensors().items()}
    full["a"][-1, 0] = full["d"][-1, 1, 1] = full["b"][-1] = 1.0
    full["a"][-1, 1] = full["d"][-1, 1, 0] = full["a"][2, 2] = -7.0
    # rtol: the local share of a tie among tensors is computed in float32 (_extremum's c / total)
    for f in (REDUCTIONS["amax"], REDUCTIONS["norm_inf"], REDUCTIONS["aminmax"], REDUCTIONS["amin"]):
        ref = {n: t.clone().requires_grad_() for n, t in full.items()}
        _scalar(f(cat(ref))).backward()
        mine = sharded(full, world, rank, grad=True)
        _scalar(f(world_bundle(mine))).backward()
        for n, t in mine.items():
            close(t.grad if t.grad is not None else torch.zeros_like(t), shard(ref[n].grad, world, rank), rtol=1e-6)


@check
def group_ties_on_frozen_ranks_take_their_share(rank: int, world: int) -> None:
    # Rank 0's tensors are trainable, the others' frozen, and the extremum is on every rank:
    # a frozen rank counted no ties (it keeps no tensor to count them in), so rank 0's tied
    # elements took the gradient of all of them.
    g = torch.Generator().manual_seed(5)
    full = {
        "a": torch.randint(-2, 3, (4 * world, 3), generator=g).double(),
        "b": torch.randint(-2, 3, (2 * world,), generator=g).double(),
    }
    with_nan = {n: t.clone() for n, t in full.items()}
    with_nan["a"][0, 0] = with_nan["a"][-1, 1] = with_nan["b"][-1] = float("nan")
    inf = float("inf")
    tests: dict[str, tuple[dict[str, torch.Tensor], Callable[[Any], Any]]] = {
        "amax": (full, lambda x: x.amax()), "max": (full, lambda x: x.max()),
        "amin": (full, lambda x: torch.amin(x)), "min": (full, lambda x: x.min()),
        "aminmax": (full, lambda x: _scalar(tuple(torch.aminmax(x)))),
        "norm_inf": (full, lambda x: x.norm(p=inf)),
        "norm_neg_inf": (full, lambda x: torch.linalg.vector_norm(x - 0.5, ord=-inf)),  # on demand
        "dist_inf": (full, lambda x: torch.dist(x, x.detach() * 0.5, p=inf)),
        "max_nan": (with_nan, lambda x: x.max()), "min_nan": (with_nan, lambda x: torch.min(x)),
    }
    for name, (values, f) in tests.items():
        before = len(FAILURES)
        ref = {n: t.clone().requires_grad_() for n, t in values.items()}
        want = f(cat(ref))
        mine = {n: t.chunk(world)[rank].clone().requires_grad_(rank == 0) for n, t in values.items()}
        got = f(world_bundle(mine))
        close(got, want)
        if rank == 0:
            want.backward()
            got.backward()
            for n, t in mine.items():
                close(t.grad, ref[n].grad.chunk(world)[0], rtol=1e-6)
        FAILURES[before:] = [f"{name}: {e}" for e in FAILURES[before:]]
    # per tensor too: each tensor's own ties, over the ranks
    ref_b = full["b"].clone().requires_grad_()
    mine_b = full["b"].chunk(world)[rank].clone().requires_grad_(rank == 0)
    got_b = world_bundle({"b": mine_b}).per_param().amax().to_dict()["b"]
    close(got_b, ref_b.amax())
    if rank == 0:
        got_b.backward()
        ref_b.amax().backward()
        close(mine_b.grad, ref_b.grad.chunk(world)[0], rtol=1e-6)


@check
def group_nan_gradients_across_ranks(rank: int, world: int) -> None:
    # A NaN on some ranks only: torch's max() / min() give the gradient to the NaN elements
    # (evenly, on every rank), its inf-norms zeros, its amax NaN everywhere; the merge of the
    # ranks' extrema gave NaN to every rank's elements.
    tests: dict[str, Callable[[Any, Any], Any]] = {
        "max": lambda x, y: x.max(), "min": lambda x, y: torch.min(x), "amax": lambda x, y: x.amax(),
        "norm_inf": lambda x, y: x.norm(p=float("inf")),
        "norm_neg_inf": lambda x, y: torch.linalg.vector_norm(x, ord=float("-inf")),
        "dist_inf": lambda x, y: torch.dist(x, y, p=float("inf")),
    }
    for dtype in (torch.float64, torch.float32):
        # the last rank's only; then several tensors on several ranks (with 4 ranks)
        for nans in ((("a", (-1, 0)),), (("a", (1, 1)), ("d", (-1, 1, 0)), ("b", (-1,)))):
            full, other = full_tensors(dtype), full_tensors(dtype, seed=2)
            for n, i in nans:
                full[n][i] = float("nan")
            for name, f in tests.items():
                before = len(FAILURES)
                ref = {n: t.clone().requires_grad_() for n, t in full.items()}
                want = f(cat(ref), cat(other))
                want.backward()
                mine = sharded(full, world, rank, grad=True)
                got = f(world_bundle(mine), world_bundle(sharded(other, world, rank)))
                got.backward()
                close(got, want)
                for n, t in mine.items():
                    close(t.grad if t.grad is not None else torch.zeros_like(t), shard(ref[n].grad, world, rank))
                FAILURES[before:] = [f"{name}, {dtype}, NaN at {nans}: {e}" for e in FAILURES[before:]]


@check
def group_ragged_structures(rank: int, world: int) -> None:
    # Ranks hold different numbers of tensors, rank 0 none at all: the concatenation of all.
    full = full_tensors()
    names = list(full)
    mine = {n: full[n] for i, n in enumerate(names) if i % world == rank and rank != 0}
    if rank == 1:
        mine.update({n: full[n] for i, n in enumerate(names) if i % world == 0})
    b = world_bundle(mine)
    assert b.numel() == sum(t.numel() for t in mine.values())
    names = ("sum", "mean", "var", "std_mean", "norm2", "norm_inf", "amax", "aminmax", "count_nonzero", "all")
    for name in names:
        got, want = REDUCTIONS[name](b), REDUCTIONS[name](cat(full))
        # A rank without tensors cannot know their dtype: its bundle has the default dtype,
        # and so do its results (of the same value).
        close(got, want) if rank else close(_cast_like(got, want), want, rtol=1e-6, atol=1e-7)
    got, want = (b - 1).abs().sum(), (cat(full) - 1).abs().sum()  # on rank 0 an on-demand bundle of nothing
    close(got, want) if rank else close(got.double(), want, rtol=1e-6)
    # gradients: rank 0 has none, yet its b.grad is a bundle, so every rank can reduce it
    for t in mine.values():
        t.grad = torch.full_like(t, 2.0)
    grads = world_bundle(mine).grad
    assert grads is not None and grads.group is not None and len(grads.names) == len(mine)
    close(grads.norm().double(), torch.tensor(2.0 * cat(full).numel() ** 0.5, dtype=torch.float64), rtol=1e-6)


def _cast_like(got: Any, want: Any) -> Any:
    if isinstance(want, tuple):
        return tuple(_cast_like(g, w) for g, w in zip(got, want))
    return got.to(want.dtype) if isinstance(got, torch.Tensor) else got


@check
def group_dtypes_and_errors_of_some_ranks(rank: int, world: int) -> None:
    # A rank holding no tensors has the default dtype: integer sums used all_gather_object on
    # the others and all_reduce there (a hang until the timeout), and an error only the
    # others' dtype raises (the mean of integers) left it waiting in the exchange.
    full = {n: (t * 10).to(torch.int64) for n, t in full_tensors().items()}
    mine = sharded(full, world, rank) if rank else {}
    b = world_bundle(mine)
    close(b.sum().to(torch.int64), cat(full).sum(), 0, 0)
    close(torch.count_nonzero(b > 0), torch.count_nonzero(cat(full) > 0), 0, 0)
    expect = "the mean needs a floating point" if mine else "rank 1 of the group failed with RuntimeError: "
    _raises(RuntimeError, expect, lambda: b.mean())
    floats = world_bundle(sharded(full_tensors(), world, rank) if rank else {})
    # raised where there are elements; a rank without names the first that has some
    caught = _raises(RuntimeError, "doesn't match the broadcast shape", lambda: torch.logsumexp(floats, ()))
    if not floats.numel() and "of the group failed with RuntimeError" not in str(caught):
        FAILURES.append(f"logsumexp(b, ()): no failed rank named in {caught!r}")
    # int64 sums wrap as torch's do, exactly (float64 holds 53 bits)
    big = {"x": torch.tensor([2**62 + 1, 2**62 + 3, -(2**40) - 7, 2**62 + 5, 2**61 + 9] * world)}
    close(world_bundle(sharded(big, world, rank)).sum(), cat(big).sum(), 0, 0)
    # complex sums cross in the same all_reduce, with their gradient
    z = {n: torch.complex(t, t.flip(0)).requires_grad_() for n, t in full_tensors().items()}
    mine_z = sharded({n: t.detach() for n, t in z.items()}, world, rank, grad=True)
    got, want = world_bundle(mine_z).mean(), cat(z).mean()
    close(got, want)
    (got.abs()).backward()
    (want.abs()).backward()
    for n, t in mine_z.items():
        close(t.grad if t.grad is not None else torch.zeros_like(t), shard(z[n].grad, world, rank))


@check
def group_norm_and_pairwise_errors_of_some_ranks_stop_every_rank(rank: int, world: int) -> None:
    # A rank without tensors has the default dtype, so a check of the dtype fails on the other
    # ranks only. A norm's collective depends on p (all_reduce for 0, 1, 2, else
    # all_gather_object): the failed ranks raised at once and rank 0 waited in its collective
    # until the timeout; bundle-with-bundle reductions checked the dtypes before the exchange.
    import modtensor as mt

    inf = float("inf")
    full = full_tensors()
    mine = sharded(full, world, rank) if rank else {}
    ints = {n: (t * 10).long() for n, t in mine.items()}
    singles = {n: t.float() for n, t in mine.items()}
    complexes = {n: torch.complex(t, t) for n, t in mine.items()}
    cases: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Callable[..., Any], str]] = {
        "norm of integers": (ints, {}, lambda b, _: b.norm(), "a norm needs a floating point"),
        "norm3 of integers": (ints, {}, lambda b, _: b.norm(p=3), "a norm needs a floating point"),
        "inf-norm of integers": (ints, {}, lambda b, _: torch.linalg.vector_norm(b, inf), "a norm needs a floating"),
        "narrowing dtype=": (mine, {}, lambda b, _: torch.linalg.vector_norm(b, dtype=torch.float32), "would narrow"),
        "narrowing dtype=, p=3": (mine, {}, lambda b, _: torch.linalg.norm(b, 3, dtype=torch.float32), "would narrow"),
        "real dtype= of complex": (
            complexes, {}, lambda b, _: torch.linalg.vector_norm(b, inf, dtype=torch.float64), "dtype should be complex"
        ),
        "dist of integers": (ints, ints, lambda b, c: torch.dist(b, c), "input dtype should be"),
        "dist inf of integers": (ints, ints, lambda b, c: torch.dist(b, c, p=inf), "input dtype should be"),
        "dist of a local bundle and a distributed one": (
            ints, ints, lambda b, c: torch.dist(mt.bundle(list(b.tensors)), c), "input dtype should be"
        ),
        "dot of two dtypes": (mine, singles, lambda b, c: torch.dot(b, c), "expected both operands to have the same"),
        "cosine of integers": (ints, ints, lambda b, c: F.cosine_similarity(b, c, dim=0), "cosine_similarity"),
        "huber_loss of integers": (ints, ints, lambda b, c: F.huber_loss(b, c), "huber_loss"),
    }
    for name, (first, second, f, text) in cases.items():
        before = len(FAILURES)
        # a group of its own, with a short timeout: a rank left waiting fails fast, and a
        # collective it never finished does not meet the next case's
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=5))
        b, c = mt.bundle(first, group=group), mt.bundle(second, group=group)
        caught = _raises(RuntimeError, text, lambda: f(b, c))
        if rank == 0 and "rank 1 of the group failed with" not in str(caught):
            FAILURES.append(f"no failed rank named in {caught!r}")
        close(mt.bundle(mine, group=group).norm(p=3).double(), cat(full).norm(p=3), rtol=1e-6)  # the group works
        FAILURES[before:] = [f"{name}: {e}" for e in FAILURES[before:]]


@check
def group_pairwise_shapes_of_some_ranks_stop_every_rank(rank: int, world: int) -> None:
    # The operands' structures, and a plain tensor's length against them, are each rank's: a
    # rank where they did not pair raised before the exchange (or answered torch.equal alone)
    # and the others waited there until the timeout.
    import modtensor as mt

    failing = world - 1
    full = full_tensors()
    mine = sharded(full, world, rank)
    last = cat(sharded(full, world, failing)).numel()  # this length pairs on the last rank only
    odd = dict(mine, b=mine["b"][:-1]) if rank == failing else mine  # one tensor shorter there
    mismatch = "bundles of different structure"
    cases: dict[str, tuple[dict[str, torch.Tensor], Any, Callable[..., Any], type, str, list[int]]] = {
        "dist": (odd, None, lambda b, c: torch.dist(b, c), ValueError, mismatch, [failing]),
        "dist p=3": (odd, None, lambda b, c: torch.dist(b, c, p=3), ValueError, mismatch, [failing]),
        "dot": (odd, None, lambda b, c: torch.dot(b, c), ValueError, mismatch, [failing]),
        "cosine_similarity": (odd, None, lambda b, c: F.cosine_similarity(b, c, dim=0), ValueError, mismatch, [failing]),
        "mse_loss": (odd, None, lambda b, c: F.mse_loss(b, c), ValueError, mismatch, [failing]),
        "allclose": (odd, None, lambda b, c: torch.allclose(b, c), ValueError, mismatch, [failing]),
        "equal": (odd, None, lambda b, c: torch.equal(b, c), ValueError, mismatch, [failing]),
        "per_param dist": (odd, None, lambda b, c: torch.dist(b.per_param(), c), ValueError, mismatch, [failing]),
        "dot with a flat tensor of the last rank's length": (
            mine, torch.ones(last, dtype=torch.float64), lambda b, c: torch.dot(b, c), ValueError,
            "this rank's length", list(range(failing)),
        ),
        "mse_loss with a plain (1,) tensor": (
            {"x": torch.ones(1 if rank == failing else 2)}, torch.ones(1), lambda b, c: F.mse_loss(b, c),
            mt.UnsupportedOperationError, "a scalar operand", list(range(failing)),
        ),
    }
    for name, (first, other, f, kind, text, failed) in cases.items():
        before = len(FAILURES)
        # a group of its own, with a short timeout: a rank left waiting fails fast
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=5))
        b = mt.bundle(first, group=group)
        c = other if other is not None else mt.bundle(mine, group=group)
        start = time.monotonic()
        expect = text if rank in failed else f"rank {failed[0]} of the group failed with {kind.__name__}: "
        caught = _raises(kind, expect, lambda: f(b, c))
        if rank not in failed and text not in str(caught):
            FAILURES.append(f"the failed rank's reason is missing: {caught!r}")
        if time.monotonic() - start > 2.5:
            FAILURES.append(f"took {time.monotonic() - start:.1f} s: a rank waited for another")
        close(mt.bundle(mine, group=group).norm(p=3), cat(full).norm(p=3))  # the group works
        FAILURES[before:] = [f"{name}: {e}" for e in FAILURES[before:]]
    # what pairs on every rank works: a flat tensor of each rank's own length
    def flat(r: int) -> torch.Tensor:
        return torch.arange(cat(sharded(full, world, r)).numel(), dtype=torch.float64)

    want = sum(torch.dot(cat(sharded(full, world, r)), flat(r)) for r in range(world))
    close(torch.dot(world_bundle(mine), flat(rank)), want)


@check
def group_per_param_of_integers_says_what_would_work(rank: int, world: int) -> None:
    # torch's bare "Expected a floating point or complex tensor" came from the probe of each
    # kind of tensor; a local bundle's per-tensor call names the function, tensor and bundle.
    import modtensor as mt

    full = {n: (t * 10).long() for n, t in full_tensors().items()}
    b = world_bundle(sharded(full, world, rank))
    local = mt.bundle(full)
    for name, f in {
        "norm": lambda x: x.per_param().norm(),
        "vector_norm p=3": lambda x: torch.linalg.vector_norm(x.per_param(), 3),
        "weighted mean": lambda x: x.weighted().mean(),
        "std": lambda x: x.per_param().std(),
    }.items():
        before = len(FAILURES)
        want = _raises(RuntimeError, "", lambda: f(local))  # the local bundle's error
        _raises(RuntimeError, str(want).replace(local.describe(), b.describe()), lambda: f(b))
        if "cast first, e.g. `b.float()`" not in str(want):
            FAILURES.append(f"no hint in {want!r}")
        FAILURES[before:] = [f"{name}: {e}" for e in FAILURES[before:]]
    close(b.float().per_param().norm().to_dict()["a"], full["a"].float().norm())  # what the hint says works


@check
def group_empty_everywhere(rank: int, world: int) -> None:
    import modtensor as mt

    b = world_bundle({"w": torch.zeros(0, 3, dtype=torch.float64)})
    close(b.sum(), torch.zeros((), dtype=torch.float64))
    assert torch.isnan(b.mean())
    close(b.norm(), torch.zeros((), dtype=torch.float64))
    try:
        b.amax()
    except RuntimeError as e:
        assert "no elements on any rank" in str(e), e
    else:
        raise AssertionError("amax of an empty bundle did not raise")
    assert mt.bundle([], group=dist.group.WORLD).sum().item() == 0.0


@check
def group_pairwise(rank: int, world: int) -> None:
    full_a, full_b = full_tensors(seed=1), full_tensors(seed=2)
    a, b = world_bundle(sharded(full_a, world, rank)), world_bundle(sharded(full_b, world, rank))
    x, y = cat(full_a), cat(full_b)
    close(torch.dist(a, b), torch.dist(x, y))
    close(torch.dist(a, b, p=1), torch.dist(x, y, p=1))
    close(torch.dist(a, b, p=3), torch.dist(x, y, p=3))
    close(torch.dist(a, b, p=float("inf")), torch.dist(x, y, p=float("inf")))
    close((a - b).norm(), (x - y).norm())
    close(torch.dot(a, b), torch.dot(x, y))
    close(a @ b, x @ y)
    close(F.cosine_similarity(a, b, dim=0), F.cosine_similarity(x, y, dim=0))
    close(F.mse_loss(a, b), F.mse_loss(x, y))
    close(F.l1_loss(a, b, reduction="sum"), F.l1_loss(x, y, reduction="sum"))
    close(F.huber_loss(a, b), F.huber_loss(x, y))
    assert torch.allclose(a, a.clone()) is True and torch.allclose(a, b) is False
    assert torch.equal(a, a.clone()) is True and torch.equal(a, b) is False
    # local operand with a distributed one: the result is distributed too
    local = a.derive(list(a.tensors))
    local._dist = None
    close(torch.dist(local, b), torch.dist(x, y))
    assert (local - b).group is b.group
    close((local - b).norm(), (x - y).norm())


@check
def group_pairwise_gradients(rank: int, world: int) -> None:
    tests: dict[str, Callable[[Any, Any], Any]] = {
        "dist": lambda p, q: torch.dist(p, q),
        "dist_inf": lambda p, q: torch.dist(p, q, p=float("inf")),
        "cosine": lambda p, q: F.cosine_similarity(p, q, dim=0),
        "mse": lambda p, q: F.mse_loss(p, q),
        "dot": lambda p, q: torch.dot(p, q),
        "diff_norm": lambda p, q: (p - q).norm(),
    }
    for name, f in tests.items():
        ref_a = {n: t.requires_grad_() for n, t in full_tensors(seed=1).items()}
        ref_b = full_tensors(seed=2)
        f(cat(ref_a), cat(ref_b)).backward()
        mine = sharded({n: t.detach() for n, t in ref_a.items()}, world, rank, grad=True)
        f(world_bundle(mine), world_bundle(sharded(ref_b, world, rank))).backward()
        for n, t in mine.items():
            close(t.grad if t.grad is not None else torch.zeros_like(t), shard(ref_a[n].grad, world, rank))
            if FAILURES and not FAILURES[-1].startswith(name):
                FAILURES[-1] = f"{name}, gradient of {n}: {FAILURES[-1]}"


@check
def group_per_param_and_weighted(rank: int, world: int) -> None:
    full = full_tensors()
    b = world_bundle(sharded(full, world, rank))
    per_tensor: list[Callable[[Any], Any]] = [
        lambda x: x.sum(), lambda x: x.norm(), lambda x: x.std(), lambda x: torch.var_mean(x),
        lambda x: torch.linalg.vector_norm(x, keepdim=True), lambda x: x.norm(p=float("inf")), lambda x: x.amax(),
    ]
    for f in per_tensor:
        try:
            want = {n: f(t) for n, t in full.items()}
        except RuntimeError:  # amax of the empty tensor: torch raises, so does every rank
            _raises(RuntimeError, "", lambda: f(b.per_param()))
            continue
        got = f(b.per_param())
        for n in full:
            value = tuple(g.to_dict()[n] for g in got) if isinstance(got, tuple) else got.to_dict()[n]
            if n == "e" and not isinstance(value, tuple):  # keepdim: the 0-d tensor's empty shards elsewhere are 1-D, so shapes differ
                value, want[n] = value.reshape(()), want[n].reshape(())  # type: ignore[union-attr]
            close(value, want[n])
    assert b.per_param().sum().group is None  # per-tensor results are the same on every rank
    close(b.weighted().mean(), cat(full).mean())
    nonempty = [t for t in full.values() if t.numel()]
    close(b.weighted({"c": 0.0, "*": 1.0}).mean(), torch.stack([t.mean() for t in nonempty]).mean())
    close(b.weighted({"c": 0.0, "*": 1.0}).norm(), torch.stack([t.norm() for t in nonempty]).mean())
    a2 = world_bundle(sharded(full_tensors(seed=5), world, rank))
    got = torch.dist(b.per_param(), a2.per_param()).to_dict()
    for n, t in full_tensors(seed=5).items():
        close(got[n], torch.dist(full[n], t))


@check
def group_per_param_refusals(rank: int, world: int) -> None:
    import modtensor as mt

    full = full_tensors()
    b = world_bundle(sharded(full, world, rank))
    _raises(mt.UnsupportedOperationError, "leave dim out", lambda: b.per_param().sum(dim=1))
    # per_param needs the same tensors on every rank
    ragged = world_bundle({"x": torch.ones(rank + 1)} if rank else {})
    _raises(ValueError, "tensor i of every rank", lambda: ragged.per_param().sum())
    ragged_ok = world_bundle({"x": torch.ones(rank)})
    close(ragged_ok.per_param().sum().to_dict()["x"], torch.tensor(float(sum(range(world)))))


def _raises(kind: type, text: str, fn: Callable[[], Any]) -> Exception | None:
    caller = traceback.extract_stack(limit=2)[0]
    try:
        fn()
    except Exception as e:  # recorded, not raised: see FAILURES
        if not isinstance(e, kind) or text not in str(e):
            FAILURES.append(f"line {caller.lineno}: expected {kind.__name__} with {text!r}, got {e!r}")
        return e
    FAILURES.append(f"line {caller.lineno}: {caller.line}\nno {kind.__name__} raised")
    return None


@check
def group_elementwise_and_inplace_stay_local(rank: int, world: int) -> None:
    full = full_tensors()
    mine = sharded(full, world, rank)
    b = world_bundle(mine)
    doubled = b * 2
    assert doubled.group is b.group and doubled.numel() == b.numel()
    for n, t in doubled.to_dict().items():
        close(t, 2 * mine[n])
    with torch.no_grad():
        b.mul_(0.5).add_(1.0)
    for n, t in mine.items():
        close(t, shard(full[n], world, rank) * 0.5 + 1.0)
    close(b.sum(), (cat(full) * 0.5 + 1).sum())
    for derived in (b.detach(), b.clone(), b.data, b.with_strategy("concat"), b.derive(b.tensors), b.split(b.materialize())):
        assert derived.group is b.group, derived
        close(derived.sum(), (cat(full) * 0.5 + 1).sum())
    close(torch.relu(b - 1.5).sum(), torch.relu(cat(full) * 0.5 - 0.5).sum())
    assert "(shards of rank" in b.describe() and "shards of rank" in repr(b)


@check
def group_refusals(rank: int, world: int) -> None:
    import modtensor as mt

    b = world_bundle(sharded(full_tensors(), world, rank))
    refused: dict[str, Callable[[], Any]] = {
        "torch.argmax": lambda: torch.argmax(b),
        "torch.Tensor.argmin": lambda: b.argmin(),
        "torch.Tensor.max": lambda: b.max(dim=0),
        "torch.min": lambda: torch.min(b, 0),
        "torch.topk": lambda: torch.topk(b, 2),
        "torch.Tensor.median": lambda: b.median(),
        "torch.quantile": lambda: torch.quantile(b, 0.5),
        "torch.Tensor.kthvalue": lambda: b.kthvalue(1),
        "ParameterBundle.__getitem__": lambda: b[0],
        "indexing by position": lambda: b.__setitem__(0, 1.0),
        "torch.Tensor.tolist": lambda: b.tolist(),
        "torch.Tensor.item": lambda: b.item(),
        "torch.Tensor.numpy": lambda: b.numpy(),
        "torch.cumsum": lambda: torch.cumsum(b, 0),
        "torch.Tensor.sort": lambda: b.sort(),
    }
    for name, fn in refused.items():
        _raises(mt.UnsupportedOperationError, name, fn)
    _raises(mt.UnsupportedOperationError, "b.amax()", lambda: torch.argmax(b))
    _raises(mt.UnsupportedOperationError, "materialize", lambda: b[1:3])
    with mt.fallback("error"):
        _raises(mt.UnsupportedOperationError, "this rank's shards alone", lambda: torch.cumsum(b, 0))
    close(b.materialize(), cat(b.tensors))  # explicit: this rank's concatenation


@check
def group_mismatched_groups(rank: int, world: int) -> None:
    import modtensor as mt

    mine = sharded(full_tensors(), world, rank)
    sub, _ = dist.new_subgroups(1)  # each rank alone
    a, c = world_bundle(mine), mt.bundle(mine, group=sub)
    assert c.group is sub
    _raises(ValueError, "different process groups", lambda: torch.dist(a, c))
    _raises(ValueError, "different process groups", lambda: a + c)
    _raises(ValueError, "group= has ranks", lambda: mt.bundle(a, group=sub))
    _raises(TypeError, "ProcessGroup", lambda: mt.bundle(mine, group="world"))
    last = dist.new_group([world - 1])  # every rank makes it; the others are not members
    if rank == world - 1:
        close(mt.bundle(mine, group=last).sum(), cat(mine).sum())
    else:
        _raises(ValueError, "not a member of the given group", lambda: mt.bundle(mine, group=last))
    close(c.sum(), cat(mine).sum())  # a group of one: this rank's own
    _raises(mt.UnsupportedOperationError, "recipes.distance", lambda: mt.recipes.distance(a, a * 2))
    close(mt.bundle(a, include="a").sum(), full_tensors()["a"].sum())  # a bundle as source keeps the group


@check
def group_collectives_and_custom_reductions(rank: int, world: int) -> None:
    import modtensor as mt

    calls = {"all_reduce": 0, "all_gather_object": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    full = full_tensors()
    b = world_bundle(sharded(full, world, rank))
    expected = {  # one collective per reduction; sums and the 0-, 1-, 2-norms by all_reduce
        "sum": (lambda: b.sum(), "all_reduce"),
        "mean": (lambda: b.mean(), "all_reduce"),
        "norm": (lambda: (b - 1).norm(), "all_reduce"),
        "dist1": (lambda: torch.dist(b, b * 2, p=1), "all_reduce"),
        "count_nonzero": (lambda: b.count_nonzero(), "all_reduce"),
        "std": (lambda: b.std(), "all_gather_object"),
        "amax": (lambda: b.amax(), "all_gather_object"),
        "norm3": (lambda: b.norm(p=3), "all_gather_object"),
        "per_param": (lambda: b.per_param().sum(), "all_gather_object"),
    }
    try:
        for name in calls:
            setattr(dist, name, counting(name))
        for what, (fn, collective) in expected.items():
            before = dict(calls)
            fn()
            used = {k: calls[k] - before[k] for k in calls}
            if used != {k: int(k == collective) for k in calls}:
                FAILURES.append(f"{what}: collectives {used}, expected one {collective}")
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)

    # A reduction registered by another library: its combine returns a state, as documented.
    def sum_of_cubes(x: Any, dim: Any = None, keepdim: bool = False) -> Any:
        if torch.overrides.has_torch_function_unary(x):
            return torch.overrides.handle_torch_function(sum_of_cubes, (x,), x, dim=dim, keepdim=keepdim)
        return (x**3).sum()

    failing, fail_with = world - 1, [None]  # type: tuple[int, list[Exception | None]]

    def partial(t: torch.Tensor, offset: int, a: Any) -> torch.Tensor:
        if fail_with[0] is not None and rank == failing:
            raise fail_with[0]
        return (t**3).sum()

    mt.register_reduction(sum_of_cubes, partial=partial, combine=lambda s, a: torch.stack(s).sum())
    close(sum_of_cubes(b), (cat(full) ** 3).sum())
    # A partial that fails on one rank only: every rank raises, none hangs; the others the
    # same type, saying which rank failed and why.
    fail_with[0] = ValueError("no cubes here")
    expect = "no cubes here" if rank == failing else f"rank {failing} of the group failed with ValueError: no cubes here"
    _raises(ValueError, expect, lambda: sum_of_cubes(b))
    # A type that takes more than a message: RuntimeError, with the message.
    fail_with[0] = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "no text here")
    kind = UnicodeDecodeError if rank == failing else RuntimeError
    _raises(kind, "no text here", lambda: sum_of_cubes(b))
    # The same through sum's all_reduce: an on-demand input modified in place on one rank only.
    mine = sharded(full, world, rank)
    doubled = world_bundle(mine) * 2
    if rank == failing:
        with torch.no_grad():
            mine["d"].add_(0)
    expect = "modified in place" if rank == failing else f"rank {failing} of the group failed with RuntimeError: "
    caught = _raises(RuntimeError, expect, lambda: doubled.sum())
    if "modified in place" not in str(caught):
        FAILURES.append(f"the failed rank's reason is missing: {caught!r}")


# -- FSDP2 --------------------------------------------------------------------------------------


def mlp(seed: int = 0, widths: tuple[int, ...] = (5, 3, 6, 2)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (m, n) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(m, n)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def fsdp_check(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    FSDP_CHECKS.add(fn.__name__)
    return check(fn)


def sharded_mlp(world: int, root_owns_last: bool = False) -> tuple[nn.Module, nn.Module]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    reference = mlp()
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (world,))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for m in linears[:-1] if root_owns_last else linears:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, reference


@fsdp_check
def fsdp_values(rank: int, world: int) -> None:
    import modtensor as mt
    from torch.distributed.tensor import DTensor

    model, reference = sharded_mlp(world)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    b, want = mt.bundle(model), mt.bundle(reference).materialize()
    assert b.group is not None and b.names == mt.bundle(reference).names
    for name in ("sum", "mean", "std_correction2", "var_mean", "norm2", "norm1", "norm_inf", "amax", "amin",
                 "count_nonzero", "any", "all", "logsumexp"):
        close(REDUCTIONS[name](b), REDUCTIONS[name](want), rtol=1e-5, atol=1e-6)
    close(b.per_param().norm().tensors, mt.bundle(reference).per_param().norm().tensors, rtol=1e-5, atol=1e-6)
    close(b.weighted().mean(), want.mean(), rtol=1e-5, atol=1e-6)
    close(mt.bundle(model, include="*.weight").std(), mt.bundle(reference, include="*.weight").std(), rtol=1e-5, atol=1e-6)
    close(torch.dist(b, mt.bundle(model).detach() * 2), want.norm(), rtol=1e-5, atol=1e-6)


@fsdp_check
def fsdp_training_step(rank: int, world: int) -> None:
    import modtensor as mt
    from torch.distributed.tensor import DTensor

    lam = 0.1
    for root_owns_last in (False, True):
        model, reference = sharded_mlp(world, root_owns_last)
        no_grads = mt.bundle(model).grad  # before backward: an empty bundle on every rank
        assert no_grads is not None and not no_grads.names and len(no_grads.left_out) == 6
        close(no_grads.norm(), torch.zeros(()))
        torch.manual_seed(1)
        x, y = torch.randn(8, 5), torch.randn(8, 2)
        # the penalty after the forward: the root's own parameters are unsharded then
        out = model(x)
        unsharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
        assert bool(unsharded) == root_owns_last, unsharded
        loss = F.mse_loss(out, y) + lam * (mt.bundle(model) ** 2).sum()
        ref_loss = F.mse_loss(reference(x), y) + lam * (mt.bundle(reference) ** 2).sum()
        close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        ref_loss.backward()
        for (n, p), q in zip(model.named_parameters(), reference.parameters()):
            assert q.grad is not None and p.grad is not None, n
            close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6)
        grads = mt.bundle(model).grad
        assert grads is not None and grads.group is not None
        total = torch.nn.utils.get_total_norm([q.grad for q in reference.parameters()])
        close(grads.norm(), total, rtol=1e-5, atol=1e-6)
        fsdp_total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        close(grads.norm(), fsdp_total.full_tensor(), rtol=1e-5, atol=1e-6)
        # clipping: modtensor's recipe on the FSDP model equals torch's on the reference
        before = mt.recipes.clip_grad_norm_(model, 0.5)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        close(before, total, rtol=1e-5, atol=1e-6)
        for p, q in zip(model.parameters(), reference.parameters()):
            close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6)


@fsdp_check
def fsdp_training_loop_with_one_bundle(rank: int, world: int) -> None:
    # One bundle made before the loop serves every step: its shards are views of the
    # parameters, which the optimizer updates in place.
    import modtensor as mt

    model, reference = sharded_mlp(world)
    b, ref_b = mt.bundle(model), mt.bundle(reference)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(4)
    for _ in range(3):
        x, y = torch.randn(6, 5), torch.randn(6, 2)
        for m, bb, o in ((model, b, opt), (reference, ref_b, ref_opt)):
            o.zero_grad()
            (F.mse_loss(m(x), y) + 0.05 * bb.std() + 0.01 * bb.norm(p=1)).backward()
            mt.recipes.clip_grad_norm_(m, 0.3)
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6)
    close(b.std(), ref_b.std(), rtol=1e-5, atol=1e-6)


@fsdp_check
def fsdp_inplace_writes_through(rank: int, world: int) -> None:
    import modtensor as mt

    model, reference = sharded_mlp(world)
    with torch.no_grad():
        mt.bundle(model).mul_(0.5).add_(0.25)
    for p, q in zip(model.parameters(), reference.parameters()):
        close(p.full_tensor(), q.detach() * 0.5 + 0.25)
    close(mt.bundle(model).sum(), (mt.bundle(reference).materialize() * 0.5 + 0.25).sum(), rtol=1e-5, atol=1e-6)
    torch.manual_seed(2)
    x = torch.randn(3, 5)
    with torch.no_grad():
        mt.bundle(reference).mul_(0.5).add_(0.25)
    close(model(x), reference(x), rtol=1e-5, atol=1e-6)  # FSDP all-gathers the written shards
    # in grad mode: refused before any write, as for plain parameters
    b = mt.bundle(model)
    _raises(RuntimeError, "leaf Variable that requires grad", lambda: b.mul_(2))
    close(mt.bundle(model).sum(), mt.bundle(reference).sum(), rtol=1e-5, atol=1e-6)
    # a bundle made under no_grad still carries gradients to the parameters
    with torch.no_grad():
        b = mt.bundle(model)
    (b**2).sum().backward()
    for p in model.parameters():
        close(p.grad.full_tensor(), 2 * p.detach().full_tensor())


@fsdp_check
def fsdp_dtensor_errors(rank: int, world: int) -> None:
    import modtensor as mt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(12.0).reshape(6, 2)
    s = distribute_tensor(full, mesh, [Shard(0)])
    r = distribute_tensor(torch.ones(3), mesh, [Replicate()])
    b = mt.bundle({"s": s, "r": r})
    close(b.sum(), full.sum() + 3)  # a replicated tensor counts once
    close(b.mean(), (full.sum() + 3) / 15)
    close(b.std(), torch.cat([full.reshape(-1), torch.ones(3)]).std(), rtol=1e-6)
    # each replica gets the full gradient, as DDP / HSDP expect before averaging
    r2 = distribute_tensor(torch.ones(3), mesh, [Replicate()]).requires_grad_()
    (mt.bundle({"r": r2}) * 2).sum().backward()
    close(r2.grad.to_local(), torch.full((3,), 2.0))
    part = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    _raises(ValueError, "Partial", lambda: mt.bundle({"p": part}))
    _raises(TypeError, "plain tensors", lambda: mt.bundle({"s": s, "x": torch.ones(2)}))
    sub, _ = dist.new_subgroups(1)
    _raises(ValueError, "group= has ranks", lambda: mt.bundle({"s": s}, group=sub))
    close(mt.bundle({"s": s}, group=dist.group.WORLD).sum(), full.sum())
    if world >= 4:  # a 2-D mesh, as HSDP makes: replicated over dim 0, sharded over dim 1
        hsdp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        other = distribute_tensor(torch.arange(4.0), hsdp, [Replicate(), Shard(0)])
        _raises(ValueError, "different device meshes", lambda: mt.bundle({"s": s, "o": other}))
        close(mt.bundle({"o": other}).sum(), torch.tensor(6.0))
        close(mt.bundle({"o": other}).std(), torch.arange(4.0).std())


# -- DDP ----------------------------------------------------------------------------------------


@check
def ddp_bundle_is_local(rank: int, world: int) -> None:
    import modtensor as mt

    reference = mlp()
    model = nn.parallel.DistributedDataParallel(copy.deepcopy(reference))
    b = mt.bundle(model)
    assert b.group is None and b.names == tuple("module." + n for n in mt.bundle(reference).names)
    close(b.std(), mt.bundle(reference).std())
    torch.manual_seed(3)
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    (F.mse_loss(model(x), y) + 0.1 * (b**2).sum()).backward()  # DDP averages identical grads
    (F.mse_loss(reference(x), y) + 0.1 * (mt.bundle(reference) ** 2).sum()).backward()
    grads = mt.bundle(model).grad
    assert grads is not None
    close(grads.norm(), mt.bundle(reference).grad.norm(), rtol=1e-5, atol=1e-6)


# -- the worker ---------------------------------------------------------------------------------


def run(rank: int, world: int, port: int, out_dir: str, modtensor_dir: str, only: tuple[str, ...] = ()) -> None:
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    results: dict[str, str | None] = {}
    import modtensor

    here = str(Path(modtensor.__file__).resolve().parent)
    if here != modtensor_dir:
        results["setup"] = f"modtensor imported from {here}, expected {modtensor_dir}"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),  # a collective some rank never joins fails
    )
    out = Path(out_dir, f"rank{rank}.json")
    try:
        try:
            importlib.import_module("torch.distributed.fsdp")
            importlib.import_module("torch.distributed.tensor")
            fsdp = True
        except ImportError:
            fsdp = False
        for name, fn in CHECKS.items():
            if only and name not in only:
                continue
            if name in FSDP_CHECKS and not fsdp:
                results[name] = "skip: torch.distributed.fsdp is unavailable"
                continue
            FAILURES.clear()
            try:
                fn(rank, world)
                results[name] = "\n\n".join(FAILURES) if FAILURES else None
            except Exception:
                results[name] = "\n\n".join([*FAILURES, traceback.format_exc()])
            out.write_text(json.dumps(results))  # what ran so far, should a later check hang
            dist.barrier()  # a check failing on some ranks only must not desync the next one
    finally:
        out.write_text(json.dumps(results))
        dist.destroy_process_group()

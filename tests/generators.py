"""Hypothesis strategies that generate bundles, and the harness comparing them to torch.cat.

A generated case is a list of leaf tensors (1-8 of them, or none), with random shapes
including 0-numel ones and non-contiguous views, float32/float64 (or integer) dtypes, some
requiring grad, optionally with NaN/inf or many ties. Values come from a seeded torch
generator, so hypothesis shrinks over a handful of integers rather than every element.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import strategies as st

import modtensor as mt

FLOATS = (torch.float32, torch.float64)
INTS = (torch.int64, torch.int32)


@dataclass
class Case:
    leaves: list[torch.Tensor]  # what autograd differentiates with respect to
    tensors: list[torch.Tensor]  # what is bundled: the leaves, or views of them

    def bundle(self, **kwargs: Any) -> mt.ParameterBundle:
        return mt.bundle(self.tensors, **kwargs)

    def concat(self) -> torch.Tensor:
        if not self.tensors:
            return torch.empty(0, dtype=mt.bundle(self.tensors).dtype)
        return torch.cat([t.reshape(-1) for t in self.tensors])


def _values(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> torch.Tensor:
    if dtype in INTS:  # positive: no integer division by zero, which fails by value
        return torch.randint(1 if kind == "positive" else -20, 20, shape, generator=gen, dtype=dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    if kind == "ties":
        x = x.round()
    elif kind == "special" and x.numel():
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=torch.float64)
        pick = torch.randint(0, 6, shape, generator=gen)
        x = torch.where(pick < 4, specials[pick.clamp(max=3)], x)
    elif kind == "positive":
        x = x.abs() + 0.1
    return x.to(dtype)


@st.composite
def cases(
    draw: st.DrawFn,
    dtypes: tuple[torch.dtype, ...] = FLOATS,
    kinds: tuple[str, ...] = ("normal", "ties", "special"),
    min_tensors: int = 0,
    max_tensors: int = 8,
    grad: bool = True,
) -> Case:
    n = draw(st.integers(min_tensors, max_tensors))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(kinds))
    gen = torch.Generator().manual_seed(seed)
    leaves, tensors = [], []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(dtypes))
        layout = draw(st.sampled_from(["plain", "transposed", "strided"]))
        requires_grad = grad and dtype.is_floating_point and draw(st.booleans())
        if layout == "transposed" and len(shape) >= 2:
            leaf = _values(gen, shape[::-1], dtype, kind).requires_grad_(requires_grad)
            t = leaf.transpose(0, -1) if len(shape) == 2 else leaf.permute(*reversed(range(len(shape))))
        elif layout == "strided" and len(shape) >= 1:
            leaf = _values(gen, (shape[0] * 2, *shape[1:]), dtype, kind).requires_grad_(requires_grad)
            t = leaf[::2]
        else:
            leaf = _values(gen, shape, dtype, kind).requires_grad_(requires_grad)
            t = leaf
        leaves.append(leaf)
        tensors.append(t)
    return Case(leaves, tensors)


def other_like(case: Case, seed: int = 1, positive: bool = False) -> Case:
    """A second case of the same structure (same shapes and dtypes), with other values."""
    gen = torch.Generator().manual_seed(seed)
    leaves = []
    for t in case.tensors:
        x = _values(gen, tuple(t.shape), t.dtype, "positive" if positive else "normal")
        leaves.append(x.requires_grad_(t.requires_grad))
    return Case(leaves, leaves)


def track_live(lazy: mt.ParameterBundle) -> list[int]:
    """Count how many of an on-demand bundle's tensors are alive at once; returns [peak]."""
    live: list[weakref.ref[torch.Tensor]] = []
    peak = [0]
    compute = lazy._compute
    assert compute is not None, "the bundle is not computed on demand"

    def tracked(i: int) -> torch.Tensor:
        out = compute(i)
        live.append(weakref.ref(out))
        peak[0] = max(peak[0], sum(r() is not None for r in live))
        return out

    lazy._compute = tracked
    return peak



def largest_allocation(call: Callable[[], Any]) -> tuple[Any, int]:
    """The call's result and its largest single allocation, in bytes (the CPU allocator's own record)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    return result, max((e.self_cpu_memory_usage for e in prof.events()), default=0)


def peak_allocation(call: Callable[[], Any]) -> tuple[Any, int]:
    """The call's result and the most bytes it held allocated at once, in bytes, over what was
    allocated before it (the CPU allocator's running total): temporaries alive together add up."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    events, allocations = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while events:
        e = events.pop()
        events.extend(e.children)
        if e.typed[0].name == "Allocation" and e.extra_fields.device.type == "cpu":
            allocations.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
    if not allocations:
        return result, 0
    allocations.sort()
    before = allocations[0][2] - allocations[0][1]
    return result, max(total for _, _, total in allocations) - before

# -- comparing a bundle's result with the concatenation's ------------------------------------


def in_threads(check: Callable[[], None], times: int, threads: int = 4) -> None:
    """Run `check` `times` times in each of `threads` threads at once (torch lets go of the
    GIL in its kernels, where the threads then interleave); fail with the first error."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                for _ in range(times):
                    check()
        except Exception as e:  # reported below
            errors.append(e)

    started = [threading.Thread(target=work) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    assert not errors, errors[0]


def plain(result: Any) -> Any:
    if isinstance(result, mt.ParameterBundle):
        return result.materialize()
    if isinstance(result, tuple):
        return tuple(plain(r) for r in result)
    return result


def _float_outputs(result: Any) -> list[torch.Tensor]:
    flat = list(result) if isinstance(result, tuple) else [result]
    return [r for r in flat if isinstance(r, torch.Tensor) and r.requires_grad]


def _results(result: Any) -> list[torch.Tensor]:
    flat = list(result) if isinstance(result, tuple) else [result]
    return [r for r in flat if isinstance(r, torch.Tensor)]


def _scalarize(result: Any, reference: Any) -> torch.Tensor | None:
    """A weighted sum of the differentiable outputs, over the elements finite in `reference`.

    Gradients through an inf or NaN output mean nothing, and the chain rule's order decides
    whether they come out inf or NaN, so those elements are left out on both sides.
    """
    outs, refs = _float_outputs(result), _float_outputs(reference)
    if not outs:
        return None
    total, used = torch.zeros((), dtype=torch.float64), False
    for out, ref in zip(outs, refs):
        z = out.real if out.is_complex() else out
        finite = ref.detach().isfinite()
        if finite.any():
            weights = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64, device=out.device)
            weights = weights.reshape(out.shape)
            total = total + (z.double()[finite] * weights[finite]).sum()
            used = True
    return total if used else None


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    if dtype in (torch.float64, torch.complex128):
        return {"rtol": 1e-7, "atol": 1e-9}
    return {"rtol": 2e-4, "atol": 2e-4}


def assert_same(got: Any, want: Any) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            assert_same(g, w)
        return
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and not isinstance(got, mt.ParameterBundle)
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        assert got.shape == want.shape, (got.shape, want.shape)
        torch.testing.assert_close(got.detach(), want.detach(), equal_nan=True, **tolerances(want.dtype))
        return
    assert got == want, (got, want)


def check_against_concat(
    case: Case,
    call: Callable[[Any, Any], Any],
    other: Case | None = None,
    *,
    flat_other: bool = False,
    grads: bool = True,
    same_requires_grad: bool = True,
) -> None:
    """`call(x, y)` on bundles must equal `call` on the concatenations, values and gradients.

    `y` is the bundle of `other` (or, with `flat_other`, its plain concatenation). If torch
    raises on the concatenation, the bundle must raise too.
    """
    y_ref = other.concat() if other is not None else None
    try:
        want = plain(call(case.concat(), y_ref))
    except Exception as e:  # torch's own verdict on bad input
        raised = e
        want = None
    else:
        raised = None
    y = None
    if other is not None:
        y = y_ref if flat_other else other.bundle()
    with warnings.catch_warnings():
        warnings.simplefilter("error", mt.MaterializationWarning)
        if raised is not None:
            try:
                call(case.bundle(), y)
            except Exception:
                return
            raise AssertionError(f"torch raised {raised!r} on the concatenation, the bundle did not")
        got = plain(call(case.bundle(), y))
    assert_same(got, want)
    if not grads:
        return
    # The result requires grad where the concatenation's does, also where only a 0-numel
    # tensor requires grad (the bundle's partials skip it; the result is linked to it).
    for g, w in zip(_results(got), _results(want)) if same_requires_grad else ():
        assert g.requires_grad == w.requires_grad, ("requires_grad", g.requires_grad, w.requires_grad)
    # A 0-numel tensor's gradient is empty either way (compared in tests of their own).
    leaves = [t for t in case.leaves + (other.leaves if other else []) if t.requires_grad and t.numel()]
    if not leaves:
        return
    loss_want, loss_got = _scalarize(want, want), _scalarize(got, want)
    if loss_want is None or loss_got is None:
        # Differentiable on one side only: fine where that side's gradient is all zero
        # (torch.cat(...)[i] connects every tensor to the graph, the bundle just one).
        loss = loss_want if loss_got is None else loss_got
        if loss is not None:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            assert all(g is None or not g.any() for g in grads), "only one side is differentiable"
        return
    try:
        g_want = torch.autograd.grad(loss_want, leaves, allow_unused=True)
    except RuntimeError:  # torch has no gradient here (e.g. dist with p=0)
        return
    g_got = torch.autograd.grad(loss_got, leaves, allow_unused=True)
    for gw, gg, leaf in zip(g_want, g_got, leaves):
        if gw is None:
            assert gg is None or not gg.any(), "gradient where torch has none"
            continue
        if gg is None:
            assert not gw.any(), "no gradient where torch has one"
            continue
        # Gradients with respect to inf or NaN elements are not compared: torch's own
        # kernels disagree on them between vectorized and scalar paths. Where torch's
        # gradient is inf or NaN, the chain rule's order decides which: require non-finite.
        at = leaf.detach().isfinite()
        finite = gw.isfinite()
        torch.testing.assert_close(gg[at & finite], gw[at & finite], **tolerances(leaf.dtype))
        assert not gg[at & ~finite].isfinite().any(), "finite gradient where torch's is not"

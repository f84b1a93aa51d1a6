"""One launch for all of a bundle's tensors (modtensor/_multitensor.py), against torch.cat.

On a CUDA device the Triton kernels run for real. Without one, this file runs again in a
child process where Triton's interpreter runs them on the CPU (TRITON_INTERPRET=1, which
Triton reads when it is first imported, so it must be set before anything imports it). Rows,
steps and tiles are shrunk so that small tensors make several of each, as a model's tensors
do at full size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modtensor as mt
from modtensor import _multitensor
from modtensor._reductions import REDUCTIONS

from generators import _values, assert_same

pytest.importorskip("triton")  # in the test extras; optional for users

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETED else ["cuda"] if torch.cuda.is_available() else []


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the kernels itself")
def test_the_kernels_in_tritons_interpreter():
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout, child.stdout[-500:]


LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    name = request.param
    if name == "cpu":  # only where the interpreter runs the kernels
        monkeypatch.setattr(_multitensor, "DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(_multitensor, "CHUNK", 64)
    monkeypatch.setattr(_multitensor, "BLOCK", 16)
    monkeypatch.setattr(_multitensor, "TILE", 16)
    monkeypatch.setattr(_multitensor, "WARPS", 1)
    return name


@pytest.fixture
def launches(monkeypatch):
    """The ops `_multitensor.reduce` ran (None where it declined the tensors)."""
    ran: list[Any] = []
    real = _multitensor.reduce

    def spy(op: str, *args: Any, **kwargs: Any) -> Any:
        result = real(op, *args, **kwargs)
        ran.append(op if result is not None else None)
        return result

    monkeypatch.setattr(_multitensor, "reduce", spy)
    return ran


# Every op code of the kernels, and the calls that reach it.
OPS: dict[str, Callable[[Any], Any]] = {
    "sum": lambda x: x.sum(),
    "mean": torch.mean,
    "norm": lambda x: x.norm(),
    "amax": torch.amax,
    "amin": lambda x: torch.min(x),
    "var": torch.var,
    "std": lambda x: torch.std(x, correction=0),
    "var_mean": lambda x: torch.var_mean(x, correction=2),
    "std_mean": torch.std_mean,
    "sumsq": lambda x: (x ** 2).sum(),  # the chain, fused into one launch
}
PAIR_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "dist": torch.dist,
}
MORE_CALLS: dict[str, Callable[[Any], Any]] = {  # other spellings of the same ops
    "sum": torch.sum,
    "norm": torch.linalg.vector_norm,
    "amax": lambda x: torch.max(x),
    "amin": torch.amin,
    "var": lambda x: x.var(unbiased=False),
}


def test_every_kernel_op_is_tested():
    assert set(OPS) | set(PAIR_OPS) == set(_multitensor.OPS)
    assert {name for name, r in REDUCTIONS.items() if r.fused is not None} == set(OPS) - {"sumsq"}
    assert _multitensor.GRADIENTS <= set(GRADIENT_OPS)


@st.composite
def tensors(draw: st.DrawFn, device: str, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """1-6 contiguous tensors of one floating dtype, some 0-numel, some starting off the
    16-byte grid (views into a longer tensor), lengths that leave tails of 1-3 elements."""
    # Triton's interpreter stores bfloat16 wrongly (numpy has no such type): CUDA only.
    dtypes = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    dtype = dtype or draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(["normal", "special", "offset"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    out = []
    for n in draw(st.lists(st.integers(0, 150), min_size=1, max_size=6)):
        lead = draw(st.integers(0, 3))
        values = _values(gen, (lead + n,), torch.float64, "normal" if kind == "offset" else kind)
        if kind == "offset":  # a mean far from the spread: var's merge must not cancel
            values += 100.0
        t = values.to(device=device, dtype=dtype)[lead:]
        out.append(t.reshape(2, n // 2) if n % 2 == 0 and n else t)
    return out


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _assert_close(got: Any, want: Any, dtype: torch.dtype) -> None:
    if dtype not in LOW:
        assert_same(got, want)
        return
    # float16 / bfloat16 results: both accumulate in float32, then round once to the dtype.
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-2, atol=1e-2)


# The fixtures hold for every example: the device's settings, and the launches, cleared each time.
_EXAMPLES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("op", sorted(OPS))
@_EXAMPLES
@given(data=st.data())
def test_matches_the_concatenation(device, launches, op, data):
    launches.clear()
    ts = data.draw(tensors(device))
    cat = _cat(ts)
    b = mt.bundle(ts)
    with torch.no_grad():
        if cat.numel() == 0:
            return  # test_empty_bundles_take_torchs_path
        want = OPS[op](cat)
        got = OPS[op](b)
    _assert_close(got, want, cat.dtype)
    assert launches == [op]


@pytest.mark.parametrize("op", sorted(MORE_CALLS))
def test_other_spellings_take_the_kernels(device, launches, op):
    ts = [torch.randn(70, device=device), torch.randn(3, 5, device=device)]
    with torch.no_grad():
        assert_same(MORE_CALLS[op](mt.bundle(ts)), MORE_CALLS[op](_cat(ts)))
    assert launches == [op]


@_EXAMPLES
@given(data=st.data())
def test_distance_matches_the_concatenation(device, launches, data):
    launches.clear()
    xs = data.draw(tensors(device))
    ys = [torch.randn(t.shape, device=device, dtype=torch.float64).to(t.dtype) for t in xs]
    if sum(t.numel() for t in xs) == 0:
        return
    with torch.no_grad():
        want = torch.dist(_cat(xs), _cat(ys))
        got = torch.dist(mt.bundle(xs), mt.bundle(ys))
        on_demand = (mt.bundle(xs) - mt.bundle(ys)).norm()  # the chain, fused into one launch
    _assert_close(got, want, want.dtype)
    _assert_close(on_demand, want, want.dtype)
    assert launches == ["dist", "dist"]


def test_accurate_on_long_tensors_at_real_sizes(device, monkeypatch):
    # The library's own sizes: a row of CHUNK elements, steps of BLOCK, many rows combined.
    monkeypatch.setattr(_multitensor, "CHUNK", 1 << 14)
    monkeypatch.setattr(_multitensor, "BLOCK", 1024)
    monkeypatch.setattr(_multitensor, "TILE", 1024)
    monkeypatch.setattr(_multitensor, "WARPS", 4)
    gen = torch.Generator().manual_seed(0)
    ts = [(torch.randn(n, generator=gen, dtype=torch.float64) * 0.1 + 1.0) for n in (40_000, 30_001, 7)]
    ref = _cat(ts)
    b = mt.bundle([t.to(device=device, dtype=torch.float32) for t in ts])
    cat32 = _cat([t.to(device=device, dtype=torch.float32) for t in ts])
    for op in OPS:
        with torch.no_grad():
            got, flat = OPS[op](b), OPS[op](cat32)
        truth = OPS[op](ref)
        for g, f, t in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, flat, truth))):
            err, flat_err = abs(float(g) - float(t)) / abs(float(t)), abs(float(f) - float(t)) / abs(float(t))
            # as tight as the concatenation's own float32 result, or within half a float32 step
            assert err <= max(flat_err, 6e-8), (op, err, flat_err)


@pytest.mark.parametrize("lanes", ["kahan", "float64"])
def test_sums_that_cancel_keep_the_small_terms(device, launches, monkeypatch, lanes):
    # Each lane of a row adds CHUNK / BLOCK = 4 elements: 1 and three steps of 3e-8, each
    # below half a float32 step of 1. Lanes adding in float32 lose all of them and the -1s
    # of the second tensor cancel the rest: the sum would read 0 instead of 48 * 3e-8.
    monkeypatch.setattr(_multitensor, "SUM_LANES", lanes)
    x = torch.full((64,), 3e-8, dtype=torch.float64)
    x[:16] = 1.0
    y = torch.zeros(64, dtype=torch.float64)
    y[:16] = -1.0
    b = mt.bundle([x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.float32)])
    with torch.no_grad():
        for op, exact in (("sum", 48 * 3e-8), ("mean", 48 * 3e-8 / 128)):
            got = float(getattr(b, op)())
            assert abs(got - exact) <= 1e-7 * exact, (op, got, exact)
        # inf in a lane (elements 3, 19, 35, 51): the compensation must not turn it into NaN
        for special in (float("inf"), -float("inf")):
            z = x.to(device=device, dtype=torch.float32)
            z[3] = special
            assert float(mt.bundle([z, y.to(device=device, dtype=torch.float32)]).sum()) == special
        z[19] = float("inf")  # -inf and inf in one lane: NaN, as in torch
        assert torch.isnan(mt.bundle([z]).sum())
    assert launches == ["sum", "mean", "sum", "sum", "sum"]


def test_var_with_no_degrees_of_freedom_is_torchs(device, launches):
    ts = [torch.randn(3, device=device), torch.randn(2, device=device)]
    with torch.no_grad():
        for correction in (5, 7):  # torch divides by max(0, n - correction): inf, or NaN
            assert_same(torch.var(mt.bundle(ts), correction=correction), torch.var(_cat(ts), correction=correction))
        one = [torch.full((1,), 2.0, device=device)]
        assert_same(torch.std(mt.bundle(one)), torch.std(_cat(one)))
    assert launches == ["var", "var", "std"]


def test_unaligned_and_tail_rows_cover_every_element(device):
    # Each element counted once: a sum of ones is the count, in every layout.
    base = torch.ones(400, device=device)
    ts = [base[1:66], base[100:116], base[117:120], base[200:399]]
    with torch.no_grad():
        assert float(mt.bundle(ts).sum()) == sum(t.numel() for t in ts)
    b = mt.bundle(ts)
    with torch.no_grad():
        b.sum()
    ((_, plan),) = [v for k, v in b._plans.items() if isinstance(k, tuple) and k[0] == "multitensor"]
    assert 0 < plan.vector_rows < plan.table.shape[0]  # both kinds of row were used


def test_declines_what_it_cannot_do(device, launches):
    x, y = torch.randn(40, device=device), torch.randn(5, 8, device=device)
    b = mt.bundle([x, y])
    cat = _cat([x, y])
    with torch.no_grad():
        # a dtype= cast, keepdim, another norm, another strategy: the per-tensor path
        assert_same(b.sum(dtype=torch.float64), cat.sum(dtype=torch.float64))
        assert_same(b.sum(0, keepdim=True), cat.sum(0, keepdim=True))
        assert_same(b.norm(p=1), cat.norm(p=1))
        assert_same(b.per_param().sum().materialize(), torch.stack([x.sum(), y.sum()]))
        mixed = mt.bundle([x, y.double()])
        assert_same(mixed.sum(), torch.cat([x, y.double().reshape(-1)]).sum())
    assert launches == []
    # a transposed tensor: its elements are not one run in the order the table reads them
    transposed = mt.bundle([x, y.t()])
    with torch.no_grad():
        for _ in range(2):  # the second time from the bundle's cached verdict
            assert_same(transposed.sum(), _cat([x, y.t()]).sum())
    assert launches == [None, None]


# The ops whose backward is written in _multitensor (one foreach call for all the tensors).
GRADIENT_OPS: dict[str, Callable[[Any], Any]] = {
    "sum": lambda x: x.sum(),
    "mean": torch.mean,
    "norm": lambda x: x.norm(),
    "sumsq": lambda x: (x ** 2).sum(),
}


def _leaves(device: str, dtype: torch.dtype = torch.float32, zero: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(70,), (3, 5), (0,), (2, 1, 3)]
    return [
        (torch.zeros(s, dtype=dtype) if zero else torch.randn(s, generator=gen, dtype=dtype))
        .to(device).requires_grad_() for s in shapes
    ]


@pytest.mark.parametrize("op", sorted(GRADIENT_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero", [False, True], ids=["random", "zeros"])
def test_gradients_match_the_concatenation(device, launches, op, dtype, zero):
    leaves = _leaves(device, dtype, zero)
    got = GRADIENT_OPS[op](mt.bundle(leaves))
    assert launches == [op]
    want = GRADIENT_OPS[op](_cat(leaves))
    assert_same(got, want)
    # second order too: the gradient's own gradient (a Hessian-vector product)
    weights = [torch.linspace(0.5, 1.5, t.numel(), dtype=dtype, device=device).reshape(t.shape) for t in leaves]
    per_side = []
    for value in (got, want):
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        assert all(g.shape == t.shape for g, t in zip(grads, leaves))
        total = sum((g * w).sum() for g, w in zip(grads, weights))
        # a sum's gradient is constant: nothing to differentiate, on either side
        hvp = torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad else (None,) * len(leaves)
        per_side.append((grads, hvp))
    # At a zero norm the second derivative is undefined (torch's is NaN): first order only.
    compared = [grads if zero else grads + hvp for grads, hvp in per_side]
    for g_got, g_want in zip(*compared):
        if g_want is None or g_got is None:
            assert all(g is None or not g.any() for g in (g_got, g_want))
        else:
            torch.testing.assert_close(g_got, g_want, equal_nan=True)


def test_gradients_elsewhere_take_the_per_tensor_path(device, launches):
    leaves = _leaves(device)
    b = mt.bundle(leaves)
    for call in (torch.var, torch.amax, lambda x: torch.dist(x, x.detach() + 1)):
        assert_same(call(b), call(_cat(leaves)))
    assert launches == []
    squares = b ** 2
    with torch.no_grad():
        assert squares.sum().grad_fn is not None  # made with gradients, reduced without: still one
        lonely = b ** 2
    assert lonely.sum().grad_fn is None  # made without: none, as on the per-tensor path
    assert launches == ["sumsq", "sumsq"]


def test_plan_follows_tensors_that_moved(device):
    p = torch.nn.Parameter(torch.ones(50, device=device))
    b = mt.bundle([p, torch.ones(30, device=device)])
    with torch.no_grad():
        assert float(b.sum()) == 80.0
        p.data = torch.full((50,), 3.0, device=device)  # new storage, new address
        assert float(b.sum()) == 180.0


def test_plan_declines_tensors_changed_since_the_bundle_was_made(device, launches):
    # A change of size or itemsize raises before any plan (tests/test_bundle.py); one of
    # dtype alone reaches the plan, which must not read bfloat16 bits as float16.
    p = torch.nn.Parameter(torch.randn(50, device=device, dtype=torch.float16))
    q = torch.randn(30, device=device, dtype=torch.float16)
    b = mt.bundle([p, q])
    with torch.no_grad():
        b.sum()
        p.data = p.data.bfloat16()
        got = b.sum()
    assert launches == ["sum", None]
    want = torch.cat([p.detach().float(), q.float()]).sum()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_plan_needs_one_dtype_device_and_matching_sizes(monkeypatch):
    monkeypatch.setattr(_multitensor, "DEVICES", {"cpu"})  # plans only: no kernel runs here
    x, y = torch.randn(40), torch.randn(24)
    assert _multitensor._make_plan([x, y], None) is not None
    assert _multitensor._make_plan([x, y], [torch.randn(40), torch.randn(24)]) is not None
    assert _multitensor._make_plan([x, y.half()], None) is None
    assert _multitensor._make_plan([x.double(), y], None) is None
    assert _multitensor._make_plan([x, y], [torch.randn(40), torch.randn(20)]) is None
    assert _multitensor._make_plan([x, y], [torch.randn(40), torch.randn(24).double()]) is None
    assert _multitensor._make_plan([x, y], [torch.randn(40), torch.randn(24, device="meta")]) is None
    monkeypatch.setattr(_multitensor, "DEVICES", {"cuda"})
    assert _multitensor._make_plan([x, y], None) is None  # no kernels for the CPU


def test_empty_bundles_take_torchs_path(device, launches):
    empty = mt.bundle([torch.empty(0, device=device), torch.empty(0, 3, device=device)])
    with torch.no_grad():
        assert_same(empty.sum(), torch.zeros((), device=device))
        with pytest.raises(RuntimeError):
            empty.amax()
    assert launches == []


def test_chains_refuse_inputs_changed_in_place(device):
    x, y = torch.randn(40, device=device), torch.randn(40, device=device)
    a, b = mt.bundle([x]), mt.bundle([y])
    with torch.no_grad():
        difference, squares = a - b, a ** 2
        x.add_(1.0)  # after the chains were made: their values are gone
        with pytest.raises(RuntimeError, match="modified in place"):
            difference.norm()
        with pytest.raises(RuntimeError, match="modified in place"):
            squares.sum()

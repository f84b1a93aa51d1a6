"""The fast kernels (modtensor/_kernels.py) against the concatenation.

The kernels serve tensors of at least `MIN_NUMEL` elements, in rows of `ROW` and blocks of
`BLOCK` (the moments behind var and std: from `MOMENTS_MIN_NUMEL`, by rows from
`MOMENTS_ROWS_NUMEL`, in blocks of `MOMENTS_BLOCK`): the property tests shrink those sizes so
that every path (rows, a tail row, several blocks, fused chains) runs on Hypothesis' small
tensors; a few tests run real sizes.
"""

import collections
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modtensor as mt
from generators import (
    cases, check_against_concat, in_threads, largest_allocation, other_like, peak_allocation, track_live,
)
from modtensor import _kernels, _reductions, _strategies

CALLS = {
    "norm": lambda x, y: x.norm(),
    "vector_norm": lambda x, y: torch.linalg.vector_norm(x),
    "norm_1": lambda x, y: x.norm(1),
    "vector_norm_3": lambda x, y: torch.linalg.vector_norm(x, 3),
    "vector_norm_half": lambda x, y: torch.linalg.vector_norm(x, 0.5),
    "vector_norm_minus_1": lambda x, y: torch.linalg.vector_norm(x, -1),
    "sum_of_squares": lambda x, y: (x**2).sum(),
    "square_sum": lambda x, y: torch.square(x).sum(),
    "pow_sum": lambda x, y: torch.pow(x, 2.0).sum(),
    "difference_norm": lambda x, y: (x - y).norm(),
    "sub_vector_norm": lambda x, y: torch.linalg.vector_norm(torch.sub(x, y)),
    "dist": lambda x, y: torch.dist(x, y),
    "dist_1": lambda x, y: torch.dist(x, y, 1),
    "dist_3": lambda x, y: torch.dist(x, y, 3),
    "dist_half": lambda x, y: torch.dist(x, y, 0.5),
    "dist_minus_1": lambda x, y: torch.dist(x, y, -1),
    "distance_after_scaling": lambda x, y: (x * 2 - y).norm(),  # x * 2 is itself on demand
}


@pytest.mark.parametrize("name", sorted(CALLS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the sizes stay shrunk
@given(case=cases())
def test_kernels_match_concat(small_kernels, name, case):
    check_against_concat(case, CALLS[name], other_like(case))


@pytest.mark.parametrize("name", ["distance_after_scaling", "sum_of_squares"])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the sizes stay shrunk
@given(case=cases())
def test_kernels_by_chunks_match_concat(small_kernels, small_chunks, name, case):
    # on-demand operands (x * 2) read a chunk at a time, where no gradient is recorded
    check_against_concat(case, CALLS[name], other_like(case))


def test_fused_chains_use_the_kernels(small_kernels, monkeypatch):
    # A fused chain never computes its on-demand tensors, and its kernels run.
    seen = []
    monkeypatch.setattr(
        _kernels._SumOfSquares, "apply", lambda t, _f=_kernels._SumOfSquares.apply: seen.append("squares") or _f(t)
    )
    monkeypatch.setattr(
        _kernels._DiffSquares, "apply", lambda a, b, _f=_kernels._DiffSquares.apply: seen.append("diff") or _f(a, b)
    )
    x = mt.bundle([torch.randn(5, 4, requires_grad=True), torch.randn(9, requires_grad=True)])
    y = mt.bundle([torch.randn(5, 4), torch.randn(9)])
    square, difference = x**2, x - y
    peaks = track_live(square), track_live(difference)
    square.sum(), difference.norm()
    assert peaks[0][0] == peaks[1][0] == 0
    # with gradients: the twice differentiable kernels (their sums of squares)
    assert seen == ["squares", "squares", "diff", "diff"]


def test_fusion_keeps_on_demand_rules(small_kernels):
    a = torch.ones(6, requires_grad=True)
    with torch.no_grad():
        square = mt.bundle([a]) ** 2
    assert not square.sum().requires_grad  # made without grad: stays so
    u = torch.ones(6)
    diff, square = mt.bundle([u]) - mt.bundle([torch.zeros(6)]), mt.bundle([u]) ** 2
    u.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after the bundle was made"):
        square.sum()
    with pytest.raises(RuntimeError, match="modified in place after the bundle was made"):
        diff.norm()


def test_not_fused_where_semantics_differ(small_kernels):
    # Mixed dtypes promote elementwise first, and keepdim/dim/p change the reduction.
    x = mt.bundle([torch.randn(4, dtype=torch.float64), torch.randn(3)])
    for result, want in [
        ((x**2).sum(), x.materialize().pow(2).sum()),
        ((x**2).sum(dim=0, keepdim=True), x.materialize().pow(2).sum(dim=0, keepdim=True)),
        ((x - x * 3).norm(p=1), (x.materialize() * -2).norm(p=1)),
        ((x**3).sum(), x.materialize().pow(3).sum()),
    ]:
        torch.testing.assert_close(result, want)


def test_real_sizes_are_more_accurate_than_the_concatenation():
    torch.manual_seed(0)
    tensors = [torch.randn(4_200_003) * 0.02 + 0.01, torch.randn(5 * _kernels.BLOCK + 5) * 0.5, torch.randn(10)]
    others = [t + 0.001 * torch.randn_like(t) for t in tensors]
    exact = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    exact_dist = math.sqrt(sum(float((t.double() - o.double()).pow(2).sum()) for t, o in zip(tensors, others)))
    b, o = mt.bundle(tensors), mt.bundle(others)
    cat, cat_other = b.materialize(), o.materialize()
    for got, want, concat in [
        (b.norm(), exact, cat.norm()),
        ((b**2).sum(), exact**2, (cat**2).sum()),
        ((b - o).norm(), exact_dist, (cat - cat_other).norm()),
        (torch.dist(b, o), exact_dist, torch.dist(cat, cat_other)),
    ]:
        assert abs(float(got) - want) <= max(abs(float(concat) - want), 1e-7 * want)



@pytest.mark.parametrize("p", [1, 3, 0.5, -1.5])
def test_long_tensors_p_norms_by_rows(p):
    # torch's float32 p-norm of one long tensor is about 1e-3 off; by rows, combined in
    # float64, about 1e-8, with or without a gradient to record (sums of p-th powers then)
    torch.manual_seed(0)
    tensors = [torch.randn(_kernels.NORM_ROWS_NUMEL + 5) * 0.02 + 0.01, torch.randn(10)]
    exact = float(sum(t.double().abs().pow(p).sum() for t in tensors)) ** (1 / p)
    concat = float(torch.cat(tensors).norm(p))
    assert abs(concat - exact) > 1e-5 * exact  # (else this test could not fail)
    assert abs(float(mt.bundle(tensors).norm(p)) - exact) < 1e-6 * exact
    trained = [t.clone().requires_grad_() for t in tensors]
    norm = torch.linalg.vector_norm(mt.bundle(trained), p)
    assert abs(float(norm.detach()) - exact) < 1e-6 * exact
    norm.backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in trained)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, grad", [
    ((1 << 20) + 7, True),  # DIFF_ROWS_NUMEL: by blocks of the difference, even where autograd records
    ((1 << 18) + 5, False),  # past BLOCK, without a gradient: by blocks too
    ((1 << 16) + 3, False),  # from DIST_MAX_NUMEL, without a gradient: in the kept block buffer
])
def test_differences_are_never_made_whole(dtype, n, grad):
    # `(a - b).norm()` and `torch.dist` form their differences in one kept block buffer: a
    # whole one is a new allocation per call, whose page faults made the time of GPT-2's
    # distance vary 3x between processes (and ResNet-50's 2.3x with allocations from 128 KiB
    # mapped afresh, as glibc does in some states). With a gradient, from DIFF_ROWS_NUMEL.
    assert n >= _kernels.DIFF_ROWS_NUMEL or _kernels.DIST_MAX_NUMEL < n <= _kernels.DIFF_ROWS_NUMEL
    g = torch.Generator().manual_seed(0)
    xs, ys = ([torch.randn(n, dtype=dtype, generator=g), torch.randn(5, dtype=dtype, generator=g)] for _ in range(2))
    xs[0].requires_grad_(grad)
    a, b = mt.bundle(xs), mt.bundle(ys)
    want = (torch.cat(xs).double() - torch.cat(ys).double()).norm()
    for reduce in (lambda: (a - b).norm(), lambda: torch.dist(a, b)):
        reduce()  # the block buffer is made once (on first use) and kept
        got, peak = largest_allocation(reduce)
        assert peak < n * dtype.itemsize / 2, peak  # none of the difference's size
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
        if grad:
            got.backward()
            torch.testing.assert_close(xs[0].grad, (xs[0] - ys[0]).detach() / got.detach())
            xs[0].grad = None


@pytest.mark.parametrize("p", [1, 3, 0.5, -1])
def test_p_norms_from_sums_of_powers(monkeypatch, p):
    # Without a gradient, the p-norms (p other than 0, 2, inf) of float32 and float64 tensors
    # from POWERS_MIN_NUMEL elements add |x| ** p by rows in float64, not by torch's norm kernel.
    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda x, *a, **k: calls.append(x.numel()) or real(x, *a, **k))
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        sizes = (_kernels.POWERS_MIN_NUMEL, 3 * _kernels.BLOCK + 7, 50)
        tensors = [torch.randn(n, dtype=dtype, generator=g) for n in sizes]
        exact = float(sum(t.double().abs().pow(p).sum() for t in tensors)) ** (1 / p)
        calls.clear()
        with torch.no_grad():
            got = mt.bundle(tensors).norm(p)
        assert abs(float(got) - exact) <= 1e-7 * exact
        assert all(n < _kernels.POWERS_MIN_NUMEL for n in calls)  # the short one and the combine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 3, 0.5, -1])
def test_p_distances_by_rows_without_a_difference(dtype, p):
    # torch.dist(a, b, p) for p other than 0, 2 and infinities: from POWERS_MIN_NUMEL elements,
    # without a gradient, the difference a block at a time (no fresh a - b, whose page faults
    # made GPT-2's 1-distance take 90 or 150 ms from one process to the next) and by rows
    # added in float64: torch's float32 dist of 3M elements is 1.6e-4 (p=1) to 6e-4 off.
    g = torch.Generator().manual_seed(0)
    for n in (_kernels.POWERS_MIN_NUMEL + 3, _kernels.BLOCK * 3 + 5):
        xs, ys = ([torch.randn(n, dtype=dtype, generator=g), torch.randn(5, dtype=dtype, generator=g)] for _ in range(2))
        a, b = mt.bundle(xs), mt.bundle(ys)
        want = torch.dist(torch.cat(xs).double(), torch.cat(ys).double(), p)
        with torch.no_grad():
            torch.dist(a, b, p)  # the block buffer is made once and kept
            got, peak = largest_allocation(lambda: torch.dist(a, b, p))
        assert peak < n * dtype.itemsize / 2, peak  # none of the difference's size
        assert abs(float(got) - float(want)) <= 1e-6 * float(want)
        # with a gradient: torch's own (its backward needs the difference)
        xs[0].requires_grad_(True)
        got = torch.dist(mt.bundle(xs), b, p)
        got.backward()
        expected = torch.autograd.grad(torch.dist(torch.cat(xs), torch.cat(ys), p), xs[0])[0]
        torch.testing.assert_close(xs[0].grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("p", [1, 3, 0.5, -1])
def test_p_distances_at_the_edges_of_the_range_are_torchs(p):
    # The sum of powers behind torch.dist(a, b, p) over- and underflows as torch's float32 one
    # does, element by element: inf past the float32 range, 0 under it, and p < 0 at a zero
    # difference an infinite sum, so a distance of 0. NaN and inf pass.
    n = _kernels.POWERS_MIN_NUMEL + 3
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g)
    fills = {
        "overflow": base * 1e13, "underflow": base * 1e-16, "equal": torch.zeros(n),
        "one zero": base.clone().index_fill_(0, torch.tensor([7]), 0.0),
        "nan": base.clone().index_fill_(0, torch.tensor([7]), float("nan")),
        "inf": base.clone().index_fill_(0, torch.tensor([7]), float("inf")),
    }
    for name, difference in fills.items():
        y = torch.zeros(n) if name in ("overflow", "underflow") else torch.randn(n, generator=g)
        x = y + difference
        want = torch.dist(x, y, p)
        with torch.no_grad():
            got = torch.dist(mt.bundle([x]), mt.bundle([y]), p)
        assert got.dtype == want.dtype
        if math.isnan(float(want)) or math.isinf(float(want)) or float(want) == 0:
            assert str(float(got)) == str(float(want)), name
        else:
            assert abs(float(got) - float(want)) <= 1e-3 * abs(float(want)), name


def test_real_size_gradients():
    torch.manual_seed(0)
    p = [torch.randn(4_200_000, requires_grad=True), torch.zeros(70_000, requires_grad=True)]
    q = [torch.randn(4_200_000, requires_grad=True), torch.zeros(70_000, requires_grad=True)]
    ((mt.bundle(p) ** 2).sum() + (mt.bundle(p) - mt.bundle(q)).norm()).backward()
    cat_p = torch.cat([t.detach().reshape(-1) for t in p]).requires_grad_()
    cat_q = torch.cat([t.detach().reshape(-1) for t in q]).requires_grad_()
    ((cat_p**2).sum() + (cat_p - cat_q).norm()).backward()
    torch.testing.assert_close(torch.cat([t.grad for t in p]), cat_p.grad)
    torch.testing.assert_close(torch.cat([t.grad for t in q]), cat_q.grad)


# -- var and std from raw moments ----------------------------------------------------------------

VAR_CALLS = {
    "var": lambda x, y: x.var(),
    "std": lambda x, y: torch.std(x),
    "var_correction_0": lambda x, y: torch.var(x, correction=0),
    "std_dim_keepdim": lambda x, y: x.std(dim=0, keepdim=True),
    "std_unbiased_false": lambda x, y: torch.std(x, False),
}
# With +-inf, torch's Welford mean depends on the element order (see tests/op_specs.py): finite only.
MEAN_CALLS = {
    "var_mean": lambda x, y: torch.var_mean(x),
    "var_mean_correction_0": lambda x, y: torch.var_mean(x, correction=0),
    "std_mean_dim_keepdim": lambda x, y: torch.std_mean(x, 0, keepdim=True),
}


@pytest.fixture
def var_paths():
    """How many var partials took each path: "moments", "rejected" (moments taken, then
    torch's var for accuracy) or "torch" (no moments served)."""
    paths = collections.Counter()
    moments, by_moments = _reductions.moments, _reductions._var_by_moments

    def spy(x, plans=None):
        served = moments(x) is not None
        state = by_moments(x, plans)
        paths["moments" if state is not None else "rejected" if served else "torch"] += 1
        return state

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_reductions, "_var_by_moments", spy)
        yield paths


@pytest.mark.parametrize("name", sorted(VAR_CALLS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_var_matches_concat(small_kernels, name, case):
    check_against_concat(case, VAR_CALLS[name])


@pytest.mark.parametrize("name", sorted(MEAN_CALLS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(kinds=("normal", "ties")))
def test_var_mean_matches_concat(small_kernels, name, case):
    check_against_concat(case, MEAN_CALLS[name])


@pytest.mark.parametrize("name", sorted(VAR_CALLS) + sorted(MEAN_CALLS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_var_without_autograd_matches_concat(small_kernels, name, data):
    # Without autograd recording, the long tensors' moments are taken together (one state).
    kinds = ("normal", "ties") if name in MEAN_CALLS else ("normal", "ties", "special")
    case = data.draw(cases(grad=False, kinds=kinds))
    with torch.no_grad():
        check_against_concat(case, {**VAR_CALLS, **MEAN_CALLS}[name], grads=False)


def test_long_tensors_moments_together(small_kernels, var_paths):
    # Rows from 5 elements (small_kernels): the float32 tensors' moments in one call (also the
    # one of 3 elements, too short for rows alone), the float16 one's (not the bundle's
    # dtype: cast first) alone; with autograd recording, each tensor alone.
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(40, generator=gen) + 0.5, torch.randn(6, 5, generator=gen) * 0.1 + 1,
        torch.randn(3, generator=gen), torch.randn(7, generator=gen) * 3,
        torch.randn(9, generator=gen).half(),
    ]
    cat = torch.cat([t.reshape(-1).float() for t in tensors])
    b = mt.bundle(tensors)
    with torch.no_grad():
        got = (b.var(), *torch.std_mean(b, correction=0))
    assert var_paths == {"moments": 4}
    exact = (cat.double().var(), *torch.std_mean(cat.double(), correction=0))
    for g, w, e in zip(got, (cat.var(), *torch.std_mean(cat, correction=0)), exact):
        assert _relative_error(g, e) <= _relative_error(w, e) + 1e-7
    var_paths.clear()
    b = mt.bundle([t.requires_grad_() if t.dtype == torch.float32 else t for t in tensors])
    b.var().backward()
    assert var_paths == {"torch": 4, "moments": 1}  # the float16 one needs no gradient


def test_long_tensors_moments_together_within_a_percent_of_the_model():
    # The rows of all the long tensors are kept at once (float32: 0.39% of a float16 model);
    # widened to float64 all at once too, they took 1.2% of it. (The float16 blocks' float32
    # buffer is kept between calls: made by the first.)
    tensors = [torch.randn(1 << 20).half() for _ in range(10)]
    b = mt.bundle(tensors)
    with torch.no_grad():
        b.var()
        got, peak = peak_allocation(b.var)
    assert peak <= 0.01 * sum(t.numel() * t.element_size() for t in tensors), peak
    torch.testing.assert_close(got, torch.cat(tensors).float().var().half())


def _relative_error(got, want):
    return abs(float(got.detach()) - float(want)) / abs(float(want))


def test_var_paths(small_kernels, var_paths):
    # Each tensor alone, in a bundle: as accurate as the concatenation, and the path taken.
    torch.manual_seed(0)
    cases = [
        (torch.randn(40), "moments"),  # rows of 3 in blocks of 6, a tail row
        (torch.randn(4, dtype=torch.float64) + 1, "moments"),  # in float64
        (torch.randn(40) * 1e-3 + 1000, "rejected"),  # |mean| >> std: cancellation
        (torch.randn(40) * 1e19, "rejected"),  # squares overflow float32 (the variance does not)
        (torch.randn(40) * 1e-18, "rejected"),  # squares near float32's underflow (the variance too)
        (torch.full((40,), 0.1), "rejected"),  # no spread: M2 is 0
        (torch.randn(40, requires_grad=True), "torch"),  # the gradient stays torch's
        (torch.randn(8, 5).t(), "torch"),  # not contiguous
        (torch.randn(1), "torch"),  # below MOMENTS_MIN_NUMEL
    ]
    for t, path in cases:
        var_paths.clear()
        b, cat = mt.bundle([t]), t.detach().reshape(-1)
        for c in (0, 1):
            got = (*torch.var_mean(b, correction=c), b.std(correction=c))
            # torch's var, not var_mean: the fallback's kernel (var_mean's is more accurate at a
            # cancellation like 1000 +- 1e-3, var's 2e-3 off there, but 5x slower)
            concat = (cat.var(correction=c), cat.mean(), cat.std(correction=c))
            exact = (*torch.var_mean(cat.double(), correction=c), cat.double().std(correction=c))
            for g, w, e in zip(got, concat, exact):
                assert g.dtype == t.dtype
                if e == 0 or e.isnan():  # no spread; one element with correction 1
                    torch.testing.assert_close(g, w, equal_nan=True)
                else:
                    assert _relative_error(g, e) <= _relative_error(w, e) + 1e-6, (t, path, g, w, e)
        assert dict(var_paths) == {path: 4}, (t, dict(var_paths))


def test_cancellation_is_caught(small_kernels, var_paths):
    # The raw moments of these values leave nothing of M2; the partial sees it and uses torch's var.
    x = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 1e-3 + 1000
    s1, s2 = _kernels.moments(x)
    raw = float(s2 - s1 * s1 / x.numel()) / (x.numel() - 1)
    want = float(x.double().var())
    assert abs(raw - want) > want  # the moments alone would be useless here
    torch.testing.assert_close(mt.bundle([x]).var(), x.var())  # torch's (itself 2e-3 off here)
    assert var_paths == {"rejected": 1}


def test_nan_inf_and_empty_tensors(small_kernels, var_paths):
    finite = torch.randn(40)
    for special in (float("nan"), float("inf"), -float("inf")):
        t = finite.clone()
        t[7] = special
        tensors = [t, torch.zeros(0), torch.randn(3, 0), finite]
        b, cat = mt.bundle(tensors), torch.cat([u.reshape(-1) for u in tensors])
        torch.testing.assert_close(b.var(), cat.var(), equal_nan=True)
        torch.testing.assert_close(b.std(correction=0), cat.std(correction=0), equal_nan=True)
    # The empty tensors have no partial. The two others' moments are taken together first,
    # rejected for the special value, then each tensor's alone.
    assert var_paths == {"rejected": 12, "moments": 6}


def test_gradients_go_through_torchs_var(small_kernels, var_paths):
    leaves = [torch.randn(40, requires_grad=True), torch.randn(7, 3, dtype=torch.float64, requires_grad=True)]
    frozen = torch.randn(30)
    (mt.bundle([*leaves, frozen]).std() * 3).backward()
    assert var_paths == {"torch": 2, "moments": 1}
    cat = [t.detach().double().reshape(-1).requires_grad_() for t in leaves]
    (torch.cat([*cat, frozen.double()]).std() * 3).backward()
    for leaf, want in zip(leaves, cat):
        torch.testing.assert_close(leaf.grad.reshape(-1).double(), want.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no gradient wanted: the moments serve them too
        mt.bundle(leaves).std()
    assert var_paths == {"torch": 2, "moments": 3}


def test_complex_keeps_torchs_var(small_kernels, monkeypatch):
    monkeypatch.setattr(_reductions, "moments", lambda *args: pytest.fail("moments taken"))
    tensors = [torch.randn(40, dtype=torch.complex64), torch.randn(3, 4, dtype=torch.complex64)]
    b, cat = mt.bundle(tensors), torch.cat([t.reshape(-1) for t in tensors])
    for got, want in [(b.var(), cat.var()), *zip(torch.std_mean(b), torch.std_mean(cat))]:
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


NARROW = [torch.float16, torch.bfloat16]
NARROW_CALLS = {
    "sum": lambda x, y: x.sum(),
    "mean": lambda x, y: x.mean(),
    "nansum": lambda x, y: x.nansum(),
    "nanmean": lambda x, y: x.nanmean(),
    "var": lambda x, y: x.var(),
    "std": lambda x, y: torch.std_mean(x)[0],
    "norm": lambda x, y: x.norm(),
    "sum_of_squares": lambda x, y: (x**2).sum(),
    "difference_norm": lambda x, y: (x - y).norm(),
    "dist": lambda x, y: torch.dist(x, y),
    "logsumexp": lambda x, y: torch.logsumexp(x, 0),
    "norm_1": lambda x, y: torch.linalg.vector_norm(x, 1),
    "dist_3": lambda x, y: torch.dist(x, y, 3),
    "dot": lambda x, y: torch.dot(x, y),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_p_norms_from_sums_of_powers(monkeypatch, dtype):
    # Read by float32 blocks, the 16-bit p-norms and p-distances of other orders than 2 add
    # |x| ** p of each block (torch's vector_norm of such p: 2-9x slower), in float64.
    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda x, *a, **k: calls.append(x.numel()) or real(x, *a, **k))
    g = torch.Generator().manual_seed(0)
    n = 2 * _kernels.BLOCK + 5
    x, y = (torch.randn(n, generator=g).to(dtype) for _ in range(2))
    for p in (1, 3, 0.5, -1):
        # (the kernel's partial, wide: a bundle's result is rounded to 16 bits, often inf)
        for got, want in [
            (lambda: _kernels.wide_norm(x, p), x.double().norm(p)),
            (lambda: _kernels.wide_norm(x, p, y), torch.dist(x.double(), y.double(), p)),
        ]:
            calls.clear()
            with torch.no_grad():
                value = float(got())
            assert abs(value - float(want)) <= 1e-6 * float(want), (p, value, float(want))
            assert calls == []  # no vector_norm of a block


def _narrow_case(dtype, sizes):
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(n, generator=g) * 0.02 + 0.01).to(dtype) for n in sizes]
    others = [(t.float() + 0.001 * torch.randn(t.shape, generator=g)).to(dtype) for t in tensors]
    return mt.bundle(tensors), mt.bundle(others)


@pytest.mark.parametrize("name", sorted(NARROW_CALLS))
@pytest.mark.parametrize("dtype", NARROW)
def test_16_bit_kernels_match_concat(small_kernels, dtype, name):
    # Every path (rows, a tail row, several blocks converted to float32) on small tensors.
    b, o = _narrow_case(dtype, [40, 7, 3, 1])
    call = NARROW_CALLS[name]
    got, want = call(b, o), call(b.materialize(), o.materialize())
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", NARROW)
def test_16_bit_reductions_are_accurate_and_copy_nothing(dtype):
    # torch's float16 norm of a long tensor is off by percents, and its float32 sum or var of
    # one (the concatenation's accumulator) made a whole float32 copy: twice the tensor.
    n = 1 << 21
    b, o = _narrow_case(dtype, [n, 3000])
    cat, cat_other = b.materialize(), o.materialize()
    for name, call in NARROW_CALLS.items():
        call(b, o)  # the blocks' buffer is made once and kept
        got, largest = largest_allocation(lambda: call(b, o))
        exact = call(cat.double(), cat_other.double())
        concat = call(cat, cat_other)
        assert got.dtype == concat.dtype == dtype, name
        assert abs(got.double() - exact) <= abs(concat.double() - exact), name
        assert largest <= n * 2 // 16, (name, largest)


UNROUNDED_CALLS = {
    **{name: NARROW_CALLS[name] for name in ("dist", "difference_norm", "dot", "logsumexp", "norm", "sum_of_squares")},
    **{f"norm_{p}": (lambda x, y, p=p: torch.linalg.vector_norm(x, p)) for p in (0, 1, 3.5, 0.5, -1)},
    **{f"dist_{p}": (lambda x, y, p=p: torch.dist(x, y, p)) for p in (0, 1, 3, -2)},
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("sizes", [(300, 5000, 7000, 3), (300, 70000, 3)], ids=["short", "long"])
@pytest.mark.parametrize("name", sorted(UNROUNDED_CALLS))
def test_16_bit_partials_do_not_round(name, sizes, grad):
    # A 16-bit partial rounds before the combine, where the concatenation's float32
    # accumulator rounds once: `torch.dist` was worse than the concatenation's in 23 of 300
    # such draws, logsumexp in 38, norms of order 1 of long tensors in 3 of 20. Each draw must
    # be at least as close to float64. ("long": 64Ki elements or more, read by blocks.)
    call = UNROUNDED_CALLS[name]
    for seed in range(40 if len(sizes) == 4 else 10):
        g = torch.Generator().manual_seed(seed)
        for dtype in NARROW:
            xs = [(torch.randn(n, generator=g) * (1 + seed % 3)).to(dtype).requires_grad_(grad) for n in sizes]
            ys = [(torch.randn(n, generator=g) + 0.3).to(dtype) for n in sizes]
            cat_x, cat_y = (torch.cat([t.detach().reshape(-1) for t in ts]) for ts in (xs, ys))
            got = call(mt.bundle(xs), mt.bundle(ys)).detach().double()
            exact = call(cat_x.double(), cat_y.double())
            assert abs(got - exact) <= abs(call(cat_x, cat_y).double() - exact), (seed, dtype)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtypes", ["float32", "mixed"])
@pytest.mark.parametrize("name", ["var", "std", "var_mean", "std_mean", "logsumexp"])
def test_float32_partials_of_short_tensors_do_not_round(name, dtypes, grad):
    # torch's CPU var of float32 accumulates in float64 and rounds once; the short tensors'
    # float32 partials rounded before the combine: worse than the concatenation's in 3-4 of 20
    # draws, never better. logsumexp's, in 6 of 7 differing draws of bundles mixing bfloat16
    # and float32 tensors (whose float32 result the 16-bit tensors join as float32 copies).
    call = (lambda x: torch.logsumexp(x, 0)) if name == "logsumexp" else getattr(torch, name)
    kinds = (torch.float32,) * 4 if dtypes == "float32" else (torch.bfloat16, torch.float32, torch.bfloat16, torch.float16)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        xs = [
            (torch.randn(n, generator=g) * (1 + seed % 3)).to(kind).requires_grad_(grad)
            for n, kind in zip((300, 5000, 7000, 3), kinds)
        ]
        cat = torch.cat([t.detach() for t in xs])
        got = call(mt.bundle(xs))
        want, exact = call(cat), call(cat.double())
        for g_, w, e in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want, exact))):
            assert g_.dtype == w.dtype == torch.float32
            assert abs(g_.detach().double() - e) <= abs(w.double() - e), (seed, float(g_), float(w), float(e))


@pytest.mark.parametrize("n", [3000, 1 << 17], ids=["short", "long"])
@pytest.mark.parametrize("dtype", NARROW)
def test_16_bit_dot_products_do_not_overflow_and_keep_no_copies(dtype, n):
    # Each tensor's float16 dot product passes the largest float16 (65504) where their sum,
    # the concatenation's, does not: the partials were inf and the result NaN. (bfloat16 has
    # float32's range: where it overflows, the concatenation's float32 accumulator does too.)
    scale = 4 * 65504 / (3 * n) if dtype == torch.float16 else 1.0  # each dot 4x the largest
    x = [torch.full((n,), scale, dtype=dtype, requires_grad=True), torch.full((n,), scale, dtype=dtype)]
    y = [torch.full((n,), 3.0, dtype=dtype), torch.full((n,), -2.9375, dtype=dtype)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = torch.dot(mt.bundle(x), mt.bundle(y))
    cat_x = torch.cat(x).detach().requires_grad_()
    want = torch.dot(cat_x, torch.cat(y))
    assert torch.isfinite(want) and got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(x[0].grad, cat_x.grad[:n], rtol=0, atol=0)
    if n >= _kernels.NARROW_MIN_NUMEL:  # by blocks: autograd keeps the 16-bit tensors themselves
        assert all(t.dtype == dtype for t in saved), [t.dtype for t in saved]


@pytest.mark.parametrize("name", ["norm", "dist", "difference_norm"])
@pytest.mark.parametrize("dtype", NARROW)
def test_16_bit_norm_gradients_keep_the_factor_wide(dtype, name):
    # The backward's factor g / norm was rounded to 16 bits before it multiplied: for a norm
    # past about 8000 it is a float16 subnormal, and a bfloat16 factor keeps 8 bits, so the
    # gradients were further from float64 than the concatenation's (5.2e-4 against 4.8e-4,
    # 3.8e-3 against 2.8e-3).
    call = NARROW_CALLS[name]
    for scale in (10.0, 100.0):
        g = torch.Generator().manual_seed(0)
        xs = [(torch.randn(n, generator=g) * scale).to(dtype).requires_grad_() for n in (1 << 20, 300)]
        ys = [torch.zeros(n, dtype=dtype) for n in (1 << 20, 300)]
        call(mt.bundle(xs), mt.bundle(ys)).backward()
        cat = torch.cat([x.detach() for x in xs]).requires_grad_()
        call(cat, torch.cat(ys)).backward()
        exact = torch.cat([x.detach() for x in xs]).double().requires_grad_()
        call(exact, torch.cat(ys).double()).backward()
        got = torch.cat([x.grad for x in xs]).double()
        assert (got - exact.grad).abs().max() <= (cat.grad.double() - exact.grad).abs().max(), scale


@pytest.mark.parametrize("dtype", NARROW)
def test_16_bit_norm_gradients(dtype):
    x = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype).requires_grad_()
    small = torch.randn(30).to(dtype).requires_grad_()
    mt.bundle([x, small]).norm().backward()
    exact = torch.cat([x.detach().double(), small.detach().double()])
    want = exact / exact.norm()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(torch.cat([x.grad, small.grad]).double(), want, rtol=2 * eps, atol=1e-7)


def test_moments_are_the_float64_sums():
    # Real sizes: each regime, a tail row, several blocks with a partial one.
    torch.manual_seed(0)
    rows, block = _kernels.MOMENTS_ROWS_NUMEL, _kernels.MOMENTS_BLOCK
    sizes = [_kernels.MOMENTS_MIN_NUMEL, rows - 1, rows, rows + _kernels.ROW + 7, 2 * block + 3 * _kernels.ROW + 5]
    for n in sizes:
        for dtype, rtol in [(torch.float32, 1e-7), (torch.float64, 1e-14)]:
            x = (torch.randn(n, dtype=dtype) + 0.5).reshape(n, 1)
            s1, s2 = _kernels.moments(x)
            assert s1.dtype == s2.dtype == torch.float64 and s1.shape == s2.shape == ()
            exact = x.double().reshape(-1)
            torch.testing.assert_close(s1, exact.sum(), rtol=rtol, atol=0)
            torch.testing.assert_close(s2, exact.dot(exact), rtol=rtol, atol=0)
            assert _kernels.moments_dtype(x) == (torch.float64 if n < rows else dtype)
            plans = {}  # the same sums by a rows plan (from `rows` elements), made then reused
            for _ in range(2):
                planned = _kernels.moments([x], plans)
                assert torch.equal(planned[0], s1) and torch.equal(planned[1], s2)
            assert [key for key, _ in plans] == ([] if n < rows else ["rows plan"])


def test_moments_serve_only_what_they_can(monkeypatch):
    n = _kernels.MOMENTS_ROWS_NUMEL
    assert _kernels.moments(torch.ones(n)) is not None
    assert _kernels.moments(torch.ones(n, dtype=torch.bfloat16)) is not None  # by blocks in float32
    for t in [
        torch.ones(_kernels.MOMENTS_MIN_NUMEL - 1),
        torch.ones(n, dtype=torch.int64),
        torch.ones(n, dtype=torch.complex64),
        torch.ones(2, n)[:, ::2],
        torch.ones(n, device="meta"),
        torch.ones(n, requires_grad=True),
    ]:
        assert _kernels.moments(t) is None, t
    with torch.no_grad():
        assert _kernels.moments(torch.ones(n, requires_grad=True)) is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _kernels.moments(torch.ones(n)) is None


@pytest.mark.parametrize(
    "mean, std, path",
    [(0.01, 1.0, "moments"), (1e-4, 0.02, "moments"), (1.0, 0.1, "rejected")],
)
def test_real_size_std_is_as_accurate_as_the_concatenation(var_paths, mean, std, path):
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * std + mean
    b, exact = mt.bundle([x]), x.double()
    # Where the moments are rejected, the partial is torch's var as before, rounded to float32
    # before the merge: one rounding more than the concatenation's var (half as much in the std).
    slack = 1e-9 if path == "moments" else 2**-24
    assert _relative_error(b.std(), exact.std()) <= _relative_error(x.std(), exact.std()) + slack / 2
    assert _relative_error(b.var(), exact.var()) <= _relative_error(x.var(), exact.var()) + slack
    assert var_paths == {path: 2}


def _rows_plan(b):
    # The rows plan the bundle's var left with its float32 tensors (one TensorGroup: one dtype)
    groups = [g for key, value in b._plans.items() if isinstance(value, list) for g in value]
    plans = [v for g in groups for k, v in getattr(g, "derived", {}).items() if k[0] == "rows plan"]
    assert len(plans) == 1, b._plans.keys()
    return plans[0]


def test_rows_plan_is_kept_and_follows_the_tensors(small_kernels):
    # The places of the rows are worked out once; the tensors are read afresh at each call
    # (in-place writes, new data of the same shape: the bundle cannot tell), and the plan holds
    # none of them (nor their old data); new sizes make a new plan.
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(40, generator=gen), torch.randn(6, 5, generator=gen) + 1, torch.randn(7, generator=gen)]
    b = mt.bundle(tensors)

    def check():
        cat = torch.cat([t.reshape(-1) for t in tensors])
        for got, want in [(b.var(), cat.var()), *zip(torch.std_mean(b), torch.std_mean(cat))]:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)

    with torch.no_grad():
        check()
        plan = _rows_plan(b)
        check()
        tensors[0].mul_(3)
        check()
        tensors[1].data = torch.randn(6, 5, generator=gen) * 5
        check()
        assert _rows_plan(b) is plan
        own = plan.rows.untyped_storage().data_ptr()
        held = [x for x in _tensors_in(vars(plan)) if x.untyped_storage().data_ptr() != own]
        assert not held, "the plan holds tensors besides its rows"
        _kernels.MOMENTS_BLOCK = 9  # monkeypatched by small_kernels, restored after the test
        check()
        assert _rows_plan(b) is not plan


def _tensors_in(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors_in(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors_in(y)


def test_rows_plan_in_several_threads():
    # Each thread's plan writes its own rows buffer: threads reducing one bundle at once each
    # get its var. (Real sizes, so that the kernels take long enough to interleave.)
    tensors = [torch.randn(1 << 18, generator=torch.Generator().manual_seed(i)) + i for i in range(3)]
    b, want = mt.bundle(tensors), torch.cat(tensors).var()
    in_threads(lambda: torch.testing.assert_close(b.var(), want, rtol=1e-6, atol=0), times=40)


def _distance_plan(b):
    plans = [v for k, v in b._plans.items() if isinstance(k, tuple) and k[0] == "distance plan"]
    assert len(plans) <= 1, b._plans.keys()
    return plans[0] if plans else None


def test_distance_plan_is_kept_and_follows_the_tensors(small_kernels):
    # Where the blocks and packs of a distance go is worked out once per bundle; the tensors
    # are read afresh at each call (in-place writes, new data, a pack's tensor reshaped to its
    # own size), and the plan holds none of them; new sizes make a new plan. small_kernels:
    # pairs of up to 4 elements packed (several packs of at most a block), the others by
    # blocks of 6 and rows of 3, a tail row.
    gen = torch.Generator().manual_seed(0)
    shapes = [(40,), (2, 2), (6, 5), (3,), (7,), (4,), (1,), (0,), (2,)]
    xs = [torch.randn(s, generator=gen) + i for i, s in enumerate(shapes)]
    ys = [torch.randn(s, generator=gen) for s in shapes]
    a, b = mt.bundle(xs), mt.bundle(ys)

    def check():
        want = (torch.cat([x.reshape(-1) for x in xs]).double() - torch.cat([y.reshape(-1) for y in ys]).double()).norm()
        for got in ((a - b).norm(), torch.dist(a, b), torch.dist(b, a)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)

    with torch.no_grad():
        check()
        plan = _distance_plan(a)
        assert plan is not None and len(plan.packs) >= 2 and len(plan.spans) >= 8
        check()
        xs[0].mul_(3)
        ys[3].add_(1)
        check()
        xs[2].data = torch.randn(6, 5, generator=gen) * 5
        xs[1].data = xs[1].data.reshape(4)  # packed: its place is shaped (2, 2)
        check()
        check()
        assert _distance_plan(a) is plan
        own = {plan.rows.untyped_storage().data_ptr(), plan.block.untyped_storage().data_ptr()}
        held = [x for x in _tensors_in(vars(plan)) if x.untyped_storage().data_ptr() not in own]
        assert not held, "the plan holds tensors besides its buffers"
        _kernels.BLOCK = 9  # monkeypatched by small_kernels, restored after the test
        check()
        assert _distance_plan(a) is not plan


def test_distance_plan_serves_only_what_it_can(small_kernels, monkeypatch):
    # A long tensor that is not contiguous, a gradient to record, mixed dtypes: the general
    # path, with the concatenation's result (and gradients).
    served = []
    distance = _kernels._DistancePlan.distance
    monkeypatch.setattr(_kernels._DistancePlan, "distance", lambda self, x, y: served.append(1) or distance(self, x, y))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=gen), torch.randn(3, generator=gen)]
    ys = [torch.randn(5, 6, generator=gen).t(), torch.randn(3, generator=gen)]  # not contiguous
    want = (torch.cat([x.reshape(-1) for x in xs]) - torch.cat([y.reshape(-1) for y in ys])).norm()
    a, b = mt.bundle(xs), mt.bundle(ys)
    with torch.no_grad():
        torch.testing.assert_close(torch.dist(a, b), want)
        torch.testing.assert_close((a - b).norm(), want)
    assert served == [1, 1]  # tried, and stepped aside
    served.clear()
    xs[0].requires_grad_()
    for got in (torch.dist(a, b), (a - b).norm()):
        torch.testing.assert_close(got, want)
        (grad,) = torch.autograd.grad(got, xs[0])
        torch.testing.assert_close(grad, (xs[0] - ys[0]).detach() / want)
    mixed = mt.bundle([xs[0].detach().double(), xs[1]])
    with torch.no_grad():
        torch.testing.assert_close(torch.dist(mixed, b), want.double(), check_dtype=False)
    assert served == []


def test_distance_plan_in_several_threads():
    # Each thread's plan writes its own buffers. (Real sizes: blocks, packs.)
    gen = torch.Generator().manual_seed(0)
    sizes = [1 << 19, 3000, 70_000, 17, 5000]
    xs, ys = ([torch.randn(n, generator=gen) + i for i, n in enumerate(sizes)] for _ in range(2))
    a, b = mt.bundle(xs), mt.bundle(ys)
    want = (torch.cat(xs).double() - torch.cat(ys).double()).norm()

    def check():
        with torch.no_grad():
            torch.testing.assert_close(torch.dist(a, b).double(), want, rtol=1e-6, atol=0)

    in_threads(check, times=40)


KEPT_BUFFER_CALLS = {
    "std": lambda x, y: x.std(),  # the rows plan's buffer
    "difference_norm": lambda x, y: (x - y).norm(),  # the distance plan's buffers
    "dist": lambda x, y: torch.dist(x, y),  # the same, through torch.dist
    "norm_1": lambda x, y: x.norm(1),  # the block buffer (|a|)
    "float16_norm": lambda x, y: x.norm(),  # the block buffer (float16 widened by blocks)
    "sum": lambda x, y: x.sum(),  # small tensors packed, the long ones' sums in a row
}


@pytest.mark.parametrize("name", sorted(KEPT_BUFFER_CALLS))
@pytest.mark.parametrize("first_inside", [True, False])
def test_kept_buffers_serve_calls_in_and_out_of_inference_mode(small_kernels, monkeypatch, name, first_inside):
    # A buffer kept between calls and made in a call under torch.inference_mode() must not be
    # an inference tensor: the next call outside it (a training step after an evaluation)
    # writes it again.
    import threading

    monkeypatch.setattr(_kernels, "_SCRATCH", threading.local())  # this test's calls make them
    for name_, size in (("PACK_NUMEL", 16), ("PACK_LIMIT", 64), ("PACK_SHARE", 1)):  # (7,) and (5, 3) packed
        monkeypatch.setattr(_strategies, name_, size)
    dtype = torch.float16 if name == "float16_norm" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shapes = [(60, 50), (2100,), (7,), (5, 3)]
    tensors = [(torch.randn(s, generator=gen) + i).to(dtype) for i, s in enumerate(shapes)]
    others = [(torch.randn(s, generator=gen) * 0.5).to(dtype) for s in shapes]
    call = KEPT_BUFFER_CALLS[name]
    b, o = mt.bundle(tensors), mt.bundle(others)
    exact = call(*(torch.cat([t.reshape(-1) for t in ts]).double() for ts in (tensors, others)))
    for inside in (first_inside, not first_inside, first_inside):
        with torch.inference_mode(inside):
            got = call(b, o)
        torch.testing.assert_close(got.double(), exact, rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=0)


def test_real_size_bundle_is_as_accurate_as_the_concatenation(var_paths):
    # Each regime in one bundle, means apart (Chan's merge matters), mixed with float64.
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(1 << 22, generator=gen) + 0.01,  # rows, several blocks
        torch.randn(300_001, generator=gen) * 0.02,  # rows, a tail row
        torch.randn(50_000, generator=gen) * 0.1 + 1,  # too short for rows alone, |mean| > std
        torch.randn(1_000, generator=gen) * 0.1 + 1,  # torch's var
    ]
    b, cat = mt.bundle(tensors), torch.cat(tensors)
    exact = cat.double()
    for got, concat, want in [
        (b.std(), cat.std(), exact.std()),
        (b.var(correction=0), cat.var(correction=0), exact.var(correction=0)),
        (torch.std_mean(b)[1], torch.std_mean(cat)[1], exact.mean()),
    ]:
        assert got.dtype == torch.float32
        assert _relative_error(got, want) <= _relative_error(concat, want) + 1e-9
    assert var_paths == {"moments": 3, "torch": 3}  # the three first tensors' moments together
    mixed = mt.bundle([tensors[0], tensors[1].double()])  # float64: everything in float64
    want = torch.cat([tensors[0].double(), tensors[1].double()]).std()
    assert mixed.std().dtype == torch.float64
    assert _relative_error(mixed.std(), want) <= 1e-13


@pytest.mark.parametrize("dtype", NARROW)
def test_16_bit_sums_of_squares_of_small_tensors_are_the_concatenations(dtype):
    # 16-bit squares were summed in 16 bits per packed segment (no gradient) or their norm
    # rounded to 16 bits then squared (with one): a 16-bit step off in some draws.
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        ts = [torch.randn(700, generator=g).to(dtype) for _ in range(12)]
        cat = torch.cat(ts)
        assert torch.equal((mt.bundle(ts) ** 2).sum(), (cat**2).sum()), seed
        leaves = [t.clone().requires_grad_() for t in ts]
        assert torch.equal((mt.bundle(leaves) ** 2).sum().detach(), (cat**2).sum()), seed

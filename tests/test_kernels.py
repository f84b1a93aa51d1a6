"""The fast kernels (modtensor/_kernels.py) against the concatenation.

The kernels serve tensors of at least `MIN_NUMEL` elements, in rows of `ROW` and blocks of
`BLOCK`: the property tests shrink those sizes so that every path (rows, a tail row, several
blocks, fused chains) runs on Hypothesis' small tensors; a few tests run real sizes.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import modtensor as mt
from generators import cases, check_against_concat, other_like, track_live
from modtensor import _kernels

CALLS = {
    "norm": lambda x, y: x.norm(),
    "vector_norm": lambda x, y: torch.linalg.vector_norm(x),
    "sum_of_squares": lambda x, y: (x**2).sum(),
    "square_sum": lambda x, y: torch.square(x).sum(),
    "pow_sum": lambda x, y: torch.pow(x, 2.0).sum(),
    "difference_norm": lambda x, y: (x - y).norm(),
    "sub_vector_norm": lambda x, y: torch.linalg.vector_norm(torch.sub(x, y)),
    "dist": lambda x, y: torch.dist(x, y),
    "distance_after_scaling": lambda x, y: (x * 2 - y).norm(),  # x * 2 is itself on demand
}


@pytest.fixture
def small_kernels(monkeypatch):
    monkeypatch.setattr(_kernels, "MIN_NUMEL", 1)
    monkeypatch.setattr(_kernels, "DIFF_MIN_NUMEL", 1)
    monkeypatch.setattr(_kernels, "ROW", 3)
    monkeypatch.setattr(_kernels, "BLOCK", 6)  # a multiple of ROW, as the real sizes


@pytest.mark.parametrize("name", sorted(CALLS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the sizes stay shrunk
@given(case=cases())
def test_kernels_match_concat(small_kernels, name, case):
    check_against_concat(case, CALLS[name], other_like(case))


def test_fused_chains_use_the_kernels(small_kernels, monkeypatch):
    # A fused chain never computes its on-demand tensors, and its kernels run.
    seen = []
    monkeypatch.setattr(_kernels._L2Norm, "apply", lambda t, _f=_kernels._L2Norm.apply: seen.append("l2") or _f(t))
    monkeypatch.setattr(
        _kernels._DiffL2Norm, "apply", lambda a, b, _f=_kernels._DiffL2Norm.apply: seen.append("diff") or _f(a, b)
    )
    x = mt.bundle([torch.randn(5, 4, requires_grad=True), torch.randn(9, requires_grad=True)])
    y = mt.bundle([torch.randn(5, 4), torch.randn(9)])
    square, difference = x**2, x - y
    peaks = track_live(square), track_live(difference)
    square.sum(), difference.norm()
    assert peaks[0][0] == peaks[1][0] == 0
    assert seen == ["l2", "l2", "diff", "diff"]


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
    tensors = [torch.randn(1_100_003) * 0.02 + 0.01, torch.randn(5 * _kernels.BLOCK + 5) * 0.5, torch.randn(10)]
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


def test_real_size_gradients():
    torch.manual_seed(0)
    p = [torch.randn(1_100_000, requires_grad=True), torch.zeros(70_000, requires_grad=True)]
    q = [torch.randn(1_100_000, requires_grad=True), torch.zeros(70_000, requires_grad=True)]
    ((mt.bundle(p) ** 2).sum() + (mt.bundle(p) - mt.bundle(q)).norm()).backward()
    cat_p = torch.cat([t.detach().reshape(-1) for t in p]).requires_grad_()
    cat_q = torch.cat([t.detach().reshape(-1) for t in q]).requires_grad_()
    ((cat_p**2).sum() + (cat_p - cat_q).norm()).backward()
    torch.testing.assert_close(torch.cat([t.grad for t in p]), cat_p.grad)
    torch.testing.assert_close(torch.cat([t.grad for t in q]), cat_q.grad)

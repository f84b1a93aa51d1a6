"""Extrema's gradients follow the concatenation's, NaN results included."""

import math

import pytest
import torch

import modtensor as mt

EXTREMA = {
    "max": lambda x: x.max(), "min": lambda x: torch.min(x), "amax": lambda x: x.amax(),
    "amin": lambda x: torch.amin(x), "aminmax": lambda x: sum(torch.aminmax(x)),
    "norm inf": lambda x: x.norm(math.inf), "norm -inf": lambda x: torch.linalg.vector_norm(x, -math.inf),
    "dist inf": lambda x: torch.dist(x, torch.ones_like(x), math.inf),
}


@pytest.mark.parametrize("op", sorted(EXTREMA))
@pytest.mark.parametrize("nans", [(1,), (1, 3100), (3100,)], ids=["one", "two tensors", "second tensor"])
@pytest.mark.parametrize("n", [3000, 3], ids=["long", "tiny"])
def test_a_nan_result_has_the_concatenations_gradient(op, nans, n):
    # torch's max() / min() give the NaN elements the gradient (evenly), its inf-norms give
    # zeros, its amax NaN everywhere; the bundle's combine gave NaN to every element.
    g = torch.Generator().manual_seed(0)
    values = torch.randn(n + 2000, generator=g)
    values[[i % (n + 2000) for i in nans]] = math.nan

    def leaves():
        return [values[:n].clone().requires_grad_(), values[n:].clone().requires_grad_()]

    ours, theirs = leaves(), leaves()
    got, want = EXTREMA[op](mt.bundle(ours)), EXTREMA[op](torch.cat(theirs))
    torch.testing.assert_close(got, want, equal_nan=True)
    got.backward()
    want.backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_ties_without_nan_still_share_the_gradient():
    ours = [torch.tensor([1.0, 5.0], requires_grad=True), torch.tensor([5.0, 5.0, 2.0], requires_grad=True)]
    mt.bundle(ours).max().backward()
    torch.testing.assert_close(torch.cat([t.grad for t in ours]), torch.tensor([0.0, 1, 1, 1, 0]) / 3)


@pytest.mark.parametrize("n", [3000, 3], ids=["long", "tiny"])
def test_max_and_min_with_out_write_the_concatenations_result(n):
    # torch.max(x, out=t) and torch.min(x, 0, out=(values, indices)) are valid calls; the
    # bundle raised TypeError (its signature had no `out`) instead of the documented fallback.
    g = torch.Generator().manual_seed(0)
    b = mt.bundle([torch.randn(n, 2, generator=g), torch.randn(5, generator=g)])
    cat = b.materialize()
    out = torch.empty(0)
    with pytest.warns(mt.MaterializationWarning):
        torch.max(b, out=out)
    torch.testing.assert_close(out, cat.max())
    values, indices = torch.empty(0), torch.empty(0, dtype=torch.int64)
    with pytest.warns(mt.MaterializationWarning):
        torch.min(b, 0, keepdim=True, out=(values, indices))
    want = torch.min(cat, 0, keepdim=True)
    torch.testing.assert_close((values, indices), (want.values, want.indices))

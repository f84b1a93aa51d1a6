"""Order statistics (topk, kthvalue, median, nanmedian, quantile, nanquantile) follow the concatenation.

Values must equal torch's on the concatenation exactly; indices must be those of a stable sort
of it (torch leaves the order of ties unspecified, so its own indices are only checked to point
at the same values). Each property test also runs with tiny chunk, gather and radix limits, so that the
counting passes, the occurrence search and the chunking of non-contiguous tensors all run on
small generated bundles.
"""

import contextlib
import math
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modtensor as mt
import modtensor._order as _order
import modtensor._selection as _selection
from generators import FLOATS, INTS, cases, check_against_concat, track_live

NUMERIC = (*FLOATS, *INTS)
ALL_KINDS = ("normal", "ties", "special")


@contextlib.contextmanager
def tiny_limits():
    with mock.patch.multiple(_selection, _CHUNK=16, _GATHER=3, _BITS=4), mock.patch.object(_order, "_ROW", 3):
        yield


LIMITS = (contextlib.nullcontext, tiny_limits)


def exact(got, want):
    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0, equal_nan=True)


def stable_indices(x, descending=False):
    return torch.sort(x.detach(), descending=descending, stable=True).indices


def check_values_and_indices(case, call, reference_indices):
    """`call(x).values` equals torch's exactly; `call(bundle).indices` are `reference_indices`."""
    check_against_concat(case, lambda x, y: call(x).values, grads=False)  # ties: see test_gradients_*
    cat = case.concat()
    try:
        want = call(cat)
    except Exception:
        return  # the check above made sure the bundle raises too
    got = call(case.bundle())
    exact(got.values, want.values)
    assert got.indices.dtype == torch.int64 and got.indices.shape == want.indices.shape
    assert torch.equal(got.indices, reference_indices().reshape(want.indices.shape))
    exact(cat.detach()[want.indices], want.values)  # torch's own indices, for the record


# -- property tests against the concatenation ---------------------------------------------------


@given(case=cases(dtypes=NUMERIC, kinds=ALL_KINDS), data=st.data())
def test_topk(case, data):
    n = case.concat().numel()
    k = data.draw(st.integers(0, n + 1), label="k")
    largest, sort = data.draw(st.booleans(), label="largest"), data.draw(st.booleans(), label="sorted")
    f = data.draw(st.sampled_from([torch.topk, torch.Tensor.topk]))
    dim = data.draw(st.sampled_from([(), (0,), (-1,)]))

    def call(x):
        out = f(x, k, *dim, largest=largest, sorted=sort)
        if sort:
            return out
        # torch's order is unspecified without sorted=True: compare in sorted order
        order = torch.sort(out.values.detach(), descending=largest, stable=True).indices
        return torch.return_types.topk((out.values[order], out.indices[order]))

    for limits in LIMITS:
        with limits():
            check_values_and_indices(case, call, lambda: stable_indices(case.concat(), largest)[:k])


@given(case=cases(dtypes=NUMERIC, kinds=ALL_KINDS), data=st.data())
def test_kthvalue(case, data):
    n = case.concat().numel()
    k = data.draw(st.integers(0, n + 1), label="k")
    f = data.draw(st.sampled_from([torch.kthvalue, torch.Tensor.kthvalue]))
    dim, keepdim = data.draw(st.sampled_from([(), (0,), (-1,)])), data.draw(st.booleans())
    call = lambda x: f(x, k, *dim, keepdim=keepdim) if dim else f(x, k)  # noqa: E731
    for limits in LIMITS:
        with limits():
            check_values_and_indices(case, call, lambda: stable_indices(case.concat())[k - 1])


def _median_rank(x, ignore_nan):
    n, valid = x.numel(), int((~x.isnan()).sum())
    if not ignore_nan and valid < n:
        return valid  # the first NaN
    return max(valid - 1, 0) // 2


@pytest.mark.parametrize("name", ["median", "nanmedian"])
@given(case=cases(dtypes=NUMERIC, kinds=ALL_KINDS), data=st.data())
def test_median_with_dim(name, case, data):
    f = data.draw(st.sampled_from([getattr(torch, name), getattr(torch.Tensor, name)]))
    dim, keepdim = data.draw(st.sampled_from([0, -1])), data.draw(st.booleans())
    cat = case.concat()
    rank = _median_rank(cat.detach(), name == "nanmedian")
    for limits in LIMITS:
        with limits():
            check_values_and_indices(case, lambda x: f(x, dim, keepdim), lambda: stable_indices(cat)[rank])


@pytest.mark.parametrize("name", ["median", "nanmedian"])
@given(case=cases(dtypes=NUMERIC, kinds=ALL_KINDS))
def test_full_median_values_and_gradients(name, case):
    # torch spreads the full median's gradient evenly over ties: deterministic, so compared as is
    for f in (getattr(torch, name), getattr(torch.Tensor, name)):
        for limits in LIMITS:
            with limits():
                check_against_concat(case, lambda x, y: f(x))
                if case.concat().numel():
                    exact(f(case.bundle()), f(case.concat()))


def _q(data):
    """A draw of q for input x: a float, or a 0-d or 1-D tensor in x's dtype."""
    values = data.draw(st.lists(st.floats(0, 1), min_size=0, max_size=4), label="q")
    form = data.draw(st.sampled_from(["float", "0-d", "1-d"]) if values else st.just("1-d"))
    if form == "float":
        return lambda x: values[0]
    if form == "0-d":
        return lambda x: torch.tensor(values[0], dtype=x.dtype)
    return lambda x: torch.tensor(values, dtype=x.dtype)


@pytest.mark.parametrize("name", ["quantile", "nanquantile"])
@given(case=cases(dtypes=NUMERIC, kinds=ALL_KINDS), data=st.data())
def test_quantile(name, case, data):
    q = _q(data)
    f = data.draw(st.sampled_from([getattr(torch, name), getattr(torch.Tensor, name)]))
    dim = data.draw(st.sampled_from([{}, {"dim": 0}, {"dim": -1}, {"dim": None}]))
    keepdim = data.draw(st.sampled_from([{}, {"keepdim": True}, {"keepdim": False}]))
    interpolation = data.draw(st.sampled_from(_order._INTERPOLATIONS))
    call = lambda x, y: f(x, q(x), **dim, **keepdim, interpolation=interpolation)  # noqa: E731
    for limits in LIMITS:
        with limits():
            # ties put torch's gradient on whichever tied element its (unstable) sort chose
            check_against_concat(case, call, grads=False)
            try:
                want = call(case.concat(), None)
            except RuntimeError:
                continue
            exact(call(case.bundle(), None), want)  # the same ranks, weights and lerp as torch


# -- gradients (values without ties, where torch's choice of element is the only one) ------------


@given(case=cases(kinds=("normal",)), data=st.data())
def test_gradients_reach_the_selected_elements(case, data):
    n = case.concat().numel()
    k = data.draw(st.integers(1, max(n, 1)))
    q = data.draw(st.lists(st.floats(0, 1), min_size=1, max_size=3))
    interpolation = data.draw(st.sampled_from(_order._INTERPOLATIONS))
    calls = [
        lambda x, y: torch.topk(x, min(k, x.numel()), largest=k % 2 == 0).values,
        lambda x, y: torch.kthvalue(x, k).values,
        lambda x, y: torch.median(x, 0).values,
        lambda x, y: x.nanmedian(dim=-1, keepdim=True).values,
        lambda x, y: torch.quantile(x, torch.tensor(q, dtype=x.dtype), interpolation=interpolation),
        lambda x, y: x.nanquantile(q[0]),
    ]
    for limits in LIMITS:
        with limits():
            for call in calls:
                check_against_concat(case, call)


def test_results_require_grad_like_the_concatenation():
    frozen, trained = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0], requires_grad=True)
    b = mt.bundle([frozen, trained])
    # every result below is one of the frozen elements
    results = [torch.quantile(b, 1.0), torch.topk(b, 1).values, torch.kthvalue(b, 4).values]
    for result in [*results, b.median(), b.nanmedian(0).values]:
        assert result.requires_grad
        result.sum().backward()
    assert not trained.grad.any()


@pytest.mark.parametrize("sizes", ["per-tensor", "real"])
@pytest.mark.parametrize("values", [[[3.0, math.nan], [2.0, 5.0]], [[math.nan], [math.nan, math.nan]]], ids=["nan", "all nan"])
def test_quantile_gradients_reach_q_past_nan(request, sizes, values):
    # A NaN input fixes torch's ranks at the last one, yet q still gets a (zero) gradient: the
    # bundle's result used to lose q's graph there, and q.grad stayed None.
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    results = []
    for make in (mt.bundle, torch.cat):
        q = torch.tensor([0.3, 0.8], requires_grad=True)
        out = torch.quantile(make([torch.tensor(v) for v in values]), q)
        assert out.requires_grad
        out.sum().backward()
        results.append((out, q.grad))
    (got, got_grad), (want, want_grad) = results
    exact(got, want)
    exact(got_grad, want_grad)


@pytest.mark.parametrize("sizes", ["per-tensor", "real"])
@pytest.mark.parametrize("name", ["median", "nanmedian"])
def test_full_median_requires_grad_when_only_an_empty_tensor_does(request, sizes, name):
    # The concatenation of a frozen tensor and an empty trained one requires grad, so its
    # median does, and backward() works; the bundle's median did not require grad.
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    tensors = [torch.tensor([3.0, 1.0, 2.0]), torch.empty(0, requires_grad=True)]
    for x in (mt.bundle(tensors), torch.cat(tensors)):
        result = getattr(torch, name)(x)
        assert result.requires_grad and result == 2.0
        result.backward()


@pytest.mark.parametrize("sizes", ["per-tensor", "real"])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_of_nothing_requires_grad_like_the_concatenation(request, sizes, largest):
    # topk(b, 0) answered with torch's topk of an empty tensor, cut off from the bundle's
    # tensors: its values did not require grad, and backward through them raised.
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    frozen, trained = torch.tensor([3.0, 1.0]), torch.tensor([2.0], requires_grad=True)
    got, want = torch.topk(mt.bundle([frozen, trained]), 0, largest=largest), torch.topk(torch.cat([frozen, trained]), 0)
    assert got.values.shape == want.values.shape == got.indices.shape == (0,) and got.indices.dtype == torch.int64
    assert got.values.requires_grad and want.values.requires_grad
    got.values.sum().backward()
    assert torch.equal(trained.grad, torch.zeros(1))


def test_on_demand_bundles_are_read_one_tensor_at_a_time():
    params = [torch.randn(40, requires_grad=True) for _ in range(5)]
    lazy = (mt.bundle(params) - 0.5).abs()
    peak = track_live(lazy)
    reference = [(p - 0.5).abs() for p in params]
    cat = torch.cat(reference)
    calls = [lambda x: torch.quantile(x, 0.3), lambda x: torch.topk(x, 7).values, lambda x: x.kthvalue(9).values]
    for call in [*calls, torch.median]:
        exact(call(lazy), call(cat))
    assert peak[0] == 1
    torch.median(lazy).backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.median(cat).backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad)


# -- beyond torch's limits, and the counting machinery ------------------------------------------


@contextlib.contextmanager
def one_thread():
    # The counting passes run ~10 ops per chunk of 2**18 elements; on cores shared with other
    # processes each of torch's parallel regions can stall for a scheduler tick, so this big
    # test runs on one thread to take ~1 s whatever else runs on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def test_quantile_beyond_torchs_size_limit():
    # A shuffle of 0 .. N-1 in float32: rounding is monotone, so the element at rank r of the
    # sorted concatenation is float32(r), a reference that needs no sort of 20M elements.
    n = 20_000_000
    values = ((torch.arange(n) * 7_777_777) % n).float()  # 7_777_777 is prime to n: a bijection
    first, second, third = values[:8_000_000], values[8_000_000:17_000_000], values[17_000_000:]
    tensors = [first.reshape(2000, 4000), second, third.reshape(100, 30_000).t()]
    b = mt.bundle(tensors)
    assert b.numel() == n > 2**24  # torch.quantile raises "quantile() input tensor is too large" here
    q = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0])
    got = torch.quantile(b, q)
    for qi, value in zip(q.tolist(), got.tolist()):
        rank = qi * (n - 1)  # qi is already rounded to float32, as torch rounds q
        low, high = (float(torch.tensor(float(r)).float()) for r in (math.floor(rank), math.ceil(rank)))
        assert value == pytest.approx(low + (high - low) * (rank - math.floor(rank)), rel=1e-7)
    assert torch.kthvalue(b, 12_345_678).values == float(torch.tensor(12_345_677.0))
    assert torch.median(b) == float(torch.tensor(float((n - 1) // 2)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["quantile", "nanquantile"])
@pytest.mark.parametrize("interpolation", ["linear", "midpoint", "nearest"])
def test_quantile_under_autocast_is_computed_in_float32(dtype, name, interpolation):
    # CPU autocast casts a float16 or bfloat16 quantile's input to float32 (outside it torch
    # refuses them): the concatenation's result is float32, interpolated in float32. The
    # bundle's was in the bundle's dtype (of 5021 bfloat16 normals, -0.5312 for -0.5352).
    torch.manual_seed(0)
    values = (torch.randperm(240) / 16 - 7).to(dtype)  # distinct and exact: no ties to split
    tensors = [values[:200].reshape(20, 10).clone().requires_grad_(), values[200:].clone().requires_grad_()]
    func = getattr(torch, name)
    for q in (0.3, torch.tensor([0.013, 0.5, 0.97], dtype=dtype)):
        with torch.autocast("cpu", dtype=dtype):
            want = func(torch.cat([t.reshape(-1) for t in tensors]), q, interpolation=interpolation)
            got = func(mt.bundle(tensors), q, interpolation=interpolation)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for g, w in zip(torch.autograd.grad(got.sum(), tensors), torch.autograd.grad(want.sum(), tensors)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@given(
    shape=st.lists(st.integers(0, 4), max_size=4), size=st.integers(1, 9), layout=st.sampled_from(["plain", "t", "step"])
)
def test_chunks_read_elements_in_flat_order(shape, size, layout):
    x = torch.arange(math.prod(shape) * 2, dtype=torch.float32)
    t = x[: math.prod(shape)].reshape(shape)
    if layout == "t" and len(shape) >= 2:
        t = x[: math.prod(shape)].reshape(shape[::-1]).permute(*reversed(range(len(shape))))
    elif layout == "step" and len(shape) >= 1:
        t = x.reshape(shape[0] * 2, *shape[1:])[::2]
    pieces = list(_selection._flat_chunks(t, size))
    assert all(0 < p.numel() <= size for p in pieces)
    flat = torch.cat(pieces) if pieces else torch.empty(0)
    assert torch.equal(flat, t.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_keys_order_like_values(dtype):
    info = torch.finfo(dtype)
    special = [0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, math.inf, -math.inf, info.tiny / 4, 1.0, -1.0]
    x = torch.cat([torch.tensor(special, dtype=dtype), torch.randn(500).to(dtype), torch.randn(500).to(dtype) * 1e-30])
    space = _selection._Keys(dtype)
    keys = space.of(x)
    order = torch.sort(x, stable=True).indices
    assert torch.equal(keys[order], torch.sort(keys).values)  # same order, ties included
    assert (keys[x == 0] == 0).all()  # -0.0 and +0.0 share a key
    for v, key in zip(x.tolist(), keys.tolist()):
        assert space.value(key) == v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.uint8])
def test_many_ties_are_found_by_counting(dtype):
    # far more ties of the median than the gather budget: the index comes from counting
    tensors = [torch.zeros(50, 40, dtype=dtype).t(), torch.ones(3000, dtype=dtype), torch.zeros(1000, dtype=dtype)]
    b = mt.bundle(tensors)
    cat = torch.cat([t.reshape(-1) for t in tensors])
    with mock.patch.multiple(_selection, _GATHER=100, _CHUNK=700, _BITS=8):
        for k in (1, 2000, 2001, 4000, 4001, 6000):
            got = torch.kthvalue(b, k)
            assert got.values == cat[got.indices] and got.indices == stable_indices(cat)[k - 1]
        assert torch.equal(torch.topk(b, 4500).indices, stable_indices(cat, descending=True)[:4500])


@pytest.mark.parametrize("order", ["ascending", "descending", "ties", "nan"])
def test_topk_pool_whatever_the_order_of_the_chunks(order):
    # every chunk beats the pool's cut (ascending), none does (descending), all tie, NaN on the way
    x = torch.arange(3000, dtype=torch.float64) % 7 if order == "ties" else torch.arange(3000, dtype=torch.float64)
    if order == "descending":
        x = x.flip(0)
    if order == "nan":
        x = torch.where(torch.arange(3000) % 13 == 5, math.nan, torch.randn(3000, generator=torch.Generator().manual_seed(0)))
    tensors = [x[:1000].reshape(40, 25).t(), x[1000:1001], x[1001:]]  # a non-contiguous one, a single element
    b, cat = mt.bundle(tensors), torch.cat([t.reshape(-1) for t in tensors])
    with mock.patch.multiple(_selection, _CHUNK=256), mock.patch.multiple(_order, _ROW=16, _POOL_SHARE=1):
        for k in (1, 5, 300, 2999):
            for largest in (True, False):
                got = torch.topk(b, k, largest=largest)
                assert torch.equal(got.indices, stable_indices(cat, largest)[:k]), (k, largest)
                exact(got.values, torch.topk(cat, k, largest=largest).values)


_SORTED = {
    "ascending": lambda: torch.arange(6000, dtype=torch.float32),
    "descending": lambda: torch.arange(6000, dtype=torch.float32).flip(0),
    "ascending ties": lambda: torch.arange(6000, dtype=torch.float64) // 37,
    "descending ties": lambda: (torch.arange(6000) // 37).flip(0).double(),
    "ascending int64": lambda: torch.arange(-3000, 3000) * 2**40,
    "ascending, NaN and inf": lambda: torch.cat([torch.arange(2000.0), torch.full((50,), math.nan),
                                                 torch.arange(2000.0, 5900.0), torch.full((50,), math.inf),
                                                 torch.full((50,), math.nan)]),
    "all equal": lambda: torch.ones(6000),
}


@pytest.mark.parametrize("name", list(_SORTED))
def test_topk_of_sorted_chunks(name):
    # each chunk holds more than k elements beating the pool's cut, so its own top k are found:
    # among the few rows the rows' worst and best elements leave (see _order._candidates)
    x = _SORTED[name]()
    tensors = [x[:1500], x[1500:3000].reshape(30, 50).t(), x[3000:]]
    b, cat = mt.bundle(tensors), torch.cat([t.reshape(-1) for t in tensors])
    with mock.patch.multiple(_selection, _CHUNK=512), mock.patch.multiple(_order, _ROW=16, _POOL_SHARE=1):
        for k in (1, 15, 16, 17, 100, 250, 5999):
            for largest in (True, False):
                got = torch.topk(b, k, largest=largest)
                assert torch.equal(got.indices, stable_indices(cat, largest)[:k]), (k, largest)
                exact(got.values, torch.topk(cat, k, largest=largest).values)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_of_sorted_chunks_looks_at_few_rows(largest):
    # torch's CPU topk is slow on sorted input (20 ms for k=1000 of 2**18 floats, against 0.6 on
    # shuffled): on sorted chunks it is given a few rows beyond k, not each whole chunk
    x = torch.arange(1 << 14, dtype=torch.float32)
    b = mt.bundle([x if largest else x.flip(0)])
    topk, seen = torch.topk, []

    def spy(input, *args, **kwargs):
        if not mt.is_bundle(input):
            seen.append(input.numel())
        return topk(input, *args, **kwargs)

    with mock.patch.multiple(_selection, _CHUNK=1024), mock.patch.object(_order, "_ROW", 16):
        with mock.patch.object(torch, "topk", spy):
            got = torch.topk(b, 50, largest=largest)
    assert torch.equal(got.indices, stable_indices(b.materialize(), largest)[:50])
    assert sum(seen) < x.numel() / 4, seen


def test_topk_sorts_the_pool_once_per_k_newcomers():
    # the few elements of each chunk that beat the cut wait for k of them before a sort: sorting
    # the pool for each chunk cost the most where k is large (100000 of 8M: 137 -> 115 ms)
    tensors = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    b, cat = mt.bundle(tensors), torch.cat(tensors)
    sort, sorts = torch.sort, []

    def spy(input, *args, **kwargs):
        sorts.append(input.numel())
        return sort(input, *args, **kwargs)

    with mock.patch.object(torch, "sort", spy):
        got = torch.topk(b, 500)
    assert torch.equal(got.indices, stable_indices(cat, True)[:500])
    assert len(sorts) < 20, sorts


@pytest.mark.parametrize("largest", [True, False])
def test_topk_of_a_large_share_of_a_chunk_counts(largest):
    # a pool of k beyond a sixteenth of a chunk is sorted about once per chunk (k=10**6 of 8M:
    # 630-1150 ms); counting the k-th, then one pass, sorts the k found once (260 ms)
    x = torch.arange(6000, dtype=torch.float64) // 3
    tensors = [x[:2500], x[2500:].reshape(50, 70).t()]
    b, cat = mt.bundle(tensors), torch.cat([t.reshape(-1) for t in tensors])
    sort, sorts = torch.sort, []

    def spy(input, *args, **kwargs):
        sorts.append(input.numel())
        return sort(input, *args, **kwargs)

    with mock.patch.multiple(_selection, _CHUNK=256), mock.patch.object(torch, "sort", spy):
        got = torch.topk(b, 1000, largest=largest)
    assert torch.equal(got.indices, stable_indices(cat, largest)[:1000])
    exact(got.values, torch.topk(cat, 1000, largest=largest).values)
    assert len(sorts) <= 2, sorts


_DEGENERATE = {
    "all equal": lambda: torch.ones(6000),
    "all equal int32": lambda: torch.full((6000,), -7, dtype=torch.int32),
    "two values": lambda: (torch.arange(6000) % 2 == 0).double(),
    "30% NaN": lambda: torch.where(torch.rand(6000, generator=torch.Generator().manual_seed(1)) < 0.3, math.nan,
                                   torch.randn(6000, generator=torch.Generator().manual_seed(2))),
    "NaN of both signs, inf": lambda: torch.cat([torch.full((2500,), math.nan), torch.full((1000,), math.inf),
                                                 -torch.full((2000,), math.nan), torch.arange(500.0)]),
    "all NaN": lambda: torch.full((6000,), math.nan),
}


@pytest.mark.parametrize("name", list(_DEGENERATE))
def test_topk_counted_of_ties_and_nan(name):
    # k beyond the pool's share: the k-th is counted, then _members takes its ties (or the NaN)
    # by index and stops once the k are found
    x = _DEGENERATE[name]()
    tensors = [x[:1500], x[1500:3000].reshape(30, 50).t(), x[3000:]]  # a non-contiguous one
    b, cat = mt.bundle(tensors), torch.cat([t.reshape(-1) for t in tensors])
    with mock.patch.multiple(_selection, _CHUNK=256, _GATHER=100):
        for k in (17, 300, 1800, 3001, 5999, 6000):
            for largest in (True, False):
                got = torch.topk(b, k, largest=largest)
                assert torch.equal(got.indices, stable_indices(cat, largest)[:k]), (k, largest)
                exact(got.values, torch.topk(cat, k, largest=largest).values)


def test_topk_counted_of_ties_reads_only_the_chunks_it_takes():
    # all equal: the k are the first k elements; neither a search for the k-th's index nor a
    # look at the chunks beyond them (all 8M of them cost 94 ms at k=100000, now 30)
    b = mt.bundle([torch.zeros(3000), torch.zeros(40, 50)])
    read, scan = [], _order._scan

    def spy(bundle, visit):
        return scan(bundle, lambda c, offset: read.append(c.numel()) or visit(c, offset))

    with mock.patch.multiple(_selection, _CHUNK=256), mock.patch.object(_order, "_scan", spy):
        with mock.patch.object(_selection, "_occurrences", side_effect=AssertionError("not needed")):
            got = torch.topk(b, 600)
    assert torch.equal(got.indices, torch.arange(600))
    assert sum(read) < 1000, read


_MORE_DTYPES = {
    "float16": lambda g: [torch.randn(50, 7, generator=g).half(), torch.tensor([math.inf, -math.inf, -0.0, 65504]).half()],
    "bfloat16": lambda g: [torch.randn(300, generator=g).bfloat16(), torch.randn(3, 3, generator=g).bfloat16().t()],
    "int64 extremes": lambda g: [torch.tensor([2**63 - 1, -(2**63), 0, -5]), torch.randint(-(2**62), 2**62, (99,), generator=g)],
    "uint8": lambda g: [torch.randint(0, 256, (40, 5), generator=g, dtype=torch.uint8)],
    "int8": lambda g: [torch.randint(-128, 128, (333,), generator=g, dtype=torch.int8)],
    "subnormals": lambda g: [torch.tensor([1e-45, -1e-45, 1e-40, 0.0, -0.0]), torch.randn(20, generator=g) * 1e-39],
}


@pytest.mark.parametrize("name", list(_MORE_DTYPES))
def test_dtypes_beyond_the_generators(name):
    b = mt.bundle(_MORE_DTYPES[name](torch.Generator().manual_seed(1)))
    cat = b.materialize()
    n = cat.numel()
    for limits in LIMITS:
        with limits():
            for k in (1, n // 3, n):
                for largest in (True, False):
                    got = torch.topk(b, k, largest=largest)
                    exact(got.values, torch.topk(cat, k, largest=largest).values)
                    assert torch.equal(got.indices, stable_indices(cat, largest)[:k])
                got = torch.kthvalue(b, k)
                assert got.values == torch.kthvalue(cat, k).values and got.indices == stable_indices(cat)[k - 1]
            exact(torch.median(b), torch.median(cat))


# -- strategies, fallbacks and errors -----------------------------------------------------------


def test_other_strategies_take_each_tensor_on_its_own():
    tensors = [torch.tensor([[4.0, 1.0], [2.0, 9.0]]), torch.tensor([3.0, 7.0, 5.0])]
    medians = mt.bundle(tensors).per_param().median()
    assert medians.to_dict() == {"0": torch.tensor(2.0), "1": torch.tensor(5.0)}
    weighted = mt.bundle(tensors).weighted({"*": 1.0}).quantile(0.5)
    assert float(weighted) == pytest.approx((3.0 + 5.0) / 2)


@pytest.mark.parametrize("sizes", ["per-tensor", "real"])
@pytest.mark.parametrize("call", [
    lambda x: torch.topk(x, 2, out=None), lambda x: torch.kthvalue(x, 2, out=None), lambda x: torch.median(x, 0, out=None),
    lambda x: torch.nanmedian(x, -1, out=None), lambda x: torch.quantile(x, 0.5, out=None),
    lambda x: torch.nanquantile(x, torch.tensor([0.2, 0.9]), out=None),
], ids=["topk", "kthvalue", "median", "nanmedian", "quantile", "nanquantile"])
def test_out_none_is_the_default(request, sizes, call):
    # torch takes an explicit out=None as no out; the bundle raised TypeError (unexpected 'out').
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    tensors = [torch.tensor([3.0, 1.0, 4.0]), torch.tensor([2.0, 5.0])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not by the fallback either
        got = call(mt.bundle(tensors))
    want = call(torch.cat(tensors))
    if isinstance(want, tuple):  # no ties: torch's indices are the stable ones
        exact(got.values, want.values)
        assert torch.equal(got.indices, want.indices)
    else:
        exact(got, want)


@pytest.mark.parametrize("call", [lambda b: torch.sort(b), lambda b: b.argsort(), lambda b: torch.msort(b)])
def test_sorts_fall_back_with_a_warning(call):
    b = mt.bundle([torch.tensor([3.0, 1.0]), torch.tensor([2.0])])
    with pytest.warns(mt.MaterializationWarning):
        call(b)


@pytest.mark.parametrize("call", [
    lambda x: torch.topk(x, 2), lambda x: x.topk(0, largest=False), lambda x: torch.kthvalue(x, 3, keepdim=True),
    torch.median, lambda x: x.median(0), lambda x: torch.nanmedian(x, -1, True), lambda x: torch.quantile(x, 0.3),
    lambda x: x.nanquantile(0.9, interpolation="lower"), lambda x: torch.topk(x.abs(), 4),
], ids=["topk", "topk 0", "kthvalue", "median", "median dim", "nanmedian", "quantile", "nanquantile", "topk abs"])
def test_meta_bundles_answer_as_the_concatenation_without_a_copy(call):
    # torch.cat of meta tensors holds no values, so there is no copy to warn of
    tensors = [torch.empty(3, 4, device="meta", requires_grad=True), torch.empty(5, device="meta", dtype=torch.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = call(mt.bundle(tensors))
    want = call(torch.cat([t.reshape(-1) for t in tensors]))
    for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
        assert (g.device.type, g.shape, g.dtype, g.requires_grad) == (w.device.type, w.shape, w.dtype, w.requires_grad)


def test_no_warning_on_the_handled_paths():
    b = mt.bundle([torch.randn(3, 4), torch.randn(5, dtype=torch.float64)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.topk(b, 3), b.kthvalue(2), b.median(), torch.nanmedian(b, 0), b.quantile(0.3), torch.nanquantile(b, 0.9)


EMPTY = mt.bundle([torch.empty(0), torch.empty(2, 0)])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda b: torch.topk(b, 4), RuntimeError, "selected index k out of range: k=4 for ParameterBundle of 2 tensors"),
        (lambda b: torch.topk(b, -1), RuntimeError, "selected index k out of range"),
        (lambda b: torch.topk(b, 1.0), TypeError, "must be int, not float"),
        (lambda b: torch.topk(b, 1, dim=1), IndexError, r"Dimension out of range \(expected to be in range of \[-1, 0\]"),
        (lambda b: torch.kthvalue(b, 0), RuntimeError, "kthvalue: selected number k out of range for dimension 0"),
        (lambda b: torch.kthvalue(b, 4), RuntimeError, "selected number k out of range"),
        (lambda b: torch.kthvalue(b.bool(), 4), RuntimeError, "selected number k out of range"),  # k first, as torch
        (lambda b: torch.kthvalue(b.bool(), 1), NotImplementedError, "not implemented for 'Bool'"),
        (lambda b: b.median(keepdim=True), TypeError, "missing 1 required positional arguments"),
        (lambda b: torch.quantile(b, 1.5), RuntimeError, r"quantile\(\) q must be in the range \[0, 1\] but got 1.5"),
        (lambda b: torch.quantile(b, torch.tensor([0.1, -0.1])), RuntimeError, r"q values must be in the range \[0, 1\]"),
        (lambda b: torch.quantile(b, torch.tensor([0.5], dtype=torch.float64)), RuntimeError, "q tensor must be same dtype"),
        (lambda b: torch.quantile(b, 0.5, interpolation="cubic"), RuntimeError, "interpolation must be one of linear"),
        (lambda b: b.long().quantile(0.5), RuntimeError, "input tensor must be either float or double dtype.*ParameterBundle"),
        (lambda b: b.bool().topk(1), RuntimeError, "topk does not support bool dtypes.*concatenates to torch.bool"),
        (lambda b: b.bool().topk(4), RuntimeError, "selected index k out of range: k=4"),  # k first, as torch
        (lambda b: torch.median(b.bool(), 0), NotImplementedError, "not implemented for 'Bool'"),
        (
            lambda b: torch.quantile(EMPTY, 0.5),
            RuntimeError,
            r"ParameterBundle of 2 tensors \[0 \(0,\), 1 \(2, 0\)\] has no elements .*non-empty",
        ),
        (lambda b: torch.kthvalue(EMPTY, 1), IndexError, "has no elements .*non-zero size"),
        (lambda b: torch.median(EMPTY, 0), IndexError, "has no elements"),
        (lambda b: torch.topk(EMPTY, 1), RuntimeError, "selected index k out of range"),
    ],
)
def test_errors_name_the_function_and_the_bundle(call, error, match):
    b = mt.bundle([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    with pytest.raises(error, match=match):
        call(b)


def test_quantile_checks_its_arguments_before_the_dim():
    # torch checks the size, q, interpolation and dtype before the dim: the bundle checked the
    # dim first, so these raised IndexError where the concatenation raises RuntimeError.
    b = mt.bundle([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    with pytest.raises(RuntimeError, match=r"torch.quantile: quantile\(\) q must be in the range \[0, 1\] but got 1.5"):
        torch.quantile(b, 1.5, dim=1)
    with pytest.raises(RuntimeError, match="interpolation must be one of"):
        b.nanquantile(0.5, dim=1, interpolation="cubic")
    with pytest.raises(RuntimeError, match="float or double dtype.*concatenates to torch.int64"):
        torch.quantile(b.long(), 0.5, dim=1)
    with pytest.raises(RuntimeError, match=r"ParameterBundle of 2 tensors .* has no elements .*non-empty"):
        torch.quantile(EMPTY, 0.5, dim=-2)
    with pytest.raises(IndexError, match=r"torch.quantile: Dimension out of range .*ParameterBundle of 2 tensors"):
        torch.quantile(b, 0.5, dim=1)  # a bad dim alone still names the bundle


def test_empty_bundles_answer_as_torch_does_where_torch_does():
    assert torch.isnan(torch.median(EMPTY)) and torch.isnan(EMPTY.nanmedian())
    out = torch.topk(EMPTY, 0)
    assert out.values.shape == (0,) and out.indices.dtype == torch.int64


@pytest.mark.parametrize("name", ["median", "nanmedian"])
def test_median_of_no_elements_requires_grad_like_the_concatenation(name):
    # The NaN median of empty tensors that require grad is linked to them, as the
    # concatenation's is (found by the dev Hypothesis profile: it required no grad).
    tensors = [torch.empty(0, requires_grad=True), torch.empty(2, 0)]
    results = [getattr(torch, name)(x) for x in (mt.bundle(tensors), torch.cat([t.reshape(-1) for t in tensors]))]
    for result in results:
        assert result.requires_grad and torch.isnan(result)
    grads = [torch.autograd.grad(r, tensors[0]) for r in results]
    assert grads[0][0].shape == grads[1][0].shape == (0,)
    with torch.no_grad():
        assert not getattr(torch, name)(mt.bundle(tensors)).requires_grad


def test_per_tensor_quantiles_take_a_tensor_q_whole():
    # q of the bundle's own length used to be split across the tensors like an operand of an
    # elementwise op (tensor 1 got q[4:]); a q of another length was refused.
    ts = [torch.randn(4, generator=torch.Generator().manual_seed(0)), torch.randn(4)]
    b = mt.bundle(ts)
    for q in (torch.linspace(0, 1, 8), torch.tensor([0.25, 0.75])):
        got = b.per_param().quantile(q)
        for g, t in zip(got.tensors, ts):
            torch.testing.assert_close(g, torch.quantile(t, q))
        weighted = b.weighted([1.0, 3.0]).nanquantile(q)
        torch.testing.assert_close(weighted, (torch.nanquantile(ts[0], q) + 3 * torch.nanquantile(ts[1], q)) / 4)


@pytest.mark.parametrize("call", [
    lambda x: torch.quantile(x, 0.5), lambda x: x.topk(2).values.sum(), lambda x: x.kthvalue(2).values,
    lambda x: torch.median(x, 0).values, lambda x: x.nanquantile(torch.tensor([0.1, 0.9])).sum(),
], ids=["quantile", "topk", "kthvalue", "median dim", "nanquantile"])
def test_tensors_with_no_selected_element_get_zero_gradients(call):
    # As from the concatenation's backward; None would make an optimizer skip them.
    def leaves():
        return [torch.tensor([1.0, 2.0, 3.0], requires_grad=True), torch.tensor([10.0, 20.0], requires_grad=True),
                torch.tensor(5.0, requires_grad=True)]

    ours, theirs = leaves(), leaves()
    call(mt.bundle(ours)).backward()
    call(torch.cat([t.reshape(-1) for t in theirs])).backward()
    for a, b in zip(ours, theirs):
        assert a.grad is not None and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("call", [
    lambda x: torch.quantile(x, 0.5), lambda x: x.topk(2).values.sum(), lambda x: x.kthvalue(2).values,
    lambda x: torch.median(x), lambda x: torch.median(x, 0).values,
], ids=["quantile", "topk", "kthvalue", "median", "median dim"])
def test_on_demand_bundles_give_their_sources_zero_gradients(call):
    # An op's result computed on demand links the tensors it is computed from, as the
    # concatenation's graph does; a comparison's operand gets none (`d > 0` has no gradient).
    def leaves():
        made = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0]), torch.tensor(5.0), torch.tensor([0.5, -1.0, 2.0])]
        return [t.requires_grad_() for t in made]

    def chain(a, c, d, x):
        return ((a - c).abs() * x) * (d > 0)

    ours, theirs = leaves(), leaves()
    x_ours, x_theirs = (torch.linspace(1, 2, 6).requires_grad_() for _ in range(2))
    b = chain(mt.bundle(ours[:3]), mt.bundle([torch.zeros(3), torch.zeros(2), ours[3].new_zeros(())]),
              mt.bundle([ours[3], torch.ones(2), torch.tensor(1.0)]), x_ours)
    assert b._tensors is None  # computed on demand
    cat = chain(torch.cat([t.reshape(-1) for t in theirs[:3]]), torch.zeros(6),
                torch.cat([theirs[3], torch.ones(3)]), x_theirs)
    call(b).backward()
    call(cat).backward()
    for a, t in zip([*ours, x_ours], [*theirs, x_theirs]):
        assert (a.grad is None) == (t.grad is None)
        if t.grad is not None:
            assert torch.equal(a.grad, t.grad)


_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
_ORDER_CALLS = {
    "topk": lambda x: torch.topk(x, 2), "smallest": lambda x: torch.topk(x, 2, largest=False),
    "kthvalue": lambda x: torch.kthvalue(x, 3), "median": torch.median, "nanmedian": torch.nanmedian,
    "median dim": lambda x: torch.median(x, 0),
}


def _unsigned_case(dtype):
    return [torch.tensor([5, 1, 7, 3]).to(dtype), torch.tensor([[4, 6], [0, 2]]).to(dtype)]


@pytest.mark.parametrize("dtype", [*_UNSIGNED, torch.bool], ids=str)
@pytest.mark.parametrize("name", list(_ORDER_CALLS))
def test_dtypes_torch_cannot_order_on_the_cpu_raise_torchs_error(dtype, name):
    # torch 2.13's CPU kernels order no uint16/32/64 or bool tensor: the bundle raises torch's
    # exception, naming the bundle, as the concatenation does.
    f, tensors = _ORDER_CALLS[name], _unsigned_case(dtype)
    with pytest.raises(Exception) as want:
        f(torch.cat([t.reshape(-1) for t in tensors]))
    with pytest.raises(type(want.value), match=r"ParameterBundle of 2 tensors"):
        f(mt.bundle(tensors))


class _OrderingUnsigned:
    """torch, with kernels that order unsigned integers, as torch has on some devices."""

    def __init__(self):
        for name in ("topk", "kthvalue", "median"):
            real = getattr(torch, name)
            setattr(self, name, lambda x, *a, real=real, **k: real(x.to(torch.int64) if x.dtype in _UNSIGNED else x, *a, **k))

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("dtype", _UNSIGNED, ids=str)
@pytest.mark.parametrize("name", list(_ORDER_CALLS))
def test_dtypes_the_counting_has_no_keys_for_go_to_the_concatenation(monkeypatch, dtype, name):
    # Where torch has a kernel for an unsigned 16/32/64-bit dtype, the radix counting has no
    # order-preserving keys for it: the call raised a bare KeyError; it goes to the fallback
    # (the concatenation's own answer, with its warning; an error naming the call under "error").
    monkeypatch.setattr(_order, "torch", _OrderingUnsigned())  # the dtype check's probe passes
    f, b = _ORDER_CALLS[name], mt.bundle(_unsigned_case(dtype))
    with mt.fallback("error"), pytest.raises(mt.UnsupportedOperationError, match=r"torch\.(topk|kthvalue|median|nanmedian)"):
        f(b)
    # (torch's CPU kernel on the concatenation then refuses the dtype: no answer to compare)
    with pytest.warns(mt.MaterializationWarning), pytest.raises(NotImplementedError, match="not implemented for 'UInt"):
        f(b)

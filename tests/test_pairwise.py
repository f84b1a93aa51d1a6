"""Bundle-with-bundle reductions equal their concatenation versions, for a bundle or a flat other."""

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import modtensor as mt
from generators import cases, check_against_concat, largest_allocation, other_like, peak_allocation
from modtensor._pairwise import DIST_CHUNK_NUMEL, PAIRWISE_FUNCTIONS
from op_specs import PAIRWISE_CALLS

PARAMS = [
    pytest.param(f, call, id=f"{name}-{getattr(f, '__qualname__', name)}-{i}")
    for name, (funcs, _) in PAIRWISE_FUNCTIONS.items()
    for f in funcs
    for i, call in enumerate(PAIRWISE_CALLS[name])
]


@pytest.mark.parametrize("f, call", PARAMS)
@given(case=cases())
def test_pairwise_matches_concat(f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case, seed=7))


@pytest.mark.parametrize("f, call", PARAMS)
@given(case=cases(kinds=("normal",)))
def test_pairwise_with_flat_other(f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case, seed=3), flat_other=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_zero_dim_other_operand_gives_the_concatenations_result(dtype):
    # torch broadcasts a 0-d operand and promotes by its category only; the bundle falls back
    # to the concatenation for it (it used to reduce against it and promote by its dtype).
    b = mt.bundle({"w": torch.randn(3, 4), "b": torch.randn(5)}).detach()
    other = torch.tensor(1.5, dtype=dtype)
    for f in (torch.dist, F.huber_loss, torch.inner, lambda x, y: F.cosine_similarity(x, y, dim=0)):
        with pytest.warns(mt.MaterializationWarning):
            got = f(b, other)
        want = f(b.materialize(), other)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss", [F.mse_loss, F.smooth_l1_loss])
def test_losses_hold_one_tensors_buffer_at_a_time(loss):
    # torch's CPU mse_loss and smooth_l1_loss sum into their elementwise buffer, and their 0-d
    # result kept it: every tensor's until the combine, and in a per_param result for good.
    n = 1 << 20
    a, b = (mt.bundle([torch.randn(n) for _ in range(4)]) for _ in range(2))
    cat_a, cat_b = a.materialize(), b.materialize()
    got, peak = peak_allocation(lambda: loss(a, b))
    torch.testing.assert_close(got, loss(cat_a, cat_b))
    assert peak < 3 * n * 4, peak  # torch's buffer and the sum's, for one tensor: not 4 of them
    per_param = loss(a.per_param(), b, reduction="sum")
    assert [t.untyped_storage().nbytes() for t in per_param.tensors] == [4] * 4
    torch.testing.assert_close(per_param.tensors[0], loss(a.tensors[0], b.tensors[0], reduction="sum"))


def test_losses_take_torchs_result_dtype_and_refusals():
    # l1_loss of complex tensors is real; l1_loss refuses bool, huber_loss integers, mse_loss
    # complex, each with torch's exception; a float16 input's huber_loss stays float16.
    target = torch.ones(7)
    cases = [
        (F.l1_loss, [torch.randn(3, dtype=torch.cfloat), torch.randn(4, dtype=torch.cfloat)], target),
        (F.l1_loss, [torch.tensor([True, False, True]), torch.tensor([False] * 4)], target),
        (F.huber_loss, [torch.arange(3), torch.arange(4)], target),
        (F.huber_loss, [torch.randn(3).half(), torch.randn(4).half()], target),
        (F.mse_loss, [torch.randn(3, dtype=torch.cfloat), torch.randn(4, dtype=torch.cfloat)], target),
    ]
    for loss, tensors, y in cases:
        b = mt.bundle(tensors)
        try:
            want = loss(b.materialize(), y)
        except Exception as e:
            with pytest.raises(type(e)):
                loss(b, y)
            continue
        got = loss(b, y)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosine_of_16_bit_bundles_does_not_overflow(dtype):
    # torch divides by the norms before summing; a float16 dot product of the tensors
    # (0.6 * 0.6 over 200k elements) passes 65504, which made the bundle's cosine inf.
    g = torch.Generator().manual_seed(0)
    ts = [(0.6 + 0.1 * torch.randn(200_000, generator=g)).to(dtype), torch.randn(30, generator=g).to(dtype)]
    other = [t + 0.3 * torch.randn(t.shape, generator=g).to(dtype) for t in ts]
    cat, cat_other = (torch.cat([t.reshape(-1) for t in x]) for x in (ts, other))
    for x, y, cx, cy in ((ts, ts, cat, cat), (ts, other, cat, cat_other)):
        got = F.cosine_similarity(mt.bundle(x), mt.bundle(y), dim=0)
        want = F.cosine_similarity(cx, cy, dim=0)
        exact = F.cosine_similarity(cx.double(), cy.double(), dim=0)
        assert got.dtype == dtype
        assert (got.double() - exact).abs() <= (want.double() - exact).abs()


@pytest.mark.parametrize("loss", [F.mse_loss, F.l1_loss, F.huber_loss, F.smooth_l1_loss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mean_losses_of_16_bit_bundles_do_not_overflow(loss, dtype):
    # A tensor's float16 sum of losses passes 65504 long before the mean does; torch's mean
    # accumulates in float32. The bundle's partials were float16, and its combined sum was cast
    # to float16 before the division: inf.
    g = torch.Generator().manual_seed(1)
    ts = [(1 + 0.1 * torch.randn(200_000, generator=g)).to(dtype).requires_grad_(), torch.randn(30, generator=g).to(dtype)]
    target = [torch.full_like(t, -0.5) for t in ts]
    cat, cat_target = (torch.cat([t.reshape(-1) for t in x]) for x in (ts, target))
    got = loss(mt.bundle(ts), mt.bundle(target))
    want = loss(cat, cat_target)
    exact = loss(cat.double(), cat_target.double())
    assert got.dtype == want.dtype and torch.isfinite(got)
    assert (got.double() - exact).abs() <= (want.double() - exact).abs()
    (grad,) = torch.autograd.grad(got, ts[0])
    (want_grad,) = torch.autograd.grad(want, ts[0])
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("call", [
    lambda x, y: torch.dist(x, y), lambda x, y: torch.dist(x, y, 1), lambda x, y: torch.dist(y, x, 3),
    lambda x, y: F.cosine_similarity(x.to(torch.cfloat), y.float(), dim=0),
    lambda x, y: F.cosine_similarity(x.to(torch.cfloat), x.to(torch.cfloat), dim=0),
    lambda x, y: F.cosine_similarity(x.long(), x.long(), dim=0),
    lambda x, y: torch.dot(y, y), lambda x, y: y @ y, lambda x, y: torch.vdot(y, y),
], ids=["dist bool", "dist bool p=1", "dist bool first", "cosine complex-real", "cosine complex",
        "cosine long", "dot bool", "matmul bool", "vdot bool"])
@pytest.mark.parametrize("sizes", [(5000, 10), (3, 4)], ids=["long", "tiny"])
def test_operand_dtypes_torch_refuses_raise_its_error(call, sizes):
    # torch.dist subtracts (bool refused), cosine_similarity takes real floats only: the
    # bundle raises torch's error, where it used to compute a number (or a complex one). dot
    # of bool raised torch's error from a tensor's kernel, naming no bundle.
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g) for n in sizes]
    ys = [torch.rand(n, generator=g) > 0.5 for n in sizes]
    cat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    with pytest.raises((RuntimeError, NotImplementedError)) as want:
        call(cat(xs), cat(ys))
    first_line = str(want.value).splitlines()[0][:40]
    for strategy in ("concat", "per_param"):
        with pytest.raises(type(want.value), match=f"{re.escape(first_line)}.*ParameterBundle of 2 tensors"):
            call(mt.bundle(xs, strategy=strategy), mt.bundle(ys, strategy=strategy))


def _cosine_16_bit_case(dtype, sizes):
    g = torch.Generator().manual_seed(2)
    ts = [(0.6 + 0.1 * torch.randn(n, generator=g)).to(dtype) for n in sizes]
    other = [(t.float() + 0.3 * torch.randn(t.shape, generator=g)).to(dtype) for t in ts]
    return ts, other


def _cosine_and_grads(make, tensors, other):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = F.cosine_similarity(make(leaves), make(other), dim=0)
    return value, torch.autograd.grad(value, leaves)


def _cat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_cosine_keeps_and_makes_no_float32_copies(dtype):
    # The 16-bit partials were made on float32 copies of both tensors: a whole-tensor
    # temporary without grad, and with grad kept by autograd for backward (torch.dot saves its
    # inputs), four times the 16-bit operands' memory where the concatenations take two.
    n = 1 << 18
    ts, other = _cosine_16_bit_case(dtype, [n, 3000])
    leaves = [t.clone().requires_grad_() for t in ts]
    originals = {t.untyped_storage().data_ptr() for t in (*leaves, *other)}
    kept = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in originals:
            kept.append(t.untyped_storage().nbytes())
        return t

    F.cosine_similarity(mt.bundle(ts), mt.bundle(other), dim=0)  # the blocks' buffers: made once, kept
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cosine_similarity(mt.bundle(leaves), mt.bundle(other), dim=0)
    assert sum(kept) <= n * 2 // 16, kept  # a short tensor's float32 copies at most
    for tensors in (ts, leaves):
        cosine = functools.partial(F.cosine_similarity, mt.bundle(tensors), mt.bundle(other), dim=0)
        _, largest = largest_allocation(cosine)
        assert largest <= n * 2 // 16, largest


@pytest.mark.parametrize("kernels", ["small_kernels", "real"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_cosine_and_gradients_match_float64(request, kernels, dtype):
    # By blocks (the small kernels: rows, tail rows, several blocks, for every tensor) or not,
    # the value is as close to the float64 one as the concatenation's, and the gradients are
    # the float64 ones rounded to 16 bits (the concatenation's, made in 16 bits, are further off).
    if kernels == "small_kernels":
        request.getfixturevalue("small_kernels")
    sizes = [40, 7, 3, 1] if kernels == "small_kernels" else [1 << 17, 1000, 1]
    ts, other = _cosine_16_bit_case(dtype, sizes)
    got, grads = _cosine_and_grads(mt.bundle, ts, other)
    want, want_grads = _cosine_and_grads(_cat, ts, other)
    exact, exact_grads = _cosine_and_grads(_cat, [t.double() for t in ts], [t.double() for t in other])
    assert got.dtype == want.dtype == dtype
    assert (got.double() - exact).abs() <= (want.double() - exact).abs()
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for grad, want_grad, exact_grad in zip(grads, want_grads, exact_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), exact_grad, rtol=eps, atol=tiny)
        assert (grad.double() - exact_grad).abs().max() <= (want_grad.double() - exact_grad).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_cosine_second_derivatives(small_kernels, dtype):
    # The blocks' backward is itself differentiable (a gradient penalty), and a zero tensor's
    # second derivative stays finite, as the concatenation's.
    ts, other = _cosine_16_bit_case(dtype, [40, 7, 5])
    ts[1] = torch.zeros_like(ts[1])

    def penalty_grads(make, tensors, others):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        value = F.cosine_similarity(make(leaves), make(others), dim=0)
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        sum(gr.double().pow(2).sum() for gr in grads).backward()
        return [leaf.grad for leaf in leaves]

    got = penalty_grads(mt.bundle, ts, other)
    want = penalty_grads(_cat, ts, other)
    exact = penalty_grads(_cat, [t.double() for t in ts], [t.double() for t in other])
    for a, b, e in zip(got, want, exact):
        assert torch.isfinite(a).all()
        concat_error = (b.double() - e).abs().max()
        assert (a.double() - e).abs().max() <= max(concat_error, 8 * torch.finfo(dtype).eps * e.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("p", [float("inf"), -float("inf")], ids=["inf", "-inf"])
def test_inf_distance_tied_across_tensors_shares_its_gradient(dtype, p):
    # The largest (smallest) difference is in two tensors: counting the ties read the device
    # of a pair of tensors, and raised AttributeError where torch splits the gradient.
    def leaves():
        return [
            torch.tensor([1.0, 3.0], dtype=dtype, requires_grad=True), torch.tensor([-5.0, 0.0], dtype=dtype, requires_grad=True),
            torch.tensor([2.0, 0.0], dtype=dtype), torch.tensor([-2.0, 1.0], dtype=dtype, requires_grad=True),
        ]
    got, want = leaves(), leaves()
    value = torch.dist(mt.bundle(got[:2]), mt.bundle(got[2:]), p)
    expected = torch.dist(torch.cat(want[:2]), torch.cat(want[2:]), p)
    torch.testing.assert_close(value, expected)
    for g, w in zip(torch.autograd.grad(value, got[:2] + got[3:]), torch.autograd.grad(expected, want[:2] + want[3:])):
        torch.testing.assert_close(g, w)


def test_allclose_holds_one_chunks_temporaries_at_a_time():
    # torch's isclose makes temporaries of a few times its input's size: each tensor's (4x the
    # largest) where a chunk's do, with the same verdicts.
    n = 1 << 21
    xs = [torch.randn(n) for _ in range(3)] + [torch.randn(1024, n // 1024)]
    a, b = mt.bundle(xs), mt.bundle([x.clone() for x in xs])
    got, peak = peak_allocation(lambda: torch.allclose(a, b))
    assert got is True
    assert peak < 1.5 * n * 4, peak  # half a tensor's bytes, not 4 tensors'
    inf, nan = float("inf"), float("nan")
    for mine, theirs in ((1.0, 1.0 + 1e-4), (nan, nan), (inf, inf), (inf, -inf), (nan, 1.0), (0.0, 1e-9)):
        c, d = (mt.bundle([torch.ones(3), torch.arange(float(n // 4)).view(8, -1)]) for _ in range(2))
        c.tensors[1][-1, -1], d.tensors[1][-1, -1] = mine, theirs  # past the first chunk
        for kwargs in ({}, {"equal_nan": True}, {"rtol": 1e-3}, {"atol": 1e-8, "rtol": 0.0}):
            want = torch.allclose(c.materialize(), d.materialize(), **kwargs)
            assert torch.allclose(c, d, **kwargs) is want, (mine, theirs, kwargs)
            assert torch.allclose(d.per_param(), c, **kwargs).tensors[1] == want
    with pytest.raises(RuntimeError, match="Float did not match Double"):
        torch.allclose(c, d.double())


PAIRS_BY_CHUNKS = {
    "mse_loss": F.mse_loss, "l1_loss": F.l1_loss, "smooth_l1_loss": F.smooth_l1_loss, "huber_loss": F.huber_loss,
    "dot": torch.dot, "cosine_similarity": lambda x, y: F.cosine_similarity(x, y, dim=0),
}


@pytest.mark.parametrize("name", sorted(PAIRS_BY_CHUNKS))
def test_pairs_of_long_tensors_are_read_a_chunk_at_a_time(name):
    # torch's CPU losses make an elementwise buffer of the tensor's size beside a copy of it,
    # and an operand computed on demand (`a * 2`) was made whole: a chunk's of each now.
    reduce = PAIRS_BY_CHUNKS[name]
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    xs, ys = ([torch.randn(n, generator=g) for _ in range(4)] for _ in range(2))
    a, b = mt.bundle(xs), mt.bundle(ys)
    x, y = torch.cat(xs), torch.cat(ys)
    pairs = [((a, b), (x, y)), ((a * 2, b), (x * 2, y)), ((a, y), (x, y)), ((b, (a - 1).abs()), (y, (x - 1).abs()))]
    for (first, second), (cat_first, cat_second) in pairs:
        got, peak = peak_allocation(lambda: reduce(first, second))
        assert peak < 0.75 * n * 4, peak  # a few chunks': not 1 to 3 tensors'
        # against float64: float32 sums of 8M elements are off in the sixth digit
        exact = reduce(cat_first.double(), cat_second.double()).float()
        torch.testing.assert_close(got, exact, rtol=2e-5, atol=0)


@pytest.mark.parametrize("p", [0, 1, 2, 3, -1.5, float("inf"), -float("inf")])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the sizes stay shrunk
@given(case=cases())
def test_dist_by_chunks_matches_concat(small_chunks, p, case):
    check_against_concat(case, lambda x, y: torch.dist(x, y, p), other_like(case, seed=7))


@pytest.mark.parametrize("p", [0, 1, 2, 3, float("inf")])
def test_dist_reads_long_pairs_a_chunk_at_a_time(p):
    # torch.dist of two bundles made each pair's difference whole (GPT-2's embedding: 154 MiB);
    # a chunk's now, but for the L2 distance, which diff_l2_norm took by rows already.
    n = DIST_CHUNK_NUMEL
    g = torch.Generator().manual_seed(0)
    xs, ys = ([torch.randn(size, generator=g) for size in (n, n + 7, 5)] for _ in range(2))
    got, peak = peak_allocation(lambda: torch.dist(mt.bundle(xs), mt.bundle(ys), p))
    assert peak < 0.25 * n * 4, peak
    # against float64: float32 norms of 8M elements are off in the fifth digit
    exact = torch.dist(torch.cat(xs).double(), torch.cat(ys).double(), p).float()
    torch.testing.assert_close(got, exact, rtol=2e-5, atol=0)


@pytest.mark.parametrize("p", [0, 1, 2, 3, float("inf")])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.float32])
def test_dist_warns_only_where_torch_warns_on_the_concatenations(dtype, p):
    # torch.dist of one complex element with p=0 warns that it discards the imaginary part;
    # the bundle's one-element probe of the dtypes, and a one-element tensor's partial, did
    # where the concatenations (of more elements) do not.
    import warnings

    torch.manual_seed(0)
    shapes = [(3, 4), (1,), (2,)]
    a, b = ([torch.randn(s, dtype=dtype) for s in shapes] for _ in range(2))
    with warnings.catch_warnings(record=True) as want:
        warnings.simplefilter("always")
        expected = torch.dist(torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b]), p=p)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        result = torch.dist(mt.bundle(a), mt.bundle(b), p=p)
    assert [str(w.message) for w in got] == [str(w.message) for w in want]
    torch.testing.assert_close(result, expected)
    # the norms of order 0 too
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        result = torch.linalg.vector_norm(mt.bundle(a), p)
    assert not got
    torch.testing.assert_close(result, torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in a]), p))


@pytest.mark.parametrize("call", [
    torch.dot, torch.vdot, torch.inner, torch.matmul, torch.dist, F.mse_loss, F.l1_loss, F.huber_loss,
], ids=["dot", "vdot", "inner", "matmul", "dist", "mse_loss", "l1_loss", "huber_loss"])
@pytest.mark.parametrize("strategy", ["per_param", "weighted"])
def test_a_tensor_torch_refuses_alone_is_named_under_per_tensor_strategies(call, strategy):
    # The concatenation of a float and a bool tensor is float; per tensor the bool one is
    # reduced alone, which torch refuses: its bare error named neither function nor bundle.
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5000, generator=g), torch.rand(3, generator=g) > 0.5]
    with pytest.raises((RuntimeError, NotImplementedError)) as want:
        call(tensors[1], tensors[1])
    first_line = re.escape(str(want.value).splitlines()[0][:40])
    b = mt.bundle(tensors, strategy=strategy)
    name = getattr(call, "__name__", "")
    with pytest.raises(type(want.value), match=f"{name}.*{first_line}.*tensor '1' of ParameterBundle of 2 tensors"):
        call(b, b)

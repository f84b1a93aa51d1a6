"""Elementwise results are computed on demand, one tensor at a time, with eager semantics."""

import pytest
import torch

import modtensor as mt
from generators import peak_allocation, track_live


def test_math_ops_are_on_demand_and_conversions_are_not():
    b = mt.bundle([torch.randn(3, 3), torch.randn(4)])
    assert (b**2)._tensors is None and (b - b).abs()._tensors is None
    assert torch.where(b > 0, b, 0.0)._tensors is None
    assert b.clone()._tensors is not None and b.double()._tensors is not None


@pytest.mark.parametrize(
    "cast",
    [torch.Tensor.float, torch.Tensor.half, torch.Tensor.long, lambda x: x.to(torch.float64), lambda x: x.to(dtype=torch.int32)],
)
def test_a_cast_of_an_on_demand_bundle_stays_on_demand(cast):
    # `(b != 0).float().mean()` (a sparsity) made the whole model's mask in float32 at once
    tensors = [torch.randn(60, 50).relu(), torch.randn(3000).relu(), torch.zeros(10)]
    b, flat = mt.bundle(tensors), torch.cat([t.reshape(-1) for t in tensors])
    mask = b != 0
    lazy = cast(mask)
    assert lazy._tensors is None and lazy.dtype == cast(flat != 0).dtype
    peak = track_live(lazy)
    torch.testing.assert_close(lazy.sum(), cast(flat != 0).sum(), rtol=0, atol=0)
    assert peak[0] == 1
    torch.testing.assert_close(cast(b.abs()).double().sum(), cast(flat.abs()).double().sum())
    # a cast of stored tensors, and a move or a forced copy, stay eager snapshots
    assert cast(b)._tensors is not None
    assert mask.to("cpu")._tensors is not None and mask.to(torch.float32, copy=True)._tensors is not None
    b.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        lazy.sum()


@pytest.mark.parametrize(
    "reduce",
    [torch.sum, torch.amax, torch.std, torch.norm, lambda x: torch.linalg.vector_norm(x, float("inf"))],
)
def test_reductions_hold_one_intermediate_at_a_time(reduce):
    b = mt.bundle([torch.randn(100) for _ in range(6)])
    lazy = (b - 1).abs()
    peak = track_live(lazy)
    with torch.no_grad():
        reduce(lazy)
    assert peak[0] == 1
    assert lazy._tensors is None  # nothing was kept


@pytest.mark.parametrize(
    "reduce",
    [
        torch.amax, torch.max, torch.aminmax, lambda x: torch.linalg.vector_norm(x, float("-inf")),
        lambda x: torch.dist(x, torch.zeros(x.shape), float("inf")), lambda x: torch.norm(x, 3),
    ],
)
def test_extrema_in_grad_mode_without_gradients_hold_one_intermediate_at_a_time(reduce):
    # Grad mode is on by default: the extrema kept every tensor for counting ties, which only
    # a recorded gradient needs, so `(a - b).abs().amax()` in a script held the model's size.
    b = mt.bundle([torch.randn(2000) for _ in range(6)])  # over TINY_NUMEL: per tensor
    lazy = (b - 1).abs()
    peak = track_live(lazy)
    reduce(lazy)
    assert peak[0] == 1


def test_squared_sum_forward_backward_keeps_no_intermediate():
    params = [torch.randn(50, requires_grad=True) for _ in range(4)]
    lazy = mt.bundle(params) ** 2
    peak = track_live(lazy)
    lazy.sum().backward()
    # the sum of squares is fused into one kernel per tensor: no square is ever made
    assert peak[0] == 0
    for p in params:
        torch.testing.assert_close(p.grad, 2 * p.detach())


def test_tensors_computes_once_and_keeps():
    b = mt.bundle([torch.ones(2), torch.ones(3)])
    lazy = b * 2
    first = lazy.tensors
    assert lazy.tensors is first and lazy._tensors is first
    torch.testing.assert_close(lazy.materialize(), torch.full((5,), 2.0))


def test_inputs_modified_in_place_afterwards_are_refused():
    a, c = torch.ones(3), torch.zeros(3)
    diff = mt.bundle([a]) - mt.bundle([c])
    a.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after the bundle was made"):
        diff.sum()
    snapshot = (mt.bundle([a]) - mt.bundle([c])).clone()
    a.add_(1)
    assert float(snapshot.sum()) == 6.0
    # `.tensors` is a snapshot too: the fused chains ((x - y).norm()) no longer read the inputs
    kept = mt.bundle([a]) - mt.bundle([c])
    kept.tensors
    a.add_(1)
    assert float(kept.norm()) == float(torch.full((3,), 3.0).norm())


def test_an_on_demand_operand_written_in_place_afterwards_is_refused():
    # `z = y + 1` reads y's tensors when z is used. An in-place op on y (which computes and
    # keeps y's tensors, then writes them) went unseen: z gave 3 * 2 + 1 where plain torch's
    # z, computed before the write, is 2 + 1.
    a = torch.ones(3)
    y = mt.bundle([a]) * 2
    z = y + 1
    y.mul_(3)
    with pytest.raises(RuntimeError, match="modified in place after the bundle was made"):
        z.sum()
    y = mt.bundle([a]) * 2
    z, w = y + 1, y - 1
    y.tensors  # kept, not written: z still reads them
    assert float(z.sum()) == 9.0
    y.tensors[0].add_(1)
    for use in (lambda: z.sum(), lambda: z.tensors, lambda: w.norm(), lambda: (z ** 2).sum()):
        with pytest.raises(RuntimeError, match="modified in place after the bundle was made"):
            use()


def test_grad_mode_of_creation_is_kept():
    p = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        doubled = mt.bundle([p]) * 2
    assert not doubled.requires_grad and not doubled.sum().requires_grad
    squared = mt.bundle([p]) ** 2
    with torch.no_grad():
        pass
    assert squared.requires_grad and squared.sum().requires_grad


def test_errors_are_raised_when_the_op_is_called_not_later():
    b = mt.bundle([torch.arange(3), torch.arange(4)])
    with pytest.raises(NotImplementedError, match="bitwise_and"):
        torch.bitwise_and(b.float(), b.float())


def test_chains_feed_order_free_reductions_tensor_by_tensor():
    torch.manual_seed(0)
    a = mt.bundle([torch.randn(5, 5), torch.randn(7)])
    c = mt.bundle([torch.randn(5, 5), torch.randn(7)])
    ref = a.materialize() - c.materialize()
    torch.testing.assert_close((a - c).norm(), ref.norm())
    torch.testing.assert_close(torch.dist(a, c), ref.norm())
    torch.testing.assert_close(((a - c) ** 2).mean(), (ref**2).mean())
    assert ((a - c).abs() > 1).sum() == (ref.abs() > 1).sum()


def test_order_statistics_make_on_demand_chunks_not_whole_tensors():
    torch.manual_seed(0)
    params = [torch.randn(3000), torch.randn(40, 50).t(), torch.randn(7)]  # one non-contiguous
    lazy = (mt.bundle(params) - 0.5).abs()
    cat = torch.cat([(p - 0.5).abs().reshape(-1) for p in params])
    peak = track_live(lazy)
    with torch.no_grad():
        assert torch.equal(torch.topk(lazy, 5).values, torch.topk(cat, 5).values)
        assert torch.equal(torch.quantile(lazy, 0.3), torch.quantile(cat, 0.3))
        assert torch.equal(torch.kthvalue(lazy, 100).values, torch.kthvalue(cat, 100).values)
    # only the non-contiguous tensor is ever made whole: its flat chunks are not views
    assert peak[0] <= 1


def test_contiguous_on_demand_chunks_never_make_a_whole_tensor():
    lazy = mt.bundle([torch.randn(3000), torch.randn(500)]).abs()
    peak = track_live(lazy)
    with torch.no_grad():
        torch.quantile(lazy, 0.5)
        torch.topk(lazy, 3)
    assert peak[0] == 0


CHUNKED_REDUCTIONS = {
    "sum": torch.sum, "mean": torch.mean, "std": torch.std, "norm": torch.norm, "amax": torch.amax,
    "argmin": torch.argmin, "aminmax": torch.aminmax, "logsumexp": lambda x: torch.logsumexp(x, 0),
    "count_nonzero": lambda x: torch.count_nonzero(x > 1),
}
CHAINS = {
    "(a - b).abs()": lambda a, b: (a - b).abs(),
    "(a - b) ** 2": lambda a, b: (a - b) ** 2,
    "a * 2 + 1": lambda a, b: a * 2 + 1,
    "isclose(a, b)": lambda a, b: torch.isclose(a, b, atol=0.5),
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_chains_feed_reductions_a_chunk_at_a_time(chain):
    # Each tensor of a chain was made whole, with its intermediates (`a - b` beside its
    # `.abs()`; isclose's own temporaries, 4x the tensor): a chunk's are made instead.
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    xs, ys = ([torch.randn(n, generator=g) for _ in range(4)] for _ in range(2))
    a, b = mt.bundle(xs), mt.bundle(ys)
    want = CHAINS[chain](torch.cat(xs), torch.cat(ys))
    for name, reduce in CHUNKED_REDUCTIONS.items():
        if want.dtype == torch.bool and name not in ("sum", "amax", "count_nonzero"):
            continue  # torch refuses the others on bool
        got, peak = peak_allocation(lambda: reduce(CHAINS[chain](a, b)))
        # a few chunks': not 2 to 4 tensors'
        assert peak < 1.1 * n * 4, (name, peak)
        # against float64: torch's float32 norm of these 8M elements is off by 2e-4
        exact = reduce(want.double() if want.is_floating_point() else want)
        torch.testing.assert_close(got, exact, check_dtype=False, rtol=2e-5, atol=0)


def test_a_sum_of_squares_reads_its_base_by_chunks():
    # The fused kernel of `(x ** 2).sum()` took its on-demand base `x` whole: 1.4x a tensor.
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    xs, ys = ([torch.randn(n, generator=g) for _ in range(4)] for _ in range(2))
    a, b = mt.bundle(xs), mt.bundle(ys)
    with torch.no_grad():
        got, peak = peak_allocation(lambda: ((a.abs() - b) ** 2).sum())
    want = ((torch.cat(xs).abs() - torch.cat(ys)).double() ** 2).sum()
    torch.testing.assert_close(got, want, check_dtype=False, rtol=2e-6, atol=0)
    assert got.dtype == torch.float32
    assert peak < 0.5 * n * 4, peak  # a few chunks'


NORMS_OF_DIFFERENCES = {
    "norm": lambda d: d.norm(),
    "norm(2)": lambda d: d.norm(2),
    "vector_norm": torch.linalg.vector_norm,
}


@pytest.mark.parametrize("name", sorted(NORMS_OF_DIFFERENCES))
def test_a_norm_of_a_difference_reads_on_demand_operands_by_chunks(name):
    # The fused kernel of `(x - y).norm()` made its on-demand operands whole, and their
    # difference beside them: 3x a tensor.
    reduce = NORMS_OF_DIFFERENCES[name]
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    xs, ys = ([torch.randn(n, generator=g) for _ in range(4)] for _ in range(2))
    a, b = mt.bundle(xs), mt.bundle(ys)
    got, peak = peak_allocation(lambda: reduce(a * 2 - b.abs()))
    assert peak < 0.5 * n * 4, peak  # a few chunks'
    want = reduce(torch.cat(xs).double() * 2 - torch.cat(ys).double().abs())
    torch.testing.assert_close(got, want, check_dtype=False, rtol=2e-6, atol=0)
    assert got.dtype == torch.float32
    # Where autograd records, each tensor is made whole, with the concatenation's gradients
    # (again against float64).
    leaves = [t[: 1 << 19].clone().requires_grad_() for t in xs]
    cat = torch.cat([t.detach() for t in leaves]).double().requires_grad_()
    others = [t[: 1 << 19] for t in ys]
    got = reduce(mt.bundle(leaves) * 2 - mt.bundle(others).abs())
    want = reduce(cat * 2 - torch.cat(others).double().abs())
    torch.testing.assert_close(got, want, check_dtype=False, rtol=2e-5, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(torch.cat([t.grad for t in leaves]), cat.grad, check_dtype=False)


def test_chains_by_chunks_match_the_concatenation_where_a_tensor_is_made_whole():
    # A transposed tensor has no flat chunks that are views: it is made whole, the others
    # by chunks, in the concatenation's order (argmax finds the first of the ties).
    n = 1 << 20
    xs = [torch.randn(n), torch.randn(1024, n // 1024).t(), torch.zeros(n), torch.randn(3)]
    xs[2][n // 2 + 7] = 9.0
    xs[0][n - 5] = 9.0
    cat = torch.cat([x.reshape(-1) for x in xs])
    a = mt.bundle(xs)
    with torch.no_grad():
        for reduce in (torch.argmax, torch.sum, torch.amax, lambda x: torch.max(x, 0)):
            torch.testing.assert_close(reduce((a * 2).abs()), reduce((cat * 2).abs()))
    lazy = (a - 1.0).abs()
    peak = track_live(lazy)
    lazy.sum()
    assert peak[0] == 1  # the transposed tensor alone


def test_chains_make_each_tensor_a_chunk_at_a_time():
    # `.tensors` of a chain made each tensor with its intermediates whole beside it (`a - b`
    # beside `(a - b).abs()`; isclose's own temporaries, 4x the tensor): now a chunk's.
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    xs, ys = ([torch.randn(n, generator=g) for _ in range(4)] for _ in range(2))
    a, b = mt.bundle(xs), mt.bundle(ys)
    x, y = torch.cat(xs), torch.cat(ys)
    near = x + 1e-6
    chains = [
        lambda a, b: (a - b).abs(), lambda a, b: a * 2 + 1, lambda a, b: torch.isclose(a, b, atol=0.5),
        lambda a, b: torch.isclose(a, near),  # a flat tensor's chunks too
    ]
    for chain in chains:
        got, peak = peak_allocation(lambda: chain(a, b).tensors)
        assert torch.equal(torch.cat(got), chain(x, y))
        assert peak < got[0].nbytes * 4 + 0.75 * n * 4, peak  # the result and a few chunks


@pytest.mark.parametrize("strategy", ["concat", "per_param", "weighted"])
@pytest.mark.parametrize("size", [3000, 30000], ids=["tiny", "long"])
def test_a_bundle_made_in_inference_mode_is_computed_in_it(real_sizes, strategy, size):
    # Under inference_mode, `torch.cat(...) * 2` is an inference tensor: outside that mode it
    # cannot be written in place. The bundle's tensors were computed later, outside it, as
    # ordinary tensors (written in place without a word); a tiny one's `tensors` raised
    # "Inference tensors do not track version counter".
    ts = [torch.randn(size), torch.randn(40, 3)]
    with torch.inference_mode():
        y = mt.bundle(ts, strategy=strategy) * 2
        c = torch.cat([t.reshape(-1) for t in ts]) * 2
        each = [t * 2 for t in ts]
    assert [t.is_inference() for t in y.tensors] == [c.is_inference()] * 2 == [e.is_inference() for e in each]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in y.tensors]), c)
    with torch.inference_mode():
        z = mt.bundle(ts, strategy=strategy).abs()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor") as want:
        c.add_(1)
    with pytest.raises(type(want.value), match="Inplace update to inference tensor"):
        z.add_(1)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in z.tensors]), torch.cat([t.reshape(-1) for t in ts]).abs())


@pytest.fixture
def default_dtype():
    """Sets the default dtype back after a test that changes it."""
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("op", [lambda x: x / 3, torch.sqrt, lambda x: (x / 3) ** 2], ids=["div", "sqrt", "chain"])
@pytest.mark.parametrize("size", [3000, 30000], ids=["tiny", "long"])
@pytest.mark.parametrize(
    "made, used", [(torch.float32, torch.float64), (torch.bfloat16, torch.float16)], ids=["to float64", "to float16"]
)
def test_an_integer_bundle_keeps_the_default_dtype_of_its_making(real_sizes, default_dtype, op, size, made, used):
    # `torch.cat(...) / 3` of integers is made at once, in the default dtype of that moment.
    # The bundle's tensors were made later, in the default dtype then: after a switch to
    # float64, a RuntimeError blaming a changed parameter; to float16 (the same bytes as
    # bfloat16), silently float16 tensors, inf past 65504 (a long one's amax: inf, not 99840).
    torch.set_default_dtype(made)
    ts = [torch.arange(size) * 10, torch.arange(40, dtype=torch.int32).view(8, 5)]
    lazy, want = op(mt.bundle(ts)), op(torch.cat([t.reshape(-1) for t in ts]))
    torch.set_default_dtype(used)
    assert lazy.dtype == want.dtype == made
    for reduce in (torch.amax, torch.sum, torch.norm):
        torch.testing.assert_close(reduce(lazy), reduce(want))
    torch.testing.assert_close(lazy.materialize(), want)
    assert op(mt.bundle(ts)).dtype == used  # one made now

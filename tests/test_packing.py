"""The table's reductions with small tensors packed into segments, and tiny bundles reduced whole.

By default the suite turns both off (see conftest.py), because Hypothesis' bundles are tiny.
Here every reduction and bundle-with-bundle reduction runs again with them on: "packed" with
the sizes shrunk so that Hypothesis' tensors are packed into several segments, and "tiny"
where every bundle is reduced by one call on its concatenation (the fast lane included).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modtensor as mt
from generators import INTS, cases, check_against_concat, in_threads, other_like
from modtensor import _dispatch, _extrema, _reductions, _strategies
from op_specs import INTEGER_OPS, NONFINITE_UNSTABLE
from test_kernels import CALLS as KERNEL_CALLS
from test_pairwise import PARAMS as PAIRWISE_PARAMS
from test_pointwise import PARAMS as POINTWISE_PARAMS
from test_reductions import PARAMS as REDUCTION_PARAMS

FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def packed(monkeypatch):
    monkeypatch.setattr(_strategies, "PACK_NUMEL", 4)
    monkeypatch.setattr(_strategies, "PACK_LIMIT", 12)
    monkeypatch.setattr(_strategies, "PACK_SHARE", 1)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(_dispatch, "TINY_NUMEL", 1 << 30)


# Packing is off while autograd records, so the packed runs use cases without gradients.
@pytest.mark.parametrize("f, call", REDUCTION_PARAMS)
@FIXTURE_OK
@given(case=cases(grad=False))
def test_reductions_packed(packed, f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case))


# prod is left out: the product of many integers overflows float32, and where it does depends
# on the grouping (per tensor or not), so no split matches the concatenation's NaN or inf there.
@pytest.mark.parametrize("f, call", [p for p in REDUCTION_PARAMS if not p.id.startswith("prod")])
@FIXTURE_OK
@given(case=cases(dtypes=(torch.int64, torch.int32, torch.float32, torch.bool), kinds=("normal",), grad=False))
def test_reductions_packed_mixed_dtypes(packed, f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case), grads=False)


@pytest.mark.parametrize("f, call", PAIRWISE_PARAMS)
@FIXTURE_OK
@given(case=cases(grad=False), flat=st.booleans())
def test_pairwise_packed(packed, f, call, case, flat):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case, seed=7), flat_other=flat)


@pytest.mark.parametrize("name", sorted(KERNEL_CALLS))
@FIXTURE_OK
@given(case=cases(grad=False))
def test_fused_kernels_packed(packed, small_kernels, name, case):
    check_against_concat(case, KERNEL_CALLS[name], other_like(case))


@pytest.mark.parametrize("f, call", REDUCTION_PARAMS)
@FIXTURE_OK
@given(case=cases())
def test_reductions_tiny(tiny, f, call, case):
    def call_twice(x, y):
        call(f, x, y)
        return call(f, x, y)  # the second takes the fast lane

    check_against_concat(case, call_twice, other_like(case))


@pytest.mark.parametrize("f, call", PAIRWISE_PARAMS)
@FIXTURE_OK
@given(case=cases())
def test_pairwise_tiny(tiny, f, call, case):
    def call_twice(x, y):
        call(f, x, y)
        return call(f, x, y)  # the second takes the fast lane

    check_against_concat(case, call_twice, other_like(case, seed=7))


# Tiny bundles compute elementwise ops on the concatenation and keep the result flat; the next
# op reads it without a copy, and a call seen before takes the fast lane.
@pytest.mark.parametrize("name, f, call", POINTWISE_PARAMS)
@settings(FIXTURE_OK, max_examples=4)
@given(case=cases(), int_case=cases(dtypes=INTS, grad=False), finite_case=cases(kinds=("normal", "ties")))
def test_pointwise_tiny(tiny, name, f, call, case, int_case, finite_case):
    if name in INTEGER_OPS:
        case = int_case
    elif name in NONFINITE_UNSTABLE:
        case = finite_case

    def chain(x, y):
        call(f, x, y)
        return call(f, call(f, x, y), y)  # the lane, then an op on a flat result

    check_against_concat(case, chain, other_like(case, seed=5, positive=True))


# -- the segments themselves ---------------------------------------------------------------------


def _recorder(commutative=True, pack_dtype=None):
    """A registered reduction whose partials record what they were given."""
    seen = []

    def count(x, dim=None, keepdim=False):
        if torch.overrides.has_torch_function_unary(x):
            return torch.overrides.handle_torch_function(count, (x,), x, dim=dim, keepdim=keepdim)
        return torch.tensor(x.numel())

    def partial(segment, offset, a):
        seen.append((segment, offset))
        return torch.tensor(segment.numel())

    def combine(states, a):
        return torch.stack(states).sum()

    mt.register_reduction(count, partial, combine, commutative=commutative, pack_dtype=pack_dtype)
    return count, seen


# Integer tensors among floating ones are reduced converted, as torch.cat converts them (see
# test_integer_tensors_are_reduced_as_the_concatenation_converts_them): copies, so kept apart.
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.int64, torch.int32)], ids=["floats", "ints"])
@FIXTURE_OK
@given(data=st.data())
def test_segments_cover_every_element_once(packed, dtypes, data):
    case = data.draw(cases(dtypes=dtypes, grad=False))
    count, seen = _recorder()
    b = case.bundle()
    assert int(count(b)) == b.numel()
    lone = [s for s, _ in seen if any(s is t for t in b.tensors)]
    copies = [s for s, _ in seen if not any(s is t for t in b.tensors)]
    # A tensor reduced alone is never copied; copies are flat, bounded, and hold exactly the
    # elements of the small tensors not reduced alone.
    for c in copies:
        assert c.dim() == 1 and c.numel() <= _strategies.PACK_LIMIT
    small = [t for t in b.tensors if 0 < t.numel() <= _strategies.PACK_NUMEL and not any(t is s for s in lone)]
    for dtype in {t.dtype for t in b.tensors}:
        got = [c for c in copies if c.dtype == dtype]
        want = [t.reshape(-1) for t in small if t.dtype == dtype]
        assert sum(c.numel() for c in got) == sum(w.numel() for w in want)
        if want:
            got_sorted, want_sorted = (torch.cat(xs).sort().values for xs in (got, want))
            torch.testing.assert_close(got_sorted, want_sorted, equal_nan=True, rtol=0, atol=0)


def _counted(**options):
    """A registered reduction counting elements, its partial's and its partials' arguments."""
    seen, batches = [], []

    def count(x, dim=None, keepdim=False):
        if torch.overrides.has_torch_function_unary(x):
            return torch.overrides.handle_torch_function(count, (x,), x, dim=dim, keepdim=keepdim)
        return torch.tensor(x.numel())

    def partials(tensors, a):
        batches.append(tensors)
        return [torch.tensor(t.numel()) for t in tensors]

    mt.register_reduction(
        count, lambda t, offset, a: seen.append(t) or torch.tensor(t.numel()),
        lambda states, a: torch.stack(states).sum(), commutative=True, partials=partials, **options,
    )
    return count, seen, batches


def test_a_batch_call_takes_the_small_tensors_uncopied(packed):
    # partials= reduces many tensors in one call (torch._foreach_norm): packing would only copy
    count, seen, batches = _counted()
    tensors = [torch.randn(n) for n in (3, 2, 40, 1, 0, 3)] + [torch.randn(2, dtype=torch.float64)]
    with torch.no_grad():
        assert int(count(mt.bundle(tensors))) == 51
    assert seen == []
    assert [[id(t) for t in batch] for batch in batches] == [
        [id(t) for t in tensors[:6] if t.numel()], [id(tensors[6])]
    ]


def test_a_batch_call_without_the_small_tensors(packed):
    # partials_small=False (var and std): the small tensors are packed and reach partial, the
    # batch call gets the others, one call per dtype (each call's tensors kept with the bundle).
    count, seen, batches = _counted(partials_small=False)
    tensors = [torch.randn(n) for n in (3, 20, 2, 40, 1, 0, 3, 7)] + [torch.randn(5, dtype=torch.float64)]
    b = mt.bundle(tensors)
    with torch.no_grad():
        assert int(count(b)) == 81
        assert int(count(b)) == 81
    assert [t.numel() for t in seen] == [9, 9]  # the float32 tensors of at most PACK_NUMEL (4), one pack
    assert [[id(t) for t in batch] for batch in batches[:2]] == [[id(tensors[i]) for i in (1, 3, 7)], [id(tensors[8])]]
    assert batches[2:] == batches[:2] and all(x is y for x, y in zip(batches[2:], batches[:2]))


@FIXTURE_OK
@given(case=cases())
def test_norm_and_amax_of_many_tensors_in_one_call(packed, monkeypatch, case):
    # Without autograd recording, norm and amax take each dtype's tensors in one _foreach call
    # (kept with the bundle, with which are long: so called twice), one state per call.
    calls = []
    for name in ("_foreach_norm", "_foreach_max"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda ts, *a, _real=real, **k: calls.append(len(ts)) or _real(ts, *a, **k))
    ops = [lambda x, y: x.norm(), lambda x, y: x.amax(), lambda x, y: torch.linalg.vector_norm(x),
           lambda x, y: x.max(), lambda x, y: (x.norm(), x.norm(), x.amax(), x.amax())]
    with torch.no_grad():
        for op in ops:
            check_against_concat(case, op, grads=False)
    floats = [t for t in case.tensors if t.numel() and (t.is_floating_point() or t.is_complex())]
    if len({t.dtype for t in case.tensors}) == 1 and len(floats) > 1 and floats[0].dtype in (torch.float32, torch.float64):
        assert calls  # the one-call path was taken



@FIXTURE_OK
@given(case=cases(), one_by_one=st.sampled_from([1, 3, 1 << 16]))
def test_amax_of_long_tensors_one_by_one(packed, monkeypatch, case, one_by_one):
    # On the CPU, tensors from _AMAX_ONE_BY_ONE elements take torch.amax each (faster than
    # torch._foreach_max's Tensor.max there), the others one _foreach_max call: the same maxima.
    monkeypatch.setattr(_extrema, "_AMAX_ONE_BY_ONE", one_by_one)
    batched = []
    real = torch._foreach_max
    monkeypatch.setattr(torch, "_foreach_max", lambda ts: batched.extend(ts) or real(ts))
    with torch.no_grad():
        for op in (lambda x, y: x.amax(), lambda x, y: x.max(), lambda x, y: torch.amax(x * 2)):
            check_against_concat(case, op, grads=False)
    assert all(t.numel() < one_by_one for t in batched)


def test_pairs_and_chains_work_out_their_packing_plan_once(packed, monkeypatch):
    # `(a - b).norm()`, `(a ** 2).sum()` and `torch.dist(a, b)` keep their packing plans with
    # a (the on-demand bundle is new at each call); a's own reductions keep theirs apart.
    walks = []
    real = _strategies.Pieces._pack_limit
    monkeypatch.setattr(_strategies.Pieces, "_pack_limit", lambda self, key: walks.append(key) or real(self, key))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=gen) for n in (3, 2, 40, 1, 0, 3, 7)]
    ys = [torch.randn(n, generator=gen) for n in (3, 2, 40, 1, 0, 3, 7)]
    a, b = mt.bundle(xs), mt.bundle(ys)
    fa, fb = torch.cat(xs), torch.cat(ys)
    ops = [
        (lambda: (a - b).norm(), lambda: (fa - fb).norm()),
        (lambda: (a ** 2).sum(), lambda: (fa ** 2).sum()),
        (lambda: torch.dist(a, b), lambda: torch.dist(fa, fb)),
        (lambda: a.sum(), lambda: fa.sum()),
    ]
    with torch.no_grad():
        for round in range(3):
            walks.clear()
            for op, want in ops:
                torch.testing.assert_close(op(), want())
            assert bool(walks) == (round == 0)  # from the second round on, no plan is worked out again
    # A bundle mixing integers and floats packs its own reductions' tensors as the
    # concatenation's dtype, and pairs by their own dtypes: each with its own plan.
    ints = [torch.arange(n) for n in (3, 2, 4)]
    mixed = mt.bundle(ints + [torch.ones(3), torch.full((2,), 0.5)])
    flat = torch.cat([t.reshape(-1).float() for t in mixed.tensors])
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(torch.dist(mixed, mixed * 0), flat.norm())
            torch.testing.assert_close(mixed.sum(), flat.sum())


def test_fused_chains_refuse_an_input_written_since(packed):
    # The fused (a - b).norm() and (a ** 2).sum() check every input once, before reading any
    # (nothing runs between their kernels): a write to any tensor since is still seen.
    for grad in (False, True):
        xs = [torch.randn(n, requires_grad=grad) for n in (3, 2, 40, 1, 3)]
        ys = [torch.randn(n) for n in (3, 2, 40, 1, 3)]
        a, b = mt.bundle(xs), mt.bundle(ys)
        for written in (ys[0], ys[2], ys[4]):
            difference, squares = a - b, b ** 2
            with torch.no_grad():
                written.add_(1)
            for use in (difference.norm, squares.sum):
                with pytest.raises(RuntimeError, match="modified in place after the bundle was made"):
                    use()


def test_ordered_reductions_see_each_tensor_in_order(packed):
    count, seen = _recorder(commutative=False)
    tensors = [torch.randn(n) for n in (3, 2, 40, 1, 0, 3)]
    with torch.no_grad():
        assert int(count(mt.bundle(tensors))) == 49
    assert [s for s, _ in seen] == [t for t in tensors if t.numel()]
    assert [offset for _, offset in seen] == [0, 3, 5, 45, 46]


def test_no_packing_while_autograd_records(packed):
    count, seen = _recorder()
    tensors = [torch.randn(3, requires_grad=True) for _ in range(4)]
    count(mt.bundle(tensors))
    assert [s for s, _ in seen] == tensors  # the tensors themselves: a copy would be kept for backward
    seen.clear()
    with torch.no_grad():
        count(mt.bundle(tensors))
    assert len(seen) == 1 and seen[0][0].numel() == 12


def test_segments_stay_within_a_share_of_the_bundle(real_sizes):
    # 1000 tensors of 100 elements pack into segments of at most 1% of the bundle
    count, seen = _recorder()
    with torch.no_grad():
        assert int(count(mt.bundle([torch.ones(100) for _ in range(1000)]))) == 100_000
    assert max(s.numel() for s, _ in seen) <= 1000
    assert len(seen) == 100


def test_widened_segments_stay_within_a_share_of_the_bundle(real_sizes):
    # A segment widened from float32 to float64 exists beside its float32 copy: the two take
    # at most 1% of the bundle's bytes, so a segment holds at most a third of 1% of its elements.
    # Widening asks nothing of tensors reduced alone, or of keys it leaves as they are.
    wide = lambda dtype, device: torch.float64 if dtype == torch.float32 else dtype  # noqa: E731
    count, seen = _recorder(pack_dtype=wide)
    tensors = [torch.ones(100) for _ in range(1000)] + [torch.ones(100, dtype=torch.bfloat16)] * 2
    tensors.append(torch.ones(_strategies.PACK_NUMEL + 1))
    total = sum(t.numel() for t in tensors)
    with torch.no_grad():
        assert int(count(mt.bundle(tensors))) == total
    packs = [s for s, _ in seen if s.dtype == torch.float64]
    assert max(s.numel() for s in packs) <= total // 300 and sum(s.numel() for s in packs) == 100_000
    assert [s.dtype for s, _ in seen if s.dtype != torch.float64] == [torch.float32, torch.bfloat16]
    assert seen[0][0] is tensors[-1]  # alone, not copied


KEPT_PACK_OPS = {
    "sum": torch.sum, "mean": torch.mean, "nansum": torch.nansum, "nanmean": torch.nanmean,
    "var": torch.var, "amin": torch.amin, "aminmax": lambda x: torch.stack(torch.aminmax(x)),
    "logsumexp": lambda x: torch.logsumexp(x, 0), "count_nonzero": torch.count_nonzero,
}


def test_the_builtin_reductions_packs_follow_the_tensors(packed):
    # The built-in reductions copy each pack into a buffer kept with the bundle, which the next
    # pack and the next call write again: no state is a view of it (each pack's result is its
    # own), and every call sees the tensors' values of now (updated in place between calls).
    gen = torch.Generator().manual_seed(0)
    sizes = (3, 2, 4, 1, 3, 2, 40, 4, 0)
    tensors = [torch.randn(n, generator=gen) + i for i, n in enumerate(sizes)]
    tensors += [torch.randn(2, 2, dtype=torch.float64, generator=gen), torch.randn(3, dtype=torch.float64, generator=gen)]
    b = mt.bundle(tensors)
    with torch.no_grad():
        for _ in range(3):
            cat = torch.cat([t.reshape(-1) for t in tensors])
            for name, op in KEPT_PACK_OPS.items():
                torch.testing.assert_close(op(b), op(cat), rtol=1e-6, atol=1e-6, msg=name)
            for t in tensors:
                t.mul_(-2).add_(1)
    kept = [found[1] for key, found in b._plans.items() if isinstance(key, tuple) and key[0] == "kept packs"]
    assert kept and all(kept), "no pack of several tensors: the kept buffers went untested"


def test_a_packed_tensor_reshaped_to_its_size_since(packed):
    # `p.data = p.data.view(...)` keeps the sizes the bundle checks: its place in the kept
    # buffer, shaped as the tensor was, is shaped afresh (a sum does not mind the shape).
    tensors = [torch.randn(2, 2), torch.randn(3), torch.randn(40)]
    b = mt.bundle(tensors)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(b.sum(), torch.cat([t.reshape(-1) for t in tensors]).sum())
            tensors[0].data = tensors[0].data.reshape(4, 1)


def test_a_librarys_partial_may_keep_its_segment(packed):
    # A registered reduction's partial may return its segment itself (or a view of it): its
    # packs are made afresh, never written again by the next pack.
    def ordered(x, dim=None, keepdim=False):
        if torch.overrides.has_torch_function_unary(x):
            return torch.overrides.handle_torch_function(ordered, (x,), x, dim=dim, keepdim=keepdim)
        return x.reshape(-1).sort().values

    mt.register_reduction(
        ordered, lambda t, offset, a: t.reshape(-1), lambda states, a: torch.cat(states).sort().values,
        commutative=True,
    )
    tensors = [torch.full((n,), float(i)) for i, n in enumerate((3, 2, 4, 1, 3, 2, 40))]
    with torch.no_grad():
        torch.testing.assert_close(ordered(mt.bundle(tensors)), ordered(torch.cat(tensors)), rtol=0, atol=0)


def test_kept_pack_buffers_stay_within_a_share_of_the_bundle(real_sizes):
    # One buffer per segment dtype (and thread): float32 segments within 1% of the bundle's
    # bytes, widened float64 ones (sum, mean, var) within two thirds of that.
    tensors = [torch.ones(100) for _ in range(1000)] + [torch.ones(_strategies.PACK_NUMEL + 1)]
    b = mt.bundle(tensors)
    with torch.no_grad():
        for op in (torch.sum, torch.mean, torch.var, torch.amin, torch.count_nonzero):
            op(b)
    kept = {
        buffer.dtype: buffer.nbytes
        for key, found in b._plans.items() if isinstance(key, tuple) and key[0] == "kept packs"
        for buffer in found[0].values()
    }
    nbytes = b.numel() * 4
    assert set(kept) == {torch.float32, torch.float64}
    assert kept[torch.float32] <= nbytes // 100 and kept[torch.float64] <= nbytes * 2 // 300


@pytest.mark.parametrize("name", ["sum", "var"])
def test_kept_buffers_in_several_threads(real_sizes, name):
    # Each thread writes buffers of its own (packs, the long tensors' sums, the rows of the
    # moments): threads reducing one bundle at once each get its result.
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1 << 17, generator=gen) + i for i in range(3)]
    tensors += [torch.randn(300, generator=gen) * (i + 1) + i for i in range(200)]
    op = KEPT_PACK_OPS[name]
    b, want = mt.bundle(tensors), op(torch.cat(tensors).double())
    in_threads(lambda: torch.testing.assert_close(op(b).double(), want, rtol=1e-6, atol=0), times=30)


def test_packed_float32_sums_are_exact(real_sizes):
    # Norm-layer scales near 1 packed together add up to thousands: in float32 each pack's sum
    # would round by up to ~1e-3, more than the errors of all of GPT-2's long tensors together
    # (its sum landed on the float32 next to the nearest one that way). Packed in float64, a
    # bundle of small float32 tensors sums exactly: to the float32 nearest the exact sum. (The
    # long tensor makes the bundle large enough to pack them; its sum, 0, is exact too.)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        tensors = [torch.randn(768, generator=gen) * 0.1 + 1 for _ in range(60)]
        tensors += [torch.randn(3072, generator=gen) * 0.02 for _ in range(10)] + [torch.zeros(1 << 21)]
        exact = torch.cat(tensors).double()
        b = mt.bundle(tensors)
        with torch.no_grad():
            for got, want in [(b.sum(), exact.sum()), (torch.nansum(b), exact.sum()), (b.mean(), exact.mean())]:
                assert got.dtype == torch.float32 and float(got) == float(want.float())
    assert _reductions._wide_pack(torch.float32, torch.device("mps")) == torch.float32  # no float64 there


def test_widened_and_plain_states_combine_across_devices(packed):
    # The packs' float64 states and the long tensors' float32 ones are combined apart; on
    # several devices (here the CPU and meta) they meet where torch's concatenation would.
    small = [torch.randn(3) for _ in range(3)]
    with torch.no_grad():
        cpu = mt.bundle(small + [torch.randn(20)])
        torch.testing.assert_close(cpu.sum(), torch.cat([t.reshape(-1) for t in cpu.tensors]).sum())
        both = mt.bundle({f"s{i}": t for i, t in enumerate(small)} | {"meta": torch.empty(20, device="meta")})
        for result in (both.sum(), both.mean(), torch.nansum(both)):
            assert result.device.type == "meta" and result.shape == () and result.dtype == torch.float32


# -- the fast lane of tiny bundles -----------------------------------------------------------------


def test_tiny_bundles_give_the_concatenations_result_exactly(real_sizes):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 3)
    b, flat = mt.bundle(conv), torch.cat([p.reshape(-1) for p in conv.parameters()])
    ops = [torch.sum, torch.mean, torch.std, torch.norm, torch.amax, lambda x: torch.logsumexp(x, 0)]
    for op in ops:
        got, want = op(b), op(flat)
        assert torch.equal(got, want) and type(got) is torch.Tensor
    (got,) = torch.autograd.grad(b.std(), conv.weight)
    (want,) = torch.autograd.grad(flat.std(), conv.weight)
    assert torch.equal(got, want)


def test_the_fast_lane_remembers_valid_calls_only(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(_dispatch, "dispatch", lambda *a: calls.append(a[1]) or _real_dispatch(*a))
    b = mt.bundle([torch.ones(2, 2), torch.arange(3.0)])
    for _ in range(2):
        assert float(b.sum()) == 7.0 and float(b.mean(0)) == 1.0
    assert calls == [torch.Tensor.sum, torch.Tensor.mean]  # the second round skips the table
    ints = mt.bundle([torch.ones(2, dtype=torch.int64)])
    for _ in range(2):  # the error is the per-tensor path's, every time
        with pytest.raises(RuntimeError, match="Tensor.mean: the mean needs a floating point"):
            ints.mean()
    with pytest.raises(IndexError, match="behaves as one flat dimension"):
        b.sum(1)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"p": None}, {"p": "fro"}, {"p": 2}, {"p": 2.0}, {"p": 1}, {"p": float("inf")}, {"p": -1.5},
     {"keepdim": True}, {"dtype": torch.float64}, {"p": 3, "keepdim": True, "dtype": torch.float64}, {"dim": 0}],
)
def test_the_lanes_norm_is_tensor_norm(real_sizes, monkeypatch, kwargs):
    # The lane computes b.norm() with torch.linalg.vector_norm, as torch's own Tensor.norm
    # does for a flat tensor; the result must be that of the concatenation's norm, bit for bit.
    calls = []
    monkeypatch.setattr(_dispatch, "dispatch", lambda *a: calls.append(a[1]) or _real_dispatch(*a))
    _dispatch.LANE_CALLS.clear()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    b, flat = mt.bundle(conv), torch.cat([p.reshape(-1) for p in conv.parameters()])
    want = flat.norm(**kwargs)
    for _ in range(2):
        got = b.norm(**kwargs)
        assert torch.equal(got, want) and got.dtype == want.dtype and got.shape == want.shape
    assert calls == [torch.Tensor.norm]  # the second call took the lane
    (got,) = torch.autograd.grad(b.norm(**kwargs).sum(), conv.weight)
    (expected,) = torch.autograd.grad(flat.norm(**kwargs).sum(), conv.weight)
    assert torch.equal(got, expected)


def test_registering_a_handler_forgets_the_lane(tiny):
    class Mine(mt.ParameterBundle):
        pass

    b = Mine([torch.ones(2)], ["w"])
    assert float(b.sum()) == 2.0
    Mine.implements(torch.Tensor.sum)(lambda func, types, args, kwargs: "mine")
    assert b.sum() == "mine"


@pytest.mark.parametrize("make", [lambda b: b.per_param(), lambda b: b.weighted(), lambda b: b**2])
def test_other_strategies_and_chains_of_tiny_bundles(tiny, make):
    b = make(mt.bundle({"w": torch.ones(2, 2), "b": torch.full((2,), 2.0)}))
    for _ in range(2):
        result = b.sum()
    if mt.is_bundle(result):
        assert result.to_dict() == {"w": torch.tensor(4.0), "b": torch.tensor(4.0)}
    else:
        assert float(result) == (4.0 if b.strategy == "weighted" else 12.0)  # numel weights: (16 + 8) / 6


_real_dispatch = _dispatch.dispatch


def test_elementwise_results_of_tiny_bundles_stay_flat(real_sizes):
    w, c = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    b = mt.bundle({"w": w, "c": c})
    for _ in range(2):  # the second round takes the lane
        r = (b * 2 - 1).abs()
        assert r.names == ("w", "c") and [t.shape for t in r.tensors] == [(4, 3), (4,)]
        got = r.to_dict()
        assert torch.equal(got["w"], (w * 2 - 1).abs()) and torch.equal(got["c"], (c * 2 - 1).abs())
        # materialize() is the caller's own copy: writing to it leaves the result alone
        flat = r.materialize()
        flat.zero_()
        assert torch.equal(r.materialize(), (torch.cat([w.reshape(-1), c]) * 2 - 1).abs())
    (gw, gc) = torch.autograd.grad((b - b.detach() * 3).pow(2).sum(), [w, c])
    torch.testing.assert_close(gw, 2 * (w - 3 * w.detach()))
    torch.testing.assert_close(gc, 2 * (c - 3 * c.detach()))


def test_a_flat_result_given_new_data_is_read_from_its_tensors(real_sizes):
    r = mt.bundle([torch.ones(2), torch.ones(3)]) * 2
    first, second = r.tensors
    second.data = torch.zeros(3)  # the tensors are now kept: the flat result is forgotten
    assert r.materialize().tolist() == [2.0, 2.0, 0.0, 0.0, 0.0]
    assert float(r.sum()) == 4.0 and float((r + 1).sum()) == 9.0


def test_ops_returning_their_input_keep_the_parameters_on_tiny_bundles(real_sizes):
    params = [torch.ones(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    b = mt.bundle(params)
    for _ in range(2):
        for same in (+b, b.real, torch.positive(b)):
            assert all(t is p for t, p in zip(same.tensors, params))


def test_tiny_bundles_across_devices_keep_their_results_there(real_sizes):
    b = mt.bundle([torch.ones(2), torch.ones(3, device="meta")])
    for _ in range(2):
        r = b + 1
        assert [t.device.type for t in r.tensors] == ["cpu", "meta"]


def test_the_elementwise_lane_still_checks_structure(real_sizes):
    a, b = mt.bundle([torch.ones(2), torch.ones(3)]), mt.bundle([torch.ones(3), torch.ones(2)])
    for _ in range(2):
        assert float((a + a).sum()) == 10.0
        with pytest.raises(ValueError, match="bundles of different structure"):
            a + b


def test_the_pairwise_lane_checks_the_other_bundle(real_sizes):
    a, c = mt.bundle([torch.ones(2), torch.ones(3)]), mt.bundle([torch.zeros(2), torch.zeros(3)])
    for _ in range(2):
        assert torch.equal(torch.dist(a, c), torch.dist(a.materialize(), c.materialize()))
    swapped, doubles = mt.bundle([torch.ones(3), torch.ones(2)]), c.to(torch.float64)
    with pytest.raises(ValueError, match="bundles of different structure"):
        torch.dist(a, swapped)
    with pytest.raises(RuntimeError, match="expected both operands to have the same dtype"):
        torch.dot(a, doubles)


class _Seen(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


# DispatchTensor writes norm, sum, mean and the arithmetic operators itself (faster than
# torch's path to __torch_function__): whatever else would see the call still does.
_OWN_ENTRIES = [
    (torch.Tensor.norm, lambda b: b.norm(), lambda n: n**0.5),
    (torch.Tensor.__pow__, lambda b: (b**2).sum(), float),
    (torch.Tensor.sum, lambda b: b.sum(), float),
    (torch.Tensor.mean, lambda b: b.mean() * b.numel(), float),
    (torch.Tensor.add, lambda b: (b + b).sum() / 2, float),  # torch names `+` so
    (torch.Tensor.sub, lambda b: (b - b * 0).sum(), float),
    (torch.Tensor.mul, lambda b: (b * 1).sum(), float),
    (torch.Tensor.div, lambda b: (b / 1).sum(), float),
]


@pytest.mark.parametrize("func, op, want", _OWN_ENTRIES)
@pytest.mark.parametrize("size", [6, 5038])  # tiny or not; size + 3 a square
def test_own_entries_reach_torch_function_modes(real_sizes, size, func, op, want):
    b = mt.bundle([torch.ones(size), torch.ones(3)])
    for _ in range(2):  # the second call of a tiny bundle takes the lane
        with _Seen() as seen:
            result = op(b)
        assert func in seen.funcs
        assert float(result) == want(size + 3)


class _Logged(torch.Tensor):
    # Another library's tensor subclass: it must see a call on a bundle and itself. What it
    # records is also what torch names each call.
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _Reflected:
    # A plain object with reflected operators: Python must reach them, as for a tensor.
    def __radd__(self, other):
        return "radd"

    def __rsub__(self, other):
        return "rsub"

    def __rmul__(self, other):
        return "rmul"

    def __rtruediv__(self, other):
        return "rtruediv"

    def __rpow__(self, other):
        return "rpow"


@pytest.mark.parametrize("size", [6, 5038])
def test_own_operators_defer_as_torchs_do(real_sizes, size):
    b = mt.bundle([torch.ones(size), torch.ones(3)])
    ops = {"radd": lambda x, y: x + y, "rsub": lambda x, y: x - y, "rmul": lambda x, y: x * y,
           "rtruediv": lambda x, y: x / y, "rpow": lambda x, y: x**y}
    for _ in range(2):
        for name, op in ops.items():
            assert op(torch.ones(2), _Reflected()) == name  # what a tensor does
            assert op(b, _Reflected()) == name
        other = torch.ones(size + 3).as_subclass(_Logged)
        _Logged.seen.clear()
        total = (b - other).sum()
        assert _Logged.seen and float(total) == 0.0  # _Logged saw the call first


def test_own_entries_name_the_call_as_torch_does(monkeypatch):
    # The table (and a subclass's handlers) see the function torch itself would pass.
    calls = []
    monkeypatch.setattr(_dispatch, "dispatch", lambda *a: calls.append(a[1]) or _real_dispatch(*a))
    b = mt.bundle([torch.ones(5000), torch.ones(3)])
    t = torch.ones(5003).as_subclass(_Logged)
    for op in (lambda x: x + x, lambda x: x - 1, lambda x: x * 2, lambda x: x / 2, lambda x: x**2,
               lambda x: x.sum(), lambda x: x.mean(), lambda x: x.norm()):
        calls.clear()
        _Logged.seen.clear()
        op(b), op(t)
        assert calls[:1] == _Logged.seen[:1]


@pytest.mark.parametrize("sizes", ["per_tensor", "real"])
def test_integer_buffers_updated_in_place_are_seen_by_a_kept_bundle(request, sizes):
    # A float bundle with an integer buffer (BatchNorm's step counter) reduces a converted
    # copy of it; the norm and amax kept those copies with the bundle's plans, so a bundle
    # made once went on seeing the counter as it was (the FAQ: either way, the same values).
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    bn = torch.nn.BatchNorm1d(3)
    for b in (mt.bundle(bn, buffers=True), mt.bundle([torch.zeros(20000), bn.num_batches_tracked])):
        calls = (lambda x: x.amax(), lambda x: x.norm(), lambda x: x.sum(), lambda x: x.aminmax()[1])
        with torch.no_grad():
            for call in calls:
                call(b)
        for _ in range(5):
            bn(torch.randn(4, 3))
        with torch.no_grad():
            for call in calls:
                torch.testing.assert_close(call(b), call(b.materialize()))

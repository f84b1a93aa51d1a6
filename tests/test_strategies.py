"""The per_param and weighted strategies, against the op applied to each tensor."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given

import modtensor as mt
from generators import Case, assert_same, cases, other_like
from modtensor._pairwise import PAIRWISE_FUNCTIONS
from modtensor._reductions import REDUCTION_FUNCTIONS
from modtensor._strategies import STRATEGIES
from op_specs import PAIRWISE_CALLS, REDUCTION_CALLS

REDUCTIONS = [
    pytest.param(f, call, id=f"{name}-{getattr(f, '__qualname__', name)}-{i}")
    for name, funcs in REDUCTION_FUNCTIONS.items()
    for f in funcs
    for i, call in enumerate(REDUCTION_CALLS[name])
]
PAIRWISE = [
    pytest.param(f, call, id=f"{name}-{getattr(f, '__qualname__', name)}-{i}")
    for name, (funcs, _) in PAIRWISE_FUNCTIONS.items()
    for f in funcs
    for i, call in enumerate(PAIRWISE_CALLS[name])
]


def _per_tensor(results):
    """A per_param result (a bundle, or a tuple of bundles) as one result per tensor."""
    if isinstance(results, tuple):
        return list(zip(*(r.tensors for r in results)))
    assert isinstance(results, mt.ParameterBundle)
    return list(results.tensors)


def _expected_per_tensor(case, other, call, f, flatten):
    out = []
    for i, t in enumerate(case.tensors):
        y = other.tensors[i] if other else None
        if flatten:
            t, y = t.reshape(-1), y.reshape(-1)
        out.append(call(f, t, y))
    return out


def _check_per_param(case, other, call, f, flatten=False):
    try:
        want = _expected_per_tensor(case, other, call, f, flatten)
    except Exception as e:
        with pytest.raises(type(e)):
            call(f, case.bundle().per_param(), other.bundle() if other else None)
        return
    got = call(f, case.bundle().per_param(), other.bundle() if other else None)
    got = _per_tensor(got)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, bool):
            w = torch.tensor(w)
        if flatten and isinstance(w, torch.Tensor) and w.dim() == 1:  # reduction="none" keeps shapes
            g = g.reshape(-1)
        assert_same(tuple(g) if isinstance(w, tuple) else g, tuple(w) if isinstance(w, tuple) else w)
    # gradients: through the per-tensor results, to every tensor that requires grad
    leaves = [t for t in case.leaves + (other.leaves if other else []) if t.requires_grad]
    losses = []
    for results in (got, want):
        flat = [r for res in results for r in (res if isinstance(res, tuple) else (res,))]
        flat = [r for r in flat if isinstance(r, torch.Tensor) and r.requires_grad and r.isfinite().all()]
        losses.append(sum((r.double().sum() for r in flat), torch.zeros((), dtype=torch.float64)))
    if leaves and losses[1].requires_grad:
        try:
            g_want = torch.autograd.grad(losses[1], leaves, allow_unused=True)
        except RuntimeError:  # torch has no gradient here (dist with p=0)
            return
        g_got = torch.autograd.grad(losses[0], leaves, allow_unused=True)
        for gg, gw in zip(g_got, g_want):
            if gw is not None and gw.isfinite().all():
                torch.testing.assert_close(gg if gg is not None else torch.zeros_like(gw), gw)


@pytest.mark.parametrize("f, call", REDUCTIONS)
@given(case=cases(kinds=("normal", "ties")))
def test_per_param_reduction_is_the_op_on_each_tensor(f, call, case):
    _check_per_param(case, other_like(case), call, f)


@pytest.mark.parametrize("f, call", PAIRWISE)
@given(case=cases(kinds=("normal",)))
def test_per_param_pairwise_is_the_op_on_each_pair_of_vectors(f, call, case):
    _check_per_param(case, other_like(case, seed=7), call, f, flatten=True)


FULL_REDUCTIONS = [
    pytest.param(f, id=f"{name}-{f.__qualname__}")
    for name, funcs in REDUCTION_FUNCTIONS.items()
    if name not in ("max", "min", "logsumexp")
    for f in funcs
]


def _weights_variants(case):
    names = [str(i) for i in range(len(case.tensors))]
    yield None, [float(t.numel()) for t in case.tensors]
    yield {"*": 1.0}, [1.0] * len(names)
    yield {"0": 3.0, "*": 0.5}, [3.0 if n == "0" else 0.5 for n in names]
    yield (lambda name, t: 1.0 + t.dim()), [1.0 + t.dim() for t in case.tensors]
    yield [float(i + 1) for i in range(len(names))], [float(i + 1) for i in range(len(names))]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("f", FULL_REDUCTIONS)
@given(case=cases(min_tensors=1, kinds=("normal",)))
def test_weighted_is_the_weighted_sum_of_per_tensor_results(f, normalize, case):
    for weights, ws in _weights_variants(case):
        b = case.bundle(strategy="weighted", weights=weights, normalize=normalize)
        terms = [(w, t) for w, t in zip(ws, case.tensors) if w != 0]
        if not terms:
            with pytest.raises(ValueError, match="all weights are zero"):
                f(b)
            continue
        try:
            results = [f(t) for _, t in terms]
        except Exception as e:
            with pytest.raises(type(e)):
                f(b)
            continue
        got = f(b)
        for j in range(len(results[0]) if isinstance(results[0], tuple) else 1):
            parts = [r[j] if isinstance(r, tuple) else r for r in results]
            want = sum(w * p.double() for (w, _), p in zip(terms, parts))
            if normalize:
                want = want / sum(w for w, _ in terms)
            g = got[j] if isinstance(got, tuple) else got
            torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-5, equal_nan=True)


@given(case=cases(min_tensors=1, kinds=("normal",)))
def test_weighted_with_numel_weights_is_the_concatenation_for_mean_and_sum(case):
    b, ref = case.bundle(), case.concat()
    if ref.numel() == 0:
        return
    torch.testing.assert_close(b.weighted().mean().double(), ref.mean().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        b.weighted([1.0] * len(case.tensors), normalize=False).sum().double(), ref.sum().double(), rtol=1e-5, atol=1e-5
    )


def test_the_seed_loop_is_weighted_with_uniform_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(4, 2))
    loop = sum(p.mean() for p in model.parameters()) / len(list(model.parameters()))
    torch.testing.assert_close(mt.bundle(model).weighted({"*": 1.0}).mean(), loop)
    torch.testing.assert_close(mt.bundle(model, strategy="weighted", weights=lambda n, t: 1.0).mean(), loop)


def test_weighted_gradients_reach_the_tensors():
    a, c = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    (mt.bundle([a, c]).weighted([2.0, 1.0]) ** 2).sum().backward()
    torch.testing.assert_close(a.grad, 2 * 2 * a.detach() / 3)
    torch.testing.assert_close(c.grad, 2 * c.detach() / 3)


def test_strategies_survive_elementwise_ops_and_per_param_results_reduce_again():
    lin = torch.nn.Linear(3, 2)
    b = mt.bundle(lin).per_param()
    assert (b * 2).strategy == "per_param" and (b.abs() + b).strategy == "per_param"
    w = mt.bundle(lin).weighted({"weight": 2.0, "*": 1.0}, normalize=False)
    assert (w ** 2).options == {"weights": {"weight": 2.0, "*": 1.0}, "normalize": False}
    largest = b.norm().max()
    assert largest == max(lin.weight.norm(), lin.bias.norm())
    assert b.norm().names == ("weight", "bias") and b.norm().to_dict()["bias"] == lin.bias.norm()
    assert b.norm().strategy == "concat"  # per-tensor results are reduced as one tensor again


def test_per_param_dim_applies_to_each_tensor():
    w, v = torch.randn(3, 4), torch.randn(3, 5)
    out = mt.bundle({"w": w, "v": v}).per_param().sum(dim=1)
    torch.testing.assert_close(out.to_dict()["w"], w.sum(dim=1))
    torch.testing.assert_close(out.to_dict()["v"], v.sum(dim=1))


def test_weights_are_checked_when_the_bundle_is_made():
    # Not at the first reduction, which may come many steps later (or, for an unmatched
    # name, only on the ranks that reach it).
    b = mt.bundle({"w": torch.ones(2, 3), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="3 weights for 2 tensors"):
        b.weighted([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"no weight for \['b'\]"):
        b.with_strategy("weighted", weights={"w": 1.0})
    with pytest.raises(ValueError, match="2 weights for 1 tensors"):
        mt.bundle({"w": torch.ones(2)}, strategy="weighted", weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="weight 1 is 'x'"):
        b.weighted([1.0, "x"])
    # a callable is called at the reductions only
    calls = []
    b.weighted(lambda name, t: calls.append(name) or 1.0)
    assert calls == []


def test_weighted_errors():
    b = mt.bundle({"w": torch.ones(2, 3), "b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"no weight for \['b'\].*'\*'"):
        b.weighted({"w": 1.0}).mean()
    with pytest.raises(ValueError, match="different shapes|one shape"):
        b.weighted().sum(dim=0)
    with pytest.raises(ValueError, match="all weights are zero"):
        b.weighted([0.0, 0.0]).sum()
    with pytest.raises(ValueError, match="2 weights for 3 tensors|3 weights for 2 tensors"):
        b.weighted([1.0, 2.0, 3.0]).sum()
    with pytest.raises(TypeError, match="weights= and normalize="):
        mt.bundle([torch.ones(1)], strategy="weighted", weigths=None)
    with pytest.raises(TypeError, match="weights must be"):
        b.weighted("w")
    # checked when made or at the first reduction, never computed into inf or NaN
    with pytest.raises(TypeError, match="normalize must be True or False, got 'no'"):
        b.weighted(normalize="no")
    with pytest.raises(ValueError, match="sum to 0.*normalize=False"):
        b.weighted([1.0, -1.0]).sum()
    torch.testing.assert_close(b.weighted([1.0, -1.0], normalize=False).sum(), torch.tensor(4.0))
    with pytest.raises(ValueError, match="weight of tensor 'b' .* is NaN"):
        b.weighted([1.0, float("nan")]).sum()
    with pytest.raises(TypeError, match=r"the weight of '\*' is None; weights are numbers"):
        b.weighted({"*": None}).sum()
    for number in (np.float32(2.0), torch.tensor(2.0)):  # what float() takes, as before that check
        torch.testing.assert_close(b.weighted({"*": number}).mean(), b.weighted({"*": 2.0}).mean())


def test_pairwise_under_strategies():
    a = mt.bundle({"w": torch.randn(2, 3), "b": torch.randn(4)})
    c = mt.bundle({"w": torch.randn(2, 3), "b": torch.randn(4)})
    per = torch.dist(a.per_param(), c)
    for name in ("w", "b"):
        torch.testing.assert_close(per.to_dict()[name], torch.dist(a.to_dict()[name], c.to_dict()[name]))
    mse = torch.nn.functional.mse_loss(a.weighted(), c)
    torch.testing.assert_close(mse, torch.nn.functional.mse_loss(a.materialize(), c.materialize()))


class MaxOverLayers(mt.Strategy):
    name = "max_over_layers"

    def reduce(self, call):
        return torch.stack([call.per_tensor(i) for i in range(len(call.bundle.tensors))]).amax()


def test_a_custom_strategy_plugs_into_every_reduction():
    mt.register_strategy(MaxOverLayers())
    assert "max_over_layers" in mt.strategies()
    lin = torch.nn.Linear(3, 2)
    b = mt.bundle(lin, strategy="max_over_layers")
    assert b.norm() == max(lin.weight.norm(), lin.bias.norm())
    assert b.mean() == max(lin.weight.mean(), lin.bias.mean())
    with pytest.raises(TypeError, match="takes no options"):
        mt.bundle(lin, strategy="max_over_layers", weights=None)
    with pytest.raises(TypeError, match="Strategy instance"):
        mt.register_strategy("max")


def test_empty_bundle_under_strategies():
    assert mt.bundle([]).per_param().sum().names == ()
    with pytest.raises(ValueError, match=r"has no tensors, so there is nothing to weigh"):
        mt.bundle([]).weighted().sum()


def test_case_helper_shapes():
    case = Case([torch.ones(2)], [torch.ones(2)])
    assert case.bundle().per_param().sum().tolist() == [2.0]


def test_operands_of_different_strategies():
    torch.manual_seed(0)
    x, y = {"a": torch.randn(3), "b": torch.randn(5)}, {"a": torch.randn(3), "b": torch.randn(5)}
    a, c = mt.bundle(x), mt.bundle(y)
    expected = {n: torch.dist(x[n], y[n]) for n in x}
    for per in (torch.dist(a.per_param(), c), torch.dist(a, c.per_param())):  # whichever holds it
        assert per.names == ("a", "b")
        torch.testing.assert_close(per.to_dict(), expected)
    for result in (a - c.per_param(), a.per_param() - c, torch.sub(a, other=c.per_param())):
        assert result.strategy == "per_param"
    wa = a.weighted({"a": 1.0, "b": 0.0})
    torch.testing.assert_close(torch.dist(c, wa), expected["a"])
    assert (c - wa).strategy == "weighted" and dict((c - wa).options) == dict(wa.options)
    assert (a.weighted() - c.weighted()).strategy == "weighted"  # the same options agree
    wc = c.weighted({"a": 0.0, "b": 1.0})
    for mixed in (lambda: torch.dist(wa, wc), lambda: wa - wc, lambda: a.per_param() - wc):
        with pytest.raises(ValueError, match=r"different strategies, .*\.with_strategy\(\.\.\.\)"):
            mixed()
    target = mt.bundle({n: t.clone() for n, t in x.items()})
    assert target.add_(c.per_param()) is target and target.strategy == "concat"  # in place: its own


def test_register_strategy_refuses_taken_and_odd_names():
    class Hijack(mt.Strategy):
        name = "concat"

        def reduce(self, call):
            return torch.tensor(-1.0)

    with pytest.raises(ValueError, match="'concat' is a built-in strategy"):
        mt.register_strategy(Hijack())
    with pytest.raises(ValueError, match="'concat' is a built-in strategy"):
        mt.register_strategy(Hijack(), replace=True)
    assert float(mt.bundle([torch.ones(5000)]).sum()) == 5000.0

    class Numbered(mt.Strategy):
        name = 5

    with pytest.raises(TypeError, match="`name` is a non-empty str"):
        mt.register_strategy(Numbered())

    class First(mt.Strategy):
        name = "taken_by_first"

        def reduce(self, call):
            return "first"

    class Second(mt.Strategy):
        name = "taken_by_first"

        def reduce(self, call):
            return "second"

    try:
        mt.register_strategy(First())
        mt.register_strategy(First())  # the same class again (a reloaded module): fine
        with pytest.raises(ValueError, match="already registered .*First.*replace=True"):
            mt.register_strategy(Second())
        assert mt.bundle([torch.ones(2)], strategy="taken_by_first").sum() == "first"
        mt.register_strategy(Second(), replace=True)
        assert mt.bundle([torch.ones(2)], strategy="taken_by_first").sum() == "second"
    finally:
        STRATEGIES.pop("taken_by_first", None)


def test_weights_are_refused_clearly():
    b = mt.bundle({"a": torch.full((4,), 2.0), "b": torch.full((2,), -1.0)})
    with pytest.raises(TypeError, match="weight 0 is '1'; weights are numbers"):
        b.weighted(["1", "2"]).sum()
    with pytest.raises(TypeError, match="weight 0 is None; weights are numbers"):
        b.weighted([None, 1.0]).sum()
    with pytest.raises(TypeError, match="the weight the callable gave tensor 'a' is None"):
        b.weighted(lambda n, t: None).sum()
    with pytest.raises(TypeError, match=r"keys are tensor names or glob patterns \(str\); got 1"):
        b.weighted({1: 2.0, "*": 1.0})
    ints = mt.bundle({"w": torch.ones(2), "count": torch.tensor(3)})
    with pytest.raises(RuntimeError, match=r"torch.Tensor.mean under the per_param strategy, on tensor 'count' \(torch.int64\)"):
        ints.per_param().mean()


def test_per_tensor_errors_of_integers_say_what_would_work():
    """torch's "Expected a floating point or complex tensor" named no way out; a cast is one."""
    ints = mt.bundle({"w": torch.ones(2, 3, dtype=torch.int64), "count": torch.tensor(3)})
    for strategy in ("per_param", "weighted"):
        b = ints.with_strategy(strategy)
        with pytest.raises(RuntimeError) as caught:
            torch.linalg.vector_norm(ints.tensors[0])
        with pytest.raises(RuntimeError) as got:
            b.norm()
        assert str(got.value) == (
            f"torch.Tensor.norm under the {strategy} strategy, on tensor 'w' (torch.int64) of {b.describe()}: "
            f"{caught.value} (a floating point tensor would do: cast first, e.g. `b.float()`)"
        )
        torch.testing.assert_close(b.float().norm(), ints.float().with_strategy(strategy).norm())  # as it says
    # no hint where the dtype is not what torch refuses
    with pytest.raises(IndexError, match=r"Dimension out of range \(expected to be in range of \[-2, 1\], but got 5\)$"):
        ints.per_param().sum(dim=5)


def test_weights_match_names_before_patterns_and_are_the_bundles_own():
    b = mt.bundle({"w[0]": torch.full((2,), 3.0), "x": torch.ones(1), "y": torch.zeros(1)})
    # "w[0]" is a name: as a glob it would only match "w0"; the name wins over "*" too
    torch.testing.assert_close(b.weighted({"*": 1.0, "w[0]": 2.0}, normalize=False).sum(), torch.tensor(13.0))
    weights, listed = {"w[0]": 1.0, "*": 1.0}, [1.0, 1.0, 1.0]
    by_name, by_position = b.weighted(weights, normalize=False), b.weighted(listed, normalize=False)
    weights["w[0]"], listed[0] = 100.0, 100.0  # the caller reuses its own
    torch.testing.assert_close(by_name.sum(), torch.tensor(7.0))
    torch.testing.assert_close(by_position.sum(), torch.tensor(7.0))
    assert by_name.options["weights"] == {"w[0]": 1.0, "*": 1.0}


def test_weighted_full_reductions_with_keepdim_take_the_concatenations_shape():
    conv = mt.bundle(torch.nn.Conv2d(3, 4, 3))  # a 4-D weight and a 1-D bias
    squares = mt.bundle([torch.ones(2, 2), torch.ones(3, 3)])  # the same ndim
    for b in (conv, squares):
        for call in (
            lambda x: torch.sum(x, dim=None, keepdim=True), lambda x: x.amax(keepdim=True),
            lambda x: x.norm(keepdim=True), lambda x: torch.aminmax(x, keepdim=True)[1],
        ):
            result = call(b.weighted())
            assert result.shape == call(b).shape == (1,)
            torch.testing.assert_close(result.reshape(()), call(b.weighted()).reshape(()))
    # numel weights 4 and 9 of the sums 4 and 9
    torch.testing.assert_close(torch.sum(squares.weighted(), dim=None, keepdim=True), torch.tensor([(4 * 4 + 9 * 9) / 13]))


def test_empty_bundles_raise_torchs_exception_type():
    for empty in (mt.bundle([]), mt.bundle([torch.empty(0)])):
        for call in (lambda x: x.max(0), lambda x: x.argmax(), lambda x: x.argmin(0), lambda x: x.min(-1)):
            with pytest.raises(IndexError):
                call(torch.empty(0))
            with pytest.raises(IndexError, match="has no elements"):
                call(empty)
        with pytest.raises(RuntimeError, match="has no elements"):
            empty.amax()


def test_per_param_of_no_tensors_has_torchs_structure_and_dtypes():
    full, empty = mt.bundle([torch.ones(3)]).per_param(), mt.bundle([]).per_param()
    for call in (
        lambda x: x.argmax(), lambda x: torch.max(x, 0), lambda x: torch.aminmax(x),
        lambda x: torch.topk(x, 1), lambda x: torch.var_mean(x), lambda x: x.sum(),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # var_mean of no elements
            expected, got = call(full), call(empty)
        assert type(got) is type(expected)
        if isinstance(expected, tuple):
            assert [g.dtype for g in got] == [e.dtype for e in expected] and all(g.names == () for g in got)
        else:
            assert got.dtype == expected.dtype and got.names == ()


def test_weighted_results_are_at_least_float32_whatever_the_default_dtype():
    for dtype, expected in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)):
        b = mt.bundle([torch.ones(3, dtype=dtype), torch.ones(2, dtype=dtype)])
        previous = torch.get_default_dtype()
        try:
            for default in (torch.float32, torch.float64):
                torch.set_default_dtype(default)
                assert b.weighted().mean().dtype == expected
        finally:
            torch.set_default_dtype(previous)
    ints = mt.bundle({"i": torch.tensor([1, 2, 3]), "j": torch.tensor([10, 20])})
    assert ints.weighted().sum().dtype == torch.float32


def test_weights_by_name_follow_the_chosen_operand_by_position():
    # The other operand may name its tensors otherwise: its tensors get the chosen one's
    # weights by position, whichever side it is on (its '*' weight applied to all, or an error).
    x = mt.bundle({"w": torch.ones(3), "b": torch.zeros(2)})
    y = mt.bundle({"ddp.w": torch.full((3,), 2.0), "ddp.b": torch.full((2,), 3.0)}).weighted({"ddp.w": 3.0, "ddp.b": 1.0})
    want = (3 * 1.0 + 1 * 3.0) / 4
    assert float((y - x).abs().mean()) == pytest.approx(want)
    assert float((x - y).abs().mean()) == pytest.approx(want)
    assert float(torch.dist(x, y)) == pytest.approx(float(torch.dist(y, x)))


def test_weighted_keepdim_with_a_dim_keeps_the_per_tensor_shape():
    b = mt.bundle([torch.ones(3, 1), torch.ones(5, 1)]).weighted()
    assert b.sum(dim=0, keepdim=True).shape == (1, 1)  # a full reduction's (1,) only without dim
    assert b.sum(keepdim=True, dim=None).shape == (1,)


def test_weighted_keepdim_with_a_positional_order_or_quantile_is_a_full_reduction():
    # The order of a norm and the q of a quantile, given by position, were taken for a dim:
    # the per-tensor results kept their ndim ((1, 1) and (1,)) and could not be weighed.
    tensors = [torch.randn(3, 4), torch.randn(5)]
    weights = [2.0, 1.0]
    b = mt.bundle(tensors)
    for call in (
        lambda x: torch.linalg.vector_norm(x, 3, None, True), lambda x: torch.linalg.norm(x, 1, keepdim=True),
        lambda x: torch.quantile(x, 1, keepdim=True), lambda x: torch.nanquantile(x, 0, keepdim=True),
        lambda x: x.quantile(1, keepdim=True),
    ):
        expected = sum(w * call(t).reshape(1) for w, t in zip(weights, tensors)) / sum(weights)
        assert call(b).shape == (1,)
        torch.testing.assert_close(call(b.weighted(weights)), expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: torch.quantile(x, torch.tensor([0.2, 0.5, 0.9]), keepdim=True),
        lambda x: torch.nanquantile(x, torch.tensor([0.25, 0.75]), keepdim=True, interpolation="lower"),
        lambda x: torch.quantile(x, 0.3, keepdim=True),
        lambda x: torch.amax(x, keepdim=True),
        lambda x: torch.var_mean(x, keepdim=True),
        lambda x: torch.quantile(x, torch.tensor([0.2, 0.5])),
    ],
)
def test_weighted_full_reductions_with_keepdim_over_tensors_of_any_ndim(call):
    # Each tensor's result keeps its own ndim of ones after quantile's q dim: a (3, 4) weight's
    # two quantiles are (2, 1, 1), a bias's (2, 1), a 0-d scale's (2,). Weighted, they are the
    # concatenation's (2, 1); they raised (one shape needed).
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen), "s": torch.tensor(0.5)}
    weights = [1.0, 2.0, 0.5]

    def parts(result):
        return result if isinstance(result, tuple) else (result,)

    got = parts(call(mt.bundle(tensors).weighted(weights)))
    concatenation = parts(call(torch.cat([t.reshape(-1) for t in tensors.values()])))
    per_tensor = [parts(call(t)) for t in tensors.values()]
    for k, (g, c) in enumerate(zip(got, concatenation)):
        assert g.shape == c.shape
        want = sum(w * r[k].reshape(c.shape) for w, r in zip(weights, per_tensor)) / sum(weights)
        torch.testing.assert_close(g, want, equal_nan=True)  # (the 0-d tensor's var is NaN)
    # per_param: each tensor's own result, as torch gives on it
    per_param = parts(call(mt.bundle(tensors).per_param()))
    for name, r in zip(tensors, per_tensor):
        for g, w in zip(per_param, r):
            torch.testing.assert_close(g.to_dict()[name], w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: torch.kthvalue(x, 2, keepdim=True), lambda x: torch.kthvalue(x, 2),
        lambda x: torch.topk(x, 2), lambda x: torch.median(x, 0, keepdim=True),
        lambda x: torch.nanmedian(x, -1), lambda x: torch.quantile(x, torch.tensor([0.2, 0.5]), dim=0, keepdim=True),
    ],
)
def test_weighted_order_statistics_along_each_tensors_dim_need_one_shape(call):
    # A dim (kthvalue's and topk's default -1 too) applies to each tensor's own shape: a (3, 4)
    # weight's and a bias's results differ in shape, and nothing weighs them together.
    b = mt.bundle({"w": torch.randn(3, 4), "b": torch.randn(4)})
    with pytest.raises(ValueError, match=r"one shape.*\[w \(3, 4\), b \(4,\)\].*own shape.*per_param.*with_strategy"):
        call(b.weighted())
    per_param = call(b.per_param())
    values = per_param[0] if isinstance(per_param, tuple) else per_param
    for name, t in b.to_dict().items():
        want = call(t)
        assert torch.equal(values.to_dict()[name], want[0] if isinstance(want, tuple) else want)
    # tensors of one shape weigh together
    same = mt.bundle({"w": torch.randn(3, 4), "v": torch.randn(3, 4)})
    got = call(same.weighted([1.0, 3.0]))
    got = got[0] if isinstance(got, tuple) else got
    parts = [call(t) for t in same.to_dict().values()]
    parts = [p[0] if isinstance(p, tuple) else p for p in parts]
    torch.testing.assert_close(got, (parts[0] + 3 * parts[1]) / 4)

"""Bundles inside torch.compile: `mt.bundle(model)` called in the compiled function.

Every loss compiles with `fullgraph=True` (so with no graph break at all) and gives eager's
values and gradients. `aot_eager` traces forward and backward as inductor would, without the
C++ build; one loss goes through inductor itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modtensor as mt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch._dynamo")

Loss = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


# The losses, and one per common family: reductions, elementwise chains, pairwise
# ops, strategies (a per_param result reduced again), install()'s module methods.
LOSSES: dict[str, Loss] = {
    "l2_penalty": lambda m, r, x, y: _mse(m, x, y) + 1e-2 * (mt.bundle(m) ** 2).sum(),
    "std": lambda m, r, x, y: mt.bundle(m).std(),
    "var_correction0": lambda m, r, x, y: torch.var(mt.bundle(m), correction=0),
    "mean_abs": lambda m, r, x, y: mt.bundle(m).abs().mean(),
    "distance": lambda m, r, x, y: (mt.bundle(m) - mt.bundle(r)).norm(),
    "torch_dist": lambda m, r, x, y: torch.dist(mt.bundle(m), mt.bundle(r)),
    "mse_to_reference": lambda m, r, x, y: F.mse_loss(mt.bundle(m), mt.bundle(r)),
    "cosine": lambda m, r, x, y: F.cosine_similarity(mt.bundle(m), mt.bundle(r), dim=0),
    "weighted": lambda m, r, x, y: mt.bundle(m).weighted({"0.*": 1.0, "*": 0.1}).norm(),
    "per_param_max_norm": lambda m, r, x, y: mt.bundle(m).per_param().norm().amax(),
    "amax_amin": lambda m, r, x, y: mt.bundle(m).amax() - mt.bundle(m).amin(),
    "l1_inf_norms": lambda m, r, x, y: mt.bundle(m).norm(p=1) + mt.bundle(m).norm(p=math.inf),
    "logsumexp": lambda m, r, x, y: torch.logsumexp(mt.bundle(m, include="*.weight"), dim=0),
    "chain": lambda m, r, x, y: torch.sigmoid(mt.bundle(m) * 3 - 1).clamp(0.2, 0.8).sum(),
}


def _models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ref = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, ref


def _value_and_grads(fn: Callable[..., torch.Tensor], model: nn.Module, ref: nn.Module):
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(16, 2)
    model.zero_grad()
    value = fn(model, ref, x, y)
    value.backward()
    return value.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _check_compiled(loss: Loss, backend: str) -> None:
    model, ref = _models()
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    want, want_grads = _value_and_grads(loss, model, ref)
    got, got_grads = _value_and_grads(compiled, model, ref)
    torch.testing.assert_close(got, want)
    assert [g is None for g in got_grads] == [w is None for w in want_grads]
    for g, w in zip(got_grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiled_loss_matches_eager(name: str) -> None:
    _check_compiled(LOSSES[name], "aot_eager")


def test_inductor_l2_penalty() -> None:
    _check_compiled(LOSSES["l2_penalty"], "inductor")


def test_no_graph_breaks() -> None:
    model, ref = _models()
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = mt.bundle(model)
        return (
            _mse(model, x, y)
            + 1e-2 * (b ** 2).sum()
            + b.std()
            + (b - mt.bundle(ref)).norm()
            + b.per_param().norm().amax()
        )

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(x, y)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_installed_module_methods_compile() -> None:
    model, ref = _models()
    with mt.installed(tensor_methods=True):
        loss = lambda m, r, x, y: m[0].mean() + m[2].as_tensor().std()  # noqa: E731
        _check_compiled(loss, "aot_eager")


def test_amax_ties_share_the_gradient_when_compiled() -> None:
    # Two tensors holding the maximum: torch spreads the gradient over all tied elements.
    a = torch.tensor([1.0, 3.0, 3.0], requires_grad=True)
    b = torch.tensor([[3.0, 0.0]], requires_grad=True)

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mt.bundle([a, b]).amax() * 2

    torch._dynamo.reset()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(a, b).backward()
    reference = torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)]).requires_grad_()
    (reference.amax() * 2).backward()
    torch.testing.assert_close(torch.cat([a.grad.reshape(-1), b.grad.reshape(-1)]), reference.grad)


# Grouped by the gradient torch gives a NaN result (one compile each): the NaN elements
# share it for max() / min(), the inf-norms give zeros, amax NaN everywhere.
EXTREMA: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max, min": lambda x: x.max() + torch.min(x),
    "inf-norms": lambda x: (
        x.norm(math.inf) + torch.linalg.vector_norm(x, -math.inf) + torch.dist(x, torch.ones_like(x), math.inf)
    ),
    "amax, amin, aminmax": lambda x: x.amax() + torch.amin(x) + sum(torch.aminmax(x)),
}


def _extrema_inputs(case: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, generator=g, dtype=dtype) for n in (5, 3, 4))
    top = float(torch.cat([a, b, c]).abs().max()) + 1
    if case == "NaN in one tensor":
        a[1] = math.nan
    elif case == "NaN in several tensors":
        a[1] = c[0] = c[3] = math.nan
    elif case == "single tensor with NaN":
        a[1] = a[3] = math.nan
        return [a]
    elif case == "ties across tensors":  # of the max, the min and the largest magnitude
        a[0] = c[2] = c[3] = top
        b[1] = c[0] = -top
    elif case == "inf":
        a[0] = c[1] = math.inf
        b[2] = -math.inf
    return [a, b, c]


@pytest.mark.parametrize(
    "case, dtype",
    [
        ("NaN in one tensor", torch.float32), ("NaN in several tensors", torch.float64),
        ("NaN in several tensors", torch.float32), ("single tensor with NaN", torch.float64),
        ("ties across tensors", torch.float32), ("inf", torch.float64),
    ],
    ids=str,
)
@pytest.mark.parametrize("ops", list(EXTREMA))
def test_compiled_extrema_have_the_concatenations_gradient(ops: str, case: str, dtype: torch.dtype) -> None:
    # The traced combine gave NaN gradients at a NaN result: each tensor's amax backward is
    # NaN at a NaN even for a zero incoming gradient.
    ours = [t.requires_grad_() for t in _extrema_inputs(case, dtype)]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    torch._dynamo.reset()
    got = torch.compile(lambda *ts: EXTREMA[ops](mt.bundle(list(ts))), fullgraph=True, backend="aot_eager")(*ours)
    want = EXTREMA[ops](torch.cat(theirs))
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, equal_nan=True)
    for g, w in zip(ours, theirs):
        torch.testing.assert_close(g.grad, w.grad, equal_nan=True)


def test_fallback_is_an_error_inside_fullgraph() -> None:
    model, _ = _models()

    def loss() -> torch.Tensor:
        return torch.cumsum(mt.bundle(model), 0).sum()  # not in the table: would copy

    torch._dynamo.reset()
    with pytest.raises(Exception, match="materializing fallback cannot warn"):
        torch.compile(loss, fullgraph=True, backend="eager")()


def test_graph_break_runs_the_fallback_eagerly() -> None:
    # Without fullgraph, dynamo breaks the graph there and the call runs eagerly: the usual
    # fallback, with its warning.
    model, _ = _models()

    def loss() -> torch.Tensor:
        return torch.cumsum(mt.bundle(model), 0).sum()

    torch._dynamo.reset()
    want = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cumsum(0).sum()
    with pytest.warns(mt.MaterializationWarning):
        got = torch.compile(loss, backend="eager")()
    torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize(
    "name, fn",
    [
        ("topk", lambda b: torch.topk(b, 3).values.sum()),
        ("quantile", lambda b: torch.quantile(b, 0.3)),
        ("mask", lambda b: b[b > 0].sum()),
    ],
)
def test_data_dependent_ops_break_the_graph_and_stay_exact(name: str, fn: Callable) -> None:
    # Order statistics count elements and masks select them: shapes that depend on the data,
    # which dynamo cannot trace. It breaks the graph there; the result is still exact.
    model, _ = _models()
    want = fn(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch._dynamo.reset()
    got = torch.compile(lambda: fn(mt.bundle(model)), backend="eager")()
    torch.testing.assert_close(got.detach(), want)


def test_int_index_compiles() -> None:
    model, _ = _models()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch._dynamo.reset()
    got = torch.compile(lambda: mt.bundle(model)[37] - mt.bundle(model)[-1], fullgraph=True, backend="eager")()
    torch.testing.assert_close(got.detach(), flat[37] - flat[-1])


@pytest.mark.parametrize(
    "index", [37, slice(3, 9), slice(30, 40, 3), slice(60, 70)], ids=["int", "in one", "across", "empty"]
)
def test_indexing_compiles_with_eagers_gradients(index: int | slice) -> None:
    # README: int and slice indexing work under fullgraph; the tensors the index misses get
    # zero gradients, as in eager and from the concatenation (not None).
    loss: Loss = lambda m, r, x, y: (mt.bundle(m)[index] ** 2).sum() + mt.bundle(m)[index].sum()
    _check_compiled(loss, "eager")


def test_a_returned_bundle_is_the_stand_in() -> None:
    model, _ = _models()
    torch._dynamo.reset()
    doubled = torch.compile(lambda: mt.bundle(model) * 2, fullgraph=True, backend="eager")()
    assert mt.is_bundle(doubled) and not isinstance(doubled, torch.Tensor)
    again = mt.bundle(doubled)  # outside the graph: a ParameterBundle of the same tensors
    assert isinstance(again, mt.ParameterBundle) and again.names == mt.bundle(model).names
    torch.testing.assert_close(again.sum(), mt.bundle(model).sum() * 2)


def test_bundles_are_not_tensors_while_tracing() -> None:
    # What user code can rely on inside a compiled function: mt.is_bundle, not isinstance.
    model, _ = _models()

    def probe() -> torch.Tensor:
        b = mt.bundle(model)
        assert mt.is_bundle(b) and not isinstance(b, torch.Tensor)
        assert b.shape == (sum(p.numel() for p in model.parameters()),)
        return b.sum()

    torch._dynamo.reset()
    torch.compile(probe, fullgraph=True, backend="eager")()


def test_in_place_recipes_compile() -> None:
    # An EMA step and gradient clipping, compiled whole: the writes reach the parameters.
    model, ema = _models()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    eager_model, eager_ema = _models()
    eager_model.load_state_dict(model.state_dict())
    for p, q in zip(eager_model.parameters(), model.parameters()):
        p.grad = q.grad.clone()

    def step(model: nn.Module, ema: nn.Module) -> torch.Tensor:
        norm = mt.recipes.clip_grad_norm_(model, 0.5)
        mt.recipes.ema_(ema, model, 0.9)
        return norm

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(model, ema)
    want = step(eager_model, eager_ema)
    torch.testing.assert_close(got, want)
    for a, b in zip((*model.parameters(), *ema.parameters()), (*eager_model.parameters(), *eager_ema.parameters())):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_long_tensors_norm_compiles() -> None:
    # Tensors past the kernels' size threshold take the row-wise norm, traced by autograd.
    torch.manual_seed(0)
    w = torch.randn(1_100_001, requires_grad=True)
    v = torch.randn(300, requires_grad=True)

    def loss(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return mt.bundle([w, v]).norm() + (mt.bundle([w, v]) ** 2).sum()

    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(w, v)
    got_grads = torch.autograd.grad(got, (w, v))
    flat = torch.cat([w, v])
    want = flat.norm() + (flat**2).sum()
    want_grads = torch.autograd.grad(want, (w, v))
    torch.testing.assert_close(got, want)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h)


def test_copy_and_masked_assignment_between_bundles_compile() -> None:
    # copy_ from a bundle and b[mask] = v with a bundle mask: stand-ins as the operands.
    model, target = _models()

    def step(model: nn.Module, target: nn.Module) -> None:
        with torch.no_grad():
            b = mt.bundle(target)
            b.copy_(mt.bundle(model))
            b[b < 0] = 0.0

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="eager")(model, target)
    for p, q in zip(model.parameters(), target.parameters()):
        torch.testing.assert_close(q, p.detach().clamp_min(0))


@pytest.mark.parametrize("size", [3, 300], ids=["tiny", "large"])
@pytest.mark.parametrize("passed", [False, True], ids=["captured", "argument"])
def test_a_bundle_made_outside_runs_each_op_eagerly_and_exactly(size: int, passed: bool) -> None:
    # Several reductions in a row on one bundle: dynamo, tracing into dispatch, used to reuse
    # the first op's compiled resumption for the next ones (std gave the mean).
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Linear(size, 10)
    b = mt.bundle(model)

    def stats(x: mt.ParameterBundle) -> tuple[torch.Tensor, ...]:
        return x.mean(), x.std(), x.amax(), x.norm(), torch.sum(x), (x ** 2).sum(), torch.dist(x, x * 2)

    compiled = torch.compile(stats if passed else (lambda _: stats(b)), backend="aot_eager")
    got, want = compiled(b), stats(b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    got[5].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want[5].backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        torch.compile(lambda: b.sum(), fullgraph=True, backend="eager")()


def test_operands_of_different_strategies_compile_in_one_graph():
    # The in-place test of the strategy check called str.endswith, which dynamo cannot trace.
    m, r = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def f():
        return torch.dist(mt.bundle(m).per_param(), mt.bundle(r)).materialize()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(), f())

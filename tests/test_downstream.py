"""A small downstream library built only on modtensor's public API, and its results."""

import pytest
import torch
from torch import nn

import modtensor as mt
from modtensor import _dispatch

# --- the "downstream library" -------------------------------------------------------------


class LayerwiseL2:
    """An L2 penalty with a weight per layer, given as glob patterns: sum_i w_i ||p_i||^2."""

    def __init__(self, model: nn.Module, weights: dict[str, float]):
        self.model, self.weights = model, weights

    def __call__(self) -> torch.Tensor:
        b = mt.bundle(self.model, strategy="weighted", weights=self.weights, normalize=False)
        return (b**2).sum()


def l1_norm_sum(x, dim=None, keepdim=False):
    """A function of the library's own that bundles can reduce: the sum of |x|."""
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(l1_norm_sum, (x,), x, dim=dim, keepdim=keepdim)
    return x.abs().sum()


mt.register_reduction(
    l1_norm_sum,
    partial=lambda t, offset, args: t.abs().sum(dtype=args.dtype),
    combine=lambda states, args: torch.stack(states).sum(),
)


class LargestLayer(mt.Strategy):
    """A strategy: the largest per-layer result."""

    name = "largest_layer"

    def reduce(self, call):
        results = [call.per_tensor(i) for i, t in enumerate(call.bundle.tensors) if t.numel()]
        return torch.stack(results).amax()


mt.register_strategy(LargestLayer())


class FrozenAware(mt.ParameterBundle):
    """A bundle subclass whose torch.numel counts only trainable elements."""


@FrozenAware.implements(torch.numel)
def _numel(func, types, args, kwargs):
    return sum(t.numel() for t in args[0].tensors if t.requires_grad)


# --- its tests ------------------------------------------------------------------------------


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(16, 2))


def test_layerwise_penalty_and_its_gradients(model):
    weights = {"0.*": 1.0, "2.weight": 0.5, "*": 0.1}
    penalty = LayerwiseL2(model, weights)()

    def weight_of(name):
        return 1.0 if name.startswith("0.") else 0.5 if name == "2.weight" else 0.1

    explicit = sum(weight_of(n) * p.square().sum() for n, p in model.named_parameters())
    torch.testing.assert_close(penalty, explicit)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, 2 * weight_of(n) * p.detach())


def test_registered_reduction_under_every_strategy(model):
    params = list(model.parameters())
    b = mt.bundle(model)
    torch.testing.assert_close(l1_norm_sum(b), torch.cat([p.reshape(-1) for p in params]).abs().sum())
    per = l1_norm_sum(b.per_param())
    assert per.names == b.names
    torch.testing.assert_close(per.to_dict()["4.weight"], model[4].weight.abs().sum())
    torch.testing.assert_close(l1_norm_sum(b.weighted({"*": 1.0})), torch.stack([p.abs().sum() for p in params]).mean())
    torch.testing.assert_close(l1_norm_sum(b.with_strategy("largest_layer")), max(p.abs().sum() for p in params))


def test_custom_strategy_on_builtin_reductions(model):
    b = mt.bundle(model, strategy="largest_layer")
    torch.testing.assert_close(b.norm(), max(p.norm() for p in model.parameters()))
    torch.testing.assert_close(torch.dist(b, b * 0), max(p.norm() for p in model.parameters()))


def test_subclass_table_is_private(model):
    model[0].requires_grad_(False)
    b = mt.bundle(model)
    frozen_aware = FrozenAware(b.tensors, b.names)
    assert torch.numel(frozen_aware) == b.numel() - sum(p.numel() for p in model[0].parameters())
    assert torch.numel(b) == b.numel()  # ParameterBundle's own table is untouched


class Tagged(mt.ParameterBundle):
    """A subclass whose constructor takes other arguments than ParameterBundle's."""

    def __new__(cls, model: nn.Module, tag: str):
        self = super().__new__(cls, list(model.parameters()), [n for n, _ in model.named_parameters()])
        self.tag = tag
        return self

    def __init__(self, model: nn.Module, tag: str):
        pass


@pytest.mark.parametrize("width", [2, 1400], ids=["tiny", "large"])
def test_derived_bundles_keep_the_subclass(width, real_sizes):
    # As torch's default __torch_function__ keeps a tensor subclass, a bundle derived from a
    # subclass's instance is of that subclass, and its table still answers.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    model(torch.randn(4, width)).sum().backward()
    b = FrozenAware(list(model.parameters()), [n for n, _ in model.named_parameters()])
    plain = mt.bundle(model)
    trainable = sum(p.numel() for p in model[1].parameters())
    derived = {
        "b * 2": lambda: b * 2, "2 - b": lambda: 2 - b, "b.abs()": lambda: b.abs(),
        "(b * 2).abs()": lambda: (b * 2).abs(), "b / b": lambda: b / b, "b ** 2": lambda: b**2,
        "torch.where": lambda: torch.where(b > 0, b, 0.0), "b + plain": lambda: b + plain,
        "plain + b": lambda: plain + b, "b.grad": lambda: b.grad, "b.data": lambda: b.data,
        "b.detach()": lambda: b.detach(), "b.clone()": lambda: b.clone(),
        "b.derive": lambda: b.derive(b.tensors), "b.per_param()": lambda: b.per_param(),
        "b.per_param().sum()": lambda: b.per_param().sum(), "b.split": lambda: b.split(b.materialize()),
    }
    tiny = b.numel() <= _dispatch.TINY_NUMEL
    assert tiny == (width == 2)
    for _ in range(2):  # a tiny bundle's second call takes the fast lane
        for what, make in derived.items():
            result = make()
            assert type(result) is FrozenAware, what
            if what not in ("b.grad", "b.data", "b.detach()", "b.per_param().sum()", "b.split"):
                # FrozenAware's own numel, which counts the tensors that require grad. A tiny
                # bundle's elementwise result is one flat tensor (README), whose views require
                # grad together where any tensor of it does.
                flat = tiny and what not in ("b.clone()", "b.derive", "b.per_param()")
                assert torch.numel(result) == (b.numel() if flat else trainable), what
    assert repr(b * 2).startswith("FrozenAware(4 tensors")
    assert type(plain * 2) is mt.ParameterBundle and type(plain.grad) is mt.ParameterBundle
    tagged = Tagged(model, "ema")
    for result in (tagged * 2, tagged.grad, tagged.derive(tagged.tensors), tagged.per_param().sum()):
        assert type(result) is Tagged  # made without calling Tagged's own constructor
    torch.testing.assert_close((tagged - tagged * 2).norm(), torch.cat([p.reshape(-1) for p in model.parameters()]).norm())


def test_a_registered_reduction_serves_computed_chains():
    # `(b ** 2).sum()` and `(a - b).norm()` are computed by kernels of their own; they must
    # not stand in for a reduction a library registered in place of the built-in one.
    class Marked(mt.ParameterBundle):
        pass

    def marked(states, args):
        return torch.stack(states).sum() + 1000.0

    mt.register_reduction(torch.Tensor.sum, partial=lambda t, o, a: t.sum(), combine=marked, bundle_type=Marked)
    mt.register_reduction(
        torch.Tensor.norm, partial=lambda t, o, a: t.square().sum(), combine=marked, bundle_type=Marked
    )
    torch.manual_seed(0)
    x, y = [torch.randn(5000), torch.randn(3000)], [torch.randn(5000), torch.randn(3000)]
    a, b = Marked(x, ["w", "v"]), Marked(y, ["w", "v"])  # not tiny: no call on the concatenation
    flat_x, flat_y = torch.cat(x), torch.cat(y)
    torch.testing.assert_close((a**2).sum(), flat_x.square().sum() + 1000.0)
    torch.testing.assert_close(torch.square(a).sum(), flat_x.square().sum() + 1000.0)
    torch.testing.assert_close((a - b).norm(), (flat_x - flat_y).square().sum() + 1000.0)
    plain = mt.bundle(x)  # the built-in reductions, kernels included, elsewhere
    torch.testing.assert_close((plain**2).sum(), flat_x.square().sum())


def test_registrations_reach_subclasses_defined_before_them():
    class Parent(mt.ParameterBundle):
        pass

    class Child(Parent):  # defined before the registrations below, as by another library
        pass

    class GrandChild(Child):
        pass

    @Child.implements(torch.cummax)
    def _child_cummax(func, types, args, kwargs):
        return "child's own"

    @Parent.implements([torch.cumsum, torch.cummax])
    def _parent(func, types, args, kwargs):
        return "parent's"

    def absmax(x, dim=None, keepdim=False):
        if torch.overrides.has_torch_function_unary(x):
            return torch.overrides.handle_torch_function(absmax, (x,), x, dim=dim, keepdim=keepdim)
        return x.abs().amax()

    mt.register_reduction(
        absmax, partial=lambda t, o, a: t.abs().amax(), combine=lambda s, a: torch.stack(s).amax(),
        bundle_type=Parent,
    )
    tensors, names = [torch.ones(2), -3 * torch.ones(3)], ["a", "b"]
    with mt.fallback("error"):
        for cls in (Parent, Child, GrandChild):
            b = cls(tensors, names)
            assert torch.cumsum(b, 0) == "parent's"
            assert float(absmax(b)) == 3.0
        assert torch.cummax(Parent(tensors, names), 0) == "parent's"
        assert torch.cummax(Child(tensors, names), 0) == "child's own"  # its own entry stays
        assert torch.cummax(GrandChild(tensors, names), 0) == "child's own"  # inherited from Child
        with pytest.raises(mt.UnsupportedOperationError, match="absmax is not in the dispatch table"):
            absmax(mt.bundle(tensors))  # the parent of Parent is untouched
    assert (torch.cumsum, "*") not in mt.ParameterBundle.HANDLERS


def test_a_subclass_entry_wins_over_its_parents_strategy_specific_ones():
    # Entries resolve as attributes do: the nearest class that registered the function
    # decides. A parent's "concat" entry, made before or after, used to win over a child's
    # own "*" one, because the strategy-specific lookup came first in the child's table.
    class Parent(mt.ParameterBundle):
        pass

    @Parent.implements(torch.cumprod, strategy="concat")
    def _parent_before(func, types, args, kwargs):
        return "parent's concat (before)"

    class Child(Parent):
        pass

    class GrandChild(Child):
        pass

    class Mixed(Child, Parent):  # two bases that registered: the MRO's order decides
        pass

    class Sibling(mt.ParameterBundle):
        pass

    @Sibling.implements(torch.cummin)
    def _sibling(func, types, args, kwargs):
        return "sibling's"

    class Both(Child, Sibling):  # made after Sibling registered: its table starts as Child's copy
        pass

    @Child.implements([torch.cumsum, torch.cumprod])
    def _child(func, types, args, kwargs):
        return "child's"

    @Parent.implements(torch.cumsum, strategy="concat")
    def _parent_after(func, types, args, kwargs):
        return "parent's concat (after)"

    @Child.implements(torch.cumsum, strategy="per_param")
    def _child_per_param(func, types, args, kwargs):
        return "child's per_param"

    tensors, names = [torch.ones(2), -3 * torch.ones(3)], ["a", "b"]
    parent = Parent(tensors, names)
    assert torch.cumsum(parent, 0) == "parent's concat (after)"
    assert torch.cumprod(parent, 0) == "parent's concat (before)"
    assert torch.cummin(Both(tensors, names), 0) == "sibling's"
    for cls in (Child, GrandChild, Mixed, Both):
        b = cls(tensors, names)
        assert torch.cumsum(b, 0) == "child's"
        assert torch.cumprod(b, 0) == "child's"
        assert torch.cumsum(b.with_strategy("per_param"), 0) == "child's per_param"
    with mt.fallback("error"):
        with pytest.raises(mt.UnsupportedOperationError):  # no "*" on the parent: not served
            torch.cumsum(parent.with_strategy("per_param"), 0)


def test_registration_refuses_misuse():
    class Mine(mt.ParameterBundle):
        pass

    def handler(func, types, args, kwargs):
        return "mine"

    before = dict(Mine.HANDLERS)
    with pytest.raises(TypeError, match="expected a torch function or an iterable of them.*got 'cumsum'"):
        Mine.implements("cumsum")(handler)
    with pytest.raises(TypeError, match="the handler must be a callable"):
        Mine.implements(torch.cumprod)(42)
    with pytest.raises(TypeError, match=r"cannot be called as handler\(func, types, args, kwargs\)"):
        Mine.implements(torch.cummax)(lambda b: "x")
    with pytest.raises(ValueError, match="unknown strategy 'per-param'.*'per_param'"):
        Mine.implements(torch.Tensor.sum, strategy="per-param")(handler)
    with pytest.raises(ValueError, match="unknown strategy 'per-param'"):
        mt.implements(torch.Tensor.sum, strategy="per-param")
    with pytest.raises(TypeError, match="got 'nope'"):
        mt.register_reduction("nope", partial=lambda t, o, a: t, combine=lambda s, a: s[0])
    with pytest.raises(TypeError, match="partial must be a callable, got 1"):
        mt.register_reduction(torch.cumsum, partial=1, combine=lambda s, a: s[0], bundle_type=Mine)
    with pytest.raises(TypeError, match="combine must be a callable, got None"):
        mt.register_reduction(torch.cumsum, partial=lambda t, o, a: t, combine=None, bundle_type=Mine)
    with pytest.raises(TypeError, match="finalize must be a callable or None"):
        mt.register_reduction(
            torch.cumsum, partial=lambda t, o, a: t, combine=lambda s, a: s[0], finalize=3, bundle_type=Mine
        )
    with pytest.raises(TypeError, match="bundle_type must be ParameterBundle or a subclass"):
        mt.register_reduction(torch.cumsum, partial=lambda t, o, a: t, combine=lambda s, a: s[0], bundle_type=int)
    assert Mine.HANDLERS == before  # nothing half-registered
    Mine.implements(torch.logcumsumexp)(lambda *a: "first")
    Mine.implements(torch.logcumsumexp)(handler)  # registering again replaces (documented)
    assert torch.logcumsumexp(Mine([torch.ones(2)], ["w"]), 0) == "mine"


def test_a_declining_handler_leaves_metadata_to_the_bundle():
    # A handler returning NotImplemented for torch.numel gets what no handler would give: the
    # recorded metadata, not a copy of the tensors with a warning that it is not in the table.
    class Declines(mt.ParameterBundle):
        pass

    @Declines.implements([torch.numel, torch.Tensor.dim])
    def _decline(func, types, args, kwargs):
        return NotImplemented

    b = Declines([torch.ones(2, 3), torch.ones(4)], ["w", "b"])
    with mt.fallback("error"):
        assert torch.numel(b) == 10 and b.dim() == 1


@pytest.mark.parametrize("width", [3, 5000], ids=["tiny", "large"])
def test_a_handler_that_calls_the_inherited_one_sees_every_call(width, real_sizes):
    # A library's handler may do its own work and then call the entry it overrides. On tiny
    # bundles, the inherited handler used to record the call for the fast lane, which then
    # skipped the library's handler from the second call on.
    class Logged(mt.ParameterBundle):
        pass

    log = []
    inherited_sum = mt.ParameterBundle.HANDLERS[(torch.Tensor.sum, "*")]
    inherited_mul = mt.ParameterBundle.HANDLERS[(torch.Tensor.mul, "*")]

    @Logged.implements(torch.Tensor.sum)
    def _sum(func, types, args, kwargs):
        log.append("sum")
        return inherited_sum(func, types, args, kwargs)

    @Logged.implements(torch.Tensor.mul)
    def _mul(func, types, args, kwargs):
        log.append("mul")
        return inherited_mul(func, types, args, kwargs)

    b = Logged([torch.ones(width), torch.ones(2)], ["a", "b"])
    for _ in range(3):
        assert float(b.sum()) == width + 2
        assert float((b * 2).sum()) == 2 * (width + 2)
    assert log == ["sum", "mul", "sum"] * 3


def test_register_reduction_checks_its_parts_when_registering():
    # A part of the wrong signature used to be taken, and failed at the first reduction with
    # a bare TypeError from inside it; partials and pack_dtype without commutative=True were
    # silently never called.
    class Mine(mt.ParameterBundle):
        pass

    def add(t, offset, args):
        return t.sum()

    def combine(states, args):
        return torch.stack(states).sum()

    before = dict(Mine.HANDLERS)
    refused = [
        (dict(partial=lambda t: t.sum()), TypeError, r"partial '<lambda>' cannot be called as partial\(segment, offset, args\)"),
        (dict(combine=lambda states: states[0]), TypeError, r"cannot be called as combine\(states, args\)"),
        (dict(finalize=lambda s, a, extra: s), TypeError, r"cannot be called as finalize\(state, args\)"),
        (dict(parse=lambda b, func: None), TypeError, r"cannot be called as parse\(bundle, func, args, kwargs\)"),
        (dict(needs_elements=lambda: True), TypeError, r"cannot be called as needs_elements\(args\)"),
        (dict(fused=lambda b: None), TypeError, r"cannot be called as fused\(bundle, args\)"),
        (dict(commutative=True, partials=lambda ts: []), TypeError, r"cannot be called as partials\(tensors, args\)"),
        (dict(commutative=True, pack_dtype=lambda d: d), TypeError, r"cannot be called as pack_dtype\(dtype, device\)"),
        (dict(partials=lambda ts, a: [t.sum() for t in ts]), ValueError, "partials is used only by a commutative reduction.*commutative=True"),
        (dict(pack_dtype=lambda d, device: torch.float64), ValueError, "pack_dtype is used only by a commutative reduction"),
        (dict(direct="yes"), TypeError, "direct must be True or False, got 'yes'"),
        (dict(commutative=1), TypeError, "commutative must be True or False, got 1"),
        (dict(commutative=True, partials_small=None), TypeError, "partials_small must be True or False, got None"),
    ]
    for given, error, message in refused:
        parts = {"partial": add, "combine": combine, "bundle_type": Mine, **given}
        with pytest.raises(error, match=message):
            mt.register_reduction(torch.cumsum, **parts)
    assert Mine.HANDLERS == before  # nothing half-registered
    # Defaults, keyword-only and variadic parameters bind as the calls do: accepted.
    mt.register_reduction(
        torch.cumsum, partial=lambda *a: a[0].sum(), combine=lambda states, args, extra=0: torch.stack(states).sum(),
        commutative=True, pack_dtype=lambda dtype, device, *rest: dtype, bundle_type=Mine,
    )
    assert float(torch.cumsum(Mine([torch.ones(2), torch.ones(3)], ["a", "b"]), 0)) == 5.0


def test_register_strategy_refuses_a_strategy_it_cannot_call():
    # Both used to be registered, and failed at the first reduction: with a bare
    # NotImplementedError, or a TypeError from inside the strategy.
    class NoReduce(mt.Strategy):
        name = "no_reduce"

    class NoCall(mt.Strategy):
        name = "no_call"

        def reduce(self):
            return 0

    with pytest.raises(TypeError, match=r"NoReduce \('no_reduce'\) does not define reduce\(self, call\)"):
        mt.register_strategy(NoReduce())
    with pytest.raises(TypeError, match=r"NoCall.reduce cannot be called as reduce\(call\)"):
        mt.register_strategy(NoCall())
    assert "no_reduce" not in mt.strategies() and "no_call" not in mt.strategies()

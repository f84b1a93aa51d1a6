"""A small downstream library built only on modtensor's public API, and its results."""

import pytest
import torch
from torch import nn

import modtensor as mt

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


@pytest.mark.parametrize("width", [2, 300], ids=["tiny", "large"])
def test_derived_bundles_keep_the_subclass(width):
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
    for _ in range(2):  # a tiny bundle's second call takes the fast lane
        for what, make in derived.items():
            result = make()
            assert type(result) is FrozenAware, what
            if what not in ("b.grad", "b.data", "b.detach()", "b.per_param().sum()", "b.split"):
                assert torch.numel(result) == trainable, what  # FrozenAware's own numel
    assert repr(b * 2).startswith("FrozenAware(4 tensors")
    assert type(plain * 2) is mt.ParameterBundle and type(plain.grad) is mt.ParameterBundle
    tagged = Tagged(model, "ema")
    for result in (tagged * 2, tagged.grad, tagged.derive(tagged.tensors), tagged.per_param().sum()):
        assert type(result) is Tagged  # made without calling Tagged's own constructor
    torch.testing.assert_close((tagged - tagged * 2).norm(), torch.cat([p.reshape(-1) for p in model.parameters()]).norm())

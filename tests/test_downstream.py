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

"""The question that started modtensor: tensor methods on an nn.Module."""

import torch
from torch import nn

import modtensor as mt


class SimpleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv1(x))


def _concat(module):
    return torch.cat([p.reshape(-1) for p in module.parameters()])


def test_module_mean_and_std_after_install():
    torch.manual_seed(0)
    model = SimpleConvNet()
    mt.install(tensor_methods=True)
    torch.testing.assert_close(model.conv1.mean(), _concat(model.conv1).mean())
    torch.testing.assert_close(model.conv1.std(), _concat(model.conv1).std())
    assert mt.bundle(model.conv1).numel() == 448


def test_torch_mean_of_bundle():
    torch.manual_seed(0)
    model = SimpleConvNet()
    torch.testing.assert_close(torch.mean(mt.bundle(model.conv1)), _concat(model.conv1).mean())


def test_custom_loss_gradients_equal_the_concatenation_version():
    torch.manual_seed(0)
    model = SimpleConvNet()
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 16, 8, 8)

    def grads(penalty):
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), target) + 1e-2 * penalty()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_bundle, g_bundle = grads(lambda: (mt.bundle(model) ** 2).sum())
    loss_cat, g_cat = grads(lambda: (_concat(model) ** 2).sum())
    torch.testing.assert_close(loss_bundle, loss_cat)
    for a, b in zip(g_bundle, g_cat):
        torch.testing.assert_close(a, b)

"""install(): nn.Module.as_tensor and tensor methods on modules, reversibly."""

import pytest
import torch
from torch import nn

import modtensor as mt


class WithMean(nn.Linear):
    def mean(self):
        return "mine"


def test_plain_pytorch_until_install():
    conv = nn.Conv2d(3, 16, 3)
    with pytest.raises(AttributeError):
        conv.mean()
    assert not hasattr(conv, "as_tensor")


def test_as_tensor_without_tensor_methods():
    mt.install()
    conv = nn.Conv2d(3, 4, 3)
    assert conv.as_tensor(include="weight").names == ("weight",)
    with pytest.raises(AttributeError):
        conv.mean()


def test_tensor_methods_resolve_to_the_bundle():
    mt.install(tensor_methods=True)
    lin = nn.Linear(3, 2)
    ref = torch.cat([lin.weight.reshape(-1), lin.bias])
    torch.testing.assert_close(lin.mean(), ref.mean())
    torch.testing.assert_close(lin.std(), ref.std())
    torch.testing.assert_close(lin.norm(), ref.norm())
    assert lin.numel() == 8


def test_module_attributes_always_win():
    mt.install(tensor_methods=True)
    m = WithMean(2, 2)
    assert m.mean() == "mine"
    assert m.half() is m and m.weight.dtype == torch.float16  # Module.half, not Tensor.half
    assert isinstance(m.to(torch.float32), nn.Module)
    with pytest.raises(AttributeError):
        m.no_such_thing
    with pytest.raises(AttributeError):
        m._private_tensor_like  # private names never resolve to the bundle


def test_install_is_idempotent_and_reversible():
    mt.install(tensor_methods=True)
    mt.install(tensor_methods=True)
    mt.uninstall()
    lin = nn.Linear(2, 2)
    assert not hasattr(lin, "as_tensor") and not hasattr(lin, "mean")
    mt.uninstall()


def test_installed_restores_the_previous_state():
    mt.install()
    with mt.installed(tensor_methods=True):
        assert nn.Linear(2, 2).sum().shape == ()
    assert hasattr(nn.Linear(2, 2), "as_tensor")
    assert not hasattr(nn.Linear(2, 2), "sum")

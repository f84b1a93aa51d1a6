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


class WithBrokenDevice(nn.Linear):
    @property
    def device(self):
        return self.backbone.weight.device  # no `backbone`: AttributeError inside the property


def test_a_property_that_raises_attribute_error_is_not_replaced_by_the_bundle():
    # Python retries a property that raised AttributeError through __getattr__, and the patch
    # answered with the bundle's device: the module's own attribute silently lost.
    m = WithBrokenDevice(2, 2)
    with pytest.raises(AttributeError):
        m.device
    mt.install(tensor_methods=True)
    with pytest.raises(AttributeError, match="device"):
        m.device
    assert m.numel() == 6  # names the class does not define still resolve to the bundle


def test_a_module_without_a_bundle_has_no_tensor_attributes():
    # A Lazy module before its first forward cannot be bundled: hasattr and getattr with a
    # default raised the bundle's ValueError instead of answering False and None.
    lazy = nn.LazyLinear(3)
    mt.install(tensor_methods=True)
    assert not hasattr(lazy, "dtype")
    assert getattr(lazy, "shape", None) is None
    with pytest.raises(AttributeError, match=r"'LazyLinear' object has no attribute 'mean'.*uninitialized"):
        lazy.mean()
    lazy(torch.ones(1, 2))
    torch.testing.assert_close(lazy.mean(), torch.cat([lazy.weight.reshape(-1), lazy.bias]).mean())


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


@pytest.fixture
def other_library(monkeypatch):
    """Another library's patch of nn.Module.__getattr__ (undone by monkeypatch)."""
    below = nn.Module.__getattr__

    def other_patch(self, name):
        return 42 if name == "special" else below(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", other_patch)
    return other_patch


def test_another_librarys_earlier_patch_survives_install_and_uninstall(other_library):
    # install captured nn.Module.__getattr__ at import and put that back: the patch was lost.
    lin = nn.Linear(2, 2)
    mt.install(tensor_methods=True)
    assert lin.special == 42 and lin.numel() == 6
    mt.uninstall()
    assert nn.Module.__getattr__ is other_library
    assert lin.special == 42 and not hasattr(lin, "numel")


def test_a_patch_made_on_top_of_ours_is_kept_by_uninstall(monkeypatch):
    mt.install(tensor_methods=True)
    below = nn.Module.__getattr__

    def later_patch(self, name):
        return 7 if name == "later" else below(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", later_patch)
    lin = nn.Linear(2, 2)
    mt.uninstall()
    assert nn.Module.__getattr__ is later_patch and lin.later == 7
    assert not hasattr(lin, "numel")  # ours, below it, is off
    mt.install(tensor_methods=True)  # and on again over it, once
    assert lin.later == 7 and lin.numel() == 6
    mt.uninstall()
    assert nn.Module.__getattr__ is later_patch and not hasattr(lin, "numel")


def test_install_again_keeps_tensor_methods_unless_asked():
    # install() after install(tensor_methods=True) turned them off; "calling it again is harmless".
    lin = nn.Linear(2, 2)
    mt.install(tensor_methods=True)
    mt.install()
    assert lin.numel() == 6
    with mt.installed():
        assert lin.numel() == 6
    assert lin.numel() == 6
    mt.install(tensor_methods=False)
    assert hasattr(lin, "as_tensor") and not hasattr(lin, "numel")
    with mt.installed(tensor_methods=True):
        assert lin.numel() == 6
    assert hasattr(lin, "as_tensor") and not hasattr(lin, "numel")


def test_install_state_is_process_global():
    # Documented rather than made thread-safe: overlapping installed() blocks in threads
    # undo each other.
    for doc in (mt.install.__doc__, mt.installed.__doc__):
        assert "process-global" in doc and "thread" in doc

"""`install()`: modules gain `as_tensor()` and, on request, every tensor method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from modtensor._bundle import ParameterBundle, bundle

__all__ = ["install", "uninstall", "installed"]

_ORIGINAL_GETATTR = nn.Module.__getattr__
_state = {"installed": False, "tensor_methods": False}


def _as_tensor(self: nn.Module, **bundle_kwargs: Any) -> ParameterBundle:
    """Return `mt.bundle(self, **bundle_kwargs)` (added to nn.Module by `mt.install()`)."""
    return bundle(self, **bundle_kwargs)


def _getattr_with_tensor_methods(self: nn.Module, name: str) -> Any:
    # nn.Module.__getattr__ only runs after normal lookup failed, so the module's own
    # attributes and methods (.to, .half, a user's `mean`) always win over the bundle's.
    try:
        return _ORIGINAL_GETATTR(self, name)
    except AttributeError:
        if name.startswith("_") or not hasattr(torch.Tensor, name):
            raise
    return getattr(bundle(self), name)


def install(tensor_methods: bool = False) -> None:
    """Add `nn.Module.as_tensor(**bundle_kwargs)`; with `tensor_methods=True`, tensor methods too.

    With `tensor_methods=True` any tensor method or attribute a module does not itself have
    resolves to its bundle, so `model.conv1.mean()` works. Plain PyTorch is untouched until
    this is called; calling it again is harmless; `uninstall()` reverts it. Note that modules
    then answer `hasattr(module, "dtype")` and the like with True.

    Example:
        >>> import torch, modtensor as mt
        >>> conv = torch.nn.Conv2d(3, 16, 3)
        >>> mt.install(tensor_methods=True)
        >>> torch.allclose(conv.mean(), torch.cat([conv.weight.reshape(-1), conv.bias]).mean())
        True
        >>> conv.as_tensor(exclude="bias").names
        ('weight',)
        >>> mt.uninstall()
        >>> hasattr(conv, "mean")
        False
    """
    nn.Module.as_tensor = _as_tensor  # type: ignore[attr-defined]
    nn.Module.__getattr__ = _getattr_with_tensor_methods if tensor_methods else _ORIGINAL_GETATTR  # type: ignore[method-assign]
    _state.update(installed=True, tensor_methods=tensor_methods)


def uninstall() -> None:
    """Undo `install()`: nn.Module is plain PyTorch again. Harmless if not installed.

    Example:
        >>> import torch, modtensor as mt
        >>> mt.install(); mt.uninstall()
        >>> hasattr(torch.nn.Linear(2, 2), "as_tensor")
        False
    """
    if "as_tensor" in vars(nn.Module):
        del nn.Module.as_tensor  # type: ignore[attr-defined]
    nn.Module.__getattr__ = _ORIGINAL_GETATTR  # type: ignore[method-assign]
    _state.update(installed=False, tensor_methods=False)


@contextlib.contextmanager
def installed(tensor_methods: bool = False) -> Iterator[None]:
    """Install for the duration of a `with` block, then restore the previous state.

    Example:
        >>> import torch, modtensor as mt
        >>> lin = torch.nn.Linear(2, 3)
        >>> with mt.installed(tensor_methods=True):
        ...     lin.numel()
        9
        >>> hasattr(lin, "numel")
        False
    """
    previous = dict(_state)
    install(tensor_methods)
    try:
        yield
    finally:
        if previous["installed"]:
            install(previous["tensor_methods"])
        else:
            uninstall()

"""`install()`: modules gain `as_tensor()` and, on request, every tensor method."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from modtensor._bundle import ParameterBundle, bundle

__all__ = ["install", "uninstall", "installed"]

Getattr = Callable[[nn.Module, str], Any]


class _Patch:
    """nn.Module.__getattr__ while tensor methods are installed, over the one found then.

    It wraps whatever was there at install time (another library's patch included), and
    uninstall puts that back. If yet another patch was put on top of this one meanwhile,
    uninstall leaves that patch in place and turns this one off: it then only passes on to
    the one below, so neither library's patch is lost.
    """

    def __init__(self, below: Getattr) -> None:
        self.below = below
        self.active = True
        patch = self

        # A plain function: nn.Module.__getattr__ serves every parameter access (`lin.weight`).
        def __getattr__(module: nn.Module, name: str) -> Any:
            # It only runs after normal lookup failed, so the module's own attributes and
            # methods (.to, .half, a user's `mean`) always win over the bundle's.
            try:
                return below(module, name)
            except AttributeError:
                # A name the class defines lands here too when its property raises
                # AttributeError (HF-style `dtype` or `device`): that error is the module's, and
                # the bundle's attribute in its place would be a silently different answer.
                if (
                    not patch.active
                    or name.startswith("_")
                    or not hasattr(torch.Tensor, name)
                    or hasattr(type(module), name)
                ):
                    raise
            try:
                made = bundle(module)
            except (TypeError, ValueError) as e:
                # A module with no bundle (a Lazy one before its first forward) has no tensor
                # attributes: `hasattr(m, "dtype")` and `getattr(m, "shape", None)` must still
                # answer False and None, as in plain PyTorch.
                raise AttributeError(
                    f"{type(module).__name__!r} object has no attribute {name!r}: it resolves to "
                    f"the module's bundle, and {e}"
                ) from e
            return getattr(made, name)

        self.getattr = __getattr__


_state: dict[str, Any] = {"installed": False, "patch": None}  # patch: the _Patch set, if any


def _as_tensor(self: nn.Module, **bundle_kwargs: Any) -> ParameterBundle:
    """Return `mt.bundle(self, **bundle_kwargs)` (added to nn.Module by `mt.install()`)."""
    return bundle(self, **bundle_kwargs)


def _remove_tensor_methods() -> None:
    ours: _Patch | None = _state["patch"]
    if ours is None:
        return
    if vars(nn.Module).get("__getattr__") is ours.getattr:
        nn.Module.__getattr__ = ours.below  # type: ignore[method-assign]
    else:  # another patch on top of ours: keep it, and make ours a plain pass-on
        ours.active = False
    _state["patch"] = None


def install(tensor_methods: bool | None = None) -> None:
    """Add `nn.Module.as_tensor(**bundle_kwargs)`; with `tensor_methods=True`, tensor methods too.

    With `tensor_methods=True` any tensor method or attribute a module does not itself have
    resolves to its bundle, so `model.conv1.mean()` works (a module that cannot be bundled, such
    as a Lazy one before its first forward, has none: AttributeError, so `hasattr` stays False).
    Plain PyTorch is untouched until this is called; `uninstall()` reverts it. Calling it
    again is harmless: without `tensor_methods` it keeps what is installed (tensor methods stay
    on after `install(tensor_methods=True)`); `tensor_methods=False` turns them off. Note that
    modules then answer `hasattr(module, "dtype")` and the like with True.

    It patches `nn.Module.__getattr__` as found at this call (another library's patch made
    earlier keeps working, and `uninstall()` puts it back). The install state is
    process-global, like the patch: it is not thread-safe, so threads must not install or
    uninstall concurrently, nor run overlapping `mt.installed()` blocks.

    Example:
        >>> import torch, modtensor as mt
        >>> conv = torch.nn.Conv2d(3, 16, 3)
        >>> mt.install(tensor_methods=True)
        >>> torch.allclose(conv.mean(), torch.cat([conv.weight.reshape(-1), conv.bias]).mean())
        True
        >>> conv.as_tensor(exclude="bias").names
        ('weight',)
        >>> mt.install()  # harmless: tensor methods stay
        >>> conv.numel()
        448
        >>> mt.uninstall()
        >>> hasattr(conv, "mean")
        False
    """
    nn.Module.as_tensor = _as_tensor  # type: ignore[attr-defined]
    _state["installed"] = True
    if tensor_methods is None or bool(tensor_methods) == (_state["patch"] is not None):
        return
    if tensor_methods:
        ours = _Patch(nn.Module.__getattr__)  # what is there now, patches included
        nn.Module.__getattr__ = ours.getattr  # type: ignore[method-assign]
        _state["patch"] = ours
    else:
        _remove_tensor_methods()


def uninstall() -> None:
    """Undo `install()`: nn.Module is as it was before. Harmless if not installed.

    `nn.Module.__getattr__` gets back what `install()` found (another library's earlier patch
    included); a patch made on top of modtensor's after `install()` is left in place, and
    modtensor's part of it turned off.

    Example:
        >>> import torch, modtensor as mt
        >>> mt.install(); mt.uninstall()
        >>> hasattr(torch.nn.Linear(2, 2), "as_tensor")
        False
    """
    if vars(nn.Module).get("as_tensor") is _as_tensor:
        del nn.Module.as_tensor  # type: ignore[attr-defined]
    _remove_tensor_methods()
    _state["installed"] = False


@contextlib.contextmanager
def installed(tensor_methods: bool | None = None) -> Iterator[None]:
    """Install for the duration of a `with` block, then restore the previous state.

    `tensor_methods` as in `install()`: None keeps what is installed. The state is
    process-global: blocks in different threads must not overlap (the one that ends last
    would restore the state it found, undoing the other's).

    Example:
        >>> import torch, modtensor as mt
        >>> lin = torch.nn.Linear(2, 3)
        >>> with mt.installed(tensor_methods=True):
        ...     lin.numel()
        9
        >>> hasattr(lin, "numel")
        False
    """
    was_installed, had_methods = _state["installed"], _state["patch"] is not None
    install(tensor_methods)
    try:
        yield
    finally:
        if was_installed:
            install(had_methods)
        else:
            uninstall()

"""The module a bundle was made from, to notice when its tensors are replaced in it.

A bundle holds tensors, not the module. `model.load_state_dict(sd, assign=True)`,
`module.weight = nn.Parameter(...)` or `model.fc = nn.Linear(...)` put other tensors in the
module, and a bundle made before would go on reading the old ones: its results would no longer
be the module's, with nothing to tell. Walking the module at every op would cost about as much
as a small reduction, so torch's global registration hooks count such assignments instead, and
a bundle walks its module again only after one (at its next op).

Not seen: a tensor only removed (`module.bias = None`, `del module.weight`: torch calls no hook
for those), and writes that bypass `nn.Module.__setattr__` (`module._parameters[name] = ...`,
as `torch.func.functional_call` does for the length of its call). Tensors added beside the
old ones are not a change: the bundle's tensors are all still in the module.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

# Assignments to any module: COUNTS[0] of parameters and submodules, COUNTS[1] of those and
# of buffers. Some models reassign a cache buffer in every forward: only bundles of buffers
# need to look then. A bundle compares its source's count with one of them at every op.
COUNTS = [0, 0]
_hooked = False


def _counter(slots: tuple[int, ...]) -> Callable[[nn.Module, str, Any], None]:
    def hook(module: nn.Module, name: str, value: Any) -> None:
        for slot in slots:
            COUNTS[slot] += 1
        # returning None registers the value unchanged

    return hook


def _install_hooks() -> None:
    # Installed with the first bundle of a module, not at import: importing modtensor alone
    # leaves nn.Module as it was.
    global _hooked
    if not _hooked:
        _module.register_module_parameter_registration_hook(_counter((0, 1)))
        _module.register_module_module_registration_hook(_counter((0, 1)))
        _module.register_module_buffer_registration_hook(_counter((1,)))
        _hooked = True


class ModuleSource:
    """Where a bundle's tensors are in the module it was made from (held by a weak reference)."""

    __slots__ = ("_buffers", "_module", "_recurse", "seen", "slot")

    def __init__(self, module: nn.Module, recurse: bool, buffers: bool) -> None:
        _install_hooks()
        self._module = weakref.ref(module)
        self._recurse = recurse
        self._buffers = buffers
        self.slot = 1 if buffers else 0  # which of COUNTS it watches
        self.seen = COUNTS[self.slot]  # its value when the tensors were last found in the module

    def copied(self, memo: dict[int, Any]) -> ModuleSource | None:
        """The same place in the module's copy, where `copy.deepcopy` made one (`memo`)."""
        module = self._module()
        copy = None if module is None else memo.get(id(module))
        return ModuleSource(copy, self._recurse, self._buffers) if isinstance(copy, nn.Module) else None

    def stale(self) -> bool:
        """True if something was assigned to some module since the tensors were last found in it.

        The bundle's hot paths write this test out: `src.seen != COUNTS[src.slot]`.
        """
        return self.seen != COUNTS[self.slot]

    def replaced(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[tuple[str, str]]:
        """`(name, what became of it)` for each tensor the module no longer holds.

        Under any name: a layer wrapped in another (adapters, `nn.Sequential(layer)`) or a
        parametrization renames its tensors without changing them, and the bundle still reads
        the module's own.

        After an assignment that changed none of them, the current count is recorded, so later
        ops check nothing until the next assignment.
        """
        count = COUNTS[self.slot]
        module = self._module()
        if module is None:  # gone: the bundle holds the only references to its tensors
            self.seen = count
            return []
        now: dict[str, torch.Tensor] = dict(module.named_parameters(recurse=self._recurse, remove_duplicate=False))
        if self._buffers:
            now.update(module.named_buffers(recurse=self._recurse, remove_duplicate=False))
        held = {id(t) for t in now.values()}
        found = []
        for name, t in zip(names, tensors):
            if id(t) not in held:
                what = "is no longer in it" if name not in now else "has since been replaced by another tensor"
                found.append((name, what))
        if not found:
            self.seen = count
        return found

"""New bundles shaped like a bundle: `torch.zeros_like(b)`, `ones_like`, `full_like`, `empty_like`.

`torch.zeros_like(b)` is a bundle of the same names and shapes, each tensor a new one, as
`torch.zeros_like` of the concatenation is a new flat tensor: a buffer for an EMA or a
momentum, made without copying the model first. Its values, dtype, device and
`requires_grad` are the concatenation's (under the concat strategy each tensor takes the
concatenation's dtype; under the others its own, as elementwise ops do). torch itself makes
each tensor, from a stand-in of its shape on the meta device (no data), after a stand-in of
the concatenation: every argument is taken, and checked, by torch as on the concatenation.
The random `rand_like` and `randn_like` are left out: drawn tensor by tensor, their values
would not be those drawn for the concatenation.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from modtensor._bundle import ParameterBundle
from modtensor._dispatch import func_name

__all__ = ["LIKE_FUNCTIONS"]

LIKE_FUNCTIONS = (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like)


@ParameterBundle.implements(LIKE_FUNCTIONS)
def _like(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    b, rest = (args[0], args[1:]) if args else (kwargs.pop("input"), ())
    device = kwargs.pop("device", None)
    # First on a stand-in of the concatenation: torch checks the arguments as it would there
    # (channels_last on a flat tensor raises), and says the result's dtype.
    probe = func(torch.empty(b._numel, dtype=b._dtype, device="meta"), *rest, device="meta", **kwargs)
    kwargs["dtype"] = kwargs.get("dtype") or (probe.dtype if b._strategy == "concat" else None)
    if kwargs.get("requires_grad") and kwargs["dtype"] is None:
        integers = [n for n, d in zip(b._names, b._dtypes) if not (d.is_floating_point or d.is_complex)]
        if integers:
            raise TypeError(
                f"{func_name(func)}(requires_grad=True): under the {b._strategy!r} strategy each "
                f"tensor keeps its dtype, and {integers} of {b.describe()} hold integers, which "
                "cannot require gradients. Pass a floating dtype=, or use the concat strategy."
            )
    tensors = [
        func(torch.empty(shape, dtype=own_dtype, device="meta"), *rest, device=device or own_device, **kwargs)
        for shape, own_dtype, own_device in zip(b._shapes, b._dtypes, b._devices)
    ]
    made = ParameterBundle.__new__(
        b._derived_class(), tensors, b._names, b._strategy, b._options, probe.dtype,
        device=b._device if device is None else torch.device(device),
    )
    return b._carry(made)

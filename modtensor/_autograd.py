"""Bundles as the inputs of `torch.autograd.grad` and `torch.autograd.backward(inputs=...)`.

The gradient with respect to a bundle is the gradient with respect to its concatenation: a
bundle of its tensors' gradients, same names. A bundle's tensors are what the graph holds, so
they are the inputs autograd is asked about; the fallback would hand autograd a fresh
concatenation, which is in no graph ("appears to not have been used in the graph").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from modtensor._bundle import ParameterBundle, is_bundle
from modtensor._dispatch import NOT_HANDLED, func_name
from modtensor._errors import UnsupportedOperationError

__all__ = ["AUTOGRAD_FUNCTIONS"]


def _as_sequence(x: Any) -> tuple[Any, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _expand(name: str, inputs: Sequence[Any]) -> tuple[list[Any], list[tuple[int, int | None]]]:
    """The inputs with each bundle replaced by its tensors, and where each input's part starts."""
    expanded: list[Any] = []
    spans: list[tuple[int, int | None]] = []
    for x in inputs:
        if not is_bundle(x):
            spans.append((len(expanded), None))
            expanded.append(x)
            continue
        if x._tensors is None or x._flat is not None:
            raise UnsupportedOperationError(
                f"{name}: {x.describe()} is the result of an op, computed on demand, so no graph "
                "holds its tensors; ask for the gradient with respect to the bundles (or tensors) "
                "it was computed from, or take `b.tensors` first and use those in the loss."
            )
        frozen = [n for n, t in zip(x._names, x._tensors) if not t.requires_grad]
        if frozen and len(frozen) < len(x._names):
            # The concatenation would require grad, but no graph reaches these tensors.
            raise UnsupportedOperationError(
                f"{name}: {x.describe()} holds tensors that do not require grad ({', '.join(frozen[:3])}"
                f"{', ...' if len(frozen) > 3 else ''}), so no graph gives their part of the gradient. "
                "Ask with respect to the trainable ones: `mt.bundle(model, include=lambda n, t: "
                "t.requires_grad)`."
            )
        spans.append((len(expanded), len(x._tensors)))
        expanded.extend(x._tensors)
    return expanded, spans


def _expand_outputs(
    name: str, outputs: Any, grad_outputs: Any
) -> tuple[list[Any], list[Any] | None]:
    """The outputs with each bundle replaced by its tensors, and their gradients split to match.

    A bundle output is its tensors, which are in the graph; the fallback would hand autograd
    a fresh concatenation of them and its inputs, so nothing reached the bundles' tensors.
    """
    outputs = _as_sequence(outputs)
    grads = None if grad_outputs is None else _as_sequence(grad_outputs)
    if grads is not None and len(grads) != len(outputs):
        return list(outputs), list(grads)  # torch's own error for the count
    new_outputs: list[Any] = []
    new_grads: list[Any] = []
    for k, out in enumerate(outputs):
        grad = None if grads is None else grads[k]
        if not is_bundle(out):
            new_outputs.append(out)
            new_grads.append(grad)
            continue
        tensors = out.tensors
        new_outputs.extend(tensors)
        if grad is None:
            if out.numel() != 1:
                raise RuntimeError(
                    f"{name}: grad can be implicitly created only for scalar outputs, and output {k} "
                    f"is {out.describe()}; pass its gradient, a ({out.numel()},) tensor or a bundle "
                    "of the same structure."
                )
            grad = torch.ones(1, dtype=out.dtype, device=out.device)
        if is_bundle(grad) and grad._shapes == out._shapes:
            new_grads.extend(grad.tensors)
            continue
        flat = grad.materialize() if is_bundle(grad) else grad
        if not isinstance(flat, torch.Tensor) or flat.shape != (out.numel(),):
            shape = getattr(flat, "shape", type(flat).__name__)
            raise RuntimeError(
                f"{name}: mismatch in shape: grad_output[{k}] has a shape of {shape} and "
                f"output[{k}], {out.describe()}, has a shape of {tuple(out.shape)}; pass a "
                f"({out.numel()},) tensor or a bundle of the same structure."
            )
        pieces = torch.split(flat, [t.numel() for t in tensors])
        new_grads.extend(g.reshape(t.shape) for g, t in zip(pieces, tensors))
    return new_outputs, new_grads


def _grad(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    kwargs = dict(kwargs)
    outputs = args[0] if args else kwargs.pop("outputs")
    inputs = args[1] if len(args) > 1 else kwargs.pop("inputs")
    grad_outputs = args[2] if len(args) > 2 else kwargs.pop("grad_outputs", None)
    rest = args[3:]
    inputs = _as_sequence(inputs)
    if any(is_bundle(x) for x in _as_sequence(outputs)):
        outputs, grad_outputs = _expand_outputs(func_name(func), outputs, grad_outputs)
        if not any(is_bundle(x) for x in inputs):
            return torch.autograd.grad(outputs, inputs, grad_outputs, *rest, **kwargs)
    if not any(is_bundle(x) for x in inputs):
        return NOT_HANDLED
    expanded, spans = _expand(func_name(func), inputs)
    materialize = bool(kwargs.pop("materialize_grads", False))
    allow_unused = kwargs.pop("allow_unused", None)
    allow_unused = materialize if allow_unused is None else allow_unused
    # A bundle's unused tensors (a 0-numel one, or one the output does not read) are zeros of
    # the concatenation's gradient, so torch is asked to allow them; the rule for unused
    # inputs is then applied to each input as a whole, as torch applies it to a tensor.
    grads: tuple[Any, ...] = torch.autograd.grad(  # type: ignore[call-overload]
        outputs, expanded, grad_outputs, *rest, allow_unused=True, **kwargs
    )
    results: list[Any] = []
    for index, (x, (start, n)) in enumerate(zip(inputs, spans)):
        parts = grads[start : start + (1 if n is None else n)]
        if all(g is None for g in parts):
            if not allow_unused:
                raise RuntimeError(
                    f"The differentiated Tensor at index {index} appears to not have been used in the "
                    "graph. Set allow_unused=True if this is the desired behavior."
                )
            if not materialize:
                results.append(None)
                continue
        own = (x,) if n is None else x._tensors
        filled = [torch.zeros_like(t) if g is None else g for t, g in zip(own, parts)]
        results.append(filled[0] if n is None else x.derive(filled))
    return tuple(results)


def _backward(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    kwargs = dict(kwargs)
    tensors = args[0] if args else kwargs.pop("tensors")
    grad_tensors = args[1] if len(args) > 1 else kwargs.pop("grad_tensors", None)
    kwargs.update(zip(("retain_graph", "create_graph", "grad_variables", "inputs"), args[2:]))
    inputs = kwargs.pop("inputs", None)
    bundle_outputs = any(is_bundle(x) for x in _as_sequence(tensors))
    bundle_inputs = inputs is not None and any(is_bundle(x) for x in _as_sequence(inputs))
    if not (bundle_outputs or bundle_inputs):
        return NOT_HANDLED
    if bundle_outputs:
        tensors, grad_tensors = _expand_outputs(func_name(func), tensors, grad_tensors)
    if bundle_inputs:
        # Each tensor's .grad accumulates, as `inputs=` asks of a tensor: `b.grad` then reads them.
        inputs, _ = _expand(func_name(func), _as_sequence(inputs))
    torch.autograd.backward(tensors, grad_tensors, inputs=inputs, **kwargs)
    return None


def _tensor_backward(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # `out.backward(gradient, retain_graph, create_graph, inputs)` is torch.autograd.backward's call.
    names = ("gradient", "retain_graph", "create_graph", "inputs")
    given = {**dict(zip(names, args[1:])), **kwargs}
    call = {
        "tensors": args[0], "grad_tensors": given.get("gradient"), "retain_graph": given.get("retain_graph"),
        "create_graph": given.get("create_graph", False), "inputs": given.get("inputs"),
    }
    return _backward(func, types, (), call)


AUTOGRAD_FUNCTIONS = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)
ParameterBundle.implements(torch.autograd.grad)(_grad)
ParameterBundle.implements(torch.autograd.backward)(_backward)
ParameterBundle.implements(torch.Tensor.backward)(_tensor_backward)

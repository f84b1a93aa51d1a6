"""Strategies: what a reduction does with the per-tensor partials.

An op (see `_reductions.py`) says how to compute one tensor's partial state and how partial
states combine. A strategy decides what to do with them: `concat` combines them into the
result over the concatenation. Adding an op never touches a strategy and vice versa.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from modtensor._dispatch import materialized

if TYPE_CHECKING:
    from modtensor._bundle import ParameterBundle

__all__ = ["Reduction", "ReduceArgs", "ReductionCall", "Strategy", "STRATEGIES", "get"]


@dataclass
class ReduceArgs:
    """A reduction call's arguments, parsed once and shared by partial, combine and finalize."""

    name: str
    dtype: torch.dtype  # what the concatenation computes in (the bundle's, or dtype=)
    numel: int
    keepdim: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reduction:
    """A reduction over the concatenation, written as a monoid over the tensors.

    `partial(tensor, offset, args)` is one non-empty tensor's state (`offset` is where the
    tensor starts in the concatenation), `combine(states, args)` merges states
    associatively, `finalize(state, args)` turns the merged state into the result.
    `needs_elements(args)` is true where torch raises on an empty input (no identity).
    """

    parse: Callable[[ParameterBundle, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
    partial: Callable[[Any, int, ReduceArgs], Any]
    combine: Callable[[list[Any], ReduceArgs], Any]
    finalize: Callable[[Any, ReduceArgs], Any] = lambda state, args: state
    needs_elements: Callable[[ReduceArgs], bool] = lambda args: False


@dataclass(frozen=True)
class ReductionCall:
    """Everything a strategy sees of one reduction call."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    bundle: ParameterBundle
    reduction: Reduction
    parsed: ReduceArgs
    # (operand, offset, numel) per tensor: the tensor itself, or a tuple of the tensor's
    # operands for bundle-with-bundle reductions.
    pieces: Sequence[tuple[Any, int, int]]


class Strategy:
    """Base class of strategies: a name, its options, and `reduce`."""

    name: str = ""

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise TypeError for options this strategy does not take."""
        if options:
            raise TypeError(
                f"strategy {self.name!r} takes no options, got {sorted(options)}."
            )

    def reduce(self, call: ReductionCall) -> Any:
        """Compute the reduction `call` under this strategy."""
        raise NotImplementedError


def _keepdim(result: Any, keepdim: bool) -> Any:
    if not keepdim:
        return result
    if isinstance(result, torch.Tensor):
        return result.reshape(1)
    return type(result)(tuple(r.reshape(1) for r in result))


class Concat(Strategy):
    """Combine the partials into the reduction over the explicit concatenation."""

    name = "concat"

    def reduce(self, call: ReductionCall) -> Any:
        b, red, parsed = call.bundle, call.reduction, call.parsed
        states = [red.partial(piece, offset, parsed) for piece, offset, n in call.pieces if n > 0]
        if not states:
            if red.needs_elements(parsed):
                raise RuntimeError(
                    f"{parsed.name}: {b.describe()} has no elements, and this reduction has no "
                    "identity (torch raises the same on torch.empty(0)). Check `b.numel() > 0` first."
                )
            # The empty concatenation is torch.empty(0): let torch give its own answer.
            args, kwargs = materialized(call.args), materialized(call.kwargs)
            return call.func(*args, **kwargs)
        return _keepdim(red.finalize(red.combine(states, parsed), parsed), parsed.keepdim)


STRATEGIES: dict[str, Strategy] = {"concat": Concat()}


def get(name: str) -> Strategy:
    """Return the registered strategy `name`, or raise ValueError listing the valid ones."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown strategy {name!r}. Expect one of {tuple(STRATEGIES)}."
        ) from None


def names() -> Sequence[str]:
    """Return the names of the registered strategies."""
    return tuple(STRATEGIES)

"""Argument parsing and dtype helpers shared by the reductions (sums and norms, extrema,
order statistics, bundle-with-bundle ones, and their combines across ranks).

They parse torch's signatures and combine per-tensor states: in float64 (complex128) where
the result is floating, so a combine adds no rounding of its own.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from modtensor._bundle import ParameterBundle

__all__ = ["check_dim", "dim_ints"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_forward_ad = torch.autograd.forward_ad
_interpreters = torch._C._functorch.peek_interpreter_stack


def transformed() -> bool:
    """True under forward-mode AD (a dual level) or a `torch.func` transform (grad, jvp, vmap).

    Their tangents and batching follow torch's own ops only: the kernels that write with
    `out=`, pack tensors or count by radix keys (which would drop tangents, or have no
    batching rule) then step aside. About 50 ns.
    """
    return _forward_ad._current_level >= 0 or _interpreters() is not None


def records(*operands: Any) -> bool:
    """Whether autograd records an op on `operands` (ties are counted, kernels without a
    backward of their own step aside, only then)."""
    # getattr: inside torch.compile a bundle is a stand-in, not a torch.Tensor
    return torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in operands)


def kept_empty(size: int | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized buffer that is kept and written again at later calls. It is made
    outside inference mode: one made inside it would be an inference tensor, which no later
    call outside inference mode may write (a call under `torch.inference_mode()` first, a
    training step next, raised)."""
    with torch.inference_mode(False):
        return torch.empty(size, dtype=dtype, device=device)


# -- argument helpers ------------------------------------------------------------------------


def dim_ints(dim: Any, name: str) -> tuple[int, ...] | None:
    """Return `dim` as a tuple of ints (None for None); raise TypeError where torch's argument
    parser would, which it does before any check of the dtype or the dims' range."""
    if dim is None:
        return None
    if isinstance(dim, torch.Tensor):  # torch takes an integer tensor's values as the dims
        dim = dim.tolist()
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    ints = []
    for d in dims:
        # an int, or what torch takes as one (a NumPy integer, a one-element integer tensor)
        if isinstance(d, torch.Tensor) and d.numel() == 1 and not d.is_floating_point():
            d = d.item()
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{name}: dim must be an int or a tuple of ints, got {dim!r}.")
        ints.append(int(d))
    return tuple(ints)


def check_dim(dim: Any, name: str, b: ParameterBundle) -> tuple[int, ...] | None:
    """Raise IndexError unless `dim` names the bundle's only dimension (or is None / ());
    return it as a tuple of ints (None for None)."""
    ints = dim_ints(dim, name)
    if ints is None:
        return None
    for d in ints:
        if d not in (0, -1):
            raise IndexError(
                f"{name}: Dimension out of range (expected to be in range of [-1, 0], but got "
                f"{d}): {b.describe()} behaves as one flat dimension of {b._numel} elements. "
                "Use dim=0, or the per_param strategy for each tensor's own dims."
            )
    if len(ints) > 1:
        raise RuntimeError(f"{name}: dim 0 appears multiple times in the list of dims {dim!r}.")
    return ints


def check_dtype(dtype: Any, name: str, b: ParameterBundle) -> Any:
    """`dtype` itself where it is None or a torch.dtype; TypeError otherwise, as torch's parser.

    The partials read its attributes (`is_floating_point`), which gave an AttributeError.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    raise TypeError(
        f"{name}: argument 'dtype' must be torch.dtype, not {type(dtype).__name__} ({dtype!r}), "
        f"for {b.describe()}; e.g. dtype=torch.float64 (torch raises the same on the concatenation)."
    )


def without_none_out(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` less an explicit `out=None`, torch's default, which the reductions' signatures
    (torch's own, written as stubs, or a library's `parse`) leave out."""
    if "out" in kwargs and kwargs["out"] is None:
        return {key: value for key, value in kwargs.items() if key != "out"}
    return kwargs


def _bind(stub: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Python's own argument binding mirrors torch's signature at the cost of one call.
    kwargs = dict(kwargs)
    if "axis" in kwargs:
        kwargs["dim"] = kwargs.pop("axis")
    if "keepdims" in kwargs:
        kwargs["keepdim"] = kwargs.pop("keepdims")
    try:
        return stub(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{name}: {e}".replace(stub.__name__ + "()", "")) from None


def _is_floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _require_floating(
    dtype: torch.dtype, name: str, b: ParameterBundle, what: str, dtype_helps: bool = True
) -> None:
    if not _is_floating(dtype):
        raise RuntimeError(
            f"{name}: {what} needs a floating point or complex dtype, but {b.describe()} "
            f"concatenates to {dtype} (torch raises the same on the concatenation). "
            f"Cast first, e.g. `b.float()`{', or pass dtype=' if dtype_helps else ''}."
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partials are combined in: float64 / complex128 for floating results."""
    if dtype.is_complex:
        return torch.complex128
    if dtype.is_floating_point:
        return torch.float64
    return dtype


def _partial_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 / bfloat16 partial sums may overflow where the concatenation's float32
    # accumulator would not.
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def sqrt0(total: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """`total.sqrt()` (the p-th root for p other than 2) with a zero gradient at 0, as a
    norm's, not the root's infinite one (NaN stays NaN, with a NaN gradient). For p < 0 the
    root of 0 is inf, as torch's norm of elements all infinite, with its NaN gradient."""
    if p < 0:
        return total.pow(1 / p)
    zero = total == 0
    safe = torch.where(zero, torch.ones_like(total), total)
    return torch.where(zero, total * 0, safe.sqrt() if p == 2 else safe.pow(1 / p))


def root_of_sum(powers: Sequence[torch.Tensor], dtype: torch.dtype, p: float = 2.0) -> torch.Tensor:
    """The p-norm from the tensors' sums of p-th powers (of squares: the L2 norm), added in
    `dtype`'s accumulation dtype."""
    return sqrt0(_stack(powers, _acc_dtype(dtype)).sum(), p)


def takes_powers(p: float, dtype: torch.dtype, records: bool) -> bool:
    """Whether a p-norm (or distance) is the p-th root of the tensors' sums of p-th powers
    (see `_kernels.power_sum`), as the L2 norm is of sums of squares: where autograd records
    (`records`), for a finite p other than 0 and 2 and a real dtype, outside torch.compile
    and torch.func (whose tracing takes torch's own ops). For p < 1 a tensor's own norm is
    inf where one of its elements is (p > 0) or all are (p < 0): through it, its gradient
    would be 0 * inf, NaN at each element, where torch's is finite at most. p = 1 too: the
    sums are then taken without a gradient, so a long tensor's by rows (`_kernels.p_norm`),
    where torch's float32 1-norm of it is about 1e-3 off."""
    return (
        records and math.isfinite(p) and p not in (0, 2) and not dtype.is_complex
        and not torch.compiler.is_compiling() and not transformed()
    )


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _stack(states: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if len({s.dtype for s in states}) == 1:
        try:  # one conversion, not one per state: for a hundred states that is most of the combine
            return torch.stack(list(states)).to(dtype)
        except RuntimeError:  # on several devices
            pass
    # Partials of a bundle spanning devices meet on the first one's (see _combine_device).
    device = states[0].device
    if any(s.device != device for s in states):
        device = next((s.device for s in states if s.device.type == "meta"), device)
    return torch.stack([s.to(device=device, dtype=dtype) for s in states])


def _sum_dtype(dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    return torch.int64 if not _is_floating(dtype) else dtype


_REAL_OF_COMPLEX = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def _real(dtype: torch.dtype) -> torch.dtype:
    return _REAL_OF_COMPLEX.get(dtype, dtype)


@contextlib.contextmanager
def quiet_count(t: torch.Tensor, p: float) -> Iterator[None]:
    """Silence the warning torch's order-0 norm (and dist) of one complex element gives, that a
    cast discards the imaginary part: the count is right, and the concatenation, longer, gives
    none."""
    if p != 0 or t.numel() != 1 or not t.is_complex():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Casting complex values to real", UserWarning)
        yield

"""Indexing a bundle as its concatenation (by int, slice, boolean mask), and reading it out.

An int gives a 0-d tensor, a slice a 1-D tensor (a view where it falls within one
contiguous tensor), a mask the selected elements. Other indices fall back. `tolist`,
`item`, `float(b)` and the like read values tensor by tensor.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from modtensor._bundle import ParameterBundle, is_bundle
from modtensor._dispatch import NOT_HANDLED, func_name
from modtensor._distributed import refuse
from modtensor._pointwise import _piece_getter
from modtensor._reduce_common import transformed
from modtensor._selection import _connect, flat_views

__all__ = ["READOUT_FUNCTIONS", "as_position", "getitem"]


def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat if flat.dtype == dtype else flat.to(dtype)


def _local_only(name: str, b: ParameterBundle) -> None:
    # Positions and read-outs of a distributed bundle would be this rank's alone.
    if b._dist is not None:
        refuse(name, b, "it addresses this rank's concatenation, not the global one,")


def _locate(b: ParameterBundle, index: int) -> tuple[int, tuple[int, ...]]:
    """Which tensor holds element `index` of the concatenation, and where in it."""
    _local_only("indexing by position", b)
    n = b._numel
    if not -n <= index < n:
        raise IndexError(
            f"index {index} is out of bounds for dimension 0 with size {n} ({b.describe()})."
        )
    index %= n
    # The last tensor starting at or before index (empty ones share their successor's
    # start); a count rather than bisect, which torch.compile cannot trace.
    i = sum(1 for start in b._offsets[1:-1] if start <= index)
    local = index - b._offsets[i]
    coords = []
    for size in reversed(b._shapes[i]):
        coords.append(local % size)
        local //= size
    return i, tuple(reversed(coords))


def _int_index(b: ParameterBundle, index: int) -> torch.Tensor:
    i, coords = _locate(b, index)
    # A copy, as the concatenation's element is: a view of the tensor would be written by
    # `b[i].add_(1)`, would require grad under no_grad (as views of such a tensor do) and be
    # an inference tensor wherever that tensor is one.
    return b._tensor(i)[coords].to(b._dtype, copy=True)


def _slice_index(b: ParameterBundle, index: slice) -> tuple[torch.Tensor, bool]:
    """The slice, and whether it is a view of one of the tensors."""
    start, stop, step = index.indices(b._numel)
    if step <= 0:
        raise ValueError(f"step must be greater than zero (indexing {b.describe()}).")
    parts = []
    within = False
    for i, (begin, end) in enumerate(zip(b._offsets, b._offsets[1:])):
        if end <= start or begin >= stop or begin == end:
            continue
        t = b._tensor(i)
        # first element of the slice inside this tensor, on the slice's grid
        first = start if start >= begin else start + -(-(begin - start) // step) * step
        if first >= min(end, stop):
            continue
        # Told by the tensor, not by `_is_view()` of the result, which torch.compile cannot
        # trace and which is also true of a slice of a non-contiguous or cast tensor's copy.
        within = t.is_contiguous() and t.dtype == b._dtype
        part = t.reshape(-1)[first - begin : min(end, stop) - begin : step]
        # Cast after slicing, and copied out of a non-contiguous tensor's flat copy: a view of
        # a whole tensor's copy would keep it alive (every tensor's, until the cat, or for as
        # long as the result lives), for a slice that may hold a few elements.
        parts.append(part if within else part.to(b._dtype, copy=True))
    if len(parts) == 1:
        return parts[0], within
    if not parts:
        return torch.empty(0, dtype=b._dtype, device=b._device), False
    return torch.cat(parts), False


def _mask_index(b: ParameterBundle, mask: Any) -> Any:
    flat_mask = mask.dim() == 1 and mask.shape[0] == b._numel
    if not is_bundle(mask) and mask.dim() == 1 and not flat_mask:
        # torch's error, without first building the concatenation it would be raised on
        raise IndexError(
            f"ParameterBundle.__getitem__: The shape of the mask [{mask.shape[0]}] at index 0 does not "
            f"match the shape of the indexed tensor [{b._numel}] at index 0 ({b.describe()})."
        )
    if not (is_bundle(mask) or flat_mask):
        return NOT_HANDLED  # a 0-d mask adds a dimension: only the concatenation can do it
    getter = _piece_getter(mask, b, "ParameterBundle.__getitem__")
    if not b._names:
        return torch.empty(0, dtype=b._dtype, device=b._device)
    if (torch.is_grad_enabled() and b.requires_grad) or transformed() or torch.compiler.is_compiling():
        return torch.cat([b._tensor(i).to(b._dtype)[getter(i)].to(b._device) for i in range(len(b._names))])
    # Each tensor's selection copied (and cast) into its place, from a count of the mask: the
    # cat held every selection with the result, twice its size. (Where autograd follows, the
    # cat: slices written in place would each clone the whole gradient in backward.)
    counts = [int(torch.count_nonzero(getter(i))) for i in range(len(b._names))]
    result = torch.empty(sum(counts), dtype=b._dtype, device=b._device)
    start = 0
    for i in range(len(b._names)):
        t, m = b._tensor(i), getter(i)
        ts, ms = flat_views(t), flat_views(m)  # by chunks: indexing makes int64 indices
        for x, y in zip(ts, ms) if len(ts) == len(ms) and t.shape == m.shape else [(t, m)]:
            selected = x[y]
            result[start:start + selected.numel()].copy_(selected)
            start += selected.numel()
    return result


def as_position(index: Any) -> Any:
    """A 0-d integer tensor or a NumPy integer as the int it holds (torch indexes by it as by
    the int); any other index unchanged. A uint8 tensor stays: torch reads it as a boolean mask
    (deprecated)."""
    if isinstance(index, numbers.Integral) and not isinstance(index, bool):
        return int(index)
    if (
        isinstance(index, torch.Tensor)
        and not is_bundle(index)
        and index.dim() == 0
        and not (index.dtype.is_floating_point or index.dtype.is_complex or index.dtype in (torch.bool, torch.uint8))
    ):
        return int(index)
    return index


@ParameterBundle.implements(torch.Tensor.__getitem__)
def getitem(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`b[index]` for an int, a slice or a boolean mask, as on the concatenation."""
    b, index = args
    if not is_bundle(b):
        return NOT_HANDLED
    _local_only("ParameterBundle.__getitem__", b)
    # As on the concatenation under every strategy: dispatch refuses sparse tensors under
    # concat only (per_param applies other ops to each tensor). (dynamo cannot trace the
    # question, which looks for inference tensors too; a compiled graph fails on them anyway.)
    if not torch.compiler.is_compiling():
        b._check_strided(func)
    index = as_position(index)
    if isinstance(index, int) and not isinstance(index, bool):
        result = _int_index(b, index)
    elif isinstance(index, slice):
        result, is_view = _slice_index(b, index)
        if is_view:
            # A slice within one tensor is a view of it, as documented; linking the other
            # tensors would take an autograd Function, whose views raise once their base is
            # written (an optimizer step), so they get no gradient from it.
            return result
    elif (is_bundle(index) or isinstance(index, torch.Tensor)) and index.dtype == torch.bool:
        result = _mask_index(b, index)
        if result is NOT_HANDLED:
            return result
    else:
        return NOT_HANDLED
    # The concatenation's backward gives the tensors an index misses zero gradients, not
    # None (which optimizers skip).
    return _connect(result, b)


# -- reading values out: the result is a full Python or NumPy copy by nature ----------------

_SCALAR_CONVERSIONS = (
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
    torch.Tensor.__index__, torch.Tensor.__complex__,
)
READOUT_FUNCTIONS = (
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.is_inference, *_SCALAR_CONVERSIONS,
)


@ParameterBundle.implements(_SCALAR_CONVERSIONS)
def scalar_conversion(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`b.item()`, `bool(b)`, `float(b)`...: the one element, or torch's error for the count."""
    b = args[0]
    _local_only(func_name(func), b)
    if b._numel != 1:
        # torch's own error for this many elements ("ambiguous", "cannot be converted");
        # torch.empty reserves the memory without touching it.
        return func(torch.empty(b._numel, dtype=b._dtype), *args[1:], **kwargs)
    return func(_int_index(b, 0), *args[1:], **kwargs)


@ParameterBundle.implements(torch.Tensor.tolist)
def tolist(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`b.tolist()`: the concatenation's values as a Python list, read tensor by tensor."""
    b = args[0]
    _local_only(func_name(func), b)
    return [v for i in range(len(b._names)) for v in _flat(b._tensor(i), b._dtype).tolist()]


@ParameterBundle.implements(torch.Tensor.is_inference)
def is_inference(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """`b.is_inference()`: whether the concatenation would be an inference tensor, made now."""
    # torch.cat makes an inference tensor in inference mode, whatever its inputs are, and a
    # normal one outside it, even of inference tensors.
    if len(args) > 1 or kwargs:  # torch's own error: it takes none
        func(torch.empty(0), *args[1:], **kwargs)
    return torch.is_inference_mode_enabled()


@ParameterBundle.implements([torch.Tensor.numpy, torch.Tensor.__array__])
def to_numpy(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`b.numpy()`, `np.asarray(b)`: a NumPy array needs one buffer, so this is the one copy."""
    _local_only(func_name(func), args[0])
    return func(args[0].materialize(), *args[1:], **kwargs)

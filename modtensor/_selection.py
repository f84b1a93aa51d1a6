"""Selection by counting: the element of a given rank in a bundle's concatenation, without
sorting it or building it (the engine of `_order.py`'s order statistics).

- Elements are read in flat chunks of at most 2**18 elements (2**22 on a GPU), each cast to the
  bundle's dtype (the one copy made, of one chunk at a time).
- Each value has an integer key with the same order: a float's bits read as an integer, with
  negative values' magnitudes negated (so -0.0 and +0.0 share the key 0); an integer is its own key.
- A pass over the chunks counts the keys of a range in 65536 bins of their next 16 bits (a radix
  histogram); the bin holding the wanted rank is the next, narrower range. So a rank is pinned to
  one key within 1, 2 or 4 passes for 16-, 32- and 64-bit dtypes, whatever the data.
- Once a range holds at most `max(_GATHER, N // 256)` elements, one more pass gathers them with
  their global indices and a sort of those few finishes exactly. A range of a single value that
  is larger than that (many ties) finds the index by counting occurrences instead.
So the extra memory is a few chunk-sized temporaries plus the gathered candidates (and, for topk,
the k results), whatever the model's size; and there is no 2**24-element limit as in
`torch.quantile`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Union

import torch

from modtensor._bundle import ParameterBundle
from modtensor._reduce_common import _cast, transformed
from modtensor._strategies import with_empty_grads

Number = Union[int, float]

_CHUNK = 1 << 18  # elements read at a time on the CPU
_CHUNK_ACCELERATOR = 1 << 22  # on a GPU, where each op's launch costs more than 2**18 elements
_GATHER = 1 << 16  # candidates gathered at once, at least
_BITS = 16  # key bits resolved per counting pass


# -- reading a bundle in chunks ----------------------------------------------------------------


def chunk_size(device: torch.device) -> int:
    """Elements read at a time where a pass goes by chunks: its temporaries are a chunk's, not
    a tensor's."""
    return _CHUNK if device.type == "cpu" else _CHUNK_ACCELERATOR


def flat_views(t: torch.Tensor) -> Sequence[torch.Tensor]:
    """`t`'s elements in flat order, as views of at most `chunk_size` elements each; `[t]`
    where it is not contiguous (a flat piece of it would be a copy, not a view)."""
    if t.numel() <= chunk_size(t.device) or not t.is_contiguous():
        return [t]
    flat, size = t.view(-1), chunk_size(t.device)
    return [flat[start : start + size] for start in range(0, flat.numel(), size)]


def chunks_of(n: int, size: int, read: Callable[[int, int], Any]) -> Iterator[tuple[Any, int]] | None:
    """`(read(start, stop), start)` over `[0, n)` by pieces of at most `size`, each read when
    the previous one is done with; None where `n` fits one piece or `read` returns None for
    the first (it cannot read a piece alone, so it cannot read any)."""
    if n <= size:
        return None
    first = read(0, size)
    return None if first is None else _read_from(first, n, size, read)


def _read_from(first: Any, n: int, size: int, read: Callable[[int, int], Any]) -> Iterator[tuple[Any, int]]:
    piece = first
    del first
    for start in range(0, n, size):
        if piece is None:
            piece = read(start, min(start + size, n))
            assert piece is not None  # the first piece could be read alone, so can the others
        yield piece, start
        piece = None  # not held while the next one is read


def _flat_chunks(t: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """`t.reshape(-1)` in pieces of at most `size` elements; only non-contiguous pieces are copied."""
    if t.numel() <= size or t.dim() <= 1 or t.is_contiguous():
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), size):
            yield flat[start : start + size]
        return
    row = t[0].numel()
    if row > size:
        for r in t:
            yield from _flat_chunks(r, size)
        return
    rows = size // row
    for start in range(0, t.shape[0], rows):
        yield t[start : start + rows].reshape(-1)


Visit = Callable[[torch.Tensor, int], bool]


def _scan(b: ParameterBundle, visit: Visit) -> None:
    """Call `visit(chunk, offset)` on every element once, in flat order, until it returns True.

    Chunks are in the bundle's dtype; `offset` is where a chunk starts in the concatenation.
    """
    for i in range(len(b.names)):
        if b._shapes[i].numel() and _scan_tensor(b, i, visit):
            return


def _scan_tensor(b: ParameterBundle, i: int, visit: Visit) -> bool:
    # A function of its own, so that nothing of tensor i outlives it: a bundle computed on
    # demand then holds one tensor at a time.
    size = chunk_size(b._devices[i])
    begin, n = b._offsets[i], b._shapes[i].numel()
    if b._tensors is None:
        # An on-demand bundle (`b.abs()`...) makes each chunk alone where its op allows, so
        # not even one whole tensor of the intermediate exists at once.
        with torch.no_grad():
            first = b._flat_range(i, 0, min(size, n))
        if first is not None:
            for start in range(0, n, size):
                with torch.no_grad():
                    chunk = first if start == 0 else b._flat_range(i, start, min(start + size, n))
                assert chunk is not None
                first = None  # drop the first chunk with the others
                if visit(_cast(chunk.detach(), b._dtype), begin + start):
                    return True
            return False
    with torch.no_grad():
        t = b._tensor(i).detach()
    offset = begin
    for piece in _flat_chunks(t, size):
        if visit(_cast(piece, b._dtype), offset):
            return True
        offset += piece.numel()
    return False


def _nan_mask(c: torch.Tensor) -> torch.Tensor | None:
    # A sum is NaN whenever an element is, and costs far less than isnan: most chunks skip it.
    if not c.dtype.is_floating_point or not bool(c.sum().isnan()):
        return None
    return c.isnan()


# -- order-preserving integer keys ---------------------------------------------------------------

_FLOAT_BITS = {
    torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64,
}
# keys of 16-bit values are held in int32, so that bin arithmetic cannot overflow
_INT_KEYS = {
    torch.uint8: torch.int32, torch.int8: torch.int32, torch.int16: torch.int32, torch.int32: torch.int32,
    torch.int64: torch.int64,
}


def has_keys(dtype: torch.dtype) -> bool:
    """Whether the order-preserving keys cover `dtype`: not bool, complex, nor the unsigned
    16-, 32- and 64-bit integers (torch's CPU kernels order none of those)."""
    return _FLOAT_BITS.get(dtype, dtype) in _INT_KEYS


class _Keys:
    """Integer keys with the order of a dtype's values, spanning `width` bits (16, 32 or 64)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.floating = dtype.is_floating_point
        self.bits_dtype = _FLOAT_BITS.get(dtype, dtype)
        self.width = max(16, torch.iinfo(self.bits_dtype).bits)
        self.key_dtype = _INT_KEYS[self.bits_dtype]
        self.key_min, self.key_max = torch.iinfo(self.key_dtype).min, torch.iinfo(self.key_dtype).max
        # the keys of the lowest and highest values that are not NaN
        if self.floating:
            self.lowest, self.highest = -self._of_value(math.inf), self._of_value(math.inf)
        else:
            self.lowest, self.highest = torch.iinfo(dtype).min, torch.iinfo(dtype).max

    def of(self, c: torch.Tensor) -> torch.Tensor:
        """The keys of chunk `c` (NaN keys are meaningless: callers mask NaN out)."""
        if not self.floating:
            return c.to(self.key_dtype)
        bits = c.view(self.bits_dtype).to(self.key_dtype)
        sign = bits >> (self.width - 1)  # -1 for negative values, else 0
        return (bits ^ (sign & ((1 << (self.width - 1)) - 1))) - sign

    def _of_value(self, value: float) -> int:
        return int(self.of(torch.tensor([value], dtype=self.dtype))[0])

    def value(self, key: int) -> Number:
        """The value of `key`, clipped to the keys of non-NaN values."""
        key = min(max(key, self.lowest), self.highest)
        if not self.floating:
            return key
        bits = key if key >= 0 else -key - (1 << (self.width - 1))
        return float(torch.tensor(bits, dtype=self.bits_dtype).view(self.dtype))


@dataclass(frozen=True)
class _Range:
    """Keys `low .. low + 2**width - 1`, which hold `size` elements; `below` elements have smaller keys."""

    low: int
    width: int
    below: int
    size: int

    @property
    def high(self) -> int:
        return self.low + (1 << self.width) - 1

    def bins(self, keys: torch.Tensor, space: _Keys) -> torch.Tensor:
        """Bin 0: below the range; 1 .. 2**16: its sub-ranges by the next 16 bits; then above."""
        shift = self.width - _BITS
        below, above = max(self.low - (1 << shift), space.key_min), min(self.high + 1, space.key_max)
        return (keys.clamp(below, above) >> shift) - ((self.low >> shift) - 1)

    def narrow(self, counts: torch.Tensor, rank: int) -> _Range:
        """The sub-range holding `rank`, from the counts of the 2**16 sub-ranges."""
        shift = self.width - _BITS
        upto = counts.cumsum(0)
        j = int(torch.searchsorted(upto, rank - self.below, right=True))
        before = int(upto[j - 1]) if j else 0
        return _Range(self.low + (j << shift), shift, self.below + before, int(counts[j]))

    def values(self, space: _Keys) -> tuple[Number, Number]:
        return space.value(self.low), space.value(self.high)


@dataclass(frozen=True)
class _Stat:
    """The element at one rank: its value, global index (-1 where not asked for, see
    `_Selection.stats`), and how many elements sort before it (`below`) and not after its value
    (`upto`)."""

    value: Number
    index: int
    below: int
    upto: int


# -- counting passes ------------------------------------------------------------------------------


def _histograms(
    b: ParameterBundle, space: _Keys, ranges: Sequence[_Range]
) -> tuple[list[torch.Tensor], int]:
    """One pass: each range's counts by its next 16 key bits, and the number of NaN."""
    hists: list[torch.Tensor | None] = [None] * len(ranges)
    n_nan = 0

    def visit(c: torch.Tensor, offset: int) -> bool:
        nonlocal n_nan
        nan = _nan_mask(c)
        valid = None if nan is None else nan.logical_not()
        keys = space.of(c)
        for j, r in enumerate(ranges):
            bins = r.bins(keys, space)
            if valid is not None:  # NaN to bin 0, thrown away; a product costs a tenth of masked_fill_
                bins.mul_(valid)
            h = torch.bincount(bins, minlength=(1 << _BITS) + 2)
            prev = hists[j]
            hists[j] = h if prev is None else prev.to(h.device) + h
        if nan is not None:
            n_nan += int(nan.sum())
        return False

    _scan(b, visit)
    empty = torch.zeros((1 << _BITS) + 2, dtype=torch.int64)
    return [(empty if h is None else h.cpu())[1:-1] for h in hists], n_nan


def _gather(
    b: ParameterBundle, bounds: Sequence[tuple[Number, Number]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One pass: for each `(lo, hi)`, the elements with `lo <= x <= hi` and their global indices."""
    found: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in bounds]

    def visit(c: torch.Tensor, offset: int) -> bool:
        for (lo, hi), (values, indices) in zip(bounds, found):
            pos = ((c >= lo) & (c <= hi)).nonzero().squeeze(1)
            if pos.numel():
                values.append(c[pos].to(b._device))
                indices.append((pos + offset).to(b._device))
        return False

    _scan(b, visit)
    empty_values = torch.empty(0, dtype=b._dtype, device=b._device)
    empty_indices = torch.empty(0, dtype=torch.int64, device=b._device)
    return [(torch.cat(v) if v else empty_values, torch.cat(i) if i else empty_indices) for v, i in found]


def _equal(c: torch.Tensor, value: Number) -> torch.Tensor:
    return c.isnan() if isinstance(value, float) and math.isnan(value) else c == value


def _occurrences(b: ParameterBundle, wanted: Sequence[tuple[Number, int]]) -> list[int]:
    """One pass, stopping early: the global index of element `j` (from 0) among those equal to
    `value` (or among the NaN), for each `(value, j)`."""
    seen = [0] * len(wanted)
    found: list[int | None] = [None] * len(wanted)

    def visit(c: torch.Tensor, offset: int) -> bool:
        for w, (value, j) in enumerate(wanted):
            if found[w] is None:
                mask = _equal(c, value)
                count = int(mask.sum())
                if seen[w] + count > j:
                    found[w] = offset + int(mask.nonzero()[j - seen[w]])
                seen[w] += count
        return all(f is not None for f in found)

    if wanted:
        _scan(b, visit)
    return [f for f in found if f is not None]


# -- selection ----------------------------------------------------------------------------------


class _Selection:
    """The bundle's elements in the order of a stable sort, NaN last, queried rank by rank."""

    def __init__(self, b: ParameterBundle) -> None:
        self.b = b
        self.space = _Keys(b._dtype)
        self.n = b._numel
        self.budget = max(_GATHER, self.n // 256)
        self._hists: dict[_Range, torch.Tensor] = {}
        self._sorted: dict[_Range, tuple[torch.Tensor, torch.Tensor]] = {}
        root = _Range(-(1 << (self.space.width - 1)), self.space.width, 0, 0)
        if self.n <= self.budget:  # small: one pass gathers everything
            values, indices = _gather(b, [root.values(self.space)])[0]
            self.root = _Range(root.low, root.width, 0, values.numel())
            self._sorted[self.root] = _stable_sort(values, indices)
        else:
            (hist,), n_nan = _histograms(b, self.space, [root])
            self.root = _Range(root.low, root.width, 0, self.n - n_nan)
            self._hists[self.root] = hist
        self.n_valid = self.root.size  # elements that are not NaN

    def stats(self, ranks: Sequence[int], with_index: bool = True) -> list[_Stat]:
        """The element at each rank (0 <= rank < N) of the stable sort.

        Without `with_index`, the index of an element among many ties (or NaN) is left -1:
        finding it costs one more pass, which `topk` does not need.
        """
        where = self._narrow_all({r: self.root for r in ranks if r < self.n_valid})
        small = [r for r in set(where.values()) if r.size <= self.budget and r not in self._sorted]
        for r, (values, indices) in zip(small, _gather(self.b, [r.values(self.space) for r in small])):
            self._sorted[r] = _stable_sort(values, indices)
        return self._finish(ranks, where, with_index)

    def _narrow_all(self, where: dict[int, _Range]) -> dict[int, _Range]:
        while True:
            wide = {r for r in where.values() if r.size > self.budget and r.width > 0 and r not in self._sorted}
            if not wide:
                return where
            missing = [r for r in wide if r not in self._hists]
            if missing:
                hists, _ = _histograms(self.b, self.space, missing)
                self._hists.update(zip(missing, hists))
            where = {k: (r.narrow(self._hists[r], k) if r in wide else r) for k, r in where.items()}

    def _finish(self, ranks: Sequence[int], where: dict[int, _Range], with_index: bool) -> list[_Stat]:
        stats: dict[int, _Stat] = {}
        counted: list[tuple[int, Number, int, int]] = []  # rank, value, below, upto
        for rank in ranks:
            r = where.get(rank)
            if r is None:  # a NaN
                counted.append((rank, math.nan, self.n_valid, self.n))
            elif r in self._sorted:
                stats[rank] = _stat_in(self._sorted[r], rank, r.below)
            else:  # one value, too many ties to gather
                counted.append((rank, self.space.value(r.low), r.below, r.below + r.size))
        wanted = [(value, rank - below) for rank, value, below, _ in counted]
        indices = _occurrences(self.b, wanted) if with_index else [-1] * len(wanted)
        for (rank, value, below, upto), index in zip(counted, indices):
            stats[rank] = _Stat(value, index, below, upto)
        return [stats[r] for r in ranks]


def _stable_sort(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # `values` come in index order, so a stable sort orders ties by index
    ordered, perm = torch.sort(values, stable=True)
    return ordered, indices[perm]


def _stat_in(candidates: tuple[torch.Tensor, torch.Tensor], rank: int, below: int) -> _Stat:
    values, indices = candidates
    value = values[rank - below]
    first = int(torch.searchsorted(values, value.reshape(1)))
    last = int(torch.searchsorted(values, value.reshape(1), right=True))
    return _Stat(value.item(), int(indices[rank - below]), below + first, below + last)


# -- differentiable results ---------------------------------------------------------------------


def _take_by_chunks(b: ParameterBundle, i: int, local: torch.Tensor) -> torch.Tensor | None:
    # For an on-demand bundle when no gradient is wanted: make only the chunks that hold the
    # wanted elements, not the whole tensor. None where chunks cannot be made alone.
    size, n = _CHUNK, b._shapes[i].numel()
    local = local.cpu()
    chunk_of = torch.div(local, size, rounding_mode="floor")
    taken = torch.empty(local.numel(), dtype=b._dtype, device=b._device)
    for c in torch.unique(chunk_of).tolist():
        start = c * size
        with torch.no_grad():
            chunk = b._flat_range(i, start, min(start + size, n))
        if chunk is None:
            return None
        mask = chunk_of == c
        taken[mask.to(b._device)] = _cast(chunk[(local[mask] - start).to(chunk.device)], b._dtype).to(b._device)
    return taken


def _take(b: ParameterBundle, i: int, local: torch.Tensor) -> torch.Tensor:
    """Tensor i's elements at the flat indices `local`, differentiable, in the bundle's dtype."""
    if b._tensors is None and not (torch.is_grad_enabled() and b.requires_grad):
        by_chunks = _take_by_chunks(b, i, local)
        if by_chunks is not None:
            return by_chunks
    t = b._tensor(i)
    local = local.to(t.device)
    taken = t.reshape(1)[local] if t.dim() == 0 else t[torch.unravel_index(local, t.shape)]
    return _cast(taken, b._dtype).to(b._device)


class _ZeroGrads(torch.autograd.Function):
    """`result` itself, linked to `tensors`: each gets a zero gradient from it in backward."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors]
        return result.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (grad, *[torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs])


def _connect(result: torch.Tensor, b: ParameterBundle) -> torch.Tensor:
    """`result`, linked to the tensors as the concatenation's would be.

    The concatenation's backward gives every tensor that requires grad a gradient, zeros for
    those none of whose elements were picked; optimizers skip a None one (no weight decay).
    """
    # (complex results require grad too; integer and bool ones never do)
    if not (torch.is_grad_enabled() and b.requires_grad and (result.dtype.is_floating_point or result.dtype.is_complex)):
        return result
    compiling = torch.compiler.is_compiling()  # (where transformed() is True as well)
    if transformed() and not compiling:
        return result  # (_ZeroGrads has no setup_context or jvp for torch.func / forward AD)
    # Held tensors are linked themselves; a bundle computed on demand through the tensors it is
    # computed from (computing its own again would cost the op twice).
    trained = _trained_sources(b) if b._tensors is None else [t for t in b._tensors if t.requires_grad]
    if trained and compiling:
        # The compiled graph drops the gradients a Function gives inputs its forward does not
        # read; an empty slice of each tensor, subtracted as 0, gives it its zeros.
        return result - sum(_empty_part(t).sum().to(result.device, result.dtype) for t in trained)
    if trained:
        linked: torch.Tensor = _ZeroGrads.apply(result, *trained)  # type: ignore[no-untyped-call]
        return linked
    # Computed on demand by a path that does not say from what (a strategy's copy of one): one
    # link makes the result require grad, as the concatenation's does (subtracting 0.0
    # changes nothing).
    if result.requires_grad:
        return result
    for i in range(len(b.names)):
        nothing = _no_elements(b, i)
        if nothing is not None:
            return result - nothing.sum().to(device=result.device, dtype=result.dtype)
    return result


def _trained_sources(b: ParameterBundle) -> list[torch.Tensor]:
    """The tensors requiring grad that an on-demand bundle is computed from, through autograd.

    Only operands that require grad carry a gradient back (`b * (c > 0)` gives `c` none), so
    the walk follows those alone, down to held tensors and plain tensor operands.
    """
    found: dict[int, torch.Tensor] = {}

    def walk(x: ParameterBundle) -> bool:
        if x._expr is None:
            return False
        _, args, kwargs, _ = x._expr
        for a in (*args, *kwargs.values()):
            for item in a if isinstance(a, (list, tuple)) else (a,):
                if not (isinstance(item, torch.Tensor) and item.requires_grad):
                    continue
                if not isinstance(item, ParameterBundle):
                    found[id(item)] = item
                elif item._tensors is not None:
                    found.update((id(t), t) for t in item._tensors if t.requires_grad)
                elif not walk(item):
                    return False
        return True

    return list(found.values()) if walk(b) else []


def _no_elements(b: ParameterBundle, i: int) -> torch.Tensor | None:
    # an empty slice of tensor i if it has elements and requires grad: it links a result to it
    t = b._tensor(i) if b._shapes[i].numel() else None
    if t is None or not t.requires_grad:
        return None
    return _empty_part(t)


def _empty_part(t: torch.Tensor) -> torch.Tensor:
    # its backward gives t a zero gradient
    return t.reshape(1)[:0] if t.dim() == 0 else t.narrow(0, 0, 0)


def _elements(b: ParameterBundle, index: torch.Tensor) -> torch.Tensor:
    """The elements at the global indices `index`, as a differentiable 1-D tensor in the bundle's dtype."""
    order = torch.argsort(index.cpu())
    ascending = index.cpu()[order]
    owner = torch.searchsorted(torch.tensor(b._offsets[1:]), ascending, right=True)
    pieces, start = [], 0
    for i, n in enumerate(torch.bincount(owner, minlength=len(b.names)).tolist()):
        if n:
            pieces.append(_take(b, i, ascending[start : start + n] - b._offsets[i]))
        start += n
    if not pieces:
        return _connect(torch.empty(0, dtype=b._dtype, device=b._device), b)
    return _connect(torch.cat(pieces)[torch.argsort(order).to(b._device)], b)


class _EvenShare(torch.autograd.Function):
    """-0.0, whose gradient spreads `grad / ties` over the elements of `t` equal to `value`.

    `t` itself is not saved: `recompute()` gives it again in backward, so that a bundle
    computed on demand does not keep every tensor alive until then.
    """

    @staticmethod
    def forward(
        ctx: Any, t: torch.Tensor, value: torch.Tensor, ties: int, recompute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        ctx.value, ctx.ties, ctx.recompute, ctx.version = value, ties, recompute, t._version
        return torch.full((), -0.0, dtype=value.dtype, device=value.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        with torch.no_grad():
            t = ctx.recompute()
        if t._version != ctx.version:  # what saving t would have caught
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                "operation: a tensor of the bundle whose median is differentiated changed since."
            )
        value = ctx.value.to(t.device)
        mask = _equal(_cast(t, value.dtype), float(value))
        return (mask * (grad.to(t.device) / ctx.ties)).to(t.dtype), None, None, None


def _evenly(b: ParameterBundle, stat: _Stat) -> torch.Tensor:
    """The 0-d value of `stat`, with the gradient torch's median gives: shared by all its ties."""
    value = _elements(b, torch.tensor([stat.index])).detach().reshape(())
    if not (torch.is_grad_enabled() and b.requires_grad):
        return value
    result = value
    for i in range(len(b.names)):
        share = _share(b, i, value, stat.upto - stat.below)
        if share is not None:
            result = result + share.to(b._device)
    linked: torch.Tensor = with_empty_grads(result, [b])  # (_share skips empty tensors)
    return linked


def _share(b: ParameterBundle, i: int, value: torch.Tensor, ties: int) -> torch.Tensor | None:
    t = b._tensor(i) if b._shapes[i].numel() else None
    if t is None or not t.requires_grad:
        return None
    share: torch.Tensor = _EvenShare.apply(t, value, ties, partial(b._tensor, i))  # type: ignore[no-untyped-call]
    return share



"""In-place ops: write through the bundle into its real tensors.

Each tensor is updated in its own dtype, exactly as the loop `for t in b.tensors: t.op_(...)`
would, with one `torch._foreach_*` call where torch has the kernel (not for an operand computed
on demand, which is made a tensor at a time, see `_OnDemand`). Everything that could
fail for a dtype is checked before the first write (a dry run on each kind of tensor's first
two elements, and on meta tensors for the shapes, see `_check_writable`), so a failing op leaves
every tensor as it was; only failures that depend on other values (an integer division by
zero) can come after earlier tensors were written.
Autograd's rules are torch's: an in-place op on a leaf that requires grad needs
`torch.no_grad()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch

from modtensor._bundle import ParameterBundle, is_bundle
from modtensor._dispatch import NOT_HANDLED, autograd_records, func_name
from modtensor._indexing import _locate, as_position
from modtensor._pointwise import BINARY_OPS, UNARY_OPS, _piece_getter, check_same_structure
from modtensor._reduce_common import _LOW_PRECISION

__all__ = ["FOREACH_FUNCTIONS", "INPLACE_FUNCTIONS"]

_T = torch.Tensor


def _targets(b: ParameterBundle) -> list[torch.Tensor]:
    # The tensors as the ops write them: a 0-d one as its (1,) view, dimensioned as in the
    # concatenation, so that a (1,) operand broadcasts into it and types promote as there.
    has_0d = b._plans.get("has 0-d")
    if has_0d is None:  # most models have none: then no pass over the tensors at each op
        has_0d = b._plans["has 0-d"] = not all(b._shapes)
    return [t if t.dim() else t.view(1) for t in b.tensors] if has_0d else list(b.tensors)


class _OnDemand:
    """Tensor i's operand from a bundle computed on demand, made when it is written: made all
    before the writes (as a foreach kernel takes them), they would hold the model's size."""

    def __init__(self, value: ParameterBundle) -> None:
        self.value = value
        self.dtypes = value._dtypes

    def __len__(self) -> int:
        return len(self.dtypes)

    def __getitem__(self, i: int) -> torch.Tensor:
        piece = self.value._tensor(i)
        return piece if piece.dim() else piece.reshape(1)  # as _operand_pieces gives it


Pieces = Union[list[Any], _OnDemand]


def _storage(t: torch.Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.numel() else None


def _written_apart(b: ParameterBundle, operand: ParameterBundle) -> bool:
    """Whether writing tensor i of `b` leaves every other tensor's operand as it was, so that
    the on-demand `operand` may be computed tensor by tensor between the writes, with the
    values it has before any. Told by storages: tensor i of a bundle the operand reads may
    share one with tensor i of `b` alone, a plain tensor with none of them."""
    targets = [_storage(t) for t in b.tensors]
    where = {s: i for i, s in enumerate(targets) if s is not None}
    if len(where) < sum(s is not None for s in targets):  # views of one another
        return False

    def apart(x: ParameterBundle) -> bool:
        if x._expr is None:  # no record of what it reads
            return False
        _, args, kwargs, _ = x._expr
        for a in (*args, *kwargs.values()):
            for item in a if isinstance(a, (list, tuple)) else (a,):
                if is_bundle(item):
                    if item._tensors is None:
                        if not apart(item):
                            return False
                    elif any(
                        where.get(s, i) != i for i, s in enumerate(map(_storage, item._tensors)) if s is not None
                    ):
                        return False
                elif isinstance(item, torch.Tensor) and _storage(item) in where:
                    return False
        return True

    return apart(operand)


def _operand_pieces(name: str, b: ParameterBundle, value: Any) -> Pieces | None:
    """Tensor i's operand for each i: numbers and 0-d tensors as they are (None), bundles and
    flat tensors split, a `(1,)` tensor repeated (a foreach kernel takes 0-d tensors only)."""
    if is_bundle(value) and value._tensors is None and value._compute is not None:
        check_same_structure(name, b, value)
        if _written_apart(b, value):
            return _OnDemand(value)
    getter = _piece_getter(value, b, name, cast=False)
    if getter is NOT_HANDLED:
        raise ValueError(
            f"{name}: cannot write a tensor of shape {tuple(value.shape)} into {b.describe()}; "
            f"use a scalar, a 0-d tensor, a flat ({b._numel},) tensor or a bundle of the same structure."
        )
    if getter is None:
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            return [value] * len(b.names)
        return None
    # A 0-d tensor's piece is (1,) as its target is (see `_targets`): a 0-d piece would take
    # no part in type promotion (a float32 piece would be rounded into a bfloat16 target
    # before the op), where in the loop and in the concatenation it does.
    return [p if p.dim() else p.reshape(1) for p in map(getter, range(len(b.names)))]


def _on_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _sample(x: Any) -> Any:
    # A copy of x's first two elements (fewer where x has fewer), keeping whether x is 0-d:
    # the kind of operand torch promotes types by. Its values are ones the op really meets.
    # Two, not one: torch fills a one-element CPU tensor without its overflow check
    # (`fill_(1e6)` of float16), so a one-element sample would pass where the tensor fails.
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach()
    if _overlaps(x):  # two elements sharing memory, as x's do: torch refuses to write such a tensor
        return x[(0,) * x.dim()].clone().expand(2)
    return x.clone() if x.dim() == 0 else x.reshape(-1)[: min(2, x.numel())].clone()


def _overlaps(t: torch.Tensor) -> bool:
    # Whether elements of t share memory (an expanded tensor): torch's in-place ops but fill_
    # and zero_ refuse to write such a tensor. A stride of 0 over more than one element is
    # what torch itself tells them by.
    return t.numel() > 1 and any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


def _overlapping(b: ParameterBundle) -> frozenset[int]:
    # The bundle's tensors whose elements share memory, found once per bundle (most have none).
    found: frozenset[int] | None = b._plans.get("overlapping")
    if found is None:
        found = b._plans["overlapping"] = frozenset(i for i, t in enumerate(b.tensors) if _overlaps(t))
    return found


def _in_context(e: BaseException, name: str, where: str) -> BaseException:
    # torch's exception class, so `except NotImplementedError` still works, with the context
    message = f"{name}: {e} ({where})"
    try:
        return type(e)(message)
    except Exception:  # an exception class that takes other arguments
        return RuntimeError(message)


def _unwritten(b: ParameterBundle, i: int) -> str:
    return f"tensor {b.names[i]!r} of {b.describe()}; nothing was written"


def _operands_of(operands: list[Pieces | Any], i: int) -> list[Any]:
    return [operand[i] if isinstance(operand, (list, _OnDemand)) else operand for operand in operands]


def _write(
    name: str,
    b: ParameterBundle,
    operands: list[Pieces | Any],
    dry_run: Callable[..., Any] | None,
    write: Callable[[], Any],
) -> None:
    """`write()` once `_check_writable` passed; an exception it raises names the bundle."""
    _check_writable(name, b, operands, dry_run)
    try:
        write()
    except Exception as e:
        # Every kind of tensor but the first passed its dry run: the write failed on the first
        # tensor, before writing anything, or on a value other than its first two.
        first = dry_run is not None and _first_failure(dry_run, b, operands)
        where = _unwritten(b, 0) if first else (
            f"in {b.describe()}; the tensors before the one it failed on, if any, were written"
        )
        raise _in_context(e, name, where) from None


def _check_writable(
    name: str, b: ParameterBundle, operands: list[Pieces | Any], dry_run: Callable[..., Any] | None = None
) -> None:
    """Raise before any write: torch's autograd rule for leaves, and the op's own checks.

    `dry_run(tensor, *operands)`, where given, is the op on one tensor. It runs, for one
    tensor of each kind (dtype, and whether it or an operand is 0-d) but the first tensor's,
    on a copy of that tensor's first two elements, so that torch itself says whether the op
    exists for those dtypes and casts (`lerp_` or `frac_` of integers, shifts of floats,
    `mul_(0.5)` of integers, `fill_(1e6)` of float16) and raises its own exception; then on
    meta stand-ins of the whole tensors, for the shapes. So a failing op has written nothing,
    except where a value other than a tensor's first two makes it fail (an integer division
    by zero).
    """
    if autograd_records():  # torch's rule
        # a bundle of DTensor parameters holds views of them: the parameters are the leaves
        holders = b.tensors if b._dist is None or b._dist.sources is None else b._dist.sources
        leaves = [n for n, t in zip(b.names, holders) if t.is_leaf and t.requires_grad]
        if leaves:
            raise RuntimeError(
                f"{name}: a leaf Variable that requires grad is being used in an in-place operation "
                f"({leaves[:3]}{' ...' if len(leaves) > 3 else ''} of {b.describe()}). Wrap the "
                "update in `with torch.no_grad():`, as optimizers do."
            )
    if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
        # torch's rule for inference tensors: the dry runs' copies are not inference tensors,
        # and torch's foreach kernels write the first tensor before they refuse the second.
        frozen = [b.names[i] for i in b._apart() if b.tensors[i].is_inference()]
        if frozen:
            raise RuntimeError(
                f"{name}: Inplace update to inference tensor outside InferenceMode is not allowed "
                f"({frozen[:3]}{' ...' if len(frozen) > 3 else ''} of {b.describe()}; nothing was "
                "written). Write them inside `torch.inference_mode()`, or bundle clones of them."
            )
    if dry_run is None or torch.compiler.is_compiling():
        # torch.compile runs the whole graph on fake tensors before it writes anything, so
        # torch's own checks fail before any write.
        return
    # What the op accepts depends on the dtypes, the devices and which operands are 0-d, not
    # on values: one check per distinct kind of (tensor, operand) pair, the first of each kind.
    tensors = _targets(b)
    kinds: list[Any] = list(zip([t.dtype for t in tensors], [t.dim() == 0 for t in tensors]))
    overlapping = _overlapping(b)
    if overlapping:  # its own dry run: the foreach kernel writes the tensors before it
        kinds = list(zip(kinds, [i in overlapping for i in range(len(tensors))]))
    if not b._on_one_device:
        kinds = list(zip(kinds, [t.device for t in tensors]))
    for operand in operands:
        if isinstance(operand, _OnDemand):  # its pieces are never 0-d (see _operand_pieces)
            kinds = list(zip(kinds, operand.dtypes, [False] * len(operand)))
        elif isinstance(operand, list):  # a scalar or a single tensor is the same for every tensor
            kinds = list(zip(kinds, [o.dtype for o in operand], [o.dim() == 0 for o in operand]))
    for i in (kinds.index(kind) for kind in dict.fromkeys(kinds)):
        # The first tensor's kind needs no dry run: if the op fails for it, it fails on the
        # first tensor, before any write (a dry run costs 10 us on a small layer, lerp_'s on
        # meta 150 us); `_write` then names the bundle.
        if not i:
            continue
        failure = _dry_run_failure(dry_run, tensors[i], _operands_of(operands, i))
        if failure is not None:
            # The loop would fail at the first tensor if that fails too, with its exception.
            first = _first_failure(dry_run, b, operands)
            at = 0 if first is not None else i
            raise _in_context(first or failure, name, _unwritten(b, at)) from None


def _first_failure(dry_run: Callable[..., Any], b: ParameterBundle, operands: list[Pieces | Any]) -> Exception | None:
    """What the dry run raises on the bundle's first tensor (None without tensors)."""
    return _dry_run_failure(dry_run, _targets(b)[0], _operands_of(operands, 0)) if b.tensors else None


def _dry_run_failure(dry_run: Callable[..., Any], t: torch.Tensor, operands: list[Any]) -> Exception | None:
    """What `dry_run` on t raises: on a copy of its first two elements, then on meta stand-ins."""
    try:
        with torch.no_grad():
            dry_run(_sample(t), *[_sample(o) for o in operands])
    except Exception as e:
        return e
    try:
        dry_run(_on_meta(t), *[_on_meta(o) for o in operands])
    except NotImplementedError:  # no meta kernel: the run on the sample is all there is
        pass
    except Exception as e:
        return e
    return None


def _binary(foreach: Callable[..., Any], method: Callable[..., Any]) -> Callable[..., Any]:
    """`b.op_(other, **kw)` for mul_, div_, add_, sub_ and the like."""

    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        b, *rest = args
        if not is_bundle(b) or len(rest) != 1:
            return NOT_HANDLED
        name = func_name(func)
        other = rest[0]
        pieces = _operand_pieces(name, b, other)
        tensors = _targets(b)

        def write() -> None:
            each = kwargs or isinstance(pieces, _OnDemand)
            looped = range(len(tensors)) if each else _foreach_differs(foreach, tensors, other, pieces)
            if len(looped) < len(tensors):  # a scalar, or one operand per tensor
                by_method = set(looped)
                rest = [i for i in range(len(tensors)) if i not in by_method]
                foreach([tensors[i] for i in rest], other if pieces is None else [pieces[i] for i in rest])
            for i in looped:
                method(tensors[i], other if pieces is None else pieces[i], **kwargs)

        _write(name, b, [pieces if pieces is not None else other], lambda t, o: method(t, o, **kwargs), write)
        return b

    return handler


_NUMBERS_ONLY = (torch._foreach_pow_, torch._foreach_sub_, torch._foreach_clamp_min_, torch._foreach_clamp_max_)


def _foreach_differs(
    foreach: Callable[..., Any], tensors: list[torch.Tensor], other: Any, pieces: Pieces | None
) -> range | list[int]:
    """The tensors on which `foreach(tensors, other)` would write other values than the loop
    of the method: those take the method.

    The foreach functions without a Tensor overload take a 0-d tensor operand as a number:
    `torch._foreach_pow_` (an int 3 is computed by multiplications, the tensor 3 by the pow
    kernel, whose bfloat16 results differ), `_foreach_clamp_min_` and `_foreach_clamp_max_`
    (whose number kernels do not exist for bool, where the methods' tensor ones do) and
    `_foreach_sub_`. On the CPU a foreach kernel rounds a number to a 16-bit tensor's dtype
    before it multiplies, the method does not (`mul_(0.7)` or `mul_(257)` of bfloat16; an int
    that the dtype holds exactly is safe).
    """
    if pieces is None and isinstance(other, torch.Tensor) and foreach in _NUMBERS_ONLY:
        return range(len(tensors))
    if pieces is None and isinstance(other, (int, float)) and not isinstance(other, bool):
        return [
            i for i, t in enumerate(tensors)
            if t.dtype in _LOW_PRECISION and t.device.type == "cpu"
            and (isinstance(other, float) or abs(other) > 2 / torch.finfo(t.dtype).eps)
        ]
    return []


def _unary(foreach: Callable[..., Any]) -> Callable[..., Any]:
    """`b.op_()` for neg_, abs_, sqrt_, zero_."""

    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        b = args[0]
        if not is_bundle(b) or len(args) != 1 or kwargs:
            return NOT_HANDLED
        tensors = list(b.tensors)
        _write(func_name(func), b, [], lambda t: foreach([t]), lambda: tensors and foreach(tensors))
        return b

    return handler


def _per_tensor(method: Callable[..., Any]) -> Callable[..., Any]:
    """Any in-place method with bundle-or-scalar operands, applied tensor by tensor."""

    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        b, *rest = args
        if not is_bundle(b):
            return NOT_HANDLED
        name = func_name(func)
        arg_pieces = [_operand_pieces(name, b, a) for a in rest]
        kwarg_pieces = {k: _operand_pieces(name, b, v) for k, v in kwargs.items()}
        values = [*rest, *kwargs.values()]
        pieces = [*arg_pieces, *kwarg_pieces.values()]
        def dry_run(t: torch.Tensor, *operands: Any) -> None:
            method(t, *operands[: len(rest)], **dict(zip(kwargs, operands[len(rest) :])))

        def write() -> None:
            for i, t in enumerate(_targets(b)):
                method(
                    t,
                    *[p[i] if p is not None else a for p, a in zip(arg_pieces, rest)],
                    **{k: (p[i] if p is not None else kwargs[k]) for k, p in kwarg_pieces.items()},
                )

        _write(name, b, [p if p is not None else v for p, v in zip(pieces, values)], dry_run, write)
        return b

    return handler


def _copy(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`b.copy_(src)`: src a bundle of the same structure, a flat (N,) tensor, or a 0-d or
    one-element tensor, which fills every element (torch's copy_ broadcasts it)."""
    b, src = args[0], args[1]
    name = func_name(func)
    if not is_bundle(b):
        return NOT_HANDLED
    if not (is_bundle(src) or (isinstance(src, torch.Tensor) and src.dim() <= 1)):
        raise TypeError(
            f"{name}: copy from a bundle of the same structure, a flat ({b._numel},) tensor or a "
            f"one-element tensor into {b.describe()}; got {type(src).__name__} of shape "
            f"{tuple(getattr(src, 'shape', ()))}."
        )
    if not is_bundle(src) and src.dim() == 0:
        src = src.reshape(1)  # split as a one-element operand: the same (1,) for every tensor
    pieces = _operand_pieces(name, b, src)
    assert pieces is not None
    # The leaf rule; copy_ casts every dtype into every other, but refuses expanded tensors.
    _check_writable(name, b, [pieces], (lambda t, o: t.copy_(o)) if _overlapping(b) else None)
    if isinstance(pieces, _OnDemand) or (torch.is_grad_enabled() and any(p.requires_grad for p in pieces)):
        # torch._foreach_copy_ has no derivative: it would give each tensor a grad_fn that
        # fails in backward (and an integer tensor requires_grad). The loop's copy_ records one.
        for i, t in enumerate(_targets(b)):
            t.copy_(pieces[i], **kwargs)
    elif b.tensors:
        torch._foreach_copy_(_targets(b), pieces, **kwargs)
    return b


_masked_fill = _per_tensor(_T.masked_fill_)
_lerp_per_tensor = _per_tensor(_T.lerp_)


def _lerp(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`b.lerp_(end, weight)`: one `torch._foreach_lerp_` for a number weight (an EMA step)."""
    b = args[0]
    weight = args[2] if len(args) == 3 else None
    if not is_bundle(b) or kwargs or not isinstance(weight, (int, float)) or isinstance(weight, bool):
        return _lerp_per_tensor(func, types, args, kwargs)
    name = func_name(func)
    pieces = _operand_pieces(name, b, args[1])
    if pieces is None:  # a number `end`: torch's lerp_ takes tensors only, let it say so
        return _lerp_per_tensor(func, types, args, kwargs)
    # torch's lerp_ takes `end` in the tensor's own dtype only: the dry run would say so in
    # torch's words; this says what to do (an EMA buffer of a model that mixes dtypes).
    end = args[1]
    ends = end._dtypes if is_bundle(end) else (end.dtype,) * len(b._dtypes)
    if ends != b._dtypes:
        i = next(i for i, (d, e) in enumerate(zip(b._dtypes, ends)) if d != e)
        # a float32 EMA of a bfloat16 model: one cast of `end` fits every tensor
        cast = f"`end.to({b._dtypes[i]})`" if len(set(b._dtypes)) == 1 else "`end.derive([...])`"
        raise RuntimeError(
            f"{name}: expected dtype {b._dtypes[i]} for `end` but got dtype {ends[i]} (tensor "
            f"{b.names[i]!r} of {b.describe()}; nothing was written). lerp_ writes each tensor "
            f"in its own dtype: give `end` the same dtypes ({cast}, or both bundles from "
            "models of one dtype)."
        )
    tensors = _targets(b)

    def write() -> None:
        if isinstance(pieces, _OnDemand):
            for i, t in enumerate(tensors):
                t.lerp_(pieces[i], weight)
        elif tensors:
            torch._foreach_lerp_(tensors, pieces, weight)

    _write(name, b, [pieces, weight], _T.lerp_, write)
    return b


def _setitem(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`b[mask] = value`, `b[i] = value`: write into the selected elements of the tensors."""
    b, index, value = args
    if not is_bundle(b):
        return NOT_HANDLED
    name = "ParameterBundle.__setitem__"
    index = as_position(index)  # `b[i] = v` reads its index as `b[i]` does
    is_position = isinstance(index, int) and not isinstance(index, bool)
    is_mask = (is_bundle(index) or isinstance(index, torch.Tensor)) and index.dtype == torch.bool
    # The index first: for a slice, advice about the value would lead to this error next.
    if not is_position and (
        not is_mask or not (is_bundle(index) or (index.dim() == 1 and index.shape[0] == b._numel))
    ):
        raise TypeError(
            f"{name}: write-through assignment takes an int or a boolean mask (a bundle of the "
            f"same structure or a flat ({b._numel},) bool tensor), got {type(index).__name__}. "
            "Write into the tensors themselves for other indices."
        )
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name}: assign a scalar or a one-element tensor into {b.describe()}.")
    if is_position:
        i, coords = _locate(b, index)
        _check_writable(name, b, [value])  # the leaf rule: one tensor is written, or none
        try:
            b._tensor(i)[coords] = value
        except Exception as e:  # torch's message alone names neither the bundle nor the tensor
            raise _in_context(e, name, _unwritten(b, i)) from None
        return None
    if isinstance(value, torch.Tensor):
        # masked_fill_ takes a 0-d value only; torch's `c[mask] = v` takes any one-element v
        value = value.reshape(())
    _masked_fill(func, types, (b, index, value), {})
    return None


def _requires_grad_(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    b = args[0]
    requires_grad = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
    # torch's two refusals, checked on every tensor before any flag changes
    for n, t in zip(b.names, b.tensors):
        if requires_grad and not (t.is_floating_point() or t.is_complex()):
            raise RuntimeError(
                f"{func_name(func)}: only Tensors of floating point dtype can require gradients, "
                f"and tensor {n!r} of {b.describe()} is {t.dtype} (nothing was changed). Bundle "
                "the floating point tensors only, e.g. `mt.bundle(model, include=...)`."
            )
        if not requires_grad and t.requires_grad and not t.is_leaf:
            raise RuntimeError(
                f"{func_name(func)}: you can only change requires_grad flags of leaf variables, "
                f"and tensor {n!r} of {b.describe()} is computed (nothing was changed). Use "
                "`b.detach()` for a bundle that needs no gradient."
            )
    for t in b.tensors:
        t.requires_grad_(requires_grad)
    return b


# Ops with a torch._foreach_* kernel, then every elementwise op with an in-place method.
INPLACE_FUNCTIONS: dict[str, tuple[tuple[Any, ...], Callable[..., Any]]] = {
    "mul_": ((_T.mul_, _T.__imul__), _binary(torch._foreach_mul_, _T.mul_)),
    "div_": ((_T.div_, _T.__itruediv__), _binary(torch._foreach_div_, _T.div_)),
    "add_": ((_T.add_, _T.__iadd__), _binary(torch._foreach_add_, _T.add_)),
    "sub_": ((_T.sub_, _T.__isub__), _binary(torch._foreach_sub_, _T.sub_)),
    "pow_": ((_T.pow_, _T.__ipow__), _binary(torch._foreach_pow_, _T.pow_)),
    "clamp_min_": ((_T.clamp_min_,), _binary(torch._foreach_clamp_min_, _T.clamp_min_)),
    "clamp_max_": ((_T.clamp_max_,), _binary(torch._foreach_clamp_max_, _T.clamp_max_)),
    "fill_": ((_T.fill_,), _per_tensor(_T.fill_)),
    "lerp_": ((_T.lerp_,), _lerp),
    "addcmul_": ((_T.addcmul_,), _per_tensor(_T.addcmul_)),
    "addcdiv_": ((_T.addcdiv_,), _per_tensor(_T.addcdiv_)),
    "clamp_": ((_T.clamp_, _T.clip_), _per_tensor(_T.clamp_)),
    "masked_fill_": ((_T.masked_fill_,), _masked_fill),
    "neg_": ((_T.neg_,), _unary(torch._foreach_neg_)),
    "abs_": ((_T.abs_,), _unary(torch._foreach_abs_)),
    "sqrt_": ((_T.sqrt_,), _unary(torch._foreach_sqrt_)),
    "zero_": ((_T.zero_,), _unary(torch._foreach_zero_)),
    "copy_": ((_T.copy_,), _copy),
    "__setitem__": ((_T.__setitem__,), _setitem),
    "requires_grad_": ((_T.requires_grad_,), _requires_grad_),
}
# Augmented assignment (`b //= 2`, `b &= m`...) without a foreach kernel of its own.
_AUGMENTED: dict[str, Callable[..., Any]] = {
    "__idiv__": _T.div_, "__ifloordiv__": _T.floor_divide_, "__imod__": _T.remainder_,
    "__iand__": _T.bitwise_and_, "__ior__": _T.bitwise_or_, "__ixor__": _T.bitwise_xor_,
    "__ilshift__": _T.bitwise_left_shift_, "__irshift__": _T.bitwise_right_shift_,
}
for _dunder, _target in _AUGMENTED.items():
    INPLACE_FUNCTIONS[_dunder] = ((getattr(_T, _dunder),), _per_tensor(_target))
# (an entry's other spellings, such as clamp_'s clip_, are registered with it already)
_LISTED = {f for funcs, _ in INPLACE_FUNCTIONS.values() for f in funcs}
for _name in UNARY_OPS + BINARY_OPS:
    _inplace_method: Callable[..., Any] | None = getattr(_T, _name + "_", None)
    if _inplace_method is not None and _name + "_" not in INPLACE_FUNCTIONS and _inplace_method not in _LISTED:
        INPLACE_FUNCTIONS[_name + "_"] = ((_inplace_method,), _per_tensor(_inplace_method))

# torch's function spelling of each (`torch.exp_(b)`, `torch.clamp_(b, 0, 1)`): the same op,
# with the bundle as its first argument, so the same handler.
# (of each method spelling of an entry: `torch.clip_` with clamp_'s)
for _name, (_funcs, _handler) in list(INPLACE_FUNCTIONS.items()):
    _names = [f.__name__ for f in _funcs if not f.__name__.startswith("__")]
    _functions = tuple(getattr(torch, n) for n in _names if getattr(torch, n, None) is not None)
    if _functions:
        INPLACE_FUNCTIONS[_name] = ((*_funcs, *_functions), _handler)

for _funcs, _handler in INPLACE_FUNCTIONS.values():
    ParameterBundle.implements(_funcs)(_handler)


# -- torch's foreach functions given bundles in their lists ----------------------------------
# `torch.nn.utils.clip_grad_norm_(b, foreach=True)` takes the bundle as one parameter, and
# hands `[b.grad]` to `torch._foreach_norm` and `torch._foreach_mul_`. A foreach function is
# defined element by element, so a bundle there is its own op: its norm, or its in-place op,
# which writes each of its tensors (and writes none where it fails). As torch's per-tensor
# path, an element that fails leaves the elements before it written.


def _element(a: Any, i: int) -> Any:
    # element i of a list operand (other tensors, scalars); a scalar or a tensor applies to all
    return a[i] if isinstance(a, (list, tuple)) else a


def _foreach(method: Callable[..., Any]) -> Callable[..., Any]:
    def handler(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors, *rest = args
        if not isinstance(tensors, (list, tuple)):
            return NOT_HANDLED
        if func in _NUMBERS_ONLY:  # a 0-d tensor operand is a number to these (_foreach_differs)
            rest = [a.item() if isinstance(a, torch.Tensor) else a for a in rest]
        for i, x in enumerate(tensors):
            method(x, *(_element(a, i) for a in rest), **{k: _element(v, i) for k, v in kwargs.items()})
        return list(tensors) if isinstance(tensors, list) else tuple(tensors)  # as torch's does

    return handler


def _foreach_norm(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`torch._foreach_norm(tensors, ord=2, dtype=None)`: each element's vector norm."""
    tensors, *rest = args
    if not isinstance(tensors, (list, tuple)):
        return NOT_HANDLED
    return [torch.linalg.vector_norm(x, *rest, **kwargs) for x in tensors]


# Those whose operands are the method's, element by element (not addcmul_'s `value` keyword).
FOREACH_FUNCTIONS: dict[str, tuple[tuple[Any, ...], Callable[..., Any]]] = {
    "_foreach_norm": ((torch._foreach_norm,), _foreach_norm),
    **{
        "_foreach_" + _name: ((getattr(torch, "_foreach_" + _name),), _foreach(getattr(_T, _name)))
        for _name in INPLACE_FUNCTIONS
        if hasattr(torch, "_foreach_" + _name) and _name not in ("addcmul_", "addcdiv_")
    },
}
for _funcs, _handler in FOREACH_FUNCTIONS.values():
    ParameterBundle.implements(_funcs)(_handler)

"""The dispatch table and `__torch_function__`: where every torch call on a bundle lands.

Each `DispatchTensor` subclass owns one table, keyed by `(torch function, strategy name)`.
The strategy `"*"` marks a handler that serves every strategy (it asks the bundle's strategy
what to do with the partials itself). Anything not in the table falls back to the explicit
concatenation, with a `MaterializationWarning`, or raises under `fallback("error")`.
"""

from __future__ import annotations

import contextvars
import inspect
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch.overrides import resolve_name

from modtensor._errors import MaterializationWarning, UnsupportedOperationError

__all__ = [
    "ANY_STRATEGY", "BUNDLE_TYPES", "DispatchTensor", "Handler", "LANE_CALLS", "NOT_HANDLED",
    "TINY_NUMEL", "TracedDispatch", "autograd_records", "concatenated", "copy_is_cheap", "dispatch", "fallback",
    "find_bundles", "func_name", "is_tiny", "materialized", "remember_direct", "remember_elementwise",
]

Handler = Callable[[Callable[..., Any], tuple[type, ...], tuple[Any, ...], dict[str, Any]], Any]
H = TypeVar("H", bound=Handler)
FallbackMode = Literal["materialize", "error"]

ANY_STRATEGY = "*"

# A handler returns this when the call is outside what it can do exactly (an unusual
# overload, a broadcast to more dimensions): the call then takes the fallback path.
NOT_HANDLED: Any = NotImplemented

_FALLBACK: contextvars.ContextVar[FallbackMode] = contextvars.ContextVar(
    "modtensor_fallback", default="materialize"
)

# Metadata queries answered by the wrapper itself: it carries the concatenation's shape,
# dtype and device, and has no storage for anything else to read.
_T = torch.Tensor
PASSTHROUGH: frozenset[Any] = frozenset(
    {
        _T.__hash__,
        _T.dim,
        _T.ndimension,
        _T.numel,
        _T.nelement,
        _T.size,
        _T.stride,
        _T.storage_offset,
        _T.element_size,
        _T.get_device,
        _T.is_floating_point,
        _T.is_complex,
        _T.is_signed,
        _T.is_contiguous,
        _T.__len__,
        _T.dim_order,
        _T.is_conj,
        _T.is_neg,
        _T.is_same_size,
        torch.numel,
        torch.is_floating_point,
        torch.is_complex,
        torch.result_type,
        torch.is_same_size,
    }
    | {
        getattr(_T, name).__get__
        for name in (
            "shape", "dtype", "device", "layout", "ndim", "is_leaf", "is_cuda", "is_cpu",
            "is_meta", "is_mps", "is_xpu", "is_sparse", "is_quantized", "is_mkldnn",
            "is_nested", "itemsize", "nbytes", "output_nr", "_version", "grad_fn", "_base",
        )
        if hasattr(_T, name)
    }
)
# Of those, the ones that reach torch's dispatcher, below the wrapper: asked of a meta stand-in
# of the concatenation (same shape and dtype, no data).
_ON_STAND_IN = frozenset({_T.is_same_size, torch.is_same_size})

# Functions whose materialized result would be silently wrong: they act on the tensor
# object itself, so running them on a temporary copy would leave the parameters untouched.
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in (
        "add", "sub", "mul", "truediv", "floordiv", "div", "mod", "pow", "matmul",
        "and", "or", "xor", "lshift", "rshift",
    )
) | {"__setitem__"}
_OBJECT_FUNCTIONS = frozenset(
    {"register_hook", "retain_grad", "register_post_accumulate_grad_hook", "share_memory_"}
)


# A whole bundle of at most this many elements is reduced by one torch call on its explicit
# concatenation (16 KiB of float32): for a layer such as a small conv, the Python of even one
# pass over its tensors costs more than the copy. The result is the concatenation's, exactly.
TINY_NUMEL = 1 << 12

# The fast lane of tiny bundles takes calls seen before without the table: reductions whose
# handler parsed them and found them valid (remember_direct), and elementwise ops whose result
# map_elementwise computed on the concatenation (remember_elementwise). A key holds the bundle
# class, function, dtype and the other arguments: plain values as they are, a second bundle
# by its kind (a tuple that starts with _BUNDLED), and for elementwise ops a scalar by its type
# only; the value says whether the call is elementwise (its result a bundle over the flat
# result). Registering any handler empties it; a call that a library's handler takes (one that
# calls modtensor's in turn) is never in it.
LANE_CALLS: dict[tuple[Any, ...], bool] = {}
_PLAIN = (type(None), bool, int, float, str, torch.dtype)
_SCALARS = (bool, int, float)
# Marks a second tiny bundle of the first one's shapes in a lane key, followed by its dtype,
# its device and the first one's device. A plain tuple: a NamedTuple costs 0.4 us a call more.
_BUNDLED = object()


def _is_bundled(x: Any) -> bool:
    return type(x) is tuple and len(x) == 4 and x[0] is _BUNDLED


def _lane_rest(b: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # args[1:] as a key holds them; None where a bundle there rules the lane out.
    rest = args[1:]
    if rest and isinstance(rest[0], DispatchTensor):
        c = rest[0]
        if not (
            type(c) is type(b) and c._shapes == b._shapes and c._numel and c._strategy == "concat"
            and is_tiny(c) and c._on_one_device
        ):
            return None
        return ((_BUNDLED, c._dtype, c._device, b._device), *rest[1:])
    return rest


def _remember(key: tuple[Any, ...], elementwise: bool) -> None:
    if len(LANE_CALLS) >= 4096:  # calls with ever new arguments: start again
        LANE_CALLS.clear()
    LANE_CALLS[key] = elementwise


def _served_by_modtensor(b: Any, func: Callable[..., Any]) -> bool:
    # The lane skips the table, so it may only take a call that b's class's table gives to one
    # of modtensor's own handlers (the one recording it): a library's handler that does its own
    # work and then calls the inherited one (to log every sum, say) must see every call.
    table = type(b).HANDLERS
    handler = table.get((func, "concat")) or table.get((func, ANY_STRATEGY))
    return str(getattr(handler, "__module__", "")).startswith("modtensor.")


def remember_direct(b: Any, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Record that `func(b, *args[1:], **kwargs)` is a valid direct reduction for b's dtype
    (and, where args[1] is a bundle, for any tiny one of b's shapes and args[1]'s dtype)."""
    rest = _lane_rest(b, args)
    if rest is None or args[0] is not b or not _served_by_modtensor(b, func):
        return
    values = (*rest[1:], *kwargs.values()) if rest and _is_bundled(rest[0]) else (*rest, *kwargs.values())
    if all(type(v) in _PLAIN or (type(v) is tuple and all(type(x) is int for x in v)) for v in values):
        _remember((type(b), func, b._dtype, rest, *kwargs.items()), False)


def remember_elementwise(b: Any, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Record that `func(b, *args[1:])` may be computed on the concatenations for b's dtype."""
    rest = None if kwargs or args[0] is not b else _lane_rest(b, args)
    if rest is not None and len(rest) <= 1 and _served_by_modtensor(b, func):
        if rest and type(rest[0]) in _SCALARS:
            _remember((type(b), func, b._dtype, (type(rest[0]),)), True)
        elif not rest or _is_bundled(rest[0]):
            _remember((type(b), func, b._dtype, rest), True)


def _flat_norm(x: torch.Tensor, p: Any = "fro", dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Any:
    # What Tensor.norm runs for a strided CPU or CUDA tensor and no dim (torch/functional.py's
    # norm), without its 1.5 us of Python: a third of a tiny bundle's norm.
    if dim is None and (x.is_cpu or x.is_cuda):
        if p is None or (type(p) is str and p == "fro"):
            if not keepdim and dtype is None:
                return torch.linalg.vector_norm(x)  # ord=2; the fewest arguments to parse
            return torch.linalg.vector_norm(x, 2, None, keepdim, dtype=dtype)
        if type(p) in (int, float):
            return torch.linalg.vector_norm(x, p, None, keepdim, dtype=dtype)
    return torch.Tensor.norm(x, p, dim, keepdim, dtype)


# What the lane calls on the concatenations in place of a function torch writes in Python.
_ON_FLAT: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.Tensor.norm: _flat_norm,
    # An elementwise entry's scalar type was seen to work, so pow raises no TypeError for
    # __pow__'s wrapper to turn into NotImplemented.
    torch.Tensor.__pow__: torch.Tensor.pow,
}


def _fast_lane(cls: type[DispatchTensor], b: Any, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # A call seen before on a tiny bundle, made on the concatenations; NOT_HANDLED otherwise.
    # The hot path of a small layer's ops: _lane_rest is written out here.
    if len(args) == 1:  # b.sum(), b.abs(): the commonest calls, first
        try:
            elementwise = LANE_CALLS.get((cls, func, b._dtype, (), *kwargs.items()) if kwargs else (cls, func, b._dtype, ()))
        except TypeError:  # an unhashable argument: not a call the lane takes
            return NOT_HANDLED
        if elementwise is None:
            return NOT_HANDLED
        flat = b._concatenation(func)
        func = _ON_FLAT.get(func, func)
        return b._over_flat(func(flat), cls) if elementwise else func(flat, **kwargs)
    c: Any = args[1]
    second = isinstance(c, DispatchTensor)
    if second:
        if not (
            type(c) is cls and c._shapes == b._shapes and 0 < c._numel <= TINY_NUMEL
            and c._strategy == "concat" and c._dist is None and c._on_one_device
        ):
            return NOT_HANDLED
        rest: tuple[Any, ...] = ((_BUNDLED, c._dtype, c._device, b._device), *args[2:])
    else:
        rest = args[1:]
    try:
        # One scalar: an elementwise op (`b ** 2`, keyed by the scalar's type) first, as
        # chains make them; then a reduction (`b.sum(0)`, keyed by the value).
        elementwise = None
        if len(rest) == 1 and type(c) in _SCALARS and not kwargs:
            elementwise = LANE_CALLS.get((cls, func, b._dtype, (type(c),)))
        if elementwise is None:
            elementwise = LANE_CALLS.get((cls, func, b._dtype, rest, *kwargs.items()))
    except TypeError:  # an unhashable argument: not a call the lane takes
        return NOT_HANDLED
    if elementwise is None:
        return NOT_HANDLED
    if second:
        operands: tuple[Any, ...] = (b._concatenation(func), c._concatenation(func), *args[2:])
    else:
        operands = (b._concatenation(func), *rest)
    func = _ON_FLAT.get(func, func)
    return b._over_flat(func(*operands), cls) if elementwise else func(*operands, **kwargs)


def is_tiny(b: Any) -> bool:
    """True for a local bundle of at most TINY_NUMEL elements (see copy_is_cheap)."""
    return b._numel <= TINY_NUMEL and b._dist is None


def copy_is_cheap(bundles: Iterable[Any], strategy: str) -> bool:
    """True where one call on the bundles' concatenations beats a call per tensor.

    That is for tiny, non-empty, local bundles under the concat strategy, outside
    torch.compile (whose graphs keep the per-tensor form, which the compiler fuses).
    """
    return (
        strategy == "concat"
        and all(b._numel and is_tiny(b) for b in bundles)
        and not torch.compiler.is_compiling()
    )


_NAMES: dict[Any, str] = {}


def func_name(func: Callable[..., Any]) -> str:
    """Return torch's public name for `func`, e.g. `torch.Tensor.sum`.

    Example:
        >>> import torch
        >>> func_name(torch.Tensor.sum)
        'torch.Tensor.sum'
    """
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        pass
    if torch.compiler.is_compiling():  # resolve_name touches warnings filters: untraceable
        return str(getattr(func, "__qualname__", None) or repr(func))
    # resolve_name silences warnings around its lookup, which costs tens of microseconds
    name = resolve_name(func) or getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    name = str(name or repr(func))
    try:
        _NAMES[func] = name
    except TypeError:  # unhashable callables are named afresh each time
        pass
    return name


def _short_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", "") or ""


def _writes_in_place(func: Callable[..., Any], kwargs: Mapping[str, Any]) -> bool:
    if _named_in_place(func):
        return True
    return bool(kwargs.get("inplace")) or isinstance(kwargs.get("out"), DispatchTensor)


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]  # dynamo cannot trace str.endswith here
def _named_in_place(func: Callable[..., Any]) -> bool:
    name = _short_name(func)
    return name in _INPLACE_DUNDERS or name in _OBJECT_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))


class fallback:  # noqa: N801 - used like torch.no_grad, as a setter and a context manager
    """Choose what happens to functions outside the dispatch table.

    `"materialize"` (the default) computes them on `b.materialize()`, the explicit
    concatenation, and warns with `MaterializationWarning`; `"error"` raises
    `UnsupportedOperationError` instead. Calling `fallback(mode)` sets the mode at once;
    used as a context manager it restores the previous mode on exit.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.ones(2), torch.ones(3)])
        >>> with mt.fallback("error"):
        ...     float(b.sum())  # in the table: unaffected
        5.0
    """

    def __init__(self, mode: FallbackMode) -> None:
        if mode not in ("materialize", "error"):
            raise ValueError(f"fallback: unknown mode {mode!r}. Expect one of ('materialize', 'error').")
        self._token = _FALLBACK.set(mode)

    def __enter__(self) -> fallback:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _FALLBACK.reset(self._token)


def _replace_bundles(obj: Any, convert: Callable[[Any], Any]) -> Any:
    if isinstance(obj, BUNDLE_TYPES):
        return convert(obj)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_replace_bundles(x, convert) for x in obj)
    if isinstance(obj, dict):
        return {k: _replace_bundles(v, convert) for k, v in obj.items()}
    return obj


def materialized(obj: Any) -> Any:
    """`obj` with every bundle in it (one level into lists, tuples, dicts) materialized."""
    return _replace_bundles(obj, lambda b: b.materialize())


def concatenated(obj: Any) -> Any:
    """Like `materialized`, for a call that only reads its inputs: a bundle kept flat (an op's
    result on a tiny bundle) gives its flat tensor itself, not a copy."""
    return _replace_bundles(obj, lambda b: b._concatenation())


def find_bundles(args: Iterable[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    """Every bundle among the arguments, in order, looking one level into lists and tuples."""
    found = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, BUNDLE_TYPES):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, BUNDLE_TYPES))
    return found


def _materialize_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], stacklevel: int,
    declined: bool = False,
) -> Any:
    # `declined`: the table has a handler for func, which does not compute this call itself
    # (`torch.all(b, dim=())`, a strategy that returned NotImplemented).
    name = func_name(func)
    bundles = find_bundles(args, kwargs)
    structure = bundles[0].describe() if bundles else "a bundle"
    where = "the dispatch table" if not declined else "the dispatch table with these arguments"
    if torch.compiler.is_compiling():  # a compiled graph cannot warn, and a copy must not be silent
        raise UnsupportedOperationError(
            f"{name} is not in {where} (for {structure}), and inside torch.compile the "
            "materializing fallback cannot warn, so it is an error there. Call it on "
            f"`b.materialize()` explicitly, or register a handler with @mt.implements({name})."
        )
    if _writes_in_place(func, kwargs):
        raise UnsupportedOperationError(
            f"{name} would write into a temporary copy of {structure}, not into its tensors, "
            "so modtensor refuses it. Apply it to the tensors themselves "
            "(`for t in b.tensors: ...`) or register an in-place handler with "
            f"@mt.implements({name})."
        )
    if any(getattr(b, "_dist", None) is not None for b in bundles):
        from modtensor._distributed import refuse_fallback

        # on this rank's shards alone, the answer would be wrong
        refuse_fallback(name, bundles, declined, kwargs.get("out") is not None)
    if _FALLBACK.get() == "error":
        raise UnsupportedOperationError(
            f"{name} is not in {where} (for {structure}). Call it on "
            f"`b.materialize()` (the explicit concatenation, a full copy), or register a "
            f"handler with @mt.implements({name})."
        )
    warnings.warn(
        f"{name} is not in modtensor's {where.removeprefix('the ')}: computed on the explicit "
        f"concatenation of {structure} (a full copy). Register a handler with "
        f"@mt.implements({name}), or use mt.fallback('error') to make this an error.",
        MaterializationWarning,
        stacklevel=stacklevel,
    )
    return func(*materialized(args), **materialized(kwargs))


_FIRST_PARAMETERS: dict[Any, str | None] = {}


def _first_parameter(func: Callable[..., Any]) -> str | None:
    try:
        return next(iter(inspect.signature(func).parameters))  # functions torch writes in Python
    except (TypeError, ValueError, StopIteration):
        pass
    # torch's C functions open their docstring with the signature: "sum(input, *, dtype=None)",
    # "linalg.vector_norm(x, ord=2, ...)". A Tensor method's leaves out self: none then.
    if inspect.ismethoddescriptor(func):
        return None
    match = re.match(r"\s*[\w.]+\((\w+)", getattr(func, "__doc__", None) or "")
    return match.group(1) if match else None


def _first_as_positional(func: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # A call spelled all in keywords, its first parameter moved to the front: the same call
    # to torch, in the form handlers and strategies read (the bundle as args[0]).
    try:
        name = _FIRST_PARAMETERS[func]
    except KeyError:
        name = _FIRST_PARAMETERS[func] = _first_parameter(func)
    if name is not None and name not in kwargs and "input" in kwargs:
        name = "input"  # torch's parser also takes `input` for a C function's first tensor (vector_norm's `x`)
    if name is None or name not in kwargs:
        return (), kwargs
    rest = dict(kwargs)
    return (rest.pop(name),), rest


def autograd_records() -> bool:
    """Whether torch records a graph now: grad mode on, outside inference mode (which records
    nothing even under `torch.enable_grad()`). While compiling, grad mode alone decides: dynamo
    cannot trace the question (and turning grad mode on inside inference mode is rare)."""
    return torch.is_grad_enabled() and (torch.compiler.is_compiling() or not torch.is_inference_mode_enabled())


def _check_operands(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], bool]:
    # Every bundle the call reads: `torch.add(x, other=b)` and `torch.stack([a, b])` read
    # theirs too. Not the stand-ins of torch.compile: they hold no data. Returns them, and
    # whether one holds tensors torch treats apart (sparse or inference tensors).
    bundles = find_bundles(args, kwargs)
    apart = False
    for b in bundles:
        if isinstance(b, DispatchTensor):
            b._check_unchanged(func)
            apart = apart or bool(b._apart())
    return bundles, apart


def _tensors_apart(
    func: Callable[..., Any], strategy: str, bundles: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # A call whose bundles hold sparse or inference tensors: under concat, as the explicit
    # concatenation has them (refused; not requiring grad outside inference mode). An in-place op is the loop over the tensors themselves,
    # with torch's own rules for each, and per_param and weighted apply torch's op to each.
    if strategy != "concat" or _writes_in_place(func, kwargs):
        return args, kwargs
    for b in bundles:
        if isinstance(b, DispatchTensor):
            b._check_strided(func)
    if not autograd_records():
        return args, kwargs

    def detached(b: Any) -> Any:
        return b._detach_inference() if isinstance(b, DispatchTensor) else b

    def copied(b: Any) -> Any:
        return b._detach_inference(copy=True) if isinstance(b, DispatchTensor) else b

    args, kwargs = _replace_bundles(args, detached), _replace_bundles(kwargs, detached)
    if _requires_grad(args) or _requires_grad(kwargs):  # the inference tensors would be saved
        args, kwargs = _replace_bundles(args, copied), _replace_bundles(kwargs, copied)
    return args, kwargs


def _requires_grad(obj: Any) -> bool:
    # Whether a tensor in obj (one level into lists, tuples, dicts, as _replace_bundles) requires grad.
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return any(isinstance(x, torch.Tensor) and x.requires_grad for x in obj)
    if isinstance(obj, dict):
        return any(_requires_grad(v) for v in obj.values())
    return False


def _same_options(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # weights given as tensors compare elementwise
        return False


def _mixed(bundles: list[Any]) -> bool:
    # Whether the operands differ in strategy or options; the common case (all concat, which
    # takes no options) costs one attribute read per operand.
    strategy = bundles[0]._strategy
    for x in bundles:
        if x._strategy != strategy:
            return True
    if strategy == "concat":
        return False
    options = bundles[0]._options
    return not all(_same_options(x._options, options) for x in bundles)


def _agree(
    func: Callable[..., Any], bundles: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # Operands of different strategies (`dist(a, b.per_param())`): the one strategy other than
    # concat among them, whichever operand holds it, as the same call with the operands
    # swapped would take it; two such strategies are ambiguous. The operands are passed on
    # as bundles of the same tensors under that strategy, which every handler then reads.
    chosen = None
    for x in bundles:
        if x._strategy == "concat":
            continue
        if chosen is None:
            chosen = x
        elif x._strategy != chosen._strategy or not _same_options(x._options, chosen._options):
            def spelled(b: Any) -> str:
                options = ", ".join(f"{k}={v!r}" for k, v in b._options.items())
                return f"{b._strategy}({options})"

            raise ValueError(
                f"{func_name(func)}: its operands have different strategies, {spelled(chosen)} for "
                f"{chosen.describe()} and {spelled(x)} for {x.describe()}, and modtensor cannot "
                "tell which one the result should follow. Pick one for both with "
                "`.with_strategy(...)` (or `.per_param()`, `.weighted(...)`)."
            )
    if chosen is None:
        return args, kwargs
    name, options = chosen._strategy, dict(chosen._options)
    weights = options.get("weights")
    if (
        name == "weighted" and (callable(weights) or isinstance(weights, Mapping))
        and any(x._names != chosen._names for x in bundles)
    ):
        # Weights by name are the chosen operand's: the others may name their tensors otherwise,
        # so they get its weights by position.
        from modtensor._strategies import resolve_weights

        options["weights"] = resolve_weights(chosen, weights)
    converted: dict[int, Any] = {}

    def convert(b: Any) -> Any:
        if b._strategy == name and _same_options(b._options, chosen._options):
            return b
        if id(b) not in converted:
            converted[id(b)] = b._as_strategy(name, options)
        return converted[id(b)]

    return _replace_bundles(args, convert), _replace_bundles(kwargs, convert)


def check_signature(fn: Callable[..., Any], parameters: tuple[str, ...], who: str, call: str) -> None:
    """Raise TypeError, naming `who`, unless `fn` can be called with len(parameters) arguments.

    Used where a library registers a function, so that a wrong signature is refused there and
    not at its first use, as a bare TypeError from inside it.
    """
    try:
        inspect.signature(fn).bind(*parameters)
    except ValueError:  # no signature to read (a C function): trust it
        pass
    except TypeError as e:
        raise TypeError(f"{who} cannot be called as {call}({', '.join(parameters)}): {e}.") from None


def _stand_in(b: Any) -> torch.Tensor:
    return torch.empty((b._numel,), dtype=b._dtype, device="meta")


def dispatch(
    owner: type[DispatchTensor], func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run `func` through `owner`'s table (a `DispatchTensor` subclass), else the fallback."""
    if not args and kwargs:  # `torch.sum(input=b)`: handlers and strategies read args[0]
        args, kwargs = _first_as_positional(func, kwargs)
    strategy: str = owner._strategy
    for a in args:
        if isinstance(a, BUNDLE_TYPES):
            strategy = a._strategy
            break
    table = owner.HANDLERS
    handler = table.get((func, strategy)) or table.get((func, ANY_STRATEGY))
    if handler is not None or func not in PASSTHROUGH:  # b.shape, b.numel(): what it recorded
        bundles, apart = _check_operands(func, args, kwargs)
        if len(bundles) > 1 and _mixed(bundles) and not _writes_in_place(func, kwargs):
            # (An in-place op's result is its target, which keeps its own strategy.)
            args, kwargs = _agree(func, bundles, args, kwargs)
            first = next((a for a in args if isinstance(a, BUNDLE_TYPES)), None)
            if first is not None and first._strategy != strategy:
                strategy = first._strategy
                handler = table.get((func, strategy)) or table.get((func, ANY_STRATEGY))
        if apart:
            args, kwargs = _tensors_apart(func, strategy, bundles, args, kwargs)
    if handler is not None:
        if torch.is_grad_enabled() and not autograd_records():
            # Inference mode records no graph even with grad mode on (`torch.enable_grad()`
            # inside it), and the handlers ask grad mode whether autograd records.
            with torch.no_grad():
                result = handler(func, (owner,), args, kwargs)
        else:
            result = handler(func, (owner,), args, kwargs)
        if result is not NOT_HANDLED:
            return result
    if func in PASSTHROUGH:  # also where a handler declined it: what the bundle recorded answers
        traced = next((a for a in args if isinstance(a, TracedDispatch)), None)
        if traced is not None:  # no wrapper to ask: a meta tensor of the same metadata answers
            args = tuple(traced._meta() if a is traced else a for a in args)
        if func in _ON_STAND_IN:
            args = tuple(_stand_in(a) if isinstance(a, BUNDLE_TYPES) else a for a in args)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    return _materialize_call(func, args, kwargs, stacklevel=4, declined=handler is not None)


# Bound once: _only_ours asks them before every operator and reduction of a bundle.
_torch_function_enabled = torch._C._is_torch_function_enabled
_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled


def _only_ours(b: Any, *others: Any) -> bool:
    # Whether torch.overrides.handle_torch_function would just call type(b).__torch_function__.
    # While compiling it would too; __torch_function__ then leaves the graph itself (so this
    # does not ask is_compiling, which __torch_function__ asks again).
    for x in others:
        if type(x) is not type(b) and isinstance(x, torch.Tensor):
            return False
    return _torch_function_enabled() and not _torch_function_mode_enabled()


class DispatchTensor(torch.Tensor):
    """A tensor subclass whose torch calls are routed through a per-class table.

    Subclasses inherit their parent's entries and may add or override their own without
    touching the parent's table. `ParameterBundle` is the library's one subclass.
    """

    HANDLERS: ClassVar[dict[tuple[Any, str], Handler]] = {}
    # The entries registered on this class itself, from which HANDLERS is resolved (see
    # _set_handler): a class's own entries win over those it inherits.
    _OWN: ClassVar[dict[Any, dict[str, Handler]]] = {}  # func -> strategy -> handler
    _strategy: str = "concat"
    _dtype: torch.dtype
    _numel: int
    _dist: Any = None
    _shapes: tuple[torch.Size, ...]
    _device: torch.device
    _on_one_device: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Its own table, a copy of the parent's: a lookup stays one dict get, and implements
        # keeps the copies up to date.
        cls.HANDLERS = dict(cls.HANDLERS)
        cls._OWN = {}
        if sum(issubclass(base, DispatchTensor) for base in cls.__bases__) > 1:
            # The copy holds the first base's entries only: resolve those of the others too.
            for func in {f for base in cls.__mro__ for f in base.__dict__.get("_OWN", {})}:
                _resolve(cls, func)

    def describe(self) -> str:
        """Return a one-line description of the bundle for error messages."""
        return type(self).__name__

    def materialize(self) -> torch.Tensor:
        """Return the explicit concatenation; subclasses define it."""
        raise NotImplementedError

    def _concatenation(self, func: Callable[..., Any] | None = None) -> torch.Tensor:
        # The concatenation for reading only (it may be shared), for `func`, which the error
        # names if the tensors changed since the bundle was made; subclasses define it.
        raise NotImplementedError

    def _check_unchanged(self, func: Callable[..., Any] | str | None) -> None:
        # Raise where the tensors no longer have the sizes and dtypes the bundle recorded;
        # subclasses that hold tensors define it.
        pass

    def _apart(self) -> tuple[int, ...]:
        # The indices of tensors torch treats apart (sparse, inference); subclasses define it.
        return ()

    def _check_strided(self, func: Callable[..., Any] | str | None) -> None:
        # Raise where a tensor has no strided layout; subclasses that hold tensors define it.
        pass

    def _detach_inference(self, copy: bool = False) -> Any:
        # This bundle, its inference tensors detached (copied, with `copy`); subclasses that
        # hold tensors define it.
        return self

    def _over_flat(self, flat: torch.Tensor, cls: Any = None) -> Any:
        # A bundle of this structure over `flat`, an op's (N,) result, of class `cls` (by
        # default this one's); subclasses define it.
        raise NotImplementedError

    # A torch call on a subclass reaches __torch_function__ through torch's own machinery:
    # for the Tensor methods torch writes in Python (norm, **) torch.overrides'
    # handle_torch_function, about 2 us of Python; for the C ones (sum, the arithmetic
    # operators) its argument parser, about 1 us. On a tiny bundle either is a sixth to a third
    # of the whole op. Where torch would only call this class's __torch_function__ with these
    # very arguments (no torch function mode, no other overloaded operand), the hottest of
    # them call it themselves; otherwise they call torch's.

    def _ours(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _only_ours(self, *args[1:], *kwargs.values()):
            result = type(self).__torch_function__(func, (type(self),), args, kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)

    def _operator(self, func: Callable[..., Any], operator: Callable[..., Any], other: Any) -> Any:
        # `operator` is what torch's own operator is; `func` the name it gives the call (C
        # operators report `Tensor.sub` for `-`).
        if _only_ours(self, other):
            try:
                result = type(self).__torch_function__(func, (type(self),), (self, other), {})
            except TypeError:  # as torch's operators do, so that Python tries other's reflected one
                return NotImplemented
            if result is not NotImplemented:
                return result
        return operator(self, other)

    def __add__(self, other: Any) -> Any:
        return self._operator(torch.Tensor.add, torch.Tensor.__add__, other)

    def __sub__(self, other: Any) -> Any:
        return self._operator(torch.Tensor.sub, torch.Tensor.__sub__, other)

    def __mul__(self, other: Any) -> Any:
        return self._operator(torch.Tensor.mul, torch.Tensor.__mul__, other)

    def __truediv__(self, other: Any) -> Any:
        return self._operator(torch.Tensor.div, torch.Tensor.__truediv__, other)

    def __pow__(self, exponent: Any) -> Any:
        return self._operator(torch.Tensor.__pow__, torch.Tensor.__pow__, exponent)

    def sum(self, *args: Any, **kwargs: Any) -> Any:
        return self._ours(torch.Tensor.sum, (self, *args), kwargs)

    def mean(self, *args: Any, **kwargs: Any) -> Any:
        return self._ours(torch.Tensor.mean, (self, *args), kwargs)

    def norm(self, p: Any = "fro", dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Any:
        # The defaults as no arguments at all, as `b.norm()` has them: the lane's key is shorter.
        if isinstance(p, str) and p == "fro" and dim is None and not keepdim and dtype is None:
            return self._ours(torch.Tensor.norm, (self,), {})
        return self._ours(torch.Tensor.norm, (self,), {"p": p, "dim": dim, "keepdim": keepdim, "dtype": dtype})

    @classmethod
    def implements(
        cls, funcs: Callable[..., Any] | Iterable[Callable[..., Any]], strategy: str = ANY_STRATEGY
    ) -> Callable[[H], H]:
        """Register the decorated handler for one torch function or several.

        The handler has the signature `(func, types, args, kwargs)` and serves `strategy`
        (by default every strategy). Entries resolve as attributes do: the nearest class in
        the MRO that registered `func` decides, and within one class a strategy-specific
        entry wins over `"*"`. The handler may return
        `NotImplemented` to send a call it cannot do exactly to the fallback.

        Example:
            >>> import torch, modtensor as mt
            >>> class MyBundle(mt.ParameterBundle):
            ...     pass
            >>> @MyBundle.implements(torch.cumsum)
            ... def cumsum(func, types, args, kwargs):
            ...     return "my cumsum"
            >>> torch.cumsum(MyBundle([torch.ones(2)], ["w"]), 0)
            'my cumsum'
        """
        func_list = _as_functions(funcs, f"{cls.__name__}.implements")
        _check_strategy(strategy, f"{cls.__name__}.implements")

        def decorator(handler: H) -> H:
            if not callable(handler):
                raise TypeError(
                    f"{cls.__name__}.implements: the handler must be a callable "
                    f"(func, types, args, kwargs) -> result; got {handler!r}."
                )
            check_signature(
                handler, ("func", "types", "args", "kwargs"),
                f"{cls.__name__}.implements: the handler {getattr(handler, '__name__', handler)!r}", "handler",
            )
            for f in func_list:
                _set_handler(cls, (f, strategy), handler)
                func_name(f)  # named now, so that traced code (torch.compile) finds the name
            LANE_CALLS.clear()  # the new handler may serve one of them
            return handler

        return decorator

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # a bundle made outside the compiled function
            return _outside_the_graph(cls, func, args, kwargs)
        b = args[0] if args else None
        # The fast lane of tiny bundles (copy_is_cheap, written out: this is the hot path).
        if (
            type(b) is cls and 0 < b._numel <= TINY_NUMEL and b._strategy == "concat"
            and b._dist is None and b._on_one_device
        ):
            result = _fast_lane(cls, b, func, args, kwargs)
            if result is not NOT_HANDLED:
                return result
        return dispatch(cls, func, args, kwargs)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Any,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # Only reached by code that bypasses __torch_function__: a C++ kernel given the wrapper
        # directly, or a torch.func transform given it as an input (it wraps the bundle, and
        # its ops then reach the wrapper here). The wrapper holds no data, so say so in Python.
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        b = next((x for x in leaves if isinstance(x, DispatchTensor)), None)
        raise UnsupportedOperationError(
            f"{func} reached {'a ' + cls.__name__ if b is None else b.describe()} below "
            "__torch_function__ (a C++ kernel, or a torch.func transform such as grad or vmap given "
            "the bundle as an input); the bundle has no storage of its own. Call it on "
            "`b.materialize()` or on `b.tensors`, or build the bundle inside the transformed "
            "function (`mt.bundle(params)` over what `torch.func.functional_call` is given)."
        )


def _set_handler(cls: type[DispatchTensor], key: tuple[Any, str], handler: Handler) -> None:
    # Registered on cls, then func's entries resolved again in cls and every subclass, made
    # before or after: each table stays one dict get at dispatch.
    cls._OWN.setdefault(key[0], {})[key[1]] = handler
    todo, seen = [cls], set()
    while todo:
        c = todo.pop()
        if c not in seen:  # a class with two bases in the family is reached twice
            seen.add(c)
            _resolve(c, key[0])
            todo.extend(c.__subclasses__())


def _resolve(cls: type[DispatchTensor], func: Callable[..., Any]) -> None:
    # cls's entries for func as Python resolves an attribute: the nearest class in the MRO
    # that registered func decides. A strategy-specific entry there wins over its "*"; where
    # it has no "*", the strategies it left open go on to its parents. So a subclass's own
    # "*" is not overridden by a strategy-specific entry its parent registers, before or after.
    registered = [base.__dict__.get("_OWN", {}).get(func, {}) for base in cls.__mro__]
    for own in registered:
        for strategy in own:
            cls.HANDLERS.pop((func, strategy), None)
    for own in registered:
        for strategy, handler in own.items():
            cls.HANDLERS.setdefault((func, strategy), handler)
        if ANY_STRATEGY in own:
            break


def _as_functions(funcs: Any, where: str) -> list[Callable[..., Any]]:
    # One callable or an iterable of them; a string would be taken letter by letter.
    found = [funcs] if callable(funcs) else None
    if found is None and not isinstance(funcs, (str, bytes)):
        try:
            found = list(funcs)
        except TypeError:
            pass
    if not found or not all(callable(f) for f in found):
        raise TypeError(
            f"{where}: expected a torch function or an iterable of them (e.g. torch.cumsum or "
            f"[torch.cumsum, torch.Tensor.cumsum]), got {funcs!r}."
        )
    return found


def _check_strategy(strategy: Any, where: str) -> None:
    # A misspelt strategy ("per-param") would register an entry no bundle ever reaches.
    from modtensor._strategies import STRATEGIES

    if strategy != ANY_STRATEGY and (not isinstance(strategy, str) or strategy not in STRATEGIES):
        raise ValueError(
            f"{where}: unknown strategy {strategy!r}. Expect {ANY_STRATEGY!r} (every strategy) or "
            f"a registered one: {tuple(STRATEGIES)} (register yours first with mt.register_strategy)."
        )


@torch.compiler.disable  # type: ignore[untyped-decorator]  # torch leaves it untyped
def _outside_the_graph(
    cls: type[DispatchTensor], func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # Dynamo met a real bundle: one made before the compiled function ran, captured or passed
    # in. Tracing into dispatch, it broke the graph inside modtensor's own functions and
    # reused their compiled resumptions for other ops: `b.std()` returned the `b.mean()`
    # computed before it. So the op breaks the graph here and runs eagerly, exact. Bundles
    # made inside the compiled function are stand-ins (TracedDispatch), traced into the graph.
    return cls.__torch_function__(func, (cls,), args, kwargs)


class TracedDispatch:
    """The stand-in `DispatchTensor` subclasses make while torch.compile traces a function.

    Dynamo cannot build a storage-less wrapper tensor inside a graph, but it traces plain
    Python objects that define `__torch_function__`. So while compiling, a bundle is one of
    these: the same attributes, dispatched through the same table (its owner's), with the
    tensor methods forwarded to it. Only metadata differs: it is not a `torch.Tensor`.
    """

    _owner: type[DispatchTensor]
    _strategy: str
    _numel: int
    _dtype: torch.dtype
    _device: torch.device

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        owner = find_bundles(args, kwargs)[0]._owner
        return dispatch(owner, func, args, kwargs)

    def _meta(self) -> torch.Tensor:
        return _stand_in(self)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._numel,))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def ndim(self) -> int:
        return 1

    @property
    def is_leaf(self) -> bool:
        return True

    @property
    def grad_fn(self) -> None:
        return None

    def dim(self) -> int:
        return 1

    ndimension = dim

    def numel(self) -> int:
        return self._numel

    nelement = numel

    def __len__(self) -> int:
        return self._numel

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def is_floating_point(self) -> bool:
        return self._dtype.is_floating_point

    def is_complex(self) -> bool:
        return self._dtype.is_complex

    def element_size(self) -> int:
        return self._dtype.itemsize

    # Hashable by identity, though `==` is elementwise (as for tensors).
    __hash__ = object.__hash__


# Comparison operators are C slot wrappers, which dynamo cannot call on a tensor's parts;
# their named twins mean the same.
_COMPARISONS = {f"__{op}__": op for op in ("eq", "ne", "lt", "le", "gt", "ge")}


def _forward(name: str) -> Callable[..., Any]:
    # The method is looked up by name at call time: dynamo fails to find a torch.Tensor
    # method held in a closure among the table's keys (seen with torch 2.13's __pow__).
    target = _COMPARISONS.get(name, name)

    def method(self: TracedDispatch, *args: Any, **kwargs: Any) -> Any:
        return dispatch(self._owner, getattr(torch.Tensor, target), (self, *args), kwargs)

    method.__name__ = name
    return method


# Every torch.Tensor method and operator, so `b.sum()` and `b ** 2` reach the table as they
# do for the tensor; names TracedDispatch defines itself (metadata) are left alone.
for _name in sorted(set(vars(torch._C.TensorBase)) | set(vars(torch.Tensor))):
    if callable(getattr(torch.Tensor, _name)) and not _name.startswith("_") or _name in (
        "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
        "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__",
        "__rpow__", "__matmul__", "__rmatmul__", "__neg__", "__pos__", "__abs__", "__invert__",
        "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__",
        "__rlshift__", "__rshift__", "__rrshift__", "__eq__", "__ne__", "__lt__", "__le__",
        "__gt__", "__ge__", "__getitem__", "__setitem__", "__iadd__", "__isub__", "__imul__",
        "__itruediv__", "__ipow__", "__bool__", "__float__", "__int__", "__index__",
        "__complex__",
    ):
        if _name not in vars(TracedDispatch):
            setattr(TracedDispatch, _name, _forward(_name))

BUNDLE_TYPES: tuple[type[DispatchTensor], type[TracedDispatch]] = (DispatchTensor, TracedDispatch)

"""Elementwise ops: applied tensor by tensor, returning a bundle of the same names and shapes.

Under the concat strategy each tensor is first cast to the bundle's dtype, so type promotion
and rounding are those of the concatenation (under the others, each keeps its own dtype). Other operands may be Python scalars, 0-d (or one-element) tensors, a
bundle of the same structure, or a flat `(N,)` tensor, which is split into views.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from modtensor import _distributed
from modtensor._bundle import ParameterBundle, is_bundle, version
from modtensor._dispatch import (
    NOT_HANDLED, concatenated, copy_is_cheap, find_bundles, func_name, is_tiny, materialized, remember_elementwise,
)
from modtensor._selection import chunk_size

__all__ = [
    "UNARY_OPS", "BINARY_OPS", "SPECIAL_OPS", "FUNCTIONAL_OPS", "OPERATOR_DUNDERS", "CONVERSIONS",
    "POINTWISE_FUNCTIONS", "UNSUPPORTED", "map_elementwise", "check_same_structure", "first_bundle",
    "per_tensor_caller",
]

# Names of torch functions and Tensor methods that act elementwise; each name is registered
# for every spelling that exists (`torch.X`, `torch.Tensor.X`).
UNARY_OPS = (
    "abs", "absolute", "acos", "arccos", "acosh", "arccosh", "angle", "asin", "arcsin", "asinh",
    "arcsinh", "atan", "arctan", "atanh", "arctanh", "bitwise_not", "ceil", "clamp", "clip",
    "clamp_min", "clamp_max", "conj", "conj_physical", "cos", "cosh", "deg2rad", "digamma", "erf",
    "erfc", "erfinv", "exp", "exp2", "expm1", "fill", "fix", "floor", "frac", "frexp", "hardshrink", "i0",
    "imag", "isfinite", "isinf", "isnan", "isneginf", "isposinf", "isreal", "lgamma", "log",
    "log10", "log1p", "log2", "logical_not", "logit", "mvlgamma", "nan_to_num", "neg", "negative",
    "positive", "polygamma", "rad2deg", "real", "reciprocal", "relu", "round", "rsqrt", "sgn",
    "sigmoid", "sign", "signbit", "sin", "sinc", "sinh", "sqrt", "square", "tan", "tanh", "trunc",
)
BINARY_OPS = (
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
    "remainder", "fmod", "pow", "float_power", "atan2", "arctan2", "copysign", "eq", "ne",
    "not_equal", "lt", "less", "le", "less_equal", "gt", "greater", "ge", "greater_equal",
    "maximum", "minimum", "fmax", "fmin", "hypot", "logaddexp", "logaddexp2", "nextafter",
    "xlogy", "ldexp", "heaviside", "isclose", "logical_and", "logical_or", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_left_shift", "bitwise_right_shift",
    "gcd", "lcm", "igamma", "igammac", "rsub", "complex", "polar", "where", "lerp", "addcmul",
    "addcdiv",
)
SPECIAL_OPS = (
    "airy_ai", "bessel_j0", "bessel_j1", "bessel_y0", "bessel_y1", "digamma", "entr", "erf",
    "erfc", "erfcx", "erfinv", "exp2", "expit", "expm1", "gammainc", "gammaincc", "gammaln", "i0",
    "i0e", "i1", "i1e", "log1p", "log_ndtr", "logit", "modified_bessel_i0", "modified_bessel_i1",
    "modified_bessel_k0", "modified_bessel_k1", "multigammaln", "ndtr", "ndtri", "polygamma",
    "psi", "round", "scaled_modified_bessel_k0", "scaled_modified_bessel_k1", "sinc",
    "spherical_bessel_j0", "xlog1py", "xlogy", "zeta", "chebyshev_polynomial_t",
    "chebyshev_polynomial_u", "chebyshev_polynomial_v", "chebyshev_polynomial_w",
    "hermite_polynomial_h", "hermite_polynomial_he", "laguerre_polynomial_l",
    "legendre_polynomial_p", "shifted_chebyshev_polynomial_t", "shifted_chebyshev_polynomial_u",
    "shifted_chebyshev_polynomial_v", "shifted_chebyshev_polynomial_w",
)
FUNCTIONAL_OPS = (
    "celu", "elu", "gelu", "hardshrink", "hardsigmoid", "hardswish", "hardtanh", "leaky_relu",
    "logsigmoid", "mish", "relu", "relu6", "rrelu", "selu", "sigmoid", "silu", "softplus",
    "softshrink", "softsign", "tanh", "tanhshrink", "threshold",
)
OPERATOR_DUNDERS = (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__div__", "__rdiv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__",
    "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__invert__", "__and__", "__rand__",
    "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__", "__rlshift__", "__rshift__",
    "__rrshift__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
)
CONVERSIONS = (
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "short", "char",
    "byte", "bool", "cfloat", "cdouble", "chalf", "cpu", "cuda", "detach", "clone", "contiguous",
)

# Known gaps, by OpInfo name: these fall back to the concatenation (with a warning).
UNSUPPORTED = {
    "nn.functional.prelu": "its weight indexes dim 1 of the input, which a flat bundle lacks",
    "jiterator_*": "CUDA-only test operators of torch's jiterator",
}


def _torch_function(owner: Any, name: str) -> Callable[..., Any] | None:
    """`owner.name` as __torch_function__ sees it, or None where it is not a function."""
    f = getattr(owner, name, None)
    if f is None or isinstance(f, (torch.dtype, types.ModuleType)):
        return None
    if hasattr(f, "__get__") and not callable(f):  # a property such as Tensor.real
        return f.__get__  # type: ignore[no-any-return]
    return f  # type: ignore[no-any-return]


def _spellings() -> dict[str, tuple[Callable[..., Any], ...]]:
    found: dict[str, tuple[Callable[..., Any], ...]] = {}
    for name in UNARY_OPS + BINARY_OPS:
        funcs = (_torch_function(torch, name), _torch_function(torch.Tensor, name))
        found[name] = tuple(f for f in funcs if f is not None)
    for name in OPERATOR_DUNDERS + CONVERSIONS:  # methods only: torch.float is a dtype
        found[name] = (getattr(torch.Tensor, name),)
    for name in SPECIAL_OPS:
        found[f"special.{name}"] = (getattr(torch.special, name),)
    for name in FUNCTIONAL_OPS:
        found[f"nn.functional.{name}"] = (getattr(F, name),)
    return found


# name -> the torch callables registered for it; the tests import this.
POINTWISE_FUNCTIONS = _spellings()


def check_same_structure(name: str, a: ParameterBundle, b: ParameterBundle) -> None:
    """Raise ValueError unless the two bundles hold tensors of the same shapes, in order."""
    if a._shapes != b._shapes:
        raise ValueError(
            f"{name}: bundles of different structure: {a.describe()} and {b.describe()}. "
            "Elementwise ops pair tensors in order and need the same shapes; compare "
            "`a.names` with `b.names`, or select matching tensors with include=/exclude=."
        )


def _piece_getter(arg: Any, ref: ParameterBundle, name: str, cast: bool = True) -> Any:
    """How to get tensor i's operand from one argument; NOT_HANDLED if only a copy could.

    None for an argument every tensor takes as it is: a number, a 0-d or a `(1,)` tensor
    (which of the two decides how torch promotes types, so neither is reshaped). With `cast`,
    a bundle's tensors come in the bundle's dtype, as in the concatenation.
    """
    if is_bundle(arg):
        check_same_structure(name, ref, arg)
        if not cast:
            return arg._tensor
        return lambda i: _cast_piece(arg._tensor(i), arg._dtype)
    if not isinstance(arg, torch.Tensor):
        return None
    if arg.dim() == 1 and arg.shape[0] == ref._numel:
        offsets, shapes, devices = ref._offsets, ref._shapes, ref._devices

        def flat_piece(i: int) -> torch.Tensor:
            view = arg.narrow(0, offsets[i], offsets[i + 1] - offsets[i]).view(shapes[i])
            return view.to(devices[i])  # a no-op unless the bundle spans devices

        return flat_piece
    if arg.dim() <= 1 and arg.numel() == 1:
        return None
    try:
        torch.broadcast_shapes(arg.shape, (ref._numel,))  # type: ignore[no-untyped-call]
    except RuntimeError:
        raise ValueError(
            f"{name}: cannot combine {ref.describe()} ({ref._numel} elements) with a tensor of "
            f"shape {tuple(arg.shape)}. Use a Python scalar, a 0-d tensor, a flat "
            f"({ref._numel},) tensor, or a bundle of the same structure."
        ) from None
    return NOT_HANDLED  # a broadcast to more dimensions: only the concatenation can do it


def _cast_piece(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _flattened(getter: Any) -> Any:
    if getter is None:
        return None
    return lambda i: getter(i).reshape(-1)


def first_bundle(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ParameterBundle | None:
    """The first bundle among the arguments: it gives the structure and the strategy."""
    return next((a for a in (*args, *kwargs.values()) if is_bundle(a)), None)


def per_tensor_caller(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ref: ParameterBundle,
    cast: bool = True,
    flatten: bool = False,
    dimensioned: bool = False,
    split_tensors: bool = True,
) -> Any:
    """`call(i)`: `func` with every bundle (or flat tensor) argument replaced by tensor i's part.

    `cast` gives a bundle's parts in the bundle's dtype (as in the concatenation), `flatten`
    gives them as vectors, `dimensioned` computes on a 0-d tensor's part as on a (1,) one (an
    elementwise op, as on the concatenation) and gives the result its shape. Without
    `split_tensors`, only bundles are split: a reduction's plain tensor arguments (quantile's
    `q`) are passed whole. NOT_HANDLED where an argument could only be split by copying it.
    """
    name = func_name(func)
    shapes = ref._shapes

    def getter(a: Any) -> Any:
        return _piece_getter(a, ref, name, cast) if split_tensors or is_bundle(a) else None

    arg_getters = [getter(a) for a in args]
    kwarg_getters = {k: getter(v) for k, v in kwargs.items()}
    if any(g is NOT_HANDLED for g in (*arg_getters, *kwarg_getters.values())):
        return NOT_HANDLED
    if flatten:
        arg_getters = [_flattened(g) for g in arg_getters]
        kwarg_getters = {k: _flattened(g) for k, g in kwarg_getters.items()}

    def call(i: int) -> Any:
        if dimensioned and not shapes[i]:
            return _call_0d(i)
        piece_args = [g(i) if g else a for g, a in zip(arg_getters, args)]
        piece_kwargs = {k: (g(i) if g else kwargs[k]) for k, g in kwarg_getters.items()}
        return func(*piece_args, **piece_kwargs)

    def _call_0d(i: int) -> Any:
        # A 0-d tensor is dimensioned in the concatenation: as its (1,) view it broadcasts a
        # (1,) operand and promotes types against a 0-d one as there. The results take its
        # shape; one that is an operand itself (`.float()` of a float tensor) is that operand,
        # as without the view: `b.float().grad` reads the parameter's gradient.
        originals: dict[int, torch.Tensor] = {}  # each (1,) view's 0-d part, by the view's id

        def view(g: Any) -> torch.Tensor:
            part: torch.Tensor = g(i)
            v = part.reshape(1)
            originals[id(v)] = part
            return v

        out = func(
            *[view(g) if g else a for g, a in zip(arg_getters, args)],
            **{k: (view(g) if g else kwargs[k]) for k, g in kwarg_getters.items()},
        )

        def shaped(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            original = originals.get(id(x))
            return x.reshape(()) if original is None else original

        return type(out)([shaped(x) for x in out]) if isinstance(out, tuple) else shaped(out)

    return call


def _refuse_operands(func: Callable[..., Any], ref: ParameterBundle, args: tuple[Any, ...]) -> None:
    # A dunder that refuses an operand (`"2" ** b`) returns NotImplemented on tensors. A
    # handler returning it sends the call to the fallback, which would copy the bundle only
    # to fail the same way: raise instead. Torch's dunders and `DispatchTensor.__pow__` turn
    # the TypeError into NotImplemented, and Python then raises its own TypeError.
    operands = ", ".join(type(a).__name__ for a in args)
    raise TypeError(f"{func_name(func)}: unsupported operands ({operands}) for {ref.describe()}.")


def map_elementwise(
    func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Apply `func` tensor by tensor; return a bundle (or a tuple of bundles) of the results."""
    ref = _distributed.reference(func, first_bundle(args, kwargs), args, kwargs)
    if ref is None or kwargs.get("out") is not None or kwargs.get("inplace"):
        return NOT_HANDLED
    # Under concat each tensor computes in the concatenation's dtype; under the other
    # strategies, which see tensors one at a time, in its own.
    cast = ref.strategy == "concat"
    call = per_tensor_caller(func, args, kwargs, ref, cast=cast, dimensioned=True)
    if call is NOT_HANDLED:
        return NOT_HANDLED
    # The results are of the class whose table took the call (dispatch passes it as `types`),
    # as torch's default __torch_function__ gives them the class it was called on: `b * 2`
    # keeps a subclass.
    owner: type[ParameterBundle] = types[0]
    bundles = find_bundles(args, kwargs)
    if func in FLAT_RESULTS and copy_is_cheap(bundles, ref._strategy) and all(x._on_one_device for x in bundles):
        # Tiny bundles: one call on the concatenations, whose result the new bundle's tensors
        # are views of; it is the concatenation's result, and a chain on it stays flat. (A
        # bundle across devices keeps its results on them.)
        out = func(*concatenated(args), **concatenated(kwargs))
        if out is NotImplemented:
            _refuse_operands(func, ref, args)
        if isinstance(out, torch.Tensor) and out.shape == (ref._numel,):
            if args and is_bundle(args[0]):
                remember_elementwise(args[0], func, args, kwargs)
            return ref._over_flat(out, owner)
    # While torch.compile traces, the compiler fuses the chain itself; computing on demand
    # would need version counters, which it cannot trace. A tiny bundle's results take less
    # memory than the bookkeeping of computing them on demand.
    tiny = all(is_tiny(b) for b in bundles)
    lazy_ok = func in ON_DEMAND or _casts_on_demand(func, args, kwargs)
    # Sparse (or inference) tensors are computed at once, so that the result holds them and an
    # op under concat refuses them by name (see ParameterBundle._apart); per_param lets them by.
    if (
        lazy_ok and ref._names and not tiny and not torch.compiler.is_compiling()
        and not any(b._apart() for b in bundles if isinstance(b, ParameterBundle))
    ):
        dtypes = _result_dtypes(call, func, args, kwargs, ref, cast)
        guard = None if dtypes is None else _Guard.watch(args, kwargs)
        if dtypes is not None and guard is not None:
            requires_grad = _requires_grad(args, kwargs, dtypes)
            by_chunks = not requires_grad and func in FLAT_RESULTS
            lazy = owner._on_demand(
                (lambda i: guard(i, _by_chunks, call, func, args, kwargs, ref, cast, i)) if by_chunks
                else (lambda i: guard(i, call, i)),
                ref,
                dtypes,
                requires_grad,
                compute_range=lambda i, start, stop: guard(i, _range_call, func, args, kwargs, ref, cast, i, start, stop),
            )
            lazy._expr = (func, args, kwargs, guard)
            return lazy
    if not ref._names:
        # No tensor to map over: the empty concatenation still fixes the result's dtype.
        probe = func(*materialized(args), **materialized(kwargs))
        def empty_like(out: torch.Tensor) -> ParameterBundle:
            made = ParameterBundle.__new__(owner, (), (), ref.strategy, ref.options, out.dtype, device=out.device)
            return ref._carry(made)

        if isinstance(probe, torch.Tensor):
            return empty_like(probe)
        if isinstance(probe, tuple) and all(isinstance(x, torch.Tensor) for x in probe):
            return type(probe)([empty_like(x) for x in probe])
        return NOT_HANDLED

    results = [call(i) for i in range(len(ref._names))]
    first = results[0]
    if first is NotImplemented:
        _refuse_operands(func, ref, args)
    if isinstance(first, torch.Tensor):
        if not all(isinstance(r, torch.Tensor) and r.shape == s for r, s in zip(results, ref._shapes)):
            return NOT_HANDLED
        return ref.derive(results)
    if isinstance(first, tuple) and all(isinstance(x, torch.Tensor) for x in first):
        parts = [ref.derive([r[j] for r in results]) for j in range(len(first))]
        return type(first)(parts)
    return NOT_HANDLED


# -- computing on demand -------------------------------------------------------------------------
# Math ops return bundles whose tensors are computed when a reduction (or another op, or
# `tensors`) asks for them, one at a time: `(b ** 2).sum()` or `topk(b.abs(), k)` never hold a
# whole-model intermediate. Conversions (`to`, `clone`...) stay eager: they are snapshots or
# moves (but see `_casts_on_demand`); so does rrelu, whose randomness must not be drawn twice.


# Dtype casts of a bundle that is itself computed on demand stay on demand: such a bundle is
# no snapshot (it refuses to be used once its inputs change), so neither need its cast be,
# and `(b != 0).float().mean()` then holds no whole-model float copy. A cast of stored
# tensors, or a move, stays an eager snapshot.
_DTYPE_CASTS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("float", "double", "half", "bfloat16", "int", "long", "short", "char", "byte", "bool")
)


def _casts_on_demand(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if not (args and is_bundle(args[0]) and args[0]._tensors is None and args[0]._compute is not None):
        return False
    if func is torch.Tensor.to:  # `to(dtype)` alone: not a move, nor `copy=True`
        dtypes = [*args[1:], *([kwargs["dtype"]] if "dtype" in kwargs else [])]
        return len(dtypes) == 1 and isinstance(dtypes[0], torch.dtype) and set(kwargs) <= {"dtype", "non_blocking"}
    return func in _DTYPE_CASTS


def _operand_dtype(arg: Any, i: int, cast: bool) -> Any:
    if is_bundle(arg):
        return arg._dtype if cast else arg._dtypes[i]
    if isinstance(arg, torch.Tensor):
        return arg.dtype
    return type(arg) if isinstance(arg, (bool, int, float, complex)) else None


def _result_dtypes(
    call: Callable[[int], Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ref: ParameterBundle,
    cast: bool,
) -> tuple[torch.dtype, ...] | None:
    """Each result tensor's dtype, or None where the results are not one tensor per tensor.

    One real call per distinct combination of operand dtypes, on one element of the smallest
    such tensor (on all of it where one element cannot be taken alone): it fixes the dtype
    and raises torch's error now, not when the bundle is consumed.
    """

    def probe(members: Sequence[int]) -> torch.Tensor | None:
        # The op on one element of the smallest non-empty tensor of `members` (on all of it
        # where one element cannot be taken alone); None where it gives no tensor of its shape.
        key = ("probe", tuple(members) if len(members) < len(ref._names) else None)
        i = ref._plans.get(key)  # the walk over the shapes, once per bundle
        if i is None:
            nonempty = [j for j in members if ref._shapes[j].numel()] or list(members)
            i = ref._plans[key] = min(nonempty, key=lambda j: ref._shapes[j].numel())
        out = _range_call(func, args, kwargs, ref, cast, i, 0, 1) if ref._shapes[i].numel() else None
        if out is None:
            out = call(i)
            if not isinstance(out, torch.Tensor) or out.shape != ref._shapes[i]:
                return None
        return out

    if cast:  # every operand comes in one dtype for all the tensors: one group, one dtype
        out = probe(range(len(ref._names)))
        return None if out is None else (out.dtype,) * len(ref._names)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in range(len(ref._names)):
        key = tuple(_operand_dtype(a, i, cast) for a in (*args, *kwargs.values()))
        groups.setdefault(key, []).append(i)
    dtypes: list[Any] = [None] * len(ref._names)
    for members in groups.values():
        out = probe(members)
        if out is None:
            return None
        for i in members:
            dtypes[i] = out.dtype
    return tuple(dtypes)


def _requires_grad(args: tuple[Any, ...], kwargs: dict[str, Any], dtypes: Sequence[torch.dtype]) -> bool:
    if not torch.is_grad_enabled() or not any(d.is_floating_point or d.is_complex for d in dtypes):
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


class _Guard:
    """`guard(i, fn, *a)`: `fn(*a)` in the grad mode (and inference mode, and default dtype)
    of the guard's making, refusing tensor i's inputs if they were modified in place since then."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.grad_enabled = torch.is_grad_enabled()
        # The concatenation's `c / 2` of integers is made at once in the default dtype of
        # that moment; a later `torch.set_default_dtype` must not change the tensors made now.
        self.default_dtype = torch.get_default_dtype()
        # Made under inference mode, the concatenation's result is an inference tensor (no
        # in-place update, no autograd outside that mode): so are the tensors computed later.
        # (dynamo cannot trace the question; see _dispatch.autograd_records.)
        self.inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
        operands = (*args, *kwargs.values())
        self.plain = [a for a in operands if isinstance(a, torch.Tensor) and not is_bundle(a)]
        self.bundles = [a for a in operands if is_bundle(a) and a._tensors is not None]
        self.plain_versions = [t._version for t in self.plain]
        self.bundle_versions = [[t._version for t in b.tensors] for b in self.bundles]
        # Operands computed on demand themselves hold no tensors yet: if they keep them later
        # (`tensors`, or an in-place op on them), a write after that shows in their versions.
        self.on_demand = [a for a in operands if is_bundle(a) and a._tensors is None]

    @classmethod
    def watch(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Guard | None:
        """A guard of these operands, or None where one is an inference tensor: those have no
        version counter to watch, so the op must be computed at once."""
        try:
            return cls(args, kwargs)
        except RuntimeError:
            operands = (*args, *kwargs.values())
            tensors = [t for a in operands if is_bundle(a) and a._tensors is not None for t in a._tensors]
            tensors += [a for a in operands if isinstance(a, torch.Tensor) and not is_bundle(a)]
            if any(t.is_inference() for t in tensors):
                return None
            raise

    def check(self, i: int | None = None) -> None:
        """Raise if tensor i's inputs (every tensor's, for None) changed in place."""
        changed = [t for t, v in zip(self.plain, self.plain_versions) if t._version != v] + [
            b for b, vs in zip(self.bundles, self.bundle_versions)
            if (b.tensors[i]._version != vs[i] if i is not None else [t._version for t in b.tensors] != vs)
        ] + [
            b for b in self.on_demand
            if b._tensors is not None and (
                version(b._tensors[i]) != b._kept_versions[i] if i is not None
                else tuple(map(version, b._tensors)) != b._kept_versions
            )
        ]
        if changed:
            raise RuntimeError(
                "An input of a bundle computed on demand was modified in place after the bundle "
                "was made, so its values would no longer be those of that moment. Compute it "
                "before the in-place op (e.g. `d = (a - b).clone()`), or take `d.tensors` first."
            )

    def __call__(self, i: int, fn: Callable[..., Any], *fn_args: Any) -> Any:
        self.check(i)
        return self.run(fn, *fn_args)

    def run(self, fn: Callable[..., Any], *fn_args: Any) -> Any:
        """`fn(*fn_args)` in the guard's modes, unchecked: for a caller that ran `check()` for
        every tensor at once and calls nothing else meanwhile (a check costs ~1 us a tensor)."""
        if torch.get_default_dtype() != self.default_dtype:
            return self._in_default_dtype(fn, *fn_args)
        return self._in_modes(fn, *fn_args)

    def _in_modes(self, fn: Callable[..., Any], *fn_args: Any) -> Any:
        if self.inference and not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return fn(*fn_args)
        if torch.is_grad_enabled() == self.grad_enabled:  # no mode to switch: spare the context
            return fn(*fn_args)
        with torch.set_grad_enabled(self.grad_enabled):
            return fn(*fn_args)

    def _in_default_dtype(self, fn: Callable[..., Any], *fn_args: Any) -> Any:
        # torch has no context for the default dtype (it is process-wide): set it back after.
        now = torch.get_default_dtype()
        torch.set_default_dtype(self.default_dtype)
        try:
            return self._in_modes(fn, *fn_args)
        finally:
            torch.set_default_dtype(now)


_NO_RANGE = object()


def _operand_range(arg: Any, ref: ParameterBundle, i: int, start: int, stop: int, cast: bool) -> Any:
    if is_bundle(arg):
        part = arg._flat_range(i, start, stop)
        if part is None:
            return _NO_RANGE
        return _cast_piece(part, arg._dtype) if cast else part
    if not isinstance(arg, torch.Tensor):
        return arg
    if arg.dim() == 1 and arg.shape[0] == ref._numel:
        return arg.narrow(0, ref._offsets[i] + start, stop - start).to(ref._devices[i])
    return arg if arg.numel() == 1 and arg.dim() <= 1 else _NO_RANGE


def _range_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ref: ParameterBundle,
    cast: bool, i: int, start: int, stop: int,
) -> torch.Tensor | None:
    """An elementwise op on elements [start, stop) of tensor i's operands alone."""
    parts = [_operand_range(a, ref, i, start, stop, cast) for a in args]
    kwparts = {k: _operand_range(v, ref, i, start, stop, cast) for k, v in kwargs.items()}
    if any(p is _NO_RANGE for p in (*parts, *kwparts.values())):
        return None
    out = func(*parts, **kwparts)
    return out if isinstance(out, torch.Tensor) and out.shape == (stop - start,) else None


def _by_chunks(
    call: Callable[[int], Any], func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
    ref: ParameterBundle, cast: bool, i: int,
) -> Any:
    """Tensor i of an on-demand op, made a chunk at a time into its result where that helps.

    Made whole, a chain's intermediates (`(a - b).abs()` holds `a - b` beside its result) and
    the temporaries torch's own kernel makes (isclose: 4x the tensor) are each a tensor's size;
    by chunks they are a chunk's. Each element is computed by the same op either way. Small
    tensors, and ops that make no temporaries, are made whole: the chunks' loop would only cost.
    """
    n, size = ref._shapes[i].numel(), chunk_size(ref._devices[i])
    if n <= size or not (func in OWN_TEMPORARIES or any(_computed_on_demand(a) for a in (*args, *kwargs.values()))):
        return call(i)
    first = _range_call(func, args, kwargs, ref, cast, i, 0, size)
    if first is None:  # an operand cannot make a chunk alone (it is not contiguous)
        return call(i)
    out = torch.empty(n, dtype=first.dtype, device=first.device)
    out[:size] = first
    del first
    for start in range(size, n, size):
        stop = min(start + size, n)
        part = _range_call(func, args, kwargs, ref, cast, i, start, stop)
        assert part is not None  # the first chunk could be made alone, so can the others
        out[start:stop] = part
    return out.view(ref._shapes[i])


def _computed_on_demand(arg: Any) -> bool:
    return is_bundle(arg) and arg._tensors is None


def _where(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) + len(kwargs) == 1:  # torch.where(cond) is nonzero, not elementwise
        return NOT_HANDLED
    return map_elementwise(func, types, args, kwargs)


def _type(func: Callable[..., Any], types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # `b.type()` (no dtype) is a name, that of the concatenation's tensor type: the bundle's
    # recorded dtype and device give it, with no copy of the model.
    if len(args) == 1 and kwargs.get("dtype") is None and set(kwargs) <= {"dtype", "non_blocking"}:
        b = args[0]
        return torch.empty(0, dtype=b.dtype, device=b.device).type()
    return map_elementwise(func, types, args, kwargs)


_OWN_HANDLERS = {"where": _where, "type": _type}
for _name, _funcs in POINTWISE_FUNCTIONS.items():
    ParameterBundle.implements(_funcs)(_OWN_HANDLERS.get(_name, map_elementwise))

ON_DEMAND = frozenset(
    f
    for name, funcs in POINTWISE_FUNCTIONS.items()
    if name not in CONVERSIONS and name != "nn.functional.rrelu"
    for f in funcs
)
# Ops whose torch kernel makes whole-tensor temporaries of its own, of at least twice its
# result's bytes (measured on CPU float32): made by chunks even as the first op of a chain.
OWN_TEMPORARIES = frozenset(
    f
    for name in (
        "isclose", "isfinite", "isinf", "float_power", "ldexp", "special.ndtr", "nn.functional.softsign",
        "nn.functional.tanhshrink", "nn.functional.logsigmoid",
    )
    for f in POINTWISE_FUNCTIONS[name]
)
# Ops whose result on a tiny bundle may be computed on the concatenation: all but those that
# return their input itself or a view of it (`+b`, `b.real` of real tensors), whose results
# must stay the bundle's own tensors.
FLAT_RESULTS = ON_DEMAND - frozenset(
    f for name in ("positive", "__pos__", "real", "imag", "conj") for f in POINTWISE_FUNCTIONS[name]
)

"""How each entry of the dispatch table is called in the property tests.

Keyed by the package's own name lists, so `test_coverage.py` can check that every table
entry has a property test and that nothing here names an op the table lacks.
Each call is `call(f, x, y)`: `f` one spelling of the op, `x` the bundle (or the
concatenation), `y` a second operand of the same structure.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

Call = Callable[[Any, Any, Any], Any]

INF = math.inf

# -- reductions -----------------------------------------------------------------------------

def _finite(x: Any) -> Any:
    return x.nan_to_num(0.5, 3.0, -3.0)


def _factors(x: Any) -> Any:
    # Finite factors of magnitude 1 to 1.0625 (zeros kept): their products stay in range in any
    # order. Once a running product leaves the range, torch's own prod depends on how its
    # kernel groups the elements (vector lanes): a tensor's product of 100 factors was -0.0
    # where its concatenation with two more was NaN. The overflow rules have tests of their own.
    y = _finite(x) * 0.5
    return torch.where(y == 0, y, y.sign() * (1 + y.abs().frac() / 16))


_DIMS: list[Call] = [
    lambda f, x, y: f(x),
    lambda f, x, y: f(x, 0),
    lambda f, x, y: f(x, dim=-1, keepdim=True),
]
_VAR: list[Call] = [
    lambda f, x, y: f(x),
    lambda f, x, y: f(x, 0),
    lambda f, x, y: f(x, correction=0),
    lambda f, x, y: f(x, dim=0, keepdim=True, correction=0.5),
    lambda f, x, y: f(x, False),  # the legacy unbiased overload
]

REDUCTION_CALLS: dict[str, list[Call]] = {
    "sum": _DIMS + [lambda f, x, y: f(x, dtype=torch.float64)],
    "nansum": _DIMS,
    "mean": _DIMS + [lambda f, x, y: f(x, dtype=torch.float64)],
    "nanmean": _DIMS,
    # NaN/inf replaced: with them torch's prod gradient follows a zero-counting rule that the
    # per-tensor products do not reproduce (values still agree; see the README).
    "prod": [
        lambda f, x, y: f(_factors(x)),
        lambda f, x, y: f(_factors(x), 0, keepdim=True),
    ],
    "var": _VAR,
    "std": _VAR,
    # With +-inf in the input, torch's Welford mean is NaN or inf depending on element order;
    # the bundle's is the plain mean. So these two are checked on finite values.
    "var_mean": [lambda f, x, y, call=call: call(f, _finite(x), y) for call in _VAR],
    "std_mean": [lambda f, x, y, call=call: call(f, _finite(x), y) for call in _VAR],
    "amax": _DIMS,
    "amin": _DIMS,
    "aminmax": [lambda f, x, y: f(x), lambda f, x, y: f(x, dim=0, keepdim=True)],
    "argmax": _DIMS,
    "argmin": _DIMS,
    "max": [
        lambda f, x, y: f(x),
        lambda f, x, y: f(x, 0),
        lambda f, x, y: f(x, 0, True),
        lambda f, x, y: f(x, y),
    ],
    "min": [
        lambda f, x, y: f(x),
        lambda f, x, y: f(x, 0),
        lambda f, x, y: f(x, dim=-1, keepdim=True),
        lambda f, x, y: f(x, y),
    ],
    "all": [lambda f, x, y: f(x), lambda f, x, y: f(x > 0), lambda f, x, y: f(x > -3, 0, keepdim=True)],
    "any": [lambda f, x, y: f(x), lambda f, x, y: f(x > 3), lambda f, x, y: f(x > 0, 0)],
    "count_nonzero": [lambda f, x, y: f(x), lambda f, x, y: f(x.round(), 0)],
    "logsumexp": [lambda f, x, y: f(x, 0), lambda f, x, y: f(x, -1, keepdim=True)],
    "norm": [
        *(lambda f, x, y, p=p: f(x, p) for p in (0, 1, 2, 3.5, 0.5, -1, INF, -INF)),
        lambda f, x, y: f(x),
        lambda f, x, y: f(x, 2, 0, True),
    ],
}

# -- bundle-with-bundle reductions ------------------------------------------------------------

PAIRWISE_CALLS: dict[str, list[Call]] = {
    "dot": [lambda f, x, y: f(x, y)],
    "vdot": [lambda f, x, y: f(x, y)],
    "inner": [lambda f, x, y: f(x, y)],
    "matmul": [lambda f, x, y: f(x, y)],
    "dist": [lambda f, x, y: f(x, y), *(lambda f, x, y, p=p: f(x, y, p) for p in (0, 1, 3, INF, -INF, -2))],
    "cosine_similarity": [lambda f, x, y: f(x, y, dim=0), lambda f, x, y: f(x, y, 0, 0.5)],
    "mse_loss": [lambda f, x, y, r=r: f(x, y, reduction=r) for r in ("mean", "sum", "none")],
    "l1_loss": [lambda f, x, y, r=r: f(x, y, reduction=r) for r in ("mean", "sum", "none")],
    "smooth_l1_loss": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, y, reduction="sum", beta=0.5)],
    "huber_loss": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, y, reduction="none", delta=0.5)],
    "allclose": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, x + 1e-9), lambda f, x, y: f(x, x, equal_nan=True)],
    "equal": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, x.clone())],
}

# -- elementwise ops ---------------------------------------------------------------------------

_UNARY: list[Call] = [lambda f, x, y: f(x)]
_BINARY: list[Call] = [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 0.75), lambda f, x, y: f(y, x)]


POINTWISE_CALLS: dict[str, list[Call]] = {
    "clamp": [lambda f, x, y: f(x, -0.5, 0.5), lambda f, x, y: f(x, min=y), lambda f, x, y: f(x, max=0.1)],
    "clip": [lambda f, x, y: f(x, -0.5, 0.5), lambda f, x, y: f(x, y, y + 1)],
    "clamp_min": [lambda f, x, y: f(x, 0.1), lambda f, x, y: f(x, y)],
    "clamp_max": [lambda f, x, y: f(x, 0.1), lambda f, x, y: f(x, y)],
    "fill": [lambda f, x, y: f(x, 2.5)],
    "mvlgamma": [lambda f, x, y: f(x.abs() + 1, p=2)],
    # torch.polygamma(n, input) but Tensor.polygamma(self, n)
    "polygamma": [lambda f, x, y: f(x, 1) if f is torch.Tensor.polygamma else f(1, x)],
    "special.polygamma": [lambda f, x, y: f(2, x)],
    "special.multigammaln": [lambda f, x, y: f(x.abs() + 1, 2)],
    "round": [lambda f, x, y: f(x), lambda f, x, y: f(x, decimals=1)],
    "special.round": [lambda f, x, y: f(x)],
    "nan_to_num": [lambda f, x, y: f(x), lambda f, x, y: f(x, nan=0.0, posinf=1.0)],
    "logit": [lambda f, x, y: f(x), lambda f, x, y: f(x, 0.1)],
    "special.logit": [lambda f, x, y: f(x, 0.1)],
    "hardshrink": [lambda f, x, y: f(x, 0.3)],
    # torch.where(condition, input, other) but Tensor.where(self, condition, other)
    "where": [
        lambda f, x, y: f(x > 0, x, y) if f is torch.where else f(x, x > 0, y),
        lambda f, x, y: f(y > 0.5, x, 0.0) if f is torch.where else f(x, y > 0.5, 0.0),
    ],
    "imag": [lambda f, x, y: f(torch.complex(x, y))],
    "real": [lambda f, x, y: f(x), lambda f, x, y: f(torch.complex(x, y))],
    "angle": [lambda f, x, y: f(x), lambda f, x, y: f(torch.complex(x, y))],
    "lerp": [lambda f, x, y: f(x, y, 0.3), lambda f, x, y: f(x, y, y.sigmoid())],
    "addcmul": [lambda f, x, y: f(x, y, y, value=0.5)],
    "addcdiv": [lambda f, x, y: f(x, y, y.abs() + 1)],
    "complex": [lambda f, x, y: f(x, y)],
    "polar": [lambda f, x, y: f(x.abs(), y)],
    "isclose": [lambda f, x, y: f(x, y, atol=0.5), lambda f, x, y: f(x, x)],
    "to": [lambda f, x, y: f(x, torch.float64), lambda f, x, y: f(x, dtype=torch.float16), lambda f, x, y: f(x, y)],
    "type": [lambda f, x, y: f(x, torch.float64)],
    "type_as": [lambda f, x, y: f(x, y.int())],
    "nn.functional.celu": [lambda f, x, y: f(x, alpha=0.5)],
    "nn.functional.elu": [lambda f, x, y: f(x), lambda f, x, y: f(x, alpha=2.0)],
    "nn.functional.gelu": [lambda f, x, y: f(x), lambda f, x, y: f(x, approximate="tanh")],
    "nn.functional.hardtanh": [lambda f, x, y: f(x, -0.5, 0.5)],
    "nn.functional.leaky_relu": [lambda f, x, y: f(x, 0.2)],
    "nn.functional.rrelu": [lambda f, x, y: f(x, training=False)],
    "nn.functional.softplus": [lambda f, x, y: f(x, beta=2.0, threshold=5.0)],
    "nn.functional.softshrink": [lambda f, x, y: f(x, 0.3)],
    "nn.functional.threshold": [lambda f, x, y: f(x, 0.1, 20.0)],
    "nn.functional.hardshrink": [lambda f, x, y: f(x, 0.3)],
    "__radd__": [lambda f, x, y: f(x, 2)],
    "__rsub__": [lambda f, x, y: f(x, 2), lambda f, x, y: 2 - x],
    "__rmul__": [lambda f, x, y: f(x, 2)],
    "__rtruediv__": [lambda f, x, y: f(x, 2), lambda f, x, y: 1 / x],
    "__rdiv__": [lambda f, x, y: f(x, 2)],
    "__rfloordiv__": [lambda f, x, y: f(x, 2)],
    "__rmod__": [lambda f, x, y: f(x, 2.5)],
    "__rpow__": [lambda f, x, y: f(x, 2), lambda f, x, y: 2**x],
    "__rand__": [lambda f, x, y: f(x, 6)],
    "__ror__": [lambda f, x, y: f(x, 6)],
    "__rxor__": [lambda f, x, y: f(x, 6)],
    "__rlshift__": [lambda f, x, y: f(x, 3)],
    "__rrshift__": [lambda f, x, y: f(x, 3)],
    "rsub": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 2.0)],
}

# Elementwise ops defined on integers only: tested on integer bundles.
INTEGER_OPS = frozenset(
    {
        "bitwise_not", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_left_shift",
        "bitwise_right_shift", "gcd", "lcm", "__and__", "__rand__", "__or__", "__ror__",
        "__xor__", "__rxor__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__",
        "__invert__",
    }
)
# torch's own kernels give results on NaN/inf that depend on the tensor's size or layout (the
# polynomial kernels read uninitialized memory for a NaN input; gelu's vectorized kernel, which
# a contiguous tensor takes, gives NaN at inf, its strided one inf): tested on finite values.
NONFINITE_UNSTABLE = frozenset(("special." + m for m in (
    "chebyshev_polynomial_t", "chebyshev_polynomial_u", "chebyshev_polynomial_v",
    "chebyshev_polynomial_w", "hermite_polynomial_h", "hermite_polynomial_he",
    "laguerre_polynomial_l", "legendre_polynomial_p", "shifted_chebyshev_polynomial_t",
    "shifted_chebyshev_polynomial_u", "shifted_chebyshev_polynomial_v",
    "shifted_chebyshev_polynomial_w",
))) | {"nn.functional.gelu"}
UNARY_DUNDERS = frozenset({"__neg__", "__pos__", "__abs__", "__invert__"})


def pointwise_calls(name: str, binary: bool) -> list[Call]:
    if name in POINTWISE_CALLS:
        return POINTWISE_CALLS[name]
    if name in UNARY_DUNDERS:
        return _UNARY
    return _BINARY if binary else _UNARY


def is_binary(name: str) -> bool:
    from modtensor._pointwise import BINARY_OPS, OPERATOR_DUNDERS

    binary_special = {
        "special.xlog1py", "special.xlogy", "special.zeta", "special.gammainc", "special.gammaincc",
    } | {n for n in _SPECIAL_NAMES if "polynomial" in n}
    return (
        name in BINARY_OPS
        or (name in OPERATOR_DUNDERS and name not in UNARY_DUNDERS)
        or name in binary_special
    )


def _special_names() -> set[str]:
    from modtensor._pointwise import SPECIAL_OPS

    return {f"special.{n}" for n in SPECIAL_OPS}


_SPECIAL_NAMES = _special_names()

_ = F  # the functional spellings are reached through the package's name lists

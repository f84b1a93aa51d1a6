"""Every elementwise op in the table equals the op on torch.cat(...), values and gradients."""

import pytest
import torch
from hypothesis import given

import modtensor as mt
from generators import INTS, cases, check_against_concat, other_like
from modtensor._pointwise import POINTWISE_FUNCTIONS
from op_specs import INTEGER_OPS, NONFINITE_UNSTABLE, is_binary, pointwise_calls

PARAMS = [
    pytest.param(name, f, call, id=f"{name}-{getattr(f, '__qualname__', name)}-{i}")
    for name, funcs in POINTWISE_FUNCTIONS.items()
    for f in funcs
    for i, call in enumerate(pointwise_calls(name, is_binary(name)))
]


@pytest.mark.parametrize("name, f, call", PARAMS)
@given(case=cases(), int_case=cases(dtypes=INTS, grad=False), finite_case=cases(kinds=("normal", "ties")))
def test_pointwise_matches_concat(name, f, call, case, int_case, finite_case):
    if name in INTEGER_OPS:
        case = int_case
    elif name in NONFINITE_UNSTABLE:
        case = finite_case
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case, seed=5, positive=True))


@pytest.mark.parametrize("name, f, call", [p for p in PARAMS if is_binary(p.values[0])])
@given(case=cases(kinds=("normal",)), int_case=cases(dtypes=INTS, grad=False))
def test_binary_with_flat_tensor(name, f, call, case, int_case):
    if name in INTEGER_OPS:
        case = int_case
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case, seed=9, positive=True), flat_other=True)


@given(case=cases(min_tensors=1))
def test_zero_dim_and_one_element_operands_broadcast(case):
    # A 0-d operand does not widen a floating bundle's dtype, a (1,) one does: each is taken as
    # it is, and the bundle's own 0-d tensors compute as the dimensioned parts they are in the
    # concatenation (a 0-d float32 tensor plus a 0-d float64 one stays float32 there).
    for dtype in (torch.float16, torch.float32, torch.float64):
        for other in (torch.tensor(0.5, dtype=dtype), torch.tensor([0.5], dtype=dtype)):
            check_against_concat(case, lambda x, y: x * other + other)
            check_against_concat(case, lambda x, y: torch.where(x > 0, x, other))
            check_against_concat(case, lambda x, y: torch.clamp(x, min=other))


@pytest.mark.parametrize("inside", [True, False], ids=["in inference_mode", "after it"])
def test_elementwise_ops_with_inference_tensors(inside):
    # Inference tensors have no version counter, so a bundle computed on demand cannot watch
    # them: the op is computed at once, as on the concatenation, instead of raising.
    torch.manual_seed(0)
    with torch.inference_mode():
        t = torch.randn(5100)  # long enough not to be computed on the concatenation
        held = mt.bundle([torch.randn(100), torch.randn(5000)])
    params = [torch.randn(100), torch.randn(5000)]
    flat = torch.cat(params)
    with torch.inference_mode(inside):
        for got, want in [
            (mt.bundle(params) * t, flat * t),
            (t - (mt.bundle(params) * 0.5), t - flat * 0.5),
            (held * 2 + 1, torch.cat(held.tensors) * 2 + 1),
        ]:
            torch.testing.assert_close(got.materialize(), want, rtol=0, atol=0)
            # a float32 sum of thousands of elements may land near 0: absolute tolerance too
            torch.testing.assert_close(got.sum(), want.sum(), rtol=1e-5, atol=1e-3)

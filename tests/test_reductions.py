"""Every reduction in the table, every spelling, equals the reduction of torch.cat(...)."""

import pytest
import torch
from hypothesis import given

from generators import cases, check_against_concat, other_like
from modtensor._reductions import REDUCTION_FUNCTIONS
from op_specs import REDUCTION_CALLS

PARAMS = [
    pytest.param(f, call, id=f"{name}-{getattr(f, '__qualname__', name)}-{i}")
    for name, funcs in REDUCTION_FUNCTIONS.items()
    for f in funcs
    for i, call in enumerate(REDUCTION_CALLS[name])
]


@pytest.mark.parametrize("f, call", PARAMS)
@given(case=cases())
def test_reduction_matches_concat(f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case))


@pytest.mark.parametrize("f, call", PARAMS)
@given(case=cases(dtypes=(torch.int64, torch.int32, torch.float32, torch.bool), kinds=("normal",), grad=False))
def test_reduction_matches_concat_mixed_integer_dtypes(f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case), grads=False)

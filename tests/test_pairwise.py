"""Bundle-with-bundle reductions equal their concatenation versions, for a bundle or a flat other."""

import pytest
from hypothesis import given

from generators import cases, check_against_concat, other_like
from modtensor._pairwise import PAIRWISE_FUNCTIONS
from op_specs import PAIRWISE_CALLS

PARAMS = [
    pytest.param(f, call, id=f"{name}-{getattr(f, '__qualname__', name)}-{i}")
    for name, (funcs, _) in PAIRWISE_FUNCTIONS.items()
    for f in funcs
    for i, call in enumerate(PAIRWISE_CALLS[name])
]


@pytest.mark.parametrize("f, call", PARAMS)
@given(case=cases())
def test_pairwise_matches_concat(f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case, seed=7))


@pytest.mark.parametrize("f, call", PARAMS)
@given(case=cases(kinds=("normal",)))
def test_pairwise_with_flat_other(f, call, case):
    check_against_concat(case, lambda x, y: call(f, x, y), other_like(case, seed=3), flat_other=True)

"""The dispatch table and the tests cannot drift apart.

Every table entry has a property test; every test spec names a real entry and runs at least
once without raising on ordinary values (so no test passes only because torch raises); and
every elementwise or reduction op in torch's OpInfo database is in the table or in an
explicit list of known gaps.
"""

import fnmatch
import re
import warnings
from pathlib import Path

import pytest
import torch

import modtensor as mt
from generators import Case, check_against_concat, other_like
from modtensor import _pointwise, _reductions
from modtensor._autograd import AUTOGRAD_FUNCTIONS
from modtensor._pairwise import PAIRWISE_FUNCTIONS
from modtensor._pointwise import POINTWISE_FUNCTIONS
from modtensor._indexing import READOUT_FUNCTIONS
from modtensor._inplace import FOREACH_FUNCTIONS, INPLACE_FUNCTIONS
from modtensor._like import LIKE_FUNCTIONS
from modtensor._order import ORDER_FUNCTIONS
from modtensor._reductions import REDUCTION_FUNCTIONS
from op_specs import INTEGER_OPS, PAIRWISE_CALLS, REDUCTION_CALLS, is_binary, pointwise_calls

# tests/test_indexing.py, tests/test_order.py, tests/test_like.py, tests/test_grad_and_devices.py
TESTED_ELSEWHERE = {
    torch.Tensor.__getitem__, *READOUT_FUNCTIONS, *ORDER_FUNCTIONS, *LIKE_FUNCTIONS, *AUTOGRAD_FUNCTIONS,
}


def test_every_table_entry_has_a_property_test(builtin_table):
    covered = set(TESTED_ELSEWHERE)
    covered |= {f for name in REDUCTION_CALLS for f in REDUCTION_FUNCTIONS[name]}
    covered |= {f for name in PAIRWISE_CALLS for f in PAIRWISE_FUNCTIONS[name][0]}
    covered |= {f for funcs in POINTWISE_FUNCTIONS.values() for f in funcs}
    covered |= {f for funcs, _ in INPLACE_FUNCTIONS.values() for f in funcs}  # tests/test_inplace.py
    covered |= {f for funcs, _ in FOREACH_FUNCTIONS.values() for f in funcs}  # tests/test_inplace.py
    untested = builtin_table - covered
    assert not untested, f"table entries without a property test: {untested}"


def test_every_spec_names_a_table_entry(builtin_table):
    assert set(REDUCTION_CALLS) == set(REDUCTION_FUNCTIONS)
    assert set(PAIRWISE_CALLS) == set(PAIRWISE_FUNCTIONS)
    table = builtin_table
    for funcs in [*REDUCTION_FUNCTIONS.values(), *POINTWISE_FUNCTIONS.values()]:
        assert funcs and all(f in table for f in funcs)


def _ordinary_case(integers: bool) -> Case:
    g = torch.Generator().manual_seed(0)
    if integers:
        tensors = [torch.randint(1, 20, s, generator=g) for s in [(2, 3), (4,), ()]]
    else:
        tensors = [
            (torch.rand((2, 3), generator=g) + 0.1).requires_grad_(),
            torch.rand(4, generator=g, dtype=torch.float64) + 0.1,
            torch.tensor(0.7, requires_grad=True),
        ]
    return Case(tensors, tensors)


def _all_specs():
    for name, funcs in REDUCTION_FUNCTIONS.items():
        for f in funcs:
            yield pytest.param(f, REDUCTION_CALLS[name], False, id=f"{name}-{f.__qualname__}")
    for name, (funcs, _) in PAIRWISE_FUNCTIONS.items():
        for f in funcs:
            yield pytest.param(f, PAIRWISE_CALLS[name], False, id=f"{name}-{f.__qualname__}")
    for name, funcs in POINTWISE_FUNCTIONS.items():
        if name == "cuda" and not torch.cuda.is_available():
            continue
        for f in funcs:
            calls = pointwise_calls(name, is_binary(name))
            yield pytest.param(f, calls, name in INTEGER_OPS, id=f"{name}-{getattr(f, '__qualname__', name)}")


@pytest.mark.parametrize("f, calls, integers", list(_all_specs()))
def test_every_op_runs_on_ordinary_values(f, calls, integers):
    case = _ordinary_case(integers)
    other = other_like(case, seed=2, positive=True)
    succeeded = 0
    for call in calls:
        try:
            call(f, case.concat(), other.concat())
        except Exception:
            continue  # a variant torch itself rejects, kept as an error-parity check
        check_against_concat(case, lambda x, y: call(f, x, y), other)
        succeeded += 1
    assert succeeded, "every variant raises on the concatenation: the property test checks nothing"


def _opinfo_ops():
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.opinfo.core import BinaryUfuncInfo, ReductionOpInfo, UnaryUfuncInfo

    return [op for op in op_db if isinstance(op, (UnaryUfuncInfo, BinaryUfuncInfo, ReductionOpInfo))]


def _in_table(op, table) -> bool:
    funcs = [op.op, op.method_variant, *(a.op for a in op.aliases)]
    # OpInfo wraps some ops in lambdas (rrelu, polygamma variants): match those by name.
    return any(f in table for f in funcs if f is not None) or op.name in POINTWISE_FUNCTIONS


def opinfo_coverage(table):
    """(in the table, known gaps, total) over torch's elementwise and reduction OpInfos."""
    ops = _opinfo_ops()
    gaps = {**_pointwise.UNSUPPORTED, **_reductions.UNSUPPORTED}
    missing = [op.name for op in ops if not _in_table(op, table)]
    unexplained = [n for n in missing if not any(fnmatch.fnmatchcase(n, g) for g in gaps)]
    return len(ops) - len(missing), missing, unexplained, len(ops)


def test_opinfo_ops_are_in_the_table_or_known_gaps(builtin_table):
    covered, missing, unexplained, total = opinfo_coverage(builtin_table)
    assert not unexplained, f"OpInfo ops neither in the table nor in UNSUPPORTED: {unexplained}"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    match = re.search(r"OpInfo coverage: (\d+) of (\d+)", readme)
    assert match, "README.md should report the OpInfo coverage"
    assert (int(match[1]), int(match[2])) == (covered, total), (
        f"README says {match[0]}, the table covers {covered} of {total}: update the README"
    )


def test_known_gaps_fall_back_with_a_warning():
    b = mt.bundle([torch.randn(3, 2), torch.randn(4)])
    with pytest.warns(mt.MaterializationWarning, match="prelu"):
        out = torch.nn.functional.prelu(b, torch.tensor([0.25]))
    torch.testing.assert_close(out, torch.nn.functional.prelu(b.materialize(), torch.tensor([0.25])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert b.sum().shape == ()

"""modtensor/_typed_methods.py declares, for mypy, which Tensor methods return a bundle of the
receiver's class. Its declarations and the name lists cannot drift apart, and each declaration
holds at run time (tests/typing_checks.py checks what mypy makes of them).
"""

import ast
from pathlib import Path

import pytest
import torch

import modtensor as mt
from modtensor import _typed_methods
from modtensor._inplace import INPLACE_FUNCTIONS
from modtensor._pointwise import BINARY_OPS, CONVERSIONS, OPERATOR_DUNDERS, UNARY_OPS
from modtensor._typed_methods import LEFT_TO_TORCH
from op_specs import INTEGER_OPS, is_binary, pointwise_calls


def _declarations() -> list[ast.stmt]:
    tree = ast.parse(Path(_typed_methods.__file__).read_text())
    (cls,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "TypedMethods"]
    return cls.body


def _declared_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.FunctionDef):
        return node.name
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


DECLARED = {name for name in map(_declared_name, _declarations()) if name is not None}
# The Tensor methods registered as in-place ops, by every name torch gives them (`__itruediv__`
# is `__idiv__`).
INPLACE = {
    name for name in dir(torch.Tensor)
    if any(getattr(torch.Tensor, name) is f for funcs, _ in INPLACE_FUNCTIONS.values() for f in funcs)
}
# The Tensor-method spellings of the elementwise ops (torch.rsub, say, has none).
LISTED = {n for n in UNARY_OPS + BINARY_OPS + OPERATOR_DUNDERS + CONVERSIONS if hasattr(torch.Tensor, n)} | INPLACE


def test_the_declarations_and_the_name_lists_agree():
    expected = LISTED - set(LEFT_TO_TORCH)
    assert sorted(DECLARED - expected) == [], "declared, but in no name list (or in LEFT_TO_TORCH)"
    assert sorted(expected - DECLARED) == [], "in a name list, but neither declared nor in LEFT_TO_TORCH"
    assert sorted(set(LEFT_TO_TORCH) - LISTED) == [], "LEFT_TO_TORCH names what no list has"


def test_every_plain_declaration_returns_self():
    # The overloads (`type()` is a str, `b == None` a bool) are checked by mypy in typing_checks.
    for node in _declarations():
        if isinstance(node, ast.FunctionDef) and not node.decorator_list and node.name not in ("type", "__eq__", "__ne__"):
            assert node.returns is not None and ast.unparse(node.returns) == "Self", node.name
        elif isinstance(node, ast.AnnAssign):
            assert ast.unparse(node.annotation) == "Self", ast.unparse(node.target)


class Mine(mt.ParameterBundle):
    pass


def _bundle(cls: type[mt.ParameterBundle], integer: bool) -> mt.ParameterBundle:
    if integer:
        tensors = [torch.arange(1, 7).reshape(2, 3), torch.arange(2, 4), torch.tensor(5)]
    else:  # float64: float_power_ writes nothing else; values in (0.1, 0.9) suit every op's domain
        tensors = [torch.rand(2, 3, dtype=torch.float64) * 0.8 + 0.1, torch.rand(2, dtype=torch.float64) * 0.8 + 0.1,
                   torch.tensor(0.5, dtype=torch.float64)]
    return cls(tensors, ["w", "b", "s"])


# Calls the property tests' do not serve: those of polygamma tell torch.polygamma's argument
# order by the function, which here is a wrapper.
_CALLS = {
    "polygamma": lambda f, x, y: f(x, 1),
    "polygamma_": lambda f, x, y: f(x, 1),
    "copy_": lambda f, x, y: f(x, y),
    "masked_fill_": lambda f, x, y: f(x, y > 0.5, 0.0),
    "requires_grad_": lambda f, x, y: f(x, False),
}


def _out_of_place(name: str) -> str:
    if name not in INPLACE:
        return name
    return "__" + name[3:] if name.startswith("__i") else name[:-1]  # __iand__ -> __and__, abs_ -> abs


def _calls(name: str) -> list:
    if name in _CALLS:
        return [_CALLS[name]]
    if name in INPLACE and name.startswith("__"):  # augmented assignment
        return [lambda f, x, y: f(x, y)]
    base = _out_of_place(name)
    return pointwise_calls(base, is_binary(base))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("lane", ["per-tensor", "tiny"])
@pytest.mark.parametrize("name", sorted(DECLARED - {"real", "imag"}))
def test_each_declared_method_returns_a_bundle_of_the_receivers_class(name, lane, request):
    if lane == "tiny":
        request.getfixturevalue("real_sizes")  # these bundles are under TINY_NUMEL: its lane
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    integer = _out_of_place(name) in INTEGER_OPS
    ran = 0
    for cls in (mt.ParameterBundle, Mine):
        for call in _calls(name):
            receivers = []

            def method(receiver, *args, **kwargs):
                receivers.append(receiver)
                return getattr(type(receiver), name)(receiver, *args, **kwargs)

            x, y = _bundle(cls, integer), _bundle(cls, integer)
            try:
                with torch.no_grad():
                    result = call(method, x, y)
            except Exception as e:  # only where torch refuses the call on the concatenation too
                with pytest.raises(type(e)), torch.no_grad():
                    call(method, x.materialize(), y.materialize())
                continue
            ran += 1
            receiver = receivers[0] if receivers else x  # `2 - x` spells __rsub__ as an operator
            assert type(receiver) is cls, name
            if name in INPLACE:
                assert result is receiver, name
            else:
                assert type(result) is cls, name
    assert ran, f"no call of {name} ran"


@pytest.mark.parametrize("name", ["real", "imag"])
def test_the_real_and_imaginary_parts_are_bundles_of_the_class(name):
    x, y = _bundle(Mine, False), _bundle(Mine, False)
    assert type(getattr(torch.complex(x, y), name)) is Mine
    if name == "real":
        assert type(x.real) is Mine

"""Functions outside the table: computed on the concatenation with a warning, or refused."""

import warnings

import pytest
import torch

import modtensor as mt


def _b():
    return mt.bundle({"w": torch.arange(4.0).reshape(2, 2), "b": torch.ones(2)})


def test_fallback_materializes_with_one_warning_per_call():
    b = _b()
    with pytest.warns(mt.MaterializationWarning) as caught:
        out = torch.cumsum(b, 0)
    assert len(caught) == 1
    assert "torch.cumsum" in str(caught[0].message) and "w (2, 2)" in str(caught[0].message)
    torch.testing.assert_close(out, torch.cumsum(b.materialize(), 0))


def test_fallback_error_mode_names_function_structure_and_remedy():
    b = _b()
    with mt.fallback("error"):
        with pytest.raises(mt.UnsupportedOperationError, match=r"torch.cumsum .*\[w \(2, 2\).*materialize.*@mt.implements"):
            torch.cumsum(b, 0)
    with pytest.warns(mt.MaterializationWarning):
        torch.cumsum(b, 0)  # the previous mode is back


def test_a_call_the_table_declines_is_told_apart_from_a_function_outside_it():
    # torch.all is in the table, but over no dim (each element tested) it is the fallback's
    b = mt.bundle([torch.ones(2), torch.zeros(3)])
    with pytest.warns(mt.MaterializationWarning, match="torch.all is not in modtensor's dispatch table with these arguments"):
        torch.testing.assert_close(torch.all(b, dim=()), torch.all(b.materialize(), dim=()))
    with pytest.warns(mt.MaterializationWarning, match=r"torch.cumsum is not in modtensor's dispatch table: computed"):
        torch.cumsum(b, 0)


def test_fallback_setter_form_and_bad_mode():
    mt.fallback("error")
    with pytest.raises(mt.UnsupportedOperationError):
        torch.cumsum(_b(), 0)
    mt.fallback("materialize")
    with pytest.raises(ValueError, match=r"unknown mode 'loud'. Expect one of"):
        mt.fallback("loud")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "op",
    [
        lambda b: b.cumsum_(0),
        lambda b: b.index_fill_(0, torch.tensor([0]), 1.0),
        lambda b: b.unsqueeze_(0),
        lambda b: torch.nn.functional.relu(b, inplace=True),
        lambda b: torch.add(torch.ones(6), 1, out=b),
        lambda b: b.register_hook(lambda g: g),
    ],
)
def test_in_place_ops_outside_the_table_are_refused_and_write_nothing(op):
    b = _b()
    before = [t.clone() for t in b.tensors]
    with pytest.raises(mt.UnsupportedOperationError, match="temporary copy"):
        op(b)
    assert all(torch.equal(t, s) for t, s in zip(b.tensors, before))


def test_requires_grad_cannot_be_set_through_the_bundle():
    with pytest.raises(mt.UnsupportedOperationError, match="requires_grad"):
        _b().requires_grad = True


def test_bundle_reaching_aten_directly_gets_a_python_error():
    b = _b()
    with torch._C.DisableTorchFunctionSubclass():
        with pytest.raises(mt.UnsupportedOperationError, match="no storage"):
            torch.sum(b)



def test_user_handlers_extend_the_table():
    class Counted(mt.ParameterBundle):
        pass

    @Counted.implements(torch.cumsum)
    def cumsum(func, types, args, kwargs):
        return "custom"

    c = Counted(_b().tensors, _b().names)
    assert torch.cumsum(c, 0) == "custom"
    assert (torch.cumsum, "*") not in mt.ParameterBundle.HANDLERS  # the parent's table is untouched


@pytest.mark.parametrize("sizes", [(3, 2), (3000, 2)], ids=["tiny", "larger"])
@pytest.mark.parametrize(
    "expr",
    [lambda x: x ** "2", lambda x: "2" ** x, lambda x: x ** None, lambda x: None ** x, lambda x: "x" - x,
     lambda x: x == "x", lambda x: x != None],  # noqa: E711 - the comparison is the test
)
def test_refused_operands_raise_as_on_a_tensor_without_a_copy(sizes, expr):
    # An operand that torch's dunders refuse: Python's own TypeError (or False / True for
    # == and !=), as for the concatenation, and no MaterializationWarning on the way.
    ts = [torch.ones(n) for n in sizes]
    cat = torch.cat(ts)
    try:
        want: object = expr(cat)
    except TypeError as e:
        want = e
    with warnings.catch_warnings():
        warnings.simplefilter("error", mt.MaterializationWarning)
        if isinstance(want, TypeError):
            with pytest.raises(TypeError) as got:
                expr(mt.bundle(ts))
            assert str(got.value) == str(want).replace("Tensor", "ParameterBundle")
        else:
            assert expr(mt.bundle(ts)) is want


# The same calls spelled with keywords only; each is in the table when spelled positionally.
KEYWORD_CALLS = {
    "sum": lambda x, t: torch.sum(input=x),
    "mean dim": lambda x, t: torch.mean(input=x, dim=0),
    "amax": lambda x, t: torch.amax(input=x),
    "norm": lambda x, t: torch.norm(input=x),
    "vector_norm": lambda x, t: torch.linalg.vector_norm(x=x, ord=1),
    "vector_norm input=": lambda x, t: torch.linalg.vector_norm(input=x),  # torch takes both names
    "dist": lambda x, t: torch.dist(input=x, other=t),
    "add": lambda x, t: torch.add(input=x, other=t, alpha=2),
    "where": lambda x, t: torch.where(condition=t > 0, input=x, other=t),
    "mse_loss": lambda x, t: torch.nn.functional.mse_loss(input=x, target=t),
    "dot": lambda x, t: torch.dot(input=x, tensor=t),  # torch.dot names its second `tensor`
    "pow of a number": lambda x, t: torch.pow(self=2.0, exponent=x),  # not `input`: left as it is
}


@pytest.mark.parametrize("call", sorted(KEYWORD_CALLS))
@pytest.mark.parametrize("size", [5, 300], ids=["tiny", "large"])
def test_calls_in_keywords_only_are_dispatched_as_positional_ones(call, size, real_sizes):
    model = torch.nn.Linear(size, 3)
    b = mt.bundle(model).detach()
    t = torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", mt.MaterializationWarning)  # no copy: the table served it
        out = KEYWORD_CALLS[call](b, t)
    out = out.materialize() if mt.is_bundle(out) else out
    torch.testing.assert_close(out, KEYWORD_CALLS[call](b.materialize(), t))


def test_a_keyword_only_call_keeps_the_bundles_strategy():
    b = _b().per_param()
    out = torch.sum(input=b)
    assert mt.is_bundle(out) and out.to_dict() == {"w": torch.tensor(6.0), "b": torch.tensor(2.0)}

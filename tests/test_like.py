"""torch.zeros_like, ones_like, full_like and empty_like of a bundle: new bundles shaped like it,
with the values, dtype, device and requires_grad of the same call on the concatenation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modtensor as mt
from generators import FLOATS, INTS, cases
from modtensor._like import LIKE_FUNCTIONS

CALLS = {
    "zeros_like": lambda x, **kw: torch.zeros_like(x, **kw),
    "ones_like": lambda x, **kw: torch.ones_like(x, **kw),
    "full_like": lambda x, **kw: torch.full_like(x, -2.5, **kw),
    "full_like int": lambda x, **kw: torch.full_like(x, 7, **kw),
    "empty_like": lambda x, **kw: torch.empty_like(x, **kw),
    "input=": lambda x, **kw: torch.zeros_like(input=x, **kw),
}
KWARGS = [
    {}, {"dtype": torch.float64}, {"dtype": torch.int32}, {"requires_grad": True}, {"device": "meta"},
    {"memory_format": torch.contiguous_format}, {"memory_format": torch.channels_last},
]


def test_every_like_function_is_tested():
    tested = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
    assert set(LIKE_FUNCTIONS) == tested


@pytest.mark.parametrize("name", CALLS)
@given(case=cases(dtypes=FLOATS + INTS), kwargs=st.sampled_from(KWARGS), strategy=st.sampled_from(["concat", "per_param"]))
def test_like_matches_the_concatenation(name, case, kwargs, strategy):
    call = CALLS[name]
    flat = case.concat().detach()
    b = case.bundle(strategy=strategy)
    try:
        want = call(flat, **kwargs)
    except Exception as e:
        with pytest.raises(type(e)):  # torch's verdict on the concatenation, e.g. channels_last
            call(b, **kwargs)
        return
    integers = any(not t.is_floating_point() for t in case.tensors)
    if strategy != "concat" and kwargs.get("requires_grad") and integers:
        with pytest.raises(TypeError, match=r"requires_grad=True.*hold integers.*dtype="):
            call(b, **kwargs)
        return
    before = [t.detach().clone() for t in case.tensors]
    got = call(b, **kwargs)
    assert type(got) is mt.ParameterBundle and got.names == b.names and got.strategy == strategy
    assert [t.shape for t in got.tensors] == [t.shape for t in case.tensors]
    assert got.device == want.device and got.numel() == want.numel()
    for t, source in zip(got.tensors, case.tensors):
        assert t.device == want.device and t.requires_grad == want.requires_grad and t.is_leaf
        assert t.dtype == (want.dtype if strategy == "concat" or "dtype" in kwargs else source.dtype)
        assert t.data_ptr() != source.data_ptr() or t.numel() == 0  # a new tensor, not a view
    if strategy == "concat":
        assert got.dtype == want.dtype
        if name != "empty_like" and want.device.type != "meta":
            assert torch.equal(got.materialize().detach(), want)
    for t, old in zip(case.tensors, before):  # the sources are left alone
        assert torch.equal(t.detach(), old) or bool(old.isnan().any())


def test_like_keeps_the_subclass_and_is_not_a_fallback():
    class Mine(mt.ParameterBundle):
        pass

    b = Mine([torch.ones(2, 3), torch.ones(4)], ["w", "b"])
    with mt.fallback("error"):
        ema = torch.zeros_like(b)
    assert type(ema) is Mine and [t.shape for t in ema.tensors] == [(2, 3), (4,)]
    ema.lerp_(b, 0.5)  # the EMA buffer use: updated in place, tensor by tensor
    assert torch.equal(ema.materialize(), torch.full((10,), 0.5)) and torch.equal(b.materialize(), torch.ones(10))


def test_arguments_are_checked_as_on_the_concatenation():
    # A conv weight alone takes channels_last; the flat concatenation does not, so neither
    # does the bundle (torch checks the arguments on a stand-in of the concatenation first).
    conv = torch.nn.Conv2d(2, 4, 3)
    b = mt.bundle([conv.weight])
    torch.zeros_like(conv.weight, memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.zeros_like(b, memory_format=torch.channels_last)
    with pytest.raises(TypeError):
        torch.full_like(b, "one")
    with pytest.raises(TypeError):
        torch.full_like(mt.bundle({}), "one")  # no tensor to make, still checked

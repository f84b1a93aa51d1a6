"""Every reduction in the table, every spelling, equals the reduction of torch.cat(...)."""

import itertools
import math
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given

import modtensor as mt
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


def test_torchs_dtype_rules_for_norms_and_nanmean():
    # Both refuse integer input whatever dtype= says (mean takes it); a norm of complex and
    # real tensors together converts the real ones, as the concatenation does.
    ints = mt.bundle([torch.tensor([1, 2, 3]), torch.tensor([4])])
    for call in (
        lambda x: torch.nanmean(x, dtype=torch.float32),
        lambda x: torch.linalg.vector_norm(x, dtype=torch.float64),
        lambda x: torch.norm(x, p=1, dtype=torch.float64),
    ):
        with pytest.raises(RuntimeError):
            call(ints.materialize())
        with pytest.raises(RuntimeError, match=r"needs a floating point or complex dtype.*b\.float\(\)`\.$"):
            call(ints)
    torch.testing.assert_close(torch.mean(ints, dtype=torch.float32), torch.tensor(2.5))
    real = mt.bundle([torch.randn(3, 4), torch.randn(5)])
    with pytest.raises(RuntimeError, match="dtype should be real for real inputs"):
        torch.linalg.vector_norm(real, dtype=torch.complex128)
    mixed = mt.bundle([torch.randn(3, 4, dtype=torch.cfloat), torch.randn(5)])
    with pytest.raises(RuntimeError, match="dtype should be complex for complex inputs"):
        torch.linalg.vector_norm(mixed, dtype=torch.float64)
    for p in (0, 1, 2, 3, float("inf")):
        torch.testing.assert_close(torch.linalg.vector_norm(mixed, p), torch.linalg.vector_norm(mixed.materialize(), p))


def test_integer_tensors_are_reduced_as_the_concatenation_converts_them():
    # torch.cat converts them to the floating dtype first, which rounds: 70000 is inf in
    # float16, 2**24 + 1 is 2**24 in float32. The partials used to see the exact integers.
    cases = [
        [torch.zeros(5000, dtype=torch.float16), torch.tensor([70000, 2049])],
        [torch.zeros(50), torch.tensor([2**24 + 1] * 4)],
        [torch.ones(3, dtype=torch.bfloat16), torch.tensor([1000001], dtype=torch.int32)],
    ]
    calls = [
        lambda x: x.mean(), lambda x: x.sum(dtype=torch.float64), lambda x: torch.nansum(x, dtype=torch.float64),
        lambda x: x.mean(dtype=torch.float64), lambda x: x.std(), lambda x: x.norm(dtype=torch.float64),
        lambda x: x.prod(dtype=torch.float64),
    ]
    for tensors in cases:
        b = mt.bundle(tensors)
        for call in calls:
            torch.testing.assert_close(call(b), call(b.materialize()), equal_nan=True)


@pytest.mark.parametrize("call", [torch.sum, torch.mean, torch.prod], ids=["sum", "mean", "prod"])
def test_real_tensors_of_a_complex_bundle_get_real_gradients(call):
    # torch has no backward for a real tensor summed with a complex dtype=; the concatenation
    # converts it first. The bundle's backward raised inside autograd.
    def leaves():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(3000, dtype=torch.complex64, generator=g).requires_grad_(),
                (1 + 0.001 * torch.randn(2000, generator=g)).requires_grad_()]

    ours, theirs = leaves(), leaves()
    got, want = call(mt.bundle(ours)), call(torch.cat([t.reshape(-1) for t in theirs]))
    torch.testing.assert_close(got, want)
    (got.real + got.imag).backward()
    (want.real + want.imag).backward()
    for a, b in zip(ours, theirs):
        assert a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad, b.grad)


NORM_AND_LOGSUMEXP_ARGUMENTS = [
    (torch.linalg.norm, ("fro",), {}), (torch.linalg.norm, ("fro",), {"dim": 0}), (torch.linalg.norm, ("nuc",), {}),
    (torch.linalg.norm, (None,), {}), (torch.linalg.vector_norm, ("fro",), {}), (torch.norm, ("fro",), {}),
    (torch.Tensor.norm, ("fro",), {}), (torch.norm, ("nuc",), {}),
    (torch.logsumexp, ((),), {}), (torch.logsumexp, ([],), {}), (torch.logsumexp, ((),), {"keepdim": True}),
    (torch.logsumexp, (0,), {}),
    # not numbers: torch.norm passes ord on to vector_norm, whose parser raises TypeError
    (torch.norm, ((1,),), {}), (torch.Tensor.norm, ([2],), {}), (torch.norm, (torch.tensor([2.0]),), {}),
    (torch.linalg.vector_norm, (1j,), {}), (torch.norm, (1j,), {}),
]


@pytest.mark.parametrize("f, args, kwargs", NORM_AND_LOGSUMEXP_ARGUMENTS)
@pytest.mark.parametrize("shapes", [[(3000, 2), (100,)], [(3,)], [(0,)]], ids=["long", "tiny", "empty"])
def test_norm_orders_and_logsumexp_dims_torch_refuses(f, args, kwargs, shapes):
    # 'fro' is a vector norm for torch.norm only; torch.linalg.norm takes a string as a matrix
    # norm (refused for the 1-D concatenation), vector_norm refuses it; torch's logsumexp
    # refuses dim=() without keepdim. The bundle returned numbers.
    ts = [torch.randn(s) for s in shapes]
    cat = torch.cat([t.reshape(-1) for t in ts])
    try:
        want = f(cat, *args, **kwargs)
    except Exception as e:
        # (vector_norm's TypeError comes from torch's argument parser, before any bundle code)
        with pytest.raises(type(e), match=None if isinstance(e, TypeError) else r"ParameterBundle of \d tensors"):
            f(mt.bundle(ts), *args, **kwargs)
        return
    got = f(mt.bundle(ts), *args, **kwargs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("f", [torch.all, torch.any, torch.Tensor.all, torch.Tensor.any])
@pytest.mark.parametrize("dim", [(), []])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8])
def test_all_and_any_over_no_dim_test_each_element(f, dim, keepdim, dtype):
    # torch's all / any with dim=() reduce over no dim: the result is the input's shape. A
    # bundle past the tiny size returned one 0-d answer for the whole bundle.
    g = torch.Generator().manual_seed(0)
    ts = [torch.randint(0, 3, s, generator=g).to(dtype) for s in [(3000, 2), (100,)]]
    b = mt.bundle(ts)
    want = f(b.materialize(), dim=dim, keepdim=keepdim)
    with pytest.warns(mt.MaterializationWarning):
        got = f(b, dim=dim, keepdim=keepdim)
    assert got.shape == want.shape == (6100,) and got.dtype == want.dtype
    assert torch.equal(got, want)


# (torch.sum and the other C functions check dtype= before the bundle sees the call; the
# bundle's methods and torch.norm, a Python function, do not)
@pytest.mark.parametrize(
    "f", [
        *(lambda x, name=name, **kwargs: getattr(x, name)(**kwargs) for name in ("sum", "mean", "norm")),
        torch.norm,
    ],
    ids=["sum", "mean", "norm", "torch.norm"],
)
@pytest.mark.parametrize("dtype", ["float64", 3])
@pytest.mark.parametrize("shapes", [[(3000, 2), (100,)], [(3,), (2, 2)]], ids=["long", "tiny"])
def test_a_dtype_that_is_not_a_torch_dtype_is_a_type_error(f, dtype, shapes):
    # torch's parser raises TypeError; the bundle read `dtype.is_floating_point` and raised
    # AttributeError, naming nothing.
    ts = [torch.randn(s) for s in shapes]
    with pytest.raises(TypeError):
        f(torch.cat([t.reshape(-1) for t in ts]), dtype=dtype)
    with pytest.raises(TypeError, match=r"must be torch\.dtype, not .*ParameterBundle of 2 tensors"):
        f(mt.bundle(ts), dtype=dtype)


@pytest.mark.parametrize("f", [torch.mean, torch.nanmean, torch.Tensor.mean, torch.Tensor.nanmean])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("bundle_dtype", [torch.float32, torch.float16, torch.int64])
@pytest.mark.parametrize("shapes", [[(3000, 2), (100,)], [(3,), (2, 2)]], ids=["long", "tiny"])
def test_a_mean_with_an_integer_dtype_is_refused(f, dtype, bundle_dtype, shapes):
    # torch refuses dtype= other than floating or complex for mean and nanmean. nanmean of a
    # long float bundle returned an integer, and mean's message said the bundle concatenates to
    # the dtype= given.
    g = torch.Generator().manual_seed(0)
    b = mt.bundle([(torch.randn(s, generator=g) * 3).to(bundle_dtype) for s in shapes])
    with pytest.raises(RuntimeError):
        f(b.materialize(), dtype=dtype)
    with pytest.raises(RuntimeError, match=rf"dtype={dtype} cannot hold a mean.*ParameterBundle of 2 tensors"):
        f(b, dtype=dtype)


@pytest.mark.parametrize("f", [torch.norm, torch.Tensor.norm, torch.linalg.vector_norm, torch.linalg.norm])
@pytest.mark.parametrize(
    "bundle_dtype, dtype",
    [(torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
     (torch.float64, torch.float32), (torch.complex128, torch.complex64)],
)
@pytest.mark.parametrize("shapes", [[(3000, 2), (100,)], [(3,), (2, 2)]], ids=["long", "tiny"])
def test_a_norm_with_a_narrower_dtype_is_refused(f, bundle_dtype, dtype, shapes):
    # torch's vector_norm refuses a dtype= the input's dtype would narrow to; the bundle
    # returned a number (float32 weights with dtype=torch.float16, for one).
    g = torch.Generator().manual_seed(0)
    b = mt.bundle([torch.randn(s, generator=g).to(bundle_dtype) for s in shapes])
    with pytest.raises(RuntimeError, match="without narrowing"):
        f(b.materialize(), dtype=dtype)
    with pytest.raises(RuntimeError, match=r"would narrow.*ParameterBundle of 2 tensors"):
        f(b, dtype=dtype)
    wide = torch.promote_types(bundle_dtype, torch.float32 if not dtype.is_complex else torch.complex64)
    torch.testing.assert_close(f(b, dtype=wide), f(b.materialize(), dtype=wide))


@pytest.mark.parametrize("f", [torch.norm, torch.Tensor.norm, torch.linalg.vector_norm, torch.linalg.norm])
@pytest.mark.parametrize(
    "ord", [True, False, np.int64(1), np.float32(3.0), torch.tensor(2), torch.tensor(0.5, dtype=torch.float64)],
    ids=["True", "False", "np.int64", "np.float32", "int tensor", "float64 tensor"],
)
@pytest.mark.parametrize("shapes", [[(3000, 2), (100,)], [(3,), (2, 2)]], ids=["long", "tiny"])
def test_norm_orders_torch_takes_as_numbers(f, ord, shapes):
    # torch takes any real number as ord (True as 1, NumPy scalars, 0-d tensors); the bundle
    # refused them as matrix norms.
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in shapes]
    want = f(torch.cat([t.reshape(-1) for t in ts]), ord)
    got = f(mt.bundle(ts), ord)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: torch.amax(x, out=None), lambda x: torch.amin(x, 0, out=None),
        lambda x: torch.argmax(x, out=None), lambda x: torch.std(x, out=None),
        lambda x: torch.var(x, 0, out=None), lambda x: torch.mean(x, out=None),
        lambda x: torch.nansum(x, out=None), lambda x: torch.logsumexp(x, 0, out=None),
        lambda x: torch.all(x, out=None), lambda x: torch.linalg.vector_norm(x, out=None),
    ],
)
def test_an_explicit_out_none_is_torchs_default(call):
    # (it raised "unexpected keyword argument 'out'", as the order statistics did)
    b = mt.bundle([torch.randn(3, 4), torch.randn(5)])
    want = call(b.materialize())
    got = call(b)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dim", [torch.tensor(0), torch.tensor([-1]), np.int64(0), (torch.tensor(0),)], ids=repr)
@pytest.mark.parametrize(
    "call",
    [
        lambda x, d: torch.sum(x, dim=d), lambda x, d: x.mean(d), lambda x, d: torch.amax(x, d, keepdim=True),
        lambda x, d: torch.std(x, d), lambda x, d: torch.linalg.vector_norm(x, dim=d),
        lambda x, d: torch.logsumexp(x, d),
    ],
)
def test_dims_torch_takes_as_ints(call, dim):
    # an integer tensor or a NumPy integer: torch reads them as the int (a TypeError before)
    b = mt.bundle([torch.randn(3, 4), torch.randn(5)])
    want = call(b.materialize(), dim)
    got = call(b, dim)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("func", [torch.max, torch.min])
def test_max_with_a_tensor_dim_keyword_reduces(func):
    # `torch.max(b, dim=torch.tensor(0))` is a reduction over dim 0; it was taken for torch.max(b,
    # other) and gave an elementwise bundle of the tensor's size
    b = mt.bundle([torch.randn(3, 4), torch.randn(5)])
    for dim, keepdim in ((torch.tensor(0), False), (np.int64(-1), True)):
        got, want = func(b, dim=dim, keepdim=keepdim), func(b.materialize(), dim=dim, keepdim=keepdim)
        torch.testing.assert_close(got.values, want.values)
        assert torch.equal(got.indices, want.indices)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "call",
    [torch.sum, torch.nansum, torch.mean, torch.nanmean],
    ids=["sum", "nansum", "mean", "nanmean"],
)
@pytest.mark.parametrize("sizes", ["per_tensor", "real"])
def test_a_16_bit_dtype_converts_each_element_before_adding(request, call, dtype, sizes):
    # torch converts the input to dtype= first: 7e4 is inf in float16 (inf - inf is NaN), and
    # 1 + 3 * 2**-9 rounds up in bfloat16 (1000 of them add to 1008). The partials were added
    # in float32 from the unrounded elements (NaN became 0, 1008 became 1004).
    if sizes == "real":
        request.getfixturevalue("real_sizes")  # small tensors packed, in float64
    big = [torch.zeros(20000)] if sizes == "real" else []
    floats = big + [torch.full((600,), 1 + 3 * 2**-9), torch.full((400,), 1 + 3 * 2**-9), torch.tensor([7e4, -7e4])]
    bundles = [mt.bundle(floats), mt.bundle([torch.full((30,), 1.25).half(), torch.tensor([1.0 + 2**-9]).half()])]
    if call is not torch.nanmean:  # which refuses integers whatever dtype= says
        bundles.append(mt.bundle(big + [torch.tensor([70000, -70000]), torch.arange(10)]))
    for b in bundles:
        expected = call(b.materialize(), dtype=dtype)
        torch.testing.assert_close(call(b, dtype=dtype), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("sizes", ["per_tensor", "real"])
def test_nanmean_rounds_its_sum_to_the_dtype_before_dividing(request, dtype, sizes):
    # torch's nanmean is nansum(x) / count, the sum rounded to the dtype: past 65504 a float16
    # nanmean is inf. The bundle divided its wider sum (23.5).
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    huge = torch.finfo(dtype).max / 1.5
    tensors = [torch.linspace(-3.0, 2.0, 5000).to(dtype), torch.tensor([huge, math.nan, huge], dtype=dtype)]
    for b in (mt.bundle(tensors), mt.bundle(tensors[::-1])):
        for call in (lambda x: torch.nanmean(x), lambda x: x.nanmean(0, keepdim=True)):
            torch.testing.assert_close(call(b), call(b.materialize()), equal_nan=True)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_mean_whose_sum_overflows_its_accumulator_is_torchs(dtype, requires_grad):
    # torch's mean divides its sum, taken in float32 for float32 (float16's and bfloat16's too,
    # where it stays finite): of float32 values whose sum passes 3.4e38 it is inf in any order
    # of addition; the bundle's was the mean itself (each tensor's sum is in range).
    big = torch.finfo(dtype).max / 2

    def make():
        tensors = [torch.full((2,), big / 2, dtype=dtype) for _ in range(3)] + [torch.full((5,), -big / 8, dtype=dtype)]
        return [t.requires_grad_(requires_grad) for t in tensors]

    if requires_grad:
        got, expected = _value_and_grads(torch.mean, make)
    else:
        got, expected = [torch.mean(mt.bundle(make()))], [torch.mean(torch.cat(make()))]
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)


@pytest.mark.parametrize("call", [
    lambda x: x.var(), lambda x: torch.std(x), lambda x: torch.var_mean(x, correction=3),
    lambda x: torch.std_mean(x, correction=5000), lambda x: x.var(correction=6000),
], ids=["var", "std", "var_mean", "std_mean", "var-correction"])
@pytest.mark.parametrize("sizes", ["per_tensor", "real"])
def test_var_without_degrees_of_freedom_warns_as_torch_does(request, call, sizes):
    # torch warns where the correction leaves no degrees of freedom (the result is inf or NaN);
    # the bundle's combined var gave the value silently.
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    bundles = [mt.bundle([torch.tensor([2.0]), torch.empty(0)]), mt.bundle([torch.randn(3000), torch.randn(2000)])]
    for b in bundles:
        caught = []
        for x in (b.materialize(), b):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                call(x)
            caught.append([str(m.message).split(" (Triggered")[0] for m in w])
        assert caught[1] == caught[0]



def _value_and_grads(call, make):
    """`call`'s value(s) and the gradient of its first output, on a bundle and on the concatenation."""
    found = []
    for on_bundle in (True, False):
        tensors = make()
        x = mt.bundle(tensors) if on_bundle else torch.cat([t.reshape(-1) for t in tensors])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own degrees-of-freedom warning
            out = call(x)
            outs = out if isinstance(out, tuple) else (out,)
            outs[0].backward()
        found.append((*outs, *(t.grad for t in tensors if t.requires_grad)))
    return found


@pytest.mark.parametrize("call", [
    lambda x: torch.var(x, correction=8000), lambda x: torch.var(x, correction=8001),
    lambda x: x.std(correction=9000), lambda x: torch.var_mean(x, correction=8001),
    lambda x: torch.std_mean(x, correction=8000),
], ids=["var-0", "var-negative", "std", "var_mean", "std_mean"])
def test_var_without_degrees_of_freedom_has_torchs_gradient(call):
    # torch's value divides by max(dof, 0) = 0 and its var gradient is g * inf at every element
    # (std's NaN); the bundle's was finite (divided by dof < 0), or NaN (inf - inf) at dof = 0.
    # Over 4096 elements: per tensor, not the tiny bundles' one call on the concatenation.
    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(3000, dtype=torch.float64, generator=g, requires_grad=True),
                torch.randn(5000, dtype=torch.float64, generator=g)]

    got, expected = _value_and_grads(call, make)
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("call", [
    lambda x: torch.var(x, correction=8000), lambda x: x.var(correction=9000),
    lambda x: torch.var_mean(x, correction=8000), lambda x: sum(torch.var_mean(x, correction=8001)),
], ids=["var-0", "var-negative", "var_mean", "var-plus-mean"])
def test_var_without_degrees_of_freedom_is_nan_at_an_element_equal_to_the_mean(call, dtype):
    # torch 2.13's var gradient without degrees of freedom is g * inf, but NaN at an element
    # exactly equal to the mean; the bundle's was g * inf there too. (The mean here is exactly 0.)
    def make():
        return [torch.tensor([-2.0, 0.0, 1.0, 0.0, 1.0] * 600, dtype=dtype, requires_grad=True),
                torch.tensor([0.0, 1.0, -1.0, 0.0] * 1250, dtype=dtype, requires_grad=True)]

    got, expected = _value_and_grads(call, make)
    assert expected[-1].isnan().any() and expected[-1].isinf().any()
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("call", [torch.var, torch.std, torch.var_mean, torch.std_mean],
                         ids=["var", "std", "var_mean", "std_mean"])
def test_moments_of_an_infinite_tensor_next_to_finite_ones(call, dtype):
    # An all -inf tensor makes the overall mean -inf: M2's path through it was inf - inf, NaN at
    # every element (torch's var gradient is inf at the finite ones), and var_mean's mean was
    # -inf where torch's (Welford's) is NaN.
    def make():
        g = torch.Generator().manual_seed(1)
        return [torch.full((3000,), -math.inf, dtype=dtype, requires_grad=True),
                torch.randn(5000, dtype=dtype, generator=g, requires_grad=True)]

    got, expected = _value_and_grads(call, make)
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)


@pytest.mark.parametrize("call", [torch.var, torch.std, torch.var_mean, torch.std_mean],
                         ids=["var", "std", "var_mean", "std_mean"])
def test_moments_of_float64_tensors_near_the_largest_float(call):
    # Tensors of 1e308 and 1.5e308: the count-weighted sum of the tensors' means overflowed to
    # inf (then inf - inf: NaN var and mean), where torch's (Welford's) mean is 5e304 and its
    # var inf. (Values only: torch's var gradient takes a mean by its sum, which overflows.)
    tensors = [torch.linspace(-3.0, 2.0, 5000, dtype=torch.float64),
               torch.tensor([1e308], dtype=torch.float64), torch.tensor([1.5e308], dtype=torch.float64)]
    got, expected = call(mt.bundle(tensors)), call(torch.cat(tensors))
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("call", [torch.var, torch.var_mean], ids=["var", "var_mean"])
def test_moments_of_a_tensor_holding_inf_have_torchs_gradient(call, dtype):
    # torch's var gradient, 2 (x - mean) / dof with the mean inf, is -inf at each finite
    # element; at those of the tensor holding the inf the bundle's was NaN (its own mean less
    # the overall one: inf - inf).
    def make():
        g = torch.Generator().manual_seed(2)
        holding = torch.randn(3000, dtype=dtype, generator=g)
        holding[7] = math.inf
        return [torch.randn(5000, dtype=dtype, generator=g).requires_grad_(), holding.requires_grad_()]

    got, expected = _value_and_grads(call, make)
    assert expected[-1][0].isinf()  # (a finite element's)
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)


# float32 values whose squares (or sums) pass the float32 range: torch's CPU var, std and their
# _mean forms accumulate in float64, so the concatenation's std (and std_mean's mean) is finite.
_HUGE_FLOAT32 = {
    "2e19": lambda: [torch.randn(20000, generator=torch.Generator().manual_seed(3)) * 2e19,
                     torch.randn(300000, generator=torch.Generator().manual_seed(4)) * 2e19],
    "3e38": lambda: [torch.rand(20000, generator=torch.Generator().manual_seed(5)) * 3e38,
                     torch.rand(300000, generator=torch.Generator().manual_seed(6)) * 3e38],
}


# (var's gradient, 2 (x - mean) / dof, cancels near the mean: past the float32 tolerance there)
@pytest.mark.parametrize(("call", "values", "requires_grad"), [
    (torch.std, "2e19", False), (torch.std, "2e19", True), (torch.std_mean, "2e19", False),
    (torch.std_mean, "2e19", True), (torch.std_mean, "3e38", False),
    (torch.std_mean, "3e38", True),
])
def test_float32_moments_past_the_float32_range(call, values, requires_grad):
    # One tensor's float32 var (past 3.4e38) was inf, so the bundle's std was inf; its float32
    # mean of values up to 3e38 was inf (its sum overflowed), so the bundle's std_mean was NaN.
    def make():
        return [t.requires_grad_(requires_grad) for t in _HUGE_FLOAT32[values]()]

    if requires_grad:
        got, expected = _value_and_grads(call, make)
    else:
        got, expected = ([*torch.atleast_1d(call(x))] for x in (mt.bundle(make()), torch.cat(make())))
    assert expected[1 if call is torch.var_mean else 0].isfinite()  # (var_mean's var is inf)
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)


def _ones(x):
    return x.detach() * 0 + 1


# One call per family: the sums, moments, norms of every order, extrema, logsumexp, order
# statistics, bundle-with-bundle reductions and losses, and the fused chains.
_EMPTY_GRAD_CALLS = {
    "sum": torch.sum, "mean": torch.mean, "nansum": torch.nansum, "nanmean": torch.nanmean,
    "prod": torch.prod, "std": torch.std, "var_mean": torch.var_mean, "std_mean": torch.std_mean,
    "norm": torch.norm, "norm 1": lambda x: x.norm(1), "norm 3": lambda x: x.norm(3),
    "norm inf": lambda x: torch.linalg.vector_norm(x, float("inf")), "norm 0": lambda x: torch.linalg.vector_norm(x, 0),
    "linalg.norm": torch.linalg.norm, "amax": torch.amax, "amin": torch.amin, "max": torch.max,
    "aminmax": torch.aminmax, "min dim": lambda x: torch.min(x, 0), "logsumexp": lambda x: torch.logsumexp(x, 0),
    "mean keepdim": lambda x: x.mean(0, keepdim=True), "quantile": lambda x: torch.quantile(x, 0.3),
    "kthvalue": lambda x: torch.kthvalue(x, 2), "topk": lambda x: torch.topk(x, 2), "median": torch.median,
    "dot": lambda x: torch.dot(x, _ones(x)), "dist": lambda x: torch.dist(x, _ones(x)),
    "cosine": lambda x: torch.nn.functional.cosine_similarity(x, _ones(x), dim=0),
    "mse": lambda x: torch.nn.functional.mse_loss(x, _ones(x)),
    "smooth l1": lambda x: torch.nn.functional.smooth_l1_loss(x, _ones(x)),
    "square sum": lambda x: (x**2).sum(), "difference norm": lambda x: (x - _ones(x)).norm(),
}


@pytest.mark.parametrize("sizes", ["per-tensor", "tiny", "long"])
@pytest.mark.parametrize("trained", ["only empty", "also a long one"])
@pytest.mark.parametrize("name", list(_EMPTY_GRAD_CALLS))
def test_empty_tensors_that_require_grad_are_in_the_graph(request, sizes, trained, name):
    # The concatenation of frozen tensors and an empty one that requires grad requires grad, so
    # its reductions do, and backward gives the empty tensor an empty gradient. The bundle's
    # partials skip empty tensors: its result did not require grad, or the empty tensor got None.
    if sizes != "per-tensor":
        request.getfixturevalue("real_sizes")
    f = _EMPTY_GRAD_CALLS[name]
    n = 5 if sizes == "tiny" else 5000  # tiny: reduced on its concatenation (real sizes)

    def make():
        gen = torch.Generator().manual_seed(0)
        long = torch.randn(n, generator=gen).requires_grad_(trained != "only empty")
        return [long, torch.empty(0, requires_grad=True), torch.randn(3, generator=gen), torch.empty(2, 0, requires_grad=True)]

    def first(result):
        return result[0] if isinstance(result, tuple) else result

    ref, ours = make(), make()
    want, got = first(f(torch.cat([t.reshape(-1) for t in ref]))), first(f(mt.bundle(ours)))
    assert want.requires_grad and got.requires_grad
    torch.testing.assert_close(got, want, check_dtype=False)
    want.sum().backward()
    got.sum().backward()
    for r, o in zip(ref, ours):
        if r.grad is None:  # (torch's order-0 norm has no gradient at all)
            assert o.grad is None or (o.numel() == 0 and o.grad.shape == o.shape)
        else:
            assert o.grad is not None and o.grad.shape == r.grad.shape
            torch.testing.assert_close(o.grad, r.grad)


@pytest.mark.parametrize("strategy", ["per_param", "weighted"])
@pytest.mark.parametrize("name", ["sum", "std", "norm 3", "logsumexp", "dot", "mse"])
def test_empty_tensors_that_require_grad_under_strategies(strategy, name):
    # per_param: the empty tensor's own result requires grad, as torch's on it does. weighted:
    # its default weight (numel) is 0, so it is skipped, but it is linked all the same, as under
    # concat (the default weighted mean is the concatenation's mean).
    f = _EMPTY_GRAD_CALLS[name]
    empty = torch.empty(0, requires_grad=True)
    b = mt.bundle([torch.randn(4), empty])
    got = f(b.per_param() if strategy == "per_param" else b.weighted())
    total = got.materialize().sum() if strategy == "per_param" else got
    assert total.requires_grad
    total.backward()
    assert empty.grad is not None and empty.grad.shape == (0,)


def _inference_survey() -> dict[str, Callable[[Any, Any], Any]]:
    from modtensor._pairwise import PAIRWISE_FUNCTIONS
    from op_specs import PAIRWISE_CALLS

    calls: dict[str, Callable[[Any, Any], Any]] = {}
    for table, specs in ((REDUCTION_FUNCTIONS, REDUCTION_CALLS), (PAIRWISE_FUNCTIONS, PAIRWISE_CALLS)):
        for name, funcs in table.items():
            f = funcs[0] if table is REDUCTION_FUNCTIONS else funcs[0][0]
            for i, call in enumerate(specs[name]):
                calls[f"{name}-{i}"] = lambda x, y, f=f, call=call: call(f, x, y)
    calls.update({
        "topk": lambda x, y: torch.topk(x, 3), "median": lambda x, y: x.median(),
        "kthvalue": lambda x, y: torch.kthvalue(x, 4), "quantile": lambda x, y: torch.quantile(x, 0.25),
        "elementwise": lambda x, y: (x * 2 - y).exp(), "square-sum": lambda x, y: (x ** 2).sum(),
        "index": lambda x, y: x[x > 0],
    })
    return calls


INFERENCE_CALLS = _inference_survey()


def _leaves(result: Any) -> list[Any]:
    return list(result) if isinstance(result, tuple) else [result]


def _on_bundles_and_on_the_concatenation(
    call: Callable[..., Any], first: list[torch.Tensor], second: list[torch.Tensor], trained: list[torch.Tensor],
    mode: str = "after it",
) -> tuple[Any, Any]:
    """`call(first, second)` on bundles and on the concatenations, in `mode`: each side's results,
    whether they require grad, and the gradients of `trained` (or the type of its RuntimeError)."""

    def run(make: Callable[[list[torch.Tensor]], Any]) -> Any:
        for p in trained:
            p.grad = None
        with torch.inference_mode(mode != "after it"), torch.set_grad_enabled(mode != "in inference_mode"):
            try:
                result = _leaves(call(make(first), make(second)))
            except RuntimeError as e:
                return type(e)
            out = [r.materialize() if mt.is_bundle(r) else r for r in result]
            needs = [r.requires_grad for r in out if isinstance(r, torch.Tensor)]
            if any(needs):
                sum(r.float().sum() for r in out if isinstance(r, torch.Tensor) and r.requires_grad).backward()
        return out, needs, [p.grad for p in trained]

    return run(mt.bundle), run(lambda ts: torch.cat([t.reshape(-1) for t in ts]))


@pytest.mark.parametrize("name", sorted(INFERENCE_CALLS))
@pytest.mark.parametrize("mode", ["after it", "in inference_mode", "in inference_mode with grad"])
@pytest.mark.parametrize("size", [3, 1100], ids=["tiny", "large"])  # tiny: the lane; large: row norms
def test_reductions_of_parameters_made_in_inference_mode(name, mode, size, real_sizes):
    # Parameters made under inference_mode are inference tensors that require grad. torch
    # records no graph through their views, so the concatenation does not require grad through
    # them; the bundle's norm, dist, cosine_similarity, the losses saved them for backward and
    # raised "Inference tensors cannot be saved for backward", median "Inference tensors do not
    # track version counter"; and inside inference_mode, with grad mode on, the bundle's
    # results required grad or raised where the concatenation's do not.
    torch.manual_seed(0)
    with torch.inference_mode():
        made_inside = nn.Linear(size, 4)
    other = nn.Linear(2, 3)  # an ordinary one, whose gradients must still be the concatenation's
    params = [*made_inside.parameters(), *other.parameters()]
    y = [torch.randn_like(p) for p in params]
    got, want = _on_bundles_and_on_the_concatenation(INFERENCE_CALLS[name], params, y, list(other.parameters()), mode)
    if not isinstance(want, tuple):
        assert got is want
        return
    assert not isinstance(got, type), got
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("name", sorted(INFERENCE_CALLS))
@pytest.mark.parametrize("size", [3, 1100], ids=["tiny", "large"])
def test_an_operand_made_in_inference_mode_beside_one_that_requires_grad(name, size, real_sizes):
    # A reference made under inference_mode (frozen, no grad), the trained parameters ordinary:
    # `torch.dist(mt.bundle(model), mt.bundle(reference))` saved the reference's inference
    # tensors for backward and raised, where the concatenation of them (a copy) is saved.
    torch.manual_seed(0)
    trained = list(nn.Linear(size, 4).parameters())
    with torch.inference_mode():
        reference = [torch.randn_like(p) for p in trained]
    got, want = _on_bundles_and_on_the_concatenation(INFERENCE_CALLS[name], trained, reference, trained)
    assert isinstance(want, tuple), want  # the concatenation's call works
    assert not isinstance(got, type), got
    torch.testing.assert_close(got, want, equal_nan=True)


_INTS = [torch.ones(3, dtype=torch.int64), torch.ones(2, 2, dtype=torch.int64)]
_FLOATS = [torch.ones(3), torch.ones(2, 2)]
_COMPLEX = [torch.ones(3, dtype=torch.complex64), torch.ones(2, 2, dtype=torch.complex64)]
TWO_BAD_ARGUMENTS = {
    "mean of ints, dim 5": (_INTS, lambda x: x.mean(5)),
    "mean, int dtype, dim 5": (_FLOATS, lambda x: x.mean(5, dtype=torch.int64)),
    "nanmean of ints, dim 5": (_INTS, lambda x: x.nanmean(5, dtype=torch.float32)),
    "var of ints, dim 5": (_INTS, lambda x: x.var(5)),
    "std of ints, dims (5, 5)": (_INTS, lambda x: torch.std(x, (5, 5))),
    "std_mean of ints, dim 5": (_INTS, lambda x: torch.std_mean(x, 5)),
    "norm of ints, dim 5": (_INTS, lambda x: x.norm(dim=5)),
    "vector_norm, complex dtype, dim 5": (_FLOATS, lambda x: torch.linalg.vector_norm(x, dim=5, dtype=torch.complex64)),
    "vector_norm, narrowing dtype, dim 5": (_FLOATS, lambda x: torch.linalg.vector_norm(x, dim=5, dtype=torch.float16)),
    "vector_norm of complex, real dtype, dim 5": (_COMPLEX, lambda x: torch.linalg.vector_norm(x, dim=5, dtype=torch.float32)),
    # a dim of the wrong type is torch's argument parser's error, before the dtype's
    "mean of ints, dim 'a'": (_INTS, lambda x: x.mean("a")),
    "std of ints, dims (5, 'a')": (_INTS, lambda x: x.std((5, "a"))),
    "norm of ints, dim 'a'": (_INTS, lambda x: x.norm(dim="a")),
}


@pytest.mark.parametrize("name", sorted(TWO_BAD_ARGUMENTS))
def test_of_two_bad_arguments_the_one_torch_checks_first_decides(name):
    # The bundle checked the dim's range before the dtype, so it raised IndexError where torch
    # raises its RuntimeError for the dtype (and IndexError for 5 before TypeError for 'a').
    tensors, call = TWO_BAD_ARGUMENTS[name]
    with pytest.raises(Exception) as want:
        call(torch.cat([t.reshape(-1) for t in tensors]))
    with pytest.raises(want.type):
        call(mt.bundle(tensors))


_SPECIALS = [float("inf"), -float("inf"), float("nan"), 0.5]


@pytest.mark.parametrize("call", [
    lambda x: torch.logsumexp(x, 0), lambda x: torch.logsumexp(x, -1, keepdim=True),
    lambda x: x.logsumexp(dim=(0,)), lambda x: torch.special.logsumexp(x, [0], keepdim=True),
], ids=["logsumexp", "keepdim", "Tensor", "special"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("sizes", ["per_tensor", "real"])
def test_logsumexp_with_infinite_or_nan_elements_has_the_concatenations_gradient(request, call, dtype, sizes):
    # torch's gradient is exp(x - result): with a tensor [inf, 0.5] NaN at inf and 0 at 0.5; an
    # all -inf tensor next to finite ones gets 0. A logsumexp of per-tensor logsumexps made every
    # element of a tensor whose logsumexp is infinite NaN (exp(inf - inf), exp(-inf + inf)).
    if sizes == "real":
        request.getfixturevalue("real_sizes")  # 5002 elements: past the tiny lane
    long = torch.linspace(-3.0, 1.0, 5000 if sizes == "real" else 5, dtype=dtype)
    for x, y, z in itertools.product(_SPECIALS, repeat=3):
        values = [torch.tensor([x, y], dtype=dtype), torch.tensor([z], dtype=dtype), long, torch.full((3,), y, dtype=dtype)]
        leaves = [v.clone().requires_grad_() for v in values]
        copies = [v.clone().requires_grad_() for v in values]
        got, want = call(mt.bundle(leaves)), call(torch.cat(copies))
        torch.testing.assert_close(got, want, equal_nan=True)
        for g, w in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), copies)):
            torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{[x, y, z]}: {m}")


@pytest.mark.parametrize("strategy", ["per_param", "weighted"])
def test_logsumexp_of_each_tensor_with_infinite_elements_is_torchs(strategy):
    inf = float("inf")
    values = [torch.tensor([inf, 0.5]), torch.tensor([-inf, -inf]), torch.tensor([0.25, -1.0])]
    weights = [1.0, 2.0, 3.0]
    leaves = [v.clone().requires_grad_() for v in values]
    copies = [v.clone().requires_grad_() for v in values]
    options = {"weights": weights} if strategy == "weighted" else {}
    got = torch.logsumexp(mt.bundle(leaves, strategy=strategy, **options), 0)
    each = [torch.logsumexp(c, 0) for c in copies]
    if strategy == "per_param":
        got, want = torch.stack(got.tensors), torch.stack(each)
    else:
        want = sum(w * e for w, e in zip(weights, each)) / sum(weights)
    torch.testing.assert_close(got, want, equal_nan=True)
    for g, w in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), copies)):
        torch.testing.assert_close(g, w, equal_nan=True)


_RUNS = {"overflows": 300.0, "underflows": 1e-4, "negative": -1.0, "zero": 0.0, "inf": float("inf")}


def _prod_runs(order, dtype):
    scale = 1.0 if dtype == torch.float16 else 1e30
    tensors = []
    for run in order:
        value = _RUNS[run] * (scale if run == "overflows" else 1 / scale if run == "underflows" else 1.0)
        tensors.append(torch.full((3000 if run in ("overflows", "underflows") else 3,), value, dtype=dtype))
    return tensors


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("order", [
    ("overflows", "underflows"), ("underflows", "overflows"), ("underflows", "negative", "overflows"),
    ("overflows", "underflows", "zero"), ("underflows", "overflows", "inf"), ("overflows", "zero", "underflows"),
    ("underflows", "zero", "overflows"),
])
def test_prod_of_tensors_that_overflow_and_underflow_is_the_concatenations(dtype, order):
    # torch multiplies in the concatenation's dtype, and a product that reached inf or 0 stays
    # there (unless a later element is an exact 0 or inf): one tensor's product that overflowed
    # times another's that underflowed was NaN (inf * 0) where the concatenation's is inf or 0.
    tensors = _prod_runs(order, dtype)
    want = torch.cat(tensors).prod()
    assert want.isnan() == torch.prod(mt.bundle(tensors)).isnan()
    torch.testing.assert_close(torch.prod(mt.bundle(tensors)), want, equal_nan=True)
    torch.testing.assert_close(mt.bundle(tensors).prod(0, keepdim=True), torch.cat(tensors).prod(0, keepdim=True), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("order", [
    ("overflows", "negative"), ("negative", "underflows"), ("overflows", "underflows"), ("underflows", "overflows"),
    ("negative", "overflows", "inf"), ("underflows", "overflows", "inf"), ("negative", "negative", "negative"),
])
def test_prod_gradient_through_a_tensor_whose_product_overflows(dtype, order):
    # torch's gradient (no zero element) is g * result / x: inf where the product overflowed,
    # 0 where it underflowed. Through a tensor's own product that overflowed or underflowed it
    # was NaN: result / product, inf / inf or 0 / 0.
    got, expected = _value_and_grads(torch.prod, lambda: [t.requires_grad_() for t in _prod_runs(order, dtype)])
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)
    got, expected = _value_and_grads(  # with dtype=, torch converts the concatenation first
        lambda x: x.prod(dtype=torch.float64), lambda: [t.requires_grad_() for t in _prod_runs(order, dtype)]
    )
    for mine, torchs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, torchs, equal_nan=True)


_NORM_SPECIALS = {"-inf": [-math.inf] * 3, "inf": [math.inf, math.inf], "inf and 1": [math.inf, 1.0],
                  "zeros": [0.0, 0.0], "0 and 2": [0.0, 2.0], "finite": [0.5, -2.0, 3.0]}


@pytest.mark.parametrize("ord", [-3.0, -1.0, -0.5, 0.5, 1.5], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("call", [
    lambda x, o: torch.linalg.vector_norm(x, ord=o), lambda x, o: torch.dist(x, x.detach() * 0, o),
], ids=["vector_norm", "dist"])
def test_norms_of_infinite_or_zero_tensors_have_the_concatenations_gradient(call, dtype, ord):
    # torch's gradient for p < 1 is sgn(x) * |x| ** (p - 1) * norm ** (1 - p) (0 at x = 0):
    # -0 at an all -inf tensor beside finite ones. Through the tensor's own norm (inf) it was
    # 0 * inf: NaN at every element of it, and likewise for a tensor [inf, 1] with p in (0, 1).
    long = torch.linspace(-3.0, 2.0, 5000, dtype=dtype)
    for first, second in itertools.product(_NORM_SPECIALS.values(), repeat=2):
        values = [torch.tensor(first, dtype=dtype), torch.tensor(second, dtype=dtype), long]
        leaves = [v.clone().requires_grad_() for v in values]
        copies = [v.clone().requires_grad_() for v in values]
        got, want = call(mt.bundle(leaves), ord), call(torch.cat(copies), ord)
        torch.testing.assert_close(got, want, equal_nan=True)
        for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, copies)):
            torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{first}, {second}: {m}")

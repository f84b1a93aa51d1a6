"""Indexing a bundle follows the concatenation."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modtensor as mt
from generators import cases, check_against_concat, peak_allocation


@given(case=cases(min_tensors=1), data=st.data())
def test_int_index(case, data):
    n = case.bundle().numel()
    i = data.draw(st.integers(-n - 2, n + 1))
    check_against_concat(case, lambda x, y: x[i])
    check_against_concat(case, lambda x, y: x[torch.tensor(i)])


@given(case=cases(), data=st.data())
def test_slice(case, data):
    n = case.bundle().numel()
    bounds = st.one_of(st.none(), st.integers(-n - 2, n + 2))
    s = slice(data.draw(bounds), data.draw(bounds), data.draw(st.one_of(st.none(), st.integers(1, 4))))
    # (a slice within one tensor is a view of it, as README says: of a frozen one, it does not
    # require grad where the concatenation's slice does)
    check_against_concat(case, lambda x, y: x[s], same_requires_grad=False)


@given(case=cases())
def test_boolean_mask_bundle_and_flat(case):
    check_against_concat(case, lambda x, y: x[x > 0])
    check_against_concat(case, lambda x, y: x[(x > 0).materialize() if isinstance(x, mt.ParameterBundle) else x > 0])


def test_slice_within_one_contiguous_tensor_is_a_view():
    w = torch.arange(6.0).reshape(2, 3)
    b = mt.bundle([torch.ones(2), w])
    view = b[3:6]
    assert view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    torch.testing.assert_close(view, torch.tensor([1.0, 2.0, 3.0]))


def test_index_errors():
    b = mt.bundle([torch.ones(2), torch.ones(3)])
    with pytest.raises(IndexError, match="index 5 is out of bounds for dimension 0 with size 5"):
        b[5]
    with pytest.raises(ValueError, match="step must be greater than zero"):
        b[::-1]


def test_a_mask_of_another_length_is_refused_naming_the_bundle():
    # It used to build the concatenation (with a MaterializationWarning) for torch to refuse it.
    b = mt.bundle([torch.ones(2), torch.ones(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(IndexError, match=r"mask \[4\] at index 0 does not match .* \[5\] .*ParameterBundle of 2"):
            b[torch.ones(4, dtype=torch.bool)]


def test_a_uint8_index_is_a_mask_as_in_torch():
    # torch reads a 0-d uint8 tensor as a (deprecated) byte mask: b[tensor(1, uint8)] is the
    # whole concatenation with a new dim, not element 1, which the bundle used to give.
    b = mt.bundle([torch.arange(2.0), torch.arange(3.0).reshape(1, 3)])
    cat = b.materialize()
    for value in (0, 1):
        index = torch.tensor(value, dtype=torch.uint8)
        with pytest.warns(mt.MaterializationWarning, match="__getitem__"):
            got = b[index]
        want = cat[index]
        assert got.shape == want.shape == (value, 5)
        torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="takes an int or a boolean mask"):  # not element 1 silently
        b[torch.tensor(1, dtype=torch.uint8)] = 7.0
    assert torch.equal(b.materialize(), cat)


def test_numpy_integers_index_as_ints():
    # They fell back to the concatenation (a copy of the whole model, with a warning) to read
    # one element, and `b[np.int64(i)] = v` was refused; torch takes them as ints.
    tensors = [torch.arange(2.0), torch.arange(3.0).reshape(1, 3)]
    b = mt.bundle(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in (0, 3, -1):
            assert torch.equal(b[np.int64(i)], b.materialize()[i])
        b[np.int32(-2)] = 7.0
    assert tensors[1][0, 1] == 7.0


def test_other_indices_fall_back_with_a_warning():
    b = mt.bundle([torch.arange(2.0), torch.arange(3.0)])
    with pytest.warns(mt.MaterializationWarning, match="__getitem__"):
        out = b[torch.tensor([0, 4])]
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0]))


@given(case=cases(kinds=("normal", "special")))
def test_tolist_and_numpy_read_the_concatenation(case):
    b, ref = case.bundle(), case.concat()
    assert b.tolist() == pytest.approx(ref.tolist(), nan_ok=True)
    assert (b.detach().numpy() == ref.detach().numpy()).sum() == (ref == ref).sum()


@pytest.mark.parametrize("convert", [lambda x: x.item(), bool, float, int, complex, lambda x: [0, 1][x.long()]])
def test_scalar_conversions_of_one_element(convert):
    b = mt.bundle([torch.empty(0), torch.tensor([1.0])])
    assert convert(b) == convert(b.materialize())


@pytest.mark.parametrize("convert", [lambda x: x.item(), bool, float])
@pytest.mark.parametrize("n", [0, 3])
def test_scalar_conversions_of_other_counts_raise_like_torch(convert, n):
    b = mt.bundle([torch.ones(n)])
    with pytest.raises(Exception) as want:
        convert(torch.ones(n))
    with pytest.raises(Exception) as got:
        convert(b)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)


@pytest.mark.parametrize("call", [
    lambda x: x[0], lambda x: x[-1], lambda x: x[torch.tensor(4)], lambda x: x[4:7].sum(), lambda x: x[4:4].sum(),
    lambda x: x[::3].sum(), lambda x: x[x > 2.5].sum(),
], ids=["int", "last", "0-d tensor", "slice across tensors", "empty slice", "strided slice", "mask"])
def test_tensors_the_index_misses_get_zero_gradients(call):
    # As from the concatenation's backward; None would make an optimizer skip them.
    def leaves():
        return [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True),
                torch.tensor([10.0, 20.0], requires_grad=True), torch.tensor(5.0, requires_grad=True)]

    ours, theirs = leaves(), leaves()
    call(mt.bundle(ours)).backward()
    call(torch.cat([t.reshape(-1) for t in theirs])).backward()
    for a, b in zip(ours, theirs):
        assert a.grad is not None and torch.equal(a.grad, b.grad)


def test_slice_within_one_tensor_stays_a_view_with_gradients():
    # A view, as documented, even where gradients are recorded: reading it after its tensor
    # was written (an optimizer step) works; the other tensors get no gradient from it.
    w = torch.arange(6.0, requires_grad=True)
    bias = torch.ones(2, requires_grad=True)
    view = mt.bundle([bias, w])[3:6]
    assert view.requires_grad and view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    with torch.no_grad():
        w[2] = 40.0
    torch.testing.assert_close(view, torch.tensor([1.0, 40.0, 3.0]))
    view.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    assert bias.grad is None


@pytest.mark.parametrize("kind", ["non-contiguous", "cast"])
def test_slice_within_a_tensor_that_is_no_view_gives_the_others_zeros(kind):
    # Only a contiguous tensor of the bundle's dtype gives a view; a slice of any other is a
    # copy, and the tensors it misses get zero gradients, as from the concatenation.
    w = torch.arange(6.0, dtype=torch.float64).reshape(2, 3).t().requires_grad_()
    if kind == "cast":
        w = torch.arange(6.0, dtype=torch.float32).requires_grad_()
    bias = torch.ones(2, dtype=torch.float64, requires_grad=True)
    mt.bundle([bias, w])[3:6].sum().backward()
    want_w = torch.zeros(6, dtype=w.dtype)
    want_w[1:4] = 1.0
    torch.testing.assert_close(w.grad.reshape(-1), want_w)
    torch.testing.assert_close(bias.grad, torch.zeros(2, dtype=torch.float64))


def test_slices_of_cast_or_non_contiguous_tensors_keep_no_whole_copy():
    # A slice was taken of each tensor's whole flat copy (cast to the concatenation's dtype,
    # or out of a non-contiguous layout): ten elements kept a tensor's size alive, and a
    # strided slice every such tensor's at once until the cat.
    n = 1 << 20
    b = mt.bundle([torch.randn(n).half(), torch.randn(1024, 2048)[:, ::2], torch.randn(n)])
    cat = b.materialize()
    for index in (slice(10, 20), slice(n + 10, n + 20), slice(None, None, 1000)):
        got, peak = peak_allocation(lambda: b[index])
        assert torch.equal(got, cat[index])
        assert got.untyped_storage().nbytes() == got.numel() * 4, index
        assert peak < n * 4, (index, peak)  # less than one tensor's copy


def test_mask_index_copies_each_selection_into_place():
    # The cat held every tensor's selection (and indexing's int64 indices) with the result:
    # 4x the largest tensor here, where the result is 2x.
    n = 1 << 21
    b = mt.bundle([torch.randn(n) for _ in range(4)])
    mask = mt.bundle([torch.randn(n) > 0 for _ in range(4)])
    cat, flat_mask = b.materialize(), mask.materialize()
    for m, cat_mask in ((mask, flat_mask), (flat_mask, flat_mask), (b > 0, cat > 0)):
        got, peak = peak_allocation(lambda: b[m])
        assert torch.equal(got, cat[cat_mask])
        assert peak < 1.5 * got.numel() * 4, peak  # the result and a chunk's selection
    mixed = mt.bundle([torch.randn(3, 5).half().t(), torch.randn(n // 2).double(), torch.empty(0)])
    m = torch.rand(mixed.numel()) > 0.3
    want = mixed.materialize()[m]
    got = mixed[m]
    assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("strategy", ["concat", "per_param"])
def test_an_int_index_is_a_copy_as_the_concatenations_element(mode, strategy):
    # The element was a view of its tensor where no gradient was recorded: `b[i].add_(1)`
    # wrote the parameter, under no_grad it required grad (as views of such a tensor do), and
    # of an inference tensor it was one (its `add_` refused outside inference mode).
    with torch.inference_mode():
        frozen = torch.randn(30, requires_grad=True)
    tensors = [frozen, torch.randn(4, 5), torch.randn(6, requires_grad=True)]
    before = [t.detach().clone() for t in tensors]
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    for index in [3, 32, 52, -1]:
        with context():
            got = mt.bundle(tensors, strategy=strategy)[index]
            want = torch.cat([t.reshape(-1) for t in tensors])[index]
        assert (got.requires_grad, got.is_inference()) == (want.requires_grad, want.is_inference()), index
        torch.testing.assert_close(got, want)
        with torch.no_grad(), torch.inference_mode(want.is_inference()):
            got.add_(1)
    torch.testing.assert_close([t.detach() for t in tensors], before)


@pytest.mark.parametrize("dtypes", [(torch.complex64, torch.complex64), (torch.float32, torch.complex64)])
@pytest.mark.parametrize("index", [0, 35, -1])
def test_tensors_an_int_index_of_a_complex_bundle_misses_get_zero_gradients(dtypes, index):
    # Complex results require grad as floating ones do; only floating ones were linked to the
    # tensors the index misses, which got None where the concatenation gives them zeros.
    def leaves():
        torch.manual_seed(0)
        return [torch.randn(30, dtype=dtypes[0], requires_grad=True), torch.randn(20, dtype=dtypes[1], requires_grad=True)]

    ours, theirs = leaves(), leaves()
    got, want = mt.bundle(ours)[index], torch.cat(theirs)[index]
    assert got.requires_grad == want.requires_grad and got.dtype == want.dtype
    (got * (1 + 2j)).abs().backward()
    (want * (1 + 2j)).abs().backward()
    for a, b in zip(ours, theirs):
        assert a.grad is not None and a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("made", ["inference", "normal", "mixed"])
@pytest.mark.parametrize("asked", ["inference", "normal"])
def test_is_inference_is_the_concatenations_without_a_copy(made, asked):
    # torch.cat makes an inference tensor in inference mode, whatever its inputs, and a normal
    # one outside it; the bundle's answer was the concatenation's, with a full copy.
    def tensors():
        return [torch.ones(3), torch.ones(2, 2)]

    with torch.inference_mode(made != "normal"):
        first = tensors()
    with torch.inference_mode(made == "inference"):
        second = tensors()
    b = mt.bundle([first[0], second[1]])
    with torch.inference_mode(asked == "inference"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no MaterializationWarning: no copy
        assert b.is_inference() == torch.cat([first[0].reshape(-1), second[1].reshape(-1)]).is_inference()
        assert torch.Tensor.is_inference(b) == b.is_inference()

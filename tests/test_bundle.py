"""Construction, structure, views and errors of ParameterBundle."""

import ast
import copy
import gc
import io
import pickle
import re
import warnings
import weakref

import pytest
import torch
from generators import cases, peak_allocation
from hypothesis import given
from torch import nn
from torch.nn.utils import prune

import modtensor as mt


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)


def test_module_source_counts_tied_parameters_once():
    m = Tied()
    b = mt.bundle(m)
    assert b.names == ("embed.weight", "norm.weight", "norm.bias")
    assert b.shape == torch.Size([40 + 4 + 4])
    assert b.tensors[0] is m.embed.weight


def test_buffers_and_recurse():
    m = Tied()
    assert mt.bundle(m, buffers=True).names[-3:] == ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked")
    assert mt.bundle(m, buffers=True).dtype == torch.float32  # int64 counter + float32 -> float32
    assert mt.bundle(m, recurse=False).names == ()


def test_mapping_iterable_pairs_and_bundle_sources():
    a, c = torch.ones(2), torch.zeros(3, 1)
    assert mt.bundle({"a": a, "c": c}).names == ("a", "c")
    assert mt.bundle([a, c]).names == ("0", "1")
    assert mt.bundle(nn.Linear(2, 2).named_parameters()).names == ("weight", "bias")
    inner = mt.bundle({"a": a, "c": c})
    assert mt.bundle(inner, exclude="c").tensors == (a,)


def test_include_exclude_globs_lists_and_predicates():
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert mt.bundle(m, include="*.weight").names == ("0.weight", "2.weight")
    assert mt.bundle(m, exclude=["0.*", "*.bias"]).names == ("2.weight",)
    assert mt.bundle(m, include=lambda name, t: t.dim() == 1).names == ("0.bias", "2.bias")


def test_metadata_follows_torch_cat():
    b = mt.bundle([torch.ones(2, dtype=torch.float16), torch.ones(3, dtype=torch.int64)])
    assert isinstance(b, torch.Tensor)
    assert b.dtype == torch.cat([torch.ones(2, dtype=torch.float16), torch.ones(3, dtype=torch.int64)]).dtype
    assert b.shape == (5,) and b.numel() == 5 and len(b) == 5 and b.dim() == 1 and b.ndim == 1
    assert b.device == torch.device("cpu")
    assert not b.requires_grad
    assert mt.bundle([torch.ones(2, requires_grad=True), torch.ones(1)]).requires_grad


@given(case=cases(dtypes=(torch.float32, torch.float64, torch.int64, torch.int32)))
def test_metadata_queries_answer_as_the_concatenation_without_copying_it(case):
    b, cat = case.bundle(), case.concat()
    other = torch.ones((), dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mt.MaterializationWarning)
        assert torch.result_type(b, 1.5) == torch.result_type(cat, 1.5)
        assert torch.result_type(b, other) == torch.result_type(cat, other)
        assert torch.result_type(other, b) == torch.result_type(other, cat)
        assert torch.result_type(b, b) == torch.result_type(cat, cat)
        assert b.nbytes == cat.nbytes and b.dim_order() == cat.dim_order()
        assert (b.is_conj(), b.is_neg()) == (cat.is_conj(), cat.is_neg())
        assert torch.is_same_size(b, cat) and b.is_same_size(b) and cat.is_same_size(b)
        assert not torch.is_same_size(b, torch.ones(b.numel() + 1))
        assert b.type() == cat.type() and b.type(dtype=None, non_blocking=True) == cat.type()
    assert b.type(torch.float64).dtype == torch.float64  # a conversion still converts


def test_empty_bundle_is_like_torch_empty():
    b = mt.bundle(nn.ReLU())
    assert b.shape == (0,) and b.dtype == torch.get_default_dtype()
    assert float(b.sum()) == 0.0 and torch.isnan(b.mean())
    with pytest.raises(RuntimeError, match="no elements"):
        b.amax()
    assert b.materialize().shape == (0,)


def test_tensors_are_never_copied():
    w = torch.randn(3, 3)
    b = mt.bundle({"w": w})
    assert b.tensors[0] is w and b.to_dict()["w"] is w and b.items()[0][1] is w
    assert b.data.tensors[0].data_ptr() == w.data_ptr()


@given(case=cases(min_tensors=1))
def test_materialize_is_torch_cat(case):
    torch.testing.assert_close(case.bundle().materialize(), case.concat(), equal_nan=True)


def test_materialize_copies_non_contiguous_tensors_one_at_a_time():
    # torch.cat made every non-contiguous tensor's flat copy first, all alive until the cat:
    # twice the result. Each is now copied (and cast) straight into its place.
    n = 1 << 21
    ts = [torch.randn(2048, 2048)[:, ::2] for _ in range(3)] + [torch.randn(2048, 1024)]
    b = mt.bundle(ts)
    got, peak = peak_allocation(b.materialize)
    assert torch.equal(got, torch.cat([t.reshape(-1) for t in ts]))
    assert peak < 1.25 * 4 * n * 4, peak  # the result (4 tensors' bytes), no copies: not 7 of them
    mixed = [torch.randn(6, 4).half().t(), torch.tensor(2.5, dtype=torch.float64), torch.empty(0), torch.arange(6).view(2, 3).t()]
    want = torch.cat([t.reshape(-1) for t in mixed])
    got = mt.bundle(mixed).materialize()
    assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want)
    # with a gradient to carry, torch.cat still makes it
    w = torch.randn(4, 3).t().requires_grad_()
    flat = mt.bundle([w, torch.ones(2)]).materialize()
    assert flat.grad_fn is not None and torch.equal(flat.detach(), torch.cat([w.detach().reshape(-1), torch.ones(2)]))
    flat.backward(torch.arange(14.0))
    assert torch.equal(w.grad, torch.arange(12.0).view(3, 4))


@given(case=cases())
def test_split_round_trips_with_parameters_to_vector(case):
    b = case.bundle()
    vector = torch.arange(b.numel(), dtype=torch.float64)
    views = b.split(vector)
    assert views.names == b.names
    assert [t.shape for t in views.tensors] == [t.shape for t in b.tensors]
    assert all(t._base is vector or t.numel() == 0 or t._base is vector._base for t in views.tensors)
    torch.testing.assert_close(views.materialize(), vector)
    if b.tensors and all(t.dtype == torch.float64 for t in b.tensors):
        torch.testing.assert_close(views.materialize(), nn.utils.parameters_to_vector(views.tensors))


def test_split_errors():
    b = mt.bundle([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        b.split(torch.ones(4))
    with pytest.raises(TypeError, match="materialize"):
        b.split(2)


def test_repr_and_describe_are_short():
    b = mt.bundle(nn.Linear(2, 3))
    assert repr(b) == (
        "ParameterBundle(2 tensors, 9 elements, dtype=float32, device=cpu, strategy='concat', "
        "names=['weight', 'bias'])"
    )
    assert f"{b}" == repr(b)
    assert "... 1 more" in mt.bundle([torch.ones(1)] * 5).describe()


def test_with_strategy_and_unknown_strategy():
    b = mt.bundle([torch.ones(2)])
    assert b.with_strategy("concat").strategy == "concat"
    with pytest.raises(ValueError, match=r"Unknown strategy 'nope'. Expect one of \("):
        b.with_strategy("nope")
    with pytest.raises(ValueError, match="Unknown strategy"):
        mt.bundle([torch.ones(2)], strategy="nope")
    with pytest.raises(TypeError, match="takes no options"):
        mt.bundle([torch.ones(2)], weights=[1.0])
    # a misspelt keyword of bundle() itself, which reaches the strategy as an option
    with pytest.raises(TypeError, match=r"'buffer' \(did you mean 'buffers'\?\)"):
        mt.bundle(nn.BatchNorm1d(2), buffer=True)


@pytest.mark.parametrize(
    "source, match",
    [
        (torch.ones(3), r"single tensor; wrap it in a list"),
        (3, r"unsupported source int. Expect an nn.Module"),
        ("weights", r"unsupported source str"),
        ({"a": 1.0}, r"entry 'a' holds float"),
        ([torch.ones(1), "x"], r"item 1 of the iterable is str"),
    ],
)
def test_bad_sources_raise_type_error_listing_what_works(source, match):
    with pytest.raises(TypeError, match=match):
        mt.bundle(source)


def test_nested_bundles_are_rejected():
    with pytest.raises(TypeError, match="itself a bundle"):
        mt.bundle([mt.bundle([torch.ones(1)])])


def test_structure_mismatch_names_both_structures():
    a = mt.bundle({"w": torch.ones(2, 2)})
    b = mt.bundle({"v": torch.ones(4)})
    with pytest.raises(ValueError, match=r"w \(2, 2\).*v \(4,\)"):
        a + b
    with pytest.raises(ValueError, match=r"cannot combine .* shape \(3,\)"):
        a * torch.ones(3)


def test_bad_dim_is_an_index_error_naming_the_function():
    b = mt.bundle([torch.ones(2, 2)])
    with pytest.raises(IndexError, match=r"torch.sum: Dimension out of range .* got 1"):
        torch.sum(b, dim=1)
    with pytest.raises(IndexError, match=r"torch.Tensor.amax"):
        b.amax(dim=(0, 2))


def test_dtype_errors_are_raised_in_python_like_torch():
    b = mt.bundle([torch.arange(3)])
    with pytest.raises(RuntimeError, match=r"torch.mean: the mean needs a floating point"):
        torch.mean(b)
    with pytest.raises(RuntimeError, match=r"var and std"):
        b.std()
    with pytest.raises(RuntimeError, match=r"dot: expected both operands to have the same dtype"):
        torch.dot(mt.bundle([torch.ones(2)]), torch.ones(2, dtype=torch.float64))


def test_a_lazy_module_before_its_first_forward_is_refused_clearly():
    model = nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"bundle: '1.weight' is an uninitialized parameter .*exclude="):
        mt.bundle(model)
    assert mt.bundle(model, exclude="1.*").names == ("0.weight", "0.bias")
    model(torch.ones(1, 2))
    assert mt.bundle(model).numel() == 9 + 16


def test_the_lazy_error_names_every_uninitialized_tensor_to_exclude():
    # It named the first alone: `exclude='weight'` as advised then failed on 'bias', and
    # `exclude='bias'` as advised next brought 'weight' back.
    lazy = nn.LazyLinear(3)
    with pytest.raises(ValueError, match=re.escape("out with exclude=['weight', 'bias'].")) as info:
        mt.bundle(lazy)
    advised = ast.literal_eval(str(info.value).rsplit("exclude=", 1)[1].rstrip("."))
    assert mt.bundle(lazy, exclude=advised).names == ()
    with pytest.raises(ValueError, match=re.escape("by adding 'bias' to exclude.")):
        mt.bundle(lazy, exclude="weight")  # theirs kept: exclude=['weight', 'bias'] works


def test_a_format_spec_raises_as_on_the_concatenation_naming_the_bundle():
    # It copied the whole concatenation for torch to raise a TypeError about `Tensor`.
    b = mt.bundle({"w": torch.tensor([0.25])})
    with pytest.raises(TypeError):
        f"{b.materialize():.3f}"
    with pytest.raises(TypeError, match=r"'\.3f' passed to ParameterBundle of 1 tensors \[w \(1,\)\].*b\.item\(\)"):
        f"{b:.3f}"
    assert f"{b.item():.3f}" == "0.250" and f"{b}" == repr(b)


def test_dir_lists_the_bundles_own_api_without_copying_the_model():
    # dir() (tab completion, an AttributeError's "Did you mean") went to torch's, on the
    # concatenation: a full copy with a MaterializationWarning, or an error under
    # fallback("error"), listing a plain tensor's attributes without the bundle's own.
    b = mt.bundle(nn.Linear(3, 2))
    with warnings.catch_warnings(), mt.fallback("error"):
        warnings.simplefilter("error", mt.MaterializationWarning)
        names = dir(b)
    assert {"names", "per_param", "to_dict", "weighted", "mean", "norm", "grad"} <= set(names)
    assert set(dir(b.materialize())) - {"__cuda_array_interface__"} <= set(names)
    assert names == sorted(names)


def test_copy_pickle_and_torch_save_give_bundles():
    # They used to give the concatenation (a full copy), with a MaterializationWarning.
    model = nn.Linear(3, 2)
    b = mt.bundle(model).weighted({"*": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", mt.MaterializationWarning)
        shallow = copy.copy(b)
        pickled = pickle.loads(pickle.dumps(b))
        buffer = io.BytesIO()
        torch.save(b, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # a bundle is not plain weights
    assert all(t is p for t, p in zip(shallow.tensors, model.parameters()))
    for other in (shallow, pickled, loaded):
        assert isinstance(other, mt.ParameterBundle) and other.names == b.names
        assert other.strategy == "weighted" and dict(other.options) == dict(b.options)
        torch.testing.assert_close(other.materialize(), b.materialize())
    assert pickled.tensors[0] is not model.weight
    assert pickle.loads(pickle.dumps(mt.bundle([]))).numel() == 0


def test_deepcopy_copies_the_tensors():
    w = torch.ones(2, requires_grad=True)
    b = copy.deepcopy(mt.bundle({"w": w}))
    assert b.names == ("w",) and b.tensors[0] is not w and b.tensors[0].requires_grad
    flat = torch.zeros(100_000)  # views: each copied alone, not with all of its base
    views = copy.deepcopy(mt.bundle([flat[:10].view(2, 5), flat[10:13]]))
    assert [t.untyped_storage().nbytes() for t in views.tensors] == [40, 12]


def test_conversions_that_change_nothing_keep_a_0d_tensor_itself():
    # `.float()` of float32 tensors returns them: a 0-d parameter too (a logit scale), so the
    # derived bundle's grad is the parameters' (it lost the 0-d one's).
    m = nn.Module()
    m.w, m.s = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.tensor(2.0))
    (m.w.sum() * m.s).backward()
    for convert in (lambda b: b.float(), lambda b: b.cpu(), lambda b: b.contiguous(), lambda b: b.to(torch.float32)):
        b = convert(mt.bundle(m))
        assert b.tensors[1] is m.s and b.grad.shape == (10,)
    assert (mt.bundle(m) * 0).tensors[1].shape == ()  # an op's result still takes the 0-d shape


class _WithBundle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.params = mt.bundle(self.layer)  # a plain attribute: not a parameter or buffer


def test_deepcopy_of_a_module_holding_a_bundle_keeps_them_together():
    # As copy.deepcopy keeps a list of a module's parameters aliased to the copy's (an EMA
    # model made by deepcopy), the bundle's tensors are the copy's parameters.
    ema = copy.deepcopy(_WithBundle())
    assert all(t is p for t, p in zip(ema.params.tensors, ema.layer.parameters()))
    with torch.no_grad():
        ema.layer.weight.zero_()
    assert float(ema.params.abs().sum().detach()) == float(ema.layer.bias.abs().sum().detach())
    ema.layer.weight = nn.Parameter(torch.ones(2, 3))  # and it watches the copy
    with pytest.raises(RuntimeError, match="'weight' has since been replaced"):
        ema.params.sum()


def test_elementwise_results_keep_names_and_shapes_and_write_nothing():
    m = nn.Linear(3, 2)
    before = [p.detach().clone() for p in m.parameters()]
    out = mt.bundle(m) * 2 + 1
    assert isinstance(out, mt.ParameterBundle)
    assert out.names == ("weight", "bias")
    assert [t.shape for t in out.tensors] == [(2, 3), (2,)]
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_meta_tensors_give_meta_results():
    b = mt.bundle([torch.empty(3, 4, device="meta"), torch.empty(2, device="meta")])
    assert b.device.type == "meta"
    assert (b * 2).device.type == "meta"
    assert b.sum().device.type == "meta"


# -- tensors changed under a bundle -----------------------------------------------------------

STALE_CALLS = {
    "mean": lambda b, other: b.mean(),
    "sum": lambda b, other: torch.sum(b),
    "std": lambda b, other: b.std(),
    "index": lambda b, other: b[3],
    "elementwise": lambda b, other: b * 2,
    "pairwise": lambda b, other: torch.dist(other, b),
    "in place": lambda b, other: b.add_(1.0),
    "materialize": lambda b, other: b.materialize(),
    "grad": lambda b, other: b.grad,  # clip_grad_norm_(b) read the old tensors' (none): no clipping
    "data": lambda b, other: b.data,
}


@pytest.mark.parametrize("call", sorted(STALE_CALLS))
@pytest.mark.parametrize("size", [8, 300], ids=["tiny", "large"])  # tiny bundles take the lane
def test_a_bundle_refuses_tensors_resized_since_it_was_made(call, size, real_sizes):
    model = nn.Sequential(nn.Linear(size, 20), nn.Linear(20, 3))
    b, other = mt.bundle(model), mt.bundle(copy.deepcopy(model))
    with torch.no_grad():  # as an update in place is made
        for _ in range(2):  # once more, from the lane's cache of calls seen before
            STALE_CALLS[call](b, other)
        model[0].weight.data = model[0].weight.data[:10].clone()  # pruned: 10 of 20 rows
        before = [t.clone() for t in model.parameters()]
        with pytest.raises(RuntimeError, match=rf"was made when its tensor '0.weight' was \(20, {size}\) "
                           rf"torch.float32; it is now \(10, {size}\) torch.float32.*mt.bundle\(model\)"):
            STALE_CALLS[call](b, other)
    assert all(torch.equal(t, u) for t, u in zip(model.parameters(), before))  # nothing written
    assert mt.bundle(model).numel() == b.numel() - 10 * size  # a new bundle has the new sizes


# Calls that read a bundle given as a keyword or in a list; the second pair falls back to the
# concatenation (with a warning) and must not build one of the new size.
KEYWORD_AND_LIST_CALLS = {
    "keyword": lambda b, x: torch.add(x, other=b),
    "keyword pairwise": lambda b, x: torch.dist(x, other=b),
    "list": lambda b, x: torch.stack([b, b]),
    "list cat": lambda b, x: torch.cat([x, b]),
}


@pytest.mark.parametrize("call", sorted(KEYWORD_AND_LIST_CALLS))
def test_the_size_check_reads_bundles_given_as_keywords_or_in_lists(call):
    model = nn.Linear(30, 20)
    b = mt.bundle(model)
    x = torch.zeros(b.shape)
    model.weight.data = model.weight.data[:10].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mt.MaterializationWarning)
        with pytest.raises(RuntimeError, match=r"torch\.\w+: ParameterBundle .* was made when its tensor "
                           r"'weight' was \(20, 30\)"):
            KEYWORD_AND_LIST_CALLS[call](b, x)


# Ways to put other tensors into a module than those a bundle was made with.
REPLACEMENTS = {
    "load_state_dict(assign=True)": lambda m: m.load_state_dict(
        {k: v.detach() + 1 for k, v in m.state_dict().items()}, assign=True
    ),
    "a new parameter": lambda m: setattr(m[0], "bias", nn.Parameter(m[0].bias.detach() + 1)),
    "a new submodule": lambda m: m.__setitem__(0, copy.deepcopy(m[0])),
    "a removed submodule": lambda m: m.__setitem__(0, nn.Identity()),
}


@pytest.mark.parametrize("how", sorted(REPLACEMENTS))
@pytest.mark.parametrize("call", sorted(STALE_CALLS))
@pytest.mark.parametrize("size", [8, 300], ids=["tiny", "large"])
def test_a_bundle_refuses_tensors_replaced_in_its_module(size, call, how, real_sizes):
    model = nn.Sequential(nn.Linear(size, 20), nn.Linear(20, 3))
    b, other = mt.bundle(model), mt.bundle(copy.deepcopy(model))
    views = [b, b.per_param()]  # a bundle of the same tensors watches the same module
    with torch.no_grad():
        for _ in range(2):
            STALE_CALLS[call](b, other)
        REPLACEMENTS[how](model)
        olds = [t.clone() for t in b.tensors]
        news = [t.clone() for t in model.parameters()]
        for view in views:
            with pytest.raises(RuntimeError, match=r"made from a module whose tensor '0\.(weight|bias)' "
                               r"(has since been replaced by another tensor|is no longer in it).*mt\.bundle\(model\)"):
                STALE_CALLS[call](view, other)
    assert all(torch.equal(t, u) for t, u in zip(b.tensors, olds))  # nothing written
    assert all(torch.equal(t, u) for t, u in zip(model.parameters(), news))
    fresh = mt.bundle(model)
    cat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(fresh.sum().detach(), cat.sum())


@pytest.mark.parametrize("size", [8, 300], ids=["tiny", "large"])
def test_assignments_that_keep_a_bundles_tensors_are_accepted(size, real_sizes):
    # Other modules made or changed, the same parameter assigned again, values loaded in place:
    # the module still holds the bundle's tensors, so its ops go on (and the check is paid once).
    model = nn.Sequential(nn.Linear(size, 20), nn.Linear(20, 3))
    b = mt.bundle(model)
    nn.Linear(4, 4)
    model[0].weight = model[0].weight
    model[1] = nn.Sequential(model[1])  # wrapped, as adapters do: the same tensors, renamed
    model.register_buffer("scale", torch.ones(1))  # not in a bundle of parameters
    model.load_state_dict({k: v.detach() * 2 for k, v in model.state_dict().items()})
    cat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(b.sum().detach(), cat.sum())
    assert not b._source.stale()


@pytest.mark.parametrize("rename", [
    lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", nn.Identity()),
    lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
], ids=["parametrize", "prune"])
def test_a_parameter_kept_under_another_name_is_no_change(rename):
    # Both move the weight (to `parametrizations.weight.original`, `weight_orig`): the module's
    # parameter is the same tensor, which is what model.parameters() yields too.
    model = nn.Linear(3, 2)
    b = mt.bundle(model)
    rename(model)
    assert "weight" not in dict(model.named_parameters())
    cat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(b.sum().detach(), cat.sum())


def test_a_bundle_of_buffers_watches_them_and_a_bundle_by_name_watches_nothing():
    model = nn.BatchNorm1d(3)
    with_buffers, by_name = mt.bundle(model, buffers=True), mt.bundle(dict(model.named_parameters()))
    params = mt.bundle(model)
    model.running_mean = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"tensor 'running_mean' has since been replaced"):
        with_buffers.sum()
    params.sum()
    model.weight = nn.Parameter(torch.zeros(3))
    assert float(by_name.sum().detach()) == 3.0  # the tensors it was given, as given
    with pytest.raises(RuntimeError, match=r"tensor 'weight' has since been replaced"):
        params.sum()


def test_a_bundle_does_not_keep_its_module_alive():
    model = nn.Linear(3, 2)
    b = mt.bundle(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    nn.Linear(2, 2)  # an assignment after the module is gone: nothing to compare with
    assert b.sum().shape == ()


@pytest.mark.parametrize("size", [8, 300], ids=["tiny", "large"])
def test_a_bundle_refuses_tensors_of_another_dtype_since_it_was_made(size, real_sizes):
    model = nn.Linear(size, 20)
    b = mt.bundle(model)
    for _ in range(2):
        b.sum(), b - b
    model.double()
    for call in (lambda: b.sum(), lambda: b - b, lambda: b.norm()):
        with pytest.raises(RuntimeError, match=r"'weight' was \(20, \d+\) torch.float32; it is now "
                           r"\(20, \d+\) torch.float64 \(1 more tensor changed too\)"):
            call()


@pytest.mark.parametrize("size", [8, 300], ids=["tiny", "large"])
def test_new_values_of_the_same_sizes_are_read_as_they_are(size, real_sizes):
    # In-place updates and `p.data = ` of the same size and dtype are what training does.
    model = nn.Linear(size, 20)
    b = mt.bundle(model)
    for _ in range(2):
        b.sum()
    with torch.no_grad():
        model.weight.mul_(2.0)
        model.bias.data = torch.randn(20)
    cat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(b.sum().detach(), cat.sum())
    torch.testing.assert_close((b * 2).materialize().detach(), cat * 2)


def test_the_size_check_takes_tensors_without_nbytes():
    # A sparse tensor has no nbytes; what worked on one before the check still does.
    b = mt.bundle([torch.eye(3).to_sparse(), torch.ones(2)])
    assert [float(x) for x in b.per_param().sum().tensors] == [3.0, 2.0]


def test_duplicate_names_are_refused():
    m1, m2 = nn.Linear(3, 2), nn.Linear(5, 4)
    with pytest.raises(ValueError, match=r"the name 'weight' is given to more than one tensor.*f'm1.\{n\}'"):
        mt.bundle([*m1.named_parameters(), *m2.named_parameters()])
    with pytest.raises(ValueError, match="the name 'w' is given to more than one tensor"):
        mt.ParameterBundle([torch.ones(2), torch.zeros(3)], ["w", "w"])
    both = mt.bundle({**{f"m1.{n}": p for n, p in m1.named_parameters()}, **{f"m2.{n}": p for n, p in m2.named_parameters()}})
    assert len(both.per_param().norm().to_dict()) == 4


def test_names_with_glob_characters_select_themselves_and_includes_must_match():
    sd = {"w[0]": torch.ones(2), "x": torch.ones(1)}
    assert mt.bundle(sd, include="w[0]").names == ("w[0]",)
    assert mt.bundle(sd, exclude="w[0]").names == ("x",)
    assert mt.bundle(sd, include=["x*", "w[0]"]).names == ("w[0]", "x")
    with pytest.warns(UserWarning, match=r"include='tpyo.\*' matches none of the 2 tensors \('weight', 'bias'\)"):
        assert mt.bundle(nn.Linear(2, 2), include="tpyo.*").names == ()
    assert mt.bundle(nn.Linear(2, 2), include=lambda n, t: False).names == ()  # a predicate may
    assert mt.bundle(nn.Linear(2, 2), include="*", exclude="*").names == ()
    with pytest.raises(TypeError, match="include must be a glob pattern .*got 3"):
        mt.bundle(sd, include=3)


def test_describe_refuses_a_negative_limit():
    b = mt.bundle({"w": torch.ones(2), "b": torch.ones(1)})
    assert b.describe(0) == "ParameterBundle of 2 tensors [... 2 more]"
    with pytest.raises(ValueError, match="limit is how many tensors to show"):
        b.describe(-1)


def _sparse_embedding_grad() -> mt.ParameterBundle:
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2, 1])).sum().backward()
    return mt.bundle(emb).grad


SPARSE_CALLS = {
    "norm": lambda b: b.norm(),
    "sum": lambda b: torch.sum(b),
    "std": lambda b: b.std(),
    "amax": lambda b: b.amax(),
    "elementwise": lambda b: b * 2,
    "dist": lambda b: torch.dist(b, b),
    "topk": lambda b: torch.topk(b, 2),
    "index": lambda b: b[0],
    "clone": lambda b: b.clone(),
    "fallback": lambda b: torch.cumsum(b, 0),
    "materialize": lambda b: b.materialize(),
}


@pytest.mark.parametrize("call", sorted(SPARSE_CALLS))
@pytest.mark.parametrize("make", ["embedding grad", "coo", "csr", "mkldnn"])
@pytest.mark.parametrize("size", [3, 80], ids=["tiny", "large"])  # tiny bundles take the lane
@pytest.mark.filterwarnings("ignore")  # the fallback's MaterializationWarning, CSR's beta warning
def test_tensors_that_are_not_strided_are_named_where_the_concatenation_is_needed(call, make, size, real_sizes):
    # torch cannot reshape a sparse tensor, so neither the concatenation nor the ops that read a
    # bundle as it exist; they raised torch's "reshape is not implemented for sparse tensors"
    # (or "Sparse CSR tensors do not have is_contiguous"), naming no tensor.
    if make == "embedding grad":
        b, name, layout = _sparse_embedding_grad(), "weight", "torch.sparse_coo"
    else:
        dense = torch.eye(size)
        odd = {"coo": dense.to_sparse, "csr": dense.to_sparse_csr, "mkldnn": dense.to_mkldnn}[make]()
        b, name, layout = mt.bundle({"w": torch.ones(size), "odd": odd}), "odd", str(odd.layout)
    with pytest.raises(RuntimeError):  # the concatenation's own refusal
        torch.cat([t.reshape(-1) for t in b.tensors])
    message = rf"tensor '{name}' of ParameterBundle of .* has layout {re.escape(layout)};.*t.to_dense\(\)"
    for _ in range(2):  # again, where the tiny lane remembers a call seen before
        with pytest.raises(RuntimeError, match=message):
            SPARSE_CALLS[call](b)
        SPARSE_CALLS[call](mt.bundle([torch.ones(size), torch.ones(size)]))  # what the lane remembers


@pytest.mark.parametrize("call", ["norm", "sum", "amax", "dist", "index", "materialize"])
@pytest.mark.parametrize("make", ["coo", "csr"])
@pytest.mark.parametrize("strategy", ["per_param", "weighted"])
@pytest.mark.filterwarnings("ignore")  # CSR's beta warning
def test_sparse_tensors_of_a_result_computed_per_param_are_named_too(call, make, strategy, real_sizes):
    # `b * 2` of a per_param bundle was computed on demand, so its sparse tensors were never
    # seen: under concat its sum and norm summed them as if a concatenation existed, and the
    # other ops raised torch's errors (as did indexing a per_param bundle), naming no tensor.
    odd = {"coo": torch.eye(80).to_sparse, "csr": torch.eye(80).to_sparse_csr}[make]()
    b = mt.bundle({"w": torch.ones(6000), "odd": odd}, strategy=strategy)
    message = rf"tensor 'odd' of ParameterBundle of .* has layout {re.escape(str(odd.layout))};.*t.to_dense\(\)"
    with pytest.raises(RuntimeError, match=message):
        SPARSE_CALLS[call]((b * 2).with_strategy("concat"))
    if call == "index":
        with pytest.raises(RuntimeError, match=message):
            b[6001]


def test_bundles_of_sparse_tensors_keep_their_per_tensor_ops():
    # Per-tensor results and in-place writes are torch's ops on each tensor, which exist.
    b = _sparse_embedding_grad()
    dense = b.tensors[0].to_dense()
    torch.testing.assert_close(b.per_param().norm().tensors[0], dense.norm())
    b.mul_(2)
    torch.testing.assert_close(b.tensors[0].to_dense(), 2 * dense)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensors_are_refused_by_name(layout):
    # A nested tensor has no fixed shape: making the bundle raised torch's "Internal error:
    # NestedTensorImpl doesn't support sizes" or an AttributeError from deep inside torch.
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    with pytest.raises(RuntimeError):  # the concatenation's own refusal
        torch.cat([nested.reshape(-1)])
    with pytest.raises(RuntimeError, match=r"tensor 'n' is a nested tensor.*t.unbind\(\)"):
        mt.bundle({"w": torch.ones(2), "n": nested})

"""Recipes against torch's own implementations."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import modtensor as mt
from generators import peak_allocation
from modtensor import recipes


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _with_grads(model, scale=1.0):
    model.zero_grad()
    (model(torch.randn(2, 3, 6, 6)).square().sum() * scale).backward()
    return model


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("max_norm", [1e-2, 1e6])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    ours, theirs = _with_grads(_model()), _with_grads(_model())
    ours[3].bias.grad = None
    theirs[3].bias.grad = None
    got = recipes.clip_grad_norm_(ours, max_norm, norm_type)
    want = nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type)
    torch.testing.assert_close(got, want)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("norm_type", [0, 2.0, "inf"])
@pytest.mark.parametrize("form", ["parameters()", "list", "one tensor"])
def test_clip_grad_norm_takes_torchs_arguments(norm_type, form):
    # A drop-in for torch's: an iterable of tensors or one tensor, "inf", foreach=. Of order 0,
    # torch's total counts the tensors with a nonzero gradient (a norm of per-tensor norms).
    ours, theirs = _with_grads(_model()), _with_grads(_model())
    for m in (ours, theirs):
        m[3].bias.grad.zero_()
    args = {"parameters()": lambda m: m.parameters(), "list": lambda m: list(m.parameters()),
            "one tensor": lambda m: m[0].weight}[form]
    got = recipes.clip_grad_norm_(args(ours), 0.5, norm_type, foreach=True)
    want = nn.utils.clip_grad_norm_(args(theirs), 0.5, norm_type, foreach=True)
    torch.testing.assert_close(got, want)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_clip_grad_norm_errors_on_nonfinite_like_torch():
    model = _with_grads(_model())
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        recipes.clip_grad_norm_(model, 1.0, error_if_nonfinite=True)
    assert recipes.clip_grad_norm_(nn.Linear(2, 2), 1.0) == 0


def test_ema_matches_averaged_model_step_after_step():
    model = _model()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    averaged.update_parameters(model)  # the first update copies
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()
        averaged.update_parameters(model)
        recipes.ema_(ema, model, decay=0.9)
    for a, b in zip(ema.parameters(), averaged.module.parameters()):
        torch.testing.assert_close(a, b)


def test_ema_with_buffers_blends_integer_buffers_as_averaged_model():
    # With buffers=True a BatchNorm's step count (int64) is in the bundle. torch has no lerp_
    # for integers, and ema_ raised; torch's EMA copies `ema * decay + model * (1 - decay)`
    # into them, truncated.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    averaged.update_parameters(model)  # the first update copies
    ema = copy.deepcopy(model)
    for _ in range(4):
        model(torch.randn(5, 3))  # a step for the running statistics and the step count
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        averaged.update_parameters(model)
        recipes.ema_(mt.bundle(ema, buffers=True), mt.bundle(model, buffers=True), decay=0.5)
    assert ema[1].num_batches_tracked.item() == 3  # 0 -> 0.5 * 0 + 0.5 * 1 = 0, 1, 2, 3
    for (name, a), b in zip(ema.state_dict().items(), averaged.module.state_dict().values()):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b)


def test_merge_takes_one_weight_as_any_number():
    base, ft1, ft2 = _model(0), _model(1), _model(2)
    tvs = [recipes.task_vector(ft1, base), recipes.task_vector(ft2, base)]
    want = recipes.merge(base, tvs, weights=[0.5, 0.5])
    for weight in (0.5, np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5, 0.5])):
        for got, w in zip(recipes.merge(base, tvs, weights=weight).tensors, want.tensors):
            torch.testing.assert_close(got, w)


def test_task_arithmetic_and_distance():
    base, ft1, ft2 = _model(0), _model(1), _model(2)
    tv1, tv2 = recipes.task_vector(ft1, base), recipes.task_vector(ft2, base)
    assert tv1.names == mt.bundle(base).names and not tv1.requires_grad
    merged = recipes.merge(base, [tv1, tv2], weights=[0.3, 0.7])
    for (n, p0), p1, p2, m in zip(base.named_parameters(), ft1.parameters(), ft2.parameters(), merged.tensors):
        torch.testing.assert_close(m, p0 + 0.3 * (p1 - p0) + 0.7 * (p2 - p0))
    report = recipes.distance(ft1, base)
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    a, b = flat(ft1), flat(base)
    assert report.l2 == pytest.approx(float((a - b).norm()), rel=1e-5)
    assert report.max_abs == pytest.approx(float((a - b).abs().max()))
    assert report.cosine == pytest.approx(float(nn.functional.cosine_similarity(a, b, dim=0)), rel=1e-5)
    assert report.changed_fraction == pytest.approx(float((a != b).float().mean()))
    w1, w0 = ft1[3].weight.detach(), base[3].weight.detach()
    assert report.per_param["3.weight"]["l2"] == pytest.approx(float((w1 - w0).norm()), rel=1e-5)
    assert set(report.per_param) == set(tv1.names)


def _ties_reference(base, tvs, weights, keep):
    """TIES on the explicit concatenations, for comparison."""
    flat = [torch.cat([t.reshape(-1) for t in tv.tensors]) for tv in tvs]
    trimmed = []
    for v in flat:
        k = int(torch.tensor(keep * v.numel()).ceil())
        threshold = v.abs().topk(k).values.min()
        trimmed.append(torch.where(v.abs() >= threshold, v, torch.zeros(())))
    stacked = torch.stack([w * v for w, v in zip(weights, trimmed)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return torch.cat([p.detach().reshape(-1) for p in base.parameters()]) + merged


def test_ties_merge_matches_the_concatenated_reference():
    base, ft1, ft2 = _model(0), _model(1), _model(2)
    tvs = [recipes.task_vector(ft, base) for ft in (ft1, ft2)]
    got = recipes.merge(base, tvs, weights=[1.0, 0.5], trim=0.2, elect_sign=True)
    torch.testing.assert_close(got.materialize(), _ties_reference(base, tvs, [1.0, 0.5], 0.2))


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_magnitude_prune_matches_global_unstructured(amount):
    ours, theirs = _model(3), _model(3)
    recipes.magnitude_prune_(mt.bundle(ours), amount)
    params = [(m, "weight") for m in (theirs[0], theirs[3])] + [(m, "bias") for m in (theirs[0], theirs[3])]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for m in (theirs[0], theirs[3]):
        for name in ("weight", "bias"):
            prune.remove(m, name)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_magnitude_prune_with_ties_zeroes_exactly_k():
    w = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0])
    recipes.magnitude_prune_(mt.bundle([w]), 0.4)
    assert torch.equal(w, torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0]))


def test_recipe_errors():
    with pytest.raises(TypeError, match="ParameterBundle or an nn.Module"):
        recipes.ema_([torch.ones(1)], [torch.ones(1)], 0.9)
    with pytest.raises(ValueError, match="amount is a fraction"):
        recipes.magnitude_prune_(nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="2 weights for 1 task vectors"):
        recipes.merge(nn.Linear(2, 2), [nn.Linear(2, 2)], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="structure"):
        recipes.ema_(nn.Linear(2, 2), nn.Linear(3, 2), 0.9)


@pytest.mark.parametrize("amount", [0.6, 0.8, 1.0])
def test_magnitude_prune_takes_nan_as_the_largest_magnitude_like_torch(amount):
    # torch's topk(largest=False) puts NaN last; a NaN cut-off once pruned nothing at all.
    w = torch.tensor([0.5, -0.1, 2.0, 0.3, float("nan")])
    ours, theirs = nn.Linear(5, 1, bias=False), nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    recipes.magnitude_prune_(ours, amount)
    prune.global_unstructured([(theirs, "weight")], pruning_method=prune.L1Unstructured, amount=amount)
    # torch's mask says which entries go (its pruned NaN stays NaN: NaN * 0); ours are zeroed
    assert torch.equal(ours.weight == 0, theirs.weight_mask == 0)
    assert int((ours.weight == 0).sum()) == round(amount * 5)


def test_magnitude_prune_among_nans_prunes_the_first_ones():
    w = torch.tensor([float("nan"), 1.0, float("nan"), 2.0])
    recipes.magnitude_prune_(mt.bundle([w[:2], w[2:]]), 0.75)
    assert w[2].isnan() and int((w == 0).sum()) == 3


def _clip_grads():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([12.0])
    return [a, b]


@pytest.mark.parametrize("strategy", ["weighted", "per_param"])
def test_recipes_compute_as_the_concatenation_whatever_the_strategy(strategy):
    # A bundle's strategy once changed what a recipe computed (weighted: a mean of norms) or
    # made it fail with an unrelated error (per_param).
    def given(tensors):
        return mt.bundle(tensors).with_strategy(strategy)

    theirs, ours = _clip_grads(), _clip_grads()
    want = nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(recipes.clip_grad_norm_(given(ours), 1.0), want)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)

    w = torch.tensor([0.5, -0.1, 2.0, 0.3])
    pruned = recipes.magnitude_prune_(given([w[:1], w[1:]]), 0.5)
    assert pruned.strategy == strategy  # the bundle given, as it was
    assert torch.equal(w, torch.tensor([0.5, 0.0, 2.0, 0.0]))

    ema = given([torch.zeros(2), torch.zeros(1)])
    assert recipes.ema_(ema, given([torch.ones(2), torch.ones(1)]), 0.9) is ema
    torch.testing.assert_close(ema.tensors[1], torch.tensor([0.1]))

    x, y = [torch.tensor([3.0, 0.0]), torch.zeros(1)], [torch.zeros(2), torch.zeros(1)]
    report = recipes.distance(given(x), given(y))
    assert (report.l2, report.max_abs, report.changed_fraction) == (3.0, 3.0, pytest.approx(1 / 3))


@pytest.mark.parametrize("width", [20, 100])  # a tiny bundle, and one above 4096 elements
def test_task_vector_and_merge_are_new_tensors_that_outlive_their_inputs(width):
    # They were computed on demand: after `base += tv` in place, using them raised (or read
    # the changed models).
    torch.manual_seed(0)
    base = nn.Linear(width, width)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(1.0)
    tv = recipes.task_vector(ft, base)
    merged = recipes.merge(base, [tv], weights=0.5)
    want = [p.detach() + 0.5 for p in base.parameters()]
    with torch.no_grad():
        mt.bundle(base).add_(tv, alpha=0.5)
        ft.weight.zero_()
    assert float(tv.norm()) == pytest.approx((width * width + width) ** 0.5)
    assert float(tv.sum()) == pytest.approx(width * width + width)
    for got, w in zip(merged.tensors, want):
        torch.testing.assert_close(got, w)
    torch.testing.assert_close(merged.norm(), torch.cat([w.reshape(-1) for w in want]).norm())


def test_merge_and_task_vector_keep_the_strategy_of_their_bundle():
    base = mt.bundle({"w": torch.zeros(2), "b": torch.zeros(3)}).per_param()
    tv = recipes.task_vector(mt.bundle({"w": torch.ones(2), "b": torch.ones(3)}).weighted(), base)
    assert tv.strategy == "weighted"
    for elect_sign in (False, True):
        assert recipes.merge(base, [tv], elect_sign=elect_sign).strategy == "per_param"


@pytest.mark.parametrize("elect_sign", [False, True])
@pytest.mark.parametrize("tv", [
    {"w": torch.ones(2, 3), "extra": torch.ones(3)},  # elect_sign dropped the extra tensor silently
    {"w": torch.ones(3, 2)},  # same numel, another shape: a raw torch error
])
def test_merge_checks_the_structure_with_and_without_elect_sign(elect_sign, tv):
    base = mt.bundle({"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"recipes.merge: bundles of different structure: ParameterBundle of 1"):
        recipes.merge(base, [mt.bundle({"w": torch.ones(2, 3)}), mt.bundle(tv)], elect_sign=elect_sign)


def test_distance_counts_a_nan_left_as_it_was_as_unchanged():
    # It counted it as changed (NaN != NaN), where `modtensor diff` says 0.
    a = {"w": torch.tensor([float("nan"), 1.0]), "b": torch.tensor([float("nan"), 2.0, 3.0, 4.0])}
    b = {"w": torch.tensor([float("nan"), 1.0]), "b": torch.tensor([1.0, float("nan"), 3.0, 4.0])}
    report = recipes.distance(mt.bundle(a), mt.bundle(b))
    assert report.changed_fraction == pytest.approx(2 / 6)
    assert report.per_param["w"]["changed_fraction"] == 0 and report.per_param["b"]["changed_fraction"] == 0.5


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_clip_grad_norm_total_carries_no_graph_like_torchs():
    # Of gradients made with create_graph=True, the total carried a graph; torch's runs under no_grad.
    ours, theirs = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    for w in (ours, theirs):
        (w ** 3).sum().backward(create_graph=True)
    want = nn.utils.clip_grad_norm_([theirs], 1.0)
    got = recipes.clip_grad_norm_([ours], 1.0)
    assert not want.requires_grad and not got.requires_grad
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("amount", [0, 1, 5, np.int64(7), 143])
def test_magnitude_prune_takes_an_int_amount_as_a_count_like_torch(amount):
    # amount=1 pruned everything (a fraction); torch's global_unstructured prunes one entry.
    ours, theirs = _model(3), _model(3)
    recipes.magnitude_prune_(ours, amount)
    params = [(m, n) for m in (theirs[0], theirs[3]) for n in ("weight", "bias")]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    assert sum(int((m.get_buffer(f"{n}_mask") == 0).sum()) for m, n in params) == amount
    for m, n in params:
        prune.remove(m, n)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_magnitude_prune_amount_errors():
    n = mt.bundle(_model(3)).numel()
    with pytest.raises(ValueError, match=rf"an int amount is a count of entries, in \[0, {n}\] here; got {n + 1}"):
        recipes.magnitude_prune_(_model(3), n + 1)
    with pytest.raises(ValueError, match="an int amount is a count"):
        recipes.magnitude_prune_(_model(3), -1)
    for amount in (True, torch.tensor(0.5), "0.5"):
        with pytest.raises(TypeError, match="a fraction .a float. or a count .an int."):
            recipes.magnitude_prune_(_model(3), amount)


def test_recipes_on_a_model_mixing_dtypes_cast_one_tensor_at_a_time():
    # They read the models through `.detach()`, which casts every float16 tensor to the
    # concatenation's float32 at once: the casts of both models were held with the result.
    n = 1 << 20

    def model(seed):
        g = torch.Generator().manual_seed(seed)
        return mt.bundle([torch.randn(n, generator=g).to(d) for d in (torch.float16, torch.float32) * 2])

    ft, base, other = model(0), model(1), model(2)
    result = 4 * n * 4  # float32, as the concatenation
    tv, peak = peak_allocation(lambda: recipes.task_vector(ft, base))
    assert tv.dtype == torch.float32 and torch.equal(tv.materialize(), ft.materialize() - base.materialize())
    assert peak <= result + 2 * n * 4, peak  # one float16 tensor's casts at a time: 1.25x, not 2x
    merged, peak = peak_allocation(lambda: recipes.merge(base, [ft, other]))
    want = base.materialize() + (ft.materialize() + other.materialize())
    assert torch.equal(merged.materialize(), want)
    assert peak <= result + 3 * n * 4, peak  # a float16 tensor's cast, two sums: 1.5x, not 3x
    report = recipes.distance(ft, base)
    x, y = ft.materialize(), base.materialize()
    assert report.per_param["0"]["l2"] == float(torch.dist(x[:n], y[:n]))
    assert report.l2 == float(torch.dist(ft, base))


TORCH_CLIPS = {
    "clip_grad_norm_": lambda ps, norm_type, foreach: nn.utils.clip_grad_norm_(ps, 0.5, norm_type, foreach=foreach),
    "clip_grad_value_": lambda ps, norm_type, foreach: nn.utils.clip_grad_value_(ps, 0.05, foreach=foreach),
    "clip_grads_with_norm_": lambda ps, norm_type, foreach: nn.utils.clip_grads_with_norm_(
        ps, 0.5, torch.tensor(4.0), foreach=foreach),
    "get_total_norm": lambda ps, norm_type, foreach: nn.utils.get_total_norm(
        ps.grad, norm_type, foreach=foreach),
}


@pytest.mark.parametrize("name", sorted(TORCH_CLIPS))
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("norm_type", [2.0, 0, float("inf")])
@pytest.mark.filterwarnings("error::modtensor.MaterializationWarning")
def test_torchs_clipping_takes_a_bundle_as_one_parameter(name, foreach, norm_type):
    # torch takes a Tensor given as `parameters` as one parameter, whose `.grad` the bundle's
    # is: as the concatenation made a leaf with the concatenated gradient. With foreach=True,
    # torch's _foreach_mul_ / _foreach_clamp_min_ of [b.grad] were refused ("would write into
    # a temporary copy"), and _foreach_norm copied the bundle with a MaterializationWarning.
    model = _with_grads(_model())
    model[3].bias.grad = None  # left out of b.grad, as torch leaves it out
    cat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.grad is not None]).requires_grad_()
    cat.grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    b = mt.bundle(model)
    got = TORCH_CLIPS[name](b, norm_type, foreach)
    want = TORCH_CLIPS[name](cat, norm_type, foreach)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(b.grad.materialize(), cat.grad)


def test_magnitude_prune_holds_one_chunks_temporaries_at_a_time():
    # Each tensor's magnitudes, masks and the tie count's int64 cumsum were made whole: 6x the
    # largest tensor. Ties at the threshold span chunks and tensors; the first ones still go.
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    ts = [torch.randint(-40, 40, (n,), generator=g).float() for _ in range(3)]
    ts.append(torch.randint(-40, 40, (n // 1024, 1024), generator=g).float().t())  # not contiguous
    ts[1][7] = float("nan")
    cat = torch.cat([t.reshape(-1) for t in ts])
    k = int(0.3 * cat.numel()) + 12345  # part way through the tied entries at the threshold
    want = cat.clone()
    want[torch.sort(cat.abs(), stable=True).indices[:k]] = 0  # NaN sorts last
    _, peak = peak_allocation(lambda: recipes.magnitude_prune_(mt.bundle(ts), k))
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in ts]), want, rtol=0, atol=0, equal_nan=True)
    assert peak < 2 * n * 4, peak  # chunks' temporaries and the order statistic's: not 6x


def test_merge_with_elect_sign_holds_one_chunks_temporaries_at_a_time():
    # Each tensor's stack of task vectors and the masks over it were made whole: 10x the
    # largest tensor over the result; then a chunk's, but ~14 chunks' worth alive together
    # (the first chunk's operands kept, an int64 count, fresh products): 1.8x. Same values.
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    base, tv1, tv2 = (mt.bundle([torch.randn(n, generator=g) for _ in range(4)]) for _ in range(3))
    merged, peak = peak_allocation(lambda: recipes.merge(base, [tv1, tv2], weights=[0.5, 2.0], elect_sign=True))
    stacked = torch.stack([tv1.materialize() * 0.5, tv2.materialize() * 2.0])
    agree = (torch.sign(stacked) == torch.sign(stacked.sum(dim=0))) & (stacked != 0)
    want = base.materialize() + (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    assert torch.equal(merged.materialize(), want)
    assert peak < (4 + 0.75) * n * 4, peak  # the result (4 tensors) and chunks': not 4 + 1.8


def test_merge_with_elect_sign_matches_the_concatenation_on_zeros_infinities_and_nans():
    # Chunks reuse their stack in place and count agreeing entries in int32: the same values
    # as the whole concatenation's, -0.0, inf and NaN included, across a chunk's boundary.
    n = (1 << 18) + 7
    g = torch.Generator().manual_seed(0)
    odd = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan")])

    def tensors():
        picks = odd[torch.randint(0, len(odd), (n,), generator=g)]
        return [torch.where(torch.rand(n, generator=g) < 0.5, picks, torch.randn(n, generator=g)), torch.randn(5)]

    base, *tvs = (mt.bundle(tensors()) for _ in range(4))
    merged = recipes.merge(base, tvs, weights=[0.5, 2.0, -1.0], elect_sign=True)
    stacked = torch.stack([tv.materialize() * w for tv, w in zip(tvs, [0.5, 2.0, -1.0])])
    agree = (torch.sign(stacked) == torch.sign(stacked.sum(dim=0))) & (stacked != 0)
    want = base.materialize() + (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    torch.testing.assert_close(merged.materialize(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(merged.materialize()), torch.signbit(want))


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_magnitude_prune_of_a_model_mixing_dtypes_compares_as_the_concatenation(low):
    # A 16-bit tensor was compared with the float32 threshold rounded to 16 bits (a 0-d
    # operand does not promote): its entries just above the threshold tied with it and, first
    # in the concatenation's order, were pruned in place of the smaller float32 ones.
    half = torch.linspace(0.1, 2.0, 40).to(low)
    below = torch.nextafter(half.float(), torch.zeros(()))  # each just under a 16-bit entry
    ts = [half, below.reshape(4, 10), torch.randn(8, generator=torch.Generator().manual_seed(0))]
    cat = torch.cat([t.reshape(-1).float() for t in ts])
    for k in (5, 17, 41, 60):
        ours = [t.clone() for t in ts]
        recipes.magnitude_prune_(mt.bundle(ours), k)
        want = cat.clone()
        want[torch.sort(cat.abs(), stable=True).indices[:k]] = 0
        assert torch.equal(torch.cat([t.reshape(-1).float() for t in ours]), want), k


def test_merge_holds_one_chunks_temporaries_at_a_time():
    # Without elect_sign each tensor of base + sum of weighted task vectors was made whole,
    # its products and their sum beside it: 2x the largest tensor over the result.
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    base, tv1, tv2, tv3 = (mt.bundle([torch.randn(n, generator=g) for _ in range(4)]) for _ in range(4))
    merged, peak = peak_allocation(lambda: recipes.merge(base, [tv1, tv2, tv3], weights=[0.5, 2.0, -1.0]))
    want = base.materialize() + (tv1.materialize() * 0.5 + tv2.materialize() * 2.0 + tv3.materialize() * -1.0)
    assert torch.equal(merged.materialize(), want)
    assert peak < (4 + 1) * n * 4, peak  # the result (4 tensors) and chunks': not 4 + 2

"""In-place ops write through into the real tensors, exactly like the per-tensor loop."""

import warnings

import pytest
import torch
from hypothesis import given
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import modtensor as mt
from generators import FLOATS, INTS, Case, cases, other_like, track_live
from modtensor._inplace import FOREACH_FUNCTIONS, INPLACE_FUNCTIONS
from op_specs import INTEGER_OPS, is_binary, pointwise_calls

# How each in-place op is called: `call(f, x, y)`, x the target, y an operand of the same structure.
EXPLICIT_CALLS = {
    "copy_": [lambda f, x, y: f(x, y)],
    "fill_": [lambda f, x, y: f(x, 1.5), lambda f, x, y: f(x, torch.tensor(2.0))],
    "zero_": [lambda f, x, y: f(x)],
    "masked_fill_": [lambda f, x, y: f(x, y > 1.0, -1.0)],
    "__setitem__": [lambda f, x, y: f(x, y > 1.0, 0.0)],
    "requires_grad_": [lambda f, x, y: f(x, False), lambda f, x, y: f(x)],
    "add_": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, y, alpha=0.5), lambda f, x, y: f(x, 2.0)],
    "sub_": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, y, alpha=2), lambda f, x, y: f(x, 1)],
    "mul_": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 0.5)],
    "div_": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 4.0), lambda f, x, y: f(x, y, rounding_mode="floor")],
    "pow_": [lambda f, x, y: f(x, 2), lambda f, x, y: f(x, y)],
    "clamp_": [lambda f, x, y: f(x, -0.5, 0.5), lambda f, x, y: f(x, min=y)],
    "clamp_min_": [lambda f, x, y: f(x, 0.1), lambda f, x, y: f(x, y)],
    "clamp_max_": [lambda f, x, y: f(x, 0.1)],
    "lerp_": [lambda f, x, y: f(x, y, 0.3), lambda f, x, y: f(x, y, torch.tensor(0.25)), lambda f, x, y: f(x, y, y)],
    "addcmul_": [lambda f, x, y: f(x, y, y, value=0.5)],
    "addcdiv_": [lambda f, x, y: f(x, y, y.abs() + 1)],
    # the out-of-place specs of these transform x first or take it second
    "mvlgamma_": [lambda f, x, y: f(x, 1)],
    "__idiv__": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 2.0)],
    "__ifloordiv__": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 2)],
    "__imod__": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 2)],
    "__iand__": [lambda f, x, y: f(x, y), lambda f, x, y: f(x, 6)],
    "__ior__": [lambda f, x, y: f(x, y)],
    "__ixor__": [lambda f, x, y: f(x, y)],
    "__ilshift__": [lambda f, x, y: f(x, 2)],
    "__irshift__": [lambda f, x, y: f(x, 1)],
    "polygamma_": [lambda f, x, y: f(x, 1)],
}


def calls_for(name):
    if name in EXPLICIT_CALLS:
        return EXPLICIT_CALLS[name]
    base = name[:-1]
    # the in-place form of an elementwise op takes the op's own arguments, self first
    return [c for c in pointwise_calls(base, is_binary(base))]


PARAMS = [
    pytest.param(name, f, call, id=f"{name}-{f.__qualname__}-{i}")
    for name, (funcs, _) in INPLACE_FUNCTIONS.items()
    for f in funcs
    for i, call in enumerate(calls_for(name))
]


def _clone(case: Case) -> Case:
    tensors = [t.detach().clone() for t in case.tensors]
    return Case(tensors, tensors)


def _snapshot(tensors):
    return [(t.data_ptr(), t.detach().clone(), t.requires_grad) for t in tensors]


@pytest.mark.parametrize("name, f, call", PARAMS)
@given(
    case=cases(min_tensors=1, grad=False, kinds=("normal", "ties")),
    int_case=cases(min_tensors=1, dtypes=INTS, grad=False),
    mixed_case=cases(min_tensors=2, dtypes=FLOATS + INTS, grad=False, kinds=("normal",)),
)
def test_inplace_equals_the_per_tensor_loop(name, f, call, case, int_case, mixed_case):
    if name.rstrip("_") in INTEGER_OPS or name in ("__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"):
        case = int_case
    _check_like_the_loop(f, call, case, other_like(case, seed=4, positive=True))
    # Integer and floating tensors in one bundle: where torch's kernel for a later tensor's
    # dtype does not exist (lerp_ of integers, shifts of floats), nothing may be written. The
    # operand is float32 throughout, so that one made from it (`y + 1`) has the same dtypes
    # tensor by tensor as in the loop (a mixed one would take its concatenation's dtype).
    floats = Case([t.float() for t in mixed_case.tensors], [t.float() for t in mixed_case.tensors])
    _check_like_the_loop(f, call, mixed_case, other_like(floats, seed=4, positive=True))


def _check_like_the_loop(f, call, case, other):
    loop_x, loop_y = _clone(case), _clone(other)
    bundle_x, bundle_y = _clone(case), _clone(other)
    try:
        for tx, ty in zip(loop_x.tensors, loop_y.tensors):
            call(f, tx, ty)
    except Exception as e:  # the bundle raises what torch raised, and writes nothing
        before = _snapshot(bundle_x.tensors)
        with pytest.raises(type(e)):
            call(f, bundle_x.bundle(), bundle_y.bundle())
        for (_, v, requires_grad), t in zip(before, bundle_x.tensors):
            torch.testing.assert_close(t, v, equal_nan=True)
            assert t.requires_grad == requires_grad
        return
    bx, by = bundle_x.bundle(), bundle_y.bundle()
    pointers = [t.data_ptr() for t in (*bx.tensors, *by.tensors)]
    result = call(f, bx, by)
    # torch returns self (whichever operand was written); __setitem__ returns None
    assert result is bx or result is by or result is None
    assert [t.data_ptr() for t in (*bx.tensors, *by.tensors)] == pointers, "tensors replaced, not written"
    for got, want in zip(bundle_x.tensors + bundle_y.tensors, loop_x.tensors + loop_y.tensors):
        assert got.dtype == want.dtype and got.requires_grad == want.requires_grad
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_in_place_on_an_empty_bundle_returns_it():
    b = mt.bundle([])
    assert b.mul_(2) is b and b.zero_() is b and b.copy_(torch.empty(0)) is b


def test_augmented_assignment_writes_through():
    w = torch.ones(2, 2)
    b = mt.bundle({"w": w})
    b += 1
    b *= 3
    b -= torch.ones(4)  # a flat operand, split across the tensors
    assert isinstance(b, mt.ParameterBundle) and b.tensors[0] is w
    torch.testing.assert_close(w, torch.full((2, 2), 5.0))


def test_leaf_requires_grad_follows_torchs_rule():
    model = nn.Linear(3, 2)
    b = mt.bundle(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        b.mul_(2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with torch.no_grad():
        b.mul_(2)
    torch.testing.assert_close(model.weight, before[0] * 2)



@pytest.mark.parametrize("made_inside", [False, True], ids=["parameters", "inference parameters"])
def test_inference_mode_records_no_graph_even_with_grad_mode_on(made_inside):
    # Inside inference_mode torch writes a leaf that requires grad even under enable_grad
    # (nothing is recorded); the bundle applied the leaf rule there and wrote nothing.
    with torch.inference_mode(made_inside):
        model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode(), torch.enable_grad():
        for p in model.parameters():  # the loop the bundle stands for
            p.mul_(2)
        mt.bundle(model).mul_(0.5).add_(1.0)
    torch.testing.assert_close([p.detach() for p in model.parameters()], [q + 1 for q in before])


@pytest.mark.parametrize("op", [
    lambda x: x.add_(1), lambda x: x.mul_(2), lambda x: x.zero_(), lambda x: x.clamp_(0, 1),
    lambda x: x.copy_(torch.ones_like(x)), lambda x: x.__setitem__(0, 5.0),
], ids=["add_", "mul_", "zero_", "clamp_", "copy_", "setitem"])
def test_inference_tensors_outside_inference_mode_are_refused_before_any_write(op):
    # torch refuses to write an inference tensor outside inference mode (though its check
    # comes after its kernel wrote the tensor); the bundle wrote the first tensor (its foreach
    # kernel did), then refused the second. A failing in-place op writes nothing.
    with torch.inference_mode():
        model = nn.Linear(300, 200)
        first = model.weight.clone()
    tensors = list(model.parameters())
    before = [t.clone() for t in tensors]
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
            op(first)  # the loop's first step, on a copy
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            op(mt.bundle(model))
    torch.testing.assert_close(tensors, before)
    with torch.inference_mode():  # inside the mode torch writes them
        op(mt.bundle(model))
    assert not torch.equal(tensors[0], before[0])


@pytest.mark.parametrize("op", [
    lambda x: x.mul_(0.5), lambda x: x.add_(1), lambda x: x.clamp_(0, 1), lambda x: x.sqrt_(),
    lambda x: x.lerp_(torch.zeros_like(x), 0.5), lambda x: x.copy_(torch.ones_like(x)), lambda x: x.fill_(2.0),
    lambda x: x.zero_(),
], ids=["mul_", "add_", "clamp_", "sqrt_", "lerp_", "copy_", "fill_", "zero_"])
def test_an_expanded_tensor_is_written_as_torch_writes_it(op):
    # torch refuses most in-place ops on a tensor whose elements share memory (an expanded one),
    # not fill_ and zero_. The dry runs read copies of two elements, which share none, and
    # skipped a tensor of the first one's dtype: the bundle wrote the first tensor, then failed.
    def tensors():
        return [torch.rand(3000), torch.rand(1, 50).expand(30, 50), torch.rand(7)]

    loop, ours = tensors(), tensors()
    try:
        for t in loop:
            op(t)
        failure = None
    except RuntimeError as e:
        failure = e
    before = [t.clone() for t in ours]
    if failure is None:
        op(mt.bundle(ours))
        torch.testing.assert_close(ours, loop)
    else:
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            op(mt.bundle(ours))
        torch.testing.assert_close(ours, before)


_CAST = "can't be cast to the desired output type Long"
_DRY_RUN = r"\(tensor '1' of .*; nothing was written\)"


@pytest.mark.parametrize(
    "op, error, message",
    [(lambda b: b.mul_(0.5), RuntimeError, _CAST + " " + _DRY_RUN),
     (lambda b: b.div_(2), RuntimeError, _CAST + " " + _DRY_RUN),
     (lambda b: b.div_(mt.bundle([torch.ones(3), torch.ones(2, dtype=torch.int64)])), RuntimeError,
      _CAST + " " + _DRY_RUN),
     (lambda b: b.sqrt_(), RuntimeError, _CAST + " " + _DRY_RUN),
     (lambda b: b.exp_(), RuntimeError, _CAST + " " + _DRY_RUN),
     (lambda b: b.lerp_(mt.bundle([torch.ones(3), torch.ones(2)]), 0.5), RuntimeError,
      r"expected dtype torch.int64 for `end` but got dtype torch.float32 \(tensor '1'"),
     # torch has no kernel for these dtypes: its NotImplementedError, before any write
     (lambda b: b.lerp_(mt.bundle([torch.ones(3), torch.ones(2, dtype=torch.int64)]), 1), NotImplementedError,
      "not implemented for 'Long' " + _DRY_RUN),
     (lambda b: b.frac_(), NotImplementedError, "not implemented for 'Long' " + _DRY_RUN)],
    ids=["mul_", "div_ scalar", "div_ bundle", "sqrt_", "exp_", "lerp_ dtype", "lerp_ integers", "frac_"],
)
def test_nothing_is_half_written_when_a_later_tensor_fails(op, error, message):
    # The float tensor comes first: a failure at the integer one must not follow its write.
    f, i = torch.ones(3), torch.ones(2, dtype=torch.int64)
    b = mt.bundle([f, i])
    with pytest.raises(error, match=message):
        op(b)
    assert torch.equal(f, torch.ones(3)) and torch.equal(i, torch.ones(2, dtype=torch.int64))


def test_an_ema_of_another_dtype_is_told_the_cast_that_fits():
    # A float32 EMA of a bfloat16 model: torch's lerp_ refuses, as does the concatenation's;
    # the error said `end.derive([...])`. Where the target holds one dtype, `end.to(...)` does.
    ema, model = nn.Linear(3, 2), nn.Linear(3, 2).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"expected dtype torch.float32 .*`end.to\(torch.float32\)`"):
        mt.recipes.ema_(ema, model, 0.9)
    want = [p.detach().lerp(q.float(), 0.1) for p, q in zip(ema.parameters(), model.parameters())]
    mt.recipes.ema_(ema, mt.bundle(model).to(torch.float32), 0.9)
    assert all(torch.equal(p, w) for p, w in zip(ema.parameters(), want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_fill_that_overflows_a_later_tensor_writes_nothing(dtype):
    # torch fills a one-element CPU tensor without checking that the value fits its dtype, a
    # longer one with the check: a dry run on one element passed, so the float64 tensor was
    # filled before the 16-bit one refused 1e40.
    f, h = torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"fill_: value cannot be converted .*overflow \(tensor '1' .*nothing was written"):
        mt.bundle([f, h]).fill_(1e40)
    assert not f.any() and not h.any()


def test_integer_tensors_take_what_torch_casts_for_them():
    # fill_, masked_fill_, comparisons and item assignment cast their value: torch takes 2.5
    # for an integer tensor, and so does a bundle holding one (it refused, before 2026-11-27)
    i, f = torch.tensor([1, 5, 9]), torch.tensor([0.25, 4.0])
    b = mt.bundle([f, i])
    b.masked_fill_(b.materialize() > 3.5, 2.5)
    assert i.tolist() == [1, 2, 2] and f.tolist() == [0.25, 2.5]
    b.lt_(2.2)
    assert i.tolist() == [1, 1, 1] and f.tolist() == [1.0, 0.0]
    b.fill_(1.5)
    assert i.tolist() == [1, 1, 1] and f.tolist() == [1.5, 1.5]
    b[3] = 7.9
    assert i.tolist() == [1, 7, 1]


def test_an_error_on_the_first_tensor_names_the_bundle():
    i = torch.tensor([1, 2])
    with pytest.raises(NotImplementedError, match=r"frac_: .*'Long' \(tensor '0' of .*; nothing was written\)"):
        mt.bundle([i, torch.ones(2)]).frac_()
    # an integer division by zero fails on a value the dry run does not see: it may come
    # after other tensors were written, and the message says so
    a, z = torch.tensor([4, 6]), torch.tensor([8, 0])
    with pytest.raises(RuntimeError, match=r"ZeroDivisionError .*tensors before the one it failed on, if any"):
        mt.bundle([a, z]).__ifloordiv__(mt.bundle([torch.tensor([2, 2]), torch.tensor([1, 0])]))
    assert a.tolist() == [2, 3]


def test_requires_grad_changes_no_flag_when_torch_refuses_one():
    leaf = torch.ones(2, requires_grad=True)
    computed = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match=r"leaf variables, and tensor '1' .*nothing was changed"):
        mt.bundle([leaf, computed]).requires_grad_(False)
    assert leaf.requires_grad
    f, i = torch.ones(2), torch.tensor([1])
    with pytest.raises(RuntimeError, match=r"floating point dtype .*tensor '1' .* is torch.int64"):
        mt.bundle([f, i]).requires_grad_()
    assert not f.requires_grad


def test_a_shift_of_floats_writes_no_integer_before_it_fails():
    i, f = torch.tensor([1, 2]), torch.ones(2)
    with pytest.raises(NotImplementedError, match=r"not implemented for 'Float' \(tensor '1'"):
        mt.bundle([i, f]).bitwise_left_shift_(2)
    assert i.tolist() == [1, 2]


def test_structure_mismatch_names_both_structures():
    b = mt.bundle({"w": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"w \(2, 2\).*v \(4,\)"):
        b.add_(mt.bundle({"v": torch.ones(4)}))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        b.add_(torch.ones(3))


@given(case=cases(min_tensors=1, grad=False, kinds=("normal",)))
def test_copy_and_split_round_trip_with_torch_utils(case):
    # torch.nn.utils views each parameter as a vector, which needs contiguous tensors
    tensors = [nn.Parameter(t.detach().double().contiguous()) for t in case.tensors]
    b = mt.bundle(tensors)
    vector = torch.randn(b.numel(), dtype=torch.float64)
    with torch.no_grad():
        b.copy_(vector)
    torch.testing.assert_close(nn.utils.parameters_to_vector(tensors), vector)
    other = [torch.zeros_like(t) for t in tensors]
    nn.utils.vector_to_parameters(vector, other)
    assert all(torch.equal(a, c) for a, c in zip(tensors, other))
    torch.testing.assert_close(b.split(nn.utils.parameters_to_vector(tensors)).materialize(), vector)


@pytest.mark.parametrize("value", [torch.tensor(2.5), torch.tensor(3, dtype=torch.int64), torch.tensor(1e-3, dtype=torch.float64)])
def test_copy_from_a_zero_dim_tensor_fills_every_tensor(value):
    # torch's copy_ broadcasts a 0-d or (1,) source over the concatenation; the bundle took
    # only a (1,) one and refused a 0-d one with a TypeError
    tensors = [torch.zeros(2, 3), torch.zeros(4, dtype=torch.float16), torch.zeros(()), torch.zeros(2, dtype=torch.int32)]
    want = [t.clone() for t in tensors]
    for t in want:
        (t if t.dim() else t.view(1)).copy_(value)
    mt.bundle(tensors).copy_(value)
    for got, w in zip(tensors, want):
        assert got.dtype == w.dtype and torch.equal(got, w)


@pytest.mark.parametrize("kind", ["bundle", "flat"])
def test_copy_from_a_source_that_requires_grad_is_differentiable(kind):
    # As the loop `t.copy_(s)` (and the concatenation's copy_), the copy records a graph to
    # the source. torch._foreach_copy_ has no derivative: backward raised, and the integer
    # tensor was marked as requiring grad.
    sources = [torch.randn(2, 3, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True),
               torch.randn(2, requires_grad=True)]
    targets = [torch.zeros(2, 3), torch.zeros(4, dtype=torch.float16), torch.zeros(2, dtype=torch.int64)]
    source = mt.bundle(sources) if kind == "bundle" else torch.cat([s.reshape(-1) for s in sources[:2]] + [sources[2]])
    mt.bundle(targets).copy_(source)
    assert [t.requires_grad for t in targets] == [True, True, False] and targets[2].grad_fn is None
    (targets[0] * 2).sum().add((targets[1].float() * 3).sum()).backward()
    assert torch.equal(sources[0].grad, torch.full((2, 3), 2.0))
    assert torch.equal(sources[1].grad, torch.full((4,), 3.0, dtype=torch.float64))
    assert sources[2].grad is None or not sources[2].grad.any()  # the flat source's cat gives zeros


def test_int_and_mask_assignment():
    w, v = torch.zeros(2, 3), torch.zeros(4)
    b = mt.bundle({"w": w, "v": v})
    b[4] = 7.0
    b[-1] = 9.0
    assert w[1, 1] == 7.0 and v[3] == 9.0
    b[b.materialize() == 0] = 1.0
    assert (w != 0).all() and (v != 0).all()
    with pytest.raises(TypeError, match="int or a boolean mask"):
        b[1:3] = 0.0
    with pytest.raises(IndexError, match="out of bounds"):
        b[10] = 1.0


def test_assignment_by_a_0d_integer_tensor_and_to_a_slice():
    # `b[torch.tensor(i)]` read element i but `b[torch.tensor(i)] = v` was refused; and
    # `b[1:3] = t` was told to assign a scalar, which then failed on the slice.
    w, v = torch.zeros(2, 3), torch.zeros(4)
    b = mt.bundle({"w": w, "v": v})
    flat = torch.zeros(10)
    for index, value in [(torch.tensor(4), 7.0), (torch.tensor(-1, dtype=torch.int32), 9.0)]:
        b[index] = value
        flat[index] = value
    assert torch.equal(b.materialize(), flat)
    with pytest.raises(TypeError, match="takes an int or a boolean mask .* got slice"):
        b[1:3] = torch.tensor([1.0, 2.0])
    assert torch.equal(b.materialize(), flat)


def test_mask_assignment_takes_a_one_element_tensor():
    # `c[mask] = torch.tensor([v])` works on the concatenation; masked_fill_, which the
    # bundle writes with, refuses a value that is not 0-d (a (1,) value raised before)
    w, i = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    b = mt.bundle({"w": w, "i": i})
    mask = torch.tensor([True, False, True, False, False, False, True, False])
    for value in (torch.tensor([2.5]), torch.tensor([[7.0]], dtype=torch.float64)):
        want = torch.cat([w.reshape(-1), i.to(w.dtype)])
        want[mask] = value
        b[mask] = value
        assert w.reshape(-1).tolist() == want[:6].tolist() and i.tolist() == want[6:].to(torch.int64).tolist()
    assert w.reshape(-1).tolist() == [7.0, 0.0, 7.0, 0.0, 0.0, 0.0] and i.tolist() == [7, 0]


def test_a_refused_int_assignment_names_the_bundle_and_the_tensor():
    # torch's own exception class and words, with the bundle's context (it had none)
    f, i = torch.zeros(2), torch.zeros(3, dtype=torch.int8)
    b = mt.bundle({"f": f, "i": i})
    with pytest.raises(RuntimeError, match=r"__setitem__: value cannot be converted .*int8.*\(tensor 'i' of .*nothing was written\)"):
        b[3] = 300
    with pytest.raises(TypeError, match=r"__setitem__: can't assign a str .*\(tensor 'f' of "):
        b[0] = "x"
    assert not f.any() and not i.any()


def test_in_place_on_a_leaf_slice_of_the_bundle_view():
    w = torch.zeros(3)
    b = mt.bundle([w])
    b.data.add_(1)  # .data aliases, as on a tensor
    torch.testing.assert_close(w, torch.ones(3))


class _AtenCalls(TorchDispatchMode):
    """The aten ops called on `watched` tensors (not on the dry run's copies and meta
    stand-ins), outermost only (the mode is off inside each call)."""

    def __init__(self, watched):
        super().__init__()
        self.names = []
        self.pointers = {t.data_ptr() for t in watched if t.numel()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0][0] if args and isinstance(args[0], list) and args[0] else args[0] if args else None
        if isinstance(first, torch.Tensor) and not first.is_meta and first.data_ptr() in self.pointers:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["lerp_", "add_", "mul_"])
def test_bundle_operands_take_one_foreach_call(op):
    # An EMA step (`lerp_` with a number weight) or `a.add_(b)` on a model: one torch call
    # for all the tensors, not a Python loop.
    xs = [torch.randn(3), torch.randn(2, 2, dtype=torch.float64), torch.randn(0)]
    ys = [torch.randn(3), torch.randn(2, 2, dtype=torch.float64), torch.randn(0)]
    extra = (0.1,) if op == "lerp_" else ()
    want = [x.clone() for x in xs]
    for w, y in zip(want, ys):
        getattr(w, op)(y, *extra)
    with _AtenCalls(xs) as seen:
        getattr(mt.bundle(xs), op)(mt.bundle(ys), *extra)
    assert [n for n in seen.names if n.endswith("_")] == ["_foreach_" + op]  # the writes
    assert all(torch.equal(x, w) for x, w in zip(xs, want))


def test_lerp_with_an_end_of_another_dtype_names_the_tensor():
    # torch's lerp_ takes `end` in the tensor's own dtype only; the first tensor too gets an
    # error that names it and its bundle, before anything is written.
    ema = mt.bundle({"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)})
    source = mt.bundle({"w": torch.ones(2, 3), "b": torch.ones(3)})
    with pytest.raises(RuntimeError, match=r"lerp_: expected dtype torch.float64 .*torch.float32 \(tensor 'w' of .*nothing was written"):
        ema.lerp_(source, 0.5)
    assert not ema.materialize().any()
    ema.lerp_(source.double(), 0.5)
    assert torch.equal(ema.materialize(), torch.full((9,), 0.5, dtype=torch.float64))


ONE_ELEMENT_CALLS = {
    "add_": lambda t, o: t.add_(o, alpha=2),
    "mul_": lambda t, o: t.mul_(o),
    "clamp_min_": lambda t, o: t.clamp_min_(o),
    "addcmul_": lambda t, o: t.addcmul_(o, o),
}


@pytest.mark.parametrize("op", sorted(ONE_ELEMENT_CALLS))
@given(case=cases(min_tensors=1, grad=False))
def test_one_element_operands_promote_as_on_each_flattened_tensor(op, case):
    # A (1,) float32 operand makes a bfloat16 tensor's update compute in float32, a 0-d one
    # does not; and a 0-d tensor of the bundle is written as its (1,) view, as in the
    # concatenation, so a (1,) operand broadcasts into it.
    call = ONE_ELEMENT_CALLS[op]
    for other in (torch.tensor(0.7), torch.tensor([0.7]), torch.tensor([0.7], dtype=torch.float64)):
        want = [t.detach().clone() for t in case.tensors]
        for t in want:
            call(t if t.dim() else t.view(1), other)
        got = [t.detach().clone() for t in case.tensors]
        call(mt.bundle(got), other)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def _loop_and_bundle(make, op):
    """The tensors after `op(t, i)` in the loop over tensors i, and after `op(bundle, None)`.

    (Not the concatenation: torch's vectorized and scalar kernels of pow or log round some
    elements differently, so even the loop differs from it where a tensor ends.)
    """
    loop = make()
    for i, t in enumerate(loop):
        op(t, i)
    ours = make()
    op(mt.bundle(ours), None)
    return torch.cat([t.reshape(-1) for t in loop]), torch.cat([t.reshape(-1) for t in ours])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("exponent", [torch.tensor(3), torch.tensor(2.0), torch.tensor(3, dtype=torch.int32)])
def test_pow_by_a_zero_dim_tensor_uses_the_tensor_kernel(dtype, exponent):
    # torch._foreach_pow_ takes a 0-d tensor as a number, whose kernel rounds otherwise than
    # the loop's `t.pow_(tensor)` (1122 of 5000 bfloat16 elements differed).
    def make():
        g = torch.Generator().manual_seed(1)
        return [(3 * torch.randn(3000, generator=g)).to(dtype), (3 * torch.randn(2000, generator=g)).to(dtype)]

    loop, ours = _loop_and_bundle(make, lambda x, i: x.pow_(exponent))
    torch.testing.assert_close(ours, loop, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["mul_", "__imul__", "add_", "sub_", "div_", "clamp_min_"])
def test_16_bit_tensors_take_a_scalar_as_the_loop(dtype, op):
    # On the CPU a foreach kernel rounds 0.7 to bfloat16 before it multiplies; the loop's
    # `t.mul_(0.7)` and the concatenation's do not (525 of 5000 elements differed); the
    # float32 tensor of the model may take the foreach kernel.
    def make():
        g = torch.Generator().manual_seed(2)
        return [(3 * torch.randn(3000, generator=g)).to(dtype), torch.randn(2000, generator=g).to(dtype),
                torch.randn(7, generator=g)]  # a float32 tensor: its foreach is the loop

    # An int the dtype cannot hold is rounded too (bfloat16 `mul_(257)` differed on every
    # element); 3 is exact in both dtypes.
    for scalar in (0.7, 1.1, 0.999, 1e-3, 257, -2049, 3, 32769):
        loop, ours = _loop_and_bundle(make, lambda x, i: getattr(x, op)(scalar))
        torch.testing.assert_close(ours, loop, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", ["sub_", "fmod_", "remainder_", "xlogy_", "nextafter_", "mul_", "copy_", "lerp_"])
@pytest.mark.parametrize("flat", [False, True], ids=["bundle", "flat"])
def test_a_zero_dim_tensor_promotes_with_its_operand_piece(op, flat):
    # A bfloat16 0-d tensor is written as its (1,) view; its float32 piece of the operand was
    # left 0-d, so it took no part in promotion: the update was computed in bfloat16, not
    # in float32 as in the loop and the concatenation.
    def make():
        return [torch.tensor(1.3).bfloat16(), torch.linspace(-2, 2, 5000).bfloat16()]

    other = [torch.tensor(0.8421), torch.linspace(-1, 1.3, 5000)]
    whole = torch.cat([o.reshape(-1) for o in other])

    def call(x, i):
        o = (whole if flat else mt.bundle(other)) if i is None else other[i]
        if op == "lerp_":  # lerp_ takes `end` in the tensor's dtype only
            return x.lerp_(o.bfloat16(), 0.3)
        return getattr(x, op)(o)

    loop, ours = _loop_and_bundle(make, call)
    torch.testing.assert_close(ours, loop, rtol=0, atol=0, equal_nan=True)



@pytest.mark.parametrize(
    "op, made",
    [
        (lambda b, o: b.sub_(o), 1), (lambda b, o: b.div_(o), 1), (lambda b, o: b.lerp_(o, 0.3), 1),
        (lambda b, o: b.copy_(o), 1), (lambda b, o: b.__iadd__(o), 1),
        (lambda b, o: b.addcmul_(o, o, value=0.5), 2),  # o twice: tensor i's, once each
    ],
)
def test_on_demand_operands_are_made_one_tensor_at_a_time(op, made):
    # All of an on-demand operand's tensors were made before the first write (a foreach
    # kernel takes them all): `b.sub_(lr * g)` held the model's size.
    ws = [torch.randn(3000), torch.randn(40, 50), torch.randn(2000)]
    gs = [torch.randn_like(w) for w in ws]
    want = [w.clone() for w in ws]
    op(mt.bundle(want), (mt.bundle(gs).abs() + 1).clone())
    lazy = mt.bundle(gs).abs() + 1
    peak = track_live(lazy)
    with torch.no_grad():
        op(mt.bundle(ws), lazy)
    assert peak[0] == made
    for w, v in zip(ws, want):
        torch.testing.assert_close(w, v, rtol=0, atol=0)
    # Where writing one tensor changes another's operand (views of one flat tensor, or the
    # same tensors in another order), computing it per write would read written values (or
    # be refused as modified): those operands are all made first.
    flat = torch.randn(8000)
    views = mt.bundle([torch.randn(3000), torch.randn(5000)]).split(flat)
    want_flat = flat * 3
    views.add_(views * 2)
    torch.testing.assert_close(flat, want_flat, rtol=0, atol=0)
    x, y = torch.randn(5000), torch.randn(5000)
    want_x, want_y = x + y, y + x
    mt.bundle([x, y]).add_(mt.bundle([y, x]) * 1)
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)


def test_torch_function_spellings_of_in_place_ops_are_in_the_table():
    # `torch.exp_(b)` is `b.exp_()` spelled as a function (README: every elementwise op's X_);
    # it was refused as an in-place op outside the table.
    methods = {f.__name__: funcs for funcs, _ in INPLACE_FUNCTIONS.values() for f in funcs if not f.__name__.startswith("__")}
    names = [n for n in methods if hasattr(torch, n)]
    assert len(names) > 50 and "clip_" in names  # (clip_ is registered with clamp_)
    missing = [n for n in names if getattr(torch, n) not in methods[n]]
    assert not missing, missing


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: torch.exp_(x),
        lambda x, y: torch.relu_(x),
        lambda x, y: torch.clamp_(x, 0.2, 0.6),
        lambda x, y: torch.clip_(x, 0.2, 0.6),
        lambda x, y: torch.clamp_min_(x, y),
        lambda x, y: torch.fill_(x, 2.5),
        lambda x, y: torch.xlogy_(x, y),
    ],
)
def test_torch_function_spellings_of_in_place_ops_write_through(call):
    tensors = [torch.rand(3, 4) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1, torch.tensor(0.7)]
    others = [t + 0.3 for t in tensors]
    loop = [t.clone() for t in tensors]
    for t, o in zip(loop, others):
        call(t, o)
    b = mt.bundle(tensors)
    assert call(b, mt.bundle(others)) is b
    for got, want in zip(tensors, loop):
        torch.testing.assert_close(got, want)


_FOREACH_BINARY = {"add_", "sub_", "mul_", "div_", "pow_", "clamp_min_", "clamp_max_"}


def _foreach_operands(name, targets):
    # The operands of torch._foreach_<name>, for these targets: a scalar, a 0-d tensor, a list
    # of scalars or of tensors, as its overloads take.
    base = name.removeprefix("_foreach_")
    if base == "copy_":
        return [([x * 0.5 for x in targets],)]
    if base == "lerp_":
        return [([x * 0.5 for x in targets], 0.25)]
    if base == "norm":
        return [(), (1,), (float("inf"),)]
    if base in _FOREACH_BINARY:
        return [(0.5,), (torch.tensor(0.75),), ([0.5, 2.0],), ([x * 0.5 + 1 for x in targets],)]
    return [()]


@pytest.mark.parametrize("name", sorted(FOREACH_FUNCTIONS))
def test_foreach_functions_take_a_bundle_as_its_own_op(name):
    # torch's foreach functions are defined element by element, so a bundle in their list is
    # its own op (clip_grad_norm_(b, foreach=True) hands them [b.grad]); they were refused, or
    # copied the bundle with a MaterializationWarning.
    func = getattr(torch, name)
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3), (4,), ()]
    for i in range(len(_foreach_operands(name, [torch.ones(1)]))):
        theirs = [torch.rand(s, generator=g) + 0.1 for s in [*shapes, (2,)]]
        ours = [t.clone() for t in theirs]
        mine = [mt.bundle(ours[:3]), ours[3]]
        got_operands = _foreach_operands(name, mine)[i]
        want_operands = _foreach_operands(name, [torch.cat([t.reshape(-1) for t in theirs[:3]]), theirs[3]])[i]
        with warnings.catch_warnings():
            warnings.simplefilter("error", mt.MaterializationWarning)
            got = func(mine, *got_operands)
        # the reference: the same function on the concatenation as one tensor
        flat = [torch.cat([t.reshape(-1) for t in theirs[:3]]), theirs[3]]
        want = func(flat, *want_operands)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in ours]), torch.cat([t.reshape(-1) for t in flat]))


_ZERO_D_CALLS = {
    "clamp_min_": lambda x, o: x.clamp_min_(o),
    "clamp_max_": lambda x, o: x.clamp_max_(o),
    "clamp_": lambda x, o: x.clamp_(o, o),
    "sub_": lambda x, o: x.sub_(o),
    "add_": lambda x, o: x.add_(o),
    "mul_": lambda x, o: x.mul_(o),
    "pow_": lambda x, o: x.pow_(o),
    "foreach clamp_min_": lambda x, o: torch._foreach_clamp_min_([x], o),
}


@pytest.mark.parametrize("name", sorted(_ZERO_D_CALLS))
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
@pytest.mark.parametrize("operand", [True, 2, 0.5], ids=["bool", "int", "float"])
def test_zero_d_tensor_operands_as_the_loop_takes_them(name, dtype, operand):
    # The foreach kernels without a Tensor overload (clamp_min_, clamp_max_, sub_) take a 0-d
    # tensor as a number, and the number kernels of clamp_min_/clamp_max_ do not exist for
    # bool: `clamp_min_(torch.tensor(True))` of a bool bundle raised NotImplementedError where
    # each tensor's clamp_min_ computes.
    call, other = _ZERO_D_CALLS[name], torch.tensor(operand)
    made = [torch.tensor([1, 0, 1], dtype=dtype), torch.tensor([[0, 1]], dtype=dtype), torch.tensor(1, dtype=dtype)]
    theirs, ours = [t.clone() for t in made], [t.clone() for t in made]
    try:
        for t in theirs:
            call(t, other)
    except Exception as e:
        with pytest.raises(type(e)):
            call(mt.bundle(ours), other)
        assert all(torch.equal(t, u) for t, u in zip(ours, made))  # nothing written
    else:
        call(mt.bundle(ours), other)
        assert all(torch.equal(t, u) for t, u in zip(ours, theirs))

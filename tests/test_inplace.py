"""In-place ops write through into the real tensors, exactly like the per-tensor loop."""

import pytest
import torch
from hypothesis import given
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import modtensor as mt
from generators import INTS, Case, cases, other_like
from modtensor._inplace import INPLACE_FUNCTIONS
from op_specs import INTEGER_OPS, is_binary, pointwise_calls

# How each in-place op is called: `call(f, x, y)`, x the target, y an operand of the same structure.
EXPLICIT_CALLS = {
    "copy_": [lambda f, x, y: f(x, y)],
    "fill_": [lambda f, x, y: f(x, 1.5), lambda f, x, y: f(x, torch.tensor(2.0))],
    "zero_": [lambda f, x, y: f(x)],
    "masked_fill_": [lambda f, x, y: f(x, y > 1.0, -1.0)],
    "__setitem__": [lambda f, x, y: f(x, y > 1.0, 0.0)],
    "requires_grad_": [lambda f, x, y: f(x, False)],
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
)
def test_inplace_equals_the_per_tensor_loop(name, f, call, case, int_case):
    if name.rstrip("_") in INTEGER_OPS or name in ("__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"):
        case = int_case
    other = other_like(case, seed=4, positive=True)
    loop_x, loop_y = _clone(case), _clone(other)
    bundle_x, bundle_y = _clone(case), _clone(other)
    try:
        for tx, ty in zip(loop_x.tensors, loop_y.tensors):
            call(f, tx, ty)
    except Exception as e:  # the bundle raises what torch raised, and writes nothing
        before = _snapshot(bundle_x.tensors)
        with pytest.raises(type(e)):
            call(f, bundle_x.bundle(), bundle_y.bundle())
        for (_, v, _), t in zip(before, bundle_x.tensors):
            torch.testing.assert_close(t, v, equal_nan=True)
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


_CAST = "can't be cast to the desired output type torch.int64"
_UNSAFE = "to out tensor with dtype torch.int64, but this can't be cast"
_DRY_RUN = r"\(tensor '1' of .*; nothing was written\)"


@pytest.mark.parametrize(
    "op, message",
    [(lambda b: b.mul_(0.5), _CAST),
     (lambda b: b.div_(2), _CAST + " " + _DRY_RUN),
     (lambda b: b.div_(mt.bundle([torch.ones(3), torch.ones(2, dtype=torch.int64)])), _CAST + " " + _DRY_RUN),
     (lambda b: b.sqrt_(), _UNSAFE + ".*" + _DRY_RUN),
     (lambda b: b.exp_(), _UNSAFE + ".*" + _DRY_RUN),
     (lambda b: b.lerp_(mt.bundle([torch.ones(3), torch.ones(2)]), 0.5), _CAST)],
    ids=["mul_", "div_ scalar", "div_ bundle", "sqrt_", "exp_", "lerp_"],
)
def test_nothing_is_half_written_when_a_cast_fails(op, message):
    # The float tensor comes first: a failure at the integer one must not follow its write.
    f, i = torch.ones(3), torch.ones(2, dtype=torch.int64)
    b = mt.bundle([f, i])
    with pytest.raises(RuntimeError, match=message):
        op(b)
    assert torch.equal(f, torch.ones(3)) and torch.equal(i, torch.ones(2, dtype=torch.int64))


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


def test_in_place_on_a_leaf_slice_of_the_bundle_view():
    w = torch.zeros(3)
    b = mt.bundle([w])
    b.data.add_(1)  # .data aliases, as on a tensor
    torch.testing.assert_close(w, torch.ones(3))


class _AtenCalls(TorchDispatchMode):
    """The aten ops called on real tensors (not the meta dry run), outermost only (the mode
    is off inside each call)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0][0] if args and isinstance(args[0], list) and args[0] else args[0] if args else None
        if not (isinstance(first, torch.Tensor) and first.is_meta):
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
    with _AtenCalls() as seen:
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

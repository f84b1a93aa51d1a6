"""Gradient bundles, and bundles whose tensors live on several devices."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import modtensor as mt
import torch.autograd.forward_ad as fwAD
from generators import cases

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _trained_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    return model


def test_grad_bundle_norm_is_the_global_gradient_norm():
    model = _trained_model()
    grads = [p.grad for p in model.parameters()]
    g = mt.bundle(model).grad
    assert g.names == ("0.weight", "0.bias", "2.weight", "2.bias") and g.left_out == ()
    torch.testing.assert_close(g.norm(), nn.utils.get_total_norm(grads))
    torch.testing.assert_close(g.norm(float("inf")), nn.utils.get_total_norm(grads, norm_type=float("inf")))
    assert all(a is b for a, b in zip(g.tensors, grads))


def test_tensors_without_gradient_are_left_out_and_named():
    model = _trained_model()
    model[0].bias.grad = None
    g = mt.bundle(model).grad
    assert "0.bias" not in g.names and g.left_out == ("0.bias",)
    assert "left_out=['0.bias']" in repr(g)


def test_no_gradient_at_all_is_none_and_grad_cannot_be_set():
    b = mt.bundle(nn.Linear(2, 2))
    assert b.grad is None
    with pytest.raises(mt.UnsupportedOperationError, match="zero_grad"):
        b.grad = None


def test_data_cannot_be_set():
    # It raised Python's bare "property 'data' ... has no setter", naming neither the bundle
    # nor what works, where .grad and .requires_grad say both.
    lin = nn.Linear(2, 2)
    b = mt.bundle(lin)
    with pytest.raises(mt.UnsupportedOperationError, match=r"Setting .data on ParameterBundle of 2 tensors .*copy_"):
        b.data = torch.zeros(6)
    assert lin.weight.abs().sum() > 0


def test_grad_keeps_the_strategy():
    g = mt.bundle(_trained_model()).per_param().grad
    assert g.strategy == "per_param"
    assert g.norm().names == ("0.weight", "0.bias", "2.weight", "2.bias")


def test_cpu_and_meta_tensors_give_meta_results():
    cpu, meta = torch.randn(3, 2), torch.empty(4, device="meta")
    b = mt.bundle({"cpu": cpu, "meta": meta})
    assert b.device.type == "meta"
    for result in (b.sum(), b.std(), b.norm(), b.amax(), b.argmax(), torch.dot(b, b), b.prod()):
        assert result.device.type == "meta" and result.shape == ()
    doubled = b * 2
    assert doubled.to_dict()["cpu"].device.type == "cpu" and doubled.to_dict()["meta"].device.type == "meta"
    torch.testing.assert_close(doubled.to_dict()["cpu"], cpu * 2)
    per = b.per_param().sum()
    torch.testing.assert_close(per.to_dict()["cpu"], cpu.sum())
    assert per.to_dict()["meta"].device.type == "meta"
    assert b.materialize().device.type == "meta" and b.materialize().shape == (10,)


def test_a_bundle_of_no_tensors_moves_as_an_empty_tensor_does():
    # Nothing else places it, so the op's own device must stick (found by the CUDA run of
    # the property tests: an empty bundle's `.cuda()` stayed on the CPU).
    b = mt.bundle({})
    for move in (lambda t: t.to("meta"), lambda t: t.to(device="meta", dtype=torch.float64)):
        got, want = move(b), move(torch.empty(0))
        assert mt.is_bundle(got) and (got.device, got.dtype) == (want.device, want.dtype)
        assert (got + 1).device == want.device and got.materialize().device == want.device
        assert got.derive([]).device == want.device and got.per_param().sum().device == want.device
        assert got.per_param().dtype == want.dtype
    view = mt.bundle({}).split(torch.empty(0, device="meta"))
    assert view.device.type == "meta"


def test_a_meta_model_reduces_without_memory():
    with torch.device("meta"):
        model = nn.Linear(4096, 4096)
    b = mt.bundle(model)
    assert b.norm().device.type == "meta" and b.numel() == 4096 * 4097


@pytest.mark.parametrize(
    "op",
    [torch.amax, torch.amin, torch.max, lambda x: torch.aminmax(x).max, lambda x: x.norm(float("inf")),
     lambda x: torch.dist(x, x.detach() * 2, float("-inf")), lambda x: (x - 1).abs().amax()],
    ids=["amax", "amin", "max", "aminmax", "inf-norm", "dist -inf", "abs amax"],
)
def test_extrema_of_a_meta_model_that_requires_grad(op):
    # Their tie counting read values (`.tolist()`, `bool(m.isnan())`), which meta tensors do
    # not hold: NotImplementedError where the concatenation gives a meta result.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(70, 60), nn.Linear(60, 3))
    want = op(torch.cat([p.reshape(-1) for p in model.parameters()]))
    got = op(mt.bundle(model))
    assert (got.device, got.shape, got.dtype, got.requires_grad) == (want.device, want.shape, want.dtype, True)
    got.backward()
    assert [p.grad.shape for p in model.parameters()] == [p.shape for p in model.parameters()]


@cuda
def test_cuda_bundle_matches_the_concatenation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)).cuda()
    b = mt.bundle(model)
    ref = torch.cat([p.reshape(-1) for p in model.parameters()])
    for op in (torch.sum, torch.mean, torch.std, torch.norm, torch.amax, torch.argmax):
        got, want = op(b), op(ref)
        assert got.device == want.device
        torch.testing.assert_close(got, want)
    torch.testing.assert_close((b**2).sum(), (ref**2).sum())


@cuda
def test_tiny_cuda_bundles_through_the_fast_lane():
    # The seed's layer on a GPU: elementwise results kept flat, calls repeated so that the
    # second and third take the lane, gradients against the concatenation's.
    torch.manual_seed(0)
    a, b = nn.Conv2d(1, 16, 5).cuda(), nn.Conv2d(1, 16, 5).cuda()
    for _ in range(3):
        ca, cb = (torch.cat([p.reshape(-1) for p in m.parameters()]) for m in (a, b))
        x, y = mt.bundle(a), mt.bundle(b)
        got = [(x**2).sum(), (x - y).norm(), torch.dist(x, y), (x * 2 + 1).amax(), x.std()]
        want = [(ca**2).sum(), (ca - cb).norm(), torch.dist(ca, cb), (ca * 2 + 1).amax(), ca.std()]
        for g, w in zip(got, want):
            assert g.device == w.device
            torch.testing.assert_close(g, w)
        grads = torch.autograd.grad(sum(got), list(a.parameters()))
        flat_grad = torch.autograd.grad(sum(want), ca)[0]
        torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), flat_grad)
        assert (x - y).materialize().device == ca.device
    assert all(p.device.type == "cuda" for p in (x - y).tensors)


@cuda
def test_cpu_and_cuda_tensors_combine_on_the_first_tensors_device():
    torch.manual_seed(0)
    cpu, gpu = torch.randn(100), torch.randn(50, device="cuda")
    ref = torch.cat([cpu, gpu.cpu()])
    b = mt.bundle({"cpu": cpu, "gpu": gpu})
    assert b.device.type == "cpu"
    for op in (torch.sum, torch.std, torch.norm, torch.amax, torch.argmax):
        got = op(b)
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, op(ref))
    b2 = mt.bundle({"gpu": gpu, "cpu": cpu})
    assert b2.norm().device.type == "cuda"
    torch.testing.assert_close(b2.norm().cpu(), torch.cat([gpu.cpu(), cpu]).norm())


@cuda
@pytest.mark.parametrize("big", [False, True], ids=["tiny", "large"])
def test_python_operators_on_cuda_bundles(big):
    # + - * / ** sum mean norm are written in Python on the bundle (and tiny bundles take the
    # lane from the second call): on a GPU they must give the concatenation's results too.
    torch.manual_seed(0)
    shapes = [(300, 200), (200,)] if big else [(4, 3), (3,)]
    a = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    c = [torch.randn(s, device="cuda") for s in shapes]
    x, y = mt.bundle(a), mt.bundle(c)
    ca = torch.cat([t.reshape(-1) for t in a])
    cc = torch.cat([t.reshape(-1) for t in c])
    ops = [
        lambda u, v: (u + v).sum(), lambda u, v: (u - v).norm(), lambda u, v: (u * v).mean(),
        lambda u, v: (u / 2).sum(), lambda u, v: (2 - u).amax(), lambda u, v: (3 / (u.abs() + 1)).sum(),
        lambda u, v: (u**2).sum(), lambda u, v: u.norm(p=1), lambda u, v: u.norm(float("inf")),
        lambda u, v: u.sum(dtype=torch.float64), lambda u, v: u.mean(),
    ]
    for _ in range(2):
        for op in ops:
            got, want = op(x, y), op(ca, cc)
            assert got.device == want.device and got.dtype == want.dtype
            torch.testing.assert_close(got, want)
            grads = torch.autograd.grad(got, a)
            (flat_grad,) = torch.autograd.grad(want, ca)
            torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), flat_grad)


@cuda
def test_like_functions_on_cuda_bundles():
    # zeros_like and kin make each tensor on its own device (or on device=), as on the
    # concatenation; a bundle across devices keeps each tensor where its source lies.
    torch.manual_seed(0)
    gpu = mt.bundle(nn.Linear(8, 4).cuda())
    for make in (torch.zeros_like, torch.ones_like, lambda x, **kw: torch.full_like(x, 3.0, **kw)):
        got, want = make(gpu), make(gpu.materialize().detach())
        assert all(t.device.type == "cuda" for t in got.tensors) and got.device == want.device
        assert torch.equal(got.materialize(), want)
        moved = make(gpu, device="cpu", dtype=torch.float64)
        assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in moved.tensors)
    mixed = mt.bundle({"gpu": torch.randn(3, device="cuda"), "cpu": torch.randn(2)})
    assert [t.device.type for t in torch.zeros_like(mixed).tensors] == ["cuda", "cpu"]


# -- bundles as the inputs of torch.autograd.grad / backward ------------------------------------


def _loss(x):
    return ((x - 0.3) ** 2).sum() + (x.detach().sin() * x).sum()


@given(case=cases(min_tensors=1))
def test_autograd_grad_with_respect_to_a_bundle_is_the_concatenations(case):
    # The fallback handed autograd a fresh concatenation, in no graph: an error, or None.
    b = case.bundle()
    frozen = [t for t in case.tensors if not t.requires_grad]
    if frozen:  # no graph reaches them: refused where the others require grad, torch's error if none does
        with pytest.raises(RuntimeError, match="does not require grad|do not require grad"):
            torch.autograd.grad(_loss(b), b)
        return
    cat = case.concat().detach().requires_grad_()
    (want,) = torch.autograd.grad(_loss(cat), cat)
    (got,) = torch.autograd.grad(_loss(b), b)
    assert isinstance(got, mt.ParameterBundle) and got.names == b.names
    torch.testing.assert_close(got.materialize(), want, equal_nan=True)
    for t in case.tensors:
        t.grad = None
    _loss(b).backward(inputs=[b])  # accumulates into the tensors' .grad, as inputs= does for a tensor
    # every tensor gets its gradient, an empty one for a 0-numel tensor, as from the concatenation
    assert not b.grad.left_out
    torch.testing.assert_close(b.grad.materialize(), want, equal_nan=True)


def test_autograd_grad_of_unused_tensors():
    w, v, u = (torch.randn(3, requires_grad=True) for _ in range(3))
    b, other = mt.bundle([w, v]), mt.bundle([u])
    got, nothing = torch.autograd.grad(w.sum(), [b, other], allow_unused=True)
    torch.testing.assert_close(got.materialize(), torch.cat([torch.ones(3), torch.zeros(3)]))  # as cat's
    assert nothing is None  # as for a tensor the output does not use
    with pytest.raises(RuntimeError, match="index 1 appears to not have been used"):
        torch.autograd.grad(w.sum(), [b, other])
    _, zeros = torch.autograd.grad(w.sum(), [b, other], materialize_grads=True)
    assert torch.equal(zeros.materialize(), torch.zeros(3))
    with pytest.raises(mt.UnsupportedOperationError, match="computed on demand"):
        torch.autograd.grad(w.sum(), b * 2)


@pytest.mark.parametrize("size", [10, 5000], ids=["tiny", "long"])
@pytest.mark.parametrize("call", ["grad", "grad wrt bundle", "autograd.backward", "Tensor.backward"])
def test_a_bundle_as_the_output_of_autograd(size, call):
    # The output's gradient is given for the concatenation: a flat tensor or a bundle of the
    # same structure. The fallback differentiated a fresh concatenation of the inputs too,
    # so grad raised and backward(inputs=[b]) left every .grad None, silently.
    ws = [torch.randn(size, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    b, cat = mt.bundle(ws), torch.cat([w.reshape(-1) for w in ws])
    g = torch.randn(cat.numel())
    want = [torch.autograd.grad(cat.exp(), w, g)[0] for w in ws]
    for grad_output in (g, mt.bundle([g[:size], g[size:].reshape(3, 4)])):
        with warnings.catch_warnings():
            warnings.simplefilter("error", mt.MaterializationWarning)
            if call == "grad":
                got = list(torch.autograd.grad(b.exp(), ws, grad_output))
            elif call == "grad wrt bundle":
                got = list(torch.autograd.grad(b.exp(), b, grad_outputs=grad_output)[0].tensors)
            else:
                for w in ws:
                    w.grad = None
                if call == "autograd.backward":
                    torch.autograd.backward(b.exp(), grad_output, inputs=[b])
                else:
                    b.exp().backward(grad_output, inputs=[b])
                got = [w.grad for w in ws]
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)
    with pytest.raises(RuntimeError, match=r"mismatch in shape.*ParameterBundle of 2 tensors"):
        torch.autograd.grad(b.exp(), ws, torch.ones(3))


# -- forward-mode AD and torch.func transforms ------------------------------------------------


def test_a_bundle_given_to_a_transform_as_its_input_is_refused_by_name():
    # The transform wraps the bundle, so its ops reach the storage-less wrapper below
    # __torch_function__: the error names the bundle and says to build it inside the function.
    b = mt.bundle([torch.randn(3), torch.randn(2, 2)])
    for transform in (torch.func.grad, torch.func.vmap):
        with pytest.raises(mt.UnsupportedOperationError, match=r"ParameterBundle of 2 tensors.*functional_call"):
            transform(lambda x: x.norm())(b)

TRANSFORMED = {
    "sum": lambda x: x.sum(), "var": lambda x: x.var(), "std": lambda x: x.std(), "norm": lambda x: x.norm(),
    "amax": lambda x: x.amax(), "median": lambda x: x.median(), "topk": lambda x: x.topk(3).values.sum(),
    "quantile": lambda x: torch.quantile(x, 0.3), "sum of squares": lambda x: (x**2).sum(),
    "dist": lambda x: torch.dist(x, torch.ones(x.shape)), "difference norm": lambda x: (x - x * 0.5).norm(),
    "index": lambda x: x[5] + x[-1] + x[2:40].sum(),  # their results link every tensor (zero gradients)
}


def _transform_case():
    # a tensor long enough for the one-pass moments and the norm rows, short ones to pack
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1 << 20, generator=g) * 0.1 + 0.01, torch.randn(30, generator=g), torch.randn(7, generator=g)]


def _cat(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("name", sorted(TRANSFORMED))
def test_forward_mode_tangents_are_the_concatenations(real_sizes, name):
    # The moments, norm rows, packs and radix counting computed without tangents: var's
    # tangent lost the long tensor, median's was 0, the norm raised.
    f = TRANSFORMED[name]
    primals = tuple(_transform_case())
    tangents = tuple(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for t in primals)
    want = torch.func.jvp(lambda *ts: f(_cat(*ts)), primals, tangents)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mt.MaterializationWarning)  # order statistics fall back there
        got = torch.func.jvp(lambda *ts: f(mt.bundle(list(ts))), primals, tangents)
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(f(mt.bundle([fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]))).tangent
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dual, want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TRANSFORMED))
def test_torch_func_grad_and_vmap(real_sizes, name):
    f = TRANSFORMED[name]
    primals = _transform_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mt.MaterializationWarning)
        got = torch.func.grad(lambda ts: f(mt.bundle(ts)))(primals)
        # per-sample: a batch of small parameter sets (a tiny bundle: its lane's concatenation)
        batch = [torch.randn(4, 5, 3), torch.randn(4, 2)]
        batched = torch.func.vmap(lambda a, b: f(mt.bundle([a, b])))(*batch)
    want = torch.func.grad(lambda ts: f(_cat(*ts)))(primals)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched, torch.func.vmap(lambda a, b: f(_cat(a, b)))(*batch))


_NAN = float("nan")
# Extrema whose gradient is shared (_extrema._SharedExtremum): at a NaN, and among ties that
# lie in several tensors, unevenly (two in one tensor, one in another).
EXTREMA_UNDER_TRANSFORMS = {
    "max at a NaN": (torch.max, [[1.0, _NAN, 3.0], [5.0, 2.0]]),
    "min at NaNs": (lambda x: x.min(), [[1.0, _NAN, 3.0], [5.0, _NAN]]),
    "amax at a NaN": (torch.amax, [[1.0, _NAN, 3.0], [5.0, 2.0]]),
    "amax of uneven ties": (torch.amax, [[5.0, 5.0, 1.0], [5.0, 2.0]]),
    "max of uneven ties": (torch.max, [[5.0, 5.0, 1.0], [5.0, 2.0]]),
    "aminmax": (lambda x: torch.aminmax(x).min, [[1.0, 1.0, 3.0], [1.0, 2.0]]),
    "inf-norm at a NaN": (lambda x: x.norm(float("inf")), [[1.0, _NAN, 3.0], [5.0, 2.0]]),
    "-inf-norm of ties": (lambda x: torch.linalg.vector_norm(x, float("-inf")), [[1.0, -1.0, 3.0], [5.0, 1.0]]),
    "inf-dist at a NaN": (lambda x: torch.dist(x, torch.ones(5), float("inf")), [[1.0, _NAN, 3.0], [5.0, 2.0]]),
}


@pytest.mark.parametrize("sizes", ["per-tensor", "real"])
@pytest.mark.parametrize("form", ["jvp", "forward_ad", "forward_ad of leaves", "grad", "vmap", "vmap of grad", "jacfwd"])
@pytest.mark.parametrize("name", sorted(EXTREMA_UNDER_TRANSFORMS))
def test_extrema_under_torch_func_and_forward_ad_are_the_concatenations(request, sizes, form, name):
    # _SharedExtremum had no setup_context, jvp or vmap rule: torch.func.grad and forward AD of
    # leaves that require grad raised, vmap of grad read values; and a jvp averaged each
    # tensor's ties' tangents, then the tensors', not the elements'.
    if sizes == "real":
        request.getfixturevalue("real_sizes")
    f, values = EXTREMA_UNDER_TRANSFORMS[name]
    primals = [torch.tensor(v) for v in values]
    tangents = [torch.arange(1.0, 1.0 + len(v)) for v in values]

    def run(make):
        g = lambda *ts: f(make(ts))  # noqa: E731
        if form == "jvp":
            return torch.func.jvp(g, tuple(primals), tuple(tangents))
        if form.startswith("forward_ad"):
            leaves = [p.clone().requires_grad_(form.endswith("leaves")) for p in primals]
            with fwAD.dual_level():
                out = fwAD.unpack_dual(g(*[fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)]))
                return out.primal, out.tangent
        if form == "grad":
            return torch.func.grad(g, argnums=(0, 1))(*primals)
        batch = [torch.stack([p, p * 2, -p]) for p in primals]
        if form == "vmap":
            return torch.func.vmap(g)(*batch)
        if form == "vmap of grad":
            return torch.func.vmap(torch.func.grad(g, argnums=(0, 1)))(*batch)
        return torch.func.jacfwd(g, argnums=(0, 1))(*primals)

    want = run(lambda ts: torch.cat(ts))
    got = run(lambda ts: mt.bundle(list(ts)))
    torch.testing.assert_close(got, want, equal_nan=True)


HALF_CALLS = {
    "dist": lambda x, r: torch.dist(x, r),
    "difference norm": lambda x, r: (x - r).norm(),
    "norm": lambda x, r: x.norm(),
    "sum of squares": lambda x, r: (x**2).sum(),
    "norm 3": lambda x, r: x.norm(3),
    "norm 1.5": lambda x, r: x.norm(1.5),
    "vector_norm 4": lambda x, r: torch.linalg.vector_norm(x, 4),
    "vector_norm 1": lambda x, r: torch.linalg.vector_norm(x, 1),
    "vector_norm inf": lambda x, r: torch.linalg.vector_norm(x, float("inf")),
    "dist 3": lambda x, r: torch.dist(x, r, 3),
    "dist 1.5": lambda x, r: torch.dist(x, r, 1.5),
    "difference norm 3": lambda x, r: (x - r).norm(3),
}


@pytest.mark.parametrize("name", sorted(HALF_CALLS))
def test_torch_func_grad_of_16_bit_bundles_does_not_overflow(name):
    # Under torch.func the squared differences were summed in float16: past 65504 the sum was
    # inf and torch.dist's gradient 0 everywhere.
    f = HALF_CALLS[name]
    g = torch.Generator().manual_seed(0)
    primals = [torch.randn(40000, generator=g).half(), torch.randn(40000, generator=g).half()]
    ref = [torch.randn(40000, generator=g).half(), torch.randn(40000, generator=g).half()]
    got = torch.func.grad(lambda ts: f(mt.bundle(ts), mt.bundle(ref)).float())(primals)
    want = torch.func.grad(lambda ts: f(_cat(*ts), _cat(*ref)).float())(primals)
    assert want[0].abs().sum() > 0
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=2e-3, atol=1e-5)


# -- second derivatives (gradient penalties) ---------------------------------------------------

PENALIZED = {
    **HALF_CALLS,
    "vector_norm": lambda x, r: torch.linalg.vector_norm(x),
    "cosine": lambda x, r: F.cosine_similarity(x, r + 1, dim=0),
}


@pytest.mark.parametrize("kernels", ["small_kernels", "real"])
@pytest.mark.parametrize("name", sorted(PENALIZED))
def test_second_derivatives_with_a_zero_tensor(request, kernels, name):
    # A norm of the tensors' norms has a NaN second derivative where one tensor's norm is 0 (a
    # zero-initialized bias, a layer equal to the reference); the concatenation's is finite
    # (for every p: the p-norms are roots of the tensors' sums of p-th powers).
    if kernels == "small_kernels":
        request.getfixturevalue("small_kernels")
    f = PENALIZED[name]
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(6, 5, generator=g), torch.zeros(5), torch.randn(4, generator=g)]
    reference = [v * 0.5 for v in values[:1]] + [torch.zeros(5), torch.randn(4, generator=g)]

    def penalty_grads(make):
        leaves = [v.clone().requires_grad_() for v in values]
        value = f(make(leaves), make(reference))
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        sum(gr.pow(2).sum() for gr in grads).backward()
        return value, [leaf.grad for leaf in leaves]

    got, got_grads = penalty_grads(mt.bundle)
    want, want_grads = penalty_grads(lambda ts: torch.cat([t.reshape(-1) for t in ts]))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        # (for 1 < p < 2 torch's own is NaN at the zero elements, from |x| ** (p - 2))
        assert torch.isfinite(a).all() or "1.5" in name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", ["norm", "dist", "difference norm"])
def test_a_nan_element_gives_nan_gradients_as_the_concatenation(name):
    # The root of the sums of squares passed a NaN total's gradient on as 1: finite gradients
    # (those of the sum of squares) where the concatenation's are all NaN.
    f = PENALIZED[name]
    values = [torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([0.5, -1.0])]
    reference = [torch.zeros(3), torch.ones(2)]

    def grads(make):
        leaves = [v.clone().requires_grad_() for v in values]
        f(make(leaves), make(reference)).backward()
        return [leaf.grad for leaf in leaves]

    for a, b in zip(grads(mt.bundle), grads(lambda ts: torch.cat([t.reshape(-1) for t in ts]))):
        torch.testing.assert_close(a, b, equal_nan=True)

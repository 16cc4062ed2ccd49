"""nllloss on other array libraries: results and gradients in the caller's own framework.

The backends under test come from ``NLLLOSS_TEST_BACKENDS`` (default: torch, jax and
array_api_strict, all in the test extra); a requested backend that does not import fails the
run instead of being skipped. Every backend is compared with torch 2.13 (the oracle): the
element-wise results and the 'none'/'sum' gradients bit for bit, the sums to rounding (the
generic path sums with the library's own ``sum``, not torch's cascade).
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, assert_bitwise
from test_differential import make_problem

import nllloss

REQUESTED = os.environ.get("NLLLOSS_TEST_BACKENDS", "torch,jax,array_api_strict,dask").split(",")
MODULES = {"dask": "dask.array"}


def _load(name: str):
    # ImportError fails the run: requested means tested
    module = importlib.import_module(MODULES.get(name, name))
    if name == "jax":
        module.config.update("jax_enable_x64", True)
        importlib.import_module("jax.numpy")
    return module


BACKENDS = {name: _load(name) for name in REQUESTED if name}
FLOAT_DTYPES_BY_NAME = {dtype.name: dtype for dtype in FLOAT_DTYPES}


def to_backend(name: str, array):
    if array is None:
        return None
    if name == "torch":
        return torch.from_numpy(np.array(array, copy=True))
    if name == "jax":
        return BACKENDS["jax"].numpy.asarray(array)
    if name == "dask":  # small chunks along every axis: batch, classes and spatial
        array = np.asarray(array)
        return BACKENDS["dask"].from_array(array, chunks=(3,) * array.ndim)
    return BACKENDS[name].asarray(np.asarray(array))


def to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach()
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return np.asarray(array)


def array_type(name: str) -> type:
    return type(to_backend(name, np.zeros(1)))


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    return request.param


def torch_reference(problem, grad_output):
    x = torch.from_numpy(problem.input.copy()).requires_grad_(True)
    w = None if problem.weight is None else torch.from_numpy(problem.weight)
    t = torch.from_numpy(problem.target.astype(np.int64))
    loss = F.nll_loss(
        x, t, weight=w, ignore_index=problem.ignore_index, reduction=problem.reduction
    )
    loss.backward(torch.as_tensor(np.asarray(grad_output, dtype=problem.input.dtype)))
    return loss.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["unbatched", "2d", "3d", "4d"])
def test_matches_torch(backend, dtype, reduction, kind, rng):
    spatial = {"unbatched": (), "2d": (), "3d": (5,), "4d": (3, 4)}[kind]
    for weight_mode, ignore_mode in [
        ("none", "default"),
        ("random", "in_range"),
        ("zeros", "above"),
    ]:
        problem = make_problem(
            rng,
            kind=kind,
            batch=7,
            classes=6,
            spatial=spatial,
            dtype=np.dtype(dtype),
            weight_mode=weight_mode,
            ignore_mode=ignore_mode,
            ignored_fraction=0.3,
            reduction=reduction,
        )
        shape = problem.target.shape if reduction == "none" and kind != "unbatched" else ()
        grad_output = rng.standard_normal(shape).astype(dtype)
        expected_loss, expected_grad = torch_reference(problem, grad_output)

        x, t, w = (to_backend(backend, a) for a in (problem.input, problem.target, problem.weight))
        kwargs = {"weight": w, "ignore_index": problem.ignore_index, "reduction": reduction}
        loss = nllloss.nll_loss(x, t, **kwargs)
        grad = nllloss.nll_loss_backward(to_backend(backend, grad_output), x, t, **kwargs)
        assert isinstance(loss, array_type(backend))
        assert isinstance(grad, array_type(backend))
        loss, grad = to_numpy(loss), to_numpy(grad)
        if reduction == "none" or kind == "unbatched":
            assert_bitwise(loss, expected_loss)
        else:
            assert loss.dtype == expected_loss.dtype
            np.testing.assert_allclose(
                loss, expected_loss, rtol=1e-5 if dtype == np.float32 else 1e-12
            )
        if reduction == "mean":
            np.testing.assert_allclose(
                grad, expected_grad, rtol=1e-5 if dtype == np.float32 else 1e-12
            )
        else:
            assert_bitwise(grad, expected_grad)


def test_the_input_dtype_is_kept(backend):
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        if backend == "torch":
            x = torch.zeros((4, 3), dtype=getattr(torch, dtype)) - 1
        elif backend == "jax":
            x = BACKENDS["jax"].numpy.zeros((4, 3), dtype=dtype) - 1
        elif backend == "dask":
            x = to_backend("dask", np.zeros((4, 3), dtype=FLOAT_DTYPES_BY_NAME[dtype]) - 1)
        elif hasattr(BACKENDS[backend], dtype):
            x = BACKENDS[backend].zeros((4, 3), dtype=getattr(BACKENDS[backend], dtype)) - 1
        else:
            continue  # the library has no such dtype (array-api-strict: no 16-bit floats)
        t = to_backend(backend, np.array([0, 1, 2, -100]))
        for reduction in ("none", "mean", "sum"):
            assert nllloss.nll_loss(x, t, reduction=reduction).dtype == x.dtype
            assert nllloss.nll_loss_backward(1.0, x, t, reduction=reduction).dtype == x.dtype
        assert float(to_numpy(nllloss.nll_loss(x, t)).astype(np.float64)) == 1.0


def test_out_of_range_targets_raise_the_core_error(backend):
    """Eager libraries raise in the call; Dask when the result is computed."""
    x = to_backend(backend, np.zeros((2, 3), np.float32))
    t = to_backend(backend, np.array([0, 5]))
    with pytest.raises(IndexError, match=r"Target 5 is out of bounds: target\[1\]"):
        to_numpy(nllloss.nll_loss(x, t))
    with pytest.raises(IndexError, match="Target 5"):
        to_numpy(nllloss.nll_loss_backward(1.0, x, t))


def test_numpy_weight_and_lists_join_the_input_library(backend):
    x = to_backend(backend, np.log(np.full((3, 4), 0.25, np.float32)))
    t = to_backend(backend, np.array([0, 1, 3]))
    expected = to_numpy(
        nllloss.nll_loss(x, t, weight=to_backend(backend, np.arange(1, 5, dtype=np.float32)))
    )
    for weight in (np.arange(1, 5, dtype=np.float32), [1.0, 2.0, 3.0, 4.0]):
        assert_bitwise(to_numpy(nllloss.nll_loss(x, t, weight=weight)), expected)
    assert_bitwise(to_numpy(nllloss.nll_loss(x, [0, 1, 3])), to_numpy(nllloss.nll_loss(x, t)))


@pytest.mark.parametrize(
    ("first", "second"), [(a, b) for a in sorted(BACKENDS) for b in sorted(BACKENDS) if a != b]
)
def test_arrays_of_two_libraries_are_refused(first, second):
    x = to_backend(first, np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match=r"target is a .* but input is a"):
        nllloss.nll_loss(x, to_backend(second, np.array([0, 1])))


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch not requested")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torch_autograd_gives_torchs_gradient(reduction, rng):
    x = torch.from_numpy(np.log(rng.dirichlet(np.ones(5), 40)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 5, 40))
    t[::7] = -100
    w = torch.from_numpy(rng.uniform(0.2, 2, 5).astype(np.float32))
    ours = x.clone().requires_grad_()
    theirs = x.clone().requires_grad_()
    nllloss.nll_loss(ours, t, weight=w, reduction=reduction).sum().backward()
    F.nll_loss(theirs, t, weight=w, reduction=reduction).sum().backward()
    assert_bitwise(ours.grad.numpy(), theirs.grad.numpy())


@pytest.mark.skipif("jax" not in BACKENDS, reason="jax not requested")
def test_jax_jit_grad_and_vmap(rng):
    jax = BACKENDS["jax"]
    jnp = jax.numpy
    x = np.log(rng.dirichlet(np.ones(4), (3, 10))).astype(np.float32)  # 3 problems of (10, 4)
    t = rng.integers(0, 4, (3, 10))
    t[:, ::4] = -100

    def loss(a, b):
        return nllloss.nll_loss(a, b, weight=np.array([1.0, 2.0, 0.5, 1.0], np.float32))

    for i in range(3):
        value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(x[i]), jnp.asarray(t[i]))
        np.testing.assert_allclose(
            value, nllloss.nll_loss(x[i], t[i], weight=[1.0, 2.0, 0.5, 1.0]), rtol=1e-6
        )
        expected = nllloss.nll_loss_backward(1.0, x[i], t[i], weight=[1.0, 2.0, 0.5, 1.0])
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)
    batched = jax.vmap(loss)(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(
        batched, [loss(jnp.asarray(x[i]), jnp.asarray(t[i])) for i in range(3)], rtol=1e-6
    )


@pytest.mark.skipif("jax" not in BACKENDS, reason="jax not requested")
def test_jax_bad_targets_under_jit_give_nan_not_a_wrong_number():
    """No exception can be raised inside jax.jit: an out-of-range target makes the loss NaN."""
    jax = BACKENDS["jax"]
    x = jax.numpy.log(jax.numpy.full((3, 4), 0.25))
    for bad in (4, -1, 2**31 - 1):
        t = jax.numpy.asarray([0, bad, 1])
        for reduction in ("mean", "sum"):
            reduced = jax.jit(nllloss.nll_loss, static_argnames="reduction")
            assert np.isnan(reduced(x, t, reduction=reduction))
        none = jax.jit(lambda a, b: nllloss.nll_loss(a, b, reduction="none"))(x, t)
        none = np.asarray(none)
        assert np.isnan(none[1])
        assert np.isfinite(none[[0, 2]]).all()
        grad = jax.jit(jax.grad(lambda a, b: nllloss.nll_loss(a, b, reduction="sum")))(x, t)
        assert np.isnan(grad[1]).any()


@pytest.mark.skipif("array_api_strict" not in BACKENDS, reason="array_api_strict not requested")
def test_strictest_array_api(rng):
    """No boolean indexing and no data-dependent shapes: the generic path needs neither."""
    xs = BACKENDS["array_api_strict"]
    problem = make_problem(
        rng,
        kind="4d",
        batch=3,
        classes=5,
        spatial=(2, 3),
        dtype=np.dtype(np.float64),
        weight_mode="random",
        ignore_mode="default",
        ignored_fraction=0.3,
        reduction="mean",
    )
    expected = nllloss.nll_loss(problem.input, problem.target, weight=problem.weight)
    with xs.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        x, t, w = (xs.asarray(a) for a in (problem.input, problem.target, problem.weight))
        loss = nllloss.nll_loss(x, t, weight=w)
        grad = nllloss.nll_loss_backward(1.0, x, t, weight=w)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-12)
    assert grad.shape == problem.input.shape


class TestTorchModule:
    """nllloss.torch.NLLLoss: a drop-in torch.nn.Module."""

    def test_reachable_as_an_attribute_and_is_a_torch_nllloss(self):
        module = nllloss.torch.NLLLoss()
        assert isinstance(module, torch.nn.NLLLoss)
        assert isinstance(module, torch.nn.Module)

    @pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
    def test_forward_equals_the_function_and_torch(self, reduction, rng):
        x = torch.from_numpy(np.log(rng.dirichlet(np.ones(4), (6, 3))).astype(np.float32))
        x = x.permute(0, 2, 1).contiguous()  # (N, C, d)
        t = torch.from_numpy(rng.integers(0, 4, (6, 3)))
        t[0, 0] = 2
        w = torch.tensor([0.5, 1.0, 2.0, 1.5])
        ours = nllloss.torch.NLLLoss(weight=w, ignore_index=2, reduction=reduction)
        theirs = torch.nn.NLLLoss(weight=w, ignore_index=2, reduction=reduction)
        assert_bitwise(
            ours(x, t).numpy(),
            nllloss.nll_loss(x, t, weight=w, ignore_index=2, reduction=reduction).numpy(),
        )
        np.testing.assert_allclose(ours(x, t).numpy(), theirs(x, t).numpy(), rtol=1e-6)

    def test_state_dict_moves_both_ways(self):
        w = torch.tensor([0.2, 1.5, 0.7])
        ours = nllloss.torch.NLLLoss(weight=w)
        theirs = torch.nn.NLLLoss(weight=torch.ones(3))
        theirs.load_state_dict(ours.state_dict())
        assert torch.equal(theirs.weight, w)
        fresh = nllloss.torch.NLLLoss(weight=torch.zeros(3))
        fresh.load_state_dict(torch.nn.NLLLoss(weight=w).state_dict())
        assert torch.equal(fresh.weight, w)
        assert list(nllloss.torch.NLLLoss().state_dict()) == []  # no weight, no buffer

    def test_weight_follows_the_module_to_a_dtype(self):
        module = nllloss.torch.NLLLoss(weight=torch.tensor([1.0, 2.0])).double()
        x = torch.tensor([[-0.5, -1.0]], dtype=torch.float64)
        assert module(x, torch.tensor([1])).dtype == torch.float64

    def test_legacy_arguments_warn_at_construction_as_torch(self):
        with pytest.warns(UserWarning, match="reduction='sum'"):
            module = nllloss.torch.NLLLoss(size_average=False)
        assert module.reduction == "sum"


@pytest.mark.skipif("dask" not in BACKENDS, reason="dask not requested")
def test_dask_stays_lazy(rng):
    """Nothing is computed inside nll_loss or nll_loss_backward: a scheduler that refuses to run."""
    import dask

    def refuse(*args, **kwargs):
        raise AssertionError("nllloss computed a Dask graph")

    x_np = np.log(rng.dirichlet(np.ones(5), (12, 4))).astype(np.float32).transpose(0, 2, 1).copy()
    t_np = rng.integers(0, 5, (12, 4))
    t_np[3, 1] = -100
    x, t = to_backend("dask", x_np), to_backend("dask", t_np)
    with dask.config.set(scheduler=refuse):
        losses = {
            r: nllloss.nll_loss(x, t, weight=[1, 2, 3, 4, 5], reduction=r) for r in ("none", "mean")
        }
        grad = nllloss.nll_loss_backward(1.0, x, t, weight=[1, 2, 3, 4, 5])
    for reduction, loss in losses.items():
        expected = nllloss.nll_loss(x_np, t_np, weight=[1, 2, 3, 4, 5], reduction=reduction)
        np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(grad),
        nllloss.nll_loss_backward(1.0, x_np, t_np, weight=[1, 2, 3, 4, 5]),
        rtol=1e-6,
    )


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch not requested")
class TestTorchIntegration:
    """torch tensors go through registered operators: exact, compilable, differentiable."""

    @staticmethod
    def problem(rng, rows=600, classes=7):
        x = torch.from_numpy(np.log(rng.dirichlet(np.ones(classes), rows)).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, classes, rows))
        t[::9] = -100
        return x, t, torch.from_numpy(rng.uniform(0.1, 2, classes).astype(np.float32))

    @pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
    def test_operator_path_is_bitwise_torch(self, reduction, rng, monkeypatch):
        from nllloss._torch import engines

        monkeypatch.setattr(engines, "TORCH_KERNEL_MAX", 0)  # force the custom operator
        x, t, w = self.problem(rng)
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = nllloss.nll_loss(ours, t, weight=w, reduction=reduction)
        expected = F.nll_loss(theirs, t, weight=w, reduction=reduction)
        assert_bitwise(loss.detach().numpy(), expected.detach().numpy())
        go = torch.rand(loss.shape)
        loss.backward(go)
        expected.backward(go)
        assert_bitwise(ours.grad.numpy(), theirs.grad.numpy())

    @pytest.mark.parametrize("path", ["operator", "torch kernel"])
    def test_compiles_without_graph_breaks(self, path, rng, monkeypatch):
        import torch._dynamo as dynamo

        from nllloss._torch import engines

        x, t, w = self.problem(rng)
        expected = F.nll_loss(x, t, weight=w).numpy()
        if path == "operator":  # a training call (needing a gradient) on a "large" input
            monkeypatch.setattr(engines, "TORCH_KERNEL_MAX", 0)
            x.requires_grad_()
        dynamo.reset()
        explanation = dynamo.explain(lambda a: nllloss.nll_loss(a, t, weight=w))(x)
        assert explanation.graph_break_count == 0
        compiled = torch.compile(lambda a: nllloss.nll_loss(a, t, weight=w), fullgraph=True)
        if path == "operator":  # opaque to the compiler: the eager bits
            assert_bitwise(compiled(x).detach().numpy(), expected)
        else:  # inductor decomposes torch's kernel and sums in another order (as for torch)
            np.testing.assert_allclose(compiled(x).numpy(), expected, rtol=1e-6)

    @pytest.mark.parametrize("reduction", ["none", "sum"])
    def test_double_backward_matches_torch(self, reduction, rng, monkeypatch):
        from nllloss._torch import engines

        monkeypatch.setattr(engines, "TORCH_KERNEL_MAX", 0)
        x, t, w = self.problem(rng, rows=40)
        results = []
        for loss_fn in (nllloss.nll_loss, F.nll_loss):
            a = x.clone().requires_grad_()
            out = loss_fn(a, t, weight=w, reduction=reduction)
            go = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape).requires_grad_()
            (grad,) = torch.autograd.grad(out, a, go, create_graph=True)
            (grad_of_go,) = torch.autograd.grad(
                (grad * torch.arange(grad.numel()).reshape(grad.shape)).sum(), go
            )
            results.append(grad_of_go.numpy())
        assert_bitwise(*results)

    def test_func_grad(self, rng):
        x, t, w = self.problem(rng)
        ours = torch.func.grad(lambda a: nllloss.nll_loss(a, t, weight=w))(x)
        theirs = torch.func.grad(lambda a: F.nll_loss(a, t, weight=w))(x)
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6)


def cross_entropy_reference(x, t, w, reduction, smoothing, total, grad_output):
    """torch's float64 cross_entropy and its autograd gradient; with ``total``, the 'sum'
    divided by it (the definition of total_weight)."""
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    wt = None if w is None else torch.from_numpy(w.astype(np.float64))
    loss = F.cross_entropy(
        xt, torch.from_numpy(t), weight=wt, reduction="sum" if total else reduction,
        label_smoothing=smoothing,
    )  # fmt: skip
    if total:
        loss = loss / total
    loss.backward(torch.as_tensor(np.asarray(grad_output, dtype=np.float64)))
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "mean with total_weight"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_logits_with_smoothing_matches_torch(backend, reduction, dtype, rng):
    x = (rng.standard_normal((7, 6, 5)) * 4).astype(dtype)
    t = rng.integers(0, 6, (7, 5))
    t[rng.random(t.shape) < 0.3] = -100
    w = rng.uniform(0.2, 2, 6).astype(dtype)
    total = 9.5 if reduction == "mean with total_weight" else None
    reduction = reduction.split()[0]
    grad_output = rng.uniform(0.5, 1.5, t.shape if reduction == "none" else ()).astype(dtype)
    expected_loss, expected_grad = cross_entropy_reference(
        x, t, w, reduction, 0.15, total, grad_output
    )
    xb, tb, wb = (to_backend(backend, a) for a in (x, t, w))
    kwargs = {"weight": wb, "reduction": reduction, "from_logits": True, "label_smoothing": 0.15}
    if total is not None:
        kwargs["total_weight"] = total
    loss = nllloss.nll_loss(xb, tb, **kwargs)
    grad = nllloss.nll_loss_backward(to_backend(backend, grad_output), xb, tb, **kwargs)
    assert isinstance(loss, array_type(backend))
    assert isinstance(grad, array_type(backend))
    rtol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(to_numpy(loss), expected_loss, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(to_numpy(grad), expected_grad, rtol=rtol, atol=rtol)


@pytest.mark.skipif("jax" not in BACKENDS, reason="jax not requested")
def test_jax_grad_from_logits(rng):
    jax = BACKENDS["jax"]
    x = (rng.standard_normal((20, 9)) * 3).astype(np.float32)
    t = rng.integers(0, 9, 20)
    t[::3] = -100

    def loss(a, b):
        return nllloss.nll_loss(a, b, from_logits=True, label_smoothing=0.1, total_weight=11.0)

    value, grad = jax.jit(jax.value_and_grad(loss))(jax.numpy.asarray(x), jax.numpy.asarray(t))
    expected_loss, expected_grad = cross_entropy_reference(x, t, None, "sum", 0.1, 11.0, 1.0)
    np.testing.assert_allclose(value, expected_loss, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=2e-6, atol=1e-7)


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch not requested")
class TestTorchOptions:
    """from_logits, label_smoothing and total_weight through torch's autograd and compiler."""

    @staticmethod
    def problem(rng, dtype=torch.float32):
        x = torch.from_numpy(rng.standard_normal((30, 7)) * 3).to(dtype)
        t = torch.from_numpy(rng.integers(0, 7, 30))
        t[::4] = -100
        return x, t, torch.from_numpy(rng.uniform(0.2, 2, 7)).to(dtype)

    @pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
    def test_backward_matches_cross_entropy(self, reduction, rng):
        x, t, w = self.problem(rng)
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        options = {"weight": w, "reduction": reduction, "label_smoothing": 0.2}
        loss = nllloss.nll_loss(ours, t, from_logits=True, **options)
        expected = F.cross_entropy(theirs, t, **options)
        np.testing.assert_allclose(loss.detach(), expected.detach(), rtol=2e-6, atol=1e-6)
        go = torch.from_numpy(rng.uniform(0.5, 1.5, loss.shape).astype(np.float32))
        loss.backward(go)
        expected.backward(go)
        np.testing.assert_allclose(ours.grad, theirs.grad, rtol=2e-6, atol=1e-6)

    @pytest.mark.parametrize(
        "options",
        [
            {"from_logits": True, "reduction": "sum"},
            {"from_logits": True, "label_smoothing": 0.3, "total_weight": 7.0},
            {"label_smoothing": 0.3, "reduction": "none"},
        ],
    )
    def test_second_derivatives(self, options, rng):
        x, t, w = self.problem(rng, torch.float64)
        loss = lambda a: nllloss.nll_loss(a, t, w, **options)  # noqa: E731
        x.requires_grad_()
        assert torch.autograd.gradcheck(loss, (x,))
        assert torch.autograd.gradgradcheck(loss, (x,))

    def test_compile_and_func_grad(self, rng):
        import torch._dynamo as dynamo

        x, t, w = self.problem(rng)

        def loss(a):
            return nllloss.nll_loss(a, t, weight=w, from_logits=True, label_smoothing=0.1)

        dynamo.reset()
        assert dynamo.explain(loss)(x).graph_break_count == 0
        np.testing.assert_allclose(torch.compile(loss, fullgraph=True)(x), loss(x), rtol=1e-6)
        expected = torch.func.grad(lambda a: F.cross_entropy(a, t, weight=w, label_smoothing=0.1))(
            x
        )
        np.testing.assert_allclose(torch.func.grad(loss)(x), expected, rtol=2e-6, atol=1e-7)

    def test_cross_entropy_module_is_a_drop_in(self, rng):
        import nllloss.torch

        x, t, w = self.problem(rng)
        ours = nllloss.torch.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
        theirs = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
        assert isinstance(ours, torch.nn.CrossEntropyLoss)
        np.testing.assert_allclose(ours(x, t), theirs(x, t), rtol=2e-6)
        ours.load_state_dict(theirs.state_dict())
        total = nllloss.total_weight(t, w)
        np.testing.assert_allclose(
            nllloss.torch.NLLLoss(w)(torch.log_softmax(x, 1), t, total_weight=total),
            F.nll_loss(torch.log_softmax(x, 1), t, w),
            rtol=1e-6,
        )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_extreme_logits(backend, smoothing):
    """Logits of +-1e4 do not overflow; -inf is allowed where the target is not."""
    x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, -np.inf, 1.0]], dtype=np.float32)
    t = np.array([0, 2, 2])
    expected_loss, expected_grad = cross_entropy_reference(x, t, None, "sum", smoothing, None, 1.0)
    xb, tb = to_backend(backend, x), to_backend(backend, t)
    options = {"reduction": "sum", "from_logits": True, "label_smoothing": smoothing}
    loss = to_numpy(nllloss.nll_loss(xb, tb, **options))
    grad = to_numpy(
        nllloss.nll_loss_backward(to_backend(backend, np.float32(1)), xb, tb, **options)
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)
    assert np.isfinite(grad).all()

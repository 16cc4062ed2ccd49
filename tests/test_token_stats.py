"""token_stats / linear_token_stats: per-token log-probabilities, entropy, log-sum-exp and
argmax against float64 torch compositions, on every library, with gradients.

The oracle is written apart from the code under test: torch 2.13's ``log_softmax``,
``gather``, ``softmax``, ``logsumexp`` and ``argmax`` in float64 on the input's values,
with ``0 log 0 = 0`` in the entropy (``p * where(p == 0, 0, log p)``).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import BFLOAT16, to_torch

import nllloss
from nllloss import TokenStats, linear_token_stats, token_stats

jax = importlib.import_module("jax")
jax.config.update("jax_enable_x64", True)
jnp = importlib.import_module("jax.numpy")
da = importlib.import_module("dask.array")
xps = importlib.import_module("array_api_strict")

LIBRARIES = ["numpy", "torch", "jax", "dask", "array_api_strict"]
IGNORE = -100


def to_library(name: str, array):
    array = np.asarray(array)
    if name == "numpy":
        return array
    if name == "torch":
        return to_torch(array)
    if name == "jax":
        return jnp.asarray(array)
    if name == "dask":
        return da.from_array(array, chunks=(2,) * array.ndim)
    return xps.asarray(array)


def to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach()
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return np.asarray(array)


def oracle(x, t, temperature=1.0, softcap=None, ignore_index=IGNORE, create_graph=False):
    """The statistics of float64 ``x`` (a tensor, classes on axis 1; (C,) unbatched) by
    torch's own operations."""
    unbatched = x.dim() == 1
    x2 = x.unsqueeze(0) if unbatched else x
    t2 = t.reshape(1) if unbatched else t
    z = x2 if softcap is None else softcap * torch.tanh(x2 / softcap)
    z = z / temperature
    log_p = torch.log_softmax(z, dim=1)
    p = torch.softmax(z, dim=1)
    valid = t2 != ignore_index
    picked = log_p.gather(1, torch.where(valid, t2, 0).unsqueeze(1)).squeeze(1)
    logprob = torch.where(valid, picked, torch.zeros((), dtype=z.dtype))
    entropy = -(p * torch.where(p == 0, torch.zeros((), dtype=z.dtype), log_p)).sum(1)
    result = (logprob, entropy, torch.logsumexp(z, dim=1), z.argmax(dim=1))
    return tuple(r.squeeze(0) for r in result) if unbatched else result


def make_case(rng, shape, extreme=True):
    """Logits of ``shape`` (classes on axis 1) and targets, some ignored; with ``extreme``,
    +-1e4 and -inf at classes nobody targets."""
    x = rng.standard_normal(shape) * 3
    classes = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = rng.integers(0, classes, size=target_shape)
    if len(shape) > 1:
        t.reshape(-1)[::3] = IGNORE
    if extreme and classes >= 4:
        x2 = np.moveaxis(x.reshape((1, *shape) if len(shape) == 1 else shape), 1, -1)
        t2 = np.asarray(t).reshape(x2.shape[:-1])
        # a class that no element targets gets the extremes
        free = [c for c in range(classes) if not np.any(t2 == c)]
        if free:
            c = free[0]
            x2[..., c] = np.where(
                np.arange(x2[..., c].size).reshape(x2[..., c].shape) % 3 == 0,
                1e4,
                np.where(
                    np.arange(x2[..., c].size).reshape(x2[..., c].shape) % 3 == 1, -1e4, -np.inf
                ),
            )
    return x, np.asarray(t)


SHAPES = [(6, 9), (3, 5, 4), (7,), (2, 6, 2, 3)]
OPTIONS = [(1.0, None), (0.6, None), (1.7, 4.0), (1.0, 2.5)]


def _tolerance(dtype):
    if dtype == np.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    if dtype == np.float32:
        return {"rtol": 2e-5, "atol": 2e-5}
    return {"rtol": 2e-2, "atol": 2e-2}


def _check(result, expected, dtype, library):
    assert isinstance(result, TokenStats)
    names = ("logprob", "entropy", "lse", "argmax")
    for name, actual, wanted in zip(names, result, expected, strict=True):
        actual_np = to_numpy(actual)
        wanted = wanted.detach().numpy()
        assert actual_np.shape == wanted.shape, (name, actual_np.shape, wanted.shape)
        if name == "argmax":
            assert np.issubdtype(actual_np.dtype, np.integer)
            np.testing.assert_array_equal(actual_np, wanted, err_msg=name)
            continue
        if library not in ("torch",):
            assert actual_np.dtype == dtype, (name, actual_np.dtype, dtype)
        np.testing.assert_allclose(
            actual_np.astype(np.float64), wanted, err_msg=name, **_tolerance(dtype)
        )


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("temperature", "softcap"), OPTIONS)
def test_values_equal_torch_composition(library, shape, temperature, softcap, rng):
    x, t = make_case(rng, shape)
    for dtype in (np.float64, np.float32):
        xd = x.astype(dtype)
        result = token_stats(
            to_library(library, xd),
            to_library(library, t),
            temperature=temperature,
            softcap=softcap,
        )
        expected = oracle(
            torch.from_numpy(xd.astype(np.float64)), torch.from_numpy(t), temperature, softcap
        )
        _check(result, expected, np.dtype(dtype), library)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BFLOAT16])
@pytest.mark.parametrize("shape", [(6, 9), (3, 5, 4)])
def test_sixteen_bit_computes_in_float32(library, dtype, shape, rng):
    x, t = make_case(rng, shape, extreme=False)
    xd = x.astype(dtype)
    result = token_stats(to_library(library, xd), to_library(library, t), temperature=0.8)
    expected = oracle(torch.from_numpy(xd.astype(np.float64)), torch.from_numpy(t), 0.8)
    if library == "torch":
        assert result.logprob.dtype == to_torch(xd).dtype
    _check(result, expected, dtype, library)


def test_argmax_first_index_on_ties():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1e4, 2e4, 1.0]], np.float32)
    t = np.array([0, 1, 2])
    assert token_stats(x, t).argmax.tolist() == [1, 0, 2]
    # the cap makes 1e4 and 2e4 equal (5 tanh(2000) = 5 tanh(4000) = 5): the first wins
    assert token_stats(x, t, softcap=5.0).argmax.tolist() == [1, 0, 1]
    # ties across the kernel's blocks of 1024 values
    wide = np.zeros((2, 3000), np.float32)
    wide[0, [1500, 2999]] = 7.0
    wide[1, [5, 1030]] = 7.0
    assert token_stats(wide, np.array([0, 0])).argmax.tolist() == [1500, 5]
    for library in ("torch", "jax"):
        got = token_stats(to_library(library, x), to_library(library, t), softcap=5.0).argmax
        assert to_numpy(got).tolist() == [1, 0, 1]


def test_long_rows_across_blocks(rng):
    """Rows of many blocks: the running maximum rises in later blocks (online rescaling)."""
    x = rng.standard_normal((5, 5000)) * 4
    x[0] = np.linspace(-30, 30, 5000)  # rises in every block
    x[1, 4000] = 50.0
    t = np.array([3, 4000, IGNORE, 0, 4999])
    for dtype in (np.float64, np.float32):
        result = token_stats(x.astype(dtype), t, temperature=0.9, softcap=40.0)
        expected = oracle(
            torch.from_numpy(x.astype(dtype).astype(np.float64)), torch.from_numpy(t), 0.9, 40.0
        )
        _check(result, expected, np.dtype(dtype), "numpy")


def test_nan_row_gives_nan_and_its_argmax():
    x = np.array([[0.0, np.nan, 1.0, np.nan], [0.0, 1.0, 2.0, 3.0]])
    s = token_stats(x, np.array([0, 1]))
    assert np.isnan([s.lse[0], s.entropy[0], s.logprob[0]]).all()
    assert s.argmax.tolist() == [1, 3] == torch.from_numpy(x).argmax(1).tolist()


# --- gradients ------------------------------------------------------------------------------


def _upstream(rng, shape):
    return [rng.standard_normal(shape) for _ in range(3)]


def _oracle_gradient(x, t, upstream, temperature, softcap):
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    logprob, entropy, lse, _ = oracle(xt, torch.from_numpy(t), temperature, softcap)
    a, b, g = (torch.from_numpy(u) for u in upstream)
    (logprob * a + entropy * b + lse * g).sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("temperature", "softcap"), OPTIONS)
def test_gradients_equal_autograd(shape, temperature, softcap, rng):
    x, t = make_case(rng, shape)
    upstream = _upstream(rng, t.shape)
    expected = _oracle_gradient(x, t, upstream, temperature, softcap)
    options = {"temperature": temperature, "softcap": softcap}
    # NumPy: the gradient function
    _, grad = nllloss.token_stats_and_grad(x, t, grad_logprob=upstream[0],
                                           grad_entropy=upstream[1], grad_lse=upstream[2],
                                           **options)  # fmt: skip
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
    # torch autograd
    xt = torch.from_numpy(x.copy()).requires_grad_()
    s = token_stats(xt, torch.from_numpy(t), **options)
    a, b, g = (torch.from_numpy(u) for u in upstream)
    (s.logprob * a + s.entropy * b + s.lse * g).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-10, atol=1e-12)

    # jax.grad under jit
    def objective(xj):
        s = token_stats(xj, jnp.asarray(t), **options)
        return jnp.sum(s.logprob * upstream[0] + s.entropy * upstream[1] + s.lse * upstream[2])

    grad = jax.jit(jax.grad(objective))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 3), (6,)])
def test_gradcheck_and_double_backward(shape, rng):
    x, t = make_case(rng, shape, extreme=False)
    xt = torch.from_numpy(x).requires_grad_()
    tt = torch.from_numpy(t)

    def stats(x):
        s = token_stats(x, tt, temperature=0.7, softcap=3.0)
        return s.logprob, s.entropy, s.lse

    assert torch.autograd.gradcheck(stats, (xt,))
    assert torch.autograd.gradgradcheck(stats, (xt,))


def test_float32_torch_gradient_and_saved_tensors(rng):
    x, t = make_case(rng, (8, 40))
    xt = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    s = token_stats(xt, torch.from_numpy(t), temperature=1.3)
    (s.logprob.sum() + s.entropy.sum()).backward()
    upstream = [np.ones(8), np.ones(8), np.zeros(8)]
    expected = _oracle_gradient(x.astype(np.float32), t, upstream, 1.3, None)
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-5, atol=1e-6)
    # a saved input changed in place is refused by autograd (save_for_backward)
    xt2 = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    y = xt2 * 1
    s = token_stats(y, torch.from_numpy(t))
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.logprob.sum().backward()


def test_torch_compile_fullgraph(rng):
    x, t = make_case(rng, (6, 9))
    tt = torch.from_numpy(t)

    def step(x):
        s = token_stats(x, tt, temperature=0.5, softcap=5.0)
        return (s.logprob + 0.1 * s.entropy).sum(), s.argmax

    compiled = torch.compile(step, fullgraph=True)
    eager_x = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    compiled_x = eager_x.detach().clone().requires_grad_()
    value, argmax = step(eager_x)
    value.backward()
    compiled_value, compiled_argmax = compiled(compiled_x)
    compiled_value.backward()
    torch.testing.assert_close(compiled_value, value)
    torch.testing.assert_close(compiled_argmax, argmax)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


def test_kernels_agree_with_the_generic_path_and_threads(rng):
    from nllloss import _token_stats as _stats
    from nllloss._kernels import cpu as _cpu

    x, t = make_case(rng, (300, 700))
    x = x.astype(np.float32)
    build = _stats._build(x, t, 0.9, 3.0, IGNORE)[1]
    upstream = _stats.Upstream(*_upstream(rng, t.shape))
    kernel_stats, kernel_grad = _stats.NumbaEngine.forward_backward(build, upstream)
    generic = _stats.generic_engine(_cpu.generic_numpy().xp)
    generic_stats, generic_grad = generic.forward_backward(build, upstream)
    for a, b in zip(kernel_stats, generic_stats, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(kernel_grad, generic_grad, rtol=1e-4, atol=1e-6)
    # the same bits whatever the thread count
    nllloss.set_num_threads(1)
    try:
        one_thread = _stats.NumbaEngine.forward_backward(build, upstream)
    finally:
        import numba

        nllloss.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(one_thread[0], kernel_stats, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one_thread[1], kernel_grad)


def test_inputs_not_mutated(rng):
    x, t = make_case(rng, (5, 8))
    before_x, before_t = x.copy(), t.copy()
    nllloss.token_stats_and_grad(x, t, grad_logprob=1.0, grad_entropy=1.0)
    h, w = rng.standard_normal((5, 3)), rng.standard_normal((8, 3))
    before_h, before_w = h.copy(), w.copy()
    nllloss.linear_token_stats_and_grad(h, w, t, grad_logprob=1.0, chunk_rows=2)
    for a, b in ((x, before_x), (t, before_t), (h, before_h), (w, before_w)):
        np.testing.assert_array_equal(a, b)


# --- from hidden states ---------------------------------------------------------------------


def _linear_case(rng, rows, features, classes):
    h = rng.standard_normal((rows, features))
    w = rng.standard_normal((classes, features))
    b = rng.standard_normal(classes)
    t = rng.integers(0, classes, size=rows)
    t[::4] = IGNORE
    return h, w, b, t


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_values(library, chunk_rows, rng):
    h, w, b, t = _linear_case(rng, 10, 4, 7)
    for dtype in (np.float64, np.float32):
        args = [to_library(library, a.astype(dtype)) for a in (h, w, b)]
        result = linear_token_stats(
            args[0],
            args[1],
            to_library(library, t),
            linear_bias=args[2],
            temperature=0.7,
            softcap=3.0,
            chunk_rows=chunk_rows,
        )
        logits = h.astype(dtype).astype(np.float64) @ w.astype(dtype).astype(np.float64).T
        logits = logits + b.astype(dtype)
        expected = oracle(torch.from_numpy(logits), torch.from_numpy(t), 0.7, 3.0)
        _check(result, expected, np.dtype(dtype), library)


def test_linear_unbatched_and_sixteen_bit(rng):
    h, w, b, _ = _linear_case(rng, 1, 4, 6)
    for target in (2, IGNORE):
        result = linear_token_stats(h[0], w, np.asarray(target), linear_bias=b)
        expected = oracle(torch.from_numpy(h[0] @ w.T + b), torch.tensor(target))
        _check(result, expected, np.dtype(np.float64), "numpy")
    h, w, _, t = _linear_case(rng, 9, 4, 6)
    for library in ("numpy", "torch"):
        args = [to_library(library, a.astype(BFLOAT16)) for a in (h, w)]
        result = linear_token_stats(*args, to_library(library, t), chunk_rows=4)
        hb = h.astype(BFLOAT16).astype(np.float64)
        wb = w.astype(BFLOAT16).astype(np.float64)
        expected = oracle(torch.from_numpy(hb @ wb.T), torch.from_numpy(t))
        _check(result, expected, BFLOAT16, library)


def _linear_oracle_gradients(h, w, b, t, upstream, temperature, softcap):
    ht, wt, bt = (torch.from_numpy(a).requires_grad_() for a in (h, w, b))
    logprob, entropy, lse, _ = oracle(ht @ wt.T + bt, torch.from_numpy(t), temperature, softcap)
    a, bb, g = (torch.from_numpy(u) for u in upstream)
    (logprob * a + entropy * bb + lse * g).sum().backward()
    return ht.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_linear_gradients(chunk_rows, rng):
    h, w, b, t = _linear_case(rng, 10, 4, 7)
    upstream = _upstream(rng, t.shape)
    expected = _linear_oracle_gradients(h, w, b, t, upstream, 0.8, 2.5)
    options = {"temperature": 0.8, "softcap": 2.5, "chunk_rows": chunk_rows}
    _, *grads = nllloss.linear_token_stats_and_grad(
        h, w, t, linear_bias=b, grad_logprob=upstream[0], grad_entropy=upstream[1],
        grad_lse=upstream[2], **options,
    )  # fmt: skip
    for grad, wanted in zip(grads, expected, strict=True):
        np.testing.assert_allclose(grad, wanted, rtol=1e-10, atol=1e-12)
    tensors = [torch.from_numpy(a.copy()).requires_grad_() for a in (h, w, b)]
    s = linear_token_stats(
        tensors[0], tensors[1], torch.from_numpy(t), linear_bias=tensors[2], **options
    )
    a, bb, g = (torch.from_numpy(u) for u in upstream)
    (s.logprob * a + s.entropy * bb + s.lse * g).sum().backward()
    for tensor, wanted in zip(tensors, expected, strict=True):
        np.testing.assert_allclose(tensor.grad.numpy(), wanted, rtol=1e-10, atol=1e-12)

    def objective(hj, wj, bj):
        s = linear_token_stats(hj, wj, jnp.asarray(t), linear_bias=bj, **options)
        return jnp.sum(s.logprob * upstream[0] + s.entropy * upstream[1] + s.lse * upstream[2])

    grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(*map(jnp.asarray, (h, w, b)))
    for grad, wanted in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(grad), wanted, rtol=1e-10, atol=1e-12)


def test_linear_gradcheck_and_double_backward(rng):
    h, w, b, t = _linear_case(rng, 5, 3, 6)
    tensors = tuple(torch.from_numpy(a).requires_grad_() for a in (h, w, b))
    tt = torch.from_numpy(t)

    def stats(h, w, b):
        s = linear_token_stats(h, w, tt, linear_bias=b, temperature=1.2, chunk_rows=2)
        return s.logprob, s.entropy, s.lse

    assert torch.autograd.gradcheck(stats, tensors)
    assert torch.autograd.gradgradcheck(stats, tensors)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["numpy", "torch", "jax", "dask"])
def test_target_out_of_range(library):
    x = to_library(library, np.zeros((3, 4)))
    with pytest.raises(IndexError, match=r"target\[1\] = 4 is not in the class range \[0, 4\)"):
        np.asarray(token_stats(x, to_library(library, np.array([0, 4, IGNORE]))).logprob)
    hidden, weight = (to_library(library, np.zeros(shape)) for shape in ((3, 2), (4, 2)))
    with pytest.raises(IndexError, match=r"target\[2\] = -1"):
        np.asarray(linear_token_stats(hidden, weight, to_library(library, [0, 1, -1])).logprob)


def test_hidden_targets_give_nan_under_jit():
    x = jnp.zeros((2, 3))
    logprob = jax.jit(lambda t: token_stats(x, t).logprob)(jnp.asarray([1, 3]))
    assert np.isnan(np.asarray(logprob)[1])
    assert not np.isnan(np.asarray(logprob)[0])


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite real number > 0"):
        token_stats(np.zeros((2, 3)), np.array([0, 1]), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_stats(
            np.zeros((2, 3)), np.zeros((4, 3)), np.array([0, 1]), temperature=temperature
        )
    with pytest.raises(TypeError, match="temperature"):
        token_stats(np.zeros((2, 3)), np.array([0, 1]), temperature="hot")


@pytest.mark.parametrize("softcap", [0.0, -2.0, float("inf")])
def test_bad_softcap(softcap):
    with pytest.raises(ValueError, match="softcap must be None or a finite real number > 0"):
        token_stats(np.zeros((2, 3)), np.array([0, 1]), softcap=softcap)


def test_bad_targets_and_classes():
    with pytest.raises(TypeError, match="class indices of an integer dtype"):
        token_stats(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="at least one class"):
        token_stats(np.zeros((2, 0)), np.array([IGNORE, IGNORE]))
    with pytest.raises(ValueError, match="grad_logprob"):
        nllloss.token_stats_and_grad(np.zeros((2, 3)), np.array([0, 1]), grad_logprob=np.ones(3))


# --- Triton (under its interpreter without a GPU) ---------------------------------------------


@pytest.fixture
def triton_stats(monkeypatch):
    """The Triton engine, with tiles of 16 classes so that rows span several tiles."""
    monkeypatch.setenv("NLLLOSS_TRITON_INTERPRET", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from nllloss._kernels.triton import _stats as triton_stats

    monkeypatch.setattr(triton_stats, "BLOCK_C", 16)
    return triton_stats


@pytest.mark.parametrize(("temperature", "softcap"), OPTIONS)
@pytest.mark.parametrize("shape", [(6, 37), (37,)])
def test_triton_values_and_gradient(triton_stats, shape, temperature, softcap, rng):
    from nllloss import _token_stats as _stats
    from nllloss._token_stats import torch as _stats_torch

    x, t = make_case(rng, shape)
    x = x.astype(np.float32)
    x.reshape(-1, shape[-1])[0, 20:23] = 9.0  # a tie across two tiles
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    stats = _stats._build(xt, tt, temperature, softcap, IGNORE)[1]
    assert _stats_torch._triton_engine(stats) is triton_stats.ENGINE
    result, saved = triton_stats.ENGINE.forward(stats)
    expected = oracle(torch.from_numpy(x.astype(np.float64)), tt, temperature, softcap)
    _check(result, expected, np.dtype(np.float32), "torch")
    upstream = _upstream(rng, t.shape)
    grad = triton_stats.ENGINE.backward(stats, saved, _stats.Upstream(
        *(torch.from_numpy(u) for u in upstream)))  # fmt: skip
    wanted = _oracle_gradient(x, t, upstream, temperature, softcap)
    np.testing.assert_allclose(grad.numpy(), wanted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_sixteen_bit_and_bad_target(triton_stats, dtype, rng):
    from nllloss import _token_stats as _stats

    x, t = make_case(rng, (5, 20), extreme=False)
    xt = torch.from_numpy(x).to(dtype)
    stats = _stats._build(xt, torch.from_numpy(t), 0.8, None, IGNORE)[1]
    assert triton_stats.ENGINE.supports(stats)
    result, _ = triton_stats.ENGINE.forward(stats)
    assert result.logprob.dtype == dtype
    expected = oracle(xt.double(), torch.from_numpy(t), 0.8)
    _check(result, expected, BFLOAT16 if dtype == torch.bfloat16 else np.dtype(np.float16), "torch")
    t[1] = 20
    stats = _stats._build(xt, torch.from_numpy(t), 1.0, None, IGNORE)[1]
    with pytest.raises(IndexError, match=r"target\[1\] = 20"):
        triton_stats.ENGINE.forward(stats)
    # float64 and K-dim inputs are not the kernels': the generic path keeps their precision
    assert not triton_stats.ENGINE.supports(
        _stats._build(
            torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]), 1.0, None, IGNORE
        )[1]
    )
    assert not triton_stats.ENGINE.supports(
        _stats._build(
            torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.int64), 1.0, None, IGNORE
        )[1]
    )


# --- nll_loss(..., return_stats=True) ---------------------------------------------------------


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_nll_loss_returns_the_statistics_of_its_logits(library, rng):
    x, t = make_case(rng, (6, 9))
    arrays = [to_library(library, a) for a in (x, t)]
    result = nllloss.nll_loss(*arrays, from_logits=True, softcap=4.0, return_stats=True)
    assert isinstance(result, nllloss.LossAndStats)
    loss = nllloss.nll_loss(*arrays, from_logits=True, softcap=4.0)
    # the loss is computed from the statistics' log-probabilities: the same to rounding
    np.testing.assert_allclose(to_numpy(result.loss), to_numpy(loss), rtol=1e-14)
    expected = oracle(torch.from_numpy(x), torch.from_numpy(t), 1.0, 4.0)
    _check(result.stats, expected, np.dtype(np.float64), library)


@pytest.mark.parametrize(
    ("options", "exception", "pattern"),
    [
        ({}, ValueError, r"return_stats=True acts on logits"),
        ({"from_logits": True, "return_lse": True}, ValueError, r"pass one of them"),
        ({"from_logits": True, "return_stats": 1}, TypeError, r"return_stats must be True"),
    ],
)
def test_return_stats_needs_logits_and_class_indices(options, exception, pattern):
    options = {"return_stats": True, **options}
    with pytest.raises(exception, match=pattern):
        nllloss.nll_loss(np.zeros((2, 3)), np.array([0, 1]), **options)
    with pytest.raises(ValueError, match="needs class indices"):
        nllloss.nll_loss(np.zeros((2, 3)), np.full((2, 3), 1 / 3), from_logits=True,
                         return_stats=True)  # fmt: skip

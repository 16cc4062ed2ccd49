"""``return_stats=True`` on ``nll_loss`` and ``linear_cross_entropy``: the loss and the
per-token statistics of its logits, from one pass where the loss is a function of them.

The oracle is written apart: torch 2.13's float64 ``cross_entropy`` of the (capped) logits,
plus the z-loss term ``z * w[y] * logsumexp(z)**2`` reduced as the loss, and
``test_token_stats.oracle``'s statistics; gradients by float64 autograd of that
composition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_token_stats import IGNORE, _check, jnp, make_case, oracle, to_library, to_numpy

import nllloss
from nllloss import LossAndStats, _generic
from nllloss import _token_stats as _stats

# (options, computed in one pass with a gradient): label smoothing reads every class's logit
# and the z-loss's gradient the log-sum-exp of the same pass, so those take a second pass
CASES = [
    ({}, True),
    ({"reduction": "sum"}, True),
    ({"reduction": "none"}, True),
    ({"weighted": True, "softcap": 3.0}, True),
    ({"weighted": True, "z_loss": 1e-2, "reduction": "sum"}, False),
    ({"label_smoothing": 0.1, "weighted": True}, False),
    ({"total_weight": 7.0}, True),
]


def _options(options: dict, classes: int, rng):
    """The call's keywords (a class weight for ``weighted``) and the weight as float64."""
    options = dict(options)
    weight = rng.random(classes) + 0.5 if options.pop("weighted", False) else None
    return options, weight


def _oracle_loss(logits: torch.Tensor, t: torch.Tensor, weight, options: dict):
    """torch's float64 loss of (N, C) ``logits``, with the z-loss and cap of nllloss."""
    softcap = options.get("softcap")
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    reduction = options.get("reduction", "mean")
    w = None if weight is None else torch.as_tensor(weight, dtype=z.dtype)
    smoothing = options.get("label_smoothing", 0.0)
    total = options.get("total_weight")
    loss = F.cross_entropy(z, t, w, ignore_index=IGNORE, label_smoothing=smoothing,
                           reduction="none")  # fmt: skip
    valid = t != IGNORE
    v = valid.to(z.dtype) if w is None else torch.where(valid, w[torch.where(valid, t, 0)], 0)
    if options.get("z_loss"):
        loss = loss + options["z_loss"] * v * torch.logsumexp(z, 1) ** 2
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (total if total is not None else v.sum())


@pytest.mark.parametrize("library", ["numpy", "torch", "jax", "dask", "array_api_strict"])
@pytest.mark.parametrize(("options", "one_pass"), CASES)
def test_nll_loss_with_stats_equals_torch(library, options, one_pass, rng):
    x, t = make_case(rng, (7, 9))
    options, weight = _options(options, 9, rng)
    if weight is not None:
        options["weight"] = to_library(library, weight)
    result = nllloss.nll_loss(to_library(library, x), to_library(library, t), from_logits=True,
                              return_stats=True, **options)  # fmt: skip
    assert isinstance(result, LossAndStats)
    if library == "numpy":
        assert isinstance(result.loss, np.ndarray)  # 0-d for 'mean' and 'sum', as nll_loss's
    x64, t64 = torch.from_numpy(x), torch.from_numpy(t)
    expected = _oracle_loss(x64, t64, weight, options)
    np.testing.assert_allclose(to_numpy(result.loss), expected.numpy(), rtol=1e-12, atol=1e-12)
    _check(result.stats, oracle(x64, t64, 1.0, options.get("softcap")), np.dtype(np.float64),
           library)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("options", "one_pass"), CASES)
def test_nll_loss_with_stats_gradient_torch(dtype, options, one_pass, rng):
    """The loss differentiates as without the statistics (through them in one pass); the
    statistics as ``token_stats``'s."""
    x, t = make_case(rng, (6, 11), extreme=False)
    options, weight = _options(options, 11, rng)
    xt = torch.from_numpy(x).to(dtype).requires_grad_()
    w = None if weight is None else torch.from_numpy(weight).to(dtype)
    result = nllloss.nll_loss(xt, torch.from_numpy(t), w, from_logits=True, return_stats=True,
                              **options)  # fmt: skip
    assert result.loss.dtype == dtype
    assert result.stats.entropy.dtype == dtype
    upstream = torch.from_numpy(rng.standard_normal(result.loss.shape))
    (grad,) = torch.autograd.grad((result.loss.double() * upstream).sum(), xt, retain_graph=True)
    x64 = xt.detach().double().requires_grad_()
    expected = _oracle_loss(x64, torch.from_numpy(t), weight, options)
    (wanted,) = torch.autograd.grad((expected * upstream).sum(), x64)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {
        "rtol": 1e-5 if dtype == torch.float32 else 1e-12, "atol": 1e-6 if dtype == torch.float32
        else 1e-12}  # fmt: skip
    np.testing.assert_allclose(result.loss.detach().double().numpy(), expected.detach().numpy(),
                               **tolerance)  # fmt: skip
    np.testing.assert_allclose(grad.double().numpy(), wanted.numpy(), **tolerance)
    # the statistics are token_stats's: differentiable through logprob and entropy
    (entropy_grad,) = torch.autograd.grad(result.stats.entropy.sum(), xt)
    z = x64 if options.get("softcap") is None else 3.0 * torch.tanh(x64 / 3.0)
    p = torch.softmax(z, 1)
    (wanted,) = torch.autograd.grad(-(p * torch.log_softmax(z, 1)).sum(), x64)
    np.testing.assert_allclose(entropy_grad.double().numpy(), wanted.numpy(), **tolerance)


def test_nll_loss_with_stats_reads_the_logits_once(monkeypatch, rng):
    """Without label smoothing the loss comes from the statistics' pass: the loss engines
    are not called (a second read of the logits would be)."""
    from nllloss._kernels import cpu as _cpu

    def refused(*args, **kwargs):
        raise AssertionError("the loss engine read the logits again")

    for backend in (_cpu.backend(), _generic.Backend):
        monkeypatch.setattr(type(backend) if backend is not _generic.Backend else backend,
                            "forward", refused)  # fmt: skip
    x, t = make_case(rng, (5, 8), extreme=False)
    result = nllloss.nll_loss(x, t, from_logits=True, z_loss=1e-3, return_stats=True)
    expected = _oracle_loss(torch.from_numpy(x), torch.from_numpy(t), None, {"z_loss": 1e-3})
    np.testing.assert_allclose(result.loss, expected.numpy(), rtol=1e-12)


# --- linear_cross_entropy(..., return_stats=True) ---------------------------------------------


def _linear_case(rng, rows=37, features=6, classes=13, dtype=np.float64):
    h = rng.standard_normal((rows, features)).astype(dtype)
    w = (rng.standard_normal((classes, features)) * 0.7).astype(dtype)
    b = rng.standard_normal(classes).astype(dtype)
    t = rng.integers(0, classes, rows)
    t[::4] = IGNORE
    return h, w, b, t


@pytest.mark.parametrize("library", ["numpy", "torch", "jax", "dask", "array_api_strict"])
@pytest.mark.parametrize(("options", "one_pass"), CASES)
def test_linear_cross_entropy_with_stats_equals_torch(library, options, one_pass, rng):
    h, w, b, t = _linear_case(rng)
    options, weight = _options(options, 13, rng)
    if weight is not None:
        options["weight"] = to_library(library, weight)
    arrays = [to_library(library, a) for a in (h, w, t)]
    result = nllloss.linear_cross_entropy(*arrays, linear_bias=to_library(library, b),
                                          chunk_rows=8, return_stats=True, **options)  # fmt: skip
    assert isinstance(result, LossAndStats)
    logits = torch.from_numpy(h @ w.T + b)
    t64 = torch.from_numpy(t)
    expected = _oracle_loss(logits, t64, weight, options)
    np.testing.assert_allclose(to_numpy(result.loss), expected.numpy(), rtol=1e-11, atol=1e-12)
    _check(result.stats, oracle(logits, t64, 1.0, options.get("softcap")), np.dtype(np.float64),
           library)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("options", "one_pass"), CASES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_linear_cross_entropy_with_stats_torch_gradients(dtype, options, one_pass,
                                                         requires_grad, rng):  # fmt: skip
    """The loss's gradients with respect to the input, weight and bias are those without
    the statistics (float64 autograd of the composition); the statistics carry none."""
    h, w, b, t = _linear_case(rng)
    options, weight = _options(options, 13, rng)
    tensors = [torch.from_numpy(a).to(dtype).requires_grad_(requires_grad) for a in (h, w, b)]
    class_weight = None if weight is None else torch.from_numpy(weight).to(dtype)
    result = nllloss.linear_cross_entropy(
        tensors[0], tensors[1], torch.from_numpy(t), linear_bias=tensors[2], weight=class_weight,
        chunk_rows=8, return_stats=True, **options,
    )  # fmt: skip
    assert result.loss.dtype == dtype
    assert all(s.dtype == dtype and not s.requires_grad for s in result.stats[:3])
    exact = [a.detach().double().requires_grad_() for a in tensors]
    expected = _oracle_loss(exact[0] @ exact[1].T + exact[2], torch.from_numpy(t), weight, options)
    bf16 = dtype == torch.bfloat16
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {
        "rtol": 1e-5 if dtype == torch.float32 else 1e-11, "atol": 1e-6 if dtype == torch.float32
        else 1e-12}  # fmt: skip
    np.testing.assert_allclose(result.loss.detach().double().numpy(), expected.detach().numpy(),
                               **tolerance)  # fmt: skip
    logits = (exact[0] @ exact[1].T + exact[2]).detach()
    stats_tolerance = np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)
    if not bf16:
        _check(result.stats, oracle(logits, torch.from_numpy(t), 1.0, options.get("softcap")),
               stats_tolerance, "torch")  # fmt: skip
    if not requires_grad:
        assert not result.loss.requires_grad
        return
    upstream = torch.from_numpy(rng.standard_normal(result.loss.shape))
    grads = torch.autograd.grad((result.loss.double() * upstream).sum(), tensors)
    wanted = torch.autograd.grad((expected * upstream).sum(), exact)
    for name, g, e in zip(("input", "weight", "bias"), grads, wanted, strict=True):
        np.testing.assert_allclose(g.double().numpy(), e.numpy(), err_msg=name, **tolerance)


def test_linear_cross_entropy_with_stats_in_the_blocks_pass(monkeypatch, rng):
    """Each block's loss, gradient and statistics come from the statistics' one pass
    (without label smoothing and z-loss): the loss engines see no block, and the
    statistics' engine sees each block once."""
    from nllloss._kernels import cpu as _cpu

    def refused(*args, **kwargs):
        raise AssertionError("the loss engine read a block")

    monkeypatch.setattr(type(_cpu.backend()), "forward_backward", refused)
    monkeypatch.setattr(type(_cpu.backend()), "forward", refused)
    calls = []
    engine_of = _stats.engine_of

    def counted(stats, xp):
        calls.append(stats.problem.layout.batch)
        return engine_of(stats, xp)

    monkeypatch.setattr(_stats, "engine_of", counted)
    h, w, _b, t = _linear_case(rng, rows=20)
    ht = torch.from_numpy(h).requires_grad_()
    result = nllloss.linear_cross_entropy(ht, torch.from_numpy(w), torch.from_numpy(t),
                                          weight=torch.rand(13, dtype=torch.float64),
                                          chunk_rows=8, return_stats=True)  # fmt: skip
    result.loss.backward()  # 'mean': the forward computed the gradients
    assert calls == [8, 8, 4]
    calls.clear()
    _loss, stats = nllloss.linear_cross_entropy(h, w, t, chunk_rows=8, return_stats=True)
    assert calls == [8, 8, 4]
    np.testing.assert_array_equal(stats.argmax, (h @ w.T).argmax(1))


def test_linear_cross_entropy_with_stats_jax_jit(rng):
    jax = pytest.importorskip("jax")
    h, w, b, t = _linear_case(rng)
    tj = jnp.asarray(t)

    @jax.jit
    def step(h, w, b):
        return nllloss.linear_cross_entropy(h, w, tj, linear_bias=b, return_stats=True,
                                            chunk_rows=16)  # fmt: skip

    result = step(jnp.asarray(h), jnp.asarray(w), jnp.asarray(b))
    logits = torch.from_numpy(h @ w.T + b)
    np.testing.assert_allclose(result.loss, _oracle_loss(logits, torch.from_numpy(t), None, {}),
                               rtol=1e-12)  # fmt: skip
    _check(result.stats, oracle(logits, torch.from_numpy(t)), np.dtype(np.float64), "jax")
    grad = jax.jit(jax.grad(lambda h: step(h, jnp.asarray(w), jnp.asarray(b)).loss))(jnp.asarray(h))
    x64 = torch.from_numpy(h).requires_grad_()
    expected = _oracle_loss(x64 @ torch.from_numpy(w).T + torch.from_numpy(b),
                            torch.from_numpy(t), None, {})  # fmt: skip
    (wanted,) = torch.autograd.grad(expected, x64)
    np.testing.assert_allclose(np.asarray(grad), wanted.numpy(), rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_with_stats_compiled():
    """Under torch.compile the loss is the composition; the statistics come with it."""
    torch._dynamo.reset()
    rng = np.random.default_rng(3)
    h, w, _b, t = _linear_case(rng, dtype=np.float32)
    args = [torch.from_numpy(a) for a in (h, w, t)]

    @torch.compile(fullgraph=False)
    def step(h, w, t):
        return nllloss.linear_cross_entropy(h, w, t, return_stats=True)

    result = step(*args)
    eager = nllloss.linear_cross_entropy(*args, return_stats=True)
    np.testing.assert_allclose(result.loss.numpy(), eager.loss.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(result.stats.argmax.numpy(), eager.stats.argmax.numpy())
    torch._dynamo.reset()


@pytest.mark.parametrize("function", ["nll_loss", "linear_cross_entropy"])
def test_return_stats_refusals(function):
    h, w = np.zeros((2, 3)), np.zeros((4, 3))
    probabilities = np.full((2, 4), 0.25)
    if function == "nll_loss":
        call = nllloss.nll_loss
        arrays, options = (np.zeros((2, 4)),), {"from_logits": True}
    else:
        call = nllloss.linear_cross_entropy
        arrays, options = (h, w), {}
    with pytest.raises(ValueError, match="needs class indices"):
        call(*arrays, probabilities, return_stats=True, **options)
    with pytest.raises(TypeError, match="return_stats must be True or False"):
        call(*arrays, np.array([0, 1]), return_stats="yes", **options)
    with pytest.raises(ValueError, match="return_stats=True acts on logits"):
        nllloss.nll_loss(np.zeros((2, 4)), np.array([0, 1]), return_stats=True)


def test_linear_cross_entropy_with_stats_triton_interpreted(monkeypatch, rng):
    """The Triton kernels (under the interpreter) compute each block's loss gradient and
    statistics in their one pass, as the numba kernel does."""
    monkeypatch.setenv("NLLLOSS_TRITON_INTERPRET", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from nllloss._kernels.triton import _stats as triton_stats

    monkeypatch.setattr(triton_stats, "BLOCK_C", 16)  # rows span several tiles
    monkeypatch.setattr(_stats, "numba_available", lambda: False)
    calls = []
    forward_backward = triton_stats.ENGINE.forward_backward

    def counted(stats, upstream, out=None):
        calls.append(stats.problem.layout.batch)
        return forward_backward(stats, upstream, out=out)

    monkeypatch.setattr(triton_stats.ENGINE, "forward_backward", counted)
    h, w, b, t = _linear_case(rng, rows=12, features=6, classes=37, dtype=np.float32)
    tensors = [torch.from_numpy(a).requires_grad_() for a in (h, w, b)]
    result = nllloss.linear_cross_entropy(tensors[0], tensors[1], torch.from_numpy(t),
                                          linear_bias=tensors[2], chunk_rows=8,
                                          return_stats=True, softcap=4.0)  # fmt: skip
    result.loss.backward()
    assert calls == [8, 4]
    exact = [torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (h, w, b)]
    logits = exact[0] @ exact[1].T + exact[2]
    expected = _oracle_loss(logits, torch.from_numpy(t), None, {"softcap": 4.0})
    expected.backward()
    np.testing.assert_allclose(result.loss.item(), expected.item(), rtol=1e-5)
    for got, wanted in zip(tensors, exact, strict=True):
        np.testing.assert_allclose(got.grad.numpy(), wanted.grad.numpy(), rtol=1e-4, atol=1e-6)
    _check(result.stats, oracle(logits.detach(), torch.from_numpy(t), 1.0, 4.0),
           np.dtype(np.float32), "torch")  # fmt: skip


def test_nll_loss_with_stats_compiles_fullgraph(rng):
    """The loss from the statistics' operator traces without a graph break, and
    differentiates as in eager mode."""
    torch._dynamo.reset()
    x, t = make_case(rng, (6, 9), extreme=False)
    weight = torch.from_numpy(rng.random(9) + 0.5).float()
    xt = torch.from_numpy(x).float().requires_grad_()

    def step(x, t, w):
        return nllloss.nll_loss(x, t, w, from_logits=True, return_stats=True, z_loss=1e-3)

    compiled = torch.compile(step, fullgraph=True)(xt, torch.from_numpy(t), weight)
    (grad,) = torch.autograd.grad(compiled.loss, xt)
    eager = step(xt, torch.from_numpy(t), weight)
    (wanted,) = torch.autograd.grad(eager.loss, xt)
    torch.testing.assert_close(compiled.loss, eager.loss)
    torch.testing.assert_close(grad, wanted)
    for got, expected in zip(compiled.stats, eager.stats, strict=True):
        torch.testing.assert_close(got, expected)
    torch._dynamo.reset()

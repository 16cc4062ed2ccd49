"""A new keyword option cannot give a wrong number on any route.

The declaration (``nllloss._options.Options``) is extended at test time with a canary
option, ``canary``, that scales the loss by ``1 + canary``; the public functions receive
``canary=0.5`` as if their signatures took it (``_options.given``, the one place they read
their option keywords), and the specification (``_generic.Backend``) computes it. No fast
engine declares it, so every route must either compute it through the generic path or
refuse the call: the expected values are torch 2.13's loss and gradient (float64) times
1.5, and an engine that ignored the option would give them unscaled.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_backends import BACKENDS, to_backend, to_numpy

import nllloss
from nllloss import _generic, _options
from nllloss._options import Options, option

SCALE = 1.5  # 1 + the canary's value


@_options.declaration
@dataclasses.dataclass(frozen=True)
class Canary(Options):
    """The declaration with one more option: the loss times ``1 + canary``."""

    canary: float = option(0.0, lambda value, options, context: float(value))


def _scaled(result, problem):
    scale = 1.0 + getattr(problem.options, "canary", 0.0)
    if scale == 1.0:
        return result
    scaled = result * scale
    return np.asarray(scaled) if isinstance(scaled, np.generic) else scaled


@pytest.fixture(autouse=True)
def canary(monkeypatch):
    """Every call sees ``canary=0.5``; the generic path computes it. The compiler forgets
    what it traced with the extended declaration, before and after."""
    torch._dynamo.reset()
    yield from _with_canary(monkeypatch)
    torch._dynamo.reset()


def _with_canary(monkeypatch):
    # Modules loaded on first use read the declaration when they load (the operators'
    # schema): loaded first, they keep the real one.
    import nllloss._hidden_states.jax
    import nllloss._hidden_states.torch
    import nllloss._torch.autograd  # noqa: F401

    monkeypatch.setattr(_options, "Options", Canary)
    given = _options.given
    monkeypatch.setattr(_options, "given", lambda arguments: {**given(arguments), "canary": 0.5})
    # the quick path's guard reads the same arguments: with canary=0.5 among them, it fails
    monkeypatch.setattr(_options, "untouched", lambda arguments: False)
    forward, backward = _generic.Backend.forward, _generic.Backend.backward
    monkeypatch.setattr(
        _generic.Backend, "forward", lambda self, problem: _scaled(forward(self, problem), problem)
    )
    monkeypatch.setattr(
        _generic.Backend,
        "backward",
        lambda self, problem, grad_output, out=None: _finish(
            _scaled(backward(self, problem, grad_output), problem), out
        ),
    )
    yield


def _finish(grad, out):
    if out is None:
        return grad
    out[...] = grad
    return out


def _case(from_logits: bool, dtype=np.float32, shape=(6, 5)):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal(shape)
    x = logits if from_logits else np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    t = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    t.reshape(-1)[::4] = -100
    w = rng.random(shape[1]) + 0.5
    return x.astype(dtype), t, w.astype(dtype)


def _oracle(x, t, w, reduction, from_logits, label_smoothing=0.0):
    """torch's float64 loss and gradient, times SCALE."""
    x64 = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    t64, w64 = torch.tensor(t), torch.tensor(np.asarray(w, dtype=np.float64))
    if from_logits:
        loss = F.cross_entropy(x64, t64, w64, reduction=reduction, label_smoothing=label_smoothing)
    else:
        loss = F.nll_loss(x64, t64, w64, reduction=reduction)
    loss = loss * SCALE
    loss.backward(torch.ones_like(loss))
    return loss.detach().numpy(), x64.grad.numpy()


def _close(actual, expected, rtol=2e-6):
    np.testing.assert_allclose(to_numpy(actual).astype(np.float64), expected, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_numpy(from_logits, reduction):
    """The NumPy route (numba kernels and, by conftest's fixture, the generic path): the
    loss, the gradient, both in one pass and into ``out=``; the quick path's call too."""
    x, t, w = _case(from_logits)
    expected, grad = _oracle(x, t, w, reduction, from_logits)
    options = {"from_logits": from_logits, "reduction": reduction}
    _close(nllloss.nll_loss(x, t, w, **options), expected)
    upstream = np.ones(expected.shape, dtype=x.dtype)
    _close(nllloss.nll_loss_backward(upstream, x, t, w, **options), grad)
    out = np.empty_like(x)
    loss, into = nllloss.nll_loss_and_grad(x, t, w, grad_output=upstream, out=out, **options)
    _close(loss, expected)
    assert into is out
    _close(out, grad)
    if not from_logits and reduction == "mean":  # the commonest call: the quick path's
        _close(nllloss.nll_loss(x, t), _oracle(x, t, np.ones(5), "mean", False)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_torch_eager_and_autograd(from_logits, reduction, dtype):
    """torch CPU tensors (torch's own kernel, NumPy views, the generic engine) and their
    autograd. The generic engine's autograd Functions keep the problem as the operators'
    schema, made from the declaration at import: an option it was not made from is refused
    there (``TypeError``), never dropped."""
    x, t, w = _case(from_logits, np.float64)
    expected, grad = _oracle(x, t, w, reduction, from_logits)
    ours = torch.tensor(x).to(dtype).requires_grad_()
    try:
        loss = nllloss.nll_loss(ours, torch.tensor(t), torch.tensor(w).to(dtype),
                                reduction=reduction, from_logits=from_logits)  # fmt: skip
    except TypeError as error:
        assert "no operator schema for Canary" in str(error)  # noqa: PT017
        return
    loss.backward(torch.ones_like(loss))
    rtol = 2e-6 if dtype in (torch.float32, torch.float64) else 2e-2
    expected16, grad16 = _oracle(ours.detach().double().numpy(), t, w, reduction, from_logits)
    _close(loss.float(), expected if rtol < 1e-3 else expected16, rtol)
    _close(ours.grad.float(), grad if rtol < 1e-3 else grad16, rtol)


@pytest.mark.parametrize("from_logits", [False, True])
def test_torch_compile_computes_or_refuses(from_logits):
    """Under torch.compile the loss may run as a custom operator whose schema is made from
    the declaration at import: an option it was not made from is refused there (a
    ``TypeError``), never dropped; otherwise the result is the canary's."""
    x, t, _ = _case(from_logits)
    expected = _oracle(x, t, np.ones(5), "mean", from_logits)[0]
    compiled = torch.compile(
        lambda a: nllloss.nll_loss(a, torch.tensor(t), from_logits=from_logits),
        backend="eager",
        fullgraph=True,
    )
    try:
        result = compiled(torch.tensor(x))
    except Exception as error:  # the compiler wraps the operator's error
        assert "no operator schema for Canary" in str(error)  # noqa: PT017
    else:
        _close(result, expected)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torch_func_transforms(reduction):
    x, t, w = _case(True, np.float64)
    _, grad = _oracle(x, t, w, reduction, True)

    def loss(a):
        return nllloss.nll_loss(a, torch.tensor(t), torch.tensor(w), reduction=reduction,
                                from_logits=True).sum()  # fmt: skip

    _close(torch.func.grad(loss)(torch.tensor(x)), grad)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("from_logits", [False, True])
def test_other_array_libraries(backend, from_logits):
    """JAX (and under jit), Dask, array-api-strict: the generic path."""
    x, t, w = _case(from_logits, np.float64)
    expected, grad = _oracle(x, t, w, "mean", from_logits)
    xs, ts, ws = (to_backend(backend, a) for a in (x, t, w))
    _close(nllloss.nll_loss(xs, ts, ws, from_logits=from_logits), expected)
    g = nllloss.nll_loss_backward(1.0, xs, ts, ws, from_logits=from_logits)
    _close(g, grad)
    if backend == "jax":
        import jax

        jitted = jax.jit(lambda a, b, c: nllloss.nll_loss(a, b, c, from_logits=from_logits))
        _close(jitted(xs, ts, ws), expected)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_cross_entropy_blocks(reduction):
    """The loss from hidden states, cut into blocks of rows (NumPy and torch autograd)."""
    rng = np.random.default_rng(3)
    h, W = rng.standard_normal((9, 4)), rng.standard_normal((5, 4))
    t = rng.integers(0, 5, 9)
    t[::3] = -100
    expected, grad_logits = _oracle(h @ W.T, t, np.ones(5), reduction, True, 0.1)
    options = {"reduction": reduction, "label_smoothing": 0.1, "chunk_rows": 2}
    _close(nllloss.linear_cross_entropy(h, W, t, **options), expected)
    upstream = np.ones(expected.shape)
    loss, d_h, d_W, _ = nllloss.linear_cross_entropy_and_grad(h, W, t, grad_output=upstream,
                                                               **options)  # fmt: skip
    _close(loss, expected)
    _close(d_h, grad_logits @ W)
    _close(d_W, grad_logits.T @ h)
    ht = torch.tensor(h, requires_grad=True)
    loss = nllloss.linear_cross_entropy(ht, torch.tensor(W), torch.tensor(t), **options)
    loss.backward(torch.ones_like(loss))
    _close(loss, expected)
    _close(ht.grad, grad_logits @ W)


def test_triton_interpreted_leaves_it_to_another_engine(monkeypatch):
    """bfloat16 CPU tensors reach the Triton kernels under the interpreter switch: they
    do not declare the canary, so another engine computes it."""
    pytest.importorskip("triton")
    from nllloss._kernels.triton import _launch

    monkeypatch.setenv("NLLLOSS_TRITON_INTERPRET", "1")

    def refuse(*arguments, **keywords):
        raise AssertionError("the Triton kernels were handed an option they do not declare")

    for name in ("forward", "backward", "forward_backward"):
        monkeypatch.setattr(_launch, name, refuse)
    x, t, _ = _case(True, np.float64)
    ours = torch.tensor(x).to(torch.bfloat16).requires_grad_()
    loss = nllloss.nll_loss(ours, torch.tensor(t), from_logits=True)
    loss.backward()
    expected, grad = _oracle(ours.detach().double().numpy(), t, np.ones(5), "mean", True)
    _close(loss.float(), expected, 2e-2)
    _close(ours.grad.float(), grad, 2e-2)


def test_class_parallel_refuses(monkeypatch):
    """The class-parallel loss has no generic path to hand the option to: it refuses it
    (on every rank)."""
    import torch.distributed as dist

    from nllloss import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x, t, _ = _case(True)
        with pytest.raises(ValueError, match="canary: not available in the class-parallel"):
            distributed.nll_loss(torch.tensor(x), torch.tensor(t), class_start=0,
                                 from_logits=True)  # fmt: skip
    finally:
        dist.destroy_process_group()

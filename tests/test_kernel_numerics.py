"""The fused kernels keep the specification's numbers on every route.

* ``softcap`` c of any size > 0: ``c tanh(x / c)`` for c = 1e-50 (every capped logit is
  ``±c``, so the loss is ``log C``), 1e39 and 1e300 (beyond float32: the cap is nearly
  the identity), as for c = 30;
* the cap's gradient as accurate as torch's float32 autograd or better (``1 - tanh**2``
  formed without cancellation);
* probability targets meet non-finite logits and probabilities as torch's
  ``cross_entropy``: the target is smoothed first, then multiplied by ``log q``;
* every integer target dtype, NumPy's and torch's, on every fused route; out-of-range
  values, 2**64 - 100 among them (never read as ``ignore_index`` -100), raise the IndexError;
* ``return_lse`` from the fused kernels costs O(N) memory, not a copy of the input.

Oracles: float64 NumPy written here (``c * np.tanh(x / c)``, a log-sum-exp), and torch
2.13's CPU ``F.cross_entropy`` in float64.
"""

from __future__ import annotations

import json
import math
import tracemalloc

import array_api_strict
import dask.array as da
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import to_torch

import nllloss
from nllloss._cli import main as cli_main

jax.config.update("jax_enable_x64", True)

CAPS = [1e-50, 1e-30, 30.0, 1e39, 1e300]


def capped_reference(x, t, cap, reduction="mean"):
    """(loss, gradient) of cross-entropy on ``cap * tanh(x / cap)``, in float64 NumPy; the
    gradient for an upstream gradient of 1. ``x`` (N, C), ``t`` class indices."""
    x = np.asarray(x, dtype=np.float64)
    y = x / cap
    logits = cap * np.tanh(y)
    top = logits.max(axis=1, keepdims=True)
    shifted = logits - top
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_q = shifted - log_norm
    rows = np.arange(x.shape[0])
    losses = -log_q[rows, t]
    grad = np.exp(log_q)
    grad[rows, t] -= 1.0
    with np.errstate(over="ignore"):  # cosh(1e37) is inf: the derivative 0
        grad *= 1.0 / np.cosh(y) ** 2  # d(c tanh(x / c))/dx
    if reduction == "none":
        return losses, grad
    if reduction == "mean":
        return losses.mean(), grad / x.shape[0]
    return losses.sum(), grad


def finite_logits(rng, rows=6, classes=7):
    x = (rng.standard_normal((rows, classes)) * 3).astype(np.float32)
    x[0, 0] = 0.0  # x / c is 0 here however small c is
    x[1, 1] = 1e-30  # x / c underflows here when c is large
    x[2, 2] = -3e38  # near float32's largest
    return x, rng.integers(0, classes, rows)


ROUTES = {
    "numpy": (lambda a: a, np.asarray),
    "torch": (torch.from_numpy, lambda a: a.numpy()),
    "jax": (jnp.asarray, np.asarray),
    "dask": (da.from_array, lambda a: np.asarray(a.compute())),
    "array-api-strict": (array_api_strict.asarray, lambda a: np.asarray(a)),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("cap", CAPS)
def test_every_cap_gives_the_capped_loss_on_every_route(route, cap, rng):
    x, t = finite_logits(rng)
    to, back = ROUTES[route]
    expected, _ = capped_reference(x, t, cap, "none")
    loss = back(nllloss.nll_loss(to(x), to(t), from_logits=True, softcap=cap, reduction="none"))
    np.testing.assert_allclose(loss, expected, rtol=2e-6, atol=2e-6)
    if cap < 1e-20:  # every capped logit is ±c, ~0: the loss is log C
        np.testing.assert_allclose(loss, math.log(x.shape[1]), rtol=1e-6)


@pytest.mark.parametrize("cap", CAPS)
def test_every_cap_gives_the_capped_gradient(cap, rng):
    x, t = finite_logits(rng)
    expected_loss, expected_grad = capped_reference(x, t, cap, "sum")
    loss, grad = nllloss.nll_loss_and_grad(x, t, from_logits=True, softcap=cap, reduction="sum")
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-5, atol=1e-7)
    xt = torch.from_numpy(x).requires_grad_()
    nllloss.nll_loss(
        xt, torch.from_numpy(t), from_logits=True, softcap=cap, reduction="sum"
    ).backward()
    np.testing.assert_allclose(xt.grad.numpy(), expected_grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("cap", CAPS)
def test_every_cap_in_the_loss_from_hidden_states(cap, rng):
    h = rng.standard_normal((6, 4)).astype(np.float32)
    w = (rng.standard_normal((7, 4)) * 2).astype(np.float32)
    t = rng.integers(0, 7, 6)
    expected, _ = capped_reference(h.astype(np.float64) @ w.T.astype(np.float64), t, cap)
    for to in (lambda a: a, torch.from_numpy):
        loss = nllloss.linear_cross_entropy(to(h), to(w), to(t), softcap=cap, chunk_rows=4)
        np.testing.assert_allclose(np.asarray(loss), expected, rtol=2e-6)


@pytest.mark.parametrize("numpy_engine", ["compiled"], indirect=True)  # the CLI picks its own
@pytest.mark.parametrize("cap", CAPS)
def test_every_cap_in_the_cli(cap, rng, tmp_path, capsys):
    x, t = finite_logits(rng)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    code = cli_main(
        ["eval", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--from-logits",
         "--softcap", repr(cap), "--format", "json", "--quiet"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    expected, _ = capped_reference(x, t, cap)
    assert json.loads(out.out)["loss"] == pytest.approx(expected, rel=2e-6)


def test_a_cap_beyond_the_dtype_caps_an_infinite_logit_to_its_rounding_on_every_route():
    """c tanh(inf / c) = c, which float32 rounds to inf for c = 1e39: that row's loss is NaN,
    as an infinite logit's without a cap, on every route (the others are finite). (Dask
    warns of the NaN it computes outside NumPy's error state, cap or no cap.)"""
    x = np.array([[np.inf, 0.0, 1.0], [0.5, 0.25, -1.0]], dtype=np.float32)
    t = np.array([1, 2])
    expected_row = capped_reference(x[1:], t[1:], 1e39, "none")[0]
    for route, (to, back) in ROUTES.items():
        if route == "dask":
            continue
        loss = back(
            nllloss.nll_loss(to(x), to(t), from_logits=True, softcap=1e39, reduction="none")
        )
        assert np.isnan(loss[0]), route
        np.testing.assert_allclose(loss[1:], expected_row, rtol=2e-6, err_msg=route)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_softcap_gradient_within_twice_torch_float32s_error(reduction):
    """At x = 20 randn(128, 512), c = 30: the largest relative error of the gradient against
    float64 is at most twice torch's own float32 autograd's."""
    generator = torch.Generator().manual_seed(0)
    x = 20 * torch.randn(128, 512, generator=generator)
    t = torch.randint(0, 512, (128,), generator=generator)
    cap = 30.0

    def torch_gradient(dtype):
        xx = x.to(dtype).clone().requires_grad_()
        F.cross_entropy(cap * torch.tanh(xx / cap), t, reduction=reduction).backward()
        return xx.grad.double()

    expected = torch_gradient(torch.float64)

    def error(grad):
        return float(((grad.double() - expected).abs() / expected.abs()).max())

    bound = 2 * error(torch_gradient(torch.float32))
    _, grad = nllloss.nll_loss_and_grad(
        x.numpy(), t.numpy(), from_logits=True, softcap=cap, reduction=reduction
    )
    assert error(torch.from_numpy(grad)) <= bound
    xt = x.clone().requires_grad_()
    nllloss.nll_loss(xt, t, from_logits=True, softcap=cap, reduction=reduction).backward()
    assert error(xt.grad) <= bound


# --- non-finite values with probability targets ------------------------------------------

NON_FINITE_CASES = {
    # a -inf logit where p = 0: torch's smoothed p' > 0 there makes the loss inf
    "-inf logit, smoothed": (
        [[0.5, -np.inf, 1.0, 2.0], [0.1, 0.2, 0.3, 0.4]],
        [[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]],
        0.1,
    ),
    # p = inf at the row's largest logit: inf * log q (< 0) is -inf, the loss inf
    "inf probability at the maximum": (
        [[0.5, 0.1, 1.0, 2.0], [0.1, 0.2, 0.3, 0.4]],
        [[0.0, 0.0, 0.0, np.inf], [0.25, 0.25, 0.25, 0.25]],
        0.0,
    ),
    "inf probability at the maximum, smoothed": (
        [[0.5, 0.1, 1.0, 2.0], [0.1, 0.2, 0.3, 0.4]],
        [[0.0, 0.0, 0.0, np.inf], [0.25, 0.25, 0.25, 0.25]],
        0.2,
    ),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", NON_FINITE_CASES)
def test_non_finite_probability_cases_match_torch(case, reduction, route):
    logits, p, smoothing = NON_FINITE_CASES[case]
    x = np.array(logits, dtype=np.float32)
    p = np.array(p, dtype=np.float32)
    xt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    expected = F.cross_entropy(
        xt, torch.tensor(p, dtype=torch.float64), reduction=reduction, label_smoothing=smoothing
    )
    expected.sum().backward()
    to, back = ROUTES[route]
    options = dict(from_logits=True, reduction=reduction, label_smoothing=smoothing)
    loss = back(nllloss.nll_loss(to(x), to(p), **options))
    np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-6)
    if route == "numpy":
        upstream = np.ones(loss.shape, dtype=np.float32)
        both = nllloss.nll_loss_and_grad(x, p, grad_output=upstream, **options)
        np.testing.assert_allclose(both[0], expected.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(both[1], xt.grad.numpy(), rtol=1e-6, atol=1e-7)
    if route == "torch":
        x_grad = torch.from_numpy(x).requires_grad_()
        nllloss.nll_loss(x_grad, torch.from_numpy(p), **options).sum().backward()
        np.testing.assert_allclose(x_grad.grad.numpy(), xt.grad.numpy(), rtol=1e-6, atol=1e-7)


# --- every integer target dtype -------------------------------------------------------

NUMPY_INTEGERS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
TORCH_INTEGERS = [
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
]  # fmt: skip


def fused_routes(x, t, w, h):
    """Each fused entry point's loss and gradient with respect to its input (a NumPy or a
    torch problem), from logits ``x`` or hidden states ``h`` and the classes' matrix ``w``."""
    torch_input = isinstance(x, torch.Tensor)
    results = {
        "from logits": nllloss.nll_loss(x, t, from_logits=True),
        "smoothed": nllloss.nll_loss(x, t, from_logits=True, label_smoothing=0.1),
        "from hidden states": nllloss.linear_cross_entropy(h, w, t),
    }
    if not torch_input:
        results["and_grad"] = nllloss.nll_loss_and_grad(x, t, from_logits=True)[1]
        results["backward"] = nllloss.nll_loss_backward(np.float32(1.0), x, t, from_logits=True)
        results["hidden and_grad"] = nllloss.linear_cross_entropy_and_grad(h, w, t)[1]
        results["NLLLoss"] = nllloss.NLLLoss(from_logits=True)(x, t)
        return results
    for name, module in [
        ("NLLLoss", nllloss.NLLLoss(from_logits=True)),
        ("CrossEntropyLoss", nllloss.torch.CrossEntropyLoss()),
    ]:
        leaf = x.detach().clone().requires_grad_()
        results[name] = module(leaf, t)
        results[name].backward()
        results[name + " grad"] = leaf.grad
    return results


def _as_numpy(value):
    return value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_every_integer_target_dtype_on_every_fused_route(library, rng):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    h = rng.standard_normal((5, 3)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    t = np.array([0, 5, 3, 1, 2])
    convert = (lambda a: a) if library == "numpy" else torch.from_numpy
    expected = {k: _as_numpy(v) for k, v in fused_routes(*map(convert, (x, t, w, h))).items()}
    assert F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t)).item() == pytest.approx(
        float(expected["from logits"]), rel=1e-6
    )
    dtypes = NUMPY_INTEGERS if library == "numpy" else TORCH_INTEGERS
    for dtype in dtypes:
        typed = t.astype(dtype) if library == "numpy" else torch.from_numpy(t).to(dtype)
        results = fused_routes(convert(x), typed, convert(w), convert(h))
        for name, value in results.items():
            np.testing.assert_array_equal(
                _as_numpy(value), expected[name], err_msg=f"{dtype} {name}"
            )


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("value", [2**64 - 100, 2**63, 6])
def test_out_of_range_uint64_targets_raise_on_every_fused_route(library, value, rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    h = rng.standard_normal((4, 3)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    t = np.array([0, 1, value, 2], dtype=np.uint64)
    convert = (lambda a: a) if library == "numpy" else torch.from_numpy
    message = rf"Target {value} is out of bounds: target\[2\] = {value} is not in the class range"
    calls = [
        lambda: nllloss.nll_loss(convert(x), convert(t), from_logits=True),
        lambda: nllloss.nll_loss(convert(x), convert(t), from_logits=True, label_smoothing=0.1),
        lambda: nllloss.linear_cross_entropy(convert(h), convert(w), convert(t)),
        lambda: nllloss.NLLLoss(from_logits=True)(convert(x), convert(t)),
    ]
    if library == "numpy":
        calls += [
            lambda: nllloss.nll_loss_and_grad(x, t, from_logits=True),
            lambda: nllloss.nll_loss_backward(np.float32(1.0), x, t, from_logits=True),
            lambda: nllloss.linear_cross_entropy_and_grad(h, w, t),
        ]
    else:
        calls.append(lambda: nllloss.torch.CrossEntropyLoss()(convert(x), convert(t)))
    for call in calls:
        with pytest.raises(IndexError, match=message):
            call()


# --- return_lse ---------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_return_lse_from_the_kernels_needs_no_copy_of_the_input(library, softcap, rng):
    x = rng.standard_normal((512, 2048)).astype(np.float32)
    t = rng.integers(0, 2048, 512)
    t[3] = -100  # an ignored element has its log-sum-exp too
    convert = (lambda a: a) if library == "numpy" else torch.from_numpy
    arrays = convert(x), convert(t)
    nllloss.nll_loss(*arrays, from_logits=True, softcap=softcap, return_lse=True)  # compiled
    tracemalloc.start()
    loss, lse = nllloss.nll_loss(*arrays, from_logits=True, softcap=softcap, return_lse=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    logits = x.astype(np.float64)
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    expected = np.log(np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(_as_numpy(lse), expected, rtol=1e-6)
    expected_loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(t))
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    compiled = not isinstance(nllloss._kernels.cpu.backend(), nllloss._generic.Backend)
    if library == "numpy" and compiled:
        assert peak < x.nbytes / 8, peak  # O(N), where log_softmax would be 3x the input


# --- Triton (under its interpreter without a GPU) ---------------------------------------


@pytest.mark.parametrize("numpy_engine", ["compiled"], indirect=True)  # NumPy plays no part
@pytest.mark.parametrize("cap", CAPS)
def test_triton_kernels_give_every_cap(cap, rng):
    from nllloss._builder import build
    from nllloss._kernels import triton as triton_kernels

    launch = triton_kernels.load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, t = finite_logits(rng)
    expected_loss, expected_grad = capped_reference(x, t, cap)
    xs, ts = to_torch(x).to(device), torch.from_numpy(t).to(device)
    _, problem = build(xs, ts, None, -100, "mean", {"from_logits": True, "softcap": cap})
    loss, _ = launch.forward(problem)
    assert float(loss) == pytest.approx(expected_loss, rel=2e-6)
    loss, grad = launch.forward_backward(problem)
    np.testing.assert_allclose(grad.cpu().numpy(), expected_grad, rtol=2e-5, atol=1e-7)

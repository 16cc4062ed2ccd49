"""z-loss and logit soft-capping (``z_loss=``, ``softcap=``, from logits).

Oracle: float64 torch written here, independently of the code under test: the logits
capped with ``torch.tanh``, ``F.cross_entropy`` on them (class indices or probabilities),
plus ``z * torch.logsumexp(...)**2`` per element, weighted as the docstring of
``nllloss.nll_loss`` says (``w[t]`` for a class index, 0 where ignored; 1 for a target of
probabilities) and reduced with the main loss's denominator; gradients by autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BFLOAT16, EXACT_DTYPES, FLOAT_DTYPES, assert_bitwise, to_torch
from test_backends import BACKENDS, to_backend, to_numpy
from test_options import assert_close, problem
from test_probability_targets import probabilities

import nllloss
from nllloss import nll_loss, nll_loss_and_grad, nll_loss_backward

SHAPES = [(5,), (9, 6), (4, 5, 3), (3, 4, 2, 3), (0, 4), (6, 1)]
OPTIONS = [
    {"z_loss": 1e-4},
    {"z_loss": 0.25},
    {"softcap": 2.5},
    {"softcap": 30.0},
    {"z_loss": 0.1, "softcap": 4.0},
]


def reference(x, t, w, reduction, smoothing=0.0, z_loss=0.0, softcap=None, ignore_index=-100):
    """(input that requires grad, loss) in float64 torch."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).requires_grad_()
    tt = torch.from_numpy(np.asarray(t))
    if tt.dtype.is_floating_point:
        tt = tt.double()
    wt = None if w is None else torch.from_numpy(np.asarray(w, dtype=np.float64))
    logits = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    main = F.cross_entropy(
        logits, tt, weight=wt, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=smoothing,
    )  # fmt: skip
    if not z_loss:
        return xt, main
    class_dim = 0 if xt.dim() == 1 else 1
    lse = torch.logsumexp(logits, dim=class_dim) if xt.shape[class_dim] else None
    if tt.dtype.is_floating_point:  # probabilities: weight 1, 'mean' over the elements
        element_weight = torch.ones(xt.shape[:class_dim] + xt.shape[class_dim + 1 :])
        denominator = element_weight.sum()
        if xt.shape[class_dim] == 0:
            denominator = torch.tensor(math.nan)
    else:
        valid = tt != ignore_index
        safe = torch.where(valid, tt, 0)
        element_weight = valid.double() if wt is None else torch.where(valid, wt[safe], 0.0)
        denominator = element_weight.sum()
    z_terms = z_loss * lse.square() * element_weight if lse is not None else 0 * main
    if reduction == "none":
        return xt, main + z_terms
    if reduction == "sum":
        return xt, main + z_terms.sum()
    return xt, main + z_terms.sum() / denominator


def target_of(kind, rng, shape, x_dtype, weighted):
    x, t, w = problem(rng, shape, x_dtype, weighted)
    if kind == "probabilities":
        t = probabilities(rng, shape, x_dtype)
    return x, t, w


def check(x, t, w, reduction, smoothing, options, dtype, rng, scale=10):
    """Loss and gradient of all three entry points against the reference."""
    xt, expected = reference(x, t, w, reduction, smoothing, **options)
    kwargs = dict(
        weight=w, reduction=reduction, from_logits=True, label_smoothing=smoothing, **options
    )
    loss = nll_loss(x, t, **kwargs)
    assert loss.dtype == x.dtype
    assert_close(loss, expected.detach().numpy(), dtype, scale=scale)
    g = rng.uniform(0.5, 1.5, tuple(expected.shape))
    if expected.numel():
        expected.backward(torch.from_numpy(g))
        expected_grad = xt.grad.numpy()
    else:
        expected_grad = np.zeros(x.shape)
    g = g.astype(dtype)
    grad = nll_loss_backward(g, x, t, **kwargs)
    assert grad.dtype == x.dtype
    assert_close(grad, expected_grad, dtype, scale=scale)
    both = nll_loss_and_grad(x, t, grad_output=g, **kwargs)
    assert_close(both[0], expected.detach().numpy(), dtype, scale=scale)
    assert_close(both[1], expected_grad, dtype, scale=scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_loss_and_gradient_match_float64_torch(
    shape, reduction, smoothing, weighted, kind, options, rng
):  # fmt: skip
    for dtype in EXACT_DTYPES:
        x, t, w = target_of(kind, rng, shape, dtype, weighted)
        check(x, t, w, reduction, smoothing, options, dtype, rng)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_every_dtype_computes_in_float32_or_wider(dtype, kind, reduction, rng):
    x, t, w = target_of(kind, rng, (40, 7, 3), np.float64, True)
    x, w = x.astype(dtype), w.astype(dtype)
    if kind == "probabilities":
        t = t.astype(dtype)
    # the reference sees the values the call sees: rounded to the dtype
    options = {"z_loss": 0.05, "softcap": 5.0}
    _, expected = reference(
        x.astype(np.float64), t if kind == "indices" else t.astype(np.float64),
        w.astype(np.float64), reduction, 0.1, **options,
    )  # fmt: skip
    loss = nll_loss(x, t, weight=w, reduction=reduction, from_logits=True,
                    label_smoothing=0.1, **options)  # fmt: skip
    assert loss.dtype == x.dtype
    assert_close(loss.astype(np.float64), expected.detach().numpy(), dtype, scale=10)


def test_ignored_elements_add_no_z_term_nor_gradient(rng):
    x, t, w = problem(rng, (12, 5), np.float64, True, ignored=0.5)
    x[t == -100] = np.inf  # an ignored row may hold anything
    loss, grad = nll_loss_and_grad(x, t, weight=w, from_logits=True, z_loss=0.3, softcap=3.0)
    kept = t != -100
    _, expected = reference(x[kept], t[kept], w, "sum", z_loss=0.3, softcap=3.0)
    denominator = w[t[kept]].sum()
    np.testing.assert_allclose(loss, expected.item() / denominator, rtol=1e-12)
    assert np.all(grad[~kept] == 0)
    assert not np.any(np.signbit(grad[~kept]))
    assert np.all(np.isfinite(grad))


def test_zero_z_loss_and_no_cap_are_the_plain_loss_bitwise(rng):
    x, t, w = problem(rng, (30, 6, 2), np.float32, True)
    plain = nll_loss_and_grad(x, t, weight=w, from_logits=True)
    assert_bitwise(nll_loss_and_grad(x, t, weight=w, from_logits=True, z_loss=0.0)[0], plain[0])
    assert_bitwise(nll_loss_and_grad(x, t, weight=w, from_logits=True, z_loss=0)[1], plain[1])


def test_a_cap_far_above_the_logits_changes_nothing_measurable(rng):
    x, t, w = problem(rng, (20, 6), np.float64, True)
    capped = nll_loss_and_grad(x, t, weight=w, from_logits=True, softcap=1e7)
    plain = nll_loss_and_grad(x, t, weight=w, from_logits=True)
    np.testing.assert_allclose(capped[0], plain[0], rtol=1e-12)
    np.testing.assert_allclose(capped[1], plain[1], rtol=1e-10, atol=1e-15)


def test_capped_logits_are_bounded_by_the_cap(rng):
    """Metamorphic: under a cap c every logit lies in (-c, c), so the loss of a class-index
    target is at most 2c + log C, however large the logits."""
    x, t, _ = problem(rng, (50, 8), np.float64, False, ignored=0.0, scale=1e6)
    losses = nll_loss(x, t, reduction="none", from_logits=True, softcap=3.0)
    assert np.all(np.isfinite(losses))
    assert np.all(losses <= 2 * 3.0 + np.log(8) + 1e-12)


def test_z_loss_scales_linearly(rng):
    """Metamorphic: the z term is linear in z, so loss(2z) - loss(z) = loss(z) - loss(0)."""
    x, t, w = problem(rng, (25, 6), np.float64, True)
    losses = [nll_loss(x, t, weight=w, from_logits=True, z_loss=z) for z in (0.0, 0.1, 0.2)]
    np.testing.assert_allclose(losses[2] - losses[1], losses[1] - losses[0], rtol=1e-10)


def test_gradient_into_out_over_the_input(rng):
    x, t, w = problem(rng, (16, 5, 3), np.float32, True)
    expected = nll_loss_and_grad(x, t, weight=w, from_logits=True, z_loss=0.1, softcap=2.0)
    x_copy = x.copy()
    loss, grad = nll_loss_and_grad(
        x_copy, t, weight=w, from_logits=True, z_loss=0.1, softcap=2.0, out=x_copy
    )
    assert grad is x_copy
    assert_bitwise(loss, expected[0])
    assert_bitwise(grad, expected[1])


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_every_backend_matches_torch(backend, dtype, kind, reduction, rng):
    x, t, w = target_of(kind, rng, (7, 5, 3), dtype, True)
    options = {"z_loss": 0.05, "softcap": 3.0}
    xt, expected = reference(x, t, w, reduction, 0.1, **options)
    g = rng.uniform(0.5, 1.5, tuple(expected.shape)).astype(dtype)
    expected.backward(torch.from_numpy(g.astype(np.float64)))
    arrays = [to_backend(backend, a) for a in (x, t, w, g)]
    kwargs = dict(weight=arrays[2], reduction=reduction, from_logits=True,
                  label_smoothing=0.1, **options)  # fmt: skip
    loss = nll_loss(arrays[0], arrays[1], **kwargs)
    grad = nll_loss_backward(arrays[3], arrays[0], arrays[1], **kwargs)
    assert type(loss) is type(arrays[0])
    assert type(grad) is type(arrays[0])
    assert_close(to_numpy(loss), expected.detach().numpy(), dtype, scale=10)
    assert_close(to_numpy(grad), xt.grad.numpy(), dtype, scale=10)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_torch_gradcheck_and_transforms(kind, rng):
    x, t, w = (torch.from_numpy(a) for a in target_of(kind, rng, (6, 5), np.float64, True))
    options = dict(weight=w, from_logits=True, z_loss=0.2, softcap=2.0)

    def ours(x, t=t, **more):
        return nll_loss(x, t, **options, **more)

    x = x.requires_grad_()
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradcheck(lambda x: ours(x, reduction="none"), (x,))
    _, expected = reference(x.detach().numpy(), t.numpy(), w.numpy(), "mean", z_loss=0.2,
                            softcap=2.0)  # fmt: skip
    torch.testing.assert_close(ours(x), expected)
    (expected_grad,) = torch.autograd.grad(ours(x), x)
    torch.testing.assert_close(torch.func.grad(ours)(x.detach()), expected_grad)
    per_example = torch.func.vmap(lambda x, t: ours(x, t), in_dims=(0, 0))(x.detach(), t)
    for n in range(x.shape[0]):
        _, one = reference(x[n].detach().numpy(), t[n].numpy(), w.numpy(), "mean",
                           z_loss=0.2, softcap=2.0)  # fmt: skip
        torch.testing.assert_close(per_example[n], one, equal_nan=True)  # all ignored: 0/0
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, expected_grad)


def test_torch_float32_training_step_matches_float64(rng):
    x, t, w = problem(rng, (64, 11), np.float32, True)
    xt = to_torch(x).requires_grad_()
    loss = nll_loss(xt, torch.from_numpy(t), weight=to_torch(w), from_logits=True,
                    z_loss=0.01, softcap=10.0)  # fmt: skip
    loss.backward()
    ref_x, expected = reference(x, t, w, "mean", z_loss=0.01, softcap=10.0)
    expected.backward()
    assert_close(loss.detach().numpy(), expected.detach().numpy(), np.float32, scale=10)
    assert_close(xt.grad.numpy(), ref_x.grad.numpy(), np.float32)


def test_torch_bfloat16(rng):
    x, t, _ = problem(rng, (33, 9), np.float32, False)
    x = x.astype(BFLOAT16)
    loss = nll_loss(to_torch(x), torch.from_numpy(t), from_logits=True, z_loss=0.1, softcap=3.0)
    _, expected = reference(x.astype(np.float64), t, None, "mean", z_loss=0.1, softcap=3.0)
    assert loss.dtype == torch.bfloat16
    assert_close(loss.float().numpy(), expected.detach().numpy(), BFLOAT16)


def test_jax_jit_and_grad(rng):
    jax = pytest.importorskip("jax")
    x, t, w = problem(rng, (8, 5), np.float64, True)
    options = dict(weight=w, from_logits=True, z_loss=0.1, softcap=2.0, label_smoothing=0.1)

    def loss(x):
        return nll_loss(x, t, **options)

    xt, expected = reference(x, t, w, "mean", 0.1, z_loss=0.1, softcap=2.0)
    expected.backward()
    np.testing.assert_allclose(jax.jit(loss)(x), expected.item(), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(loss)(x), xt.grad.numpy(), rtol=1e-10, atol=1e-15)
    per_row = jax.vmap(lambda x, t: nll_loss(x, t, **options))(x, t)
    for n in range(x.shape[0]):  # each row unbatched: its 'mean' divides by its own w[t]
        _, row = reference(x[n], t[n], w, "mean", 0.1, z_loss=0.1, softcap=2.0)
        np.testing.assert_allclose(per_row[n], row.item(), rtol=1e-12)  # NaN: all ignored


def test_the_module_carries_the_options(rng):
    x, t, w = problem(rng, (10, 4), np.float64, True)
    module = nllloss.NLLLoss(weight=w, from_logits=True, z_loss=0.1, softcap=2.0)
    assert repr(module).endswith("from_logits=True, z_loss=0.1, softcap=2.0)")
    _, expected = reference(x, t, w, "mean", z_loss=0.1, softcap=2.0)
    np.testing.assert_allclose(module(x, t), expected.item(), rtol=1e-12)


@pytest.mark.parametrize(
    ("options", "exception", "pattern"),
    [
        ({"z_loss": -0.1}, ValueError, r"z_loss must be a finite real number >= 0, got -0\.1"),
        ({"z_loss": math.nan}, ValueError, r"z_loss .* got nan"),
        ({"z_loss": math.inf}, ValueError, r"z_loss .* got inf"),
        ({"z_loss": True}, TypeError, r"z_loss must be .* got bool"),
        ({"z_loss": "0.1"}, TypeError, r"z_loss must be .* got str"),
        ({"softcap": 0.0}, ValueError, r"softcap must be None or a finite real number > 0"),
        ({"softcap": -1.0}, ValueError, r"softcap .* got -1\.0"),
        ({"softcap": math.inf}, ValueError, r"softcap .* got inf"),
        ({"softcap": [1.0]}, TypeError, r"softcap must be .* got list"),
        ({"z_loss": 0.1, "from_logits": False}, ValueError, r"z_loss=0\.1 acts on logits"),
        ({"softcap": 1.0, "from_logits": False}, ValueError, r"softcap=1\.0 .*from_logits=True"),
    ],
    ids=str,
)
def test_bad_options_are_refused_naming_them(options, exception, pattern):
    x = np.zeros((2, 3))
    t = np.array([0, 1])
    options = {"from_logits": True, **options}
    with pytest.raises(exception, match=pattern):
        nll_loss(x, t, **options)
    with pytest.raises(exception, match=pattern):
        nllloss.NLLLoss(**options)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5,), (9, 6), (4, 5, 3), (0, 4)])
def test_return_lse_gives_every_elements_lse_on_every_backend(backend, dtype, shape, rng):
    x, t, w = problem(rng, shape, dtype, True)
    xt = torch.from_numpy(x.astype(np.float64))
    class_dim = 0 if len(shape) == 1 else 1
    expected = torch.logsumexp(3.0 * torch.tanh(xt / 3.0), dim=class_dim).numpy()
    _, expected_loss = reference(x, t, w, "mean", z_loss=0.1, softcap=3.0)
    arrays = [to_backend(backend, a) for a in (x, t, w)]
    loss, lse = nll_loss(*arrays, from_logits=True, z_loss=0.1, softcap=3.0, return_lse=True)
    assert type(lse) is type(arrays[0])
    assert to_numpy(lse).dtype == x.dtype
    assert to_numpy(lse).shape == expected.shape  # ignored elements too; 0-d unbatched
    assert_close(to_numpy(lse), expected, dtype, scale=10)
    assert_close(to_numpy(loss), expected_loss.detach().numpy(), dtype, scale=10)


def test_return_lse_is_differentiable_by_torch_and_jax(rng):
    x, t, _ = problem(rng, (6, 5), np.float64, False)
    xt = torch.from_numpy(x).requires_grad_()

    def lse_of(x):
        return nll_loss(x, torch.from_numpy(t), from_logits=True, softcap=2.0, return_lse=True)[1]

    assert torch.autograd.gradcheck(lse_of, (xt,))
    jax = pytest.importorskip("jax")
    grad = jax.grad(
        lambda x: nll_loss(x, t, from_logits=True, softcap=2.0, return_lse=True)[1].sum()
    )(x)
    (expected,) = torch.autograd.grad(torch.logsumexp(2.0 * torch.tanh(xt / 2.0), 1).sum(), xt)
    np.testing.assert_allclose(grad, expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    ("options", "exception", "pattern"),
    [
        ({"return_lse": True}, ValueError, r"return_lse=True acts on logits: it needs from_log"),
        ({"return_lse": 1, "from_logits": True}, TypeError, r"return_lse must be True or False"),
    ],
    ids=str,
)
def test_return_lse_needs_logits_and_a_flag(options, exception, pattern):
    with pytest.raises(exception, match=pattern):
        nll_loss(np.zeros((2, 3)), np.array([0, 1]), **options)

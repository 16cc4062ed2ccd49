"""label_smoothing and z_loss at the ends of their ranges: the float64 formula's answer or
one ValueError, the same on every route.

The expected values are the formula in float64 NumPy, written here: with a ``-inf`` logit
in a row, any smoothing ``eps > 0`` gives that row the weight ``eps / C > 0`` at it, so its
loss is ``+inf`` (index and probability targets alike). torch's float32
``cross_entropy`` gives NaN for ``eps = 1e-50`` (``eps / C`` underflows to 0 there; its
float64 gives inf): a smoothing too small for float32 is refused on every route, and the
smallest one taken gives inf everywhere. A ``z_loss`` beyond the largest float32 number
(the kernels' compute type) is refused on every route.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_backends import BACKENDS, to_backend, to_numpy

import nllloss
from nllloss import _validate

ROUTES = ["numpy", *sorted(BACKENDS)]

LOGITS = np.array([[0.5, -np.inf, 1.0, 2.0], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
INDICES = np.array([2, 1])
PROBABILITIES = np.array([[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)


def _on(route, array):
    return array if route == "numpy" else to_backend(route, array)


def _reference(x, target, eps):
    """The smoothed cross-entropy of each row in float64, from its formula."""
    x = x.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_q = x - (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))
    classes = x.shape[1]
    p = np.eye(classes)[target] if target.ndim == 1 else target.astype(np.float64)
    smoothed = (1 - eps) * p + eps / classes
    with np.errstate(invalid="ignore"):  # 0 * -inf where a weight is 0: not in these cases
        return -(smoothed * np.where(smoothed > 0, log_q, 0.0)).sum(axis=1)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("eps", [1e-50, 1e-40, 2.0**-65])
def test_a_smoothing_below_the_smallest_is_refused_on_every_route(route, eps):
    x, t = _on(route, LOGITS), _on(route, INDICES)
    with pytest.raises(ValueError, match=r"label_smoothing must be 0\.0 or between 2\*\*-64"):
        nllloss.nll_loss(x, t, from_logits=True, label_smoothing=eps)
    with pytest.raises(ValueError, match=r"label_smoothing must be 0\.0 or between 2\*\*-64"):
        nllloss.nll_loss_backward(1.0, x, t, from_logits=True, label_smoothing=eps)


def test_a_smoothing_below_the_smallest_is_refused_by_the_modules_and_from_hidden_states():
    with pytest.raises(ValueError, match=r"label_smoothing must be 0\.0 or between"):
        nllloss.torch.CrossEntropyLoss(label_smoothing=1e-50)(
            torch.from_numpy(LOGITS), torch.from_numpy(INDICES)
        )
    with pytest.raises(ValueError, match=r"label_smoothing must be 0\.0 or between"):
        nllloss.NLLLoss(from_logits=True, label_smoothing=1e-50)
    h, w = np.eye(2, dtype=np.float32), np.ones((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"label_smoothing must be 0\.0 or between"):
        nllloss.linear_cross_entropy(h, w, INDICES, label_smoothing=1e-50)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("target", ["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_the_smallest_smoothing_with_a_minus_inf_logit_gives_inf(route, target, reduction):
    """The float64 formula: +inf for the row with the -inf logit, on every route."""
    eps = _validate.SMALLEST_LABEL_SMOOTHING
    t = INDICES if target == "indices" else PROBABILITIES
    expected = _reference(LOGITS, t, eps)
    assert np.isposinf(expected[0])
    if reduction == "sum":
        expected = expected.sum()
    loss = nllloss.nll_loss(_on(route, LOGITS), _on(route, t), from_logits=True,
                            label_smoothing=eps, reduction=reduction)  # fmt: skip
    np.testing.assert_allclose(to_numpy(loss).astype(np.float64), expected, rtol=1e-6)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("z_loss", [1e300, 3.5e38])
def test_a_z_loss_beyond_float32_is_refused_on_every_route(route, z_loss):
    x, t = _on(route, LOGITS), _on(route, INDICES)
    with pytest.raises(ValueError, match=r"z_loss must be at most the largest float32 number"):
        nllloss.nll_loss(x, t, from_logits=True, z_loss=z_loss)
    with pytest.raises(ValueError, match=r"z_loss must be at most the largest float32 number"):
        nllloss.nll_loss_backward(1.0, x, t, from_logits=True, z_loss=z_loss)


def test_a_z_loss_beyond_float32_is_refused_by_the_torch_module_and_from_hidden_states():
    with pytest.raises(ValueError, match=r"z_loss must be at most"):
        nllloss.torch.CrossEntropyLoss(z_loss=1e300)
    h, w = np.eye(2, dtype=np.float32), np.ones((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"z_loss must be at most"):
        nllloss.linear_cross_entropy(h, w, INDICES, z_loss=1e300)

"""nllloss.paddle: Paddle's signature and semantics, checked against Paddle itself.

Paddle 3.3.1's CPU kernel corrupts memory with ignored labels under 'mean'/'sum', so it
runs only in a subprocess and only on combinations it survives ('none' with ignored labels,
anything without them); nllloss.paddle never calls it and is tested in-process on exactly
the combinations that crash Paddle.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as F

import nllloss

PADDLE_SCRIPT = """
import json, sys, numpy as np, paddle
cases = json.loads(sys.stdin.read())
out = []
for case in cases:
    x = paddle.to_tensor(np.array(case["x"], dtype=np.float32))
    t = paddle.to_tensor(np.array(case["t"], dtype=np.int64))
    w = None if case["w"] is None else paddle.to_tensor(np.array(case["w"], dtype=np.float32))
    loss = paddle.nn.functional.nll_loss(x, t, weight=w, ignore_index=case["ii"],
                                         reduction=case["reduction"])
    out.append(loss.numpy().tolist())
print(json.dumps(out))
"""


def paddle_reference(cases):
    """Paddle's own results, computed in a subprocess with a timeout."""
    result = subprocess.run(
        [sys.executable, "-c", PADDLE_SCRIPT],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_case(rng, shape, reduction, ignored: bool, weighted: bool):
    classes = shape[1]
    x = np.log(rng.dirichlet(np.ones(classes), (shape[0], *shape[2:]))).astype(np.float32)
    x = np.moveaxis(x, -1, 1)
    t = rng.integers(0, classes, (shape[0], *shape[2:]))
    if ignored:
        t[rng.random(t.shape) < 0.3] = -100
    w = rng.uniform(0.1, 2, classes).astype(np.float32).tolist() if weighted else None
    return {"x": x.tolist(), "t": t.tolist(), "w": w, "ii": -100, "reduction": reduction}


def ours(case, **kwargs):
    x = paddle.to_tensor(np.array(case["x"], dtype=np.float32))
    t = paddle.to_tensor(np.array(case["t"], dtype=np.int64))
    w = None if case["w"] is None else paddle.to_tensor(np.array(case["w"], dtype=np.float32))
    return nllloss.paddle.nll_loss(
        x, t, weight=w, ignore_index=case["ii"], reduction=case["reduction"], **kwargs
    ).numpy()


def test_matches_paddle_where_paddle_survives(rng):
    cases = [
        random_case(rng, shape, reduction, ignored=reduction == "none", weighted=weighted)
        for shape in [(7, 4), (3, 5, 6), (2, 3, 4, 5)]
        for reduction in ("none", "mean", "sum")
        for weighted in (False, True)
    ]
    for case, expected in zip(cases, paddle_reference(cases), strict=True):
        # Paddle sums sequentially, torch (and nllloss) in a cascade: equal to rounding.
        np.testing.assert_allclose(ours(case), expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_labels_with_reductions_where_paddle_crashes(reduction, rng):
    """The case that corrupts Paddle's heap: 1000 rows, half of them ignored."""
    x = np.log(rng.dirichlet(np.ones(5), 1000)).astype(np.float32)
    t = rng.integers(0, 5, 1000)
    t[rng.random(1000) < 0.5] = -100
    loss = nllloss.paddle.nll_loss(paddle.to_tensor(x), paddle.to_tensor(t), reduction=reduction)
    expected = F.nll_loss(torch.from_numpy(x), torch.from_numpy(t), reduction=reduction)
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-6)


def test_paddle_semantics_where_they_differ_from_torch():
    """nll_semantics.md section 6.4: Paddle's documented results."""
    x = paddle.to_tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
    nll = nllloss.paddle.nll_loss
    assert float(nll(x, paddle.to_tensor([-100, -100]))) == 0.0  # F12; torch: nan
    assert float(nll(paddle.zeros([0, 3]), paddle.zeros([0], dtype="int64"))) == 0.0  # F15
    zero_weights = paddle.to_tensor([0.0, 1.0, 0.0])
    assert float(nll(x, paddle.to_tensor([0, 2]), weight=zero_weights)) == 0.0  # F18
    cancelling = paddle.to_tensor([1.0, 0.0, -1.0])
    assert float(nll(x, paddle.to_tensor([0, 2]), weight=cancelling)) == -1.5  # F19; torch: -inf
    assert float(nll(x, paddle.to_tensor([[0], [2]]))) == 1.75  # F45: (N, 1) label
    with pytest.raises(ValueError, match="Expected 2 or more dimensions"):
        nll(paddle.to_tensor([-1.0, -2.0]), paddle.to_tensor(0))  # F21: no unbatched input
    with pytest.raises(ValueError, match="Expected target shape"):
        nll(x, paddle.to_tensor([[0, 1], [2, 0]]))  # Paddle silently mis-pairs (N, k>1)
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        nll(x, paddle.to_tensor([3, 2]))


def test_layer_checks_reduction_at_construction_and_takes_no_legacy_arguments():
    with pytest.raises(ValueError, match="should be 'sum', 'mean' or 'none', but received avg"):
        nllloss.paddle.NLLLoss(reduction="avg")
    with pytest.raises(TypeError):
        nllloss.paddle.NLLLoss(size_average=True)
    layer = nllloss.paddle.NLLLoss(weight=paddle.to_tensor([0.2, 1.5, 0.7]), reduction="sum")
    assert isinstance(layer, paddle.nn.Layer)
    x = paddle.to_tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
    np.testing.assert_allclose(float(layer(x, paddle.to_tensor([0, 2]))), 1.95, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradients_through_pylayer_match_torch(reduction, rng):
    x = np.log(rng.dirichlet(np.ones(4), 30)).astype(np.float32)
    t = rng.integers(0, 4, 30)
    t[::4] = -100
    w = rng.uniform(0.2, 2, 4).astype(np.float32)
    xp = paddle.to_tensor(x, stop_gradient=False)
    loss = nllloss.paddle.nll_loss(
        xp, paddle.to_tensor(t), weight=paddle.to_tensor(w), reduction=reduction
    )
    loss.sum().backward()
    xt = torch.from_numpy(x).requires_grad_()
    F.nll_loss(
        xt, torch.from_numpy(t), weight=torch.from_numpy(w), reduction=reduction
    ).sum().backward()
    np.testing.assert_array_equal(xp.grad.numpy(), xt.grad.numpy())

"""Relations between calls that must hold whatever the values: no oracle needed.

Where the relation keeps torch's summation order (same elements, same flat order) the
results must be bitwise equal; where it changes the order, equal to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT_DTYPES, assert_bitwise

from nllloss import NLLLoss, nll_loss, nll_loss_backward

REDUCTIONS = ["none", "mean", "sum"]


def random_problem(rng, shape, dtype=np.float32, ignored_fraction=0.3, weighted=True):
    classes = shape[1]
    x = (-np.abs(rng.standard_normal(shape)) * 3).astype(dtype)
    t = rng.integers(0, classes, (shape[0], *shape[2:]))
    t[rng.random(t.shape) < ignored_fraction] = -100
    w = rng.uniform(0.1, 2.0, classes).astype(dtype) if weighted else None
    return x, t, w


def flatten_classes_last(x, t):
    classes = x.shape[1]
    return np.moveaxis(x, 1, -1).reshape(-1, classes), t.reshape(-1)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4), (4, 2, 17, 16)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_k_dim_equals_flattened_2d(shape, reduction, dtype, rng):
    """(N, C, d...) is the 2-D loss of the classes-last rows, in the same order: bitwise."""
    x, t, w = random_problem(rng, shape, dtype)
    x2, t2 = flatten_classes_last(x, t)
    loss = nll_loss(x, t, weight=w, reduction=reduction)
    flat_loss = nll_loss(x2, t2, weight=w, reduction=reduction)
    assert_bitwise(loss, flat_loss.reshape(loss.shape))

    go = rng.standard_normal(loss.shape).astype(dtype) if reduction == "none" else 0.75
    grad = nll_loss_backward(go, x, t, weight=w, reduction=reduction)
    flat_go = go.reshape(-1) if reduction == "none" else go
    flat_grad = nll_loss_backward(flat_go, x2, t2, weight=w, reduction=reduction)
    moved = np.moveaxis(flat_grad.reshape(x.shape[0], *x.shape[2:], x.shape[1]), -1, 1)
    assert_bitwise(grad, moved)


@pytest.mark.parametrize("weighted", [False, True])
def test_ignoring_equals_dropping(weighted, rng):
    x, t, w = random_problem(rng, (500, 7), np.float64, ignored_fraction=0.4, weighted=weighted)
    kept = t != -100
    for reduction in ("sum", "mean"):
        with_ignored = nll_loss(x, t, weight=w, reduction=reduction)
        dropped = nll_loss(x[kept], t[kept], weight=w, reduction=reduction)
        np.testing.assert_allclose(with_ignored, dropped, rtol=1e-13)
    none = nll_loss(x, t, weight=w, reduction="none")
    assert_bitwise(none[kept], nll_loss(x[kept], t[kept], weight=w, reduction="none"))
    assert np.all(none[~kept] == 0)
    assert not np.signbit(none[~kept]).any()
    grad = nll_loss_backward(1.0, x, t, weight=w, reduction="sum")
    assert not grad[~kept].any()
    assert_bitwise(grad[kept], nll_loss_backward(1.0, x[kept], t[kept], weight=w, reduction="sum"))


def test_an_ignored_class_equals_a_zero_weight_for_sum(rng):
    """ignore_index inside the class range masks that class, like a zero weight."""
    x, t, w = random_problem(rng, (300, 5), np.float64, ignored_fraction=0.0)
    zeroed = w.copy()
    zeroed[2] = 0.0
    np.testing.assert_allclose(
        nll_loss(x, t, weight=w, ignore_index=2, reduction="sum"),
        nll_loss(x, t, weight=zeroed, reduction="sum"),
        rtol=1e-13,
    )


@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_sum_over_pieces_equals_sum_of_pieces(pieces, rng):
    x, t, w = random_problem(rng, (420, 6, 3), np.float64)
    total = nll_loss(x, t, weight=w, reduction="sum")
    parts = [
        nll_loss(xs, ts, weight=w, reduction="sum")
        for xs, ts in zip(np.array_split(x, pieces), np.array_split(t, pieces), strict=True)
    ]
    np.testing.assert_allclose(total, sum(parts), rtol=1e-12)


def test_permuting_the_batch_changes_only_rounding(rng):
    x, t, w = random_problem(rng, (1000, 9), np.float32)
    order = rng.permutation(1000)
    for reduction in ("sum", "mean"):
        np.testing.assert_allclose(
            nll_loss(x[order], t[order], weight=w, reduction=reduction),
            nll_loss(x, t, weight=w, reduction=reduction),
            rtol=1e-5,
        )
    assert_bitwise(
        nll_loss(x[order], t[order], reduction="none"), nll_loss(x, t, reduction="none")[order]
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scaling_weights_by_a_power_of_two_keeps_the_mean(dtype, rng):
    """Products and sums scale exactly by 2**k, so the weighted mean is unchanged bit for bit."""
    x, t, w = random_problem(rng, (700, 5), dtype)
    for scale in (0.25, 8.0):
        assert_bitwise(
            nll_loss(x, t, weight=w), nll_loss(x, t, weight=(w * dtype.type(scale)).astype(dtype))
        )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unbatched_equals_batch_of_one(reduction, rng):
    x, _, w = random_problem(rng, (1, 6), np.float32)
    for target in range(6):
        assert_bitwise(
            nll_loss(x[0], np.array(target), weight=w, reduction=reduction),
            nll_loss(x, np.array([target]), weight=w, reduction=reduction),
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_memory_layout_does_not_matter(reduction, rng):
    """Transposed, strided and Fortran-ordered arrays give the bits of their contiguous copies."""
    base = (-np.abs(rng.standard_normal((6, 4, 5, 8)))).astype(np.float32)
    views = {
        "transposed": np.transpose(
            np.ascontiguousarray(np.transpose(base, (3, 2, 1, 0))), (3, 2, 1, 0)
        ),
        "strided": np.repeat(base, 2, axis=3)[..., ::2],
        "fortran": np.asfortranarray(base),
    }
    t = rng.integers(0, 4, (6, 5, 8))
    t[0, 0] = -100
    t_view = np.asfortranarray(t)
    w = rng.uniform(0.5, 1.5, 8)[::2].astype(np.float32)
    expected = nll_loss(base, t, weight=w, reduction=reduction)
    expected_grad = nll_loss_backward(
        np.ones(expected.shape, np.float32), base, t, weight=w, reduction=reduction
    )
    for name, view in views.items():
        assert not view.flags.c_contiguous, name
        np.testing.assert_array_equal(view, base)
        assert_bitwise(nll_loss(view, t_view, weight=w, reduction=reduction), expected)
        grad = nll_loss_backward(
            np.ones(expected.shape, np.float32), view, t_view, weight=w, reduction=reduction
        )
        assert_bitwise(grad, expected_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inputs_are_not_modified_and_outputs_are_fresh(reduction, rng):
    x, t, w = random_problem(rng, (50, 4, 3), np.float32)
    copies = [a.copy() for a in (x, t, w)]
    for a in (x, t, w):
        a.flags.writeable = False  # any attempt to write raises
    loss = nll_loss(x, t, weight=w, reduction=reduction)
    go = np.ones(loss.shape, np.float32)
    grad = nll_loss_backward(go, x, t, weight=w, reduction=reduction)
    for a, c in zip((x, t, w), copies, strict=True):
        assert_bitwise(a, c)
    for out in (loss, grad):
        assert out.flags.writeable
        for a in (x, t, w, go):
            assert not np.shares_memory(out, a)


def test_same_inputs_same_bits(rng):
    x, t, w = random_problem(rng, (5000, 11), np.float32)
    first = [nll_loss(x, t, weight=w, reduction=r) for r in REDUCTIONS]
    second = [nll_loss(x.copy(), t.copy(), weight=w.copy(), reduction=r) for r in REDUCTIONS]
    for a, b in zip(first, second, strict=True):
        assert_bitwise(a, b)


def test_module_equals_function(rng):
    x, t, w = random_problem(rng, (40, 6, 2), np.float64)
    t[t == -100] = 3
    for reduction in REDUCTIONS:
        loss = NLLLoss(weight=w, ignore_index=3, reduction=reduction)
        assert_bitwise(loss(x, t), nll_loss(x, t, weight=w, ignore_index=3, reduction=reduction))
        assert_bitwise(loss.forward(x, t), loss(x, t))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_is_linear_in_grad_output(dtype, rng):
    """nll_loss_backward(g) equals g times nll_loss_backward(1) when g is a power of two."""
    x, t, w = random_problem(rng, (64, 5), dtype)
    for reduction in ("mean", "sum"):
        unit = nll_loss_backward(1.0, x, t, weight=w, reduction=reduction)
        assert_bitwise(
            nll_loss_backward(4.0, x, t, weight=w, reduction=reduction),
            (unit * dtype.type(4)).astype(dtype),
        )

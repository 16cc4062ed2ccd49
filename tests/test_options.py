"""from_logits, label_smoothing, total_weight, out= and nll_loss_and_grad.

Oracles: torch's ``cross_entropy`` (and its autograd) for logits, the formula of ATen's
``cross_entropy_loss_label_smoothing`` written with torch operations for log-probability
input, and a float64 NumPy reference written here from the formula alone.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BFLOAT16, EXACT_DTYPES, FLOAT_DTYPES, assert_bitwise, to_torch
from hypothesis import given
from hypothesis import strategies as st

from nllloss import NLLLoss, nll_loss, nll_loss_and_grad, nll_loss_backward, total_weight


def reference(x, t, w, ignore_index, reduction, smoothing, from_logits, total=None):
    """The loss in float64 from its definition (class axis 1; unbatched input reduced)."""
    x = np.asarray(x, dtype=np.float64)
    unbatched = x.ndim == 1
    if unbatched:
        x, t = x[None], np.reshape(t, (1,))
    classes = x.shape[1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, classes)
    flat = np.asarray(t).reshape(-1).astype(np.int64)
    if from_logits and classes:
        top = rows.max(axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):
            rows = rows - (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))
    weight = np.ones(classes) if w is None else np.asarray(w, dtype=np.float64)
    valid = flat != ignore_index
    safe = np.where(valid, flat, 0)
    with np.errstate(invalid="ignore"):
        nll = np.where(valid, -weight[safe] * rows[np.arange(len(flat)), safe], 0.0)
        smooth = np.where(valid, -(rows * weight).sum(axis=1), 0.0)
        if reduction == "none" and not unbatched:
            out = (1 - smoothing) * nll + smoothing / classes * smooth
            return out.reshape(np.asarray(t).shape)
        combined = (1 - smoothing) * nll.sum() + smoothing / classes * smooth.sum()
        if reduction == "mean":
            denominator = np.where(valid, weight[safe], 0.0).sum() if total is None else total
            return combined / denominator
        return combined


def torch_formula(x, t, w, ignore_index, reduction, smoothing, from_logits):
    """torch's loss: ``cross_entropy`` for logits; for log-probabilities, ATen's formula of
    ``cross_entropy_loss_label_smoothing`` without its ``log_softmax``."""
    if from_logits:
        return F.cross_entropy(
            x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=smoothing,
        )  # fmt: skip
    nll = F.nll_loss(x, t, weight=w, ignore_index=ignore_index, reduction=reduction)
    if not smoothing:
        return nll
    class_dim = 0 if x.dim() == 1 else 1
    if w is not None:
        shape = [1] * x.dim()
        shape[class_dim] = -1
        smooth = -(x * w.view(shape)).sum(class_dim)
    else:
        smooth = -x.sum(class_dim)
    ignored = t == ignore_index
    smooth = smooth.masked_fill(ignored, 0.0)
    if reduction == "mean":
        if w is not None:
            ret = smooth.sum() / w.gather(0, t.masked_select(~ignored).flatten()).sum()
        else:
            ret = smooth.sum() / (~ignored).sum()
    elif reduction == "sum":
        ret = smooth.sum()
    else:
        ret = smooth
    return (1 - smoothing) * nll + ret * (smoothing / x.shape[class_dim])


def problem(rng, shape, dtype=np.float32, weighted=True, ignored=0.25, scale=3.0):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = rng.integers(0, classes, t_shape)
    if t_shape:
        t[rng.random(t_shape) < ignored] = -100
    w = rng.uniform(0.2, 2.0, classes).astype(dtype) if weighted else None
    return x, t, w


def tolerance(dtype):
    return {
        np.dtype(np.float64): 1e-12,
        np.dtype(np.float32): 2e-6,
        np.dtype(np.float16): 4e-3,
        BFLOAT16: 3e-2,
    }[np.dtype(dtype)]


def assert_close(actual, expected, dtype, scale=1.0):
    actual = np.asarray(actual, dtype=np.float64)
    with np.errstate(over="ignore"):  # beyond the dtype's range the result is inf
        expected = np.asarray(expected).astype(dtype).astype(np.float64)
    assert actual.shape == expected.shape
    rtol = tolerance(dtype)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


SHAPES = [(5,), (9, 6), (4, 5, 3), (3, 4, 2, 3), (0, 4), (6, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_forward_and_gradient_match_torch(shape, reduction, smoothing, from_logits, weighted, rng):
    for dtype in EXACT_DTYPES:
        x, t, w = problem(rng, shape, dtype, weighted)
        if not from_logits and len(shape) > 0 and shape[0]:  # log-probabilities
            x = np.asarray(torch.log_softmax(to_torch(x), dim=0 if len(shape) == 1 else 1))
        options = {"from_logits": from_logits, "label_smoothing": smoothing}
        loss = nll_loss(x, t, weight=w, reduction=reduction, **options)
        xt = to_torch(x).requires_grad_()
        wt = None if w is None else to_torch(w)
        expected = torch_formula(
            xt, torch.from_numpy(t), wt, -100, reduction, smoothing, from_logits
        )
        assert loss.dtype == x.dtype
        assert_close(loss, expected.detach().numpy(), dtype, scale=10)
        assert_close(
            loss, reference(x, t, w, -100, reduction, smoothing, from_logits), dtype, scale=10
        )
        if expected.requires_grad:
            g = np.asarray(np.random.default_rng(1).uniform(0.5, 1.5, expected.shape), dtype)
            expected.backward(torch.from_numpy(g))
            grad = nll_loss_backward(g, x, t, weight=w, reduction=reduction, **options)
            assert grad.dtype == x.dtype
            assert grad.shape == x.shape
            assert_close(grad, xt.grad.numpy(), dtype, scale=1)


def test_log_probability_input_equals_cross_entropy(rng):
    """On normalised log-probabilities, label smoothing equals cross_entropy of them."""
    x, t, w = problem(rng, (50, 7))
    log_probs = torch.log_softmax(torch.from_numpy(x).double(), dim=1)
    for weight in (None, torch.from_numpy(w).double()):
        for reduction in ("none", "mean", "sum"):
            expected = F.cross_entropy(
                log_probs, torch.from_numpy(t), weight=weight, reduction=reduction,
                label_smoothing=0.3,
            )  # fmt: skip
            ours = nll_loss(
                log_probs.numpy(), t, weight=None if weight is None else weight.numpy(),
                reduction=reduction, label_smoothing=0.3,
            )  # fmt: skip
            np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-13)


@st.composite
def cases(draw):
    rank = draw(st.sampled_from([1, 2, 2, 3, 4]))
    classes = draw(st.integers(1, 40))
    batch = draw(st.integers(0, 12))
    spatial = tuple(
        draw(st.lists(st.integers(1, 4), min_size=max(rank - 2, 0), max_size=max(rank - 2, 0)))
    )
    shape = (classes,) if rank == 1 else (batch, classes, *spatial)
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
        "reduction": draw(st.sampled_from(["none", "mean", "sum"])),
        # every value taken: 0, or at least 2**-64 (smaller ones are refused)
        "smoothing": draw(
            st.sampled_from([0.0, 2.0**-64, 0.05, 0.5, 1.0]) | st.floats(2.0**-64, 1.0)
        ),
        "from_logits": draw(st.booleans()),
        "weighted": draw(st.booleans()),
        "ignored": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "ignore_index": draw(st.sampled_from([-100, 0, 2])),
        "scale": draw(st.sampled_from([0.1, 3.0, 1e4])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@given(cases())
def test_hypothesis_against_torch_and_float64(case):
    rng = np.random.default_rng(case["seed"])
    dtype = case["dtype"]
    x, t, w = problem(
        rng, case["shape"], np.float64, case["weighted"], case["ignored"], case["scale"]
    )
    ignore_index = case["ignore_index"]
    if t.ndim:
        t[t == -100] = ignore_index
    if not case["from_logits"] and x.size:
        x = np.asarray(torch.log_softmax(torch.from_numpy(x), dim=0 if x.ndim == 1 else 1))
    x = x.astype(dtype)
    w = None if w is None else w.astype(dtype)
    kwargs = {
        "weight": w, "ignore_index": ignore_index, "reduction": case["reduction"],
        "from_logits": case["from_logits"], "label_smoothing": case["smoothing"],
    }  # fmt: skip
    loss = nll_loss(x, t, **kwargs)
    assert loss.dtype == x.dtype
    args = (ignore_index, case["reduction"], case["smoothing"], case["from_logits"])
    exact = reference(x, t, w, *args)
    # log-probabilities are as large as the logits' spread: errors scale with it
    scale = max(1.0, float(np.abs(x.astype(np.float64)).max(initial=0.0)))
    if x.ndim > 1 and case["reduction"] == "sum":
        scale *= max(1, t.size)
    assert_close(loss, exact, dtype, scale=scale)
    if dtype in EXACT_DTYPES:
        xt = to_torch(x)
        wt = None if w is None else to_torch(w)
        expected = torch_formula(xt, torch.from_numpy(t), wt, *args)
        assert_close(loss, expected.numpy(), dtype, scale=scale)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sixteen_bit_inputs_accumulate_in_float32(dtype, rng):
    x, t, w = problem(rng, (300, 11), np.float32)
    x, w = x.astype(dtype), w.astype(dtype)
    for reduction in ("mean", "sum", "none"):
        loss = nll_loss(x, t, weight=w, reduction=reduction, from_logits=True, label_smoothing=0.1)
        exact = reference(x, t, w, -100, reduction, 0.1, True)
        assert loss.dtype == dtype
        assert_close(loss, exact, dtype, scale=1)


def test_extreme_logits(rng):
    """No overflow at +-1e4; -inf allowed where the target is not (inf with smoothing)."""
    x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, -np.inf, 1.0]], dtype=np.float32)
    t = np.array([0, 2, 2])
    for smoothing in (0.0, 0.2):
        for reduction in ("none", "sum"):
            loss = nll_loss(x, t, reduction=reduction, from_logits=True, label_smoothing=smoothing)
            expected = F.cross_entropy(
                torch.from_numpy(x), torch.from_numpy(t), reduction=reduction,
                label_smoothing=smoothing,
            ).numpy()  # fmt: skip
            np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert np.isinf(nll_loss(x, t, from_logits=True, label_smoothing=0.2))
    assert np.isfinite(nll_loss(x, t, from_logits=True))
    logits = torch.from_numpy(x).requires_grad_()
    F.cross_entropy(logits, torch.from_numpy(t)).backward()
    grad = nll_loss_backward(1.0, x, t, from_logits=True)
    np.testing.assert_allclose(grad, logits.grad.numpy(), rtol=1e-6, atol=1e-7)
    assert grad[2, 1] == 0


def test_nothing_from_ignored_rows(rng):
    x, t, w = problem(rng, (8, 5), weighted=True, ignored=0.0)
    t[3] = -100
    x[3] = np.nan
    for options in (
        {"from_logits": True},
        {"label_smoothing": 0.3},
        {"from_logits": True, "label_smoothing": 1.0},
    ):
        loss = nll_loss(x, t, weight=w, **options)
        assert np.isfinite(loss)
        grad = nll_loss_backward(1.0, x, t, weight=w, **options)
        assert np.all(grad[3] == 0)
        assert np.all(np.isfinite(grad))


# total_weight ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_own_total_weight_gives_the_same_bits(dtype, weighted, rng):
    for shape in [(70000, 3), (40, 6), (5, 4, 7)]:
        x, t, w = problem(rng, shape, dtype, weighted)
        total = total_weight(t, w, -100)
        for options in ({}, {"from_logits": True, "label_smoothing": 0.1}):
            assert_bitwise(
                nll_loss(x, t, w, total_weight=total, **options), nll_loss(x, t, w, **options)
            )
            assert_bitwise(
                nll_loss_backward(0.7, x, t, w, total_weight=total, **options),
                nll_loss_backward(0.7, x, t, w, **options),
            )


def test_total_weight_values_and_dtypes(rng):
    t = np.array([[0, 2], [-100, 2]])
    assert total_weight(t).dtype.kind == "i"
    assert total_weight(t) == 3
    assert total_weight(t, ignore_index=2) == 2
    w = np.array([0.5, 3.0, 0.25], dtype=np.float32)
    assert total_weight(t, w).dtype == np.float32
    assert total_weight(t, w) == np.float32(1.0)
    assert total_weight(t, w.astype(np.float16)).dtype == np.float32
    assert total_weight([1, 1, -100], [1.0, 2.0]) == 4.0
    assert total_weight(np.array([], dtype=np.int64), w) == 0
    with pytest.raises(IndexError, match=r"Target 3 is out of bounds: target\[1\] = 3"):
        total_weight(np.array([0, 3]), w)
    with pytest.raises(TypeError, match="integer dtype"):
        total_weight(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="weight tensor should be defined"):
        total_weight(t, np.ones((2, 3)))


@pytest.mark.parametrize("pieces", [2, 3, 7])
@pytest.mark.parametrize("options", [{}, {"from_logits": True, "label_smoothing": 0.1}])
def test_pieces_with_the_global_total_weight_add_up_to_the_batch(pieces, options, rng):
    x, t, w = problem(rng, (60, 5, 2), np.float64, ignored=0.4)
    t[:10] = -100  # the first piece is all ignored
    total = total_weight(t, w)
    whole = nll_loss(x, t, w, **options)
    whole_grad = nll_loss_backward(1.0, x, t, w, **options)
    cuts = np.linspace(0, 60, pieces + 1).astype(int)
    cuts[1] = 10
    losses, grads = [], []
    for lo, hi in itertools.pairwise(cuts):
        loss, grad = nll_loss_and_grad(x[lo:hi], t[lo:hi], w, total_weight=total, **options)
        losses.append(loss)
        grads.append(grad)
    assert losses[0] == 0
    assert np.all(grads[0] == 0)
    np.testing.assert_allclose(sum(losses), whole, rtol=1e-14)
    np.testing.assert_allclose(np.concatenate(grads), whole_grad, rtol=1e-14, atol=1e-17)
    if not options:  # the gradient depends on each element alone: the same bits
        assert_bitwise(np.concatenate(grads), whole_grad)


def test_total_weight_forms_and_errors(rng):
    x, t, w = problem(rng, (6, 4))
    expected = reference(x, t, w, -100, "mean", 0.0, False, total=2.5)
    for total in (2.5, np.float64(2.5), np.array(2.5), np.array([2.5], dtype=np.float32)):
        assert_close(nll_loss(x, t, w, total_weight=total), expected, np.float32)
    assert np.isnan(nll_loss(x[:0], t[:0], total_weight=0))
    assert nll_loss(x[:0], t[:0], total_weight=4) == 0
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="total_weight is the denominator of reduction='mean'"):
            nll_loss(x, t, reduction=reduction, total_weight=3.0)
    with pytest.raises(TypeError, match="total_weight must be a real number"):
        nll_loss(x, t, total_weight=True)
    with pytest.raises(TypeError, match="total_weight must be a real number"):
        nll_loss(x, t, total_weight="3")
    with pytest.raises(ValueError, match=r"total_weight must be a scalar .* got shape \(2,\)"):
        nll_loss(x, t, total_weight=np.ones(2))


def test_option_errors(rng):
    x, t, _ = problem(rng, (3, 4))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing must be between 0\.0 and 1\.0"):
            nll_loss(x, t, label_smoothing=bad)
    for bad in ("0.1", None, True):
        with pytest.raises(TypeError, match="label_smoothing must be a real number"):
            nll_loss(x, t, label_smoothing=bad)
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="from_logits must be True or False"):
            nll_loss(x, t, from_logits=bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        NLLLoss(label_smoothing=2.0)
    with pytest.raises(TypeError, match="positional"):
        nll_loss(x, t, None, None, -100, None, "mean", True)


# out= and nll_loss_and_grad ----------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"from_logits": True}, {"label_smoothing": 0.2}])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_grad_equal_the_separate_calls(options, reduction, rng):
    x, t, w = problem(rng, (40, 6, 3))
    g = rng.uniform(0.5, 1.5, t.shape).astype(np.float32) if reduction == "none" else 0.5
    loss, grad = nll_loss_and_grad(x, t, w, reduction=reduction, grad_output=g, **options)
    assert_bitwise(loss, nll_loss(x, t, w, reduction=reduction, **options))
    assert_bitwise(grad, nll_loss_backward(g, x, t, w, reduction=reduction, **options))
    out = np.full_like(x, np.nan)
    assert nll_loss_backward(g, x, t, w, reduction=reduction, out=out, **options) is out
    assert_bitwise(out, grad)
    logits = x.copy()
    loss2, grad2 = nll_loss_and_grad(
        logits, t, w, reduction=reduction, grad_output=g, out=logits, **options
    )
    assert grad2 is logits
    assert_bitwise(loss2, loss)
    assert_bitwise(grad2, grad)


def test_out_errors(rng):
    x, t, _ = problem(rng, (4, 3))
    with pytest.raises(
        ValueError, match=r"out must have the input's shape \(4, 3\) and dtype float32"
    ):
        nll_loss_backward(1.0, x, t, out=np.empty((4, 3)))
    with pytest.raises(ValueError, match="C-contiguous"):
        nll_loss_backward(1.0, x, t, out=np.empty((3, 4), np.float32).T)
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        nll_loss_backward(1.0, x, t, out=[0.0] * 12)
    with pytest.raises(TypeError, match="NumPy input only"):
        nll_loss_backward(1.0, torch.from_numpy(x), torch.from_numpy(t), out=np.empty_like(x))


def test_module_options(rng):
    x, t, w = problem(rng, (10, 4))
    module = NLLLoss(weight=w, from_logits=True, label_smoothing=0.25)
    assert (
        repr(module)
        == "NLLLoss(weight=<(4,)>, reduction='mean', from_logits=True, label_smoothing=0.25)"
    )
    assert_bitwise(module(x, t), nll_loss(x, t, w, from_logits=True, label_smoothing=0.25))
    assert_bitwise(
        module(x, t, total_weight=3.0),
        nll_loss(x, t, w, from_logits=True, label_smoothing=0.25, total_weight=3.0),
    )


def test_inputs_are_not_modified(rng):
    x, t, w = problem(rng, (30, 5, 2))
    copies = [a.copy() for a in (x, t, w)]
    nll_loss_and_grad(x, t, w, from_logits=True, label_smoothing=0.1)
    nll_loss_backward(1.0, x, t, w, label_smoothing=0.1, total_weight=np.array(4.0))
    for before, after in zip(copies, (x, t, w), strict=True):
        assert_bitwise(after, before)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_zero_total_weight_with_smoothing_is_nan_or_inf_as_torch(from_logits, smoothing):
    """'mean' over a total weight of 0 divides each term by 0, as torch: 0/0 is NaN."""
    x = torch.log_softmax(torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]]), 1)
    t = torch.tensor([1, 1])
    for weight in ([2.0, 0.0, 1.0], [0.5, -1.0, 0.5], [1.0, 1.0, -1.0]):
        w = torch.tensor(weight)
        expected = F.cross_entropy(x.double(), t, weight=w.double(), label_smoothing=smoothing)
        if from_logits:
            expected = F.cross_entropy(x, t, weight=w, label_smoothing=smoothing)
        ours = nll_loss(
            x.numpy(), t.numpy(), w.numpy(), from_logits=from_logits, label_smoothing=smoothing
        )
        if np.isfinite(expected.item()):
            np.testing.assert_allclose(ours, expected.item(), rtol=1e-6)
        else:
            assert_bitwise(ours.astype(np.float64), np.float64(expected.item()))

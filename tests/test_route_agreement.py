"""Inputs on which one route once gave a different answer from the others.

Each case runs on every library that can hold its arrays (NumPy, under both NumPy engines,
and the backends of ``NLLLOSS_TEST_BACKENDS``) and must end in torch 2.13's answer or in
the same clear exception everywhere: a wrong number on one route is what these guard.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_backends import BACKENDS, to_backend, to_numpy

import nllloss

LIBRARIES = ["numpy", *sorted(BACKENDS)]


@pytest.fixture(params=LIBRARIES)
def library(request) -> str:
    return request.param


def on(library: str, array):
    """``array`` (NumPy) in ``library``; Dask in chunks of two along every axis."""
    if library == "numpy" or array is None:
        return array
    if library == "dask":
        return BACKENDS["dask"].from_array(np.asarray(array), chunks=2)
    return to_backend(library, array)


UNSIGNED = [np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("dtype", UNSIGNED)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_an_unsigned_target_out_of_range_raises(library, dtype, reduction, from_logits):
    """Row 1's target 7 of 3 classes is an error on every route, also where the default
    ignore_index (-100) cannot be compared with an unsigned dtype (a Dask graph once
    dropped the check, and row 1 read another row's value)."""
    x = np.log(np.full((4, 3), 1 / 3))
    t = np.array([0, 7, 2, 1], dtype)
    with pytest.raises(IndexError, match=r"target\[1\] = 7 is not in the class range \[0, 3\)"):
        to_numpy(
            nllloss.nll_loss(on(library, x), on(library, t), reduction=reduction,
                             from_logits=from_logits)
        )  # fmt: skip


def test_a_uint64_target_beyond_int64_is_never_ignore_index(library):
    """2**64 - 100 is not -100: read as int64 it would wrap onto the default ignore_index
    and be silently ignored."""
    x = np.log(np.full((4, 3), 1 / 3, np.float32))
    t = np.array([0, 2**64 - 100, 2, 1], np.uint64)
    with pytest.raises(IndexError, match=r"target\[1\] = 18446744073709551516"):
        to_numpy(nllloss.nll_loss(on(library, x), on(library, t)))


@pytest.mark.parametrize("dtype", UNSIGNED)
def test_total_weight_of_unsigned_targets(library, dtype):
    """Counted as the loss counts them: every element but ignore_index (3 of 4 here)."""
    t = np.array([0, np.iinfo(dtype).max, 2, 1], dtype)
    total = nllloss.total_weight(on(library, t), ignore_index=1)
    assert float(to_numpy(total)) == 3.0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("spatial", [(), (3,)], ids=["2-d", "k-dim"])
def test_a_non_finite_weight_of_a_class_no_target_uses(library, value, reduction, spatial, rng):
    """From logits, class 2 (weight NaN or ±inf) is nobody's target: the loss and the
    gradient are torch's, finite (the smoothing-free gradient never reads that weight)."""
    x = rng.standard_normal((5, 4, *spatial))
    t = rng.choice([0, 1, 3], size=(5, *spatial))
    w = np.array([1.0, 0.5, value, 2.0])
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    expected = F.cross_entropy(xt, torch.from_numpy(t), torch.from_numpy(w), reduction=reduction)
    upstream = rng.standard_normal(expected.shape)
    expected.backward(torch.from_numpy(upstream))
    assert torch.isfinite(xt.grad).all()

    args = on(library, x), on(library, t), on(library, w)
    kwargs = dict(reduction=reduction, from_logits=True)
    loss = nllloss.nll_loss(*args, **kwargs)
    grad = nllloss.nll_loss_backward(on(library, upstream), *args, **kwargs)
    np.testing.assert_allclose(to_numpy(loss), expected.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), xt.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "options",
    [{}, {"from_logits": True}, {"label_smoothing": 0.2}, {"from_logits": True,
                                                         "label_smoothing": 0.2}],
    ids=["plain", "from_logits", "smoothing", "from_logits+smoothing"],
)  # fmt: skip
@pytest.mark.parametrize("batch", [0, 2])
def test_no_classes_at_all(library, reduction, options, batch):
    """C = 0 with a (0,) weight: torch's loss (NaN for 'mean' and with smoothing's ε/C) and
    an empty gradient, never an internal 'index 0 is out of bounds' or a division error."""
    x = np.zeros((batch, 0))
    t = np.full(batch, -100)
    w = np.zeros(0)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    # With no class, log_softmax changes nothing: cross_entropy is torch's smoothed loss of
    # log-probabilities too.
    smoothed = "label_smoothing" in options
    reference = F.cross_entropy if options.get("from_logits") or smoothed else F.nll_loss
    expected = reference(
        xt, torch.from_numpy(t), torch.from_numpy(w), reduction=reduction,
        **({"label_smoothing": options["label_smoothing"]} if smoothed else {}),
    )  # fmt: skip
    expected.sum().backward()

    args = on(library, x), on(library, t), on(library, w)
    loss = nllloss.nll_loss(*args, reduction=reduction, **options)
    grad = nllloss.nll_loss_backward(
        on(library, np.ones(expected.shape)), *args, reduction=reduction, **options
    )
    np.testing.assert_array_equal(to_numpy(loss), expected.detach().numpy())
    assert to_numpy(grad).shape == (batch, 0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize(
    "shape", [(0, 3), (0, 3, 2), (2, 3, 0), (2, 3, 0, 4), (0, 1, 0)], ids=str
)  # fmt: skip
def test_inputs_without_an_element(library, shape, reduction, from_logits):
    """No batch or an empty spatial axis: torch's empty loss, NaN or 0, and an empty
    gradient (Dask's reshape and reductions refuse some of these shapes)."""
    x = np.zeros(shape)
    t = np.zeros((shape[0], *shape[2:]), np.int64)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    expected = (F.cross_entropy if from_logits else F.nll_loss)(
        xt, torch.from_numpy(t), reduction=reduction
    )
    expected.sum().backward()
    options = dict(reduction=reduction, from_logits=from_logits)
    loss = nllloss.nll_loss(on(library, x), on(library, t), **options)
    grad = nllloss.nll_loss_backward(
        on(library, np.ones(expected.shape)), on(library, x), on(library, t), **options
    )
    np.testing.assert_array_equal(to_numpy(loss), expected.detach().numpy())
    np.testing.assert_array_equal(to_numpy(grad), xt.grad.numpy())


def test_a_grad_output_of_the_wrong_shape_is_refused(library):
    """'none' of (3, 4) has loss shape (3,): a (1, 1, 1) upstream gradient would broadcast
    to (1, 1, 3) deep inside; it is refused up front, naming grad_output."""
    x = np.log(np.full((3, 4), 0.25, np.float32))
    t = np.array([0, 1, 3])
    with pytest.raises(ValueError, match=r"grad_output must have the loss's shape \(3,\)"):
        nllloss.nll_loss_backward(
            on(library, np.ones((1, 1, 1), np.float32)), on(library, x), on(library, t),
            reduction="none",
        )  # fmt: skip


@pytest.mark.parametrize("from_logits", [False, True])
def test_an_unbatched_input_with_a_target_of_its_shape_is_torchs_value_error(library, from_logits):
    """An integer (C,) target of a (C,) input: torch's ValueError and its message, not a
    TypeError (a target of the input's shape could also be meant as probabilities)."""
    x, t = np.log(np.full(5, 0.2, np.float32)), np.arange(5)
    with pytest.raises(ValueError, match="For 1D input, 1D target must have size 1") as theirs:
        F.nll_loss(torch.from_numpy(x), torch.from_numpy(t))
    expected = str(theirs.value)  # For 1D input, 1D target must have size 1, but got ...: 5
    with pytest.raises(ValueError, match=expected):
        to_numpy(nllloss.nll_loss(on(library, x), on(library, t), from_logits=from_logits))
    if library in ("numpy", "torch", "jax"):  # the loss from hidden states of an unbatched h
        h, w = np.ones(2, np.float32), np.ones((5, 2), np.float32)
        with pytest.raises(ValueError, match=expected):
            nllloss.linear_cross_entropy(on(library, h), on(library, w), on(library, t))


# --- Dask: arrays of unknown chunk sizes ------------------------------------------------

DASK = [library for library in LIBRARIES if library == "dask"]


@pytest.mark.parametrize("library", DASK)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dask_arrays_selected_by_a_mask_give_torchs_loss_and_gradient(library, reduction):
    """Boolean indexing leaves Dask arrays of unknown chunk sizes (NaN) and empty chunks:
    the loss, its gradient, total_weight and the loss from hidden states are torch's on the
    selected rows, lazily, and the caller's arrays keep their unknown sizes."""
    dask = BACKENDS["dask"]
    rng = np.random.default_rng(15)
    x = rng.standard_normal((10, 4, 2))
    t = rng.integers(0, 4, (10, 2))
    t[2, 1] = -100
    p = rng.dirichlet(np.ones(4), (10, 2)).transpose(0, 2, 1)
    w = np.array([1.0, 2.0, 0.5, 1.5])
    keep = np.arange(10) % 3 != 0  # row 9 alone in its chunk of 3: an empty chunk
    mask = dask.from_array(keep, chunks=3)

    def selected(array):
        return dask.from_array(array, chunks=3)[mask]

    dx, dt, dp = selected(x), selected(t), selected(p)
    assert np.isnan(dx.shape[0])
    assert np.isnan(dt.shape[0])
    tx = torch.from_numpy(x[keep]).requires_grad_()
    for target, torch_target in ((dt, torch.from_numpy(t[keep])), (dp, torch.from_numpy(p[keep]))):
        expected = F.cross_entropy(
            tx, torch_target, weight=torch.from_numpy(w), reduction=reduction
        )
        upstream = torch.ones_like(expected)
        (expected_grad,) = torch.autograd.grad(expected, tx, upstream)
        loss = nllloss.nll_loss(dx, target, w, reduction=reduction, from_logits=True)
        grad = nllloss.nll_loss_backward(1.0, dx, target, w, reduction=reduction, from_logits=True)
        both = nllloss.nll_loss_and_grad(dx, target, w, reduction=reduction, from_logits=True)
        for result in (loss, grad, *both):
            assert isinstance(result, dask.Array)
        np.testing.assert_allclose(loss.compute(), expected.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(both[0].compute(), expected.detach().numpy(), rtol=1e-12)
        for gradient in (grad, both[1]):
            np.testing.assert_allclose(
                gradient.compute(), expected_grad.numpy(), rtol=1e-12, atol=1e-15
            )
    assert np.isnan(dx.shape[0])  # the caller's arrays keep their unknown sizes
    assert np.isnan(dt.shape[0])

    valid = t[keep] != -100
    assert nllloss.total_weight(dt, w).compute() == pytest.approx(w[t[keep][valid]].sum())

    h = rng.standard_normal((10, 3))
    layer = rng.standard_normal((4, 3))
    rows = t[:, 0]
    expected = F.cross_entropy(
        torch.from_numpy(h[keep] @ layer.T), torch.from_numpy(rows[keep]), reduction=reduction
    )
    loss = nllloss.linear_cross_entropy(
        selected(h), dask.from_array(layer), selected(rows), reduction=reduction
    )
    np.testing.assert_allclose(np.asarray(loss), expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize("library", DASK)
def test_dask_targets_selected_by_another_mask_name_both_sizes(library):
    """Input and target selected by masks of different counts: the batch sizes, computed,
    in the ValueError (not 'nan')."""
    dask = BACKENDS["dask"]
    keep = dask.from_array(np.arange(10) % 3 != 0, chunks=3)  # 6 rows
    x = dask.from_array(np.zeros((10, 4)), chunks=3)[keep]
    t = dask.from_array(np.zeros(10, np.int64), chunks=3)[~keep]  # 4 rows
    with pytest.raises(ValueError, match=r"batch_size \(6\) to match target batch_size \(4\)"):
        nllloss.nll_loss(x, t)


# --- NumPy only: array subclasses and the out= buffer -------------------------------------

X = np.log(np.full((4, 3), 1 / 3, np.float32))
T = np.array([0, 1, 2, 1])


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"input": np.matrix(X)}, TypeError, r"input is an np.matrix: pass np.asarray"),
        ({"input": np.ma.masked_array(X, mask=X < 0)}, TypeError, r"input is a masked array"),
        ({"target": np.ma.masked_array(T)}, TypeError, r"target is a masked array"),
        ({"weight": [None] * 3}, TypeError, r"weight must be a real number or a sequence"),
    ],
    ids=["matrix", "masked-input", "masked-target", "weight-of-None"],
)
def test_arrays_whose_meaning_would_be_lost_are_refused(arguments, error, message):
    call = {"input": X, "target": T, **arguments}
    with pytest.raises(error, match=message):
        nllloss.nll_loss(call.pop("input"), call.pop("target"), **call)


def test_out_that_partly_overlaps_the_input_is_refused():
    memory = np.zeros(13, np.float32)
    x = memory[:12].reshape(4, 3)
    x[...] = X
    before = memory.copy()
    with pytest.raises(ValueError, match=r"out overlaps input's memory.*out=input itself"):
        nllloss.nll_loss_and_grad(x, T, from_logits=True, out=memory[1:].reshape(4, 3))
    np.testing.assert_array_equal(memory, before)  # nothing written


def test_out_that_is_the_upstream_gradient_is_refused():
    out = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"out overlaps grad_output's memory"):
        nllloss.nll_loss_and_grad(X, T, reduction="none", grad_output=out[:, 0], out=out)


def _torch_gradients(h, w, t, b=None, **options):
    """torch 2.13's loss and gradients of cross_entropy(linear(h, w, b), t), as NumPy."""
    th, tw = torch.from_numpy(h.copy()), torch.from_numpy(w.copy()).requires_grad_()
    tb = None if b is None else torch.from_numpy(b.copy()).requires_grad_()
    th.requires_grad_()
    loss = F.cross_entropy(F.linear(th, tw, tb), torch.from_numpy(t), **options)
    loss.backward()
    grads = [th.grad.numpy(), tw.grad.numpy(), None if tb is None else tb.grad.numpy()]
    return loss.detach().numpy(), *grads


def _square_linear_case():
    """Hidden states, an output layer and targets with N == C == in_features, where the
    gradients of the input and of the layer have one shape."""
    rng = np.random.default_rng(21)
    h = rng.standard_normal((4, 4)).astype(np.float32)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    return h, w, np.array([0, 3, 1, 2])


def _overlapping_out_calls():
    """(name, call, the message's pattern): each call gives out= buffers that overlap each
    other or an argument still to be read, each of which once gave a wrong gradient."""
    h, w, t = _square_linear_case()
    shared = np.empty_like(h)
    class_weight = np.empty((4, 4), np.float32)
    class_weight[0] = [1.0, 2.0, 0.5, 1.0]
    layer_and_bias = np.empty(20, np.float32)
    layer_and_bias_out = (None, layer_and_bias[:16].reshape(4, 4), layer_and_bias[12:16])
    logits_and_target = np.empty((5, 3), np.float32)
    logits_and_target[:] = np.random.default_rng(3).dirichlet(np.ones(3), 5)
    x, p = logits_and_target[:4], logits_and_target[1:]  # p: x shifted by one row
    total = np.zeros((4, 3), np.float32)
    total[0, 0] = 4.0
    f = nllloss.linear_cross_entropy_and_grad
    return [
        (
            "linear-d_input-is-d_linear_weight",
            lambda: f(h, w, t, out=(shared, shared, None)),
            r"out's d_input and out's d_linear_weight overlap",
        ),
        (
            "linear-d_linear_weight-holds-the-class-weight",
            lambda: f(h, w, t, weight=class_weight[0], out=(None, class_weight, None)),
            r"out's d_linear_weight overlaps weight's memory",
        ),
        (
            "linear-d_linear_bias-inside-d_linear_weight",
            lambda: f(h, w, t, linear_bias=np.zeros(4, np.float32), out=layer_and_bias_out),
            r"out's d_linear_weight and out's d_linear_bias overlap",
        ),
        (
            "linear-d_linear_weight-is-linear_weight",
            lambda: f(h, w, t, out=(None, w, None)),
            r"out's d_linear_weight overlaps linear_weight's memory",
        ),
        (
            "linear-d_input-is-the-target-probabilities",
            lambda: f(h, w, shared, out=(shared, None, None)),
            r"out's d_input overlaps target's memory",
        ),
        (
            "and_grad-out-holds-the-class-weight",
            lambda: nllloss.nll_loss_and_grad(
                h, t, weight=class_weight[0], from_logits=True, out=class_weight
            ),
            r"out overlaps weight's memory",
        ),
        (
            "and_grad-out=input-with-the-target-shifted-by-a-row",
            lambda: nllloss.nll_loss_and_grad(x, p, from_logits=True, out=x),
            r"out overlaps target's memory.*pass a separate array as out",
        ),
        (
            "backward-out-holds-total_weight",
            lambda: nllloss.nll_loss_backward(
                1.0, x, np.array([0, 1, 2, 1]), total_weight=total[0, :1], out=total
            ),
            r"out overlaps total_weight's memory",
        ),
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [pytest.param(call, message, id=name) for name, call, message in _overlapping_out_calls()],
)
def test_out_buffers_that_overlap_each_other_or_an_argument_are_refused(call, message):
    """A ValueError naming both arrays, before anything is written."""
    with pytest.raises(ValueError, match=message):
        call()


def test_out_in_place_uses_stay_allowed_and_exact():
    """The documented in-place uses: out=input (the gradient overwrites the logits) and
    d_input=input; and buffers that interleave with an argument without sharing an element
    (a bias gradient in the row padding of the hidden states), which a bounds test would
    refuse. Against torch 2.13."""
    h, w, t = _square_linear_case()
    bias = np.array([0.5, -1.0, 0.0, 2.0], np.float32)
    loss, d_input, d_weight, d_bias = _torch_gradients(h, w, t, bias)

    padded = np.zeros((4, 8), np.float32)
    padded[:, :4] = h
    strided_h = padded[:, :4]  # rows 8 apart: padded[0, 4:] lies between two rows
    got = nllloss.linear_cross_entropy_and_grad(
        strided_h, w, t, linear_bias=bias, out=(None, None, padded[0, 4:])
    )
    np.testing.assert_allclose(got[0], loss, rtol=1e-6)
    np.testing.assert_allclose(padded[0, 4:], d_bias, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[2], d_weight, rtol=1e-5, atol=1e-7)

    overwritten = h.copy()
    got = nllloss.linear_cross_entropy_and_grad(
        overwritten, w, t, linear_bias=bias, out=(overwritten, None, None)
    )
    assert got[1] is overwritten
    np.testing.assert_allclose(overwritten, d_input, rtol=1e-5, atol=1e-7)

    logits = h @ w.T
    expected = torch.from_numpy(logits.copy()).requires_grad_()
    F.cross_entropy(expected, torch.from_numpy(t)).backward()
    loss, grad = nllloss.nll_loss_and_grad(logits, t, from_logits=True, out=logits)
    assert grad is logits
    np.testing.assert_allclose(logits, expected.grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("from_logits", [False, True])
def test_a_weight_that_requires_grad_is_refused_as_torch(from_logits):
    """torch's nll_loss and cross_entropy are not differentiable in the weight: torch raises
    rather than leave weight.grad None; so do we (a ValueError naming weight)."""
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    t = torch.tensor([0, 1, 2, 1])
    with pytest.raises(RuntimeError):
        (F.cross_entropy if from_logits else F.nll_loss)(x, t, w)
    with pytest.raises(ValueError, match=r"weight requires grad.*pass weight.detach\(\)"):
        nllloss.nll_loss(x, t, w, from_logits=from_logits)

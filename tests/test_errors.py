"""Bad input: the exception type and a message that names the argument, the expected and the actual.

Each row also runs the two other entry points (``nll_loss_backward`` and ``NLLLoss``) where
the argument exists there, so every path validates the same way.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from nllloss import NLLLoss, nll_loss, nll_loss_backward

X = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]], dtype=np.float32)
T = np.array([0, 2])

# id: (kwargs for nll_loss, exception, patterns that must all appear in the message)
CASES = {
    # reduction
    "reduction-unknown": (
        dict(input=X, target=T, reduction="avg"),
        ValueError,
        ["avg is not a valid value for reduction", "'none', 'mean' or 'sum'"],
    ),
    "reduction-None": (
        dict(input=X, target=T, reduction=None),
        ValueError,
        ["None is not a valid value for reduction"],
    ),
    "reduction-uppercase": (
        dict(input=X, target=T, reduction="MEAN"),
        ValueError,
        ["MEAN is not a valid"],
    ),
    "reduction-not-a-string": (
        dict(input=X, target=T, reduction=1),
        ValueError,
        ["1 is not a valid"],
    ),
    # ignore_index
    "ignore_index-float": (
        dict(input=X, target=T, ignore_index=0.0),
        TypeError,
        ["ignore_index must be an int", "float"],
    ),
    "ignore_index-bool": (
        dict(input=X, target=T, ignore_index=True),
        TypeError,
        ["ignore_index", "bool"],
    ),
    "ignore_index-string": (
        dict(input=X, target=T, ignore_index="-100"),
        TypeError,
        ["ignore_index", "str"],
    ),
    "ignore_index-float-array": (
        dict(input=X, target=T, ignore_index=np.array(1.0)),
        TypeError,
        ["ignore_index", "float64"],
    ),
    "ignore_index-overflow": (
        dict(input=X, target=T, ignore_index=2**63),
        ValueError,
        ["ignore_index must fit in int64", str(2**63)],
    ),
    "ignore_index-underflow": (
        dict(input=X, target=T, ignore_index=-(2**63) - 1),
        ValueError,
        ["int64"],
    ),
    # input
    "input-0d": (
        dict(input=np.float32(1.0), target=np.array(0)),
        ValueError,
        ["Expected 1 or more dimensions (got 0)", "(C,), (N, C)"],
    ),
    "input-int": (
        dict(input=X.astype(np.int64), target=T),
        TypeError,
        ["input", "floating", "int64"],
    ),
    "input-bool": (dict(input=X > 0, target=T), TypeError, ["input", "bool"]),
    "input-complex": (
        dict(input=X.astype(np.complex64), target=T),
        TypeError,
        ["input", "complex64"],
    ),
    "input-longdouble": (
        dict(input=X.astype(np.longdouble), target=T),
        TypeError,
        ["input", "float"],
    ),
    "input-strings": (
        dict(input=np.array([["a", "b"]]), target=np.array([0])),
        TypeError,
        ["input", "<U1"],
    ),
    # target dtype
    # a floating target holds class probabilities, of the input's shape
    "target-float": (
        dict(input=X, target=T.astype(np.float32)),
        TypeError,
        ["target", "integer dtype", "float32", "class probabilities", f"input's shape {X.shape}"],
    ),
    "target-float-of-neither-shape": (
        dict(input=X, target=np.zeros((2, 5), np.float32)),
        ValueError,
        ["class probabilities", f"input's shape {X.shape}", "(2, 5)"],
    ),
    "target-integer-of-the-input's-shape": (
        dict(input=X, target=np.zeros(X.shape, np.int64)),
        TypeError,
        ["class probabilities", str(X.shape), "must be floating", "int64", str(T.shape)],
    ),
    "target-bool": (dict(input=X, target=np.array([True, False])), TypeError, ["target", "bool"]),
    "target-complex": (
        dict(input=X, target=T.astype(np.complex128)),
        TypeError,
        ["target", "complex128"],
    ),
    # target shape
    "batch-mismatch": (
        dict(input=X, target=np.array([0, 1, 2])),
        ValueError,
        ["Expected input batch_size (2) to match target batch_size (3)", "(2, 3)", "(3,)"],
    ),
    "target-0d-for-2d": (
        dict(input=X, target=np.array(0)),
        ValueError,
        ["batch_size (2)", "batch_size (0)", "got ()"],
    ),
    "target-multi": (
        dict(input=X, target=np.array([[0], [2]])),
        ValueError,
        ["Expected target shape (2,)", "(2, 1)", "multi-target"],
    ),
    "target-spatial-3d": (
        dict(input=np.zeros((2, 3, 4), np.float32), target=np.zeros((2, 5), int)),
        ValueError,
        ["Expected target shape (2, 4)", "(2, 3, 4)", "got (2, 5)"],
    ),
    "target-rank-3d": (
        dict(input=np.zeros((2, 3, 4), np.float32), target=np.zeros(2, int)),
        ValueError,
        ["Expected target shape (2, 4)", "got (2,)"],
    ),
    "target-spatial-4d": (
        dict(input=np.zeros((2, 3, 4, 5), np.float32), target=np.zeros((2, 4, 6), int)),
        ValueError,
        ["(2, 4, 5)", "(2, 4, 6)", "(2, 3, 4, 5)"],
    ),
    "target-rank-4d": (
        dict(input=np.zeros((2, 3, 4, 5), np.float32), target=np.zeros((2, 20), int)),
        ValueError,
        ["(2, 4, 5)", "(2, 20)"],
    ),
    "unbatched-target-size": (
        dict(input=np.array([-1.0, -2.0, -3.0]), target=np.array([0, 1])),
        ValueError,
        ["For 1D input, 1D target must have size 1, but got target size: 2", "(3,)"],
    ),
    "unbatched-target-2d": (
        dict(input=np.array([-1.0, -2.0]), target=np.zeros((1, 1), int)),
        ValueError,
        ["unbatched", "(1, 1)"],
    ),
    # weight
    "weight-length": (
        dict(input=X, target=T, weight=np.ones(4, np.float32)),
        ValueError,
        ["weight", "all 3 classes", "(4,)", "expected shape (3,)"],
    ),
    "weight-2d": (
        dict(input=X, target=T, weight=np.ones((1, 3), np.float32)),
        ValueError,
        ["weight", "(1, 3)"],
    ),
    "weight-2d-for-4d-input": (
        dict(
            input=np.zeros((1, 3, 1, 1), np.float32),
            target=np.zeros((1, 1, 1), int),
            weight=np.ones((1, 3), np.float32),
        ),
        ValueError,
        ["weight", "(1, 3)"],
    ),
    "weight-0d": (
        dict(input=X, target=T, weight=np.float32(1.0)),
        ValueError,
        ["weight", "shape: ()"],
    ),
    "weight-int": (
        dict(input=X, target=T, weight=np.ones(3, np.int64)),
        TypeError,
        ["weight", "int64"],
    ),
    "weight-bool": (
        dict(input=X, target=T, weight=np.ones(3, bool)),
        TypeError,
        ["weight", "bool"],
    ),
    "weight-complex": (
        dict(input=X, target=T, weight=np.ones(3, np.complex64)),
        TypeError,
        ["weight", "complex"],
    ),
    # target values
    "target-too-large": (
        dict(input=X, target=np.array([3, 2])),
        IndexError,
        ["Target 3 is out of bounds", "target[0] = 3", "[0, 3)", "ignore_index (-100)"],
    ),
    "target-negative": (
        dict(input=X, target=np.array([0, -1])),
        IndexError,
        ["Target -1 is out of bounds", "target[1]"],
    ),
    "target-first-bad-is-named": (
        dict(input=X, target=np.array([7, 9])),
        IndexError,
        ["Target 7 ", "target[0]"],
    ),
    "target-bad-4d-position": (
        dict(
            input=np.zeros((2, 2, 2, 3), np.float32),
            target=np.array([[[0, 1, 0], [1, 0, 1]], [[0, 0, 0], [0, 5, 0]]]),
        ),
        IndexError,
        ["Target 5 is out of bounds", "target[1, 1, 1]", "[0, 2)"],
    ),
    "target-bad-none": (
        dict(input=X, target=np.array([0, 7]), reduction="none"),
        IndexError,
        ["Target 7"],
    ),
    "target-uint8-255": (
        dict(input=X, target=np.array([255, 1], np.uint8)),
        IndexError,
        ["Target 255"],
    ),
    "target-uint64-huge": (
        dict(input=X, target=np.array([2**64 - 1, 1], np.uint64)),
        IndexError,
        [f"Target {2**64 - 1} is out of bounds"],
    ),
    "target-bad-unbatched": (
        dict(input=np.array([-1.0, -2.0]), target=np.array(2)),
        IndexError,
        ["Target 2", "target[] = 2"],
    ),
    "target-any-with-no-classes": (
        dict(input=np.zeros((2, 0), np.float32), target=np.array([-100, 0])),
        IndexError,
        ["Target 0", "[0, 0)"],
    ),
    "ignore_index-does-not-excuse-others": (
        dict(input=X, target=np.array([1, 3]), ignore_index=1),
        IndexError,
        ["Target 3", "ignore_index (1)"],
    ),
}


def _check(call, exception, patterns):
    with pytest.raises(exception) as info:
        call()
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"


@pytest.mark.parametrize(("kwargs", "exception", "patterns"), CASES.values(), ids=CASES.keys())
def test_nll_loss_rejects(kwargs, exception, patterns):
    _check(lambda: nll_loss(**kwargs), exception, patterns)


@pytest.mark.parametrize(("kwargs", "exception", "patterns"), CASES.values(), ids=CASES.keys())
def test_backward_rejects(kwargs, exception, patterns):
    _check(lambda: nll_loss_backward(1.0, **kwargs), exception, patterns)


@pytest.mark.parametrize(("kwargs", "exception", "patterns"), CASES.values(), ids=CASES.keys())
def test_module_rejects_when_called(kwargs, exception, patterns):
    kwargs = dict(kwargs)
    data = kwargs.pop("input"), kwargs.pop("target")
    loss = NLLLoss(**kwargs)  # like torch, arguments are checked when the loss is computed
    _check(lambda: loss(*data), exception, patterns)


def test_module_keeps_an_invalid_reduction_until_called():
    loss = NLLLoss(reduction="avg")
    assert loss.reduction == "avg"
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        loss(X, T)


GRAD_CASES = {
    "none-wrong-shape": (
        np.ones(3, np.float32),
        "none",
        ValueError,
        ["grad_output", "(2,)", "(3,)"],
    ),
    "mean-vector": (
        np.ones(2, np.float32),
        "mean",
        ValueError,
        ["grad_output", "shape ()", "(2,)"],
    ),
    "complex": (np.complex64(1.0), "sum", TypeError, ["grad_output", "complex64"]),
    "bool": (np.array(True), "sum", TypeError, ["grad_output", "bool"]),
    "string": ("1.0", "sum", TypeError, ["grad_output", "<U3"]),
}


@pytest.mark.parametrize(
    ("grad_output", "reduction", "exception", "patterns"),
    GRAD_CASES.values(),
    ids=GRAD_CASES.keys(),
)
def test_backward_rejects_grad_output(grad_output, reduction, exception, patterns):
    _check(lambda: nll_loss_backward(grad_output, X, T, reduction=reduction), exception, patterns)


def test_messages_are_single_clear_sentences():
    """No message is empty, and none leaks a NumPy internals traceback as the main error."""
    for kwargs, exception, _ in CASES.values():
        with pytest.raises(exception) as info:
            nll_loss(**kwargs)
        assert info.value.__cause__ is None
        assert re.search(r"[a-z]", str(info.value))

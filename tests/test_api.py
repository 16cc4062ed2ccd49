"""The public surface: names, signatures, accepted argument forms, legacy arguments, warnings."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BFLOAT16, FLOAT_DTYPES, assert_bitwise, to_torch
from torch.nn import _reduction as torch_reduction

import nllloss
from nllloss import NLLLoss, nll_loss, nll_loss_backward

X = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]], dtype=np.float32)
T = np.array([0, 2])
W = np.array([0.2, 1.5, 0.7], dtype=np.float32)


def test_public_names():
    assert nllloss.__all__ == [
        "FallbackWarning",
        "LossAndStats",
        "NLLLoss",
        "TokenStats",
        "evaluate",
        "linear_cross_entropy",
        "linear_cross_entropy_and_grad",
        "linear_token_stats",
        "linear_token_stats_and_grad",
        "nll_loss",
        "nll_loss_and_grad",
        "nll_loss_backward",
        "set_num_threads",
        "token_stats",
        "token_stats_and_grad",
        "total_weight",
    ]
    public = {name for name in dir(nllloss) if not name.startswith("_")}
    assert public - {"__version__"} <= set(nllloss.__all__) | {
        name for name in public if inspect.ismodule(getattr(nllloss, name))
    }


def _positional(signature):
    return [(n, p.default) for n, p in signature.parameters.items() if p.kind != p.KEYWORD_ONLY]


def _keyword_only(signature):
    return [(n, p.default) for n, p in signature.parameters.items() if p.kind == p.KEYWORD_ONLY]


OPTIONS = [
    ("from_logits", False),
    ("label_smoothing", 0.0),
    ("total_weight", None),
    ("check_targets", True),
    ("z_loss", 0.0),
    ("softcap", None),
]


def test_signatures_match_torch():
    """torch's parameters in torch's order, then nllloss's options, keyword-only."""
    assert _positional(inspect.signature(nll_loss)) == _positional(inspect.signature(F.nll_loss))
    assert _keyword_only(inspect.signature(nll_loss)) == [
        *OPTIONS,
        ("return_lse", False),
        ("return_stats", False),
    ]
    module = inspect.signature(NLLLoss)
    assert _positional(module) == _positional(inspect.signature(torch.nn.NLLLoss))
    assert _keyword_only(module) == OPTIONS[:2] + OPTIONS[-2:]
    assert list(inspect.signature(NLLLoss.__call__).parameters) == [
        "self",
        "input",
        "target",
        "total_weight",
    ]
    backward = inspect.signature(nll_loss_backward)
    assert [name for name, _ in _positional(backward)] == [
        "grad_output",
        "input",
        "target",
        "weight",
        "ignore_index",
        "reduction",
    ]
    assert _keyword_only(backward) == [*OPTIONS, ("out", None)]


def test_import_loads_no_framework():
    code = (
        "import sys, nllloss, numpy as np;"
        "nllloss.nll_loss(np.zeros((2, 3)), np.array([0, 1]));"
        "frameworks = ('torch', 'jax', 'dask', 'cupy', 'paddle', 'ml_dtypes',"
        " 'array_api_strict');"
        "bad = [m for m in frameworks if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("size_average", [None, True, False, 0, 1, "yes", ""])
@pytest.mark.parametrize("reduce", [None, True, False, 0, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "avg"])
def test_legacy_arguments_follow_torch(size_average, reduce, reduction):
    legacy = size_average is not None or reduce is not None
    if not legacy and reduction == "avg":
        return  # not a legacy case: the bad-input matrix covers it
    with warnings.catch_warnings(record=True) as torch_warnings:
        warnings.simplefilter("always")
        expected = F.nll_loss(
            to_torch(X),
            torch.from_numpy(T),
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
        ).numpy()
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        actual = nll_loss(X, T, size_average=size_average, reduce=reduce, reduction=reduction)
    assert_bitwise(actual, expected)
    assert [str(w.message) for w in ours] == [str(w.message) for w in torch_warnings]
    assert [w.category for w in ours] == [UserWarning] * legacy
    if legacy:
        name = torch_reduction.legacy_get_string(size_average, reduce, emit_warning=False)
        assert f"reduction='{name}'" in str(ours[0].message)
        assert ours[0].filename == __file__  # the warning points at the caller's line


def test_module_resolves_legacy_arguments_once_at_construction():
    with pytest.warns(UserWarning, match="reduction='none'") as record:
        loss = NLLLoss(size_average=True, reduce=False)
    assert record[0].filename == __file__
    assert loss.reduction == "none"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loss(X, T).shape == (2,)


def test_elementwise_mean_is_a_deprecated_mean():
    with pytest.warns(UserWarning, match="elementwise_mean' is deprecated") as record:
        value = nll_loss(X, T, reduction="elementwise_mean")
    assert record[0].filename == __file__
    assert_bitwise(value, np.float32(1.75))


def test_module_attributes_and_repr():
    loss = NLLLoss(weight=W, ignore_index=1, reduction="sum")
    assert loss.weight is W
    assert loss.ignore_index == 1
    assert loss.reduction == "sum"
    assert repr(loss) == "NLLLoss(weight=<(3,)>, ignore_index=1, reduction='sum')"
    assert repr(NLLLoss()) == "NLLLoss(reduction='mean')"
    assert_bitwise(loss(X, T), nll_loss(X, T, weight=W, ignore_index=1, reduction="sum"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_result_is_an_ndarray_of_the_input_dtype(dtype, reduction):
    for x, t, shape in [
        (X, T, (2,)),
        (X[0], np.array(1), ()),
        (np.zeros((2, 3, 4, 5)), np.zeros((2, 4, 5), int), (2, 4, 5)),
    ]:
        out = nll_loss(x.astype(dtype), t, reduction=reduction)
        assert type(out) is np.ndarray
        assert out.dtype == dtype
        assert out.shape == (shape if reduction == "none" else ())
        grad = nll_loss_backward(np.ones(out.shape), x.astype(dtype), t, reduction=reduction)
        assert type(grad) is np.ndarray
        assert grad.dtype == dtype
        assert grad.shape == x.shape


@pytest.mark.parametrize(
    "target_dtype",
    [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.intp],
)
def test_every_integer_target_dtype_gives_the_int64_result(target_dtype):
    x = np.log(np.random.default_rng(0).dirichlet(np.ones(5), 40)).astype(np.float32)
    t = np.random.default_rng(1).integers(0, 5, 40)
    t[::7] = 3
    for reduction in ("none", "mean", "sum"):
        expected = nll_loss(x, t, ignore_index=3, reduction=reduction)
        assert_bitwise(
            nll_loss(x, t.astype(target_dtype), ignore_index=3, reduction=reduction), expected
        )


def test_an_ignore_index_outside_the_target_dtype_ignores_nothing():
    """uint8 targets never equal -100, so a 255 is a (bad) class index unless ignored (as torch)."""
    t = np.array([255, 1], np.uint8)
    assert_bitwise(nll_loss(X, t, ignore_index=255), np.float32(1.5))
    with pytest.raises(IndexError, match="Target 255"):
        nll_loss(X, t)


@pytest.mark.parametrize(
    "ignore_index", [1, np.int32(1), np.uint8(1), np.array(1), np.array(1, np.int8)]
)
def test_ignore_index_forms(ignore_index):
    assert_bitwise(nll_loss(X, np.array([1, 2]), ignore_index=ignore_index), np.float32(2.5))


def test_weight_of_another_float_dtype_is_used_in_the_input_dtype():
    for weight_dtype in (np.float16, np.float64, BFLOAT16):
        w = W.astype(weight_dtype)
        assert_bitwise(nll_loss(X, T, weight=w), nll_loss(X, T, weight=w.astype(np.float32)))
    assert_bitwise(
        nll_loss(X.astype(np.float64), T, weight=W),
        nll_loss(X.astype(np.float64), T, weight=W.astype(np.float64)),
    )


def test_sequences_are_accepted_as_arrays():
    """Python lists become NumPy arrays; a weight list is read in the input's dtype."""
    assert_bitwise(nll_loss(X.tolist(), [0, 2]), nll_loss(X.astype(np.float64), T))
    assert_bitwise(nll_loss(X, [0, 2], weight=[0.2, 1.5, 0.7]), nll_loss(X, T, weight=W))
    assert_bitwise(
        nll_loss(X, T, weight=[1, 2, 3]), nll_loss(X, T, weight=np.array([1, 2, 3], np.float32))
    )


@pytest.mark.parametrize(
    "grad_output", [2.0, 2, np.float32(2.0), np.array(2.0), np.array([2.0]), np.float16(2)]
)
def test_grad_output_forms_for_reduced_losses(grad_output):
    expected = nll_loss_backward(np.array(2.0, np.float32), X, T, weight=W)
    assert_bitwise(nll_loss_backward(grad_output, X, T, weight=W), expected)


def test_scalar_grad_output_broadcasts_for_none():
    expected = nll_loss_backward(np.full(2, 3.0, np.float32), X, T, weight=W, reduction="none")
    assert_bitwise(nll_loss_backward(3.0, X, T, weight=W, reduction="none"), expected)


def test_backward_reads_only_the_shape_of_the_input():
    noisy = np.full_like(X, np.nan)
    assert_bitwise(
        nll_loss_backward(1.0, noisy, T, weight=W), nll_loss_backward(1.0, X, T, weight=W)
    )


def test_arrays_of_two_libraries_are_refused_clearly():
    with pytest.raises(TypeError, match=r"target is a torch\.Tensor but input is a numpy\.ndarray"):
        nll_loss(X, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"weight is a numpy\.ndarray|weight is a torch"):
        nll_loss(X, T, weight=torch.ones(3))


THREADS_SCRIPT = """
import hashlib, sys, numpy as np, nllloss
nllloss.set_num_threads(int(sys.argv[1]))
rng = np.random.default_rng(7)
digest = hashlib.sha256()
for shape in [(300_000, 7), (4, 5, 96, 97)]:
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    t[rng.random(t.shape) < 0.2] = -100
    w = rng.uniform(0.1, 2, shape[1]).astype(np.float32)
    for reduction in ("none", "mean", "sum"):
        loss = nllloss.nll_loss(x, t, weight=w, reduction=reduction)
        grad = nllloss.nll_loss_backward(np.ones(loss.shape, np.float32), x, t, weight=w,
                                         reduction=reduction)
        digest.update(loss.tobytes())
        digest.update(grad.tobytes())
print(digest.hexdigest())
"""


def test_results_do_not_depend_on_the_thread_count():
    digests = {
        threads: subprocess.run(
            [sys.executable, "-c", THREADS_SCRIPT, str(threads)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "NUMBA_NUM_THREADS": "2"},
        ).stdout
        for threads in (1, 2)
    }
    assert digests[1] == digests[2]
    assert len(digests[1].strip()) == 64


def test_set_num_threads_rejects_bad_counts():
    with pytest.raises(ValueError, match="between 1 and NUMBA_NUM_THREADS"):
        nllloss.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        nllloss.set_num_threads(1.5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_native_byte_order_gives_the_native_result(reduction):
    big_x, big_t, big_w = X.astype(">f4"), T.astype(">i8"), W.astype(">f8")
    loss = nll_loss(big_x, big_t, weight=big_w, reduction=reduction)
    assert loss.dtype == big_x.dtype
    assert_bitwise(loss.astype(np.float32), nll_loss(X, T, weight=W, reduction=reduction))
    go = np.ones(loss.shape, np.float32)
    grad = nll_loss_backward(go, big_x, big_t, weight=big_w, reduction=reduction)
    assert grad.dtype == big_x.dtype
    assert_bitwise(
        grad.astype(np.float32), nll_loss_backward(go, X, T, weight=W, reduction=reduction)
    )


def test_huge_uint64_targets_never_match_a_negative_ignore_index():
    """2**64 - 1 is not -1: it is out of bounds, whatever an int64 cast would make of it."""
    t = np.array([1, 2**64 - 1, 0], np.uint64)
    for call in (
        lambda: nll_loss(X[[0, 1, 0]], t, ignore_index=-1),
        lambda: nll_loss_backward(1.0, X[[0, 1, 0]], t, ignore_index=-1),
    ):
        with pytest.raises(IndexError, match=f"Target {2**64 - 1} is out of bounds.*target\\[1\\]"):
            call()

"""The rules several routes share, written once (``nllloss._problem``) and used by them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nllloss import _problem
from nllloss._builder import build
from nllloss._cli import _evaluate


def _problem_of(target, weight=None, **options):
    x = np.zeros((4, 3), dtype=np.float32)
    return build(x, target, weight, -100, "mean", options)[1]


def test_the_denominator_takes_the_routes_conversion_of_total_weight():
    """``given`` converts ``total_weight`` only; the count and the weight sum are the
    route's callables, called only when the rule needs them."""
    problem = _problem_of(np.array([0, 2, -100, 1]), total_weight=np.float64(2.5))
    assert problem.denominator(given=lambda total: float(total) * 2) == 5.0
    unweighted = _problem_of(np.array([0, 2, -100, 1]))
    assert unweighted.denominator(count=lambda: 3, weight_sum=None) == 3
    weighted = _problem_of(np.array([0, 2, -100, 1]), np.array([1.0, 2.0, 4.0]))
    assert weighted.denominator(count=None, weight_sum=lambda: 7.0) == 7.0
    probabilities = _problem_of(np.full((4, 3), 1 / 3))
    assert probabilities.denominator() == 4.0


@pytest.mark.parametrize(
    "dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.int16, np.uint16]
)
def test_the_cli_widens_as_the_core_computes(dtype):
    """The CLI's compute dtype is the core's 16-bit rule: float16 and bfloat16 widen to
    float32, nothing else does (2-byte integers are no 16-bit floats)."""
    dtype = np.dtype(dtype)
    widened = _problem.computes_in_float32(dtype)
    assert _evaluate.compute_dtype(dtype) == (np.dtype(np.float32) if widened else dtype)


def test_the_weight_as_used_is_in_the_inputs_dtype():
    weight = np.array([0.1, 0.2], dtype=np.float64)
    used = _problem.weight_as_used(np, weight, np.dtype(np.float16))
    assert used.dtype == np.float16
    assert _problem.weight_as_used(np, weight, np.dtype(np.float64)) is weight


def test_out_of_range_is_neither_a_class_nor_ignore_index():
    target = np.array([-100, -1, 0, 2, 3, 7])
    assert _problem.out_of_range(target, 3, -100).tolist() == [0, 1, 0, 0, 1, 1]
    assert _problem.out_of_range(target, 3, 7).tolist() == [1, 1, 0, 0, 1, 0]

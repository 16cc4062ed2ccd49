"""The numba kernel of ``--calibration``: every per-element figure in one visit of the scores.

:func:`element_figures` computes, for each element of a block, what
``_calibration.numpy_figures`` computes with float64 NumPy arrays (its definition), from one
read of the element's ``C`` scores: a first loop over them for the maximum, the target's
rank and the NaN count, a second for the exponentials at ``T = 1`` and at ``β``, a third
for the central moments at ``β``. Each element's figures are its own (no sum crosses
elements), so they do not depend on the thread count; the caller reduces them in a fixed
order. The exponentials are ``_kernels.cpu._softmax.exp64``, a float64 polynomial that vectorises
(within 2 ulp of ``np.exp``; numba's ``math.exp`` calls libm once per element): the figures
are within about 1e-15 of NumPy's, relative to the row's largest term. With moment
columns, more loops add the scaled raw moments ``Σ_c w_c s_c^n / n!`` of the shifted scores
``s = z - max z`` under the weights ``w = exp(β s)``: ``K`` multiply-adds per score.
:func:`window_figures` and :func:`crossings` evaluate each element's polynomial of moments
(``_calibration.WindowSums``).

Imported only where the compiled NumPy backend loads (``_kernels.cpu.load``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .._kernels.cpu._kernels import parallel_and_serial
from .._kernels.cpu._softmax import exp64

# The columns of a row of figures (see ``_calibration.FIGURES``); the moments follow.
(RANK, CORRECT, CONFIDENCE, BRIER, NLL, SLOPE, CURVATURE, THIRD, CONFIDENCE_AT_BETA) = range(9)
COLUMNS = 9
# Elements per parallel task: each task holds two row buffers of C float64 values; the
# per-element work (C values) dwarfs a task's start at any C.
TASK = 64


@numba.njit(error_model="numpy", cache=True)
def _fill(z, x3, b, s, softcap):
    """The element's scores ``x3[b, :, s]`` into ``z`` as float64, capped to
    ``softcap * tanh(z / softcap)`` where ``softcap > 0``."""
    for c in range(z.shape[0]):
        value = np.float64(x3[b, c, s])
        z[c] = softcap * math.tanh(value / softcap) if softcap > 0 else value


@numba.njit(fastmath={"nnan", "nsz", "reassoc"}, error_model="numpy", cache=True)
def _finite_max(z):
    """The largest of ``z``, which holds no NaN (the flags let the loop vectorise)."""
    top = z[0]
    for c in range(z.shape[0]):
        top = max(top, z[c])
    return top


@numba.njit(fastmath={"nnan", "nsz", "reassoc"}, error_model="numpy", cache=True)
def _finite_min(z):
    """The smallest of ``z``, which holds no NaN (the flags let the loop vectorise)."""
    bottom = z[0]
    for c in range(z.shape[0]):
        bottom = min(bottom, z[c])
    return bottom


@numba.njit(error_model="numpy", cache=True)
def _argmax_and_max(z):
    """np.argmax and np.max of ``z``: the first NaN and NaN if it holds one, else the first
    largest and its value."""
    first = 0
    for c in range(z.shape[0]):
        if z[c] != z[c]:
            return c, np.nan
        if z[c] > z[first]:
            first = c
    return first, z[first]


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _raw_moments(weights, s, orders, out):
    """``out[n] = Σ_c w_c s_c^n / n!`` for ``n = 2..orders - 1``, from ``weights`` holding
    ``w_c`` (overwritten): eight orders per visit of the row, in registers. (A visit per
    order, loading and storing the row each time, cost 3.4x as much: 3.0 against 0.9 ns per
    score for K = 9, one thread, 4096 x 1000 float32 logits, on a loaded 2-core machine.)"""
    scale = 1.0
    for n in range(2, orders, 8):
        m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = 0.0
        for c in range(s.shape[0]):
            t = weights[c] * s[c] if n > 2 else weights[c] * s[c] * s[c]
            m0 += t
            t *= s[c]
            m1 += t
            t *= s[c]
            m2 += t
            t *= s[c]
            m3 += t
            t *= s[c]
            m4 += t
            t *= s[c]
            m5 += t
            t *= s[c]
            m6 += t
            t *= s[c]
            m7 += t
            weights[c] = t
        for j, moment in enumerate((m0, m1, m2, m3, m4, m5, m6, m7)):
            if n + j < orders:
                scale *= n + j
                out[n + j] = moment / scale


# Row sums may be reassociated: they vectorise, in a fixed order (the same bits every run).
_FAST = {"contract", "reassoc"}


@parallel_and_serial(fastmath=_FAST)
def element_figures(x3, position, target, softcap, from_logits, beta, with_model, out):
    """``out[i]``: the figures (columns above) of the element at flat position
    ``position[i]`` (``b * S + s`` of ``x3``, ``(B, C, S)``), whose class is ``target[i]``;
    where ``out`` has ``COLUMNS + K + 2`` columns, then the spread ``max |s_c|`` over the
    classes of weight ``w_c > 0`` and the moments ``Σ_c w_c s_c^n / n!`` for ``n = 0..K``
    (``s = z - max z``, ``w = exp(β s)``; a class of weight 0 adds 0).

    With ``with_model`` false, the columns of the model's own probabilities (confidence,
    Brier) are left as they are. ``softcap`` is 0 for no cap.
    """
    classes, spatial = x3.shape[1], x3.shape[2]
    count = position.shape[0]
    orders = out.shape[1] - COLUMNS - 1  # K + 1 moments after the spread, or none
    for task in numba.prange((count + TASK - 1) // TASK):
        z = np.empty(classes)
        weights = np.empty(classes)
        for i in range(task * TASK, min(count, (task + 1) * TASK)):
            b = position[i] // spatial
            _fill(z, x3, b, position[i] - b * spatial, softcap)
            y = target[i]
            at_target = z[y]
            # the target's rank: classes scored higher, and equal ones of a lower index
            # (NaN compares false both ways, as in NumPy); `finite` is NaN where a score
            # is not finite
            rank = 0.0
            finite = 0.0
            for c in range(classes):
                value = z[c]
                rank += (value > at_target) | ((value == at_target) & (c < y))
                finite += value - value
            if finite == 0:
                top = _finite_max(z)
                correct = rank == 0  # the first largest is the target
            else:  # a rare row: np.argmax's and np.max's rules for NaN, one value at a time
                first, top = _argmax_and_max(z)
                correct = first == y
            total = 0.0  # Σ exp(z - top)
            squares = 0.0  # Σ exp(z - top)²
            if with_model:
                for c in range(classes):
                    e = exp64(z[c] - top)
                    total += e
                    squares += e * e
            total_beta = 0.0  # Σ exp(β (z - top))
            moment = 0.0  # Σ exp(β (z - top)) (z - top)
            for c in range(classes):
                # z - top, and 0 for a class of weight 0 (a -inf score: 0 * -inf is NaN)
                w = exp64(beta * (z[c] - top))
                shifted = z[c] - top if w != 0 else 0.0
                z[c] = shifted
                weights[c] = w
                total_beta += w
                moment += w * shifted
            mean = moment / total_beta
            second = 0.0
            third = 0.0
            for c in range(classes):
                deviation = z[c] - mean
                term = weights[c] * deviation * deviation
                second += term
                third += term * deviation
            figures = out[i]
            figures[RANK] = rank
            figures[CORRECT] = correct
            if with_model:
                # log p = z - lse: lse = top + log Σ for logits, 0 for log-probabilities
                lse = top + math.log(total) if from_logits else 0.0
                figures[CONFIDENCE] = math.exp(top - lse)
                p_target = math.exp(at_target - lse)
                figures[BRIER] = squares * math.exp(2 * (top - lse)) - 2 * p_target + 1
            shifted_target = at_target - top
            figures[NLL] = math.log(total_beta) - beta * shifted_target
            figures[SLOPE] = mean - shifted_target
            figures[CURVATURE] = second / total_beta
            figures[THIRD] = third / total_beta
            figures[CONFIDENCE_AT_BETA] = 1.0 / total_beta
            if orders > 0:
                spread = -_finite_min(z)  # (z: the shifted scores, 0 where w = 0)
                figures[COLUMNS] = spread if total_beta == total_beta else np.nan
                figures[COLUMNS + 1] = total_beta
            if orders > 1:
                figures[COLUMNS + 2] = moment
            _raw_moments(weights, z, orders, figures[COLUMNS + 1 :])


@numba.njit(fastmath=_FAST, error_model="numpy", cache=True)
def _partition(row, first, h):
    """``P(h) = Σ_n M_n h^n`` and ``P'(h)``, the moments ``M`` from ``row[first]`` on."""
    last = row.shape[0] - 1
    value = row[last]
    slope = (last - first) * row[last]
    for column in range(last - 1, first - 1, -1):
        value = value * h + row[column]
        if column > first:
            slope = slope * h + (column - first) * row[column]
    return value, slope


@parallel_and_serial(fastmath=_FAST)
def window_figures(figures, first, nodes, half, slopes, confidence, ends):
    """Per element ``i`` (a row of ``figures``, its moments from column ``first``), with
    ``P`` its moments' polynomial: at each node ``h_j``, ``slopes[i, j] = P'(h_j) / P(h_j)``
    less ``P'(0) / P(0)`` plus the NLL's slope at β0 (``figures[i, SLOPE]``) and
    ``confidence[i, j] = 1 / P(h_j)``; ``ends[i] = 1 / P(-half), 1 / P(half)``."""
    count = figures.shape[0]
    for task in numba.prange((count + TASK - 1) // TASK):
        for i in range(task * TASK, min(count, (task + 1) * TASK)):
            row = figures[i]
            shift = row[SLOPE] - row[first + 1] / row[first]
            for j in range(nodes.shape[0]):
                value, slope = _partition(row, first, nodes[j])
                slopes[i, j] = slope / value + shift
                confidence[i, j] = 1.0 / value
            ends[i, 0] = 1.0 / _partition(row, first, -half)[0]
            ends[i, 1] = 1.0 / _partition(row, first, half)[0]


@parallel_and_serial(fastmath=_FAST)
def crossings(figures, first, element, level, half, out):
    """``out[i]``: the ``h`` in ``[-half, half]`` where ``P(h) = level[i]`` for the element
    of row ``element[i]`` of ``figures`` (see :func:`window_figures`), whose ``P`` crosses
    it there: Newton's steps on ``log P`` (convex, decreasing), from the chord's root."""
    count = element.shape[0]
    target = np.log(level)
    tolerance = 4 * np.finfo(np.float64).eps * half
    for task in numba.prange((count + TASK - 1) // TASK):
        for i in range(task * TASK, min(count, (task + 1) * TASK)):
            row = figures[element[i]]
            left = math.log(_partition(row, first, -half)[0])
            right = math.log(_partition(row, first, half)[0])
            h = -half + 2 * half * (left - target[i]) / (left - right)
            for _ in range(100):
                value, slope = _partition(row, first, h)
                after = h - (math.log(value) - target[i]) * value / slope
                after = min(max(after, -half), half)
                done = abs(after - h) <= tolerance
                h = after
                if done:
                    break
            out[i] = h

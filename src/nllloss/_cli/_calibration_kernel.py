"""The numba kernel of ``--calibration``: every per-element figure in one visit of the scores.

:func:`element_figures` computes, for each element of a block, what
``_calibration.numpy_figures`` computes with float64 NumPy arrays (its definition), from one
read of the element's ``C`` scores: a first loop over them for the maximum, the target's
rank and the NaN count, a second for the exponentials at ``T = 1`` and at ``β``, a third
for the central moments at ``β``. Each element's figures are its own (no sum crosses
elements), so they do not depend on the thread count; the caller reduces them in a fixed
order. The exponentials are a float64 polynomial that vectorises (within 2 ulp of
``np.exp``; numba's ``math.exp`` calls libm once per element): the figures are within
about 1e-15 of NumPy's, relative to the row's largest term.

Imported only where the compiled NumPy backend loads (``_kernels.cpu.load``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .._kernels.cpu._kernels import parallel_and_serial

# The columns of a row of figures (see ``_calibration.FIGURES``).
(RANK, CORRECT, CONFIDENCE, BRIER, NLL, SLOPE, CURVATURE, THIRD, CONFIDENCE_AT_BETA) = range(9)
COLUMNS = 9
# Elements per parallel task: each task holds two row buffers of C float64 values; the
# per-element work (C values) dwarfs a task's start at any C.
TASK = 64


@intrinsic
def _float64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits`` (a no-op reinterpretation)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


_LOG2E = 1.4426950408889634
# ln 2 split in two (fdlibm's): k * _LN2_HIGH is exact for |k| < 2**20
_LN2_HIGH = 6.93147180369123816490e-01
_LN2_LOW = 1.90821492927058770002e-10
# 1/k! for the Taylor polynomial of e**r, |r| <= ln2 / 2: degree 13 leaves a truncation
# of 0.35**14 / 14! < 5e-18, below half an ulp.
_INVERSE_FACTORIALS = tuple(1.0 / math.factorial(k) for k in range(14))
(_, _, _F2, _F3, _F4, _F5, _F6, _F7, _F8, _F9, _F10, _F11, _F12, _F13) = _INVERSE_FACTORIALS
# Below this, exp is under float64's normal range: 0 (next to the row's maximum term, 1).
_EXP_FLOOR = -708.0


@numba.njit(fastmath={"contract"}, error_model="numpy", cache=True)
def exp64(x):
    """exp(x) for float64 x <= 0 (or -inf, NaN): 2**k * e**r, |r| <= ln2 / 2, e**r by its
    Taylor polynomial; 0 below ``_EXP_FLOOR``, NaN for NaN."""
    k = np.floor(x * _LOG2E + 0.5)
    k = k if k > -1022.0 else -1022.0  # also maps NaN to a number
    k = k if k < 1023.0 else 1023.0
    r = (x - k * _LN2_HIGH) - k * _LN2_LOW
    p = _F13
    p = p * r + _F12
    p = p * r + _F11
    p = p * r + _F10
    p = p * r + _F9
    p = p * r + _F8
    p = p * r + _F7
    p = p * r + _F6
    p = p * r + _F5
    p = p * r + _F4
    p = p * r + _F3
    p = p * r + _F2
    p = p * r + 1.0
    p = p * r + 1.0
    y = p * _float64_from_bits(np.int64(k + 1023.0) << 52)
    return 0.0 if x < _EXP_FLOOR else y  # NaN is not below: it stays NaN


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


# Row sums may be reassociated: they vectorise, in a fixed order (the same bits every run).
_FAST = {"contract", "reassoc"}


@parallel_and_serial(fastmath=_FAST)
def element_figures(x3, position, target, softcap, from_logits, beta, with_model, out):
    """``out[i]``: the figures (columns above) of the element at flat position
    ``position[i]`` (``b * S + s`` of ``x3``, ``(B, C, S)``), whose class is ``target[i]``.

    With ``with_model`` false, the columns of the model's own probabilities (confidence,
    Brier) are left as they are. ``softcap`` is 0 for no cap.
    """
    classes, spatial = x3.shape[1], x3.shape[2]
    count = position.shape[0]
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
                shifted = z[c] - top
                w = exp64(beta * shifted)
                weights[c] = w
                total_beta += w
                moment += w * shifted
            mean = moment / total_beta
            second = 0.0
            third = 0.0
            for c in range(classes):
                deviation = (z[c] - top) - mean
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

"""numba kernels for ``from_logits``, ``label_smoothing``, probability targets, ``z_loss``
and ``softcap``: one visit of each input row.

For each target element the kernels compute, reading its row of C values once from
memory (a row is re-read from cache, not from memory, by the later loops):

* with logits (capped to ``c tanh(x / c)`` with ``softcap``: computed once per logit, with
  its derivative, in float32 for float32 logits when c and 1 / c are normal float32
  numbers, else in float64 and rounded to the compute dtype: right for every c > 0), the
  row's maximum ``m`` and ``log_norm = log(sum_c exp(x_c - m))``, so ``log q_c = (x_c - m)
  - log_norm``, never stored; ``lse = m + log_norm``;
* the target term ``nll``: ``-w_t log q_t`` for a class index, ``-sum_c w_c p'_c log q_c``
  for probabilities smoothed first, as torch's ``p' = (1 - eps) p + eps / C`` (so a
  ``-inf`` logit or an infinite ``p`` gives torch's inf, not ``inf * 0``); with smoothing
  of class indices, ``smooth = -sum_c w_c log q_c``; with ``z_loss``, ``z v lse**2``
  (``v = w_t``, 1 for probabilities); each in float64, for the caller to reduce;
* optionally the gradient, written once per element (it may overwrite the input:
  each element is read before it is written):
  ``a * q_c - e * w_c - b_c``, times ``1 - tanh(x_c / c)**2`` with a cap, where
  ``a = s ((1 - eps) w_t + eps/C sum_k w_k + 2 z v lse)``, ``e = s eps/C`` and
  ``b_c = s (1 - eps) w_c [c = t]`` for a class index; for probabilities
  ``a = s (sum_k w_k p'_k + 2 z lse)``, ``e = 0`` and ``b_c = s w_c p'_c``; ``a = 0`` for
  log-probability input; ``s`` the element's upstream gradient.

Sums accumulate in float64; ``exp`` of float32 values, and the float64 cap's ``exp``,
are polynomials that vectorise (within 2 ulp; numba's ``math.exp`` calls libm once per
element). Rows are independent, so results do not depend on the thread count. Ignored
elements get 0 everywhere.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from ._kernels import decoded, parallel_and_serial

# Elements of a K-dim input's spatial axis handled together: the class loop runs over a
# tile of contiguous values, which vectorises; its per-element sums stay in L1.
TILE = 256
# Classes summed in the compute dtype before their sum joins the float64 total.
CLASS_BLOCK = 32
# Tasks that softmax_rows's rows are shared into, at least (when there are as many rows):
# several per thread, so that threads finishing early find work.
ROW_TASKS = 64


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a no-op reinterpretation)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_LOG2E = np.float32(1.4426950408889634)
# ln 2 split in two: k * _LN2_HIGH is exact for |k| < 2**11, so r keeps its precision
_LN2_HIGH = np.float32(0.693145751953125)
_LN2_LOW = np.float32(1.4286068203094172e-06)
# Below this, exp underflows float32's normal range: 0 (next to the row's maximum term,
# exp(0) = 1, the difference is far below float64's resolution).
_EXP_FLOOR = np.float32(-87.0)


@numba.njit(fastmath={"contract"}, error_model="numpy", cache=True)
def _exp32(x):
    """exp(x) for float32 x <= 0 (or -inf, NaN): 2**k * e**r, |r| <= ln2 / 2, with e**r by
    its Taylor polynomial of degree 7 (truncation below 0.1 ulp)."""
    k = np.floor(x * _LOG2E + np.float32(0.5))
    k = k if k > np.float32(-126.0) else np.float32(-126.0)  # also maps NaN to a number
    k = k if k < np.float32(127.0) else np.float32(127.0)
    r = (x - k * _LN2_HIGH) - k * _LN2_LOW
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    y = p * _float32_from_bits(np.int32(k + np.float32(127.0)) << 23)
    return np.float32(0.0) if x < _EXP_FLOOR else y  # NaN is not below: it stays NaN


def exp(x):
    """exp in the value's own precision."""


@overload(exp)
def _exp_by_type(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


def in_compute_type(value, array):
    """``value`` as the array's values are computed: float32 for 16-bit bit patterns."""


@overload(in_compute_type, inline="always")
def _in_compute_type_by_type(value, array):
    if isinstance(array.dtype, types.Integer) or array.dtype == types.float32:
        return lambda value, array: np.float32(value)
    return lambda value, array: np.float64(value)


def _compute_buffer(size, array):
    """An empty 1-D array of ``size`` values of the array's compute type."""


@overload(_compute_buffer, inline="always")
def _compute_buffer_by_type(size, array):
    if isinstance(array.dtype, types.Integer) or array.dtype == types.float32:
        return lambda size, array: np.empty(size, dtype=np.float32)
    return lambda size, array: np.empty(size, dtype=np.float64)


# Row sums add float32 (or float64) terms in blocks, each block's sum in float64: the block
# loops vectorise (reassociated), the row's total keeps float64's accuracy.
SUM_BLOCK = 1024


@numba.njit(error_model="numpy", cache=True)
def row_max(row, decode):
    """The row's largest value, over eight independent running maxima (one would be a chain
    of dependent comparisons, 4x slower). NaN values are skipped here; they make the
    row's sum of exponentials NaN."""
    n = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = decoded(row[0], decode)
    j = 0
    while j + 8 <= n:
        v0, v1 = decoded(row[j], decode), decoded(row[j + 1], decode)
        v2, v3 = decoded(row[j + 2], decode), decoded(row[j + 3], decode)
        v4, v5 = decoded(row[j + 4], decode), decoded(row[j + 5], decode)
        v6, v7 = decoded(row[j + 6], decode), decoded(row[j + 7], decode)
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
        m4 = v4 if v4 > m4 else m4
        m5 = v5 if v5 > m5 else m5
        m6 = v6 if v6 > m6 else m6
        m7 = v7 if v7 > m7 else m7
        j += 8
    while j < n:
        value = decoded(row[j], decode)
        m0 = value if value > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@intrinsic
def _float64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits`` (a no-op reinterpretation)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


_LOG2E64 = 1.4426950408889634
# ln 2 split in two (fdlibm's): k * _LN2_HIGH64 is exact for |k| < 2**20
_LN2_HIGH64 = 6.93147180369123816490e-01
_LN2_LOW64 = 1.90821492927058770002e-10
# Below this, exp underflows float64's normal range: 0
_EXP64_FLOOR = -708.0


@numba.njit(fastmath={"contract"}, error_model="numpy", cache=True)
def exp64(x):
    """exp(x) for float64 x <= 0 (or -inf, NaN), in a form that vectorises: 2**k * e**r,
    |r| <= ln2 / 2, with e**r by its Taylor polynomial of degree 13 (truncation below
    0.05 ulp)."""
    k = np.floor(x * _LOG2E64 + 0.5)
    k = k if k > -1022.0 else -1022.0  # also maps NaN to a number
    r = (x - k * _LN2_HIGH64) - k * _LN2_LOW64
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    y = p * _float64_from_bits(np.int64(k + 1023.0) << 52)
    return 0.0 if x < _EXP64_FLOOR else y  # NaN is not below: it stays NaN


# Below |y| = sqrt(eps), tanh(y) = y to the dtype's precision, so c tanh(x / c) = x: the
# cap returns x itself (x / c may have underflowed there, for a large c). As _generic.
_LINEAR_BELOW_32 = math.sqrt(np.finfo(np.float32).eps)
_LINEAR_BELOW_64 = math.sqrt(np.finfo(np.float64).eps)
_FLOAT64_LARGEST = float(np.finfo(np.float64).max)
# float32 caps c for which c and 1 / c are both normal float32 numbers: there the cap is
# computed in float32 (_cap_and_slope32); beyond, in float64 (_cap_and_slope_in_float64).
_FLOAT32_CAPS = (2.0**-126, 2.0**126)


def kernel_softcap(softcap, dtype):
    """``softcap`` (None for no cap) as the kernels take it: 0.0 for no cap; for a float32
    compute ``dtype``, a float32 when c and 1 / c are normal float32 numbers (the cap is
    then computed in float32, 4x faster), else a float64 (computed in float64). The
    choice depends on c alone, never on the data.

    >>> kernel_softcap(30.0, np.float32), kernel_softcap(1e39, np.float32)
    (np.float32(30.0), 1e+39)
    """
    if not softcap:
        return 0.0
    if np.dtype(dtype) == np.float32 and _FLOAT32_CAPS[0] <= softcap <= _FLOAT32_CAPS[1]:
        return np.float32(softcap)
    return float(softcap)


# Below |y| = _NEAR_BELOW, tanh(y) / y by its even Taylor polynomial (degree 18: truncation
# below 0.03 ulp there); above, from exp(-2|y|). 0.6: the largest error of the capped value
# against float64, over 4e6 values x of |x / 30| <= 6.7, is 2.4 ulp (4.1 ulp at 0.55, 4.2 at
# 0.7: the far formula loses digits below, the polynomial above).
_NEAR_BELOW = np.float32(0.6)
# |x / c| is bounded by this before it is corrected
_CORRECTED_BELOW = np.float32(2.0**20)


@intrinsic
def _select(typingctx, condition, if_true, if_false):
    """``if_true if condition else if_false`` as one select instruction: a ternary's branches,
    inlined by numba into a kernel, trip its checks of inlined code (NumbaIRAssumptionWarning)."""

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return if_true(types.boolean, if_true, if_false), codegen


def _cap_and_slope32(value, cap):
    """(``cap * tanh(value / cap)``, ``1 - tanh(value / cap)**2``) in float32, for a float32
    value and a float32 cap c with c and 1 / c normal, in a form that vectorises, with
    one ``exp`` for both.

    ``y = value / c`` is ``value * (1 / c)`` corrected by its residual (an fma: nearly the
    rounded quotient, without a division per value; ``1 / c`` is the same for every value
    and hoisted out of the loops). With ``e = exp(-2|y|)``: ``c tanh |y| = c (1 - e) / (1 +
    e)``; below ``|y| = 0.6``, ``value * tanh(y) / y`` by the Taylor polynomial (within 0.5
    ulp: no ``c * (1 / c)`` round trip); ``1 - tanh(y)**2 = 4e / (1 + e)**2``, which has no
    cancellation (``1 - t * t`` near ``|t| = 1`` loses float32's digits: 4 of them at
    ``|y| = 3``). The value stays NaN, ``±inf`` gives ``±c`` and slope 0."""
    inverse = np.float32(1.0) / cap
    # (bounded: beyond, inf * 0 would make the correction NaN, and tanh is 1 to float32's
    # precision whatever y's last digits)
    first = min(max(value * inverse, -_CORRECTED_BELOW), _CORRECTED_BELOW)
    y = first + (value - first * cap) * inverse
    a = abs(y)
    e = _exp32(np.float32(-2.0) * a)
    reciprocal = np.float32(1.0) / (np.float32(1.0) + e)  # (one division for both)
    far = math.copysign(cap * ((np.float32(1.0) - e) * reciprocal), y)
    s = a * a
    near = np.float32(-443861162.0 / 1856156927625.0)
    near = near * s + np.float32(6404582.0 / 10854718875.0)
    near = near * s - np.float32(929569.0 / 638512875.0)
    near = near * s + np.float32(21844.0 / 6081075.0)
    near = near * s - np.float32(1382.0 / 155925.0)
    near = near * s + np.float32(62.0 / 2835.0)
    near = near * s - np.float32(17.0 / 315.0)
    near = near * s + np.float32(2.0 / 15.0)
    near = near * s - np.float32(1.0 / 3.0)
    capped = _select(a < _NEAR_BELOW, value + value * (near * s), far)
    slope = (np.float32(4.0) * e) * (reciprocal * reciprocal)
    return capped, slope


@numba.njit(fastmath={"contract"}, error_model="numpy", cache=True)
def _cap_and_slope_in_float64(value, cap):
    """(``cap * tanh(value / cap)``, its derivative ``1 - tanh(value / cap)**2``) in
    float64, rounded to float32, for a float32 value and a float64 cap: right for every
    cap > 0 (1e-50 and 1e39 too), in a form that vectorises.

    With ``y = value / cap`` and ``e = exp(-2|y|)``: ``tanh |y| = (1 - e) / (1 + e)``
    (from ``|y| = 1/4`` on; below, where ``1 - e`` would cancel, its odd Taylor polynomial of
    degree 11, truncation below 3e-10) and ``1 - tanh(y)**2 = 4e / (1 + e)**2``, which
    has no cancellation (``1 - t * t`` near ``|t| = 1`` loses float32's digits: 4 of them at
    ``|y| = 3``)."""
    # times 1 / c, the same for every value (hoisted out of the loops: a division per
    # value costs 1.4x the whole), clamped to float64's largest: for a subnormal c (whose
    # inverse is inf) every float32 value but 0 still meets |y| > 1e263, and 0 gives 0
    y = np.float64(value) * min(1.0 / cap, _FLOAT64_LARGEST)
    a = abs(y)
    e = exp64(-2.0 * a)
    reciprocal = 1.0 / (1.0 + e)  # (one division for both)
    far = (1.0 - e) * reciprocal
    s = a * a
    near = -1382.0 / 155925.0
    near = near * s + 62.0 / 2835.0
    near = near * s - 17.0 / 315.0
    near = near * s + 2.0 / 15.0
    near = near * s - 1.0 / 3.0
    near = a + a * (near * s)
    t = near if a < 0.25 else far
    t = t if y >= 0.0 else -t  # (NaN stays NaN)
    capped = np.float32(cap * t) if a >= _LINEAR_BELOW_32 else value
    return capped, np.float32((4.0 * e) * (reciprocal * reciprocal))


@numba.njit(error_model="numpy", cache=True)
def _cap_and_slope_float64(value, cap):
    """As ``_cap_and_slope_in_float64``, for a float64 value, with libm's tanh and exp."""
    y = value / cap
    e = math.exp(-2.0 * abs(y))
    capped = cap * math.tanh(y) if abs(y) >= _LINEAR_BELOW_64 else value
    return capped, 4.0 * e / ((1.0 + e) * (1.0 + e))


def cap_and_slope(value, cap):
    """(``cap * tanh(value / cap)``, ``1 - tanh(value / cap)**2``) in the value's own
    precision (Gemma 2's logit soft-capping and its derivative), computed in the cap's:
    ``cap`` > 0 is a float32 only for float32 values, where ``kernel_softcap`` chose it."""


@overload(cap_and_slope, inline="always")
def _cap_and_slope_by_type(value, cap):
    if value == types.float32 and cap == types.float32:
        # its body, inlined by numba: LLVM would leave a call (too large to inline), and the
        # loops would not vectorise (20x slower)
        return _cap_and_slope32
    if value == types.float32:
        return lambda value, cap: _cap_and_slope_in_float64(value, cap)
    return lambda value, cap: _cap_and_slope_float64(value, cap)


@numba.njit(inline="always", error_model="numpy")
def soft_capped(value, cap):
    """The capped value ``cap * tanh(value / cap)`` in the value's precision; the value itself
    for ``cap = 0``, no cap."""
    return cap_and_slope(value, cap)[0] if cap > 0 else value


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _sum_of_exp(row, decode, top):
    """sum_j exp(row[j] - top), in float64 over blocks of ``SUM_BLOCK``."""
    total = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        block = in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            block += exp(decoded(part[j], decode) - top)
        total += np.float64(block)
    return total


@numba.njit(fastmath={"contract"}, error_model="numpy", cache=True)
def _cap_row(row, decode, cap, capped, slopes):
    """The capped row into ``capped`` and, when it has room, its derivative into ``slopes``:
    the cap is computed once per value. Elementwise and without reassociation, so that
    every compiled copy of it (the threads' and the one thread's kernel) gives the same
    bits; its sum of exponentials is then ``_sum_of_exp`` of ``capped``, as a row's."""
    if slopes.shape[0] > 0:  # (two loops: a test inside would keep them from vectorising)
        for j in range(row.shape[0]):
            value, slope = cap_and_slope(decoded(row[j], decode), cap)
            capped[j] = value
            slopes[j] = slope
    else:
        for j in range(row.shape[0]):
            capped[j] = cap_and_slope(decoded(row[j], decode), cap)[0]


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _weighted_sum(row, decode, weight, shift):
    """sum_j weight[j] * (row[j] - shift), in float64 over blocks of ``SUM_BLOCK`` terms."""
    total = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        part_weight = weight[start : start + SUM_BLOCK]
        block = in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            block += part_weight[j] * (decoded(part[j], decode) - shift)
        total += np.float64(block)
    return total


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _probability_sums(row, p, decode, weight, scale, share, shift, log_norm):
    """(sum_j w_j p'_j ((row[j] - shift) - log_norm), sum_j w_j p'_j) with the smoothed
    probabilities ``p' = scale * p + share`` (``p`` decoded as the row is), each in float64
    over blocks of ``SUM_BLOCK`` terms. The log-probability is formed before it is weighted,
    as torch's ``-(log_softmax(x) * p').sum()``: an infinite ``p'`` at the row's maximum
    meets ``log q < 0`` (not ``x - max = 0``) and a ``-inf`` logit meets the smoothed
    ``p' > 0``, so the loss is inf where torch's is."""
    dot = 0.0
    mass = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        part_p = p[start : start + SUM_BLOCK]
        part_weight = weight[start : start + SUM_BLOCK]
        block_dot = in_compute_type(0.0, row)
        block_mass = in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            wp = part_weight[j] * (scale * decoded(part_p[j], decode) + share)
            block_dot += wp * ((decoded(part[j], decode) - shift) - log_norm)
            block_mass += wp
        dot += np.float64(block_dot)
        mass += np.float64(block_mass)
    return dot, mass


# reassociation lets the row sums vectorise (in a fixed order: the same bits every run)
_FAST = {"contract", "reassoc"}


@parallel_and_serial(fastmath=_FAST)
def softmax_rows(
    x2, t1, p2, ignore_index, weight, weight_sum, decode, from_logits, smoothing, z_loss,
    softcap, upstream, target_scale, smooth_scale, nll, smooth, z_terms, lse_out, grad2,
):  # fmt: skip
    """(N, C) input: per row, the statistics above; the gradient when ``grad2`` is (N, C).

    The targets are the class indices ``t1`` or, when ``p2`` is (N, C), the probabilities
    ``p2`` (decoded as ``x2``), smoothed to ``target_scale * p + smooth_scale`` (then
    ``smoothing`` is False: the smoothing is in the probabilities). ``weight`` holds C
    values (ones when unweighted) in the gradient's dtype, ``weight_sum`` their sum;
    ``upstream`` is one value per row or a single one. ``softcap`` is 0 for no cap;
    ``z_terms`` gets ``z v lse**2`` per row when ``z_loss`` > 0 and ``lse_out`` the row's
    log-sum-exp when it has room (each has no values otherwise).

    With a cap, each row is capped once into a buffer of C values (and the cap's
    derivative into a second one for the gradient), which the passes then read.
    """
    rows, classes = x2.shape
    want_grad = grad2.shape[0] == rows
    capped = softcap > 0.0
    # Rows per task: a cap's buffers are allocated per task (at most 16 rows, so that an
    # allocation costs little beside the task's work); at least ROW_TASKS tasks when there
    # are rows enough, to share out among the threads.
    per_task = max(1, min(16, rows // ROW_TASKS))
    no_buffer = _compute_buffer(0, x2)  # (allocated once: an allocation per task costs
    # more than a small task's work)
    for task in numba.prange((rows + per_task - 1) // per_task):
        values = _compute_buffer(classes, x2) if capped else no_buffer
        slopes = _compute_buffer(classes, x2) if capped and want_grad else no_buffer
        for i in range(task * per_task, min((task + 1) * per_task, rows)):
            _softmax_row(
                i, x2[i], t1, p2, ignore_index, weight, weight_sum, decode, from_logits,
                smoothing, z_loss, softcap, upstream, target_scale, smooth_scale, nll, smooth,
                z_terms, lse_out, grad2, values, slopes,
            )  # fmt: skip


# inlined into softmax_rows (numba's IR): a call per row, passing some twenty arrays, cost
# more than a row of 10 classes' work (one thread, 64 x 10 logits, fastest of 2000 calls
# on a loaded 2-core machine: 29.5 us called, 19.3 us inlined; 512 x 10: 221 and 139 us)
@numba.njit(fastmath=_FAST, error_model="numpy", inline="always")
def _softmax_row(
    i, row, t1, p2, ignore_index, weight, weight_sum, decode, from_logits, smoothing, z_loss,
    softcap, upstream, target_scale, smooth_scale, nll, smooth, z_terms, lse_out, grad2,
    values, slopes,
):  # fmt: skip
    """Row ``i`` of ``softmax_rows``; ``values`` and ``slopes`` are its buffers for a cap."""
    classes = row.shape[0]
    want_grad = grad2.shape[0] > 0
    probabilities = p2.shape[0] > 0
    with_z = z_loss > 0.0
    target = 0 if probabilities else t1[i]
    if classes == 0 or (not probabilities and target == ignore_index):
        nll[i] = 0.0
        smooth[i] = 0.0
        if with_z:
            z_terms[i] = 0.0
        if lse_out.shape[0] > 0:
            lse_out[i] = -np.inf if classes == 0 else _row_lse(row, decode, softcap, values)
        if want_grad:
            for j in range(classes):
                grad2[i, j] = 0.0
        return
    if softcap > 0.0:
        # the cap keeps the order: the capped row's maximum is the capped maximum
        top = soft_capped(row_max(row, decode), softcap)
        _cap_row(row, decode, softcap, values, slopes)
        log_norm = math.log(_sum_of_exp(values, decode, top))
        _row_statistics(
            i, values, t1, p2, weight, weight_sum, decode, top, log_norm, smoothing, z_loss,
            upstream, target_scale, smooth_scale, nll, smooth, z_terms, lse_out, grad2, slopes,
            True,
        )  # fmt: skip
        return
    top = in_compute_type(0.0, row)
    log_norm = 0.0
    if from_logits:
        top = row_max(row, decode)
        log_norm = math.log(_sum_of_exp(row, decode, top))
    _row_statistics(
        i, row, t1, p2, weight, weight_sum, decode, top, log_norm, smoothing, z_loss,
        upstream, target_scale, smooth_scale, nll, smooth, z_terms, lse_out, grad2, slopes,
        from_logits,
    )  # fmt: skip


@numba.njit(error_model="numpy", cache=True)
def _row_lse(row, decode, softcap, values):
    """The log-sum-exp of a (capped) row, for ``return_lse`` at an ignored element."""
    if softcap > 0.0:
        top = soft_capped(row_max(row, decode), softcap)
        _cap_row(row, decode, softcap, values, values[:0])
        return np.float64(top) + math.log(_sum_of_exp(values, decode, top))
    top = row_max(row, decode)
    return np.float64(top) + math.log(_sum_of_exp(row, decode, top))


@numba.njit(fastmath=_FAST, error_model="numpy", cache=True)
def _row_statistics(
    i, row, t1, p2, weight, weight_sum, decode, top, log_norm, smoothing, z_loss, upstream,
    target_scale, smooth_scale, nll, smooth, z_terms, lse_out, grad2, slopes, from_logits,
):  # fmt: skip
    """Row ``i``'s target, smoothing and z-loss terms, and its gradient when ``grad2`` has
    rows, from the (capped) ``row``, its maximum ``top`` and ``log_norm = log sum_j
    exp(row[j] - top)``. ``slopes`` holds the cap's derivative (nothing without a cap)."""
    classes = row.shape[0]
    want_grad = grad2.shape[0] > 0
    probabilities = p2.shape[0] > 0
    with_z = z_loss > 0.0
    through_cap = slopes.shape[0] > 0
    lse = np.float64(top) + log_norm
    if lse_out.shape[0] > 0:
        lse_out[i] = lse
    # (x - top) - log_norm, as torch's log_softmax: top + log_norm rounded to float32
    # would be off by its ulp (0.001 at 1e4)
    row_log_norm = in_compute_type(log_norm, row)
    target = 0
    if probabilities:
        dot, mass = _probability_sums(
            row, p2[i], decode, weight, in_compute_type(target_scale, row),
            in_compute_type(smooth_scale, row), top, row_log_norm,
        )  # fmt: skip
        nll[i] = -dot
        element_weight = 1.0
    else:
        target = t1[i]
        mass = np.float64(weight[target])
        nll[i] = -(mass * (np.float64(decoded(row[target], decode)) - lse))
        element_weight = mass
    if smoothing:
        smooth[i] = -(_weighted_sum(row, decode, weight, top) - log_norm * weight_sum)
    else:
        smooth[i] = 0.0
    if with_z:
        z_terms[i] = z_loss * element_weight * lse * lse
    if not want_grad:
        return
    s = upstream[0] if upstream.shape[0] == 1 else upstream[i]
    keep = s if probabilities else s * target_scale  # times w_t at the target, or w_c p'_c
    per_weight = in_compute_type(s * smooth_scale, grad2)
    per_probability = in_compute_type(keep, grad2)
    p_scale = in_compute_type(target_scale, grad2)
    p_share = in_compute_type(smooth_scale, grad2)
    out = grad2[i]
    # 1-D rows: the class loops vectorise
    p_row = p2[i] if probabilities else np.empty(0, dtype=p2.dtype)
    if from_logits:
        a = keep * mass
        if smoothing:  # (the weight sum only then: a NaN weight of an unused class
            a += s * smooth_scale * weight_sum  # must not reach the gradient)
        if with_z:  # d(z v lse**2)/dx_c = 2 z v lse q_c
            a += 2.0 * z_loss * element_weight * lse * s
        a = in_compute_type(a, grad2)
        for j in range(classes):
            g = a * exp((decoded(row[j], decode) - top) - row_log_norm)
            if smoothing:  # (a NaN weight must not reach the gradient without it)
                g -= per_weight * weight[j]
            if probabilities:
                g -= per_probability * (weight[j] * (p_scale * decoded(p_row[j], decode) + p_share))
            if through_cap:  # d(c tanh(x / c))/dx = 1 - tanh(x / c)**2
                g *= slopes[j]
            out[j] = g
    elif probabilities:
        for j in range(classes):
            out[j] = -(
                per_probability * (weight[j] * (p_scale * decoded(p_row[j], decode) + p_share))
            )
    else:
        for j in range(classes):
            out[j] = -(per_weight * weight[j])
    if not probabilities:
        at_target = in_compute_type(keep * mass, grad2)
        if through_cap:
            at_target *= slopes[target]
        out[target] -= at_target


@parallel_and_serial(fastmath=_FAST)
def softmax_tiles(
    x3, t2, p3, ignore_index, weight, weight_sum, decode, from_logits, smoothing, z_loss,
    softcap, upstream, target_scale, smooth_scale, nll, smooth, z_terms, lse_out, grad3,
):  # fmt: skip
    """(B, C, S) input with S > 1: as ``softmax_rows``, over tiles of ``TILE`` elements of
    the spatial axis (``nll``, ``smooth``, ``z_terms``, ``lse_out`` and ``upstream`` are
    flat over (B, S); ``p3`` is (B, C, S) for probabilities). A cap is computed again by
    each pass that reads the logits (a tile of capped values would be C * TILE)."""
    batch, classes, spatial = x3.shape
    want_grad = grad3.shape[0] == batch
    one_upstream = upstream.shape[0] == 1
    probabilities = p3.shape[0] == batch
    with_z = z_loss > 0.0
    with_lse = lse_out.shape[0] > 0
    capped = softcap > 0.0
    p_scale = in_compute_type(target_scale, x3)
    p_share = in_compute_type(smooth_scale, x3)
    tiles = (spatial + TILE - 1) // TILE
    for job in numba.prange(batch * tiles):
        b = job // tiles
        start = (job % tiles) * TILE
        width = min(TILE, spatial - start)
        # x3[b, j, start + k] with k innermost: unit stride, so the class loops vectorise
        # (over the 1-D slice of each class: indexing x3 itself in the loop, they do not;
        # 2.3x for the probability targets' pass at (8, 21, 256, 256), benchmarks/fused.py)
        cells = slice(start, start + width)
        top = _compute_buffer(width, x3)
        partial = _compute_buffer(width, x3)
        second = _compute_buffer(width, x3)
        log_norms = _compute_buffer(width, x3)
        top[:] = 0.0
        log_norms[:] = 0.0
        total = np.zeros(width, dtype=np.float64)
        weighted = np.zeros(width, dtype=np.float64)
        dots = np.zeros(width, dtype=np.float64)
        masses = np.zeros(width, dtype=np.float64)
        if from_logits and classes > 0:
            for k in range(width):
                top[k] = decoded(x3[b, 0, start + k], decode)
            for j in range(classes):
                xs = x3[b, j, cells]
                for k in range(width):
                    value = decoded(xs[k], decode)
                    top[k] = value if value > top[k] else top[k]
            for k in range(width):
                top[k] = soft_capped(top[k], softcap)  # the cap keeps the order
            # sums over blocks of classes in the compute dtype, each block's added in float64
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    xs = x3[b, j, cells]
                    for k in range(width):
                        value = soft_capped(decoded(xs[k], decode), softcap)
                        partial[k] += exp(value - top[k])
                for k in range(width):
                    total[k] += np.float64(partial[k])
            for k in range(width):
                log_norms[k] = math.log(total[k])  # subtracted after top, as in softmax_rows
        if smoothing:
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    w = weight[j]
                    xs = x3[b, j, cells]
                    for k in range(width):
                        value = soft_capped(decoded(xs[k], decode), softcap)
                        partial[k] += w * (value - top[k])
                for k in range(width):
                    weighted[k] += np.float64(partial[k])
        if probabilities:  # as _probability_sums
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                second[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    w = weight[j]
                    xs = x3[b, j, cells]
                    ps = p3[b, j, cells]
                    for k in range(width):
                        wp = w * (p_scale * decoded(ps[k], decode) + p_share)
                        value = soft_capped(decoded(xs[k], decode), softcap)
                        partial[k] += wp * ((value - top[k]) - log_norms[k])
                        second[k] += wp
                for k in range(width):
                    dots[k] += np.float64(partial[k])
                    masses[k] += np.float64(second[k])
        # per element: statistics, and the gradient's coefficients (0 where ignored)
        a = np.zeros(width, dtype=grad3.dtype)
        per_weight = np.zeros(width, dtype=grad3.dtype)
        per_probability = np.zeros(width, dtype=grad3.dtype)
        at_target = np.zeros(width, dtype=np.float64)
        any_ignored = False
        for k in range(width):
            m = b * spatial + start + k
            log_norm = np.float64(log_norms[k]) if from_logits and classes > 0 else 0.0
            lse = np.float64(top[k]) + log_norm
            if with_lse:
                lse_out[m] = lse if classes > 0 else -np.inf
            target = 0 if probabilities else t2[b, start + k]
            if not probabilities and target == ignore_index:
                nll[m] = 0.0
                smooth[m] = 0.0
                if with_z:
                    z_terms[m] = 0.0
                any_ignored = True
                continue
            slope = 1.0
            if probabilities:
                mass = masses[k]
                nll[m] = -dots[k]
                element_weight = 1.0
                keep = s = upstream[0] if one_upstream else upstream[m]
            else:
                mass = np.float64(weight[target])
                value = decoded(x3[b, target, start + k], decode)
                if capped:  # read now: the gradient may overwrite x
                    value, slope = cap_and_slope(value, softcap)
                nll[m] = -(mass * (np.float64(value) - lse))
                element_weight = mass
                s = upstream[0] if one_upstream else upstream[m]
                keep = s * target_scale
                at_target[k] = keep * mass
                if capped:
                    at_target[k] *= slope
            smooth[m] = -(weighted[k] - log_norm * weight_sum) if smoothing else 0.0
            if with_z:
                z_terms[m] = z_loss * element_weight * lse * lse if classes > 0 else 0.0
            per_weight[k] = s * smooth_scale
            per_probability[k] = keep
            if from_logits:
                coefficient = keep * mass
                if smoothing:  # (as in softmax_rows)
                    coefficient += s * smooth_scale * weight_sum
                if with_z:
                    coefficient += 2.0 * z_loss * element_weight * lse * s
                a[k] = coefficient
        if not want_grad:
            continue
        for j in range(classes):
            w = weight[j]
            xs = x3[b, j, cells]
            ps = p3[b, j, cells] if probabilities else xs
            out = grad3[b, j, cells]
            for k in range(width):
                if not from_logits:  # (as softmax_rows: -0.0 where the product is 0)
                    if probabilities:
                        out[k] = -(
                            per_probability[k] * (w * (p_scale * decoded(ps[k], decode) + p_share))
                        )
                    else:
                        out[k] = -(per_weight[k] * w)
                    continue
                value = decoded(xs[k], decode)
                slope = in_compute_type(1.0, grad3)
                if capped:
                    value, slope = cap_and_slope(value, softcap)
                g = a[k] * exp((value - top[k]) - log_norms[k])
                if smoothing:
                    g -= per_weight[k] * w
                if probabilities:
                    g -= per_probability[k] * (w * (p_scale * decoded(ps[k], decode) + p_share))
                out[k] = g * slope if capped else g
        if not probabilities:
            for k in range(width):
                target = t2[b, start + k]
                if target != ignore_index:
                    grad3[b, target, start + k] -= in_compute_type(at_target[k], grad3)
        if any_ignored:  # nothing from an ignored element, not even its NaN or inf
            for k in range(width):
                if t2[b, start + k] == ignore_index:
                    for j in range(classes):
                        grad3[b, j, start + k] = 0.0

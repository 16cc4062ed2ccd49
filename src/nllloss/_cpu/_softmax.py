"""numba kernels for ``from_logits`` and ``label_smoothing``: one visit of each input row.

For each target element the kernels compute, reading its row of C values once from
memory (a row is re-read from cache, not from memory, by the later loops):

* with logits, the row's maximum ``m`` and ``log_norm = log(sum_c exp(x_c - m))``, so
  ``log p_c = x_c - m - log_norm``, never stored;
* ``nll = -w_t log p_t`` and, with smoothing, ``smooth = -sum_c w_c log p_c``, both in
  float64, for the caller to reduce;
* optionally the gradient, written once per element (it may overwrite the input:
  each element is read before it is written):
  ``a * p_c - e * w_c`` everywhere and ``- b`` at the target, with
  ``a = s ((1 - eps) w_t + eps/C sum_k w_k)``, ``e = s eps/C``, ``b = s (1 - eps) w_t``
  (``a = 0`` for log-probability input) and ``s`` the element's upstream gradient.

Sums accumulate in float64; ``exp`` of float32 values is a polynomial that vectorises
(within 2 ulp; numba's ``math.exp`` calls libm once per element). Rows are independent,
so results do not depend on the thread count. Ignored elements get 0 everywhere.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from ._kernels import _decode, _parallel_and_serial

# Elements of a K-dim input's spatial axis handled together: the class loop runs over a
# tile of contiguous values, which vectorises; its per-element sums stay in L1.
TILE = 256
# Classes summed in the compute dtype before their sum joins the float64 total.
CLASS_BLOCK = 32


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


def _exp(x):
    """exp in the value's own precision."""


@overload(_exp)
def _exp_by_type(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


def _in_compute_type(value, array):
    """``value`` as the array's values are computed: float32 for 16-bit bit patterns."""


@overload(_in_compute_type, inline="always")
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
def _row_max(row, decode):
    """The row's largest value, over eight independent running maxima (one would be a chain
    of dependent comparisons, 4x slower). NaN values are skipped here; they make the
    row's sum of exponentials NaN."""
    n = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = _decode(row[0], decode)
    j = 0
    while j + 8 <= n:
        v0, v1 = _decode(row[j], decode), _decode(row[j + 1], decode)
        v2, v3 = _decode(row[j + 2], decode), _decode(row[j + 3], decode)
        v4, v5 = _decode(row[j + 4], decode), _decode(row[j + 5], decode)
        v6, v7 = _decode(row[j + 6], decode), _decode(row[j + 7], decode)
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
        value = _decode(row[j], decode)
        m0 = value if value > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _sum_of_exp(row, decode, top):
    """sum_j exp(row[j] - top), in float64 over blocks of ``SUM_BLOCK`` terms."""
    total = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        block = _in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            block += _exp(_decode(part[j], decode) - top)
        total += np.float64(block)
    return total


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _weighted_sum(row, decode, weight, shift):
    """sum_j weight[j] * (row[j] - shift), in float64 over blocks of ``SUM_BLOCK`` terms."""
    total = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        part_weight = weight[start : start + SUM_BLOCK]
        block = _in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            block += part_weight[j] * (_decode(part[j], decode) - shift)
        total += np.float64(block)
    return total


# reassociation lets the row sums vectorise (in a fixed order: the same bits every run)
_FAST = {"contract", "reassoc"}


@_parallel_and_serial(fastmath=_FAST)
def softmax_rows(
    x2, t1, ignore_index, weight, weight_sum, decode, from_logits, smoothing, upstream,
    target_scale, smooth_scale, nll, smooth, grad2,
):  # fmt: skip
    """(N, C) input: per row, the statistics above; the gradient when ``grad2`` is (N, C).

    ``weight`` holds C values (ones when unweighted) in the gradient's dtype,
    ``weight_sum`` their sum; ``upstream`` is one value per row or a single one.
    """
    rows, classes = x2.shape
    want_grad = grad2.shape[0] == rows
    one_upstream = upstream.shape[0] == 1
    for i in numba.prange(rows):
        target = t1[i]
        if target == ignore_index:
            nll[i] = 0.0
            smooth[i] = 0.0
            if want_grad:
                for j in range(classes):
                    grad2[i, j] = 0.0
            continue
        row = x2[i]
        top = _decode(row[0], decode)
        log_norm = 0.0
        if from_logits:
            top = _row_max(row, decode)
            total = _sum_of_exp(row, decode, top)
            log_norm = math.log(total)
            log_p_target = np.float64(_decode(row[target], decode)) - (np.float64(top) + log_norm)
            if smoothing:
                weighted = _weighted_sum(row, decode, weight, top)
                smooth[i] = -(weighted - log_norm * weight_sum)
            else:
                smooth[i] = 0.0
        else:
            log_p_target = np.float64(_decode(row[target], decode))
            zero = _in_compute_type(0.0, x2)
            smooth[i] = -_weighted_sum(row, decode, weight, zero) if smoothing else 0.0
        w_target = np.float64(weight[target])
        nll[i] = -(w_target * log_p_target)
        if want_grad:
            s = upstream[0] if one_upstream else upstream[i]
            at_target = s * target_scale * w_target
            per_weight = _in_compute_type(s * smooth_scale, grad2)
            if from_logits:
                # without smoothing the weight sum is not read: a NaN or inf weight of a
                # class nobody targets must not reach the gradient (torch's stays finite)
                smoothed = s * smooth_scale * weight_sum if smoothing else 0.0
                a = _in_compute_type(at_target + smoothed, grad2)
                # (x - top) - log_norm, as torch's log_softmax: top + log_norm rounded to
                # float32 would be off by its ulp (0.001 at 1e4)
                row_log_norm = _in_compute_type(log_norm, x2)
                out = grad2[i]
                if smoothing:
                    for j in range(classes):
                        p = _exp((_decode(row[j], decode) - top) - row_log_norm)
                        out[j] = a * p - per_weight * weight[j]
                else:  # the same without the smoothing term's reads of the weight
                    for j in range(classes):
                        out[j] = a * _exp((_decode(row[j], decode) - top) - row_log_norm)
            else:
                for j in range(classes):
                    grad2[i, j] = -(per_weight * weight[j])
            grad2[i, target] -= _in_compute_type(at_target, grad2)


@_parallel_and_serial(fastmath=_FAST)
def softmax_tiles(
    x3, t2, ignore_index, weight, weight_sum, decode, from_logits, smoothing, upstream,
    target_scale, smooth_scale, nll, smooth, grad3,
):  # fmt: skip
    """(B, C, S) input with S > 1: as ``softmax_rows``, over tiles of ``TILE`` elements of
    the spatial axis (``nll``, ``smooth`` and ``upstream`` are flat over (B, S))."""
    batch, classes, spatial = x3.shape
    want_grad = grad3.shape[0] == batch
    one_upstream = upstream.shape[0] == 1
    tiles = (spatial + TILE - 1) // TILE
    for job in numba.prange(batch * tiles):
        b = job // tiles
        start = (job % tiles) * TILE
        width = min(TILE, spatial - start)
        # x3[b, j, start + k] with k innermost: unit stride, so the class loops vectorise
        top = _compute_buffer(width, x3)
        partial = _compute_buffer(width, x3)
        zeros = _compute_buffer(width, x3)
        zeros[:] = 0.0
        total = np.zeros(width, dtype=np.float64)
        weighted = np.zeros(width, dtype=np.float64)
        if from_logits:
            for k in range(width):
                top[k] = _decode(x3[b, 0, start + k], decode)
            for j in range(classes):
                for k in range(width):
                    value = _decode(x3[b, j, start + k], decode)
                    top[k] = value if value > top[k] else top[k]
            # sums over blocks of classes in the compute dtype, each block's added in float64
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    for k in range(width):
                        partial[k] += _exp(_decode(x3[b, j, start + k], decode) - top[k])
                for k in range(width):
                    total[k] += np.float64(partial[k])
        if smoothing:
            shift = top if from_logits else zeros
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    w = weight[j]
                    for k in range(width):
                        partial[k] += w * (_decode(x3[b, j, start + k], decode) - shift[k])
                for k in range(width):
                    weighted[k] += np.float64(partial[k])
        # per element: statistics, and the gradient's coefficients (0 where ignored)
        log_norms = _compute_buffer(width, x3)
        a = np.zeros(width, dtype=grad3.dtype)
        per_weight = np.zeros(width, dtype=grad3.dtype)
        at_target = np.zeros(width, dtype=np.float64)
        any_ignored = False
        for k in range(width):
            m = b * spatial + start + k
            target = t2[b, start + k]
            if target == ignore_index:
                nll[m] = 0.0
                smooth[m] = 0.0
                any_ignored = True
                continue
            log_p_target = np.float64(_decode(x3[b, target, start + k], decode))
            if from_logits:
                log_norm = math.log(total[k])
                log_norms[k] = log_norm  # subtracted after top, as in softmax_rows
                log_p_target -= np.float64(top[k]) + log_norm
                smooth[m] = -(weighted[k] - log_norm * weight_sum) if smoothing else 0.0
            else:
                smooth[m] = -weighted[k] if smoothing else 0.0
            w_target = np.float64(weight[target])
            nll[m] = -(w_target * log_p_target)
            s = upstream[0] if one_upstream else upstream[m]
            at_target[k] = s * target_scale * w_target
            per_weight[k] = s * smooth_scale
            if from_logits:
                a[k] = at_target[k] + (s * smooth_scale * weight_sum if smoothing else 0.0)
        if not want_grad:
            continue
        for j in range(classes):
            w = weight[j]
            if from_logits and smoothing:
                for k in range(width):
                    p = _exp((_decode(x3[b, j, start + k], decode) - top[k]) - log_norms[k])
                    grad3[b, j, start + k] = a[k] * p - per_weight[k] * w
            elif from_logits:  # the same without the smoothing term's read of the weight
                for k in range(width):
                    p = _exp((_decode(x3[b, j, start + k], decode) - top[k]) - log_norms[k])
                    grad3[b, j, start + k] = a[k] * p
            else:
                for k in range(width):
                    grad3[b, j, start + k] = -(per_weight[k] * w)
        for k in range(width):
            target = t2[b, start + k]
            if target != ignore_index:
                grad3[b, target, start + k] -= _in_compute_type(at_target[k], grad3)
        if any_ignored:  # nothing from an ignored element, not even its NaN or inf
            for k in range(width):
                if t2[b, start + k] == ignore_index:
                    for j in range(classes):
                        grad3[b, j, start + k] = 0.0


@numba.njit(inline="always", error_model="numpy")
def _logit(element, decode, softcap):
    """An input value in float64, capped to ``softcap * tanh(x / softcap)`` when softcap > 0."""
    value = np.float64(_decode(element, decode))
    return softcap * math.tanh(value / softcap) if softcap > 0.0 else value


@numba.njit(inline="always", error_model="numpy")
def _target_share(p3, t2, indices, decode, b, j, s, keep, share):
    """The smoothed target probability ``keep p + share`` of class j at element (b, s): from
    the probabilities ``p3``, or from the class index ``t2`` (one-hot)."""
    if indices:
        return keep * (t2[b, s] == j) + share
    return np.float64(_decode(p3[b, j, s], decode)) * keep + share


@_parallel_and_serial(fastmath={"contract"})
def target_elements(
    x3, p3, t2, indices, ignore_index, weight, decode, from_logits, keep, share, z_loss,
    softcap, upstream, losses, grad3,
):  # fmt: skip
    """Per element ``m = (b, s)`` of (B, C, S) input, for targets of class probabilities
    (``p3``, (B, C, S)) or, with ``indices``, of class indices (``t2``, (B, S), one-hot
    probabilities; elements equal to ``ignore_index`` get 0 everywhere), in float64:

    ``losses[m] = -sum_c w_c p'_c log q_c + z v lse**2`` with ``p' = keep p + share``
    (smoothing), ``q = softmax`` of the (capped) logits and ``v = w_t`` for an index
    (1 for probabilities), or ``-sum_c w_c p'_c x_c`` without ``from_logits``. When
    ``grad3`` is (B, C, S), the gradient ``u (q_c (sum_k w_k p'_k + 2 z v lse) - w_c p'_c)``
    (times ``1 - tanh(x_c / softcap)**2`` when capped), or ``-u w_c p'_c``, with ``u`` the
    element's upstream gradient. ``weight`` is empty when unweighted; ``softcap`` is 0 for
    none. Each element's values are read before its gradient is written, so ``grad3`` may
    be the input.
    """
    batch, classes, spatial = x3.shape
    want_grad = grad3.shape[0] == batch
    one_upstream = upstream.shape[0] == 1
    weighted = weight.shape[0] > 0
    for m in numba.prange(batch * spatial):
        b = m // spatial
        s = m % spatial
        if indices and t2[b, s] == ignore_index:
            losses[m] = 0.0
            if want_grad:
                for j in range(classes):
                    grad3[b, j, s] = 0.0
            continue
        top = 0.0
        log_norm = 0.0
        if from_logits and classes > 0:
            top = _logit(x3[b, 0, s], decode, softcap)
            for j in range(1, classes):
                value = _logit(x3[b, j, s], decode, softcap)
                top = value if value > top else top
            total = 0.0
            for j in range(classes):
                total += math.exp(_logit(x3[b, j, s], decode, softcap) - top)
            log_norm = math.log(total)
        dot = 0.0
        mass = 0.0
        for j in range(classes):
            p = _target_share(p3, t2, indices, decode, b, j, s, keep, share)
            if weighted:
                p *= np.float64(weight[j])
            value = _logit(x3[b, j, s], decode, softcap)
            dot += p * ((value - top) - log_norm if from_logits else value)
            mass += p
        lse = top + log_norm
        # no z term without z_loss: 0 * inf of an infinite row would be NaN
        with_z = z_loss > 0.0 and from_logits and classes > 0
        z_weight = np.float64(weight[t2[b, s]]) if indices and weighted else 1.0
        losses[m] = z_loss * z_weight * lse * lse - dot if with_z else -dot
        if not want_grad:
            continue
        u = upstream[0] if one_upstream else upstream[m]
        coefficient = mass + 2.0 * z_loss * z_weight * lse if with_z else mass
        for j in range(classes):
            p = _target_share(p3, t2, indices, decode, b, j, s, keep, share)
            if weighted:
                p *= np.float64(weight[j])
            if from_logits:
                value = _logit(x3[b, j, s], decode, softcap)
                q = math.exp((value - top) - log_norm)
                g = u * (q * coefficient - p)
                if softcap > 0.0:
                    slope = value / softcap
                    g *= 1.0 - slope * slope
            else:
                g = -(u * p)
            grad3[b, j, s] = g

"""numba kernels for ``from_logits``, ``label_smoothing``, probability targets, ``z_loss``
and ``softcap``: one visit of each input row.

For each target element the kernels compute, reading its row of C values once from
memory (a row is re-read from cache, not from memory, by the later loops):

* with logits (capped to ``c tanh(x / c)`` on the fly with ``softcap``), the row's
  maximum ``m`` and ``log_norm = log(sum_c exp(x_c - m))``, so ``log q_c = x_c - m -
  log_norm``, never stored; ``lse = m + log_norm``;
* the target term ``nll``: ``-w_t log q_t`` for a class index, ``-sum_c w_c p_c log q_c``
  for probabilities; with smoothing, ``smooth = -sum_c w_c log q_c``; with ``z_loss``,
  ``z v lse**2`` (``v = w_t``, 1 for probabilities); each in float64, for the caller to
  reduce;
* optionally the gradient, written once per element (it may overwrite the input:
  each element is read before it is written):
  ``a * q_c - e * w_c - b_c``, times ``1 - tanh(x_c / c)**2`` with a cap, where
  ``a = s ((1 - eps) sum_k w_k p_k + eps/C sum_k w_k + 2 z v lse)``, ``e = s eps/C`` and
  ``b_c = s (1 - eps) w_c p_c`` (a one-hot p for a class index; ``a = 0`` for
  log-probability input) and ``s`` the element's upstream gradient.

Sums accumulate in float64; ``exp`` and ``tanh`` of float32 values are polynomials that
vectorise (within 2 and 3 ulp; numba's ``math.exp`` calls libm once per element). Rows are
independent, so results do not depend on the thread count. Ignored elements get 0
everywhere.
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


@numba.njit(fastmath={"contract"}, error_model="numpy", cache=True)
def _tanh32(y):
    """tanh(y) for float32 y, in a form that vectorises (numba's ``math.tanh`` calls libm
    once per element): an odd Taylor polynomial of degree 9 below ``|y| = 1/4`` (truncation
    below 0.2 ulp), else ``(1 - e) / (1 + e)`` with ``e = exp(-2|y|)`` (within 3 ulp)."""
    a = abs(y)
    e = _exp32(np.float32(-2.0) * a)
    far = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    s = a * a
    near = np.float32(62.0 / 2835.0)
    near = near * s - np.float32(17.0 / 315.0)
    near = near * s + np.float32(2.0 / 15.0)
    near = near * s - np.float32(1.0 / 3.0)
    near = a + a * (near * s)
    r = near if a < np.float32(0.25) else far
    return r if y >= np.float32(0.0) else -r


def _tanh(x):
    """tanh in the value's own precision."""


@overload(_tanh)
def _tanh_by_type(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


@numba.njit(inline="always", error_model="numpy")
def _cap(value, cap):
    """``cap * tanh(value / cap)`` (Gemma 2's logit soft-capping); the value itself for
    ``cap = 0``, no cap. ``cap`` is in the value's compute type."""
    return cap * _tanh(value / cap) if cap > 0 else value


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _sum_of_exp(row, decode, top, cap):
    """sum_j exp(row[j] - top) of the (capped) row, in float64 over blocks of ``SUM_BLOCK``."""
    total = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        block = _in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            block += _exp(_cap(_decode(part[j], decode), cap) - top)
        total += np.float64(block)
    return total


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _weighted_sum(row, decode, weight, shift, cap):
    """sum_j weight[j] * (row[j] - shift) of the (capped) row, in float64 over blocks of
    ``SUM_BLOCK`` terms."""
    total = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        part_weight = weight[start : start + SUM_BLOCK]
        block = _in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            block += part_weight[j] * (_cap(_decode(part[j], decode), cap) - shift)
        total += np.float64(block)
    return total


@numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
def _probability_sums(row, p, decode, weight, shift, cap):
    """(sum_j w_j p_j (row[j] - shift) of the (capped) row, sum_j w_j p_j), each in float64
    over blocks of ``SUM_BLOCK`` terms; ``p`` is decoded as the row is."""
    dot = 0.0
    mass = 0.0
    for start in range(0, row.shape[0], SUM_BLOCK):
        part = row[start : start + SUM_BLOCK]
        part_p = p[start : start + SUM_BLOCK]
        part_weight = weight[start : start + SUM_BLOCK]
        block_dot = _in_compute_type(0.0, row)
        block_mass = _in_compute_type(0.0, row)
        for j in range(part.shape[0]):
            wp = part_weight[j] * _decode(part_p[j], decode)
            block_dot += wp * (_cap(_decode(part[j], decode), cap) - shift)
            block_mass += wp
        dot += np.float64(block_dot)
        mass += np.float64(block_mass)
    return dot, mass


# reassociation lets the row sums vectorise (in a fixed order: the same bits every run)
_FAST = {"contract", "reassoc"}


@_parallel_and_serial(fastmath=_FAST)
def softmax_rows(
    x2, t1, p2, ignore_index, weight, weight_sum, decode, from_logits, smoothing, z_loss,
    softcap, upstream, target_scale, smooth_scale, nll, smooth, z_terms, grad2,
):  # fmt: skip
    """(N, C) input: per row, the statistics above; the gradient when ``grad2`` is (N, C).

    The targets are the class indices ``t1`` or, when ``p2`` is (N, C), the probabilities
    ``p2`` (decoded as ``x2``). ``weight`` holds C values (ones when unweighted) in the
    gradient's dtype, ``weight_sum`` their sum; ``upstream`` is one value per row or a
    single one. ``softcap`` is 0 for no cap; ``z_terms`` gets ``z v lse**2`` per row when
    ``z_loss`` > 0 (and has no values otherwise).
    """
    rows, classes = x2.shape
    want_grad = grad2.shape[0] == rows
    one_upstream = upstream.shape[0] == 1
    probabilities = p2.shape[0] == rows
    with_z = z_loss > 0.0
    cap = _in_compute_type(softcap, x2)
    for i in numba.prange(rows):
        target = 0 if probabilities else t1[i]
        if classes == 0 or (not probabilities and target == ignore_index):
            nll[i] = 0.0
            smooth[i] = 0.0
            if with_z:
                z_terms[i] = 0.0
            if want_grad:
                for j in range(classes):
                    grad2[i, j] = 0.0
            continue
        row = x2[i]
        top = _in_compute_type(0.0, x2)
        log_norm = 0.0
        if from_logits:
            top = _cap(_row_max(row, decode), cap)  # the cap keeps the order
            log_norm = math.log(_sum_of_exp(row, decode, top, cap))
        lse = np.float64(top) + log_norm
        at_logit = top  # the target's (capped) logit, for a class index
        if probabilities:
            dot, mass = _probability_sums(row, p2[i], decode, weight, top, cap)
            nll[i] = -(dot - log_norm * mass)
            element_weight = 1.0
        else:
            mass = np.float64(weight[target])
            at_logit = _cap(_decode(row[target], decode), cap)
            nll[i] = -(mass * (np.float64(at_logit) - lse))
            element_weight = mass
        if smoothing:
            smooth[i] = -(_weighted_sum(row, decode, weight, top, cap) - log_norm * weight_sum)
        else:
            smooth[i] = 0.0
        if with_z:
            z_terms[i] = z_loss * element_weight * lse * lse
        if not want_grad:
            continue
        s = upstream[0] if one_upstream else upstream[i]
        keep = s * target_scale  # times w_t at the target, or w_c p_c everywhere
        per_weight = _in_compute_type(s * smooth_scale, grad2)
        per_probability = _in_compute_type(keep, grad2)
        out = grad2[i]
        p_row = p2[i] if probabilities else row  # 1-D rows: the class loops vectorise
        if from_logits:
            a = keep * mass
            if smoothing:  # (the weight sum only then: a NaN weight of an unused class
                a += s * smooth_scale * weight_sum  # must not reach the gradient)
            if with_z:  # d(z v lse**2)/dx_c = 2 z v lse q_c
                a += 2.0 * z_loss * element_weight * lse * s
            a = _in_compute_type(a, grad2)
            # (x - top) - log_norm, as torch's log_softmax: top + log_norm rounded to
            # float32 would be off by its ulp (0.001 at 1e4)
            row_log_norm = _in_compute_type(log_norm, x2)
            for j in range(classes):
                value = _cap(_decode(row[j], decode), cap)
                g = a * _exp((value - top) - row_log_norm)
                if smoothing:  # (a NaN weight must not reach the gradient without it)
                    g -= per_weight * weight[j]
                if probabilities:
                    g -= per_probability * (weight[j] * _decode(p_row[j], decode))
                if cap > 0:  # through the cap: d(c tanh(x / c))/dx = 1 - tanh(x / c)**2
                    slope = value / cap
                    g *= 1 - slope * slope
                out[j] = g
        else:
            for j in range(classes):
                g = -(per_weight * weight[j])
                if probabilities:
                    g -= per_probability * (weight[j] * _decode(p_row[j], decode))
                out[j] = g
        if not probabilities:
            at_target = _in_compute_type(keep * mass, grad2)
            if cap > 0:  # (the target's logit read before its row was written)
                slope = at_logit / cap
                at_target *= 1 - slope * slope
            out[target] -= at_target


@_parallel_and_serial(fastmath=_FAST)
def softmax_tiles(
    x3, t2, p3, ignore_index, weight, weight_sum, decode, from_logits, smoothing, z_loss,
    softcap, upstream, target_scale, smooth_scale, nll, smooth, z_terms, grad3,
):  # fmt: skip
    """(B, C, S) input with S > 1: as ``softmax_rows``, over tiles of ``TILE`` elements of
    the spatial axis (``nll``, ``smooth``, ``z_terms`` and ``upstream`` are flat over
    (B, S); ``p3`` is (B, C, S) for probabilities)."""
    batch, classes, spatial = x3.shape
    want_grad = grad3.shape[0] == batch
    one_upstream = upstream.shape[0] == 1
    probabilities = p3.shape[0] == batch
    with_z = z_loss > 0.0
    cap = _in_compute_type(softcap, x3)
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
        top[:] = 0.0
        total = np.zeros(width, dtype=np.float64)
        weighted = np.zeros(width, dtype=np.float64)
        dots = np.zeros(width, dtype=np.float64)
        masses = np.zeros(width, dtype=np.float64)
        if from_logits and classes > 0:
            for k in range(width):
                top[k] = _decode(x3[b, 0, start + k], decode)
            for j in range(classes):
                xs = x3[b, j, cells]
                for k in range(width):
                    value = _decode(xs[k], decode)
                    top[k] = value if value > top[k] else top[k]
            for k in range(width):
                top[k] = _cap(top[k], cap)  # the cap keeps the order
            # sums over blocks of classes in the compute dtype, each block's added in float64
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    xs = x3[b, j, cells]
                    for k in range(width):
                        value = _cap(_decode(xs[k], decode), cap)
                        partial[k] += _exp(value - top[k])
                for k in range(width):
                    total[k] += np.float64(partial[k])
        if smoothing:
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    w = weight[j]
                    xs = x3[b, j, cells]
                    for k in range(width):
                        value = _cap(_decode(xs[k], decode), cap)
                        partial[k] += w * (value - top[k])
                for k in range(width):
                    weighted[k] += np.float64(partial[k])
        if probabilities:
            for first in range(0, classes, CLASS_BLOCK):
                partial[:] = 0.0
                second[:] = 0.0
                for j in range(first, min(first + CLASS_BLOCK, classes)):
                    w = weight[j]
                    xs = x3[b, j, cells]
                    ps = p3[b, j, cells]
                    for k in range(width):
                        wp = w * _decode(ps[k], decode)
                        value = _cap(_decode(xs[k], decode), cap)
                        partial[k] += wp * (value - top[k])
                        second[k] += wp
                for k in range(width):
                    dots[k] += np.float64(partial[k])
                    masses[k] += np.float64(second[k])
        # per element: statistics, and the gradient's coefficients (0 where ignored)
        log_norms = _compute_buffer(width, x3)
        a = np.zeros(width, dtype=grad3.dtype)
        per_weight = np.zeros(width, dtype=grad3.dtype)
        per_probability = np.zeros(width, dtype=grad3.dtype)
        at_target = np.zeros(width, dtype=np.float64)
        any_ignored = False
        for k in range(width):
            m = b * spatial + start + k
            target = 0 if probabilities else t2[b, start + k]
            if not probabilities and target == ignore_index:
                nll[m] = 0.0
                smooth[m] = 0.0
                if with_z:
                    z_terms[m] = 0.0
                any_ignored = True
                continue
            log_norm = 0.0
            if from_logits and classes > 0:
                log_norm = math.log(total[k])
            log_norms[k] = log_norm  # subtracted after top, as in softmax_rows
            lse = np.float64(top[k]) + log_norm
            value = top[k]  # the target's (capped) logit, for a class index
            if probabilities:
                mass = masses[k]
                nll[m] = -(dots[k] - log_norm * mass)
                element_weight = 1.0
            else:
                mass = np.float64(weight[target])
                value = _cap(_decode(x3[b, target, start + k], decode), cap)
                nll[m] = -(mass * (np.float64(value) - lse))
                element_weight = mass
            smooth[m] = -(weighted[k] - log_norm * weight_sum) if smoothing else 0.0
            if with_z:
                z_terms[m] = z_loss * element_weight * lse * lse if classes > 0 else 0.0
            s = upstream[0] if one_upstream else upstream[m]
            keep = s * target_scale
            at_target[k] = keep * mass
            if cap > 0 and not probabilities:  # read now: the gradient may overwrite x
                slope = value / cap
                at_target[k] *= 1 - slope * slope
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
                g = _in_compute_type(0.0, grad3)
                value = top[k]  # (read with a cap only, which needs logits)
                if from_logits:
                    value = _cap(_decode(xs[k], decode), cap)
                    g = a[k] * _exp((value - top[k]) - log_norms[k])
                if smoothing:
                    g -= per_weight[k] * w
                if probabilities:
                    g -= per_probability[k] * (w * _decode(ps[k], decode))
                if cap > 0:
                    slope = value / cap
                    g *= 1 - slope * slope
                out[k] = g
        if not probabilities:
            for k in range(width):
                target = t2[b, start + k]
                if target != ignore_index:
                    grad3[b, target, start + k] -= _in_compute_type(at_target[k], grad3)
        if any_ignored:  # nothing from an ignored element, not even its NaN or inf
            for k in range(width):
                if t2[b, start + k] == ignore_index:
                    for j in range(classes):
                        grad3[b, j, start + k] = 0.0

"""numba kernel of the per-token statistics (``nllloss.token_stats``): one visit of each row.

For row ``n`` of (N, C) logits ``x`` and its target ``t``, with ``z = cap(x) / T``
(``cap(x) = c tanh(x / c)`` with a cap, ``T`` the temperature), the kernel walks the row
once, in blocks of ``BLOCK`` values (a block is read from memory once; its second loop
reads it from L1), keeping online

* the running maximum ``m`` and, with it, the index of its first occurrence (the argmax);
* ``s = sum_c exp(z_c - m)`` and ``u = sum_c exp(z_c - m) (z_c - m)``, both rescaled by
  ``exp(m_old - m_new)`` (and ``u`` shifted by ``(m_old - m_new) s``) when a block raises
  the maximum;

so that ``lse = m + log s``, the softmax mean ``sum_c p_c z_c = m + u / s`` and
``entropy = lse - sum_c p_c z_c = log s - u / s`` (``0 log 0 = 0``: a value of ``-inf``
adds nothing), ``logprob = (z_t - m) - log s``. The row's ``(m, log s, u / s)`` are kept
for the gradient, which is one more pass over the row with the upstream gradients
``a`` (of logprob), ``b`` (of entropy) and ``g`` (of lse):

    d/dz_c = a [c = t] - p_c (a - g + b (z_c - sum_k p_k z_k)),
    d/dx_c = d/dz_c * (1 - tanh(x_c / c)**2) / T

(``d logprob / dz_c = [c = t] - p_c``, ``d entropy / dz_c = -p_c (z_c - sum_k p_k z_k)``,
``d lse / dz_c = p_c``; a class with ``p_c = 0`` gets 0, not ``0 * -inf``; an ignored
target has no logprob term). Block sums are in the compute dtype (float32 for 16-bit and
float32 input), each block's added in float64; rows are independent, so results do not
depend on the thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._kernels import decoded, parallel_and_serial
from ._softmax import cap_and_slope, exp, in_compute_type, row_max, soft_capped

# Values of a row per block: 4 KiB of float32, in L1 for the block's second loop; the
# same as the loss kernels' sum blocks (``_softmax.SUM_BLOCK``).
BLOCK = 1024

_FAST = {"contract", "reassoc"}


@numba.njit(inline="always", error_model="numpy")
def _tempered(value, cap, temperature):
    """``z = cap(x) / T`` in the value's compute type."""
    return soft_capped(value, cap) / temperature


@numba.njit(fastmath=_FAST, error_model="numpy", cache=True)
def _row_statistics(row, decode, cap, temperature):
    """(m, log s, u / s, argmax) of one row (see the module)."""
    n = row.shape[0]
    top = in_compute_type(-np.inf, row)
    zero = in_compute_type(0.0, row)
    total = 0.0
    weighted = 0.0
    arg = 0
    for start in range(0, n, BLOCK):
        part = row[start : start + BLOCK]
        best = _tempered(row_max(part, decode), cap, temperature)
        if best > top:
            # a new maximum: the first index where z equals it (a minimum over the block,
            # which vectorises; z, not x: the cap and the division may tie distinct x)
            size = part.shape[0]
            where = size
            for j in range(size):
                hit = _tempered(decoded(part[j], decode), cap, temperature) == best
                where = min(where, j if hit else size)
            if where == size:  # (not met again: a scan that keeps the first largest z)
                where = 0
                best = _tempered(decoded(part[0], decode), cap, temperature)
                for j in range(1, size):
                    z = _tempered(decoded(part[j], decode), cap, temperature)
                    if z > best:
                        best = z
                        where = j
            if total > 0.0:
                shift = np.float64(top) - np.float64(best)
                scale = math.exp(shift)
                weighted = scale * (weighted + shift * total)
                total = scale * total
            top = best
            arg = start + where
        block_total = zero
        block_weighted = zero
        for j in range(part.shape[0]):
            d = _tempered(decoded(part[j], decode), cap, temperature) - top
            e = exp(d)
            block_total += e
            block_weighted += e * (d if e > zero else zero)  # 0, not 0 * -inf
        total += np.float64(block_total)
        weighted += np.float64(block_weighted)
    log_norm = math.log(total)
    if log_norm != log_norm:  # a NaN in the row: the argmax is the first NaN, as torch's
        for j in range(n):
            z = _tempered(decoded(row[j], decode), cap, temperature)
            if z != z:
                arg = j
                break
    return top, log_norm, weighted / total, arg


@parallel_and_serial(fastmath=_FAST)
def stats_rows(
    x2, t1, ignore_index, decode, cap, temperature, reuse, saved, upstream,
    logprob, entropy, lse, argmax, grad2,
):  # fmt: skip
    """(N, C) logits (16-bit ones as bits with their ``decode`` table): per row, the
    statistics and, when ``grad2`` is (N, C), the gradient.

    ``saved`` is (N, 3) float64: each row's ``(m, log s, u / s)``, written by the
    statistics pass, or read (``reuse``) to write the gradient without it (then
    ``logprob``, ``entropy``, ``lse`` and ``argmax`` are not written). ``upstream`` is
    (N, 3) float64: the upstream gradients of logprob, entropy and lse per row. Targets
    are in range or ``ignore_index`` (checked before). ``cap`` is 0 for no cap.
    ``grad2`` may be ``x2`` itself: a row is read before it is written.
    """
    rows, classes = x2.shape
    want_grad = grad2.shape[0] == rows
    c = in_compute_type(cap, x2)
    t = in_compute_type(temperature, x2)
    for i in numba.prange(rows):
        row = x2[i]
        target = t1[i]
        ignored = target == ignore_index
        if reuse:
            top = in_compute_type(saved[i, 0], x2)
            log_norm = saved[i, 1]
            shift = saved[i, 2]
        else:
            top, log_norm, shift, arg = _row_statistics(row, decode, c, t)
            saved[i, 0] = top
            saved[i, 1] = log_norm
            saved[i, 2] = shift
            lse[i] = np.float64(top) + log_norm
            entropy[i] = log_norm - shift
            argmax[i] = arg
            if ignored:
                logprob[i] = 0.0
            else:
                at = _tempered(decoded(row[target], decode), c, t)
                logprob[i] = (np.float64(at) - np.float64(top)) - log_norm
        if not want_grad:
            continue
        a = upstream[i, 0] if not ignored else 0.0
        common = in_compute_type(a - upstream[i, 2], grad2)
        slope_b = in_compute_type(upstream[i, 1], grad2)
        row_log_norm = in_compute_type(log_norm, grad2)
        row_shift = in_compute_type(shift, grad2)
        inverse = in_compute_type(1.0 / temperature, grad2)
        zero = in_compute_type(0.0, grad2)
        at_target = zero
        if not ignored:  # read now: the gradient may be written over the logits
            at_target = in_compute_type(a / temperature, grad2)
            if c > 0:
                at_target *= cap_and_slope(decoded(row[target], decode), c)[1]
        out = grad2[i]
        for j in range(classes):
            x = decoded(row[j], decode)
            value = soft_capped(x, c)
            d = value / t - top
            p = exp(d - row_log_norm)
            g = p * (common + slope_b * (d - row_shift))
            g = zero if p == zero else g
            if c > 0:  # d(c tanh(x / c))/dx = 1 - tanh(x / c)**2, without cancellation
                g *= cap_and_slope(x, c)[1]
            out[j] = -(g * inverse)
        if not ignored:
            out[target] += at_target

"""numba kernels for the NumPy path. Imported only when NumPy arrays first arrive.

Arrays arrive as ``x3 = (B, C, S)`` views (``(N, C)`` is ``(N, C, 1)``) and targets as
``(B, S)``; flat element ``m = b * S + s`` is torch's summation order. Elementwise work
runs in parallel over blocks of elements; the reductions run torch's cascade loop
sequentially, so results do not depend on the thread count.

16-bit inputs are passed as their uint16 bit patterns together with a 65,536-entry
float32 table that decodes them exactly (numba has no float16 or bfloat16 on the CPU);
float32/float64 inputs pass an empty table and are used as they are.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

# Elements per parallel block: large enough to amortise scheduling (measured on 2 cores:
# 16384 and 65536 time the same for (1048576, 10); 4096 is ~10% slower).
BLOCK = 16384
LEVELS = 8

# error_model="numpy": IEEE results for x/0 (as torch), no Python exception checks in loops.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_pjit = numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")


def _decode(element, table):
    """The float value of an input element: itself, or the table entry for its 16-bit pattern."""


@overload(_decode, inline="always")
def _decode_by_type(element, table):
    # Chosen when the kernel compiles, from the element's type: no per-element test.
    if isinstance(element, types.Integer):
        return lambda element, table: table[element]
    return lambda element, table: element


@_pjit
def gather_losses(x3, t2, ignore_index, weight, decode, losses, weights, valid):
    """Per element: loss ``-(x[t] * w[t])`` (``-x[t]`` unweighted) and ``w[t]``; 0 where ignored.

    ``weight`` is empty when unweighted (then ``weights`` is not written). ``valid`` gets 1
    for counted elements, 0 for ignored ones. Returns the flat index of the first target
    that is neither a class index nor ``ignore_index``, or -1.
    """
    batch, spatial = t2.shape
    classes = x3.shape[1]
    size = batch * spatial
    weighted = weight.shape[0] > 0
    n_blocks = (size + BLOCK - 1) // BLOCK
    first_bad = np.full(n_blocks, size)  # per block: a min-reduction across threads is slow
    zero = losses.dtype.type(0)
    for block in numba.prange(n_blocks):
        start = block * BLOCK
        stop = min(start + BLOCK, size)
        b = start // spatial
        s = start - b * spatial
        for m in range(start, stop):
            target = np.int64(t2[b, s])
            if target == ignore_index:
                losses[m] = zero
                valid[m] = 0
                if weighted:
                    weights[m] = zero
            elif target < 0 or target >= classes:
                first_bad[block] = min(first_bad[block], m)
                losses[m] = zero
                valid[m] = 0
            else:
                value = _decode(x3[b, target, s], decode)
                valid[m] = 1
                if weighted:
                    w = weight[target]
                    losses[m] = -(value * w)
                    weights[m] = w
                else:
                    losses[m] = -value
            s += 1  # next (b, s) without a division per element
            if s == spatial:
                s = 0
                b += 1
    return _first(first_bad, size)


@_pjit
def target_index(t2, ignore_index, classes, index):
    """Per element: the class index, or -1 where ignored. Returns the first bad flat index or -1."""
    batch, spatial = t2.shape
    size = batch * spatial
    n_blocks = (size + BLOCK - 1) // BLOCK
    first_bad = np.full(n_blocks, size)
    for block in numba.prange(n_blocks):
        start = block * BLOCK
        stop = min(start + BLOCK, size)
        b = start // spatial
        s = start - b * spatial
        for m in range(start, stop):
            target = np.int64(t2[b, s])
            if target == ignore_index:
                index[m] = -1
            elif target < 0 or target >= classes:
                first_bad[block] = min(first_bad[block], m)
                index[m] = -1
            else:
                index[m] = target
            s += 1
            if s == spatial:
                s = 0
                b += 1
    return _first(first_bad, size)


@_jit
def divide(numerator, denominator):
    """IEEE division in the operands' dtype (0/0 is NaN, x/0 is ±inf), without NumPy's warnings."""
    return numerator / denominator


@_jit
def _first(first_bad, size):
    """The smallest flagged flat index, or -1."""
    smallest = size
    for value in first_bad:
        smallest = min(smallest, value)
    return smallest if smallest < size else -1


@_jit
def _level_mask(size):
    """torch's ``(1 << power) - 1`` with ``power = max(4, CeilLog2(size) / 8)``; and power."""
    ceil_log2 = 0
    while (np.int64(1) << ceil_log2) < size:
        ceil_log2 += 1
    power = max(4, ceil_log2 // LEVELS)
    return (np.int64(1) << power) - 1, power


@_jit
def fused_reduce(x3, t2, ignore_index, weight, decode, levels):
    """Sequential gather and cascade in one pass: (loss sum, weight sum, count, first bad).

    For few elements, where one compiled call beats a parallel gather plus a second pass.
    ``levels`` is a (2, 8) array of zeros in the accumulation dtype (the partial sums of
    the losses and of the weights); the weight sum stays 0 when unweighted.
    """
    batch, spatial = t2.shape
    classes = x3.shape[1]
    size = batch * spatial
    mask, power = _level_mask(size)
    weighted = weight.shape[0] > 0
    losses = levels[0]
    weights = levels[1]
    dtype_zero = levels.dtype.type(0)
    count = 0
    m = 0
    for b in range(batch):
        for s in range(spatial):
            target = np.int64(t2[b, s])
            if target != ignore_index:
                if target < 0 or target >= classes:
                    return dtype_zero, dtype_zero, count, m
                value = _decode(x3[b, target, s], decode)
                count += 1
                if weighted:
                    w = weight[target]
                    losses[0] += -(value * w)
                    weights[0] += w
                else:
                    losses[0] += -value
                for j in range(LEVELS - 1):
                    if (m & (mask << (j * power))) != 0:
                        break
                    losses[j + 1] += losses[j]
                    losses[j] = dtype_zero
                    weights[j + 1] += weights[j]
                    weights[j] = dtype_zero
            m += 1
    loss_sum = dtype_zero
    weight_sum = dtype_zero
    for j in range(LEVELS):
        loss_sum += losses[j]
        weight_sum += weights[j]
    return loss_sum, weight_sum, count, -1


@_jit
def cascade_sum(values, valid):
    """torch's eight-level cascade sum over the valid elements, in ``values.dtype``."""
    size = values.shape[0]
    mask, power = _level_mask(size)
    zero = values.dtype.type(0)
    levels = np.zeros(LEVELS, dtype=values.dtype)
    for m in range(size):
        if valid[m] == 0:
            continue
        levels[0] += values[m]
        for j in range(LEVELS - 1):
            if (m & (mask << (j * power))) != 0:
                break
            levels[j + 1] += levels[j]
            levels[j] = zero
    total = zero
    for j in range(LEVELS):
        total += levels[j]
    return total


@_pjit
def gradient_values(index, weight, upstream, out):
    """Per element: ``w[t] * upstream[m]`` (``upstream[m]`` unweighted), 0 where ignored.

    ``upstream`` has one value per element, or one value for all.
    """
    size = index.shape[0]
    weighted = weight.shape[0] > 0
    shared = upstream.shape[0] == 1
    n_blocks = (size + BLOCK - 1) // BLOCK
    for block in numba.prange(n_blocks):
        start = block * BLOCK
        stop = min(start + BLOCK, size)
        for m in range(start, stop):
            g = upstream[0] if shared else upstream[m]
            i = index[m]
            if i < 0:
                out[m] = out.dtype.type(0)
            elif weighted:
                out[m] = weight[i] * g
            else:
                out[m] = g


@_pjit
def scatter_rows(grad3, index, values):
    """Write every element of ``grad3`` (B, C, S) once: ``values[m]`` at its class, 0 elsewhere.

    Works on any dtype, also on the bit patterns of 16-bit floats (zero is all-zero bits).
    """
    batch, classes, spatial = grad3.shape
    zero = grad3.dtype.type(0)
    if spatial == 1:
        for b in numba.prange(batch):
            for c in range(classes):
                grad3[b, c, 0] = zero
            i = index[b]
            if i >= 0:
                grad3[b, i, 0] = values[b]
        return
    for b in numba.prange(batch):
        base = b * spatial
        for c in range(classes):
            for s in range(spatial):
                grad3[b, c, s] = values[base + s] if index[base + s] == c else zero

"""numba kernels for the NumPy path. Imported only when NumPy arrays first arrive.

Arrays arrive as ``x3 = (B, C, S)`` views (``(N, C)`` is ``(N, C, 1)``) and targets as
``(B, S)``; flat element ``m = b * S + s`` is torch's summation order. Elementwise work
runs in parallel over blocks of elements. Reductions keep torch's cascade exactly: small
ones in one sequential pass (``fused_reduce``), large ones as parallel sums of the
cascade's 16-element blocks followed by a sequential cascade over those sums
(``block_sums``, ``cascade_over_blocks``). Results never depend on the thread count.

16-bit inputs are passed as their uint16 bit patterns together with a 65,536-entry
float32 table that decodes them exactly (numba has no float16 or bfloat16 on the CPU);
float32/float64 inputs pass an empty table and are used as they are.
"""

from __future__ import annotations

import types as types_module

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from ._threads import Guarded

# Elements per parallel block: large enough to amortise scheduling (measured on 2 cores:
# 16384 and 65536 time the same for (1048576, 10); 4096 is ~10% slower).
BLOCK = 16384
LEVELS = 8

# error_model="numpy": IEEE results for x/0 (as torch), no Python exception checks in loops.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


def parallel_and_serial(function=None, **options):
    """The kernel with prange over threads, and its serial twin (same source) as ``.serial``.

    Called through ``run(work, ...)``, the kernel runs the twin that has lately been faster
    for work of that size (``_threads``: threads do not pay for small work, nor on a busy
    machine). Where the parallel kernel is unsafe (a forked child, another thread in a
    parallel kernel), the twin runs too. ``options`` (keywords only) replace numba's, e.g.
    ``fastmath``.
    """
    if function is None:
        return lambda function: parallel_and_serial(function, **options)
    settings = {"cache": True, "nogil": True, "error_model": "numpy", **options}
    parallel = numba.njit(parallel=True, **settings)(function)
    # numba's disk cache tells kernels apart by qualified name and line, not by `parallel`:
    # the twin gets its own name, or one could load the other's machine code.
    twin = types_module.FunctionType(
        function.__code__,
        function.__globals__,
        function.__name__ + "_serial",
        function.__defaults__,
        function.__closure__,
    )
    twin.__qualname__ = function.__qualname__ + "_serial"
    return Guarded(parallel, numba.njit(**settings)(twin))


def decoded(element, table):
    """The float value of an input element: itself, or the table entry for its 16-bit pattern."""


@overload(decoded, inline="always")
def _decode_by_type(element, table):
    # Chosen when the kernel compiles, from the element's type: no per-element test.
    if isinstance(element, types.Integer):
        return lambda element, table: table[element]
    return lambda element, table: element


@parallel_and_serial
def elementwise_losses(x3, t2, ignore_index, weight, decode, losses):
    """Per element: ``-(x[t] * w[t])`` (``-x[t]`` unweighted), +0.0 where ignored.

    Returns the flat index of the first target that is neither a class index nor
    ``ignore_index``, or -1.
    """
    batch, spatial = t2.shape
    size = batch * spatial
    n_blocks = (size + BLOCK - 1) // BLOCK
    first_bad = np.full(n_blocks, size)  # per block: a min-reduction across threads is slow
    for block in numba.prange(n_blocks):
        start = block * BLOCK
        stop = min(start + BLOCK, size)
        b = start // spatial
        s = start - b * spatial
        for m in range(start, stop):
            loss, _, status = _element(x3, t2, ignore_index, weight, decode, b, s)
            losses[m] = loss
            if status < 0:
                first_bad[block] = min(first_bad[block], m)
            s += 1  # next (b, s) without a division per element
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
def _flush(levels, m, mask, power):
    """torch's flush after adding element m: level j goes into j + 1 while m's j-th group
    of ``power`` bits is zero."""
    for j in range(LEVELS - 1):
        if (m & (mask << (j * power))) != 0:
            return
        levels[j + 1] += levels[j]
        levels[j] = 0


@_jit
def _total(levels):
    """The levels added in order, starting from +0.0 (torch's std::accumulate)."""
    total = levels.dtype.type(0)
    for j in range(LEVELS):
        total += levels[j]
    return total


@_jit
def _level_mask(size):
    """torch's ``(1 << power) - 1`` with ``power = max(4, CeilLog2(size) / 8)``; and power."""
    ceil_log2 = 0
    while (np.int64(1) << ceil_log2) < size:
        ceil_log2 += 1
    power = max(4, ceil_log2 // LEVELS)
    return (np.int64(1) << power) - 1, power


@_jit
def fused_reduce(x3, t2, ignore_index, weight, decode, mean):
    """Sequential gather and cascade in one pass: (the 'sum' or 'mean' loss, first bad or -1).

    For few elements, where one compiled call beats a parallel gather plus a second pass.
    Accumulates in ``weight.dtype`` (``weight`` is empty when unweighted).
    """
    batch, spatial = t2.shape
    classes = x3.shape[1]
    size = batch * spatial
    mask, power = _level_mask(size)
    weighted = weight.shape[0] > 0
    losses = np.zeros(LEVELS, dtype=weight.dtype)
    weights = np.zeros(LEVELS, dtype=weight.dtype)
    dtype_zero = weight.dtype.type(0)
    count = 0
    m = 0
    for b in range(batch):
        for s in range(spatial):
            target = np.int64(t2[b, s])
            if target != ignore_index:
                if target < 0 or target >= classes:
                    return dtype_zero, m
                value = decoded(x3[b, target, s], decode)
                count += 1
                if weighted:
                    w = weight[target]
                    losses[0] += -(value * w)
                    weights[0] += w
                else:
                    losses[0] += -value
                _flush(losses, m, mask, power)
                _flush(weights, m, mask, power)
            m += 1
    loss_sum = _total(losses)
    weight_sum = _total(weights)
    if not mean:
        return loss_sum, -1
    total = weight_sum if weighted else weight.dtype.type(count)
    return loss_sum / total, -1


# Blocks of 16 per parallel task in block_sums (16 * 1024 elements, as BLOCK).
TASK_BLOCKS = 1024


@_jit
def _element(x3, t2, ignore_index, weight, decode, b, s):
    """(loss, weight, status) of one element: status 1 counted, 0 ignored, -1 out of range."""
    zero = weight.dtype.type(0)  # the accumulation dtype, also when unweighted (empty)
    target = np.int64(t2[b, s])
    if target == ignore_index:
        return zero, zero, 0
    if target < 0 or target >= x3.shape[1]:
        return zero, zero, -1
    value = decoded(x3[b, target, s], decode)
    if weight.shape[0] > 0:
        w = weight[target]
        return -(value * w), w, 1
    return -value, zero, 1


@parallel_and_serial
def block_sums(x3, t2, ignore_index, weight, decode, step, sums):
    """Parallel first pass of the cascade: the sum of each block of ``step`` elements.

    Block k holds the flat elements ``k*step + 1 .. (k+1)*step`` (element 0 stands alone),
    so that it ends at a flush point of torch's cascade. ``sums[k]`` gets the sequential
    sums of the block's losses and weights, each started from +0.0: exactly what level 0
    of the cascade holds at the block's end whenever the flush before the block happened.
    Returns (number of counted elements, first out-of-range flat index or -1); element 0
    is checked and counted here too.
    """
    batch, spatial = t2.shape
    size = batch * spatial
    n_blocks = sums.shape[0]
    n_tasks = (n_blocks + TASK_BLOCKS - 1) // TASK_BLOCKS
    counts = np.zeros(max(n_tasks, 1), dtype=np.int64)
    first_bad = np.full(max(n_tasks, 1), size)
    zero = sums.dtype.type(0)
    if size > 0:
        _, _, status = _element(x3, t2, ignore_index, weight, decode, 0, 0)
        if status < 0:
            return 0, 0
        counts[0] = status
    rows = spatial == 1  # (N, C): element m is row m, no (b, s) bookkeeping
    for task in numba.prange(n_tasks):
        first_block = task * TASK_BLOCKS
        last_block = min(first_block + TASK_BLOCKS, n_blocks)
        b = (first_block * step + 1) // spatial
        s = first_block * step + 1 - b * spatial
        count = 0
        for k in range(first_block, last_block):
            loss_acc = zero
            weight_acc = zero
            for m in range(k * step + 1, min((k + 1) * step, size - 1) + 1):
                if rows:
                    b = m
                loss, w, status = _element(x3, t2, ignore_index, weight, decode, b, s)
                if status > 0:
                    loss_acc += loss
                    weight_acc += w
                    count += 1
                elif status < 0 and first_bad[task] == size:
                    first_bad[task] = m
                if not rows:
                    s += 1
                    if s == spatial:
                        s = 0
                        b += 1
            sums[k, 0] = loss_acc
            sums[k, 1] = weight_acc
        counts[task] += count
    return counts.sum(), _first(first_bad, size)


@_jit
def cascade_over_blocks(x3, t2, ignore_index, weight, decode, step, sums):
    """Second pass: torch's cascade, fed whole blocks from ``block_sums``; (loss, weight) sums.

    A block whose leading flush point was ignored continues a level-0 sum that was not
    reset, so its elements are added one by one, as torch does; every other block enters
    as its precomputed sum.
    """
    batch, spatial = t2.shape
    size = batch * spatial
    mask, power = _level_mask(size)
    losses = np.zeros(LEVELS, dtype=sums.dtype)
    weights = np.zeros(LEVELS, dtype=sums.dtype)
    fresh = True  # level 0 was just reset (or never written)
    for k in range(-1, sums.shape[0]):
        if k < 0:  # element 0, alone
            last = 0
            loss, w, status = _element(x3, t2, ignore_index, weight, decode, 0, 0)
            if status > 0:
                losses[0] += loss
                weights[0] += w
        else:
            last = min((k + 1) * step, size - 1)
            if fresh:
                losses[0] = sums[k, 0]
                weights[0] = sums[k, 1]
            else:
                for m in range(k * step + 1, last + 1):
                    b = m // spatial
                    s = m - b * spatial
                    loss, w, status = _element(x3, t2, ignore_index, weight, decode, b, s)
                    if status > 0:
                        losses[0] += loss
                        weights[0] += w
        fresh = False
        b = last // spatial
        if (last & mask) == 0 and np.int64(t2[b, last - b * spatial]) != ignore_index:
            _flush(losses, last, mask, power)
            _flush(weights, last, mask, power)
            fresh = True
    return _total(losses), _total(weights)


@_jit
def cascade_sum(values, valid):
    """torch's eight-level cascade sum over the valid elements, in ``values.dtype``."""
    size = values.shape[0]
    mask, power = _level_mask(size)
    levels = np.zeros(LEVELS, dtype=values.dtype)
    for m in range(size):
        if valid[m] == 0:
            continue
        levels[0] += values[m]
        _flush(levels, m, mask, power)
    return _total(levels)


@parallel_and_serial
def count_counted(t2, ignore_index, classes):
    """(number of non-ignored elements, first out-of-range flat index or -1)."""
    batch, spatial = t2.shape
    size = batch * spatial
    n_blocks = (size + BLOCK - 1) // BLOCK
    first_bad = np.full(max(n_blocks, 1), size)
    counts = np.zeros(max(n_blocks, 1), dtype=np.int64)
    for block in numba.prange(n_blocks):
        start = block * BLOCK
        b = start // spatial
        s = start - b * spatial
        count = 0
        for m in range(start, min(start + BLOCK, size)):
            target = np.int64(t2[b, s])
            if target != ignore_index:
                if (target < 0 or target >= classes) and first_bad[block] == size:
                    first_bad[block] = m
                count += 1
            s += 1
            if s == spatial:
                s = 0
                b += 1
        counts[block] = count
    return counts.sum(), _first(first_bad, size)


@parallel_and_serial
def write_gradient(t2, ignore_index, class_values, upstream, grad3, zeroed):
    """Write every element of ``grad3`` (B, C, S) once: the gradient, zero off the targets.

    The value at ``(b, t, s)`` (flat element m) is ``class_values[t] * upstream[m]``; an
    empty ``upstream`` leaves ``class_values[t]``, an empty ``class_values`` leaves
    ``upstream[m]``, and a ``class_values`` of one entry serves every class. With one of
    the two empty no arithmetic is done, so 16-bit floats pass as their bit patterns (zero
    is all-zero bits). With ``zeroed`` (``grad3`` holds zeros already) only the targets'
    values are written. Targets must have been checked.
    """
    batch, classes, spatial = grad3.shape
    zero = grad3.dtype.type(0)
    for b in numba.prange(batch):
        if zeroed:
            for s in range(spatial):
                target = np.int64(t2[b, s])
                if target != ignore_index:
                    value = _gradient_value(class_values, upstream, target, b * spatial + s)
                    grad3[b, target, s] = value
            continue
        if spatial == 1:  # (N, C): clear the row, then write its one value (same cache line)
            for c in range(classes):
                grad3[b, c, 0] = zero
            target = np.int64(t2[b, 0])
            if target != ignore_index:
                grad3[b, target, 0] = _gradient_value(class_values, upstream, target, b)
            continue
        for c in range(classes):  # (N, C, S): each element written once, planes in order
            for s in range(spatial):
                target = np.int64(t2[b, s])
                value = zero
                if target == c and target != ignore_index:
                    value = _gradient_value(class_values, upstream, target, b * spatial + s)
                grad3[b, c, s] = value


@_jit
def _gradient_value(class_values, upstream, target, m):
    if class_values.shape[0] == 0:
        return upstream[m]
    value = class_values[target if class_values.shape[0] > 1 else 0]
    if upstream.shape[0] > 0:
        value = value * upstream[m]
    return value

"""The compiled NumPy path: numba kernels with the semantics (and bits) of ``_generic``.

``forward`` and ``backward`` take the same arguments as ``_generic.forward``/``backward``
and give bit-identical results; the test-suite checks both against torch and each other.
``load()`` returns this module's entry points, or None when numba cannot be imported, in
which case NumPy arrays are served by the generic path.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import numpy as np

from .. import _validate
from .._validate import Layout


@functools.cache
def load():
    """The kernels, compiled lazily (and cached on disk by numba); None without numba."""
    if os.environ.get("NLLLOSS_DISABLE_NUMBA"):
        return None
    try:
        from . import _kernels
    except ImportError:
        return None
    return SimpleNamespace(forward=forward, backward=backward, kernels=_kernels)


@functools.cache
def _decode_table(dtype_name: str) -> np.ndarray:
    """float32 value of every 16-bit pattern of ``dtype_name``; empty for 32/64-bit dtypes."""
    if dtype_name == "float16":
        return (
            np.arange(1 << 16, dtype=np.uint32)
            .astype(np.uint16)
            .view(np.float16)
            .astype(np.float32)
        )
    if dtype_name == "bfloat16":
        return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    return np.empty(0, dtype=np.float32)


def _views(x, t, layout: Layout):
    """x as (B, C, S) (16-bit as uint16 bits), t as (B, S), the compute dtype and decode table."""
    name = _validate.dtype_name(x.dtype)
    x3 = x.reshape(layout.batch, layout.classes, layout.spatial)
    table = _decode_table(name)
    if table.size:
        x3 = x3.view(np.uint16)
        dtype = np.dtype(np.float32)
    else:
        dtype = x.dtype
    return x3, t.reshape(layout.batch, layout.spatial), dtype, table


def _raise_if_bad(first_bad: int, t, layout: Layout, ignore_index: int) -> None:
    if first_bad >= 0:
        position = np.unravel_index(first_bad, layout.output_shape) if layout.output_shape else ()
        raise _validate.out_of_bounds_error(
            int(t.reshape(-1)[first_bad]),
            tuple(int(p) for p in position),
            layout.classes,
            ignore_index,
        )


def _weight(w, x_dtype, dtype):
    if w is None:
        return np.empty(0, dtype=dtype)
    return np.ascontiguousarray(np.asarray(w).astype(x_dtype).astype(dtype))


# Up to this many target elements, 'mean' and 'sum' run as one sequential compiled pass
# (gather and cascade fused); beyond, the gather runs in parallel. Measured on 2 cores:
# the fused pass wins below about 2**15 elements.
FUSED_REDUCE_MAX = 1 << 15


def forward(engine, x, t, w, ignore_index: int, reduction: str, layout: Layout):
    """See ``_generic.forward``."""
    kernels = load().kernels
    x3, t2, dtype, table = _views(x, t, layout)
    weight = _weight(w, x.dtype, dtype)
    size = layout.size
    if reduction != "none" and 0 < size <= FUSED_REDUCE_MAX:
        levels = np.zeros((2, kernels.LEVELS), dtype=dtype)
        loss_sum, weight_sum, count, first_bad = kernels.fused_reduce(
            x3, t2, ignore_index, weight, table, levels
        )
        _raise_if_bad(first_bad, t, layout, ignore_index)
        total = dtype.type(count) if w is None else dtype.type(weight_sum)
        return _finish(kernels, dtype.type(loss_sum), total, reduction, x.dtype)
    losses = np.empty(size, dtype=dtype)
    weights = np.empty(size if w is not None else 0, dtype=dtype)
    valid = np.empty(size, dtype=np.uint8)
    first_bad = kernels.gather_losses(x3, t2, ignore_index, weight, table, losses, weights, valid)
    _raise_if_bad(first_bad, t, layout, ignore_index)

    if reduction == "none" and not layout.unbatched:
        return losses.reshape(layout.output_shape).astype(x.dtype, copy=False)
    if size == 0:
        return np.asarray(np.nan if reduction == "mean" else 0.0, dtype=x.dtype)
    # numba returns Python floats: back to the dtype, so the division rounds as torch's.
    result = dtype.type(kernels.cascade_sum(losses, valid))
    total = None
    if reduction == "mean":
        if w is None:
            total = dtype.type(int(np.count_nonzero(valid)))
        else:
            total = dtype.type(kernels.cascade_sum(weights, valid))
    return _finish(kernels, result, total, reduction, x.dtype)


def _finish(kernels, loss_sum, total, reduction: str, out_dtype):
    """The reduced loss as a 0-d array of ``out_dtype``: the sum, or divided by ``total``."""
    if reduction == "mean":
        loss_sum = loss_sum.dtype.type(kernels.divide(loss_sum, total))
    return np.asarray(loss_sum).astype(out_dtype)


def backward(engine, grad_output, x, t, w, ignore_index: int, reduction: str, layout: Layout):
    """See ``_generic.backward``."""
    kernels = load().kernels
    name = _validate.dtype_name(x.dtype)
    dtype = np.dtype(np.float32) if _decode_table(name).size else x.dtype
    t2 = t.reshape(layout.batch, layout.spatial)
    index = np.empty(layout.size, dtype=np.int64)
    _raise_if_bad(
        kernels.target_index(t2, ignore_index, layout.classes, index), t, layout, ignore_index
    )
    weight = _weight(w, x.dtype, dtype)
    upstream = np.asarray(grad_output).astype(dtype)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if reduction == "none" and not layout.unbatched:
            # torch: (-w) * g, which is w * (-g) bit for bit.
            upstream = -np.broadcast_to(upstream, layout.output_shape).reshape(-1)
        else:
            upstream = upstream.reshape(())
            if reduction == "mean":
                upstream = upstream / _total_weight(kernels, index, weight, dtype)
            upstream = (-upstream).reshape(1)
        values = np.empty(layout.size, dtype=dtype)
        kernels.gradient_values(index, weight, np.ascontiguousarray(upstream), values)

    grad = np.empty((layout.batch, layout.classes, layout.spatial), dtype=x.dtype)
    values = values.astype(x.dtype, copy=False)
    if x.dtype.itemsize == 2:  # write 16-bit floats as their bit patterns
        kernels.scatter_rows(grad.view(np.uint16), index, values.view(np.uint16))
    else:
        kernels.scatter_rows(grad, index, values)
    return grad.reshape(x.shape)


def _total_weight(kernels, index, weight, dtype):
    valid = (index >= 0).view(np.uint8)
    if weight.size == 0:
        return dtype.type(int(np.count_nonzero(valid)))
    hit = np.where(index >= 0, weight[np.maximum(index, 0)], dtype.type(0))
    return dtype.type(kernels.cascade_sum(hit, valid))


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in the compiled kernels (at most ``NUMBA_NUM_THREADS``, the default)."""
    import numba

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, not {type(n).__name__}")
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(
            f"n must be between 1 and NUMBA_NUM_THREADS={limit} (set that variable before "
            f"the first import of numba to allow more), got {n}"
        )
    numba.set_num_threads(int(n))

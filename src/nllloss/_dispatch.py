"""Which engine serves which arrays, decided once per array type.

An engine is the array namespace, the implementation that computes the loss and its
gradient (``_generic``, or for NumPy the compiled kernels of ``_cpu`` when numba loads),
and the two operations of the generic implementation whose best form depends on the
library: summing the per-element losses (NumPy reproduces torch's CPU summation order bit
for bit, see ``_reduction``) and writing the one non-zero gradient entry per target
element (NumPy scatters in place into a zero-filled array).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import array_api_compat.numpy as numpy_namespace
import numpy as np

from . import _cpu, _generic
from ._reduction import cascade_plan


@dataclass(frozen=True)
class Engine:
    xp: Any
    # sums(valid, *values) -> one 0-d sum per values array; valid marks the non-ignored
    # elements (values are already zero elsewhere) and fixes the summation order.
    sums: Callable[..., tuple[Any, ...]]
    # scatter(shape, dtype, index, values) -> zeros of `shape` with `values` written at
    # `index` along axis 1 (index and values have `shape` with axis 1 of length 1).
    scatter: Callable[[tuple[int, ...], Any, Any, Any], Any]
    # forward(engine, ...) and backward(engine, ...) as in _generic
    implementation: Any = _generic


def _cascade_sums(valid, *values):
    plan = cascade_plan(valid)
    return tuple(plan.sum(v) for v in values)


def _numpy_scatter(shape, dtype, index, values):
    out = np.zeros(shape, dtype=dtype)
    np.put_along_axis(out, index, values, axis=1)
    return out


GENERIC_NUMPY = Engine(numpy_namespace, _cascade_sums, _numpy_scatter)


@functools.lru_cache(maxsize=64)
def _engine_for_type(array_type: type) -> Engine:
    if issubclass(array_type, np.ndarray):
        compiled = _cpu.load()
        if compiled is None:
            return GENERIC_NUMPY
        return dataclasses.replace(GENERIC_NUMPY, implementation=compiled)
    raise TypeError(
        f"{array_type.__module__}.{array_type.__qualname__} arrays are not supported; "
        "pass NumPy arrays (or anything numpy.asarray accepts)"
    )


def engine_for(array: Any) -> Engine:
    """The engine for ``array``'s type."""
    return _engine_for_type(type(array))


def as_array(obj: Any) -> Any:
    """Arrays pass through; Python scalars and sequences become NumPy arrays."""
    if isinstance(obj, np.ndarray):
        return obj
    if array_api_compat.is_array_api_obj(obj) and not isinstance(obj, np.generic):
        return obj  # another library's array: its engine decides (or refuses it)
    return np.asarray(obj)

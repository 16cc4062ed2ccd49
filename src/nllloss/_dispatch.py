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

_ENGINES: dict[type, Engine] = {}
_FAST_PATHS: dict[type, Callable[..., Any]] = {}


def fast_paths() -> dict[type, Callable[..., Any]]:
    """The registry of per-type shortcuts that ``nll_loss`` consults before validating."""
    return _FAST_PATHS


def _engine_for_type(array_type: type, array: Any) -> Engine:
    """The engine of an array type, built from its first array and kept."""
    engine = _ENGINES.get(array_type)
    if engine is None:
        engine = _ENGINES[array_type] = _new_engine(array_type, array)
    return engine


def _new_engine(array_type: type, array: Any) -> Engine:
    if issubclass(array_type, np.ndarray):
        compiled = _cpu.load()
        if compiled is None:
            return GENERIC_NUMPY
        return dataclasses.replace(GENERIC_NUMPY, implementation=compiled)
    try:
        xp = array_api_compat.array_namespace(array)
    except TypeError:
        raise TypeError(
            f"{array_type.__module__}.{array_type.__qualname__} arrays are not supported: "
            "pass NumPy arrays or arrays of a library that follows the array API standard "
            "(torch, JAX, CuPy, array-api-strict, ...)"
        ) from None
    engine = Engine(xp, _summing(xp), _one_hot_scatter(xp))
    if array_api_compat.is_torch_namespace(xp):
        from . import _torch_ops  # imports torch: the caller handed us a torch tensor

        engine = dataclasses.replace(engine, implementation=_torch_ops)
        _FAST_PATHS[array_type] = _torch_ops.fast_forward
    return engine


def _summing(xp):
    def sums(valid, *values):
        return tuple(xp.sum(v) for v in values)

    return sums


def _one_hot_scatter(xp):
    """Scatter without in-place writes (lazy and traced arrays have none): compare and select."""

    def scatter(shape, dtype, index, values):
        classes = xp.arange(shape[1], device=array_api_compat.device(index))
        classes = xp.reshape(classes, (1, shape[1]) + (1,) * (len(shape) - 2))
        zero = xp.zeros((), dtype=dtype, device=array_api_compat.device(index))
        return xp.where(index == classes, values, zero)

    return scatter


def engine_for(array: Any) -> Engine:
    """The engine for ``array``'s type."""
    return _engine_for_type(type(array), array)


def as_array(obj: Any) -> Any:
    """Arrays pass through; Python scalars and sequences become NumPy arrays."""
    if isinstance(obj, np.ndarray):
        return obj
    if array_api_compat.is_array_api_obj(obj) and not isinstance(obj, np.generic):
        return obj  # another library's array: its engine decides (or refuses it)
    return np.asarray(obj)


def like_input(engine: Engine, obj: Any, input: Any, name: str, sequence_dtype: Any = None):
    """``obj`` as an array of the input's library and device.

    Python scalars and sequences, and NumPy arrays, are converted (sequences in
    ``sequence_dtype`` when given); an array of another library is refused.
    """
    if isinstance(input, np.ndarray):
        if sequence_dtype is not None and not hasattr(obj, "dtype"):
            return np.asarray(obj, dtype=sequence_dtype)
        obj = as_array(obj)
        if not isinstance(obj, np.ndarray):
            raise _mixed_error(name, obj, input)
        return obj
    xp = engine.xp
    if type(obj) is type(input) and _same_device(obj, input):
        return obj  # the common case, decided without asking array-api-compat
    if array_api_compat.is_array_api_obj(obj) and not isinstance(obj, (np.ndarray, np.generic)):
        try:
            array_api_compat.array_namespace(obj, input)  # one library (jax: tracers too)
        except TypeError:
            raise _mixed_error(name, obj, input) from None
        if not (_generic.traced(obj) or _generic.traced(input)) and (
            array_api_compat.device(obj) != array_api_compat.device(input)
        ):
            raise ValueError(
                f"{name} is on device {array_api_compat.device(obj)} but input is on "
                f"{array_api_compat.device(input)}: move them to the same device"
            )
        return obj
    kwargs = {"device": array_api_compat.device(input)}
    if sequence_dtype is not None and not hasattr(obj, "dtype"):
        kwargs["dtype"] = sequence_dtype
    return xp.asarray(np.asarray(obj) if "dtype" not in kwargs else obj, **kwargs)


def _same_device(a: Any, b: Any) -> bool:
    """True when both arrays report the same ``.device`` (False when unsure: the slow path)."""
    try:
        return a.device == b.device
    except Exception:  # no .device (Dask), or a JAX tracer without one
        return False


def _mixed_error(name: str, obj: Any, input: Any) -> TypeError:
    def kind(a):
        return f"{type(a).__module__}.{type(a).__qualname__}"

    return TypeError(
        f"{name} is a {kind(obj)} but input is a {kind(input)}: pass arrays of one library "
        "(NumPy arrays and Python sequences are converted to the input's library)"
    )

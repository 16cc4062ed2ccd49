"""Which backend serves which arrays: one route per array library, chosen by type.

A backend offers ``forward(problem)``, ``backward(problem, grad_output, out=None)``,
``forward_backward(problem, grad_output, out=None)`` and ``total_weight(target, weight,
ignore_index)`` (see ``_generic.Backend``, the specification every backend agrees with),
``xp``, the namespace that arguments are converted to, ``quick_forward``: None, or a
shortcut for the commonest forward that returns its result or None (then the full path),
and ``autocast(array)``: the array that the loss computes with under the library's
mixed-precision context (torch's ``autocast``: float32), the array itself elsewhere.
The routes, in order:

* NumPy arrays: the compiled kernels (``nllloss._kernels.cpu``), or the generic path on
  NumPy when numba does not load (``NLLLOSS_DISABLE_NUMBA=1`` too);
* torch tensors: ``nllloss._routes.torch``, whose engine choice
  (``nllloss._torch.engines``) picks torch's kernel, NumPy views, the
  Triton kernels or the generic path per call;
* Dask arrays: the generic path, except for inputs without an element (see
  ``_DaskBackend``);
* any other array-API library (JAX, CuPy, array-api-strict): the generic path.

The route of a type is decided on its first array and kept; torch is imported only when
a torch tensor arrives.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from .. import _generic, _validate
from .._kernels import cpu

_BACKENDS: dict[type, Any] = {}


def backend_for(array: Any):
    """The backend for ``array``'s type."""
    backend = _BACKENDS.get(type(array))
    if backend is None:
        backend = _BACKENDS[type(array)] = _route(type(array), array)
    return backend


def quick_forward_for(obj: Any):
    """The backend's shortcut for the commonest forward (``quick_forward``), or None."""
    backend = _BACKENDS.get(type(obj))
    if backend is None:
        backend = backend_for(as_array(obj, "input"))
    return backend.quick_forward


def _route(array_type: type, array: Any):
    if issubclass(array_type, np.ndarray):
        return cpu.backend()
    if array_api_compat.is_torch_array(array):
        from . import torch as torch_route  # imports torch: the caller handed us a torch tensor

        return torch_route.BACKEND
    try:
        xp = array_api_compat.array_namespace(array)
    except TypeError:
        raise _validate.unsupported_array_error(array_type) from None
    if array_api_compat.is_dask_array(array):
        return _DaskBackend(_generic.Backend(xp))
    if array_api_compat.is_jax_array(array):
        import jax  # already imported: the caller handed us a JAX array

        # jax.grad differentiates the forward as traced
        return _generic.Backend(xp, constant=jax.lax.stop_gradient)
    return _generic.Backend(xp)


class _DaskBackend:
    """The generic path on Dask, except for an input without an element (no batch, no
    class or an empty spatial axis): Dask's reshape refuses some of its zero-sized shapes
    and its reductions have no identity there, so NumPy computes such a problem (it holds
    nothing to compute lazily) and the results are handed back as Dask arrays."""

    quick_forward = None

    def __init__(self, generic: _generic.Backend):
        self.generic = generic
        self.xp = generic.xp
        self.autocast = generic.autocast

    def forward(self, problem):
        if not _empty(problem.input):
            return self.generic.forward(problem)
        return _as_dask(cpu.backend().forward(_computed(problem)))

    def backward(self, problem, grad_output, out=None):
        if not _empty(problem.input):
            return self.generic.backward(problem, grad_output, out)
        grad = cpu.backend().backward(_computed(problem), np.asarray(grad_output))
        return _as_dask(grad)

    def forward_backward(self, problem, grad_output, out=None):
        if not _empty(problem.input):
            return self.generic.forward_backward(problem, grad_output, out)
        loss, grad = cpu.backend().forward_backward(_computed(problem), np.asarray(grad_output))
        return _as_dask(loss), _as_dask(grad)

    def total_weight(self, target, weight, ignore_index: int):
        return self.generic.total_weight(target, weight, ignore_index)


def _empty(array: Any) -> bool:
    return 0 in tuple(array.shape)


def _computed(problem):
    return problem.with_arrays(np.asarray)


def _as_dask(result):
    import dask.array  # already imported: the caller handed us Dask arrays

    return dask.array.from_array(np.asarray(result))


def as_array(obj: Any, name: str) -> Any:
    """Arrays pass through; Python scalars and sequences become NumPy arrays."""
    # An array type already routed is known without asking array-api-compat (which costs
    # a fifth of a small torch call).
    routed = _BACKENDS.get(type(obj))
    if routed is not None:
        return _sizes_known(obj) if isinstance(routed, _DaskBackend) else obj
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray:
            _validate.check_array_type(obj, name)
        return obj
    if array_api_compat.is_dask_array(obj):
        return _sizes_known(obj)
    if array_api_compat.is_array_api_obj(obj) and not isinstance(obj, np.generic):
        return obj  # another library's array: its backend decides (or refuses it)
    array = np.asarray(obj)
    _validate.check_sequence(obj, array, name)
    return array


def like_input(backend, obj: Any, input: Any, name: str, sequence_dtype: Any = None):
    """``obj`` as an array of the input's library and device.

    Python scalars and sequences, and NumPy arrays, are converted (sequences in
    ``sequence_dtype`` when given); an array of another library is refused.
    """
    if isinstance(input, np.ndarray):
        array = as_array(obj, name)
        if not isinstance(array, np.ndarray):
            raise _validate.mixed_libraries_error(name, array, input)
        if sequence_dtype is not None and not hasattr(obj, "dtype"):
            return array.astype(sequence_dtype)
        return array
    if isinstance(backend, _DaskBackend) and array_api_compat.is_dask_array(obj):
        return _sizes_known(obj)
    if type(obj) is type(input) and _same_device(obj, input):
        return obj  # the common case, decided without asking array-api-compat
    if array_api_compat.is_array_api_obj(obj) and not isinstance(obj, (np.ndarray, np.generic)):
        try:
            array_api_compat.array_namespace(obj, input)  # one library (jax: tracers too)
        except TypeError:
            raise _validate.mixed_libraries_error(name, obj, input) from None
        if not (_generic.values_hidden(obj) or _generic.values_hidden(input)) and (
            array_api_compat.device(obj) != array_api_compat.device(input)
        ):
            raise _validate.devices_differ_error(
                name, array_api_compat.device(obj), array_api_compat.device(input)
            )
        return obj
    if type(obj) in (int, float) and sequence_dtype is None:
        # Straight to the library, in full precision (no NumPy array: torch.compile traces
        # this call and cannot trace NumPy's)
        exact = backend.xp.float64 if type(obj) is float else backend.xp.int64
        return backend.xp.asarray(obj, dtype=exact, device=array_api_compat.device(input))
    values = as_array(obj, name)
    dtype = sequence_dtype if not hasattr(obj, "dtype") else None
    return backend.xp.asarray(values, dtype=dtype, device=array_api_compat.device(input))


def _sizes_known(array: Any) -> Any:
    """A Dask array with every chunk's size known and no chunk without an element.

    Sizes are unknown (NaN) after boolean indexing or another selection that depends on
    values, and every shape rule of the loss needs them: they are computed, which runs
    the array's graph once more (Dask's own ``compute_chunk_sizes``, called on a copy: it
    works in place, and the caller's array keeps its own). Such selections also leave
    empty chunks, on which Dask's ``max`` fails (the log-softmax's, Dask 2026.11): those
    are merged away. Other arrays are returned as they are."""
    if any(math.isnan(size) for size in array.shape):
        array = array.copy()  # a new Array object over the same graph
        array.compute_chunk_sizes()
    if any(0 in sizes and len(sizes) > 1 for sizes in array.chunks):
        array = array.rechunk(tuple(tuple(s for s in sizes if s) or (0,) for sizes in array.chunks))
    return array


def _same_device(a: Any, b: Any) -> bool:
    """True when both arrays report the same ``.device`` (False when unsure: the slow path)."""
    try:
        return a.device == b.device
    except Exception:  # no .device (Dask), or a JAX tracer without one
        return False

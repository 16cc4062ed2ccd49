"""The NumPy route: numba kernels with the semantics (and bits) of ``_generic``.

``forward``, ``backward`` and ``forward_backward`` take a ``Problem`` of NumPy arrays, as
``_generic.Backend``'s methods do, and give bit-identical results; the test-suite checks
both against torch and each other. :func:`backend` is the route of NumPy arrays: its
``engine(problem)`` is the one decision, these kernels when they load and ``supports``
the problem, else the generic path on NumPy. The kernels do not load without numba, with
``NUMBA_DISABLE_JIT`` set (they would run as slow Python, and some not at all) or without
a writable cache location (numba refuses to compile them): each gives one
:class:`~nllloss._validate.FallbackWarning`, and the generic path computes every call.
``NLLLOSS_DISABLE_NUMBA=1`` asks for the generic path, silently.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import SimpleNamespace

import numpy as np

from ... import _generic, _validate
from ..._problem import Problem, out_of_range
from ..._reduction import level_power

# The options these kernels compute (see ``Options``): a problem using any other takes the
# generic path.
OPTIONS = frozenset(
    {"from_logits", "label_smoothing", "total_weight", "check_targets", "z_loss", "softcap"}
)


def supports(problem: Problem) -> bool:
    """Whether these kernels compute ``problem`` (of NumPy arrays: every float and integer
    dtype, both target forms, any shape): when its options are theirs."""
    return problem.options.in_use() <= OPTIONS


class NumpyBackend:
    """The route of NumPy arrays, with the backend protocol of ``_generic.Backend``."""

    def __init__(self, kernels, softmax):
        self.kernels, self.softmax = kernels, softmax
        self.xp = generic_numpy().xp
        self.total_weight = generic_numpy().total_weight
        self.autocast = generic_numpy().autocast
        self.quick_forward = quick_forward

    @staticmethod
    def engine(problem: Problem):
        """These kernels if they compute the problem, else the generic path on NumPy."""
        return _COMPILED if supports(problem) else generic_numpy()

    def forward(self, problem: Problem):
        return self.engine(problem).forward(problem)

    def backward(self, problem: Problem, grad_output, out=None):
        return self.engine(problem).backward(problem, grad_output, out)

    def forward_backward(self, problem: Problem, grad_output, out=None):
        return self.engine(problem).forward_backward(problem, grad_output, out)

    def forward_and_lse(self, problem: Problem):
        return self.engine(problem).forward_and_lse(problem)


@functools.cache
def load() -> NumpyBackend | None:
    """The route with its kernels compiled lazily (and cached on disk by numba); None
    (after one warning where the kernels should have loaded) when they cannot load."""
    if os.environ.get("NLLLOSS_DISABLE_NUMBA"):
        return None
    reason = None
    try:
        import numba

        if numba.config.DISABLE_JIT:
            reason = "NUMBA_DISABLE_JIT is set"
        else:
            from . import _kernels, _softmax
    except ImportError as error:
        reason = f"numba does not import ({error})"
    except RuntimeError as error:  # numba's "cannot cache function ...: no locator available"
        if "cannot cache" not in str(error):
            raise
        reason = (
            "numba has no writable cache location for them (set NUMBA_CACHE_DIR to a "
            f"writable directory): {error}"
        )
    if reason is not None:
        warnings.warn(_validate.fallback_message(reason), _validate.FallbackWarning, stacklevel=2)
        return None
    return NumpyBackend(_kernels, _softmax)


def backend():
    """The NumPy route: these kernels when numba loads, else the generic path on NumPy."""
    return load() or generic_numpy()


@functools.cache
def generic_numpy() -> _generic.Backend:
    """The generic backend for NumPy, with torch's summation order (``_reduction``)."""
    import array_api_compat.numpy

    return _generic.Backend(array_api_compat.numpy, _cascade_sums, _numpy_scatter)


def _cascade_sums(valid, *values):
    from ..._reduction import cascade_plan

    plan = cascade_plan(valid)
    return tuple(plan.sum(v) for v in values)


def _numpy_scatter(shape, dtype, index, values):
    out = np.zeros(shape, dtype=dtype)
    if out.size:  # with no class, every target was ignore_index: nothing to place
        np.put_along_axis(out, index, values, axis=1)
    return out


@functools.cache
def decode_table(dtype_name: str) -> np.ndarray:
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


def _views(problem: Problem):
    """x as (B, C, S) (16-bit as uint16 bits), t as (B, S), the compute dtype and decode table."""
    x3, dtype, table = _input_view(problem, problem.input)
    return x3, kernel_target(problem), dtype, table


def _input_view(problem: Problem, a):
    """``a``, of the input's shape and dtype, as (B, C, S) (16-bit as uint16 bits); the
    compute dtype and the decode table."""
    layout = problem.layout
    a3 = in_native_order(a).reshape(layout.batch, layout.classes, layout.spatial)
    table = decode_table(_validate.dtype_name(a.dtype))
    if table.size:
        return a3.view(np.uint16), np.dtype(np.float32), table
    return a3, a3.dtype, table


def in_native_order(a):
    """``a`` in native byte order (numba reads no other)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def kernel_target(problem: Problem):
    """The target as (B, S) for the kernels; uint64 as int64 (numba's arithmetic of uint64
    with int64 is float64, which indexes nothing).

    uint64 values above the int64 range are no class index and never ``ignore_index``; they
    become an int64 value that is neither, so the kernels report them where they are.
    """
    layout, ignore_index = problem.layout, problem.ignore_index
    t2 = in_native_order(problem.target).reshape(layout.batch, layout.spatial)
    if t2.dtype != np.uint64:
        return t2
    if t2.size and t2.max() > np.iinfo(np.int64).max:
        out_of_range = np.iinfo(np.int64).min + (ignore_index == np.iinfo(np.int64).min)
        return np.where(t2 > np.iinfo(np.int64).max, out_of_range, t2.astype(np.int64))
    return t2.view(np.int64)  # the same values, not copied


def _raise_if_bad(first_bad: int, problem: Problem) -> None:
    if first_bad >= 0:
        raise problem.bad_target(first_bad, int(problem.target.reshape(-1)[first_bad]))


def _weight(w, dtype):
    """The weight (already in the input's dtype) in the compute dtype; empty without one."""
    if w is None:
        return _no_weight(dtype)
    return np.ascontiguousarray(w.astype(dtype, copy=False))


# Up to this many target elements, 'mean' and 'sum' run as one sequential compiled pass
# (gather and cascade fused); beyond, the blocks of the cascade are summed in parallel.
# Measured on 2 cores: the fused pass wins below about 2**15 elements.
FUSED_REDUCE_MAX = 1 << 15


@functools.cache
def _no_weight(dtype):
    """An empty, read-only weight: 'unweighted' for the kernels, and the accumulation dtype."""
    empty = np.empty(0, dtype=dtype)
    empty.flags.writeable = False
    return empty


def sized(kernel, work: int, variant=None):
    """The kernel for ``work`` elements: each call runs the twin (threads or one thread)
    that has been faster lately for work of this size and ``variant`` (what else changes
    the cost per element; ``_threads.Guarded.run``)."""
    return functools.partial(kernel.run, work, variant)


@_generic.IEEE_RESULTS  # 16-bit results overflow to inf, as torch's
def forward(problem: Problem):
    """See ``_generic.Backend.forward``."""
    if problem.over_rows:
        return _softmax_forward_backward(problem)[0]
    layout, x, given = problem.layout, problem.input, problem.total_weight
    kernels = load().kernels
    x3, t2, dtype, table = _views(problem)
    weight = _weight(problem.weight, dtype)
    size = layout.size
    if problem.elementwise:
        losses = np.empty(size, dtype=dtype)
        first_bad = sized(kernels.elementwise_losses, size)(
            x3, t2, problem.ignore_index, weight, table, losses
        )
        _raise_if_bad(first_bad, problem)
        return losses.reshape(layout.output_shape).astype(x.dtype, copy=False)
    mean = problem.reduction == "mean"
    if size == 0 and given is None:
        return np.asarray(np.nan if mean else 0.0, dtype=x.dtype)
    if size <= FUSED_REDUCE_MAX:
        value, first_bad = kernels.fused_reduce(
            x3, t2, problem.ignore_index, weight, table, mean and given is None
        )
        _raise_if_bad(first_bad, problem)
        if mean and given is not None:
            value = kernels.divide(dtype.type(value), _given_total(given, dtype))
    else:
        step = 1 << level_power(size)
        sums = np.empty(((size - 1 + step - 1) // step, 2), dtype=dtype)
        count, first_bad = sized(kernels.block_sums, size)(
            x3, t2, problem.ignore_index, weight, table, step, sums
        )
        _raise_if_bad(first_bad, problem)
        value, weight_sum = kernels.cascade_over_blocks(
            x3, t2, problem.ignore_index, weight, table, step, sums
        )
        if mean:  # numba returns Python floats: divide in the dtype, as torch
            total = dtype.type(count if problem.weight is None else weight_sum)
            if given is not None:
                total = _given_total(given, dtype)
            value = kernels.divide(dtype.type(value), total)
    # value is exact in the accumulation dtype; 16-bit outputs round it once.
    return np.array(value, dtype=x.dtype)


_QUICK_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_QUICK_REDUCTIONS = {"mean": True, "sum": False}
_INT64 = np.dtype(np.int64)


def quick_forward(input, target, weight, ignore_index, reduction):
    """The commonest call, ``'mean'`` or ``'sum'`` of a small (N, C) float32/float64 input
    with an int64 target, straight to the kernel ``forward`` would run: the same result,
    without building a Problem. None for anything else, or a bad target: the full path then
    validates and raises."""
    mean = _QUICK_REDUCTIONS.get(reduction) if type(reduction) is str else None
    if (
        mean is None
        or type(input) is not np.ndarray
        or type(target) is not np.ndarray
        or input.dtype not in _QUICK_DTYPES
        or target.dtype != _INT64
        or input.ndim != 2
        or target.shape != input.shape[:1]
        or not 0 < target.shape[0] <= FUSED_REDUCE_MAX
        or type(ignore_index) is not int
        or not -(2**63) <= ignore_index < 2**63
        or (
            weight is not None
            and (
                type(weight) is not np.ndarray
                or weight.dtype != input.dtype
                or weight.shape != input.shape[1:]
            )
        )
    ):
        return None
    rows, classes = input.shape
    value, first_bad = load().kernels.fused_reduce(
        input.reshape(rows, classes, 1),
        target.reshape(rows, 1),
        ignore_index,
        _no_weight(input.dtype) if weight is None else weight,
        _NO_TABLE,
        mean,
    )
    return None if first_bad >= 0 else np.array(value, dtype=input.dtype)


_NO_TABLE = np.empty(0, dtype=np.float32)


def _given_total(total_weight, dtype):
    return dtype.type(np.asarray(total_weight).reshape(()).astype(dtype))


def backward(problem: Problem, grad_output, out=None):
    """See ``_generic.Backend.backward``."""
    if problem.over_rows:
        return _softmax_forward_backward(problem, grad_output, out)[1]
    kernels = load().kernels
    layout, x, ignore_index = problem.layout, problem.input, problem.ignore_index
    sixteen_bit = problem.computes_in_float32
    native = x.dtype.newbyteorder("=")
    dtype = np.dtype(np.float32) if sixteen_bit else native
    t2 = kernel_target(problem)
    weight = _weight(problem.weight, dtype)
    count, first_bad = sized(kernels.count_counted, layout.size)(t2, ignore_index, layout.classes)
    _raise_if_bad(first_bad, problem)

    upstream = np.asarray(grad_output).astype(dtype)
    grad_shape = (layout.batch, layout.classes, layout.spatial)
    if out is not None and out.dtype == native:
        grad, zeroed = out.reshape(grad_shape), False  # C-contiguous: a view, in place
    else:
        grad, zeroed = _new_gradient(grad_shape, native)
    bits = (lambda a: a.view(np.uint16)) if sixteen_bit else (lambda a: a)
    no_values = np.empty(0, dtype=grad.dtype)
    if problem.elementwise:
        # torch: (-w) * g per element.
        upstream = np.ascontiguousarray(np.broadcast_to(upstream, layout.output_shape)).reshape(-1)
        negated = -weight if weight.size else np.full(1, -1, dtype=dtype)
        if sixteen_bit:  # numba has no 16-bit floats: multiply here, round once, write bits
            values = negated[np.where(t2 != ignore_index, t2, 0).reshape(-1) if weight.size else 0]
            with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf is NaN, as torch's
                values = (values * upstream).astype(native)
            sized(kernels.write_gradient, grad.size, zeroed)(
                t2, ignore_index, bits(no_values), bits(values), bits(grad), zeroed
            )
        else:
            sized(kernels.write_gradient, grad.size, zeroed)(
                t2, ignore_index, negated, upstream, grad, zeroed
            )
        return _result(grad, x, out)

    # 'mean' and 'sum': the value at a target depends on its class alone, w[t] * step with
    # step = -(g / total) or -g, computed once per class (bit-identical to per element).
    upstream = upstream.reshape(())
    if problem.reduction == "mean":
        total = problem.denominator(
            count=lambda: count,
            weight_sum=lambda: _weight_total(kernels, t2, ignore_index, weight),
            given=lambda given: _given_total(given, dtype),
        )
        upstream = upstream.dtype.type(kernels.divide(upstream, dtype.type(total)))
    step = -upstream
    with np.errstate(invalid="ignore", over="ignore"):
        class_values = (weight * step if weight.size else np.full(1, step)).astype(native)
    sized(kernels.write_gradient, grad.size, zeroed)(
        t2, ignore_index, bits(class_values), bits(no_values), bits(grad), zeroed
    )
    return _result(grad, x, out)


# From this size on a new gradient is allocated zeroed and only the targets are written:
# glibc serves such a calloc with fresh pages that the kernel zeroes as they are touched,
# which costs less than writing the zeros ourselves (2 cores, float32, fresh gradient:
# (1048576, 10) 3.7 ms instead of 5.7; (8, 21, 256, 256) 3.9 instead of 7.2; (8192, 32000)
# 69 vs 71). 32 MiB is glibc's largest mmap threshold: below it calloc may clear reused
# heap memory itself, and writing every element once was as fast or faster (16 MiB: 0.13
# ms instead of 0.28).
ZEROED_GRADIENT_MIN_BYTES = 32 << 20


def _new_gradient(shape, dtype):
    """A new gradient array, and whether it holds zeros already."""
    if np.prod(shape, dtype=np.int64) * dtype.itemsize >= ZEROED_GRADIENT_MIN_BYTES:
        return np.zeros(shape, dtype=dtype), True
    return np.empty(shape, dtype=dtype), False


def _result(grad, x, out):
    """The gradient in the input's shape and dtype (a copy only for non-native byte
    order), in ``out`` when given (where it was written in place unless byte orders differ)."""
    grad = grad.reshape(x.shape)
    if out is None:
        return grad if grad.dtype == x.dtype else grad.astype(x.dtype)
    if not np.may_share_memory(grad, out):
        out[...] = grad
    return out


def forward_backward(problem: Problem, grad_output, out=None):
    """See ``_generic.Backend.forward_backward``: from logits or smoothed, one pass."""
    if problem.over_rows:
        return _softmax_forward_backward(problem, grad_output, out)
    loss = forward(problem)
    return loss, backward(problem, grad_output, out)


def forward_and_lse(problem: Problem):
    """(the loss, each target element's log-sum-exp) from logits, in one pass: see
    ``_generic.log_normalizer`` for the second (O(N) memory beyond the input)."""
    loss, _, lse = _softmax_forward_backward(problem, want_lse=True)
    return loss, lse


@_generic.IEEE_RESULTS
def _softmax_forward_backward(problem: Problem, grad_output=None, out=None, want_lse=False):
    """(loss, gradient or None) when rows are read whole (``Problem.over_rows``): the
    ``_softmax`` kernels give each element's target, smoothing and z-loss terms in float64
    (and the gradient when ``grad_output`` is given); they are reduced here in float64 and
    rounded once. With ``want_lse``, (loss, None, each element's log-sum-exp)."""
    softmax = load().softmax
    layout, x, ignore_index = problem.layout, problem.input, problem.ignore_index
    x3, dtype, table = _input_view(problem, x)
    weighted = problem.weight is not None
    weight = _weight(problem.weight, dtype) if weighted else np.ones(layout.classes, dtype)
    if problem.probabilities:
        t2 = np.empty((0, 0), dtype=np.int64)
        p3 = _input_view(problem, problem.target)[0]  # in the input's dtype (_loss._problem)
        total = np.float64(problem.denominator(given=lambda given: _given_total(given, dtype)))
    else:
        t2 = kernel_target(problem)
        p3 = np.empty((0, 0, 0), dtype=x3.dtype)
        total = _checked_total(problem, t2, weight if weighted else _no_weight(dtype))
    smoothing = problem.label_smoothing
    if problem.probabilities and not layout.classes:
        # the smoothed target (1 - eps) p + eps / C of no classes is empty: torch's loss
        # is 0, where the share eps / C = inf would make it inf * 0
        smoothing = 0.0
    target_scale = 1.0 - smoothing
    smooth_scale = _generic.smoothing_share(smoothing, layout.classes)
    # Probabilities are smoothed before they meet the log-probabilities, as torch's
    # p' = (1 - eps) p + eps / C: the kernels' smoothing term is for class indices.
    separate_smoothing = bool(smoothing) and not problem.probabilities
    want_grad = grad_output is not None
    upstream = np.zeros(1)
    if want_grad:
        upstream = np.asarray(grad_output, dtype=np.float64)
        if problem.elementwise:
            upstream = np.ascontiguousarray(np.broadcast_to(upstream, layout.output_shape))
        upstream = upstream.reshape(-1)
        if problem.reduction == "mean":
            upstream = upstream / total

    size = layout.size
    nll = np.empty(size)
    smooth = np.empty(size)
    z_terms = np.empty(size if problem.z_loss else 0)
    lse = np.empty(size if want_lse else 0)
    spatial = layout.spatial
    rows = spatial == 1
    kernel = softmax.softmax_rows if rows else softmax.softmax_tiles
    inputs = x3.reshape(layout.batch, layout.classes) if rows else x3
    targets = t2.reshape(-1) if rows else t2
    probabilities = p3.reshape(p3.shape[:2]) if rows else p3
    # The weight sum only scales the smoothing term: without smoothing it is not read (a
    # NaN weight of a class no target uses must not reach the gradient).
    weight_sum = float(np.sum(weight, dtype=np.float64)) if separate_smoothing else 0.0

    softcap = softmax.kernel_softcap(problem.softcap, dtype)

    def run(block: slice, grad_rows):
        """The kernel on a block of rows (elements ``block`` of the batch axis)."""
        cells = slice(block.start * spatial, block.stop * spatial)
        work = (block.stop - block.start) * layout.classes * spatial
        sized(kernel, work, grad_rows.size > 0)(
            inputs[block], targets[block], probabilities[block], ignore_index,
            weight, weight_sum, table, problem.from_logits, separate_smoothing, problem.z_loss,
            softcap, upstream if upstream.size == 1 else upstream[cells],
            target_scale, smooth_scale, nll[cells], smooth[cells],
            z_terms[cells], lse[cells] if want_lse else lse, grad_rows,
        )  # fmt: skip

    everything = slice(0, layout.batch)
    if not want_grad:
        run(everything, np.empty((0,) * inputs.ndim, dtype))
        grad = None
    elif x.dtype == dtype and (out is None or out.dtype == dtype):
        # float32/float64 in native order: the kernel writes the result itself (in place
        # into out when given)
        grad = np.empty(x.shape, dtype=dtype) if out is None else out
        run(everything, grad.reshape(inputs.shape))
    else:
        grad = _gradient_in_blocks(run, problem, out, dtype, inputs.shape)

    if problem.elementwise:
        loss = target_scale * nll + smooth_scale * smooth if separate_smoothing else nll
        if problem.z_loss:
            loss = loss + z_terms
        loss = loss.reshape(layout.output_shape).astype(x.dtype)
    else:
        value, smooth_value = np.sum(nll), np.sum(smooth)
        z_value = np.sum(z_terms)
        if problem.reduction == "mean":  # each term divided, as torch: 0/0 in one is NaN
            value, smooth_value, z_value = value / total, smooth_value / total, z_value / total
        if separate_smoothing:
            value = target_scale * value + smooth_scale * smooth_value
        if problem.z_loss:
            value = value + z_value
        loss = np.array(value, dtype=x.dtype)
    if want_lse:
        return loss, grad, lse.reshape(layout.output_shape).astype(x.dtype)
    return loss, grad


def _checked_total(problem: Problem, t2, weight):
    """The 'mean' denominator of class-index targets in float64, after raising the
    IndexError of the first bad target (``weight`` empty when unweighted)."""
    valid = t2 != problem.ignore_index
    bad = out_of_range(t2, problem.layout.classes, problem.ignore_index)
    if bad.any():
        _raise_if_bad(int(np.argmax(bad.reshape(-1))), problem)
    # weighted: as the plain loss and total_weight() sum it (equal totals, equal results)
    return np.float64(
        problem.denominator(
            count=lambda: np.count_nonzero(valid),
            weight_sum=lambda: _weight_total(load().kernels, t2, problem.ignore_index, weight),
            given=lambda given: _given_total(given, weight.dtype),
        )
    )


# Rows of a 16-bit (or non-native) gradient computed at a time in the compute dtype before
# rounding into the result: about 4 MiB of float32, so the buffer stays in cache and the
# gradient costs nothing of the input's size beyond itself (unmeasured for speed; chosen
# for memory: the float32 gradient of the whole input would be twice its size).
_BLOCK_BYTES = 1 << 22


def _gradient_in_blocks(run, problem: Problem, out, dtype, shape):
    """The gradient in the input's dtype (into ``out`` when given), computed in blocks of
    rows in the compute dtype and rounded once."""
    x = problem.input
    grad = out if out is not None else np.empty(x.shape, dtype=x.dtype)
    grad_rows = grad.reshape(shape)
    row_bytes = max(1, int(np.prod(shape[1:])) * dtype.itemsize)
    step = max(1, _BLOCK_BYTES // row_bytes)
    buffer = np.empty((min(step, shape[0]), *shape[1:]), dtype=dtype)
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        block = buffer[: rows.stop - rows.start]
        run(rows, block)
        grad_rows[rows] = block  # rounds once to the input's dtype
    return grad


def _weight_total(kernels, t2, ignore_index, weight):
    """torch's 'mean' denominator: the cascade sum of w[t] over non-ignored elements."""
    valid = t2 != ignore_index
    if not weight.size:  # no classes: every target is ignored
        return weight.dtype.type(0)
    hit = np.where(valid, weight[np.where(valid, t2, 0)], weight.dtype.type(0)).reshape(-1)
    return kernels.cascade_sum(hit, valid.reshape(-1).view(np.uint8))


# The engine of these kernels, as NumpyBackend.engine names it.
_COMPILED = SimpleNamespace(
    forward=forward,
    backward=backward,
    forward_backward=forward_backward,
    forward_and_lse=forward_and_lse,
)

"""The array-API implementation of the loss and its gradient: the specification in code.

Arguments arrive validated (``_validate``); ``engine`` (``_dispatch``) supplies the array
namespace, the summation and the scatter. Shapes are handled without copying the
input: an unbatched ``(C,)`` input is viewed as ``(1, C)``, and the target's class index
is gathered along axis 1 with broadcasting over the batch and spatial axes. The gradient
needs the input's shape and dtype only, never its values.

Arithmetic follows torch 2.13's CPU kernels operation for operation, so float32 and
float64 results are bit-identical to torch's:

* per element, ``loss = -(x[t] * w[t])`` (``+0.0`` where ignored);
* 'sum' and 'mean' add the losses (and, weighted, the weights) in the engine's order;
  unweighted, the total weight is the count of non-ignored elements;
* gradient at ``(i, t_i)``: ``(-w) * g`` for 'none' and ``w * (-(g / total))`` for 'mean'
  (``w * (-g)`` for 'sum'); zero elsewhere and at ignored elements.

float16 and bfloat16 are computed in float32 and rounded once at the end: torch rounds
every partial sum to 16 bits, which loses the count of rows beyond 2048 (float16).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from . import _validate
from ._validate import PLAIN, Layout, Options


@dataclass
class _Targets:
    index: Any  # (B, 1, d...) class index per target element; 0 where ignored
    valid: Any  # (M,) bool, row-major over the target
    weight: Any  # (M,) w[t] in the compute dtype, 0 where ignored; None when unweighted
    dtype: Any  # compute dtype: float32 for 16-bit inputs, else the input's
    device: Any
    bad: Any  # (M,) bool where a target is out of range (traced or lazy arrays only), or None


def _index_dtype(xp):
    """The namespace's indexing dtype: int64 usually, int32 for JAX without x64."""
    try:
        return xp.__array_namespace_info__().default_dtypes()["indexing"]
    except AttributeError:  # namespaces older than the 2023.12 standard
        return xp.int64


def _compute_dtype(xp, dtype):
    return xp.float32 if _validate.dtype_name(dtype) in ("float16", "bfloat16") else dtype


def _batched(xp, x, layout: Layout):
    """The input with a batch axis: ``(C,)`` is viewed as ``(1, C)``."""
    return xp.reshape(x, (1, layout.classes)) if layout.unbatched else x


_COMPARISONS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, ">=": operator.ge}


def _compare(xp, target, op: str, value: int):
    """``target <op> value`` for a Python int that the target's dtype may not hold."""
    info = xp.iinfo(target.dtype)
    if value < info.min or value > info.max:
        # every element compares the same way: below the range all are greater, above all less
        result = {"==": False, "!=": True, "<": value > info.max, ">=": value < info.min}[op]
        return xp.full(target.shape, result, dtype=xp.bool, device=array_api_compat.device(target))
    return _COMPARISONS[op](target, value)


def traced(array: Any) -> bool:
    """Values unknown until later: JAX inside jit/grad/vmap, Dask before compute."""
    if array_api_compat.is_jax_array(array):
        import jax  # already imported: the caller handed us a JAX array

        return isinstance(array, jax.core.Tracer)
    return array_api_compat.is_dask_array(array)


def _select(engine, x, t, w, ignore_index: int, layout: Layout) -> _Targets:
    """Check the target values; the class index and weight of each target element."""
    xp = engine.xp
    device = array_api_compat.device(x)
    target = xp.reshape(t, (1,) if layout.unbatched else layout.output_shape)
    valid, bad = _checked_valid(xp, target, layout, ignore_index)
    if bad is not None:
        valid = valid & ~bad
        bad = xp.reshape(bad, (-1,))
    index = xp.expand_dims(xp.where(valid, xp.astype(target, _index_dtype(xp)), 0), axis=1)
    valid = xp.reshape(valid, (-1,))
    dtype = _compute_dtype(xp, x.dtype)
    weight = None
    if w is not None:
        w = xp.astype(xp.astype(w, x.dtype), dtype)  # torch computes in the input's dtype
        if layout.classes == 0:
            weight = xp.zeros((layout.size,), dtype=dtype, device=device)  # all ignored
        else:
            weight = xp.take(w, xp.reshape(index, (-1,)), axis=0)
            weight = xp.where(valid, weight, xp.zeros((), dtype=dtype, device=device))
    return _Targets(index, valid, weight, dtype, device, bad)


def _checked_valid(xp, target, layout: Layout, ignore_index: int):
    """(target != ignore_index, out-of-range targets or None).

    Concrete arrays raise the IndexError for the first bad target; Dask raises it when
    computed; traced arrays (no value known) return where the bad targets are."""
    if array_api_compat.is_dask_array(target):
        # Lazy: the check runs, and raises the same IndexError, when the result is computed.
        target = target.map_blocks(
            _checked_block,
            classes=layout.classes,
            ignore_index=ignore_index,
            output_shape=layout.output_shape,
            dtype=target.dtype,
        )
    valid = _compare(xp, target, "!=", ignore_index)
    bad = valid & (_compare(xp, target, "<", 0) | _compare(xp, target, ">=", layout.classes))
    if array_api_compat.is_dask_array(target):
        return valid, None
    if traced(target):
        # No value is known yet (jax.jit): a bad target cannot raise; its loss is NaN.
        return valid, bad
    _raise_first_bad(xp, target, bad, layout, ignore_index)
    return valid, None


def _pick(engine, x, targets: _Targets, layout: Layout):
    """(x[t] per target element, flat, in the compute dtype and 0 where ignored; the same
    gather unmasked, or None when there is nothing to gather)."""
    xp = engine.xp
    zero = xp.zeros((), dtype=targets.dtype, device=targets.device)
    if layout.classes == 0 or layout.size == 0:
        return xp.zeros((layout.size,), dtype=targets.dtype, device=targets.device), None
    raw = _take_classes(xp, _batched(xp, x, layout), targets.index)
    raw = xp.astype(xp.reshape(raw, (-1,)), targets.dtype)
    return xp.where(targets.valid, raw, zero), raw


def _checked_block(block, classes, ignore_index, output_shape, block_info=None):
    """A block of a lazy target, after raising the core's IndexError for a bad value in it."""
    values = np.asarray(block)
    bad = (values != ignore_index) & ((values < 0) | (values >= classes))
    if bad.any():
        local = np.unravel_index(int(np.argmax(bad)), values.shape)
        start = [begin for begin, _ in block_info[0]["array-location"]] if block_info else []
        position = tuple(
            int(i) + int(b) for i, b in zip(local, start or [0] * len(local), strict=True)
        )
        position = position if output_shape else ()
        raise _validate.out_of_bounds_error(int(values[local]), position, classes, ignore_index)
    return block


def _take_classes(xp, x, index):
    """``take_along_axis(x, index, axis=1)``, also for namespaces without it (Dask)."""
    if hasattr(xp, "take_along_axis"):
        return xp.take_along_axis(x, index, axis=1)
    batch, classes = x.shape[0], x.shape[1]
    spatial = 1
    for d in x.shape[2:]:
        spatial *= d
    device = array_api_compat.device(x)
    rows = xp.reshape(xp.arange(batch, dtype=index.dtype, device=device), (batch, 1))
    cells = xp.reshape(xp.arange(spatial, dtype=index.dtype, device=device), (1, spatial))
    flat = (rows * classes + xp.reshape(index, (batch, spatial))) * spatial + cells
    picked = xp.take(xp.reshape(x, (-1,)), xp.reshape(flat, (-1,)), axis=0)
    return xp.reshape(picked, tuple(index.shape))


def _ieee(operation, a, b):
    """``operation(a, b)`` with IEEE results (0/0 and 0*inf are NaN, x/0 is ±inf, as torch's),
    and no NumPy warning, also for Dask, which computes after our ``errstate`` has ended:
    there the operation runs as a task that carries its own."""
    if array_api_compat.is_dask_array(a) or array_api_compat.is_dask_array(b):
        import dask.array  # already imported: the caller handed us Dask arrays

        return dask.array.map_blocks(_IEEE_RESULTS(operation), a, b)
    return operation(a, b)


def _raise_first_bad(xp, target, bad, layout: Layout, ignore_index: int) -> None:
    if bool(xp.any(bad)):
        flat = int(xp.argmax(xp.astype(xp.reshape(bad, (-1,)), xp.int8)))
        position = np.unravel_index(flat, layout.output_shape) if layout.output_shape else ()
        value = int(xp.reshape(target, (-1,))[flat])
        raise _validate.out_of_bounds_error(
            value, tuple(int(p) for p in position), layout.classes, ignore_index
        )


def _total_weight(engine, g: _Targets):
    """The 'mean' denominator: the sum of w[t], or the count, over non-ignored elements."""
    xp = engine.xp
    if g.weight is None:
        return xp.astype(xp.sum(xp.astype(g.valid, _index_dtype(xp))), g.dtype)
    return engine.sums(g.valid, g.weight)[0]


# NaN and inf are results here, as in torch (0/0 for an all-ignored mean, 0 * inf for a
# zero weight on -inf): NumPy is told not to warn about them.
_IEEE_RESULTS = np.errstate(divide="ignore", invalid="ignore", over="ignore")


def _log_probs(xp, x, layout: Layout, dtype):
    """log_softmax over the class axis of the batched input, in the compute dtype, as torch's:
    ``(x - max) - log(sum(exp(x - max)))``."""
    x = xp.astype(_batched(xp, x, layout), dtype)
    if layout.classes == 0:
        return x
    shifted = x - xp.max(x, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def _class_weights(xp, w, x_dtype, dtype, layout: Layout):
    """The weight in the compute dtype, shaped to broadcast along the class axis."""
    w = xp.astype(xp.astype(w, x_dtype), dtype)
    batched_rank = len(layout.input_shape) + layout.unbatched
    return xp.reshape(w, (1, layout.classes) + (1,) * (batched_rank - 2))


def _smoothing_losses(xp, log_probs, w, g: _Targets, x_dtype, layout: Layout):
    """Per target element, ``-sum_c w_c log p_c`` (0 where ignored), flat."""
    if w is not None:
        log_probs = log_probs * _class_weights(xp, w, x_dtype, g.dtype, layout)
    smooth = xp.reshape(-xp.sum(log_probs, axis=1), (-1,))
    return xp.where(g.valid, smooth, xp.zeros((), dtype=g.dtype, device=g.device))


def _scalar(xp, value, g: _Targets):
    return xp.asarray(value, dtype=g.dtype, device=g.device)


def _given_total(xp, options: Options, g: _Targets):
    return xp.astype(xp.reshape(options.total_weight, ()), g.dtype)


@_IEEE_RESULTS
def forward(engine, x, t, w, ignore_index: int, reduction: str, layout: Layout, options=PLAIN):
    """The loss: shape ``layout.output_shape`` for 'none', 0-d otherwise; x's dtype."""
    xp = engine.xp
    g = _select(engine, x, t, w, ignore_index, layout)
    log_probs = _log_probs(xp, x, layout, g.dtype) if options.from_logits else x
    picked, unmasked = _pick(engine, log_probs, g, layout)
    losses = -picked if g.weight is None else -(picked * g.weight)
    losses = xp.where(g.valid, losses, xp.zeros((), dtype=g.dtype, device=g.device))  # +0.0
    if g.bad is not None and unmasked is not None:
        # Traced or lazy: an out-of-range target makes its loss NaN, and (through x[n, 0],
        # where its gather index points) its row's gradient NaN too.
        # The factor is NaN on bad rows only: a NaN multiplier everywhere would leak NaN
        # into every row's gradient through where's unselected branch (0 * NaN).
        zero = xp.zeros((), dtype=g.dtype, device=g.device)
        factor = xp.where(g.bad, _scalar(xp, float("nan"), g), zero)
        losses = xp.where(g.bad, unmasked * factor, losses)
    smoothing = options.label_smoothing
    smooth = None
    if smoothing:
        log_probs = _batched(xp, log_probs, layout)  # (unchanged when from_logits)
        smooth = _smoothing_losses(xp, xp.astype(log_probs, g.dtype), w, g, x.dtype, layout)

    def blend(nll, smooth):
        # torch: (1 - eps) * nll + smooth * (eps / C), the scalars in the compute dtype
        if smooth is None:
            return nll
        return _scalar(xp, 1.0 - smoothing, g) * nll + smooth * _scalar(
            xp, smoothing / layout.classes, g
        )

    if reduction == "none" and not layout.unbatched:
        return xp.astype(xp.reshape(blend(losses, smooth), layout.output_shape), x.dtype)
    given = options.total_weight
    if layout.size == 0:
        if reduction == "mean" and given is not None:
            return xp.astype(_scalar(xp, 0.0, g) / _given_total(xp, options, g), x.dtype)
        value = float("nan") if reduction == "mean" else 0.0
        return xp.asarray(value, dtype=x.dtype, device=g.device)
    # An unbatched input is reduced even for 'none' (as torch): its single element is summed.
    if reduction == "mean" and g.weight is not None and given is None:
        loss_sum, total = engine.sums(g.valid, losses, g.weight)  # one pass, one order
    else:
        (loss_sum,) = engine.sums(g.valid, losses)
        total = None
        if reduction == "mean":
            total = _total_weight(engine, g) if given is None else _given_total(xp, options, g)
    smooth_sum = None if smooth is None else engine.sums(g.valid, smooth)[0]
    if total is not None:
        loss_sum = _ieee(operator.truediv, loss_sum, total)
        if smooth_sum is not None:
            smooth_sum = _ieee(operator.truediv, smooth_sum, total)
    loss_sum = blend(loss_sum, smooth_sum)
    if isinstance(loss_sum, np.generic):  # NumPy arithmetic on 0-d arrays gives scalars
        loss_sum = np.asarray(loss_sum)
    return xp.astype(loss_sum, x.dtype)


@_IEEE_RESULTS
def backward(
    engine,
    grad_output,
    x,
    t,
    w,
    ignore_index: int,
    reduction: str,
    layout: Layout,
    options=PLAIN,
    out=None,
):
    """The gradient of ``forward`` with respect to ``x``, for the upstream ``grad_output``.

    With options, the operations of torch's autograd through ``cross_entropy``: the
    target term scaled by ``1 - eps``, the smoothing term's ``-(u * eps / C) * w_c`` on
    every class, then for logits the log-softmax's ``grad - softmax * sum(grad)``.
    """
    xp = engine.xp
    g = _select(engine, x, t, w, ignore_index, layout)
    upstream = xp.astype(grad_output, g.dtype)
    zero = xp.zeros((), dtype=g.dtype, device=g.device)
    smoothing = options.label_smoothing

    elementwise = reduction == "none" and not layout.unbatched
    if elementwise:
        upstream = xp.reshape(xp.broadcast_to(upstream, layout.output_shape), (-1,))
    else:
        upstream = xp.reshape(upstream, ())
    target_upstream = upstream * _scalar(xp, 1.0 - smoothing, g) if smoothing else upstream
    if elementwise:
        values = -target_upstream if g.weight is None else (-g.weight) * target_upstream
    else:
        if reduction == "mean":
            if options.total_weight is None:
                total = _total_weight(engine, g)
            else:
                total = _given_total(xp, options, g)
            step = -_ieee(operator.truediv, target_upstream, total)
        else:
            step = -target_upstream
        values = step if g.weight is None else _ieee(operator.mul, g.weight, step)
        values = xp.broadcast_to(values, (layout.size,))
    values = xp.where(g.valid, values, zero)
    if g.bad is not None:  # traced or lazy: NaN gradient where a target is out of range
        values = xp.where(g.bad, _scalar(xp, float("nan"), g), values)

    batched_shape = tuple(_batched(xp, x, layout).shape)
    index_shape = (batched_shape[0], 1, *batched_shape[2:])
    if not smoothing and not options.from_logits:
        grad = engine.scatter(
            batched_shape, x.dtype, g.index, xp.astype(xp.reshape(values, index_shape), x.dtype)
        )
        return _finish(xp, grad, x, out)

    grad = engine.scatter(batched_shape, g.dtype, g.index, xp.reshape(values, index_shape))
    if smoothing:
        smooth_upstream = upstream * _scalar(xp, smoothing / layout.classes, g)
        if reduction == "mean":
            smooth_upstream = _ieee(operator.truediv, smooth_upstream, total)
        smooth_upstream = xp.where(g.valid, xp.broadcast_to(-smooth_upstream, (layout.size,)), zero)
        smooth_grad = xp.reshape(smooth_upstream, index_shape)
        if w is not None:
            smooth_grad = smooth_grad * _class_weights(xp, w, x.dtype, g.dtype, layout)
        grad = grad + smooth_grad
    if options.from_logits and layout.classes:
        probabilities = xp.exp(_log_probs(xp, x, layout, g.dtype))
        grad = grad - probabilities * xp.sum(grad, axis=1, keepdims=True)
        # nothing from an ignored element, not even its row's NaN or inf
        grad = xp.where(xp.reshape(g.valid, index_shape), grad, zero)
    return _finish(xp, xp.astype(grad, x.dtype), x, out)


def _finish(xp, grad, x, out):
    """The gradient in the input's shape, written into ``out`` when given."""
    grad = xp.reshape(grad, tuple(x.shape))
    if out is None:
        return grad
    out[...] = grad
    return out


def forward_backward(
    engine, grad_output, x, t, w, ignore_index, reduction, layout, options=PLAIN, out=None
):
    """``(forward(...), backward(...))``; the loss is computed before ``out`` is written."""
    loss = forward(engine, x, t, w, ignore_index, reduction, layout, options)
    grad = backward(engine, grad_output, x, t, w, ignore_index, reduction, layout, options, out)
    return loss, grad


@_IEEE_RESULTS
def total_weight(engine, t, w, ignore_index: int):
    """See ``nllloss.total_weight``: the 'mean' denominator of targets ``t``."""
    xp = engine.xp
    shape = tuple(t.shape)
    size = 1
    for d in shape:
        size *= d
    classes = int(w.shape[0]) if w is not None else 0
    layout = Layout(shape, shape, 1, classes, size)
    flat = xp.reshape(t, (-1,))
    if w is None:
        valid = _compare(xp, flat, "!=", ignore_index)
        count = xp.sum(xp.astype(valid, _index_dtype(xp)))
        return np.asarray(count) if isinstance(count, np.generic) else count
    valid, bad = _checked_valid(xp, t, layout, ignore_index)
    valid = xp.reshape(valid, (-1,))
    dtype = _compute_dtype(xp, w.dtype)
    device = array_api_compat.device(t)
    if classes == 0 or size == 0:
        return xp.zeros((), dtype=dtype, device=device)
    index = xp.where(valid, xp.astype(flat, _index_dtype(xp)), 0)
    picked = xp.where(valid, xp.take(xp.astype(w, dtype), index, axis=0), xp.zeros((), dtype=dtype))
    total = engine.sums(valid, picked)[0]
    if bad is not None:  # traced: an out-of-range target makes the total NaN
        total = xp.where(xp.any(bad), xp.asarray(float("nan"), dtype=dtype), total)
    if isinstance(total, np.generic):
        total = np.asarray(total)
    return total

"""The array-API implementation of the loss and its gradient: the specification in code.

A :class:`Backend` is this implementation bound to one array namespace, with the two
operations whose best form depends on the library: summing the per-element losses (NumPy
reproduces torch's CPU summation order bit for bit, see ``_reduction``) and writing the
one non-zero gradient entry per target element. Problems arrive validated
(``_problem.Problem``). Shapes are handled without copying the
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

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from ._problem import Layout, Problem, computes_in_float32


@dataclass
class _Targets:
    index: Any  # (B, 1, d...) class index per target element; 0 where ignored
    valid: Any  # (M,) bool, row-major over the target
    weight: Any  # (M,) w[t] in the compute dtype, 0 where ignored; None when unweighted
    dtype: Any  # compute dtype: float32 for 16-bit inputs, else the input's
    device: Any
    bad: Any  # (M,) bool where a target is out of range (values not inspectable), or None


def index_dtype(xp):
    """The namespace's indexing dtype: int64 usually, int32 for JAX without x64."""
    try:
        return xp.__array_namespace_info__().default_dtypes()["indexing"]
    except AttributeError:  # namespaces older than the 2023.12 standard
        return xp.int64


def compute_dtype(xp, dtype):
    return xp.float32 if computes_in_float32(dtype) else dtype


def _batched(xp, x, layout: Layout):
    """The input with a batch axis: ``(C,)`` is viewed as ``(1, C)``."""
    return xp.reshape(x, (1, layout.classes)) if layout.unbatched else x


_COMPARISONS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, ">=": operator.ge}


def compare(xp, target, op: str, value: int):
    """``target <op> value`` for a Python int that the target's dtype may not hold."""
    info = xp.iinfo(target.dtype)
    if op in ("<", ">=") and (value <= info.min or value > info.max):
        # every element compares the same way (``t < 0`` of an unsigned target, say)
        result = (value > info.max) == (op == "<")
    elif op in ("==", "!=") and not info.min <= value <= info.max:
        result = op == "!="
    elif info.min == 0 and info.bits > 8 and array_api_compat.is_torch_namespace(xp):
        return _compare_widened(xp, target, op, value)
    else:
        return _COMPARISONS[op](target, value)
    return xp.full(target.shape, result, dtype=xp.bool, device=array_api_compat.device(target))


_INT64_MAX = 2**63 - 1


def _compare_widened(xp, target, op: str, value: int):
    """``compare`` of a uint16/32/64 torch tensor, which torch compares on few devices (not
    the CPU): in int64, where uint64 values from 2**63 on wrap to negative numbers, above
    every ``value`` (an int64: ``compare`` answered the others)."""
    wide = xp.astype(target, xp.int64)
    result = _COMPARISONS[op](wide, value)
    if xp.iinfo(target.dtype).max <= _INT64_MAX:
        return result
    wrapped = wide < 0
    return (result | wrapped) if op in (">=", "!=") else (result & ~wrapped)


def values_hidden(array: Any) -> bool:
    """True when the array's values cannot be read now: JAX inside jit/grad/vmap, Dask
    before compute, a tensor batched by ``torch.func.vmap`` or traced by ``torch.compile``.
    A check of such values cannot raise; what it finds becomes NaN in the result, as JAX
    does under ``jit``."""
    if array_api_compat.is_jax_array(array):
        import jax  # already imported: the caller handed us a JAX array

        return isinstance(array, jax.core.Tracer)
    if array_api_compat.is_dask_array(array):
        return True
    if array_api_compat.is_torch_array(array):
        import torch  # already imported: the caller handed us a torch tensor

        if torch.compiler.is_compiling():
            return True
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(array):
            if functorch.is_batchedtensor(array):
                return True
            array = functorch.get_unwrapped(array)
    return False


def _select(backend: Backend, problem: Problem) -> _Targets:
    """Check the target values; the class index and weight of each target element."""
    xp, layout = backend.xp, problem.layout
    x = problem.input
    device = array_api_compat.device(x)
    target = xp.reshape(problem.target, (1,) if layout.unbatched else layout.output_shape)
    valid, bad = checked_valid(xp, target, layout, problem.ignore_index)
    if bad is not None:
        valid = valid & ~bad
        bad = xp.reshape(bad, (-1,))
    index = xp.expand_dims(xp.where(valid, xp.astype(target, index_dtype(xp)), 0), axis=1)
    valid = xp.reshape(valid, (-1,))
    dtype = compute_dtype(xp, x.dtype)
    weight = None
    if problem.weight is not None:
        if layout.classes == 0:
            weight = xp.zeros((layout.size,), dtype=dtype, device=device)  # all ignored
        else:
            weight = xp.take(xp.astype(problem.weight, dtype), xp.reshape(index, (-1,)), axis=0)
            weight = xp.where(valid, weight, xp.zeros((), dtype=dtype, device=device))
    return _Targets(index, valid, weight, dtype, device, bad)


def checked_valid(xp, target, layout: Layout, ignore_index: int):
    """(target != ignore_index, out-of-range targets or None).

    Readable arrays raise the IndexError for the first bad target; Dask raises it when
    computed; arrays whose values are hidden otherwise return where the bad targets are.
    Whether they are hidden is asked of the computed mask, not of the target: inside
    ``jax.jit`` a target closed over as a concrete array gives a traced mask too."""
    if array_api_compat.is_dask_array(target):
        # Lazy: the mask is computed by a task that raises the IndexError, so that every
        # result depends on the check (a mask that does not read the target, as for an
        # unsigned target and a negative ignore_index, would drop it from the graph).
        valid = target.map_blocks(
            _checked_valid_block,
            classes=layout.classes,
            ignore_index=ignore_index,
            output_shape=layout.output_shape,
            dtype=bool,
        )
        return valid, None
    valid = compare(xp, target, "!=", ignore_index)
    bad = valid & (compare(xp, target, "<", 0) | compare(xp, target, ">=", layout.classes))
    if values_hidden(bad):
        return valid, bad
    raise_first_bad(xp, target, bad, layout, ignore_index)
    return valid, None


def _checked_valid_block(block, classes, ignore_index, output_shape, block_info=None):
    """``block != ignore_index`` for a block of a lazy target, after raising the IndexError
    for its first value that is neither a class nor ``ignore_index``."""
    values = np.asarray(block)
    valid = compare(np, values, "!=", ignore_index)
    bad = valid & (compare(np, values, "<", 0) | compare(np, values, ">=", classes))
    if bad.any():
        local = np.unravel_index(int(np.argmax(bad)), values.shape)
        start = [begin for begin, _ in block_info[0]["array-location"]] if block_info else []
        position = tuple(
            int(i) + int(b) for i, b in zip(local, start or [0] * len(local), strict=True)
        )
        flat = int(np.ravel_multi_index(position, output_shape)) if output_shape else 0
        layout = Layout((), tuple(output_shape), 1, classes, 1)
        raise layout.bad_target(flat, int(values[local]), ignore_index)
    return valid


def raise_first_bad(xp, target, bad, layout: Layout, ignore_index: int) -> None:
    """Raise the IndexError for the first target marked ``bad`` (row-major), if any."""
    if bool(xp.any(bad)):
        flat = int(xp.argmax(xp.astype(xp.reshape(bad, (-1,)), xp.int8)))
        element = xp.reshape(target, (-1,))[flat]
        if xp.iinfo(target.dtype).max > _INT64_MAX:  # torch reads no int beyond int64's
            value = int(xp.astype(element, xp.int64)) % 2**64
        else:
            value = int(element)
        raise layout.bad_target(flat, value, ignore_index)


def _pick(xp, x, targets: _Targets, layout: Layout, minus=()):
    """(x[t] per target element (less each of ``minus``, arrays with the class axis kept,
    in turn), flat, in the compute dtype and 0 where ignored; the same unmasked, or None
    when there is nothing to gather)."""
    zero = xp.zeros((), dtype=targets.dtype, device=targets.device)
    if layout.classes == 0 or layout.size == 0:
        return xp.zeros((layout.size,), dtype=targets.dtype, device=targets.device), None
    raw = take_classes(xp, _batched(xp, x, layout), targets.index)
    for term in minus:
        raw = raw - term
    raw = xp.astype(xp.reshape(raw, (-1,)), targets.dtype)
    return xp.where(targets.valid, raw, zero), raw


def take_classes(xp, x, index):
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


# NaN and inf are results here, as in torch (0/0 for an all-ignored mean, 0 * inf for a
# zero weight on -inf): NumPy is told not to warn about them.
IEEE_RESULTS = np.errstate(divide="ignore", invalid="ignore", over="ignore")


def ieee_results(function):
    """``function(backend, ...)`` under :data:`IEEE_RESULTS`, except on torch's namespace:
    torch never warns, and ``torch.compile`` cannot trace NumPy's ``errstate``."""
    quiet = IEEE_RESULTS(function)

    @functools.wraps(function)
    def run(backend, *arguments, **keywords):
        if array_api_compat.is_torch_namespace(backend.xp):
            return function(backend, *arguments, **keywords)
        return quiet(backend, *arguments, **keywords)

    return run


def _ieee(operation, a, b):
    """``operation(a, b)`` with IEEE results and no NumPy warning, also for Dask, which
    computes after our ``errstate`` has ended: there the operation runs as a task that
    carries its own."""
    if array_api_compat.is_dask_array(a) or array_api_compat.is_dask_array(b):
        import dask.array  # already imported: the caller handed us Dask arrays

        return dask.array.map_blocks(IEEE_RESULTS(operation), a, b)
    return operation(a, b)


def smoothing_share(label_smoothing: float, classes: int) -> float:
    """``eps / C``, the smoothing term's scale, as torch's C++ double division (inf for
    C = 0, which makes a smoothed loss over no classes NaN, as torch's)."""
    return label_smoothing / classes if classes else float("inf")


def softcap_parts(softcap: float, largest: float, smallest_normal: float):
    """``softcap`` c as ``(m, s1, s2)`` with ``c = m / (s1 * s2)``, for a floating dtype of
    largest value ``largest`` and smallest normal ``smallest_normal``: ``(c, 1, 1)`` when
    the dtype holds c as a normal number; else c's mantissa and two powers of two that it
    holds (float32 holds neither 1e39 nor 1e-50), so that ``x / c = (x / m) * s1 * s2``
    and ``c t = (m t) / s1 / s2`` over- or underflow only where their values do.

    Beyond ``2**±250`` in float32 the exponent is clamped: there every finite ``x / c`` is
    below ``sqrt(eps)`` (the cap is the identity) or above float32's range (the cap is
    ``±c``, which rounds to ±0), as it is at ``2**±250``.

    >>> softcap_parts(30.0, 3.4e38, 1.2e-38)
    (30.0, 1.0, 1.0)
    >>> softcap_parts(2.0**130, 3.4e38, 1.2e-38)
    (0.5, 2.710505431213761e-20, 1.3552527156068805e-20)
    """
    if smallest_normal <= softcap <= largest:
        return softcap, 1.0, 1.0
    mantissa, exponent = math.frexp(softcap)
    limit = 2 * (math.frexp(largest)[1] - 3)  # each half stays a normal number
    exponent = max(-limit, min(limit, exponent))
    first = exponent // 2
    return mantissa, 2.0**-first, 2.0 ** -(exponent - first)


def _cap_argument(xp, x, softcap: float):
    """``(x / c, (m, s1, s2) as x's scalars, whether c is scaled)`` (see ``softcap_parts``).

    Scaled, ``x / c`` is ``((x * s1) / m) * s2``: no step overflows unless ``x / c`` does,
    and a subnormal step (which XLA flushes to 0) is below ``sqrt(eps)``, where the cap
    returns x.
    """
    info = xp.finfo(x.dtype)
    parts = softcap_parts(softcap, float(info.max), float(info.smallest_normal))
    device = array_api_compat.device(x)
    mantissa, first, second = (xp.asarray(v, dtype=x.dtype, device=device) for v in parts)
    scaled = parts[1] != 1.0
    if not scaled:
        return _ieee(operator.truediv, x, mantissa), (mantissa, first, second, scaled)
    y = _ieee(
        operator.mul, _ieee(operator.truediv, _ieee(operator.mul, x, first), mantissa), second
    )
    return y, (mantissa, first, second, scaled)


def compute_logits(xp, problem: Problem, dtype):
    """The batched input in the compute dtype; with ``softcap`` c, ``c * tanh(x / c)``:
    ``x`` itself where ``|x / c| < sqrt(eps)`` (there ``tanh y = y`` to the dtype's
    precision, and ``x / c`` may underflow when c is large), for every c > 0 (see
    ``softcap_parts``)."""
    x = xp.astype(_batched(xp, problem.input, problem.layout), dtype)
    if problem.softcap is None:
        return x
    y, (mantissa, first, second, scaled) = _cap_argument(xp, x, problem.softcap)
    capped = mantissa * xp.tanh(y)
    if scaled:
        capped = _ieee(operator.truediv, _ieee(operator.truediv, capped, first), second)
    linear = math.sqrt(float(xp.finfo(dtype).eps))
    return xp.where(xp.abs(y) < linear, x, capped)


def _log_softmax(xp, x, classes: int):
    """(log_softmax over the class axis, as torch's ``(x - max) - log(sum(exp(x - max)))``;
    the log-sum-exp ``max + log(sum(...))``, keeping the class axis, or None without classes)."""
    if classes == 0:
        return x, None
    shifted, log_norm, top = _normalised(xp, x)
    return shifted - log_norm, top + log_norm


def _normalised(xp, x, constant=None):
    """``(x - max, log(sum(exp(x - max))), max)`` over the class axis (kept): the parts of
    the log-softmax (at least one class).

    The maximum only keeps ``exp`` in range: the log-softmax and log-sum-exp do not depend
    on it (their derivatives with respect to it are ``-1 + 1`` and ``1 - 1``), so
    ``constant`` (``Backend.constant``) may mark it as a constant of differentiation: a
    traced derivative then has no term for it, which would cost passes over every class
    (its ties mask, their count) to add what is zero but for rounding.
    """
    top = xp.max(x, axis=1, keepdims=True)
    if constant is not None:
        top = constant(top)
    shifted = x - top
    return shifted, xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True)), top


def cap_gradient(xp, grad, problem: Problem, dtype):
    """The gradient with respect to the capped logits taken back through the cap:
    ``d(c tanh(x / c))/dx = 1 - tanh(x / c)**2``."""
    if problem.softcap is None:
        return grad
    x = xp.astype(_batched(xp, problem.input, problem.layout), dtype)
    slope = xp.tanh(_cap_argument(xp, x, problem.softcap)[0])
    return grad * (xp.asarray(1.0, dtype=dtype, device=array_api_compat.device(x)) - slope * slope)


def _class_weights(xp, w, dtype, layout: Layout):
    """The weight in the compute dtype, shaped to broadcast along the class axis."""
    batched_rank = len(layout.input_shape) + layout.unbatched
    return xp.reshape(xp.astype(w, dtype), (1, layout.classes) + (1,) * (batched_rank - 2))


def _smoothing_losses(xp, log_probs, problem: Problem, g: _Targets):
    """Per target element, ``-sum_c w_c log p_c`` (0 where ignored), flat."""
    if problem.weight is not None:
        log_probs = log_probs * _class_weights(xp, problem.weight, g.dtype, problem.layout)
    smooth = xp.reshape(-xp.sum(log_probs, axis=1), (-1,))
    return xp.where(g.valid, smooth, xp.zeros((), dtype=g.dtype, device=g.device))


def _scalar(xp, value, g: _Targets):
    return xp.asarray(value, dtype=g.dtype, device=g.device)


def _given_total(xp, problem: Problem, g: _Targets):
    return xp.astype(xp.reshape(problem.total_weight, ()), g.dtype)


@dataclass(frozen=True)
class Backend:
    """The generic implementation on the array namespace ``xp``.

    ``sums(valid, *values)`` gives one 0-d sum per values array (``valid`` marks the
    non-ignored elements, values are already zero elsewhere, and it fixes the order);
    ``scatter(shape, dtype, index, values)`` gives zeros of ``shape`` with ``values``
    written at ``index`` along axis 1. Both default to the namespace's ``sum`` and a
    compare-and-select that needs no in-place writes (lazy and traced arrays have none).
    ``constant(x)`` is ``x`` marked as a constant for a library that differentiates
    ``forward`` by tracing it (``jax.lax.stop_gradient``); by default ``x`` itself.
    """

    xp: Any
    sums: Any = None
    scatter: Any = None
    constant: Any = None
    # The shortcut of the commonest forward that fast backends offer; none here.
    quick_forward: ClassVar[Any] = None

    @staticmethod
    def autocast(array):
        """The array itself: no mixed-precision context applies (torch's: ``_routes.torch``)."""
        return array

    def __post_init__(self):
        if self.sums is None:
            object.__setattr__(self, "sums", _namespace_sums(self.xp))
        if self.scatter is None:
            object.__setattr__(self, "scatter", _one_hot_scatter(self.xp))
        if self.constant is None:
            object.__setattr__(self, "constant", _unchanged)

    @ieee_results
    def forward(self, problem: Problem):
        """The loss: shape ``problem.loss_shape``, in the input's dtype."""
        if problem.probabilities:
            return _probability_forward(self, problem)
        xp, layout, x = self.xp, problem.layout, problem.input
        g = _select(self, problem)
        log_probs, lse = x, None
        if problem.from_logits and layout.classes:
            # The target's log-probability as (x[t] - max) - log_norm: the bits of gathering
            # the log-softmax, without forming it for every class (nor, differentiated, its
            # gradient's sum over the classes); formed only for label smoothing
            logits = compute_logits(xp, problem, g.dtype)
            shifted, log_norm, top = _normalised(xp, logits, self.constant)
            lse = top + log_norm
            picked, unmasked = _pick(xp, logits, g, layout, (top, log_norm))
            if problem.label_smoothing:
                log_probs = shifted - log_norm
        else:
            picked, unmasked = _pick(xp, log_probs, g, layout)
        losses = -picked if g.weight is None else -(picked * g.weight)
        losses = xp.where(g.valid, losses, xp.zeros((), dtype=g.dtype, device=g.device))  # +0.0
        if g.bad is not None and unmasked is not None:
            # Hidden values: an out-of-range target makes its loss NaN, and (through x[n, 0],
            # where its gather index points) its row's gradient NaN too. The factor is NaN on
            # bad rows only: a NaN multiplier everywhere would leak NaN into every row's
            # gradient through where's unselected branch (0 * NaN).
            zero = xp.zeros((), dtype=g.dtype, device=g.device)
            factor = xp.where(g.bad, _scalar(xp, float("nan"), g), zero)
            losses = xp.where(g.bad, unmasked * factor, losses)
        smoothing = problem.label_smoothing
        smooth = None
        if smoothing:
            log_probs = _batched(xp, log_probs, layout)  # (unchanged when from_logits)
            smooth = _smoothing_losses(xp, xp.astype(log_probs, g.dtype), problem, g)

        def blend(nll, smooth):
            # torch: (1 - eps) * nll + smooth * (eps / C), the scalars in the compute dtype
            if smooth is None:
                return nll
            share = _scalar(xp, smoothing_share(smoothing, layout.classes), g)
            return _scalar(xp, 1.0 - smoothing, g) * nll + _ieee(operator.mul, smooth, share)

        element_weight = g.weight if g.weight is not None else xp.astype(g.valid, g.dtype)
        z_terms = _z_terms(xp, problem, lse, element_weight)
        if problem.elementwise:
            losses = blend(losses, smooth)
            if z_terms is not None:
                losses = losses + z_terms
            return xp.astype(xp.reshape(losses, layout.output_shape), x.dtype)
        given = problem.total_weight
        mean = problem.reduction == "mean"
        if layout.size == 0:
            # A sum of nothing; smoothed, it is still scaled by eps / C: NaN without classes.
            empty_sum = 0.0 * smoothing_share(smoothing, layout.classes) if smoothing else 0.0
            if mean and given is not None:
                quotient = _ieee(
                    operator.truediv, _scalar(xp, empty_sum, g), _given_total(xp, problem, g)
                )
                return xp.astype(quotient, x.dtype)
            return xp.asarray(float("nan") if mean else empty_sum, dtype=x.dtype, device=g.device)
        if mean and g.weight is not None and given is None:
            loss_sum, total = self.sums(g.valid, losses, g.weight)  # one pass, one order
        else:
            (loss_sum,) = self.sums(g.valid, losses)
            total = None
            if mean:
                total = _total_weight(self, g) if given is None else _given_total(xp, problem, g)
        smooth_sum = None if smooth is None else self.sums(g.valid, smooth)[0]
        z_sum = None if z_terms is None else self.sums(g.valid, z_terms)[0]
        if total is not None:
            loss_sum = _ieee(operator.truediv, loss_sum, total)
            if smooth_sum is not None:
                smooth_sum = _ieee(operator.truediv, smooth_sum, total)
            if z_sum is not None:
                z_sum = _ieee(operator.truediv, z_sum, total)
        loss_sum = blend(loss_sum, smooth_sum)
        if z_sum is not None:
            loss_sum = loss_sum + z_sum
        if isinstance(loss_sum, np.generic):  # NumPy arithmetic on 0-d arrays gives scalars
            loss_sum = np.asarray(loss_sum)
        return xp.astype(loss_sum, x.dtype)

    @ieee_results
    def backward(self, problem: Problem, grad_output, out=None):
        """The gradient of ``forward`` with respect to the input, for ``grad_output``.

        With options, the operations of torch's autograd through ``cross_entropy``: the
        target term scaled by ``1 - eps``, the smoothing term's ``-(u * eps / C) * w_c`` on
        every class, then for logits the log-softmax's ``grad - softmax * sum(grad)``.
        """
        if problem.probabilities:
            return _probability_backward(self, problem, grad_output, out)
        xp, layout, x = self.xp, problem.layout, problem.input
        g = _select(self, problem)
        upstream = xp.astype(grad_output, g.dtype)
        zero = xp.zeros((), dtype=g.dtype, device=g.device)
        smoothing = problem.label_smoothing

        if problem.elementwise:
            upstream = xp.reshape(xp.broadcast_to(upstream, layout.output_shape), (-1,))
        else:
            upstream = xp.reshape(upstream, ())
        target_upstream = upstream * _scalar(xp, 1.0 - smoothing, g) if smoothing else upstream
        total = None
        if problem.elementwise:
            values = -target_upstream if g.weight is None else (-g.weight) * target_upstream
        else:
            if problem.reduction == "mean":
                if problem.total_weight is None:
                    total = _total_weight(self, g)
                else:
                    total = _given_total(xp, problem, g)
                step = -_ieee(operator.truediv, target_upstream, total)
            else:
                step = -target_upstream
            values = step if g.weight is None else _ieee(operator.mul, g.weight, step)
            values = xp.broadcast_to(values, (layout.size,))
        values = xp.where(g.valid, values, zero)
        if g.bad is not None:  # hidden values: NaN gradient where a target is out of range
            values = xp.where(g.bad, _scalar(xp, float("nan"), g), values)

        batched_shape = tuple(_batched(xp, x, layout).shape)
        index_shape = (batched_shape[0], 1, *batched_shape[2:])
        if not problem.over_rows:
            values = xp.astype(xp.reshape(values, index_shape), x.dtype)
            return _finish(xp, self.scatter(batched_shape, x.dtype, g.index, values), x, out)

        grad = self.scatter(batched_shape, g.dtype, g.index, xp.reshape(values, index_shape))
        if smoothing:
            smooth_upstream = upstream * _scalar(xp, smoothing_share(smoothing, layout.classes), g)
            if total is not None:
                smooth_upstream = _ieee(operator.truediv, smooth_upstream, total)
            smooth_upstream = xp.where(
                g.valid, xp.broadcast_to(-smooth_upstream, (layout.size,)), zero
            )
            smooth_grad = xp.reshape(smooth_upstream, index_shape)
            if problem.weight is not None:
                smooth_grad = smooth_grad * _class_weights(xp, problem.weight, g.dtype, layout)
            grad = grad + smooth_grad
        if problem.from_logits and layout.classes:
            log_probs, lse = _log_softmax(xp, compute_logits(xp, problem, g.dtype), layout.classes)
            probabilities = xp.exp(log_probs)
            grad = grad - probabilities * xp.sum(grad, axis=1, keepdims=True)
            if problem.z_loss:  # d(z lse**2)/dx_c = 2 z lse softmax_c, per element's weight
                element = upstream if total is None else _ieee(operator.truediv, upstream, total)
                element_weight = g.weight if g.weight is not None else xp.astype(g.valid, g.dtype)
                element = xp.reshape(element * element_weight, index_shape)
                z_scale = _scalar(xp, 2.0 * problem.z_loss, g) * lse
                grad = grad + (z_scale * element) * probabilities
            grad = cap_gradient(xp, grad, problem, g.dtype)
            # nothing from an ignored element, not even its row's NaN or inf
            grad = xp.where(xp.reshape(g.valid, index_shape), grad, zero)
        return _finish(xp, xp.astype(grad, x.dtype), x, out)

    def forward_and_lse(self, problem: Problem):
        """``(forward(...), log_normalizer(...))``."""
        return self.forward(problem), log_normalizer(self.xp, problem)

    def forward_backward(self, problem: Problem, grad_output, out=None):
        """``(forward(...), backward(...))``; the loss is computed before ``out`` is written."""
        loss = self.forward(problem)
        return loss, self.backward(problem, grad_output, out)

    @ieee_results
    def total_weight(self, target, weight, ignore_index: int):
        """See ``nllloss.total_weight``: the 'mean' denominator of ``target``."""
        xp = self.xp
        shape = tuple(target.shape)
        size = 1
        for d in shape:
            size *= d
        classes = int(weight.shape[0]) if weight is not None else 0
        flat = xp.reshape(target, (-1,))
        if weight is None:
            valid = compare(xp, flat, "!=", ignore_index)
            count = xp.sum(xp.astype(valid, index_dtype(xp)))
            return np.asarray(count) if isinstance(count, np.generic) else count
        layout = Layout(shape, shape, 1, classes, size)
        valid, bad = checked_valid(xp, target, layout, ignore_index)
        valid = xp.reshape(valid, (-1,))
        dtype = compute_dtype(xp, weight.dtype)
        device = array_api_compat.device(target)
        if classes == 0 or size == 0:
            return xp.zeros((), dtype=dtype, device=device)
        index = xp.where(valid, xp.astype(flat, index_dtype(xp)), 0)
        zero = xp.zeros((), dtype=dtype, device=device)
        picked = xp.where(valid, xp.take(xp.astype(weight, dtype), index, axis=0), zero)
        total = self.sums(valid, picked)[0]
        if bad is not None:  # hidden values: an out-of-range target makes the total NaN
            nan = xp.asarray(float("nan"), dtype=dtype, device=device)
            total = xp.where(xp.any(bad), nan, total)
        if isinstance(total, np.generic):
            total = np.asarray(total)
        return total


def log_normalizer(xp, problem: Problem):
    """``lse_n = log sum_c exp(x_{n, c})`` of each target element's (capped) logits, every
    element's (ignored ones too), in the loss's element-wise shape and the input's dtype;
    ``-inf`` without classes, as ``torch.logsumexp`` of nothing."""
    layout, x = problem.layout, problem.input
    if layout.classes == 0 or layout.size == 0:  # (a maximum of nothing is an error)
        device = array_api_compat.device(x)
        return xp.full(layout.output_shape, -float("inf"), dtype=x.dtype, device=device)
    logits = compute_logits(xp, problem, compute_dtype(xp, x.dtype))
    _, lse = _log_softmax(xp, logits, layout.classes)
    return xp.astype(xp.reshape(lse, layout.output_shape), x.dtype)


def _z_terms(xp, problem: Problem, lse, element_weight):
    """Per target element (flat), ``z * lse**2`` times the element's weight (0 where the
    weight is: ignored elements); None without ``z_loss`` or without classes."""
    if not problem.z_loss or lse is None:
        return None
    z = xp.asarray(problem.z_loss, dtype=lse.dtype, device=array_api_compat.device(lse))
    return xp.reshape(z * (lse * lse), (-1,)) * element_weight


def _probability_rows(xp, problem: Problem, dtype):
    """Probability targets, batched in the compute dtype: (log-probabilities (the input
    itself without ``from_logits``), the target's ``w_c p_c`` after smoothing, the
    log-sum-exp or None)."""
    layout = problem.layout
    device = array_api_compat.device(problem.input)
    if problem.from_logits:
        log_probs, lse = _log_softmax(xp, compute_logits(xp, problem, dtype), layout.classes)
    else:
        log_probs, lse = xp.astype(_batched(xp, problem.input, layout), dtype), None
    p = xp.astype(_batched(xp, problem.target, layout), dtype)
    smoothing = problem.label_smoothing
    if smoothing:  # as torch: p (1 - eps) + eps / C
        share = smoothing_share(smoothing, layout.classes)
        p = p * xp.asarray(1.0 - smoothing, dtype=dtype, device=device) + xp.asarray(
            share, dtype=dtype, device=device
        )
    if problem.weight is not None:
        p = p * _class_weights(xp, problem.weight, dtype, layout)
    return log_probs, p, lse


def _probability_denominator(xp, problem: Problem, dtype):
    """The 'mean' denominator of probability targets: ``total_weight`` when given, else the
    number of target elements, as torch's ``numel / C`` (NaN without classes)."""
    if problem.total_weight is not None:
        return xp.astype(xp.reshape(problem.total_weight, ()), dtype)
    device = array_api_compat.device(problem.input)
    return xp.asarray(problem.probability_count, dtype=dtype, device=device)


@ieee_results
def _probability_forward(backend: Backend, problem: Problem):
    """``l_n = -sum_c w_c p_{n,c} log q_{n,c}`` (+ ``z lse_n**2``), reduced; see ``forward``."""
    xp, layout, x = backend.xp, problem.layout, problem.input
    dtype = compute_dtype(xp, x.dtype)
    device = array_api_compat.device(x)
    log_probs, weighted, lse = _probability_rows(xp, problem, dtype)
    losses = xp.reshape(-xp.sum(log_probs * weighted, axis=1), (-1,))
    ones = xp.ones((layout.size,), dtype=dtype, device=device)
    z_terms = _z_terms(xp, problem, lse, ones)  # no class to weigh by: weight 1
    if z_terms is not None:
        losses = losses + z_terms
    if problem.elementwise:
        return xp.astype(xp.reshape(losses, layout.output_shape), x.dtype)
    if layout.size == 0:
        loss_sum = xp.zeros((), dtype=dtype, device=device)
    else:
        loss_sum = backend.sums(xp.ones((layout.size,), dtype=xp.bool, device=device), losses)[0]
    if problem.reduction == "mean":
        loss_sum = _ieee(operator.truediv, loss_sum, _probability_denominator(xp, problem, dtype))
    if isinstance(loss_sum, np.generic):
        loss_sum = np.asarray(loss_sum)
    return xp.astype(loss_sum, x.dtype)


@ieee_results
def _probability_backward(backend: Backend, problem: Problem, grad_output, out=None):
    """The gradient of ``_probability_forward``: ``-u w_c p_c`` for log-probabilities; from
    logits ``u (q_c sum_k w_k p_k - w_c p_c + 2 z lse q_c)``, through the cap when given."""
    xp, layout, x = backend.xp, problem.layout, problem.input
    dtype = compute_dtype(xp, x.dtype)
    log_probs, weighted, lse = _probability_rows(xp, problem, dtype)
    batched_shape = tuple(log_probs.shape)
    index_shape = (batched_shape[0], 1, *batched_shape[2:])
    upstream = xp.astype(grad_output, dtype)
    if problem.elementwise:
        upstream = xp.reshape(xp.broadcast_to(upstream, layout.output_shape), index_shape)
    else:
        upstream = xp.reshape(upstream, ())
        if problem.reduction == "mean":
            denominator = _probability_denominator(xp, problem, dtype)
            upstream = _ieee(operator.truediv, upstream, denominator)
    if not problem.from_logits or layout.classes == 0:
        return _finish(xp, xp.astype(-(upstream * weighted), x.dtype), x, out)
    q = xp.exp(log_probs)
    coefficient = xp.sum(weighted, axis=1, keepdims=True)
    if problem.z_loss:
        z_scale = xp.asarray(2.0 * problem.z_loss, dtype=dtype, device=array_api_compat.device(x))
        coefficient = coefficient + z_scale * lse
    grad = upstream * (q * coefficient - weighted)
    grad = cap_gradient(xp, grad, problem, dtype)
    return _finish(xp, xp.astype(grad, x.dtype), x, out)


def _total_weight(backend: Backend, g: _Targets):
    """The 'mean' denominator: the sum of w[t], or the count, over non-ignored elements."""
    xp = backend.xp
    if g.weight is None:
        return xp.astype(xp.sum(xp.astype(g.valid, index_dtype(xp))), g.dtype)
    return backend.sums(g.valid, g.weight)[0]


def _finish(xp, grad, x, out):
    """The gradient in the input's shape, written into ``out`` when given."""
    grad = xp.reshape(grad, tuple(x.shape))
    if out is None:
        return grad
    out[...] = grad
    return out


def _namespace_sums(xp):
    def sums(valid, *values):
        return tuple(xp.sum(v) for v in values)

    return sums


def _unchanged(x):
    return x


def _one_hot_scatter(xp):
    """Scatter without in-place writes: compare and select."""

    def scatter(shape, dtype, index, values):
        device = array_api_compat.device(index)
        classes = xp.reshape(
            xp.arange(shape[1], device=device), (1, shape[1]) + (1,) * (len(shape) - 2)
        )
        return xp.where(index == classes, values, xp.zeros((), dtype=dtype, device=device))

    return scatter

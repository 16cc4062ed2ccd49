r"""Per-token statistics of the logits: what reinforcement-learning trainers read.

``token_stats`` and ``linear_token_stats`` give, for each target element, the
log-probability of its target, the entropy, the log-sum-exp and the argmax of the
distribution ``softmax(z)``, ``z = cap(x) / T``. A :class:`Stats` is one validated call
(the :class:`~nllloss._problem.Problem` of the logits, ``reduction='none'``, with its
``softcap`` and ``ignore_index``, and the temperature). Three engines compute it, each
offering ``forward(stats) -> (TokenStats, saved)``, ``backward(stats, saved, upstream)``
and ``forward_backward(stats, upstream)`` (``upstream``: an :class:`Upstream`) and saying
which calls it ``supports``:

* :class:`GenericEngine`, the array-API composition: the specification in code, for
  every library, differentiable by each library's autodiff, with its gradient also
  written out (``backward``) for the blocks of ``linear_token_stats``;
* :class:`NumbaEngine`, the fused row kernel of ``nllloss._kernels.cpu._stats`` for
  (N, C) and unbatched NumPy arrays and torch CPU tensors (one read of each row for the
  statistics, one more read and a write for the gradient);
* the Triton kernels (``nllloss._kernels.triton._stats``) for CUDA tensors, when they are
  enabled.

torch tensors go through ``nllloss._token_stats.torch`` (autograd, ``torch.compile``), JAX arrays of
``linear_token_stats`` through ``nllloss._token_stats.jax`` (``jax.custom_vjp``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from .. import _generic, _validate
from .._hidden_states import algebra_for, blocks
from .._kernels import cpu
from .._options import Options
from .._problem import Problem, layout_of, out_of_range
from .._routes import as_array, backend_for, like_input


class TokenStats(NamedTuple):
    """Per-token statistics, each of the target's shape.

    Attributes
    ----------
    logprob : array
        ``log_softmax(z)[target]``; 0 where the target is ``ignore_index``.
    entropy : array
        ``-sum_c softmax(z)_c log softmax(z)_c`` (``0 log 0 = 0``), every element's.
    lse : array
        ``logsumexp(z)``, every element's.
    argmax : array
        ``argmax_c z`` (the first index on ties), int64 (JAX without x64: int32).
    """

    logprob: Any
    entropy: Any
    lse: Any
    argmax: Any


class Upstream(NamedTuple):
    """The upstream gradients of ``logprob``, ``entropy`` and ``lse`` (each None for zero,
    or an array of the target's shape)."""

    logprob: Any = None
    entropy: Any = None
    lse: Any = None


class LossAndStats(NamedTuple):
    """``nll_loss(..., return_stats=True)``: the loss, and the per-token statistics of its
    logits."""

    loss: Any
    stats: TokenStats


@dataclass(frozen=True)
class Stats:
    """One call of the statistics, validated: ``problem`` holds the logits (its input),
    the target, the layout, ``ignore_index`` and ``softcap``; ``temperature`` > 0."""

    problem: Problem
    temperature: float = 1.0

    def replace(self, **changes) -> Stats:
        return Stats(self.problem.replace(**changes), self.temperature)


def logits_problem(input, target, layout, ignore_index, softcap, check_targets=True) -> Problem:
    """The problem of the statistics' logits: reduction 'none', no weight, from logits."""
    options = Options(from_logits=True, check_targets=check_targets, softcap=softcap)
    return Problem(input, target, None, ignore_index, "none", layout, options)


def stats_problem(backend, input, target, ignore_index, softcap, logits_shape=None,
                  needs_classes=True) -> Problem:  # fmt: skip
    """The problem of a call's logits, after every check of ``nll_loss``'s (a target of
    class indices only); ``needs_classes``: a class at least (a shard of the classes may
    hold none: its group is checked)."""
    target = like_input(backend, target, input, "target")
    shape = tuple(input.shape) if logits_shape is None else logits_shape
    _validate.check_target(target, shape, probabilities=False)
    layout = layout_of(shape)
    if needs_classes:
        _validate.check_classes_for_stats(layout.classes)
    ignore_index = _validate.check_ignore_index(ignore_index)
    softcap = _validate.check_softcap(softcap, True)
    return logits_problem(input, target, layout, ignore_index, softcap)


# --- The generic engine: the specification ------------------------------------------------


@dataclass(frozen=True)
class GenericEngine:
    """The statistics and their gradient in the array-API operations of ``xp``."""

    xp: Any

    @staticmethod
    def supports(stats: Stats) -> bool:
        return True

    def forward(self, stats: Stats):
        xp, problem = self.xp, stats.problem
        layout, x = problem.layout, problem.input
        rows = _Rows.of(xp, stats)
        logprob = _take(xp, rows.log_p, rows.index)
        zero = xp.zeros((), dtype=rows.dtype, device=rows.device)
        logprob = xp.where(rows.valid, logprob, zero)
        if rows.bad is not None:  # values hidden (jit, vmap): NaN where out of range
            logprob = xp.where(rows.bad, xp.asarray(float("nan"), dtype=rows.dtype), logprob)
        safe_log_p = xp.where(rows.p == zero, zero, rows.log_p)  # 0 log 0 = 0, NaN stays
        entropy = -xp.sum(rows.p * safe_log_p, axis=1)
        lse = xp.squeeze(rows.top + rows.log_norm, axis=1)
        argmax = xp.astype(xp.argmax(rows.z, axis=1), _generic.index_dtype(xp))

        def shaped(a, dtype):
            return xp.astype(xp.reshape(a, layout.output_shape), dtype)

        result = TokenStats(
            shaped(logprob, x.dtype),
            shaped(entropy, x.dtype),
            shaped(lse, x.dtype),
            shaped(argmax, argmax.dtype),
        )
        return result, None

    def backward(self, stats: Stats, saved, upstream: Upstream):
        """The gradient with respect to the input (``saved`` is not used: the rows are
        computed again), in the input's dtype."""
        xp, problem = self.xp, stats.problem
        rows = _Rows.of(xp, stats)
        zero = xp.zeros((), dtype=rows.dtype, device=rows.device)
        index_shape = tuple(rows.index.shape)

        def per_row(a):
            if a is None:
                return zero
            return xp.reshape(xp.astype(a, rows.dtype), index_shape)

        a = xp.where(xp.reshape(rows.valid, index_shape), per_row(upstream.logprob), zero)
        if rows.bad is not None:
            nan = xp.asarray(float("nan"), dtype=rows.dtype)
            a = xp.where(xp.reshape(rows.bad, index_shape), nan, a)
        b, g = per_row(upstream.entropy), per_row(upstream.lse)
        # z_c - sum_k p_k z_k, as (z_c - m) - sum_k p_k (z_c - m); 0 where p_c is 0
        shifted = rows.z - rows.top
        safe = xp.where(rows.p == zero, zero, shifted)
        centred = safe - xp.sum(rows.p * safe, axis=1, keepdims=True)
        grad = -(rows.p * ((a - g) + b * centred))
        grad = xp.where(rows.p == zero, zero, grad)
        classes = xp.reshape(
            xp.arange(problem.layout.classes, device=rows.device),
            (1, problem.layout.classes) + (1,) * (len(index_shape) - 2),
        )
        grad = grad + xp.where(classes == xp.astype(rows.index, classes.dtype), a, zero)
        grad = _generic.cap_gradient(xp, grad, problem, rows.dtype)
        if stats.temperature != 1.0:
            grad = grad / xp.asarray(stats.temperature, dtype=rows.dtype, device=rows.device)
        return xp.astype(xp.reshape(grad, tuple(problem.input.shape)), problem.input.dtype)

    def forward_backward(self, stats: Stats, upstream: Upstream, out=None):
        """(statistics, gradient); ``out`` is not written (arrays may be immutable)."""
        return self.forward(stats)[0], self.backward(stats, None, upstream)


@dataclass
class _Rows:
    """The batched rows of a call in the compute dtype: ``z``, its maximum ``top`` and
    ``log_norm = log sum exp(z - top)`` (class axis kept), ``log_p``, ``p``; the target
    as a gather index (0 where ignored), where it is valid, where it is out of range
    (values hidden only, else None)."""

    z: Any
    top: Any
    log_norm: Any
    log_p: Any
    p: Any
    index: Any
    valid: Any
    bad: Any
    dtype: Any
    device: Any

    @staticmethod
    def of(xp, stats: Stats) -> _Rows:
        problem = stats.problem
        layout = problem.layout
        dtype = _generic.compute_dtype(xp, problem.input.dtype)
        device = array_api_compat.device(problem.input)
        z = _generic.compute_logits(xp, problem, dtype)
        if stats.temperature != 1.0:
            z = z / xp.asarray(stats.temperature, dtype=dtype, device=device)
        top = xp.max(z, axis=1, keepdims=True)
        shifted = z - top
        log_norm = xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        log_p = shifted - log_norm  # as torch's log_softmax
        target = xp.reshape(problem.target, (1,) if layout.unbatched else layout.output_shape)
        if problem.check_targets:
            valid, bad = _generic.checked_valid(xp, target, layout, problem.ignore_index)
        else:  # checked before (a backward's forward): traceable without a check
            valid, bad = _generic.compare(xp, target, "!=", problem.ignore_index), None
        if bad is not None:
            valid = valid & ~bad
        index = xp.where(valid, xp.astype(target, _generic.index_dtype(xp)), 0)
        index = xp.expand_dims(index, axis=1)
        return _Rows(z, top, log_norm, log_p, xp.exp(log_p), index, valid, bad, dtype, device)


def _take(xp, values, index):
    """``values[n, index[n], ...]`` without the class axis."""
    return xp.squeeze(_generic.take_classes(xp, values, index), axis=1)


# --- The numba engine -----------------------------------------------------------------------


class NumbaEngine:
    """The fused row kernel (``nllloss._kernels.cpu._stats``) on NumPy arrays of (N, C) or
    (C,) logits.

    ``saved`` is the rows' ``(m, log s, u / s)``, (N, 3) float64. Arrays arrive as NumPy
    arrays, or as the bits of 16-bit values (see :func:`numpy_rows`).
    """

    @staticmethod
    def supports(stats: Stats) -> bool:
        return stats.problem.layout.spatial == 1

    @staticmethod
    def forward(stats: Stats, bits=None):
        result, saved, _ = _statistics_pass(stats, bits)
        return result, saved

    @staticmethod
    def backward(stats: Stats, saved, upstream: Upstream, bits=None, out=None):
        """The gradient; written into ``out`` ((N, C) of the compute dtype) when given."""
        x2, table, target, rows = _kernel_arguments(stats, bits)
        grad = _gradient_array(x2, table, out)
        _run(stats, x2, table, target, True, saved, _upstream_rows(upstream, rows),
             _NO_VALUES, _NO_VALUES, _NO_VALUES, _NO_INDICES, grad)  # fmt: skip
        return grad

    @staticmethod
    def forward_backward(stats: Stats, upstream: Upstream, bits=None, out=None):
        result, _, grad = _statistics_pass(stats, bits, upstream, out)
        return result, grad


def _statistics_pass(stats: Stats, bits, upstream: Upstream | None = None, out=None):
    """(TokenStats, saved, gradient or None): one call of the kernel, with the gradient
    for ``upstream`` when given (into ``out`` when given)."""
    x2, table, target, rows = _kernel_arguments(stats, bits)
    if upstream is None:
        grad, upstream_rows = np.empty((0, 0), np.float32 if table.size else x2.dtype), _NO_UPSTREAM
    else:
        grad, upstream_rows = _gradient_array(x2, table, out), _upstream_rows(upstream, rows)
    saved = np.empty((rows, 3))
    logprob, entropy, lse = np.empty(rows), np.empty(rows), np.empty(rows)
    argmax = np.empty(rows, dtype=np.int64)
    _run(stats, x2, table, target, False, saved, upstream_rows, logprob, entropy, lse, argmax,
         grad)  # fmt: skip
    result = _shaped(stats, bits, logprob, entropy, lse, argmax)
    return result, saved, None if grad.shape[0] != rows else grad


_NO_UPSTREAM = np.zeros((0, 3))
_NO_VALUES = np.empty(0)
_NO_INDICES = np.empty(0, dtype=np.int64)


def _shaped(stats: Stats, bits, logprob, entropy, lse, argmax) -> TokenStats:
    """The kernel's float64 results of the target's shape, in the input's dtype (float32
    when the caller passed the bits of a dtype NumPy lacks: it rounds them)."""
    shape = stats.problem.layout.output_shape
    dtype = np.float32 if bits is not None else stats.problem.input.dtype

    def shaped(a):
        return a.reshape(shape).astype(dtype, copy=False)

    return TokenStats(shaped(logprob), shaped(entropy), shaped(lse), argmax.reshape(shape))


def _kernel_arguments(stats: Stats, bits):
    """(x as (N, C) values or 16-bit bits, the decode table, the target as int64 (N,),
    N) after raising the IndexError of the first bad target. ``bits`` is (values,
    dtype name) when the caller viewed the input itself (torch's bfloat16)."""
    problem = stats.problem
    layout = problem.layout
    x, name = (
        bits if bits is not None else (problem.input, _validate.dtype_name(problem.input.dtype))
    )
    table = cpu.decode_table(name)
    x2 = cpu.in_native_order(x).reshape(layout.batch, layout.classes)
    if table.size:
        x2 = x2.view(np.uint16)
    target = cpu.kernel_target(problem).reshape(-1)
    bad = out_of_range(target, layout.classes, problem.ignore_index)
    if bad.any():
        first = int(np.argmax(bad))
        raise problem.bad_target(first, int(np.asarray(problem.target).reshape(-1)[first]))
    return x2, table, target, layout.batch


def _gradient_array(x2, table, out):
    dtype = np.float32 if table.size else x2.dtype
    return np.empty(x2.shape, dtype) if out is None else out


def _upstream_rows(upstream: Upstream, rows: int):
    """The upstream gradients as (N, 3) float64 (zeros for None)."""
    result = np.zeros((rows, 3))
    for column, a in enumerate(upstream):
        if a is not None:
            result[:, column] = np.asarray(a, dtype=np.float64).reshape(-1)
    return result


def _run(stats: Stats, x2, table, target, reuse, saved, upstream, *outputs):
    from .._kernels.cpu import _softmax
    from .._kernels.cpu import _stats as kernels  # compiles on first use (cached on disk)

    problem = stats.problem
    kernel = cpu.sized(kernels.stats_rows, x2.size)
    compute_dtype = np.float64 if x2.dtype == np.float64 else np.float32
    softcap = _softmax.kernel_softcap(problem.softcap, compute_dtype)
    kernel(x2, target, problem.ignore_index, table, softcap,
           stats.temperature, reuse, saved, upstream, *outputs)  # fmt: skip


# --- Engines and routes ---------------------------------------------------------------------


def numba_available() -> bool:
    """The numba kernels load (not disabled, nor replaced by the generic path)."""
    return not isinstance(cpu.backend(), _generic.Backend)


@functools.cache
def generic_engine(xp) -> GenericEngine:
    return GenericEngine(xp)


def numpy_engine(stats: Stats):
    """The engine for a call on NumPy arrays."""
    if numba_available() and NumbaEngine.supports(stats):
        return NumbaEngine
    return generic_engine(cpu.generic_numpy().xp)


def compute(stats: Stats, backend) -> TokenStats:
    """The statistics of a validated call, in the input's library."""
    x = stats.problem.input
    if isinstance(x, np.ndarray):
        return numpy_engine(stats).forward(stats)[0]
    if array_api_compat.is_torch_array(x):
        from . import torch as torch_route  # imports torch: the caller handed us torch tensors

        return torch_route.token_stats(stats)
    return generic_engine(backend.xp).forward(stats)[0]


def compute_with_gradient(stats: Stats, backend, upstream: Upstream):
    """(statistics, gradient with respect to the input) of a validated call."""
    x = stats.problem.input
    if isinstance(x, np.ndarray):
        engine = numpy_engine(stats)
        result, grad = engine.forward_backward(stats, upstream)
        return result, np.asarray(grad).reshape(x.shape).astype(x.dtype, copy=False)
    if array_api_compat.is_torch_array(x):
        from . import torch as torch_route

        return torch_route.token_stats_with_gradient(stats, upstream)
    return generic_engine(backend.xp).forward_backward(stats, upstream)


def engine_of(stats: Stats, xp):
    """The engine of a call (or of a block of ``linear_token_stats`` or of the loss from
    hidden states) on arrays of the namespace ``xp``."""
    x = stats.problem.input
    if isinstance(x, np.ndarray):
        return numpy_engine(stats)
    if array_api_compat.is_torch_array(x):
        from . import torch as torch_route  # imports torch: the caller handed us torch tensors

        return torch_route.engine_for(stats)
    return generic_engine(xp)


# --- The statistics beside the loss (return_stats) ------------------------------------------


def loss_and_stats(backend, problem: Problem) -> LossAndStats:
    """``nll_loss(..., return_stats=True)``: the loss of ``problem`` and the statistics of
    its logits (temperature 1, its ``softcap`` and ``ignore_index``).

    Where the loss is a function of the statistics (:func:`from_statistics`) it is
    computed from them, so the logits are read once, by the statistics' engine, and the
    loss is differentiable through them (torch autograd, JAX); otherwise the loss is the
    backend's, and the statistics one more read.
    """
    problem, stats = _loss_statistics(problem)
    if not (from_statistics(problem) and not problem.computes_in_float32):
        # 16-bit logits: the statistics are rounded to their dtype, the loss must not be
        # summed from rounded values
        return LossAndStats(backend.forward(problem), compute(stats, backend))
    result = compute(stats, backend)
    return LossAndStats(loss_of(backend.xp, problem, result), result)


def block_loss_and_stats(backend, problem: Problem, upstream=None, out=None):
    """``(LossAndStats, gradient or None)`` of a block of rows of the loss from hidden
    states (its logits in the compute dtype; ``upstream``: the loss's upstream gradient,
    or None for no gradient; ``out``: where the engine may write the gradient).

    One pass over the block where the loss is a function of the statistics and its
    gradient that of the log-probability alone (no ``z_loss``, whose gradient reads the
    log-sum-exp the pass computes): the statistics' gradient for the upstream gradient
    ``-w[y_n] g_n / W`` of ``logprob_n``. Otherwise the backend's loss and gradient,
    and the statistics by one more pass."""
    problem, stats = _loss_statistics(problem)
    xp, engine = backend.xp, engine_of(stats, backend.xp)
    in_one_pass = from_statistics(problem) and not (upstream is not None and problem.z_loss)
    if not in_one_pass:
        result = engine.forward(stats)[0]  # first: the gradient may be written over the logits
        if upstream is None:
            return LossAndStats(backend.forward(problem), result), None
        loss, grad = backend.forward_backward(problem, upstream, out=out)
        return LossAndStats(loss, result), grad
    if upstream is None:
        result, grad = engine.forward(stats)[0], None
    else:
        valid, element_weight = _element_weights(xp, problem, _compute_dtype(xp, problem))
        scale = xp.astype(upstream, element_weight.dtype)
        if problem.reduction == "mean":
            scale = scale / _mean_denominator(xp, problem, valid, element_weight)
        logprob_upstream = xp.broadcast_to(-(element_weight * scale), tuple(valid.shape))
        result, grad = engine.forward_backward(stats, Upstream(logprob=logprob_upstream), out=out)
    return LossAndStats(loss_of(xp, problem, result), result), grad


@dataclass(frozen=True)
class BlockSolver:
    """The loss from hidden states' blocks with ``return_stats``: a backend's
    ``forward`` and ``forward_backward`` giving ``LossAndStats`` (see
    :func:`block_loss_and_stats`)."""

    backend: Any

    def forward(self, problem: Problem) -> LossAndStats:
        return block_loss_and_stats(self.backend, problem)[0]

    def forward_backward(self, problem: Problem, upstream, out=None):
        return block_loss_and_stats(self.backend, problem, upstream, out)


def _loss_statistics(problem: Problem) -> tuple[Problem, Stats]:
    """The loss's problem without ``return_stats`` (what the backends take) and the
    statistics of its logits, after the checks of the statistics."""
    _validate.check_stats_target(problem.probabilities)
    _validate.check_classes_for_stats(problem.layout.classes)
    problem = problem.replace(return_stats=False)
    logits = logits_problem(
        problem.input, problem.target, problem.layout, problem.ignore_index, problem.softcap,
        problem.check_targets,
    )  # fmt: skip
    return problem, Stats(logits)


def apart(linear: blocks.Linear) -> tuple[blocks.Linear, blocks.Linear]:
    """A call of the loss from hidden states with ``return_stats``, as two: the loss
    alone, and the statistics of its logits (for routes that compute them apart)."""
    problem, stats = _loss_statistics(linear.problem)
    return (
        dataclasses.replace(linear, problem=problem),
        dataclasses.replace(linear, problem=stats.problem, denominator=None),
    )


def from_statistics(problem: Problem) -> bool:
    """Whether the loss of ``problem`` (from logits, class indices) is a function of the
    statistics of its logits: without label smoothing, which reads every class's logit."""
    return problem.label_smoothing == 0.0


def loss_of(xp, problem: Problem, stats: TokenStats):
    r"""The loss of ``problem`` from the statistics of its logits: per element
    :math:`\ell_n = -v_n \operatorname{logprob}_n + z\, v_n \operatorname{lse}_n^2`
    (:math:`v_n = w_{y_n}`, 0 where ignored; :math:`z` the ``z_loss``), reduced as
    ``nll_loss`` reduces (its 'mean' denominator, ``Problem.denominator``), in the input's
    dtype."""
    dtype = _compute_dtype(xp, problem)
    valid, element_weight = _element_weights(xp, problem, dtype)
    zero = xp.zeros((), dtype=dtype, device=array_api_compat.device(element_weight))
    # 0 - v logprob: +0, not -0, where ignored
    losses = zero - element_weight * xp.reshape(xp.astype(stats.logprob, dtype), valid.shape)
    if problem.z_loss:
        lse = xp.reshape(xp.astype(stats.lse, dtype), valid.shape)
        losses = losses + xp.where(valid, problem.z_loss * element_weight * lse * lse, zero)
    if problem.reduction == "none":
        return xp.astype(xp.reshape(losses, problem.loss_shape), problem.input.dtype)
    # kept as (1, ...) until the end: NumPy's 0-d sums and arithmetic give scalars
    total = xp.sum(losses, keepdims=True)
    if problem.reduction == "mean":
        total = total / _mean_denominator(xp, problem, valid, element_weight)
    return xp.astype(xp.reshape(total, ()), problem.input.dtype)


def _compute_dtype(xp, problem: Problem):
    return _generic.compute_dtype(xp, problem.input.dtype)


def _element_weights(xp, problem: Problem, dtype):
    """(valid, v): per target element (the target's shape, (1,) unbatched), whether it
    counts, and its weight ``w[y]`` (1 without weight), 0 where ignored."""
    layout = problem.layout
    target = xp.reshape(problem.target, (1,) if layout.unbatched else layout.output_shape)
    valid = _generic.compare(xp, target, "!=", problem.ignore_index)
    if problem.weight is None:
        return valid, xp.astype(valid, dtype)
    index = xp.where(valid, xp.astype(target, _generic.index_dtype(xp)), 0)
    weight = xp.astype(problem.weight, dtype)
    picked = xp.reshape(xp.take(weight, xp.reshape(index, (-1,))), tuple(valid.shape))
    zero = xp.zeros((), dtype=dtype, device=array_api_compat.device(picked))
    return valid, xp.where(valid, picked, zero)


def _mean_denominator(xp, problem: Problem, valid, element_weight):
    """The 'mean' denominator (``Problem.denominator``) as an array of ``element_weight``'s
    dtype."""
    denominator = problem.denominator(
        lambda: xp.sum(xp.astype(valid, element_weight.dtype)), lambda: xp.sum(element_weight)
    )
    if isinstance(denominator, float):  # the count of probability targets
        denominator = xp.asarray(denominator, device=array_api_compat.device(element_weight))
    return xp.astype(xp.reshape(denominator, ()), element_weight.dtype)


def _upstream(backend, stats: Stats, grads) -> Upstream:
    """The upstream gradients given as ``grad_logprob``, ``grad_entropy``, ``grad_lse``:
    None, or arrays (or scalars) broadcast to the target's shape."""
    xp, problem = backend.xp, stats.problem
    shape = problem.layout.output_shape
    checked = []
    for name, grad in zip(("grad_logprob", "grad_entropy", "grad_lse"), grads, strict=True):
        if grad is None:
            checked.append(None)
            continue
        grad = like_input(backend, grad, problem.input, name)
        _validate.check_grad_output_dtype(grad.dtype, name)
        _validate.check_grad_output_shape(tuple(grad.shape), shape, name)
        checked.append(xp.broadcast_to(grad, shape))
    return Upstream(*checked)


# --- The public functions -------------------------------------------------------------------


def _build(input, target, temperature, softcap, ignore_index):
    input = as_array(input, "input")
    backend = backend_for(input)
    _validate.check_input(input)
    problem = stats_problem(backend, input, target, ignore_index, softcap)
    return backend, Stats(problem, _validate.check_temperature(temperature))


def token_stats(
    input: Any,
    target: Any,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> TokenStats:
    r"""Per-token statistics of logits: the target's log-probability, the entropy, the
    log-sum-exp and the argmax, from one read of each row.

    With :math:`z = \operatorname{cap}(x) / T` (:math:`\operatorname{cap}(x) = c \tanh(x
    / c)` with ``softcap`` :math:`c`, else :math:`x`; :math:`T` the ``temperature``) and
    :math:`p = \operatorname{softmax}(z)` over the class axis, for each target element
    :math:`n` of class :math:`y_n`:

    .. math::

        \operatorname{logprob}_n &= \log p_{n, y_n} \quad (0 \text{ where } y_n =
            \text{ignore\_index}), \\
        \operatorname{entropy}_n &= -\textstyle\sum_c p_{n, c} \log p_{n, c}
            = \operatorname{lse}_n - \sum_c p_{n, c} z_{n, c}, \\
        \operatorname{lse}_n &= \log \textstyle\sum_c e^{z_{n, c}}, \qquad
        \operatorname{argmax}_n = \arg\max_c z_{n, c}.

    ``entropy``, ``lse`` and ``argmax`` are every element's, ignored ones too; a class
    with :math:`z = -\infty` adds nothing to the entropy (:math:`0 \log 0 = 0`); the
    argmax is the first index of the maximum, of a NaN where the row holds one (as
    torch's). Differentiable (torch autograd, ``jax.grad`` also under ``jit``) through
    ``logprob``, ``entropy`` and ``lse``:

    .. math::

        \frac{\partial \operatorname{logprob}_n}{\partial z_{n, c}} = [c = y_n] - p_{n, c},
        \quad
        \frac{\partial \operatorname{entropy}_n}{\partial z_{n, c}}
            = -p_{n, c} \big(z_{n, c} - \textstyle\sum_k p_{n, k} z_{n, k}\big), \quad
        \frac{\partial \operatorname{lse}_n}{\partial z_{n, c}} = p_{n, c},

    times :math:`(1 - \tanh^2(x / c)) / T` for the input.

    Parameters
    ----------
    input : array
        Logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)`` (classes on axis 1, as in
        :func:`nll_loss`); float16, bfloat16, float32 or float64 (16-bit ones computed in
        float32, rounded once). NumPy, torch, JAX or any array-API library.
    target : array
        Class indices, the input's shape without the class axis, any integer dtype; each
        in ``[0, C)`` or ``ignore_index``.
    temperature : float, default 1.0
        :math:`T > 0`, finite: the logits are divided by it (the sampling temperature).
    softcap : float, optional
        :math:`c > 0`: the logits are capped to :math:`c \tanh(x / c)` first.
    ignore_index : int, default -100
        Target value whose ``logprob`` is 0 (and gets no gradient).

    Returns
    -------
    TokenStats
        ``(logprob, entropy, lse, argmax)``, each of the target's shape in the input's
        library; the first three in the input's dtype, ``argmax`` int64.

    Raises
    ------
    IndexError
        A target is neither in ``[0, C)`` nor ``ignore_index`` (the first one is named).
        Under ``jax.jit`` (values hidden) its ``logprob`` is NaN instead.
    ValueError
        ``temperature`` or ``softcap`` is not a finite number > 0; shapes do not fit; no
        class.
    TypeError
        A non-floating input, a non-integer target.

    See Also
    --------
    linear_token_stats : the same from hidden states, without forming the logits.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import token_stats
    >>> z = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    >>> s = token_stats(z, np.array([0, -100]))
    >>> np.round(s.logprob, 6)  # log_softmax(z)[0, 0]; 0 for the ignored element
    array([-0.239545,  0.      ], dtype=float32)
    >>> np.round(s.entropy, 6)  # the second row is uniform: log 3
    array([0.665573, 1.098612], dtype=float32)
    >>> s.argmax  # the first index on ties
    array([0, 0])
    >>> np.round(token_stats(z, np.array([0, 1]), temperature=2.0).lse, 6)
    array([1.551445, 1.098612], dtype=float32)
    """
    backend, stats = _build(input, target, temperature, softcap, ignore_index)
    return compute(stats, backend)


def token_stats_and_grad(
    input: Any,
    target: Any,
    *,
    grad_logprob: Any = None,
    grad_entropy: Any = None,
    grad_lse: Any = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[TokenStats, Any]:
    r"""The statistics of :func:`token_stats` and the gradient of
    :math:`\sum_n (a_n \operatorname{logprob}_n + b_n \operatorname{entropy}_n + g_n
    \operatorname{lse}_n)` with respect to ``input``, from one visit of each row.

    For libraries without autodiff (NumPy): with :math:`a, b, g` the upstream gradients,

    .. math::

        \frac{\partial}{\partial z_{n, c}} = a_n [c = y_n]
            - p_{n, c} \big(a_n - g_n + b_n (z_{n, c} - \textstyle\sum_k p_{n, k}
            z_{n, k})\big),

    (:math:`a_n = 0` where ignored), times :math:`(1 - \tanh^2(x / c)) / T`.

    Parameters
    ----------
    input, target, temperature, softcap, ignore_index
        As in :func:`token_stats`.
    grad_logprob, grad_entropy, grad_lse : array or float, optional
        The upstream gradients: the target's shape, or scalars; None for zero.

    Returns
    -------
    (TokenStats, grad)
        The statistics, and the gradient of the input's shape, dtype and library.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import token_stats_and_grad
    >>> z = np.array([[2.0, 0.0, 0.0]], dtype=np.float32)
    >>> s, grad = token_stats_and_grad(z, np.array([0]), grad_logprob=1.0)
    >>> np.round(grad, 6)  # onehot - softmax(z)
    array([[ 0.213014, -0.106507, -0.106507]], dtype=float32)
    """
    backend, stats = _build(input, target, temperature, softcap, ignore_index)
    upstream = _upstream(backend, stats, (grad_logprob, grad_entropy, grad_lse))
    return compute_with_gradient(stats, backend, upstream)


# --- From hidden states ---------------------------------------------------------------------


def linear_stats(input, linear_weight, target, linear_bias, temperature, softcap,
                 ignore_index, chunk_rows):  # fmt: skip
    """Validate a call of ``linear_token_stats``: its :class:`~nllloss._hidden_states.blocks.Linear`
    (whose problem is that of the logits) and temperature."""
    input = as_array(input, "input")
    backend = backend_for(input)
    linear_weight = like_input(backend, linear_weight, input, "linear_weight")
    if linear_bias is not None:
        linear_bias = like_input(backend, linear_bias, input, "linear_bias")
    logits_shape = _validate.check_linear(input, linear_weight, linear_bias)
    chunk_rows = _validate.check_chunk_rows(chunk_rows)
    temperature = _validate.check_temperature(temperature)
    problem = stats_problem(backend, input, target, ignore_index, softcap, logits_shape)
    blocks.check_targets(backend, problem)
    linear = blocks.assemble(backend, problem, input, linear_weight, linear_bias, chunk_rows,
                              None, algebra_for(input))  # fmt: skip
    return linear, temperature


def run_blocks(linear: blocks.Linear, temperature: float, upstream: Upstream | None = None,
               wants=(True, True, True)):  # fmt: skip
    """(TokenStats, d_input, d_linear_weight, d_linear_bias): the statistics of every block
    of rows and, with ``upstream``, the gradients asked for in ``wants`` (None for the
    others); each block by its engine (:func:`engine_of`)."""
    algebra = linear.algebra
    buffer = algebra.buffer(linear)
    grads = None if upstream is None else algebra.gradients(linear, wants, (None,) * 3)
    parts = []
    for rows in linear.blocks():
        hidden = linear.hidden[rows, ...]
        logits = algebra.logits(linear, hidden, buffer)
        block = Stats(linear.block_problem(logits, linear.block_arrays(rows)), temperature)
        engine = engine_of(block, linear.xp)
        if grads is None:
            parts.append(engine.forward(block)[0])
            continue
        block_upstream = Upstream(*(None if a is None else _rows_of(linear, a, rows)
                                    for a in upstream))  # fmt: skip
        # the kernels write the gradient over the block's logits
        result, grad = engine.forward_backward(block, block_upstream, out=logits)
        parts.append(result)
        grads = algebra.add(linear, grads, rows, linear.xp.reshape(grad, logits.shape), hidden)
    result = _joined(linear, parts)
    if grads is None:
        return result, None, None, None
    return (result, *algebra.finish(linear, grads))


def _rows_of(linear: blocks.Linear, a, rows: slice):
    return a if linear.problem.layout.unbatched else a[rows, ...]


def joined(linear: blocks.Linear, parts: list) -> TokenStats:
    """The blocks' statistics (in the compute dtype) as one, in the input's dtype."""
    return in_input_dtype(linear, _joined(linear, parts))


def _joined(linear: blocks.Linear, parts: list) -> TokenStats:
    """The blocks' statistics, concatenated along the rows."""
    if len(parts) == 1:
        return parts[0]
    xp = linear.xp
    return TokenStats(*(xp.concat(list(column), axis=0) for column in zip(*parts, strict=True)))


def linear_token_stats(
    input: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> TokenStats:
    r"""The per-token statistics of a linear layer's logits, without forming the logits.

    Equal to ``token_stats(input @ linear_weight.T + linear_bias, target, ...)``: the
    logits are made ``chunk_rows`` rows at a time (as :func:`linear_cross_entropy` makes
    them), and each block goes through the statistics of its rows; nothing of size
    N x C exists beyond one block. Differentiable through ``logprob``, ``entropy`` and
    ``lse`` with respect to ``input``, ``linear_weight`` and ``linear_bias`` (torch
    autograd; ``jax.grad`` under ``jit`` through a ``jax.custom_vjp``): the backward makes
    the blocks again (a fourth matrix product), since the gradient depends on the
    upstream gradients row by row.

    Parameters
    ----------
    input : array
        Hidden states ``(in_features,)`` or ``(N, in_features)``; float16, bfloat16
        (computed in float32), float32 or float64.
    linear_weight : array
        ``(C, in_features)``, the input's dtype.
    target : array
        Class indices: ``()`` for unbatched input, else ``(N,)``.
    linear_bias : array, optional
        ``(C,)``: added to the logits.
    temperature, softcap, ignore_index
        As in :func:`token_stats`.
    chunk_rows : int, optional
        Rows of logits made at a time; default as :func:`linear_cross_entropy`'s.

    Returns
    -------
    TokenStats
        As :func:`token_stats` returns it, for the logits ``input @ linear_weight.T + b``.

    Raises
    ------
    As :func:`token_stats` and :func:`linear_cross_entropy`.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import linear_token_stats
    >>> h = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    >>> W = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    >>> s = linear_token_stats(h, W, np.array([0, 1]), temperature=0.5, chunk_rows=1)
    >>> np.round(s.logprob, 6)  # log_softmax(h @ W.T / 0.5)[n, t_n]
    array([-0.239545, -0.035976], dtype=float32)
    >>> s.argmax
    array([0, 1])
    """
    linear, temperature = linear_stats(input, linear_weight, target, linear_bias, temperature,
                                       softcap, ignore_index, chunk_rows)  # fmt: skip
    if array_api_compat.is_torch_array(linear.input):
        from . import torch as torch_route  # imports torch: the caller handed us torch tensors

        return torch_route.linear_token_stats(linear, temperature)
    if array_api_compat.is_jax_array(linear.input):
        from . import jax as jax_route  # imports jax: the caller handed us JAX arrays

        return jax_route.linear_token_stats(linear, temperature)
    return in_input_dtype(linear, run_blocks(linear, temperature)[0])


def in_input_dtype(linear: blocks.Linear, result: TokenStats) -> TokenStats:
    """16-bit hidden states: the statistics (computed in float32) in their dtype."""
    xp, dtype = linear.xp, linear.input.dtype
    return result._replace(**{name: xp.astype(getattr(result, name), dtype)
                              for name in ("logprob", "entropy", "lse")})  # fmt: skip


def linear_token_stats_and_grad(
    input: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    grad_logprob: Any = None,
    grad_entropy: Any = None,
    grad_lse: Any = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> tuple[TokenStats, Any, Any, Any]:
    r"""The statistics of :func:`linear_token_stats` and the gradients of
    :math:`\sum_n (a_n \operatorname{logprob}_n + b_n \operatorname{entropy}_n + g_n
    \operatorname{lse}_n)`, block by block of rows (three matrix products and one pass
    over each block; see :func:`token_stats_and_grad` for the gradient of the logits
    :math:`G`, then :math:`G W`, :math:`G^\top x`, :math:`\sum_n G_n`).

    Parameters
    ----------
    input, linear_weight, target, linear_bias, temperature, softcap, ignore_index, chunk_rows
        As in :func:`linear_token_stats`.
    grad_logprob, grad_entropy, grad_lse : array or float, optional
        As in :func:`token_stats_and_grad`.

    Returns
    -------
    (TokenStats, d_input, d_linear_weight, d_linear_bias)
        ``d_linear_bias`` is None without a bias.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import linear_token_stats_and_grad
    >>> h = np.array([[1.0, 0.0]], dtype=np.float32)
    >>> W = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> s, d_h, d_W, d_b = linear_token_stats_and_grad(h, W, np.array([0]), grad_logprob=1.0)
    >>> np.round(d_W, 6)  # (onehot - softmax(h @ W.T)).T @ h
    array([[ 0.268941,  0.      ],
           [-0.268941,  0.      ]], dtype=float32)
    """
    linear, temperature = linear_stats(input, linear_weight, target, linear_bias, temperature,
                                       softcap, ignore_index, chunk_rows)  # fmt: skip
    backend = backend_for(linear.input)
    stats = Stats(linear.problem, temperature)
    upstream = _upstream(backend, stats, (grad_logprob, grad_entropy, grad_lse))
    wants = (True, True, linear.bias is not None)
    if array_api_compat.is_torch_array(linear.input):
        from . import torch as torch_route

        return torch_route.linear_token_stats_and_grad(linear, temperature, upstream, wants)
    result, *grads = run_blocks(linear, temperature, upstream, wants)
    return (in_input_dtype(linear, result), *grads)

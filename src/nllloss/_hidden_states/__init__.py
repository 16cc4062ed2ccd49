r"""The loss from hidden states, ``cross_entropy(linear(input, W, b), target)``: the public
functions, which validate a call once and hand it to the blocks of rows
(``nllloss._hidden_states.blocks``) with the input's library's matrix products (NumPy's and
the array API's there, torch's in ``.torch``; JAX's differentiation in ``.jax``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

import array_api_compat
import numpy as np

from .. import _options, _validate
from .._builder import build as build_problem
from .._loss import Array, Reduction
from .._routes import as_array, backend_for, like_input
from . import blocks

if TYPE_CHECKING:  # _token_stats imports this package
    from .._token_stats import LossAndStats


def build(
    input, linear_weight, target, linear_bias, weight, reduction, ignore_index, options: dict,
    chunk_rows,
) -> blocks.Linear:  # fmt: skip
    """Validate every argument once (``_validate``, and ``_builder.build`` for the loss's
    own, with ``options`` from logits); the
    :class:`~nllloss._hidden_states.blocks.Linear` of the call."""
    input = as_array(input, "input")
    backend = backend_for(input)
    # Under autocast the loss computes in float32 (see nll_loss): its matrix products too.
    input = backend.autocast(input)
    linear_weight = backend.autocast(like_input(backend, linear_weight, input, "linear_weight"))
    if linear_bias is not None:
        linear_bias = backend.autocast(like_input(backend, linear_bias, input, "linear_bias"))
    logits_shape = _validate.check_linear(input, linear_weight, linear_bias)
    chunk_rows = _validate.check_chunk_rows(chunk_rows)
    _, problem = build_problem(
        input, target, weight, -100 if ignore_index is None else ignore_index, reduction,
        {**options, "from_logits": True}, logits_shape=logits_shape,
    )  # fmt: skip
    blocks.check_targets(backend, problem)
    return blocks.assemble(
        backend, problem, input, linear_weight, linear_bias, chunk_rows,
        blocks.denominator_of(backend, problem), algebra_for(input),
    )  # fmt: skip


def algebra_for(input):
    """The matrix products of the blocks for the input's library."""
    if isinstance(input, np.ndarray):
        return blocks.NUMPY_ALGEBRA
    if array_api_compat.is_torch_array(input):
        from . import torch as torch_route  # imports torch: the caller handed us torch tensors

        return torch_route.ALGEBRA
    return blocks.FunctionalAlgebra()


# --- The public functions ----------------------------------------------------------------


@overload
def linear_cross_entropy(
    input: Array,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = ...,
    weight: Any = ...,
    reduction: Reduction = ...,
    ignore_index: int | None = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    chunk_rows: int | None = ...,
    return_stats: Literal[False] = ...,
) -> Array: ...


@overload
def linear_cross_entropy(
    input: Array,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = ...,
    weight: Any = ...,
    reduction: Reduction = ...,
    ignore_index: int | None = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    chunk_rows: int | None = ...,
    return_stats: Literal[True],
) -> LossAndStats: ...


@overload
def linear_cross_entropy(
    input: Array,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = ...,
    weight: Any = ...,
    reduction: Reduction = ...,
    ignore_index: int | None = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    chunk_rows: int | None = ...,
    return_stats: bool = ...,
) -> Array | LossAndStats: ...


@_options.keywords
def linear_cross_entropy(
    input: Array,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    weight: Any = None,
    reduction: Reduction = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    total_weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    return_stats: bool = False,
) -> Array | LossAndStats:
    r"""The cross-entropy of a linear layer's logits, without forming the logits.

    Equal to ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)``, as
    torch 2.13's ``torch.nn.functional.linear_cross_entropy``: with logits

    .. math:: z_{n, c} = \sum_k x_{n, k} W_{c, k} + b_c ,

    the loss of :func:`nll_loss` with ``from_logits=True``,
    :math:`\ell_n = -w_{y_n} \big(z_{n, y_n} - \log \sum_c e^{z_{n, c}}\big)`, reduced by
    ``reduction`` (``'mean'`` divides by :math:`\sum_{n: y_n \ne ii} w_{y_n}`). The logits
    are made ``chunk_rows`` rows at a time and each block goes through the fused loss of
    its rows: the memory beyond the arguments and results is one block of logits, never
    N x C. Differentiable with respect to ``input``, ``linear_weight`` and
    ``linear_bias`` (torch autograd; ``jax.grad`` under ``jit`` through a
    ``jax.custom_vjp`` that recomputes the blocks).

    Parameters
    ----------
    input : array
        Hidden states, ``(in_features,)`` or ``(N, in_features)``; float16, bfloat16,
        float32 or float64 (16-bit ones compute in float32, rounded once).
    linear_weight : array
        ``(C, in_features)``, or ``(C, d1, ..., dK, in_features)`` for a K-dimensional
        loss (logits ``(N, C, d1, ..., dK)``; needs batched input). The input's dtype.
    target : array
        Class indices of the logits' shape without the class axis (``()``, ``(N,)``,
        ``(N, d1, ..., dK)``), or class probabilities of the logits' shape; as in
        :func:`nll_loss`.
    linear_bias : array, optional
        ``(C, d1, ..., dK)``: added to the logits.
    weight, reduction, label_smoothing, total_weight, z_loss, softcap
        As in :func:`nll_loss` (``z_loss`` and ``softcap`` act on the logits).
    ignore_index : int or None, default -100
        As in :func:`nll_loss`; None means -100, as in torch's ``linear_cross_entropy``.
    chunk_rows : int, optional
        Rows of logits made at a time; default: 4% of the rows, within 128 and 256.
        Results agree to rounding whatever it is.
    return_stats : bool, default False
        Class indices only: also return the per-token statistics of the logits (those of
        :func:`linear_token_stats` at temperature 1, with this call's ``softcap`` and
        ``ignore_index``), as ``LossAndStats(loss, stats)``, e.g. to log entropy and token
        accuracy (``stats.argmax == target``) beside the loss. Each block's statistics
        come from the pass over the block that computes its loss and gradient (NumPy,
        torch and the array-API libraries; without label smoothing and, where a gradient
        is computed, without ``z_loss``; otherwise one more pass over each block). JAX:
        the statistics are :func:`linear_token_stats`'s, computed apart. The statistics
        carry no gradient (the loss does, as without them); for gradients through
        ``logprob`` or ``entropy`` use :func:`linear_token_stats`.

    Returns
    -------
    array
        The loss, as :func:`nll_loss` returns it, in the input's library and dtype.
    LossAndStats
        With ``return_stats``: ``(loss, stats)``, ``stats`` a :class:`TokenStats` of the
        target's shape in the input's dtype (``argmax`` int64).

    Raises
    ------
    ValueError, TypeError, IndexError
        As :func:`nll_loss`, and for shapes or dtypes of ``input``, ``linear_weight`` and
        ``linear_bias`` that do not fit (the argument is named).

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import linear_cross_entropy
    >>> h = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    >>> W = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    >>> linear_cross_entropy(h, W, np.array([0, 1]))  # cross_entropy(h @ W.T, t)
    array(0.39549476, dtype=float32)
    >>> linear_cross_entropy(h, W, np.array([0, 1]), reduction="none", chunk_rows=1)
    array([0.55144465, 0.23954484], dtype=float32)
    >>> loss, stats = linear_cross_entropy(h, W, np.array([0, 1]), return_stats=True)
    >>> loss
    array(0.39549476, dtype=float32)
    >>> stats.argmax, np.round(stats.entropy, 4)
    (array([0, 1]), array([0.9753, 0.6656], dtype=float32))
    """
    options = _options.given(locals())
    reduction = _validate.check_reduction(reduction, stacklevel=2)
    linear = build(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index, options,
        chunk_rows,
    )  # fmt: skip
    if array_api_compat.is_torch_array(linear.input):
        from . import torch as torch_route  # imports torch: the caller handed us torch tensors

        return torch_route.loss(linear)
    if array_api_compat.is_jax_array(linear.input):
        from . import jax as jax_route  # imports jax: the caller handed us JAX arrays

        return jax_route.loss(linear)
    return blocks.run(linear)[0]


@_options.keywords
def linear_cross_entropy_and_grad(
    input: Array,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    weight: Any = None,
    reduction: Reduction = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    total_weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    grad_output: Any = 1.0,
    out: tuple | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    r"""The loss of :func:`linear_cross_entropy` and its gradients, from one pass.

    With :math:`G = \partial L / \partial z` the gradient of the loss with respect to
    the logits (that of :func:`nll_loss_backward` with ``from_logits=True``, for the
    upstream gradient ``grad_output``), the gradients are

    .. math:: \frac{\partial L}{\partial x} = G W, \quad
              \frac{\partial L}{\partial W} = G^\top x, \quad
              \frac{\partial L}{\partial b} = \textstyle\sum_n G_n,

    computed block by block of rows with the logits: three matrix products and one pass
    over each block, nothing of size N x C.

    Parameters
    ----------
    input, linear_weight, target, linear_bias, weight, reduction, ignore_index
        As in :func:`linear_cross_entropy`.
    label_smoothing, total_weight, z_loss, softcap, chunk_rows
        As in :func:`linear_cross_entropy`.
    grad_output : array or float, default 1.0
        The upstream gradient of the loss (a scalar, or the loss's shape for ``'none'``).
    out : tuple of three arrays or None, optional
        NumPy only: ``(d_input, d_linear_weight, d_linear_bias)``, each None or a
        writeable C-contiguous array of its argument's shape and dtype, to write the
        gradient into (``d_input`` may be ``input`` itself, read before it is written;
        any other overlap between them or with an argument is a ``ValueError``).

    Returns
    -------
    (loss, d_input, d_linear_weight, d_linear_bias)
        In the input's library and dtype, the gradients of their arguments' shapes;
        ``d_linear_bias`` is None without a bias.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import linear_cross_entropy_and_grad
    >>> h = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    >>> W = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    >>> loss, d_h, d_W, d_b = linear_cross_entropy_and_grad(h, W, np.array([0, 1]))
    >>> d_h.shape, d_W.shape, d_b
    ((2, 2), (3, 2), None)
    >>> np.round(d_W, 4)
    array([[-0.2119,  0.1065],
           [ 0.106 , -0.213 ],
           [ 0.106 ,  0.1065]], dtype=float32)
    """
    options = _options.given(locals())
    reduction = _validate.check_reduction(reduction, stacklevel=2)
    linear = build(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index, options,
        chunk_rows,
    )  # fmt: skip
    xp, problem = linear.xp, linear.problem
    upstream = like_input(linear.backend, grad_output, linear.input, "grad_output")
    _validate.check_grad_output_dtype(upstream.dtype)
    _validate.check_grad_output_shape(upstream.shape, problem.loss_shape)
    upstream = xp.broadcast_to(upstream, problem.loss_shape) if problem.elementwise else upstream
    if out is not None:
        outs = _validate.check_linear_out(
            out, (linear.input, linear.linear_weight, linear.linear_bias)
        )
        reads = [
            ("input", input), ("linear_weight", linear_weight), ("target", target),
            ("linear_bias", linear_bias), ("weight", weight), ("total_weight", total_weight),
            ("grad_output", grad_output),  # as given
            ("input", linear.input), ("linear_weight", linear.linear_weight),
            ("linear_bias", linear.linear_bias), ("target", problem.target),
            ("weight", problem.weight), ("total_weight", problem.total_weight),
            ("grad_output", upstream),  # as used
        ]  # fmt: skip
        # d_input may be the input itself: each block of rows is read before its gradient
        # is written; the weights are read until the last block
        _validate.check_out_buffers(outs, reads, in_place={("out's d_input", "input")})
    else:
        out = (None, None, None)
    wants = (True, True, linear.bias is not None)
    if array_api_compat.is_torch_array(linear.input):
        import torch  # already imported: the caller handed us torch tensors

        with torch.no_grad():
            loss, *grads = blocks.run(linear, upstream, wants, out)
    else:
        loss, *grads = blocks.run(linear, upstream, wants, out)
    for i, (grad, given) in enumerate(zip(grads, out, strict=True)):
        if given is not None:
            if not np.may_share_memory(grad, given):  # computed elsewhere (16-bit)
                given[...] = grad
            grads[i] = given
    return (loss, *grads)

"""The public functions: ``nll_loss``, ``nll_loss_backward`` and the ``NLLLoss`` object."""

from __future__ import annotations

from typing import Any

from . import _validate
from ._dispatch import as_array, engine_for, like_input
from ._dispatch import fast_paths as _dispatch_fast_paths

# Deprecation warnings point at the line that called the public function: one frame up.
_CALLER = 2


def _prepare(input, target, weight, ignore_index):
    input = as_array(input)
    engine = engine_for(input)
    target = like_input(engine, target, input, "target")
    _validate.check_input(input)
    layout = _validate.check_target(target, input.shape)
    if weight is not None:
        # A sequence has no dtype of its own: read it in the input's.
        weight = like_input(engine, weight, input, "weight", sequence_dtype=input.dtype)
        _validate.check_weight(weight, layout.classes)
    return engine, input, target, weight, _validate.check_ignore_index(ignore_index), layout


def nll_loss(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
) -> Any:
    r"""The negative log-likelihood loss, exactly as ``torch.nn.functional.nll_loss``.

    For each target element :math:`n` with class :math:`y_n \ne` ``ignore_index``,

    .. math:: \ell_n = -w_{y_n} \, x_{n, y_n},

    and :math:`\ell_n = 0` where :math:`y_n =` ``ignore_index``. Then ``'none'`` returns
    :math:`\ell` with the target's shape, ``'sum'`` returns :math:`\sum_n \ell_n`, and
    ``'mean'`` returns :math:`\sum_n \ell_n / \sum_{n: y_n \ne ii} w_{y_n}` (the weighted
    mean; without ``weight`` the count of non-ignored elements).

    Parameters
    ----------
    input : array
        Log-probabilities of shape ``(C,)`` (unbatched), ``(N, C)`` or
        ``(N, C, d1, ..., dK)``; float16, bfloat16, float32 or float64.
    target : array
        Class indices of shape ``()`` (or ``(1,)``) for unbatched input, ``(N,)`` or
        ``(N, d1, ..., dK)``; any integer dtype. Each value is in ``[0, C)`` or equals
        ``ignore_index``.
    weight : array, optional
        Rescaling weight per class, 1-D of length C, any float dtype (used in the
        input's dtype). Zero and negative weights are allowed. Default: all ones.
    size_average, reduce : bool, optional
        Deprecated, as in torch: when either is given, ``reduction`` is ignored and
        derived from them (None counts as True; ``reduce=False`` gives ``'none'``,
        else ``size_average`` chooses ``'mean'`` or ``'sum'``), with a ``UserWarning``.
    ignore_index : int, default -100
        Target value that contributes neither loss, weight nor gradient. Any integer,
        inside the class range or not.
    reduction : {'mean', 'sum', 'none'}, default 'mean'

    Returns
    -------
    array
        In the input's library and dtype: the target's shape for ``'none'``, 0-d
        otherwise. An unbatched input always gives a 0-d result.

    Raises
    ------
    IndexError
        A target value is neither in ``[0, C)`` nor ``ignore_index`` (the first one is
        named, with its position).
    ValueError
        Shapes do not fit, ``reduction`` is unknown, ``ignore_index`` overflows int64.
    TypeError
        A non-floating input or weight, a non-integer target or ``ignore_index``.

    Notes
    -----
    Edge cases, as torch: ``'mean'`` is NaN when the total weight is 0 (every element
    ignored, an empty batch, zero weights) and ±inf when non-zero weights sum to 0;
    ``'sum'`` of nothing is 0. Nothing from an ignored element reaches the result, not
    even a NaN or inf in its row. float32 and float64 results are bit-identical to
    torch 2.13 on CPU (same summation order); float16 and bfloat16 accumulate in float32
    and round once, where torch rounds every partial sum.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import nll_loss
    >>> x = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], dtype=np.float32))
    >>> t = np.array([0, 2])
    >>> nll_loss(x, t)
    array(0.45814535, dtype=float32)
    >>> nll_loss(x, t, reduction="none")
    array([0.6931472 , 0.22314353], dtype=float32)
    >>> nll_loss(x, np.array([0, -100]), weight=np.array([2.0, 1.0, 1.0]), reduction="sum")
    array(1.3862944, dtype=float32)
    """
    reduction = _validate.resolve_reduction(size_average, reduce, reduction, stacklevel=_CALLER)
    fast = _FAST_PATHS.get(type(input))
    if fast is not None:
        result = fast(input, target, weight, ignore_index, reduction)
        if result is not None:
            return result
    engine, input, target, weight, ignore_index, layout = _prepare(
        input, target, weight, ignore_index
    )
    return engine.implementation.forward(
        engine, input, target, weight, ignore_index, reduction, layout
    )


# Per array type, an optional shortcut for the commonest calls: it returns the result, or
# None to take the full path (which raises nllloss's errors). Registered by engines.
_FAST_PATHS = _dispatch_fast_paths()


def nll_loss_backward(
    grad_output: Any,
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Any:
    r"""The gradient of :func:`nll_loss` with respect to ``input``.

    Zero everywhere except at ``(n, y_n)`` for each non-ignored target element, where it is

    * ``'none'``: :math:`-w_{y_n} g_n` (``g`` has the target's shape, or is a scalar);
    * ``'sum'``: :math:`-w_{y_n} g`;
    * ``'mean'``: :math:`-w_{y_n} g / W` with :math:`W` the total weight of ``nll_loss``.

    Parameters
    ----------
    grad_output : array or float
        The upstream gradient: an array of the loss's shape, or a scalar.
    input, target, weight, ignore_index, reduction
        As in :func:`nll_loss` (the legacy ``size_average``/``reduce`` are not taken).

    Returns
    -------
    array
        Same shape, dtype and library as ``input``; bit-identical to what torch's
        autograd gives for float32 and float64.

    Notes
    -----
    As torch: when every element is ignored the 'mean' loss is NaN but the gradient is
    all zeros; when the weights hit are all zero, the gradient is NaN at the targets.
    The input's values are never read, only its shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import nll_loss_backward
    >>> x = np.zeros((2, 3), dtype=np.float32)
    >>> nll_loss_backward(1.0, x, np.array([0, 2]))
    array([[-0.5,  0. ,  0. ],
           [ 0. ,  0. , -0.5]], dtype=float32)
    >>> nll_loss_backward(np.array([1.0, 3.0]), x, np.array([1, -100]), reduction="none")
    array([[ 0., -1.,  0.],
           [ 0.,  0.,  0.]], dtype=float32)
    """
    reduction = _validate.check_reduction(reduction, stacklevel=_CALLER)
    engine, input, target, weight, ignore_index, layout = _prepare(
        input, target, weight, ignore_index
    )
    grad_output = like_input(engine, grad_output, input, "grad_output")
    _validate.check_grad_output_dtype(grad_output.dtype)
    loss_shape = layout.output_shape if reduction == "none" and not layout.unbatched else ()
    _validate.check_grad_output_shape(grad_output.shape, loss_shape)
    return engine.implementation.backward(
        engine, grad_output, input, target, weight, ignore_index, reduction, layout
    )


class NLLLoss:
    r"""The negative log-likelihood loss as a callable object, like ``torch.nn.NLLLoss``.

    ``NLLLoss(...)(input, target)`` equals ``nll_loss(input, target, ...)``; see
    :func:`nll_loss` for the formula, shapes and edge cases.

    Parameters
    ----------
    weight : array, optional
        Rescaling weight per class (1-D, length C).
    size_average, reduce : bool, optional
        Deprecated; resolved to ``reduction`` at construction, with a ``UserWarning``.
    ignore_index : int, default -100
    reduction : {'mean', 'sum', 'none'}, default 'mean'
        Checked when the loss is called, as in torch.

    Attributes
    ----------
    weight, ignore_index, reduction
        As given (``reduction`` after resolving the legacy arguments).

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import NLLLoss
    >>> loss = NLLLoss(reduction="sum")
    >>> loss
    NLLLoss(reduction='sum')
    >>> loss(np.array([[-1.0, -2.0], [-0.5, -3.0]]), np.array([1, 0]))
    array(2.5)
    """

    def __init__(
        self,
        weight: Any = None,
        size_average: Any = None,
        ignore_index: int = -100,
        reduce: Any = None,
        reduction: str = "mean",
    ) -> None:
        if size_average is not None or reduce is not None:
            reduction = _validate.resolve_reduction(
                size_average, reduce, reduction, stacklevel=_CALLER
            )
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction

    def __call__(self, input: Any, target: Any) -> Any:
        """The loss of ``input`` (log-probabilities) against ``target`` (class indices)."""
        return nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    forward = __call__

    def __repr__(self) -> str:
        options = []
        if self.weight is not None:
            options.append(f"weight=<{getattr(self.weight, 'shape', '?')}>")
        if self.ignore_index != -100:
            options.append(f"ignore_index={self.ignore_index!r}")
        options.append(f"reduction={self.reduction!r}")
        return f"NLLLoss({', '.join(options)})"

"""Paddle glue: ``nll_loss`` and ``NLLLoss`` with Paddle's signature and Paddle's semantics.

Importing this module imports paddle; ``import nllloss`` alone does not (the attribute
``nllloss.paddle`` loads it on first use). Paddle tensors have no array-API namespace, so
they are computed by the NumPy engine on their values, with gradients through
``paddle.autograd.PyLayer``. Paddle's own CPU kernel is never called: it corrupts memory
with ignored labels under 'mean' and 'sum' (paddle 3.3.1), which this module handles.

Where Paddle's documented behaviour differs from PyTorch's, this module follows Paddle:

* 'mean' divides only when the total weight is non-zero: every label ignored, an empty
  batch or zero weights give 0, and weights that sum to 0 give the sum;
* a label may carry a trailing axis of size 1 in place of the class axis (``(N, 1)`` for an
  ``(N, C)`` input); a label of any other shape is refused (Paddle silently mis-pairs an
  ``(N, k)`` label with k > 1);
* there is no unbatched ``(C,)`` input and no ``size_average``/``reduce``;
* ``reduction`` is checked when the layer is built.

Errors stay nllloss's (``IndexError`` naming the bad label, its position and the range).
The gradient is the same as PyTorch's and Paddle's (all-ignored 'mean': zeros).
"""

from __future__ import annotations

import numpy as np

try:
    import paddle
except ModuleNotFoundError as error:
    if error.name != "paddle":  # paddle is there, but something it imports is not
        raise
    raise ImportError("nllloss.paddle needs PaddlePaddle (pip install paddlepaddle)") from None

from . import _validate
from ._loss import nll_loss as _nll_loss
from ._loss import nll_loss_backward as _nll_loss_backward
from ._loss import total_weight as _total_weight

__all__ = ["NLLLoss", "nll_loss"]


def _numpy_label(input_shape: tuple[int, ...], label: np.ndarray) -> np.ndarray:
    """Paddle's label forms: the target's shape, or the input's with a class axis of 1."""
    _validate.check_paddle_input_rank(input_shape)
    if label.ndim == len(input_shape) and label.shape[1] == 1:
        label = label.reshape(label.shape[:1] + label.shape[2:])
    return label


class _NLLLoss(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, input, label, weight, ignore_index, reduction):
        x = input.numpy()
        t = _numpy_label(tuple(x.shape), label.numpy())
        w = None if weight is None else weight.numpy()
        ctx.arguments = (x.shape, x.dtype, t, w, ignore_index, reduction)
        loss = _nll_loss(x, t, weight=w, ignore_index=ignore_index, reduction=reduction)
        if reduction == "mean" and _mean_denominator(x, t, w, ignore_index) == 0:
            # Paddle divides only by a non-zero total weight; otherwise it returns the sum.
            loss = _nll_loss(x, t, weight=w, ignore_index=ignore_index, reduction="sum")
        return paddle.to_tensor(loss, place=input.place)

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, t, w, ignore_index, reduction = ctx.arguments
        grad = _nll_loss_backward(
            grad_output.numpy(),
            np.empty(shape, dtype=dtype),
            t,
            weight=w,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        return paddle.to_tensor(grad, place=grad_output.place)


def _mean_denominator(x, t, w, ignore_index):
    """The 'mean' denominator of nllloss's rule (targets already checked), with the weight
    in the input's dtype as the loss uses it."""
    return _total_weight(t, None if w is None else w.astype(x.dtype), ignore_index)


def nll_loss(input, label, weight=None, ignore_index=-100, reduction="mean", name=None):
    """``paddle.nn.functional.nll_loss``, computed by nllloss (see the module's notes).

    Examples
    --------
    >>> import paddle, nllloss.paddle
    >>> x = paddle.to_tensor([[-1.0, -2.0], [-0.5, -3.0]])
    >>> float(nllloss.paddle.nll_loss(x, paddle.to_tensor([1, -100])))
    2.0
    >>> float(nllloss.paddle.nll_loss(x, paddle.to_tensor([-100, -100])))  # torch: nan
    0.0
    """
    _validate.check_paddle_reduction(reduction)
    ignore_index = _validate.check_ignore_index(ignore_index)
    return _NLLLoss.apply(input, label, weight, ignore_index, reduction)


class NLLLoss(paddle.nn.Layer):
    """``paddle.nn.NLLLoss``, computed by nllloss: ``NLLLoss(...)(input, label)``."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", name=None):
        super().__init__()
        self._weight = weight
        self._ignore_index = ignore_index
        self._reduction = _validate.check_paddle_reduction(reduction)
        self._name = name

    def forward(self, input, label):
        return nll_loss(
            input,
            label,
            weight=self._weight,
            ignore_index=self._ignore_index,
            reduction=self._reduction,
            name=self._name,
        )

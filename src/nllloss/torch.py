"""PyTorch glue: ``nllloss.torch.NLLLoss`` and ``CrossEntropyLoss``, drop-in modules.

Importing this module imports torch; ``import nllloss`` alone does not (the attribute
``nllloss.torch`` loads it on first use).
"""

from __future__ import annotations

try:
    import torch
except ModuleNotFoundError as error:
    if error.name != "torch":  # torch is there, but something it imports is not
        raise
    raise ImportError("nllloss.torch needs PyTorch (pip install torch)") from None

from ._loss import nll_loss

__all__ = ["CrossEntropyLoss", "NLLLoss"]


class NLLLoss(torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` computed by :func:`nllloss.nll_loss`.

    A subclass of ``torch.nn.NLLLoss`` with the same constructor (legacy arguments and
    their warning included) and the class weight registered as the buffer ``weight``, so
    ``state_dict()`` moves between the two in both directions.

    Examples
    --------
    >>> import torch, nllloss.torch
    >>> loss = nllloss.torch.NLLLoss(weight=torch.tensor([1.0, 2.0]))
    >>> loss(torch.tensor([[-0.5, -1.0], [-2.0, -0.1]]), torch.tensor([0, 1]))
    tensor(0.2333)
    >>> sorted(loss.state_dict())
    ['weight']
    """

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, *, total_weight=None
    ) -> torch.Tensor:
        return nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            total_weight=total_weight,
        )


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (class-index targets) computed by :func:`nllloss.nll_loss`
    with ``from_logits=True``: no log-probabilities are materialised on CPU.

    Same constructor, attributes and ``state_dict`` as torch's module; ``forward`` also takes
    ``total_weight=`` (see :func:`nllloss.nll_loss`). Targets of class probabilities are
    not supported (a ``TypeError`` names the dtype).

    Examples
    --------
    >>> import torch, nllloss.torch
    >>> loss = nllloss.torch.CrossEntropyLoss(label_smoothing=0.1)
    >>> loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    tensor(0.3729)
    """

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, *, total_weight=None
    ) -> torch.Tensor:
        return nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            from_logits=True,
            label_smoothing=self.label_smoothing,
            total_weight=total_weight,
        )

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

from . import _options, _validate
from ._hidden_states import linear_cross_entropy
from ._loss import nll_loss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "NLLLoss"]


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
    """``torch.nn.CrossEntropyLoss`` computed by :func:`nllloss.nll_loss` with
    ``from_logits=True``: no log-probabilities are materialised on CPU.

    Same constructor, attributes and ``state_dict`` as torch's module, and the same target
    forms: class indices, or class probabilities of the input's shape (differentiable with
    respect to them too). Two keyword-only options that torch's module lacks, off by
    default: ``z_loss`` and ``softcap`` (see :func:`nllloss.nll_loss`); ``forward`` also
    takes ``total_weight=``.

    Examples
    --------
    >>> import torch, nllloss.torch
    >>> loss = nllloss.torch.CrossEntropyLoss(label_smoothing=0.1)
    >>> loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    tensor(0.3729)
    >>> loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.0]]))
    tensor(1.2729)
    >>> nllloss.torch.CrossEntropyLoss(z_loss=1e-4, softcap=30.0)
    CrossEntropyLoss(z_loss=0.0001, softcap=30.0)
    """

    @_options.keywords
    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        given = _options.given(locals())
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        _keep_options(self, given)

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
            total_weight=total_weight,
            **_kept_options(self),
        )

    def extra_repr(self) -> str:
        return _options_repr(self)


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """``torch.nn.LinearCrossEntropyLoss`` computed by :func:`nllloss.linear_cross_entropy`:
    the logits are made a block of rows at a time, never whole.

    Same constructor, attributes (``linear``, ``weight``, ``options``, ...) and
    ``state_dict`` as torch's module; ``options`` is kept for compatibility and not read
    (this module always works in blocks). Keyword-only options that torch's lacks, off by
    default: ``z_loss``, ``softcap`` and ``chunk_rows``; ``forward`` also takes
    ``total_weight=``.

    Examples
    --------
    >>> import torch, nllloss.torch
    >>> _ = torch.manual_seed(0)
    >>> head = nllloss.torch.LinearCrossEntropyLoss(4, 10)
    >>> sorted(head.state_dict())
    ['linear.weight']
    >>> loss = head(torch.randn(3, 4, requires_grad=True), torch.tensor([1, 2, 3]))
    >>> loss.backward()
    >>> head.linear.weight.grad.shape
    torch.Size([10, 4])
    """

    @_options.keywords
    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        given = _options.given(locals())
        super().__init__(
            in_features, num_classes, out_features=out_features, bias=bias, device=device,
            dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options,
        )  # fmt: skip
        _keep_options(self, given)
        self.chunk_rows = _validate.check_chunk_rows(chunk_rows)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, *, total_weight=None
    ) -> torch.Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias
        return linear_cross_entropy(
            input,
            self.linear.weight.reshape((*shape, self.linear.in_features)),
            target,
            linear_bias=None if bias is None else bias.reshape(shape),
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            total_weight=total_weight,
            chunk_rows=self.chunk_rows,
            **_kept_options(self),
        )


def _keep_options(module: torch.nn.Module, given: dict) -> None:
    """Check the options a module's constructor took (from logits) and keep them as its
    attributes: those torch's own module keeps as torch kept them, ours as checked."""
    checked = _options.checked({**given, "from_logits": True})
    module._option_names = tuple(given)
    for name in given:
        if not hasattr(module, name):
            setattr(module, name, getattr(checked, name))


def _kept_options(module: torch.nn.Module) -> dict:
    """The options a module passes to each call, by name: those not at their defaults (a
    default of the default's type is the default; left out, the call can take the quick
    path, whose guard compares identities)."""
    kept = {}
    for name in module._option_names:
        value, default = getattr(module, name), getattr(_DEFAULTS, name)
        if not (type(value) is type(default) and value == default):
            kept[name] = value
    return kept


_DEFAULTS = _options.Options()


def _options_repr(module: torch.nn.Module) -> str:
    """Our options that torch's module lacks, where not at their defaults."""
    defaults = _options.Options()
    return ", ".join(
        f"{name}={getattr(module, name)!r}"
        for name in module._option_names
        if name not in _TORCH_OWN and getattr(module, name) != getattr(defaults, name)
    )


# Options that torch's modules keep themselves (and print in their own repr)
_TORCH_OWN = ("label_smoothing",)

"""The description of one loss computation, built once per call and handed to every backend.

A :class:`Problem` holds the validated arrays (in the input's library), where the classes
and target elements are (:class:`Layout`), the resolved reduction and every option. The
rules that several backends need are written here once, as its properties and methods:

* an unbatched input is reduced even for ``'none'`` (as torch): :func:`build` resolves
  its reduction to ``'sum'`` of its single element, so no backend special-cases it;
* the shape of the loss (``loss_shape``) and whether it is element-wise;
* float16 and bfloat16 compute in float32 (``computes_in_float32``);
* the weight is used in the input's dtype (cast once, by :func:`build`'s caller);
* the first target that is neither a class nor ``ignore_index`` is reported by one
  ``IndexError`` (``Layout.bad_target``).

Adding an option means a field here (with its default), its check in ``_validate``, the
keyword of the public functions in ``_loss``, and the kernels that read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import _validate

_SIXTEEN_BIT = ("float16", "bfloat16")


def computes_in_float32(dtype: Any) -> bool:
    """float16 and bfloat16 inputs are computed in float32 and rounded once at the end."""
    return _validate.dtype_name(dtype) in _SIXTEEN_BIT


class Layout(NamedTuple):
    """Where the classes and the target elements are in the input.

    The input is viewed as ``(batch, classes, spatial)``: an unbatched ``(C,)`` input is
    ``(1, C, 1)``, ``(N, C)`` is ``(N, C, 1)``, ``(N, C, d1, ..., dK)`` is ``(N, C, d1*...*dK)``.
    Target element ``m`` (row-major over the target) is then ``(m // spatial, m % spatial)``,
    which is also the order in which torch's CPU kernels sum.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]  # the target's shape without a batch axis for unbatched
    batch: int
    classes: int
    spatial: int

    @property
    def unbatched(self) -> bool:
        return len(self.input_shape) == 1

    @property
    def size(self) -> int:
        """Number of target elements, M."""
        return self.batch * self.spatial

    def bad_target(self, flat_index: int, value: int, ignore_index: int) -> IndexError:
        """The error for target element ``flat_index`` (row-major), of value ``value``."""
        position = np.unravel_index(flat_index, self.output_shape) if self.output_shape else ()
        return _validate.out_of_bounds_error(
            int(value), tuple(int(p) for p in position), self.classes, ignore_index
        )


def layout_of(input_shape: tuple[int, ...]) -> Layout:
    """The layout of an input, whose target fits it (see ``_validate.check_target``).

    The target elements are the input's positions without the class axis, whether the
    target holds their class indices (of that shape) or their class probabilities (of the
    input's shape).
    """
    input_shape = tuple(input_shape)
    if len(input_shape) == 1:
        return Layout(input_shape, (), 1, input_shape[0], 1)
    spatial = 1
    for d in input_shape[2:]:
        spatial *= d
    output_shape = (input_shape[0], *input_shape[2:])  # the class-index target's shape
    return Layout(input_shape, output_shape, input_shape[0], input_shape[1], spatial)


@dataclass(frozen=True)
class Problem:
    """One call of the loss: validated arrays, their layout, the reduction and the options.

    ``input``, ``target``, ``weight`` and ``total_weight`` are arrays of one library (the
    weight already in the input's dtype; ``total_weight`` a 0-d or ``(1,)`` array).
    ``reduction`` is ``'none'``, ``'mean'`` or ``'sum'``, with an unbatched ``'none'``
    resolved to ``'sum'``.
    """

    input: Any
    target: Any
    weight: Any | None
    ignore_index: int
    reduction: str
    layout: Layout
    from_logits: bool = False
    label_smoothing: float = 0.0
    total_weight: Any | None = None  # the 'mean' denominator given by the caller
    check_targets: bool = True  # False: no host sync for the range check (Triton)
    z_loss: float = 0.0  # from logits: z * logsumexp**2 added per element
    softcap: float | None = None  # from logits: softcap * tanh(x / softcap) replaces x

    @property
    def probabilities(self) -> bool:
        """The target holds class probabilities (floating, the input's shape), not indices."""
        return _validate.is_float_dtype(self.target.dtype)

    @property
    def elementwise(self) -> bool:
        """One loss per target element (``'none'``), not one reduced value."""
        return self.reduction == "none"

    @property
    def loss_shape(self) -> tuple[int, ...]:
        return self.layout.output_shape if self.elementwise else ()

    @property
    def probability_count(self) -> float:
        """The 'mean' denominator of probability targets: the number of target elements,
        torch's ``numel / C`` (NaN without classes, where torch divides 0 by 0)."""
        return float(self.layout.size) if self.layout.classes else float("nan")

    @property
    def over_rows(self) -> bool:
        """The loss reads whole rows of classes (log-softmax, smoothing or probability
        targets), not ``x[t]`` only."""
        return self.from_logits or self.label_smoothing > 0 or self.probabilities

    @property
    def plain(self) -> bool:
        """torch's ``nll_loss`` itself: no option of ours in use."""
        return not self.over_rows and self.total_weight is None and self.check_targets

    @property
    def computes_in_float32(self) -> bool:
        return computes_in_float32(self.input.dtype)

    def replace(self, **changes: Any) -> Problem:
        return dataclasses.replace(self, **changes)

    def with_arrays(self, convert) -> Problem:
        """The same problem with every array passed through ``convert`` (None stays None)."""

        def apply(a):
            return None if a is None else convert(a)

        return self.replace(
            input=apply(self.input),
            target=apply(self.target),
            weight=apply(self.weight),
            total_weight=apply(self.total_weight),
        )

    def bad_target(self, flat_index: int, value: int) -> IndexError:
        return self.layout.bad_target(flat_index, value, self.ignore_index)


def resolved_reduction(reduction: str, layout: Layout) -> str:
    """An unbatched input has one target element: torch reduces it even for 'none'."""
    return "sum" if reduction == "none" and layout.unbatched else reduction

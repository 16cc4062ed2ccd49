"""The description of one loss computation, built once per call and handed to every backend.

A :class:`Problem` holds the validated arrays (in the input's library), where the classes
and target elements are (:class:`Layout`), the resolved reduction and the options (one
:class:`~nllloss._options.Options`, carried whole). The rules that several routes need are
written here once, as its properties and methods:

* an unbatched input is reduced even for ``'none'`` (as torch): :func:`resolved_reduction`
  makes its reduction ``'sum'`` of its single element, so no backend special-cases it;
* the shape of the loss (``loss_shape``) and whether it is element-wise;
* float16 and bfloat16 compute in float32 (``computes_in_float32``);
* the weight is used in the input's dtype (``weight_as_used``, cast once by
  ``_builder.build``);
* the 'mean' denominator (``denominator``): ``total_weight`` when given, the number of
  target elements for probabilities, else the count or the weight sum of the counted ones;
* the first target that is neither a class nor ``ignore_index`` is reported by one
  ``IndexError`` (``Layout.bad_target``, ``Problem.bad_target``).

Adding an option: see ``_options``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import _validate
from ._options import Options, fields

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

    @property
    def probability_count(self) -> float:
        """The 'mean' denominator of probability targets: the number of target elements,
        torch's ``numel / C`` (NaN without classes, where torch divides 0 by 0)."""
        return float(self.size) if self.classes else float("nan")

    def bad_target(self, flat_index: int, value: int, ignore_index: int) -> IndexError:
        """The error for target element ``flat_index`` (row-major), of value ``value``."""
        position = np.unravel_index(flat_index, self.output_shape) if self.output_shape else ()
        return _validate.out_of_bounds_error(
            int(value), tuple(int(p) for p in position), self.classes, ignore_index
        )


def out_of_range(target: Any, classes: int, ignore_index: int) -> Any:
    """The range check of every route, element-wise (NumPy arrays and torch tensors): a
    target that is neither ``ignore_index`` nor a class in ``[0, classes)``. The first
    one (row-major) is reported by ``Layout.bad_target``."""
    return (target != ignore_index) & ((target < 0) | (target >= classes))


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

    ``input``, ``target`` and ``weight`` are arrays of one library (the weight already in
    the input's dtype), as are the ``array`` options (``total_weight``: a 0-d or ``(1,)``
    array). ``reduction`` is ``'none'``, ``'mean'`` or ``'sum'``, with an unbatched
    ``'none'`` resolved to ``'sum'``. Each option reads as an attribute too
    (``problem.z_loss`` is ``problem.options.z_loss``).
    """

    input: Any
    target: Any
    weight: Any | None
    ignore_index: int
    reduction: str
    layout: Layout
    options: Options = Options()  # noqa: RUF009 (frozen: one shared default is safe)

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
        return self.layout.probability_count

    def denominator(self, count=None, weight_sum=None, given=None):
        """The 'mean' denominator (:func:`mean_denominator`) of this problem."""
        return mean_denominator(
            self.layout, self.options.total_weight, self.probabilities,
            self.weight is not None, count, weight_sum, given,
        )  # fmt: skip

    @property
    def over_rows(self) -> bool:
        """The loss reads whole rows of classes (log-softmax, smoothing or probability
        targets), not ``x[t]`` only."""
        options = self.options
        return options.from_logits or options.label_smoothing > 0 or self.probabilities

    @property
    def plain(self) -> bool:
        """torch's ``nll_loss`` itself: class indices and every option at its default."""
        return not self.probabilities and not self.options.in_use()

    @property
    def computes_in_float32(self) -> bool:
        return computes_in_float32(self.input.dtype)

    def replace(self, **changes: Any) -> Problem:
        """A copy with ``changes``, of fields or of options (by their names)."""
        names = {f.name for f in fields(self.options)}
        option_changes = {k: changes.pop(k) for k in list(changes) if k in names}
        if option_changes:
            changes["options"] = changes.get("options", self.options).replace(**option_changes)
        return dataclasses.replace(self, **changes)

    def with_arrays(self, convert) -> Problem:
        """The same problem with every array (the array options too) passed through
        ``convert`` (None stays None)."""
        return dataclasses.replace(
            self,
            input=convert(self.input),
            target=convert(self.target),
            weight=None if self.weight is None else convert(self.weight),
            options=self.options.with_arrays(convert),
        )

    def bad_target(self, flat_index: int, value: int) -> IndexError:
        return self.layout.bad_target(flat_index, value, self.ignore_index)


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Options))


def _option_reader(name: str) -> property:
    return property(lambda problem: getattr(problem.options, name), doc=f"``options.{name}``")


for _name in _OPTION_NAMES:  # problem.z_loss reads problem.options.z_loss, and so on
    setattr(Problem, _name, _option_reader(_name))


def mean_denominator(layout: Layout, total_weight, probabilities: bool, weighted: bool,
                     count, weight_sum, given=None):  # fmt: skip
    """The 'mean' denominator, by the one rule of every route: ``total_weight`` when given
    (the array as given, or ``given(total_weight)``: the route's conversion); for
    probability targets the number of target elements (``Layout.probability_count``, a
    float); else ``count()``, the number of non-ignored targets, unweighted, or
    ``weight_sum()``, the sum of ``w[t]`` over them, weighted. The callables are the
    route's (its summation order and dtype); only the one needed is called (a route that
    cannot meet a case passes None for its callable)."""
    if total_weight is not None:
        return total_weight if given is None else given(total_weight)
    if probabilities:
        return layout.probability_count
    return weight_sum() if weighted else count()


def weight_as_used(xp, weight: Any, input_dtype: Any) -> Any:
    """The class weight as every route computes with it: in the input's dtype, as torch
    computes (a 16-bit input then widens both to float32, ``computes_in_float32``)."""
    return weight if weight.dtype == input_dtype else xp.astype(weight, input_dtype)


def resolved_reduction(reduction: str, layout: Layout) -> str:
    """An unbatched input has one target element: torch reduces it even for 'none'."""
    return "sum" if reduction == "none" and layout.unbatched else reduction

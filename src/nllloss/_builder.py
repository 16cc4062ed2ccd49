"""Every argument of a loss call checked once, into the backend of the input and its
:class:`~nllloss._problem.Problem`: the one builder the public functions, the loss from
hidden states and the framework glue share."""

from __future__ import annotations

from typing import Any

from . import _options, _validate
from ._problem import Problem, layout_of, resolved_reduction
from ._routes import as_array, backend_for, like_input


def build(
    input: Any,
    target: Any,
    weight: Any,
    ignore_index: Any,
    reduction: str,
    options: dict,
    logits_shape: tuple[int, ...] | None = None,
):
    """Validate every argument once; the backend for the input and the Problem it solves.

    ``reduction`` is already checked (its warnings point at the public caller);
    ``options`` maps option names to the values given (``_options.given``).
    ``logits_shape`` is given by the loss from hidden states (``_hidden_states``): the input is
    then the hidden states, which fix the library, device and dtype, and the problem is
    that of logits of this shape, which are never formed whole.
    """
    input = as_array(input, "input")
    backend = backend_for(input)
    input = backend.autocast(input)  # before the weight and probabilities take its dtype
    target = like_input(backend, target, input, "target")
    _validate.check_input(input)
    shape = tuple(input.shape) if logits_shape is None else logits_shape
    _validate.check_target(target, shape)
    probabilities = _validate.is_float_dtype(target.dtype)
    if probabilities and target.dtype != input.dtype:
        # class probabilities, used in the input's dtype as the weight is
        target = backend.xp.astype(target, input.dtype)
    layout = layout_of(shape)
    if weight is not None:
        # A sequence has no dtype of its own: read it in the input's.
        weight = like_input(backend, weight, input, "weight", sequence_dtype=input.dtype)
        _validate.check_weight(weight, layout.classes)
        if weight.dtype != input.dtype:  # torch computes with the weight in x's dtype
            weight = backend.xp.astype(weight, input.dtype)

    def to_array(value, name):
        return like_input(backend, value, input, name)

    problem = Problem(
        input,
        target,
        weight,
        _validate.check_ignore_index(ignore_index, probabilities),
        resolved_reduction(reduction, layout),
        layout,
        _options.checked(options, reduction, to_array),
    )
    return backend, problem

"""The loss as a differentiable torch function: :class:`FusedLoss` (also the loss from hidden
states') in eager mode, the custom operators ``nllloss::*`` under ``torch.compile`` (opaque
to the compiler: no graph break, the target check runs inside), with their autograd
registered. Both compute through :func:`nllloss._torch.engines.compute`.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import _options
from .._options import Options
from .._problem import Problem, layout_of
from .engines import (
    GENERIC,
    check_weight,
    compute,
    engine,
    gradient_with_the_loss,
    scaled,
    shaped_upstream,
    torch_nll_loss,
)


def differentiable_loss(problem: Problem):
    """The loss of a problem of torch tensors, differentiable: on the engine
    :func:`~nllloss._torch.engines.engine` chooses, through :class:`FusedLoss` in eager mode
    and the custom operators under ``torch.compile``."""
    check_weight(problem)
    chosen = engine(problem)
    if chosen == "composed":
        return GENERIC.forward(problem)
    if chosen == "torch":
        return torch_nll_loss(problem)
    x = problem.input
    training = x.requires_grad and torch.is_grad_enabled()
    fused = gradient_with_the_loss(problem, chosen)
    if torch.compiler.is_compiling():
        if training and fused:
            return nll_loss_with_unit_gradient_op(*to_schema(problem))[0]
        return nll_loss_op(*to_schema(problem))
    if not training:
        return compute("forward", problem)
    return FusedLoss.apply(_ProblemLoss(problem, fused), x)


# --- Eager autograd ---------------------------------------------------------------------


class FusedLoss(torch.autograd.Function):
    """A loss computed by our engines, as a differentiable torch function.

    ``FusedLoss.apply(computation, *computation.arguments)``. The computation is a frozen
    dataclass (its tensors, nested dataclasses' too, are kept by :func:`_keep`) that offers

    * ``arguments``: the tensors the loss is differentiated with respect to;
    * ``forward(wants)``: ``(loss, unit)``, with ``unit`` the gradients of ``arguments``
      for an upstream gradient of 1 (None where ``wants`` is False) when the pass that
      computes the loss writes them too, else None;
    * ``gradients(grad, wants)``: the gradients for the upstream gradient ``grad``;
    * ``differentiable_gradients(grad, wants)``: the same as differentiable tensors, of
      the arguments (whose saved tensors keep their graphs) and ``grad``: an implemented
      derivative, or autograd through plain torch operations (:func:`differentiated`).

    The backward, written once for every such loss: when it builds a graph
    (``create_graph=True``: grad mode is on inside it), ``differentiable_gradients``, so
    that the gradients can be differentiated again (a gradient penalty, ``gradgradcheck``);
    else the unit gradients, scaled, the first time, and ``gradients`` otherwise (no unit
    gradients, or a second backward with ``retain_graph=True``).
    """

    @staticmethod
    def forward(ctx, computation, *arguments):
        loss, ctx.unit = computation.forward(ctx.needs_input_grad[1:])
        _keep(ctx, computation)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad):
        computation = _kept(ctx)  # torch's error if a tensor was changed in place since
        unit, ctx.unit = ctx.unit, None  # autograd may keep, not copy, them: used once
        wants = ctx.needs_input_grad[1:]
        if grad is None:  # nothing flows back through the loss
            grads = (None,) * len(wants)
        elif torch.is_grad_enabled():
            grads = computation.differentiable_gradients(grad, wants)
        elif unit is None:
            grads = computation.gradients(grad, wants)
        elif is_unit_upstream(grad):
            grads = unit
        else:
            grads = tuple(None if g is None else scaled(g, grad, in_place=True) for g in unit)
        return None, *grads


def differentiated(loss: torch.Tensor, arguments: tuple, grad, wants) -> tuple:
    """The gradients of ``loss`` (made of differentiable operations of ``arguments``) for
    the upstream gradient ``grad``, where ``wants`` says, as tensors that are
    differentiable again with respect to ``arguments`` and ``grad``."""
    inputs = [a for a, wanted in zip(arguments, wants, strict=True) if wanted]
    found = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True, materialize_grads=True))
    return tuple(next(found) if wanted else None for wanted in wants)


_SAVED = object()  # in a kept computation: a tensor that save_for_backward holds


def _keep(ctx, computation) -> None:
    """Keep a computation for the backward: every tensor it holds through
    ``save_for_backward`` (so that torch's version counters and saved-tensor hooks apply to
    each), the rest on ``ctx``."""
    tensors: list = []

    def saved(tensor):
        tensors.append(tensor)
        return _SAVED

    ctx.computation = _replaced(computation, lambda item: isinstance(item, torch.Tensor), saved)
    ctx.save_for_backward(*tensors)


def _kept(ctx):
    """The computation of :func:`_keep`, its tensors read back from autograd (which raises
    "modified by an inplace operation" for one changed since)."""
    tensors = iter(ctx.saved_tensors)
    return _replaced(ctx.computation, lambda item: item is _SAVED, lambda _: next(tensors))


def _replaced(value, chosen, replacement):
    """The dataclass ``value`` with every field value for which ``chosen`` is true, nested
    dataclasses' too, replaced by ``replacement(item)``, visited in field order."""
    changes = {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if chosen(item):
            changes[field.name] = replacement(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            changes[field.name] = _replaced(item, chosen, replacement)
    return dataclasses.replace(value, **changes) if changes else value


@dataclasses.dataclass(frozen=True)
class _ProblemLoss:
    """``nll_loss`` of a problem, for :class:`FusedLoss`: differentiated with respect to the
    input; ``unit``: the forward writes the gradient too (see ``gradient_with_the_loss``)."""

    problem: Problem
    unit: bool

    @property
    def arguments(self) -> tuple:
        return (self.problem.input,)

    def forward(self, wants):
        if not self.unit:
            return compute("forward", self.problem), None
        loss, gradient = compute("forward_backward", self.problem)
        return loss, (gradient,)

    def gradients(self, grad, wants):
        problem = _checked_by_the_forward(self.problem)
        return (compute("backward", problem, shaped_upstream(problem, grad)),)

    def differentiable_gradients(self, grad, wants):
        problem = _checked_by_the_forward(self.problem)
        return (Backward.apply(shaped_upstream(problem, grad), problem.input, problem),)


def _checked_by_the_forward(problem: Problem) -> Problem:
    """The problem of a backward whose forward ran: its targets passed the check there
    (autograd refuses a saved target changed since), so the backward does not check them
    again (on CUDA, a second host synchronisation)."""
    return problem.replace(check_targets=False)


def is_unit_upstream(grad: torch.Tensor) -> bool:
    """The upstream gradient is the scalar 1, so a unit gradient needs no scaling. Read on
    the CPU only: reading a value is a host synchronisation on a GPU, where it multiplies."""
    return grad.is_cpu and grad.dim() == 0 and bool(grad == 1)


class Backward(torch.autograd.Function):
    """The gradient for ``grad_output``, differentiable in ``grad_output`` and the input."""

    @staticmethod
    def forward(ctx, grad_output, input, problem: Problem):
        _save_problem(ctx, problem, grad_output)
        return compute("backward", problem, grad_output)

    @staticmethod
    def backward(ctx, grad):
        problem, grad_output = _saved_problem(ctx)
        return (*_backward_backward(problem, grad_output, grad), None)


def _backward_backward(problem: Problem, grad_output, grad):
    """The derivatives of the gradient, for ``grad`` flowing back: with respect to
    ``grad_output`` and to the input."""
    if not problem.over_rows:
        # The gradient is linear in grad_output and independent of the input's values:
        # d/d(grad_output) is the loss of `grad` (as torch's NllLossBackwardBackward).
        return differentiable_loss(problem.replace(input=grad)), None
    # With options the gradient depends on the input too: differentiate the generic path's
    # torch operations, which are its formulas step for step.
    with torch.enable_grad():
        upstream = grad_output.detach().requires_grad_()
        logits = problem.input.detach().requires_grad_()
        first = GENERIC.backward(problem.replace(input=logits), upstream)
        grad_upstream, grad_input = torch.autograd.grad(
            first,
            (upstream, logits),
            grad,
            create_graph=torch.is_grad_enabled(),
            materialize_grads=True,  # log-probability input: the gradient ignores its values
        )
    return grad_upstream, grad_input


# --- Custom operators, for torch.compile -------------------------------------------------
# The schema is Problem's fields and its options' (the layout is derived from the shapes):
# the tensors first, then the values, so that a new option reaches the operators with no
# edit here.

# The annotations of Problem and Options (strings, as written there) in the operators'
# schema language.
_SCHEMA_TYPES = {
    "Any": "Tensor",
    "Any | None": "Tensor?",
    "int": "int",
    "str": "str",
    "bool": "bool",
    "float": "float",
    "float | None": "float?",
}
_OPTION_FIELDS = dataclasses.fields(Options)
_OPTION_NAMES = frozenset(f.name for f in _OPTION_FIELDS)
_FIELDS = sorted(  # sorted is stable: the tensors in their order, then the values
    [f for f in dataclasses.fields(Problem) if f.name not in ("layout", "options")]
    + list(_OPTION_FIELDS),
    key=lambda f: not _SCHEMA_TYPES[f.type].startswith("Tensor"),
)


def _schema_argument(field: dataclasses.Field) -> str:
    return f"{_SCHEMA_TYPES[field.type]} {field.name}"


_ARGUMENTS = ", ".join(map(_schema_argument, _FIELDS))
_NO_GRADIENTS = (None,) * (len(_FIELDS) - 1)  # for every schema argument but the input


def to_schema(problem: Problem) -> tuple:
    if type(problem.options) is not Options:  # options the schema was not made from
        raise TypeError(f"no operator schema for {type(problem.options).__qualname__}")
    options = problem.options
    return tuple(
        getattr(options if f.name in _OPTION_NAMES else problem, f.name) for f in _FIELDS
    )


def _from_schema(*schema) -> Problem:
    fields = dict(zip((f.name for f in _FIELDS), schema, strict=True))
    options = Options(**{name: fields.pop(name) for name in _OPTION_NAMES})
    layout = layout_of(tuple(fields["input"].shape))
    return Problem(layout=layout, options=options, **fields)


def _operator(name: str, compute, returns: str, leading: str = ""):
    """The custom operator ``nllloss::name`` of (``leading`` tensors, then the schema)."""
    arguments = f"{leading}, {_ARGUMENTS}" if leading else _ARGUMENTS
    return torch.library.custom_op(
        f"nllloss::{name}", compute, mutates_args=(), schema=f"({arguments}) -> {returns}"
    )


def _loss_of_schema(*schema):
    return compute("forward", _from_schema(*schema))


def _gradient_of_schema(grad_output, *schema):
    return compute("backward", _from_schema(*schema), grad_output)


def _loss_and_unit_gradient_of_schema(*schema):
    """The loss and its gradient for an upstream gradient of 1, from one pass."""
    return compute("forward_backward", _from_schema(*schema))


nll_loss_op = _operator("nll_loss", _loss_of_schema, "Tensor")
nll_loss_backward_op = _operator(
    "nll_loss_backward", _gradient_of_schema, "Tensor", "Tensor grad_output"
)
nll_loss_with_unit_gradient_op = _operator(
    "nll_loss_with_unit_gradient", _loss_and_unit_gradient_of_schema, "(Tensor, Tensor)"
)


@nll_loss_op.register_fake
def _(*schema):
    return schema[0].new_empty(_from_schema(*schema).loss_shape)


@nll_loss_backward_op.register_fake
def _(grad_output, input, *schema):
    return torch.empty_like(input)


@nll_loss_with_unit_gradient_op.register_fake
def _(*schema):
    input = schema[0]
    return input.new_empty(_from_schema(*schema).loss_shape), torch.empty_like(input)


def _save_problem(ctx, problem: Problem, *more_tensors) -> None:
    """Keep a problem (and ``more_tensors``) for the backward: its arrays (the array
    options' too) through ``save_for_backward``, the rest as it is."""
    names = ["input", "target", "weight"] + [
        f.name for f in _options.fields(problem.options) if f.array
    ]
    arrays = [getattr(problem, name) for name in names[:3]]
    arrays += [getattr(problem.options, name) for name in names[3:]]
    ctx.save_for_backward(*arrays, *more_tensors)
    ctx.problem_names = names
    ctx.problem = problem.replace(**dict.fromkeys(names))


def _saved_problem(ctx) -> tuple:
    """The problem ``_save_problem`` kept, then the tensors kept after it."""
    saved = ctx.saved_tensors
    names = ctx.problem_names
    return (ctx.problem.replace(**dict(zip(names, saved, strict=False))), *saved[len(names):])


def _op_setup(ctx, inputs, output):
    _save_problem(ctx, _from_schema(*inputs))


def _op_backward(ctx, grad):
    problem = _checked_by_the_forward(_saved_problem(ctx)[0])
    grad_input = nll_loss_backward_op(shaped_upstream(problem, grad), *to_schema(problem))
    return grad_input, *_NO_GRADIENTS


def _backward_op_setup(ctx, inputs, output):
    grad_output, *schema = inputs
    _save_problem(ctx, _from_schema(*schema), grad_output)


def _backward_op_backward(ctx, grad):
    problem, grad_output = _saved_problem(ctx)
    grad_grad_output, grad_input = _backward_backward(problem, grad_output, grad)
    return grad_grad_output, grad_input, *_NO_GRADIENTS


def _unit_setup(ctx, inputs, output):
    _save_problem(ctx, _from_schema(*inputs))
    ctx.unit_gradient = output[1]
    ctx.mark_non_differentiable(output[1])


def _unit_backward(ctx, grad, _unit_grad):
    if torch.is_grad_enabled():  # a graph to build: the operators' path
        return _op_backward(ctx, grad)
    # No shortcut for grad == 1 here: the compiler traces this function, and a branch on a
    # tensor's value would be data-dependent.
    return scaled(ctx.unit_gradient, grad), *_NO_GRADIENTS


nll_loss_op.register_autograd(_op_backward, setup_context=_op_setup)
nll_loss_backward_op.register_autograd(_backward_op_backward, setup_context=_backward_op_setup)
nll_loss_with_unit_gradient_op.register_autograd(_unit_backward, setup_context=_unit_setup)

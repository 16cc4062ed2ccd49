"""torch tensors: the route of a problem, and the loss as a differentiable torch function.

The route is written once, top to bottom, in :func:`engine`: which engine computes a
problem of torch tensors, the first of these that supports it:

1. ``'composed'``, the generic path's plain torch operations differentiated by torch
   itself, when torch must see them: under ``torch.func``
   transforms and forward-mode AD (every transform composes with them; a target batched
   by ``vmap`` cannot be inspected, so an out-of-range value there gives NaN, as under
   ``jax.jit``), or for probability targets that require grad;
2. ``'torch'``: torch's own ``nll_loss`` for a plain small float32/float64 CPU problem
   (same bits, less dispatch; its autograd is torch's);
3. ``'numpy'``: the NumPy route on zero-copy views of float16/float32/float64 CPU tensors
   (the bits of torch's CPU kernels, float16 accumulated in float32), when its kernels
   ``supports`` the problem;
4. ``'triton'``: CUDA tensors, when the Triton kernels are enabled and support the problem
   (``_triton.launcher_for``, which raises when ``NLLLOSS_TRITON=1`` asked for them and
   they cannot take it);
5. ``'generic'``: anything else (other devices, bfloat16 on the CPU, other options).

Differentiation for the last three: in eager mode :class:`FusedLoss` (also the loss from
hidden states'), whose tensors autograd keeps under its version counters and whose
backward, when it builds a graph, gives differentiable gradients; under ``torch.compile``
the custom operators ``nllloss::*`` (opaque to the compiler: no graph break, the target
check runs inside), with their autograd registered. Both compute through :func:`_compute`.
Under ``torch.autocast`` the loss runs in float32 (:meth:`TorchBackend.autocast`). A
problem crosses an operator's schema through :func:`_to_schema` and :func:`_from_schema`,
and nowhere else. Imported only when torch tensors arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses

import array_api_compat.torch as torch_namespace
import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from . import _cpu, _generic, _options, _triton, _validate
from ._options import Options
from ._problem import Problem, layout_of

GENERIC = _generic.Backend(torch_namespace)
_EXACT_ON_NUMPY = (torch.float16, torch.float32, torch.float64)


# --- Which engine computes a problem ------------------------------------------------------


def engine(problem: Problem, *, torch_kernel: bool = True) -> str:
    """'composed', 'torch', 'numpy', 'triton' or 'generic': the route of a problem of torch
    tensors (see the module). ``torch_kernel=False`` leaves torch's own kernel out (a
    gradient of ours is asked for)."""
    if composed(problem):
        return "composed"
    if torch_kernel and _torch_kernel_supports(problem):
        return "torch"
    if _numpy_views_support(problem):
        return "numpy"
    if _triton.launcher_for(problem) is not None:
        return "triton"
    return "generic"


def composed(problem: Problem) -> bool:
    """torch must differentiate the loss as plain operations (see the module): under
    ``torch.func`` transforms and forward-mode AD, or probabilities that require grad."""
    return _values_hidden() or _target_needs_grad(problem)


def _values_hidden() -> bool:
    # Under torch.func transforms (grad, vmap, jvp, ...) and forward-mode AD the loss is made
    # of plain torch operations, which every transform composes with; autograd.Function
    # and custom operators would need a rule per transform.
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _target_needs_grad(problem: Problem) -> bool:
    """A target of class probabilities that requires grad (as torch's ``cross_entropy``,
    the loss is differentiable with respect to it): the generic path, of plain torch
    operations, gives autograd both gradients."""
    target = problem.target
    return problem.probabilities and target.requires_grad and torch.is_grad_enabled()


# Below this many input elements, float32/float64 CPU tensors run torch's own kernel: its
# results are the bits our engine reproduces, and our dispatch costs more than the whole
# call there (measured: (64, 10) forward+backward 0.14 ms through the operator, 0.02 ms
# through torch; ours wins from (4096, 1000) on, 1.3-1.9x at (1048576, 10),
# (8, 21, 256, 256) and (8192, 32000)).
TORCH_KERNEL_MAX = 1 << 22
# The target dtype torch's nll_loss reads under torch.compile too (eager torch also reads
# uint8 for inputs of rank 1 and 2; the meta kernel of torch.compile does not); other
# integer dtypes up to 32 bits are widened to int64 exactly. uint64 is not: values from
# 2**63 on would wrap (to ignore_index, say).
_TORCH_TARGETS = (torch.int64,)
_WIDENED_TARGETS = (torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32)
_TORCH_KERNEL_DTYPES = (torch.float32, torch.float64)


def _torch_kernel_supports(problem: Problem) -> bool:
    """torch's own nll_loss computes the problem: plain, float32/float64 on the CPU, small
    (``TORCH_KERNEL_MAX``), a target dtype it reads or that widens exactly."""
    x = problem.input
    return (
        problem.plain
        and x.device.type == "cpu"
        and x.dtype in _TORCH_KERNEL_DTYPES
        and x.numel() < TORCH_KERNEL_MAX
        and problem.target.dtype in _TORCH_TARGETS + _WIDENED_TARGETS
    )


def _numpy_views_support(problem: Problem) -> bool:
    """The NumPy route on views: CPU tensors of a dtype NumPy holds, options it computes."""
    x = problem.input
    return x.device.type == "cpu" and x.dtype in _EXACT_ON_NUMPY and _cpu.supports(problem)


def _compute(kind: str, problem: Problem, grad_output=None, out=None):
    """Run ``kind`` ('forward', 'backward' or 'forward_backward') on the problem's engine.

    'forward_backward' without ``grad_output`` gives the gradient for an upstream gradient
    of 1 (ones for 'none'), from the pass that computes the loss. ``out`` (a contiguous
    tensor of the input's shape and dtype) receives the gradient where the engine writes
    in place (NumPy's kernels, the generic path); the result is the gradient either way.
    """
    chosen = engine(problem, torch_kernel=False)  # (an autograd Function's: never 'composed')
    if chosen == "triton":
        return _triton_compute(kind, problem, grad_output)
    if grad_output is None and kind == "forward_backward":
        x = problem.input
        grad_output = torch.ones((), dtype=x.dtype, device=x.device)
    if chosen in ("generic", "composed"):
        backend = GENERIC
        problem = _with_comparable_target(problem)
    else:
        backend = _cpu.backend()
        problem = problem.with_arrays(_numpy_view)
        grad_output = None if grad_output is None else _numpy_view(grad_output)
        out = None if out is None else _numpy_view(out)
    if kind == "forward":
        return _as_tensor(backend.forward(problem))
    result = getattr(backend, kind)(problem, grad_output, out)
    return tuple(map(_as_tensor, result)) if kind == "forward_backward" else _as_tensor(result)


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _with_comparable_target(problem: Problem) -> Problem:
    """torch compares uint16/32/64 tensors on few devices: the target as int64 instead.
    uint64 values from 2**63 on are no class and never ``ignore_index``: they become an
    int64 value that is neither, so that the range check reports them."""
    t = problem.target
    if t.dtype not in _WIDE_UNSIGNED:
        return problem
    if t.dtype != torch.uint64:
        return problem.replace(target=t.to(torch.int64))
    wrapped = t.view(torch.int64)
    beyond = -(2**63) + (problem.ignore_index == -(2**63))
    return problem.replace(target=torch.where(wrapped < 0, beyond, wrapped))


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def _as_tensor(result):
    # NumPy results are fresh, contiguous and owned: shared with torch, not copied
    return torch.from_numpy(result) if isinstance(result, np.ndarray) else result


def _triton_compute(kind: str, problem: Problem, grad_output):
    """CUDA tensors: the Triton kernels (``nllloss._triton``), deterministic, no atomics."""
    launcher = _triton.launcher_for(problem)
    if kind == "forward":
        return launcher.forward(problem)[0]
    if kind == "backward":
        return launcher.backward(problem, grad_output)
    # One pass writes the loss and the unit gradient; another upstream gradient scales it.
    loss, unit = launcher.forward_backward(problem)
    return loss, unit if grad_output is None else _scaled(unit, grad_output)


# --- The backend ----------------------------------------------------------------------------


_REDUCTION_ENUMS = {"none": 0, "mean": 1, "sum": 2}  # torch's Reduction enum
_nll_loss_nd = torch._C._nn.nll_loss_nd  # F.nll_loss's kernel, without its Python checks


class TorchBackend:
    """The backend for torch tensors (see ``_dispatch``); results are torch tensors."""

    xp = torch_namespace

    @staticmethod
    def autocast(array: torch.Tensor) -> torch.Tensor:
        """torch's autocast policy for ``nll_loss`` and ``cross_entropy``, which it runs in
        float32: while autocast is on for the tensor's device, a floating tensor other than
        float64 is used in float32 (a differentiable cast, as autocast's), so the loss and
        its gradient are computed, and returned, in float32."""
        if (
            array.is_floating_point()
            and array.dtype != torch.float64
            and _autocast_on(array.device.type)
        ):
            return array.to(torch.float32)
        return array

    def forward(self, problem: Problem):
        _check_weight(problem)
        chosen = engine(problem)
        if chosen == "composed":
            return GENERIC.forward(problem)
        if chosen == "torch":
            return _torch_kernel(problem)
        x = problem.input
        training = x.requires_grad and torch.is_grad_enabled()
        fused = _gradient_with_the_loss(problem, chosen)
        if torch.compiler.is_compiling():
            if training and fused:
                return nll_loss_with_unit_gradient_op(*_to_schema(problem))[0]
            return nll_loss_op(*_to_schema(problem))
        if not training:
            return _compute("forward", problem)
        return FusedLoss.apply(_ProblemLoss(problem, fused), x)

    def forward_and_lse(self, problem: Problem):
        """(the loss, each element's log-sum-exp), from one pass of the fused kernels when no
        gradient is wanted; else the loss and ``log_normalizer``'s differentiable operations."""
        x = problem.input
        chosen = engine(problem, torch_kernel=False)
        if (
            chosen in ("composed", "generic")
            or torch.compiler.is_compiling()
            or (x.requires_grad and torch.is_grad_enabled())
        ):
            return self.forward(problem), _generic.log_normalizer(self.xp, problem)
        _check_weight(problem)
        if chosen == "triton":
            loss, saved = _triton.launcher_for(problem).forward(problem)
            return loss, saved.lse.reshape(problem.layout.output_shape).to(x.dtype)
        loss, lse = _cpu.backend().forward_and_lse(problem.with_arrays(_numpy_view))
        return _as_tensor(loss), _as_tensor(lse)

    def backward(self, problem: Problem, grad_output, out=None):
        if engine(problem, torch_kernel=False) == "composed":
            return GENERIC.backward(problem, grad_output)
        grad_output = _upstream(problem, grad_output)
        if torch.compiler.is_compiling():
            return nll_loss_backward_op(grad_output, *_to_schema(problem))
        return _Backward.apply(grad_output, problem.input, problem)

    def forward_backward(self, problem: Problem, grad_output, out=None):
        _check_weight(problem)
        x = problem.input
        if (
            engine(problem, torch_kernel=False) == "composed"
            or torch.compiler.is_compiling()
            or (x.requires_grad and torch.is_grad_enabled())
        ):  # the loss must be differentiable (or traced): the two calls
            return self.forward(problem), self.backward(problem, grad_output)
        return _compute("forward_backward", problem, _upstream(problem, grad_output), out)

    def total_weight(self, target, weight, ignore_index: int):
        if (
            target.device.type == "cpu"
            and (weight is None or weight.dtype in _EXACT_ON_NUMPY)
            and not _values_hidden()  # torch.func's wrapped tensors have no NumPy view,
            and not torch.compiler.is_compiling()  # nor traced ones
        ):
            # NumPy compares every integer dtype (torch's CPU kernels lack uint64 ones)
            weight = None if weight is None else _numpy_view(weight)
            numpy_total = _cpu.backend().total_weight(_numpy_view(target), weight, ignore_index)
            return torch.from_numpy(np.asarray(numpy_total))
        return GENERIC.total_weight(target, weight, ignore_index)

    @staticmethod
    def quick_forward(input, target, weight, ignore_index, reduction):
        """The commonest call straight to torch's kernel, whose bits our engine reproduces.

        Float32/float64 CPU input (below ``TORCH_KERNEL_MAX`` elements when a gradient will
        be needed), an int ``ignore_index``, a reduction by its name, no weight that needs a
        gradient. This is the call ``F.nll_loss`` makes, so under ``torch.func`` transforms
        and forward-mode AD too the result is torch's own. A target that is not int64
        returns None (torch.compile traces the kernel with no error to catch); so does what
        torch's kernel refuses (a weight of another dtype, rank or device; a target
        elsewhere; a bad target value), and the full path validates and raises nllloss's
        error. Only the checks torch's kernel does not make are made here: each costs
        ~0.05 us, the whole call at (64, 10) ~1.5 us.
        """
        enum = _REDUCTION_ENUMS.get(reduction) if type(reduction) is str else None
        if (
            enum is None
            or type(input) is not torch.Tensor
            or type(target) is not torch.Tensor
            or target.dtype not in _TORCH_TARGETS
            or type(ignore_index) is not int
            or input.dtype not in _TORCH_KERNEL_DTYPES
            or not input.is_cpu
            # large inputs that need a gradient take ours: our backward is the faster one
            or (
                input.requires_grad
                and input.numel() >= TORCH_KERNEL_MAX
                and torch.is_grad_enabled()
            )
            or (weight is not None and (type(weight) is not torch.Tensor or weight.requires_grad))
        ):
            return None
        try:
            return _nll_loss_nd(input, target, weight, enum, ignore_index)
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None


BACKEND = TorchBackend()


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def without_autocast(device_type: str):
    """A context in which autocast does not lower the precision of our own operations (the
    loss from hidden states' product, in the float32 that ``TorchBackend.autocast`` chose)."""
    if _autocast_on(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _gradient_with_the_loss(problem: Problem, chosen: str) -> bool:
    """Whether a training forward on the ``chosen`` engine also writes the gradient, so
    that the backward only scales it: from logits or smoothed (the backward would read the
    input again for the softmax) on the engines with a fused pass, NumPy's and Triton's."""
    return problem.over_rows and chosen in ("numpy", "triton")


def _check_weight(problem: Problem) -> None:
    weight = problem.weight
    if weight is not None:
        _validate.check_not_differentiable(
            "weight", weight.requires_grad and torch.is_grad_enabled()
        )


def _upstream(problem: Problem, grad_output: torch.Tensor) -> torch.Tensor:
    """The upstream gradient in the input's dtype and the loss's shape."""
    grad_output = grad_output.to(problem.input.dtype)
    shape = problem.loss_shape
    grad_output = grad_output.broadcast_to(shape) if shape else grad_output.reshape(())
    return grad_output.contiguous()


def _torch_kernel(problem: Problem):
    """torch's own nll_loss, with our argument forms: any integer target of up to 32 bits,
    the weight in x's dtype; a bad target is reported by our engine's IndexError."""
    x, t = problem.input, problem.target
    if t.dtype not in _TORCH_TARGETS:
        t = t.long()
    try:
        return torch.nn.functional.nll_loss(
            x, t, weight=problem.weight, ignore_index=problem.ignore_index,
            reduction=problem.reduction,
        )  # fmt: skip
    except IndexError:
        _compute("forward", problem)  # raises the IndexError with value and position
        raise


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
            grads = tuple(None if g is None else _scaled(g, grad, in_place=True) for g in unit)
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
    input; ``unit``: the forward writes the gradient too (see ``_gradient_with_the_loss``)."""

    problem: Problem
    unit: bool

    @property
    def arguments(self) -> tuple:
        return (self.problem.input,)

    def forward(self, wants):
        if not self.unit:
            return _compute("forward", self.problem), None
        loss, gradient = _compute("forward_backward", self.problem)
        return loss, (gradient,)

    def gradients(self, grad, wants):
        problem = _checked_by_the_forward(self.problem)
        return (_compute("backward", problem, _upstream(problem, grad)),)

    def differentiable_gradients(self, grad, wants):
        problem = _checked_by_the_forward(self.problem)
        return (_Backward.apply(_upstream(problem, grad), problem.input, problem),)


def _checked_by_the_forward(problem: Problem) -> Problem:
    """The problem of a backward whose forward ran: its targets passed the check there
    (autograd refuses a saved target changed since), so the backward does not check them
    again (on CUDA, a second host synchronisation)."""
    return problem.replace(check_targets=False)


def is_unit_upstream(grad: torch.Tensor) -> bool:
    """The upstream gradient is the scalar 1, so a unit gradient needs no scaling. Read on
    the CPU only: reading a value is a host synchronisation on a GPU, where it multiplies."""
    return grad.is_cpu and grad.dim() == 0 and bool(grad == 1)


def _scaled(unit: torch.Tensor, grad: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The gradient is linear in the upstream one: the unit gradient scaled (per element
    along the class axis for 'none'); ``in_place`` overwrites ``unit``, ours to reuse."""
    grad = grad.to(unit.dtype)
    factor = grad if grad.dim() == 0 else grad.unsqueeze(1)
    return unit.mul_(factor) if in_place else unit * factor


class _Backward(torch.autograd.Function):
    """The gradient for ``grad_output``, differentiable in ``grad_output`` and the input."""

    @staticmethod
    def forward(ctx, grad_output, input, problem: Problem):
        _save_problem(ctx, problem, grad_output)
        return _compute("backward", problem, grad_output)

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
        return BACKEND.forward(problem.replace(input=grad)), None
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


def _to_schema(problem: Problem) -> tuple:
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
    return _compute("forward", _from_schema(*schema))


def _gradient_of_schema(grad_output, *schema):
    return _compute("backward", _from_schema(*schema), grad_output)


def _loss_and_unit_gradient_of_schema(*schema):
    """The loss and its gradient for an upstream gradient of 1, from one pass."""
    return _compute("forward_backward", _from_schema(*schema))


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
    grad_input = nll_loss_backward_op(_upstream(problem, grad), *_to_schema(problem))
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
    return _scaled(ctx.unit_gradient, grad), *_NO_GRADIENTS


nll_loss_op.register_autograd(_op_backward, setup_context=_op_setup)
nll_loss_backward_op.register_autograd(_backward_op_backward, setup_context=_backward_op_setup)
nll_loss_with_unit_gradient_op.register_autograd(_unit_backward, setup_context=_unit_setup)

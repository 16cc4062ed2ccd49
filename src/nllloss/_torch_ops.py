"""torch tensors: the loss and its gradient as registered torch operators.

``nllloss::nll_loss`` and ``nllloss::nll_loss_backward`` are custom operators: opaque to
``torch.compile`` (no graph break: the target check runs inside them), with their
autograd registered (``loss.backward()``, ``torch.func.grad`` and double backward work).
CPU tensors are computed by the NumPy engine on zero-copy views, so results are the bits
of torch's own CPU kernels (and float16 accumulates in float32); tensors on other devices
by the generic array-API path with torch's namespace. Imported only when torch tensors
arrive.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _generic, _triton, _validate
from ._dispatch import engine_for
from ._validate import PLAIN

_EXACT_ON_NUMPY = (torch.float16, torch.float32, torch.float64)


def _layout(input: torch.Tensor, target: torch.Tensor) -> _validate.Layout:
    return _validate.check_target(target, tuple(input.shape))


def _run(kind: str, grad_output, input, target, weight, ignore_index, reduction, options):
    """Run ``kind`` ('forward', 'backward' or 'forward_backward') on the engine for the
    tensors' device: the NumPy engine on zero-copy views for CPU tensors it computes exactly,
    else the generic path with torch's namespace."""
    layout = _layout(input, target)
    if input.device.type == "cpu" and input.dtype in _EXACT_ON_NUMPY:
        to_numpy = lambda a: None if a is None else a.detach().numpy()  # noqa: E731
        grad_output, input, target, weight = map(to_numpy, (grad_output, input, target, weight))
        options = options._replace(total_weight=to_numpy(options.total_weight))
        engine = engine_for(input)
        implementation = engine.implementation
    else:
        launcher = _triton.launcher_for(input, target, weight)
        if launcher is not None and kind != "forward_backward":
            return _run_triton(launcher, kind, grad_output, input, target, weight, ignore_index,
                               reduction, options)  # fmt: skip
        engine, implementation = engine_for(input), _generic  # torch's namespace
    arguments = (input, target, weight, ignore_index, reduction, layout, options)
    if kind == "forward":
        result = implementation.forward(engine, *arguments)
    else:
        result = getattr(implementation, kind)(engine, grad_output, *arguments)
    if isinstance(result, tuple):
        return tuple(_as_tensor(r) for r in result)
    return _as_tensor(result)


def _run_triton(
    launcher, kind, grad_output, input, target, weight, ignore_index, reduction, options
):
    """CUDA tensors: the Triton kernels (``nllloss._triton``), deterministic, no atomics."""
    flags = {
        "from_logits": options.from_logits,
        "label_smoothing": options.label_smoothing,
        "total_weight": options.total_weight,
        "check_targets": options.check_targets,
    }
    if kind == "forward":
        return launcher.forward(input, target, weight, ignore_index, reduction, **flags)[0]
    return launcher.backward(grad_output, input, target, weight, ignore_index, reduction, **flags)


def _as_tensor(result):
    # NumPy results are fresh, contiguous and owned: shared with torch, not copied
    return torch.from_numpy(result) if isinstance(result, np.ndarray) else result


def _options(total_weight, from_logits, label_smoothing, check_targets) -> _validate.Options:
    return _validate.Options(from_logits, label_smoothing, total_weight, check_targets)


@torch.library.custom_op("nllloss::nll_loss", mutates_args=())
def nll_loss_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    total_weight: torch.Tensor | None,
    from_logits: bool,
    label_smoothing: float,
    check_targets: bool,
) -> torch.Tensor:
    options = _options(total_weight, from_logits, label_smoothing, check_targets)
    return _run("forward", None, input, target, weight, ignore_index, reduction, options)


@nll_loss_op.register_fake
def _(input, target, weight, ignore_index, reduction, *options):
    layout = _layout(input, target)
    shape = layout.output_shape if reduction == "none" and not layout.unbatched else ()
    return input.new_empty(shape)


@torch.library.custom_op("nllloss::nll_loss_backward", mutates_args=())
def nll_loss_backward_op(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    total_weight: torch.Tensor | None,
    from_logits: bool,
    label_smoothing: float,
    check_targets: bool,
) -> torch.Tensor:
    options = _options(total_weight, from_logits, label_smoothing, check_targets)
    return _run("backward", grad_output, input, target, weight, ignore_index, reduction, options)


@nll_loss_backward_op.register_fake
def _(grad_output, input, target, weight, ignore_index, reduction, *options):
    return torch.empty_like(input)


@torch.library.custom_op("nllloss::nll_loss_with_unit_gradient", mutates_args=())
def nll_loss_with_unit_gradient_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    total_weight: torch.Tensor | None,
    from_logits: bool,
    label_smoothing: float,
    check_targets: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and its gradient for an upstream gradient of 1, from one pass over the
    input (for logits: the softmax is computed once, not again in the backward)."""
    options = _options(total_weight, from_logits, label_smoothing, check_targets)
    one = torch.ones((), dtype=input.dtype)
    return _run("forward_backward", one, input, target, weight, ignore_index, reduction, options)


@nll_loss_with_unit_gradient_op.register_fake
def _(input, target, weight, ignore_index, reduction, *options):
    layout = _layout(input, target)
    shape = layout.output_shape if reduction == "none" and not layout.unbatched else ()
    return input.new_empty(shape), torch.empty_like(input)


def _save_unit_gradient(ctx, inputs, output):
    _save(ctx, inputs, output)
    ctx.unit_gradient = output[1]
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else backward gets zeros of the input's size for it


def _scaled_unit_gradient(ctx, grad, _unused):
    """The gradient is linear in the upstream one: the unit gradient scaled (per element for
    'none'). Building a graph for second derivatives takes the operators' path instead."""
    if grad is None:  # nothing flows back through the loss (grads are not materialised)
        return (None,) * 9
    unit, ctx.unit_gradient = ctx.unit_gradient, None  # autograd may then keep, not copy, it
    if torch.is_grad_enabled() or unit is None:  # a graph to build, or a second backward
        return _loss_backward(ctx, grad)
    if grad.dim() == 0:
        scaled = unit if bool(grad == 1) else unit * grad.to(unit.dtype)
    else:  # 'none': one upstream value per target element, along the class axis
        scaled = unit * grad.to(unit.dtype).unsqueeze(1)
    return scaled, None, None, None, None, None, None, None, None


nll_loss_with_unit_gradient_op.register_autograd(
    _scaled_unit_gradient, setup_context=_save_unit_gradient
)


def _save(ctx, inputs, output):
    # The operators end with the same nine arguments; the backward one starts with
    # grad_output, which its own backward needs when there are options.
    input, target, weight, ignore_index, reduction, total_weight, *flags = inputs[-9:]
    ctx.save_for_backward(input, target, weight, total_weight, *inputs[:-9])
    ctx.ignore_index, ctx.reduction, ctx.flags = ignore_index, reduction, tuple(flags)


def _loss_backward(ctx, grad):
    input, target, weight, total_weight = ctx.saved_tensors
    grad_input = nll_loss_backward_op(
        grad, input, target, weight, ctx.ignore_index, ctx.reduction, total_weight, *ctx.flags
    )
    return grad_input, None, None, None, None, None, None, None, None


def _backward_backward(ctx, grad):
    input, target, weight, total_weight, grad_output = ctx.saved_tensors
    from_logits, label_smoothing, check_targets = ctx.flags
    if not from_logits and not label_smoothing:
        # The gradient is linear in grad_output and independent of the input's values:
        # d/d(grad_output) is the loss of `grad` (as torch's NllLossBackwardBackward).
        grad_grad_output = nll_loss_op(
            grad,
            target,
            weight,
            ctx.ignore_index,
            ctx.reduction,
            total_weight,
            False,
            0.0,
            check_targets,
        )
        return grad_grad_output, None, None, None, None, None, None, None, None, None
    # With options the gradient depends on the input too: differentiate the generic path's
    # torch operations, which are its formulas step for step.
    options = _options(total_weight, from_logits, label_smoothing, check_targets)
    with torch.enable_grad():
        upstream = grad_output.detach().requires_grad_()
        logits = input.detach().requires_grad_()
        layout = _layout(logits, target)
        first = _generic.backward(
            engine_for(logits),
            upstream,
            logits,
            target,
            weight,
            ctx.ignore_index,
            ctx.reduction,
            layout,
            options,
        )
        grad_upstream, grad_input = torch.autograd.grad(
            first,
            (upstream, logits),
            grad,
            create_graph=torch.is_grad_enabled(),
            materialize_grads=True,  # log-probability input: the gradient ignores its values
        )
    return grad_upstream, grad_input, None, None, None, None, None, None, None, None


nll_loss_op.register_autograd(_loss_backward, setup_context=_save)
nll_loss_backward_op.register_autograd(_backward_backward, setup_context=_save)


def _functorch_active() -> bool:
    # Custom operators' registered autograd does not compose with torch.func transforms
    # (grad, vjp, jacrev, ...); under them the generic path's plain torch ops are used.
    return torch._C._are_functorch_transforms_active()


# Below this many input elements, float32/float64 CPU tensors run torch's own kernel: its
# results are the bits our engine reproduces, and a custom operator's dispatch costs more
# than the whole call there (measured: (64, 10) forward+backward 0.14 ms through the
# operator, 0.02 ms through torch; the operator wins from (4096, 1000) on, 1.3-1.9x at
# (1048576, 10), (8, 21, 256, 256) and (8192, 32000)).
TORCH_KERNEL_MAX = 1 << 22
_SIGNED_OR_BYTE = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def forward(engine, x, t, w, ignore_index: int, reduction: str, layout, options=PLAIN):
    """See ``_generic.forward``."""
    if _functorch_active():
        return _generic.forward(engine, x, t, w, ignore_index, reduction, layout, options)
    if (
        options.plain
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and (x.numel() < TORCH_KERNEL_MAX)
    ):
        return _torch_kernel(engine, x, t, w, ignore_index, reduction, layout)
    if (
        (options.from_logits or options.label_smoothing)
        and x.requires_grad
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in _EXACT_ON_NUMPY
    ):
        # Training: the gradient comes out of the forward pass, the backward only scales it.
        return nll_loss_with_unit_gradient_op(
            x, t, w, ignore_index, reduction, *_op_options(options)
        )[0]
    return nll_loss_op(x, t, w, ignore_index, reduction, *_op_options(options))


def _op_options(options):
    """The options as the operators take them: (total_weight tensor or None, flags)."""
    return options.total_weight, options.from_logits, options.label_smoothing, options.check_targets


def _torch_kernel(engine, x, t, w, ignore_index: int, reduction: str, layout):
    """torch's own nll_loss, with our argument forms: any integer target, weight in x's dtype."""
    target = t if t.dtype in (torch.int64, torch.uint8) and x.dim() <= 2 else t.long()
    weight = None if w is None else w.to(x.dtype)
    try:
        return torch.nn.functional.nll_loss(
            x, target, weight=weight, ignore_index=ignore_index, reduction=reduction
        )
    except IndexError:  # re-raised with the core's message: value, position and range
        valid = _generic._compare(engine.xp, t, "!=", ignore_index)
        bad = valid & ((t < 0) | (t >= layout.classes))
        _generic._raise_first_bad(
            engine.xp,
            t.reshape(layout.output_shape or (1,)),
            bad.reshape(layout.output_shape or (1,)),
            layout,
            ignore_index,
        )
        raise


def backward(
    engine, grad_output, x, t, w, ignore_index: int, reduction: str, layout, options=PLAIN, out=None
):
    """See ``_generic.backward`` (``out`` is refused for torch tensors before this)."""
    if _functorch_active():
        return _generic.backward(
            engine, grad_output, x, t, w, ignore_index, reduction, layout, options
        )
    shape = layout.output_shape if reduction == "none" and not layout.unbatched else ()
    grad_output = grad_output.to(x.dtype)
    grad_output = grad_output.broadcast_to(shape) if shape else grad_output.reshape(())
    return nll_loss_backward_op(
        grad_output.contiguous(), x, t, w, ignore_index, reduction, *_op_options(options)
    )


def forward_backward(
    engine, grad_output, x, t, w, ignore_index, reduction, layout, options=PLAIN, out=None
):
    """See ``_generic.forward_backward``."""
    loss = forward(engine, x, t, w, ignore_index, reduction, layout, options)
    return loss, backward(engine, grad_output, x, t, w, ignore_index, reduction, layout, options)


total_weight = _generic.total_weight


_REDUCTION_ENUMS = {"none": 0, "mean": 1, "sum": 2}  # torch's Reduction enum
_FAST_DTYPES = (torch.float32, torch.float64)
_nll_loss_nd = torch._C._nn.nll_loss_nd  # F.nll_loss's kernel, without its Python checks
_functorch_transforms_active = torch._C._are_functorch_transforms_active


def fast_forward(input, target, weight, ignore_index, reduction):
    """The commonest torch call straight to torch's kernel, whose bits our engine reproduces.

    Float32/float64 CPU input of rank 2 or more (below ``TORCH_KERNEL_MAX`` elements when a
    gradient will be needed), an int64 (or uint8 for 2-D) CPU target tensor, no weight or a
    1-D CPU weight of the input's dtype, an int ``ignore_index``, a reduction by its name.
    Anything else, and any error torch raises, returns None: the full path then validates
    and raises nllloss's error.
    """
    enum = _REDUCTION_ENUMS.get(reduction) if type(reduction) is str else None
    if (
        enum is None
        or type(target) is not torch.Tensor
        or type(ignore_index) is not int
        or input.dtype not in _FAST_DTYPES
        or not (input.is_cpu and target.is_cpu)
        or not (target.dtype == torch.int64 or (target.dtype == torch.uint8 and input.dim() == 2))
        or input.dim() < 2
        # large inputs that need a gradient take the operator: our backward is the faster one
        or (input.numel() >= TORCH_KERNEL_MAX and input.requires_grad and torch.is_grad_enabled())
        or (
            weight is not None
            and (
                type(weight) is not torch.Tensor
                or weight.dim() != 1
                or weight.dtype != input.dtype
                or not weight.is_cpu
            )
        )
        or _functorch_transforms_active()
    ):
        return None
    try:
        return _nll_loss_nd(input, target, weight, enum, ignore_index)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None

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

import torch

from . import _generic, _validate
from ._dispatch import engine_for
from ._validate import PLAIN

_EXACT_ON_NUMPY = (torch.float16, torch.float32, torch.float64)


def _layout(input: torch.Tensor, target: torch.Tensor) -> _validate.Layout:
    return _validate.check_target(target, tuple(input.shape))


def _run(kind: str, grad_output, input, target, weight, ignore_index, reduction, options):
    """Run ``kind`` ('forward' or 'backward') on the engine for the tensors' device."""
    layout = _layout(input, target)
    if input.device.type == "cpu" and input.dtype in _EXACT_ON_NUMPY:
        arrays = [
            None if a is None else a.detach().numpy() for a in (grad_output, input, target, weight)
        ]
        if options.total_weight is not None:
            options = options._replace(total_weight=options.total_weight.detach().numpy())
        engine = engine_for(arrays[1])
        if kind == "forward":
            result = engine.implementation.forward(
                engine, *arrays[1:], ignore_index, reduction, layout, options
            )
        else:
            result = engine.implementation.backward(
                engine, *arrays, ignore_index, reduction, layout, options
            )
        return torch.from_numpy(result)  # fresh, contiguous, owned: no copy needed
    engine = engine_for(input)  # the generic engine of torch's namespace
    if kind == "forward":
        return _generic.forward(
            engine, input, target, weight, ignore_index, reduction, layout, options
        )
    return _generic.backward(
        engine, grad_output, input, target, weight, ignore_index, reduction, layout, options
    )


def _options(total_weight, from_logits: bool, label_smoothing: float) -> _validate.Options:
    return _validate.Options(from_logits, label_smoothing, total_weight)


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
) -> torch.Tensor:
    options = _options(total_weight, from_logits, label_smoothing)
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
) -> torch.Tensor:
    options = _options(total_weight, from_logits, label_smoothing)
    return _run("backward", grad_output, input, target, weight, ignore_index, reduction, options)


@nll_loss_backward_op.register_fake
def _(grad_output, input, target, weight, ignore_index, reduction, *options):
    return torch.empty_like(input)


def _save(ctx, inputs, output):
    # Both operators end with the same eight arguments; the backward one starts with
    # grad_output, which its own backward needs when there are options.
    input, target, weight, ignore_index, reduction, total_weight, *flags = inputs[-8:]
    ctx.save_for_backward(input, target, weight, total_weight, *inputs[:-8])
    ctx.ignore_index, ctx.reduction, ctx.flags = ignore_index, reduction, tuple(flags)


def _loss_backward(ctx, grad):
    input, target, weight, total_weight = ctx.saved_tensors
    grad_input = nll_loss_backward_op(
        grad, input, target, weight, ctx.ignore_index, ctx.reduction, total_weight, *ctx.flags
    )
    return grad_input, None, None, None, None, None, None, None


def _backward_backward(ctx, grad):
    input, target, weight, total_weight, grad_output = ctx.saved_tensors
    from_logits, label_smoothing = ctx.flags
    if not from_logits and not label_smoothing:
        # The gradient is linear in grad_output and independent of the input's values:
        # d/d(grad_output) is the loss of `grad` (as torch's NllLossBackwardBackward).
        grad_grad_output = nll_loss_op(
            grad, target, weight, ctx.ignore_index, ctx.reduction, total_weight, False, 0.0
        )
        return grad_grad_output, None, None, None, None, None, None, None, None
    # With options the gradient depends on the input too: differentiate the generic path's
    # torch operations, which are its formulas step for step.
    options = _options(total_weight, from_logits, label_smoothing)
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
    return grad_upstream, grad_input, None, None, None, None, None, None, None


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
    return nll_loss_op(x, t, w, ignore_index, reduction, *_op_options(options))


def _op_options(options):
    """The options as the operators take them: (total_weight tensor or None, flags)."""
    return options.total_weight, options.from_logits, options.label_smoothing


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


def fast_forward(input, target, weight, ignore_index, reduction):
    """The commonest torch call straight to torch's kernel, whose bits our engine reproduces.

    Float32/float64 CPU input below ``TORCH_KERNEL_MAX`` elements, an int64 (or uint8 for
    2-D) target tensor, no weight or a 1-D weight of the input's dtype, an int
    ``ignore_index``. Anything else, and any error torch raises, returns None: the full
    path then validates and raises nllloss's error.
    """
    if not (
        input.device.type == "cpu"
        and input.dtype in (torch.float32, torch.float64)
        and input.dim() >= 2
        and input.numel() < TORCH_KERNEL_MAX
        and type(target) is torch.Tensor
        and (target.dtype == torch.int64 or (target.dtype == torch.uint8 and input.dim() == 2))
        and target.device.type == "cpu"
        and type(ignore_index) is int
        and (
            weight is None
            or (
                type(weight) is torch.Tensor
                and weight.dim() == 1
                and weight.dtype == input.dtype
                and weight.device.type == "cpu"
            )
        )
        and not _functorch_active()
    ):
        return None
    try:
        return torch.nn.functional.nll_loss(
            input, target, weight=weight, ignore_index=ignore_index, reduction=reduction
        )
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None

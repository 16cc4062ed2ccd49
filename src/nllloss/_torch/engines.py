"""torch tensors: which engine computes a problem, and the computation on it.

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
   (``nllloss._kernels.triton.launcher_for``, which raises when ``NLLLOSS_TRITON=1`` asked
   for them and they cannot take it);
5. ``'generic'``: anything else (other devices, bfloat16 on the CPU, other options).

Differentiation for the last three: in eager mode :class:`FusedLoss` (also the loss from
hidden states'), whose tensors autograd keeps under its version counters and whose
backward, when it builds a graph, gives differentiable gradients; under ``torch.compile``
the custom operators ``nllloss::*`` (opaque to the compiler: no graph break, the target
check runs inside), with their autograd registered. Both compute through :func:`compute`.
Under ``torch.autocast`` the loss runs in float32 (:meth:`TorchBackend.autocast`). A
problem crosses an operator's schema through :func:`to_schema` and :func:`_from_schema`,
and nowhere else. Imported only when torch tensors arrive.
"""

from __future__ import annotations

import contextlib

import array_api_compat.torch as torch_namespace
import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _generic, _validate
from .._kernels import cpu, triton
from .._problem import Problem

GENERIC = _generic.Backend(torch_namespace)
EXACT_ON_NUMPY = (torch.float16, torch.float32, torch.float64)


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
    if triton.launcher_for(problem) is not None:
        return "triton"
    return "generic"


def composed(problem: Problem) -> bool:
    """torch must differentiate the loss as plain operations (see the module): under
    ``torch.func`` transforms and forward-mode AD, or probabilities that require grad."""
    return values_hidden() or _target_needs_grad(problem)


def values_hidden() -> bool:
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
TORCH_TARGETS = (torch.int64,)
_WIDENED_TARGETS = (torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32)
TORCH_KERNEL_DTYPES = (torch.float32, torch.float64)


def _torch_kernel_supports(problem: Problem) -> bool:
    """torch's own nll_loss computes the problem: plain, float32/float64 on the CPU, small
    (``TORCH_KERNEL_MAX``), a target dtype it reads or that widens exactly."""
    x = problem.input
    return (
        problem.plain
        and x.device.type == "cpu"
        and x.dtype in TORCH_KERNEL_DTYPES
        and x.numel() < TORCH_KERNEL_MAX
        and problem.target.dtype in TORCH_TARGETS + _WIDENED_TARGETS
    )


def _numpy_views_support(problem: Problem) -> bool:
    """The NumPy route on views: CPU tensors of a dtype NumPy holds, options it computes."""
    x = problem.input
    return x.device.type == "cpu" and x.dtype in EXACT_ON_NUMPY and cpu.supports(problem)


def compute(kind: str, problem: Problem, grad_output=None, out=None):
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
        backend = cpu.backend()
        problem = problem.with_arrays(numpy_view)
        grad_output = None if grad_output is None else numpy_view(grad_output)
        out = None if out is None else numpy_view(out)
    if kind == "forward":
        return as_tensor(backend.forward(problem))
    result = getattr(backend, kind)(problem, grad_output, out)
    return tuple(map(as_tensor, result)) if kind == "forward_backward" else as_tensor(result)


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


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def as_tensor(result):
    # NumPy results are fresh, contiguous and owned: shared with torch, not copied
    return torch.from_numpy(result) if isinstance(result, np.ndarray) else result


def _triton_compute(kind: str, problem: Problem, grad_output):
    """CUDA tensors: the Triton kernels (``nllloss._kernels.triton``), deterministic, no atomics."""
    launcher = triton.launcher_for(problem)
    if kind == "forward":
        return launcher.forward(problem)[0]
    if kind == "backward":
        return launcher.backward(problem, grad_output)
    # One pass writes the loss and the unit gradient; another upstream gradient scales it.
    loss, unit = launcher.forward_backward(problem)
    return loss, unit if grad_output is None else scaled(unit, grad_output)


def autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def without_autocast(device_type: str):
    """A context in which autocast does not lower the precision of our own operations (the
    loss from hidden states' product, in the float32 that ``TorchBackend.autocast`` chose)."""
    if autocast_on(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def gradient_with_the_loss(problem: Problem, chosen: str) -> bool:
    """Whether a training forward on the ``chosen`` engine also writes the gradient, so
    that the backward only scales it: from logits or smoothed (the backward would read the
    input again for the softmax) on the engines with a fused pass, NumPy's and Triton's."""
    return problem.over_rows and chosen in ("numpy", "triton")


def check_weight(problem: Problem) -> None:
    weight = problem.weight
    if weight is not None:
        _validate.check_not_differentiable(
            "weight", weight.requires_grad and torch.is_grad_enabled()
        )


def shaped_upstream(problem: Problem, grad_output: torch.Tensor) -> torch.Tensor:
    """The upstream gradient in the input's dtype and the loss's shape."""
    grad_output = grad_output.to(problem.input.dtype)
    shape = problem.loss_shape
    grad_output = grad_output.broadcast_to(shape) if shape else grad_output.reshape(())
    return grad_output.contiguous()


def torch_nll_loss(problem: Problem):
    """torch's own nll_loss, with our argument forms: any integer target of up to 32 bits,
    the weight in x's dtype; a bad target is reported by our engine's IndexError."""
    x, t = problem.input, problem.target
    if t.dtype not in TORCH_TARGETS:
        t = t.long()
    try:
        return torch.nn.functional.nll_loss(
            x, t, weight=problem.weight, ignore_index=problem.ignore_index,
            reduction=problem.reduction,
        )  # fmt: skip
    except IndexError:
        compute("forward", problem)  # raises the IndexError with value and position
        raise


def scaled(unit: torch.Tensor, grad: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The gradient is linear in the upstream one: the unit gradient scaled (per element
    along the class axis for 'none'); ``in_place`` overwrites ``unit``, ours to reuse."""
    grad = grad.to(unit.dtype)
    factor = grad if grad.dim() == 0 else grad.unsqueeze(1)
    return unit.mul_(factor) if in_place else unit * factor

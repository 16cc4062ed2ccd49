"""The route of torch tensors: the backend that ``nllloss._routes`` hands them to.

Which engine computes a problem is decided in ``nllloss._torch.engines``; the loss as a
differentiable torch function (eager and under ``torch.compile``) is
``nllloss._torch.autograd``. Imported only when torch tensors arrive.
"""

from __future__ import annotations

import array_api_compat.torch as torch_namespace
import numpy as np
import torch

from .. import _generic
from .._kernels import cpu, triton
from .._problem import Problem
from .._torch import autograd, engines

_REDUCTION_ENUMS = {"none": 0, "mean": 1, "sum": 2}  # torch's Reduction enum
_nll_loss_nd = torch._C._nn.nll_loss_nd  # F.nll_loss's kernel, without its Python checks


class TorchBackend:
    """The backend for torch tensors (see ``nllloss._routes``); results are torch tensors."""

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
            and engines.autocast_on(array.device.type)
        ):
            return array.to(torch.float32)
        return array

    def forward(self, problem: Problem):
        return autograd.differentiable_loss(problem)

    def forward_and_lse(self, problem: Problem):
        """(the loss, each element's log-sum-exp), from one pass of the fused kernels when no
        gradient is wanted; else the loss and ``log_normalizer``'s differentiable operations."""
        x = problem.input
        chosen = engines.engine(problem, torch_kernel=False)
        if (
            chosen in ("composed", "generic")
            or torch.compiler.is_compiling()
            or (x.requires_grad and torch.is_grad_enabled())
        ):
            return self.forward(problem), _generic.log_normalizer(self.xp, problem)
        engines.check_weight(problem)
        if chosen == "triton":
            loss, saved = triton.launcher_for(problem).forward(problem)
            return loss, saved.lse.reshape(problem.layout.output_shape).to(x.dtype)
        loss, lse = cpu.backend().forward_and_lse(problem.with_arrays(engines.numpy_view))
        return engines.as_tensor(loss), engines.as_tensor(lse)

    def backward(self, problem: Problem, grad_output, out=None):
        if engines.engine(problem, torch_kernel=False) == "composed":
            return engines.GENERIC.backward(problem, grad_output)
        grad_output = engines.shaped_upstream(problem, grad_output)
        if torch.compiler.is_compiling():
            return autograd.nll_loss_backward_op(grad_output, *autograd.to_schema(problem))
        return autograd.Backward.apply(grad_output, problem.input, problem)

    def forward_backward(self, problem: Problem, grad_output, out=None):
        engines.check_weight(problem)
        x = problem.input
        if (
            engines.engine(problem, torch_kernel=False) == "composed"
            or torch.compiler.is_compiling()
            or (x.requires_grad and torch.is_grad_enabled())
        ):  # the loss must be differentiable (or traced): the two calls
            return self.forward(problem), self.backward(problem, grad_output)
        grad_output = engines.shaped_upstream(problem, grad_output)
        return engines.compute("forward_backward", problem, grad_output, out)

    def total_weight(self, target, weight, ignore_index: int):
        if (
            target.device.type == "cpu"
            and (weight is None or weight.dtype in engines.EXACT_ON_NUMPY)
            and not engines.values_hidden()  # torch.func's wrapped tensors have no NumPy view,
            and not torch.compiler.is_compiling()  # nor traced ones
        ):
            # NumPy compares every integer dtype (torch's CPU kernels lack uint64 ones)
            weight = None if weight is None else engines.numpy_view(weight)
            target = engines.numpy_view(target)
            numpy_total = cpu.backend().total_weight(target, weight, ignore_index)
            return torch.from_numpy(np.asarray(numpy_total))
        return engines.GENERIC.total_weight(target, weight, ignore_index)

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
            or target.dtype not in engines.TORCH_TARGETS
            or type(ignore_index) is not int
            or input.dtype not in engines.TORCH_KERNEL_DTYPES
            or not input.is_cpu
            # large inputs that need a gradient take ours: our backward is the faster one
            or (
                input.requires_grad
                and input.numel() >= engines.TORCH_KERNEL_MAX
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

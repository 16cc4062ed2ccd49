"""torch tensors for the loss from hidden states (``_linear``): the blocks' matrix products
in torch, and the loss as a differentiable torch function.

The blocks run as for NumPy (``_linear.run``), with ``torch.matmul``/``addmm_`` into
preallocated tensors; each block's loss and gradient take the torch route of ``nll_loss``
(NumPy's kernels on zero-copy views for CPU tensors, the Triton or generic path on CUDA).

Autograd: for 'mean' and 'sum' the forward computes the gradients too, for an upstream
gradient of 1, and the backward scales them (the three products and the one pass over the
logits, once). For 'none' the upstream gradient differs per row: the backward recomputes
the blocks with it. A second backward (``retain_graph=True``) recomputes too. Under
``torch.func`` transforms and ``torch.compile``, where an ``autograd.Function`` with state
does not compose, and for probability targets that require grad, the loss is the plain
composition ``nll_loss(linear(...))``, which forms the logits. Imported only when torch
tensors arrive.
"""

from __future__ import annotations

import torch

from . import _linear
from ._torch_ops import composed, is_unit_upstream


class TorchAlgebra:
    """torch: every product into a preallocated tensor."""

    @staticmethod
    def accumulation_dtype(linear):
        return torch.float64

    @staticmethod
    def buffer(linear):
        w = linear.weight
        return w.new_empty((min(linear.chunk_rows, linear.rows), linear.outputs))

    @staticmethod
    def logits(linear, hidden, buffer):
        logits = buffer[: hidden.shape[0]]
        if linear.bias is None:
            return torch.matmul(hidden, linear.weight.T, out=logits)
        return torch.addmm(linear.bias, hidden, linear.weight.T, out=logits)

    @staticmethod
    def gradients(linear, wants, out):
        w, h = linear.weight, linear.hidden
        return (
            h.new_empty(h.shape) if wants[0] else None,
            torch.zeros_like(w) if wants[1] else None,
            torch.zeros_like(linear.bias) if linear.bias is not None and wants[2] else None,
        )

    @staticmethod
    def add(linear, grads, rows, grad, hidden):
        d_input, d_weight, d_bias = grads
        if d_weight is not None:
            d_weight.addmm_(grad.T, hidden)
        if d_bias is not None:
            d_bias += grad.sum(0)
        if d_input is not None:
            torch.matmul(grad, linear.weight, out=d_input[rows])
        return grads

    @staticmethod
    def finish(linear, grads):
        likes = (linear.input, linear.linear_weight, linear.linear_bias)
        return tuple(
            None if g is None else g.reshape(like.shape).to(like.dtype)
            for g, like in zip(grads, likes, strict=True)
        )


ALGEBRA = TorchAlgebra()


def loss(linear: _linear.Linear) -> torch.Tensor:
    """The loss, differentiable with respect to the input, weight and bias."""
    arguments = (linear.input, linear.linear_weight, linear.linear_bias)
    if composed(linear.problem) or torch.compiler.is_compiling():
        return _composed(linear)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arguments):
        return _LinearLoss.apply(*arguments, linear)
    with torch.no_grad():
        return _linear.run(linear)[0]


def _composed(linear: _linear.Linear) -> torch.Tensor:
    """The loss of the problem on the logits ``linear(input, W, b)``, formed whole: the
    torch route then differentiates it with plain torch operations."""
    problem = linear.problem
    logits = torch.nn.functional.linear(linear.hidden, linear.weight, linear.bias)
    whole = problem.replace(input=logits.reshape(problem.layout.input_shape))
    return linear.backend.forward(whole).to(linear.input.dtype)


class _LinearLoss(torch.autograd.Function):
    """The loss; for 'mean' and 'sum' the forward keeps the unit gradients."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, linear):
        ctx.linear = linear
        ctx.wants = ctx.needs_input_grad[:3]
        ctx.unit = None
        if linear.problem.elementwise:
            return _linear.run(linear)[0]
        one = torch.ones((), dtype=linear.hidden.dtype, device=linear.hidden.device)
        loss, *ctx.unit = _linear.run(linear, one, ctx.wants)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        unit, ctx.unit = ctx.unit, None  # autograd may keep, not copy, them: used once
        if unit is None:  # 'none', or a second backward: the blocks again, with grad
            _, *grads = _linear.run(ctx.linear, grad, ctx.wants)
            return (*grads, None)
        if not is_unit_upstream(grad):
            for g in unit:
                if g is not None:
                    g.mul_(grad.to(g.dtype))
        return (*unit, None)

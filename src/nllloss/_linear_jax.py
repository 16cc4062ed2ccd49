"""JAX arrays for the loss from hidden states (``_linear``): ``jax.custom_vjp`` over the
blocks, with ``lax.scan`` so that ``jit`` compiles one block, not one per block.

The forward computes the blocks' losses only; the backward makes the blocks again with
the upstream gradient (four matrix products in all, against three for NumPy and torch,
whose forward keeps the gradients: under ``jit`` a forward cannot know whether a gradient
will be asked for). Each block's loss and gradient are the generic path's
(``_generic.Backend`` on ``jax.numpy``), so a bad target under ``jit`` gives NaN as in
``nll_loss``. Imported only when JAX arrays arrive.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from . import _linear


def loss(linear: _linear.Linear):
    """The loss, differentiable (``jax.grad``, ``jax.vjp``) in the input, weight and bias."""

    @jax.custom_vjp
    def blocks(hidden, weight, bias):
        return _blocks(dataclasses.replace(linear, hidden=hidden, weight=weight, bias=bias))[0]

    def forward(hidden, weight, bias):
        return blocks(hidden, weight, bias), (hidden, weight, bias)

    def backward(saved, upstream):
        hidden, weight, bias = saved
        again = dataclasses.replace(linear, hidden=hidden, weight=weight, bias=bias)
        return _blocks(again, upstream)[1:]

    blocks.defvjp(forward, backward)
    return blocks(linear.hidden, linear.weight, linear.bias)


def _blocks(linear: _linear.Linear, upstream=None):
    """(loss, d_hidden, d_weight, d_bias) in the compute dtype (the gradients None
    without ``upstream``): the full blocks under ``lax.scan``, then the last, shorter one."""
    size, rows = linear.chunk_rows, linear.rows
    full = rows // size * size
    elementwise = linear.problem.elementwise
    if upstream is not None and elementwise:
        upstream = jnp.broadcast_to(upstream, linear.problem.loss_shape)
    carry = None
    if upstream is not None:
        carry = (
            jnp.zeros_like(linear.weight),
            None if linear.bias is None else jnp.zeros_like(linear.bias),
        )

    def step(carry, block):
        hidden, target, block_upstream = block
        logits = hidden @ linear.weight.T
        if linear.bias is not None:
            logits = logits + linear.bias
        problem = linear.block_problem(logits, target)
        if carry is None:
            return carry, (linear.backend.forward(problem), None)
        block_loss, grad = linear.backend.forward_backward(problem, block_upstream)
        grad = jnp.reshape(grad, logits.shape)
        d_weight, d_bias = carry
        d_weight = d_weight + grad.T @ hidden
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(grad, axis=0)
        return (d_weight, d_bias), (block_loss, grad @ linear.weight)

    def rows_of(array, start, stop, blocks=None):
        """Rows [start, stop) of a per-row array, split into ``blocks`` when given."""
        part = array[start:stop]
        return part if blocks is None else jnp.reshape(part, (blocks, size, *part.shape[1:]))

    def block_upstream(start, stop, blocks=None):
        if upstream is None or not elementwise:
            return (
                upstream
                if blocks is None or upstream is None
                else jnp.broadcast_to(upstream, (blocks,))
            )
        return rows_of(upstream, start, stop, blocks)

    losses, d_hidden = [], []
    if full and not linear.problem.layout.unbatched:
        blocks = full // size
        scanned = (
            rows_of(linear.hidden, 0, full, blocks),
            rows_of(linear.problem.target, 0, full, blocks),
            block_upstream(0, full, blocks),
        )
        carry, (block_losses, block_d_hidden) = lax.scan(step, carry, scanned)
        losses.append(
            jnp.reshape(block_losses, (full, *block_losses.shape[2:]))
            if elementwise
            else jnp.sum(block_losses)
        )
        if block_d_hidden is not None:
            d_hidden.append(jnp.reshape(block_d_hidden, (full, linear.hidden.shape[1])))
    if full < rows or not losses:  # the last block (or the only one, or an empty batch)
        start = 0 if linear.problem.layout.unbatched else full
        target = linear.block_target(slice(start, rows))
        carry, (block_loss, block_d_hidden) = step(
            carry, (linear.hidden[start:rows], target, block_upstream(start, rows))
        )
        losses.append(block_loss)
        if block_d_hidden is not None:
            d_hidden.append(block_d_hidden)
    loss = jnp.concatenate(losses) if elementwise else sum(losses[1:], losses[0])
    if carry is None:
        return loss, None, None, None
    return loss, jnp.concatenate(d_hidden), *carry

"""JAX arrays for the loss from hidden states (``_hidden_states``): ``jax.custom_vjp`` over the
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

from . import blocks


def loss(linear: blocks.Linear):
    """The loss, differentiable (``jax.grad``, ``jax.vjp``) in the input, weight and bias.

    Every array the blocks read is an argument of the ``custom_vjp`` function, the target,
    class weight and denominator too (with no cotangent): a function under ``jax.grad``
    of ``jax.jit`` may not close over the jit's traced arrays. With ``return_stats``, the
    statistics are computed apart (``nllloss._token_stats.jax.statistics``), without a gradient.
    """
    if linear.problem.return_stats:
        from .. import _token_stats
        from .._token_stats import jax as stats_route

        alone, statistics = _token_stats.apart(linear)
        return _token_stats.LossAndStats(loss(alone), stats_route.statistics(statistics))

    @jax.custom_vjp
    def blocks_loss(hidden, weight, bias, constants):
        return _blocks(_rebuilt(linear, hidden, weight, bias, constants))[0]

    def forward(hidden, weight, bias, constants):
        return blocks_loss(hidden, weight, bias, constants), (hidden, weight, bias, constants)

    def backward(saved, upstream):
        return (*_blocks(_rebuilt(linear, *saved), upstream)[1:], None)

    blocks_loss.defvjp(forward, backward)
    problem = linear.problem
    constants = (problem.target, problem.weight, linear.denominator)
    result = blocks_loss(linear.hidden, linear.weight, linear.bias, constants)
    return result.astype(linear.input.dtype)


def _rebuilt(linear: blocks.Linear, hidden, weight, bias, constants) -> blocks.Linear:
    """``linear`` with the arrays the ``custom_vjp`` function was given."""
    target, class_weight, denominator = constants
    problem = linear.problem.replace(target=target, weight=class_weight)
    return dataclasses.replace(
        linear, problem=problem, hidden=hidden, weight=weight, bias=bias, denominator=denominator
    )


def _blocks(linear: blocks.Linear, upstream=None):
    """(loss, d_hidden, d_weight, d_bias) in the compute dtype (the gradients None
    without ``upstream``): the full blocks under ``lax.scan``, then the last, shorter one."""
    size, rows, problem = linear.chunk_rows, linear.rows, linear.problem
    scanned = 0 if problem.layout.unbatched else rows // size * size
    per_row = upstream is not None and problem.elementwise  # cut with the rows
    if per_row:
        upstream = jnp.broadcast_to(upstream, problem.loss_shape)

    def cut(start, stop):
        """What the rows [start, stop) need: hidden states, the cut arrays of the problem
        (``Linear.block_arrays``), upstream or None."""
        rows = slice(start, stop)
        return linear.hidden[rows], linear.block_arrays(rows), upstream[rows] if per_row else None

    def step(carry, block):
        hidden, arrays, block_upstream = block
        logits = hidden @ linear.weight.T
        if linear.bias is not None:
            logits = logits + linear.bias
        block_problem = linear.block_problem(logits, arrays)
        if carry is None:
            return carry, (linear.backend.forward(block_problem), None)
        block_loss, grad = linear.backend.forward_backward(
            block_problem, block_upstream if per_row else upstream
        )
        grad = jnp.reshape(grad, logits.shape)
        d_weight, d_bias = carry
        d_weight = d_weight + grad.T @ hidden
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(grad, axis=0)
        return (d_weight, d_bias), (block_loss, grad @ linear.weight)

    carry = None
    if upstream is not None:
        d_bias = None if linear.bias is None else jnp.zeros_like(linear.bias)
        carry = (jnp.zeros_like(linear.weight), d_bias)
    losses, d_hidden = [], []
    if scanned:
        stacked = jax.tree.map(lambda a: jnp.reshape(a, (-1, size, *a.shape[1:])), cut(0, scanned))
        carry, (block_losses, block_d_hidden) = lax.scan(step, carry, stacked)
        if problem.elementwise:
            losses.append(jnp.reshape(block_losses, (scanned, *block_losses.shape[2:])))
        else:
            losses.append(jnp.sum(block_losses))
        if block_d_hidden is not None:
            d_hidden.append(jnp.reshape(block_d_hidden, (scanned, -1)))
    if scanned < rows or not losses:  # the last block (or the only one, or an empty batch)
        carry, (block_loss, block_d_hidden) = step(carry, cut(scanned, rows))
        losses.append(block_loss)
        if block_d_hidden is not None:
            d_hidden.append(block_d_hidden)
    loss = jnp.concatenate(losses) if problem.elementwise else sum(losses[1:], losses[0])
    if carry is None:
        return loss, None, None, None
    return loss, jnp.concatenate(d_hidden), *carry

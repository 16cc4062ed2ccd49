"""JAX arrays for ``linear_token_stats``: ``jax.custom_vjp`` over the blocks of rows, with
``lax.scan`` so that ``jit`` compiles one block, not one per block.

The forward makes each block's logits and its statistics (the generic engine on
``jax.numpy``); the backward makes the blocks again with the upstream gradients and the
gradient of the logits written out (``GenericEngine.backward``), then the three products.
``token_stats`` itself needs none of this: the generic composition is differentiated by
JAX. Imported only when JAX arrays arrive.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .. import _token_stats
from .._hidden_states import blocks
from .._token_stats import Stats, TokenStats, Upstream


def linear_token_stats(linear: blocks.Linear, temperature: float) -> TokenStats:
    """The statistics, differentiable (``jax.grad``, ``jax.vjp``) in the input, weight and
    bias through ``logprob``, ``entropy`` and ``lse``."""
    engine = _token_stats.generic_engine(linear.xp)

    def again(hidden, weight, bias):
        return dataclasses.replace(linear, hidden=hidden, weight=weight, bias=bias)

    @jax.custom_vjp
    def values(hidden, weight, bias):
        return _blocks(again(hidden, weight, bias), temperature, engine)[0][:3]

    def forward(hidden, weight, bias):
        return values(hidden, weight, bias), (hidden, weight, bias)

    def backward(saved, cotangents):
        return _blocks(again(*saved), temperature, engine, Upstream(*cotangents))[1:]

    values.defvjp(forward, backward)
    logprob, entropy, lse = values(linear.hidden, linear.weight, linear.bias)
    argmax = _blocks(linear, temperature, engine)[0].argmax  # (jit removes the repeat)
    dtype = linear.input.dtype
    return TokenStats(logprob.astype(dtype), entropy.astype(dtype), lse.astype(dtype), argmax)


def statistics(linear: blocks.Linear) -> TokenStats:
    """The statistics at temperature 1 without a gradient (``linear_cross_entropy``'s
    ``return_stats``), in the input's dtype."""
    result = _blocks(linear, 1.0, _token_stats.generic_engine(linear.xp))[0]
    dtype = linear.input.dtype
    values = (lax.stop_gradient(a).astype(dtype) for a in result[:3])
    return TokenStats(*values, result.argmax)


def _blocks(linear: blocks.Linear, temperature: float, engine, upstream: Upstream | None = None):
    """(TokenStats, d_hidden, d_weight, d_bias) in the compute dtype (the gradients None
    without ``upstream``): the full blocks under ``lax.scan``, then the last, shorter one."""
    size, rows = linear.chunk_rows, linear.rows
    unbatched = linear.problem.layout.unbatched
    scanned = 0 if unbatched else rows // size * size
    with_grad = upstream is not None

    def cut(start, stop):
        """The rows [start, stop): hidden states, the cut arrays of the problem
        (``Linear.block_arrays``), upstream gradients."""
        rows = slice(start, stop)
        grads = () if not with_grad else tuple(a if unbatched else a[rows] for a in upstream)
        return linear.hidden[rows], linear.block_arrays(rows), grads

    def step(carry, block):
        hidden, arrays, grads = block
        logits = hidden @ linear.weight.T
        if linear.bias is not None:
            logits = logits + linear.bias
        stats = Stats(linear.block_problem(logits, arrays), temperature)
        if not with_grad:
            return carry, (engine.forward(stats)[0], None)
        result, grad = engine.forward_backward(stats, Upstream(*grads))
        grad = jnp.reshape(grad, logits.shape)
        d_weight, d_bias = carry
        d_weight = d_weight + grad.T @ hidden
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(grad, axis=0)
        return (d_weight, d_bias), (result, grad @ linear.weight)

    carry = None
    if with_grad:
        upstream = Upstream(*(jnp.zeros(linear.problem.layout.output_shape, linear.hidden.dtype)
                              if a is None else a for a in upstream))  # fmt: skip
        d_bias = None if linear.bias is None else jnp.zeros_like(linear.bias)
        carry = (jnp.zeros_like(linear.weight), d_bias)
    parts, d_hidden = [], []
    if scanned:
        stacked = jax.tree.map(lambda a: jnp.reshape(a, (-1, size, *a.shape[1:])), cut(0, scanned))
        carry, (result, block_d_hidden) = lax.scan(step, carry, stacked)
        parts.append(TokenStats(*(jnp.reshape(a, (scanned, *a.shape[2:])) for a in result)))
        if block_d_hidden is not None:
            d_hidden.append(jnp.reshape(block_d_hidden, (scanned, -1)))
    if scanned < rows or not parts:  # the last block (or the only one, or an empty batch)
        carry, (result, block_d_hidden) = step(carry, cut(scanned, rows))
        parts.append(result)
        if block_d_hidden is not None:
            d_hidden.append(block_d_hidden)
    result = parts[0] if len(parts) == 1 else TokenStats(
        *(jnp.concatenate(column) for column in zip(*parts, strict=True)))  # fmt: skip
    if carry is None:
        return result, None, None, None
    d_hidden = jnp.concatenate(d_hidden) if len(d_hidden) > 1 else d_hidden[0]
    return result, d_hidden, *carry

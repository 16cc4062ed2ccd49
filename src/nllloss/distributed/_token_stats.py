r"""The per-token statistics of logits whose classes are sharded over the ranks of a group:
:func:`token_stats` (the shard of the logits on each rank) and :func:`linear_token_stats`
(the shard of the output layer's rows on each rank, from hidden states).

Per call, after the agreement (as the class-parallel loss's), with
:math:`z = \operatorname{cap}(x) / T` of this rank's classes, per target element::

    1. all_reduce MAX  [ m_n = max_c z[n, c] (NaN left out) ;  1 if the row holds a NaN ]
    2. all_reduce SUM  [ S_n = sum_c exp(z - m_n) ;  U_n = sum_c exp(z - m_n) (z - m_n) ;
                         z[n, y_n] - m_n on the rank owning y_n, 0 elsewhere ]
       all_reduce MAX  [ -(the first global index of m_n in this shard, or of its first
                         NaN; -inf where the shard holds neither) ]
    -> lse = m + log S,  entropy = log S - U / S,  logprob = (z_y - m) - log S,
       argmax = the smallest of the shards' first indices (the first index on ties)

as the one-device kernel's online sums (``nllloss._kernels.cpu._stats``): the same
formulas, the sums split by class. Every rank gets every statistic. The backward
communicates nothing: from the saved ``(m, log S, U / S)`` of each element and the rank's
own input,

    d/dz_c = a [c = y] - p_c (a - g + b (z_c - m - U / S)),  p_c = exp(z_c - m - log S),

(``a``, ``b``, ``g`` the upstream gradients of logprob, entropy and lse; only the owner of
``y`` adds ``a``), times the cap's slope and ``1 / T``. Every rank's upstream gradients
must be the same (each rank calls ``backward()`` on the same replicated statistics); its
gradient is that of its own classes (or rows of the weight).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from .. import _token_stats, _validate
from .._hidden_states import algebra_for, blocks
from .._routes import backend_for
from .._token_stats import TokenStats
from . import _agreement, _class_parallel

__all__ = ["linear_token_stats", "token_stats"]


def token_stats(
    input_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    group: Any = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> TokenStats:
    r"""The per-token statistics of logits whose classes are sharded over ``group``.

    Rank :math:`r` holds the classes :math:`[s_r, s_r + C_r)` of the logits (axis 1, or
    axis 0 unbatched; ``class_start`` :math:`= s_r`), every rank the whole target. The
    result, on every rank, is :func:`nllloss.token_stats` of the gathered logits:
    ``logprob`` of the target (0 where ignored), ``entropy``, ``lse`` over all
    :math:`C = \sum_r C_r` classes and ``argmax``, a global class index (the first one
    on ties, across shards too). Differentiable (torch autograd) through ``logprob``,
    ``entropy`` and ``lse`` with respect to ``input_shard``, for this rank's classes; the
    backward communicates nothing.

    Parameters
    ----------
    input_shard : torch.Tensor
        This rank's classes of the logits: ``(C_r,)``, ``(N, C_r)`` or
        ``(N, C_r, d1, ..., dK)``; float16, bfloat16 (computed in float32), float32 or
        float64.
    target : torch.Tensor
        Global class indices in ``[0, C)`` or ``ignore_index``, the same on every rank.
    class_start : int
        The first class of this rank's shard.
    group : torch.distributed.ProcessGroup, optional
        Default: the whole world.
    temperature, softcap, ignore_index
        As in :func:`nllloss.token_stats`, the same on every rank.

    Returns
    -------
    TokenStats
        The same on every rank, of the target's shape; the first three in the input's
        dtype, ``argmax`` int64.

    Raises
    ------
    As :func:`nllloss.token_stats` and :func:`nllloss.distributed.nll_loss` (shards that
    do not tile ``[0, C)``, an argument that differs between ranks), on every rank alike.

    Notes
    -----
    Per call, with N target elements: the agreement (an all-gather of one row per rank),
    then an all-reduce of 2N + 1 values, one of 3N + 1 and one of N + 1 (float64), as in
    the module's docstring. A row holding a NaN gives NaN statistics and, as torch's, the
    index of its first NaN. Second-order gradients are refused with a RuntimeError.

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> from nllloss import distributed
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    >>> s = distributed.token_stats(z, torch.tensor([0, -100]), class_start=0)
    >>> s.logprob
    tensor([-0.2395,  0.0000], grad_fn=<_ShardedStatsBackward>)
    >>> s.argmax
    tensor([0, 0])
    >>> dist.destroy_process_group()
    """
    error, shard = None, None
    try:
        _validate.check_torch_tensor(input_shard, "input_shard")
        temperature = _validate.check_temperature(temperature)
        shard = _local_shard(input_shard, target, class_start, ignore_index, softcap)
    except Exception as exc:  # raised by the agreement, on every rank
        error = exc
    extra = (("temperature", temperature),)
    shard = _agreed(shard, error, group, "token_stats", _agreement.device_of(input_shard), extra)
    return TokenStats(*_ShardedStats.apply(shard.problem.input, shard, temperature, group))


def _local_shard(input, target, class_start, ignore_index, softcap, logits_shape=None):
    """The checks that need no other rank: the shard of the logits' problem (its layout
    counts this rank's classes, which may be none)."""
    class_start = _validate.check_class_start(class_start)
    backend = backend_for(input)
    if logits_shape is None:
        _validate.check_input(input)
    problem = _token_stats.stats_problem(
        backend, input, target, ignore_index, softcap, logits_shape, needs_classes=False
    )
    return _class_parallel.Shard(problem, class_start)


def _agreed(shard, error, group, function: str, device, extra) -> _class_parallel.Shard:
    """The class-parallel agreement, and a class at least over the group."""
    shard, _ = _class_parallel.agreed(shard, error, group, function, device, extra)
    _validate.check_classes_for_stats(shard.classes)
    return shard


def _shifted(shard: _class_parallel.Shard, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z = cap(x) / T`` of the shard as (B, C_r, S) in the compute dtype."""
    layout = shard.layout
    z = x.detach().reshape(layout.batch, layout.classes, layout.spatial).to(shard.compute_dtype)
    if shard.problem.softcap is not None:
        z = _class_parallel.capped_logits(z, shard.problem.softcap)
    return z / temperature if temperature != 1.0 else z


def _exchange(shard: _class_parallel.Shard, x: torch.Tensor, temperature: float, group):
    """Steps 1 and 2 of the module's docstring for the logits ``x`` of the shard:
    ``(TokenStats, saved)`` in the compute dtype, ``saved`` = (m, log S, U / S) per
    element, (B, S) each. A rank that fails between the collectives sends zeros and a
    flag, and every rank raises."""
    layout, problem = shard.layout, shard.problem
    shape = (layout.batch, layout.spatial)
    device = x.device
    error = None
    try:
        z = _shifted(shard, x, temperature)
        nan = torch.isnan(z)
        masked = torch.where(nan, -math.inf, z)
        top = masked.amax(1) if layout.classes else z.new_full(shape, -math.inf)
        parts = [top, nan.any(1).to(z.dtype)]
    except Exception as exc:
        error = exc
        parts = [torch.zeros(shape, dtype=shard.compute_dtype, device=device)] * 2
    top, has_nan = _agreement.all_reduce(parts, dist.ReduceOp.MAX, group, error)
    try:
        d = z - top.unsqueeze(1)
        e = d.exp()
        weighted = torch.where(e > 0, e * d, 0)  # 0, not 0 * -inf
        t = problem.target.reshape(shape).to(torch.int64)
        valid = t != problem.ignore_index
        local = t - shard.class_start
        owned = valid & (local >= 0) & (local < layout.classes)
        if layout.classes:
            picked = d.gather(1, torch.where(owned, local, 0).unsqueeze(1)).squeeze(1)
        else:
            picked = torch.zeros_like(top)
        parts = [e.sum(1), weighted.sum(1), torch.where(owned, picked, 0)]
    except Exception as exc:
        error = exc
        parts = [torch.zeros_like(top)] * 3
    total, weighted_total, at_target = _agreement.all_reduce(parts, dist.ReduceOp.SUM, group, error)
    try:  # the first index of the maximum (of the first NaN in a row holding one), globally
        hit = torch.where(has_nan.unsqueeze(1) > 0, nan, masked == top.unsqueeze(1))
        classes = torch.arange(layout.classes, device=device, dtype=torch.float64)
        first = torch.where(hit, classes.view(1, -1, 1) + shard.class_start, math.inf)
        first = first.amin(1) if layout.classes else torch.full(shape, math.inf, device=device)
        parts = [-first.to(torch.float64)]
    except Exception as exc:
        error = exc
        parts = [torch.zeros(shape, dtype=torch.float64, device=device)]
    (first,) = _agreement.all_reduce(parts, dist.ReduceOp.MAX, group, error)
    log_norm = total.log()
    mean_shift = weighted_total / total
    logprob = torch.where(valid, at_target - log_norm, 0)
    result = TokenStats(logprob, log_norm - mean_shift, top + log_norm, (-first).to(torch.int64))
    return result, (top, log_norm, mean_shift)


def _gradient(shard, z, saved, upstream, temperature, x=None) -> torch.Tensor:
    """The gradient with respect to the shard's logits (B, C_r, S), in the compute dtype,
    from the saved per-element values (the module's docstring); ``x``: the input, for the
    cap's slope."""
    layout, problem = shard.layout, shard.problem
    top, log_norm, mean_shift = saved

    def per_element(a):
        return torch.zeros_like(top) if a is None else a.reshape(top.shape).to(top.dtype)

    a, b, g = (per_element(u) for u in upstream)
    t = problem.target.reshape(layout.batch, layout.spatial).to(torch.int64)
    valid = t != problem.ignore_index
    a = torch.where(valid, a, 0)
    d = z - top.unsqueeze(1)
    p = (d - log_norm.unsqueeze(1)).exp()
    grad = -p * ((a - g).unsqueeze(1) + b.unsqueeze(1) * (d - mean_shift.unsqueeze(1)))
    grad = torch.where(p > 0, grad, 0)
    local = t - shard.class_start
    owned = valid & (local >= 0) & (local < layout.classes)
    if layout.classes:
        grad.scatter_add_(1, torch.where(owned, local, 0).unsqueeze(1),
                          torch.where(owned, a, 0).unsqueeze(1))  # fmt: skip
    if problem.softcap is not None:
        capped = _class_parallel.capped_logits(
            x.detach().reshape(grad.shape).to(grad.dtype), problem.softcap
        )
        grad = grad * (1 - (capped / problem.softcap).square())
    return grad / temperature if temperature != 1.0 else grad


def _in_dtype(result: TokenStats, dtype) -> TokenStats:
    return TokenStats(*(a.to(dtype) for a in result[:3]), result.argmax)


class _ShardedStats(torch.autograd.Function):
    """The statistics of a logits shard; the backward reads the input again (saved with
    ``save_for_backward``) and the per-element ``(m, log S, U / S)``."""

    @staticmethod
    def forward(ctx, input_shard, shard, temperature, group):
        result, saved = _exchange(shard, input_shard, temperature, group)
        ctx.save_for_backward(input_shard, shard.problem.target, *saved)
        ctx.shard = dataclasses.replace(
            shard, problem=_class_parallel.without_arrays(shard.problem)
        )
        ctx.temperature = temperature
        shape = shard.layout.output_shape
        result = TokenStats(*(a.reshape(shape) for a in _in_dtype(result, shard.dtype)))
        ctx.mark_non_differentiable(result.argmax)
        ctx.set_materialize_grads(False)
        return tuple(result)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, grad_lse, _grad_argmax):
        input_shard, target, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            raise _class_parallel.second_order_error("token_stats")
        upstream = (grad_logprob, grad_entropy, grad_lse)
        if all(u is None for u in upstream):
            return None, None, None, None
        shard = dataclasses.replace(
            ctx.shard, problem=ctx.shard.problem.replace(input=input_shard, target=target)
        )
        z = _shifted(shard, input_shard, ctx.temperature)
        grad = _gradient(shard, z, saved, upstream, ctx.temperature, input_shard)
        return grad.reshape(input_shard.shape).to(input_shard.dtype), None, None, None


def linear_token_stats(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    group: Any = None,
    linear_bias_shard: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> TokenStats:
    r"""The per-token statistics of a linear layer's logits with the vocabulary sharded
    over the ranks of ``group``, without forming the logits.

    Rank :math:`r` holds the rows :math:`[s_r, s_r + C_r)` of the output layer's weight
    (and bias), every rank the same ``input`` and ``target``. The result, on every rank,
    is :func:`nllloss.linear_token_stats` with the whole weight. Each block of rows (as in
    :func:`nllloss.linear_token_stats`) makes this rank's logits and goes through the
    exchange of :func:`token_stats` (O(rows) values per block); nothing of size N x C or
    N x C_r exists. Differentiable through ``logprob``, ``entropy`` and ``lse``: the
    backward opens with an agreement on the upstream gradients (every rank must call it),
    makes the blocks again (a fourth matrix product), keeps the gradients of the weight and
    bias shards on their rank and all-reduces that of the input (N x D) over ``group``.

    Parameters
    ----------
    input : torch.Tensor
        Hidden states, ``(D,)`` or ``(N, D)``, the same on every rank.
    linear_weight_shard : torch.Tensor
        This rank's rows of the weight, ``(C_r, D)``, the input's dtype.
    target : torch.Tensor
        Global class indices: ``()`` for unbatched input, else ``(N,)``.
    class_start : int
        The first class of this rank's shard.
    group : torch.distributed.ProcessGroup, optional
    linear_bias_shard : torch.Tensor, optional
        This rank's part of the bias, ``(C_r,)``.
    temperature, softcap, ignore_index, chunk_rows
        As in :func:`nllloss.linear_token_stats`.

    Returns
    -------
    TokenStats
        The same on every rank.

    Raises
    ------
    As :func:`token_stats` and :func:`nllloss.distributed.linear_cross_entropy`.

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> from nllloss import distributed
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> distributed.linear_token_stats(h, W, torch.tensor([0, 1]), class_start=0).argmax
    tensor([0, 1])
    >>> dist.destroy_process_group()
    """
    error, shard, requires_grad = None, None, False
    try:
        for name, value in (("input", input), ("linear_weight_shard", linear_weight_shard)):
            _validate.check_torch_tensor(value, name)
        logits_shape = _validate.check_linear(input, linear_weight_shard, linear_bias_shard)
        if linear_weight_shard.dim() != 2:
            raise ValueError(
                "linear_weight_shard must have shape (C_r, in_features), got shape "
                f"{tuple(linear_weight_shard.shape)}"
            )
        temperature = _validate.check_temperature(temperature)
        chunk_rows = _validate.check_chunk_rows(chunk_rows)
        shard = _local_shard(input, target, class_start, ignore_index, softcap, logits_shape)
        requires_grad = torch.is_grad_enabled() and any(
            a is not None and a.requires_grad
            for a in (input, linear_weight_shard, linear_bias_shard)
        )
    except Exception as exc:  # raised by the agreement, on every rank
        error = exc
    extra = (
        ("input", input if shard is not None else None),  # the hidden states, not sharded
        ("chunk_rows", chunk_rows),
        ("temperature", temperature),
        ("input.requires_grad", requires_grad and input.requires_grad),
    )
    device = _agreement.device_of(input)
    shard = _agreed(shard, error, group, "linear_token_stats", device, extra)
    rows = int(input.shape[0]) if input.ndim == 2 else 1
    linear = blocks.assemble(
        backend_for(input), shard.problem, input, linear_weight_shard, linear_bias_shard,
        chunk_rows or blocks.chunk_rows_for(rows), None, algebra_for(input),
    )  # fmt: skip
    shard = dataclasses.replace(shard, problem=linear.problem)
    if requires_grad:
        return TokenStats(*_ShardedLinearStats.apply(
            input, linear_weight_shard, linear_bias_shard, linear, shard, temperature, group
        ))  # fmt: skip
    with torch.no_grad():
        return _linear_blocks(linear, shard, temperature, group)[0]


def _block_shard(linear, shard, rows: slice, logits) -> _class_parallel.Shard:
    return dataclasses.replace(
        shard, problem=linear.block_problem(logits, linear.block_arrays(rows))
    )


def _logits(linear, rows: slice) -> torch.Tensor:
    hidden = linear.hidden[rows]
    if linear.bias is None:
        return hidden @ linear.weight.T
    return torch.addmm(linear.bias, hidden, linear.weight.T)


def _linear_blocks(linear, shard, temperature, group):
    """(TokenStats in the input's dtype, saved (m, log S, U / S) of every row)."""
    parts, saved = [], []
    for rows in linear.blocks():
        block = _block_shard(linear, shard, rows, _logits(linear, rows))
        result, block_saved = _exchange(block, block.problem.input, temperature, group)
        parts.append(result)
        saved.append(block_saved)
    result = TokenStats(
        *(torch.cat([r.reshape(-1) for r in column]) for column in zip(*parts, strict=True))
    )
    shape = linear.problem.layout.output_shape
    result = TokenStats(*(a.reshape(shape) for a in _in_dtype(result, linear.input.dtype)))
    return result, [torch.cat([s[i].reshape(-1) for s in saved]) for i in range(3)]


class _ShardedLinearStats(torch.autograd.Function):
    """The statistics of the blocks; the backward makes the blocks again with the upstream
    gradients (saved: the arguments, with ``save_for_backward``, and each row's
    ``(m, log S, U / S)``)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, linear, shard, temperature, group):
        result, saved = _linear_blocks(linear, shard, temperature, group)
        ctx.save_for_backward(input, linear_weight, linear_bias, *saved)
        ctx.linear, ctx.shard, ctx.temperature, ctx.group = linear, shard, temperature, group
        ctx.mark_non_differentiable(result.argmax)
        ctx.set_materialize_grads(False)
        return tuple(result)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, grad_lse, _grad_argmax):
        error = None
        try:
            input, linear_weight, linear_bias, *saved = ctx.saved_tensors
            if torch.is_grad_enabled():
                raise _class_parallel.second_order_error("linear_token_stats")
        except Exception as exc:
            error = exc
        upstream = (grad_logprob, grad_entropy, grad_lse)
        _agreement.agree(
            "the backward of linear_token_stats", ctx.group, ctx.linear.hidden.device,
            error, (), tuple((name, u) for name, u in zip(
                ("the upstream gradient of logprob", "of entropy", "of lse"), upstream, strict=True
            )),
        )  # fmt: skip
        linear, shard = ctx.linear, ctx.shard
        wants = ctx.needs_input_grad[:3]
        d_input = torch.zeros_like(linear.hidden) if wants[0] else None
        d_weight = torch.zeros_like(linear.weight) if wants[1] else None
        d_bias = torch.zeros_like(linear.bias) if linear.bias is not None and wants[2] else None
        flat = [None if u is None else u.reshape(-1) for u in upstream]
        for rows in linear.blocks():
            logits = _logits(linear, rows)
            block = _block_shard(linear, shard, rows, logits)
            block_saved = [s[rows].reshape(-1, 1) for s in saved]  # (B, S): S is 1
            block_upstream = [None if u is None else u[rows] for u in flat]
            z = _shifted(block, logits, ctx.temperature)
            grad = _gradient(block, z, block_saved, block_upstream, ctx.temperature, logits)
            grad = grad.reshape(logits.shape)
            if d_input is not None:
                d_input[rows] = grad @ linear.weight
            if d_weight is not None:
                d_weight.addmm_(grad.T, linear.hidden[rows])
            if d_bias is not None:
                d_bias += grad.sum(0)
        if d_input is not None:
            dist.all_reduce(d_input, group=ctx.group)
        likes = (input, linear_weight, linear_bias)
        grads = tuple(
            None if g is None else g.reshape(like.shape).to(like.dtype)
            for g, like in zip((d_input, d_weight, d_bias), likes, strict=True)
        )
        return (*grads, None, None, None, None)

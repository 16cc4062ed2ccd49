"""The vocabulary-parallel loss from hidden states: :func:`linear_cross_entropy` with the
output layer's rows sharded over the ranks of a group, its blocks of rows through the
class-parallel loss."""

from __future__ import annotations

import dataclasses
from typing import Any

import array_api_compat.torch
import torch
import torch.distributed as dist

from .. import _options, _validate
from .._builder import build
from .._hidden_states import blocks
from .._hidden_states import torch as hidden_states_torch
from .._problem import Problem
from .._routes import backend_for
from .._torch.autograd import is_unit_upstream
from . import _agreement, _class_parallel

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    group: Any = None,
    linear_bias_shard: torch.Tensor | None = None,
    weight: Any = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    total_weight: Any = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    r"""The loss from hidden states with the vocabulary sharded over the ranks of ``group``.

    Rank :math:`r` holds the rows :math:`[s_r, s_r + C_r)` of the output layer's weight
    (``linear_weight_shard``, :math:`(C_r, D)`, and its bias), every rank the same
    ``input`` and ``target``. The result, on every rank, is
    :func:`nllloss.linear_cross_entropy` with the whole weight:
    ``cross_entropy(input @ W.T + b, target)``. Each block of rows (as in
    :func:`nllloss.linear_cross_entropy`) makes this rank's logits ``input[r] @ W_r.T`` and
    goes through :func:`nll_loss` with ``from_logits=True`` (its collectives: O(rows) values
    per block); nothing of size N x C exists anywhere, nor N x C_r. The gradient of the
    weight and bias shards stays on their rank; that of the input, a sum over the shards,
    is all-reduced over ``group`` (one all-reduce of N x D), so every rank gets the whole
    of it, as for a replicated input.

    Parameters
    ----------
    input : torch.Tensor
        Hidden states, ``(D,)`` or ``(N, D)``, the same on every rank.
    linear_weight_shard : torch.Tensor
        This rank's rows of the weight, ``(C_r, D)``, the input's dtype.
    target : torch.Tensor
        Global class indices, as for :func:`nll_loss`.
    class_start : int
        The first class of this rank's shard.
    group : torch.distributed.ProcessGroup, optional
    linear_bias_shard : torch.Tensor, optional
        This rank's part of the bias, ``(C_r,)``.
    weight, reduction, label_smoothing, total_weight
        As in :func:`nll_loss` (``weight``: all C class weights).
    ignore_index : int or None, default -100
        None means -100, as in torch's ``linear_cross_entropy``.
    chunk_rows : int, optional
        As in :func:`nllloss.linear_cross_entropy`.

    Returns
    -------
    torch.Tensor
        The same on every rank, as :func:`nll_loss` returns it.

    Notes
    -----
    One agreement per call (as :func:`nll_loss`'s, on the input, the target, the weight,
    every option, ``chunk_rows`` and whether the input requires a gradient): its SHA-256
    digests read the input's N x D values on the host once per call. A bad target is
    reported at its place in the whole target. Without ``chunk_rows``, every rank takes
    the rows per block that the largest shard would (so that the ranks' blocks pair up).
    For 'mean' and 'sum' the forward computes the gradients too and the backward
    communicates nothing; for 'none' (or a second backward) the backward computes the
    blocks again, opening with an agreement on the upstream gradient: every rank must call
    it. Class indices only (``z_loss`` and ``softcap`` are not available here);
    second-order gradients are refused with a RuntimeError.

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> from nllloss import distributed
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    >>> W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> distributed.linear_cross_entropy(h, W, torch.tensor([0, 1]), class_start=0)
    tensor(0.3955, grad_fn=<_VocabularyParallelLossBackward>)
    >>> dist.destroy_process_group()
    """
    options = _options.given(locals())
    error, shard, requires_grad = None, None, False
    try:
        shard, chunk_rows = _local_shard(
            input, linear_weight_shard, target, linear_bias_shard, class_start, weight,
            ignore_index, reduction, options, chunk_rows,
        )  # fmt: skip
        requires_grad = torch.is_grad_enabled() and any(
            a is not None and a.requires_grad
            for a in (input, linear_weight_shard, linear_bias_shard)
        )
    except Exception as exc:  # raised by the agreement, on every rank
        error = exc
    extra = (
        ("input", input if shard is not None else None),  # the hidden states, not sharded
        ("chunk_rows", chunk_rows),
        # whether the input's gradient (summed over the ranks) is all-reduced
        ("input.requires_grad", requires_grad and input.requires_grad),
    )
    shard, _ = _class_parallel.agreed(
        shard, error, group, "linear_cross_entropy", _agreement.device_of(input), extra
    )
    problem = shard.problem
    rows = int(input.shape[0]) if input.ndim == 2 else 1
    if chunk_rows is None:  # the same blocks on every rank: the rule reads the rows only
        chunk_rows = blocks.chunk_rows_for(rows)
    linear = blocks.assemble(
        _ShardBackend(shard, group), problem, input, linear_weight_shard, linear_bias_shard,
        chunk_rows, blocks.denominator_of(backend_for(input), shard.whole), _ShardAlgebra(group),
    )  # fmt: skip
    if requires_grad:
        return _VocabularyParallelLoss.apply(
            input, linear_weight_shard, linear_bias_shard, linear, group
        )
    with torch.no_grad():
        return blocks.run(linear)[0]


# linear_cross_entropy is two frames above the checks: warnings point at its caller.
_CALLER = 3


def _local_shard(
    input, linear_weight_shard, target, linear_bias_shard, class_start, weight, ignore_index,
    reduction, options: dict, chunk_rows,
) -> tuple[_class_parallel.Shard, int | None]:  # fmt: skip
    """Every check that needs no other rank: the shard of the whole logits' problem (its
    input the hidden states, its layout that of this rank's logits), and ``chunk_rows``."""
    for name, value in (("input", input), ("linear_weight_shard", linear_weight_shard)):
        _validate.check_torch_tensor(value, name)
    logits_shape = _validate.check_linear(input, linear_weight_shard, linear_bias_shard)
    if linear_weight_shard.dim() != 2:
        raise ValueError(
            "linear_weight_shard must have shape (C_r, in_features), got shape "
            f"{tuple(linear_weight_shard.shape)}"
        )
    reduction = _validate.check_reduction(reduction, stacklevel=_CALLER)
    class_start = _validate.check_class_start(class_start)
    engine, problem = build(
        input, target, None, -100 if ignore_index is None else ignore_index, reduction,
        {**options, "from_logits": True}, logits_shape=logits_shape,
    )  # fmt: skip
    _class_parallel.check_supported(problem)
    if problem.probabilities:
        raise TypeError(
            "target must hold class indices of an integer dtype (the loss over sharded classes "
            f"takes no class probabilities), got dtype {problem.target.dtype}"
        )
    problem = _class_parallel.with_weight(engine, problem, weight)
    return _class_parallel.Shard(problem, class_start), _validate.check_chunk_rows(chunk_rows)


class _VocabularyParallelLoss(torch.autograd.Function):
    """The loss; for 'mean' and 'sum' the forward keeps the unit gradients (and all-reduces
    the input's), so that the backward only scales them. The arguments are saved with
    ``save_for_backward``: one changed in place before the backward is detected."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, linear, group):
        ctx.linear, ctx.group = linear, group
        ctx.wants = ctx.needs_input_grad[:3]
        ctx.unit = None
        ctx.save_for_backward(input, linear_weight, linear_bias)
        if linear.problem.elementwise:
            return blocks.run(linear)[0]
        one = torch.ones((), dtype=linear.hidden.dtype, device=linear.hidden.device)
        loss, *ctx.unit = blocks.run(linear, one, ctx.wants)
        return loss

    @staticmethod
    def backward(ctx, grad):
        unit, ctx.unit = ctx.unit, None  # autograd may keep, not copy, them: used once
        error = None
        try:
            ctx.saved_tensors  # noqa: B018 (torch checks their versions here)
            if torch.is_grad_enabled():
                raise _class_parallel.second_order_error("linear_cross_entropy")
        except Exception as exc:
            error = exc
        if unit is not None:  # nothing to communicate
            if error is not None:
                raise error
            if not is_unit_upstream(grad):
                for g in unit:
                    if g is not None:
                        g.mul_(grad.to(g.dtype))
            return (*unit, None, None)
        # 'none', or a second backward: the blocks again, with grad, on every rank
        _agreement.agree(
            "the backward of linear_cross_entropy", ctx.group, grad.device, error, (),
            (("the upstream gradient", grad),),
        )  # fmt: skip
        _, *grads = blocks.run(ctx.linear, grad, ctx.wants)
        return (*grads, None, None)


class _ShardBackend:
    """A block's loss (and its logits' gradient) by the class-parallel loss of the agreed
    ``shard``: the block's problem replaces the shard's, whole."""

    xp = array_api_compat.torch

    def __init__(self, shard: _class_parallel.Shard, group: Any) -> None:
        self.shard, self.group = shard, group

    def forward(self, problem: Problem) -> torch.Tensor:
        return _class_parallel.loss(dataclasses.replace(self.shard, problem=problem), self.group)

    def forward_backward(self, problem: Problem, grad_output, out=None):
        """(loss, gradient of the block's logits): autograd through the class-parallel loss,
        whose backward communicates nothing."""
        with torch.enable_grad():
            logits = problem.input.detach().requires_grad_()
            loss = self.forward(problem.replace(input=logits))
            (grad,) = torch.autograd.grad(loss, logits, grad_output.to(loss.dtype))
        return loss.detach(), grad


class _ShardAlgebra(hidden_states_torch.TorchAlgebra):
    """torch's products, and the input's gradient summed over the shards' ranks."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def finish(self, linear, grads):
        if grads[0] is not None:
            dist.all_reduce(grads[0], group=self.group)
        return super().finish(linear, grads)

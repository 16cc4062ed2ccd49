"""The data-parallel 'mean' denominator: :func:`total_weight` over the ranks of a group."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _validate
from .._loss import total_weight as _local_total_weight
from . import _agreement

__all__ = ["total_weight"]


def total_weight(
    target: torch.Tensor, weight: Any = None, ignore_index: int = -100, *, group: Any = None
) -> torch.Tensor:
    r"""The 'mean' denominator of a batch spread over the ranks of ``group``.

    .. math:: W = \sum_{\text{ranks}} \sum_{n:\, y_n \ne ii} w_{y_n}

    (without ``weight``, the count of non-ignored target elements): :func:`nllloss.total_weight`
    of each rank's target, all-reduced. Passing ``total_weight=W`` to each rank's (and each
    micro-batch's) 'mean' loss makes their sum the loss of the whole batch, and their
    gradients its gradient.

    Parameters
    ----------
    target : torch.Tensor
        This rank's class indices, any shape and integer dtype; all of a rank's
        micro-batches may be concatenated into one.
    weight : torch.Tensor or sequence, optional
        The class weights (1-D), the same on every rank.
    ignore_index : int, default -100
    group : torch.distributed.ProcessGroup, optional
        The ranks sharing the batch (data-parallel ranks); default: the whole world.

    Returns
    -------
    torch.Tensor
        0-d, on the target's device, the same on every rank: in the weight's dtype (the
        ranks' sums are added in float64 and rounded once), or int64 without weight.

    Raises
    ------
    IndexError, ValueError, TypeError
        As :func:`nllloss.total_weight`, on every rank when any rank's arguments fail (the
        others name that rank); ValueError when ``weight`` or ``ignore_index`` differs
        between ranks.

    Notes
    -----
    One all-gather of a small fixed-size row per rank (the agreement of
    ``nllloss.distributed``: the local total, and digests of ``weight`` and
    ``ignore_index``, which must be the same on every rank). Every rank adds the gathered
    totals in rank order: the result is the same on every rank, bit for bit, and an
    all-ignored rank contributes 0.

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> from nllloss import distributed
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> distributed.total_weight(torch.tensor([0, 2, -100, 2]))
    tensor(3)
    >>> distributed.total_weight(torch.tensor([0, 2, -100]), weight=torch.tensor([0.5, 1.0, 2.0]))
    tensor(2.5000)
    >>> dist.destroy_process_group()
    """
    local, error, arguments = None, None, ()
    try:
        _validate.check_torch_tensor(target, "target")
        local = _local_total_weight(target, weight, ignore_index)
        arguments = (("weight", None if weight is None else torch.as_tensor(weight)),
                     ("ignore_index", ignore_index))  # fmt: skip
    except Exception as exc:  # raised by the agreement, on every rank
        error = exc
    # The local total's bits: an int64 count, or the float64 weight sum.
    exact = torch.int64 if weight is None else torch.float64
    bits = 0 if local is None else int(local.to(exact).view(torch.int64))
    peers = _agreement.agree(
        "total_weight", group, _agreement.device_of(target), error, (bits,), arguments
    )
    _agreement.check_same(peers, [name for name, _ in arguments])
    totals = torch.tensor([peer.values[0] for peer in peers], dtype=torch.int64).view(exact)
    total = (
        totals.sum() if weight is None else torch.tensor(math.fsum(totals.tolist()), dtype=exact)
    )
    return total.to(device=target.device, dtype=local.dtype)

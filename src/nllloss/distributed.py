r"""Training at scale on ``torch.distributed``: a global mean, and a class-parallel loss.

``total_weight`` all-reduces the 'mean' denominator :math:`\sum_n w_{y_n}` of a batch spread
over ranks (and micro-batches): passed as ``total_weight=`` to every piece's loss, it makes the
pieces' losses and gradients add up to those of the whole batch, whatever each piece ignores or
weighs.

``nll_loss`` computes the loss of an input whose class axis is sharded over the ranks of a
group (a vocabulary-parallel language-model head): rank :math:`r` holds the classes
:math:`[s_r, s_r + C_r)` of every row, and every rank the whole target. Per step::

    1. all_gather  (s_r, C_r, fingerprints of the other arguments)       O(ranks) values
       -> C = sum C_r; the shards tile [0, C); the arguments agree across ranks;
          the weight (length C) and the target values are checked against C
    from log-probabilities x:
    2. all_reduce SUM  [ x[n, y_n] on the rank owning y_n, 0 elsewhere ;
                         sum_{c in shard} w_c x[n, c]  (label smoothing only) ]        O(N)
    from logits x (Megatron-LM's vocabulary-parallel cross-entropy, with weights; with
    softcap, x is the capped shard c tanh(x / c), computed locally):
    2. all_reduce MAX  m_n = max_c x[n, c]                                             O(N)
    3. all_reduce SUM  [ sum_{c in shard} exp(x[n, c] - m_n) ;  x[n, y_n] - m_n  (owner) ;
                         sum_{c in shard} w_c (x[n, c] - m_n)  (label smoothing only) ]  O(N)
       -> log p[n, y_n] = (x[n, y_n] - m_n) - log Z_n,  lse_n = m_n + log Z_n  (z_loss)
          sum_c w_c log p[n, c] = sum_c w_c (x[n, c] - m_n) - (sum_c w_c) log Z_n
    4. each rank reduces the same N values: the same loss, bit for bit, on every rank.

With class probabilities, each rank holds its classes of them (the input shard's shape),
and the target's term ``x[n, y_n]`` becomes the shard's ``sum_c w_c p[n, c] x[n, c]``
(from logits also ``sum_c w_c p[n, c]``, one more N values in step 3).

N counts target elements (rows times spatial positions). Nothing of size N x C crosses the
network. The backward pass communicates nothing: the gradient of the shard is written from
the target, :math:`Z_n` and, from logits, the shard's :math:`\exp(x - m_n)` kept from the
forward (one buffer of the shard's size, as torch keeps its log-softmax). It is a
torch.autograd.Function with an explicit backward: differentiable collectives would
all-reduce again in the backward and, as every rank calls ``backward()`` on the same
replicated loss, sum the gradient over the ranks.

A check that fails on one rank raises on every rank (with that rank's error), instead of
leaving the others waiting in a collective. Imported on first use of
``nllloss.distributed``; it imports torch.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import array_api_compat.torch
import torch
import torch.distributed as dist

from . import _generic, _linear, _linear_torch, _options, _validate
from ._dispatch import backend_for, like_input
from ._loss import total_weight as _local_total_weight
from ._problem import Layout, Problem, layout_of, mean_denominator, resolved_reduction

__all__ = ["linear_cross_entropy", "nll_loss", "total_weight"]


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
        others name that rank).

    Notes
    -----
    One all-reduce of two values. The result is the same on every rank, and an all-ignored
    rank contributes 0.

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
    local, error = None, None
    try:
        _validate.check_torch_tensor(target, "target")
        local = _local_total_weight(target, weight, ignore_index)
    except Exception as exc:  # raised below, once the other ranks know
        error = exc
    # Decided from the arguments alone, so that a failed rank sends the same dtype.
    exact = torch.int64 if weight is None else torch.float64
    payload = torch.zeros(2, dtype=exact, device=_device(target))
    if local is not None:
        payload[0] = local.to(exact)
    payload[1] = error is not None
    dist.all_reduce(payload, group=group)
    _raise_if_any_failed(bool(payload[1]), error, group)
    return payload[0].to(local.dtype)


def nll_loss(
    input_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    class_start: int,
    group: Any = None,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    total_weight: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    r"""The loss of an input whose classes are sharded over the ranks of ``group``.

    Rank :math:`r` holds the classes :math:`[s_r, s_r + C_r)` of the input (axis 1, or axis 0
    unbatched), with :math:`s_r` = ``class_start``; together the shards cover the
    :math:`C = \sum_r C_r` classes once each, in any rank order. The result, on every rank,
    is that of the unsharded input: :func:`nllloss.nll_loss` of the gathered input with the
    same options, i.e. ``torch.nn.functional.nll_loss``, and with ``from_logits=True``
    ``torch.nn.functional.cross_entropy``. With :math:`\log p` the input (log-probabilities)
    or its log-softmax over all C classes (logits) and :math:`\varepsilon` =
    ``label_smoothing``, each non-ignored target element :math:`n` has

    .. math:: \ell_n = -(1 - \varepsilon)\, w_{y_n} \log p_{n, y_n}
              - \frac{\varepsilon}{C} \sum_{c=0}^{C-1} w_c \log p_{n, c},

    (:math:`w = 1` without weight; ignored elements have :math:`\ell_n = 0`), and
    ``'none'`` returns :math:`\ell`, ``'sum'`` :math:`\sum_n \ell_n` and ``'mean'``
    :math:`\sum_n \ell_n / W` with :math:`W` = ``total_weight``, by default
    :math:`\sum_{n:\, y_n \ne ii} w_{y_n}`. With class probabilities :math:`p` as the
    target, :math:`w_{y_n} \log p_{n, y_n}` becomes :math:`\sum_c w_c p_{n, c} \log
    p_{n, c}` and :math:`W` the number of target elements, as in :func:`nllloss.nll_loss`;
    so do ``z_loss`` and ``softcap``. The gradient reaches ``input_shard`` only, for
    its own classes, through ``backward()`` on any rank's loss.

    Parameters
    ----------
    input_shard : torch.Tensor
        This rank's classes of the input: ``(C_r,)`` (unbatched), ``(N, C_r)`` or
        ``(N, C_r, d1, ..., dK)``; float16, bfloat16, float32 or float64.
    target : torch.Tensor
        Global class indices in ``[0, C)`` (or ``ignore_index``), shaped as for
        :func:`nllloss.nll_loss`; the same on every rank. Or class probabilities: a
        floating tensor of ``input_shard``'s shape, this rank's classes of them.
    class_start : int
        The first class of this rank's shard.
    group : torch.distributed.ProcessGroup, optional
        The ranks sharing the classes; default: the whole world.
    weight : torch.Tensor or sequence, optional
        All C class weights (not this rank's slice), the same on every rank.
    ignore_index : int, default -100
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    from_logits : bool, default False
        The input holds unnormalised logits: the loss is the cross-entropy.
    label_smoothing : float, default 0.0
        :math:`\varepsilon` in [0, 1], over all C classes (torch's ``cross_entropy``
        formula, also for log-probabilities).
    total_weight : float or 0-d torch.Tensor, optional
        The 'mean' denominator, e.g. :func:`total_weight` over the data-parallel ranks when
        the batch is split there too.
    z_loss : float, default 0.0
        From logits only: :math:`z \, v_n \operatorname{lse}_n^2` added per element, as
        in :func:`nllloss.nll_loss` (:math:`\operatorname{lse}_n` over all C classes).
    softcap : float, optional
        From logits only: every logit becomes :math:`c \tanh(x / c)`, as in
        :func:`nllloss.nll_loss`.

    Returns
    -------
    torch.Tensor
        The same on every rank, in the input's dtype: the target's shape for ``'none'``,
        0-d otherwise (also for an unbatched input).

    Raises
    ------
    IndexError
        A target value is neither in ``[0, C)`` nor ``ignore_index`` (the core's error).
    ValueError
        The shards do not tile ``[0, C)``; the weight's length is not C (the core's error);
        an argument other than the input differs between ranks; shapes or options as in
        :func:`nllloss.nll_loss`.
    TypeError
        Not torch tensors, or dtypes as in :func:`nllloss.nll_loss`.

    Every rank raises when any rank's check fails: the failing rank its own error, the
    others an error of the same type naming that rank.

    Notes
    -----
    Per call, with N target elements: one all-gather of 14 int64 per rank, then from
    log-probabilities one all-reduce of N + 1 values (2N + 1 with label smoothing; the extra
    value flags a failed check), from logits one of N + 1 (the maxima) and one of 2N (3N with
    label smoothing, one N more with probabilities); ``z_loss`` and ``softcap`` communicate
    nothing more; the backward communicates nothing. Two host synchronisations read the
    all-gather and the flag. Edge cases follow torch: 'mean' over a zero total weight is NaN.
    Ignored elements contribute neither loss nor gradient, even from a row of NaN logits.
    float16 and bfloat16 are computed and communicated in float32, and rounded once. A rank
    may hold no class (``C_r = 0``). The target and weight must be the same on every rank
    (checked through position-sensitive sums, not element by element).

    Examples
    --------
    One rank holds every class here; with more ranks each passes its slice and its
    ``class_start``:

    >>> import torch, torch.distributed as dist
    >>> from nllloss import distributed
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
    >>> target = torch.tensor([0, 2])
    >>> loss = distributed.nll_loss(logits, target, class_start=0, from_logits=True)
    >>> loss
    tensor(0.2056, grad_fn=<_ClassParallelLossBackward>)
    >>> torch.nn.functional.cross_entropy(logits, target)
    tensor(0.2056, grad_fn=<NllLossBackward0>)
    >>> dist.destroy_process_group()
    """
    options = _options.given(locals())
    error, args = None, None
    try:
        args = _check_locally(
            input_shard, target, weight, class_start, ignore_index, reduction, options
        )
    except Exception as exc:  # raised after the all-gather, once the other ranks know
        error = exc
    rows = _all_gather_rows(_row(args, input_shard), group)
    _raise_if_any_failed(any(row[_FAILED] for row in rows), error, group)
    classes = _validate.check_shards([row[_START] for row in rows], [row[_SIZE] for row in rows])
    _check_agreement(rows, classes)
    plan = dataclasses.replace(args.plan, classes=classes)
    targets = None
    try:
        if args.weight is not None:
            _validate.check_weight(args.weight, classes)
        _check_target_values(args.engine, args.target, plan)
        targets = _Targets.of(args.target, args.weight, plan)
    except Exception as exc:  # raised after the first all-reduce, which carries a flag
        error = exc
    stats = _exchange(input_shard.detach(), targets, plan, error, group)
    return _ClassParallelLoss.apply(input_shard, stats, args.total_weight, targets, plan)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The non-tensor arguments, validated; ``classes`` is C over the group."""

    layout: Layout  # of the shard: classes is C_r
    class_start: int
    ignore_index: int
    reduction: str
    from_logits: bool
    smoothing: float
    probabilities: bool  # the target holds this rank's classes of class probabilities
    z_loss: float
    softcap: float | None
    dtype: torch.dtype  # the input's
    compute_dtype: torch.dtype  # float32 for 16-bit input
    classes: int = -1


@dataclasses.dataclass(frozen=True)
class _Arguments:
    engine: Any
    target: torch.Tensor
    weight: torch.Tensor | None
    total_weight: torch.Tensor | None
    plan: _Plan


# nll_loss is two frames above the checks: warnings point at its caller.
_CALLER = 3


# The options the class-parallel loss computes (its partial sums); it has no generic path
# to send others to, so it refuses them.
_SUPPORTED_OPTIONS = frozenset(
    {"from_logits", "label_smoothing", "total_weight", "z_loss", "softcap"}
)


def _check_locally(
    input, target, weight, class_start, ignore_index, reduction, given: dict
) -> _Arguments:
    """Every check that needs no other rank (those against C follow the all-gather)."""
    _validate.check_torch_tensor(input, "input_shard")
    engine = backend_for(input)
    target = like_input(engine, target, input, "target")
    _validate.check_input(input)
    _validate.check_target(target, tuple(input.shape))
    probabilities = _validate.is_float_dtype(target.dtype)
    if probabilities:  # used in the input's dtype, as by nllloss.nll_loss
        target = target.to(input.dtype)
    layout = layout_of(tuple(input.shape))
    if weight is not None:
        weight = like_input(engine, weight, input, "weight", sequence_dtype=input.dtype)
    reduction = _validate.check_reduction(reduction, stacklevel=_CALLER)
    options = _options.checked(
        given, reduction, lambda value, name: like_input(engine, value, input, name)
    )
    unsupported = options.in_use() - _SUPPORTED_OPTIONS
    if unsupported:
        raise ValueError(
            f"{', '.join(sorted(unsupported))}: not available in the class-parallel loss"
        )
    dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    plan = _Plan(
        layout=layout,
        class_start=_validate.check_class_start(class_start),
        ignore_index=_validate.check_ignore_index(ignore_index, probabilities),
        reduction=resolved_reduction(reduction, layout),
        from_logits=options.from_logits,
        smoothing=options.label_smoothing,
        probabilities=probabilities,
        z_loss=options.z_loss,
        softcap=options.softcap,
        dtype=input.dtype,
        compute_dtype=dtype,
    )
    return _Arguments(engine, target, weight, options.total_weight, plan)


# One row per rank in the all-gather: the shard, a failure flag, then the fingerprint of each
# argument that every rank must pass alike (a mismatch would give each rank a different
# loss, or collectives of different sizes). The columns follow from this table.
_START, _SIZE, _FAILED = 0, 1, 2
_AGREED = (  # (argument, int64 values in its fingerprint)
    ("target", 2),  # element count, position-sensitive sum of the values (0: probabilities)
    ("the target's form", 1),  # class indices, or each rank's classes of probabilities
    ("weight", 2),  # length (-1: none), position-sensitive sum of the values
    ("ignore_index", 1),
    ("reduction", 1),
    ("from_logits", 1),
    ("label_smoothing", 1),
    ("z_loss", 1),
    ("softcap", 1),  # 0: none
    ("total_weight", 2),  # given, value
    ("the input's dtype", 1),  # the all-reduces are in its compute dtype
)


def _agreed_columns() -> dict[str, slice]:
    columns, first = {}, _FAILED + 1
    for name, width in _AGREED:
        columns[name] = slice(first, first + width)
        first += width
    return columns


_COLUMNS = _agreed_columns()
_ROW_LENGTH = _FAILED + 1 + sum(width for _, width in _AGREED)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def _fingerprints(args: _Arguments) -> dict[str, list]:
    """Each agreed argument's fingerprint: ints, or 0-d int64 tensors computed on device."""
    plan, weight, total = args.plan, args.weight, args.total_weight
    return {
        "target": [
            plan.layout.size,
            0 if plan.probabilities else _checksum(args.target.reshape(-1).to(torch.int64) + 1),
        ],
        "the target's form": [int(plan.probabilities)],
        "weight": [-1, 0]
        if weight is None
        else [weight.numel(), _checksum(weight.reshape(-1).to(torch.float64)).view(torch.int64)],
        "ignore_index": [plan.ignore_index],
        "reduction": [_REDUCTION_CODES[plan.reduction]],
        "from_logits": [int(plan.from_logits)],
        "label_smoothing": [_float_bits(plan.smoothing)],
        "z_loss": [_float_bits(plan.z_loss)],
        "softcap": [_float_bits(plan.softcap or 0.0)],
        "total_weight": [0, 0]
        if total is None
        else [1, total.reshape(()).to(torch.float64).view(torch.int64)],
        "the input's dtype": [_DTYPE_CODES[plan.dtype]],
    }


def _row(args: _Arguments | None, input: Any) -> torch.Tensor:
    """This rank's row of the all-gather: all zeros but the flag when its checks failed."""
    device = _device(input)
    if args is None:
        row = torch.zeros(_ROW_LENGTH, dtype=torch.int64, device=device)
        row[_FAILED] = 1
        return row
    values = [args.plan.class_start, args.plan.layout.classes, 0]
    for name, fingerprint in _fingerprints(args).items():
        assert len(fingerprint) == _COLUMNS[name].stop - _COLUMNS[name].start, name
        values += fingerprint
    return torch.stack([torch.as_tensor(v, dtype=torch.int64, device=device) for v in values])


def _checksum(values: torch.Tensor) -> torch.Tensor:
    """A sum that changes when values move: sum of values[i] * (2i + 1) (int64 wraps)."""
    factors = torch.arange(values.numel(), device=values.device, dtype=values.dtype) * 2 + 1
    return (values * factors).sum()


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _all_gather_rows(row: torch.Tensor, group: Any) -> list[list[int]]:
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows).tolist()


def _check_agreement(rows: list[list[int]], classes: int) -> None:
    """Raise (on every rank alike) for the first argument that differs between ranks."""
    for name, _ in _AGREED:
        columns = _COLUMNS[name]
        length = columns.start  # of the weight: its first value
        if name == "weight" and any(row[length] not in (-1, classes) for row in rows):
            if any(row[length] == -1 for row in rows):
                columns = slice(length, length + 1)  # given on some ranks only
            else:
                continue  # a wrong length: the core's error follows, on the ranks concerned
        values = [tuple(row[columns]) for row in rows]
        for rank, value in enumerate(values):
            if value != values[0]:
                raise _validate.ranks_disagree_error(name, 0, rank)


def _check_target_values(engine, target: torch.Tensor, plan: _Plan) -> None:
    """The core's IndexError for the first target neither in [0, C) nor ignore_index
    (probabilities are used as given, as by the core)."""
    if plan.probabilities:
        return
    xp, layout = engine.xp, plan.layout._replace(classes=plan.classes)
    flat = target.reshape(layout.output_shape or (1,))
    valid = _generic.compare(xp, flat, "!=", plan.ignore_index)
    bad = valid & (
        _generic.compare(xp, flat, "<", 0) | _generic.compare(xp, flat, ">=", plan.classes)
    )
    _generic.raise_first_bad(xp, flat, bad, layout, plan.ignore_index)


def _raise_if_any_failed(any_failed: bool, error: Exception | None, group: Any) -> None:
    """Raise on every rank when a check failed on any: the failing ranks their own error,
    the others the first failing rank's type and message (exchanged on this path only)."""
    if not any_failed:
        return
    report = None if error is None else (type(error).__name__, str(error))
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, report, group=group)
    if error is not None:
        raise error
    rank, (kind, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    raise _validate.raised_on_rank_error(rank, kind, message) from None


def _device(obj: Any) -> torch.device:
    return obj.device if isinstance(obj, torch.Tensor) else torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class _Targets:
    """What the loss needs of the target, per target element as (B, S) (see ``Layout``)."""

    valid: torch.Tensor  # not ignored (all, for probabilities)
    weight: torch.Tensor  # w[y] (1 without weight or for probabilities), 0 where ignored
    owned: torch.Tensor | None  # valid, and y is in this rank's shard (class indices)
    index: torch.Tensor | None  # (B, 1, S): y - class_start where owned, else 0
    shard_weight: torch.Tensor | None  # w of this rank's classes; None without weight
    weight_sum: Any  # sum of all C weights (C without weight)
    # (B, C_r, S) w_c p_c of this rank's classes, for probabilities (else None)
    weighted_probabilities: torch.Tensor | None = None

    @classmethod
    def of(cls, target: torch.Tensor, weight: torch.Tensor | None, plan: _Plan) -> _Targets:
        layout, dtype = plan.layout, plan.compute_dtype
        shard = None
        if weight is not None:
            weight = weight.to(plan.dtype).to(dtype)  # torch computes in the input's dtype
            shard = weight[plan.class_start : plan.class_start + layout.classes]
        weight_sum = plan.classes if weight is None else weight.sum()
        if plan.probabilities:
            p = target.reshape(layout.batch, layout.classes, layout.spatial).to(dtype)
            if shard is not None:
                p = p * shard.view(1, -1, 1)
            ones = p.new_ones((layout.batch, layout.spatial))
            return cls(ones.bool(), ones, None, None, shard, weight_sum, p)
        t = target.reshape(layout.batch, layout.spatial).to(torch.int64)
        valid = t != plan.ignore_index
        local = t - plan.class_start
        owned = valid & (local >= 0) & (local < layout.classes)
        index = torch.where(owned, local, 0).unsqueeze(1)
        if weight is None:
            return cls(valid, valid.to(dtype), owned, index, None, weight_sum)
        picked = (
            weight[torch.where(valid, t, 0)] if plan.classes else torch.zeros_like(t, dtype=dtype)
        )
        return cls(valid, torch.where(valid, picked, 0), owned, index, shard, weight_sum)


@dataclasses.dataclass(frozen=True)
class _Stats:
    """Per target element (B, S), the same on every rank after the all-reduces."""

    # log p[n, y_n]; for probabilities sum_c w_c p[n, c] log p[n, c] (weighted already)
    target_log_prob: torch.Tensor
    smooth: torch.Tensor | None  # sum_c w_c log p[n, c], with label smoothing
    # From logits: exp(x - m) of this rank's shard (B, C_r, S), and Z = its sum over all C
    # classes (B, S), so that p = exp(x - m) / Z; the backward's only (B, C_r, S) input.
    exp_shifted: torch.Tensor | None
    sum_exp: torch.Tensor | None
    mass: torch.Tensor | None = None  # sum_c w_c p[n, c], probabilities from logits
    lse: torch.Tensor | None = None  # m + log Z, with z_loss


def _exchange(x, targets: _Targets | None, plan: _Plan, error, group) -> _Stats:
    """Steps 2 and 3 of the module's docstring. ``targets`` is None on a rank whose checks
    against C failed (``error``): it sends zeros and a flag, and every rank raises."""
    layout = plan.layout
    x = x.reshape(layout.batch, layout.classes, layout.spatial).to(plan.compute_dtype)
    if plan.softcap is not None:
        x = _capped(x, plan)
    zeros = x.new_zeros((layout.batch, layout.spatial))
    if plan.from_logits:
        local_max = x.amax(1) if layout.classes else torch.full_like(zeros, -torch.inf)
        (shift,) = _all_reduce([local_max], dist.ReduceOp.MAX, group, error)
        x = x - shift.unsqueeze(1)
        error = None  # reported
    if targets is None:
        mass = plan.from_logits and plan.probabilities
        parts = [zeros] * (1 + plan.from_logits + mass + (plan.smoothing > 0))
    else:
        parts = _shard_sums(x, targets, plan)
    sums = _all_reduce(parts, dist.ReduceOp.SUM, group, error, flagged=not plan.from_logits)
    if not plan.from_logits:
        return _Stats(sums[0], sums[1] if plan.smoothing else None, None, None)
    log_z = sums[0].log()
    if plan.probabilities:  # sum_c w p (x - m) - (sum_c w p) log Z
        mass = sums[2]
        target_log_prob = sums[1] - mass * log_z
    else:
        mass = None
        target_log_prob = sums[1] - log_z
    smooth = sums[-1] - targets.weight_sum * log_z if plan.smoothing else None
    lse = shift + log_z if plan.z_loss else None
    return _Stats(target_log_prob, smooth, x, sums[0], mass, lse)


def _capped(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``softcap * tanh(x / softcap)``, elementwise: each rank caps its own classes."""
    return torch.tanh(x / plan.softcap).mul_(plan.softcap)


def _shard_sums(x: torch.Tensor, targets: _Targets, plan: _Plan) -> list[torch.Tensor]:
    """This rank's share of each per-element sum over the classes. From logits, ``x`` is the
    shifted copy, which this exponentiates in place (one (B, C_r, S) buffer, not two)."""
    if plan.probabilities:
        weighted = targets.weighted_probabilities
        parts = [torch.einsum("bcs,bcs->bs", x, weighted)]
        if plan.from_logits:
            parts.append(weighted.sum(1))
    elif plan.layout.classes:
        picked = x.gather(1, targets.index).squeeze(1)
        parts = [torch.where(targets.owned, picked, 0)]
    else:
        parts = [x.new_zeros(targets.valid.shape)]
    if plan.smoothing:
        if targets.shard_weight is None:
            parts.append(x.sum(1))
        else:
            parts.append(torch.einsum("bcs,c->bs", x, targets.shard_weight))
    if plan.from_logits:
        parts.insert(0, x.exp_().sum(1))
    return parts


def _all_reduce(parts, op, group, error, flagged: bool = True) -> list[torch.Tensor]:
    """One all-reduce of the (B, S) ``parts``; when ``flagged``, with a failure flag (max or
    sum: non-zero when any rank failed), and a raise on every rank if it is set."""
    shape = parts[0].shape
    payload = [part.reshape(-1) for part in parts]
    if flagged:
        payload.append(parts[0].new_full((1,), float(error is not None)))
    payload = torch.cat(payload)
    dist.all_reduce(payload, op=op, group=group)
    if flagged:
        _raise_if_any_failed(bool(payload[-1]), error, group)
    count = len(parts) * shape.numel()
    return list(payload[:count].reshape(len(parts), *shape))


class _ClassParallelLoss(torch.autograd.Function):
    """The loss from the exchanged per-element values; its backward communicates nothing."""

    @staticmethod
    def forward(ctx, input_shard, stats: _Stats, total_weight, targets: _Targets, plan: _Plan):
        valid, eps = targets.valid, plan.smoothing
        nll = torch.where(valid, -(targets.weight * stats.target_log_prob), 0)
        smooth = torch.where(valid, -stats.smooth, 0) if eps else None
        # z v lse**2, v = w[y] (1 for probabilities), 0 where ignored: as nllloss.nll_loss
        z_terms = None
        if plan.z_loss:
            z_terms = torch.where(valid, plan.z_loss * targets.weight * stats.lse.square(), 0)
        denominator = None
        if plan.reduction == "none":
            loss = nll if not eps else nll * (1 - eps) + smooth * (eps / plan.classes)
            if z_terms is not None:
                loss = loss + z_terms
        else:  # as torch: each term reduced, divided, then mixed
            nll = nll.sum()
            smooth = smooth.sum() if eps else None
            z_terms = z_terms.sum() if z_terms is not None else None
            if plan.reduction == "mean":
                denominator = _denominator(total_weight, targets, plan)
                nll = nll / denominator
                smooth = smooth / denominator if eps else None
                z_terms = z_terms / denominator if z_terms is not None else None
            loss = nll if not eps else nll * (1 - eps) + smooth * (eps / plan.classes)
            if z_terms is not None:
                loss = loss + z_terms
        layout = plan.layout
        loss = loss.reshape(layout.output_shape if plan.reduction == "none" else ())
        ctx.save_for_backward(input_shard)
        ctx.stats, ctx.targets, ctx.plan, ctx.denominator = stats, targets, plan, denominator
        return loss.to(plan.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (input_shard,) = ctx.saved_tensors
        stats, targets, plan = ctx.stats, ctx.targets, ctx.plan
        layout, eps, valid = plan.layout, plan.smoothing, targets.valid
        upstream = grad.to(plan.compute_dtype)
        if plan.reduction == "none":
            upstream = upstream.reshape(layout.batch, layout.spatial)
        else:
            upstream = upstream.reshape(())
        # As torch's autograd of (1 - eps) * nll + smooth * (eps / C): scale, then divide.
        nll_scale = upstream * (1 - eps) if eps else upstream
        smooth_scale = upstream * (eps / plan.classes) if eps else None
        z_scale = upstream
        if ctx.denominator is not None:
            nll_scale = nll_scale / ctx.denominator
            smooth_scale = smooth_scale / ctx.denominator if eps else None
            z_scale = z_scale / ctx.denominator
        nll_scale = torch.where(valid, nll_scale, 0)
        smooth_scale = torch.where(valid, smooth_scale, 0) if eps else None
        shape3 = (layout.batch, layout.classes, layout.spatial)
        # One (B, C_r, S) buffer, updated in place.
        if plan.from_logits:
            # d/dx of log p: the log-prob gradient minus p times its sum over the classes
            mass = (targets.weight if stats.mass is None else stats.mass) * nll_scale
            if eps:
                mass = mass + smooth_scale * targets.weight_sum
            if plan.z_loss:  # d(z v lse**2)/dx_c = 2 z v lse p_c
                z_mass = 2 * plan.z_loss * targets.weight * stats.lse * z_scale
                mass = mass + torch.where(valid, z_mass, 0)
            grad_input = stats.exp_shifted * (mass / stats.sum_exp).unsqueeze(1)
        else:
            grad_input = nll_scale.new_zeros(shape3)
        if eps and targets.shard_weight is None:
            grad_input.sub_(smooth_scale.unsqueeze(1))
        elif eps:
            class_weight = targets.shard_weight.view(1, -1, 1)
            grad_input.addcmul_(smooth_scale.unsqueeze(1), class_weight, value=-1)
        if plan.probabilities:
            weighted = targets.weighted_probabilities
            grad_input.addcmul_(nll_scale.unsqueeze(1), weighted, value=-1)
        elif layout.classes:
            at_target = torch.where(targets.owned, -(targets.weight * nll_scale), 0)
            grad_input.scatter_add_(1, targets.index, at_target.unsqueeze(1))
        if plan.softcap is not None:  # through the cap: 1 - tanh(x / c)**2
            capped = _capped(input_shard.detach().reshape(shape3).to(plan.compute_dtype), plan)
            grad_input.mul_(1 - (capped / plan.softcap).square())
        if plan.from_logits:
            # Ignored elements have no mass, but a row of NaN would still give 0 * NaN:
            # zero them (by index: no pass over the whole gradient).
            grad_input.movedim(1, -1).index_put_(
                (~valid).nonzero(as_tuple=True), grad_input.new_zeros(())
            )
        return grad_input.reshape(input_shard.shape).to(plan.dtype), None, None, None, None


def _denominator(total_weight, targets: _Targets, plan: _Plan) -> torch.Tensor:
    """The 'mean' denominator: ``total_weight``, or the count or weight sum of the target
    (the number of target elements for probabilities)."""
    denominator = mean_denominator(
        plan.layout._replace(classes=plan.classes), total_weight, plan.probabilities,
        targets.shard_weight is not None, lambda: targets.valid.sum(),
        lambda: targets.weight.sum(),
    )  # fmt: skip
    return torch.as_tensor(denominator, device=targets.valid.device).reshape(()).to(
        plan.compute_dtype
    )


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
    A bad target is reported by :func:`nll_loss` with its position within its block of
    rows. Probability targets, ``z_loss`` and ``softcap`` are not available here (the
    class-parallel loss has none of them).

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> from nllloss import distributed
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    >>> W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> distributed.linear_cross_entropy(h, W, torch.tensor([0, 1]), class_start=0)
    tensor(0.3955, grad_fn=<_LinearLossBackward>)
    >>> dist.destroy_process_group()
    """
    given = _options.given(locals())
    for name, value in (("input", input), ("linear_weight_shard", linear_weight_shard)):
        _validate.check_torch_tensor(value, name)
    _validate.check_linear(input, linear_weight_shard, linear_bias_shard)
    if linear_weight_shard.dim() != 2:
        raise ValueError(
            "linear_weight_shard must have shape (C_r, in_features), got shape "
            f"{tuple(linear_weight_shard.shape)}"
        )
    reduction = _validate.check_reduction(reduction, stacklevel=2)
    ignore_index = _validate.check_ignore_index(-100 if ignore_index is None else ignore_index)
    layout = layout_of((*input.shape[:-1], linear_weight_shard.shape[0]))
    options = _options.checked(
        {**given, "from_logits": True},
        reduction,
        lambda value, name: like_input(backend_for(input), value, input, name),
    )
    problem = Problem(
        input, target, weight, ignore_index, resolved_reduction(reduction, layout), layout,
        options,
    )  # fmt: skip
    denominator = None
    if reduction == "mean":  # the target is the same on every rank: its total is global
        denominator = total_weight
        if denominator is None:
            denominator = _local_total_weight(target, weight, ignore_index)
    linear = _linear.assemble(
        _ShardBackend(class_start, group), problem, input, linear_weight_shard,
        linear_bias_shard, _validate.check_chunk_rows(chunk_rows), denominator,
        _ShardAlgebra(group),
    )  # fmt: skip
    return _linear_torch.loss(linear)


class _ShardBackend:
    """A block's loss (and its logits' gradient) by the class-parallel :func:`nll_loss`."""

    xp = array_api_compat.torch

    def __init__(self, class_start: int, group: Any) -> None:
        self.class_start, self.group = class_start, group

    def forward(self, problem: Problem) -> torch.Tensor:
        return nll_loss(
            problem.input, problem.target, class_start=self.class_start, group=self.group,
            weight=problem.weight, ignore_index=problem.ignore_index,
            reduction=problem.reduction, **problem.options.as_keywords(),
        )  # fmt: skip

    def forward_backward(self, problem: Problem, grad_output, out=None):
        """(loss, gradient of the block's logits): autograd through :func:`nll_loss`,
        whose backward communicates nothing."""
        with torch.enable_grad():
            logits = problem.input.detach().requires_grad_()
            loss = self.forward(problem.replace(input=logits))
            (grad,) = torch.autograd.grad(loss, logits, grad_output.to(loss.dtype))
        return loss.detach(), grad


class _ShardAlgebra(_linear_torch.TorchAlgebra):
    """torch's products, and the input's gradient summed over the shards' ranks."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def finish(self, linear, grads):
        if grads[0] is not None:
            dist.all_reduce(grads[0], group=self.group)
        return super().finish(linear, grads)

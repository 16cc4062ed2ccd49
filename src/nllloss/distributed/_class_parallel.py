"""The class-parallel loss: :func:`nll_loss` of an input whose classes are sharded over the
ranks of a group (the steps are in :mod:`nllloss.distributed`'s docstring)."""

from __future__ import annotations

import dataclasses
from typing import Any

import array_api_compat.torch
import torch
import torch.distributed as dist

from .. import _generic, _options, _validate
from .._builder import build
from .._problem import Layout, Problem
from .._routes import like_input
from . import _agreement

__all__ = ["nll_loss"]


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
        an argument other than the input's classes differs between ranks (naming it);
        shapes or options as in :func:`nllloss.nll_loss`.
    TypeError
        Not torch tensors, or dtypes as in :func:`nllloss.nll_loss`.

    Every rank raises when any rank's check fails: the failing rank its own error, the
    others an error of the same type naming that rank.

    Notes
    -----
    Per call, with N target elements: one all-gather of a row of 808 bytes per rank (the
    agreement: see :mod:`nllloss.distributed`), then from log-probabilities one all-reduce
    of N + 1 values (2N + 1 with label smoothing; the extra value flags a failure on some
    rank), from logits one of N + 1 (the maxima) and one of 2N + 1 (3N + 1 with label
    smoothing, one N more with probabilities); ``z_loss`` and ``softcap`` communicate
    nothing more; the backward communicates nothing. The agreement reads the target and
    the weight on the host (SHA-256 of their bytes), and each all-reduce's flag is read
    there. Edge cases follow torch: 'mean' over a zero total weight is NaN.
    Ignored elements contribute neither loss nor gradient, even from a row of NaN logits.
    float16 and bfloat16 are computed and communicated in float32, and rounded once. A rank
    may hold no class (``C_r = 0``). The target, the weight and every option must be the
    same on every rank (compared exactly, through SHA-256 digests).
    Second-order gradients (``create_graph=True``) are refused with a RuntimeError.

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
    error, shard = None, None
    try:
        shard = _local_shard(
            input_shard, target, weight, class_start, ignore_index, reduction, options
        )
    except Exception as exc:  # raised by the agreement, on every rank
        error = exc
    shard, _ = agreed(shard, error, group, "nll_loss", _agreement.device_of(input_shard))
    return loss(shard, group)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One rank's part of a class-parallel call, validated.

    ``problem`` is the loss of this rank's shard: its layout counts the shard's classes
    (:math:`C_r`), its weight holds all C classes (in the input's dtype), its target the
    global class indices (or the shard's classes of the probabilities). ``classes`` is C
    over the group, known once the ranks agree.
    """

    problem: Problem
    class_start: int
    classes: int = -1

    @property
    def layout(self) -> Layout:
        return self.problem.layout

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.input.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.problem.computes_in_float32 else self.dtype

    @property
    def whole(self) -> Problem:
        """The problem of the unsharded input (its layout counts all C classes)."""
        return self.problem.replace(layout=self.layout._replace(classes=self.classes))


# nll_loss is two frames above the checks: warnings point at its caller.
_CALLER = 3


# The options the class-parallel loss computes (its partial sums, ``_shard_sums``): it has
# no generic path to hand others to, so it refuses them (see ``Options``).
OPTIONS = frozenset({"from_logits", "label_smoothing", "total_weight", "z_loss", "softcap"})


def check_supported(problem: Problem) -> None:
    """The class-parallel loss computes the problem's options, or refuses it."""
    unsupported = problem.options.in_use() - OPTIONS
    if unsupported:
        raise ValueError(
            f"{', '.join(sorted(unsupported))}: not available in the class-parallel loss"
        )


def _local_shard(
    input, target, weight, class_start, ignore_index, reduction, options: dict
) -> Shard:
    """Every check that needs no other rank (the weight's length against C follows the
    agreement): the core's checks, with the weight set aside."""
    _validate.check_torch_tensor(input, "input_shard")
    reduction = _validate.check_reduction(reduction, stacklevel=_CALLER)
    class_start = _validate.check_class_start(class_start)
    engine, problem = build(input, target, None, ignore_index, reduction, options)
    check_supported(problem)
    return Shard(with_weight(engine, problem, weight), class_start)


def with_weight(engine, problem: Problem, weight) -> Problem:
    """``problem`` with all C class weights, in the input's dtype (as torch computes)."""
    if weight is None:
        return problem
    input = problem.input
    weight = like_input(engine, weight, input, "weight", sequence_dtype=input.dtype)
    return problem.replace(weight=weight.to(input.dtype))


def agreed(
    shard: Shard | None, error, group, function: str, device, extra=()
) -> tuple[Shard, list[_agreement.Peer]]:
    """The agreement of a class-parallel call (the module's step 1): every rank raises alike
    when any rank's checks failed, the shards do not tile the classes, a weight is not of
    length C, or an argument differs between ranks (``extra``: (name, value) pairs beside
    the problem's); then every target is checked against C. The shard with C, and what
    each rank sent (its values are ``(class_start, C_r, weight length)``)."""
    values, arguments = (), ()
    if shard is not None:
        weight = shard.problem.weight
        length = -1 if weight is None else weight.shape[0] if weight.ndim == 1 else -2
        values = (shard.class_start, shard.layout.classes, length)
        arguments = (*extra, *_agreed_arguments(shard.problem))
    peers = _agreement.agree(function, group, device, error, values, arguments)
    classes = _validate.check_shards(
        [peer.values[0] for peer in peers], [peer.values[1] for peer in peers]
    )
    if any(peer.values[2] not in (-1, classes) for peer in peers):
        # the core's error on each rank whose weight is not of length C (the local slice?)
        try:
            if shard.problem.weight is not None:
                _validate.check_weight(shard.problem.weight, classes)
        except Exception as exc:
            error = exc
        _agreement.raise_if_any_failed(True, error, group)
    _agreement.check_same(peers, [name for name, _ in arguments])
    shard = dataclasses.replace(shard, classes=classes)
    _check_target_values(shard)  # the same target on every rank: the same verdict
    return shard, peers


def _agreed_arguments(problem: Problem) -> list[tuple[str, Any]]:
    """What every rank must pass alike, from the fields of ``problem`` (a field added there
    is agreed on without an edit here): all but the input's classes, and the target's for
    probabilities (each rank holds its classes of them)."""
    arguments: list[tuple[str, Any]] = [("the input's dtype", str(problem.input.dtype))]
    for field in dataclasses.fields(problem):
        value = getattr(problem, field.name)
        if field.name == "input":
            continue  # sharded; its dtype above, its other axes in the layout
        if field.name == "layout":
            arguments.append(("the input's shape (but its classes)", value.output_shape))
        elif field.name == "target":
            form = "probabilities" if problem.probabilities else value.to(torch.int64)
            arguments.append(("target", form))
        elif field.name == "options":  # each its own argument; an array as its number
            arguments += [
                (f.name, _as_float64(option) if f.array else option)
                for f in _options.fields(value)
                for option in [getattr(value, f.name)]
            ]
        else:
            arguments.append((field.name, value))
    return arguments


def _as_float64(value):
    """A 0-d or (1,) value as the float64 number it denotes (its dtype does not matter)."""
    return None if value is None else value.reshape(()).to(torch.float64)


def _check_target_values(shard: Shard) -> None:
    """The core's IndexError for the first target neither in [0, C) nor ignore_index
    (probabilities are used as given, as by the core)."""
    problem = shard.whole
    if problem.probabilities:
        return
    xp, layout = array_api_compat.torch, problem.layout
    target = problem.target.reshape(layout.output_shape or (1,))
    _generic.checked_valid(xp, target, layout, problem.ignore_index)


def loss(shard: Shard, group) -> torch.Tensor:
    """Steps 2-4 of the module's docstring, for an agreed shard: the loss, differentiable
    with respect to the shard's input."""
    targets, error = None, None
    try:
        targets = _Targets.of(shard)
    except Exception as exc:  # raised by the first all-reduce, on every rank
        error = exc
    stats = _exchange(shard, targets, error, group)
    return _ClassParallelLoss.apply(shard.problem.input, stats, targets, shard)


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
    def of(cls, shard: Shard) -> _Targets:
        problem, layout, dtype = shard.problem, shard.layout, shard.compute_dtype
        weight, target, classes = problem.weight, problem.target, shard.classes
        shard_weight = None
        if weight is not None:
            weight = weight.to(dtype)  # in the input's dtype already, as torch computes
            shard_weight = weight[shard.class_start : shard.class_start + layout.classes]
        weight_sum = classes if weight is None else weight.sum()
        if problem.probabilities:
            p = target.reshape(layout.batch, layout.classes, layout.spatial).to(dtype)
            if shard_weight is not None:
                p = p * shard_weight.view(1, -1, 1)
            ones = p.new_ones((layout.batch, layout.spatial))
            return cls(ones.bool(), ones, None, None, shard_weight, weight_sum, p)
        t = target.reshape(layout.batch, layout.spatial).to(torch.int64)
        valid = t != problem.ignore_index
        local = t - shard.class_start
        owned = valid & (local >= 0) & (local < layout.classes)
        index = torch.where(owned, local, 0).unsqueeze(1)
        if weight is None:
            return cls(valid, valid.to(dtype), owned, index, None, weight_sum)
        picked = weight[torch.where(valid, t, 0)] if classes else torch.zeros_like(t, dtype=dtype)
        return cls(valid, torch.where(valid, picked, 0), owned, index, shard_weight, weight_sum)


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


def _exchange(shard: Shard, targets: _Targets | None, error, group) -> _Stats:
    """Steps 2 and 3 of the module's docstring. A rank whose ``error`` is set (or that fails
    here, between the collectives) sends zeros and a flag, and every rank raises."""
    problem, layout = shard.problem, shard.layout
    zeros = torch.zeros(
        (layout.batch, layout.spatial), dtype=shard.compute_dtype, device=problem.input.device
    )
    x = shift = None
    if error is None:
        try:
            x = problem.input.detach().reshape(layout.batch, layout.classes, layout.spatial)
            x = x.to(shard.compute_dtype)
            if problem.softcap is not None:
                x = capped_logits(x, problem.softcap)
            if problem.from_logits:
                shift = x.amax(1) if layout.classes else torch.full_like(zeros, -torch.inf)
        except Exception as exc:
            error = exc
    if problem.from_logits:
        (shift,) = _agreement.all_reduce(
            [zeros if shift is None else shift], dist.ReduceOp.MAX, group, error
        )
    parts = None
    try:
        if problem.from_logits:
            x = x - shift.unsqueeze(1)
        parts = _shard_sums(x, targets, problem)
    except Exception as exc:
        error = exc
    if parts is None:
        mass = problem.from_logits and problem.probabilities
        count = 1 + problem.from_logits + mass + (problem.label_smoothing > 0)
        parts = [zeros] * count
    sums = _agreement.all_reduce(parts, dist.ReduceOp.SUM, group, error)
    if not problem.from_logits:
        return _Stats(sums[0], sums[1] if problem.label_smoothing else None, None, None)
    log_z = sums[0].log()
    if problem.probabilities:  # sum_c w p (x - m) - (sum_c w p) log Z
        mass = sums[2]
        target_log_prob = sums[1] - mass * log_z
    else:
        mass = None
        target_log_prob = sums[1] - log_z
    smooth = sums[-1] - targets.weight_sum * log_z if problem.label_smoothing else None
    lse = shift + log_z if problem.z_loss else None
    return _Stats(target_log_prob, smooth, x, sums[0], mass, lse)


def capped_logits(x: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap * tanh(x / softcap)``, elementwise: each rank caps its own classes."""
    return torch.tanh(x / softcap).mul_(softcap)


def _shard_sums(x: torch.Tensor, targets: _Targets, problem: Problem) -> list[torch.Tensor]:
    """This rank's share of each per-element sum over the classes. From logits, ``x`` is the
    shifted copy, which this exponentiates in place (one (B, C_r, S) buffer, not two)."""
    if problem.probabilities:
        weighted = targets.weighted_probabilities
        parts = [torch.einsum("bcs,bcs->bs", x, weighted)]
        if problem.from_logits:
            parts.append(weighted.sum(1))
    elif problem.layout.classes:
        picked = x.gather(1, targets.index).squeeze(1)
        parts = [torch.where(targets.owned, picked, 0)]
    else:
        parts = [x.new_zeros(targets.valid.shape)]
    if problem.label_smoothing:
        if targets.shard_weight is None:
            parts.append(x.sum(1))
        else:
            parts.append(torch.einsum("bcs,c->bs", x, targets.shard_weight))
    if problem.from_logits:
        parts.insert(0, x.exp_().sum(1))
    return parts


def second_order_error(function: str) -> RuntimeError:
    """The refusal of a backward that builds a graph (``create_graph=True``)."""
    return RuntimeError(
        f"nllloss.distributed.{function} has no second-order gradients: its backward is "
        "computed from values exchanged in the forward, not from differentiable operations "
        "(create_graph=True asks for them)"
    )


class _ClassParallelLoss(torch.autograd.Function):
    """The loss from the exchanged per-element values; its backward communicates nothing.

    Every tensor the backward reads is saved with ``save_for_backward`` (so that one
    changed in place before the backward is detected, as by torch's own functions); the
    input itself only with ``softcap`` (the cap's derivative is read from it).
    """

    @staticmethod
    def forward(ctx, input_shard, stats: _Stats, targets: _Targets, shard: Shard):
        problem = shard.problem
        valid, eps = targets.valid, problem.label_smoothing
        nll = torch.where(valid, -(targets.weight * stats.target_log_prob), 0)
        smooth = torch.where(valid, -stats.smooth, 0) if eps else None
        # z v lse**2, v = w[y] (1 for probabilities), 0 where ignored: as nllloss.nll_loss
        z_terms = None
        if problem.z_loss:
            z_terms = torch.where(valid, problem.z_loss * targets.weight * stats.lse.square(), 0)
        denominator = None
        if problem.reduction != "none":  # as torch: each term reduced, divided, then mixed
            nll = nll.sum()
            smooth = smooth.sum() if eps else None
            z_terms = z_terms.sum() if z_terms is not None else None
            if problem.reduction == "mean":
                denominator = _denominator(targets, shard)
                nll = nll / denominator
                smooth = smooth / denominator if eps else None
                z_terms = z_terms / denominator if z_terms is not None else None
        loss = nll if not eps else nll * (1 - eps) + smooth * (eps / shard.classes)
        if z_terms is not None:
            loss = loss + z_terms
        loss = loss.reshape(problem.loss_shape)
        capped_input = input_shard if problem.softcap is not None else None
        _save(ctx, (stats, targets), capped_input, denominator)
        ctx.shard = dataclasses.replace(shard, problem=without_arrays(problem))
        return loss.to(shard.dtype)

    @staticmethod
    def backward(ctx, grad):
        (stats, targets), input_shard, denominator = _saved(ctx)
        if torch.is_grad_enabled():
            raise second_order_error("nll_loss")
        shard = ctx.shard
        problem = shard.problem
        layout, eps, valid = shard.layout, problem.label_smoothing, targets.valid
        upstream = grad.to(shard.compute_dtype)
        if problem.reduction == "none":
            upstream = upstream.reshape(layout.batch, layout.spatial)
        else:
            upstream = upstream.reshape(())
        # As torch's autograd of (1 - eps) * nll + smooth * (eps / C): scale, then divide.
        nll_scale = upstream * (1 - eps) if eps else upstream
        smooth_scale = upstream * (eps / shard.classes) if eps else None
        z_scale = upstream
        if denominator is not None:
            nll_scale = nll_scale / denominator
            smooth_scale = smooth_scale / denominator if eps else None
            z_scale = z_scale / denominator
        nll_scale = torch.where(valid, nll_scale, 0)
        smooth_scale = torch.where(valid, smooth_scale, 0) if eps else None
        shape3 = (layout.batch, layout.classes, layout.spatial)
        # One (B, C_r, S) buffer, updated in place.
        if problem.from_logits:
            # d/dx of log p: the log-prob gradient minus p times its sum over the classes
            mass = (targets.weight if stats.mass is None else stats.mass) * nll_scale
            if eps:
                mass = mass + smooth_scale * targets.weight_sum
            if problem.z_loss:  # d(z v lse**2)/dx_c = 2 z v lse p_c
                z_mass = 2 * problem.z_loss * targets.weight * stats.lse * z_scale
                mass = mass + torch.where(valid, z_mass, 0)
            grad_input = stats.exp_shifted * (mass / stats.sum_exp).unsqueeze(1)
        else:
            grad_input = nll_scale.new_zeros(shape3)
        if eps and targets.shard_weight is None:
            grad_input.sub_(smooth_scale.unsqueeze(1))
        elif eps:
            class_weight = targets.shard_weight.view(1, -1, 1)
            grad_input.addcmul_(smooth_scale.unsqueeze(1), class_weight, value=-1)
        if problem.probabilities:
            weighted = targets.weighted_probabilities
            grad_input.addcmul_(nll_scale.unsqueeze(1), weighted, value=-1)
        elif layout.classes:
            at_target = torch.where(targets.owned, -(targets.weight * nll_scale), 0)
            grad_input.scatter_add_(1, targets.index, at_target.unsqueeze(1))
        if problem.softcap is not None:  # through the cap: 1 - tanh(x / c)**2
            x = input_shard.reshape(shape3).to(shard.compute_dtype)
            capped = capped_logits(x, problem.softcap)
            grad_input.mul_(1 - (capped / problem.softcap).square())
        if problem.from_logits:
            # Ignored elements have no mass, but a row of NaN would still give 0 * NaN:
            # zero them (by index: no pass over the whole gradient).
            grad_input.movedim(1, -1).index_put_(
                (~valid).nonzero(as_tuple=True), grad_input.new_zeros(())
            )
        return grad_input.reshape(layout.input_shape).to(shard.dtype), None, None, None


def _save(ctx, records, *tensors) -> None:
    """``save_for_backward`` of ``tensors`` and of every tensor field of the dataclasses
    ``records``; :func:`_saved` gives them back (version-checked by torch)."""
    names = [
        [f.name for f in dataclasses.fields(r) if isinstance(getattr(r, f.name), torch.Tensor)]
        for r in records
    ]
    fields = [getattr(r, name) for r, rn in zip(records, names, strict=True) for name in rn]
    ctx.save_for_backward(*fields, *tensors)
    ctx.records = [
        (dataclasses.replace(r, **dict.fromkeys(rn)), rn)
        for r, rn in zip(records, names, strict=True)
    ]


def _saved(ctx) -> tuple[list, ...]:
    """``(records, *tensors)`` as given to :func:`_save`."""
    saved = iter(ctx.saved_tensors)
    records = [
        dataclasses.replace(skeleton, **{name: next(saved) for name in names})
        for skeleton, names in ctx.records
    ]
    return (records, *saved)


def without_arrays(problem: Problem) -> Problem:
    """``problem`` with its arrays as empty tensors of their dtypes (on the meta device): what
    the backward reads of it are its options and dtypes, and it keeps nothing alive."""

    def empty(array):
        return torch.empty(0, dtype=array.dtype, device="meta")

    return problem.with_arrays(empty)


def _denominator(targets: _Targets, shard: Shard) -> torch.Tensor:
    """The 'mean' denominator: ``total_weight``, or the count or weight sum of the target
    (for probabilities the whole problem's rule, the number of target elements)."""
    dtype, device = shard.compute_dtype, targets.valid.device
    denominator = shard.whole.denominator(
        lambda: targets.valid.sum(), lambda: targets.weight.sum()
    )
    return torch.as_tensor(denominator, device=device).reshape(()).to(dtype)

"""Launchers of the Triton kernels: a ``Problem`` of torch tensors in, torch tensors out.

The problem is validated (``_builder.build``) and on one device; its layout, resolved
reduction, weight (in the input's dtype) and options are read from it, never re-derived.
The API, for the torch glue (custom operators and autograd):

``forward(problem) -> (loss, saved)``
    The loss and ``saved``, a ``Saved`` of three tensors (the row log-sum-exp, the 'mean'
    denominator, and for probability targets from logits ``P = sum_c w_c p'_c`` per
    position) that ``backward`` reuses: a custom operator can return them as extra
    outputs and ``save_for_backward`` them. One pass over x (only x[t] is read for
    log-probabilities without label smoothing).
``backward(problem, grad_output, saved=None) -> grad``
    With ``saved`` (from ``forward`` on the same problem): one pass, no forward
    recomputed, no host synchronisation, no target check (the forward did it). Without
    it (a standalone ``nll_loss_backward``), what it needs is recomputed and the targets
    are checked unless ``check_targets=False``.
``forward_backward(problem) -> (loss, grad)``
    The loss and the gradient for ``grad_output = 1`` (ones for 'none'), written in the
    pass that reads x: one read of x and one write of the gradient, the floor of a
    training step. A caller with another ``grad_output`` scales the gradient (per position
    along the class axis for 'none'), as the NumPy engine's unit-gradient path does.
``supports(problem)``, ``unsupported(problem)``
    Whether the kernels compute this problem (its dtypes, targets and options), and if
    not, why (for the error when the caller asked for these kernels by name).

A training step (``forward`` then ``backward(saved=...)``, or ``forward_backward``)
synchronises the host at most once: the optional target check (``check_targets=True``,
the default) reads one integer back to raise the core's IndexError. With
``check_targets=False`` there is none, the step can be captured in a CUDA graph, and an
out-of-range target gives NaN (its loss, the reduced loss and its gradient row).

The options (formulas in ``_kernels``): ``t`` holds class indices (an integer tensor of
the loss's shape) or class probabilities (a floating tensor of x's shape, any strides; no
ignore_index, no target check, the 'mean' denominator is the number of positions unless
``total_weight`` is given); from logits, ``z_loss`` adds ``z * lse**2`` per position
(weighted by ``w[t]`` for class indices, 1 for probabilities) and ``softcap`` c replaces
the logits by ``c * tanh(x / c)`` as they are read.

``total_weight`` is best given on x's device (a tensor elsewhere is copied there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import triton

from ... import _generic
from ..._options import Options
from ..._problem import Problem
from . import _kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PROBABILITY_DTYPES = (*SUPPORTED_DTYPES, torch.float64)
_NATIVE_TARGETS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Tile sizes and warps. No GPU run has measured them yet (none was lent when they were
# set); `python benchmarks/gpu_check.py` times alternatives in its sweep, and the values
# it picks replace these with that measurement named. Why each was picked meanwhile:
# - _TILE: elements of a program's tile over full rows; 4096 float32 values on 8 warps are
#   16 per thread, room beside the online log-sum-exp's state without spilling registers.
# - _GATHER_ROWS: positions per program when only x[t] is read; 1024 on 4 warps are 8
#   independent gathers in flight per thread, to cover the latency of scattered loads.
# - _STRIDED_CLASS_BLOCK: classes per step when the class axis is strided (K-dim input,
#   positions contiguous): tiles of 4096 / 32 = 128 positions, each class a coalesced read.
# - _FINISH_BLOCK: partial sums per step of the one-program finish, a few thousand at most
#   (one per program), so its cost is a launch.
# - _WARPS / _GATHER_WARPS: 8 for tiles of 2048 elements and more, 4 below, Triton's usual
#   choice for reductions of that size.
# Under the interpreter each program costs ~1.5 ms whatever its size (measured on the CI
# machine), so tiles there are as large as memory allows.
_TILE = 4096
_TILE_INTERPRETED = 1 << 16
_GATHER_ROWS = 1024
_STRIDED_CLASS_BLOCK = 32
_FINISH_BLOCK = 1024
_WARPS = 8
_GATHER_WARPS = 4


class Saved(NamedTuple):
    """What ``backward`` reuses from ``forward``: tensors only, on x's device, so that a
    custom operator can return them and autograd can save them.

    ``lse``: float32 log-sum-exp per position (from logits; empty otherwise);
    ``denominator``: float32 0-d 'mean' denominator (``total_weight`` when given, else the
    sum of ``w[t]`` over counted positions, or their number for probability targets;
    empty when not computed: 'none' unchecked or of probability targets);
    ``mass``: float32 ``sum_c w_c p'_c`` per position (probability targets from logits;
    empty otherwise).
    """

    lse: torch.Tensor
    denominator: torch.Tensor
    mass: torch.Tensor


# The options the kernels compute (see ``Options``); a problem using any other takes
# another engine.
OPTIONS = frozenset(
    {"from_logits", "label_smoothing", "total_weight", "check_targets", "z_loss", "softcap"}
)


def unsupported(problem: Problem) -> str | None:
    """Why the kernels do not compute ``problem``, or None when they do."""
    x, t, w = problem.input, problem.target, problem.weight
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} (the kernels take {', '.join(map(str, SUPPORTED_DTYPES))})"
    if x.numel() == 0:
        return "an input without elements"
    if w is not None and not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype}"
    if t.dtype.is_floating_point and t.dtype not in _PROBABILITY_DTYPES:
        return f"probability target dtype {t.dtype}"
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return f"target dtype {t.dtype}"
    others = problem.options.in_use() - OPTIONS
    if others:
        return f"option(s) {', '.join(sorted(others))}"
    return None


def supports(problem: Problem) -> bool:
    """True when the kernels compute ``problem`` (else another engine should)."""
    return unsupported(problem) is None


class _Geometry(NamedTuple):
    """The kernels' ``(B, C, S)`` view of the input: positions ``(b, s)``, classes ``c``."""

    x: torch.Tensor  # the input, or its (N, C, S) view (a copy only when none exists)
    batch: int  # B: 1 for (C,) and (N, C) input, whose rows are the positions of one batch
    classes: int
    spatial: int  # S
    strides: tuple[int, int, int]  # of x along (B, C, S)
    grad_strides: tuple[int, int, int]  # of a contiguous gradient of x's shape

    @property
    def positions(self) -> int:
        return self.batch * self.spatial


def _geometry(x: torch.Tensor) -> _Geometry:
    if x.dim() == 1:
        return _Geometry(x, 1, x.shape[0], 1, (0, x.stride(0), 0), (0, 1, 0))
    rows, classes = x.shape[0], x.shape[1]
    if x.dim() == 2:
        strides = (0, x.stride(1), x.stride(0))
        return _Geometry(x, 1, classes, rows, strides, (0, 1, classes))
    spatial = math.prod(x.shape[2:])
    view = x.reshape(rows, classes, spatial)
    grad_strides = (classes * spatial, spatial, 1)
    return _Geometry(view, rows, classes, spatial, view.stride(), grad_strides)


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _blocks(geometry: _Geometry, full_row: bool, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for a kernel over ``geometry``."""
    spatial = triton.next_power_of_2(geometry.spatial)
    if not full_row:
        rows = _TILE_INTERPRETED if interpreted else _GATHER_ROWS
        return min(spatial, rows), 16, _GATHER_WARPS
    tile = _TILE_INTERPRETED if interpreted else _TILE
    classes = triton.next_power_of_2(geometry.classes)
    contiguous_classes = geometry.strides[1] == 1
    block_c = min(classes, tile if contiguous_classes else _STRIDED_CLASS_BLOCK)
    block_m = max(1, min(tile // block_c, spatial))
    return block_m, block_c, _WARPS if block_m * block_c >= 2048 else 4


def _targets(t: torch.Tensor, geometry: _Geometry) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The target as the kernels read it, and its strides along (B, C, S): class
    probabilities viewed as x is, class indices flat (position m at m)."""
    if t.dtype.is_floating_point:
        view = _geometry(t)
        return view.x, view.strides
    flat = t.reshape(-1)
    flat = (flat if t.dtype in _NATIVE_TARGETS else flat.long()).contiguous()
    return flat, (geometry.spatial, 0, 1)


_FLOAT32 = torch.finfo(torch.float32)


def flags_and_values(options: Options) -> tuple[dict, tuple[float, ...]]:
    """The constexpr flags and runtime values of z_loss and softcap: z, and the cap as the
    float32 numbers (m, s1, s2) of ``_generic.softcap_parts``."""
    z_loss, softcap = options.z_loss, options.softcap
    flags = {"Z_LOSS": z_loss != 0.0, "SOFTCAP": softcap is not None}
    cap = (1.0, 1.0, 1.0)
    if softcap is not None:
        cap = _generic.softcap_parts(float(softcap), _FLOAT32.max, _FLOAT32.smallest_normal)
    return flags, (float(z_loss), *cap)


def _weight(problem: Problem) -> torch.Tensor:
    # already in the input's dtype (the Problem's rule); float32 inside the kernels
    w = problem.weight
    return problem.input if w is None else w.contiguous()


def _device_guard(x: torch.Tensor):
    """Launch on x's GPU; under the interpreter (NumPy), IEEE results without warnings."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def forward(problem: Problem) -> tuple[torch.Tensor, Saved]:
    """The loss and what ``backward`` reuses.

    ``problem.input`` is ``(C,)``, ``(N, C)`` or ``(N, C, d1..dK)`` of
    float16/bfloat16/float32 (any strides: the class axis is read where it is); the
    target any integer dtype up to 32 bits or int64, or class probabilities of x's shape.
    Returns ``(loss, saved)``: the loss of ``problem.loss_shape`` in x's dtype.
    """
    return _forward(problem, load_x=True)


def forward_backward(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward``'s loss and the gradient for ``grad_output = 1`` (ones for 'none'),
    written while each tile of x is in registers: no second read of x from memory.

    The gradient is a fresh contiguous tensor of x's shape and dtype. For 'mean' its
    scale ``1 / denominator`` is needed during the pass, so the denominator is found first
    from the targets alone (a pass over ``t``, not x; for probability targets their
    count or ``total_weight``), on the device.
    """
    x = problem.input
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    denominator = None
    if problem.reduction == "mean":
        denominator = _forward(_denominator_only(problem), load_x=False)[1].denominator
    loss, _ = _forward(problem, load_x=True, grad_out=grad, denominator=denominator)
    return loss, grad


def _denominator_only(problem: Problem) -> Problem:
    """The problem whose pass over the targets alone gives the 'mean' denominator: the
    options that change it kept (``total_weight``), the others at their defaults, the
    targets left to the pass that reads x."""
    return problem.replace(
        options=Options(total_weight=problem.options.total_weight, check_targets=False)
    )


def _forward(problem: Problem, *, load_x: bool, grad_out=None, denominator=None):
    x, t, options = problem.input, problem.target, problem.options
    reduction = problem.reduction  # an unbatched 'none' is already 'sum'
    geometry = _geometry(x)
    probabilities = problem.probabilities
    positions, classes = geometry.positions, geometry.classes
    from_logits = options.from_logits
    smooth = options.label_smoothing > 0.0
    fused = grad_out is not None
    full_row = load_x and problem.over_rows
    interpreted = _interpreted(x)
    block_m, block_c, warps = _blocks(geometry, full_row or fused, interpreted)
    blocks = triton.cdiv(geometry.spatial, block_m)  # programs per b
    parts = geometry.batch * blocks
    device = x.device
    f32 = torch.float32
    loss = torch.empty(problem.loss_shape, dtype=x.dtype, device=device)
    lse = torch.empty(positions if from_logits else 0, dtype=f32, device=device)
    mass = torch.empty(positions if from_logits and probabilities else 0, dtype=f32, device=device)
    part_sums = torch.empty((2, parts), dtype=f32, device=device)
    part_bad = torch.empty(parts, dtype=torch.int64, device=device)
    targets, target_strides = _targets(t, geometry)
    flags, values = flags_and_values(options)
    with _device_guard(x):
        _kernels.forward_kernel[(parts,)](
            geometry.x, targets, _weight(problem), loss, lse, mass, part_sums[0], part_sums[1],
            part_bad, grad_out if fused else loss,
            denominator if denominator is not None else lse,
            positions, classes, geometry.spatial, blocks, *geometry.strides, *target_strides,
            *geometry.grad_strides, problem.ignore_index, float(options.label_smoothing),
            *values, FULL_ROW=full_row, FROM_LOGITS=from_logits,
            HAS_WEIGHT=problem.weight is not None, SMOOTH=smooth and load_x,
            PROBS=probabilities, **flags, WRITE_LOSS=reduction == "none",
            WRITE_LSE=from_logits, LOAD_X=load_x, FUSED_GRAD=fused,
            MEAN=denominator is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
        check_targets = options.check_targets and not probabilities  # nothing to check
        if reduction == "none" and not check_targets:
            return loss, Saved(lse, torch.empty(0, dtype=f32, device=device), mass)
        denominator = torch.empty((), dtype=f32, device=device)
        first_bad = torch.empty((), dtype=torch.int64, device=device)
        mode, given = _total_weight_mode(options.total_weight, reduction, device)
        _kernels.finish_kernel[(1,)](
            part_sums[0], part_sums[1], part_bad, parts, loss, denominator, first_bad,
            given if mode == 2 else denominator, given if mode == 1 else 0.0, positions,
            MEAN=reduction == "mean", REDUCE=reduction != "none", TOTAL_WEIGHT=mode,
            BLOCK_P=min(_FINISH_BLOCK, triton.next_power_of_2(parts)),
        )  # fmt: skip
    if check_targets:
        _raise_first_bad(first_bad, targets, problem)
    return loss, Saved(lse, denominator, mass)


def _total_weight_mode(total_weight, reduction: str, device):
    """(0, None): sum of w[t]; (1, number); (2, 0-d tensor read on the device)."""
    if total_weight is None or reduction != "mean":
        return 0, None
    if isinstance(total_weight, torch.Tensor):
        return 2, total_weight.reshape(()).to(device)  # a copy only from another device
    return 1, float(total_weight)


def _raise_first_bad(first_bad: torch.Tensor, targets: torch.Tensor, problem: Problem):
    position = int(first_bad)  # the one host synchronisation
    if position < problem.layout.size:
        raise problem.bad_target(position, int(targets[position]))


def backward(problem: Problem, grad_output: torch.Tensor, saved: Saved | None = None):
    """The gradient with respect to ``problem.input`` for the upstream ``grad_output``.

    ``grad_output`` has the loss's shape or one element. ``saved`` is ``forward``'s (from
    the same problem); without it, what is needed is recomputed (and the targets are
    checked unless ``check_targets=False``). The gradient is a fresh contiguous tensor of
    x's shape and dtype, every element written once.
    """
    x, options, reduction = problem.input, problem.options, problem.reduction
    geometry = _geometry(x)
    probabilities = problem.probabilities
    from_logits = options.from_logits
    needs = from_logits or reduction == "mean"
    if saved is not None:
        _check_saved(saved, geometry, from_logits, reduction, probabilities)
    elif needs or (options.check_targets and not probabilities):
        # the statistics of the whole, reduced: 'none' checks (and sums) as 'sum' would
        whole = problem.replace(reduction="sum") if reduction == "none" else problem
        _, saved = _forward(whole, load_x=from_logits)
    device = x.device
    per_position = reduction == "none"
    if per_position:
        g = grad_output.broadcast_to(problem.loss_shape).reshape(-1).contiguous()
    else:
        g = grad_output.reshape(-1)[:1]
    grad = torch.empty(x.shape, dtype=x.dtype, device=device)
    interpreted = _interpreted(x)
    block_m, block_c, warps = _blocks(geometry, True, interpreted)
    blocks = triton.cdiv(geometry.spatial, block_m)
    lse = saved.lse if from_logits else x
    mass = saved.mass if from_logits and probabilities else lse
    denominator = saved.denominator if reduction == "mean" else g
    targets, target_strides = _targets(problem.target, geometry)
    flags, values = flags_and_values(options)
    with _device_guard(x):
        _kernels.backward_kernel[(geometry.batch * blocks,)](
            geometry.x, targets, _weight(problem), g, denominator, lse, mass, grad,
            geometry.classes, geometry.spatial, blocks, *geometry.strides, *target_strides,
            *geometry.grad_strides, problem.ignore_index, float(options.label_smoothing),
            *values, FROM_LOGITS=from_logits, HAS_WEIGHT=problem.weight is not None,
            SMOOTH=options.label_smoothing > 0.0, PROBS=probabilities, **flags,
            PER_POSITION=per_position, MEAN=reduction == "mean",
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    return grad


def _check_saved(
    saved, geometry: _Geometry, from_logits: bool, reduction: str, probabilities: bool
) -> None:
    """A ``Saved`` from other arguments would be read out of bounds by the kernel: refuse it."""
    if not isinstance(saved, Saved):
        raise TypeError(f"saved must be the Saved that forward returned, got {type(saved)}")
    if from_logits and saved.lse.numel() != geometry.positions:
        raise ValueError(
            f"saved.lse has {saved.lse.numel()} elements, but from logits the input has "
            f"{geometry.positions} positions: pass the saved of forward on the same arguments"
        )
    if from_logits and probabilities and saved.mass.numel() != geometry.positions:
        raise ValueError(
            f"saved.mass has {saved.mass.numel()} elements, but probability targets from "
            f"logits need one per position ({geometry.positions}): pass the saved of forward "
            "on the same arguments"
        )
    if reduction == "mean" and saved.denominator.numel() != 1:
        raise ValueError(
            "saved.denominator is empty, but 'mean' needs it: pass the saved of forward on "
            "the same arguments and reduction"
        )

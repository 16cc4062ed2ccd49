"""Triton kernels of the per-token statistics (``nllloss.token_stats``) and their launcher.

One program per row of (N, C) logits (or the one row of a (C,) input), walking its
classes ``BLOCK_C`` at a time with the accumulators of the numba kernel
(``_kernels.cpu._stats``): the running maximum ``m`` of ``z = cap(x) / T`` and the first index of
it, ``s = sum exp(z - m)`` and ``u = sum exp(z - m) (z - m)`` rescaled when ``m`` rises;
``lse = m + log s``, ``entropy = log s - u / s``, ``logprob = (z_t - m) - log s``. The
row's ``(m, log s, u / s)`` are saved (float64, (N, 3)) for the gradient kernel, one more
pass over the row:
``d/dx_c = (a [c = t] - p_c (a - g + b (z_c - m - u / s))) (1 - tanh(x_c / c)**2) / T``.
In float32 (float16/bfloat16/float32 input; float64 is left to the generic path, which
keeps its precision). Deterministic: no atomics, one program per row.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..._problem import out_of_range
from ..._token_stats import Stats, TokenStats, Upstream
from . import _launch
from ._kernels import cap_and_slope, rounded

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tempered(x_ptr, offsets, mask, temperature, cap, cap_first, cap_second, HAS_CAP: tl.constexpr):
    """(z = cap(x) / T, the cap's slope 1 - tanh(x / c)**2) of a tile (-inf outside
    ``mask``; the slope is 1 without a cap). The cap is the loss kernels' (every c > 0)."""
    v = tl.load(x_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
    slope = tl.full(v.shape, 1.0, tl.float32)
    if HAS_CAP:
        capped, slope = cap_and_slope(v, cap, cap_first, cap_second)
        v = tl.where(mask, capped, float("-inf"))
    return v / temperature, slope


@triton.jit
def stats_forward_kernel(
    x_ptr, t_ptr, logprob_ptr, entropy_ptr, lse_ptr, argmax_ptr, saved_ptr,
    C, stride_row, stride_c, ignore_index, temperature, cap, cap_first, cap_second,
    HAS_CAP: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    m = float("-inf")
    s = 0.0
    u = 0.0
    arg = 0
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < C
        z, _ = _tempered(
            base,
            cols.to(tl.int64) * stride_c,
            mask,
            temperature,
            cap,
            cap_first,
            cap_second,
            HAS_CAP,
        )
        block_max = tl.max(z, 0)
        block_arg = tl.min(tl.where(z == block_max, cols, C), 0)
        arg = tl.where(block_max > m, block_arg, arg)
        new_m = tl.maximum(m, block_max)
        shift = m - new_m
        scale = tl.where(s > 0, tl.exp(shift), 0.0)
        u = tl.where(s > 0, scale * (u + shift * s), 0.0)
        s = s * scale
        d = z - new_m
        e = tl.where(mask, tl.exp(d), 0.0)
        s += tl.sum(e, 0)
        u += tl.sum(tl.where(e > 0, e * d, 0.0), 0)
        m = new_m
    log_norm = tl.log(s)
    shift_mean = u / s
    target = tl.load(t_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    safe = tl.where(ignored, 0, target)
    z_t, _ = _tempered(
        base, safe * stride_c, True, temperature, cap, cap_first, cap_second, HAS_CAP
    )
    logprob = tl.where(ignored, 0.0, (z_t - m) - log_norm)
    tl.store(logprob_ptr + row, logprob)
    tl.store(entropy_ptr + row, log_norm - shift_mean)
    tl.store(lse_ptr + row, m + log_norm)
    tl.store(argmax_ptr + row, arg.to(tl.int64))
    tl.store(saved_ptr + 3 * row, m.to(tl.float64))
    tl.store(saved_ptr + 3 * row + 1, log_norm.to(tl.float64))
    tl.store(saved_ptr + 3 * row + 2, shift_mean.to(tl.float64))


@triton.jit
def stats_backward_kernel(
    x_ptr, t_ptr, saved_ptr, upstream_ptr, grad_ptr,
    C, stride_row, stride_c, ignore_index, temperature, cap, cap_first, cap_second,
    HAS_CAP: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    m = tl.load(saved_ptr + 3 * row).to(tl.float32)
    log_norm = tl.load(saved_ptr + 3 * row + 1).to(tl.float32)
    shift_mean = tl.load(saved_ptr + 3 * row + 2).to(tl.float32)
    target = tl.load(t_ptr + row).to(tl.int64)
    a = tl.load(upstream_ptr + 3 * row).to(tl.float32)
    a = tl.where(target == ignore_index, 0.0, a)
    b = tl.load(upstream_ptr + 3 * row + 1).to(tl.float32)
    g = tl.load(upstream_ptr + 3 * row + 2).to(tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < C
        z, slope = _tempered(
            base,
            cols.to(tl.int64) * stride_c,
            mask,
            temperature,
            cap,
            cap_first,
            cap_second,
            HAS_CAP,
        )
        d = z - m
        p = tl.exp(d - log_norm)
        grad = -(p * ((a - g) + b * (d - shift_mean)))
        grad = tl.where(p == 0, 0.0, grad)
        grad += tl.where(cols == target, a, 0.0)
        if HAS_CAP:
            grad = grad * slope
        grad = grad / temperature
        out = grad_ptr + row * C + cols
        tl.store(out, rounded(grad, grad_ptr), mask=mask)


# Classes per tile: 4096 float32 values a program holds at once (a row of 32000 in 8
# tiles). Unmeasured on a GPU: no GPU run is recorded yet (the kernels are opt-in, as the
# loss's, see ``_kernels.triton``).
BLOCK_C = 4096


class TritonEngine:
    """The engine of ``_token_stats`` on the Triton kernels (torch tensors of (N, C) or (C,))."""

    @staticmethod
    def supports(stats: Stats) -> bool:
        problem = stats.problem
        x, t = problem.input, problem.target
        return (
            problem.layout.spatial == 1
            and x.dtype in SUPPORTED_DTYPES
            and t.dtype not in (torch.uint16, torch.uint32, torch.uint64)
            and x.numel() > 0
        )

    @staticmethod
    def _geometry(stats: Stats):
        """(x, target as (N,), N, C, row stride, class stride)."""
        problem = stats.problem
        layout = problem.layout
        x = problem.input.detach()
        rows, classes = layout.batch, layout.classes
        x2 = x.reshape(rows, classes)
        target = problem.target.detach().reshape(rows)
        return x2, target, rows, classes

    @staticmethod
    def _checked(stats: Stats, target, classes):
        """The IndexError of the first bad target (one host synchronisation)."""
        problem = stats.problem
        if not problem.check_targets:
            return
        bad = out_of_range(target, classes, problem.ignore_index)
        if bool(bad.any()):
            first = int(torch.argmax(bad.to(torch.int8)))
            raise problem.bad_target(first, int(target[first]))

    @staticmethod
    def _options(stats: Stats):
        flags, (_, cap, cap_first, cap_second) = _launch.flags_and_values(stats.problem.options)
        return {"temperature": stats.temperature, "cap": cap, "cap_first": cap_first,
                "cap_second": cap_second, "HAS_CAP": flags["SOFTCAP"]}  # fmt: skip

    @staticmethod
    def forward(stats: Stats):
        x2, target, rows, classes = TritonEngine._geometry(stats)
        TritonEngine._checked(stats, target, classes)
        values = [torch.empty(rows, dtype=torch.float32, device=x2.device) for _ in range(3)]
        argmax = torch.empty(rows, dtype=torch.int64, device=x2.device)
        saved = torch.empty((rows, 3), dtype=torch.float64, device=x2.device)
        with _guard(x2):
            stats_forward_kernel[(rows,)](
                x2, target, *values, argmax, saved, classes, x2.stride(0), x2.stride(1),
                stats.problem.ignore_index, BLOCK_C=min(BLOCK_C, triton.next_power_of_2(classes)),
                **TritonEngine._options(stats),
            )  # fmt: skip
        shape = stats.problem.layout.output_shape
        dtype = stats.problem.input.dtype
        result = TokenStats(*(v.reshape(shape).to(dtype) for v in values), argmax.reshape(shape))
        return result, saved

    @staticmethod
    def backward(stats: Stats, saved, upstream: Upstream):
        x2, target, rows, classes = TritonEngine._geometry(stats)
        columns = [
            torch.zeros(rows, dtype=torch.float32, device=x2.device) if a is None
            else a.detach().reshape(rows).to(torch.float32) for a in upstream
        ]  # fmt: skip
        packed = torch.stack(columns, dim=1).contiguous()
        grad = torch.empty((rows, classes), dtype=stats.problem.input.dtype, device=x2.device)
        with _guard(x2):
            stats_backward_kernel[(rows,)](
                x2, target, saved, packed, grad, classes, x2.stride(0), x2.stride(1),
                stats.problem.ignore_index, BLOCK_C=min(BLOCK_C, triton.next_power_of_2(classes)),
                **TritonEngine._options(stats),
            )  # fmt: skip
        return grad.reshape(stats.problem.input.shape)

    @staticmethod
    def forward_backward(stats: Stats, upstream: Upstream, out=None):
        result, saved = TritonEngine.forward(stats)
        grad = TritonEngine.backward(stats, saved, upstream)
        if out is not None:
            out.copy_(grad.reshape(out.shape))
            return result, out
        return result, grad


def _guard(x: torch.Tensor):
    """Launch on x's GPU; under the interpreter (NumPy), IEEE results without warnings."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


ENGINE = TritonEngine()

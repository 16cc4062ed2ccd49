"""Triton kernels of the loss and its gradient (launched by ``_launch``).

The input is viewed as ``(B, C, S)`` through its strides (class axis 1, any stride):
``(N, C, d1..dK)`` is ``(N, C, d1*...*dK)``, and ``(N, C)`` is ``(1, C, N)`` (its rows are
the positions of one batch). Position ``m`` (row-major over the target) is
``(m // S, m % S)``. A program takes ``BLOCK_M`` consecutive positions of one ``b`` and
walks the classes ``BLOCK_C`` at a time; offsets are 64-bit. A target of probabilities
(``PROBS``) is viewed the same way through its own strides.

From logits, with ``SOFTCAP`` c the logits are ``c * tanh(x / c)``, computed on each tile
as it is read (no capped copy of x), and ``lse`` is their log-sum-exp, found online in the
one read; ``logp = x - lse``. For log-probabilities ``logp = x``. With ``w`` the class
weight (1 without one), ``eps`` the label smoothing and ``W = sum_c w_c``, per position:

* class index ``t``: ``nll = -w_t * logp_t`` and ``smooth = -sum_c w_c * logp_c``;
  ``loss = (1 - eps) * nll + (eps / C) * smooth + z * lse**2 * w_t`` (the last term from
  logits with ``Z_LOSS``); 0 where the target is ignore_index and NaN where it is out of
  range (the launcher raises first, unless told not to check);
* probabilities ``p`` (``PROBS``; no ignore_index): with ``p' = (1 - eps) p + eps / C`` and
  ``P = sum_c w_c p'_c``, ``loss = -sum_c w_c p'_c logp_c + z * lse**2``, from logits as
  ``P * (lse - max) - sum_c w_c p'_c (x_c - max)`` over the running maximum (one read);
* gradient with respect to the (capped) logits, with ``s`` the upstream scale of the
  position (0 where ignored, NaN where the target is out of range) and ``q = exp(logp)``:
  index ``s * (A * q_c - (1 - eps) * w_t * [c == t] - (eps / C) * w_c)`` with
  ``A = (1 - eps) * w_t + (eps / C) * W + 2 z lse w_t``; probabilities
  ``s * ((P + 2 z lse) * q_c - w_c p'_c)``; then times ``1 - tanh(x / c)**2`` with a cap
  (``cap_and_slope``).
  For log-probabilities the same without the ``q_c`` terms.

Sums never use atomics: each program writes its partial sums, and ``finish`` adds them in
one fixed order, so every result is bitwise reproducible.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rounded(value, ptr):
    """float32 ``value`` in the element type of ``ptr``, rounded to nearest even.

    bfloat16 is rounded on the bits: Triton's interpreter truncates in its own conversion,
    and one formula keeps the interpreter's results the GPU's.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bfloat16 = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value == value, bfloat16, float("nan"))
    return value.to(ptr.dtype.element_ty)


@triton.jit
def cap_and_slope(v, cap, first, second):
    """(``c * tanh(v / c)``, its derivative ``1 - tanh(v / c)**2``) in float32, for every
    cap c = ``cap / (first * second)`` (``_generic.softcap_parts``: float32 holds neither
    1e39 nor 1e-50). With ``y = v / c`` and ``e = exp(-2|y|)``: ``tanh |y|`` is a series
    below ``|y| = 1/4`` (where ``1 - e`` would cancel), else ``(1 - e) / (1 + e)``; the
    derivative is ``4e / (1 + e)**2``, with no cancellation (``1 - t * t`` near ``|t| = 1``
    loses float32's digits); below ``|y| = sqrt(eps)`` the cap is ``v`` itself (``v / c``
    may underflow there, for a large c)."""
    y = ((v * first) / cap) * second  # (v / cap may overflow where v / c does not)
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    reciprocal = 1.0 / (1.0 + e)
    big = (1.0 - e) * reciprocal
    s = y * y
    series = s * (-1382.0 / 155925.0) + 62.0 / 2835.0
    series = s * (s * (s * (s * series - 17.0 / 315.0) + 2.0 / 15.0) - 1.0 / 3.0) + 1.0
    t = tl.where(a < 0.25, y * series, tl.where(y < 0, -big, big))
    capped = tl.where(a < 0.00034526698300124393, v, ((cap * t) / first) / second)
    return capped, (4.0 * e) * (reciprocal * reciprocal)


@triton.jit
def _positions(
    pid, S, blocks, stride_b, stride_s, t_stride_b, t_stride_s, grad_stride_b, grad_stride_s,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """This program's positions: ``BLOCK_M`` consecutive ``s`` of one ``b`` (so that the
    compiler sees them contiguous), as flat index ``m``, and their offsets in x, the target
    and grad."""
    b = (pid // blocks).to(tl.int64)
    s = (pid % blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_m = s < S
    m = b * S + s
    x_base = b * stride_b + s * stride_s
    return m, in_m, x_base, b * t_stride_b + s * t_stride_s, b * grad_stride_b + s * grad_stride_s


@triton.jit
def _targets(
    t_ptr, w_ptr, t_base, in_m, C, ignore_index, HAS_WEIGHT: tl.constexpr, PROBS: tl.constexpr
):  # fmt: skip
    """Target index (0 where unusable), and masks: counted (valid, in range), bad, w_t.
    Probabilities: every position is counted, with weight 1 (no index, nothing bad)."""
    if PROBS:
        t = tl.zeros(in_m.shape, dtype=tl.int64)
        return t, in_m, t != t, tl.where(in_m, 1.0, 0.0).to(tl.float32)
    t = tl.load(t_ptr + t_base, mask=in_m, other=0).to(tl.int64)
    valid = in_m & (t != ignore_index)
    in_range = (t >= 0) & (t < C)
    ok = valid & in_range
    bad = valid & ~in_range
    t = tl.where(ok, t, 0)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t, mask=ok, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(ok, 1.0, 0.0).to(tl.float32)
    return t, ok, bad, w_t


@triton.jit
def _target_tile(
    t_ptr, w_ptr, t_base, c, in_c, tile_mask, t_stride_c, C, eps,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
):  # fmt: skip
    """``w_c p'_c`` of a tile of probability targets (0 outside the tile)."""
    ps = tl.load(t_ptr + t_base[:, None] + c[None, :] * t_stride_c, mask=tile_mask, other=0.0)
    ps = ps.to(tl.float32)
    if SMOOTH:
        ps = tl.where(tile_mask, ps * (1.0 - eps) + eps / C, 0.0)
    if HAS_WEIGHT:
        ps = ps * tl.load(w_ptr + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
    return ps


@triton.jit
def _total_weight(w_ptr, C, HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr):
    """``W = sum_c w_c`` (C without a weight)."""
    if HAS_WEIGHT:
        total_w = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            total_w += tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        return tl.sum(total_w, axis=0)
    return C * 1.0


@triton.jit
def forward_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, mass_ptr, part_loss_ptr, part_weight_ptr,
    part_bad_ptr, grad_ptr, denominator_ptr,
    M, C, S, blocks, stride_b, stride_c, stride_s, t_stride_b, t_stride_c, t_stride_s,
    grad_stride_b, grad_stride_c, grad_stride_s,
    ignore_index, eps, z, cap, cap_first, cap_second,
    FULL_ROW: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr, PROBS: tl.constexpr, Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_LSE: tl.constexpr,
    LOAD_X: tl.constexpr, FUSED_GRAD: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per-position losses (written for 'none'), per-row lse (and ``P`` for probabilities),
    and this program's partials: sum of losses, sum of w_t over counted positions (their
    count for probabilities), first bad position (M if none).

    FUSED_GRAD: also write the gradient for ``grad_output = 1`` (the 'mean' scale is
    ``1 / denominator``, read on the device) while the rows are fresh in the cache."""
    pid = tl.program_id(0)
    m, in_m, base, t_base, grad_base = _positions(
        pid, S, blocks, stride_b, stride_s, t_stride_b, t_stride_s, grad_stride_b,
        grad_stride_s, BLOCK_M,
    )  # fmt: skip
    t, ok, bad, w_t = _targets(t_ptr, w_ptr, t_base, in_m, C, ignore_index, HAS_WEIGHT, PROBS)
    lse = tl.zeros([BLOCK_M], dtype=tl.float32)
    # index: sum_c w_c x_c (smoothing); probabilities: sum_c w_c p'_c x_c, from logits
    # with x_c less the running maximum
    weighted = tl.zeros([BLOCK_M], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)  # probabilities: P = sum_c w_c p'_c

    # x[t]: one gathered load per position (0 where not counted)
    x_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    if LOAD_X and not PROBS:
        x_t = tl.load(x_ptr + base + t * stride_c, mask=ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            x_t = cap_and_slope(x_t, cap, cap_first, cap_second)[0]
    if FULL_ROW:
        run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C).to(tl.int64)
            in_c = c < C
            tile_mask = in_m[:, None] & in_c[None, :]
            xs = tl.load(
                x_ptr + base[:, None] + c[None, :] * stride_c, mask=tile_mask, other=0.0
            ).to(tl.float32)
            if SOFTCAP:
                xs = cap_and_slope(xs, cap, cap_first, cap_second)[0]
            if PROBS:
                ps = _target_tile(
                    t_ptr, w_ptr, t_base, c, in_c, tile_mask, t_stride_c, C, eps,
                    HAS_WEIGHT, SMOOTH,
                )  # fmt: skip
                if not FROM_LOGITS:
                    weighted += tl.sum(ps * xs, axis=1)
            elif SMOOTH:
                if HAS_WEIGHT:
                    w_c = tl.load(w_ptr + c, mask=in_c, other=0.0).to(tl.float32)
                    weighted += tl.sum(tl.where(tile_mask, xs * w_c[None, :], 0.0), axis=1)
                else:
                    weighted += tl.sum(xs, axis=1)
            if FROM_LOGITS:
                masked = tl.where(tile_mask, xs, float("-inf"))
                new_max = tl.maximum(run_max, tl.max(masked, axis=1))
                # rows with no finite value yet keep a -inf maximum: scale by 0, not NaN
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                if PROBS:  # re-centred on the new maximum, then this tile added
                    old_max = tl.where(run_max == float("-inf"), 0.0, run_max)
                    weighted += mass * (old_max - safe_max) + tl.sum(
                        ps * (xs - safe_max[:, None]), axis=1
                    )
                    mass += tl.sum(ps, axis=1)
                run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(
                    tl.exp(masked - safe_max[:, None]), axis=1
                )
                run_max = new_max
        if FROM_LOGITS:
            # rows past M: 0, not log(0)
            lse = tl.where(in_m, run_max + tl.log(tl.where(in_m, run_sum, 1.0)), 0.0)
            if WRITE_LSE:
                tl.store(lse_ptr + m, lse, mask=in_m)
                if PROBS:
                    tl.store(mass_ptr + m, mass, mask=in_m)
            if PROBS:
                safe_max = tl.where(run_max == float("-inf"), 0.0, run_max)
                weighted = weighted - mass * (lse - safe_max)  # sum_c w_c p'_c logp_c
            else:
                x_t = x_t - lse
                if SMOOTH:
                    weighted = weighted - _total_weight(w_ptr, C, HAS_WEIGHT, BLOCK_C) * lse

    if PROBS:
        loss = -weighted
    else:
        loss = -(x_t * w_t)
        if SMOOTH:
            loss = (1.0 - eps) * loss - (eps / C) * weighted
    if Z_LOSS:
        loss += (z * (lse * lse)) * w_t
    loss = tl.where(ok, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    if WRITE_LOSS:
        tl.store(loss_ptr + m, rounded(loss, loss_ptr), mask=in_m)
    tl.store(part_loss_ptr + pid, tl.sum(tl.where(in_m, loss, 0.0), axis=0))
    tl.store(part_weight_ptr + pid, tl.sum(w_t, axis=0))
    tl.store(part_bad_ptr + pid, tl.min(tl.where(bad, m, M), axis=0))
    if FUSED_GRAD:
        unit = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if MEAN:
            unit = tl.math.div_rn(unit, tl.load(denominator_ptr))
        scale = tl.where(bad, float("nan"), tl.where(ok, unit, 0.0))
        _row_gradient(
            x_ptr, t_ptr, w_ptr, lse, mass, grad_ptr, base, t_base, grad_base,
            tl.where(ok, t, -1), w_t, scale, in_m, C, stride_c, t_stride_c, grad_stride_c,
            eps, z, cap, cap_first, cap_second,
            FROM_LOGITS, HAS_WEIGHT, SMOOTH, PROBS, Z_LOSS, SOFTCAP, BLOCK_M, BLOCK_C,
        )  # fmt: skip


@triton.jit
def finish_kernel(
    part_loss_ptr, part_weight_ptr, part_bad_ptr, n_parts, out_ptr, denominator_ptr, bad_ptr,
    total_weight_ptr, total_weight, M,
    MEAN: tl.constexpr, REDUCE: tl.constexpr, TOTAL_WEIGHT: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One program: the partials added in float64, in index order, a block at a time.

    TOTAL_WEIGHT: 0 = the sum of w_t, 1 = the number ``total_weight``, 2 = the 0-d tensor at
    ``total_weight_ptr``. Writes the reduced loss, the denominator and the first bad position.
    """
    loss = tl.zeros([BLOCK_P], dtype=tl.float64)
    weight = tl.zeros([BLOCK_P], dtype=tl.float64)
    bad = tl.zeros([BLOCK_P], dtype=tl.int64) + M
    for start in range(0, n_parts, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        in_p = p < n_parts
        loss += tl.load(part_loss_ptr + p, mask=in_p, other=0.0).to(tl.float64)
        weight += tl.load(part_weight_ptr + p, mask=in_p, other=0.0).to(tl.float64)
        bad = tl.minimum(bad, tl.load(part_bad_ptr + p, mask=in_p, other=M))
    total_loss = tl.sum(loss, axis=0)
    if TOTAL_WEIGHT == 1:
        denominator = tl.cast(total_weight, tl.float64)
    elif TOTAL_WEIGHT == 2:
        denominator = tl.load(total_weight_ptr).to(tl.float64)
    else:
        denominator = tl.sum(weight, axis=0)
    if REDUCE:
        if MEAN:
            total_loss = total_loss / denominator
        tl.store(out_ptr, rounded(total_loss.to(tl.float32), out_ptr))
    tl.store(denominator_ptr, denominator.to(tl.float32))
    tl.store(bad_ptr, tl.min(bad, axis=0))


@triton.jit
def _row_gradient(
    x_ptr, t_ptr, w_ptr, lse, mass, grad_ptr, base, t_base, grad_base, t, w_t, scale, in_m,
    C, stride_c, t_stride_c, grad_stride_c, eps, z, cap, cap_first, cap_second,
    FROM_LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    PROBS: tl.constexpr, Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Write the gradient of a tile of positions, every class once; ``t`` is -1 where the
    position is not counted (no one-hot term there: +0.0, as torch, not -0.0)."""
    on_target = -(1.0 - eps) * w_t * scale if SMOOTH else -(w_t * scale)
    if FROM_LOGITS:
        if PROBS:
            softmax_scale = mass
        elif SMOOTH:
            total = _total_weight(w_ptr, C, HAS_WEIGHT, BLOCK_C)
            softmax_scale = (1.0 - eps) * w_t + (eps / C) * total
        else:
            softmax_scale = w_t
        if Z_LOSS:  # d(z lse**2)/dx_c = 2 z lse q_c, times the position's weight
            softmax_scale += (2.0 * z) * lse * (1.0 if PROBS else w_t)
        softmax_scale = softmax_scale * scale
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C).to(tl.int64)
        in_c = c < C
        tile_mask = in_m[:, None] & in_c[None, :]
        if PROBS:
            ps = _target_tile(
                t_ptr, w_ptr, t_base, c, in_c, tile_mask, t_stride_c, C, eps, HAS_WEIGHT, SMOOTH
            )
            grad = -(ps * scale[:, None])
        else:
            grad = tl.where(c[None, :] == t[:, None], on_target[:, None], 0.0)
        if FROM_LOGITS:
            xs = tl.load(x_ptr + base[:, None] + c[None, :] * stride_c, mask=tile_mask, other=0.0)
            xs = xs.to(tl.float32)
            if SOFTCAP:
                xs, slope = cap_and_slope(xs, cap, cap_first, cap_second)
            p = tl.exp(xs - lse[:, None])
            grad += softmax_scale[:, None] * p
        if SMOOTH and not PROBS:
            if HAS_WEIGHT:
                w_c = tl.load(w_ptr + c, mask=in_c, other=0.0).to(tl.float32)
                grad -= (eps / C) * w_c[None, :] * scale[:, None]
            else:
                grad -= (eps / C) * scale[:, None]
        if SOFTCAP:  # back through the cap: d(c tanh(x / c))/dx = 1 - tanh(x / c)**2
            grad = grad * slope
        tl.store(
            grad_ptr + grad_base[:, None] + c[None, :] * grad_stride_c,
            rounded(grad, grad_ptr),
            mask=tile_mask,
        )


@triton.jit
def backward_kernel(
    x_ptr, t_ptr, w_ptr, g_ptr, denominator_ptr, lse_ptr, mass_ptr, grad_ptr,
    C, S, blocks, stride_b, stride_c, stride_s, t_stride_b, t_stride_c, t_stride_s,
    grad_stride_b, grad_stride_c, grad_stride_s,
    ignore_index, eps, z, cap, cap_first, cap_second,
    FROM_LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    PROBS: tl.constexpr, Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    PER_POSITION: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The gradient for upstream ``g`` (one per position for 'none', else one scalar; the
    'mean' scale is ``g / denominator``), written once per element; ``grad`` is contiguous.
    From logits it reads the forward's lse (and ``P`` for probabilities)."""
    pid = tl.program_id(0)
    m, in_m, base, t_base, grad_base = _positions(
        pid, S, blocks, stride_b, stride_s, t_stride_b, t_stride_s, grad_stride_b,
        grad_stride_s, BLOCK_M,
    )  # fmt: skip
    t, ok, bad, w_t = _targets(t_ptr, w_ptr, t_base, in_m, C, ignore_index, HAS_WEIGHT, PROBS)
    if PER_POSITION:
        g = tl.load(g_ptr + m, mask=in_m, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr).to(tl.float32)
        if MEAN:
            g = tl.math.div_rn(g, tl.load(denominator_ptr))
        g = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + g
    scale = tl.where(ok, g, 0.0)
    scale = tl.where(bad, float("nan"), scale)
    lse = tl.load(lse_ptr + m, mask=in_m, other=0.0).to(tl.float32) if FROM_LOGITS else scale
    mass = scale
    if FROM_LOGITS and PROBS:
        mass = tl.load(mass_ptr + m, mask=in_m, other=0.0).to(tl.float32)
    _row_gradient(
        x_ptr, t_ptr, w_ptr, lse, mass, grad_ptr, base, t_base, grad_base,
        tl.where(ok, t, -1), w_t, scale, in_m, C, stride_c, t_stride_c, grad_stride_c,
        eps, z, cap, cap_first, cap_second,
        FROM_LOGITS, HAS_WEIGHT, SMOOTH, PROBS, Z_LOSS, SOFTCAP, BLOCK_M, BLOCK_C,
    )  # fmt: skip

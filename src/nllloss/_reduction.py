"""PyTorch's CPU summation order for 'sum' and 'mean', reproduced bit for bit in NumPy.

torch 2.13's CPU kernels (``nll_loss_out_frame``, ``nll_loss2d_forward_out_frame`` in ATen)
do not sum left to right. They keep eight partial sums ("levels"), add every element
into level 0, and after adding the element at flat index ``b`` they *flush*: when the
lowest ``power`` bits of ``b`` are zero, level 0 is added into level 1 and cleared; when
the next ``power`` bits are also zero, level 1 goes into level 2; and so on up to level 7.
At the end the levels are added in order, starting from ``+0.0``. ``power`` is 4 unless
there are more than 2**39 elements. Ignored elements are skipped *and do not flush*, so
the ignore pattern changes the rounding. Every operation rounds to the accumulation
dtype.

Vectorised: each level is a sequence of "segmented" running sums. A segment ends at a
flush point deep enough for that level; its values are added sequentially from ``+0.0``
(``np.add.accumulate`` is sequential, unlike ``np.sum``'s pairwise order). Ignored
elements enter as ``+0.0``: adding ``+0.0`` to a running sum that started at ``+0.0``
never changes it, so only the flush points need to know about ignoring.
"""

from __future__ import annotations

import functools

import numpy as np

LEVELS = 8


def level_power(size: int) -> int:
    """torch's ``max(4, CeilLog2(size) / 8)``: bits of the flat index per level."""
    return max(4, (size - 1).bit_length() // LEVELS)


def cascade_plan(valid: np.ndarray) -> CascadePlan:
    """The plan for a target whose non-ignored elements are ``valid`` (flat, row-major)."""
    size = valid.shape[0]
    step = 1 << level_power(size)
    if valid[::step].all():
        return _plan_without_ignored_flushes(size)  # the usual case: depends on size alone
    return CascadePlan(size, np.flatnonzero(valid[::step]) * step)


@functools.lru_cache(maxsize=32)
def _plan_without_ignored_flushes(size: int) -> CascadePlan:
    step = 1 << level_power(size)
    return CascadePlan(size, np.arange(0, size, step))


class CascadePlan:
    """The segment structure of the cascade for one target: which values each level sums.

    Built from the flush points (the non-ignored flat indices whose lowest ``power`` bits
    are zero) and applied to the losses and, when weighted, to the weights.
    """

    def __init__(self, size: int, flush_at: np.ndarray):
        power = level_power(size)
        # depth[i]: how many levels the flush at flush_at[i] pushes up (index 0 pushes all 7).
        depth = np.zeros(flush_at.shape, dtype=np.intp)
        for j in range(1, LEVELS):
            depth += (flush_at & ((1 << (power * j)) - 1)) == 0
        # Level 0 sums the elements and its segments end at every flush point. Level j+1
        # receives one value per flush of level j, in order, and its segments end at those
        # of them that are deep enough.
        self._levels = [_Segments(flush_at)]
        for j in range(1, LEVELS):
            keep = depth >= j + 1
            self._levels.append(_Segments(np.flatnonzero(keep)))
            depth = depth[keep]

    def sum(self, values: np.ndarray) -> np.generic:
        """The cascade sum of ``values`` (zeros where ignored), in ``values.dtype``."""
        total = values.dtype.type(0)
        carried = values
        for segments in self._levels:
            carried, remainder = segments.sums(carried)
            total = total + remainder
        return total


class _Segments:
    """Sequential sums of a sequence cut after each index in ``ends`` (sorted, unique).

    ``sums`` returns the sum of each closed segment and the sum of what follows the last
    end, each started from ``+0.0``. Usually every segment but the first has the same
    length (16 at every level when no flush point is ignored): those are summed as the
    rows of a reshaped view. Otherwise segments are grouped by length rounded up to a
    power of two and padded with ``+0.0``: at most twice the values' memory.
    """

    def __init__(self, ends: np.ndarray):
        self.ends = ends
        self.tail_start = int(ends[-1]) + 1 if ends.size else 0
        starts = np.concatenate(([0], ends[:-1] + 1)) if ends.size else ends
        lengths = ends + 1 - starts
        self.width = int(lengths[1]) if lengths.size > 1 else 0
        self.regular = bool(np.all(lengths[1:] == self.width))
        if not self.regular:
            buckets = np.ceil(np.log2(lengths)).astype(np.intp)
            self.groups = [
                (rows, starts[rows], lengths[rows], 1 << int(bucket))
                for bucket in np.unique(buckets)
                for rows in [np.flatnonzero(buckets == bucket)]
            ]

    def sums(self, values: np.ndarray) -> tuple[np.ndarray, np.generic]:
        ends = self.ends
        remainder = _sequential_sum(values[self.tail_start :])
        if not ends.size:
            return ends.astype(values.dtype), remainder
        emitted = np.empty(ends.shape, dtype=values.dtype)
        if self.regular:
            emitted[0] = _sequential_sum(values[: ends[0] + 1])
            if ends.size > 1:
                body = values[ends[0] + 1 : self.tail_start].reshape(-1, self.width)
                emitted[1:] = _row_sums(body)
        else:
            for rows, starts, lengths, width in self.groups:
                offsets = np.arange(width)
                inside = offsets < lengths[:, None]
                index = np.where(inside, starts[:, None] + offsets, 0)
                emitted[rows] = _row_sums(np.where(inside, values[index], values.dtype.type(0)))
        return emitted, remainder


def _row_sums(rows: np.ndarray) -> np.ndarray:
    # accumulate starts from the first value, not from +0.0: adding +0.0 afterwards turns a
    # -0.0 result into +0.0 and changes nothing else.
    return np.add.accumulate(rows, axis=1)[:, -1] + rows.dtype.type(0)


def _sequential_sum(values: np.ndarray) -> np.generic:
    if not values.size:
        return values.dtype.type(0)
    return _row_sums(values[None, :])[0]

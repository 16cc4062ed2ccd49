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

import numpy as np

LEVELS = 8


def level_power(size: int) -> int:
    """torch's ``max(4, CeilLog2(size) / 8)``: bits of the flat index per level."""
    return max(4, (size - 1).bit_length() // LEVELS)


class CascadePlan:
    """The segment structure of the cascade for one target: which values each level sums.

    Built once per call from the flush points (the non-ignored flat indices whose lowest
    ``power`` bits are zero) and applied to the losses and, when weighted, to the weights.
    """

    def __init__(self, valid: np.ndarray):
        size = valid.shape[0]
        power = level_power(size)
        flush_at = np.flatnonzero(valid[:: 1 << power]) << power
        # depth[i]: how many levels the flush at flush_at[i] pushes up (index 0 pushes all 7).
        depth = np.zeros(flush_at.shape, dtype=np.intp)
        for j in range(1, LEVELS):
            depth += (flush_at & ((1 << (power * j)) - 1)) == 0
        self._levels: list[tuple[np.ndarray, int]] = []
        # Level 0 sums the elements; its segments end at every flush point.
        ends = flush_at
        for j in range(LEVELS):
            self._levels.append((ends, j))
            if j + 1 < LEVELS:
                keep = depth >= j + 2
                depth = depth[keep]
                # Level j+1 receives one value per flush of level j, in order; it flushes
                # itself at those of them that are deep enough.
                ends = np.flatnonzero(keep)
        self._size = size

    def sum(self, values: np.ndarray) -> np.generic:
        """The cascade sum of ``values`` (zeros where ignored), in ``values.dtype``."""
        dtype = values.dtype.type
        total = dtype(0)
        carried = values
        for ends, _ in self._levels:
            emitted, remainder = _segment_sums(carried, ends)
            total = dtype(total + remainder)
            carried = emitted
        return total


def _segment_sums(values: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.generic]:
    """Sequential sums of ``values`` cut after each index in ``ends`` (sorted).

    Returns the sum of each closed segment and the sum of what follows the last end.
    Each sum starts from ``+0.0``.
    """
    dtype = values.dtype.type
    starts = np.concatenate(([0], ends[:-1] + 1)) if ends.size else ends
    lengths = ends + 1 - starts
    emitted = np.empty(ends.shape, dtype=values.dtype)
    # Segments are grouped by length rounded up to a power of two, padded with +0.0 and
    # summed row by row: at most twice the values' memory, O(log n) NumPy calls.
    if ends.size:
        buckets = np.ceil(np.log2(lengths)).astype(np.intp)
        for bucket in np.unique(buckets):
            rows = np.flatnonzero(buckets == bucket)
            width = 1 << int(bucket)
            emitted[rows] = _padded_row_sums(values, starts[rows], lengths[rows], width)
    tail = values[ends[-1] + 1 :] if ends.size else values
    remainder = _padded_row_sums(tail, np.zeros(1, np.intp), np.array([tail.shape[0]]), tail.shape[0])
    return emitted, remainder[0]


def _padded_row_sums(values, starts, lengths, width) -> np.ndarray:
    if width == 0:
        return np.zeros(starts.shape, dtype=values.dtype)
    offsets = np.arange(width)
    index = starts[:, None] + offsets
    inside = offsets < lengths[:, None]
    rows = np.where(inside, values[np.where(inside, index, 0)], values.dtype.type(0))
    # accumulate starts from the first value, not from +0.0: adding +0.0 afterwards turns a
    # -0.0 result into +0.0 and changes nothing else.
    return np.add.accumulate(rows, axis=1)[:, -1] + values.dtype.type(0)

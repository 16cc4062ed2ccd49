"""``nllloss eval --calibration``: accuracy, Brier score, calibration error, temperature and
bootstrap intervals of saved predictions, as sums over blocks of rows.

Every figure is unweighted (``--weight`` and ``--label-smoothing`` leave it alone) and counts
each non-ignored target element once: PRED ``(N, C, d1, ..., dK)`` gives ``N·d1⋯dK`` elements
of ``C`` scores ``z``. The model's probabilities are ``p = softmax(z)`` for logits (after
``--softcap``), ``p = exp(z)`` for log-probabilities. Each block of rows gives additive
float64 sums (:class:`CalibrationSums`); the figures come from their totals, so they do not
depend on the blocks, nor on where they were computed, beyond rounding.

Each element's figures (``FIGURES``: its rank, whether it is right, confidence, Brier term,
and its NLL at ``β`` with three derivatives) come from one numba kernel
(``_calibration_kernel``) where the compiled NumPy backend loads, else from
:func:`numpy_figures`, their float64 NumPy definition; the blocks' sums are taken over them.

The temperature ``T`` minimises the mean NLL ``f(β) = mean_i [log Z_i(β) - β s_iy]`` of
``softmax(z / T)``, ``β = 1 / T``, ``Z_i(β) = Σ_c exp(β s_ic)``, ``s = z - max_c z`` (``<= 0``).
``f`` is convex in ``β``: ``f'(β) = mean_i (E_p[s] - s_y)``, ``f''(β) = mean_i Var_p(s) >= 0``
and ``f'''(β)`` the mean third central moment, under ``p = softmax(β z)``. It is fitted in the
main pass, without reading the file again:

1. A fit on a sample of rows held in memory (:func:`fit_on_sample`) gives ``β0`` and its
   standard error ``e`` (the sample slopes' spread over the curvature, over ``sqrt(n)``);
   its steps go to the root nearest ``β`` of the slope's second-order expansion ``f' + f''
   h + f''' h² / 2`` (:meth:`TemperatureSums.step`: the error of a step cubes).
2. The window ``β0 ± W`` (:class:`Window`: ``W`` = 6 ``e``, within 0.2% and 5% of ``β0``)
   is cut in cells of ``Δ = TEMPERATURE_RTOL · β0``. The pass takes, per element, one
   exponential per score at ``β0`` and the moments ``M_n = Σ_c w_c s_c^n / n!``, ``w_c =
   exp(β0 s_c)``, ``n = 0..K``: ``P(h) = Σ_n M_n h^n`` is ``Z(β0 + h)`` to within the
   Lagrange remainder ``ε = e^{W S} W S / (K + 1) · W^K |M_K|`` over ``|h| <= W``
   (``S = max |s_c|`` over the classes of weight > 0; :func:`taylor_bounds`), and ``P'/P``
   is ``Z'/Z`` to within ``ε ((K + 1) / W + S) / (1 - ε)``. ``K`` is the least for which
   the a-priori bound ``(C - 1) r^{K+1} / sqrt(2π (K + 1))`` (``r = W / (β0 - W)``: the
   largest of ``e^{-β u} (W u)^{K+1} / (K + 1)!`` over ``u >= 0``, by Stirling) is within
   ``TAYLOR_ERROR``.
3. From the moments (:class:`WindowSums`): the slope ``f'`` summed at 16 Chebyshev nodes of
   the window; per confidence bin at ``β0 - W``, the count, the right ones and the
   confidences ``1 / P`` at the nodes; and, for each element whose confidence (increasing
   in ``β``) crosses a bin edge inside the window, where: the crossing's cell (Newton's
   steps on ``log P``), with the element's count, rightness and confidences at the nodes.
4. After the pass (:meth:`WindowSums.solve`): the minimiser is the root of the slope's
   Chebyshev interpolant (the slope is analytic in ``β``; its last coefficients, checked,
   are at float64 rounding); the reported ``β`` is the cell boundary nearest it, so ``T``
   is within ``TEMPERATURE_RTOL / 2`` of the minimiser (plus the bound's shift of the root,
   checked below ``TAYLOR_CELLS`` cells). There every figure is exact: the NLL is
   ``f(β0)`` plus the integral of the interpolated slope, the bins are those at ``β0 - W``
   moved by every crossing below the boundary, and their confidences interpolate their
   node sums. The elements' bounds ``ε`` are summed and checked too (the mean NLL and the
   confidences within ``TAYLOR_ERROR``).
5. Where a check fails or the minimiser is outside the window, the fit goes on from ``β0``
   with the steps of 1., one streamed pass over the file each, until a step moves ``β`` by
   less than ``TEMPERATURE_RTOL / 2`` of itself; the loss and ECE at ``T`` are then those of
   the last pass.

Bootstrap resamples weight element ``i`` by ``ω_ri ~ Poisson(1)`` in resample ``r``
(the Poisson bootstrap: Hanley & MacGibbon 2006, Chamandy et al. 2012), drawn by a
counter-based generator keyed on ``(seed, r, i)``, so the weights, and the intervals, are the
same for any blocks and on Dask: ``key_r`` is the ``r``-th output of SplitMix64 (Steele, Lea
and Flood 2014) seeded with ``seed``, ``u_ri`` the top 53 bits of the ``i``-th output of
SplitMix64 seeded with ``key_r`` (outputs counted from 0, ``i`` the element's position in the
target array in C order), and ``ω_ri`` the smallest ``k`` with ``u_ri < F(k)``, ``F`` the
Poisson(1) distribution function.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# A fitted temperature is within this relative distance of the minimiser.
TEMPERATURE_RTOL = 1e-4
# Newton's steps on the whole file (each a pass over it) before the fit gives up.
MAX_TEMPERATURE_PASSES = 20
# β = 1/T stays in [1 / MAX_TEMPERATURE, MAX_TEMPERATURE]: predictions that separate the
# classes perfectly drive T to 0, and constant ones leave it undetermined.
MAX_TEMPERATURE = 1e4
# Values (elements x classes) of the sample the fit starts on: 32 MiB of float32, whose
# float64 Newton steps are cheap; with 8192 elements of 1000 classes its β is within about
# 1% of the whole file's, which one or two passes over the file then refine.
SAMPLE_VALUES = 1 << 23
SAMPLE_RUNS = 64  # contiguous row ranges the sample is read in, evenly spaced
# The sample's fit stops at this fraction of its standard error (see Window), or of the
# widest window.
SAMPLE_RTOL = 0.1
# Values (resamples x elements) of the bootstrap weights drawn at once (32 MiB of float64).
BOOTSTRAP_VALUES = 1 << 22
INTERVAL = (2.5, 97.5)  # percentiles of the 95% bootstrap intervals


@dataclass(frozen=True)
class CalibrationOptions:
    """What ``--calibration`` asks for; ``beta`` is where a pass takes the temperature sums."""

    bins: int = 15
    top_k: tuple[int, ...] = ()
    bootstrap: int = 0  # resamples; 0: no intervals
    seed: int = 0
    beta: float = 1.0
    window: Window | None = None  # where the pass also fits the temperature


def counted(t: np.ndarray, ignore_index: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions (in the target array, C order) and classes of the elements whose target
    is a class: not ``ignore_index``, not out of range (the loss reports those)."""
    y = np.asarray(t).reshape(-1)
    position = np.flatnonzero((y != ignore_index) & (y >= 0) & (y < classes))
    return position, y[position].astype(np.int64)


def scores(rows: np.ndarray, position: np.ndarray, softcap: float | None) -> np.ndarray:
    """The float64 scores ``z`` of the elements at ``position`` of ``rows`` (``(elements,
    C)``), capped to ``softcap * tanh(z / softcap)``: the capped logits are the model's."""
    z = rows[position].astype(np.float64)
    return softcap * np.tanh(z / softcap) if softcap is not None else z


# The figures of an element, the columns of the arrays that :func:`figures` returns:
# the target's rank (classes scored higher, and equal ones of a lower index), whether the
# top-1 class (np.argmax: the first maximum, or the first NaN) is the target, the model's
# confidence and Brier term Σ_c (p_c - [c = y])²; at β: the NLL of softmax(β z), its first,
# second and third derivatives in β (the cumulants of z under softmax(β z) less z_y for the
# first), and the confidence 1 / Σ_c exp(β (z_c - max z)).
FIGURES = (
    "rank", "correct", "confidence", "brier",
    "nll", "slope", "curvature", "third", "confidence_at_beta",
)  # fmt: skip
(RANK, CORRECT, CONFIDENCE, BRIER, NLL, SLOPE, CURVATURE, THIRD, CONFIDENCE_AT_BETA) = range(
    len(FIGURES)
)
SPREAD, MOMENTS = len(FIGURES), len(FIGURES) + 1  # with moments: their columns


def numpy_figures(
    z: np.ndarray,
    y: np.ndarray,
    beta: float,
    from_logits: bool,
    with_model: bool = True,
    orders: int = 0,
) -> np.ndarray:
    """The figures (``FIGURES``) of the elements ``z`` (float64 rows of scores), targets
    ``y``, in float64 NumPy: their definition. Without ``with_model``, the model's own
    columns (confidence, Brier) are NaN. With ``orders`` ``K + 1``, ``K + 2`` more columns
    (``MOMENTS`` on): the spread ``max |s_c|`` over the classes of weight ``w_c > 0``, then
    the moments ``Σ_c w_c s_c^n / n!``, ``n = 0..K``, of ``s = z - max z`` under ``w =
    exp(β s)``. A class of weight 0 (a ``-inf`` score) adds nothing to the sums at ``β``."""
    out = np.full((len(y), len(FIGURES) + (orders and orders + 1)), np.nan)
    if not len(y):
        return out
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # non-finite scores
        rows = np.arange(len(y))
        at_target = z[rows, y]
        higher = (z > at_target[:, None]).sum(axis=1)
        tied_before = ((z == at_target[:, None]) & (np.arange(z.shape[1]) < y[:, None])).sum(axis=1)
        out[:, RANK] = higher + tied_before
        out[:, CORRECT] = np.argmax(z, axis=1) == y
        top = z.max(axis=1)
        shifted = z - top[:, None]  # <= 0: exp cannot overflow
        if with_model:
            exp_shifted = np.exp(shifted)
            # log p = z - lse: lse = top + log Σ for logits, 0 for log-probabilities
            lse = top + np.log(exp_shifted.sum(axis=1)) if from_logits else np.zeros(len(y))
            out[:, CONFIDENCE] = np.exp(top - lse)
            squares = np.square(exp_shifted).sum(axis=1) * np.exp(2 * (top - lse))  # Σ p_c²
            out[:, BRIER] = squares - 2 * np.exp(at_target - lse) + 1
        shifted_target = shifted[rows, y]
        weights = np.exp(beta * shifted)
        shifted = np.where(weights != 0, shifted, 0.0)  # (NaN != 0: NaN stays)
        total = weights.sum(axis=1)
        mean = (weights * shifted).sum(axis=1) / total
        deviation = shifted - mean[:, None]
        out[:, NLL] = np.log(total) - beta * shifted_target
        out[:, SLOPE] = mean - shifted_target
        out[:, CURVATURE] = (weights * deviation**2).sum(axis=1) / total
        out[:, THIRD] = (weights * deviation**3).sum(axis=1) / total
        out[:, CONFIDENCE_AT_BETA] = 1.0 / total
        if orders:
            out[:, SPREAD] = np.max(-shifted, axis=1, initial=0.0)
        for n in range(orders):
            out[:, MOMENTS + n] = (weights * shifted**n).sum(axis=1) / math.factorial(n)
    return out


def compiled_kernel():
    """The numba kernel module where the NumPy backend is the compiled one (``_kernels.cpu``),
    else None: the figures are then :func:`numpy_figures`'."""
    from .._kernels import cpu

    if cpu.load() is None or cpu.backend() is not cpu.load():
        return None
    from . import _calibration_kernel

    return _calibration_kernel


# Elements whose figures are computed at once: their figures take 4.5 MiB (with the
# window's moments up to 14 MiB, and 16 MiB of values at its nodes), whatever the block (a
# block of few classes holds millions of elements).
PIECE_ELEMENTS = 1 << 16


def figures(
    x: np.ndarray,
    t: np.ndarray,
    beta: float,
    *,
    ignore_index: int,
    from_logits: bool,
    softcap: float | None,
    with_model: bool = True,
    orders: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(position, target, figures)`` of the counted elements (:func:`counted`) of the
    predictions ``x`` ``(n, C, ...)`` and targets ``t``, ``PIECE_ELEMENTS`` at a time (with
    ``orders`` moment columns): by the numba kernel (``_calibration_kernel``) where it
    loads, else :func:`numpy_figures`."""
    x = np.asarray(x)
    classes = x.shape[1]
    position, y = counted(t, ignore_index, classes)
    kernel = compiled_kernel()
    if kernel is None:
        rows = np.moveaxis(x, 1, -1).reshape(-1, classes)  # one row of C scores per element
    else:
        if x.dtype not in (np.float32, np.float64):  # 16-bit: widened exactly
            x = x.astype(np.float32)
        x3 = np.ascontiguousarray(x).reshape(x.shape[0], classes, math.prod(x.shape[2:]))
        x3 = x3 if x3.dtype.isnative else x3.astype(x3.dtype.newbyteorder("="))
    for start in range(0, max(len(y), 1), PIECE_ELEMENTS):
        where, target = position[start : start + PIECE_ELEMENTS], y[start : start + PIECE_ELEMENTS]
        if kernel is None:
            z = scores(rows, where, softcap)
            out = numpy_figures(z, target, beta, from_logits, with_model, orders)
        else:
            out = np.full((len(target), len(FIGURES) + (orders and orders + 1)), np.nan)
            kernel.element_figures.run(  # threads or one thread, whichever pays
                len(target) * classes, None,
                x3, where, target, float(softcap or 0.0), from_logits, beta, with_model, out,
            )  # fmt: skip
        yield where, target, out


def bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin ``k`` holds confidences in ``[k/B, (k+1)/B)``; the last bin is closed (as
    torchmetrics' ``_binning_bucketize``)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)


@dataclass
class Bins:
    """Per confidence bin: elements, their summed confidence, and how many were right."""

    count: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray

    @classmethod
    def empty(cls, bins: int) -> Bins:
        return cls(np.zeros(bins), np.zeros(bins), np.zeros(bins))

    @classmethod
    def of(cls, confidence: np.ndarray, correct: np.ndarray, bins: int) -> Bins:
        index = bin_of(confidence, bins)
        return cls(
            np.bincount(index, minlength=bins).astype(np.float64),
            np.bincount(index, confidence, minlength=bins),
            np.bincount(index, correct, minlength=bins),
        )

    def add(self, other: Bins) -> Bins:
        self.count += other.count
        self.confidence += other.confidence
        self.correct += other.correct
        return self

    def errors(self) -> tuple[float, float]:
        """ECE (Σ_b n_b/n |acc_b - conf_b|) and MCE (the largest gap of a non-empty bin)."""
        used = self.count > 0
        gap = np.abs(self.correct[used] - self.confidence[used]) / self.count[used]
        total = self.count.sum()
        if not total:
            return math.nan, math.nan
        return float(np.sum(gap * self.count[used]) / total), float(gap.max())

    def table(self) -> list[dict]:
        edges = np.linspace(0.0, 1.0, len(self.count) + 1)
        rows = []
        for b, n in enumerate(self.count):
            rows.append(
                {
                    "lower": float(edges[b]),
                    "upper": float(edges[b + 1]),
                    "count": int(n),
                    "confidence": float(self.confidence[b] / n) if n else None,
                    "accuracy": float(self.correct[b] / n) if n else None,
                }
            )
        return rows


@dataclass
class TemperatureSums:
    """At ``beta``: Σ of the NLL of ``softmax(beta z)`` and of its first, second and third
    derivatives in ``beta``, over ``count`` elements, and the confidence bins of those
    probabilities."""

    beta: float
    count: int
    nll: float
    slope: float
    curvature: float
    third: float
    bins: Bins
    slope_squares: float = 0.0  # Σ of the elements' squared slopes

    @classmethod
    def of(cls, figures: np.ndarray, beta: float, bins: int) -> TemperatureSums:
        """The sums of the elements of ``figures`` (a :func:`figures` array)."""
        nll, slope, curvature, third = figures[:, NLL : THIRD + 1].sum(axis=0)
        return cls(
            beta=beta,
            count=len(figures),
            nll=float(nll),
            slope=float(slope),
            curvature=float(curvature),
            third=float(third),
            bins=Bins.of(figures[:, CONFIDENCE_AT_BETA], figures[:, CORRECT], bins),
            slope_squares=float(np.square(figures[:, SLOPE]).sum()),
        )

    def add(self, other: TemperatureSums) -> TemperatureSums:
        self.count += other.count
        self.nll += other.nll
        self.slope += other.slope
        self.curvature += other.curvature
        self.third += other.third
        self.bins.add(other.bins)
        self.slope_squares += other.slope_squares
        return self

    def relative_error(self) -> float:
        """The standard error of the root of the mean slope, relative to ``beta``, were
        these elements a sample: the slopes' spread over the curvature, over sqrt(n)."""
        n = self.count
        variance = max(self.slope_squares / n - (self.slope / n) ** 2, 0.0)
        if not (self.curvature > 0 and math.isfinite(variance)):
            return math.inf  # (a flat NLL, or scores that are not finite)
        return math.sqrt(variance / n) / (self.curvature / n) / self.beta

    def step(self) -> float:
        """The step ``h`` to ``beta - h``: the root nearest 0 of the NLL's slope there to
        second order, ``f' - f'' h + f''' h² / 2``, where it has one, else Newton's
        ``f' / f''``; 0 where the NLL is flat (all scores equal)."""
        if not self.curvature > 0:
            return 0.0
        discriminant = self.curvature**2 - 2 * self.slope * self.third
        if not discriminant >= 0:
            return self.slope / self.curvature
        # 2 f' / (f'' + sqrt(..)): the root nearest 0, without cancellation
        return 2 * self.slope / (self.curvature + math.sqrt(discriminant))


def temperature_sums(
    x: np.ndarray,
    t: np.ndarray,
    beta: float,
    bins: int,
    *,
    ignore_index: int,
    softcap: float | None,
) -> TemperatureSums:
    """:class:`TemperatureSums` of the predictions ``x`` ``(n, C, ...)``, targets ``t``."""
    total = TemperatureSums(beta, 0, 0.0, 0.0, 0.0, 0.0, Bins.empty(bins))
    options = dict(ignore_index=ignore_index, from_logits=True, softcap=softcap)
    for _, _, piece in figures(x, t, beta, **options, with_model=False):
        total.add(TemperatureSums.of(piece, beta, bins))
    return total


# The temperature in the main pass (see the module docstring): Chebyshev nodes of the
# window. On the file of benchmarks/cli_calibration.py the last two of 16 coefficients of
# the slope's interpolant are within 1e-15 of the largest; a fit whose interpolant is
# further from converged falls back.
CHEBYSHEV_NODES = 16
CHEBYSHEV_TAIL = 1e-12  # the last two coefficients, relative to the largest, at most
# The window's half-width: this many standard errors of the sample's β (the sample's
# elements' spread of slopes over its curvature), within these bounds relative to β.
WINDOW_SIGMAS = 6.0
WINDOW_BOUNDS = (2e-3, 5e-2)
# The moments M_0..M_K: K is the least for which the a-priori Taylor bound of the module
# docstring is within TAYLOR_ERROR over the window. The pass's fit stands where the
# elements' own bounds move the mean NLL by at most TAYLOR_ERROR (and the confidences,
# relative), and the root by at most TAYLOR_CELLS cells; else it falls back. On the file of
# benchmarks/cli_calibration.py (window ±4.5%) the elements' bound is 8e-11 each with
# K = 8, 5e-14 with K = 10 (measured; the a-priori rule takes K = 9).
TAYLOR_ERROR = 1e-10
TAYLOR_CELLS = 1e-3


@dataclass(frozen=True)
class Window:
    """β0 ± ``cells`` cells of ``step`` (``TEMPERATURE_RTOL`` of β0), where the pass takes
    ``orders`` moments (``K + 1``)."""

    beta: float
    step: float
    cells: int
    orders: int

    @property
    def half(self) -> float:
        return self.cells * self.step

    @classmethod
    def around(cls, beta: float, relative_error: float, classes: int) -> Window:
        """The window of ``WINDOW_SIGMAS`` standard errors around the sample's ``beta``."""
        width = min(max(WINDOW_SIGMAS * relative_error, WINDOW_BOUNDS[0]), WINDOW_BOUNDS[1])
        cells = math.ceil(width / TEMPERATURE_RTOL)
        ratio = cells * TEMPERATURE_RTOL / (1 - cells * TEMPERATURE_RTOL)  # |h| / min β
        orders = 2  # K + 1
        while (classes - 1) * ratio**orders / math.sqrt(2 * math.pi * orders) > TAYLOR_ERROR:
            orders += 1
        return cls(beta, TEMPERATURE_RTOL * beta, cells, orders)

    def nodes(self) -> np.ndarray:
        """The Chebyshev points (first kind) of ``[-half, half]``, as steps ``h`` from β0."""
        return self.half * np.polynomial.chebyshev.chebpts1(CHEBYSHEV_NODES)


def moment_polynomial(moments: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P(h) = Σ_n M_n h^n`` and ``P'(h)`` for each element's moments (rows of
    ``moments``), at ``h`` (``(elements, points)``)."""
    order = moments.shape[1] - 1
    value = np.broadcast_to(moments[:, order, None], h.shape)
    slope = np.broadcast_to(order * moments[:, order, None], h.shape)
    for n in range(order - 1, -1, -1):
        value = value * h + moments[:, n, None]
        if n:
            slope = slope * h + n * moments[:, n, None]
    return value, slope


def numpy_window_figures(
    figures: np.ndarray, nodes: np.ndarray, half: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per element (a row of ``figures`` with moments), with ``P`` its moments' polynomial:
    at each node ``h_j``, the NLL's slope ``P'(h_j) / P(h_j) - s_y`` (as its slope at β0
    plus the change of ``P'/P``), the confidence ``1 / P(h_j)``; and the confidences at
    ``-half`` and ``half``. In float64 NumPy: the definition of
    ``_calibration_kernel.window_figures``."""
    moments = figures[:, MOMENTS:]
    value, slope = moment_polynomial(moments, np.broadcast_to(nodes, (len(figures), len(nodes))))
    shift = figures[:, SLOPE] - moments[:, 1] / moments[:, 0]
    ends, _ = moment_polynomial(moments, np.broadcast_to([-half, half], (len(figures), 2)))
    return slope / value + shift[:, None], 1.0 / value, 1.0 / ends


def numpy_crossings(
    figures: np.ndarray, element: np.ndarray, level: np.ndarray, half: float
) -> np.ndarray:
    """The ``h`` in ``[-half, half]`` where ``P(h) = level`` for the elements ``element``
    (rows of ``figures``), whose ``P`` crosses it there: Newton's steps on ``log P``
    (convex and decreasing), from the chord's root. The definition of
    ``_calibration_kernel.crossings``."""
    moments = figures[element, MOMENTS:]
    ends, _ = moment_polynomial(moments, np.broadcast_to([-half, half], (len(element), 2)))
    logs = np.log(ends)
    h = -half + 2 * half * (logs[:, 0] - np.log(level)) / (logs[:, 0] - logs[:, 1])
    for _ in range(100):
        value, slope = moment_polynomial(moments, h[:, None])
        step = (np.log(value[:, 0]) - np.log(level)) * value[:, 0] / slope[:, 0]
        after = np.clip(h - step, -half, half)
        if np.all(np.abs(after - h) <= 4 * np.finfo(float).eps * half):
            return after
        h = after
    return h


def taylor_bounds(figures: np.ndarray, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Per element (a row of ``figures`` with moments ``M_0..M_K`` and spread ``S``), bounds
    over ``|h| <= half`` on ``|P(h) - Z(h)|`` (``Z = Σ_c exp((β0 + h) s_c) >= 1``: on its
    relative error too) and on ``|P'/P - Z'/Z|``: the Lagrange remainders of
    ``Σ_c w_c e^{h s_c}``, ``ε = e^{W S} W S / (K + 1) · W^K |M_K|`` (``W = half``) and
    ``ε ((K + 1) / W + S) / (1 - ε)``."""
    spread, order = figures[:, SPREAD], figures.shape[1] - MOMENTS - 1
    with np.errstate(invalid="ignore", over="ignore"):
        bound = (
            np.exp(half * spread) * (half * spread) / (order + 1)
            * half**order * np.abs(figures[:, MOMENTS + order])
        )  # fmt: skip
        return bound, bound * ((order + 1) / half + spread) / (1 - bound)


def _reduce(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``values`` summed per key (in their order: the same bits every run), keys
    sorted."""
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else keys
    return keys[starts], np.add.reduceat(values[order], starts, axis=0) if len(keys) else values


@dataclass
class WindowSums:
    """Over the elements so far, for the window: at each node ``h_j``, Σ of the NLL's
    slope; per confidence bin at β0 - half, the count, the right ones and the confidences at
    each node; per (cell, edge) of the elements whose confidence crosses the edge inside
    the cell (``key = cell * bins + edge``), their count, right ones and confidences at
    each node."""

    slope: np.ndarray
    count: np.ndarray
    correct: np.ndarray
    confidence: np.ndarray  # (bins, nodes)
    keys: np.ndarray
    moved: np.ndarray  # (keys, 2 + nodes)
    # Σ of the elements' Taylor bounds on |P - Z| (Z >= 1: relative too) and on the error
    # of P'/P, over the window
    taylor: float = 0.0
    taylor_slope: float = 0.0

    @classmethod
    def of(cls, window: Window, figures: np.ndarray, bins: int) -> WindowSums:
        """The sums of the elements of ``figures`` (with ``window.orders`` moments)."""
        nodes, half = window.nodes(), window.half
        kernel = compiled_kernel()
        if kernel is None:
            node_slopes, confidence, ends = numpy_window_figures(figures, nodes, half)
        else:
            node_slopes = np.empty((len(figures), len(nodes)))
            confidence, ends = np.empty_like(node_slopes), np.empty((len(figures), 2))
            kernel.window_figures.run(
                figures.size, None,
                figures, MOMENTS, nodes, half, node_slopes, confidence, ends,
            )  # fmt: skip
        finite = np.isfinite(ends).all(axis=1)
        with np.errstate(invalid="ignore"):
            low, high = bin_of(ends[:, 0], bins), bin_of(ends[:, 1], bins)
        high = np.where(finite, high, low)
        bound, bound_slope = taylor_bounds(figures, half)
        correct = figures[:, CORRECT]
        keys, moved = [], []
        edges = np.linspace(0.0, 1.0, bins + 1)
        for k in range(1, int((high - low).max(initial=0)) + 1):
            crossing = np.flatnonzero(high - low >= k)
            edge = low[crossing] + k
            if kernel is None:
                h = numpy_crossings(figures, crossing, 1.0 / edges[edge], half)
            else:
                h = np.empty(len(crossing))
                kernel.crossings.run(
                    len(crossing) * 100, None,
                    figures, MOMENTS, crossing, 1.0 / edges[edge], half, h,
                )  # fmt: skip
            cell = np.clip(np.floor(h / window.step) + window.cells, 0, 2 * window.cells - 1)
            keys.append(cell.astype(np.int64) * bins + edge)
            moved.append(
                np.column_stack([np.ones(len(crossing)), correct[crossing], confidence[crossing]])
            )
        keys, moved = _reduce(
            np.concatenate([np.empty(0, np.int64), *keys]),
            np.concatenate([np.empty((0, 2 + len(nodes))), *moved]),
        )
        return cls(
            slope=node_slopes.sum(axis=0),
            count=np.bincount(low, minlength=bins).astype(np.float64),
            correct=np.bincount(low, correct, minlength=bins),
            confidence=np.stack(
                [np.bincount(low, column, minlength=bins) for column in confidence.T], axis=1
            ).reshape(bins, len(nodes)),
            keys=keys,
            moved=moved,
            taylor=float(bound.sum()),
            taylor_slope=float(bound_slope.sum()),
        )

    def add(self, other: WindowSums) -> WindowSums:
        self.slope = self.slope + other.slope
        self.count = self.count + other.count
        self.correct = self.correct + other.correct
        self.confidence = self.confidence + other.confidence
        self.keys, self.moved = _reduce(
            np.concatenate([self.keys, other.keys]), np.concatenate([self.moved, other.moved])
        )
        self.taylor += other.taylor
        self.taylor_slope += other.taylor_slope
        return self

    def solve(self, window: Window, at_beta: TemperatureSums) -> TemperatureSums | None:
        """The sums at the reported temperature: β0 + h at the cell boundary nearest the
        minimiser of the interpolated NLL, when the window holds it; None when it does not
        (or an interpolant's tail is over ``CHEBYSHEV_TAIL``, a Taylor bound over its
        tolerance, or a sum not finite)."""
        chebyshev = np.polynomial.chebyshev
        points = chebyshev.chebpts1(CHEBYSHEV_NODES)  # the nodes over half
        slope = chebyshev.chebfit(points, self.slope, CHEBYSHEV_NODES - 1)
        if not (np.all(np.isfinite(slope)) and at_beta.count and np.isfinite(at_beta.nll)):
            return None
        if np.max(np.abs(slope[-2:])) > CHEBYSHEV_TAIL * np.max(np.abs(slope)):
            return None
        if not self.taylor <= TAYLOR_ERROR * at_beta.count:
            return None
        low, high = -1.0, 1.0
        if not chebyshev.chebval(low, slope) < 0 < chebyshev.chebval(high, slope):
            return None  # the minimiser is outside the window (or the NLL is flat)
        for _ in range(64):  # bisection on the increasing slope: to float64's precision
            middle = 0.5 * (low + high)
            low, high = (middle, high) if chebyshev.chebval(middle, slope) < 0 else (low, middle)
        root = 0.5 * (low + high)
        # the slope's error bound moves the root by at most that over the curvature
        curvature = chebyshev.chebval(root, chebyshev.chebder(slope)) / window.half
        if not self.taylor_slope <= TAYLOR_CELLS * window.step * curvature:
            return None
        boundary = round(root * window.cells)  # cells from β0
        beta = window.beta + boundary * window.step
        if not 1 / MAX_TEMPERATURE <= beta <= MAX_TEMPERATURE:
            return None
        at = boundary / window.cells  # the reported β, over half
        integral = chebyshev.chebint(slope)
        nll = at_beta.nll + window.half * (
            chebyshev.chebval(at, integral) - chebyshev.chebval(0.0, integral)
        )
        # the bins at β: those at β0 - half, then the crossings of the cells below β
        bins = len(self.count)
        count, correct = self.count.copy(), self.correct.copy()
        confidence = self.confidence.copy()
        crossed = self.keys // bins < boundary + window.cells
        edge, moved = self.keys[crossed] % bins, self.moved[crossed]
        for into, sign in ((edge, 1.0), (edge - 1, -1.0)):
            count += sign * np.bincount(into, moved[:, 0], minlength=bins)
            correct += sign * np.bincount(into, moved[:, 1], minlength=bins)
            for j in range(CHEBYSHEV_NODES):
                confidence[:, j] += sign * np.bincount(into, moved[:, 2 + j], minlength=bins)
        # each bin's confidences at the nodes, analytic in β as the slope is: their
        # interpolants are held to the same tail
        tails = chebyshev.chebfit(points, confidence.T, CHEBYSHEV_NODES - 1)
        if not np.max(np.abs(tails[-2:])) <= CHEBYSHEV_TAIL * np.max(np.abs(tails)):
            return None
        # the interpolant's value at `at`: its Lagrange weights at the nodes
        identity = np.eye(CHEBYSHEV_NODES)
        lagrange = chebyshev.chebval(at, chebyshev.chebfit(points, identity, CHEBYSHEV_NODES - 1))
        derivative = chebyshev.chebder(slope)
        return TemperatureSums(
            beta=beta,
            count=at_beta.count,
            nll=float(nll),
            slope=float(chebyshev.chebval(at, slope)),
            curvature=float(chebyshev.chebval(at, derivative) / window.half),
            third=float(chebyshev.chebval(at, chebyshev.chebder(derivative)) / window.half**2),
            bins=Bins(count, confidence @ lagrange, correct),
        )


@dataclass
class CalibrationSums:
    """The additive sums of a block (or of every block so far)."""

    count: int
    correct: float
    top_k: np.ndarray  # per K asked for: elements whose target ranks among the top K
    brier: float
    bins: Bins  # of the model's own probabilities
    at_beta: TemperatureSums  # at the pass's beta
    # per bootstrap resample: Σω, Σω·loss, Σω·denominator, Σω·correct, then per bin Σω,
    # Σω·confidence, Σω·correct
    resampled: np.ndarray | None = field(default=None, repr=False)
    window: WindowSums | None = field(default=None, repr=False)  # with options.window

    def add(self, other: CalibrationSums) -> CalibrationSums:
        self.count += other.count
        self.correct += other.correct
        self.top_k = self.top_k + other.top_k
        self.brier += other.brier
        self.bins.add(other.bins)
        self.at_beta.add(other.at_beta)
        if self.window is not None:
            self.window.add(other.window)
        if self.resampled is not None:
            self.resampled = self.resampled + other.resampled
        return self


def calibration_sums(
    x: np.ndarray,
    t: np.ndarray,
    first_row: int,
    options: CalibrationOptions,
    *,
    ignore_index: int,
    from_logits: bool,
    softcap: float | None,
    losses: np.ndarray | None = None,
    denominators: np.ndarray | None = None,
) -> CalibrationSums:
    """The sums of one block: predictions ``x`` ``(n, C, ...)``, targets ``t``, from row
    ``first_row``; ``losses`` and ``denominators`` (per target element, as the loss reduces
    them) are needed for the bootstrap only."""
    total = None
    window = options.window
    pieces = figures(
        x,
        t,
        options.beta,
        ignore_index=ignore_index,
        from_logits=from_logits,
        softcap=softcap,
        orders=0 if window is None else window.orders,
    )
    for position, _, piece in pieces:
        confidence, correct = piece[:, CONFIDENCE], piece[:, CORRECT]
        sums = CalibrationSums(
            count=len(piece),
            correct=float(correct.sum()),
            top_k=np.array([np.count_nonzero(piece[:, RANK] < k) for k in options.top_k], float),
            brier=float(piece[:, BRIER].sum()),
            bins=Bins.of(confidence, correct, options.bins),
            at_beta=TemperatureSums.of(piece, options.beta, options.bins),
            window=None if window is None else WindowSums.of(window, piece, options.bins),
        )
        if options.bootstrap:
            elements_per_row = math.prod(t.shape[1:])
            index = first_row * elements_per_row + position
            per_element = (
                np.asarray(losses, dtype=np.float64).reshape(-1)[position],
                np.asarray(denominators, dtype=np.float64).reshape(-1)[position],
                correct,
            )
            sums.resampled = _resampled(options, index, per_element, confidence)
        total = sums if total is None else total.add(sums)
    return total


# SplitMix64's increment and output mix (Steele, Lea and Flood 2014; Vigna's splitmix64.c).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX[0]
    z = (z ^ (z >> np.uint64(27))) * _MIX[1]
    return z ^ (z >> np.uint64(31))


def splitmix64(seed: int, counters: np.ndarray) -> np.ndarray:
    """The ``counters``-th outputs (from 0) of SplitMix64 seeded with ``seed``."""
    with np.errstate(over="ignore"):
        state = np.uint64(seed % 2**64) + (np.asarray(counters, np.uint64) + np.uint64(1)) * _GAMMA
        return _mix(state)


def _poisson_cdf() -> np.ndarray:
    """F(k) = P(Poisson(1) <= k) for k = 0..19 (F(19) is 1 to float64's precision)."""
    terms = [math.exp(-1.0) / math.factorial(k) for k in range(20)]
    return np.cumsum(terms)


POISSON_CDF = _poisson_cdf()


def poisson_weights(seed: int, resamples: int, index: np.ndarray) -> np.ndarray:
    """``ω[r, i]`` of the module's docstring, for ``r < resamples`` and the positions ``index``."""
    keys = splitmix64(seed, np.arange(resamples))
    out = np.empty((resamples, len(index)))
    for r, key in enumerate(keys):
        uniform = (splitmix64(int(key), index) >> np.uint64(11)) * 2.0**-53
        out[r] = np.searchsorted(POISSON_CDF, uniform, side="right")
    return out


def _resampled(
    options: CalibrationOptions,
    index: np.ndarray,
    per_element: tuple[np.ndarray, ...],
    confidence: np.ndarray,
) -> np.ndarray:
    """Per resample, the weighted sums of the resampled statistics (one matrix product)."""
    correct = per_element[2]
    one_hot = np.zeros((len(index), options.bins))
    one_hot[np.arange(len(index)), bin_of(confidence, options.bins)] = 1.0
    values = np.column_stack(
        [
            np.ones(len(index)),
            *per_element,
            one_hot,
            one_hot * confidence[:, None],
            one_hot * correct[:, None],
        ]
    )
    out = np.zeros((options.bootstrap, values.shape[1]))
    step = max(1, BOOTSTRAP_VALUES // options.bootstrap)
    for start in range(0, len(index), step):
        weights = poisson_weights(options.seed, options.bootstrap, index[start : start + step])
        out += weights @ values[start : start + step]
    return out


def intervals(resampled: np.ndarray, bins: int, mean_loss: bool) -> dict[str, list[float]]:
    """95% percentile intervals of the loss, the accuracy and the ECE over the resamples."""
    count, loss, denominator, correct = resampled[:, :4].T
    _, bin_confidence, bin_correct = np.split(resampled[:, 4:], 3, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        statistics = {
            "loss": loss / denominator if mean_loss else loss,
            "accuracy": correct / count,
            "ece": np.abs(bin_correct - bin_confidence).sum(axis=1) / count,
        }
    return {
        name: [float(v) for v in np.percentile(values, INTERVAL)]
        for name, values in statistics.items()
    }


def newton(sums: TemperatureSums, sums_at, rtol: float, max_steps: int):
    """The fit's steps (:meth:`TemperatureSums.step`) on β from ``sums`` (at its β);
    ``sums_at(beta)`` gives the sums at another. Steps are kept within a factor 4 and β
    within the bounds of ``MAX_TEMPERATURE``. Returns the last sums and whether a step fell
    under ``rtol / 2`` of β."""
    for _ in range(max_steps):
        step = sums.step()
        if abs(step) <= 0.5 * rtol * sums.beta:
            return sums, True
        beta = min(max(sums.beta - step, sums.beta / 4), sums.beta * 4)
        beta = min(max(beta, 1 / MAX_TEMPERATURE), MAX_TEMPERATURE)
        if beta == sums.beta:  # at a bound, still pushed beyond it
            return sums, False
        sums = sums_at(beta)
    return sums, abs(sums.step()) <= 0.5 * rtol * sums.beta


def sample_rows(rows: int, row_values: int) -> list[tuple[int, int]]:
    """Row ranges of the temperature's starting sample: ``SAMPLE_RUNS`` evenly spaced runs
    holding ``SAMPLE_VALUES`` values in all (every row when they fit)."""
    wanted = max(1, SAMPLE_VALUES // max(row_values, 1))
    if wanted >= rows:
        return [(0, rows)] if rows else []
    runs = min(SAMPLE_RUNS, wanted)
    length = wanted // runs
    return [(r * rows // runs, r * rows // runs + length) for r in range(runs)]


def report(
    sums: CalibrationSums,
    at_temperature: TemperatureSums,
    options: CalibrationOptions,
    mean_loss: bool,
) -> dict:
    """The calibration section of the report (NaN where no element counts)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.float64(sums.count)
        ece, mce = sums.bins.errors()
        fitted = at_temperature.count > 0
        section = {
            "count": sums.count,
            "accuracy": float(sums.correct / n),
            "top_k_accuracy": {
                str(k): float(hits / n) for k, hits in zip(options.top_k, sums.top_k, strict=True)
            },
            "brier": float(sums.brier / n),
            "ece": ece,
            "mce": mce,
            "bins": sums.bins.table(),
            "temperature": 1.0 / at_temperature.beta if fitted else math.nan,
            "loss_at_temperature": float(at_temperature.nll / np.float64(at_temperature.count)),
            "ece_at_temperature": at_temperature.bins.errors()[0],
        }
    if sums.resampled is not None:
        section["intervals"] = intervals(sums.resampled, options.bins, mean_loss)
        section["resamples"] = options.bootstrap
        section["seed"] = options.seed
    return section


def fit_on_sample(
    predictions, targets, ignore_index: int, softcap, bins: int
) -> tuple[float, float] | None:
    """β fitted on the rows of :func:`sample_rows`, read here, and its standard error
    relative to β; None where they hold no element. Where the sample is every row, β is
    fitted to float64 precision (within the bounds) and the error is 0; else to
    ``SAMPLE_RTOL`` of the error."""
    row_values = math.prod(predictions.shape[1:])
    ranges = sample_rows(predictions.shape[0], row_values)
    runs = [(predictions.rows(start, stop), targets.rows(start, stop)) for start, stop in ranges]

    def sums_at(beta: float) -> TemperatureSums:
        total = TemperatureSums(beta, 0, 0.0, 0.0, 0.0, 0.0, Bins.empty(bins))
        for x, t in runs:
            total.add(
                temperature_sums(x, t, beta, bins, ignore_index=ignore_index, softcap=softcap)
            )
        return total

    start = sums_at(1.0)
    if not start.count:
        return None
    if ranges == [(0, predictions.shape[0])]:  # every row: the minimiser itself
        return newton(start, sums_at, 1e-9, 100)[0].beta, 0.0
    # to a tenth of the sample's own standard error: the window spans six of them
    rtol = min(SAMPLE_RTOL * start.relative_error(), SAMPLE_RTOL * WINDOW_BOUNDS[1])
    at = newton(start, sums_at, rtol, 100)[0]
    return at.beta, at.relative_error()

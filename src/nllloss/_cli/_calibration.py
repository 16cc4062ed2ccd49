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

The temperature ``T`` minimises the mean NLL ``f(β) = mean_i [log Σ_c exp(β z_ic) - β z_iy]``
of ``softmax(z / T)``, ``β = 1 / T``. ``f`` is convex in ``β``: ``f'(β) = mean_i (E_p[z] -
z_y)``, ``f''(β) = mean_i Var_p(z) >= 0`` and ``f'''(β)`` the mean third central moment, under
``p = softmax(β z)``. The fit steps to the root nearest ``β`` of the slope's second-order
expansion ``f' + f'' h + f''' h² / 2`` (:meth:`TemperatureSums.step`: the error of a step
cubes, where Newton's squares), first on a sample of rows held in memory
(:func:`sample_rows`), then on the whole file, one streamed pass per step, until a step
moves ``β`` by less than ``TEMPERATURE_RTOL / 2`` of itself; the loss and ECE at ``T`` are
those of the last pass.

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


def numpy_figures(
    z: np.ndarray, y: np.ndarray, beta: float, from_logits: bool, with_model: bool = True
) -> np.ndarray:
    """The figures (``FIGURES``) of the elements ``z`` (float64 rows of scores), targets
    ``y``, in float64 NumPy: their definition. Without ``with_model``, the model's own
    columns (confidence, Brier) are NaN."""
    out = np.full((len(y), len(FIGURES)), np.nan)
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
        weights = np.exp(beta * shifted)
        total = weights.sum(axis=1)
        mean = (weights * shifted).sum(axis=1) / total
        deviation = shifted - mean[:, None]
        shifted_target = shifted[rows, y]
        out[:, NLL] = np.log(total) - beta * shifted_target
        out[:, SLOPE] = mean - shifted_target
        out[:, CURVATURE] = (weights * deviation**2).sum(axis=1) / total
        out[:, THIRD] = (weights * deviation**3).sum(axis=1) / total
        out[:, CONFIDENCE_AT_BETA] = 1.0 / total
    return out


def compiled_kernel():
    """The numba kernel module where the NumPy backend is the compiled one (``_kernels.cpu``),
    else None: the figures are then :func:`numpy_figures`'."""
    from .._kernels import cpu

    if cpu.load() is None or cpu.backend() is not cpu.load():
        return None
    from . import _calibration_kernel

    return _calibration_kernel


# Elements whose figures are computed at once: their figures take 4.5 MiB, whatever the
# block (a block of few classes holds millions of elements).
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
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(position, target, figures)`` of the counted elements (:func:`counted`) of the
    predictions ``x`` ``(n, C, ...)`` and targets ``t``, ``PIECE_ELEMENTS`` at a time: by
    the numba kernel (``_calibration_kernel``) where it loads, else :func:`numpy_figures`."""
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
            out = numpy_figures(z, target, beta, from_logits, with_model)
        else:
            out = np.full((len(target), len(FIGURES)), np.nan)
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
        )

    def add(self, other: TemperatureSums) -> TemperatureSums:
        self.count += other.count
        self.nll += other.nll
        self.slope += other.slope
        self.curvature += other.curvature
        self.third += other.third
        self.bins.add(other.bins)
        return self

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

    def add(self, other: CalibrationSums) -> CalibrationSums:
        self.count += other.count
        self.correct += other.correct
        self.top_k = self.top_k + other.top_k
        self.brier += other.brier
        self.bins.add(other.bins)
        self.at_beta.add(other.at_beta)
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
    pieces = figures(
        x, t, options.beta, ignore_index=ignore_index, from_logits=from_logits, softcap=softcap
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


def fit_on_sample(predictions, targets, ignore_index: int, softcap, bins: int) -> float:
    """β fitted (to float64 precision, within the bounds) on the rows of :func:`sample_rows`,
    read here; 1 where they hold no element."""
    row_values = math.prod(predictions.shape[1:])
    runs = [
        (predictions.rows(start, stop), targets.rows(start, stop))
        for start, stop in sample_rows(predictions.shape[0], row_values)
    ]

    def sums_at(beta: float) -> TemperatureSums:
        total = TemperatureSums(beta, 0, 0.0, 0.0, 0.0, 0.0, Bins.empty(bins))
        for x, t in runs:
            total.add(
                temperature_sums(x, t, beta, bins, ignore_index=ignore_index, softcap=softcap)
            )
        return total

    start = sums_at(1.0)
    if not start.count:
        return 1.0
    return newton(start, sums_at, 1e-9, 100)[0].beta

"""``nllloss eval``'s arithmetic: the loss of saved predictions, a block of rows at a time.

Each block of rows gives its :class:`Totals` (loss numerator, total weight, counts, and per
class the count, the NLL and the loss); totals of blocks add up, and the loss is computed once
from the sums:

* ``'sum'``: the sum of the blocks' ``reduction='sum'`` losses;
* ``'mean'``: that sum divided by the sum of the blocks' total weights
  (``nllloss.total_weight``: the sum of ``w[t]`` over non-ignored targets, or their count;
  for targets of class probabilities, the number of target elements, as torch divides);
  with label smoothing (and ``z_loss``) this is still torch's formula, whose terms share
  the denominator;
* ``'none'``: the blocks' element-wise losses, written in place.

Sums across blocks are taken in float64 in block order, so the result does not depend on
where the blocks are computed (here or on Dask workers). One block of log-probabilities
gives the one-shot value bit for bit: torch's float32 sum and total weight, divided and
rounded once (with ``from_logits``, the core's own 'mean' divides its float64 sum before
rounding: one rounding apart at most). float16
and bfloat16 blocks are widened to float32 first (exactly), as nllloss accumulates them
anyway: a 16-bit partial sum would round at every block, and overflow past 65504.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

import nllloss

from .. import _validate
from ._calibration import (
    MAX_TEMPERATURE_PASSES,
    TEMPERATURE_RTOL,
    CalibrationOptions,
    CalibrationSums,
    TemperatureSums,
    Window,
    calibration_sums,
    fit_on_sample,
    newton,
    report,
    temperature_sums,
)
from ._io import Source, UserError

# Where --chunk-rows is not given, blocks hold about this many bytes of predictions.
# benchmarks/cli_eval.py (results/cli-eval-latest.md), 2-core shared machine, a 1 GB
# (262144, 1000) float32 file: log-probabilities ran at 1.1-2.1 GB/s and logits
# (--from-logits) at 0.3-0.4 GB/s with blocks of 4 to 64 MiB (16 MiB at least as fast as
# any), slower at 256 MiB; the peak memory grows with the block (logits: 173 MB at 16 MiB,
# 391 MB at 64 MiB, 1.2 GB at 256 MiB; 4.3 GB for np.load of the file).
DEFAULT_BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class Options:
    """What to compute; the same for every block."""

    classes: int
    weight: np.ndarray | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    from_logits: bool = False
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    probabilities: bool = False  # the targets are class probabilities, not indices
    per_class: bool = False  # (class indices only)
    calibration: CalibrationOptions | None = None  # (class indices only)


@dataclass
class Totals:
    """Sums over the rows seen so far (float64 sums of the blocks' values)."""

    loss_sum: float = 0.0  # the 'sum' loss: weighted (and smoothed) per-element losses
    total_weight: float = 0.0  # the 'mean' denominator
    count: int = 0  # non-ignored target elements
    ignored: int = 0
    nll_sum: float = 0.0  # unweighted -log p at the targets, for the perplexity
    nan_count: int = 0  # NaN values in the predictions
    # per class (with per_class): non-ignored targets, their -log p, their share of loss_sum
    class_count: np.ndarray | None = None
    class_nll: np.ndarray | None = None
    class_loss: np.ndarray | None = None
    losses: np.ndarray | None = field(default=None, repr=False)  # a block's, for 'none'
    calibration: CalibrationSums | None = None

    def add(self, other: Totals) -> Totals:
        self.loss_sum += other.loss_sum
        self.total_weight += other.total_weight
        self.count += other.count
        self.ignored += other.ignored
        self.nll_sum += other.nll_sum
        self.nan_count += other.nan_count
        if other.class_count is not None:
            if self.class_count is None:
                self.class_count = other.class_count.copy()
                self.class_nll = other.class_nll.copy()
                self.class_loss = other.class_loss.copy()
            else:
                self.class_count += other.class_count
                self.class_nll += other.class_nll
                self.class_loss += other.class_loss
        if other.calibration is not None:
            if self.calibration is None:
                self.calibration = other.calibration
            else:
                self.calibration.add(other.calibration)
        return self


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for 16-bit predictions (see the module's docstring), else their dtype."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def block_totals(x: np.ndarray, t: np.ndarray, first_row: int, options: Options) -> Totals:
    """The totals of one block of rows: predictions ``x``, targets ``t``, row ``first_row`` on.

    Raises the core's ``IndexError`` for an out-of-range target, with its position in the
    whole file.
    """
    x = np.asarray(x).astype(compute_dtype(x.dtype), copy=False)
    t = np.asarray(t)
    weight, ignore_index = options.weight, options.ignore_index
    # -log p at the targets, unweighted and unsmoothed (of the capped logits: the model's
    # distribution), for the perplexity and the class table
    unweighted = dict(
        ignore_index=ignore_index, from_logits=options.from_logits, softcap=options.softcap
    )
    loss_options = dict(unweighted, label_smoothing=options.label_smoothing, z_loss=options.z_loss)
    bootstrap = options.calibration is not None and options.calibration.bootstrap
    try:
        if (
            options.reduction == "none"
            or bootstrap
            or (options.per_class and (options.label_smoothing or options.z_loss))
        ):
            # Element-wise losses: the result of 'none'; and per class with label smoothing,
            # which spreads a target's loss over every class, or the z-loss, which is not
            # w[c] times the NLL: only the element knows its loss.
            losses = nllloss.nll_loss(x, t, weight, reduction="none", **loss_options)
        else:
            losses = None
        if options.reduction == "none":
            loss_sum = np.sum(losses, dtype=np.float64)
        else:  # the core's sum: one block of log-probabilities gives torch's bits
            loss_sum = nllloss.nll_loss(x, t, weight, reduction="sum", **loss_options)
    except IndexError:
        raise _out_of_range(t, first_row, options) from None
    if options.probabilities:  # every target element counts, with weight 1
        count = math.prod((t.shape[0], *t.shape[2:]))
        total_weight, ignored = float(count), 0
    else:
        count = int(nllloss.total_weight(t, ignore_index=ignore_index))
        ignored = t.size - count
        total_weight = float(
            count if weight is None else nllloss.total_weight(t, weight, ignore_index)
        )
    plain = weight is None and not options.label_smoothing and not options.z_loss
    if plain and options.reduction != "none":
        nll_sum = loss_sum
    else:
        nll_sum = nllloss.nll_loss(x, t, reduction="sum", **unweighted)
    nll = None
    if options.per_class:
        reuse = plain and losses is not None
        nll = losses if reuse else nllloss.nll_loss(x, t, reduction="none", **unweighted)
    totals = Totals(
        loss_sum=float(loss_sum),
        total_weight=total_weight,
        count=count,
        ignored=ignored,
        nll_sum=float(nll_sum),
        nan_count=int(np.count_nonzero(np.isnan(x))),
        losses=losses if options.reduction == "none" else None,
    )
    if options.calibration is not None:
        denominators = None
        if bootstrap:  # each element's share of the 'mean' denominator: w[t], or 1
            counted = t != ignore_index
            denominators = np.zeros(t.shape)
            denominators[counted] = 1.0 if weight is None else weight[t[counted]]
        totals.calibration = calibration_sums(
            x,
            t,
            first_row,
            options.calibration,
            ignore_index=ignore_index,
            from_logits=options.from_logits,
            softcap=options.softcap,
            losses=losses,
            denominators=denominators,
        )
    if options.per_class:
        counted = t != ignore_index
        classes = t[counted].astype(np.intp)
        totals.class_count = np.bincount(classes, minlength=options.classes)
        totals.class_nll = np.bincount(classes, nll[counted], minlength=options.classes)
        if losses is not None:
            totals.class_loss = np.bincount(classes, losses[counted], minlength=options.classes)
        elif weight is not None:  # each loss is w[c] * nll: Σ over class c is w[c] * Σ nll
            totals.class_loss = totals.class_nll * weight.astype(np.float64)
        else:
            totals.class_loss = totals.class_nll.copy()
    return totals


def _out_of_range(t: np.ndarray, first_row: int, options: Options) -> IndexError:
    """The core's IndexError for the block's first bad target, positioned in the whole file."""
    t = t if t.dtype == np.uint64 else t.astype(np.int64)  # exact; compares with negatives
    bad = (t != options.ignore_index) & ((t < 0) | (t >= options.classes))
    position = np.unravel_index(int(np.argmax(bad)), t.shape)
    value = int(t[position])
    global_position = (first_row + int(position[0]), *(int(p) for p in position[1:]))
    return _validate.out_of_bounds_error(
        value, global_position, options.classes, options.ignore_index
    )


def row_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def default_chunk_rows(predictions: Source) -> int:
    row_bytes = predictions.dtype.itemsize * math.prod(predictions.shape[1:])
    return max(1, DEFAULT_BLOCK_BYTES // max(row_bytes, 1))


def temperature_block(x: np.ndarray, t: np.ndarray, first_row: int, options: Options):
    """The :class:`TemperatureSums` of one block at ``options.calibration.beta``."""
    x = np.asarray(x).astype(compute_dtype(x.dtype), copy=False)
    calibration = options.calibration
    return temperature_sums(
        x,
        t,
        calibration.beta,
        calibration.bins,
        ignore_index=options.ignore_index,
        softcap=options.softcap,
    )


def stream(
    compute: Callable,
    predictions: Source,
    targets: Source,
    options: Options,
    chunk_rows: int,
    *,
    client=None,
    on_block: Callable | None = None,
):
    """``compute(x, t, first_row, options)`` of every block of rows, added in row order
    (None for no rows); here, one block in memory at a time, or on the Dask ``client``
    (:func:`on_dask`). ``on_block(block, start, stop)`` sees each block as it is done, in
    any order; the sums are taken in row order, so they do not depend on where blocks ran."""
    ranges = row_ranges(predictions.shape[0], chunk_rows)
    if client is not None:
        blocks = on_dask(client, compute, predictions, targets, options, ranges, chunk_rows)
    else:
        blocks = (
            (i, compute(predictions.rows(*r), targets.rows(*r), r[0], options))
            for i, r in enumerate(ranges)
        )
    total, waiting, next_block = None, {}, 0
    for i, block in blocks:
        if on_block is not None:
            on_block(block, *ranges[i])
        if isinstance(block, Totals):
            block.losses = None
        waiting[i] = block
        while next_block in waiting:
            block = waiting.pop(next_block)
            total = block if total is None else total.add(block)
            next_block += 1
    return total


def evaluate(
    predictions: Source,
    targets: Source,
    options: Options,
    chunk_rows: int,
    *,
    client=None,
    on_block: Callable[[Totals, int, int], None] | None = None,
) -> Result:
    """The report's numbers: one pass of :func:`block_totals` over the file; with
    ``options.calibration``, first the temperature's fit on a sample of rows, around whose β
    the pass also fits the temperature (``_calibration``'s docstring); where that fit does not
    stand, second-order steps from the sample's β, one more pass each, until it is fitted.
    """
    calibration = options.calibration
    if calibration is not None:
        sample = fit_on_sample(
            predictions, targets, options.ignore_index, options.softcap, calibration.bins
        )
        if sample is not None:
            beta, error = sample
            window = Window.around(beta, error, options.classes)
            options = replace(options, calibration=replace(calibration, beta=beta, window=window))
    totals = stream(
        block_totals, predictions, targets, options, chunk_rows, client=client, on_block=on_block
    )
    totals = totals or Totals()
    result = finish(totals, options, predictions.dtype)
    if calibration is None:
        return result
    sums = totals.calibration
    if sums is None:  # no rows: the figures of no element
        empty = np.empty((0, options.classes, *predictions.shape[2:]), predictions.dtype)
        sums = calibration_sums(
            empty,
            np.empty((0, *targets.shape[1:]), np.int64),
            0,
            options.calibration,
            ignore_index=options.ignore_index,
            from_logits=options.from_logits,
            softcap=options.softcap,
        )

    def sums_at(beta: float) -> TemperatureSums:
        at = replace(options, calibration=replace(options.calibration, beta=beta))
        return stream(temperature_block, predictions, targets, at, chunk_rows, client=client)

    solved = None
    if sums.window is not None:  # the fit inside the main pass
        solved = sums.window.solve(options.calibration.window, sums.at_beta)
    at_temperature = solved or sums.at_beta
    if solved is None and at_temperature.count:
        at_temperature, fitted = newton(
            at_temperature, sums_at, TEMPERATURE_RTOL, MAX_TEMPERATURE_PASSES
        )
        if not fitted:
            result.warnings.append(
                f"the temperature fit stopped at T = {1 / at_temperature.beta:.6g} without "
                f"converging ({MAX_TEMPERATURE_PASSES} passes, or at the bound T = "
                "1e-4 or 1e4 of predictions that separate the classes perfectly)"
            )
    result.calibration = report(
        sums, at_temperature, options.calibration, mean_loss=options.reduction != "sum"
    )
    return result


# Seconds a scheduler named by --scheduler has to connect and answer who it is.
SCHEDULER_TIMEOUT = 30
# Address schemes of dask.distributed's comms that name a scheduler in another process.
SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")


def check_scheduler_address(address: str) -> str:
    """``[SCHEME://]HOST:PORT`` with a scheme of ``SCHEDULER_SCHEMES`` and a port number;
    ValueError otherwise."""
    scheme, sep, location = address.partition("://")
    if not sep:
        scheme, location = "tcp", address
    host, colon, port = location.rpartition(":")
    expected = "expected an address as tcp://HOST:PORT"
    if scheme not in SCHEDULER_SCHEMES:
        why = (
            "inproc:// names a scheduler inside one process"
            if scheme == "inproc"
            else f"unknown scheme {scheme}://"
        )
        raise ValueError(f"{address!r}: {why}; {expected}")
    if not (colon and host and port.isdigit() and int(port) < 2**16):
        raise ValueError(f"{address!r}: {expected}, PORT a number from 0 to 65535")
    return address


def _check_scheduler_answers(address: str) -> None:
    """Connect to ``address`` and ask its identity, all within ``SCHEDULER_TIMEOUT``: a peer
    that is no scheduler (one that never answers, or answers garbage) is refused here, where
    ``Client`` would wait for ever or fail with the reader's own error."""
    import asyncio

    from distributed.comm import connect

    async def identity():
        comm = await connect(address, timeout=SCHEDULER_TIMEOUT)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:
        answer = asyncio.run(asyncio.wait_for(identity(), SCHEDULER_TIMEOUT))
    except (TimeoutError, asyncio.TimeoutError):
        raise UserError(
            f"cannot reach the Dask scheduler at {address}: no answer within {SCHEDULER_TIMEOUT} s"
        ) from None
    except Exception as error:  # the comm's own errors for a peer that speaks no Dask
        raise UserError(
            f"cannot reach the Dask scheduler at {address}: the peer does not answer as one "
            f"({type(error).__name__}: {' '.join(str(error).split())})"
        ) from None
    if not (isinstance(answer, dict) and answer.get("type") == "Scheduler"):
        raise UserError(
            f"cannot reach the Dask scheduler at {address}: the peer does not answer as one"
        )


@contextmanager
def dask_client(scheduler: str | None, dashboard: str | None = None) -> Iterator:
    """A client of the scheduler at ``scheduler``, or of a local 2-worker cluster (None).

    The local cluster listens on the loopback interface only, and serves a dashboard only at
    ``dashboard``. (Its scheduler always runs an HTTP server, for health checks: without a
    dashboard it gets a free loopback port, not 8787, so no two runs compete for a port.)
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError(
            "--dask and --scheduler need dask.distributed (pip install 'nllloss[dask]')"
        ) from None
    if scheduler is None:
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address=dashboard or "127.0.0.1:0",
                scheduler_kwargs={"dashboard": dashboard is not None},
                # a failed block's error reaches the client, which reports it in one line
                silence_logs=logging.CRITICAL,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    _check_scheduler_answers(scheduler)
    try:
        client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError) as error:
        raise UserError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from None
    with client:
        yield client


def on_dask(client, compute, predictions, targets, options, ranges, chunk_rows):
    """The blocks of :func:`stream`, read and computed by Dask workers; yields (index, block)
    as they finish.

    The inputs become ``dask.array`` arrays chunked along rows; the workers read their rows
    from the files themselves (the sources travel as path and offset).
    """
    import dask
    import dask.array as da
    from distributed import as_completed

    def rows_of(source: Source):
        chunks = (chunk_rows, *source.shape[1:])
        meta = np.empty((0,) * source.ndim, dtype=source.dtype)
        return da.from_array(source, chunks=chunks, lock=False, asarray=True, meta=meta)

    if not ranges:  # no rows: dask.array would still make one empty block
        return
    x_blocks = rows_of(predictions).to_delayed().ravel()
    t_blocks = rows_of(targets).to_delayed().ravel()
    shared = dask.delayed(options)
    tasks = [
        dask.delayed(compute)(x, t, start, shared)
        for x, t, (start, _) in zip(x_blocks, t_blocks, ranges, strict=True)
    ]
    futures = client.compute(tasks)
    position = {future.key: i for i, future in enumerate(futures)}
    for future, block in as_completed(futures, with_results=True):
        future.release()
        yield position[future.key], block


@dataclass
class Result:
    """The numbers ``nllloss eval`` reports."""

    loss: float | None  # None for 'none' (the losses went to a file)
    total_weight: float
    count: int
    ignored: int
    perplexity: float
    nan_count: int
    per_class: list[dict] | None
    calibration: dict | None = None  # with --calibration: the report's section
    warnings: list[str] = field(default_factory=list)


def finish(totals: Totals, options: Options, dtype: np.dtype) -> Result:
    """The loss (rounded once to the predictions' dtype), the perplexity and the class table.

    The perplexity is ``exp`` of the mean NLL: the unweighted mean of ``-log p`` at the
    non-ignored targets, without label smoothing (NaN when every target is ignored).
    """
    # 0/0 is NaN (nothing counted); exp of a large mean NLL, or a sum past the dtype's
    # range, is inf: each is the answer, as torch's IEEE arithmetic gives it.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if options.reduction == "mean":
            value = np.float64(totals.loss_sum) / np.float64(totals.total_weight)
        else:
            value = np.float64(totals.loss_sum)
        mean_nll = np.float64(totals.nll_sum) / np.float64(totals.count)
        perplexity = np.exp(mean_nll)
        # float64 -> compute dtype -> dtype: the core's own roundings (float32, then 16 bits).
        loss = float(value.astype(compute_dtype(dtype)).astype(dtype))
    return Result(
        loss=None if options.reduction == "none" else loss,
        total_weight=totals.total_weight,
        count=totals.count,
        ignored=totals.ignored,
        perplexity=float(perplexity),
        nan_count=totals.nan_count,
        per_class=_class_rows(totals, options) if options.per_class else None,
    )


def _class_rows(totals: Totals, options: Options) -> list[dict]:
    """One row per class that occurs among the non-ignored targets."""
    if totals.class_count is None:  # no rows at all
        return []
    loss = totals.class_loss.sum()
    rows = []
    for c in np.flatnonzero(totals.class_count):
        rows.append(
            {
                "class": int(c),
                "count": int(totals.class_count[c]),
                "weight": 1.0 if options.weight is None else float(options.weight[c]),
                "mean_nll": float(totals.class_nll[c] / totals.class_count[c]),
                "share": float(totals.class_loss[c] / loss) if loss else math.nan,
            }
        )
    return rows


def log_prob_excess(x: np.ndarray) -> float:
    """Largest ``|log Σ_c exp x[n, c]|`` over the rows of ``x``: 0 for log-probabilities."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return 0.0
    top = np.max(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        lse = np.log(np.sum(np.exp(x - top), axis=1)) + top[:, 0]
    lse = lse[np.isfinite(lse)]
    return float(np.max(np.abs(lse))) if lse.size else 0.0

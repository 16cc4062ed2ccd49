"""The ``nllloss`` command line: ``eval``, ``info``, ``examples``.

``main(argv)`` returns the exit code: 0, 1 for bad input (one line on stderr, never a
traceback), 2 for a usage error. Heavy or optional modules (Dask, Zarr, matplotlib) are
imported only by the command and option that need them. The CPU benchmark is not part of
the package: ``python benchmarks/cpu.py`` in a checkout (``nllloss bench`` says so).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from .. import __version__, _validate
from .._problem import Layout, layout_of
from ._calibration import CalibrationOptions
from ._evaluate import (
    Options,
    Totals,
    check_scheduler_address,
    compute_dtype,
    dask_client,
    default_chunk_rows,
    evaluate,
    log_prob_excess,
)
from ._io import MAX_INFLATE, Source, UserError, open_array
from ._outputs import Pending, check_outputs, write_replacing
from ._report import Context, render, report_figure, require_matplotlib

PROG = "nllloss"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Predictions whose rows' log-sum-exp strays further from 0 than this are flagged as
# probably not log-probabilities: torch's log-softmax rounded to bfloat16 strays up to
# 4e-3 (float16: 5e-4), measured over C = 2 to 32000.
LOG_PROB_TOLERANCE = 1e-2
LOG_PROB_SAMPLE_ROWS = 256  # rows of the first block checked for that


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit code 2), no ``sys.exit``, and no option
    prefixes (``--from-logit`` is an error, not ``--from-logits``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise _Exit(EXIT_USAGE)

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Negative log-likelihood loss of saved predictions, exactly as torch's.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    evaluate = commands.add_parser(
        "eval",
        help="loss, perplexity and per-class table of saved predictions",
        description=(
            "The loss of PRED against TARGET, streamed from disk in blocks of rows. "
            "Arrays: PATH.npy, PATH.npz[:KEY], PATH.safetensors[:KEY], a Zarr store "
            "(PATH.zarr[:KEY]); targets and weights also from a .txt file of numbers."
        ),
    )
    evaluate.add_argument("predictions", metavar="PRED", help="log-probabilities (or logits)")
    evaluate.add_argument(
        "targets",
        metavar="TARGET",
        help="class indices, or class probabilities: a floating array of PRED's shape",
    )
    evaluate.add_argument(
        "--weight", metavar="W", help="class weights: an array as above, or numbers as 1,2,0.5"
    )
    evaluate.add_argument(
        "--ignore-index", type=int, default=-100, metavar="I", help="target to skip (-100)"
    )
    evaluate.add_argument(
        "--reduction",
        choices=("mean", "sum", "none"),
        default="mean",
        help="default mean; none writes one loss per target to --out FILE.npy",
    )
    evaluate.add_argument(
        "--from-logits", action="store_true", help="PRED holds logits (cross-entropy)"
    )
    evaluate.add_argument(
        "--label-smoothing", type=float, default=0.0, metavar="E", help="0 <= E <= 1 (0)"
    )
    evaluate.add_argument(
        "--z-loss",
        type=float,
        default=0.0,
        metavar="Z",
        help="with --from-logits: add Z * w[y] * logsumexp**2 per target, w[y] its class "
        "weight (0)",
    )
    evaluate.add_argument(
        "--softcap",
        type=float,
        metavar="CAP",
        help="with --from-logits: logits become CAP * tanh(logits / CAP) (default: none)",
    )
    evaluate.add_argument(
        "--per-class", action="store_true", help="count, weight, mean NLL and share per class"
    )
    evaluate.add_argument(
        "--calibration",
        action="store_true",
        help="accuracy, Brier score, calibration error (ECE, MCE), reliability bins and the "
        "fitted temperature (class-index targets)",
    )
    evaluate.add_argument(
        "--bins",
        type=_positive_int,
        default=15,
        metavar="B",
        help="with --calibration: equal-width confidence bins (15)",
    )
    evaluate.add_argument(
        "--top-k",
        type=_positive_ints,
        default=(),
        metavar="K[,K...]",
        help="with --calibration: also the top-K accuracy for each K",
    )
    evaluate.add_argument(
        "--bootstrap",
        type=_positive_int,
        metavar="R",
        help="with --calibration: 95%% intervals of the loss, accuracy and ECE over R "
        "Poisson-bootstrap resamples",
    )
    evaluate.add_argument(
        "--seed",
        type=_natural_int,
        default=0,
        metavar="S",
        help="with --bootstrap: the resamples' seed (0)",
    )
    evaluate.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        help="report format (default: from --out's suffix, else table)",
    )
    evaluate.add_argument(
        "--out",
        metavar="FILE",
        help="write the report to FILE; FILE.npy receives the loss array instead",
    )
    evaluate.add_argument(
        "--plot",
        metavar="FILE.png",
        help="bar charts of the classes with the most loss, and with --calibration the "
        "reliability diagram (matplotlib)",
    )
    evaluate.add_argument(
        "--chunk-rows",
        type=_positive_int,
        metavar="N",
        help="rows per block (default: about 16 MiB of predictions)",
    )
    evaluate.add_argument(
        "--max-inflate",
        type=_byte_count,
        default=MAX_INFLATE,
        metavar="BYTES",
        help="most bytes a compressed .npz member may inflate to (default 1G; K, M, G, T)",
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    scale = evaluate.add_mutually_exclusive_group()
    scale.add_argument(
        "--dask", action="store_true", help="evaluate on a local Dask cluster of 2 workers"
    )
    scale.add_argument(
        "--scheduler",
        type=_scheduler_address,
        metavar="ADDRESS",
        help="evaluate on the Dask scheduler at ADDRESS",
    )
    evaluate.add_argument(
        "--dashboard",
        type=_address,
        metavar="ADDRESS",
        help="with --dask: serve the Dask dashboard at ADDRESS (default: none)",
    )
    evaluate.set_defaults(run=_run_eval)

    info = commands.add_parser(
        "info", help="versions, threads and GPUs", description="Versions, threads and GPUs."
    )
    info.add_argument("--format", choices=("table", "json"), default="table")
    info.add_argument(
        "--gpus",
        action="store_true",
        help="also ask torch, cupy and jax for GPUs (imports them: seconds)",
    )
    info.set_defaults(run=_run_info)

    examples = commands.add_parser(
        "examples",
        help="the worked examples of torch's, Paddle's and OneFlow's docs, with nllloss's values",
    )
    examples.set_defaults(run=lambda args: _run_examples())
    return parser


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_count(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes as 512M or 4G, got {text!r}")
    return int(match[1]) * _UNITS[match[2].upper()]


def _address(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected an address as tcp://HOST:PORT, got ''")
    return text


def _scheduler_address(text: str) -> str:
    try:
        return check_scheduler_address(_address(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _natural_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_ints(text: str) -> tuple[int, ...]:
    """Positive integers separated by commas, in increasing order without repeats."""
    return tuple(sorted({_positive_int(item) for item in text.split(",")}))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run ``nllloss`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    SIGTERM and SIGHUP stop the run as an exception does, so its temporary files go, and
    are then raised again with their default action; with SIGXFSZ ignored, a file-size limit
    (``ulimit -f``) is an error of the write that meets it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # a command of earlier versions: say where it went
        print(
            "nllloss: error: the benchmark is not installed with the package; run "
            "'python benchmarks/cpu.py' in a checkout of the repository",
            file=sys.stderr,
        )
        return 2
    try:
        args = _parse(argv)
    except _Exit as exit:
        return exit.code
    previous = _catch_signals()
    try:
        return args.run(args)
    except _Exit as exit:
        return exit.code
    except (UserError, OSError, ValueError, TypeError, IndexError, MemoryError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Signalled as caught:
        print(f"{PROG}: stopped by {signal.Signals(caught.signum).name}", file=sys.stderr)
        _restore_signals(previous)
        previous = {}
        signal.raise_signal(caught.signum)  # its own action: the caller sees the signal
        return 128 + caught.signum  # where that action does not end the process
    finally:
        _restore_signals(previous)


class _Signalled(BaseException):
    """A terminating signal, raised where the run is so that ``finally`` blocks clean up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum


# Signals that end a run; SIGXFSZ (a file-size limit reached) is ignored, so the write fails.
_STOPPING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


def _catch_signals() -> dict:
    """Install the run's handlers (in the main thread only); return the previous ones."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.signal(signum, _raise_signalled) for signum in _STOPPING}
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return previous


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; an option the command does not know is reported with its help, and
    with the closest option it does know."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = commands.choices[args.command]
        known = [o for action in command._actions for o in action.option_strings]
        guesses = []
        for word in unknown:
            if word.startswith("-"):
                guesses += difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
        hint = f" (did you mean {' '.join(guesses)}?)" if guesses else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, MemoryError):
        return f"out of memory ({text}); try a smaller --chunk-rows"
    return text


def _usage_error(message: str):
    print(f"{PROG} eval: error: {message} (see {PROG} eval --help)", file=sys.stderr)
    raise _Exit(EXIT_USAGE)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _weight_is_a_list(spec: str | None) -> bool:
    """--weight holds numbers separated by commas (a file of that name wins)."""
    return spec is not None and "," in spec and not Path(spec).exists()


def _read_weight(spec: str | None, classes: int, max_inflate: int) -> np.ndarray | None:
    if spec is None:
        return None
    if _weight_is_a_list(spec):
        label = f"weight {spec}"
        weight = np.array([_list_item(item, i, label) for i, item in enumerate(spec.split(","))])
        _check_weight(weight, classes, label)
    else:
        source = open_array(spec, "weight", text_dtype=np.float64, max_inflate=max_inflate)
        label = source.label
        _check_weight(source, classes, label)  # its shape and dtype, before reading it
        weight = np.asarray(source.rows(0, classes))
    nan_count = int(np.count_nonzero(np.isnan(weight)))
    if nan_count:
        _warn(f"{label} holds {nan_count} NaN values")
    return weight


def _list_item(item: str, index: int, label: str) -> float:
    try:
        return float(item)
    except ValueError:
        what = "is empty" if not item.strip() else f"{item.strip()!r} is not a number"
        raise UserError(
            f"{label}: item {index + 1} {what}; expected a file or numbers separated by commas"
        ) from None


def _check_weight(weight, classes: int, label: str) -> None:
    try:
        _validate.check_weight(weight, classes)
    except (TypeError, ValueError) as error:
        raise UserError(f"{label}: {error}") from None


def check_inputs(predictions: Source, targets: Source) -> Layout:
    """The core's checks, on shapes and dtypes only: nothing is read yet."""
    if len(predictions.shape) < 2:
        raise UserError(
            f"{predictions.label}: expected shape (N, C) or (N, C, d1, ..., dK), "
            f"got {predictions.shape}"
        )
    try:
        _validate.check_input(predictions)
    except (TypeError, ValueError) as error:
        raise UserError(f"{predictions.label}: {error}") from None
    try:
        _validate.check_target(targets, predictions.shape)
        return layout_of(tuple(predictions.shape))
    except TypeError as error:
        raise UserError(f"{targets.label}: {error}") from None
    except ValueError as error:
        raise UserError(f"{targets.label} does not fit {predictions.label}: {error}") from None


class Progress:
    """A one-line progress report on ``stream``, drawn only when it is a terminal and the
    work has taken ``DELAY`` seconds; redrawn at most every ``INTERVAL`` seconds.

    Our own few lines rather than tqdm or rich: one line of text is all the CLI draws, and so
    it needs no dependency beyond the core's.
    """

    DELAY = 1.0
    INTERVAL = 0.1

    def __init__(self, total: int, stream: TextIO, *, enabled: bool = True, clock=None) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.drawn_at: float | None = None
        self.done = 0

    def update(self, rows: int) -> None:
        self.done += rows
        if not self.enabled:
            return
        now = self.clock()
        elapsed = now - self.start
        if elapsed < self.DELAY or (
            self.drawn_at is not None and now - self.drawn_at < self.INTERVAL
        ):
            return
        self.drawn_at = now
        fraction = self.done / self.total if self.total else 1.0
        left = f", about {elapsed * (1 - fraction) / fraction:.0f} s left" if fraction else ""
        self.stream.write(
            f"\r{PROG} eval: {100 * fraction:5.1f}%  {self.done}/{self.total} rows  "
            f"{elapsed:.0f} s{left} "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.drawn_at is not None:  # erase the line
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _LossFile:
    """The per-element losses of ``--reduction none`` in a ``.npy`` file, written block by
    block (in any order) with plain writes: memory stays bounded by one block. ``path`` is
    the pending file's temporary name."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.offset = header.offset
        del header  # unmapped: the file is written through self.file
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self.dtype = dtype
        self.file = open(path, "r+b")  # noqa: SIM115 (closed by close())

    def write(self, losses: np.ndarray, first_row: int) -> None:
        self.file.seek(self.offset + first_row * self.row_bytes)
        self.file.write(np.ascontiguousarray(losses, dtype=self.dtype).data)

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class _Outputs:
    """Where ``eval`` writes: the report (None: stdout) in ``format``, the loss array, the plot."""

    report: str | None
    format: str
    losses: str | None
    plot: str | None


def _outputs(args: argparse.Namespace) -> _Outputs:
    """Checked before anything is read or written, so a bad output fails fast."""
    out = args.out
    losses = out if out is not None and out.lower().endswith(".npy") else None
    report = out if losses is None else None
    if args.reduction == "none" and losses is None:
        _usage_error(
            "--reduction none gives one loss per target element: save them with --out FILE.npy"
        )
    suffix = Path(report).suffix.lower() if report else ""
    format = args.format or {".json": "json", ".csv": "csv"}.get(suffix, "table")
    inputs = {"predictions": args.predictions, "targets": args.targets}
    if args.weight is not None and not _weight_is_a_list(args.weight):
        inputs["weight"] = args.weight
    paths = {"--out": out, "--plot": args.plot}
    for option, path in paths.items():
        if path is not None and not path.strip():
            _usage_error(f"{option}: expected a file name, got {path!r}")
    check_outputs({option: path for option, path in paths.items() if path is not None}, inputs)
    if report is None and sys.stdout is None:
        raise UserError("stdout is closed: name a report file with --out FILE")
    if args.plot is not None:
        require_matplotlib()
    return _Outputs(report, format, losses, args.plot)


# The core's words for an option, as the command line spells it.
_OPTION_WORDS = {
    "it needs from_logits=True, got from_logits=False": "add --from-logits",
    "z_loss=": "--z-loss ",
    "softcap=": "--softcap ",
    "label_smoothing": "--label-smoothing",
    "z_loss": "--z-loss",
    "softcap": "--softcap",
}


def _in_option_words(message: str) -> str:
    for python, option in _OPTION_WORDS.items():
        message = message.replace(python, option)
    return message


def _calibration_options(args: argparse.Namespace, classes: int) -> CalibrationOptions | None:
    """--calibration's settings, or None; its sub-options without it are a usage error."""
    if not args.calibration:
        given = [
            option
            for option, value in (
                ("--bins", args.bins != 15),
                ("--top-k", args.top_k),
                ("--bootstrap", args.bootstrap is not None),
                ("--seed", args.seed != 0),
            )
            if value
        ]
        if given:
            _usage_error(f"{given[0]} is a setting of the calibration report: add --calibration")
        return None
    too_many = [k for k in args.top_k if k > classes]
    if too_many:
        _usage_error(f"--top-k {too_many[0]}: expected at most the {classes} classes")
    return CalibrationOptions(
        bins=args.bins, top_k=args.top_k, bootstrap=args.bootstrap or 0, seed=args.seed
    )


def _run_eval(args: argparse.Namespace) -> int:
    if args.dashboard is not None and not args.dask:
        _usage_error("--dashboard serves the local cluster of --dask: add --dask")
    if args.bootstrap is None and args.seed != 0 and args.calibration:
        _usage_error("--seed seeds the resamples of --bootstrap: add --bootstrap R")
    outputs = _outputs(args)
    try:
        label_smoothing = _validate.check_label_smoothing(args.label_smoothing)
        z_loss = _validate.check_z_loss(args.z_loss, args.from_logits)
        softcap = _validate.check_softcap(args.softcap, args.from_logits)
    except ValueError as error:
        _usage_error(_in_option_words(str(error)))

    limit = args.max_inflate
    predictions = open_array(args.predictions, "predictions", max_inflate=limit)
    targets = open_array(args.targets, "targets", text_dtype=np.int64, max_inflate=limit)
    layout = check_inputs(predictions, targets)
    probabilities = _validate.is_float_dtype(targets.dtype)
    if probabilities and (args.per_class or args.plot is not None or args.calibration):
        _usage_error(
            f"{targets.label} holds class probabilities: the per-class table (--per-class, "
            "--plot) and --calibration need class indices"
        )
    calibration = _calibration_options(args, layout.classes)
    work_dtype = compute_dtype(predictions.dtype)
    weight = _read_weight(args.weight, layout.classes, limit)
    if weight is not None:  # as the core casts it: to the predictions' dtype
        weight = weight.astype(predictions.dtype).astype(work_dtype)
    options = Options(
        classes=layout.classes,
        weight=weight,
        ignore_index=_validate.check_ignore_index(args.ignore_index, probabilities),
        reduction=args.reduction,
        from_logits=args.from_logits,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        probabilities=probabilities,
        per_class=args.per_class or args.plot is not None,
        calibration=calibration,
    )
    if not args.from_logits:
        _warn_if_not_log_probabilities(predictions)
    chunk_rows = args.chunk_rows or default_chunk_rows(predictions)
    if math.prod(predictions.shape[1:]) == 0:
        # Rows of no elements: the work is bounded by the data, not by a header's row count
        # (2**44 empty rows are one empty block).
        chunk_rows = max(predictions.shape[0], 1)

    progress = Progress(layout.batch, sys.stderr, enabled=not args.quiet)
    loss_file = pending_losses = None
    completed = False
    try:
        if args.reduction == "none":
            pending_losses = Pending(outputs.losses)
            loss_file = _LossFile(pending_losses.temp, layout.output_shape, work_dtype)

        def on_block(block: Totals, start: int, stop: int) -> None:
            if loss_file is not None:
                loss_file.write(block.losses, start)
            progress.update(stop - start)

        if args.dask or args.scheduler is not None:
            with dask_client(args.scheduler, args.dashboard) as client:
                result = evaluate(
                    predictions, targets, options, chunk_rows, client=client, on_block=on_block
                )
        else:
            result = evaluate(predictions, targets, options, chunk_rows, on_block=on_block)
        if loss_file is not None:
            loss_file.close()
            pending_losses.commit()
        completed = True
    except IndexError as error:  # the core's message for an out-of-range target
        raise UserError(f"{targets.label}: {error}") from None
    finally:
        progress.close()
        if not completed and pending_losses is not None:  # the old file stays as it was
            if loss_file is not None:
                loss_file.close()
            pending_losses.discard()

    if result.nan_count:
        _warn(f"{predictions.label} holds {result.nan_count} NaN values")
    for warning in result.warnings:
        _warn(warning)
    if outputs.losses is not None and args.reduction != "none":
        loss = np.asarray(result.loss, dtype=work_dtype)
        write_replacing(outputs.losses, lambda temp: np.save(temp, loss))
    context = Context(
        reduction=args.reduction,
        from_logits=args.from_logits,
        label_smoothing=label_smoothing,
        weighted=options.weight is not None,
        loss_file=outputs.losses,
        z_loss=z_loss,
        softcap=softcap,
        probabilities=probabilities,
    )
    text = render(result, context, outputs.format)
    if outputs.report is None:
        sys.stdout.write(text)
    else:
        write_replacing(outputs.report, lambda temp: Path(temp).write_text(text))
    if outputs.plot is not None:
        title = f"{args.predictions} against {args.targets}"
        figure = report_figure(result, context, title)
        format = Path(outputs.plot).suffix[1:].lower() or "png"  # savefig's own default
        write_replacing(outputs.plot, lambda temp: figure.savefig(temp, format=format))
        print(f"{PROG}: wrote the chart to {outputs.plot}", file=sys.stderr)
    return 0


def _warn_if_not_log_probabilities(predictions: Source) -> None:
    excess = log_prob_excess(predictions.rows(0, LOG_PROB_SAMPLE_ROWS))
    if excess > LOG_PROB_TOLERANCE:
        _warn(
            f"{predictions.label} does not hold log-probabilities (a row's log-sum-exp is "
            f"{excess:.3g} from 0); if it holds logits, pass --from-logits"
        )


def _run_info(args: argparse.Namespace) -> int:
    from ._info import render_info

    sys.stdout.write(render_info(args.format, args.gpus))
    return 0


def _run_examples() -> int:
    from ._examples import print_examples

    return print_examples()

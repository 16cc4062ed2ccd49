"""``nllloss eval``'s report as a table, JSON or CSV, and the per-class bar chart.

A number that is not finite reads one way in each format: ``nan``/``inf`` in the table and
in CSV (as Python, NumPy and pandas write and read them), ``null`` in JSON (which has none).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from ._evaluate import Result
from ._io import UserError

CLASS_KEYS = ("class", "count", "weight", "mean_nll", "share")
BIN_KEYS = ("lower", "upper", "count", "confidence", "accuracy")


def calibration_columns(section: dict) -> dict:
    """The calibration section's numbers as CSV columns: ``top_K_accuracy`` per K, and each
    interval as ``NAME_low``, ``NAME_high``."""
    columns = {"accuracy": section["accuracy"]}
    for k, value in section["top_k_accuracy"].items():
        columns[f"top_{k}_accuracy"] = value
    for key in ("brier", "ece", "mce", "temperature", "loss_at_temperature", "ece_at_temperature"):
        columns[key] = section[key]
    for name, (low, high) in section.get("intervals", {}).items():
        columns[f"{name}_low"], columns[f"{name}_high"] = low, high
    if "intervals" in section:
        columns["resamples"], columns["seed"] = section["resamples"], section["seed"]
    return columns


@dataclass(frozen=True)
class Context:
    """How the numbers were asked for, for the table's wording."""

    reduction: str
    from_logits: bool
    label_smoothing: float
    weighted: bool
    loss_file: str | None  # where the losses were saved (--out FILE.npy)
    z_loss: float = 0.0
    softcap: float | None = None
    probabilities: bool = False  # the targets are class probabilities


def as_dict(result: Result, context: Context) -> dict[str, Any]:
    """The report as JSON-ready values (non-finite numbers become None: JSON has no NaN)."""
    report: dict[str, Any] = {
        "loss": _finite(result.loss),
        "reduction": context.reduction,
        "total_weight": _finite(result.total_weight),
        "count": result.count,
        "ignored": result.ignored,
        "perplexity": _finite(result.perplexity),
    }
    if context.loss_file is not None:
        report["loss_file"] = context.loss_file
    if result.per_class is not None:
        report["per_class"] = [
            {key: _finite(value) for key, value in row.items()} for row in result.per_class
        ]
    if result.calibration is not None:
        report["calibration"] = _finite(result.calibration)
    return report


def _finite(value):
    """``value`` with every non-finite float (inside lists and dicts too) as None."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def render(result: Result, context: Context, format: str) -> str:
    if format == "json":
        return json.dumps(as_dict(result, context), allow_nan=False) + "\n"
    if format == "csv":
        return _csv(result, context)
    return _table(result, context)


def _csv(result: Result, context: Context) -> str:
    """The summary (a header and one row); with the class table, a blank line and that table."""
    report = as_dict(result, context)
    raw = {**report, "loss": result.loss, "total_weight": result.total_weight}
    raw["perplexity"] = result.perplexity
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    keys = [key for key in report if key not in ("per_class", "calibration")]
    values = [raw[key] for key in keys]
    if result.calibration is not None:
        columns = calibration_columns(result.calibration)
        keys += list(columns)
        values += list(columns.values())
    writer.writerow(keys)
    writer.writerow(["" if value is None else value for value in values])
    if result.calibration is not None:
        writer.writerow([])
        writer.writerow(BIN_KEYS)
        for row in result.calibration["bins"]:
            writer.writerow(["" if row[key] is None else row[key] for key in BIN_KEYS])
    if result.per_class is not None:
        writer.writerow([])
        writer.writerow(CLASS_KEYS)
        for row in result.per_class:
            writer.writerow([row[key] for key in CLASS_KEYS])
    return text.getvalue()


def _number(value: float) -> str:
    return f"{value:.6g}"  # nan and inf as Python writes them


def _weight_total(value: float) -> str:
    """A total weight in full: a count of targets (or an integral sum) as the integer it is."""
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return f"{value:.7g}"


def _table(result: Result, context: Context) -> str:
    what = ["weighted"] if context.weighted else []
    if context.label_smoothing:
        what.append(f"label smoothing {context.label_smoothing:g}")
    if context.z_loss:
        what.append(f"z-loss {context.z_loss:g}")
    if context.softcap is not None:
        what.append(f"softcap {context.softcap:g}")
    if context.probabilities:
        what.append("probability targets")
    what.append("from logits" if context.from_logits else "from log-probabilities")
    if context.reduction == "none":
        loss = f"one per target element, saved to {context.loss_file}"
    else:
        loss = f"{_number(result.loss)}  ({context.reduction}, {', '.join(what)})"
    lines = [
        f"loss          {loss}",
        f"total weight  {_weight_total(result.total_weight)}",
        f"targets       {result.count} used, {result.ignored} ignored",
        f"perplexity    {_number(result.perplexity)}  (exp of the mean NLL)",
    ]
    if result.calibration is not None:
        lines += ["", *_calibration_table(result.calibration, context)]
    if result.per_class is not None:
        lines += ["", *_class_table(result.per_class, context)]
    return "\n".join(lines) + "\n"


def _calibration_table(section: dict, context: Context) -> list[str]:
    """The calibration figures, then the reliability bins (empty bins left out)."""
    top_k = "".join(f", top-{k} {_number(value)}" for k, value in section["top_k_accuracy"].items())
    probabilities = "softmax of the logits" if context.from_logits else "exp of PRED"
    lines = [
        f"calibration   {section['count']} targets, unweighted; p = {probabilities}",
        f"accuracy      {_number(section['accuracy'])}  (top-1{top_k})",
        f"Brier score   {_number(section['brier'])}  (mean of sum_c (p_c - [c = y])^2)",
        f"ECE           {_number(section['ece'])}  ({len(section['bins'])} equal-width "
        f"bins; MCE {_number(section['mce'])})",
        f"temperature   {_number(section['temperature'])}  (mean NLL "
        f"{_number(section['loss_at_temperature'])} and ECE "
        f"{_number(section['ece_at_temperature'])} at softmax(PRED / T))",
    ]
    if "intervals" in section:
        spans = ", ".join(
            f"{name} {_number(low)} to {_number(high)}"
            for name, (low, high) in section["intervals"].items()
        )
        lines.append(
            f"95% interval  {spans}  ({section['resamples']} bootstrap resamples, "
            f"seed {section['seed']})"
        )
    header = ("confidence", "count", "mean confidence", "accuracy")
    cells = [
        (
            f"{row['lower']:.2f}-{row['upper']:.2f}",
            str(row["count"]),
            f"{row['confidence']:.4f}",
            f"{row['accuracy']:.4f}",
        )
        for row in section["bins"]
        if row["count"]
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines.append("")
    for line in [header, *cells]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    return lines


BAR_WIDTH = 20  # characters of the share bar at a 100% share


def share_of(context: Context) -> str:
    """What the share column divides: the loss as computed, weighted and smoothed or not."""
    what = ["weighted"] if context.weighted else []
    if context.label_smoothing:
        what.append("smoothed")
    return f"share of the {' and '.join(what)} loss" if what else "share of the loss"


def _class_table(rows: list[dict], context: Context) -> list[str]:
    """Count, weight and the mean NLL (unweighted, unsmoothed: -log p at the targets) per
    class, and its share of the loss as reduced (with the weights and smoothing asked for)."""
    modified = context.weighted or bool(context.label_smoothing)
    mean = "unweighted mean NLL" if modified else "mean NLL"
    header = ("class", "count", "weight", mean, share_of(context) if modified else "share")
    cells = [
        (
            str(row["class"]),
            str(row["count"]),
            f"{row['weight']:g}",
            f"{row['mean_nll']:.4f}",
            f"{100 * row['share']:.1f}%" if math.isfinite(row["share"]) else f"{row['share']}",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    for row, line in zip(rows, cells, strict=True):
        share = row["share"]
        bar = "#" * round(BAR_WIDTH * share) if math.isfinite(share) and share > 0 else ""
        cells_text = "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
        lines.append(f"{cells_text}  {bar}".rstrip())
    return lines


def require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install 'nllloss[plot]')") from None


# Classes drawn by --plot: those with the largest shares of the loss, the rest as one bar,
# so the chart keeps its size and drawing time at any class count (10,000 classes as bars
# took 99 s and 1.6 GB for a 192-megapixel image).
PLOT_CLASSES = 24


def plotted_classes(rows: list[dict], limit: int = PLOT_CLASSES) -> list[dict]:
    """Every class when there are at most ``limit``; else the ``limit - 1`` with the largest
    shares (in class order) and one row for the others (``class``: "others (N)")."""
    if len(rows) <= limit:
        return rows
    order = sorted(range(len(rows)), key=lambda i: -_share_key(rows[i]["share"]))
    kept = sorted(order[: limit - 1])
    others = [rows[i] for i in order[limit - 1 :]]
    count = sum(row["count"] for row in others)
    summary = {
        "class": f"others ({len(others)})",
        "count": count,
        "mean_nll": sum(row["mean_nll"] * row["count"] for row in others) / count,
        "share": sum(row["share"] for row in others),
    }
    return [rows[i] for i in kept] + [summary]


def _share_key(share: float) -> float:
    return share if math.isfinite(share) else -math.inf


def report_figure(result: Result, context: Context, title: str):
    """The classes' mean NLL and share of the loss as bars (:func:`plotted_classes`), beside
    the reliability diagram when the result has a calibration section; a bare Figure drawn
    by matplotlib's Agg canvas (no display, no pyplot state), of a fixed size."""
    require_matplotlib()
    from matplotlib.figure import Figure

    calibration = result.calibration
    figure = Figure(figsize=(13.0 if calibration else 8.0, 5.5), layout="constrained")
    figure.suptitle(title, fontsize=10)
    if calibration is not None:
        left, right = figure.subfigures(1, 2, width_ratios=(1, 1.6))
        _reliability(left.subplots(), calibration)
    else:
        right = figure
    _class_bars(right.subplots(2, 1, sharex=True), result.per_class, context)
    return figure


def _reliability(axes, section: dict) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    bins = section["bins"]
    width = bins[0]["upper"] - bins[0]["lower"]
    used = [row for row in bins if row["count"]]
    axes.bar(
        [row["lower"] for row in used],
        [row["accuracy"] for row in used],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="white",
        label="accuracy",
    )
    axes.plot(
        [row["confidence"] for row in used],
        [row["accuracy"] for row in used],
        "o",
        color="tab:red",
        markersize=4,
        label="(mean confidence, accuracy)",
    )
    axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)")
    axes.set_ylabel("accuracy")
    axes.set_aspect("equal")
    axes.set_title(
        f"Reliability: ECE {section['ece']:.4f}, T {section['temperature']:.3g}", fontsize=10
    )
    axes.legend(loc="upper left", fontsize=8)


def _class_bars(axes, rows: list[dict], context: Context) -> None:
    mean_axes, share_axes = axes
    rows = plotted_classes(rows)
    positions = range(len(rows))
    mean_axes.bar(positions, [row["mean_nll"] for row in rows], color="tab:blue")
    modified = context.weighted or bool(context.label_smoothing)
    mean_axes.set_ylabel(f"{'unweighted ' if modified else ''}mean NLL per target")
    mean_axes.set_title("Per-class loss", fontsize=10)
    share_axes.bar(positions, [100 * row["share"] for row in rows], color="tab:orange")
    share_axes.set_ylabel(f"{share_of(context)} (%)")
    share_axes.set_xlabel("class (count under the bar)")
    for each in axes:
        each.grid(axis="y", alpha=0.3)
    share_axes.set_xticks(
        positions, [f"{row['class']}\n{row['count']}" for row in rows], fontsize=7
    )

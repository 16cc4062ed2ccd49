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
    return report


def _finite(value):
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
    keys = [key for key in report if key != "per_class"]
    writer.writerow(keys)
    writer.writerow(["" if raw[key] is None else raw[key] for key in keys])
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
    if result.per_class is not None:
        lines += ["", *_class_table(result.per_class, context)]
    return "\n".join(lines) + "\n"


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


def per_class_figure(rows: list[dict], context: Context, title: str):
    """Two bar charts over the classes: the mean NLL, and the share of the total loss,
    under ``title``.

    A bare Figure, drawn by matplotlib's Agg canvas: no display, no pyplot state.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    labels = [str(row["class"]) for row in rows]
    figure = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 5.5), layout="constrained")
    figure.suptitle(f"Per-class loss: {title}", fontsize=10)
    mean_axes, share_axes = figure.subplots(2, 1, sharex=True)
    mean_axes.bar(labels, [row["mean_nll"] for row in rows], color="tab:blue")
    modified = context.weighted or bool(context.label_smoothing)
    mean_axes.set_ylabel(f"{'unweighted ' if modified else ''}mean NLL per target")
    share_axes.bar(labels, [100 * row["share"] for row in rows], color="tab:orange")
    share_axes.set_ylabel(f"{share_of(context)} (%)")
    share_axes.set_xlabel("class (count under the bar)")
    for axes in (mean_axes, share_axes):
        axes.grid(axis="y", alpha=0.3)
    share_axes.set_xticks(
        range(len(rows)), [f"{row['class']}\n{row['count']}" for row in rows], fontsize=8
    )
    return figure

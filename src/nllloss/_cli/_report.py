"""``nllloss eval``'s report as a table, JSON or CSV, and the per-class bar chart."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from ._evaluate import Result
from ._io import UserError

SUMMARY_KEYS = ("loss", "reduction", "total_weight", "count", "ignored", "perplexity")
CLASS_KEYS = ("class", "count", "weight", "mean_nll", "share")


@dataclass(frozen=True)
class Context:
    """How the numbers were asked for, for the table's wording."""

    reduction: str
    from_logits: bool
    label_smoothing: float
    weighted: bool
    loss_file: str | None  # where the losses were saved (--out FILE.npy)


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
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    keys = [key for key in report if key != "per_class"]
    writer.writerow(keys)
    writer.writerow(["" if report[key] is None else report[key] for key in keys])
    if "per_class" in report:
        writer.writerow([])
        writer.writerow(CLASS_KEYS)
        for row in report["per_class"]:
            writer.writerow(["" if row[key] is None else row[key] for key in CLASS_KEYS])
    return text.getvalue()


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.6g}"


def _table(result: Result, context: Context) -> str:
    what = ["weighted"] if context.weighted else []
    if context.label_smoothing:
        what.append(f"label smoothing {context.label_smoothing:g}")
    what.append("from logits" if context.from_logits else "from log-probabilities")
    if context.reduction == "none":
        loss = f"one per target element, saved to {context.loss_file}"
    else:
        loss = f"{_number(result.loss)}  ({context.reduction}, {', '.join(what)})"
    lines = [
        f"loss          {loss}",
        f"total weight  {_number(result.total_weight)}",
        f"targets       {result.count} used, {result.ignored} ignored",
        f"perplexity    {_number(result.perplexity)}  (exp of the mean NLL)",
    ]
    if result.per_class is not None:
        lines += ["", *_class_table(result.per_class)]
    return "\n".join(lines) + "\n"


BAR_WIDTH = 20  # characters of the share bar at a 100% share


def _class_table(rows: list[dict]) -> list[str]:
    header = ("class", "count", "weight", "mean NLL", "share")
    cells = [
        (
            str(row["class"]),
            str(row["count"]),
            f"{row['weight']:g}",
            f"{row['mean_nll']:.4f}",
            "-" if math.isnan(row["share"]) else f"{100 * row['share']:.1f}%",
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


def per_class_figure(rows: list[dict]):
    """Two bar charts over the classes: the mean NLL, and the share of the total loss.

    A bare Figure, drawn by matplotlib's Agg canvas: no display, no pyplot state.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    labels = [str(row["class"]) for row in rows]
    figure = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 5.5), layout="constrained")
    mean_axes, share_axes = figure.subplots(2, 1, sharex=True)
    mean_axes.bar(labels, [row["mean_nll"] for row in rows], color="tab:blue")
    mean_axes.set_ylabel("mean NLL per target")
    share_axes.bar(labels, [100 * row["share"] for row in rows], color="tab:orange")
    share_axes.set_ylabel("share of the loss (%)")
    share_axes.set_xlabel("class (count under the bar)")
    for axes in (mean_axes, share_axes):
        axes.grid(axis="y", alpha=0.3)
    share_axes.set_xticks(
        range(len(rows)), [f"{row['class']}\n{row['count']}" for row in rows], fontsize=8
    )
    return figure

"""``nllloss.evaluate``: the report of ``nllloss eval``, from Python."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _validate
from ._calibration import CalibrationOptions
from ._evaluate import Options, compute_dtype, default_chunk_rows
from ._evaluate import evaluate as _evaluate
from ._io import InMemory, open_array
from ._report import Context, as_dict


def evaluate(
    predictions: Any,
    targets: Any,
    *,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    per_class: bool = False,
    calibration: bool = False,
    bins: int = 15,
    top_k: Sequence[int] = (),
    bootstrap: int = 0,
    seed: int = 0,
    chunk_rows: int | None = None,
) -> dict[str, Any]:
    """The JSON report of ``nllloss eval`` as a dictionary, streamed block by block.

    Parameters
    ----------
    predictions, targets
        Arrays, or paths as ``nllloss eval`` takes them (``.npy``, ``.npz[:KEY]``,
        ``.safetensors[:KEY]``, Zarr, targets also ``.txt``); predictions ``(N, C)`` or
        ``(N, C, d1, ..., dK)`` of log-probabilities (logits with ``from_logits``), targets
        of class indices (or class probabilities, without ``per_class`` and ``calibration``).
    weight, ignore_index, reduction, from_logits, label_smoothing, z_loss, softcap
        As :func:`nllloss.nll_loss`; ``reduction`` is ``'mean'`` or ``'sum'``.
    per_class
        Add ``"per_class"``: count, weight, mean NLL and share of the loss per class.
    calibration, bins, top_k, bootstrap, seed
        Add ``"calibration"`` (``nllloss eval --calibration``): top-1 and top-``k``
        accuracy, the Brier score ``mean Σ_c (p_c - [c = y])²``, the expected and maximum
        calibration errors over ``bins`` equal-width confidence bins, the temperature ``T``
        minimising the mean NLL of ``softmax(PRED / T)`` with that NLL and ECE at ``T``,
        and with ``bootstrap`` resamples 95% intervals of the loss, accuracy and ECE.
    chunk_rows
        Rows per block (default: about 16 MiB of predictions).

    Returns
    -------
    dict
        ``loss``, ``reduction``, ``total_weight``, ``count``, ``ignored``, ``perplexity``,
        then ``per_class`` and ``calibration`` when asked; NaN is None, as in the JSON.

    Examples
    --------
    >>> import numpy as np, nllloss
    >>> logits = np.array([[2, 0], [0, 1], [3, 0], [0, 2.5], [1, 0]], np.float32)
    >>> report = nllloss.evaluate(logits, np.array([0, 1, 1, 1, -100]), from_logits=True,
    ...                           calibration=True, bins=5)
    >>> round(report["loss"], 4), report["count"], report["ignored"]
    (0.8919, 4, 1)
    >>> section = report["calibration"]
    >>> section["accuracy"], round(section["ece"], 4), round(section["temperature"], 3)
    (0.75, 0.2566, 3.907)
    >>> round(section["loss_at_temperature"], 4)  # the mean NLL of softmax(logits / T)
    0.6539
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' or 'sum', got {reduction!r} (element-wise losses: "
            "nllloss.nll_loss)"
        )
    x = _source(predictions, "predictions", None)
    t = _source(targets, "targets", np.int64)
    from . import check_inputs

    layout = check_inputs(x, t)
    probabilities = _validate.is_float_dtype(t.dtype)
    if probabilities and (per_class or calibration):
        raise ValueError("per_class and calibration need targets of class indices")
    if weight is not None:
        weight = np.asarray(_source(weight, "weight", np.float64).rows(0, layout.classes))
        _validate.check_weight(weight, layout.classes)
        weight = weight.astype(x.dtype).astype(compute_dtype(x.dtype))
    settings = None
    if calibration:
        top_k = tuple(sorted({int(k) for k in top_k}))
        if int(bins) < 1 or any(k < 1 or k > layout.classes for k in top_k):
            raise ValueError(
                f"bins must be >= 1 and each top_k in 1..{layout.classes}, got bins={bins}, "
                f"top_k={top_k}"
            )
        if int(bootstrap) < 0 or int(seed) < 0:
            raise ValueError(f"bootstrap and seed must be >= 0, got {bootstrap}, {seed}")
        settings = CalibrationOptions(int(bins), top_k, int(bootstrap), int(seed))
    options = Options(
        classes=layout.classes,
        weight=weight,
        ignore_index=_validate.check_ignore_index(ignore_index, probabilities),
        reduction=reduction,
        from_logits=bool(from_logits),
        label_smoothing=_validate.check_label_smoothing(label_smoothing),
        z_loss=_validate.check_z_loss(z_loss, from_logits),
        softcap=_validate.check_softcap(softcap, from_logits),
        probabilities=probabilities,
        per_class=per_class,
        calibration=settings,
    )
    result = _evaluate(x, t, options, chunk_rows or default_chunk_rows(x))
    for message in result.warnings:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    context = Context(
        reduction=reduction,
        from_logits=options.from_logits,
        label_smoothing=options.label_smoothing,
        weighted=weight is not None,
        loss_file=None,
        z_loss=options.z_loss,
        softcap=options.softcap,
        probabilities=probabilities,
    )
    return as_dict(result, context)


def _source(value: Any, role: str, text_dtype):
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        return open_array(str(value), role, text_dtype=text_dtype)
    return InMemory(np.asarray(value), role)

"""``nllloss examples``: the worked examples of three frameworks' documentation, computed by
nllloss beside their values.

The documented values are those printed in the OneFlow and Paddle ``NLLLoss`` documents and
PyTorch 2.13's results for the same inputs, restated with their sources in
``docs/framework-examples.md``.
"""

from __future__ import annotations

import numpy as np

from .. import nll_loss, nll_loss_backward

# OneFlow's NLLLoss example (int32 targets): the input is used as given.
ONEFLOW_INPUT = [
    [-0.1664078, -1.7256707, -0.14690138],
    [-0.21474946, 0.53737473, 0.99684894],
    [-1.135804, -0.50371903, 0.7645404],
]
ONEFLOW_TARGET = [0, 1, 2]

# Paddle's NLLLoss example: log_softmax (axis 1) of its 5x3 matrix, as torch 2.13 computes
# it in float32 (shortest round-trip digits), and its labels.
PADDLE_LOG_PROBS = [
    [-1.0607061, -0.95087636, -1.3190601],
    [-1.103586, -1.5569068, -0.7819056],
    [-1.3079193, -1.1714077, -0.8682447],
    [-0.910452, -1.0089649, -1.4564527],
    [-1.3371204, -1.3077161, -0.761507],
]
PADDLE_LABEL = [0, 2, 1, 1, 0]
PADDLE_WEIGHT = [0.2, 1.5, 0.7]


def _examples():
    """(description, documented value, where it is documented, nllloss's value)."""
    x = np.array(ONEFLOW_INPUT, dtype=np.float32)
    t = np.array(ONEFLOW_TARGET, dtype=np.int32)
    for reduction, documented in [
        ("none", "[ 0.1664, -0.5374, -0.7645]"),
        ("sum", "-1.1355"),
        ("mean", "-0.3785"),
    ]:
        value = nll_loss(x, t, reduction=reduction)
        yield f"OneFlow example, reduction={reduction!r}", documented, "OneFlow docs", value

    x = np.array(PADDLE_LOG_PROBS, dtype=np.float32)
    t = np.array(PADDLE_LABEL)
    w = np.array(PADDLE_WEIGHT, dtype=np.float32)
    for label, kwargs, documented in [
        ("mean (default)", {}, 1.0720210075378418),
        ("sum", {"reduction": "sum"}, 5.360105037689209),
        ("weight, mean", {"weight": w}, 1.048160433769226),
        ("weight, sum", {"weight": w, "reduction": "sum"}, 4.297457695007324),
        ("ignore_index=1, mean", {"ignore_index": 1}, 1.0599106550216675),
    ]:
        value = nll_loss(x, t, **kwargs)
        yield f"Paddle example, {label}", repr(documented), "torch 2.13", value
    grad = nll_loss_backward(1.0, x, t)
    yield "Paddle example, d(mean)/d(input) at the labels", "-0.2", "torch 2.13", grad[range(5), t]


def _format(value) -> str:
    value = np.asarray(value)
    if value.ndim == 0:
        return repr(float(value))
    return np.array2string(value, precision=7, separator=", ")


def print_examples() -> int:
    """Print each worked example: documented value, its source, and nllloss's value."""
    rows = [("example", "documented", "source", "nllloss")]
    rows += [
        (name, documented, source, _format(value))
        for name, documented, source, value in _examples()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0

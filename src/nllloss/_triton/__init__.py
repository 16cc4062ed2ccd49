"""Triton kernels for torch CUDA tensors: kernels in ``_kernels``, launchers in ``_launch``.

Chosen automatically for CUDA tensors of float16, bfloat16 or float32 when ``triton``
imports. Set ``NLLLOSS_DISABLE_TRITON=1`` to use the generic path instead. For tests
without a GPU, ``NLLLOSS_TRITON_INTERPRET=1`` sends CPU tensors through the same kernels
under Triton's interpreter (slow: for correctness only). Nothing here imports torch or
triton until ``launcher_for`` is asked about a tensor.
"""

from __future__ import annotations

import os
from typing import Any

_UNSET = object()
_launcher: Any = _UNSET


def _load():
    """The launch module, or None when Triton is disabled or does not import."""
    global _launcher
    if _launcher is _UNSET:
        _launcher = None
        if os.environ.get("NLLLOSS_DISABLE_TRITON", "") not in ("", "0"):
            return None
        if os.environ.get("NLLLOSS_TRITON_INTERPRET", "") not in ("", "0"):
            # read by triton.jit when the kernels are defined
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            from . import _launch
        except ImportError:  # no triton, or one too old: the generic path serves
            return None
        _launcher = _launch
    return _launcher


def launcher_for(x: Any, target: Any, weight: Any = None):
    """The launch module if the Triton kernels serve these torch tensors, else None."""
    if x.device.type != "cuda" and not (
        x.device.type == "cpu" and os.environ.get("NLLLOSS_TRITON_INTERPRET", "") not in ("", "0")
    ):
        return None
    launcher = _load()
    if launcher is None or not launcher.supports(x, target, weight):
        return None
    return launcher

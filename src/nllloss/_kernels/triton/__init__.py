"""Triton kernels for torch CUDA tensors: kernels in ``_kernels``, launchers in ``_launch``.

Opt-in: they have passed their tests under Triton's interpreter and compile for sm_90, but
no run on a GPU has been recorded yet, so CUDA tensors take the path checked on an H100
(``benchmarks/results/gpu-backends.md``) unless ``NLLLOSS_TRITON=1``. The default flips
(``_DEFAULT``) in the change that commits a passing ``benchmarks/gpu_check.py`` run;
``NLLLOSS_TRITON=0`` then opts out. For tests without a GPU, ``NLLLOSS_TRITON_INTERPRET=1``
enables the kernels and also sends CPU tensors through them under Triton's interpreter
(slow: for correctness only). Nothing here imports torch or triton until ``launcher_for``
is asked about a tensor the gate lets through.
"""

from __future__ import annotations

import os
from typing import Any

# False until a GPU run of benchmarks/gpu_check.py is committed in benchmarks/results/
# with every check passing.
_DEFAULT = False

_UNSET = object()
_launcher: Any = _UNSET


def interpreted() -> bool:
    """``NLLLOSS_TRITON_INTERPRET`` is set: the kernels run under Triton's interpreter."""
    return os.environ.get("NLLLOSS_TRITON_INTERPRET", "") not in ("", "0")


def enabled() -> bool:
    """Whether CUDA tensors go through the Triton kernels (read at every call).

    ``NLLLOSS_TRITON`` unset or empty: the default; ``1``: yes; ``0``: no; the interpreter
    switch implies yes.
    """
    if interpreted():
        return True
    value = os.environ.get("NLLLOSS_TRITON", "")
    if value == "":
        return _DEFAULT
    if value not in ("0", "1"):
        raise ValueError(f"NLLLOSS_TRITON must be '0', '1' or unset, got {value!r}")
    return value == "1"


def load():
    """The launch module, or None when Triton does not import."""
    global _launcher
    if _launcher is _UNSET:
        _launcher = None
        if interpreted():
            # read by triton.jit when the kernels are defined
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            from . import _launch
        except ImportError:  # no triton, or one too old: the generic path serves
            return None
        _launcher = _launch
    return _launcher


def named() -> bool:
    """``NLLLOSS_TRITON=1``: the caller asked for the kernels by name, so a CUDA problem
    they cannot take is an error, not a quiet fallback."""
    return os.environ.get("NLLLOSS_TRITON", "") == "1"


def launcher_for(problem: Any):
    """The launch module if the Triton kernels compute this problem of torch tensors, else
    None (another engine does).

    CUDA tensors only when ``enabled()``; CPU tensors only under the interpreter switch.
    With ``NLLLOSS_TRITON=1`` (``named()``), a CUDA problem that the kernels cannot take
    (Triton does not import, or ``_launch.unsupported`` names why) raises instead.
    """
    device = problem.input.device.type
    if not ((device == "cuda" and enabled()) or (device == "cpu" and interpreted())):
        return None
    launcher = load()
    required = device == "cuda" and named()
    if launcher is None:
        if required:
            raise RuntimeError(
                "NLLLOSS_TRITON=1 asks for the Triton kernels, but triton (3.6 or later) "
                "does not import: install it (pip install nllloss[gpu]) or unset "
                "NLLLOSS_TRITON to let the default engine compute"
            )
        return None
    reason = launcher.unsupported(problem)
    if reason is None:
        return launcher
    if required:
        raise ValueError(
            f"NLLLOSS_TRITON=1 asks for the Triton kernels, which do not compute {reason}: "
            "unset NLLLOSS_TRITON to let the default engine compute this problem"
        )
    return None

"""``nllloss info``: versions of nllloss and of every backend installed, threads, GPUs.

Versions come from the installed packages' metadata, so nothing heavy is imported for them.
GPUs are listed by ``nvidia-smi`` when it is on the PATH, and by the libraries that can see
GPUs (torch, CuPy, JAX) only when they are already imported or ``probe`` asks for them
(``nllloss info --gpus``): importing torch and JAX just to count GPUs took 6 s.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys

import nllloss

# (shown name, distribution names to try): the core's dependencies, the backends of the
# array-API path and of nllloss.paddle, and the optional extras of the command line.
PACKAGES = (
    ("numpy", ("numpy",)),
    ("numba", ("numba",)),
    ("array-api-compat", ("array-api-compat",)),
    ("torch", ("torch",)),
    ("jax", ("jax",)),
    ("jaxlib", ("jaxlib",)),
    ("cupy", ("cupy", "cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x")),
    ("dask", ("dask",)),
    ("distributed", ("distributed",)),
    ("array-api-strict", ("array-api-strict",)),
    ("paddlepaddle", ("paddlepaddle", "paddlepaddle-gpu")),
    ("ml_dtypes", ("ml_dtypes",)),
    ("zarr", ("zarr",)),
    ("matplotlib", ("matplotlib",)),
)

NVIDIA_SMI_TIMEOUT = 10  # seconds


def versions() -> dict[str, str | None]:
    """Version of each package in PACKAGES, None where it is not installed."""
    found: dict[str, str | None] = {"nllloss": nllloss.__version__}
    for shown, distributions in PACKAGES:
        found[shown] = None
        for name in distributions:
            try:
                found[shown] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def threads() -> dict[str, int | None]:
    """Threads of nllloss's compiled kernels (numba's count) and the CPUs of this machine."""
    try:
        import numba

        kernel_threads = numba.get_num_threads()
    except ImportError:
        kernel_threads = None
    return {"nllloss": kernel_threads, "cpus": os.cpu_count()}


def gpus(installed: dict[str, str | None], probe: bool = False) -> dict[str, object]:
    """GPUs seen by nvidia-smi and by each GPU-capable library that is imported (all that
    are installed with ``probe``), or why not."""
    seen: dict[str, object] = {}
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(
                ["nvidia-smi", "-L"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT,
                check=True,
            ).stdout
            seen["nvidia-smi"] = [line for line in listing.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError) as error:
            seen["nvidia-smi"] = f"failed: {error}"
    for library, ask in (("torch", _torch_gpus), ("cupy", _cupy_gpus), ("jax", _jax_gpus)):
        if installed.get(library) and (probe or library in sys.modules):
            try:
                seen[library] = ask()
            except Exception as error:  # a broken driver install raises anything
                seen[library] = f"failed: {type(error).__name__}: {error}"
    return seen


def _torch_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _cupy_gpus() -> list[str]:
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    return [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(count)]


def _jax_gpus() -> list[str]:
    import jax

    try:
        return [str(device) for device in jax.devices("gpu")]
    except RuntimeError:  # no GPU backend
        return []


def collect(probe_gpus: bool = False) -> dict[str, object]:
    installed = versions()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": installed,
        "threads": threads(),
        "gpus": gpus(installed, probe_gpus),
    }


def render_info(format: str, probe_gpus: bool = False) -> str:
    info = collect(probe_gpus)
    if format == "json":
        return json.dumps(info) + "\n"
    rows = [("python", f"{info['python']} ({info['platform']})")]
    rows += [(name, version or "-") for name, version in info["versions"].items()]
    threads = info["threads"]
    rows.append(("threads", f"{threads['nllloss']} (nllloss kernels), {threads['cpus']} CPUs"))
    if not info["gpus"]:
        hint = "" if probe_gpus else "; --gpus asks torch, cupy and jax"
        rows.append(("GPUs", f"none seen (no nvidia-smi{hint})"))
    for seen_by, found in info["gpus"].items():
        rows.append(
            (f"GPUs ({seen_by})", found if isinstance(found, str) else ", ".join(found) or "none")
        )
    width = max(len(name) for name, _ in rows) + 2
    return "".join(f"{name:<{width}}{value}\n" for name, value in rows)

"""From logits, fused: nllloss against torch's ``cross_entropy`` on CPU, time and memory.

Usage: ``python benchmarks/fused.py [--quick] [--shapes 8192x32000 8x21x256x256]
[--variants indices probabilities ...] [--memory-variants ...] [--memory-dtypes ...]
[--out OUT]``.
Prints the report; writes ``OUT.{md,json}`` only with ``--out`` (the committed results:
``--out benchmarks/results/fused-latest``).

Variants (``VARIANTS``): class indices with and without label smoothing; class
probabilities (torch: ``cross_entropy`` with probability targets); ``z_loss`` and
``softcap`` (torch: the same loss written with torch operations, ``logsumexp`` and
``tanh``, as a user without nllloss writes it). The options' cost: nllloss on NumPy with
each option and without, raced together (interleaved rounds), forward and forward+backward
with ``out=``.

Time: for each shape, the competitors race in interleaved rounds (``harness.race``),
medians of one race, ratios against torch from the same race. Forward is the mean loss;
forward+backward is the loss and the gradient of the input (torch: autograd through
``cross_entropy``; nllloss: ``nll_loss_and_grad`` on NumPy, once with a fresh gradient and
once with ``out=`` the logits themselves, and autograd on torch tensors).

Memory: each competitor runs once more in a fresh subprocess, after its inputs exist and
a small warm-up call has compiled what it needs; the peak resident memory beyond that
point (``VmHWM`` after resetting it, minus ``VmRSS`` before the call) is what the call
itself needed (the gradient included), reported in units of the input's size. Per input
dtype (``--memory-dtypes``: float16, bfloat16, float32), the same for nllloss on NumPy with
class indices at the first shape: 16-bit inputs compute in float32, and the promise is the
same for every dtype (forward O(N), ``out=`` nothing of the input's size).
The memory floor for the time: one read of the logits (forward), plus one write of the
gradient (forward+backward), at the machine's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import FULL, QUICK, BusyMachine, Competitor, environment, race, write_results

SHAPES = ((8192, 32000), (8, 21, 256, 256), (4096, 1000))
# name: the options of nll_loss besides from_logits=True ("probabilities": the target form)
VARIANTS = {
    "indices": {},
    "indices ε=0.1": {"label_smoothing": 0.1},
    "probabilities": {"probabilities": True},
    "z_loss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    "z_loss + softcap": {"z_loss": 1e-4, "softcap": 30.0},
}
MEMORY_VARIANTS = ("indices", "indices ε=0.1", "probabilities")
MEMORY_DTYPES = ("float16", "bfloat16", "float32")
# (label, competitor, kind) of the memory-by-dtype table
DTYPE_MEMORY_CALLS = (
    ("forward", "nllloss numpy", "forward"),
    ("forward + backward", "nllloss numpy", "backward"),
    ("forward + backward, out=", "nllloss numpy out=", "backward"),
)
OPTION_VARIANTS = ("indices", "z_loss", "softcap", "z_loss + softcap")


def make_data(shape, seed=0, probabilities=False):
    """Logits, and int64 targets (5% ignored) or float32 class probabilities."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2  # in place: no temporary of the input's size
    if probabilities:
        t = rng.random(shape, dtype=np.float32)
        t /= t.sum(axis=1, keepdims=True)
        return x, t
    t = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    t[rng.random(t.shape) < 0.05] = -100
    return x, t


def loss_options(variant):
    """The keywords of nll_loss for a variant."""
    options = {k: v for k, v in VARIANTS[variant].items() if k != "probabilities"}
    return {"from_logits": True, **options}


def torch_loss(torch, x, t, variant):
    """The variant's loss in torch: ``cross_entropy``, and the z-loss and the cap written
    with torch operations (what nllloss's options replace)."""
    options = VARIANTS[variant]
    cap, z = options.get("softcap"), options.get("z_loss", 0.0)
    logits = x if cap is None else cap * torch.tanh(x / cap)
    loss = torch.nn.functional.cross_entropy(
        logits, t, label_smoothing=options.get("label_smoothing", 0.0)
    )
    if z:
        kept = t != -100
        lse = torch.logsumexp(logits, dim=1)
        loss = loss + z * torch.where(kept, lse.square(), 0).sum() / kept.sum()
    return loss


def competitors(shape, variant, torch, nllloss):
    x, t = make_data(shape, probabilities=VARIANTS[variant].get("probabilities", False))
    xt, tt = torch.from_numpy(x.copy()), torch.from_numpy(t)
    buffer = np.empty_like(x)
    options = loss_options(variant)

    def torch_backward():
        a = xt.detach().requires_grad_()
        torch_loss(torch, a, tt, variant).backward()
        return a.grad

    def ours_torch_backward():
        a = xt.detach().requires_grad_()
        nllloss.nll_loss(a, tt, **options).backward()
        return a.grad

    forward = [
        Competitor("torch", lambda: torch_loss(torch, xt, tt, variant)),
        Competitor("nllloss numpy", lambda: nllloss.nll_loss(x, t, **options)),
        Competitor("nllloss torch", lambda: nllloss.nll_loss(xt, tt, **options)),
    ]
    backward = [
        Competitor("torch", torch_backward),
        Competitor("nllloss numpy", lambda: nllloss.nll_loss_and_grad(x, t, **options)[1]),
        Competitor(
            "nllloss numpy out=",
            lambda: nllloss.nll_loss_and_grad(x, t, **options, out=buffer)[1],
        ),
        Competitor("nllloss torch", ours_torch_backward),
    ]
    return forward, backward


def option_costs(shape, settings, nllloss):
    """Medians (ms) of nllloss on NumPy with each of ``OPTION_VARIANTS``, one race each for
    the forward and for forward+backward with ``out=``: the options' cost, unconfounded by
    the load changing between races."""
    x, t = make_data(shape)
    buffer = np.empty_like(x)

    def forward(v):
        return lambda: nllloss.nll_loss(x, t, **loss_options(v))

    def step(v):
        return lambda: nllloss.nll_loss_and_grad(x, t, **loss_options(v), out=buffer)[1]

    result = {"shape": list(shape)}
    for kind, make in (("forward", forward), ("backward", step)):
        timings, _ = race([Competitor(v, make(v)) for v in OPTION_VARIANTS], settings)
        result[kind] = {name: 1e3 * timing.median() for name, timing in timings.items()}
    return result


def copy_bandwidth(nbytes=1 << 28, repeats=5):
    """Bytes per second of a large NumPy copy (read + write), best of ``repeats``."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


_MEMORY_CODE = """
import os, sys
import ml_dtypes, numpy as np, torch, nllloss
sys.path.insert(0, {here!r})
from fused import VARIANTS, loss_options, make_data, torch_loss
shape, variant, who, kind = {shape!r}, {variant!r}, {who!r}, {kind!r}
dtype = np.dtype(getattr(ml_dtypes, {dtype!r}, None) or {dtype!r})
probabilities = VARIANTS[variant].get("probabilities", False)
small = (4, *shape[1:3]) if len(shape) > 2 else (4, shape[1])
small_x, small_t = make_data(small, probabilities=probabilities)
x, t = make_data(shape, probabilities=probabilities)
small_x, x = small_x.astype(dtype), x.astype(dtype)
options = loss_options(variant)

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def run(x, t):
    if who == "torch":
        a = torch.from_numpy(x).requires_grad_(kind == "backward")
        loss = torch_loss(torch, a, torch.from_numpy(t), variant)
        if kind == "backward":
            loss.backward()
    elif who == "nllloss numpy":
        if kind == "backward":
            nllloss.nll_loss_and_grad(x, t, **options)
        else:
            nllloss.nll_loss(x, t, **options)
    elif who == "nllloss numpy out=":
        nllloss.nll_loss_and_grad(x, t, **options, out=x)
    else:
        a = torch.from_numpy(x).requires_grad_(kind == "backward")
        loss = nllloss.nll_loss(a, torch.from_numpy(t), **options)
        if kind == "backward":
            loss.backward()

run(small_x, small_t)  # imports and compiles outside the measurement
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current resident size
before = status("VmRSS")
run(x, t)
print((status("VmHWM") - before) / x.nbytes)
"""


def peak_memory(shape, variant, who, kind, dtype="float32"):
    """Peak memory of one call beyond its inputs, in input sizes (subprocess, VmHWM)."""
    code = _MEMORY_CODE.format(
        here=str(Path(__file__).resolve().parent),
        shape=tuple(shape),
        variant=variant,
        who=who,
        kind=kind,
        dtype=dtype,
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=900
    )
    if done.returncode:
        return None
    return float(done.stdout.strip().splitlines()[-1])


def memory_by_dtype(shape, dtype):
    """Peak memory of nllloss on NumPy (class indices) for an input of ``dtype``."""
    peaks = {label: peak_memory(shape, "indices", who, kind, dtype)
             for label, who, kind in DTYPE_MEMORY_CALLS}  # fmt: skip
    return {"shape": list(shape), "dtype": dtype, "peak_memory_inputs": peaks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=None)
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--memory-variants",
        nargs="*",
        choices=list(VARIANTS),
        default=list(MEMORY_VARIANTS),
        help="the variants whose peak memory is measured (a subprocess per competitor)",
    )
    parser.add_argument(
        "--memory-dtypes",
        nargs="*",
        choices=MEMORY_DTYPES,
        default=list(MEMORY_DTYPES),
        help="input dtypes whose peak memory is measured (nllloss on NumPy, the first shape)",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--busy", action="store_true", help="one competing process keeps a core busy meanwhile"
    )
    parser.add_argument(
        "--out", type=Path, help="write OUT.json and OUT.md (default: print the report only)"
    )
    args = parser.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    import torch

    import nllloss

    settings = QUICK if args.quick else FULL
    bandwidth = copy_bandwidth()
    busy = BusyMachine(args.busy)
    busy.__enter__()
    report = {
        "environment": environment({"torch": torch}, None),
        "busy": args.busy,
        "load": busy.describe(),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "cases": [],
        "option_costs": [],
        "memory_by_dtype": [],
    }
    for shape in shapes:
        nbytes = int(np.prod(shape)) * 4
        for variant in args.variants:
            forward, backward = competitors(shape, variant, torch, nllloss)
            case = {"shape": list(shape), "variant": variant}
            for kind, group, floor_bytes in (
                ("forward", forward, nbytes),
                ("backward", backward, 2 * nbytes),
            ):
                timings, first = race(group, settings)
                medians = {name: timing.median() for name, timing in timings.items()}
                spread = {name: timing.as_dict() for name, timing in timings.items()}
                case[kind] = {
                    "median_ms": {k: None if v is None else 1e3 * v for k, v in medians.items()},
                    "p10_ms": {k: v.get("p10_ms") for k, v in spread.items()},
                    "p90_ms": {k: v.get("p90_ms") for k, v in spread.items()},
                    "floor_ms": 1e3 * floor_bytes / bandwidth,
                    "check": first,
                }
                if not args.no_memory and variant in args.memory_variants:
                    case[kind]["peak_memory_inputs"] = {
                        c.name: peak_memory(shape, variant, c.name, kind) for c in group
                    }
            del forward, backward
            report["cases"].append(case)
            print(
                json.dumps(case["forward"]["median_ms"]),
                json.dumps(case["backward"]["median_ms"]),
                flush=True,
            )
        report["option_costs"].append(option_costs(shape, settings, nllloss))
        print(json.dumps(report["option_costs"][-1]), flush=True)
    if not args.no_memory:
        for dtype in args.memory_dtypes:
            report["memory_by_dtype"].append(memory_by_dtype(shapes[0], dtype))
            print(json.dumps(report["memory_by_dtype"][-1]), flush=True)
    busy.__exit__(None, None, None)
    report["environment"]["load_average_at_end"] = environment({"torch": torch}, None)[
        "load_average_at_end"
    ]
    if args.out is not None:
        write_results(args.out, report, markdown(report))
    print(markdown(report))
    return 0


def _ms(v):
    return "—" if v is None else f"{v:.1f}"


def markdown(report):
    env = report["environment"]
    lines = [
        "# From logits, fused: nllloss vs torch `cross_entropy` (CPU, float32, mean)",
        "",
        f"{env.get('date')}, revision {env.get('git_revision')}. Machine: "
        f"{env.get('cpu_model')}, {env.get('cpu_count')} cores, load average at the end "
        f"{env.get('load_average_at_end')}; {report.get('load', '')}; torch "
        f"{env.get('versions', {}).get('torch')}, numba {env.get('versions', {}).get('numba')}; "
        f"copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s (read + write). "
        "p10 and p90 of every timing are in the JSON. Medians of interleaved "
        "rounds; ratio = torch's time / ours (above 1: ours faster). Memory: peak resident "
        "memory of one call beyond its inputs, in units of the input's size (subprocess). "
        "torch for z_loss and softcap: `cross_entropy` of `c * tanh(x / c)` plus "
        "`z * logsumexp**2` (torch operations).",
        "",
    ]
    for kind, title in (("forward", "Forward (loss)"), ("backward", "Forward + backward")):
        lines += [f"## {title}", ""]
        names = [n for n in report["cases"][0][kind]["median_ms"] if n != "torch"]
        columns = ["shape", "variant", "torch ms", "floor ms"]
        columns += [f"{n} ms (ratio)" for n in names] + ["memory: torch / " + " / ".join(names)]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for case in report["cases"]:
            part = case[kind]
            medians = part["median_ms"]
            torch_ms = medians.get("torch")
            cells = []
            for name, ms in medians.items():
                if name == "torch":
                    continue
                ratio = f"{torch_ms / ms:.2f}x" if ms and torch_ms else "—"
                cells.append(f"{_ms(ms)} ({ratio})")
            memory = part.get("peak_memory_inputs") or {}
            mem = (
                " / ".join("—" if v is None else f"{v:.2f}" for v in memory.values())
                or "not measured"
            )
            shape = "x".join(map(str, case["shape"]))
            lines.append(
                f"| {shape} | {case['variant']} | {_ms(torch_ms)} | "
                f"{_ms(part['floor_ms'])} | " + " | ".join(cells) + f" | {mem} |"
            )
        lines.append("")
    lines += _option_costs(report)
    lines += _memory_by_dtype(report)
    return "\n".join(lines)


def _memory_by_dtype(report):
    rows = [
        f"| {'x'.join(map(str, entry['shape']))} | {entry['dtype']} | "
        + " | ".join("—" if v is None else f"{v:.2f}" for v in entry["peak_memory_inputs"].values())
        + " |"
        for entry in report.get("memory_by_dtype", [])
    ]
    if not rows:
        return []
    labels = [label for label, _, _ in DTYPE_MEMORY_CALLS]
    return [
        "## Peak memory by input dtype (nllloss on NumPy, class indices, in input sizes)",
        "",
        "| shape | dtype | " + " | ".join(labels) + " |",
        "|" + "---|" * (2 + len(labels)),
        *rows,
        "",
    ]


def _option_costs(report):
    """nllloss's time with each option over its time without, from one race per shape."""
    rows = []
    for costs in report.get("option_costs", []):
        shape = "x".join(map(str, costs["shape"]))
        for option in OPTION_VARIANTS[1:]:
            cells = []
            for kind in ("forward", "backward"):
                plain, ms = costs[kind]["indices"], costs[kind][option]
                cells.append(f"{ms:.2f} vs {plain:.2f} ({100 * (ms / plain - 1):+.0f}%)")
            rows.append(f"| {shape} | {option} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "## The options' cost (nllloss on NumPy, with the option vs without, one race)",
        "",
        "| shape | option | forward ms | forward + backward (`out=`) ms |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())

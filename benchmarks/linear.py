"""The loss from hidden states: nllloss's blocks against torch's ``linear_cross_entropy``.

Usage: ``python benchmarks/linear.py [--shapes 2048x512x32000 ...] [--sweep] [--out OUT]``.
Prints the report; writes ``OUT.md`` and ``OUT.json`` only with ``--out`` (the committed
results: ``--out benchmarks/results/linear-latest``).

Each case (a competitor at a shape ``NxDxV``, float32, reduction 'mean', 5% of targets
ignored) runs in a fresh subprocess: a small warm-up call, then 3 timed training steps
(the loss and its gradients with respect to the hidden states and the weight); the time is
their median. Memory: the peak resident memory of the first timed step beyond what was
resident before it (``VmHWM`` after resetting it, minus ``VmRSS``), less the two gradients
the step returns (N x D and V x D): what the step needed besides its inputs and results.

Competitors: ``naive`` is ``cross_entropy(h @ W.T, t)`` with autograd; ``torch reference``
is ``F.linear_cross_entropy`` (``options=None``), ``torch chunked`` the same with
``options=LinearCrossEntropyOptions()``; ``nllloss numpy`` is
``linear_cross_entropy_and_grad``, ``nllloss torch`` ``linear_cross_entropy`` with
autograd; ``GEMMs`` are the three matrix products alone (``h @ W.T``, ``L @ W``,
``L.T @ h``) in torch and in NumPy, the floor of any method that does them. ``--sweep``
adds nllloss at several ``chunk_rows``.

``--profile`` instead prints where one thread's CPU time goes in the blocks (NumPy and
torch, one thread each, ``time.process_time``, so that other jobs on a shared machine do
not count): per block size, the block's logits product, its loss pass (the fused kernel,
in place), and the two gradient products as the blocks make them, each summed over the
blocks (fastest of 3); beside the three full-size products of the same shape. The
measurement behind ``nllloss._hidden_states.blocks.MIN_CHUNK_ROWS`` and ``MAX_CHUNK_ROWS``.
The machine may be shared: compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = ("2048x512x32000",)
COMPETITORS = (
    "naive",
    "torch reference",
    "torch chunked",
    "nllloss numpy",
    "nllloss torch",
    "GEMMs torch",
    "GEMMs numpy",
)
SWEEP_ROWS = (32, 64, 128, 256, 512)

_CASE = r"""
import os, statistics, sys, time
import numpy as np, torch, nllloss
F = torch.nn.functional
who, (N, D, V), chunk_rows = {who!r}, {shape!r}, {chunk_rows!r}

def data(n, d, v):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((v, d), dtype=np.float32) / np.float32(np.sqrt(d))
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.05] = -100
    return h, w, t

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def step(h, w, t):
    ht, wt, tt = torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(t)
    if who.startswith("GEMMs"):
        if who == "GEMMs numpy":
            logits = h @ w.T
            return logits @ w, logits.T @ h
        logits = ht @ wt.T
        return logits @ wt, logits.T @ ht
    if who == "nllloss numpy":
        return nllloss.linear_cross_entropy_and_grad(h, w, t, chunk_rows=chunk_rows)[1:3]
    ht.requires_grad_()
    wt.requires_grad_()
    if who == "naive":
        loss = F.cross_entropy(ht @ wt.T, tt)
    elif who == "torch reference":
        loss = F.linear_cross_entropy(ht, wt, tt)
    elif who == "torch chunked":
        loss = F.linear_cross_entropy(ht, wt, tt, options=torch.nn.LinearCrossEntropyOptions())
    else:
        loss = nllloss.linear_cross_entropy(ht, wt, tt, chunk_rows=chunk_rows)
    loss.backward()
    return ht.grad, wt.grad

step(*data(64, D, 1000))  # imports, compiles, allocators warm
h, w, t = data(N, D, V)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current resident size
before = status("VmRSS")
times = []
for i in range(3):
    start = time.perf_counter()
    grads = step(h, w, t)
    times.append(time.perf_counter() - start)
    if i == 0:
        peak = status("VmHWM") - before - (h.nbytes + w.nbytes)
    del grads
print(statistics.median(times), peak)
"""


_PROFILE = r"""
import time
import numpy as np, torch, nllloss
from nllloss import _hidden_states
torch.set_num_threads(1)
nllloss.set_num_threads(1)
library, (N, D, V), rows_list = {library!r}, {shape!r}, {rows!r}
rng = np.random.default_rng(0)
h = rng.standard_normal((N, D), dtype=np.float32)
w = (rng.standard_normal((V, D), dtype=np.float32) / np.float32(np.sqrt(D)))
t = rng.integers(0, V, N)
g = rng.standard_normal((N, V), dtype=np.float32) * np.float32(1e-3)  # a stand-in gradient
if library == "torch":
    h, w, t, g = map(torch.from_numpy, (h, w, t, g))

def cpu(f):
    f()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        f()
        best = min(best, time.process_time() - start)
    return best

full = [
    cpu(lambda: h @ w.T), cpu(lambda: g.T @ h), cpu(lambda: g @ w),
]
print("full", *full)
upstream = np.float32(1.0) if library == "numpy" else torch.ones(())
for rows in rows_list:
    linear = _hidden_states.build(h, w, t, None, None, "mean", -100, {{}}, rows)
    algebra = linear.algebra
    buffer = algebra.buffer(linear)
    parts = [0.0, 0.0, 0.0]
    for block in linear.blocks():
        hidden = linear.hidden[block]
        grads = algebra.gradients(linear, (True, True, False), (None,) * 3)
        parts[0] += cpu(lambda: algebra.logits(linear, hidden, buffer))
        logits = algebra.logits(linear, hidden, buffer)
        problem = linear.block_problem(logits, linear.block_arrays(block))
        saved = logits.copy() if library == "numpy" else logits.clone()

        def loss_pass():
            logits[...] = saved  # the pass writes its gradient over the logits
            linear.backend.forward_backward(problem, upstream, out=logits)

        parts[1] += cpu(loss_pass) - cpu(lambda: logits.__setitem__(Ellipsis, saved))
        parts[2] += cpu(lambda: algebra.add(linear, grads, block, logits, hidden))
    print(rows, *parts)
"""


def run_profile(library, shape, rows):
    """One thread's CPU seconds: the three full-size products, and per block size of
    ``rows`` the blocks' (logits product, loss pass, two gradient products)."""
    code = _PROFILE.format(library=library, shape=shape, rows=rows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        timeout=3600, env=env,
    )  # fmt: skip
    if done.returncode:
        print(library, shape, "failed:", done.stderr[-800:], file=sys.stderr)
        return None
    lines = [line.split() for line in done.stdout.splitlines()]
    full = [float(x) for x in lines[0][1:]]
    return full, {int(line[0]): [float(x) for x in line[1:]] for line in lines[1:]}


def profile(shapes) -> str:
    """The ``--profile`` report (see the module)."""
    out = [
        "# Where one thread's CPU time goes in the blocks (s, float32; sums over the blocks)",
        "",
    ]
    for text in shapes:
        shape = tuple(int(d) for d in text.split("x"))
        rows = [*SWEEP_ROWS, shape[0]]
        for library in ("numpy", "torch"):
            measured = run_profile(library, shape, rows)
            if measured is None:
                continue
            full, blocks = measured
            products = sum(full)
            out += [
                f"## {library}, N x D x V = {text}: the three full-size products "
                f"{products:.3f} s ({' + '.join(f'{x:.3f}' for x in full)})",
                "",
                "| rows per block | logits product | loss pass | gradient products "
                "| products / full-size | all / full-size products |",
                "|---|---|---|---|---|---|",
            ]
            for size, (logits, loss_pass, gradients) in blocks.items():
                out.append(
                    f"| {size} | {logits:.3f} | {loss_pass:.3f} | {gradients:.3f} "
                    f"| {(logits + gradients) / products:.2f}x "
                    f"| {(logits + loss_pass + gradients) / products:.2f}x |"
                )
            out.append("")
    return "\n".join(out)


def run_case(who, shape, chunk_rows=None):
    """(median seconds, peak bytes beyond inputs and gradients) of one competitor, or
    (None, None) when its subprocess fails (out of memory, say)."""
    code = _CASE.format(who=who, shape=shape, chunk_rows=chunk_rows)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=1800
    )
    if done.returncode:
        print(who, shape, "failed:", done.stderr[-500:], file=sys.stderr)
        return None, None
    seconds, peak = done.stdout.split()
    return float(seconds), int(peak)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="nllloss at several chunk_rows")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--profile", action="store_true", help="one thread's CPU time in the blocks, by part"
    )
    parser.add_argument(
        "--busy", action="store_true", help="one competing process keeps a core busy meanwhile"
    )
    args = parser.parse_args(argv)
    if args.profile:
        print(profile(args.shapes))
        return 0
    import torch
    from harness import BusyMachine, environment, write_results

    busy = BusyMachine(args.busy)
    report = {
        "environment": environment({"torch": torch}, None),
        "busy": args.busy,
        "load": busy.describe(),
        "cases": [],
    }
    with busy:
        _run_cases(args, report)
    report["environment"]["load_average_at_end"] = environment({"torch": torch}, None)[
        "load_average_at_end"
    ]
    text = markdown(report)
    if args.out is not None:
        write_results(args.out, report, text)
    print(text)
    return 0


def _run_cases(args, report):
    for text in args.shapes:
        shape = tuple(int(d) for d in text.split("x"))
        runs = [(who, None) for who in COMPETITORS]
        if args.sweep:
            runs += [
                (who, rows) for who in ("nllloss numpy", "nllloss torch") for rows in SWEEP_ROWS
            ]
        for who, rows in runs:
            seconds, peak = run_case(who, shape, rows)
            case = {"shape": list(shape), "who": who, "chunk_rows": rows}
            case |= {"seconds": seconds, "peak_bytes": peak}
            report["cases"].append(case)
            print(json.dumps(case), flush=True)


def markdown(report):
    env = report["environment"]
    lines = [
        "# The loss from hidden states: fwd+bwd, float32, 'mean' (CPU)",
        "",
        f"{env.get('date')}, revision {env.get('git_revision')}. Machine: "
        f"{env.get('cpu_model')}, {env.get('cpu_count')} cores, load average at "
        f"the end {env.get('load_average_at_end')}; {report.get('load', '')}; torch "
        f"{env['versions'].get('torch')}, numba {env['versions'].get('numba')}, "
        f"numpy {env['versions'].get('numpy')}. Each row is a fresh process: median of 3 "
        "training steps (loss and gradients with respect to hidden states and weight); "
        "memory is the peak beyond inputs and the two gradients, in MiB and as a share of "
        "the N x V float32 logits. Ratios against the three GEMMs of the same library (torch "
        "for the torch rows) and against torch chunked.",
        "",
    ]
    for shape in dict.fromkeys(tuple(c["shape"]) for c in report["cases"]):
        n, d, v = shape
        logits = n * v * 4
        cases = [c for c in report["cases"] if tuple(c["shape"]) == shape]
        by_name = {c["who"]: c["seconds"] for c in cases if c["chunk_rows"] is None}
        chunked = by_name.get("torch chunked")
        lines += [
            f"## N={n}, D={d}, V={v} (logits {logits / 2**20:.0f} MiB)",
            "",
            "| competitor | chunk rows | time s | / GEMMs | torch chunked / this "
            "| memory MiB | / logits |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in cases:
            seconds, peak = c["seconds"], c["peak_bytes"]
            gemms = by_name.get("GEMMs numpy" if "numpy" in c["who"] else "GEMMs torch")
            cells = [
                c["who"],
                "default" if c["chunk_rows"] is None else str(c["chunk_rows"]),
                "—" if seconds is None else f"{seconds:.2f}",
                "—" if not (seconds and gemms) else f"{seconds / gemms:.2f}x",
                "—" if not (seconds and chunked) else f"{chunked / seconds:.2f}x",
                "—" if peak is None else f"{peak / 2**20:.0f}",
                "—" if peak is None else f"{100 * peak / logits:.1f}%",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

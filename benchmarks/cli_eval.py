"""Throughput and peak memory of ``nllloss eval`` against the block size (``--chunk-rows``).

Writes a (rows, classes) float32 file of logits and one of log-probabilities (a random block
tiled, so writing is fast), then runs ``nllloss eval`` on each in a fresh process per block
size and records the wall time and the peak resident memory (``VmHWM``: since exec; the
``ru_maxrss`` of a child keeps its parent's peak), beside a baseline run on a file of one
block and a run that loads the whole file with ``np.load``. The table is printed, and
written to ``DIR/cli-eval-latest.md`` only with ``--out DIR``. Linux only
(``/proc/self/status``).

    python benchmarks/cli_eval.py [--rows 262144] [--classes 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = """
import contextlib, io, json, re, sys, time
from pathlib import Path
from nllloss._cli import main
out = io.StringIO()
start = time.perf_counter()
with contextlib.redirect_stdout(out):
    assert main(sys.argv[1:]) == 0
seconds = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
print(json.dumps({"seconds": seconds, "peak": peak, "loss": json.loads(out.getvalue())["loss"]}))
"""

WHOLE = """
import json, re, sys, time
from pathlib import Path
import numpy as np, nllloss
start = time.perf_counter()
x, t = np.load(sys.argv[1]), np.load(sys.argv[2])
loss = nllloss.nll_loss(x, t, from_logits=sys.argv[3] == "logits")
seconds = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
print(json.dumps({"seconds": seconds, "peak": peak, "loss": float(loss)}))
"""


def write_inputs(folder: Path, rows: int, classes: int, tile: int = 4096) -> None:
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((tile, classes))).astype(np.float32)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    for name, block in (("logits", logits), ("log_probs", log_probs.astype(np.float32))):
        array = np.lib.format.open_memmap(folder / f"{name}.npy", "w+", np.float32, (rows, classes))
        for start in range(0, rows, tile):
            array[start : start + tile] = block[: rows - start]
        array.flush()
        del array
        np.save(folder / f"{name}_one_block.npy", block)
    np.save(folder / "target.npy", rng.integers(0, classes, rows))
    np.save(folder / "target_one_block.npy", rng.integers(0, classes, tile))


def measure(code: str, argv: list[str], repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(done.stdout))
    return {
        "seconds": statistics.median(run["seconds"] for run in runs),
        "peak": max(run["peak"] for run in runs),
        "loss": runs[0]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, help="write DIR/cli-eval-latest.md (default: print the table only)"
    )
    args = parser.parse_args()
    row_bytes = 4 * args.classes
    block_mib = (4, 16, 64, 256)
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    lines = [
        "# nllloss eval: block size, throughput, peak memory",
        "",
        f"{time.strftime('%Y-%m-%d')}, git {revision or '?'}, numpy {np.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        f"{args.rows} x {args.classes} float32 ({args.rows * row_bytes / 1e9:.2f} GB per file); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"median of {args.repeats} fresh processes, peak = largest VmHWM; seconds exclude "
        "the process's start and imports.",
        "",
        "| input | run | seconds | GB/s | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_inputs(folder, args.rows, args.classes)
        for name, flags in (("log_probs", []), ("logits", ["--from-logits"])):
            x, t = folder / f"{name}.npy", folder / "target.npy"
            cases = [
                (
                    "one block of rows (baseline)",
                    RUN,
                    [
                        "eval",
                        str(folder / f"{name}_one_block.npy"),
                        str(folder / "target_one_block.npy"),
                        *flags,
                    ],
                    4096 * row_bytes,
                ),
            ]
            for mib in block_mib:
                rows = max(1, (mib << 20) // row_bytes)
                argv = ["eval", str(x), str(t), *flags, "--chunk-rows", str(rows)]
                cases.append((f"eval, {mib} MiB blocks", RUN, argv, args.rows * row_bytes))
            cases.append(
                ("np.load + nll_loss", WHOLE, [str(x), str(t), name], args.rows * row_bytes)
            )
            for label, code, argv, size in cases:
                if code is RUN:
                    argv = [*argv, "--format", "json", "--quiet"]
                result = measure(code, argv, args.repeats)
                lines.append(
                    f"| {name} | {label} | {result['seconds']:.2f} | "
                    f"{size / result['seconds'] / 1e9:.2f} | {result['peak'] / 1e6:.0f} |"
                )
                print(lines[-1], flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cli-eval-latest.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

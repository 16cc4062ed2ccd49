"""The cost of ``nllloss eval --calibration`` over plain ``eval``, on a file larger than the
memory the process may use.

Writes a (rows, classes) float32 file of logits (a random block tiled; 4 GB by default) and
runs ``nllloss eval --from-logits`` on it in fresh processes, plain and with
``--calibration`` (temperature fit included; optionally ``--bootstrap``), each under an
address-space limit (``resource.setrlimit(RLIMIT_AS)``, default 3 GiB) smaller than the file:
the file cannot be loaded whole, and a run that tried would fail. Records wall time and peak
resident memory (``VmHWM``) and the number of passes over the file. The page cache is not
limited, so on a machine with memory to spare the passes after the first read from it.
Linux only.

    python benchmarks/cli_calibration.py [--rows 1000000] [--classes 1000] [--limit 3G]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = """
import contextlib, io, json, re, sys, time
from pathlib import Path
from nllloss._cli import _evaluate, main
passes = []
stream = _evaluate.stream
def counted(compute, *args, **kwargs):
    passes.append(compute.__name__)
    return stream(compute, *args, **kwargs)
_evaluate.stream = counted
out = io.StringIO()
start = time.perf_counter()
with contextlib.redirect_stdout(out):
    assert main(sys.argv[1:]) == 0
seconds = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
report = json.loads(out.getvalue())
print(json.dumps({"seconds": seconds, "peak": peak, "passes": len(passes), "report": report}))
"""


def write_logits(path: Path, rows: int, classes: int, tile: int = 4096) -> None:
    rng = np.random.default_rng(0)
    block = (3 * rng.standard_normal((tile, classes))).astype(np.float32)
    array = np.lib.format.open_memmap(path, "w+", np.float32, (rows, classes))
    for start in range(0, rows, tile):
        array[start : start + tile] = block[: rows - start]
    array.flush()
    del array


def measure(argv: list[str], limit: int) -> dict:
    def bounded():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-c", RUN, *argv],
        capture_output=True,
        text=True,
        preexec_fn=bounded,
    )
    if done.returncode:
        raise SystemExit(f"{argv}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--limit", default="3G", help="address-space limit (K, M, G suffixes)")
    parser.add_argument("--bootstrap", type=int, default=0, help="also --bootstrap R")
    parser.add_argument("--out", type=Path, help="write DIR/cli-calibration-latest.md")
    args = parser.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    limit = int(args.limit[:-1]) * units[args.limit[-1].upper()]
    size = 4 * args.rows * args.classes
    lines = [
        "# nllloss eval --calibration against plain eval",
        "",
        f"{time.strftime('%Y-%m-%d')}, numpy {np.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        f"{args.rows} x {args.classes} float32 logits ({size / 1e9:.2f} GB), address space "
        f"limited to {limit / 2**30:.1f} GiB (RLIMIT_AS); one fresh process per run; seconds "
        "exclude the start and imports.",
        "",
        "| run | seconds | ratio | passes | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_logits(folder / "x.npy", args.rows, args.classes)
        targets = np.random.default_rng(1).integers(0, args.classes, args.rows)
        np.save(folder / "t.npy", targets)
        base = ["eval", str(folder / "x.npy"), str(folder / "t.npy"), "--from-logits"]
        base += ["--format", "json", "--quiet"]
        runs = [("plain eval", base), ("--calibration", [*base, "--calibration"])]
        if args.bootstrap:
            runs.append(
                (
                    f"--calibration --bootstrap {args.bootstrap}",
                    [*base, "--calibration", "--bootstrap", str(args.bootstrap)],
                )
            )
        plain = None
        for label, argv in runs:
            result = measure(argv, limit)
            plain = plain or result["seconds"]
            lines.append(
                f"| {label} | {result['seconds']:.1f} | {result['seconds'] / plain:.2f} | "
                f"{result['passes']} | {result['peak'] / 1e6:.0f} |"
            )
            print(lines[-1], flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cli-calibration-latest.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

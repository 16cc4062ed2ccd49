"""The cost of ``nllloss eval --calibration`` over plain ``eval``, on a file larger than the
memory the process may use.

Writes a (rows, classes) float32 file of logits (a random block tiled; 4 GB by default) of
an overconfident model: each row's target is drawn from the softmax of its logits divided by
2 (Gumbel-max, fresh noise per row), so the fitted temperature is near 2, inside its bounds,
and the fit takes the passes a real file would. Runs ``nllloss eval --from-logits`` on it in
fresh processes, plain and with ``--calibration`` (temperature fit included; optionally
``--bootstrap``) interleaved, ``--repeats`` times each, each under an address-space limit
(``resource.setrlimit(RLIMIT_AS)``, default 3 GiB) smaller than the file: the file cannot be
loaded whole, and a run that tried would fail. Records wall time (median and range), peak
resident memory (``VmHWM``), the passes over the file and the load average. Then the peak
memory of ``--calibration`` on a file of ``--rss-gb`` GB. The page cache is not limited, so on
a machine with memory to spare the passes after the first read from it. Linux only.

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


# The model's logits are this many times too large: the fitted temperature is near it.
OVERCONFIDENCE = 2.0


def write_logits(folder: Path, rows: int, classes: int, tile: int = 4096) -> None:
    """x.npy: (rows, classes) float32 logits; t.npy: targets drawn from softmax(x / 2)."""
    rng = np.random.default_rng(0)
    block = (3 * rng.standard_normal((tile, classes))).astype(np.float32)
    array = np.lib.format.open_memmap(folder / "x.npy", "w+", np.float32, (rows, classes))
    targets = np.empty(rows, np.int64)
    for start in range(0, rows, tile):
        part = block[: rows - start]
        array[start : start + tile] = part
        noise = rng.gumbel(size=part.shape)
        targets[start : start + tile] = np.argmax(part / OVERCONFIDENCE + noise, axis=1)
    array.flush()
    del array
    np.save(folder / "t.npy", targets)


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
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--bootstrap", type=int, default=0, help="also --bootstrap R")
    parser.add_argument("--rss-gb", type=float, default=1.5, help="0: no memory check")
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
        f"{args.rows} x {args.classes} float32 logits ({size / 1e9:.2f} GB) of a model "
        f"{OVERCONFIDENCE:g}x overconfident, address space limited to {limit / 2**30:.1f} GiB "
        f"(RLIMIT_AS); one fresh process per run, {args.repeats} runs of each, interleaved; "
        "seconds exclude the start and imports. The ratio is of the medians.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_logits(folder, args.rows, args.classes)
        base = ["eval", str(folder / "x.npy"), str(folder / "t.npy"), "--from-logits"]
        base += ["--format", "json", "--quiet"]
        runs = {"plain eval": base, "--calibration": [*base, "--calibration"]}
        if args.bootstrap:
            label = f"--calibration --bootstrap {args.bootstrap}"
            runs[label] = [*base, "--calibration", "--bootstrap", str(args.bootstrap)]
        load = [os.getloadavg()[0]]
        results = {label: [] for label in runs}
        for _ in range(args.repeats):
            for label, argv in runs.items():
                results[label].append(measure(argv, limit))
                seconds = results[label][-1]["seconds"]
                print(f"{label}: {seconds:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
                load.append(os.getloadavg()[0])
        lines += [
            f"Load average (1 min) during the runs: {min(load):.1f} to {max(load):.1f}.",
            "",
            "| run | seconds (median) | range | ratio | passes | peak RSS (MB) |",
            "|---|---|---|---|---|---|",
        ]
        plain = float(np.median([r["seconds"] for r in results["plain eval"]]))
        for label, measured in results.items():
            seconds = [r["seconds"] for r in measured]
            median = float(np.median(seconds))
            lines.append(
                f"| {label} | {median:.1f} | {min(seconds):.1f} to {max(seconds):.1f} | "
                f"{median / plain:.2f} | {measured[-1]['passes']} | "
                f"{max(r['peak'] for r in measured) / 1e6:.0f} |"
            )
        section = results["--calibration"][-1]["report"]["calibration"]
        lines += ["", f"Fitted temperature: {section['temperature']:.4f}."]
    if args.rss_gb:
        rows = int(args.rss_gb * 1e9 / (4 * args.classes))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_logits(folder, rows, args.classes)
            argv = ["eval", str(folder / "x.npy"), str(folder / "t.npy"), "--from-logits"]
            measured = measure([*argv, "--format", "json", "--quiet", "--calibration"], limit)
        lines += [
            "",
            f"Peak RSS of --calibration on {rows} x {args.classes} float32 logits "
            f"({4 * rows * args.classes / 1e9:.2f} GB): {measured['peak'] / 1e6:.0f} MB "
            f"({measured['seconds']:.1f} s, {measured['passes']} passes).",
        ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cli-calibration-latest.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

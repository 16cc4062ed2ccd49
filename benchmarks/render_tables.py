"""The speed tables of the README and the docs, rendered from ``benchmarks/results/*.json``.

Each table in a page sits between ``<!-- table: NAME -->`` and ``<!-- end table -->`` and is
written by this script only, with a line naming the run it comes from: date, git revision,
machine, versions and the results file. ``tests/test_docs.py`` checks that every table in
the pages equals its rendering from the committed results.

    python benchmarks/render_tables.py           # rewrite the tables in place
    python benchmarks/render_tables.py --check   # exit 1 if a page's table is not the rendering
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- end table -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _time(ms: float) -> str:
    """A time with two or three significant digits, in the unit that reads best."""
    if ms < 1:
        return f"{ms * 1000:.2g} µs" if ms < 0.01 else f"{ms * 1000:.0f} µs"
    if ms < 1000:
        return f"{ms:.3g} ms"
    return f"{ms / 1000:.3g} s"


def _ratio(reference: float, ours: float) -> str:
    """How many times faster nllloss ran than the reference (below 1: slower)."""
    return f"{reference / ours:.2f}x"


def _stamp(data: dict, file: str) -> str:
    env = data["environment"]
    versions = env["versions"]
    names = [n for n in ("numpy", "torch", "numba", "jax", "transformers") if n in versions]
    listed = ", ".join(f"{name} {versions[name]}" for name in names)
    load = env.get("load_average_at_end")
    loaded = f"; load average {load[0]:.1f} at the end" if load else ""
    return (
        f"*Measured {env['date'][:10]} at revision {env['git_revision']} on {env['cpu_model']}, "
        f"{env['cpus_usable']} cores ({env['platform'].split('-')[0]}); Python {env['python']}, "
        f"{listed}{loaded}. Results: `benchmarks/results/{file}`.*"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cpu() -> str:
    """``nll_loss`` on NumPy against ``F.nll_loss`` (``benchmarks/cpu.py``), float32 'mean'."""
    data = _load("cpu-latest.json")
    rows = []
    for case in data["cases"]:
        if (case["dtype"], case["reduction"]) != ("float32", "mean"):
            continue
        t = case["timings"]
        fwd, fb = t["forward"], t["forward_backward"]
        ours, torch = fwd["nllloss"]["median_ms"], fwd["torch"]["median_ms"]
        ours_fb, torch_fb = fb["nllloss"]["median_ms"], fb["torch"]["median_ms"]
        rows.append([
            _shape(case["shape"]),
            f"{_time(ours)} / {_time(torch)}", _ratio(torch, ours),
            f"{_time(ours_fb)} / {_time(torch_fb)}", _ratio(torch_fb, ours_fb),
            f"{case['ratios']['forward_backward_over_floor']:.2f}",
        ])  # fmt: skip
    header = [
        "shape", "forward: nllloss / torch", "speed-up", "forward + backward: nllloss / torch",
        "speed-up", "forward + backward / memory floor",
    ]  # fmt: skip
    return _table(header, rows) + "\n\n" + _stamp(data, "cpu-latest.json")


def steadiness() -> str:
    """Forward + backward as the load changes (``benchmarks/cpu.py`` and its ``--busy``
    run): the quiet medians, 60 consecutive calls (p90 over the median, calls over 3x the
    median) and the medians and p90 with one competing busy process; float32 'mean'."""
    quiet, busy = _load("cpu-latest.json"), _load("cpu-busy-latest.json")
    busy_cases = {(tuple(c["shape"]), c["dtype"], c["reduction"]): c for c in busy["cases"]}
    rows = []
    for case in quiet["cases"]:
        key = (tuple(case["shape"]), case["dtype"], case["reduction"])
        if key[1:] != ("float32", "mean") or key not in busy_cases:
            continue
        fb = case["timings"]["forward_backward"]
        tail = case["tail"]
        loaded = busy_cases[key]["timings"]["forward_backward"]
        rows.append([
            _shape(case["shape"]),
            f"{_time(fb['nllloss']['median_ms'])} / {_time(fb['torch']['median_ms'])}",
            f"{tail['nllloss']['p90_over_median']:.2f} / {tail['torch']['p90_over_median']:.2f}",
            f"{tail['nllloss']['over_3x_median']} / {tail['torch']['over_3x_median']}",
            f"{_time(loaded['nllloss']['median_ms'])} / {_time(loaded['torch']['median_ms'])}",
            f"{_time(loaded['nllloss']['p90_ms'])} / {_time(loaded['torch']['p90_ms'])}",
        ])  # fmt: skip
    header = [
        "shape", "quiet median: nllloss / torch", "60 calls, p90 / median: nllloss / torch",
        "60 calls, over 3x the median: nllloss / torch", "one busy core, median: nllloss / torch",
        "one busy core, p90: nllloss / torch",
    ]  # fmt: skip
    return (
        _table(header, rows) + "\n\n" + _stamp(quiet, "cpu-latest.json") + "\n"
        + _stamp(busy, "cpu-busy-latest.json")
    )  # fmt: skip


def backends() -> str:
    """``nll_loss`` on torch tensors (autograd) and under ``jax.jit``."""
    data = _load("backends-latest.json")
    rows = []
    for case in data["cases"]:
        fwd, fb = case["forward"], case["forward+backward"]
        reference = next(name for name in fwd if name != "nllloss")
        rows.append([
            _shape(case["shape"]), case["library"], reference,
            f"{_time(fwd['nllloss'])} / {_time(fwd[reference])}",
            _ratio(fwd[reference], fwd["nllloss"]),
            f"{_time(fb['nllloss'])} / {_time(fb[reference])}",
            _ratio(fb[reference], fb["nllloss"]),
        ])  # fmt: skip
    header = [
        "shape", "library", "against", "forward: nllloss / it", "speed-up",
        "forward + backward: nllloss / it", "speed-up",
    ]  # fmt: skip
    return _table(header, rows) + "\n\n" + _stamp(data, "backends-latest.json")


def fused() -> str:
    """From logits against ``F.cross_entropy`` (or the same loss in torch operations)."""
    data = _load("fused-latest.json")
    rows = []
    for case in data["cases"]:
        fwd, bwd = case["forward"]["median_ms"], case["backward"]["median_ms"]
        memory = case["backward"].get("peak_memory_inputs")  # not measured for every case
        rows.append([
            _shape(case["shape"]), case["variant"],
            _ratio(fwd["torch"], fwd["nllloss numpy"]),
            _ratio(bwd["torch"], bwd["nllloss numpy"]),
            _ratio(bwd["torch"], bwd["nllloss numpy out="]),
            _ratio(bwd["torch"], bwd["nllloss torch"]),
            " / ".join(f"{memory[name]:.2f}" for name in
                       ("torch", "nllloss numpy", "nllloss numpy out=", "nllloss torch"))
            if memory else "-",
        ])  # fmt: skip
    header = [
        "shape", "target, option", "forward", "forward + backward (NumPy)",
        "forward + backward (NumPy, `out=logits`)", "forward + backward (torch autograd)",
        "memory beyond the inputs, forward + backward: torch / NumPy / `out=` / torch autograd",
    ]  # fmt: skip
    return _table(header, rows) + "\n\n" + _stamp(data, "fused-latest.json")


def linear() -> str:
    """The loss from hidden states: a training step's time and peak memory."""
    data = _load("linear-latest.json")
    columns = [
        ("naive", "naive `cross_entropy(h @ W.T)`"),
        ("torch reference", "torch `linear_cross_entropy`"),
        ("torch chunked", "torch chunked"),
        ("nllloss torch", "nllloss torch"),
        ("nllloss numpy", "nllloss NumPy"),
    ]
    shapes = []
    for case in data["cases"]:
        if case["shape"] not in shapes:
            shapes.append(case["shape"])
    rows = []
    for shape in shapes:
        n, _, v = shape
        logits_bytes = n * v * 4
        found = {
            case["who"]: case
            for case in data["cases"]
            if case["shape"] == shape and case["chunk_rows"] is None
        }
        gemms = f"{found['GEMMs torch']['seconds']:.1f} / {found['GEMMs numpy']['seconds']:.1f} s"
        rows.append([" x ".join(map(str, shape))] + [
            f"{found[who]['seconds']:.1f} s, {found[who]['peak_bytes'] / logits_bytes:.0%}"
            for who, _ in columns
        ] + [gemms])  # fmt: skip
    header = ["N x D x V", *(title for _, title in columns), "the three GEMMs (torch / NumPy)"]
    return _table(header, rows) + "\n\n" + _stamp(data, "linear-latest.json")


def transformers() -> str:
    """A Hugging Face causal LM's training step, unpatched and patched by ``apply``."""
    data = _load("transformers-step-latest.json")
    rows = []
    for vocab in dict.fromkeys(case["vocab"] for case in data["cases"]):
        found = {case["who"]: case for case in data["cases"] if case["vocab"] == vocab}
        logits = data["tokens"] * vocab * 4  # float32

        def extra(who: str, found=found, logits=logits) -> str:
            grown = found[who]["peak_bytes"] - found["body"]["peak_bytes"]
            return f"{grown / 2**20:.0f} MiB ({grown / logits:.1%})"

        plain, ours = found["transformers"], found["nllloss"]
        rows.append([
            f"{vocab:,} ({logits / 2**20:.0f} MiB)",
            f"{extra('transformers')}, {plain['median_s']:.1f} s",
            f"{extra('nllloss')}, {ours['median_s']:.1f} s ({ours['p90_s']:.1f} s)",
            _ratio(plain["median_s"], ours["median_s"]),
        ])  # fmt: skip
    header = [
        "V (logits)", "unpatched: extra memory, median step",
        "nllloss: extra memory, median step (p90)", "unpatched / nllloss time",
    ]  # fmt: skip
    return _table(header, rows) + "\n\n" + _stamp(data, "transformers-step-latest.json")


def training_loop() -> str:
    """A torch training step with nllloss's loss against torch's, quiet (and busy when that
    run is committed too)."""
    quiet = _load("training-loop-latest.json")
    busy_file = RESULTS / "training-loop-busy-latest.json"
    busy = json.loads(busy_file.read_text()) if busy_file.exists() else None

    def name(case: dict) -> str:
        if case["model"] == "llama":
            return f"tiny Llama, V = {case['vocab']:,}, {case['tokens']:,} tokens"
        return f"{_shape(case['shape'])}, `{case['loss']}`"

    def step(t: dict) -> str:
        return f"{_time(t['median_ms'])} ({_time(t['p90_ms'])})"

    def ratio(case: dict) -> str:
        steps = case["steps"]
        return _ratio(steps["torch"]["median_ms"], steps["nllloss"]["median_ms"])

    busy_cases = {name(c): c for c in busy["cases"]} if busy else {}
    rows = []
    for case in quiet["cases"]:
        row = [
            name(case),
            step(case["steps"]["torch"]),
            step(case["steps"]["nllloss"]),
            ratio(case),
        ]
        if busy:
            found = busy_cases.get(name(case))
            row.append(ratio(found) if found else "-")
        rows.append(row)
    header = ["case", "torch: median step (p90)", "nllloss: median step (p90)", "speed-up"]
    notes = _stamp(quiet, "training-loop-latest.json")
    if busy:
        header.append("speed-up, one busy core")
        notes += "\n\n" + _stamp(busy, "training-loop-busy-latest.json")
    return _table(header, rows) + "\n\n" + notes


def token_stats() -> str:
    """Per-token statistics against the loss: forward + backward, float32."""
    data = _load("token-stats-latest.json")
    logits, linear = data["logits"], data["linear"]

    def shape(text: str) -> str:
        return _shape([int(s) for s in text.split("x")])

    def median(case: dict, who: str) -> str:
        return f"{case[who]['median_s']:.1f} s"

    def of_logits(who: str) -> str:
        return f"{data['linear_extra_memory_bytes'][who] / data['logits_bytes']:.1%} of the logits"

    rows = [
        [f"from logits {shape(logits['shape'])}, {lib}",
         f"`{ours}` {median(logits, f'stats {key}')}", f"{against} {median(logits, other)}",
         f"{logits[f'stats {key}']['median_s'] / logits[other]['median_s']:.2f}x"]
        for lib, key, ours, against, other in (
            ("NumPy", "numpy", "token_stats_and_grad", "`nll_loss_and_grad(from_logits=True)`",
             "loss numpy"),
            ("torch CPU", "torch", "token_stats", "`nll_loss(from_logits=True)`", "loss torch"),
            ("torch CPU", "torch", "token_stats", "`log_softmax`, `gather`, `softmax`, `sum`",
             "composed torch"),
        )
    ] + [
        [f"hidden states {shape(linear['shape'])}, {lib}",
         f"{median(linear, f'stats {key}')}, {of_logits(f'stats {key}')}",
         f"`{against}` {median(linear, f'loss {key}')}, {of_logits(f'loss {key}')}",
         f"{linear[f'stats {key}']['median_s'] / linear[f'loss {key}']['median_s']:.2f}x"]
        for lib, key, against in (
            ("NumPy", "numpy", "linear_cross_entropy_and_grad"),
            ("torch", "torch", "linear_cross_entropy"),
        )
    ]  # fmt: skip
    beside = "loss+stats torch"  # the loss with return_stats (runs since it was added)
    rows += [
        [f"{where}, torch, the loss with `return_stats=True`",
         f"{median(case, beside)}" + (f", {of_logits(beside)}" if memory else ""),
         f"`{name}` {median(case, 'loss torch')}",
         f"{case[beside]['median_s'] / case['loss torch']['median_s']:.2f}x"]
        for where, case, name, memory in (
            (f"from logits {shape(logits['shape'])}", logits, "nll_loss", False),
            (f"hidden states {shape(linear['shape'])}", linear, "linear_cross_entropy", True),
        )
        if beside in case
    ]  # fmt: skip
    header = ["step", "nllloss statistics", "against", "time ratio (statistics / against)"]
    before = data["load_average_before"][0]
    note = _stamp(data, "token-stats-latest.json")[:-1] + f" Load average {before:.1f} before.*"
    return _table(header, rows) + "\n\n" + note


def summary() -> str:
    """The README's few lines: one row from each benchmark, the largest shape."""
    runs = {file: _load(file) for file in ("cpu-latest.json", "fused-latest.json",
                                           "linear-latest.json")}  # fmt: skip
    big = next(c for c in runs["cpu-latest.json"]["cases"] if c["shape"] == [8192, 32000])
    logits = next(c for c in runs["fused-latest.json"]["cases"]
                  if c["shape"] == [8192, 32000] and c["variant"] == "indices")  # fmt: skip
    head = {case["who"]: case for case in runs["linear-latest.json"]["cases"]
            if case["shape"] == [1024, 768, 128256] and case["chunk_rows"] is None}  # fmt: skip
    fb = big["timings"]["forward_backward"]
    bwd, memory = logits["backward"]["median_ms"], logits["backward"]["peak_memory_inputs"]
    n, _, v = head["nllloss torch"]["shape"]

    def of_logits(who: str) -> str:
        return f"{head[who]['peak_bytes'] / (n * v * 4):.0%}"

    rows = [
        ["`nll_loss` on NumPy, forward + backward, (8192, 32000)", "`F.nll_loss` + autograd",
         _ratio(fb["torch"]["median_ms"], fb["nllloss"]["median_ms"]), "-"],
        ["`nll_loss(..., from_logits=True)` on torch tensors, forward + backward, (8192, 32000)",
         "`F.cross_entropy` + autograd", _ratio(bwd["torch"], bwd["nllloss torch"]),
         f"{memory['nllloss torch']:.1f} vs {memory['torch']:.1f} input sizes"],
    ] + [
        ["`linear_cross_entropy` on torch tensors, training step, "
         f"{' x '.join(map(str, head['nllloss torch']['shape']))}", title,
         _ratio(head[who]["seconds"], head["nllloss torch"]["seconds"]),
         f"{of_logits('nllloss torch')} vs {of_logits(who)} of the logits"]
        for who, title in (("torch reference", "torch's `linear_cross_entropy`"),
                           ("torch chunked", "torch's chunked `linear_cross_entropy`"))
    ]  # fmt: skip
    env = runs["cpu-latest.json"]["environment"]
    when = ", ".join(
        f"`{file}` {run['environment']['date'][:10]} at {run['environment']['git_revision']}"
        for file, run in runs.items()
    )
    note = (
        f"*float32, 'mean'; on {env['cpu_model']}, {env['cpus_usable']} shared cores, "
        f"against torch {env['versions']['torch']} in the same run. Runs ({when}) in "
        "`benchmarks/results/`.*"
    )
    header = ["what", "against", "speed-up", "peak memory beyond the inputs"]
    return _table(header, rows) + "\n\n" + note


TABLES = {
    "cpu": cpu, "backends": backends, "fused": fused, "linear": linear,
    "transformers": transformers, "token-stats": token_stats, "summary": summary,
    "training-loop": training_loop, "steadiness": steadiness,
}  # fmt: skip


def render(text: str) -> str:
    """``text`` with every table block replaced by its rendering."""

    def block(match: re.Match[str]) -> str:
        opening, name, _, closing = match.groups()
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}")
        return f"{opening}{TABLES[name]()}\n{closing}"

    return _BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report pages that differ")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        rendered = render(text)
        if rendered != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(rendered)
    if args.check and stale:
        print("tables differ from their rendering:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

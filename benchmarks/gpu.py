"""GPU benchmark of nllloss's Triton kernels against torch, torch.compile and Liger-Kernel.

Run on a machine with a CUDA GPU: ``python benchmarks/gpu.py --out DIR [--quick]``, or as
part of the whole GPU check (``benchmarks/gpu_check.py``). Writes ``gpu-latest.md`` and
``gpu-latest.json`` (device name, versions, git revision) under ``--out``, after every case
(a run cut short keeps what it measured).

Times are medians of CUDA-event timings of single calls (after warm-up), in ms. Each task
has a byte floor (the bytes it must move at the least, below); ``floor GB/s`` is that
floor over the median time, and ``% copy`` compares it with the measured device-to-device
copy bandwidth (read + write counted). ``peak MiB`` is the peak of torch's allocator above
what was allocated before the call, the result included. Every competitor runs the same
inputs: random values (read as log-probabilities by nll_loss, as logits by cross_entropy),
int64 targets drawn uniformly, nothing ignored, no weight, reduction 'mean'.

Tasks and their floors (M target positions, C classes, s bytes per input element):

* ``nll fwd``: the loss from log-probabilities; floor ``M * (8 + s)`` (target, x[t]).
* ``nll bwd``: the gradient of ``nll fwd`` (torch: ``aten.nll_loss_backward``, or
  ``nll_loss2d_backward`` for K-dim input); floor ``M * C * s`` (one write of it).
* ``ce fwd``: cross entropy from logits; floor ``M * C * s`` (one read).
* ``ce bwd``: its gradient from the saved log-sum-exp; floor ``2 * M * C * s``.
* ``ce f+b``: cross entropy and its gradient; floor ``2 * M * C * s`` (one read, one write).

Competitors: ``nllloss`` (the launchers, targets checked: one host sync), ``nllloss
unchecked`` (``check_targets=False``), ``nllloss fused`` (``forward_backward``: the gradient
written during the forward), ``nll_loss autograd`` (the public ``nllloss.nll_loss`` and
``.backward()`` with ``NLLLOSS_TRITON=1``: the path a user gets, wiring included), ``torch``
(``F.nll_loss`` / ``F.cross_entropy`` and autograd), ``compiled`` (``torch.compile`` of
``log_softmax`` + ``nll_loss``, dynamic shapes), and ``liger`` (``LigerCrossEntropyLoss``,
2-D only; it writes the gradient into its input, so the input is restored, untimed, before
each call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# In order of importance, so that a run cut short by its budget has the anchors' shapes:
# 16384 x 128256 (Liger's and the byte-floor anchors), 4096 rows (the "N >= 4096" 2-D
# forward goal), the K-dim shape (torch's atomics), then the rest.
CASES = [
    ((16384, 128256), "bfloat16"),
    ((4096, 32000), "bfloat16"),
    ((16, 21, 512, 512), "float32"),
    ((16384, 32000), "bfloat16"),
    ((65536, 32000), "bfloat16"),
    ((4096, 32000), "float32"),
    ((16384, 128256), "float32"),
]
QUICK_CASES = CASES[:3]
SMOKE_CASES = [((64, 100), "bfloat16"), ((2, 5, 8, 8), "float32")]


def git_revision() -> str:
    """HEAD's hash (with ``-dirty`` when the tree differs), or what ``gpu_check.py
    --prepare`` recorded where git is absent (a GPU machine gets the tree without it)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        if head:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            return head + ("-dirty" if dirty else "")
    except OSError:
        pass
    recorded = root / ".whl" / "revision.txt"
    if recorded.exists():
        return recorded.read_text().strip() + " (recorded by gpu_check.py --prepare)"
    return "unknown"


def environment(torch, device: str, **extra) -> dict:
    import triton

    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (no GPU)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "git": git_revision(),
    }
    env.update(extra)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of gpu-latest.md / .json")
    parser.add_argument("--quick", action="store_true", help="the first three cases only")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--budget", type=float, default=None, help="seconds; no new case after")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="no GPU: tiny shapes on the CPU under Triton's interpreter, wall-clock times "
        "(checks that the script runs; the numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined
        os.environ["NLLLOSS_TRITON_INTERPRET"] = "1"
        args.no_compile = True  # inductor on the CPU compiles C++ for a minute
        args.reps = 1
    cases = SMOKE_CASES if args.smoke else QUICK_CASES if args.quick else CASES
    rows = run(
        Path(args.out), cases, reps=args.reps, compile_=not args.no_compile,
        liger=not args.no_liger, smoke=args.smoke, budget=args.budget,
    )  # fmt: skip
    return 1 if failures(rows) else 0


class Unpacked:
    """The Triton launchers (which take a ``Problem``) called with unpacked arguments, as
    these scripts write them: the Problem of each argument list is built once, as
    ``nllloss.nll_loss`` builds it, and kept, so that timed calls time the launch only."""

    def __init__(self, launch):
        self.launch, self._problems = launch, {}

    def problem(self, x, t, w, ignore_index, reduction, **options):
        from nllloss._builder import build

        options_key = tuple(sorted(options.items(), key=str))
        key = (id(x), id(t), id(w), ignore_index, reduction, options_key)
        if key not in self._problems:
            self._problems[key] = (build(x, t, w, ignore_index, reduction, options)[1], x, t, w)
        return self._problems[key][0]

    def forward(self, *arguments, **options):
        return self.launch.forward(self.problem(*arguments, **options))

    def backward(self, grad_output, *arguments, saved=None, **options):
        return self.launch.backward(self.problem(*arguments, **options), grad_output, saved)

    def forward_backward(self, *arguments, **options):
        return self.launch.forward_backward(self.problem(*arguments, **options))


def run(out: Path, cases, *, reps, compile_, liger, smoke, budget=None) -> list[dict]:
    """Time every case (until ``budget`` seconds have passed), writing the results after
    each one; returns the rows."""
    import torch

    from nllloss._kernels import triton as triton_kernels

    started = time.perf_counter()
    launch = triton_kernels.load()
    device = "cpu" if smoke else "cuda"
    if launch is None or not (smoke or torch.cuda.is_available()):
        raise SystemExit("needs a CUDA GPU and triton")
    os.environ["NLLLOSS_TRITON"] = "1"  # the public path's rows: opted in
    torch.manual_seed(0)
    bench = Bench(torch, Unpacked(launch), reps, compile_, liger, device)
    copy_gbs = bench.copy_bandwidth()
    env = environment(
        torch, device, liger_kernel=bench.liger_version, reps=reps, copy_GBps=round(copy_gbs, 1)
    )
    rows: list[dict] = []
    for shape, dtype in cases:
        label = case_label(shape, dtype)
        if budget is not None and time.perf_counter() - started > budget:
            rows.append({"case": label, "task": "-", "impl": "-", "median ms": None,
                         "floor GB/s": None, "error": "not run: the budget was spent"})  # fmt: skip
            continue
        case_started = time.perf_counter()
        rows += bench.case(shape, getattr(torch, dtype))
        print(f"{label}: {time.perf_counter() - case_started:.1f} s", flush=True)
        for row in rows:
            gbs = row.get("floor GB/s")
            row["% copy"] = round(100 * gbs / copy_gbs, 1) if gbs else None
        write(out, env, rows, copy_gbs)
    write(out, env, rows, copy_gbs)
    return rows


def case_label(shape, dtype: str) -> str:
    return "x".join(map(str, shape)) + " " + dtype


def failures(rows) -> list[dict]:
    """Rows of nllloss that raised (the competitors' errors are notes, not failures)."""
    return [r for r in rows if r.get("error") and r["impl"].startswith(("nllloss", "nll_loss"))]


def write(out: Path, env: dict, rows: list[dict], copy_gbs: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {"environment": env, "rows": rows, "goals": goals(rows, copy_gbs)}
    (out / "gpu-latest.json").write_text(json.dumps(document, indent=1))
    (out / "gpu-latest.md").write_text(markdown(env, rows, copy_gbs))


class Bench:
    def __init__(self, torch, launch, reps, compile_, liger, device):
        import torch.nn.functional as F

        self.torch, self.F, self.launch, self.reps = torch, F, launch, reps
        self.device = device
        self.cuda = device == "cuda"
        # the first call compiles; two more let clocks and the allocator settle (unmeasured
        # count, the usual one); under the interpreter one rehearses the call
        self.warmups = 3 if self.cuda else 1
        if compile_:

            def log_softmax_nll(x, t):
                return F.nll_loss(F.log_softmax(x, dim=1), t)

            self.compiled = torch.compile(log_softmax_nll, dynamic=True)
        else:
            self.compiled = None
        self.liger = None
        self.liger_version = "not asked for"
        if liger:
            try:
                from importlib.metadata import version

                from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

                self.liger = LigerCrossEntropyLoss(reduction="mean")
                self.liger_version = version("liger-kernel")
            except ImportError as error:
                self.liger_version = f"not installed ({error}); see benchmarks/gpu_check.py"

    def time(self, fn, setup=None):
        """(median ms, min ms, peak MiB above the allocation before the call)."""
        for _ in range(self.warmups):
            if setup:
                setup()
            fn()
        self.synchronize()
        times = []
        for _ in range(self.reps):
            if setup:
                setup()
            times.append(self.elapsed_ms(fn))
        if setup:
            setup()
        if not self.cuda:
            return statistics.median(times), min(times), None
        cuda = self.torch.cuda
        cuda.synchronize()
        base = cuda.memory_allocated()
        cuda.reset_peak_memory_stats()
        result = fn()
        cuda.synchronize()
        peak = (cuda.max_memory_allocated() - base) / 2**20
        del result
        return statistics.median(times), min(times), peak

    def synchronize(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def elapsed_ms(self, fn) -> float:
        if not self.cuda:
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) * 1e3
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def copy_bandwidth(self) -> float:
        torch = self.torch
        size = 2**30 if self.cuda else 2**20
        src = torch.empty(size, dtype=torch.float32, device=self.device).fill_(1.0)
        dst = torch.empty_like(src)
        median, _, _ = self.time(lambda: dst.copy_(src))
        src = dst = None  # free before the cases
        return 2 * 4 * size / (median * 1e-3) / 1e9

    def case(self, shape, dtype):
        torch, F, launch = self.torch, self.F, self.launch
        import nllloss

        x = torch.randn(shape, dtype=dtype, device=self.device)
        classes = shape[1]
        target = torch.randint(0, classes, (shape[0], *shape[2:]), device=self.device)
        positions = target.numel()
        size = x.element_size()
        label = case_label(shape, str(dtype).replace("torch.", ""))
        kdim = len(shape) > 2
        rows = []

        def add(task, name, floor_bytes, fn, setup=None):
            try:
                median, best, peak = self.time(fn, setup)
                gbs = floor_bytes / (median * 1e-3) / 1e9
                rows.append(
                    {"case": label, "task": task, "impl": name, "median ms": round(median, 4),
                     "min ms": round(best, 4), "floor GB/s": round(gbs, 1),
                     "peak MiB": None if peak is None else round(peak, 1),
                     "gradient MiB": round(positions * classes * size / 2**20, 1)}
                )  # fmt: skip
            except Exception as error:  # reported in the table, not hidden
                rows.append({"case": label, "task": task, "impl": name,
                             "error": f"{type(error).__name__}: {str(error)[:200]}",
                             "median ms": None, "floor GB/s": None})  # fmt: skip
            if self.cuda:
                torch.cuda.empty_cache()

        # nll on log-probabilities
        floor = positions * (8 + size)
        add("nll fwd", "nllloss", floor, lambda: launch.forward(x, target, None, -100, "mean"))
        add("nll fwd", "nllloss unchecked", floor,
            lambda: launch.forward(x, target, None, -100, "mean", check_targets=False))  # fmt: skip
        add("nll fwd", "torch", floor, lambda: F.nll_loss(x, target))
        if kdim:
            rows.append(_deterministic_row(torch, F, x, target, label, self.synchronize))
        floor = positions * classes * size
        one = torch.ones((), dtype=dtype, device=self.device)
        add("nll bwd", "nllloss", floor,
            lambda: launch.backward(one, x, target, None, -100, "mean",
                                    check_targets=False))  # fmt: skip
        aten = torch.ops.aten
        forward_op = aten.nll_loss2d_forward if kdim else aten.nll_loss_forward
        backward_op = aten.nll_loss2d_backward if kdim else aten.nll_loss_backward
        _, total = forward_op(x, target, None, 1, -100)
        add("nll bwd", "torch", floor, lambda: backward_op(one, x, target, None, 1, -100, total))

        # cross entropy from logits
        add("ce fwd", "nllloss", floor,
            lambda: launch.forward(x, target, None, -100, "mean", from_logits=True))  # fmt: skip
        add("ce fwd", "nllloss unchecked", floor,
            lambda: launch.forward(x, target, None, -100, "mean", from_logits=True,
                                   check_targets=False))  # fmt: skip
        add("ce fwd", "torch", floor, lambda: F.cross_entropy(x, target))
        if self.compiled is not None:
            add("ce fwd", "compiled", floor, lambda: self.compiled(x, target))
        if self.liger is not None and not kdim:
            add("ce fwd", "liger", floor, lambda: self.liger(x, target))

        floor = 2 * positions * classes * size
        unchecked = {"from_logits": True, "check_targets": False}
        _, saved = launch.forward(x, target, None, -100, "mean", **unchecked)
        add("ce bwd", "nllloss unchecked", floor,
            lambda: launch.backward(one, x, target, None, -100, "mean", **unchecked,
                                    saved=saved))  # fmt: skip
        saved = None

        def forward_then_backward():
            _, saved = launch.forward(x, target, None, -100, "mean", **unchecked)
            return launch.backward(one, x, target, None, -100, "mean", **unchecked, saved=saved)

        add("ce f+b", "nllloss unchecked", floor, forward_then_backward)
        add("ce f+b", "nllloss fused", floor,
            lambda: launch.forward_backward(x, target, None, -100, "mean",
                                            **unchecked))  # fmt: skip
        leaf = x.detach().clone().requires_grad_()

        def clear():
            leaf.grad = None

        def autograd(function):
            def run():
                function(leaf, target).backward()
                return leaf.grad

            return run

        def public(leaf, target):
            return nllloss.nll_loss(leaf, target, from_logits=True, check_targets=False)

        add("ce f+b", "nll_loss autograd", floor, autograd(public), clear)
        add("ce f+b", "torch", floor, autograd(F.cross_entropy), clear)
        if self.compiled is not None:
            add("ce f+b", "compiled", floor, autograd(self.compiled), clear)
        leaf = None
        if self.liger is not None and not kdim:
            liger_input = x.detach().clone().requires_grad_()

            def restore():  # liger overwrites its input with the gradient
                with torch.no_grad():
                    liger_input.copy_(x)
                liger_input.grad = None

            def liger_fb():
                self.liger(liger_input, target).backward()
                return liger_input.grad

            add("ce f+b", "liger", floor, liger_fb, restore)
            liger_input = None
        return rows


def _deterministic_row(torch, F, x, target, label, synchronize):
    """Whether torch's own K-dim 'mean' runs under deterministic algorithms (ours does)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        F.nll_loss(x, target)
        synchronize()
        note = "runs"
    except RuntimeError as error:
        note = f"refused: {str(error).splitlines()[0][:160]}"
    finally:
        torch.use_deterministic_algorithms(previous)
    return {"case": label, "task": "nll fwd", "impl": "torch, deterministic mode",
            "note": note, "median ms": None, "floor GB/s": None}  # fmt: skip


def _row(rows, case, task, impl):
    for r in rows:
        if (r["case"], r["task"], r["impl"]) == (case, task, impl) and r.get("median ms"):
            return r
    return None


def goals(rows, copy_gbs: float) -> list[dict]:
    """The GPU goals (README.md, section "GPU"), each ``met`` True,
    False, or None where this run did not measure it; ``value`` is the worst case's."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    kdim = [c for c in cases if c.count("x") > 1]
    wide = [c for c in cases if c.count("x") == 1 and int(c.split("x")[0]) >= 4096]

    def ratios(case_list, task, ours, theirs):
        found = []
        for case in case_list:
            a, b = _row(rows, case, task, ours), _row(rows, case, task, theirs)
            if a and b:
                found.append((b["median ms"] / a["median ms"], case))
        return found

    def goal(name, found, threshold, unit="x"):
        if not found:
            return {"goal": name, "value": None, "case": None, "met": None}
        value, case = min(found)
        return {"goal": name, "value": f"{value:.2f}{unit}", "case": case,
                "met": value >= threshold}  # fmt: skip

    result = [
        goal("2-D forward >= 10x F.nll_loss at N >= 4096",
             ratios(wide, "nll fwd", "nllloss", "torch"), 10),
        goal("K-dim forward >= 2x torch's atomics (and deterministic: see determinism)",
             ratios(kdim, "nll fwd", "nllloss", "torch"), 2),
    ]  # fmt: skip
    copy = [(r["% copy"], r["case"]) for r in rows
            if r["task"] in ("nll bwd", "ce bwd") and r["impl"].startswith("nllloss")
            and r.get("% copy")]  # fmt: skip
    result.append(goal("backward >= 80% of the measured copy bandwidth", copy, 80, "%"))
    two_d = [c for c in cases if c.count("x") == 1]
    result.append(goal("from logits f+b >= 1.3x Liger (fused, equal options)",
                       ratios(two_d, "ce f+b", "nllloss fused", "liger"), 1.3))  # fmt: skip
    fused = [r for r in rows if (r["task"], r["impl"]) == ("ce f+b", "nllloss fused")]
    # within 1.3x of the floor at copy speed: % copy >= 100 / 1.3
    floor = [(r["% copy"] / (100 / 1.3), r["case"]) for r in fused if r.get("% copy")]
    result.append(goal("from logits f+b within 1.3x of its byte floor (at copy speed)",
                       floor, 1.0, " of the allowance"))  # fmt: skip
    memory = [(r["gradient MiB"] * 1.05 / r["peak MiB"], r["case"])
              for r in fused if r.get("peak MiB")]  # fmt: skip
    name = "from logits f+b: no buffer of the logits' size beyond the gradient (peak <= 1.05x it)"
    result.append(goal(name, memory, 1.0, " of the allowance"))
    return result


def markdown(env, rows, copy_gbs) -> str:
    lines = [
        "# GPU benchmark: nllloss's Triton kernels",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        "",
        "Medians of CUDA-event timings (ms); `x torch` is torch's median over this row's "
        "(above 1: faster than torch); `floor GB/s` is the task's byte floor over the median; "
        "`% copy` compares it with the measured copy bandwidth. See benchmarks/gpu.py.",
        "",
        "| case | task | impl | median ms | x torch | floor GB/s | % copy | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    torch_times = {(r["case"], r["task"]): r["median ms"] for r in rows if r["impl"] == "torch"}
    for r in rows:
        reference = torch_times.get((r["case"], r["task"]))
        speedup = f"{reference / r['median ms']:.2f}" if reference and r.get("median ms") else ""
        cells = [
            r["case"], r["task"], r["impl"], r.get("median ms"), speedup, r.get("floor GB/s"),
            r.get("% copy"), r.get("peak MiB"), r.get("error") or r.get("note"),
        ]  # fmt: skip
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    lines += [
        "",
        "## Goals",
        "",
        "| goal | worst value | case | met |",
        "|---|---|---|---|",
    ]
    for g in goals(rows, copy_gbs):
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['value'] or ''} | {g['case'] or ''} | {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark of nllloss's Triton kernels against torch and Liger-Kernel.

Run on a machine with a CUDA GPU: ``python benchmarks/gpu.py [--out DIR] [--quick]``.
Prints the report; with ``--out DIR`` writes ``DIR/gpu-latest.md`` and ``gpu-latest.json``
(device name, versions, git revision).

Times are medians of CUDA-event timings of single calls (after warm-up), in ms. Each task
has a byte floor (the bytes it must move at the least, below); ``floor GB/s`` is that
floor over the median time, and ``% copy`` compares it with the measured device-to-device
copy bandwidth (read + write counted). ``peak MiB`` is the peak of torch's allocator above
what was allocated before the call. Every competitor runs the same inputs: random values
(read as log-probabilities by nll_loss, as logits by cross_entropy), int64 targets drawn
uniformly, nothing ignored, no weight, reduction 'mean'.

Tasks and their floors (M target positions, C classes, s bytes per input element):

* ``nll fwd``: the loss from log-probabilities; floor ``M * (8 + s)`` (target, x[t]).
* ``nll bwd``: the gradient of ``nll fwd`` (torch: ``aten.nll_loss_backward``, or
  ``nll_loss2d_backward`` for K-dim input); floor ``M * C * s`` (one write of it).
* ``ce fwd``: cross entropy from logits; floor ``M * C * s`` (one read).
* ``ce f+b``: cross entropy and its gradient; floor ``2 * M * C * s`` (one read, one write).

Competitors: ``nllloss`` (the launchers, targets checked: one host sync), ``nllloss
unchecked`` (``check_targets=False``), ``nllloss fused`` (``ce f+b`` with the gradient
written during the forward), ``torch`` (``F.nll_loss`` / ``F.cross_entropy`` and autograd),
``compiled`` (``torch.compile`` of ``log_softmax`` + ``nll_loss``, dynamic shapes), and
``liger`` (``LigerCrossEntropyLoss``, 2-D only; it writes the gradient into its input, so
the input is restored, untimed, before each call).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES_2D = [(4096, 32000), (16384, 32000), (16384, 128256), (65536, 32000)]
SHAPES_2D_FLOAT32 = [(4096, 32000), (16384, 128256)]
SHAPE_KDIM = (16, 21, 512, 512)


def _git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        return rev.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, help="write the results into DIR (default: print them only)"
    )
    parser.add_argument("--quick", action="store_true", help="first shape of each kind only")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument(
        "--sweep", action="store_true", help="time the launchers' tile settings instead"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="no GPU: tiny shapes on the CPU under Triton's interpreter, wall-clock times "
        "(checks that the script runs; the numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined
        args.no_compile = args.no_liger = True
        args.reps = 2

    import torch

    from nllloss import _triton

    launch = _triton._load()
    device = "cpu" if args.smoke else "cuda"
    if launch is None or not (args.smoke or torch.cuda.is_available()):
        print("needs a CUDA GPU and triton", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    bench = _Bench(torch, launch, args.reps, not args.no_compile, not args.no_liger, device)
    if args.sweep:
        return _sweep(torch, bench, launch, args.out)
    copy_gbs = bench.copy_bandwidth()
    cases = [(s, torch.bfloat16) for s in SHAPES_2D] + [
        (s, torch.float32) for s in SHAPES_2D_FLOAT32
    ]
    cases.append((SHAPE_KDIM, torch.float32))
    if args.quick:
        cases = [cases[0], cases[-1]]
    if args.smoke:
        cases = [((64, 100), torch.bfloat16), ((2, 5, 8, 8), torch.float32)]
    rows = []
    for shape, dtype in cases:
        started = time.perf_counter()
        rows += bench.case(shape, dtype)
        print(f"{shape} {dtype}: {time.perf_counter() - started:.1f} s", flush=True)
    for row in rows:
        row["% copy"] = round(100 * row["floor GB/s"] / copy_gbs, 1) if row["floor GB/s"] else None
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "liger_kernel": bench.liger_version,
        "git": _git_revision(),
        "copy GB/s": round(copy_gbs, 1),
        "reps": args.reps,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = json.dumps({"environment": env, "rows": rows}, indent=1)
        (args.out / "gpu-latest.json").write_text(report)
        (args.out / "gpu-latest.md").write_text(_markdown(env, rows))
    print(_markdown(env, rows))
    return 0


class _Bench:
    def __init__(self, torch, launch, reps, compile_, liger, device):
        import torch.nn.functional as F

        self.torch, self.F, self.launch, self.reps = torch, F, launch, reps
        self.device = device
        self.cuda = device == "cuda"
        self.compiled_fwd = self.compiled_fb = None
        if compile_:

            def log_softmax_nll(x, t):
                return F.nll_loss(F.log_softmax(x, dim=1), t)

            self.compiled = torch.compile(log_softmax_nll, dynamic=True)
        else:
            self.compiled = None
        self.liger = None
        self.liger_version = None
        if liger:
            try:
                import liger_kernel
                from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

                self.liger = LigerCrossEntropyLoss(reduction="mean")
                self.liger_version = getattr(liger_kernel, "__version__", "installed")
            except ImportError as error:
                self.liger_version = f"not available ({error})"

    def time(self, fn, setup=None):
        """(median ms, min ms, peak MiB above the allocation before the call)."""
        for _ in range(3):
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
        x = torch.randn(shape, dtype=dtype, device=self.device)
        classes = shape[1]
        target = torch.randint(0, classes, (shape[0], *shape[2:]), device=self.device)
        positions = target.numel()
        size = x.element_size()
        label = "x".join(map(str, shape)) + " " + str(dtype).replace("torch.", "")
        kdim = len(shape) > 2
        rows = []

        def add(task, name, floor_bytes, fn, setup=None):
            try:
                median, best, peak = self.time(fn, setup)
                gbs = floor_bytes / (median * 1e-3) / 1e9
                rows.append(
                    {"case": label, "task": task, "impl": name, "median ms": round(median, 4),
                     "min ms": round(best, 4), "floor GB/s": round(gbs, 1),
                     "peak MiB": None if peak is None else round(peak, 1)}
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

        def ours():
            _, saved = launch.forward(
                x, target, None, -100, "mean", from_logits=True, check_targets=False
            )
            return launch.backward(
                one, x, target, None, -100, "mean", from_logits=True, check_targets=False,
                saved=saved,
            )  # fmt: skip

        add("ce f+b", "nllloss unchecked", floor, ours)
        grad = torch.empty_like(x)
        add("ce f+b", "nllloss fused", floor,
            lambda: launch.forward(x, target, None, -100, "mean", from_logits=True,
                                   check_targets=False, grad_out=grad))  # fmt: skip
        grad = None  # freed before the next competitors
        leaf = x.detach().clone().requires_grad_()

        def clear():
            leaf.grad = None

        def autograd(function):
            def run():
                function(leaf, target).backward()
                return leaf.grad

            return run

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
            "error": note, "median ms": None, "floor GB/s": None}  # fmt: skip


def _sweep(torch, bench, launch, out: Path | None) -> int:
    """Median ms of the launchers under each tile setting; writes gpu-sweep.md."""
    import itertools

    from nllloss._triton import _launch

    header = "| case | TILE | WARPS | STRIDED_CLASS_BLOCK | ce fwd | nll bwd | ce bwd | fused f+b |"
    device = torch.cuda.get_device_name() if bench.cuda else "cpu (smoke run)"
    lines = [f"# Tile sweep on {device}", "", header, "|---" * 8 + "|"]
    defaults = (_launch._TILE, _launch._WARPS, _launch._STRIDED_CLASS_BLOCK)
    cases = [
        ((16384, 128256), torch.bfloat16),
        ((16384, 32000), torch.bfloat16),
        (SHAPE_KDIM, torch.float32),
    ]
    if not bench.cuda:
        cases = [((64, 100), torch.bfloat16), ((2, 5, 8, 8), torch.float32)]
    for shape, dtype in cases:
        x = torch.randn(shape, dtype=dtype, device=bench.device)
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=bench.device)
        case = "x".join(map(str, shape)) + " " + str(dtype).replace("torch.", "")
        strided = [8, 16, 32] if len(shape) > 2 else [defaults[2]]
        for setting in itertools.product([2048, 4096, 8192, 16384], [4, 8, 16], strided):
            _launch._TILE, _launch._WARPS, _launch._STRIDED_CLASS_BLOCK = setting
            timings = _sweep_timings(torch, bench, launch, x, t)
            lines.append("| " + " | ".join(map(str, [case, *setting, *timings])) + " |")
            print(lines[-1], flush=True)
    _launch._TILE, _launch._WARPS, _launch._STRIDED_CLASS_BLOCK = defaults
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-sweep.md").write_text("\n".join(lines) + "\n")
    return 0


def _sweep_timings(torch, bench, launch, x, t) -> list[str]:
    one = torch.ones((), dtype=x.dtype, device=x.device)
    grad = torch.empty_like(x)
    options = {"from_logits": True, "check_targets": False}
    _, saved = launch.forward(x, t, None, -100, "mean", **options)
    calls = [
        lambda: launch.forward(x, t, None, -100, "mean", **options),
        lambda: launch.backward(one, x, t, None, -100, "mean", check_targets=False),
        lambda: launch.backward(one, x, t, None, -100, "mean", **options, saved=saved),
        lambda: launch.forward(x, t, None, -100, "mean", **options, grad_out=grad),
    ]
    return [f"{bench.time(call)[0]:.4f}" for call in calls]


def _markdown(env, rows) -> str:
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
            r.get("% copy"), r.get("peak MiB"), r.get("error"),
        ]  # fmt: skip
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

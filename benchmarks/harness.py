"""CPU benchmark harness: nllloss against torch, jax, plain NumPy and a memory floor.

Run it as ``python benchmarks/cpu.py [options]``;
``benchmarks/README.md`` explains the columns. Everything is timed in one process: for each
case (shape, dtype, reduction) the competitors of one race run in interleaved rounds (each
round runs every competitor once, in a shuffled order), so that noise on the machine falls on
all of them alike, and every ratio is taken between medians of the same race.

torch, jax and numba are imported inside functions only: importing this module costs nothing
beyond NumPy and nllloss.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import nllloss

SHAPES: tuple[tuple[int, ...], ...] = (
    (64, 10),
    (4096, 1000),
    (8192, 32000),
    (1048576, 10),
    (8, 21, 256, 256),
)
# Left out of the default list by --quick: its input and its gradient are 1 GB each in float32.
QUICK_SKIPPED: tuple[tuple[int, ...], ...] = ((8192, 32000),)
DTYPES = ("float16", "float32", "float64")
REDUCTIONS = ("mean", "sum", "none")

# Tolerances of the sanity check between competitors (accumulation orders differ).
_CHECK_RTOL = {"float16": 2e-2, "float32": 1e-3, "float64": 1e-9}


@dataclass(frozen=True)
class Settings:
    """How long to time: warm-up calls, then rounds until the stopping rule holds."""

    warmup: int  # untimed calls of each competitor before the first round
    min_runs: int  # at least this many rounds...
    min_time: float  # ...and until every competitor has been timed this long (seconds)...
    max_runs: int  # ...but never more rounds than this
    sample_time: float  # a run repeats a fast call back to back until it lasts this long


FULL = Settings(warmup=2, min_runs=5, min_time=0.3, max_runs=50, sample_time=1e-3)
QUICK = Settings(warmup=2, min_runs=3, min_time=0.03, max_runs=10, sample_time=2e-4)


@dataclass
class Competitor:
    """One callable to time. ``reset`` runs before and after each call, outside the clock."""

    name: str
    run: Callable[[], Any]
    reset: Callable[[], None] | None = None


@dataclass
class Timing:
    """The runs of one competitor in one race, in seconds per call."""

    runs: list[float] = field(default_factory=list)
    calls_per_run: int = 1
    error: str | None = None

    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None

    def as_dict(self) -> dict[str, Any]:
        if not self.runs:
            return {"error": self.error}
        return {
            "median_ms": 1e3 * statistics.median(self.runs),
            "p10_ms": 1e3 * _percentile(self.runs, 10),
            "p90_ms": 1e3 * _percentile(self.runs, 90),
            "min_ms": 1e3 * min(self.runs),
            "max_ms": 1e3 * max(self.runs),
            "runs": len(self.runs),
            "calls_per_run": self.calls_per_run,
            "runs_ms": [round(1e3 * r, 6) for r in self.runs],  # in the order they ran
        }


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (NumPy's default)."""
    return float(np.percentile(values, q))


# --------------------------------------------------------------------------- timing


def _timed_call(c: Competitor) -> tuple[float, Any]:
    if c.reset is not None:
        c.reset()
    start = time.perf_counter()
    result = c.run()
    elapsed = time.perf_counter() - start
    if c.reset is not None:
        c.reset()  # frees what the call kept (torch's .grad) before the next competitor runs
    # The result (a gradient, say) is released after the clock stopped, for everyone alike.
    return elapsed, result


def _one_run(c: Competitor, calls: int) -> float:
    total = 0.0
    for _ in range(calls):
        elapsed, _result = _timed_call(c)
        total += elapsed
    return total / calls


def _summary(result: Any) -> dict[str, float]:
    """The loss (and the gradient's sum) of a result, for the sanity check."""
    if isinstance(result, tuple):
        out = {"grad_sum": result[1]}
        if result[0] is not None:
            out["loss"] = _scalar(result[0])
        return out
    return {"loss": _scalar(result)}


def race(
    competitors: list[Competitor], settings: Settings, seed: int = 0
) -> tuple[dict[str, Timing], dict]:
    """Time the competitors in interleaved rounds; also summarize each one's first result.

    Each round runs every competitor once, in an order shuffled afresh (seeded), so that no
    competitor always follows the same neighbour (whose freed memory or busy threads it would
    inherit) and a periodic disturbance cannot line up with one competitor's slot.
    """
    timings: dict[str, Timing] = {}
    first: dict[str, Any] = {}
    live: list[tuple[Competitor, int]] = []
    for c in competitors:
        try:
            _elapsed, result = _timed_call(c)
            first[c.name] = _summary(result)
            del result
            for _ in range(settings.warmup - 1):
                _timed_call(c)
            # Calls per run: as many as fill sample_time, counted on warm calls.
            calls, spent_here = 0, 0.0
            while spent_here < settings.sample_time and calls < 1000:
                spent_here += _timed_call(c)[0]
                calls += 1
        except Exception as exc:  # a competitor that cannot run this case is reported
            timings[c.name] = Timing(error=f"{type(exc).__name__}: {exc}"[:300])
            first.pop(c.name, None)
            continue
        timings[c.name] = Timing(calls_per_run=calls)
        live.append((c, calls))
    if not live:
        return timings, first

    spent = dict.fromkeys((c.name for c, _ in live), 0.0)
    shuffler = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        rounds = 0
        while True:
            order = list(live)
            shuffler.shuffle(order)
            for c, calls in order:
                per_call = _one_run(c, calls)
                timings[c.name].runs.append(per_call)
                spent[c.name] += per_call * calls
            rounds += 1
            if rounds >= settings.max_runs:
                break
            if rounds >= settings.min_runs and min(spent.values()) >= settings.min_time:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings, first


# The tail-latency goal: over consecutive calls, p90 at most this much over the median...
TAIL_P90_OVER_MEDIAN = 1.25
# ...and no call over this multiple of the median.
TAIL_MAX_OVER_MEDIAN = 3.0


def tail_latency(c: Competitor, calls: int) -> dict[str, Any]:
    """``calls`` consecutive calls of a warm competitor, each timed: what a training loop
    sees, where one slow call in ten is a slow step in ten (the races' runs average many
    calls and hide it). Percentiles, the worst call, and how many calls took more than
    ``TAIL_MAX_OVER_MEDIAN`` times the median."""
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        times = [_timed_call(c)[0] for _ in range(calls)]
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        if gc_was_enabled:
            gc.enable()
    median = statistics.median(times)
    return {
        "calls": calls,
        "p10_ms": 1e3 * _percentile(times, 10),
        "median_ms": 1e3 * median,
        "p90_ms": 1e3 * _percentile(times, 90),
        "max_ms": 1e3 * max(times),
        "p90_over_median": _percentile(times, 90) / median,
        "max_over_median": max(times) / median,
        "over_3x_median": sum(t > TAIL_MAX_OVER_MEDIAN * median for t in times),
        "calls_ms": [round(1e3 * t, 4) for t in times],  # in the order they ran
    }


_SPIN = "while True:\n    pass\n"


class BusyMachine:
    """One competing process that keeps a core busy while the benchmark runs (a context
    manager): the benchmark's "busy machine", as a DataLoader worker or another job makes
    it. Without ``enabled``, nothing is started."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> BusyMachine:
        if self.enabled:
            self._process = subprocess.Popen([sys.executable, "-c", _SPIN])
            time.sleep(0.2)  # started and spinning before the first timing
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def describe(self) -> str:
        return (
            "busy: one competing process spins on a core for the whole run"
            if self.enabled
            else "quiet: no competing process started by the benchmark"
        )


def write_results(prefix: Path, report: dict[str, Any], text: str) -> list[Path]:
    """Write ``prefix.md`` and ``prefix.json`` (the latest results), and the same two under
    ``history/`` beside them, named after the date and the revision, so that earlier runs
    are kept. Returns the paths written."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    env = report.get("environment", {})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    revision = (env.get("git_revision") or "unknown").replace("+", "-")
    name = prefix.name.removesuffix("-latest")
    dated = prefix.parent / "history" / f"{name}-{stamp}-{revision}"
    dated.parent.mkdir(exist_ok=True)
    written = []
    for target in (prefix, dated):
        md, js = target.with_name(target.name + ".md"), target.with_name(target.name + ".json")
        md.write_text(text, encoding="utf-8")
        js.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        written += [md, js]
    return written


class CpuMeter:
    """CPU time the rest of the machine used while we timed: the noise we could not avoid.

    The machine's busy time (``/proc/stat``) minus this process's and its children's, as a share
    of the capacity of all cores over the wall time. None where ``/proc/stat`` is missing.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [float(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / tick  # leave out guest time (counted in user)
        own = os.times()
        mine = own.user + own.system + own.children_user + own.children_system
        return time.perf_counter(), busy, mine

    def share(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        cores = os.cpu_count() or 1
        return max(0.0, other) / (wall * cores) if wall > 0 else None


# --------------------------------------------------------------------------- competitors


def _read(a: Any) -> float:
    """One full read of an array's memory, the same NumPy reduction for every competitor."""
    return float(np.asarray(a).sum())


def _scalar(value: Any) -> float:
    if hasattr(value, "detach"):
        value = value.detach().numpy()
    return float(np.sum(np.asarray(value), dtype=np.float64))


def make_data(shape: tuple[int, ...], dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability-like input in (-1, 0] and int64 targets in [0, C)."""
    rng = np.random.default_rng(seed)
    if dtype == "float64":
        x = rng.random(shape)
    else:
        x = rng.random(shape, dtype=np.float32)
        if dtype == "float16":
            x = x.astype(np.float16)
    np.negative(x, out=x)
    t = rng.integers(0, shape[1], size=(shape[0], *shape[2:]), dtype=np.int64)
    return x, t


def _grad_output(t: np.ndarray, dtype: np.dtype, reduction: str) -> Any:
    return np.ones(t.shape, dtype=dtype) if reduction == "none" else 1.0


def _one_thread(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with nllloss's kernels on one thread (the process's count restored after)."""
    from nllloss._kernels.cpu import _threads

    def run():
        saved = _threads._requested
        nllloss.set_num_threads(1)
        try:
            return call()
        finally:
            _threads._requested = saved

    return run


# The twin of nllloss's competitors that runs on one thread: the library must never be
# slower than it (the busy-machine goal), which a same-race ratio shows.
ONE_THREAD = "nllloss 1 thread"


def _nllloss_competitors(x, t, reduction, go):
    def forward():
        return nllloss.nll_loss(x, t, reduction=reduction)

    def fwd_bwd():
        loss = nllloss.nll_loss(x, t, reduction=reduction)
        g = nllloss.nll_loss_backward(go, x, t, reduction=reduction)
        return loss, _read(g), g

    fwd = [Competitor("nllloss", forward), Competitor(ONE_THREAD, _one_thread(forward))]
    fb = [Competitor("nllloss", fwd_bwd), Competitor(ONE_THREAD, _one_thread(fwd_bwd))]
    if hasattr(nllloss, "nll_loss_and_grad"):

        def and_grad():
            loss, g = nllloss.nll_loss_and_grad(x, t, reduction=reduction, grad_output=go)
            return loss, _read(g), g

        fb.append(Competitor("nllloss_and_grad", and_grad))
    return fwd, fb


def _torch_competitors(torch, x, t, reduction, go):
    f = torch.nn.functional
    xt = torch.from_numpy(x)  # shares x's memory
    tt = torch.from_numpy(t)
    leaf = torch.from_numpy(x).requires_grad_()  # made once, outside any timed region
    gt = torch.from_numpy(go) if isinstance(go, np.ndarray) else None

    def forward():  # xt does not require grad: no graph is recorded
        return f.nll_loss(xt, tt, reduction=reduction)

    def reset():
        leaf.grad = None

    def fwd_bwd():
        loss = f.nll_loss(leaf, tt, reduction=reduction)
        loss.backward(gt)
        return loss, _read(leaf.grad.numpy())

    return [Competitor("torch", forward)], [Competitor("torch", fwd_bwd, reset=reset)]


def _jax_competitors(jax, x, t, reduction):
    jnp = jax.numpy
    kdim = x.ndim > 2
    classes = x.shape[1]

    def picked(logp, tgt):
        if kdim:  # (N, C, d1, ...) -> (N * d1 * ..., C)
            logp = jnp.moveaxis(logp, 1, -1).reshape(-1, classes)
            tgt = tgt.reshape(-1)
        return jnp.take_along_axis(logp, tgt[:, None], axis=1)[:, 0]

    def loss(logp, tgt):
        p = picked(logp, tgt)
        if reduction == "mean":
            return -p.mean()
        if reduction == "sum":
            return -p.sum()
        return -p.reshape(tgt.shape)

    def scalar_loss(logp, tgt):
        # 'none' is differentiated with a grad_output of ones, i.e. as the sum.
        return loss(logp, tgt) if reduction != "none" else -picked(logp, tgt).sum()

    forward_jit = jax.jit(loss)
    value_and_grad_jit = jax.jit(jax.value_and_grad(scalar_loss))
    xj = jax.device_put(x)
    tj = jax.device_put(t.astype(np.int32))
    xj.block_until_ready()

    def forward():
        return forward_jit(xj, tj).block_until_ready()

    def fwd_bwd():
        value, g = value_and_grad_jit(xj, tj)
        g.block_until_ready()
        return value, _read(g), g

    return [Competitor("jax", forward)], [Competitor("jax", fwd_bwd)]


def _numpy_competitors(x, t, reduction, go):
    """What a user writes by hand with NumPy fancy indexing."""
    n, classes = x.shape[0], x.shape[1]
    kdim = x.ndim > 2

    def reduce(p):
        if reduction == "mean":
            return -p.mean()
        if reduction == "sum":
            return -p.sum()
        return -p.reshape(t.shape)

    def forward():
        if kdim:
            flat = np.moveaxis(x, 1, -1).reshape(-1, classes)
            return reduce(flat[np.arange(flat.shape[0]), t.reshape(-1)])
        return reduce(x[np.arange(n), t])

    def backward():
        g = np.zeros_like(x)
        if reduction == "mean":
            value = -1.0 / t.size
        elif reduction == "sum":
            value = -1.0
        else:
            value = -go
        if kdim:
            idx = np.indices(t.shape, sparse=True)
            g[(idx[0], t, *idx[1:])] = value
        else:
            g[np.arange(n), t] = value
        return g

    def fwd_bwd():
        loss = forward()
        g = backward()
        return loss, _read(g), g

    return [Competitor("numpy", forward)], [Competitor("numpy", fwd_bwd)]


def _floor_competitor(x):
    def floor():
        a = np.full_like(x, 0.5)  # a fresh allocation, written in full...
        return None, _read(a), a  # ...and read in full

    return Competitor("floor", floor)


# --------------------------------------------------------------------------- one case


def _check(first: dict[str, Any], dtype: str) -> tuple[dict, list[str]]:
    """Loss and gradient sum of each competitor's first call, and disagreements with ours."""
    values = {name: v for name, v in first.items() if name != "floor"}
    problems = []
    ref = values.get("nllloss")
    if ref is not None:
        rtol = _CHECK_RTOL[dtype]
        for name, v in values.items():
            for key, value in v.items():
                if key in ref and not math.isclose(value, ref[key], rel_tol=rtol, abs_tol=rtol):
                    problems.append(f"{name} {key} {value!r} differs from nllloss's {ref[key]!r}")
    return values, problems


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


# f+b competitors whose consecutive calls are timed for the tail (--tail)
TAIL_COMPETITORS = ("nllloss", ONE_THREAD, "torch")


def _kernel_runs() -> dict[str, int]:
    """Kernel calls so far by the twin that ran ({} without the compiled kernels)."""
    threads = sys.modules.get("nllloss._kernels.cpu._threads")
    return dict(threads.runs) if threads is not None else {}


def run_case(shape, dtype, reduction, settings, modules, seed=0, tail_calls=0) -> dict[str, Any]:
    torch, jax = modules.get("torch"), modules.get("jax")
    x, t = make_data(shape, dtype, seed)
    go = _grad_output(t, x.dtype, reduction)
    fwd, fb = _nllloss_competitors(x, t, reduction, go)
    notes = []
    builders = []
    if torch is not None:
        builders.append(("torch", lambda: _torch_competitors(torch, x, t, reduction, go)))
    if jax is not None:
        builders.append(("jax", lambda: _jax_competitors(jax, x, t, reduction)))
    if modules.get("numpy", True):
        builders.append(("numpy", lambda: _numpy_competitors(x, t, reduction, go)))
    for name, build in builders:
        try:
            f, b = build()
        except Exception as exc:
            notes.append(f"{name}: could not set up: {type(exc).__name__}: {exc}"[:300])
            continue
        fwd += f
        fb += b
    fb.append(_floor_competitor(x))

    meter = CpuMeter()
    runs_before = _kernel_runs()
    fwd_timings, fwd_first = race(fwd, settings, seed)
    fb_timings, fb_first = race(fb, settings, seed)
    tail = {}
    if tail_calls:
        for c in fb:
            if c.name in TAIL_COMPETITORS and not fb_timings[c.name].error:
                tail[c.name] = tail_latency(c, tail_calls)
    runs_after = _kernel_runs()
    kernel_runs = {k: runs_after[k] - runs_before.get(k, 0) for k in runs_after}
    background = meter.share()
    checks = {
        "forward": _check(fwd_first, dtype),
        "forward_backward": _check(fb_first, dtype),
    }
    del fwd, fb, builders
    for op, (_values, problems) in checks.items():
        notes += [f"check ({op}): {p}" for p in problems]
    for op, timings in (("forward", fwd_timings), ("forward_backward", fb_timings)):
        notes += [f"{name} ({op}): {tm.error}" for name, tm in timings.items() if tm.error]

    def med(timings, name):
        tm = timings.get(name)
        return tm.median() if tm is not None else None

    ours_fb = med(fb_timings, "nllloss")
    floor = med(fb_timings, "floor")
    ratios = {
        "forward_speedup_vs_torch": _ratio(med(fwd_timings, "torch"), med(fwd_timings, "nllloss")),
        "forward_backward_speedup_vs_torch": _ratio(med(fb_timings, "torch"), ours_fb),
        "forward_backward_over_floor": _ratio(ours_fb, floor),
        "forward_over_one_thread": _ratio(
            med(fwd_timings, "nllloss"), med(fwd_timings, ONE_THREAD)
        ),
        "forward_backward_over_one_thread": _ratio(ours_fb, med(fb_timings, ONE_THREAD)),
    }
    if "nllloss_and_grad" in fb_timings:
        and_grad = med(fb_timings, "nllloss_and_grad")
        ratios["and_grad_speedup_vs_torch"] = _ratio(med(fb_timings, "torch"), and_grad)
        ratios["and_grad_over_floor"] = _ratio(and_grad, floor)
    result = {
        "shape": list(shape),
        "dtype": dtype,
        "reduction": reduction,
        "input_bytes": int(x.nbytes),
        "background_cpu_share": background,
        "kernel_runs": kernel_runs,
        "tail": tail,
        "timings": {
            "forward": {k: v.as_dict() for k, v in fwd_timings.items()},
            "forward_backward": {k: v.as_dict() for k, v in fb_timings.items()},
        },
        "ratios": ratios,
        "checks": {op: values for op, (values, _problems) in checks.items()},
        "notes": notes,
    }
    return result


# --------------------------------------------------------------------------- first call

_FIRST_CALL_CODE = """\
import json, time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import nllloss
t2 = time.perf_counter()
x = -np.random.default_rng(0).random((64, 10), dtype=np.float32)
t = np.arange(64, dtype=np.int64) % 10
t3 = time.perf_counter()
nllloss.nll_loss(x, t)
t4 = time.perf_counter()
nllloss.nll_loss_backward(1.0, x, t)
t5 = time.perf_counter()
nllloss.nll_loss(x, t)
nllloss.nll_loss_backward(1.0, x, t)
t6 = time.perf_counter()
ms = lambda a, b: 1e3 * (b - a)
print(json.dumps({
    "import_numpy_ms": ms(t0, t1), "import_nllloss_ms": ms(t1, t2),
    "first_nll_loss_ms": ms(t3, t4), "first_backward_ms": ms(t4, t5),
    "first_call_ms": ms(t3, t5), "second_call_ms": ms(t5, t6),
}))
"""


def first_call_latency(repeats: int = 2) -> list[dict[str, Any]]:
    """Fresh interpreters in a row: import nllloss, then its first forward and backward."""
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _FIRST_CALL_CODE],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            out.append({"process": i + 1, "error": f"{type(exc).__name__}: {exc}"})
            continue
        wall = 1e3 * (time.perf_counter() - start)
        record: dict[str, Any] = {"process": i + 1, "process_wall_ms": wall}
        try:
            record.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            record["error"] = (proc.stderr.strip() or f"exit status {proc.returncode}")[-300:]
        out.append(record)
    return out


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def _numba_num_threads() -> int | None:
    numba = sys.modules.get("numba")
    return numba.get_num_threads() if numba is not None else None


def _numba_threading_layer() -> str | None:
    """The layer numba's parallel kernels ran on, if any ran in this process."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run
        return None


def _kernel_wait_policy() -> str:
    """How numba's idle workers wait: the user's setting, or the library's (``_threads``)."""
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    chosen = {k: os.environ[k] for k in names if k in os.environ}
    if chosen:
        return f"the user's {chosen}"
    return "OMP_WAIT_POLICY=PASSIVE, set by nllloss for numba's pool only"


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(modules: dict[str, Any], requested_threads: int | None) -> dict[str, Any]:
    torch = modules.get("torch")
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    get_threads = getattr(nllloss, "get_num_threads", None)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_at_end": _load_average(),
        "python": platform.python_version(),
        "versions": {
            "numpy": np.__version__,
            "torch": _version("torch"),
            "numba": _version("numba"),
            "jax": _version("jax"),
            "jaxlib": _version("jaxlib"),
            "nllloss": nllloss.__version__,
        },
        "git_revision": _git_revision(),
        "numba_threading_layer": _numba_threading_layer(),
        "kernel_wait_policy": _kernel_wait_policy(),
        "threads": {
            "requested": requested_threads,
            "torch": torch.get_num_threads() if torch is not None else None,
            "nllloss": get_threads() if callable(get_threads) else None,
            "numba": _numba_num_threads(),
        },
        "env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "OMP_WAIT_POLICY",
                "KMP_BLOCKTIME",
                "GOMP_SPINCOUNT",
                "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS",
                "NUMBA_THREADING_LAYER",
                "XLA_FLAGS",
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
            )
            if k in os.environ
        },
    }


def _fresh_pages() -> bool:
    """Make glibc serve every allocation over 128 KiB with fresh pages from the kernel.

    By default glibc raises its mmap threshold after large frees, so whether an array of a few
    MB gets fresh (page-faulting) or recycled memory depends on what ran just before it.
    Fixing the threshold makes every competitor, and the floor, allocate alike.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 128 * 1024))


def _import_modules(args) -> dict[str, Any]:
    modules: dict[str, Any] = {"numpy": not args.no_numpy}
    try:
        import torch
    except ImportError:
        torch = None
    modules["torch"] = torch
    if args.threads is not None:
        if torch is not None:
            torch.set_num_threads(args.threads)
        if hasattr(nllloss, "set_num_threads"):
            nllloss.set_num_threads(args.threads)
    jax = None
    if not args.no_jax:
        try:
            import jax

            if "float64" in args.dtype:
                jax.config.update("jax_enable_x64", True)
        except ImportError:
            jax = None
    modules["jax"] = jax
    return modules


# --------------------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.01:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _share(runs: dict[str, int]) -> str:
    total = runs.get("parallel", 0) + runs.get("serial", 0)
    return f"{100 * runs['parallel'] / total:.0f}%" if total else "-"


def _shape_label(shape) -> str:
    return "x".join(str(d) for d in shape)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _median_ms(case, op, name) -> float | None:
    return case["timings"][op].get(name, {}).get("median_ms")


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    v = env["versions"]
    th = env["threads"]
    s = report["settings"]
    lines = [
        "# nllloss CPU benchmark",
        "",
        f"- date: {env['date']}",
        f"- machine: {env['platform']}; {env['cpu_model']}; {env['cpu_count']} cores "
        f"({env['cpus_usable']} usable)",
        f"- versions: Python {env['python']}, numpy {v['numpy']}, torch {v['torch']}, "
        f"numba {v['numba']}, jax {v['jax']} (jaxlib {v['jaxlib']})",
        f"- nllloss {v['nllloss']}, git revision {env['git_revision']}",
        f"- load average (1, 5, 15 min): {report['load_average_at_start']} at the start, "
        f"{env['load_average_at_end']} at the end (other work on the machine shows here)",
        f"- threads: requested {th['requested'] or 'default'}, torch {th['torch']}, "
        f"nllloss {th['nllloss'] if th['nllloss'] is not None else 'n/a'}, "
        f"numba {th['numba'] if th['numba'] is not None else 'n/a'} "
        f"(threading layer {env['numba_threading_layer'] or 'n/a'})"
        + (f"; environment {env['env']}" if env["env"] else ""),
        f"- idle kernel threads: {env['kernel_wait_policy']}",
        f"- load: {report['load']}",
        "- allocator: "
        + (
            "every allocation over 128 KiB gets fresh pages (--fresh-pages)"
            if report["fresh_pages"]
            else "default (glibc may reuse freed memory for large arrays)"
        ),
        f"- timing: {s['warmup']} warm-up calls, then interleaved rounds: at least "
        f"{s['min_runs']} and until each competitor has run {s['min_time']} s, at most "
        f"{s['max_runs']}; medians in ms per call; ratios are within this run"
        + (" (--quick)" if report["quick"] else ""),
        "",
        "## Summary",
        "",
        "Medians in ms; speed-up = torch / nllloss; `/ 1 thread` = nllloss / nllloss on one"
        " thread (above 1: the threads cost time); threads = share of kernel calls that ran"
        " on threads (the rest chose one thread, `_cpu._threads`); other CPU = share of the"
        " machine's CPU time that other processes used during the case.",
        "",
    ]
    and_grad = any("nllloss_and_grad" in c["timings"]["forward_backward"] for c in report["cases"])
    header = [
        "shape",
        "dtype",
        "reduction",
        "fwd nllloss",
        "fwd torch",
        "fwd speed-up",
        "f+b nllloss",
        "f+b torch",
        "f+b speed-up",
        "floor",
        "f+b / floor",
        "fwd / 1 thread",
        "f+b / 1 thread",
        "threads",
    ]
    if and_grad:
        header += ["and_grad", "and_grad speed-up", "and_grad / floor"]
    header.append("other CPU")
    rows = []
    for c in report["cases"]:
        r = c["ratios"]
        fb = "forward_backward"
        row = [
            _shape_label(c["shape"]),
            c["dtype"],
            c["reduction"],
            _ms(_median_ms(c, "forward", "nllloss")),
            _ms(_median_ms(c, "forward", "torch")),
            _x(r["forward_speedup_vs_torch"]),
            _ms(_median_ms(c, fb, "nllloss")),
            _ms(_median_ms(c, fb, "torch")),
            _x(r["forward_backward_speedup_vs_torch"]),
            _ms(_median_ms(c, fb, "floor")),
            _x(r["forward_backward_over_floor"]),
            _x(r.get("forward_over_one_thread")),
            _x(r.get("forward_backward_over_one_thread")),
            _share(c.get("kernel_runs", {})),
        ]
        if and_grad:
            row += [
                _ms(_median_ms(c, fb, "nllloss_and_grad")),
                _x(r.get("and_grad_speedup_vs_torch")),
                _x(r.get("and_grad_over_floor")),
            ]
        share = c["background_cpu_share"]
        row.append("-" if share is None else f"{100 * share:.0f}%")
        rows.append(row)
    lines += _table(header, rows)

    tails = [(c, name, t) for c in report["cases"] for name, t in c.get("tail", {}).items()]
    if tails:
        calls = next((t["calls"] for _, _, t in tails if "calls" in t), 0)
        lines += [
            "",
            f"## Tail latency: {calls} consecutive forward+backward calls (ms)",
            "",
            f"Goal: p90 / median at most {TAIL_P90_OVER_MEDIAN}, and no call over "
            f"{TAIL_MAX_OVER_MEDIAN:g}x the median (`> 3x`: how many were).",
            "",
        ]
        rows = []
        for c, name, t in tails:
            prefix = [_shape_label(c["shape"]), c["dtype"], c["reduction"], name]
            if "error" in t:
                rows.append([*prefix, "error", "", "", "", "", "", ""])
                continue
            rows.append(
                [
                    *prefix,
                    _ms(t["p10_ms"]),
                    _ms(t["median_ms"]),
                    _ms(t["p90_ms"]),
                    _ms(t["max_ms"]),
                    _x(t["p90_over_median"]),
                    _x(t["max_over_median"]),
                    str(t["over_3x_median"]),
                ]
            )
        header = ["shape", "dtype", "reduction", "impl", "p10", "median", "p90", "max"]
        lines += _table([*header, "p90 / median", "max / median", "> 3x"], rows)

    lines += ["", "## All timings (ms per call)", ""]
    rows = []
    for c in report["cases"]:
        for op, label in (("forward", "fwd"), ("forward_backward", "f+b")):
            for name, t in c["timings"][op].items():
                prefix = [_shape_label(c["shape"]), c["dtype"], c["reduction"], label, name]
                if "error" in t:
                    rows.append([*prefix, "error", "", "", "", "", ""])
                    continue
                rows.append(
                    [
                        *prefix,
                        _ms(t["p10_ms"]),
                        _ms(t["median_ms"]),
                        _ms(t["p90_ms"]),
                        _ms(t["min_ms"]),
                        _ms(t["max_ms"]),
                        f"{t['runs']} x {t['calls_per_run']}",
                    ]
                )
    header = ["shape", "dtype", "reduction", "op", "impl", "p10", "median", "p90", "min", "max"]
    header.append("runs x calls")
    lines += _table(header, rows)

    if report["first_call"]:
        lines += ["", "## First call in a fresh process ((64, 10) float32, ms)", ""]
        header = ["process", "import nllloss", "first nll_loss", "first backward", "second call"]
        header += ["process wall"]
        rows = []
        for p in report["first_call"]:
            if "error" in p:
                rows.append([str(p["process"]), "error", "", "", "", ""])
                continue
            rows.append(
                [
                    str(p["process"]),
                    _ms(p["import_nllloss_ms"]),
                    _ms(p["first_nll_loss_ms"]),
                    _ms(p["first_backward_ms"]),
                    _ms(p["second_call_ms"]),
                    _ms(p["process_wall_ms"]),
                ]
            )
        lines += _table(header, rows)

    notes = list(report["notes"])
    for c in report["cases"]:
        notes += [f"{_shape_label(c['shape'])} {c['dtype']}: {n}" for n in c["notes"]]
    for p in report["first_call"]:
        if "error" in p:
            notes.append(f"first call, process {p['process']}: {p['error']}")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NxC or NxCxd1x..., got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/cpu.py",
        allow_abbrev=False,
        description="Time nllloss against torch (and jax, plain NumPy, a memory floor) on CPU.",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=_parse_shape,
        metavar="NxC[xd1...]",
        help="input shapes (default: "
        + ", ".join(_shape_label(s) for s in SHAPES)
        + "; --quick leaves out 8192x32000 unless it is named here)",
    )
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float32"])
    p.add_argument("--reduction", nargs="+", choices=REDUCTIONS, default=["mean"])
    p.add_argument("--quick", action="store_true", help="fewer repeats, no 8192x32000")
    p.add_argument("--threads", type=int, metavar="N", help="torch's (and nllloss's) threads")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write cpu-latest.{md,json} into DIR (default: print the report only)",
    )
    p.add_argument(
        "--fresh-pages",
        action="store_true",
        help="glibc: every allocation over 128 KiB gets fresh pages (steadier mid-size cases)",
    )
    p.add_argument(
        "--busy",
        action="store_true",
        help="start one competing process that keeps a core busy for the whole run",
    )
    p.add_argument(
        "--tail",
        type=int,
        default=60,
        metavar="N",
        help="time N consecutive forward+backward calls of nllloss (default threads and one "
        "thread) and torch after each race, for the tail latency (default 60; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and run order")
    p.add_argument("--no-jax", action="store_true", help="leave jax out even if installed")
    p.add_argument("--no-numpy", action="store_true", help="leave the plain NumPy code out")
    p.add_argument(
        "--no-first-call", action="store_true", help="skip the fresh-process first-call timing"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print("--threads must be at least 1", file=sys.stderr)
        return 2
    if args.tail < 0:
        print("--tail must be 0 or more", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else FULL
    shapes = args.shapes or [s for s in SHAPES if not (args.quick and s in QUICK_SKIPPED)]
    modules = _import_modules(args)
    notes = []
    fresh_pages = args.fresh_pages and _fresh_pages()
    if args.fresh_pages and not fresh_pages:
        notes.append("--fresh-pages: mallopt is not available here; allocator left as it is")
    if modules["torch"] is None:
        notes.append("torch is not installed: no torch columns")
    if modules["jax"] is None and not args.no_jax:
        notes.append("jax is not installed: no jax rows")
    if args.quick and not args.shapes:
        notes += [f"--quick: {_shape_label(s)} left out" for s in QUICK_SKIPPED]
    if args.threads is not None and modules["jax"] is not None:
        notes.append("--threads does not reach jax (XLA keeps its own thread pool)")

    cases = []
    load_at_start = _load_average()
    started = time.perf_counter()
    busy = BusyMachine(args.busy)
    with busy:
        for shape in shapes:
            for dtype in args.dtype:
                for reduction in args.reduction:
                    t0 = time.perf_counter()
                    label = f"{_shape_label(shape)} {dtype} {reduction}"
                    print(f"bench: {label} ...", file=sys.stderr)
                    cases.append(
                        run_case(shape, dtype, reduction, settings, modules, args.seed, args.tail)
                    )
                    gc.collect()  # the case's arrays go before the next case allocates its own
                    print(f"bench:   {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        first_call = []
        if not args.no_first_call:
            print("bench: first call in fresh processes ...", file=sys.stderr)
            first_call = first_call_latency(2)

    report = {
        "environment": environment(modules, args.threads),
        "load_average_at_start": load_at_start,
        "fresh_pages": fresh_pages,
        "busy": args.busy,
        "load": busy.describe(),
        "quick": args.quick,
        "settings": {
            "warmup": settings.warmup,
            "min_runs": settings.min_runs,
            "min_time": settings.min_time,
            "max_runs": settings.max_runs,
            "sample_time": settings.sample_time,
        },
        "cases": cases,
        "first_call": first_call,
        "notes": notes,
        "total_seconds": time.perf_counter() - started,
    }
    text = markdown(report)
    print(text)
    if args.out is not None:
        prefix = args.out / ("cpu-busy-latest" if args.busy else "cpu-latest")
        written = write_results(prefix, report, text)
        print("bench: wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0

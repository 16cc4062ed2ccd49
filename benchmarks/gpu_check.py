"""The whole GPU check of the Triton kernels, in one command of under 10 minutes.

On a machine with a CUDA GPU (from the repository root; nothing needs installing)::

    python3 benchmarks/gpu_check.py --out DIR

runs, each step in its own process with its own time limit:

1. ``env``: device, driver, versions, git revision; nllloss and the kernels import;
2. ``tests``: ``tests/test_triton.py`` compiled on the GPU (every test must pass there, none
   may skip: the >2**31-element gradient, CUDA-graph capture with ``check_targets=False``,
   a training step without host synchronisation, ...), in parallel when pytest-xdist is
   there; JUnit XML in ``triton-tests.xml``;
3. ``determinism``: 20 runs of forward, backward and the fused forward+backward at
   benchmark sizes, bitwise equal, with and without ``torch.use_deterministic_algorithms``
   (and equal across the two), plus a float64 torch oracle;
4. ``sweep``: a short sweep of the launchers' tile settings (each setting's results
   checked against the defaults' too: tile edges at real sizes);
5. ``bench``: ``benchmarks/gpu.py`` (against ``F.nll_loss``, ``F.cross_entropy``,
   ``torch.compile`` and Liger-Kernel) until its time budget is spent, with its speed goals.

It writes, only under ``--out``: ``gpu-check.md`` and ``gpu-check.json`` (every step's
result, device name, versions, revision), ``gpu-check.log`` (every step's output),
``triton-tests.xml``, ``gpu-latest.md`` and ``gpu-latest.json`` (the benchmark). They are
rewritten after each step, so a run cut short keeps what it did. The exit status is 1 if
any step failed (a test, a bit that differs, nllloss raising in the sweep or benchmark; a
missed performance goal is reported, not failed), else 0.

Packages the GPU machine lacks (array-api-compat, which nllloss imports; Liger-Kernel for
the comparison) travel as wheels in ``.whl/`` (ignored by git): run
``python benchmarks/gpu_check.py --prepare`` where the package registry is reachable; it
downloads them and records the git revision (the GPU machine's copy of the tree has no
git); by hand that is ``python -m pip download --no-deps --only-binary=:all: -d .whl
array-api-compat==1.16.0 liger-kernel==0.8.5`` (both pure-Python wheels). The check installs
``.whl/*.whl`` into a temporary folder of its own (``pip install --no-index --no-deps
--target``) and puts it first on the steps' ``PYTHONPATH``; without them Liger's rows are
left out with a note, and without array-api-compat nothing imports.

``--smoke`` rehearses every step on the CPU under Triton's interpreter, at tiny sizes, in
about a minute (CI runs it): the one GPU call cannot fail on a typo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
# The wheels for the GPU machine: array-api-compat as pinned by the CI environment's resolution
# when this was written, Liger-Kernel its latest release then (2026-10).
WHEEL_REQUIREMENTS = ("array-api-compat==1.16.0", "liger-kernel==0.8.5")

# Seconds of each step, out of the default 450 s budget (7.5 minutes: with a machine's
# start of 1-2 minutes it leaves about 5 of the 15-minute device allowance for a rerun of
# some steps, --steps). Unmeasured on a GPU: the tests step is sized for compiling on the
# order of a thousand kernel specialisations on 12 processes, the others for their few
# compilations plus timing; time a step does not use passes to the next, and the last
# step (the benchmark, which stops between cases) takes the rest.
BUDGET = 450
SHARES = {"env": 45, "tests": 240, "determinism": 40, "sweep": 45}
STEPS = ("env", "tests", "determinism", "sweep", "bench")
# pytest-xdist processes on the GPU machine (16 cores): compilation is the tests' cost and
# each process compiles on one core; the other four are left to the driver and the parent.
TEST_PROCESSES = 12
# The tests --smoke runs: a few fast ones, two of them GPU-only (skipped there), so that
# the selection, the JUnit parsing and the skip accounting are rehearsed.
SMOKE_TESTS = "test_kernels_are_served or test_all_ignored or cuda_graph or beyond_two_to_the_31"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder of the results (created)")
    parser.add_argument("--smoke", action="store_true", help="rehearse on the CPU, tiny sizes")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for all steps")
    parser.add_argument(
        "--steps",
        default=",".join(STEPS),
        help="comma-separated steps to run, for a rerun (env always runs first)",
    )
    parser.add_argument(
        "--prepare", action="store_true", help="download the wheels into .whl/ (needs PyPI)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one step, in its own process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.child:
        return run_child(args.child, Path(args.result), args.smoke, args.budget)
    if not args.out:
        parser.error("--out DIR is required")
    steps = [name for name in args.steps.split(",") if name]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; the steps are {', '.join(STEPS)}")
    return Check(Path(args.out), args.smoke, args.budget).run(steps)


def prepare() -> int:
    """Download the wheels the GPU machine lacks and record the revision beside them."""
    WHEELS.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(WHEELS), *WHEEL_REQUIREMENTS]  # fmt: skip
    subprocess.run(command, check=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu import git_revision

    (WHEELS / "revision.txt").write_text(git_revision() + "\n")
    print(f"{WHEELS}: {sorted(p.name for p in WHEELS.iterdir())}")
    print("copy '.whl' to the GPU machine beside the checkout")
    return 0


class Check:
    def __init__(self, out: Path, smoke: bool, budget: float):
        self.out, self.smoke, self.budget = out, smoke, budget
        self.started = time.perf_counter()
        self.scratch = Path(tempfile.mkdtemp(prefix="nllloss-gpu-check-"))
        self.steps: dict[str, dict] = {}
        self.environment: dict = {}
        self.benchmark: dict = {}
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "gpu-check.log"
        self.log.write_text("")
        self.environ = dict(os.environ, PYTHONUNBUFFERED="1")
        paths = [str(ROOT / "src"), self.environ.get("PYTHONPATH", "")]
        if smoke:
            # before triton is first imported; also opts the kernels in for CPU tensors
            self.environ.update(TRITON_INTERPRET="1", NLLLOSS_TRITON_INTERPRET="1")
        self.wheels = self.install_wheels()
        if self.wheels:
            paths.insert(0, str(self.scratch / "site"))
        self.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)

    def install_wheels(self) -> list[str]:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            return []
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                   "--no-compile", "--no-cache-dir", "--target", str(self.scratch / "site"),
                   *map(str, wheels)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
        if done.returncode:
            self.steps["wheels"] = {"status": "failed", "seconds": 0,
                                    "detail": (done.stderr or done.stdout)[-500:]}  # fmt: skip
            return []
        return [w.name for w in wheels]

    def remaining(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def run(self, steps=STEPS) -> int:
        try:
            return self.run_steps(steps)
        finally:  # the copied wheels' site and the steps' partial files
            shutil.rmtree(self.scratch, ignore_errors=True)

    def run_steps(self, steps) -> int:
        # time a step leaves unused passes to the next; the last step takes what is left
        spare = 0.0
        chosen = [name for name in STEPS if name == "env" or name in steps]
        for name in chosen:
            if name != "env" and self.steps.get("env", {}).get("status") != "passed":
                self.steps[name] = {"status": "not run", "seconds": 0,
                                    "detail": "the env step failed"}  # fmt: skip
                continue
            limit = self.remaining() if name == chosen[-1] else SHARES[name] + spare
            limit = max(10.0, min(limit, self.remaining()))
            begun = time.perf_counter()
            print(f"== {name} (limit {limit:.0f} s)", flush=True)
            getattr(self, name)(limit)
            used = time.perf_counter() - begun
            self.steps[name]["seconds"] = round(used, 1)
            spare = max(0.0, limit - used)
            print(f"== {name}: {self.steps[name]['status']} in {used:.0f} s", flush=True)
            self.write()
        self.write()
        failed = [n for n, s in self.steps.items() if s["status"] != "passed"]
        print(f"gpu check: {'FAILED ' + ', '.join(failed) if failed else 'all passed'}; "
              f"results in {self.out}")  # fmt: skip
        return 1 if failed else 0

    def spawn(self, command: list[str], limit: float) -> tuple[int | None, float]:
        """Run ``command`` with its output appended to the log; on the limit, end its
        whole process group (pytest-xdist's workers too). (returncode or None, seconds)."""
        begun = time.perf_counter()
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, cwd=ROOT, env=self.environ, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                # the group outlives its leader only by mistake: end it with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if code is None:
                log.write(f"\n!! stopped at its limit of {limit:.0f} s\n")
        return code, time.perf_counter() - begun

    def child(self, name: str, limit: float) -> dict:
        """A step run by ``run_child`` in its own process; its JSON result (partial if it
        was stopped), with ``status`` set."""
        result = self.scratch / f"{name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name,
                   "--result", str(result), "--budget", str(max(5.0, limit - 15))]  # fmt: skip
        if self.smoke:
            command.append("--smoke")
        code, _ = self.spawn(command, limit)
        data = json.loads(result.read_text()) if result.exists() else {}
        if code is None:
            data["status"] = "timed out"
        elif code != 0 or not data.get("ok"):
            data["status"] = "failed"
            data.setdefault("detail", f"exit status {code}; see gpu-check.log")
        else:
            data["status"] = "passed"
        return data

    def env(self, limit: float) -> None:
        data = self.child("env", limit)
        self.environment = {**data.get("environment", {}), "wheels": self.wheels}
        self.steps["env"] = {k: v for k, v in data.items() if k != "environment"}

    def tests(self, limit: float) -> None:
        xml = self.out / "triton-tests.xml"
        command = [sys.executable, "-m", "pytest", "tests/test_triton.py", "--noconftest",
                   "-p", "no:cacheprovider", "-v", "-rfEs", f"--junitxml={xml}"]  # fmt: skip
        if self.smoke:
            command += ["-k", SMOKE_TESTS]
        elif self.environment.get("pytest-xdist"):
            command += ["-n", str(TEST_PROCESSES)]
        if xml.exists():
            xml.unlink()
        start = len(self.log.read_text(errors="replace"))
        code, _ = self.spawn(command, limit)
        if xml.exists():
            counts, failures = junit_summary(xml)
        else:  # stopped before pytest wrote it: what its -v lines say
            counts, failures = verbose_summary(self.log.read_text(errors="replace")[start:])
        if code is None:
            status = "timed out"
        elif code == 0 and (self.smoke or not counts.get("skipped")):
            status = "passed"
        else:
            status = "failed"
        detail = "" if status == "passed" else tail_of(self.log, 1500)
        if not self.smoke and counts.get("skipped"):
            detail = "tests skipped on the GPU (each must run there)\n" + detail
        self.steps["tests"] = {"status": status, "counts": counts, "failures": failures,
                               "detail": detail}  # fmt: skip

    def determinism(self, limit: float) -> None:
        self.steps["determinism"] = self.child("determinism", limit)

    def sweep(self, limit: float) -> None:
        self.steps["sweep"] = self.child("sweep", limit)

    def bench(self, limit: float) -> None:
        folder = self.scratch / "bench"
        command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(folder),
                   "--budget", str(max(5.0, limit - 45))]  # fmt: skip
        if self.smoke:
            command.append("--smoke")
        code, _ = self.spawn(command, limit)
        for name in ("gpu-latest.md", "gpu-latest.json"):
            if (folder / name).exists():
                (self.out / name).write_text((folder / name).read_text())
        document = folder / "gpu-latest.json"
        self.benchmark = json.loads(document.read_text()) if document.exists() else {}
        rows = self.benchmark.get("rows", [])
        raised = [r for r in rows if r.get("error") and r["impl"].startswith("nll")]
        status = "timed out" if code is None else "passed" if code == 0 and rows else "failed"
        detail = "; ".join(f"{r['case']} {r['task']} {r['impl']}: {r['error']}" for r in raised)
        self.steps["bench"] = {"status": status, "detail": detail or (
            "" if status == "passed" else tail_of(self.log, 1500))}  # fmt: skip

    def write(self) -> None:
        document = {
            "ok": all(s["status"] == "passed" for s in self.steps.values())
            and set(STEPS) <= set(self.steps),
            "steps run": list(self.steps),
            "smoke": self.smoke,
            "environment": self.environment,
            "steps": self.steps,
            "benchmark": self.benchmark,
        }
        (self.out / "gpu-check.json").write_text(json.dumps(document, indent=1) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(document))


def tail_of(path: Path, characters: int) -> str:
    return path.read_text(errors="replace")[-characters:]


def junit_summary(path: Path) -> tuple[dict, list[str]]:
    """(counts of passed, failed, errors, skipped; the ids of those that did not pass)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return {"unreadable": str(error)}, []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            failures.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failures.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            failures.append(name + " (skipped)")
        else:
            counts["passed"] += 1
    return counts, failures


_OUTCOME = re.compile(
    r"(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)|(PASSED|FAILED|ERROR|SKIPPED) (\S+::\S+)"
)


def verbose_summary(text: str) -> tuple[dict, list[str]]:
    """``junit_summary`` from pytest's ``-v`` lines (``id OUTCOME`` or, under xdist,
    ``[gwN] [ p%] OUTCOME id``), for a run stopped before its XML was written."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "stopped": True}
    failures = []
    key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    for match in _OUTCOME.finditer(text):
        name, outcome = (match[1], match[2]) if match[1] else (match[4], match[3])
        counts[key[outcome]] += 1
        if outcome != "PASSED":
            failures.append(f"{name} ({outcome.lower()})")
    return counts, failures


def markdown(document: dict) -> str:
    env = document["environment"]
    title = "GPU check of the Triton kernels" + (
        " (smoke run on the CPU)" if document["smoke"] else ""
    )
    lines = [f"# {title}", "", f"Result: **{'passed' if document['ok'] else 'FAILED'}**", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, step in document["steps"].items():
        detail = step.get("counts") or step.get("summary") or ""
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '')} | {detail} |")
    for name, step in document["steps"].items():
        if step.get("failures"):
            lines += [
                "",
                f"## {name}: failed, errors and skips",
                "",
                *(f"- {f}" for f in step["failures"]),
            ]
        if step.get("detail"):
            lines += ["", f"## {name}: detail", "", "```", step["detail"].strip(), "```"]
    determinism = document["steps"].get("determinism", {}).get("rows", [])
    if determinism:
        lines += ["", "## Determinism (20 runs each; 2 in a smoke run)", "",
                  "| case | deterministic mode | runs bitwise equal | equal across modes | "
                  "vs float64 torch |", "|---|---|---|---|---|"]  # fmt: skip
        for r in determinism:
            lines.append(f"| {r['case']} | {r['mode']} | {r['equal']} | {r['across modes']} | "
                         f"{r['oracle']} |")  # fmt: skip
    sweep = document["steps"].get("sweep", {}).get("rows", [])
    if sweep:
        lines += ["", "## Tile sweep (median ms; * the current default)", "",
                  "| group | case | setting | call | ms | agrees with the default |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in sweep:
            mark = " *" if r["default"] else ""
            lines.append(f"| {r['group']} | {r['case']} | {r['setting']}{mark} | {r['call']} | "
                         f"{r.get('ms', r.get('error'))} | {r['agrees']} |")  # fmt: skip
    if document["benchmark"]:
        lines += ["", "## Benchmark", "", "See gpu-latest.md (the same run)."]
        goals = document["benchmark"].get("goals", [])
        if goals:
            lines += ["", "| goal | worst value | case | met |", "|---|---|---|---|"]
            for g in goals:
                met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
                lines.append(f"| {g['goal']} | {g['value'] or ''} | {g['case'] or ''} | {met} |")
    return "\n".join(lines) + "\n"


# ---- the steps that run in their own process -------------------------------------------


def run_child(name: str, result: Path, smoke: bool, budget: float) -> int:
    data: dict = {"ok": False}

    def save():
        result.write_text(json.dumps(data, indent=1))

    try:
        {"env": child_env, "determinism": child_determinism, "sweep": child_sweep}[name](
            data, save, smoke, budget
        )
    except Exception as error:  # recorded, then the step fails
        import traceback

        data["ok"] = False
        data["detail"] = traceback.format_exc()[-2000:]
        save()
        print(f"{name}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    save()
    return 0 if data["ok"] else 1


def child_env(data, save, smoke, budget):
    import importlib.metadata as metadata
    import importlib.util

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    def version(name, module=None):
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
        spec = importlib.util.find_spec(module) if module else None
        where = Path(spec.origin).parent.parent if spec and spec.origin else None
        return found if where is None else f"{found} from {where}"

    import nllloss
    from nllloss._kernels import triton as triton_kernels

    launch = triton_kernels.load()
    cuda = torch.cuda.is_available()
    extra = {
        "nllloss": f"{nllloss.__version__} from {Path(nllloss.__file__).parent}",
        "numpy": version("numpy"),
        "array-api-compat": version("array-api-compat", "array_api_compat"),
        "liger-kernel": version("liger-kernel", "liger_kernel"),
        "pytest-xdist": version("pytest-xdist") if importlib.util.find_spec("xdist") else None,
    }
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        extra.update(capability=".".join(map(str, torch.cuda.get_device_capability())),
                     multiprocessors=properties.multi_processor_count,
                     memory_GiB=round(properties.total_memory / 2**30, 1))  # fmt: skip
    data["environment"] = gpu.environment(torch, "cuda" if cuda else "cpu", **extra)
    problems = []
    if launch is None:
        problems.append("the Triton launchers did not import")
    if not (cuda or smoke):
        problems.append("no CUDA GPU visible to torch")
    data["ok"] = not problems
    data["detail"] = "; ".join(problems)


def _bits(tensor):
    import torch

    integer = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.contiguous().view(integer)


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def child_determinism(data, save, smoke, budget):
    """20 runs of each case bitwise equal, in both modes, and equal across the modes."""
    import gpu
    import torch
    import torch.nn.functional as F

    from nllloss._kernels import triton as triton_kernels

    launch = gpu.Unpacked(triton_kernels.load())
    device = "cpu" if smoke else "cuda"
    cases = [
        ("2-D from logits, weight, smoothing 0.1, mean", (16384, 32000), torch.bfloat16,
         {"from_logits": True, "label_smoothing": 0.1}, True, "mean"),
        ("K-dim log-probabilities, weight, mean", (16, 21, 512, 512), torch.float32,
         {}, True, "mean"),
        ("K-dim from logits, sum", (8, 21, 256, 256), torch.bfloat16,
         {"from_logits": True}, False, "sum"),
    ]  # fmt: skip
    if smoke:
        small = [(33, 300), (2, 5, 6, 7), (2, 4, 3, 5)]
        cases = [(c[0], s, *c[2:]) for c, s in zip(cases, small, strict=True)]
    runs = 2 if smoke else 20  # the interpreter takes ~1 s a run; 2 rehearse the comparison
    data["rows"] = rows = []
    started = time.perf_counter()
    for name, shape, dtype, options, weighted, reduction in cases:
        generator = torch.Generator(device=device).manual_seed(len(rows))
        x = torch.randn(shape, generator=generator, device=device).mul_(3).to(dtype)
        if not options.get("from_logits"):
            x = torch.log_softmax(x.float(), dim=1).to(dtype)
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator,
                               device=device)  # fmt: skip
        target.view(-1)[::7] = -100
        weight = (torch.rand(shape[1], generator=generator, device=device) + 0.5).to(dtype)
        weight = weight if weighted else None
        arguments = (x, target, weight, -100, reduction)
        label = f"{name} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
        first_of_mode = {}
        for mode in (False, True):
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(mode)
            try:
                first = None
                equal = True
                for _ in range(runs):
                    loss, saved = launch.forward(*arguments, **options)
                    g = torch.ones(loss.shape, dtype=dtype, device=device)
                    grad = launch.backward(g, *arguments, **options, saved=saved)
                    fused_loss, fused_grad = launch.forward_backward(*arguments, **options)
                    outputs = (loss, grad, fused_loss, fused_grad)
                    if first is None:
                        first = outputs
                    else:
                        equal &= all(_same(a, b) for a, b in zip(outputs, first, strict=True))
                    del saved
            finally:
                torch.use_deterministic_algorithms(previous)
            first_of_mode[mode] = first
            across = "" if not mode else all(
                _same(a, b) for a, b in zip(first, first_of_mode[False], strict=True)
            )  # fmt: skip
            oracle = _oracle(F, first[0], x, target, weight, reduction, options)
            rows.append({"case": label, "mode": "on" if mode else "off", "equal": equal,
                         "across modes": across, "oracle": oracle})  # fmt: skip
            save()
        del first_of_mode, first
        if device == "cuda":
            torch.cuda.empty_cache()
        if time.perf_counter() - started > budget:
            rows.append({"case": "(the rest)", "mode": "", "equal": "not run: budget spent",
                         "across modes": "", "oracle": ""})  # fmt: skip
            break
    data["ok"] = all(
        r["equal"] is True and r["across modes"] in ("", True) and r["oracle"].startswith("ok")
        for r in rows
    )


def _oracle(F, loss, x, target, weight, reduction, options) -> str:
    """Our loss against float64 torch on the same rounded inputs (bf16: 1.6e-2 relative)."""
    import torch

    x64, w64 = x.double(), None if weight is None else weight.double()
    smoothing = options.get("label_smoothing", 0.0)
    if options.get("from_logits"):
        expected = F.cross_entropy(x64, target, weight=w64, reduction=reduction,
                                   label_smoothing=smoothing)  # fmt: skip
    else:
        expected = F.nll_loss(x64, target, weight=w64, reduction=reduction)
    rtol = 2e-5 if x.dtype == torch.float32 else 1.6e-2
    error = float(((loss.double() - expected).abs() / expected.abs().clamp_min(1e-30)).max())
    return f"ok (relative error {error:.1e})" if error <= rtol else f"OFF by {error:.1e}"


def child_sweep(data, save, smoke, budget):
    """Median ms of the launchers under each tile setting, until the budget is spent; each
    setting's loss and gradient against the default setting's."""
    import itertools

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    from nllloss._kernels import triton as triton_kernels
    from nllloss._kernels.triton import _launch

    launch = gpu.Unpacked(triton_kernels.load())
    device = "cpu" if smoke else "cuda"
    bench = gpu.Bench(torch, launch, 1 if smoke else 10, False, False, device)
    two_d, kdim = ((16384, 32000), torch.bfloat16), ((16, 21, 512, 512), torch.float32)
    if smoke:
        two_d, kdim = ((16, 300), torch.bfloat16), ((2, 5, 8, 8), torch.float32)
    # (group, case, the knobs and their values, the calls timed); the default first
    groups = [
        ("full rows", two_d, {"_TILE": [4096, 2048, 8192, 16384], "_WARPS": [8, 4, 16]},
         ["ce fwd", "ce f+b fused", "nll bwd"]),
        ("gathers", kdim, {"_GATHER_ROWS": [1024, 256, 4096], "_GATHER_WARPS": [4, 2, 8]},
         ["nll fwd"]),
        ("strided classes", kdim, {"_STRIDED_CLASS_BLOCK": [32, 8, 16, 64], "_WARPS": [8, 4]},
         ["ce fwd", "nll bwd"]),
    ]  # fmt: skip
    if smoke:  # the default and one other setting of each group, one call
        groups = [(g, c, {k: v[: 2 if i == 0 else 1] for i, (k, v) in enumerate(knobs.items())},
                   calls[:1]) for g, c, knobs, calls in groups]  # fmt: skip
    defaults = {k: getattr(_launch, k) for g in groups for k in g[2]}
    data["rows"] = rows = []
    data["ok"] = True
    started = time.perf_counter()
    for group, (shape, dtype), knobs, calls in groups:
        x = torch.randn(shape, dtype=dtype, device=device)
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=device)
        case = gpu.case_label(shape, str(dtype).replace("torch.", ""))
        reference = None
        for values in itertools.product(*knobs.values()):
            if time.perf_counter() - started > budget:
                rows.append({"group": group, "case": case, "setting": "(the rest)",
                             "default": False, "call": "", "error": "not run: budget spent",
                             "agrees": ""})  # fmt: skip
                break
            setting = dict(zip(knobs, values, strict=True))
            for knob, value in setting.items():
                setattr(_launch, knob, value)
            try:
                outputs = _sweep_outputs(torch, launch, x, t)
                if reference is None:
                    reference = outputs
                agrees = all(
                    torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-6)
                    for a, b in zip(outputs, reference, strict=True)
                )  # fmt: skip
                data["ok"] &= agrees
                for call in calls:
                    ms = bench.time(_sweep_call(torch, launch, x, t, call))[0]
                    rows.append({"group": group, "case": case, "setting": setting,
                                 "default": setting == {k: defaults[k] for k in knobs},
                                 "call": call, "ms": round(ms, 4), "agrees": agrees})  # fmt: skip
            except Exception as error:  # a setting that fails is a finding, recorded
                data["ok"] = False
                rows.append({"group": group, "case": case, "setting": setting, "default": False,
                             "call": "", "error": f"{type(error).__name__}: {error}"[:300],
                             "agrees": False})  # fmt: skip
            finally:
                for knob, value in defaults.items():
                    setattr(_launch, knob, value)
            save()
        x = t = reference = None
        if device == "cuda":
            torch.cuda.empty_cache()


def _sweep_outputs(torch, launch, x, t):
    """What a setting computes: the from-logits loss and fused gradient, the nll gradient."""
    options = {"from_logits": True, "check_targets": False}
    loss, grad = launch.forward_backward(x, t, None, -100, "mean", **options)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    nll_loss, _ = launch.forward(x, t, None, -100, "mean", check_targets=False)
    return loss, grad, nll_loss, launch.backward(one, x, t, None, -100, "mean", check_targets=False)


def _sweep_call(torch, launch, x, t, call):
    one = torch.ones((), dtype=x.dtype, device=x.device)
    unchecked = {"check_targets": False}
    logits = {"from_logits": True, **unchecked}
    return {
        "nll fwd": lambda: launch.forward(x, t, None, -100, "mean", **unchecked),
        "nll bwd": lambda: launch.backward(one, x, t, None, -100, "mean", **unchecked),
        "ce fwd": lambda: launch.forward(x, t, None, -100, "mean", **logits),
        "ce f+b fused": lambda: launch.forward_backward(x, t, None, -100, "mean", **logits),
    }[call]


if __name__ == "__main__":
    sys.exit(main())

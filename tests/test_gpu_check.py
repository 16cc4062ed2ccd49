"""benchmarks/gpu_check.py, the one command of the GPU check: rehearsed here on the CPU.

``--smoke`` runs every step under Triton's interpreter at tiny sizes, so that the call on
the GPU machine cannot fail on a typo; the orchestration (a failed step fails the command,
later steps still run, results are written after each step) is checked on stand-in steps.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# loaded from its file: benchmarks/ on sys.path would shadow packages (its distributed.py)
_spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.fixture(autouse=True)
def numpy_engine():
    """Overrides conftest's: the NumPy engines play no part here, one run per test."""
    return None


def _tree(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_smoke_run_rehearses_every_step(tmp_path):
    """Every step passes, and nothing is written outside --out (neither the folder it is
    run from nor the committed results)."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    committed = _tree(BENCHMARKS / "results")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert list(cwd.iterdir()) == []
    assert _tree(BENCHMARKS / "results") == committed
    assert done.returncode == 0, done.stdout + done.stderr + (out / "gpu-check.log").read_text()
    names = {p.name for p in out.iterdir()}
    assert names == {"gpu-check.md", "gpu-check.json", "gpu-check.log", "triton-tests.xml",
                     "gpu-latest.md", "gpu-latest.json"}  # fmt: skip
    document = json.loads((out / "gpu-check.json").read_text())
    assert document["ok"]
    assert document["smoke"]
    steps = document["steps"]
    assert [name for name in steps if name != "wheels"] == [
        "env", "tests", "determinism", "sweep", "bench"
    ]  # fmt: skip
    assert all(step["status"] == "passed" for step in steps.values())
    assert steps["tests"]["counts"]["passed"] >= 3
    assert steps["tests"]["counts"]["skipped"] == 2  # the GPU-only ones, rehearsed as skips
    assert {r["mode"] for r in steps["determinism"]["rows"]} == {"off", "on"}
    assert {r["group"] for r in steps["sweep"]["rows"]} == {
        "full rows", "gathers", "strided classes"
    }  # fmt: skip
    environment = document["environment"]
    assert {"device", "torch", "triton", "git", "array-api-compat"} <= set(environment)
    rows = document["benchmark"]["rows"]
    assert {"nllloss", "nllloss fused", "nll_loss autograd", "torch"} <= {r["impl"] for r in rows}
    assert not [r for r in rows if r.get("error") and r["impl"].startswith("nll")]
    assert "Result: **passed**" in (out / "gpu-check.md").read_text()


def _stand_in(statuses, calls):
    def step(name):
        def run(self, limit):
            calls.append(name)
            self.steps[name] = {"status": statuses.get(name, "passed")}
            if name == "env":
                self.environment = {"device": "stand-in"}

        return run

    return {name: step(name) for name in ("env", "tests", "determinism", "sweep", "bench")}


def test_a_failed_step_fails_the_command_and_the_rest_still_run(tmp_path, monkeypatch):
    calls = []
    for name, run in _stand_in({"determinism": "failed"}, calls).items():
        monkeypatch.setattr(gpu_check.Check, name, run)
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "none")
    code = gpu_check.Check(tmp_path / "out", smoke=True, budget=60).run()
    assert code == 1
    assert calls == ["env", "tests", "determinism", "sweep", "bench"]
    document = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert not document["ok"]
    assert document["steps"]["determinism"]["status"] == "failed"
    assert "Result: **FAILED**" in (tmp_path / "out" / "gpu-check.md").read_text()


def test_nothing_runs_after_a_failed_environment(tmp_path, monkeypatch):
    calls = []
    for name, run in _stand_in({"env": "failed"}, calls).items():
        monkeypatch.setattr(gpu_check.Check, name, run)
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "none")
    assert gpu_check.Check(tmp_path / "out", smoke=True, budget=60).run() == 1
    assert calls == ["env"]
    steps = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["steps"]
    assert steps["bench"] == {"status": "not run", "seconds": 0, "detail": "the env step failed"}


def test_a_step_past_its_limit_is_stopped_with_its_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "none")
    check = gpu_check.Check(tmp_path / "out", smoke=True, budget=60)
    code, seconds = check.spawn([sys.executable, "-c", "import time; time.sleep(60)"], 1)
    assert code is None
    assert seconds < 30
    assert "stopped at its limit of 1 s" in check.log.read_text()
    shutil.rmtree(check.scratch)


def test_junit_summary_counts_and_names_what_did_not_pass(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="x"/></testcase>'
        '<testcase classname="t" name="c"><skipped message="y"/></testcase>'
        '<testcase classname="t" name="d"><error message="z"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts, failures = gpu_check.junit_summary(xml)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert failures == ["t::b", "t::c (skipped)", "t::d"]


def test_verbose_summary_reads_a_run_stopped_before_its_xml():
    log = (
        "tests/test_triton.py::test_a PASSED                     [  1%]\n"
        "[gw3] [  2%] FAILED tests/test_triton.py::test_b[x-1]\n"
        "[gw0] [  3%] SKIPPED tests/test_triton.py::test_c\n"
        "[gw1] [  4%] PASSED tests/test_triton.py::test_d\n"
    )
    counts, failures = gpu_check.verbose_summary(log)
    assert counts == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1, "stopped": True}
    assert failures == ["tests/test_triton.py::test_b[x-1] (failed)",
                        "tests/test_triton.py::test_c (skipped)"]  # fmt: skip

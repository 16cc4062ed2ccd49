"""The benchmark harness (``benchmarks/harness.py``, not installed with the package) runs end
to end on a tiny case and writes its two reports."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _harness():
    """``benchmarks/harness.py``, loaded from its file: putting ``benchmarks/`` on the path,
    as the scripts have it, would hide packages named like a script (``distributed``)."""
    spec = importlib.util.spec_from_file_location("harness", BENCHMARKS / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _harness()

pytest.importorskip("torch")  # a test dependency: this skips only outside the test extra


@pytest.fixture
def numpy_engine():
    """Overrides conftest's two-engine fixture: the harness runs once, on the default engine."""
    return "default"


def test_quick_run_writes_markdown_and_json(tmp_path, capsys):
    assert harness.main(["--quick", "--shapes", "64x10", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "cpu-latest.json").read_text())
    assert {"environment", "settings", "cases", "first_call", "notes"} <= report.keys()
    env = report["environment"]
    assert {"date", "platform", "cpu_model", "cpu_count", "versions", "git_revision"} <= env.keys()
    assert {"numpy", "torch", "numba", "jax", "nllloss"} <= env["versions"].keys()
    assert "threads" in env

    (case,) = report["cases"]
    assert case["shape"] == [64, 10]
    assert (case["dtype"], case["reduction"]) == ("float32", "mean")
    assert "background_cpu_share" in case
    fwd, fb = case["timings"]["forward"], case["timings"]["forward_backward"]
    assert {"nllloss", "torch", "numpy"} <= fwd.keys()
    assert {"nllloss", "torch", "numpy", "floor"} <= fb.keys()
    for timing in (fwd["nllloss"], fwd["torch"], fb["nllloss"], fb["torch"], fb["floor"]):
        assert {"median_ms", "min_ms", "max_ms", "runs", "calls_per_run"} <= timing.keys()
        assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
    ratios = case["ratios"]
    for key in (
        "forward_speedup_vs_torch",
        "forward_backward_speedup_vs_torch",
        "forward_backward_over_floor",
    ):
        assert ratios[key] > 0
    # Every competitor computed the same loss and gradient (within accumulation-order noise).
    assert not [note for note in case["notes"] if note.startswith("check")]

    assert len(report["first_call"]) == 2
    for process in report["first_call"]:
        assert "error" not in process, process
        assert process["first_call_ms"] > 0

    md = (tmp_path / "cpu-latest.md").read_text()
    assert md.startswith("# nllloss CPU benchmark")
    assert "| 64x10 | float32 | mean |" in md
    assert "| 64x10 | float32 | mean |" in capsys.readouterr().out


def test_shape_format():
    assert harness._parse_shape("8x21x256x256") == (8, 21, 256, 256)
    with pytest.raises(Exception, match="NxC"):
        harness._parse_shape("64")


def test_cpu_script_help():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "cpu.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


def test_module_import_leaves_torch_and_jax_alone():
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import harness; "
        "print('torch' in sys.modules, 'jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


def test_a_run_without_out_writes_no_file(tmp_path, monkeypatch, capsys):
    """Results go only where --out says: nothing in the working folder, nothing committed."""
    monkeypatch.chdir(tmp_path)
    committed = Path(__file__).parents[1] / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()}
    assert harness.main(["--quick", "--shapes", "64x10", "--no-first-call", "--no-jax"]) == 0
    assert "| 64x10 | float32 | mean |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} == before


# The GPU scripts write from several functions and child processes; that they write only
# under --out is checked by running them (tests/test_gpu_check.py's smoke run).
RUN_TO_CHECK = {"gpu.py", "gpu_check.py"}
# Not a benchmark: it renders the pages' tables from the committed results, in place
# (tests/test_docs.py checks the pages against it); the harness's write_results writes
# where a script's --out says (the scripts are checked here; the CPU benchmark's run
# without --out above).
NOT_A_BENCHMARK = {"render_tables.py", "harness.py"}


@pytest.mark.parametrize(
    "script",
    [
        path
        for path in sorted(Path(__file__).parents[1].glob("benchmarks/*.py"))
        if path.name not in RUN_TO_CHECK | NOT_A_BENCHMARK
    ],
    ids=lambda path: path.name,
)
def test_benchmark_scripts_write_only_where_out_says(script):
    """Each script's --out has no default folder, and every write is under `if ... out`."""
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and node.args
            and getattr(node.args[0], "value", None) == "--out"
        ):
            assert "default" not in {k.arg for k in node.keywords}, script.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "write_text":
            guarded = [
                parent
                for parent in ast.walk(tree)
                if isinstance(parent, ast.If)
                and "out" in ast.unparse(parent.test)
                and any(child is node for child in ast.walk(parent))
            ]
            assert guarded, f"{script.name}:{node.lineno} writes without --out"

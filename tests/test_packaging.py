"""What a user who installs the package meets: the framework modules without their
framework, a fast ``nllloss info``, one version. (The built wheel's LICENSE and py.typed
are checked by ``.ci/check_wheel.py`` in CI, where the wheel is built.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nllloss

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("module", "framework", "advice"),
    [
        ("torch", "torch", "nllloss.torch needs PyTorch (pip install torch)"),
        ("paddle", "paddle", "nllloss.paddle needs PaddlePaddle (pip install paddlepaddle)"),
        (
            "transformers",
            "transformers",
            "nllloss.transformers needs torch and transformers "
            "(pip install 'nllloss[transformers]')",
        ),
    ],
)
def test_framework_module_without_its_framework_says_what_to_install(module, framework, advice):
    done = _python(
        f"""
        import sys
        sys.modules[{framework!r}] = None  # as if it were not installed
        import nllloss
        try:
            nllloss.{module}
        except ImportError as error:
            print(type(error).__name__, error)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ImportError {advice}\n"


def test_info_imports_no_framework_unless_asked():
    done = _python(
        """
        import contextlib, io, sys
        from nllloss._cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["info"]) == 0
        print(sorted(name for name in ("torch", "jax", "cupy", "paddle") if name in sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_the_version_is_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version = ", pyproject, re.M)
    assert 'path = "src/nllloss/__init__.py"' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", nllloss.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {nllloss.__version__}" in changelog


def test_license_is_bsd_3_clause_of_the_nllloss_developers():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, nllloss developers" in text
    assert 'license = "BSD-3-Clause"' in (ROOT / "pyproject.toml").read_text()

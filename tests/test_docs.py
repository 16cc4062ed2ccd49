"""The README's examples and main job, and ``nllloss examples``, run as shown."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    exec(blocks[0], namespace)
    # The example's weighted mean: one non-ignored row, so the loss is -log(0.7).
    np.testing.assert_allclose(namespace["loss"], -np.log(np.float32(0.7)), rtol=1e-6)
    assert namespace["grad"].shape == (2, 3)
    for block in blocks[1:]:  # the other libraries' examples run as written
        exec(block, {})


def test_readme_main_job_prints_what_the_readme_shows():
    """The set-up command's ``nllloss eval ...`` prints the table shown below it."""
    setup = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    command, shown = re.search(r"```bash\n(.*?)\n```\n\n```text\n(.*?)```", setup, re.S).groups()
    job = command.split(" && ")[-1].split()
    assert job[:2] == ["nllloss", "eval"]
    done = subprocess.run(
        [sys.executable, "-m", "nllloss", *job[1:]],
        capture_output=True,
        text=True,
        cwd=README.parent,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == shown


def test_worked_example_runs_and_matches_its_documented_values():
    out = subprocess.run(
        [sys.executable, "-m", "nllloss", "examples"], capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["example", "documented", "source", "nllloss"]
    # Rows documented with torch's exact value print the same value twice.
    exact = [line for line in lines if "torch 2.13" in line and "[" not in line]
    assert len(exact) == 5
    for line in exact:
        *_, documented, _torch, _version, ours = line.split()
        assert documented == ours, line

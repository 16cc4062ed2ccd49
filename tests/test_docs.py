"""The README and the documentation site: every example runs as shown, the site builds
without a warning, the speed tables are the rendering of the results files, and
``nllloss examples`` prints its documented values."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import nllloss

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# Runs once, not once per NumPy engine: a subprocess or a build does not see the fixture.
once = pytest.mark.parametrize("numpy_engine", ["compiled"], indirect=True)


def _load(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


EXAMPLES = [
    pytest.param(page, i, id=f"{page.relative_to(ROOT)}-{i}")
    for page in PAGES
    for i, _ in enumerate(python_blocks(page))
]


def test_the_readme_and_the_guides_have_examples():
    pages = {page.relative_to(ROOT).as_posix() for page, _ in (p.values for p in EXAMPLES)}
    assert {"README.md", "docs/index.md", "docs/guide/logits.md"} <= pages
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize(("page", "index"), EXAMPLES)
def test_every_python_example_runs_as_written(page, index):
    exec(python_blocks(page)[index], {"__name__": "__docs__"})


def test_readme_first_example_gives_its_values():
    namespace: dict = {}
    exec(python_blocks(README)[0], namespace)
    # The example's weighted mean: one non-ignored row, so the loss is -log(0.7).
    np.testing.assert_allclose(namespace["loss"], -np.log(np.float32(0.7)), rtol=1e-6)
    assert namespace["grad"].shape == (2, 3)


@once
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


@once
def test_readme_test_command_is_the_one_ci_runs():
    """The README's test command, in a fresh shell, is what ``.ci/run`` runs."""
    setup = README.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2, "two commands: the main job, the tests"
    tests = commands[1]
    # It makes and activates its environment itself, then installs and runs the tests.
    assert tests.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")
    assert tests.endswith(" && python -m pytest")
    assert f"\n{tests}\n" in (ROOT / ".ci" / "run").read_text()


@once
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


@once
def test_speed_tables_are_the_rendering_of_the_results_files():
    render_tables = _load(ROOT / "benchmarks" / "render_tables.py", "render_tables")
    names = set()
    for page in PAGES:
        text = page.read_text()
        names |= set(re.findall(r"<!-- table: ([\w-]+) -->", text))
        assert render_tables.render(text) == text, (
            f"{page.relative_to(ROOT)}: a table differs from benchmarks/results; "
            "run python benchmarks/render_tables.py"
        )
    assert names == set(render_tables.TABLES), "every table is shown somewhere"


def test_table_blocks_are_rewritten_from_the_results():
    render_tables = _load(ROOT / "benchmarks" / "render_tables.py", "render_tables")
    stale = "<!-- table: cpu -->\n| typed | by hand |\n<!-- end table -->"
    rendered = render_tables.render(stale)
    assert "by hand" not in rendered
    assert "at revision" in rendered
    assert rendered.count("\n| (") >= 5  # one row per shape of cpu-latest.json


WORKING_WORDS = re.compile(
    r"\b(sessions?|helpers?|seed documents?|carried|carry list|issue[ -]\d+)\b", re.I
)


@once
def test_user_facing_text_speaks_of_the_library_only():
    texts = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
    texts["benchmarks/README.md"] = (ROOT / "benchmarks" / "README.md").read_text()
    for command in (["--help"], ["eval", "--help"], ["info", "--help"], ["bench"]):
        done = subprocess.run(
            [sys.executable, "-m", "nllloss", *command], capture_output=True, text=True
        )
        texts[f"nllloss {' '.join(command)}"] = done.stdout + done.stderr
    found = {name: WORKING_WORDS.findall(text) for name, text in texts.items()}
    assert not {name: words for name, words in found.items() if words}


def test_docstring_markup_becomes_markdown():
    pytest.importorskip("griffe", reason="griffe comes with the docs tools of the test extra")
    rst = _load(ROOT / "docs" / "_rst_roles.py", "_rst_roles")
    text = (
        "For each :math:`n`, see :func:`total_weight`:\n\n"
        "    .. math:: \\ell_n = -w_{y_n}\n"
        "        x_{n, y_n},\n\n"
        "and a block::\n\n    code\n"
    )
    assert rst.markdown(text) == (
        "For each $n$, see `total_weight`:\n\n"
        "    $$\n    \\ell_n = -w_{y_n} x_{n, y_n},\n    $$\n\n"
        "and a block:\n\n    code\n"
    )


@once
@pytest.mark.slow
def test_documentation_site_builds_without_a_warning(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra")
    done = subprocess.run(
        [
            sys.executable, "-m", "mkdocs", "build", "--strict",
            "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site"),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    # The API reference documents every public name.
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    headings = set(re.findall(r'class="doc doc-heading">\s*(?:<span[^>]*>)?([\w.]+)\s*<', api))
    assert {f"nllloss.{name}" for name in nllloss.__all__} <= headings
    for page in PAGES[1:]:
        if not page.name.startswith("_"):
            built = page.relative_to(ROOT / "docs").with_suffix("")
            index = "index.html" if built.name == "index" else f"{built}/index.html"
            assert (tmp_path / "site" / index).exists(), index

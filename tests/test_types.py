"""Static types: the public functions' results have the type of their input's library.

``mypy --strict`` (with the project's ``[tool.mypy]`` settings) checks the typed example
user script and a file of ``reveal_type`` calls, whose revealed types are compared with the
expected ones: the loss of a ``torch.Tensor`` is a ``torch.Tensor``, ``return_lse=True``
gives a pair, and so on.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import nllloss

pytest.importorskip("mypy", reason="mypy is in the test extra")

ROOT = pathlib.Path(__file__).parents[1]

# Each call, and an expression of the type mypy must reveal for it: x is a torch tensor,
# n a NumPy array, j a JAX array.
REVEALS = [
    ("nllloss.nll_loss(x, t)", "x"),
    ("nllloss.nll_loss(x, t, from_logits=True, return_lse=True)", "(x, x)"),
    ("nllloss.nll_loss(x, t, from_logits=True, return_lse=False)", "x"),
    ("nllloss.nll_loss(x, t, from_logits=True, return_lse=flag)", "x if flag else (x, x)"),
    (
        "nllloss.nll_loss(x, t, from_logits=True, return_stats=True)",
        "nllloss.LossAndStats(x, nllloss.token_stats(x, t))",
    ),
    ("nllloss.nll_loss_backward(1.0, x, t)", "x"),
    ("nllloss.nll_loss_and_grad(x, t)", "(x, x)"),
    ("nllloss.total_weight(t)", "t"),
    ("nllloss.NLLLoss(from_logits=True)(x, t)", "x"),
    ("nllloss.linear_cross_entropy(x, w, t)", "x"),
    (
        "nllloss.linear_cross_entropy(x, w, t, return_stats=True)",
        "nllloss.LossAndStats(x, nllloss.token_stats(x, t))",
    ),
    ("nllloss.linear_cross_entropy_and_grad(x, w, t)", "(x, x, x, x if flag else None)"),
    ("nllloss.torch.CrossEntropyLoss().forward(x, t)", "x"),
    ("nllloss.nll_loss(n, nt)", "n"),
    ("nllloss.nll_loss(n, nt, from_logits=True, return_lse=True)", "(n, n)"),
    ("nllloss.nll_loss_and_grad(n, nt, from_logits=True, out=n)", "(n, n)"),
    ("nllloss.nll_loss(j, jt)", "j"),
]

PRELUDE = """\
import jax.numpy as jnp
import numpy as np
import torch

import nllloss
import nllloss.torch

x, w, t = torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(2, dtype=torch.long)
n, nt = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
j, jt = jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32)
flag = bool(len(t))
"""


@pytest.fixture
def numpy_engine():
    """Overrides conftest's two-engine fixture: a type check has no engine; it runs once."""
    return "default"


@pytest.mark.slow
def test_typed_example_and_revealed_types_pass_mypy_strict(tmp_path):
    reveals = tmp_path / "reveals.py"
    lines = [f"reveal_type({e})\nreveal_type({expected})\n" for e, expected in REVEALS]
    reveals.write_text(PRELUDE + "".join(lines))
    # mypy reads the nllloss that this test imports, as its users' checker would.
    env = {**os.environ, "MYPYPATH": str(pathlib.Path(nllloss.__file__).parents[1])}
    done = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(tmp_path / "cache"),
            str(ROOT / "examples" / "typed_usage.py"), str(reveals),
        ],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    revealed = re.findall(r"reveals\.py:\d+: note: Revealed type is \"(.*)\"", done.stdout)
    assert len(revealed) == 2 * len(REVEALS), done.stdout
    for (call, expected), got, want in zip(REVEALS, revealed[::2], revealed[1::2], strict=True):
        assert got == want, (call, got, expected, want)
    assert "Any" not in revealed


@pytest.mark.slow
def test_typed_example_runs():
    """The typed script is a real program: it runs and its checks hold."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "typed_usage.py")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "jax (2, 3)"

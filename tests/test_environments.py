"""Where the compiled NumPy kernels cannot load, the generic path computes, with one warning.

Each environment runs in a fresh interpreter: numba absent, ``NUMBA_DISABLE_JIT=1`` (numba
imports, but its decorators compile nothing), and no writable cache location (numba's
"cannot cache function ...: no locator available", reproduced by giving numba no cache
locator, as a read-only install with a read-only home directory does). Expected values:
torch 2.13's ``nll_loss`` and ``cross_entropy`` on the same arrays.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

SCRIPT = r"""
import json, warnings
import numpy as np
{prepare}
import nllloss
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5]], np.float32))
    t = np.array([0, 2, -100])
    results = [
        float(nllloss.nll_loss(x, t)),
        float(nllloss.nll_loss(x, t, from_logits=True, label_smoothing=0.1)),
        nllloss.nll_loss_backward(1.0, x, t).tolist(),
    ]
print(json.dumps({{
    "results": results,
    "warnings": [(w.category.__name__, str(w.message)) for w in caught],
}}))
"""

ENVIRONMENTS = {
    "numba absent": ("import sys; sys.modules['numba'] = None", {}, "numba does not import"),
    "NUMBA_DISABLE_JIT": ("", {"NUMBA_DISABLE_JIT": "1"}, "NUMBA_DISABLE_JIT is set"),
    "no cache location": (
        "import numba.core.caching as caching; caching.CacheImpl._locator_classes = []",
        {},
        "no writable cache location",
    ),
}


@pytest.fixture(autouse=True)
def numpy_engine():
    """Overrides conftest's: each test chooses its environment in a subprocess."""
    return None


def _expected():
    x = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5]]))
    t = torch.tensor([0, 2, -100])
    xg = x.clone().requires_grad_()
    F.nll_loss(xg, t).backward()
    return [
        float(F.nll_loss(x, t)),
        float(F.cross_entropy(x, t, label_smoothing=0.1)),
        xg.grad.tolist(),
    ]


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_the_generic_path_computes_with_one_warning(name):
    prepare, variables, reason = ENVIRONMENTS[name]
    env = {k: v for k, v in os.environ.items() if k != "NLLLOSS_DISABLE_NUMBA"}
    env.update(variables)
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(prepare=prepare)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(report["results"][0], _expected()[0], rtol=1e-6)
    np.testing.assert_allclose(report["results"][1], _expected()[1], rtol=1e-6)
    np.testing.assert_allclose(report["results"][2], _expected()[2], rtol=1e-6)
    ours = [w for w in report["warnings"] if w[0] == "FallbackWarning"]
    assert len(ours) == 1, report["warnings"]
    assert reason in ours[0][1]
    assert "The generic path computes instead" in ours[0][1]


def test_asking_for_the_generic_path_gives_no_warning():
    env = dict(os.environ, NLLLOSS_DISABLE_NUMBA="1")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(prepare="")],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["warnings"] == []
    np.testing.assert_allclose(report["results"][0], _expected()[0], rtol=1e-6)

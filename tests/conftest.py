"""Shared test helpers: torch (the oracle, pinned to 2.13.0), dtype conversions, bitwise compare."""

from __future__ import annotations

import collections
import os
import zlib

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

ORACLE_VERSION = "2.13.0"
if not torch.__version__.startswith(ORACLE_VERSION):
    raise RuntimeError(
        f"the oracle is torch {ORACLE_VERSION} (its CPU summation order is what nllloss "
        f"reproduces bit for bit); found torch {torch.__version__}"
    )

# Without a GPU, Triton's kernels run under its interpreter (test_triton.py). triton reads
# the switch when it is first imported, which a doctest run of src/ may do before the tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("NLLLOSS_HYPOTHESIS_EXAMPLES", "1000")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # the engine fixture holds for the whole test
    ],
    derandomize=True,
)
settings.load_profile("default")

# The quick tier, `python -m pytest -m "not slow"` (times in docs/testing.md): every test
# function of every file once or twice, on the compiled engine; what it leaves out is
# declared here, once. Left out: the second NumPy engine (the generic path, which the
# other routes are compared with all the same), hypothesis searches, the files whose tests
# start processes, threads or Triton's interpreter or train models, the tests in SLOW_TESTS
# or marked `@pytest.mark.slow`, and every parameter set of a test function after its first
# QUICK_CASES.
SLOW_FILES = frozenset({
    "test_bench.py",
    "test_cli_hostile.py",
    "test_distributed.py",
    "test_distributed_protocol.py",
    "test_gpu_check.py",
    "test_linear_distributed.py",
    "test_packaging.py",
    "test_threads.py",
    "test_transformers_trainers.py",
    "test_triton.py",
})  # fmt: skip
# Each took 10 s or more in a run of the quick tier on a loaded 2-core machine (together
# 40% of its 400 s; the last two, 40 s of 240 s in a later run).
SLOW_TESTS = frozenset({
    "tests/test_cli.py::test_dask_local_cluster_in_a_subprocess",
    "tests/test_cli.py::test_peak_memory_stays_bounded_by_the_block",
    "tests/test_cli.py::test_plot_of_many_classes_is_bounded",
    "tests/test_cli_calibration.py::test_any_blocks_and_dask_give_the_same_report",
    "tests/test_differential.py::test_bitwise_beyond_the_first_cascade_levels",
    "tests/test_differential.py::test_bitwise_on_thousands_of_random_problems",
    "tests/test_logit_options.py::test_jax_jit_and_grad",
    "tests/test_logit_options.py::test_every_dtype_computes_in_float32_or_wider",
    "tests/test_options.py::test_own_total_weight_gives_the_same_bits",
    "tests/test_api.py::test_results_do_not_depend_on_the_thread_count",
    "tests/test_kernel_numerics.py::test_every_integer_target_dtype_on_every_fused_route",
})  # fmt: skip
QUICK_CASES = 2


def pytest_collection_modifyitems(items):
    kept = collections.Counter()
    for item in items:
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("numpy_engine") if callspec else None
        function = item.nodeid.split("[", 1)[0]
        slow = (
            item.path.name in SLOW_FILES
            or function in SLOW_TESTS
            or engine == "generic"
            or getattr(getattr(item, "obj", None), "is_hypothesis_test", False)
            or item.get_closest_marker("slow") is not None
            or kept[function] >= QUICK_CASES
        )
        if slow:
            item.add_marker(pytest.mark.slow)
        else:
            kept[function] += 1


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = [np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64)]
EXACT_DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor with the same values and dtype (bfloat16 through float32, exactly)."""
    array = np.asarray(array)
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, order="C", copy=True))


def from_torch(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(BFLOAT16)
    return tensor.numpy()


def assert_bitwise(actual, expected) -> None:
    """Same dtype, shape and values, the sign of zero included; any NaN matches any NaN."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    same = (a == e) & (np.signbit(a) == np.signbit(e))
    assert np.all(same | both_nan), f"\nactual   {actual!r}\nexpected {expected!r}"


@pytest.fixture(params=["compiled", "generic"], autouse=True)
def numpy_engine(request, monkeypatch):
    """Every test runs on both NumPy backends: the numba kernels and the generic path."""
    from nllloss import _generic, _routes
    from nllloss._kernels import cpu

    if request.param == "compiled":
        assert not isinstance(cpu.backend(), _generic.Backend), "the numba kernels did not load"
    else:
        monkeypatch.setattr(cpu, "backend", cpu.generic_numpy)
        monkeypatch.setattr(_routes, "_BACKENDS", {})
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))

"""Shared test helpers: torch (the oracle, pinned to 2.13.0), dtype conversions, bitwise compare."""

from __future__ import annotations

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
    from nllloss import _cpu, _dispatch, _generic

    if request.param == "compiled":
        assert not isinstance(_cpu.backend(), _generic.Backend), "the numba kernels did not load"
    else:
        monkeypatch.setattr(_cpu, "backend", _cpu._generic_numpy)
        monkeypatch.setattr(_dispatch, "_BACKENDS", {})
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))

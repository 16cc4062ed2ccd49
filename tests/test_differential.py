"""nllloss against torch 2.13 on random problems: forward values and autograd gradients.

float32 and float64 must be bit-identical to torch (forward and backward). float16 and
bfloat16 accumulate in float32 by design (torch accumulates in 16 bits), so their reduced
results are checked against an independent float64 computation within a rounding bound,
and their elementwise results ('none', the 'sum' gradient) bit for bit against torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EXACT_DTYPES, FLOAT_DTYPES, assert_bitwise, from_torch, to_torch
from hypothesis import given
from hypothesis import strategies as st

import nllloss

LEGACY = [(None, None), *[(s, r) for s in (None, True, False) for r in (None, True, False)][1:]]


@dataclass
class Problem:
    input: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None
    ignore_index: int
    reduction: str  # after resolving the legacy arguments
    size_average: object = None
    reduce: object = None

    @property
    def legacy(self) -> bool:
        return self.size_average is not None or self.reduce is not None

    @property
    def loss_shape(self) -> tuple[int, ...]:
        if self.reduction == "none" and self.input.ndim > 1:
            return self.target.shape
        return ()

    def kwargs(self) -> dict:
        kwargs = {"weight": self.weight, "ignore_index": self.ignore_index}
        if self.legacy:
            kwargs.update(size_average=self.size_average, reduce=self.reduce)
        else:
            kwargs["reduction"] = self.reduction
        return kwargs


def resolve_legacy(size_average, reduce) -> str:
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    return "none" if not reduce else ("mean" if size_average else "sum")


def make_problem(
    rng: np.random.Generator,
    *,
    kind,
    batch,
    classes,
    spatial,
    dtype,
    weight_mode,
    ignore_mode,
    ignored_fraction,
    reduction,
    legacy=(None, None),
    target_dtype=np.int64,
) -> Problem:
    if kind == "unbatched":
        input_shape, target_shape = (classes,), ()
    else:
        input_shape, target_shape = (batch, classes, *spatial), (batch, *spatial)
    scale = 1.0 if dtype.itemsize == 2 else rng.choice([1.0, 30.0, 1e4])
    x = (-np.abs(rng.standard_normal(input_shape)) * scale).astype(dtype)
    if rng.random() < 0.2:
        x = (rng.standard_normal(input_shape) * scale).astype(dtype)  # any real values

    ignore_index = {
        "default": -100,
        "in_range": int(rng.integers(0, classes)),
        "above": classes + int(rng.integers(0, 300)),
        "negative": -int(rng.integers(1, 5)),
        "huge": 2**40,
    }[ignore_mode]
    t = rng.integers(0, classes, target_shape) if classes else np.zeros(target_shape, np.int64)
    ignored = rng.random(target_shape) < ignored_fraction
    if classes == 0:
        ignored[...] = True
    t = np.where(ignored, ignore_index, t).astype(np.int64)
    if np.can_cast(np.min_scalar_type(ignore_index), target_dtype) or not ignored.any():
        t = t.astype(target_dtype)

    weight = None
    if weight_mode != "none":
        weight = rng.uniform(0.05, 3.0, classes)
        if weight_mode == "zeros":
            weight[rng.random(classes) < 0.5] = 0.0
        elif weight_mode == "negative":
            weight = rng.uniform(-1.0, 2.0, classes)
        weight = weight.astype(dtype)
    size_average, reduce = legacy
    if size_average is not None or reduce is not None:
        reduction = resolve_legacy(size_average, reduce)
    return Problem(x, t, weight, ignore_index, reduction, size_average, reduce)


@st.composite
def problems(draw, dtypes=FLOAT_DTYPES):
    kind = draw(st.sampled_from(["unbatched", "2d", "2d", "3d", "4d", "5d"]))
    classes = draw(st.one_of(st.integers(1, 6), st.integers(7, 1000)))
    max_batch = 300 if kind == "2d" and classes < 50 else 6
    batch = draw(st.integers(0, max_batch))
    ndim_spatial = {"unbatched": 0, "2d": 0, "3d": 1, "4d": 2, "5d": 3}[kind]
    spatial = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim_spatial, max_size=ndim_spatial)))
    if classes > 50:
        spatial = tuple(min(s, 2) for s in spatial)
    legacy = draw(st.sampled_from(LEGACY)) if draw(st.booleans()) else (None, None)
    return make_problem(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        kind=kind,
        batch=batch,
        classes=classes,
        spatial=spatial,
        dtype=draw(st.sampled_from(dtypes)),
        weight_mode=draw(st.sampled_from(["none", "random", "zeros", "negative"])),
        ignore_mode=draw(st.sampled_from(["default", "in_range", "above", "negative", "huge"])),
        ignored_fraction=draw(st.sampled_from([0.0, 0.1, 0.3, 0.9, 1.0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        legacy=legacy,
        target_dtype=draw(st.sampled_from([np.int64, np.int64, np.int32, np.uint8, np.int16])),
    )


def upstream_gradient(rng, problem: Problem):
    if problem.loss_shape:
        return rng.standard_normal(problem.loss_shape).astype(problem.input.dtype)
    return problem.input.dtype.type(rng.choice([1.0, 0.37, -2.5, rng.standard_normal()]))


def torch_loss_and_grad(problem: Problem, grad_output):
    x = to_torch(problem.input).requires_grad_(True)
    t = torch.from_numpy(problem.target.astype(np.int64))
    w = None if problem.weight is None else to_torch(problem.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = F.nll_loss(x, t, **{**problem.kwargs(), "weight": w})
    loss.backward(to_torch(np.asarray(grad_output, dtype=problem.input.dtype)))
    return from_torch(loss), from_torch(x.grad)


def ours_loss_and_grad(problem: Problem, grad_output):
    if problem.legacy:
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
            loss = nllloss.nll_loss(problem.input, problem.target, **problem.kwargs())
    else:
        loss = nllloss.nll_loss(problem.input, problem.target, **problem.kwargs())
    grad = nllloss.nll_loss_backward(
        grad_output,
        problem.input,
        problem.target,
        weight=problem.weight,
        ignore_index=problem.ignore_index,
        reduction=problem.reduction,
    )
    return loss, grad


def float64_oracle(problem: Problem, grad_output):
    """Loss and gradient in float64 from the definition, with a bound on float32 summation error."""
    x = problem.input.astype(np.float64)
    classes = x.shape[0] if x.ndim == 1 else x.shape[1]
    rows = x.reshape(1, classes) if x.ndim == 1 else np.moveaxis(x, 1, -1).reshape(-1, classes)
    t = problem.target.reshape(-1).astype(np.int64)
    valid = t != problem.ignore_index
    safe = np.where(valid, t, 0)
    w = np.ones(classes) if problem.weight is None else problem.weight.astype(np.float64)
    w_hit = np.where(valid, w[safe] if classes else 0.0, 0.0)
    picked = (
        rows[np.arange(rows.shape[0]), safe] if classes and rows.shape[0] else np.zeros(t.shape)
    )
    losses = np.where(valid, -picked * w_hit, 0.0)
    eps = 2.0**-24 * (t.size + 16)
    loss_sum, total = losses.sum(), w_hit.sum()
    g = np.asarray(grad_output, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if problem.reduction == "mean":
            value = loss_sum / total
            err = eps * (
                np.abs(losses).sum() / abs(total) + abs(value) * np.abs(w_hit).sum() / abs(total)
            )
            grad_rows = np.where(valid, -w_hit * g / total, 0.0)
            grad_err = np.abs(grad_rows) * eps * np.abs(w_hit).sum() / abs(total)
        else:
            value = loss_sum
            err = eps * np.abs(losses).sum()
            g_rows = np.broadcast_to(g, problem.target.shape).reshape(-1) if g.ndim else g
            grad_rows = np.where(valid, -w_hit * g_rows, 0.0)
            grad_err = np.zeros_like(grad_rows)
    grad = np.zeros_like(rows)
    if classes and rows.shape[0]:
        grad[np.arange(rows.shape[0]), safe] = grad_rows
    if x.ndim == 1:
        grad = grad.reshape(x.shape)
    else:
        moved = (x.shape[0], *x.shape[2:], classes)
        grad = np.moveaxis(grad.reshape(moved), -1, 1)
    if problem.reduction == "none" and x.ndim > 1:
        value, err = losses.reshape(problem.target.shape), 0.0
    return value, err, grad, grad_err, grad_rows, safe, valid


def assert_close_low_precision(actual, expected, abs_err, dtype):
    """|actual - expected| within the float32 error bound plus 1 ulp of the 16-bit dtype."""
    mantissa = 10 if dtype == np.float16 else 7
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    tiny = 2.0**-24 if dtype == np.float16 else 2.0**-133
    bound = np.abs(expected) * 2.0**-mantissa + abs_err + tiny
    rounded = np.asarray(expected).astype(dtype).astype(np.float64)  # overflow to inf included
    ok = (
        (np.abs(actual - expected) <= bound)
        | (actual == rounded)
        | (np.isnan(actual) & np.isnan(expected))
    )
    assert np.all(ok), f"\nactual   {actual!r}\nexpected {expected!r}\nbound    {bound!r}"


def check_against_torch(problem: Problem, rng) -> None:
    grad_output = upstream_gradient(rng, problem)
    loss, grad = ours_loss_and_grad(problem, grad_output)
    torch_loss, torch_grad = torch_loss_and_grad(problem, grad_output)
    dtype = problem.input.dtype
    if dtype in EXACT_DTYPES:
        assert_bitwise(loss, torch_loss)
        assert_bitwise(grad, torch_grad)
        return
    assert loss.dtype == dtype
    assert loss.shape == torch_loss.shape
    assert grad.dtype == dtype
    assert grad.shape == problem.input.shape
    elementwise = problem.reduction == "none" and problem.input.ndim > 1
    if elementwise:
        assert_bitwise(loss, torch_loss)  # one rounding of an exact product, as torch
    value, err, expected_grad, grad_err, *_ = float64_oracle(problem, grad_output)
    assert_close_low_precision(loss, value, err, dtype)
    if problem.reduction == "mean":
        assert_close_low_precision(grad, expected_grad, grad_err.max(initial=0.0), dtype)
    else:
        assert_bitwise(grad, torch_grad)


@given(problems())
def test_matches_torch(problem):
    check_against_torch(problem, np.random.default_rng(problem.input.size))


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_bitwise_on_thousands_of_random_problems(dtype, rng):
    """Seeded bulk run: 1500 problems per dtype, larger batches than hypothesis draws."""
    kinds = {"2d": 0, "3d": 1, "4d": 2, "5d": 3}
    for _ in range(1500):
        kind = rng.choice(["unbatched", *kinds])
        classes = int(rng.choice([1, 2, 3, 5, 10, 100]))
        batch = int(rng.choice([0, 1, 3, 16, 17, 100, 257, 1000, 4097]))
        ndim_spatial = kinds.get(kind, 0)
        spatial = tuple(int(s) for s in rng.integers(1, 5, ndim_spatial))
        if kind != "2d":
            batch = min(batch, 64)
        problem = make_problem(
            rng,
            kind=kind,
            batch=batch,
            classes=classes,
            spatial=spatial,
            dtype=dtype,
            weight_mode=rng.choice(["none", "random", "zeros", "negative"]),
            ignore_mode=rng.choice(["default", "in_range", "above", "negative"]),
            ignored_fraction=rng.choice([0.0, 0.05, 0.25, 0.75, 1.0]),
            reduction=rng.choice(["none", "mean", "sum"]),
        )
        if rng.random() < 0.2 and problem.target.size:
            # Ignore every flush point of the cascade: its structure then changes the most.
            problem.target.reshape(-1)[::16] = problem.ignore_index
        check_against_torch(problem, rng)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_bitwise_beyond_the_first_cascade_levels(dtype, rng):
    """2**16 + 3 and 300_000 elements reach levels 4 and 5 of torch's eight-level cascade."""
    for rows, classes, spatial in [(2**16 + 3, 3, ()), (3000, 4, (100,)), (300_000, 2, ())]:
        for ignored_fraction in (0.0, 0.3):
            problem = make_problem(
                rng,
                kind="2d" if not spatial else "3d",
                batch=rows,
                classes=classes,
                spatial=spatial,
                dtype=dtype,
                weight_mode="random",
                ignore_mode="default",
                ignored_fraction=ignored_fraction,
                reduction="mean",
            )
            for reduction in ("mean", "sum"):
                problem.reduction = reduction
                check_against_torch(problem, rng)


@pytest.mark.parametrize(
    ("dtype", "reduction"),
    # (a float16 'sum' of millions of terms is inf, which the float64 oracle's cast warns of)
    [(np.float32, "none"), (np.float32, "mean"), (np.float32, "sum"),
     (np.float16, "none"), (np.float16, "mean")],
)  # fmt: skip
@pytest.mark.parametrize("spatial", [(), (64,)], ids=["2d", "3d"])
def test_gradients_past_the_zeroed_allocation_size(dtype, reduction, spatial, rng):
    """From ``cpu.ZEROED_GRADIENT_MIN_BYTES`` on a new gradient starts as zeros and only
    the targets are written: the same values as torch's, ignored and weighted elements
    included (float16 covers the 16-bit bit patterns)."""
    from nllloss._kernels import cpu

    classes = 8
    elements = cpu.ZEROED_GRADIENT_MIN_BYTES // np.dtype(dtype).itemsize
    problem = make_problem(
        rng,
        kind="2d" if not spatial else "3d",
        batch=elements // classes // (spatial[0] if spatial else 1) + 1,
        classes=classes,
        spatial=spatial,
        dtype=np.dtype(dtype),
        weight_mode="random",
        ignore_mode="default",
        ignored_fraction=0.3,
        reduction=reduction,
    )
    assert problem.input.nbytes >= cpu.ZEROED_GRADIENT_MIN_BYTES
    check_against_torch(problem, rng)
